//! A process that kept no spec attaches to a running QEMU and reads the VM from QEMU alone
//! (`Vm::attach_without_spec`): a VM launched with a disk, a serial console, VNC and a USB tablet,
//! then changed through the SDK (every kind hot-added, I/O limits, a snapshot, a backup's
//! checkpoint, a vCPU), is read back through a second monitor, and the spec read is compared
//! with the launching handle's field by field. What QEMU cannot tell comes back typed. Network
//! disks and media (NBD, over TLS, iSCSI with CHAP, RBD with a key) are read back with their
//! secrets as references to resolve, and the handle that read them removes them whole.

use std::path::Path;

use qhotplug::{
    BackupConfig, BalloonConfig, CdromConfig, CpuTopology, Desired, DiskConfig, DiskModel, Format,
    IoLimits, Machine, MediumOptions, MemoryBackend, MemoryConfig, NetworkSource, NicConfig,
    OnError, Pci, RngConfig, Secret, Serial, SerialPortConfig, SnapshotConfig, StorageDaemon,
    Unreadable, VhostUserBlkConfig, VirtioFsConfig, VirtioSerialConfig, Vm, VmSpec, Vnc, VncListen,
    MIB,
};
use qhotplug_cmdline::{Disk, DiskFrontend, ErrorPolicy};
use qhotplug_netdev::TapBuilder;
use qhotplug_qmp::command::{FdsetInfo, QueryFdsets};
use qhotplug_tests::ceph::CephCluster;
use qhotplug_tests::servers::{free_port, vhost_user_backends, IscsiTarget, Listen, NbdExport};
use qhotplug_tests::storage::new_qcow2;
use qhotplug_tests::{image, iso, pc_spec, q35_spec, second_monitor, TestVm};

const DONE: std::time::Duration = std::time::Duration::from_secs(60);

/// A spec using what can be set only at launch: shared boot memory, memory and vCPU hotplug, a
/// disk with a chain and an error policy, a serial console, VNC, the USB tablet, a second
/// monitor at `dir/mon2.sock`.
fn launch_spec(machine: Machine, dir: &Path) -> VmSpec {
    let mut spec = match machine {
        Machine::Pc => pc_spec(),
        Machine::Q35 => q35_spec(8),
    };
    spec.memory_mib = 256;
    spec.memory_backend = Some(MemoryBackend::shared_memfd("ram", 256 * MIB));
    spec.memory_slots = 2;
    spec.max_memory_mib = Some(1024);
    spec.cpu_topology = Some(CpuTopology {
        max: 2,
        sockets: 1,
        cores: 2,
        threads: 1,
    });
    spec.serials = vec![Serial::Socket(dir.join("console.sock"))];
    spec.vnc = Some(Vnc {
        listen: VncListen::Unix(dir.join("vnc.sock")),
        password: None,
    });
    spec.usb_tablet = true;
    let base = new_qcow2(dir.join("boot-base.qcow2"), Some(16), None);
    let top = new_qcow2(dir.join("boot.qcow2"), None, Some((&base, "qcow2")));
    let mut disk = Disk::new(
        "boot0",
        &top,
        DiskFrontend::VirtioBlk(Pci::new(spec.machine.root_bus(), 12)),
    );
    disk.format = Format::Qcow2;
    disk.generation = 1;
    disk.backing = vec![qhotplug_cmdline::DiskLayer {
        path: base,
        format: Format::Qcow2,
        generation: 0,
        checkpoints: Vec::new(),
    }];
    disk.on_error = ErrorPolicy {
        read: OnError::Report,
        write: OnError::Stop,
    };
    spec.disks.push(disk);
    second_monitor(&mut spec, &dir.join("mon2.sock"));
    spec
}

