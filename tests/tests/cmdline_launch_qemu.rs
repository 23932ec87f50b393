//! Launching real QEMU from a spec, and checking that what runs is what the spec says.

use std::os::fd::AsFd;

use qhotplug_cmdline::*;
use qhotplug_netdev::{MacAddr, TapBuilder};
use qhotplug_qmp::command::{QomList, QueryBlock, QueryPci};

fn image(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

#[tokio::test]
async fn two_disks_and_a_two_queue_nic_on_a_real_tap_run_where_the_spec_says() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = VmSpec::new("launch-test", Machine::Pc);
    spec.paused = true;
    spec.scsi_controllers.push(ScsiController {
        id: "scsi0".into(),
        pci: Pci::new("pci.0", 5),
    });
    spec.disks.push(Disk::virtio_blk(
        "disk-a",
        image(dir.path(), "a.img"),
        Pci::new("pci.0", 9),
    ));
    spec.disks.push(Disk {
        read_only: true,
        ..Disk::scsi_hd(
            "disk-b",
            image(dir.path(), "b.img"),
            ScsiAddr {
                bus: "scsi0.0".into(),
                channel: 0,
                scsi_id: 2,
                lun: 0,
            },
        )
    });
    let mac = MacAddr::random_qemu();
    spec.nics.push(Nic {
        id: "nic-a".into(),
        mac,
        queues: 2,
        pci: Pci::new("pci.0", 0x10),
        vhost: false,
        link_up: true,
    });
    let tap = TapBuilder::new("qhl%d").queues(2).create().unwrap();
    let tap_name = tap.name().to_owned();

    // A marker fd of ours, deliberately without close-on-exec: it must not reach QEMU.
    let marker = tempfile::NamedTempFile::new().unwrap();
    let marker_fd = std::fs::File::open(marker.path()).unwrap();
    qhotplug_tests::clear_cloexec(marker_fd.as_fd()).unwrap();

    let (client, qemu) = Launcher::new(spec, dir.path().join("run"))
        .nic_fds("nic-a", tap.into_queues(), vec![])
        .launch()
        .await
        .unwrap();

    let pci = client.execute(&QueryPci).await.unwrap();
    let at = |id: &str| {
        pci[0]
            .devices
            .iter()
            .find(|d| d.qdev_id == id)
            .map(|d| d.slot)
    };
    assert_eq!(at("disk-a"), Some(9));
    assert_eq!(at("scsi0"), Some(5));
    assert_eq!(at("nic-a"), Some(0x10));

    let block = client.execute(&QueryBlock).await.unwrap();
    let b = block
        .iter()
        .find(|b| b.qdev.as_deref().is_some_and(|q| q.contains("disk-b")))
        .unwrap();
    let inserted = b.inserted.as_ref().unwrap();
    assert!(inserted.ro, "disk-b is read-only");
    assert_eq!(inserted.node_name.as_deref(), Some("disk-b-fmt"));
    let a = block
        .iter()
        .find(|b| b.qdev.as_deref().is_some_and(|q| q.contains("disk-a")))
        .unwrap();
    assert!(a.inserted.as_ref().unwrap().file.ends_with("a.img"));

    let peripherals = client
        .execute(&QomList {
            path: "/machine/peripheral".into(),
        })
        .await
        .unwrap();
    let kinds: Vec<(String, String)> = peripherals
        .iter()
        .filter_map(|p| Some((p.name.clone(), p.child_type()?.to_owned())))
        .collect();
    for (id, kind) in [
        ("disk-a", "virtio-blk-pci"),
        ("disk-b", "scsi-hd"),
        ("nic-a", "virtio-net-pci"),
        ("scsi0", "virtio-scsi-pci"),
    ] {
        assert!(
            kinds.contains(&(id.to_owned(), kind.to_owned())),
            "{id}: {kinds:?}"
        );
    }
    let mac_prop = client
        .execute_raw(
            "qom-get",
            &serde_json::json!({"path": "/machine/peripheral/nic-a", "property": "mac"}),
        )
        .await
        .unwrap();
    assert_eq!(mac_prop, mac.to_string());

    // QEMU's fds: the tap's two queues are there (as /dev/net/tun), our marker file is not.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", qemu.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        fds.iter().filter(|t| *t == "/dev/net/tun").count(),
        2,
        "{fds:?}"
    );
    assert!(
        !fds.iter().any(|t| t == &marker.path().to_string_lossy()),
        "our fd leaked into QEMU: {fds:?}"
    );
    drop(marker_fd);

    // The tap lives as long as QEMU holds it.
    assert!(std::path::Path::new("/sys/class/net")
        .join(&tap_name)
        .exists());
    drop(client);
    // Dropping the guard kills QEMU at once and reaps it in the background (no blocking wait on a
    // runtime thread): its exit, then its reaping, follow within moments.
    let pid = qemu.pid();
    drop(qemu);
    assert!(
        qhotplug_tests::exited(pid, std::time::Duration::from_secs(5))
            .await
            .unwrap(),
        "QEMU exited"
    );
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(&tap_name)
            .exists(),
        "QEMU's tap went with it"
    );
    let proc_entry = std::path::PathBuf::from(format!("/proc/{pid}"));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while proc_entry.exists() && tokio::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert!(!proc_entry.exists(), "QEMU was reaped, not left a zombie");
}

