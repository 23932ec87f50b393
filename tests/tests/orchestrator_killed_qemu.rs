//! The orchestrator SIGKILLed between any two QMP commands of an operation: a child process
//! attaches to a running QEMU (no guest OS) through its second monitor and runs one operation
//! (a NIC's, a DIMM's, a virtio-mem device's, a serial port's, an RNG's, a SCSI CD-ROM drive's,
//! a balloon's, a virtio-serial controller's, a vhost-user disk's and a virtio-fs device's
//! hot-add, a serial port's, a SCSI CD-ROM drive's and a SCSI disk's removal (the kinds QEMU
//! unplugs with no guest to answer), a SCSI disk's hot-add, an iSCSI disk's with CHAP (a master
//! key and a secret made on the way), a CD-ROM medium change, a snapshot, a mirror or an active
//! commit started and pivoted, a stream, a full push backup and a pull backup, each with a
//! checkpoint), killing itself when the operation's step `n` begins (before its command is
//! sent), for every `n` in turn. Then a new
//! process attaches with no spec, reconciles, and finds its view equal to QEMU's read afresh,
//! every object, node and fd set QEMU has belonging to a device of that view, every fd set's
//! file one of its images, and nothing left for a second reconcile. A migration likewise, killed
//! at each step and once under way: the next process cancels it, or finds it completed. A
//! migration with a storage copy killed at each step: the next processes, on the source and on
//! the target, end the copy's jobs and remove its nodes, exports and NBD server, whichever way
//! the migration went.

use std::path::{Path, PathBuf};

use qhotplug::{
    BackupConfig, BalloonConfig, CdromConfig, DiskConfig, Format, MemoryBackend, MemoryConfig,
    MigrationLeft, MigrationOptions, MirrorConfig, NbdServer, NicConfig, PullConfig, RngConfig,
    SerialPortConfig, SnapshotConfig, SourceAfter, StorageCopy, TapBuilder, Transport,
    VhostUserBlkConfig, VirtioFsConfig, VirtioSerialConfig, Vm, VmSpec, MIB,
};
use qhotplug_cmdline::{names, Cdrom, IdeAddr};
use qhotplug_qmp::command::{QomList, QueryChardev};
use qhotplug_qmp::command::{QueryStatus, RunState};
use qhotplug_qmp::EventKind;
use qhotplug_tests::servers::{vhost_user_backends, IscsiTarget};
use qhotplug_tests::storage::new_qcow2;
use qhotplug_tests::timing::{kill_at_step, run_killed_child};
use qhotplug_tests::{fdset_files, image, iso, pc_spec, second_monitor, TestVm};

/// The operations, by the name the child is given: devices' hot-adds and a medium change.
const DEVICE_OPERATIONS: [&str; 15] = [
    "add_nic",
    "add_disk",
    "add_network_disk",
    "add_cdrom",
    "remove_cdrom",
    "add_balloon",
    "add_virtio_serial",
    "add_vhost_user_blk",
    "add_virtio_fs",
    "add_memory",
    "add_virtio_mem",
    "add_serial_port",
    "remove_serial_port",
    "add_rng",
    "insert_medium",
];
/// The operations on disk `d0`, which the VM has from before.
const DISK_OPERATIONS: [&str; 7] = [
    "remove_disk",
    "snapshot",
    "mirror",
    "commit",
    "stream",
    "backup",
    "pull_backup",
];

/// The iSCSI target's CHAP credentials.
const CHAP: (&str, &str) = ("qhotplug", "killed-Password-1");

/// How long a job may take here (4 MiB images).
const JOB: std::time::Duration = std::time::Duration::from_secs(60);

