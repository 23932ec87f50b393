//! A failure forced at each step of a hot-add, on real QEMU: each leaves `query-pci`, `query-block`,
//! the block nodes, `query-fdsets`, the netdevs, QEMU's fd table and ours exactly as they were.
//!
//! The VMs run (no guest OS): QEMU before 9.1 closes a removed fd set's fds only while the VM runs.

use qhotplug::{DiskConfig, Error, NicConfig};
use qhotplug_cmdline::{Format, Pci};
use qhotplug_netdev::TapBuilder;
use qhotplug_qmp::command::{DeviceAdd, NetdevAdd};
use qhotplug_tests::{Snapshot, TestVm};
use serde_json::{json, Map, Value};

fn map(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// Asserts the hot-add failed at `step` with a clean rollback, and that nothing changed.
async fn assert_rolled_back(
    t: &TestVm,
    before: &Snapshot,
    result: qhotplug::Result<impl std::fmt::Debug>,
    step: &str,
) {
    match result {
        Err(Error::Step {
            step: failed,
            undo_failures,
            ..
        }) => {
            assert_eq!(failed, step);
            assert!(undo_failures.is_empty(), "{undo_failures:?}");
        }
        other => panic!("expected a failure at {step}, got {other:?}"),
    }
    assert_eq!(
        &t.snapshot().await,
        before,
        "state after a failure at {step}"
    );
}

/// Occupies `pci.0` slot `slot` behind the SDK's back (a NIC model with no backend).
async fn squat(t: &TestVm, slot: u8) {
    let cmd = DeviceAdd {
        driver: "virtio-net-pci".into(),
        id: Some("squatter".into()),
        bus: Some("pci.0".into()),
        props: map(json!({"addr": format!("{slot:#x}")})),
    };
    t.vm.client().execute(&cmd).await.unwrap();
}

#[test]
fn device_add_at_an_address_qemu_holds_rolls_back_nodes_and_fd_set() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running_pc().await;
        squat(&t, 9).await;
        let path = t.image("a.raw", 1);
        let before = t.snapshot().await;
        let result =
            t.vm.add_disk(DiskConfig::virtio_blk("a1", &path).at_pci(Pci::new("pci.0", 9)))
                .await;
        assert_rolled_back(&t, &before, result, "device_add").await;
        // The slot the SDK reserved is free again, and the id too.
        t.vm.add_disk(DiskConfig::virtio_blk("a1", &path).at_pci(Pci::new("pci.0", 10)))
            .await
            .unwrap();
    });
}

#[test]
fn device_add_on_a_bus_that_does_not_exist_rolls_back() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running_pc().await;
        let path = t.image("b.raw", 1);
        let before = t.snapshot().await;
        let result =
            t.vm.add_disk(DiskConfig::virtio_blk("b1", &path).at_pci(Pci::new("nobus.0", 1)))
                .await;
        assert_rolled_back(&t, &before, result, "device_add").await;
    });
}

#[test]
fn a_format_node_that_does_not_fit_the_image_rolls_back_the_protocol_node_and_fd_set() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running_pc().await;
        let path = t.image("raw-not-qcow2.img", 1);
        let before = t.snapshot().await;
        let result =
            t.vm.add_disk(DiskConfig::virtio_blk("c1", &path).format(Format::Qcow2))
                .await;
        assert_rolled_back(&t, &before, result, "blockdev-add").await;
    });
}

#[test]
fn a_read_only_image_asked_for_read_write_fails_before_qemu_sees_it() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running_pc().await;
        let path = t.image("ro.raw", 1);
        // Immutable: not even root may open it for writing.
        let chattr = |flag: &str| {
            let ok = std::process::Command::new("chattr")
                .args([flag, path.to_str().unwrap()])
                .status()
                .expect("chattr (e2fsprogs)")
                .success();
            assert!(ok, "chattr {flag}");
        };
        chattr("+i");
        let before = t.snapshot().await;
        let result = t.vm.add_disk(DiskConfig::virtio_blk("r1", &path)).await;
        let after = t.snapshot().await;
        // Read-only, the same image plugs in.
        let ro =
            t.vm.add_disk(DiskConfig::virtio_blk("r2", &path).read_only(true))
                .await;
        chattr("-i");
        match result {
            Err(Error::Open { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(after, before);
        assert!(ro.unwrap().read_only);
    });
}

