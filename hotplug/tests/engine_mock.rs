//! The engine's logic on the mock QEMU, in seconds, without QEMU, root or a guest: the rollback of
//! a hot-add that fails at each step, reservations released, busy marks, and reconcile. The same
//! behaviours are proven on real QEMU and in booted guests by `tests/tests/`; these say at once
//! which rule broke.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qhotplug::{
    DiskConfig, DiskFrontend, Error, IoLimits, Machine, NicConfig, Pci, UnplugPolicy, Vm, VmSpec,
};
use qhotplug_mock::{GuestUnplug, MockQemu};
use serde_json::{json, Value};

/// A VM attached to a fresh paused `pc` mock whose schema is already read.
async fn attached() -> (MockQemu, Vm) {
    let qemu = MockQemu::pc();
    let vm = Vm::attach(qemu.connect().await.unwrap(), VmSpec::new("t", Machine::Pc))
        .await
        .unwrap();
    vm.check_disk_hotplug().await.unwrap();
    (qemu, vm)
}

/// A 1 MiB raw image in `dir` (one per disk: QEMU, and the mock, lock an image a writable disk
/// uses).
fn image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

/// One end of a socketpair, standing in for a tap's fd.
fn tap_fd() -> std::os::fd::OwnedFd {
    let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.into()
}

/// The commands that change QEMU sent since `from`, with the node, fd set or id each names.
fn changes_since(qemu: &MockQemu, from: usize) -> Vec<String> {
    let named = |args: &Value| {
        ["node-name", "id", "fdset-id", "fdname"]
            .iter()
            .find_map(|k| args.get(*k).map(|v| v.to_string().replace('"', "")))
            .unwrap_or_default()
    };
    qemu.requests()[from..]
        .iter()
        .filter(|(c, _)| !c.starts_with("query-") && !c.starts_with("qom-"))
        .map(|(c, args)| format!("{c} {}", named(args)).trim_end().to_owned())
        .collect()
}

/// Whether the mock holds nothing a hot-add could have left: devices, nodes, netdevs, fd sets,
/// `getfd` names.
fn assert_empty(qemu: &MockQemu) {
    assert!(qemu.devices().is_empty(), "{:?}", qemu.devices());
    assert!(qemu.block_nodes().is_empty(), "{:?}", qemu.block_nodes());
    assert!(qemu.netdevs().is_empty(), "{:?}", qemu.netdevs());
    assert!(qemu.fdsets().is_empty(), "{:?}", qemu.fdsets());
    assert!(qemu.fd_names().is_empty(), "{:?}", qemu.fd_names());
}

/// Waits, with a deadline, until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_disk_hot_add_that_fails_at_any_step_is_undone_in_reverse_and_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "a.raw");
    let limits = IoLimits {
        bps: 1 << 20,
        ..IoLimits::default()
    };
    let config = || {
        DiskConfig::virtio_blk("d1", &path)
            .at_pci(Pci::new("pci.0", 5))
            .io_limits(limits.clone())
    };
    // What the hot-add sends, then, for a failure at each step, what the rollback sends after it.
    let (qemu, vm) = attached().await;
    let from = qemu.commands().len();
    vm.add_disk(config()).await.unwrap();
    let forward = changes_since(&qemu, from);
    let fmt = forward[2].strip_prefix("blockdev-add ").unwrap().to_owned();
    let file = forward[1].strip_prefix("blockdev-add ").unwrap().to_owned();
    assert_eq!(
        forward,
        [
            "add-fd".to_owned(),
            format!("blockdev-add {file}"),
            format!("blockdev-add {fmt}"),
            "device_add d1".to_owned(),
            "block_set_io_throttle /machine/peripheral/d1/virtio-backend".to_owned(),
        ]
    );
    let del = |node: &str| format!("blockdev-del {node}");
    // The image's fd set stays while its nodes are open, so every undo after `add-fd` removes it.
    let cases: [(&str, usize, Vec<String>); 5] = [
        ("add-fd", 1, vec![]),
        ("blockdev-add", 1, vec!["remove-fd 0".into()]),
        ("blockdev-add", 2, vec![del(&file), "remove-fd 0".into()]),
        (
            "device_add",
            1,
            vec![del(&fmt), del(&file), "remove-fd 0".into()],
        ),
        (
            "block_set_io_throttle",
            1,
            vec![
                "device_del d1".into(),
                del(&fmt),
                del(&file),
                "remove-fd 0".into(),
            ],
        ),
    ];
    for (command, nth, undo) in cases {
        let (qemu, vm) = attached().await;
        let from = qemu.commands().len();
        qemu.fail_nth(command, nth, "injected");
        match vm.add_disk(config()).await {
            Err(Error::Step {
                step,
                undo_failures,
                ..
            }) => {
                assert_eq!(step, command);
                assert!(undo_failures.is_empty(), "{undo_failures:?}");
            }
            other => panic!("{command} #{nth}: {other:?}"),
        }
        let sent = changes_since(&qemu, from);
        let failed_at = forward
            .iter()
            .filter(|c| c.starts_with(command))
            .nth(nth - 1)
            .unwrap();
        let at = sent.iter().position(|c| c == failed_at).unwrap();
        assert_eq!(sent[at + 1..], undo, "rollback after {command} #{nth}");
        assert_empty(&qemu);
        assert!(vm.disks().is_empty() && vm.spec().disks.is_empty());
        // The slot, the id and the image are free again: the same hot-add now succeeds.
        let disk = vm.add_disk(config()).await.unwrap();
        assert_eq!(disk.frontend, DiskFrontend::VirtioBlk(Pci::new("pci.0", 5)));
    }
}

