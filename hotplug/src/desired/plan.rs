//! The planner: a desired spec against the VM's, nothing sent. Pure, so the mock tests run every
//! kind and field through it without a QEMU.
//!
//! Per device (matched by kind and id): one only the VM has is removed, one only the desired spec
//! has is added; one both have is compared field by field. A change of model, bus, address or
//! backend type, or of boot order, needs a restart (as the anchors, KubeVirt's
//! `RestartRequired` and Proxmox's pending changes, treat them); a change of what the device is
//! made of (its image, MAC, socket, memory) is a removal and an addition of the same id (as
//! Incus's `Update` does); a live value (size, I/O limits, link, medium, vCPU count, virtio-mem
//! size, balloon target) is a live change.
//!
//! Order: an addition waits for the removal of what shares its id, its given PCI or SCSI
//! address; a NIC's addition for every NIC's removal (it may reuse their tap); a memory device's
//! addition for every memory removal (room under `maxmem`) and the vCPU change; the vCPU change
//! for every memory removal; a serial port's addition for its controller's; a controller's
//! removal for its ports'; a live change of a device added in the same plan for its addition;
//! memory removals for the balloon's deflation (or removal), a balloon target for memory
//! removals.

use std::collections::{BTreeSet, HashMap};

use qhotplug_cmdline::names;
use qhotplug_cmdline::{
    CdromBus, Disk, DiskBackend, DiskFrontend, Medium, MemoryBackend, MemoryDeviceKind,
    NetworkSource, VmSpec,
};

use super::{Change, Desired, Plan, Restart, Step};
use crate::device_kind::DeviceKind;
use crate::error::{Error, Result};
use crate::kinds::{Device, Place};
use crate::unreadable::Unreadable;

/// What the planner knows of the VM besides its spec: what `plan` read from QEMU.
pub(crate) struct Seen {
    /// The VM's spec ([`Vm::spec`](crate::Vm::spec)).
    pub(crate) actual: VmSpec,
    /// The size of each disk the desired state gives one, from `query-block`.
    pub(crate) disk_sizes: HashMap<String, u64>,
    /// The balloon's target as last set, or the guest's memory as QEMU reports it.
    pub(crate) balloon_target: Option<u64>,
    /// What attaching without a spec could not read from QEMU.
    pub(crate) unreadable: Vec<Unreadable>,
}

/// The plan that makes `seen.actual` into `desired`. [`Error::Spec`] for a desired spec that
/// contradicts itself, [`Error::Precondition`] for a size given to no disk.
pub(crate) fn plan(seen: &Seen, desired: &Desired) -> Result<Plan> {
    desired.spec.validate()?;
    if let Some(id) = desired
        .disk_sizes
        .keys()
        .find(|id| !desired.spec.disks.iter().any(|d| &d.id == *id))
    {
        return Err(Error::Precondition {
            operation: "plan",
            reason: format!("a size is given for {id:?}, which the desired spec has no disk of"),
        });
    }
    let mut planner = Planner {
        seen,
        desired,
        steps: Vec::new(),
        restart: Vec::new(),
    };
    planner.vm_fields();
    planner.devices();
    planner.vcpus();
    planner.balloon();
    planner.order();
    Ok(Plan {
        steps: planner.steps,
        needs_restart: planner.restart,
    })
}

struct Planner<'a> {
    seen: &'a Seen,
    desired: &'a Desired,
    steps: Vec<Step>,
    restart: Vec<Restart>,
}

/// What differs between a device the VM has and the desired one.
enum Diff {
    Same,
    /// Only what can change live.
    Live(Vec<Change>),
    /// What the device is made of: removed and added again.
    Replace(&'static str),
    /// Its model, place or backend type.
    Restart(String),
}

impl Planner<'_> {
    fn needs_restart(&mut self, what: impl Into<String>, reason: impl Into<String>) {
        self.restart.push(Restart {
            what: what.into(),
            reason: reason.into(),
        });
    }

