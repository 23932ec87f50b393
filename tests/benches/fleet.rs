//! `cargo bench -p qhotplug-tests --bench fleet` (N=100 paused QEMUs; `QHOTPLUG_FLEET_N=300` for
//! 300, which takes about 15 GiB here).
//!
//! One process, many VMs, as an orchestrator runs them:
//!
//! 1. **Launch.** The floor starts N QEMUs raw (`std::process::Command`, `-qmp unix:…`, connect
//!    by retrying the path, `qmp_capabilities`), all at once, and stops them; then the SDK launches
//!    N (`Vm::launch`, all at once). Each: time until all N are connected.
//! 2. **Memory, fds, threads** of our process per managed VM (`Vm` + `Client` + an event
//!    subscriber that stays open the whole run), before any floor connection exists.
//! 3. **Hotplug.** Each round, every VM: add a `scsi-hd`, add a `virtio-blk`, remove the
//!    `scsi-hd` (it leaves a paused VM without a guest, about 55 ms after `device_del`: QEMU's
//!    RCU thread batches for up to 50 ms before it finalizes the device). Four sides take turns
//!    in every round, after each VM's one-time schema check:
//!    - the floor, on each VM's second monitor, two ways, sending the SDK's own bytes
//!      (`qhotplug_tests::raw`): a blocking thread per VM, all released together; and one
//!      thread's epoll loop driving every VM at once (`qhotplug_tests::epoll_floor`);
//!    - the SDK, a task per VM, all at once;
//!    - the SDK bounded, as the README has an orchestrator run it: each VM's task holds one of
//!      the host's permits (a `Semaphore`; 12 per core, `QHOTPLUG_FLEET_BOUND`) for its three
//!      operations.
//!
//!    Each worker reads its own clock: a round runs from the first operation any VM began to the
//!    last reply, and a VM's first operation is timed from the round's start (its wait for a
//!    thread, task or permit counts). Per side: throughput (operations per second over the
//!    round), the p50/p99 latency of each operation, and the CPU per operation of the QEMUs and
//!    of our process. Throughput is beside the faster floor of each round; p99 beside the floor
//!    that orders the work the same way (the unbounded SDK beside the epoll loop, the bounded one
//!    beside the threads), and every pairing is printed.
//! 4. **Limits.** QEMU's own memory per VM, how many fit in what the machine has free, and the
//!    N that ran.
//!
//! Knobs: `QHOTPLUG_FLEET_WORKERS` (tokio workers; default one per core),
//! `QHOTPLUG_FLEET_OOB=1` (negotiate `oob` as `Config::default()` does; off by default, as the
//! floor's monitors run without it) and `QHOTPLUG_FLEET_BOUND`. Every QEMU is stopped by pid at
//! the end, and on Ctrl-C. Prints, last: `ratio_launch=… ratio_throughput=… p99_ratio_max=…
//! ratio_throughput_bounded=… p99_ratio_max_bounded=… kib_per_vm=… fds_per_vm=…`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use qhotplug::{Disk, DiskConfig, Launcher, Pci, Vm};
use qhotplug_tests::epoll_floor;
use qhotplug_tests::raw::{scsi_disk, RawMonitor, RawOp};
use qhotplug_tests::{image, open_fd_count, pc_spec, rss_mib};
use tokio::sync::Semaphore;

const ROUNDS: usize = 6;

/// The bounded SDK side's default: VMs at work at once, per core (`QHOTPLUG_FLEET_BOUND` sets the
/// host's total). A `scsi-hd`'s removal waits about 55 ms in QEMU with the CPU idle, so fewer
/// leave the cores idle: 4 and 16 on 2 cores gave 0.37 and 0.91 of the floor's throughput.
const BOUND_PER_CORE: usize = 12;

/// Every QEMU this run started, to stop on the way out (normal end or Ctrl-C).
type Pids = Arc<Mutex<Vec<u32>>>;

