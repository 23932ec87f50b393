//! [`Frozen`]: the guest's filesystems frozen for as long as the guard lives, and thawed whatever
//! happens: by [`Frozen::thaw`], when the guard is dropped (a task thaws), or by a safety timer if
//! nothing else did (as KubeVirt's does).
//!
//! The agent is untrusted, so a guard believes a thaw only when the agent answered it: a thaw the
//! agent refuses or does not answer is tried again, after a resynchronisation (or a new
//! connection), until [`Config::thaw_deadline`](crate::Config::thaw_deadline); what is known is
//! always readable ([`Frozen::state`], [`Agent::freeze_state`]: frozen, thawed, or unknown with the
//! last error) and logged. A second freeze while a guard of the same client holds one is refused
//! without asking the agent, and a freeze that failed thaws only when it may have frozen
//! something, so nothing thaws a freeze behind its guard's back.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::command::{FreezeStatus, GuestFsfreezeFreeze, GuestFsfreezeStatus, GuestFsfreezeThaw};
use crate::error::{Error, Result};
use crate::Agent;

/// What an [`Agent`] knows of the guest's filesystems' freeze.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FreezeState {
    /// Thawed: nothing this client froze is frozen (the agent answered the last thaw, or
    /// `guest-fsfreeze-status` said so).
    #[default]
    Thawed,
    /// Frozen: the agent answered a freeze, and no thaw since.
    Frozen,
    /// A freeze or a thaw whose outcome is not known (the agent refused a thaw, did not answer,
    /// or went away): the guest may be frozen. `error` is the last one.
    Unknown {
        /// The last error, as text.
        error: String,
    },
}

/// The freeze's book, one per [`Agent`]: its state, and the guard (by generation) that holds it.
#[derive(Debug, Default)]
pub(crate) struct FreezeBook {
    state: FreezeState,
    /// The guard whose freeze is not yet known to be thawed.
    holder: Option<Hold>,
    generations: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hold {
    generation: u64,
    /// The guard still lives (not dropped, not thawed by its owner): a new freeze is refused.
    /// Once it is gone, a new freeze waits for its thaw instead.
    live: bool,
}

impl FreezeBook {
    fn holds(&self, generation: u64) -> bool {
        self.holder.is_some_and(|h| h.generation == generation)
    }
}

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
    generation: u64,
    /// Thaws at `deadline` unless the guard did first; `None` once the guard thawed.
    timer: Option<JoinHandle<()>>,
    /// The safety deadline.
    deadline: Instant,
}

/// The first pause between two tries of a thaw; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(2);

