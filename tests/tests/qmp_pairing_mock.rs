//! No caller ever gets another caller's reply, and the client's memory and fds stay bounded and
//! accounted for, whatever a hostile peer sends or fails to read.

use std::io::{Read, Write};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use qhotplug_mock::{event_json, MockServer};
use qhotplug_qmp::command::QueryStatus;
use qhotplug_qmp::{Config, Error, FrameError, Lagged};
use qhotplug_tests::open_fds;
use serde_json::{json, Value};

const STATUS: fn() -> Value = || json!({"running": true, "status": "running"});

/// Starts `n` in-band commands (each a different name, so a wrong answer would show) and waits
/// until the server has read them all.
async fn in_flight(
    server: &mut MockServer,
    client: &qhotplug_qmp::Client,
    n: usize,
) -> Vec<tokio::task::JoinHandle<qhotplug_qmp::Result<Value>>> {
    let mut calls = Vec::new();
    for i in 0..n {
        let c = client.clone();
        calls.push(tokio::spawn(async move {
            c.execute_raw(&format!("cmd-{i}"), &Value::Null).await
        }));
        assert_eq!(server.recv().await.unwrap().command(), format!("cmd-{i}"));
    }
    calls
}

#[test]
fn a_bad_frame_among_replies_never_shifts_an_answer_onto_another_caller() {
    qhotplug_tests::serial_test(async {
        let greeting = json!({"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                          "capabilities": []});
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "an id never issued",
                br#"{"return": "cmd-0", "id": 999}"#.to_vec(),
            ),
            (
                "an id that is no number",
                br#"{"return": "cmd-0", "id": {"x": []}}"#.to_vec(),
            ),
            (
                "return with event",
                br#"{"return": "cmd-0", "event": "STOP"}"#.to_vec(),
            ),
            (
                "error with event",
                br#"{"error": {"class": "GenericError", "desc": "cmd-0"}, "event": "STOP"}"#
                    .to_vec(),
            ),
            (
                "return with QMP",
                serde_json::to_vec(&json!({"return": "cmd-0", "QMP": greeting})).unwrap(),
            ),
            (
                "error with QMP",
                serde_json::to_vec(
                    &json!({"error": {"class": "GenericError", "desc": "x"}, "QMP": greeting}),
                )
                .unwrap(),
            ),
            ("an array", br#"[null, null, null, "cmd-0"]"#.to_vec()),
            ("an array of a reply", br#"[{"return": "cmd-0"}]"#.to_vec()),
        ];
        for (what, bad) in cases {
            let (mut server, client) = MockServer::connected(Config::new()).await;
            let calls = in_flight(&mut server, &client, 3).await;
            server.send_raw(&[bad, b"\r\n".to_vec()].concat()).await;
            // The replies that would now land one caller off, if anything still read them.
            for i in 0..3 {
                let _ = server
                    .try_send_raw(format!("{{\"return\": \"cmd-{i}\"}}\r\n").as_bytes())
                    .await;
            }
            for (i, call) in calls.into_iter().enumerate() {
                match call.await.unwrap() {
                    Err(Error::Frame(_)) => {}
                    other => panic!("{what}: caller {i} got {other:?}"),
                }
            }
            assert!(client.is_closed(), "{what}");
            assert!(matches!(
                client.execute(&QueryStatus).await,
                Err(Error::Disconnected)
            ));
        }
    });
}

#[test]
fn a_reply_with_nothing_in_flight_ends_the_connection() {
    qhotplug_tests::serial_test(async {
        let (mut server, client) = MockServer::connected(Config::new()).await;
        server.reply(STATUS()).await;
        let mut events = client.events();
        assert!(events.next().await.is_none(), "the connection ended");
        assert!(client.is_closed());
    });
}

#[test]
fn a_late_reply_to_an_oob_command_whose_caller_went_is_discarded_quietly() {
    qhotplug_tests::serial_test(async {
        let (mut server, client) = MockServer::connected(Config::new()).await;
        // One oob caller times out, another is dropped after its request went out.
        let timed_out = {
            let c = client.clone();
            tokio::spawn(async move {
                let args = json!({});
                tokio::time::timeout(
                    Duration::from_millis(20),
                    c.execute_oob_raw("migrate-pause", &args),
                )
                .await
            })
        };
        let first = server.recv().await.unwrap();
        assert!(timed_out.await.unwrap().is_err());
        let mut dropped = Box::pin(client.execute_oob_raw("migrate-pause", &Value::Null));
        assert!((&mut dropped).now_or_never().is_none());
        drop(dropped);
        let second = server.recv().await.unwrap();
        let calls = in_flight(&mut server, &client, 2).await;
        server.reply_id(json!("late"), first.id().unwrap()).await;
        server.reply_id(json!("late"), second.id().unwrap()).await;
        server.reply(json!("cmd-0")).await;
        server.reply(json!("cmd-1")).await;
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), json!(format!("cmd-{i}")));
        }
        assert!(!client.is_closed());
    });
}