fn kill_all(pids: &Pids) {
    for pid in pids.lock().unwrap().drain(..) {
        let _ = qhotplug_tests::kill(pid, libc::SIGKILL);
    }
}

fn threads() -> usize {
    qhotplug_tests::proc_value("/proc/self/status", "Threads:").expect("Threads") as usize
}

fn meminfo_mib(key: &str) -> f64 {
    qhotplug_tests::proc_value("/proc/meminfo", key).expect("a /proc/meminfo key") / 1024.0
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// The spec of VM `i`: the test spec (paused pc, a virtio-scsi controller) with 64 MiB and a
/// second monitor for the floor.
fn spec(i: usize, dir: &Path) -> qhotplug::VmSpec {
    let mut spec = pc_spec();
    spec.name = format!("fleet{i}");
    spec.memory_mib = 64;
    spec.extra_args = vec![
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            dir.join("floor.sock").display()
        ),
    ];
    spec
}

/// The floor's launch: N QEMUs with the same arguments, started raw, connected by retrying the
/// socket path. Returns the time until all were connected; stops them.
fn launch_raw(n: usize, root: &Path, pids: &Pids) -> Duration {
    let binary = qhotplug_cmdline::default_qemu();
    let start = Instant::now();
    let mut children = Vec::new();
    for i in 0..n {
        let dir = root.join(format!("raw{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = spec(i, &dir);
        s.extra_args.clear();
        let qmp = format!(
            "socket,id=qmp,path={},server=on,wait=off",
            dir.join("qmp.sock").display()
        );
        let child = std::process::Command::new(&binary)
            .args(s.args(&qmp, |_| unreachable!("no NICs")))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start QEMU");
        pids.lock().unwrap().push(child.id());
        children.push((child, dir.join("qmp.sock")));
    }
    let monitors: Vec<RawMonitor> = children
        .iter()
        .map(|(_, path)| {
            let deadline = Instant::now() + Duration::from_secs(120);
            while std::os::unix::net::UnixStream::connect(path).is_err() {
                assert!(Instant::now() < deadline, "raw QEMU never listened");
                std::thread::sleep(Duration::from_millis(1));
            }
            RawMonitor::connect(path)
        })
        .collect();
    let took = start.elapsed();
    drop(monitors);
    kill_all(pids);
    for (mut child, _) in children {
        let _ = child.wait();
    }
    took
}

/// What one side (a floor, the SDK, the SDK bounded) measured over the rounds.
#[derive(Default)]
struct Side {
    /// Each round's wall time.
    walls: Vec<Duration>,
    /// The latencies of the three operations (`scsi-hd` add, `virtio-blk` add, `scsi-hd`
    /// remove), every VM's, every round's.
    lat: [Vec<Duration>; 3],
    cpu: CpuUse,
}

impl Side {
    /// Adds a round's runs, and the CPU used since `before`. Every VM's first operation is timed
    /// from the round's start, the moment the first VM began: the orchestrator asked for all of
    /// them then, and a VM whose thread, task or permit had not yet come was already waiting.
    fn add_round(&mut self, runs: &[Run], before: CpuUse, qemu_pids: &[u32]) {
        self.cpu.add(before, qemu_pids);
        let begun = Run::begun(runs);
        self.walls.push(Run::wall(runs));
        for r in runs {
            self.lat[0].push(r.first - begun);
            self.lat[1].push(r.second - r.first);
            self.lat[2].push(r.end - r.second);
        }
    }

    /// Operations per second: the median over rounds of `ops` over the round's wall time.
    fn throughput(&self, ops: f64) -> f64 {
        let mut per: Vec<f64> = self.walls.iter().map(|w| ops / w.as_secs_f64()).collect();
        per.sort_by(f64::total_cmp);
        per[per.len() / 2]
    }
}

/// One VM's three operations in a round: the instants before the first and after each, as the
/// thread or task that ran them read its clock.
struct Run {
    start: Instant,
    first: Instant,
    second: Instant,
    end: Instant,
}

impl Run {
    /// From a batch's instants: before the first operation, then after each of the three.
    fn from_marks(marks: &[Instant]) -> Run {
        let [start, first, second, end] = marks else {
            panic!(
                "a batch of three operations has four marks, not {}",
                marks.len()
            );
        };
        Run {
            start: *start,
            first: *first,
            second: *second,
            end: *end,
        }
    }

    /// When the round began: the first operation any VM began.
    fn begun(runs: &[Run]) -> Instant {
        runs.iter().map(|r| r.start).min().expect("a run")
    }

    /// A round's wall time: from the first operation any VM began to the last reply any VM got,
    /// as the workers themselves read their clocks. (A coordinator's clock read after releasing
    /// the floor's threads started late: it waited for a CPU behind the hundred threads it had
    /// just woken, and some rounds' clocks started with most of the work already done.)
    fn wall(runs: &[Run]) -> Duration {
        runs.iter().map(|r| r.end).max().expect("a run") - Run::begun(runs)
    }
}

/// CPU time, in seconds: the fleet's QEMUs' and our process's (the SDK, or the floor's threads).
#[derive(Default, Clone, Copy)]
struct CpuUse {
    qemu: f64,
    ours: f64,
}

impl CpuUse {
    fn now(qemu_pids: &[u32]) -> CpuUse {
        CpuUse {
            qemu: qemu_pids
                .iter()
                .map(|&p| qhotplug_tests::cpu_seconds_of(p))
                .sum(),
            ours: qhotplug_tests::cpu_seconds(),
        }
    }

    /// Adds what was used since `before`.
    fn add(&mut self, before: CpuUse, qemu_pids: &[u32]) {
        let now = CpuUse::now(qemu_pids);
        self.qemu += now.qemu - before.qemu;
        self.ours += now.ours - before.ours;
    }
}

/// One VM's work in an SDK round: its handle, the ids and images of the `scsi-hd` and the
/// `virtio-blk` to add (named after the round's `tag`), and the host's permits when the round is
/// bounded.
struct Work {
    vm: Vm,
    scsi: (String, PathBuf),
    blk: (String, PathBuf),
    host: Option<Arc<Semaphore>>,
}

impl Work {
    fn prepare(fleet: &[(Vm, PathBuf)], tag: &str, host: Option<&Arc<Semaphore>>) -> Vec<Work> {
        fleet
            .iter()
            .map(|(vm, dir)| {
                let (s, b) = (format!("s{tag}"), format!("b{tag}"));
                Work {
                    vm: vm.clone(),
                    scsi: (s.clone(), image(dir, &s, 1)),
                    blk: (b.clone(), image(dir, &b, 1)),
                    host: host.cloned(),
                }
            })
            .collect()
    }

    /// Adds the `scsi-hd`, adds the `virtio-blk`, removes the `scsi-hd`. A bounded VM holds one of
    /// the host's permits for all three (its first operation's time includes the wait for it).
    async fn run(self) -> Run {
        let ((scsi, scsi_image), (blk, blk_image)) = (self.scsi, self.blk);
        let start = Instant::now();
        let _permit = match self.host {
            Some(host) => Some(host.acquire_owned().await.unwrap()),
            None => None,
        };
        self.vm
            .add_disk(DiskConfig::scsi_hd(&scsi, scsi_image))
            .await
            .unwrap();
        let first = Instant::now();
        self.vm
            .add_disk(DiskConfig::virtio_blk(blk, blk_image))
            .await
            .unwrap();
        let second = Instant::now();
        self.vm.remove_disk(&scsi).await.unwrap();
        let end = Instant::now();
        Run {
            start,
            first,
            second,
            end,
        }
    }
}

/// A floor's batches for a round: per VM, add a `scsi-hd` and a `virtio-blk` named after `tag`
/// (images made), then remove the `scsi-hd`. The SCSI target and PCI slot are the `below`-th
/// counted down from 255 and 31, so the two floors (and the SDK, which takes free ones from the
/// bottom) never collide on a VM.
fn floor_batches(fleet: &[(Vm, PathBuf)], tag: &str, below: usize) -> Vec<Vec<RawOp>> {
    fleet
        .iter()
        .map(|(_, dir)| {
            let (s, b) = (format!("s{tag}"), format!("b{tag}"));
            let scsi = scsi_disk(&s, &image(dir, &s, 1), (255 - below) as u16);
            let slot = Pci::new("pci.0", (31 - below) as u8);
            let blk = Disk::virtio_blk(&b, image(dir, &b, 1), slot);
            vec![
                RawOp::AddDisk(scsi.clone()),
                RawOp::AddDisk(blk),
                RawOp::RemoveDisk(scsi),
            ]
        })
        .collect()
}

/// One SDK round: a task per VM, all spawned at once.
async fn sdk_round(work: Vec<Work>) -> Vec<Run> {
    let tasks: Vec<_> = work.into_iter().map(|w| tokio::spawn(w.run())).collect();
    let mut runs = Vec::new();
    for t in tasks {
        runs.push(t.await.unwrap());
    }
    runs
}

fn main() {
    // QHOTPLUG_FLEET_WORKERS: tokio worker threads (default: one per core).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = std::env::var("QHOTPLUG_FLEET_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
    {
        builder.worker_threads(workers);
    }
    let runtime = builder.enable_all().build().unwrap();
    let pids: Pids = Arc::default();
    let on_signal = pids.clone();
    runtime.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            kill_all(&on_signal);
            eprintln!("interrupted: every QEMU stopped");
            std::process::exit(130);
        }
    });
    runtime.block_on(async { tokio::spawn(run(pids)).await.unwrap() });
}

