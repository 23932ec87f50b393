//! Live migration without shared storage, with a booted guest under TCG: the target QEMU has its
//! own new image for the disk, the source mirrors the disk into it over the target's NBD server
//! while the guest keeps writing, then memory moves. Afterwards the target's image holds every
//! write, the guest goes on on the target, and the source's file is untouched by what it writes
//! there. A target killed half-way leaves the source running on its own disk with nothing
//! attached, proven from QEMU's state and our fd table.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qhotplug::{DiskConfig, MigrationOptions, NbdServer, Serial, StorageCopy, Transport, Vm};
use qhotplug_qmp::command::QueryJobs;
use qhotplug_tests::storage::{data_image, md5, new_qcow2};
use qhotplug_tests::{pc_spec, Console, Guest, Snapshot};

const SEEN: Duration = Duration::from_secs(90);

/// Starts a guest loop writing random 4 KiB blocks over the first 16 MiB of `/dev/<dev>` until
/// `/tmp/stop` exists.
async fn start_writer(console: &Console, dev: &str) {
    let writer = format!(
        "rm -f /tmp/stop; (i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); \
         dd if=/dev/urandom of=/dev/{dev} bs=4k count=1 seek=$((i % 4096)) conv=notrunc; done) \
         >/dev/null 2>&1 & echo $! >/tmp/writer.pid; echo started"
    );
    assert_eq!(console.run(&writer, SEEN).await, ["started"]);
}

/// Stops the writer, flushes, and returns the guest's `md5sum` of the whole disk.
async fn stop_writer_and_sum(console: &Console, dev: &str) -> String {
    let stop = "touch /tmp/stop; while kill -0 $(cat /tmp/writer.pid) 2>/dev/null; do sleep 0.1; done; sync; echo stopped";
    assert_eq!(console.run(stop, SEEN).await, ["stopped"]);
    let out = console.run(&format!("md5sum /dev/{dev}"), SEEN).await;
    out[0].split_whitespace().next().unwrap().to_owned()
}

/// A guest with disk `d1` on a raw image of `mib` MiB of data; its name for the disk, the image.
async fn source(dir: &Path, mib: usize) -> (Guest, String, std::path::PathBuf) {
    let g = Guest::boot(pc_spec(), |l| l).await;
    let image = data_image(dir, "d1.raw", mib, 7);
    let mark = g.console.mark();
    g.vm.add_disk(DiskConfig::virtio_blk("d1", &image))
        .await
        .unwrap();
    let dev = g.console.added(mark, "block").await;
    (g, dev, image)
}

/// A target launched from `g`'s spec whose `d1` is a new, empty image of `mib` MiB at
/// `d1.target.raw`, with its console at `target-console.sock`.
async fn target(g: &Guest, dir: &Path, mib: usize) -> Vm {
    let target_image = dir.join("d1.target.raw");
    std::fs::File::create(&target_image)
        .unwrap()
        .set_len((mib as u64) << 20)
        .unwrap();
    // A runtime directory of its own each time (a test may need a second target).
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut launcher = g.vm.migration_launcher(dir.join(format!("target-{n}")));
    let console = dir.join("target-console.sock");
    let _ = std::fs::remove_file(&console);
    launcher.spec_mut().serials = vec![Serial::Socket(console)];
    let disk = launcher
        .spec_mut()
        .disks
        .iter_mut()
        .find(|d| d.id == "d1")
        .unwrap();
    disk.path = target_image;
    Vm::launch(launcher).await.unwrap()
}

