//! Tap devices: one fd per queue, ready to hand to QEMU.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use crate::error::{Error, Result};
use crate::mac::MacAddr;
use crate::sys;

/// The most queues a tap can have (`MAX_TAP_QUEUES` in the kernel).
pub const MAX_QUEUES: usize = 256;

/// What to do about `IFF_VNET_HDR` (the virtio-net header QEMU needs for offloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VnetHdr {
    /// Use it when the kernel offers it (probed with `TUNGETFEATURES`).
    #[default]
    Auto,
    /// Fail when the kernel does not offer it.
    Require,
    /// Never use it.
    Refuse,
}

/// Creates (or attaches to) a tap device.
///
/// ```no_run
/// use qhotplug_netdev::{TapBuilder, MacAddr};
/// # fn demo() -> qhotplug_netdev::Result<()> {
/// let guest_mac = MacAddr::random_qemu();
/// let tap = TapBuilder::new("tap%d")
///     .queues(2)
///     .mac(guest_mac.host_side())
///     .up(true)
///     .create()?;
/// println!("{} with {} queue fds, vnet_hdr={}", tap.name(), tap.queues().len(), tap.vnet_hdr());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TapBuilder {
    name: String,
    queues: usize,
    vnet_hdr: VnetHdr,
    persistent: bool,
    owner: Option<u32>,
    up: bool,
    mtu: Option<u32>,
    mac: Option<MacAddr>,
    bridge: Option<String>,
}

/// A tap device and its queue fds. Unless it was made persistent, the device goes away when the
/// last fd closes, in our process and in QEMU.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<OwnedFd>,
    vnet_hdr: bool,
    persistent: bool,
}

