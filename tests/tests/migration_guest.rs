//! Live migration of a real guest under TCG, which counts in a tmpfs file all the time (its memory
//! changes throughout), with a disk and a NIC hot-plugged before: over a Unix socket, an fd pair
//! and TCP on loopback, with post-copy, cancelled half-way, timed out, and with the target killed
//! half-way. Each time the count goes on from where it was (on the target, or on the source when
//! the migration did not complete), and nothing is left behind: the target QEMU's pid, its taps
//! (`ip -o link`) and our fd table.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qhotplug::{
    DiskConfig, Error, MigrationFailure, MigrationOptions, NicConfig, Progress, Serial,
    SourceAfter, TapBuilder, Transport, Vm,
};
use qhotplug_qmp::command::QueryPci;
use qhotplug_tests::{image, pc_spec, Console, Guest};

const SEEN: Duration = Duration::from_secs(60);

/// The guest's count, read from its console.
async fn count(console: &Console) -> u64 {
    let deadline = tokio::time::Instant::now() + SEEN;
    loop {
        let out = console.run("cat /tmp/count", SEEN).await;
        if let Some(n) = out.first().and_then(|l| l.parse().ok()) {
            return n;
        }
        assert!(tokio::time::Instant::now() < deadline, "no count: {out:?}");
    }
}

/// Waits until the count read on `console` passes `than`.
async fn counts_past(console: &Console, than: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + SEEN;
    loop {
        let n = count(console).await;
        if n > than {
            return n;
        }
        assert!(tokio::time::Instant::now() < deadline, "stuck at {n}");
    }
}

/// A source guest counting, with a disk (holding a pattern the guest wrote) and a NIC
/// hot-plugged. Returns it and the tap names in use.
async fn source() -> (Guest, Vec<String>) {
    let g = Guest::boot(pc_spec(), |l| l).await;
    g.console
        .run(
            "(i=0; while :; do i=$((i+1)); echo $i > /tmp/count; done) >/dev/null 2>&1 & true",
            SEEN,
        )
        .await;
    let disk = image(g.dir(), "data.raw", 4);
    let mark = g.console.mark();
    g.vm.add_disk(DiskConfig::virtio_blk("data", &disk))
        .await
        .unwrap();
    let dev = g.console.added(mark, "block").await;
    let write = format!(
        "echo qhotplug-before-migration | dd of=/dev/{dev} bs=512 conv=sync,fsync 2>/dev/null; echo ok"
    );
    assert_eq!(g.console.run(&write, SEEN).await, ["ok"]);
    let tap = TapBuilder::new("qhms%d").up(true).create().unwrap();
    let taps = vec![tap.name().to_owned()];
    // The guest has the NIC before anything migrates: the checks on the target read eth0.
    let mark = g.console.mark();
    g.vm.add_nic(NicConfig::new("net0", tap)).await.unwrap();
    assert_eq!(g.console.added(mark, "net").await, "eth0");
    (g, taps)
}

/// The target: launched from the source's spec, with its own console socket and a new tap for
/// each NIC. Returns it, its console's path, and its tap names.
async fn target(g: &Guest, dir: &Path) -> (Vm, PathBuf, Vec<String>) {
    let console = dir.join("target-console.sock");
    let mut launcher = g.vm.migration_launcher(dir.join("target"));
    launcher.spec_mut().serials = vec![Serial::Socket(console.clone())];
    let mut taps = Vec::new();
    for nic in g.vm.nics() {
        let tap = TapBuilder::new("qhmt%d")
            .queues(usize::from(nic.queues))
            .up(true)
            .create()
            .unwrap();
        taps.push(tap.name().to_owned());
        launcher = launcher.nic_fds(&nic.id, tap.into_queues(), Vec::new());
    }
    let vm = Vm::launch(launcher).await.unwrap();
    (vm, console, taps)
}

fn links() -> String {
    let out = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip (iproute2)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Migrates with `options` and checks the guest went on where it was, with its disk and NIC.
async fn migrates(options: impl FnOnce(&Path) -> MigrationOptions, postcopy: bool) {
    let (g, _) = source().await;
    let dir = tempfile::tempdir().unwrap();
    let (t, console_path, _) = target(&g, dir.path()).await;
    let pci_before = g.vm.client().execute(&QueryPci).await.unwrap();
    let source_pid = g.vm.pid().unwrap();
    let before = count(&g.console).await;
    let mut seen: Vec<Progress> = Vec::new();
    let migrated =
        g.vm.migrate(t, options(dir.path()), |p| seen.push(p.clone()))
            .await
            .unwrap();
    assert!(!seen.is_empty(), "no progress reported");
    assert_eq!(
        seen.iter().any(|p| p.status == "postcopy-active"),
        postcopy,
        "{seen:?}"
    );
    assert!(migrated.total_time > Duration::ZERO);
    // The source quit.
    assert!(qhotplug_tests::exited(source_pid, Duration::from_secs(10))
        .await
        .unwrap());

    let target = migrated.target;
    let console = Console::connect(&console_path).await;
    // The count goes on from where it was, not from zero.
    let after = counts_past(&console, before).await;
    counts_past(&console, after).await;
    // The disk holds what was written before, the NIC is where it was with its MAC.
    let read = "dd if=/dev/vda bs=26 count=1 2>/dev/null";
    assert_eq!(console.run(read, SEEN).await, ["qhotplug-before-migration"]);
    assert_eq!(
        target.client().execute(&QueryPci).await.unwrap(),
        pci_before
    );
    let mac = target.nics()[0].mac.to_string();
    assert_eq!(
        console.run("cat /sys/class/net/eth0/address", SEEN).await,
        [mac]
    );
    println!(
        "downtime {:?}, total {:?}, call {:?}",
        migrated.downtime, migrated.total_time, migrated.elapsed
    );
}

#[test]
fn over_a_unix_socket_the_guest_goes_on_with_its_disk_and_nic() {
    qhotplug_tests::serial_test(migrates(
        |dir| {
            MigrationOptions::new(Transport::Unix(dir.join("migrate.sock")))
                .downtime_limit(Duration::from_millis(300))
        },
        false,
    ));
}

#[test]
fn over_an_fd_pair() {
    qhotplug_tests::serial_test(migrates(|_| MigrationOptions::new(Transport::Fd), false));
}

#[test]
fn over_tcp_on_loopback_with_multifd() {
    qhotplug_tests::serial_test(migrates(
        |_| {
            MigrationOptions::new(Transport::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            })
            .multifd(2)
        },
        false,
    ));
}

