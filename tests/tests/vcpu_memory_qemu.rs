//! vCPUs, memory devices and the balloon on real QEMU (no guest OS): hot-adds into free slots,
//! typed refusals before anything is sent (a count outside the topology, no free memory slot, over
//! `maxmem`), a failure forced at each step of each sequence (through [`FaultProxy`]) leaving
//! `query-hotpluggable-cpus`, `query-memory-devices`, `qom-list /objects`, `query-pci` and our fd
//! table as they were, and a relaunch from `vm.spec()` with everything in place.

use std::time::Duration;

use qhotplug::{
    BalloonConfig, CpuTopology, Error, MemoryConfig, MemoryDeviceKind, UnplugPolicy, Vm, VmSpec,
    MIB,
};
use qhotplug_qmp::command::{MemoryDeviceInfo, QueryMemoryDevices};
use qhotplug_tests::{assert_rolls_back, pc_spec, second_monitor, FaultProxy, TestVm};

/// A `pc` VM with room to grow: 1 of up to 4 vCPUs, 128 MiB of up to 1 GiB, 2 memory slots.
fn growable() -> VmSpec {
    let mut spec = pc_spec();
    spec.cpu_topology = Some(CpuTopology::max(4));
    spec.memory_slots = 2;
    spec.max_memory_mib = Some(1024);
    spec
}

async fn plugged_cpus(vm: &Vm) -> usize {
    vm.vcpu_slots()
        .await
        .unwrap()
        .iter()
        .filter(|s| s.qom_path.is_some())
        .count()
}

#[test]
fn vcpus_go_into_free_slots_and_a_relaunch_keeps_them() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running(growable()).await;
        let before = t.snapshot().await;
        for bad in [0, 5] {
            match t.vm.set_vcpus(bad).await {
                Err(Error::InvalidVcpuCount { min, max, .. }) => assert_eq!((min, max), (1, 4)),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert_eq!(t.snapshot().await, before);

        // No guest OS acknowledges them: waited for briefly, and reported unconfirmed.
        let brief =
            t.vm.with_unplug_policy(UnplugPolicy::new(Duration::from_millis(300)));
        let change = brief.set_vcpus(3).await.unwrap();
        assert_eq!(change.added, ["vcpu1", "vcpu2"]);
        assert_eq!(change.unconfirmed, change.added);
        assert_eq!(plugged_cpus(&t.vm).await, 3);
        // Already there: nothing to do.
        assert_eq!(t.vm.set_vcpus(3).await.unwrap(), Default::default());

        let spec = t.vm.spec();
        assert_eq!(spec.vcpus.len(), 2);
        drop(t);
        let again = TestVm::running(spec).await;
        assert_eq!(plugged_cpus(&again.vm).await, 3);
        assert!(again.vm.has_device("vcpu2").await.unwrap());
        // The ids are the same, so the next one goes on from there.
        let brief = again
            .vm
            .with_unplug_policy(UnplugPolicy::new(Duration::from_millis(300)));
        assert_eq!(brief.set_vcpus(4).await.unwrap().added, ["vcpu3"]);
    });
}

#[test]
fn memory_devices_fit_slots_and_maxmem_or_are_refused_before_qemu_is_asked() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running(growable()).await;
        let dimm =
            t.vm.add_memory(MemoryConfig::dimm("dimm0", 128 * MIB))
                .await
                .unwrap();
        assert_eq!(dimm.kind, MemoryDeviceKind::Dimm);
        let vmem =
            t.vm.add_memory(MemoryConfig::virtio_mem("vmem0", 512 * MIB, 0))
                .await
                .unwrap();
        assert!(matches!(vmem.kind, MemoryDeviceKind::VirtioMem { .. }));
        t.vm.add_memory(MemoryConfig::dimm("dimm1", 64 * MIB))
            .await
            .unwrap();
        let devices = t.vm.client().execute(&QueryMemoryDevices).await.unwrap();
        let ids: Vec<_> = devices.iter().filter_map(MemoryDeviceInfo::id).collect();
        assert_eq!(ids, ["dimm0", "vmem0", "dimm1"]);

        let before = t.snapshot().await;
        // Both slots are taken.
        assert!(matches!(
            t.vm.add_memory(MemoryConfig::dimm("dimm2", 64 * MIB)).await,
            Err(Error::NoFreeSlot { .. })
        ));
        // 1024 - 128 boot - 128 - 512 - 64 = 192 MiB left.
        match t
            .vm
            .add_memory(MemoryConfig::virtio_mem("vmem1", 256 * MIB, 0))
            .await
        {
            Err(Error::OverMaxMemory { free, .. }) => assert_eq!(free, 192 * MIB),
            other => panic!("{other:?}"),
        }
        // Not a multiple of 2 MiB.
        assert!(matches!(
            t.vm.add_memory(MemoryConfig::virtio_mem("vmem1", 3 * MIB, 0))
                .await,
            Err(Error::Spec(_))
        ));
        assert!(matches!(
            t.vm.resize_virtio_mem("vmem0", 513 * MIB).await,
            Err(Error::InvalidSize { .. })
        ));
        assert!(matches!(
            t.vm.resize_virtio_mem("dimm0", 2 * MIB).await,
            Err(Error::NotFound { .. })
        ));
        assert_eq!(t.snapshot().await, before);

        t.vm.add_balloon(BalloonConfig::new("balloon0"))
            .await
            .unwrap();
        assert_eq!(t.vm.balloon_actual().await.unwrap(), 128 * MIB + 192 * MIB);

        // A relaunch has the same memory devices and balloon.
        let spec = t.vm.spec();
        drop(t);
        let again = TestVm::running(spec).await;
        let devices = again
            .vm
            .client()
            .execute(&QueryMemoryDevices)
            .await
            .unwrap();
        let ids: Vec<_> = devices.iter().filter_map(MemoryDeviceInfo::id).collect();
        assert_eq!(ids, ["dimm0", "vmem0", "dimm1"]);
        assert!(again.vm.has_device("balloon0").await.unwrap());
    });
}

