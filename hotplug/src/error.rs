//! The crate's error type.

use crate::device_kind::DeviceKind;
use std::path::PathBuf;
use std::time::Duration;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a hotplug can fail with.
///
/// A hot-add that fails part-way is [`Error::Step`]: everything it had done was undone before the
/// error was returned (any undo that failed is listed in it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A QMP command outside a hotplug sequence failed (a query, for instance).
    #[error(transparent)]
    Qmp(#[from] qhotplug_qmp::Error),
    /// The device description is invalid (an id QEMU would reject, a bad count, …). Nothing was
    /// sent to QEMU.
    #[error(transparent)]
    Spec(#[from] qhotplug_cmdline::Error),
    /// Opening vhost-net or preparing host networking failed. Nothing was sent to QEMU.
    #[error(transparent)]
    Netdev(#[from] qhotplug_netdev::Error),
    /// This QEMU is older than the oldest the SDK supports ([`MIN_QEMU`](crate::MIN_QEMU)).
    /// Nothing was sent to it.
    #[error("QEMU {found} is older than {minimum}, the oldest qhotplug supports")]
    QemuTooOld {
        /// The version QEMU's greeting gave.
        found: qhotplug_qmp::message::VersionTriple,
        /// The oldest supported.
        minimum: qhotplug_qmp::message::VersionTriple,
    },
    /// This QEMU lacks a command the operation needs (from its QAPI schema).
    #[error("QEMU has no `{command}` command, which {operation} needs")]
    Unsupported {
        /// The missing command.
        command: String,
        /// What needed it.
        operation: &'static str,
    },
    /// This QEMU has no such block driver (its schema's `blockdev-add` does not list it: for
    /// `iscsi` and `rbd`, Debian ships them in `qemu-block-extra`).
    #[error("QEMU has no `{0}` block driver")]
    NoBlockDriver(&'static str),
    /// The SDK refused the request before sending anything: what it asks cannot be done as the
    /// VM stands (a backup of no disk, a commit with no image under the layer, a storage job on a
    /// network disk, a mirror of the top image alone into a raw target). Nothing was sent.
    #[error("{operation}: {reason}")]
    Precondition {
        /// What was asked: `backup`, `pull backup`, `drive mirror`, `commit`, `stream`, …
        operation: &'static str,
        /// Why it cannot be done.
        reason: String,
    },
    /// A device with this id exists, or is being added or removed right now.
    #[error("device id {0:?} is already in use")]
    DuplicateId(String),
    /// No device of this kind with this id was added through this handle (or QEMU has none).
    #[error("no {kind}{}", with_id(id))]
    NotFound {
        /// The kind asked for.
        kind: DeviceKind,
        /// The id; empty for a kind a VM has at most one of (the balloon).
        id: String,
    },
    /// The device is being added, removed or changed by another call.
    #[error("device {0:?} is busy with another hotplug operation")]
    Busy(String),
    /// No free slot is left: on `pc`, on `pci.0`; on `q35`, no `pcie-root-port` is free (a q35 VM
    /// must be launched with enough root ports); for SCSI, no target on the controller's bus.
    #[error("no free slot on {bus}")]
    NoFreeSlot {
        /// The bus, or what kind of bus was wanted.
        bus: String,
    },
    /// The address asked for is taken, or cannot take a hot-plugged device.
    #[error("address {slot} on {bus} is taken or not hot-pluggable")]
    AddressTaken {
        /// The bus.
        bus: String,
        /// The slot (PCI) or target (SCSI).
        slot: u8,
    },
    /// A SCSI disk was asked for on a VM with no virtio-scsi controller.
    #[error("the VM has no virtio-scsi controller for {0:?}")]
    NoScsiController(String),
    /// The image could not be opened. Nothing was sent to QEMU.
    #[error("cannot open {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A step of a hot-add (or of a medium change) failed. Every earlier step was undone, in reverse order; the undo steps
    /// that failed in turn are in `undo_failures` (empty when the rollback was clean).
    #[error("{operation} of {id:?} failed at {step}{}", undo_note(undo_failures))]
    Step {
        /// What failed: the operation's name as its transaction gives it (`hot-add`, `medium
        /// change`, `live snapshot`, `drive mirror`, `backup`, `pull backup`, `export`).
        operation: &'static str,
        /// The device id.
        id: String,
        /// The step that failed, for example `blockdev-add`.
        step: &'static str,
        /// Why.
        #[source]
        source: Box<qhotplug_qmp::Error>,
        /// Undo steps that failed.
        undo_failures: Vec<UndoFailure>,
    },
    /// The guest refused to release the device (`DEVICE_UNPLUG_GUEST_ERROR`, or an ACPI `_OST`
    /// eject refusal such as 0x82 "device busy"). The device and its backend are still in place.
    #[error("the guest refused to release {id:?} ({reason})")]
    UnplugRejected {
        /// The device id.
        id: String,
        /// How the guest said so.
        reason: String,
    },
    /// `device_del` was accepted but the guest did not release the device by the policy's
    /// deadline. The request stays pending in QEMU; the device, its backend and its slot are kept,
    /// and [`Vm::unplug_pending`](crate::Vm::unplug_pending) says so. Calling remove again waits
    /// for it again without pressing again while QEMU says the unplug is under way.
    #[error("unplug of {id:?} is still pending after {after:?}")]
    UnplugPending {
        /// The device id.
        id: String,
        /// How long we waited.
        after: Duration,
    },
    /// A hot-remove failed at a step on the device's backend: before the unplug (a CD-ROM's
    /// medium taken out: the device is still there, as it was) or after it (the device is gone
    /// from the guest and its id and address are free; its remaining backends are left to
    /// [`Vm::reconcile`](crate::Vm::reconcile)).
    #[error("removing {id:?} failed at {step}")]
    Backend {
        /// The device id.
        id: String,
        /// The command that failed: `blockdev-remove-medium` before the unplug; after it
        /// `blockdev-del`, `netdev_del`, `object-del`, `chardev-remove`, `remove-fd`, …
        step: &'static str,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// I/O limits QEMU would refuse (a total together with its read or write limit, a burst
    /// without its base or below it, a value past QEMU's maximum). Nothing was sent to QEMU.
    #[error("I/O limits for {id:?}: {reason}")]
    InvalidIoLimits {
        /// The disk.
        id: String,
        /// What is wrong with them.
        reason: String,
    },
    /// The disk is read-only: it cannot be resized. Nothing was sent to QEMU.
    #[error("disk {0:?} is read-only")]
    ReadOnly(String),
    /// A size the device cannot take: for a disk, zero or not a multiple of 512 bytes; for a
    /// virtio-mem device, over its size or not a multiple of its block size; for the balloon,
    /// zero. Nothing was sent.
    #[error("{size} bytes is no size {id:?} can take")]
    InvalidSize {
        /// The device.
        id: String,
        /// The size asked for.
        size: u64,
    },
    /// A resize that would shrink the disk, asked for with `resize_disk` (use `shrink_disk` when
    /// the guest no longer uses what would be cut off). Nothing was sent to QEMU.
    #[error("resizing {id:?} from {current} to {requested} bytes would shrink it")]
    ShrinkRefused {
        /// The disk.
        id: String,
        /// Its size now, in bytes.
        current: u64,
        /// The size asked for.
        requested: u64,
    },
    /// An address was given that the device model cannot take (a PCI address for a `scsi-hd`, a
    /// SCSI address for a `virtio-blk`). Nothing was sent to QEMU.
    #[error("{0}: the address does not fit the device model")]
    AddressMismatch(String),
    /// The device cannot be hot-removed (an IDE CD-ROM). Nothing was sent to QEMU.
    #[error("{id:?} cannot be hot-removed: {reason}")]
    NotHotpluggable {
        /// The device.
        id: String,
        /// Why.
        reason: &'static str,
    },
    /// The guest holds the drive's tray locked (a mounted CD): the medium was not changed. QEMU
    /// asked the guest to open it; change it once the guest lets go (unmounts), or force it.
    #[error("the guest holds the tray of {0:?} locked; unmount it in the guest, or force")]
    TrayLocked(String),
    /// A vCPU count the VM cannot have: below the vCPUs the SDK cannot remove (those from
    /// `-smp`; at least 1) or above `maxcpus`. Nothing was sent to QEMU.
    #[error("{requested} vCPUs is not within {min} to {max}")]
    InvalidVcpuCount {
        /// The count asked for.
        requested: u32,
        /// The fewest the VM can have.
        min: u32,
        /// The most (`maxcpus`).
        max: u32,
    },
    /// Under TCG, this vCPU hot-add would abort QEMU: each vCPU QEMU ever started holds one of
    /// `maxcpus` translation contexts, and an unplug does not give its context back (QEMU's
    /// `tcg_register_thread` assertion). Nothing was sent to QEMU; the VM needs a restart (a
    /// relaunch from `vm.spec()`) to hot-add again.
    #[error("under TCG QEMU has started {started} of its {max} vCPU threads; {wanted} more would abort it")]
    TcgVcpuContexts {
        /// vCPU threads started over the VM's life.
        started: u32,
        /// How many more the call wanted.
        wanted: u32,
        /// `maxcpus`.
        max: u32,
    },
    /// Under TCG, this QEMU corrupts its heap when a vCPU is hot-unplugged (seen on 7.2; 10.0 is
    /// the first release tested without it). Nothing was sent to QEMU.
    #[error("QEMU {version} under TCG cannot hot-unplug a vCPU safely")]
    TcgVcpuUnplug {
        /// The QEMU version.
        version: qhotplug_qmp::message::VersionTriple,
    },
    /// The memory device would take the VM over `maxmem` (or the VM was launched without memory
    /// hotplug: no `maxmem`). Nothing was sent to QEMU.
    #[error("{id:?} needs {size} bytes of maxmem; {free} are free")]
    OverMaxMemory {
        /// The device.
        id: String,
        /// What it needs, in bytes.
        size: u64,
        /// What is left under `maxmem`, in bytes.
        free: u64,
    },
    /// A vhost-user device was asked for on a VM whose memory is not shared: its backend could
    /// not map it. Launch the VM with a shared `memory_backend` (a memfd or file, `share`).
    /// Nothing was sent to QEMU.
    #[error("{0:?} needs shared guest memory (VmSpec::memory_backend with share)")]
    NeedsSharedMemory(String),
    /// A migration did not complete; the source runs as before and the target QEMU is gone.
    #[error("migration {0}")]
    Migration(MigrationFailure),
    /// Migration options that cannot work together (multifd over one fd pair). Nothing was sent.
    #[error("invalid migration: {0}")]
    InvalidMigration(String),
    /// The QEMU process could not be started.
    #[error("launching QEMU")]
    Launch(#[source] qhotplug_cmdline::Error),
    /// `qemu-storage-daemon` still had the export's clients after the deadline: the export is
    /// ending (QEMU keeps the request) and its nodes stay until it has ended.
    #[error("export {id:?} still ending after {after:?}")]
    UnexportPending {
        /// The export's id.
        id: String,
        /// How long the SDK waited for `BLOCK_EXPORT_DELETED`.
        after: Duration,
    },
    /// A QEMU job ended with an error (QEMU's words from `query-jobs`); what it was doing is
    /// undone as far as QEMU undoes it (a failed mirror leaves the disk on its source).
    #[error("job {id} failed: {error}")]
    JobFailed {
        /// The job's id.
        id: String,
        /// QEMU's words.
        error: String,
    },
    /// A job did not reach `want` by the deadline; it goes on.
    #[error("job {id} is still {status} after {after:?} (waiting for {want})")]
    JobTimeout {
        /// The job's id.
        id: String,
        /// Its status when the wait ended.
        status: String,
        /// The status waited for.
        want: &'static str,
        /// How long the SDK waited.
        after: Duration,
    },
    /// QEMU went away (killed, crashed) while job `id` ran on disk `disk`: the disk's images are
    /// as QEMU left them, and `partial`, a file the job was writing (a mirror's target), is not
    /// a copy of anything.
    #[error("QEMU went away while job {id} ran on disk {disk}")]
    JobInterrupted {
        /// The job's id.
        id: String,
        /// The disk.
        disk: String,
        /// A file the job was writing, incomplete.
        partial: Option<std::path::PathBuf>,
    },
    /// A checkpoint of disk `disk` cannot be used as asked ([`CheckpointProblem`]); nothing was
    /// sent. An inconsistent or missing one means the next backup must be a full one.
    #[error("checkpoint {checkpoint:?} of disk {disk}: {problem}")]
    Checkpoint {
        /// The disk.
        disk: String,
        /// The checkpoint.
        checkpoint: String,
        /// What is wrong with it.
        problem: CheckpointProblem,
    },
    /// A job the SDK drives is gone from `query-jobs` before it concluded (QEMU restarted, or
    /// someone else dismissed it).
    #[error("job {0} is gone")]
    JobGone(String),
    /// A memory dump failed in QEMU (the file system under its file is full, say), in QEMU's
    /// words. What it wrote is in the file; the VM runs on.
    #[error("memory dump failed: {0}")]
    DumpFailed(String),
    /// The guest agent failed: not running, no answer in time, refused, gone mid-command (see
    /// [`qhotplug_qga::Error`]).
    #[error(transparent)]
    Agent(#[from] qhotplug_qga::Error),
    /// The VM has no guest agent port: no virtio-serial port named
    /// [`SerialPort::GUEST_AGENT`](qhotplug_cmdline::SerialPort::GUEST_AGENT) in its spec.
    #[error("the VM has no guest agent port (a virtio-serial port named org.qemu.guest_agent.0)")]
    NoGuestAgent,
    /// A host-side system call failed (a socket pair for a migration, waiting for a daemon to
    /// exit).
    #[error("{what}")]
    Io {
        /// What the SDK was doing.
        what: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
}

/// One undo step that failed during a rollback.
#[derive(Debug, Clone)]
pub struct UndoFailure {
    /// The undo step, for example `blockdev-del disk1-fmt`.
    pub step: String,
    /// Why it failed.
    pub error: std::sync::Arc<Error>,
}

impl std::fmt::Display for UndoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.error)
    }
}

fn undo_note(failures: &[UndoFailure]) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let list: Vec<String> = failures.iter().map(ToString::to_string).collect();
    format!(" (rollback incomplete: {})", list.join("; "))
}

/// Why a checkpoint cannot be used ([`Error::Checkpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointProblem {
    /// The disk has no checkpoint of that name.
    #[error("the disk has no such checkpoint")]
    Unknown,
    /// The disk already has a checkpoint of that name.
    #[error("the disk already has a checkpoint of that name")]
    Exists,
    /// QEMU loaded it from an image that was not closed cleanly (QEMU was killed): what it
    /// recorded cannot be trusted, so an incremental backup from it is refused.
    #[error("QEMU reports it inconsistent (not shut down cleanly): a full backup is needed")]
    Inconsistent,
    /// The spec lists it but QEMU has no such bitmap on the disk's image (the image was
    /// replaced, or the bitmap removed behind the SDK's back).
    #[error("QEMU has no such bitmap on the disk's image: a full backup is needed")]
    Missing,
    /// Checkpoints are persistent bitmaps, which only qcow2 images hold.
    #[error("checkpoints need a qcow2 image")]
    NeedsQcow2,
}

/// What an error says about QEMU and the SDK's view: the one classification every predicate is
/// derived from. [`Error::class`] matches every variant with no wildcard arm, so a new variant
/// does not compile until it is classified (as hyper's `Error::description` is written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Refused before anything was sent; QEMU and the view are as they were.
    Refused,
    /// Refused before anything was sent, for want of room in the VM.
    NoRoom,
    /// The guest said no, or did not answer in time; the device is as it was.
    Guest,
    /// QEMU went away.
    Gone,
    /// Anything else: QEMU said no part-way (and what was done is undone), a job failed, a host
    /// call failed.
    Failed,
}

impl Error {
    fn class(&self) -> Class {
        use Class::*;
        match self {
            Error::Qmp(e) if e.is_disconnected() => Gone,
            Error::Qmp(_) => Failed,
            Error::Spec(_)
            | Error::Netdev(_)
            | Error::QemuTooOld { .. }
            | Error::Unsupported { .. }
            | Error::NoBlockDriver(_)
            | Error::Precondition { .. }
            | Error::DuplicateId(_)
            | Error::NotFound { .. }
            | Error::Busy(_)
            | Error::AddressTaken { .. }
            | Error::NoScsiController(_)
            | Error::Open { .. }
            | Error::InvalidIoLimits { .. }
            | Error::ReadOnly(_)
            | Error::InvalidSize { .. }
            | Error::ShrinkRefused { .. }
            | Error::AddressMismatch(_)
            | Error::NotHotpluggable { .. }
            | Error::InvalidVcpuCount { .. }
            | Error::TcgVcpuUnplug { .. }
            | Error::NeedsSharedMemory(_)
            | Error::InvalidMigration(_)
            | Error::NoGuestAgent
            | Error::Checkpoint { .. } => Refused,
            Error::NoFreeSlot { .. }
            | Error::OverMaxMemory { .. }
            | Error::TcgVcpuContexts { .. } => NoRoom,
            Error::UnplugRejected { .. } | Error::UnplugPending { .. } | Error::TrayLocked(_) => {
                Guest
            }
            Error::Step { source, .. } if source.is_disconnected() => Gone,
            Error::Backend { source, .. } if source.is_disconnected() => Gone,
            Error::JobInterrupted { .. } => Gone,
            Error::Agent(qhotplug_qga::Error::NotRunning { .. }) => Refused,
            Error::Step { .. }
            | Error::Backend { .. }
            | Error::Migration(_)
            | Error::Launch(_)
            | Error::UnexportPending { .. }
            | Error::JobFailed { .. }
            | Error::JobTimeout { .. }
            | Error::JobGone(_)
            | Error::DumpFailed(_)
            | Error::Agent(_)
            | Error::Io { .. } => Failed,
        }
    }

    /// True when the call sent nothing to QEMU: bad input, a device or id it cannot act on, no
    /// room, a QEMU that cannot do it, or a guard that refused. QEMU and the SDK's view are as they
    /// were. (A [`Error::Step`] did send commands, and undid them.)
    pub fn nothing_sent(&self) -> bool {
        matches!(self.class(), Class::Refused | Class::NoRoom)
    }

    /// True when the guest said no, or did not answer in time: an unplug it refused or still owes
    /// ([`Error::UnplugRejected`], [`Error::UnplugPending`]), a tray it holds locked. The device is
    /// as it was; asking again later may work.
    pub fn is_guest_refusal(&self) -> bool {
        self.class() == Class::Guest
    }

    /// True when the VM has no room for it: no free PCI slot, root port or SCSI target, no memory
    /// slot or `maxmem` left, or no vCPU thread left under TCG. Nothing was sent.
    pub fn is_out_of_room(&self) -> bool {
        self.class() == Class::NoRoom
    }

    /// True when QEMU is gone (killed, crashed, its socket closed), whether between calls, under
    /// a step or while a job ran ([`Error::JobInterrupted`]): nothing more can be done on this VM.
    pub fn is_disconnected(&self) -> bool {
        self.class() == Class::Gone
    }
}

/// Why a migration did not complete. In every case the source runs as before and the target
/// QEMU is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationFailure {
    /// QEMU says it failed, in its words (`error-desc`).
    Failed(String),
    /// It was cancelled.
    Cancelled,
    /// It did not complete by the deadline, so it was cancelled.
    TimedOut(Duration),
}

