//! Hot-add transactions: every step that changes QEMU records its undo before it is awaited.
//!
//! A step QEMU rejected did not happen, so its own undo is dropped; a step whose outcome is unknown
//! (it timed out, the connection died, or the caller dropped the future) keeps its undo, and undo
//! steps treat "not found" as done. On failure the stack runs in reverse and the caller gets the
//! first error with any undo failures attached. A transaction dropped before it finished (its future
//! was cancelled) rolls back in a spawned task.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use qhotplug_qmp::command::{BlockdevDel, Closefd, DeviceDel, NetdevDel, QueryFdsets, RemoveFd};
use qhotplug_qmp::Client;
use tracing::Instrument;

use crate::error::{Error, UndoFailure};
use crate::vm::Reservation;

/// How long an undo `device_del` waits for the device to go.
const UNDO_UNPLUG_WAIT: Duration = Duration::from_secs(5);

/// What undoes one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Undo {
    /// Remove an fd set: by id once `add-fd` answered, else the sets whose fd carries `opaque`.
    RemoveFd { fdset: Option<i64>, opaque: String },
    /// `blockdev-del`.
    BlockdevDel(String),
    /// `closefd` of a name given with `getfd`.
    Closefd(String),
    /// `netdev_del`.
    NetdevDel(String),
    /// `device_del`, then wait for the device to go.
    DeviceDel(String),
}

impl std::fmt::Display for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undo::RemoveFd {
                fdset: Some(id), ..
            } => write!(f, "remove-fd {id}"),
            Undo::RemoveFd { opaque, .. } => write!(f, "remove-fd {opaque}"),
            Undo::BlockdevDel(node) => write!(f, "blockdev-del {node}"),
            Undo::Closefd(name) => write!(f, "closefd {name}"),
            Undo::NetdevDel(id) => write!(f, "netdev_del {id}"),
            Undo::DeviceDel(id) => write!(f, "device_del {id}"),
        }
    }
}

/// How an undo step ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It removed what it was for.
    Done,
    /// There was nothing to remove.
    Absent,
}

/// True when QEMU says the thing an undo step would remove is not there: the undo's goal holds.
pub(crate) fn is_absent(e: &qhotplug_qmp::Error) -> bool {
    e.qmp_class() == Some("DeviceNotFound")
        || e.qmp_desc()
            .is_some_and(|d| d.contains("not found") || d.starts_with("Failed to find node"))
}

impl Undo {
    /// The QMP command this step sends.
    pub(crate) fn command(&self) -> &'static str {
        match self {
            Undo::RemoveFd { .. } => "remove-fd",
            Undo::BlockdevDel(_) => "blockdev-del",
            Undo::Closefd(_) => "closefd",
            Undo::NetdevDel(_) => "netdev_del",
            Undo::DeviceDel(_) => "device_del",
        }
    }

    /// Runs the step; what it would remove being absent already counts as done, and says so.
    /// Hot-remove and `reconcile` delete backends with it too.
    pub(crate) async fn run(&self, client: &Client) -> Result<Outcome, qhotplug_qmp::Error> {
        let result = match self {
            Undo::RemoveFd { fdset, opaque } => {
                let sets = match fdset {
                    Some(id) => vec![*id],
                    None => client
                        .execute(&QueryFdsets)
                        .await?
                        .into_iter()
                        .filter(|s| s.fds.iter().any(|f| f.opaque.as_ref() == Some(opaque)))
                        .map(|s| s.fdset_id)
                        .collect(),
                };
                for fdset_id in sets {
                    let cmd = RemoveFd { fdset_id, fd: None };
                    match client.execute(&cmd).await {
                        Err(e) if !is_absent(&e) => return Err(e),
                        _ => {}
                    }
                }
                Ok(())
            }
            Undo::BlockdevDel(node) => client
                .execute(&BlockdevDel {
                    node_name: node.clone(),
                })
                .await
                .map(drop),
            Undo::Closefd(name) => client
                .execute(&Closefd {
                    fdname: name.clone(),
                })
                .await
                .map(drop),
            Undo::NetdevDel(id) => client
                .execute(&NetdevDel { id: id.clone() })
                .await
                .map(drop),
            Undo::DeviceDel(id) => {
                let mut events = client.events();
                client.execute(&DeviceDel { id: id.clone() }).await?;
                let gone = async {
                    while let Some(event) = events.next().await {
                        if event.is_ok_and(|e| e.deleted_device() == Some(id)) {
                            return Ok(());
                        }
                    }
                    Err(qhotplug_qmp::Error::Disconnected)
                };
                tokio::time::timeout(UNDO_UNPLUG_WAIT, gone)
                    .await
                    .map_err(|_| qhotplug_qmp::Error::Timeout {
                        command: "device_del (waiting for DEVICE_DELETED)".into(),
                        after: UNDO_UNPLUG_WAIT,
                    })?
            }
        };
        match result {
            Ok(()) => Ok(Outcome::Done),
            Err(e) if is_absent(&e) => Ok(Outcome::Absent),
            Err(e) => Err(e),
        }
    }
}

