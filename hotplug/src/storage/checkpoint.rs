//! Checkpoints: the points in time an incremental backup copies the changes since. Each is a
//! persistent dirty bitmap of the checkpoint's name on the disk's top image (qcow2), and the
//! disk's spec lists them oldest first ([`Disk::checkpoints`]). Only the newest records; making
//! a new one stops the one before it, so each holds the writes of its own interval, and an
//! incremental backup since checkpoint *k* merges *k* and every later one into a temporary bitmap
//! (libvirt's scheme, reference §5.3). A failed backup therefore loses nothing: its new
//! checkpoint's record goes back into the one before it.
//!
//! QEMU stores the bitmaps in the image at a clean shutdown; killed, it loads them back as
//! `inconsistent`, which the SDK reports and will not back up from.

use std::sync::Arc;

use tracing::Instrument;

use qhotplug_cmdline::names::{self, BACKUP_BITMAP};
use qhotplug_cmdline::{Disk, Format};
use qhotplug_qmp::command::{
    BlockDirtyBitmapAdd, BlockDirtyBitmapDisable, BlockDirtyBitmapMerge, BlockDirtyBitmapRemove,
    DirtyBitmapInfo, QmpTransaction, TransactionAction,
};

use crate::engine::holds;
use crate::error::{CheckpointProblem, Error, Result};
use crate::kinds::{Device, DeviceKind};
use crate::qemu::block::Blocks;
use crate::qemu::delete::Delete;
use crate::vm_core::Core;

/// The commands checkpoints use.
pub(crate) const COMMANDS: &[&str] = &[
    "query-block",
    "transaction",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-merge",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-enable",
];

/// One checkpoint of a disk, as QEMU has it ([`Vm::checkpoints`](crate::Vm::checkpoints)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Its name.
    pub name: String,
    /// Whether an incremental backup can start from it.
    pub state: CheckpointState,
    /// Bytes written from it until the next checkpoint (until now, for the newest).
    pub recorded: u64,
    /// Bytes an incremental backup since it would copy now: what it and every later checkpoint
    /// recorded (0 when it is not usable).
    pub since: u64,
    /// It is the newest, recording writes now.
    pub recording: bool,
}

/// Whether a checkpoint can be backed up from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckpointState {
    /// QEMU has it, consistent.
    Usable,
    /// QEMU loaded it from an image that was not closed cleanly: a full backup is needed.
    Inconsistent,
    /// QEMU has no such bitmap on the disk's image.
    Missing,
}

/// What a backup does to one disk's checkpoints ([`Checkpoints::at_backup`]).
pub(crate) struct AtBackup {
    /// The `transaction` actions, before the disk's backup job.
    pub(crate) actions: Vec<TransactionAction>,
    /// The disk once they ran: checkpoints QEMU no longer has (inconsistent ones removed) gone.
    pub(crate) now: Disk,
    /// The disk once the backup completes: the new checkpoint the newest.
    pub(crate) after: Disk,
    /// The temporary bitmap, removed at the backup's end whatever it is.
    pub(crate) temporary: Option<Delete>,
    /// What gives the new checkpoint's record back if the backup does not complete.
    pub(crate) undo_checkpoint: Option<Delete>,
}

/// The disk's checkpoints as QEMU has them: for each of the spec's, oldest first, its bitmap on
/// the disk's top node.
pub(crate) struct Checkpoints {
    /// The disk.
    pub(crate) disk: Disk,
    /// Each of the spec's checkpoints and its bitmap, if QEMU has one.
    pub(crate) bitmaps: Vec<(String, Option<DirtyBitmapInfo>)>,
    /// A backup's temporary bitmap left by a process that went away.
    pub(crate) stale_backup_bitmap: bool,
}

impl Checkpoints {
    /// Reads disk `disk`'s bitmaps from QEMU.
    pub(crate) async fn read(core: &Core, disk: Disk) -> Result<Checkpoints> {
        Ok(Checkpoints::of(disk, &Blocks::read(&core.client).await?))
    }

