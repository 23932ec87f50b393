//! Desired state against real QEMU and a booted guest: rounds of randomly drawn desired specs
//! (disks virtio and SCSI, NICs, a CD-ROM and its medium, vCPUs, a DIMM, the balloon and its
//! target, a virtio-serial controller with a port, an RNG, a vhost-user disk on
//! `qemu-storage-daemon`, a virtio-fs share on `virtiofsd`; sizes, I/O limits, links, read-only
//! and MAC changes), each applied by a handle the round attaches as an orchestrator that
//! restarted would (with the spec it kept, or with none), some as two applies at once, some
//! dropped part-way, some through a proxy that fails one QMP command at a random step. After
//! each: QEMU's state, the host's and the guest's equal the handle's spec (`state_check`); a plain
//! apply then finishes what failed; the plan is then empty, and the guest shows every device of
//! the desired spec.
//!
//! Seeded and reproducible: `QHOTPLUG_APPLY_SEED`, `QHOTPLUG_APPLY_ROUNDS`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use qhotplug::{
    Balloon, Cdrom, CpuTopology, Desired, Disk, DiskFrontend, IoLimits, MacAddr, Medium,
    MemoryBackend, MemoryDevice, Nic, Outcome, Pci, Rng, ScsiAddr, SerialPort, StorageDaemon,
    StorageDaemonLauncher, UnplugPolicy, VhostUserBlk, VirtioFs, VirtioSerial, VirtiofsdLauncher,
    Vm, VmSpec, MIB,
};
use qhotplug_netdev::TapBuilder;
use qhotplug_tests::state_check::{differences, Check, Start};
use qhotplug_tests::{image, iso, pc_spec, q35_spec, second_monitor, FaultProxy, Guest, SplitMix};

/// How long the guest may take to show a change (TCG).
const SEEN: Duration = Duration::from_secs(60);

/// The commands a fault may hit: one of each hot-add, hot-remove and live change's steps.
const FAULTS: [&str; 12] = [
    "add-fd",
    "blockdev-add",
    "device_add",
    "getfd",
    "netdev_add",
    "object-add",
    "chardev-add",
    "block_set_io_throttle",
    "block_resize",
    "set_link",
    "device_del",
    "blockdev-insert-medium",
];

