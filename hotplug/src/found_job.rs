//! The restart path of storage jobs: a job an earlier process started on a disk, found in QEMU
//! and given back as a [`BlockJob`] ([`Vm::find_job`](crate::Vm::find_job)). What its end
//! changes comes from the operation that starts such a job (`mirror::ends`, `commit::plan`,
//! `stream::ends`), so a found job ends as one started here does.

use std::path::PathBuf;
use std::sync::Arc;

use qhotplug_cmdline::DiskLayer;

use crate::block_job::BlockJob;
use crate::error::Result;
use crate::holds;
use crate::kinds::{Device, DeviceKind};
use crate::vm_core::Core;
use crate::{commit, mirror, stream};

/// What a job found in QEMU was started to do ([`Vm::find_job`](crate::Vm::find_job)): QEMU
/// cannot say it all (a mirror's target was handed over as an fd, so its path is not QEMU's to
/// tell).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobOrigin {
    /// A full mirror to the image at `target` (`mirror-<disk>`).
    Mirror {
        /// The target image.
        target: PathBuf,
        /// Its format.
        format: qhotplug_cmdline::Format,
    },
    /// The active commit of the disk's top into the image under it (`commit-<disk>`).
    ActiveCommit,
    /// A stream of the disk's chain into its top (`stream-<disk>`).
    Stream,
}

/// See [`Vm::find_job`](crate::Vm::find_job).
pub(crate) async fn find(
    core: &Arc<Core>,
    id: &str,
    origin: JobOrigin,
) -> Result<Option<BlockJob>> {
    let (busy, Device::Disk(disk)) = holds::busy_device(core, id, DeviceKind::Disk)? else {
        unreachable!("a disk entry is a disk")
    };
    let events = core.client.events();
    let (job, ends, created) = match origin {
        JobOrigin::Mirror { target, format } => {
            let layer = DiskLayer {
                path: target.clone(),
                format,
                generation: disk.next_generation(),
            };
            let ends = mirror::ends(&disk, &layer, false);
            (format!("mirror-{id}"), ends, Some(target))
        }
        JobOrigin::ActiveCommit => match commit::plan(&disk, None) {
            Some((_, _, ends)) => (format!("commit-{id}"), ends, None),
            None => return Ok(None),
        },
        JobOrigin::Stream => (format!("stream-{id}"), stream::ends(&disk), None),
    };
    if crate::jobs::info(&core.client, &job).await?.is_none() {
        return Ok(None);
    }
    tracing::info!(job, "found a running job");
    let found = BlockJob::new(core, job, events, busy, ends);
    Ok(Some(match created {
        Some(path) => found.created(path),
        None => found,
    }))
}
