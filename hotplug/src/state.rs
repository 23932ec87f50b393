//! What the SDK knows of one VM, behind the [`Vm`](crate::Vm) handle: its topology (the spec, with
//! every hot-added device in and every removed one out), the slot maps, which ids are being added
//! or removed, and the reservations that hold an id and an address for a hot-add.
//!
//! Invariant: an address is freed only once its device is confirmed gone (`DEVICE_DELETED`, or
//! QEMU no longer listing it), or when a hot-add that took it was rolled back.

use std::collections::{HashMap, HashSet};

use crate::delete::Delete;
use crate::kinds::{self, cdrom, disk, memory, nic, vhost_user};
use crate::slots::{PciMap, ScsiMap};
use qhotplug_cmdline::{
    Balloon, Cdrom, Disk, MemoryDevice, Nic, Pci, Rng, ScsiAddr, SerialPort, Vcpu, VhostUserBlk,
    VirtioFs, VirtioSerial, VmSpec,
};

/// The kinds of device the SDK plugs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Disk,
    Nic,
    Cdrom,
    Vcpu,
    Memory,
    Balloon,
    VhostUserBlk,
    VirtioFs,
    VirtioSerial,
    SerialPort,
    Rng,
}

impl Kind {
    /// The kind's name in errors.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Disk => "disk",
            Kind::Nic => "NIC",
            Kind::Cdrom => "CD-ROM",
            Kind::Vcpu => "vCPU",
            Kind::Memory => "memory device",
            Kind::Balloon => "balloon",
            Kind::VhostUserBlk => "vhost-user disk",
            Kind::VirtioFs => "virtio-fs share",
            Kind::VirtioSerial => "virtio-serial controller",
            Kind::SerialPort => "serial port",
            Kind::Rng => "RNG",
        }
    }

    /// What its hot-add and hot-remove are called in errors.
    pub(crate) fn operation(self) -> &'static str {
        match self {
            Kind::Disk => <crate::DiskConfig as kinds::Kind>::OPERATION,
            Kind::Nic => <crate::NicConfig as kinds::Kind>::OPERATION,
            Kind::Cdrom => <crate::CdromConfig as kinds::Kind>::OPERATION,
            Kind::Vcpu => <Vcpu as kinds::Kind>::OPERATION,
            Kind::Memory => <crate::MemoryConfig as kinds::Kind>::OPERATION,
            Kind::Balloon => <crate::BalloonConfig as kinds::Kind>::OPERATION,
            Kind::VhostUserBlk => <crate::VhostUserBlkConfig as kinds::Kind>::OPERATION,
            Kind::VirtioFs => <crate::VirtioFsConfig as kinds::Kind>::OPERATION,
            Kind::VirtioSerial => <crate::VirtioSerialConfig as kinds::Kind>::OPERATION,
            Kind::SerialPort => <crate::SerialPortConfig as kinds::Kind>::OPERATION,
            Kind::Rng => <crate::RngConfig as kinds::Kind>::OPERATION,
        }
    }

    /// The QMP commands its hot-add and hot-remove use.
    pub(crate) fn commands(self) -> &'static [&'static str] {
        match self {
            Kind::Disk => <crate::DiskConfig as kinds::Kind>::COMMANDS,
            Kind::Nic => <crate::NicConfig as kinds::Kind>::COMMANDS,
            Kind::Cdrom => <crate::CdromConfig as kinds::Kind>::COMMANDS,
            Kind::Vcpu => <Vcpu as kinds::Kind>::COMMANDS,
            Kind::Memory => <crate::MemoryConfig as kinds::Kind>::COMMANDS,
            Kind::Balloon => <crate::BalloonConfig as kinds::Kind>::COMMANDS,
            Kind::VhostUserBlk => <crate::VhostUserBlkConfig as kinds::Kind>::COMMANDS,
            Kind::VirtioFs => <crate::VirtioFsConfig as kinds::Kind>::COMMANDS,
            Kind::VirtioSerial => <crate::VirtioSerialConfig as kinds::Kind>::COMMANDS,
            Kind::SerialPort => <crate::SerialPortConfig as kinds::Kind>::COMMANDS,
            Kind::Rng => <crate::RngConfig as kinds::Kind>::COMMANDS,
        }
    }
}

