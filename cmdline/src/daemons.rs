//! The backend processes Debian ships beside QEMU (in `qemu-system-common`), launched with the
//! same standards as QEMU: a socket the SDK made passed as fd 3 (nothing to poll for: virtiofsd's
//! bound listener, the storage daemon's end of a connected monitor pair), every other fd of ours
//! closed in the child, stderr kept for errors, killed and reaped when the guard goes.
//!
//! - `qemu-storage-daemon`: block nodes and exports (vhost-user-blk) driven over its own QMP
//!   monitor, so a [`Client`] drives it.
//! - `virtiofsd`: serves one directory to one VM's `vhost-user-fs-pci`.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qhotplug_qmp::{Client, Config};

use crate::error::Result;
use crate::launch::{binary_from_env, handshake_or_exit, spawn, QemuProcess};

/// The environment variable naming the `qemu-storage-daemon` binary (default: the one on `PATH`).
pub const STORAGE_DAEMON_ENV: &str = "QHOTPLUG_STORAGE_DAEMON";

/// The environment variable naming the `virtiofsd` binary (default: QEMU 7.2's
/// `/usr/lib/qemu/virtiofsd` where present, else `virtiofsd` on `PATH`).
pub const VIRTIOFSD_ENV: &str = "QHOTPLUG_VIRTIOFSD";

/// Binds a listener at `path` (replacing a stale socket file).
fn listen(path: &Path) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    Ok(UnixListener::bind(path)?)
}

/// Starts `qemu-storage-daemon` with its QMP monitor on a listener at `<dir>/qsd.sock`.
#[derive(Debug)]
pub struct StorageDaemonLauncher {
    dir: PathBuf,
    binary: String,
    start_timeout: Duration,
}

impl StorageDaemonLauncher {
    /// A launcher whose monitor socket and log go in `runtime_dir`.
    pub fn new(runtime_dir: impl Into<PathBuf>) -> Self {
        StorageDaemonLauncher {
            dir: runtime_dir.into(),
            binary: binary_from_env(STORAGE_DAEMON_ENV, || "qemu-storage-daemon".into()),
            start_timeout: Duration::from_secs(10),
        }
    }

    /// The binary (default: [`STORAGE_DAEMON_ENV`], else `qemu-storage-daemon` on `PATH`).
    pub fn binary(mut self, binary: impl Into<String>) -> Self {
        self.binary = binary.into();
        self
    }

    /// Starts it and connects to its monitor. When it exits during start-up, the error carries
    /// what it wrote to stderr.
    ///
    /// The monitor is one end of a connected socket pair, passed as fd 3: nothing to accept, so no
    /// race with the daemon's start-up (a listener passed the way QEMU's is made
    /// `qemu-storage-daemon` 7.2 miss a client that connected early, about one launch in twenty
    /// here, and never greet it).
    pub async fn launch(self) -> Result<(Client, QemuProcess)> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let args: Vec<String> = [
            "--chardev",
            "socket,id=qmp,fd=3",
            "--monitor",
            "chardev=qmp",
        ]
        .map(String::from)
        .to_vec();
        tracing::debug!(binary = %self.binary, ?args, "launching qemu-storage-daemon");
        let mut process = spawn(
            &self.binary,
            &args,
            vec![OwnedFd::from(theirs)],
            &self.dir,
            "qsd.stderr",
        )?;
        ours.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(ours)?;
        let config = Config::new().connect_timeout(self.start_timeout);
        let client = handshake_or_exit(&mut process, config.connect_stream(stream)).await?;
        Ok((client, process))
    }
}

/// Starts `virtiofsd` for one directory, listening on a socket for one VM.
#[derive(Debug)]
pub struct VirtiofsdLauncher {
    shared_dir: PathBuf,
    socket: PathBuf,
    log_dir: PathBuf,
    binary: String,
}

impl VirtiofsdLauncher {
    /// Shares `shared_dir` on the socket at `socket`; its log goes beside the socket.
    pub fn new(shared_dir: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Self {
        let socket = socket.into();
        let log_dir = socket
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        VirtiofsdLauncher {
            shared_dir: shared_dir.into(),
            socket,
            log_dir,
            binary: binary_from_env(VIRTIOFSD_ENV, || {
                let qemu_72 = "/usr/lib/qemu/virtiofsd";
                if Path::new(qemu_72).exists() {
                    qemu_72.into()
                } else {
                    "virtiofsd".into()
                }
            }),
        }
    }

    /// The binary (default: [`VIRTIOFSD_ENV`], else QEMU 7.2's, else `virtiofsd` on `PATH`).
    pub fn binary(mut self, binary: impl Into<String>) -> Self {
        self.binary = binary.into();
        self
    }

    /// The socket QEMU connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Starts it. The socket is bound before it starts (passed as `--fd=3`), so QEMU can connect
    /// at once.
    pub fn launch(self) -> Result<QemuProcess> {
        let listener = listen(&self.socket)?;
        let args = vec![
            "--fd=3".to_owned(),
            "-o".to_owned(),
            format!("source={}", self.shared_dir.to_string_lossy()),
        ];
        tracing::debug!(binary = %self.binary, ?args, "launching virtiofsd");
        let log = format!(
            "{}.stderr",
            self.socket
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "virtiofsd".into())
        );
        spawn(
            &self.binary,
            &args,
            vec![OwnedFd::from(listener)],
            &self.log_dir,
            &log,
        )
    }
}