/// Runs `undo` in reverse and returns the failures.
async fn roll_back(client: &Client, undo: Vec<Undo>) -> Vec<UndoFailure> {
    let mut failures = Vec::new();
    for step in undo.into_iter().rev() {
        let span = tracing::debug_span!("undo", step = %step);
        if let Err(error) = step.run(client).instrument(span).await {
            tracing::warn!(step = %step, %error, "undo step failed");
            failures.push(UndoFailure {
                step: step.to_string(),
                error,
            });
        }
    }
    failures
}

/// One hot-add in progress.
pub(crate) struct Transaction {
    client: Client,
    id: String,
    undo: Vec<Undo>,
    /// The slot and id, released after a rollback and kept by `commit`.
    reservation: Option<Reservation>,
}

impl Transaction {
    pub(crate) fn new(client: Client, reservation: Reservation) -> Self {
        Transaction {
            client,
            id: reservation.id().to_owned(),
            undo: Vec::new(),
            reservation: Some(reservation),
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Runs one step. `undo` is recorded before the step is awaited. On failure everything done so
    /// far is undone and the error says which step failed.
    pub(crate) async fn step<T, F>(
        &mut self,
        name: &'static str,
        undo: Option<Undo>,
        step: F,
    ) -> Result<T, Error>
    where
        F: Future<Output = Result<T, qhotplug_qmp::Error>>,
    {
        let pushed = undo.is_some();
        self.undo.extend(undo);
        let span = tracing::debug_span!("step", name, id = %self.id);
        match step.instrument(span).await {
            Ok(value) => Ok(value),
            Err(source) => {
                // An error reply means QEMU did not do it; anything else leaves it unknown.
                if pushed && matches!(source, qhotplug_qmp::Error::Qmp { .. }) {
                    self.undo.pop();
                }
                tracing::debug!(step = name, error = %source, "hot-add step failed; rolling back");
                let undo = std::mem::take(&mut self.undo);
                let undo_failures = roll_back(&self.client, undo).await;
                drop(self.reservation.take());
                Err(Error::Step {
                    id: self.id.clone(),
                    step: name,
                    source: Box::new(source),
                    undo_failures,
                })
            }
        }
    }

    /// Drops the recorded undo steps `keep` says no to (their goal is met another way now).
    pub(crate) fn forget(&mut self, mut keep: impl FnMut(&Undo) -> bool) {
        self.undo.retain(|u| keep(u));
    }

    /// Updates recorded undo steps in place (an fd set's id learnt from `add-fd`'s reply).
    pub(crate) fn amend(&mut self, f: impl FnMut(&mut Undo)) {
        self.undo.iter_mut().for_each(f);
    }

    /// The hot-add is complete: the undo stack is discarded and the reservation handed back.
    pub(crate) fn commit(mut self) -> Reservation {
        self.undo.clear();
        self.reservation.take().expect("a transaction commits once")
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let undo = std::mem::take(&mut self.undo);
        if undo.is_empty() {
            return;
        }
        // The future was dropped part-way: undo in the background, and free the slot only after.
        let client = self.client.clone();
        let id = self.id.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let span = tracing::debug_span!("rollback", id = %id, reason = "cancelled");
                let inner = reservation.inner();
                let task = handle.spawn(
                    async move {
                        let failures = roll_back(&client, undo).await;
                        if !failures.is_empty() {
                            tracing::warn!(?failures, "rollback of a cancelled hot-add incomplete");
                        }
                        drop(reservation);
                    }
                    .instrument(span),
                );
                inner.track_rollback(task);
            }
            Err(_) => {
                tracing::warn!(%id, "hot-add dropped outside a runtime: cannot roll back; reconcile");
                reservation.leak();
            }
        }
    }
}
