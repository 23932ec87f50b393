//! A dump of a booted guest's memory (`Vm::dump_memory`), under TCG: an ELF core that `readelf`
//! reads (a core file, its memory in `LOAD` segments, a `PRSTATUS` note per vCPU) holding what
//! the guest's shell had in memory, a kdump-compressed one, and a dump into a full file system,
//! which fails typed while the guest runs on and QEMU keeps nothing of it.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qhotplug::{DumpFormat, DumpProgress, RunState};
use qhotplug_tests::storage::SmallFs;
use qhotplug_tests::{pc_spec, Guest, Snapshot};

const SEEN: Duration = Duration::from_secs(60);

/// What the guest holds in memory, a file's first bytes in its page cache (so on one page):
/// made there from parts, so the command typed does not hold it.
const MARK: &[u8] = b"QHOTPLUG-DUMP-MARK-42-1234";

/// `readelf` of `file` with `flag`.
fn readelf(flag: &str, file: &Path) -> String {
    let out = std::process::Command::new("readelf")
        .args(["-W", flag])
        .arg(file)
        .output()
        .expect("readelf (scripts/install-deps installs binutils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_running_guests_memory_is_dumped_readable_and_a_dump_that_fails_leaves_nothing() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let dir = tempfile::tempdir().unwrap();
        let set = "printf 'QHOTPLUG-DUMP-MARK-%d-%d' 42 1234 >/tmp/mark; echo set";
        assert_eq!(g.console.run(set, SEEN).await, ["set"]);
        let memory = g.vm.spec().memory_mib << 20;
        let before = Snapshot::take(&g.vm).await;

        // ELF, with its progress.
        let elf = dir.path().join("guest.elf");
        let seen: Arc<Mutex<Vec<DumpProgress>>> = Arc::default();
        let record = seen.clone();
        let done =
            g.vm.dump_memory(
                std::fs::File::create(&elf).unwrap(),
                DumpFormat::Elf,
                move |p| record.lock().unwrap().push(p),
            )
            .await
            .unwrap();
        assert!(
            done.written == done.total && done.total >= memory,
            "{done:?}"
        );
        assert_eq!(seen.lock().unwrap().last(), Some(&done));
        assert!(readelf("-h", &elf).contains("CORE (Core file)"));
        let segments = readelf("-l", &elf);
        assert!(
            segments.lines().any(|l| l.trim_start().starts_with("LOAD")),
            "{segments}"
        );
        let notes = readelf("-n", &elf);
        let prstatus = notes.matches("NT_PRSTATUS").count();
        assert_eq!(prstatus, 1, "one vCPU's registers: {notes}");
        let bytes = std::fs::read(&elf).unwrap();
        assert!(
            bytes.windows(MARK.len()).any(|w| w == MARK),
            "the guest's file is in it"
        );
        drop(bytes);

        // kdump, zlib: makedumpfile's flattened format.
        let kdump = dir.path().join("guest.kdump");
        let file = std::fs::File::create(&kdump).unwrap();
        g.vm.dump_memory(file, DumpFormat::KdumpZlib, |_| {})
            .await
            .unwrap();
        let head = std::fs::read(&kdump).unwrap();
        assert!(head.starts_with(b"makedumpfile"), "{:?}", &head[..16]);

        // Into a file system too small for it: QEMU's reason, typed; the guest runs on; QEMU
        // holds nothing of the dump (its fd closed), nor do we.
        let small = SmallFs::mount(dir.path(), "small", 1);
        let file = std::fs::File::create(small.0.join("guest.elf")).unwrap();
        let failed =
            g.vm.dump_memory(file, DumpFormat::Elf, |_| {})
                .await
                .unwrap_err();
        assert!(
            matches!(failed, qhotplug::Error::DumpFailed(_)),
            "{failed:?}"
        );
        assert_eq!(g.vm.run_state().await.unwrap(), RunState::Running);
        let size = MARK.len().to_string();
        assert_eq!(g.console.run("wc -c </tmp/mark", SEEN).await, [size]);
        assert_eq!(Snapshot::take(&g.vm).await, before);
        println!(
            "dumped {} bytes of guest memory; the full one: {failed}",
            done.total
        );
    });
}
