//! QMP messages: the greeting, replies and events a server sends, and the requests a client sends.
//!
//! Everything here is sans-IO: bytes in, values out. Unknown JSON members are ignored, never rejected,
//! so a newer QEMU that adds members to its messages keeps working.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{FrameError, QmpError};
use crate::event::{Event, Timestamp};

/// The greeting a QMP server sends when a client connects.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Greeting {
    /// The server's version.
    pub version: VersionInfo,
    /// The capabilities the server offers, for example `"oob"`. Unknown names are kept as they are;
    /// past the first [`MAX_CAPABILITIES`] the list is cut (skipped unread), so a hostile greeting
    /// cannot cost more memory than its bytes.
    #[serde(deserialize_with = "bounded_capabilities")]
    pub capabilities: Vec<String>,
}

/// How many capabilities a greeting keeps (QEMU 10.0 offers one: `oob`).
pub const MAX_CAPABILITIES: usize = 64;

/// The first [`MAX_CAPABILITIES`] strings of a list; the rest are skipped without being built.
fn bounded_capabilities<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Capabilities;
    impl<'de> serde::de::Visitor<'de> for Capabilities {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of capability names")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut kept = Vec::new();
            while kept.len() < MAX_CAPABILITIES {
                match seq.next_element::<String>()? {
                    Some(name) => kept.push(name),
                    None => return Ok(kept),
                }
            }
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(kept)
        }
    }
    d.deserialize_seq(Capabilities)
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

/// A reply to a command.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The `id` the server echoed, if the request carried one, as it came (undecoded: a peer's
    /// id is never built into a value, so a huge one costs its bytes once). Ours are numbers:
    /// [`Reply::numeric_id`].
    pub id: Option<Box<RawValue>>,
    /// The `return` value, undecoded, or the error.
    pub result: Result<Box<RawValue>, QmpError>,
}

impl Reply {
    /// The id as a number, when it is one (every id this crate issues is).
    pub fn numeric_id(&self) -> Option<u64> {
        self.id.as_ref()?.get().parse().ok()
    }
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

/// The members of a frame, read in one pass. Which of `QMP`, `return`/`error` and `event` are
/// present decides what the frame is; more than one of them makes it malformed.
#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "QMP")]
    greeting: Option<Greeting>,
    #[serde(rename = "return")]
    ret: Option<Box<RawValue>>,
    error: Option<QmpError>,
    event: Option<String>,
    data: Option<Box<RawValue>>,
    timestamp: Option<Timestamp>,
    id: Option<Box<RawValue>>,
}

fn malformed(reason: impl Into<String>) -> FrameError {
    FrameError::Malformed {
        reason: reason.into(),
    }
}

/// Rejects a frame that carries the members of more than one kind of message: it cannot be trusted
/// as any of them (a reply that also claims to be an event could shift every later reply).
fn check_one_kind(greeting: bool, reply: bool, event: bool) -> Result<(), FrameError> {
    match (greeting, reply, event) {
        (true, true, _) => Err(malformed("message mixes `QMP` with `return`/`error`")),
        (true, _, true) => Err(malformed("message mixes `QMP` with `event`")),
        (_, true, true) => Err(malformed("message mixes `event` with `return`/`error`")),
        _ => Ok(()),
    }
}

