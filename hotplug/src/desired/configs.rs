//! A desired device as the config its hot-add takes: the spec's placed form back into the
//! builder a caller would have written, an address left to the SDK left to the engine.

use std::os::fd::OwnedFd;

use qhotplug_cmdline::{
    Balloon, Cdrom, CdromBus, Disk, DiskBackend, DiskFrontend, MemoryDevice, MemoryDeviceKind,
    MemoryKind, Nic, Pci, Rng, SerialPort, VhostUserBlk, VirtioFs, VirtioSerial,
};

use crate::error::{Error, Result};
use crate::kinds::balloon::BalloonConfig;
use crate::kinds::cdrom::CdromConfig;
use crate::kinds::disk::{DiskConfig, DiskModel};
use crate::kinds::memory::MemoryConfig;
use crate::kinds::nic::NicConfig;
use crate::kinds::rng::RngConfig;
use crate::kinds::vhost_user::{VhostUserBlkConfig, VirtioFsConfig};
use crate::kinds::virtio_serial::{SerialPortConfig, VirtioSerialConfig};

/// `config` at `pci` (through its `at_pci`), unless the address is left to the SDK.
fn placed<C>(config: C, pci: &Pci, at_pci: fn(C, Pci) -> C) -> C {
    if pci.is_auto() {
        config
    } else {
        at_pci(config, pci.clone())
    }
}

pub(crate) fn disk(d: &Disk) -> Result<DiskConfig> {
    let model = match &d.frontend {
        DiskFrontend::VirtioBlk(_) => DiskModel::VirtioBlk,
        DiskFrontend::ScsiHd(_) => DiskModel::ScsiHd,
        DiskFrontend::ScsiGeneric(_) => {
            return Err(Error::NotHotpluggable {
                id: d.id.clone(),
                reason: "SCSI passthrough is set at launch",
            })
        }
    };
    let mut config = match &d.backend {
        DiskBackend::Network(source) => DiskConfig::network(&d.id, (**source).clone(), model),
        DiskBackend::HostDevice => DiskConfig::new(&d.id, &d.path, model).host_device(),
        DiskBackend::File => DiskConfig::new(&d.id, &d.path, model),
    }
    .format(d.format)
    .read_only(d.read_only)
    .cache(d.cache)
    .on_error(d.on_error);
    if let Some(limits) = &d.io_limits {
        config = config.io_limits(limits.clone());
    }
    Ok(match &d.frontend {
        DiskFrontend::VirtioBlk(pci) => placed(config, pci, DiskConfig::at_pci),
        DiskFrontend::ScsiHd(at) | DiskFrontend::ScsiGeneric(at) if !at.is_auto() => {
            config.at_scsi(at.clone())
        }
        _ => config,
    })
}

/// A NIC on `taps`; [`Error::Spec`] without them.
pub(crate) fn nic(n: &Nic, taps: Option<Vec<OwnedFd>>) -> Result<NicConfig> {
    let taps = taps.ok_or_else(|| {
        qhotplug_cmdline::Error::InvalidSpec(format!(
            "{}: no tap fds given for the NIC to add (Desired::nic_fds)",
            n.id
        ))
    })?;
    let mut config = NicConfig::from_fds(&n.id, taps).mac(n.mac);
    config = if n.vhost {
        config.vhost(qhotplug_netdev::VhostPolicy::Require)
    } else {
        config.no_vhost()
    };
    Ok(placed(config, &n.pci, NicConfig::at_pci))
}

pub(crate) fn cdrom(c: &Cdrom) -> Result<CdromConfig> {
    let mut config = CdromConfig::new(&c.id);
    if let Some(medium) = &c.medium {
        config = config.medium(medium.clone());
    }
    match &c.bus {
        CdromBus::Scsi(at) if at.is_auto() => Ok(config),
        CdromBus::Scsi(at) => Ok(config.at_scsi(at.clone())),
        CdromBus::Ide(_) => Err(Error::NotHotpluggable {
            id: c.id.clone(),
            reason: "an IDE drive cannot be hot-added",
        }),
    }
}

pub(crate) fn memory(m: &MemoryDevice) -> MemoryConfig {
    let b = &m.backend;
    let mut config = match &m.kind {
        MemoryDeviceKind::Dimm => MemoryConfig::dimm(&m.id, b.size),
        MemoryDeviceKind::VirtioMem { pci, requested } => {
            let config = MemoryConfig::virtio_mem(&m.id, b.size, *requested);
            placed(config, pci, MemoryConfig::at_pci)
        }
    };
    config = match &b.kind {
        MemoryKind::Ram => config,
        MemoryKind::Memfd => config.memfd(),
        MemoryKind::File(path) => config.file(path),
    };
    config.share(b.share).hugepages(b.hugepages)
}

pub(crate) fn balloon(b: &Balloon) -> BalloonConfig {
    let config = BalloonConfig::new(&b.id);
    placed(config, &b.pci, BalloonConfig::at_pci)
}

pub(crate) fn vhost_user_blk(d: &VhostUserBlk) -> VhostUserBlkConfig {
    let mut config = VhostUserBlkConfig::new(&d.id, &d.socket);
    if let Some(n) = d.num_queues {
        config = config.num_queues(n);
    }
    placed(config, &d.pci, VhostUserBlkConfig::at_pci)
}

pub(crate) fn virtio_fs(d: &VirtioFs) -> VirtioFsConfig {
    let mut config = VirtioFsConfig::new(&d.id, &d.socket, &d.tag);
    if let Some(n) = d.queue_size {
        config = config.queue_size(n);
    }
    placed(config, &d.pci, VirtioFsConfig::at_pci)
}

pub(crate) fn virtio_serial(d: &VirtioSerial) -> VirtioSerialConfig {
    let config = VirtioSerialConfig::new(&d.id);
    placed(config, &d.pci, VirtioSerialConfig::at_pci)
}

pub(crate) fn serial_port(p: &SerialPort) -> SerialPortConfig {
    let controller = p.bus.strip_suffix(".0").unwrap_or(&p.bus);
    SerialPortConfig::new(&p.id, controller, &p.name, &p.socket)
}

pub(crate) fn rng(r: &Rng) -> RngConfig {
    let config = RngConfig::new(&r.id).source(&r.source);
    placed(config, &r.pci, RngConfig::at_pci)
}