/// A failure at `command` #`nth` of `change` rolls back cleanly.
async fn fails_cleanly<F, Fut, T>(
    t: &TestVm,
    dir: &std::path::Path,
    command: &str,
    nth: usize,
    change: F,
) where
    F: FnOnce(Vm) -> Fut,
    Fut: std::future::Future<Output = qhotplug::Result<T>>,
    T: std::fmt::Debug,
{
    assert_rolls_back(t, &dir.join("mon2.sock"), command, nth, change).await;
}

#[test]
fn a_failure_at_each_step_leaves_cpus_memory_and_objects_as_they_were() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = growable();
        second_monitor(&mut spec, &dir.path().join("mon2.sock"));
        let t = TestVm::running(spec).await;
        let d = dir.path();
        fails_cleanly(
            &t,
            d,
            "device_add",
            1,
            |vm| async move { vm.set_vcpus(2).await },
        )
        .await;
        for (step, nth) in [("object-add", 1), ("device_add", 1)] {
            fails_cleanly(&t, d, step, nth, |vm| async move {
                vm.add_memory(MemoryConfig::dimm("dimm0", 64 * MIB)).await
            })
            .await;
            fails_cleanly(&t, d, step, nth, |vm| async move {
                vm.add_memory(MemoryConfig::virtio_mem("vmem0", 64 * MIB, 0).memfd())
                    .await
            })
            .await;
        }
        fails_cleanly(&t, d, "device_add", 1, |vm| async move {
            vm.add_balloon(BalloonConfig::new("balloon0")).await
        })
        .await;
        // Unfaulted, each goes through.
        let brief =
            t.vm.with_unplug_policy(UnplugPolicy::new(Duration::from_millis(300)));
        brief.set_vcpus(2).await.unwrap();
        t.vm.add_memory(MemoryConfig::dimm("dimm0", 64 * MIB))
            .await
            .unwrap();
    });
}

#[test]
fn reconcile_deletes_a_memory_backend_a_failed_rollback_left() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = growable();
        second_monitor(&mut spec, &dir.path().join("mon2.sock"));
        let t = TestVm::running(spec).await;
        let before = t.snapshot().await;
        // The undo's `object-del` fails: the backend is left behind.
        let proxy = FaultProxy::start(
            &dir.path().join("p.sock"),
            &dir.path().join("mon2.sock"),
            "object-del",
            1,
        );
        let vm = Vm::attach(
            qhotplug_qmp::connect(proxy.path()).await.unwrap(),
            t.vm.spec(),
        )
        .await
        .unwrap();
        // Slot 9 taken behind the SDK's back: the device_add fails in QEMU.
        let squatter = serde_json::json!({"driver": "virtio-net-pci", "id": "squatter",
                                          "bus": "pci.0", "addr": "0x9"});
        t.vm.client()
            .execute_raw("device_add", &squatter)
            .await
            .unwrap();
        let config =
            MemoryConfig::virtio_mem("vmem9", 64 * MIB, 0).at_pci(qhotplug::Pci::new("pci.0", 9));
        match vm.add_memory(config).await {
            Err(Error::Step {
                step: "device_add",
                undo_failures,
                ..
            }) => assert_eq!(undo_failures.len(), 1, "{undo_failures:?}"),
            other => panic!("{other:?}"),
        }
        let report = vm.reconcile().await.unwrap();
        assert_eq!(report.objects_deleted, ["vmem9-mem"]);
        // (The squatter has no guest to let it go: only the objects are compared.)
        assert_eq!(t.snapshot().await.objects, before.objects);
    });
}
