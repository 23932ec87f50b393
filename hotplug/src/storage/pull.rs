//! Pull backups: a point-in-time view of each disk served over NBD for a backup tool to read at
//! its pace, while the guest writes on (classic fleecing, reference §5.5, on QEMU 5.0 and later).
//!
//! Start, one transaction with rollback: per disk a qcow2 scratch image the SDK creates, standing
//! on the disk's top node; one QMP `transaction` of the checkpoint actions (and, incremental, the
//! temporary bitmap merged from the chain) and a `blockdev-backup` `sync: none` per disk, which
//! copies a block into the scratch only before the guest overwrites it; QEMU's NBD server; an
//! export per disk of its scratch node (named after the disk; read-only; an incremental one offers
//! the temporary bitmap as `qemu:dirty-bitmap:qhotplug-backup`). End, in order: the exports (their
//! readers dropped), the jobs, the server, the scratch nodes and files, the temporary bitmap; and
//! the new checkpoint kept ([`PullBackup::finish`]) or given back ([`PullBackup::cancel`], or a
//! handle dropped).

use std::path::PathBuf;
use std::sync::Arc;

use qhotplug_cmdline::{Disk, Nbd, NbdServer};
use qhotplug_qmp::command::{BlockdevBackup, QmpTransaction, TransactionAction};
use tracing::Instrument;

use crate::engine::holds::Busy;
use crate::error::Result;
use crate::qemu::delete::Delete;
use crate::storage::backup_prep::{self, Image, Prepared, Wanted};
use crate::storage::nbd::{self, Export};
use crate::vm_core::{clean_up_after_drop, Core};
use qhotplug_cmdline::names::{self, BACKUP_BITMAP};

/// The commands a pull backup uses besides the checkpoints'.
const COMMANDS: &[&str] = &[
    "blockdev-backup",
    "blockdev-create",
    "transaction",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "job-cancel",
    "job-dismiss",
];

/// A pull backup ([`Vm::pull_backup`](crate::Vm::pull_backup)): full or incremental since a
/// checkpoint, of which disks (each with a scratch file for the blocks the guest overwrites
/// meanwhile), served where.
///
/// ```
/// use qhotplug::{NbdServer, PullConfig};
/// let pull = PullConfig::full(NbdServer::Unix("/run/backup/vm1.sock".into()))
///     .disk("data-1", "/var/tmp/data-1.scratch.qcow2")
///     .checkpoint("mon");
/// # let _ = pull;
/// ```
#[derive(Debug, Clone)]
pub struct PullConfig {
    since: Option<String>,
    server: NbdServer,
    disks: Vec<(String, PathBuf)>,
    checkpoint: Option<String>,
}

impl PullConfig {
    /// The whole of each disk, served by QEMU's NBD server at `server`.
    pub fn full(server: NbdServer) -> PullConfig {
        PullConfig {
            since: None,
            server,
            disks: Vec::new(),
            checkpoint: None,
        }
    }

    /// Each disk, with what the guest wrote since checkpoint `since` offered to the reader as a
    /// dirty bitmap ([`PullBackup::dirty_bitmap`]), so it reads only the changed extents.
    pub fn incremental(since: impl Into<String>, server: NbdServer) -> PullConfig {
        PullConfig {
            since: Some(since.into()),
            ..PullConfig::full(server)
        }
    }

    /// Disk `id` is served; `scratch` (which must not exist: the SDK creates it, and removes it
    /// at the end) holds the blocks the guest overwrites while the backup runs.
    pub fn disk(mut self, id: impl Into<String>, scratch: impl Into<PathBuf>) -> Self {
        self.disks.push((id.into(), scratch.into()));
        self
    }

    /// Makes checkpoint `name` at the backup's point in time, kept if the backup
    /// [`finish`](PullBackup::finish)es.
    pub fn checkpoint(mut self, name: impl Into<String>) -> Self {
        self.checkpoint = Some(name.into());
        self
    }
}

/// One disk being served.
#[derive(Debug)]
struct Served {
    /// The disk as it is once the backup finishes (with the new checkpoint).
    after: Disk,
    /// The scratch file.
    scratch: PathBuf,
    /// Its nodes.
    nodes: [String; 2],
    /// What gives the new checkpoint's record back.
    undo_checkpoint: Option<Delete>,
}

