//! Memory: DIMMs and virtio-mem devices hot-added and removed on the engine, a virtio-mem device
//! resized, and the balloon driven.
//!
//! Before a memory device is sent, `query-memory-devices` says whether it fits: a DIMM needs a
//! free memory slot, and every device takes its whole backend's size of `maxmem` (boot memory
//! included). A virtio-mem resize sets `requested-size` and follows `MEMORY_DEVICE_SIZE_CHANGE`
//! until the guest has plugged what was asked, or the deadline; what the guest actually plugged
//! is what the call returns.

use std::sync::Arc;

use qhotplug_cmdline::{MemoryDevice, MemoryDeviceKind, MIB};
use qhotplug_qmp::command::{self, MemoryDeviceInfo, QomSet, QueryMemoryDevices};
use qhotplug_qmp::EventKind;
use tokio::time::Instant;
use tracing::Instrument;

use crate::engine::holds;
use crate::error::{Error, Result};
use crate::kinds::{Device, DeviceKind, Plug};
use crate::vm_core::Core;
use crate::MemoryConfig;

/// See [`Vm::resize_virtio_mem`](crate::Vm::resize_virtio_mem); `deadline`: how long to wait for
/// the guest.
pub(crate) async fn resize_vmem(
    core: &Arc<Core>,
    id: &str,
    requested: u64,
    deadline: std::time::Duration,
) -> Result<u64> {
    core.require("virtio-mem resize", &["qom-set", "query-memory-devices"])
        .await?;
    let (_busy, device) = holds::busy_device(core, id, DeviceKind::Memory)?;
    let Device::Memory(
        mut device @ MemoryDevice {
            kind: MemoryDeviceKind::VirtioMem { .. },
            ..
        },
    ) = device
    else {
        return Err(Error::NotFound {
            kind: DeviceKind::Memory,
            id: id.to_owned(),
        });
    };
    let info = virtio_mem(core, id).await?;
    if requested > info.max_size || !requested.is_multiple_of(info.block_size) {
        return Err(Error::InvalidSize {
            id: id.to_owned(),
            size: requested,
        });
    }
    let mut events = core.client.events();
    let set = QomSet {
        path: qhotplug_cmdline::names::peripheral_path(id),
        property: "requested-size".into(),
        value: requested.into(),
    };
    let step = tracing::debug_span!(crate::spans::STEP, name = "qom-set", id);
    core.client.execute(&set).instrument(step).await?;
    if let MemoryDeviceKind::VirtioMem { requested: r, .. } = &mut device.kind {
        *r = requested;
    }
    core.state().update(device.into());
    if info.size != requested {
        let deadline = Instant::now() + deadline;
        let wait = tracing::debug_span!(
            crate::spans::STEP,
            name = "wait MEMORY_DEVICE_SIZE_CHANGE",
            id
        );
        // Whether or not the event comes, QEMU's `query-memory-devices` says what is plugged.
        let reached = |e: &EventKind| {
            matches!(e, EventKind::MemoryDeviceSizeChange(c)
                if c.id.as_deref() == Some(id) && c.size == requested)
        };
        events.wait_for(deadline, reached).instrument(wait).await;
    }
    let plugged = virtio_mem(core, id).await?.size;
    tracing::info!(requested, plugged, "virtio-mem resized");
    Ok(plugged)
}

/// Virtio-mem device `id` as `query-memory-devices` shows it.
async fn virtio_mem(core: &Core, id: &str) -> Result<command::VirtioMemInfo> {
    let devices = core.client.execute(&QueryMemoryDevices).await?;
    devices
        .into_iter()
        .find_map(|d| match d {
            MemoryDeviceInfo::VirtioMem(v) if v.id.as_deref() == Some(id) => Some(v),
            _ => None,
        })
        .ok_or_else(|| Error::NotFound {
            kind: DeviceKind::Memory,
            id: id.to_owned(),
        })
}

/// Whether `config` fits: a free memory slot for a DIMM, and room under `maxmem`.
pub(crate) async fn check_fits(core: &Core, config: &MemoryConfig) -> Result<()> {
    let (boot, max, slots) = {
        let state = core.state();
        let s = state.spec();
        (s.memory_mib * MIB, s.max_memory_mib, s.memory_slots)
    };
    let Some(max) = max else {
        return Err(Error::OverMaxMemory {
            id: config.id().to_owned(),
            size: config.size(),
            free: 0,
        });
    };
    let devices = core.client.execute(&QueryMemoryDevices).await?;
    let dimms = devices
        .iter()
        .filter(|d| matches!(d, MemoryDeviceInfo::Dimm(_) | MemoryDeviceInfo::Nvdimm(_)))
        .count();
    if config.is_dimm() && dimms >= slots as usize {
        return Err(Error::NoFreeSlot {
            bus: format!("memory slots ({slots})"),
        });
    }
    let used: u64 = devices
        .iter()
        .map(|d| match d {
            MemoryDeviceInfo::Dimm(d) | MemoryDeviceInfo::Nvdimm(d) => d.size,
            MemoryDeviceInfo::VirtioMem(v) => v.max_size,
            MemoryDeviceInfo::Other => 0,
        })
        .sum();
    let free = (max * MIB).saturating_sub(boot + used);
    if config.size() > free {
        return Err(Error::OverMaxMemory {
            id: config.id().to_owned(),
            size: config.size(),
            free,
        });
    }
    Ok(())
}

/// The balloon's id: [`Error::NotFound`] for the balloon when the VM has none.
fn balloon_id(core: &Core) -> Result<String> {
    let id = core.state().spec().balloon.as_ref().map(|b| b.id.clone());
    id.ok_or_else(|| Error::NotFound {
        kind: DeviceKind::Balloon,
        id: String::new(),
    })
}

/// See [`Vm::balloon_actual`](crate::Vm::balloon_actual).
pub(crate) async fn balloon_actual(core: &Core) -> Result<u64> {
    balloon_id(core)?;
    Ok(core.client.execute(&command::QueryBalloon).await?.actual)
}

/// See [`Vm::set_balloon`](crate::Vm::set_balloon).
pub(crate) async fn set_balloon(core: &Arc<Core>, target: u64) -> Result<()> {
    core.require("the balloon", &["balloon"]).await?;
    let id = balloon_id(core)?;
    // Held to the end, so a removal cannot start under the command.
    let _busy = holds::mark_busy(core, &id, DeviceKind::Balloon)?;
    let value = i64::try_from(target).ok().filter(|v| *v > 0);
    let Some(value) = value else {
        return Err(Error::InvalidSize {
            id: "balloon".into(),
            size: target,
        });
    };
    let step = tracing::debug_span!(crate::spans::STEP, name = "balloon");
    core.client
        .execute(&command::Balloon { value })
        .instrument(step)
        .await?;
    core.state().balloon_target = Some(target);
    Ok(())
}