fn tap_prefix() -> String {
    format!("qa{}-", std::process::id())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the rounds draw from on the host.
struct Fixtures {
    dir: PathBuf,
    /// Per disk id, its image (each a different size, so the guest tells them apart).
    images: BTreeMap<&'static str, PathBuf>,
    isos: [PathBuf; 2],
    vhost_socket: PathBuf,
    fs_socket: PathBuf,
}

const DISKS: [(&str, bool); 3] = [("d0", false), ("d1", false), ("d2", true)];
const NICS: [&str; 2] = ["n0", "n1"];

fn mac(id: &str, other: bool) -> MacAddr {
    let n = NICS.iter().position(|n| *n == id).unwrap() as u8;
    format!("52:54:00:aa:{:02x}:{:02x}", u8::from(other), n)
        .parse()
        .unwrap()
}

/// A drawn desired state: [`Drawn::desired`] makes it, with new taps, as often as asked.
struct Drawn {
    spec: VmSpec,
    sizes: Vec<(&'static str, u64)>,
    target: Option<u64>,
    concurrency: usize,
}

impl Drawn {
    /// The desired state, with a new tap for each NIC it may add.
    fn desired(&self) -> Desired {
        let mut desired = self.plain();
        for nic in &self.spec.nics {
            let tap = TapBuilder::new(format!("{}%d", tap_prefix()))
                .up(true)
                .create()
                .expect("tap");
            desired = desired.nic_tap(nic.id.clone(), tap);
        }
        desired
    }

    /// The desired state without taps, to plan.
    fn plain(&self) -> Desired {
        let mut desired = Desired::new(self.spec.clone()).concurrency(self.concurrency);
        for (id, size) in &self.sizes {
            desired = desired.disk_size(*id, *size);
        }
        if let Some(target) = self.target {
            desired = desired.balloon_target(target);
        }
        desired
    }
}

/// Draws a desired spec: the VM's launch spec (`base`) plus devices, each by a coin, and live
/// values. `now` is the VM's spec, for what may only grow (vCPUs under TCG, disk sizes: a raw
/// image's file grows with its disk) and for virtio-fs (its daemon serves one connection: added
/// once, it stays).
fn draw(rng: &mut SplitMix, base: &VmSpec, now: &VmSpec, fx: &Fixtures) -> Drawn {
    let mut spec = base.clone();
    let mut sizes = Vec::new();
    for (id, scsi) in DISKS {
        if rng.chance(2) {
            continue;
        }
        let frontend = if scsi {
            DiskFrontend::ScsiHd(ScsiAddr::auto())
        } else {
            DiskFrontend::VirtioBlk(Pci::auto())
        };
        let mut disk = Disk::new(id, &fx.images[id], frontend);
        disk.read_only = rng.chance(6);
        disk.io_limits = match rng.below(3) {
            0 => None,
            1 => Some(IoLimits {
                bps: 8 * MIB,
                ..IoLimits::default()
            }),
            _ => Some(IoLimits {
                iops: 500,
                ..IoLimits::default()
            }),
        };
        // Only grown (a shrink loses data, and is its own call), never a read-only disk's.
        let file = std::fs::metadata(&fx.images[id]).unwrap().len();
        if !disk.read_only && rng.chance(4) {
            sizes.push((id, file + (1 + rng.below(2)) * MIB));
        }
        spec.disks.push(disk);
    }
    for id in NICS {
        if rng.chance(2) {
            spec.nics.push(Nic {
                id: id.into(),
                mac: mac(id, rng.chance(8)),
                queues: 1,
                pci: Pci::auto(),
                vhost: false,
                link_up: !rng.chance(3),
            });
        }
    }
    if !rng.chance(3) {
        let mut cd = Cdrom::scsi("c0", ScsiAddr::auto());
        cd.medium = match rng.below(3) {
            0 => None,
            n => Some(Medium::Image(fx.isos[n as usize - 1].clone())),
        };
        spec.cdroms.push(cd);
    }
    // vCPUs only grow: QEMU 7.2 under TCG cannot unplug one, and each hot-add takes one of
    // `maxcpus` translation contexts for the VM's life.
    let count = now.smp + now.vcpus.len() as u32;
    spec.smp = if count < 3 && rng.chance(4) {
        count + 1
    } else {
        count
    };
    if rng.chance(3) {
        spec.memory_devices
            .push(MemoryDevice::dimm("m0", 128 * MIB));
    }
    let mut target = None;
    if rng.chance(2) {
        spec.balloon = Some(Balloon {
            id: "b0".into(),
            pci: Pci::auto(),
        });
        // At most an eighth of the guest's memory ballooned away: the test guest's initramfs
        // holds much of its 512 MiB, and it adds memory (and its page structures) meanwhile.
        target = (!rng.chance(3)).then(|| *rng.pick(&[448 * MIB, 512 * MIB]));
    }
    if rng.chance(2) {
        spec.virtio_serials.push(VirtioSerial {
            id: "vs1".into(),
            pci: Pci::auto(),
        });
        spec.serial_ports.push(SerialPort {
            id: "p1".into(),
            bus: "vs1.0".into(),
            name: "org.qhotplug.apply".into(),
            socket: fx.dir.join(format!("p1-{}.sock", rng.next_u64())),
        });
    }
    if rng.chance(2) {
        spec.rngs.push(Rng {
            id: "r0".into(),
            pci: Pci::auto(),
            source: "/dev/urandom".into(),
        });
    }
    if rng.chance(2) {
        spec.vhost_user_blks.push(VhostUserBlk {
            id: "vu0".into(),
            socket: fx.vhost_socket.clone(),
            pci: Pci::auto(),
            num_queues: None,
        });
    }
    let fs_added = now.virtio_fs.iter().any(|f| f.id == "fs0");
    if fs_added || rng.chance(4) {
        spec.virtio_fs.push(VirtioFs {
            id: "fs0".into(),
            socket: fx.fs_socket.clone(),
            tag: "shared".into(),
            pci: Pci::auto(),
            queue_size: None,
        });
    }
    Drawn {
        spec,
        sizes,
        target,
        concurrency: 1 + rng.below(8) as usize,
    }
}

/// What the guest should show of `spec`: its disks' sizes (in 512-byte sectors, sorted: a raw
/// image's file is as long as its disk), the CD-ROM's medium, vCPUs, memory blocks, and how many
/// of each optional device there are.
fn expected_guest_view(spec: &VmSpec, base_blocks: u64, block: u64) -> Vec<String> {
    let mut disks: Vec<u64> = spec
        .disks
        .iter()
        .map(|d| std::fs::metadata(&d.path).unwrap().len() / 512)
        .chain(spec.vhost_user_blks.iter().map(|_| 8 * MIB / 512))
        .collect();
    disks.sort_unstable();
    let disks: Vec<String> = disks.iter().map(u64::to_string).collect();
    let sr = match spec.cdroms.first().map(|c| c.medium.as_ref()) {
        None => "none".to_owned(),
        // What `iso` put on it, from its source folder.
        Some(Some(Medium::Image(path))) => {
            std::fs::read_to_string(format!("{}.d/hello", path.display())).unwrap()
        }
        Some(_) => "empty".to_owned(),
    };
    let dimms: u64 = spec.memory_devices.iter().map(|m| m.size()).sum();
    vec![
        format!("disks {}", disks.join(" ")).trim_end().to_owned(),
        format!("sr {sr}"),
        format!("cpus {}", spec.smp + spec.vcpus.len() as u32),
        format!("blocks {}", base_blocks + dimms / block),
        format!("rng {}", spec.rngs.len()),
        format!(
            "ports {}",
            spec.serial_ports
                .iter()
                .filter(|p| p.name == "org.qhotplug.apply")
                .count()
        ),
        format!("balloon {}", u8::from(spec.balloon.is_some())),
        format!("fs {}", spec.virtio_fs.len()),
    ]
}

/// What the guest shows, in the lines [`expected_guest_view`] writes.
const GUEST_VIEW: &str = "echo disks $(cat /sys/block/vd*/size /sys/block/sd*/size 2>/dev/null | sort -n | tr '\\n' ' '); \
     mkdir -p /mnt; if [ ! -e /dev/sr0 ]; then echo sr none; \
     elif mount -t iso9660 -o ro /dev/sr0 /mnt 2>/dev/null; then echo sr $(cat /mnt/hello); umount /mnt; \
     else echo sr empty; fi; \
     echo cpus $(ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l); \
     echo blocks $(ls -d /sys/devices/system/memory/memory* | wc -l); \
     echo rng $(tr ' ' '\\n' < /sys/class/misc/hw_random/rng_available | grep -c virtio_rng); \
     echo ports $(cat /sys/class/virtio-ports/*/name 2>/dev/null | grep -c org.qhotplug.apply); \
     echo balloon $(ls /sys/bus/virtio/drivers/virtio_balloon 2>/dev/null | grep -c virtio); \
     echo fs $(ls /sys/bus/virtio/drivers/virtiofs 2>/dev/null | grep -c virtio)";

/// How a round applies.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Plain,
    /// Two applies of the same desired state at once.
    Twice,
    /// The apply's future dropped after this long.
    Dropped(Duration),
    /// Through a proxy that fails the `nth` request for the command.
    Fault(&'static str, usize),
}

async fn rounds(base: VmSpec, default_seed: u64, default_rounds: u64) {
    let seed = env_u64("QHOTPLUG_APPLY_SEED", default_seed);
    let rounds = env_u64("QHOTPLUG_APPLY_ROUNDS", default_rounds);
    let mut rng = SplitMix(seed);
    let dir = tempfile::tempdir().unwrap();
    let mon2 = dir.path().join("mon2.sock");
    let mut spec = base;
    second_monitor(&mut spec, &mon2);
    let g = Guest::boot(spec, |l| l).await;
    let pid = g.vm.pid().expect("launched");
    let launched = g.vm.spec();

    // The backends: a storage daemon's vhost-user export, virtiofsd's share.
    let qsd = StorageDaemon::launch(StorageDaemonLauncher::new(g.dir().join("qsd")))
        .await
        .unwrap();
    let vdisk = image(g.dir(), "vdisk.raw", 8);
    let vhost_socket = g.dir().join("vdisk.sock");
    qsd.export("vdisk", &vdisk, &vhost_socket, true)
        .await
        .unwrap();
    std::fs::create_dir_all(g.dir().join("shared")).unwrap();
    let fs_socket = g.dir().join("fs.sock");
    let _fsd = VirtiofsdLauncher::new(g.dir().join("shared"), &fs_socket)
        .launch()
        .unwrap();
    let fx = Fixtures {
        dir: g.dir().to_owned(),
        images: DISKS
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, image(g.dir(), &format!("{id}.raw"), i as u64 + 1)))
            .collect(),
        isos: [0, 1].map(|i| {
            iso(
                g.dir(),
                &format!("m{i}.iso"),
                "hello",
                &format!("medium {i}"),
            )
        }),
        vhost_socket,
        fs_socket,
    };
    let block = u64::from_str_radix(
        g.console
            .run("cat /sys/devices/system/memory/block_size_bytes", SEEN)
            .await[0]
            .trim(),
        16,
    )
    .unwrap();
    let base_blocks: u64 = g
        .console
        .run("ls -d /sys/devices/system/memory/memory* | wc -l", SEEN)
        .await[0]
        .trim()
        .parse()
        .unwrap();
    let start = Start::take(&g.vm, pid).await;
    let prefix = tap_prefix();
    // The spec the last handle left, as an orchestrator keeps it.
    let mut kept = launched.clone();
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();

    for round in 0..rounds {
        let drawn = draw(&mut rng, &launched, &kept, &fx);
        let mode = match rng.below(6) {
            0 => Mode::Twice,
            1 => Mode::Dropped(Duration::from_millis(rng.below(400))),
            2 | 3 => {
                let command = FAULTS[rng.below(FAULTS.len() as u64) as usize];
                Mode::Fault(command, 1 + rng.below(2) as usize)
            }
            _ => Mode::Plain,
        };
        let without_spec = rng.chance(3) && !matches!(mode, Mode::Fault(..));
        let log = format!("seed {seed} round {round} {mode:?} without_spec={without_spec}");

        // An orchestrator that (re)attached: with the spec it kept, or with none.
        let proxy = match mode {
            Mode::Fault(command, nth) => Some(FaultProxy::start(
                &dir.path().join(format!("proxy-{round}.sock")),
                &mon2,
                command,
                nth,
            )),
            _ => None,
        };
        let client = match &proxy {
            Some(p) => qhotplug_qmp::connect(p.path()).await.unwrap(),
            None => qhotplug_qmp::connect(&mon2).await.unwrap(),
        };
        let vm = if without_spec {
            Vm::attach_without_spec(client).await.expect(&log).0
        } else {
            Vm::attach(client, kept.clone()).await.expect(&log)
        };
        // The events QEMU sends meanwhile, for the failure message.
        let mut events = vm.client().events();
        // Our fds with this handle's connection in, before any tap is made.
        let start_now = start.with_our_fds_now();
        let results = match mode {
            Mode::Twice => {
                let (a, b) = tokio::join!(vm.apply(drawn.desired()), vm.apply(drawn.desired()));
                vec![a.expect(&log), b.expect(&log)]
            }
            Mode::Dropped(after) => {
                match tokio::time::timeout(after, vm.apply(drawn.desired())).await {
                    Ok(a) => vec![a.expect(&log)],
                    Err(_) => Vec::new(),
                }
            }
            Mode::Plain | Mode::Fault(..) => vec![vm.apply(drawn.desired()).await.expect(&log)],
        };
        for applied in &results {
            assert!(
                applied.needs_restart.is_empty(),
                "{log}: {:?}",
                applied.needs_restart
            );
            for (step, outcome) in &applied.steps {
                let word = match outcome {
                    Outcome::Done => "done".to_owned(),
                    Outcome::Failed(e) => format!("{e:?}")
                        .split([' ', '(', '{'])
                        .next()
                        .unwrap_or("")
                        .to_owned(),
                    Outcome::Skipped { .. } => "skipped".to_owned(),
                    _ => "other".to_owned(),
                };
                let change = step.change.to_string();
                let what: Vec<&str> = change.split(' ').take(2).collect();
                *tally
                    .entry(format!("{}: {word}", what.join(" ")))
                    .or_default() += 1;
            }
        }
        // Every step has ended, those of a dropped apply too; whatever happened, QEMU, the host
        // and the guest are what the handle says.
        vm.settle().await;
        let check = check_of(&vm, pid, &g.console, &start_now, &prefix);
        let diff = differences(&check, false).await;
        if !diff.is_empty() {
            use futures::StreamExt;
            let mut seen = Vec::new();
            while let Ok(Some(Ok(e))) =
                tokio::time::timeout(Duration::from_millis(10), events.next()).await
            {
                seen.push(format!("{:?} {}", e.kind(), e.data().get()));
            }
            let outcomes: Vec<String> = (results.iter().flat_map(|a| &a.steps))
                .map(|(s, o)| format!("{}: {o:?}", s.change))
                .collect();
            panic!("{log}: {diff:#?}\n{outcomes:#?}\nevents: {seen:#?}");
        }
        kept = vm.spec();
        // What QEMU cannot tell, the orchestrator knows: its launch options.
        kept.extra_args = launched.extra_args.clone();
        drop(vm);
        drop(proxy);

        // Restarted again, the orchestrator applies what it wants: everything is done, the plan
        // is then empty, and the guest shows the desired VM.
        let client = qhotplug_qmp::connect(&mon2).await.unwrap();
        // A guest under TCG may take longer than the default deadline to give memory back.
        let vm = Vm::attach(client, kept.clone())
            .await
            .expect(&log)
            .with_unplug_policy(UnplugPolicy::new(Duration::from_secs(180)));
        let start_now = start.with_our_fds_now();
        let again = vm.apply(drawn.desired()).await.expect(&log);
        for (step, outcome) in &again.steps {
            assert!(
                matches!(outcome, Outcome::Done),
                "{log}: then {}: {outcome:?}\nthe guest's console ends: {:#?}",
                step.change,
                g.console.lines().iter().rev().take(40).collect::<Vec<_>>()
            );
        }
        let plan = vm.plan(&drawn.plain()).await.expect(&log);
        assert!(plan.is_empty(), "{log}: left {plan}");
        let check = check_of(&vm, pid, &g.console, &start_now, &prefix);
        let diff = differences(&check, false).await;
        assert!(diff.is_empty(), "{log}: after the second apply: {diff:#?}");
        // The guest shows what the handle says; a device the guest itself ejects meanwhile (a
        // stale ACPI eject request meeting a newcomer in a slot another handle freed just
        // before) leaves the handle's view too, and is counted.
        let planned = vm.spec();
        let deadline = tokio::time::Instant::now() + SEEN;
        loop {
            let want = expected_guest_view(&vm.spec(), base_blocks, block);
            let shown = g.console.run(GUEST_VIEW, SEEN).await;
            if shown == want {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{log}: the guest shows {shown:#?}, not {want:#?}; its kernel said: {:#?}",
                g.console
                    .lines()
                    .iter()
                    .filter(|l| l.contains("] "))
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
            );
        }
        vm.settle().await;
        if vm.spec() != planned {
            *tally
                .entry("ejected by the guest unasked".into())
                .or_default() += 1;
            let diff = differences(&check, false).await;
            assert!(
                diff.is_empty(),
                "{log}: after the guest's own eject: {diff:#?}"
            );
        }
        kept = vm.spec();
    }
    eprintln!("seed {seed}, {rounds} rounds: {tally:#?}");
}

/// What a round's handle is checked with: QEMU's state against its spec.
fn check_of<'a>(
    vm: &'a Vm,
    pid: u32,
    console: &'a qhotplug_tests::Console,
    start: &'a Start,
    tap_prefix: &'a str,
) -> Check<'a> {
    Check {
        vm,
        pid,
        console,
        start,
        tap_prefix,
        ignore: &[],
        seen: SEEN,
    }
}

/// Room for vCPUs and a DIMM, guest memory shared (vhost-user), and a fixed seed per machine.
fn growable(mut spec: VmSpec) -> VmSpec {
    spec.cpu_topology = Some(CpuTopology::max(4));
    spec.memory_slots = 2;
    spec.max_memory_mib = Some(1536);
    spec.memory_mib = 512;
    spec.memory_backend = Some(MemoryBackend::shared_memfd("ram", 512 * MIB));
    spec
}

#[test]
fn drawn_desired_specs_are_applied_on_pc() {
    qhotplug_tests::serial_test(rounds(growable(pc_spec()), 0xa991_0001, 16));
}

#[test]
fn drawn_desired_specs_are_applied_on_q35() {
    qhotplug_tests::serial_test(rounds(growable(q35_spec(10)), 0xa991_0002, 12));
}
