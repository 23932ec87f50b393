//! Desired state on the mock QEMU, in seconds: the planner over every kind and field (what is a
//! live change, a removal and addition, a restart), the order of dependent steps, and `apply`:
//! every outcome, a failure that skips only what depends on it, a second apply that sends
//! nothing, a dropped apply that still ends, two applies at once. The same is proven on real QEMU
//! with a booted guest by `tests/tests/apply_guest.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qhotplug::{
    Applied, Balloon, Cdrom, Change, CpuTopology, Desired, Disk, DiskFrontend, Error, IoLimits,
    MacAddr, Machine, MemoryDevice, MemoryDeviceKind, Nic, Outcome, Pci, Plan, Rng, ScsiAddr,
    SerialPort, VirtioSerial, Vm, VmSpec, MIB,
};
use qhotplug_mock::MockQemu;

/// A running `pc` mock with a SCSI controller, vCPU slots and memory slots, and a VM attached
/// to it with a spec that says so.
async fn attached() -> (MockQemu, Vm) {
    let qemu = MockQemu::pc()
        .with_scsi_controller("scsi0", 3)
        .with_vcpus(1, 4)
        .with_memory(128, 2, Some(1024));
    let client = qemu.connect().await.unwrap();
    client.execute(&qhotplug_qmp::command::Cont).await.unwrap();
    let mut spec = VmSpec::new("t", Machine::Pc);
    spec.memory_mib = 128;
    spec.cpu_topology = Some(CpuTopology::max(4));
    (spec.memory_slots, spec.max_memory_mib) = (2, Some(1024));
    let vm = Vm::attach(client, spec).await.unwrap();
    (qemu, vm)
}

/// A 1 MiB raw image in `dir`.
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

/// A virtio RNG on `/dev/urandom`, its address left to the SDK.
fn rng(id: &str) -> Rng {
    Rng {
        id: id.into(),
        pci: Pci::auto(),
        source: "/dev/urandom".into(),
    }
}

fn nic(id: &str, mac: &str) -> Nic {
    Nic {
        id: id.into(),
        mac: mac.parse::<MacAddr>().unwrap(),
        queues: 1,
        pci: Pci::auto(),
        vhost: false,
        link_up: true,
    }
}

/// A virtio-serial controller `controller` with one port `port` named `name` on it.
fn with_port(spec: &mut VmSpec, controller: &str, port: &str, name: &str, socket: PathBuf) {
    spec.virtio_serials.push(VirtioSerial {
        id: controller.into(),
        pci: Pci::auto(),
    });
    spec.serial_ports.push(SerialPort {
        id: port.into(),
        bus: format!("{controller}.0"),
        name: name.into(),
        socket,
    });
}

/// The desired spec of a VM with one device of nearly every kind (vhost-user and virtio-fs need
/// shared memory and a backend: `tests/tests/apply_guest.rs` has them), addresses left to the
/// SDK, on the VM's own machine settings.
fn every_kind(vm: &Vm, dir: &Path) -> VmSpec {
    let mut spec = vm.spec();
    spec.disks
        .push(Disk::virtio_blk("d0", image(dir, "d0.raw"), Pci::auto()));
    spec.disks.push(Disk::new(
        "s0",
        image(dir, "s0.raw"),
        DiskFrontend::ScsiHd(ScsiAddr::auto()),
    ));
    let mut n0 = nic("n0", "52:54:00:00:00:01");
    n0.link_up = false;
    spec.nics.push(n0);
    spec.cdroms
        .push(Cdrom::scsi("cd0", ScsiAddr::auto()).with_medium(image(dir, "cd.iso")));
    spec.smp = 3;
    spec.memory_devices
        .push(MemoryDevice::dimm("m0", 128 * MIB));
    spec.memory_devices.push(MemoryDevice::virtio_mem(
        "vm0",
        256 * MIB,
        64 * MIB,
        Pci::auto(),
    ));
    spec.balloon = Some(Balloon {
        id: "b0".into(),
        pci: Pci::auto(),
    });
    with_port(&mut spec, "vs0", "p0", "org.example.0", dir.join("p0.sock"));
    spec.rngs.push(rng("r0"));
    spec
}

/// A change to a spec.
type Edit<'a> = dyn Fn(&mut VmSpec) + 'a;

fn changes(plan: &Plan) -> Vec<String> {
    plan.steps.iter().map(|s| s.change.to_string()).collect()
}