/// Every kind the SDK plugs, hot-added, and the live changes and storage operations that show
/// in a spec.
async fn change_everything(t: &TestVm, dir: &Path) -> (StorageDaemon, qhotplug::QemuProcess) {
    let vm = &t.vm;
    let (qsd, fsd) = vhost_user_backends(dir).await;
    vm.add_disk(DiskConfig::virtio_blk("d1", image(dir, "d1.raw", 8)))
        .await
        .unwrap();
    vm.set_io_limits(
        "d1",
        IoLimits {
            bps: 8 * MIB,
            ..IoLimits::default()
        },
    )
    .await
    .unwrap();
    let d2 = new_qcow2(dir.join("d2.qcow2"), Some(16), None);
    vm.add_disk(DiskConfig::scsi_hd("d2", &d2).format(Format::Qcow2))
        .await
        .unwrap();
    vm.backup(
        BackupConfig::full()
            .disk("d2", dir.join("d2-full.qcow2"))
            .checkpoint("c1"),
    )
    .await
    .unwrap()
    .wait(DONE)
    .await
    .unwrap();
    vm.snapshot(SnapshotConfig::new().disk("d2", dir.join("d2-overlay.qcow2")))
        .await
        .unwrap();
    let tap = TapBuilder::new("qhp%d").create().unwrap();
    vm.add_nic(NicConfig::new("n1", tap).no_vhost())
        .await
        .unwrap();
    let disc = iso(dir, "cd.iso", "hello.txt", "hello");
    vm.add_cdrom(CdromConfig::new("cd1").medium(disc.as_path()))
        .await
        .unwrap();
    vm.set_vcpus(2).await.unwrap();
    vm.add_memory(MemoryConfig::dimm("m1", 128 * MIB))
        .await
        .unwrap();
    vm.add_memory(MemoryConfig::virtio_mem("vm1", 256 * MIB, 128 * MIB))
        .await
        .unwrap();
    vm.add_balloon(BalloonConfig::new("b0")).await.unwrap();
    vm.add_virtio_serial(VirtioSerialConfig::new("vser0"))
        .await
        .unwrap();
    vm.add_serial_port(SerialPortConfig::new(
        "p0",
        "vser0",
        "org.example.port",
        dir.join("port.sock"),
    ))
    .await
    .unwrap();
    vm.add_rng(RngConfig::new("rng0")).await.unwrap();
    vm.add_vhost_user_blk(VhostUserBlkConfig::new("vdisk", dir.join("vdisk.sock")).num_queues(1))
        .await
        .unwrap();
    vm.add_virtio_fs(VirtioFsConfig::new("fs0", dir.join("fs.sock"), "share"))
        .await
        .unwrap();
    vm.settle().await;
    (qsd, fsd)
}

/// `spec` as a spec read from QEMU holds it: what only a command line says is off, and lists
/// are ordered by id.
fn as_read(mut spec: VmSpec) -> VmSpec {
    spec.paused = false;
    spec.incoming = false;
    spec.extra_args.clear();
    spec.sort_by_id();
    spec
}

/// Asserts `read` equals `expected` field by field (each field named when one differs), then
/// whole.
fn assert_same(read: &VmSpec, expected: &VmSpec) {
    macro_rules! fields {
        ($($f:ident),*) => {$(
            assert_eq!(read.$f, expected.$f, concat!("the spec read from QEMU: ", stringify!($f)));
        )*};
    }
    fields!(
        name,
        machine,
        accel,
        cpu,
        smp,
        cpu_topology,
        vcpus,
        memory_mib,
        memory_slots,
        max_memory_mib,
        memory_backend,
        memory_devices,
        balloon,
        vhost_user_blks,
        virtio_fs,
        virtio_serials,
        serial_ports,
        rngs,
        kernel,
        initrd,
        append,
        serials,
        vnc,
        usb_tablet,
        paused,
        incoming,
        root_ports,
        scsi_controllers,
        disks,
        nics,
        cdroms,
        extra_args
    );
    assert_eq!(read, expected);
}

fn a_vm_changed_through_the_sdk_is_read_back_whole(machine: Machine) {
    qhotplug_tests::serial_test(async move {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let t = TestVm::running(launch_spec(machine, d)).await;
        let _backends = change_everything(&t, d).await;
        let expected = as_read(t.vm.spec());
        let client = qhotplug_qmp::Config::new()
            .connect(&d.join("mon2.sock"))
            .await
            .unwrap();
        let (read, unreadable) = Vm::attach_without_spec(client).await.unwrap();
        assert_same(&read.spec(), &expected);
        assert_eq!(
            unreadable,
            vec![
                Unreadable::LaunchOptions,
                Unreadable::NicLink {
                    device: "n1".into()
                }
            ]
        );
        // The handle that read it drives the VM: nothing to reconcile, and a disk it never
        // plugged comes out (SCSI: no guest needed) with its chain's nodes and fd sets.
        assert!(read.reconcile().await.unwrap().is_empty());
        read.remove_disk("d2").await.unwrap();
        assert!(!t.vm.has_device("d2").await.unwrap());
        let nodes = qhotplug_tests::storage::block_nodes(&read).await;
        assert!(!nodes.iter().any(|n| n.starts_with("d2-")), "{nodes:?}");
        let sets = read.client().execute(&QueryFdsets).await.unwrap();
        let tagged = |s: &&FdsetInfo| {
            s.fds
                .iter()
                .any(|f| f.opaque.as_deref() == Some("qhotplug:d2"))
        };
        assert_eq!(sets.iter().filter(tagged).count(), 0, "{sets:?}");
        // Every other image the SDK handed over is still in its set: d1's, and the medium's.
        assert_eq!(sets.len(), 2, "{sets:?}");
    });
}

#[test]
fn a_pc_vm_changed_through_the_sdk_is_read_back_whole() {
    a_vm_changed_through_the_sdk_is_read_back_whole(Machine::Pc);
}

