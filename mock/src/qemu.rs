//! [`MockQemu`]: a modelled QEMU that answers QMP by command name.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use qhotplug_qmp::{Client, Config};

use crate::model::{self, MockBlockNode, MockDevice, MockFdset};
use crate::storage::{MockBitmap, MockExport, MockJob};

/// What the mock's guest does when asked to let a device go (`device_del`). SCSI devices go at
/// once whatever it does, as they do on a real virtio-scsi bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestUnplug {
    /// Lets it go at once: `DEVICE_DELETED`.
    #[default]
    Release,
    /// Lets it go after this long.
    After(Duration),
    /// Refuses: `DEVICE_UNPLUG_GUEST_ERROR`; the device stays.
    Refuse,
    /// Never answers: the device stays and a second `device_del` is refused as already in the
    /// process of unplug (a paused guest, a guest without hotplug support). Such a guest also
    /// acknowledges no vCPU, plugs no virtio-mem and reaches no balloon target.
    Never,
}

/// What the mock's guest does when its ACPI power button is pressed (`system_powerdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestPower {
    /// Powers off: `POWERDOWN`, then `SHUTDOWN` (`guest-shutdown`), and QEMU exits (every
    /// monitor connection closes).
    #[default]
    PowersOff,
    /// Ignores it: `POWERDOWN` only; QEMU runs on.
    Ignores,
}

/// One fd the mock received, and the command it came with.
#[derive(Debug)]
pub struct ReceivedFd {
    /// `getfd` or `add-fd` (or whatever command carried it).
    pub command: String,
    /// The fd: the mock's own copy, open until the command that consumes it lets it go.
    pub fd: Arc<OwnedFd>,
}

/// A mock QEMU. Clone-cheap; every clone is the same QEMU. Each [`connect`](MockQemu::connect) is
/// one more monitor connection to it, served by a task on the current tokio runtime.
#[derive(Clone)]
pub struct MockQemu {
    model: Arc<Mutex<model::Model>>,
}

impl std::fmt::Debug for MockQemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockQemu").finish_non_exhaustive()
    }
}

impl MockQemu {
    /// A paused `pc` machine: the host bridge at slot 0 and the ISA bridge at slot 1 of `pci.0`.
    pub fn pc() -> MockQemu {
        Self::new(model::Model::pc())
    }

    /// A paused `q35` machine with `root_ports` PCIe root ports `rp0`, `rp1`, … on `pcie.0` from
    /// slot 4 (the layout `VmSpec`'s `root_ports` give).
    pub fn q35(root_ports: u8) -> MockQemu {
        Self::new(model::Model::q35(root_ports))
    }

    fn new(model: model::Model) -> MockQemu {
        MockQemu {
            model: Arc::new(Mutex::new(model)),
        }
    }

    fn model(&self) -> MutexGuard<'_, model::Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `-m boot,slots=slots,maxmem=max` (MiB; `None`: no `maxmem`, so no memory hot-plug). A new
    /// mock has 128 MiB and no slots.
    pub fn with_memory(self, boot: u64, slots: u32, max: Option<u64>) -> MockQemu {
        self.model().boot_memory(boot, slots, max);
        self
    }

    /// `-smp boot,maxcpus=max`: `max` vCPU slots (cores of one socket), the first `boot` plugged.
    /// A new mock has one vCPU and one slot.
    pub fn with_vcpus(self, boot: u32, max: u32) -> MockQemu {
        self.model().boot_vcpus(boot, max);
        self
    }

    /// Adds a virtio-scsi controller `id` at `slot` of the root bus, as if given at boot.
    pub fn with_scsi_controller(self, id: &str, slot: u8) -> MockQemu {
        self.model().boot_scsi_controller(id, slot);
        self
    }

    /// The guest gives device `id` up on its own, no `device_del` asked (a guest's own eject, or
    /// a stale eject request that hits a newcomer): it goes, with its `DEVICE_DELETED`; its
    /// backends stay, as QEMU's do.
    pub fn guest_eject(&self, id: &str) {
        self.model().finish_unplug(id);
    }

    /// A client connected to a new monitor of this QEMU, with the default [`Config`].
    pub async fn connect(&self) -> qhotplug_qmp::Result<Client> {
        self.connect_with(&Config::new()).await
    }

