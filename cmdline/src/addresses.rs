//! Addresses a spec leaves to the SDK ([`Pci::auto`], [`ScsiAddr::auto`]), given at launch.
//!
//! A launch command line has no `query-pci` to ask, so the free places are what the machine
//! brings with `-nodefaults` (the launcher's): on `pc`, `pci.0` slot 0 (the host bridge) and 1
//! (PIIX3, its IDE, USB and ACPI functions); on `q35`, `pcie.0` slot 0 (the host bridge) and 31
//! (ICH9's LPC, SATA and SMBus), and 29 with `-usb` (its UHCI and EHCI). A device on `q35` goes behind a root port of the spec that
//! nothing sits behind yet (so it can be hot-removed later), and on `pcie.0` only when none is
//! left.

use std::collections::HashSet;

use crate::cdrom::CdromBus;
use crate::device::{DiskFrontend, Pci, ScsiAddr};
use crate::error::{Error, Result};
use crate::machine::Machine;
use crate::memory::MemoryDeviceKind;
use crate::spec::VmSpec;

/// SCSI targets on a virtio-scsi bus (`scsi-id` 0–255).
const SCSI_TARGETS: u16 = 256;

impl VmSpec {
    /// Gives every device whose address is [`Pci::auto`] or [`ScsiAddr::auto`] a free one, in
    /// the spec's order (controllers, disks, NICs, CD-ROMs, memory, the balloon, vhost-user,
    /// virtio-fs, virtio-serial, RNGs): on `pc` the lowest free slot of `pci.0` from 2; on `q35`
    /// the first root port nothing sits behind, else the lowest free slot of `pcie.0` (1–30); a
    /// SCSI device the lowest free target of the first controller, LUN 0. Addresses already given
    /// are kept. [`Launcher::launch`](crate::Launcher::launch) calls it, so the spec a launched VM
    /// reports says where each device went.
    ///
    /// [`Error::InvalidSpec`] when no place is left, or a SCSI device has no controller.
    ///
    /// ```
    /// use qhotplug_cmdline::{Disk, Machine, Pci, VmSpec};
    /// let mut spec = VmSpec::new("vm", Machine::Pc);
    /// spec.disks.push(Disk::virtio_blk("d0", "/var/lib/images/d0.raw", Pci::auto()));
    /// spec.assign_addresses()?;
    /// assert_eq!(spec.disks[0].frontend, qhotplug_cmdline::DiskFrontend::VirtioBlk(Pci::new("pci.0", 2)));
    /// # Ok::<(), qhotplug_cmdline::Error>(())
    /// ```
    pub fn assign_addresses(&mut self) -> Result<()> {
        let mut pci = PciFree::of(self);
        let mut scsi = ScsiFree::of(self);
        let machine = self.machine;
        let mut give = |id: &str, at: &mut Pci| -> Result<()> {
            if at.is_auto() {
                *at = pci.take(machine).ok_or_else(|| {
                    Error::InvalidSpec(format!("{id}: no free PCI slot or root port is left"))
                })?;
            }
            Ok(())
        };
        for c in &mut self.scsi_controllers {
            give(&c.id, &mut c.pci)?;
        }
        for d in &mut self.disks {
            match &mut d.frontend {
                DiskFrontend::VirtioBlk(at) => give(&d.id, at)?,
                DiskFrontend::ScsiHd(at) | DiskFrontend::ScsiGeneric(at) => scsi.give(&d.id, at)?,
            }
        }
        for n in &mut self.nics {
            give(&n.id, &mut n.pci)?;
        }
        for c in &mut self.cdroms {
            if let CdromBus::Scsi(at) = &mut c.bus {
                scsi.give(&c.id, at)?;
            }
        }
        for m in &mut self.memory_devices {
            if let MemoryDeviceKind::VirtioMem { pci: at, .. } = &mut m.kind {
                give(&m.id, at)?;
            }
        }
        if let Some(b) = &mut self.balloon {
            give(&b.id, &mut b.pci)?;
        }
        for d in &mut self.vhost_user_blks {
            give(&d.id, &mut d.pci)?;
        }
        for d in &mut self.virtio_fs {
            give(&d.id, &mut d.pci)?;
        }
        for d in &mut self.virtio_serials {
            give(&d.id, &mut d.pci)?;
        }
        for d in &mut self.rngs {
            give(&d.id, &mut d.pci)?;
        }
        Ok(())
    }
}

