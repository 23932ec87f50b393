//! Live migration as one awaitable call: [`Vm::migrate`] moves the guest to a target launched
//! from the source's spec ([`Vm::migration_launcher`]), hot-plugged devices and all.
//!
//! The sequence: check both QEMUs' schemas and capabilities → capabilities and parameters on
//! both sides (`migrate-set-capabilities`, `migrate-set-parameters`) → the transport (a Unix
//! socket, an fd pair given to both with `getfd`, or TCP) → `migrate-incoming` on the target,
//! `migrate` on the source → follow `MIGRATION` and `MIGRATION_PASS` (each pass read with
//! `query-migrate` into a [`Progress`]), switching to post-copy when asked → the outcome.
//!
//! Outcomes: completed (the target runs; the source is quit or left paused, as asked); failed
//! (the source runs again as it was, the target QEMU is quit and reaped, and the reason is QEMU's);
//! cancelled (dropping the future, or [`Vm::cancel_migration`], sends `migrate_cancel`); timed out
//! (a deadline on the whole migration, which cancels). However it ends, no target QEMU, fd or
//! socket is left behind.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use qhotplug_cmdline::{names, Launcher, VmSpec};
use qhotplug_qmp::command::{
    Cont, MigrateCancel, MigrateIncoming, MigrateSetCapabilities, MigrateSetParameters,
    MigrateStartPostcopy, MigrationCapabilityStatus, MigrationInfo, QueryMigrate,
    QueryMigrateCapabilities, QueryStatus,
};
use qhotplug_qmp::{Client, EventKind};
use tracing::Instrument;

use crate::error::{Error, MigrationFailure, Result};
use crate::migration::storage_copy::{self, StorageCopy};
use crate::spans::step;
use crate::vm_core::{clean_up_after_drop, hotplug_span, Core, Outgoing as Migrating};

/// The QMP commands a migration uses on the source.
const SOURCE_COMMANDS: &[&str] = &[
    "migrate",
    "migrate_cancel",
    "query-migrate",
    "query-migrate-capabilities",
    "migrate-set-capabilities",
    "migrate-set-parameters",
];

/// How the migration stream travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A Unix socket the target listens on.
    Unix(PathBuf),
    /// A socket pair made by the SDK, one end given to each QEMU with `getfd` (`fd:` URIs): no
    /// path on disk. One connection, so no multifd.
    Fd,
    /// TCP: the target listens on `host:port` (port 0: one QEMU picks).
    Tcp {
        /// The address the target listens on and the source connects to.
        host: String,
        /// The port, or 0.
        port: u16,
    },
}

/// What becomes of the source once the guest runs on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceAfter {
    /// The source QEMU quits (default).
    #[default]
    Quit,
    /// The source QEMU stays, paused (`postmigrate`).
    Paused,
}

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    transport: Transport,
    bandwidth: Option<u64>,
    downtime_limit: Option<Duration>,
    multifd_channels: Option<u8>,
    auto_converge: bool,
    dirty_bitmaps: bool,
    storage: Option<StorageCopy>,
    postcopy_after: Option<u64>,
    deadline: Option<Duration>,
    source_after: SourceAfter,
}

impl MigrationOptions {
    /// Over `transport`, with QEMU's defaults for everything else, no deadline, and the source
    /// quit afterwards.
    pub fn new(transport: Transport) -> Self {
        MigrationOptions {
            transport,
            bandwidth: None,
            downtime_limit: None,
            multifd_channels: None,
            auto_converge: false,
            dirty_bitmaps: false,
            storage: None,
            postcopy_after: None,
            deadline: None,
            source_after: SourceAfter::Quit,
        }
    }

    /// Bandwidth limit, bytes per second (`max-bandwidth`).
    pub fn bandwidth(mut self, bytes_per_second: u64) -> Self {
        self.bandwidth = Some(bytes_per_second);
        self
    }

    /// The most downtime to aim for (`downtime-limit`).
    pub fn downtime_limit(mut self, limit: Duration) -> Self {
        self.downtime_limit = Some(limit);
        self
    }

    /// Several channels (the `multifd` capability on both sides, `multifd-channels`).
    pub fn multifd(mut self, channels: u8) -> Self {
        self.multifd_channels = Some(channels);
        self
    }