fn index_of(plan: &Plan, change: &str) -> usize {
    changes(plan)
        .iter()
        .position(|c| c == change)
        .unwrap_or_else(|| panic!("no {change:?} in {plan}"))
}

/// The commands that change QEMU, sent since `from`.
fn changes_since(qemu: &MockQemu, from: usize) -> Vec<String> {
    qemu.commands()[from..]
        .iter()
        .filter(|c| !c.starts_with("query-") && !c.starts_with("qom-"))
        .cloned()
        .collect()
}

fn assert_all_done(applied: &Applied) {
    for (step, outcome) in &applied.steps {
        assert!(
            matches!(outcome, Outcome::Done),
            "{}: {outcome:?}",
            step.change
        );
    }
}

#[tokio::test]
async fn apply_brings_every_kind_to_its_spec_and_a_second_apply_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = attached().await;
    let spec = every_kind(&vm, dir.path());
    let desired = || {
        Desired::new(spec.clone())
            .nic_fds("n0", vec![tap_fd()])
            .balloon_target(96 * MIB)
            .disk_size("d0", 2 << 20)
    };
    let plan = vm.plan(&desired()).await.unwrap();
    assert!(plan.needs_restart.is_empty(), "{plan}");
    // A new disk's size is its image's until the step after its addition.
    let resize = index_of(&plan, &format!("resize disk d0: {} → {}", 1 << 20, 2 << 20));
    assert!(plan.steps[resize]
        .after
        .contains(&index_of(&plan, "add disk d0")));
    let applied = vm.apply(desired()).await.unwrap();
    assert_all_done(&applied);
    assert!(applied.needs_restart.is_empty());

    // QEMU has every device, at the addresses the spec now records.
    let now = vm.spec();
    let mut ids: Vec<String> = qemu.devices().into_iter().map(|d| d.id).collect();
    ids.sort();
    for id in [
        "b0", "cd0", "d0", "m0", "n0", "p0", "r0", "s0", "vm0", "vs0",
    ] {
        assert!(ids.contains(&id.to_owned()), "{id} not in {ids:?}");
    }
    assert!(now.disks.iter().all(|d| match &d.frontend {
        DiskFrontend::VirtioBlk(p) => !p.is_auto(),
        DiskFrontend::ScsiHd(a) | DiskFrontend::ScsiGeneric(a) => !a.is_auto(),
    }));
    assert_eq!(now.smp + now.vcpus.len() as u32, 3);
    assert!(!now.nics[0].link_up);

    // Planned again, from the desired spec or from the VM's own: nothing.
    let plan = vm.plan(&desired()).await.unwrap();
    assert!(plan.is_empty(), "{plan}");
    assert!(vm.plan(&Desired::new(now)).await.unwrap().is_empty());
    let before = qemu.commands().len();
    let again = vm.apply(desired()).await.unwrap();
    assert!(again.steps.is_empty());
    assert_eq!(changes_since(&qemu, before), Vec::<String>::new());
}