/// The PCI places a launch has left: slots of the root bus, and (q35) root ports.
struct PciFree {
    taken: HashSet<(String, u8)>,
    /// Root ports' buses, in the spec's order.
    ports: Vec<String>,
}

impl PciFree {
    fn of(spec: &VmSpec) -> PciFree {
        let mut taken: HashSet<(String, u8)> = pci_addresses(spec)
            .filter(|a| !a.is_auto())
            .map(|a| (a.bus.clone(), a.slot))
            .collect();
        if spec.usb_tablet && spec.machine == Machine::Q35 {
            taken.insert(("pcie.0".to_owned(), 29));
        }
        PciFree {
            taken,
            ports: spec.root_ports.iter().map(|p| p.id.clone()).collect(),
        }
    }

    fn take(&mut self, machine: Machine) -> Option<Pci> {
        let at = match machine {
            Machine::Pc => (2..32).map(|s| Pci::new("pci.0", s)).find(|a| self.free(a)),
            Machine::Q35 => self
                .ports
                .iter()
                .map(|port| Pci::new(port.clone(), 0))
                .chain((1..31).map(|s| Pci::new("pcie.0", s)))
                .find(|a| self.free(a)),
        }?;
        self.taken.insert((at.bus.clone(), at.slot));
        Some(at)
    }

    /// Nothing sits there (a root port takes one device, at slot 0).
    fn free(&self, at: &Pci) -> bool {
        !self.taken.contains(&(at.bus.clone(), at.slot))
    }
}

/// Every PCI address the spec names, given or not.
fn pci_addresses(spec: &VmSpec) -> impl Iterator<Item = &Pci> {
    let disks = spec.disks.iter().filter_map(|d| match &d.frontend {
        DiskFrontend::VirtioBlk(a) => Some(a),
        DiskFrontend::ScsiHd(_) | DiskFrontend::ScsiGeneric(_) => None,
    });
    let memory = spec.memory_devices.iter().filter_map(|m| match &m.kind {
        MemoryDeviceKind::VirtioMem { pci, .. } => Some(pci),
        MemoryDeviceKind::Dimm => None,
    });
    (spec.root_ports.iter().map(|p| &p.pci))
        .chain(spec.scsi_controllers.iter().map(|c| &c.pci))
        .chain(disks)
        .chain(spec.nics.iter().map(|n| &n.pci))
        .chain(memory)
        .chain(spec.balloon.iter().map(|b| &b.pci))
        .chain(spec.vhost_user_blks.iter().map(|d| &d.pci))
        .chain(spec.virtio_fs.iter().map(|d| &d.pci))
        .chain(spec.virtio_serials.iter().map(|d| &d.pci))
        .chain(spec.rngs.iter().map(|d| &d.pci))
}

/// The SCSI targets a launch has left on the first controller.
struct ScsiFree {
    bus: Option<String>,
    taken: HashSet<(String, u16)>,
}

impl ScsiFree {
    fn of(spec: &VmSpec) -> ScsiFree {
        let disks = spec.disks.iter().filter_map(|d| match &d.frontend {
            DiskFrontend::ScsiHd(a) | DiskFrontend::ScsiGeneric(a) => Some(a),
            DiskFrontend::VirtioBlk(_) => None,
        });
        let cdroms = spec.cdroms.iter().filter_map(|c| match &c.bus {
            CdromBus::Scsi(a) => Some(a),
            CdromBus::Ide(_) => None,
        });
        ScsiFree {
            bus: spec.scsi_controllers.first().map(|c| c.bus()),
            taken: disks
                .chain(cdroms)
                .filter(|a| !a.is_auto())
                .map(|a| (a.bus.clone(), a.scsi_id))
                .collect(),
        }
    }

