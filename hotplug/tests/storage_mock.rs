//! The storage half on the mock QEMU, in seconds, without QEMU, root or a guest: snapshots,
//! mirrors, commits, streams and push and pull backups run to their end, and a failure at each
//! step of a snapshot, a mirror and a push or pull backup leaves QEMU (nodes, fd sets, jobs,
//! bitmaps, exports), the host (no image left behind) and `vm.spec()` as they were. A job
//! handle dropped before its end is cancelled in the background, and `settle()` waits for it.
//! `tests/tests/` proves the same on real QEMU and in booted guests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qhotplug::{
    BackupConfig, DiskConfig, Error, JobOutcome, Machine, MirrorConfig, NbdServer, PullConfig,
    SnapshotConfig, Vm, VmSpec,
};
use qhotplug_mock::MockQemu;

const WAIT: Duration = Duration::from_secs(5);

/// A VM attached to a fresh `pc` mock, with a virtio-blk disk `a` on a 1 MiB raw image.
async fn with_disk(dir: &Path) -> (MockQemu, Vm) {
    with_disk_of(dir, qhotplug::Format::Raw).await
}

/// As [`with_disk`], its image of `format`: 1 MiB raw, or a qcow2 header of 1 MiB (which
/// checkpoints need; the mock reads qcow2's magic and size).
async fn with_disk_of(dir: &Path, format: qhotplug::Format) -> (MockQemu, Vm) {
    let qemu = MockQemu::pc();
    let vm = Vm::attach(qemu.connect().await.unwrap(), VmSpec::new("t", Machine::Pc))
        .await
        .unwrap();
    let (image, bytes) = match format {
        qhotplug::Format::Qcow2 => {
            let mut header = vec![0u8; 1 << 16];
            header[..4].copy_from_slice(b"QFI\xfb");
            header[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
            (dir.join("a.qcow2"), header)
        }
        _ => (dir.join("a.raw"), vec![0u8; 1 << 20]),
    };
    std::fs::write(&image, bytes).unwrap();
    vm.add_disk(DiskConfig::virtio_blk("a", &image).format(format))
        .await
        .unwrap();
    (qemu, vm)
}

/// A push backup run to its end.
async fn backed_up(vm: &Vm, config: BackupConfig) {
    vm.backup(config).await.unwrap().wait(WAIT).await.unwrap();
}

/// What a storage operation may leave in the mock: nodes, fd sets, jobs, bitmaps, exports,
/// whether the NBD server runs, and the node disk `a` runs on.
fn state(qemu: &MockQemu) -> String {
    let mut nodes: Vec<String> = qemu
        .block_nodes()
        .iter()
        .map(|n| format!("{}>{:?}", n.node_name, n.backing))
        .collect();
    nodes.sort();
    let drive = qemu
        .devices()
        .iter()
        .find(|d| d.id == "a")
        .and_then(|d| d.drive.clone());
    format!(
        "nodes {nodes:?} drive {drive:?} fdsets {} jobs {:?} bitmaps {:?} exports {:?} nbd {}",
        qemu.fdsets().len(),
        qemu.jobs().iter().map(|j| &j.id).collect::<Vec<_>>(),
        qemu.bitmaps()
            .iter()
            .map(|b| format!("{}/{}", b.node, b.name))
            .collect::<Vec<_>>(),
        qemu.exports().iter().map(|e| &e.id).collect::<Vec<_>>(),
        qemu.nbd_server(),
    )
}

/// The jobs a reconcile ended, by id, with how each had fared.
fn ended(report: &qhotplug::Reconciled) -> Vec<(&str, JobOutcome)> {
    report
        .jobs_ended
        .iter()
        .map(|j| (j.id.as_str(), j.outcome.clone()))
        .collect()
}

/// Waits, with a deadline, until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The files in `dir`, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    out.sort();
    out
}

/// The commands that change QEMU sent since request `from`.
fn changes_since(qemu: &MockQemu, from: usize) -> Vec<String> {
    qemu.requests()[from..]
        .iter()
        .map(|(c, _)| c.clone())
        .filter(|c| !c.starts_with("query-") && !c.starts_with("qom-"))
        .collect()
}