/// The child's part (run by the parent, never alone): attach, run `QHOTPLUG_KILL_OP`, SIGKILL
/// itself when step `QHOTPLUG_KILL_STEP` begins; `dir/done` if it never did.
#[test]
#[ignore = "the child of an_orchestrator_killed_at_each_step_leaves_nothing_a_new_one_cannot_settle"]
fn operation_that_gets_killed() {
    let Some(dir) = std::env::var_os("QHOTPLUG_KILL_DIR").map(PathBuf::from) else {
        return;
    };
    let op = std::env::var("QHOTPLUG_KILL_OP").unwrap();
    // A step's number, or `active`: once the migration it starts is under way.
    let step = std::env::var("QHOTPLUG_KILL_STEP").unwrap();
    let active = step == "active";
    let step: usize = if active {
        usize::MAX
    } else {
        step.parse().unwrap()
    };
    kill_at_step(step);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let client = qhotplug_qmp::connect(&dir.join("mon2.sock")).await.unwrap();
            let (vm, _) = Vm::attach_without_spec(client).await.unwrap();
            if active {
                let mut events = vm.client().events();
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + JOB;
                    let under_way = |e: &EventKind| {
                        matches!(e, EventKind::Migration(m) if m.status == "active")
                    };
                    if events.wait_for(deadline, under_way).await {
                        qhotplug_tests::kill(std::process::id(), libc::SIGKILL).unwrap();
                    }
                });
            }
            match op.as_str() {
                "migrate" => {
                    let client = qhotplug_qmp::connect(&dir.join("tgt2.sock")).await.unwrap();
                    let (target, _) = Vm::attach_without_spec(client).await.unwrap();
                    let mut options =
                        MigrationOptions::new(Transport::Unix(dir.join("migrate.sock")))
                            .source_after(SourceAfter::Paused);
                    if active {
                        // Slow enough to be under way when the process dies.
                        options = options.bandwidth(64 << 10);
                    }
                    drop(vm.migrate(target, options, |_| {}).await.unwrap());
                }
                "migrate_storage" => {
                    let client = qhotplug_qmp::connect(&dir.join("tgt2.sock")).await.unwrap();
                    let (target, _) = Vm::attach_without_spec(client).await.unwrap();
                    let copy = StorageCopy::new(NbdServer::Unix(dir.join("nbd.sock")));
                    let options = MigrationOptions::new(Transport::Unix(dir.join("migrate.sock")))
                        .source_after(SourceAfter::Paused)
                        .copy_storage(copy);
                    drop(vm.migrate(target, options, |_| {}).await.unwrap());
                }
                "add_nic" => {
                    let tap = TapBuilder::new("qhpk%d").create().unwrap();
                    drop(
                        vm.add_nic(NicConfig::new("n1", tap).no_vhost())
                            .await
                            .unwrap(),
                    );
                }
                "add_disk" => drop(
                    vm.add_disk(DiskConfig::scsi_hd("d1", dir.join("d1.raw")))
                        .await
                        .unwrap(),
                ),
                "add_network_disk" => {
                    let portal = std::fs::read_to_string(dir.join("portal")).unwrap();
                    let source = qhotplug::Iscsi {
                        portal,
                        target: IscsiTarget::IQN.into(),
                        lun: 1,
                        initiator: None,
                        chap: Some(qhotplug::Chap {
                            user: CHAP.0.into(),
                            password: qhotplug::Secret::new(CHAP.1),
                        }),
                    };
                    let config = DiskConfig::network("is1", source, qhotplug::DiskModel::ScsiHd);
                    drop(vm.add_disk(config).await.unwrap());
                }
                "add_cdrom" => {
                    let config = CdromConfig::new("cd1").medium(dir.join("b.iso"));
                    drop(vm.add_cdrom(config).await.unwrap());
                }
                "remove_cdrom" => vm.remove_cdrom("cd1").await.unwrap(),
                "add_balloon" => drop(vm.add_balloon(BalloonConfig::new("b0")).await.unwrap()),
                "add_virtio_serial" => drop(
                    vm.add_virtio_serial(VirtioSerialConfig::new("vser1"))
                        .await
                        .unwrap(),
                ),
                "add_vhost_user_blk" => drop(
                    vm.add_vhost_user_blk(VhostUserBlkConfig::new("vdisk", dir.join("vdisk.sock")))
                        .await
                        .unwrap(),
                ),
                "add_virtio_fs" => drop(
                    vm.add_virtio_fs(VirtioFsConfig::new("fs0", dir.join("fs.sock"), "share"))
                        .await
                        .unwrap(),
                ),
                "remove_disk" => vm.remove_disk("d0").await.unwrap(),
                "insert_medium" => vm.insert_medium("cd", dir.join("b.iso")).await.unwrap(),
                "snapshot" => drop(
                    vm.snapshot(SnapshotConfig::new().disk("d0", dir.join("d0.1.qcow2")))
                        .await
                        .unwrap(),
                ),
                "add_memory" => drop(
                    vm.add_memory(MemoryConfig::dimm("m1", 128 * MIB))
                        .await
                        .unwrap(),
                ),
                "add_virtio_mem" => drop(
                    vm.add_memory(MemoryConfig::virtio_mem("vm1", 256 * MIB, 0))
                        .await
                        .unwrap(),
                ),
                "add_serial_port" => drop(
                    vm.add_serial_port(SerialPortConfig::new(
                        "p1",
                        "vser0",
                        "org.example.p1",
                        dir.join("p1.sock"),
                    ))
                    .await
                    .unwrap(),
                ),
                "remove_serial_port" => vm.remove_serial_port("p0").await.unwrap(),
                "add_rng" => drop(vm.add_rng(RngConfig::new("r1")).await.unwrap()),
                "commit" => {
                    let mut job = vm.commit_disk("d0").await.unwrap();
                    job.wait_ready(JOB).await.unwrap();
                    job.pivot().await.unwrap();
                }
                "stream" => drop(vm.stream_disk("d0").await.unwrap().wait(JOB).await.unwrap()),
                "pull_backup" => {
                    let config = PullConfig::full(NbdServer::Unix(dir.join("pull.sock")))
                        .disk("d0", dir.join("d0.scratch.qcow2"))
                        .checkpoint("c1");
                    vm.pull_backup(config)
                        .await
                        .unwrap()
                        .finish()
                        .await
                        .unwrap();
                }
                "mirror" => {
                    let config = MirrorConfig::new(dir.join("d0.copy.qcow2")).format(Format::Qcow2);
                    let mut job = vm.mirror_disk("d0", config).await.unwrap();
                    job.wait_ready(JOB).await.unwrap();
                    job.pivot().await.unwrap();
                }
                "backup" => {
                    let config = BackupConfig::full()
                        .disk("d0", dir.join("d0.full.qcow2"))
                        .checkpoint("c1");
                    vm.backup(config).await.unwrap().wait(JOB).await.unwrap();
                }
                other => panic!("no operation {other}"),
            }
            std::fs::write(dir.join("done"), "").unwrap();
        });
}

