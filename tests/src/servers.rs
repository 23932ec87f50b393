//! Storage servers the network-disk tests start and stop: `qemu-nbd` exporting a file over a Unix
//! socket or loopback TCP, and `tgtd` (Debian's `tgt`) serving a file as an iSCSI LUN, with or
//! without CHAP; and the vhost-user backends (a storage daemon's export, virtiofsd). Each is a
//! child process, killed on drop; each waits until its server answers (a connect, by a deadline),
//! never a sleep.

use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer after it starts.
const START: Duration = Duration::from_secs(20);

/// A free TCP port on loopback (bound, then let go: the server binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until `ready` holds, by [`START`].
pub(crate) fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + START;
    let mut pause = Duration::from_millis(5);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} never answered");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// Loopback TCP on this port.
    Tcp(u16),
}

/// `qemu-nbd` exporting one file (raw, writable, persistent, several clients at once),
/// optionally over TLS.
pub struct NbdExport {
    file: PathBuf,
    export: String,
    listen: Listen,
    /// The server's x509 credentials (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`).
    tls: Option<PathBuf>,
    child: Option<Child>,
}

impl NbdExport {
    /// Exports `file` as `export` on `listen`, and waits until it answers.
    pub fn start(file: &Path, export: &str, listen: Listen) -> NbdExport {
        Self::start_tls(file, export, listen, None)
    }

    /// As [`start`](NbdExport::start), requiring TLS with the server credentials in `tls` if
    /// given (see [`x509`]).
    pub fn start_tls(file: &Path, export: &str, listen: Listen, tls: Option<&Path>) -> NbdExport {
        let mut server = NbdExport {
            file: file.to_owned(),
            export: export.to_owned(),
            listen,
            tls: tls.map(Path::to_owned),
            child: None,
        };
        server.restart();
        server
    }

    /// The export's name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The SDK's view of the server.
    pub fn server(&self) -> qhotplug_cmdline::NbdServer {
        match &self.listen {
            Listen::Unix(path) => qhotplug_cmdline::NbdServer::Unix(path.clone()),
            Listen::Tcp(port) => qhotplug_cmdline::NbdServer::Tcp {
                host: "127.0.0.1".into(),
                port: *port,
            },
        }
    }

    /// The disk source for it (no reconnect, no TLS).
    pub fn source(&self) -> qhotplug_cmdline::Nbd {
        qhotplug_cmdline::Nbd {
            server: self.server(),
            export: Some(self.export.clone()),
            reconnect_delay: None,
            tls_dir: None,
        }
    }

    /// Waits until a client is connected to this (TCP) server: an established connection to its
    /// port in `/proc/net/tcp`.
    pub fn wait_for_client(&self) {
        let Listen::Tcp(port) = self.listen else {
            panic!("wait_for_client watches a TCP server");
        };
        wait_until("a client of qemu-nbd", || {
            std::fs::read_to_string("/proc/net/tcp")
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit(':').next()?;
                    Some((u16::from_str_radix(local_port, 16).ok()?, *fields.get(3)?))
                })
                .any(|(local, state)| local == port && state == "01")
        });
    }

    /// Kills the server (an outage): its clients' connections drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Listen::Unix(path) = &self.listen {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Starts the server (again), and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let mut command = Command::new("qemu-nbd");
        command.args([
            "--persistent",
            "--shared=8",
            "--format=raw",
            "--cache=writeback",
        ]);
        command.arg(format!("--export-name={}", self.export));
        if let Some(dir) = &self.tls {
            command.arg(format!(
                "--object=tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={}",
                dir.display()
            ));
            command.arg("--tls-creds=tls0");
        }
        match &self.listen {
            Listen::Unix(path) => {
                command.arg(format!("--socket={}", path.display()));
            }
            Listen::Tcp(port) => {
                command.args(["--bind=127.0.0.1", &format!("--port={port}")]);
            }
        }
        command
            .arg(&self.file)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        self.child = Some(command.spawn().expect("run qemu-nbd"));
        let listen = self.listen.clone();
        wait_until("qemu-nbd", move || match &listen {
            Listen::Unix(path) => UnixStream::connect(path).is_ok(),
            Listen::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        });
    }
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `tgtd` serving one file as LUN 1 of one iSCSI target on loopback, optionally behind CHAP.
pub struct IscsiTarget {
    port: u16,
    control: u16,
    iqn: String,
    file: PathBuf,
    chap: Option<(String, String)>,
    child: Option<Child>,
}

impl IscsiTarget {
    /// The target's IQN.
    pub const IQN: &'static str = "iqn.2026-12.io.qhotplug:target";