    /// Disk `disk`'s checkpoints against its top node's bitmaps in `blocks` (`query-block`).
    pub(crate) fn of(disk: Disk, blocks: &Blocks) -> Checkpoints {
        let have = blocks.bitmaps_of(&disk.top_node());
        let bitmaps = disk
            .checkpoints
            .iter()
            .map(|name| (name.clone(), have.iter().find(|b| &b.name == name).cloned()))
            .collect();
        let stale_backup_bitmap = have.iter().any(|b| b.name == BACKUP_BITMAP);
        Checkpoints {
            disk,
            bitmaps,
            stale_backup_bitmap,
        }
    }

    fn state(bitmap: &Option<DirtyBitmapInfo>) -> CheckpointState {
        match bitmap {
            None => CheckpointState::Missing,
            Some(b) if b.inconsistent => CheckpointState::Inconsistent,
            Some(_) => CheckpointState::Usable,
        }
    }

    fn error(&self, checkpoint: &str, problem: CheckpointProblem) -> Error {
        Error::Checkpoint {
            disk: self.disk.id.clone(),
            checkpoint: checkpoint.to_owned(),
            problem,
        }
    }

    /// Refuses `name` for a new checkpoint: one of that name exists, or the image is not qcow2.
    pub(crate) fn check_new(&self, name: &str) -> Result<()> {
        if self.disk.format != Format::Qcow2 {
            return Err(self.error(name, CheckpointProblem::NeedsQcow2));
        }
        if name == BACKUP_BITMAP || self.bitmaps.iter().any(|(n, _)| n == name) {
            return Err(self.error(name, CheckpointProblem::Exists));
        }
        Ok(())
    }

    /// The checkpoints an incremental backup since `since` merges: it and every later one, each
    /// usable, or the typed reason why not.
    pub(crate) fn chain_since(&self, since: &str) -> Result<Vec<String>> {
        let Some(at) = self.bitmaps.iter().position(|(n, _)| n == since) else {
            return Err(self.error(since, CheckpointProblem::Unknown));
        };
        for (name, bitmap) in &self.bitmaps[at..] {
            match Self::state(bitmap) {
                CheckpointState::Usable => {}
                CheckpointState::Inconsistent => {
                    return Err(self.error(name, CheckpointProblem::Inconsistent))
                }
                CheckpointState::Missing => {
                    return Err(self.error(name, CheckpointProblem::Missing))
                }
            }
        }
        Ok(self.bitmaps[at..].iter().map(|(n, _)| n.clone()).collect())
    }

    /// The newest usable checkpoint, if it still records (the one a new checkpoint stops).
    fn recording(&self) -> Option<&str> {
        self.bitmaps
            .iter()
            .filter_map(|(n, b)| b.as_ref().map(|b| (n, b)))
            .find(|(_, b)| b.recording && !b.inconsistent)
            .map(|(n, _)| n.as_str())
    }

    /// The actions that make checkpoint `name` the newest: inconsistent ones removed (nothing
    /// can use them), the recording one stopped, the new one added, recording. Returns them, the
    /// checkpoints the disk has afterwards (missing and inconsistent ones dropped), and the undo
    /// (the new one's record given back to the one it stopped).
    pub(crate) fn add_actions(&self, name: &str) -> (Vec<TransactionAction>, Vec<String>, Delete) {
        let node = self.disk.top_node();
        let mut actions = Vec::new();
        let mut kept = Vec::new();
        for (checkpoint, bitmap) in &self.bitmaps {
            match Self::state(bitmap) {
                CheckpointState::Usable => kept.push(checkpoint.clone()),
                CheckpointState::Missing => {}
                CheckpointState::Inconsistent => {
                    actions.push(TransactionAction::of(&BlockDirtyBitmapRemove {
                        node: node.clone(),
                        name: checkpoint.clone(),
                    }))
                }
            }
        }
        let stopped = self.recording().map(str::to_owned);
        if let Some(last) = &stopped {
            actions.push(TransactionAction::of(&BlockDirtyBitmapDisable {
                node: node.clone(),
                name: last.clone(),
            }));
        }
        actions.push(TransactionAction::of(&BlockDirtyBitmapAdd {
            node: node.clone(),
            name: name.to_owned(),
            persistent: Some(true),
            disabled: None,
        }));
        let undo = Delete::Checkpoint {
            node,
            name: name.to_owned(),
            into: stopped,
            resume: true,
        };
        (actions, kept, undo)
    }