/// Runs `start` once to learn the commands it sends up to its return (ending what it started
/// by dropping it), then again failing at each of them in turn (each on a fresh VM), and checks
/// that every failure left the mock, the directory and the spec as they were before.
async fn rolls_back_at_each_step<F, Fut, T>(start: F)
where
    F: Fn(Vm, PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let steps = {
        let dir = tempfile::tempdir().unwrap();
        let (qemu, vm) = with_disk(dir.path()).await;
        let from = qemu.requests().len();
        let started = start(vm.clone(), dir.path().to_owned()).await.unwrap();
        let steps = changes_since(&qemu, from);
        drop(started);
        vm.settle().await;
        steps
    };
    assert!(!steps.is_empty());
    let mut seen: Vec<&String> = Vec::new();
    for step in &steps {
        let nth = seen.iter().filter(|s| **s == step).count() + 1;
        seen.push(step);
        let dir = tempfile::tempdir().unwrap();
        let (qemu, vm) = with_disk(dir.path()).await;
        let (before, spec, on_disk) = (state(&qemu), vm.spec(), files(dir.path()));
        qemu.fail_nth(step, nth, "injected");
        let failed = start(vm.clone(), dir.path().to_owned()).await;
        // A step that only cleans up (`remove-fd` once QEMU holds its own fd, a created job's
        // `job-dismiss`) may fail without failing the operation; the rest must fail it.
        let cleanup = matches!(step.as_str(), "remove-fd" | "job-dismiss");
        assert!(
            failed.is_err() || cleanup,
            "{step} #{nth} failed, yet the operation did not"
        );
        drop(failed);
        vm.settle().await;
        if !cleanup {
            assert_eq!(state(&qemu), before, "after a failure at {step} #{nth}");
            assert_eq!(vm.spec(), spec, "after a failure at {step} #{nth}");
            assert_eq!(
                files(dir.path()),
                on_disk,
                "after a failure at {step} #{nth}"
            );
        }
    }
}

#[tokio::test]
async fn a_snapshot_moves_the_disk_onto_its_overlay_and_rolls_back_at_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk(dir.path()).await;
    let overlay = dir.path().join("a.1.qcow2");
    let disks = vm
        .snapshot(SnapshotConfig::new().disk("a", &overlay))
        .await
        .unwrap();
    assert_eq!(disks[0].backing.len(), 1, "{disks:?}");
    let drive = qemu
        .devices()
        .into_iter()
        .find(|d| d.id == "a")
        .unwrap()
        .drive;
    assert_eq!(drive, Some(disks[0].top_node()));
    let top = qemu
        .block_nodes()
        .into_iter()
        .find(|n| Some(&n.node_name) == drive.as_ref())
        .unwrap();
    assert_eq!(top.backing.as_deref(), Some("a-fmt"));
    assert!(overlay.exists());

    rolls_back_at_each_step(|vm, dir| async move {
        vm.snapshot(SnapshotConfig::new().disk("a", dir.join("a.1.qcow2")))
            .await
    })
    .await;
}

#[tokio::test]
async fn a_mirror_pivots_or_is_abandoned_and_rolls_back_at_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk(dir.path()).await;
    let copy = dir.path().join("copy.raw");
    let mut job = vm
        .mirror_disk("a", MirrorConfig::new(&copy).format(qhotplug::Format::Raw))
        .await
        .unwrap();
    assert_eq!(job.wait_ready(WAIT).await.unwrap().status, "ready");
    let disk = job.pivot().await.unwrap();
    let drive = qemu
        .devices()
        .into_iter()
        .find(|d| d.id == "a")
        .unwrap()
        .drive;
    assert_eq!(drive, Some(disk.top_node()));
    assert_eq!(vm.spec().disks[0].path, copy);
    assert!(qemu.jobs().is_empty(), "{:?}", qemu.jobs());

    // Abandoned: the disk stays where it was, the copy is the caller's.
    let again = dir.path().join("again.raw");
    let before = state(&qemu);
    let mut job = vm
        .mirror_disk("a", MirrorConfig::new(&again).format(qhotplug::Format::Raw))
        .await
        .unwrap();
    job.wait_ready(WAIT).await.unwrap();
    assert_eq!(job.abandon().await.unwrap(), again);
    assert_eq!(state(&qemu), before);
    assert!(again.exists());

    rolls_back_at_each_step(|vm, dir| async move {
        vm.mirror_disk(
            "a",
            MirrorConfig::new(dir.join("copy.raw")).format(qhotplug::Format::Raw),
        )
        .await
    })
    .await;
}

