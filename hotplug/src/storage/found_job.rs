//! The restart path of storage jobs: a job an earlier process started on a disk, found in QEMU
//! and given back as a [`BlockJob`] ([`Vm::find_job`](crate::Vm::find_job), and every one at
//! once: [`Vm::jobs`](crate::Vm::jobs)). What its end changes comes from the operation that
//! starts such a job (`mirror::ends`, `commit::plan`, `stream::ends`), so a found job ends as one
//! started here does.
//!
//! What a job was started to do is read from its id (the SDK names every job it starts after
//! its operation and disk) and, for a mirror, from the kernel: its target went to QEMU as an fd
//! in the disk's fd sets, and `/proc/<qemu>/fd` says which file that fd is.

use std::path::PathBuf;
use std::sync::Arc;

use qhotplug_cmdline::{names, Disk, DiskLayer, Format};
use qhotplug_qmp::command::{JobInfo, QueryJobs};

use crate::engine::holds::{self, Busy, Hold};
use crate::error::Result;
use crate::kinds::{Device, DeviceKind};
use crate::qemu::fd_files::fd_files;
use crate::storage::block_job::BlockJob;
use crate::storage::{commit, mirror, stream};
use crate::vm_core::Core;

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
    /// The commit of backing layer `layer` ([`Disk::backing`](qhotplug_cmdline::Disk::backing),
    /// 0 the nearest) into the layer under it (`commit-<disk>-gen<n>`, `n` the layer's
    /// generation).
    LayerCommit {
        /// The committed layer's index.
        layer: usize,
    },
    /// A stream of the disk's chain into its top (`stream-<disk>`).
    Stream,
}

/// See [`Vm::find_job`](crate::Vm::find_job).
pub(crate) async fn find(
    core: &Arc<Core>,
    id: &str,
    origin: JobOrigin,
) -> Result<Option<BlockJob>> {
    // Marked busy before QEMU is asked, so no other call starts a job on the disk meanwhile.
    let busy = holds::mark_busy(core, id, DeviceKind::Disk)?;
    let listed = core.client.execute(&QueryJobs).await?;
    Ok(handle(core, busy, origin, &listed))
}

/// The handle of the job `origin` says on the disk `busy` marks, if `listed` (QEMU's jobs) has
/// it. Nothing here awaits: a handle is made only where it is returned, so a caller that gives
/// up part-way cancels no job.
fn handle(core: &Arc<Core>, busy: Busy, origin: JobOrigin, listed: &[JobInfo]) -> Option<BlockJob> {
    let Some(Device::Disk(disk)) = core.state().device(busy.id()) else {
        unreachable!("a disk marked busy is a disk of the spec")
    };
    let id = &disk.id;
    let (job, ends, created) = match origin {
        JobOrigin::Mirror { target, format } => {
            let layer = DiskLayer {
                path: target.clone(),
                format,
                generation: disk.next_generation(),
                checkpoints: Vec::new(),
            };
            let ends = mirror::ends(&disk, &layer, false);
            (names::mirror_job(id), ends, Some(target))
        }
        JobOrigin::ActiveCommit => {
            let (_, _, ends) = commit::plan(&disk, None)?;
            (names::commit_job(id, None), ends, None)
        }
        JobOrigin::LayerCommit { layer } => {
            let (top, _, ends) = commit::plan(&disk, Some(layer))?;
            (names::commit_job(id, Some(top.generation)), ends, None)
        }
        JobOrigin::Stream => (names::stream_job(id), stream::ends(&disk), None),
    };
    let info = listed.iter().find(|j| j.id == job)?;
    tracing::info!(job, status = %info.status, "found a job");
    let found = BlockJob::new(core, job, core.client.events(), busy, ends);
    Some(match created {
        Some(path) => found.created(path),
        None => found,
    })
}

