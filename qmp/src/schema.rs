//! What a QEMU can do, from its own QAPI schema (`query-qmp-schema`), rather than from version
//! numbers.
//!
//! [`Client::schema`](crate::Client::schema) reads it on first need and shares one parsed copy
//! between every connection to the same QEMU build (same version, package string and
//! capabilities): a host running hundreds of VMs of one QEMU reads it once (the first connection
//! to ask does; the others wait for it) and holds it once. It is about 200 KiB of JSON on QEMU
//! 10.0.
//!
//! QEMU masks the names of most types in its introspection (they appear as `"1"`, `"2"`, …), so
//! questions are asked through what has a stable name: commands, their arguments and return
//! values, and events.
//!
//! ```no_run
//! # async fn demo(client: qhotplug_qmp::Client) -> qhotplug_qmp::Result<()> {
//! let schema = client.schema().await?;
//! assert!(schema.has_command("device_add"));
//! if schema.command_takes("query-named-block-nodes", "flat") {
//!     // QEMU 5.0 and later
//! }
//! let refusals = schema.has_event("DEVICE_UNPLUG_GUEST_ERROR"); // QEMU 6.2 and later
//! # let _ = refusals; Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use serde::Deserialize;

use crate::message::Greeting;

/// One QEMU's QAPI schema, indexed.
#[derive(Debug, Default)]
pub struct Schema {
    /// Command name → (argument type, return type).
    commands: HashMap<Box<str>, (Box<str>, Box<str>)>,
    /// Event name → data type.
    events: HashMap<Box<str>, Box<str>>,
    /// Object type → its members, and the types of its variants (a union's other members).
    objects: HashMap<Box<str>, Object>,
    /// Array type → element type.
    arrays: HashMap<Box<str>, Box<str>>,
    /// Enum type → its values.
    enums: HashMap<Box<str>, Box<[Box<str>]>>,
}

#[derive(Debug, Default)]
struct Object {
    members: HashMap<Box<str>, Box<str>>,
    variants: Box<[Box<str>]>,
}

/// `SchemaInfo` as QEMU sends it; only what the index keeps.
#[derive(Deserialize)]
struct Info {
    name: String,
    #[serde(rename = "meta-type")]
    meta: String,
    #[serde(rename = "arg-type", default)]
    arg_type: Option<String>,
    #[serde(rename = "ret-type", default)]
    ret_type: Option<String>,
    #[serde(rename = "element-type", default)]
    element_type: Option<String>,
    #[serde(default)]
    members: Vec<Member>,
    #[serde(default)]
    variants: Vec<Variant>,
    /// Enum values before QEMU 6.0 (since then also in `members`).
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize)]
struct Member {
    /// Absent for an alternate's members, which are only types.
    #[serde(default)]
    name: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct Variant {
    #[serde(rename = "type")]
    kind: String,
}

impl Schema {
    /// Indexes the `return` value of `query-qmp-schema`. Entries of meta-types it does not know
    /// (and members it does not use) are passed over, so a newer QEMU never breaks it.
    pub fn from_json(raw: &str) -> serde_json::Result<Schema> {
        let infos: Vec<Info> = serde_json::from_str(raw)?;
        let mut schema = Schema::default();
        for info in infos {
            let name: Box<str> = info.name.into();
            match info.meta.as_str() {
                "command" => {
                    let arg = info.arg_type.unwrap_or_default().into();
                    let ret = info.ret_type.unwrap_or_default().into();
                    schema.commands.insert(name, (arg, ret));
                }
                "event" => {
                    schema
                        .events
                        .insert(name, info.arg_type.unwrap_or_default().into());
                }
                "object" => {
                    let members = info
                        .members
                        .into_iter()
                        .filter(|m| !m.name.is_empty())
                        .map(|m| (m.name.into(), m.kind.unwrap_or_default().into()))
                        .collect();
                    let variants = info.variants.into_iter().map(|v| v.kind.into()).collect();
                    schema.objects.insert(name, Object { members, variants });
                }
                "array" => {
                    if let Some(element) = info.element_type {
                        schema.arrays.insert(name, element.into());
                    }
                }
                "enum" => {
                    let values = if info.values.is_empty() {
                        info.members.into_iter().map(|m| m.name.into()).collect()
                    } else {
                        info.values.into_iter().map(Into::into).collect()
                    };
                    schema.enums.insert(name, values);
                }
                _ => {}
            }
        }
        Ok(schema)
    }

    /// True when QEMU has the command.
    pub fn has_command(&self, command: &str) -> bool {
        self.commands.contains_key(command)
    }

    /// True when QEMU emits the event.
    pub fn has_event(&self, event: &str) -> bool {
        self.events.contains_key(event)
    }

    /// True when `command` takes the argument `arg` (for a union such as `blockdev-add`'s, an
    /// argument of any of its variants counts).
    pub fn command_takes(&self, command: &str, arg: &str) -> bool {
        self.commands
            .get(command)
            .is_some_and(|(args, _)| self.has_member(args, arg))
    }

    /// True when what `command` returns (each element, for a list) has the member `member`.
    pub fn command_returns(&self, command: &str, member: &str) -> bool {
        self.commands.get(command).is_some_and(|(_, ret)| {
            let ret = self.arrays.get(ret).unwrap_or(ret);
            self.has_member(ret, member)
        })
    }