    fn step(&mut self, change: Change, device: Option<Device>) -> usize {
        self.steps.push(Step {
            change,
            after: Vec::new(),
            device,
        });
        self.steps.len() - 1
    }

    fn unreadable(&self, f: impl Fn(&Unreadable) -> bool) -> bool {
        self.seen.unreadable.iter().any(f)
    }

    /// What only a launch sets.
    fn vm_fields(&mut self) {
        let (a, d) = (&self.seen.actual, &self.desired.spec);
        let fixed = "QEMU takes it at launch only";
        if a.machine != d.machine {
            self.needs_restart(
                "machine",
                format!("{:?} → {:?}: {fixed}", a.machine, d.machine),
            );
        }
        if a.accel != d.accel {
            self.needs_restart("accel", fixed);
        }
        if d.cpu.is_some() && a.cpu != d.cpu {
            self.needs_restart("cpu", fixed);
        }
        if !same_topology(a, d) {
            self.needs_restart("cpu_topology", "maxcpus and the topology are set at launch");
        }
        if a.memory_mib != d.memory_mib {
            self.needs_restart("memory_mib", "base memory is set at launch");
        }
        if a.memory_slots != d.memory_slots || a.max_memory_mib != d.max_memory_mib {
            self.needs_restart("max_memory_mib", "maxmem and its slots are set at launch");
        }
        if !same_backend(a.memory_backend.as_ref(), d.memory_backend.as_ref()) {
            self.needs_restart("memory_backend", "base memory's backend is set at launch");
        }
        if (&a.kernel, &a.initrd, &a.append) != (&d.kernel, &d.initrd, &d.append) {
            self.needs_restart("kernel", "what the VM boots is read at launch");
        }
        if a.serials != d.serials
            && !self.unreadable(|u| matches!(u, Unreadable::SerialConsole { .. }))
        {
            self.needs_restart("serials", "serial consoles are set at launch");
        }
        let vnc = |s: &VmSpec| {
            s.vnc
                .as_ref()
                .map(|v| (v.listen.clone(), v.password.is_some()))
        };
        if vnc(a) != vnc(d) {
            self.needs_restart("vnc", "the display is set at launch");
        }
        if a.usb_tablet != d.usb_tablet {
            self.needs_restart("usb_tablet", "USB is set at launch");
        }
        if a.extra_args != d.extra_args
            && !self.unreadable(|u| matches!(u, Unreadable::LaunchOptions))
        {
            self.needs_restart("extra_args", fixed);
        }
        fn ports(s: &VmSpec) -> Vec<(&str, u8, &str, u8, u8)> {
            let mut p: Vec<_> = (s.root_ports.iter())
                .map(|p| (&*p.id, p.chassis, &*p.pci.bus, p.pci.slot, p.pci.function))
                .collect();
            p.sort();
            p
        }
        if ports(a) != ports(d) {
            self.needs_restart("root_ports", "root ports cannot be hot-plugged");
        }
        // A controller only one side has, or one the desired spec moved.
        let moved = |c: &qhotplug_cmdline::ScsiController, other: &VmSpec, given: bool| {
            !other
                .scsi_controllers
                .iter()
                .any(|x| x.id == c.id && (!given || c.pci.is_auto() || x.pci == c.pci))
        };
        let changed: BTreeSet<&str> = (d.scsi_controllers.iter().filter(|c| moved(c, a, true)))
            .chain(a.scsi_controllers.iter().filter(|c| moved(c, d, false)))
            .map(|c| c.id.as_str())
            .collect();
        for id in changed {
            self.needs_restart(
                format!("SCSI controller {id}"),
                "the SDK does not hot-plug controllers",
            );
        }
        if a.cdroms.iter().find(|c| c.boot).map(|c| &c.id)
            != d.cdroms.iter().find(|c| c.boot).map(|c| &c.id)
        {
            self.needs_restart("boot order", "the firmware reads it at launch");
        }
    }

