//! The VM's life: graceful shutdown and reboot with a deadline, pause and resume, the run state.
//!
//! A graceful stop asks the guest (through its agent when one runs, else the ACPI power
//! button), then waits for the QMP event that proves it (`SHUTDOWN`, or `RESET` for a reboot):
//! the agent's `guest-shutdown` never replies when it complies. Past the deadline the SDK acts
//! itself (`quit`, `system_reset`) and the outcome says so. Events are subscribed to before the
//! guest is asked, so a fast guest cannot be missed.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use qhotplug_qmp::command::{
    Cont, QueryCurrentMachine, QueryStatus, RunState, Stop, SystemPowerdown, SystemReset,
    SystemWakeup,
};
use qhotplug_qmp::{EventKind, EventStream};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::vm_core::Core;

/// How long a QEMU that reported `SHUTDOWN` has to exit before it is quit.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// How the guest is asked to power down or reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PowerVia {
    /// The guest agent when one runs (it is told apart from "slow" by the agent's port), else
    /// ACPI; an agent that refuses is followed by ACPI.
    #[default]
    Auto,
    /// The guest agent's `guest-shutdown`. No agent running is an error; nothing is sent.
    Agent,
    /// The ACPI power button (`system_powerdown`). For a reboot there is no ACPI request: the
    /// VM is reset at once (`system_reset`).
    Acpi,
}

/// How a graceful stop ended ([`Vm::shutdown`](crate::Vm::shutdown),
/// [`Vm::reboot`](crate::Vm::reboot)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// The guest did it within the deadline: `SHUTDOWN` (or `RESET`) came.
    Graceful {
        /// How it was asked: [`PowerVia::Agent`] or [`PowerVia::Acpi`].
        via: PowerVia,
        /// QEMU's `ShutdownCause` (for example `guest-shutdown`, `guest-reset`); `None` when
        /// QEMU was gone before the event was read.
        reason: Option<String>,
        /// How long it took.
        after: Duration,
    },
    /// The guest did not by the deadline (it ignored the request, or is hung): QEMU was quit
    /// (a shutdown) or the VM reset (a reboot).
    Forced {
        /// How it was asked.
        via: PowerVia,
        /// The deadline it missed.
        deadline: Duration,
    },
}

impl Stopped {
    /// True when the guest did it itself.
    pub fn is_graceful(&self) -> bool {
        matches!(self, Stopped::Graceful { .. })
    }
}

/// What the VM should do: power off, or reboot.
#[derive(Clone, Copy)]
enum Goal {
    Shutdown,
    Reboot,
}

/// See [`Vm::shutdown`](crate::Vm::shutdown).
pub(crate) async fn shutdown(
    core: &Arc<Core>,
    via: PowerVia,
    deadline: Duration,
) -> Result<Stopped> {
    let started = Instant::now();
    let mut events = core.client.events();
    let via = ask(core, via, Goal::Shutdown).await?;
    match wait(&mut events, Goal::Shutdown, started + deadline).await {
        Waited::Seen(reason) => {
            tracing::info!(?via, ?reason, "the guest shut down");
            reap(core).await?;
            Ok(Stopped::Graceful {
                via,
                reason,
                after: started.elapsed(),
            })
        }
        Waited::Deadline => {
            tracing::warn!(
                ?via,
                ?deadline,
                "the guest did not shut down: quitting QEMU"
            );
            core.quit().await?;
            Ok(Stopped::Forced { via, deadline })
        }
    }
}

/// See [`Vm::reboot`](crate::Vm::reboot).
pub(crate) async fn reboot(core: &Arc<Core>, via: PowerVia, deadline: Duration) -> Result<Stopped> {
    let started = Instant::now();
    let mut events = core.client.events();
    let via = ask(core, via, Goal::Reboot).await?;
    if via == PowerVia::Acpi {
        // No ACPI reboot request: `ask` reset the VM; the reset is the host's.
        return Ok(Stopped::Forced { via, deadline });
    }
    match wait(&mut events, Goal::Reboot, started + deadline).await {
        Waited::Seen(reason) => Ok(Stopped::Graceful {
            via,
            reason,
            after: started.elapsed(),
        }),
        Waited::Deadline => {
            tracing::warn!(?deadline, "the guest did not reboot: resetting the VM");
            core.client.execute(&SystemReset).await?;
            Ok(Stopped::Forced { via, deadline })
        }
    }
}

/// Asks the guest for `goal` by `via`; returns how it was asked.
async fn ask(core: &Arc<Core>, via: PowerVia, goal: Goal) -> Result<PowerVia> {
    let mode = match goal {
        Goal::Shutdown => "powerdown",
        Goal::Reboot => "reboot",
    };
    if via != PowerVia::Acpi {
        let agent = match (core.agent().await, via) {
            (Ok(agent), _) => Some(agent),
            (Err(e), PowerVia::Agent) => return Err(e),
            (Err(_), _) => None,
        };
        match agent {
            Some(agent) if via == PowerVia::Agent || agent.is_running() => {
                match agent.shut_down(mode).await {
                    Ok(()) => return Ok(PowerVia::Agent),
                    Err(e) if via == PowerVia::Agent => return Err(e.into()),
                    Err(e) => tracing::info!(error = %e, "the agent refused: using ACPI"),
                }
            }
            _ => {}
        }
    }
    match goal {
        Goal::Shutdown => core.client.execute(&SystemPowerdown).await?,
        Goal::Reboot => core.client.execute(&SystemReset).await?,
    };
    Ok(PowerVia::Acpi)
}