    /// A client connected to a new monitor of this QEMU.
    pub async fn connect_with(&self, config: &Config) -> qhotplug_qmp::Result<Client> {
        let (ours, theirs) = UnixStream::pair()?;
        let (writer, lines) = mpsc::unbounded_channel();
        {
            let mut model = self.model();
            let _ = writer.send(model.greeting());
            model.subscribe(writer.clone());
        }
        tokio::spawn(serve(self.model.clone(), ours, writer, lines));
        config.connect_stream(theirs).await
    }

    /// The next `command` fails with a `GenericError` carrying `desc`, and changes nothing.
    pub fn fail_next(&self, command: &str, desc: &str) {
        self.fail_nth(command, 1, desc);
    }

    /// The `nth` `command` from now (1 is the next) fails with a `GenericError` carrying `desc`,
    /// and changes nothing; the ones before it are handled as usual. A hot-add that sends
    /// `blockdev-add` twice (protocol node, then format node) is failed at its second with `2`.
    pub fn fail_nth(&self, command: &str, nth: usize, desc: &str) {
        self.model().fail_nth(command, nth, desc);
    }

    /// While `hold` is true, every job stays `running` (a copy that takes its time); set it
    /// false to let them go on.
    pub fn hold_jobs(&self, hold: bool) {
        let mut model = self.model();
        model.storage.hold = hold;
        if !hold {
            model.storage.held_kinds.clear();
            model.advance_jobs();
        }
    }

    /// Holds only the jobs of `kind` (`backup`, `mirror`, `commit`, `stream`, `create`) as
    /// [`MockQemu::hold_jobs`] holds every job, say a backup whose target image is made (a
    /// `create` job) first; `hold_jobs(false)` lets them go on.
    pub fn hold_jobs_of(&self, kind: &str) {
        self.model().storage.held_kinds.push(kind.to_owned());
    }

    /// Job `id` fails with `error` when it runs (now, if it is running): `aborting`, then
    /// `concluded` with the error, as a job whose target failed.
    pub fn fail_job(&self, id: &str, error: &str) {
        let mut model = self.model();
        model.storage.failing.push((id.into(), error.into()));
        model.advance_jobs();
    }

    /// The jobs, as `query-jobs` lists them.
    pub fn jobs(&self) -> Vec<MockJob> {
        self.model().storage.jobs.clone()
    }

    /// The dirty bitmaps, on every node.
    pub fn bitmaps(&self) -> Vec<MockBitmap> {
        self.model().storage.bitmaps.clone()
    }

    /// The NBD exports.
    pub fn exports(&self) -> Vec<MockExport> {
        self.model().storage.exports.clone()
    }

    /// Whether the NBD server runs.
    pub fn nbd_server(&self) -> bool {
        self.model().storage.nbd_server
    }

    /// What the guest does from now on when asked to let a device go.
    pub fn guest_unplug(&self, behaviour: GuestUnplug) {
        self.model().guest_unplug = behaviour;
    }

    /// What the guest does from now on when its power button is pressed.
    pub fn guest_power(&self, behaviour: GuestPower) {
        self.model().guest_power = behaviour;
    }

    /// The guest opens (`true`) or closes virtio-serial port `id` (its agent starts or stops):
    /// `VSERPORT_CHANGE`, and the port's chardev's `frontend-open` in `query-chardev`.
    pub fn guest_port(&self, id: &str, open: bool) {
        self.model().guest_port(id, open);
    }

    /// Every command received, in order (`qmp_capabilities` left out).
    pub fn commands(&self) -> Vec<String> {
        self.model().log.iter().map(|(c, _)| c.clone()).collect()
    }

    /// Every command received, in order (`qmp_capabilities` left out), with its arguments (`{}`
    /// when it had none).
    pub fn requests(&self) -> Vec<(String, Value)> {
        self.model().log.clone()
    }

    /// Every fd received, in order, with the command it came with.
    pub fn received_fds(&self) -> Vec<ReceivedFd> {
        self.model()
            .received
            .iter()
            .map(|(command, fd)| ReceivedFd {
                command: command.clone(),
                fd: fd.clone(),
            })
            .collect()
    }

