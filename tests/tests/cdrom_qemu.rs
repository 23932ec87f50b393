//! CD-ROM drives on real QEMU: `scsi-cd` hot-added empty and loaded and removed; an `ide-cd` at
//! boot; media inserted, changed and ejected, with the old medium's nodes deleted only once it is
//! out; a failure forced at each step of a medium change (through [`FaultProxy`]) leaving QEMU
//! exactly as it was; bad input refused before QEMU is asked. What a guest reads is in
//! `cdrom_guest.rs`.
//!
//! The VMs run (no guest OS): QEMU before 9.1 closes a removed fd set's fds only while the VM runs.

use futures::StreamExt;
use qhotplug::{
    Cdrom, CdromBus, CdromConfig, DiskConfig, Error, IdeAddr, Medium, MediumOptions, NetworkSource,
};
use qhotplug_qmp::command::{Cont, QueryFdsets, Stop};
use qhotplug_tests::ceph::CephCluster;
use qhotplug_tests::storage::{block_nodes, medium};
use qhotplug_tests::{assert_rolls_back, iso, pc_spec, second_monitor, TestVm};

#[test]
fn scsi_cd_hot_adds_empty_and_loaded_and_removes() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running_pc().await;
        let a = iso(t.dir(), "a.iso", "hello.txt", "from a\n");
        let before = t.snapshot().await;

        let empty = t.vm.add_cdrom(CdromConfig::new("cd0")).await.unwrap();
        assert!(matches!(empty.bus, CdromBus::Scsi(_)));
        assert_eq!(medium(&t.vm, "cd0").await, None);
        let loaded =
            t.vm.add_cdrom(CdromConfig::new("cd1").medium(&a))
                .await
                .unwrap();
        assert_eq!(loaded.medium, Some(Medium::Image(a.clone())));
        assert_eq!(medium(&t.vm, "cd1").await.as_deref(), Some("cd1-fmt"));
        // Two drives, two targets.
        let targets: Vec<u16> =
            t.vm.cdroms()
                .iter()
                .map(|c| match &c.bus {
                    CdromBus::Scsi(a) => a.scsi_id,
                    CdromBus::Ide(_) => unreachable!(),
                })
                .collect();
        assert_ne!(targets[0], targets[1]);

        t.vm.remove_cdrom("cd1").await.unwrap();
        t.vm.remove_cdrom("cd0").await.unwrap();
        assert_eq!(t.snapshot().await, before);
    });
}

#[test]
fn a_drive_added_empty_then_given_a_medium_removes_with_its_medium() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running_pc().await;
        let a = iso(t.dir(), "a.iso", "hello.txt", "from a\n");
        let b = iso(t.dir(), "b.iso", "hello.txt", "from b\n");
        let before = t.snapshot().await;
        // Inserted by a change, a medium is not the device's own drive: unless it is taken out
        // before device_del, its nodes stay in use after the device is gone.
        for iso in [&a, &b] {
            t.vm.add_cdrom(CdromConfig::new("cd0")).await.unwrap();
            t.vm.insert_medium("cd0", iso).await.unwrap();
            assert_eq!(medium(&t.vm, "cd0").await.as_deref(), Some("cd0-fmt.1"));
            t.vm.remove_cdrom("cd0").await.unwrap();
            assert_eq!(t.snapshot().await, before);
            assert!(t.vm.reconcile().await.unwrap().is_empty());
        }
        // Hot-added loaded and changed: the same.
        t.vm.add_cdrom(CdromConfig::new("cd0").medium(&a))
            .await
            .unwrap();
        t.vm.insert_medium("cd0", &b).await.unwrap();
        t.vm.remove_cdrom("cd0").await.unwrap();
        assert_eq!(t.snapshot().await, before);
    });
}

