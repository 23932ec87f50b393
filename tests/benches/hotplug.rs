//! `cargo bench -p qhotplug-tests --bench hotplug`
//!
//! Hot-add latency per step, and 64 disks hot-added at once, on one paused QEMU (TCG, `pc`, a
//! virtio-scsi controller), beside the floor: a raw blocking Unix-socket loop on a second monitor of
//! the same QEMU that sends the same commands one after another (with the fd in the same `sendmsg`)
//! and waits for each reply. The SDK's per-step times come from its own `step` tracing spans.
//!
//! - disk: `scsi-hd` (it unplugs at once without a guest, so rounds can repeat): add-fd,
//!   blockdev-add ×2, remove-fd, device_add;
//! - NIC: `virtio-net-pci` on a one-queue tap: getfd, netdev_add, device_add (PCI devices never
//!   unplug without a guest, so the NIC rounds are limited by free slots);
//! - 64 `scsi-hd` disks: the SDK's 64 concurrent `add_disk` calls against the raw loop's 64
//!   sequences back to back.
//!
//! Prints the tables and, last, `ratio_disk=… ratio_nic=… ratio_64=…` (floor time / SDK time).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::future::join_all;
use qhotplug::{DiskConfig, NicConfig, Vm};
use qhotplug_netdev::TapBuilder;
use qhotplug_tests::raw::{scsi_disk, RawMonitor};
use qhotplug_tests::timing::Timings;
use qhotplug_tests::{image, pc_spec, TestVm};
use tracing_subscriber::layer::SubscriberExt;

