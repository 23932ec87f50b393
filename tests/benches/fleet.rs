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
//! 3. **Hotplug.** Each round, every VM at once: add a `scsi-hd`, add a `virtio-blk`, remove the
//!    `scsi-hd` (it leaves a paused VM at once). The floor does the same on each VM's second
//!    monitor with a blocking thread per VM, sending the same bytes (`qhotplug_tests::raw`).
//!    Floor and SDK rounds alternate, after each VM's one-time schema check. Throughput (operations per second over the round) and the
//!    p50/p99 latency of each operation, each beside the floor's.
//! 4. **Limits.** QEMU's own memory per VM, how many fit in what the machine has free, and the
//!    N that ran.
//!
//! Knobs: `QHOTPLUG_FLEET_WORKERS` (tokio workers; default one per core) and
//! `QHOTPLUG_FLEET_OOB=1` (negotiate `oob` as `Config::default()` does; off by default, as the
//! floor's monitors run without it). Every QEMU is stopped by pid at the end, and on Ctrl-C. Prints, last:
//! `ratio_launch=… ratio_throughput=… p99_ratio_max=… kib_per_vm=… fds_per_vm=…`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use qhotplug::{Disk, DiskConfig, Launcher, Pci, Vm};
use qhotplug_tests::raw::{scsi_disk, RawMonitor};
use qhotplug_tests::{image, open_fd_count, pc_spec, rss_mib};

const ROUNDS: usize = 4;

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
    let binary = std::env::var(qhotplug::cmdline::QEMU_ENV)
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "qemu-system-x86_64".into());
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

/// One operation's latencies, floor or SDK.
#[derive(Default)]
struct Latencies {
    scsi_add: Vec<Duration>,
    blk_add: Vec<Duration>,
    scsi_remove: Vec<Duration>,
}

