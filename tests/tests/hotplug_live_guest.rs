//! Live changes to plugged devices, seen from a real guest: a disk grown online, a NIC's link
//! taken down and up. Bad input is refused before QEMU is asked, and a relaunch from
//! `vm.spec()` keeps the change.

use std::time::Duration;

use qhotplug::{DiskConfig, Error, NicConfig, TapBuilder};
use qhotplug_qmp::command::{HumanMonitorCommand, QueryNamedBlockNodes};
use qhotplug_tests::{image, pc_spec, Guest, TestVm};

/// How long the guest may take to see a change (TCG).
const SEEN: Duration = Duration::from_secs(60);

#[test]
fn a_disk_grows_online_and_the_guest_sees_its_new_size() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let path = image(g.dir(), "g.raw", 1);
        let mark = g.console.mark();
        g.vm.add_disk(DiskConfig::virtio_blk("g1", &path))
            .await
            .unwrap();
        let (dev, sectors) = g.console.added_disk(mark).await;
        assert!(dev.starts_with("vd") && sectors == 2048, "{dev}: {sectors}");

        // Bad input changes nothing: a shrink, a size QEMU cannot take, an id that is no disk.
        match g.vm.resize_disk("g1", 512 << 10).await {
            Err(Error::ShrinkRefused {
                current, requested, ..
            }) => {
                assert_eq!((current, requested), (1 << 20, 512 << 10))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            g.vm.resize_disk("g1", 1000).await,
            Err(Error::InvalidSize { size: 1000, .. })
        ));
        assert!(matches!(
            g.vm.resize_disk("nope", 4 << 20).await,
            Err(Error::NotFound {
                kind: qhotplug::DeviceKind::Disk,
                ..
            })
        ));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);

        assert_eq!(g.vm.resize_disk("g1", 4 << 20).await.unwrap(), 1 << 20);
        // virtio-blk announces the new capacity; the guest's size follows (512-byte sectors).
        g.console
            .until_says(&format!("cat /sys/block/{dev}/size"), "8192", SEEN)
            .await;
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
    });
}

#[test]
fn a_resize_is_refused_for_a_read_only_disk_and_kept_by_a_relaunch() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        // Images outside the VM's scratch directory, which goes with the first VM.
        let images = tempfile::tempdir().unwrap();
        let ro = image(images.path(), "ro.raw", 1);
        t.vm.add_disk(DiskConfig::virtio_blk("ro1", &ro).read_only(true))
            .await
            .unwrap();
        assert!(matches!(
            t.vm.resize_disk("ro1", 2 << 20).await,
            Err(Error::ReadOnly(id)) if id == "ro1"
        ));
        let rw = image(images.path(), "rw.raw", 1);
        t.vm.add_disk(DiskConfig::virtio_blk("rw1", &rw))
            .await
            .unwrap();
        t.vm.resize_disk("rw1", 3 << 20).await.unwrap();

        // The new size lives in the image: a VM launched from the spec sees it (once the first
        // QEMU is gone, and its image locks with it).
        let spec = t.vm.spec();
        let pid = t.vm.pid().unwrap();
        drop(t);
        assert!(qhotplug_tests::exited(pid, Duration::from_secs(5))
            .await
            .unwrap());
        let dir = tempfile::tempdir().unwrap();
        let again =
            TestVm::launch_with(qhotplug::Launcher::new(spec, dir.path().join("run")), dir).await;
        let size = again
            .vm
            .client()
            .execute(&QueryNamedBlockNodes { flat: Some(true) })
            .await
            .unwrap()
            .into_iter()
            .find(|n| n.node_name.as_deref() == Some("rw1-fmt"))
            .and_then(|n| n.image)
            .unwrap()
            .virtual_size;
        assert_eq!(size, 3 << 20);
    });
}

#[test]
fn a_nics_link_goes_down_and_up_and_the_guest_carrier_follows() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let mark = g.console.mark();
        let tap = TapBuilder::new("qhl%d").create().unwrap();
        g.vm.add_nic(NicConfig::new("l1", tap).no_vhost())
            .await
            .unwrap();
        let ifname = g.console.added(mark, "net").await;
        g.console
            .run(&format!("ip link set {ifname} up"), SEEN)
            .await;
        let carrier = format!("cat /sys/class/net/{ifname}/carrier");
        g.console.until_says(&carrier, "1", SEEN).await;

        assert!(matches!(
            g.vm.set_link("nope", false).await,
            Err(Error::NotFound {
                kind: qhotplug::DeviceKind::Nic,
                ..
            })
        ));
        g.vm.set_link("l1", false).await.unwrap();
        g.console.until_says(&carrier, "0", SEEN).await;
        assert!(
            !g.vm.spec().nics[0].link_up,
            "the spec says the link is down"
        );
        let network =
            g.vm.client()
                .execute(&HumanMonitorCommand {
                    command_line: "info network".into(),
                    cpu_index: None,
                })
                .await
                .unwrap();
        println!("{network}");
        g.vm.set_link("l1", true).await.unwrap();
        g.console.until_says(&carrier, "1", SEEN).await;
        assert!(g.vm.spec().nics[0].link_up);
    });
}

