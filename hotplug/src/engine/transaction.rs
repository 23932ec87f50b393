//! The transaction runner: every step of a hot-add (or of another sequence, such as a medium
//! change) that changes QEMU records the [`Delete`] that undoes it before the step is awaited.
//!
//! A step QEMU rejected did not happen, so its own undo is dropped; a step whose outcome is unknown
//! (it timed out, the connection died, or the caller dropped the future) keeps its undo, and
//! deletes treat "not found" as done. On failure the stack runs in reverse and the caller gets the
//! first error with any undo failures attached. A transaction dropped before it finished (its future
//! was cancelled) rolls back in a spawned task, and frees its reservation only after.

use std::future::Future;
use std::sync::Arc;

use qhotplug_qmp::Client;
use tracing::Instrument;

use crate::engine::holds::{Hold, Reservation};
use crate::error::{Error, UndoFailure};
use crate::qemu::delete::Delete;
use crate::vm_core::clean_up_after_drop;

/// What a rollback left undone.
struct RolledBack {
    failures: Vec<UndoFailure>,
    /// The device itself could not be taken back (the guest did not let it go): nothing under it
    /// was deleted, and it is in doubt until `reconcile` settles it.
    device_left: bool,
}

/// Runs `undo` in reverse and returns the failures. A device that stays keeps its backends: the
/// steps after a failed `device_del` are not run (no backend goes while its frontend lives).
async fn roll_back(client: &Client, undo: Vec<Delete>) -> RolledBack {
    let mut failures = Vec::new();
    for step in undo.into_iter().rev() {
        let span = tracing::debug_span!(crate::spans::UNDO, step = %step);
        if let Err(error) = step.run(client).instrument(span).await {
            tracing::warn!(step = %step, %error, "undo step failed");
            let device_left = matches!(step, Delete::Device(_));
            failures.push(UndoFailure {
                step: step.to_string(),
                error: Arc::new(error),
            });
            if device_left {
                tracing::warn!("the device stays: its backends stay too, for reconcile");
                return RolledBack {
                    failures,
                    device_left,
                };
            }
        }
    }
    RolledBack {
        failures,
        device_left: false,
    }
}

/// One hot-add (or change) in progress.
pub(crate) struct Transaction<H: Hold = Reservation> {
    client: Client,
    /// What it is, in errors: `hot-add`, `medium change`.
    operation: &'static str,
    id: String,
    undo: Vec<Delete>,
    /// The slot and id (or the busy mark), released after a rollback and kept by `commit`.
    hold: Option<H>,
}

impl<H: Hold> Transaction<H> {
    pub(crate) fn new(client: Client, operation: &'static str, hold: H) -> Self {
        Transaction {
            client,
            operation,
            id: hold.id().to_owned(),
            undo: Vec::new(),
            hold: Some(hold),
        }
    }

    /// The device id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Runs one step. `undo` is recorded before the step is awaited. On failure everything done so
    /// far is undone and the error says which step failed.
    pub(crate) async fn step<T, F>(
        &mut self,
        name: &'static str,
        undo: Option<Delete>,
        step: F,
    ) -> Result<T, Error>
    where
        F: Future<Output = Result<T, qhotplug_qmp::Error>>,
    {
        let pushed = undo.is_some();
        self.undo.extend(undo);
        let span = tracing::debug_span!(crate::spans::STEP, name, id = %self.id);
        match step.instrument(span).await {
            Ok(value) => Ok(value),
            Err(source) => {
                // An error reply means QEMU did not do it; anything else leaves it unknown.
                if pushed && matches!(source, qhotplug_qmp::Error::Qmp { .. }) {
                    self.undo.pop();
                }
                tracing::debug!(step = name, error = %source, "{} step failed; rolling back", self.operation);
                let undo = std::mem::take(&mut self.undo);
                let rolled = roll_back(&self.client, undo).await;
                let hold = self.hold.take().expect("held until the end");
                if rolled.device_left {
                    hold.in_doubt();
                }
                let undo_failures = rolled.failures;
                Err(Error::Step {
                    operation: self.operation,
                    id: self.id.clone(),
                    step: name,
                    source: Box::new(source),
                    undo_failures,
                })
            }
        }
    }

