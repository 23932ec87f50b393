//! Typed commands: each is a serde struct whose fields are the command's arguments, tied to the type
//! its reply deserializes into. For anything not listed, use
//! [`Client::execute_raw`](crate::Client::execute_raw).
//!
//! Optional arguments are `Option`s that are left out of the request when `None`.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::message::VersionInfo;

/// A QMP command: its arguments (the value itself), its name, and what it returns.
pub trait Command: Serialize {
    /// The command's QMP name, for example `query-status`.
    const NAME: &'static str;
    /// The type of the command's `return` value.
    type Returns: DeserializeOwned;
}

/// The `{}` that commands without a return value return.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Empty {}

macro_rules! command {
    ($(#[$doc:meta])* $name:literal, $ty:ident, $ret:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct $ty;

        impl Command for $ty {
            const NAME: &'static str = $name;
            type Returns = $ret;
        }
    };
    ($(#[$doc:meta])* $name:literal, $ty:ident { $($(#[$fdoc:meta])* $field:ident : $fty:ty),* $(,)? } -> $ret:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(rename_all = "kebab-case")]
        pub struct $ty {
            $($(#[$fdoc])* pub $field: $fty,)*
        }

        impl Command for $ty {
            const NAME: &'static str = $name;
            type Returns = $ret;
        }
    };
}

/// `qmp_capabilities`: leaves capabilities negotiation mode. The handshake sends it for you.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QmpCapabilities {
    /// Capabilities to enable, for example `["oob"]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub enable: Vec<String>,
}

impl Command for QmpCapabilities {
    const NAME: &'static str = "qmp_capabilities";
    type Returns = Empty;
}

command!(
    /// `query-commands`: the commands this QEMU knows.
    "query-commands", QueryCommands, Vec<CommandInfo>
);
command!(
    /// `query-status`: whether the VM runs, and its run state.
    "query-status", QueryStatus, StatusInfo
);
command!(
    /// `query-version`: QEMU's version.
    "query-version", QueryVersion, VersionInfo
);
command!(
    /// `query-pci`: every PCI bus and the devices on it.
    "query-pci", QueryPci, Vec<PciInfo>
);
command!(
    /// `query-block`: the block devices (with a drive or a `BlockBackend`).
    "query-block", QueryBlock, Vec<BlockInfo>
);
command!(
    /// `query-fdsets`: the fd sets made with `add-fd`, global to the VM.
    "query-fdsets", QueryFdsets, Vec<FdsetInfo>
);
command!(
    /// `stop`: pauses the VM.
    "stop", Stop, Empty
);
command!(
    /// `cont`: resumes the VM (or starts one launched with `-S`).
    "cont", Cont, Empty
);
command!(
    /// `system_reset`: resets the VM.
    "system_reset", SystemReset, Empty
);
command!(
    /// `quit`: QEMU exits at once.
    "quit", Quit, Empty
);

command!(
    /// `query-named-block-nodes`: every block node with a node name.
    "query-named-block-nodes", QueryNamedBlockNodes {
        /// Leave out the backing chain of each node (QEMU 5.0+).
        #[serde(skip_serializing_if = "Option::is_none")]
        flat: Option<bool>,
    } -> Vec<BlockDeviceInfo>
);
command!(
    /// `qom-list`: the properties (and children) of a QOM object.
    "qom-list", QomList {
        /// The object's path, for example `/machine/peripheral`.
        path: String,
    } -> Vec<ObjectPropertyInfo>
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
    /// `blockdev-del`: removes a block node that nothing uses any more.
    "blockdev-del", BlockdevDel {
        /// The node's name.
        node_name: String,
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
    /// `add-fd`: adds the fd sent with this command to an fd set (global to the VM). Send it with
    /// [`Client::add_fd`](crate::Client::add_fd).
    "add-fd", AddFd {
        /// The set to add to; QEMU picks a free one when `None`.
        #[serde(skip_serializing_if = "Option::is_none")]
        fdset_id: Option<i64>,
        /// A free-form tag, shown by `query-fdsets`.
        #[serde(skip_serializing_if = "Option::is_none")]
        opaque: Option<String>,
    } -> AddFdInfo
);
command!(
    /// `remove-fd`: removes one fd, or a whole set, from the fd sets. QEMU keeps its own dups.
    "remove-fd", RemoveFd {
        /// The set.
        fdset_id: i64,
        /// One fd of the set (QEMU's number); the whole set when `None`.
        #[serde(skip_serializing_if = "Option::is_none")]
        fd: Option<i64>,
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
command!(
    /// `block_resize`: grows (or shrinks) a block node to `size` bytes; the guest's device
    /// follows (virtio-blk announces the new capacity).
    "block_resize", BlockResize {
        /// The node to resize (the format node, for a disk).
        #[serde(skip_serializing_if = "Option::is_none")]
        node_name: Option<String>,
        /// The new size, in bytes.
        size: i64,
    } -> Empty
);
/// A disk's I/O limits (QAPI `BlockIOThrottle` without the device): bytes and operations per
/// second, in total or for reads and writes apart, with optional bursts, and an optional group
/// whose disks share one budget. 0 is no limit. `IoLimits::default()` is none at all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IoLimits {
    /// Bytes per second, reads and writes together.
    pub bps: u64,
    /// Bytes per second read.
    pub bps_rd: u64,
    /// Bytes per second written.
    pub bps_wr: u64,
    /// Operations per second, reads and writes together.
    pub iops: u64,
    /// Read operations per second.
    pub iops_rd: u64,
    /// Write operations per second.
    pub iops_wr: u64,
    /// Burst for `bps`, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_max: Option<u64>,
    /// Burst for `bps_rd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_rd_max: Option<u64>,
    /// Burst for `bps_wr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_wr_max: Option<u64>,
    /// Burst for `iops`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_max: Option<u64>,
    /// Burst for `iops_rd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_rd_max: Option<u64>,
    /// Burst for `iops_wr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_wr_max: Option<u64>,
    /// The throttle group: disks in one group share its limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// QEMU's largest limit (`THROTTLE_VALUE_MAX`).
const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

impl IoLimits {
    /// True when nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        [
            self.bps,
            self.bps_rd,
            self.bps_wr,
            self.iops,
            self.iops_rd,
            self.iops_wr,
        ]
        .iter()
        .all(|v| *v == 0)
    }

    /// Checks what QEMU would refuse, so it can be refused before anything is sent: a total
    /// together with its read or write limit, a burst without its base or below it, a value past
    /// QEMU's maximum.
    pub fn check(&self) -> Result<(), String> {
        if self.bps > 0 && (self.bps_rd > 0 || self.bps_wr > 0) {
            return Err("bps and bps_rd/bps_wr cannot both be set".into());
        }
        if self.iops > 0 && (self.iops_rd > 0 || self.iops_wr > 0) {
            return Err("iops and iops_rd/iops_wr cannot both be set".into());
        }
        let pairs = [
            ("bps", self.bps, self.bps_max),
            ("bps_rd", self.bps_rd, self.bps_rd_max),
            ("bps_wr", self.bps_wr, self.bps_wr_max),
            ("iops", self.iops, self.iops_max),
            ("iops_rd", self.iops_rd, self.iops_rd_max),
            ("iops_wr", self.iops_wr, self.iops_wr_max),
        ];
        for (name, base, max) in pairs {
            if base > THROTTLE_VALUE_MAX || max.is_some_and(|m| m > THROTTLE_VALUE_MAX) {
                return Err(format!(
                    "{name} is over QEMU's limit of {THROTTLE_VALUE_MAX}"
                ));
            }
            match max {
                Some(m) if base == 0 => return Err(format!("{name}_max ({m}) needs {name}")),
                Some(m) if m < base => {
                    return Err(format!("{name}_max ({m}) is below {name} ({base})"))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// `block_set_io_throttle`: sets (or, with all zero, clears) the I/O limits of the device `id`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockSetIoThrottle {
    /// The device's id.
    pub id: String,
    /// The limits.
    #[serde(flatten)]
    pub limits: IoLimits,
}

impl Command for BlockSetIoThrottle {
    const NAME: &'static str = "block_set_io_throttle";
    type Returns = Empty;
}

command!(
    /// `set_password`: sets a display's password (`protocol` `vnc` or `spice`).
    "set_password", SetPassword {
        /// `vnc` or `spice`.
        protocol: String,
        /// The password.
        password: String,
    } -> Empty
);
command!(
    /// `query-vnc`: the VNC server's state.
    "query-vnc", QueryVnc, VncInfo
);
command!(
    /// `query-chardev`: every character device, with what it is connected to.
    "query-chardev", QueryChardev, Vec<ChardevInfo>
);

/// `query-vnc`'s reply (only what the SDK reads; unknown members are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct VncInfo {
    /// True when a VNC server runs.
    pub enabled: bool,
    /// The address it listens on (`unix` for a Unix socket's family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The port (or the socket's path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// How clients authenticate, for example `none` or `vnc` (a password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}

/// One character device in `query-chardev`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ChardevInfo {
    /// Its id.
    pub label: String,
    /// What it is connected to, for example `pty:/dev/pts/3` or `file`.
    pub filename: String,
    /// True when its frontend (a serial port, a monitor) has it open.
    #[serde(rename = "frontend-open", default)]
    pub frontend_open: bool,
}

command!(
    /// `human-monitor-command`: runs an HMP command and returns its output. A last resort.
    "human-monitor-command", HumanMonitorCommand {
        /// The HMP command line, for example `info network`.
        command_line: String,
        /// The CPU to run it on.
        #[serde(skip_serializing_if = "Option::is_none")]
        cpu_index: Option<i64>,
    } -> String
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

/// `blockdev-add`: creates a block node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockdevAdd {
    /// The block driver, for example `file`, `host_device`, `raw` or `qcow2`.
    pub driver: String,
    /// The node name.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The driver's options (`filename`, `file`, `read-only`, `cache`, …).
    #[serde(flatten)]
    pub props: Map<String, Value>,
}

impl Command for BlockdevAdd {
    const NAME: &'static str = "blockdev-add";
    type Returns = Empty;
}

/// One entry of `query-commands`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct CommandInfo {
    /// The command's name.
    pub name: String,
}

/// The reply to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct StatusInfo {
    /// True when the guest's CPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

/// QEMU's run states (`RunState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
#[allow(missing_docs)]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    /// A state this version of the SDK does not know.
    #[serde(other)]
    Unknown,
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

/// One block device in `query-block`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct BlockInfo {
    /// The device name (empty for `-blockdev`/`blockdev-add` backends).
    pub device: String,
    /// The qdev id or QOM path of the device it is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdev: Option<String>,
    /// The medium, when one is inserted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inserted: Option<BlockDeviceInfo>,
}

/// A block node, in `query-block` and `query-named-block-nodes`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct BlockDeviceInfo {
    /// The file name (may be `/dev/fdset/N` or a `json:` description).
    pub file: String,
    /// The node name.
    #[serde(rename = "node-name", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// True when read-only.
    pub ro: bool,
    /// The driver, for example `raw`.
    pub drv: String,
    /// The I/O limits of the device on this node, in `query-block` (all zero when none).
    #[serde(flatten, default)]
    pub limits: IoLimits,
    /// What the node's image is, when QEMU says (its virtual size, among others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
}

/// A node's image, in `BlockDeviceInfo` (QAPI `ImageInfo`; only what the SDK reads).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ImageInfo {
    /// The size the guest sees, in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: i64,
}

/// One fd set in `query-fdsets`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FdsetInfo {
    /// The set's id.
    #[serde(rename = "fdset-id")]
    pub fdset_id: i64,
    /// The fds in it.
    pub fds: Vec<FdsetFdInfo>,
}

/// One fd in an fd set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FdsetFdInfo {
    /// QEMU's fd number.
    pub fd: i64,
    /// The tag given to `add-fd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opaque: Option<String>,
}

/// The reply to `add-fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct AddFdInfo {
    /// The set the fd went into.
    #[serde(rename = "fdset-id")]
    pub fdset_id: i64,
    /// QEMU's number for the fd.
    pub fd: i64,
}