/// A placed device, as `vm.spec()` lists it.
#[derive(Debug, Clone)]
pub(crate) enum Device {
    Disk(Disk),
    Nic(Nic),
    Cdrom(Cdrom),
    Vcpu(Vcpu),
    Memory(MemoryDevice),
    Balloon(Balloon),
    VhostUserBlk(VhostUserBlk),
    VirtioFs(VirtioFs),
    VirtioSerial(VirtioSerial),
    SerialPort(SerialPort),
    Rng(Rng),
}

impl Device {
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Device::Disk(_) => Kind::Disk,
            Device::Nic(_) => Kind::Nic,
            Device::Cdrom(_) => Kind::Cdrom,
            Device::Vcpu(_) => Kind::Vcpu,
            Device::Memory(_) => Kind::Memory,
            Device::Balloon(_) => Kind::Balloon,
            Device::VhostUserBlk(_) => Kind::VhostUserBlk,
            Device::VirtioFs(_) => Kind::VirtioFs,
            Device::VirtioSerial(_) => Kind::VirtioSerial,
            Device::SerialPort(_) => Kind::SerialPort,
            Device::Rng(_) => Kind::Rng,
        }
    }

    pub(crate) fn id(&self) -> &str {
        match self {
            Device::Disk(d) => &d.id,
            Device::Nic(n) => &n.id,
            Device::Cdrom(c) => &c.id,
            Device::Vcpu(c) => &c.id,
            Device::Memory(m) => &m.id,
            Device::Balloon(b) => &b.id,
            Device::VhostUserBlk(d) => &d.id,
            Device::VirtioFs(d) => &d.id,
            Device::VirtioSerial(d) => &d.id,
            Device::SerialPort(d) => &d.id,
            Device::Rng(d) => &d.id,
        }
    }

    pub(crate) fn place(&self) -> Place {
        match self {
            Device::Disk(d) => disk::place(d),
            Device::Nic(n) => Place::Pci(n.pci.clone()),
            Device::Cdrom(c) => cdrom::place(c),
            Device::Vcpu(_) => Place::Fixed,
            Device::Memory(m) => memory::place(m),
            Device::Balloon(b) => Place::Pci(b.pci.clone()),
            Device::VhostUserBlk(d) => Place::Pci(d.pci.clone()),
            Device::VirtioFs(d) => Place::Pci(d.pci.clone()),
            Device::VirtioSerial(d) => Place::Pci(d.pci.clone()),
            Device::Rng(d) => Place::Pci(d.pci.clone()),
            Device::SerialPort(_) => Place::Fixed,
        }
    }

    /// What goes before the guest is asked to let the device go, with what puts it back if the
    /// device stays (a CD-ROM's medium).
    pub(crate) fn before_unplug(&self) -> Option<(Delete, Vec<Delete>)> {
        match self {
            Device::Cdrom(c) => cdrom::before_unplug(c),
            _ => None,
        }
    }

    /// What goes once the guest has let the device go, in order.
    pub(crate) fn teardown(&self) -> Vec<Delete> {
        match self {
            Device::Disk(d) => disk::teardown(d),
            Device::Nic(n) => nic::teardown(n),
            Device::Cdrom(c) => cdrom::teardown(c),
            Device::Memory(m) => memory::teardown(m),
            Device::VhostUserBlk(d) => vhost_user::teardown(&d.chardev()),
            Device::VirtioFs(d) => vhost_user::teardown(&d.chardev()),
            Device::SerialPort(d) => vhost_user::teardown(&d.chardev()),
            Device::Rng(d) => vec![Delete::Object(qhotplug_cmdline::names::rng(&d.id))],
            Device::Vcpu(_) | Device::Balloon(_) | Device::VirtioSerial(_) => Vec::new(),
        }
    }
}

