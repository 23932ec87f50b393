//! Cancellation on a real guest: a hot-add or hot-remove future dropped after each of its awaits
//! leaves no fd of ours behind, and `vm.reconcile()` brings the SDK's view back in line with
//! QEMU's (devices, block nodes, netdevs, fd sets), proven for every drop point.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use qhotplug::{DiskConfig, NicConfig, Vm};
use qhotplug_netdev::TapBuilder;
use qhotplug_tests::timing::AtStep;
use qhotplug_tests::{image, open_fds, pc_spec, Guest, Snapshot};
use tokio::sync::Notify;
use tracing_subscriber::layer::SubscriberExt;

const DISK_ADD_STEPS: usize = 5;
const NIC_ADD_STEPS: usize = 4;
const DISK_REMOVE_STEPS: usize = 4; // device_del, wait, blockdev-del ×2
const NIC_REMOVE_STEPS: usize = 3; // device_del, wait, netdev_del

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

/// QEMU's view and ours, minus what only a running guest changes on its own.
async fn view(vm: &Vm) -> (Snapshot, usize, usize) {
    (Snapshot::take(vm).await, vm.disks().len(), vm.nics().len())
}

async fn deleted(events: &mut qhotplug_qmp::EventStream, id: &str) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(item) = events.next().await {
            if item.is_ok_and(|e| e.deleted_device() == Some(id)) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("DEVICE_DELETED for {id}"));
}

#[test]
fn every_drop_point_of_a_hot_add_is_undone_and_reconciled() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let vm = g.vm.clone();
        let path = image(g.dir(), "c.raw", 1);
        let before = view(&vm).await;

        for n in 0..DISK_ADD_STEPS {
            let id = format!("cd{n}");
            let step = drop_at(n, async {
                vm.add_disk(DiskConfig::virtio_blk(&id, &path))
                    .await
                    .map(drop)
            })
            .await
            .expect("dropped mid-way");
            vm.reconcile().await.unwrap();
            assert_eq!(view(&vm).await, before, "{id} dropped at {step}");
        }
        for n in 0..NIC_ADD_STEPS {
            let id = format!("cn{n}");
            let tap = TapBuilder::new("qhc%d").queues(2).create().unwrap();
            let step = drop_at(n, async {
                vm.add_nic(NicConfig::new(&id, tap)).await.map(drop)
            })
            .await
            .expect("dropped mid-way");
            vm.reconcile().await.unwrap();
            assert_eq!(view(&vm).await, before, "{id} dropped at {step}");
        }
        // The SDK's view is whole again: the same ids plug in.
        vm.add_disk(DiskConfig::virtio_blk("cd0", &path))
            .await
            .unwrap();
        vm.remove_disk("cd0").await.unwrap();
        assert_eq!(open_fds(), before.0.our_fds);
    });
}

#[test]
fn every_drop_point_of_a_hot_remove_is_reconciled() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let vm = g.vm.clone();
        let path = image(g.dir(), "r.raw", 1);
        let before = view(&vm).await;

        for n in 0..DISK_REMOVE_STEPS + NIC_REMOVE_STEPS {
            let disk = n < DISK_REMOVE_STEPS;
            let id = format!("r{n}");
            if disk {
                vm.add_disk(DiskConfig::virtio_blk(&id, &path))
                    .await
                    .unwrap();
            } else {
                let tap = TapBuilder::new("qhc%d").create().unwrap();
                vm.add_nic(NicConfig::new(&id, tap)).await.unwrap();
            }
            let mut events = vm.client().events();
            let at = if disk { n } else { n - DISK_REMOVE_STEPS };
            let step = if disk {
                drop_at(at, vm.remove_disk(&id)).await
            } else {
                drop_at(at, vm.remove_nic(&id)).await
            }
            .expect("dropped mid-way");
            // device_del was sent: the guest lets the device go whether or not we wait.
            deleted(&mut events, &id).await;
            let report = vm.reconcile().await.unwrap();
            assert!(
                report.gone.contains(&id),
                "{id} dropped at {step}: {report:?}"
            );
            assert_eq!(view(&vm).await, before, "{id} dropped at {step}");
        }
        assert_eq!(open_fds(), before.0.our_fds);
    });
}
