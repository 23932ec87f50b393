//! Property values and QEMU's option syntax: `key=value` pairs joined by `,`, where a `,` inside a
//! value is written `,,`.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A typed property value. Rendered as `on`/`off`, decimal or the escaped string on the command
/// line, and as typed JSON over QMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prop {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
}

impl Prop {
    /// The value as QEMU's command line spells it (unescaped).
    pub fn to_cli(&self) -> String {
        match self {
            Prop::Str(s) => s.clone(),
            Prop::Int(i) => i.to_string(),
            Prop::Bool(b) => if *b { "on" } else { "off" }.to_owned(),
        }
    }

    /// The value as typed JSON.
    pub fn to_json(&self) -> Value {
        match self {
            Prop::Str(s) => Value::String(s.clone()),
            Prop::Int(i) => Value::from(*i),
            Prop::Bool(b) => Value::Bool(*b),
        }
    }
}

impl From<&str> for Prop {
    fn from(s: &str) -> Self {
        Prop::Str(s.to_owned())
    }
}
impl From<String> for Prop {
    fn from(s: String) -> Self {
        Prop::Str(s)
    }
}
impl From<i64> for Prop {
    fn from(i: i64) -> Self {
        Prop::Int(i)
    }
}
impl From<bool> for Prop {
    fn from(b: bool) -> Self {
        Prop::Bool(b)
    }
}

/// Doubles every `,` so that QEMU's option parser reads the value as one.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// Renders `first,key=value,...` with every value escaped.
pub fn render(first: &str, props: &[(String, Prop)]) -> String {
    let mut out = escape(first);
    for (k, v) in props {
        out.push(',');
        out.push_str(k);
        out.push('=');
        out.push_str(&escape(&v.to_cli()));
    }
    out
}

/// Parses an option string the way QEMU does: splits at single commas, reads `,,` as a comma.
/// Returns the leading bare value (the driver) and the `key=value` pairs.
pub fn parse(option: &str) -> (String, Vec<(String, String)>) {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = option.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    let mut iter = parts.into_iter();
    let first = iter.next().unwrap_or_default();
    let pairs = iter
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (p, String::new()),
        })
        .collect();
    (first, pairs)
}

/// Checks an id against QEMU's rule (`id_wellformed`): a letter first, then letters, digits, `-`,
/// `.` and `_`. Block node names are also limited to 31 bytes.
pub fn validate_id(id: &str) -> Result<()> {
    let bad = |reason| Error::InvalidId {
        id: id.to_owned(),
        reason,
    };
    let mut chars = id.chars();
    match chars.next() {
        None => return Err(bad("empty")),
        Some(c) if !c.is_ascii_alphabetic() => return Err(bad("must start with a letter")),
        _ => {}
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
        return Err(bad("only letters, digits, `-`, `.` and `_` are allowed"));
    }
    Ok(())
}

/// A short device id from a UUID: `prefix-` plus the UUID up to its third dash, e.g.
/// `disk-932df160-7a22-4067` for `932df160-7a22-4067-a1b2-…` (the scheme Ganeti uses), for an
/// orchestrator that names its devices by UUID: QEMU ids are limited, and a whole UUID is long.
pub fn id_from_uuid(prefix: &str, uuid: &str) -> Result<String> {
    let head: Vec<&str> = uuid.splitn(4, '-').take(3).collect();
    if head.len() < 3
        || head
            .iter()
            .any(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(Error::InvalidId {
            id: uuid.to_owned(),
            reason: "not a UUID",
        });
    }
    let id = format!("{prefix}-{}", head.join("-"));
    validate_id(&id)?;
    Ok(id)
}

/// Ordered properties: the order is the command line's.
pub type Props = Vec<(String, Prop)>;

pub(crate) fn p(key: &str, value: impl Into<Prop>) -> (String, Prop) {
    (key.to_owned(), value.into())
}

/// Typed JSON of `props`, with dotted keys (`cache.direct`) nested as QMP wants them, and an
/// object whose keys are `0`, `1`, … made a list, as QEMU's keyval does (`server.0.host`).
pub fn props_to_json(props: &[(String, Prop)]) -> Map<String, Value> {
    let mut out = nest(props);
    for value in out.values_mut() {
        listify(value);
    }
    out
}

/// Objects keyed `0`..`n` become lists, innermost first.
fn listify(value: &mut Value) {
    let Value::Object(map) = value else {
        return;
    };
    for inner in map.values_mut() {
        listify(inner);
    }
    let indexed = !map.is_empty() && (0..map.len()).all(|i| map.contains_key(&i.to_string()));
    if indexed {
        let list = (0..map.len())
            .map(|i| map.remove(&i.to_string()).expect("checked above"))
            .collect();
        *value = Value::Array(list);
    }
}

fn nest(props: &[(String, Prop)]) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in props {
        let mut obj = &mut out;
        let mut parts = key.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                obj.insert(part.to_owned(), value.to_json());
            } else {
                obj = obj
                    .entry(part.to_owned())
                    .or_insert_with(|| Value::Object(Map::new()))
                    .as_object_mut()
                    .expect("dotted keys nest objects");
            }
        }
    }
    out
}

/// A QOM object as both of QEMU's interfaces take it: `-object <type>,id=…,…` at launch and
/// `object-add` at hotplug, from one property list (`id` first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QomObject {
    /// The QOM type, for example `rng-random` or `secret`.
    pub qom_type: &'static str,
    /// Its properties, `id` first.
    pub props: Props,
}

impl QomObject {
    /// `-object` and its argument.
    pub fn args(&self) -> [String; 2] {
        ["-object".into(), render(self.qom_type, &self.props)]
    }

    /// `object-add` arguments.
    pub fn object_add(&self) -> qhotplug_qmp::command::ObjectAdd {
        let mut props = props_to_json(&self.props);
        let id = match props.remove("id") {
            Some(Value::String(id)) => id,
            _ => String::new(),
        };
        qhotplug_qmp::command::ObjectAdd {
            qom_type: self.qom_type.into(),
            id,
            props,
        }
    }
}

/// `blockdev-add` arguments from a node's property list (`driver` and `node-name` lifted out).
pub(crate) fn blockdev(props: &[(String, Prop)]) -> qhotplug_qmp::command::BlockdevAdd {
    let mut map = props_to_json(props);
    let driver = map
        .remove("driver")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let node_name = map
        .remove("node-name")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    qhotplug_qmp::command::BlockdevAdd {
        driver,
        node_name,
        props: map,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_through_the_parser() {
        let props = vec![("file".to_owned(), Prop::from("/tmp/a,file=/etc/passwd"))];
        let s = render("virtio-blk-pci", &props);
        assert_eq!(s, "virtio-blk-pci,file=/tmp/a,,file=/etc/passwd");
        let (first, pairs) = parse(&s);
        assert_eq!(first, "virtio-blk-pci");
        assert_eq!(
            pairs,
            vec![("file".to_owned(), "/tmp/a,file=/etc/passwd".to_owned())]
        );
    }

    #[test]
    fn ids() {
        for ok in ["disk-1234", "a", "n.e_t-0"] {
            validate_id(ok).unwrap();
        }
        for bad in ["", "1disk", "-a", "a,b", "a b", "a/b", "é"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
        assert_eq!(
            id_from_uuid("disk", "932df160-7a22-4067-a1b2-0123456789ab").unwrap(),
            "disk-932df160-7a22-4067"
        );
        assert!(id_from_uuid("disk", "not-a-uuid").is_err());
        assert!(id_from_uuid("1x", "932df160-7a22-4067-a1b2").is_err());
    }
}
