//! [`Frozen`]: the guest's filesystems frozen for as long as the guard lives, and thawed whatever
//! happens: by [`Frozen::thaw`], when the guard is dropped (a task thaws), or by a safety timer if
//! nothing else did (as KubeVirt's does). A freeze that fails or times out is thawed at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::command::{FreezeStatus, GuestFsfreezeFreeze, GuestFsfreezeStatus, GuestFsfreezeThaw};
use crate::error::Result;
use crate::Agent;

/// The guest's filesystems, frozen (`guest-fsfreeze-freeze`) until this guard thaws them.
///
/// ```no_run
/// # async fn demo(agent: std::sync::Arc<qhotplug_qga::Agent>) -> qhotplug_qga::Result<()> {
/// use std::time::Duration;
///
/// let frozen = agent.freeze(Duration::from_secs(60)).await?;
/// // … take the snapshot …
/// frozen.thaw().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Frozen {
    agent: Arc<Agent>,
    count: i64,
    /// Thaws at the safety deadline unless the guard did first.
    timer: Option<JoinHandle<()>>,
    /// The safety timer has thawed: nothing is left to do.
    timed_out: Arc<AtomicBool>,
}

impl Agent {
    /// Freezes the guest's filesystems; they stay frozen until the returned guard thaws them, is
    /// dropped, or `safety` has passed. If the freeze fails or its answer does not come, a thaw
    /// is sent at once (the agent thaws what it froze when a freeze fails part-way; a thaw of
    /// thawed filesystems is harmless).
    pub async fn freeze(self: &Arc<Self>, safety: Duration) -> Result<Frozen> {
        let count = match self.execute(&GuestFsfreezeFreeze).await {
            Ok(count) => count,
            Err(e) => {
                if let Err(thaw) = self.execute(&GuestFsfreezeThaw).await {
                    tracing::warn!(error = %thaw, "thaw after a failed freeze");
                }
                return Err(e);
            }
        };
        let agent = self.clone();
        let timed_out = Arc::new(AtomicBool::new(false));
        let flag = timed_out.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(safety).await;
            tracing::warn!(?safety, "freeze held past its safety deadline: thawing");
            if let Err(e) = agent.execute(&GuestFsfreezeThaw).await {
                tracing::error!(error = %e, "the safety thaw failed");
            }
            flag.store(true, Ordering::SeqCst);
        });
        Ok(Frozen {
            agent: self.clone(),
            count,
            timer: Some(timer),
            timed_out,
        })
    }

    /// Whether the guest's filesystems are frozen now (the agent keeps that across its own
    /// restart), and thaws them if they are: for a caller that lost its guard with its process.
    /// Returns the status found.
    pub async fn ensure_thawed(&self) -> Result<FreezeStatus> {
        let status = self.execute(&GuestFsfreezeStatus).await?;
        if status == FreezeStatus::Frozen {
            self.execute(&GuestFsfreezeThaw).await?;
        }
        Ok(status)
    }
}

impl Frozen {
    /// How many filesystems the freeze froze.
    pub fn count(&self) -> i64 {
        self.count
    }

    /// True once the safety timer has thawed: whatever was done under the guard since may not
    /// have been consistent.
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }

    /// Thaws now; returns how many filesystems were thawed.
    pub async fn thaw(mut self) -> Result<i64> {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
        self.agent.execute(&GuestFsfreezeThaw).await
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let Some(timer) = self.timer.take() else {
            return;
        };
        timer.abort();
        if self.timed_out.load(Ordering::SeqCst) {
            return;
        }
        let agent = self.agent.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = agent.execute(&GuestFsfreezeThaw).await {
                        tracing::error!(error = %e, "the thaw of a dropped freeze failed");
                    }
                });
            }
            Err(_) => tracing::error!("a freeze dropped outside a runtime stays frozen"),
        }
    }
}
