//! Hot-plug disks, NICs, CD-ROM drives, vCPUs, memory (DIMMs, virtio-mem), a balloon, vhost-user
//! disks (served by `qemu-storage-daemon`, which [`StorageDaemon`] drives), virtio-fs shares,
//! virtio-serial ports and RNGs into running QEMU guests over QMP, and live-migrate them
//! ([`Vm::migrate`]), as transactions with rollback, and change what is plugged (a
//! disk's size and I/O limits, a NIC's link, a CD-ROM's medium, a virtio-mem device's size) while
//! the guest runs, and copy a running disk to a new image ([`Vm::mirror_disk`], a [`BlockJob`]
//! that pivots or abandons). The guest's agent ([`Vm::agent`], [`GuestAgent`]) finishes what the guest must
//! do (onlining new vCPUs and memory, freezing filesystems), and the VM's life is typed: graceful
//! [`Vm::shutdown`] and [`Vm::reboot`] with a deadline, [`Vm::pause`], [`Vm::resume`],
//! [`Vm::run_state`].
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
//! use qhotplug::{DiskConfig, Launcher, Machine, NicConfig, TapBuilder, Vm, VmSpec};
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
//!
//! # Testing without QEMU
//!
//! An orchestrator's unit tests can run the SDK against `qhotplug_mock::MockQemu` (the
//! `qhotplug-mock` crate, a dev-dependency), which models what a hot-plug touches and can fail a named command or
//! play a guest that refuses, never answers, or answers late. The project runs one set of
//! scenarios against it and against real QEMU 7.2 and 10.0, and they must agree.
//!
//! ```
//! use qhotplug::{DiskConfig, Error, Machine, Vm, VmSpec};
//! use qhotplug_mock::{GuestUnplug, MockQemu};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let qemu = MockQemu::pc();
//! let vm = Vm::attach(qemu.connect().await?, VmSpec::new("test", Machine::Pc)).await?;
//! let image = std::env::temp_dir().join("qhotplug-doc-mock.raw");
//! std::fs::write(&image, vec![0u8; 1 << 20])?;
//!
//! // A failure at the format node: the SDK undoes the fd set and the protocol node.
//! qemu.fail_next("blockdev-add", "injected");
//! assert!(matches!(vm.add_disk(DiskConfig::virtio_blk("d1", &image)).await, Err(Error::Step { .. })));
//! assert!(qemu.block_nodes().is_empty() && qemu.fdsets().is_empty());
//!
//! // A guest that refuses to let the disk go: the SDK says so and keeps it.
//! vm.add_disk(DiskConfig::virtio_blk("d1", &image)).await?;
//! qemu.guest_unplug(GuestUnplug::Refuse);
//! assert!(matches!(vm.remove_disk("d1").await, Err(Error::UnplugRejected { .. })));
//! assert_eq!(vm.disks().len(), 1);
//! # std::fs::remove_file(&image)?;
//! # Ok(()) }
//! ```
//!
//! # Tracing spans
//!
//! The SDK logs through `tracing`. These span names and fields are a contract: the demo's step
//! table and the project's fault and cancellation tests rely on them, and changing one is a
//! breaking change. The names are constants in [`spans`], which the SDK opens its spans with.
//!
//! | span | fields | what it covers |
//! |---|---|---|
//! | `hotplug` | `op` (`add_disk`, `add_nic`, `add_cdrom`, `add_memory`, `add_balloon`, `remove_disk`, `remove_nic`, `remove_cdrom`, `remove_memory`, `remove_balloon`, `reconcile`, `set_link`, `resize_disk`, `set_io_limits`, `change_medium`, `set_vcpus`, `resize_virtio_mem`, `shutdown`, `reboot`, `mirror_disk`, `snapshot`, `commit_disk`, `stream_disk`, `backup`, `pull_backup`, `delete_checkpoint`, `set_balloon`, `add_vhost_user_blk`, `add_virtio_fs`, `add_virtio_serial`, `add_serial_port`, `add_rng` and their `remove_*`; on a `StorageDaemon`: `export`, `unexport`; `migrate`; `apply`, whose steps are each one of these inside it), `id` | one public operation |
//! | `step` | `name` (the QMP command, or `wait JOB_STATUS_CHANGE`, `wait DEVICE_DELETED`, `wait DEVICE_TRAY_MOVED`, `wait ACPI_DEVICE_OST`, `wait MEMORY_DEVICE_SIZE_CHANGE`, `wait BLOCK_EXPORT_DELETED`, `wait target MIGRATION`), `id`; `press` on `device_del` | one step of a hot-add, hot-remove or change; a `device_del` logs its `verdict` (`accepted`, `busy`, `under way`, `absent`, `error`) |
//! | `undo` | `step` (for example `blockdev-del d1-fmt`) | one undo step of a rollback |
//! | `rollback` | `id`, `reason` | the background clean-up of anything dropped part-way (hot-add, change, job handle, pull backup, migration) |
//! | `qmp` | `command`, `id` (`exec-oob` and in-band ids) | one QMP command (from `qhotplug-qmp`) |
//! | `qga` | `command`, `id` (the request id the agent echoes) | one guest agent command, or a resynchronisation (`guest-sync-delimited`) (from `qhotplug-qga`) |

