//! The demo: boots a small Linux guest under QEMU, asks its guest agent for its OS, hot-adds a disk
//! and a two-queue NIC (whose MAC the agent then lists), grows the disk online, changes the medium
//! in its CD-ROM drive, adds a vCPU (onlined through the agent) and a DIMM, takes a live snapshot
//! of the disk, a full and an incremental backup of it (showing their sizes), and commits it
//! back with the guest writing between, live-migrates it to a
//! new QEMU with a progress bar, shows what the guest sees (from its serial console) and the QMP
//! events as they arrive, removes both, edits the spec (a disk and an RNG at addresses left to the
//! SDK) and applies it, printing the plan and each step's outcome, shuts the guest down
//! gracefully, and ends with how long each step took. Exits non-zero if any step fails.
//!
//! Run it with `scripts/demo` (installs QEMU and builds the guest image when missing), or
//! `cargo run --release -p qhotplug-examples --bin launch_and_hotplug` as root (taps need it).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;
use qhotplug::agent::{GuestExec, GuestExecStatus, GuestGetOsinfo, GuestNetworkGetInterfaces};
use qhotplug::{
    BackupConfig, Cdrom, CpuTopology, Desired, Disk, DiskConfig, GuestAgent, IdeAddr, IoLimits,
    JobInfo, MemoryConfig, MigrationOptions, NicConfig, Pci, PowerVia, Rng, Serial, SnapshotConfig,
    Stopped, Transport, Vm, MIB,
};
use qhotplug_cmdline::{Launcher, Machine, VmSpec};
use qhotplug_netdev::{MacAddr, TapBuilder};
use qhotplug_tests::guest::{boot_spec, image, Console};
use qhotplug_tests::timing::Timings;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const SEEN: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> ExitCode {
    let timings = Timings::new();
    // RUST_LOG=qhotplug=debug shows the SDK's own spans and events as well.
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::EnvFilter::from_env("RUST_LOG"));
    tracing_subscriber::registry()
        .with(timings.clone())
        .with(log)
        .init();
    let mut table = Table::default();
    match demo(&timings, &mut table).await {
        Ok(()) => {
            table.print();
            ExitCode::SUCCESS
        }
        Err(e) => {
            table.print();
            eprintln!("\ndemo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Step timings, in order.
#[derive(Default)]
struct Table {
    rows: Vec<(String, Duration)>,
}

impl Table {
    fn row(&mut self, step: impl Into<String>, took: Duration) {
        self.rows.push((step.into(), took));
    }

    /// The hotplug's own steps, from the SDK's tracing spans: each operation, then its steps
    /// (spans close inner first, so the steps are held until their operation closes).
    fn steps_from(&mut self, timings: &Timings) {
        let mut steps = Vec::new();
        for t in timings.take() {
            match t.kind {
                qhotplug::spans::STEP => steps.push((format!("  └ {}", t.name), t.elapsed)),
                qhotplug::spans::HOTPLUG => {
                    self.row(
                        format!("{} {}", t.name, t.id.unwrap_or_default()),
                        t.elapsed,
                    );
                    self.rows.append(&mut steps);
                }
                _ => {}
            }
        }
    }

    fn print(&self) {
        if self.rows.is_empty() {
            return;
        }
        println!("\n{:<34} {:>10}", "step", "time");
        println!("{:-<34} {:->10}", "", "");
        for (step, took) in &self.rows {
            println!("{step:<34} {:>10}", format_duration(*took));
        }
    }
}

fn format_duration(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

/// Times `f` as one row of the table.
async fn timed<T>(
    table: &mut Table,
    step: &str,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let start = Instant::now();
    let out = f.await;
    table.row(step, start.elapsed());
    out
}

/// Runs `command` in the guest until it prints exactly `want`, for up to `SEEN`.
async fn guest_says(console: &Console, command: &str, want: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let out = console.run(command, SEEN).await;
        if out == [want] {
            return Ok(());
        }
        if start.elapsed() > SEEN {
            return Err(format!("{command}: the guest still says {out:?}, not {want:?}").into());
        }
    }
}

async fn seen(console: &Console, mark: usize, needle: &str) -> Result<String> {
    let line = console
        .wait_for(mark, needle, SEEN)
        .await
        .ok_or_else(|| format!("the guest did not report {needle:?} within {SEEN:?}"))?;
    let report = line.split("qhg: ").nth(1).unwrap_or(&line).to_owned();
    println!("guest   {report}");
    Ok(report)
}

/// The demo, stage by stage: each stage prints what the SDK and the guest say and adds its rows
/// to `table` (the SDK's own steps from `timings`).
async fn demo(timings: &Timings, table: &mut Table) -> Result<()> {
    let (dir, spec, console_path, tools_2) = prepare(table).await?;
    let vm = launch(table, spec, dir.path()).await?;
    let printer = print_events(&vm);
    let console = boot(table, &console_path).await?;
    let agent = agent_up(table, &vm).await?;
    let dev = disk(timings, table, &vm, &console, dir.path()).await?;
    cdrom(timings, table, &vm, &console, &tools_2).await?;
    vcpus_and_memory(timings, table, &vm, &console).await?;
    nic(timings, table, &vm, &console, &agent).await?;
    storage(timings, table, &vm, &console, dir.path(), &dev).await?;
    remove(timings, table, &vm, &console).await?;
    migrate_and_shut_down(timings, table, vm, dir.path(), printer).await
}

/// The guest image (built once, cached) and the VM's spec: two vCPUs of four, room for a DIMM,
/// the agent's port, an IDE CD-ROM holding a first ISO. Returns the directory everything lives
/// in, the spec, the console's socket and the second ISO.
async fn prepare(
    table: &mut Table,
) -> Result<(
    tempfile::TempDir,
    VmSpec,
    std::path::PathBuf,
    std::path::PathBuf,
)> {
    println!("== guest image (Debian cloud kernel + busybox, built once and cached)");
    let start = Instant::now();
    let (kernel, _) = tokio::task::spawn_blocking(image).await?;
    table.row("guest image", start.elapsed());
    println!("   {}", kernel.display());

    let dir = tempfile::tempdir()?;
    let console_path = dir.path().join("console.sock");
    let mut spec = VmSpec::new("qhotplug-demo", Machine::Pc);
    spec.smp = 2; // the guest's virtio-net uses as many queue pairs as it has vCPUs
    spec.cpu_topology = Some(CpuTopology::max(4)); // room for hot-plugged vCPUs
    spec.memory_slots = 2; // and for DIMMs, up to 1 GiB in all
    spec.max_memory_mib = Some(1024);
    boot_spec(&mut spec, console_path.clone());
    // The guest agent's port (the guest image runs Debian's qemu-ga on it).
    qhotplug_tests::with_guest_agent(&mut spec, &dir.path().join("qga.sock"));
    // An IDE CD-ROM drive (the guest's sr0) holding a first ISO.
    let tools_1 = qhotplug_tests::iso(dir.path(), "tools-1.iso", "VERSION", "tools 1\n");
    let tools_2 = qhotplug_tests::iso(dir.path(), "tools-2.iso", "VERSION", "tools 2\n");
    spec.cdroms
        .push(Cdrom::ide("cd", IdeAddr::new(1, 0)).with_medium(&tools_1));
    Ok((dir, spec, console_path, tools_2))
}

/// QEMU launched with `spec`, its greeting printed.
async fn launch(table: &mut Table, spec: VmSpec, dir: &std::path::Path) -> Result<Vm> {
    println!("== launching QEMU (TCG)");
    let vm = timed(table, "launch QEMU + QMP handshake", async {
        Ok(Vm::launch(Launcher::new(spec, dir.join("run"))).await?)
    })
    .await?;
    let g = vm.client().greeting();
    println!(
        "   QEMU {} ({}), pid {:?}",
        g.version.qemu,
        g.version.package,
        vm.pid()
    );
    Ok(vm)
}

/// Every QMP event, printed as it arrives, until QEMU goes.
fn print_events(vm: &Vm) -> tokio::task::JoinHandle<()> {
    let mut events = vm.client().events();
    tokio::spawn(async move {
        while let Some(item) = events.next().await {
            match item {
                Ok(e) => println!("event   {} {}", e.name(), e.data()),
                Err(lagged) => println!("event   ({lagged})"),
            }
        }
    })
}

/// Waits for the guest's shell on its console.
async fn boot(table: &mut Table, console_path: &std::path::Path) -> Result<Console> {
    println!("== booting the guest");
    let console = Console::connect(console_path).await;
    let boot = Instant::now();
    let ready = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let wait = console.wait_for(0, "qhg: ready", Duration::from_secs(120));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                line = &mut wait => return line.ok_or("the guest did not boot within 120 s"),
                _ = tick.tick() => println!("   booting… {:.0} s", boot.elapsed().as_secs_f64()),
            }
        }
    };
    ready.await?;
    table.row("boot to a shell", boot.elapsed());
    println!("   guest ready in {}", format_duration(boot.elapsed()));
    Ok(console)
}