#[tokio::test]
async fn a_nic_hot_add_that_fails_at_any_step_is_undone_in_reverse() {
    for (command, undo) in [
        ("getfd", vec![]),
        ("netdev_add", vec!["closefd"]),
        ("device_add", vec!["netdev_del n1-net"]),
    ] {
        let (qemu, vm) = attached().await;
        vm.check_nic_hotplug().await.unwrap();
        let from = qemu.commands().len();
        qemu.fail_next(command, "injected");
        let config = || NicConfig::from_fds("n1", vec![tap_fd()]).no_vhost();
        let err = vm.add_nic(config()).await.unwrap_err();
        assert!(matches!(err, Error::Step { step, .. } if step == command));
        let sent = changes_since(&qemu, from);
        let at = sent.iter().position(|c| c.starts_with(command)).unwrap();
        let undone: Vec<&str> = sent[at + 1..]
            .iter()
            .map(|c| {
                if c.starts_with("closefd") {
                    "closefd"
                } else {
                    c
                }
            })
            .collect();
        assert_eq!(undone, undo, "rollback after {command}");
        assert_empty(&qemu);
        assert!(vm.nics().is_empty());
        vm.add_nic(config()).await.unwrap();
    }
}

#[tokio::test]
async fn calls_that_race_for_one_slot_or_one_id_get_it_once_and_the_loser_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "a.raw");
    let (qemu, vm) = attached().await;
    let at5 = |id: &str| DiskConfig::virtio_blk(id, &path).at_pci(Pci::new("pci.0", 5));
    let (a, b) = tokio::join!(vm.add_disk(at5("a")), vm.add_disk(at5("b")));
    let (won, lost) = if a.is_ok() { (a, b) } else { (b, a) };
    won.unwrap();
    let lost = lost.unwrap_err();
    assert!(
        matches!(lost, Error::AddressTaken { slot: 5, .. }),
        "{lost:?}"
    );
    assert!(lost.nothing_sent());

    let (a, b) = tokio::join!(
        vm.add_disk(DiskConfig::virtio_blk("c", image(dir.path(), "c1.raw"))),
        vm.add_disk(DiskConfig::virtio_blk("c", image(dir.path(), "c2.raw")))
    );
    let lost = a.err().or(b.err()).expect("one of them refused");
    assert!(
        matches!(lost, Error::DuplicateId(ref id) | Error::Busy(ref id) if id == "c"),
        "{lost:?}"
    );
    assert!(lost.nothing_sent());
    assert_eq!(qemu.devices().len(), 2);
    assert_eq!(vm.spec().disks.len(), 2);
}

/// A VM with disk `d1` (on `a.raw` in the returned folder) whose guest lets a device go 300 ms
/// after it is asked.
async fn a_disk_the_guest_lets_go_late() -> (tempfile::TempDir, MockQemu, Vm) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "a.raw");
    let (qemu, vm) = attached().await;
    vm.add_disk(DiskConfig::virtio_blk("d1", &path))
        .await
        .unwrap();
    qemu.guest_unplug(GuestUnplug::After(Duration::from_millis(300)));
    (dir, qemu, vm)
}

