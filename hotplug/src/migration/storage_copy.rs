//! Live migration without shared storage (reference §4.5; libvirt's, Proxmox's and KubeVirt's
//! way, QEMU's block migration having been removed in 9.1): before memory moves, each disk is
//! mirrored into the target's own image over NBD.
//!
//! Target: `nbd-server-start`, then a writable `block-export-add` of each disk's node (the
//! target's images are new local files of the same size, which its spec names). Source: per disk
//! an NBD client node and a raw node on it (`mig-<id>-nbd`, `mig-<id>-raw`), then
//! `blockdev-mirror` (`mig-<id>`); every mirror `ready`. Then memory migrates
//! ([`migrate`](crate::migration::migrate)); once it completed, each mirror is ended without a pivot (the
//! soft cancel: the target's image is a consistent copy), its nodes go, and the target's exports
//! and server. Failure anywhere, on either side, leaves the source on its own disks with nothing
//! attached: the mirrors force-cancelled, their nodes deleted, the target's exports and server
//! stopped if the target is still there.

use std::sync::Arc;
use std::time::Duration;

use qhotplug_cmdline::{names, Disk, Nbd, NbdServer, TlsEndpoint};
use qhotplug_qmp::command::{BlockJobCancel, BlockdevAdd, BlockdevMirror};
use tracing::Instrument;

use crate::engine::holds::Named;
use crate::engine::transaction::Transaction;
use crate::error::{Error, Result};
use crate::kinds::Device;
use crate::qemu::block::Blocks;
use crate::qemu::delete::Delete;
use crate::storage::nbd::{self, Export};
use crate::vm_core::Core;

/// The commands a storage copy uses on the source.
const SOURCE_COMMANDS: &[&str] = &[
    "blockdev-add",
    "blockdev-del",
    "blockdev-mirror",
    "block-job-cancel",
    "job-cancel",
    "job-dismiss",
    "query-jobs",
];

/// The commands it uses on the target.
const TARGET_COMMANDS: &[&str] = &[
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
];

/// How long a copy's soft cancel may take to conclude at the switch.
const END_WAIT: Duration = Duration::from_secs(60);

/// How often the disks' progress is reported while they copy.
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// A migration's storage copy ([`MigrationOptions::copy_storage`](crate::MigrationOptions)):
/// the target's NBD server address, which disks, and how.
///
/// Each disk is a mirror onto the target's NBD export with QEMU's defaults: the target's cluster
/// size as granularity, up to 16 MiB in flight as requests of up to 1 MiB, no rate limit, guest
/// writes copied in the background. Over a Unix socket on this project's machines it copies
/// 1.4–1.9× faster than `qemu-img convert` onto the same export, about 0.6 of a local copy; a
/// larger buffer was slower (BENCHMARKS.md). [`buffer`](StorageCopy::buffer) and
/// [`write_blocking`](StorageCopy::write_blocking) change them.
#[derive(Debug, Clone)]
pub struct StorageCopy {
    server: NbdServer,
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    disks: Option<Vec<String>>,
    shallow: bool,
    write_blocking: bool,
    buffer: Option<u64>,
    ready_timeout: Duration,
}

impl StorageCopy {
    /// Every local disk of the VM, copied over the target's NBD server at `server` (a Unix socket
    /// or TCP: the target QEMU listens there during the copy).
    pub fn new(server: NbdServer) -> StorageCopy {
        StorageCopy {
            server,
            tls: None,
            disks: None,
            shallow: false,
            write_blocking: false,
            buffer: None,
            ready_timeout: Duration::from_secs(3600),
        }
    }

    /// The copy goes over TLS: x509 credentials as QEMU's `tls-creds-x509` reads them, the
    /// target's in `server_dir` (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`), the
    /// source's in `client_dir` (`ca-cert.pem`, the CA the target's certificate is checked
    /// against; the server's name is the TCP host).
    pub fn tls(
        mut self,
        server_dir: impl Into<std::path::PathBuf>,
        client_dir: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.tls = Some((server_dir.into(), client_dir.into()));
        self
    }

    /// Only these disks (the others are on shared storage).
    pub fn disks<I: IntoIterator<Item = S>, S: Into<String>>(mut self, ids: I) -> Self {
        self.disks = Some(ids.into_iter().map(Into::into).collect());
        self
    }