impl Message {
    /// Classifies one frame (one JSON object, without its line ending).
    ///
    /// A frame must be a JSON object with exactly one of `QMP` (a greeting), `return` or `error`
    /// (a reply), or `event`. Anything else is [`FrameError::Malformed`]. An event whose `data` or
    /// `timestamp` cannot be decoded (a lone UTF-16 surrogate or bad UTF-8, nesting past
    /// serde_json's limit, a timestamp of the wrong type) is still an event, without the part that
    /// could not be read: `data` `Null` (so [`EventKind::Other`](crate::EventKind::Other) for an
    /// event that needs data) or a zero timestamp. Such a frame can never be a reply.
    pub fn from_slice(frame: &[u8]) -> Result<Message, FrameError> {
        // A JSON text that starts with `{` is an object; serde would also fill `Wire` from an array.
        if frame.trim_ascii_start().first() != Some(&b'{') {
            return Err(malformed("frame is not a JSON object"));
        }
        let wire: Wire = match serde_json::from_slice(frame) {
            Ok(wire) => wire,
            Err(e) => {
                return Self::from_slice_lenient(frame).ok_or_else(|| malformed(e.to_string()))
            }
        };
        check_one_kind(
            wire.greeting.is_some(),
            wire.ret.is_some() || wire.error.is_some(),
            wire.event.is_some(),
        )?;
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
            (Some(_), Some(_)) => return Err(malformed("message has both `return` and `error`")),
            (None, None) => {
                return Err(malformed(
                    "message has none of `QMP`, `return`, `error`, `event`",
                ))
            }
        };
        Ok(Message::Reply(Reply {
            id: wire.id,
            result,
        }))
    }

    /// The slow path for a frame the fast read refused: `Some` only for a frame whose top-level
    /// members name an event and nothing else. Reads without recursion, so data nested past
    /// serde_json's limit, bad UTF-8 in the data, or a bad timestamp do not hide the event.
    #[cold]
    fn from_slice_lenient(frame: &[u8]) -> Option<Message> {
        let mut name = None;
        let mut data = None;
        let mut timestamp = None;
        for (key, value) in top_level_members(frame)? {
            match serde_json::from_slice::<String>(key).ok()?.as_str() {
                "event" => name = Some(serde_json::from_slice::<String>(value).ok()?),
                "data" => data = Some(value),
                "timestamp" => timestamp = Some(value),
                "QMP" | "return" | "error" => return None,
                _ => {}
            }
        }
        let name = name?;
        let timestamp = timestamp
            .and_then(|raw| serde_json::from_slice(raw).ok())
            .unwrap_or_default();
        let data = data
            .and_then(|raw| std::str::from_utf8(raw).ok())
            .and_then(|raw| RawValue::from_string(raw.to_owned()).ok());
        tracing::warn!(event = %crate::error::clip(&name), "event with undecodable members; delivered without them");
        Some(Message::Event(Event::from_wire(name, data, timestamp)))
    }
}

