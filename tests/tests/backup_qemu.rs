//! Backups on real QEMU without a guest: a failure forced at each step before a two-disk
//! incremental backup starts (through the fault proxy) leaves QEMU's state, our fds, the host's
//! files and the checkpoints as they were; two disks backed up together fail together (grouped)
//! when one target runs out of space, and lose nothing; bad requests are typed and send nothing.

use std::path::PathBuf;
use std::time::Duration;

use qhotplug::{
    BackupConfig, CheckpointProblem, DiskConfig, Error, Format, JobOutcome, NbdServer, PullConfig,
};
use qhotplug_qmp::command::QueryJobs;
use qhotplug_tests::storage::{own_data, qcow2_data_image, same_contents, write_64k, SmallFs};
use qhotplug_tests::{assert_rolls_back, pc_spec, second_monitor, TestVm};

const DONE: Duration = Duration::from_secs(60);

/// A running VM (no guest OS) with qcow2 disks `a` and `b` full of data, and a second monitor.
async fn with_two_disks() -> (TestVm, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mon2 = dir.path().join("mon2.sock");
    let mut spec = pc_spec();
    second_monitor(&mut spec, &mon2);
    let t = TestVm::running(spec).await;
    for (id, seed) in [("a", 1), ("b", 2)] {
        let image = qcow2_data_image(dir.path(), id, 4, seed);
        let disk = DiskConfig::virtio_blk(id, &image).format(Format::Qcow2);
        t.vm.add_disk(disk).await.unwrap();
    }
    (t, mon2, dir)
}

/// A push backup run to its end.
async fn backed_up(t: &TestVm, config: BackupConfig) {
    t.vm.backup(config).await.unwrap().wait(DONE).await.unwrap();
}

/// The checkpoints each disk has in QEMU, by name, and whether each records.
async fn checkpoints(t: &TestVm) -> Vec<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for id in ["a", "b"] {
        let listed = t.vm.checkpoints(id).await.unwrap();
        out.push(listed.into_iter().map(|c| (c.name, c.recording)).collect());
    }
    out
}

/// The jobs a reconcile ended, by id, with how each had fared.
fn ended(report: &qhotplug::Reconciled) -> Vec<(&str, &JobOutcome)> {
    report
        .jobs_ended
        .iter()
        .map(|j| (j.id.as_str(), &j.outcome))
        .collect()
}

/// The steps before a two-disk backup starts, in order.
const BACKUP_STEPS: &[(&str, usize)] = &[
    ("add-fd", 1),
    ("blockdev-add", 1),
    ("blockdev-create", 1),
    ("blockdev-add", 2),
    ("add-fd", 2),
    ("blockdev-add", 3),
    ("blockdev-create", 2),
    ("blockdev-add", 4),
    ("transaction", 1),
];

#[test]
fn a_failure_at_each_step_before_a_two_disk_incremental_starts_changes_nothing() {
    qhotplug_tests::serial_test(async {
        let (t, mon2, dir) = with_two_disks().await;
        let d = dir.path();
        let full = BackupConfig::full()
            .disk("a", d.join("a.0.qcow2"))
            .disk("b", d.join("b.0.qcow2"))
            .checkpoint("c1");
        backed_up(&t, full).await;
        let had = checkpoints(&t).await;
        assert_eq!(had, [[("c1".to_owned(), true)], [("c1".to_owned(), true)]]);
        let (ia, ib) = (d.join("a.1.qcow2"), d.join("b.1.qcow2"));
        let incremental = || {
            BackupConfig::incremental("c1")
                .disk_onto("a", &ia, d.join("a.0.qcow2"))
                .disk_onto("b", &ib, d.join("b.0.qcow2"))
                .checkpoint("c2")
        };
        for &(step, nth) in BACKUP_STEPS {
            let config = incremental();
            let (vm, _proxy) =
                assert_rolls_back(
                    &t,
                    &mon2,
                    step,
                    nth,
                    |vm| async move { vm.backup(config).await },
                )
                .await;
            assert!(
                !ia.exists() && !ib.exists(),
                "{step} #{nth}: a target stayed"
            );
            assert!(t.vm.client().execute(&QueryJobs).await.unwrap().is_empty());
            assert_eq!(checkpoints(&t).await, had, "{step} #{nth}");
            assert!(vm.disks().iter().all(|disk| disk.checkpoints == ["c1"]));
        }
        // Without a fault it goes through: both disks have c2, recording.
        backed_up(&t, incremental()).await;
        let now = checkpoints(&t).await;
        let both = [("c1".to_owned(), false), ("c2".to_owned(), true)];
        assert_eq!(now, [both.clone(), both]);
    });
}

