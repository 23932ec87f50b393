//! [`Unreadable`]: what a spec read from QEMU could not say. A leaf, so the core can keep it
//! and the planner weigh it without importing the reader.

/// Something of a VM QEMU does not tell, found while a spec was read from it
/// ([`Vm::attach_without_spec`](crate::Vm::attach_without_spec)). Each says what the read spec
/// holds in its place.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unreadable {
    /// What only QEMU's command line said: `paused`, `incoming` and `extra_args`. The spec has
    /// them off and empty.
    LaunchOptions,
    /// The guest's serial console `index` writes to a file, whose path QEMU does not report. The
    /// spec has the consoles before it only.
    SerialConsole {
        /// Its place (`ttyS<index>`).
        index: usize,
    },
    /// The VNC display has a password, which QEMU never tells. The spec holds it as an
    /// unresolved secret with reference `vnc-password`
    /// ([`VmSpec::resolve_secrets`](qhotplug_cmdline::VmSpec::resolve_secrets)).
    VncPassword,
    /// An image QEMU was handed as an fd whose set is gone, so nothing names its file. The spec
    /// holds `/dev/fdset/N` as its path.
    ImagePath {
        /// The device.
        device: String,
        /// The image's format node.
        node: String,
    },
    /// A disk or a CD-ROM drive whose image QEMU opens itself through a driver or from an
    /// address the SDK does not make (a network source it does not render, an NBD server on an
    /// fd). The spec leaves the device out; QEMU keeps it, and `reconcile` leaves it alone.
    NetworkBackend {
        /// The device.
        device: String,
    },
    /// The value of a network disk's or medium's secret (a CHAP password, a Ceph key), which
    /// QEMU never tells. The spec holds it as an unresolved secret whose reference is the id of
    /// QEMU's `secret` object for it (`<device>-secret`, `<device>-secret.<n>` for a later
    /// medium), to give its value with
    /// [`VmSpec::resolve_secrets`](qhotplug_cmdline::VmSpec::resolve_secrets).
    NetworkSecret {
        /// The device.
        device: String,
    },
    /// An NBD disk's or medium's reconnect delay, which QEMU does not tell. The spec has none.
    NbdReconnectDelay {
        /// The device.
        device: String,
    },
    /// A NIC's link state and whether it uses vhost-net: QMP reports neither. The spec has the
    /// link up and no vhost.
    NicLink {
        /// The NIC.
        device: String,
    },
    /// A device the SDK does not plug (another driver, or not shaped as the SDK makes them). The
    /// spec leaves it out; QEMU keeps it, and `reconcile` leaves it alone.
    Foreign {
        /// Its id.
        device: String,
        /// Its QOM type.
        driver: String,
        /// What did not fit.
        reason: String,
    },
}
