//! [`BlockJob`]: the handle of a storage job on one disk (a mirror, a commit, a stream), and the
//! one place a job's end changes the SDK's view.
//!
//! An operation starts its job (a transaction up to the start command, [`jobs`]), then hands the
//! handle what it knows: the disk as it will be once the job completes, the nodes that go then,
//! the nodes that go if it is abandoned or cancelled, and a file it created for the job. The
//! handle holds the disk's busy mark until the end is done with, so one disk runs one job at a
//! time and cannot be hot-removed meanwhile. A handle dropped before its end cancels the job in
//! a background task that `reconcile` waits for, as a dropped hot-add rolls back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qhotplug_cmdline::Disk;
use qhotplug_qmp::command::{
    BlockJobCancel, BlockJobSetSpeed, JobComplete, JobFinalize, JobInfo, JobPause, JobResume,
};
use qhotplug_qmp::EventStream;
use tracing::Instrument;

use crate::engine::holds::{Busy, Hold};
use crate::error::{Error, Result};
use crate::qemu::delete::Delete;
use crate::qemu::jobs;
use crate::vm_core::{clean_up_after_drop, Core};

/// How long a job asked to end may take to conclude.
const END_WAIT: Duration = Duration::from_secs(60);

/// A running storage job on one disk. It ends by [`pivot`](BlockJob::pivot) (a mirror, an active
/// commit), [`wait`](BlockJob::wait) (a job that completes by itself: a stream, an intermediate
/// commit, a backup), [`abandon`](BlockJob::abandon) (a mirror kept as a point-in-time copy) or
/// [`cancel`](BlockJob::cancel); dropped before that, it is cancelled in the background.
pub struct BlockJob {
    core: Arc<Core>,
    job: String,
    /// The disk as it is once the job completes.
    after: Disk,
    /// What goes once it completes: the nodes the disk no longer uses.
    on_complete: Vec<Delete>,
    /// What goes if it is abandoned or cancelled: the nodes the job added.
    on_abort: Vec<Delete>,
    /// A file the SDK created for the job (a mirror's target), removed if the job is cancelled.
    created: Option<PathBuf>,
    events: Option<EventStream>,
    /// The disk's busy mark, held until the job's end is done with.
    busy: Option<Busy>,
    /// Called with the job's progress while a wait runs ([`BlockJob::on_progress`]).
    progress: Option<(Duration, ProgressFn)>,
}

/// A progress callback (in a mutex only so that the handle is `Sync`: it is called through
/// `&mut`, never locked).
type ProgressFn = std::sync::Mutex<Box<dyn FnMut(&JobInfo) + Send>>;

impl std::fmt::Debug for BlockJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockJob")
            .field("job", &self.job)
            .field("disk", &self.after.id)
            .finish_non_exhaustive()
    }
}

/// What a job's end changes, as the operation that starts it says: the disk as it is once the
/// job completes, the nodes that go then, and the nodes that go if it is abandoned or cancelled.
/// Each operation has one function that says it, for its start and for [`find`] alike.
pub(crate) struct Ends {
    pub(crate) after: Disk,
    pub(crate) on_complete: Vec<String>,
    pub(crate) on_abort: Vec<String>,
}

/// How a job's end was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// `job-complete`, or a job that completes by itself.
    Complete,
    /// The soft cancel of a ready mirror: completed, but the disk stays.
    Abandon,
    /// `job-cancel`.
    Cancel,
    /// It failed by itself.
    Failed,
}

impl BlockJob {
    /// The handle of job `job` just started on the disk `busy` marks; `ends`: what its end changes.
    pub(crate) fn new(
        core: &Arc<Core>,
        job: String,
        events: EventStream,
        busy: Busy,
        ends: Ends,
    ) -> BlockJob {
        let deletes = |nodes: Vec<String>| nodes.into_iter().map(Delete::BlockNode).collect();
        BlockJob {
            core: core.clone(),
            job,
            after: ends.after,
            on_complete: deletes(ends.on_complete),
            on_abort: deletes(ends.on_abort),
            created: None,
            events: Some(events),
            busy: Some(busy),
            progress: None,
        }
    }