async fn run(pids: Pids) {
    let n: usize = std::env::var("QHOTPLUG_FLEET_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let root = tempfile::tempdir().unwrap();
    let available_before = meminfo_mib("MemAvailable:");
    println!("fleet of {n} paused QEMUs (TCG, pc, 64 MiB), {ROUNDS} hotplug rounds");

    // 1. Launch: the floor, then the SDK.
    let raw_root = root.path().to_owned();
    let floor_pids = pids.clone();
    let floor_launch = tokio::task::spawn_blocking(move || launch_raw(n, &raw_root, &floor_pids))
        .await
        .unwrap();
    let (rss0, fds0, threads0) = (rss_mib(), open_fd_count(), threads());
    let start = Instant::now();
    let launches = (0..n).map(|i| {
        let dir = root.path().join(format!("vm{i}"));
        async move {
            std::fs::create_dir_all(&dir).unwrap();
            let config =
                qhotplug_qmp::Config::new().oob(std::env::var_os("QHOTPLUG_FLEET_OOB").is_some());
            Vm::launch(
                Launcher::new(spec(i, &dir), &dir)
                    .qmp_config(config)
                    .start_timeout(Duration::from_secs(120)),
            )
            .await
            .map(|vm| (vm, dir))
        }
    });
    let fleet: Vec<(Vm, PathBuf)> = futures::future::join_all(launches)
        .await
        .into_iter()
        .map(|r| r.expect("launch"))
        .collect();
    let sdk_launch = start.elapsed();
    pids.lock()
        .unwrap()
        .extend(fleet.iter().filter_map(|(vm, _)| vm.pid()));
    println!(
        "launch, all {n} connected: floor (raw spawn + connect) {:.2} s, sdk (Vm::launch) {:.2} s",
        floor_launch.as_secs_f64(),
        sdk_launch.as_secs_f64()
    );

    // 2. A subscriber on every VM for the whole run; then our footprint per VM.
    let events = Arc::new(AtomicU64::new(0));
    for (vm, _) in &fleet {
        let mut stream = vm.client().events();
        let events = events.clone();
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                if item.is_ok() {
                    events.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    tokio::task::yield_now().await;
    let kib_per_vm = (rss_mib() - rss0) * 1024.0 / n as f64;
    let fds_per_vm = (open_fd_count() - fds0) as f64 / n as f64;
    println!(
        "ours per managed VM (Vm + Client + subscriber): {kib_per_vm:.1} KiB resident, {fds_per_vm:.2} fds; \
         threads {threads0} before the fleet, {} with it",
        threads()
    );

    // 3. Hotplug rounds, the four sides taking turns, every VM at once. First each VM's one-time
    // check of QEMU's schema (read once for the whole fleet: one build), outside the rounds.
    let warm = Instant::now();
    futures::future::join_all(fleet.iter().map(|(vm, _)| vm.check_disk_hotplug()))
        .await
        .into_iter()
        .for_each(|r| r.unwrap());
    println!(
        "schema checks for all {n} VMs (one query-qmp-schema for the fleet): {:.1} ms",
        warm.elapsed().as_secs_f64() * 1e3
    );
    let floor_paths: Vec<PathBuf> = fleet.iter().map(|(_, d)| d.join("floor.sock")).collect();
    let mut floors: Vec<RawMonitor> = tokio::task::spawn_blocking(move || {
        floor_paths.iter().map(|p| RawMonitor::connect(p)).collect()
    })
    .await
    .unwrap();
    let qemu_pids: Vec<u32> = fleet.iter().filter_map(|(vm, _)| vm.pid()).collect();
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get());
    let bound = std::env::var("QHOTPLUG_FLEET_BOUND")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(BOUND_PER_CORE * cores);
    let host = Arc::new(Semaphore::new(bound));
    let [mut floor, mut epoll, mut sdk, mut bounded] = [(); 4].map(|()| Side::default());
    let bounded_name = format!("sdk, bounded to {bound} VMs at a time");
    for round in 0..ROUNDS {
        // The floor: a blocking thread per VM, images made first.
        let batches = floor_batches(&fleet, &format!("f{round}"), round);
        let cpu = CpuUse::now(&qemu_pids);
        let (runs, back) = tokio::task::spawn_blocking(move || {
            // Every thread is spawned before any starts, so all VMs are at it at once, as the
            // SDK's tasks are.
            let go = Arc::new(std::sync::Barrier::new(n));
            let handles: Vec<_> = floors
                .into_iter()
                .zip(batches)
                .map(|(mut raw, ops)| {
                    let go = go.clone();
                    std::thread::spawn(move || {
                        go.wait();
                        let run = Run::from_marks(&raw.run_batch(&ops));
                        (raw, run)
                    })
                })
                .collect();
            let (back, runs): (Vec<_>, Vec<_>) =
                handles.into_iter().map(|h| h.join().unwrap()).unzip();
            (runs, back)
        })
        .await
        .unwrap();
        floors = back;
        floor.add_round(&runs, cpu, &qemu_pids);

        // The other floor: one thread, one epoll loop, every VM at once.
        let batches = floor_batches(&fleet, &format!("e{round}"), ROUNDS + round);
        let cpu = CpuUse::now(&qemu_pids);
        let (marks, back) =
            tokio::task::spawn_blocking(move || (epoll_floor::run(&mut floors, batches), floors))
                .await
                .unwrap();
        floors = back;
        let runs: Vec<Run> = marks.iter().map(|m| Run::from_marks(m)).collect();
        epoll.add_round(&runs, cpu, &qemu_pids);

        // The SDK: a task per VM, the same three operations, all at once.
        let work = Work::prepare(&fleet, &format!("s{round}"), None);
        let cpu = CpuUse::now(&qemu_pids);
        let runs = sdk_round(work).await;
        sdk.add_round(&runs, cpu, &qemu_pids);

        // The SDK as the README has an orchestrator use it: each VM's work holds one of the host's
        // `bound` permits, so that many VMs are at it at once and the rest queue.
        let work = Work::prepare(&fleet, &format!("q{round}"), Some(&host));
        let cpu = CpuUse::now(&qemu_pids);
        let runs = sdk_round(work).await;
        bounded.add_round(&runs, cpu, &qemu_pids);
    }
    let ops = (3 * n) as f64;
    let sides = [
        ("floor: threads", &mut floor),
        ("floor: epoll", &mut epoll),
        ("sdk", &mut sdk),
        (bounded_name.as_str(), &mut bounded),
    ];
    println!(
        "{:<34} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        format!("median of {ROUNDS} rounds of {} ops", 3 * n),
        "ops/s",
        "QEMU ms",
        "ours ms",
        "add p50",
        "add p99",
        "blk p50",
        "blk p99",
        "rm p50",
        "rm p99"
    );
    let per_op = |seconds: f64| seconds / (ops * ROUNDS as f64) * 1e3;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut p99s = Vec::new();
    for (name, side) in sides {
        let [add, blk, rm] = [0, 1, 2].map(|op| {
            let lat = &mut side.lat[op];
            (percentile(lat, 0.5), percentile(lat, 0.99))
        });
        println!(
            "{name:<34} {:>7.0} {:>9.2} {:>9.3} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            side.throughput(ops),
            per_op(side.cpu.qemu),
            per_op(side.cpu.ours),
            ms(add.0),
            ms(add.1),
            ms(blk.0),
            ms(blk.1),
            ms(rm.0),
            ms(rm.1)
        );
        p99s.push([add.1, blk.1, rm.1]);
    }
    // Throughput beside the faster floor of each round. p99 beside the floor that orders the work
    // the same way (the two floors trade one operation's latency for another's at the same
    // throughput): the unbounded SDK beside the epoll loop (every VM a step at a time), the
    // bounded SDK beside the threads (the kernel lets a few VMs run to the end while the rest
    // wait to start). Every pairing is printed.
    let fastest: Vec<Duration> = floor
        .walls
        .iter()
        .zip(&epoll.walls)
        .map(|(t, e)| *t.min(e))
        .collect();
    let ratio_throughput = qhotplug_tests::median_ratio(&fastest, &sdk.walls);
    let ratio_throughput_bounded = qhotplug_tests::median_ratio(&fastest, &bounded.walls);
    let p99_ratio = |ours: usize, floor: usize| {
        (0..3)
            .map(|op| p99s[ours][op].as_secs_f64() / p99s[floor][op].as_secs_f64())
            .fold(0.0f64, f64::max)
    };
    println!(
        "p99 / floor's p99, the largest of the three operations: sdk {:.3} beside the threads, {:.3} beside epoll; bounded {:.3} beside the threads, {:.3} beside epoll",
        p99_ratio(2, 0),
        p99_ratio(2, 1),
        p99_ratio(3, 0),
        p99_ratio(3, 1)
    );
    let (p99_ratio_max, p99_ratio_max_bounded) = (p99_ratio(2, 1), p99_ratio(3, 0));
    let seen = events.load(Ordering::Relaxed);
    println!("events seen by the {n} subscribers: {seen}");

    // 4. The machine's limits.
    let qemu_mib: f64 = fleet
        .iter()
        .filter_map(|(vm, _)| vm.pid())
        .map(qhotplug_tests::rss_mib_of)
        .sum::<f64>()
        / n as f64;
    let total_mib = meminfo_mib("MemTotal:");
    println!(
        "QEMU resident per VM {qemu_mib:.1} MiB; this machine: {total_mib:.0} MiB, {available_before:.0} MiB available before the run, \
         room for about {:.0} such QEMUs; largest N run here: {n}",
        available_before / qemu_mib.max(1.0)
    );
    drop(floors);
    drop(fleet);
    kill_all(&pids);
    println!(
        "ratio_launch={:.3} ratio_throughput={ratio_throughput:.3} p99_ratio_max={p99_ratio_max:.3} \
         ratio_throughput_bounded={ratio_throughput_bounded:.3} p99_ratio_max_bounded={p99_ratio_max_bounded:.3} \
         kib_per_vm={kib_per_vm:.1} fds_per_vm={fds_per_vm:.2}",
        floor_launch.as_secs_f64() / sdk_launch.as_secs_f64(),
    );
}