#[tokio::test]
async fn each_field_is_a_live_change_a_replacement_or_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (_qemu, vm) = attached().await;
    let spec = every_kind(&vm, dir.path());
    let applied = vm
        .apply(Desired::new(spec).nic_fds("n0", vec![tap_fd()]))
        .await
        .unwrap();
    assert_all_done(&applied);
    let base = vm.spec();
    let plan_of = |edit: &dyn Fn(&mut VmSpec)| {
        let mut spec = base.clone();
        edit(&mut spec);
        let vm = vm.clone();
        async move { vm.plan(&Desired::new(spec)).await.unwrap() }
    };

    // Live changes.
    let limits = IoLimits {
        iops: 100,
        ..IoLimits::default()
    };
    let plan = plan_of(&|s| s.disks[0].io_limits = Some(limits.clone())).await;
    assert_eq!(
        plan.steps[0].change,
        Change::SetIoLimits {
            id: "d0".into(),
            limits: limits.clone()
        }
    );
    let plan = plan_of(&|s| s.nics[0].link_up = true).await;
    assert_eq!(changes(&plan), ["take the link of NIC n0 up"]);
    let plan = plan_of(&|s| s.cdroms[0].medium = None).await;
    assert_eq!(changes(&plan), ["eject CD-ROM cd0"]);
    let plan = plan_of(&|s| (s.smp, s.vcpus) = (4, Vec::new())).await;
    assert_eq!(plan.steps[0].change, Change::SetVcpus { from: 3, to: 4 });
    let plan = plan_of(&|s| {
        s.memory_devices[1].kind = MemoryDeviceKind::VirtioMem {
            pci: Pci::auto(),
            requested: 128 * MIB,
        }
    })
    .await;
    assert_eq!(
        plan.steps[0].change,
        Change::ResizeVirtioMem {
            id: "vm0".into(),
            from: 64 * MIB,
            to: 128 * MIB
        }
    );
    let sized = vm
        .plan(&Desired::new(base.clone()).disk_size("d0", 2 << 20))
        .await
        .unwrap();
    assert_eq!(
        sized.steps[0].change,
        Change::ResizeDisk {
            id: "d0".into(),
            from: 1 << 20,
            to: 2 << 20
        }
    );
    let ballooned = vm
        .plan(&Desired::new(base.clone()).balloon_target(64 * MIB))
        .await
        .unwrap();
    assert_eq!(
        changes(&ballooned),
        [format!("balloon target {}", 64 * MIB)]
    );
    assert!(plan.needs_restart.is_empty());

    // What the device is made of: removed, then added again after its removal.
    for (edit, id) in [
        (
            &(|s: &mut VmSpec| s.disks[0].read_only = true) as &dyn Fn(&mut VmSpec),
            "d0",
        ),
        (
            &|s: &mut VmSpec| s.disks[0].path = dir.path().join("other.raw"),
            "d0",
        ),
        (
            &|s: &mut VmSpec| s.nics[0].mac = "52:54:00:00:00:09".parse().unwrap(),
            "n0",
        ),
        (
            &|s: &mut VmSpec| s.memory_devices[0] = MemoryDevice::dimm("m0", 256 * MIB),
            "m0",
        ),
        (
            &|s: &mut VmSpec| s.serial_ports[0].name = "org.example.1".into(),
            "p0",
        ),
        (
            &|s: &mut VmSpec| s.rngs[0].source = "/dev/random".into(),
            "r0",
        ),
    ] {
        let plan = plan_of(edit).await;
        let remove = plan
            .steps
            .iter()
            .position(|s| matches!(&s.change, Change::Remove { id: r, .. } if r == id))
            .unwrap_or_else(|| panic!("{id}: {plan}"));
        let add = plan
            .steps
            .iter()
            .position(|s| matches!(&s.change, Change::Add { id: a, .. } if a == id))
            .unwrap_or_else(|| panic!("{id}: {plan}"));
        assert!(plan.steps[add].after.contains(&remove), "{id}: {plan}");
        assert!(plan.needs_restart.is_empty(), "{id}: {plan}");
    }

    // What QEMU cannot change live: a restart, with nothing else planned.
    let at_slot_30 = DiskFrontend::VirtioBlk(Pci::new("pci.0", 30));
    let restarts: [(&Edit<'_>, &str); 9] = [
        (&|s| s.machine = Machine::Q35, "machine"),
        (&|s| s.memory_mib = 256, "memory_mib"),
        (&|s| s.max_memory_mib = Some(2048), "max_memory_mib"),
        (
            &|s| s.cpu_topology = Some(CpuTopology::max(8)),
            "cpu_topology",
        ),
        (&|s| s.usb_tablet = true, "usb_tablet"),
        (&|s| s.cdroms[0].boot = true, "boot order"),
        (&|s| s.disks[0].frontend = at_slot_30.clone(), "disk d0"),
        (
            &|s| s.disks[0].frontend = DiskFrontend::ScsiHd(ScsiAddr::auto()),
            "disk d0",
        ),
        (&|s| s.nics[0].pci = Pci::new("pci.0", 31), "NIC n0"),
    ];
    for (edit, what) in restarts {
        let plan = plan_of(edit).await;
        assert_eq!(
            plan.needs_restart
                .iter()
                .map(|r| r.what.as_str())
                .collect::<Vec<_>>(),
            [what],
            "{plan}"
        );
        assert!(plan.steps.is_empty(), "{what}: {plan}");
    }

    // Fields the SDK fills never differ: the VM's own spec with every address left to it.
    let plan = plan_of(&|s| {
        for d in &mut s.disks {
            d.frontend = match &d.frontend {
                DiskFrontend::VirtioBlk(_) => DiskFrontend::VirtioBlk(Pci::auto()),
                _ => DiskFrontend::ScsiHd(ScsiAddr::auto()),
            };
            d.generation = 0;
        }
        s.nics[0].pci = Pci::auto();
        s.vcpus.clear();
        s.smp = 3;
    })
    .await;
    assert!(plan.is_empty(), "{plan}");
}

