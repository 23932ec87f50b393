//! Devices the guest gave up without the SDK asking: a guest's own eject (`echo 0 >
//! /sys/bus/pci/slots/N/power`), or a stale ACPI eject request that hit a newcomer (QEMU's ACPI
//! hotplug notifies every slot with an eject pending at each event; Linux's acpiphp acts on a
//! second notify for a slot after the first emptied it, and ejects whatever sits there by then).
//! QEMU says so with `DEVICE_DELETED`; a task per VM listens, and for a device the SDK lists
//! that no call is removing or changing, runs `reconcile`, which forgets it and deletes its
//! backends: the view follows QEMU, and the next `apply` adds it again.

use std::sync::{Arc, Weak};

use futures::StreamExt;
use qhotplug_qmp::EventKind;
use tracing::Instrument;

use crate::state::Entry;
use crate::vm_core::Core;

/// Starts the listener of `core`'s VM; it ends when the core is dropped (the handle aborts it).
pub(crate) fn watch(core: &Arc<Core>) -> tokio::task::JoinHandle<()> {
    let mut events = core.client.events();
    let weak: Weak<Core> = Arc::downgrade(core);
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let Ok(event) = event else {
                continue;
            };
            let EventKind::DeviceDeleted(deleted) = event.kind() else {
                continue;
            };
            let Some(id) = deleted.device.clone() else {
                continue;
            };
            let Some(core) = weak.upgrade() else {
                return;
            };
            let unasked = matches!(
                core.state().devices.get(&id),
                Some(Entry::Placed {
                    busy: false,
                    unplug_pending: false,
                    ..
                })
            );
            if unasked {
                tracing::warn!(%id, "the guest gave the device up unasked: reconciling");
                let running = core.enter_call();
                let span = crate::vm_core::hotplug_span("reconcile", &id);
                if let Err(e) = crate::reconcile::reconcile(&core).instrument(span).await {
                    tracing::warn!(%id, error = %e, "reconcile after an unasked removal");
                }
                drop(running);
            }
        }
    })
}
