//! Drive mirror: a running disk copied to a new image the SDK creates and opens, then either the
//! disk moved onto the copy (pivot) or the copy kept as a point-in-time image (abandon), as the
//! reference's §4.2–4.3 sequence does.
//!
//! Start: the target file (created, never overwritten), its fd set and nodes under the disk's
//! next generation of names (`<id>-file.<n>`, `<id>-fmt.<n>`; a qcow2 target formatted by QEMU's
//! own `blockdev-create` job), then `blockdev-mirror` with an explicit job id and
//! `auto-dismiss: false`: a transaction, undone if a step fails. The [`MirrorJob`] handle holds
//! the disk's busy mark from then on, so a second job or a hot-remove of the disk is
//! [`Error::Busy`] before anything is sent. Its end: `job-complete` (pivot: the spec's disk moves
//! to the copy and the old nodes go), the soft `block-job-cancel` (abandon: the copy is
//! consistent as of then, its nodes go, the disk stays), or `job-cancel` (the copy is not a copy:
//! its nodes and its file go). A handle dropped before its end cancels the job in the
//! background, as a dropped hot-add rolls back, so nothing is left unmanaged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qhotplug_cmdline::{DeviceModel, Disk, Format};
use qhotplug_qmp::command::{
    BlockJobCancel, BlockJobSetSpeed, BlockdevAdd, BlockdevCreate, BlockdevMirror, JobCancel,
    JobComplete, JobInfo, JobPause, JobResume,
};
use qhotplug_qmp::EventStream;
use tracing::Instrument;

use crate::delete::Delete;
use crate::engine::run_backends;
use crate::error::{Error, Result};
use crate::holds::{self, Busy};
use crate::kinds::{Backend, Device, DeviceKind, Placed};
use crate::transaction::Transaction;
use crate::vm_core::Core;
use crate::{jobs, live};

/// The commands a mirror uses.
const COMMANDS: &[&str] = &[
    "blockdev-mirror",
    "query-jobs",
    "job-complete",
    "job-cancel",
    "job-dismiss",
    "block-job-cancel",
];

/// How long a cancelled or abandoned job may take to conclude.
const END_WAIT: Duration = Duration::from_secs(60);

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
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    target: PathBuf,
    format: Format,
    sync: MirrorSync,
    granularity: Option<u32>,
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

    /// A rate limit in bytes per second (0, the default: none). See [`MirrorJob::set_speed`].
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

/// A running mirror of one disk. It ends by [`pivot`](MirrorJob::pivot),
/// [`abandon`](MirrorJob::abandon) or [`cancel`](MirrorJob::cancel); dropped before that, it is
/// cancelled in the background (the disk stays on its source, the target's nodes and file go).
pub struct MirrorJob {
    core: Arc<Core>,
    job: String,
    /// The disk as it will be after a pivot.
    target: Disk,
    events: Option<EventStream>,
    /// The disk's busy mark, held until the job's end is done with.
    busy: Option<Busy>,
}

impl std::fmt::Debug for MirrorJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorJob")
            .field("job", &self.job)
            .field("target", &self.target.path)
            .finish_non_exhaustive()
    }
}

/// See [`Vm::mirror_disk`](crate::Vm::mirror_disk).
pub(crate) async fn start(core: &Arc<Core>, id: &str, config: MirrorConfig) -> Result<MirrorJob> {
    core.require("drive mirror", COMMANDS).await?;
    let (busy, Device::Disk(disk)) = holds::busy_device(core, id, DeviceKind::Disk)? else {
        unreachable!("a disk entry is a disk")
    };
    if disk.read_only {
        return Err(Error::ReadOnly(id.to_owned()));
    }
    let target = Disk {
        path: config.target.clone(),
        format: config.format,
        generation: disk.generation.wrapping_add(1),
        ..disk.clone()
    };
    target.check()?;
    let size = live::virtual_size(core, &disk).await?;
    // Host-side work first: a target that exists, or cannot be made, changes nothing in QEMU.
    let file = create_target(&config.target, config.format, size)?;
    let created = CreatedFile(Some(config.target.clone()));
    let client = core.client.clone();
    let mut events = client.events();
    let mut txn = Transaction::new(client.clone(), "drive mirror", busy);
    let mut nodes = target.blockdev_add("");
    let format_node = nodes.pop().expect("a disk's format node");
    let backends = vec![
        Backend::Fdset {
            fd: file.into(),
            tag: qhotplug_cmdline::names::fdset_tag(id),
        },
        Backend::Blockdev {
            add: nodes.pop().expect("a disk's protocol node"),
            on_fdset: true,
        },
    ];
    run_backends(&client, &mut txn, backends).await?;
    if config.format == Format::Qcow2 {
        format_qcow2(&client, &mut events, &target, size).await?;
    }
    let format_node = without_backing(format_node, config.format);
    let undo = Delete::BlockNode(target.top_node());
    txn.step("blockdev-add", Some(undo), client.execute(&format_node))
        .await?;
    let job = format!("mirror-{id}");
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
    };
    txn.step("blockdev-mirror", None, client.execute(&mirror))
        .await?;
    let busy = txn.commit();
    created.keep();
    tracing::info!(job, target = %config.target.display(), "mirror started");
    Ok(MirrorJob {
        core: core.clone(),
        job,
        target,
        events: Some(events),
        busy: Some(busy),
    })
}