    /// Throttle the guest's vCPUs when it dirties memory faster than it can be sent
    /// (`auto-converge`).
    pub fn auto_converge(mut self, on: bool) -> Self {
        self.auto_converge = on;
        self
    }

    /// The disks' checkpoints (their dirty bitmaps) travel with the migration stream (the
    /// `dirty-bitmaps` capability on both sides), so an incremental backup on the target goes on
    /// from them. Without it, persistent bitmaps on shared storage reach the target through the
    /// image only.
    pub fn dirty_bitmaps(mut self, on: bool) -> Self {
        self.dirty_bitmaps = on;
        self
    }

    /// Without shared storage: before memory moves, each disk is mirrored over NBD into the
    /// target's own image (the target's spec names new local images of the same size), and the
    /// copies end at the switch ([`StorageCopy`]). Progress covers the disks, then memory.
    pub fn copy_storage(mut self, copy: StorageCopy) -> Self {
        self.storage = Some(copy);
        self
    }

    /// Post-copy (`postcopy-ram` on both sides): switch (`migrate-start-postcopy`) once pass
    /// `pass` begins. The switch is final: from then on a failure loses the guest.
    pub fn postcopy_after(mut self, pass: u64) -> Self {
        self.postcopy_after = Some(pass);
        self
    }

    /// Give up (cancel) if the migration has not completed after this long.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// What becomes of the source afterwards (default: it quits).
    pub fn source_after(mut self, after: SourceAfter) -> Self {
        self.source_after = after;
        self
    }
}

/// A snapshot of a migration's progress, from `query-migrate` at each pass or status change (and,
/// while a storage copy runs first, its disks' progress every half second).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// QEMU's status (`active`, `postcopy-active`, …).
    pub status: String,
    /// Bytes of RAM sent.
    pub transferred: u64,
    /// Bytes of RAM left.
    pub remaining: u64,
    /// The guest's RAM, in bytes.
    pub total: u64,
    /// Pages dirtied per second.
    pub dirty_rate: u64,
    /// Passes over memory so far.
    pub passes: u64,
    /// Bytes of the disks copied so far ([`StorageCopy`](crate::StorageCopy)).
    pub disks_done: u64,
    /// Bytes of the disks to copy (it grows as the guest writes).
    pub disks_total: u64,
}

/// See [`Vm::cancel_migration`](crate::Vm::cancel_migration).
pub(crate) async fn cancel(core: &Core) -> Result<()> {
    core.client.execute(&MigrateCancel).await?;
    Ok(())
}

/// Sends `migrate_cancel` if dropped armed: a migration future dropped part-way cancels.
pub(crate) struct CancelOnDrop {
    source: Arc<Core>,
    armed: bool,
}

impl CancelOnDrop {
    /// Not armed yet: nothing is sent until [`arm`](CancelOnDrop::arm).
    pub(crate) fn new(source: Arc<Core>) -> CancelOnDrop {
        CancelOnDrop {
            source,
            armed: false,
        }
    }

    /// From now on a drop cancels: `migrate` is about to be sent.
    pub(crate) fn arm(&mut self) {
        self.armed = true;
    }

    /// The migration ended: a drop does nothing.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            // Dropped before `migrate` was sent: no migration of this process's runs.
            let mut outgoing = self.source.outgoing();
            if *outgoing == Migrating::Running {
                *outgoing = Migrating::None;
            }
            return;
        }
        let client = self.source.client.clone();
        let source = self.source.clone();
        let name = self.source.state().spec().name.clone();
        let _ = clean_up_after_drop(
            Some(&self.source),
            &name,
            "migration dropped",
            (),
            |()| async move {
                if let Err(error) = client.execute(&MigrateCancel).await {
                    tracing::warn!(%error, "cancelling a dropped migration");
                }
                *source.outgoing() = Migrating::None;
            },
        );
    }
}

/// How long a completed migration's final figures are waited for.
const FIGURES_WAIT: Duration = Duration::from_secs(1);

/// A launcher for a migration target from the source's `spec` as it is now; see
/// [`Vm::migration_launcher`](crate::Vm::migration_launcher).
pub(crate) fn migration_launcher(mut spec: VmSpec, runtime_dir: PathBuf) -> Launcher {
    spec.incoming = true;
    spec.paused = false;
    Launcher::new(spec, runtime_dir)
}

