//! The agent client against a scripted fake agent: what a real `qemu-ga` can be made to do only
//! by chance (stale replies, garbage around the sync, replies to commands never sent, lines past
//! the limit, an agent that stops answering or whose socket closes).

use std::time::Duration;

use qhotplug_qga::command::{
    ExecStatus, GuestExecStatus, GuestFsfreezeFreeze, GuestGetHostName, GuestPing,
};
use qhotplug_qga::{Agent, Config, Error, FreezeState, SENTINEL};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;

/// The agent's end: a listener standing in for QEMU's chardev, and the connection the client
/// made to it.
struct Fake {
    listener: UnixListener,
    conn: Option<(BufReader<OwnedReadHalf>, OwnedWriteHalf)>,
    _dir: tempfile::TempDir,
}

/// One request as the fake read it.
struct Request {
    /// It began with the sentinel byte.
    sentinel: bool,
    json: Value,
}

impl Request {
    fn command(&self) -> &str {
        self.json["execute"].as_str().unwrap_or("")
    }
    fn id(&self) -> Value {
        self.json["id"].clone()
    }
    fn sync_id(&self) -> i64 {
        assert_eq!(self.command(), "guest-sync-delimited", "{}", self.json);
        assert!(self.sentinel, "a sync starts with 0xFF");
        self.json["arguments"]["id"].as_i64().unwrap()
    }
}

impl Fake {
    fn new() -> (Fake, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let fake = Fake {
            listener,
            conn: None,
            _dir: dir,
        };
        (fake, path)
    }

    async fn accept(&mut self) {
        let (stream, _) = self.listener.accept().await.unwrap();
        let (read, write) = stream.into_split();
        self.conn = Some((BufReader::new(read), write));
    }

    /// The next request (a line; the agent's parser needs no newline, but the client sends one).
    async fn recv(&mut self) -> Request {
        let (read, _) = self.conn.as_mut().expect("accepted");
        let mut line = Vec::new();
        read.read_until(b'\n', &mut line).await.unwrap();
        assert!(!line.is_empty(), "the client hung up");
        let sentinel = line.first() == Some(&SENTINEL);
        let json = serde_json::from_slice(&line[usize::from(sentinel)..]).unwrap();
        Request { sentinel, json }
    }

    async fn send(&mut self, bytes: &[u8]) {
        let (_, write) = self.conn.as_mut().expect("accepted");
        write.write_all(bytes).await.unwrap();
    }

    async fn reply(&mut self, value: Value) {
        let mut line = serde_json::to_vec(&value).unwrap();
        line.push(b'\n');
        self.send(&line).await;
    }

    /// Answers the client's sync, after `before` (stale lines, garbage).
    async fn sync(&mut self, before: &[u8]) {
        let id = self.recv().await.sync_id();
        self.send(before).await;
        self.send(&[SENTINEL]).await;
        self.reply(json!({ "return": id })).await;
    }

    /// True when the client sent nothing more within `within` (it waits for its reply).
    async fn quiet(&mut self, within: Duration) -> bool {
        let (read, _) = self.conn.as_mut().expect("accepted");
        let mut byte = Vec::new();
        tokio::time::timeout(within, read.read_until(b'\n', &mut byte))
            .await
            .is_err()
    }
}