    /// Copy each disk's top image only (`sync: top`): the target's images stand on a copy of the
    /// same backing chain already (a shared template).
    pub fn shallow(mut self, on: bool) -> Self {
        self.shallow = on;
        self
    }

    /// Guest writes go to the target synchronously too (`copy-mode: write-blocking`), so a guest
    /// that writes faster than the copy cannot keep it from converging.
    pub fn write_blocking(mut self, on: bool) -> Self {
        self.write_blocking = on;
        self
    }

    /// The most bytes in flight from each disk to its copy (`buf-size`; QEMU's default 16 MiB).
    pub fn buffer(mut self, bytes: u64) -> Self {
        self.buffer = Some(bytes);
        self
    }

    /// How long the disks may take to be in sync before memory migrates (default an hour).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }
}

/// The copies running, as one [`Transaction`] per QEMU: each step's undo recorded before the step
/// is awaited (the mirrors' forced cancel, the client nodes, the TLS objects, the exports and the
/// server). Their end runs the undo as a teardown after the soft cancels; a failure, or a drop
/// (the migration's future dropped), rolls both back.
pub(crate) struct Copies {
    source: Transaction<Named>,
    target: Transaction<Named>,
    source_core: Arc<Core>,
    /// The source's mirror jobs.
    jobs: Vec<String>,
}

/// The disks to copy: the chosen ones, or every local one, from the source's spec; each must be
/// in the target's spec too, local, and of the same size on both (checked by QEMU's word).
async fn disks_to_copy(source: &Core, target: &Core, copy: &StorageCopy) -> Result<Vec<Disk>> {
    let disks: Vec<Disk> = {
        let state = source.state();
        let spec = state.spec();
        match &copy.disks {
            // Every local disk; network ones are on storage both QEMUs reach.
            None => spec
                .disks
                .iter()
                .filter(|d| d.network_source().is_none())
                .cloned()
                .collect(),
            Some(ids) => {
                let mut chosen = Vec::new();
                for id in ids {
                    let disk = spec
                        .disks
                        .iter()
                        .find(|d| &d.id == id && d.network_source().is_none())
                        .ok_or_else(|| {
                            Error::InvalidMigration(format!("no local disk {id} to copy"))
                        })?;
                    chosen.push(disk.clone());
                }
                chosen
            }
        }
    };
    let here = Blocks::read(&source.client).await?;
    let there = Blocks::read(&target.client).await?;
    for disk in &disks {
        let Some(Device::Disk(theirs)) = target.state().device(&disk.id) else {
            return Err(Error::InvalidMigration(format!(
                "the target has no disk {}",
                disk.id
            )));
        };
        let (ours, its) = (
            here.size_of(&disk.top_node()),
            there.size_of(&theirs.top_node()),
        );
        if ours != its {
            return Err(Error::InvalidMigration(format!(
                "disk {} is {} bytes here and {} on the target: its image there must be as large",
                disk.id,
                ours.unwrap_or(0),
                its.unwrap_or(0)
            )));
        }
    }
    Ok(disks)
}

/// Starts the copies and waits until every mirror is `ready`, reporting their progress. On
/// failure everything started is undone before the error returns.
pub(crate) async fn start(
    source: &Arc<Core>,
    target: &Arc<Core>,
    copy: &StorageCopy,
    progress: &mut impl FnMut(u64, u64),
) -> Result<Copies> {
    source.require("storage migration", SOURCE_COMMANDS).await?;
    target.require("storage migration", TARGET_COMMANDS).await?;
    let disks = disks_to_copy(source, target, copy).await?;
    let name = source.state().spec().name.clone();
    let side = |core: &Arc<Core>| {
        let hold = Named(name.clone(), Some(core.clone()));
        Transaction::new(core.client.clone(), "storage migration", hold)
    };
    let mut copies = Copies {
        source: side(source),
        target: side(target),
        source_core: source.clone(),
        jobs: Vec::new(),
    };
    let mut events = source.client.events();
    match launch(source, target, copy, &disks, &mut copies).await {
        Ok(()) => {}
        Err(error) => return Err(copies.abort(error).await),
    }
    let ready = wait_ready(
        source,
        &mut events,
        &copies.jobs,
        copy.ready_timeout,
        progress,
    )
    .await;
    match ready {
        Ok(()) => Ok(copies),
        Err(error) => Err(copies.abort(error).await),
    }
}

