//! Shared pieces of the example programs: the `qmp-shell` input language.
//!
//! ```
//! use qhotplug_examples::parse_command;
//! use serde_json::json;
//! let (name, args) = parse_command("blockdev-add driver=null-co node-name=n0 size=1048576").unwrap();
//! assert_eq!(name, "blockdev-add");
//! assert_eq!(args, json!({"driver": "null-co", "node-name": "n0", "size": 1048576}));
//! ```

use serde_json::{Map, Value};

/// Parses one `qmp-shell` line into a command name and its arguments.
///
/// Two forms, as QEMU's own `qmp-shell` takes them:
/// - `command key=value …`: each value is JSON when it parses as JSON (`1`, `true`, `[1,2]`,
///   `{"a":1}`, `"quoted"`) and a string otherwise; a dotted key nests (`cache.direct=true` →
///   `{"cache": {"direct": true}}`).
/// - a raw request: `{"execute": "command", "arguments": {…}}`.
pub fn parse_command(line: &str) -> Result<(String, Value), String> {
    let line = line.trim();
    if line.starts_with('{') {
        let request: Value = serde_json::from_str(line).map_err(|e| format!("bad JSON: {e}"))?;
        let name = request
            .get("execute")
            .and_then(Value::as_str)
            .ok_or("a raw request needs \"execute\": \"<command>\"")?
            .to_owned();
        let args = request
            .get("arguments")
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()));
        if !args.is_object() {
            return Err("\"arguments\" must be an object".into());
        }
        return Ok((name, args));
    }
    let mut words = line.split_whitespace();
    let name = words.next().ok_or("empty line")?.to_owned();
    let mut args = Map::new();
    for word in words {
        let (key, raw) = word
            .split_once('=')
            .ok_or_else(|| format!("{word:?}: expected key=value"))?;
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("{word:?}: empty key"));
        }
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
        insert_dotted(&mut args, key, value)?;
    }
    Ok((name, Value::Object(args)))
}

fn insert_dotted(map: &mut Map<String, Value>, key: &str, value: Value) -> Result<(), String> {
    match key.split_once('.') {
        None => {
            if map.insert(key.to_owned(), value).is_some() {
                return Err(format!("{key} given twice"));
            }
            Ok(())
        }
        Some((head, rest)) => {
            let inner = map
                .entry(head.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            match inner {
                Value::Object(m) => insert_dotted(m, rest, value),
                _ => Err(format!("{head} is both a value and an object")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_values_nest_and_parse_as_json_where_they_can() {
        let (name, args) = parse_command(
            "  device_add driver=virtio-blk-pci id=d1 addr=0x9 cache.direct=true n=3 l=[1,2]",
        )
        .unwrap();
        assert_eq!(name, "device_add");
        assert_eq!(
            args,
            json!({"driver": "virtio-blk-pci", "id": "d1", "addr": "0x9",
                   "cache": {"direct": true}, "n": 3, "l": [1, 2]})
        );
        assert_eq!(parse_command("query-status").unwrap().1, json!({}));
    }

    #[test]
    fn raw_json_requests() {
        let (name, args) =
            parse_command(r#"{"execute": "qom-list", "arguments": {"path": "/machine"}}"#).unwrap();
        assert_eq!(
            (name.as_str(), args),
            ("qom-list", json!({"path": "/machine"}))
        );
        assert!(parse_command(r#"{"execute": 1}"#).is_err());
        assert!(parse_command(r#"{"execute": "x", "arguments": []}"#).is_err());
        assert!(parse_command("{not json").is_err());
    }

    #[test]
    fn bad_lines_are_errors() {
        for bad in [
            "",
            "cmd novalue",
            "cmd =1",
            "cmd a..b=1",
            "cmd a=1 a=2",
            "cmd a=1 a.b=2",
        ] {
            assert!(parse_command(bad).is_err(), "{bad:?}");
        }
    }
}
