//! Hot-plug disks and NICs into running QEMU guests over QMP, as transactions with rollback.
//!
//! A [`Vm`] is a handle on one QEMU, launched by the SDK ([`Vm::launch`]) or attached through its
//! monitor ([`Vm::attach`]). Its hot-adds are transactions: each step that changes QEMU records
//! its undo before it runs, and a failure anywhere undoes everything before it, in reverse, so
//! QEMU's state (`query-pci`, `query-block`, `query-fdsets`) and the SDK's fds are as they were.
//! Hot-removes wait for the guest (`DEVICE_DELETED`) before they remove a backend, and say so when
//! the guest refuses or takes too long. PCI slots (and q35 root ports, and SCSI targets) are
//! allocated from maps built from `query-pci`, so concurrent hotplugs never collide.
//!
//! ```no_run
//! use qhotplug::{DiskConfig, NicConfig, Vm};
//! use qhotplug_cmdline::{Launcher, Machine, VmSpec};
//! use qhotplug_netdev::TapBuilder;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let vm = Vm::launch(Launcher::new(VmSpec::new("guest", Machine::Pc), "/run/qhotplug/guest")).await?;
//!
//! // Disks and NICs in flight at once: each gets its own slot.
//! let tap = TapBuilder::new("guest-nic%d").queues(2).up(true).create()?;
//! let (disk, nic) = tokio::try_join!(
//!     vm.add_disk(DiskConfig::virtio_blk("data-1", "/var/lib/images/data-1.raw")),
//!     vm.add_nic(NicConfig::new("nic-1", tap)),
//! )?;
//! println!("{} on {:?}, {} on {:?}", disk.id, disk.frontend, nic.id, nic.pci);
//!
//! vm.remove_disk("data-1").await?;   // waits for the guest's DEVICE_DELETED
//! vm.remove_nic("nic-1").await?;
//! let relaunch = vm.spec();           // the topology, for a restart or a migration target
//! # let _ = relaunch; Ok(()) }
//! ```

mod config;
mod error;
mod slots;
mod txn;
mod vm;

pub use config::{DiskConfig, DiskModel, NicConfig};
pub use error::{Error, Result, UndoFailure};
pub use vm::{Reconciled, Vm, DEFAULT_UNPLUG_TIMEOUT, MIN_QEMU};

pub use qhotplug_cmdline as cmdline;
pub use qhotplug_netdev as netdev;
pub use qhotplug_qmp as qmp;

/// The README's example, compiled as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