#[tokio::test]
async fn a_mirror_whose_job_fails_leaves_the_disk_on_its_image_and_removes_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk(dir.path()).await;
    let (before, spec) = (state(&qemu), vm.spec());
    qemu.hold_jobs(true);
    let copy = dir.path().join("copy.raw");
    let mut job = vm
        .mirror_disk("a", MirrorConfig::new(&copy).format(qhotplug::Format::Raw))
        .await
        .unwrap();
    qemu.fail_job("mirror-a", "Input/output error");
    let failed = job.wait_ready(WAIT).await.unwrap_err();
    assert!(
        matches!(&failed, Error::JobFailed { error, .. } if error == "Input/output error"),
        "{failed:?}"
    );
    qemu.hold_jobs(false);
    vm.settle().await;
    assert_eq!(state(&qemu), before);
    assert_eq!(vm.spec(), spec);
    assert!(!copy.exists());
}

#[tokio::test]
async fn a_job_handle_dropped_before_its_end_is_cancelled_and_settle_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk(dir.path()).await;
    let (before, spec) = (state(&qemu), vm.spec());
    qemu.hold_jobs(true);
    let copy = dir.path().join("copy.raw");
    let job = vm
        .mirror_disk("a", MirrorConfig::new(&copy).format(qhotplug::Format::Raw))
        .await
        .unwrap();
    drop(job);
    vm.settle().await;
    assert_eq!(state(&qemu), before);
    assert_eq!(vm.spec(), spec);
    assert!(!copy.exists());
    assert!(qemu.commands().contains(&"job-cancel".to_owned()));
}

#[tokio::test]
async fn commit_and_stream_shorten_the_chain_the_spec_records() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk(dir.path()).await;
    vm.snapshot(SnapshotConfig::new().disk("a", dir.path().join("a.1.qcow2")))
        .await
        .unwrap();
    let mut job = vm.commit_disk("a").await.unwrap();
    job.wait_ready(WAIT).await.unwrap();
    let disk = job.pivot().await.unwrap();
    assert!(disk.backing.is_empty(), "{disk:?}");
    let drive = qemu
        .devices()
        .into_iter()
        .find(|d| d.id == "a")
        .unwrap()
        .drive;
    assert_eq!(drive.as_deref(), Some("a-fmt"));

    vm.snapshot(SnapshotConfig::new().disk("a", dir.path().join("a.2.qcow2")))
        .await
        .unwrap();
    let disk = vm.stream_disk("a").await.unwrap().wait(WAIT).await.unwrap();
    assert!(disk.backing.is_empty(), "{disk:?}");
    assert_eq!(vm.spec().disks[0].backing.len(), 0);
    // The streamed layers' nodes are gone: only the top image's two stay.
    assert_eq!(qemu.block_nodes().len(), 2, "{:?}", qemu.block_nodes());
}

#[tokio::test]
async fn a_push_backup_runs_to_its_end_and_rolls_back_at_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk(dir.path()).await;
    let target = dir.path().join("full.qcow2");
    let before = state(&qemu);
    let backup = vm
        .backup(BackupConfig::full().disk("a", &target))
        .await
        .unwrap();
    backup.wait(WAIT).await.unwrap();
    assert_eq!(state(&qemu), before);
    assert!(target.exists());

    rolls_back_at_each_step(|vm, dir| async move {
        vm.backup(BackupConfig::full().disk("a", dir.join("full.qcow2")))
            .await
    })
    .await;
}