    /// Everything a backup (push or pull) does to this disk's checkpoints at its point in time:
    /// for an incremental one (`chain`, from [`chain_since`](Checkpoints::chain_since)) the
    /// temporary bitmap filled from the chain, and with `checkpoint` the new one made the newest.
    pub(crate) fn at_backup(&self, chain: Option<&[String]>, checkpoint: Option<&str>) -> AtBackup {
        let mut at = AtBackup {
            actions: Vec::new(),
            now: self.disk.clone(),
            after: self.disk.clone(),
            temporary: None,
            undo_checkpoint: None,
        };
        if let Some(chain) = chain {
            at.actions.extend(self.backup_bitmap_actions(chain));
            at.temporary = Some(Delete::Bitmap {
                node: self.disk.top_node(),
                name: BACKUP_BITMAP.into(),
            });
        }
        if let Some(name) = checkpoint {
            let (add, kept, undo) = self.add_actions(name);
            at.actions.extend(add);
            at.now.checkpoints = kept.clone();
            at.after.checkpoints = kept;
            at.after.checkpoints.push(name.to_owned());
            at.undo_checkpoint = Some(undo);
        }
        at
    }

    /// The actions that fill a backup's temporary bitmap with what `chain` recorded (a stale one
    /// from an earlier process removed first).
    pub(crate) fn backup_bitmap_actions(&self, chain: &[String]) -> Vec<TransactionAction> {
        let node = self.disk.top_node();
        let mut actions = Vec::new();
        if self.stale_backup_bitmap {
            actions.push(TransactionAction::of(&BlockDirtyBitmapRemove {
                node: node.clone(),
                name: BACKUP_BITMAP.into(),
            }));
        }
        actions.push(TransactionAction::of(&BlockDirtyBitmapAdd {
            node: node.clone(),
            name: BACKUP_BITMAP.into(),
            persistent: Some(false),
            disabled: Some(true),
        }));
        actions.push(TransactionAction::of(&BlockDirtyBitmapMerge {
            node,
            target: BACKUP_BITMAP.into(),
            bitmaps: chain.to_vec(),
        }));
        actions
    }
}

/// What a backup (push or pull) of disk `ids` reads and holds before it touches anything: each
/// disk marked busy (so one backup or job runs on it at a time), local, its checkpoints read
/// from QEMU, the new checkpoint's name free and the disk qcow2 (if one is to be made), and for
/// an incremental one the chain since `since`, each usable. Returns the marks and, per disk, its
/// checkpoints and that chain.
pub(crate) async fn plan(
    core: &Arc<Core>,
    operation: &'static str,
    ids: &[String],
    since: Option<&str>,
    checkpoint: Option<&str>,
) -> Result<(Vec<holds::Busy>, Vec<(Checkpoints, Vec<String>)>)> {
    let mut busy = Vec::new();
    let mut disks: Vec<Disk> = Vec::new();
    for id in ids {
        if disks.iter().any(|d| &d.id == id) {
            return Err(Error::DuplicateId(id.clone()));
        }
        let (mark, Device::Disk(disk)) = holds::busy_device(core, id, DeviceKind::Disk)? else {
            unreachable!("a disk entry is a disk")
        };
        crate::qemu::jobs::require_local(operation, &disk)?;
        busy.push(mark);
        disks.push(disk);
    }
    // Every disk's bitmaps from one `query-block`.
    let blocks = Blocks::read(&core.client).await?;
    let mut plans = Vec::new();
    for disk in disks {
        let checkpoints = Checkpoints::of(disk, &blocks);
        if let Some(name) = checkpoint {
            checkpoints.check_new(name)?;
        }
        let chain = match since {
            Some(since) => checkpoints.chain_since(since)?,
            None => Vec::new(),
        };
        plans.push((checkpoints, chain));
    }
    Ok((busy, plans))
}

