//! Launching QEMU from a [`VmSpec`], with its fds at known numbers, and a guard that ends it.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use qhotplug_qmp::{Client, Config};
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};
use crate::spec::VmSpec;

const PREBOUND_CHARDEV: &str = "socket,id=qmp,fd=3,server=on,wait=off";

/// The environment variable that names the QEMU binary a [`Launcher`] starts by default, for
/// example `QHOTPLUG_QEMU=/opt/qemu-10/bin/qemu-system-x86_64`. Unset or empty: the
/// `qemu-system-x86_64` on `PATH`. [`Launcher::binary`] overrides it. The project's tests, demo
/// and benchmarks all launch through it, so this one setting picks the QEMU they run against.
pub const QEMU_ENV: &str = "QHOTPLUG_QEMU";

/// The QEMU binary a [`Launcher`] runs unless told otherwise: [`QEMU_ENV`] when set, else
/// `qemu-system-x86_64` (looked up on `PATH`).
pub fn default_qemu() -> String {
    binary_from_env(QEMU_ENV, || "qemu-system-x86_64".into())
}

/// The binary environment variable `var` names, or `default` when it is unset or empty.
pub(crate) fn binary_from_env(var: &str, default: impl FnOnce() -> String) -> String {
    std::env::var(var)
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(default)
}

/// Starts QEMU for a spec and connects to its monitor.
///
/// The monitor is a Unix listener we bind before QEMU starts and pass to it as an fd, so there is no
/// window where QEMU runs without a monitor or we poll for a socket file. Tap and vhost fds are passed
/// at known fd numbers; every other fd of ours is closed in QEMU's process. The numbering: fd 3 is
/// the monitor, fds given with [`inherit`](Launcher::inherit) follow at 4, 5, … in order, then each
/// NIC's tap fds and vhost fds in spec order, then a pipe holding the VM's master key for secrets.
#[derive(Debug)]
pub struct Launcher {
    spec: VmSpec,
    dir: PathBuf,
    binary: String,
    nic_fds: HashMap<String, (Vec<OwnedFd>, Vec<OwnedFd>)>,
    extra_fds: Vec<OwnedFd>,
    start_timeout: Duration,
    config: Config,
    monitor: Monitor,
}

/// Where QEMU's QMP monitor listens.
#[derive(Debug, Default)]
pub enum Monitor {
    /// The launcher binds `qmp.sock` in the runtime directory and passes the listener as fd 3
    /// (the default): the socket exists before QEMU starts, so there is nothing to poll for.
    #[default]
    Prebound,
    /// A listener the caller bound (its path is where the launcher connects), passed as fd 3.
    Listener(std::os::unix::net::UnixListener),
    /// QEMU binds this path itself (`-chardev socket,path=…`); the launcher connects once it
    /// exists, within the start timeout.
    Path(PathBuf),
}

/// A running QEMU (or another process the SDK launched: `qemu-storage-daemon`, `virtiofsd`).
/// Dropping it kills the process and reaps it without blocking the runtime thread: a task on the
/// current tokio runtime waits for the exit (on a pidfd) and reaps it.
#[derive(Debug)]
pub struct QemuProcess {
    exit: Option<Exit>,
    /// The VM's master key (a QEMU the launcher started; none for a daemon).
    master_key: Option<crate::MasterKey>,
    dir: PathBuf,
    qmp_path: PathBuf,
    stderr_path: PathBuf,
}

/// How the process's exit is seen: our child, or a QEMU another process launched and this one
/// adopted by pid ([`QemuProcess::adopt`]). Either way a pidfd becomes readable when it exits.
#[derive(Debug)]
enum Exit {
    Child {
        child: Child,
        pidfd: AsyncFd<OwnedFd>,
    },
    Adopted {
        pid: u32,
        pidfd: AsyncFd<OwnedFd>,
    },
}

