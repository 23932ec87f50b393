//! `cargo bench -p qhotplug-tests --bench mirror`
//!
//! A drive mirror of a 1 GiB raw image full of data, pivoted, driven by the SDK (`Vm::mirror_disk`,
//! `wait_ready`, `pivot`) beside the floor: a raw blocking monitor on the same QEMU's second
//! monitor sending the same commands for a second disk of the same size (the target file made and
//! opened, `add-fd`, `blockdev-add` ×2, `blockdev-mirror` with `auto-dismiss: false`,
//! `JOB_STATUS_CHANGE` `ready`, `job-complete`, `concluded`, `job-dismiss`, `blockdev-del` ×2 of
//! the old image, its fd set removed as the SDK's sweep does: `query-fdsets`,
//! `query-named-block-nodes`, `remove-fd`). Both are timed from the first command to the old
//! image's nodes gone; rounds alternate, each copying 1 GiB onto a new file. Then, for scale, the
//! same 1 GiB copied by `qemu-img convert` and by `dd` in the same place. The images live in
//! `/dev/shm`: on the host disk, its writeback of earlier rounds swamps the difference compared.
//!
//! Prints each round and, last, `ratio_wall=…` (floor time / SDK time, the median of per-pair
//! ratios).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qhotplug::{DiskConfig, MirrorConfig};
use qhotplug_cmdline::names;
use qhotplug_qmp::command::AddFd;
use qhotplug_tests::raw::{encode, RawMonitor};
use serde_json::json;

const PAIRS: usize = 8;
const MIB: usize = 1024;

fn main() {
    qhotplug_tests::bench_main(run());
}

/// The floor's round: disk `id` moves from generation `from` to a new raw image at `target`.
fn raw_round(mon: &Path, id: &str, from: u32, target: &Path, size: u64) -> Duration {
    let mut raw = RawMonitor::connect(mon);
    let to = from + 1;
    let start = Instant::now();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(target)
        .unwrap();
    file.set_len(size).unwrap();
    let add = AddFd {
        fdset_id: None,
        opaque: Some(names::fdset_tag(id)),
    };
    let info = raw.send_encoded("add-fd", &encode("add-fd", &add), Some(&file));
    drop(file);
    let set = info["fdset-id"].as_i64().unwrap();
    let (file_node, fmt_node) = (names::file_node_at(id, to), names::format_node_at(id, to));
    raw.send(
        "blockdev-add",
        &json!({"driver": "file", "node-name": file_node, "filename": format!("/dev/fdset/{set}")}),
        None,
    );
    raw.send(
        "blockdev-add",
        &json!({"driver": "raw", "node-name": fmt_node, "file": file_node}),
        None,
    );
    let job = format!("mirror-{id}");
    raw.send(
        "blockdev-mirror",
        &json!({"job-id": job, "device": names::format_node_at(id, from), "target": fmt_node,
                "sync": "full", "auto-dismiss": false}),
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
    for node in [
        names::format_node_at(id, from),
        names::file_node_at(id, from),
    ] {
        raw.send("blockdev-del", &json!({ "node-name": node }), None);
    }
    // The old image's fd set, once no node opens it (the SDK's sweep at a job's end).
    let sets = raw.send("query-fdsets", &json!({}), None);
    raw.send("query-named-block-nodes", &json!({"flat": true}), None);
    let tag = names::fdset_tag(id);
    for listed in sets.as_array().unwrap() {
        let fds = listed["fds"].as_array().unwrap();
        let tagged = fds.iter().any(|f| f["opaque"] == tag.as_str());
        let n = listed["fdset-id"].as_i64().unwrap();
        if tagged && n != set {
            raw.send("remove-fd", &json!({ "fdset-id": n }), None);
        }
    }
    start.elapsed()
}

fn timed_command(program: &str, args: &[&str], from: &Path, to: &Path) -> Duration {
    let start = Instant::now();
    let status = std::process::Command::new(program)
        .args(args)
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success(), "{program}");
    let took = start.elapsed();
    std::fs::remove_file(to).unwrap();
    took
}

