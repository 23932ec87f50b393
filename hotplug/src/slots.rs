//! Where hot-plugged devices go: a slot map per PCI bus and a target map per SCSI bus.
//!
//! The maps are filled from `query-pci` (and the spec's SCSI disks) and from our own allocations,
//! and a slot is freed only when its device is confirmed gone, so concurrent hotplugs on one VM never
//! get the same address.

use bitvec::prelude::*;
use qhotplug_cmdline::{Machine, Pci, ScsiAddr};
use qhotplug_qmp::command::{PciDeviceInfo, PciInfo};

/// `pcie-root-port`'s vendor and device ids (Red Hat, `1b36:000c`).
const ROOT_PORT_ID: (i64, i64) = (0x1b36, 0x000c);
/// Targets on a virtio-scsi bus (`scsi-id` 0–255).
pub(crate) const SCSI_TARGETS: usize = 256;

/// One PCI bus: which of its 32 slots are taken.
#[derive(Debug, Clone)]
pub(crate) struct Bus {
    pub(crate) name: String,
    /// QEMU's bus number, when the bus was seen in `query-pci`.
    pub(crate) number: Option<i64>,
    taken: BitArr!(for 32, in u32),
    /// The slots devices may be hot-plugged into.
    usable: std::ops::Range<u8>,
}

impl Bus {
    fn new(name: impl Into<String>, number: Option<i64>, usable: std::ops::Range<u8>) -> Bus {
        Bus {
            name: name.into(),
            number,
            taken: BitArray::ZERO,
            usable,
        }
    }
}

/// The PCI slot maps of one VM.
#[derive(Debug, Clone)]
pub(crate) struct PciMap {
    machine: Machine,
    /// The root bus, then (q35) each root port's bus, in the order they were found.
    buses: Vec<Bus>,
    /// The bus (by index) and slot `allocate` gave last: it goes on from there.
    last: Option<(usize, u8)>,
    /// Slots freed, least recently first: given again only when no other is free.
    freed: std::collections::VecDeque<(usize, u8)>,
}

/// Why no slot could be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SlotError {
    /// Every usable slot (pc) or every root port (q35) is taken.
    Full { bus: String },
    /// The asked-for address is taken or not usable for hotplug.
    Taken { bus: String, slot: u8 },
}

/// An address freed that was not taken: freed twice, or never given (a bug of the caller's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotTaken {
    pub(crate) bus: String,
    pub(crate) slot: u16,
}

impl PciMap {
    /// An empty map for `machine`: `pci.0` slots 1–31 on `pc` (slot 0 is the host bridge);
    /// nothing hot-pluggable on `q35` until root ports are added.
    pub(crate) fn new(machine: Machine) -> PciMap {
        let root = match machine {
            Machine::Pc => Bus::new("pci.0", Some(0), 1..32),
            // Devices on pcie.0 are not hot-pluggable: only root ports take hotplug.
            Machine::Q35 => Bus::new("pcie.0", Some(0), 0..0),
        };
        PciMap {
            machine,
            buses: vec![root],
            last: None,
            freed: std::collections::VecDeque::new(),
        }
    }

    /// Adds a `pcie-root-port`'s bus: one device at slot 0.
    pub(crate) fn add_root_port(&mut self, id: &str, number: Option<i64>) {
        if let Some(bus) = self.buses.iter_mut().find(|b| b.name == id) {
            bus.number = bus.number.or(number);
        } else {
            self.buses.push(Bus::new(id, number, 0..1));
        }
    }

    /// Marks every device `query-pci` lists as taken, and learns q35 root ports (by qdev id) and
    /// their bus numbers.
    pub(crate) fn fill_from(&mut self, info: &[PciInfo]) {
        for bus in info {
            for dev in &bus.devices {
                self.fill_device(dev);
            }
        }
    }

    fn fill_device(&mut self, dev: &PciDeviceInfo) {
        if let Some(bridge) = &dev.pci_bridge {
            let is_port = (dev.id.vendor, dev.id.device) == ROOT_PORT_ID;
            if self.machine == Machine::Q35 && is_port && !dev.qdev_id.is_empty() {
                // Until the firmware numbers the buses (a VM that has not run yet), every
                // secondary bus reads 0 and nothing behind a port is listed.
                let number = Some(bridge.bus.secondary).filter(|&n| n != 0);
                self.add_root_port(&dev.qdev_id, number);
            }
            for child in &bridge.devices {
                self.fill_device(child);
            }
        }
        if let Some(bus) = self.buses.iter_mut().find(|b| b.number == Some(dev.bus)) {
            if let Some(slot) = usize::try_from(dev.slot).ok().filter(|&s| s < 32) {
                bus.taken.set(slot, true);
            }
        }
    }

