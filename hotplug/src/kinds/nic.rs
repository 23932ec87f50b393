//! NICs: `virtio-net-pci` on a tap the caller opened, one tap fd per queue pair, with vhost-net
//! when the host has it.
//!
//! Hot-add: `getfd` per tap fd and vhost fd → `netdev_add` → `device_add`. Teardown: the netdev
//! (which closes QEMU's tap and vhost fds).

use std::os::fd::OwnedFd;

use qhotplug_cmdline::{names, DeviceModel, Nic, Pci};
use qhotplug_netdev::{open_vhost, MacAddr, Tap, Vhost, VhostPolicy};

use super::{Backend, Place, Placed, Plan, Plug, Want};
use crate::error::Result;
use crate::qemu::delete::Delete;

/// A `virtio-net-pci` NIC to hot-add on a tap: one tap fd per queue pair; more than one queue turns
/// on `mq` with `vectors=2N+2`.
///
/// ```no_run
/// use qhotplug::{MacAddr, NicConfig, TapBuilder, VhostPolicy};
/// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let mac = MacAddr::random_qemu();
/// let tap = TapBuilder::new("vm1-nic%d").queues(2).up(true).create()?;
/// let nic = NicConfig::new("nic-1", tap).mac(mac).vhost(VhostPolicy::Prefer);
/// # let _ = nic; Ok(()) }
/// ```
#[derive(Debug)]
pub struct NicConfig {
    id: String,
    taps: Vec<OwnedFd>,
    mac: Option<MacAddr>,
    vhost: Option<VhostPolicy>,
    at: Option<Pci>,
}

impl NicConfig {
    /// A NIC on `tap`, one queue pair per tap queue, with a random `52:54:00` MAC and vhost-net
    /// when the host has it.
    pub fn new(id: impl Into<String>, tap: Tap) -> Self {
        Self::from_fds(id, tap.into_queues())
    }

    /// A NIC on tap fds opened elsewhere (one per queue pair).
    pub fn from_fds(id: impl Into<String>, taps: Vec<OwnedFd>) -> Self {
        NicConfig {
            id: id.into(),
            taps,
            mac: None,
            vhost: Some(VhostPolicy::Prefer),
            at: None,
        }
    }

    /// The guest's MAC address.
    pub fn mac(mut self, mac: MacAddr) -> Self {
        self.mac = Some(mac);
        self
    }

    /// Whether to use vhost-net: `Prefer` (the default) uses it when `/dev/vhost-net` opens,
    /// `Require` fails without it.
    pub fn vhost(mut self, policy: VhostPolicy) -> Self {
        self.vhost = Some(policy);
        self
    }

    /// No vhost-net: QEMU moves the packets itself.
    pub fn no_vhost(mut self) -> Self {
        self.vhost = None;
        self
    }

    /// This PCI address instead of a free one.
    pub fn at_pci(mut self, pci: Pci) -> Self {
        self.at = Some(pci);
        self
    }
}

impl Plug for NicConfig {
    type Added = Nic;
    const OPERATION: &'static str = "NIC hotplug";
    const COMMANDS: &'static [&'static str] = &[
        "getfd",
        "closefd",
        "netdev_add",
        "netdev_del",
        "device_add",
        "device_del",
    ];

    fn id(&self) -> &str {
        &self.id
    }

    fn want(&self) -> Result<Want> {
        Ok(Want::Pci(self.at.clone()))
    }

    fn plan(self, place: Place) -> Result<Plan<Nic>> {
        let pci = place.pci(&self.id)?;
        let vhost_fds = match self.vhost {
            Some(policy) => match open_vhost(self.taps.len().max(1), policy)? {
                Vhost::Enabled(fds) => fds,
                Vhost::Unavailable { reason } => {
                    tracing::debug!(%reason, "no vhost-net");
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let nic = Nic {
            id: self.id,
            mac: self.mac.unwrap_or_else(MacAddr::random_qemu),
            queues: u16::try_from(self.taps.len()).unwrap_or(u16::MAX),
            pci,
            vhost: !vhost_fds.is_empty(),
            link_up: true,
        };
        nic.check()?;
        let taps: Vec<(String, OwnedFd)> = self
            .taps
            .into_iter()
            .enumerate()
            .map(|(i, fd)| (names::tap_fd(&nic.id, i), fd))
            .collect();
        let vhosts: Vec<(String, OwnedFd)> = vhost_fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| (names::vhost_fd(&nic.id, i), fd))
            .collect();
        let tap_names: Vec<String> = taps.iter().map(|(n, _)| n.clone()).collect();
        let vhost_names: Vec<String> = vhosts.iter().map(|(n, _)| n.clone()).collect();
        let mut backends: Vec<Backend> = taps
            .into_iter()
            .chain(vhosts)
            .map(|(name, fd)| Backend::Getfd { name, fd })
            .collect();
        backends.push(Backend::Netdev(nic.netdev_add(&tap_names, &vhost_names)));
        Ok(Plan {
            backends,
            device: nic.device_add(),
            after: Vec::new(),
            added: nic,
        })
    }
}

impl Placed for Nic {
    type Config = NicConfig;

    fn place(&self) -> Place {
        Place::Pci(self.pci.clone())
    }

    /// Its netdev.
    fn teardown(&self) -> Vec<Delete> {
        vec![Delete::Netdev(self.netdev_id())]
    }
}
