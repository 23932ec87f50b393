//! `cargo bench -p qhotplug-tests --bench backup`
//!
//! Push backups of a 512 MiB qcow2 image full of data (QEMU, no guest; images in `/dev/shm`).
//!
//! - **Full backup, SDK beside its floor:** `Vm::backup` (a full backup to a new raw file, making
//!   a checkpoint) beside a raw blocking monitor on the same QEMU's second monitor sending the
//!   same commands for a second disk of the same data (the target made and opened, `add-fd`,
//!   `blockdev-add` ×2, one `transaction` of the previous checkpoint's `disable`, the new one's
//!   `add` and `blockdev-backup`, `JOB_STATUS_CHANGE` `concluded`, `job-dismiss`, `blockdev-del`
//!   ×2, and the target's fd set removed as the SDK's sweep does: `query-fdsets`,
//!   `query-named-block-nodes`, `remove-fd`; the job with the SDK's `x-perf`, copy offloading).
//! - **Beside the host's copy:** each round also times `qemu-img convert` of the same image to
//!   raw in the same place, and the SDK's backup with `copy_offload(false)` (QEMU's defaults);
//!   the four go in an order that rotates from round to round. `ratio_convert` is the median of
//!   the rounds' convert time / SDK time (the SDK's copy rate as a share of `qemu-img`'s), and
//!   `ratio_convert_without_offloading` the same for the backup without offloading.
//! - **Incremental after 1 % changed, beside the full:** 1 % of the disk written through the
//!   device (HMP `qemu-io`, 82 × 64 KiB spread over it), then an incremental backup to qcow2,
//!   timed with the size it allocates, beside the full backups above.
//!
//! Prints each round and, last, `ratio_wall=…` (floor time / SDK time, the median of per-pair
//! ratios) and `ratio_convert=…`.

use std::path::Path;
use std::time::{Duration, Instant};

use qhotplug::{BackupConfig, DiskConfig, Format};
use qhotplug_cmdline::names;
use qhotplug_qmp::command::AddFd;
use qhotplug_tests::raw::{encode, RawMonitor};
use qhotplug_tests::storage::{convert_time, write_64k};
use serde_json::json;

const PAIRS: usize = 8;
const MIB: u64 = 512;
const DONE: Duration = Duration::from_secs(600);

fn main() {
    qhotplug_tests::bench_main(run());
}

/// The floor's round: disk `id` (generation 0) backed up in full to a new raw file `target`,
/// checkpoint `c<round>` made (the one before stopped).
fn raw_round(mon: &Path, id: &str, round: usize, target: &Path) -> Duration {
    let mut raw = RawMonitor::connect(mon);
    let start = Instant::now();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(target)
        .unwrap();
    file.set_len(MIB << 20).unwrap();
    let add = AddFd {
        fdset_id: None,
        opaque: Some(names::fdset_tag(id)),
    };
    let info = raw.send_encoded("add-fd", &encode("add-fd", &add), Some(&file));
    drop(file);
    let set = info["fdset-id"].as_i64().unwrap();
    let (file_node, fmt_node) = (names::file_node_at(id, 1), names::format_node_at(id, 1));
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
    let node = names::format_node(id);
    let job = format!("backup-{id}");
    let mut actions = Vec::new();
    if round > 0 {
        actions.push(json!({"type": "block-dirty-bitmap-disable",
            "data": {"node": node, "name": format!("c{}", round - 1)}}));
    }
    actions.push(json!({"type": "block-dirty-bitmap-add",
        "data": {"node": node, "name": format!("c{round}"), "persistent": true}}));
    actions.push(
        json!({"type": "blockdev-backup", "data": {"job-id": job, "device": node,
        "target": fmt_node, "sync": "full", "auto-dismiss": false,
        "x-perf": {"use-copy-range": true}}}),
    );
    raw.send("transaction", &json!({ "actions": actions }), None);
    raw.wait_event("JOB_STATUS_CHANGE", |d| {
        d["id"] == job && d["status"] == "concluded"
    });
    raw.send("job-dismiss", &json!({ "id": job }), None);
    for node in [fmt_node, file_node] {
        raw.send("blockdev-del", &json!({ "node-name": node }), None);
    }
    // The target's fd set once no node opens it: the SDK's sweep at a job's end.
    raw.send("query-fdsets", &json!({}), None);
    raw.send("query-named-block-nodes", &json!({"flat": true}), None);
    raw.send("remove-fd", &json!({ "fdset-id": set }), None);
    start.elapsed()
}

fn rate(took: Duration) -> f64 {
    MIB as f64 / took.as_secs_f64()
}

fn ms(took: Duration) -> f64 {
    took.as_secs_f64() * 1e3
}

/// Copies the 64 KiB blocks at `offsets` of the image file `from` into a new file `to` at the
/// same offsets, by `pread` and `pwrite`, and returns how long it took: as many bytes as the
/// incremental copies, copied alone.
fn copy_blocks(from: &Path, to: &Path, offsets: &[u64]) -> Duration {
    use std::os::unix::fs::FileExt;
    let start = Instant::now();
    let source = std::fs::File::open(from).unwrap();
    let target = std::fs::File::create(to).unwrap();
    let mut block = vec![0u8; 64 << 10];
    for &at in offsets {
        source.read_exact_at(&mut block, at).unwrap();
        target.write_all_at(&block, at).unwrap();
    }
    target.sync_data().unwrap();
    let took = start.elapsed();
    std::fs::remove_file(to).unwrap();
    took
}

