//! Deleting what a device's backends left in QEMU: the undo steps of a hot-add's rollback, the
//! teardown of a hot-remove once the guest let the device go, and `reconcile`'s clean-up all run
//! these, with one rule: what is already absent counts as deleted. A medium change's undo also
//! puts things back: the old medium in, the tray closed; and a backup's undo gives a new
//! checkpoint's record back to the one before it.

use std::time::Duration;

use qhotplug_qmp::command::{
    BlockDirtyBitmapEnable, BlockDirtyBitmapMerge, BlockDirtyBitmapRemove, BlockExportDel,
    BlockdevCloseTray, BlockdevDel, BlockdevInsertMedium, BlockdevOpenTray, BlockdevRemoveMedium,
    ChardevRemove, Closefd, NbdServerStop, NetdevDel, ObjectDel, QmpTransaction, QueryFdsets,
    RemoveFd, TransactionAction,
};
use qhotplug_qmp::Client;

use crate::error::Error;
use crate::qemu::block::named_block_node_infos;
use crate::qemu::errors::{
    is_absent, is_backend_in_use, is_nbd_server_not_running, is_tray_closed,
};
use crate::qemu::unplug::{self, UnplugPolicy, Unplugged};

/// How long a `blockdev-del` or `chardev-remove` is asked again, at most, while QEMU still holds
/// the backend: right after its device went (a teardown, or a rollback's `device_del`), QEMU may
/// release the drive or chardev a few milliseconds after `DEVICE_DELETED`.
const BACKEND_RELEASE: Duration = Duration::from_secs(2);

/// How long a rollback's `device_del` waits for the device to go.
const ROLLBACK_UNPLUG: UnplugPolicy = UnplugPolicy::new(Duration::from_secs(5));

/// One thing to delete from QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delete {
    /// An fd set: by id once `add-fd` answered, else every set whose fd carries `tag`.
    Fdset { id: Option<i64>, tag: String },
    /// The fd sets tagged `tag` (one device's images, each kept in its set while a node is open
    /// on it) that no block node opens any more: a node's file name is `/dev/fdset/N`. Nothing
    /// is removed while the nodes cannot be listed (a job waits concluded); `reconcile` sweeps
    /// again.
    UnusedFdsets(String),
    /// A block node (`blockdev-del`).
    BlockNode(String),
    /// A name given with `getfd` (`closefd`).
    Fd(String),
    /// A netdev (`netdev_del`).
    Netdev(String),
    /// A device: `device_del`, then wait for the guest to let it go.
    Device(String),
    /// A QOM object made with `object-add` (`object-del`).
    Object(String),
    /// A chardev (`chardev-remove`).
    Chardev(String),
    /// The medium in drive `device` (`blockdev-open-tray` by force, `blockdev-remove-medium`; an
    /// empty drive counts as done).
    Medium(String),
    /// Medium `node` back into drive `device` (`blockdev-insert-medium`): the undo of taking it
    /// out.
    Reinsert { device: String, node: String },
    /// Drive `device`'s tray closed (`blockdev-close-tray`; a closed tray counts as done).
    CloseTray(String),
    /// Dirty bitmap `name` on `node` (`block-dirty-bitmap-remove`).
    Bitmap { node: String, name: String },
    /// A job: cancelled (`job-cancel`; one concluded already counts), waited for, dismissed.
    Job(String),
    /// An export of the VM's NBD server (`block-export-del`, `hard`: its clients dropped).
    Export(String),
    /// The VM's NBD server (`nbd-server-stop`).
    NbdServer,
    /// Checkpoint `name` on `node` gone, losing nothing: what it recorded merged into `into`
    /// (the checkpoint before it), which records again if `resume`, then `name` removed; one
    /// `transaction`.
    Checkpoint {
        node: String,
        name: String,
        into: Option<String>,
        resume: bool,
    },
}

impl std::fmt::Display for Delete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Delete::Fdset { id: Some(id), .. } => write!(f, "remove-fd {id}"),
            Delete::Fdset { tag, .. } => write!(f, "remove-fd {tag}"),
            Delete::UnusedFdsets(tag) => write!(f, "remove-fd (unused sets of {tag})"),
            Delete::BlockNode(node) => write!(f, "blockdev-del {node}"),
            Delete::Fd(name) => write!(f, "closefd {name}"),
            Delete::Netdev(id) => write!(f, "netdev_del {id}"),
            Delete::Device(id) => write!(f, "device_del {id}"),
            Delete::Object(id) => write!(f, "object-del {id}"),
            Delete::Chardev(id) => write!(f, "chardev-remove {id}"),
            Delete::Medium(id) => write!(f, "blockdev-remove-medium {id}"),
            Delete::Reinsert { device, node } => {
                write!(f, "blockdev-insert-medium {device} {node}")
            }
            Delete::CloseTray(id) => write!(f, "blockdev-close-tray {id}"),
            Delete::Bitmap { node, name } => write!(f, "block-dirty-bitmap-remove {node} {name}"),
            Delete::Job(id) => write!(f, "job-cancel {id}"),
            Delete::Export(id) => write!(f, "block-export-del {id}"),
            Delete::NbdServer => write!(f, "nbd-server-stop"),
            Delete::Checkpoint { node, name, .. } => {
                write!(f, "transaction (checkpoint {name} on {node} undone)")
            }
        }
    }
}

