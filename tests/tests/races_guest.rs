//! Calls that race each other on one [`Vm`], over real QEMU and a booted guest: random public
//! calls on a small set of ids (so they collide), a fifth of them dropped at a random moment, QEMU
//! stopped now and then (SIGSTOP, up to 0.8 s), and, on q35, someone else plugging and unplugging
//! a device behind the SDK's back. After each round, once every call has finished
//! (`vm.settle()`), QEMU's real state is compared with `vm.spec()`: peripherals, block nodes, fd
//! sets, netdevs, objects, chardevs, vCPUs, I/O limits, sizes, media, each NIC's carrier in the
//! guest, our fd table, host taps, free slots, and QEMU being alive. Then `vm.reconcile()` must
//! find nothing to fix, and the same comparison holds after it.
//!
//! Seeded and reproducible: `QHOTPLUG_RACE_SEED` (default: a fixed seed per test) and
//! `QHOTPLUG_RACE_ROUNDS` (default: a short run for CI). A long run:
//!
//! ```sh
//! QHOTPLUG_RACE_ROUNDS=200 QHOTPLUG_RACE_SEED=$RANDOM cargo nextest run -p qhotplug-tests --test races
//! ```
//!
//! A failure names the seed and the round, and lists the calls of that round with their results.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use qhotplug::{
    CdromConfig, CpuTopology, DiskConfig, Error, IoLimits, MediumOptions, MemoryConfig, NicConfig,
    Pci, RngConfig, SerialPortConfig, VirtioSerial, Vm, VmSpec, MIB,
};
use qhotplug_netdev::TapBuilder;
use qhotplug_qmp::command::{DeviceAdd, DeviceDel, QueryPci, QueryStatus};
use qhotplug_tests::state_check::{differences, free_ports, Check, Start};
use qhotplug_tests::{image, iso, pc_spec, q35_spec, Guest, SplitMix};

/// How long the guest may take to show a change (TCG).
const SEEN: Duration = Duration::from_secs(30);
/// The prefix of the taps this test process makes, to count them on the host: its pid in it, as
/// the other race test runs beside it in another process.
fn tap_prefix() -> String {
    format!("qr{}-", std::process::id())
}

