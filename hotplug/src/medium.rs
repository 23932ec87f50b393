//! Changing the medium in a CD-ROM drive (`scsi-cd` or `ide-cd`): insert, eject, change, as one
//! transaction with rollback.
//!
//! The sequence: `query-block` (the tray, its lock, the medium in it) → `blockdev-open-tray` →
//! `blockdev-remove-medium` → the new medium's `add-fd`, `blockdev-add` ×2, `remove-fd` (or, on
//! the network, its secret and TLS objects and `blockdev-add` ×2) →
//! `blockdev-insert-medium` → `blockdev-close-tray`. Each step records its undo first (close the
//! tray, put the old medium back, delete the new nodes, take the new medium out), so a failure
//! anywhere leaves the drive as it was. The old medium's nodes are deleted only once the new
//! medium is in and the tray closed: until then they are what a rollback puts back.
//!
//! A guest (or its firmware, probing the drive) may close the tray at any moment: the remove and
//! insert steps open it again when QEMU says it is closed, a few times.
//!
//! A guest that has the drive open (a mounted CD) locks the tray. Unforced, `blockdev-open-tray`
//! then only asks the guest to open it; the SDK waits for `DEVICE_TRAY_MOVED` for
//! [`MediumOptions::tray_wait`] and, if the guest does not, answers [`Error::TrayLocked`] with
//! nothing changed.

use std::sync::Arc;
use std::time::Duration;

use qhotplug_cmdline::{Cdrom, CdromBus, DeviceModel, Medium};
use qhotplug_qmp::command::{
    BlockInfo, BlockdevCloseTray, BlockdevInsertMedium, BlockdevOpenTray, BlockdevRemoveMedium,
};
use qhotplug_qmp::EventKind;
use tokio::time::Instant;
use tracing::Instrument;

use crate::engine::holds::{self, Busy};
use crate::engine::transaction::Transaction;
use crate::engine::{keep_master_key, run_secret_backends};
use crate::error::{Error, Result};
use crate::kinds::{medium_backends, Device, DeviceKind, Placed};
use crate::qemu::block::Blocks;
use crate::qemu::delete::{with_tray_open, Delete};
use crate::vm_core::Core;

/// The QMP commands a medium change uses.
const COMMANDS: &[&str] = &[
    "query-block",
    "blockdev-open-tray",
    "blockdev-close-tray",
    "blockdev-remove-medium",
    "blockdev-insert-medium",
    "blockdev-add",
    "blockdev-del",
    "add-fd",
    "remove-fd",
    "query-fdsets",
    "query-named-block-nodes",
];

/// How a medium change treats a tray the guest holds locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediumOptions {
    force: bool,
    tray_wait: Duration,
}

impl Default for MediumOptions {
    fn default() -> Self {
        MediumOptions {
            force: false,
            tray_wait: Duration::from_secs(2),
        }
    }
}

impl MediumOptions {
    /// Opens the tray even though the guest locked it (default false). The guest loses the
    /// medium under its feet: reads from a mounted CD fail until it remounts.
    pub fn force(mut self, force: bool) -> Self {
        self.force = force;
        self
    }

    /// How long to wait for the guest to open a locked tray once asked (default 2 s), before
    /// [`Error::TrayLocked`]. Linux does not open a tray it holds mounted.
    pub fn tray_wait(mut self, wait: Duration) -> Self {
        self.tray_wait = wait;
        self
    }
}

/// A drive as `query-block` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrayStatus {
    /// The tray is open.
    pub tray_open: bool,
    /// The guest locked the tray.
    pub locked: bool,
    /// The name of the medium's top node, when a medium is in.
    pub medium_node: Option<String>,
}

/// See [`Vm::tray_status`](crate::Vm::tray_status).
pub(crate) async fn tray_status(core: &Core, id: &str) -> Result<TrayStatus> {
    let info = query_drive(core, id).await?;
    Ok(TrayStatus {
        tray_open: info.tray_open == Some(true),
        locked: info.locked,
        medium_node: info.inserted.and_then(|i| i.node_name),
    })
}

/// Drive `id` as `query-block` shows it.
async fn query_drive(core: &Core, id: &str) -> Result<BlockInfo> {
    Ok(Blocks::read(&core.client).await?.cdrom(id)?.clone())
}

