//! The guest's file systems and disks: `guest-get-fsinfo`, `guest-get-disks`, `guest-fstrim`.

use serde::Deserialize;

use qhotplug_qmp::command;

command!(
    /// `guest-get-fsinfo`: the guest's mounted file systems (those on a device: not `proc`,
    /// `sysfs`, `tmpfs` or bind mounts) with the disks under each.
    "guest-get-fsinfo", GuestGetFsinfo, Vec<FilesystemInfo>
);
command!(
    /// `guest-get-disks`: the guest's disks and partitions, with each one's address on the host's
    /// side where the guest can tell it (agent 5.2 and later).
    "guest-get-disks", GuestGetDisks, Vec<DiskInfo>
);
command!(
    /// `guest-fstrim`: discards the unused blocks of every mounted file system that can, the
    /// image under it shrinking where QEMU passes discards on. What each file system did is in
    /// the reply; one that cannot trim is an error there, not of the command.
    "guest-fstrim", GuestFstrim {
        /// Skip free ranges smaller than this many bytes (`None`: the guest's default).
        #[serde(skip_serializing_if = "Option::is_none")]
        minimum: Option<u64>,
    } -> TrimResponse
);

/// One file system of `guest-get-fsinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FilesystemInfo {
    /// The device's name in the guest (`vda1`).
    pub name: String,
    /// Where it is mounted.
    pub mountpoint: String,
    /// Its type (`ext4`).
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Bytes in use (agent 3.0 and later).
    pub used_bytes: Option<u64>,
    /// Bytes in all (agent 3.0 and later).
    pub total_bytes: Option<u64>,
    /// The disks it is on.
    #[serde(default)]
    pub disk: Vec<DiskAddress>,
}

/// One disk or partition of `guest-get-disks`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskInfo {
    /// Its device path in the guest (`/dev/vda`).
    pub name: String,
    /// A partition, not a whole disk.
    pub partition: bool,
    /// What it is made of (a partition's disk, a device-mapper target's devices).
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// Where it sits on the host's side.
    pub address: Option<DiskAddress>,
    /// Another name the guest gives it.
    pub alias: Option<String>,
}

/// Where a guest's disk sits, as the guest sees its controller.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskAddress {
    /// The controller's PCI address.
    pub pci_controller: PciAddress,
    /// The bus type: `virtio`, `scsi`, `ide`, `sata`, `usb`… (QEMU's `GuestDiskBusType`).
    pub bus_type: String,
    /// The bus on the controller.
    pub bus: i64,
    /// The target on the bus.
    pub target: i64,
    /// The unit (LUN).
    pub unit: i64,
    /// The disk's serial number, if it has one.
    pub serial: Option<String>,
    /// Its device node (`/dev/vda`).
    pub dev: Option<String>,
}

/// A PCI address as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct PciAddress {
    /// The domain.
    pub domain: i64,
    /// The bus.
    pub bus: i64,
    /// The slot.
    pub slot: i64,
    /// The function.
    pub function: i64,
}

/// `guest-fstrim`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TrimResponse {
    /// One per mounted file system.
    pub paths: Vec<TrimResult>,
}

/// What `guest-fstrim` did on one file system.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TrimResult {
    /// The mount point.
    pub path: String,
    /// Bytes discarded (the kernel's count: what it asked the device to discard).
    pub trimmed: Option<u64>,
    /// The minimum range size used.
    pub minimum: Option<u64>,
    /// Why this one could not be trimmed (a file system without discard, a device that refuses).
    pub error: Option<String>,
}