#[tokio::test]
async fn a_comma_in_a_path_opens_exactly_that_file_and_injects_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("a,file=");
    std::fs::create_dir_all(&sub).unwrap();
    let tricky = image(&sub, "x.img");
    assert!(tricky.to_string_lossy().contains(",file="));
    let mut spec = VmSpec::new("comma,name", Machine::Pc);
    spec.paused = true;
    spec.disks
        .push(Disk::virtio_blk("disk-c", &tricky, Pci::new("pci.0", 6)));
    let (client, _qemu) = Launcher::new(spec, dir.path().join("run"))
        .launch()
        .await
        .unwrap();
    let block = client.execute(&QueryBlock).await.unwrap();
    let files: Vec<String> = block
        .iter()
        .filter_map(|b| Some(b.inserted.as_ref()?.file.clone()))
        .collect();
    assert_eq!(files, vec![tricky.to_string_lossy().into_owned()]);
}

#[tokio::test]
async fn an_invalid_spec_is_a_typed_error_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = VmSpec::new("bad", Machine::Pc);
    spec.disks.push(Disk::virtio_blk(
        "1disk",
        "/nonexistent",
        Pci::new("pci.0", 6),
    ));
    let err = Launcher::new(spec.clone(), dir.path())
        .launch()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidId { .. }), "{err}");

    spec.disks[0].id = "disk-1".into();
    spec.disks.push(Disk::virtio_blk(
        "disk-2",
        "/nonexistent",
        Pci::new("pci.0", 6),
    ));
    let err = Launcher::new(spec, dir.path()).launch().await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidSpec(ref m) if m.contains("PCI address taken")),
        "{err}"
    );
    assert!(!dir.path().join("qmp.sock").exists(), "nothing was started");
}

#[tokio::test]
async fn qemu_failing_at_start_up_reports_its_own_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = VmSpec::new("fails", Machine::Pc);
    spec.extra_args = vec!["-device".into(), "virtio-blk-pci,no-such-property=1".into()];
    let err = Launcher::new(spec, dir.path()).launch().await.unwrap_err();
    match err {
        Error::Exited { stderr, .. } => assert!(stderr.contains("no-such-property"), "{stderr}"),
        other => panic!("expected QEMU's exit, got {other}"),
    }
}