#[test]
fn with_inband_ids_every_command_carries_one_and_a_stray_reply_is_caught() {
    qhotplug_tests::serial_test(async {
        let (mut server, client) = MockServer::connected(Config::new().inband_ids(true)).await;
        let calls = in_flight(&mut server, &client, 2).await;
        // The ids are echoed; the replies pair by them.
        server.reply_id(json!("cmd-0"), &json!(1)).await;
        server.reply_id(json!("cmd-1"), &json!(2)).await;
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), json!(format!("cmd-{i}")));
        }
        let c = client.clone();
        let call = tokio::spawn(async move { c.execute(&QueryStatus).await });
        let req = server.recv().await.unwrap();
        assert_eq!(req.raw, br#"{"execute":"query-status","id":3}"#);

        // Without ids on, a stray id-less reply would have been taken for this command's answer.
        server.reply(STATUS()).await;
        match call.await.unwrap() {
            Err(Error::Frame(FrameError::Unpaired { reason })) => {
                assert!(reason.contains("id-less"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn a_malformed_event_never_fails_the_commands_in_flight() {
    qhotplug_tests::serial_test(async {
        let (mut server, client) = MockServer::connected(Config::new()).await;
        let mut events = client.events();
        let calls = in_flight(&mut server, &client, 2).await;
        // A lone surrogate in its data, then a timestamp of the wrong type.
        server
        .send_raw(b"{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"\\ud800\"}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 1}}\r\n")
        .await;
        server
            .send_raw(b"{\"event\": \"STOP\", \"timestamp\": \"yesterday\"}\r\n")
            .await;
        server.reply(json!("cmd-0")).await;
        server.reply(json!("cmd-1")).await;
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), json!(format!("cmd-{i}")));
        }
        let first = events.next().await.unwrap().unwrap();
        assert_eq!(first.name(), "DEVICE_DELETED");
        // Its data is kept as sent, but no typed kind can be read from it.
        assert!(matches!(
            first.kind(),
            qhotplug_qmp::EventKind::Other { .. }
        ));
        assert_eq!(first.timestamp.seconds, 1);
        let second = events.next().await.unwrap().unwrap();
        assert_eq!(second.name(), "STOP");
        assert_eq!(second.timestamp.seconds, 0);
    });
}

/// One event frame of about `size` bytes, CRLF included.
fn big_event(size: usize) -> Vec<u8> {
    let event = event_json("BIG", json!({ "blob": "x".repeat(size) }));
    [serde_json::to_vec(&event).unwrap(), b"\r\n".to_vec()].concat()
}

/// Sends `frame` `n` times, then answers one command: when that answer is in, the client has read
/// every event.
async fn send_events(
    server: &mut MockServer,
    client: &qhotplug_qmp::Client,
    n: usize,
    frame: &[u8],
) {
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute(&QueryStatus).await });
    server.recv().await.unwrap();
    for _ in 0..n {
        server.send_raw(frame).await;
    }
    server.reply(STATUS()).await;
    assert!(call.await.unwrap().unwrap().running);
}