#[test]
fn a_q35_vm_changed_through_the_sdk_is_read_back_whole() {
    a_vm_changed_through_the_sdk_is_read_back_whole(Machine::Q35);
}

#[test]
fn network_disks_and_media_are_read_back_with_their_secrets_as_references() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut spec = pc_spec();
        second_monitor(&mut spec, &d.join("mon2.sock"));
        let t = TestVm::running(spec).await;
        let vm = &t.vm;
        let before = t.snapshot().await;
        // An NBD export on a Unix socket with a reconnect delay, one over TLS on TCP, an iSCSI
        // LUN with CHAP, an RBD image with a key and a ceph.conf, and a drive whose medium was
        // changed to an RBD image (its objects carry the medium's generation).
        let unix = NbdExport::start(
            &t.image("e1.raw", 8),
            "one",
            Listen::Unix(d.join("nbd.sock")),
        );
        let (server_tls, client_tls) = qhotplug_tests::servers::x509(d);
        let tcp = NbdExport::start_tls(
            &t.image("e2.raw", 8),
            "two",
            Listen::Tcp(free_port()),
            Some(&server_tls),
        );
        let chap = ("qhotplug", "read-back-Password-1");
        let target = IscsiTarget::start(&t.image("lun.raw", 8), Some(chap));
        let ceph = CephCluster::start(&d.join("ceph"));
        ceph.create_image("disk", 8);
        ceph.create_image("disc", 8);
        let mut delayed = unix.source();
        delayed.reconnect_delay = Some(5);
        let mut over_tls = tcp.source();
        over_tls.tls_dir = Some(client_tls);
        let mut rbd = ceph.source("disk");
        rbd.conf = Some(d.join("ceph.conf"));
        std::fs::write(d.join("ceph.conf"), "[global]\n").unwrap();
        let sources: Vec<(&str, NetworkSource)> = vec![
            ("nb1", delayed.into()),
            ("nb2", over_tls.into()),
            ("is1", target.source(Some(chap)).into()),
            ("rb1", rbd.into()),
        ];
        for (id, source) in sources {
            vm.add_disk(DiskConfig::network(id, source, DiskModel::ScsiHd))
                .await
                .unwrap();
        }
        let disc = iso(d, "cd.iso", "hello.txt", "hello");
        vm.add_cdrom(CdromConfig::new("cd1").medium(disc.as_path()))
            .await
            .unwrap();
        let medium = NetworkSource::from(ceph.source("disc"));
        vm.change_medium("cd1", Some(medium.into()), MediumOptions::default())
            .await
            .unwrap();

        // What QEMU cannot tell: each secret's value (the spec names its object instead), the
        // NBD reconnect delay.
        let mut expected = as_read(vm.spec());
        for disk in &mut expected.disks {
            let object = qhotplug_cmdline::names::secret_at(&disk.id, disk.generation);
            if let qhotplug::DiskBackend::Network(source) = &mut disk.backend {
                if let Some(secret) = source.secret_mut() {
                    *secret = Secret::unresolved(object);
                }
                if let NetworkSource::Nbd(nbd) = &mut **source {
                    nbd.reconnect_delay = None;
                }
            }
        }
        for cd in &mut expected.cdroms {
            let object = qhotplug_cmdline::names::secret_at(&cd.id, cd.generation);
            if let Some(qhotplug::Medium::Network(source)) = &mut cd.medium {
                *source.secret_mut().unwrap() = Secret::unresolved(object);
            }
        }
        let client = qhotplug_qmp::Config::new()
            .connect(&d.join("mon2.sock"))
            .await
            .unwrap();
        let (read, unreadable) = Vm::attach_without_spec(client).await.unwrap();
        assert_same(&read.spec(), &expected);
        let mut unreadable: Vec<String> = unreadable.iter().map(|u| format!("{u:?}")).collect();
        unreadable.sort();
        assert_eq!(
            unreadable,
            [
                "LaunchOptions",
                "NbdReconnectDelay { device: \"nb1\" }",
                "NbdReconnectDelay { device: \"nb2\" }",
                "NetworkSecret { device: \"cd1\" }",
                "NetworkSecret { device: \"is1\" }",
                "NetworkSecret { device: \"rb1\" }",
            ]
        );
        // Planned against the launching handle's spec (every secret's value, the delay), the
        // VM read back is already as desired: what QEMU did not tell is no difference.
        let plan = read.plan(&Desired::new(vm.spec())).await.unwrap();
        assert!(plan.is_empty(), "{plan}");

        // The spec read names every object of every source: the handle that read it removes
        // each disk and the drive with their secrets and TLS credentials, leaving QEMU as it was.
        for id in ["nb1", "nb2", "is1", "rb1"] {
            read.remove_disk(id).await.unwrap();
        }
        read.remove_cdrom("cd1").await.unwrap();
        drop(read);
        t.assert_settles_to(&before, "every network disk removed")
            .await;
    });
}
