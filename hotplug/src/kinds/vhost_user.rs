//! vhost-user devices: a disk served by another process (`vhost-user-blk-pci`) and a shared folder
//! (`vhost-user-fs-pci` on virtiofsd), each on the backend's Unix socket.
//!
//! Hot-add: `chardev-add` (a socket client on the backend's path) → `device_add`. Teardown:
//! `chardev-remove`. The backend maps guest memory: [`Vm::add_vhost_user_blk`] and
//! [`Vm::add_virtio_fs`] refuse a VM whose memory is not shared before anything is sent.
//!
//! [`Vm::add_vhost_user_blk`]: crate::Vm::add_vhost_user_blk
//! [`Vm::add_virtio_fs`]: crate::Vm::add_virtio_fs

use std::path::PathBuf;

use qhotplug_cmdline::{DeviceModel, Pci, SocketChardev, VhostUserBlk, VirtioFs};

use super::{Backend, Place, Placed, Plan, Plug, Want};
use crate::error::Result;
use crate::qemu::delete::Delete;

/// A `vhost-user-blk-pci` disk to hot-add, on the socket its backend listens on.
///
/// ```
/// let disk = qhotplug::VhostUserBlkConfig::new("vdisk-1", "/run/qsd/vdisk-1.sock").num_queues(2);
/// # let _ = disk;
/// ```
#[derive(Debug, Clone)]
pub struct VhostUserBlkConfig {
    id: String,
    socket: PathBuf,
    num_queues: Option<u16>,
    at: Option<Pci>,
}

impl VhostUserBlkConfig {
    /// A disk on the backend's socket at `socket`, in a free PCI slot.
    pub fn new(id: impl Into<String>, socket: impl Into<PathBuf>) -> Self {
        VhostUserBlkConfig {
            id: id.into(),
            socket: socket.into(),
            num_queues: None,
            at: None,
        }
    }

    /// Queues (default: QEMU's).
    pub fn num_queues(mut self, n: u16) -> Self {
        self.num_queues = Some(n);
        self
    }

    /// At this PCI address instead of a free one.
    pub fn at_pci(mut self, pci: Pci) -> Self {
        self.at = Some(pci);
        self
    }
}

/// A `vhost-user-fs-pci` share to hot-add, on virtiofsd's socket.
///
/// ```
/// let share = qhotplug::VirtioFsConfig::new("fs-1", "/run/vm1/fs-1.sock", "share");
/// # let _ = share;
/// ```
#[derive(Debug, Clone)]
pub struct VirtioFsConfig {
    id: String,
    socket: PathBuf,
    tag: String,
    queue_size: Option<u16>,
    at: Option<Pci>,
}

impl VirtioFsConfig {
    /// A share the guest mounts by `tag`, on virtiofsd's socket at `socket`, in a free PCI slot.
    pub fn new(id: impl Into<String>, socket: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        VirtioFsConfig {
            id: id.into(),
            socket: socket.into(),
            tag: tag.into(),
            queue_size: None,
            at: None,
        }
    }

    /// The request queue's size (default: QEMU's).
    pub fn queue_size(mut self, n: u16) -> Self {
        self.queue_size = Some(n);
        self
    }

    /// At this PCI address instead of a free one.
    pub fn at_pci(mut self, pci: Pci) -> Self {
        self.at = Some(pci);
        self
    }
}

/// The plan of a device on a chardev: the chardev, then the device.
fn on_chardev<A>(
    chardev: SocketChardev,
    device: qhotplug_qmp::command::DeviceAdd,
    added: A,
) -> Plan<A> {
    Plan {
        backends: vec![Backend::Chardev(chardev.chardev_add())],
        device,
        after: Vec::new(),
        added,
    }
}

impl Plug for VhostUserBlkConfig {
    type Added = VhostUserBlk;
    const OPERATION: &'static str = "vhost-user disk hotplug";
    const COMMANDS: &'static [&'static str] =
        &["chardev-add", "chardev-remove", "device_add", "device_del"];

    fn id(&self) -> &str {
        &self.id
    }

    fn want(&self) -> Result<Want> {
        Ok(Want::Pci(self.at.clone()))
    }

    fn plan(self, place: Place) -> Result<Plan<VhostUserBlk>> {
        let pci = place.pci(&self.id)?;
        let disk = VhostUserBlk {
            id: self.id,
            socket: self.socket,
            pci,
            num_queues: self.num_queues,
        };
        disk.check()?;
        Ok(on_chardev(disk.chardev(), disk.device_add(), disk))
    }
}

impl Plug for VirtioFsConfig {
    type Added = VirtioFs;
    const OPERATION: &'static str = "virtio-fs hotplug";
    const COMMANDS: &'static [&'static str] =
        &["chardev-add", "chardev-remove", "device_add", "device_del"];

    fn id(&self) -> &str {
        &self.id
    }

    fn want(&self) -> Result<Want> {
        Ok(Want::Pci(self.at.clone()))
    }

    fn plan(self, place: Place) -> Result<Plan<VirtioFs>> {
        let pci = place.pci(&self.id)?;
        let fs = VirtioFs {
            id: self.id,
            socket: self.socket,
            tag: self.tag,
            pci,
            queue_size: self.queue_size,
        };
        fs.check()?;
        Ok(on_chardev(fs.chardev(), fs.device_add(), fs))
    }
}

impl Placed for VhostUserBlk {
    type Config = VhostUserBlkConfig;

    fn place(&self) -> Place {
        Place::Pci(self.pci.clone())
    }

    /// Its chardev.
    fn teardown(&self) -> Vec<Delete> {
        vec![Delete::Chardev(self.chardev().id)]
    }
}

impl Placed for VirtioFs {
    type Config = VirtioFsConfig;

    fn place(&self) -> Place {
        Place::Pci(self.pci.clone())
    }

    /// Its chardev.
    fn teardown(&self) -> Vec<Delete> {
        vec![Delete::Chardev(self.chardev().id)]
    }
}
