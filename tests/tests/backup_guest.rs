//! Push backups with a booted guest under TCG: a full backup, the guest writes, an incremental, the
//! guest writes, an incremental; each restored chain (`qemu-img convert` of the backup and the
//! ones under it) equals what the guest read from its disk at that backup, and each incremental
//! allocates only what the guest changed. Checkpoints are listed with their sizes, deleted
//! without losing anything, survive a clean shutdown and relaunch, and after QEMU is killed are
//! reported inconsistent (or missing, if made after the last clean shutdown): the incremental is
//! refused and a new full backup works. They migrate with the guest (`dirty-bitmaps`). A failed
//! incremental (its target's filesystem full) loses nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qhotplug::{
    BackupConfig, CheckpointProblem, CheckpointState, DiskConfig, Error, Format, NbdServer,
    PullConfig, VmSpec,
};
use qhotplug_tests::storage::{guest_view_md5, new_qcow2, own_data, qemu_img_map, SmallFs};
use qhotplug_tests::{pc_spec, Guest, Snapshot};

const SEEN: Duration = Duration::from_secs(90);
const MIB: u64 = 1 << 20;

/// Boots a guest from `spec` and hot-adds `image` (qcow2) as virtio-blk disk `d1` unless the spec
/// has it; returns the guest and its name for the disk.
async fn with_disk(spec: VmSpec, image: &Path) -> (Guest, String) {
    let has = spec.disks.iter().any(|d| d.id == "d1");
    let g = Guest::boot(spec, |l| l).await;
    if has {
        return (g, "vda".into());
    }
    let mark = g.console.mark();
    g.vm.add_disk(DiskConfig::virtio_blk("d1", image).format(Format::Qcow2))
        .await
        .unwrap();
    let dev = g.console.added(mark, "block").await;
    (g, dev)
}

/// A guest whose disk `d1` (qcow2, in `dir`) was written at MiB 1 and then backed up in full to
/// `dir/full.qcow2` with checkpoint `c1`: the guest, its name for the disk, the backup, and the
/// guest's `md5sum` of the disk at the backup.
async fn backed_up_once(dir: &Path) -> (Guest, String, PathBuf, String) {
    let image = new_qcow2(dir.join("d1.qcow2"), Some(32), None);
    let (g, dev) = with_disk(pc_spec(), &image).await;
    let at_full = write_mib(&g, &dev, 1).await;
    let full = dir.join("full.qcow2");
    let backup = BackupConfig::full().disk("d1", &full).checkpoint("c1");
    let disks = g.vm.backup(backup).await.unwrap().wait(SEEN).await.unwrap();
    assert_eq!(disks[0].checkpoints, ["c1"]);
    (g, dev, full, at_full)
}

/// The guest writes 1 MiB of random bytes at MiB `at` of `/dev/<dev>`, flushed, and returns its
/// `md5sum` of the whole disk then.
async fn write_mib(g: &Guest, dev: &str, at: u64) -> String {
    let write = format!(
        "dd if=/dev/urandom of=/dev/{dev} bs=64k count=16 seek={} conv=notrunc,fsync \
         2>/dev/null; md5sum /dev/{dev}",
        at * 16
    );
    let out = g.console.run(&write, SEEN).await;
    out[0].split_whitespace().next().unwrap().to_owned()
}

/// Bytes `image` itself allocates (not its backing chain).
fn allocated_here(image: &Path) -> u64 {
    own_data(image).iter().map(|(_, length)| length).sum()
}

