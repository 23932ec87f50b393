//! One set of hot-plug scenarios, run against the published mock QEMU (`qhotplug-mock`) and
//! against real QEMU, with the same SDK calls. What each observes (every outcome, and QEMU's state
//! after each step, reduced to what the mock models) must be the same: a difference is a bug in
//! the mock.

use std::path::Path;
use std::time::Duration;

use qhotplug::{
    BalloonConfig, CdromConfig, DiskConfig, Error, Format, MemoryBackend, MemoryConfig, NicConfig,
    Pci, RngConfig, SerialPortConfig, StorageDaemon, StorageDaemonLauncher, UnplugPolicy,
    VhostUserBlkConfig, VirtioFsConfig, VirtioSerialConfig, VirtiofsdLauncher, Vm, VmSpec, MIB,
};
use qhotplug_mock::{GuestUnplug, MockQemu};
use qhotplug_qmp::command::{
    QomList, QueryBlock, QueryBlockExports, QueryChardev, QueryFdsets, QueryJobs,
    QueryNamedBlockNodes, QueryPci,
};
use qhotplug_tests::{image, iso, pc_spec, TestVm};
use serde_json::json;

/// QEMU's state as far as the mock models it: our devices and where they sit, block nodes, fd
/// sets (by tag), all sorted.
async fn state(vm: &Vm) -> String {
    state_of(vm, true).await
}

/// [`state`], with the sizes of `file` nodes when `file_sizes`: a qcow2 image's file grows with
/// what a job copies into it, which the mock does not model.
async fn state_of(vm: &Vm, file_sizes: bool) -> String {
    let c = vm.client();
    let mut devices: Vec<String> = c
        .execute(&QomList {
            path: "/machine/peripheral".into(),
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.child_type().is_some())
        .map(|p| format!("{}:{}", p.name, p.child_type().unwrap()))
        .collect();
    devices.sort();
    let mut slots: Vec<String> = Vec::new();
    for bus in c.execute(&QueryPci).await.unwrap() {
        for d in bus.devices.iter().filter(|d| !d.qdev_id.is_empty()) {
            slots.push(format!("{}@{}", d.qdev_id, d.slot));
        }
    }
    slots.sort();
    let mut nodes: Vec<String> = c
        .execute(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .unwrap()
        .into_iter()
        .filter_map(|n| {
            let size = n.image.as_ref().map_or(0, |i| i.virtual_size);
            // QEMU's own nodes (a job's filter) are named `#block…`.
            let name = n.node_name.filter(|n| !n.starts_with('#'))?;
            let size = match (file_sizes, n.drv.as_str()) {
                (false, "file") => "*".to_owned(),
                _ => size.to_string(),
            };
            Some(format!("{name}:{}:{size}", n.drv))
        })
        .collect();
    nodes.sort();
    let mut fdsets: Vec<String> = c
        .execute(&QueryFdsets)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|s| s.fds.into_iter().filter_map(|f| f.opaque))
        .collect();
    fdsets.sort();
    // Chardevs and QOM objects of ours (QEMU has its own besides: the monitor's, its machine's).
    let mut chardevs: Vec<String> = c
        .execute(&QueryChardev)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.label)
        .filter(|l| l.ends_with("-chr"))
        .collect();
    chardevs.sort();
    let mut objects: Vec<String> = c
        .execute(&QomList {
            path: "/objects".into(),
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.child_type().is_some() && p.name.ends_with("-rng"))
        .map(|p| p.name)
        .collect();
    objects.sort();
    // Drives: which node each frontend holds, and where its tray is.
    let mut drives: Vec<String> = c
        .execute(&QueryBlock)
        .await
        .unwrap()
        .into_iter()
        .map(|b| {
            let node = b.inserted.and_then(|i| i.node_name).unwrap_or_default();
            format!("{}:{node}:{:?}", b.qdev.unwrap_or_default(), b.tray_open)
        })
        .collect();
    drives.sort();
    format!(
        "devices {devices:?} slots {slots:?} nodes {nodes:?} fdsets {fdsets:?} \
         chardevs {chardevs:?} objects {objects:?} drives {drives:?}"
    )
}

/// An outcome, without what only one of the two can say (QEMU's exact words).
fn outcome<T: std::fmt::Debug>(r: &qhotplug::Result<T>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(Error::Step {
            step,
            undo_failures,
            ..
        }) => format!("failed at {step}, {} undo failures", undo_failures.len()),
        Err(Error::UnplugPending { id, .. }) => format!("{id} pending"),
        Err(Error::DuplicateId(id)) => format!("duplicate {id}"),
        Err(Error::Open { path, .. }) => format!("cannot open {:?}", path.file_name()),
        Err(Error::ShrinkRefused {
            current, requested, ..
        }) => {
            format!("shrink {current} to {requested} refused")
        }
        Err(other) => format!("error {other}"),
    }
}

