//! Guest memory: the backends it is made of (`memory-backend-ram`, `-memfd`, `-file`), the memory
//! devices that add to it (`pc-dimm`, `virtio-mem-pci`), and the balloon (`virtio-balloon-pci`).
//! Each renders both as launch arguments (`-object`, `-device`) and as QMP (`object-add`,
//! `device_add`), from the same values.

use std::path::PathBuf;

use qhotplug_qmp::command::ObjectAdd;

use crate::device::Pci;
use crate::error::{Error, Result};
use crate::model::DeviceModel;
use crate::names;
use crate::value::{p, validate_id, Props, QomObject};

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// What a memory backend's pages come from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryKind {
    /// Anonymous memory (`memory-backend-ram`).
    Ram,
    /// A memfd (`memory-backend-memfd`): shareable with another process by fd, as vhost-user
    /// backends need.
    Memfd,
    /// A file (`memory-backend-file`), for example on a hugetlbfs mount or in `/dev/shm`.
    File(PathBuf),
}

/// A memory backend object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryBackend {
    /// The object id (under `/objects`).
    pub id: String,
    /// Where its pages come from.
    pub kind: MemoryKind,
    /// Its size in bytes.
    pub size: u64,
    /// Shared (`share=on`): writes go to the memfd or file, where another process (a vhost-user
    /// backend) sees them.
    pub share: bool,
    /// Huge pages: a memfd on hugetlbfs (`hugetlb=on`). For a file, put it on a hugetlbfs mount.
    pub hugepages: bool,
}

impl MemoryBackend {
    /// Anonymous, private memory of `size` bytes.
    pub fn ram(id: impl Into<String>, size: u64) -> Self {
        MemoryBackend {
            id: id.into(),
            kind: MemoryKind::Ram,
            size,
            share: false,
            hugepages: false,
        }
    }

    /// A shared memfd of `size` bytes (what vhost-user devices need for guest RAM).
    pub fn shared_memfd(id: impl Into<String>, size: u64) -> Self {
        MemoryBackend {
            kind: MemoryKind::Memfd,
            share: true,
            ..MemoryBackend::ram(id, size)
        }
    }

    /// The QOM type.
    pub fn qom_type(&self) -> &'static str {
        match self.kind {
            MemoryKind::Ram => "memory-backend-ram",
            MemoryKind::Memfd => "memory-backend-memfd",
            MemoryKind::File(_) => "memory-backend-file",
        }
    }

    /// Checks the id and size (a positive multiple of 2 MiB, which memory devices align to).
    pub fn check(&self) -> Result<()> {
        validate_id(&self.id)?;
        if self.size == 0 || !self.size.is_multiple_of(2 * MIB) {
            return Err(Error::InvalidSpec(format!(
                "{}: {} bytes is no memory size (a positive multiple of 2 MiB)",
                self.id, self.size
            )));
        }
        if self.hugepages && matches!(self.kind, MemoryKind::Ram) {
            return Err(Error::InvalidSpec(format!(
                "{}: huge pages need a memfd or a file on hugetlbfs",
                self.id
            )));
        }
        Ok(())
    }

    /// The object's properties after its id: size, then what differs from QEMU's defaults.
    pub fn props(&self) -> Props {
        let mut props = vec![p("id", self.id.clone()), p("size", self.size as i64)];
        if let MemoryKind::File(path) = &self.kind {
            props.push(p("mem-path", path.to_string_lossy().into_owned()));
        }
        if self.share {
            props.push(p("share", true));
        }
        if self.hugepages && self.kind == MemoryKind::Memfd {
            props.push(p("hugetlb", true));
        }
        props
    }

    fn object(&self) -> QomObject {
        QomObject {
            qom_type: self.qom_type(),
            props: self.props(),
        }
    }

    /// Launch arguments.
    pub fn args(&self) -> Vec<String> {
        self.object().args().to_vec()
    }

    /// `object-add` arguments.
    pub fn object_add(&self) -> ObjectAdd {
        self.object().object_add()
    }
}

/// What sort of memory device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryDeviceKind {
    /// `pc-dimm`: all of its backend, in one of the machine's memory slots.
    Dimm,
    /// `virtio-mem-pci` at a PCI address: up to its backend's size, of which the guest plugs
    /// `requested` bytes (a multiple of the device's block size, 2 MiB by default).
    VirtioMem {
        /// Where it sits.
        pci: Pci,
        /// How much of it the guest should plug, in bytes.
        requested: u64,
    },
}

/// A memory device and its backend (whose id is [`names::memdev`] of the device's).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryDevice {
    /// The device id.
    pub id: String,
    /// Which device.
    pub kind: MemoryDeviceKind,
    /// Its backend.
    pub backend: MemoryBackend,
}

impl MemoryDevice {
    /// A `pc-dimm` of `size` bytes of anonymous memory.
    pub fn dimm(id: impl Into<String>, size: u64) -> Self {
        let id = id.into();
        MemoryDevice {
            backend: MemoryBackend::ram(names::memdev(&id), size),
            kind: MemoryDeviceKind::Dimm,
            id,
        }
    }