impl std::fmt::Display for MigrationFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationFailure::Failed(reason) => write!(f, "failed: {reason}"),
            MigrationFailure::Cancelled => write!(f, "cancelled"),
            MigrationFailure::TimedOut(after) => write!(f, "did not complete within {after:?}"),
        }
    }
}

/// ` with id "x"`, or nothing for an empty id.
fn with_id(id: &str) -> String {
    match id {
        "" => String::new(),
        id => format!(" with id {id:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_driver_qemu_lacks_and_a_precondition_sent_nothing() {
        assert!(Error::NoBlockDriver("rbd").nothing_sent());
        let refused = Error::Precondition {
            operation: "backup",
            reason: "a backup of no disk".into(),
        };
        assert!(refused.nothing_sent());
        assert!(!refused.is_disconnected());
        assert_eq!(refused.to_string(), "backup: a backup of no disk");
    }

    #[test]
    fn a_job_qemu_left_under_says_qemu_is_gone() {
        let interrupted = Error::JobInterrupted {
            id: "mirror-a".into(),
            disk: "a".into(),
            partial: None,
        };
        assert!(interrupted.is_disconnected());
        assert!(!interrupted.nothing_sent());
    }

    #[test]
    fn the_predicates_follow_the_cause_through_a_step_and_a_backend() {
        let gone = || Box::new(qhotplug_qmp::Error::Disconnected);
        let step = Error::Step {
            operation: "hot-add",
            id: "a".into(),
            step: "blockdev-add",
            source: gone(),
            undo_failures: vec![],
        };
        assert!(step.is_disconnected() && !step.nothing_sent());
        let backend = Error::Backend {
            id: "a".into(),
            step: "blockdev-del",
            source: Box::new(Error::Qmp(qhotplug_qmp::Error::Disconnected)),
        };
        assert!(backend.is_disconnected());
        let room = Error::NoFreeSlot {
            bus: "pci.0".into(),
        };
        assert!(room.is_out_of_room() && room.nothing_sent() && !room.is_guest_refusal());
        assert!(Error::TrayLocked("cd".into()).is_guest_refusal());
    }
}