/// See [`Vm::change_medium`](crate::Vm::change_medium). Its stages: the new drive's description
/// and host-side work, the tray opened ([`open_tray`]), the old medium out, the new one's nodes
/// and the medium in, the tray closed; then the spec records it and the old medium's nodes go
/// ([`delete_old`]). Every QEMU step before the close is undone if a later one fails.
pub(crate) async fn change(
    core: &Arc<Core>,
    id: &str,
    medium: Option<Medium>,
    options: MediumOptions,
) -> Result<()> {
    core.require("CD-ROM medium change", COMMANDS).await?;
    if let Some(source) = medium.as_ref().and_then(Medium::network_source) {
        core.require_block_driver(source.driver()).await?;
    }
    let busy = holds::mark_busy(core, id, DeviceKind::Cdrom)?;
    let Some(Device::Cdrom(old)) = core.state().device(id) else {
        unreachable!("a CD-ROM entry is a CD-ROM")
    };
    let new = Cdrom {
        generation: match medium {
            Some(_) => old.generation.wrapping_add(1),
            None => old.generation,
        },
        medium: medium.clone(),
        ..old.clone()
    };
    new.check()?;
    // Host-side work first: a path that does not open changes nothing.
    let backends = medium_backends(&new)?;
    let client = core.client.clone();
    let mut events = client.events();
    let drive = query_drive(core, id).await?;
    let mut txn = Transaction::new(client.clone(), "medium change", busy);
    open_tray(core, &mut txn, &mut events, &drive, id, &options).await?;
    if let Some(node) = drive.inserted.and_then(|i| i.node_name) {
        let undo = Delete::Reinsert {
            device: id.to_owned(),
            node,
        };
        let remove = BlockdevRemoveMedium { id: id.to_owned() };
        let step = with_tray_open(&client, id, options.force, &remove);
        txn.step("blockdev-remove-medium", Some(undo), step).await?;
    }
    let new_key = run_secret_backends(core, &mut txn, backends).await?;
    if new.medium.is_some() {
        let insert = BlockdevInsertMedium {
            id: id.to_owned(),
            node_name: new.top_node(),
        };
        let undo = Delete::Medium(id.to_owned());
        let step = with_tray_open(&client, id, options.force, &insert);
        txn.step("blockdev-insert-medium", Some(undo), step).await?;
    }
    let close = BlockdevCloseTray { id: id.to_owned() };
    txn.step("blockdev-close-tray", None, client.execute(&close))
        .await?;
    let busy = txn.commit();
    keep_master_key(core, new_key).await;
    core.state().update(new.clone().into());
    delete_old(core, &old).await;
    drop(busy);
    let bus = match &new.bus {
        CdromBus::Scsi(_) => "scsi",
        CdromBus::Ide(_) => "ide",
    };
    tracing::info!(bus, medium = ?new.medium, "medium changed");
    Ok(())
}

/// Opens drive `id`'s tray unless it is open. A tray the guest locked is only asked (nothing to
/// undo unless it opens), and waited for until `options.tray_wait`: [`Error::TrayLocked`] if it
/// stays shut. Unlocked, it opens at once, undone by closing it.
async fn open_tray(
    core: &Core,
    txn: &mut Transaction<Busy>,
    events: &mut qhotplug_qmp::EventStream,
    drive: &BlockInfo,
    id: &str,
    options: &MediumOptions,
) -> Result<()> {
    let client = &core.client;
    if drive.tray_open == Some(true) {
        return Ok(());
    }
    let open = BlockdevOpenTray {
        id: id.to_owned(),
        force: options.force.then_some(true),
    };
    if drive.locked && !options.force {
        // Only a request to the guest: nothing to undo unless it opens the tray.
        txn.step("blockdev-open-tray", None, client.execute(&open))
            .await?;
        let wait = tracing::debug_span!(crate::spans::STEP, name = "wait DEVICE_TRAY_MOVED", id);
        let deadline = Instant::now() + options.tray_wait;
        let tray_opened =
            |e: &EventKind| matches!(e, EventKind::DeviceTrayMoved(m) if m.id == id && m.tray_open);
        let opened = events.wait_for(deadline, tray_opened).instrument(wait).await
                // Events may have been lost: QEMU's word decides.
                || query_drive(core, id).await?.tray_open == Some(true);
        if !opened {
            return Err(Error::TrayLocked(id.to_owned()));
        }
        txn.push_undo(Delete::CloseTray(id.to_owned()));
    } else {
        let undo = Delete::CloseTray(id.to_owned());
        txn.step("blockdev-open-tray", Some(undo), client.execute(&open))
            .await?;
    }
    Ok(())
}

/// The old medium is out: its nodes go. One left behind is `reconcile`'s to delete.
async fn delete_old(core: &Core, old: &Cdrom) {
    for step in old.teardown() {
        let span = tracing::debug_span!(crate::spans::STEP, name = step.command(), id = %old.id);
        if let Err(error) = step.run(&core.client).instrument(span).await {
            tracing::warn!(%step, %error, "old medium's node left for reconcile");
            core.state().touched.insert(old.id.clone());
        }
    }
}
