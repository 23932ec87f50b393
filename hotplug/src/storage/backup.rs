//! Push backups of one or several disks at once, full or incremental (reference §5.3): for each
//! disk a target image the SDK creates and hands over as an fd (qcow2 by default; an incremental
//! one names the previous backup as its backing file), then one QMP `transaction` that starts
//! every disk's `blockdev-backup` at the same point in time together with its checkpoint
//! bookkeeping ([`checkpoint`](crate::storage::checkpoint)). Several disks' jobs end as a group: QEMU's
//! `completion-mode: grouped` is refused beside bitmap actions, so each job waits in `pending`
//! (`auto-finalize: false`) until all are, then all are made final; one that fails gets the
//! others cancelled (libvirt's way). The [`Backup`] handle
//! holds each disk's job; its end removes the targets' nodes and the temporary bitmap, and, if
//! the backup did not complete, gives the new checkpoint's record back to the one before it and
//! removes the targets' files.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qhotplug_cmdline::{Disk, Format};
use qhotplug_qmp::command::{
    BackupPerf, BlockdevBackup, JobInfo, QmpTransaction, TransactionAction,
};
use qhotplug_qmp::Schema;

use crate::error::{Error, Result};
use crate::storage::backup_prep::{self, Image, Prepared, Wanted};
use crate::storage::block_job::{BlockJob, Ends};
use crate::vm_core::Core;
use qhotplug_cmdline::names::{self, BACKUP_BITMAP};

/// The commands a backup uses besides the checkpoints'.
const COMMANDS: &[&str] = &[
    "blockdev-backup",
    "blockdev-create",
    "transaction",
    "query-jobs",
    "job-cancel",
    "job-dismiss",
];

/// One disk of a backup: where its copy goes, and the previous backup an incremental one stands
/// on (its qcow2 header names it, so the chain restores with `qemu-img`).
#[derive(Debug, Clone)]
struct Target {
    disk: String,
    path: PathBuf,
    previous: Option<PathBuf>,
}

/// A push backup ([`Vm::backup`](crate::Vm::backup)): full, or incremental since a checkpoint;
/// of which disks, to which new files; and the checkpoint it makes, from which the next
/// incremental one can start.
///
/// ```
/// use qhotplug::BackupConfig;
/// let monday = BackupConfig::full()
///     .disk("data-1", "/backups/data-1.mon.qcow2")
///     .checkpoint("mon");
/// let tuesday = BackupConfig::incremental("mon")
///     .disk_onto("data-1", "/backups/data-1.tue.qcow2", "/backups/data-1.mon.qcow2")
///     .checkpoint("tue");
/// # let _ = (monday, tuesday);
/// ```
///
/// How the jobs copy: with the host's copy offloading (`copy_file_range`, QEMU's `x-perf`
/// `use-copy-range`) where QEMU has it, which copies a full backup at `qemu-img convert`'s rate
/// where reading and writing through QEMU's buffers reaches 0.6–0.9 of it (BENCHMARKS.md);
/// QEMU falls back to reading and writing where the images do not allow it (another file
/// system, a network disk, compressed clusters). Otherwise QEMU's defaults: 64 requests in
/// flight, of any size. [`copy_offload`](BackupConfig::copy_offload),
/// [`workers`](BackupConfig::workers) and [`max_chunk`](BackupConfig::max_chunk) change them.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    since: Option<String>,
    targets: Vec<Target>,
    checkpoint: Option<String>,
    format: Format,
    speed: u64,
    copy_offload: bool,
    workers: Option<u32>,
    max_chunk: Option<u64>,
}

impl BackupConfig {
    /// A full backup (every allocated byte of each disk).
    pub fn full() -> BackupConfig {
        BackupConfig {
            since: None,
            targets: Vec::new(),
            checkpoint: None,
            format: Format::Qcow2,
            speed: 0,
            copy_offload: true,
            workers: None,
            max_chunk: None,
        }
    }

    /// An incremental backup: what each disk's guest wrote since checkpoint `since` (which each
    /// disk must have, usable).
    pub fn incremental(since: impl Into<String>) -> BackupConfig {
        BackupConfig {
            since: Some(since.into()),
            ..BackupConfig::full()
        }
    }

