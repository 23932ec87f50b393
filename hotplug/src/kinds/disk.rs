//! Disks: `virtio-blk-pci`, or `scsi-hd` on a virtio-scsi controller, on an image the SDK opens
//! and hands over as an fd (QEMU never needs access to the path).
//!
//! Hot-add: `add-fd` → `blockdev-add` (protocol node on `/dev/fdset/N`) → `blockdev-add` (format
//! node) → `device_add`; the fd set stays while the nodes are open, so QEMU's fd table names the
//! image for a process that attaches later. Teardown: the format node, then the protocol node,
//! then the disk's fd sets (`remove-fd`).

use std::path::{Path, PathBuf};

use qhotplug_cmdline::{
    Cache, DeviceModel, Disk, DiskBackend, DiskFrontend, ErrorPolicy, Format, NetworkSource, Pci,
    ScsiAddr,
};

use qhotplug_qmp::command::{BlockSetIoThrottle, IoLimits};

use super::{After, Place, Placed, Plan, Plug, Want};
use crate::error::{Error, Result};
use crate::qemu::delete::Delete;

/// The guest-facing model of a hot-plugged disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskModel {
    /// `virtio-blk-pci`: one PCI slot (pc) or one root port (q35) per disk.
    VirtioBlk,
    /// `scsi-hd` on a virtio-scsi controller the VM already has: one target per disk.
    ScsiHd,
}