    /// Takes the next free hot-pluggable slot after the one it gave last (wrapping round): on `pc`,
    /// a slot of `pci.0`; on `q35`, slot 0 of a root port with nothing behind it. A slot this map
    /// freed is given again only when no slot it never freed is free, the least recently freed
    /// first: a guest may still act on an eject request it queued for the slot's last device
    /// (QEMU's ACPI hotplug notifies every slot with an eject pending at each event, and Linux's
    /// acpiphp handles a second notify for a slot after the first one emptied it), and would
    /// eject a newcomer. Seen in `tests/tests/apply_guest.rs`: a removal and an addition in one
    /// apply, the new RNG in the slot the removed disk had just left, ejected by the guest.
    pub(crate) fn allocate(&mut self) -> Result<Pci, SlotError> {
        let places: Vec<(usize, u8)> = self
            .buses
            .iter()
            .enumerate()
            .flat_map(|(b, bus)| bus.usable.clone().map(move |slot| (b, slot)))
            .collect();
        let start = self
            .last
            .and_then(|last| places.iter().position(|p| *p == last))
            .map_or(0, |at| at + 1);
        let is_free = |&(b, slot): &(usize, u8)| !self.buses[b].taken[usize::from(slot)];
        let free = (0..places.len())
            .map(|i| places[(start + i) % places.len()])
            .find(|p| is_free(p) && !self.freed.contains(p))
            .or_else(|| self.freed.iter().copied().find(is_free));
        if let Some((b, slot)) = free {
            self.last = Some((b, slot));
            self.freed.retain(|p| *p != (b, slot));
            let bus = &mut self.buses[b];
            bus.taken.set(usize::from(slot), true);
            return Ok(Pci::new(bus.name.clone(), slot));
        }
        Err(SlotError::Full {
            bus: match self.machine {
                Machine::Pc => "pci.0".into(),
                Machine::Q35 => "pcie-root-port".into(),
            },
        })
    }

    /// Takes an address the caller chose. A bus we do not know is left to QEMU to judge (it may be
    /// a bridge of the caller's); on a bus we know, the slot must be free and hot-pluggable.
    pub(crate) fn claim(&mut self, pci: &Pci) -> Result<(), SlotError> {
        let Some(bus) = self.buses.iter_mut().find(|b| b.name == pci.bus) else {
            return Ok(());
        };
        let slot = usize::from(pci.slot);
        if slot >= 32 || bus.taken[slot] || !bus.usable.contains(&pci.slot) {
            return Err(SlotError::Taken {
                bus: pci.bus.clone(),
                slot: pci.slot,
            });
        }
        bus.taken.set(slot, true);
        Ok(())
    }

    /// Frees every slot, keeping the buses: the start of a rebuild from QEMU's list and the SDK's
    /// own reservations (`reconcile`).
    pub(crate) fn clear_taken(&mut self) {
        for bus in &mut self.buses {
            bus.taken = BitArray::ZERO;
        }
    }

    /// Marks an address taken whatever it held (a device QEMU has that we did not know of).
    pub(crate) fn mark(&mut self, pci: &Pci) {
        if let Some(bus) = self.buses.iter_mut().find(|b| b.name == pci.bus) {
            if pci.slot < 32 {
                bus.taken.set(usize::from(pci.slot), true);
            }
        }
    }

    /// Frees an address once its device is confirmed gone (or never made it in). One that was
    /// not taken is refused: freeing twice is a bug, and would hand one slot to two devices.
    pub(crate) fn release(&mut self, pci: &Pci) -> Result<(), NotTaken> {
        if let Some(b) = self.buses.iter().position(|b| b.name == pci.bus) {
            let bus = &mut self.buses[b];
            if pci.slot < 32 {
                if !bus.taken[usize::from(pci.slot)] {
                    return Err(NotTaken {
                        bus: pci.bus.clone(),
                        slot: pci.slot.into(),
                    });
                }
                bus.taken.set(usize::from(pci.slot), false);
                self.freed.retain(|p| *p != (b, pci.slot));
                self.freed.push_back((b, pci.slot));
            }
        }
        Ok(())
    }

    /// The names of the root ports (q35), in order.
    #[cfg(test)]
    pub(crate) fn root_ports(&self) -> impl Iterator<Item = &str> {
        self.buses.iter().skip(1).map(|b| b.name.as_str())
    }
}

/// The targets of each virtio-scsi bus.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScsiMap {
    buses: Vec<(String, BitVec)>,
}

