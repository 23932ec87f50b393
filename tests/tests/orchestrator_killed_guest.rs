//! The orchestrator SIGKILLed at a random moment, round after round, on one VM with a booted
//! guest: each round a child process attaches (with the spec the last one kept, or none), runs
//! one operation drawn at random (a disk's or a NIC's hot-add or removal, a snapshot, a mirror
//! and its pivot, a full backup) and kills itself when a random step of it begins. Then the
//! parent, as the next process, attaches (with the kept spec, or none), ends the jobs it finds,
//! reconciles, and checks that its view is QEMU's read afresh, that QEMU, the host and the guest
//! hold what the view says and nothing else (`state_check`), and that the guest sees each disk.
//!
//! Beside them, deterministic: each step of a NIC's, a DIMM's, an RNG's, a balloon's, a
//! virtio-serial controller's, a vhost-user disk's and a virtio-fs device's removal (the kinds
//! whose unplug the guest answers) killed in turn, the guest letting the device go; and each
//! step of a vCPU's hot-add, the guest seeing every vCPU QEMU has.
//!
//! The suite runs a short seeded run on pc and q35; a long one:
//!
//! ```sh
//! QHOTPLUG_KILL_ROUNDS=200 QHOTPLUG_KILL_SEED=$RANDOM \
//!   cargo nextest run -p qhotplug-tests --test orchestrator_killed_guest
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use qhotplug::{
    BackupConfig, BalloonConfig, DiskConfig, Format, MemoryBackend, MemoryConfig, MirrorConfig,
    NicConfig, RngConfig, SnapshotConfig, VhostUserBlkConfig, VirtioFsConfig, VirtioSerialConfig,
    Vm, MIB,
};
use qhotplug_netdev::TapBuilder;
use qhotplug_qmp::EventKind;
use qhotplug_tests::servers::vhost_user_backends;
use qhotplug_tests::state_check::{differences, Check, Start};
use qhotplug_tests::timing::{kill_at_step, run_killed_child};
use qhotplug_tests::{image, pc_spec, q35_spec, second_monitor, Guest, SplitMix};

/// How long the guest may take to show a change, and a job to end (TCG).
const SEEN: Duration = Duration::from_secs(30);
/// The disk ids drawn from.
const DISKS: [&str; 3] = ["d1", "d2", "d3"];
/// The NIC ids drawn from.
const NICS: [&str; 2] = ["n1", "n2"];
/// The step of a NIC's hot-add between `getfd` and `netdev_add`: killed there, QEMU keeps a tap
/// fd nothing in QMP names (README: what `reconcile` cannot find). Not drawn.
const NIC_TAP_PASSED: usize = 1;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The taps of this test process's children: the parent's pid in their names.
fn tap_prefix() -> String {
    format!("qk{}-", std::process::id())
}

