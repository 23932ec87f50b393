//! Storage jobs on real QEMU without a guest: a failure forced at each step before a snapshot
//! of two disks or a mirror starts (through the fault proxy) leaves QEMU's state, our fds and the
//! host's files as they were; reconcile keeps a disk's chain and deletes an image's nodes a
//! failed clean-up left.

use qhotplug::{DiskConfig, Format, MirrorConfig, MirrorSync, SnapshotConfig};
use qhotplug_qmp::command::QueryJobs;
use qhotplug_tests::storage::block_nodes;
use qhotplug_tests::{assert_rolls_back, fdset_files, pc_spec, second_monitor, TestVm};

/// A running VM (no guest OS) with disks `a` and `b` and a second monitor for the fault proxy.
async fn with_two_disks() -> (TestVm, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mon2 = dir.path().join("mon2.sock");
    let mut spec = pc_spec();
    second_monitor(&mut spec, &mon2);
    let t = TestVm::running(spec).await;
    for id in ["a", "b"] {
        let image = t.image(&format!("{id}.raw"), 4);
        t.vm.add_disk(DiskConfig::virtio_blk(id, &image))
            .await
            .unwrap();
    }
    (t, mon2, dir)
}

/// The steps of a snapshot of two disks, in order, with the occurrence to fail.
const SNAPSHOT_STEPS: &[(&str, usize)] = &[
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
fn a_failure_at_each_step_of_a_two_disk_snapshot_leaves_both_disks_as_they_were() {
    qhotplug_tests::serial_test(async {
        let (t, mon2, dir) = with_two_disks().await;
        let (oa, ob) = (dir.path().join("a.1.qcow2"), dir.path().join("b.1.qcow2"));
        for &(step, nth) in SNAPSHOT_STEPS {
            let config = SnapshotConfig::new().disk("a", &oa).disk("b", &ob);
            let (vm, _proxy) = assert_rolls_back(&t, &mon2, step, nth, |vm| async move {
                vm.snapshot(config).await
            })
            .await;
            assert!(vm.disks().iter().all(|d| d.backing.is_empty()), "{step}");
            assert!(
                !oa.exists() && !ob.exists(),
                "{step} #{nth}: an overlay file stayed"
            );
            assert!(t.vm.client().execute(&QueryJobs).await.unwrap().is_empty());
        }
        // Without a fault it goes through.
        let config = SnapshotConfig::new().disk("a", &oa).disk("b", &ob);
        let disks = t.vm.snapshot(config).await.unwrap();
        assert_eq!(disks.len(), 2);
    });
}

/// The steps before a mirror to a qcow2 target starts.
const MIRROR_STEPS: &[(&str, usize)] = &[
    ("add-fd", 1),
    ("blockdev-add", 1),
    ("blockdev-create", 1),
    ("blockdev-add", 2),
    ("blockdev-mirror", 1),
];

#[test]
fn a_failure_at_each_step_before_a_mirror_starts_leaves_the_disk_as_it_was() {
    qhotplug_tests::serial_test(async {
        let (t, mon2, dir) = with_two_disks().await;
        let target = dir.path().join("copy.qcow2");
        for &(step, nth) in MIRROR_STEPS {
            let config = MirrorConfig::new(&target).format(Format::Qcow2);
            let (vm, _proxy) = assert_rolls_back(&t, &mon2, step, nth, |vm| async move {
                vm.mirror_disk("a", config).await
            })
            .await;
            assert_eq!(vm.disks()[0].generation, 0);
            assert!(!target.exists(), "{step} #{nth}: the target file stayed");
        }
        let job =
            t.vm.mirror_disk("a", MirrorConfig::new(&target).format(Format::Qcow2))
                .await
                .unwrap();
        job.cancel().await.unwrap();
        assert!(!target.exists());
    });
}

#[test]
fn reconcile_keeps_a_disks_chain_and_deletes_nodes_of_an_image_it_no_longer_uses() {
    qhotplug_tests::serial_test(async {
        let (t, _mon2, dir) = with_two_disks().await;
        t.vm.snapshot(SnapshotConfig::new().disk("a", dir.path().join("a.1.qcow2")))
            .await
            .unwrap();
        let chain = block_nodes(&t.vm).await;
        // What a job's end whose deletes failed would leave: a node of `a`'s the chain lacks.
        t.vm.client()
            .execute_raw(
                "blockdev-add",
                &serde_json::json!({"driver": "null-co", "node-name": "a-file.9"}),
            )
            .await
            .unwrap();
        let report = t.vm.reconcile().await.unwrap();
        assert_eq!(report.nodes_deleted, ["a-file.9"]);
        assert_eq!(block_nodes(&t.vm).await, chain);
        assert!(t.vm.reconcile().await.unwrap().is_empty());
    });
}

#[test]
fn a_mirror_whose_target_runs_out_of_space_fails_typed_and_the_disk_stays() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let t = TestVm::running(pc_spec()).await;
        let data = qhotplug_tests::storage::data_image(dir.path(), "data.raw", 32, 7);
        let sum = qhotplug_tests::storage::md5(&data);
        t.vm.add_disk(DiskConfig::virtio_blk("d", &data))
            .await
            .unwrap();
        let before = block_nodes(&t.vm).await;
        // 8 MiB for a 32 MiB copy: the raw target is sparse, so it is made, and the copy fails.
        let small = qhotplug_tests::storage::SmallFs::mount(dir.path(), "small", 8);
        let target = small.0.join("copy.raw");
        let mut job =
            t.vm.mirror_disk("d", MirrorConfig::new(&target))
                .await
                .unwrap();
        match job.wait_ready(std::time::Duration::from_secs(60)).await {
            Err(qhotplug::Error::JobFailed { id, error }) => {
                assert_eq!(id, "mirror-d");
                assert!(error.contains("No space left"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        drop(job);
        // The disk is where it was, intact; the job, its nodes and its file are gone.
        assert_eq!(t.vm.disks()[0].path, data);
        assert_eq!(block_nodes(&t.vm).await, before);
        assert!(t.vm.client().execute(&QueryJobs).await.unwrap().is_empty());
        assert!(!target.exists());
        assert_eq!(qhotplug_tests::storage::md5(&data), sum);
    });
}

#[test]
fn qemu_killed_mid_job_is_an_interrupted_job_naming_the_partial_target() {
    qhotplug_tests::serial_test(async {
        let (t, _mon2, dir) = with_two_disks().await;
        let target = dir.path().join("copy.raw");
        let mut job =
            t.vm.mirror_disk("a", MirrorConfig::new(&target).speed(64 << 10))
                .await
                .unwrap();
        t.signal(9);
        match job.wait_ready(std::time::Duration::from_secs(60)).await {
            Err(qhotplug::Error::JobInterrupted { id, disk, partial }) => {
                assert_eq!((id.as_str(), disk.as_str()), ("mirror-a", "a"));
                assert_eq!(partial.as_deref(), Some(target.as_path()));
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn an_orchestrator_that_restarts_finds_its_running_and_its_concluded_jobs_and_ends_them() {
    qhotplug_tests::serial_test(async {
        let (t, mon2, dir) = with_two_disks().await;
        // A slow mirror of `c` (64 MiB of data at 64 KiB/s), and a stream of `b` that ends while
        // nobody watches; then the process that started them "dies": its handles go without a
        // word to QEMU.
        let data = qhotplug_tests::storage::data_image(dir.path(), "c.raw", 64, 3);
        t.vm.add_disk(DiskConfig::virtio_blk("c", &data))
            .await
            .unwrap();
        let target = dir.path().join("c-copy.raw");
        let mirror =
            t.vm.mirror_disk("c", MirrorConfig::new(&target).speed(64 << 10))
                .await
                .unwrap();
        t.vm.snapshot(SnapshotConfig::new().disk("b", dir.path().join("b.1.qcow2")))
            .await
            .unwrap();
        let stream = t.vm.stream_disk("b").await.unwrap();
        let spec = t.vm.spec();
        std::mem::forget((mirror, stream));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let jobs = t.vm.client().execute(&QueryJobs).await.unwrap();
            if jobs
                .iter()
                .any(|j| j.id == "stream-b" && j.status == "concluded")
            {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{jobs:?}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // While a stream job waits concluded and undismissed, QEMU 7.2 and 10.0 segfault
        // answering `query-named-block-nodes`: the SDK does not ask then. Reconcile judges no
        // node, a resize reads the size from `query-block`, and QEMU lives on.
        t.vm.reconcile().await.unwrap();
        t.vm.resize_disk("a", 8 << 20).await.unwrap();
        assert!(!t.vm.client().execute(&QueryJobs).await.unwrap().is_empty());

        // A new process attaches with the spec it kept.
        let client = qhotplug_qmp::connect(&mon2).await.unwrap();
        let vm = qhotplug::Vm::attach(client, spec).await.unwrap();
        let by_id = |id: &str| vm.disks().into_iter().find(|d| d.id == id).unwrap();

        // It asks QEMU for its jobs: both are found, what each was started to do read from
        // QEMU (the mirror's target from the fd QEMU holds).
        let mut found = vm.jobs().await.unwrap();
        found.sort_by(|x, y| x.job_id().cmp(y.job_id()));
        let [mut job, stream] = <[qhotplug::BlockJob; 2]>::try_from(found).unwrap();
        assert_eq!((job.job_id(), stream.job_id()), ("mirror-c", "stream-b"));
        assert_eq!(job.disk_after().path, target);
        assert_eq!(job.disk_after().format, Format::Raw);
        // Held here: a second look finds nothing more, and nothing new starts on the disks.
        assert!(vm.jobs().await.unwrap().is_empty());

        // The stream concluded unwatched: its outcome is read, it is dismissed, the spec follows.
        let b = stream
            .wait(std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert!(b.backing.is_empty());
        assert!(by_id("b").backing.is_empty());
        assert!(vm
            .find_job("b", qhotplug::JobOrigin::Stream)
            .await
            .unwrap()
            .is_none());

        // The mirror is found running; its progress goes on, and it ends here.
        let first = job.info().await.unwrap();
        assert_eq!(first.status, "running");
        job.set_speed(0).await.unwrap();
        let ready = job
            .wait_ready(std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert!(ready.current_progress > first.current_progress);
        let disk = job.pivot().await.unwrap();
        assert_eq!(disk.path, target);
        assert_eq!(by_id("c").path, target);
        assert!(vm.client().execute(&QueryJobs).await.unwrap().is_empty());
        let c_nodes: Vec<String> = block_nodes(&vm)
            .await
            .into_iter()
            .filter(|n| n.starts_with("c-"))
            .collect();
        assert_eq!(c_nodes, ["c-file.1", "c-fmt.1"]);
        // One fd set per open image, each the disk's image now: the mirror's target is `c`'s,
        // and the images the pivot and the stream left are let go of.
        let file = |name: &str| dir.path().join(name).canonicalize().unwrap();
        assert_eq!(
            fdset_files(&t.vm).await,
            [
                (
                    "qhotplug:a".to_owned(),
                    t.dir().join("a.raw").canonicalize().unwrap()
                ),
                ("qhotplug:b".to_owned(), file("b.1.qcow2")),
                ("qhotplug:c".to_owned(), file("c-copy.raw")),
            ]
        );
        // The forgotten handles keep the first VM's core, and with it its QEMU, alive: quit it.
        t.vm.quit().await.unwrap();
    });
}

#[test]
fn a_mirror_of_the_top_alone_stands_on_the_same_backing_chain_after_its_pivot() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let t = TestVm::running(pc_spec()).await;
        let base = qhotplug_tests::storage::data_image(dir.path(), "base.raw", 8, 5);
        t.vm.add_disk(DiskConfig::virtio_blk("c", &base))
            .await
            .unwrap();
        let overlay = dir.path().join("c.1.qcow2");
        t.vm.snapshot(SnapshotConfig::new().disk("c", &overlay))
            .await
            .unwrap();
        // A write into the overlay, flushed (QEMU's own qemu-io on the device, as a guest would).
        let qemu_io = |command: &str| qhotplug_qmp::command::HumanMonitorCommand {
            command_line: format!("qemu-io -d /machine/peripheral/c/virtio-backend \"{command}\""),
            cpu_index: None,
        };
        for command in ["write -P 0x5a 0 65536", "flush"] {
            let out = t.vm.client().execute(&qemu_io(command)).await.unwrap();
            assert!(!out.contains("Error"), "{command}: {out}");
        }
        // A raw target cannot stand on a backing file: refused before anything is made.
        let raw = dir.path().join("top.raw");
        let refused =
            t.vm.mirror_disk("c", MirrorConfig::new(&raw).sync(MirrorSync::Top))
                .await
                .unwrap_err();
        assert!(
            matches!(refused, qhotplug::Error::Precondition { .. }) && refused.nothing_sent(),
            "{refused:?}"
        );
        assert!(!raw.exists());

        let copy = dir.path().join("top.qcow2");
        let config = MirrorConfig::new(&copy)
            .format(Format::Qcow2)
            .sync(MirrorSync::Top);
        let mut job = t.vm.mirror_disk("c", config).await.unwrap();
        job.wait_ready(std::time::Duration::from_secs(60))
            .await
            .unwrap();
        let disk = job.pivot().await.unwrap();
        assert_eq!(disk.path, copy);
        assert_eq!(disk.backing.len(), 1);
        assert_eq!(disk.backing[0].path, base);
        assert_eq!(t.vm.disks()[0], disk);
        let out = t.vm.client().execute(&qemu_io("flush")).await.unwrap();
        assert!(!out.contains("Error"), "{out}");
        // The copy holds the overlay's write and stands on the base: the same contents; the
        // overlay's nodes are gone, the base's stay.
        assert!(qhotplug_tests::storage::same_contents(&copy, &overlay));
        assert_eq!(
            qhotplug_tests::storage::backing_file(&copy).as_deref(),
            base.to_str()
        );
        assert!(!qhotplug_tests::storage::same_contents(&copy, &base));
        assert_eq!(
            block_nodes(&t.vm).await,
            ["c-file", "c-file.2", "c-fmt", "c-fmt.2"]
        );
    });
}

#[test]
fn commits_an_earlier_process_started_are_found_and_ended() {
    qhotplug_tests::serial_test(async {
        let (t, mon2, dir) = with_two_disks().await;
        let base = t.vm.disks()[0].path.clone();
        t.vm.snapshot(SnapshotConfig::new().disk("a", dir.path().join("a.1.qcow2")))
            .await
            .unwrap();
        // `b` on two overlays, its middle one committed into its base.
        for n in 1..=2 {
            let overlay = dir.path().join(format!("b.{n}.qcow2"));
            t.vm.snapshot(SnapshotConfig::new().disk("b", overlay))
                .await
                .unwrap();
        }
        let commit = t.vm.commit_disk("a").await.unwrap();
        let layer = t.vm.commit_layer("b", 0).await.unwrap();
        assert_eq!(layer.job_id(), "commit-b-gen1");
        let spec = t.vm.spec();
        std::mem::forget((commit, layer));

        let client = qhotplug_qmp::connect(&mon2).await.unwrap();
        let vm = qhotplug::Vm::attach(client, spec.clone()).await.unwrap();
        // Nothing of another kind is found in its place.
        assert!(vm
            .find_job("a", qhotplug::JobOrigin::Stream)
            .await
            .unwrap()
            .is_none());
        // Both are found by asking QEMU, each for what it is.
        let mut found = vm.jobs().await.unwrap();
        found.sort_by(|x, y| x.job_id().cmp(y.job_id()));
        let [mut job, layer] = <[qhotplug::BlockJob; 2]>::try_from(found).unwrap();
        assert_eq!(
            (job.job_id(), layer.job_id()),
            ("commit-a", "commit-b-gen1")
        );
        let b = layer
            .wait(std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(b.path, dir.path().join("b.2.qcow2"));
        assert_eq!(b.backing.len(), 1);
        assert_eq!(b.backing[0].path, spec.disks[1].backing[1].path);
        assert_eq!(vm.disks()[1], b);
        job.wait_ready(std::time::Duration::from_secs(60))
            .await
            .unwrap();
        let disk = job.pivot().await.unwrap();
        assert_eq!((&disk.path, disk.backing.len()), (&base, 0));
        assert_eq!(vm.disks()[0], disk);
        assert!(vm.client().execute(&QueryJobs).await.unwrap().is_empty());
        let a_nodes: Vec<String> = block_nodes(&vm)
            .await
            .into_iter()
            .filter(|n| n.starts_with("a-"))
            .collect();
        assert_eq!(a_nodes, ["a-file", "a-fmt"]);
        let b_nodes: Vec<String> = block_nodes(&vm)
            .await
            .into_iter()
            .filter(|n| n.starts_with("b-"))
            .collect();
        assert_eq!(b_nodes, ["b-file", "b-file.2", "b-fmt", "b-fmt.2"]);
        // The forgotten handles keep the first VM's core, and with it its QEMU, alive: quit it.
        t.vm.quit().await.unwrap();
    });
}

/// A mirror of disk `id` onto a new qcow2 image at `copy`, ready to pivot.
async fn ready_mirror(t: &TestVm, id: &str, copy: &std::path::Path) -> qhotplug::BlockJob {
    let config = MirrorConfig::new(copy).format(Format::Qcow2);
    let mut job = t.vm.mirror_disk(id, config).await.unwrap();
    job.wait_ready(std::time::Duration::from_secs(60))
        .await
        .unwrap();
    job
}

#[test]
fn a_pivot_and_a_snapshot_made_after_the_spec_was_kept_are_read_back_by_reconcile() {
    qhotplug_tests::serial_test(async {
        let (t, mon2, dir) = with_two_disks().await;
        // The spec as a process kept it before it mirrored `a` onto a copy and pivoted, and
        // snapshotted `b`, then died before it kept the spec again.
        let kept = t.vm.spec();
        let copy = dir.path().join("a-copy.qcow2");
        let job = ready_mirror(&t, "a", &copy).await;
        job.pivot().await.unwrap();
        t.vm.snapshot(SnapshotConfig::new().disk("b", dir.path().join("b.1.qcow2")))
            .await
            .unwrap();
        let ran = t.vm.spec();
        // The next process attaches with the old spec: reconcile takes the chains QEMU runs,
        // so a relaunch from its spec boots the images the guest wrote to.
        let client = qhotplug_qmp::connect(&mon2).await.unwrap();
        let again = qhotplug::Vm::attach(client, kept).await.unwrap();
        let report = again.reconcile().await.unwrap();
        assert_eq!(report.chains_updated, ["a", "b"], "{report:?}");
        assert!(report.nodes_deleted.is_empty(), "{report:?}");
        assert_eq!(again.spec().disks, ran.disks);
        assert_eq!(again.disks()[0].path, copy);
        assert!(again.reconcile().await.unwrap().is_empty());
    });
}

#[test]
fn a_mirror_found_pivoted_keeps_the_image_the_disk_runs_on_whatever_ends_its_handle() {
    qhotplug_tests::serial_test(async {
        let (t, mon2, dir) = with_two_disks().await;
        let kept = t.vm.spec();
        let copy = dir.path().join("a-copy.qcow2");
        let job = ready_mirror(&t, "a", &copy).await;
        // Its process asks for the pivot and dies before it dismisses the job.
        let mut events = t.vm.client().events();
        t.vm.client()
            .execute_raw("job-complete", &serde_json::json!({"id": "mirror-a"}))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        let concluded = events
            .wait_for(deadline, |e| {
                matches!(e, qhotplug_qmp::EventKind::JobStatusChange(c)
                    if c.id == "mirror-a" && c.status == "concluded")
            })
            .await;
        assert!(concluded);
        std::mem::forget(job);
        // The next process finds the job and, not wanting it, cancels it: QEMU had switched
        // the disk, so the copy is the disk now, kept on the host and in the view.
        let client = qhotplug_qmp::connect(&mon2).await.unwrap();
        let again = qhotplug::Vm::attach(client, kept).await.unwrap();
        let found = again.jobs().await.unwrap();
        let [job] = <[qhotplug::BlockJob; 1]>::try_from(found).unwrap();
        job.cancel().await.unwrap();
        assert_eq!(again.disks()[0].path, copy);
        assert!(copy.exists());
        assert!(again.reconcile().await.unwrap().is_empty());
    });
}