    /// True when the data of `event` has the member `member`.
    pub fn event_has(&self, event: &str, member: &str) -> bool {
        self.events
            .get(event)
            .is_some_and(|data| self.has_member(data, member))
    }

    /// The values of the enum that argument `arg` of `command` takes, if it is an enum; for
    /// example `blockdev-add`'s `driver`.
    pub fn arg_values(&self, command: &str, arg: &str) -> Option<Vec<&str>> {
        let (args, _) = self.commands.get(command)?;
        let kind = self.member_type(args, arg)?;
        let values = self.enums.get(kind)?;
        Some(values.iter().map(AsRef::as_ref).collect())
    }

    /// True when the object type `type_name` (a name from the schema itself: most are masked as
    /// numbers) has the member `member`, directly or in one of its variants.
    pub fn has_member(&self, type_name: &str, member: &str) -> bool {
        self.member_type(type_name, member).is_some()
    }

    fn member_type(&self, type_name: &str, member: &str) -> Option<&str> {
        let mut seen = HashSet::new();
        let mut todo = vec![type_name];
        while let Some(name) = todo.pop() {
            if !seen.insert(name) {
                continue;
            }
            let Some(object) = self.objects.get(name) else {
                continue;
            };
            if let Some(kind) = object.members.get(member) {
                return Some(kind);
            }
            todo.extend(object.variants.iter().map(AsRef::as_ref));
        }
        None
    }

    /// How many commands the schema lists.
    pub fn command_count(&self) -> usize {
        self.commands.len()
    }
}

type Key = (String, String, Vec<String>);

/// Where a build's schema is loaded, once: every connection to the build shares the cell, so
/// however many connect at once, one reads `query-qmp-schema` and the others wait for it.
pub(crate) type Cell = tokio::sync::OnceCell<Arc<Schema>>;

/// The cells of the builds some live connection uses.
static CELLS: Mutex<Vec<(Key, Weak<Cell>)>> = Mutex::new(Vec::new());

/// The shared cell of the QEMU build that sent `greeting`.
pub(crate) fn cell(greeting: &Greeting) -> Arc<Cell> {
    let key: Key = (
        greeting.version.qemu.to_string(),
        greeting.version.package.clone(),
        greeting.capabilities.clone(),
    );
    let mut cells = CELLS.lock().unwrap_or_else(|p| p.into_inner());
    cells.retain(|(_, weak)| weak.strong_count() > 0);
    if let Some(cell) = cells
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        return cell;
    }
    let cell = Arc::new(Cell::new());
    cells.push((key, Arc::downgrade(&cell)));
    cell
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"[
        {"name": "query-named-block-nodes", "meta-type": "command", "arg-type": "10", "ret-type": "11"},
        {"name": "blockdev-add", "meta-type": "command", "arg-type": "20", "ret-type": "0"},
        {"name": "DEVICE_UNPLUG_GUEST_ERROR", "meta-type": "event", "arg-type": "30"},
        {"name": "10", "meta-type": "object", "members": [{"name": "flat", "default": null, "type": "bool"}]},
        {"name": "11", "meta-type": "array", "element-type": "12"},
        {"name": "12", "meta-type": "object", "members": [{"name": "node-name", "type": "str"}]},
        {"name": "20", "meta-type": "object", "tag": "driver",
         "members": [{"name": "driver", "type": "21"}, {"name": "node-name", "type": "str"}],
         "variants": [{"case": "file", "type": "22"}]},
        {"name": "21", "meta-type": "enum", "members": [{"name": "file"}, {"name": "raw"}], "values": ["file", "raw"]},
        {"name": "22", "meta-type": "object", "members": [{"name": "filename", "type": "str"}]},
        {"name": "30", "meta-type": "object", "members": [{"name": "path", "type": "str"}]},
        {"name": "0", "meta-type": "object", "members": []},
        {"name": "str", "meta-type": "builtin", "json-type": "string"},
        {"name": "98", "meta-type": "alternate", "members": [{"type": "str"}, {"type": "12"}]},
        {"name": "99", "meta-type": "some-future-kind", "whatever": [1, 2]}
    ]"#;

    #[test]
    fn answers_through_commands_and_events() {
        let s = Schema::from_json(SAMPLE).unwrap();
        assert!(s.has_command("blockdev-add"));
        assert!(!s.has_command("blockdev-reopen"));
        assert!(s.command_takes("query-named-block-nodes", "flat"));
        assert!(!s.command_takes("query-named-block-nodes", "depth"));
        // A union's variant members count as arguments.
        assert!(s.command_takes("blockdev-add", "filename"));
        assert!(s.command_returns("query-named-block-nodes", "node-name"));
        assert!(s.has_event("DEVICE_UNPLUG_GUEST_ERROR"));
        assert!(s.event_has("DEVICE_UNPLUG_GUEST_ERROR", "path"));
        assert!(!s.event_has("DEVICE_UNPLUG_GUEST_ERROR", "device"));
        assert_eq!(
            s.arg_values("blockdev-add", "driver"),
            Some(vec!["file", "raw"])
        );
        assert_eq!(s.command_count(), 2);
    }
}
