//! The QMP client against a scripted server: what real QEMU cannot be made to do on demand.

use std::time::Duration;

use futures::StreamExt;
use qhotplug_mock::{default_greeting, event_json, MockServer};
use qhotplug_qmp::command::{QueryStatus, RunState};
use qhotplug_qmp::{Config, Error, EventKind, FrameError, Lagged};
use serde_json::{json, Value};

const STATUS: fn() -> Value = || json!({"running": false, "status": "prelaunch"});

#[tokio::test]
async fn handshake_tolerates_events_before_the_greeting_and_enables_oob() {
    let (mut server, stream) = MockServer::pair();
    let client = tokio::spawn(async move { Config::new().connect_stream(stream).await });
    server.event("STOP", json!({})).await;
    server.send(&default_greeting()).await;
    let caps = server.recv().await.unwrap();
    assert_eq!(
        caps.raw,
        br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#
    );
    server.reply(json!({})).await;
    let client = client.await.unwrap().unwrap();
    assert!(client.oob_enabled());
    assert_eq!(client.greeting().version.qemu.to_string(), "7.2.0");
}

#[tokio::test]
async fn oob_can_be_turned_off() {
    let (mut server, stream) = MockServer::pair();
    let client = tokio::spawn(async move { Config::new().oob(false).connect_stream(stream).await });
    server.send(&default_greeting()).await;
    assert_eq!(
        server.recv().await.unwrap().raw,
        br#"{"execute":"qmp_capabilities"}"#
    );
    server.reply(json!({})).await;
    assert!(!client.await.unwrap().unwrap().oob_enabled());
}

#[tokio::test]
async fn a_failed_negotiation_is_a_typed_error() {
    let (mut server, stream) = MockServer::pair();
    let client = tokio::spawn(async move { Config::new().connect_stream(stream).await });
    server.send(&default_greeting()).await;
    server.recv().await.unwrap();
    server
        .error("GenericError", "Capability oob not available")
        .await;
    let err = client.await.unwrap().unwrap_err();
    assert_eq!(err.qmp_class(), Some("GenericError"));
}

#[tokio::test]
async fn a_bad_greeting_is_a_protocol_error() {
    let (mut server, stream) = MockServer::pair();
    let client = tokio::spawn(async move { Config::new().connect_stream(stream).await });
    server.send_raw(b"HTTP/1.1 400 Bad Request\r\n").await;
    assert!(matches!(client.await.unwrap(), Err(Error::Protocol(_))));
}

#[tokio::test]
async fn a_silent_server_times_out_the_handshake() {
    let (_server, stream) = MockServer::pair();
    let err = Config::new()
        .connect_timeout(Duration::from_millis(50))
        .connect_stream(stream)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { ref command, .. } if command == "handshake"),
        "{err}"
    );
}

#[tokio::test]
async fn many_callers_each_get_their_own_reply_in_order() {
    let (mut server, client) = MockServer::connected(Config::new()).await;
    let mut calls = Vec::new();
    for i in 0..50 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .execute_raw("echo", &json!({ "n": i }))
                .await
                .unwrap()
        }));
        // Answer in the order the requests arrive: each reply must reach the caller that sent it.
        let req = server.recv().await.unwrap();
        assert_eq!(req.id(), None, "in-band requests carry no id");
        assert_eq!(req.command(), "echo");
    }
    // The replies go out after every request is in; each caller must get the value it sent.
    // (We received them in spawn order above, so reply n goes to caller n.)
    for i in 0..50 {
        server.reply(json!({ "n": i })).await;
    }
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap(), json!({ "n": i }));
    }
}