/// Creates the target file (never an existing one) and opens it read-write. A raw target is made
/// the disk's size here; a qcow2 one is formatted by QEMU.
fn create_target(path: &Path, format: Format, size: u64) -> Result<std::fs::File> {
    let open = |source| Error::Open {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(open)?;
    if format == Format::Raw {
        file.set_len(size).map_err(open)?;
    }
    Ok(file)
}

/// Removes the target file the SDK created unless [`CreatedFile::keep`] was called.
struct CreatedFile(Option<PathBuf>);

impl CreatedFile {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for CreatedFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Formats `target`'s protocol node as a qcow2 image of `size` bytes with QEMU's
/// `blockdev-create` job (no `qemu-img` on the host), waited for and dismissed.
async fn format_qcow2(
    client: &qhotplug_qmp::Client,
    events: &mut EventStream,
    target: &Disk,
    size: u64,
) -> Result<()> {
    let job = format!("create-{}", target.top_node());
    let create = BlockdevCreate {
        job_id: job.clone(),
        options: serde_json::json!({"driver": "qcow2", "file": target.file_node(), "size": size}),
    };
    let span = tracing::debug_span!(crate::spans::STEP, name = "blockdev-create", id = %target.id);
    client.execute(&create).instrument(span).await?;
    jobs::conclude(client, events, &job).await
}

/// A mirror target's format node must have no backing of its own for a full copy: QEMU would
/// open the header's backing file a second time (reference §2.1).
fn without_backing(mut add: BlockdevAdd, format: Format) -> BlockdevAdd {
    if format == Format::Qcow2 {
        add.props.insert("backing".into(), serde_json::Value::Null);
    }
    add
}

impl MirrorJob {
    /// The job's id in QEMU (`mirror-<disk id>`).
    pub fn job_id(&self) -> &str {
        &self.job
    }

    /// The image the disk is copied to.
    pub fn target(&self) -> &Path {
        &self.target.path
    }

    /// The job as `query-jobs` lists it now: status, bytes copied of bytes to copy.
    pub async fn info(&self) -> Result<JobInfo> {
        jobs::info(&self.core.client, &self.job)
            .await?
            .ok_or_else(|| Error::JobGone(self.job.clone()))
    }

    /// Waits until the copy is in sync (`ready`), by `timeout`. A job that failed meanwhile is
    /// [`Error::JobFailed`] (it is dismissed, its target's nodes and file go, the disk stays).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<JobInfo> {
        let events = self.events.as_mut().expect("a running job has its events");
        let job = jobs::wait_status(
            &self.core.client,
            events,
            &self.job,
            "ready",
            |s| s == "ready",
            Some(timeout),
        )
        .await?;
        if job.status == "concluded" {
            self.end(Ending::Failed).await?;
            return Err(Error::JobFailed {
                id: self.job.clone(),
                error: job.error.unwrap_or_else(|| "concluded before ready".into()),
            });
        }
        Ok(job)
    }

    /// Pauses the copy (`job-pause`).
    pub async fn pause(&self) -> Result<()> {
        let pause = JobPause {
            id: self.job.clone(),
        };
        self.core.client.execute(&pause).await?;
        Ok(())
    }

    /// Resumes a paused copy (`job-resume`).
    pub async fn resume(&self) -> Result<()> {
        let resume = JobResume {
            id: self.job.clone(),
        };
        self.core.client.execute(&resume).await?;
        Ok(())
    }

    /// Sets the rate limit in bytes per second (0: none).
    pub async fn set_speed(&self, bytes_per_second: u64) -> Result<()> {
        let speed = BlockJobSetSpeed {
            device: self.job.clone(),
            speed: bytes_per_second,
        };
        self.core.client.execute(&speed).await?;
        Ok(())
    }

    /// Moves the disk onto the copy (`job-complete`; the job must be `ready`): the guest now
    /// runs on the target, `vm.spec()` says so (its path, format and generation of node names),
    /// and the old image's nodes are deleted (the old file is the caller's). Returns the disk as
    /// it now is.
    pub async fn pivot(mut self) -> Result<Disk> {
        let complete = JobComplete {
            id: self.job.clone(),
        };
        let span = tracing::debug_span!(crate::spans::STEP, name = "job-complete", id = %self.job);
        self.core.client.execute(&complete).instrument(span).await?;
        self.end(Ending::Pivot).await?;
        Ok(self.target.clone())
    }

    /// Ends the copy without moving the disk (`block-job-cancel` without `force`, once `ready`):
    /// the target is a consistent image of the disk as of this call, its nodes go, and the disk
    /// goes on where it was. Returns the copy's path. Before `ready` QEMU treats it as
    /// [`cancel`](MirrorJob::cancel): wait for [`wait_ready`](MirrorJob::wait_ready) first.
    pub async fn abandon(mut self) -> Result<PathBuf> {
        let cancel = BlockJobCancel {
            device: self.job.clone(),
            force: None,
        };
        let span =
            tracing::debug_span!(crate::spans::STEP, name = "block-job-cancel", id = %self.job);
        self.core.client.execute(&cancel).instrument(span).await?;
        self.end(Ending::Abandon).await?;
        Ok(self.target.path.clone())
    }

    /// Stops the copy (`job-cancel`, the forced cancel): the disk stays where it was, the
    /// target's nodes go, and so does its file (it is no copy).
    pub async fn cancel(mut self) -> Result<()> {
        cancel_job(&self.core, &self.job).await?;
        self.end(Ending::Cancel).await
    }

    /// The job's end, once asked for: concluded (its error read), dismissed, then the nodes that
    /// are no longer the disk's deleted, the spec updated on a pivot, the busy mark released.
    async fn end(&mut self, ending: Ending) -> Result<()> {
        let mut events = self.events.take().expect("a job ends once");
        let busy = self.busy.take();
        finish(&self.core, &mut events, &self.job, &self.target, ending).await?;
        drop(busy);
        Ok(())
    }
}

/// How a mirror's end was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Pivot,
    Abandon,
    Cancel,
    /// It failed by itself.
    Failed,
}

