//! Hotplug test fixtures: a [`Vm`] launched in a scratch directory, images to plug, and a
//! [`Snapshot`] of everything a hotplug could change, to prove a rollback changed nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qhotplug::Vm;
use qhotplug_cmdline::{Launcher, Machine, Pci, RootPort, ScsiController, VmSpec};
use qhotplug_qmp::command::{
    BlockInfo, Cont, FdsetInfo, HotpluggableCpu, MemoryDeviceInfo, PciInfo, QomList, QueryBlock,
    QueryChardev, QueryFdsets, QueryHotpluggableCpus, QueryMemoryDevices, QueryPci,
};

/// A VM launched for a test, with its scratch directory. QEMU is killed when it is dropped,
/// even when a test leaked a handle on it (a job handle `mem::forget`-ed to play a process that
/// died keeps the VM's core, whose drop would otherwise end QEMU): such a QEMU outlived its test
/// and held its memory.
pub struct TestVm {
    /// The handle under test.
    pub vm: Vm,
    dir: tempfile::TempDir,
}

impl Drop for TestVm {
    fn drop(&mut self) {
        let Some(pid) = self.vm.pid() else {
            return;
        };
        // Only our own QEMU child: after a `quit` the SDK has reaped it, and the pid may be
        // another process's by now.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ours = stat.split_once(") ").is_some_and(|(name, rest)| {
            let parent = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
            name.contains("(qemu-system") && parent == Some(std::process::id())
        });
        if ours {
            let _ = crate::sys::kill(pid, libc::SIGKILL);
        }
    }
}

/// Adds the guest agent's port to `spec`: a virtio-serial controller `vser0` at slot 8 of the
/// machine's root bus and the port `qga0` named `org.qemu.guest_agent.0`, QEMU listening on
/// `socket` (the test guest starts `qemu-ga` on it).
pub fn with_guest_agent(spec: &mut VmSpec, socket: &std::path::Path) {
    spec.virtio_serials.push(qhotplug::VirtioSerial {
        id: "vser0".into(),
        pci: qhotplug::Pci::new(spec.machine.root_bus(), 8),
    });
    spec.serial_ports.push(qhotplug::SerialPort {
        id: "qga0".into(),
        bus: "vser0.0".into(),
        name: qhotplug::SerialPort::GUEST_AGENT.into(),
        socket: socket.to_owned(),
    });
}

/// A `pc` spec with no guest: 128 MiB, paused, one virtio-scsi controller `scsi0` at slot 3.
pub fn pc_spec() -> VmSpec {
    let mut spec = VmSpec::new("qhotplug-test", Machine::Pc);
    spec.paused = true;
    spec.memory_mib = 128;
    spec.scsi_controllers.push(ScsiController {
        id: "scsi0".into(),
        pci: Pci::new("pci.0", 3),
    });
    spec
}

/// A `q35` spec with no guest and `ports` root ports `rp0`, `rp1`, … on `pcie.0` from slot 4.
pub fn q35_spec(ports: u8) -> VmSpec {
    let mut spec = VmSpec::new("qhotplug-test", Machine::Q35);
    spec.paused = true;
    spec.memory_mib = 128;
    spec.scsi_controllers.push(ScsiController {
        id: "scsi0".into(),
        pci: Pci::new("pcie.0", 3),
    });
    for i in 0..ports {
        spec.root_ports.push(RootPort {
            id: format!("rp{i}"),
            chassis: i + 1,
            pci: Pci::new("pcie.0", 4 + i),
        });
    }
    spec
}

impl TestVm {
    /// Launches `spec` (tap fds for its NICs are not supported here: use a `Launcher`).
    pub async fn launch(spec: VmSpec) -> TestVm {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::launch_with(Launcher::new(spec, dir.path().join("run")), dir).await
    }

    /// Launches with a launcher of the caller's (for NIC fds), keeping `dir` alive with the VM.
    pub async fn launch_with(launcher: Launcher, dir: tempfile::TempDir) -> TestVm {
        let launcher = launcher.start_timeout(Duration::from_secs(30));
        match Vm::launch(launcher).await {
            Ok(vm) => TestVm { vm, dir },
            Err(e) => panic!("launching QEMU: {e} (`scripts/test` installs qemu-system-x86)"),
        }
    }