impl Exit {
    fn pid(&self) -> u32 {
        match self {
            Exit::Child { child, .. } => child.id(),
            Exit::Adopted { pid, .. } => *pid,
        }
    }

    fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self {
            Exit::Child { child, .. } => child.try_wait(),
            Exit::Adopted { pid, pidfd } => match crate::sys::pidfd_exited(pidfd.get_ref())? {
                true => {
                    crate::sys::reap_if_ours(*pid);
                    Ok(Some(adopted_status()))
                }
                false => Ok(None),
            },
        }
    }

    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            let pidfd = match self {
                Exit::Child { pidfd, .. } | Exit::Adopted { pidfd, .. } => pidfd,
            };
            let mut ready = pidfd.readable().await?;
            ready.clear_ready();
        }
    }

    fn kill(&mut self) -> std::io::Result<()> {
        match self {
            Exit::Child { child, .. } => child.kill(),
            Exit::Adopted { pidfd, .. } => crate::sys::pidfd_kill(pidfd.get_ref()),
        }
    }
}

/// What an adopted process's exit reads as: its status was its parent's to collect, not ours.
fn adopted_status() -> ExitStatus {
    std::os::unix::process::ExitStatusExt::from_raw(0)
}

impl Drop for Exit {
    fn drop(&mut self) {
        // The last resort, when no task could wait: the process was killed, so this is brief.
        // After a successful wait std returns the kept status at once.
        if let Exit::Child { child, .. } = self {
            let _ = child.wait();
        }
    }
}

/// The file in a VM's runtime directory that keeps its master key (mode 0600) for a process that
/// adopts it ([`QemuProcess::adopt`]); removed with the QEMU.
pub const MASTER_KEY_FILE: &str = "master-key";

impl Launcher {
    /// A launcher for `spec` whose monitor socket and logs go in `runtime_dir` (created if absent).
    pub fn new(spec: VmSpec, runtime_dir: impl Into<PathBuf>) -> Self {
        Launcher {
            spec,
            dir: runtime_dir.into(),
            binary: default_qemu(),
            nic_fds: HashMap::new(),
            extra_fds: Vec::new(),
            start_timeout: Duration::from_secs(30),
            config: Config::new(),
            monitor: Monitor::default(),
        }
    }

    /// Where the QMP monitor listens (default: a listener bound in the runtime directory).
    pub fn monitor(mut self, monitor: Monitor) -> Self {
        self.monitor = monitor;
        self
    }

    /// The spec this launcher starts.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// The spec this launcher starts, to change before launching.
    pub fn spec_mut(&mut self) -> &mut VmSpec {
        &mut self.spec
    }

    /// The QEMU binary (default: [`QEMU_ENV`] when set, else `qemu-system-x86_64` on `PATH`).
    pub fn binary(mut self, binary: impl Into<String>) -> Self {
        self.binary = binary.into();
        self
    }

    /// The tap fds (one per queue) and vhost fds (none, or one per queue) of the NIC `id`.
    pub fn nic_fds(mut self, id: &str, taps: Vec<OwnedFd>, vhost: Vec<OwnedFd>) -> Self {
        self.nic_fds.insert(id.to_owned(), (taps, vhost));
        self
    }

    /// Passes one more fd to QEMU, for arguments of your own (see the numbering above): the first
    /// one given is fd 4, the next 5, and so on.
    pub fn inherit(mut self, fd: OwnedFd) -> Self {
        self.extra_fds.push(fd);
        self
    }

