//! Hotplug into a real Linux guest (Debian's cloud kernel and busybox, under TCG): the guest sees
//! each device arrive and go, and `DEVICE_DELETED` arrives. The guest's init prints a line on its
//! console for every block and net uevent (see `tests/guest/build-image`).

use std::time::Duration;

use qhotplug::{DiskConfig, NicConfig};
use qhotplug_cmdline::VmSpec;
use qhotplug_netdev::{MacAddr, TapBuilder};
use qhotplug_qmp::command::{QueryFdsets, QueryNamedBlockNodes};
use qhotplug_tests::{image, open_fds, pc_spec, q35_spec, Guest};

const SEEN: Duration = Duration::from_secs(30);

fn tap(queues: usize) -> qhotplug_netdev::Tap {
    TapBuilder::new("qhg%d").queues(queues).create().unwrap()
}

async fn boot(spec: VmSpec) -> Guest {
    Guest::boot(spec, |l| l).await
}

/// Waits for the guest to report that `name` (a `block` or `net` device) went, after `mark`.
async fn seen_gone(g: &Guest, mark: usize, what: &str, name: &str) {
    g.console
        .wait_for(mark, &format!("qhg: remove {what} {name}"), SEEN)
        .await
        .unwrap_or_else(|| panic!("the guest never saw {name} go: {:?}", g.console.lines()));
}

/// Hot-adds a virtio disk of `mib` MiB and returns the guest's name for it once the guest saw it.
async fn add_disk_seen(g: &Guest, id: &str, mib: u64) -> String {
    let path = image(g.dir(), &format!("{id}.raw"), mib);
    let mark = g.console.mark();
    g.vm.add_disk(DiskConfig::virtio_blk(id, &path))
        .await
        .unwrap();
    let (name, sectors) = g.console.added_disk(mark).await;
    assert_eq!(sectors, mib * 2048, "{id} as {name}");
    name
}

#[test]
fn the_guest_sees_a_virtio_disk_arrive_and_go() {
    qhotplug_tests::serial_test(async {
        let g = boot(pc_spec()).await;
        let mut events = g.vm.client().events();
        let name = add_disk_seen(&g, "vd1", 3).await;
        assert!(name.starts_with("vd"), "{name}");
        let listed = g.console.run("ls /sys/block", SEEN).await;
        assert!(listed.iter().any(|l| l.contains(&name)), "{listed:?}");

        let mark = g.console.mark();
        g.vm.remove_disk("vd1").await.unwrap();
        seen_gone(&g, mark, "block", &name).await;
        let listed = g.console.run("ls /sys/block", SEEN).await;
        assert!(!listed.iter().any(|l| l.contains(&name)), "{listed:?}");
        let deleted = |e: &qhotplug::EventKind| matches!(e, qhotplug::EventKind::DeviceDeleted(d) if d.device.as_deref() == Some("vd1"));
        let deadline = tokio::time::Instant::now() + SEEN;
        assert!(
            events.wait_for(deadline, deleted).await,
            "DEVICE_DELETED for vd1"
        );
        assert!(!g.vm.has_device("vd1").await.unwrap());
    });
}

#[test]
fn the_guest_sees_a_two_queue_nic_with_its_mac_arrive_and_go() {
    qhotplug_tests::serial_test(async {
        // The guest's driver uses as many queue pairs as it has vCPUs.
        let mut spec = pc_spec();
        spec.smp = 2;
        let g = boot(spec).await;
        let mac: MacAddr = "52:54:00:ab:cd:02".parse().unwrap();
        let mark = g.console.mark();
        g.vm.add_nic(NicConfig::new("net1", tap(2)).mac(mac))
            .await
            .unwrap();
        let line = g
            .console
            .wait_for(mark, "qhg: add net", SEEN)
            .await
            .expect("the guest saw the NIC");
        assert!(line.ends_with(&format!("mac={mac}")), "{line}");
        let ifname = qhotplug_tests::guest::reported_name(&line, "net");
        let queues = g
            .console
            .run(&format!("ls /sys/class/net/{ifname}/queues"), SEEN)
            .await;
        for q in ["rx-0", "rx-1", "tx-0", "tx-1"] {
            assert!(queues.iter().any(|l| l.contains(q)), "{q}: {queues:?}");
        }

        let mark = g.console.mark();
        g.vm.remove_nic("net1").await.unwrap();
        seen_gone(&g, mark, "net", &ifname).await;
    });
}

#[test]
fn the_guest_sees_a_scsi_disk_arrive_and_go() {
    qhotplug_tests::serial_test(async {
        let g = boot(pc_spec()).await;
        let path = image(g.dir(), "sd.raw", 2);
        let mark = g.console.mark();
        g.vm.add_disk(DiskConfig::scsi_hd("sd1", &path))
            .await
            .unwrap();
        let (name, sectors) = g.console.added_disk(mark).await;
        assert!(name.starts_with("sd"), "a SCSI disk, not {name}");
        assert_eq!(sectors, 4096);
        let mark = g.console.mark();
        g.vm.remove_disk("sd1").await.unwrap();
        seen_gone(&g, mark, "block", &name).await;
    });
}

#[test]
fn q35_hotplug_behind_a_root_port_reaches_the_guest() {
    qhotplug_tests::serial_test(async {
        let spec = q35_spec(2);
        let g = boot(spec).await;
        let name = add_disk_seen(&g, "qd1", 1).await;
        let mark = g.console.mark();
        g.vm.remove_disk("qd1").await.unwrap();
        seen_gone(&g, mark, "block", &name).await;
    });
}

#[test]
fn fifty_add_remove_cycles_leave_no_fds_nodes_netdevs_or_fd_sets() {
    qhotplug_tests::serial_test(async {
        let g = boot(pc_spec()).await;
        let path = image(g.dir(), "cycle.raw", 1);
        // One cycle first, so lazily made things (the QMP command list, the event channel) exist.
        let warm = |i: usize| {
            let (vm, path) = (g.vm.clone(), path.clone());
            async move {
                vm.add_disk(DiskConfig::virtio_blk(format!("cd{i}"), &path))
                    .await
                    .unwrap();
                vm.add_nic(NicConfig::new(format!("cn{i}"), tap(1)))
                    .await
                    .unwrap();
                vm.remove_disk(&format!("cd{i}")).await.unwrap();
                vm.remove_nic(&format!("cn{i}")).await.unwrap();
            }
        };
        warm(0).await;
        let before = open_fds();
        for i in 1..=50 {
            warm(i).await;
        }
        assert_eq!(open_fds(), before, "our fd table after 50 cycles");
        let c = g.vm.client();
        let nodes = c
            .execute(&QueryNamedBlockNodes { flat: Some(true) })
            .await
            .unwrap();
        assert!(nodes.is_empty(), "{nodes:?}");
        assert!(c.execute(&QueryFdsets).await.unwrap().is_empty());
        let network = c
            .execute(&qhotplug_qmp::command::HumanMonitorCommand {
                command_line: "info network".into(),
                cpu_index: None,
            })
            .await
            .unwrap();
        assert_eq!(network.trim(), "", "netdevs left: {network}");
        assert!(g.vm.disks().is_empty() && g.vm.nics().is_empty());
        let listed = g.console.run("ls /sys/block /sys/class/net", SEEN).await;
        assert!(
            !listed.iter().any(|l| l.contains("vd") || l.contains("eth")),
            "{listed:?}"
        );
    });
}
