//! Asynchronous events.
//!
//! The events the SDK reasons about are typed variants of [`EventKind`]; every other event, and any
//! known event whose data does not have the expected shape, is [`EventKind::Other`]; every event keeps
//! its raw data ([`Event::data`]), as text: it is decoded only into the typed kind, or when a
//! caller asks ([`Event::data_value`], [`Event::data_as`]), so a peer's event never costs more
//! than a small multiple of its bytes.
//! An event the SDK does not know never breaks anything.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// The largest event a connection delivers, in bytes of its name and data (64 KiB; QEMU's events
/// are a few hundred bytes). A larger one is logged and dropped: events wait in every
/// subscriber's buffer ([`Config::event_capacity`](crate::Config::event_capacity) of them), so
/// this bounds what a flooding peer can make the process hold to about
/// `event_capacity × 2 × MAX_EVENT_BYTES` (the raw text and its typed copy), 32 MiB by default.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// When QEMU emitted an event (host wall clock; `-1`/`-1` when QEMU could not read the clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// One event, as QEMU emitted it: its typed [`EventKind`], and its `data` exactly as sent, so
/// members a newer QEMU adds to a known event are kept ([`Event::data`], [`Event::to_json`]).
///
/// Cheap to clone: the kind and data are shared, so every subscriber's copy of an event (and the
/// connection's buffer of recent events) costs a pointer, however large the event.
#[derive(Debug, Clone)]
pub struct Event {
    /// When QEMU emitted it.
    pub timestamp: Timestamp,
    inner: std::sync::Arc<(EventKind, Option<Box<RawValue>>)>,
}

impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            event: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            data: Option<&'a RawValue>,
            timestamp: Timestamp,
        }
        Wire {
            event: self.name(),
            data: self.inner.1.as_deref(),
            timestamp: self.timestamp,
        }
        .serialize(serializer)
    }
}

impl PartialEq for Event {
    fn eq(&self, other: &Event) -> bool {
        self.timestamp == other.timestamp
            && self.kind() == other.kind()
            && self.data().get() == other.data().get()
    }
}

/// What an event says.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EventKind {
    /// `DEVICE_DELETED`: the guest acknowledged a device's removal (or it needed no acknowledgement).
    /// Virtio devices also emit one for their internal `…/virtio-backend` child, without `device`.
    DeviceDeleted(DeviceEvent),
    /// `DEVICE_UNPLUG_GUEST_ERROR` (QEMU 6.2+): the guest refused to let the device go.
    DeviceUnplugGuestError(DeviceEvent),
    /// `SHUTDOWN`: the guest or the host asked the VM to shut down.
    Shutdown(RunStateChange),
    /// `RESET`: the VM was reset.
    Reset(RunStateChange),
    /// `POWERDOWN`: the guest was asked to power down (ACPI).
    Powerdown,
    /// `STOP`: the VM stopped running (paused).
    Stop,
    /// `RESUME`: the VM runs again.
    Resume,
    /// `NIC_RX_FILTER_CHANGED`: a NIC's receive filter (MAC, multicast) changed in the guest.
    NicRxFilterChanged(NicRxFilterChanged),
    /// `ACPI_DEVICE_OST`: the guest's ACPI `_OST` report on a hotplug or eject of a CPU or
    /// memory device (status 0 done, 0x84 eject in progress, 0x80–0x83 refused).
    AcpiDeviceOst(AcpiDeviceOst),
    /// `DEVICE_TRAY_MOVED`: a removable-media drive's tray opened or closed, by the host
    /// (`blockdev-open-tray`, `eject`) or by the guest.
    DeviceTrayMoved(DeviceTrayMoved),
    /// `MEMORY_DEVICE_SIZE_CHANGE`: a virtio-mem device's plugged size changed, as the guest
    /// plugged or unplugged its blocks.
    MemoryDeviceSizeChange(MemoryDeviceSizeChange),
    /// `BALLOON_CHANGE`: the guest's memory, as the balloon leaves it, changed.
    BalloonChange(BalloonChange),
    /// `MIGRATION`: the migration's status changed (needs the `events` capability).
    Migration(MigrationEvent),
    /// `MIGRATION_PASS`: a new pass over guest memory began.
    MigrationPass(MigrationPass),
    /// `BLOCK_EXPORT_DELETED` (`qemu-storage-daemon`, QEMU): an export is gone, its clients
    /// disconnected.
    BlockExportDeleted(BlockExportDeleted),
    /// `VSERPORT_CHANGE`: the guest opened or closed a virtio-serial port (for the guest agent's
    /// port: the agent started or stopped). Rate-limited by QEMU.
    VserportChange(VserportChange),
    /// `GUEST_PANICKED`: the guest reported a panic (through a `pvpanic` device or Hyper-V's
    /// crash MSRs); `action` is what QEMU did about it.
    GuestPanicked(GuestPanicked),
    /// `WATCHDOG`: the guest's watchdog expired; `action` is what QEMU did about it.
    Watchdog(Watchdog),
    /// `JOB_STATUS_CHANGE`: a job's status changed (every transition of every job but QEMU's
    /// internal ones).
    JobStatusChange(JobStatusChange),
    /// `BLOCK_IO_ERROR`: I/O on a disk failed, and the device acted by its error policy
    /// (`report`, `ignore`, `stop`: the VM is paused).
    BlockIoError(BlockIoError),
    /// `SUSPEND`: the guest entered S3 (suspend to RAM).
    Suspend,
    /// `WAKEUP`: the guest woke from suspend.
    Wakeup,
    /// Any other event, and any known event whose data does not have the expected shape. Its
    /// data is [`Event::data`], held once.
    Other {
        /// The event's name.
        name: String,
    },
}

