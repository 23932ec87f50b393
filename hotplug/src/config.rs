//! What a caller asks for: a disk or a NIC, with the address left to the SDK or chosen.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use qhotplug_cmdline::{Cache, DiskBackend, Format, Pci, ScsiAddr};
use qhotplug_netdev::{MacAddr, Tap, VhostPolicy};

/// The guest-facing model of a hot-plugged disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskModel {
    /// `virtio-blk-pci`: one PCI slot (pc) or one root port (q35) per disk.
    VirtioBlk,
    /// `scsi-hd` on a virtio-scsi controller the VM already has: one target per disk.
    ScsiHd,
}

/// Where a device goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum At {
    /// The SDK picks a free slot (or target, on `bus` when given).
    Auto { scsi_bus: Option<String> },
    /// This PCI address.
    Pci(Pci),
    /// This SCSI address.
    Scsi(ScsiAddr),
}

/// A disk to hot-add. The image is opened by the SDK (read-only when asked) and handed to QEMU as
/// an fd, so QEMU never needs access to the path.
///
/// ```
/// use qhotplug::DiskConfig;
/// use qhotplug_cmdline::Format;
/// let disk = DiskConfig::virtio_blk("data-1", "/var/lib/images/data-1.qcow2")
///     .format(Format::Qcow2)
///     .read_only(true);
/// # let _ = disk;
/// ```
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub(crate) id: String,
    pub(crate) path: PathBuf,
    pub(crate) model: DiskModel,
    pub(crate) format: Format,
    pub(crate) backend: DiskBackend,
    pub(crate) read_only: bool,
    pub(crate) cache: Cache,
    pub(crate) at: At,
}

impl DiskConfig {
    /// A raw, read-write, writeback disk of `model` from the image at `path`.
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>, model: DiskModel) -> Self {
        DiskConfig {
            id: id.into(),
            path: path.into(),
            model,
            format: Format::Raw,
            backend: DiskBackend::File,
            read_only: false,
            cache: Cache::default(),
            at: At::Auto { scsi_bus: None },
        }
    }

    /// A `virtio-blk-pci` disk.
    pub fn virtio_blk(id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self::new(id, path, DiskModel::VirtioBlk)
    }

    /// A `scsi-hd` disk on the VM's (first) virtio-scsi controller.
    pub fn scsi_hd(id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self::new(id, path, DiskModel::ScsiHd)
    }

    /// The image format (default raw).
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Read-only: the image is opened `O_RDONLY` and the guest cannot write (default false).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The host cache mode (default writeback).
    pub fn cache(mut self, cache: Cache) -> Self {
        self.cache = cache;
        self
    }

    /// The image is a block device (`host_device`) rather than a file.
    pub fn host_device(mut self) -> Self {
        self.backend = DiskBackend::HostDevice;
        self
    }

    /// A `virtio-blk-pci` disk goes to this PCI address instead of a free one.
    pub fn at_pci(mut self, pci: Pci) -> Self {
        self.at = At::Pci(pci);
        self
    }

    /// A `scsi-hd` disk goes to this SCSI address instead of a free target.
    pub fn at_scsi(mut self, addr: ScsiAddr) -> Self {
        self.at = At::Scsi(addr);
        self
    }

    /// A `scsi-hd` disk goes to a free target of this controller bus (`<controller id>.0`).
    pub fn scsi_bus(mut self, bus: impl Into<String>) -> Self {
        self.at = At::Auto {
            scsi_bus: Some(bus.into()),
        };
        self
    }
}

/// A `virtio-net-pci` NIC to hot-add on a tap: one tap fd per queue pair; more than one queue turns
/// on `mq` with `vectors=2N+2`.
///
/// ```no_run
/// use qhotplug::NicConfig;
/// use qhotplug_netdev::{MacAddr, TapBuilder, VhostPolicy};
/// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let mac = MacAddr::random_qemu();
/// let tap = TapBuilder::new("vm1-nic%d").queues(2).up(true).create()?;
/// let nic = NicConfig::new("nic-1", tap).mac(mac).vhost(VhostPolicy::Prefer);
/// # let _ = nic; Ok(()) }
/// ```
#[derive(Debug)]
pub struct NicConfig {
    pub(crate) id: String,
    pub(crate) taps: Vec<OwnedFd>,
    pub(crate) mac: Option<MacAddr>,
    pub(crate) vhost: Option<VhostPolicy>,
    pub(crate) at: Option<Pci>,
}

impl NicConfig {
    /// A NIC on `tap`, one queue pair per tap queue, with a random `52:54:00` MAC and vhost-net
    /// when the host has it.
    pub fn new(id: impl Into<String>, tap: Tap) -> Self {
        Self::from_fds(id, tap.into_queues())
    }

    /// A NIC on tap fds opened elsewhere (one per queue pair).
    pub fn from_fds(id: impl Into<String>, taps: Vec<OwnedFd>) -> Self {
        NicConfig {
            id: id.into(),
            taps,
            mac: None,
            vhost: Some(VhostPolicy::Prefer),
            at: None,
        }
    }

    /// The guest's MAC address.
    pub fn mac(mut self, mac: MacAddr) -> Self {
        self.mac = Some(mac);
        self
    }

    /// Whether to use vhost-net: `Prefer` (the default) uses it when `/dev/vhost-net` opens,
    /// `Require` fails without it.
    pub fn vhost(mut self, policy: VhostPolicy) -> Self {
        self.vhost = Some(policy);
        self
    }

    /// No vhost-net: QEMU moves the packets itself.
    pub fn no_vhost(mut self) -> Self {
        self.vhost = None;
        self
    }

    /// This PCI address instead of a free one.
    pub fn at_pci(mut self, pci: Pci) -> Self {
        self.at = Some(pci);
        self
    }
}