    /// Removals, additions and live changes, device by device (vCPUs by count, below).
    fn devices(&mut self) {
        let devices = |s: &VmSpec| -> Vec<Device> {
            Device::all(s)
                .into_iter()
                .filter(|d| d.kind() != DeviceKind::Vcpu)
                .collect()
        };
        let actual = devices(&self.seen.actual);
        let desired = devices(&self.desired.spec);
        let find = |list: &[Device], d: &Device| {
            list.iter()
                .find(|x| x.kind() == d.kind() && x.id() == d.id())
                .cloned()
        };
        for a in &actual {
            if find(&desired, a).is_none() {
                self.remove(a);
            }
        }
        for d in &desired {
            match find(&actual, d) {
                None => self.add(d),
                Some(a) => match diff(&a, d, self.desired, self.seen) {
                    Diff::Same => {}
                    Diff::Live(changes) => {
                        for c in changes {
                            self.step(c, None);
                        }
                    }
                    Diff::Replace(why) => {
                        tracing::debug!(id = d.id(), why, "replaced");
                        self.remove(&a);
                        self.add(d);
                    }
                    Diff::Restart(reason) => {
                        self.needs_restart(format!("{} {}", d.kind(), d.id()), reason)
                    }
                },
            }
        }
    }

    fn remove(&mut self, device: &Device) {
        if let Device::Cdrom(c) = device {
            if matches!(c.bus, CdromBus::Ide(_)) {
                return self.needs_restart(
                    format!("CD-ROM {}", c.id),
                    "an IDE drive cannot be hot-removed",
                );
            }
        }
        self.step(
            Change::Remove {
                kind: device.kind(),
                id: device.id().to_owned(),
            },
            Some(device.clone()),
        );
    }

    fn add(&mut self, device: &Device) {
        let id = device.id();
        let what = format!("{} {id}", device.kind());
        // A device QEMU has that the spec could not show (a network disk, a foreign device).
        if self.unreadable(|u| match u {
            Unreadable::NetworkBackend { device } | Unreadable::Foreign { device, .. } => {
                device == id
            }
            _ => false,
        }) {
            return self.needs_restart(what, "QEMU has a device of this id the SDK cannot read");
        }
        let not_live = match device {
            Device::Disk(d) if matches!(d.frontend, DiskFrontend::ScsiGeneric(_)) => {
                Some("SCSI passthrough is set at launch")
            }
            Device::Disk(d) if !d.backing.is_empty() => {
                Some("a disk on a backing chain is opened whole at launch")
            }
            Device::Cdrom(c) if matches!(c.bus, CdromBus::Ide(_)) => {
                Some("an IDE drive cannot be hot-added")
            }
            _ => None,
        };
        if let Some(reason) = not_live {
            return self.needs_restart(what, reason);
        }
        self.step(
            Change::Add {
                kind: device.kind(),
                id: id.to_owned(),
            },
            Some(device.clone()),
        );
        // What the hot-add cannot say: a new disk's size, a NIC's link down (each after the
        // addition, by the live-change rule of `waits_for`).
        if let Device::Disk(_) = device {
            let sizes = (
                self.desired.disk_sizes.get(id),
                self.seen.disk_sizes.get(id),
            );
            if let (Some(&to), Some(&from)) = sizes {
                if to != from {
                    let id = id.to_owned();
                    self.step(Change::ResizeDisk { id, from, to }, None);
                }
            }
        }
        if let Device::Nic(n) = device {
            if !n.link_up {
                let id = n.id.clone();
                self.step(Change::SetLink { id, up: false }, None);
            }
        }
    }

    fn vcpus(&mut self) {
        let (a, d) = (&self.seen.actual, &self.desired.spec);
        let count = |s: &VmSpec| s.smp + u32::try_from(s.vcpus.len()).unwrap_or(u32::MAX);
        let (from, to) = (count(a), count(d));
        if from == to || !same_topology(a, d) {
            return;
        }
        if to < a.smp {
            return self.needs_restart(
                "vCPUs",
                format!("{to} is fewer than the {} the VM booted with", a.smp),
            );
        }
        self.step(Change::SetVcpus { from, to }, None);
    }