#[tokio::test]
async fn oob_replies_overtake_in_band_ones() {
    let (mut server, client) = MockServer::connected(Config::new()).await;
    let c1 = client.clone();
    let inband = tokio::spawn(async move { c1.execute(&QueryStatus).await });
    assert_eq!(server.recv().await.unwrap().command(), "query-status");
    let c2 = client.clone();
    let oob = tokio::spawn(async move { c2.execute_oob_raw("migrate-pause", &Value::Null).await });
    let req = server.recv().await.unwrap();
    assert!(
        req.raw.starts_with(br#"{"exec-oob":"migrate-pause","id":"#),
        "{:?}",
        req.request
    );
    let id = req.id().unwrap().clone();
    server.reply_id(json!("oob"), &id).await;
    assert_eq!(oob.await.unwrap().unwrap(), json!("oob"));
    assert!(!inband.is_finished());
    server.reply(STATUS()).await;
    assert_eq!(inband.await.unwrap().unwrap().status, RunState::Prelaunch);
}

#[tokio::test]
async fn a_dropped_or_timed_out_caller_does_not_desync_the_stream() {
    let (mut server, client) = MockServer::connected(Config::new()).await;
    // Caller 1 times out; caller 2's future is dropped; caller 3 waits.
    let c1 = client.clone();
    let timed_out = tokio::spawn(async move {
        c1.execute_timeout(&QueryStatus, Some(Duration::from_millis(20)))
            .await
    });
    server.recv().await.unwrap();
    let err = timed_out.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");

    let c2 = client.clone();
    let dropped = tokio::spawn(async move { c2.execute_raw("second", &Value::Null).await });
    server.recv().await.unwrap();
    dropped.abort();
    let _ = dropped.await;

    let c3 = client.clone();
    let third = tokio::spawn(async move { c3.execute_raw("third", &Value::Null).await });
    server.recv().await.unwrap();
    server.reply(json!("first")).await;
    server.reply(json!("second")).await;
    server.reply(json!("third")).await;
    assert_eq!(third.await.unwrap().unwrap(), json!("third"));
}

#[tokio::test]
async fn a_disconnect_in_the_middle_of_a_reply_fails_every_waiter_at_once() {
    let (mut server, client) = MockServer::connected(Config::new().default_timeout(None)).await;
    let mut calls = Vec::new();
    for _ in 0..10 {
        let c = client.clone();
        calls.push(tokio::spawn(async move { c.execute(&QueryStatus).await }));
        server.recv().await.unwrap();
    }
    let mut events = client.events();
    server.send_raw(br#"{"return": {"running": fal"#).await;
    server.close();
    for call in calls {
        let r = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("a waiter hung after the disconnect")
            .unwrap();
        assert!(matches!(r, Err(Error::Disconnected)), "{r:?}");
    }
    assert!(events.next().await.is_none(), "event streams end");
    assert!(client.is_closed());
    assert!(matches!(
        client.execute(&QueryStatus).await,
        Err(Error::Disconnected)
    ));
}

#[tokio::test]
async fn garbage_closes_the_connection_with_a_typed_error_for_every_waiter() {
    // After a frame that is not QMP, no later reply can be paired with its command for sure.
    for garbage in [
        &b"{not json\r\n"[..],
        b"\xff\xfe\xfd\r\n",
        b"[1,2,3]\r\n",
        b"{}\r\n",
    ] {
        let (mut server, client) = MockServer::connected(Config::new().max_frame(1024)).await;
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move { c.execute(&QueryStatus).await })
            })
            .collect();
        for _ in 0..3 {
            server.recv().await.unwrap();
        }
        server.send_raw(garbage).await;
        server.reply(STATUS()).await;
        for call in calls {
            match call.await.unwrap() {
                Err(Error::Frame(FrameError::Malformed { .. })) => {}
                other => panic!("{garbage:?}: {other:?}"),
            }
        }
        assert!(matches!(
            client.execute(&QueryStatus).await,
            Err(Error::Disconnected)
        ));
    }
}

#[tokio::test]
async fn events_interleaved_with_replies_reach_every_subscriber() {
    let (mut server, client) = MockServer::connected(Config::new()).await;
    let mut a = client.events();
    let mut b = client.events();
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute(&QueryStatus).await });
    server.recv().await.unwrap();
    server.event("RESUME", json!({})).await;
    server
        .event(
            "DEVICE_DELETED",
            json!({"device": "d1", "path": "/machine/peripheral/d1"}),
        )
        .await;
    server.reply(STATUS()).await;
    server.event("SOMETHING_NEW", json!({"x": 1})).await;
    call.await.unwrap().unwrap();
    for events in [&mut a, &mut b] {
        assert_eq!(
            events.next().await.unwrap().unwrap().kind().clone(),
            EventKind::Resume
        );
        assert_eq!(
            events.next().await.unwrap().unwrap().deleted_device(),
            Some("d1")
        );
        let other = events.next().await.unwrap().unwrap();
        assert_eq!(other.name(), "SOMETHING_NEW");
        assert_eq!(other.data_value(), json!({"x": 1}));
    }
}

#[tokio::test]
async fn execute_and_wait_catches_an_event_that_beats_the_reply() {
    let (mut server, client) = MockServer::connected(Config::new()).await;
    let c = client.clone();
    let call = tokio::spawn(async move {
        c.execute_and_wait(
            &qhotplug_qmp::command::DeviceDel { id: "d1".into() },
            |e| e.deleted_device() == Some("d1"),
            Duration::from_secs(5),
        )
        .await
    });
    server.recv().await.unwrap();
    server
        .event(
            "DEVICE_DELETED",
            json!({"path": "/machine/peripheral/d1/virtio-backend"}),
        )
        .await;
    server
        .event(
            "DEVICE_DELETED",
            json!({"device": "d1", "path": "/machine/peripheral/d1"}),
        )
        .await;
    server.reply(json!({})).await;
    let (_, event) = call.await.unwrap().unwrap();
    assert_eq!(event.deleted_device(), Some("d1"));
}

