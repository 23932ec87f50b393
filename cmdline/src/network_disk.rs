//! Disks that are not local files: an NBD export, an iSCSI LUN, a Ceph RBD image. QEMU opens them
//! itself (no fd to hand over), from protocol-node options this module renders, the same at boot
//! and at hotplug. Credentials are [`Secret`]s: the node names a `secret` object
//! (`<disk>-secret`), which the launcher or the SDK creates encrypted with the VM's master key.

use std::path::PathBuf;

use base64::Engine;

use crate::error::{Error, Result};
use crate::secret::Secret;
use crate::value::{p, Props, QomObject};

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NbdServer {
    /// A Unix socket.
    Unix(PathBuf),
    /// TCP.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl NbdServer {
    /// QMP's `SocketAddress` for it (an NBD client node's `server`).
    pub fn address(&self) -> serde_json::Value {
        match self {
            NbdServer::Unix(path) => {
                serde_json::json!({"type": "unix", "path": path.to_string_lossy()})
            }
            NbdServer::Tcp { host, port } => {
                serde_json::json!({"type": "inet", "host": host, "port": port.to_string()})
            }
        }
    }

    /// QMP's `SocketAddressLegacy` for it (`nbd-server-start`'s `addr`): the same, its fields
    /// under `data`.
    pub fn legacy_address(&self) -> serde_json::Value {
        let mut flat = self.address();
        let kind = flat["type"].take();
        if let Some(fields) = flat.as_object_mut() {
            fields.remove("type");
        }
        serde_json::json!({"type": kind, "data": flat})
    }
}

/// An NBD export.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Nbd {
    /// The server.
    pub server: NbdServer,
    /// The export's name (`None`: the server's default export).
    pub export: Option<String>,
    /// Seconds to keep reconnecting after the connection drops before requests fail
    /// (`reconnect-delay`; `None`: fail at once).
    pub reconnect_delay: Option<u32>,
    /// A directory of x509 credentials for TLS (`ca-cert.pem`, and `client-cert.pem` and
    /// `client-key.pem` for a client certificate): a `tls-creds-x509` object
    /// (`<disk>-tls`, `endpoint=client`) is made from it.
    pub tls_dir: Option<PathBuf>,
}

/// CHAP credentials.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Chap {
    /// The user name.
    pub user: String,
    /// The password.
    pub password: Secret,
}

/// An iSCSI LUN.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Iscsi {
    /// The portal, `host[:port]` (port 3260 by default).
    pub portal: String,
    /// The target's IQN.
    pub target: String,
    /// The LUN.
    pub lun: u32,
    /// The initiator name QEMU logs in as (`None`: QEMU's default, derived from the VM's UUID).
    pub initiator: Option<String>,
    /// CHAP credentials, if the target asks for them.
    pub chap: Option<Chap>,
}

/// A Ceph monitor's address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CephMonitor {
    /// Host name or address.
    pub host: String,
    /// Port (6789 by default in Ceph).
    pub port: u16,
}

/// A Ceph RBD image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rbd {
    /// The pool.
    pub pool: String,
    /// The image.
    pub image: String,
    /// The RADOS namespace, if any.
    pub namespace: Option<String>,
    /// A snapshot to open (read-only) instead of the image's head.
    pub snapshot: Option<String>,
    /// The monitors (empty: those of `conf`).
    pub monitors: Vec<CephMonitor>,
    /// The Ceph user (`None`: `admin`, librbd's default).
    pub user: Option<String>,
    /// A `ceph.conf` to read.
    pub conf: Option<PathBuf>,
    /// The user's key (`cephx`).
    pub key: Option<Secret>,
}

impl Nbd {
    /// QEMU's URI for it, for people (`vm.spec()` shows it as the disk's path).
    pub fn uri(&self) -> String {
        let export = self.export.as_deref().unwrap_or("");
        match &self.server {
            NbdServer::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
            NbdServer::Tcp { host, port } => format!("nbd://{host}:{port}/{export}"),
        }
    }