/// The data of `DEVICE_DELETED` and `DEVICE_UNPLUG_GUEST_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DeviceEvent {
    /// The device's id, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The device's QOM path, for example `/machine/peripheral/disk-1`.
    pub path: String,
}

/// The data of `SHUTDOWN` and `RESET`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct RunStateChange {
    /// True when the guest asked for it.
    pub guest: bool,
    /// QEMU's `ShutdownCause`, for example `host-qmp-quit` or `guest-shutdown`.
    pub reason: String,
}

/// The data of `NIC_RX_FILTER_CHANGED`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct NicRxFilterChanged {
    /// The NIC's id, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The NIC's QOM path.
    pub path: String,
}

/// The data of `ACPI_DEVICE_OST`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct AcpiDeviceOst {
    /// The report.
    pub info: AcpiOstInfo,
}

/// One ACPI `_OST` report (QAPI `ACPIOSTInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct AcpiOstInfo {
    /// The device's id, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The slot, as ACPI numbers it.
    pub slot: String,
    /// `DIMM` or `CPU`.
    #[serde(rename = "slot-type")]
    pub slot_type: String,
    /// The `_OST` source: 1 insertion, 3 eject request.
    pub source: i64,
    /// The `_OST` status.
    pub status: i64,
}

/// The data of `DEVICE_TRAY_MOVED`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DeviceTrayMoved {
    /// The block backend's name (empty for a drive whose medium came from `blockdev-add`).
    pub device: String,
    /// The drive's qdev id or QOM path.
    pub id: String,
    /// True when the tray is now open.
    #[serde(rename = "tray-open")]
    pub tray_open: bool,
}

/// The data of `MEMORY_DEVICE_SIZE_CHANGE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct MemoryDeviceSizeChange {
    /// The device's id, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The new plugged size, in bytes.
    pub size: u64,
    /// The device's QOM path (QEMU 7.2+).
    #[serde(rename = "qom-path", default, skip_serializing_if = "Option::is_none")]
    pub qom_path: Option<String>,
}

/// The data of `BALLOON_CHANGE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct BalloonChange {
    /// The guest's memory as the balloon leaves it, in bytes.
    pub actual: u64,
}

/// The data of `MIGRATION`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct MigrationEvent {
    /// The new status (`setup`, `active`, `completed`, `failed`, …).
    pub status: String,
}

/// The data of `MIGRATION_PASS`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct MigrationPass {
    /// The pass number.
    pub pass: u64,
}

/// The data of `BLOCK_EXPORT_DELETED`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct BlockExportDeleted {
    /// The export's id.
    pub id: String,
}

/// The data of `VSERPORT_CHANGE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct VserportChange {
    /// The port's device id.
    pub id: String,
    /// True when the guest now has the port open.
    pub open: bool,
}

