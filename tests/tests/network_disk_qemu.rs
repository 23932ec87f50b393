//! Network disks against real QEMU and real servers, no guest: a failure at each step of a
//! network disk's hot-add rolls back (through the fault proxy, on a VM attached to, whose
//! master key is made in that same transaction), and bad input (an unreachable server, a wrong
//! export name or LUN, a server that hangs up during the handshake, a wrong password, a Ceph
//! monitor that does not answer) is a typed error that leaves QEMU and our fd table as they were.

use std::time::Duration;

use qhotplug::{CephMonitor, DiskConfig, DiskModel, NetworkSource, Rbd};
use qhotplug_tests::servers::{free_port, IscsiTarget, Listen, NbdExport};
use qhotplug_tests::{assert_rolls_back, pc_spec, second_monitor, TestVm};

/// The steps of an iSCSI-with-CHAP hot-add on a VM attached to (no master key yet), in order.
const CHAP_STEPS: &[(&str, usize)] = &[
    ("add-fd", 1),
    ("object-add", 1),
    ("remove-fd", 1),
    ("object-add", 2),
    ("blockdev-add", 1),
    ("blockdev-add", 2),
    ("device_add", 1),
];

#[test]
fn a_failure_at_each_step_of_a_chap_iscsi_hot_add_leaves_qemu_as_it_was() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let mon2 = dir.path().join("mon2.sock");
        let mut spec = pc_spec();
        second_monitor(&mut spec, &mon2);
        let t = TestVm::running(spec).await;
        let lun = t.image("lun.raw", 8);
        let chap = ("qhotplug", "rollback-Password-1");
        let target = IscsiTarget::start(&lun, Some(chap));
        for &(step, nth) in CHAP_STEPS {
            let source: NetworkSource = target.source(Some(chap)).into();
            let (vm, _proxy) = assert_rolls_back(&t, &mon2, step, nth, |vm| async move {
                let config = DiskConfig::network("lun1", source, DiskModel::ScsiHd);
                vm.add_disk(config).await
            })
            .await;
            assert!(vm.disks().is_empty(), "{step} #{nth}");
        }
        // And without a fault, through the same kind of attached VM: it works, and the master
        // key it made stays while the disk goes.
        let client = qhotplug_qmp::connect(&mon2).await.unwrap();
        let vm = qhotplug::Vm::attach(client, t.vm.spec()).await.unwrap();
        let config = DiskConfig::network("lun1", target.source(Some(chap)), DiskModel::ScsiHd);
        vm.add_disk(config).await.unwrap();
        let objects = t.snapshot().await.objects;
        assert!(objects.iter().any(|o| o == "lun1-secret"), "{objects:?}");
        assert!(
            objects.iter().any(|o| o.starts_with("qhotplug-key-")),
            "{objects:?}"
        );
    });
}

