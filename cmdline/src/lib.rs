//! The device model shared by QEMU's command line and QMP hotplug, and a QEMU launcher.
//!
//! A [`Disk`] or [`Nic`] is one value. It renders as `-blockdev`/`-netdev`/`-device` arguments at
//! boot and as `blockdev-add`/`netdev_add`/`device_add` arguments at hotplug, so a VM relaunched
//! from its recorded [`VmSpec`] has the topology it had. Values are escaped (`,` becomes `,,`) and
//! ids are checked against QEMU's rules before anything starts.
//!
//! ```no_run
//! use qhotplug_cmdline::{Disk, Launcher, Machine, Pci, VmSpec};
//! # async fn demo() -> qhotplug_cmdline::Result<()> {
//! let mut spec = VmSpec::new("vm1", Machine::Pc);
//! spec.paused = true;
//! spec.disks.push(Disk::virtio_blk("disk-1", "/var/lib/vm1/root.img", Pci::new("pci.0", 9)));
//! let (client, qemu) = Launcher::new(spec, "/run/vm1").launch().await?;
//! println!("QEMU {} is pid {}", client.greeting().version.qemu, qemu.pid());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod addresses;
mod cdrom;
mod chardev;
mod cpu;
mod daemons;
mod device;
mod error;
mod launch;
mod machine;
mod memory;
mod model;
pub mod names;
mod network_disk;
mod persist;
mod rng;
mod secret;
mod spec;
mod sys;
pub mod value;
mod vhost_user;
mod virtio_serial;

pub use cdrom::{Cdrom, CdromBus, IdeAddr, Medium};
pub use chardev::SocketChardev;
pub use cpu::{CpuTopology, Vcpu};
pub use daemons::{StorageDaemonLauncher, VirtiofsdLauncher, STORAGE_DAEMON_ENV, VIRTIOFSD_ENV};
pub use device::{
    Cache, Disk, DiskBackend, DiskFrontend, DiskLayer, ErrorPolicy, Format, Nic, OnError, Pci,
    RootPort, ScsiAddr, ScsiController,
};
pub use error::{Error, Result};
pub use launch::{default_qemu, Launcher, Monitor, QemuProcess, MASTER_KEY_FILE, QEMU_ENV};
pub use machine::Machine;
pub use memory::{Balloon, MemoryBackend, MemoryDevice, MemoryDeviceKind, MemoryKind, MIB};
pub use model::DeviceModel;
pub use network_disk::{
    tls_creds, CephMonitor, Chap, Iscsi, Nbd, NbdServer, NetworkSource, Rbd, TlsEndpoint,
};
pub use persist::SPEC_VERSION;
pub use rng::Rng;
pub use secret::{MasterKey, Secret};
pub use spec::{Accel, Serial, VmSpec, Vnc, VncListen};
pub use value::{escape, id_from_uuid, props_to_json, validate_id, Prop, Props, QomObject};
pub use vhost_user::{VhostUserBlk, VirtioFs};
pub use virtio_serial::{SerialPort, VirtioSerial};

/// The README, compiled as a doctest so its example stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