/// The guest agent running: the guest's OS and addresses.
async fn agent_up(table: &mut Table, vm: &Vm) -> Result<GuestAgent> {
    println!("== the guest agent");
    let start = Instant::now();
    let agent = vm.agent().await?.with_timeout(SEEN);
    agent.wait_running(SEEN).await?;
    let os = agent.execute(&GuestGetOsinfo).await?;
    table.row("agent running, OS info", start.elapsed());
    println!(
        "agent   OS: {} (kernel {}, {})",
        os.pretty_name.as_deref().unwrap_or("?"),
        os.kernel_release.as_deref().unwrap_or("?"),
        os.machine.as_deref().unwrap_or("?")
    );
    print_addresses(&agent).await?;
    Ok(agent)
}

/// A virtio-blk disk hot-added and grown online; returns the guest's name for it.
async fn disk(
    timings: &Timings,
    table: &mut Table,
    vm: &Vm,
    console: &Console,
    dir: &std::path::Path,
) -> Result<String> {
    // A 64 MiB disk.
    let image = dir.join("data-1.raw");
    std::fs::File::create(&image)?.set_len(64 << 20)?;
    println!("== hot-adding a virtio-blk disk");
    let mark = console.mark();
    let start = Instant::now();
    let disk = vm
        .add_disk(DiskConfig::virtio_blk("data-1", &image))
        .await?;
    table.steps_from(timings);
    println!("sdk     data-1 at {:?}", disk.frontend);
    let report = seen(console, mark, "qhg: add block").await?;
    table.row("guest sees data-1 (after the call)", start.elapsed());

    println!("== growing data-1 online to 128 MiB");
    let dev = report.split(' ').nth(2).unwrap_or("vda").to_owned();
    let start = Instant::now();
    let before = vm.resize_disk("data-1", 128 << 20).await?;
    table.steps_from(timings);
    println!("sdk     data-1 grew from {} MiB", before >> 20);
    // virtio-blk announces the new capacity; wait until the guest's size says so.
    guest_says(console, &format!("cat /sys/block/{dev}/size"), "262144").await?;
    println!("guest   /sys/block/{dev}/size = 262144 sectors (128 MiB)");
    table.row("guest sees 128 MiB (after the call)", start.elapsed());
    Ok(dev)
}

