//! A hostile monitor: a QEMU process runs guest-facing code, so the SDK treats what its monitor
//! sends as untrusted. Each case: a typed error, bounded memory, and nothing of ours leaked.

use std::time::Duration;

use qhotplug_mock::{event_json, MockServer};
use qhotplug_qmp::command::QueryStatus;
use qhotplug_qmp::{Config, Error, FrameError};
use qhotplug_tests::open_fds;
use serde_json::json;

const STATUS: fn() -> serde_json::Value = || json!({"running": true, "status": "running"});

#[test]
fn a_gibibyte_line_without_a_newline_is_a_typed_error_at_the_limit() {
    qhotplug_tests::serial_test(async {
        let (mut server, client) = MockServer::connected(Config::new()).await;
        let before = qhotplug_tests::rss_mib();
        let call = {
            let c = client.clone();
            tokio::spawn(async move { c.execute(&QueryStatus).await })
        };
        server.recv().await.unwrap();
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0usize;
        // Up to 1 GiB; the client hangs up once the line passes its 16 MiB limit.
        while sent < 1 << 30 {
            if server.try_send_raw(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        match call.await.unwrap() {
            Err(Error::Frame(FrameError::TooLong { limit })) => assert_eq!(limit, 16 << 20),
            other => panic!("{other:?}"),
        }
        assert!(
            sent < 1 << 30,
            "the client stopped reading at the limit ({sent} bytes sent)"
        );
        let grew = qhotplug_tests::rss_mib() - before;
        assert!(grew < 64.0, "memory grew by {grew:.1} MiB");
    });
}

#[test]
fn json_nested_a_hundred_thousand_deep_is_an_error_not_a_stack_overflow() {
    qhotplug_tests::serial_test(async {
        let deep = format!(
            "{{\"return\":{}{}}}\r\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        // As the payload of a reply: the caller gets an error, the connection lives on.
        let (mut server, client) = MockServer::connected(Config::new()).await;
        let call = {
            let c = client.clone();
            tokio::spawn(async move { c.execute_raw("query-status", &json!({})).await })
        };
        server.recv().await.unwrap();
        server.send_raw(deep.as_bytes()).await;
        match call.await.unwrap() {
            Err(Error::UnexpectedReply { source, .. }) => {
                assert!(source.to_string().contains("recursion"), "{source}")
            }
            other => panic!("{other:?}"),
        }
        // The frame itself was fine (a reply), so the connection lives on.
        let next = {
            let c = client.clone();
            tokio::spawn(async move { c.execute(&QueryStatus).await })
        };
        server.recv().await.unwrap();
        server.reply(STATUS()).await;
        assert!(next.await.unwrap().unwrap().running);
        // As an event's data.
        let deep_event = format!(
        "{{\"event\":\"X\",\"data\":{}0{},\"timestamp\":{{\"seconds\":1,\"microseconds\":1}}}}\r\n",
        "{\"a\":".repeat(5_000),
        "}".repeat(5_000)
    );
        let (mut server, client) = MockServer::connected(Config::new()).await;
        let call = {
            let c = client.clone();
            tokio::spawn(async move { c.execute(&QueryStatus).await })
        };
        let mut events = client.events();
        server.recv().await.unwrap();
        server.send_raw(deep_event.as_bytes()).await;
        server.reply(STATUS()).await;
        // Its data cannot be built into a value, but a frame with `event` alone is no reply: the
        // event comes through with its data as text, and the command in flight is answered as
        // usual.
        assert!(call.await.unwrap().unwrap().running);
        use futures::StreamExt;
        let event = events.next().await.unwrap().unwrap();
        assert_eq!(event.name(), "X");
        assert!(event.data().get().starts_with("{\"a\":{\"a\":"));
        assert_eq!(event.data_value(), serde_json::Value::Null);
    });
}

#[test]
fn invalid_utf8_is_a_typed_error() {
    qhotplug_tests::serial_test(async {
        let (mut server, client) = MockServer::connected(Config::new()).await;
        let call = {
            let c = client.clone();
            tokio::spawn(async move { c.execute(&QueryStatus).await })
        };
        server.recv().await.unwrap();
        server
            .send_raw(b"{\"return\":{\"status\":\"\xc3\x28\"}}\r\n")
            .await;
        assert!(matches!(
            call.await.unwrap(),
            Err(Error::Frame(FrameError::Malformed { .. }))
        ));
    });
}

#[test]
fn an_error_without_id_answers_the_oldest_in_band_command() {
    qhotplug_tests::serial_test(async {
        let (mut server, client) = MockServer::connected(Config::new()).await;
        let c = client.clone();
        let first = tokio::spawn(async move { c.execute(&QueryStatus).await });
        server.recv().await.unwrap();
        let c = client.clone();
        let second = tokio::spawn(async move { c.execute(&QueryStatus).await });
        server.recv().await.unwrap();
        // As QEMU's would, for a request it could not parse far enough to find an id.
        server.error("GenericError", "no").await;
        server.reply(STATUS()).await;
        match first.await.unwrap() {
            Err(Error::Qmp { error, .. }) => assert_eq!(error.desc, "no"),
            other => panic!("{other:?}"),
        }
        assert!(second.await.unwrap().unwrap().running);
    });
}

#[test]
fn fds_sent_to_us_are_closed_not_leaked() {
    qhotplug_tests::serial_test(async {
        let (mut server, client) = MockServer::connected(Config::new()).await;
        let before = open_fds();
        for _ in 0..100 {
            let call = {
                let c = client.clone();
                tokio::spawn(async move { c.execute(&QueryStatus).await })
            };
            server.recv().await.unwrap();
            let file = std::fs::File::open("/dev/null").unwrap();
            let reply = serde_json::to_vec(&json!({"return": STATUS()})).unwrap();
            server
                .send_with_fd(
                    &[reply, b"\r\n".to_vec()].concat(),
                    std::os::fd::AsFd::as_fd(&file),
                )
                .await;
            drop(file);
            assert!(call.await.unwrap().unwrap().running);
        }
        assert_eq!(open_fds(), before, "fds passed to us with SCM_RIGHTS");
    });
}

#[test]
fn ten_seconds_of_event_flood_keep_memory_bounded_and_commands_answered() {
    qhotplug_tests::serial_test(async {
        let (server, client) = MockServer::connected(Config::new()).await;
        let mut events = client.events(); // a subscriber that never reads
        let before = qhotplug_tests::rss_mib();
        let server = std::sync::Arc::new(tokio::sync::Mutex::new(server));
        let flood = {
            let server = server.clone();
            tokio::spawn(async move {
                let line = [
                    serde_json::to_vec(&event_json("BLOCK_IO_ERROR", json!({"device": "x"})))
                        .unwrap(),
                    b"\r\n".to_vec(),
                ]
                .concat()
                .repeat(64);
                let end = tokio::time::Instant::now() + Duration::from_secs(10);
                let mut sent = 0u64;
                while tokio::time::Instant::now() < end {
                    server.lock().await.send_raw(&line).await;
                    sent += 64;
                }
                sent
            })
        };
        // Commands keep getting answered while the flood runs.
        let mut answered = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(9);
        while tokio::time::Instant::now() < deadline {
            let call = {
                let c = client.clone();
                tokio::spawn(async move { c.execute(&QueryStatus).await })
            };
            {
                let mut s = server.lock().await;
                s.recv().await.unwrap();
                s.reply(STATUS()).await;
            }
            let status = tokio::time::timeout(Duration::from_secs(2), call)
                .await
                .expect("answered during the flood")
                .unwrap()
                .unwrap();
            assert!(status.running);
            answered += 1;
        }
        let sent = flood.await.unwrap();
        let grew = qhotplug_tests::rss_mib() - before;
        assert!(answered > 10, "{answered} commands answered");
        assert!(sent > 100_000, "only {sent} events sent");
        assert!(
            grew < 64.0,
            "memory grew by {grew:.1} MiB over {sent} events"
        );
        // The idle subscriber is told it lost events, then gets the newest ones.
        use futures::StreamExt;
        assert!(matches!(events.next().await, Some(Err(_))));
    });
}
