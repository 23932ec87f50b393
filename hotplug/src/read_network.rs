//! A network disk's or medium's source read back from QEMU
//! ([`Vm::attach_without_spec`](crate::Vm::attach_without_spec)): from its protocol node's file
//! name as `query-named-block-nodes` gives it, which is an NBD URI (`nbd://host:port/export`,
//! `nbd+unix:///export?socket=path`) or `json:{…}` holding the node's options (iSCSI, RBD, an NBD
//! address a URI cannot say), and from the objects the node names. QEMU tells neither a secret's
//! value nor an NBD export's reconnect delay nor whether an RBD node was given a key (its file
//! name leaves `key-secret` out): a secret is the `secret` object the SDK names for the device,
//! if QEMU has it, read as an unresolved [`Secret`] whose reference is that object's id.

use std::collections::BTreeMap;
use std::path::PathBuf;

use qhotplug_cmdline::{CephMonitor, Chap, Iscsi, Nbd, NbdServer, NetworkSource, Rbd, Secret};
use serde_json::Value;

use crate::unreadable::Unreadable;

/// What QEMU's objects say of a node's source beside its file name.
pub(crate) struct Objects {
    /// The id of the node's `secret` object, if QEMU has it.
    pub(crate) secret: Option<String>,
    /// The directory of the node's `tls-creds-x509` object, if QEMU has it.
    pub(crate) tls_dir: Option<PathBuf>,
}

/// The source the protocol node of driver `driver` with file name `filename` was opened on, if
/// it is one the SDK makes.
pub(crate) fn network_source(
    driver: &str,
    filename: &str,
    objects: Objects,
) -> Option<NetworkSource> {
    let secret = objects.secret.map(Secret::unresolved);
    match driver {
        "nbd" => {
            let (server, export) = match filename.strip_prefix("json:") {
                Some(json) => {
                    let options = flat_options(json)?;
                    (nbd_server(&options)?, options.get("export").cloned())
                }
                None => nbd_uri(filename)?,
            };
            Some(NetworkSource::Nbd(Nbd {
                server,
                export: export.filter(|e| !e.is_empty()),
                reconnect_delay: None,
                tls_dir: objects.tls_dir,
            }))
        }
        "iscsi" => {
            let options = flat_options(filename.strip_prefix("json:")?)?;
            let chap = match (options.get("user"), secret) {
                (Some(user), Some(password)) => Some(Chap {
                    user: user.clone(),
                    password,
                }),
                _ => None,
            };
            Some(NetworkSource::Iscsi(Iscsi {
                portal: options.get("portal")?.clone(),
                target: options.get("target")?.clone(),
                lun: options.get("lun").map_or(Some(0), |l| l.parse().ok())?,
                initiator: options.get("initiator-name").cloned(),
                chap,
            }))
        }
        "rbd" => {
            let options = flat_options(filename.strip_prefix("json:")?)?;
            let mut monitors = Vec::new();
            while let Some(host) = options.get(&format!("server.{}.host", monitors.len())) {
                let port = options.get(&format!("server.{}.port", monitors.len()))?;
                monitors.push(CephMonitor {
                    host: host.clone(),
                    port: port.parse().ok()?,
                });
            }
            Some(NetworkSource::Rbd(Rbd {
                pool: options.get("pool")?.clone(),
                image: options.get("image")?.clone(),
                namespace: options.get("namespace").cloned(),
                snapshot: options.get("snapshot").cloned(),
                monitors,
                user: options.get("user").cloned(),
                conf: options.get("conf").map(PathBuf::from),
                key: secret,
            }))
        }
        _ => None,
    }
}

/// What a source read back does not hold of device `device`'s: its secret's value, an NBD
/// export's reconnect delay.
pub(crate) fn unsaid(device: &str, source: &NetworkSource) -> Vec<Unreadable> {
    let device = device.to_owned();
    let secret = source.secret().map(|_| Unreadable::NetworkSecret {
        device: device.clone(),
    });
    let delay =
        matches!(source, NetworkSource::Nbd(_)).then(|| Unreadable::NbdReconnectDelay { device });
    secret.into_iter().chain(delay).collect()
}

/// The server and export of an NBD URI as QEMU writes one (`nbd_refresh_filename`): nothing in
/// it is escaped, and an IPv6 host is not bracketed.
fn nbd_uri(uri: &str) -> Option<(NbdServer, Option<String>)> {
    if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let (export, socket) = rest.split_once("?socket=")?;
        let export = export.strip_prefix('/').unwrap_or(export);
        return Some((
            NbdServer::Unix(PathBuf::from(socket)),
            Some(export.to_owned()),
        ));
    }
    let rest = uri.strip_prefix("nbd://")?;
    let (address, export) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = address.rsplit_once(':')?;
    Some((
        NbdServer::Tcp {
            host: host.to_owned(),
            port: port.parse().ok()?,
        },
        Some(export.to_owned()),
    ))
}