/// The scenarios. `nic` makes the NIC's config (a real tap for QEMU, any fd for the mock).
async fn scenarios(vm: &Vm, dir: &Path, nic: NicConfig, behind: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let raw = image(dir, "m.raw", 1);
    let mut note = |what: &str, text: String| seen.push(format!("{what}: {text}"));
    note("start", state(vm).await);
    let d1 = vm.add_disk(DiskConfig::virtio_blk("d1", &raw)).await;
    note("virtio-blk", outcome(&d1.map(|d| d.frontend)));
    let s1 = vm
        .add_disk(DiskConfig::scsi_hd("s1", &raw).read_only(true))
        .await;
    note("scsi-hd", outcome(&s1.map(|d| d.frontend)));
    let n1 = vm
        .add_nic(nic.mac("52:54:00:00:00:01".parse().unwrap()))
        .await;
    note("nic", outcome(&n1.map(|n| n.pci)));
    note("after adds", state(vm).await);

    // Live changes: a shrink refused, a grow, a link taken down.
    note("shrink", outcome(&vm.resize_disk("d1", 512 << 10).await));
    note("grow", outcome(&vm.resize_disk("d1", 2 << 20).await));
    note("link down", outcome(&vm.set_link("n1", false).await));
    let limits = qhotplug::IoLimits {
        bps: 1 << 20,
        iops: 100,
        ..Default::default()
    };
    note("limits", outcome(&vm.set_io_limits("d1", limits).await));
    note("limits read", outcome(&vm.io_limits("d1").await));
    let bad = qhotplug::IoLimits {
        bps: 1,
        bps_rd: 1,
        ..Default::default()
    };
    note("bad limits", outcome(&vm.set_io_limits("d1", bad).await));
    note("after live changes", state(vm).await);

    // A qcow2 node on a raw image: refused at the format node, every step before undone.
    let bad = vm
        .add_disk(DiskConfig::virtio_blk("q1", &raw).format(Format::Qcow2))
        .await;
    note("qcow2 on raw", outcome(&bad));
    note("after the rollback", state(vm).await);
    let dup = vm.add_disk(DiskConfig::virtio_blk("d1", &raw)).await;
    note("same id", outcome(&dup));

    // A device added behind the SDK's back takes slot 20; a disk sent there fails at device_add.
    vm.client()
        .execute_raw(
            "device_add",
            &json!({"driver": behind, "id": "behind", "addr": "0x14"}),
        )
        .await
        .unwrap();
    let taken = vm
        .add_disk(DiskConfig::virtio_blk("t1", &raw).at_pci(Pci::new("pci.0", 20)))
        .await;
    note("occupied slot", outcome(&taken));
    note("after that rollback", state(vm).await);

    // SCSI disks leave at once; a PCI device waits for a guest that is not there.
    note("remove scsi-hd", outcome(&vm.remove_disk("s1").await));
    let hasty = vm.with_unplug_policy(UnplugPolicy::new(Duration::from_millis(300)));
    note("remove virtio-blk", outcome(&hasty.remove_disk("d1").await));
    note("pending", format!("{}", vm.unplug_pending("d1")));
    note(
        "reconcile",
        format!("{:?}", vm.reconcile().await.map(|r| r.gone)),
    );
    note("end", state(vm).await);
    seen
}