#[tokio::test]
async fn a_device_being_removed_is_busy_to_every_other_call_until_it_is_gone() {
    let (dir, qemu, vm) = a_disk_the_guest_lets_go_late().await;
    let path = dir.path().join("a.raw");
    let removal = tokio::spawn({
        let vm = vm.clone();
        async move { vm.remove_disk("d1").await }
    });
    until("the guest was asked", || {
        qemu.devices().iter().any(|d| d.id == "d1" && d.unplugging)
    })
    .await;
    let sent = qemu.commands().len();
    let busy = [
        vm.set_io_limits("d1", IoLimits::default())
            .await
            .unwrap_err(),
        vm.resize_disk("d1", 2 << 20).await.unwrap_err(),
        vm.remove_disk("d1").await.unwrap_err(),
    ];
    for err in busy {
        assert!(matches!(err, Error::Busy(ref id) if id == "d1"), "{err:?}");
        assert!(err.nothing_sent());
    }
    let again = vm
        .add_disk(DiskConfig::virtio_blk("d1", &path))
        .await
        .unwrap_err();
    assert!(
        matches!(again, Error::DuplicateId(ref id) if id == "d1"),
        "{again:?}"
    );
    assert!(again.nothing_sent());
    assert_eq!(qemu.commands().len(), sent, "a busy call sent something");
    removal.await.unwrap().unwrap();
    assert_empty(&qemu);
    // The mark went with the device: the id is free.
    qemu.guest_unplug(GuestUnplug::Release);
    vm.add_disk(DiskConfig::virtio_blk("d1", &path))
        .await
        .unwrap();
}