enum Waited {
    /// The event came (with QEMU's reason), or QEMU went away first (`None`).
    Seen(Option<String>),
    Deadline,
}

/// Waits by `until` for `SHUTDOWN` (or `RESET`). Events lost to lag are asked of QEMU: a VM
/// that is `shutdown` (or gone) shut down.
async fn wait(events: &mut EventStream, goal: Goal, until: Instant) -> Waited {
    let seen = async {
        while let Some(item) = events.next().await {
            match (item, goal) {
                (Ok(event), Goal::Shutdown) => {
                    if let EventKind::Shutdown(change) = event.kind() {
                        return Waited::Seen(Some(change.reason.clone()));
                    }
                }
                (Ok(event), Goal::Reboot) => {
                    if let EventKind::Reset(change) = event.kind() {
                        return Waited::Seen(Some(change.reason.clone()));
                    }
                }
                (Err(lagged), _) => tracing::debug!(%lagged, "events lost while waiting"),
            }
        }
        // The connection ended: QEMU exited.
        Waited::Seen(None)
    };
    tokio::time::timeout_at(until, seen)
        .await
        .unwrap_or(Waited::Deadline)
}

/// After `SHUTDOWN`, QEMU exits by itself: wait for the process the SDK launched (quit if it
/// lingers), so it is reaped when the call returns.
async fn reap(core: &Arc<Core>) -> Result<()> {
    let process = core
        .process
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let Some(mut process) = process else {
        return Ok(());
    };
    match tokio::time::timeout(EXIT_GRACE, crate::vm_core::wait_exit(&mut process)).await {
        Ok(waited) => waited,
        Err(_) => {
            *core.process.lock().unwrap_or_else(|p| p.into_inner()) = Some(process);
            core.quit().await
        }
    }
}

/// See [`Vm::suspend`](crate::Vm::suspend).
pub(crate) async fn suspend(core: &Arc<Core>, deadline: Duration) -> Result<()> {
    let machine = core.client.execute(&QueryCurrentMachine).await?;
    if !machine.wakeup_suspend_support {
        return Err(Error::Precondition {
            operation: "suspend",
            reason: "the machine cannot wake a guest suspended to RAM".into(),
        });
    }
    let agent = core.agent().await?;
    let mut events = core.client.events();
    agent.suspend_ram().await?;
    let suspended = |e: &EventKind| matches!(e, EventKind::Suspend);
    if events.wait_for(Instant::now() + deadline, suspended).await
        || run_state(core).await? == RunState::Suspended
    {
        return Ok(());
    }
    Err(qhotplug_qga::Error::Timeout {
        command: "guest-suspend-ram".into(),
        after: deadline,
    }
    .into())
}

/// See [`Vm::wakeup`](crate::Vm::wakeup).
pub(crate) async fn wakeup(core: &Arc<Core>, deadline: Duration) -> Result<()> {
    if run_state(core).await? != RunState::Suspended {
        return Ok(());
    }
    let mut events = core.client.events();
    core.client.execute(&SystemWakeup).await?;
    let woke = |e: &EventKind| matches!(e, EventKind::Wakeup);
    if events.wait_for(Instant::now() + deadline, woke).await
        || run_state(core).await? != RunState::Suspended
    {
        return Ok(());
    }
    Err(Error::Precondition {
        operation: "wakeup",
        reason: format!("the guest was still suspended {deadline:?} after `system_wakeup`"),
    })
}

/// See [`Vm::pause`](crate::Vm::pause).
pub(crate) async fn pause(core: &Core) -> Result<()> {
    core.client.execute(&Stop).await?;
    Ok(())
}

/// See [`Vm::resume`](crate::Vm::resume).
pub(crate) async fn resume(core: &Core) -> Result<()> {
    core.client.execute(&Cont).await?;
    Ok(())
}

/// The VNC password a launch sets (QEMU's command line cannot carry it unseen).
pub(crate) async fn set_vnc_password(
    core: &Core,
    password: qhotplug_cmdline::Secret,
) -> Result<()> {
    if !password.is_resolved() {
        return Err(Error::Spec(qhotplug_cmdline::Error::InvalidSpec(format!(
            "the VNC password {:?} was read back from a written spec and not resolved",
            password.reference().unwrap_or("")
        ))));
    }
    let set = qhotplug_qmp::command::SetPassword {
        protocol: "vnc".into(),
        password: String::from_utf8_lossy(password.expose()).into_owned(),
    };
    core.client.execute(&set).await?;
    Ok(())
}

/// See [`Vm::run_state`](crate::Vm::run_state).
pub(crate) async fn run_state(core: &Core) -> Result<RunState> {
    Ok(core.client.execute(&QueryStatus).await?.status)
}
