//! Hotplug sequences against real QEMU without a guest: placement, concurrency, relaunch from the
//! recorded spec, and SCSI removal (which needs no guest). Rollback is in `hotplug_rollback_qemu.rs`,
//! real-guest tests in `hotplug_guest.rs`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::future::join_all;
use qhotplug::{DiskConfig, Error, NicConfig, UnplugPolicy, Vm};
use qhotplug_cmdline::{DiskFrontend, Launcher, Pci};
use qhotplug_netdev::TapBuilder;
use qhotplug_qmp::command::{Cont, PciDeviceInfo, QueryBlock, QueryPci};
use qhotplug_tests::{fdset_files, open_fds, pc_spec, q35_spec, TestVm};

/// Every device with a qdev id, by id: (bus number, slot, function), once `query-pci` lists every
/// id in `expect` (on q35 the firmware must have numbered the buses behind the root ports first).
async fn pci_by_id(vm: &Vm, expect: &[&str]) -> BTreeMap<String, (i64, i64, i64)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let placed = pci_snapshot(vm).await;
        if expect.iter().all(|id| placed.contains_key(*id)) {
            return placed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "query-pci never listed all of {expect:?}: {placed:?}"
        );
        tokio::task::yield_now().await;
    }
}

async fn pci_snapshot(vm: &Vm) -> BTreeMap<String, (i64, i64, i64)> {
    fn walk(devs: &[PciDeviceInfo], out: &mut BTreeMap<String, (i64, i64, i64)>) {
        for d in devs {
            if !d.qdev_id.is_empty() {
                out.insert(d.qdev_id.clone(), (d.bus, d.slot, d.function));
            }
            if let Some(b) = &d.pci_bridge {
                walk(&b.devices, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    for bus in vm.client().execute(&QueryPci).await.unwrap() {
        walk(&bus.devices, &mut out);
    }
    out
}

fn tap(queues: usize) -> qhotplug_netdev::Tap {
    TapBuilder::new("qhp%d")
        .queues(queues)
        .create()
        .expect("create a tap (the tests run as root)")
}

#[test]
fn a_virtio_disk_lands_where_the_sdk_says_and_qemu_holds_its_own_fd() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running_pc().await;
        let path = t.image("d1.raw", 8);
        let before = open_fds();
        let disk =
            t.vm.add_disk(DiskConfig::virtio_blk("d1", &path))
                .await
                .unwrap();
        let DiskFrontend::VirtioBlk(pci) = &disk.frontend else {
            panic!("{disk:?}")
        };
        assert_eq!(pci.bus, "pci.0");
        let placed = pci_by_id(&t.vm, &["d1"]).await;
        assert_eq!(placed["d1"], (0, i64::from(pci.slot), 0));
        assert!(t.vm.has_device("d1").await.unwrap());

        let block = t.vm.client().execute(&QueryBlock).await.unwrap();
        let b = block
            .iter()
            .find(|b| b.qdev.as_deref().is_some_and(|q| q.contains("d1")))
            .unwrap_or_else(|| panic!("{block:?}"));
        let inserted = b.inserted.as_ref().unwrap();
        assert_eq!(inserted.node_name.as_deref(), Some("d1-fmt"));
        assert!(!inserted.ro);
        // The fd set stays while the disk's nodes are open: QEMU's fd in it is the image.
        assert_eq!(
            fdset_files(&t.vm).await,
            [("qhotplug:d1".to_owned(), path.canonicalize().unwrap())]
        );
        // The image fd went to QEMU; we keep nothing.
        assert_eq!(open_fds(), before);
        assert_eq!(t.vm.disks(), vec![disk]);
    });
}

#[test]
fn a_scsi_disk_comes_and_goes_without_a_guest_and_its_target_is_reused() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        t.vm.check_scsi_hotplug().await.unwrap();
        let path = t.image("s.raw", 4);
        let first =
            t.vm.add_disk(DiskConfig::scsi_hd("s1", &path).read_only(true))
                .await
                .unwrap();
        let second =
            t.vm.add_disk(DiskConfig::scsi_hd("s2", &path).read_only(true))
                .await
                .unwrap();
        let (DiskFrontend::ScsiHd(a), DiskFrontend::ScsiHd(b)) =
            (&first.frontend, &second.frontend)
        else {
            panic!("{first:?} {second:?}")
        };
        assert_eq!((a.bus.as_str(), a.scsi_id, b.scsi_id), ("scsi0.0", 0, 1));

        t.vm.remove_disk("s1").await.unwrap();
        assert!(!t.vm.has_device("s1").await.unwrap());
        let block = t.vm.client().execute(&QueryBlock).await.unwrap();
        assert!(
        block
            .iter()
            .all(|b| b.inserted.as_ref().and_then(|i| i.node_name.as_deref()) != Some("s1-fmt")),
        "{block:?}"
    );
        let third =
            t.vm.add_disk(DiskConfig::scsi_hd("s3", &path).read_only(true))
                .await
                .unwrap();
        assert_eq!(third.frontend, first.frontend, "s1's target is free again");
        assert!(matches!(
            t.vm.remove_disk("s1").await,
            Err(Error::NotFound { .. })
        ));
    });
}