/// How a delete ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It removed what it was for.
    Done,
    /// There was nothing to remove.
    Absent,
}

impl Delete {
    /// The QMP command it sends.
    pub(crate) fn command(&self) -> &'static str {
        match self {
            Delete::Fdset { .. } | Delete::UnusedFdsets(_) => "remove-fd",
            Delete::BlockNode(_) => "blockdev-del",
            Delete::Fd(_) => "closefd",
            Delete::Netdev(_) => "netdev_del",
            Delete::Device(_) => "device_del",
            Delete::Object(_) => "object-del",
            Delete::Chardev(_) => "chardev-remove",
            Delete::Medium(_) => "blockdev-remove-medium",
            Delete::Reinsert { .. } => "blockdev-insert-medium",
            Delete::CloseTray(_) => "blockdev-close-tray",
            Delete::Bitmap { .. } => "block-dirty-bitmap-remove",
            Delete::Job(_) => "job-cancel",
            Delete::Export(_) => "block-export-del",
            Delete::NbdServer => "nbd-server-stop",
            Delete::Checkpoint { .. } => "transaction",
        }
    }

    /// Runs it; what it would remove being absent already counts as done, and says so.
    pub(crate) async fn run(&self, client: &Client) -> Result<Outcome, Error> {
        if let Delete::Device(id) = self {
            // Whether an earlier device by this id left a late event is not known here: each
            // event is checked.
            return match unplug::unplug(client, id, &ROLLBACK_UNPLUG, true).await {
                Ok(Unplugged::Deleted | Unplugged::Vanished) => Ok(Outcome::Done),
                Ok(Unplugged::Already) => Ok(Outcome::Absent),
                Err(refused) => Err(refused.into_error(id)),
            };
        }
        if let Delete::Job(id) = self {
            return end_job(client, id).await;
        }
        if let Delete::UnusedFdsets(tag) = self {
            return remove_unused_fdsets(client, tag).await;
        }
        let deadline = tokio::time::Instant::now() + BACKEND_RELEASE;
        let mut pause = Duration::from_millis(5);
        loop {
            match self.run_command(client).await {
                Ok(()) => return Ok(Outcome::Done),
                Err(e) if is_absent(&e) => return Ok(Outcome::Absent),
                Err(e) if matches!(self, Delete::NbdServer) && is_nbd_server_not_running(&e) => {
                    return Ok(Outcome::Absent)
                }
                Err(e)
                    if matches!(self, Delete::BlockNode(_) | Delete::Chardev(_))
                        && is_backend_in_use(&e)
                        && tokio::time::Instant::now() + pause < deadline =>
                {
                    tracing::debug!(step = %self, "still in use; asking again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn run_command(&self, client: &Client) -> Result<(), qhotplug_qmp::Error> {
        match self {
            Delete::Fdset { id, tag } => remove_fdsets(client, *id, tag).await,
            Delete::BlockNode(node) => client
                .execute(&BlockdevDel {
                    node_name: node.clone(),
                })
                .await
                .map(drop),
            Delete::Fd(name) => client
                .execute(&Closefd {
                    fdname: name.clone(),
                })
                .await
                .map(drop),
            Delete::Netdev(id) => client
                .execute(&NetdevDel { id: id.clone() })
                .await
                .map(drop),
            Delete::Object(id) => client
                .execute(&ObjectDel { id: id.clone() })
                .await
                .map(drop),
            Delete::Chardev(id) => client
                .execute(&ChardevRemove { id: id.clone() })
                .await
                .map(drop),
            // Out whatever the guest did to the tray.
            Delete::Medium(id) => {
                let remove = BlockdevRemoveMedium { id: id.clone() };
                on_open_tray(client, id, &remove).await
            }
            // Putting back what was there (a `CloseTray` undo after this closes it again if it
            // was closed).
            Delete::Reinsert { device, node } => {
                let insert = BlockdevInsertMedium {
                    id: device.clone(),
                    node_name: node.clone(),
                };
                on_open_tray(client, device, &insert).await
            }
            Delete::CloseTray(id) => client
                .execute(&BlockdevCloseTray { id: id.clone() })
                .await
                .map(drop),
            Delete::Bitmap { node, name } => client
                .execute(&BlockDirtyBitmapRemove {
                    node: node.clone(),
                    name: name.clone(),
                })
                .await
                .map(drop),
            Delete::Checkpoint {
                node,
                name,
                into,
                resume,
            } => give_back_checkpoint(client, node, name, into.as_deref(), *resume).await,
            Delete::Export(id) => client
                .execute(&BlockExportDel {
                    id: id.clone(),
                    mode: Some("hard".into()),
                })
                .await
                .map(drop),
            Delete::NbdServer => client.execute(&NbdServerStop).await.map(drop),
            Delete::Device(_) | Delete::Job(_) | Delete::UnusedFdsets(_) => {
                unreachable!("run handles devices, jobs and unused fd sets")
            }
        }
    }
}

/// How long a cancelled job may take to conclude.
const JOB_END: Duration = Duration::from_secs(30);

/// Cancels job `id` and waits for its end, then dismisses it; gone already is absent.
async fn end_job(client: &Client, id: &str) -> Result<Outcome, Error> {
    let mut events = client.events();
    if !crate::qemu::jobs::cancel(client, id).await? {
        return Ok(Outcome::Absent);
    }
    match tokio::time::timeout(
        JOB_END,
        crate::qemu::jobs::conclude(client, &mut events, id),
    )
    .await
    {
        // A cancelled job's "error" is the cancel.
        Ok(Ok(()) | Err(Error::JobFailed { .. })) => Ok(Outcome::Done),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(Error::JobTimeout {
            id: id.to_owned(),
            status: "aborting".into(),
            want: "concluded",
            after: JOB_END,
        }),
    }
}

/// How many times a medium step reopens a tray the guest closed under it.
const TRAY_RETRIES: usize = 3;

/// Runs `cmd` (a medium step that needs the tray open); when the guest (or its firmware, probing
/// the drive) closed the tray meanwhile, opens it again and retries, a few times.
pub(crate) async fn with_tray_open<C: qhotplug_qmp::command::Command>(
    client: &qhotplug_qmp::Client,
    id: &str,
    force: bool,
    cmd: &C,
) -> qhotplug_qmp::Result<C::Returns> {
    let open = BlockdevOpenTray {
        id: id.to_owned(),
        force: force.then_some(true),
    };
    let mut tries = 0;
    loop {
        match client.execute(cmd).await {
            Err(e) if is_tray_closed(&e) && tries < TRAY_RETRIES => {
                tries += 1;
                tracing::debug!(
                    id,
                    tries,
                    "the tray closed under the change; opening it again"
                );
                client.execute(&open).await?;
            }
            other => return other,
        }
    }
}

/// Removes the sets tagged `tag` whose set no named node's file name (`/dev/fdset/N`) opens.
async fn remove_unused_fdsets(client: &Client, tag: &str) -> Result<Outcome, Error> {
    let sets: Vec<i64> = client
        .execute(&QueryFdsets)
        .await?
        .into_iter()
        .filter(|s| s.fds.iter().any(|f| f.opaque.as_deref() == Some(tag)))
        .map(|s| s.fdset_id)
        .collect();
    if sets.is_empty() {
        return Ok(Outcome::Absent);
    }
    let Some(nodes) = named_block_node_infos(client).await? else {
        return Ok(Outcome::Absent);
    };
    let open: std::collections::HashSet<&str> = nodes.iter().map(|n| n.file.as_str()).collect();
    let mut outcome = Outcome::Absent;
    for set in sets {
        if !open.contains(format!("/dev/fdset/{set}").as_str()) {
            remove_fdsets(client, Some(set), tag).await?;
            outcome = Outcome::Done;
        }
    }
    Ok(outcome)
}

/// Removes fd set `id`, or every set tagged `tag` when its id is not known; one already gone
/// counts as removed.
async fn remove_fdsets(
    client: &Client,
    id: Option<i64>,
    tag: &str,
) -> Result<(), qhotplug_qmp::Error> {
    let sets = match id {
        Some(id) => vec![id],
        None => client
            .execute(&QueryFdsets)
            .await?
            .into_iter()
            .filter(|s| s.fds.iter().any(|f| f.opaque.as_deref() == Some(tag)))
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

/// Runs `command` on drive `id` with its tray open: opened by force first (a no-op when it is
/// open), and again if the guest or its firmware closes it before the command.
async fn on_open_tray<C>(client: &Client, id: &str, command: &C) -> Result<(), qhotplug_qmp::Error>
where
    C: qhotplug_qmp::Command<Returns = qhotplug_qmp::command::Empty>,
{
    let open = BlockdevOpenTray {
        id: id.to_owned(),
        force: Some(true),
    };
    client.execute(&open).await?;
    with_tray_open(client, id, true, command).await.map(drop)
}

/// A checkpoint's record given back: merged into the one before it (`into`, enabled again when
/// it was the recording one), then removed, in one transaction.
async fn give_back_checkpoint(
    client: &Client,
    node: &str,
    name: &str,
    into: Option<&str>,
    resume: bool,
) -> Result<(), qhotplug_qmp::Error> {
    let mut actions = Vec::new();
    if let Some(into) = into {
        actions.push(TransactionAction::of(&BlockDirtyBitmapMerge {
            node: node.to_owned(),
            target: into.to_owned(),
            bitmaps: vec![name.to_owned()],
        }));
        if resume {
            actions.push(TransactionAction::of(&BlockDirtyBitmapEnable {
                node: node.to_owned(),
                name: into.to_owned(),
            }));
        }
    }
    actions.push(TransactionAction::of(&BlockDirtyBitmapRemove {
        node: node.to_owned(),
        name: name.to_owned(),
    }));
    let undo = QmpTransaction {
        actions,
        properties: None,
    };
    client.execute(&undo).await.map(drop)
}