#[test]
fn full_then_two_incrementals_each_restore_the_disk_as_it_was_and_copy_only_what_changed() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (g, dev, full, at_full) = backed_up_once(d).await;
        let scratch = d.join("restored.raw");

        let at_inc1 = write_mib(&g, &dev, 4).await;
        let inc1 = d.join("inc1.qcow2");
        let backup = BackupConfig::incremental("c1")
            .disk_onto("d1", &inc1, &full)
            .checkpoint("c2");
        g.vm.backup(backup).await.unwrap().wait(SEEN).await.unwrap();

        let at_inc2 = write_mib(&g, &dev, 8).await;
        let inc2 = d.join("inc2.qcow2");
        let backup = BackupConfig::incremental("c2")
            .disk_onto("d1", &inc2, &inc1)
            .checkpoint("c3");
        g.vm.backup(backup).await.unwrap().wait(SEEN).await.unwrap();

        // Each chain reads as the disk did at its backup; each incremental holds 1 MiB.
        assert_eq!(guest_view_md5(&full, &scratch), at_full);
        assert_eq!(guest_view_md5(&inc1, &scratch), at_inc1);
        assert_eq!(guest_view_md5(&inc2, &scratch), at_inc2);
        assert_eq!(allocated_here(&inc1), MIB);
        assert_eq!(allocated_here(&inc2), MIB);

        // The checkpoints, with what each recorded and what an incremental since it would copy.
        write_mib(&g, &dev, 12).await;
        let listed = g.vm.checkpoints("d1").await.unwrap();
        let shown: Vec<(&str, CheckpointState, u64, u64, bool)> = listed
            .iter()
            .map(|c| (c.name.as_str(), c.state, c.recorded, c.since, c.recording))
            .collect();
        let usable = CheckpointState::Usable;
        assert_eq!(
            shown,
            [
                ("c1", usable, MIB, 3 * MIB, false),
                ("c2", usable, MIB, 2 * MIB, false),
                ("c3", usable, MIB, MIB, true),
            ]
        );
        // Deleting c2 loses nothing: c1 covers its interval now.
        g.vm.delete_checkpoint("d1", "c2").await.unwrap();
        let listed = g.vm.checkpoints("d1").await.unwrap();
        let since: Vec<(&str, u64)> = listed.iter().map(|c| (c.name.as_str(), c.since)).collect();
        assert_eq!(since, [("c1", 3 * MIB), ("c3", MIB)]);
        assert_eq!(g.vm.spec().disks[0].checkpoints, ["c1", "c3"]);
        let refused = g.vm.delete_checkpoint("d1", "c2").await.unwrap_err();
        assert!(matches!(
            refused,
            Error::Checkpoint {
                problem: CheckpointProblem::Unknown,
                ..
            }
        ));
    });
}

#[test]
fn a_failed_incremental_loses_nothing_and_the_next_one_covers_everything_since_the_checkpoint() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (g, dev, full, _) = backed_up_once(d).await;
        let scratch = d.join("restored.raw");

        // 4 MiB of new data, onto a 1 MiB filesystem: the copy fails (ENOSPC).
        write_mib(&g, &dev, 4).await;
        write_mib(&g, &dev, 5).await;
        write_mib(&g, &dev, 6).await;
        let now = write_mib(&g, &dev, 7).await;
        // QEMU's state, its dirty bitmaps among it (`query-block`).
        let before = Snapshot::take(&g.vm).await;
        let small = SmallFs::mount(d, "small", 1);
        let doomed = small.0.join("inc.qcow2");
        let backup = BackupConfig::incremental("c1")
            .disk_onto("d1", &doomed, &full)
            .checkpoint("c2");
        let failed = g.vm.backup(backup).await.unwrap().wait(SEEN).await;
        assert!(matches!(failed, Err(Error::JobFailed { .. })), "{failed:?}");
        // Nothing changed: no new checkpoint, c1 still records, the target and its nodes gone.
        assert_eq!(g.vm.spec().disks[0].checkpoints, ["c1"]);
        let listed = g.vm.checkpoints("d1").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].recording);
        assert_eq!(listed[0].since, 4 * MIB);
        assert!(!doomed.exists());
        assert_eq!(Snapshot::take(&g.vm).await, before);

        // The next incremental since c1 covers everything.
        let inc = d.join("inc.qcow2");
        let backup = BackupConfig::incremental("c1")
            .disk_onto("d1", &inc, &full)
            .checkpoint("c2");
        g.vm.backup(backup).await.unwrap().wait(SEEN).await.unwrap();
        assert_eq!(guest_view_md5(&inc, &scratch), now);
        assert_eq!(allocated_here(&inc), 4 * MIB);
    });
}