    /// A `pc` VM that runs (no guest OS: the firmware finds nothing to boot). Running matters for
    /// fd sets: QEMU before 9.1 closes a removed fd set's fds only while the VM runs.
    pub async fn running_pc() -> TestVm {
        Self::running(pc_spec()).await
    }

    /// Launches `spec` and lets it run (`cont`). On q35 the firmware then numbers the buses behind
    /// root ports, which `query-pci` needs to list what sits behind them.
    pub async fn running(spec: VmSpec) -> TestVm {
        let t = Self::launch(spec).await;
        t.vm.client().execute(&Cont).await.expect("cont");
        t
    }

    /// Sends a signal to the QEMU process (`libc::SIGSTOP`, `libc::SIGKILL`, …).
    pub fn signal(&self, signal: i32) {
        let pid = self.vm.pid().expect("launched by the SDK");
        crate::sys::kill(pid, signal).expect("kill QEMU");
    }

    /// What QEMU wrote to stderr so far (when it was launched by [`TestVm::launch`]).
    pub fn qemu_stderr(&self) -> String {
        std::fs::read_to_string(self.dir().join("run/qemu.stderr")).unwrap_or_default()
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A sparse raw image of `mib` MiB in the scratch directory.
    pub fn image(&self, name: &str, mib: u64) -> PathBuf {
        image(self.dir(), name, mib)
    }

    /// Everything a hotplug could have changed, read from QEMU and from our own fd table.
    pub async fn snapshot(&self) -> Snapshot {
        Snapshot::take(&self.vm).await
    }

    /// Asserts that QEMU's state comes back to `before` within a few seconds: for what QEMU
    /// releases after it answered (a deleted memory backend's memfd is closed once no vCPU can
    /// still be using it, an RCU grace period later).
    pub async fn assert_settles_to(&self, before: &Snapshot, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.snapshot().await;
            if &now == before {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                assert_eq!(&now, before, "{what}");
            }
            tokio::task::yield_now().await;
        }
    }
}

/// A sparse raw image of `mib` MiB at `dir/name`.
pub fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("create image");
    file.set_len(mib << 20).expect("size image");
    path
}

/// An ISO 9660 image at `dir/name` holding one file, `file`, with `content` (made with Debian's
/// `genisoimage`, which `scripts/install-deps` installs).
pub fn iso(dir: &Path, name: &str, file: &str, content: &str) -> PathBuf {
    let src = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&src).expect("ISO source dir");
    std::fs::write(src.join(file), content).expect("ISO file");
    let path = dir.join(name);
    let status = std::process::Command::new("genisoimage")
        .args(["-quiet", "-r", "-o"])
        .arg(&path)
        .arg(&src)
        .status()
        .expect("run genisoimage (scripts/install-deps installs it)");
    assert!(status.success(), "genisoimage: {status}");
    path
}

/// Adds a second QMP monitor to `spec`, listening at `path`: for a second client (a proxy, a raw
/// floor) beside the SDK's own.
pub fn second_monitor(spec: &mut VmSpec, path: &Path) {
    spec.extra_args.extend([
        "-chardev".into(),
        format!(
            "socket,id=mon2,path={},server=on,wait=off",
            qhotplug_cmdline::escape(&path.to_string_lossy())
        ),
        "-mon".into(),
        "chardev=mon2,mode=control".into(),
    ]);
}

/// QEMU's state as the rollback tests compare it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `query-pci`.
    pub pci: Vec<PciInfo>,
    /// `query-block`.
    pub block: Vec<BlockInfo>,
    /// `query-named-block-nodes` node names, sorted.
    pub nodes: Vec<String>,
    /// `query-fdsets`.
    pub fdsets: Vec<FdsetInfo>,
    /// `qom-list /machine/peripheral` children, sorted.
    pub peripherals: Vec<String>,
    /// The network backends: QEMU 7.2 has no QMP query for netdevs, so HMP `info network`.
    pub network: String,
    /// The files, devices and sockets QEMU's process has open (targets of `/proc/PID/fd`,
    /// sorted): images, `/dev/net/tun`, `/dev/vhost-net`. Anonymous inodes (eventfds, which
    /// QEMU's own threads make and drop as the VM runs) are left out.
    pub qemu_fds: Vec<String>,
    /// Our own fd table.
    pub our_fds: Vec<(i32, String)>,
    /// `query-hotpluggable-cpus`.
    pub cpus: Vec<HotpluggableCpu>,
    /// `query-memory-devices`.
    pub memory_devices: Vec<MemoryDeviceInfo>,
    /// `qom-list /objects` children, sorted.
    pub objects: Vec<String>,
    /// `query-chardev` labels, sorted.
    pub chardevs: Vec<String>,
}

