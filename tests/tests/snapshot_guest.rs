//! Live snapshots, commit and stream with a booted guest under TCG: three disks snapshotted at
//! once (one `transaction`), each base keeping what the guest had before and each overlay what it
//! wrote after; a relaunch from `vm.spec()` opening the chains; the active commit of two disks back
//! into their bases, which then hold everything; a third disk streamed off its template, which is
//! then deleted while the guest reads on; a last relaunch reading the same. Host checks with
//! `md5sum` and `qemu-img` (reference §7). Plus a snapshot that fails half-way and changes
//! nothing.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use qhotplug::{DiskConfig, Error, SnapshotConfig, VmSpec};
use qhotplug_qmp::command::QueryJobs;
use qhotplug_tests::storage::block_nodes;
use qhotplug_tests::storage::{backing_file, data_image, guest_view_md5, md5};
use qhotplug_tests::{pc_spec, Guest};

const SEEN: Duration = Duration::from_secs(90);

/// The guest's `md5sum` of `/dev/<dev>`, its page cache dropped first (so it reads the disk).
async fn guest_sum(g: &Guest, dev: &str) -> String {
    let cmd = format!("echo 3 >/proc/sys/vm/drop_caches; md5sum /dev/{dev}");
    let out = g.console.run(&cmd, SEEN).await;
    out[0].split_whitespace().next().unwrap().to_owned()
}

/// The guest's sums of every virtio disk it has.
async fn all_sums(g: &Guest) -> BTreeSet<String> {
    let out = g
        .console
        .run(
            "echo 3 >/proc/sys/vm/drop_caches; for d in /dev/vd?; do md5sum $d; done",
            SEEN,
        )
        .await;
    out.iter()
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

/// Writes `text` at sector 2048 of `/dev/<dev>` and flushes it to the disk (`fsync` on the
/// device: a plain `sync` sends a block device's dirty pages but no flush, so a qcow2 overlay's
/// metadata could still sit in QEMU's cache).
async fn write_marker(g: &Guest, dev: &str, text: &str) {
    let cmd = format!(
        "echo {text} | dd of=/dev/{dev} bs=512 seek=2048 conv=notrunc,fsync 2>/dev/null; echo ok"
    );
    assert_eq!(g.console.run(&cmd, SEEN).await, ["ok"]);
}

async fn boot_with_disks(spec: VmSpec, disks: &[(&str, &Path)]) -> (Guest, Vec<String>) {
    let g = Guest::boot(spec, |l| l).await;
    let mut devs = Vec::new();
    for (id, path) in disks {
        let mark = g.console.mark();
        g.vm.add_disk(DiskConfig::virtio_blk(*id, path))
            .await
            .unwrap();
        devs.push(g.console.added(mark, "block").await);
    }
    (g, devs)
}

#[test]
fn three_disks_snapshot_at_once_relaunch_on_their_chains_commit_back_and_stream_off_a_template() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (a, b, t) = (
            data_image(d, "a.raw", 32, 1),
            data_image(d, "b.raw", 24, 2),
            data_image(d, "template.raw", 16, 3),
        );
        let (g, devs) = boot_with_disks(pc_spec(), &[("a", &a), ("b", &b), ("c", &t)]).await;
        let before: Vec<String> = [&a, &b, &t].iter().map(|p| md5(p)).collect();
        for (dev, sum) in devs.iter().zip(&before) {
            assert_eq!(&guest_sum(&g, dev).await, sum);
        }

        // One transaction for the three.
        let (oa, ob, oc) = (
            d.join("a.1.qcow2"),
            d.join("b.1.qcow2"),
            d.join("c.1.qcow2"),
        );
        let disks =
            g.vm.snapshot(
                SnapshotConfig::new()
                    .disk("a", &oa)
                    .disk("b", &ob)
                    .disk("c", &oc),
            )
            .await
            .unwrap();
        for (disk, (overlay, base)) in disks.iter().zip([(&oa, &a), (&ob, &b), (&oc, &t)]) {
            assert_eq!(&disk.path, overlay);
            assert_eq!(disk.backing.len(), 1);
            assert_eq!(&disk.backing[0].path, base);
            assert_eq!(backing_file(overlay).as_deref(), base.to_str());
        }
        assert_eq!(g.vm.disks(), disks);

        // The guest writes after the snapshot: into the overlays; the bases keep what was.
        let mut after = Vec::new();
        for (i, dev) in devs.iter().enumerate() {
            write_marker(&g, dev, &format!("after-the-snapshot-{i}")).await;
            after.push(guest_sum(&g, dev).await);
        }
        for (base, sum) in [&a, &b, &t].iter().zip(&before) {
            assert_eq!(&md5(base), sum, "{} changed", base.display());
        }
        let scratch = d.join("view.raw");
        for (overlay, sum) in [&oa, &ob, &oc].iter().zip(&after) {
            assert_eq!(&guest_view_md5(overlay, &scratch), sum);
        }

        // A relaunch from vm.spec() opens each chain as the SDK knows it.
        let spec = g.vm.spec();
        g.vm.quit().await.unwrap();
        drop(g);
        let g = Guest::boot(spec, |l| l).await;
        let want: BTreeSet<String> = after.iter().cloned().collect();
        assert_eq!(all_sums(&g).await, want);

        // Commit a and b back: each base then holds everything, and the disk runs on it.
        for (id, base, sum) in [("a", &a, &after[0]), ("b", &b, &after[1])] {
            let mut job = g.vm.commit_disk(id).await.unwrap();
            assert_eq!(job.job_id(), format!("commit-{id}"));
            job.wait_ready(SEEN).await.unwrap();
            let disk = job.pivot().await.unwrap();
            assert_eq!((&disk.path, disk.backing.len()), (base, 0));
            assert_eq!(&md5(base), sum, "{id}'s base holds what the guest wrote");
        }
        // Stream c off its template, then delete the template: the guest reads on.
        let job = g.vm.stream_disk("c").await.unwrap();
        let disk = job.wait(SEEN).await.unwrap();
        assert!(disk.backing.is_empty());
        assert_eq!(backing_file(&oc), None);
        std::fs::remove_file(&t).unwrap();
        assert_eq!(all_sums(&g).await, want);
        // No job, and only the images the disks use are open.
        assert!(g.vm.client().execute(&QueryJobs).await.unwrap().is_empty());
        assert_eq!(
            block_nodes(&g.vm).await,
            ["a-file", "a-fmt", "b-file", "b-fmt", "c-file.1", "c-fmt.1"]
        );

        // The last relaunch reads the same.
        let spec = g.vm.spec();
        g.vm.quit().await.unwrap();
        drop(g);
        let g = Guest::boot(spec, |l| l).await;
        assert_eq!(all_sums(&g).await, want);
    });
}

