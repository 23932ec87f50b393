//! `cargo bench -p qhotplug-tests --bench storage_migration`
//!
//! Live migration without shared storage of a VM (TCG, no guest OS) whose disk is a 256 MiB raw
//! image full of data, hop after hop over Unix sockets: each hop launches a target from the
//! current VM's spec with its disk on a new, empty image of the same size (untimed), then moves
//! VM and disk. Hops alternate between the SDK (`Vm::migrate` with
//! `MigrationOptions::copy_storage`) and the floor: raw blocking monitors on both QEMUs' second
//! monitors sending the same commands (`migrate-set-capabilities` `events` on both,
//! `query-block` on both, the target's `nbd-server-start` and `block-export-add`, the source's
//! `blockdev-add` ×2 and `blockdev-mirror`, `JOB_STATUS_CHANGE` `ready`, `migrate-incoming`,
//! `migrate`, `MIGRATION` `completed` on both, `block-job-cancel`, `concluded`, `job-dismiss`,
//! `blockdev-del` ×2, `block-export-del`, `nbd-server-stop`, `query-migrate`, the source's
//! `quit`). Both are timed from the first command to the source's `quit`. Images in `/dev/shm`.
//! The QEMU build's QMP schema is read before the first hop and kept, as a process running other
//! VMs of the same build keeps it.
//!
//! Each SDK hop is paired with `qemu-img convert` of the disk's image to raw in the same place,
//! before the hop or after it in turn.
//!
//! Prints each hop and, last, `ratio_wall=…` (floor wall time / SDK wall time, the median of
//! per-pair ratios), `ratio_convert=…` (convert time / SDK hop time, the median over SDK hops:
//! the whole hop's rate, memory and set-up included, as a share of `qemu-img`'s copy) and
//! `ratio_convert_copy=…` (the same for the copy alone: from the first progress report of the
//! disks copying to the last, when every mirror is in sync).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qhotplug::{MigrationOptions, NbdServer, StorageCopy, Transport, Vm};
use qhotplug_cmdline::{Disk, Pci};
use qhotplug_tests::raw::RawMonitor;
use qhotplug_tests::storage::convert_time;
use qhotplug_tests::{pc_spec, second_monitor};
use serde_json::json;

const PAIRS: usize = 4;
const MIB: u64 = 256;

fn main() {
    qhotplug_tests::bench_main(run());
}