/// The target's server and exports, the source's client nodes and mirrors, each recorded in
/// `copies` as soon as it exists.
async fn launch(
    source: &Core,
    target: &Core,
    copy: &StorageCopy,
    disks: &[Disk],
    copies: &mut Copies,
) -> Result<()> {
    let tls_creds = match &copy.tls {
        Some((server_dir, client_dir)) => {
            Some(tls(source, target, server_dir, client_dir, copies).await?)
        }
        None => None,
    };
    let exports = disks
        .iter()
        .map(|disk| {
            let Some(Device::Disk(theirs)) = target.state().device(&disk.id) else {
                unreachable!("checked: the target has the disk")
            };
            Export {
                id: names::migration_job(&disk.id),
                node: theirs.top_node(),
                name: names::export_name(&disk.id),
                writable: true,
                bitmaps: Vec::new(),
            }
        })
        .collect();
    let client = target.client.clone();
    nbd::serve(
        &mut copies.target,
        &client,
        &copy.server,
        tls_creds.clone(),
        exports,
    )
    .await?;
    for disk in disks {
        mirror(source, copy, disk, tls_creds.as_deref(), copies).await?;
    }
    Ok(())
}

/// Each side's TLS credentials object (the target's a server's, the source's a client's), each
/// removed after what uses it; returns the id both have.
async fn tls(
    source: &Core,
    target: &Core,
    server_dir: &std::path::Path,
    client_dir: &std::path::Path,
    copies: &mut Copies,
) -> Result<String> {
    let tls = Delete::Object(names::MIGRATION_TLS.into());
    let on_target =
        qhotplug_cmdline::tls_creds(names::MIGRATION_TLS, server_dir, TlsEndpoint::Server)
            .object_add();
    let client = target.client.clone();
    copies
        .target
        .step("object-add", Some(tls.clone()), client.execute(&on_target))
        .await?;
    let on_source =
        qhotplug_cmdline::tls_creds(names::MIGRATION_TLS, client_dir, TlsEndpoint::Client)
            .object_add();
    let client = source.client.clone();
    copies
        .source
        .step("object-add", Some(tls), client.execute(&on_source))
        .await?;
    Ok(names::MIGRATION_TLS.to_owned())
}

/// Disk `disk`'s copy on the source: an NBD client node of the target's export, a raw node on
/// it, and `blockdev-mirror` into that.
async fn mirror(
    source: &Core,
    copy: &StorageCopy,
    disk: &Disk,
    tls_creds: Option<&str>,
    copies: &mut Copies,
) -> Result<()> {
    let client = source.client.clone();
    let [nbd, raw] = names::migration_client_nodes(&disk.id);
    // The client of the target's export, rendered by the one NBD model.
    let export = Nbd {
        server: copy.server.clone(),
        export: Some(names::export_name(&disk.id)),
        reconnect_delay: None,
        tls_dir: None,
    };
    let mut nbd_node = export.blockdev_add(&nbd);
    if let Some(creds) = tls_creds {
        nbd_node.props.insert("tls-creds".into(), creds.into());
    }
    copies
        .source
        .step(
            "blockdev-add",
            Some(Delete::BlockNode(nbd.clone())),
            client.execute(&nbd_node),
        )
        .await?;
    let raw_node = BlockdevAdd {
        driver: "raw".into(),
        node_name: raw.clone(),
        props: [("file".to_owned(), nbd.into())].into_iter().collect(),
    };
    copies
        .source
        .step(
            "blockdev-add",
            Some(Delete::BlockNode(raw.clone())),
            client.execute(&raw_node),
        )
        .await?;
    let job = names::migration_job(&disk.id);
    let mirror = BlockdevMirror {
        job_id: job.clone(),
        device: disk.top_node(),
        target: raw,
        sync: if copy.shallow { "top" } else { "full" }.into(),
        granularity: None,
        speed: None,
        copy_mode: copy.write_blocking.then(|| "write-blocking".into()),
        auto_dismiss: Some(false),
        buf_size: copy.buffer,
    };
    copies
        .source
        .step(
            "blockdev-mirror",
            Some(Delete::Job(job.clone())),
            client.execute(&mirror),
        )
        .await?;
    copies.jobs.push(job);
    Ok(())
}