#[tokio::test]
async fn what_left_behind_the_sdks_back_is_forgotten_and_its_backends_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "a.raw");
    let (qemu, vm) = attached().await;
    assert!(vm.reconcile().await.unwrap().is_empty());
    vm.add_disk(DiskConfig::virtio_blk("d1", &path).at_pci(Pci::new("pci.0", 6)))
        .await
        .unwrap();
    vm.add_disk(DiskConfig::virtio_blk("d2", image(dir.path(), "d2.raw")))
        .await
        .unwrap();
    assert!(vm.reconcile().await.unwrap().is_empty());

    // Another monitor takes d1 away.
    let other = qemu.connect().await.unwrap();
    other
        .execute_raw("device_del", &json!({"id": "d1"}))
        .await
        .unwrap();
    until("d1 left", || qemu.devices().iter().all(|d| d.id != "d1")).await;
    // The SDK follows a removal it did not ask for (its DEVICE_DELETED), as a reconcile would:
    // d1 leaves the view, its nodes are deleted.
    until("the view follows", || {
        vm.spec().disks.len() == 1 && qemu.block_nodes().len() == 2
    })
    .await;
    vm.settle().await;
    assert_eq!(vm.spec().disks[0].id, "d2", "d2 and its nodes stay");
    assert!(vm.reconcile().await.unwrap().is_empty());
    // Its slot is free again.
    vm.add_disk(
        DiskConfig::virtio_blk("d3", image(dir.path(), "d3.raw"))
            .at_pci(Pci::new("pci.0", 6))
            .read_only(true),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn an_unplug_the_guest_finishes_after_the_deadline_is_pending_then_reconciled() {
    let (_dir, qemu, vm) = a_disk_the_guest_lets_go_late().await;
    let hasty = vm.with_unplug_policy(UnplugPolicy::new(Duration::from_millis(50)));
    let err = hasty.remove_disk("d1").await.unwrap_err();
    assert!(
        matches!(err, Error::UnplugPending { ref id, .. } if id == "d1"),
        "{err:?}"
    );
    assert!(vm.unplug_pending("d1"));
    assert_eq!(vm.spec().disks.len(), 1, "the device is still there");

    until("the guest let d1 go", || qemu.devices().is_empty()).await;
    let done = vm.reconcile().await.unwrap();
    assert_eq!(done.gone, ["d1"]);
    assert!(!vm.unplug_pending("d1"));
    assert_empty(&qemu);
}

#[tokio::test]
async fn a_guest_that_refuses_keeps_the_device_and_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "a.raw");
    let (qemu, vm) = attached().await;
    vm.add_disk(DiskConfig::virtio_blk("d1", &path).at_pci(Pci::new("pci.0", 7)))
        .await
        .unwrap();
    qemu.guest_unplug(GuestUnplug::Refuse);
    let err = vm.remove_disk("d1").await.unwrap_err();
    assert!(err.is_guest_refusal(), "{err:?}");
    assert_eq!(vm.spec().disks.len(), 1);
    assert_eq!(
        qemu.block_nodes().len(),
        2,
        "the backends stay with the device"
    );
    let taken = vm
        .add_disk(DiskConfig::virtio_blk("d2", &path).at_pci(Pci::new("pci.0", 7)))
        .await
        .unwrap_err();
    assert!(
        matches!(taken, Error::AddressTaken { slot: 7, .. }),
        "{taken:?}"
    );
    assert!(vm.reconcile().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_rng_and_a_serial_port_that_fail_are_undone_and_leave_with_their_backends() {
    use qhotplug::{RngConfig, SerialPortConfig, VirtioSerialConfig};
    let dir = tempfile::tempdir().unwrap();
    for (command, undo) in [
        ("object-add", vec![]),
        ("device_add", vec!["object-del rng0-rng"]),
    ] {
        let (qemu, vm) = attached().await;
        let from = qemu.commands().len();
        qemu.fail_next(command, "injected");
        let err = vm.add_rng(RngConfig::new("rng0")).await.unwrap_err();
        assert!(
            matches!(err, Error::Step { step, .. } if step == command),
            "{err:?}"
        );
        let sent = changes_since(&qemu, from);
        let at = sent.iter().position(|c| c.starts_with(command)).unwrap();
        assert_eq!(sent[at + 1..], undo, "rollback after {command}");
        assert!(qemu.objects().is_empty() && qemu.devices().is_empty());
        assert!(vm.spec().rngs.is_empty());
    }

    let (qemu, vm) = attached().await;
    vm.add_virtio_serial(VirtioSerialConfig::new("vser0"))
        .await
        .unwrap();
    let port = || SerialPortConfig::new("p0", "vser0", "org.example.port", dir.path().join("p0"));
    let from = qemu.commands().len();
    qemu.fail_next("device_add", "injected");
    vm.add_serial_port(port()).await.unwrap_err();
    assert_eq!(
        changes_since(&qemu, from),
        [
            "chardev-add p0-chr",
            "device_add p0",
            "chardev-remove p0-chr"
        ]
    );
    assert!(qemu.chardevs().is_empty());
    vm.add_serial_port(port()).await.unwrap();
    // The controller cannot go while its port is there; the port leaves at once, its chardev
    // after it.
    let busy = vm.remove_virtio_serial("vser0").await.unwrap_err();
    assert!(busy.nothing_sent(), "{busy:?}");
    let from = qemu.commands().len();
    vm.remove_serial_port("p0").await.unwrap();
    assert_eq!(
        changes_since(&qemu, from),
        ["device_del p0", "chardev-remove p0-chr"]
    );
    assert!(qemu.chardevs().is_empty());
    vm.remove_virtio_serial("vser0").await.unwrap();
    assert!(qemu.devices().is_empty());
}

#[tokio::test]
async fn a_medium_change_that_fails_puts_the_old_medium_back_and_deletes_the_new_nodes() {
    use qhotplug::CdromConfig;
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (image(dir.path(), "one.raw"), image(dir.path(), "two.raw"));
    let qemu = MockQemu::pc().with_scsi_controller("scsi0", 3);
    let vm = Vm::attach(qemu.connect().await.unwrap(), VmSpec::new("t", Machine::Pc))
        .await
        .unwrap();
    vm.add_cdrom(CdromConfig::new("cd0").medium(&one))
        .await
        .unwrap();
    let before: Vec<String> = qemu
        .block_nodes()
        .iter()
        .map(|n| n.node_name.clone())
        .collect();
    let from = qemu.commands().len();
    qemu.fail_next("blockdev-insert-medium", "injected");
    let err = vm.insert_medium("cd0", &two).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Step {
                step: "blockdev-insert-medium",
                ..
            }
        ),
        "{err:?}"
    );
    // Undone in reverse: the new medium's nodes (generation 1) go, the old medium (generation 0)
    // goes back in, the tray closes.
    let sent = changes_since(&qemu, from);
    let at = sent
        .iter()
        .position(|c| c.starts_with("blockdev-insert-medium"))
        .unwrap();
    assert_eq!(
        sent[at + 1..],
        [
            "blockdev-del cd0-fmt.1",
            "blockdev-del cd0-file.1",
            "remove-fd 1",
            "blockdev-open-tray cd0",
            "blockdev-insert-medium cd0-fmt",
            "blockdev-close-tray cd0",
        ]
    );
    let after: Vec<String> = qemu
        .block_nodes()
        .iter()
        .map(|n| n.node_name.clone())
        .collect();
    assert_eq!(after, before);
    let drive = qemu.devices().into_iter().find(|d| d.id == "cd0").unwrap();
    assert_eq!(drive.drive.as_deref(), Some("cd0-fmt"));
    assert_eq!(drive.tray_open, Some(false));
    assert_eq!(vm.cdroms()[0].medium, Some(one.clone().into()));
    assert!(vm.reconcile().await.unwrap().is_empty());
}