/// The data of `JOB_STATUS_CHANGE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct JobStatusChange {
    /// The job's id.
    pub id: String,
    /// Its new status (`created`, `running`, `ready`, `concluded`, …).
    pub status: String,
}

/// The data of `BLOCK_IO_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct BlockIoError {
    /// The block backend's name (empty for a device on `-blockdev` nodes, as the SDK's are).
    #[serde(default)]
    pub device: String,
    /// The node the error happened on, when QEMU knows it.
    #[serde(rename = "node-name", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The device's QOM path (QEMU 8.2+).
    #[serde(rename = "qom-path", default, skip_serializing_if = "Option::is_none")]
    pub qom_path: Option<String>,
    /// `read` or `write`.
    pub operation: String,
    /// What the device did: `ignore`, `report` or `stop`.
    pub action: String,
    /// True when the error was "no space left".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nospace: Option<bool>,
    /// QEMU's words for the error.
    pub reason: String,
}

/// The data of `GUEST_PANICKED`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct GuestPanicked {
    /// What QEMU did: `pause`, `poweroff` or `run`.
    pub action: String,
    /// What the guest said of its panic, when it said anything (`GuestPanicInformation`), as
    /// QEMU sent it: decode it with `serde_json::from_str(info.get())`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Box<RawValue>>,
}

impl PartialEq for GuestPanicked {
    fn eq(&self, other: &GuestPanicked) -> bool {
        self.action == other.action
            && self.info.as_ref().map(|i| i.get()) == other.info.as_ref().map(|i| i.get())
    }
}

/// The data of `WATCHDOG`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Watchdog {
    /// What QEMU did: `reset`, `shutdown`, `poweroff`, `pause`, `debug`, `none` or
    /// `inject-nmi`.
    pub action: String,
}

fn typed<T: DeserializeOwned>(data: Option<&RawValue>) -> Option<T> {
    crate::decode::from_str(data?.get()).ok()
}

impl Event {
    /// Builds an event from the members of its wire form: its name, its `data` as sent (`None`
    /// when it had none), and its timestamp.
    pub fn from_wire(name: String, data: Option<Box<RawValue>>, timestamp: Timestamp) -> Event {
        let data = data.filter(|raw| raw.get() != "null");
        let raw = data.as_deref();
        let kind = match name.as_str() {
            "DEVICE_DELETED" => typed(raw).map(EventKind::DeviceDeleted),
            "DEVICE_UNPLUG_GUEST_ERROR" => typed(raw).map(EventKind::DeviceUnplugGuestError),
            "SHUTDOWN" => typed(raw).map(EventKind::Shutdown),
            "RESET" => typed(raw).map(EventKind::Reset),
            "NIC_RX_FILTER_CHANGED" => typed(raw).map(EventKind::NicRxFilterChanged),
            "ACPI_DEVICE_OST" => typed(raw).map(EventKind::AcpiDeviceOst),
            "DEVICE_TRAY_MOVED" => typed(raw).map(EventKind::DeviceTrayMoved),
            "MEMORY_DEVICE_SIZE_CHANGE" => typed(raw).map(EventKind::MemoryDeviceSizeChange),
            "BALLOON_CHANGE" => typed(raw).map(EventKind::BalloonChange),
            "BLOCK_EXPORT_DELETED" => typed(raw).map(EventKind::BlockExportDeleted),
            "MIGRATION" => typed(raw).map(EventKind::Migration),
            "MIGRATION_PASS" => typed(raw).map(EventKind::MigrationPass),
            "VSERPORT_CHANGE" => typed(raw).map(EventKind::VserportChange),
            "GUEST_PANICKED" => typed(raw).map(EventKind::GuestPanicked),
            "WATCHDOG" => typed(raw).map(EventKind::Watchdog),
            "JOB_STATUS_CHANGE" => typed(raw).map(EventKind::JobStatusChange),
            "BLOCK_IO_ERROR" => typed(raw).map(EventKind::BlockIoError),
            "SUSPEND" => Some(EventKind::Suspend),
            "WAKEUP" => Some(EventKind::Wakeup),
            "POWERDOWN" => Some(EventKind::Powerdown),
            "STOP" => Some(EventKind::Stop),
            "RESUME" => Some(EventKind::Resume),
            _ => None,
        };
        let kind = kind.unwrap_or(EventKind::Other { name });
        Event {
            timestamp,
            inner: std::sync::Arc::new((kind, data)),
        }
    }