/// A device that goes without the SDK asking (here a raw `device_del` of a `scsi-hd`, which
/// leaves at once without a guest; in a guest, its own eject) leaves the view by itself: the
/// SDK reads its `DEVICE_DELETED`, forgets it and deletes its nodes and fd set.
#[test]
fn a_disk_removed_behind_the_sdks_back_leaves_the_view_with_its_backends() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        // Running: QEMU before 9.1 lists a removed fd set while paused, until it runs.
        t.vm.resume().await.unwrap();
        let path = t.image("gone.raw", 1);
        let before = t.snapshot().await;
        t.vm.add_disk(DiskConfig::scsi_hd("gone", &path))
            .await
            .unwrap();
        let mut events = t.vm.client().events();
        t.vm.client()
            .execute(&qhotplug_qmp::command::DeviceDel { id: "gone".into() })
            .await
            .unwrap();
        qhotplug_tests::guest::deleted(&mut events, "gone").await;
        // The reconcile the SDK runs for it is a call: settle waits for it, once it started.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !t.vm.spec().disks.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the view kept the disk"
            );
            t.vm.settle().await;
            tokio::task::yield_now().await;
        }
        t.vm.settle().await;
        let after = t.snapshot().await;
        assert_eq!(after.nodes, before.nodes, "its nodes are deleted");
        assert_eq!(after.fdsets, before.fdsets, "its fd set is removed");
        assert!(t.vm.reconcile().await.unwrap().is_empty());
    });
}

#[test]
fn sixteen_concurrent_disk_adds_get_sixteen_slots() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        let paths: Vec<_> = (0..16).map(|i| t.image(&format!("c{i}.raw"), 1)).collect();
        let adds = paths.iter().enumerate().map(|(i, p)| {
            let vm = t.vm.clone();
            let cfg = DiskConfig::virtio_blk(format!("c{i}"), p);
            async move { vm.add_disk(cfg).await }
        });
        let disks: Vec<_> = join_all(adds)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        let slots: HashSet<_> = disks
            .iter()
            .map(|d| match &d.frontend {
                DiskFrontend::VirtioBlk(p) => p.slot,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(slots.len(), 16);
        let ids: Vec<&str> = disks.iter().map(|d| d.id.as_str()).collect();
        let placed = pci_by_id(&t.vm, &ids).await;
        for d in &disks {
            let DiskFrontend::VirtioBlk(p) = &d.frontend else {
                unreachable!()
            };
            assert_eq!(placed[&d.id], (0, i64::from(p.slot), 0), "{}", d.id);
        }
    });
}