    fn balloon(&mut self) {
        if self.deflate_for_memory_removals() {
            return;
        }
        let (Some(target), Some(_)) = (self.desired.balloon_target, &self.desired.spec.balloon)
        else {
            return;
        };
        let added = self.seen.actual.balloon.is_none();
        if added || self.seen.balloon_target != Some(target) {
            // After memory removals: a balloon inflating while the guest offlines memory can
            // leave it none (the guest's OOM killer, then a panic, in `apply_guest`).
            let removals = self.memory_removals();
            let set = self.step(Change::SetBalloon { target }, None);
            self.steps[set].after.extend(removals);
        }
    }

    /// The steps that remove a memory device.
    fn memory_removals(&self) -> Vec<usize> {
        (self.steps.iter().enumerate())
            .filter(|(_, s)| {
                matches!(
                    s.change,
                    Change::Remove {
                        kind: DeviceKind::Memory,
                        ..
                    }
                )
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// A guest cannot give back memory its balloon holds pages in: an inflated balloon is
    /// deflated (its target the VM's whole memory) before any memory device is removed, and set
    /// to its target again (the desired one, else the one it had) after them. A removed balloon
    /// goes first instead: its driver gives its pages back as it goes. True when it planned so.
    fn deflate_for_memory_removals(&mut self) -> bool {
        let removals = self.memory_removals();
        let a = &self.seen.actual;
        let whole = a.memory_mib * qhotplug_cmdline::MIB
            + a.memory_devices.iter().map(|m| m.size()).sum::<u64>();
        let balloon_removed = self.steps.iter().position(|s| {
            matches!(
                s.change,
                Change::Remove {
                    kind: DeviceKind::Balloon,
                    ..
                }
            )
        });
        match (balloon_removed, self.seen.balloon_target) {
            (Some(removal), _) => {
                for &i in &removals {
                    self.steps[i].after.push(removal);
                }
                false
            }
            (None, Some(now)) if !removals.is_empty() && a.balloon.is_some() && now < whole => {
                let deflate = self.step(Change::SetBalloon { target: whole }, None);
                for &i in &removals {
                    self.steps[i].after.push(deflate);
                }
                let wanted = self.desired.spec.balloon.is_some();
                let target = self
                    .desired
                    .balloon_target
                    .filter(|_| wanted)
                    .unwrap_or(now);
                let again = self.step(Change::SetBalloon { target }, None);
                self.steps[again].after.extend(&removals);
                true
            }
            _ => false,
        }
    }

    /// Fills each step's `after`, then sorts the steps so that each comes after what it waits for.
    fn order(&mut self) {
        let n = self.steps.len();
        for i in 0..n {
            for j in 0..n {
                if i != j && waits_for(&self.steps[i], &self.steps[j]) {
                    self.steps[i].after.push(j);
                }
            }
        }
        // A stable topological sort: removals, then the rest, each in plan order, held back
        // only by what they wait for.
        let mut placed = vec![false; n];
        let mut order = Vec::with_capacity(n);
        let mut rank: Vec<usize> = (0..n).collect();
        rank.sort_by_key(|&i| !matches!(self.steps[i].change, Change::Remove { .. }));
        while order.len() < n {
            let next = rank
                .iter()
                .copied()
                .find(|&i| !placed[i] && self.steps[i].after.iter().all(|&j| placed[j]));
            // The rules above never make a cycle; if one did, keep the plan order.
            let next =
                next.unwrap_or_else(|| rank.iter().copied().find(|&i| !placed[i]).unwrap_or(0));
            placed[next] = true;
            order.push(next);
        }
        let position: HashMap<usize, usize> =
            order.iter().enumerate().map(|(pos, &i)| (i, pos)).collect();
        let mut steps: Vec<Option<Step>> = std::mem::take(&mut self.steps)
            .into_iter()
            .map(Some)
            .collect();
        self.steps = order
            .iter()
            .map(|&i| {
                let mut step = steps[i].take().expect("each step once");
                step.after = step
                    .after
                    .iter()
                    .map(|j| position[j])
                    .filter(|&p| p < position[&i])
                    .collect();
                step.after.sort_unstable();
                step.after.dedup();
                step
            })
            .collect();
    }
}

/// Step `a` must wait for step `b`.
fn waits_for(a: &Step, b: &Step) -> bool {
    let (ad, bd) = (a.device.as_ref(), b.device.as_ref());
    match (&a.change, &b.change) {
        // A live change of a device added in this plan waits for its addition.
        (c, Change::Add { id, .. }) if live_target(c) == Some(id.as_str()) => true,
        (
            Change::SetBalloon { .. },
            Change::Add {
                kind: DeviceKind::Balloon,
                ..
            },
        ) => true,
        (Change::Add { kind, id }, Change::Remove { kind: rk, id: rid }) => {
            id == rid
                || (*kind == DeviceKind::Nic && *rk == DeviceKind::Nic)
                || (*kind == DeviceKind::Memory && *rk == DeviceKind::Memory)
                || ad.zip(bd).is_some_and(|(x, y)| same_given_place(x, y))
        }
        (
            Change::Add {
                kind: DeviceKind::Memory,
                ..
            },
            Change::SetVcpus { .. },
        ) => true,
        (
            Change::SetVcpus { .. },
            Change::Remove {
                kind: DeviceKind::Memory,
                ..
            },
        ) => true,
        // A port waits for its controller; a controller's removal for its ports'.
        (
            Change::Add {
                kind: DeviceKind::SerialPort,
                ..
            },
            Change::Add {
                kind: DeviceKind::VirtioSerial,
                id,
            },
        )
        | (
            Change::Remove {
                kind: DeviceKind::VirtioSerial,
                id,
            },
            Change::Remove {
                kind: DeviceKind::SerialPort,
                ..
            },
        ) => {
            let port = if matches!(a.change, Change::Add { .. }) {
                ad
            } else {
                bd
            };
            matches!(port, Some(Device::SerialPort(p)) if p.bus == names::controller_bus(id))
        }
        _ => false,
    }
}

/// The device a live change acts on.
fn live_target(change: &Change) -> Option<&str> {
    match change {
        Change::ResizeDisk { id, .. }
        | Change::SetIoLimits { id, .. }
        | Change::SetLink { id, .. }
        | Change::ChangeMedium { id, .. }
        | Change::ResizeVirtioMem { id, .. } => Some(id),
        _ => None,
    }
}

/// `added` is given the address `removed` holds (an address left to the SDK takes none).
fn same_given_place(added: &Device, removed: &Device) -> bool {
    match (added.place(), removed.place()) {
        (Place::Pci(x), Place::Pci(y)) => !x.is_auto() && x == y,
        (Place::Scsi(x), Place::Scsi(y)) => !x.is_auto() && x == y,
        _ => false,
    }
}

/// What differs between a device the VM has (`a`) and the desired one (`d`), of one kind and id:
/// its model, then its place (one check for every kind, through `Place`), then what it is made
/// of and its live values.
fn diff(a: &Device, d: &Device, desired: &Desired, seen: &Seen) -> Diff {
    if let Some(reason) = model_change(a, d) {
        return Diff::Restart(reason.into());
    }
    if !same_place(&a.place(), &d.place()) {
        return Diff::Restart(format!(
            "its address changed ({:?} → {:?})",
            a.place(),
            d.place()
        ));
    }
    match (a, d) {
        (Device::Disk(a), Device::Disk(d)) => disk_diff(a, d, desired, seen),
        (Device::Nic(a), Device::Nic(d)) => {
            // QMP reports neither a NIC's link nor its vhost (`Unreadable::NicLink`).
            let link_unknown = seen
                .unreadable
                .iter()
                .any(|u| matches!(u, Unreadable::NicLink { device } if *device == d.id));
            if a.mac != d.mac || a.queues != d.queues || (a.vhost != d.vhost && !link_unknown) {
                return Diff::Replace("its MAC, queues or vhost");
            }
            // A link QMP could not read is set, whatever the spec holds in its place.
            live(a.link_up != d.link_up || link_unknown, || Change::SetLink {
                id: d.id.clone(),
                up: d.link_up,
            })
        }
        (Device::Cdrom(a), Device::Cdrom(d)) => {
            if let (CdromBus::Ide(x), CdromBus::Ide(y)) = (&a.bus, &d.bus) {
                if x != y {
                    return Diff::Restart("its IDE unit changed".into());
                }
            }
            let same = match (&a.medium, &d.medium) {
                (Some(Medium::Network(x)), Some(Medium::Network(y))) => {
                    same_source(x, y, &d.id, seen)
                }
                (x, y) => x == y,
            };
            live(!same, || Change::ChangeMedium {
                id: d.id.clone(),
                medium: d.medium.clone(),
            })
        }
        (Device::Memory(a), Device::Memory(d)) => {
            if !same_backend(Some(&a.backend), Some(&d.backend)) {
                return Diff::Replace("its memory backend");
            }
            match (&a.kind, &d.kind) {
                (
                    MemoryDeviceKind::VirtioMem {
                        requested: from, ..
                    },
                    MemoryDeviceKind::VirtioMem { requested: to, .. },
                ) if from != to => Diff::Live(vec![Change::ResizeVirtioMem {
                    id: d.id.clone(),
                    from: *from,
                    to: *to,
                }]),
                _ => Diff::Same,
            }
        }
        (Device::VhostUserBlk(a), Device::VhostUserBlk(d)) => replace_if(
            a.socket != d.socket || (d.num_queues.is_some() && a.num_queues != d.num_queues),
            "its socket or queues",
        ),
        (Device::VirtioFs(a), Device::VirtioFs(d)) => replace_if(
            a.socket != d.socket
                || a.tag != d.tag
                || (d.queue_size.is_some() && a.queue_size != d.queue_size),
            "its socket, tag or queue size",
        ),
        (Device::SerialPort(a), Device::SerialPort(d)) => {
            if a.bus != d.bus {
                return Diff::Restart(format!("its controller changed ({} → {})", a.bus, d.bus));
            }
            replace_if(
                a.name != d.name || a.socket != d.socket,
                "its name or socket",
            )
        }
        (Device::Rng(a), Device::Rng(d)) => replace_if(a.source != d.source, "its source"),
        // The balloon and a virtio-serial controller are their place alone.
        _ => Diff::Same,
    }
}

/// Why the device's model changed, if it did: a disk's frontend, a CD-ROM's bus, a memory
/// device's sort.
fn model_change(a: &Device, d: &Device) -> Option<&'static str> {
    use std::mem::discriminant;
    match (a, d) {
        (Device::Disk(a), Device::Disk(d)) => {
            (discriminant(&a.frontend) != discriminant(&d.frontend)).then_some("its model changed")
        }
        (Device::Cdrom(a), Device::Cdrom(d)) => (discriminant(&a.bus) != discriminant(&d.bus))
            .then_some("its bus changed (IDE and SCSI)"),
        (Device::Memory(a), Device::Memory(d)) => (discriminant(&a.kind) != discriminant(&d.kind))
            .then_some("its model changed (DIMM and virtio-mem)"),
        _ => None,
    }
}

fn disk_diff(a: &Disk, d: &Disk, desired: &Desired, seen: &Seen) -> Diff {
    if std::mem::discriminant(&a.backend) != std::mem::discriminant(&d.backend) {
        return Diff::Restart("its backend type changed (file, host device, network)".into());
    }
    let path_unknown = seen
        .unreadable
        .iter()
        .any(|u| matches!(u, Unreadable::ImagePath { device, .. } if *device == d.id));
    // The desired image is the disk's top, or an image under it (a snapshot's overlay went on
    // top): that image's format is the one to compare.
    let format = if a.path == d.path || path_unknown {
        Some(a.format)
    } else {
        a.backing
            .iter()
            .find(|l| l.path == d.path)
            .map(|l| l.format)
    };
    let image_same = match &d.backend {
        DiskBackend::Network(y) => match &a.backend {
            DiskBackend::Network(x) => same_source(x, y, &d.id, seen),
            _ => false,
        },
        _ => format == Some(d.format),
    };
    if !image_same {
        return Diff::Replace("its image");
    }
    if a.read_only != d.read_only || a.cache != d.cache || a.on_error != d.on_error {
        return Diff::Replace("its read-only, cache or error policy");
    }
    let mut changes = Vec::new();
    let limits = |l: &Option<qhotplug_qmp::command::IoLimits>| l.clone().unwrap_or_default();
    if limits(&a.io_limits) != limits(&d.io_limits) {
        changes.push(Change::SetIoLimits {
            id: d.id.clone(),
            limits: limits(&d.io_limits),
        });
    }
    if let (Some(&to), Some(&from)) = (desired.disk_sizes.get(&d.id), seen.disk_sizes.get(&d.id)) {
        if to != from {
            changes.push(Change::ResizeDisk {
                id: d.id.clone(),
                from,
                to,
            });
        }
    }
    if changes.is_empty() {
        Diff::Same
    } else {
        Diff::Live(changes)
    }
}

/// Whether device `id`'s network source `actual` (the view's) is `desired`, as far as the view
/// can tell: a secret read back from QEMU (unresolved, [`Unreadable::NetworkSecret`]) is any
/// value, and so is a reconnect delay QEMU did not tell ([`Unreadable::NbdReconnectDelay`]).
fn same_source(actual: &NetworkSource, desired: &NetworkSource, id: &str, seen: &Seen) -> bool {
    let mut desired = desired.clone();
    if let (Some(a), Some(d)) = (actual.secret(), desired.secret_mut()) {
        if !a.is_resolved() {
            *d = a.clone();
        }
    }
    let delay_unknown = seen
        .unreadable
        .iter()
        .any(|u| matches!(u, Unreadable::NbdReconnectDelay { device } if device == id));
    if let (NetworkSource::Nbd(a), NetworkSource::Nbd(d)) = (actual, &mut desired) {
        if delay_unknown {
            d.reconnect_delay = a.reconnect_delay;
        }
    }
    *actual == desired
}

fn live(differs: bool, change: impl FnOnce() -> Change) -> Diff {
    if differs {
        Diff::Live(vec![change()])
    } else {
        Diff::Same
    }
}

fn replace_if(differs: bool, why: &'static str) -> Diff {
    if differs {
        Diff::Replace(why)
    } else {
        Diff::Same
    }
}

/// A desired address left to the SDK (`Pci::auto`, `ScsiAddr::auto`) matches any; a place QEMU
/// picks (a DIMM slot, an IDE unit) is not compared here.
fn same_place(actual: &Place, desired: &Place) -> bool {
    match (actual, desired) {
        (Place::Pci(a), Place::Pci(d)) => d.is_auto() || a == d,
        (Place::Scsi(a), Place::Scsi(d)) => d.is_auto() || a == d,
        (a, d) => a == d,
    }
}

/// The same `maxcpus` (the boot count when none is given), and the same sockets, cores and
/// threads where the desired spec gives them (0 leaves them to QEMU, which a spec read back from
/// QEMU then holds as QEMU chose them).
fn same_topology(a: &VmSpec, d: &VmSpec) -> bool {
    let max = |s: &VmSpec| s.cpu_topology.map_or(s.smp, |t| t.max);
    let (at, dt) = (
        a.cpu_topology.unwrap_or_default(),
        d.cpu_topology.unwrap_or_default(),
    );
    let given = |want: u32, have: u32| want == 0 || want == have;
    max(a) == max(d)
        && given(dt.sockets, at.sockets)
        && given(dt.cores, at.cores)
        && given(dt.threads, at.threads)
}

/// Two memory backends are the same but for their ids (the SDK's names).
fn same_backend(a: Option<&MemoryBackend>, d: Option<&MemoryBackend>) -> bool {
    let key = |b: &MemoryBackend| (b.kind.clone(), b.size, b.share, b.hugepages);
    a.map(key) == d.map(key)
}
