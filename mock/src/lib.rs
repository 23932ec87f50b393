//! Mock QEMUs for tests that cannot run a real one: an orchestrator's own unit tests, the SDK's
//! fast engine tests, and the protocol tests that need a peer real QEMU cannot be made to be.
//!
//! Two peers, both on one end of a socketpair, both receiving fds one way (`sys.rs`):
//! - [`MockQemu`] models QEMU (below): the SDK's own `Vm` runs against it unchanged.
//! - [`MockServer`] is scripted step by step by the test (greet, read a request, answer, send an
//!   event, send garbage, close), for what no model would do: a disconnect at an exact point,
//!   malformed frames, floods of events.
//!
//! [`MockQemu`] answers QMP by command name over a socketpair and models what a hot-plug touches:
//! devices with their PCI and SCSI places, block nodes, netdevs, fd sets and `getfd` names,
//! chardevs, QOM objects, and a guest that lets devices go (or not). It records every command and
//! every fd it receives, can fail a named command, and can make the guest refuse an unplug, never
//! answer, or answer late. The SDK's own `Vm` runs against it unchanged, and the project runs one
//! set of scenarios against it and against real QEMU (any difference is a bug in the mock).
//!
//! What it checks as QEMU does: ids unique per kind, a device's bus and slot free (PCI, SCSI, and
//! the virtio-serial bus a port sits on), a block node's `file` and a device's `drive`/`netdev`/
//! `chardev`/`rng` present and unused, a chardev or object in use refused deletion, a `file`
//! node's `/dev/fdset/N` present, every fd a netdev names given with `getfd` (and consumed by it),
//! an image's format (a `qcow2` node on an image without qcow2's magic fails), "not found" on
//! deletes. A `scsi-cd` drive has a tray (`blockdev-open-tray`/`-close-tray` with
//! `DEVICE_TRAY_MOVED`) and a medium (`blockdev-remove-medium`/`-insert-medium`, only with the tray
//! open), and `query-block` lists it, empty or not. SCSI disks and serial ports leave at once on
//! `device_del`; PCI devices as its guest decides. vCPU slots (`with_vcpus`) are listed by
//! `query-hotpluggable-cpus` and taken by `device_add` of the slot's model; a running guest that
//! answers acknowledges each (`ACPI_DEVICE_OST`), and a vCPU that leaves sends only its `lapic`
//! child's `DEVICE_DELETED`, as on x86. `query-kvm` says TCG. Memory (`with_memory`): DIMMs in
//! slots on their backends, virtio-mem devices whose `requested-size` (`qom-set`) a guest that
//! answers plugs at once (`MEMORY_DEVICE_SIZE_CHANGE`), `query-memory-devices`, and the balloon
//! (`balloon`, `query-balloon`), a backend in use refused as QEMU does. Its error texts are QEMU
//! 7.2's. vhost-user disks and virtio-fs shares are PCI devices on their chardevs; the mock has
//! no backend behind the chardev to talk to. What it does not model: a guest that locks a tray,
//! a vhost-user backend's handshake, block jobs, migration, the guest's own view.
//!
//! ```
//! use qhotplug_mock::{GuestUnplug, MockQemu};
//! use qhotplug_qmp::command::QueryStatus;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> qhotplug_qmp::Result<()> {
//! let qemu = MockQemu::pc().with_scsi_controller("scsi0", 3);
//! let client = qemu.connect().await?;
//! assert!(!client.execute(&QueryStatus).await?.running);
//!
//! qemu.fail_next("device_add", "Bus 'pci.0' does not support hotplugging");
//! qemu.guest_unplug(GuestUnplug::Refuse);
//! assert_eq!(qemu.commands(), ["query-status"]);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod args;
mod model;
mod qemu;
mod scripted;
mod storage;
mod sys;

pub use model::{MockBlockNode, MockDevice, MockFdset, MockPlace, MockVirtioMem};
pub use qemu::{GuestPower, GuestUnplug, MockQemu, ReceivedFd};
pub use scripted::{default_greeting, event_json, greeting, schema, MockServer, Received};
pub use storage::{MockBitmap, MockExport, MockJob};

/// The README, compiled as a doctest so its example stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