/// A VM for `op`, running with no guest OS, its second monitor at `dir/mon2.sock`: a boot CD-ROM
/// `cd` holding `a.iso`, memory slots, a virtio-serial controller `vser0`, and for the storage
/// operations a SCSI disk `d0` (on a chain of two images for a commit or a stream).
async fn vm_for(op: &str, dir: &Path) -> TestVm {
    let a = iso(dir, "a.iso", "hello.txt", "from a\n");
    iso(dir, "b.iso", "hello.txt", "from b\n");
    image(dir, "d1.raw", 4);
    let mut spec: VmSpec = pc_spec();
    spec.cdroms
        .push(Cdrom::ide("cd", IdeAddr::new(1, 0)).with_medium(&a));
    spec.memory_slots = 2;
    spec.max_memory_mib = Some(512);
    spec.virtio_serials.push(qhotplug::VirtioSerial {
        id: "vser0".into(),
        pci: qhotplug::Pci::new("pci.0", 8),
    });
    if op.contains("vhost_user") || op.contains("virtio_fs") {
        // A vhost-user device needs the guest's memory shared with its backend.
        spec.memory_backend = Some(MemoryBackend::shared_memfd("ram", spec.memory_mib * MIB));
    }
    second_monitor(&mut spec, &dir.join("mon2.sock"));
    let t = TestVm::running(spec).await;
    if op == "remove_cdrom" {
        let config = CdromConfig::new("cd1").medium(dir.join("b.iso"));
        t.vm.add_cdrom(config).await.unwrap();
    }
    if DISK_OPERATIONS.contains(&op) || op == "migrate_storage" {
        let d0 = new_qcow2(dir.join("d0.qcow2"), Some(4), None);
        t.vm.add_disk(DiskConfig::scsi_hd("d0", &d0).format(Format::Qcow2))
            .await
            .unwrap();
    }
    if op == "remove_serial_port" {
        let port = SerialPortConfig::new("p0", "vser0", "org.example.p0", dir.join("p0.sock"));
        t.vm.add_serial_port(port).await.unwrap();
    }
    if op == "commit" || op == "stream" {
        t.vm.snapshot(SnapshotConfig::new().disk("d0", dir.join("d0.1.qcow2")))
            .await
            .unwrap();
    }
    t
}