#[tokio::test]
async fn the_monitor_can_be_a_path_qemu_binds_or_a_listener_the_caller_bound() {
    use qhotplug_qmp::command::QueryStatus;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = VmSpec::new("monitor-test", Machine::Pc);
    spec.paused = true;

    // QEMU binds the path itself; a comma in it is escaped, not an option separator.
    let path = dir.path().join("mon,itor.sock");
    let (client, qemu) = Launcher::new(spec.clone(), dir.path().join("a"))
        .monitor(Monitor::Path(path.clone()))
        .launch()
        .await
        .unwrap();
    assert!(!client.execute(&QueryStatus).await.unwrap().running);
    assert_eq!(qemu.qmp_path(), path);
    assert!(std::fs::metadata(&path).is_ok());

    // A listener bound by the caller, somewhere else.
    let bound = dir.path().join("mine.sock");
    let listener = std::os::unix::net::UnixListener::bind(&bound).unwrap();
    let (client, qemu) = Launcher::new(spec.clone(), dir.path().join("b"))
        .monitor(Monitor::Listener(listener))
        .launch()
        .await
        .unwrap();
    assert!(!client.execute(&QueryStatus).await.unwrap().running);
    assert_eq!(qemu.qmp_path(), bound);
    assert!(!dir.path().join("b/qmp.sock").exists());

    // A listener with no path (abstract) cannot be connected to by path: a typed error before
    // QEMU starts.
    use std::os::linux::net::SocketAddrExt;
    let name = format!("qhotplug-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let abstract_listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    match Launcher::new(spec, dir.path().join("c"))
        .monitor(Monitor::Listener(abstract_listener))
        .launch()
        .await
    {
        Err(Error::InvalidSpec(msg)) => assert!(msg.contains("no path"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

/// A spec that leaves addresses to the SDK launches: each device gets a free place (on q35 an
/// empty root port first), the spec returned says which, and QEMU has them there.
#[tokio::test]
async fn addresses_left_to_the_sdk_are_given_at_launch_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    for machine in [Machine::Pc, Machine::Q35] {
        let mut spec = VmSpec::new("auto", machine);
        spec.paused = true;
        if machine == Machine::Q35 {
            spec.root_ports.push(RootPort {
                id: "rp0".into(),
                chassis: 1,
                pci: Pci::new("pcie.0", 4),
            });
        }
        spec.scsi_controllers.push(ScsiController {
            id: "scsi0".into(),
            pci: Pci::auto(),
        });
        spec.disks.push(Disk::virtio_blk(
            "va",
            image(dir.path(), &format!("va-{machine:?}.img")),
            Pci::auto(),
        ));
        spec.disks.push(Disk::scsi_hd(
            "sa",
            image(dir.path(), &format!("sa-{machine:?}.img")),
            ScsiAddr::auto(),
        ));
        let vm = qhotplug::Vm::launch(Launcher::new(spec, dir.path().join(format!("{machine:?}"))))
            .await
            .unwrap();
        let now = vm.spec();
        let va = match &now.disks[0].frontend {
            DiskFrontend::VirtioBlk(pci) => pci.clone(),
            other => panic!("{other:?}"),
        };
        let (controller, va_want) = match machine {
            Machine::Pc => (Pci::new("pci.0", 2), Pci::new("pci.0", 3)),
            Machine::Q35 => (Pci::new("rp0", 0), Pci::new("pcie.0", 1)),
        };
        assert_eq!(now.scsi_controllers[0].pci, controller);
        assert_eq!(va, va_want);
        assert_eq!(
            now.disks[1].frontend,
            DiskFrontend::ScsiHd(ScsiAddr {
                bus: "scsi0.0".into(),
                channel: 0,
                scsi_id: 0,
                lun: 0
            })
        );
        // QEMU put them there: each device's QOM parent bus and address.
        for (id, at) in [("scsi0", &controller), ("va", &va)] {
            let path = format!("/machine/peripheral/{id}");
            let get = |property: &str| qhotplug_qmp::command::QomGet {
                path: path.clone(),
                property: property.into(),
            };
            let bus = vm.client().execute(&get("parent_bus")).await.unwrap();
            let addr = vm.client().execute(&get("addr")).await.unwrap();
            assert!(bus.as_str().unwrap().ends_with(&at.bus), "{id}: {bus}");
            assert_eq!(addr.as_u64(), Some(u64::from(at.slot) * 8), "{id}");
        }
        vm.quit().await.unwrap();
    }
}