/// The `x-perf` of every `blockdev-backup` the mock was asked for, in order.
fn backup_perf(qemu: &MockQemu) -> Vec<serde_json::Value> {
    qemu.requests()
        .into_iter()
        .filter(|(command, _)| command == "transaction")
        .flat_map(|(_, args)| args["actions"].as_array().cloned().unwrap_or_default())
        .filter(|action| action["type"] == "blockdev-backup")
        .map(|action| action["data"]["x-perf"].clone())
        .collect()
}

#[tokio::test]
async fn a_push_backup_copies_with_copy_offloading_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk(dir.path()).await;
    let d = dir.path();
    backed_up(&vm, BackupConfig::full().disk("a", d.join("1.qcow2"))).await;
    let tuned = BackupConfig::full()
        .disk("a", d.join("2.qcow2"))
        .copy_offload(false)
        .workers(8)
        .max_chunk(1 << 20);
    backed_up(&vm, tuned).await;
    assert_eq!(
        backup_perf(&qemu),
        [
            serde_json::json!({"use-copy-range": true}),
            serde_json::json!({"use-copy-range": false, "max-workers": 8, "max-chunk": 1 << 20}),
        ]
    );
}

#[tokio::test]
async fn a_pull_backup_serves_each_disk_and_tears_down_and_rolls_back_at_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk(dir.path()).await;
    let before = state(&qemu);
    let server = NbdServer::Unix(dir.path().join("nbd.sock"));
    let pull = vm
        .pull_backup(PullConfig::full(server.clone()).disk("a", dir.path().join("scratch.qcow2")))
        .await
        .unwrap();
    assert!(qemu.nbd_server());
    assert_eq!(qemu.exports().len(), 1);
    assert!(!qemu.exports()[0].writable);
    pull.finish().await.unwrap();
    assert_eq!(state(&qemu), before);

    rolls_back_at_each_step(|vm, dir| {
        let server = NbdServer::Unix(dir.join("nbd.sock"));
        async move {
            vm.pull_backup(PullConfig::full(server).disk("a", dir.join("scratch.qcow2")))
                .await
        }
    })
    .await;
}

#[tokio::test]
async fn checkpoints_are_bitmaps_a_full_then_an_incremental_backup_records() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk_of(dir.path(), qhotplug::Format::Qcow2).await;
    let full = BackupConfig::full()
        .disk("a", dir.path().join("full.qcow2"))
        .checkpoint("c1");
    backed_up(&vm, full).await;
    let since = BackupConfig::incremental("c1")
        .disk("a", dir.path().join("inc.qcow2"))
        .checkpoint("c2");
    backed_up(&vm, since).await;
    assert_eq!(vm.spec().disks[0].checkpoints, ["c1", "c2"]);
    let names: Vec<String> = qemu.bitmaps().into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["c1", "c2"], "the temporary bitmap is gone");
    assert!(qemu.bitmaps().iter().all(|b| b.persistent));
    // Only the newest records.
    let recording: Vec<bool> = qemu.bitmaps().iter().map(|b| b.recording).collect();
    assert_eq!(recording, [false, true]);
    assert!(qemu.jobs().is_empty());

    // An incremental backup since a checkpoint the disk lacks sends nothing.
    let from = qemu.requests().len();
    let unknown = vm
        .backup(BackupConfig::incremental("nope").disk("a", dir.path().join("x.qcow2")))
        .await
        .unwrap_err();
    assert!(unknown.nothing_sent(), "{unknown:?}");
    assert!(changes_since(&qemu, from).is_empty());
}

