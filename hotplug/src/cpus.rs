//! Setting a VM's vCPU count: free slots from `query-hotpluggable-cpus`, a `device_add` (or a
//! `device_del`) per vCPU on the engine, and what the guest confirmed (ACPI `_OST`).
//!
//! The guest onlines a new vCPU itself (`echo 1 > /sys/devices/system/cpu/cpuN/online`, or a udev
//! rule): the SDK cannot, so it does not try. It reports which new vCPUs the guest's ACPI code
//! acknowledged (`ACPI_DEVICE_OST`, insertion, status 0).

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use qhotplug_cmdline::{names, Vcpu};
use qhotplug_qmp::command::{HotpluggableCpu, QueryHotpluggableCpus, QueryKvm, QueryStatus};
use qhotplug_qmp::message::VersionTriple;
use qhotplug_qmp::{EventKind, EventStream};
use tokio::time::Instant;
use tracing::Instrument;

use crate::engine;
use crate::error::{Error, Result};
use crate::kinds::{DeviceKind, Plug};
use crate::qemu::unplug::UnplugPolicy;
use crate::vm_core::Core;

/// ACPI `_OST` source for a device insertion.
const OST_INSERTION: i64 = 1;

/// What [`Vm::set_vcpus`](crate::Vm::set_vcpus) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuChange {
    /// The vCPUs hot-added, by id.
    pub added: Vec<String>,
    /// The vCPUs hot-removed (the guest let them go), by id.
    pub removed: Vec<String>,
    /// Of `added`, those the guest had not acknowledged (ACPI `_OST`) by the handle's unplug
    /// deadline: QEMU has them, the guest may not have noticed yet. Empty on a VM that is not
    /// running (nothing is waited for).
    pub unconfirmed: Vec<String>,
    /// What the guest agent did with the new vCPUs
    /// ([`Vm::set_vcpus_online`](crate::Vm::set_vcpus_online)); `None` from
    /// [`Vm::set_vcpus`](crate::Vm::set_vcpus), and when nothing was added.
    pub guest: Option<crate::onlining::Onlined>,
}

/// See [`Vm::vcpu_slots`](crate::Vm::vcpu_slots).
pub(crate) async fn vcpu_slots(core: &Core) -> Result<Vec<HotpluggableCpu>> {
    let mut slots = core.client.execute(&QueryHotpluggableCpus).await?;
    slots.sort_by_key(slot_order);
    Ok(slots)
}

/// See [`Vm::set_vcpus`](crate::Vm::set_vcpus); `policy`: how long to wait for the guest.
pub(crate) async fn set_vcpus(
    core: &Arc<Core>,
    count: u32,
    policy: &UnplugPolicy,
) -> Result<VcpuChange> {
    core.require(Vcpu::OPERATION, Vcpu::COMMANDS).await?;
    let slots = vcpu_slots(core).await?;
    let ours: Vec<String> = core
        .state()
        .spec()
        .vcpus
        .iter()
        .map(|c| c.id.clone())
        .collect();
    let plugged = slots.iter().filter(|s| s.qom_path.is_some()).count() as u32;
    // The vCPUs the SDK did not add (those from `-smp`) cannot go. A spec listing more vCPUs than
    // QEMU has (attached with a stale spec) must not underflow.
    let min = plugged.saturating_sub(ours.len() as u32);
    let max = slots.len() as u32;
    if count < min.max(1) || count > max {
        return Err(Error::InvalidVcpuCount {
            requested: count,
            min: min.max(1),
            max,
        });
    }
    tcg_guard(core, plugged, count, max).await?;
    let mut change = VcpuChange::default();
    if count > plugged {
        let mut events = core.client.events();
        let free = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.qom_path.is_none())
            .take((count - plugged) as usize);
        for (index, slot) in free {
            let added = engine::add(core, vcpu_in(&names::vcpu(index), slot)).await?;
            change.added.push(added.id);
        }
        let running = core.client.execute(&QueryStatus).await?.running;
        if running {
            let deadline = Instant::now() + policy.deadline;
            let wait = tracing::debug_span!(crate::spans::STEP, name = "wait ACPI_DEVICE_OST");
            let confirmed = acknowledged(&mut events, &change.added, deadline)
                .instrument(wait)
                .await;
            change.unconfirmed = change
                .added
                .iter()
                .filter(|id| !confirmed.contains(*id))
                .cloned()
                .collect();
        }
    }
    // Highest first, only what the SDK added (QEMU cannot remove `-smp` vCPUs).
    for id in ours
        .iter()
        .rev()
        .take(plugged.saturating_sub(count) as usize)
    {
        engine::remove(core, id, DeviceKind::Vcpu, policy).await?;
        change.removed.push(id.clone());
    }
    tracing::info!(?change, "vCPUs set");
    Ok(change)
}