/// The CD-ROM's medium changed under the guest.
async fn cdrom(
    timings: &Timings,
    table: &mut Table,
    vm: &Vm,
    console: &Console,
    tools_2: &std::path::Path,
) -> Result<()> {
    println!("== changing the CD-ROM's medium: tools-1.iso out, tools-2.iso in");
    // The guest's first read after a change reports it (a unit attention); the read is retried.
    let read_cd = "mount -t iso9660 -o ro /dev/sr0 /mnt && cat /mnt/VERSION && umount /mnt";
    console.run("mkdir -p /mnt", SEEN).await;
    guest_says(console, read_cd, "tools 1").await?;
    println!("guest   /dev/sr0 holds VERSION = tools 1");
    let start = Instant::now();
    vm.insert_medium("cd", tools_2).await?;
    table.steps_from(timings);
    println!("sdk     cd now holds {}", tools_2.display());
    guest_says(console, read_cd, "tools 2").await?;
    println!("guest   /dev/sr0 holds VERSION = tools 2");
    table.row("guest reads the new CD", start.elapsed());
    Ok(())
}

/// A vCPU and a DIMM hot-added, onlined by the guest.
async fn vcpus_and_memory(
    timings: &Timings,
    table: &mut Table,
    vm: &Vm,
    console: &Console,
) -> Result<()> {
    println!("== vCPUs: 2 → 3 (onlined through the guest agent)");
    let start = Instant::now();
    let change = vm.set_vcpus_online(3).await?;
    table.steps_from(timings);
    println!(
        "sdk     added {:?}, acknowledged by the guest's ACPI: {}",
        change.added,
        change.unconfirmed.is_empty()
    );
    let guest = change.guest.ok_or("no report from the agent")?;
    println!(
        "agent   new CPUs {:?}, onlined {:?}; {} of {} online",
        guest.new, guest.onlined, guest.online, guest.total
    );
    guest_says(console, "cat /sys/devices/system/cpu/online", "0-2").await?;
    println!("guest   /sys/devices/system/cpu/online = 0-2");
    table.row("guest runs on 3 vCPUs", start.elapsed());

    println!("== memory: a 128 MiB DIMM (onlined as movable memory by the guest)");
    let meminfo = "grep MemTotal /proc/meminfo";
    let before = console.run(meminfo, SEEN).await.join(" ");
    let start = Instant::now();
    vm.add_memory(MemoryConfig::dimm("dimm-1", 128 * MIB))
        .await?;
    table.steps_from(timings);
    let kib: u64 = before
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or("no MemTotal")?;
    let want = format!("MemTotal:         {} kB", kib + 128 * 1024);
    guest_says(console, meminfo, &want).await?;
    println!("guest   {before} → {want}");
    table.row("guest sees the DIMM", start.elapsed());
    Ok(())
}

