//! Jobs (`qapi/job.json`) and the block jobs that start them: `query-jobs`, the `job-*` verbs,
//! the `block-job-*` commands that have no `job-*` equivalent (the soft cancel, the speed),
//! `blockdev-mirror` and `blockdev-create`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Empty;

command!(
    /// `query-jobs`: every job, block jobs and `blockdev-create` alike, with its status and
    /// progress, and its error once it concluded (until dismissed).
    "query-jobs", QueryJobs, Vec<JobInfo>
);

command!(
    /// `job-pause`: pauses a job (it goes on when resumed).
    "job-pause", JobPause {
        /// The job's id.
        id: String,
    } -> Empty
);

command!(
    /// `job-resume`: resumes a paused job.
    "job-resume", JobResume {
        /// The job's id.
        id: String,
    } -> Empty
);

command!(
    /// `job-complete`: ends a `ready` job by its completion step (a mirror's pivot, an active
    /// commit's switch to the base).
    "job-complete", JobComplete {
        /// The job's id.
        id: String,
    } -> Empty
);

command!(
    /// `job-cancel`: the forced cancel (a mirror's target is then not a consistent copy).
    "job-cancel", JobCancel {
        /// The job's id.
        id: String,
    } -> Empty
);

command!(
    /// `job-finalize`: lets a `pending` job (started with `auto-finalize: false`) make its
    /// changes final and conclude.
    "job-finalize", JobFinalize {
        /// The job's id.
        id: String,
    } -> Empty
);

command!(
    /// `job-dismiss`: forgets a `concluded` job (started with `auto-dismiss: false`).
    "job-dismiss", JobDismiss {
        /// The job's id.
        id: String,
    } -> Empty
);

command!(
    /// `block-job-cancel`: without `force`, ends a `ready` mirror with no pivot (its target a
    /// consistent copy as of now, and `BLOCK_JOB_COMPLETED`); before `ready`, or with `force`, the
    /// same as `job-cancel`.
    "block-job-cancel", BlockJobCancel {
        /// The job's id.
        device: String,
        /// The forced cancel.
        #[serde(skip_serializing_if = "Option::is_none")]
        force: Option<bool>,
    } -> Empty
);

command!(
    /// `block-job-set-speed`: the job's rate limit in bytes per second (0: none).
    "block-job-set-speed", BlockJobSetSpeed {
        /// The job's id.
        device: String,
        /// Bytes per second.
        speed: u64,
    } -> Empty
);

command!(
    /// `blockdev-mirror`: copies node `device` to node `target`, then keeps them in sync
    /// (`ready`) until completed (pivot) or cancelled.
    "blockdev-mirror", BlockdevMirror {
        /// The job's id.
        job_id: String,
        /// The source's root node.
        device: String,
        /// The target's node (not attached to a device).
        target: String,
        /// `full`, `top` or `none`.
        sync: String,
        /// The dirty bitmap's granularity in bytes (a power of two, 512 B–64 MiB).
        #[serde(skip_serializing_if = "Option::is_none")]
        granularity: Option<u32>,
        /// Bytes per second (0 or absent: no limit).
        #[serde(skip_serializing_if = "Option::is_none")]
        speed: Option<u64>,
        /// `background` or `write-blocking`.
        #[serde(skip_serializing_if = "Option::is_none")]
        copy_mode: Option<String>,
        /// Keep the job after it concluded, until `job-dismiss`.
        #[serde(skip_serializing_if = "Option::is_none")]
        auto_dismiss: Option<bool>,
        /// The most bytes in flight from source to target (absent: QEMU's 16 MiB, as 16
        /// requests of up to 1 MiB).
        #[serde(skip_serializing_if = "Option::is_none")]
        buf_size: Option<u64>,
    } -> Empty
);

command!(
    /// `blockdev-create`: formats an image on a node (a job; always needs `job-dismiss`).
    "blockdev-create", BlockdevCreate {
        /// The job's id.
        job_id: String,
        /// The driver's options (`{"driver": "qcow2", "file": …, "size": …}`).
        options: Value,
    } -> Empty
);

command!(
    /// `block-commit`: merges the layers from `top_node` down to `base_node`'s child into
    /// `base_node`. The active layer's commit goes `ready` and waits for `job-complete` (the
    /// device then runs on the base); an intermediate one completes by itself.
    "block-commit", BlockCommit {
        /// The job's id.
        job_id: String,
        /// The device's root node.
        device: String,
        /// The topmost layer to merge.
        top_node: String,
        /// The layer merged into.
        base_node: String,
        /// Bytes per second (absent: no limit).
        #[serde(skip_serializing_if = "Option::is_none")]
        speed: Option<u64>,
        /// Keep the job after it concluded, until `job-dismiss`.
        #[serde(skip_serializing_if = "Option::is_none")]
        auto_dismiss: Option<bool>,
    } -> Empty
);

