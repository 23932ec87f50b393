//! `cargo bench -p qhotplug-tests --bench resources`
//!
//! Time to hot-add a DIMM and a vCPU until QEMU confirms them (its reply to `device_add`; the VM is
//! paused, so no guest is involved), on one paused QEMU (TCG, `pc`, room for 64 of each), beside
//! the floor: a raw blocking Unix-socket loop on a second monitor of the same QEMU that sends the
//! same commands the SDK sends, one after another:
//!
//! - DIMM (2 MiB): `query-memory-devices` (the slot and `maxmem` check), `object-add`,
//!   `device_add`;
//! - vCPU: `query-hotpluggable-cpus` (the free slot), `device_add`, `query-status` (whether to wait
//!   for the guest's ACPI acknowledgement).
//!
//! Floor and SDK alternate round by round. Prints the medians and, last,
//! `ratio_dimm=… ratio_vcpu=…` (floor time / SDK time, the median of per-round ratios).

use qhotplug::DeviceModel;
use std::time::{Duration, Instant};

use qhotplug::{CpuTopology, MemoryConfig, MemoryDevice, Vcpu, MIB};
use qhotplug_tests::raw::RawMonitor;
use qhotplug_tests::{pc_spec, second_monitor, TestVm};
use serde_json::{json, Value};

const ROUNDS: usize = 30;

fn main() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

/// The floor's vCPU: the lowest free slot of `query-hotpluggable-cpus`' reply, as the SDK picks.
fn free_vcpu(slots: &Value, id: String) -> Vcpu {
    let mut free: Vec<&Value> = slots
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s.get("qom-path").is_none())
        .collect();
    free.sort_by_key(|s| s["props"]["core-id"].as_i64());
    let slot = free[0];
    Vcpu {
        id,
        driver: slot["type"].as_str().unwrap().to_owned(),
        slot: slot["props"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_i64().unwrap()))
            .collect(),
    }
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let mon2 = dir.path().join("mon2.sock");
    let mut spec = pc_spec();
    spec.cpu_topology = Some(CpuTopology::max(2 * ROUNDS as u32 + 1));
    spec.memory_slots = 2 * ROUNDS as u32;
    spec.max_memory_mib = Some(spec.memory_mib + 4 * ROUNDS as u64);
    second_monitor(&mut spec, &mon2);
    let t = TestVm::launch(spec).await;
    let mut raw = tokio::task::spawn_blocking(move || RawMonitor::connect(&mon2))
        .await
        .unwrap();
    // The schema is read once per QEMU build; read it before the first timed call.
    t.vm.client().schema().await.unwrap();

    let (mut dimm_floor, mut dimm_sdk) = (Vec::new(), Vec::new());
    let (mut vcpu_floor, mut vcpu_sdk) = (Vec::new(), Vec::new());
    let mut cpus = 1;
    for i in 0..ROUNDS {
        let dimm = MemoryDevice::dimm(format!("r{i}"), 2 * MIB);
        let (r, took) = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            raw.send("query-memory-devices", &json!({}), None);
            raw.send("object-add", &dimm.backend.object_add(), None);
            raw.send("device_add", &dimm.device_add(), None);
            let took = start.elapsed();
            (raw, took)
        })
        .await
        .unwrap();
        raw = r;
        dimm_floor.push(took);
        let start = Instant::now();
        t.vm.add_memory(MemoryConfig::dimm(format!("s{i}"), 2 * MIB))
            .await
            .unwrap();
        dimm_sdk.push(start.elapsed());

        let (r, took) = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let slots = raw.send("query-hotpluggable-cpus", &json!({}), None);
            let cpu = free_vcpu(&slots, format!("rcpu{i}"));
            raw.send("device_add", &cpu.device_add(), None);
            raw.send("query-status", &json!({}), None);
            let took = start.elapsed();
            (raw, took)
        })
        .await
        .unwrap();
        raw = r;
        vcpu_floor.push(took);
        cpus += 1;
        let start = Instant::now();
        let change = t.vm.set_vcpus(cpus + 1).await.unwrap();
        vcpu_sdk.push(start.elapsed());
        assert_eq!(change.added.len(), 1);
        cpus += 1;
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("hot-add until QEMU confirms (median of {ROUNDS} rounds, µs):");
    println!("  {:<8} {:>10} {:>10}", "", "floor", "sdk");
    println!(
        "  {:<8} {:>10.0} {:>10.0}",
        "DIMM",
        us(qhotplug_tests::median(dimm_floor.clone())),
        us(qhotplug_tests::median(dimm_sdk.clone()))
    );
    println!(
        "  {:<8} {:>10.0} {:>10.0}",
        "vCPU",
        us(qhotplug_tests::median(vcpu_floor.clone())),
        us(qhotplug_tests::median(vcpu_sdk.clone()))
    );
    println!(
        "ratio_dimm={:.3} ratio_vcpu={:.3}",
        qhotplug_tests::median_ratio(&dimm_floor, &dimm_sdk),
        qhotplug_tests::median_ratio(&vcpu_floor, &vcpu_sdk)
    );
}