/// The child's part (run by the parent, never alone): attach (with `dir/kept.json` if it is
/// there), run `QHOTPLUG_KILL_OP` on `QHOTPLUG_KILL_ID`, SIGKILL itself when step
/// `QHOTPLUG_KILL_STEP` begins; `dir/done` if it never did.
#[test]
#[ignore = "the child of a_killed_orchestrators_vm_is_settled_round_after_round"]
fn operation_that_gets_killed() {
    let Some(dir) = std::env::var_os("QHOTPLUG_KILL_DIR").map(PathBuf::from) else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap();
    let (op, id, round) = (
        var("QHOTPLUG_KILL_OP"),
        var("QHOTPLUG_KILL_ID"),
        var("QHOTPLUG_KILL_ROUND"),
    );
    let step: usize = var("QHOTPLUG_KILL_STEP").parse().unwrap();
    kill_at_step(step);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let client = qhotplug_qmp::connect(&dir.join("mon2.sock")).await.unwrap();
            let vm = match std::fs::read_to_string(dir.join("kept.json")) {
                Ok(kept) => Vm::attach(client, qhotplug::VmSpec::from_json(&kept).unwrap())
                    .await
                    .unwrap(),
                Err(_) => Vm::attach_without_spec(client).await.unwrap().0,
            };
            let file = |name: String| dir.join(name);
            match op.as_str() {
                "add_disk" => {
                    let config = DiskConfig::virtio_blk(&id, file(format!("{id}.raw")));
                    drop(vm.add_disk(config).await.unwrap());
                }
                "remove_disk" => vm.remove_disk(&id).await.unwrap(),
                "add_nic" => {
                    let prefix = var("QHOTPLUG_KILL_TAPS");
                    let tap = TapBuilder::new(format!("{prefix}%d")).create().unwrap();
                    drop(
                        vm.add_nic(NicConfig::new(&id, tap).no_vhost())
                            .await
                            .unwrap(),
                    );
                }
                op if REMOVALS.iter().any(|(o, _)| *o == op) => remove(&vm, op, &id).await,
                "add_vcpu" => {
                    let spec = vm.spec();
                    let now = spec.smp + spec.vcpus.len() as u32;
                    drop(vm.set_vcpus(now + 1).await.unwrap());
                }
                "snapshot" => {
                    let overlay = file(format!("{id}.s{round}.qcow2"));
                    drop(
                        vm.snapshot(SnapshotConfig::new().disk(&id, overlay))
                            .await
                            .unwrap(),
                    );
                }
                "mirror" => {
                    let copy = file(format!("{id}.m{round}.qcow2"));
                    let config = MirrorConfig::new(copy).format(Format::Qcow2);
                    let mut job = vm.mirror_disk(&id, config).await.unwrap();
                    job.wait_ready(SEEN).await.unwrap();
                    job.pivot().await.unwrap();
                }
                "backup" => {
                    let target = file(format!("{id}.b{round}.qcow2"));
                    let config = BackupConfig::full().disk(&id, target);
                    vm.backup(config).await.unwrap().wait(SEEN).await.unwrap();
                }
                other => panic!("no operation {other}"),
            }
            std::fs::write(dir.join("done"), "").unwrap();
        });
}

/// Runs the child; true when it finished before its step came.
async fn run_child(dir: &Path, op: &str, id: &str, round: u64, step: usize) -> bool {
    let env = [
        ("QHOTPLUG_KILL_DIR", dir.display().to_string()),
        ("QHOTPLUG_KILL_OP", op.to_owned()),
        ("QHOTPLUG_KILL_ID", id.to_owned()),
        ("QHOTPLUG_KILL_ROUND", round.to_string()),
        ("QHOTPLUG_KILL_STEP", step.to_string()),
        ("QHOTPLUG_KILL_TAPS", tap_prefix()),
    ];
    run_killed_child("operation_that_gets_killed", dir, &env).await
}

/// An operation for the VM as `spec` has it: on a disk or NIC it has, or adding one it has not.
fn draw(rng: &mut SplitMix, spec: &qhotplug::VmSpec) -> (&'static str, &'static str) {
    if rng.chance(4) {
        let id = *rng.pick(&NICS);
        let has = spec.nics.iter().any(|n| n.id == id);
        return (if has { "remove_nic" } else { "add_nic" }, id);
    }
    let id = *rng.pick(&DISKS);
    if !spec.disks.iter().any(|d| d.id == id) {
        return ("add_disk", id);
    }
    let op = *rng.pick(&["remove_disk", "snapshot", "mirror", "backup", "snapshot"]);
    (op, id)
}