    /// How long QEMU may take to answer on its monitor (default 30 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// The QMP client's configuration.
    pub fn qmp_config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Gives every device without an address one ([`VmSpec::assign_addresses`]), validates the
    /// spec, starts QEMU, and returns the connected client and the process guard. When QEMU exits
    /// during start-up, the error carries what it wrote to stderr.
    pub async fn launch(mut self) -> Result<(Client, QemuProcess)> {
        self.spec.assign_addresses()?;
        self.spec.validate()?;
        std::fs::create_dir_all(&self.dir)?;
        let (qmp_path, listener, chardev) = self.monitor_fd()?;
        let mut fds: Vec<OwnedFd> = vec![listener];
        fds.append(&mut self.extra_fds);
        let nic_numbers = self.nic_fd_numbers(&mut fds)?;
        let (master_key, mut args) = self.master_key_args(&mut fds)?;
        args.extend(self.spec.args(&chardev, |i| nic_numbers[i].clone()));

        tracing::debug!(binary = %self.binary, ?args, "launching QEMU");
        let mut process = spawn(&self.binary, &args, fds, &self.dir, "qemu.stderr")?;
        process.set_qmp_path(qmp_path);
        process.master_key = Some(master_key);
        let client = connect(&mut process, self.config.clone(), self.start_timeout).await?;
        Ok((client, process))
    }

    /// The monitor: its path, the fd QEMU finds at 3 (the listener, or a placeholder when QEMU
    /// binds the path itself: the numbering stays the same either way), and its `-chardev`.
    fn monitor_fd(&mut self) -> Result<(PathBuf, OwnedFd, String)> {
        Ok(match std::mem::take(&mut self.monitor) {
            Monitor::Prebound => {
                let path = self.dir.join("qmp.sock");
                let _ = std::fs::remove_file(&path);
                let listener = std::os::unix::net::UnixListener::bind(&path)?;
                (path, OwnedFd::from(listener), PREBOUND_CHARDEV.to_owned())
            }
            Monitor::Listener(listener) => {
                let path = listener
                    .local_addr()?
                    .as_pathname()
                    .map(Path::to_path_buf)
                    .ok_or_else(|| {
                        Error::InvalidSpec("the monitor listener has no path to connect to".into())
                    })?;
                (path, OwnedFd::from(listener), PREBOUND_CHARDEV.to_owned())
            }
            Monitor::Path(path) => {
                let _ = std::fs::remove_file(&path);
                let chardev = format!(
                    "socket,id=qmp,path={},server=on,wait=off",
                    crate::value::escape(&path.to_string_lossy())
                );
                let placeholder = OwnedFd::from(std::fs::File::open("/dev/null")?);
                (path, placeholder, chardev)
            }
        })
    }

    /// Each NIC's tap (and vhost) fds moved into `fds`, checked against its queues; returns the
    /// numbers QEMU finds them at, per NIC.
    fn nic_fd_numbers(
        &mut self,
        fds: &mut Vec<OwnedFd>,
    ) -> Result<Vec<(Vec<String>, Vec<String>)>> {
        let mut nic_numbers = Vec::new();
        for nic in &self.spec.nics {
            let (taps, vhost) = self
                .nic_fds
                .remove(&nic.id)
                .ok_or_else(|| Error::InvalidSpec(format!("{}: no tap fds given", nic.id)))?;
            if taps.len() != usize::from(nic.queues)
                || !(vhost.is_empty() || vhost.len() == taps.len())
                || nic.vhost == vhost.is_empty()
            {
                return Err(Error::InvalidSpec(format!(
                    "{}: {} queues need {} tap fds and, with vhost, as many vhost fds (got {} and {})",
                    nic.id, nic.queues, nic.queues, taps.len(), vhost.len()
                )));
            }
            let mut number = |list: Vec<OwnedFd>| -> Vec<String> {
                list.into_iter()
                    .map(|fd| {
                        fds.push(fd);
                        (2 + fds.len()).to_string()
                    })
                    .collect()
            };
            let taps = number(taps);
            let vhost = number(vhost);
            nic_numbers.push((taps, vhost));
        }
        if let Some(extra) = self.nic_fds.keys().next() {
            return Err(Error::InvalidSpec(format!(
                "fds given for {extra}, which the spec does not have"
            )));
        }
        Ok(nic_numbers)
    }