/// A pull backup being served ([`Vm::pull_backup`](crate::Vm::pull_backup)): each disk's view as
/// of the start, read over NBD. It ends by [`finish`](PullBackup::finish) (the reader is done: the
/// checkpoint stays) or [`cancel`](PullBackup::cancel); dropped, it is cancelled in the background.
pub struct PullBackup {
    core: Arc<Core>,
    server: NbdServer,
    served: Vec<Served>,
    incremental: bool,
    busy: Option<Vec<Busy>>,
}

impl std::fmt::Debug for PullBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullBackup")
            .field("server", &self.server)
            .field("served", &self.served)
            .field("incremental", &self.incremental)
            .finish_non_exhaustive()
    }
}

impl PullBackup {
    /// Where QEMU's NBD server listens.
    pub fn server(&self) -> &NbdServer {
        &self.server
    }

    /// The NBD source of disk `id`'s view (the export is named after the disk), for a reader:
    /// `source.uri()` is `nbd+unix:///<id>?socket=…` or `nbd://host:port/<id>`.
    pub fn source(&self, id: &str) -> Option<Nbd> {
        self.served.iter().find(|s| s.after.id == id).map(|_| Nbd {
            server: self.server.clone(),
            export: Some(id.to_owned()),
            reconnect_delay: None,
            tls_dir: None,
        })
    }

    /// The NBD meta context of an incremental backup's dirty bitmap, which marks what changed
    /// since the checkpoint (`qemu:dirty-bitmap:qhotplug-backup`); `None` for a full one.
    pub fn dirty_bitmap(&self) -> Option<String> {
        self.incremental
            .then(|| names::dirty_bitmap_context(BACKUP_BITMAP))
    }

    /// The reader is done: everything is torn down in order, and the new checkpoint stays
    /// (`vm.spec()` lists it). Returns the disks as they now are.
    pub async fn finish(mut self) -> Result<Vec<Disk>> {
        let busy = self.busy.take();
        let ended = end(&self.core, std::mem::take(&mut self.served), true).await;
        drop(busy);
        ended
    }

    /// Ends the backup without keeping it: everything is torn down and the checkpoints are as
    /// they were before it.
    pub async fn cancel(mut self) -> Result<()> {
        let busy = self.busy.take();
        let ended = end(&self.core, std::mem::take(&mut self.served), false).await;
        drop(busy);
        ended.map(drop)
    }
}

impl Drop for PullBackup {
    fn drop(&mut self) {
        let Some(busy) = self.busy.take() else {
            return;
        };
        let core = self.core.clone();
        let served = std::mem::take(&mut self.served);
        let disks: Vec<&str> = served.iter().map(|s| s.after.id.as_str()).collect();
        let id = disks.join(",");
        let ended = clean_up_after_drop(
            Some(&self.core),
            &id,
            "pull backup handle dropped",
            busy,
            |busy| async move {
                if let Err(error) = end(&core, served, false).await {
                    tracing::warn!(%error, "the dropped pull backup's end was not clean");
                }
                drop(busy);
            },
        );
        // Its exports and jobs stay: the disks stay busy until a reconcile.
        if let Err(busy) = ended {
            busy.leak();
        }
    }
}