/// Checks a name the way Linux does (`dev_valid_name`), plus our template rule: `%` only as one
/// `%d`, and only when `template` is allowed.
pub fn validate_name(name: &str, template: bool) -> Result<()> {
    let bad = |reason| Error::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > 15 {
        return Err(bad("longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(bad("`.` and `..` are not interface names"));
    }
    if name.contains('/') || name.contains(':') || name.contains('\0') {
        return Err(bad("contains `/`, `:` or NUL"));
    }
    if name.chars().any(char::is_whitespace) {
        return Err(bad("contains whitespace"));
    }
    let percents = name.matches('%').count();
    match (percents, template) {
        (0, _) => Ok(()),
        (1, true) if name.contains("%d") => Ok(()),
        (_, true) => Err(bad("a template holds `%` only as a single `%d`")),
        (_, false) => Err(bad("contains `%`")),
    }
}

fn sysfs(name: &str) -> std::path::PathBuf {
    Path::new("/sys/class/net").join(name)
}

impl TapBuilder {
    /// A builder for the tap `name`: an exact name (attached to when it exists as a tap), or a
    /// template such as `tap%d` for which the kernel picks the number.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            queues: 1,
            vnet_hdr: VnetHdr::Auto,
            persistent: false,
            owner: None,
            up: false,
            mtu: None,
            mac: None,
            bridge: None,
        }
    }

    /// The number of queues (1 to 256); more than one makes a multiqueue tap.
    pub fn queues(mut self, queues: usize) -> Self {
        self.queues = queues;
        self
    }

    /// What to do about `IFF_VNET_HDR` (default: use it when offered).
    pub fn vnet_hdr(mut self, policy: VnetHdr) -> Self {
        self.vnet_hdr = policy;
        self
    }

    /// Keep the device when its last fd closes (delete it with [`delete_persistent`]).
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// Let this uid attach to the device later without CAP_NET_ADMIN.
    pub fn owner(mut self, uid: u32) -> Self {
        self.owner = Some(uid);
        self
    }

    /// Bring the link up.
    pub fn up(mut self, up: bool) -> Self {
        self.up = up;
        self
    }

    /// Set the MTU.
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }

    /// Set the host side's MAC address (see [`MacAddr::host_side`]).
    pub fn mac(mut self, mac: MacAddr) -> Self {
        self.mac = Some(mac);
        self
    }

    /// Attach the tap to this existing Linux bridge (what Ganeti's `kvm-vif-bridge` does).
    pub fn bridge(mut self, bridge: impl Into<String>) -> Self {
        self.bridge = Some(bridge.into());
        self
    }

    fn check(&self) -> Result<()> {
        validate_name(&self.name, true)?;
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return Err(Error::InvalidQueues(self.queues));
        }
        let exact = !self.name.contains('%');
        if exact && sysfs(&self.name).exists() && !sysfs(&self.name).join("tun_flags").exists() {
            return Err(Error::NotATap(self.name.clone()));
        }
        if let Some(bridge) = &self.bridge {
            validate_name(bridge, false)?;
            if !sysfs(bridge).join("bridge").exists() {
                return Err(Error::Sys {
                    op: "attach to bridge",
                    name: bridge.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such bridge"),
                });
            }
        }
        if let Some(mac) = self.mac {
            if !mac.is_unicast() {
                return Err(Error::InvalidMac(mac.to_string()));
            }
        }
        Ok(())
    }

    /// Creates the device (or attaches to the existing tap of that name) with one fd per queue.
    /// Every input is checked before anything is created; when a later step fails, the fds close
    /// and a device we created goes away.
    pub fn create(&self) -> Result<Tap> {
        self.check()?;
        let first = sys::open_tun().map_err(Error::sys("open", "/dev/net/tun"))?;
        let features =
            sys::tun_features(first.as_fd()).map_err(Error::sys("TUNGETFEATURES", &self.name))?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        let vnet_offered = features & libc::IFF_VNET_HDR != 0;
        let vnet_hdr = match self.vnet_hdr {
            VnetHdr::Refuse => false,
            VnetHdr::Auto => vnet_offered,
            VnetHdr::Require if vnet_offered => true,
            VnetHdr::Require => return Err(Error::VnetHdrUnsupported),
        };
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        if self.queues > 1 {
            if features & libc::IFF_MULTI_QUEUE == 0 {
                return Err(Error::MultiQueueUnsupported);
            }
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let name = sys::tun_set_iff(first.as_fd(), &self.name, flags)
            .map_err(Error::sys("TUNSETIFF", &self.name))?;
        let mut queues = vec![first];
        // The other queues attach by the name the kernel chose for the first.
        for _ in 1..self.queues {
            let fd = sys::open_tun().map_err(Error::sys("open", "/dev/net/tun"))?;
            sys::tun_set_iff(fd.as_fd(), &name, flags).map_err(Error::sys("TUNSETIFF", &name))?;
            queues.push(fd);
        }
        let mut tap = Tap {
            name,
            queues,
            vnet_hdr,
            persistent: false,
        };
        if let Some(uid) = self.owner {
            sys::tun_set_owner(tap.queues[0].as_fd(), uid)
                .map_err(Error::sys("TUNSETOWNER", &tap.name))?;
        }
        if let Some(mac) = self.mac {
            tap.set_mac(mac)?;
        }
        if let Some(mtu) = self.mtu {
            tap.set_mtu(mtu)?;
        }
        if let Some(bridge) = &self.bridge {
            tap.attach_to_bridge(bridge)?;
        }
        if self.up {
            tap.set_up(true)?;
        }
        // Last, so that a failure above leaves no device behind (one we attached to keeps what was
        // set on it).
        if self.persistent {
            sys::tun_set_persist(tap.queues[0].as_fd(), true)
                .map_err(Error::sys("TUNSETPERSIST", &tap.name))?;
            tap.persistent = true;
        }
        tracing::debug!(name = %tap.name, queues = tap.queues.len(), vnet_hdr, "tap ready");
        Ok(tap)
    }
}

impl Tap {
    /// The device's name (the kernel's choice when a template was given).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One fd per queue.
    pub fn queues(&self) -> &[OwnedFd] {
        &self.queues
    }

    /// Takes the queue fds (to pass them to QEMU). The device lives while any of them is open.
    pub fn into_queues(self) -> Vec<OwnedFd> {
        self.queues
    }

