//! Device commands: `device_add`/`device_del`, network backends and the fds they take over,
//! a NIC's link, and `query-pci`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Command, Empty};

command!(
    /// `query-pci`: every PCI bus and the devices on it.
    "query-pci", QueryPci, Vec<PciInfo>
);

command!(
    /// `device_del`: asks the guest to release a device; `DEVICE_DELETED` says when it is gone.
    "device_del", DeviceDel {
        /// The device's id or QOM path.
        id: String,
    } -> Empty
);

command!(
    /// `netdev_del`: removes a network backend.
    "netdev_del", NetdevDel {
        /// The netdev's id.
        id: String,
    } -> Empty
);

command!(
    /// `getfd`: names the fd sent with this command (SCM_RIGHTS), on this connection only. Send it
    /// with [`Client::getfd`](crate::Client::getfd).
    "getfd", Getfd {
        /// The name; it must not start with a digit.
        fdname: String,
    } -> Empty
);

command!(
    /// `closefd`: closes an fd named with `getfd` on this connection.
    "closefd", Closefd {
        /// The name given to `getfd`.
        fdname: String,
    } -> Empty
);

command!(
    /// `set_link`: takes a NIC's link up or down (the guest sees its carrier follow). `name` is
    /// the NIC's id (or its netdev's).
    "set_link", SetLink {
        /// The NIC's id.
        name: String,
        /// Up or down.
        up: bool,
    } -> Empty
);

/// `device_add`: creates a device. Its properties are free-form (QAPI does not type them), so they
/// travel as typed JSON in `props`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceAdd {
    /// The device model, for example `virtio-blk-pci`.
    pub driver: String,
    /// The device id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The bus to plug into, for example `pci.0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// Every other property (`addr`, `drive`, `netdev`, `mac`, …).
    #[serde(flatten)]
    pub props: Map<String, Value>,
}

impl Command for DeviceAdd {
    const NAME: &'static str = "device_add";
    type Returns = Empty;
}

/// `netdev_add`: creates a network backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetdevAdd {
    /// The backend type, for example `tap`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The netdev id.
    pub id: String,
    /// The type's options (`fds`, `vhost`, `vhostfds`, …), as typed JSON.
    #[serde(flatten)]
    pub props: Map<String, Value>,
}

impl Command for NetdevAdd {
    const NAME: &'static str = "netdev_add";
    type Returns = Empty;
}

/// One PCI bus in `query-pci`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct PciInfo {
    /// The bus number.
    pub bus: i64,
    /// The devices on it.
    pub devices: Vec<PciDeviceInfo>,
}

/// One PCI device in `query-pci`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct PciDeviceInfo {
    /// The bus number.
    pub bus: i64,
    /// The slot (0–31).
    pub slot: i64,
    /// The function (0–7).
    pub function: i64,
    /// The device class.
    pub class_info: PciDeviceClass,
    /// Vendor and device ids.
    pub id: PciDeviceId,
    /// The device's qdev id: the `id` it was created with (empty when it has none).
    pub qdev_id: String,
    /// For a bridge: its secondary bus and the devices behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bridge: Option<PciBridgeInfo>,
}

/// A PCI device's class.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct PciDeviceClass {
    /// A description, for example `SCSI controller`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    /// The class code.
    pub class: i64,
}

/// A PCI device's ids.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct PciDeviceId {
    /// Vendor id.
    pub vendor: i64,
    /// Device id.
    pub device: i64,
}

/// A PCI bridge in `query-pci`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct PciBridgeInfo {
    /// The bus numbers behind the bridge.
    pub bus: PciBusInfo,
    /// The devices behind the bridge.
    #[serde(default)]
    pub devices: Vec<PciDeviceInfo>,
}

/// The bus numbers of a bridge.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct PciBusInfo {
    /// Primary bus number.
    pub number: i64,
    /// Secondary bus number.
    pub secondary: i64,
    /// Subordinate bus number.
    pub subordinate: i64,
}