/// See [`Vm::checkpoints`](crate::Vm::checkpoints).
pub(crate) async fn list(core: &Arc<Core>, id: &str) -> Result<Vec<CheckpointInfo>> {
    core.require("checkpoints", COMMANDS).await?;
    let Some(Device::Disk(disk)) = core.state().device(id) else {
        return Err(Error::NotFound {
            kind: DeviceKind::Disk,
            id: id.to_owned(),
        });
    };
    let node = disk.top_node();
    let read = Checkpoints::read(core, disk).await?;
    let mut out = Vec::new();
    for (name, bitmap) in &read.bitmaps {
        let state = Checkpoints::state(bitmap);
        let since = match state {
            CheckpointState::Usable => match read.chain_since(name) {
                Ok(chain) => merged_count(core, &node, &chain).await?,
                Err(_) => 0,
            },
            _ => 0,
        };
        out.push(CheckpointInfo {
            name: name.clone(),
            state,
            recorded: bitmap.as_ref().map_or(0, |b| b.count),
            since,
            recording: bitmap.as_ref().is_some_and(|b| b.recording),
        });
    }
    Ok(out)
}

/// The dirty bitmaps of block node `node`, the root of a device, from a fresh `query-block`.
async fn bitmaps_of(core: &Core, node: &str) -> Result<Vec<DirtyBitmapInfo>> {
    Ok(Blocks::read(&core.client).await?.bitmaps_of(node))
}

/// The bytes bitmap `name` of `bitmaps` marks.
fn count(bitmaps: &[DirtyBitmapInfo], name: &str) -> u64 {
    bitmaps
        .iter()
        .find(|b| b.name == name)
        .map_or(0, |b| b.count)
}

