//! A VM's description, rendered as QEMU's argv.

use std::collections::HashSet;
use std::path::PathBuf;

use crate::device::{Disk, DiskFrontend, Nic, RootPort, ScsiController};
use crate::error::{Error, Result};
use crate::value::{escape, validate_id};

/// The machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Machine {
    /// i440FX: conventional PCI, devices hot-plug into slots of `pci.0` (ACPI hotplug).
    #[default]
    Pc,
    /// Q35: PCIe; each hot-plugged device needs a free `pcie-root-port`.
    Q35,
}

impl Machine {
    /// The root bus's name.
    pub fn root_bus(self) -> &'static str {
        match self {
            Machine::Pc => "pci.0",
            Machine::Q35 => "pcie.0",
        }
    }
}

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Software emulation.
    #[default]
    Tcg,
    /// Hardware virtualization.
    Kvm,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    /// Appended to a file.
    File(PathBuf),
    /// A Unix socket QEMU listens on.
    Socket(PathBuf),
}

/// Everything QEMU needs to start a VM. Devices are the same values hotplug uses, so a VM
/// relaunched from a recorded spec has the topology it had.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmSpec {
    /// The guest's name (`-name`).
    pub name: String,
    /// Machine type.
    pub machine: Machine,
    /// Accelerator.
    pub accel: Accel,
    /// CPU model (`-cpu`); QEMU's default when `None`.
    pub cpu: Option<String>,
    /// vCPUs.
    pub smp: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Direct kernel boot: kernel image.
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: initrd.
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: command line.
    pub append: Option<String>,
    /// Serial console.
    pub serial: Option<Serial>,
    /// Start paused (`-S`).
    pub paused: bool,
    /// PCIe root ports (`q35`).
    pub root_ports: Vec<RootPort>,
    /// virtio-scsi controllers.
    pub scsi_controllers: Vec<ScsiController>,
    /// Disks.
    pub disks: Vec<Disk>,
    /// NICs.
    pub nics: Vec<Nic>,
    /// Extra raw arguments, appended as they are (an escape hatch).
    pub extra_args: Vec<String>,
}

impl VmSpec {
    /// A spec with 1 vCPU and 256 MiB on `machine`, no devices.
    pub fn new(name: impl Into<String>, machine: Machine) -> Self {
        VmSpec {
            name: name.into(),
            machine,
            smp: 1,
            memory_mib: 256,
            ..Default::default()
        }
    }

    /// Checks ids (QEMU's rules, and unique), PCI addresses (unique), SCSI buses and addresses.
    pub fn validate(&self) -> Result<()> {
        let mut ids = HashSet::new();
        let mut pci = HashSet::new();
        let mut scsi = HashSet::new();
        let mut unique = |id: &str| -> Result<()> {
            validate_id(id)?;
            if !ids.insert(id.to_owned()) {
                return Err(Error::InvalidSpec(format!("duplicate id {id}")));
            }
            Ok(())
        };
        for port in &self.root_ports {
            unique(&port.id)?;
            if !pci.insert(port.pci.clone()) {
                return Err(Error::InvalidSpec(format!(
                    "{}: PCI address taken",
                    port.id
                )));
            }
        }
        let scsi_buses: HashSet<String> = self.scsi_controllers.iter().map(|c| c.bus()).collect();
        for c in &self.scsi_controllers {
            unique(&c.id)?;
            if !pci.insert(c.pci.clone()) {
                return Err(Error::InvalidSpec(format!("{}: PCI address taken", c.id)));
            }
        }
        for disk in &self.disks {
            disk.check()?;
            unique(&disk.id)?;
            match &disk.frontend {
                DiskFrontend::VirtioBlk(a) => {
                    if !pci.insert(a.clone()) {
                        return Err(Error::InvalidSpec(format!(
                            "{}: PCI address taken",
                            disk.id
                        )));
                    }
                }
                DiskFrontend::ScsiHd(a) | DiskFrontend::ScsiGeneric(a) => {
                    if !scsi_buses.contains(&a.bus) {
                        return Err(Error::InvalidSpec(format!(
                            "{}: no SCSI controller with bus {}",
                            disk.id, a.bus
                        )));
                    }
                    if !scsi.insert(a.clone()) {
                        return Err(Error::InvalidSpec(format!(
                            "{}: SCSI address taken",
                            disk.id
                        )));
                    }
                }
            }
        }
        for nic in &self.nics {
            nic.check()?;
            unique(&nic.id)?;
            if !pci.insert(nic.pci.clone()) {
                return Err(Error::InvalidSpec(format!("{}: PCI address taken", nic.id)));
            }
        }
        if self.smp == 0 || self.memory_mib == 0 {
            return Err(Error::InvalidSpec("smp and memory must be positive".into()));
        }
        Ok(())
    }

    /// The argv after the binary. `qmp` is the monitor's `-chardev` backend (for example
    /// `socket,id=qmp,fd=3,server=on,wait=off`); `nic_fds(i)` gives NIC `i`'s tap and vhost fds as
    /// the strings `-netdev` takes.
    pub fn args(
        &self,
        qmp_chardev: &str,
        nic_fds: impl Fn(usize) -> (Vec<String>, Vec<String>),
    ) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&[
            "-name",
            &escape(&self.name),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ]);
        let machine = match self.machine {
            Machine::Pc => "pc",
            Machine::Q35 => "q35",
        };
        let accel = match self.accel {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        };
        push(&["-machine", machine, "-accel", accel]);
        if let Some(cpu) = &self.cpu {
            push(&["-cpu", &escape(cpu)]);
        }
        push(&[
            "-smp",
            &self.smp.to_string(),
            "-m",
            &self.memory_mib.to_string(),
        ]);
        // -kernel/-initrd/-append are plain values, not option lists: no escaping.
        if let Some(k) = &self.kernel {
            push(&["-kernel", &k.to_string_lossy()]);
        }
        if let Some(i) = &self.initrd {
            push(&["-initrd", &i.to_string_lossy()]);
        }
        if let Some(ap) = &self.append {
            push(&["-append", ap]);
        }
        match &self.serial {
            Some(Serial::File(path)) => push(&[
                "-chardev",
                &format!("file,id=serial0,path={}", escape(&path.to_string_lossy())),
                "-serial",
                "chardev:serial0",
            ]),
            Some(Serial::Socket(path)) => push(&[
                "-chardev",
                &format!(
                    "socket,id=serial0,path={},server=on,wait=off",
                    escape(&path.to_string_lossy())
                ),
                "-serial",
                "chardev:serial0",
            ]),
            None => {}
        }
        push(&["-chardev", qmp_chardev, "-mon", "chardev=qmp,mode=control"]);
        if self.paused {
            push(&["-S"]);
        }
        for port in &self.root_ports {
            a.extend(port.args());
        }
        for c in &self.scsi_controllers {
            a.extend(c.args());
        }
        for d in &self.disks {
            a.extend(d.args());
        }
        for (i, n) in self.nics.iter().enumerate() {
            let (taps, vhosts) = nic_fds(i);
            a.extend(n.args(&taps, &vhosts));
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}
