//! Network disks against real QEMU and real servers, no guest: a failure at each step of a
//! network disk's hot-add (iSCSI with CHAP, RBD with a key, NBD over TLS) rolls back (through the fault proxy, on a VM attached to, whose
//! master key is made in that same transaction), and bad input (an unreachable server, a wrong
//! export name or LUN, a server that hangs up during the handshake, a wrong password; on a real
//! Ceph cluster, a monitor that does not answer, an image that does not exist, a wrong key) is a
//! typed error that leaves QEMU and our fd table as they were.

use std::time::Duration;

use qhotplug::{CephMonitor, DiskConfig, DiskModel, NetworkSource, Rbd};
use qhotplug_tests::ceph::CephCluster;
use qhotplug_tests::servers::{free_port, IscsiTarget, Listen, NbdExport};
use qhotplug_tests::{assert_rolls_back, pc_spec, second_monitor, TestVm};

/// A sequence's steps, each with the occurrence of its command to fail.
type Steps = &'static [(&'static str, usize)];

/// The steps of a hot-add of a network disk with a secret (iSCSI with CHAP, RBD with a key) on a
/// VM attached to (no master key yet), in order.
const SECRET_STEPS: Steps = &[
    ("add-fd", 1),
    ("object-add", 1),
    ("remove-fd", 1),
    ("object-add", 2),
    ("blockdev-add", 1),
    ("blockdev-add", 2),
    ("device_add", 1),
];

/// The steps of a hot-add of an NBD disk over TLS: its credentials object, its nodes, its device.
const TLS_STEPS: Steps = &[
    ("object-add", 1),
    ("blockdev-add", 1),
    ("blockdev-add", 2),
    ("device_add", 1),
];

#[test]
fn a_failure_at_each_step_of_a_network_disk_hot_add_leaves_qemu_as_it_was() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let mon2 = dir.path().join("mon2.sock");
        let mut spec = pc_spec();
        second_monitor(&mut spec, &mon2);
        let t = TestVm::running(spec).await;
        let lun = t.image("lun.raw", 8);
        let chap = ("qhotplug", "rollback-Password-1");
        let target = IscsiTarget::start(&lun, Some(chap));
        let ceph = CephCluster::start(&dir.path().join("ceph"));
        ceph.create_image("rolled", 8);
        let export = t.image("export.raw", 8);
        let (server_tls, client_tls) = qhotplug_tests::servers::x509(dir.path());
        let nbd = NbdExport::start_tls(&export, "tls", Listen::Tcp(free_port()), Some(&server_tls));
        let mut over_tls = nbd.source();
        over_tls.tls_dir = Some(client_tls);
        let cases: Vec<(&str, NetworkSource, Steps)> = vec![
            (
                "iSCSI with CHAP",
                target.source(Some(chap)).into(),
                SECRET_STEPS,
            ),
            ("RBD with a key", ceph.source("rolled").into(), SECRET_STEPS),
            ("NBD over TLS", over_tls.into(), TLS_STEPS),
        ];
        for (what, source, steps) in cases {
            for &(step, nth) in steps {
                let source = source.clone();
                let (vm, _proxy) = assert_rolls_back(&t, &mon2, step, nth, |vm| async move {
                    let config = DiskConfig::network("net1", source, DiskModel::ScsiHd);
                    vm.add_disk(config).await
                })
                .await;
                assert!(vm.disks().is_empty(), "{what}: {step} #{nth}");
            }
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
            // QEMU may close the failed connection's socket a moment after its answer.
            t.assert_settles_to(&before, what).await;
            assert!(t.vm.disks().is_empty());
        }
    });
}

#[test]
fn rbd_options_are_qemus_and_bad_rbd_disks_on_a_real_ceph_cluster_are_typed_errors_that_leave_nothing(
) {
    qhotplug_tests::serial_test(async {
        let t = TestVm::running(pc_spec()).await;
        let ceph = CephCluster::start(&t.dir().join("ceph"));
        ceph.create_image("exists", 8);
        let before = t.snapshot().await;
        let good = ceph.source("exists");
        let key = ceph.admin_key();

        // Every option the SDK renders is one QEMU's schema has for blockdev-add.
        let mut full = good.clone();
        full.namespace = Some("tenant-a".into());
        full.snapshot = Some("snap".into());
        full.conf = Some(t.dir().join("ceph.conf"));
        let disk = qhotplug::Disk::on_network(
            "rbd1",
            full,
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

        // A key that is not Ceph's base64 is refused before anything is sent, showing none of it.
        let mut garbled = good.clone();
        garbled.key = Some(qhotplug::Secret::new("not-base64-Garbled!"));
        let refused =
            t.vm.add_disk(DiskConfig::network("bad", garbled, DiskModel::VirtioBlk))
                .await
                .unwrap_err();
        assert!(refused.nothing_sent(), "{refused:?}");
        assert!(!chain(&refused).contains("Garbled"));

        // A monitor nobody serves, an image that does not exist, a key the cluster does not know.
        // librados retries a monitor or a key it cannot use for `client_mount_timeout` (300 s
        // by default, QEMU's monitor blocked meanwhile): a ceph.conf makes it 2 s.
        let conf = t.dir().join("give-up.conf");
        std::fs::write(&conf, "[global]\nclient_mount_timeout = 2\n").unwrap();
        let mut no_monitor = good.clone();
        no_monitor.monitors = vec![CephMonitor {
            host: "127.0.0.1".into(),
            port: free_port(),
        }];
        no_monitor.conf = Some(conf.clone());
        let mut no_image = good.clone();
        no_image.image = "does-not-exist".into();
        let mut wrong_key = good.clone();
        wrong_key.key = Some(qhotplug::Secret::new(ceph.new_key()));
        wrong_key.conf = Some(conf);
        let cases: Vec<(&str, Rbd, &str)> = vec![
            ("no monitor", no_monitor, ""),
            ("an image that does not exist", no_image, "No such file"),
            ("a wrong key", wrong_key, ""),
        ];
        for (what, source, says) in cases {
            let config = DiskConfig::network("bad", source, DiskModel::VirtioBlk);
            let refused = tokio::time::timeout(Duration::from_secs(60), t.vm.add_disk(config))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer in 60 s"))
                .unwrap_err();
            let said = format!("{} {refused:?}", chain(&refused));
            qhotplug_tests::assert_failed_at(&refused, "blockdev-add");
            assert!(said.contains(says), "{what}: {said}");
            assert!(!said.contains(&key), "{what}: {said}");
            // QEMU may close the failed connection's socket a moment after its answer.
            t.assert_settles_to(&before, what).await;
        }
        // And the right one opens (on SCSI, whose unplug needs no guest).
        t.vm.add_disk(DiskConfig::network("rbd1", good, DiskModel::ScsiHd))
            .await
            .unwrap();
        t.vm.remove_disk("rbd1").await.unwrap();
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
