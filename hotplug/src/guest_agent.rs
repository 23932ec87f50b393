//! The VM's guest agent: a [`qhotplug_qga::Agent`] on the port named
//! [`SerialPort::GUEST_AGENT`], joined to what the VM's own QMP connection says of that port.
//!
//! An agent that is not running never says so on its own socket: QEMU accepts what is written
//! and nothing comes back. Only QMP knows: `query-chardev`'s `frontend-open` for the port's
//! chardev, then `VSERPORT_CHANGE` for the port's device id. A task follows both for as long as a
//! handle lives, so a call on a closed port is [`AgentError::NotRunning`] at once (nothing is
//! sent), a call whose port closes under it is [`AgentError::Gone`] (the agent stopped or
//! restarted mid-command), and the first call after the port reopens resynchronises.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use qhotplug_cmdline::{names, Secret, SerialPort};
use qhotplug_qga::command::{FreezeStatus, GuestSetUserPassword, GuestShutdown, GuestSuspendRam};
use qhotplug_qga::{Agent, Config, Error as AgentError, Frozen, Result as AgentResult};
use qhotplug_qmp::command::QueryChardev;
use qhotplug_qmp::{Client, Command, EventKind, EventStream};
use tokio::sync::watch;

/// The default time a command waits for the agent's reply (10 s).
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The VM's guest agent ([`Vm::agent`](crate::Vm::agent)). Cheap to clone; every clone shares
/// one connection, and commands from all of them run one at a time, in turn. Each handle has its
/// own per-command timeout ([`GuestAgent::with_timeout`]).
///
/// ```no_run
/// # async fn demo(vm: qhotplug::Vm) -> qhotplug::Result<()> {
/// use qhotplug::agent::{GuestGetOsinfo, GuestPing};
/// use std::time::Duration;
///
/// let agent = vm.agent().await?;
/// agent.wait_running(Duration::from_secs(60)).await?;
/// agent.execute(&GuestPing).await?;
/// let os = agent.execute(&GuestGetOsinfo).await?;
/// println!("{:?}", os.pretty_name);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct GuestAgent {
    shared: Arc<Shared>,
    timeout: Duration,
}

