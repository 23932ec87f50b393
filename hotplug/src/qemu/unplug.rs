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

use crate::qemu::errors::{
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
        let span = tracing::debug_span!(crate::spans::STEP, name = "device_del", id, press);
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
    let span = tracing::debug_span!(crate::spans::STEP, name = "wait DEVICE_DELETED", id);
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

/// The policy's decision on each answer QEMU and the guest can give, against a scripted peer.
#[cfg(test)]
mod tests {
    use super::*;
    use qhotplug_mock::{event_json, MockServer, Received};
    use qhotplug_qmp::Config;
    use serde_json::{json, Value};
    use tokio::task::JoinHandle;

    /// A policy with short waits, so the tests take milliseconds.
    fn quick(deadline_ms: u64) -> UnplugPolicy {
        UnplugPolicy {
            deadline: Duration::from_millis(deadline_ms),
            busy_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
        }
    }

    /// An unplug of `d1` under way against a scripted peer.
    async fn start(
        config: Config,
        policy: UnplugPolicy,
        stale: bool,
    ) -> (MockServer, JoinHandle<Result<Unplugged, Refused>>) {
        let (server, client) = MockServer::connected(config).await;
        let task = tokio::spawn(async move { unplug(&client, "d1", &policy, stale).await });
        (server, task)
    }

    async fn expect(server: &mut MockServer, command: &str) -> Received {
        let got = server.recv().await.expect("a request");
        assert_eq!(got.command(), command, "{:?}", got.request);
        got
    }

    fn deleted(id: &str) -> Value {
        json!({"device": id, "path": format!("/machine/peripheral/{id}")})
    }

    /// `qom-list /machine/peripheral` holding these devices.
    fn peripherals(ids: &[&str]) -> Value {
        let mut list = vec![json!({"name": "type", "type": "string"})];
        list.extend(
            ids.iter()
                .map(|id| json!({"name": id, "type": "child<virtio-blk-pci>"})),
        );
        Value::Array(list)
    }

    #[tokio::test]
    async fn accepted_then_deleted_is_gone() {
        let (mut server, task) = start(Config::new(), quick(5_000), false).await;
        let del = expect(&mut server, "device_del").await;
        assert_eq!(del.arguments()["id"], "d1");
        server.reply(json!({})).await;
        server.event("DEVICE_DELETED", deleted("other")).await;
        server.event("DEVICE_DELETED", deleted("d1")).await;
        assert_eq!(task.await.unwrap().unwrap(), Unplugged::Deleted);
    }

    #[tokio::test]
    async fn absent_is_gone_already_without_waiting() {
        let (mut server, task) = start(Config::new(), quick(5_000), false).await;
        expect(&mut server, "device_del").await;
        server
            .error("DeviceNotFound", "Device 'd1' not found")
            .await;
        assert_eq!(task.await.unwrap().unwrap(), Unplugged::Already);
    }

    #[tokio::test]
    async fn under_way_waits_for_the_guest_and_never_presses_again() {
        let (mut server, task) = start(Config::new(), quick(300), false).await;
        expect(&mut server, "device_del").await;
        server
            .error(
                "GenericError",
                "Device d1 is already in the process of unplug",
            )
            .await;
        match task.await.unwrap() {
            Err(Refused::Pending(after)) => assert_eq!(after, Duration::from_millis(300)),
            other => panic!("{other:?}"),
        }
        // The client is gone with the task: nothing else was sent.
        assert!(server.recv().await.is_none());
    }

    #[tokio::test]
    async fn busy_presses_again_backing_off_until_accepted() {
        let (mut server, task) = start(Config::new(), quick(5_000), false).await;
        for _ in 0..3 {
            expect(&mut server, "device_del").await;
            server
                .error(
                    "GenericError",
                    "Hot-unplug failed: guest is busy (power indicator blinking)",
                )
                .await;
        }
        expect(&mut server, "device_del").await;
        server.reply(json!({})).await;
        server.event("DEVICE_DELETED", deleted("d1")).await;
        assert_eq!(task.await.unwrap().unwrap(), Unplugged::Deleted);
    }

    #[tokio::test]
    async fn busy_until_the_deadline_is_pending() {
        let (mut server, task) = start(Config::new(), quick(300), false).await;
        let presses = tokio::spawn(async move {
            let mut presses = 0;
            while let Some(got) = server.recv().await {
                assert_eq!(got.command(), "device_del");
                presses += 1;
                server
                    .error("GenericError", "Hot-unplug failed: guest is busy")
                    .await;
            }
            presses
        });
        assert!(matches!(task.await.unwrap(), Err(Refused::Pending(_))));
        // Pressed again and again, backing off: 300 ms with waits of 10 ms, then 20 ms (about 15).
        let presses = presses.await.unwrap();
        assert!((2..=20).contains(&presses), "{presses} presses");
    }

    #[tokio::test]
    async fn the_guests_refusal_is_rejected_at_once() {
        let (mut server, task) = start(Config::new(), quick(5_000), false).await;
        expect(&mut server, "device_del").await;
        server.reply(json!({})).await;
        server
            .event("DEVICE_UNPLUG_GUEST_ERROR", deleted("d1"))
            .await;
        match task.await.unwrap() {
            Err(Refused::Rejected(why)) => assert_eq!(why, "DEVICE_UNPLUG_GUEST_ERROR"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_ost_eject_refusal_is_rejected_and_an_ost_success_asks_qemu() {
        let ost = |device: Option<&str>, status: i64| {
            json!({"info": {"device": device, "slot": "0", "slot-type": "DIMM",
                            "source": OST_EJECT_REQUEST, "status": status}})
        };
        let (mut server, task) = start(Config::new(), quick(5_000), false).await;
        expect(&mut server, "device_del").await;
        server.reply(json!({})).await;
        server.event("ACPI_DEVICE_OST", ost(Some("d1"), 1)).await;
        match task.await.unwrap() {
            Err(Refused::Rejected(why)) => {
                assert!(why.starts_with("ACPI _OST status 0x1"), "{why}")
            }
            other => panic!("{other:?}"),
        }

        // Status 0 names no device: QEMU's device list decides.
        let (mut server, task) = start(Config::new(), quick(5_000), false).await;
        expect(&mut server, "device_del").await;
        server.reply(json!({})).await;
        server.event("ACPI_DEVICE_OST", ost(None, 0)).await;
        let list = expect(&mut server, "qom-list").await;
        assert_eq!(list.arguments()["path"], names::PERIPHERAL);
        server.reply(peripherals(&[])).await;
        assert_eq!(task.await.unwrap().unwrap(), Unplugged::Vanished);
    }

    #[tokio::test]
    async fn a_lagged_subscription_asks_qemu_instead_of_guessing() {
        let config = Config::new().event_capacity(1);
        let (mut server, task) = start(config, quick(5_000), false).await;
        expect(&mut server, "device_del").await;
        server.reply(json!({})).await;
        // Three events in one write: the connection queues them all before the waiter runs, so
        // the subscription of one lags, and d1's own event is among those lost.
        let mut burst = Vec::new();
        for id in ["d1", "x", "y"] {
            burst.extend(serde_json::to_vec(&event_json("DEVICE_DELETED", deleted(id))).unwrap());
            burst.extend(b"\r\n");
        }
        server.send_raw(&burst).await;
        expect(&mut server, "qom-list").await;
        server.reply(peripherals(&["x"])).await;
        assert_eq!(task.await.unwrap().unwrap(), Unplugged::Vanished);
    }

    #[tokio::test]
    async fn while_stale_the_first_deleted_event_is_checked_against_qemu() {
        let (mut server, task) = start(Config::new(), quick(5_000), true).await;
        expect(&mut server, "device_del").await;
        server.reply(json!({})).await;
        // The earlier d1's late event: the device list still holds the new one.
        server.event("DEVICE_DELETED", deleted("d1")).await;
        expect(&mut server, "qom-list").await;
        server.reply(peripherals(&["d1"])).await;
        // The new d1's own event counts.
        server.event("DEVICE_DELETED", deleted("d1")).await;
        assert_eq!(task.await.unwrap().unwrap(), Unplugged::Deleted);
    }

    #[tokio::test]
    async fn another_error_is_qemus_and_a_hang_up_is_disconnected() {
        let (mut server, task) = start(Config::new(), quick(5_000), false).await;
        expect(&mut server, "device_del").await;
        server
            .error("GenericError", "Bus 'pci.0' does not support hotplugging")
            .await;
        assert!(matches!(task.await.unwrap(), Err(Refused::Qmp(_))));

        let (mut server, task) = start(Config::new(), quick(5_000), false).await;
        expect(&mut server, "device_del").await;
        server.reply(json!({})).await;
        server.close();
        match task.await.unwrap() {
            Err(Refused::Qmp(e)) => assert!(e.is_disconnected(), "{e:?}"),
            other => panic!("{other:?}"),
        }
    }
}