#[tokio::test]
async fn vcpus_added_are_acknowledged_and_an_unplug_under_tcg_before_10_is_refused_unsent() {
    let qemu = MockQemu::pc().with_vcpus(1, 3);
    let client = qemu.connect().await.unwrap();
    client.execute(&qhotplug_qmp::command::Cont).await.unwrap();
    let mut spec = VmSpec::new("t", Machine::Pc);
    spec.cpu_topology = Some(qhotplug::CpuTopology::max(3));
    let vm = Vm::attach(client, spec).await.unwrap();
    let change = vm.set_vcpus(3).await.unwrap();
    assert_eq!(change.added, ["vcpu1", "vcpu2"]);
    assert!(change.unconfirmed.is_empty(), "{change:?}");
    assert_eq!(vm.spec().vcpus.len(), 2);
    let over = vm.set_vcpus(4).await.unwrap_err();
    assert!(
        matches!(over, Error::InvalidVcpuCount { max: 3, .. }),
        "{over:?}"
    );
    // The mock is QEMU 7.2 under TCG: an unplug is refused before anything that changes QEMU is
    // sent.
    let sent = qemu.commands().len();
    let refused = vm.set_vcpus(1).await.unwrap_err();
    assert!(
        matches!(refused, Error::TcgVcpuUnplug { .. }),
        "{refused:?}"
    );
    assert!(refused.nothing_sent());
    assert!(
        changes_since(&qemu, sent).is_empty(),
        "only queries were sent"
    );
    assert_eq!(vm.spec().vcpus.len(), 2);
}

