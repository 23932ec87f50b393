//! QEMU killed at each step of a hot-add (every pending call returns `Disconnected` within a second,
//! no task and no fd of ours leaks), and QEMU stopped (calls time out with a typed error; the client
//! recovers after SIGCONT).

use std::time::Duration;

use qhotplug::{DiskConfig, NicConfig};
use qhotplug_netdev::TapBuilder;
use qhotplug_qmp::command::QueryStatus;
use qhotplug_tests::timing::AtStep;
use qhotplug_tests::{open_fds, pc_spec, TestVm};
use tracing_subscriber::layer::SubscriberExt;

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Launches a VM, kills QEMU when step `n` of `add` starts, and checks what is left. Returns the
/// step's name, or `None` when `add` finished before step `n` (so it has fewer steps).
async fn kill_at<F, Fut>(n: usize, add: F) -> Option<String>
where
    F: FnOnce(qhotplug::Vm, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = qhotplug::Result<()>>,
{
    let fds_before = open_fds();
    let tasks_before = alive_tasks();
    let t = TestVm::launch(pc_spec()).await;
    let pid = t.vm.pid().unwrap();
    let hook = AtStep::new(n, move || {
        qhotplug_tests::kill(pid, libc::SIGKILL).expect("SIGKILL QEMU");
    });
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(hook.clone()));
    let image = t.image("k.raw", 1);
    // A second caller waits on the same connection when QEMU dies.
    let bystander = {
        let vm = t.vm.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = vm.client().execute(&QueryStatus).await {
                    return e;
                }
            }
        })
    };
    let started = tokio::time::Instant::now();
    let result = add(t.vm.clone(), image).await;
    let Some(step) = hook.fired_at() else {
        result.expect("no kill: the hot-add succeeds");
        bystander.abort();
        return None;
    };
    let err = result.expect_err("QEMU was killed");
    assert!(err.is_disconnected(), "at {step}: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(1) + Duration::from_millis(500),
        "at {step}: took {:?}",
        started.elapsed()
    );
    let other = tokio::time::timeout(Duration::from_secs(1), bystander)
        .await
        .expect("the other caller got its answer within a second")
        .unwrap();
    assert!(other.is_disconnected(), "{other}");
    drop(t);
    // Everything of ours is gone with the VM: fds (sockets, the image, taps) and tasks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while alive_tasks() > tasks_before && tokio::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        alive_tasks(),
        tasks_before,
        "tasks left after a kill at {step}"
    );
    assert_eq!(open_fds(), fds_before, "fds left after a kill at {step}");
    Some(step)
}

#[test]
fn qemu_killed_at_each_step_of_a_disk_hot_add() {
    qhotplug_tests::serial_test(async {
        let mut steps = Vec::new();
        // Every step, found from the sequence: step n, until the hot-add finishes before it.
        for n in 0.. {
            let killed = kill_at(n, |vm, image| async move {
                vm.add_disk(DiskConfig::virtio_blk("k1", image))
                    .await
                    .map(drop)
            })
            .await;
            match killed {
                Some(step) => steps.push(step),
                None => break,
            }
        }
        assert_eq!(steps, qhotplug_tests::DISK_HOT_ADD_STEPS);
    });
}

#[test]
fn qemu_killed_at_each_step_of_a_nic_hot_add() {
    qhotplug_tests::serial_test(async {
        let mut steps = Vec::new();
        for n in 0.. {
            let killed = kill_at(n, |vm, _| async move {
                let tap = TapBuilder::new("qhk%d").queues(2).create().unwrap();
                vm.add_nic(NicConfig::new("kn", tap)).await.map(drop)
            })
            .await;
            match killed {
                Some(step) => steps.push(step),
                None => break,
            }
        }
        assert_eq!(steps, qhotplug_tests::nic_hot_add_steps(2));
    });
}

#[test]
fn a_stopped_qemu_times_out_calls_and_the_client_recovers_after_sigcont() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let launcher = qhotplug_cmdline::Launcher::new(pc_spec(), dir.path().join("run"))
            .qmp_config(
                qhotplug_qmp::Config::new().default_timeout(Some(Duration::from_millis(300))),
            );
        let t = TestVm::launch_with(launcher, dir).await;
        let image = t.image("s.raw", 1);
        t.signal(libc::SIGSTOP);
        match t.vm.client().execute(&QueryStatus).await {
            Err(qhotplug_qmp::Error::Timeout { command, .. }) => {
                assert_eq!(command, "query-status")
            }
            other => panic!("{other:?}"),
        }
        let err =
            t.vm.add_disk(DiskConfig::scsi_hd("s1", &image))
                .await
                .unwrap_err();
        assert!(
            matches!(
                &err,
                qhotplug::Error::Qmp(qhotplug_qmp::Error::Timeout { .. })
                    | qhotplug::Error::Step { .. }
            ),
            "{err}"
        );
        t.signal(libc::SIGCONT);
        // The late replies to the timed-out calls are read and dropped; new calls line up again.
        let status = t.vm.client().execute(&QueryStatus).await.unwrap();
        assert!(!status.running);
        t.vm.reconcile().await.unwrap();
        let disk =
            t.vm.add_disk(DiskConfig::scsi_hd("s1", &image))
                .await
                .unwrap();
        assert_eq!(disk.id, "s1");
    });
}