/// How many bytes `chain`'s bitmaps on `node` mark together: merged into a scratch bitmap, read,
/// and the scratch removed.
async fn merged_count(core: &Core, node: &str, chain: &[String]) -> Result<u64> {
    if let [one] = chain {
        return Ok(count(&bitmaps_of(core, node).await?, one));
    }
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let scratch = names::scratch_bitmap(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let add = TransactionAction::of(&BlockDirtyBitmapAdd {
        node: node.to_owned(),
        name: scratch.clone(),
        persistent: Some(false),
        disabled: Some(true),
    });
    let merge = TransactionAction::of(&BlockDirtyBitmapMerge {
        node: node.to_owned(),
        target: scratch.clone(),
        bitmaps: chain.to_vec(),
    });
    let made = QmpTransaction {
        actions: vec![add, merge],
        properties: None,
    };
    core.client.execute(&made).await?;
    let counted = bitmaps_of(core, node).await;
    let remove = Delete::Bitmap {
        node: node.to_owned(),
        name: scratch.clone(),
    };
    remove.run(&core.client).await?;
    Ok(count(&counted?, &scratch))
}

/// See [`Vm::delete_checkpoint`](crate::Vm::delete_checkpoint).
pub(crate) async fn delete(core: &Arc<Core>, id: &str, name: &str) -> Result<()> {
    core.require("checkpoints", COMMANDS).await?;
    let (_busy, Device::Disk(disk)) = holds::busy_device(core, id, DeviceKind::Disk)? else {
        unreachable!("a disk entry is a disk")
    };
    let read = Checkpoints::read(core, disk.clone()).await?;
    let Some(at) = read.bitmaps.iter().position(|(n, _)| n == name) else {
        return Err(read.error(name, CheckpointProblem::Unknown));
    };
    let node = disk.top_node();
    let (_, bitmap) = &read.bitmaps[at];
    let before = at.checked_sub(1).map(|b| &read.bitmaps[b]);
    // What it recorded goes into the one before it, which then covers its interval too (and
    // records, if it was the newest); an inconsistent record is simply dropped.
    let step = match (bitmap, before) {
        (None, _) => None,
        (Some(b), Some((into, Some(i)))) if !b.inconsistent && !i.inconsistent => {
            Some(Delete::Checkpoint {
                node,
                name: name.to_owned(),
                into: Some(into.clone()),
                resume: b.recording,
            })
        }
        (Some(_), _) => Some(Delete::Bitmap {
            node,
            name: name.to_owned(),
        }),
    };
    if let Some(step) = step {
        let span = tracing::debug_span!(crate::spans::STEP, name = step.command(), id);
        step.run(&core.client).instrument(span).await?;
    }
    let mut after = disk;
    after.checkpoints.retain(|c| c != name);
    core.state().update(after.into());
    tracing::info!(disk = id, checkpoint = name, "checkpoint deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fixtures::chain;

    fn bitmap(name: &str, recording: bool, inconsistent: bool) -> Option<DirtyBitmapInfo> {
        Some(DirtyBitmapInfo {
            name: name.into(),
            count: 0,
            granularity: 65536,
            recording,
            busy: false,
            persistent: true,
            inconsistent,
        })
    }

    /// Disk `d` with checkpoints c1 (stopped), c2 (recording) and c3 as QEMU has them.
    fn checkpoints(c3: Option<DirtyBitmapInfo>) -> Checkpoints {
        let mut disk = chain();
        disk.checkpoints = vec!["c1".into(), "c2".into(), "c3".into()];
        Checkpoints {
            disk,
            bitmaps: vec![
                ("c1".into(), bitmap("c1", false, false)),
                ("c2".into(), bitmap("c2", true, false)),
                ("c3".into(), c3),
            ],
            stale_backup_bitmap: false,
        }
    }

    fn kinds(actions: &[TransactionAction]) -> Vec<String> {
        actions.iter().map(|a| a.kind.clone()).collect()
    }

    #[test]
    fn an_incremental_chain_needs_every_checkpoint_since_usable() {
        let missing = checkpoints(None);
        assert!(matches!(
            missing.chain_since("c2"),
            Err(Error::Checkpoint {
                problem: CheckpointProblem::Missing,
                ..
            })
        ));
        let broken = checkpoints(bitmap("c3", false, true));
        assert!(matches!(
            broken.chain_since("c1"),
            Err(Error::Checkpoint {
                problem: CheckpointProblem::Inconsistent,
                ..
            })
        ));
        assert!(matches!(
            broken.chain_since("c0"),
            Err(Error::Checkpoint {
                problem: CheckpointProblem::Unknown,
                ..
            })
        ));
        let usable = checkpoints(bitmap("c3", false, false));
        assert_eq!(usable.chain_since("c2").unwrap(), ["c2", "c3"]);
    }

    #[test]
    fn a_new_checkpoint_drops_broken_ones_stops_the_recording_one_and_can_be_given_back() {
        let at = checkpoints(bitmap("c3", false, true)).at_backup(None, Some("c4"));
        assert_eq!(
            kinds(&at.actions),
            [
                "block-dirty-bitmap-remove",
                "block-dirty-bitmap-disable",
                "block-dirty-bitmap-add"
            ]
        );
        // The inconsistent one leaves the spec at once; the new one joins when the backup ends.
        assert_eq!(at.now.checkpoints, ["c1", "c2"]);
        assert_eq!(at.after.checkpoints, ["c1", "c2", "c4"]);
        assert!(at.temporary.is_none());
        assert!(matches!(
            at.undo_checkpoint,
            Some(Delete::Checkpoint { ref into, resume: true, .. }) if into.as_deref() == Some("c2")
        ));
    }

    #[test]
    fn an_incremental_backup_fills_its_temporary_bitmap_from_the_chain() {
        let mut points = checkpoints(bitmap("c3", false, false));
        points.stale_backup_bitmap = true;
        let chain = points.chain_since("c2").unwrap();
        let at = points.at_backup(Some(&chain), None);
        assert_eq!(
            kinds(&at.actions),
            [
                "block-dirty-bitmap-remove",
                "block-dirty-bitmap-add",
                "block-dirty-bitmap-merge"
            ]
        );
        assert!(
            matches!(at.temporary, Some(Delete::Bitmap { ref name, .. }) if name == BACKUP_BITMAP)
        );
        assert!(at.undo_checkpoint.is_none());
        assert_eq!(at.after.checkpoints, points.disk.checkpoints);
    }
}
