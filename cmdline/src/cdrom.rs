//! CD-ROM drives: `scsi-cd` on a virtio-scsi controller (hot-pluggable) and `ide-cd` on the
//! machine's IDE controller (boot only), each empty or holding an ISO image: a file on the host,
//! or an export QEMU reads over the network (NBD, iSCSI, RBD), read-only either way.
//!
//! A medium is two read-only block nodes, like a raw disk's, named by the drive's id and the
//! medium's generation ([`names::file_node_at`](crate::names::file_node_at)): a medium
//! change adds the new medium's nodes while the old ones still exist, so each medium a drive takes
//! gets the next number. So does a network medium's secret and TLS object
//! ([`names::secret_at`](crate::names::secret_at)).

use std::path::{Path, PathBuf};

use qhotplug_qmp::command::BlockdevAdd;

use crate::device::{render_kv, ScsiAddr};
use crate::error::{Error, Result};
use crate::machine::Machine;
use crate::model::DeviceModel;
use crate::names;
use crate::network_disk::NetworkSource;
use crate::value::blockdev;
use crate::value::{p, validate_id, Props};

/// What a CD-ROM drive holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Medium {
    /// An ISO image on the host, opened read-only by the SDK and handed over as an fd.
    Image(PathBuf),
    /// An export QEMU opens itself, read-only: an ISO library on NBD, iSCSI or Ceph RBD.
    Network(Box<NetworkSource>),
}

impl Medium {
    /// The image's path, if it is a host file.
    pub fn image_path(&self) -> Option<&Path> {
        match self {
            Medium::Image(path) => Some(path),
            Medium::Network(_) => None,
        }
    }

    /// Its network source, if it is one.
    pub fn network_source(&self) -> Option<&NetworkSource> {
        match self {
            Medium::Image(_) => None,
            Medium::Network(source) => Some(source),
        }
    }
}

impl From<PathBuf> for Medium {
    fn from(path: PathBuf) -> Self {
        Medium::Image(path)
    }
}

impl From<&Path> for Medium {
    fn from(path: &Path) -> Self {
        Medium::Image(path.to_owned())
    }
}

impl From<&PathBuf> for Medium {
    fn from(path: &PathBuf) -> Self {
        Medium::Image(path.clone())
    }
}

impl From<&str> for Medium {
    fn from(path: &str) -> Self {
        Medium::Image(path.into())
    }
}

impl From<NetworkSource> for Medium {
    fn from(source: NetworkSource) -> Self {
        Medium::Network(Box::new(source))
    }
}

/// A place on the machine's built-in IDE controller: on `pc`, `ide.0` and `ide.1` with units 0
/// and 1; on `q35` (AHCI), `ide.0` to `ide.5` with unit 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct IdeAddr {
    /// The bus, `ide.N`.
    pub bus: String,
    /// The unit on it (master 0, slave 1).
    pub unit: u8,
}

impl IdeAddr {
    /// Unit `unit` of bus `ide.<bus>`.
    pub fn new(bus: u8, unit: u8) -> Self {
        IdeAddr {
            bus: format!("ide.{bus}"),
            unit,
        }
    }

    /// Checks the address against `machine`'s controller.
    pub fn check(&self, machine: Machine) -> Result<()> {
        let (buses, units) = match machine {
            Machine::Pc => (2, 2),
            Machine::Q35 => (6, 1),
        };
        let bus = self
            .bus
            .strip_prefix("ide.")
            .and_then(|n| n.parse::<u8>().ok());
        match bus {
            Some(n) if n < buses && self.unit < units => Ok(()),
            _ => Err(Error::InvalidSpec(format!(
                "IDE {} unit {} does not exist on {machine:?} (buses ide.0 to ide.{}, units 0 to {})",
                self.bus,
                self.unit,
                buses - 1,
                units - 1
            ))),
        }
    }
}

/// Where a CD-ROM drive sits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CdromBus {
    /// `scsi-cd` on a virtio-scsi controller: hot-pluggable.
    Scsi(ScsiAddr),
    /// `ide-cd` on the machine's IDE controller: present from boot (IDE has no hotplug), its
    /// medium changeable like any drive's.
    Ide(IdeAddr),
}