/// Rounds of a child killed at random on a guest booted from `spec`.
async fn rounds(mut spec: qhotplug::VmSpec, default_seed: u64, default_rounds: u64) {
    let seed = env_u64("QHOTPLUG_KILL_SEED", default_seed);
    let rounds = env_u64("QHOTPLUG_KILL_ROUNDS", default_rounds);
    let mut rng = SplitMix(seed);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    second_monitor(&mut spec, &d.join("mon2.sock"));
    let g = Guest::boot(spec, |l| l).await;
    for id in DISKS {
        image(d, &format!("{id}.raw"), 1);
    }
    let pid = g.vm.pid().unwrap();
    let start = Start::take(&g.vm, pid).await;
    let prefix = tap_prefix();
    let mut kept = Some(g.vm.spec());
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..rounds {
        // The child attaches with the spec the last process kept, or with none.
        match &kept {
            Some(spec) if rng.chance(2) => {
                std::fs::write(d.join("kept.json"), spec.to_json().unwrap()).unwrap()
            }
            _ => {
                let _ = std::fs::remove_file(d.join("kept.json"));
            }
        }
        let now = kept.clone().unwrap_or_else(|| g.vm.spec());
        let (op, id) = draw(&mut rng, &now);
        let mut step = rng.below(10) as usize;
        if op == "add_nic" && step == NIC_TAP_PASSED {
            step += 1;
        }
        let finished = run_child(d, op, id, round, step).await;
        let case = format!("seed {seed} round {round}: {op} {id} killed at step {step}");
        *tally
            .entry(format!("{op}{}", if finished { "" } else { " killed" }))
            .or_default() += 1;

        // The next process: attach (with the kept spec, or none), end the jobs, reconcile.
        let client = qhotplug_qmp::connect(&d.join("mon2.sock")).await.unwrap();
        let vm = match (&kept, rng.chance(2)) {
            (Some(spec), true) => Vm::attach(client, spec.clone()).await.unwrap(),
            _ => Vm::attach_without_spec(client).await.unwrap().0,
        };
        for job in vm.jobs().await.unwrap() {
            job.cancel().await.unwrap();
        }
        // A removal it was killed in is the orchestrator's to finish: the guest may have let
        // the device go while QEMU still lists it (its eject half done).
        vm.reconcile().await.unwrap();
        let listed = |spec: &qhotplug::VmSpec| {
            spec.disks.iter().any(|x| x.id == id) || spec.nics.iter().any(|x| x.id == id)
        };
        if !finished && op.starts_with("remove_") && listed(&vm.spec()) {
            match op {
                "remove_disk" => vm.remove_disk(id).await.unwrap(),
                _ => vm.remove_nic(id).await.unwrap(),
            }
        }
        settled(&vm, &g, &start, pid, &prefix, &case).await;
        kept = Some(vm.spec());
    }
    println!("seed {seed}, {rounds} rounds: {tally:?}");
}

/// Reconciles until the view is QEMU's and QEMU, the host and the guest hold what it says; a
/// guest's unplug a dead process asked for may still be under way, so each try waits for the
/// next `DEVICE_DELETED` (or a short while), by a deadline.
async fn settled(vm: &Vm, g: &Guest, start: &Start, pid: u32, prefix: &str, case: &str) {
    let mut events = vm.client().events();
    let deadline = tokio::time::Instant::now() + SEEN;
    // Said first: the guest's checks in `differences` panic at their deadline.
    println!("checking {case}");
    loop {
        vm.settle().await;
        vm.reconcile().await.unwrap();
        let again = vm.reconcile().await.unwrap();
        let (fresh, gaps) = Vm::attach_without_spec(vm.client().clone()).await.unwrap();
        let spec = vm.spec();
        let start = start.with_our_fds_now();
        let check = Check {
            vm,
            pid,
            console: &g.console,
            start: &start,
            tap_prefix: prefix,
            ignore: &[],
            seen: SEEN,
        };
        let mut wrong = differences(&check, true).await;
        if !again.is_empty() {
            wrong.push(format!("a second reconcile did something: {again:?}"));
        }
        // What only the command line said (`Unreadable::LaunchOptions`) is a kept spec's alone.
        // And the order of devices is the order each joined the view.
        let launch_only = |mut s: qhotplug::VmSpec| {
            s.extra_args.clear();
            s.sort_by_id();
            s
        };
        if launch_only(fresh.spec()) != launch_only(spec.clone()) {
            let (read, view) = (fresh.spec(), spec.clone());
            let differs = |a: &qhotplug::VmSpec, b: &qhotplug::VmSpec| {
                a.disks
                    .iter()
                    .filter(|d| !b.disks.contains(d))
                    .cloned()
                    .collect::<Vec<_>>()
            };
            let (r, v) = (
                format!("{:?}", launch_only(read.clone())),
                format!("{:?}", launch_only(view.clone())),
            );
            let at = r
                .bytes()
                .zip(v.bytes())
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            let around = |t: &str| t[at.saturating_sub(80)..(at + 120).min(t.len())].to_owned();
            wrong.push(format!(
                "read afresh, disks not in the view: {:?}\nthe view's not read: {:?}\nread {}\nview {}\nunread: {gaps:?}",
                differs(&read, &view),
                differs(&view, &read),
                around(&r),
                around(&v)
            ));
        }
        if wrong.is_empty() {
            // The guest sees each disk the view has.
            let disks = spec.disks.len().to_string();
            let seen = g.console.run("ls /sys/block | grep -c '^vd'", SEEN).await;
            if seen == [disks.clone()] {
                return;
            }
            wrong.push(format!("the guest has {seen:?} disks, the view {disks}"));
        }
        let now = tokio::time::Instant::now();
        assert!(now < deadline, "{case}: {wrong:#?}");
        let deleted = |e: &EventKind| matches!(e, EventKind::DeviceDeleted(_));
        events
            .wait_for((now + Duration::from_millis(200)).min(deadline), deleted)
            .await;
    }
}