    /// Serves `file` as LUN 1 on a free loopback port, requiring `chap` (user, password) if
    /// given, and waits until the portal answers.
    pub fn start(file: &Path, chap: Option<(&str, &str)>) -> IscsiTarget {
        let port = free_port();
        let mut target = IscsiTarget {
            port,
            // Its management socket's number (`-C`, at most 32767), from the portal's port.
            control: port % 32000 + 1,
            iqn: Self::IQN.to_owned(),
            file: file.to_owned(),
            chap: chap.map(|(u, p)| (u.to_owned(), p.to_owned())),
            child: None,
        };
        target.restart();
        target
    }

    /// Kills the target (an outage): its initiators' connections drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the target (again) on the same portal, with the same LUN and CHAP, and waits until
    /// the portal answers.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("tgtd")
            .args(["-f", "-C", &self.control.to_string(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run tgtd");
        self.child = Some(child);
        wait_until("tgtd's control socket", || {
            self.tgtadm(&["--op", "show", "--mode", "sys"], false)
        });
        let file = self.file.to_string_lossy().into_owned();
        let steps: Vec<Vec<&str>> = vec![
            vec![
                "--op", "new", "--mode", "target", "--tid", "1", "-T", &self.iqn,
            ],
            vec![
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                "1",
                "-b",
                &file,
            ],
            vec![
                "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
            ],
        ];
        for step in steps {
            self.tgtadm(&step, true);
        }
        if let Some((user, password)) = &self.chap {
            let account = [
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                user,
                "--password",
                password,
            ];
            self.tgtadm(&account, true);
            let bind = [
                "--op", "bind", "--mode", "account", "--tid", "1", "--user", user,
            ];
            self.tgtadm(&bind, true);
        }
        let port = self.port;
        wait_until("the iSCSI portal", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Runs `tgtadm` on this instance; true if it succeeded (asserted when `must`).
    fn tgtadm(&self, args: &[&str], must: bool) -> bool {
        let out = Command::new("tgtadm")
            .args(["-C", &self.control.to_string(), "--lld", "iscsi"])
            .args(args)
            .output()
            .expect("run tgtadm");
        assert!(
            out.status.success() || !must,
            "tgtadm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.status.success()
    }

    /// The portal, `127.0.0.1:<port>`.
    pub fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The disk source for LUN 1, with `chap` credentials if given.
    pub fn source(&self, chap: Option<(&str, &str)>) -> qhotplug_cmdline::Iscsi {
        qhotplug_cmdline::Iscsi {
            portal: self.portal(),
            target: self.iqn.clone(),
            lun: 1,
            initiator: Some("iqn.2026-12.io.qhotplug:initiator".into()),
            chap: chap.map(|(user, password)| qhotplug_cmdline::Chap {
                user: user.into(),
                password: qhotplug_cmdline::Secret::new(password),
            }),
        }
    }
}

impl Drop for IscsiTarget {
    fn drop(&mut self) {
        self.stop();
    }
}

/// x509 credentials for a TLS test, made with `openssl` in `dir`: a CA, and a server certificate
/// for `127.0.0.1` signed by it. Returns the server's directory (`ca-cert.pem`,
/// `server-cert.pem`, `server-key.pem`) and a client's (`ca-cert.pem`), as QEMU's
/// `tls-creds-x509` reads them.
pub fn x509(dir: &Path) -> (PathBuf, PathBuf) {
    let (server, client) = (dir.join("tls-server"), dir.join("tls-client"));
    std::fs::create_dir_all(&server).unwrap();
    std::fs::create_dir_all(&client).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ca_key = "ca-key.pem";
    let ca = server.join("ca-cert.pem");
    let ca = ca.to_str().unwrap();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-days",
        "2",
        "-subj",
        "/CN=qhotplug test CA",
    ]);
    let key = server.join("server-key.pem");
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let cert = server.join("server-cert.pem");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        cert.to_str().unwrap(),
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    std::fs::copy(server.join("ca-cert.pem"), client.join("ca-cert.pem")).unwrap();
    (server, client)
}

/// A storage daemon exporting an 8 MiB image as `vdisk` on `dir/vdisk.sock`, and virtiofsd
/// sharing `dir/shared` on `dir/fs.sock`: what the vhost-user disk and virtio-fs tests plug.
pub async fn vhost_user_backends(dir: &Path) -> (qhotplug::StorageDaemon, qhotplug::QemuProcess) {
    let qsd =
        qhotplug::StorageDaemon::launch(qhotplug::StorageDaemonLauncher::new(dir.join("qsd")))
            .await
            .unwrap();
    let img = crate::image(dir, "vdisk.raw", 8);
    qsd.export("vdisk", &img, &dir.join("vdisk.sock"), true)
        .await
        .unwrap();
    std::fs::create_dir_all(dir.join("shared")).unwrap();
    let fsd = qhotplug::VirtiofsdLauncher::new(dir.join("shared"), dir.join("fs.sock"))
        .launch()
        .unwrap();
    (qsd, fsd)
}
