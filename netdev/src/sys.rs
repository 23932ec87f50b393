//! Every ioctl of the crate, and every `unsafe` block: thin wrappers that take and return safe
//! types. Nothing else in the crate talks to the kernel except through `std`.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use libc::{c_int, c_short, c_ulong, ifreq, IFNAMSIZ};

/// `linux/sockios.h`: add/remove an interface to/from a bridge (the same on every architecture).
const SIOCBRADDIF: c_ulong = 0x89a2;
const SIOCBRDELIF: c_ulong = 0x89a3;

/// An all-zero `ifreq` with `name` in `ifr_name`. `name` must be shorter than `IFNAMSIZ` (checked by
/// the caller; longer names are cut, never overflow).
fn ifreq_named(name: &str) -> ifreq {
    // SAFETY: `ifreq` is a C struct of integers, byte arrays and a union of such (and a raw
    // pointer), for which all-zero bytes are a valid value.
    let mut ifr: ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes().take(IFNAMSIZ - 1)) {
        *dst = src as libc::c_char;
    }
    ifr
}

fn name_of(ifr: &ifreq) -> String {
    // The kernel always NUL-terminates `ifr_name` (at most IFNAMSIZ - 1 characters).
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check(rc: c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens `/dev/net/tun` (read-write, close-on-exec: std opens with `O_CLOEXEC`).
pub(crate) fn open_tun() -> io::Result<OwnedFd> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map(OwnedFd::from)
}

/// Opens `/dev/vhost-net` (read-write, close-on-exec).
pub(crate) fn open_vhost_net() -> io::Result<OwnedFd> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-net")
        .map(OwnedFd::from)
}

/// `TUNGETFEATURES`: the `IFF_*` flags this kernel's tun driver supports.
pub(crate) fn tun_features(tun: BorrowedFd<'_>) -> io::Result<c_int> {
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int through the pointer, which points at a live
    // local of that type.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNGETFEATURES, &mut features) })?;
    Ok(features as c_int)
}

/// `TUNSETIFF`: attaches `tun` to the device `name` (created if absent; `%d` is a template) with
/// `flags`. Returns the device's actual name.
pub(crate) fn tun_set_iff(tun: BorrowedFd<'_>, name: &str, flags: c_int) -> io::Result<String> {
    let mut ifr = ifreq_named(name);
    ifr.ifr_ifru.ifru_flags = flags as c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is, and lives across the
    // call.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) })?;
    Ok(name_of(&ifr))
}

/// `TUNSETPERSIST`: whether the device outlives its last fd.
pub(crate) fn tun_set_persist(tun: BorrowedFd<'_>, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value (an int cast to the pointer argument).
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, c_ulong::from(persist)) })
}

/// `TUNSETOWNER`: lets `uid` attach to the device without CAP_NET_ADMIN.
pub(crate) fn tun_set_owner(tun: BorrowedFd<'_>, uid: u32) -> io::Result<()> {
    // SAFETY: TUNSETOWNER takes the uid by value.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOWNER, c_ulong::from(uid)) })
}

/// A socket to carry `SIOC*` interface ioctls.
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes plain integers; on success we own the returned fd exactly once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sioc(request: c_ulong, ifr: &mut ifreq) -> io::Result<()> {
    let sock = ctl_socket()?;
    // SAFETY: every SIOC* request used here reads and/or writes one `struct ifreq`, which `ifr` is.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), request as _, ifr as *mut ifreq) })
}

/// Brings the interface up (or down): `SIOCGIFFLAGS` then `SIOCSIFFLAGS`.
pub(crate) fn set_up(name: &str, up: bool) -> io::Result<()> {
    let mut ifr = ifreq_named(name);
    sioc(libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS just filled the `ifru_flags` member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let up_flag = libc::IFF_UP as c_short;
    ifr.ifr_ifru.ifru_flags = if up {
        flags | up_flag
    } else {
        flags & !up_flag
    };
    sioc(libc::SIOCSIFFLAGS, &mut ifr)
}

/// `SIOCSIFMTU`.
pub(crate) fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let mut ifr = ifreq_named(name);
    ifr.ifr_ifru.ifru_mtu = c_int::try_from(mtu).map_err(|_| io::ErrorKind::InvalidInput)?;
    sioc(libc::SIOCSIFMTU, &mut ifr)
}

/// `SIOCSIFHWADDR`: sets an Ethernet address.
pub(crate) fn set_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let mut ifr = ifreq_named(name);
    // SAFETY: an all-zero `sockaddr` is valid; we fill the family and the first six data bytes.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::ARPHRD_ETHER;
    for (dst, src) in addr.sa_data.iter_mut().zip(mac) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_hwaddr = addr;
    sioc(libc::SIOCSIFHWADDR, &mut ifr)
}

/// The interface's index (`if_nametoindex`), or `None` when there is no such interface.
pub(crate) fn ifindex(name: &CStr) -> Option<u32> {
    // SAFETY: if_nametoindex reads a NUL-terminated string, which a `CStr` is.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Adds (or removes) interface `index` to (from) the bridge `bridge`.
pub(crate) fn bridge_port(bridge: &str, index: u32, add: bool) -> io::Result<()> {
    let mut ifr = ifreq_named(bridge);
    ifr.ifr_ifru.ifru_ifindex = c_int::try_from(index).map_err(|_| io::ErrorKind::InvalidInput)?;
    sioc(if add { SIOCBRADDIF } else { SIOCBRDELIF }, &mut ifr)
}
