//! A VM's description, rendered as QEMU's argv.

use std::collections::HashSet;
use std::path::PathBuf;

use crate::cdrom::{Cdrom, CdromBus};
use crate::cpu::{CpuTopology, Vcpu};
use crate::device::{Disk, DiskFrontend, Nic, RootPort, ScsiController};
use crate::error::{Error, Result};
use crate::machine::Machine;
use crate::memory::{Balloon, MemoryBackend, MemoryDevice, MemoryDeviceKind, MIB};
use crate::model::DeviceModel;
use crate::rng::Rng;
use crate::value::{escape, validate_id};
use crate::vhost_user::{VhostUserBlk, VirtioFs};
use crate::virtio_serial::{SerialPort, VirtioSerial};

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Software emulation.
    #[default]
    Tcg,
    /// Hardware virtualization.
    Kvm,
}

/// Where one of the guest's serial consoles goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Serial {
    /// Appended to a file (a console log that survives restarts).
    File(PathBuf),
    /// A Unix socket QEMU listens on.
    Socket(PathBuf),
    /// A pseudo-terminal QEMU opens; its path is QEMU's to choose (`Vm::serial_pty` reads it).
    Pty,
}

/// A VNC display.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Vnc {
    /// Where it listens.
    pub listen: VncListen,
    /// The password clients must give, set over QMP (`set_password`) as soon as QEMU is up and
    /// before the guest runs: never on QEMU's command line, where any local user could read it.
    pub password: Option<crate::Secret>,
}

impl std::fmt::Debug for Vnc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vnc")
            .field("listen", &self.listen)
            .field("password", &self.password)
            .finish()
    }
}