/// A two-queue NIC on a tap hot-added, given an address through the agent.
async fn nic(
    timings: &Timings,
    table: &mut Table,
    vm: &Vm,
    console: &Console,
    agent: &GuestAgent,
) -> Result<()> {
    println!("== hot-adding a two-queue virtio-net NIC on a tap");
    let tap = TapBuilder::new("qhdemo%d").queues(2).up(true).create()?;
    let tap_name = tap.name().to_owned();
    let mac = MacAddr::random_qemu();
    let mark = console.mark();
    let start = Instant::now();
    let nic = vm.add_nic(NicConfig::new("net-1", tap).mac(mac)).await?;
    table.steps_from(timings);
    println!(
        "sdk     net-1 on {tap_name} at {:?}, {} queues, vhost {}",
        nic.pci, nic.queues, nic.vhost
    );
    let report = seen(console, mark, "qhg: add net").await?;
    table.row("guest sees net-1 (after the call)", start.elapsed());
    if !report.ends_with(&format!("mac={mac}")) {
        return Err(format!("the guest sees MAC {report:?}, not {mac}").into());
    }
    let ifname = report.split(' ').nth(2).unwrap_or("eth0").to_owned();
    let listed = console
        .run(
            &format!("cat /proc/partitions; ls /sys/class/net/{ifname}/queues"),
            SEEN,
        )
        .await;
    for line in listed {
        println!("guest   {line}");
    }
    println!("== giving net-1 an address through the agent (guest-exec), and listing them");
    let script = format!(
        "ip link set lo up && ip addr add 192.0.2.10/24 dev {ifname} && ip link set {ifname} up"
    );
    let code = guest_exec(agent, &script).await?;
    println!("agent   `{script}` exited {code}");
    print_addresses(agent).await?;
    Ok(())
}