/// The virtio devices with a backend of another sort: an RNG on its QOM object, a virtio-serial
/// controller and a port on its chardev. A failure at each backend is undone; a port leaves at
/// once, and its chardev with it; an RNG waits for the guest.
async fn virtio_scenarios(vm: &Vm, dir: &Path) -> Vec<String> {
    let mut seen = Vec::new();
    let mut note = |what: &str, text: String| seen.push(format!("{what}: {text}"));
    note("start", state(vm).await);
    let rng = vm.add_rng(RngConfig::new("rng0")).await;
    note("rng", outcome(&rng.map(|r| r.pci)));
    let ctl = vm.add_virtio_serial(VirtioSerialConfig::new("vser0")).await;
    note("controller", outcome(&ctl.map(|c| c.pci)));
    let port = |id: &str| SerialPortConfig::new(id, "vser0", "org.example.port", dir.join(id));
    note(
        "port",
        outcome(&vm.add_serial_port(port("p0")).await.map(|p| p.bus)),
    );
    note("after adds", state(vm).await);
    note("same port", outcome(&vm.add_serial_port(port("p0")).await));
    note("remove port", outcome(&vm.remove_serial_port("p0").await));
    note("after the port", state(vm).await);
    let hasty = vm.with_unplug_policy(UnplugPolicy::new(Duration::from_millis(300)));
    note("remove rng", outcome(&hasty.remove_rng("rng0").await));
    note("end", state(vm).await);
    seen
}

/// A CD-ROM drive's life: added empty on the SCSI bus, a medium in, changed, out, in again, and
/// the drive removed with its medium (the medium goes first). Its tray moves, its nodes come and
/// go.
async fn cdrom_scenarios(vm: &Vm, dir: &Path) -> Vec<String> {
    let mut seen = Vec::new();
    let mut note = |what: &str, text: String| seen.push(format!("{what}: {text}"));
    let one = iso(dir, "one.iso", "a.txt", "one");
    let two = iso(dir, "two.iso", "b.txt", "two");
    let cd = vm.add_cdrom(CdromConfig::new("cd0")).await;
    note("empty drive", outcome(&cd.map(|c| c.medium)));
    note("after add", state(vm).await);
    note("insert", outcome(&vm.insert_medium("cd0", &one).await));
    note("after insert", state(vm).await);
    note("change", outcome(&vm.insert_medium("cd0", &two).await));
    note("after change", state(vm).await);
    note("eject", outcome(&vm.eject_medium("cd0").await));
    note("after eject", state(vm).await);
    note(
        "missing",
        outcome(&vm.insert_medium("cd0", dir.join("nope.iso")).await),
    );
    note(
        "insert again",
        outcome(&vm.insert_medium("cd0", &one).await),
    );
    note("remove", outcome(&vm.remove_cdrom("cd0").await));
    note("end", state(vm).await);
    seen
}

/// Jobs (id and status) and NBD exports: all that is compared while a backup job runs (QEMU then
/// shows the device on its job's filter node, which the mock does not model).
async fn jobs_and_exports(vm: &Vm) -> String {
    let c = vm.client();
    let jobs: Vec<String> = c
        .execute(&QueryJobs)
        .await
        .unwrap()
        .into_iter()
        .map(|j| format!("{}:{}", j.id, j.status))
        .collect();
    let mut exports: Vec<String> = c
        .execute(&QueryBlockExports)
        .await
        .unwrap()
        .into_iter()
        .map(|e| format!("{}:{}", e.id, e.node_name))
        .collect();
    exports.sort();
    format!("jobs {jobs:?} exports {exports:?}")
}

/// The storage half's state beside [`state`]: jobs, the dirty bitmaps of every drive's node
/// (name, recording, persistent, busy), and NBD exports.
async fn storage_state(vm: &Vm) -> String {
    let mut bitmaps: Vec<String> = vm
        .client()
        .execute(&QueryBlock)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|b| b.inserted)
        .flat_map(|i| {
            let node = i.node_name.unwrap_or_default();
            i.dirty_bitmaps.into_iter().map(move |b| {
                format!(
                    "{node}/{}:{}:{}:{}",
                    b.name, b.recording, b.persistent, b.busy
                )
            })
        })
        .collect();
    bitmaps.sort();
    let base = state_of(vm, false).await;
    let running = jobs_and_exports(vm).await;
    format!("{base} bitmaps {bitmaps:?} {running}")
}