    /// The VM's master key, always (as libvirt makes one for every domain), through a pipe QEMU
    /// reads as a file (in `fds`); then each secret of the spec (network disks' credentials)
    /// encrypted with it. Nothing secret is in the argv. Returns the key and its `-object`s.
    fn master_key_args(&self, fds: &mut Vec<OwnedFd>) -> Result<(crate::MasterKey, Vec<String>)> {
        let master_key = crate::MasterKey::generate()?;
        // Kept for a process that adopts this QEMU later ([`QemuProcess::adopt`]).
        master_key.keep(&self.dir.join(MASTER_KEY_FILE))?;
        fds.push(OwnedFd::from(master_key.pipe()?));
        let fd = i64::try_from(2 + fds.len()).expect("a few fds");
        let mut args = master_key.object(fd).args().to_vec();
        let disks = self.spec.disks.iter();
        let disk_secrets = disks.map(|d| (d.network_source(), crate::names::secret(&d.id)));
        let cdroms = self.spec.cdroms.iter();
        let medium_secrets = cdroms.map(|c| (c.network_source(), c.secret_id()));
        for (source, id) in disk_secrets.chain(medium_secrets) {
            if let Some(secret) = source.map(|n| n.secret_value()).transpose()?.flatten() {
                args.extend(master_key.encrypt(&id, &secret)?.args());
            }
        }
        Ok((master_key, args))
    }
}

/// The module directory of a QEMU installed outside `/usr` (unpacked under a prefix, as the
/// tests' QEMU 10.0 is): `<prefix>/lib/<triple>/qemu` beside its `<prefix>/bin`. Such a QEMU
/// would otherwise load the system's modules (`block-iscsi.so`, `block-rbd.so`), which a build
/// refuses unless they are its own. `None` for `/usr/bin`'s or when `QEMU_MODULE_DIR` is set.
fn own_module_dir(binary: &Path) -> Option<PathBuf> {
    if std::env::var_os("QEMU_MODULE_DIR").is_some() {
        return None;
    }
    let prefix = binary.parent()?.parent()?;
    if prefix == Path::new("/usr") {
        return None;
    }
    let dir = prefix.join("lib/x86_64-linux-gnu/qemu");
    dir.is_dir().then_some(dir)
}

/// Starts `binary` with `args`, `fds` at 3, 4, … (everything else of ours closed in the child),
/// stdin and stdout on `/dev/null` and stderr in `dir/log`; returns its guard.
pub(crate) fn spawn(
    binary: &str,
    args: &[String],
    fds: Vec<OwnedFd>,
    dir: &Path,
    log: &str,
) -> Result<QemuProcess> {
    std::fs::create_dir_all(dir)?;
    let stderr_path = dir.join(log);
    let mut command = Command::new(binary);
    if let Some(modules) = own_module_dir(Path::new(binary)) {
        command.env("QEMU_MODULE_DIR", modules);
    }
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path)?);
    crate::sys::inherit_fds(&mut command, fds)?;
    let child = command.spawn().map_err(|source| Error::Spawn {
        program: binary.to_owned(),
        source,
    })?;
    // Our copies of the fds were moved into `command`; drop it so they close now.
    drop(command);
    let pidfd = match crate::sys::pidfd(child.id()) {
        Ok(pidfd) => pidfd,
        Err(e) => {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.into());
        }
    };
    Ok(QemuProcess {
        exit: Some(Exit::Child { child, pidfd }),
        master_key: None,
        dir: dir.to_owned(),
        qmp_path: PathBuf::new(),
        stderr_path,
    })
}

/// Connects a QMP client to `process`'s monitor (its `qmp_path`) within `timeout`; if the process
/// exits first, or the monitor closes as it exits, the error carries what it wrote to stderr.
pub(crate) async fn connect(
    process: &mut QemuProcess,
    config: Config,
    timeout: Duration,
) -> Result<Client> {
    let qmp_path = process.qmp_path.clone();
    let config = config.connect_timeout(timeout);
    handshake_or_exit(process, config.connect(&qmp_path)).await
}