    /// `blockdev-add` of a client node `node_name` of this export (a storage migration's
    /// source, reading the target's export), rendered from the one model of an NBD source.
    /// `tls_dir` is not rendered: the caller names its own credentials object (`tls-creds`).
    pub fn blockdev_add(&self, node_name: &str) -> qhotplug_qmp::command::BlockdevAdd {
        let plain = Nbd {
            tls_dir: None,
            ..self.clone()
        };
        let mut props = plain.props("", 0);
        props.insert(1, p("node-name", node_name));
        crate::value::blockdev(&props)
    }

    fn props(&self, owner: &str, generation: u32) -> Props {
        let mut props = vec![p("driver", "nbd")];
        match &self.server {
            NbdServer::Unix(path) => {
                props.push(p("server.type", "unix"));
                props.push(p("server.path", path.to_string_lossy().into_owned()));
            }
            NbdServer::Tcp { host, port } => {
                props.push(p("server.type", "inet"));
                props.push(p("server.host", host.clone()));
                props.push(p("server.port", port.to_string()));
            }
        }
        if let Some(export) = &self.export {
            props.push(p("export", export.clone()));
        }
        if let Some(delay) = self.reconnect_delay {
            props.push(p("reconnect-delay", i64::from(delay)));
        }
        if self.tls_dir.is_some() {
            props.push(p(
                "tls-creds",
                crate::names::tls_creds_at(owner, generation),
            ));
        }
        props
    }
}

impl Iscsi {
    /// QEMU's URI for it, for people.
    pub fn uri(&self) -> String {
        format!("iscsi://{}/{}/{}", self.portal, self.target, self.lun)
    }

    fn props(&self, owner: &str, generation: u32) -> Props {
        let mut props = vec![
            p("driver", "iscsi"),
            p("transport", "tcp"),
            p("portal", self.portal.clone()),
            p("target", self.target.clone()),
            p("lun", i64::from(self.lun)),
        ];
        if let Some(initiator) = &self.initiator {
            props.push(p("initiator-name", initiator.clone()));
        }
        if let Some(chap) = &self.chap {
            props.push(p("user", chap.user.clone()));
            props.push(p(
                "password-secret",
                crate::names::secret_at(owner, generation),
            ));
        }
        props
    }
}

impl Rbd {
    /// QEMU's URI for it, for people (no key, no conf).
    pub fn uri(&self) -> String {
        let ns = self
            .namespace
            .as_deref()
            .map(|n| format!("{n}/"))
            .unwrap_or_default();
        let snap = self
            .snapshot
            .as_deref()
            .map(|s| format!("@{s}"))
            .unwrap_or_default();
        format!("rbd:{}/{ns}{}{snap}", self.pool, self.image)
    }

    fn props(&self, owner: &str, generation: u32) -> Props {
        let mut props = vec![
            p("driver", "rbd"),
            p("pool", self.pool.clone()),
            p("image", self.image.clone()),
        ];
        if let Some(ns) = &self.namespace {
            props.push(p("namespace", ns.clone()));
        }
        if let Some(snap) = &self.snapshot {
            props.push(p("snapshot", snap.clone()));
        }
        for (i, mon) in self.monitors.iter().enumerate() {
            props.push(p(&format!("server.{i}.host"), mon.host.clone()));
            props.push(p(&format!("server.{i}.port"), mon.port.to_string()));
        }
        if let Some(user) = &self.user {
            props.push(p("user", user.clone()));
        }
        if let Some(conf) = &self.conf {
            props.push(p("conf", conf.to_string_lossy().into_owned()));
        }
        if self.key.is_some() {
            props.push(p("key-secret", crate::names::secret_at(owner, generation)));
            props.push(p("auth-client-required.0", "cephx"));
        }
        props
    }
}

