//! vhost-net: in-kernel virtio-net data path, one `/dev/vhost-net` fd per queue.

use std::io;
use std::os::fd::OwnedFd;

use crate::error::{Error, Result};
use crate::sys;

/// What to do when `/dev/vhost-net` cannot be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VhostPolicy {
    /// Carry on without vhost (QEMU then moves packets in user space); the result says so.
    #[default]
    Prefer,
    /// Fail.
    Require,
}

/// The outcome of [`open_vhost`].
#[derive(Debug)]
pub enum Vhost {
    /// One fd per queue.
    Enabled(Vec<OwnedFd>),
    /// vhost could not be used, and the policy allowed going on without it.
    Unavailable {
        /// Why `/dev/vhost-net` could not be opened.
        reason: io::Error,
    },
}

impl Vhost {
    /// The fds, when vhost is enabled.
    pub fn into_fds(self) -> Option<Vec<OwnedFd>> {
        match self {
            Vhost::Enabled(fds) => Some(fds),
            Vhost::Unavailable { .. } => None,
        }
    }

    /// True when vhost fds were opened.
    pub fn is_enabled(&self) -> bool {
        matches!(self, Vhost::Enabled(_))
    }
}

/// Opens one `/dev/vhost-net` fd per queue (close-on-exec).
pub fn open_vhost(queues: usize, policy: VhostPolicy) -> Result<Vhost> {
    if !(1..=crate::tap::MAX_QUEUES).contains(&queues) {
        return Err(Error::InvalidQueues(queues));
    }
    let mut fds = Vec::with_capacity(queues);
    for _ in 0..queues {
        match sys::open_vhost_net() {
            Ok(fd) => fds.push(fd),
            Err(reason) => {
                return match policy {
                    VhostPolicy::Require => Err(Error::Sys {
                        op: "open",
                        name: "/dev/vhost-net".into(),
                        source: reason,
                    }),
                    VhostPolicy::Prefer => {
                        tracing::info!(error = %reason, "vhost-net unavailable, going on without it");
                        Ok(Vhost::Unavailable { reason })
                    }
                }
            }
        }
    }
    Ok(Vhost::Enabled(fds))
}