/// The VM for `op` and a target launched to migrate it into (from its spec as `edit` changes
/// it), the target's second monitor at `dir/tgt2.sock`.
async fn source_and_target(op: &str, dir: &Path, edit: impl FnOnce(&mut VmSpec)) -> (TestVm, Vm) {
    let t = vm_for(op, dir).await;
    let mut launcher = t.vm.migration_launcher(dir.join("target"));
    let spec = launcher.spec_mut();
    spec.extra_args.clear();
    second_monitor(spec, &dir.join("tgt2.sock"));
    edit(spec);
    let target = Vm::launch(launcher).await.unwrap();
    (t, target)
}

/// Runs the child for `op`, killed at step `step` (a number, or `active`: see the child); true
/// when it finished instead.
async fn run_child(dir: &Path, op: &str, step: impl std::fmt::Display) -> bool {
    let env = [
        ("QHOTPLUG_KILL_DIR", dir.display().to_string()),
        ("QHOTPLUG_KILL_OP", op.to_owned()),
        ("QHOTPLUG_KILL_STEP", step.to_string()),
    ];
    run_killed_child("operation_that_gets_killed", dir, &env).await
}

/// Asserts that everything of the SDK's QEMU has belongs to a device of `spec`: block nodes
/// (each one its device's), fd sets (each file one of its device's images), chardevs and
/// objects.
async fn assert_nothing_left(vm: &Vm, t: &TestVm, spec: &VmSpec, case: &str) {
    let mut nodes: Vec<String> = spec.disks.iter().flat_map(|d| d.node_names()).collect();
    for cd in spec.cdroms.iter().filter(|c| c.medium.is_some()) {
        nodes.extend([cd.top_node(), cd.file_node()]);
    }
    nodes.sort();
    let mut seen = qhotplug_tests::storage::block_nodes(vm).await;
    seen.sort();
    assert_eq!(seen, nodes, "{case}: block nodes");
    let images: Vec<PathBuf> = spec
        .image_paths()
        .into_iter()
        .map(|p| p.canonicalize().unwrap())
        .collect();
    let sets = fdset_files(&t.vm).await;
    for (tag, file) in &sets {
        assert!(images.contains(file), "{case}: {tag}'s set holds {file:?}");
    }
    let mut files: Vec<&PathBuf> = sets.iter().map(|(_, f)| f).collect();
    files.dedup();
    assert_eq!(
        files.len(),
        sets.len(),
        "{case}: one set per image: {sets:?}"
    );
    let ids: Vec<&str> = spec
        .disks
        .iter()
        .map(|d| d.id.as_str())
        .chain(spec.cdroms.iter().map(|c| c.id.as_str()))
        .chain(spec.memory_devices.iter().map(|m| m.id.as_str()))
        .chain(spec.serial_ports.iter().map(|p| p.id.as_str()))
        .chain(spec.rngs.iter().map(|r| r.id.as_str()))
        .chain(spec.vhost_user_blks.iter().map(|v| v.id.as_str()))
        .chain(spec.virtio_fs.iter().map(|v| v.id.as_str()))
        .collect();
    let chardevs = vm.client().execute(&QueryChardev).await.unwrap();
    let objects = vm
        .client()
        .execute(&QomList {
            path: "/objects".into(),
        })
        .await
        .unwrap();
    let named = chardevs
        .iter()
        .map(|c| c.label.as_str())
        .chain(objects.iter().map(|o| o.name.as_str()));
    for name in named {
        if let Some(owner) = names::owner_of(name) {
            assert!(ids.contains(&owner), "{case}: {name} left behind");
        }
    }
}