#[test]
fn a_snapshot_that_fails_half_way_leaves_every_disk_as_it_was() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (a, b) = (data_image(d, "a.raw", 8, 1), data_image(d, "b.raw", 8, 2));
        let (g, _) = boot_with_disks(pc_spec(), &[("a", &a), ("b", &b)]).await;
        let before = block_nodes(&g.vm).await;
        // b's overlay path exists already: refused when its turn comes, after a's overlay was
        // made; a's overlay nodes and file are undone.
        let taken = d.join("b.1.qcow2");
        std::fs::write(&taken, b"not ours").unwrap();
        let oa = d.join("a.1.qcow2");
        let failed =
            g.vm.snapshot(SnapshotConfig::new().disk("a", &oa).disk("b", &taken))
                .await
                .unwrap_err();
        assert!(matches!(failed, Error::Open { .. }), "{failed:?}");
        assert_eq!(block_nodes(&g.vm).await, before);
        assert!(!oa.exists(), "a's overlay was removed");
        assert_eq!(std::fs::read(&taken).unwrap(), b"not ours");
        assert!(g.vm.disks().iter().all(|d| d.backing.is_empty()));
        // A disk with a running job, or listed twice, is refused before anything is made.
        let twice =
            g.vm.snapshot(SnapshotConfig::new().disk("a", &oa).disk("a", d.join("x")))
                .await
                .unwrap_err();
        assert!(matches!(twice, Error::DuplicateId(_)), "{twice:?}");
        assert!(!oa.exists());
        // And nothing to commit or stream on a disk that is one image.
        assert!(matches!(
            g.vm.commit_disk("a").await,
            Err(Error::Precondition { .. })
        ));
        assert!(matches!(
            g.vm.stream_disk("a").await,
            Err(Error::Precondition { .. })
        ));
        // The disks still take a snapshot.
        g.vm.snapshot(SnapshotConfig::new().disk("a", &oa))
            .await
            .unwrap();
    });
}

#[test]
fn a_quiesced_snapshot_freezes_the_guest_through_its_agent_and_thaws_it() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let a = data_image(d, "a.raw", 8, 1);
        // Without an agent port a quiesced snapshot is refused, and nothing changes.
        let (g, _) = boot_with_disks(pc_spec(), &[("a", &a)]).await;
        let before = block_nodes(&g.vm).await;
        let oa = d.join("a.1.qcow2");
        let refused =
            g.vm.snapshot(SnapshotConfig::new().disk("a", &oa).quiesce(true))
                .await
                .unwrap_err();
        assert!(matches!(refused, Error::NoGuestAgent), "{refused:?}");
        assert_eq!(block_nodes(&g.vm).await, before);
        assert!(!oa.exists());
        drop(g);

        // With the agent: frozen for the transaction, thawed after. An ext4 made on the host.
        let fs = qhotplug_tests::storage::ext4_image(d, "fs.raw", 16);
        let g = Guest::boot_with_agent(pc_spec()).await;
        let mark = g.console.mark();
        g.vm.add_disk(DiskConfig::virtio_blk("a", &fs))
            .await
            .unwrap();
        let dev = g.console.added(mark, "block").await;
        let mount = format!("mkdir -p /mnt && mount -t ext4 /dev/{dev} /mnt && echo mounted");
        assert_eq!(g.console.run(&mount, SEEN).await, ["mounted"]);
        let disks =
            g.vm.snapshot(SnapshotConfig::new().disk("a", &oa).quiesce(true))
                .await
                .unwrap();
        assert_eq!(disks[0].backing.len(), 1);
        let agent = g.vm.agent().await.unwrap();
        assert_eq!(
            agent
                .execute(&qhotplug::agent::GuestFsfreezeStatus)
                .await
                .unwrap(),
            qhotplug::agent::FreezeStatus::Thawed
        );
        // The guest writes on, into the overlay.
        let write = "echo after > /mnt/f && sync && cat /mnt/f";
        assert_eq!(g.console.run(write, SEEN).await, ["after"]);
    });
}
