//! virtio-serial: a `virtio-serial-pci` controller (a PCI slot, no backend) and named ports on it
//! (`chardev-add` of a socket QEMU listens on → `device_add virtserialport`; QEMU numbers the
//! port). Teardown of a port: `chardev-remove`.

use std::path::PathBuf;

use qhotplug_cmdline::{DeviceModel, Pci, SerialPort, VirtioSerial};

use super::{Backend, Place, Placed, Plan, Plug, Want};
use crate::error::Result;
use crate::qemu::delete::Delete;

/// A `virtio-serial-pci` controller to hot-add.
#[derive(Debug, Clone)]
pub struct VirtioSerialConfig {
    id: String,
    at: Option<Pci>,
}

impl VirtioSerialConfig {
    /// A controller in a free PCI slot; its ports go on bus `<id>.0`.
    pub fn new(id: impl Into<String>) -> Self {
        VirtioSerialConfig {
            id: id.into(),
            at: None,
        }
    }

    /// At this PCI address instead of a free one.
    pub fn at_pci(mut self, pci: Pci) -> Self {
        self.at = Some(pci);
        self
    }
}

/// A named `virtserialport` to hot-add on a controller, on a socket QEMU listens on.
///
/// ```
/// let port = qhotplug::SerialPortConfig::new("agent", "vser0", "org.example.agent", "/run/vm1/agent.sock");
/// # let _ = port;
/// ```
#[derive(Debug, Clone)]
pub struct SerialPortConfig {
    id: String,
    controller: String,
    name: String,
    socket: PathBuf,
}

impl SerialPortConfig {
    /// Port `name` on controller `controller` (its id), with QEMU listening at `socket` for the
    /// host's side.
    pub fn new(
        id: impl Into<String>,
        controller: impl Into<String>,
        name: impl Into<String>,
        socket: impl Into<PathBuf>,
    ) -> Self {
        SerialPortConfig {
            id: id.into(),
            controller: controller.into(),
            name: name.into(),
            socket: socket.into(),
        }
    }

    /// The guest agent's port (named [`SerialPort::GUEST_AGENT`]) on controller `controller`,
    /// QEMU listening at `socket`; [`Vm::agent`](crate::Vm::agent) drives the agent through it.
    pub fn guest_agent(
        id: impl Into<String>,
        controller: impl Into<String>,
        socket: impl Into<PathBuf>,
    ) -> Self {
        Self::new(id, controller, SerialPort::GUEST_AGENT, socket)
    }

    /// The controller's id.
    pub(crate) fn controller(&self) -> &str {
        &self.controller
    }
}

impl Plug for VirtioSerialConfig {
    type Added = VirtioSerial;
    const OPERATION: &'static str = "virtio-serial hotplug";
    const COMMANDS: &'static [&'static str] = &["device_add", "device_del"];

    fn id(&self) -> &str {
        &self.id
    }

    fn want(&self) -> Result<Want> {
        Ok(Want::Pci(self.at.clone()))
    }

    fn plan(self, place: Place) -> Result<Plan<VirtioSerial>> {
        let pci = place.pci(&self.id)?;
        qhotplug_cmdline::validate_id(&self.id)?;
        let controller = VirtioSerial { id: self.id, pci };
        Ok(Plan {
            backends: Vec::new(),
            device: controller.device_add(),
            after: Vec::new(),
            added: controller,
        })
    }
}

impl Plug for SerialPortConfig {
    type Added = SerialPort;
    const OPERATION: &'static str = "serial port hotplug";
    const COMMANDS: &'static [&'static str] =
        &["chardev-add", "chardev-remove", "device_add", "device_del"];

    fn id(&self) -> &str {
        &self.id
    }

    fn want(&self) -> Result<Want> {
        Ok(Want::Fixed)
    }

    fn plan(self, _place: Place) -> Result<Plan<SerialPort>> {
        let port = SerialPort {
            id: self.id,
            bus: qhotplug_cmdline::names::controller_bus(&self.controller),
            name: self.name,
            socket: self.socket,
        };
        port.check()?;
        Ok(Plan {
            backends: vec![Backend::Chardev(port.chardev().chardev_add())],
            device: port.device_add(),
            after: Vec::new(),
            added: port,
        })
    }
}

impl Placed for VirtioSerial {
    type Config = VirtioSerialConfig;

    fn place(&self) -> Place {
        Place::Pci(self.pci.clone())
    }
}

impl Placed for SerialPort {
    type Config = SerialPortConfig;

    fn place(&self) -> Place {
        Place::Fixed
    }

    /// Its chardev.
    fn teardown(&self) -> Vec<Delete> {
        vec![Delete::Chardev(self.chardev().id)]
    }
}