#[test]
fn an_orchestrator_killed_at_each_step_leaves_nothing_a_new_one_cannot_settle() {
    qhotplug_tests::serial_test(async {
        let mut released = Vec::new();
        for op in DEVICE_OPERATIONS.into_iter().chain(DISK_OPERATIONS) {
            for step in 0.. {
                let dir = tempfile::tempdir().unwrap();
                let d = dir.path();
                let t = vm_for(op, d).await;
                let _backends = match op {
                    "add_vhost_user_blk" | "add_virtio_fs" => Some(vhost_user_backends(d).await),
                    _ => None,
                };
                let _target = (op == "add_network_disk").then(|| {
                    let target = IscsiTarget::start(&image(d, "lun.raw", 4), Some(CHAP));
                    std::fs::write(d.join("portal"), target.portal()).unwrap();
                    target
                });
                let finished = run_child(d, op, step).await;
                let case = format!("{op} killed at step {step}");
                // A new process, with no spec: attach, reconcile.
                let client = qhotplug_qmp::connect(&d.join("mon2.sock")).await.unwrap();
                let (vm, _) = Vm::attach_without_spec(client).await.unwrap();
                // The dead process's jobs that a handle takes back are ended, as an orchestrator
                // that does not want them would; the rest is reconcile's.
                for job in vm.jobs().await.unwrap() {
                    job.cancel().await.unwrap();
                }
                let report = vm.reconcile().await.unwrap();
                vm.settle().await;
                assert!(vm.reconcile().await.unwrap().is_empty(), "{case}");
                // Its view is QEMU's, read afresh by another handle.
                let (fresh, _) = Vm::attach_without_spec(vm.client().clone()).await.unwrap();
                let spec = vm.spec();
                assert_eq!(spec, fresh.spec(), "{case}");
                assert_nothing_left(&vm, &t, &spec, &case).await;
                // The operation is done or not, never half: the disk, the medium, the chain.
                let has = |id: &str| spec.disks.iter().any(|x| x.id == id);
                // QEMU's taps are its NICs' (one queue each here); but killed between `getfd`
                // and `netdev_add` (step 1), QEMU keeps a tap fd that nothing in QMP names,
                // under the SDK's name for it (`<nic>-tap0`) on the monitor the process used.
                let pid = t.vm.pid().unwrap();
                let taps = || {
                    std::fs::read_dir(format!("/proc/{pid}/fd"))
                        .unwrap()
                        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
                        .filter(|l| l == Path::new("/dev/net/tun"))
                        .count()
                };
                let leaked = usize::from(op == "add_nic" && step == 1);
                assert_eq!(taps(), spec.nics.len() + leaked, "{case}: taps");
                if leaked == 1 {
                    // The orchestrator adding that NIC again through the same monitor gives
                    // QEMU the name anew: QEMU closes the fd it held.
                    let tap = TapBuilder::new("qhpk%d").create().unwrap();
                    vm.add_nic(NicConfig::new("n1", tap).no_vhost())
                        .await
                        .unwrap();
                    assert_eq!(taps(), 1, "{case}: the retry's tap alone");
                }
                match op {
                    "add_nic" => assert_eq!(spec.nics.len(), usize::from(finished), "{case}"),
                    "add_disk" => assert_eq!(has("d1"), finished, "{case}"),
                    "add_network_disk" => assert_eq!(has("is1"), finished, "{case}"),
                    "add_cdrom" => {
                        assert_eq!(spec.cdroms.len(), 1 + usize::from(finished), "{case}")
                    }
                    // Its medium is taken out first (step 0), then `device_del` (step 1) is
                    // sent, and it is gone from then on, as a serial port. Killed between the
                    // two, the drive stays, empty: the removal is the orchestrator's to finish.
                    "remove_cdrom" => {
                        let cd1 = spec.cdroms.iter().find(|c| c.id == "cd1");
                        assert_eq!(cd1.is_some(), step <= 1, "{case}");
                        if step == 1 {
                            assert_eq!(cd1.unwrap().medium, None, "{case}");
                        }
                    }
                    "add_balloon" => assert_eq!(spec.balloon.is_some(), finished, "{case}"),
                    "add_virtio_serial" => {
                        assert_eq!(
                            spec.virtio_serials.len(),
                            1 + usize::from(finished),
                            "{case}"
                        )
                    }
                    "add_vhost_user_blk" => {
                        assert_eq!(spec.vhost_user_blks.len(), usize::from(finished), "{case}")
                    }
                    "add_virtio_fs" => {
                        assert_eq!(spec.virtio_fs.len(), usize::from(finished), "{case}")
                    }
                    "add_memory" | "add_virtio_mem" => {
                        assert_eq!(spec.memory_devices.len(), usize::from(finished), "{case}")
                    }
                    "add_serial_port" => {
                        assert_eq!(spec.serial_ports.len(), usize::from(finished), "{case}")
                    }
                    // Gone once its `device_del` (step 0) was sent: QEMU needs no guest for it.
                    "remove_serial_port" => {
                        assert_eq!(spec.serial_ports.is_empty(), step > 0, "{case}")
                    }
                    "add_rng" => assert_eq!(spec.rngs.len(), usize::from(finished), "{case}"),
                    "remove_disk" => assert_eq!(has("d0"), step == 0, "{case}"),
                    "snapshot" => {
                        let d0 = spec.disks.iter().find(|x| x.id == "d0").unwrap();
                        assert_eq!(d0.backing.is_empty(), !finished, "{case}");
                    }
                    "commit" | "stream" if finished => {
                        let d0 = spec.disks.iter().find(|x| x.id == "d0").unwrap();
                        assert!(d0.backing.is_empty(), "{case}: {d0:?}");
                    }
                    "mirror" if finished => {
                        let d0 = spec.disks.iter().find(|x| x.id == "d0").unwrap();
                        assert_eq!(d0.path, d.join("d0.copy.qcow2"), "{case}");
                    }
                    _ => {}
                }
                // A file the operation made is the spec's, or removed, or reported released;
                // but one made right before its `add-fd` (step 0 of a new image), which QEMU
                // never saw: nothing names it.
                let made = match op {
                    "snapshot" => Some("d0.1.qcow2"),
                    "mirror" => Some("d0.copy.qcow2"),
                    "backup" => Some("d0.full.qcow2"),
                    "pull_backup" => Some("d0.scratch.qcow2"),
                    _ => None,
                };
                let made = made.map(|f| d.join(f));
                let used = spec.image_paths();
                for file in made
                    .iter()
                    .filter(|f| f.exists() && !used.contains(&f.as_path()))
                {
                    let file = file.canonicalize().unwrap();
                    let reported = report.files_released.contains(&file);
                    if reported {
                        released.push(case.clone());
                    }
                    let finished_backup = op == "backup" && finished;
                    assert!(
                        reported || finished_backup || step == 0,
                        "{case}: {file:?} left and not reported: {report:?}"
                    );
                }
                if finished {
                    break;
                }
            }
        }
        // Files were left to report: a new image QEMU had when its operation died.
        assert!(!released.is_empty());
        println!("released files reported after: {released:?}");
    });
}

