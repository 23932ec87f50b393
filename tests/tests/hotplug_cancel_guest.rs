//! Cancellation on a real guest: a hot-add or hot-remove whose future is dropped after each of its
//! awaits still runs to its end (the rule in ARCHITECTURE.md), so once `vm.settle()` returns the
//! SDK's view is QEMU's, `vm.reconcile()` finds nothing to fix, and no fd of ours is left behind:
//! proven for every drop point.

use std::sync::Arc;

use qhotplug::{DiskConfig, NicConfig, Vm};
use qhotplug_netdev::TapBuilder;
use qhotplug_tests::timing::AtStep;
use qhotplug_tests::{image, open_fds, pc_spec, Guest, Snapshot};
use tokio::sync::Notify;
use tracing_subscriber::layer::SubscriberExt;

/// Runs `op` and drops it as soon as step `n` has begun (its command is on the wire).
/// Returns the step's name, or `None` when the operation finished before step `n`.
async fn drop_at<Fut>(n: usize, op: Fut) -> Option<String>
where
    Fut: std::future::Future<Output = qhotplug::Result<()>>,
{
    let notify = Arc::new(Notify::new());
    let hook = {
        let notify = notify.clone();
        AtStep::new(n, move || notify.notify_one())
    };
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(hook.clone()));
    tokio::select! {
        result = op => {
            result.unwrap();
            None
        }
        () = notify.notified() => hook.fired_at(),
    }
}

/// Asserts that a hot-add of `id` dropped at `step` finished all the same: QEMU has the device,
/// the SDK lists it, and reconcile has nothing to fix.
async fn finished_add(vm: &Vm, id: &str, step: Option<&str>) {
    assert!(vm.has_device(id).await.unwrap(), "{id} dropped at {step:?}");
    let spec = vm.spec();
    let listed = spec.disks.iter().any(|d| d.id == id) || spec.nics.iter().any(|n| n.id == id);
    assert!(listed, "{id} dropped at {step:?}: not in the spec");
    let report = vm.reconcile().await.unwrap();
    assert!(report.is_empty(), "{id} dropped at {step:?}: {report:?}");
}

/// QEMU's view and ours, minus what only a running guest changes on its own.
async fn view(vm: &Vm) -> (Snapshot, usize, usize) {
    (Snapshot::take(vm).await, vm.disks().len(), vm.nics().len())
}

#[test]
fn every_drop_point_of_a_hot_add_still_finishes() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let vm = g.vm.clone();
        let path = image(g.dir(), "c.raw", 1);
        let before = view(&vm).await;

        // Every drop point, found from the sequence itself: step n, until the hot-add finishes
        // before reaching it.
        let mut steps = Vec::new();
        for n in 0.. {
            let id = format!("cd{n}");
            let dropped = drop_at(n, async {
                vm.add_disk(DiskConfig::virtio_blk(&id, &path))
                    .await
                    .map(drop)
            })
            .await;
            vm.settle().await;
            finished_add(&vm, &id, dropped.as_deref()).await;
            vm.remove_disk(&id).await.unwrap();
            assert_eq!(view(&vm).await, before, "{id} removed");
            let Some(step) = dropped else { break };
            steps.push(step);
        }
        assert_eq!(steps, qhotplug_tests::DISK_HOT_ADD_STEPS);
        let mut steps = Vec::new();
        for n in 0.. {
            let id = format!("cn{n}");
            let tap = TapBuilder::new("qhc%d").queues(2).create().unwrap();
            let dropped = drop_at(n, async {
                vm.add_nic(NicConfig::new(&id, tap)).await.map(drop)
            })
            .await;
            vm.settle().await;
            finished_add(&vm, &id, dropped.as_deref()).await;
            vm.remove_nic(&id).await.unwrap();
            assert_eq!(view(&vm).await, before, "{id} removed");
            let Some(step) = dropped else { break };
            steps.push(step);
        }
        assert_eq!(steps, qhotplug_tests::nic_hot_add_steps(2));
        assert_eq!(view(&vm).await, before);
        assert_eq!(open_fds(), before.0.our_fds);
    });
}

#[test]
fn every_drop_point_of_a_hot_remove_still_finishes() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let vm = g.vm.clone();
        let path = image(g.dir(), "r.raw", 1);
        let before = view(&vm).await;

        for disk in [true, false] {
            let mut steps = Vec::new();
            for n in 0.. {
                let id = format!("r{}{n}", if disk { "d" } else { "n" });
                if disk {
                    vm.add_disk(DiskConfig::virtio_blk(&id, &path))
                        .await
                        .unwrap();
                } else {
                    let tap = TapBuilder::new("qhc%d").create().unwrap();
                    vm.add_nic(NicConfig::new(&id, tap)).await.unwrap();
                }
                let dropped = if disk {
                    drop_at(n, vm.remove_disk(&id)).await
                } else {
                    drop_at(n, vm.remove_nic(&id)).await
                };
                // Whether or not its caller waited, the removal finished.
                vm.settle().await;
                assert_eq!(view(&vm).await, before, "{id} dropped at {dropped:?}");
                let report = vm.reconcile().await.unwrap();
                assert!(report.is_empty(), "{id} dropped at {dropped:?}: {report:?}");
                let Some(step) = dropped else { break };
                steps.push(step);
            }
            let expected: &[&str] = if disk {
                &[
                    "device_del",
                    "wait DEVICE_DELETED",
                    "blockdev-del",
                    "blockdev-del",
                    "remove-fd",
                ]
            } else {
                &["device_del", "wait DEVICE_DELETED", "netdev_del"]
            };
            assert_eq!(steps, expected);
        }
        assert_eq!(open_fds(), before.0.our_fds);
    });
}