#[tokio::test]
async fn the_mock_refuses_grouped_completion_beside_a_bitmap_action_and_undoes_a_failed_transaction(
) {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk(dir.path()).await;
    let before = state(&qemu);
    let add = serde_json::json!({"type": "block-dirty-bitmap-add",
                                 "data": {"node": "a-fmt", "name": "b1"}});
    let grouped = vm
        .client()
        .execute_raw(
            "transaction",
            &serde_json::json!({"actions": [add.clone()],
                                "properties": {"completion-mode": "grouped"}}),
        )
        .await
        .unwrap_err();
    assert!(
        grouped.to_string().contains("completion-mode = grouped"),
        "{grouped}"
    );
    // The second action fails (no such node): the first is undone.
    let bad = serde_json::json!({"type": "block-dirty-bitmap-add",
                                 "data": {"node": "nowhere", "name": "b2"}});
    vm.client()
        .execute_raw("transaction", &serde_json::json!({"actions": [add, bad]}))
        .await
        .unwrap_err();
    assert_eq!(state(&qemu), before);
}

/// A source and a target VM, each with disk `a` on its own 1 MiB image.
async fn source_and_target(dir: &Path) -> (MockQemu, Vm, MockQemu, Vm) {
    let (source_qemu, source) = with_disk(dir).await;
    let there = dir.join("target");
    std::fs::create_dir(&there).unwrap();
    let (target_qemu, target) = with_disk(&there).await;
    (source_qemu, source, target_qemu, target)
}

fn copying(dir: &Path) -> qhotplug::MigrationOptions {
    let copy = qhotplug::StorageCopy::new(NbdServer::Unix(dir.join("nbd.sock")));
    qhotplug::MigrationOptions::new(qhotplug::Transport::Unix(dir.join("migrate.sock")))
        .copy_storage(copy)
}

#[tokio::test]
async fn a_storage_copy_that_fails_at_each_step_leaves_the_source_as_it_was() {
    // The copy's steps: the target's server and export, the source's client nodes and mirror
    // (the mock has no migration stream, so a copy that gets through fails at `migrate`).
    let steps = [
        ("nbd-server-start", 1, false),
        ("block-export-add", 1, false),
        ("blockdev-add", 1, true),
        ("blockdev-add", 2, true),
        ("blockdev-mirror", 1, true),
        ("migrate", 1, true),
    ];
    for (step, nth, on_source) in steps {
        let dir = tempfile::tempdir().unwrap();
        let (source_qemu, source, target_qemu, target) = source_and_target(dir.path()).await;
        let (before, spec) = (state(&source_qemu), source.spec());
        match on_source {
            true => source_qemu.fail_nth(step, nth, "injected"),
            false => target_qemu.fail_nth(step, nth, "injected"),
        }
        let failed = source.migrate(target, copying(dir.path()), |_| {}).await;
        assert!(failed.is_err(), "{step} #{nth}");
        source.settle().await;
        assert_eq!(
            state(&source_qemu),
            before,
            "after a failure at {step} #{nth}"
        );
        assert_eq!(source.spec(), spec, "after a failure at {step} #{nth}");
        // The target QEMU was told to go.
        assert!(
            target_qemu.commands().contains(&"quit".to_owned()),
            "{step} #{nth}"
        );
    }
}

#[tokio::test]
async fn a_copy_whose_mirror_fails_or_whose_migration_is_dropped_leaves_the_source_clean() {
    let dir = tempfile::tempdir().unwrap();
    let (source_qemu, source, _target_qemu, target) = source_and_target(dir.path()).await;
    let before = state(&source_qemu);
    source_qemu.fail_job("mig-a", "Input/output error");
    let failed = source
        .migrate(target, copying(dir.path()), |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&failed, Error::JobFailed { error, .. } if error == "Input/output error"),
        "{failed:?}"
    );
    source.settle().await;
    assert_eq!(state(&source_qemu), before);

    // Dropped while the disks copy: the copy is undone in the background, settle() waits.
    let dir = tempfile::tempdir().unwrap();
    let (source_qemu, source, target_qemu, target) = source_and_target(dir.path()).await;
    let before = state(&source_qemu);
    source_qemu.hold_jobs(true);
    let migrating = source.migrate(target, copying(dir.path()), |_| {});
    tokio::select! {
        _ = migrating => panic!("a held copy cannot finish"),
        () = until("the copy's mirror started", || !source_qemu.jobs().is_empty()) => {}
    }
    source.settle().await;
    assert_eq!(state(&source_qemu), before);
    // The target's side is undone by a clean-up of its own (its handle went with the call).
    until("the target's export and server gone", || {
        target_qemu.exports().is_empty() && !target_qemu.nbd_server()
    })
    .await;
}

