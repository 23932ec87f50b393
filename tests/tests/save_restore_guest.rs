//! A VM with a booted guest saved to a file and restored from it (`Vm::save`, `Vm::restore`),
//! under TCG: the guest goes on where it was (a counter it keeps, a file a process holds open, a
//! hot-plugged disk and what was written on it), and a save into a full file system fails typed,
//! the VM running as it was and no file left.

use std::time::Duration;

use qhotplug::{DiskConfig, RunState, Serial, Vm};
use qhotplug_tests::storage::SmallFs;
use qhotplug_tests::{image, pc_spec, Console, Guest};

const SEEN: Duration = Duration::from_secs(60);

/// The guest's counter, from the file it rewrites every 0.1 s.
async fn count(console: &Console) -> u64 {
    let out = console.run("cat /tmp/count", SEEN).await;
    out[0].parse().unwrap_or_else(|_| panic!("{out:?}"))
}

#[test]
fn a_saved_guest_is_restored_where_it_was_and_a_save_that_fails_leaves_it_running() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A disk hot-plugged and written; a counter; a file a process holds open (`tail -f`).
        let mark = g.console.mark();
        g.vm.add_disk(DiskConfig::virtio_blk("d1", image(d, "d1.raw", 4)))
            .await
            .unwrap();
        let dev = g.console.added(mark, "block").await;
        let setup = format!(
            "printf saved-data | dd of=/dev/{dev} conv=fsync 2>/dev/null; \
             (i=0; while :; do i=$((i+1)); echo $i >/tmp/count; sleep 0.1; done) >/dev/null 2>&1 & \
             echo before >/tmp/open.txt; tail -f /tmp/open.txt >/dev/null 2>&1 & echo ready"
        );
        assert_eq!(g.console.run(&setup, SEEN).await, ["ready"]);

        // Into a file system too small for the guest's memory: QEMU's reason, typed; the VM
        // runs as it was; no file.
        let small = SmallFs::mount(d, "small", 1);
        let failed = g.vm.save(small.0.join("vm.sav"), |_| {}).await.unwrap_err();
        assert!(
            matches!(failed, qhotplug::Error::Migration(_)),
            "{failed:?}"
        );
        assert_eq!(g.vm.run_state().await.unwrap(), RunState::Running);
        assert!(!small.0.join("vm.sav").exists());
        let running = count(&g.console).await;

        // Saved, with its progress: QEMU gone.
        let mut launcher = g.vm.migration_launcher(d.join("restored"));
        let console = d.join("restored-console.sock");
        launcher.spec_mut().serials = vec![Serial::Socket(console.clone())];
        let saved = d.join("vm.sav");
        let mut passes = 0;
        g.vm.save(&saved, |p| passes = passes.max(p.passes))
            .await
            .unwrap();
        assert!(passes >= 1, "progress was told");
        assert!(std::fs::metadata(&saved).unwrap().len() > 16 << 20);
        assert!(
            g.vm.run_state().await.is_err(),
            "the saved VM's QEMU is gone"
        );

        // Restored: the counter goes on from where it was, the shell's open file and the disk
        // are there.
        let vm = Vm::restore(launcher, &saved).await.unwrap();
        assert_eq!(vm.run_state().await.unwrap(), RunState::Running);
        assert!(vm.spec().disks.iter().any(|x| x.id == "d1"));
        let console = Console::connect(&console).await;
        let at_restore = count(&console).await;
        assert!(at_restore >= running, "{at_restore} < {running}");
        let later = console
            .until(
                "cat /tmp/count",
                |o| o.first().and_then(|c| c.parse::<u64>().ok()) > Some(at_restore),
                SEEN,
            )
            .await;
        assert!(!later.is_empty());
        let open = "ls -l /proc/*/fd/ 2>/dev/null | grep -c /tmp/open.txt";
        assert_eq!(console.run(open, SEEN).await, ["1"], "still held open");
        let data = format!("head -c 10 /dev/{dev}; echo");
        assert_eq!(console.run(&data, SEEN).await, ["saved-data"]);
        vm.quit().await.unwrap();
    });
}
