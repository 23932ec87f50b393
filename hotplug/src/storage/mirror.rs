//! Drive mirror: a running disk copied to a new image the SDK creates and opens, then either the
//! disk moved onto the copy (pivot) or the copy kept as a point-in-time image (abandon), as the
//! reference's §4.2–4.3 sequence does.
//!
//! Start: the target file (created, never overwritten), its fd set and nodes under the disk's
//! next generation of names (`<id>-file.<n>`, `<id>-fmt.<n>`; a qcow2 target formatted by QEMU's
//! own `blockdev-create` job), then `blockdev-mirror` with an explicit job id and
//! `auto-dismiss: false`: a transaction, undone if a step fails. The [`BlockJob`] handle holds
//! the disk's busy mark from then on. Its end: `job-complete` (pivot: the spec's disk moves to
//! the copy and the old nodes go), the soft `block-job-cancel` (abandon: the copy is consistent
//! as of then, its nodes go, the disk stays), or `job-cancel` (the copy is not a copy: its nodes
//! and its file go).

use std::path::PathBuf;
use std::sync::Arc;

use qhotplug_cmdline::{Disk, DiskLayer, Format};
use qhotplug_qmp::command::BlockdevMirror;

use crate::engine::holds;
use crate::engine::transaction::Transaction;
use crate::error::{Error, Result};
use crate::kinds::{Device, DeviceKind};
use crate::qemu::jobs;
use crate::storage::block_job::{BlockJob, Ends};
use crate::storage::new_image::{self, Backing, ImageSpec};
use crate::vm_core::Core;

/// The commands a mirror uses.
const COMMANDS: &[&str] = &[
    "blockdev-mirror",
    "query-jobs",
    "job-complete",
    "job-cancel",
    "job-dismiss",
    "block-job-cancel",
];

/// What a mirror copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MirrorSync {
    /// The whole disk, its backing chain included.
    #[default]
    Full,
    /// Only the disk's top image (the target must get the rest from a backing file of its own).
    Top,
}

/// A drive mirror: where to, and how ([`Vm::mirror_disk`](crate::Vm::mirror_disk)).
///
/// How it copies: QEMU's defaults, which copy at 0.9–1.0 of `qemu-img convert`'s rate on this
/// project's machines (BENCHMARKS.md; other buffer sizes moved nothing beyond noise): a dirty
/// bitmap of the target's cluster size (at least 64 KiB), up to 16 MiB in flight as requests of
/// up to 1 MiB, no rate limit, guest writes copied in the background.
/// [`granularity`](MirrorConfig::granularity), [`buffer`](MirrorConfig::buffer),
/// [`speed`](MirrorConfig::speed) and [`write_blocking`](MirrorConfig::write_blocking) change
/// them.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    target: PathBuf,
    format: Format,
    sync: MirrorSync,
    granularity: Option<u32>,
    buffer: Option<u64>,
    speed: u64,
    write_blocking: bool,
}

impl MirrorConfig {
    /// A full copy into a new raw image at `target` (which must not exist: the SDK creates it,
    /// of the disk's size).
    pub fn new(target: impl Into<PathBuf>) -> MirrorConfig {
        MirrorConfig {
            target: target.into(),
            format: Format::Raw,
            sync: MirrorSync::Full,
            granularity: None,
            buffer: None,
            speed: 0,
            write_blocking: false,
        }
    }

    /// The target's format (raw by default; qcow2 is formatted by QEMU's `blockdev-create`).
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// What to copy (default: [`MirrorSync::Full`]).
    pub fn sync(mut self, sync: MirrorSync) -> Self {
        self.sync = sync;
        self
    }

    /// The dirty bitmap's granularity in bytes (a power of two from 512 B to 64 MiB; QEMU's
    /// default is the target's cluster size, at least 64 KiB).
    pub fn granularity(mut self, bytes: u32) -> Self {
        self.granularity = Some(bytes);
        self
    }

    /// The most bytes in flight from the disk to the copy (`buf-size`; QEMU's default 16 MiB).
    pub fn buffer(mut self, bytes: u64) -> Self {
        self.buffer = Some(bytes);
        self
    }

    /// A rate limit in bytes per second (0, the default: none). See [`BlockJob::set_speed`].
    pub fn speed(mut self, bytes_per_second: u64) -> Self {
        self.speed = bytes_per_second;
        self
    }

    /// Guest writes go to the target synchronously too (`copy-mode: write-blocking`), so a guest
    /// that writes faster than the copy cannot keep the job from `ready`.
    pub fn write_blocking(mut self, on: bool) -> Self {
        self.write_blocking = on;
        self
    }
}