    /// Disk `id` is copied into a new image at `target` (which must not exist: the SDK creates
    /// it, of the disk's size).
    pub fn disk(mut self, id: impl Into<String>, target: impl Into<PathBuf>) -> Self {
        self.targets.push(Target {
            disk: id.into(),
            path: target.into(),
            previous: None,
        });
        self
    }

    /// As [`disk`](BackupConfig::disk), the new image's header naming `previous` (the backup the
    /// increment applies to) as its backing file: the chain then reads as the disk did at this
    /// backup's start.
    pub fn disk_onto(
        mut self,
        id: impl Into<String>,
        target: impl Into<PathBuf>,
        previous: impl Into<PathBuf>,
    ) -> Self {
        self.targets.push(Target {
            disk: id.into(),
            path: target.into(),
            previous: Some(previous.into()),
        });
        self
    }

    /// Makes checkpoint `name` on each disk at the backup's point in time (once the backup
    /// completes; a backup that fails or is cancelled leaves the checkpoints as they were). The
    /// disks' images must be qcow2.
    pub fn checkpoint(mut self, name: impl Into<String>) -> Self {
        self.checkpoint = Some(name.into());
        self
    }

    /// The format of a full backup's targets (qcow2 by default; an incremental one is qcow2).
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// A rate limit per disk in bytes per second (0, the default: none).
    pub fn speed(mut self, bytes_per_second: u64) -> Self {
        self.speed = bytes_per_second;
        self
    }

    /// Whether the jobs copy with the host's copy offloading where they can (default: yes, where
    /// QEMU's `blockdev-backup` has `x-perf`; a QEMU without it copies as it always does).
    pub fn copy_offload(mut self, on: bool) -> Self {
        self.copy_offload = on;
        self
    }

    /// How many requests each job keeps in flight (QEMU's default: 64; at least 1). Needs a QEMU
    /// whose `blockdev-backup` has `x-perf` ([`Error::Unsupported`](crate::Error::Unsupported)
    /// otherwise, before anything is made).
    pub fn workers(mut self, requests: u32) -> Self {
        self.workers = Some(requests);
        self
    }

    /// The largest request in bytes (QEMU's default: no limit). Needs `x-perf`, as
    /// [`workers`](BackupConfig::workers) does.
    pub fn max_chunk(mut self, bytes: u64) -> Self {
        self.max_chunk = Some(bytes);
        self
    }

    /// The `x-perf` the jobs get from a QEMU of `schema`: `None` from one without it, unless
    /// the caller asked for workers or a chunk size, which such a QEMU cannot honour.
    fn perf(&self, schema: &Schema) -> Result<Option<BackupPerf>> {
        if self.workers == Some(0) {
            return Err(Error::Precondition {
                operation: "backup",
                reason: "a backup job needs at least one worker".into(),
            });
        }
        if !schema.command_takes("blockdev-backup", "x-perf") {
            if self.workers.is_some() || self.max_chunk.is_some() {
                return Err(Error::Unsupported {
                    command: "blockdev-backup x-perf".into(),
                    operation: "backup",
                });
            }
            return Ok(None);
        }
        Ok(Some(BackupPerf {
            use_copy_range: Some(self.copy_offload),
            max_workers: self.workers,
            max_chunk: self.max_chunk,
        }))
    }
}

/// A backup running: one job per disk ([`Vm::backup`](crate::Vm::backup)). It ends by
/// [`wait`](Backup::wait) or [`cancel`](Backup::cancel); dropped before that, its jobs are
/// cancelled in the background.
#[derive(Debug)]
pub struct Backup {
    jobs: Vec<BlockJob>,
    targets: Vec<PathBuf>,
}

impl Backup {
    /// The disks' jobs (`backup-<disk>`), for their progress, speed, pause and resume.
    pub fn jobs(&self) -> &[BlockJob] {
        &self.jobs
    }

    /// The target files, in the order the disks were given.
    pub fn targets(&self) -> &[PathBuf] {
        &self.targets
    }

