//! vhost-user devices: a disk served by another process (`vhost-user-blk-pci`: SPDK,
//! `qemu-storage-daemon`) and a shared folder (`vhost-user-fs-pci` on `virtiofsd`). QEMU connects
//! to the backend's Unix socket through a chardev (`<id>-chr`); the backend maps guest memory, so
//! the VM's memory must be shared ([`VmSpec::memory_backend`](crate::VmSpec::memory_backend) with
//! `share`).

use std::path::PathBuf;

use crate::chardev::SocketChardev;
use crate::device::Pci;
use crate::error::Result;
use crate::model::DeviceModel;
use crate::names;
use crate::value::{p, validate_id, Props};

/// A `vhost-user-blk-pci` disk on a backend's socket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VhostUserBlk {
    /// The device id.
    pub id: String,
    /// The backend's socket (the backend listens on it).
    pub socket: PathBuf,
    /// Where it sits.
    pub pci: Pci,
    /// Queues (QEMU's default when `None`).
    pub num_queues: Option<u16>,
}

/// A `vhost-user-fs-pci` share on a virtiofsd socket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioFs {
    /// The device id.
    pub id: String,
    /// virtiofsd's socket.
    pub socket: PathBuf,
    /// The tag the guest mounts (`mount -t virtiofs <tag> /mnt`).
    pub tag: String,
    /// Where it sits.
    pub pci: Pci,
    /// The request queue's size (QEMU's default when `None`).
    pub queue_size: Option<u16>,
}

/// The chardev QEMU connects to a vhost-user backend's `socket` with.
fn client_chardev(id: &str, socket: &std::path::Path) -> SocketChardev {
    SocketChardev {
        id: names::chardev(id),
        path: socket.to_owned(),
        server: false,
    }
}

impl VhostUserBlk {
    /// Its chardev.
    pub fn chardev(&self) -> SocketChardev {
        client_chardev(&self.id, &self.socket)
    }

    /// Launch arguments: `-chardev`, then `-device`.
    pub fn args(&self) -> Vec<String> {
        let mut args = self.chardev().args();
        args.extend(["-device".into(), self.device_arg()]);
        args
    }
}

impl DeviceModel for VhostUserBlk {
    fn id(&self) -> &str {
        &self.id
    }

    fn driver(&self) -> &str {
        "vhost-user-blk-pci"
    }

    /// Checks the id and address.
    fn check(&self) -> Result<()> {
        validate_id(&self.id)?;
        self.pci.check()
    }

    /// Every device property.
    fn device_props(&self) -> Props {
        let mut props = self.pci.with_id(&self.id);
        props.push(p("chardev", names::chardev(&self.id)));
        if let Some(n) = self.num_queues {
            props.push(p("num-queues", i64::from(n)));
        }
        props
    }
}

impl VirtioFs {
    /// Its chardev.
    pub fn chardev(&self) -> SocketChardev {
        client_chardev(&self.id, &self.socket)
    }

    /// Launch arguments: `-chardev`, then `-device`.
    pub fn args(&self) -> Vec<String> {
        let mut args = self.chardev().args();
        args.extend(["-device".into(), self.device_arg()]);
        args
    }
}

impl DeviceModel for VirtioFs {
    fn id(&self) -> &str {
        &self.id
    }

    fn driver(&self) -> &str {
        "vhost-user-fs-pci"
    }

    /// Checks the id, tag and address.
    fn check(&self) -> Result<()> {
        validate_id(&self.id)?;
        if self.tag.is_empty() || self.tag.len() > 36 {
            return Err(crate::Error::InvalidSpec(format!(
                "{}: a virtio-fs tag is 1 to 36 bytes",
                self.id
            )));
        }
        self.pci.check()
    }

    /// Every device property.
    fn device_props(&self) -> Props {
        let mut props = self.pci.with_id(&self.id);
        props.push(p("chardev", names::chardev(&self.id)));
        props.push(p("tag", self.tag.clone()));
        if let Some(n) = self.queue_size {
            props.push(p("queue-size", i64::from(n)));
        }
        props
    }
}
