//! The guest agent's presence and the VM's life on the mock QEMU, in seconds: a call to an agent
//! that is not running sends nothing, one whose port closes under it is gone, the call after a
//! reopening resynchronises, every handle shares one connection; a shutdown that the guest obeys
//! or ignores, and pause and resume. `tests/tests/qga_guest.rs` and `life_guest.rs` prove the
//! same with a booted guest.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use qhotplug::agent::{Error as AgentError, GuestPing};
use qhotplug::{
    Error, Machine, PowerVia, RunState, SerialPortConfig, Stopped, VirtioSerialConfig, Vm, VmSpec,
};
use qhotplug_mock::{GuestPower, MockQemu};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(10);

async fn attached(qemu: &MockQemu) -> Vm {
    Vm::attach(qemu.connect().await.unwrap(), VmSpec::new("t", Machine::Pc))
        .await
        .unwrap()
}

/// Hot-adds a virtio-serial controller and the agent's port `qga0`, a fake agent on its socket.
async fn agent_port(vm: &Vm) -> (FakeAgent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    vm.add_virtio_serial(VirtioSerialConfig::new("vser0"))
        .await
        .unwrap();
    let socket = dir.path().join("qga.sock");
    let fake = FakeAgent::listen(&socket);
    vm.add_serial_port(SerialPortConfig::guest_agent("qga0", "vser0", &socket))
        .await
        .unwrap();
    (fake, dir)
}

/// A guest agent's host socket: answers syncs and pings unless told to hang, and keeps every
/// line it read and how many clients connected.
#[derive(Clone, Default)]
struct FakeAgent {
    lines: Arc<Mutex<Vec<Vec<u8>>>>,
    clients: Arc<Mutex<usize>>,
    hang: Arc<Mutex<bool>>,
    read: Arc<tokio::sync::Notify>,
}