    /// Something between the steps failed (host-side work, a wait): everything done so far is
    /// undone now, and `error` is handed back as it is. After a failed step (which has rolled
    /// back already) there is nothing left to undo.
    pub(crate) async fn abort(mut self, error: Error) -> Error {
        let Some(hold) = self.hold.take() else {
            return error;
        };
        let undo = std::mem::take(&mut self.undo);
        tracing::debug!(%error, "{} failed between steps; rolling back", self.operation);
        let rolled = roll_back(&self.client, undo).await;
        for failure in &rolled.failures {
            tracing::warn!(%failure, "{} rollback step failed", self.operation);
        }
        if rolled.device_left {
            hold.in_doubt();
        }
        error
    }

    /// The sequence has run its course and what it made goes now, as a teardown rather than a
    /// rollback (a storage copy's nodes and exports after the switch): the undo stack runs, and
    /// what it held is let go. Returns the steps that failed.
    pub(crate) async fn unwind(mut self) -> Vec<crate::error::UndoFailure> {
        let Some(hold) = self.hold.take() else {
            return Vec::new();
        };
        let undo = std::mem::take(&mut self.undo);
        let rolled = roll_back(&self.client, undo).await;
        if rolled.device_left {
            hold.in_doubt();
        }
        rolled.failures
    }

    /// Records an undo for something that happened outside a step (the guest opened a tray it
    /// was asked to).
    pub(crate) fn push_undo(&mut self, undo: Delete) {
        self.undo.push(undo);
    }

    /// Drops the recorded undo steps `keep` says no to (their goal is met another way now).
    pub(crate) fn forget(&mut self, mut keep: impl FnMut(&Delete) -> bool) {
        self.undo.retain(|u| keep(u));
    }

    /// `add-fd` of `fd` into a new set tagged `tag`, a step whose undo removes the set.
    pub(crate) async fn add_fdset(
        &mut self,
        fd: std::os::fd::OwnedFd,
        tag: String,
    ) -> Result<qhotplug_qmp::command::AddFdInfo, Error> {
        let add = qhotplug_qmp::command::AddFd {
            fdset_id: None,
            opaque: Some(tag.clone()),
        };
        let undo = Delete::Fdset { id: None, tag };
        let client = self.client.clone();
        let info = self
            .step("add-fd", Some(undo), client.add_fd(&add, fd))
            .await?;
        self.amend(|d| {
            if let Delete::Fdset { id, .. } = d {
                id.get_or_insert(info.fdset_id);
            }
        });
        Ok(info)
    }

    /// `remove-fd` of set `fdset_id` once QEMU has what it needs from it (a node's dup, a key it
    /// read): the set's undo is no longer needed.
    pub(crate) async fn let_go_fdset(&mut self, fdset_id: i64) -> Result<(), Error> {
        let remove = qhotplug_qmp::command::RemoveFd { fdset_id, fd: None };
        let client = self.client.clone();
        self.step("remove-fd", None, client.execute(&remove))
            .await?;
        self.forget(|d| !matches!(d, Delete::Fdset { .. }));
        Ok(())
    }

    /// Updates recorded undo steps in place (an fd set's id learnt from `add-fd`'s reply).
    pub(crate) fn amend(&mut self, f: impl FnMut(&mut Delete)) {
        self.undo.iter_mut().for_each(f);
    }

    /// The sequence is complete: the undo stack is discarded and what it held handed back.
    pub(crate) fn commit(mut self) -> H {
        self.undo.clear();
        self.hold.take().expect("a transaction commits once")
    }
}

impl<H: Hold> Drop for Transaction<H> {
    fn drop(&mut self) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        let undo = std::mem::take(&mut self.undo);
        if undo.is_empty() {
            return;
        }
        // The future was dropped part-way: undo in the background, and free the slot only after.
        let client = self.client.clone();
        let core = hold.inner();
        let undone = clean_up_after_drop(
            core.as_deref(),
            &self.id,
            "cancelled",
            hold,
            |hold| async move {
                let rolled = roll_back(&client, undo).await;
                if !rolled.failures.is_empty() {
                    tracing::warn!(
                        failures = ?rolled.failures,
                        "rollback of a cancelled sequence incomplete"
                    );
                }
                if rolled.device_left {
                    hold.in_doubt();
                }
            },
        );
        if let Err(hold) = undone {
            hold.leak();
        }
    }
}
