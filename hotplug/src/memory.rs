//! Memory: DIMMs and virtio-mem devices hot-added and removed on the engine, a virtio-mem device
//! resized, and the balloon driven.
//!
//! Before a memory device is sent, `query-memory-devices` says whether it fits: a DIMM needs a
//! free memory slot, and every device takes its whole backend's size of `maxmem` (boot memory
//! included). A virtio-mem resize sets `requested-size` and follows `MEMORY_DEVICE_SIZE_CHANGE`
//! until the guest has plugged what was asked, or the deadline; what the guest actually plugged
//! is what the call returns.

use qhotplug_cmdline::{Balloon, MemoryDevice, MemoryDeviceKind, MIB};
use qhotplug_qmp::command::{self, MemoryDeviceInfo, QomSet, QueryBalloon, QueryMemoryDevices};
use qhotplug_qmp::EventKind;
use tokio::time::Instant;
use tracing::Instrument;

use crate::engine;
use crate::error::{Error, Result};
use crate::kinds::Kind;
use crate::state::{self, Device};
use crate::vm::Vm;
use crate::{BalloonConfig, MemoryConfig};

impl Vm {
    /// Hot-adds a memory device: its backend (`object-add`), then the device. A DIMM with no
    /// memory slot left is [`Error::NoFreeSlot`], a device that would take the VM over `maxmem`
    /// is [`Error::OverMaxMemory`], both from `query-memory-devices` before anything is sent. The
    /// guest onlines the new memory (with `memhp_default_state=online_movable` on its kernel
    /// command line, as movable memory it can give back).
    pub async fn add_memory(&self, config: MemoryConfig) -> Result<MemoryDevice> {
        let id = config.id().to_owned();
        self.call("add_memory", &id, |vm| async move {
            vm.check_fits(&config).await?;
            let device = engine::add(&vm, config).await?;
            tracing::info!(
                size = device.size(),
                driver = device.driver(),
                "memory added"
            );
            Ok(device)
        })
        .await
    }

    /// Hot-removes a memory device: `device_del`, wait for the guest to let it go, then its
    /// backend (`object-del`). A guest that cannot give the memory back (onlined as normal memory,
    /// or in use) refuses: [`Error::UnplugRejected`] as soon as QEMU says so (ACPI `_OST` 0x82 for
    /// a DIMM), and the device and its backend stay.
    pub async fn remove_memory(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_memory", id, state::Kind::Memory)
            .await
    }

    /// Asks the guest to plug `requested` bytes of virtio-mem device `id` (grow or shrink), and
    /// waits, by the handle's unplug deadline, for `MEMORY_DEVICE_SIZE_CHANGE` to say it did.
    /// Returns what the guest has plugged then, which may fall short of `requested` (the guest
    /// could not free enough, or is slow). `requested` must be a multiple of the device's block
    /// size and at most its size ([`Error::InvalidSize`]).
    pub async fn resize_virtio_mem(&self, id: &str, requested: u64) -> Result<u64> {
        let owned = id.to_owned();
        self.call("resize_virtio_mem", id, |vm| async move {
            vm.resize_vmem(&owned, requested).await
        })
        .await
    }