    /// Reports the job's progress to `report` while [`wait_ready`](BlockJob::wait_ready) or
    /// [`wait`](BlockJob::wait) waits: what `query-jobs` says (status, bytes done of
    /// bytes to do) at each status change and every `every` between them, as
    /// [`Vm::migrate`](crate::Vm::migrate) reports a migration's passes.
    ///
    /// ```no_run
    /// # async fn demo(vm: &qhotplug::Vm) -> qhotplug::Result<()> {
    /// use std::time::Duration;
    /// let mut job = vm.commit_disk("data-1").await?.on_progress(
    ///     Duration::from_millis(500),
    ///     |p| println!("{} {}: {} of {} bytes", p.id, p.status, p.current_progress, p.total_progress),
    /// );
    /// job.wait_ready(Duration::from_secs(60)).await?;
    /// job.pivot().await?;
    /// # Ok(()) }
    /// ```
    pub fn on_progress(
        mut self,
        every: Duration,
        report: impl FnMut(&JobInfo) + Send + 'static,
    ) -> Self {
        self.progress = Some((every, std::sync::Mutex::new(Box::new(report))));
        self
    }

    /// Waits, by `timeout`, for the job to reach status `want` (or `concluded`), reporting its
    /// progress meanwhile if asked.
    async fn status_by(&mut self, want: &'static str, timeout: Duration) -> Result<JobInfo> {
        let events = self.events.as_mut().expect("a running job has its events");
        let progress = self
            .progress
            .as_mut()
            .map(|(every, report)| jobs::Progress {
                every: *every,
                report: report
                    .get_mut()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .as_mut(),
            });
        let accept = |status: &str| status == want;
        let client = &self.core.client;
        jobs::wait_status(
            client,
            events,
            &self.job,
            want,
            accept,
            Some(timeout),
            progress,
        )
        .await
    }

    /// A file the SDK created for the job, removed if it is cancelled.
    pub(crate) fn created(mut self, path: PathBuf) -> Self {
        self.created = Some(path);
        self
    }

    /// More to delete at the job's end beyond its nodes: `on_complete` if it completes,
    /// `on_abort` otherwise (a backup's temporary bitmap, its checkpoint's undo).
    pub(crate) fn also_ending(mut self, on_complete: Vec<Delete>, on_abort: Vec<Delete>) -> Self {
        self.on_complete.extend(on_complete);
        self.on_abort.extend(on_abort);
        self
    }

    /// The job's id in QEMU (`mirror-<disk>`, `commit-<disk>`, `stream-<disk>`, `backup-<disk>`).
    pub fn job_id(&self) -> &str {
        &self.job
    }

    /// The disk as it will be once the job completes (its image, format and backing chain).
    pub fn disk_after(&self) -> &Disk {
        &self.after
    }

    /// The job as `query-jobs` lists it now: status, and progress (bytes done of bytes to do).
    pub async fn info(&self) -> Result<JobInfo> {
        jobs::info(&self.core.client, &self.job)
            .await?
            .ok_or_else(|| Error::JobGone(self.job.clone()))
    }

    /// A disconnect while the job ran, as what it means for the disk: [`Error::JobInterrupted`].
    fn interrupted(&self, error: Error) -> Error {
        match &error {
            Error::Qmp(e) if e.is_disconnected() => Error::JobInterrupted {
                id: self.job.clone(),
                disk: self.after.id.clone(),
                partial: self.created.clone(),
            },
            _ => error,
        }
    }

    /// Waits until the job is `ready` (a mirror in sync, an active commit caught up), by
    /// `timeout`. A job that failed meanwhile is [`Error::JobFailed`] (dismissed, and what it
    /// added is gone). Here and in every end, QEMU gone is [`Error::JobInterrupted`].
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<JobInfo> {
        let ready = self.ready_by(timeout).await;
        ready.map_err(|e| self.interrupted(e))
    }

    async fn ready_by(&mut self, timeout: Duration) -> Result<JobInfo> {
        let job = self.status_by("ready", timeout).await?;
        if job.status == "concluded" {
            self.end(Ending::Failed).await?;
            return Err(Error::JobFailed {
                id: self.job.clone(),
                error: job.error.unwrap_or_else(|| "concluded before ready".into()),
            });
        }
        Ok(job)
    }

