//! Asking the guest to let a device go: `device_del`, then waiting for it, by one policy. Used by
//! hot-remove, by a rollback that must take a device back, and so by `reconcile`.
//!
//! What QEMU and guests do, and what this module does about each:
//!
//! - `DEVICE_DELETED` for the id: gone. An error saying the device is not found: gone already (an
//!   earlier unplug completed while nobody waited).
//! - `DEVICE_UNPLUG_GUEST_ERROR` (QEMU 6.2+), or `ACPI_DEVICE_OST` with an eject-refusal status
//!   (how QEMU 7.2 reports a guest that will not eject a DIMM): rejected by the guest, at once.
//! - "guest is busy (power indicator blinking)" (PCIe native hotplug, right after a hot-add): the
//!   press did not happen; wait and press again, backing off, until the deadline.
//! - "already in the process of unplug": an earlier press stands. Never press again while QEMU
//!   says one is under way: on PCIe a second attention-button press inside the guest's 5 s window
//!   cancels the removal, which is why blind retries do harm.
//! - A subscription that lagged may have lost the event: ask QEMU whether the device is still
//!   there rather than guess.
//! - Nothing by the deadline: pending. The device stays, QEMU keeps the request, and a later call
//!   finds it under way (or gone) and waits again.
//!
//! The subscription exists before the first press, so an event that beats the reply is not
//! missed.

use std::time::Duration;

use futures::StreamExt;
use qhotplug_cmdline::names;
use qhotplug_qmp::command::{DeviceDel, QomList};
use qhotplug_qmp::event::EventKind;
use qhotplug_qmp::{Client, EventStream, Lagged};
use tokio::time::Instant;
use tracing::Instrument;

use crate::qemu_errors::{
    is_absent, is_guest_busy, is_unplug_under_way, ost_refuses_eject, OST_EJECT_REQUEST,
};

/// How a hot-remove asks the guest, and for how long. Per [`Vm`](crate::Vm) handle
/// ([`Vm::with_unplug_policy`](crate::Vm::with_unplug_policy)), so a call can use its own without
/// changing any other handle's.
///
/// The default: a 20 s deadline (a PCIe guest waits 5 s after the attention button before it
/// acts, and a guest under TCG is slow); when QEMU says the guest is busy, press again after
/// 250 ms, then 500 ms, 1 s, 2 s, 2 s, …; never press while an unplug is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnplugPolicy {
    /// How long from the first press until the unplug is reported pending.
    pub deadline: Duration,
    /// The first wait before pressing again after "guest is busy"; it doubles each time.
    pub busy_backoff: Duration,
    /// The longest wait between presses.
    pub max_backoff: Duration,
}

/// [`UnplugPolicy`]'s default deadline.
pub const DEFAULT_UNPLUG_DEADLINE: Duration = Duration::from_secs(20);

