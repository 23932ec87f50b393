//! A migration out of the VM that a dead process started: QEMU reports it (`query-migrate`) and
//! no call of this process runs it. `reconcile` ends it: one under way is cancelled, so the
//! guest runs on here (the target QEMU, its incoming stream broken, exits); one that completed
//! is reported, since the guest runs on the target now; one in post-copy is left to finish,
//! since the guest's memory is split between the two QEMUs and cancelling it would lose it. A
//! migration into the VM (this QEMU its target) is left alone: it is its source's.

use std::time::Duration;

use qhotplug_qmp::command::{Cont, MigrateCancel, QueryMigrate, QueryStatus, RunState};
use qhotplug_qmp::EventKind;

use crate::error::Result;
use crate::vm_core::{Core, Outgoing};

/// What became of a migration out of the VM that a dead process started
/// ([`Reconciled::migration`](crate::Reconciled::migration)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationLeft {
    /// It was under way: cancelled. The guest runs here (resumed if QEMU had paused it for the
    /// switch-over); the target QEMU, its incoming stream broken, exits.
    Cancelled,
    /// It had completed: the guest runs on the target, and this QEMU stays paused
    /// (`postmigrate`) until it is quit.
    Completed,
    /// It is in post-copy: the guest runs on the target, which still fetches memory from here.
    /// It cannot be cancelled without losing the guest; it is left to finish.
    Postcopy,
}

/// How long a cancelled migration may take to end.
const CANCELLED: Duration = Duration::from_secs(30);

/// How often `query-migrate` is asked again while no `MIGRATION` event comes (QEMU sends them
/// only with the `events` capability, which the dead process may not have set).
const RECHECK: Duration = Duration::from_millis(100);

/// Ends or reports the migration a dead process left, if QEMU has one and no call of this
/// process runs it.
pub(crate) async fn end(core: &Core) -> Result<Option<MigrationLeft>> {
    if *core.outgoing() != Outgoing::None {
        return Ok(None);
    }
    let client = &core.client;
    let mut events = client.events();
    let status = client.execute(&QueryMigrate).await?.status;
    if matches!(
        status.as_deref(),
        None | Some("none" | "cancelled" | "failed")
    ) {
        return Ok(None);
    }
    // A migration into this QEMU (waiting in `inmigrate`, or running the guest in post-copy,
    // which a source never does) is its source's to end: `migrate_cancel` here would break it
    // (QEMU 10 cancels an incoming migration too).
    let run = client.execute(&QueryStatus).await?;
    let postcopy = status.as_deref().is_some_and(|s| s.starts_with("postcopy"));
    if run.status == RunState::Inmigrate || (postcopy && run.running) {
        return Ok(None);
    }
    let left = match status.as_deref() {
        Some("setup" | "active" | "pre-switchover" | "device" | "wait-unplug" | "cancelling") => {
            tracing::info!(?status, "a dead process's migration: cancelled");
            client.execute(&MigrateCancel).await?;
            wait_ended(core, &mut events).await?;
            // Paused for the switch-over when it was cancelled: the guest runs on here.
            let run = client.execute(&QueryStatus).await?;
            if !run.running && run.status == RunState::FinishMigrate {
                client.execute(&Cont).await?;
            }
            Some(MigrationLeft::Cancelled)
        }
        _ if postcopy => Some(MigrationLeft::Postcopy),
        Some("completed") => {
            (run.status == RunState::Postmigrate).then_some(MigrationLeft::Completed)
        }
        _ => None,
    };
    Ok(left)
}

/// Waits, by [`CANCELLED`], for a cancelled migration to end: woken by its `MIGRATION` events,
/// or by asking again every [`RECHECK`].
async fn wait_ended(core: &Core, events: &mut qhotplug_qmp::EventStream) -> Result<()> {
    let deadline = tokio::time::Instant::now() + CANCELLED;
    loop {
        let status = core.client.execute(&QueryMigrate).await?.status;
        if matches!(
            status.as_deref(),
            Some("cancelled" | "failed" | "completed") | None
        ) {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            tracing::warn!(?status, "a cancelled migration did not end in time");
            return Ok(());
        }
        let ended = |e: &EventKind| matches!(e, EventKind::Migration(_));
        events.wait_for((now + RECHECK).min(deadline), ended).await;
    }
}