/// The storage half: a snapshot, an active commit, a mirror pivoted and one abandoned, a
/// stream, full and incremental push backups with checkpoints, a pull backup, and requests
/// refused before anything is sent; QEMU's state after each.
async fn storage_scenarios(vm: &Vm, dir: &Path) -> Vec<String> {
    let mut seen = Vec::new();
    let mut note = |what: &str, text: String| seen.push(format!("{what}: {text}"));
    let wait = Duration::from_secs(30);
    let disk = qhotplug_tests::storage::qcow2_data_image(dir, "s", 1, 7);
    let added = vm
        .add_disk(DiskConfig::virtio_blk("s", &disk).format(Format::Qcow2))
        .await;
    note("disk", outcome(&added.map(|d| d.id)));
    note("start", storage_state(vm).await);
    let snap = vm
        .snapshot(qhotplug::SnapshotConfig::new().disk("s", dir.join("s.1.qcow2")))
        .await;
    note("snapshot", outcome(&snap.map(|d| d[0].backing.len())));
    note("after snapshot", storage_state(vm).await);
    let mut commit = vm.commit_disk("s").await.unwrap();
    note(
        "commit ready",
        outcome(&commit.wait_ready(wait).await.map(|j| j.status)),
    );
    note(
        "commit",
        outcome(&commit.pivot().await.map(|d| d.top_node())),
    );
    note("after commit", storage_state(vm).await);
    let mut mirror = vm
        .mirror_disk("s", qhotplug::MirrorConfig::new(dir.join("copy.qcow2")))
        .await
        .unwrap();
    note(
        "mirror ready",
        outcome(&mirror.wait_ready(wait).await.map(|j| j.status)),
    );
    note(
        "pivot",
        outcome(&mirror.pivot().await.map(|d| d.top_node())),
    );
    note("after pivot", storage_state(vm).await);
    let mut mirror = vm
        .mirror_disk("s", qhotplug::MirrorConfig::new(dir.join("other.qcow2")))
        .await
        .unwrap();
    mirror.wait_ready(wait).await.unwrap();
    note(
        "abandon",
        outcome(&mirror.abandon().await.map(|p| p.exists())),
    );
    note("after abandon", storage_state(vm).await);
    vm.snapshot(qhotplug::SnapshotConfig::new().disk("s", dir.join("s.2.qcow2")))
        .await
        .unwrap();
    let stream = vm.stream_disk("s").await.unwrap();
    note(
        "stream",
        outcome(&stream.wait(wait).await.map(|d| d.backing.len())),
    );
    note("after stream", storage_state(vm).await);
    let full = qhotplug::BackupConfig::full()
        .disk("s", dir.join("full.qcow2"))
        .checkpoint("c1");
    let done = vm.backup(full).await.unwrap().wait(wait).await;
    note(
        "full backup",
        outcome(&done.map(|d| d[0].checkpoints.clone())),
    );
    note("after full backup", storage_state(vm).await);
    let since = qhotplug::BackupConfig::incremental("c1")
        .disk("s", dir.join("inc.qcow2"))
        .checkpoint("c2");
    let done = vm.backup(since).await.unwrap().wait(wait).await;
    note(
        "incremental",
        outcome(&done.map(|d| d[0].checkpoints.clone())),
    );
    note("after incremental", storage_state(vm).await);
    let server = qhotplug::NbdServer::Unix(dir.join("pull.sock"));
    let pull = vm
        .pull_backup(
            qhotplug::PullConfig::incremental("c2", server)
                .disk("s", dir.join("scratch.qcow2"))
                .checkpoint("c3"),
        )
        .await
        .unwrap();
    note("pulling", jobs_and_exports(vm).await);
    note(
        "pull",
        outcome(&pull.finish().await.map(|d| d[0].checkpoints.clone())),
    );
    note("after pull", storage_state(vm).await);
    let unknown = vm
        .backup(qhotplug::BackupConfig::incremental("nope").disk("s", dir.join("x.qcow2")))
        .await;
    note("unknown checkpoint", outcome(&unknown.map(|_| ())));
    let twice = vm
        .snapshot(qhotplug::SnapshotConfig::new().disk("s", dir.join("full.qcow2")))
        .await;
    note("overlay exists", outcome(&twice.map(|_| ())));
    note(
        "checkpoint gone",
        outcome(&vm.delete_checkpoint("s", "c1").await),
    );
    note("end", storage_state(vm).await);
    seen
}