impl Place {
    /// The PCI address of a kind that asked for one (`Want::Pci`); any other place is
    /// [`Error::AddressMismatch`](crate::Error::AddressMismatch) for device `id`.
    pub(crate) fn pci(self, id: &str) -> crate::error::Result<Pci> {
        match self {
            Place::Pci(pci) => Ok(pci),
            _ => Err(crate::error::Error::AddressMismatch(id.to_owned())),
        }
    }
}

/// Where a device sits, for the slot maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Place {
    Pci(Pci),
    Scsi(ScsiAddr),
    /// Somewhere no slot map of the SDK's covers: an IDE unit, a vCPU slot, a DIMM slot (QEMU
    /// picks it).
    Fixed,
}

/// What the SDK knows of a device id besides its description, which lives in `State::spec`.
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    /// A hot-add holds the id, and this place.
    Adding { place: Place },
    /// A device in the spec.
    Placed {
        kind: Kind,
        /// A removal or a change is running.
        busy: bool,
        /// A `device_del` was accepted but the guest has not let the device go yet.
        unplug_pending: bool,
        /// The state's epoch when the device joined the spec: `reconcile` judges only devices
        /// older than its own queries.
        since: u64,
    },
    /// `reconcile` is deleting what a device by this id left in QEMU: nothing may take the id
    /// until it is done, or the deletes would hit the newcomer's backends.
    Cleaning,
    /// A hot-add failed after `device_add` and the guest did not give the device back: QEMU may
    /// have it, with its backends. `reconcile` adopts the device as planned if QEMU has it, or
    /// cleans up after it.
    InDoubt { device: Box<Device> },
}

pub(crate) struct State {
    pub(crate) spec: VmSpec,
    pub(crate) pci: PciMap,
    pub(crate) scsi: ScsiMap,
    pub(crate) devices: HashMap<String, Entry>,
    /// Ids a hot-add through this handle used whose leftovers `reconcile` may still have to clean
    /// up; an id leaves once its device is confirmed gone and its backends deleted.
    pub(crate) touched: HashSet<String>,
    /// Counts the devices that joined the spec; see `Entry::Placed::since`.
    pub(crate) epoch: u64,
    /// vCPU threads QEMU has started over the VM's life, as far as this handle knows (those
    /// plugged at the first `set_vcpus`, then every hot-add): under TCG each takes one of
    /// `maxcpus` translation contexts that an unplug never gives back.
    pub(crate) vcpus_started: Option<u32>,
    /// The VM runs under TCG (not KVM), once `query-kvm` was asked.
    pub(crate) tcg: Option<bool>,
    /// Ids whose last device went without its own `DEVICE_DELETED` being seen: QEMU may send it
    /// late, and the next unplug of the id must not take it for its own.
    pub(crate) late_deleted: HashSet<String>,
}

impl State {
    /// A state for `spec` and the maps discovery filled; the spec's own devices are marked placed.
    pub(crate) fn new(spec: VmSpec, pci: PciMap, scsi: ScsiMap) -> State {
        let mut state = State {
            spec,
            pci,
            scsi,
            devices: HashMap::new(),
            touched: HashSet::new(),
            epoch: 0,
            vcpus_started: None,
            tcg: None,
            late_deleted: HashSet::new(),
        };
        let placed: Vec<Device> = state.all_devices();
        for device in placed {
            match device.place() {
                Place::Pci(pci) => state.pci.mark(&pci),
                Place::Scsi(addr) => {
                    let _ = state.scsi.claim(&addr);
                }
                Place::Fixed => {}
            }
            state
                .devices
                .insert(device.id().to_owned(), placed_entry(device.kind(), 0));
        }
        state
    }

