//! vCPUs, memory and the balloon, seen from a real guest under TCG: vCPUs 1 → 3 → 1 on pc and q35
//! (onlined by the SDK through the guest agent), a DIMM's and a virtio-mem device's memory coming
//! and going in `MemTotal`, a DIMM the guest leaves offline onlined through the agent, a guest that refuses to give a DIMM back (onlined as normal memory)
//! reported at once, and a balloon the guest gives memory to.

use std::time::Duration;

use futures::StreamExt;
use qhotplug::{BalloonConfig, CpuTopology, Error, EventKind, MemoryConfig, VmSpec, MIB};
use qhotplug_qmp::command::{MemoryDeviceInfo, QueryMemoryDevices};
use qhotplug_tests::{pc_spec, q35_spec, Guest};

/// How long the guest may take to see a change (TCG; onlining a vCPU takes seconds).
const SEEN: Duration = Duration::from_secs(90);

/// The guest's `MemTotal`, in KiB.
async fn mem_total(g: &Guest) -> u64 {
    let out = g.console.run("grep MemTotal /proc/meminfo", SEEN).await;
    out[0]
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("MemTotal in {out:?}"))
}

/// Waits until `MemTotal` is `kib`.
async fn mem_total_becomes(g: &Guest, kib: u64) {
    let done = |out: &[String]| {
        out.len() == 1 && out[0].split_whitespace().nth(1) == Some(&kib.to_string())
    };
    g.console
        .until("grep MemTotal /proc/meminfo", done, SEEN)
        .await;
}

fn with_cpus(mut spec: VmSpec) -> VmSpec {
    spec.cpu_topology = Some(CpuTopology::max(4));
    spec
}

fn with_memory(mut spec: VmSpec) -> VmSpec {
    spec.memory_slots = 2;
    spec.max_memory_mib = Some(1024);
    spec
}

async fn vcpus_one_three_one(spec: VmSpec) {
    let g = Guest::boot_with_agent(with_cpus(spec)).await;
    assert_eq!(
        g.console
            .run("cat /sys/devices/system/cpu/online", SEEN)
            .await,
        ["0"]
    );
    // Generous deadlines: under TCG the guest takes seconds to list a new vCPU.
    let vm = g.vm.with_unplug_policy(qhotplug::UnplugPolicy::new(SEEN));
    let change = vm.set_vcpus_online(3).await.unwrap();
    assert_eq!(change.added, ["vcpu1", "vcpu2"]);
    // The guest's ACPI code acknowledged both (`_OST`).
    assert!(change.unconfirmed.is_empty(), "{change:?}");
    // The agent onlined the two new CPUs, and only them; no console step.
    let guest = change.guest.expect("the agent's report");
    assert_eq!(guest.new, [1, 2], "{guest:?}");
    assert_eq!(guest.onlined, [1, 2], "{guest:?}");
    assert!(guest.failed.is_empty(), "{guest:?}");
    assert_eq!((guest.online, guest.total), (3, 3));
    assert_eq!(
        g.console
            .run("cat /sys/devices/system/cpu/online", SEEN)
            .await,
        ["0-2"]
    );

    // Under TCG, QEMU before 10.0 corrupts its heap on a vCPU unplug: refused before anything is
    // sent, and the vCPUs stay.
    let version = g.vm.client().greeting().version.qemu;
    if version.major < 10 {
        match g.vm.set_vcpus(1).await {
            Err(Error::TcgVcpuUnplug { version: v }) => assert_eq!(v, version),
            other => panic!("{other:?}"),
        }
        assert_eq!(g.vm.spec().vcpus.len(), 2);
        assert_eq!(
            g.vm.vcpu_slots()
                .await
                .unwrap()
                .iter()
                .filter(|s| s.qom_path.is_some())
                .count(),
            3
        );
        return;
    }
    let change = g.vm.set_vcpus(1).await.unwrap();
    assert_eq!(change.removed, ["vcpu2", "vcpu1"]);
    g.console
        .until_says("cat /sys/devices/system/cpu/online", "0", SEEN)
        .await;
    assert!(g.vm.spec().vcpus.is_empty());
    // Three vCPU threads of the four `maxcpus` allows were started (an unplug gives none back
    // under TCG): two more would abort QEMU 10.0 (`tcg_register_thread`), so they are refused
    // before anything is sent, and one more still plugs.
    match g.vm.set_vcpus(3).await {
        Err(Error::TcgVcpuContexts {
            started: 3,
            wanted: 2,
            max: 4,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(g.vm.set_vcpus(2).await.unwrap().added, ["vcpu1"]);
    match g.vm.set_vcpus(1).await.and(g.vm.set_vcpus(2).await) {
        Err(Error::TcgVcpuContexts { started: 4, .. }) => {}
        other => panic!("{other:?}"),
    }
    // QEMU is alive and answers.
    assert_eq!(g.vm.spec().vcpus.len(), 0);
    g.vm.client()
        .execute(&qhotplug_qmp::command::QueryStatus)
        .await
        .unwrap();
}

#[test]
fn vcpus_go_from_one_to_three_and_back_on_pc() {
    qhotplug_tests::serial_test(vcpus_one_three_one(pc_spec()));
}

#[test]
fn vcpus_go_from_one_to_three_and_back_on_q35() {
    qhotplug_tests::serial_test(vcpus_one_three_one(q35_spec(2)));
}

#[test]
fn a_dimm_and_a_virtio_mem_device_grow_and_shrink_the_guests_memory() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(with_memory(pc_spec()), |l| l).await;
        let base = mem_total(&g).await;

        g.vm.add_memory(MemoryConfig::dimm("dimm0", 128 * MIB))
            .await
            .unwrap();
        mem_total_becomes(&g, base + 128 * 1024).await;
        // Onlined as movable memory (the guest image's kernel command line), it can go again.
        g.vm.remove_memory("dimm0").await.unwrap();
        mem_total_becomes(&g, base).await;
        assert!(g
            .vm
            .client()
            .execute(&QueryMemoryDevices)
            .await
            .unwrap()
            .is_empty());

        g.vm.add_memory(MemoryConfig::virtio_mem("vmem0", 256 * MIB, 0))
            .await
            .unwrap();
        assert_eq!(
            g.vm.resize_virtio_mem("vmem0", 128 * MIB).await.unwrap(),
            128 * MIB
        );
        mem_total_becomes(&g, base + 128 * 1024).await;
        assert_eq!(g.vm.resize_virtio_mem("vmem0", 0).await.unwrap(), 0);
        mem_total_becomes(&g, base).await;
        // The spec keeps what was asked for last.
        let spec = g.vm.spec();
        assert!(matches!(
            spec.memory_devices[0].kind,
            qhotplug::MemoryDeviceKind::VirtioMem { requested: 0, .. }
        ));
    });
}