#[test]
fn a_nic_with_two_queues_gets_mq_and_vectors_and_our_fds_are_closed() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        let tap = tap(2);
        let name = tap.name().to_owned();
        let before = open_fds();
        let nic = t.vm.add_nic(NicConfig::new("n1", tap)).await.unwrap();
        assert_eq!(nic.queues, 2);
        // Our two tap fds now live only in QEMU.
        assert_eq!(open_fds().len(), before.len() - 2);
        let placed = pci_by_id(&t.vm, &["n1"]).await;
        assert_eq!(placed["n1"].1, i64::from(nic.pci.slot));
        let props = |p: &str| {
            let vm = t.vm.clone();
            let p = p.to_owned();
            async move {
                vm.client()
                    .execute_raw(
                        "qom-get",
                        &serde_json::json!({"path": "/machine/peripheral/n1", "property": p}),
                    )
                    .await
                    .unwrap()
            }
        };
        assert_eq!(props("mq").await, true);
        assert_eq!(props("vectors").await, 6);
        assert_eq!(props("mac").await, nic.mac.to_string());
        // The tap is still there: QEMU holds it.
        assert!(std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
    });
}

#[test]
fn a_pci_unplug_without_a_guest_is_reported_pending_and_the_device_kept() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        let path = t.image("p.raw", 1);
        t.vm.add_disk(DiskConfig::virtio_blk("p1", &path))
            .await
            .unwrap();
        // A per-call policy: only this handle waits half a second.
        let hasty =
            t.vm.with_unplug_policy(UnplugPolicy::new(Duration::from_millis(500)));
        assert_eq!(t.vm.unplug_policy(), UnplugPolicy::default());
        match hasty.remove_disk("p1").await {
            Err(Error::UnplugPending { id, .. }) => assert_eq!(id, "p1"),
            other => panic!("{other:?}"),
        }
        assert!(t.vm.has_device("p1").await.unwrap());
        assert_eq!(t.vm.disks().len(), 1, "the SDK still lists it");
        assert!(t.vm.unplug_pending("p1"), "and says the unplug is pending");
        // Asking again waits again (QEMU says the unplug is already under way).
        assert!(matches!(
            hasty.remove_disk("p1").await,
            Err(Error::UnplugPending { .. })
        ));
    });
}

#[test]
fn q35_puts_each_device_behind_a_free_root_port_and_says_when_none_is_left() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running(q35_spec(3)).await;
        let mut ports = Vec::new();
        for i in 0..3 {
            let path = t.image(&format!("q{i}.raw"), 1);
            let disk =
                t.vm.add_disk(DiskConfig::virtio_blk(format!("q{i}"), &path))
                    .await
                    .unwrap();
            let DiskFrontend::VirtioBlk(p) = disk.frontend else {
                panic!()
            };
            assert_eq!(p.slot, 0);
            ports.push(p.bus);
        }
        assert_eq!(ports, ["rp0", "rp1", "rp2"]);
        let placed = pci_by_id(&t.vm, &["q0", "q1", "q2"]).await;
        for i in 0..3 {
            let (bus, slot, _) = placed[&format!("q{i}")];
            assert_ne!(bus, 0, "behind a port, not on pcie.0");
            assert_eq!(slot, 0);
        }
        let path = t.image("q3.raw", 1);
        match t.vm.add_disk(DiskConfig::virtio_blk("q3", &path)).await {
            Err(Error::NoFreeSlot { bus }) => assert_eq!(bus, "pcie-root-port"),
            other => panic!("{other:?}"),
        }
        // A NIC needs a port too.
        assert!(matches!(
            t.vm.add_nic(NicConfig::new("qn", tap(1))).await,
            Err(Error::NoFreeSlot { .. })
        ));
        // SCSI disks need no port.
        t.vm.add_disk(DiskConfig::scsi_hd("qs", &path))
            .await
            .unwrap();
    });
}