    /// Reports each disk's progress to `report` while [`wait`](Backup::wait) waits, as
    /// [`BlockJob::on_progress`] does.
    pub fn on_progress(
        mut self,
        every: Duration,
        report: impl FnMut(&JobInfo) + Send + Clone + 'static,
    ) -> Self {
        self.jobs = self
            .jobs
            .into_iter()
            .map(|job| job.on_progress(every, report.clone()))
            .collect();
        self
    }

    /// Waits, by `timeout` in all, for every disk's copy. Then each disk has the new checkpoint
    /// (`vm.spec()` lists it) and returns as it now is; the targets hold the disks as they were
    /// at the backup's start. If one disk's copy failed, all were cancelled (grouped): the error
    /// is the first failure's, the checkpoints are as before the backup, the target files gone.
    pub async fn wait(mut self, timeout: Duration) -> Result<Vec<Disk>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        if let [_] = &self.jobs[..] {
            let job = self.jobs.pop().expect("one job");
            return Ok(vec![job.wait(left()).await?]);
        }
        // Every job done copying (pending), or the first one that failed.
        let mut failed = None;
        for (at, job) in self.jobs.iter_mut().enumerate() {
            match job.wait_pending(left()).await {
                Ok(info) if info.status == "pending" => {}
                Ok(_) => {
                    failed = Some(Ok(at));
                    break;
                }
                Err(error) => {
                    failed = Some(Err(error));
                    break;
                }
            }
        }
        match failed {
            None => {
                let mut disks = Vec::new();
                for job in self.jobs {
                    disks.push(job.finalize(left()).await?);
                }
                Ok(disks)
            }
            Some(why) => {
                // The failed job's end first (it reads QEMU's error), then the others cancelled.
                let (failed_at, mut first_error) = match why {
                    Ok(at) => (Some(at), None),
                    Err(error) => (None, Some(error)),
                };
                let mut failed_id = String::new();
                if let Some(at) = failed_at {
                    let job = self.jobs.remove(at);
                    failed_id = job.job_id().to_owned();
                    if let Err(error) = job.wait(left()).await {
                        first_error.get_or_insert(error);
                    }
                }
                for job in self.jobs {
                    if let Err(error) = job.cancel().await {
                        first_error.get_or_insert(error);
                    }
                }
                Err(first_error.unwrap_or(Error::JobFailed {
                    id: failed_id,
                    error: "concluded before the others were done".into(),
                }))
            }
        }
    }

    /// Cancels every disk's copy: the checkpoints are as before the backup, the targets gone.
    pub async fn cancel(self) -> Result<()> {
        let mut first_error = None;
        for job in self.jobs {
            if let Err(error) = job.cancel().await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// See [`Vm::backup`](crate::Vm::backup).
pub(crate) async fn start(core: &Arc<Core>, config: BackupConfig) -> Result<Backup> {
    core.require("backup", COMMANDS).await?;
    core.require("backup", crate::storage::checkpoint::COMMANDS)
        .await?;
    let incremental = config.since.is_some();
    let perf = config.perf(&*core.client.schema().await?)?;
    if incremental && config.format != Format::Qcow2 {
        return Err(Error::Precondition {
            operation: "backup",
            reason: "an incremental backup's targets are qcow2".into(),
        });
    }
    let wanted: Vec<Wanted> = config
        .targets
        .iter()
        .map(|t| Wanted {
            disk: t.disk.clone(),
            path: t.path.clone(),
            image: Image::Target {
                format: config.format,
                previous: t.previous.clone(),
            },
        })
        .collect();
    let (mut txn, prepared) = backup_prep::prepare(
        core,
        "backup",
        &wanted,
        config.since.as_deref(),
        config.checkpoint.as_deref(),
    )
    .await?;
    let client = core.client.clone();
    // Each job's events, subscribed to before the transaction starts them.
    let job_events: Vec<_> = prepared.iter().map(|_| client.events()).collect();
    // One point in time for every disk: the temporary bitmaps, the checkpoints, the jobs; several
    // disks' jobs wait for each other in `pending` ([`Backup::wait`]).
    let grouped = prepared.len() > 1;
    let mut actions: Vec<TransactionAction> = Vec::new();
    for Prepared { disk, image, at } in &prepared {
        actions.extend(at.actions.iter().cloned());
        actions.push(TransactionAction::of(&BlockdevBackup {
            job_id: names::backup_job(&disk.id),
            device: disk.top_node(),
            target: disk.with_top(&image.layer).top_node(),
            sync: if incremental { "incremental" } else { "full" }.into(),
            bitmap: incremental.then(|| BACKUP_BITMAP.to_owned()),
            speed: (config.speed > 0).then_some(config.speed),
            auto_finalize: grouped.then_some(false),
            auto_dismiss: Some(false),
            x_perf: perf,
        }));
    }
    let start = QmpTransaction {
        actions,
        properties: None,
    };
    txn.step("transaction", None, client.execute(&start))
        .await?;
    let busy = txn.commit();
    let mut jobs = Vec::new();
    let mut targets = Vec::new();
    let starting = prepared.into_iter().zip(busy).zip(job_events);
    for ((Prepared { image, at, .. }, mark), events) in starting {
        // Checkpoints QEMU no longer has (inconsistent ones the transaction removed) are gone
        // from the spec at once; the new one joins it when the copy completes.
        let id = at.now.id.clone();
        core.state().update(at.now.into());
        let layer = image.keep();
        let nodes: Vec<String> = layer.node_names(&id).into();
        let ends = Ends {
            after: at.after,
            on_complete: nodes.clone(),
            on_abort: nodes,
        };
        let job = BlockJob::new(core, names::backup_job(&id), events, mark, ends)
            .created(layer.path.clone())
            .also_ending(
                at.temporary.clone().into_iter().collect(),
                at.temporary.into_iter().chain(at.undo_checkpoint).collect(),
            );
        targets.push(layer.path);
        jobs.push(job);
    }
    tracing::info!(
        disks = jobs.len(),
        incremental,
        checkpoint = config.checkpoint.as_deref().unwrap_or(""),
        "backup started"
    );
    Ok(Backup { jobs, targets })
}

#[cfg(test)]
mod tests {
    use super::BackupConfig;
    use crate::error::Error;
    use qhotplug_qmp::command::BackupPerf;
    use qhotplug_qmp::Schema;

    /// A schema whose `blockdev-backup` takes `members`.
    fn schema(members: &[&str]) -> Schema {
        let members: Vec<_> = members
            .iter()
            .map(|m| serde_json::json!({"name": m, "type": "any"}))
            .collect();
        let infos = serde_json::json!([
            {"name": "blockdev-backup", "meta-type": "command", "arg-type": "0",
             "ret-type": "any", "allow-oob": false},
            {"name": "0", "meta-type": "object", "members": members},
        ]);
        Schema::from_json(&infos.to_string()).unwrap()
    }

    #[test]
    fn copy_offloading_is_asked_for_where_qemu_has_x_perf_and_the_callers_settings_go_with_it() {
        let with = schema(&["job-id", "x-perf"]);
        let config = BackupConfig::full();
        let asked = config.perf(&with).unwrap();
        assert_eq!(
            asked,
            Some(BackupPerf {
                use_copy_range: Some(true),
                ..BackupPerf::default()
            })
        );
        let tuned = config.copy_offload(false).workers(8).max_chunk(1 << 20);
        assert_eq!(
            tuned.perf(&with).unwrap(),
            Some(BackupPerf {
                use_copy_range: Some(false),
                max_workers: Some(8),
                max_chunk: Some(1 << 20),
            })
        );
    }

    #[test]
    fn a_qemu_without_x_perf_copies_as_always_and_refuses_settings_it_cannot_honour() {
        let without = schema(&["job-id"]);
        assert_eq!(BackupConfig::full().perf(&without).unwrap(), None);
        let none = BackupConfig::full().workers(0).perf(&schema(&["x-perf"]));
        assert!(matches!(none, Err(Error::Precondition { .. })), "{none:?}");
        let offload_off = BackupConfig::full().copy_offload(false);
        assert_eq!(offload_off.perf(&without).unwrap(), None);
        for config in [
            BackupConfig::full().workers(8),
            BackupConfig::full().max_chunk(1 << 20),
        ] {
            let refused = config.perf(&without).unwrap_err();
            assert!(
                matches!(&refused, Error::Unsupported { command, operation: "backup" }
                    if command == "blockdev-backup x-perf"),
                "{refused:?}"
            );
        }
    }
}
