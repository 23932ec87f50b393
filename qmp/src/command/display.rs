//! The front panel and character devices: VNC, serial consoles, sockets for vhost-user and
//! virtio-serial.

use serde::{Deserialize, Serialize};

use super::{Command, Empty};

command!(
    /// `set_password`: sets a display's password (`protocol` `vnc` or `spice`).
    "set_password", SetPassword {
        /// `vnc` or `spice`.
        protocol: String,
        /// The password.
        password: String,
    } -> Empty
);

command!(
    /// `query-vnc`: the VNC server's state.
    "query-vnc", QueryVnc, VncInfo
);

command!(
    /// `query-chardev`: every character device, with what it is connected to.
    "query-chardev", QueryChardev, Vec<ChardevInfo>
);

/// `query-vnc`'s reply (only what the SDK reads; unknown members are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct VncInfo {
    /// True when a VNC server runs.
    pub enabled: bool,
    /// The address it listens on (`unix` for a Unix socket's family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The port (or the socket's path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// How clients authenticate, for example `none` or `vnc` (a password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}

/// One character device in `query-chardev`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ChardevInfo {
    /// Its id.
    pub label: String,
    /// What it is connected to, for example `pty:/dev/pts/3` or `file`.
    pub filename: String,
    /// True when its frontend (a serial port, a monitor) has it open.
    #[serde(rename = "frontend-open", default)]
    pub frontend_open: bool,
}

/// `chardev-add`: creates a character device. `backend` is QAPI's `ChardevBackend` union as JSON
/// (`{"type": "socket", "data": {…}}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChardevAdd {
    /// The chardev id.
    pub id: String,
    /// The backend.
    pub backend: serde_json::Value,
}

impl Command for ChardevAdd {
    const NAME: &'static str = "chardev-add";
    type Returns = serde_json::Value;
}

command!(
    /// `chardev-remove`: removes a chardev no device uses.
    "chardev-remove", ChardevRemove {
        /// The chardev id.
        id: String,
    } -> Empty
);