#[test]
fn two_disks_backed_up_together_fail_together_and_lose_nothing() {
    qhotplug_tests::serial_test(async {
        let (t, _mon2, dir) = with_two_disks().await;
        let d = dir.path();
        let first = BackupConfig::full()
            .disk("a", d.join("a.0.qcow2"))
            .disk("b", d.join("b.0.qcow2"))
            .checkpoint("c1");
        backed_up(&t, first).await;
        let before = t.snapshot().await;
        let had = checkpoints(&t).await;

        // Disk b's target is on a 1 MiB filesystem: its 4 MiB copy fails, and a's is cancelled.
        let small = SmallFs::mount(d, "small", 1);
        let (ta, tb) = (d.join("a.full.qcow2"), small.0.join("b.full.qcow2"));
        let both = BackupConfig::full()
            .disk("a", &ta)
            .disk("b", &tb)
            .checkpoint("c2");
        let failed = t.vm.backup(both).await.unwrap().wait(DONE).await;
        assert!(matches!(failed, Err(Error::JobFailed { .. })), "{failed:?}");
        assert!(!ta.exists() && !tb.exists());
        assert_eq!(checkpoints(&t).await, had);
        assert!(t
            .vm
            .spec()
            .disks
            .iter()
            .all(|disk| disk.checkpoints == ["c1"]));
        assert!(t.vm.client().execute(&QueryJobs).await.unwrap().is_empty());
        assert_eq!(t.snapshot().await, before);
    });
}

#[test]
fn a_backup_copies_the_same_bytes_with_copy_offloading_without_it_and_across_file_systems() {
    qhotplug_tests::serial_test(async {
        let (t, _mon2, dir) = with_two_disks().await;
        let d = dir.path();
        let source = t.vm.spec().disks[0].path.clone();
        // Another file system: copy_file_range cannot cross it, and QEMU falls back.
        let other = SmallFs::mount(d, "other", 16);
        let targets = [
            ("offloaded", d.join("offloaded.raw"), BackupConfig::full()),
            (
                "read and written, 8 workers of 256 KiB",
                d.join("tuned.raw"),
                BackupConfig::full()
                    .copy_offload(false)
                    .workers(8)
                    .max_chunk(256 << 10),
            ),
            (
                "on another file system",
                other.0.join("o.raw"),
                BackupConfig::full(),
            ),
        ];
        for (what, target, config) in targets {
            let config = config.format(Format::Raw).disk("a", &target);
            backed_up(&t, config).await;
            assert!(same_contents(&source, &target), "{what}");
        }
    });
}