    /// A `virtio-mem-pci` of up to `max` bytes at `pci`, of which the guest plugs `requested`.
    pub fn virtio_mem(id: impl Into<String>, max: u64, requested: u64, pci: Pci) -> Self {
        let id = id.into();
        MemoryDevice {
            backend: MemoryBackend::ram(names::memdev(&id), max),
            kind: MemoryDeviceKind::VirtioMem { pci, requested },
            id,
        }
    }

    /// How much of `maxmem` it takes: all of its backend.
    pub fn size(&self) -> u64 {
        self.backend.size
    }

    /// Launch arguments: the backend's `-object`, then `-device`.
    pub fn args(&self) -> Vec<String> {
        let mut args = self.backend.args();
        args.extend(["-device".to_owned(), self.device_arg()]);
        args
    }
}

impl DeviceModel for MemoryDevice {
    fn id(&self) -> &str {
        &self.id
    }

    /// The device model.
    fn driver(&self) -> &str {
        match self.kind {
            MemoryDeviceKind::Dimm => "pc-dimm",
            MemoryDeviceKind::VirtioMem { .. } => "virtio-mem-pci",
        }
    }

    /// Checks the id, the backend, and a virtio-mem's requested size.
    fn check(&self) -> Result<()> {
        validate_id(&self.id)?;
        self.backend.check()?;
        if let MemoryDeviceKind::VirtioMem { requested, pci } = &self.kind {
            pci.check()?;
            if *requested > self.backend.size || requested % (2 * MIB) != 0 {
                return Err(Error::InvalidSpec(format!(
                    "{}: requested {requested} bytes of {} (a multiple of 2 MiB, at most the size)",
                    self.id, self.backend.size
                )));
            }
        }
        Ok(())
    }

    /// Every device property.
    fn device_props(&self) -> Props {
        let mut props = vec![p("id", self.id.clone())];
        if let MemoryDeviceKind::VirtioMem { pci, .. } = &self.kind {
            props.extend(pci.props());
        }
        props.push(p("memdev", self.backend.id.clone()));
        if let MemoryDeviceKind::VirtioMem { requested, .. } = &self.kind {
            props.push(p("requested-size", *requested as i64));
        }
        props
    }
}

/// A `virtio-balloon-pci`: the host asks the guest to give memory back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Balloon {
    /// The device id.
    pub id: String,
    /// Where it sits.
    pub pci: Pci,
}

impl Balloon {
    /// Launch arguments.
    pub fn args(&self) -> Vec<String> {
        vec!["-device".into(), self.device_arg()]
    }
}

impl DeviceModel for Balloon {
    fn id(&self) -> &str {
        &self.id
    }

    fn driver(&self) -> &str {
        "virtio-balloon-pci"
    }

    fn check(&self) -> Result<()> {
        validate_id(&self.id)?;
        self.pci.check()
    }

    /// Every device property.
    fn device_props(&self) -> Props {
        self.pci.with_id(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::parse;

    #[test]
    fn backends_render_the_same_both_ways() {
        for backend in [
            MemoryBackend::ram("m0", 128 * MIB),
            MemoryBackend::shared_memfd("m1", 256 * MIB),
            MemoryBackend {
                kind: MemoryKind::File("/dev/hugepages/vm,1".into()),
                share: true,
                ..MemoryBackend::ram("m2", 64 * MIB)
            },
        ] {
            let args = backend.args();
            let (qom_type, pairs) = parse(&args[1]);
            assert_eq!(qom_type, backend.qom_type());
            let qmp = serde_json::to_value(backend.object_add()).unwrap();
            assert_eq!(qmp["qom-type"], qom_type);
            assert_eq!(
                pairs.len() + 1,
                qmp.as_object().unwrap().len(),
                "{args:?} {qmp}"
            );
            for (k, v) in pairs {
                let q = &qmp[&k];
                let q = match q {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Bool(b) => if *b { "on" } else { "off" }.into(),
                    other => other.to_string(),
                };
                assert_eq!(q, v, "{k}");
            }
        }
        assert_eq!(
            MemoryBackend::shared_memfd("m1", 256 * MIB).args()[1],
            "memory-backend-memfd,id=m1,size=268435456,share=on"
        );
    }

    #[test]
    fn memory_devices_name_their_backend_and_check_sizes() {
        let dimm = MemoryDevice::dimm("dimm1", 128 * MIB);
        assert_eq!(
            dimm.args(),
            [
                "-object",
                "memory-backend-ram,id=dimm1-mem,size=134217728",
                "-device",
                "pc-dimm,id=dimm1,memdev=dimm1-mem"
            ]
        );
        let vmem = MemoryDevice::virtio_mem("vm0", 512 * MIB, 128 * MIB, Pci::new("pci.0", 6));
        assert_eq!(
            serde_json::to_value(vmem.device_add()).unwrap(),
            serde_json::json!({"driver": "virtio-mem-pci", "id": "vm0", "bus": "pci.0",
                               "addr": "0x6", "memdev": "vm0-mem", "requested-size": 134217728})
        );
        assert!(vmem.check().is_ok());
        assert!(
            MemoryDevice::virtio_mem("v", 64 * MIB, 65 * MIB, Pci::new("pci.0", 6))
                .check()
                .is_err()
        );
        assert!(MemoryDevice::dimm("d", 3 * MIB).check().is_err());
    }
}