#[test]
fn a_duplicate_netdev_id_rolls_back_the_passed_fds() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running_pc().await;
        let taken = NetdevAdd {
            kind: "hubport".into(),
            id: "n1-net".into(),
            props: map(json!({"hubid": 0})),
        };
        t.vm.client().execute(&taken).await.unwrap();
        // Before the tap exists: its fds are ours until getfd hands them over, then QEMU's to close.
        let before = t.snapshot().await;
        let tap = TapBuilder::new("qhr%d").queues(2).create().unwrap();
        let name = tap.name().to_owned();
        let result = t.vm.add_nic(NicConfig::new("n1", tap)).await;
        assert_rolled_back(&t, &before, result, "netdev_add").await;
        // Our tap fds went to QEMU and were closed there: the tap is gone with them.
        assert!(!std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
    });
}

#[test]
fn a_tap_that_vanished_rolls_back() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running_pc().await;
        let before = t.snapshot().await;
        let tap = TapBuilder::new("qhv%d").create().unwrap();
        let name = tap.name().to_owned();
        let status = std::process::Command::new("ip")
            .args(["link", "del", &name])
            .status()
            .unwrap();
        assert!(status.success());
        let result = t.vm.add_nic(NicConfig::new("v1", tap)).await;
        assert_rolled_back(&t, &before, result, "netdev_add").await;
    });
}

#[test]
fn a_refused_id_and_a_comma_in_a_path_change_nothing() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running_pc().await;
        let before = t.snapshot().await;
        for bad in ["1disk", "disk 1", "", "disk,1", &"x".repeat(40)] {
            let path = t.image("i.raw", 1);
            match t.vm.add_disk(DiskConfig::virtio_blk(bad, &path)).await {
                Err(Error::Spec(_)) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(t.snapshot().await, before);
        // A comma in a path never reaches QEMU's option parser: the image goes over as an fd.
        let path = t.image("with,comma.raw", 1);
        t.vm.add_disk(DiskConfig::virtio_blk("comma", &path))
            .await
            .unwrap();
        match t.vm.add_disk(DiskConfig::virtio_blk("comma", &path)).await {
            Err(Error::DuplicateId(id)) => assert_eq!(id, "comma"),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn a_device_the_rollback_cannot_take_back_keeps_its_backends_and_reconcile_adopts_it() {
    qhotplug_tests::serial_test(async {
        use qhotplug::IoLimits;
        use qhotplug_tests::{second_monitor, FaultProxy};
        // Paused, with no guest: a `device_del` is never answered.
        let dir = tempfile::tempdir().unwrap();
        let mon2 = dir.path().join("mon2.sock");
        let mut spec = qhotplug_tests::pc_spec();
        second_monitor(&mut spec, &mon2);
        let t = TestVm::launch(spec).await;
        let path = t.image("doubt.raw", 1);
        // The I/O limits step, right after device_add, fails: the rollback must take the device
        // back, and the guest does not answer.
        let proxy = FaultProxy::start(
            &dir.path().join("proxy.sock"),
            &mon2,
            "block_set_io_throttle",
            1,
        );
        let client = qhotplug_qmp::connect(proxy.path()).await.unwrap();
        let vm = qhotplug::Vm::attach(client, t.vm.spec()).await.unwrap();
        let limits = IoLimits {
            bps: 1 << 20,
            ..IoLimits::default()
        };
        let config = DiskConfig::virtio_blk("doubt", &path).io_limits(limits);
        match vm.add_disk(config).await {
            Err(Error::Step {
                step,
                undo_failures,
                ..
            }) => {
                assert_eq!(step, "block_set_io_throttle");
                let undone: Vec<&str> = undo_failures.iter().map(|u| u.step.as_str()).collect();
                assert_eq!(undone, ["device_del doubt"]);
            }
            other => panic!("{other:?}"),
        }
        // The device stays, and so does everything under it: no backend went under a live
        // frontend.
        let s = t.snapshot().await;
        assert!(s.peripherals.contains(&"doubt".to_owned()), "{s:?}");
        assert!(s.nodes.contains(&"doubt-fmt".to_owned()), "{s:?}");
        assert!(s.nodes.contains(&"doubt-file".to_owned()), "{s:?}");
        // In doubt: not listed, and its id and slot not handed out.
        assert!(vm.disks().is_empty());
        assert!(matches!(
            vm.add_disk(DiskConfig::virtio_blk("doubt", &path)).await,
            Err(Error::DuplicateId(_))
        ));
        // reconcile sees QEMU has it: adopted, as planned, with QEMU's (missing) limits.
        let report = vm.reconcile().await.unwrap();
        assert_eq!(report.adopted, ["doubt"]);
        let disks = vm.disks();
        assert_eq!(disks.len(), 1, "{disks:?}");
        assert_eq!(disks[0].id, "doubt");
        assert_eq!(disks[0].io_limits, None);
        assert!(vm.reconcile().await.unwrap().is_empty());
    });
}