impl ScsiMap {
    /// Adds a controller's bus (`<id>.0`).
    pub(crate) fn add_bus(&mut self, bus: &str) {
        if !self.buses.iter().any(|(b, _)| b == bus) {
            self.buses.push((bus.to_owned(), bitvec![0; SCSI_TARGETS]));
        }
    }

    /// Frees every target, keeping the buses (see [`PciMap::clear_taken`]).
    pub(crate) fn clear_taken(&mut self) {
        for (_, taken) in &mut self.buses {
            taken.fill(false);
        }
    }

    /// True when there is at least one bus.
    pub(crate) fn has_buses(&self) -> bool {
        !self.buses.is_empty()
    }

    /// Takes the first free target (lun 0) on `bus`, or on the first bus with one.
    pub(crate) fn allocate(&mut self, bus: Option<&str>) -> Result<ScsiAddr, SlotError> {
        for (name, taken) in &mut self.buses {
            if bus.is_some_and(|b| b != name) {
                continue;
            }
            if let Some(target) = taken.first_zero() {
                taken.set(target, true);
                return Ok(ScsiAddr {
                    bus: name.clone(),
                    channel: 0,
                    scsi_id: target as u16,
                    lun: 0,
                });
            }
        }
        Err(SlotError::Full {
            bus: bus.unwrap_or("virtio-scsi").to_owned(),
        })
    }

    /// Takes an address the caller chose; a bus we do not know is left to QEMU to judge.
    pub(crate) fn claim(&mut self, addr: &ScsiAddr) -> Result<(), SlotError> {
        let Some((_, taken)) = self.buses.iter_mut().find(|(b, _)| *b == addr.bus) else {
            return Ok(());
        };
        let target = usize::from(addr.scsi_id);
        // A target with lun 0 taken counts as taken: we place one disk per target.
        if target >= SCSI_TARGETS || taken[target] {
            return Err(SlotError::Taken {
                bus: addr.bus.clone(),
                slot: addr.scsi_id.min(255) as u8,
            });
        }
        taken.set(target, true);
        Ok(())
    }