/// Where a VNC display listens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VncListen {
    /// A TCP address and display number (port 5900 + display).
    Tcp {
        /// The address, for example `127.0.0.1` or `::`.
        host: String,
        /// The display number.
        display: u16,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

/// Everything QEMU needs to start a VM. Devices are the same values hotplug uses, so a VM
/// relaunched from a recorded spec has the topology it had.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct VmSpec {
    /// The guest's name (`-name`).
    pub name: String,
    /// Machine type.
    pub machine: Machine,
    /// Accelerator.
    pub accel: Accel,
    /// CPU model (`-cpu`); QEMU's default when `None`.
    pub cpu: Option<String>,
    /// vCPUs at boot (`-smp`), besides those in [`vcpus`](VmSpec::vcpus).
    pub smp: u32,
    /// The vCPU topology and the most vCPUs the VM may have; `None`: exactly `smp`, none to
    /// hot-plug.
    pub cpu_topology: Option<CpuTopology>,
    /// Hot-pluggable vCPUs, with ids, in free CPU slots (hot-added ones, for a relaunch).
    pub vcpus: Vec<Vcpu>,
    /// Memory at boot in MiB.
    pub memory_mib: u64,
    /// Memory slots for DIMMs (`-m …,slots=`); 0 without memory hotplug.
    pub memory_slots: u32,
    /// The most memory the VM may have, boot memory and memory devices together, in MiB
    /// (`maxmem`); `None` without memory hotplug.
    pub max_memory_mib: Option<u64>,
    /// The backend of the boot memory (`-machine memory-backend=`), for memory another process
    /// must map (a shared memfd for vhost-user); QEMU's own anonymous memory when `None`. Its size
    /// must be `memory_mib`.
    pub memory_backend: Option<MemoryBackend>,
    /// Memory devices (DIMMs, virtio-mem).
    pub memory_devices: Vec<MemoryDevice>,
    /// A memory balloon.
    pub balloon: Option<Balloon>,
    /// vhost-user disks (they need shared memory: `memory_backend` with `share`).
    pub vhost_user_blks: Vec<VhostUserBlk>,
    /// virtio-fs shares (they need shared memory too).
    pub virtio_fs: Vec<VirtioFs>,
    /// virtio-serial controllers.
    pub virtio_serials: Vec<VirtioSerial>,
    /// virtio-serial ports, on those controllers.
    pub serial_ports: Vec<SerialPort>,
    /// virtio RNGs.
    pub rngs: Vec<Rng>,
    /// Direct kernel boot: kernel image.
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: initrd.
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: command line.
    pub append: Option<String>,
    /// Serial consoles: the guest's `ttyS0`, `ttyS1`, … in order (Nova's seed has two: a log file
    /// and an interactive one).
    pub serials: Vec<Serial>,
    /// A VNC display, if any.
    pub vnc: Option<Vnc>,
    /// A USB tablet (absolute pointer, so a VNC cursor follows), on the machine's USB controller.
    pub usb_tablet: bool,
    /// Start paused (`-S`).
    pub paused: bool,
    /// Wait for an incoming migration (`-incoming defer`; `migrate-incoming` says from where).
    pub incoming: bool,
    /// PCIe root ports (`q35`).
    pub root_ports: Vec<RootPort>,
    /// virtio-scsi controllers.
    pub scsi_controllers: Vec<ScsiController>,
    /// Disks.
    pub disks: Vec<Disk>,
    /// NICs.
    pub nics: Vec<Nic>,
    /// CD-ROM drives.
    pub cdroms: Vec<Cdrom>,
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

    /// Every host file the VM's devices run on: each disk's images (top first, then its chain)
    /// and each CD-ROM's ISO. A network disk's or medium's URI is not a file and is left out.
    pub fn image_paths(&self) -> Vec<&std::path::Path> {
        let disks = self.disks.iter().flat_map(Disk::image_paths);
        let media = self
            .cdroms
            .iter()
            .filter_map(|c| c.medium.as_ref()?.image_path());
        disks.chain(media).collect()
    }

    /// Orders every device list by id, and the vCPUs by their place in the topology (socket,
    /// die, module, core, thread): the order a spec read from QEMU has, where QOM lists devices
    /// in no set order. What the VM is does not change.
    pub fn sort_by_id(&mut self) {
        self.root_ports.sort_by(|a, b| a.id.cmp(&b.id));
        self.scsi_controllers.sort_by(|a, b| a.id.cmp(&b.id));
        self.disks.sort_by(|a, b| a.id.cmp(&b.id));
        self.nics.sort_by(|a, b| a.id.cmp(&b.id));
        self.cdroms.sort_by(|a, b| a.id.cmp(&b.id));
        self.memory_devices.sort_by(|a, b| a.id.cmp(&b.id));
        self.vhost_user_blks.sort_by(|a, b| a.id.cmp(&b.id));
        self.virtio_fs.sort_by(|a, b| a.id.cmp(&b.id));
        self.virtio_serials.sort_by(|a, b| a.id.cmp(&b.id));
        self.serial_ports.sort_by(|a, b| a.id.cmp(&b.id));
        self.rngs.sort_by(|a, b| a.id.cmp(&b.id));
        self.vcpus.sort_by_key(|v| {
            ["socket-id", "die-id", "module-id", "core-id", "thread-id"]
                .map(|key| v.slot.iter().find(|(k, _)| k == key).map_or(0, |(_, n)| *n))
        });
    }

    /// Checks ids (QEMU's rules, and unique), PCI addresses (unique), SCSI buses and addresses.
    pub fn validate(&self) -> Result<()> {
        let mut claims = Claims {
            scsi_buses: self.scsi_controllers.iter().map(|c| c.bus()).collect(),
            ..Claims::default()
        };
        for port in &self.root_ports {
            claims.id(&port.id)?;
            claims.pci(&port.id, &port.pci)?;
        }
        for c in &self.scsi_controllers {
            claims.id(&c.id)?;
            claims.pci(&c.id, &c.pci)?;
        }
        for disk in &self.disks {
            disk.check()?;
            claims.id(&disk.id)?;
            match &disk.frontend {
                DiskFrontend::VirtioBlk(a) => claims.pci(&disk.id, a)?,
                DiskFrontend::ScsiHd(a) | DiskFrontend::ScsiGeneric(a) => {
                    claims.scsi(&disk.id, a)?
                }
            }
        }
        for cd in &self.cdroms {
            cd.check()?;
            claims.id(&cd.id)?;
            match &cd.bus {
                CdromBus::Scsi(a) => claims.scsi(&cd.id, a)?,
                CdromBus::Ide(a) => {
                    a.check(self.machine)?;
                    if !claims.ide.insert(a.clone()) {
                        return Err(Error::InvalidSpec(format!("{}: IDE address taken", cd.id)));
                    }
                }
            }
        }
        if self.cdroms.iter().filter(|c| c.boot).count() > 1 {
            return Err(Error::InvalidSpec(
                "more than one CD-ROM to boot from".into(),
            ));
        }
        for nic in &self.nics {
            nic.check()?;
            claims.id(&nic.id)?;
            claims.pci(&nic.id, &nic.pci)?;
        }
        if self.smp == 0 || self.memory_mib == 0 {
            return Err(Error::InvalidSpec("smp and memory must be positive".into()));
        }
        self.validate_cpus(&mut claims)?;
        self.validate_memory(&mut claims)?;
        self.validate_virtio(&mut claims)?;
        Ok(())
    }

    fn validate_cpus(&self, claims: &mut Claims) -> Result<()> {
        let count = self.smp + self.vcpus.len() as u32;
        match &self.cpu_topology {
            Some(t) => t.check(self.smp)?,
            None if self.vcpus.is_empty() => return Ok(()),
            None => {
                return Err(Error::InvalidSpec(
                    "hot-pluggable vCPUs need a CPU topology with maxcpus".into(),
                ))
            }
        }
        let max = self.cpu_topology.map_or(self.smp, |t| t.max);
        if count > max {
            return Err(Error::InvalidSpec(format!(
                "{count} vCPUs is more than maxcpus {max}"
            )));
        }
        for cpu in &self.vcpus {
            cpu.check()?;
            claims.id(&cpu.id)?;
        }
        Ok(())
    }

    fn validate_memory(&self, claims: &mut Claims) -> Result<()> {
        if let Some(backend) = &self.memory_backend {
            backend.check()?;
            claims.id(&backend.id)?;
            if backend.size != self.memory_mib * MIB {
                return Err(Error::InvalidSpec(format!(
                    "memory backend {} is {} bytes, not memory_mib ({} MiB)",
                    backend.id, backend.size, self.memory_mib
                )));
            }
        }
        let plugged: u64 = self.memory_devices.iter().map(MemoryDevice::size).sum();
        if !self.memory_devices.is_empty() {
            let Some(max) = self.max_memory_mib else {
                return Err(Error::InvalidSpec(
                    "memory devices need max_memory_mib".into(),
                ));
            };
            if self.memory_mib * MIB + plugged > max * MIB {
                return Err(Error::InvalidSpec(format!(
                    "{} MiB of boot memory and {} MiB of memory devices is over maxmem {max} MiB",
                    self.memory_mib,
                    plugged / MIB
                )));
            }
        }
        let dimms = self
            .memory_devices
            .iter()
            .filter(|d| d.kind == MemoryDeviceKind::Dimm)
            .count();
        if dimms > self.memory_slots as usize {
            return Err(Error::InvalidSpec(format!(
                "{dimms} DIMMs for {} memory slots",
                self.memory_slots
            )));
        }
        for dev in &self.memory_devices {
            dev.check()?;
            claims.id(&dev.id)?;
            claims.id(&dev.backend.id)?;
            if let MemoryDeviceKind::VirtioMem { pci: at, .. } = &dev.kind {
                claims.pci(&dev.id, at)?;
            }
        }
        if let Some(b) = &self.balloon {
            claims.id(&b.id)?;
            b.pci.check()?;
            claims.pci(&b.id, &b.pci)?;
        }
        Ok(())
    }

    /// True when guest memory is shared (a `memory_backend` with `share`), as vhost-user backends
    /// need: they map it.
    pub fn has_shared_memory(&self) -> bool {
        self.memory_backend.as_ref().is_some_and(|b| b.share)
    }

    fn validate_virtio(&self, claims: &mut Claims) -> Result<()> {
        let mut place = |id: &str, at: &crate::device::Pci| -> Result<()> {
            claims.id(id)?;
            claims.pci(id, at)
        };
        let vhost_user = !self.vhost_user_blks.is_empty() || !self.virtio_fs.is_empty();
        if vhost_user && !self.has_shared_memory() {
            return Err(Error::InvalidSpec(
                "vhost-user devices need shared guest memory (memory_backend with share)".into(),
            ));
        }
        for d in &self.vhost_user_blks {
            d.check()?;
            place(&d.id, &d.pci)?;
        }
        for d in &self.virtio_fs {
            d.check()?;
            place(&d.id, &d.pci)?;
        }
        for d in &self.virtio_serials {
            place(&d.id, &d.pci)?;
        }
        for d in &self.rngs {
            d.check()?;
            place(&d.id, &d.pci)?;
        }
        let buses: HashSet<String> = self.virtio_serials.iter().map(|c| c.bus()).collect();
        for port in &self.serial_ports {
            port.check()?;
            claims.id(&port.id)?;
            if !buses.contains(&port.bus) {
                return Err(Error::InvalidSpec(format!(
                    "{}: no virtio-serial controller with bus {}",
                    port.id, port.bus
                )));
            }
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
        let mut a = self.machine_args();
        a.extend(self.console_args());
        a.extend(strings(&[
            "-chardev",
            qmp_chardev,
            "-mon",
            "chardev=qmp,mode=control",
        ]));
        if self.paused {
            a.push("-S".into());
        }
        if self.incoming {
            a.extend(strings(&["-incoming", "defer"]));
        }
        a.extend(self.device_args(nic_fds));
        a.extend(self.extra_args.iter().cloned());
        a
    }

    /// The machine itself: name, type and accelerator, CPUs, memory, and what it boots.
    fn machine_args(&self) -> Vec<String> {
        let mut a = strings(&[
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
        let machine = match &self.memory_backend {
            Some(b) => format!("{machine},memory-backend={}", b.id),
            None => machine.to_owned(),
        };
        a.extend(strings(&["-machine", &machine, "-accel", accel]));
        if let Some(cpu) = &self.cpu {
            a.extend(strings(&["-cpu", &escape(cpu)]));
        }
        let smp = match &self.cpu_topology {
            Some(t) => t.smp(self.smp),
            None => self.smp.to_string(),
        };
        let memory = match self.max_memory_mib {
            Some(max) => format!(
                "{}M,slots={},maxmem={max}M",
                self.memory_mib, self.memory_slots
            ),
            None => self.memory_mib.to_string(),
        };
        a.extend(strings(&["-smp", &smp, "-m", &memory]));
        if let Some(b) = &self.memory_backend {
            a.extend(b.args().into_iter().take(2));
        }
        // -kernel/-initrd/-append are plain values, not option lists: no escaping.
        if let Some(k) = &self.kernel {
            a.extend(strings(&["-kernel", &k.to_string_lossy()]));
        }
        if let Some(i) = &self.initrd {
            a.extend(strings(&["-initrd", &i.to_string_lossy()]));
        }
        if let Some(ap) = &self.append {
            a.extend(strings(&["-append", ap]));
        }
        a
    }

    /// Where a person or a tool reaches the guest: serial consoles, VNC, the USB tablet.
    fn console_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        for (i, serial) in self.serials.iter().enumerate() {
            let backend = match serial {
                Serial::File(path) => format!(
                    "file,id=serial{i},path={},append=on",
                    escape(&path.to_string_lossy())
                ),
                Serial::Socket(path) => format!(
                    "socket,id=serial{i},path={},server=on,wait=off",
                    escape(&path.to_string_lossy())
                ),
                Serial::Pty => format!("pty,id=serial{i}"),
            };
            a.extend(strings(&[
                "-chardev",
                &backend,
                "-serial",
                &format!("chardev:serial{i}"),
            ]));
        }
        if let Some(vnc) = &self.vnc {
            let mut arg = match &vnc.listen {
                VncListen::Tcp { host, display } if host.contains(':') => {
                    format!("[{host}]:{display}")
                }
                VncListen::Tcp { host, display } => format!("{host}:{display}"),
                VncListen::Unix(path) => format!("unix:{}", escape(&path.to_string_lossy())),
            };
            if vnc.password.is_some() {
                arg.push_str(",password=on");
            }
            a.extend(strings(&["-vnc", &arg]));
        }
        if self.usb_tablet {
            a.extend(strings(&["-usb", "-device", "usb-tablet,id=tablet0"]));
        }
        a
    }

    /// The devices, controllers first, then kind by kind; each NIC on the fds `nic_fds` names.
    fn device_args(&self, nic_fds: impl Fn(usize) -> (Vec<String>, Vec<String>)) -> Vec<String> {
        let mut a = Vec::new();
        a.extend(self.root_ports.iter().flat_map(RootPort::args));
        a.extend(self.scsi_controllers.iter().flat_map(ScsiController::args));
        a.extend(self.disks.iter().flat_map(Disk::args));
        a.extend(self.cdroms.iter().flat_map(Cdrom::args));
        a.extend(self.vcpus.iter().flat_map(Vcpu::args));
        a.extend(self.memory_devices.iter().flat_map(MemoryDevice::args));
        a.extend(self.balloon.iter().flat_map(Balloon::args));
        a.extend(self.vhost_user_blks.iter().flat_map(VhostUserBlk::args));
        a.extend(self.virtio_fs.iter().flat_map(VirtioFs::args));
        a.extend(self.virtio_serials.iter().flat_map(VirtioSerial::args));
        a.extend(self.serial_ports.iter().flat_map(SerialPort::args));
        a.extend(self.rngs.iter().flat_map(Rng::args));
        for (i, n) in self.nics.iter().enumerate() {
            let (taps, vhosts) = nic_fds(i);
            a.extend(n.args(&taps, &vhosts));
        }
        a
    }
}

/// Owned copies of `items`.
fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// What [`VmSpec::validate`] has seen so far: ids, and addresses on each kind of bus.
#[derive(Default)]
struct Claims {
    ids: HashSet<String>,
    pci: HashSet<crate::device::Pci>,
    scsi: HashSet<crate::device::ScsiAddr>,
    ide: HashSet<crate::cdrom::IdeAddr>,
    /// The buses of the spec's SCSI controllers.
    scsi_buses: HashSet<String>,
}

impl Claims {
    /// `id` follows QEMU's rules and is not yet taken.
    fn id(&mut self, id: &str) -> Result<()> {
        validate_id(id)?;
        if !self.ids.insert(id.to_owned()) {
            return Err(Error::InvalidSpec(format!("duplicate id {id}")));
        }
        Ok(())
    }

    /// Device `id` takes PCI address `at`, which must be free (an address still to give takes
    /// none).
    fn pci(&mut self, id: &str, at: &crate::device::Pci) -> Result<()> {
        if !at.is_auto() && !self.pci.insert(at.clone()) {
            return Err(Error::InvalidSpec(format!("{id}: PCI address taken")));
        }
        Ok(())
    }

    /// Device `id` takes SCSI address `at`, on a controller of the spec, which must be free.
    fn scsi(&mut self, id: &str, at: &crate::device::ScsiAddr) -> Result<()> {
        if at.is_auto() {
            return Ok(());
        }
        if !self.scsi_buses.contains(&at.bus) {
            return Err(Error::InvalidSpec(format!(
                "{id}: no SCSI controller with bus {}",
                at.bus
            )));
        }
        if !self.scsi.insert(at.clone()) {
            return Err(Error::InvalidSpec(format!("{id}: SCSI address taken")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod front_panel_tests {
    use super::*;

    #[test]
    fn consoles_vnc_and_tablet_render_as_nova_configures_them() {
        let mut spec = VmSpec::new("fp", Machine::Pc);
        spec.serials = vec![Serial::File("/var/log/c,1.log".into()), Serial::Pty];
        spec.vnc = Some(Vnc {
            listen: VncListen::Tcp {
                host: "::1".into(),
                display: 3,
            },
            password: Some(crate::Secret::new("never-in-argv")),
        });
        spec.usb_tablet = true;
        let args = spec.args("socket,id=qmp,fd=3,server=on,wait=off", |_| unreachable!());
        let line = args.join(" ");
        assert!(line.contains(
            "-chardev file,id=serial0,path=/var/log/c,,1.log,append=on -serial chardev:serial0 \
             -chardev pty,id=serial1 -serial chardev:serial1"
        ), "{line}");
        assert!(line.contains("-vnc [::1]:3,password=on"), "{line}");
        assert!(
            line.contains("-usb -device usb-tablet,id=tablet0"),
            "{line}"
        );
        assert!(!line.contains("never-in-argv"), "{line}");
        spec.vnc = Some(Vnc {
            listen: VncListen::Unix("/run/v.sock".into()),
            password: None,
        });
        assert!(spec
            .args("x", |_| unreachable!())
            .join(" ")
            .contains("-vnc unix:/run/v.sock"));
    }
}

#[cfg(test)]
mod resource_tests {
    use super::*;
    use crate::{CpuTopology, MemoryBackend, MemoryDevice, Pci, Vcpu, MIB};

    fn growable() -> VmSpec {
        let mut spec = VmSpec::new("r", Machine::Pc);
        spec.cpu_topology = Some(CpuTopology::max(4));
        spec.memory_slots = 2;
        spec.max_memory_mib = Some(1024);
        spec
    }

    #[test]
    fn topology_memory_and_backends_render_on_the_command_line() {
        let mut spec = growable();
        spec.memory_backend = Some(MemoryBackend::shared_memfd("ram", 256 * MIB));
        spec.vcpus.push(Vcpu {
            id: "vcpu1".into(),
            driver: "qemu64-x86_64-cpu".into(),
            slot: vec![("socket-id".into(), 0), ("core-id".into(), 1)],
        });
        spec.memory_devices
            .push(MemoryDevice::dimm("dimm0", 128 * MIB));
        spec.memory_devices.push(MemoryDevice::virtio_mem(
            "vmem0",
            256 * MIB,
            0,
            Pci::new("pci.0", 7),
        ));
        spec.validate().unwrap();
        let line = spec.args("q", |_| unreachable!()).join(" ");
        for want in [
            "-machine pc,memory-backend=ram",
            "-smp 1,maxcpus=4 -m 256M,slots=2,maxmem=1024M",
            "-object memory-backend-memfd,id=ram,size=268435456,share=on",
            "-device qemu64-x86_64-cpu,id=vcpu1,socket-id=0,core-id=1",
            "-device pc-dimm,id=dimm0,memdev=dimm0-mem",
            "-device virtio-mem-pci,id=vmem0,bus=pci.0,addr=0x7,memdev=vmem0-mem,requested-size=0",
        ] {
            assert!(line.contains(want), "{want} in {line}");
        }
    }

    #[test]
    fn resources_that_do_not_fit_are_refused() {
        let mut spec = growable();
        spec.memory_devices
            .push(MemoryDevice::dimm("big", 1024 * MIB));
        assert!(spec.validate().is_err(), "over maxmem");
        let mut spec = growable();
        spec.memory_slots = 0;
        spec.memory_devices.push(MemoryDevice::dimm("d", 2 * MIB));
        assert!(spec.validate().is_err(), "no slot");
        let mut spec = growable();
        spec.smp = 5;
        assert!(spec.validate().is_err(), "over maxcpus");
        let mut spec = VmSpec::new("r", Machine::Pc);
        spec.memory_backend = Some(MemoryBackend::ram("ram", 128 * MIB));
        assert!(spec.validate().is_err(), "backend size is not memory_mib");
    }
}
