//! How QEMU says what the SDK must tell apart, in one place (public, for orchestrators that
//! classify QEMU's errors themselves): its error replies (`class` and the
//! human-readable `desc`, which QEMU does not promise to keep, hence the tests of each string
//! against every supported QEMU in `tests/tests/hotplug_qemu.rs`) and ACPI `_OST` status codes.
//! The names of QEMU objects live in [`qhotplug_cmdline::names`].

use qhotplug_qmp::Error;

/// QEMU says what a delete would remove is not there: the delete's goal holds.
///
/// `device_del`: class `DeviceNotFound`. `blockdev-del`: "Failed to find node with node-name=…".
/// `netdev_del`: "Device '…' not found" (`DeviceNotFound` on 7.2). `closefd`: "File descriptor
/// named '…' not found". `remove-fd`: "File descriptor named '…' not found" / "… fdset-id … not
/// found".
pub fn is_absent(e: &Error) -> bool {
    e.qmp_class() == Some("DeviceNotFound")
        || e.qmp_desc()
            .is_some_and(|d| d.contains("not found") || d.starts_with("Failed to find node"))
}

/// `nbd-server-stop` with no NBD server running ("NBD server not running"): what it would stop is
/// not there.
pub fn is_nbd_server_not_running(e: &Error) -> bool {
    e.qmp_desc()
        .is_some_and(|d| d.contains("NBD server not running"))
}

/// `device_del` refused because an unplug of the device is already under way ("Device … is
/// already in the process of unplug"): the earlier request stands; pressing again must wait.
pub fn is_unplug_under_way(e: &Error) -> bool {
    e.qmp_desc()
        .is_some_and(|d| d.contains("already in the process of unplug"))
}

/// `device_del` refused because the guest is still busy with the slot: PCIe native hotplug while
/// the slot's power indicator blinks ("Hot-unplug failed: guest is busy (power indicator
/// blinking)"), right after a hot-add or while the guest handles an earlier button press.
pub fn is_guest_busy(e: &Error) -> bool {
    e.qmp_desc().is_some_and(|d| d.contains("guest is busy"))
}

/// `blockdev-del` or `chardev-remove` refused because something still uses the backend ("Node
/// '…' is busy: …", "Node … is in use", "Chardev '…' is busy"): right after a device's removal
/// QEMU may not have let go of its drive or chardev yet.
pub fn is_backend_in_use(e: &Error) -> bool {
    e.qmp_desc().is_some_and(|d| {
        (d.starts_with("Node ") || d.starts_with("Chardev "))
            && (d.contains("is in use") || d.contains("is busy"))
    })
}

/// A medium step refused because the drive's tray is closed ("Tray of device 'cd' is not open",
/// "Tray of the device is not open"): the guest (or its firmware) closed it.
pub fn is_tray_closed(e: &Error) -> bool {
    e.qmp_desc()
        .is_some_and(|d| d.starts_with("Tray of") && d.contains("is not open"))
}

/// `ACPI_DEVICE_OST` status codes for an eject request (ACPI 6.x, `_OST`): 0 done; 0x84 in
/// progress; 1 (failure), 2 (unrecognised), 0x80 (not supported), 0x81 (in use), 0x82 (busy),
/// 0x83 (a dependency is busy) are the guest's refusal. QEMU 7.2 reports a guest that refuses to
/// eject a DIMM this way (0x84, then 0x82), not with `DEVICE_UNPLUG_GUEST_ERROR`.
pub fn ost_refuses_eject(status: i64) -> bool {
    matches!(status, 1 | 2 | 0x80..=0x83)
}

/// ACPI `_OST` source code of an eject request.
pub const OST_EJECT_REQUEST: i64 = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use qhotplug_qmp::QmpError;

    fn qmp(class: &str, desc: &str) -> Error {
        Error::Qmp {
            command: "x".into(),
            error: QmpError {
                class: class.into(),
                desc: desc.into(),
            },
        }
    }

    #[test]
    fn each_string_means_what_it_says() {
        assert!(is_absent(&qmp("DeviceNotFound", "Device 'd' not found")));
        assert!(is_absent(&qmp(
            "GenericError",
            "Failed to find node with node-name='d-fmt'"
        )));
        assert!(!is_absent(&qmp("GenericError", "Node 'd-fmt' is busy")));
        assert!(is_tray_closed(&qmp(
            "GenericError",
            "Tray of the device is not open"
        )));
        assert!(is_tray_closed(&qmp(
            "GenericError",
            "Tray of device 'cd' is not open"
        )));
        assert!(is_unplug_under_way(&qmp(
            "GenericError",
            "Device d is already in the process of unplug"
        )));
        assert!(is_guest_busy(&qmp(
            "GenericError",
            "Hot-unplug failed: guest is busy (power indicator blinking)"
        )));
        assert!(!is_guest_busy(&qmp("GenericError", "Bus 'x' not found")));
        assert!(ost_refuses_eject(0x82) && !ost_refuses_eject(0x84) && !ost_refuses_eject(0));
    }
}