    async fn resize_vmem(&self, id: &str, requested: u64) -> Result<u64> {
        self.require("virtio-mem resize", &["qom-set", "query-memory-devices"])
            .await?;
        let (_busy, device) = self.busy_device(id, state::Kind::Memory)?;
        let Device::Memory(MemoryDevice {
            kind: MemoryDeviceKind::VirtioMem { .. },
            ..
        }) = device
        else {
            return Err(Error::NotFound {
                kind: "virtio-mem device",
                id: id.to_owned(),
            });
        };
        let info = self.virtio_mem(id).await?;
        if requested > info.max_size || requested % info.block_size != 0 {
            return Err(Error::InvalidSize {
                id: id.to_owned(),
                size: requested,
            });
        }
        let mut events = self.client().events();
        let set = QomSet {
            path: format!("/machine/peripheral/{id}"),
            property: "requested-size".into(),
            value: requested.into(),
        };
        let step = tracing::debug_span!("step", name = "qom-set", id);
        self.client().execute(&set).instrument(step).await?;
        {
            let mut state = self.inner().state();
            let found = state.spec.memory_devices.iter_mut().find(|m| m.id == id);
            if let Some(MemoryDeviceKind::VirtioMem { requested: r, .. }) =
                found.map(|m| &mut m.kind)
            {
                *r = requested;
            }
        }
        if info.size != requested {
            let deadline = Instant::now() + self.unplug_policy().deadline;
            let wait = tracing::debug_span!("step", name = "wait MEMORY_DEVICE_SIZE_CHANGE", id);
            // Whether or not the event comes, QEMU's `query-memory-devices` says what is plugged.
            let reached = |e: &EventKind| {
                matches!(e, EventKind::MemoryDeviceSizeChange(c)
                    if c.id.as_deref() == Some(id) && c.size == requested)
            };
            events.wait_for(deadline, reached).instrument(wait).await;
        }
        let plugged = self.virtio_mem(id).await?.size;
        tracing::info!(requested, plugged, "virtio-mem resized");
        Ok(plugged)
    }

    async fn virtio_mem(&self, id: &str) -> Result<command::VirtioMemInfo> {
        let devices = self.client().execute(&QueryMemoryDevices).await?;
        devices
            .into_iter()
            .find_map(|d| match d {
                MemoryDeviceInfo::VirtioMem(v) if v.id.as_deref() == Some(id) => Some(v),
                _ => None,
            })
            .ok_or_else(|| Error::NotFound {
                kind: "virtio-mem device",
                id: id.to_owned(),
            })
    }

    /// Whether `config` fits: a free memory slot for a DIMM, and room under `maxmem`.
    async fn check_fits(&self, config: &MemoryConfig) -> Result<()> {
        let (boot, max, slots) = {
            let state = self.inner().state();
            let s = &state.spec;
            (s.memory_mib * MIB, s.max_memory_mib, s.memory_slots)
        };
        let Some(max) = max else {
            return Err(Error::OverMaxMemory {
                id: config.id().to_owned(),
                size: config.size(),
                free: 0,
            });
        };
        let devices = self.client().execute(&QueryMemoryDevices).await?;
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

    /// Hot-adds a `virtio-balloon-pci`. Drive it with [`set_balloon`](Vm::set_balloon).
    pub async fn add_balloon(&self, config: BalloonConfig) -> Result<Balloon> {
        self.add_kind("add_balloon", config, |_, _| Ok(())).await
    }

    /// Hot-removes the balloon.
    pub async fn remove_balloon(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_balloon", id, state::Kind::Balloon)
            .await
    }

    /// Asks the guest's balloon driver to bring the guest's memory to `target` bytes (`balloon`).
    /// The guest gives memory back at its own pace: follow [`balloon_actual`](Vm::balloon_actual)
    /// or `BALLOON_CHANGE` events.
    pub async fn set_balloon(&self, target: u64) -> Result<()> {
        self.call("set_balloon", &target.to_string(), |vm| async move {
            vm.require("the balloon", &["balloon"]).await?;
            let Some(id) = vm
                .inner()
                .state()
                .spec
                .balloon
                .as_ref()
                .map(|b| b.id.clone())
            else {
                return Err(Error::NotFound {
                    kind: "balloon",
                    id: String::new(),
                });
            };
            // Held to the end, so a removal cannot start under the command.
            let _busy = engine::mark_busy(&vm, &id, state::Kind::Balloon)?;
            let value = i64::try_from(target).ok().filter(|v| *v > 0);
            let Some(value) = value else {
                return Err(Error::InvalidSize {
                    id: "balloon".into(),
                    size: target,
                });
            };
            let step = tracing::debug_span!("step", name = "balloon");
            vm.client()
                .execute(&command::Balloon { value })
                .instrument(step)
                .await?;
            Ok(())
        })
        .await
    }

    /// The guest's memory as the balloon leaves it, in bytes (`query-balloon`).
    pub async fn balloon_actual(&self) -> Result<u64> {
        Ok(self.client().execute(&QueryBalloon).await?.actual)
    }
}