impl FakeAgent {
    fn listen(path: &std::path::Path) -> FakeAgent {
        let fake = FakeAgent::default();
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let f = fake.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                *f.clients.lock().unwrap() += 1;
                let f = f.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut read = BufReader::new(read);
                    let mut line = Vec::new();
                    while read.read_until(b'\n', &mut line).await.unwrap_or(0) > 0 {
                        f.lines.lock().unwrap().push(line.clone());
                        f.read.notify_waiters();
                        let start = line.iter().position(|&b| b == b'{').unwrap_or(0);
                        let request: serde_json::Value =
                            serde_json::from_slice(&line[start..]).unwrap();
                        let reply = match request["execute"].as_str() {
                            Some("guest-sync-delimited") => {
                                let mut r = vec![0xFF];
                                r.extend(
                                    format!("{{\"return\": {}}}\n", request["arguments"]["id"])
                                        .bytes(),
                                );
                                r
                            }
                            _ if *f.hang.lock().unwrap() => Vec::new(),
                            _ => format!("{{\"return\": {{}}, \"id\": {}}}\n", request["id"])
                                .into_bytes(),
                        };
                        let _ = write.write_all(&reply).await;
                        line.clear();
                    }
                });
            }
        });
        fake
    }

    fn lines(&self) -> Vec<Vec<u8>> {
        self.lines.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn an_agent_not_running_is_sent_nothing_one_whose_port_closes_is_gone_and_a_reopening_resyncs(
) {
    let qemu = MockQemu::pc();
    let vm = attached(&qemu).await;
    assert!(matches!(vm.agent().await, Err(Error::NoGuestAgent)));
    let (fake, _dir) = agent_port(&vm).await;

    // The port is closed: not running, typed, and the agent's socket is not even opened.
    let agent = vm.agent().await.unwrap();
    assert!(!agent.is_running());
    let refused = agent.execute(&GuestPing).await.unwrap_err();
    assert!(
        matches!(&refused, AgentError::NotRunning { port } if port == "qga0"),
        "{refused:?}"
    );
    assert!(Error::from(refused).nothing_sent());
    assert_eq!(*fake.clients.lock().unwrap(), 0);

    // The guest opens it (VSERPORT_CHANGE): the agent answers.
    qemu.guest_port("qga0", true);
    agent.wait_running(WAIT).await.unwrap();
    agent.execute(&GuestPing).await.unwrap();

    // The agent takes a command and hangs; the port closes: the caller hears "gone", in doubt.
    *fake.hang.lock().unwrap() = true;
    let read = fake.read.notified();
    let pending = tokio::spawn({
        let agent = agent.clone();
        async move { agent.execute(&GuestPing).await }
    });
    read.await;
    qemu.guest_port("qga0", false);
    let gone = pending.await.unwrap().unwrap_err();
    assert!(
        matches!(&gone, AgentError::Gone { command } if command == "guest-ping"),
        "{gone:?}"
    );
    assert!(gone.is_in_doubt());

    // It comes back: the next call resynchronises (0xFF first), then gets its own reply.
    *fake.hang.lock().unwrap() = false;
    qemu.guest_port("qga0", true);
    agent.wait_running(WAIT).await.unwrap();
    let before = fake.lines().len();
    agent.execute(&GuestPing).await.unwrap();
    let after = fake.lines();
    assert_eq!(after[before][0], 0xFF, "{:?}", &after[before..]);

    // A call that ended cleanly leaves the stream in sync, until the port reopens.
    let before = fake.lines().len();
    vm.agent().await.unwrap().execute(&GuestPing).await.unwrap();
    assert_ne!(fake.lines()[before][0], 0xFF);
    qemu.guest_port("qga0", false);
    let closed = tokio::time::Instant::now() + WAIT;
    while agent.is_running() {
        assert!(
            tokio::time::Instant::now() < closed,
            "the close was never seen"
        );
        tokio::task::yield_now().await;
    }
    qemu.guest_port("qga0", true);
    agent.wait_running(WAIT).await.unwrap();
    let before = fake.lines().len();
    agent.execute(&GuestPing).await.unwrap();
    assert_eq!(fake.lines()[before][0], 0xFF);
    // Every handle shares one connection to the socket.
    assert_eq!(*fake.clients.lock().unwrap(), 1);
}

#[tokio::test]
async fn a_shutdown_the_guest_obeys_is_graceful_and_one_it_ignores_is_quit_at_the_deadline() {
    // The guest powers off on the button.
    let qemu = MockQemu::pc();
    let vm = attached(&qemu).await;
    vm.resume().await.unwrap();
    match vm.shutdown(PowerVia::Auto, WAIT).await.unwrap() {
        Stopped::Graceful { via, reason, .. } => {
            assert_eq!(via, PowerVia::Acpi);
            assert_eq!(reason.as_deref(), Some("guest-shutdown"));
        }
        other => panic!("{other:?}"),
    }
    assert!(qemu.commands().contains(&"system_powerdown".to_owned()));
    assert!(!qemu.commands().contains(&"quit".to_owned()));

    // The guest ignores it: quit at the deadline, and the outcome says so.
    let qemu = MockQemu::pc();
    qemu.guest_power(GuestPower::Ignores);
    let vm = attached(&qemu).await;
    vm.resume().await.unwrap();
    // Through the agent with no agent port: typed, nothing sent.
    let before = qemu.commands().len();
    let refused = vm.shutdown(PowerVia::Agent, WAIT).await.unwrap_err();
    assert!(matches!(refused, Error::NoGuestAgent), "{refused:?}");
    assert!(refused.nothing_sent());
    assert_eq!(qemu.commands().len(), before);

    let deadline = Duration::from_millis(200);
    let stopped = vm.shutdown(PowerVia::Auto, deadline).await.unwrap();
    assert_eq!(
        stopped,
        Stopped::Forced {
            via: PowerVia::Acpi,
            deadline
        }
    );
    let sent = qemu.commands();
    assert_eq!(&sent[sent.len() - 2..], ["system_powerdown", "quit"]);
}

#[tokio::test]
async fn pause_and_resume_change_the_run_state() {
    let qemu = MockQemu::pc();
    let vm = attached(&qemu).await;
    vm.resume().await.unwrap();
    assert_eq!(vm.run_state().await.unwrap(), RunState::Running);
    vm.pause().await.unwrap();
    assert_ne!(vm.run_state().await.unwrap(), RunState::Running);
    vm.resume().await.unwrap();
    assert_eq!(vm.run_state().await.unwrap(), RunState::Running);
    // Without an agent, a reboot by ACPI is a reset at once, by the host.
    let stopped = vm.reboot(PowerVia::Auto, WAIT).await.unwrap();
    assert!(!stopped.is_graceful());
    assert!(qemu.commands().contains(&"system_reset".to_owned()));
}

#[tokio::test]
async fn handles_asked_for_at_once_share_one_agent_and_their_calls_all_get_their_own_reply() {
    let qemu = MockQemu::pc();
    let vm = attached(&qemu).await;
    let (fake, _dir) = agent_port(&vm).await;
    qemu.guest_port("qga0", true);
    let calls = (0..16).map(|_| {
        let vm = vm.clone();
        tokio::spawn(async move {
            let agent = vm.agent().await?;
            agent.wait_running(WAIT).await?;
            agent.execute(&GuestPing).await?;
            Ok::<_, Error>(())
        })
    });
    for call in futures::future::join_all(calls).await {
        call.unwrap().unwrap();
    }
    // One connection, one sync, and sixteen pings each answered once.
    assert_eq!(*fake.clients.lock().unwrap(), 1);
    let lines = fake.lines();
    assert_eq!(lines.iter().filter(|l| l[0] == 0xFF).count(), 1);
    assert_eq!(lines.len(), 17);
}