#[test]
fn a_killed_orchestrators_vm_is_settled_round_after_round_pc() {
    qhotplug_tests::serial_test(rounds(pc_spec(), 37, 10));
}

#[test]
fn a_killed_orchestrators_vm_is_settled_round_after_round_q35() {
    qhotplug_tests::serial_test(rounds(q35_spec(6), 3737, 6));
}

/// The removals whose unplug the guest answers, each with the id of the device it removes.
const REMOVALS: [(&str, &str); 7] = [
    ("remove_nic", "n1"),
    ("remove_memory", "m1"),
    ("remove_rng", "r1"),
    ("remove_balloon", "b0"),
    ("remove_virtio_serial", "vser1"),
    ("remove_vhost_user_blk", "vdisk"),
    ("remove_virtio_fs", "fs0"),
];

/// Removes `id` by the call `op` names.
async fn remove(vm: &Vm, op: &str, id: &str) {
    match op {
        "remove_nic" => vm.remove_nic(id).await.unwrap(),
        "remove_memory" => vm.remove_memory(id).await.unwrap(),
        "remove_rng" => vm.remove_rng(id).await.unwrap(),
        "remove_balloon" => vm.remove_balloon(id).await.unwrap(),
        "remove_virtio_serial" => vm.remove_virtio_serial(id).await.unwrap(),
        "remove_vhost_user_blk" => vm.remove_vhost_user_blk(id).await.unwrap(),
        "remove_virtio_fs" => vm.remove_virtio_fs(id).await.unwrap(),
        other => panic!("no removal {other}"),
    }
}

/// Adds `id`, the device `op` removes, through `vm`; its backends (a tap named after `prefix`,
/// the storage daemon's export, a virtiofsd for this once) are in `dir`.
async fn add(
    vm: &Vm,
    op: &str,
    id: &str,
    dir: &Path,
    prefix: &str,
) -> Option<qhotplug::QemuProcess> {
    match op {
        "remove_nic" => {
            let tap = TapBuilder::new(format!("{prefix}%d")).create().unwrap();
            drop(
                vm.add_nic(NicConfig::new(id, tap).no_vhost())
                    .await
                    .unwrap(),
            );
        }
        "remove_memory" => drop(
            vm.add_memory(MemoryConfig::dimm(id, 128 * MIB))
                .await
                .unwrap(),
        ),
        "remove_rng" => drop(vm.add_rng(RngConfig::new(id)).await.unwrap()),
        "remove_balloon" => drop(vm.add_balloon(BalloonConfig::new(id)).await.unwrap()),
        "remove_virtio_serial" => drop(
            vm.add_virtio_serial(VirtioSerialConfig::new(id))
                .await
                .unwrap(),
        ),
        "remove_vhost_user_blk" => {
            let config = VhostUserBlkConfig::new(id, dir.join("vdisk.sock"));
            drop(vm.add_vhost_user_blk(config).await.unwrap());
        }
        _ => {
            // virtiofsd serves one connection: a new one for each device.
            let socket = dir.join("fs.sock");
            let _ = std::fs::remove_file(&socket);
            let fsd = qhotplug::VirtiofsdLauncher::new(dir.join("shared"), &socket)
                .launch()
                .unwrap();
            drop(
                vm.add_virtio_fs(VirtioFsConfig::new(id, socket, "share"))
                    .await
                    .unwrap(),
            );
            return Some(fsd);
        }
    }
    None
}

