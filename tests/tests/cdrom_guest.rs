//! CD-ROM drives a booted guest reads: each medium through a change and an eject, a tray the
//! guest locked refused unless forced, and ISOs on NBD and on Ceph RBD through a medium change
//! and a relaunch from `vm.spec()`.

use qhotplug::{Cdrom, CdromConfig, Error, IdeAddr, MediumOptions, NetworkSource};
use qhotplug_tests::ceph::CephCluster;
use qhotplug_tests::servers::{Listen, NbdExport};
use qhotplug_tests::storage::medium;
use qhotplug_tests::{iso, pc_spec, Guest, Snapshot};

/// How long the guest may take to answer (TCG).
const GUEST: std::time::Duration = std::time::Duration::from_secs(60);

/// Mounts `/dev/{dev}`, prints `file` from it, and unmounts it, until that works.
async fn read_medium(g: &qhotplug_tests::Guest, dev: &str, file: &str) -> Vec<String> {
    let cmd = format!(
        "mkdir -p /mnt && mount -t iso9660 -o ro /dev/{dev} /mnt && cat /mnt/{file} && umount /mnt"
    );
    let done = |out: &[String]| !out.is_empty() && out.iter().all(|l| l.starts_with("from "));
    g.console.until(&cmd, done, GUEST).await
}

#[test]
fn the_guest_reads_each_medium_and_a_locked_tray_is_refused_unless_forced() {
    qhotplug_tests::serial_test(async {
        let isos = tempfile::tempdir().unwrap();
        let a = iso(isos.path(), "a.iso", "hello.txt", "from a\n");
        let b = iso(isos.path(), "b.iso", "hello.txt", "from b\n");
        let c = iso(isos.path(), "c.iso", "other.txt", "from c\n");
        let mut spec = pc_spec();
        // On ide.1, the guest's only CD-ROM at boot: its sr0 (ata_piix).
        spec.cdroms
            .push(Cdrom::ide("ide-cd", IdeAddr::new(1, 0)).with_medium(&a));
        let g = qhotplug_tests::Guest::boot(spec, |l| l).await;
        let run = |cmd: &'static str| g.console.run(cmd, GUEST);
        assert_eq!(
            run("mkdir -p /mnt && mount -t iso9660 -o ro /dev/sr0 /mnt && cat /mnt/hello.txt")
                .await,
            ["from a"]
        );
        // Mounted, the drive is locked: an unforced change is refused and changes nothing.
        assert!(g.vm.tray_status("ide-cd").await.unwrap().locked);
        let quick = MediumOptions::default().tray_wait(std::time::Duration::from_millis(500));
        assert!(matches!(
            g.vm.change_medium("ide-cd", Some(b.clone().into()), quick).await,
            Err(Error::TrayLocked(id)) if id == "ide-cd"
        ));
        assert_eq!(medium(&g.vm, "ide-cd").await.as_deref(), Some("ide-cd-fmt"));
        assert_eq!(run("cat /mnt/hello.txt").await, ["from a"]);

        // Unmounted, the change goes through and the guest reads the new medium.
        assert_eq!(run("umount /mnt").await, Vec::<String>::new());
        g.vm.insert_medium("ide-cd", &b).await.unwrap();
        assert_eq!(read_medium(&g, "sr0", "hello.txt").await, ["from b"]);
        run("mount -t iso9660 -o ro /dev/sr0 /mnt").await;
        // Forced, a mounted medium is taken all the same.
        g.vm.change_medium(
            "ide-cd",
            Some(c.clone().into()),
            MediumOptions::default().force(true),
        )
        .await
        .unwrap();
        assert_eq!(
            medium(&g.vm, "ide-cd").await.as_deref(),
            Some("ide-cd-fmt.2")
        );
        run("umount /mnt").await;
        assert_eq!(read_medium(&g, "sr0", "other.txt").await, ["from c"]);

        // Ejected, the guest finds no medium.
        g.vm.eject_medium("ide-cd").await.unwrap();
        let no_medium = |out: &[String]| out.len() == 1 && out[0].contains("No medium found");
        g.console
            .until("mount -t iso9660 -o ro /dev/sr0 /mnt", no_medium, GUEST)
            .await;

        // A scsi-cd hot-added loaded: the guest sees it, reads it, and sees it go.
        let mark = g.console.mark();
        g.vm.add_cdrom(CdromConfig::new("scsi-cd").medium(&a))
            .await
            .unwrap();
        let dev = g.console.added(mark, "block").await;
        assert!(dev.starts_with("sr"), "{dev}");
        assert_eq!(read_medium(&g, &dev, "hello.txt").await, ["from a"]);
        let mark = g.console.mark();
        g.vm.remove_cdrom("scsi-cd").await.unwrap();
        g.console
            .wait_for(mark, &format!("qhg: remove block {dev}"), GUEST)
            .await
            .expect("the guest saw the drive go");
    });
}

