//! The crate's error type.

use std::io;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong on the host side of a NIC. Bad input is rejected before anything is
/// created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The interface name (or template) is not one Linux accepts.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The queue count is outside 1..=256.
    #[error("invalid queue count {0}: a tap has 1 to 256 queues")]
    InvalidQueues(usize),
    /// An interface of that name exists and is not a tap.
    #[error("interface {0} exists and is not a tap device")]
    NotATap(String),
    /// `IFF_VNET_HDR` was required, and the kernel does not offer it.
    #[error("the kernel's tun driver does not support IFF_VNET_HDR")]
    VnetHdrUnsupported,
    /// Multiqueue was needed (more than one queue), and the kernel does not offer it.
    #[error("the kernel's tun driver does not support IFF_MULTI_QUEUE")]
    MultiQueueUnsupported,
    /// A MAC address that does not parse, or is not a unicast address.
    #[error("invalid MAC address {0:?}")]
    InvalidMac(String),
    /// A system call failed.
    #[error("{op} on {name}")]
    Sys {
        /// What was being done, for example `TUNSETIFF`.
        op: &'static str,
        /// The interface (or device file) it was done on.
        name: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn sys<'a>(op: &'static str, name: &'a str) -> impl FnOnce(io::Error) -> Error + 'a {
        move |source| Error::Sys {
            op,
            name: name.to_owned(),
            source,
        }
    }
}
