//! [`DeviceKind`], and the one list of the kinds the SDK plugs that every dispatch over them is
//! generated from (`kinds!`). A leaf: it imports no module of the crate, so errors can name a
//! kind.

/// Calls macro `$then` with the one list of kinds: per kind, its docs, its variant, its placed
/// type (a cmdline model), its `VmSpec` field, and its name in errors. A new kind is one line
/// here.
macro_rules! kinds {
    ($then:ident) => {
        $then! {
        /// A disk: `virtio-blk-pci`, `scsi-hd` or `scsi-generic`.
        Disk(qhotplug_cmdline::Disk) in disks, "disk";
        /// A `virtio-net-pci` NIC.
        Nic(qhotplug_cmdline::Nic) in nics, "NIC";
        /// A CD-ROM drive.
        Cdrom(qhotplug_cmdline::Cdrom) in cdroms, "CD-ROM";
        /// A vCPU.
        Vcpu(qhotplug_cmdline::Vcpu) in vcpus, "vCPU";
        /// A memory device: a DIMM or a virtio-mem device.
        Memory(qhotplug_cmdline::MemoryDevice) in memory_devices, "memory device";
        /// The balloon.
        Balloon(qhotplug_cmdline::Balloon) in balloon, "balloon";
        /// A vhost-user disk.
        VhostUserBlk(qhotplug_cmdline::VhostUserBlk) in vhost_user_blks, "vhost-user disk";
        /// A virtio-fs share.
        VirtioFs(qhotplug_cmdline::VirtioFs) in virtio_fs, "virtio-fs share";
        /// A virtio-serial controller.
        VirtioSerial(qhotplug_cmdline::VirtioSerial) in virtio_serials, "virtio-serial controller";
        /// A serial port on a virtio-serial controller.
        SerialPort(qhotplug_cmdline::SerialPort) in serial_ports, "serial port";
        /// A virtio RNG.
        Rng(qhotplug_cmdline::Rng) in rngs, "RNG";
        }
    };
}
pub(crate) use kinds;

macro_rules! device_kind {
    ($($(#[$doc:meta])* $kind:ident($placed:ty) in $field:ident, $name:literal;)*) => {
        /// The kinds of device the SDK plugs, as errors name them
        /// ([`Error::NotFound`](crate::Error::NotFound)).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum DeviceKind {
            $($(#[$doc])* $kind,)*
        }

        impl DeviceKind {
            /// The kind's name in errors ("disk", "NIC").
            pub fn name(self) -> &'static str {
                match self {
                    $(DeviceKind::$kind => $name,)*
                }
            }
        }
    };
}

kinds!(device_kind);

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