/// Sends the forced cancel; a job already concluded or gone counts as done.
async fn cancel_job(core: &Core, job: &str) -> Result<()> {
    let cancel = JobCancel { id: job.to_owned() };
    let span = tracing::debug_span!(crate::spans::STEP, name = "job-cancel", id = %job);
    match core.client.execute(&cancel).instrument(span).await {
        Ok(_) => Ok(()),
        Err(e) => match jobs::info(&core.client, job).await? {
            None => Ok(()),
            Some(j) if j.status == "concluded" => Ok(()),
            Some(_) => Err(e.into()),
        },
    }
}

/// See [`MirrorJob::end`].
async fn finish(
    core: &Core,
    events: &mut EventStream,
    job: &str,
    target: &Disk,
    ending: Ending,
) -> Result<()> {
    let outcome = tokio::time::timeout(END_WAIT, jobs::conclude(&core.client, events, job))
        .await
        .map_err(|_| Error::JobTimeout {
            id: job.to_owned(),
            status: "running".into(),
            want: "concluded",
            after: END_WAIT,
        })?;
    let pivoted = ending == Ending::Pivot && outcome.is_ok();
    let old = match core.state().device(&target.id) {
        Some(Device::Disk(old)) => old,
        _ => unreachable!("a disk with a running job stays (it is busy)"),
    };
    let (gone, kept) = if pivoted {
        core.state().update(target.clone().into());
        (old, target.clone())
    } else {
        (target.clone(), old)
    };
    for step in gone.teardown() {
        let span = tracing::debug_span!(crate::spans::STEP, name = step.command(), id = %kept.id);
        if let Err(error) = step.run(&core.client).instrument(span).await {
            tracing::warn!(%step, %error, "a mirror's node left for reconcile");
            core.state().touched.insert(kept.id.clone());
        }
    }
    if matches!(ending, Ending::Cancel | Ending::Failed) {
        let _ = std::fs::remove_file(&target.path);
    }
    match (ending, outcome) {
        // A forced cancel's "error" is the cancel itself.
        (Ending::Cancel, _) => Ok(()),
        (_, outcome) => outcome,
    }
}

impl Drop for MirrorJob {
    fn drop(&mut self) {
        let Some(mut events) = self.events.take() else {
            return;
        };
        let busy = self.busy.take();
        let core = self.core.clone();
        let job = self.job.clone();
        let target = self.target.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let span = tracing::info_span!(crate::spans::ROLLBACK, id = %target.id, reason = "mirror handle dropped");
        let task = runtime.spawn(
            async move {
                if let Err(error) = cancel_job(&core, &job).await {
                    tracing::warn!(%error, "the dropped mirror could not be cancelled");
                }
                if let Err(error) = finish(&core, &mut events, &job, &target, Ending::Cancel).await
                {
                    tracing::warn!(%error, "the dropped mirror's end was not clean");
                }
                drop(busy);
            }
            .instrument(span),
        );
        self.core.track_rollback(task);
    }
}
