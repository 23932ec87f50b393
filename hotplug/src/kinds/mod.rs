//! Device kinds. A kind is a description the [engine](crate::engine) runs: where its frontend
//! goes ([`Want`]), the backends it needs in QEMU ([`Backend`], each undone by the engine if a
//! later step fails), the one `device_add` that makes it visible to the guest, and, for its
//! removal, what goes once the guest has let it go (its `teardown`).
//!
//! Adding a kind: a module here with its config type (`impl Plug`) and its placed type's
//! `impl Placed` (place, teardown), one line in [`registry`]'s list, its cmdline model, and the
//! public `add_*`/`remove_*` methods on [`Vm`](crate::Vm). A backend QEMU object of a new sort is
//! one [`Backend`] variant plus its [`Delete`](crate::qemu::delete::Delete).

use std::os::fd::OwnedFd;
use std::path::Path;

use qhotplug_cmdline::{Pci, ScsiAddr, Secret};
use qhotplug_qmp::command::{
    BlockSetIoThrottle, BlockdevAdd, ChardevAdd, DeviceAdd, NetdevAdd, ObjectAdd,
};

use crate::error::{Error, Result};

pub(crate) mod balloon;
pub(crate) mod cdrom;
pub(crate) mod disk;
pub(crate) mod memory;
pub(crate) mod nic;
mod registry;
pub(crate) mod rng;
pub(crate) mod vcpu;
pub(crate) mod vhost_user;
pub(crate) mod virtio_serial;

pub(crate) use crate::device_kind::DeviceKind;
pub(crate) use registry::{Device, Place, Placed};

/// Where a kind's frontend goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Want {
    /// A PCI slot: this one, or a free one (on q35, behind a free root port).
    Pci(Option<Pci>),
    /// A SCSI target: this address, or a free target on `bus` (or on the first controller).
    Scsi {
        at: Option<ScsiAddr>,
        bus: Option<String>,
    },
    /// No address the SDK allocates (a vCPU slot, a DIMM: QEMU's to pick or check).
    Fixed,
}

/// One backend a hot-add creates before its `device_add`, in order. The engine runs each with the
/// [`Delete`](crate::qemu::delete::Delete) that undoes it, and knows QEMU's rules for handing fds over.
pub(crate) enum Backend {
    /// `add-fd` of an image the SDK opened, tagged for its device. A later
    /// [`Backend::Blockdev`] with `on_fdset` opens it as `/dev/fdset/N`. The set stays as long as
    /// a node is open on it (as libvirt keeps its fd sets), so that QEMU's fd table names the
    /// image's file for a process that attaches later (`/proc/<qemu>/fd`); whatever deletes the
    /// nodes removes the set (`Delete::UnusedFdsets`, or all the device's sets with it).
    Fdset { fd: OwnedFd, tag: String },
    /// `getfd` under `name`; a later [`Backend::Netdev`] takes it over.
    Getfd { name: String, fd: OwnedFd },
    /// `blockdev-add`; with `on_fdset`, its `filename` is the fd set added above.
    Blockdev { add: BlockdevAdd, on_fdset: bool },
    /// `netdev_add`, which takes over every fd given with `getfd` before it.
    Netdev(NetdevAdd),
    /// `object-add` (a memory backend, an RNG source, TLS credentials).
    Object(ObjectAdd),
    /// A `secret` object `id` holding `secret`: the engine encrypts it with the VM's master key
    /// (made in QEMU first if need be) and adds it as an object.
    Secret { id: String, secret: Secret },
    /// `chardev-add` (a socket to a vhost-user backend, or for a serial port's host side).
    Chardev(ChardevAdd),
}

/// A setting QEMU takes only on a device that exists, so it comes right after `device_add`. If it
/// fails, the rollback takes the device back (`device_del`, which needs the guest).
pub(crate) enum After {
    /// `block_set_io_throttle`.
    IoLimits(BlockSetIoThrottle),
}

/// What a kind's hot-add does, once its address is reserved.
pub(crate) struct Plan<A> {
    pub(crate) backends: Vec<Backend>,
    pub(crate) device: DeviceAdd,
    /// Settings on the device, once it exists.
    pub(crate) after: Vec<After>,
    /// The device as placed: what the caller gets back and `vm.spec()` gains.
    pub(crate) added: A,
}

/// A config the engine can hot-add: one per kind.
pub(crate) trait Plug {
    /// The device as placed.
    type Added: Clone + Into<Device>;
    /// What the kind's hot-add is called in errors ("disk hotplug").
    const OPERATION: &'static str;
    /// The QMP commands its hot-add and hot-remove use: checked against QEMU's schema first.
    const COMMANDS: &'static [&'static str];
    /// The device id.
    fn id(&self) -> &str;
    /// Where its frontend goes. Errors here (an address that does not fit the model) come before
    /// anything is reserved or sent.
    fn want(&self) -> Result<Want>;
    /// The block driver its backend needs that QEMU may lack (a network disk's `nbd`, `iscsi`,
    /// `rbd`): checked against QEMU's schema before anything is sent.
    fn block_driver(&self) -> Option<&'static str> {
        None
    }
    /// The plan, given the reserved address. Host-side work (opening an image, vhost-net) happens
    /// here, before anything is sent to QEMU.
    fn plan(self, place: Place) -> Result<Plan<Self::Added>>;
}

/// The backends of device `id`'s network disk or medium number `generation` (QEMU connects
/// itself; no fd): its secret, its TLS credentials, then `nodes` in order.
pub(crate) fn network_backends(
    id: &str,
    generation: u32,
    source: &qhotplug_cmdline::NetworkSource,
    nodes: Vec<BlockdevAdd>,
) -> Result<Vec<Backend>> {
    let mut backends = Vec::new();
    if let Some(secret) = source.secret_value().map_err(Error::Spec)? {
        backends.push(Backend::Secret {
            id: qhotplug_cmdline::names::secret_at(id, generation),
            secret,
        });
    }
    if let Some(tls) = source.tls_object(id, generation) {
        backends.push(Backend::Object(tls.object_add()));
    }
    backends.extend(nodes.into_iter().map(|add| Backend::Blockdev {
        add,
        on_fdset: false,
    }));
    Ok(backends)
}

/// The backends of CD-ROM drive `cd`'s medium: an image's fd set and nodes, or a network
/// medium's objects and nodes; none for an empty drive. Host-side work happens here.
pub(crate) fn medium_backends(cd: &qhotplug_cmdline::Cdrom) -> Result<Vec<Backend>> {
    let nodes = cd.blockdev_add("");
    match &cd.medium {
        None => Ok(Vec::new()),
        Some(qhotplug_cmdline::Medium::Image(path)) => image_backends(&cd.id, path, false, nodes),
        Some(qhotplug_cmdline::Medium::Network(source)) => {
            network_backends(&cd.id, cd.generation, source, nodes)
        }
    }
}

/// The backends of an image the SDK opens (read-only unless `write`) and hands over: its fd set,
/// tagged for device `id`, then `nodes` in order, the first on the fd set. Opening happens here,
/// before anything is sent to QEMU.
pub(crate) fn image_backends(
    id: &str,
    path: &Path,
    write: bool,
    nodes: Vec<BlockdevAdd>,
) -> Result<Vec<Backend>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
    let mut backends = vec![Backend::Fdset {
        fd: file.into(),
        tag: qhotplug_cmdline::names::fdset_tag(id),
    }];
    backends.extend(
        nodes
            .into_iter()
            .enumerate()
            .map(|(i, add)| Backend::Blockdev {
                add,
                on_fdset: i == 0,
            }),
    );
    Ok(backends)
}