/// One property in `qom-list`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ObjectPropertyInfo {
    /// The property's name (for a child, the child's name).
    pub name: String,
    /// The property's type, for example `child<virtio-blk-pci>`.
    #[serde(rename = "type")]
    pub kind: String,
}

impl ObjectPropertyInfo {
    /// For a `child<T>` property, `T`.
    pub fn child_type(&self) -> Option<&str> {
        self.kind.strip_prefix("child<")?.strip_suffix('>')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{encode_request, Execution};

    fn wire<C: Command>(c: &C) -> String {
        let mut out = Vec::new();
        encode_request(&mut out, C::NAME, c, Execution::InBand).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn optional_arguments_are_left_out() {
        assert_eq!(
            wire(&AddFd {
                fdset_id: None,
                opaque: None
            }),
            "{\"execute\":\"add-fd\"}\r\n"
        );
        assert_eq!(
            wire(&RemoveFd {
                fdset_id: 3,
                fd: None
            }),
            "{\"execute\":\"remove-fd\",\"arguments\":{\"fdset-id\":3}}\r\n"
        );
        assert_eq!(
            wire(&QmpCapabilities::default()),
            "{\"execute\":\"qmp_capabilities\"}\r\n"
        );
        assert_eq!(
            wire(&BlockdevDel {
                node_name: "n".into()
            }),
            "{\"execute\":\"blockdev-del\",\"arguments\":{\"node-name\":\"n\"}}\r\n"
        );
    }

    #[test]
    fn device_add_flattens_props() {
        let mut props = Map::new();
        props.insert("addr".into(), "0x9".into());
        let d = DeviceAdd {
            driver: "virtio-blk-pci".into(),
            id: Some("disk-1".into()),
            bus: None,
            props,
        };
        assert_eq!(
            wire(&d),
            "{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"virtio-blk-pci\",\"id\":\"disk-1\",\"addr\":\"0x9\"}}\r\n"
        );
    }

    #[test]
    fn unknown_run_state_is_kept_apart() {
        let s: StatusInfo = serde_json::from_str(
            r#"{"running": false, "status": "brand-new", "singlestep": false}"#,
        )
        .unwrap();
        assert_eq!(s.status, RunState::Unknown);
        let s: StatusInfo =
            serde_json::from_str(r#"{"running": false, "status": "prelaunch"}"#).unwrap();
        assert_eq!(s.status, RunState::Prelaunch);
    }
}