#[test]
fn media_insert_change_and_eject_and_a_relaunch_keeps_the_medium() {
    qhotplug_tests::serial_test(async {
        let isos = tempfile::tempdir().unwrap();
        let a = iso(isos.path(), "a.iso", "hello.txt", "from a\n");
        let b = iso(isos.path(), "b.iso", "hello.txt", "from b\n");
        let mut spec = pc_spec();
        spec.cdroms
            .push(Cdrom::ide("cd", IdeAddr::new(1, 0)).with_medium(&a));
        let t = TestVm::running(spec).await;
        assert_eq!(medium(&t.vm, "cd").await.as_deref(), Some("cd-fmt"));

        // Paused for the change, so that every tray move is the SDK's: the firmware probing the
        // drive moves the tray too while the VM runs.
        t.vm.client().execute(&Stop).await.unwrap();
        let mut events = t.vm.client().events();
        t.vm.insert_medium("cd", &b).await.unwrap();
        assert_eq!(medium(&t.vm, "cd").await.as_deref(), Some("cd-fmt.1"));
        // The old medium's nodes are gone.
        assert_eq!(block_nodes(&t.vm).await, ["cd-file.1", "cd-fmt.1"]);
        // The tray opened and closed, as QEMU says.
        let mut moves = Vec::new();
        while moves.len() < 2 {
            let e = tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
                .await
                .expect("DEVICE_TRAY_MOVED")
                .unwrap()
                .unwrap();
            if let qhotplug::EventKind::DeviceTrayMoved(m) = e.kind() {
                assert_eq!(m.id, "cd");
                moves.push(m.tray_open);
            }
        }
        assert_eq!(moves, [true, false]);
        // Running again for the rest: QEMU before 9.1 closes a removed fd set's fds only then.
        t.vm.client().execute(&Cont).await.unwrap();

        t.vm.eject_medium("cd").await.unwrap();
        assert_eq!(medium(&t.vm, "cd").await, None);
        assert!(block_nodes(&t.vm).await.is_empty());
        // With the last node on it gone, so is the fd set it was opened from.
        assert!(t
            .vm
            .client()
            .execute(&QueryFdsets)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(t.vm.cdroms()[0].medium, None);
        // Ejecting an empty drive changes nothing and is no error.
        t.vm.eject_medium("cd").await.unwrap();

        t.vm.insert_medium("cd", &a).await.unwrap();
        assert_eq!(medium(&t.vm, "cd").await.as_deref(), Some("cd-fmt.2"));
        let status = t.vm.tray_status("cd").await.unwrap();
        assert!(!status.tray_open && !status.locked, "{status:?}");

        // A relaunch from the spec boots with the medium now in the drive.
        let spec = t.vm.spec();
        assert_eq!(spec.cdroms[0].medium, Some(Medium::Image(a.clone())));
        drop(t);
        let again = TestVm::running(spec).await;
        assert_eq!(medium(&again.vm, "cd").await.as_deref(), Some("cd-fmt.2"));
        // And the medium changes again from there, to the next generation.
        again.vm.insert_medium("cd", &b).await.unwrap();
        assert_eq!(medium(&again.vm, "cd").await.as_deref(), Some("cd-fmt.3"));
    });
}

#[test]
fn bad_medium_requests_change_nothing() {
    qhotplug_tests::serial_test(async {
        let mut spec = pc_spec();
        spec.cdroms.push(Cdrom::ide("cd", IdeAddr::new(1, 0)));
        let t = TestVm::running(spec).await;
        let disk = t.image("d.raw", 1);
        t.vm.add_disk(DiskConfig::virtio_blk("d1", &disk))
            .await
            .unwrap();
        let before = t.snapshot().await;
        let missing = t.dir().join("no-such.iso");
        assert!(matches!(
            t.vm.insert_medium("cd", &missing).await,
            Err(Error::Open { .. })
        ));
        assert!(matches!(
            t.vm.insert_medium("nope", &missing).await,
            Err(Error::NotFound { .. })
        ));
        // A disk is no CD-ROM.
        assert!(matches!(
            t.vm.eject_medium("d1").await,
            Err(Error::NotFound {
                kind: qhotplug::DeviceKind::Cdrom,
                ..
            })
        ));
        // IDE has no hotplug.
        assert!(matches!(
            t.vm.remove_cdrom("cd").await,
            Err(Error::NotHotpluggable { .. })
        ));
        assert_eq!(t.snapshot().await, before);
    });
}

/// A directory with two ISOs, `a.iso` and `b.iso` (each a `hello.txt`), and a `pc` spec with an
/// IDE CD-ROM `cd` holding `a.iso` and a second monitor at `mon2.sock` there.
fn ide_cd_with_a_second_monitor() -> (tempfile::TempDir, qhotplug::VmSpec) {
    let isos = tempfile::tempdir().unwrap();
    let a = iso(isos.path(), "a.iso", "hello.txt", "from a\n");
    iso(isos.path(), "b.iso", "hello.txt", "from b\n");
    let mut spec = pc_spec();
    spec.cdroms
        .push(Cdrom::ide("cd", IdeAddr::new(1, 0)).with_medium(&a));
    second_monitor(&mut spec, &isos.path().join("mon2.sock"));
    (isos, spec)
}

/// The steps of a change from one medium to another, in order, with the occurrence to fail.
const CHANGE_STEPS: &[(&str, usize)] = &[
    ("blockdev-open-tray", 1),
    ("blockdev-remove-medium", 1),
    ("add-fd", 1),
    ("blockdev-add", 1),
    ("blockdev-add", 2),
    ("blockdev-insert-medium", 1),
    ("blockdev-close-tray", 1),
];

#[test]
fn a_failure_at_each_step_of_a_medium_change_leaves_the_drive_as_it_was() {
    qhotplug_tests::serial_test(async {
        let (isos, spec) = ide_cd_with_a_second_monitor();
        let (a, b, mon2) = (
            isos.path().join("a.iso"),
            isos.path().join("b.iso"),
            isos.path().join("mon2.sock"),
        );
        let t = TestVm::running(spec).await;
        for &(step, nth) in CHANGE_STEPS {
            let b = b.clone();
            let (vm, _proxy) = assert_rolls_back(&t, &mon2, step, nth, |vm| async move {
                vm.insert_medium("cd", &b).await
            })
            .await;
            assert_eq!(medium(&t.vm, "cd").await.as_deref(), Some("cd-fmt"));
            // The SDK's view did not move either.
            assert_eq!(vm.cdroms()[0].medium, Some(Medium::Image(a.clone())));
        }
        // The same change, without a fault, goes through.
        t.vm.insert_medium("cd", &b).await.unwrap();
        assert_eq!(medium(&t.vm, "cd").await.as_deref(), Some("cd-fmt.1"));
    });
}

/// The steps of a change to a medium on RBD with a key, on a VM attached to (no master key yet).
const NETWORK_CHANGE_STEPS: &[(&str, usize)] = &[
    ("blockdev-open-tray", 1),
    ("blockdev-remove-medium", 1),
    ("add-fd", 1),
    ("object-add", 1),
    ("remove-fd", 1),
    ("object-add", 2),
    ("blockdev-add", 1),
    ("blockdev-add", 2),
    ("blockdev-insert-medium", 1),
    ("blockdev-close-tray", 1),
];

#[test]
fn a_failure_at_each_step_of_a_change_to_a_network_medium_leaves_the_drive_as_it_was() {
    qhotplug_tests::serial_test(async {
        let (isos, spec) = ide_cd_with_a_second_monitor();
        let (a, b, mon2) = (
            isos.path().join("a.iso"),
            isos.path().join("b.iso"),
            isos.path().join("mon2.sock"),
        );
        let ceph = CephCluster::start(&isos.path().join("ceph"));
        ceph.import_image("b-iso", &b);
        let on_rbd = NetworkSource::from(ceph.source("b-iso"));
        let t = TestVm::running(spec).await;
        for &(step, nth) in NETWORK_CHANGE_STEPS {
            let on_rbd = on_rbd.clone();
            let (vm, _proxy) = assert_rolls_back(&t, &mon2, step, nth, |vm| async move {
                vm.insert_medium("cd", on_rbd).await
            })
            .await;
            assert_eq!(medium(&t.vm, "cd").await.as_deref(), Some("cd-fmt"));
            assert_eq!(vm.cdroms()[0].medium, Some(Medium::Image(a.clone())));
        }
        // Without a fault it goes through, and back to a file the RBD medium's secret goes.
        t.vm.insert_medium("cd", on_rbd).await.unwrap();
        assert_eq!(medium(&t.vm, "cd").await.as_deref(), Some("cd-fmt.1"));
        assert!(t
            .snapshot()
            .await
            .objects
            .contains(&"cd-secret.1".to_owned()));
        t.vm.insert_medium("cd", &a).await.unwrap();
        let objects = t.snapshot().await.objects;
        assert!(!objects.iter().any(|o| o.starts_with("cd-")), "{objects:?}");
    });
}

#[test]
fn an_unforced_change_of_an_open_tray_still_closes_it() {
    qhotplug_tests::serial_test(async {
        let isos = tempfile::tempdir().unwrap();
        let a = iso(isos.path(), "a.iso", "f", "a\n");
        let mut spec = pc_spec();
        spec.cdroms.push(Cdrom::ide("cd", IdeAddr::new(0, 1)));
        // Paused: the firmware, running, probes the drive and may move its tray meanwhile.
        let t = TestVm::launch(spec).await;
        t.vm.client()
            .execute(&qhotplug_qmp::command::BlockdevOpenTray {
                id: "cd".into(),
                force: None,
            })
            .await
            .unwrap();
        t.vm.change_medium("cd", Some(a.into()), MediumOptions::default())
            .await
            .unwrap();
        assert_eq!(medium(&t.vm, "cd").await.as_deref(), Some("cd-fmt.1"));
    });
}

const HOT_ADD_STEPS: &[(&str, usize)] = &[
    ("add-fd", 1),
    ("blockdev-add", 1),
    ("blockdev-add", 2),
    ("device_add", 1),
];

#[test]
fn a_failure_at_each_step_of_a_scsi_cd_hot_add_leaves_qemu_as_it_was() {
    qhotplug_tests::serial_test(async {
        let isos = tempfile::tempdir().unwrap();
        let a = iso(isos.path(), "a.iso", "hello.txt", "from a\n");
        let mon2 = isos.path().join("mon2.sock");
        let mut spec = pc_spec();
        second_monitor(&mut spec, &mon2);
        let t = TestVm::running(spec).await;
        for &(step, nth) in HOT_ADD_STEPS {
            let a = a.clone();
            let (vm, _proxy) = assert_rolls_back(&t, &mon2, step, nth, |vm| async move {
                vm.add_cdrom(CdromConfig::new("cd9").medium(&a)).await
            })
            .await;
            assert!(vm.cdroms().is_empty());
        }
    });
}

#[test]
fn an_ide_cd_root_boots_first_and_reconcile_deletes_a_stale_medium_node_and_secret() {
    qhotplug_tests::serial_test(async {
        let isos = tempfile::tempdir().unwrap();
        let a = iso(isos.path(), "a.iso", "hello.txt", "from a\n");
        let mut spec = pc_spec();
        let mut root = Cdrom::ide("root", IdeAddr::new(0, 0)).with_medium(&a);
        root.boot = true;
        spec.cdroms.push(root);
        let t = TestVm::running(spec).await;
        let bootindex = t
            .vm
            .client()
            .execute_raw(
                "qom-get",
                &serde_json::json!({"path": "/machine/peripheral/root", "property": "bootindex"}),
            )
            .await
            .unwrap();
        assert_eq!(bootindex, 0);
        // A node of an earlier medium, left behind (as a change whose last delete failed would).
        t.vm.client()
            .execute_raw(
                "blockdev-add",
                &serde_json::json!({"driver": "null-co", "node-name": "root-fmt.7"}),
            )
            .await
            .unwrap();
        // And an earlier network medium's secret; an object of another name stays.
        for id in ["root-secret.6", "not-roots"] {
            t.vm.client()
                .execute_raw(
                    "object-add",
                    &serde_json::json!({"qom-type": "secret", "id": id, "data": "x"}),
                )
                .await
                .unwrap();
        }
        let report = t.vm.reconcile().await.unwrap();
        assert_eq!(report.nodes_deleted, ["root-fmt.7"]);
        assert_eq!(report.objects_deleted, ["root-secret.6"]);
        assert_eq!(block_nodes(&t.vm).await, ["root-file", "root-fmt"]);
        let objects = t.snapshot().await.objects;
        assert!(objects.contains(&"not-roots".to_owned()), "{objects:?}");
    });
}

#[test]
fn a_tray_the_guest_closes_during_a_change_is_opened_again() {
    qhotplug_tests::serial_test(async {
        use tracing_subscriber::layer::SubscriberExt;
        let (isos, spec) = ide_cd_with_a_second_monitor();
        let (b, mon2) = (isos.path().join("b.iso"), isos.path().join("mon2.sock"));
        // Paused, so nothing but this test moves the tray.
        let t = TestVm::launch(spec).await;
        // Steps: open-tray, remove-medium, add-fd, blockdev-add ×2, insert-medium (5).
        let raw = std::sync::Mutex::new(qhotplug_tests::raw::RawMonitor::connect(&mon2));
        let hook = qhotplug_tests::timing::AtStep::new(5, move || {
            // What a guest (or its firmware) does: close the tray, here just before the insert.
            let close =
                serde_json::json!({"execute": "blockdev-close-tray", "arguments": {"id": "cd"}});
            raw.lock().unwrap().call(&close, None);
        });
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(hook.clone()));
        t.vm.insert_medium("cd", &b).await.unwrap();
        assert_eq!(hook.fired_at().as_deref(), Some("blockdev-insert-medium"));
        assert_eq!(medium(&t.vm, "cd").await.as_deref(), Some("cd-fmt.1"));
        assert_eq!(block_nodes(&t.vm).await, ["cd-file.1", "cd-fmt.1"]);
    });
}