/// The steps of a loaded `scsi-cd`'s hot-add, in order, with the occurrence to fail.

#[test]
fn a_scsi_cd_reads_isos_on_nbd_and_on_rbd_through_a_medium_change_and_a_relaunch() {
    qhotplug_tests::serial_test(async {
        let isos = tempfile::tempdir().unwrap();
        let a = iso(isos.path(), "a.iso", "hello.txt", "from nbd\n");
        let b = iso(isos.path(), "b.iso", "hello.txt", "from rbd\n");
        let nbd = NbdExport::start(&a, "tools", Listen::Unix(isos.path().join("isos.sock")));
        let ceph = CephCluster::start(&isos.path().join("ceph"));
        ceph.import_image("b-iso", &b);
        let key = ceph.admin_key();
        let g = Guest::boot(pc_spec(), |l| l).await;
        let before = Snapshot::take(&g.vm).await;

        // Hot-added with an ISO on NBD: the guest mounts it.
        let mark = g.console.mark();
        let on_nbd = NetworkSource::from(nbd.source());
        g.vm.add_cdrom(CdromConfig::new("netcd").medium(on_nbd))
            .await
            .unwrap();
        let dev = g.console.added(mark, "block").await;
        assert_eq!(read_medium(&g, &dev, "hello.txt").await, ["from nbd"]);

        // Changed to an ISO on RBD, whose key is this medium's own secret object.
        let on_rbd = NetworkSource::from(ceph.source("b-iso"));
        g.vm.insert_medium("netcd", on_rbd).await.unwrap();
        assert_eq!(read_medium(&g, &dev, "hello.txt").await, ["from rbd"]);
        let objects = Snapshot::take(&g.vm).await.objects;
        let ours: Vec<&String> = objects.iter().filter(|o| o.starts_with("netcd")).collect();
        assert_eq!(ours, ["netcd-secret.1"]);
        let spec = g.vm.spec();
        assert!(!format!("{spec:?}").contains(&key));

        // Ejected, then removed: the medium's nodes and secret go, and QEMU is as it was.
        g.vm.eject_medium("netcd").await.unwrap();
        let objects = Snapshot::take(&g.vm).await.objects;
        assert!(
            !objects.iter().any(|o| o.starts_with("netcd")),
            "{objects:?}"
        );
        let mark = g.console.mark();
        g.vm.remove_cdrom("netcd").await.unwrap();
        g.console
            .wait_for(mark, &format!("qhg: remove block {dev}"), GUEST)
            .await
            .expect("the guest saw the drive go");
        assert_eq!(Snapshot::take(&g.vm).await, before);
        g.vm.quit().await.unwrap();
        drop(g);

        // A relaunch from the spec taken with the RBD medium in boots with it: the key only
        // encrypted in QEMU's argv, the ISO read in the guest.
        let again = Guest::boot(spec, |l| l).await;
        let argv = std::fs::read(format!("/proc/{}/cmdline", again.vm.pid().unwrap())).unwrap();
        let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
        assert!(argv.contains("netcd-secret.1"), "{argv}");
        assert!(!argv.contains(&key), "{argv}");
        assert_eq!(read_medium(&again, "sr0", "hello.txt").await, ["from rbd"]);
        drop(nbd);
    });
}
