//! CD-ROM drives: a `scsi-cd` on a virtio-scsi controller, hot-plugged empty, with an ISO image
//! the SDK opens read-only and hands over as an fd, or with an ISO on the network that QEMU opens
//! itself. (An `ide-cd` is boot-only: IDE has no hotplug. Its medium changes like any drive's:
//! see [`Vm::change_medium`](crate::Vm::change_medium).)
//!
//! Hot-add, loaded: `add-fd` → `blockdev-add` (protocol node) → `blockdev-add` (raw node) →
//! `remove-fd` → `device_add`; from the network: its secret and TLS objects if it has them →
//! `blockdev-add` ×2 → `device_add`; empty: `device_add` alone. Teardown: the medium's nodes,
//! then its objects.

use qhotplug_cmdline::{Cdrom, CdromBus, DeviceModel, Medium, ScsiAddr};

use super::{Place, Placed, Plan, Plug, Want};
use crate::error::{Error, Result};
use crate::qemu::delete::Delete;

/// A `scsi-cd` drive to hot-add, empty or holding an ISO image (a host file, or a
/// [`NetworkSource`](qhotplug_cmdline::NetworkSource)).
///
/// ```
/// use qhotplug::{CdromConfig, Nbd, NbdServer, NetworkSource};
/// let cd = CdromConfig::new("cd-1").medium("/var/lib/isos/tools.iso");
/// let library = Nbd {
///     server: NbdServer::Unix("/run/isos.sock".into()),
///     export: Some("tools".into()),
///     reconnect_delay: None,
///     tls_dir: None,
/// };
/// let remote = CdromConfig::new("cd-2").medium(NetworkSource::from(library));
/// # let _ = (cd, remote);
/// ```
#[derive(Debug, Clone)]
pub struct CdromConfig {
    id: String,
    medium: Option<Medium>,
    at: Option<ScsiAddr>,
    scsi_bus: Option<String>,
}

impl CdromConfig {
    /// An empty drive on a free target of the VM's (first) virtio-scsi controller.
    pub fn new(id: impl Into<String>) -> Self {
        CdromConfig {
            id: id.into(),
            medium: None,
            at: None,
            scsi_bus: None,
        }
    }

    /// The drive holds `medium`: the image at a path (opened read-only by the SDK), or a
    /// network export QEMU opens read-only.
    pub fn medium(mut self, medium: impl Into<Medium>) -> Self {
        self.medium = Some(medium.into());
        self
    }

    /// The drive goes to this SCSI address instead of a free target.
    pub fn at_scsi(mut self, addr: ScsiAddr) -> Self {
        self.at = Some(addr);
        self
    }

    /// The drive goes to a free target of this controller bus (`<controller id>.0`).
    pub fn scsi_bus(mut self, bus: impl Into<String>) -> Self {
        self.scsi_bus = Some(bus.into());
        self
    }
}

impl Plug for CdromConfig {
    type Added = Cdrom;
    const OPERATION: &'static str = "CD-ROM hotplug";
    const COMMANDS: &'static [&'static str] = &[
        "add-fd",
        "remove-fd",
        "query-fdsets",
        "query-named-block-nodes",
        "blockdev-add",
        "blockdev-del",
        "device_add",
        "device_del",
    ];

    fn id(&self) -> &str {
        &self.id
    }

    fn block_driver(&self) -> Option<&'static str> {
        self.medium
            .as_ref()
            .and_then(Medium::network_source)
            .map(|source| source.driver())
    }

    fn want(&self) -> Result<Want> {
        Ok(Want::Scsi {
            at: self.at.clone(),
            bus: self.scsi_bus.clone(),
        })
    }

    fn plan(self, place: Place) -> Result<Plan<Cdrom>> {
        let Place::Scsi(addr) = place else {
            return Err(Error::AddressMismatch(self.id));
        };
        let mut cd = Cdrom::scsi(self.id, addr);
        cd.medium = self.medium;
        cd.check().map_err(Error::Spec)?;
        let backends = super::medium_backends(&cd)?;
        Ok(Plan {
            backends,
            device: cd.device_add(),
            after: Vec::new(),
            added: cd,
        })
    }
}

impl Placed for Cdrom {
    type Config = CdromConfig;

    fn place(&self) -> Place {
        match &self.bus {
            CdromBus::Scsi(addr) => Place::Scsi(addr.clone()),
            CdromBus::Ide(_) => Place::Fixed,
        }
    }

    /// Its medium, and what puts it back if the drive stays. A medium inserted by a change would
    /// otherwise keep its nodes in use after the device is gone, where nothing can delete them.
    fn before_unplug(&self) -> Option<(Delete, Vec<Delete>)> {
        self.medium.as_ref()?;
        let back = vec![
            Delete::Reinsert {
                device: self.id.clone(),
                node: self.top_node(),
            },
            Delete::CloseTray(self.id.clone()),
        ];
        Some((Delete::Medium(self.id.clone()), back))
    }

    /// Once the guest let the drive go, or once its medium is out: the medium's nodes, the top
    /// one first; then an ISO's fd set (no node opens it any more), or a network medium's
    /// objects.
    fn teardown(&self) -> Vec<Delete> {
        if self.medium.is_none() {
            return Vec::new();
        }
        let mut steps = vec![
            Delete::BlockNode(self.top_node()),
            Delete::BlockNode(self.file_node()),
        ];
        match self.network_source() {
            Some(source) => {
                let objects = source.object_ids(&self.id, self.generation);
                steps.extend(objects.into_iter().map(Delete::Object));
            }
            None => steps.push(Delete::UnusedFdsets(qhotplug_cmdline::names::fdset_tag(
                &self.id,
            ))),
        }
        steps
    }
}