/// A CD-ROM drive, empty or holding an ISO image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cdrom {
    /// The device id.
    pub id: String,
    /// Where it sits.
    pub bus: CdromBus,
    /// The medium in the drive (read-only), or `None` for an empty drive.
    pub medium: Option<Medium>,
    /// The number of the medium in the drive (or of the last one), which its block nodes are
    /// named by; a medium change takes the next.
    pub generation: u32,
    /// The firmware boots from it first (`bootindex=0`): a CD-ROM root, when the boot image is an
    /// ISO.
    pub boot: bool,
}

impl Cdrom {
    /// An empty `scsi-cd` drive at `addr`.
    pub fn scsi(id: impl Into<String>, addr: ScsiAddr) -> Cdrom {
        Cdrom {
            id: id.into(),
            bus: CdromBus::Scsi(addr),
            medium: None,
            generation: 0,
            boot: false,
        }
    }

    /// An empty `ide-cd` drive at `addr`.
    pub fn ide(id: impl Into<String>, addr: IdeAddr) -> Cdrom {
        Cdrom {
            id: id.into(),
            bus: CdromBus::Ide(addr),
            medium: None,
            generation: 0,
            boot: false,
        }
    }

    /// The same drive holding `medium`: an image's path, or a [`NetworkSource`].
    pub fn with_medium(mut self, medium: impl Into<Medium>) -> Cdrom {
        self.medium = Some(medium.into());
        self
    }

    /// The medium's network source, if it is on the network.
    pub fn network_source(&self) -> Option<&NetworkSource> {
        self.medium.as_ref().and_then(Medium::network_source)
    }

    /// The name of the medium's `secret` object (there is one when its network source has a
    /// secret).
    pub fn secret_id(&self) -> String {
        names::secret_at(&self.id, self.generation)
    }

    /// The medium's protocol node.
    pub fn file_node(&self) -> String {
        names::file_node_at(&self.id, self.generation)
    }

    /// The medium's format node (what the device's `drive` names when it holds one).
    pub fn top_node(&self) -> String {
        names::format_node_at(&self.id, self.generation)
    }

    /// The medium's nodes: a read-only protocol node (a `file` node on `filename`, the path at boot
    /// and `/dev/fdset/N` at hotplug; or the network export), then a read-only `raw` node on it.
    /// Empty for an empty drive.
    pub fn medium_props(&self, filename: &str) -> Vec<Props> {
        let Some(medium) = &self.medium else {
            return Vec::new();
        };
        let mut protocol = match medium {
            Medium::Image(_) => vec![p("driver", "file"), p("filename", filename)],
            Medium::Network(source) => source.props(&self.id, self.generation),
        };
        protocol.insert(1, p("node-name", self.file_node()));
        protocol.push(p("read-only", true));
        vec![
            protocol,
            vec![
                p("driver", "raw"),
                p("node-name", self.top_node()),
                p("file", self.file_node()),
                p("read-only", true),
            ],
        ]
    }

    /// The medium's `tls-creds-x509` object, if it is on the network over TLS.
    pub fn tls_object(&self) -> Option<crate::value::QomObject> {
        self.network_source()?.tls_object(&self.id, self.generation)
    }

    /// Launch arguments: a network medium's TLS object, the medium's `-blockdev`s, then
    /// `-device`. A network medium's secret is the launcher's to give (it needs the VM's master
    /// key).
    pub fn args(&self) -> Vec<String> {
        let filename = self
            .medium
            .as_ref()
            .and_then(Medium::image_path)
            .map(|m| m.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut args = self
            .tls_object()
            .map(|tls| tls.args().to_vec())
            .unwrap_or_default();
        for node in self.medium_props(&filename) {
            args.extend(["-blockdev".to_owned(), render_kv(&node)]);
        }
        args.extend(["-device".to_owned(), self.device_arg()]);
        args
    }

    /// `blockdev-add` arguments for the medium's nodes (none for an empty drive).
    pub fn blockdev_add(&self, filename: &str) -> Vec<BlockdevAdd> {
        self.medium_props(filename)
            .iter()
            .map(|n| blockdev(n))
            .collect()
    }
}

impl DeviceModel for Cdrom {
    fn id(&self) -> &str {
        &self.id
    }

