//! Soak: 1000 hot-add/hot-remove cycles of scsi-hd disks (which unplug without a guest) on a
//! running VM with no guest OS, ten at a time. Our process's memory and fd count must be flat
//! from cycle 100 to cycle 1000.
//!
//! Running, not paused: QEMU before 9.1 closes a removed fd set only while the VM runs, and lists
//! it in `query-fdsets` until then, so on a paused 7.2 every cycle would leave one behind in
//! QEMU and make the `query-fdsets` of each removal (how the SDK finds a disk's sets) longer.

use futures::future::join_all;
use qhotplug::{DiskConfig, Vm};
use qhotplug_tests::{open_fd_count, pc_spec, raise_fd_limit, TestVm};

const WORKERS: usize = 10;
const SETTLED: usize = 100;
const CYCLES: usize = 1000;

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 4
}

/// `cycles` add/remove cycles spread over the workers (each on its own id and image: QEMU locks
/// an image it writes).
async fn run(vm: &Vm, images: &[std::path::PathBuf], cycles: usize) -> qhotplug::Result<()> {
    let workers = images.iter().enumerate().map(|(w, path)| {
        let (vm, path) = (vm.clone(), path.clone());
        async move {
            let id = format!("soak{w}");
            for _ in 0..cycles / WORKERS {
                vm.add_disk(DiskConfig::scsi_hd(&id, &path)).await?;
                vm.remove_disk(&id).await?;
            }
            Ok::<_, qhotplug::Error>(())
        }
    });
    for result in join_all(workers).await {
        result?;
    }
    Ok(())
}

#[test]
fn a_thousand_scsi_cycles_keep_our_memory_and_fds_flat() {
    qhotplug_tests::serial_test(async {
        raise_fd_limit().unwrap();
        let t = TestVm::running(pc_spec()).await;
        let images: Vec<_> = (0..WORKERS)
            .map(|w| t.image(&format!("soak{w}.raw"), 1))
            .collect();

        let fail = |e: qhotplug::Error| panic!("{e}\nQEMU said: {}", t.qemu_stderr());
        run(&t.vm, &images, SETTLED).await.unwrap_or_else(fail);
        let (fds_at, rss_at) = (open_fd_count(), rss_kib());
        run(&t.vm, &images, CYCLES - SETTLED)
            .await
            .unwrap_or_else(fail);
        let (fds_end, rss_end) = (open_fd_count(), rss_kib());
        println!(
        "cycle {SETTLED}: {fds_at} fds, {rss_at} KiB resident; cycle {CYCLES}: {fds_end} fds, {rss_end} KiB resident"
    );
        assert_eq!(
            fds_end, fds_at,
            "our fd count from cycle {SETTLED} to {CYCLES}"
        );
        // Flat: allocator noise, not growth per cycle (900 cycles × even 1 KiB would be 900 KiB).
        assert!(
            rss_end <= rss_at + 256,
            "resident set grew {} KiB over {} cycles",
            rss_end - rss_at,
            CYCLES - SETTLED
        );
        assert!(t.vm.disks().is_empty());
    });
}