async fn relaunch_keeps_addresses(spec: qhotplug_cmdline::VmSpec) {
    let t = TestVm::running(spec).await;
    let disk = t.image("r.raw", 1);
    let scsi = t.image("rs.raw", 1);
    t.vm.add_disk(DiskConfig::virtio_blk("r1", &disk))
        .await
        .unwrap();
    t.vm.add_nic(NicConfig::new("rn", tap(2))).await.unwrap();
    t.vm.add_disk(DiskConfig::scsi_hd("rs", &scsi))
        .await
        .unwrap();
    let before = pci_by_id(&t.vm, &["r1", "rn", "scsi0"]).await;
    let spec = t.vm.spec();
    // A restart: the first QEMU lets go of the images before the second takes them.
    t.vm.quit().await.unwrap();
    assert_eq!(spec.disks.len(), 2);
    assert_eq!(spec.nics.len(), 1);

    let dir = tempfile::tempdir().unwrap();
    let launcher = Launcher::new(spec.clone(), dir.path().join("run")).nic_fds(
        "rn",
        tap(2).into_queues(),
        Vec::new(),
    );
    let again = TestVm::launch_with(launcher, dir).await;
    again.vm.client().execute(&Cont).await.unwrap();
    assert_eq!(pci_by_id(&again.vm, &["r1", "rn", "scsi0"]).await, before);
    assert!(again.vm.has_device("rs").await.unwrap());
    assert_eq!(again.vm.spec(), spec);
}

#[test]
fn a_pc_vm_relaunched_from_its_spec_has_the_same_devices_at_the_same_addresses() {
    qhotplug_tests::serial_test(async {
        relaunch_keeps_addresses(pc_spec()).await;
    });
}

#[test]
fn a_q35_vm_relaunched_from_its_spec_has_the_same_devices_at_the_same_addresses() {
    qhotplug_tests::serial_test(async {
        relaunch_keeps_addresses(q35_spec(4)).await;
    });
}

#[test]
fn explicit_addresses_are_honoured_and_a_taken_one_is_refused_before_qemu_sees_it() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        let path = t.image("e.raw", 1);
        let disk =
            t.vm.add_disk(DiskConfig::virtio_blk("e1", &path).at_pci(Pci::new("pci.0", 0x1f)))
                .await
                .unwrap();
        assert_eq!(pci_by_id(&t.vm, &["e1"]).await["e1"], (0, 0x1f, 0));
        assert_eq!(
            disk.frontend,
            DiskFrontend::VirtioBlk(Pci::new("pci.0", 0x1f))
        );
        let before = t.snapshot().await;
        for (cfg, what) in [
            (
                DiskConfig::virtio_blk("e2", &path).at_pci(Pci::new("pci.0", 0x1f)),
                "taken",
            ),
            (
                DiskConfig::virtio_blk("e3", &path).at_pci(Pci::new("pci.0", 3)),
                "the SCSI controller's",
            ),
        ] {
            match t.vm.add_disk(cfg).await {
                Err(Error::AddressTaken { bus, .. }) => assert_eq!(bus, "pci.0", "{what}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert_eq!(t.snapshot().await, before);
    });
}

#[test]
fn a_hotplug_on_one_vm_does_not_wait_for_a_stopped_one() {
    qhotplug_tests::serial_test(async {
        let frozen = TestVm::launch(pc_spec()).await;
        let live = TestVm::launch(pc_spec()).await;
        // SIGSTOP: the frozen QEMU answers nothing until SIGCONT.
        frozen.signal(libc::SIGSTOP);
        let stuck = {
            let vm = frozen.vm.clone();
            let path = frozen.image("f.raw", 1);
            tokio::spawn(async move { vm.add_disk(DiskConfig::virtio_blk("f1", path)).await })
        };
        let path = live.image("l.raw", 1);
        let added = tokio::time::timeout(
            Duration::from_secs(20),
            live.vm.add_disk(DiskConfig::virtio_blk("l1", &path)),
        )
        .await
        .expect("the live VM's hotplug finished while the other VM was stopped");
        added.unwrap();
        assert!(!stuck.is_finished());
        frozen.signal(libc::SIGCONT);
        stuck.await.unwrap().unwrap();
    });
}