/// Runs `handshake`, unless `process` exits first; a failed handshake of a process that is exiting
/// reports the process's own words.
pub(crate) async fn handshake_or_exit(
    process: &mut QemuProcess,
    handshake: impl std::future::Future<Output = qhotplug_qmp::Result<Client>>,
) -> Result<Client> {
    let start = tokio::select! {
        client = handshake => Ok(client),
        status = process.wait() => Err(status?),
    };
    match start {
        Ok(Ok(client)) => Ok(client),
        Err(status) => Err(Error::Exited {
            status,
            stderr: process.stderr(),
        }),
        Ok(Err(e)) => {
            // A closed monitor usually means the process is exiting: report its own words.
            match tokio::time::timeout(Duration::from_secs(2), process.wait()).await {
                Ok(Ok(status)) => Err(Error::Exited {
                    status,
                    stderr: process.stderr(),
                }),
                _ => Err(e.into()),
            }
        }
    }
}

impl QemuProcess {
    fn exit(&mut self) -> &mut Exit {
        self.exit.as_mut().expect("only Drop takes it")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.exit.as_ref().expect("only Drop takes it").pid()
    }

    /// Takes charge of a QEMU another process launched with a [`Launcher`] in `runtime_dir` and
    /// left running (an orchestrator that died or restarted): its exit is watched on a pidfd, it
    /// is killed on drop as a launched one is, its monitor is `runtime_dir/qmp.sock`, and the
    /// master key the launch kept there (readable by its owner only) is its again, so secrets can
    /// still be hot-added. Its exit status is not ours to read (it reads as success).
    pub fn adopt(pid: u32, runtime_dir: impl Into<PathBuf>) -> Result<QemuProcess> {
        let dir = runtime_dir.into();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        if !String::from_utf8_lossy(&cmdline).contains("qemu") {
            return Err(Error::InvalidSpec(format!("process {pid} is no QEMU")));
        }
        let pidfd = crate::sys::pidfd_of(pid)?;
        let key = dir.join(MASTER_KEY_FILE);
        let master_key = match key.exists() {
            true => Some(crate::MasterKey::kept(&key)?),
            false => None,
        };
        Ok(QemuProcess {
            exit: Some(Exit::Adopted { pid, pidfd }),
            master_key,
            qmp_path: dir.join("qmp.sock"),
            stderr_path: dir.join("qemu.stderr"),
            dir,
        })
    }

    pub(crate) fn set_qmp_path(&mut self, path: PathBuf) {
        self.qmp_path = path;
    }

    /// The master key QEMU was launched with (the `secret` object every other secret is
    /// encrypted with); `None` for a daemon's process.
    pub fn master_key(&self) -> Option<&crate::MasterKey> {
        self.master_key.as_ref()
    }

    /// The monitor socket's path (one client at a time; empty for a process without one).
    pub fn qmp_path(&self) -> PathBuf {
        self.qmp_path.clone()
    }

    /// The runtime directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Whether QEMU has exited, without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.exit().try_wait()
    }

    /// Waits for QEMU to exit, and reaps it. Wakes on the process's pidfd: no polling.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.exit().wait().await
    }

    /// Kills QEMU (SIGKILL) without waiting for it.
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.exit().kill()
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        let Some(mut exit) = self.exit.take() else {
            return;
        };
        // The key goes with the QEMU it belongs to.
        if self.master_key.is_some() {
            let _ = std::fs::remove_file(self.dir.join(MASTER_KEY_FILE));
        }
        let _ = exit.kill();
        if let Ok(Some(_)) = exit.try_wait() {
            return;
        }
        // Reap in the background; if the runtime ends first, dropping the task reaps (Exit's Drop).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = exit.wait().await;
            });
        }
    }
}
