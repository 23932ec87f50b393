//! External live snapshots of one or several disks at once (reference §2): for each disk a new
//! qcow2 overlay the SDK creates (its header naming the disk's image as backing file), its nodes
//! under the disk's next generation of names with a null backing, then one QMP `transaction` of
//! `blockdev-snapshot` actions, so every disk moves onto its overlay or none does. Optionally the
//! guest's filesystems are frozen through its agent around the transaction alone (`quiesce`).
//! Afterwards each disk in the spec stands on its old image: the overlay on top, the old chain
//! under it, which a relaunch from `vm.spec()` opens as such.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qhotplug_cmdline::{Disk, DiskLayer, Format};
use qhotplug_qmp::command::{QmpTransaction, TransactionAction};

use crate::engine::holds::{self, Busy};
use crate::engine::transaction::Transaction;
use crate::error::{Error, Result};
use crate::kinds::{Device, DeviceKind};
use crate::storage::new_image::{self, Backing, ImageSpec, NewImage};
use crate::vm_core::Core;

/// The commands a snapshot uses.
const COMMANDS: &[&str] = &[
    "blockdev-create",
    "transaction",
    "query-jobs",
    "job-dismiss",
];

/// How long a quiesced snapshot may keep the guest's filesystems frozen at most (the guard's
/// safety timer thaws them by then whatever happens).
const FREEZE_SAFETY: Duration = Duration::from_secs(60);

/// A live snapshot of one or several disks ([`Vm::snapshot`](crate::Vm::snapshot)).
#[derive(Debug, Clone, Default)]
pub struct SnapshotConfig {
    disks: Vec<(String, PathBuf)>,
    quiesce: bool,
}

impl SnapshotConfig {
    /// A snapshot of no disk yet.
    pub fn new() -> SnapshotConfig {
        SnapshotConfig::default()
    }

    /// Disk `id` gets a new qcow2 overlay at `overlay` (which must not exist: the SDK creates
    /// it).
    pub fn disk(mut self, id: impl Into<String>, overlay: impl Into<PathBuf>) -> Self {
        self.disks.push((id.into(), overlay.into()));
        self
    }

    /// Freezes the guest's filesystems through its agent for the moment of the snapshot, so the
    /// images under the overlays are consistent as filesystems; a freeze that fails fails the
    /// snapshot, with nothing changed.
    pub fn quiesce(mut self, on: bool) -> Self {
        self.quiesce = on;
        self
    }
}

/// See [`Vm::snapshot`](crate::Vm::snapshot).
pub(crate) async fn snapshot(core: &Arc<Core>, config: SnapshotConfig) -> Result<Vec<Disk>> {
    core.require("live snapshot", COMMANDS).await?;
    let (busy, disks) = checked(core, &config)?;
    let client = core.client.clone();
    let mut txn = Transaction::new(client.clone(), "live snapshot", busy);
    let images = match overlays(core, &mut txn, &disks, &config).await {
        Ok(images) => images,
        Err(error) => return Err(txn.abort(error).await),
    };
    let frozen = match config.quiesce {
        true => match freeze(core).await {
            Ok(frozen) => Some(frozen),
            Err(error) => return Err(txn.abort(error).await),
        },
        false => None,
    };
    // One point in time for every disk.
    let actions = disks
        .iter()
        .zip(&images)
        .map(|(disk, image)| {
            let overlay = disk.with_top(&image.layer);
            TransactionAction::blockdev_snapshot(&disk.top_node(), &overlay.top_node())
        })
        .collect();
    let done = txn
        .step(
            "transaction",
            None,
            client.execute(&QmpTransaction {
                actions,
                properties: None,
            }),
        )
        .await;
    if let Some(frozen) = frozen {
        if let Err(error) = frozen.thaw().await {
            tracing::error!(%error, "the guest's filesystems may still be frozen: the snapshot's thaw did not go through (GuestAgent::freeze_state says what is known)");
        }
    }
    done?;
    let busy = txn.commit();
    let mut after = Vec::new();
    for (disk, image) in disks.iter().zip(images) {
        let layer = image.keep();
        let mut backing = vec![disk.top_layer()];
        backing.extend(disk.backing.iter().cloned());
        let new = Disk {
            backing,
            ..disk.with_top(&layer)
        };
        core.state().update(new.clone().into());
        after.push(new);
    }
    drop(busy);
    tracing::info!(disks = after.len(), "snapshot taken");
    Ok(after)
}

/// Each disk of the snapshot marked busy and checked (named once, writable, local) before
/// anything is made or sent.
fn checked(core: &Arc<Core>, config: &SnapshotConfig) -> Result<(Vec<Busy>, Vec<Disk>)> {
    let mut busy: Vec<Busy> = Vec::new();
    let mut disks: Vec<Disk> = Vec::new();
    for (id, _) in &config.disks {
        if disks.iter().any(|d| &d.id == id) {
            return Err(Error::DuplicateId(id.clone()));
        }
        let (mark, Device::Disk(disk)) = holds::busy_device(core, id, DeviceKind::Disk)? else {
            unreachable!("a disk entry is a disk")
        };
        if disk.read_only {
            return Err(Error::ReadOnly(id.clone()));
        }
        crate::qemu::jobs::require_local("live snapshot", &disk)?;
        busy.push(mark);
        disks.push(disk);
    }
    Ok((busy, disks))
}

/// A qcow2 overlay per disk, its header naming the disk's image, each made in `txn` (which the
/// caller rolls back if one fails).
async fn overlays(
    core: &Core,
    txn: &mut Transaction<Vec<Busy>>,
    disks: &[Disk],
    config: &SnapshotConfig,
) -> Result<Vec<NewImage>> {
    let client = core.client.clone();
    let mut events = client.events();
    let mut images = Vec::new();
    for (disk, (_, path)) in disks.iter().zip(&config.disks) {
        let layer = DiskLayer {
            path: path.clone(),
            format: Format::Qcow2,
            generation: disk.next_generation(),
            checkpoints: Vec::new(),
        };
        let under = disk.top_layer();
        let made = async {
            let new = ImageSpec {
                layer,
                size: crate::qemu::block::disk_size(&client, disk).await?,
                backing: Backing::Null {
                    header: Some(&under),
                },
            };
            new_image::create(&client, txn, &mut events, disk, new).await
        };
        images.push(made.await?);
    }
    Ok(images)
}

/// Freezes the guest's filesystems through its agent, by [`FREEZE_SAFETY`] at the latest.
async fn freeze(core: &Core) -> Result<qhotplug_qga::Frozen> {
    Ok(core.agent().await?.freeze(FREEZE_SAFETY).await?)
}