fn rate(took: Duration) -> f64 {
    MIB as f64 / took.as_secs_f64()
}

async fn run() {
    let (t, dir, mon) = qhotplug_tests::storage_bench_vm().await;
    let d = dir.path().to_owned();
    let sdk_src = qhotplug_tests::storage::data_image(&d, "sdk-0.raw", MIB, 1);
    let raw_src = qhotplug_tests::storage::data_image(&d, "raw-0.raw", MIB, 2);
    let size = (MIB as u64) << 20;
    t.vm.add_disk(DiskConfig::virtio_blk("s", &sdk_src))
        .await
        .unwrap();
    t.vm.add_disk(DiskConfig::virtio_blk("r", &raw_src))
        .await
        .unwrap();
    println!("drive mirror of a 1 GiB raw image, pivoted (QEMU, no guest), {PAIRS} pairs");

    let (mut sdk, mut floor) = (Vec::new(), Vec::new());
    let (mut sdk_old, mut raw_old): (PathBuf, PathBuf) = (sdk_src, raw_src);
    for round in 0..PAIRS {
        let gen = round as u32;
        let sdk_to = d.join(format!("sdk-{}.raw", round + 1));
        let raw_to = d.join(format!("raw-{}.raw", round + 1));
        let sdk_round = async {
            let start = Instant::now();
            let mut job =
                t.vm.mirror_disk("s", MirrorConfig::new(&sdk_to))
                    .await
                    .unwrap();
            job.wait_ready(Duration::from_secs(600)).await.unwrap();
            job.pivot().await.unwrap();
            start.elapsed()
        };
        let raw = |mon: PathBuf, to: PathBuf| {
            tokio::task::spawn_blocking(move || raw_round(&mon, "r", gen, &to, size))
        };
        // Who goes first alternates.
        let (s, f) = if round % 2 == 0 {
            let s = sdk_round.await;
            (s, raw(mon.clone(), raw_to.clone()).await.unwrap())
        } else {
            let f = raw(mon.clone(), raw_to.clone()).await.unwrap();
            (sdk_round.await, f)
        };
        println!(
            "round {round}: sdk {:.0} ms ({:.0} MiB/s), floor {:.0} ms ({:.0} MiB/s)",
            s.as_secs_f64() * 1e3,
            rate(s),
            f.as_secs_f64() * 1e3,
            rate(f)
        );
        sdk.push(s);
        floor.push(f);
        std::fs::remove_file(&sdk_old).unwrap();
        std::fs::remove_file(&raw_old).unwrap();
        (sdk_old, raw_old) = (sdk_to, raw_to);
    }
    // For scale: the same bytes copied outside QEMU, from the SDK's current image.
    let out = d.join("copy.raw");
    let convert = timed_command("qemu-img", &["convert", "-U", "-O", "raw"], &sdk_old, &out);
    let dd_start = Instant::now();
    let status = std::process::Command::new("dd")
        .arg(format!("if={}", sdk_old.display()))
        .arg(format!("of={}", out.display()))
        .args(["bs=1M", "status=none"])
        .status()
        .unwrap();
    assert!(status.success());
    let dd = dd_start.elapsed();
    std::fs::remove_file(&out).unwrap();
    println!(
        "copy rate (MiB/s, median): QEMU mirror via the SDK {:.0}, floor {:.0}; qemu-img convert {:.0}; dd bs=1M {:.0}",
        rate(qhotplug_tests::median(sdk.clone())),
        rate(qhotplug_tests::median(floor.clone())),
        rate(convert),
        rate(dd)
    );
    let ratio = qhotplug_tests::median_ratio(&floor, &sdk);
    println!("ratio_wall={ratio:.3}");
    t.vm.quit().await.unwrap();
}
