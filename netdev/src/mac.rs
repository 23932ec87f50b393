//! Ethernet MAC addresses: parse, format, validate, generate.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// QEMU's locally administered prefix, `52:54:00`.
pub const QEMU_OUI: [u8; 3] = [0x52, 0x54, 0x00];

impl MacAddr {
    /// True for a unicast address (the I/G bit, bit 0 of the first byte, clear).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0
    }

    /// True for a locally administered address (the U/L bit, bit 1 of the first byte, set).
    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// A random address under QEMU's `52:54:00` prefix.
    pub fn random_qemu() -> MacAddr {
        let mut tail = [0u8; 3];
        random_bytes(&mut tail);
        MacAddr([
            QEMU_OUI[0],
            QEMU_OUI[1],
            QEMU_OUI[2],
            tail[0],
            tail[1],
            tail[2],
        ])
    }

    /// A random locally administered unicast address.
    pub fn random_local() -> MacAddr {
        let mut bytes = [0u8; 6];
        random_bytes(&mut bytes);
        bytes[0] = (bytes[0] | 0x02) & !0x01;
        MacAddr(bytes)
    }

    /// The address for the host side of a tap whose guest NIC has this address: the first byte
    /// becomes `0xFE` (`0xFA` when it already is `0xFE`), as libvirt does, so a bridge never learns
    /// the guest's address from the host side.
    pub fn host_side(&self) -> MacAddr {
        let mut bytes = self.0;
        bytes[0] = if bytes[0] == 0xFE { 0xFA } else { 0xFE };
        MacAddr(bytes)
    }
}

fn random_bytes(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("reading /dev/urandom");
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl FromStr for MacAddr {
    type Err = Error;

    /// Parses `52:54:00:12:34:56` (or with `-`), two hex digits per byte.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || Error::InvalidMac(s.to_owned());
        let mut bytes = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(bytes))
    }
}

impl MacAddr {
    /// Parses and checks that the address can be a NIC's: unicast and not all zeros.
    pub fn parse_nic(s: &str) -> Result<MacAddr, Error> {
        let mac: MacAddr = s.parse()?;
        if !mac.is_unicast() || mac.0 == [0; 6] {
            return Err(Error::InvalidMac(s.to_owned()));
        }
        Ok(mac)
    }
}

/// Written as its text (`52:54:00:12:34:56`).
impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Read from its text.
impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_format_round_trip() {
        let mac: MacAddr = "52:54:00:AB:cd:0F".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!("52-54-00-ab-cd-0f".parse::<MacAddr>().unwrap(), mac);
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
            "+5:54:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(
            MacAddr::parse_nic("01:00:5e:00:00:01").is_err(),
            "multicast"
        );
        assert!(MacAddr::parse_nic("00:00:00:00:00:00").is_err());
    }

    #[test]
    fn generated_addresses_are_local_unicast() {
        for _ in 0..100 {
            let q = MacAddr::random_qemu();
            assert_eq!(&q.0[..3], &QEMU_OUI);
            assert!(q.is_unicast() && q.is_locally_administered());
            let r = MacAddr::random_local();
            assert!(r.is_unicast() && r.is_locally_administered());
        }
    }

    #[test]
    fn host_side_differs_from_the_guest() {
        let guest: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(guest.host_side().to_string(), "fe:54:00:12:34:56");
        let fe: MacAddr = "fe:54:00:12:34:56".parse().unwrap();
        assert_eq!(fe.host_side().to_string(), "fa:54:00:12:34:56");
    }
}