/// Where a disk goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum At {
    /// The SDK picks a free slot (or target, on `scsi_bus` when given).
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
/// use qhotplug::{DiskConfig, Format};
/// let disk = DiskConfig::virtio_blk("data-1", "/var/lib/images/data-1.qcow2")
///     .format(Format::Qcow2)
///     .read_only(true);
/// # let _ = disk;
/// ```
#[derive(Debug, Clone)]
pub struct DiskConfig {
    id: String,
    path: PathBuf,
    model: DiskModel,
    format: Format,
    backend: DiskBackend,
    read_only: bool,
    cache: Cache,
    at: At,
    io_limits: Option<IoLimits>,
    on_error: ErrorPolicy,
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
            io_limits: None,
            on_error: ErrorPolicy::default(),
        }
    }

    /// A raw, read-write disk of `model` on a network export that QEMU opens itself (NBD, iSCSI,
    /// Ceph RBD): no fd is handed over; a credential in `source` goes to QEMU only as a `secret`
    /// object encrypted with the VM's master key. The disk's `path` in the spec is the export's
    /// URI. A QEMU without the driver is [`Error::NoBlockDriver`] before anything is sent.
    ///
    /// ```
    /// use qhotplug::{DiskConfig, DiskModel, Nbd, NbdServer};
    /// let disk = DiskConfig::network(
    ///     "data-2",
    ///     Nbd {
    ///         server: NbdServer::Unix("/run/nbd/data-2.sock".into()),
    ///         export: Some("data-2".into()),
    ///         reconnect_delay: Some(5),
    ///         tls_dir: None,
    ///     },
    ///     DiskModel::VirtioBlk,
    /// );
    /// # let _ = disk;
    /// ```
    pub fn network(
        id: impl Into<String>,
        source: impl Into<NetworkSource>,
        model: DiskModel,
    ) -> Self {
        let source = source.into();
        DiskConfig {
            backend: DiskBackend::Network(Box::new(source.clone())),
            ..Self::new(id, source.uri(), model)
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

    /// What the guest's device does when I/O on the disk fails (default: QEMU's, reads report,
    /// writes pause on "no space left"). With [`OnError::Stop`](qhotplug_cmdline::OnError), a
    /// storage server that goes away pauses the VM (`BLOCK_IO_ERROR`, which
    /// [`Vm::disk_of_io_error`](crate::Vm::disk_of_io_error) names the disk of) instead of
    /// failing the guest's I/O; [`Vm::resume`](crate::Vm::resume) retries it.
    pub fn on_error(mut self, policy: ErrorPolicy) -> Self {
        self.on_error = policy;
        self
    }

    /// The host cache mode (default writeback).
    pub fn cache(mut self, cache: Cache) -> Self {
        self.cache = cache;
        self
    }

    /// I/O limits from the start (set right after the device is added; a VM launched from the
    /// spec gets them before it runs). Change them later with
    /// [`Vm::set_io_limits`](crate::Vm::set_io_limits).
    pub fn io_limits(mut self, limits: IoLimits) -> Self {
        self.io_limits = Some(limits);
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

impl Plug for DiskConfig {
    type Added = Disk;
    const OPERATION: &'static str = "disk hotplug";
    const COMMANDS: &'static [&'static str] = &[
        "add-fd",
        "remove-fd",
        "query-fdsets",
        "blockdev-add",
        "blockdev-del",
        "device_add",
        "device_del",
    ];

    fn id(&self) -> &str {
        &self.id
    }

    fn block_driver(&self) -> Option<&'static str> {
        match &self.backend {
            DiskBackend::Network(source) => Some(source.driver()),
            _ => None,
        }
    }

    fn want(&self) -> Result<Want> {
        match (self.model, &self.at) {
            (DiskModel::VirtioBlk, At::Auto { .. }) => Ok(Want::Pci(None)),
            (DiskModel::VirtioBlk, At::Pci(pci)) => Ok(Want::Pci(Some(pci.clone()))),
            (DiskModel::ScsiHd, At::Auto { scsi_bus }) => Ok(Want::Scsi {
                at: None,
                bus: scsi_bus.clone(),
            }),
            (DiskModel::ScsiHd, At::Scsi(addr)) => Ok(Want::Scsi {
                at: Some(addr.clone()),
                bus: None,
            }),
            _ => Err(Error::AddressMismatch(self.id.clone())),
        }
    }

    fn plan(self, place: Place) -> Result<Plan<Disk>> {
        let frontend = match place {
            Place::Pci(pci) => DiskFrontend::VirtioBlk(pci),
            Place::Scsi(addr) => DiskFrontend::ScsiHd(addr),
            Place::Fixed => return Err(Error::AddressMismatch(self.id)),
        };
        let mut disk = Disk::new(self.id, self.path, frontend);
        disk.format = self.format;
        disk.backend = self.backend;
        disk.read_only = self.read_only;
        disk.cache = self.cache;
        disk.on_error = self.on_error;
        disk.check().map_err(Error::Spec)?;
        let limits = self.io_limits.filter(|l| !l.is_unlimited());
        if let Some(limits) = &limits {
            limits.check().map_err(|reason| Error::InvalidIoLimits {
                id: disk.id.clone(),
                reason,
            })?;
        }
        disk.io_limits = limits.clone();
        // The protocol node first (on the fd set, or the network), then the format node on it.
        let backends = match disk.network_source() {
            None => {
                super::image_backends(&disk.id, &disk.path, !disk.read_only, disk.blockdev_add(""))?
            }
            Some(source) => super::network_backends(&disk.id, 0, source, disk.blockdev_add(""))?,
        };
        let after = limits
            .map(|limits| {
                After::IoLimits(BlockSetIoThrottle {
                    id: disk.backend_device(),
                    limits,
                })
            })
            .into_iter()
            .collect();
        Ok(Plan {
            backends,
            device: disk.device_add(),
            after,
            added: disk,
        })
    }
}

impl Placed for Disk {
    type Config = DiskConfig;

    fn place(&self) -> Place {
        match &self.frontend {
            DiskFrontend::VirtioBlk(p) => Place::Pci(p.clone()),
            DiskFrontend::ScsiHd(a) | DiskFrontend::ScsiGeneric(a) => Place::Scsi(a.clone()),
        }
    }

    /// Every image's nodes, top first, each format node before the protocol node under it; then
    /// the fd sets its images were handed over in, or a network disk's secret and TLS objects.
    fn teardown(&self) -> Vec<Delete> {
        let mut steps: Vec<Delete> = self
            .node_names()
            .into_iter()
            .map(Delete::BlockNode)
            .collect();
        steps.push(Delete::Fdset {
            id: None,
            tag: qhotplug_cmdline::names::fdset_tag(&self.id),
        });
        if let Some(source) = self.network_source() {
            steps.extend(
                source
                    .object_ids(&self.id, 0)
                    .into_iter()
                    .map(Delete::Object),
            );
        }
        steps
    }
}

/// The first bytes of a qcow2 image: its magic, and (at 24) its size.
const QCOW2_HEADER: usize = 32;

/// The first [`QCOW2_HEADER`] bytes of the image at `path`, when it is a qcow2 image.
fn qcow2_header(path: &Path) -> Option<[u8; QCOW2_HEADER]> {
    let mut header = [0u8; QCOW2_HEADER];
    std::io::Read::read_exact(&mut std::fs::File::open(path).ok()?, &mut header).ok()?;
    (&header[..4] == b"QFI\xfb").then_some(header)
}

/// The format of the image at `path`: qcow2 by its magic, else raw.
pub(crate) fn format_of(path: &Path) -> Format {
    match qcow2_header(path) {
        Some(_) => Format::Qcow2,
        None => Format::Raw,
    }
}

/// The size a guest sees of the image at `path` in `format`: a raw file's length, a qcow2
/// header's size. `None` for anything else (a block device, a file that cannot be read).
pub(crate) fn image_size(path: &Path, format: Format) -> Option<u64> {
    match format {
        Format::Raw => std::fs::metadata(path)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len()),
        Format::Qcow2 => {
            let header = qcow2_header(path)?;
            Some(u64::from_be_bytes(header[24..32].try_into().ok()?))
        }
    }
}