#[tokio::test]
async fn a_flood_of_events_never_blocks_replies_and_lag_is_reported() {
    let (mut server, client) = MockServer::connected(Config::new().event_capacity(64)).await;
    let mut never_reads = client.events();
    let mut flood = Vec::with_capacity(100_000 * 90);
    for i in 0..100_000 {
        let mut line =
            serde_json::to_vec(&event_json("BLOCK_IO_ERROR", json!({ "n": i }))).unwrap();
        line.extend_from_slice(b"\r\n");
        flood.extend_from_slice(&line);
    }
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute(&QueryStatus).await });
    server.recv().await.unwrap();
    server.send_raw(&flood).await;
    server.reply(STATUS()).await;
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the reply behind the flood never came")
        .unwrap()
        .unwrap();
    match never_reads.next().await.unwrap() {
        Err(Lagged(n)) => assert!(n >= 100_000 - 64, "lagged by {n}"),
        Ok(e) => panic!("expected lag, got {e:?}"),
    }
    // After the lag, the stream resumes with the newest retained events.
    let next = never_reads.next().await.unwrap().unwrap();
    assert_eq!(next.name(), "BLOCK_IO_ERROR");
}

#[tokio::test]
async fn fds_ride_with_their_command_and_only_one_is_in_flight() {
    use std::io::{Read, Write};
    let (mut server, client) = MockServer::connected(Config::new()).await;
    let (mut r1, w1) = std::os::unix::net::UnixStream::pair().unwrap();
    let (mut r2, w2) = std::os::unix::net::UnixStream::pair().unwrap();
    let c = client.clone();
    let first = tokio::spawn(async move { c.getfd("fd-one", w1.into()).await });
    let got1 = server.recv().await.unwrap();
    assert_eq!(
        got1.raw,
        br#"{"execute":"getfd","arguments":{"fdname":"fd-one"}}"#
    );
    assert_eq!(got1.fds.len(), 1);

    // Until the first fd command is answered nothing else is written: not a second fd command,
    // not an fd-less one (QEMU must read nothing more while its handler takes the fd).
    let c = client.clone();
    let second = tokio::spawn(async move { c.getfd("fd-two", w2.into()).await });
    let c = client.clone();
    let status = tokio::spawn(async move { c.execute(&QueryStatus).await });
    tokio::task::yield_now().await;
    let nothing = tokio::time::timeout(Duration::from_millis(100), server.recv()).await;
    assert!(
        nothing.is_err(),
        "written while an fd command was unanswered: {nothing:?}"
    );
    server.reply(json!({})).await; // answers getfd fd-one
    first.await.unwrap().unwrap();
    // Then the held requests go out in the order they were made.
    let got2 = server.recv().await.unwrap();
    assert_eq!(got2.arguments()["fdname"], "fd-two");
    assert_eq!(got2.fds.len(), 1);
    let nothing = tokio::time::timeout(Duration::from_millis(100), server.recv()).await;
    assert!(nothing.is_err(), "query-status overtook the fd command");
    server.reply(json!({})).await;
    second.await.unwrap().unwrap();
    let next = server.recv().await.unwrap();
    assert_eq!(next.command(), "query-status");
    server.reply(STATUS()).await;
    status.await.unwrap().unwrap();

    // The received fds are the ones we sent: write through them, read at the other ends.
    let mut f1 = std::fs::File::from(got1.fds.into_iter().next().unwrap());
    let mut f2 = std::fs::File::from(got2.fds.into_iter().next().unwrap());
    f1.write_all(b"1").unwrap();
    f2.write_all(b"2").unwrap();
    let mut buf = [0u8; 1];
    r1.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"1");
    r2.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"2");
}

#[tokio::test]
async fn wait_for_passes_over_other_events_and_gives_up_at_its_deadline() {
    let (mut server, client) = MockServer::connected(Config::new()).await;
    let mut events = client.events();
    server.event("RESUME", json!({})).await;
    server
        .event(
            "DEVICE_DELETED",
            json!({"device": "d1", "path": "/machine/peripheral/d1"}),
        )
        .await;
    let deleted = |e: &EventKind| matches!(e, EventKind::DeviceDeleted(d) if d.device.as_deref() == Some("d1"));
    let soon = tokio::time::Instant::now() + Duration::from_secs(5);
    assert!(
        events.wait_for(soon, deleted).await,
        "the second event is the one"
    );
    // Nothing more comes: false at the deadline, not a hang.
    let soon = tokio::time::Instant::now() + Duration::from_millis(50);
    assert!(!events.wait_for(soon, deleted).await);
    // And false when the connection ends first.
    server.close();
    let later = tokio::time::Instant::now() + Duration::from_secs(5);
    assert!(!events.wait_for(later, |_| true).await);
}