/// vCPUs: one at boot, three slots. Hot-adds in a guest that never acknowledges them (no guest
/// OS), a count out of range, the slots as QEMU lists them.
async fn vcpu_scenarios(vm: &Vm) -> Vec<String> {
    let mut seen = Vec::new();
    let mut note = |what: &str, text: String| seen.push(format!("{what}: {text}"));
    let slots = |vm: &Vm| {
        let vm = vm.clone();
        async move {
            let slots = vm.vcpu_slots().await.unwrap();
            let list: Vec<String> = slots
                .iter()
                .map(|s| format!("{}:{:?}:{:?}", s.kind, s.props, s.qom_path))
                .collect();
            list.join(" ")
        }
    };
    note("slots", slots(vm).await);
    let quick = vm.with_unplug_policy(UnplugPolicy::new(Duration::from_millis(200)));
    note("two", outcome(&quick.set_vcpus(2).await));
    note("four", outcome(&quick.set_vcpus(4).await));
    note("three", outcome(&quick.set_vcpus(3).await));
    note("after", slots(vm).await);
    note("state", state(vm).await);
    seen
}

/// Memory: two DIMM slots under a 512 MiB `maxmem`, a DIMM, one too big, a virtio-mem device and
/// a resize no guest answers, the balloon, an unplug that stays pending.
async fn memory_scenarios(vm: &Vm) -> Vec<String> {
    let mut seen = Vec::new();
    let mut note = |what: &str, text: String| seen.push(format!("{what}: {text}"));
    let memory = |vm: &Vm| {
        let c = vm.client().clone();
        async move {
            let list = c
                .execute(&qhotplug_qmp::command::QueryMemoryDevices)
                .await
                .unwrap();
            format!("{list:?}")
                .replace("addr: 4294967296", "addr: _")
                .replace("addr: 4429185024", "addr: _")
        }
    };
    let quick = vm.with_unplug_policy(UnplugPolicy::new(Duration::from_millis(200)));
    note(
        "dimm",
        outcome(&vm.add_memory(MemoryConfig::dimm("m1", 128 * MIB)).await),
    );
    note(
        "too big",
        outcome(&vm.add_memory(MemoryConfig::dimm("m2", 1024 * MIB)).await),
    );
    let vmem = MemoryConfig::virtio_mem("v1", 128 * MIB, 0);
    note(
        "virtio-mem",
        outcome(&vm.add_memory(vmem).await.map(|m| m.id)),
    );
    note(
        "resize",
        outcome(&quick.resize_virtio_mem("v1", 64 * MIB).await),
    );
    note(
        "bad resize",
        outcome(&quick.resize_virtio_mem("v1", 3 * MIB).await),
    );
    note("memory", memory(vm).await);
    note("no balloon", outcome(&vm.balloon_actual().await));
    note(
        "balloon",
        outcome(
            &vm.add_balloon(BalloonConfig::new("b0"))
                .await
                .map(|b| b.pci),
        ),
    );
    note("target", outcome(&vm.set_balloon(64 * MIB).await));
    note("actual", outcome(&vm.balloon_actual().await));
    note("remove dimm", outcome(&quick.remove_memory("m1").await));
    note("state", state(vm).await);
    seen
}

/// vhost-user frontends on a VM with shared memory: a disk on a storage daemon's export, a
/// virtio-fs share on virtiofsd (on the real QEMU; the mock has no backend to talk to), each on
/// its chardev; a duplicate; removals a guest never answers.
async fn vhost_user_scenarios(vm: &Vm, dir: &Path) -> Vec<String> {
    let mut seen = Vec::new();
    let mut note = |what: &str, text: String| seen.push(format!("{what}: {text}"));
    let blk = VhostUserBlkConfig::new("vdisk", dir.join("vdisk.sock"));
    note(
        "vhost-user disk",
        outcome(&vm.add_vhost_user_blk(blk).await.map(|d| d.pci)),
    );
    let fs = || VirtioFsConfig::new("fs0", dir.join("fs.sock"), "share");
    note(
        "virtio-fs",
        outcome(&vm.add_virtio_fs(fs()).await.map(|d| d.pci)),
    );
    note("same share", outcome(&vm.add_virtio_fs(fs()).await));
    note("after adds", state(vm).await);
    let hasty = vm.with_unplug_policy(UnplugPolicy::new(Duration::from_millis(200)));
    note(
        "remove disk",
        outcome(&hasty.remove_vhost_user_blk("vdisk").await),
    );
    note(
        "remove share",
        outcome(&hasty.remove_virtio_fs("fs0").await),
    );
    note("end", state(vm).await);
    seen
}

