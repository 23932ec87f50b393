//! Lining the SDK's view up with QEMU's: after a hot-add or hot-remove future was dropped
//! part-way, after an unplug reported pending completed, or after a rollback could not finish.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use qhotplug_cmdline::{names, Disk};
use qhotplug_qmp::command::{
    JobInfo, QomList, QueryChardev, QueryFdsets, QueryJobs, QueryPci, QueryStatus, SetLink,
};
use qhotplug_qmp::message::VersionTriple;
use qhotplug_qmp::Client;

use crate::discover::scan_peripherals;
use crate::ended_job::EndedJob;
use crate::engine::holds::{self, Cleaning};
use crate::error::Result;
use crate::kinds::{Device, DeviceKind};
use crate::migration::orphaned::MigrationLeft;
use crate::qemu::block::Blocks;
use crate::qemu::delete::{Delete, Outcome};
use crate::qemu::errors as qemu_errors;
use crate::qemu::fd_files::{files_of, FdFile};
use crate::state::{Entry, State};
use crate::vm_core::Core;

/// What [`Vm::reconcile`](crate::Vm::reconcile) found and fixed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Devices the SDK listed that QEMU no longer has (an unplug that completed late, a removal
    /// that was cancelled): dropped from the SDK's view, their slots freed.
    pub gone: Vec<String>,
    /// Block nodes of ours that no device used any more, deleted.
    pub nodes_deleted: Vec<String>,
    /// Netdevs of ours that no device used any more, deleted.
    pub netdevs_deleted: Vec<String>,
    /// Fd sets of ours (tagged `qhotplug:<id>`) that no node held, removed.
    pub fdsets_removed: Vec<i64>,
    /// QOM objects of ours (memory backends, RNG sources) that no device used any more, deleted.
    pub objects_deleted: Vec<String>,
    /// Chardevs of ours (`<id>-chr`) that no device used any more, removed.
    pub chardevs_removed: Vec<String>,
    /// Devices QEMU has that the view lacked, now listed: a failed hot-add could not take them
    /// back (the guest kept them), listed as planned; or a process that died made them after the
    /// spec this handle attached with was kept (the SDK's names on their backends say so), read
    /// from QEMU as an attach with no spec reads them.
    pub adopted: Vec<String>,
    /// Disks whose I/O limits in the SDK's view were not QEMU's: the view now has QEMU's.
    pub limits_updated: Vec<String>,
    /// CD-ROM drives the SDK thought loaded that QEMU has empty: the view now has them empty.
    pub media_updated: Vec<String>,
    /// A migration out of the VM a process that died had started: cancelled if it was under
    /// way, reported if it had completed (the guest runs on its target) or is in post-copy (by
    /// every reconcile, while QEMU stays so).
    pub migration: Option<MigrationLeft>,
    /// Disks whose image chain in the SDK's view was not the one QEMU runs (a mirror's or a
    /// commit's pivot, or a snapshot, that a process which died made; a checkpoint its backup
    /// left): the view now has QEMU's chain and checkpoints.
    pub chains_updated: Vec<String>,
    /// Jobs the SDK names that no handle can take back (a push or pull backup's, an image's
    /// creation, a storage copy's), left by a process that died, ended (cancelled, dismissed),
    /// each with how it had fared: a push backup that had completed left a whole target. Also
    /// the jobs of any kind a dead process left concluded that an attach with no spec dismissed.
    pub jobs_ended: Vec<EndedJob>,
    /// NBD exports the SDK names (a pull backup's, a storage copy's target's), deleted; the NBD
    /// server stopped with them when no other export was left.
    pub exports_deleted: Vec<String>,
    /// Checkpoints a backup that never finished had made, given back to the one before them (its
    /// record merged into it): the spec never listed them.
    pub checkpoints_given_back: Vec<String>,
    /// Files QEMU held for the SDK (in fd sets of its) that the clean-up let go and the spec does
    /// not use: an image a hot-add never finished with, or one a storage operation a dead
    /// process started made and never used (a snapshot's overlay, a mirror's copy, a backup's
    /// target, a pull backup's scratch). The SDK removes none: a process that died cannot tell a
    /// finished backup from an abandoned overlay, nor the caller's image from one it made.
    pub files_released: Vec<std::path::PathBuf>,
}