    /// Pauses the job (`job-pause`).
    pub async fn pause(&self) -> Result<()> {
        let pause = JobPause {
            id: self.job.clone(),
        };
        self.core.client.execute(&pause).await?;
        Ok(())
    }

    /// Resumes a paused job (`job-resume`).
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

    /// Ends a `ready` mirror or active commit by its switch (`job-complete`): the disk now runs on
    /// the mirror's copy, or on the commit's base, `vm.spec()` says so, and the nodes the disk no
    /// longer uses are deleted (their files are the caller's). Returns the disk as it now is.
    pub async fn pivot(mut self) -> Result<Disk> {
        let pivoted = self.pivot_now().await;
        pivoted.map_err(|e| self.interrupted(e))
    }

    async fn pivot_now(&mut self) -> Result<Disk> {
        let complete = JobComplete {
            id: self.job.clone(),
        };
        let span = tracing::debug_span!(crate::spans::STEP, name = "job-complete", id = %self.job);
        self.core.client.execute(&complete).instrument(span).await?;
        self.end(Ending::Complete).await?;
        Ok(self.after.clone())
    }

    /// Waits, by `timeout`, for a job that completes by itself (a stream, an intermediate
    /// commit); then the spec has the disk's new chain and the nodes it no longer uses are
    /// deleted. Returns the disk as it now is.
    pub async fn wait(mut self, timeout: Duration) -> Result<Disk> {
        let done = self.wait_by(timeout).await;
        done.map_err(|e| self.interrupted(e))
    }

    async fn wait_by(&mut self, timeout: Duration) -> Result<Disk> {
        let job = self.status_by("concluded", timeout).await?;
        // Concluded with an error, it failed: what it added goes, a file made for it too.
        let ending = match job.error {
            Some(_) => Ending::Failed,
            None => Ending::Complete,
        };
        self.end(ending).await?;
        Ok(self.after.clone())
    }

    /// Waits, by `timeout`, until a job started with `auto-finalize: false` is `pending` (its
    /// work done, its changes not yet final), or concluded (it failed): what `query-jobs` says.
    pub(crate) async fn wait_pending(&mut self, timeout: Duration) -> Result<JobInfo> {
        let pending = self.status_by("pending", timeout).await;
        pending.map_err(|e| self.interrupted(e))
    }

    /// Makes a `pending` job final (`job-finalize`) and waits for its end, as
    /// [`wait`](BlockJob::wait).
    pub(crate) async fn finalize(self, timeout: Duration) -> Result<Disk> {
        let finalize = JobFinalize {
            id: self.job.clone(),
        };
        let span = tracing::debug_span!(crate::spans::STEP, name = "job-finalize", id = %self.job);
        if let Err(error) = self.core.client.execute(&finalize).instrument(span).await {
            return Err(self.interrupted(error.into()));
        }
        self.wait(timeout).await
    }

    /// Ends a `ready` mirror without moving the disk (`block-job-cancel` without `force`): the
    /// target is a consistent image of the disk as of this call, its nodes go, the disk goes on
    /// where it was. Returns the copy's path. Before `ready`, QEMU treats it as a cancel.
    pub async fn abandon(mut self) -> Result<PathBuf> {
        let abandoned = self.abandon_now().await;
        abandoned.map_err(|e| self.interrupted(e))
    }

    async fn abandon_now(&mut self) -> Result<PathBuf> {
        let cancel = BlockJobCancel {
            device: self.job.clone(),
            force: None,
        };
        let span =
            tracing::debug_span!(crate::spans::STEP, name = "block-job-cancel", id = %self.job);
        self.core.client.execute(&cancel).instrument(span).await?;
        self.end(Ending::Abandon).await?;
        Ok(self.after.path.clone())
    }

    /// Stops the job (`job-cancel`, the forced cancel): the disk stays as it was; what the job
    /// added goes, and so does a file the SDK created for it (a mirror's target is no copy).
    pub async fn cancel(mut self) -> Result<()> {
        let cancelled = async {
            jobs::cancel(&self.core.client, &self.job).await?;
            self.end(Ending::Cancel).await
        }
        .await;
        cancelled.map_err(|e| self.interrupted(e))
    }