/// A live snapshot of data-1, full and incremental backups, and the overlay committed back.
async fn storage(
    timings: &Timings,
    table: &mut Table,
    vm: &Vm,
    console: &Console,
    dir: &std::path::Path,
    dev: &str,
) -> Result<()> {
    println!("== a live snapshot of data-1, the guest writing on");
    let overlay = dir.join("data-1.snap.qcow2");
    let start = Instant::now();
    let disks = vm
        .snapshot(SnapshotConfig::new().disk("data-1", &overlay))
        .await?;
    table.steps_from(timings);
    println!(
        "sdk     data-1 now writes to {} over {}",
        disks[0].path.display(),
        disks[0].backing[0].path.display()
    );
    let write = format!(
        "echo written-after-the-snapshot | dd of=/dev/{dev} bs=512 seek=2048 conv=notrunc,fsync 2>/dev/null; echo ok"
    );
    guest_says(console, &write, "ok").await?;
    table.row("snapshot, write", start.elapsed());

    println!("== backups of data-1: 8 MiB written, a full one; 1 MiB written, an incremental one");
    // The disk's top is now the qcow2 overlay, which can hold the checkpoint.
    let write = format!(
        "dd if=/dev/urandom of=/dev/{dev} bs=1M count=8 seek=16 conv=notrunc,fsync 2>/dev/null; echo ok"
    );
    guest_says(console, &write, "ok").await?;
    let full = dir.join("data-1.full.qcow2");
    let start = Instant::now();
    let backup = BackupConfig::full().disk("data-1", &full).checkpoint("b0");
    vm.backup(backup).await?.wait(SEEN).await?;
    table.steps_from(timings);
    table.row("full backup", start.elapsed());
    let write = format!(
        "dd if=/dev/urandom of=/dev/{dev} bs=64k count=16 seek=64 conv=notrunc,fsync 2>/dev/null; echo ok"
    );
    guest_says(console, &write, "ok").await?;
    let incremental = dir.join("data-1.inc.qcow2");
    let start = Instant::now();
    let backup = BackupConfig::incremental("b0")
        .disk_onto("data-1", &incremental, &full)
        .checkpoint("b1");
    vm.backup(backup).await?.wait(SEEN).await?;
    table.steps_from(timings);
    table.row("incremental backup", start.elapsed());
    for (what, path) in [("full       ", &full), ("incremental", &incremental)] {
        println!(
            "backup  {what} {} : {:.1} MiB on disk",
            path.display(),
            allocated(path)? as f64 / MIB as f64
        );
    }
    for checkpoint in vm.checkpoints("data-1").await? {
        println!(
            "sdk     checkpoint {}: {:?}, recorded {} KiB{}",
            checkpoint.name,
            checkpoint.state,
            checkpoint.recorded >> 10,
            if checkpoint.recording {
                ", recording"
            } else {
                ""
            }
        );
    }

    println!("== data-1's overlay committed back");
    let start = Instant::now();
    let mut job =
        vm.commit_disk("data-1")
            .await?
            .on_progress(Duration::from_millis(250), |p: &JobInfo| {
                println!(
                    "job     {} {}: {} of {} bytes",
                    p.id, p.status, p.current_progress, p.total_progress
                )
            });
    job.wait_ready(SEEN).await?;
    let disk = job.pivot().await?;
    table.steps_from(timings);
    println!(
        "sdk     data-1 back on {} alone ({} images under it)",
        disk.path.display(),
        disk.backing.len()
    );
    let read = format!(
        "echo 3 >/proc/sys/vm/drop_caches; dd if=/dev/{dev} bs=512 skip=2048 count=1 2>/dev/null | head -n1"
    );
    guest_says(console, &read, "written-after-the-snapshot").await?;
    println!("guest   reads written-after-the-snapshot from the committed disk");
    table.row("commit back", start.elapsed());
    Ok(())
}

/// Both devices hot-removed, the guest letting go.
async fn remove(timings: &Timings, table: &mut Table, vm: &Vm, console: &Console) -> Result<()> {
    println!("== hot-removing both (the guest lets go; DEVICE_DELETED says when)");
    let mark = console.mark();
    let start = Instant::now();
    vm.remove_disk("data-1").await?;
    table.steps_from(timings);
    seen(console, mark, "qhg: remove block").await?;
    table.row("guest lost data-1", start.elapsed());
    let mark = console.mark();
    let start = Instant::now();
    vm.remove_nic("net-1").await?;
    table.steps_from(timings);
    seen(console, mark, "qhg: remove net").await?;
    table.row("guest lost net-1", start.elapsed());
    Ok(())
}

/// Live migration to a new QEMU launched from `vm.spec()`, then a graceful shutdown there.
async fn migrate_and_shut_down(
    timings: &Timings,
    table: &mut Table,
    vm: Vm,
    dir: &std::path::Path,
    printer: tokio::task::JoinHandle<()>,
) -> Result<()> {
    println!("== live migration to a new QEMU launched from vm.spec() (the guest keeps running)");
    let target_console = dir.join("target-console.sock");
    let mut launcher = vm.migration_launcher(dir.join("target"));
    launcher.spec_mut().serials = vec![Serial::Socket(target_console.clone())];
    for port in &mut launcher.spec_mut().serial_ports {
        port.socket = dir.join(format!("target-{}.sock", port.id));
    }
    let target = Vm::launch(launcher).await?;
    let options = MigrationOptions::new(Transport::Unix(dir.join("migrate.sock")));
    let migrated = vm
        .migrate(target, options, |p| {
            let done = p.transferred as f64 / (p.transferred + p.remaining).max(1) as f64;
            let bar = "#".repeat((done * 30.0) as usize);
            println!(
                "migrate [{bar:<30}] {:>3.0}%  {:>4} MiB sent  pass {}  {}",
                done * 100.0,
                p.transferred >> 20,
                p.passes,
                p.status
            );
        })
        .await?;
    table.steps_from(timings);
    table.row("migrate (QEMU's total time)", migrated.total_time);
    table.row("  guest paused (downtime)", migrated.downtime);
    printer.await?;
    let console = Console::connect(&target_console).await;
    let out = console
        .run(
            "cat /sys/devices/system/cpu/online; grep MemTotal /proc/meminfo",
            SEEN,
        )
        .await;
    for line in out {
        println!("guest   (on the target) {line}");
    }
    let target = migrated.target;
    apply_edited(timings, table, &target, dir, &console).await?;
    println!("== graceful shutdown (through the agent; QEMU quit if the guest takes over 30 s)");
    let start = Instant::now();
    match target.shutdown(PowerVia::Auto, SEEN).await? {
        Stopped::Graceful { via, reason, after } => println!(
            "sdk     the guest shut down ({via:?}, {}) in {}",
            reason.as_deref().unwrap_or("?"),
            format_duration(after)
        ),
        other => return Err(format!("the guest did not shut down: {other:?}").into()),
    }
    table.row("graceful shutdown", start.elapsed());
    Ok(())
}

