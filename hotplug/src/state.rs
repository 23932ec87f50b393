//! What the SDK knows of one VM, behind the [`Vm`](crate::Vm) handle: its topology (the spec, with
//! every hot-added device in and every removed one out), the slot maps, which ids are being added
//! or removed, and the reservations that hold an id and an address for a hot-add.
//!
//! Invariant: an address is freed only once its device is confirmed gone (`DEVICE_DELETED`, or
//! QEMU no longer listing it), or when a hot-add that took it was rolled back.

use std::collections::{HashMap, HashSet};

use crate::kinds::{Device, DeviceKind, Place};
use crate::slots::{PciMap, ScsiMap};
use qhotplug_cmdline::{Pci, VmSpec};

/// What the SDK knows of a device id besides its description, which lives in `State::spec`.
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    /// A hot-add holds the id, and this place.
    Adding { place: Place },
    /// A device in the spec.
    Placed {
        kind: DeviceKind,
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
    /// The topology: written only through the methods below.
    spec: VmSpec,
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
    /// The balloon's target as this process last set it (QMP reports only what the guest has).
    pub(crate) balloon_target: Option<u64>,
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
            balloon_target: None,
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

    /// The topology as the SDK knows it.
    pub(crate) fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// The VM took an incoming migration: it is a VM like any other now, and a relaunch from
    /// its spec must not wait for one.
    pub(crate) fn migrated_in(&mut self) {
        self.spec.incoming = false;
    }

    /// Records a live change to a device in the spec (its link, limits, medium, size), in place.
    pub(crate) fn update(&mut self, device: Device) {
        if !device.replace(&mut self.spec) {
            tracing::error!("an update of a device the spec does not list");
        }
    }

    fn all_devices(&self) -> Vec<Device> {
        Device::all(&self.spec)
    }

    /// The device with this id, as the spec lists it: looked up in its kind's list only (live
    /// changes and removals call this; nothing else is cloned).
    pub(crate) fn device(&self, id: &str) -> Option<Device> {
        let Some(Entry::Placed { kind, .. }) = self.devices.get(id) else {
            return None;
        };
        Device::find(&self.spec, *kind, id)
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
        let Some(device) = Device::take(&mut self.spec, kind, id) else {
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
        device.put(&mut self.spec);
    }
}

fn placed_entry(kind: DeviceKind, since: u64) -> Entry {
    Entry::Placed {
        kind,
        busy: false,
        unplug_pending: false,
        since,
    }
}