command!(
    /// `block-stream`: copies the backing chain's data into `device`'s top layer; once done, the
    /// top stands alone (completes by itself).
    "block-stream", BlockStream {
        /// The job's id.
        job_id: String,
        /// The node to stream into (the device's top).
        device: String,
        /// Bytes per second (absent: no limit).
        #[serde(skip_serializing_if = "Option::is_none")]
        speed: Option<u64>,
        /// Keep the job after it concluded, until `job-dismiss`.
        #[serde(skip_serializing_if = "Option::is_none")]
        auto_dismiss: Option<bool>,
    } -> Empty
);

command!(
    /// `transaction`: several actions at once; if one fails, none is done.
    "transaction", QmpTransaction {
        /// The actions, in order.
        actions: Vec<TransactionAction>,
        /// `{"completion-mode": "grouped"}`: the jobs the actions start fail and are cancelled
        /// together (absent: each on its own).
        #[serde(skip_serializing_if = "Option::is_none")]
        properties: Option<Value>,
    } -> Empty
);

command!(
    /// `blockdev-backup`: copies node `device` as of now to node `target` (writes after the start
    /// are not copied); `sync: incremental` copies only what `bitmap` marks. Completes by itself.
    "blockdev-backup", BlockdevBackup {
        /// The job's id.
        job_id: String,
        /// The source's root node.
        device: String,
        /// The target's node.
        target: String,
        /// `full`, `top`, `none`, `incremental` or `bitmap`.
        sync: String,
        /// The bitmap an incremental backup copies (cleared by QEMU on success).
        #[serde(skip_serializing_if = "Option::is_none")]
        bitmap: Option<String>,
        /// Bytes per second (absent: no limit).
        #[serde(skip_serializing_if = "Option::is_none")]
        speed: Option<u64>,
        /// Wait in `pending` for `job-finalize` once the copy is done (so several jobs can be
        /// made final, or cancelled, together).
        #[serde(skip_serializing_if = "Option::is_none")]
        auto_finalize: Option<bool>,
        /// Keep the job after it concluded, until `job-dismiss`.
        #[serde(skip_serializing_if = "Option::is_none")]
        auto_dismiss: Option<bool>,
        /// How the job copies (`x-perf`, an unstable member: send it only to a QEMU whose schema
        /// has it).
        #[serde(skip_serializing_if = "Option::is_none")]
        x_perf: Option<BackupPerf>,
    } -> Empty
);

/// `BackupPerf`: how a backup job copies (`blockdev-backup`'s `x-perf`). Absent members take
/// QEMU's defaults: no copy offloading, 64 workers, chunks of any size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupPerf {
    /// Copy with the host's copy offloading (`copy_file_range`) where both nodes allow it; QEMU
    /// falls back to reading and writing where they do not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_copy_range: Option<bool>,
    /// How many requests the job keeps in flight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u32>,
    /// The largest request in bytes (0: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_chunk: Option<u64>,
}

/// One action of a `transaction` (`{"type": "blockdev-snapshot", "data": {…}}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransactionAction {
    /// The action's name, for example `blockdev-snapshot`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its arguments.
    pub data: Value,
}

impl TransactionAction {
    /// `command` as an action (those `transaction` takes: `blockdev-backup`, the dirty bitmap
    /// commands, `blockdev-snapshot`, …).
    pub fn of<C: super::Command>(command: &C) -> TransactionAction {
        TransactionAction {
            kind: C::NAME.into(),
            data: serde_json::to_value(command).expect("a command's arguments are JSON"),
        }
    }

    /// `blockdev-snapshot`: `overlay` (a node with no backing) goes on top of `node`.
    pub fn blockdev_snapshot(node: &str, overlay: &str) -> TransactionAction {
        TransactionAction {
            kind: "blockdev-snapshot".into(),
            data: serde_json::json!({"node": node, "overlay": overlay}),
        }
    }
}

/// One job in `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// Its type (`mirror`, `commit`, `stream`, `backup`, `create`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its status (`created`, `running`, `paused`, `ready`, `standby`, `waiting`, `pending`,
    /// `aborting`, `concluded`, `null`).
    pub status: String,
    /// Progress so far, in units of `total_progress` (bytes for block jobs).
    #[serde(rename = "current-progress")]
    pub current_progress: u64,
    /// The work it estimates in all; it may grow as the guest writes.
    #[serde(rename = "total-progress")]
    pub total_progress: u64,
    /// Why it failed, once concluded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