#[test]
fn a_guest_that_keeps_writing_moves_with_its_disk_copied_and_the_source_file_is_left_alone() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (g, dev, source_image) = source(d, 16).await;
        let target = target(&g, d, 16).await;
        start_writer(&g.console, &dev).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let options = MigrationOptions::new(Transport::Unix(d.join("migrate.sock")))
            .copy_storage(StorageCopy::new(NbdServer::Unix(d.join("nbd.sock"))));
        let migrated =
            g.vm.migrate(target, options, move |p| {
                record
                    .lock()
                    .unwrap()
                    .push((p.status.clone(), p.disks_done, p.disks_total))
            })
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        let copying: Vec<_> = seen.iter().filter(|p| p.0 == "copying storage").collect();
        assert!(
            copying
                .last()
                .is_some_and(|p| p.2 >= 16 << 20 && p.1 == p.2),
            "{seen:?}"
        );
        // The source quit at the switch; its file is as it was then.
        let source_at_switch = md5(&source_image);
        drop(g);

        // The guest goes on on the target, writing into the target's own image.
        let console = Console::connect(&d.join("target-console.sock")).await;
        let guest_sum = stop_writer_and_sum(&console, &dev).await;
        start_writer(&console, &dev).await;
        let after = stop_writer_and_sum(&console, &dev).await;
        assert_ne!(after, guest_sum, "the guest wrote on");
        let target_image = d.join("d1.target.raw");
        assert_eq!(
            md5(&target_image),
            after,
            "every write is in the target's image"
        );
        assert_eq!(md5(&source_image), source_at_switch);
        // Nothing of the copy is left on the target.
        let nodes = qhotplug_tests::storage::block_nodes(&migrated.target).await;
        assert_eq!(nodes, ["d1-file", "d1-fmt"]);
        let status = migrated
            .target
            .client()
            .execute_raw("nbd-server-stop", &serde_json::json!({}))
            .await;
        assert!(status.is_err(), "the NBD server was stopped");
        migrated.target.quit().await.unwrap();
    });
}

#[test]
fn a_target_killed_during_the_copy_leaves_the_source_running_on_its_disk_with_nothing_attached() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (g, dev, source_image) = source(d, 256).await;
        let before = Snapshot::take(&g.vm).await;
        let target = target(&g, d, 256).await;
        let sum_before = md5(&source_image);
        let target_pid = target.pid().unwrap();
        let options = MigrationOptions::new(Transport::Unix(d.join("migrate.sock")))
            .copy_storage(StorageCopy::new(NbdServer::Unix(d.join("nbd.sock"))));
        let mut killed = false;
        let failed =
            g.vm.migrate(target, options, move |p| {
                if p.status == "copying storage" && !killed {
                    killed = true;
                    let _ = std::process::Command::new("kill")
                        .args(["-9", &target_pid.to_string()])
                        .status();
                }
            })
            .await;
        assert!(failed.is_err(), "{failed:?}");
        // The source runs on its own disk, as before: no node, job, fd set or fd of the copy.
        assert!(g.vm.client().execute(&QueryJobs).await.unwrap().is_empty());
        assert_eq!(Snapshot::take(&g.vm).await, before);
        assert_eq!(md5(&source_image), sum_before);
        let read = format!("dd if=/dev/{dev} bs=4k count=1 2>/dev/null | wc -c");
        assert_eq!(g.console.run(&read, SEEN).await, ["4096"]);
    });
}

#[test]
fn the_copy_runs_over_tcp_too() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (g, dev, _source_image) = source(d, 16).await;
        let target = target(&g, d, 16).await;
        let port = qhotplug_tests::servers::free_port();
        let server = NbdServer::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let options = MigrationOptions::new(Transport::Unix(d.join("migrate.sock")))
            .copy_storage(StorageCopy::new(server));
        let sum = g.console.run(&format!("md5sum /dev/{dev}"), SEEN).await;
        let migrated = g.vm.migrate(target, options, |_| {}).await.unwrap();
        drop(g);
        let console = Console::connect(&d.join("target-console.sock")).await;
        assert_eq!(console.run(&format!("md5sum /dev/{dev}"), SEEN).await, sum);
        migrated.target.quit().await.unwrap();
    });
}