/// The first QEMU release tested to hot-unplug vCPUs under TCG without corrupting its heap.
const TCG_SAFE_UNPLUG: VersionTriple = VersionTriple {
    major: 10,
    minor: 0,
    micro: 0,
};

/// Refuses, under TCG, what would walk QEMU into a crash: a hot-unplug on a QEMU that
/// corrupts its heap on one, and a hot-add past the `maxcpus` vCPU threads a VM may start in
/// its life. A hot-add's thread is counted before it is sent.
async fn tcg_guard(core: &Core, plugged: u32, count: u32, max: u32) -> Result<()> {
    if count == plugged {
        return Ok(());
    }
    // The accelerator is the VM's for life: asked once.
    let tcg = core.state().tcg;
    let tcg = match tcg {
        Some(tcg) => tcg,
        None => {
            let tcg = !core.client.execute(&QueryKvm).await?.enabled;
            core.state().tcg = Some(tcg);
            tcg
        }
    };
    if !tcg {
        return Ok(());
    }
    let version = core.client.greeting().version.qemu;
    if count < plugged && version < TCG_SAFE_UNPLUG {
        return Err(Error::TcgVcpuUnplug { version });
    }
    let mut state = core.state();
    // Known from the first call on: nothing before it plugged or unplugged a vCPU.
    let started = state.vcpus_started.get_or_insert(plugged);
    let wanted = count.saturating_sub(plugged);
    if *started + wanted > max {
        return Err(Error::TcgVcpuContexts {
            started: *started,
            wanted,
            max,
        });
    }
    *started += wanted;
    Ok(())
}

/// vCPU `id` in `slot`, its address the slot's properties as QEMU lists them.
pub(crate) fn vcpu_in(id: &str, slot: &HotpluggableCpu) -> Vcpu {
    Vcpu {
        id: id.to_owned(),
        driver: slot.kind.clone(),
        slot: slot
            .props
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_i64()?)))
            .collect(),
    }
}

/// A slot's place in the topology: socket, die, module, core, thread.
fn slot_order(slot: &HotpluggableCpu) -> Vec<i64> {
    [
        "socket-id",
        "die-id",
        "cluster-id",
        "module-id",
        "core-id",
        "thread-id",
    ]
    .iter()
    .map(|k| slot.props.get(*k).and_then(|v| v.as_i64()).unwrap_or(0))
    .collect()
}

/// Waits until `deadline` for the guest's ACPI acknowledgement of each of `ids`; returns those
/// acknowledged.
async fn acknowledged(
    events: &mut EventStream,
    ids: &[String],
    deadline: Instant,
) -> HashSet<String> {
    let mut seen = HashSet::new();
    let wait = async {
        while seen.len() < ids.len() {
            let Some(item) = events.next().await else {
                return;
            };
            let Ok(event) = item else { continue };
            if let EventKind::AcpiDeviceOst(ost) = event.kind() {
                let info = &ost.info;
                if info.source == OST_INSERTION && info.status == 0 {
                    if let Some(id) = info.device.as_ref().filter(|d| ids.contains(d)) {
                        seen.insert(id.clone());
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout_at(deadline, wait).await;
    seen
}