#[test]
fn checkpoints_survive_a_clean_relaunch_and_after_qemu_is_killed_only_a_full_backup_is_taken() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (g, _, full, _) = backed_up_once(d).await;
        let scratch = d.join("restored.raw");
        let spec = g.vm.spec();
        g.vm.quit().await.unwrap();
        drop(g);

        // A clean shutdown stored c1 in the image: relaunched, it is usable and records.
        let (g, dev) = with_disk(spec.clone(), &d.join("d1.qcow2")).await;
        let listed = g.vm.checkpoints("d1").await.unwrap();
        assert_eq!(listed[0].state, CheckpointState::Usable, "{listed:?}");
        assert!(listed[0].recording);
        let at_inc = write_mib(&g, &dev, 4).await;
        let inc = d.join("inc.qcow2");
        let backup = BackupConfig::incremental("c1")
            .disk_onto("d1", &inc, &full)
            .checkpoint("c2");
        g.vm.backup(backup).await.unwrap().wait(SEEN).await.unwrap();
        assert_eq!(guest_view_md5(&inc, &scratch), at_inc);
        let spec = g.vm.spec();

        // QEMU killed between two backups: relaunched, c1 (stored at the clean shutdown) is
        // inconsistent, and c2 (made since, never stored) is missing.
        write_mib(&g, &dev, 8).await;
        let pid = g.vm.pid().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        drop(g);
        let (g, dev) = with_disk(spec, &d.join("d1.qcow2")).await;
        let listed = g.vm.checkpoints("d1").await.unwrap();
        let states: Vec<CheckpointState> = listed.iter().map(|c| c.state).collect();
        assert_eq!(
            states,
            [CheckpointState::Inconsistent, CheckpointState::Missing]
        );
        let before = Snapshot::take(&g.vm).await;
        for (since, problem) in [
            ("c1", CheckpointProblem::Inconsistent),
            ("c2", CheckpointProblem::Missing),
        ] {
            let refused =
                g.vm.backup(BackupConfig::incremental(since).disk("d1", d.join("no.qcow2")))
                    .await
                    .unwrap_err();
            assert!(
                matches!(&refused, Error::Checkpoint { problem: p, .. } if *p == problem),
                "{refused:?}"
            );
            assert!(refused.nothing_sent());
            assert!(refused.to_string().contains("full backup"), "{refused}");
            assert!(!d.join("no.qcow2").exists());
            assert_eq!(Snapshot::take(&g.vm).await, before);
        }

        // A new full backup works, and its checkpoint replaces the inconsistent ones.
        let now = write_mib(&g, &dev, 12).await;
        let full2 = d.join("full2.qcow2");
        let backup = BackupConfig::full().disk("d1", &full2).checkpoint("c3");
        g.vm.backup(backup).await.unwrap().wait(SEEN).await.unwrap();
        assert_eq!(guest_view_md5(&full2, &scratch), now);
        assert_eq!(g.vm.spec().disks[0].checkpoints, ["c3"]);
        let listed = g.vm.checkpoints("d1").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].state, CheckpointState::Usable);
    });
}

#[test]
fn checkpoints_migrate_with_the_guest_and_the_target_takes_the_next_incremental() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (g, dev, full, _) = backed_up_once(d).await;
        let scratch = d.join("restored.raw");
        write_mib(&g, &dev, 4).await;

        // Shared storage; the bitmaps travel in the migration stream.
        let console_path = d.join("target-console.sock");
        let mut launcher = g.vm.migration_launcher(d.join("target"));
        launcher.spec_mut().serials = vec![qhotplug::Serial::Socket(console_path.clone())];
        let target = qhotplug::Vm::launch(launcher).await.unwrap();
        let options =
            qhotplug::MigrationOptions::new(qhotplug::Transport::Unix(d.join("migrate.sock")))
                .dirty_bitmaps(true);
        let migrated = g.vm.migrate(target, options, |_| {}).await.unwrap();
        let target = migrated.target;
        let listed = target.checkpoints("d1").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].state, listed[0].recorded, listed[0].recording),
            (CheckpointState::Usable, MIB, true)
        );

        // The guest goes on on the target; an incremental there holds what it wrote since c1.
        let console = qhotplug_tests::Console::connect(&console_path).await;
        let write = format!(
            "dd if=/dev/urandom of=/dev/{dev} bs=64k count=16 seek=128 conv=notrunc,fsync \
             2>/dev/null; md5sum /dev/{dev}"
        );
        let out = console.run(&write, SEEN).await;
        let now = out[0].split_whitespace().next().unwrap().to_owned();
        let inc = d.join("inc.qcow2");
        let backup = BackupConfig::incremental("c1")
            .disk_onto("d1", &inc, &full)
            .checkpoint("c2");
        target
            .backup(backup)
            .await
            .unwrap()
            .wait(SEEN)
            .await
            .unwrap();
        assert_eq!(guest_view_md5(&inc, &scratch), now);
        assert_eq!(allocated_here(&inc), 2 * MIB);
        target.quit().await.unwrap();
    });
}