/// See [`Vm::jobs`](crate::Vm::jobs): the jobs QEMU has that this SDK started on a disk of the
/// spec, as handles. A job of the SDK's whose origin cannot be told (a mirror whose target fd
/// is not found) is left alone, with a warning, for [`Vm::find_job`](crate::Vm::find_job).
pub(crate) async fn all(core: &Arc<Core>) -> Result<Vec<BlockJob>> {
    let disks = core.state().spec().disks.clone();
    let listed = core.client.execute(&QueryJobs).await?;
    let mut origins = Vec::new();
    for job in &listed {
        let Some((disk, origin)) = origin_of(&job.id, &disks) else {
            tracing::info!(job = %job.id, "a job the SDK did not start: left alone");
            continue;
        };
        let origin = match origin {
            Some(origin) => origin,
            None => match mirror_target(core, disk).await? {
                Some((target, format)) => JobOrigin::Mirror { target, format },
                None => {
                    tracing::warn!(job = %job.id, "a mirror whose target is not found: left for find_job");
                    continue;
                }
            },
        };
        origins.push((disk.id.clone(), origin));
    }
    // The handles, with no await from here on (see `handle`). A disk already busy has its job's
    // handle here already.
    Ok(origins
        .into_iter()
        .filter_map(|(disk, origin)| {
            let busy = holds::mark_busy(core, &disk, DeviceKind::Disk).ok()?;
            handle(core, busy, origin, &listed)
        })
        .collect())
}

/// The disk job `id` runs on and what it was started to do, by the SDK's job names (an exact
/// name first); `Some(None)`: a mirror, whose target is QEMU's fd.
fn origin_of<'a>(id: &str, disks: &'a [Disk]) -> Option<(&'a Disk, Option<JobOrigin>)> {
    let exact = disks.iter().find_map(|d| {
        let origin = if id == names::mirror_job(&d.id) {
            None
        } else if id == names::commit_job(&d.id, None) {
            Some(JobOrigin::ActiveCommit)
        } else if id == names::stream_job(&d.id) {
            Some(JobOrigin::Stream)
        } else {
            return None;
        };
        Some((d, origin))
    });
    exact.or_else(|| {
        disks.iter().find_map(|d| {
            let layer = d
                .backing
                .iter()
                .position(|l| id == names::commit_job(&d.id, Some(l.generation)))?;
            Some((d, Some(JobOrigin::LayerCommit { layer })))
        })
    })
}

/// A mirror's target on `disk`: the one file in the disk's fd sets that is not an image of its
/// chain (every image's fd stays in its set while its nodes are open), and its format (qcow2 by
/// its magic, else raw). `None` when there is not exactly one such file.
async fn mirror_target(core: &Core, disk: &Disk) -> Result<Option<(PathBuf, Format)>> {
    let chain: Vec<PathBuf> = disk
        .image_paths()
        .into_iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    let mut targets = held_files(core, &disk.id).await?;
    targets.retain(|path| !chain.contains(path));
    let [target] = &targets[..] else {
        return Ok(None);
    };
    let format = crate::kinds::disk::format_of(target);
    Ok(Some((target.clone(), format)))
}

/// The files behind the fds in disk `id`'s fd sets (`/proc/<qemu>/fd`). Empty when QEMU's
/// process is not known: it is ours if the SDK launched it, else the monitor socket's peer.
async fn held_files(core: &Core, id: &str) -> Result<Vec<PathBuf>> {
    let tag = names::fdset_tag(id);
    Ok(fd_files(&core.client, core.qemu_pid())
        .await?
        .into_iter()
        .filter(|f| f.tag.as_ref() == Some(&tag))
        .map(|f| f.path)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fixtures::chain;

    #[test]
    fn a_jobs_id_says_which_disk_and_what_started_it() {
        let disks = [chain()];
        let origin = |id: &str| origin_of(id, &disks).map(|(d, o)| (d.id.clone(), o));
        assert_eq!(origin("mirror-d"), Some(("d".into(), None)));
        assert_eq!(
            origin("commit-d"),
            Some(("d".into(), Some(JobOrigin::ActiveCommit)))
        );
        assert_eq!(
            origin("stream-d"),
            Some(("d".into(), Some(JobOrigin::Stream)))
        );
        // commit-<disk>-gen<n> names the layer by its generation: layer 0 is generation 1.
        assert_eq!(
            origin("commit-d-gen1"),
            Some(("d".into(), Some(JobOrigin::LayerCommit { layer: 0 })))
        );
        assert_eq!(
            origin("commit-d-gen0"),
            Some(("d".into(), Some(JobOrigin::LayerCommit { layer: 1 })))
        );
        assert_eq!(origin("commit-d-gen7"), None);
        assert_eq!(origin("backup-d"), None);
        assert_eq!(origin("mirror-e"), None);
    }
}