    fn all_devices(&self) -> Vec<Device> {
        let s = &self.spec;
        let disks = s.disks.iter().cloned().map(Device::Disk);
        disks
            .chain(s.nics.iter().cloned().map(Device::Nic))
            .chain(s.cdroms.iter().cloned().map(Device::Cdrom))
            .chain(s.vcpus.iter().cloned().map(Device::Vcpu))
            .chain(s.memory_devices.iter().cloned().map(Device::Memory))
            .chain(s.balloon.iter().cloned().map(Device::Balloon))
            .chain(s.vhost_user_blks.iter().cloned().map(Device::VhostUserBlk))
            .chain(s.virtio_fs.iter().cloned().map(Device::VirtioFs))
            .chain(s.virtio_serials.iter().cloned().map(Device::VirtioSerial))
            .chain(s.serial_ports.iter().cloned().map(Device::SerialPort))
            .chain(s.rngs.iter().cloned().map(Device::Rng))
            .collect()
    }

    /// The device with this id, as the spec lists it: looked up in its kind's list only (live
    /// changes and removals call this; nothing else is cloned).
    pub(crate) fn device(&self, id: &str) -> Option<Device> {
        fn pick<T: Clone>(list: &[T], is: impl Fn(&T) -> bool) -> Option<T> {
            list.iter().find(|x| is(x)).cloned()
        }
        let Some(Entry::Placed { kind, .. }) = self.devices.get(id) else {
            return None;
        };
        let s = &self.spec;
        match kind {
            Kind::Disk => pick(&s.disks, |d| d.id == id).map(Device::Disk),
            Kind::Nic => pick(&s.nics, |n| n.id == id).map(Device::Nic),
            Kind::Cdrom => pick(&s.cdroms, |c| c.id == id).map(Device::Cdrom),
            Kind::Vcpu => pick(&s.vcpus, |c| c.id == id).map(Device::Vcpu),
            Kind::Memory => pick(&s.memory_devices, |m| m.id == id).map(Device::Memory),
            Kind::Balloon => s
                .balloon
                .clone()
                .filter(|b| b.id == id)
                .map(Device::Balloon),
            Kind::VhostUserBlk => {
                pick(&s.vhost_user_blks, |d| d.id == id).map(Device::VhostUserBlk)
            }
            Kind::VirtioFs => pick(&s.virtio_fs, |d| d.id == id).map(Device::VirtioFs),
            Kind::VirtioSerial => pick(&s.virtio_serials, |d| d.id == id).map(Device::VirtioSerial),
            Kind::SerialPort => pick(&s.serial_ports, |d| d.id == id).map(Device::SerialPort),
            Kind::Rng => pick(&s.rngs, |d| d.id == id).map(Device::Rng),
        }
    }

    /// Takes the device with this id out of its kind's list in the spec.
    fn take(&mut self, id: &str, kind: Kind) -> Option<Device> {
        fn pull<T>(list: &mut Vec<T>, is: impl Fn(&T) -> bool) -> Option<T> {
            let at = list.iter().position(is)?;
            Some(list.remove(at))
        }
        let s = &mut self.spec;
        match kind {
            Kind::Disk => pull(&mut s.disks, |d| d.id == id).map(Device::Disk),
            Kind::Nic => pull(&mut s.nics, |n| n.id == id).map(Device::Nic),
            Kind::Cdrom => pull(&mut s.cdroms, |c| c.id == id).map(Device::Cdrom),
            Kind::Vcpu => pull(&mut s.vcpus, |c| c.id == id).map(Device::Vcpu),
            Kind::Memory => pull(&mut s.memory_devices, |m| m.id == id).map(Device::Memory),
            Kind::Balloon => s.balloon.take_if(|b| b.id == id).map(Device::Balloon),
            Kind::VhostUserBlk => {
                pull(&mut s.vhost_user_blks, |d| d.id == id).map(Device::VhostUserBlk)
            }
            Kind::VirtioFs => pull(&mut s.virtio_fs, |d| d.id == id).map(Device::VirtioFs),
            Kind::VirtioSerial => {
                pull(&mut s.virtio_serials, |d| d.id == id).map(Device::VirtioSerial)
            }
            Kind::SerialPort => pull(&mut s.serial_ports, |d| d.id == id).map(Device::SerialPort),
            Kind::Rng => pull(&mut s.rngs, |d| d.id == id).map(Device::Rng),
        }
    }

