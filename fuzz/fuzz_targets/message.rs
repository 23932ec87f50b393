//! The message classifier on arbitrary frames: it never panics; what it accepts is a JSON object
//! with the members of exactly one kind of message; what it accepts as an event survives a round
//! trip through its wire form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qhotplug_qmp::message::Message;

/// Which of the kind-deciding members the frame has at its top level, when serde_json can read it.
fn kinds(frame: &[u8]) -> Option<(bool, bool, bool)> {
    let value: serde_json::Value = serde_json::from_slice(frame).ok()?;
    let object = value.as_object()?;
    Some((
        object.contains_key("QMP"),
        object.contains_key("return") || object.contains_key("error"),
        object.contains_key("event"),
    ))
}

fuzz_target!(|frame: &[u8]| {
    let message = Message::from_slice(frame);
    if message.is_err() {
        return;
    }
    assert_eq!(
        frame.trim_ascii_start().first(),
        Some(&b'{'),
        "accepted a frame that is not an object"
    );
    let members = kinds(frame);
    match message {
        Ok(Message::Event(event)) => {
            if let Some(kinds) = members {
                assert_eq!(kinds, (false, false, true), "an event with other kinds' members");
            }
            let wire = serde_json::to_vec(&event.to_json()).unwrap();
            match Message::from_slice(&wire) {
                Ok(Message::Event(again)) => assert_eq!(again, event),
                other => panic!("an event's wire form reads back as {other:?}"),
            }
        }
        Ok(Message::Reply(reply)) => {
            let _ = reply.id;
            if let Some(kinds) = members {
                assert_eq!(kinds, (false, true, false), "a reply with other kinds' members");
            }
        }
        Ok(Message::Greeting(g)) => {
            let _ = g.version;
            if let Some(kinds) = members {
                assert_eq!(kinds, (true, false, false), "a greeting with other kinds' members");
            }
        }
        Err(_) => unreachable!(),
    }
});