#[tokio::test]
async fn steps_wait_for_what_they_depend_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_qemu, vm) = attached().await;
    let mut first = vm.spec();
    first.disks.push(Disk::virtio_blk(
        "old",
        image(dir.path(), "old.raw"),
        Pci::new("pci.0", 9),
    ));
    first.nics.push(nic("n-old", "52:54:00:00:00:02"));
    first
        .memory_devices
        .push(MemoryDevice::dimm("m-old", 128 * MIB));
    with_port(
        &mut first,
        "vs-old",
        "p-old",
        "org.example.old",
        dir.path().join("old.sock"),
    );
    let applied = vm
        .apply(Desired::new(first).nic_fds("n-old", vec![tap_fd()]))
        .await
        .unwrap();
    assert_all_done(&applied);

    // Everything swapped: a disk for the old one's slot, a NIC, memory, vCPUs, a controller with
    // a port.
    let mut next = every_kind(&vm, dir.path());
    next.disks.retain(|d| d.id != "old");
    next.disks[0].frontend = DiskFrontend::VirtioBlk(Pci::new("pci.0", 9));
    next.nics.retain(|n| n.id != "n-old");
    next.memory_devices.retain(|m| m.id != "m-old");
    next.virtio_serials.retain(|c| c.id != "vs-old");
    next.serial_ports.retain(|p| p.id != "p-old");
    let plan = vm.plan(&Desired::new(next)).await.unwrap();
    let at = |c: &str| index_of(&plan, c);
    let waits = |a: &str, b: &str| plan.steps[at(a)].after.contains(&at(b));
    assert!(waits("add disk d0", "remove disk old"), "{plan}");
    assert!(waits("add NIC n0", "remove NIC n-old"), "{plan}");
    assert!(
        waits("add memory device m0", "remove memory device m-old"),
        "{plan}"
    );
    assert!(waits("add memory device m0", "vCPUs: 1 → 3"), "{plan}");
    assert!(
        waits("vCPUs: 1 → 3", "remove memory device m-old"),
        "{plan}"
    );
    assert!(
        waits("add serial port p0", "add virtio-serial controller vs0"),
        "{plan}"
    );
    assert!(
        waits(
            "remove virtio-serial controller vs-old",
            "remove serial port p-old"
        ),
        "{plan}"
    );
    assert!(
        waits("take the link of NIC n0 down", "add NIC n0"),
        "{plan}"
    );
    // Independent steps wait for nothing, and every wait is for an earlier step.
    assert!(plan.steps[at("add RNG r0")].after.is_empty(), "{plan}");
    assert!(plan.steps[at("add disk s0")].after.is_empty(), "{plan}");
    for (i, step) in plan.steps.iter().enumerate() {
        assert!(step.after.iter().all(|&j| j < i), "{plan}");
    }
}

#[tokio::test]
async fn a_failed_step_skips_what_waits_for_it_and_leaves_the_rest_done() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = attached().await;
    let mut spec = vm.spec();
    with_port(
        &mut spec,
        "vs0",
        "p0",
        "org.example.0",
        dir.path().join("p0.sock"),
    );
    spec.rngs.push(rng("r0"));
    // One at a time, so the controller's device_add is the first.
    qemu.fail_next("device_add", "injected");
    let applied = vm
        .apply(Desired::new(spec.clone()).concurrency(1))
        .await
        .unwrap();
    let outcome = |c: &str| {
        applied
            .steps
            .iter()
            .find(|(s, _)| s.change.to_string() == c)
            .map(|(_, o)| o)
            .unwrap()
    };
    let controller = applied
        .steps
        .iter()
        .position(|(s, _)| s.change.to_string() == "add virtio-serial controller vs0")
        .unwrap();
    assert!(matches!(
        outcome("add virtio-serial controller vs0"),
        Outcome::Failed(Error::Step { .. })
    ));
    assert!(
        matches!(outcome("add serial port p0"), Outcome::Skipped { because } if *because == controller)
    );
    assert!(matches!(outcome("add RNG r0"), Outcome::Done));
    assert!(!applied.all_done());
    assert_eq!(applied.failed().count(), 1);
    // QEMU has what was done and nothing of what failed; the view agrees; apply again finishes.
    let ids: Vec<String> = qemu.devices().into_iter().map(|d| d.id).collect();
    assert!(
        ids.contains(&"r0".to_owned()) && !ids.contains(&"vs0".to_owned()),
        "{ids:?}"
    );
    assert!(qemu.chardevs().is_empty(), "{:?}", qemu.chardevs());
    assert_eq!(vm.spec().rngs.len(), 1);
    assert!(vm.spec().virtio_serials.is_empty());
    let left = vm.plan(&Desired::new(spec.clone())).await.unwrap();
    assert_eq!(
        changes(&left),
        ["add virtio-serial controller vs0", "add serial port p0"]
    );
    assert_all_done(&vm.apply(Desired::new(spec.clone())).await.unwrap());
    assert!(vm.plan(&Desired::new(spec)).await.unwrap().is_empty());
}