    /// What happened.
    pub fn kind(&self) -> &EventKind {
        &self.inner.0
    }

    /// The event's QMP name, for example `DEVICE_DELETED`.
    pub fn name(&self) -> &str {
        match self.kind() {
            EventKind::DeviceDeleted(_) => "DEVICE_DELETED",
            EventKind::DeviceUnplugGuestError(_) => "DEVICE_UNPLUG_GUEST_ERROR",
            EventKind::Shutdown(_) => "SHUTDOWN",
            EventKind::Reset(_) => "RESET",
            EventKind::Powerdown => "POWERDOWN",
            EventKind::Stop => "STOP",
            EventKind::Resume => "RESUME",
            EventKind::NicRxFilterChanged(_) => "NIC_RX_FILTER_CHANGED",
            EventKind::AcpiDeviceOst(_) => "ACPI_DEVICE_OST",
            EventKind::DeviceTrayMoved(_) => "DEVICE_TRAY_MOVED",
            EventKind::MemoryDeviceSizeChange(_) => "MEMORY_DEVICE_SIZE_CHANGE",
            EventKind::BalloonChange(_) => "BALLOON_CHANGE",
            EventKind::BlockExportDeleted(_) => "BLOCK_EXPORT_DELETED",
            EventKind::Migration(_) => "MIGRATION",
            EventKind::MigrationPass(_) => "MIGRATION_PASS",
            EventKind::VserportChange(_) => "VSERPORT_CHANGE",
            EventKind::GuestPanicked(_) => "GUEST_PANICKED",
            EventKind::Watchdog(_) => "WATCHDOG",
            EventKind::JobStatusChange(_) => "JOB_STATUS_CHANGE",
            EventKind::BlockIoError(_) => "BLOCK_IO_ERROR",
            EventKind::Suspend => "SUSPEND",
            EventKind::Wakeup => "WAKEUP",
            EventKind::Other { name } => name,
        }
    }

    /// The event's `data` member as QEMU sent it (`null` when it had none), members the typed
    /// kind does not know included: its JSON text, undecoded.
    pub fn data(&self) -> &RawValue {
        self.inner.1.as_deref().unwrap_or(RawValue::NULL)
    }

    /// The event's `data`, decoded into a JSON value (`Null` when it had none, or when it cannot
    /// be: nested past serde_json's depth limit). Built on each call: a JSON value can take about
    /// a hundred times the bytes of its text, so prefer [`Event::kind`] or [`Event::data_as`].
    pub fn data_value(&self) -> Value {
        serde_json::from_str(self.data().get()).unwrap_or(Value::Null)
    }