#[test]
fn the_copy_runs_over_tls() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (g, dev, _source_image) = source(d, 16).await;
        let (server_dir, client_dir) = qhotplug_tests::servers::x509(d);
        let other = d.join("other-ca");
        std::fs::create_dir(&other).unwrap();
        let (_, trusts_another_ca) = qhotplug_tests::servers::x509(&other);
        let options = |client_dir: &Path| {
            let server = NbdServer::Tcp {
                host: "127.0.0.1".into(),
                port: qhotplug_tests::servers::free_port(),
            };
            MigrationOptions::new(Transport::Unix(d.join("migrate.sock")))
                .copy_storage(StorageCopy::new(server).tls(&server_dir, client_dir))
        };
        // A source that trusts another CA is refused the target's server: the copy is TLS,
        // verified; the source goes on as it was.
        let before = Snapshot::take(&g.vm).await;
        let to = target(&g, d, 16).await;
        let refused = g.vm.migrate(to, options(&trusts_another_ca), |_| {}).await;
        let said = format!("{:?}", refused.unwrap_err());
        assert!(said.contains("certificate"), "{said}");
        assert_eq!(Snapshot::take(&g.vm).await, before);

        let to = target(&g, d, 16).await;
        let sum = g.console.run(&format!("md5sum /dev/{dev}"), SEEN).await;
        let migrated =
            g.vm.migrate(to, options(&client_dir), |_| {})
                .await
                .unwrap();
        drop(g);
        let console = Console::connect(&d.join("target-console.sock")).await;
        assert_eq!(console.run(&format!("md5sum /dev/{dev}"), SEEN).await, sum);
        // Neither side keeps the credentials object.
        let objects = migrated
            .target
            .client()
            .execute_raw("qom-list", &serde_json::json!({"path": "/objects"}))
            .await
            .unwrap();
        assert!(!objects.to_string().contains("mig-tls"), "{objects}");
        migrated.target.quit().await.unwrap();
    });
}

#[test]
fn a_shallow_copy_moves_only_the_top_image_onto_the_targets_own_overlay_of_the_template() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let template = data_image(d, "template.raw", 16, 3);
        let (src, dst) = (d.join("d1.qcow2"), d.join("d1.target.qcow2"));
        new_qcow2(&src, None, Some((&template, "raw")));
        new_qcow2(&dst, None, Some((&template, "raw")));
        let g = Guest::boot(pc_spec(), |l| l).await;
        let mark = g.console.mark();
        let disk = DiskConfig::virtio_blk("d1", &src).format(qhotplug::Format::Qcow2);
        g.vm.add_disk(disk).await.unwrap();
        let dev = g.console.added(mark, "block").await;
        let write = format!(
            "dd if=/dev/urandom of=/dev/{dev} bs=64k count=16 seek=32 conv=notrunc,fsync \
             2>/dev/null; md5sum /dev/{dev}"
        );
        let sum = g.console.run(&write, SEEN).await;
        let mut launcher = g.vm.migration_launcher(d.join("target"));
        launcher.spec_mut().serials = vec![Serial::Socket(d.join("target-console.sock"))];
        launcher.spec_mut().disks[0].path = dst.clone();
        let target = Vm::launch(launcher).await.unwrap();
        let options = MigrationOptions::new(Transport::Unix(d.join("migrate.sock")))
            .copy_storage(StorageCopy::new(NbdServer::Unix(d.join("nbd.sock"))).shallow(true));
        let migrated = g.vm.migrate(target, options, |_| {}).await.unwrap();
        drop(g);
        let console = Console::connect(&d.join("target-console.sock")).await;
        let now = console.run(&format!("md5sum /dev/{dev}"), SEEN).await;
        assert_eq!(
            now[0].split_whitespace().next(),
            sum[0].split_whitespace().next()
        );
        migrated.target.quit().await.unwrap();
        // Only the top's 1 MiB went over: the target's overlay holds it, the template the rest.
        let out = std::process::Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(&dst)
            .output()
            .unwrap();
        let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let here: u64 = map
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(here, 1 << 20, "{map:?}");
    });
}