    /// Frees a target; one that was not taken is refused (see [`PciMap::release`]).
    pub(crate) fn release(&mut self, addr: &ScsiAddr) -> Result<(), NotTaken> {
        if let Some((_, taken)) = self.buses.iter_mut().find(|(b, _)| *b == addr.bus) {
            let target = usize::from(addr.scsi_id);
            if target < SCSI_TARGETS {
                if !taken[target] {
                    return Err(NotTaken {
                        bus: addr.bus.clone(),
                        slot: addr.scsi_id,
                    });
                }
                taken.set(target, false);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qhotplug_qmp::command::{PciBridgeInfo, PciBusInfo, PciDeviceClass, PciDeviceId};

    fn dev(bus: i64, slot: i64, qdev: &str) -> PciDeviceInfo {
        PciDeviceInfo {
            bus,
            slot,
            function: 0,
            class_info: PciDeviceClass {
                desc: None,
                class: 0,
            },
            id: PciDeviceId {
                vendor: 0x1af4,
                device: 0x1001,
            },
            qdev_id: qdev.into(),
            pci_bridge: None,
        }
    }

    fn port(slot: i64, qdev: &str, secondary: i64, behind: Vec<PciDeviceInfo>) -> PciDeviceInfo {
        PciDeviceInfo {
            id: PciDeviceId {
                vendor: ROOT_PORT_ID.0,
                device: ROOT_PORT_ID.1,
            },
            pci_bridge: Some(PciBridgeInfo {
                bus: PciBusInfo {
                    number: 0,
                    secondary,
                    subordinate: secondary,
                },
                devices: behind,
            }),
            ..dev(0, slot, qdev)
        }
    }

    #[test]
    fn pc_skips_what_query_pci_lists_and_never_gives_a_slot_twice() {
        let mut map = PciMap::new(Machine::Pc);
        map.fill_from(&[PciInfo {
            bus: 0,
            devices: vec![dev(0, 0, ""), dev(0, 1, ""), dev(0, 2, "x")],
        }]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..29 {
            let pci = map.allocate().unwrap();
            assert_eq!(pci.bus, "pci.0");
            assert!(pci.slot >= 3, "{pci:?}");
            assert!(seen.insert(pci.slot));
        }
        assert_eq!(
            map.allocate(),
            Err(SlotError::Full {
                bus: "pci.0".into()
            })
        );
        map.release(&Pci::new("pci.0", 17)).unwrap();
        assert_eq!(map.allocate().unwrap().slot, 17);
    }

    #[test]
    fn a_slot_just_freed_is_given_again_only_after_every_other_one() {
        let mut map = PciMap::new(Machine::Pc);
        let first = map.allocate().unwrap();
        map.release(&first).unwrap();
        let mut given = vec![first.slot];
        loop {
            let pci = map.allocate().unwrap();
            map.release(&pci).unwrap();
            if pci.slot == first.slot {
                break;
            }
            given.push(pci.slot);
        }
        assert_eq!(given, (1..32).collect::<Vec<u8>>());
    }

    #[test]
    fn a_slot_freed_before_any_allocation_waits_for_the_others_too() {
        // A handle that attached and removed a device first (an apply's removal, then its
        // addition): the low slot it freed is not the next one given.
        let mut map = PciMap::new(Machine::Pc);
        for slot in [2, 3] {
            map.mark(&Pci::new("pci.0", slot));
        }
        map.release(&Pci::new("pci.0", 2)).unwrap();
        assert_eq!(map.allocate().unwrap().slot, 1);
        assert_eq!(map.allocate().unwrap().slot, 4);
        for slot in 5..32 {
            map.mark(&Pci::new("pci.0", slot));
        }
        // Only the freed one is left: it is given.
        assert_eq!(map.allocate().unwrap().slot, 2);
    }

    #[test]
    fn a_place_freed_twice_is_refused() {
        let mut map = PciMap::new(Machine::Pc);
        let pci = map.allocate().unwrap();
        map.release(&pci).unwrap();
        assert_eq!(
            map.release(&pci),
            Err(NotTaken {
                bus: "pci.0".into(),
                slot: pci.slot.into()
            })
        );
        let mut scsi = ScsiMap::default();
        scsi.add_bus("scsi0.0");
        let addr = scsi.allocate(None).unwrap();
        scsi.release(&addr).unwrap();
        assert!(scsi.release(&addr).is_err());
        // What was never given is not freed either.
        assert!(map.release(&Pci::new("pci.0", 30)).is_err());
    }

    #[test]
    fn claim_checks_known_buses_and_passes_unknown_ones() {
        let mut map = PciMap::new(Machine::Pc);
        map.claim(&Pci::new("pci.0", 9)).unwrap();
        assert_eq!(
            map.claim(&Pci::new("pci.0", 9)),
            Err(SlotError::Taken {
                bus: "pci.0".into(),
                slot: 9
            })
        );
        // Slot 0 is the host bridge.
        assert!(map.claim(&Pci::new("pci.0", 0)).is_err());
        map.claim(&Pci::new("bridge1", 3)).unwrap();
        map.claim(&Pci::new("bridge1", 3)).unwrap();
    }

    #[test]
    fn q35_allocates_free_root_ports_in_order() {
        let mut map = PciMap::new(Machine::Q35);
        assert!(matches!(map.allocate(), Err(SlotError::Full { .. })));
        map.fill_from(&[PciInfo {
            bus: 0,
            devices: vec![
                dev(0, 0, ""),
                port(2, "rp0", 1, vec![dev(1, 0, "busy")]),
                port(3, "rp1", 2, vec![]),
                port(4, "rp2", 3, vec![]),
            ],
        }]);
        assert_eq!(map.root_ports().collect::<Vec<_>>(), ["rp0", "rp1", "rp2"]);
        assert_eq!(map.allocate().unwrap(), Pci::new("rp1", 0));
        assert_eq!(map.allocate().unwrap(), Pci::new("rp2", 0));
        assert!(matches!(map.allocate(), Err(SlotError::Full { .. })));
        map.release(&Pci::new("rp0", 0)).unwrap();
        assert_eq!(map.allocate().unwrap(), Pci::new("rp0", 0));
        // Nothing but slot 0 behind a port, and pcie.0 takes no hotplug.
        assert!(map.claim(&Pci::new("rp1", 1)).is_err());
        assert!(map.claim(&Pci::new("pcie.0", 5)).is_err());
    }

    #[test]
    fn scsi_targets_are_unique_per_bus() {
        let mut map = ScsiMap::default();
        assert!(map.allocate(None).is_err());
        map.add_bus("scsi0.0");
        map.add_bus("scsi1.0");
        let a = map.allocate(None).unwrap();
        let b = map.allocate(None).unwrap();
        assert_eq!((a.bus.as_str(), a.scsi_id), ("scsi0.0", 0));
        assert_eq!(b.scsi_id, 1);
        assert_eq!(map.allocate(Some("scsi1.0")).unwrap().scsi_id, 0);
        assert!(map.claim(&b).is_err());
        map.release(&a).unwrap();
        assert_eq!(map.allocate(None).unwrap().scsi_id, 0);
        for _ in 2..SCSI_TARGETS {
            map.allocate(Some("scsi0.0")).unwrap();
        }
        assert!(map.allocate(Some("scsi0.0")).is_err());
    }
}