/// See [`Vm::mirror_disk`](crate::Vm::mirror_disk).
pub(crate) async fn start(core: &Arc<Core>, id: &str, config: MirrorConfig) -> Result<BlockJob> {
    core.require("drive mirror", COMMANDS).await?;
    let (busy, Device::Disk(disk)) = holds::busy_device(core, id, DeviceKind::Disk)? else {
        unreachable!("a disk entry is a disk")
    };
    jobs::require_local("drive mirror", &disk)?;
    if disk.read_only {
        return Err(Error::ReadOnly(id.to_owned()));
    }
    // A copy of the top alone stands on the disk's backing chain; it needs a format that has
    // a backing file.
    let below = match config.sync {
        MirrorSync::Top => disk.backing.first(),
        MirrorSync::Full => None,
    };
    if below.is_some() && config.format != Format::Qcow2 {
        return Err(Error::Precondition {
            operation: "drive mirror",
            reason: format!(
                "{id}: a mirror of the top image alone needs a qcow2 target (it has a backing file)"
            ),
        });
    }
    let size = crate::qemu::block::disk_size(&core.client, &disk).await?;
    let layer = DiskLayer {
        path: config.target.clone(),
        format: config.format,
        generation: disk.next_generation(),
        checkpoints: Vec::new(),
    };
    let client = core.client.clone();
    let mut events = client.events();
    let mut txn = Transaction::new(client.clone(), "drive mirror", busy);
    let backing = match below {
        Some(layer) => Backing::Node(layer),
        None => Backing::Null { header: None },
    };
    let new = ImageSpec {
        layer,
        size,
        backing,
    };
    let made = new_image::create(&client, &mut txn, &mut events, &disk, new);
    let image = match made.await {
        Ok(image) => image,
        Err(error) => return Err(txn.abort(error).await),
    };
    let target = disk.with_top(&image.layer);
    let job = qhotplug_cmdline::names::mirror_job(id);
    let mirror = BlockdevMirror {
        job_id: job.clone(),
        device: disk.top_node(),
        target: target.top_node(),
        sync: match config.sync {
            MirrorSync::Full => "full",
            MirrorSync::Top => "top",
        }
        .into(),
        granularity: config.granularity,
        speed: (config.speed > 0).then_some(config.speed),
        copy_mode: config.write_blocking.then(|| "write-blocking".into()),
        auto_dismiss: Some(false),
        buf_size: config.buffer,
    };
    txn.step("blockdev-mirror", None, client.execute(&mirror))
        .await?;
    let busy = txn.commit();
    let layer = image.keep();
    tracing::info!(job, target = %config.target.display(), "mirror started");
    let ends = ends(&disk, &layer, below.is_some());
    Ok(BlockJob::new(core, job, events, busy, ends).created(config.target))
}

/// What a mirror's end changes. After a pivot the disk is the copy, standing on what the copy
/// stands on: nothing for a full copy (every node of the old chain goes), the old backing chain
/// for a copy of the top alone (only the old top's nodes go). Abandoned or cancelled, the copy's
/// nodes go.
pub(crate) fn ends(disk: &Disk, target: &DiskLayer, top_only: bool) -> Ends {
    let copy = disk.with_top(target);
    let (after, on_complete) = match top_only {
        true => (copy, disk.top_layer().node_names(&disk.id).into()),
        false => (
            Disk {
                backing: Vec::new(),
                ..copy
            },
            disk.node_names(),
        ),
    };
    Ends {
        after,
        on_complete,
        on_abort: target.node_names(&disk.id).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fixtures::chain;

    fn target() -> DiskLayer {
        DiskLayer {
            path: "/elsewhere/d.3.qcow2".into(),
            format: Format::Qcow2,
            generation: 3,
            checkpoints: Vec::new(),
        }
    }

    #[test]
    fn a_full_mirror_stands_alone_and_its_source_chain_goes() {
        let disk = chain();
        let ends = ends(&disk, &target(), false);
        assert_eq!(ends.after.top_node(), "d-fmt.3");
        assert!(ends.after.backing.is_empty());
        assert_eq!(ends.on_complete, disk.node_names());
        assert_eq!(ends.on_abort, ["d-fmt.3", "d-file.3"]);
    }

    #[test]
    fn a_mirror_of_the_top_keeps_the_chain_under_it() {
        let disk = chain();
        let ends = ends(&disk, &target(), true);
        assert_eq!(ends.after.backing, disk.backing);
        assert_eq!(ends.on_complete, ["d-fmt.2", "d-file.2"]);
        assert_eq!(ends.on_abort, ["d-fmt.3", "d-file.3"]);
    }
}
