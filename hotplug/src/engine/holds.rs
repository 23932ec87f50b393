//! What a call holds on a VM's shared core while it runs, each released when dropped: a hot-add's
//! [`Reservation`] (its id and place), a removal's or a change's [`Busy`] mark, and `reconcile`'s
//! [`Cleaning`] marks; and the [`Hold`] a [`Transaction`](crate::engine::transaction::Transaction) keeps
//! until its rollback is done.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kinds::{Device, DeviceKind, Place, Want};
use crate::slots::SlotError;
use crate::state::{Entry, State};
use crate::vm_core::Core;

/// Takes the id and an address for a hot-add.
pub(crate) fn reserve(core: &Arc<Core>, id: &str, want: Want) -> Result<(Reservation, Place)> {
    qhotplug_cmdline::validate_id(id)?;
    let mut state = core.state();
    match state.devices.get(id) {
        Some(Entry::Cleaning) => return Err(Error::Busy(id.to_owned())),
        Some(_) => return Err(Error::DuplicateId(id.to_owned())),
        None => {}
    }
    // An address a spec left to the SDK (`Pci::auto`, `ScsiAddr::auto`) is no address.
    let want = match want {
        Want::Pci(Some(pci)) if pci.is_auto() => Want::Pci(None),
        Want::Scsi { at: Some(a), bus } if a.is_auto() => Want::Scsi { at: None, bus },
        want => want,
    };
    let place = match want {
        Want::Pci(None) => Place::Pci(state.pci.allocate().map_err(slot_error)?),
        Want::Pci(Some(pci)) => {
            state.pci.claim(&pci).map_err(slot_error)?;
            Place::Pci(pci)
        }
        Want::Scsi { at: None, bus } => {
            if !state.scsi.has_buses() {
                return Err(Error::NoScsiController(id.to_owned()));
            }
            Place::Scsi(state.scsi.allocate(bus.as_deref()).map_err(slot_error)?)
        }
        Want::Scsi { at: Some(addr), .. } => {
            state.scsi.claim(&addr).map_err(slot_error)?;
            Place::Scsi(addr)
        }
        Want::Fixed => Place::Fixed,
    };
    state.devices.insert(
        id.to_owned(),
        Entry::Adding {
            place: place.clone(),
        },
    );
    state.touched.insert(id.to_owned());
    drop(state);
    let reservation = Reservation::new(core.clone(), id.to_owned(), place.clone());
    Ok((reservation, place))
}

/// Marks device `id`, of `kind`, busy for a removal or a change: [`Error::Busy`] when another
/// call holds it, [`Error::NotFound`] when there is no such device of that kind.
pub(crate) fn mark_busy(core: &Arc<Core>, id: &str, kind: DeviceKind) -> Result<Busy> {
    match Busy::mark(core, id, kind) {
        Ok(busy) => Ok(busy),
        // Being added, or in doubt until `reconcile` settles it.
        Err(Some(Entry::Adding { .. } | Entry::InDoubt { .. })) => Err(Error::Busy(id.to_owned())),
        Err(Some(Entry::Placed { kind: k, .. })) if k == kind => Err(Error::Busy(id.to_owned())),
        // No such id, or one of another kind.
        Err(_) => Err(Error::NotFound {
            kind,
            id: id.to_owned(),
        }),
    }
}

/// Marks device `id`, of `kind`, busy for a change, and returns it as the spec lists it: held
/// from the check to the spec's update, so no removal or other change runs under it
/// ([`Error::Busy`] for the one that comes second).
pub(crate) fn busy_device(core: &Arc<Core>, id: &str, kind: DeviceKind) -> Result<(Busy, Device)> {
    let busy = mark_busy(core, id, kind)?;
    let device = core
        .state()
        .device(id)
        .expect("a placed entry is in the spec");
    Ok((busy, device))
}

fn slot_error(e: SlotError) -> Error {
    match e {
        SlotError::Full { bus } => Error::NoFreeSlot { bus },
        SlotError::Taken { bus, slot } => Error::AddressTaken { bus, slot },
    }
}

/// What a [`Transaction`](crate::engine::transaction::Transaction) holds while it runs and lets go of only
/// after a rollback: a hot-add's [`Reservation`] (id and address), or a change's [`Busy`] mark.
pub(crate) trait Hold: Send + 'static {
    /// The device id.
    fn id(&self) -> &str;
    /// The VM's shared state, where a background rollback is tracked (none for a sequence on
    /// another process, such as a storage daemon's export).
    fn inner(&self) -> Option<Arc<Core>>;
    /// Keeps what is held (until a reconcile): a rollback could not run, so nothing may reuse
    /// what QEMU may still hold.
    fn leak(self);
    /// The rollback could not take the device back: what is held stays for `reconcile` to
    /// settle (a hot-add's id and place become in doubt; a change's mark simply ends).
    fn in_doubt(self);
}

