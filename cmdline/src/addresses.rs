//! Addresses a spec leaves to the SDK ([`Pci::auto`], [`ScsiAddr::auto`]), given at launch.
//!
//! A launch command line has no `query-pci` to ask, so the free places are what the machine
//! brings with `-nodefaults` (the launcher's): on `pc`, `pci.0` slot 0 (the host bridge) and 1
//! (PIIX3, its IDE, USB and ACPI functions); on `q35`, `pcie.0` slot 0 (the host bridge) and 31
//! (ICH9's LPC, SATA and SMBus), and 29 with `-usb` (its UHCI and EHCI). A device on `q35`
//! goes behind a root port of the spec that nothing sits behind yet (so it can be hot-removed
//! later), and on `pcie.0` only when none is left.

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
    /// use qhotplug_cmdline::{Disk, DiskFrontend, Machine, Pci, VmSpec};
    /// let mut spec = VmSpec::new("vm", Machine::Pc);
    /// spec.disks.push(Disk::virtio_blk("d0", "/var/lib/images/d0.raw", Pci::auto()));
    /// spec.assign_addresses()?;
    /// assert_eq!(spec.disks[0].frontend, DiskFrontend::VirtioBlk(Pci::new("pci.0", 2)));
    /// # Ok::<(), qhotplug_cmdline::Error>(())
    /// ```
    pub fn assign_addresses(&mut self) -> Result<()> {
        let (machine, usb) = (self.machine, self.usb_tablet);
        let ports: Vec<String> = self.root_ports.iter().map(|p| p.id.clone()).collect();
        let scsi_bus = self.scsi_controllers.first().map(|c| c.bus());
        let pci = pci_places(self);
        let mut taken: HashSet<(String, u8)> = (pci.iter())
            .filter(|(_, at)| !at.is_auto())
            .map(|(_, at)| (at.bus.clone(), at.slot))
            .collect();
        if usb && machine == Machine::Q35 {
            taken.insert(("pcie.0".to_owned(), 29));
        }
        for (id, at) in pci.into_iter().filter(|(_, at)| at.is_auto()) {
            let free = match machine {
                Machine::Pc => (2..32)
                    .map(|s| Pci::new("pci.0", s))
                    .find(|a| free(&taken, a)),
                // A root port takes one device, at slot 0.
                Machine::Q35 => (ports.iter().map(|port| Pci::new(port.clone(), 0)))
                    .chain((1..31).map(|s| Pci::new("pcie.0", s)))
                    .find(|a| free(&taken, a)),
            };
            let free = free.ok_or_else(|| {
                Error::InvalidSpec(format!("{id}: no free PCI slot or root port is left"))
            })?;
            taken.insert((free.bus.clone(), free.slot));
            *at = free;
        }
        let scsi = scsi_places(self);
        let mut taken: HashSet<(String, u16)> = (scsi.iter())
            .filter(|(_, at)| !at.is_auto())
            .map(|(_, at)| (at.bus.clone(), at.scsi_id))
            .collect();
        for (id, at) in scsi.into_iter().filter(|(_, at)| at.is_auto()) {
            let bus = scsi_bus.clone().ok_or_else(|| {
                Error::InvalidSpec(format!("{id}: a SCSI device needs a SCSI controller"))
            })?;
            let target = (0..SCSI_TARGETS)
                .find(|t| !taken.contains(&(bus.clone(), *t)))
                .ok_or_else(|| Error::InvalidSpec(format!("{id}: no free target on {bus}")))?;
            taken.insert((bus.clone(), target));
            *at = ScsiAddr {
                bus,
                channel: 0,
                scsi_id: target,
                lun: 0,
            };
        }
        Ok(())
    }
}

fn free(taken: &HashSet<(String, u8)>, at: &Pci) -> bool {
    !taken.contains(&(at.bus.clone(), at.slot))
}

/// Every PCI address of the spec, given or not, with its device's id, in the spec's order.
fn pci_places(spec: &mut VmSpec) -> Vec<(&str, &mut Pci)> {
    let mut out: Vec<(&str, &mut Pci)> = Vec::new();
    out.extend(spec.root_ports.iter_mut().map(|p| (&*p.id, &mut p.pci)));
    out.extend(
        spec.scsi_controllers
            .iter_mut()
            .map(|c| (&*c.id, &mut c.pci)),
    );
    for d in &mut spec.disks {
        if let DiskFrontend::VirtioBlk(at) = &mut d.frontend {
            out.push((&d.id, at));
        }
    }
    out.extend(spec.nics.iter_mut().map(|n| (&*n.id, &mut n.pci)));
    for m in &mut spec.memory_devices {
        if let MemoryDeviceKind::VirtioMem { pci, .. } = &mut m.kind {
            out.push((&m.id, pci));
        }
    }
    out.extend(spec.balloon.iter_mut().map(|b| (&*b.id, &mut b.pci)));
    out.extend(
        spec.vhost_user_blks
            .iter_mut()
            .map(|d| (&*d.id, &mut d.pci)),
    );
    out.extend(spec.virtio_fs.iter_mut().map(|d| (&*d.id, &mut d.pci)));
    out.extend(spec.virtio_serials.iter_mut().map(|d| (&*d.id, &mut d.pci)));
    out.extend(spec.rngs.iter_mut().map(|d| (&*d.id, &mut d.pci)));
    out
}

/// Every SCSI address of the spec, given or not, with its device's id: disks, then CD-ROMs.
fn scsi_places(spec: &mut VmSpec) -> Vec<(&str, &mut ScsiAddr)> {
    let mut out: Vec<(&str, &mut ScsiAddr)> = Vec::new();
    for d in &mut spec.disks {
        if let DiskFrontend::ScsiHd(at) | DiskFrontend::ScsiGeneric(at) = &mut d.frontend {
            out.push((&d.id, at));
        }
    }
    for c in &mut spec.cdroms {
        if let CdromBus::Scsi(at) = &mut c.bus {
            out.push((&c.id, at));
        }
    }
    out
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