/// How many of `op`'s device the guest has: NICs, RNGs, memory blocks, virtio devices.
async fn in_guest(g: &Guest, op: &str) -> usize {
    let driver = |name: &str| format!("ls /sys/bus/virtio/drivers/{name} | grep -c virtio");
    let command = match op {
        "remove_nic" => "ls /sys/class/net | grep -c '^eth'".to_owned(),
        "remove_rng" => {
            "tr ' ' '\\n' < /sys/class/misc/hw_random/rng_available | grep -c virtio_rng".to_owned()
        }
        "remove_memory" => "ls -d /sys/devices/system/memory/memory* | wc -l".to_owned(),
        "remove_balloon" => driver("virtio_balloon"),
        "remove_virtio_serial" => driver("virtio_console"),
        "remove_vhost_user_blk" => driver("virtio_blk"),
        _ => driver("virtiofs"),
    };
    let out = g.console.run(&command, SEEN).await;
    out.first()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("{command}: {out:?}"))
}
/// Waits until the number of `op`'s device the guest has is `done`, between tries for the next
/// event or a short while, by a deadline.
async fn in_guest_until(g: &Guest, op: &str, case: &str, done: impl Fn(usize) -> bool) {
    let deadline = tokio::time::Instant::now() + SEEN;
    let mut events = g.vm.client().events();
    loop {
        let now = in_guest(g, op).await;
        if done(now) {
            return;
        }
        let at = tokio::time::Instant::now();
        assert!(at < deadline, "{case}: the guest has {now}");
        let any = |_: &EventKind| true;
        events.wait_for(at + Duration::from_millis(200), any).await;
    }
}

#[test]
fn each_step_of_a_removal_the_guest_answers_killed_in_turn_is_settled() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut spec = pc_spec();
        spec.memory_slots = 2;
        spec.max_memory_mib = Some(1024);
        // Shared with the vhost-user backends.
        spec.memory_mib = 256;
        spec.memory_backend = Some(MemoryBackend::shared_memfd("ram", 256 * MIB));
        second_monitor(&mut spec, &d.join("mon2.sock"));
        let g = Guest::boot(spec, |l| l).await;
        let pid = g.vm.pid().unwrap();
        let start = Start::take(&g.vm, pid).await;
        let prefix = tap_prefix();
        let attach = || async {
            let client = qhotplug_qmp::connect(&d.join("mon2.sock")).await.unwrap();
            Vm::attach_without_spec(client).await.unwrap().0
        };
        let _backends = vhost_user_backends(d).await;
        for (op, id) in REMOVALS {
            let without = in_guest(&g, op).await;
            for step in 0.. {
                let case = format!("{op} killed at step {step}");
                // The device, added by a process that attached after the last one settled.
                let vm = attach().await;
                let _fsd = add(&vm, op, id, d, &prefix).await;
                // A DIMM is blocks of memory, as many as the guest's kernel makes of it.
                in_guest_until(&g, op, &case, |n| n > without).await;
                drop(vm);
                let finished = run_child(d, op, id, 0, step).await;

                // The next process attaches with no spec, reconciles, and finishes a removal
                // it finds QEMU still has (the dead one's `device_del` may be under way).
                let vm = attach().await;
                vm.reconcile().await.unwrap();
                if vm.has_device(id).await.unwrap() {
                    assert!(!finished, "{case}: finished, yet listed");
                    remove(&vm, op, id).await;
                }
                settled(&vm, &g, &start, pid, &prefix, &case).await;
                in_guest_until(&g, op, &case, |n| n == without).await;
                if finished {
                    break;
                }
            }
        }
    });
}

#[test]
fn each_step_of_a_vcpus_hot_add_killed_in_turn_is_settled() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut spec = pc_spec();
        spec.cpu_topology = Some(qhotplug::CpuTopology::max(8));
        second_monitor(&mut spec, &d.join("mon2.sock"));
        let g = Guest::boot(spec, |l| l).await;
        let pid = g.vm.pid().unwrap();
        let start = Start::take(&g.vm, pid).await;
        let prefix = tap_prefix();
        // Each step from the count the last one left (a vCPU cannot be unplugged under TCG
        // before QEMU 10): one more each time.
        for step in 0.. {
            let case = format!("add_vcpu killed at step {step}");
            let finished = run_child(d, "add_vcpu", "", 0, step).await;
            let client = qhotplug_qmp::connect(&d.join("mon2.sock")).await.unwrap();
            let (vm, _) = Vm::attach_without_spec(client).await.unwrap();
            vm.reconcile().await.unwrap();
            settled(&vm, &g, &start, pid, &prefix, &case).await;
            // The guest has every vCPU QEMU has (present, whether or not it onlined them).
            let spec = vm.spec();
            let want = (spec.smp as usize + spec.vcpus.len()).to_string();
            let present = "ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l";
            let out = g
                .console
                .until(present, |o| o == [want.as_str()], SEEN)
                .await;
            assert_eq!(out, [want], "{case}");
            if finished {
                assert!(step > 0, "a vCPU's hot-add has steps");
                break;
            }
        }
    });
}
