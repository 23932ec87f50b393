//! Jobs of the SDK's a dead process left, ended by the process that came after: by
//! [`Vm::reconcile`](crate::Vm::reconcile), or by an attach with no spec before it (QEMU lists
//! no block node while a job waits concluded). Each is reported with how it had fared, read from
//! `query-jobs` before it was ended: a push backup that had finished left a whole target. A leaf,
//! so the core can keep what an attach ended for the next reconcile to report.

use qhotplug_qmp::command::JobInfo;

/// A job of the SDK's a dead process left, which the process after it ended
/// ([`Reconciled::jobs_ended`](crate::Reconciled::jobs_ended)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndedJob {
    /// Its id, as the SDK names each job after its operation and disk (`backup-<disk>`,
    /// `pull-<disk>`, …: [`names`](qhotplug_cmdline::names)).
    pub id: String,
    /// How it had fared when it was ended.
    pub outcome: JobOutcome,
}

/// How a job a dead process left had fared ([`EndedJob`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobOutcome {
    /// It had done its work and waited for its dismissal: a push backup's target is whole and
    /// the checkpoint it made stays. For a mirror or a commit, whether the disk switched images
    /// is its chain as QEMU runs it ([`Reconciled::chains_updated`](crate::Reconciled)).
    Completed,
    /// It had failed, with QEMU's error: what it wrote is partial.
    Failed(String),
    /// It was still at work: cancelled now, so what it wrote is partial (a backup's target, a
    /// storage copy's image) and a backup's checkpoint is given back.
    Cancelled,
}

impl EndedJob {
    /// How `job` (as `query-jobs` listed it, before it was ended) had fared.
    pub(crate) fn of(job: &JobInfo) -> EndedJob {
        let outcome = match (job.status.as_str(), &job.error) {
            ("concluded", Some(error)) => JobOutcome::Failed(error.clone()),
            ("concluded", None) => JobOutcome::Completed,
            _ => JobOutcome::Cancelled,
        };
        EndedJob {
            id: job.id.clone(),
            outcome,
        }
    }

    /// Whether what the job was making is whole.
    pub(crate) fn completed(&self) -> bool {
        self.outcome == JobOutcome::Completed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: &str, error: Option<&str>) -> JobInfo {
        serde_json::from_value(serde_json::json!({
            "id": "backup-d1", "type": "backup", "status": status,
            "current-progress": 1, "total-progress": 1,
            "error": error,
        }))
        .unwrap()
    }

    #[test]
    fn a_job_fares_as_query_jobs_listed_it_before_it_was_ended() {
        assert_eq!(
            EndedJob::of(&job("concluded", None)).outcome,
            JobOutcome::Completed
        );
        assert_eq!(
            EndedJob::of(&job("concluded", Some("No space left on device"))).outcome,
            JobOutcome::Failed("No space left on device".into())
        );
        for status in [
            "running", "paused", "ready", "pending", "waiting", "aborting",
        ] {
            assert_eq!(
                EndedJob::of(&job(status, None)).outcome,
                JobOutcome::Cancelled,
                "{status}"
            );
        }
    }
}