    /// The device model.
    fn driver(&self) -> &str {
        match self.bus {
            CdromBus::Scsi(_) => "scsi-cd",
            CdromBus::Ide(_) => "ide-cd",
        }
    }

    /// Checks the id and the node names of this and the next medium. The address is checked by
    /// [`VmSpec::validate`](crate::VmSpec::validate), which knows the machine.
    fn check(&self) -> Result<()> {
        validate_id(&self.id)?;
        let next = names::file_node_at(&self.id, self.generation.wrapping_add(1));
        if self.file_node().len() > 31 || next.len() > 31 {
            return Err(Error::InvalidId {
                id: self.id.clone(),
                reason: "too long for the block node names of its media",
            });
        }
        Ok(())
    }

    /// Every device property: placement, `drive` when it holds a medium, `bootindex`.
    fn device_props(&self) -> Props {
        let mut props = vec![p("id", self.id.clone())];
        match &self.bus {
            CdromBus::Scsi(addr) => props.extend(addr.props()),
            CdromBus::Ide(addr) => {
                props.push(p("bus", addr.bus.clone()));
                props.push(p("unit", i64::from(addr.unit)));
            }
        }
        if self.medium.is_some() {
            props.push(p("drive", self.top_node()));
        }
        if self.boot {
            props.push(p("bootindex", 0i64));
        }
        props
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::parse;

    fn scsi() -> ScsiAddr {
        ScsiAddr {
            bus: "scsi0.0".into(),
            channel: 0,
            scsi_id: 2,
            lun: 0,
        }
    }

    #[test]
    fn an_empty_drive_has_no_nodes_and_no_drive() {
        let cd = Cdrom::scsi("cd0", scsi());
        assert_eq!(
            cd.args(),
            [
                "-device",
                "scsi-cd,id=cd0,bus=scsi0.0,channel=0,scsi-id=2,lun=0"
            ]
        );
        assert!(cd.blockdev_add("/dev/fdset/1").is_empty());
    }

    #[test]
    fn a_loaded_ide_root_renders_read_only_nodes_and_bootindex() {
        let mut cd = Cdrom::ide("root", IdeAddr::new(1, 0)).with_medium("/isos/a,b.iso");
        cd.boot = true;
        cd.generation = 2;
        let args = cd.args();
        assert_eq!(
            args[1],
            "driver=file,node-name=root-file.2,filename=/isos/a,,b.iso,read-only=on"
        );
        assert_eq!(
            args[3],
            "driver=raw,node-name=root-fmt.2,file=root-file.2,read-only=on"
        );
        assert_eq!(
            args[5],
            "ide-cd,id=root,bus=ide.1,unit=0,drive=root-fmt.2,bootindex=0"
        );
        // The same values over QMP.
        let (_, pairs) = parse(&args[5]);
        let qmp = serde_json::to_value(cd.device_add()).unwrap();
        for (k, v) in pairs {
            let q = &qmp[&k];
            let q = q
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| q.to_string());
            assert_eq!(q, v, "{k}");
        }
        assert_eq!(
            serde_json::to_value(&cd.blockdev_add("/dev/fdset/7")[0]).unwrap(),
            serde_json::json!({"driver": "file", "node-name": "root-file.2",
                               "filename": "/dev/fdset/7", "read-only": true})
        );
    }

    #[test]
    fn ide_addresses_follow_the_machine() {
        assert!(IdeAddr::new(1, 1).check(Machine::Pc).is_ok());
        assert!(IdeAddr::new(2, 0).check(Machine::Pc).is_err());
        assert!(IdeAddr::new(5, 0).check(Machine::Q35).is_ok());
        assert!(IdeAddr::new(0, 1).check(Machine::Q35).is_err());
    }

    #[test]
    fn ids_too_long_for_their_media_nodes_are_refused() {
        let cd = Cdrom::scsi("c".repeat(25), scsi());
        assert!(cd.check().is_err());
        assert!(Cdrom::scsi("c".repeat(24), scsi()).check().is_ok());
    }
}
