//! The shared core of one VM: what every [`Vm`](crate::Vm) handle delegates to, and the narrow
//! thing the engine and the operations take. A handle adds only its unplug policy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use qhotplug_cmdline::QemuProcess;
use qhotplug_qmp::Client;

use crate::error::{Error, Result};
use crate::guest_agent::GuestAgent;
use crate::state::State;

/// What every clone of a [`Vm`](crate::Vm) shares, and all that the engine and the operations
/// see of a VM: its QMP client, what the SDK knows of it (`State`), its process, and the calls
/// and clean-ups running on it.
pub(crate) struct Core {
    pub(crate) client: Client,
    state: Mutex<State>,
    pub(crate) process: Mutex<Option<QemuProcess>>,
    /// What futures and handles dropped part-way left to clean up, running in the background
    /// ([`clean_up_after_drop`]).
    cleanups: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// How many public calls are running (each in a task of its own), and a wake-up for
    /// [`Vm::settle`](crate::Vm::settle) when none is.
    running: AtomicUsize,
    idle: tokio::sync::Notify,
    /// The guest agent, once asked for: one connection to its socket per VM (QEMU's chardev
    /// takes one client at a time).
    agent: tokio::sync::Mutex<Option<GuestAgent>>,
    /// The VM's master key for secrets, once QEMU has it ([`master_key`](crate::engine::master_key)).
    pub(crate) master_key: tokio::sync::Mutex<Option<qhotplug_cmdline::MasterKey>>,
    /// What attaching without a spec could not read from QEMU and no call has set since (empty
    /// otherwise): the planner does not take what the spec holds in its place for QEMU's.
    pub(crate) unreadable: Mutex<Vec<crate::unreadable::Unreadable>>,
    /// Whether a migration of this process's runs from this VM, or ran to its end: any other
    /// migration QEMU reports was a dead process's (`migration::orphaned`).
    pub(crate) outgoing: Mutex<Outgoing>,
    /// Jobs a dead process left concluded that the attach dismissed (reading the spec), for the
    /// next `reconcile` to report.
    pub(crate) ended_at_attach: Mutex<Vec<crate::ended_job::EndedJob>>,
    /// The task that follows devices the guest gives up unasked (`guest_removals`).
    pub(crate) watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// This process's migrations out of the VM ([`Core::outgoing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Outgoing {
    /// None ran.
    #[default]
    None,
    /// One runs now.
    Running,
    /// One completed: the guest runs on its target.
    Completed,
}

impl Core {
    /// This process's migrations out of the VM.
    pub(crate) fn outgoing(&self) -> std::sync::MutexGuard<'_, Outgoing> {
        self.outgoing.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        if let Some(task) = self.watcher.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

impl Core {
    pub(crate) fn new(client: Client, state: State, process: Option<QemuProcess>) -> Core {
        let master_key = process.as_ref().and_then(|p| p.master_key().cloned());
        Core {
            master_key: tokio::sync::Mutex::new(master_key),
            client,
            state: Mutex::new(state),
            process: Mutex::new(process),
            cleanups: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            agent: tokio::sync::Mutex::new(None),
            unreadable: Mutex::new(Vec::new()),
            ended_at_attach: Mutex::new(Vec::new()),
            outgoing: Mutex::new(Outgoing::None),
            watcher: Mutex::new(None),
        }
    }

    /// Counts a public call as running until the guard is dropped (by the call's task, when its
    /// work is done, whether or not anyone still waits for it).
    pub(crate) fn enter_call(self: &Arc<Self>) -> RunningCall {
        self.running.fetch_add(1, Ordering::SeqCst);
        RunningCall(self.clone())
    }

    /// Waits until no public call is running, and no clean-up of a dropped one.
    pub(crate) async fn settled(&self) {
        loop {
            self.calls_done().await;
            // A call that ended may have left a clean-up, and a clean-up never starts a call.
            self.cleanups_done().await;
            let cleaning = !self
                .cleanups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
            if self.running.load(Ordering::SeqCst) == 0 && !cleaning {
                return;
            }
        }
    }

