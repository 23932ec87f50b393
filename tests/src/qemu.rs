//! A real `qemu-system-x86_64`, paused, with a QMP socket in a temporary directory; killed and
//! reaped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qhotplug_qmp::{Client, Config};

/// The QEMU binary the tests run.
pub const QEMU: &str = "qemu-system-x86_64";

/// A running QEMU. Dropping it kills and reaps the process.
pub struct Qemu {
    child: Child,
    dir: tempfile::TempDir,
    qmp: PathBuf,
}

impl Qemu {
    /// A paused (`-S`) `pc` machine under TCG with no devices but the defaults of `-nodefaults`.
    pub fn paused() -> Qemu {
        Self::spawn(&["-machine", "pc"])
    }

    /// A paused QEMU with these extra arguments (machine, devices).
    pub fn spawn(extra: &[&str]) -> Qemu {
        Self::spawn_with_fds(extra, Vec::new())
    }

    /// A paused QEMU with extra arguments and fds it inherits at the given numbers. `{dir}` in an
    /// argument stands for the process's scratch directory.
    pub fn spawn_with_fds(extra: &[&str], fds: Vec<(std::os::fd::OwnedFd, i32)>) -> Qemu {
        let dir = tempfile::tempdir().expect("tempdir");
        let qmp = dir.path().join("qmp.sock");
        let stderr = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let mut command = Command::new(QEMU);
        for (fd, target) in fds {
            crate::sys::inherit_fd(&mut command, fd, target);
        }
        let child = command
            .args([
                "-S",
                "-nodefaults",
                "-display",
                "none",
                "-accel",
                "tcg",
                "-m",
                "128",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(
                extra
                    .iter()
                    .map(|a| a.replace("{dir}", &dir.path().to_string_lossy())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {QEMU} ({e}); `scripts/test` installs it (Debian qemu-system-x86)"
                )
            });
        Qemu { child, dir, qmp }
    }

    /// The QMP socket's path.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A scratch directory that lives as long as the process.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What QEMU wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Connects with the default config (the socket may not exist yet: connect waits for it).
    pub async fn connect(&self) -> Client {
        self.connect_with(Config::new()).await
    }

    /// Connects with the given config.
    pub async fn connect_with(&self, config: Config) -> Client {
        match config
            .connect_timeout(Duration::from_secs(20))
            .connect(&self.qmp)
            .await
        {
            Ok(client) => client,
            Err(e) => panic!("connecting to QEMU: {e}; its stderr: {}", self.stderr()),
        }
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) {
        crate::sys::kill(self.child.id(), signal).expect("kill QEMU");
    }

    /// Waits for the process to exit (after `quit` or a signal) and returns its status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for QEMU")
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