#[test]
fn a_dimm_the_guest_leaves_offline_is_onlined_through_the_agent() {
    qhotplug_tests::serial_test(async {
        let mut spec = with_memory(pc_spec());
        // The kernel's own default: hot-plugged memory stays offline.
        spec.append = Some("memhp_default_state=offline".into());
        let g = Guest::boot_with_agent(spec).await;
        let base = mem_total(&g).await;
        let vm = g.vm.with_unplug_policy(qhotplug::UnplugPolicy::new(SEEN));
        let (dimm, guest) = vm
            .add_memory_online(MemoryConfig::dimm("dimm0", 128 * MIB))
            .await
            .unwrap();
        assert_eq!(dimm.id, "dimm0");
        // One 128 MiB block, new and onlined by the agent.
        assert_eq!(guest.new.len(), 1, "{guest:?}");
        assert_eq!(guest.onlined, guest.new, "{guest:?}");
        assert!(guest.failed.is_empty(), "{guest:?}");
        assert_eq!(guest.online, guest.total);
        mem_total_becomes(&g, base + 128 * 1024).await;
    });
}

#[test]
fn a_guest_that_cannot_give_a_dimm_back_is_reported_at_once_and_the_dimm_stays() {
    qhotplug_tests::serial_test(async {
        let mut spec = with_memory(pc_spec());
        // Onlined as normal (kernel) memory, which Linux cannot offline.
        spec.append = Some("memhp_default_state=online".into());
        let g = Guest::boot(spec, |l| l).await;
        let base = mem_total(&g).await;
        g.vm.add_memory(MemoryConfig::dimm("dimm0", 128 * MIB))
            .await
            .unwrap();
        mem_total_becomes(&g, base + 128 * 1024).await;
        // The DIMM is the guest's only ZONE_NORMAL memory (the rest is below 4 GiB, DMA32), where
        // the kernel allocates first: a walk of /sys and /proc fills slab pages there, which
        // cannot move. Without it the guest sometimes could offline the DIMM after all (one CI
        // run in several): it had put nothing unmovable there yet.
        g.console
            .run("ls -lR /sys /proc >/dev/null 2>&1; echo walked", SEEN)
            .await;

        let mut events = g.vm.client().events();
        let refusal = tokio::spawn(async move {
            while let Some(Ok(e)) = events.next().await {
                if let EventKind::AcpiDeviceOst(ost) = e.kind() {
                    if ost.info.status == 0x82 {
                        return tokio::time::Instant::now();
                    }
                }
            }
            panic!("no refusal event");
        });
        match g.vm.remove_memory("dimm0").await {
            Err(Error::UnplugRejected { id, reason }) => {
                assert_eq!(id, "dimm0");
                assert!(reason.contains("0x82"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let answered = tokio::time::Instant::now();
        let said = refusal.await.unwrap();
        assert!(
            answered.duration_since(said) < Duration::from_secs(1),
            "reported {:?} after QEMU said so",
            answered.duration_since(said)
        );
        // The DIMM and its backend stay, in QEMU and in the SDK's view.
        let devices = g.vm.client().execute(&QueryMemoryDevices).await.unwrap();
        assert_eq!(
            devices
                .iter()
                .filter_map(MemoryDeviceInfo::id)
                .collect::<Vec<_>>(),
            ["dimm0"]
        );
        assert_eq!(g.vm.spec().memory_devices.len(), 1);
        assert_eq!(mem_total(&g).await, base + 128 * 1024);
    });
}

#[test]
fn the_guest_gives_memory_to_the_balloon() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        g.vm.add_balloon(BalloonConfig::new("balloon0"))
            .await
            .unwrap();
        let full = g.vm.balloon_actual().await.unwrap();
        assert_eq!(full, 256 * MIB);
        let mut events = g.vm.client().events();
        g.vm.set_balloon(192 * MIB).await.unwrap();
        // BALLOON_CHANGE says when the guest's memory moves; QEMU's word decides.
        let deadline = tokio::time::Instant::now() + SEEN;
        while g.vm.balloon_actual().await.unwrap() > 192 * MIB {
            let change = |e: &EventKind| matches!(e, EventKind::BalloonChange(_));
            assert!(
                events.wait_for(deadline, change).await,
                "the guest kept its memory"
            );
        }
        assert_eq!(g.vm.balloon_actual().await.unwrap(), 192 * MIB);
    });
}