/// Runs `scenarios` on real QEMU 7.2/10.0 (pc with `pc_spec`'s SCSI controller, running, no guest
/// OS) and on the mock (a guest that never answers a PCI unplug), and compares what they saw.
async fn compare<F, Fut>(scenarios: F)
where
    F: Fn(Vm, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    compare_on(pc_spec(), |q| q, scenarios).await
}

/// As [`compare`], with this spec, and the mock shaped to match it by `shape`.
async fn compare_on<F, Fut>(spec: VmSpec, shape: impl Fn(MockQemu) -> MockQemu, scenarios: F)
where
    F: Fn(Vm, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let t = TestVm::running(spec.clone()).await;
    let real = scenarios(t.vm.clone(), t.dir().to_owned()).await;
    // The same machine: `pc_spec` boots a virtio-scsi controller at slot 3.
    let qemu = shape(MockQemu::pc().with_scsi_controller("scsi0", 3));
    qemu.guest_unplug(GuestUnplug::Never);
    // Running, as the real one is.
    let client = qemu.connect().await.unwrap();
    client.execute(&qhotplug_qmp::command::Cont).await.unwrap();
    let vm = Vm::attach(client, spec).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mocked = scenarios(vm, dir.path().to_owned()).await;
    // Shown when a comparison fails, with the line that differs.
    eprintln!("real QEMU saw:\n{}", real.join("\n"));
    for (r, m) in real.iter().zip(&mocked) {
        assert_eq!(r, m, "real QEMU and the mock differ");
    }
    assert_eq!(real.len(), mocked.len());
}

#[test]
fn the_mock_and_real_qemu_agree_on_rngs_serial_ports_and_their_backends() {
    qhotplug_tests::serial_test(compare(|vm, dir| async move {
        virtio_scenarios(&vm, &dir).await
    }));
}

#[test]
fn the_mock_and_real_qemu_agree_on_vcpu_slots_and_hot_adds() {
    let mut spec = pc_spec();
    spec.cpu_topology = Some(qhotplug::CpuTopology::max(3));
    qhotplug_tests::serial_test(compare_on(
        spec,
        |q| q.with_vcpus(1, 3),
        |vm, _| async move { vcpu_scenarios(&vm).await },
    ));
}

#[test]
fn the_mock_and_real_qemu_agree_on_memory_devices_and_the_balloon() {
    let mut spec = pc_spec();
    spec.memory_slots = 2;
    spec.max_memory_mib = Some(512);
    qhotplug_tests::serial_test(compare_on(
        spec,
        |q| q.with_memory(128, 2, Some(512)),
        |vm, _| async move { memory_scenarios(&vm).await },
    ));
}

#[test]
fn the_mock_and_real_qemu_agree_on_vhost_user_disks_and_virtio_fs() {
    qhotplug_tests::serial_test(async {
        // The real QEMU's backends: a storage daemon exporting a disk, virtiofsd sharing a folder.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let qsd = StorageDaemon::launch(StorageDaemonLauncher::new(d.join("qsd")))
            .await
            .unwrap();
        qsd.export(
            "vdisk",
            &image(&d, "vdisk.raw", 8),
            &d.join("vdisk.sock"),
            true,
        )
        .await
        .unwrap();
        std::fs::create_dir_all(d.join("shared")).unwrap();
        let _fsd = VirtiofsdLauncher::new(d.join("shared"), d.join("fs.sock"))
            .launch()
            .unwrap();
        let mut spec = pc_spec();
        spec.memory_mib = 256;
        spec.memory_backend = Some(MemoryBackend::shared_memfd("ram", 256 * MIB));
        compare_on(
            spec,
            |q| q,
            |vm, _| {
                let d = d.clone();
                async move { vhost_user_scenarios(&vm, &d).await }
            },
        )
        .await;
        drop(qsd);
    });
}

#[test]
fn the_mock_and_real_qemu_agree_on_snapshots_jobs_backups_and_checkpoints() {
    qhotplug_tests::serial_test(compare(|vm, dir| async move {
        storage_scenarios(&vm, &dir).await
    }));
}