impl Snapshot {
    /// Reads it all.
    pub async fn take(vm: &Vm) -> Snapshot {
        Self::take_of(vm, vm.pid()).await
    }

    /// Reads it all through `vm`, QEMU's fds from process `pid` (a handle attached through a
    /// proxy knows no pid).
    pub async fn take_of(vm: &Vm, pid: Option<u32>) -> Snapshot {
        let c = vm.client();
        let pci = c.execute(&QueryPci).await.expect("query-pci");
        let mut block = c.execute(&QueryBlock).await.expect("query-block");
        // A device's write cache is the guest's to negotiate (SeaBIOS's virtio-blk driver turns
        // it off while the test runs), not something a hot-plug changes.
        for inserted in block.iter_mut().filter_map(|b| b.inserted.as_mut()) {
            inserted.cache = None;
        }
        let nodes = crate::storage::block_nodes(vm).await;
        let fdsets = c.execute(&QueryFdsets).await.expect("query-fdsets");
        let mut peripherals: Vec<String> = c
            .execute(&QomList {
                path: "/machine/peripheral".into(),
            })
            .await
            .expect("qom-list")
            .into_iter()
            .filter(|p| p.child_type().is_some())
            .map(|p| p.name)
            .collect();
        peripherals.sort();
        let network = c
            .execute(&qhotplug_qmp::command::HumanMonitorCommand {
                command_line: "info network".into(),
                cpu_index: None,
            })
            .await
            .expect("info network");
        let cpus = c
            .execute(&QueryHotpluggableCpus)
            .await
            .expect("query-hotpluggable-cpus");
        let memory_devices = c
            .execute(&QueryMemoryDevices)
            .await
            .expect("query-memory-devices");
        let mut objects: Vec<String> = c
            .execute(&QomList {
                path: "/objects".into(),
            })
            .await
            .expect("qom-list /objects")
            .into_iter()
            .filter(|p| p.child_type().is_some())
            .map(|p| p.name)
            .collect();
        objects.sort();
        let mut chardevs: Vec<String> = c
            .execute(&QueryChardev)
            .await
            .expect("query-chardev")
            .into_iter()
            .map(|c| c.label)
            .collect();
        chardevs.sort();
        let qemu_fds = match pid {
            Some(pid) => fd_targets(&format!("/proc/{pid}/fd")),
            None => Vec::new(),
        };
        Snapshot {
            pci,
            block,
            nodes,
            fdsets,
            peripherals,
            network,
            qemu_fds,
            our_fds: crate::open_fds(),
            cpus,
            memory_devices,
            objects,
            chardevs,
        }
    }
}

fn fd_targets(dir: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .expect("read fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| !t.starts_with("anon_inode:"))
        .collect();
    out.sort();
    out
}

/// QEMU's fd sets as `(tag, file)` pairs, sorted: the file behind each set's fd, read through
/// `/proc/<qemu>/fd` (every image the SDK hands over stays in its set while it is open).
pub async fn fdset_files(vm: &Vm) -> Vec<(String, PathBuf)> {
    let pid = vm.pid().expect("launched by the SDK");
    let sets = vm
        .client()
        .execute(&QueryFdsets)
        .await
        .expect("query-fdsets");
    let mut out: Vec<(String, PathBuf)> = sets
        .into_iter()
        .flat_map(|s| s.fds)
        .map(|fd| {
            let file = std::fs::read_link(format!("/proc/{pid}/fd/{}", fd.fd))
                .expect("QEMU's fd of a set");
            (fd.opaque.unwrap_or_default(), file)
        })
        .collect();
    out.sort();
    out
}