impl Latencies {
    /// Adds a round's runs. Every VM's first operation is timed from the round's start, the
    /// moment the first VM began: the orchestrator asked for all of them then, and a VM whose
    /// thread or task had not yet run was already waiting.
    fn add_round(&mut self, runs: &[Run]) {
        let begun = Run::begun(runs);
        for r in runs {
            self.scsi_add.push(r.first - begun);
            self.blk_add.push(r.second - r.first);
            self.scsi_remove.push(r.end - r.second);
        }
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
                .map(|&p| qhotplug_tests::cpu_seconds_of(Some(p)))
                .sum(),
            ours: qhotplug_tests::cpu_seconds_of(None),
        }
    }

    /// Adds what was used since `before`.
    fn add(&mut self, before: CpuUse, qemu_pids: &[u32]) {
        let now = CpuUse::now(qemu_pids);
        self.qemu += now.qemu - before.qemu;
        self.ours += now.ours - before.ours;
    }
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
                qhotplug::qmp::Config::new().oob(std::env::var_os("QHOTPLUG_FLEET_OOB").is_some());
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
    let threads_added = threads() as isize - threads0 as isize;
    println!(
        "ours per managed VM (Vm + Client + subscriber): {kib_per_vm:.1} KiB resident, {fds_per_vm:.2} fds; \
         threads {threads0} before the fleet, {} with it",
        threads0 as isize + threads_added
    );

    // 3. Hotplug rounds, floor and SDK alternating, every VM at once. First each VM's one-time
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
    let (mut floor_lat, mut sdk_lat) = (Latencies::default(), Latencies::default());
    let (mut floor_walls, mut sdk_walls) = (Vec::new(), Vec::new());
    let (mut floor_cpu, mut sdk_cpu) = (CpuUse::default(), CpuUse::default());
    for round in 0..ROUNDS {
        // The floor: a blocking thread per VM, images made first; slots from 31 down, targets
        // from 255 down, so the two sides never collide on a VM.
        let disks: Vec<(Disk, Disk)> = fleet
            .iter()
            .map(|(_, dir)| {
                let (s, b) = (format!("fs{round}"), format!("fb{round}"));
                let scsi = scsi_disk(&s, &image(dir, &s, 1), 255 - round as u16);
                let blk =
                    Disk::virtio_blk(&b, image(dir, &b, 1), Pci::new("pci.0", 31 - round as u8));
                (scsi, blk)
            })
            .collect();
        let cpu = CpuUse::now(&qemu_pids);
        let (runs, back) = tokio::task::spawn_blocking(move || {
            // Every thread is spawned before any starts, so all VMs are at it at once, as the
            // SDK's tasks are.
            let go = Arc::new(std::sync::Barrier::new(n));
            let handles: Vec<_> = floors
                .into_iter()
                .zip(disks)
                .map(|(mut raw, (s, b))| {
                    let go = go.clone();
                    std::thread::spawn(move || {
                        go.wait();
                        let start = Instant::now();
                        raw.add_disk(&s);
                        let added = Instant::now();
                        raw.add_disk(&b);
                        let second = Instant::now();
                        raw.remove_disk(&s);
                        let run = Run {
                            start,
                            first: added,
                            second,
                            end: Instant::now(),
                        };
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
        floor_cpu.add(cpu, &qemu_pids);
        floors = back;
        floor_walls.push(Run::wall(&runs));
        floor_lat.add_round(&runs);

        // The SDK: a task per VM, the same three operations, images made first.
        let work: Vec<_> = fleet
            .iter()
            .map(|(vm, dir)| {
                let (s, b) = (format!("ss{round}"), format!("sb{round}"));
                let (si, bi) = (image(dir, &s, 1), image(dir, &b, 1));
                (vm.clone(), s, b, si, bi)
            })
            .collect();
        let cpu = CpuUse::now(&qemu_pids);
        let tasks: Vec<_> = work
            .into_iter()
            .map(|(vm, s, b, si, bi)| {
                tokio::spawn(async move {
                    let start = Instant::now();
                    vm.add_disk(DiskConfig::scsi_hd(&s, si)).await.unwrap();
                    let added = Instant::now();
                    vm.add_disk(DiskConfig::virtio_blk(&b, bi)).await.unwrap();
                    let second = Instant::now();
                    vm.remove_disk(&s).await.unwrap();
                    Run {
                        start,
                        first: added,
                        second,
                        end: Instant::now(),
                    }
                })
            })
            .collect();
        let mut runs = Vec::new();
        for t in tasks {
            runs.push(t.await.unwrap());
        }
        sdk_cpu.add(cpu, &qemu_pids);
        sdk_walls.push(Run::wall(&runs));
        sdk_lat.add_round(&runs);
    }
    let ops = (3 * n) as f64;
    let throughput = |walls: &[Duration]| {
        let mut per: Vec<f64> = walls.iter().map(|w| ops / w.as_secs_f64()).collect();
        per.sort_by(f64::total_cmp);
        per[per.len() / 2]
    };
    let (floor_tp, sdk_tp) = (throughput(&floor_walls), throughput(&sdk_walls));
    // Each floor round beside the SDK round right after it: the median of those ratios resists
    // the drift of a shared machine.
    let ratio_throughput = qhotplug_tests::median_ratio(&floor_walls, &sdk_walls);
    println!(
        "hotplug throughput, median of {ROUNDS} rounds of {} operations: floor {floor_tp:.0} ops/s, sdk {sdk_tp:.0} ops/s",
        3 * n
    );
    let per_op = |seconds: f64| seconds / (ops * ROUNDS as f64) * 1e3;
    println!(
        "CPU per operation (ms): QEMU floor {:.2}, sdk {:.2}; client floor's threads {:.3}, sdk {:.3}",
        per_op(floor_cpu.qemu),
        per_op(sdk_cpu.qemu),
        per_op(floor_cpu.ours),
        per_op(sdk_cpu.ours)
    );
    println!("latency (ms)        floor p50  floor p99    sdk p50    sdk p99");
    let mut p99_ratio_max = 0.0f64;
    for (name, f, s) in [
        (
            "scsi-hd add",
            &mut floor_lat.scsi_add,
            &mut sdk_lat.scsi_add,
        ),
        (
            "virtio-blk add",
            &mut floor_lat.blk_add,
            &mut sdk_lat.blk_add,
        ),
        (
            "scsi-hd remove",
            &mut floor_lat.scsi_remove,
            &mut sdk_lat.scsi_remove,
        ),
    ] {
        let (fp50, fp99) = (percentile(f, 0.5), percentile(f, 0.99));
        let (sp50, sp99) = (percentile(s, 0.5), percentile(s, 0.99));
        p99_ratio_max = p99_ratio_max.max(sp99.as_secs_f64() / fp99.as_secs_f64());
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{name:<18} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            ms(fp50),
            ms(fp99),
            ms(sp50),
            ms(sp99)
        );
    }
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
        "ratio_launch={:.3} ratio_throughput={:.3} p99_ratio_max={p99_ratio_max:.3} kib_per_vm={kib_per_vm:.1} fds_per_vm={fds_per_vm:.2}",
        floor_launch.as_secs_f64() / sdk_launch.as_secs_f64(),
        ratio_throughput
    );
}