/// A disk's network source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkSource {
    /// NBD.
    Nbd(Nbd),
    /// iSCSI.
    Iscsi(Iscsi),
    /// Ceph RBD.
    Rbd(Rbd),
}

impl NetworkSource {
    /// QEMU's block driver for it.
    pub fn driver(&self) -> &'static str {
        match self {
            NetworkSource::Nbd(_) => "nbd",
            NetworkSource::Iscsi(_) => "iscsi",
            NetworkSource::Rbd(_) => "rbd",
        }
    }

    /// A URI for people: the disk's `path` in the spec.
    pub fn uri(&self) -> String {
        match self {
            NetworkSource::Nbd(n) => n.uri(),
            NetworkSource::Iscsi(i) => i.uri(),
            NetworkSource::Rbd(r) => r.uri(),
        }
    }

    /// The protocol node's driver options (no node name) for device `owner`'s medium number
    /// `generation` (0 for a disk): the secret and TLS objects it names are
    /// [`names::secret_at`](crate::names::secret_at) and
    /// [`names::tls_creds_at`](crate::names::tls_creds_at) of those.
    pub fn props(&self, owner: &str, generation: u32) -> Props {
        match self {
            NetworkSource::Nbd(n) => n.props(owner, generation),
            NetworkSource::Iscsi(i) => i.props(owner, generation),
            NetworkSource::Rbd(r) => r.props(owner, generation),
        }
    }

    /// The secret the node names (`<disk>-secret`), if any, as the user gave it.
    pub fn secret(&self) -> Option<&Secret> {
        match self {
            NetworkSource::Nbd(_) => None,
            NetworkSource::Iscsi(i) => i.chap.as_ref().map(|c| &c.password),
            NetworkSource::Rbd(r) => r.key.as_ref(),
        }
    }

    /// The secret the node names, to give it a value or replace it.
    pub fn secret_mut(&mut self) -> Option<&mut Secret> {
        match self {
            NetworkSource::Nbd(_) => None,
            NetworkSource::Iscsi(i) => i.chap.as_mut().map(|c| &mut c.password),
            NetworkSource::Rbd(r) => r.key.as_mut(),
        }
    }

    /// What QEMU's `secret` object for [`secret`](NetworkSource::secret) holds: a CHAP
    /// password as it is; a Ceph key decoded from the base64 Ceph prints it in, since QEMU's
    /// `rbd` driver encodes the object's bytes in base64 again for librados (as libvirt stores
    /// a Ceph secret's value decoded). A key that is not base64 is an error that shows none of it.
    pub fn secret_value(&self) -> Result<Option<Secret>> {
        match self {
            // An unresolved key passes as it is: the encryption refuses it.
            NetworkSource::Rbd(Rbd { key: Some(key), .. }) if !key.is_resolved() => {
                Ok(Some(key.clone()))
            }
            NetworkSource::Rbd(Rbd { key: Some(key), .. }) => {
                let text = String::from_utf8_lossy(key.expose());
                base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map(|raw| Some(Secret::new(raw)))
                    .map_err(|_| {
                        Error::InvalidSpec(
                            "an RBD key must be the base64 text Ceph gives (`ceph auth get-key`)"
                                .into(),
                        )
                    })
            }
            other => Ok(other.secret().cloned()),
        }
    }

    /// The ids of the QOM objects it needs for device `owner`'s medium number `generation` (0
    /// for a disk): its secret's, its TLS credentials', whichever it has.
    pub fn object_ids(&self, owner: &str, generation: u32) -> Vec<String> {
        let secret = self
            .secret()
            .map(|_| crate::names::secret_at(owner, generation));
        let tls = self
            .tls_object(owner, generation)
            .map(|_| crate::names::tls_creds_at(owner, generation));
        secret.into_iter().chain(tls).collect()
    }

    /// The `tls-creds-x509` object it needs for device `owner`'s medium number `generation`
    /// (`<owner>-tls`, `<owner>-tls.<n>`), if any.
    pub fn tls_object(&self, owner: &str, generation: u32) -> Option<QomObject> {
        match self {
            NetworkSource::Nbd(Nbd {
                tls_dir: Some(dir), ..
            }) => Some(tls_creds(
                &crate::names::tls_creds_at(owner, generation),
                dir,
                TlsEndpoint::Client,
            )),
            _ => None,
        }
    }
}