/// An NBD node's server, from its options.
fn nbd_server(options: &BTreeMap<String, String>) -> Option<NbdServer> {
    match options.get("server.type")?.as_str() {
        "unix" => Some(NbdServer::Unix(options.get("server.path")?.into())),
        "inet" => Some(NbdServer::Tcp {
            host: options.get("server.host")?.clone(),
            port: options.get("server.port")?.parse().ok()?,
        }),
        _ => None,
    }
}

/// The options of a `json:` file name, flat (`server.0.host`), each value as text: QEMU writes
/// some nested and some already flat.
fn flat_options(json: &str) -> Option<BTreeMap<String, String>> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
        let key = |k: &str| {
            if prefix.is_empty() {
                k.to_owned()
            } else {
                format!("{prefix}.{k}")
            }
        };
        match value {
            Value::Object(fields) => {
                for (k, v) in fields {
                    walk(&key(k), v, out);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(&key(&i.to_string()), v, out);
                }
            }
            Value::String(s) => {
                out.insert(prefix.to_owned(), s.clone());
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let value: Value = serde_json::from_str(json).ok()?;
    let mut out = BTreeMap::new();
    walk("", &value, &mut out);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> Objects {
        Objects {
            secret: None,
            tls_dir: None,
        }
    }

    #[test]
    fn nbd_uris_as_qemu_writes_them_read_back() {
        let read = |uri| match network_source("nbd", uri, none()) {
            Some(NetworkSource::Nbd(n)) => (n.server, n.export),
            other => panic!("{uri}: {other:?}"),
        };
        assert_eq!(
            read("nbd+unix:///one?socket=/run/a b.sock"),
            (NbdServer::Unix("/run/a b.sock".into()), Some("one".into()))
        );
        assert_eq!(
            read("nbd+unix://?socket=/run/x.sock"),
            (NbdServer::Unix("/run/x.sock".into()), None)
        );
        assert_eq!(
            read("nbd://::1:10809/a/b"),
            (
                NbdServer::Tcp {
                    host: "::1".into(),
                    port: 10809
                },
                Some("a/b".into())
            )
        );
        assert_eq!(
            read("nbd://example.org:10809"),
            (
                NbdServer::Tcp {
                    host: "example.org".into(),
                    port: 10809
                },
                None
            )
        );
        let json =
            r#"json:{"driver": "nbd", "server": {"type": "unix", "path": "/s"}, "export": "e"}"#;
        assert_eq!(read(json), (NbdServer::Unix("/s".into()), Some("e".into())));
    }

    #[test]
    fn what_the_sdk_renders_reads_back_as_it_was() {
        // The file names QEMU 7.2 and 10.0 gave nodes the SDK made.
        let iscsi = r#"json:{"password-secret": "is1-secret", "lun": 1, "portal": "127.0.0.1:3260", "initiator-name": "iqn.2026-12.io.qhotplug:initiator", "driver": "iscsi", "transport": "tcp", "user": "qhotplug", "target": "iqn.2026-12.io.qhotplug:target"}"#;
        let objects = Objects {
            secret: Some("is1-secret".into()),
            tls_dir: None,
        };
        assert_eq!(
            network_source("iscsi", iscsi, objects),
            Some(NetworkSource::Iscsi(Iscsi {
                portal: "127.0.0.1:3260".into(),
                target: "iqn.2026-12.io.qhotplug:target".into(),
                lun: 1,
                initiator: Some("iqn.2026-12.io.qhotplug:initiator".into()),
                chap: Some(Chap {
                    user: "qhotplug".into(),
                    password: Secret::unresolved("is1-secret"),
                }),
            }))
        );
        let rbd = r#"json:{"pool": "rbd", "image": "img", "conf": "/c/ceph.conf", "server.0.host": "127.0.0.1", "driver": "rbd", "server.0.port": "6789", "user": "admin"}"#;
        let objects = Objects {
            secret: Some("rb1-secret".into()),
            tls_dir: None,
        };
        assert_eq!(
            network_source("rbd", rbd, objects),
            Some(NetworkSource::Rbd(Rbd {
                pool: "rbd".into(),
                image: "img".into(),
                namespace: None,
                snapshot: None,
                monitors: vec![CephMonitor {
                    host: "127.0.0.1".into(),
                    port: 6789
                }],
                user: Some("admin".into()),
                conf: Some("/c/ceph.conf".into()),
                key: Some(Secret::unresolved("rb1-secret")),
            }))
        );
    }

    #[test]
    fn what_is_not_a_source_the_sdk_makes_is_none() {
        for (driver, filename) in [
            ("nbd", "nbd://no-port/e"),
            (
                "nbd",
                "json:{\"server\": {\"type\": \"fd\", \"str\": \"3\"}}",
            ),
            ("iscsi", "iscsi://h/t/1"),
            ("rbd", "json:{\"pool\": \"p\"}"),
            ("http", "http://h/x"),
            ("iscsi", "json:{not json"),
        ] {
            assert_eq!(network_source(driver, filename, none()), None, "{filename}");
        }
    }
}