#[test]
fn a_migration_whose_process_was_killed_is_cancelled_or_reported_by_the_next_one() {
    qhotplug_tests::serial_test(async {
        let mut seen = Vec::new();
        let mut completed_from: Option<String> = None;
        let cases = (0..).map(|n: usize| n.to_string());
        for step in std::iter::once("active".to_owned()).chain(cases) {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let (t, target) = source_and_target("migrate", d, |_| {}).await;
            let mut target_events = target.client().events();
            let finished = run_child(d, "migrate", &step).await;
            let case = format!("migrate killed at step {step}");
            // A new process attaches to the source with no spec and reconciles.
            let client = qhotplug_qmp::connect(&d.join("mon2.sock")).await.unwrap();
            let (vm, _) = Vm::attach_without_spec(client).await.unwrap();
            let report = vm.reconcile().await.unwrap();
            let running = vm.client().execute(&QueryStatus).await.unwrap().running;
            match (step.as_str(), finished) {
                // Under way: cancelled; the guest runs here, and the target, its stream
                // broken, exits.
                ("active", _) => {
                    assert_eq!(report.migration, Some(MigrationLeft::Cancelled), "{case}");
                    assert!(running, "{case}");
                    let gone = async {
                        while futures::StreamExt::next(&mut target_events).await.is_some() {}
                    };
                    tokio::time::timeout(JOB, gone).await.unwrap();
                }
                // Killed once `migrate` was sent (or it finished): it completed, as fast as it
                // goes here; the guest runs on the target, the source is kept paused.
                (_, finished) if finished || report.migration.is_some() => {
                    assert_eq!(report.migration, Some(MigrationLeft::Completed), "{case}");
                    assert!(!running, "{case}");
                    assert!(target.client().execute(&QueryStatus).await.unwrap().running);
                    completed_from.get_or_insert(step.clone());
                }
                // Killed before `migrate` was sent: nothing to end, the guest runs here.
                _ => {
                    assert!(completed_from.is_none(), "{case}: after {completed_from:?}");
                    assert!(running, "{case}");
                }
            }
            assert_nothing_left(&vm, &t, &vm.spec(), &case).await;
            seen.push((step, report.migration));
            if finished {
                break;
            }
        }
        println!("migration cases: {seen:?}");
        // Some steps come before `migrate`, and at least the last one after it.
        let before = seen.iter().filter(|(_, left)| left.is_none()).count();
        assert!(before >= 2 && completed_from.is_some(), "{seen:?}");
    });
}

