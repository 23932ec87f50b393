//! The message classifier on arbitrary frames: it never panics; what it accepts as an event
//! survives a round trip through its wire form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qhotplug_qmp::message::Message;

fuzz_target!(|frame: &[u8]| {
    match Message::from_slice(frame) {
        Ok(Message::Event(event)) => {
            let wire = serde_json::to_vec(&event.to_json()).unwrap();
            match Message::from_slice(&wire) {
                Ok(Message::Event(again)) => assert_eq!(again, event),
                other => panic!("an event's wire form reads back as {other:?}"),
            }
        }
        Ok(Message::Reply(reply)) => {
            let _ = reply.id;
        }
        Ok(Message::Greeting(g)) => {
            let _ = g.version;
        }
        Err(_) => {}
    }
});