impl Agent {
    /// Freezes the guest's filesystems; they stay frozen until the returned guard thaws them, is
    /// dropped, or `safety` has passed.
    ///
    /// A freeze while a guard of this client holds one is [`Error::Frozen`], and nothing is
    /// sent. A freeze that fails is thawed at once only when it may have frozen something: its
    /// outcome is in doubt (no answer, a lost reply), or the agent failed part-way (it thaws what
    /// it froze then, and a thaw of thawed filesystems is harmless); never when the agent refused
    /// it because the filesystems were frozen already (someone else's freeze).
    pub async fn freeze(self: &Arc<Self>, safety: Duration) -> Result<Frozen> {
        // A guard that is gone may still be thawing: wait for its thaw to go through or give up.
        loop {
            let released = self.freeze_changed.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.book().holder {
                None => break,
                Some(Hold { live: true, .. }) => {
                    return Err(Error::Frozen {
                        command: "guest-fsfreeze-freeze".into(),
                    })
                }
                Some(Hold { live: false, .. }) => {}
            }
            released.await;
        }
        let count = match self.execute(&GuestFsfreezeFreeze).await {
            Ok(count) => count,
            Err(error) => {
                if error.is_in_doubt() || matches!(error, Error::Agent { .. }) {
                    let generation = self.hold(FreezeState::Unknown {
                        error: error.to_string(),
                    });
                    self.let_go(generation);
                    if let Err(thaw) = self.thaw_held(generation, Release::Always).await {
                        tracing::error!(error = %thaw, "a failed freeze could not be thawed");
                    }
                }
                return Err(error);
            }
        };
        let generation = self.hold(FreezeState::Frozen);
        let agent = self.clone();
        let deadline = Instant::now() + safety;
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            tracing::warn!(?safety, "freeze held past its safety deadline: thawing");
            let _ = agent.thaw_held(generation, Release::OnSuccess).await;
        });
        Ok(Frozen {
            agent: self.clone(),
            count,
            generation,
            timer: Some(timer),
            deadline,
        })
    }

    /// What this client knows of the guest's filesystems' freeze.
    pub fn freeze_state(&self) -> FreezeState {
        self.book().state.clone()
    }

    /// Whether the guest's filesystems are frozen now (the agent keeps that across its own
    /// restart), and thaws them if they are: for a caller that lost its guard with its process.
    /// A freeze a live guard of this client holds is left alone. Returns the status found.
    pub async fn ensure_thawed(&self) -> Result<FreezeStatus> {
        let status = self.execute(&GuestFsfreezeStatus).await?;
        if self.book().holder.is_some_and(|h| h.live) {
            return Ok(status);
        }
        if status == FreezeStatus::Frozen {
            if let Err(error) = self.execute(&GuestFsfreezeThaw).await {
                self.book().state = FreezeState::Unknown {
                    error: error.to_string(),
                };
                return Err(error);
            }
        }
        self.book().state = FreezeState::Thawed;
        Ok(status)
    }

    fn book(&self) -> std::sync::MutexGuard<'_, FreezeBook> {
        self.freeze
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Records a freeze (or one in doubt) held by a new generation, and returns it.
    fn hold(&self, state: FreezeState) -> u64 {
        let mut book = self.book();
        book.generations += 1;
        let generation = book.generations;
        book.state = state;
        book.holder = Some(Hold {
            generation,
            live: true,
        });
        generation
    }

    /// The guard of `generation` is gone; its thaw (if any is left to do) runs on.
    fn let_go(&self, generation: u64) {
        let mut book = self.book();
        if let Some(hold) = book.holder.as_mut().filter(|h| h.generation == generation) {
            hold.live = false;
        }
    }

    /// The freeze of `generation` is no longer anybody's to thaw.
    fn release(&self, generation: u64, thawed: bool) {
        let mut book = self.book();
        if book.holds(generation) {
            book.holder = None;
            if thawed {
                book.state = FreezeState::Thawed;
            }
        }
        drop(book);
        self.freeze_changed.notify_waiters();
    }

    /// Thaws the freeze `generation` holds, trying again (after a resynchronisation, or a new
    /// connection) while the agent refuses or does not answer, until the thaw deadline. Only the
    /// agent's answer makes the state [`FreezeState::Thawed`].
    async fn thaw_held(&self, generation: u64, release: Release) -> Result<i64> {
        if !self.book().holds(generation) {
            // Thawed already (by the safety timer): a thaw now could only thaw a later freeze.
            return Ok(0);
        }
        let deadline = Instant::now() + self.config.thaw_deadline;
        let mut pause = FIRST_PAUSE;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let error = match self.execute(&GuestFsfreezeThaw).await {
                Ok(count) => {
                    self.release(generation, true);
                    tracing::debug!(count, tries, "thawed");
                    return Ok(count);
                }
                Err(error) => error,
            };
            {
                let mut book = self.book();
                if book.holds(generation) {
                    book.state = FreezeState::Unknown {
                        error: error.to_string(),
                    };
                }
            }
            if Instant::now() + pause >= deadline {
                tracing::error!(%error, tries, "gave up thawing the guest's filesystems; they may still be frozen");
                if release == Release::Always {
                    self.release(generation, false);
                }
                return Err(error);
            }
            tracing::warn!(%error, tries, ?pause, "the thaw did not go through; trying again");
            self.resync_before_next();
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

/// Whether a thaw that gives up lets the freeze go (no guard is left to try again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// Only when the thaw went through: a live guard may try again.
    OnSuccess,
    /// Either way: nothing will try again.
    Always,
}

impl Frozen {
    /// How many filesystems the freeze froze.
    pub fn count(&self) -> i64 {
        self.count
    }

    /// True once the safety deadline has passed (the timer thaws then): whatever was done under
    /// the guard since may not have been consistent. Whether the thaw went through is
    /// [`Frozen::state`].
    pub fn timed_out(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// What is known of the freeze now: frozen, thawed (only once the agent answered a thaw), or
    /// unknown with the last error while a thaw does not go through.
    pub fn state(&self) -> FreezeState {
        self.agent.freeze_state()
    }

    /// Thaws now, trying again until the thaw deadline while the agent refuses or does not
    /// answer; returns how many filesystems the thaw that went through thawed (0 when the safety
    /// timer's thaw had already). An error is the last try's; the state is then
    /// [`FreezeState::Unknown`].
    pub async fn thaw(mut self) -> Result<i64> {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
        self.agent.let_go(self.generation);
        self.agent.thaw_held(self.generation, Release::Always).await
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let Some(timer) = self.timer.take() else {
            return;
        };
        timer.abort();
        self.agent.let_go(self.generation);
        if !self.agent.book().holds(self.generation) {
            return;
        }
        let agent = self.agent.clone();
        let generation = self.generation;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = agent.thaw_held(generation, Release::Always).await;
                });
            }
            Err(_) => {
                tracing::error!("a freeze dropped outside a runtime stays frozen");
                self.agent.book().state = FreezeState::Unknown {
                    error: "the guard was dropped outside a runtime".into(),
                };
                self.agent.release(generation, false);
            }
        }
    }
}