#[test]
fn the_mock_and_real_qemu_agree_on_a_cdrom_drive_and_its_media() {
    qhotplug_tests::serial_test(compare(|vm, dir| async move {
        cdrom_scenarios(&vm, &dir).await
    }));
}

#[test]
fn the_mock_and_real_qemu_observe_the_same_scenarios() {
    qhotplug_tests::serial_test(async {
        // Real QEMU: pc, running, no guest OS (PCI unplugs stay pending), a real tap. Running,
        // because QEMU before 9.1 keeps a removed fd set's fds (and lists them) while paused.
        let t = TestVm::running(pc_spec()).await;
        let tap = qhotplug::TapBuilder::new("qhm%d").create().unwrap();
        let real = scenarios(
            &t.vm,
            t.dir(),
            NicConfig::new("n1", tap).no_vhost(),
            "virtio-balloon-pci",
        )
        .await;

        // The mock: the same machine, a guest that never answers a PCI unplug.
        let qemu = MockQemu::pc().with_scsi_controller("scsi0", 3);
        qemu.guest_unplug(GuestUnplug::Never);
        let client = qemu.connect().await.unwrap();
        let vm = Vm::attach(client, pc_spec()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let nic = NicConfig::from_fds("n1", vec![qhotplug_tests::pipe_fd()]).no_vhost();
        let mocked = scenarios(&vm, dir.path(), nic, "virtio-balloon-pci").await;

        for (r, m) in real.iter().zip(&mocked) {
            assert_eq!(r, m, "real QEMU and the mock differ");
        }
        assert_eq!(real.len(), mocked.len());
        // The mock recorded what it was given: the image for each disk, the tap for the NIC.
        let fds: Vec<String> = qemu.received_fds().into_iter().map(|r| r.command).collect();
        assert_eq!(fds, ["add-fd", "add-fd", "getfd", "add-fd", "add-fd"]);
    });
}

#[test]
fn the_mock_fails_a_named_command_and_its_guest_refuses_or_takes_its_time() {
    qhotplug_tests::serial_test(async {
        let qemu = MockQemu::pc();
        let vm = Vm::attach(
            qemu.connect().await.unwrap(),
            qhotplug::VmSpec::new("m", qhotplug::Machine::Pc),
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let raw = image(dir.path(), "m.raw", 1);
        // A failure injected at the format node: everything before it is undone.
        qemu.fail_next("blockdev-add", "injected");
        let err = vm
            .add_disk(DiskConfig::virtio_blk("f1", &raw))
            .await
            .unwrap_err();
        assert_eq!(
            outcome::<()>(&Err(err)),
            "failed at blockdev-add, 0 undo failures"
        );
        assert!(
            qemu.block_nodes().is_empty() && qemu.fdsets().is_empty() && qemu.devices().is_empty()
        );

        vm.add_disk(DiskConfig::virtio_blk("f1", &raw))
            .await
            .unwrap();
        qemu.guest_unplug(GuestUnplug::Refuse);
        match vm.remove_disk("f1").await {
            Err(Error::UnplugRejected { id, .. }) => assert_eq!(id, "f1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(qemu.devices().len(), 1, "kept");

        // A failure at the step after device_add: the device is taken back, then its nodes.
        qemu.guest_unplug(GuestUnplug::Release);
        qemu.fail_next("block_set_io_throttle", "injected");
        let limits = qhotplug::IoLimits {
            iops: 10,
            ..qhotplug::IoLimits::default()
        };
        let raw2 = image(dir.path(), "m2.raw", 1);
        let err = vm
            .add_disk(DiskConfig::virtio_blk("f2", &raw2).io_limits(limits))
            .await
            .unwrap_err();
        assert_eq!(
            outcome::<()>(&Err(err)),
            "failed at block_set_io_throttle, 0 undo failures"
        );
        assert_eq!(qemu.devices().len(), 1, "only f1");
        assert!(!qemu
            .block_nodes()
            .iter()
            .any(|n| n.node_name.starts_with("f2")));
        qemu.guest_unplug(GuestUnplug::After(Duration::from_millis(50)));
        vm.remove_disk("f1").await.unwrap();
        assert!(qemu.devices().is_empty() && qemu.block_nodes().is_empty());
    });
}
