//! Memory devices: a `pc-dimm` (QEMU picks its slot) or a `virtio-mem-pci` (in a PCI slot), each
//! on a memory backend object of its own.
//!
//! Hot-add: `object-add` (the backend) → `device_add`. Teardown: `object-del`. Whether a free
//! DIMM slot is left, and whether the device fits under `maxmem`, is checked against
//! `query-memory-devices` before anything is sent ([`Vm::add_memory`](crate::Vm::add_memory)).

use std::path::PathBuf;

use qhotplug_cmdline::{
    DeviceModel, MemoryBackend, MemoryDevice, MemoryDeviceKind, MemoryKind, Pci,
};

use super::{Backend, Place, Placed, Plan, Plug, Want};
use crate::error::{Error, Result};
use crate::qemu::delete::Delete;

/// A memory device to hot-add.
///
/// ```
/// use qhotplug::{MemoryConfig, MIB};
/// let dimm = MemoryConfig::dimm("dimm-1", 128 * MIB);
/// let vmem = MemoryConfig::virtio_mem("vmem-1", 1024 * MIB, 256 * MIB).memfd().share(true);
/// # let _ = (dimm, vmem);
/// ```
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    id: String,
    size: u64,
    /// `Some(requested)` for virtio-mem.
    requested: Option<u64>,
    kind: MemoryKind,
    share: bool,
    hugepages: bool,
    at: Option<Pci>,
}

impl MemoryConfig {
    /// A `pc-dimm` of `size` bytes (a positive multiple of 2 MiB) of anonymous memory.
    pub fn dimm(id: impl Into<String>, size: u64) -> Self {
        MemoryConfig {
            id: id.into(),
            size,
            requested: None,
            kind: MemoryKind::Ram,
            share: false,
            hugepages: false,
            at: None,
        }
    }

    /// A `virtio-mem-pci` of up to `max` bytes, of which the guest is asked to plug `requested`
    /// (both multiples of 2 MiB). Resize it later with
    /// [`Vm::resize_virtio_mem`](crate::Vm::resize_virtio_mem).
    pub fn virtio_mem(id: impl Into<String>, max: u64, requested: u64) -> Self {
        MemoryConfig {
            requested: Some(requested),
            ..MemoryConfig::dimm(id, max)
        }
    }

    /// Backed by a memfd rather than anonymous memory.
    pub fn memfd(mut self) -> Self {
        self.kind = MemoryKind::Memfd;
        self
    }

    /// Backed by the file at `path` (on hugetlbfs for huge pages, or in `/dev/shm`).
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.kind = MemoryKind::File(path.into());
        self
    }

    /// Shared (`share=on`), for another process to map (default false).
    pub fn share(mut self, share: bool) -> Self {
        self.share = share;
        self
    }

    /// Huge pages (a memfd with `hugetlb=on`; default false).
    pub fn hugepages(mut self, hugepages: bool) -> Self {
        self.hugepages = hugepages;
        self
    }

    /// A virtio-mem device goes to this PCI address instead of a free one.
    pub fn at_pci(mut self, pci: Pci) -> Self {
        self.at = Some(pci);
        self
    }

    /// The bytes it takes of `maxmem`.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// True for a `pc-dimm`, which needs one of the machine's memory slots.
    pub(crate) fn is_dimm(&self) -> bool {
        self.requested.is_none()
    }
}

impl Plug for MemoryConfig {
    type Added = MemoryDevice;
    const OPERATION: &'static str = "memory hotplug";
    const COMMANDS: &'static [&'static str] = &[
        "query-memory-devices",
        "object-add",
        "object-del",
        "device_add",
        "device_del",
    ];

    fn id(&self) -> &str {
        &self.id
    }

    fn want(&self) -> Result<Want> {
        match (self.requested, &self.at) {
            (None, None) => Ok(Want::Fixed),
            (None, Some(_)) => Err(Error::AddressMismatch(self.id.clone())),
            (Some(_), at) => Ok(Want::Pci(at.clone())),
        }
    }

    fn plan(self, place: Place) -> Result<Plan<MemoryDevice>> {
        let mut device = match (self.requested, place) {
            (None, Place::Fixed) => MemoryDevice::dimm(self.id, self.size),
            (Some(requested), Place::Pci(pci)) => {
                MemoryDevice::virtio_mem(self.id, self.size, requested, pci)
            }
            _ => return Err(Error::AddressMismatch(self.id)),
        };
        device.backend = MemoryBackend {
            kind: self.kind,
            share: self.share,
            hugepages: self.hugepages,
            ..device.backend
        };
        device.check()?;
        Ok(Plan {
            backends: vec![Backend::Object(device.backend.object_add())],
            device: device.device_add(),
            after: Vec::new(),
            added: device,
        })
    }
}

impl Placed for MemoryDevice {
    type Config = MemoryConfig;

    fn place(&self) -> Place {
        match &self.kind {
            MemoryDeviceKind::Dimm => Place::Fixed,
            MemoryDeviceKind::VirtioMem { pci, .. } => Place::Pci(pci.clone()),
        }
    }

    /// Its backend.
    fn teardown(&self) -> Vec<Delete> {
        vec![Delete::Object(self.backend.id.clone())]
    }
}