    /// The devices (`-device` and `device_add`), in order of creation.
    pub fn devices(&self) -> Vec<MockDevice> {
        self.model().devices.clone()
    }

    /// The named block nodes.
    pub fn block_nodes(&self) -> Vec<MockBlockNode> {
        self.model().nodes.clone()
    }

    /// The netdev ids.
    pub fn netdevs(&self) -> Vec<String> {
        self.model().netdevs.iter().map(|n| n.id.clone()).collect()
    }

    /// The fd sets.
    pub fn fdsets(&self) -> Vec<MockFdset> {
        self.model().fdset_view()
    }

    /// The names given with `getfd` and not yet closed or consumed.
    pub fn fd_names(&self) -> Vec<String> {
        self.model()
            .named_fds
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The chardev ids.
    pub fn chardevs(&self) -> Vec<String> {
        self.model().chardevs.clone()
    }

    /// The ids of the QOM objects under `/objects`.
    pub fn objects(&self) -> Vec<String> {
        self.model()
            .objects
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// Serves one monitor connection until the client hangs up. Replies and events go out through
/// `writer` in the order the model made them (an event a command causes precedes its reply, as
/// in QEMU).
async fn serve(
    model: Arc<Mutex<model::Model>>,
    stream: UnixStream,
    writer: mpsc::UnboundedSender<Value>,
    mut lines: mpsc::UnboundedReceiver<Value>,
) {
    let lock = || model.lock().unwrap_or_else(|p| p.into_inner());
    let write_task = async {
        while let Some(line) = lines.recv().await {
            // QEMU exited: the connection closes after what was sent before.
            if line.is_null() {
                return;
            }
            let mut bytes = serde_json::to_vec(&line).expect("JSON");
            bytes.extend_from_slice(b"\r\n");
            let mut at = 0;
            while at < bytes.len() {
                if stream.writable().await.is_err() {
                    return;
                }
                match stream.try_write(&bytes[at..]) {
                    Ok(n) => at += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }
    };
    let read_task = async {
        let mut buf = Vec::new();
        // Each fd with the stream offset of the request it came with.
        let mut fds: VecDeque<(usize, OwnedFd)> = VecDeque::new();
        // The stream offset of `buf`'s first byte.
        let mut consumed = 0usize;
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let start = consumed;
                let line: Vec<u8> = buf.drain(..=end).collect();
                consumed += line.len();
                let request: Value = match serde_json::from_slice(&line) {
                    Ok(v) => v,
                    Err(e) => {
                        let desc = format!("JSON parse error, {e}");
                        let _ = writer.send(crate::args::error_reply("GenericError", &desc, None));
                        continue;
                    }
                };
                // An fd belongs to the request whose bytes it came with, not to one read before
                // it in the same chunk (other callers' commands go out between fd commands).
                while fds.front().is_some_and(|(at, _)| *at < start) {
                    fds.pop_front();
                }
                let fd = match fds.front() {
                    Some((at, _)) if *at == start => fds.pop_front().map(|(_, fd)| fd),
                    _ => None,
                };
                let handled = lock().handle(&request, fd, &writer);
                if let Some((id, after)) = handled {
                    // A guest that takes its time: the device goes, and the event is sent, later.
                    let model = model.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        model
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .finish_unplug(&id);
                    });
                }
            }
            if stream.readable().await.is_err() {
                return;
            }
            let mut got = Vec::new();
            let read = stream.try_io(tokio::io::Interest::READABLE, || {
                crate::sys::recv(stream.as_fd(), &mut chunk, &mut got)
            });
            match read {
                Ok(0) => return,
                Ok(n) => {
                    // The kernel ends a read after the bytes that carried fds, and a client sends
                    // a request with its fd in one `sendmsg`: the fds belong to the last request
                    // that starts in this read.
                    buf.extend_from_slice(&chunk[..n]);
                    if !got.is_empty() {
                        let body = &buf[..buf.len().saturating_sub(1)];
                        let last = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                        fds.extend(got.into_iter().map(|fd| (consumed + last, fd)));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    tokio::select! {
        () = read_task => {}
        () = write_task => {}
    }
}