fn quick() -> Config {
    Config::new()
        .timeout(Duration::from_millis(300))
        .sync_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn a_sync_skips_stale_replies_and_garbage_and_a_reply_needs_our_id() {
    let (mut fake, path) = Fake::new();
    let agent = tokio::spawn(async move { Agent::connect(path, quick()).await });
    fake.accept().await;
    let id = fake.recv().await.sync_id();
    // What a client can find in the stream: an earlier client's reply, the agent's complaint about
    // the 0xFF byte, garbage, an earlier sync's reply, and garbage before the sentinel.
    fake.reply(json!({"return": 1})).await;
    fake.send(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\ufffd'\"}}\n")
        .await;
    fake.send(b"\x00\x01 not json at all\n").await;
    fake.send(&[SENTINEL]).await;
    fake.reply(json!({ "return": id + 1 })).await;
    fake.send(b"junk").await;
    fake.send(&[SENTINEL]).await;
    fake.reply(json!({ "return": id })).await;
    let agent = agent.await.unwrap().unwrap();

    let host = tokio::spawn(async move { agent.execute(&GuestGetHostName).await });
    let request = fake.recv().await;
    assert_eq!(request.command(), "guest-get-host-name");
    assert!(!request.sentinel);
    // A reply to a command never sent, one without an id, then ours.
    fake.reply(json!({"return": {"host-name": "intruder"}, "id": 4242}))
        .await;
    fake.reply(json!({"return": {"host-name": "no-id"}})).await;
    fake.reply(json!({"return": {"host-name": "guest"}, "id": request.id()}))
        .await;
    assert_eq!(host.await.unwrap().unwrap().host_name, "guest");
}

#[tokio::test]
async fn a_reply_that_comes_after_its_timeout_is_never_given_to_the_next_call() {
    let (mut fake, path) = Fake::new();
    let agent = std::sync::Arc::new(Agent::new(path, quick()));
    let first = tokio::spawn({
        let agent = agent.clone();
        async move { agent.execute(&GuestGetHostName).await }
    });
    fake.accept().await;
    fake.sync(b"").await;
    let late = fake.recv().await;
    // No answer in time.
    match first.await.unwrap() {
        Err(e @ Error::Timeout { .. }) => assert!(e.is_in_doubt()),
        other => panic!("{other:?}"),
    }
    // It comes now, before the next call's sync reply.
    let next = tokio::spawn({
        let agent = agent.clone();
        async move { agent.execute(&GuestGetHostName).await }
    });
    fake.reply(json!({"return": {"host-name": "late"}, "id": late.id()}))
        .await;
    fake.sync(b"").await;
    let request = fake.recv().await;
    assert_ne!(request.id(), late.id());
    fake.reply(json!({"return": {"host-name": "fresh"}, "id": request.id()}))
        .await;
    assert_eq!(next.await.unwrap().unwrap().host_name, "fresh");
}

#[tokio::test]
async fn an_agent_that_restarts_mid_command_is_a_typed_error_and_the_next_call_works() {
    let (mut fake, path) = Fake::new();
    let agent = std::sync::Arc::new(Agent::new(path, quick()));
    let call = spawned(&agent, GuestPing);
    fake.accept().await;
    fake.sync(b"").await;
    // The agent dies with the ping read: nothing comes back, the socket stays open (QEMU's).
    let lost = fake.recv().await;
    assert!(matches!(call.await.unwrap(), Err(Error::Timeout { .. })));
    // The new agent answers what it finds (the stale ping), complains about the 0xFF, then syncs.
    let again = spawned(&agent, GuestPing);
    let stale = format!("{}\n", json!({"return": {}, "id": lost.id()}));
    let complaint = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\ufffd'\"}}\n";
    fake.sync(format!("{stale}{complaint}").as_bytes()).await;
    let ping = fake.recv().await;
    fake.reply(json!({"return": {}, "id": ping.id()})).await;
    again.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_line_past_the_limit_is_dropped_as_it_arrives_and_the_next_call_resyncs() {
    let (mut fake, path) = Fake::new();
    let config = quick().max_frame(64 * 1024);
    let agent = std::sync::Arc::new(Agent::new(path, config));
    let call = spawned(&agent, GuestExecStatus { pid: 7 });
    fake.accept().await;
    fake.sync(b"").await;
    let request = fake.recv().await;
    // 150 KiB of output for a 64 KiB limit: refused once the limit is passed, never held whole
    // (the rest, still in the socket, is discarded by the next call's resync).
    let huge = "A".repeat(150 << 10);
    fake.reply(
        json!({"return": {"exited": true, "exitcode": 0, "out-data": huge}, "id": request.id()}),
    )
    .await;
    match call.await.unwrap() {
        Err(Error::FrameTooLong { limit }) => assert_eq!(limit, 64 * 1024),
        other => panic!("{other:?}"),
    }
    let call = spawned(&agent, GuestExecStatus { pid: 7 });
    fake.sync(b"").await;
    let request = fake.recv().await;
    fake.reply(
        json!({"return": {"exited": true, "exitcode": 3, "out-data": "aGk="}, "id": request.id()}),
    )
    .await;
    let status: ExecStatus = call.await.unwrap().unwrap();
    assert_eq!((status.exitcode, status.stdout()), (Some(3), &b"hi"[..]));
}

#[tokio::test]
async fn frozen_not_offered_and_failed_are_told_apart() {
    let (mut fake, path) = Fake::new();
    let agent = std::sync::Arc::new(Agent::new(path, quick()));
    let cases = [
        (
            "CommandNotFound",
            "Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state",
        ),
        (
            "CommandNotFound",
            "The command guest-fsfreeze-freeze has not been found",
        ),
        (
            "GenericError",
            "failed to freeze /: Device or resource busy",
        ),
    ];
    let mut first = true;
    for (class, desc) in cases {
        let call = spawned(&agent, GuestFsfreezeFreeze);
        if first {
            fake.accept().await;
            fake.sync(b"").await;
            first = false;
        }
        let request = fake.recv().await;
        fake.reply(json!({"error": {"class": class, "desc": desc}, "id": request.id()}))
            .await;
        let err = call.await.unwrap().unwrap_err();
        match (class, &err) {
            (_, Error::Frozen { command }) if desc.contains("frozen") => {
                assert_eq!(command, "guest-fsfreeze-freeze")
            }
            ("CommandNotFound", Error::Unsupported { .. }) => {}
            ("GenericError", Error::Agent { desc: d, .. }) => assert_eq!(d, desc),
            _ => panic!("{class} {desc}: {err:?}"),
        }
        // A refusal is an answer: the connection stays in sync (no resync before the next call).
    }
}

#[tokio::test]
async fn calls_from_many_tasks_go_one_at_a_time() {
    let (mut fake, path) = Fake::new();
    let agent = std::sync::Arc::new(Agent::new(path, quick()));
    let calls: Vec<_> = (0..8).map(|_| spawned(&agent, GuestPing)).collect();
    fake.accept().await;
    fake.sync(b"").await;
    for _ in 0..8 {
        let request = fake.recv().await;
        assert_eq!(request.command(), "guest-ping");
        // Nothing else is written while this one is unanswered.
        assert!(fake.quiet(Duration::from_millis(30)).await);
        fake.reply(json!({"return": {}, "id": request.id()})).await;
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_closed_socket_is_disconnected_and_the_next_call_connects_again() {
    let (mut fake, path) = Fake::new();
    let agent = std::sync::Arc::new(Agent::new(path.clone(), quick()));
    let call = spawned(&agent, GuestPing);
    fake.accept().await;
    fake.sync(b"").await;
    fake.recv().await;
    fake.conn = None;
    // The ping was sent whole: the agent may have run it.
    match call.await.unwrap() {
        Err(e @ Error::ReplyLost { .. }) => assert!(e.is_in_doubt()),
        other => panic!("{other:?}"),
    }
    let call = spawned(&agent, GuestPing);
    fake.accept().await;
    fake.sync(b"").await;
    let request = fake.recv().await;
    fake.reply(json!({"return": {}, "id": request.id()})).await;
    call.await.unwrap().unwrap();
    // With nothing listening: typed, naming the socket.
    drop(fake);
    match Agent::connect(&path, quick()).await {
        Err(Error::NotConnected { path: p, .. }) => assert_eq!(p, path),
        other => panic!("{other:?}"),
    }
}

/// `command`, run by `agent` in a task of its own (so the test can play the agent meanwhile).
fn spawned<C>(
    agent: &std::sync::Arc<Agent>,
    command: C,
) -> tokio::task::JoinHandle<qhotplug_qga::Result<C::Returns>>
where
    C: qhotplug_qmp::Command + Send + Sync + 'static,
    C::Returns: Send,
{
    let agent = agent.clone();
    tokio::spawn(async move { agent.execute(&command).await })
}

/// A freeze by `agent`, in a task of its own.
fn spawned_freeze(
    agent: &std::sync::Arc<Agent>,
    safety: Duration,
) -> tokio::task::JoinHandle<qhotplug_qga::Result<qhotplug_qga::Frozen>> {
    let agent = agent.clone();
    tokio::spawn(async move { agent.freeze(safety).await })
}

/// Answers the next request, which must be `command`, with `value`.
async fn answer(fake: &mut Fake, command: &str, value: Value) {
    let request = fake.recv().await;
    assert_eq!(request.command(), command, "{}", request.json);
    fake.reply(json!({"return": value, "id": request.id()}))
        .await;
}

#[tokio::test]
async fn a_freeze_thaws_when_told_when_dropped_on_its_safety_timer_and_when_it_fails() {
    let (mut fake, path) = Fake::new();
    let agent = std::sync::Arc::new(Agent::new(path, quick()));
    let long = Duration::from_secs(3600);

    // Thawed when told; the safety timer is gone with it.
    let freeze = spawned_freeze(&agent, Duration::from_millis(200));
    fake.accept().await;
    fake.sync(b"").await;
    answer(&mut fake, "guest-fsfreeze-freeze", json!(2)).await;
    let frozen = freeze.await.unwrap().unwrap();
    assert_eq!(frozen.count(), 2);
    let thaw = tokio::spawn(frozen.thaw());
    answer(&mut fake, "guest-fsfreeze-thaw", json!(2)).await;
    assert_eq!(thaw.await.unwrap().unwrap(), 2);
    assert!(
        fake.quiet(Duration::from_millis(400)).await,
        "a second thaw"
    );

    // Thawed when dropped.
    let freeze = spawned_freeze(&agent, long);
    answer(&mut fake, "guest-fsfreeze-freeze", json!(1)).await;
    drop(freeze.await.unwrap().unwrap());
    answer(&mut fake, "guest-fsfreeze-thaw", json!(1)).await;

    // Thawed by the safety timer when nobody does.
    let freeze = spawned_freeze(&agent, Duration::from_millis(100));
    answer(&mut fake, "guest-fsfreeze-freeze", json!(1)).await;
    let held = freeze.await.unwrap().unwrap();
    answer(&mut fake, "guest-fsfreeze-thaw", json!(1)).await;
    // Dropped after the timer thawed: nothing more is sent (polled until the timer's task is
    // done with its reply, with a deadline).
    assert!(held.timed_out());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while held.state() != FreezeState::Thawed {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    drop(held);
    assert!(
        fake.quiet(Duration::from_millis(200)).await,
        "a thaw after the timer's"
    );

    // A freeze that fails is thawed at once, and its error returned.
    let freeze = spawned_freeze(&agent, long);
    let request = fake.recv().await;
    fake.reply(json!({"error": {"class": "GenericError", "desc": "failed to freeze /mnt"}, "id": request.id()}))
        .await;
    answer(&mut fake, "guest-fsfreeze-thaw", json!(0)).await;
    assert!(matches!(freeze.await.unwrap(), Err(Error::Agent { .. })));
}

/// A fake agent, a client of it, and a freeze of one filesystem that client holds.
async fn frozen_on_a_fake(
    config: Config,
    safety: Duration,
) -> (Fake, std::sync::Arc<Agent>, qhotplug_qga::Frozen) {
    let (mut fake, path) = Fake::new();
    let agent = std::sync::Arc::new(Agent::new(path, config));
    let freeze = spawned_freeze(&agent, safety);
    fake.accept().await;
    fake.sync(b"").await;
    answer(&mut fake, "guest-fsfreeze-freeze", json!(1)).await;
    (fake, agent, freeze.await.unwrap().unwrap())
}

/// A config whose thaws are retried for a few seconds at most.
fn retrying() -> Config {
    quick().thaw_deadline(Duration::from_secs(5))
}

fn refuse(request: &Request, class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}, "id": request.id()})
}

#[tokio::test]
async fn a_second_freeze_never_thaws_the_first_and_a_refused_freeze_thaws_nothing() {
    let (mut fake, path) = Fake::new();
    let agent = std::sync::Arc::new(Agent::new(path, retrying()));
    let long = Duration::from_secs(3600);
    let first = spawned_freeze(&agent, long);
    fake.accept().await;
    fake.sync(b"").await;
    answer(&mut fake, "guest-fsfreeze-freeze", json!(2)).await;
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.state(), FreezeState::Frozen);

    // While the guard lives, a second freeze is refused and nothing at all is sent.
    match agent.freeze(long).await {
        Err(Error::Frozen { command }) => assert_eq!(command, "guest-fsfreeze-freeze"),
        other => panic!("{other:?}"),
    }
    assert!(
        fake.quiet(Duration::from_millis(200)).await,
        "sent something"
    );
    assert_eq!(first.state(), FreezeState::Frozen);
    assert_eq!(agent.freeze_state(), FreezeState::Frozen);
    // Nor does ensure_thawed thaw a live guard's freeze.
    let ensure = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.ensure_thawed().await })
    };
    answer(&mut fake, "guest-fsfreeze-status", json!("frozen")).await;
    assert_eq!(
        ensure.await.unwrap().unwrap(),
        qhotplug_qga::command::FreezeStatus::Frozen
    );
    assert!(fake.quiet(Duration::from_millis(200)).await, "a thaw");

    let thaw = tokio::spawn(first.thaw());
    answer(&mut fake, "guest-fsfreeze-thaw", json!(2)).await;
    assert_eq!(thaw.await.unwrap().unwrap(), 2);
    assert_eq!(agent.freeze_state(), FreezeState::Thawed);

    // Someone else's freeze (another client, a guard lost with its process): qemu-ga's real
    // refusal. The failed freeze froze nothing, so nothing is thawed.
    let second = spawned_freeze(&agent, long);
    let request = fake.recv().await;
    assert_eq!(request.command(), "guest-fsfreeze-freeze");
    let refusal = refuse(
        &request,
        "CommandNotFound",
        "Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state",
    );
    fake.reply(refusal).await;
    assert!(matches!(second.await.unwrap(), Err(Error::Frozen { .. })));
    assert!(fake.quiet(Duration::from_millis(300)).await, "a thaw");
    assert_eq!(agent.freeze_state(), FreezeState::Thawed);
}

