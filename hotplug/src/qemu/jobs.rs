//! QEMU's jobs as the SDK drives them (`../shared/reference/block-jobs-snapshots-backup.md` §0,
//! §1): every job starts with an explicit id and `auto-dismiss: false`, with events subscribed
//! to before the start command; a status is waited for through `JOB_STATUS_CHANGE`, and
//! `query-jobs` is the truth (at the start of a wait, after each event for the job, after lost
//! events); the outcome is read from `query-jobs` at `concluded`, then the job is dismissed.

use std::time::Duration;

use futures::StreamExt;
use qhotplug_qmp::command::{JobDismiss, JobInfo, QueryJobs};
use qhotplug_qmp::{Client, EventKind, EventStream};
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{Error, Result};

/// Job `id` as `query-jobs` lists it, `None` once it is gone.
pub(crate) async fn info(client: &Client, id: &str) -> Result<Option<JobInfo>> {
    Ok(client
        .execute(&QueryJobs)
        .await?
        .into_iter()
        .find(|j| j.id == id))
}

/// How a wait reports a job's progress: `report` called with what `query-jobs` says at each
/// status change and every `every` between them.
pub(crate) struct Progress<'a> {
    pub(crate) every: Duration,
    pub(crate) report: &'a mut (dyn FnMut(&JobInfo) + Send),
}

/// Waits for job `id` to reach a status `want` accepts, or `concluded`, by `after` (`None`: no
/// deadline), reporting its progress meanwhile if asked. [`Error::JobGone`] if it vanished,
/// [`Error::JobTimeout`] at the deadline.
pub(crate) async fn wait_status(
    client: &Client,
    events: &mut EventStream,
    id: &str,
    want: &'static str,
    accept: impl Fn(&str) -> bool,
    after: Option<Duration>,
    mut progress: Option<Progress<'_>>,
) -> Result<JobInfo> {
    let deadline = after.map(|a| Instant::now() + a);
    let span = tracing::debug_span!(crate::spans::STEP, name = "wait JOB_STATUS_CHANGE", id);
    async move {
        loop {
            let job = info(client, id)
                .await?
                .ok_or_else(|| Error::JobGone(id.to_owned()))?;
            if let Some(p) = progress.as_mut() {
                (p.report)(&job);
            }
            if accept(&job.status) || job.status == "concluded" {
                return Ok(job);
            }
            // The next change of this job, lost events, or the next progress report: then ask
            // QEMU again.
            let every = progress.as_ref().map(|p| p.every);
            let changed = async {
                let tick = async {
                    match every {
                        Some(every) => tokio::time::sleep(every).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::pin!(tick);
                loop {
                    let item = tokio::select! {
                        item = events.next() => item,
                        () = &mut tick => return true,
                    };
                    match item {
                        Some(Ok(e)) => {
                            if matches!(e.kind(), EventKind::JobStatusChange(c) if c.id == id) {
                                return true;
                            }
                        }
                        Some(Err(_)) => return true,
                        None => return false,
                    }
                }
            };
            let changed = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, changed).await,
                None => Ok(changed.await),
            };
            match changed {
                Ok(true) => {}
                Ok(false) => return Err(Error::JobGone(id.to_owned())),
                Err(_) => {
                    return Err(Error::JobTimeout {
                        id: id.to_owned(),
                        status: job.status,
                        want,
                        after: after.unwrap_or_default(),
                    })
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Waits for job `id` to conclude, reads its error, and dismisses it: `Ok(())` when it ended
/// without one.
pub(crate) async fn conclude(client: &Client, events: &mut EventStream, id: &str) -> Result<()> {
    let job = wait_status(client, events, id, "concluded", |_| false, None, None).await?;
    let span = tracing::debug_span!(crate::spans::STEP, name = "job-dismiss", id);
    client
        .execute(&JobDismiss { id: id.to_owned() })
        .instrument(span)
        .await?;
    match job.error {
        Some(error) => Err(Error::JobFailed {
            id: id.to_owned(),
            error,
        }),
        None => Ok(()),
    }
}

/// Sends the forced cancel (`job-cancel`) of job `id`. `Ok(false)` when there was no such job;
/// one that had already concluded counts as cancelled.
pub(crate) async fn cancel(client: &Client, id: &str) -> Result<bool> {
    let cancel = qhotplug_qmp::command::JobCancel { id: id.to_owned() };
    let span = tracing::debug_span!(crate::spans::STEP, name = "job-cancel", id);
    match client.execute(&cancel).instrument(span).await {
        Ok(_) => Ok(true),
        Err(e) => match info(client, id).await? {
            None => Ok(false),
            Some(j) if j.status == "concluded" => Ok(true),
            Some(_) => Err(e.into()),
        },
    }
}

/// Storage jobs and snapshots work on disks of local images: a network disk's layers would need
/// a backend each in the chain the spec records, which it does not have yet.
pub(crate) fn require_local(operation: &'static str, disk: &qhotplug_cmdline::Disk) -> Result<()> {
    match disk.network_source() {
        None => Ok(()),
        Some(source) => Err(Error::Precondition {
            operation,
            reason: format!(
                "{}: snapshots and storage jobs need a local image; this disk is on {}",
                disk.id,
                source.driver()
            ),
        }),
    }
}