#[test]
fn a_vm_launched_from_a_spec_with_a_link_down_boots_with_no_carrier() {
    qhotplug_tests::serial_test(async {
        let mut spec = pc_spec();
        spec.nics.push(qhotplug::Nic {
            id: "b1".into(),
            mac: "52:54:00:00:00:b1".parse().unwrap(),
            queues: 1,
            pci: qhotplug::Pci::new("pci.0", 6),
            vhost: false,
            link_up: false,
        });
        let tap = TapBuilder::new("qhl%d").create().unwrap();
        let g = Guest::boot(spec, |l| l.nic_fds("b1", tap.into_queues(), Vec::new())).await;
        let listed = g.console.run("ls /sys/class/net", SEEN).await;
        let ifname = listed
            .iter()
            .find(|n| n.starts_with("eth"))
            .unwrap_or_else(|| panic!("no NIC in the guest: {listed:?}"))
            .clone();
        g.console
            .run(&format!("ip link set {ifname} up"), SEEN)
            .await;
        let carrier = format!("cat /sys/class/net/{ifname}/carrier");
        g.console.until_says(&carrier, "0", SEEN).await;
        g.vm.set_link("b1", true).await.unwrap();
        g.console.until_says(&carrier, "1", SEEN).await;
    });
}

/// The I/O limits `query-block` shows for device `id`.
async fn limits_of(vm: &qhotplug::Vm, id: &str) -> qhotplug::IoLimits {
    vm.io_limits(id).await.unwrap()
}

#[test]
fn io_limits_are_set_at_hot_add_changed_cleared_and_kept_by_a_relaunch() {
    use qhotplug::IoLimits;
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        let images = tempfile::tempdir().unwrap();
        let path = image(images.path(), "io.raw", 1);
        let first = IoLimits {
            bps_rd: 1 << 20,
            bps_wr: 2 << 20,
            ..IoLimits::default()
        };
        t.vm.add_disk(DiskConfig::virtio_blk("io1", &path).io_limits(first.clone()))
            .await
            .unwrap();
        assert_eq!(limits_of(&t.vm, "io1").await, first);

        // What QEMU would refuse is refused before it is asked, and changes nothing.
        for bad in [
            IoLimits {
                bps: 1,
                bps_rd: 1,
                ..IoLimits::default()
            },
            IoLimits {
                iops_max: Some(10),
                ..IoLimits::default()
            },
        ] {
            assert!(matches!(
                t.vm.set_io_limits("io1", bad).await,
                Err(Error::InvalidIoLimits { .. })
            ));
        }
        assert!(matches!(
            t.vm.set_io_limits("nope", first.clone()).await,
            Err(Error::NotFound {
                kind: qhotplug::DeviceKind::Disk,
                ..
            })
        ));
        assert_eq!(limits_of(&t.vm, "io1").await, first);

        let second = IoLimits {
            iops: 100,
            iops_max: Some(200),
            ..IoLimits::default()
        };
        t.vm.set_io_limits("io1", second.clone()).await.unwrap();
        assert_eq!(limits_of(&t.vm, "io1").await, second);
        assert_eq!(t.vm.spec().disks[0].io_limits, Some(second.clone()));

        // A relaunch from the spec gets them before its guest runs, paused or not.
        let mut spec = t.vm.spec();
        let pid = t.vm.pid().unwrap();
        drop(t);
        assert!(qhotplug_tests::exited(pid, Duration::from_secs(5))
            .await
            .unwrap());
        spec.paused = false;
        let dir = tempfile::tempdir().unwrap();
        let again =
            TestVm::launch_with(qhotplug::Launcher::new(spec, dir.path().join("run")), dir).await;
        assert_eq!(limits_of(&again.vm, "io1").await, second);
        let status = again
            .vm
            .client()
            .execute(&qhotplug_qmp::command::QueryStatus)
            .await
            .unwrap();
        assert!(status.running, "resumed once the limits were set");

        again
            .vm
            .set_io_limits("io1", IoLimits::default())
            .await
            .unwrap();
        assert_eq!(limits_of(&again.vm, "io1").await, IoLimits::default());
        assert_eq!(again.vm.spec().disks[0].io_limits, None);
    });
}

#[test]
fn a_tight_read_limit_bites_in_the_guest() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let path = image(g.dir(), "slow.raw", 4);
        let mark = g.console.mark();
        let limits = qhotplug::IoLimits {
            bps_rd: 1 << 20,
            ..qhotplug::IoLimits::default()
        };
        g.vm.add_disk(DiskConfig::virtio_blk("slow", &path).io_limits(limits))
            .await
            .unwrap();
        let dev = g.console.added(mark, "block").await;
        // 3 MiB at 1 MiB/s: at least 3 s, less QEMU's burst allowance; 2 s is a safe floor.
        let start = tokio::time::Instant::now();
        g.console
            .run(
                &format!("dd if=/dev/{dev} of=/dev/null bs=64k count=48"),
                SEEN,
            )
            .await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(2),
            "3 MiB read at 1 MiB/s took only {took:?}"
        );
    });
}