/// `qemu-img convert` of NBD export `source` (read over the network, as a backup tool would) to a
/// raw file; its `md5sum`.
fn read_export(source: &qhotplug::Nbd, scratch: &Path) -> String {
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &source.uri()])
        .arg(scratch)
        .status()
        .unwrap();
    assert!(status.success(), "qemu-img convert {}", source.uri());
    let sum = qhotplug_tests::storage::md5(scratch);
    std::fs::remove_file(scratch).unwrap();
    sum
}

/// Bytes of NBD export `source` that `context` (a dirty bitmap's meta context) marks dirty: read
/// with `qemu-img map` through QEMU's NBD client, which reports the context's bit as a hole.
fn dirty_bytes(source: &qhotplug::Nbd, context: &str) -> u64 {
    let qhotplug::NbdServer::Unix(socket) = &source.server else {
        panic!("a Unix socket")
    };
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={},x-dirty-bitmap={context}",
        socket.display(),
        source.export.as_deref().unwrap()
    );
    let map = qemu_img_map(["--image-opts", &opts]);
    map.iter()
        .filter(|e| e["data"] == false)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// What a pull backup's end must leave as before: QEMU's nodes, fd sets, open files, and ours.
fn leftovers(s: &Snapshot) -> impl PartialEq + std::fmt::Debug {
    (
        s.nodes.clone(),
        s.fdsets.clone(),
        s.qemu_fds.clone(),
        s.our_fds.clone(),
        s.objects.clone(),
    )
}

#[test]
fn a_pull_backup_serves_the_disk_as_it_was_while_the_guest_overwrites_it() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let image = new_qcow2(d.join("d1.qcow2"), Some(32), None);
        let out = d.join("read.raw");
        let (g, dev) = with_disk(pc_spec(), &image).await;
        let before = Snapshot::take(&g.vm).await;
        let socket = d.join("pull.sock");

        // Full: the view is the disk as of the start, whatever the guest writes meanwhile.
        let at_start = write_mib(&g, &dev, 1).await;
        let config = PullConfig::full(NbdServer::Unix(socket.clone()))
            .disk("d1", d.join("scratch.qcow2"))
            .checkpoint("c1");
        let pull = g.vm.pull_backup(config).await.unwrap();
        let source = pull.source("d1").unwrap();
        let now = write_mib(&g, &dev, 1).await;
        assert_ne!(now, at_start);
        // A reader that connects, reads a little and goes does not disturb the next one.
        let status = std::process::Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read 0 64k", &source.uri()])
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(read_export(&source, &out), at_start);
        let disks = pull.finish().await.unwrap();
        assert_eq!(disks[0].checkpoints, ["c1"]);
        assert_eq!(g.vm.spec().disks[0].checkpoints, ["c1"]);
        assert_eq!(leftovers(&Snapshot::take(&g.vm).await), leftovers(&before));
        assert!(!d.join("scratch.qcow2").exists());

        // Incremental since c1: the changed extents are offered as a dirty bitmap.
        let at_start = write_mib(&g, &dev, 4).await;
        let config = PullConfig::incremental("c1", NbdServer::Unix(socket.clone()))
            .disk("d1", d.join("scratch.qcow2"))
            .checkpoint("c2");
        let pull = g.vm.pull_backup(config).await.unwrap();
        let source = pull.source("d1").unwrap();
        write_mib(&g, &dev, 8).await;
        let context = pull.dirty_bitmap().unwrap();
        // c1 recorded the write at MiB 1 after the full pull started, and the one at MiB 4.
        assert_eq!(dirty_bytes(&source, &context), 2 * MIB);
        assert_eq!(read_export(&source, &out), at_start);
        pull.finish().await.unwrap();
        assert_eq!(g.vm.spec().disks[0].checkpoints, ["c1", "c2"]);

        // Aborted, a pull backup leaves the checkpoints as they were.
        let config = PullConfig::incremental("c2", NbdServer::Unix(socket.clone()))
            .disk("d1", d.join("scratch.qcow2"))
            .checkpoint("c3");
        let pull = g.vm.pull_backup(config).await.unwrap();
        pull.cancel().await.unwrap();
        assert_eq!(g.vm.spec().disks[0].checkpoints, ["c1", "c2"]);
        let listed = g.vm.checkpoints("d1").await.unwrap();
        let shown: Vec<(&str, bool, u64)> = listed
            .iter()
            .map(|c| (c.name.as_str(), c.recording, c.recorded))
            .collect();
        assert_eq!(shown, [("c1", false, 2 * MIB), ("c2", true, MIB)]);
        assert_eq!(leftovers(&Snapshot::take(&g.vm).await), leftovers(&before));
    });
}