    /// The event's `data`, decoded into a type of the caller's (an object only where a struct is
    /// expected).
    pub fn data_as<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        crate::decode::from_str(self.data().get())
    }

    /// The bytes the event holds: its name and its raw data.
    pub(crate) fn wire_len(&self) -> usize {
        self.name().len() + self.inner.1.as_ref().map_or(0, |raw| raw.get().len())
    }

    /// The event in QMP's wire form, `{"event": …, "data": …, "timestamp": …}`, as JSON text:
    /// its data exactly as QEMU sent it (never built into a value, so nothing is lost, not even
    /// what a `serde_json::Value` cannot hold), read back by
    /// [`Message::from_slice`](crate::message::Message::from_slice) as an equal event. The
    /// event's [`Serialize`] writes the same.
    pub fn to_json(&self) -> Box<RawValue> {
        serde_json::value::to_raw_value(self).expect("an event's members serialize")
    }

    /// For `DEVICE_DELETED`: the id of the device that is gone. `None` for other events and for the
    /// id-less events QEMU emits for a device's internal children (such as `virtio-backend`).
    pub fn deleted_device(&self) -> Option<&str> {
        match self.kind() {
            EventKind::DeviceDeleted(DeviceEvent {
                device: Some(id), ..
            }) => Some(id),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(value: Value) -> Option<Box<RawValue>> {
        Some(serde_json::value::to_raw_value(&value).unwrap())
    }

    #[test]
    fn typed_and_other_events() {
        let ts = Timestamp::default();
        let e = Event::from_wire(
            "DEVICE_DELETED".into(),
            raw(json!({"device": "d1", "path": "/machine/peripheral/d1"})),
            ts,
        );
        assert_eq!(e.deleted_device(), Some("d1"));
        assert_eq!(
            e.data_value(),
            json!({"device": "d1", "path": "/machine/peripheral/d1"})
        );
        // A member a newer QEMU adds to a known event is kept beside the typed kind.
        let newer = Event::from_wire(
            "DEVICE_DELETED".into(),
            raw(json!({"device": "d1", "path": "/p", "new-member": 7})),
            ts,
        );
        assert_eq!(newer.deleted_device(), Some("d1"));
        assert_eq!(newer.data_value()["new-member"], 7);
        let wire: Value = serde_json::from_str(newer.to_json().get()).unwrap();
        assert_eq!(wire["data"]["new-member"], 7);
        let ost = Event::from_wire(
            "ACPI_DEVICE_OST".into(),
            raw(
                json!({"info": {"device": "dimm1", "slot": "0", "slot-type": "DIMM", "source": 3, "status": 130}}),
            ),
            ts,
        );
        match &ost.kind() {
            EventKind::AcpiDeviceOst(o) => assert_eq!(
                (o.info.device.as_deref(), o.info.status),
                (Some("dimm1"), 0x82)
            ),
            other => panic!("{other:?}"),
        }

        let backend = Event::from_wire(
            "DEVICE_DELETED".into(),
            raw(json!({"path": "/machine/peripheral/d1/virtio-backend"})),
            ts,
        );
        assert_eq!(backend.deleted_device(), None);

        let odd = Event::from_wire("DEVICE_DELETED".into(), raw(json!({"weird": 1})), ts);
        assert!(matches!(odd.kind(), EventKind::Other { .. }));
        assert_eq!(odd.name(), "DEVICE_DELETED");

        let unknown = Event::from_wire("BRAND_NEW".into(), raw(json!([1, 2])), ts);
        assert_eq!(unknown.name(), "BRAND_NEW");
        assert_eq!(
            serde_json::from_str::<Value>(unknown.to_json().get()).unwrap(),
            json!({"event": "BRAND_NEW", "data": [1, 2], "timestamp": {"seconds": 0, "microseconds": 0}})
        );
        let stop = Event::from_wire("STOP".into(), None, ts);
        assert_eq!(stop.data().get(), "null");
        assert_eq!(stop.kind(), &EventKind::Stop);
        assert!(!stop.to_json().get().contains("\"data\""));
    }

    #[test]
    fn the_guest_s_life_events_are_typed() {
        let ts = Timestamp::default();
        let port = Event::from_wire(
            "VSERPORT_CHANGE".into(),
            raw(json!({"id": "qga0", "open": false})),
            ts,
        );
        assert_eq!(
            port.kind(),
            &EventKind::VserportChange(VserportChange {
                id: "qga0".into(),
                open: false
            })
        );
        let panic = Event::from_wire(
            "GUEST_PANICKED".into(),
            raw(json!({"action": "pause", "info": {"type": "hyper-v", "arg1": 1}})),
            ts,
        );
        match panic.kind() {
            EventKind::GuestPanicked(p) => {
                assert_eq!(p.action, "pause");
                let info: Value = serde_json::from_str(p.info.as_ref().unwrap().get()).unwrap();
                assert_eq!(info["type"], "hyper-v");
            }
            other => panic!("{other:?}"),
        }
        let dog = Event::from_wire("WATCHDOG".into(), raw(json!({"action": "reset"})), ts);
        assert_eq!(
            dog.kind(),
            &EventKind::Watchdog(Watchdog {
                action: "reset".into()
            })
        );
        for (name, kind) in [
            ("SUSPEND", EventKind::Suspend),
            ("WAKEUP", EventKind::Wakeup),
        ] {
            let e = Event::from_wire(name.into(), None, ts);
            assert_eq!((e.kind(), e.name()), (&kind, name));
        }
        // A port event without `open` is kept, untyped.
        let odd = Event::from_wire("VSERPORT_CHANGE".into(), raw(json!({"id": "x"})), ts);
        assert_eq!(odd.name(), "VSERPORT_CHANGE");
        assert!(matches!(odd.kind(), EventKind::Other { .. }));
    }
}