/// One public call, with its arguments drawn.
#[derive(Debug, Clone)]
enum Op {
    AddDisk {
        id: &'static str,
        scsi: bool,
    },
    RemoveDisk(&'static str),
    AddNic(&'static str),
    RemoveNic(&'static str),
    SetLink(&'static str, bool),
    SetIoLimits(&'static str, u64),
    Resize(&'static str, u64),
    AddCdrom(&'static str, Option<usize>),
    ChangeMedium(&'static str, Option<usize>),
    RemoveCdrom(&'static str),
    SetVcpus(u32),
    AddRng(&'static str),
    RemoveRng(&'static str),
    AddDimm(&'static str),
    RemoveMemory(&'static str),
    AddPort(&'static str),
    RemovePort(&'static str),
    Reconcile,
    /// Someone else plugs (or unplugs) a device the SDK does not know, by raw QMP.
    Foreign(bool),
}

const DISKS: [&str; 3] = ["d0", "d1", "d2"];
const NICS: [&str; 2] = ["n0", "n1"];
const CDROMS: [&str; 1] = ["c0"];
/// A device on a QOM object (`<id>-rng`), one on a memory backend (`<id>-mem`), one on a chardev
/// (`<id>-chr`), on the serial controller the VM boots with.
const RNG: &str = "r0";
const DIMM: &str = "m0";
const PORT: &str = "p0";
const SERIAL_CONTROLLER: &str = "vser0";
const FOREIGN: &str = "x0";

fn draw(rng: &mut SplitMix, foreign: bool) -> Op {
    let disk = *rng.pick(&DISKS);
    let nic = *rng.pick(&NICS);
    let cd = *rng.pick(&CDROMS);
    let medium = |rng: &mut SplitMix| (!rng.chance(3)).then(|| rng.below(2) as usize);
    // Live changes are what orchestrators do most: they come twice as often.
    match rng.below(if foreign { 24 } else { 23 }) {
        0 | 1 => Op::AddDisk {
            id: disk,
            scsi: rng.chance(2),
        },
        2 => Op::RemoveDisk(disk),
        3 | 4 => Op::AddNic(nic),
        5 => Op::RemoveNic(nic),
        6 | 7 => Op::SetLink(nic, rng.chance(2)),
        8 | 9 => Op::SetIoLimits(disk, rng.below(3) * 1_048_576),
        10 => Op::Resize(disk, (1 + rng.below(8)) * 1_048_576),
        11 => Op::AddCdrom(cd, medium(rng)),
        12 | 13 => Op::ChangeMedium(cd, medium(rng)),
        14 => Op::RemoveCdrom(cd),
        15 => Op::SetVcpus(1 + rng.below(3) as u32),
        16 => Op::AddRng(RNG),
        17 => Op::RemoveRng(RNG),
        18 => Op::AddDimm(DIMM),
        19 => Op::RemoveMemory(DIMM),
        20 => Op::AddPort(PORT),
        21 => Op::RemovePort(PORT),
        22 => Op::Reconcile,
        _ => Op::Foreign(rng.chance(2)),
    }
}

/// What the calls need on the host.
struct Fixtures {
    images: BTreeMap<&'static str, PathBuf>,
    isos: Vec<PathBuf>,
    dir: PathBuf,
}

/// Runs `op` to its end; the result in a word, for the round's log.
async fn run(vm: &Vm, fx: &Fixtures, op: &Op) -> Result<(), Error> {
    match op {
        Op::AddDisk { id, scsi } => {
            let path = &fx.images[id];
            let config = if *scsi {
                DiskConfig::scsi_hd(*id, path)
            } else {
                DiskConfig::virtio_blk(*id, path)
            };
            vm.add_disk(config).await.map(drop)
        }
        Op::RemoveDisk(id) => vm.remove_disk(id).await,
        Op::AddNic(id) => {
            let tap = TapBuilder::new(format!("{}%d", tap_prefix()))
                .up(true)
                .create()
                .expect("tap");
            vm.add_nic(NicConfig::new(*id, tap)).await.map(drop)
        }
        Op::RemoveNic(id) => vm.remove_nic(id).await,
        Op::SetLink(id, up) => vm.set_link(id, *up).await,
        Op::SetIoLimits(id, bps) => {
            let limits = IoLimits {
                bps: *bps,
                ..IoLimits::default()
            };
            vm.set_io_limits(id, limits).await
        }
        Op::Resize(id, size) => vm.resize_disk(id, *size).await.map(drop),
        Op::AddCdrom(id, medium) => {
            let mut config = CdromConfig::new(*id);
            if let Some(i) = medium {
                config = config.medium(&fx.isos[*i]);
            }
            vm.add_cdrom(config).await.map(drop)
        }
        Op::ChangeMedium(id, medium) => {
            let path = medium.map(|i| fx.isos[i].clone());
            vm.change_medium(id, path.map(Into::into), MediumOptions::default())
                .await
        }
        Op::RemoveCdrom(id) => vm.remove_cdrom(id).await,
        Op::SetVcpus(n) => vm.set_vcpus(*n).await.map(drop),
        Op::AddRng(id) => vm.add_rng(RngConfig::new(*id)).await.map(drop),
        Op::RemoveRng(id) => vm.remove_rng(id).await,
        Op::AddDimm(id) => vm
            .add_memory(MemoryConfig::dimm(*id, 64 * MIB))
            .await
            .map(drop),
        Op::RemoveMemory(id) => vm.remove_memory(id).await,
        Op::AddPort(id) => {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let socket = fx.dir.join(format!("{id}-{n}.sock"));
            let port = SerialPortConfig::new(*id, SERIAL_CONTROLLER, "org.qhotplug.race", socket);
            vm.add_serial_port(port).await.map(drop)
        }
        Op::RemovePort(id) => vm.remove_serial_port(id).await,
        Op::Reconcile => vm.reconcile().await.map(drop),
        Op::Foreign(add) => foreign(vm, *add).await,
    }
}

/// Someone else's device on a root port the SDK does not own: plugged or unplugged by raw QMP,
/// waiting for the guest on unplug. Errors (no free port, not there) are ignored: they change
/// nothing.
async fn foreign(vm: &Vm, add: bool) -> Result<(), Error> {
    let c = vm.client();
    if add {
        let pci = c.execute(&QueryPci).await?;
        let Some(port) = free_ports(&pci).into_iter().next() else {
            return Ok(());
        };
        let _ = c
            .execute(&DeviceAdd {
                driver: "virtio-rng-pci".into(),
                id: Some(FOREIGN.into()),
                bus: Some(port),
                props: serde_json::Map::new(),
            })
            .await;
    } else {
        let mut events = c.events();
        if c.execute(&DeviceDel { id: FOREIGN.into() }).await.is_ok() {
            let deadline = tokio::time::Instant::now() + SEEN;
            let gone = |e: &qhotplug::EventKind| matches!(e, qhotplug::EventKind::DeviceDeleted(d) if d.device.as_deref() == Some(FOREIGN));
            events.wait_for(deadline, gone).await;
        }
    }
    Ok(())
}

/// The error's variant, for the tally.
fn variant(e: &Error) -> String {
    let text = format!("{e:?}");
    text.split([' ', '(', '{']).next().unwrap_or("").to_owned()
}

/// An error that must never come while QEMU is alive: a transport or framing failure.
fn is_transport(e: &Error) -> bool {
    let text = format!("{e:?}");
    text.contains("Disconnected") || text.contains("Frame") || text.contains("Protocol")
}

/// Resumes QEMU when dropped, so a failing round never leaves it stopped.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = qhotplug_tests::kill(self.0, libc::SIGCONT);
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Counts the SDK's `ERROR` events: each is a bug of its own (a place freed twice).
#[derive(Clone, Default)]
struct Errors(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Errors {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::ERROR {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Rounds of `calls` random calls at once on one VM booted from `spec`.
async fn race(spec: VmSpec, default_seed: u64, default_rounds: u64, calls: usize) {
    use tracing_subscriber::layer::SubscriberExt;
    let errors = Errors::default();
    let _log =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(errors.clone()));
    let seed = env_u64("QHOTPLUG_RACE_SEED", default_seed);
    let rounds = env_u64("QHOTPLUG_RACE_ROUNDS", default_rounds);
    let foreign_ops = spec.machine == qhotplug::Machine::Q35;
    let mut rng = SplitMix(seed);
    let g = Guest::boot(spec, |l| l).await;
    let vm = g.vm.clone();
    let fx = Fixtures {
        images: DISKS
            .iter()
            .map(|id| (*id, image(g.dir(), &format!("{id}.raw"), 1)))
            .collect(),
        isos: (0..2)
            .map(|i| {
                iso(
                    g.dir(),
                    &format!("m{i}.iso"),
                    "hello",
                    &format!("medium {i}"),
                )
            })
            .collect(),
        dir: g.dir().to_owned(),
    };
    let pid = vm.pid().expect("launched by the SDK");
    let start = Start::take(&vm, pid).await;
    let prefix = tap_prefix();
    let check = Check {
        vm: &vm,
        pid,
        console: &g.console,
        start: &start,
        tap_prefix: &prefix,
        ignore: &[FOREIGN],
        seen: SEEN,
    };
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();

    for round in 0..rounds {
        let ops: Vec<(Op, Option<Duration>)> = (0..calls)
            .map(|_| {
                let op = draw(&mut rng, foreign_ops);
                // A fifth are dropped: a third of those within 2 ms (a live change's one
                // command is then on the wire), a third within 20 (most calls take a few), the
                // rest within 300.
                let drop_after = rng.chance(5).then(|| {
                    let within = *rng.pick(&[2, 20, 300]);
                    Duration::from_micros(rng.below(within * 1000))
                });
                (op, drop_after)
            })
            .collect();
        let stall = rng.chance(2).then(|| {
            (
                Duration::from_millis(rng.below(200)),
                Duration::from_millis(rng.below(800)),
            )
        });
        let tasks = ops.iter().cloned().map(|(op, drop_after)| {
            let (vm, fx) = (&vm, &fx);
            async move {
                let call = run(vm, fx, &op);
                let result = match drop_after {
                    Some(after) => match tokio::time::timeout(after, call).await {
                        Ok(r) => r.map_err(|e| variant(&e)),
                        Err(_) => Err("dropped".to_owned()),
                    },
                    None => call.await.map_err(|e| {
                        assert!(
                            !is_transport(&e),
                            "seed {seed} round {round}: {op:?}: {e:?}"
                        );
                        variant(&e)
                    }),
                };
                (op, result)
            }
        });
        let staller = async {
            if let Some((after, pause)) = stall {
                tokio::time::sleep(after).await;
                qhotplug_tests::kill(pid, libc::SIGSTOP).expect("SIGSTOP");
                let stopped = Stopped(pid);
                tokio::time::sleep(pause).await;
                drop(stopped);
            }
        };
        let (results, ()) = tokio::join!(futures::future::join_all(tasks), staller);
        for (op, result) in &results {
            let word = match result {
                Ok(()) => "ok",
                Err(e) => e.as_str(),
            };
            let name = format!("{op:?}");
            let name = name.split([' ', '(', '{']).next().unwrap_or("");
            *tally.entry(format!("{name}: {word}")).or_default() += 1;
        }
        let log = || format!("seed {seed} round {round}: {results:#?}");

        // Every call has finished, those whose callers gave up too.
        vm.settle().await;
        assert!(
            !qhotplug_tests::exited(pid, Duration::ZERO)
                .await
                .expect("pidfd"),
            "QEMU died: {}\n{}",
            log(),
            std::fs::read_to_string(g.dir().join("run/qemu.stderr")).unwrap_or_default()
        );
        vm.client()
            .execute(&QueryStatus)
            .await
            .expect("QEMU answers");
        let before = differences(&check, false).await;
        assert!(before.is_empty(), "{before:#?}\n{}", log());
        let report = vm.reconcile().await.expect("reconcile");
        assert!(
            report.is_empty(),
            "reconcile had work: {report:?}\n{}",
            log()
        );
        let after = differences(&check, true).await;
        assert!(after.is_empty(), "after reconcile: {after:#?}\n{}", log());
    }
    eprintln!("seed {seed}, {rounds} rounds of {calls} calls: {tally:#?}");
    assert_eq!(
        errors.0.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the SDK logged an error (a bug of its own)"
    );
}

/// Room for vCPUs and a DIMM, and a virtio-serial controller at `serial` for the ports.
fn growable(mut spec: VmSpec, serial: Pci) -> VmSpec {
    spec.cpu_topology = Some(CpuTopology::max(4));
    spec.memory_slots = 2;
    spec.max_memory_mib = Some(1024);
    spec.virtio_serials.push(VirtioSerial {
        id: SERIAL_CONTROLLER.into(),
        pci: serial,
    });
    spec
}

#[test]
fn racing_calls_on_pc_keep_the_spec_equal_to_qemu() {
    qhotplug_tests::serial_test(race(
        growable(pc_spec(), Pci::new("pci.0", 5)),
        0x5eed_0001,
        60,
        4,
    ));
}

#[test]
fn racing_calls_on_q35_keep_the_spec_equal_to_qemu() {
    qhotplug_tests::serial_test(race(
        growable(q35_spec(4), Pci::new("pcie.0", 12)),
        0x5eed_0002,
        20,
        4,
    ));
}