#[test]
fn a_scsi_disk_on_a_vm_without_a_controller_is_a_typed_error() {
    qhotplug_tests::serial_test(async {
        let mut spec = pc_spec();
        spec.scsi_controllers.clear();
        let t = TestVm::launch(spec).await;
        assert!(matches!(
            t.vm.check_scsi_hotplug().await,
            Err(Error::NoScsiController(_))
        ));
        let path = t.image("n.raw", 1);
        let before = t.snapshot().await;
        match t.vm.add_disk(DiskConfig::scsi_hd("n1", &path)).await {
            Err(Error::NoScsiController(id)) => assert_eq!(id, "n1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.snapshot().await, before);
    });
}

#[test]
fn attaching_to_a_running_qemu_learns_its_slots_controllers_and_machine() {
    qhotplug_tests::serial_test(async {
        // A QEMU the SDK did not launch, with devices the SDK was not told about.
        let (qemu, client) = qhotplug_tests::Qemu::launch(
            &[
                "-machine",
                "q35",
                "-device",
                "pcie-root-port,id=port-a,chassis=1,bus=pcie.0,addr=0x4",
                "-device",
                "pcie-root-port,id=port-b,chassis=2,bus=pcie.0,addr=0x5",
                "-device",
                "virtio-scsi-pci,id=ctl,bus=pcie.0,addr=0x6",
                "-device",
                "virtio-net-pci,id=taken,bus=port-a,addr=0x0",
            ],
            qhotplug_qmp::Config::new(),
        )
        .await;
        // Paused, before the firmware has numbered the buses: query-pci lists nothing behind the root
        // ports, QOM does. The spec the caller has says pc; QEMU says q35, and QEMU wins.
        let vm = Vm::attach(
            client,
            qhotplug_cmdline::VmSpec::new("elsewhere", qhotplug_cmdline::Machine::Pc),
        )
        .await
        .unwrap();
        assert_eq!(vm.spec().machine, qhotplug_cmdline::Machine::Q35);
        // The controller QEMU has is in the view, where QEMU has it.
        assert_eq!(
            vm.spec().scsi_controllers,
            [qhotplug_cmdline::ScsiController {
                id: "ctl".into(),
                pci: Pci::new("pcie.0", 6),
            }]
        );
        let dir = qemu.dir();
        let path = qhotplug_tests::image(dir, "a.raw", 1);
        // port-a holds a device QEMU reported; port-b is the free one.
        let disk = vm
            .add_disk(DiskConfig::virtio_blk("a1", &path))
            .await
            .unwrap();
        assert_eq!(
            disk.frontend,
            DiskFrontend::VirtioBlk(Pci::new("port-b", 0))
        );
        // The controller was found with qom-list.
        let scsi = qhotplug_tests::image(dir, "s.raw", 1);
        let s = vm.add_disk(DiskConfig::scsi_hd("s1", &scsi)).await.unwrap();
        match s.frontend {
            DiskFrontend::ScsiHd(a) => assert_eq!(a.bus, "ctl.0"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            vm.add_disk(DiskConfig::virtio_blk("a2", &path)).await,
            Err(Error::NoFreeSlot { .. })
        ));
    });
}

/// Each error QEMU gives that the SDK tells apart, produced on the QEMU under test (the suite
/// runs on 7.2 and 10.0) and classified by `qhotplug::qemu_errors`.
#[test]
fn each_qemu_error_the_sdk_tells_apart_is_classified_on_this_qemu() {
    use qhotplug::qemu_errors::{is_absent, is_backend_in_use, is_guest_busy, is_unplug_under_way};
    // ("guest is busy" and "already in the process of unplug" need a guest: hotplug_unplug_guest.rs.)
    use qhotplug_qmp::command::*;
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        let c = t.vm.client();
        let absent = [
            c.execute(&DeviceDel { id: "nope".into() })
                .await
                .unwrap_err(),
            c.execute(&BlockdevDel {
                node_name: "nope-fmt".into(),
            })
            .await
            .unwrap_err(),
            c.execute(&NetdevDel {
                id: "nope-net".into(),
            })
            .await
            .unwrap_err(),
            c.execute(&Closefd {
                fdname: "nope-tap0".into(),
            })
            .await
            .unwrap_err(),
            c.execute(&RemoveFd {
                fdset_id: 4242,
                fd: None,
            })
            .await
            .unwrap_err(),
        ];
        for e in &absent {
            assert!(is_absent(e), "not read as absent: {e}");
            assert!(!is_unplug_under_way(e) && !is_guest_busy(e), "{e}");
        }
        // An error that is not "absent": a node in use.
        let path = t.image("busy.raw", 1);
        t.vm.add_disk(DiskConfig::virtio_blk("b1", &path))
            .await
            .unwrap();
        let in_use = c
            .execute(&BlockdevDel {
                node_name: "b1-fmt".into(),
            })
            .await
            .unwrap_err();
        assert!(!is_absent(&in_use), "{in_use}");
        assert!(is_backend_in_use(&in_use), "{in_use}");
        // A chardev in use: the monitor's own.
        let busy = c
            .execute(&ChardevRemove { id: "qmp".into() })
            .await
            .unwrap_err();
        assert!(is_backend_in_use(&busy), "{busy}");
        assert!(!is_absent(&busy), "{busy}");
        assert!(!is_backend_in_use(&absent[1]), "{}", absent[1]);
        // Nothing to stop, and nothing of those to remove, for a pull backup's end.
        let stopped = c.execute(&NbdServerStop).await.unwrap_err();
        assert!(
            qhotplug::qemu_errors::is_nbd_server_not_running(&stopped),
            "{stopped}"
        );
        let bitmap = c
            .execute(&BlockDirtyBitmapRemove {
                node: "b1-fmt".into(),
                name: "nope".into(),
            })
            .await
            .unwrap_err();
        let export = c
            .execute(&BlockExportDel {
                id: "nope".into(),
                mode: Some("hard".into()),
            })
            .await
            .unwrap_err();
        let job = c
            .execute(&JobCancel { id: "nope".into() })
            .await
            .unwrap_err();
        for e in [&bitmap, &export, &job] {
            assert!(is_absent(e), "not read as absent: {e}");
        }
    });
}