#[test]
fn events_are_held_only_until_every_live_subscriber_has_them() {
    qhotplug_tests::serial_test(async {
        let (mut server, client) = MockServer::connected(Config::new()).await;
        // Made once: the mock lives in our process, so its buffers count in what we measure.
        // Each event is just under the largest the connection delivers (MAX_EVENT_BYTES).
        let frame = big_event(60 << 10);
        // Warm up the codec's buffer and the allocator with events of the same size.
        send_events(&mut server, &client, 2, &frame).await;

        let before = qhotplug_tests::rss_mib();
        send_events(&mut server, &client, 1024, &frame).await;
        let grew = qhotplug_tests::rss_mib() - before;
        assert!(
            grew < 8.0,
            "no subscriber: 1024 × 60 KiB events grew us by {grew:.1} MiB"
        );

        let mut events = client.events();
        let before = qhotplug_tests::rss_mib();
        let reader = tokio::spawn(async move {
            let mut n = 0;
            while n < 1024 {
                match events.next().await {
                    Some(Ok(e)) => {
                        assert_eq!(e.name(), "BIG");
                        n += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
            events
        });
        send_events(&mut server, &client, 1024, &frame).await;
        let mut events = reader.await.unwrap();
        let grew = qhotplug_tests::rss_mib() - before;
        assert!(
            grew < 8.0,
            "one subscriber that read all 1024: grew by {grew:.1} MiB"
        );

        // An event past MAX_EVENT_BYTES is dropped: the subscriber gets the next one.
        let over = big_event(qhotplug_qmp::event::MAX_EVENT_BYTES);
        let small = event_json("SMALL", json!({}));
        let small = [serde_json::to_vec(&small).unwrap(), b"\r\n".to_vec()].concat();
        send_events(&mut server, &client, 1, &[over, small].concat()).await;
        assert_eq!(events.next().await.unwrap().unwrap().name(), "SMALL");
        drop(events);

        // Lag is still reported to a subscriber that falls behind.
        let (mut server, client) = MockServer::connected(Config::new().event_capacity(4)).await;
        let mut slow = client.events();
        send_events(&mut server, &client, 10, &big_event(16)).await;
        assert_eq!(slow.next().await, Some(Err(Lagged(6))));
    });
}

#[test]
fn a_peer_that_never_reads_cannot_grow_the_client() {
    qhotplug_tests::serial_test(async {
        let (server, client) = MockServer::connected(Config::new()).await;
        let pad = "x".repeat(8 << 10);
        let args = json!({ "pad": pad });
        // Fill the socket and the outbox once, so what follows measures growth, not the first fill.
        let fill: Vec<_> = (0..64)
            .map(|_| {
                let c = client.clone();
                let args = args.clone();
                tokio::spawn(async move {
                    c.execute_raw_timeout("fill", &args, Some(Duration::from_millis(10)))
                        .await
                })
            })
            .collect();
        for f in fill {
            let _ = f.await.unwrap();
        }
        let before = qhotplug_tests::rss_mib();
        let mut timed_out = 0;
        for _ in 0..50 {
            let batch: Vec<_> = (0..200)
                .map(|_| {
                    let c = client.clone();
                    let args = args.clone();
                    tokio::spawn(async move {
                        c.execute_raw_timeout("never-read", &args, Some(Duration::from_millis(5)))
                            .await
                    })
                })
                .collect();
            for call in batch {
                match call.await.unwrap() {
                    Err(Error::Timeout { .. }) => timed_out += 1,
                    Err(Error::Backlog { .. }) => {}
                    other => panic!("{other:?}"),
                }
            }
        }
        let grew = qhotplug_tests::rss_mib() - before;
        assert!(timed_out > 1000, "only {timed_out} of 10 000 were queued");
        assert!(
            grew < 8.0,
            "10 000 timed-out commands grew us by {grew:.1} MiB"
        );

        // Past the cap, a caller is told at once instead of queueing.
        let small = Config::new().max_outbox(64 << 10);
        drop((server, client));
        let (_server, client) = MockServer::connected(small).await;
        // Each call polled once: it is queued (and stays so, alive) or refused at once.
        let mut calls: Vec<_> = (0..64)
            .map(|_| Box::pin(client.execute_raw("never-read", &args)))
            .collect();
        let mut backlogged = 0;
        for call in &mut calls {
            if let std::task::Poll::Ready(result) = futures::poll!(call) {
                match result {
                    Err(Error::Backlog { limit }) => {
                        assert_eq!(limit, 64 << 10);
                        backlogged += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(backlogged > 0, "64 × 8 KiB never hit a 64 KiB cap");
        drop(calls);
    });
}

#[test]
fn abandoned_oob_calls_leave_nothing_behind() {
    qhotplug_tests::serial_test(async {
        let (mut server, client) = MockServer::connected(Config::new()).await;
        // The peer reads everything and answers nothing.
        let reader = tokio::spawn(async move { while server.recv().await.is_some() {} });
        let abandon = |n: usize| {
            for _ in 0..n {
                let mut call = Box::pin(client.execute_oob_raw("migrate-pause", &Value::Null));
                assert!((&mut call).now_or_never().is_none());
            }
        };
        abandon(1000);
        let before = qhotplug_tests::rss_mib();
        abandon(200_000);
        let grew = qhotplug_tests::rss_mib() - before;
        assert!(
            grew < 8.0,
            "200 000 abandoned exec-oob grew us by {grew:.1} MiB"
        );
        drop(client);
        reader.await.unwrap();
    });
}

#[test]
fn a_reply_before_its_fd_went_out_ends_the_connection_and_closes_the_fd() {
    qhotplug_tests::serial_test(async {
        let (mut server, client) = MockServer::connected(Config::new()).await;
        let before = open_fds();
        // A large request the never-reading peer takes only part of: what follows it stays queued.
        let big = {
            let c = client.clone();
            tokio::spawn(async move {
                let args = json!({ "pad": "x".repeat(768 << 10) });
                c.execute_oob_raw("big", &args).await
            })
        };
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let getfd = {
            let c = client.clone();
            tokio::spawn(async move { c.getfd("early", theirs.into()).await })
        };
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        assert!(!getfd.is_finished() && !big.is_finished());
        // An answer for getfd, whose bytes and fd are still in our outbox.
        server.reply(json!({})).await;
        match getfd.await.unwrap() {
            Err(Error::Frame(FrameError::Unpaired { reason })) => {
                assert!(reason.contains("before its command"), "{reason}")
            }
            other => panic!("getfd must never see Ok here: {other:?}"),
        }
        assert!(matches!(big.await.unwrap(), Err(Error::Frame(_))));
        // The fd was closed, not lost: its peer end reads EOF, and our fd table is as it was.
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ours.read(&mut [0u8; 1]).unwrap(), 0);
        drop(ours);
        assert_eq!(open_fds(), before);
    });
}

#[test]
fn a_peer_hanging_up_during_the_handshake_is_a_disconnect() {
    qhotplug_tests::serial_test(async {
        // Hangs up after part of the greeting; after the greeting; and shuts its read side so our
        // `qmp_capabilities` meets EPIPE.
        for how in [
            "inside the greeting",
            "after the greeting",
            "reading no more",
        ] {
            let (server, stream) = tokio::net::UnixStream::pair().unwrap();
            let mut server = server.into_std().unwrap();
            server.set_nonblocking(false).unwrap();
            let greeting = serde_json::to_vec(&qhotplug_mock::default_greeting()).unwrap();
            let mut kept = None;
            match how {
                "inside the greeting" => server.write_all(&greeting[..20]).unwrap(),
                "after the greeting" => server
                    .write_all(&[&greeting[..], b"\r\n"].concat())
                    .unwrap(),
                _ => {
                    server.shutdown(std::net::Shutdown::Read).unwrap();
                    server
                        .write_all(&[&greeting[..], b"\r\n"].concat())
                        .unwrap();
                    kept = Some(server.try_clone().unwrap());
                }
            }
            drop(server);
            let err = Config::new().connect_stream(stream).await.unwrap_err();
            assert!(err.is_disconnected(), "{how}: {err:?}");
            drop(kept);
        }
    });
}

/// A host process with SIGPIPE at its default (a C or Python program embedding the library)
/// survives a QEMU that hangs up while a `getfd` goes out. Runs the ignored test below in a child.
#[test]
fn a_peer_hanging_up_during_getfd_raises_no_sigpipe() {
    let _serial = qhotplug_tests::serial();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigpipe_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the child died: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("child survived: "), "{stdout}");
}

#[test]
#[ignore = "run by a_peer_hanging_up_during_getfd_raises_no_sigpipe in a child process"]
fn sigpipe_child() {
    // SAFETY: setting a signal disposition to its default, before any thread of ours depends on it.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let (server, stream) = std::os::unix::net::UnixStream::pair().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let peer = std::thread::spawn(move || {
        let mut server = server;
        let greeting = serde_json::to_vec(&qhotplug_mock::default_greeting()).unwrap();
        server.write_all(&greeting).unwrap();
        server.write_all(b"\r\n").unwrap();
        let mut byte = [0u8; 1];
        let mut line = Vec::new();
        while !line.ends_with(b"\n") {
            server.read_exact(&mut byte).unwrap();
            line.push(byte[0]);
        }
        server.write_all(b"{\"return\": {}}\r\n").unwrap();
        // Reads no more: the next write of ours meets EPIPE.
        server.shutdown(std::net::Shutdown::Read).unwrap();
        ready_tx.send(()).unwrap();
        server
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        stream.set_nonblocking(true).unwrap();
        let stream = tokio::net::UnixStream::from_std(stream).unwrap();
        let client = Config::new()
            .oob(false)
            .connect_stream(stream)
            .await
            .unwrap();
        ready_rx.recv().unwrap();
        client.getfd("x", qhotplug_tests::pipe_fd()).await
    });
    let _server = peer.join().unwrap();
    assert!(result.is_err());
    println!("child survived: {result:?}");
}
