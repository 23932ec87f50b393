//! Desired state: what it takes to make a running VM match a spec ([`Plan`], from
//! [`Vm::plan`](crate::Vm::plan)), and doing it ([`Vm::apply`](crate::Vm::apply)).
//!
//! The planner (`plan.rs`) compares the desired spec with the VM's ([`Vm::spec`](crate::Vm::spec),
//! QEMU's truth) and says, per device and per live value, what changes and in what order; what
//! QEMU cannot change live is listed as needing a restart. The runner (`apply.rs`) runs the steps,
//! each a public call of its own with its own transaction and busy marks, concurrently where
//! nothing orders them. `configs.rs` turns a desired device into the config its hot-add takes.

pub(crate) mod apply;
pub(crate) mod configs;
pub(crate) mod plan;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;

use qhotplug_cmdline::{Medium, VmSpec};
use qhotplug_qmp::command::IoLimits;

use crate::device_kind::DeviceKind;
use crate::error::{Error, Result};
use crate::kinds::Device;
use crate::qemu::block::Blocks;
use crate::vm_core::Core;

/// How many steps [`Vm::apply`](crate::Vm::apply) runs at once by default.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// What a VM should be: a spec, and what the spec cannot say (a disk's size, the balloon's
/// target) or cannot hold (the tap fds of the NICs it adds).
///
/// A field the spec leaves to the SDK never makes a difference by itself: an address given as
/// [`Pci::auto`](qhotplug_cmdline::Pci::auto) or
/// [`ScsiAddr::auto`](qhotplug_cmdline::ScsiAddr::auto), the vCPUs' ids (only their count
/// matters: `smp` plus `vcpus`, so a desired count is `smp = n` with `vcpus` empty, or
/// `vm.spec()`'s vCPUs kept), a disk's generation, backing chain and checkpoints (what the
/// SDK's storage jobs made; a disk whose path is any image of its chain is that disk), a
/// CD-ROM's generation, a memory backend's id.
///
/// ```
/// use qhotplug::{Desired, Disk, Machine, Pci, VmSpec};
/// let mut spec = VmSpec::new("vm", Machine::Pc);
/// spec.disks.push(Disk::virtio_blk("data-1", "/var/lib/images/data-1.raw", Pci::auto()));
/// let desired = Desired::new(spec).disk_size("data-1", 2 << 30);
/// # let _ = desired;
/// ```
pub struct Desired {
    pub(crate) spec: VmSpec,
    pub(crate) disk_sizes: BTreeMap<String, u64>,
    pub(crate) balloon_target: Option<u64>,
    pub(crate) nic_fds: HashMap<String, Vec<OwnedFd>>,
    pub(crate) concurrency: usize,
}

impl std::fmt::Debug for Desired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Desired")
            .field("spec", &self.spec)
            .field("disk_sizes", &self.disk_sizes)
            .field("balloon_target", &self.balloon_target)
            .field("nic_fds", &self.nic_fds.keys().collect::<Vec<_>>())
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl Desired {
    /// The VM as `spec` describes it; nothing else asked.
    pub fn new(spec: VmSpec) -> Self {
        Desired {
            spec,
            disk_sizes: BTreeMap::new(),
            balloon_target: None,
            nic_fds: HashMap::new(),
            concurrency: DEFAULT_CONCURRENCY,
        }
    }

    /// The desired spec.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// Disk `id` should be `bytes` long, as the guest sees it. A smaller size than the disk has
    /// shrinks it ([`Vm::shrink_disk`](crate::Vm::shrink_disk): what lies past the end is lost).
    /// A disk the same `apply` adds is resized right after its addition (its image's size read
    /// from the file: a raw file's length, a qcow2 header's).
    pub fn disk_size(mut self, id: impl Into<String>, bytes: u64) -> Self {
        self.disk_sizes.insert(id.into(), bytes);
        self
    }

    /// The balloon's target, in bytes of guest memory
    /// ([`Vm::set_balloon`](crate::Vm::set_balloon)). It is compared with the last target this process set, else with what QEMU reports the
    /// guest has (`query-balloon`).
    pub fn balloon_target(mut self, bytes: u64) -> Self {
        self.balloon_target = Some(bytes);
        self
    }

    /// The tap fds (one per queue pair) of NIC `id`, used if the NIC is added. A NIC to add
    /// without them fails its step with [`Error::Spec`], nothing sent; unused fds are closed.
    pub fn nic_fds(mut self, id: impl Into<String>, taps: Vec<OwnedFd>) -> Self {
        self.nic_fds.insert(id.into(), taps);
        self
    }

    /// NIC `id`'s tap ([`Desired::nic_fds`] with its queues).
    pub fn nic_tap(self, id: impl Into<String>, tap: qhotplug_netdev::Tap) -> Self {
        self.nic_fds(id, tap.into_queues())
    }

    /// At most `n` steps at once (default [`DEFAULT_CONCURRENCY`]; at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
}