#[derive(Debug)]
struct Shared {
    agent: Arc<Agent>,
    port: SerialPort,
    /// True while the guest has the port open.
    running: watch::Receiver<bool>,
    /// Follows the port; ends with the last handle.
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl GuestAgent {
    /// Starts following `port` on `client` (events first, then `frontend-open`, so no change
    /// between the two is missed). The socket is connected on the first command.
    pub(crate) async fn start(client: &Client, port: SerialPort) -> qhotplug_qmp::Result<Self> {
        let events = client.events();
        let open = frontend_open(client, &port).await?;
        let (tx, running) = watch::channel(open);
        let agent = Arc::new(Agent::new(&port.socket, Config::new()));
        let follower = tokio::spawn(follow(
            events,
            client.clone(),
            port.clone(),
            tx,
            agent.clone(),
        ));
        Ok(GuestAgent {
            shared: Arc::new(Shared {
                agent,
                port,
                running,
                follower,
            }),
            timeout: DEFAULT_AGENT_TIMEOUT,
        })
    }

    /// True when this handle drives `port` (the same device on the same socket).
    pub(crate) fn serves(&self, port: &SerialPort) -> bool {
        self.shared.port.id == port.id && self.shared.port.socket == port.socket
    }

    /// A handle on the same agent whose commands wait `timeout` for a reply.
    pub fn with_timeout(&self, timeout: Duration) -> GuestAgent {
        GuestAgent {
            shared: self.shared.clone(),
            timeout,
        }
    }

    /// The agent's port.
    pub fn port(&self) -> &SerialPort {
        &self.shared.port
    }

    /// True when the guest has the agent's port open: an agent runs (as QEMU last said).
    pub fn is_running(&self) -> bool {
        *self.shared.running.borrow()
    }

    /// Waits until the guest opens the agent's port (at boot, the agent starts late), by
    /// `timeout`; else [`AgentError::NotRunning`].
    pub async fn wait_running(&self, timeout: Duration) -> AgentResult<()> {
        let mut running = self.shared.running.clone();
        let opened = tokio::time::timeout(timeout, async {
            running.wait_for(|open| *open).await.is_ok()
        })
        .await;
        match opened {
            Ok(true) => Ok(()),
            _ => Err(self.not_running()),
        }
    }

    /// Runs `command` and returns its reply, within this handle's timeout. Nothing is sent when
    /// no agent runs ([`AgentError::NotRunning`]); a port that closes while the command runs is
    /// [`AgentError::Gone`].
    pub async fn execute<C: Command>(&self, command: &C) -> AgentResult<C::Returns> {
        self.execute_timeout(command, self.timeout).await
    }

    /// [`execute`](GuestAgent::execute) with a timeout of its own.
    pub async fn execute_timeout<C: Command>(
        &self,
        command: &C,
        timeout: Duration,
    ) -> AgentResult<C::Returns> {
        self.while_running(C::NAME, self.shared.agent.execute_timeout(command, timeout))
            .await
    }

    /// Sends a command that has no reply when it succeeds (`guest-shutdown`), to a running
    /// agent. See [`Agent::send_no_reply`].
    pub async fn send_no_reply<C: Command>(&self, command: &C) -> AgentResult<()> {
        self.while_running(C::NAME, self.shared.agent.send_no_reply(command))
            .await
    }

    /// Freezes the guest's filesystems; the guard thaws them (see [`Frozen`]), by `safety` at
    /// the latest. The hook for storage operations that want a consistent image.
    pub async fn freeze(&self, safety: Duration) -> AgentResult<Frozen> {
        self.while_running("guest-fsfreeze-freeze", self.shared.agent.freeze(safety))
            .await
    }

    /// What this VM's agent client knows of the guest's filesystems' freeze: frozen, thawed
    /// (only once the agent answered a thaw), or unknown with the last error while a thaw does
    /// not go through (see [`Frozen`]).
    pub fn freeze_state(&self) -> qhotplug_qga::FreezeState {
        self.shared.agent.freeze_state()
    }

    /// Thaws the guest's filesystems if they are frozen (a guard lost with a crash; the agent
    /// keeps its frozen state across its own restart) and returns the state they are in.
    pub async fn ensure_thawed(&self) -> AgentResult<FreezeStatus> {
        self.while_running("guest-fsfreeze-thaw", self.shared.agent.ensure_thawed())
            .await
    }

    /// Sets `user`'s password in the guest to `password` (the guest's `chpasswd`; `crypted`: the
    /// secret is a `crypt(3)` hash already). The password is in the command sent and nowhere
    /// else: not in its `Debug`, not in a log, not in an error even where the agent's message
    /// repeats it. An unresolved secret (read back from a written spec) is refused, nothing sent.
    pub async fn set_user_password(
        &self,
        user: &str,
        password: &Secret,
        crypted: bool,
    ) -> crate::Result<()> {
        if !password.is_resolved() {
            return Err(crate::Error::Spec(qhotplug_cmdline::Error::InvalidSpec(
                format!(
                    "the password for {user}: secret {:?} was read back and not resolved",
                    password.reference().unwrap_or("")
                ),
            )));
        }
        let command = GuestSetUserPassword::new(user, password.expose(), crypted);
        self.execute(&command).await?;
        Ok(())
    }

    /// Asks the guest to suspend itself to RAM. The agent does not reply when it complies;
    /// QMP's `SUSPEND` is the proof.
    pub(crate) async fn suspend_ram(&self) -> AgentResult<()> {
        self.send_no_reply(&GuestSuspendRam).await
    }

    /// Asks the agent to power the guest down (`mode`: `powerdown`, `halt` or `reboot`). The
    /// agent does not reply when it complies; QMP's `SHUTDOWN` or `RESET` is the proof.
    pub(crate) async fn shut_down(&self, mode: &str) -> AgentResult<()> {
        self.send_no_reply(&GuestShutdown { mode: mode.into() })
            .await
    }

    /// The agent client itself, for what this handle does not wrap. It knows nothing of the
    /// port's state: prefer the handle's calls.
    pub fn agent(&self) -> &Arc<Agent> {
        &self.shared.agent
    }

    fn not_running(&self) -> AgentError {
        AgentError::NotRunning {
            port: self.shared.port.id.clone(),
        }
    }

    /// Runs `call` if an agent runs, and gives it up as [`AgentError::Gone`] if the port closes
    /// before it ends (the agent client resynchronises on its next call).
    async fn while_running<T>(
        &self,
        command: &str,
        call: impl std::future::Future<Output = AgentResult<T>>,
    ) -> AgentResult<T> {
        let mut running = self.shared.running.clone();
        if !*running.borrow_and_update() {
            return Err(self.not_running());
        }
        tokio::select! {
            biased;
            result = call => result,
            _ = running.wait_for(|open| !*open) => Err(AgentError::Gone {
                command: command.to_owned(),
            }),
        }
    }
}

/// `frontend-open` of `port`'s chardev, from `query-chardev`.
async fn frontend_open(client: &Client, port: &SerialPort) -> qhotplug_qmp::Result<bool> {
    let label = names::chardev(&port.id);
    Ok(client
        .execute(&QueryChardev)
        .await?
        .into_iter()
        .any(|c| c.label == label && c.frontend_open))
}

/// Keeps `running` equal to whether the guest has `port` open, from `VSERPORT_CHANGE` (and
/// `query-chardev` again after lost events); the agent resynchronises after each reopening. The
/// QMP connection's end means no agent can be reached.
async fn follow(
    mut events: EventStream,
    client: Client,
    port: SerialPort,
    running: watch::Sender<bool>,
    agent: Arc<Agent>,
) {
    let set = |open: bool| {
        running.send_if_modified(|was| {
            let changed = *was != open;
            if changed && open {
                agent.resync_before_next();
            }
            *was = open;
            changed
        });
    };
    while let Some(item) = events.next().await {
        match item {
            Ok(event) => match event.kind() {
                EventKind::VserportChange(change) if change.id == port.id => set(change.open),
                _ => {}
            },
            Err(lagged) => {
                tracing::debug!(%lagged, port = %port.id, "asking QEMU for the agent's port");
                match frontend_open(&client, &port).await {
                    Ok(open) => set(open),
                    Err(_) => break,
                }
            }
        }
    }
    set(false);
}