#[test]
fn a_storage_migration_whose_process_was_killed_leaves_nothing_on_either_side() {
    qhotplug_tests::serial_test(async {
        let mut seen = Vec::new();
        for step in 0.. {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            // The target runs d0 on an empty image of its own.
            let (t, target) = source_and_target("migrate_storage", d, |spec| {
                let d0 = spec.disks.iter_mut().find(|x| x.id == "d0").unwrap();
                d0.path = new_qcow2(d.join("d0.target.qcow2"), Some(4), None);
            })
            .await;
            let finished = run_child(d, "migrate_storage", step).await;
            let case = format!("migrate_storage killed at step {step}");
            // New processes attach to each side with no spec and reconcile.
            let client = qhotplug_qmp::connect(&d.join("mon2.sock")).await.unwrap();
            let (vm, _) = Vm::attach_without_spec(client).await.unwrap();
            let report = vm.reconcile().await.unwrap();
            let client = qhotplug_qmp::connect(&d.join("tgt2.sock")).await.unwrap();
            let (on_target, _) = Vm::attach_without_spec(client).await.unwrap();
            let target_report = on_target.reconcile().await.unwrap();
            let again = vm.reconcile().await.unwrap();
            assert!(
                again.is_empty(),
                "{case}: after {report:?}, again {again:?}"
            );
            let again = on_target.reconcile().await.unwrap();
            assert!(
                again.is_empty(),
                "{case}: after {target_report:?}, again {again:?}"
            );
            let running = vm.client().execute(&QueryStatus).await.unwrap().running;
            assert_eq!(
                running,
                report.migration != Some(MigrationLeft::Completed),
                "{case}: {report:?}"
            );
            if finished {
                assert_eq!(report.migration, Some(MigrationLeft::Completed), "{case}");
            }
            // Nothing of the copy is left on either side: no job, no node but d0's, no export.
            for (side, handle) in [("source", &vm), ("target", &on_target)] {
                let jobs = handle
                    .client()
                    .execute_raw("query-jobs", &serde_json::json!({}))
                    .await
                    .unwrap();
                assert_eq!(jobs, serde_json::json!([]), "{case}: {side}'s jobs");
                let mut nodes = qhotplug_tests::storage::block_nodes(handle).await;
                nodes.sort();
                let want = ["cd-file", "cd-fmt", "d0-file", "d0-fmt"];
                assert_eq!(nodes, want, "{case}: {side}'s nodes");
                let exports = handle
                    .client()
                    .execute_raw("query-block-exports", &serde_json::json!({}))
                    .await
                    .unwrap();
                assert_eq!(exports, serde_json::json!([]), "{case}: {side}'s exports");
            }
            assert_nothing_left(&vm, &t, &vm.spec(), &case).await;
            // The guest runs on the target once the migration completed; until then the target
            // waits for it (the orchestrator quits it, or migrates again).
            let target_status = on_target
                .client()
                .execute(&QueryStatus)
                .await
                .unwrap()
                .status;
            let completed = report.migration == Some(MigrationLeft::Completed);
            let want = if completed {
                RunState::Running
            } else {
                RunState::Inmigrate
            };
            assert_eq!(target_status, want, "{case}");
            assert_eq!(
                target_report.migration, None,
                "{case}: the target's is its source's"
            );
            seen.push((
                step,
                report.migration,
                report.jobs_ended.len(),
                target_report.exports_deleted.len(),
                target_status,
            ));
            drop(target);
            if finished {
                break;
            }
        }
        println!("storage migration cases: {seen:?}");
    });
}