/// Which end of a TLS connection a `tls-creds-x509` object is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEndpoint {
    /// The client: `dir` holds `ca-cert.pem`, the CA the server's certificate is checked against.
    Client,
    /// The server: `dir` holds `ca-cert.pem`, `server-cert.pem`, `server-key.pem`; it does not ask
    /// clients for certificates of their own (`verify-peer` off), as an NBD export's does not.
    Server,
}

/// A `tls-creds-x509` object `id` reading x509 credentials from `dir`, for `endpoint`.
pub fn tls_creds(id: &str, dir: &std::path::Path, endpoint: TlsEndpoint) -> QomObject {
    let mut props = vec![p("id", id), p("dir", dir.to_string_lossy().into_owned())];
    match endpoint {
        TlsEndpoint::Client => props.push(p("endpoint", "client")),
        TlsEndpoint::Server => {
            props.push(p("endpoint", "server"));
            props.push(p("verify-peer", false));
        }
    }
    QomObject {
        qom_type: "tls-creds-x509",
        props,
    }
}

impl From<Nbd> for NetworkSource {
    fn from(nbd: Nbd) -> Self {
        NetworkSource::Nbd(nbd)
    }
}

impl From<Iscsi> for NetworkSource {
    fn from(iscsi: Iscsi) -> Self {
        NetworkSource::Iscsi(iscsi)
    }
}

impl From<Rbd> for NetworkSource {
    fn from(rbd: Rbd) -> Self {
        NetworkSource::Rbd(rbd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rbd(key: &str) -> NetworkSource {
        NetworkSource::Rbd(Rbd {
            pool: "rbd".into(),
            image: "vm1".into(),
            namespace: None,
            snapshot: None,
            monitors: Vec::new(),
            user: None,
            conf: None,
            key: Some(Secret::new(key)),
        })
    }

    #[test]
    fn a_ceph_key_reaches_qemu_decoded_and_a_chap_password_as_it_is() {
        let value = rbd("AQCgzRVr0NzQDBAAGE3fJsYSNglN+ZTs6h2huA==")
            .secret_value()
            .unwrap()
            .unwrap();
        assert_eq!(value.expose().len(), 28);
        assert_eq!(&value.expose()[..2], &[0x01, 0x00]);
        let chap = NetworkSource::Iscsi(Iscsi {
            portal: "127.0.0.1".into(),
            target: "iqn.t".into(),
            lun: 1,
            initiator: None,
            chap: Some(Chap {
                user: "u".into(),
                password: Secret::new("pa ss"),
            }),
        });
        assert_eq!(chap.secret_value().unwrap().unwrap().expose(), b"pa ss");
    }

    #[test]
    fn an_nbd_servers_address_in_both_of_qmps_forms() {
        let tcp = NbdServer::Tcp {
            host: "127.0.0.1".into(),
            port: 10809,
        };
        assert_eq!(
            tcp.legacy_address(),
            serde_json::json!({"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}})
        );
        let unix = NbdServer::Unix("/run/n.sock".into());
        assert_eq!(
            unix.address(),
            serde_json::json!({"type": "unix", "path": "/run/n.sock"})
        );
        assert_eq!(
            unix.legacy_address(),
            serde_json::json!({"type": "unix", "data": {"path": "/run/n.sock"}})
        );
    }

    #[test]
    fn a_ceph_key_that_is_not_base64_is_refused_without_showing_it() {
        let error = rbd("Garbled-key!").secret_value().unwrap_err();
        assert!(!format!("{error} {error:?}").contains("Garbled"));
    }
}