#[test]
fn bad_backup_requests_are_typed_and_send_nothing() {
    qhotplug_tests::serial_test(async {
        let (t, _mon2, dir) = with_two_disks().await;
        let d = dir.path();
        let raw = t.image("raw.raw", 4);
        t.vm.add_disk(DiskConfig::virtio_blk("r", &raw))
            .await
            .unwrap();
        let before = t.snapshot().await;
        let target = d.join("t.qcow2");
        let cases: Vec<(&str, BackupConfig)> = vec![
            (
                "an unknown checkpoint",
                BackupConfig::incremental("nope").disk("a", &target),
            ),
            (
                "a checkpoint on a raw image",
                BackupConfig::full().disk("r", &target).checkpoint("c1"),
            ),
            (
                "a disk twice",
                BackupConfig::full().disk("a", &target).disk("a", &target),
            ),
            ("no disk", BackupConfig::full()),
            (
                "no worker",
                BackupConfig::full().workers(0).disk("a", &target),
            ),
            (
                "an incremental to raw",
                BackupConfig::incremental("c1")
                    .format(Format::Raw)
                    .disk("a", &target),
            ),
        ];
        for (what, config) in cases {
            let refused = t.vm.backup(config).await.unwrap_err();
            assert!(refused.nothing_sent(), "{what}: {refused:?}");
            assert!(!target.exists(), "{what}");
            assert_eq!(t.snapshot().await, before, "{what}");
        }
        let unknown =
            t.vm.backup(BackupConfig::incremental("nope").disk("a", &target))
                .await
                .unwrap_err();
        assert!(matches!(
            unknown,
            Error::Checkpoint {
                problem: CheckpointProblem::Unknown,
                ..
            }
        ));
        // A target that exists is never written over.
        std::fs::write(&target, b"keep me").unwrap();
        let refused =
            t.vm.backup(BackupConfig::full().disk("a", &target))
                .await
                .unwrap_err();
        assert!(refused.nothing_sent(), "{refused:?}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    });
}

#[test]
fn qemu_killed_mid_backup_is_an_interrupted_job_naming_the_incomplete_target() {
    qhotplug_tests::serial_test(async {
        let (t, _mon2, dir) = with_two_disks().await;
        let target = dir.path().join("a.full.qcow2");
        let backup = BackupConfig::full()
            .disk("a", &target)
            .checkpoint("c1")
            .speed(64 << 10);
        let running = t.vm.backup(backup).await.unwrap();
        t.signal(9);
        match running.wait(DONE).await {
            Err(Error::JobInterrupted { id, disk, partial }) => {
                assert_eq!((id.as_str(), disk.as_str()), ("backup-a", "a"));
                assert_eq!(partial.as_deref(), Some(target.as_path()));
            }
            other => panic!("{other:?}"),
        }
    });
}

/// The steps before a one-disk pull backup is served, in order.
const PULL_STEPS: &[(&str, usize)] = &[
    ("add-fd", 1),
    ("blockdev-add", 1),
    ("blockdev-create", 1),
    ("blockdev-add", 2),
    ("transaction", 1),
    ("nbd-server-start", 1),
    ("block-export-add", 1),
];

#[test]
fn a_failure_at_each_step_before_a_pull_backup_is_served_changes_nothing_and_a_dropped_one_ends() {
    qhotplug_tests::serial_test(async {
        let (t, mon2, dir) = with_two_disks().await;
        let d = dir.path();
        let full = BackupConfig::full()
            .disk("a", d.join("a.0.qcow2"))
            .checkpoint("c1");
        backed_up(&t, full).await;
        let before = t.snapshot().await;
        let scratch = d.join("scratch.qcow2");
        let socket = d.join("pull.sock");
        let config = || {
            PullConfig::incremental("c1", NbdServer::Unix(socket.clone()))
                .disk("a", &scratch)
                .checkpoint("c2")
        };
        for &(step, nth) in PULL_STEPS {
            let config = config();
            let (vm, _proxy) = assert_rolls_back(&t, &mon2, step, nth, |vm| async move {
                vm.pull_backup(config).await
            })
            .await;
            assert!(!scratch.exists(), "{step} #{nth}: the scratch file stayed");
            assert!(t.vm.client().execute(&QueryJobs).await.unwrap().is_empty());
            assert_eq!(vm.disks()[0].checkpoints, ["c1"]);
        }
        // A handle dropped while served ends it in the background, the checkpoint given back.
        let pull = t.vm.pull_backup(config()).await.unwrap();
        assert!(socket.exists());
        drop(pull);
        t.vm.reconcile().await.unwrap();
        assert_eq!(t.snapshot().await, before);
        assert!(!scratch.exists());
        assert_eq!(t.vm.spec().disks[0].checkpoints, ["c1"]);
        // And served again, the same way.
        t.vm.pull_backup(config())
            .await
            .unwrap()
            .finish()
            .await
            .unwrap();
        assert_eq!(t.vm.spec().disks[0].checkpoints, ["c1", "c2"]);
    });
}

#[test]
fn after_a_snapshot_and_a_commit_an_incremental_since_a_checkpoint_holds_what_was_written_since() {
    qhotplug_tests::serial_test(async {
        let (t, _mon2, dir) = with_two_disks().await;
        let d = dir.path();
        let full = BackupConfig::full().disk("a", d.join("full.qcow2"));
        backed_up(&t, full.checkpoint("c1")).await;
        // One write before the snapshot, one on the overlay.
        write_64k(&t.vm, "a", 1 << 20).await;
        t.vm.snapshot(qhotplug::SnapshotConfig::new().disk("a", d.join("a.1.qcow2")))
            .await
            .unwrap();
        assert!(t.vm.spec().disks[0].checkpoints.is_empty());
        write_64k(&t.vm, "a", 3 << 20).await;
        let mut commit = t.vm.commit_disk("a").await.unwrap();
        commit.wait_ready(DONE).await.unwrap();
        commit.pivot().await.unwrap();
        // Back on the image that holds c1: the disk's checkpoint again, as QEMU has it.
        assert_eq!(t.vm.spec().disks[0].checkpoints, ["c1"]);
        let listed = t.vm.checkpoints("a").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].state, qhotplug::CheckpointState::Usable);
        let inc = d.join("inc.qcow2");
        let since = BackupConfig::incremental("c1").disk("a", &inc);
        backed_up(&t, since.checkpoint("c2")).await;
        // Exactly the two writes since c1: the one before the snapshot, and the one the commit
        // brought down from the overlay.
        assert_eq!(own_data(&inc), [(1 << 20, 64 << 10), (3 << 20, 64 << 10)]);
        assert_eq!(t.vm.spec().disks[0].checkpoints, ["c1", "c2"]);
    });
}

#[test]
fn a_pull_backup_whose_process_died_is_ended_by_the_next_ones_reconcile() {
    qhotplug_tests::serial_test(async {
        let (t, mon2, dir) = with_two_disks().await;
        let d = dir.path();
        let full = BackupConfig::full().disk("a", d.join("a.0.qcow2"));
        backed_up(&t, full.checkpoint("c1")).await;
        let spec = t.vm.spec();
        let before = qhotplug_tests::Snapshot::take(&t.vm).await;
        let server = NbdServer::Unix(d.join("pull.sock"));
        let config = PullConfig::incremental("c1", server)
            .disk("a", d.join("scratch.qcow2"))
            .checkpoint("c2");
        let pull = t.vm.pull_backup(config).await.unwrap();
        // Its process dies while it serves: nothing of the handle's runs.
        std::mem::forget(pull);
        // The next process, on the second monitor, with the spec the dead one kept.
        let client = qhotplug_qmp::connect(&mon2).await.unwrap();
        let again = qhotplug::Vm::attach(client, spec).await.unwrap();
        let report = again.reconcile().await.unwrap();
        assert_eq!(ended(&report), [("pull-a", &JobOutcome::Cancelled)]);
        assert_eq!(report.exports_deleted, ["pull-a"]);
        assert_eq!(report.checkpoints_given_back, ["c2"]);
        let after = qhotplug_tests::Snapshot::take(&again).await;
        assert_eq!(after.nodes, before.nodes);
        assert_eq!(after.fdsets, before.fdsets);
        assert_eq!(after.block, before.block);
        assert!(again.client().execute(&QueryJobs).await.unwrap().is_empty());
        let listed = again.checkpoints("a").await.unwrap();
        let shown: Vec<(&str, bool)> = listed
            .iter()
            .map(|c| (c.name.as_str(), c.recording))
            .collect();
        assert_eq!(shown, [("c1", true)]);
        // The NBD server is gone too: a new pull backup can start one.
        let server = NbdServer::Unix(d.join("pull2.sock"));
        let config = PullConfig::full(server).disk("a", d.join("scratch2.qcow2"));
        again
            .pull_backup(config)
            .await
            .unwrap()
            .cancel()
            .await
            .unwrap();
    });
}

#[test]
fn a_push_backup_that_completed_before_its_process_died_is_reported_whole_and_keeps_its_checkpoint()
{
    qhotplug_tests::serial_test(async {
        let (t, mon2, dir) = with_two_disks().await;
        let d = dir.path();
        backed_up(
            &t,
            BackupConfig::full()
                .disk("a", d.join("a.0.qcow2"))
                .checkpoint("c1"),
        )
        .await;
        let spec = t.vm.spec();
        write_64k(&t.vm, "a", 1 << 20).await;
        // The incremental backup's job concludes; its process dies before it dismisses it.
        let mut events = t.vm.client().events();
        let since = BackupConfig::incremental("c1").disk("a", d.join("a.1.qcow2"));
        let backup = t.vm.backup(since.checkpoint("c2")).await.unwrap();
        std::mem::forget(backup);
        let concluded = events
            .wait_for(tokio::time::Instant::now() + DONE, |e| {
                matches!(e, qhotplug_qmp::EventKind::JobStatusChange(c)
                    if c.id == "backup-a" && c.status == "concluded")
            })
            .await;
        assert!(concluded);
        // The next process, with the spec the dead one kept (c1 only).
        let client = qhotplug_qmp::connect(&mon2).await.unwrap();
        let again = qhotplug::Vm::attach(client, spec).await.unwrap();
        let report = again.reconcile().await.unwrap();
        assert_eq!(ended(&report), [("backup-a", &JobOutcome::Completed)]);
        assert!(report.checkpoints_given_back.is_empty(), "{report:?}");
        // The checkpoint is QEMU's, so now the spec's, and the target is whole: the next
        // incremental since c2 holds only what is written after it.
        assert_eq!(report.chains_updated, ["a"], "{report:?}");
        assert_eq!(again.spec().disks[0].checkpoints, ["c1", "c2"]);
        assert!(again.client().execute(&QueryJobs).await.unwrap().is_empty());
        assert!(again.reconcile().await.unwrap().is_empty());
        assert_eq!(own_data(&d.join("a.1.qcow2")), [(1 << 20, 64 << 10)]);
        write_64k(&t.vm, "a", 3 << 20).await;
        let next = BackupConfig::incremental("c2").disk_onto(
            "a",
            d.join("a.2.qcow2"),
            d.join("a.1.qcow2"),
        );
        again.backup(next).await.unwrap().wait(DONE).await.unwrap();
        assert_eq!(own_data(&d.join("a.2.qcow2")), [(3 << 20, 64 << 10)]);
    });
}