#[test]
fn with_post_copy() {
    // Slow (8 MiB/s) so that post-copy, asked for as the first pass begins, takes over long
    // before pre-copy could finish.
    qhotplug_tests::serial_test(migrates(
        |dir| {
            MigrationOptions::new(Transport::Unix(dir.join("migrate.sock")))
                .bandwidth(8 << 20)
                .postcopy_after(1)
        },
        true,
    ));
}

/// Starts a slow migration, and runs `interrupt` once it is under way; returns the outcome. The
/// source must then go on counting, and the target and its taps be gone.
async fn interrupted<F, Fut>(drop_it: bool, interrupt: F) -> qhotplug::Result<()>
where
    F: FnOnce(Vm, u32) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (g, source_taps) = source().await;
    let dir = tempfile::tempdir().unwrap();
    let fds_before = qhotplug_tests::open_fds();
    let (t, _, target_taps) = target(&g, dir.path()).await;
    let target_pid = t.pid().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // 1 MiB/s: the guest's few MiB of used memory take seconds.
    let options = MigrationOptions::new(Transport::Unix(dir.path().join("m.sock")))
        .bandwidth(1 << 20)
        .deadline(Duration::from_secs(30))
        .source_after(SourceAfter::Paused);
    let source_vm = g.vm.clone();
    let migration = tokio::spawn(async move {
        source_vm
            .migrate(t, options, |p| {
                let _ = tx.send(p.clone());
            })
            .await
            .map(drop)
    });
    // Under way: a report of memory being sent.
    loop {
        let p = tokio::time::timeout(SEEN, rx.recv())
            .await
            .expect("progress")
            .expect("a progress report");
        if p.total > 0 {
            break;
        }
    }
    let before = count(&g.console).await;
    interrupt(g.vm.clone(), target_pid).await;
    if drop_it {
        migration.abort();
    }
    let outcome = match tokio::time::timeout(SEEN, migration).await {
        Ok(joined) => joined.unwrap_or_else(|e| {
            // Aborted: the future was dropped.
            assert!(e.is_cancelled(), "{e}");
            Err(Error::Migration(MigrationFailure::Cancelled))
        }),
        Err(_) => panic!("the migration did not end"),
    };
    // The source goes on counting; the target and everything it held are gone.
    counts_past(&g.console, before).await;
    assert!(qhotplug_tests::exited(target_pid, Duration::from_secs(10))
        .await
        .unwrap());
    // The kernel takes a tap down once its last fd closes, after QEMU's exit has been reported;
    // nothing to wait on but the link list.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut now = links();
    while target_taps.iter().any(|tap| now.contains(tap.as_str())) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "target taps {target_taps:?} left: {now}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        now = links();
    }
    assert!(now.contains(source_taps[0].as_str()));
    // The dropped target's process is reaped by a task that holds its pidfd until it has run:
    // our fd table comes back once it has (a deadline, not a guess).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while qhotplug_tests::open_fds() != fds_before && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(qhotplug_tests::open_fds(), fds_before);
    outcome
}

#[test]
fn cancelled_half_way_the_source_goes_on() {
    qhotplug_tests::serial_test(async {
        let outcome = interrupted(false, |vm: Vm, _| async move {
            vm.cancel_migration().await.unwrap()
        })
        .await;
        assert!(
            matches!(outcome, Err(Error::Migration(MigrationFailure::Cancelled))),
            "{outcome:?}"
        );
    });
}

#[test]
fn a_target_killed_half_way_fails_it_in_qemus_words_and_the_source_goes_on() {
    qhotplug_tests::serial_test(async {
        let outcome = interrupted(false, |_, pid| async move {
            qhotplug_tests::kill(pid, libc::SIGKILL).unwrap();
        })
        .await;
        match outcome {
            Err(Error::Migration(MigrationFailure::Failed(reason))) => {
                assert!(!reason.is_empty())
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn dropping_the_future_cancels_it_and_the_source_goes_on() {
    qhotplug_tests::serial_test(async {
        let outcome = interrupted(true, |_, _| async {}).await;
        assert!(
            matches!(outcome, Err(Error::Migration(MigrationFailure::Cancelled))),
            "{outcome:?}"
        );
    });
}

#[test]
fn a_deadline_cancels_it() {
    qhotplug_tests::serial_test(async {
        let (g, _) = source().await;
        let dir = tempfile::tempdir().unwrap();
        let (t, _, _) = target(&g, dir.path()).await;
        let options = MigrationOptions::new(Transport::Unix(dir.path().join("m.sock")))
            .bandwidth(1 << 20)
            .deadline(Duration::from_millis(500))
            .source_after(SourceAfter::Paused);
        let before = count(&g.console).await;
        match g.vm.migrate(t, options, |_| {}).await {
            Err(Error::Migration(MigrationFailure::TimedOut(d))) => {
                assert_eq!(d, Duration::from_millis(500))
            }
            other => panic!("{other:?}"),
        }
        counts_past(&g.console, before).await;
    });
}