/// Desired state: the VM's spec edited (a disk and an RNG added at addresses left to the SDK, a
/// vCPU fewer is not asked: TCG), planned, applied, each step's outcome printed, then planned
/// again: nothing left.
async fn apply_edited(
    timings: &Timings,
    table: &mut Table,
    vm: &Vm,
    dir: &std::path::Path,
    console: &Console,
) -> Result<()> {
    println!("== desired state: vm.spec() edited, planned and applied");
    let image = dir.join("data-2.raw");
    std::fs::File::create(&image)?.set_len(32 * MIB)?;
    let mut spec = vm.spec();
    let mut disk = Disk::virtio_blk("data-2", &image, Pci::auto());
    disk.io_limits = Some(IoLimits {
        iops: 500,
        ..IoLimits::default()
    });
    spec.disks.push(disk);
    spec.rngs.push(Rng {
        id: "rng-1".into(),
        pci: Pci::auto(),
        source: "/dev/urandom".into(),
    });
    let desired = || Desired::new(spec.clone()).disk_size("data-2", 64 * MIB);
    let plan = vm.plan(&desired()).await?;
    print!("plan\n{plan}");
    let mark = console.mark();
    let start = Instant::now();
    let applied = vm.apply(desired()).await?;
    table.steps_from(timings);
    table.row(
        format!("apply ({} steps)", applied.steps.len()),
        start.elapsed(),
    );
    for (step, outcome) in &applied.steps {
        println!("sdk     {}: {outcome:?}", step.change);
    }
    if !applied.all_done() {
        return Err("a step of the plan failed".into());
    }
    let now = vm.spec();
    let at = &now
        .disks
        .iter()
        .find(|d| d.id == "data-2")
        .unwrap()
        .frontend;
    println!("sdk     data-2 went to {at:?}");
    seen(console, mark, "qhg: add block").await?;
    let again = vm.plan(&desired()).await?;
    println!("sdk     planned again: {} steps", again.steps.len());
    if !again.is_empty() {
        return Err(format!("the plan is not empty after apply: {again}").into());
    }
    Ok(())
}

/// Runs `script` in the guest through the agent and waits (by `SEEN`) for its exit code.
async fn guest_exec(agent: &GuestAgent, script: &str) -> Result<i64> {
    let started = agent
        .execute(&GuestExec {
            path: "/bin/sh".into(),
            arg: vec!["-c".into(), script.into()],
            capture_output: true,
        })
        .await?;
    let deadline = Instant::now() + SEEN;
    loop {
        let status = agent.execute(&GuestExecStatus { pid: started.pid }).await?;
        if status.exited {
            return Ok(status.exitcode.unwrap_or(-1));
        }
        if Instant::now() > deadline {
            return Err(format!("`{script}` did not exit within {SEEN:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Prints each interface the agent lists, with its MAC and addresses.
async fn print_addresses(agent: &GuestAgent) -> Result<()> {
    for i in agent.execute(&GuestNetworkGetInterfaces).await? {
        let addresses: Vec<String> = i
            .ip_addresses
            .iter()
            .map(|a| format!("{}/{}", a.ip_address, a.prefix))
            .collect();
        println!(
            "agent   {:<6} {:<17} {}",
            i.name,
            i.hardware_address.as_deref().unwrap_or("-"),
            addresses.join(" ")
        );
    }
    Ok(())
}

/// Bytes a file takes on disk (its allocated blocks).
fn allocated(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}