impl Reconciled {
    /// True when QEMU and the SDK's view already agreed: nothing was dropped, deleted, ended or
    /// updated. A migration only reported (completed, or in post-copy: every reconcile says so
    /// while QEMU is in that state) does not count.
    pub fn is_empty(&self) -> bool {
        let reported_only = matches!(
            self.migration,
            Some(MigrationLeft::Completed | MigrationLeft::Postcopy)
        );
        let done = Reconciled {
            migration: self.migration.filter(|_| !reported_only),
            ..self.clone()
        };
        done == Reconciled::default()
    }
}

/// See [`Vm::reconcile`](crate::Vm::reconcile). Its stages: read QEMU's state ([`Seen`]), judge
/// under one lock ([`judge`]), delete what is left over ([`clean_up`]), and apply each NIC's link
/// again.
///
/// It judges from what was known when its queries began: a device that joined the spec after
/// that (`Entry::Placed::since`), or that a call holds busy, is left alone, and the ids whose
/// leftovers it deletes are marked [`Entry::Cleaning`] until it is done, so no hot-add can take
/// one and lose its backends to the clean-up.
pub(crate) async fn reconcile(core: &Arc<Core>) -> Result<Reconciled> {
    core.cleanups_done().await;
    let start = core.state().epoch;
    let ended_at_attach = std::mem::take(
        &mut *core
            .ended_at_attach
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    let mut report = Reconciled {
        jobs_ended: ended_at_attach,
        ..Reconciled::default()
    };
    // First a migration a dead process left (its storage copy's jobs are ended next), then what
    // its storage operations left running: its jobs hold nodes (and QEMU lists no node while
    // one waits concluded).
    report.migration = crate::migration::orphaned::end(core).await?;
    end_orphaned_storage(core, start, &mut report).await?;
    let seen = Seen::read(&core.client).await?;
    let held = files_of(&seen.fdsets, core.qemu_pid());
    let chains = Chains::read(core, start).await?;
    let unlisted = unlisted(core, &seen).await?;
    let judged = judge(core, &seen, &chains, unlisted, start, &mut report);
    clean_up(core, &seen, &judged, &mut report).await;
    remove_key_pipes(core, &seen, &mut report).await?;
    report.files_released = released(core, held).await?;
    drop(judged.cleaning);
    for (id, up) in judged.links {
        // Skipped when a call holds the NIC now: that call decides its link.
        let Ok(busy) = holds::mark_busy(core, &id, DeviceKind::Nic) else {
            continue;
        };
        match core
            .client
            .execute(&SetLink {
                name: id.clone(),
                up,
            })
            .await
        {
            Ok(_) => {}
            // Gone since QEMU was read (an unplug a dead process asked for, finishing now):
            // forgotten, and its leftovers deleted, as if it had been gone then.
            Err(e) if qemu_errors::is_absent(&e) => {
                drop(busy);
                tracing::info!(%id, "reconcile: the NIC went while it was reconciled");
                core.state().forget(&id, false);
                for step in leftovers_of(&seen, &id) {
                    report.run(&core.client, step).await;
                }
                report.gone.push(id);
            }
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(?report, "reconciled");
    Ok(report)
}

/// The first QEMU that closes a removed fd set while the VM is paused (and so stops listing it).
const FDSETS_CLOSED_PAUSED: VersionTriple = VersionTriple {
    major: 9,
    minor: 1,
    micro: 0,
};

/// What QEMU has, read before anything is judged.
struct Seen {
    pci: Vec<qhotplug_qmp::command::PciInfo>,
    found: crate::discover::Peripherals,
    nodes: HashSet<String>,
    fdsets: Vec<qhotplug_qmp::command::FdsetInfo>,
    chardevs: HashSet<String>,
    objects: HashSet<String>,
    /// The netdevs, from HMP `info network`: QMP has no query for them.
    netdevs: HashSet<String>,
    /// Whether an fd set QEMU lists is one nobody removed: not so on QEMU before 9.1 while the
    /// VM is paused, which lists removed sets (their fds still open) until it runs.
    fdsets_current: bool,
    blocks: Blocks,
}

impl Seen {
    async fn read(client: &Client) -> Result<Seen> {
        let pci = client.execute(&QueryPci).await?;
        let found = scan_peripherals(client).await?;
        // Not listed while a job waits to be dismissed (QEMU would crash): no node is judged
        // then, and a later reconcile, once the job's handle ended it, cleans up.
        let nodes = crate::qemu::block::named_block_nodes(client)
            .await?
            .unwrap_or_default()
            .into_iter()
            .collect();
        let fdsets = client.execute(&QueryFdsets).await?;
        let chardevs = client
            .execute(&QueryChardev)
            .await?
            .into_iter()
            .map(|c| c.label)
            .collect();
        let objects = client
            .execute(&QomList {
                path: "/objects".into(),
            })
            .await?
            .into_iter()
            .filter(|o| o.child_type().is_some())
            .map(|o| o.name)
            .collect();
        let blocks = Blocks::read(client).await?;
        let netdevs = netdevs(client).await;
        let fdsets_current = client.greeting().version.qemu >= FDSETS_CLOSED_PAUSED
            || client.execute(&QueryStatus).await?.running;
        Ok(Seen {
            pci,
            found,
            nodes,
            fdsets,
            chardevs,
            objects,
            netdevs,
            fdsets_current,
            blocks,
        })
    }
}

/// The netdevs QEMU has, by HMP `info network` (the one thing reconcile asks HMP: QMP cannot list
/// netdevs, and a NIC hot-add a dead process left before its `device_add` holds its taps in
/// one). Each line names a client (`<id>: index=…`), a netdev behind a NIC indented by ` \ `.
/// None when HMP does not answer.
async fn netdevs(client: &Client) -> HashSet<String> {
    let info = qhotplug_qmp::command::HumanMonitorCommand {
        command_line: "info network".into(),
        cpu_index: None,
    };
    let Ok(text) = client.execute(&info).await else {
        return HashSet::new();
    };
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start().trim_start_matches('\\').trim_start();
            line.split_once(':').map(|(name, _)| name.to_owned())
        })
        .collect()
}

/// What the judgement left to do once the lock is let go.
struct Judged {
    /// Ids whose leftovers go, marked [`Entry::Cleaning`] until `cleaning` is dropped.
    orphans: BTreeSet<String>,
    cleaning: Cleaning,
    /// CD-ROM drives and disks, each with the nodes of its own it keeps (a medium's, a disk's
    /// chain's).
    drives: Vec<Kept>,
    /// Each NIC's recorded link.
    links: Vec<(String, bool)>,
}

/// Lines the SDK's view up with `seen`, under one lock: only what no call holds, and what was in
/// the spec before the queries (`start`), is judged. Its stages: hot-adds in doubt settled by
/// QEMU's word, devices gone forgotten, the slot maps rebuilt, what QEMU applied read back, and
/// what the clean-up deletes and keeps.
fn judge(
    core: &Arc<Core>,
    seen: &Seen,
    chains: &Chains,
    unlisted: Vec<Device>,
    start: u64,
    report: &mut Reconciled,
) -> Judged {
    let present = &seen.found.ids;
    let mut guard = core.state();
    let state = &mut *guard;
    settle_doubts(state, present, report);
    for device in unlisted {
        // Not taken by a call of this process's since it was read.
        if !state.devices.contains_key(device.id()) {
            tracing::info!(id = %device.id(), "reconcile: adopted a device a dead process made");
            report.adopted.push(device.id().to_owned());
            state.insert(device);
        }
    }
    let gone = forget_gone(state, present, start);
    state.rebuild_slots(&seen.pci, &seen.found.placements);
    read_back(state, &seen.blocks, start, report);
    chains.apply(state, start, report);
    // Leftovers may belong to the devices just found gone, to ids this handle used, or to ids
    // whose hot-add a process that died never finished (found by the SDK's names on what QEMU
    // has: that process's ids are not this one's to know).
    let left_by_name = named_owners(seen, state.spec());
    let orphans: BTreeSet<String> = state
        .touched
        .iter()
        .chain(&left_by_name)
        .filter(|id| !present.contains(*id) && !state.devices.contains_key(*id))
        .chain(&gone)
        .cloned()
        .collect();
    let cleaning = Cleaning::mark(core, state, orphans.iter().cloned().collect());
    let drives = kept_nodes(state, start);
    // QMP cannot read a link's state: the recorded one is applied again.
    let links = state
        .spec()
        .nics
        .iter()
        .filter(|n| settled(state, &n.id, start))
        .map(|n| (n.id.clone(), n.link_up))
        .collect();
    report.gone = gone;
    Judged {
        orphans,
        cleaning,
        drives,
        links,
    }
}

/// The ids the SDK's names on what QEMU has (fd sets' tags, nodes, chardevs, objects but the
/// boot memory's backend, netdevs) point to.
fn named_owners(seen: &Seen, spec: &qhotplug_cmdline::VmSpec) -> BTreeSet<String> {
    let boot_memory = spec.memory_backend.as_ref().map(|b| b.id.as_str());
    seen.fdsets
        .iter()
        .filter(|_| seen.fdsets_current)
        .flat_map(|s| s.fds.iter().filter_map(|f| f.opaque.as_deref()))
        .chain(seen.nodes.iter().map(String::as_str))
        .chain(seen.chardevs.iter().map(String::as_str))
        .chain(
            seen.objects
                .iter()
                .map(String::as_str)
                .filter(|o| Some(*o) != boot_memory),
        )
        .filter_map(names::owner_of)
        .chain(seen.netdevs.iter().filter_map(|n| names::netdev_owner(n)))
        .map(str::to_owned)
        .collect()
}

/// Devices QEMU has that the view does not list though the SDK's names on QEMU's backends point
/// to them: a hot-add that a process which died finished after the spec the caller attached
/// with was kept. Read from QEMU as an attach with no spec reads them (a device that cannot be
/// read so, another driver's, is left alone).
async fn unlisted(core: &Core, seen: &Seen) -> Result<Vec<Device>> {
    let ids: Vec<String> = {
        let state = core.state();
        let named = named_owners(seen, state.spec());
        seen.found
            .ids
            .iter()
            .filter(|id| !state.devices.contains_key(*id) && named.contains(*id))
            .cloned()
            .collect()
    };
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let read = crate::read_spec::read_spec(&core.client, core.qemu_pid()).await?;
    Ok(Device::all(&read.spec)
        .into_iter()
        .filter(|d| ids.iter().any(|id| id == d.id()))
        .collect())
}

/// The files of `held` (QEMU's fd sets before the clean-up) whose sets are gone now and that no
/// device of the spec uses.
async fn released(core: &Core, held: Vec<FdFile>) -> Result<Vec<std::path::PathBuf>> {
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let now: HashSet<i64> = core
        .client
        .execute(&QueryFdsets)
        .await?
        .into_iter()
        .map(|s| s.fdset_id)
        .collect();
    let used: HashSet<std::path::PathBuf> = core
        .state()
        .spec()
        .image_paths()
        .into_iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    let mut files: Vec<std::path::PathBuf> = held
        .into_iter()
        .filter(|f| !now.contains(&f.set) && !used.contains(&f.path))
        .map(|f| f.path)
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Whether device `id` is judged: placed before the queries began (`start`) and held by no call.
fn settled(state: &State, id: &str, start: u64) -> bool {
    matches!(state.devices.get(id), Some(Entry::Placed { busy: false, since, .. }) if *since <= start)
}

/// Hot-adds whose rollback could not take their device back: QEMU's list decides.
fn settle_doubts(state: &mut State, present: &HashSet<String>, report: &mut Reconciled) {
    let doubted: Vec<String> = state
        .devices
        .iter()
        .filter(|(_, e)| matches!(e, Entry::InDoubt { .. }))
        .map(|(id, _)| id.clone())
        .collect();
    for id in doubted {
        if state.settle_doubt(&id, present.contains(&id)) {
            tracing::info!(%id, "reconcile: adopted a device QEMU kept");
            report.adopted.push(id);
        }
    }
}

/// The judged devices QEMU no longer has, forgotten; returns their ids.
fn forget_gone(state: &mut State, present: &HashSet<String>, start: u64) -> Vec<String> {
    let gone: Vec<String> = state
        .devices
        .keys()
        .filter(|id| settled(state, id, start) && !present.contains(*id))
        .cloned()
        .collect();
    for id in &gone {
        state.forget(id, false);
    }
    gone
}

/// Disks' image chains as QEMU runs them, read for the disks judged (`settled`) whose chain in
/// the spec is not QEMU's: each as the spec had it when read, and as QEMU runs it.
struct Chains(Vec<(Disk, Disk)>);

impl Chains {
    async fn read(core: &Core, start: u64) -> Result<Chains> {
        let disks: Vec<Disk> = {
            let state = core.state();
            let spec = state.spec();
            spec.disks
                .iter()
                .filter(|d| settled(&state, &d.id, start))
                .cloned()
                .collect()
        };
        let run = crate::read_spec::chains_as_run(&core.client, core.qemu_pid(), &disks).await?;
        Ok(Chains(
            run.into_iter()
                .filter_map(|r| {
                    let before = disks.iter().find(|d| d.id == r.id)?.clone();
                    Some((before, r))
                })
                .collect(),
        ))
    }

    /// QEMU's chain into the spec, for each disk still as it was read and judged.
    fn apply(&self, state: &mut State, start: u64, report: &mut Reconciled) {
        for (before, run) in &self.0 {
            let unchanged = state.spec().disks.iter().any(|d| d == before);
            if !unchanged || !settled(state, &before.id, start) {
                continue;
            }
            tracing::info!(
                id = %run.id,
                top = %run.top_node(),
                checkpoints = ?run.checkpoints,
                "reconcile: the disk's chain as QEMU runs it"
            );
            report.chains_updated.push(run.id.clone());
            state.update(run.clone().into());
        }
    }
}

/// What QEMU applied is the truth: disks' I/O limits and CD-ROM media as `query-block` shows
/// them, recorded in the spec.
fn read_back(state: &mut State, blocks: &Blocks, start: u64, report: &mut Reconciled) {
    let mut updates: Vec<Device> = Vec::new();
    for disk in &state.spec().disks {
        if !report.adopted.contains(&disk.id) && !settled(state, &disk.id, start) {
            continue;
        }
        if let Some(limits) = blocks.limits_of(&disk.id) {
            let limits = Some(limits).filter(|l| !l.is_unlimited());
            if disk.io_limits != limits {
                tracing::info!(id = %disk.id, ?limits, "reconcile: I/O limits as QEMU has them");
                report.limits_updated.push(disk.id.clone());
                let mut disk = disk.clone();
                disk.io_limits = limits;
                updates.push(disk.into());
            }
        }
    }
    for cd in &state.spec().cdroms {
        if !settled(state, &cd.id, start) {
            continue;
        }
        let empty = blocks.drive(&cd.id).is_some_and(|b| b.inserted.is_none());
        if empty && cd.medium.is_some() {
            tracing::info!(id = %cd.id, "reconcile: the drive is empty in QEMU");
            report.media_updated.push(cd.id.clone());
            let mut cd = cd.clone();
            cd.medium = None;
            updates.push(cd.into());
        }
    }
    for device in updates {
        state.update(device);
    }
}

/// A judged drive's own nodes and objects that stay, and how many image files it has open (each
/// in an fd set of its own, when the SDK handed it over).
struct Kept {
    id: String,
    nodes: Vec<String>,
    images: usize,
}

/// Each judged CD-ROM drive and disk with the nodes of its own it keeps: a drive still there
/// may have an old medium's nodes left (a change whose last deletes failed), a disk no job runs
/// on those of an image it no longer uses (a job's end whose deletes failed); all but its
/// medium's, or its chain's, go, and with them the fd sets no node opens.
fn kept_nodes(state: &State, start: u64) -> Vec<Kept> {
    let drives = state
        .spec()
        .cdroms
        .iter()
        .filter(|c| settled(state, &c.id, start))
        .map(|c| {
            let keep = match c.medium {
                Some(_) => vec![
                    c.top_node(),
                    c.file_node(),
                    c.secret_id(),
                    names::tls_creds_at(&c.id, c.generation),
                ],
                None => Vec::new(),
            };
            let images = c
                .medium
                .as_ref()
                .map_or(0, |m| usize::from(m.image_path().is_some()));
            Kept {
                id: c.id.clone(),
                nodes: keep,
                images,
            }
        });
    let disks = state
        .spec()
        .disks
        .iter()
        .filter(|d| settled(state, &d.id, start))
        .map(|d| {
            let mut keep = d.node_names();
            keep.extend([names::secret(&d.id), names::tls_creds(&d.id)]);
            let images = d.image_paths().len();
            Kept {
                id: d.id.clone(),
                nodes: keep,
                images,
            }
        });
    drives.chain(disks).collect()
}

/// Deletes what the judgement found left over: a drive's stale medium nodes, and everything of
/// each orphan id's that QEMU still has. An id whose every delete went through needs no second
/// look.
async fn clean_up(core: &Core, seen: &Seen, judged: &Judged, report: &mut Reconciled) {
    let client = &core.client;
    for Kept { id, nodes, images } in &judged.drives {
        for step in nodes_of(&seen.nodes, id, nodes) {
            report.run(client, step).await;
        }
        for step in network_objects_of(&seen.objects, id, nodes) {
            report.run(client, step).await;
        }
        // More sets than open images: a node's deletion whose set was left (a process that died
        // between the two).
        let tag = names::fdset_tag(id);
        let sets = seen
            .fdsets
            .iter()
            .filter(|s| s.fds.iter().any(|f| f.opaque.as_ref() == Some(&tag)))
            .count();
        if sets > *images {
            report.run(client, Delete::UnusedFdsets(tag)).await;
        }
    }
    let mut clean = Vec::new();
    for id in &judged.orphans {
        let mut all_done = true;
        for step in leftovers_of(seen, id) {
            all_done &= report.run(client, step).await;
        }
        if all_done {
            clean.push(id);
        }
    }
    let mut state = core.state();
    for id in clean {
        state.touched.remove(id);
    }
}

/// Removes the fd sets holding the pipe of a master key whose making a process that died never
/// finished (tagged with the key's id). A key is made under the core's key lock, so while it is
/// held no set of a key in the making is this process's; QEMU is asked again under it.
async fn remove_key_pipes(core: &Core, seen: &Seen, report: &mut Reconciled) -> Result<()> {
    let key_tag = |s: &qhotplug_qmp::command::FdsetInfo| {
        s.fds
            .iter()
            .filter_map(|f| f.opaque.clone())
            .find(|t| names::is_master_key(t))
    };
    if !seen.fdsets.iter().any(|s| key_tag(s).is_some()) {
        return Ok(());
    }
    let _making = core.master_key.lock().await;
    for set in core.client.execute(&QueryFdsets).await? {
        if let Some(tag) = key_tag(&set) {
            let id = Some(set.fdset_id);
            report.run(&core.client, Delete::Fdset { id, tag }).await;
        }
    }
    Ok(())
}

/// The same deletes a rollback or a teardown would run for `id`, for what `seen` has (netdevs
/// cannot be listed on QEMU 7.2: ours is asked for, and "not found" is the usual answer). Objects
/// go after what may use them.
fn leftovers_of(seen: &Seen, id: &str) -> Vec<Delete> {
    let tag = names::fdset_tag(id);
    let backends = names::backends(id);
    let mut steps: Vec<Delete> = seen
        .fdsets
        .iter()
        .filter(|set| set.fds.iter().any(|f| f.opaque.as_ref() == Some(&tag)))
        .map(|set| Delete::Fdset {
            id: Some(set.fdset_id),
            tag: tag.clone(),
        })
        .collect();
    steps.extend(backends.netdevs.into_iter().map(Delete::Netdev));
    steps.extend(nodes_of(&seen.nodes, id, &[]));
    steps.extend(
        backends
            .chardevs
            .into_iter()
            .filter(|c| seen.chardevs.contains(c))
            .map(Delete::Chardev),
    );
    steps.extend(
        backends
            .objects
            .into_iter()
            .filter(|o| seen.objects.contains(o) && !names::is_network_object_of(id, o))
            .map(Delete::Object),
    );
    steps.extend(network_objects_of(&seen.objects, id, &[]));
    steps
}

/// The deletes of device `id`'s network objects (secrets, TLS credentials, of any medium's
/// generation) that QEMU has, but those in `keep`.
fn network_objects_of(objects: &HashSet<String>, id: &str, keep: &[String]) -> Vec<Delete> {
    let mut mine: Vec<&String> = objects
        .iter()
        .filter(|o| names::is_network_object_of(id, o) && !keep.contains(o))
        .collect();
    mine.sort();
    mine.into_iter().cloned().map(Delete::Object).collect()
}

impl Reconciled {
    /// Ends a job a dead process left (`job-cancel`, waited for, dismissed) and records it
    /// with how it had fared; a job that went meanwhile is not recorded.
    async fn end_job(&mut self, client: &qhotplug_qmp::Client, job: EndedJob) {
        let step = Delete::Job(job.id.clone());
        match step.run(client).await {
            Ok(Outcome::Done) => self.jobs_ended.push(job),
            Ok(Outcome::Absent) => {}
            Err(e) => tracing::warn!(%step, error = %e, "reconcile: left in place"),
        }
    }

    /// Runs one delete and records what it removed; false when it failed (the thing is left in
    /// place, and said so in the log).
    async fn run(&mut self, client: &qhotplug_qmp::Client, step: Delete) -> bool {
        match step.run(client).await {
            Err(e) => {
                tracing::warn!(%step, error = %e, "reconcile: left in place");
                return false;
            }
            Ok(Outcome::Absent) => {}
            Ok(Outcome::Done) => match step {
                Delete::Export(export) => self.exports_deleted.push(export),
                Delete::Checkpoint { name, .. } => self.checkpoints_given_back.push(name),
                Delete::Fdset { id: Some(set), .. } => self.fdsets_removed.push(set),
                Delete::BlockNode(node) => self.nodes_deleted.push(node),
                Delete::Netdev(netdev) => self.netdevs_deleted.push(netdev),
                Delete::Object(object) => self.objects_deleted.push(object),
                Delete::Chardev(chardev) => self.chardevs_removed.push(chardev),
                _ => {}
            },
        }
        true
    }
}

/// Deletes of device `id`'s block nodes among `nodes`, but those in `keep`: format nodes before
/// the protocol nodes under them.
fn nodes_of(nodes: &HashSet<String>, id: &str, keep: &[String]) -> Vec<Delete> {
    let mut mine: Vec<&String> = nodes
        .iter()
        .filter(|n| names::is_block_node_of(id, n) && !keep.contains(n))
        .collect();
    // The newest image first (a disk's overlays stand on the images under them, and QEMU keeps
    // a node another uses as its backing), its format node before its protocol node.
    mine.sort_by_key(|n| {
        let generation = names::generation_of(id, n).unwrap_or(0);
        (
            std::cmp::Reverse(generation),
            !names::is_format_node_of(id, n),
            n.to_owned(),
        )
    });
    mine.into_iter().cloned().map(Delete::BlockNode).collect()
}

/// What a dead process's storage operations left on the disks no call of this one holds: their
/// jobs that no handle can take back ended, their exports deleted (and the NBD server, when no
/// export of anyone else's was left), a storage copy's client nodes deleted, a backup's temporary bitmap removed, and a checkpoint an
/// unfinished backup made given back to the one before it. Mirrors, commits and streams are
/// [`Vm::jobs`](crate::Vm::jobs)' to hand back. Each disk is held busy while it is cleaned.
async fn end_orphaned_storage(core: &Arc<Core>, start: u64, report: &mut Reconciled) -> Result<()> {
    let client = &core.client;
    let jobs = client.execute(&QueryJobs).await?;
    let exports = crate::qemu::block::export_ids(client).await?;
    let blocks = Blocks::read(client).await?;
    // Empty while a job waits concluded: such a job is ended below, and its disk with it.
    let nodes: HashSet<String> = crate::qemu::block::named_block_nodes(client)
        .await?
        .unwrap_or_default()
        .into_iter()
        .collect();
    let disks: Vec<qhotplug_cmdline::Disk> = {
        let state = core.state();
        state
            .spec()
            .disks
            .iter()
            .filter(|d| settled(&state, &d.id, start))
            .cloned()
            .collect()
    };
    let mut ours = Vec::new();
    let mut serving = false;
    let mut handled = Vec::new();
    let mut marks = Vec::new();
    for disk in &disks {
        let id = &disk.id;
        let backups = [names::backup_job(id), names::pull_job(id)];
        // A pull backup's export and a storage copy's target are named as their jobs.
        let exported = [names::pull_job(id), names::migration_job(id)];
        // A new image's creation is named after its nodes, of the disk's next generation at most.
        let creations: Vec<String> = (0..=disk.next_generation())
            .flat_map(|g| [names::format_node_at(id, g), names::file_node_at(id, g)])
            .map(|n| names::create_job(&n))
            .collect();
        let mine = |job: &String| {
            backups.contains(job) || exported.contains(job) || creations.contains(job)
        };
        let (to_end, to_unexport): (Vec<&JobInfo>, Vec<&String>) = (
            jobs.iter().filter(|j| mine(&j.id)).collect(),
            exports.iter().filter(|e| exported.contains(e)).collect(),
        );
        let temporary = blocks
            .bitmaps_of(&disk.top_node())
            .into_iter()
            .any(|b| b.name == names::BACKUP_BITMAP);
        // While a backup job runs QEMU shows the device on its filter: no bitmap is seen then.
        let filtered = blocks.drive(id).is_some_and(|b| {
            b.inserted
                .as_ref()
                .and_then(|i| i.node_name.as_deref())
                .is_some_and(|n| n.starts_with('#'))
        });
        // A storage copy's client nodes, made before its mirror (or left after it).
        let copying = names::migration_client_nodes(id)
            .iter()
            .any(|n| nodes.contains(n));
        if to_end.is_empty() && to_unexport.is_empty() && !temporary && !filtered && !copying {
            continue;
        }
        // A call of this process took the disk since: it is that call's.
        let Ok(mark) = holds::mark_busy(core, id, DeviceKind::Disk) else {
            continue;
        };
        marks.push(mark);
        serving |= to_end.iter().any(|j| j.id == exported[0]) || !to_unexport.is_empty();
        let mut unfinished_backup = false;
        for job in to_end {
            let ended = EndedJob::of(job);
            unfinished_backup |= backups.contains(&job.id) && !ended.completed();
            report.end_job(client, ended).await;
        }
        for export in to_unexport {
            ours.push(export.clone());
            report.run(client, Delete::Export(export.clone())).await;
        }
        handled.push((disk, unfinished_backup));
    }
    // The server was a pull backup's or a storage copy's: stopped unless it serves others too.
    if serving && exports.iter().all(|e| ours.contains(e)) {
        report.run(client, Delete::NbdServer).await;
    }
    // The bitmaps, read again now that no job's filter hides the disks' nodes.
    let blocks = Blocks::read(client).await?;
    for (disk, unfinished_backup) in handled {
        // The raw node before the NBD client under it; absent ones count as done.
        for node in names::migration_client_nodes(&disk.id).into_iter().rev() {
            report.run(client, Delete::BlockNode(node)).await;
        }
        let top = disk.top_node();
        let bitmaps = blocks.bitmaps_of(&top);
        if bitmaps.iter().any(|b| b.name == names::BACKUP_BITMAP) {
            report
                .run(
                    client,
                    Delete::Bitmap {
                        node: top.clone(),
                        name: names::BACKUP_BITMAP.into(),
                    },
                )
                .await;
        }
        if !unfinished_backup {
            continue;
        }
        for bitmap in bitmaps {
            let known = disk.checkpoints.contains(&bitmap.name);
            if bitmap.persistent && !known && bitmap.name != names::BACKUP_BITMAP {
                let give_back = Delete::Checkpoint {
                    node: top.clone(),
                    name: bitmap.name,
                    into: disk.checkpoints.last().cloned(),
                    resume: true,
                };
                report.run(client, give_back).await;
            }
        }
    }
    drop(marks);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disks_leftover_nodes_go_newest_image_first_format_before_protocol() {
        let nodes: HashSet<String> = [
            "d-file", "d-fmt", "d-file.1", "d-fmt.1", "d-fmt.10", "e-fmt",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let order: Vec<String> = nodes_of(&nodes, "d", &["d-file.1".into()])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            order,
            [
                "blockdev-del d-fmt.10",
                "blockdev-del d-fmt.1",
                "blockdev-del d-fmt",
                "blockdev-del d-file"
            ]
        );
    }
}
