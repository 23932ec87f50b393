//! The host side of QEMU NICs: tap devices (multiqueue, `IFF_VNET_HDR` when the kernel offers it),
//! vhost-net fds, and MAC addresses.
//!
//! Everything returns `OwnedFd`s, ready to pass to QEMU with `getfd` (hotplug) or to inherit at
//! launch. Every ioctl lives in one private module with the crate's only `unsafe`.
//!
//! ```no_run
//! use qhotplug_netdev::{open_vhost, MacAddr, TapBuilder, VhostPolicy};
//! # fn demo() -> qhotplug_netdev::Result<()> {
//! let mac = MacAddr::random_qemu();
//! let tap = TapBuilder::new("vm1-%d").queues(2).mac(mac.host_side()).up(true).create()?;
//! let vhost = open_vhost(2, VhostPolicy::Prefer)?;
//! println!("{}: {} queues, vhost {}", tap.name(), tap.queues().len(), vhost.is_enabled());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod error;
mod mac;
mod sys;
mod tap;
mod vhost;

pub use error::{Error, Result};
pub use mac::{MacAddr, QEMU_OUI};
pub use tap::{delete_persistent, validate_name, Tap, TapBuilder, VnetHdr, MAX_QUEUES};
pub use vhost::{open_vhost, Vhost, VhostPolicy};

/// The README, compiled as a doctest so its example stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
