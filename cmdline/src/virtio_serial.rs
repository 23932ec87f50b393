//! virtio-serial: a `virtio-serial-pci` controller and named `virtserialport`s on it, each on a
//! socket QEMU listens on (`<id>-chr`), which the host's agent connects to. In the guest a port is
//! `/dev/vportNpM`, named in `/sys/class/virtio-ports/vportNpM/name` (udev links it as
//! `/dev/virtio-ports/<name>`).

use std::path::PathBuf;

use crate::chardev::SocketChardev;
use crate::device::Pci;
use crate::error::{Error, Result};
use crate::model::DeviceModel;
use crate::names;
use crate::value::{p, validate_id, Props};

/// A `virtio-serial-pci` controller; its ports go on bus `<id>.0`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioSerial {
    /// The device id.
    pub id: String,
    /// Where it sits.
    pub pci: Pci,
}

impl VirtioSerial {
    /// The bus its ports plug into.
    pub fn bus(&self) -> String {
        crate::names::controller_bus(&self.id)
    }

    /// Launch arguments.
    pub fn args(&self) -> Vec<String> {
        vec!["-device".into(), self.device_arg()]
    }
}

impl DeviceModel for VirtioSerial {
    fn id(&self) -> &str {
        &self.id
    }

    fn driver(&self) -> &str {
        "virtio-serial-pci"
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

/// A named `virtserialport` on a controller's bus, on a socket QEMU listens on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialPort {
    /// The device id.
    pub id: String,
    /// The controller's bus (`<controller id>.0`).
    pub bus: String,
    /// The port's name, for example `org.qemu.guest_agent.0`.
    pub name: String,
    /// The socket QEMU listens on for the host's side.
    pub socket: PathBuf,
}

impl SerialPort {
    /// The name the guest agent's port has (`qemu-ga`'s default, and what libvirt, Nova and
    /// KubeVirt give it): a port with this name is the VM's guest agent.
    pub const GUEST_AGENT: &'static str = "org.qemu.guest_agent.0";

    /// True when this is the guest agent's port (named [`SerialPort::GUEST_AGENT`]).
    pub fn is_guest_agent(&self) -> bool {
        self.name == Self::GUEST_AGENT
    }

    /// Its chardev (QEMU listens).
    pub fn chardev(&self) -> SocketChardev {
        SocketChardev {
            id: names::chardev(&self.id),
            path: self.socket.clone(),
            server: true,
        }
    }

    /// Launch arguments: `-chardev`, then `-device`.
    pub fn args(&self) -> Vec<String> {
        let mut args = self.chardev().args();
        args.extend(["-device".into(), self.device_arg()]);
        args
    }
}

impl DeviceModel for SerialPort {
    fn id(&self) -> &str {
        &self.id
    }

    fn driver(&self) -> &str {
        "virtserialport"
    }

    /// Checks the id and name.
    fn check(&self) -> Result<()> {
        validate_id(&self.id)?;
        if self.name.is_empty() || self.name.contains(',') {
            return Err(Error::InvalidSpec(format!(
                "{}: a port name is not empty and has no comma",
                self.id
            )));
        }
        Ok(())
    }

    /// Every device property.
    fn device_props(&self) -> Props {
        vec![
            p("id", self.id.clone()),
            p("bus", self.bus.clone()),
            p("chardev", names::chardev(&self.id)),
            p("name", self.name.clone()),
        ]
    }
}
