//! Character devices on Unix sockets: the host side of vhost-user devices (QEMU connects to the
//! backend's socket) and of virtio-serial ports (QEMU listens, the host's agent connects).

use std::path::PathBuf;

use qhotplug_qmp::command::ChardevAdd;
use serde_json::json;

use crate::device::render_kv;
use crate::error::Result;
use crate::value::{p, validate_id, Props};

/// A `socket` chardev on a Unix path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketChardev {
    /// The chardev id.
    pub id: String,
    /// The socket's path.
    pub path: PathBuf,
    /// QEMU listens (`server=on,wait=off`) rather than connects.
    pub server: bool,
}

impl SocketChardev {
    /// Checks the id.
    pub fn check(&self) -> Result<()> {
        validate_id(&self.id)
    }

    fn props(&self) -> Props {
        let mut props = vec![
            p("id", self.id.clone()),
            p("path", self.path.to_string_lossy().into_owned()),
        ];
        if self.server {
            props.push(p("server", true));
            props.push(p("wait", false));
        }
        props
    }

    /// Launch arguments.
    pub fn args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!("socket,{}", render_kv(&self.props())),
        ]
    }

    /// `chardev-add` arguments.
    pub fn chardev_add(&self) -> ChardevAdd {
        let mut data = json!({
            "addr": {"type": "unix", "data": {"path": self.path.to_string_lossy()}},
            "server": self.server,
        });
        if self.server {
            data["wait"] = false.into();
        }
        ChardevAdd {
            id: self.id.clone(),
            backend: json!({"type": "socket", "data": data}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_chardev_says_the_same_both_ways() {
        let c = SocketChardev {
            id: "port0-chr".into(),
            path: "/run/a,b.sock".into(),
            server: true,
        };
        assert_eq!(
            c.args()[1],
            "socket,id=port0-chr,path=/run/a,,b.sock,server=on,wait=off"
        );
        assert_eq!(
            serde_json::to_value(c.chardev_add()).unwrap(),
            json!({"id": "port0-chr", "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": "/run/a,b.sock"}},
                "server": true, "wait": false}}})
        );
    }
}
