//! `cargo bench -p qhotplug-tests --bench commit`
//!
//! An active commit of 256 MiB of data from a qcow2 overlay into its raw base (256 MiB, written
//! through: on a sparse base the kernel's page allocation swamped what is compared), pivoted, driven by
//! the SDK (`Vm::commit_disk`, `wait_ready`, `pivot`) beside the floor: a raw blocking monitor on
//! the same QEMU's second monitor sending the same commands for a second disk set up the same
//! way (`block-commit` with `auto-dismiss: false`, `JOB_STATUS_CHANGE` `ready`, `job-complete`,
//! `concluded`, `job-dismiss`, `blockdev-del` ×2 of the overlay). Each round adds two new disks,
//! snapshots both through the SDK, and writes 256 MiB into each overlay with QEMU's own `qemu-io`
//! (untimed); then the two commits are timed from the first command to the overlay's nodes gone.
//! Who goes first alternates, and so, independently, does whose overlay is written first. Images in `/dev/shm`, as
//! the mirror benchmark's.
//!
//! Prints each round and, last, `ratio_wall=…` (floor time / SDK time, the median of per-pair
//! ratios).

use std::path::Path;
use std::time::{Duration, Instant};

use qhotplug::{DiskConfig, SnapshotConfig};
use qhotplug_cmdline::names;
use qhotplug_qmp::command::HumanMonitorCommand;
use qhotplug_tests::raw::RawMonitor;
use serde_json::json;

const PAIRS: usize = 8;
/// The data committed each round, in MiB.
const DATA_MIB: u64 = 256;

fn main() {
    qhotplug_tests::bench_main(run());
}

/// The floor's round: disk `id`'s overlay (generation 1) committed into its base (generation 0).
fn raw_round(mon: &Path, id: &str) -> Duration {
    let mut raw = RawMonitor::connect(mon);
    let (top, base) = (names::format_node_at(id, 1), names::format_node_at(id, 0));
    let job = format!("commit-{id}");
    let start = Instant::now();
    raw.send(
        "block-commit",
        &json!({"job-id": job, "device": top, "top-node": top, "base-node": base,
                "auto-dismiss": false}),
        None,
    );
    raw.wait_event("JOB_STATUS_CHANGE", |d| {
        d["id"] == job && d["status"] == "ready"
    });
    raw.send("job-complete", &json!({ "id": job }), None);
    raw.wait_event("JOB_STATUS_CHANGE", |d| {
        d["id"] == job && d["status"] == "concluded"
    });
    raw.send("job-dismiss", &json!({ "id": job }), None);
    for node in [top, names::file_node_at(id, 1)] {
        raw.send("blockdev-del", &json!({ "node-name": node }), None);
    }
    start.elapsed()
}

fn rate(took: Duration) -> f64 {
    DATA_MIB as f64 / took.as_secs_f64()
}

async fn run() {
    let (t, dir, mon) = qhotplug_tests::storage_bench_vm().await;
    let d = dir.path().to_owned();
    println!(
        "active commit of {DATA_MIB} MiB into a raw base, pivoted (QEMU, no guest), {PAIRS} pairs"
    );

    let (mut sdk, mut floor) = (Vec::new(), Vec::new());
    for round in 0..PAIRS {
        let (s, r) = (format!("s{round}"), format!("r{round}"));
        let mut snapshot = SnapshotConfig::new();
        for id in [&s, &r] {
            // Written through, so that the commit overwrites pages tmpfs already has rather
            // than timing the kernel's page allocation.
            let base = qhotplug_tests::storage::data_image(
                &d,
                &format!("{id}.raw"),
                DATA_MIB as usize,
                round as u64,
            );
            t.vm.add_disk(DiskConfig::virtio_blk(id, &base))
                .await
                .unwrap();
            snapshot = snapshot.disk(id, d.join(format!("{id}.1.qcow2")));
        }
        t.vm.snapshot(snapshot).await.unwrap();
        // Written first, an overlay commits more slowly (seen: by ~30% in /dev/shm), so which is
        // written first alternates too, independently of who goes first.
        let order = if (round / 2) % 2 == 0 {
            [&s, &r]
        } else {
            [&r, &s]
        };
        for id in order {
            let write = HumanMonitorCommand {
                command_line: format!(
                    "qemu-io -d /machine/peripheral/{id}/virtio-backend \"write -P 0x5a 0 {DATA_MIB}M\""
                ),
                cpu_index: None,
            };
            let out = t.vm.client().execute(&write).await.unwrap();
            assert!(!out.contains("rror"), "{out}");
        }
        let sdk_round = async {
            let start = Instant::now();
            let mut job = t.vm.commit_disk(&s).await.unwrap();
            job.wait_ready(Duration::from_secs(600)).await.unwrap();
            job.pivot().await.unwrap();
            start.elapsed()
        };
        let raw = || {
            let (mon, r) = (mon.clone(), r.clone());
            tokio::task::spawn_blocking(move || raw_round(&mon, &r))
        };
        let (s_took, f_took) = if round % 2 == 0 {
            let s_took = sdk_round.await;
            (s_took, raw().await.unwrap())
        } else {
            let f_took = raw().await.unwrap();
            (sdk_round.await, f_took)
        };
        println!(
            "round {round}: sdk {:.0} ms ({:.0} MiB/s), floor {:.0} ms ({:.0} MiB/s)",
            s_took.as_secs_f64() * 1e3,
            rate(s_took),
            f_took.as_secs_f64() * 1e3,
            rate(f_took)
        );
        sdk.push(s_took);
        floor.push(f_took);
        for id in [&s, &r] {
            std::fs::remove_file(d.join(format!("{id}.1.qcow2"))).unwrap();
        }
    }
    println!(
        "commit rate (MiB/s, median): SDK {:.0}, floor {:.0}",
        rate(qhotplug_tests::median(sdk.clone())),
        rate(qhotplug_tests::median(floor.clone()))
    );
    let ratio = qhotplug_tests::median_ratio(&floor, &sdk);
    println!("ratio_wall={ratio:.3}");
    t.vm.quit().await.unwrap();
}