/// A target for `vm` whose disk is a new, empty image in `dir`, with its second monitor there.
async fn target(vm: &Vm, dir: &Path, hop: usize) -> (Vm, PathBuf) {
    let image = dir.join(format!("d1.{hop}.raw"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(MIB << 20)
        .unwrap();
    let mut launcher = vm.migration_launcher(dir.join(format!("t{hop}")));
    let spec = launcher.spec_mut();
    spec.extra_args.clear();
    second_monitor(spec, &dir.join(format!("mon{hop}.sock")));
    spec.disks[0].path = image.clone();
    (Vm::launch(launcher).await.unwrap(), image)
}

/// The floor: VM and disk moved raw from `source_mon` to `target_mon`.
fn raw_hop(source_mon: &Path, target_mon: &Path, uri: &str, nbd: &Path) -> Duration {
    let mut src = RawMonitor::connect(source_mon);
    let mut dst = RawMonitor::connect(target_mon);
    let caps = json!({"capabilities": [{"capability": "events", "state": true}]});
    let start = Instant::now();
    src.send("migrate-set-capabilities", &caps, None);
    dst.send("migrate-set-capabilities", &caps, None);
    src.send("query-block", &json!({}), None);
    dst.send("query-block", &json!({}), None);
    let path = nbd.to_string_lossy();
    dst.send(
        "nbd-server-start",
        &json!({"addr": {"type": "unix", "data": {"path": path}}}),
        None,
    );
    dst.send(
        "block-export-add",
        &json!({"type": "nbd", "id": "mig-d1", "node-name": "d1-fmt", "name": "d1",
                "writable": true}),
        None,
    );
    src.send(
        "blockdev-add",
        &json!({"driver": "nbd", "node-name": "mig-d1-nbd",
                "server": {"type": "unix", "path": path}, "export": "d1"}),
        None,
    );
    src.send(
        "blockdev-add",
        &json!({"driver": "raw", "node-name": "mig-d1-raw", "file": "mig-d1-nbd"}),
        None,
    );
    src.send(
        "blockdev-mirror",
        &json!({"job-id": "mig-d1", "device": "d1-fmt", "target": "mig-d1-raw",
                "sync": "full", "auto-dismiss": false}),
        None,
    );
    src.wait_event("JOB_STATUS_CHANGE", |d| {
        d["id"] == "mig-d1" && d["status"] == "ready"
    });
    dst.send("migrate-incoming", &json!({ "uri": uri }), None);
    src.send("migrate", &json!({ "uri": uri }), None);
    src.wait_event("MIGRATION", |d| d["status"] == "completed");
    dst.wait_event("MIGRATION", |d| d["status"] == "completed");
    src.send("block-job-cancel", &json!({"device": "mig-d1"}), None);
    src.wait_event("JOB_STATUS_CHANGE", |d| {
        d["id"] == "mig-d1" && d["status"] == "concluded"
    });
    src.send("job-dismiss", &json!({"id": "mig-d1"}), None);
    for node in ["mig-d1-raw", "mig-d1-nbd"] {
        src.send("blockdev-del", &json!({ "node-name": node }), None);
    }
    dst.send(
        "block-export-del",
        &json!({"id": "mig-d1", "mode": "hard"}),
        None,
    );
    dst.send("nbd-server-stop", &json!({}), None);
    src.send("query-migrate", &json!({}), None);
    src.send("quit", &json!({}), None);
    start.elapsed()
}

async fn run() {
    use tracing_subscriber::layer::SubscriberExt;
    let timings = qhotplug_tests::timing::Timings::new();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(timings.clone()))
        .unwrap();
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let d = dir.path().to_owned();
    let image = qhotplug_tests::storage::data_image(&d, "d1.0.raw", MIB as usize, 1);
    let mut spec = pc_spec();
    spec.paused = false;
    second_monitor(&mut spec, &d.join("mon0.sock"));
    spec.disks
        .push(Disk::virtio_blk("d1", &image, Pci::new("pci.0", 5)));
    let mut current = Vm::launch(qhotplug_cmdline::Launcher::new(spec, d.join("t0")))
        .await
        .unwrap();
    // The build's QMP schema, read once and kept, as in a process that runs other VMs of the same
    // QEMU build (connections share it while one holds it; here the VMs come and go).
    let keeps_schema = current.client().clone();
    keeps_schema.schema().await.unwrap();
    let mut current_mon = d.join("mon0.sock");
    let mut current_image = image;
    println!("migration without shared storage of a VM with a 256 MiB raw disk (TCG, no guest), {PAIRS} pairs");
    let (mut sdk, mut floor, mut host, mut copies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for hop in 1..=2 * PAIRS {
        let (next, next_image) = target(&current, &d, hop).await;
        let next_mon = d.join(format!("mon{hop}.sock"));
        let uri_path = d.join(format!("m{hop}.sock"));
        let nbd = d.join(format!("nbd{hop}.sock"));
        let (who, wall) = if hop % 2 == 1 {
            // The disk's image copied by `qemu-img`: before the hop, or after it, in turn.
            if hop % 4 == 1 {
                host.push(convert_time(&current_image, &d.join("convert.raw")));
            }
            let start = Instant::now();
            let options = MigrationOptions::new(Transport::Unix(uri_path))
                .copy_storage(StorageCopy::new(NbdServer::Unix(nbd)));
            // The copy: from the first report of the disks copying to the last (all in sync).
            let (mut first, mut last) = (None, None);
            current
                .migrate(next.clone(), options, |p| {
                    if p.status == "copying storage" {
                        first.get_or_insert_with(Instant::now);
                        last = Some(Instant::now());
                    }
                })
                .await
                .unwrap();
            let wall = start.elapsed();
            sdk.push(wall);
            copies.push(last.unwrap() - first.unwrap());
            if hop % 4 == 3 {
                host.push(convert_time(&next_image, &d.join("convert.raw")));
            }
            ("sdk", wall)
        } else {
            let (src, dst) = (current_mon.clone(), next_mon.clone());
            let uri = format!("unix:{}", uri_path.display());
            let wall = tokio::task::spawn_blocking(move || raw_hop(&src, &dst, &uri, &nbd))
                .await
                .unwrap();
            floor.push(wall);
            ("floor", wall)
        };
        println!(
            "hop {hop} {who:<5} wall {:>7.1} ms ({:.0} MiB/s)",
            wall.as_secs_f64() * 1e3,
            MIB as f64 / wall.as_secs_f64()
        );
        for t in timings.take() {
            if who == "sdk" && t.elapsed > Duration::from_millis(5) {
                println!(
                    "    {} {} {:.1} ms",
                    t.kind,
                    t.name,
                    t.elapsed.as_secs_f64() * 1e3
                );
            }
        }
        std::fs::remove_file(&current_image).unwrap();
        current = next;
        current_mon = next_mon;
        current_image = next_image;
    }
    println!(
        "the copies (first to last report of the disks copying, ms): {:?}",
        copies
            .iter()
            .map(|c: &Duration| (c.as_secs_f64() * 1e4).round() / 10.0)
            .collect::<Vec<_>>()
    );
    println!(
        "ratio_wall={:.3} ratio_convert={:.3} ratio_convert_copy={:.3}",
        qhotplug_tests::median_ratio(&floor, &sdk),
        qhotplug_tests::median_ratio(&host, &sdk),
        qhotplug_tests::median_ratio(&host, &copies)
    );
    current.quit().await.unwrap();
}