macro_rules! hold {
    ($ty:ty, $doubt:expr) => {
        impl Hold for $ty {
            fn id(&self) -> &str {
                &self.id
            }
            fn inner(&self) -> Option<Arc<Core>> {
                Some(self.inner.clone())
            }
            fn leak(mut self) {
                self.armed = false;
            }
            fn in_doubt(self) {
                ($doubt)(self)
            }
        }
    };
}
hold!(Reservation, |r: Reservation| r.doubt());
hold!(Busy, drop);

impl Reservation {
    /// Records the device the hot-add plans, for an in-doubt ending.
    pub(crate) fn plan(&mut self, device: Device) {
        self.planned = Some(device);
    }

    fn doubt(mut self) {
        let Some(device) = self.planned.take() else {
            // Nothing planned yet: nothing of it can be in QEMU as a device.
            return;
        };
        self.armed = false;
        let entry = Entry::InDoubt {
            device: Box::new(device),
        };
        self.inner.state().devices.insert(self.id.clone(), entry);
    }
}

/// Several disks' busy marks, held by one transaction (a snapshot of several disks at once).
impl Hold for Vec<Busy> {
    fn id(&self) -> &str {
        self.first().map_or("", |b| b.id.as_str())
    }
    fn inner(&self) -> Option<Arc<Core>> {
        self.first().map(|b| b.inner.clone())
    }
    fn leak(self) {
        self.into_iter().for_each(Hold::leak);
    }
    fn in_doubt(self) {}
}

/// What a sequence that holds no device holds: its name, and the VM whose clean-ups track its
/// rollback when it is on one (a storage migration's side; none for a storage daemon's export).
pub(crate) struct Named(pub(crate) String, pub(crate) Option<Arc<Core>>);

impl Hold for Named {
    fn id(&self) -> &str {
        &self.0
    }
    fn inner(&self) -> Option<Arc<Core>> {
        self.1.clone()
    }
    fn leak(self) {}
    fn in_doubt(self) {}
}

/// Ids `reconcile` marked [`Entry::Cleaning`] while it deletes their leftovers; dropped, it frees
/// them.
pub(crate) struct Cleaning {
    inner: Arc<Core>,
    ids: Vec<String>,
}

impl Cleaning {
    /// Marks `ids` (in `state`, under the lock the caller holds).
    pub(crate) fn mark(inner: &Arc<Core>, state: &mut State, ids: Vec<String>) -> Cleaning {
        for id in &ids {
            state.devices.insert(id.clone(), Entry::Cleaning);
        }
        Cleaning {
            inner: inner.clone(),
            ids,
        }
    }
}

impl Drop for Cleaning {
    fn drop(&mut self) {
        let mut state = self.inner.state();
        for id in &self.ids {
            if matches!(state.devices.get(id), Some(Entry::Cleaning)) {
                state.devices.remove(id);
            }
        }
    }
}

/// An id and an address held for a hot-add. Dropped uncommitted, it frees both.
pub(crate) struct Reservation {
    inner: Arc<Core>,
    id: String,
    place: Place,
    armed: bool,
    planned: Option<Device>,
}

impl Reservation {
    pub(crate) fn new(inner: Arc<Core>, id: String, place: Place) -> Reservation {
        Reservation {
            inner,
            id,
            place,
            armed: true,
            planned: None,
        }
    }

    /// The hot-add completed: the device it planned joins the spec.
    pub(crate) fn commit(mut self) {
        self.armed = false;
        let device = self
            .planned
            .take()
            .expect("a hot-add plans before it commits");
        let (kind, place) = (device.kind(), device.place());
        self.inner.state().insert(device);
        tracing::info!(?place, "{} added", kind.name());
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.inner.state();
            state.devices.remove(&self.id);
            state.release(&self.place);
        }
    }
}

/// Marks a device busy for a removal or a change; clears the mark when dropped.
pub(crate) struct Busy {
    inner: Arc<Core>,
    id: String,
    armed: bool,
}

impl Busy {
    /// Marks `id` busy, or says why it cannot be removed now.
    pub(crate) fn mark(
        inner: &Arc<Core>,
        id: &str,
        kind: DeviceKind,
    ) -> Result<Busy, Option<Entry>> {
        let mut state = inner.state();
        match state.devices.get_mut(id) {
            Some(Entry::Placed {
                kind: k,
                busy: busy @ false,
                ..
            }) if *k == kind => {
                *busy = true;
                Ok(Busy {
                    inner: inner.clone(),
                    id: id.to_owned(),
                    armed: true,
                })
            }
            other => Err(other.cloned()),
        }
    }

    /// Records whether the guest still owes an answer to an accepted `device_del`.
    pub(crate) fn set_pending(&self, pending: bool) {
        if let Some(Entry::Placed { unplug_pending, .. }) =
            self.inner.state().devices.get_mut(&self.id)
        {
            *unplug_pending = pending;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(Entry::Placed { busy, .. }) = self.inner.state().devices.get_mut(&self.id) {
            *busy = false;
        }
    }
}