#[tokio::test]
async fn reconcile_deletes_every_image_of_a_chain_whose_disk_went_behind_its_back() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk(dir.path()).await;
    for n in 1..=2 {
        let overlay = dir.path().join(format!("a.{n}.qcow2"));
        vm.snapshot(SnapshotConfig::new().disk("a", overlay))
            .await
            .unwrap();
    }
    assert_eq!(qemu.block_nodes().len(), 6);
    // A process killed inside `remove_disk` once the guest let the disk go: its nodes stay.
    let spec = vm.spec();
    vm.client()
        .execute_raw("device_del", &serde_json::json!({"id": "a"}))
        .await
        .unwrap();
    until("the guest let the disk go", || qemu.devices().is_empty()).await;
    drop(vm);
    // The next process, with the last spec the dead one kept.
    let again = Vm::attach(qemu.connect().await.unwrap(), spec)
        .await
        .unwrap();
    let report = again.reconcile().await.unwrap();
    assert_eq!(report.gone, ["a"]);
    assert!(qemu.block_nodes().is_empty(), "{:?}", qemu.block_nodes());
    assert!(qemu.fdsets().is_empty(), "{:?}", qemu.fdsets());
    assert!(again.spec().disks.is_empty());
}

#[tokio::test]
async fn checkpoints_come_back_with_their_image_when_a_commit_pivots_onto_it() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk_of(dir.path(), qhotplug::Format::Qcow2).await;
    let full = BackupConfig::full().disk("a", dir.path().join("b0.qcow2"));
    backed_up(&vm, full.checkpoint("c1")).await;
    let since = BackupConfig::incremental("c1").disk("a", dir.path().join("b1.qcow2"));
    backed_up(&vm, since.checkpoint("c2")).await;
    assert_eq!(vm.spec().disks[0].checkpoints, ["c1", "c2"]);
    // On the overlay the disk has none: QEMU's bitmaps stay on the image under it.
    vm.snapshot(SnapshotConfig::new().disk("a", dir.path().join("a.1.qcow2")))
        .await
        .unwrap();
    assert!(vm.spec().disks[0].checkpoints.is_empty());
    assert_eq!(vm.spec().disks[0].backing[0].checkpoints, ["c1", "c2"]);
    let mut job = vm.commit_disk("a").await.unwrap();
    job.wait_ready(WAIT).await.unwrap();
    job.pivot().await.unwrap();
    // Back on the image that holds them, they are the disk's again, usable, in order.
    assert_eq!(vm.spec().disks[0].checkpoints, ["c1", "c2"]);
    let states: Vec<(String, qhotplug::CheckpointState)> = vm
        .checkpoints("a")
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.name, c.state))
        .collect();
    let usable = qhotplug::CheckpointState::Usable;
    assert_eq!(
        states,
        [("c1".to_owned(), usable), ("c2".to_owned(), usable)]
    );
    // So an incremental since c2 is taken, and makes c3.
    let since = BackupConfig::incremental("c2").disk("a", dir.path().join("b2.qcow2"));
    backed_up(&vm, since.checkpoint("c3")).await;
    assert_eq!(vm.spec().disks[0].checkpoints, ["c1", "c2", "c3"]);
    assert_eq!(qemu.bitmaps().len(), 3);
}