#[test]
fn bad_network_disks_are_typed_errors_that_leave_nothing_behind() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running(pc_spec()).await;
        let file = t.image("export.raw", 8);
        let nbd = NbdExport::start(&file, "right", Listen::Tcp(free_port()));
        let lun = t.image("lun.raw", 8);
        let chap = ("qhotplug", "the-Right-password");
        let iscsi = IscsiTarget::start(&lun, Some(chap));
        // A server that accepts and hangs up at once, during the handshake.
        let rude = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let rude_port = rude.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in rude.incoming() {
                drop(stream);
            }
        });
        let closed = free_port();
        // QEMU and our fd table with the servers up (the listener above is one of our fds).
        let before = t.snapshot().await;

        let mut wrong_export = nbd.source();
        wrong_export.export = Some("wrong".into());
        let mut unreachable_nbd = nbd.source();
        unreachable_nbd.server = qhotplug::NbdServer::Tcp {
            host: "127.0.0.1".into(),
            port: closed,
        };
        let mut hangs_up = nbd.source();
        hangs_up.server = qhotplug::NbdServer::Tcp {
            host: "127.0.0.1".into(),
            port: rude_port,
        };
        let mut unreachable_portal = iscsi.source(Some(chap));
        unreachable_portal.portal = format!("127.0.0.1:{closed}");
        let mut wrong_lun = iscsi.source(Some(chap));
        wrong_lun.lun = 7;
        let wrong_password = iscsi.source(Some(("qhotplug", "not-the-password")));
        let cases: Vec<(&str, NetworkSource, &str)> = vec![
            (
                "an unreachable NBD server",
                unreachable_nbd.into(),
                "Connection refused",
            ),
            ("a wrong export name", wrong_export.into(), "export"),
            ("a server that hangs up", hangs_up.into(), ""),
            ("an unreachable portal", unreachable_portal.into(), ""),
            ("a wrong LUN", wrong_lun.into(), ""),
            (
                "a wrong password",
                wrong_password.into(),
                "Authentication failure",
            ),
        ];
        for (what, source, says) in cases {
            let config = DiskConfig::network("bad", source, DiskModel::VirtioBlk);
            let refused = tokio::time::timeout(Duration::from_secs(60), t.vm.add_disk(config))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer in 60 s"))
                .unwrap_err();
            let said = chain(&refused);
            qhotplug_tests::assert_failed_at(&refused, "blockdev-add");
            assert!(said.contains(says), "{what}: {said}");
            assert!(!said.contains("Right-password") && !said.contains("not-the-password"));
            assert_eq!(t.snapshot().await, before, "{what}");
            assert!(t.vm.disks().is_empty());
        }
    });
}

#[test]
fn an_rbd_disk_renders_against_both_qemus_and_no_monitor_is_a_typed_error_that_leaves_nothing() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running(pc_spec()).await;
        let before = t.snapshot().await;
        // A monitor nobody serves, and a ceph.conf that gives up on it in 2 s.
        let conf = t.dir().join("ceph.conf");
        std::fs::write(
            &conf,
            "[global]\nclient_mount_timeout = 2\nauth_client_required = cephx\n",
        )
        .unwrap();
        let rbd = Rbd {
            pool: "rbd".into(),
            image: "vm1-data".into(),
            namespace: Some("tenant-a".into()),
            snapshot: None,
            monitors: vec![CephMonitor {
                host: "127.0.0.1".into(),
                port: free_port(),
            }],
            user: Some("qhotplug".into()),
            conf: Some(conf),
            key: Some(qhotplug::Secret::new("AQBrbd-Key-Not-Real==")),
        };
        // Every option the SDK renders is one QEMU's schema has for blockdev-add.
        let disk = qhotplug::Disk::on_network(
            "rbd1",
            rbd.clone(),
            qhotplug::DiskFrontend::VirtioBlk(qhotplug::Pci::new("pci.0", 9)),
        );
        let schema = t.vm.client().schema().await.unwrap();
        let protocol = &disk.blockdev_add("")[0];
        for key in protocol.props.keys() {
            assert!(
                schema.command_takes("blockdev-add", key),
                "rbd option {key}"
            );
        }
        assert!(schema
            .arg_values("blockdev-add", "driver")
            .unwrap()
            .contains(&"rbd"));
        let config = DiskConfig::network("rbd1", rbd, DiskModel::VirtioBlk);
        let refused = tokio::time::timeout(Duration::from_secs(60), t.vm.add_disk(config))
            .await
            .expect("librbd gives up")
            .unwrap_err();
        qhotplug_tests::assert_failed_at(&refused, "blockdev-add");
        assert!(!format!("{} {refused:?}", chain(&refused)).contains("Key-Not-Real"));
        assert_eq!(t.snapshot().await, before);
    });
}

/// An error with every cause under it, as a log line would show them.
fn chain(error: &dyn std::error::Error) -> String {
    let mut said = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        said.push_str(": ");
        said.push_str(&e.to_string());
        cause = e.source();
    }
    said
}