const DISK_ROUNDS: usize = 30;
const NIC_ROUNDS: usize = 10;
const BULK: usize = 64;
const BULK_ROUNDS: usize = 3;

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Per-step medians over rounds: `rounds[i]` is one round's `(step, time)` list, in order.
fn step_medians(rounds: &[Vec<(&'static str, Duration)>]) -> Vec<(&'static str, Duration)> {
    (0..rounds[0].len())
        .map(|i| {
            (
                rounds[0][i].0,
                qhotplug_tests::median(rounds.iter().map(|r| r[i].1).collect()),
            )
        })
        .collect()
}

fn print_steps(
    title: &str,
    raw: &[Vec<(&'static str, Duration)>],
    sdk: &[Vec<(&'static str, Duration)>],
    sdk_total: &[Duration],
) -> f64 {
    let (raw_m, sdk_m) = (step_medians(raw), step_medians(sdk));
    println!("{title} (median of {} rounds, µs):", raw.len());
    println!("  {:<14} {:>10} {:>10}", "step", "floor", "sdk");
    for ((name, r), (sname, s)) in raw_m.iter().zip(&sdk_m) {
        assert_eq!(name, sname);
        println!("  {name:<14} {:>10.0} {:>10.0}", us(*r), us(*s));
    }
    let raw_totals: Vec<Duration> = raw.iter().map(|r| r.iter().map(|s| s.1).sum()).collect();
    let ratios: Vec<f64> = raw_totals
        .iter()
        .zip(sdk_total)
        .map(|(r, s)| r.as_secs_f64() / s.as_secs_f64())
        .collect();
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "  {:<14} {:>10.0} {:>10.0}   (sdk: the whole call, from the caller)",
        "total",
        us(qhotplug_tests::median(raw_totals)),
        us(qhotplug_tests::median(sdk_total.to_vec()))
    );
    sorted[sorted.len() / 2]
}

fn sdk_steps(timings: &Timings) -> Vec<(&'static str, Duration)> {
    timings
        .take()
        .into_iter()
        .filter(|t| t.kind == "step")
        .map(|t| {
            let name: &'static str = match t.name.as_str() {
                "add-fd" => "add-fd",
                "blockdev-add" => "blockdev-add",
                "remove-fd" => "remove-fd",
                "device_add" => "device_add",
                "getfd" => "getfd",
                "netdev_add" => "netdev_add",
                other => panic!("unexpected step {other}"),
            };
            (name, t.elapsed)
        })
        .collect()
}

fn main() {
    let timings = Timings::new();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(timings.clone()))
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move { tokio::spawn(run(timings)).await.unwrap() });
}

async fn run(timings: Timings) {
    // The test spec with a second monitor for the floor.
    let dir = tempfile::tempdir().unwrap();
    let mut spec = pc_spec();
    let floor_path = dir.path().join("floor.sock");
    spec.extra_args = vec![
        "-chardev".into(),
        format!(
            "socket,id=floor,path={},server=on,wait=off",
            floor_path.display()
        ),
        "-mon".into(),
        "chardev=floor,mode=control".into(),
    ];
    let t = TestVm::launch(spec).await;
    let vm: Vm = t.vm.clone();
    let mut raw = RawMonitor::connect(&floor_path);
    let img = image(dir.path(), "disk.raw", 1);
    println!("QEMU {}, paused, TCG", vm.client().greeting().version.qemu);

    // Warm up both (the SDK asks query-commands once).
    vm.add_disk(DiskConfig::scsi_hd("warm", &img))
        .await
        .unwrap();
    vm.remove_disk("warm").await.unwrap();
    raw.add_disk(&scsi_disk("rwarm", &img, 200));
    raw.remove_disk(&scsi_disk("rwarm", &img, 200));
    timings.take();

    // Disk latency, alternating floor and SDK.
    let (mut raw_rounds, mut sdk_rounds, mut sdk_total) = (vec![], vec![], vec![]);
    for i in 0..DISK_ROUNDS {
        raw_rounds.push(raw.add_disk(&scsi_disk(&format!("r{i}"), &img, 100)));
        raw.remove_disk(&scsi_disk(&format!("r{i}"), &img, 100));
        let start = Instant::now();
        vm.add_disk(DiskConfig::scsi_hd(format!("s{i}"), &img))
            .await
            .unwrap();
        sdk_total.push(start.elapsed());
        sdk_rounds.push(sdk_steps(&timings));
        vm.remove_disk(&format!("s{i}")).await.unwrap();
        timings.take();
    }
    let ratio_disk = print_steps("scsi-hd hot-add", &raw_rounds, &sdk_rounds, &sdk_total);

    // NIC latency: each round takes a PCI slot for good (no guest to release it).
    let (mut raw_rounds, mut sdk_rounds, mut sdk_total) = (vec![], vec![], vec![]);
    for i in 0..NIC_ROUNDS {
        raw_rounds.push(raw.add_nic(&format!("rn{i}"), 0x1f - i as u8));
        let tap = TapBuilder::new("qhb%d").create().unwrap();
        let start = Instant::now();
        vm.add_nic(NicConfig::new(format!("sn{i}"), tap).no_vhost())
            .await
            .unwrap();
        sdk_total.push(start.elapsed());
        sdk_rounds.push(sdk_steps(&timings));
    }
    let ratio_nic = print_steps(
        "virtio-net-pci hot-add",
        &raw_rounds,
        &sdk_rounds,
        &sdk_total,
    );

    // 64 disks at once.
    let images: Vec<PathBuf> = (0..BULK)
        .map(|i| image(dir.path(), &format!("bulk{i}.raw"), 1))
        .collect();
    let (mut floor_times, mut sdk_times) = (vec![], vec![]);
    for round in 0..BULK_ROUNDS {
        let start = Instant::now();
        for (i, img) in images.iter().enumerate() {
            raw.add_disk(&scsi_disk(&format!("rb{round}x{i}"), img, i as u16));
        }
        floor_times.push(start.elapsed());
        for (i, img) in images.iter().enumerate() {
            raw.remove_disk(&scsi_disk(&format!("rb{round}x{i}"), img, i as u16));
        }
        let start = Instant::now();
        let adds = images.iter().enumerate().map(|(i, img)| {
            let vm = vm.clone();
            let cfg = DiskConfig::scsi_hd(format!("sb{round}x{i}"), img);
            async move { vm.add_disk(cfg).await }
        });
        for r in join_all(adds).await {
            r.unwrap();
        }
        sdk_times.push(start.elapsed());
        let removes = (0..BULK).map(|i| {
            let vm = vm.clone();
            async move { vm.remove_disk(&format!("sb{round}x{i}")).await }
        });
        for r in join_all(removes).await {
            r.unwrap();
        }
        timings.take();
    }
    let ratio_64 = qhotplug_tests::median_ratio(&floor_times, &sdk_times);
    println!(
        "{BULK} scsi-hd disks (median of {BULK_ROUNDS} rounds): floor one after another {:.1} ms, sdk {BULK} concurrent add_disk {:.1} ms",
        qhotplug_tests::median(floor_times).as_secs_f64() * 1e3,
        qhotplug_tests::median(sdk_times).as_secs_f64() * 1e3
    );
    println!("ratio_disk={ratio_disk:.3} ratio_nic={ratio_nic:.3} ratio_64={ratio_64:.3}");
}