#[tokio::test]
async fn memory_devices_fit_under_maxmem_and_a_guest_that_answers_plugs_and_balloons() {
    use qhotplug::{BalloonConfig, MemoryConfig, MIB};
    let qemu = MockQemu::pc().with_memory(128, 1, Some(512));
    let client = qemu.connect().await.unwrap();
    client.execute(&qhotplug_qmp::command::Cont).await.unwrap();
    let mut spec = VmSpec::new("t", Machine::Pc);
    (spec.memory_slots, spec.max_memory_mib) = (1, Some(512));
    let vm = Vm::attach(client, spec).await.unwrap();
    vm.add_memory(MemoryConfig::dimm("m1", 128 * MIB))
        .await
        .unwrap();
    // The one slot is taken: refused before anything is sent, the backend never made.
    let full = vm
        .add_memory(MemoryConfig::dimm("m2", 64 * MIB))
        .await
        .unwrap_err();
    assert!(matches!(full, Error::NoFreeSlot { .. }), "{full:?}");
    assert!(full.is_out_of_room() && full.nothing_sent());
    assert_eq!(qemu.objects(), ["m1-mem"]);
    let big = vm
        .add_memory(MemoryConfig::virtio_mem("v1", 512 * MIB, 0))
        .await
        .unwrap_err();
    assert!(matches!(big, Error::OverMaxMemory { .. }), "{big:?}");
    vm.add_memory(MemoryConfig::virtio_mem("v1", 128 * MIB, 0))
        .await
        .unwrap();
    assert_eq!(
        vm.resize_virtio_mem("v1", 64 * MIB).await.unwrap(),
        64 * MIB
    );
    vm.add_balloon(BalloonConfig::new("b0")).await.unwrap();
    vm.set_balloon(192 * MIB).await.unwrap();
    assert_eq!(vm.balloon_actual().await.unwrap(), 192 * MIB);
    // A DIMM the guest lets go takes its backend with it.
    vm.remove_memory("m1").await.unwrap();
    assert_eq!(qemu.objects(), ["v1-mem"]);
    assert!(vm.reconcile().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_network_disk_on_a_qemu_without_its_driver_is_refused_before_anything_is_sent() {
    // The mock's schema lists no block driver by name: to the SDK it has no `nbd`.
    let (qemu, vm) = attached().await;
    let from = qemu.requests().len();
    let nbd = qhotplug::Nbd {
        server: qhotplug::NbdServer::Unix("/run/nbd/n1.sock".into()),
        export: Some("n1".into()),
        reconnect_delay: None,
        tls_dir: None,
    };
    let config = DiskConfig::network("n1", nbd, qhotplug::DiskModel::VirtioBlk);
    match vm.add_disk(config).await {
        Err(Error::NoBlockDriver("nbd")) => {}
        other => panic!("{other:?}"),
    }
    assert!(changes_since(&qemu, from).is_empty());
    assert!(vm.disks().is_empty());
    assert_empty(&qemu);
    // The id is free again.
    let dir = tempfile::tempdir().unwrap();
    vm.add_disk(DiskConfig::virtio_blk("n1", image(dir.path(), "n1.raw")))
        .await
        .unwrap();
}

#[tokio::test]
async fn what_a_dead_processs_unfinished_hot_adds_left_is_found_by_its_names_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "a.raw");
    let qemu = MockQemu::pc();
    // A process that died part-way through hot-adds: a disk's fd set and nodes, a port's chardev,
    // a DIMM's backend; no device. Its ids are nothing the next process knows.
    let dead = qemu.connect().await.unwrap();
    let set = dead
        .add_fd(
            &qhotplug_qmp::command::AddFd {
                fdset_id: None,
                opaque: Some(qhotplug_cmdline::names::fdset_tag("d9")),
            },
            std::fs::File::open(&path).unwrap().into(),
        )
        .await
        .unwrap()
        .fdset_id;
    dead.execute_raw(
        "blockdev-add",
        &json!({"driver": "file", "node-name": "d9-file", "filename": format!("/dev/fdset/{set}")}),
    )
    .await
    .unwrap();
    dead.execute_raw(
        "blockdev-add",
        &json!({"driver": "raw", "node-name": "d9-fmt", "file": "d9-file"}),
    )
    .await
    .unwrap();
    dead.execute_raw(
        "chardev-add",
        &json!({"id": "p9-chr", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": dir.path().join("p9.sock")}},
            "server": true, "wait": false}}}),
    )
    .await
    .unwrap();
    dead.execute_raw(
        "object-add",
        &json!({"qom-type": "memory-backend-ram", "id": "m9-mem", "size": 128 << 20}),
    )
    .await
    .unwrap();
    drop(dead);
    let vm = Vm::attach(qemu.connect().await.unwrap(), VmSpec::new("t", Machine::Pc))
        .await
        .unwrap();
    let done = vm.reconcile().await.unwrap();
    assert_eq!(done.nodes_deleted, ["d9-fmt", "d9-file"], "{done:?}");
    assert_eq!(done.fdsets_removed, [set], "{done:?}");
    assert_eq!(done.chardevs_removed, ["p9-chr"], "{done:?}");
    assert_eq!(done.objects_deleted, ["m9-mem"], "{done:?}");
    assert!(qemu.block_nodes().is_empty() && qemu.fdsets().is_empty());
    assert!(vm.reconcile().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_master_keys_pipe_a_process_left_dying_is_removed_by_reconcile() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = attached().await;
    vm.add_disk(DiskConfig::virtio_blk("d1", image(dir.path(), "d1.raw")))
        .await
        .unwrap();
    // A process that died making its master key (between the key's `add-fd` and `object-add`)
    // left the pipe in a set tagged with the key's id; nothing else names it.
    let (read, _write) = std::io::pipe().unwrap();
    let other = qemu.connect().await.unwrap();
    let add = qhotplug_qmp::command::AddFd {
        fdset_id: None,
        opaque: Some(qhotplug_cmdline::names::master_key("0123456789ab")),
    };
    let left = other.execute_with_fd(&add, read.into()).await.unwrap();
    let done = vm.reconcile().await.unwrap();
    assert_eq!(done.fdsets_removed, vec![left.fdset_id], "{done:?}");
    // The disk's own set stays; a second reconcile finds nothing.
    assert_eq!(qemu.fdsets().len(), 1, "{:?}", qemu.fdsets());
    assert!(vm.reconcile().await.unwrap().is_empty());
}