#[tokio::test]
async fn bad_input_is_refused_typed_and_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = attached().await;
    let before = qemu.commands().len();
    // A spec that contradicts itself.
    let mut spec = vm.spec();
    spec.rngs.push(Rng {
        id: "x".into(),
        pci: Pci::new("pci.0", 5),
        source: "/dev/urandom".into(),
    });
    spec.virtio_serials.push(VirtioSerial {
        id: "x".into(),
        pci: Pci::auto(),
    });
    assert!(matches!(
        vm.apply(Desired::new(spec)).await,
        Err(Error::Spec(_))
    ));
    // A size for no disk.
    let sized = Desired::new(vm.spec()).disk_size("nope", 1 << 20);
    assert!(matches!(
        vm.plan(&sized).await,
        Err(Error::Precondition { .. })
    ));
    // A NIC to add without its tap: that step fails typed, sent nothing; the disk beside it is
    // added.
    let mut spec = vm.spec();
    spec.nics.push(nic("n0", "52:54:00:00:00:03"));
    spec.disks.push(Disk::virtio_blk(
        "d0",
        image(dir.path(), "d0.raw"),
        Pci::auto(),
    ));
    assert_eq!(changes_since(&qemu, before), Vec::<String>::new());
    let applied = vm.apply(Desired::new(spec)).await.unwrap();
    let failed: Vec<_> = applied
        .failed()
        .map(|(s, e)| (s.change.to_string(), e.nothing_sent()))
        .collect();
    assert_eq!(failed, [("add NIC n0".to_owned(), true)]);
    assert!(qemu.netdevs().is_empty() && qemu.fd_names().is_empty());
    assert_eq!(vm.spec().disks.len(), 1);
}

#[tokio::test]
async fn a_dropped_apply_runs_every_step_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = attached().await;
    let spec = every_kind(&vm, dir.path());
    let desired = || Desired::new(spec.clone()).nic_fds("n0", vec![tap_fd()]);
    {
        let apply = vm.apply(desired());
        tokio::pin!(apply);
        // Polled until QEMU got its first change, then dropped.
        let first = qemu.commands().len();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while changes_since(&qemu, first).is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "apply sent nothing");
            let _ = tokio::time::timeout(Duration::from_millis(1), &mut apply).await;
        }
    }
    vm.settle().await;
    let plan = vm.plan(&desired()).await.unwrap();
    assert!(plan.is_empty(), "{plan}");
    let cpus = qemu
        .devices()
        .iter()
        .filter(|d| d.driver.ends_with("-cpu"))
        .count();
    assert_eq!((qemu.devices().len(), cpus), (10 + 2 + 1, 2)); // and the SCSI controller
}