/// See [`Vm::migrate`](crate::Vm::migrate): the source is `source`, the target `target`; on
/// success, the source's final `query-migrate` (its figures: total time, downtime).
pub(crate) async fn migrate(
    source: &Arc<Core>,
    target: &Arc<Core>,
    options: MigrationOptions,
    progress: impl FnMut(&Progress),
) -> Result<MigrationInfo> {
    let name = source.state().spec().name.clone();
    let span = hotplug_span("migrate", &name);
    let was_running = source.client.execute(&QueryStatus).await?.running;
    let mut guard = CancelOnDrop::new(source.clone());
    *source.outgoing() = Migrating::Running;
    let outcome = run_migration(source, target, &options, progress, &mut guard)
        .instrument(span.clone())
        .await;
    guard.disarm();
    *source.outgoing() = match outcome {
        Ok(_) => Migrating::Completed,
        Err(_) => Migrating::None,
    };
    match outcome {
        Ok(info) => {
            target.state().migrated_in();
            if options.source_after == SourceAfter::Quit {
                source.quit().await?;
            }
            span.in_scope(|| tracing::info!(?info.downtime, ?info.total_time, "migrated"));
            Ok(info)
        }
        Err(error) => {
            // The source runs again as it was (QEMU restarts it after a failure or cancel;
            // make sure), and the target goes.
            if was_running && !source.client.execute(&QueryStatus).await?.running {
                source.client.execute(&Cont).await?;
            }
            if let Err(e) = target.quit().await {
                tracing::warn!(error = %e, "quitting the migration target");
            }
            span.in_scope(|| tracing::info!(%error, "migration did not complete"));
            Err(error)
        }
    }
}

/// The whole exchange; `Ok` with the source's final `query-migrate` once completed. Its stages:
/// [`check`], [`configure`] both sides, [`start`] (the target listens, the source sends), and
/// [`follow`] the source's events to the end.
async fn run_migration(
    source: &Arc<Core>,
    target: &Arc<Core>,
    options: &MigrationOptions,
    mut progress: impl FnMut(&Progress),
    guard: &mut CancelOnDrop,
) -> Result<MigrationInfo> {
    check(source, target, options).await?;
    configure(source, target, options).await?;
    // Without shared storage, the disks are in sync first.
    let copies = match &options.storage {
        Some(copy) => {
            let mut disks = |done, total| {
                progress(&Progress {
                    status: "copying storage".into(),
                    disks_done: done,
                    disks_total: total,
                    ..Progress::default()
                })
            };
            Some(storage_copy::start(source, target, copy, &mut disks).await?)
        }
        None => None,
    };
    let moved = async {
        // Subscribed before anything starts, so no event is missed.
        let mut events = source.client.events();
        let mut target_events = target.client.events();
        start(source, target, options, guard).await?;
        follow(
            source,
            target,
            options,
            &mut events,
            &mut target_events,
            progress,
        )
        .await
    };
    let moved = moved.await;
    match (moved, copies) {
        (Ok(info), Some(copies)) => copies.finish().await.map(|()| info),
        (Err(error), Some(copies)) => Err(copies.abort(error).await),
        (moved, None) => moved,
    }
}

/// What both QEMUs must have and what the options must agree on, before anything is sent.
async fn check(source: &Core, target: &Core, options: &MigrationOptions) -> Result<()> {
    source.require("live migration", SOURCE_COMMANDS).await?;
    target
        .require(
            "an incoming migration",
            &["migrate-incoming", "migrate-set-capabilities"],
        )
        .await?;
    if options.multifd_channels.is_some() && options.transport == Transport::Fd {
        return Err(Error::InvalidMigration(
            "multifd needs a connection per channel; an fd pair is one".into(),
        ));
    }
    if options.postcopy_after.is_some() {
        source
            .require("post-copy migration", &["migrate-start-postcopy"])
            .await?;
    }
    Ok(())
}

