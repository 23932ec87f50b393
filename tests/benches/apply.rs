//! `cargo bench -p qhotplug-tests --bench apply`
//!
//! One diff made three ways, side by side in one run, each round on a fresh paused QEMU (TCG,
//! `pc`, a virtio-scsi controller, an empty `scsi-cd`, room for a second vCPU): 8 `scsi-hd`
//! disks, 2 `virtio-net-pci` NICs (one-queue taps, no vhost), a medium put in the CD-ROM, and the
//! vCPUs from 1 to 2.
//!
//! - `calls`: the same public calls one at a time;
//! - `join_all`: the same calls all at once;
//! - `apply`: `vm.apply(desired)`, planning included (the spec read, the plan made), at its
//!   default concurrency.
//!
//! The rounds alternate the three. Prints each one's median and, last,
//! `ratio_apply=…` (the faster of `calls` and `join_all`, over `apply`: the median of the
//! per-round ratios).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::join_all;
use qhotplug::{
    Cdrom, CpuTopology, Desired, Disk, DiskConfig, DiskFrontend, MacAddr, MediumOptions, Nic,
    NicConfig, Outcome, Pci, ScsiAddr, Vm, VmSpec,
};
use qhotplug_netdev::TapBuilder;
use qhotplug_tests::{image, iso, pc_spec, TestVm};

const ROUNDS: usize = 15;
const DISKS: usize = 8;
const NICS: usize = 2;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The VM each round starts from: paused, an empty CD-ROM, one vCPU of up to two.
fn base_spec() -> VmSpec {
    let mut spec = pc_spec();
    spec.cpu_topology = Some(CpuTopology::max(2));
    spec.cdroms.push(Cdrom::scsi(
        "cd0",
        ScsiAddr {
            bus: "scsi0.0".into(),
            channel: 0,
            scsi_id: 100,
            lun: 0,
        },
    ));
    spec
}

fn tap() -> qhotplug::Tap {
    TapBuilder::new("qhap%d").create().expect("tap")
}

fn mac(i: usize) -> MacAddr {
    format!("52:54:00:ab:00:{i:02x}").parse().unwrap()
}

/// The diff as the public calls.
async fn calls(vm: &Vm, images: &[PathBuf], medium: &Path, at_once: bool) {
    let disks = images.iter().enumerate().map(|(i, img)| {
        let vm = vm.clone();
        let config = DiskConfig::scsi_hd(format!("d{i}"), img);
        Box::pin(async move { vm.add_disk(config).await.map(drop) })
            as std::pin::Pin<Box<dyn std::future::Future<Output = qhotplug::Result<()>> + Send>>
    });
    let nics = (0..NICS).map(|i| {
        let vm = vm.clone();
        let config = NicConfig::new(format!("n{i}"), tap())
            .mac(mac(i))
            .no_vhost();
        Box::pin(async move { vm.add_nic(config).await.map(drop) }) as _
    });
    let medium = {
        let (vm, medium) = (vm.clone(), medium.to_owned());
        Box::pin(async move {
            vm.change_medium("cd0", Some(medium.into()), MediumOptions::default())
                .await
        }) as _
    };
    let vcpus = {
        let vm = vm.clone();
        Box::pin(async move { vm.set_vcpus(2).await.map(drop) }) as _
    };
    let all: Vec<_> = disks.chain(nics).chain([medium, vcpus]).collect();
    if at_once {
        for r in join_all(all).await {
            r.unwrap();
        }
    } else {
        for call in all {
            call.await.unwrap();
        }
    }
}

/// The diff as a desired spec.
fn desired(vm: &Vm, images: &[PathBuf], medium: &Path) -> Desired {
    let mut spec = vm.spec();
    for (i, img) in images.iter().enumerate() {
        spec.disks.push(Disk::new(
            format!("d{i}"),
            img,
            DiskFrontend::ScsiHd(ScsiAddr::auto()),
        ));
    }
    for i in 0..NICS {
        spec.nics.push(Nic {
            id: format!("n{i}"),
            mac: mac(i),
            queues: 1,
            pci: Pci::auto(),
            vhost: false,
            link_up: true,
        });
    }
    spec.cdroms[0].medium = Some(medium.to_owned().into());
    spec.smp = 2;
    let mut desired = Desired::new(spec);
    for i in 0..NICS {
        desired = desired.nic_tap(format!("n{i}"), tap());
    }
    desired
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move { tokio::spawn(run()).await.unwrap() });
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<PathBuf> = (0..DISKS)
        .map(|i| image(dir.path(), &format!("d{i}.raw"), 1))
        .collect();
    let medium = iso(dir.path(), "m.iso", "hello", "hello");
    let (mut seq, mut joined, mut applied, mut ratios) = (vec![], vec![], vec![], vec![]);
    let mut version = String::new();
    for round in 0..=ROUNDS {
        let mut times = [Duration::ZERO; 3];
        // The order turns each round, so no way always goes first on a warm machine.
        for k in 0..3 {
            let way = (k + round) % 3;
            let t = TestVm::launch(base_spec()).await;
            let vm = t.vm.clone();
            version = vm.client().greeting().version.qemu.to_string();
            // Each way's first calls read QEMU's schema: read it before the clock starts.
            vm.check_scsi_hotplug().await.unwrap();
            vm.check_nic_hotplug().await.unwrap();
            let start = Instant::now();
            match way {
                0 => calls(&vm, &images, &medium, false).await,
                1 => calls(&vm, &images, &medium, true).await,
                _ => {
                    let desired = desired(&vm, &images, &medium);
                    let start = Instant::now();
                    let done = vm.apply(desired).await.unwrap();
                    times[way] = start.elapsed();
                    for (step, outcome) in &done.steps {
                        assert!(
                            matches!(outcome, Outcome::Done),
                            "{}: {outcome:?}",
                            step.change
                        );
                    }
                    assert_eq!(done.steps.len(), DISKS + NICS + 2);
                }
            }
            if way != 2 {
                times[way] = start.elapsed();
            }
            drop(vm);
            drop(t);
        }
        // The first round warms the machine up (page cache, tap module): not counted.
        if round == 0 {
            continue;
        }
        seq.push(times[0]);
        joined.push(times[1]);
        applied.push(times[2]);
        ratios.push(times[0].min(times[1]).as_secs_f64() / times[2].as_secs_f64());
        println!(
            "  round {round:>2}: calls {:>6.1}  join_all {:>6.1}  apply {:>6.1} ms",
            ms(times[0]),
            ms(times[1]),
            ms(times[2])
        );
    }
    println!(
        "QEMU {version}, paused, TCG: {DISKS} scsi-hd disks, {NICS} NICs, a CD-ROM medium, vCPUs 1 → 2"
    );
    println!("  median of {ROUNDS} rounds (ms):");
    println!("  {:<10} {:>8.1}", "calls", ms(qhotplug_tests::median(seq)));
    println!(
        "  {:<10} {:>8.1}",
        "join_all",
        ms(qhotplug_tests::median(joined))
    );
    println!(
        "  {:<10} {:>8.1}",
        "apply",
        ms(qhotplug_tests::median(applied))
    );
    ratios.sort_by(f64::total_cmp);
    println!("ratio_apply={:.3}", ratios[ratios.len() / 2]);
}