#[tokio::test]
async fn two_applies_at_once_never_part_the_spec_from_qemu_and_converge() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = attached().await;
    let spec = every_kind(&vm, dir.path());
    let desired = || Desired::new(spec.clone()).nic_fds("n0", vec![tap_fd()]);
    let (a, b) = tokio::join!(vm.apply(desired()), vm.apply(desired()));
    let (a, b) = (a.unwrap(), b.unwrap());
    // Each step was done by one of them; the other's met it busy, taken or already done.
    for ((step, x), (_, y)) in a.steps.iter().zip(&b.steps) {
        let done = matches!(x, Outcome::Done) || matches!(y, Outcome::Done);
        let refused = |o: &Outcome| match o {
            Outcome::Failed(e) => e.nothing_sent() || matches!(e, Error::Step { .. }),
            _ => true,
        };
        assert!(
            done || (refused(x) && refused(y)),
            "{}: {x:?} / {y:?}",
            step.change
        );
    }
    vm.settle().await;
    // The view is QEMU's: every device the spec lists QEMU has, and the other way round.
    let mut in_spec: Vec<String> = vm
        .spec()
        .disks
        .iter()
        .map(|d| d.id.clone())
        .chain(vm.spec().nics.iter().map(|n| n.id.clone()))
        .collect();
    in_spec.sort();
    let mut in_qemu: Vec<String> = qemu
        .devices()
        .into_iter()
        .filter(|d| {
            d.driver.starts_with("virtio-blk")
                || d.driver.starts_with("virtio-net")
                || d.driver == "scsi-hd"
        })
        .map(|d| d.id)
        .collect();
    in_qemu.sort();
    assert_eq!(in_spec, in_qemu);
    // A third apply finishes whatever was left.
    assert_all_done(&vm.apply(desired()).await.unwrap());
    assert!(vm.plan(&desired()).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_kind_the_spec_cannot_hot_add_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (_qemu, vm) = attached().await;
    let mut spec = vm.spec();
    spec.cdroms
        .push(Cdrom::ide("ide0", qhotplug::IdeAddr::new(1, 0)));
    let mut chained = Disk::virtio_blk("chain", image(dir.path(), "top.qcow2"), Pci::auto());
    chained.backing.push(qhotplug::DiskLayer {
        path: image(dir.path(), "base.raw"),
        format: qhotplug::Format::Raw,
        generation: 0,
        checkpoints: Vec::new(),
    });
    spec.disks.push(chained);
    let plan = vm.plan(&Desired::new(spec)).await.unwrap();
    assert!(plan.steps.is_empty(), "{plan}");
    let what: Vec<&str> = plan.needs_restart.iter().map(|r| r.what.as_str()).collect();
    assert_eq!(what, ["disk chain", "CD-ROM ide0"]);
}

#[tokio::test]
async fn an_inflated_balloon_is_deflated_before_memory_goes_and_set_again_after() {
    let (_qemu, vm) = attached().await;
    let mut spec = vm.spec();
    spec.balloon = Some(Balloon {
        id: "b0".into(),
        pci: Pci::auto(),
    });
    spec.memory_devices
        .push(MemoryDevice::dimm("m0", 128 * MIB));
    let applied = vm
        .apply(Desired::new(spec.clone()).balloon_target(96 * MIB))
        .await
        .unwrap();
    assert_all_done(&applied);
    spec.memory_devices.clear();
    let plan = vm.plan(&Desired::new(spec.clone())).await.unwrap();
    let whole = format!("balloon target {}", (128 + 128) * MIB);
    let again = format!("balloon target {}", 96 * MIB);
    assert_eq!(
        changes(&plan),
        [whole.as_str(), "remove memory device m0", again.as_str()]
    );
    let (deflate, remove, set) = (index_of(&plan, &whole), 1, 2);
    assert_eq!(plan.steps[remove].after, [deflate]);
    assert_eq!(plan.steps[set].after, [remove]);
    assert_all_done(&vm.apply(Desired::new(spec.clone())).await.unwrap());
    assert!(vm.plan(&Desired::new(spec)).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_device_the_guest_gives_up_unasked_leaves_the_view_and_apply_adds_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let (qemu, vm) = attached().await;
    let mut spec = vm.spec();
    spec.disks.push(Disk::virtio_blk(
        "d0",
        image(dir.path(), "d0.raw"),
        Pci::auto(),
    ));
    spec.rngs.push(rng("r0"));
    assert_all_done(&vm.apply(Desired::new(spec.clone())).await.unwrap());
    // The guest ejects the RNG by itself: the SDK follows, its backend deleted.
    qemu.guest_eject("r0");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !vm.spec().rngs.is_empty() || qemu.objects().contains(&"r0-rng".to_owned()) {
        assert!(tokio::time::Instant::now() < deadline, "the view kept r0");
        vm.settle().await;
        tokio::task::yield_now().await;
    }
    assert_eq!(vm.spec().disks.len(), 1);
    let plan = vm.plan(&Desired::new(spec.clone())).await.unwrap();
    assert_eq!(changes(&plan), ["add RNG r0"]);
    assert_all_done(&vm.apply(Desired::new(spec)).await.unwrap());
    assert!(qemu.devices().iter().any(|d| d.id == "r0"));
}
