//! An orchestrator killed while its VM runs: a child process launches QEMU, hot-adds a disk and
//! keeps its spec (`VmSpec::to_json`), then is SIGKILLed. A new process adopts the QEMU by pid
//! (`QemuProcess::adopt`, the master key the launch kept), attaches with the kept spec, reconciles,
//! hot-removes the disk and quits: QEMU exits, and its master key file goes with it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qhotplug::{DiskConfig, Launcher, QemuProcess, Vm, VmSpec};
use qhotplug_tests::{image, pc_spec};

/// Where the child keeps what the next process needs: QEMU's pid, then the spec.
const KEPT: &str = "kept";

/// The child's part (run by the parent, never alone): launch, hot-add, keep, wait to be killed.
#[test]
#[ignore = "the child of an_adopted_qemu_is_driven_and_quit_after_its_launcher_was_killed"]
fn launcher_that_gets_killed() {
    let Some(dir) = std::env::var_os("QHOTPLUG_ADOPT_DIR").map(PathBuf::from) else {
        return;
    };
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let vm = Vm::launch(Launcher::new(pc_spec(), dir.join("run")))
                .await
                .unwrap();
            let disk = image(&dir, "d1.raw", 1);
            vm.add_disk(DiskConfig::scsi_hd("d1", &disk)).await.unwrap();
            let kept = format!("{}\n{}", vm.pid().unwrap(), vm.spec().to_json().unwrap());
            std::fs::write(dir.join("kept.partial"), kept).unwrap();
            std::fs::rename(dir.join("kept.partial"), dir.join(KEPT)).unwrap();
            std::future::pending::<()>().await;
        });
}

/// Whether process `pid` runs (not gone, and not a zombie its new parent has yet to reap).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(") ")
                .next()
                .is_some_and(|rest| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Waits, with a deadline, until `path` exists.
fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "never written: {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_adopted_qemu_is_driven_and_quit_after_its_launcher_was_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "launcher_that_gets_killed",
            "--ignored",
            "--nocapture",
        ])
        .env("QHOTPLUG_ADOPT_DIR", dir.path())
        .spawn()
        .unwrap();
    wait_for(&dir.path().join(KEPT));
    // The orchestrator dies without a word: nothing of its own runs (no drop, no reap).
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = std::fs::read_to_string(dir.path().join(KEPT)).unwrap();
    let (pid, spec) = kept.split_once('\n').unwrap();
    let pid: u32 = pid.parse().unwrap();
    assert!(running(pid), "QEMU died with its launcher");

    qhotplug_tests::serial_test(async move {
        let run = dir.path().join("run");
        let process = QemuProcess::adopt(pid, &run).unwrap();
        assert_eq!(process.pid(), pid);
        assert!(
            process.master_key().is_some(),
            "the launch's master key is the adopter's"
        );
        let spec = VmSpec::from_json(spec).unwrap();
        let vm = Vm::adopt(process, spec).await.unwrap();
        let reconciled = vm.reconcile().await.unwrap();
        assert!(reconciled.gone.is_empty(), "{reconciled:?}");
        assert_eq!(vm.spec().disks.len(), 1);
        assert!(vm.has_device("d1").await.unwrap());
        vm.remove_disk("d1").await.unwrap();
        assert!(!vm.has_device("d1").await.unwrap());
        vm.quit().await.unwrap();
        assert!(!running(pid), "QEMU still runs");
        assert!(!run.join(qhotplug::MASTER_KEY_FILE).exists());
    });
}