/// Capabilities on both sides (where both need them) and the source's parameters.
async fn configure(source: &Core, target: &Core, options: &MigrationOptions) -> Result<()> {
    // Capabilities: on both sides when both need them.
    let mut both = vec![("events", true)];
    if options.postcopy_after.is_some() {
        both.push(("postcopy-ram", true));
    }
    if options.multifd_channels.is_some() {
        both.push(("multifd", true));
    }
    if options.dirty_bitmaps {
        both.push(("dirty-bitmaps", true));
    }
    let mut source_caps = both.clone();
    if options.auto_converge {
        source_caps.push(("auto-converge", true));
    }
    set_capabilities(&source.client, &source_caps).await?;
    set_capabilities(&target.client, &both).await?;
    let params = MigrateSetParameters {
        max_bandwidth: options.bandwidth,
        downtime_limit: options.downtime_limit.map(|d| d.as_millis() as u64),
        multifd_channels: options.multifd_channels,
    };
    if params != MigrateSetParameters::default() {
        step("migrate-set-parameters", source.client.execute(&params)).await?;
    }
    if let Some(channels) = options.multifd_channels {
        let target_params = MigrateSetParameters {
            multifd_channels: Some(channels),
            ..Default::default()
        };
        step(
            "migrate-set-parameters",
            target.client.execute(&target_params),
        )
        .await?;
    }

    Ok(())
}

/// The target listens on the transport; the source is handed it and starts sending. From here, a
/// dropped call cancels (`guard`).
async fn start(
    source: &Core,
    target: &Core,
    options: &MigrationOptions,
    guard: &mut CancelOnDrop,
) -> Result<()> {
    let uri = listen(target, &options.transport).await?;
    let uri = match uri {
        Outgoing::Uri(uri) => uri,
        Outgoing::Fd(fd) => {
            step("getfd", source.client.getfd(names::MIGRATE_OUT_FD, fd)).await?;
            format!("fd:{}", names::MIGRATE_OUT_FD)
        }
    };
    guard.arm();
    step(
        "migrate",
        source
            .client
            .execute(&qhotplug_qmp::command::Migrate { uri }),
    )
    .await?;

    Ok(())
}

/// Follows the source's events until the migration ends: progress reported, post-copy switched
/// on when asked, the deadline kept (a cancel, then how it really ended).
async fn follow(
    source: &Core,
    target: &Core,
    options: &MigrationOptions,
    events: &mut qhotplug_qmp::EventStream,
    target_events: &mut qhotplug_qmp::EventStream,
    mut progress: impl FnMut(&Progress),
) -> Result<MigrationInfo> {
    let deadline = options.deadline.map(|d| tokio::time::Instant::now() + d);
    let mut switched = false;
    loop {
        let next = async {
            match deadline {
                Some(at) => tokio::time::timeout_at(at, events.next()).await.ok(),
                None => Some(events.next().await),
            }
        };
        let Some(item) = next.await else {
            // The deadline: cancel, and see how it ended (it may have completed meanwhile).
            step("migrate_cancel", source.client.execute(&MigrateCancel)).await?;
            let info = await_end(source, events).await?;
            return match info.status.as_deref() {
                Some("completed") => Ok(info),
                _ => Err(Error::Migration(MigrationFailure::TimedOut(
                    options.deadline.unwrap_or_default(),
                ))),
            };
        };
        match item {
            None => return Err(Error::Qmp(qhotplug_qmp::Error::Disconnected)),
            // Events were lost: QEMU's `query-migrate` says where it stands.
            Some(Err(_lagged)) => {}
            Some(Ok(event)) => match event.kind() {
                EventKind::Migration(_) | EventKind::MigrationPass(_) => {}
                _ => continue,
            },
        }
        let info = source.client.execute(&QueryMigrate).await?;
        if is_final(&info) {
            ended(info)?;
            // The source has sent everything; the guest is the target's once the target says
            // so too (after post-copy, it may still be pulling pages).
            let wait = tracing::debug_span!(crate::spans::STEP, name = "wait target MIGRATION");
            await_end(target, target_events).instrument(wait).await?;
            return final_figures(source).await;
        }
        let now = progress_of(&info);
        progress(&now);
        if let Some(after) = options.postcopy_after {
            if now.passes >= after && !switched {
                step(
                    "migrate-start-postcopy",
                    source.client.execute(&MigrateStartPostcopy),
                )
                .await?;
                switched = true;
            }
        }
    }
}

/// The source's final figures (total time, downtime), once both ends are done. A source that has
/// just said `completed` may not have worked them out yet (seen once, after post-copy, on a loaded
/// machine: no total time): asked again, for a bounded while.
async fn final_figures(source: &Core) -> Result<MigrationInfo> {
    let until = tokio::time::Instant::now() + FIGURES_WAIT;
    let mut info = source.client.execute(&QueryMigrate).await?;
    while info.total_time.unwrap_or(0) == 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
        info = source.client.execute(&QueryMigrate).await?;
    }
    Ok(info)
}

