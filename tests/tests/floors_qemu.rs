//! The benchmarks' floors do what the SDK does: the fleet's batch (add a `scsi-hd`, add a
//! `virtio-blk`, remove the `scsi-hd`) through the SDK, through the blocking floor
//! (`raw::RawMonitor`) and through the epoll floor (two VMs at once), each on its own paused QEMU,
//! leaves every QEMU in the same state: the same PCI devices, drives, block nodes, fd sets and
//! peripherals.

use qhotplug::{DiskConfig, Pci};
use qhotplug_cmdline::{Disk, ScsiAddr};
use qhotplug_tests::epoll_floor;
use qhotplug_tests::raw::{scsi_disk, RawMonitor, RawOp};
use qhotplug_tests::{pc_spec, second_monitor, Snapshot, TestVm};

const TARGET: u16 = 3;
const SLOT: u8 = 9;

/// A paused `pc` VM with a second monitor at `mon2.sock` in its scratch directory, and that path.
async fn vm_with_a_second_monitor() -> (TestVm, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mon2.sock");
    let mut spec = pc_spec();
    second_monitor(&mut spec, &path);
    let t = TestVm::launch_with(qhotplug::Launcher::new(spec, dir.path().join("run")), dir).await;
    (t, path)
}

/// The batch as the floors run it, with images in `t`'s directory.
fn batch(t: &TestVm) -> Vec<RawOp> {
    let scsi = scsi_disk("d0", &t.image("d0.raw", 1), TARGET);
    let blk = Disk::virtio_blk("b0", t.image("b0.raw", 1), Pci::new("pci.0", SLOT));
    vec![
        RawOp::AddDisk(scsi.clone()),
        RawOp::AddDisk(blk),
        RawOp::RemoveDisk(scsi),
    ]
}

/// What the batch may change, for comparing one VM with another: QEMU's and our fd tables name
/// each VM's own files, so they are left out, and an fd set's fds are compared by their tag (the
/// numbers QEMU gives them depend on what else it has open, such as a second connection).
fn comparable(mut s: Snapshot) -> Snapshot {
    for set in &mut s.fdsets {
        for fd in &mut set.fds {
            fd.fd = -1;
        }
    }
    // Each QEMU has its own master key, named at random.
    for object in &mut s.objects {
        if object.starts_with("qhotplug-key-") {
            *object = "qhotplug-key-…".into();
        }
    }
    Snapshot {
        qemu_fds: Vec::new(),
        our_fds: Vec::new(),
        ..s
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn both_floors_leave_qemu_as_the_sdk_does() {
    let (sdk, _) = vm_with_a_second_monitor().await;
    let (threads, threads_mon) = vm_with_a_second_monitor().await;
    let (epoll_a, epoll_a_mon) = vm_with_a_second_monitor().await;
    let (epoll_b, epoll_b_mon) = vm_with_a_second_monitor().await;
    let before = comparable(sdk.snapshot().await);

    let scsi_addr = ScsiAddr {
        bus: "scsi0.0".into(),
        channel: 0,
        scsi_id: TARGET,
        lun: 0,
    };
    sdk.vm
        .add_disk(DiskConfig::scsi_hd("d0", sdk.image("d0.raw", 1)).at_scsi(scsi_addr))
        .await
        .unwrap();
    sdk.vm
        .add_disk(
            DiskConfig::virtio_blk("b0", sdk.image("b0.raw", 1)).at_pci(Pci::new("pci.0", SLOT)),
        )
        .await
        .unwrap();
    sdk.vm.remove_disk("d0").await.unwrap();
    let want = comparable(sdk.snapshot().await);
    assert_ne!(want, before, "the batch changed nothing");

    let ops = batch(&threads);
    let marks =
        tokio::task::spawn_blocking(move || RawMonitor::connect(&threads_mon).run_batch(&ops))
            .await
            .unwrap();
    assert_eq!(marks.len(), 4);
    assert_eq!(
        comparable(threads.snapshot().await),
        want,
        "the thread floor"
    );

    let batches = vec![batch(&epoll_a), batch(&epoll_b)];
    let marks = tokio::task::spawn_blocking(move || {
        let mut monitors = vec![
            RawMonitor::connect(&epoll_a_mon),
            RawMonitor::connect(&epoll_b_mon),
        ];
        let marks = epoll_floor::run(&mut monitors, batches);
        // The monitors still work as blocking ones afterwards.
        for m in &mut monitors {
            m.call(&serde_json::json!({"execute": "query-status"}), None);
        }
        marks
    })
    .await
    .unwrap();
    for (t, what) in [(&epoll_a, "the epoll floor, VM a"), (&epoll_b, "VM b")] {
        assert_eq!(comparable(t.snapshot().await), want, "{what}");
    }
    // Per VM: the batch's start, then one instant per operation.
    assert!(marks.iter().all(|m| m.len() == 4), "{marks:?}");
}