mod cpus;
mod desired;
mod device_kind;
mod discover;
mod dump;
mod ended_job;
mod engine;
mod error;
mod guest_agent;
mod guest_removals;
mod kinds;
mod life;
mod live;
mod medium;
mod memory;
mod migration;
mod onlining;
mod qemu;
mod read_network;
mod read_spec;
mod reconcile;
mod run_to_end;
mod slots;
pub mod spans;
mod state;
mod storage;
mod unreadable;
mod virtio_devices;
mod vm;
mod vm_core;

pub use cpus::VcpuChange;
pub use desired::{Applied, Change, Desired, Outcome, Plan, Restart, Step, DEFAULT_CONCURRENCY};
pub use device_kind::DeviceKind;
pub use dump::{DumpFormat, DumpProgress};
pub use ended_job::{EndedJob, JobOutcome};
pub use error::{CheckpointProblem, Error, MigrationFailure, Result, UndoFailure};
pub use guest_agent::{GuestAgent, DEFAULT_AGENT_TIMEOUT};
pub use kinds::balloon::BalloonConfig;
pub use kinds::cdrom::CdromConfig;
pub use kinds::disk::{DiskConfig, DiskModel};
pub use kinds::memory::MemoryConfig;
pub use kinds::nic::NicConfig;
pub use kinds::rng::RngConfig;
pub use kinds::vhost_user::{VhostUserBlkConfig, VirtioFsConfig};
pub use kinds::virtio_serial::{SerialPortConfig, VirtioSerialConfig};
pub use life::{PowerVia, Stopped};
pub use medium::{MediumOptions, TrayStatus};
pub use migration::migrate::{MigrationOptions, Progress, SourceAfter, Transport};
pub use migration::orphaned::MigrationLeft;
pub use migration::storage_copy::StorageCopy;
pub use onlining::Onlined;
pub use qemu::errors as qemu_errors;
pub use qemu::unplug::{UnplugPolicy, DEFAULT_UNPLUG_DEADLINE};
pub use reconcile::Reconciled;
pub use storage::backup::{Backup, BackupConfig};
pub use storage::block_job::BlockJob;
pub use storage::checkpoint::{CheckpointInfo, CheckpointState};
pub use storage::daemon::StorageDaemon;
pub use storage::found_job::JobOrigin;
pub use storage::mirror::{MirrorConfig, MirrorSync};
pub use storage::pull::{PullBackup, PullConfig};
pub use storage::snapshot::SnapshotConfig;
pub use unreadable::Unreadable;
pub use vm::{Migrated, Vm, MIN_QEMU};

// What a hot-plug needs from the other crates, each at one path: `qhotplug::…`. The protocol
// itself (typed commands and events, `Config`) is the `qhotplug-qmp` crate's, at its own paths.
pub use qhotplug_cmdline::{
    Balloon, Cache, Cdrom, CdromBus, CephMonitor, Chap, CpuTopology, DeviceModel, Disk,
    DiskBackend, DiskFrontend, DiskLayer, ErrorPolicy, Format, IdeAddr, Iscsi, Launcher, Machine,
    Medium, MemoryBackend, MemoryDevice, MemoryDeviceKind, MemoryKind, Monitor, Nbd, NbdServer,
    NetworkSource, Nic, OnError, Pci, QemuProcess, Rbd, Rng, RootPort, ScsiAddr, ScsiController,
    Secret, Serial, SerialPort, StorageDaemonLauncher, Vcpu, VhostUserBlk, VirtioFs, VirtioSerial,
    VirtiofsdLauncher, VmSpec, Vnc, VncListen, MASTER_KEY_FILE, MIB,
};
pub use qhotplug_netdev::{MacAddr, Tap, TapBuilder, VhostPolicy};
pub use qhotplug_qmp::command::{IoLimits, JobInfo, RunState};
pub use qhotplug_qmp::{Client, Event, EventKind};

/// The guest agent's side: `qhotplug-qga`'s typed commands, errors and freeze guard, for use
/// with [`GuestAgent`] (whose [`Vm::agent`] knows whether an agent runs).
pub mod agent {
    pub use qhotplug_qga::command::*;
    pub use qhotplug_qga::{Agent, Config, Error, FreezeState, Frozen, Result};
}

/// The README's example, compiled as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// The crate's own README (the one a registry shows), compiled as a doctest too.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct CrateReadmeDoctests;