/// After a cancel: waits for the migration's final status.
pub(crate) async fn await_end(
    source: &Core,
    events: &mut qhotplug_qmp::EventStream,
) -> Result<MigrationInfo> {
    loop {
        let info = source.client.execute(&QueryMigrate).await?;
        if is_final(&info) {
            return Ok(info);
        }
        if events.next().await.is_none() {
            return Err(Error::Qmp(qhotplug_qmp::Error::Disconnected));
        }
    }
}

/// How the source reaches the target.
enum Outgoing {
    Uri(String),
    Fd(std::os::fd::OwnedFd),
}

/// Starts the target listening (`migrate-incoming`) on `transport`; returns how the source
/// connects.
async fn listen(target: &Core, transport: &Transport) -> Result<Outgoing> {
    let incoming = |uri: String| async move {
        step(
            "migrate-incoming",
            target.client.execute(&MigrateIncoming { uri }),
        )
        .await
    };
    match transport {
        Transport::Unix(path) => {
            let uri = format!("unix:{}", path.to_string_lossy());
            incoming(uri.clone()).await?;
            Ok(Outgoing::Uri(uri))
        }
        Transport::Fd => {
            let (ours, theirs) = UnixStream::pair().map_err(|source| Error::Io {
                what: "making the migration's socket pair",
                source,
            })?;
            step(
                "getfd",
                target.client.getfd(names::MIGRATE_IN_FD, theirs.into()),
            )
            .await?;
            incoming(format!("fd:{}", names::MIGRATE_IN_FD)).await?;
            Ok(Outgoing::Fd(ours.into()))
        }
        Transport::Tcp { host, port } => {
            let bracketed = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            incoming(format!("tcp:{bracketed}:{port}")).await?;
            let port = if *port == 0 {
                // QEMU picked one: it says which in `socket-address`.
                let info = target.client.execute(&QueryMigrate).await?;
                info.socket_address
                    .iter()
                    .find_map(|a| a.get("port")?.as_str()?.parse::<u16>().ok())
                    .ok_or_else(|| {
                        Error::InvalidMigration("the target did not say which port it took".into())
                    })?
            } else {
                *port
            };
            Ok(Outgoing::Uri(format!("tcp:{bracketed}:{port}")))
        }
    }
}

/// Sets capabilities, each checked against what this QEMU knows.
pub(crate) async fn set_capabilities(client: &Client, caps: &[(&str, bool)]) -> Result<()> {
    let known = client.execute(&QueryMigrateCapabilities).await?;
    if let Some((missing, _)) = caps
        .iter()
        .find(|(c, _)| !known.iter().any(|k| k.capability == *c))
    {
        return Err(Error::Unsupported {
            command: format!("migration capability {missing}"),
            operation: "live migration",
        });
    }
    let capabilities = caps
        .iter()
        .map(|(c, on)| MigrationCapabilityStatus {
            capability: (*c).to_owned(),
            state: *on,
        })
        .collect();
    step(
        "migrate-set-capabilities",
        client.execute(&MigrateSetCapabilities { capabilities }),
    )
    .await?;
    Ok(())
}

pub(crate) fn progress_of(info: &MigrationInfo) -> Progress {
    let ram = info.ram.clone().unwrap_or_default();
    Progress {
        status: info.status.clone().unwrap_or_default(),
        transferred: ram.transferred,
        remaining: ram.remaining,
        total: ram.total,
        dirty_rate: ram.dirty_pages_rate,
        passes: ram.dirty_sync_count,
        ..Progress::default()
    }
}

/// True once a migration has ended, one way or the other.
pub(crate) fn is_final(info: &MigrationInfo) -> bool {
    matches!(
        info.status.as_deref(),
        Some("completed" | "failed" | "cancelled")
    )
}

/// The outcome of a migration that ended with `info`.
pub(crate) fn ended(info: MigrationInfo) -> Result<MigrationInfo> {
    match info.status.as_deref() {
        Some("completed") => Ok(info),
        Some("cancelled") => Err(Error::Migration(MigrationFailure::Cancelled)),
        _ => Err(Error::Migration(MigrationFailure::Failed(
            info.error_desc
                .unwrap_or_else(|| "QEMU gave no reason".into()),
        ))),
    }
}