#[tokio::test]
async fn reconcile_ends_what_a_dead_processs_pull_backup_left_and_gives_its_checkpoint_back() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk_of(dir.path(), qhotplug::Format::Qcow2).await;
    let full = BackupConfig::full().disk("a", dir.path().join("b0.qcow2"));
    backed_up(&vm, full.checkpoint("c1")).await;
    let before = state(&qemu);
    let spec = vm.spec();
    // A pull backup serving when its process dies: nothing of its own runs (no drop).
    let server = NbdServer::Unix(dir.path().join("nbd.sock"));
    let scratch = dir.path().join("scratch.qcow2");
    let pull = vm
        .pull_backup(
            PullConfig::incremental("c1", server)
                .disk("a", &scratch)
                .checkpoint("c2"),
        )
        .await
        .unwrap();
    std::mem::forget(pull);
    std::mem::forget(vm);
    assert!(qemu.nbd_server() && !qemu.jobs().is_empty());
    // The next process, with the spec the dead one kept.
    let again = Vm::attach(qemu.connect().await.unwrap(), spec)
        .await
        .unwrap();
    let report = again.reconcile().await.unwrap();
    assert_eq!(ended(&report), [("pull-a", JobOutcome::Cancelled)]);
    assert_eq!(report.exports_deleted, ["pull-a"]);
    assert_eq!(report.checkpoints_given_back, ["c2"]);
    // QEMU is as before the pull backup: no job, export, server, scratch node or bitmap of it,
    // and c1 records again (the next incremental since c1 covers what c2 had recorded).
    assert_eq!(state(&qemu), before);
    let c1 = qemu.bitmaps().into_iter().find(|b| b.name == "c1").unwrap();
    assert!(c1.recording);
    assert_eq!(again.spec().disks[0].checkpoints, ["c1"]);
}

#[tokio::test]
async fn a_push_backup_that_had_completed_when_its_process_died_keeps_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk_of(dir.path(), qhotplug::Format::Qcow2).await;
    let full = BackupConfig::full().disk("a", dir.path().join("b0.qcow2"));
    backed_up(&vm, full.checkpoint("c1")).await;
    let spec = vm.spec();
    // The incremental backup's job concludes; its process dies before it dismisses it.
    let since = BackupConfig::incremental("c1").disk("a", dir.path().join("b1.qcow2"));
    let backup = vm.backup(since.checkpoint("c2")).await.unwrap();
    std::mem::forget(backup);
    std::mem::forget(vm);
    let job = qemu
        .jobs()
        .into_iter()
        .find(|j| j.id == "backup-a")
        .unwrap();
    assert_eq!((job.status.as_str(), job.error), ("concluded", None));
    // The next process, with the spec the dead one kept (c1 only).
    let again = Vm::attach(qemu.connect().await.unwrap(), spec)
        .await
        .unwrap();
    let report = again.reconcile().await.unwrap();
    assert_eq!(ended(&report), [("backup-a", JobOutcome::Completed)]);
    assert!(report.checkpoints_given_back.is_empty(), "{report:?}");
    // Its checkpoint is QEMU's, so the spec's: the next incremental since c2 is whole.
    assert_eq!(report.chains_updated, ["a"]);
    assert_eq!(again.spec().disks[0].checkpoints, ["c1", "c2"]);
    assert!(qemu.jobs().is_empty());
    assert!(again.reconcile().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_push_backup_still_running_when_its_process_died_is_cancelled_and_gives_its_checkpoint_back(
) {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = with_disk_of(dir.path(), qhotplug::Format::Qcow2).await;
    let full = BackupConfig::full().disk("a", dir.path().join("b0.qcow2"));
    backed_up(&vm, full.checkpoint("c1")).await;
    let spec = vm.spec();
    qemu.hold_jobs_of("backup");
    let since = BackupConfig::incremental("c1").disk("a", dir.path().join("b1.qcow2"));
    let backup = vm.backup(since.checkpoint("c2")).await.unwrap();
    std::mem::forget(backup);
    std::mem::forget(vm);
    // The next process, with the spec the dead one kept, while the job still copies.
    let again = Vm::attach(qemu.connect().await.unwrap(), spec)
        .await
        .unwrap();
    let report = again.reconcile().await.unwrap();
    assert_eq!(ended(&report), [("backup-a", JobOutcome::Cancelled)]);
    assert_eq!(report.checkpoints_given_back, ["c2"]);
    assert!(report.chains_updated.is_empty(), "{report:?}");
    assert_eq!(again.spec().disks[0].checkpoints, ["c1"]);
    let names: Vec<String> = qemu.bitmaps().into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["c1"]);
    assert!(again.reconcile().await.unwrap().is_empty());
}