    async fn calls_done(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way later calls
        // rely on, so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for every clean-up running in the background (those started meanwhile too).
    pub(crate) async fn cleanups_done(&self) {
        loop {
            let tasks =
                std::mem::take(&mut *self.cleanups.lock().unwrap_or_else(|p| p.into_inner()));
            if tasks.is_empty() {
                return;
            }
            for task in tasks {
                let _ = task.await;
            }
        }
    }
}

/// The one way a future or handle dropped part-way cleans up after itself (a hot-add's rollback,
/// a job handle's cancel, a pull backup's teardown, a storage copy's undo, a migration's cancel):
/// `work(held)` runs in a task of its own in a `rollback` span (`id`, `reason`), tracked by the
/// VM's `core` when it is a VM's, so [`Vm::settle`](crate::Vm::settle) and `reconcile` wait for
/// it. Outside a runtime nothing can run: it warns and gives `held` back, for the caller to leave
/// for `reconcile`.
pub(crate) fn clean_up_after_drop<S, F, Fut>(
    core: Option<&Core>,
    id: &str,
    reason: &'static str,
    held: S,
    work: F,
) -> std::result::Result<(), S>
where
    F: FnOnce(S) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(
            id,
            reason,
            "dropped outside a runtime: nothing cleaned up; reconcile"
        );
        return Err(held);
    };
    let span = tracing::info_span!(crate::spans::ROLLBACK, id, reason);
    let task = runtime.spawn(tracing::Instrument::instrument(work(held), span));
    if let Some(core) = core {
        let mut tasks = core.cleanups.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
    Ok(())
}

/// The `hotplug` span of one public operation (`op`, `id`): the one place it is opened.
pub(crate) fn hotplug_span(op: &'static str, id: &str) -> tracing::Span {
    tracing::info_span!(crate::spans::HOTPLUG, op, id)
}

/// One public call running; see [`Core::enter_call`].
pub(crate) struct RunningCall(Arc<Core>);

impl Drop for RunningCall {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Core {
    /// See [`Vm::quit`](crate::Vm::quit).
    pub(crate) async fn quit(&self) -> Result<()> {
        match self.client.execute(&qhotplug_qmp::command::Quit).await {
            Ok(_) | Err(qhotplug_qmp::Error::Disconnected) => {}
            Err(e) => return Err(e.into()),
        }
        let process = self
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut process) = process {
            wait_exit(&mut process).await?;
        }
        Ok(())
    }

    /// The VM's guest agent: on the port named `org.qemu.guest_agent.0` in the spec, started on
    /// first use and shared after; started again if the port changed (removed, added anew).
    pub(crate) async fn agent(&self) -> Result<GuestAgent> {
        let port = self
            .state()
            .spec()
            .serial_ports
            .iter()
            .find(|p| p.is_guest_agent())
            .cloned()
            .ok_or(Error::NoGuestAgent)?;
        let mut cached = self.agent.lock().await;
        if let Some(agent) = cached.as_ref().filter(|a| a.serves(&port)) {
            return Ok(agent.clone());
        }
        let agent = GuestAgent::start(&self.client, port).await?;
        *cached = Some(agent.clone());
        Ok(agent)
    }

    /// [`Error::NoBlockDriver`] unless QEMU's `blockdev-add` takes the block driver `driver`.
    pub(crate) async fn require_block_driver(&self, driver: &'static str) -> Result<()> {
        let schema = self.client.schema().await?;
        let drivers = schema
            .arg_values("blockdev-add", "driver")
            .unwrap_or_default();
        match drivers.contains(&driver) {
            true => Ok(()),
            false => Err(Error::NoBlockDriver(driver)),
        }
    }

    /// The QEMU process id, when the SDK launched it.
    pub(crate) fn launched_pid(&self) -> Option<u32> {
        let process = self.process.lock().unwrap_or_else(|p| p.into_inner());
        process.as_ref().map(QemuProcess::pid)
    }

    /// QEMU's process id: ours if the SDK launched or adopted it, else the monitor socket's
    /// peer; `None` when neither is known.
    pub(crate) fn qemu_pid(&self) -> Option<u32> {
        self.launched_pid().or_else(|| self.client.peer_pid())
    }

    /// Checks, from QEMU's own schema (read once per connection), that it has every command in
    /// `needed`; the error names the first one missing.
    pub(crate) async fn require(&self, operation: &'static str, needed: &[&str]) -> Result<()> {
        let schema = self.client.schema().await?;
        match needed.iter().find(|c| !schema.has_command(c)) {
            Some(missing) => Err(Error::Unsupported {
                command: (*missing).to_owned(),
                operation,
            }),
            None => Ok(()),
        }
    }
}

/// Waits for the QEMU the SDK launched to exit and reaps it: the one error for a wait that
/// failed, whoever waits (`quit`, a shutdown's reaping).
pub(crate) async fn wait_exit(process: &mut QemuProcess) -> Result<()> {
    process.wait().await.map_err(|source| Error::Io {
        what: "waiting for QEMU to exit",
        source,
    })?;
    Ok(())
}