/// Tears a pull backup down in order; `keep`: the new checkpoints stay (the spec gets them).
async fn end(core: &Core, served: Vec<Served>, keep: bool) -> Result<Vec<Disk>> {
    let mut steps: Vec<Delete> = served
        .iter()
        .map(|s| Delete::Export(names::pull_job(&s.after.id)))
        .collect();
    steps.extend(
        served
            .iter()
            .map(|s| Delete::Job(names::pull_job(&s.after.id))),
    );
    steps.push(Delete::NbdServer);
    for s in &served {
        steps.extend(s.nodes.iter().cloned().map(Delete::BlockNode));
        steps.push(Delete::UnusedFdsets(names::fdset_tag(&s.after.id)));
        steps.push(Delete::Bitmap {
            node: s.after.top_node(),
            name: BACKUP_BITMAP.into(),
        });
        if !keep {
            steps.extend(s.undo_checkpoint.clone());
        }
    }
    // The scratch files go from the host first: QEMU keeps its fds until the nodes are deleted,
    // and a process that dies part-way through the teardown leaves no file behind.
    for s in &served {
        let _ = std::fs::remove_file(&s.scratch);
    }
    let mut first_error = None;
    for step in steps {
        let span = tracing::debug_span!(crate::spans::STEP, name = step.command(), id = "pull");
        if let Err(error) = step.run(&core.client).instrument(span).await {
            tracing::warn!(%step, %error, "a pull backup's leftover for reconcile");
            first_error.get_or_insert(error);
        }
    }
    let mut disks = Vec::new();
    for s in served {
        if keep {
            core.state().update(s.after.clone().into());
        }
        disks.push(s.after);
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(disks),
    }
}

/// See [`Vm::pull_backup`](crate::Vm::pull_backup).
pub(crate) async fn start(core: &Arc<Core>, config: PullConfig) -> Result<PullBackup> {
    core.require("pull backup", COMMANDS).await?;
    core.require("pull backup", crate::storage::checkpoint::COMMANDS)
        .await?;
    let wanted: Vec<Wanted> = config
        .disks
        .iter()
        .map(|(disk, scratch)| Wanted {
            disk: disk.clone(),
            path: scratch.clone(),
            image: Image::Scratch,
        })
        .collect();
    let (mut txn, prepared) = backup_prep::prepare(
        core,
        "pull backup",
        &wanted,
        config.since.as_deref(),
        config.checkpoint.as_deref(),
    )
    .await?;
    let client = core.client.clone();
    // The point in time: every disk's checkpoint actions and copy-before-write job at once.
    let incremental = config.since.is_some();
    let mut actions: Vec<TransactionAction> = Vec::new();
    let mut served = Vec::new();
    let mut nows = Vec::new();
    let mut undos = Vec::new();
    let mut scratches = Vec::new();
    for Prepared { disk, image, at } in prepared {
        actions.extend(at.actions);
        undos.extend(at.temporary);
        undos.extend(at.undo_checkpoint.clone());
        nows.push(at.now);
        let target = disk.with_top(&image.layer);
        actions.push(TransactionAction::of(&BlockdevBackup {
            job_id: names::pull_job(&disk.id),
            device: disk.top_node(),
            target: target.top_node(),
            sync: "none".into(),
            bitmap: None,
            speed: None,
            auto_finalize: None,
            auto_dismiss: Some(false),
            x_perf: None,
        }));
        undos.push(Delete::Job(names::pull_job(&disk.id)));
        served.push(Served {
            after: at.after,
            scratch: image.layer.path.clone(),
            nodes: image.layer.node_names(&disk.id),
            undo_checkpoint: at.undo_checkpoint,
        });
        scratches.push(image);
    }
    let start = QmpTransaction {
        actions,
        properties: None,
    };
    txn.step("transaction", None, client.execute(&start))
        .await?;
    for undo in undos {
        txn.push_undo(undo);
    }
    let exports = served
        .iter()
        .map(|s| Export {
            id: names::pull_job(&s.after.id),
            node: s.nodes[0].clone(),
            name: names::export_name(&s.after.id),
            writable: false,
            bitmaps: if incremental {
                vec![BACKUP_BITMAP.into()]
            } else {
                Vec::new()
            },
        })
        .collect();
    nbd::serve(&mut txn, &client, &config.server, None, exports).await?;
    let busy = txn.commit();
    // The scratch files are the backup's now: removed at its end.
    for scratch in scratches {
        scratch.keep();
    }
    // Checkpoints QEMU no longer has (inconsistent ones the transaction removed) leave the spec;
    // the new one joins it when the backup finishes.
    for now in nows {
        core.state().update(now.into());
    }
    tracing::info!(disks = served.len(), incremental, "pull backup served");
    Ok(PullBackup {
        core: core.clone(),
        server: config.server,
        served,
        incremental,
        busy: Some(busy),
    })
}