/// Waits until every job of `jobs` is `ready`, by `timeout`, reporting their progress summed
/// (bytes done, bytes to do) at each status change and every [`REPORT_EVERY`].
async fn wait_ready(
    source: &Core,
    events: &mut qhotplug_qmp::EventStream,
    jobs: &[String],
    timeout: Duration,
    progress: &mut impl FnMut(u64, u64),
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let listed = source
            .client
            .execute(&qhotplug_qmp::command::QueryJobs)
            .await?;
        let ours: Vec<_> = listed.iter().filter(|j| jobs.contains(&j.id)).collect();
        if let Some(failed) = ours.iter().find(|j| j.status == "concluded") {
            return Err(Error::JobFailed {
                id: failed.id.clone(),
                error: failed
                    .error
                    .clone()
                    .unwrap_or_else(|| "ended before it was in sync".into()),
            });
        }
        if ours.len() < jobs.len() {
            return Err(Error::JobGone(jobs.join(", ")));
        }
        progress(
            ours.iter().map(|j| j.current_progress).sum(),
            ours.iter().map(|j| j.total_progress).sum(),
        );
        if ours.iter().all(|j| j.status == "ready") {
            return Ok(());
        }
        let wake = (tokio::time::Instant::now() + REPORT_EVERY).min(deadline);
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::JobTimeout {
                id: jobs.join(", "),
                status: "running".into(),
                want: "ready",
                after: timeout,
            });
        }
        let changed = |e: &qhotplug_qmp::EventKind| matches!(e, qhotplug_qmp::EventKind::JobStatusChange(c) if jobs.contains(&c.id));
        events.wait_for(wake, changed).await;
    }
}

impl Copies {
    /// After memory migrated: each mirror ended without a pivot (the target's image is the
    /// disk as of the switch), then the rest of both sides' undo run as the copy's teardown (the
    /// source's client nodes, the target's exports and server).
    pub(crate) async fn finish(mut self) -> Result<()> {
        let source = self.source_core.clone();
        let mut events = source.client.events();
        for job in &self.jobs {
            let cancel = BlockJobCancel {
                device: job.clone(),
                force: None,
            };
            let client = source.client.clone();
            // On a failure here both sides roll back (the mirrors force-cancelled).
            if let Err(error) = self
                .source
                .step("block-job-cancel", None, client.execute(&cancel))
                .await
            {
                return Err(self.target.abort(error).await);
            }
        }
        let mut first_error = None;
        for job in &self.jobs {
            let span = tracing::debug_span!(crate::spans::STEP, name = "wait concluded", id = %job);
            let concluded = crate::qemu::jobs::conclude(&source.client, &mut events, job);
            // A target that died just before the soft cancel can leave QEMU retrying for good
            // (qemu-project/qemu#462): after a deadline the job is force-cancelled.
            let ended = match tokio::time::timeout(END_WAIT, concluded.instrument(span)).await {
                Ok(ended) => ended,
                Err(_) => {
                    run(&source.client, &Delete::Job(job.clone())).await;
                    Err(Error::JobTimeout {
                        id: job.clone(),
                        status: "ready".into(),
                        want: "concluded",
                        after: END_WAIT,
                    })
                }
            };
            if let Err(error) = ended {
                first_error.get_or_insert(error);
            }
        }
        // The jobs are gone (concluded and dismissed, or force-cancelled): the rest is teardown.
        self.source.forget(|d| !matches!(d, Delete::Job(_)));
        for failure in self.source.unwind().await {
            tracing::warn!(%failure, "storage migration clean-up");
        }
        for failure in self.target.unwind().await {
            tracing::warn!(%failure, "storage migration clean-up");
        }
        first_error.map_or(Ok(()), Err)
    }

    /// After a failure: the source rolled back (the mirrors force-cancelled first), then the
    /// target; `error` is handed back.
    pub(crate) async fn abort(self, error: Error) -> Error {
        let error = self.source.abort(error).await;
        self.target.abort(error).await
    }
}

/// Runs one delete, logged; a failure (a target gone) is left at a warning.
async fn run(client: &qhotplug_qmp::Client, step: &Delete) {
    let span = tracing::debug_span!(crate::spans::STEP, name = step.command(), id = "migration");
    if let Err(error) = step.run(client).instrument(span).await {
        tracing::warn!(%step, %error, "storage migration clean-up");
    }
}