/// What the planner needs from QEMU besides the spec: the sizes of the disks a size is desired
/// for (`query-block`), and the balloon's target when one is desired or the VM has memory
/// devices (as last set, else `query-balloon`).
pub(crate) async fn seen(core: &Core, desired: &Desired) -> Result<plan::Seen> {
    let (actual, last_set) = {
        let state = core.state();
        (state.spec().clone(), state.balloon_target)
    };
    let mut disk_sizes = HashMap::new();
    let sized: Vec<_> = (actual.disks.iter())
        .filter(|d| desired.disk_sizes.contains_key(&d.id))
        .collect();
    if !sized.is_empty() {
        let blocks = Blocks::read(&core.client).await?;
        for disk in sized {
            disk_sizes.insert(disk.id.clone(), blocks.disk_size(disk)?);
        }
    }
    // Wanted for a target to compare, or for memory devices that may go (a balloon is deflated
    // first).
    let wanted = desired.balloon_target.is_some() || !actual.memory_devices.is_empty();
    let balloon_target = match (&actual.balloon, wanted, last_set) {
        (Some(_), true, Some(target)) => Some(target),
        (Some(_), true, None) => Some(
            core.client
                .execute(&qhotplug_qmp::command::QueryBalloon)
                .await?
                .actual,
        ),
        _ => None,
    };
    // A disk this plan adds: its image's size, from the file (what the guest will see).
    for disk in desired.spec.disks.iter().filter(|d| {
        desired.disk_sizes.contains_key(&d.id) && !actual.disks.iter().any(|a| a.id == d.id)
    }) {
        if let Some(size) = crate::kinds::disk::image_size(&disk.path, disk.format) {
            disk_sizes.insert(disk.id.clone(), size);
        }
    }
    Ok(plan::Seen {
        actual,
        disk_sizes,
        balloon_target,
        unreadable: core
            .unreadable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    })
}

/// What it takes to make the VM match a [`Desired`]: [`Plan::steps`] in an order that respects
/// what depends on what, and what needs a restart.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The steps: removals, additions and live changes. A step runs after every step its
    /// [`Step::after`] names, each of which comes before it in this list.
    pub steps: Vec<Step>,
    /// What QEMU cannot change live: the VM must be restarted from the desired spec for it.
    pub needs_restart: Vec<Restart>,
}

impl Plan {
    /// True when the VM is as desired: nothing to do, live or at a restart.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.needs_restart.is_empty()
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, step) in self.steps.iter().enumerate() {
            write!(f, "{i:>3}. {}", step.change)?;
            if !step.after.is_empty() {
                write!(f, " (after {:?})", step.after)?;
            }
            writeln!(f)?;
        }
        for r in &self.needs_restart {
            writeln!(f, "  restart: {}: {}", r.what, r.reason)?;
        }
        Ok(())
    }
}

/// One step of a [`Plan`].
#[derive(Debug, Clone)]
pub struct Step {
    /// What it changes.
    pub change: Change,
    /// The steps (indices into [`Plan::steps`]) it waits for; if one of them does not succeed,
    /// this one is [`Outcome::Skipped`].
    pub after: Vec<usize>,
    /// The device to add ([`Change::Add`]) or the one to remove ([`Change::Remove`]).
    pub(crate) device: Option<Device>,
}