    fn give(&mut self, id: &str, at: &mut ScsiAddr) -> Result<()> {
        if !at.is_auto() {
            return Ok(());
        }
        let bus = self.bus.clone().ok_or_else(|| {
            Error::InvalidSpec(format!("{id}: a SCSI device needs a SCSI controller"))
        })?;
        let target = (0..SCSI_TARGETS)
            .find(|t| !self.taken.contains(&(bus.clone(), *t)))
            .ok_or_else(|| Error::InvalidSpec(format!("{id}: no free target on {bus}")))?;
        self.taken.insert((bus.clone(), target));
        *at = ScsiAddr {
            bus,
            channel: 0,
            scsi_id: target,
            lun: 0,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Disk, Nic, RootPort, ScsiController};
    use crate::Balloon;

    fn nic(id: &str, pci: Pci) -> Nic {
        Nic {
            id: id.into(),
            mac: "52:54:00:12:34:56".parse().unwrap(),
            queues: 1,
            pci,
            vhost: false,
            link_up: true,
        }
    }

    #[test]
    fn pc_takes_the_lowest_free_slots_from_2_around_given_ones() {
        let mut spec = VmSpec::new("a", Machine::Pc);
        spec.disks.push(Disk::virtio_blk("d0", "/x", Pci::auto()));
        spec.disks
            .push(Disk::virtio_blk("d1", "/y", Pci::new("pci.0", 3)));
        spec.nics.push(nic("n0", Pci::auto()));
        spec.balloon = Some(Balloon {
            id: "b".into(),
            pci: Pci::auto(),
        });
        spec.assign_addresses().unwrap();
        assert_eq!(
            spec.disks[0].frontend,
            DiskFrontend::VirtioBlk(Pci::new("pci.0", 2))
        );
        assert_eq!(
            spec.disks[1].frontend,
            DiskFrontend::VirtioBlk(Pci::new("pci.0", 3))
        );
        assert_eq!(spec.nics[0].pci, Pci::new("pci.0", 4));
        assert_eq!(spec.balloon.unwrap().pci, Pci::new("pci.0", 5));
    }

    #[test]
    fn q35_fills_empty_root_ports_first_then_pcie0() {
        let mut spec = VmSpec::new("a", Machine::Q35);
        for (i, id) in ["rp0", "rp1"].iter().enumerate() {
            spec.root_ports.push(RootPort {
                id: (*id).into(),
                chassis: i as u8 + 1,
                pci: Pci::new("pcie.0", 2 + i as u8),
            });
        }
        spec.nics.push(nic("n0", Pci::new("rp0", 0)));
        spec.disks.push(Disk::virtio_blk("d0", "/x", Pci::auto()));
        spec.disks.push(Disk::virtio_blk("d1", "/y", Pci::auto()));
        spec.assign_addresses().unwrap();
        spec.validate().unwrap();
        assert_eq!(
            spec.disks[0].frontend,
            DiskFrontend::VirtioBlk(Pci::new("rp1", 0))
        );
        assert_eq!(
            spec.disks[1].frontend,
            DiskFrontend::VirtioBlk(Pci::new("pcie.0", 1))
        );
    }

    #[test]
    fn scsi_devices_take_free_targets_of_the_first_controller() {
        let mut spec = VmSpec::new("a", Machine::Pc);
        spec.scsi_controllers.push(ScsiController {
            id: "scsi0".into(),
            pci: Pci::auto(),
        });
        let scsi = |id: &str, at| Disk::new(id, "/x", DiskFrontend::ScsiHd(at));
        let given = ScsiAddr {
            bus: "scsi0.0".into(),
            channel: 0,
            scsi_id: 0,
            lun: 0,
        };
        spec.disks.push(scsi("s0", ScsiAddr::auto()));
        spec.disks.push(scsi("s1", given));
        spec.assign_addresses().unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.scsi_controllers[0].pci, Pci::new("pci.0", 2));
        assert_eq!(
            spec.disks[0].frontend,
            DiskFrontend::ScsiHd(ScsiAddr {
                bus: "scsi0.0".into(),
                channel: 0,
                scsi_id: 1,
                lun: 0
            })
        );
    }

    #[test]
    fn no_place_left_is_a_typed_refusal() {
        let mut spec = VmSpec::new("a", Machine::Pc);
        spec.disks.push(Disk::new(
            "s0",
            "/x",
            DiskFrontend::ScsiHd(ScsiAddr::auto()),
        ));
        assert!(matches!(spec.assign_addresses(), Err(Error::InvalidSpec(m)) if m.contains("s0")));
        let mut spec = VmSpec::new("b", Machine::Pc);
        for i in 0..31 {
            spec.nics.push(nic(&format!("n{i}"), Pci::auto()));
        }
        assert!(matches!(spec.assign_addresses(), Err(Error::InvalidSpec(m)) if m.contains("n30")));
    }
}
