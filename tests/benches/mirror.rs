//! `cargo bench -p qhotplug-tests --bench mirror`
//!
//! A drive mirror of a 1 GiB raw image full of data, pivoted, driven by the SDK (`Vm::mirror_disk`,
//! `wait_ready`, `pivot`) beside the floor: a raw blocking monitor on the same QEMU's second
//! monitor sending the same commands for a second disk of the same size (the target file made and
//! opened, `add-fd`, `blockdev-add` ×2, `blockdev-mirror` with `auto-dismiss: false`,
//! `JOB_STATUS_CHANGE` `ready`, `job-complete`, `concluded`, `job-dismiss`, `blockdev-del` ×2 of
//! the old image, its fd set removed as the SDK's sweep does: `query-fdsets`,
//! `query-named-block-nodes`, `remove-fd`). Both are timed from the first command to the old
//! image's nodes gone; each round copies 1 GiB onto a new file. Each round also times `qemu-img
//! convert` of the SDK's current image to raw in the same place; the three go in an order that
//! rotates from round to round. Then, for scale, `dd` of the same 1 GiB. The images live in
//! `/dev/shm`: on the host disk, its writeback of earlier rounds swamps the difference compared.
//!
//! Prints each round and, last, `ratio_wall=…` (floor time / SDK time, the median of per-pair
//! ratios) and `ratio_convert=…` (convert time / SDK time: the SDK's copy rate as a share of
//! `qemu-img`'s).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qhotplug::{DiskConfig, MirrorConfig};
use qhotplug_cmdline::names;
use qhotplug_qmp::command::AddFd;
use qhotplug_tests::raw::{encode, RawMonitor};
use qhotplug_tests::storage::convert_time;
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

    let (mut sdk, mut floor, mut host) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sdk_old, mut raw_old): (PathBuf, PathBuf) = (sdk_src, raw_src);
    for round in 0..PAIRS {
        let gen = round as u32;
        let sdk_to = d.join(format!("sdk-{}.raw", round + 1));
        let raw_to = d.join(format!("raw-{}.raw", round + 1));
        let (mut s, mut f, mut c) = (None, None, None);
        // The three in an order that rotates: who goes first, second and last.
        for turn in 0..3 {
            match (round + turn) % 3 {
                0 => {
                    let start = Instant::now();
                    let mut job =
                        t.vm.mirror_disk("s", MirrorConfig::new(&sdk_to))
                            .await
                            .unwrap();
                    job.wait_ready(Duration::from_secs(600)).await.unwrap();
                    job.pivot().await.unwrap();
                    s = Some(start.elapsed());
                }
                1 => {
                    let (mon, to) = (mon.clone(), raw_to.clone());
                    let raw =
                        tokio::task::spawn_blocking(move || raw_round(&mon, "r", gen, &to, size));
                    f = Some(raw.await.unwrap());
                }
                _ => c = Some(convert_time(&sdk_old, &d.join("convert.raw"))),
            }
        }
        let (s, f, c) = (s.unwrap(), f.unwrap(), c.unwrap());
        println!(
            "round {round}: sdk {:.0} ms ({:.0} MiB/s), floor {:.0} ms ({:.0} MiB/s), qemu-img convert {:.0} ms ({:.0} MiB/s)",
            s.as_secs_f64() * 1e3,
            rate(s),
            f.as_secs_f64() * 1e3,
            rate(f),
            c.as_secs_f64() * 1e3,
            rate(c)
        );
        sdk.push(s);
        floor.push(f);
        host.push(c);
        std::fs::remove_file(&sdk_old).unwrap();
        std::fs::remove_file(&raw_old).unwrap();
        (sdk_old, raw_old) = (sdk_to, raw_to);
    }
    // For scale: the same bytes copied by `dd`, from the SDK's current image.
    let out = d.join("copy.raw");
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
        rate(qhotplug_tests::median(host.clone())),
        rate(dd)
    );
    let ratio = qhotplug_tests::median_ratio(&floor, &sdk);
    let ratio_convert = qhotplug_tests::median_ratio(&host, &sdk);
    println!("ratio_wall={ratio:.3} ratio_convert={ratio_convert:.3}");
    t.vm.quit().await.unwrap();
}