async fn run() {
    use tracing_subscriber::layer::SubscriberExt;
    let timings = qhotplug_tests::timing::Timings::new();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(timings.clone()))
        .unwrap();
    let (t, dir, mon) = qhotplug_tests::storage_bench_vm().await;
    let d = dir.path().to_owned();
    let sdk_src = qhotplug_tests::storage::qcow2_data_image(&d, "sdk", MIB as usize, 1);
    let raw_src = qhotplug_tests::storage::qcow2_data_image(&d, "raw", MIB as usize, 2);
    for (id, src) in [("s", &sdk_src), ("r", &raw_src)] {
        let disk = DiskConfig::virtio_blk(id, src).format(Format::Qcow2);
        t.vm.add_disk(disk).await.unwrap();
    }
    println!("full backup of a 512 MiB qcow2 image to raw, with a checkpoint (QEMU, no guest), {PAIRS} pairs");
    // A full backup to raw through the SDK, timed from the call to the job's end.
    let full_backup = |config: BackupConfig| async {
        let start = Instant::now();
        let backup = t.vm.backup(config.format(Format::Raw)).await.unwrap();
        backup.wait(DONE).await.unwrap();
        start.elapsed()
    };
    let (mut sdk, mut floor, mut host, mut no_offload) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..PAIRS {
        let sdk_to = d.join(format!("sdk-full-{round}.raw"));
        let raw_to = d.join(format!("raw-full-{round}.raw"));
        let (mut s, mut f, mut c, mut plain) = (None, None, None, None);
        // The four in an order that rotates from round to round.
        for turn in 0..4 {
            match (round + turn) % 4 {
                0 => {
                    let backup = BackupConfig::full().disk("s", &sdk_to);
                    s = Some(full_backup(backup.checkpoint(format!("c{round}"))).await);
                }
                1 => {
                    let (mon, to) = (mon.clone(), raw_to.clone());
                    let raw = tokio::task::spawn_blocking(move || raw_round(&mon, "r", round, &to));
                    f = Some(raw.await.unwrap());
                }
                2 => c = Some(convert_time(&sdk_src, &d.join("convert.raw"))),
                _ => {
                    // The SDK before its copy offloading: QEMU's own defaults.
                    let to = d.join("plain.raw");
                    let backup = BackupConfig::full().copy_offload(false).disk("s", &to);
                    plain = Some(full_backup(backup).await);
                    std::fs::remove_file(&to).unwrap();
                }
            }
        }
        let (s, f, c, p) = (s.unwrap(), f.unwrap(), c.unwrap(), plain.unwrap());
        println!(
            "round {round}: sdk {:.0} ms ({:.0} MiB/s), floor {:.0} ms ({:.0} MiB/s), qemu-img convert {:.0} ms ({:.0} MiB/s), sdk without offloading {:.0} ms ({:.0} MiB/s)",
            ms(s),
            rate(s),
            ms(f),
            rate(f),
            ms(c),
            rate(c),
            ms(p),
            rate(p)
        );
        sdk.push(s);
        floor.push(f);
        host.push(c);
        no_offload.push(p);
        std::fs::remove_file(&sdk_to).unwrap();
        std::fs::remove_file(&raw_to).unwrap();
    }
    let full = qhotplug_tests::median(sdk.clone());
    println!(
        "copy rate (MiB/s, median): full backup via the SDK {:.0}, floor {:.0}; qemu-img convert {:.0}",
        rate(full),
        rate(qhotplug_tests::median(floor.clone())),
        rate(qhotplug_tests::median(host.clone()))
    );

    // 1 % of the disk changed, then an incremental backup since the last checkpoint.
    let base = d.join("base.qcow2");
    let last = format!("c{}", PAIRS - 1);
    let backup = BackupConfig::full().disk("s", &base).checkpoint("base");
    t.vm.backup(backup).await.unwrap().wait(DONE).await.unwrap();
    let writes = (MIB << 20) / 100 / (64 << 10) + 1;
    // Cluster-aligned, so each write dirties one 64 KiB cluster of the bitmap.
    let stride = (MIB << 20) / writes / (64 << 10) * (64 << 10);
    let offsets: Vec<u64> = (0..writes).map(|i| i * stride).collect();
    for &at in &offsets {
        write_64k(&t.vm, "s", at).await;
    }
    let alone = copy_blocks(&sdk_src, &d.join("blocks.raw"), &offsets);
    let inc = d.join("inc.qcow2");
    timings.take();
    let start = Instant::now();
    let backup = BackupConfig::incremental("base")
        .disk_onto("s", &inc, &base)
        .checkpoint("inc");
    t.vm.backup(backup).await.unwrap().wait(DONE).await.unwrap();
    let incremental = start.elapsed();
    let size = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    println!(
        "incremental after {} KiB changed (1 %): {:.1} ms, target {:.1} MiB on disk; full: {:.0} ms, target {:.1} MiB (checkpoint {last} was the last full's); the same blocks copied alone (pread, pwrite, fdatasync): {:.1} ms",
        writes * 64,
        ms(incremental),
        size(&inc) as f64 / 1048576.0,
        ms(full),
        size(&base) as f64 / 1048576.0,
        ms(alone),
    );
    println!("  where the incremental's time went (spans of 0.2 ms or more):");
    for span in timings.take() {
        if span.elapsed >= Duration::from_micros(200) {
            println!(
                "    {:<8} {:<28} {:>6.1} ms",
                span.kind,
                span.name,
                ms(span.elapsed)
            );
        }
    }
    let ratio = qhotplug_tests::median_ratio(&floor, &sdk);
    let ratio_convert = qhotplug_tests::median_ratio(&host, &sdk);
    let without = qhotplug_tests::median_ratio(&host, &no_offload);
    println!(
        "ratio_wall={ratio:.3} ratio_convert={ratio_convert:.3} ratio_convert_without_offloading={without:.3}"
    );
    t.vm.quit().await.unwrap();
}
