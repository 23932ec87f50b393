//! QMP messages: the greeting, replies and events a server sends, and the requests a client sends.
//!
//! Everything here is sans-IO: bytes in, values out. Unknown JSON members are ignored, never rejected,
//! so a newer QEMU that adds members to its messages keeps working.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::{FrameError, QmpError};
use crate::event::Event;

/// The greeting a QMP server sends when a client connects.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Greeting {
    /// The server's version.
    pub version: VersionInfo,
    /// The capabilities the server offers, for example `"oob"`. Unknown names are kept as they are.
    pub capabilities: Vec<String>,
}

impl Greeting {
    /// True when the server offers out-of-band execution.
    pub fn offers_oob(&self) -> bool {
        self.capabilities.iter().any(|c| c == "oob")
    }
}

/// QEMU's version, as in the greeting and in `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct VersionInfo {
    /// The upstream version triple.
    pub qemu: VersionTriple,
    /// The packager's version string, for example `Debian 1:7.2+dfsg-7+deb12u18`.
    pub package: String,
}

/// A `major.minor.micro` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl std::fmt::Display for VersionTriple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// When QEMU emitted an event (host wall clock; `-1`/`-1` when QEMU could not read the clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// A reply to a command.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The `id` the server echoed, if the request carried one.
    pub id: Option<Value>,
    /// The `return` value, undecoded, or the error.
    pub result: Result<Box<RawValue>, QmpError>,
}

/// Anything a QMP server sends.
#[derive(Debug, Clone)]
pub enum Message {
    /// The greeting (first message on a connection).
    Greeting(Greeting),
    /// A reply to a command.
    Reply(Reply),
    /// An asynchronous event.
    Event(Event),
}

#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "QMP")]
    greeting: Option<Greeting>,
    #[serde(rename = "return")]
    ret: Option<Box<RawValue>>,
    error: Option<QmpError>,
    event: Option<String>,
    data: Option<Value>,
    timestamp: Option<Timestamp>,
    id: Option<Value>,
}

impl Message {
    /// Classifies one frame (one JSON object, without its line ending).
    pub fn from_slice(frame: &[u8]) -> Result<Message, FrameError> {
        let wire: Wire = serde_json::from_slice(frame).map_err(|e| FrameError::Malformed {
            reason: e.to_string(),
        })?;
        if let Some(g) = wire.greeting {
            return Ok(Message::Greeting(g));
        }
        if let Some(name) = wire.event {
            let timestamp = wire.timestamp.unwrap_or_default();
            return Ok(Message::Event(Event::from_wire(name, wire.data, timestamp)));
        }
        let result = match (wire.ret, wire.error) {
            (Some(ret), None) => Ok(ret),
            (None, Some(err)) => Err(err),
            (Some(_), Some(_)) => {
                return Err(FrameError::Malformed {
                    reason: "message has both `return` and `error`".into(),
                })
            }
            (None, None) => {
                return Err(FrameError::Malformed {
                    reason: "message has none of `QMP`, `return`, `error`, `event`".into(),
                })
            }
        };
        Ok(Message::Reply(Reply {
            id: wire.id,
            result,
        }))
    }
}

/// How a request is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    /// `execute`: in-band, answered in order. Sent without an `id` (replies are matched in order).
    InBand,
    /// `exec-oob` with this `id`: answered as soon as it runs, possibly before earlier in-band replies.
    OutOfBand(u64),
}