/// Ids leave the SDK's list of what `reconcile` may clean up once their device is gone and its
/// backends deleted: after many add/remove cycles, a reconcile sends no delete for any of them
/// (netdevs cannot be listed on QEMU 7.2, so an id kept would cost a `netdev_del` each time).
#[test]
fn reconcile_forgets_ids_whose_devices_are_gone_and_clean() {
    use qhotplug_tests::timing::Timings;
    use tracing_subscriber::layer::SubscriberExt;
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        let path = t.image("t.raw", 1);
        for i in 0..20 {
            let id = format!("t{i}");
            t.vm.add_disk(DiskConfig::scsi_hd(&id, &path))
                .await
                .unwrap();
            t.vm.remove_disk(&id).await.unwrap();
        }
        let timings = Timings::default();
        let _trace =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(timings.clone()));
        let report = t.vm.reconcile().await.unwrap();
        assert_eq!(report, qhotplug::Reconciled::default());
        let sent: Vec<String> = timings
            .take()
            .into_iter()
            .filter(|s| s.kind == qhotplug::spans::QMP)
            .map(|s| s.name)
            .collect();
        assert!(
            !sent
                .iter()
                .any(|c| c.ends_with("-del") || c.ends_with("_del") || c == "remove-fd"),
            "reconcile deleted for ids long gone: {sent:?}"
        );
        assert!(sent.contains(&"query-pci".to_owned()), "{sent:?}");
    });
}