/// What a [`Step`] changes.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Change {
    /// Hot-remove a device the desired spec does not have, or has changed in a way that is not a
    /// live change (its image, MAC, socket…): then an [`Change::Add`] of it follows.
    Remove {
        /// Its kind.
        kind: DeviceKind,
        /// Its id.
        id: String,
    },
    /// Hot-add a device of the desired spec.
    Add {
        /// Its kind.
        kind: DeviceKind,
        /// Its id.
        id: String,
    },
    /// Grow (or shrink) a disk ([`Vm::resize_disk`](crate::Vm::resize_disk)).
    ResizeDisk {
        /// The disk.
        id: String,
        /// Its size now, in bytes.
        from: u64,
        /// Its size to be.
        to: u64,
    },
    /// Set a disk's I/O limits ([`Vm::set_io_limits`](crate::Vm::set_io_limits)).
    SetIoLimits {
        /// The disk.
        id: String,
        /// The limits (all zero: none).
        limits: IoLimits,
    },
    /// Take a NIC's link up or down ([`Vm::set_link`](crate::Vm::set_link)).
    SetLink {
        /// The NIC.
        id: String,
        /// Up.
        up: bool,
    },
    /// Change a CD-ROM's medium ([`Vm::change_medium`](crate::Vm::change_medium)).
    ChangeMedium {
        /// The drive.
        id: String,
        /// The medium to be in it (none: empty).
        medium: Option<Medium>,
    },
    /// Change the vCPU count ([`Vm::set_vcpus`](crate::Vm::set_vcpus)).
    SetVcpus {
        /// The count now.
        from: u32,
        /// The count to be.
        to: u32,
    },
    /// Change how much of a virtio-mem device the guest plugs
    /// ([`Vm::resize_virtio_mem`](crate::Vm::resize_virtio_mem)).
    ResizeVirtioMem {
        /// The device.
        id: String,
        /// Its requested size now, in bytes.
        from: u64,
        /// Its requested size to be.
        to: u64,
    },
    /// Set the balloon's target ([`Vm::set_balloon`](crate::Vm::set_balloon)).
    SetBalloon {
        /// Bytes of guest memory.
        target: u64,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Remove { kind, id } => write!(f, "remove {kind} {id}"),
            Change::Add { kind, id } => write!(f, "add {kind} {id}"),
            Change::ResizeDisk { id, from, to } => write!(f, "resize disk {id}: {from} → {to}"),
            Change::SetIoLimits { id, .. } => write!(f, "set I/O limits of disk {id}"),
            Change::SetLink { id, up } => {
                write!(
                    f,
                    "take the link of NIC {id} {}",
                    if *up { "up" } else { "down" }
                )
            }
            Change::ChangeMedium { id, medium: None } => write!(f, "eject CD-ROM {id}"),
            Change::ChangeMedium {
                id,
                medium: Some(m),
            } => match m.image_path() {
                Some(path) => write!(f, "put {} in CD-ROM {id}", path.display()),
                None => write!(f, "put a network medium in CD-ROM {id}"),
            },
            Change::SetVcpus { from, to } => write!(f, "vCPUs: {from} → {to}"),
            Change::ResizeVirtioMem { id, from, to } => {
                write!(f, "resize virtio-mem {id}: {from} → {to}")
            }
            Change::SetBalloon { target } => write!(f, "balloon target {target}"),
        }
    }
}

/// Something QEMU cannot change live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    /// What: a spec field (`machine`, `memory_mib`, …) or a device (`disk d1`).
    pub what: String,
    /// Why it cannot change live.
    pub reason: String,
}

/// What [`Vm::apply`](crate::Vm::apply) did: each step of its plan with its outcome, and what
/// needs a restart.
#[derive(Debug)]
pub struct Applied {
    /// The plan's steps, in its order, each with what became of it.
    pub steps: Vec<(Step, Outcome)>,
    /// What QEMU cannot change live (not attempted).
    pub needs_restart: Vec<Restart>,
}

impl Applied {
    /// True when every step was done.
    pub fn all_done(&self) -> bool {
        self.steps.iter().all(|(_, o)| matches!(o, Outcome::Done))
    }

    /// The steps that failed, with their errors.
    pub fn failed(&self) -> impl Iterator<Item = (&Step, &Error)> {
        self.steps.iter().filter_map(|(s, o)| match o {
            Outcome::Failed(e) => Some((s, e)),
            _ => None,
        })
    }
}

/// What became of one [`Step`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// It was done.
    Done,
    /// It failed, and its own transaction undid what it had done; steps done before it stay done.
    Failed(Error),
    /// It was not tried: a step it waits for (this index into [`Plan::steps`]) failed or was
    /// skipped.
    Skipped {
        /// The step it waited for.
        because: usize,
    },
}
