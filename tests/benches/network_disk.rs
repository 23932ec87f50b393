//! `cargo bench -p qhotplug-tests --bench network_disk`
//!
//! What a disk on the network costs, on QEMU (TCG, `pc`):
//! - **hot-add** of an NBD disk (`scsi-hd` on a `qemu-nbd` export over a Unix socket; it unplugs
//!   at once without a guest, so rounds repeat), the SDK (`Vm::add_disk`) beside the floor: a raw
//!   blocking monitor on the same QEMU sending the same commands (`blockdev-add` ×2, with QEMU's
//!   NBD handshake in the first, `device_add`); rounds alternate, then `remove_disk` on each
//!   side. Prints the medians and `ratio_hotadd=…` (floor time / SDK time, median of pairs);
//! - **sequential read in a booted guest**: 64 MiB read with `dd iflag=direct bs=1M` from a
//!   virtio-blk disk on a file as an NBD export (Unix socket, and TCP on loopback) and as a
//!   local image the SDK hands over as an fd (three files of the same data), each read three
//!   times, alternating; the guest's page cache is bypassed, the host's is warm for all (each
//!   file is read once first).

use std::time::{Duration, Instant};

use qhotplug::{DiskConfig, DiskModel};
use qhotplug_tests::raw::{scsi_disk, RawMonitor};
use qhotplug_tests::servers::{free_port, Listen, NbdExport};
use qhotplug_tests::{image, pc_spec, Guest, TestVm};

const ROUNDS: usize = 30;
const READ_MIB: u64 = 64;
const READS: usize = 3;

fn main() {
    qhotplug_tests::bench_main(async {
        hot_add().await;
        guest_read().await;
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn hot_add() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = pc_spec();
    let floor_path = dir.path().join("floor.sock");
    qhotplug_tests::second_monitor(&mut spec, &floor_path);
    let t = TestVm::launch(spec).await;
    let file = image(dir.path(), "export.raw", 8);
    let server = NbdExport::start(&file, "bench", Listen::Unix(dir.path().join("nbd.sock")));
    let mut raw = RawMonitor::connect(&floor_path);
    println!(
        "NBD hot-add (scsi-hd, Unix socket), QEMU {}, paused, {ROUNDS} pairs",
        t.vm.client().greeting().version.qemu
    );
    let raw_disk = |i: usize| {
        let local = scsi_disk(&format!("r{i}"), &file, 100);
        qhotplug::Disk::on_network(local.id.clone(), server.source(), local.frontend.clone())
    };
    // Warm up both (the SDK reads QEMU's schema once).
    let warm = raw_disk(999);
    raw.add_network_disk(&warm);
    raw.remove_disk(&warm);
    let sdk = |i: usize| DiskConfig::network(format!("s{i}"), server.source(), DiskModel::ScsiHd);
    t.vm.add_disk(sdk(999)).await.unwrap();
    t.vm.remove_disk("s999").await.unwrap();

    let (mut floor, mut ours) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        let disk = raw_disk(i);
        let floor_round = |raw: &mut RawMonitor| {
            let start = Instant::now();
            raw.add_network_disk(&disk);
            start.elapsed()
        };
        let (f, s) = if i % 2 == 0 {
            let f = floor_round(&mut raw);
            let start = Instant::now();
            t.vm.add_disk(sdk(i)).await.unwrap();
            (f, start.elapsed())
        } else {
            let start = Instant::now();
            t.vm.add_disk(sdk(i)).await.unwrap();
            let s = start.elapsed();
            (floor_round(&mut raw), s)
        };
        floor.push(f);
        ours.push(s);
        raw.remove_disk(&disk);
        t.vm.remove_disk(&format!("s{i}")).await.unwrap();
    }
    println!(
        "median: sdk {:.3} ms, floor {:.3} ms",
        ms(qhotplug_tests::median(ours.clone())),
        ms(qhotplug_tests::median(floor.clone()))
    );
    println!(
        "ratio_hotadd={:.3}",
        qhotplug_tests::median_ratio(&floor, &ours)
    );
}

/// MiB/s of `dd` reading [`READ_MIB`] from `/dev/<dev>` in the guest, its cache bypassed.
async fn read_rate(g: &Guest, dev: &str) -> f64 {
    let read = format!(
        "dd if=/dev/{dev} of=/dev/null bs=1M count={READ_MIB} iflag=direct 2>/dev/null; echo ok"
    );
    let start = Instant::now();
    assert_eq!(g.console.run(&read, Duration::from_secs(300)).await, ["ok"]);
    READ_MIB as f64 / start.elapsed().as_secs_f64()
}

async fn guest_read() {
    let g = Guest::boot(pc_spec(), |l| l).await;
    let dir = g.dir().to_owned();
    // One file each (an image QEMU writes is locked), the same data, all in the host's cache.
    let file = |name: &str| {
        let path = qhotplug_tests::storage::data_image(&dir, name, READ_MIB as usize, 7);
        let _ = std::fs::read(&path).unwrap();
        path
    };
    let unix = NbdExport::start(&file("u.raw"), "u", Listen::Unix(dir.join("u.sock")));
    let tcp = NbdExport::start(&file("t.raw"), "t", Listen::Tcp(free_port()));
    let mut devs = Vec::new();
    for config in [
        DiskConfig::virtio_blk("local", file("local.raw")).read_only(true),
        DiskConfig::network("nbd-unix", unix.source(), DiskModel::VirtioBlk).read_only(true),
        DiskConfig::network("nbd-tcp", tcp.source(), DiskModel::VirtioBlk).read_only(true),
    ] {
        let mark = g.console.mark();
        g.vm.add_disk(config).await.unwrap();
        devs.push(g.console.added(mark, "block").await);
    }
    let names = ["local image (fd)", "NBD, Unix socket", "NBD, TCP loopback"];
    let mut rates = vec![Vec::new(); devs.len()];
    for _ in 0..READS {
        for (i, dev) in devs.iter().enumerate() {
            rates[i].push(read_rate(&g, dev).await);
        }
    }
    println!(
        "sequential read in the guest ({READ_MIB} MiB, dd bs=1M iflag=direct, {READS} each, TCG):"
    );
    for (name, r) in names.iter().zip(&rates) {
        let mut sorted = r.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "  {name}: median {:.0} MiB/s ({:?})",
            sorted[READS / 2],
            r.iter().map(|x| x.round()).collect::<Vec<_>>()
        );
    }
}