impl UnplugPolicy {
    /// The default backoff with this deadline.
    pub const fn new(deadline: Duration) -> UnplugPolicy {
        UnplugPolicy {
            deadline,
            busy_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl Default for UnplugPolicy {
    fn default() -> Self {
        Self::new(DEFAULT_UNPLUG_DEADLINE)
    }
}

/// How a device came to be gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unplugged {
    /// The guest let it go now, and its own `DEVICE_DELETED` said so.
    Deleted,
    /// The guest let it go now, found gone from QEMU's device list (after a part's event, an
    /// eject's `_OST`, lost events): its own `DEVICE_DELETED` may still come, later, and must not
    /// be taken for the next device by that id.
    Vanished,
    /// It was gone before we asked (its own event may still come too).
    Already,
}

/// Why a device is still there.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Refused {
    /// The guest said no.
    #[error("the guest refused: {0}")]
    Rejected(String),
    /// No answer by the deadline; the request stays pending in QEMU.
    #[error("still pending after {0:?}")]
    Pending(Duration),
    /// QEMU refused the request, or the connection failed.
    #[error(transparent)]
    Qmp(#[from] qhotplug_qmp::Error),
}

impl Refused {
    /// The error for an unplug of `id` that did not end with the device gone.
    pub(crate) fn into_error(self, id: &str) -> crate::error::Error {
        use crate::error::Error;
        match self {
            Refused::Rejected(reason) => Error::UnplugRejected {
                id: id.to_owned(),
                reason,
            },
            Refused::Pending(after) => Error::UnplugPending {
                id: id.to_owned(),
                after,
            },
            Refused::Qmp(e) => Error::Qmp(e),
        }
    }
}

/// Asks the guest to let device `id` go, by `policy`. `stale`: an earlier device by this id went
/// without its own `DEVICE_DELETED` being seen (QEMU sends it late, after the device has left its
/// device list), so the first such event is checked against the device list before it counts.
pub(crate) async fn unplug(
    client: &Client,
    id: &str,
    policy: &UnplugPolicy,
    stale: bool,
) -> Result<Unplugged, Refused> {
    let mut stale = stale;
    let deadline = Instant::now() + policy.deadline;
    let mut events = client.events();
    let mut backoff = policy.busy_backoff;
    for press in 1.. {
        let span = tracing::debug_span!("step", name = "device_del", id, press);
        let outcome = client
            .execute(&DeviceDel { id: id.to_owned() })
            .instrument(span.clone())
            .await;
        let verdict = match &outcome {
            Ok(_) => "accepted",
            Err(e) if is_absent(e) => "absent",
            Err(e) if is_unplug_under_way(e) => "under way",
            Err(e) if is_guest_busy(e) => "busy",
            Err(_) => "error",
        };
        span.in_scope(|| tracing::debug!(verdict, "device_del answered"));
        match outcome {
            Ok(_) => break,
            Err(e) if is_absent(&e) => return Ok(Unplugged::Already),
            Err(e) if is_unplug_under_way(&e) => break,
            Err(e) if is_guest_busy(&e) => {
                // The press did not happen; the guest may still finish an earlier one meanwhile.
                let until = deadline.min(Instant::now() + backoff);
                if let Some(done) = wait(client, &mut events, id, until, &mut stale).await {
                    return done;
                }
                if Instant::now() >= deadline {
                    return Err(Refused::Pending(policy.deadline));
                }
                backoff = (backoff * 2).min(policy.max_backoff);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let span = tracing::debug_span!("step", name = "wait DEVICE_DELETED", id);
    match wait(client, &mut events, id, deadline, &mut stale)
        .instrument(span)
        .await
    {
        Some(done) => done,
        None => Err(Refused::Pending(policy.deadline)),
    }
}

/// Waits until `until` for the guest's answer about `id`; `None` when none came. While `stale`,
/// the device's own `DEVICE_DELETED` may be an earlier device's: QEMU's device list decides.
async fn wait(
    client: &Client,
    events: &mut EventStream,
    id: &str,
    until: Instant,
    stale: &mut bool,
) -> Option<Result<Unplugged, Refused>> {
    let answer = async {
        while let Some(item) = events.next().await {
            // Whether to ask QEMU if the device is still there.
            let ask = match item {
                // Events were lost: ask QEMU rather than guess.
                Err(Lagged(_)) => true,
                Ok(event) => match event.kind() {
                    EventKind::DeviceDeleted(d) if d.device.as_deref() == Some(id) => {
                        if !std::mem::take(stale) {
                            return Ok(Unplugged::Deleted);
                        }
                        true
                    }
                    EventKind::DeviceUnplugGuestError(d) if d.device.as_deref() == Some(id) => {
                        return Err(Refused::Rejected("DEVICE_UNPLUG_GUEST_ERROR".into()))
                    }
                    EventKind::AcpiDeviceOst(ost)
                        if ost.info.device.as_deref() == Some(id)
                            && ost.info.source == OST_EJECT_REQUEST
                            && ost_refuses_eject(ost.info.status) =>
                    {
                        return Err(Refused::Rejected(format!(
                            "ACPI _OST status {:#x} on {} slot {}",
                            ost.info.status, ost.info.slot_type, ost.info.slot
                        )))
                    }
                    // A part of the device went (a vCPU's `…/lapic`), or the guest finished an
                    // eject (`_OST` status 0, no longer naming the device): QEMU may not send the
                    // device's own event (an x86 vCPU's never comes), so its device list decides.
                    kind => may_be_gone(kind, id),
                },
            };
            if ask {
                match present(client, id).await {
                    Ok(false) => return Ok(Unplugged::Vanished),
                    Ok(true) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Err(Refused::Qmp(qhotplug_qmp::Error::Disconnected))
    };
    tokio::time::timeout_at(until, answer).await.ok()
}

/// True for an event after which device `id` may be gone without its own `DEVICE_DELETED`.
fn may_be_gone(kind: &EventKind, id: &str) -> bool {
    match kind {
        EventKind::DeviceDeleted(d) => names::part_of(&d.path).is_some_and(|(of, _)| of == id),
        EventKind::AcpiDeviceOst(ost) => {
            ost.info.source == OST_EJECT_REQUEST && ost.info.status == 0
        }
        _ => false,
    }
}

/// True when QEMU has a device with this id (`qom-list /machine/peripheral`).
pub(crate) async fn present(client: &Client, id: &str) -> Result<bool, qhotplug_qmp::Error> {
    let list = client
        .execute(&QomList {
            path: names::PERIPHERAL.into(),
        })
        .await?;
    Ok(list
        .iter()
        .any(|p| p.name == id && p.child_type().is_some()))
}