/// Appends one request to `out` as the shortest valid JSON followed by CRLF.
///
/// `arguments` is omitted when it serializes to `{}` or `null`; in-band requests carry no `id`.
/// QEMU reads its monitor one byte per `recvmsg`, so every byte left out is time saved.
pub fn encode_request<A: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    name: &str,
    arguments: &A,
    execution: Execution,
) -> Result<(), serde_json::Error> {
    let start = out.len();
    let result = encode_request_inner(out, name, arguments, execution);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_request_inner<A: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    name: &str,
    arguments: &A,
    execution: Execution,
) -> Result<(), serde_json::Error> {
    out.extend_from_slice(match execution {
        Execution::InBand => b"{\"execute\":",
        Execution::OutOfBand(_) => b"{\"exec-oob\":",
    });
    serde_json::to_writer(&mut *out, name)?;
    let before_args = out.len();
    out.extend_from_slice(b",\"arguments\":");
    let args_start = out.len();
    serde_json::to_writer(&mut *out, arguments)?;
    match &out[args_start..] {
        b"{}" | b"null" => out.truncate(before_args),
        [b'{', ..] => {}
        _ => {
            return Err(serde::ser::Error::custom(format!(
                "arguments of `{name}` must serialize to a JSON object"
            )))
        }
    }
    if let Execution::OutOfBand(id) = execution {
        out.extend_from_slice(b",\"id\":");
        serde_json::to_writer(&mut *out, &id)?;
    }
    out.extend_from_slice(b"}\r\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn encode(name: &str, args: &Value, exec: Execution) -> String {
        let mut out = Vec::new();
        encode_request(&mut out, name, args, exec).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn requests_are_the_shortest_valid_json() {
        assert_eq!(
            encode("query-status", &json!({}), Execution::InBand),
            "{\"execute\":\"query-status\"}\r\n"
        );
        assert_eq!(
            encode("query-status", &Value::Null, Execution::InBand),
            "{\"execute\":\"query-status\"}\r\n"
        );
        assert_eq!(
            encode("device_del", &json!({"id": "disk-1"}), Execution::InBand),
            "{\"execute\":\"device_del\",\"arguments\":{\"id\":\"disk-1\"}}\r\n"
        );
        assert_eq!(
            encode("migrate-pause", &json!({}), Execution::OutOfBand(7)),
            "{\"exec-oob\":\"migrate-pause\",\"id\":7}\r\n"
        );
    }

    #[test]
    fn non_object_arguments_are_rejected_and_leave_nothing() {
        let mut out = b"prefix".to_vec();
        assert!(encode_request(&mut out, "x", &json!([1]), Execution::InBand).is_err());
        assert_eq!(out, b"prefix");
    }

    #[test]
    fn names_are_json_escaped() {
        assert_eq!(
            encode("a\"b", &json!({}), Execution::InBand),
            "{\"execute\":\"a\\\"b\"}\r\n"
        );
    }

    #[test]
    fn classifies_greeting_reply_error_event() {
        let g = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob", "future-cap"]}}"#;
        match Message::from_slice(g).unwrap() {
            Message::Greeting(g) => {
                assert_eq!(g.version.qemu.to_string(), "7.2.22");
                assert!(g.offers_oob());
                assert_eq!(g.capabilities.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        match Message::from_slice(br#"{"return": {"running": false}, "id": 3, "extra": 1}"#)
            .unwrap()
        {
            Message::Reply(r) => {
                assert_eq!(r.id, Some(json!(3)));
                assert_eq!(r.result.unwrap().get(), r#"{"running": false}"#);
            }
            other => panic!("{other:?}"),
        }
        match Message::from_slice(br#"{"error": {"class": "GenericError", "desc": "no"}}"#).unwrap()
        {
            Message::Reply(r) => {
                assert_eq!(r.id, None);
                assert_eq!(r.result.unwrap_err().class, "GenericError");
            }
            other => panic!("{other:?}"),
        }
        match Message::from_slice(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
        )
        .unwrap()
        {
            Message::Event(e) => {
                assert_eq!(e.name(), "STOP");
                assert_eq!(e.timestamp.microseconds, 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_what_is_not_a_message() {
        for bad in [
            &b"{}"[..],
            b"[1,2]",
            b"{\"return\": {}, \"error\": {\"class\":\"a\",\"desc\":\"b\"}}",
            b"{\"error\": 5}",
            b"not json",
            b"{\"return\": {}",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(Message::from_slice(bad), Err(FrameError::Malformed { .. })),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
