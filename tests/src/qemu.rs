//! A real `qemu-system-x86_64`, paused, launched with [`qhotplug_cmdline::Launcher`] in a
//! temporary directory; killed and reaped when dropped.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use qhotplug_cmdline::{Launcher, Machine, QemuProcess, VmSpec};
use qhotplug_qmp::{Client, Config};

/// A running, paused (`-S`) `pc` machine under TCG with no devices. Dropping it kills and reaps the
/// process; its scratch directory goes after it.
pub struct Qemu {
    process: QemuProcess,
    dir: tempfile::TempDir,
}

impl Qemu {
    /// A paused QEMU and a client connected with the default config.
    pub async fn paused() -> (Qemu, Client) {
        Self::launch(&[], Config::new()).await
    }

    /// A paused QEMU with extra arguments (devices, more monitors), and a client with `config`.
    /// `{dir}` in an argument stands for the process's scratch directory.
    pub async fn launch(extra: &[&str], config: Config) -> (Qemu, Client) {
        Self::launch_with_fds(extra, Vec::new(), config).await
    }

    /// As [`launch`](Qemu::launch), passing `fds` to QEMU at fd 4, 5, … (fd 3 is the monitor).
    pub async fn launch_with_fds(
        extra: &[&str],
        fds: Vec<OwnedFd>,
        config: Config,
    ) -> (Qemu, Client) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spec = VmSpec::new("qhotplug-test", Machine::Pc);
        spec.paused = true;
        spec.memory_mib = 128;
        spec.extra_args = extra
            .iter()
            .map(|a| a.replace("{dir}", &dir.path().to_string_lossy()))
            .collect();
        let mut launcher = Launcher::new(spec, dir.path())
            .qmp_config(config)
            .start_timeout(Duration::from_secs(20));
        for fd in fds {
            launcher = launcher.inherit(fd);
        }
        match launcher.launch().await {
            Ok((client, process)) => (Qemu { process, dir }, client),
            Err(e) => panic!("launching QEMU: {e} (`scripts/test` installs qemu-system-x86)"),
        }
    }

    /// A paused QEMU with a second QMP monitor at `dir()/mon2.sock` for another client (a monitor
    /// serves one client at a time), the first one's client, and the second one's path.
    pub async fn with_second_monitor(config: Config) -> (Qemu, Client, std::path::PathBuf) {
        let (qemu, client) = Self::launch(
            &[
                "-chardev",
                "socket,id=mon2,path={dir}/mon2.sock,server=on,wait=off",
                "-mon",
                "chardev=mon2,mode=control",
            ],
            config,
        )
        .await;
        let path = qemu.dir().join("mon2.sock");
        (qemu, client, path)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// A scratch directory that lives as long as the process.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What QEMU wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) {
        crate::sys::kill(self.pid(), signal).expect("kill QEMU");
    }

    /// Waits for the process to exit (after `quit` or a signal) and returns its status.
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        self.process.wait().await.expect("wait for QEMU")
    }
}