#[tokio::test]
async fn a_refused_safety_thaw_is_tried_again_until_the_agent_answers_it() {
    let (mut fake, _agent, frozen) = frozen_on_a_fake(retrying(), Duration::from_millis(300)).await;

    // The timer's thaw, refused.
    let request = fake.recv().await;
    assert_eq!(request.command(), "guest-fsfreeze-thaw");
    fake.reply(refuse(&request, "GenericError", "not now"))
        .await;
    // It resynchronises and tries again; meanwhile the guard says what it knows: not thawed.
    let id = fake.recv().await.sync_id();
    assert!(frozen.timed_out());
    match frozen.state() {
        FreezeState::Unknown { error } => assert!(error.contains("not now"), "{error}"),
        other => panic!("{other:?}"),
    }
    fake.send(&[SENTINEL]).await;
    fake.reply(json!({ "return": id })).await;
    answer(&mut fake, "guest-fsfreeze-thaw", json!(1)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while frozen.state() != FreezeState::Thawed {
        assert!(tokio::time::Instant::now() < deadline, "never thawed");
        tokio::task::yield_now().await;
    }
    drop(frozen);
    assert!(
        fake.quiet(Duration::from_millis(300)).await,
        "a thaw after the answered one"
    );
}

#[tokio::test]
async fn a_guard_dropped_while_the_socket_is_down_thaws_once_it_is_back() {
    let (mut fake, agent, frozen) = frozen_on_a_fake(retrying(), Duration::from_secs(3600)).await;
    // The socket closes (the agent's chardev reconnecting), and the guard is dropped.
    fake.conn = None;
    drop(frozen);
    // The thaw goes on: it connects again, resynchronises, and thaws.
    fake.accept().await;
    loop {
        let request = fake.recv().await;
        if request.command() == "guest-sync-delimited" {
            fake.send(&[SENTINEL]).await;
            fake.reply(json!({ "return": request.sync_id() })).await;
            continue;
        }
        assert_eq!(request.command(), "guest-fsfreeze-thaw");
        fake.reply(json!({"return": 1, "id": request.id()})).await;
        break;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while agent.freeze_state() != FreezeState::Thawed {
        assert!(tokio::time::Instant::now() < deadline, "never thawed");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_thaw_the_agent_never_accepts_gives_up_at_its_deadline_and_says_unknown() {
    let config = quick().thaw_deadline(Duration::from_millis(700));
    let (mut fake, agent, frozen) = frozen_on_a_fake(config, Duration::from_secs(3600)).await;
    let mut thaw = tokio::spawn(frozen.thaw());
    let mut refused = 0;
    let outcome = loop {
        tokio::select! {
            outcome = &mut thaw => break outcome.unwrap(),
            request = fake.recv() => {
                if request.command() == "guest-sync-delimited" {
                    fake.send(&[SENTINEL]).await;
                    fake.reply(json!({ "return": request.sync_id() })).await;
                } else {
                    refused += 1;
                    fake.reply(refuse(&request, "GenericError", "never")).await;
                }
            }
        }
    };
    assert!(matches!(outcome, Err(Error::Agent { .. })), "{outcome:?}");
    assert!(refused >= 2, "tried {refused} times");
    assert!(matches!(agent.freeze_state(), FreezeState::Unknown { .. }));
}

#[tokio::test]
async fn an_agent_that_refuses_the_sync_is_unsupported_at_once() {
    let (mut fake, path) = Fake::new();
    let connect = tokio::spawn(Agent::connect(path, Config::new()));
    fake.accept().await;
    let request = fake.recv().await;
    assert_eq!(request.command(), "guest-sync-delimited");
    // The sync carries an id of its own, which the refusal echoes.
    assert_eq!(request.id(), json!(request.sync_id()));
    fake.reply(refuse(
        &request,
        "CommandNotFound",
        "The command guest-sync-delimited has been disabled for this instance",
    ))
    .await;
    let started = std::time::Instant::now();
    match connect.await.unwrap() {
        Err(Error::Unsupported { command, .. }) => assert_eq!(command, "guest-sync-delimited"),
        other => panic!("{other:?}"),
    }
    // Not the 5 s sync timeout.
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn replies_are_read_strictly_and_checked_against_the_request() {
    use qhotplug_qga::command::{GuestFileRead, GuestGetVcpus, GuestSetVcpus, GuestVcpu};
    let (mut fake, path) = Fake::new();
    let agent = std::sync::Arc::new(Agent::new(path, quick()));

    // Our id, with an unknown member nested far past serde_json's depth limit: still our reply.
    let host = spawned(&agent, GuestGetHostName);
    fake.accept().await;
    fake.sync(b"").await;
    let request = fake.recv().await;
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let line = format!(
        "{{\"return\": {{\"host-name\": \"g\", \"future\": {deep}}}, \"id\": {}}}\n",
        request.id()
    );
    fake.send(line.as_bytes()).await;
    assert_eq!(host.await.unwrap().unwrap().host_name, "g");
    // A request's id is not guessable: it starts at random, far from 0.
    let first_id = request.id().as_u64().unwrap();
    assert!(first_id > 1000, "{first_id}");

    // An array where a struct is expected: not read positionally.
    let host = spawned(&agent, GuestGetHostName);
    let request = fake.recv().await;
    fake.reply(json!({"return": ["intruder"], "id": request.id()}))
        .await;
    assert!(matches!(host.await.unwrap(), Err(Error::Decode { .. })));

    // A file read whose count disagrees with its data, and data that is not base64.
    for (count, data) in [(5, "aGk="), (2, "!!not base64!!")] {
        let read = spawned(
            &agent,
            GuestFileRead {
                handle: 1,
                count: 100,
            },
        );
        let request = fake.recv().await;
        fake.reply(
            json!({"return": {"count": count, "buf-b64": data, "eof": true}, "id": request.id()}),
        )
        .await;
        match read.await.unwrap() {
            Err(e @ Error::Decode { .. }) => assert!(!e.is_in_doubt()),
            other => panic!("{other:?}"),
        }
    }
    // More bytes than the read asked for.
    let read = spawned(
        &agent,
        GuestFileRead {
            handle: 1,
            count: 1,
        },
    );
    let request = fake.recv().await;
    fake.reply(json!({"return": {"count": 2, "buf-b64": "aGk=", "eof": true}, "id": request.id()}))
        .await;
    assert!(matches!(read.await.unwrap(), Err(Error::Decode { .. })));

    // CPU counts out of range.
    let vcpus = spawned(&agent, GuestGetVcpus);
    let request = fake.recv().await;
    fake.reply(json!({"return": [{"logical-id": -1, "online": true}], "id": request.id()}))
        .await;
    assert!(matches!(vcpus.await.unwrap(), Err(Error::Decode { .. })));
    let set = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let vcpus = vec![GuestVcpu {
                logical_id: 1,
                online: false,
                can_offline: None,
            }];
            agent.execute(&GuestSetVcpus { vcpus }).await
        })
    };
    let request = fake.recv().await;
    fake.reply(json!({"return": 7, "id": request.id()})).await;
    assert!(matches!(set.await.unwrap(), Err(Error::Decode { .. })));
}

#[tokio::test]
async fn the_default_frame_carries_the_largest_file_read_qemu_ga_sends() {
    use base64::Engine;
    use qhotplug_qga::command::GuestFileRead;
    const MAX_READ: u64 = 48 * 1024 * 1024; // qemu-ga's QGA_READ_COUNT_MAX
    let (mut fake, path) = Fake::new();
    let agent = std::sync::Arc::new(Agent::new(path, Config::new()));
    let read = spawned(
        &agent,
        GuestFileRead {
            handle: 1,
            count: MAX_READ,
        },
    );
    fake.accept().await;
    fake.sync(b"").await;
    let request = fake.recv().await;
    let data = vec![0xA5u8; MAX_READ as usize];
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    // qemu-ga's own member order and spacing.
    let line = format!(
        "{{\"return\": {{\"count\": {MAX_READ}, \"buf-b64\": \"{b64}\", \"eof\": false}}, \"id\": {}}}\n",
        request.id()
    );
    assert!(line.len() > 64 * 1024 * 1024, "{}", line.len());
    fake.send(line.as_bytes()).await;
    let read = read.await.unwrap().unwrap();
    assert_eq!(read.bytes().len() as u64, MAX_READ);
    assert!(read.bytes() == &data[..]);
}

#[tokio::test]
async fn a_key_or_a_password_the_agent_repeats_in_an_error_is_redacted() {
    use qhotplug_qga::command::{GuestSetUserPassword, GuestSshAddAuthorizedKeys, Redacted};
    let (mut fake, path) = Fake::new();
    let agent = std::sync::Arc::new(Agent::new(path, quick()));
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIbadkey me@host";
    let add = GuestSshAddAuthorizedKeys {
        username: "root".into(),
        keys: vec![Redacted::new(key)],
        reset: None,
    };
    let call = spawned(&agent, add);
    fake.accept().await;
    fake.sync(b"").await;
    let request = fake.recv().await;
    assert_eq!(request.json["arguments"]["keys"][0], key, "sent whole");
    // qemu-ga's words for a key it cannot parse.
    let desc = format!("invalid OpenSSH public key: '{key}'");
    fake.reply(refuse(&request, "GenericError", &desc)).await;
    let err = call.await.unwrap().unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("AAAAC3"), "{shown}");
    assert!(
        shown.contains("invalid OpenSSH public key: '<redacted>'"),
        "{shown}"
    );

    let set = GuestSetUserPassword::new("root", b"Hunter2-secret", false);
    let sent = set.password.expose().to_owned();
    let call = spawned(&agent, set);
    let request = fake.recv().await;
    fake.reply(refuse(
        &request,
        "GenericError",
        &format!("bad password {sent}"),
    ))
    .await;
    let err = call.await.unwrap().unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(&sent), "{shown}");
}