    async fn end(&mut self, ending: Ending) -> Result<()> {
        let mut events = self.events.take().expect("a job ends once");
        let busy = self.busy.take();
        let result = self.finish(&mut events, ending).await;
        drop(busy);
        result
    }

    /// Concluded (its error read), dismissed; then on completion the spec takes the disk as it
    /// is now and the nodes it left go; otherwise what the job added goes.
    async fn finish(&self, events: &mut EventStream, ending: Ending) -> Result<()> {
        let core = &self.core;
        let outcome =
            tokio::time::timeout(END_WAIT, jobs::conclude(&core.client, events, &self.job))
                .await
                .map_err(|_| Error::JobTimeout {
                    id: self.job.clone(),
                    status: "running".into(),
                    want: "concluded",
                    after: END_WAIT,
                })?;
        // QEMU's word decides whether the disk moved (a mirror's pivot, an active commit): the
        // image its device runs on now. A job that leaves the top where it is (a stream, an
        // intermediate commit) completed if it ended without an error.
        let before = match core.state().device(&self.after.id) {
            Some(crate::kinds::Device::Disk(disk)) => disk.top_node(),
            _ => String::new(),
        };
        let completed = if before != self.after.top_node() {
            roots(core).await?.contains(&self.after.top_node())
        } else {
            ending == Ending::Complete && outcome.is_ok()
        };
        if completed {
            core.state().update(self.after.clone().into());
        }
        let gone = if completed {
            &self.on_complete
        } else {
            &self.on_abort
        };
        let id = &self.after.id;
        // Then the fd sets of the images no node opens any more (the old chain after a pivot,
        // merged layers, an abandoned or finished copy's target).
        let sweep = Delete::UnusedFdsets(qhotplug_cmdline::names::fdset_tag(id));
        for step in gone.iter().chain([&sweep]) {
            let span = tracing::debug_span!(crate::spans::STEP, name = step.command(), id = %id);
            if let Err(error) = step.run(&core.client).instrument(span).await {
                tracing::warn!(%step, %error, "a job's node left for reconcile");
                core.state().touched.insert(id.clone());
            }
        }
        // A job found concluded may have switched the disk before its process died: a cancel
        // then keeps the file the disk now runs on.
        if !completed && matches!(ending, Ending::Cancel | Ending::Failed) {
            if let Some(path) = &self.created {
                let _ = std::fs::remove_file(path);
            }
        }
        match (ending, outcome) {
            // A forced cancel's "error" is the cancel itself.
            (Ending::Cancel, _) => Ok(()),
            (_, outcome) => outcome,
        }
    }
}

/// The nodes QEMU's block devices run on (`query-block`).
async fn roots(core: &Core) -> Result<Vec<String>> {
    Ok(crate::qemu::block::Blocks::read(&core.client)
        .await?
        .roots())
}

impl Drop for BlockJob {
    fn drop(&mut self) {
        let Some(mut events) = self.events.take() else {
            return;
        };
        let busy = self.busy.take();
        let job = BlockJob {
            core: self.core.clone(),
            job: self.job.clone(),
            after: self.after.clone(),
            on_complete: Vec::new(),
            on_abort: std::mem::take(&mut self.on_abort),
            created: self.created.take(),
            events: None,
            busy: None,
            progress: None,
        };
        let cancelled = clean_up_after_drop(
            Some(&self.core),
            &self.after.id,
            "job handle dropped",
            busy,
            |busy| async move {
                if let Err(error) = jobs::cancel(&job.core.client, &job.job).await {
                    tracing::warn!(%error, "the dropped job could not be cancelled");
                }
                if let Err(error) = job.finish(&mut events, Ending::Cancel).await {
                    tracing::warn!(%error, "the dropped job's end was not clean");
                }
                drop(busy);
            },
        );
        // The job runs on: the disk stays busy until a reconcile.
        if let Err(Some(busy)) = cancelled {
            busy.leak();
        }
    }
}