    /// Frees a device's place. A place that was not taken is a bug of the SDK's: said loudly, and
    /// nothing else is freed.
    pub(crate) fn release(&mut self, place: &Place) {
        let freed = match place {
            Place::Pci(pci) => self.pci.release(pci),
            Place::Scsi(addr) => self.scsi.release(addr),
            Place::Fixed => Ok(()),
        };
        if let Err(e) = freed {
            tracing::error!(?e, "a place freed twice");
        }
    }

    /// Drops a device that is gone from QEMU: its entry, its place in the spec, its slot, and
    /// (when nothing of it is left to clean up) its id from `touched`.
    pub(crate) fn forget(&mut self, id: &str, clean: bool) {
        let entry = self.devices.remove(id);
        if clean {
            self.touched.remove(id);
        }
        let Some(Entry::Placed { kind, .. }) = entry else {
            return;
        };
        let Some(device) = self.take(id, kind) else {
            return;
        };
        let place = device.place();
        self.release(&place);
    }

    /// Rebuilds the slot maps from QEMU's word (`query-pci`, the QOM placements of devices behind
    /// root ports) and the SDK's own: the places of its devices and of hot-adds still running. A
    /// slot of a device someone else removed is free again.
    pub(crate) fn rebuild_slots(
        &mut self,
        pci: &[qhotplug_qmp::command::PciInfo],
        placements: &[Pci],
    ) {
        self.pci.clear_taken();
        self.scsi.clear_taken();
        self.pci.fill_from(pci);
        for p in placements {
            self.pci.mark(p);
        }
        let adding = self.devices.values().filter_map(|e| match e {
            Entry::Adding { place } => Some(place.clone()),
            Entry::InDoubt { device } => Some(device.place()),
            _ => None,
        });
        let places: Vec<Place> = self
            .all_devices()
            .iter()
            .map(Device::place)
            .chain(adding)
            .collect();
        for place in places {
            match place {
                Place::Pci(pci) => self.pci.mark(&pci),
                Place::Scsi(addr) => {
                    let _ = self.scsi.claim(&addr);
                }
                Place::Fixed => {}
            }
        }
    }

    /// Settles in-doubt device `id`: into the spec when QEMU has it (`present`), else its id is
    /// let go (its leftovers are `reconcile`'s to delete). True when adopted.
    pub(crate) fn settle_doubt(&mut self, id: &str, present: bool) -> bool {
        let Some(Entry::InDoubt { device }) = self.devices.remove(id) else {
            return false;
        };
        if present {
            self.insert(*device);
        }
        present
    }

    pub(crate) fn insert(&mut self, device: Device) {
        self.epoch += 1;
        self.devices.insert(
            device.id().to_owned(),
            placed_entry(device.kind(), self.epoch),
        );
        match device {
            Device::Disk(d) => self.spec.disks.push(d),
            Device::Nic(n) => self.spec.nics.push(n),
            Device::Cdrom(c) => self.spec.cdroms.push(c),
            Device::Vcpu(c) => self.spec.vcpus.push(c),
            Device::Memory(m) => self.spec.memory_devices.push(m),
            Device::Balloon(b) => self.spec.balloon = Some(b),
            Device::VhostUserBlk(d) => self.spec.vhost_user_blks.push(d),
            Device::VirtioFs(d) => self.spec.virtio_fs.push(d),
            Device::VirtioSerial(d) => self.spec.virtio_serials.push(d),
            Device::SerialPort(d) => self.spec.serial_ports.push(d),
            Device::Rng(d) => self.spec.rngs.push(d),
        }
    }
}

fn placed_entry(kind: Kind, since: u64) -> Entry {
    Entry::Placed {
        kind,
        busy: false,
        unplug_pending: false,
        since,
    }
}