/// The members of a JSON object at its top level: each key (quotes included, escapes undecoded)
/// and the bytes of its value. Nesting is counted, not recursed into; strings are skipped with
/// their escapes. `None` when the frame is not shaped like an object.
fn top_level_members(frame: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let end_of_string = |from: usize| -> Option<usize> {
        // `from` is just past the opening quote; returns the index just past the closing one.
        let mut i = from;
        loop {
            match *frame.get(i)? {
                b'\\' => i += 2,
                b'"' => return Some(i + 1),
                _ => i += 1,
            }
        }
    };
    let skip_ws = |mut i: usize| {
        while frame.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let mut i = skip_ws(0);
    if frame.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut members = Vec::new();
    loop {
        i = skip_ws(i);
        match *frame.get(i)? {
            b'}' => return Some(members),
            b',' if !members.is_empty() => i = skip_ws(i + 1),
            _ if members.is_empty() => {}
            _ => return None,
        }
        if frame.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = end_of_string(i + 1)?;
        let key = &frame[i..key_end];
        i = skip_ws(key_end);
        if frame.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(i + 1);
        let mut depth = 0usize;
        i = start;
        loop {
            match *frame.get(i)? {
                b'"' => {
                    i = end_of_string(i + 1)?;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth > 0 => depth -= 1,
                b',' | b'}' if depth == 0 => break,
                _ => {}
            }
            i += 1;
        }
        let value = frame[start..i].trim_ascii_end();
        if value.is_empty() {
            return None;
        }
        members.push((key, value));
    }
}

/// How a request is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    /// `execute`: in-band, answered in order. Sent without an `id` (replies are matched in order).
    InBand,
    /// `execute` with this `id`: in-band, answered in order, and QEMU echoes the id, so a stray
    /// reply can be told from ours ([`Config::inband_ids`](crate::Config::inband_ids)).
    InBandWithId(u64),
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
        Execution::InBand | Execution::InBandWithId(_) => b"{\"execute\":",
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
    if let Execution::OutOfBand(id) | Execution::InBandWithId(id) = execution {
        out.extend_from_slice(b",\"id\":");
        serde_json::to_writer(&mut *out, &id)?;
    }
    out.extend_from_slice(b"}\r\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

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
                assert_eq!(r.numeric_id(), Some(3));
                assert_eq!(r.result.unwrap().get(), r#"{"running": false}"#);
            }
            other => panic!("{other:?}"),
        }
        match Message::from_slice(br#"{"error": {"class": "GenericError", "desc": "no"}}"#).unwrap()
        {
            Message::Reply(r) => {
                assert!(r.id.is_none());
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
            // Not objects: serde would fill a struct from an array positionally.
            b"[null, null, {\"running\": true}]",
            b"  [{\"return\": {}}]",
            b"\"return\"",
            b"17",
            // Members of two kinds of message at once.
            b"{\"return\": {}, \"event\": \"STOP\"}",
            b"{\"error\": {\"class\":\"a\",\"desc\":\"b\"}, \"event\": \"STOP\"}",
            b"{\"return\": {}, \"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": []}}",
            b"{\"event\": \"STOP\", \"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": []}}",
            // The lenient event path does not rescue a reply in disguise.
            b"{\"return\": 1, \"event\": \"STOP\", \"data\": \"\\ud800\"}",
        ] {
            assert!(
                matches!(Message::from_slice(bad), Err(FrameError::Malformed { .. })),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_greeting_keeps_its_first_capabilities_and_skips_the_rest_unread() {
        let names: Vec<String> = (0..1000).map(|i| format!("cap-{i}")).collect();
        let frame = json!({"QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
            "capabilities": names,
        }});
        match Message::from_slice(frame.to_string().as_bytes()).unwrap() {
            Message::Greeting(g) => assert_eq!(g.capabilities, names[..MAX_CAPABILITIES]),
            other => panic!("{other:?}"),
        }
        // A list shorter than the bound is kept whole; a name that is not a string is refused.
        let short = br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
        match Message::from_slice(short).unwrap() {
            Message::Greeting(g) => assert!(g.offers_oob()),
            other => panic!("{other:?}"),
        }
        let bad = br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": [1]}}"#;
        assert!(Message::from_slice(bad).is_err());
    }

    #[test]
    fn an_event_with_undecodable_members_is_still_an_event() {
        // A lone surrogate in the data, and a timestamp of the wrong type.
        let frame =
            br#"{"event": "DEVICE_DELETED", "data": {"device": "\ud800"}, "timestamp": "now"}"#;
        match Message::from_slice(frame).unwrap() {
            Message::Event(e) => {
                assert_eq!(e.name(), "DEVICE_DELETED");
                // Kept as it came, but no typed kind can be read from it.
                assert!(matches!(e.kind(), crate::EventKind::Other { .. }));
                assert_eq!(e.timestamp, Timestamp::default());
            }
            other => panic!("{other:?}"),
        }
        // Found by the fuzzer: data no JSON value can hold (a lone surrogate), beside a bad
        // timestamp, survives the event's wire form unchanged: the data is kept as sent.
        let frame = br#"{"event": "X", "data": {"a": "\ud800"}, "timestamp": "bad"}"#;
        let Ok(Message::Event(event)) = Message::from_slice(frame) else {
            panic!("not an event");
        };
        assert_eq!(event.data().get(), r#"{"a": "\ud800"}"#);
        match Message::from_slice(event.to_json().get().as_bytes()) {
            Ok(Message::Event(again)) => assert_eq!(again, event),
            other => panic!("{other:?}"),
        }
        // A good timestamp is kept when only the data is bad.
        let frame =
            br#"{"event": "X", "data": "\udc00", "timestamp": {"seconds": 5, "microseconds": 6}}"#;
        match Message::from_slice(frame).unwrap() {
            Message::Event(e) => assert_eq!(e.timestamp.seconds, 5),
            other => panic!("{other:?}"),
        }
    }
}
