//! QMP arguments and error replies, as the mock QEMU reads and writes them: shared by the model
//! and its storage half.

use serde_json::{json, Value};

/// A command's answer: its `return`, or an error's class and text.
pub(crate) type Reply = Result<Value, (&'static str, String)>;

/// A `GenericError`.
pub(crate) fn generic(desc: impl Into<String>) -> (&'static str, String) {
    ("GenericError", desc.into())
}

/// A `DeviceNotFound`.
pub(crate) fn not_found(desc: impl Into<String>) -> (&'static str, String) {
    ("DeviceNotFound", desc.into())
}

/// An error reply, with the request's id echoed when it had one.
pub(crate) fn error_reply(class: &str, desc: &str, id: Option<&Value>) -> Value {
    let mut reply = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        reply["id"] = id.clone();
    }
    reply
}

/// A string argument.
pub(crate) fn str_arg<'a>(args: &'a Value, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

/// A string argument QEMU requires.
pub(crate) fn required<'a>(args: &'a Value, key: &str) -> Result<&'a str, (&'static str, String)> {
    str_arg(args, key).ok_or_else(|| generic(format!("Parameter '{key}' is missing")))
}