    /// True when the queues were opened with `IFF_VNET_HDR`.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// True when the device outlives its fds.
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// Brings the link up or down.
    pub fn set_up(&self, up: bool) -> Result<()> {
        sys::set_up(&self.name, up).map_err(Error::sys("SIOCSIFFLAGS", &self.name))
    }

    /// Sets the MTU.
    pub fn set_mtu(&self, mtu: u32) -> Result<()> {
        sys::set_mtu(&self.name, mtu).map_err(Error::sys("SIOCSIFMTU", &self.name))
    }

    /// Sets the host side's MAC address.
    pub fn set_mac(&self, mac: MacAddr) -> Result<()> {
        sys::set_mac(&self.name, mac.0).map_err(Error::sys("SIOCSIFHWADDR", &self.name))
    }

    /// Adds the tap to a Linux bridge.
    pub fn attach_to_bridge(&self, bridge: &str) -> Result<()> {
        bridge_port(bridge, &self.name, true)
    }

    /// Removes the tap from a Linux bridge.
    pub fn detach_from_bridge(&self, bridge: &str) -> Result<()> {
        bridge_port(bridge, &self.name, false)
    }
}

fn bridge_port(bridge: &str, name: &str, add: bool) -> Result<()> {
    validate_name(bridge, false)?;
    let op = if add { "SIOCBRADDIF" } else { "SIOCBRDELIF" };
    let cname = CString::new(name).map_err(|_| Error::InvalidName {
        name: name.to_owned(),
        reason: "contains `/`, `:` or NUL",
    })?;
    let index = sys::ifindex(&cname).ok_or_else(|| Error::Sys {
        op,
        name: name.to_owned(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    sys::bridge_port(bridge, index, add).map_err(Error::sys(op, bridge))
}

/// Deletes a persistent tap: attaches to it, clears `IFF_PERSIST`, and closes (the way libvirt's
/// `virNetDevTapDelete` does). The device goes away once no other process holds a queue.
pub fn delete_persistent(name: &str) -> Result<()> {
    validate_name(name, false)?;
    let flags_path = sysfs(name).join("tun_flags");
    let flags = std::fs::read_to_string(&flags_path).map_err(|e| {
        if sysfs(name).exists() {
            Error::NotATap(name.to_owned())
        } else {
            Error::sys("read tun_flags", name)(e)
        }
    })?;
    let flags = i32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).map_err(|_| {
        Error::sys("read tun_flags", name)(std::io::Error::from(std::io::ErrorKind::InvalidData))
    })?;
    // Attach with the device's own mode flags (TUNSETIFF refuses a multiqueue mismatch).
    let mode =
        flags & (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE);
    let fd = sys::open_tun().map_err(Error::sys("open", "/dev/net/tun"))?;
    sys::tun_set_iff(fd.as_fd(), name, mode).map_err(Error::sys("TUNSETIFF", name))?;
    sys::tun_set_persist(fd.as_fd(), false).map_err(Error::sys("TUNSETPERSIST", name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["tap0", "tap%d", "a", "vm-1.eth_0", "123456789012345"] {
            validate_name(ok, true).unwrap();
        }
        for bad in [
            "",
            "1234567890123456",
            "a/b",
            "a b",
            "a\tb",
            "a:b",
            ".",
            "..",
            "tap%s",
            "t%d%d",
            "%",
            "a\0b",
        ] {
            assert!(validate_name(bad, true).is_err(), "{bad:?}");
        }
        assert!(
            validate_name("tap%d", false).is_err(),
            "no template where an exact name is needed"
        );
    }

    #[test]
    fn bad_input_is_rejected_before_anything_is_created() {
        assert!(matches!(
            TapBuilder::new("q%d").queues(0).create(),
            Err(Error::InvalidQueues(0))
        ));
        assert!(matches!(
            TapBuilder::new("q%d").queues(257).create(),
            Err(Error::InvalidQueues(257))
        ));
        assert!(matches!(
            TapBuilder::new("lo").create(),
            Err(Error::NotATap(_))
        ));
    }
}
