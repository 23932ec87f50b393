//! The floor of the benchmarks: a raw, blocking QMP monitor connection that sends exactly the
//! bytes the SDK sends for the same operation (encoded by the same `encode_request`, fds in the
//! same `sendmsg`) and waits for each reply, with nothing in between.

use qhotplug_cmdline::DeviceModel;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use qhotplug_cmdline::{Disk, Nic, Pci, ScsiAddr};
use qhotplug_netdev::{MacAddr, TapBuilder};
use qhotplug_qmp::command::{AddFd, FdsetInfo, Getfd, QueryFdsets, RemoveFd};
use qhotplug_qmp::message::{encode_request, Execution};
use sendfd::SendWithFd;
use serde_json::{json, Value};

/// A raw monitor connection: one request, one reply, in the caller's thread.
pub struct RawMonitor {
    write: UnixStream,
    read: BufReader<UnixStream>,
}

impl RawMonitor {
    /// Connects to a monitor at `path` and negotiates (no `oob`).
    pub fn connect(path: &Path) -> RawMonitor {
        let stream = UnixStream::connect(path).expect("connect the floor monitor");
        let mut raw = RawMonitor {
            write: stream.try_clone().unwrap(),
            read: BufReader::new(stream),
        };
        let mut greeting = String::new();
        raw.read.read_line(&mut greeting).unwrap();
        raw.call(&json!({"execute": "qmp_capabilities"}), None);
        raw
    }

    /// One round trip; events before the reply are skipped. Returns the reply's `return`.
    pub fn call(&mut self, request: &Value, fd: Option<&std::fs::File>) -> Value {
        let name = request["execute"].as_str().unwrap();
        let args = request.get("arguments").cloned().unwrap_or(json!({}));
        self.send(name, &args, fd)
    }

    /// The request is encoded exactly as the SDK encodes it (`encode_request`), so both sides
    /// send the same bytes.
    pub fn send<A: serde::Serialize>(
        &mut self,
        name: &str,
        args: &A,
        fd: Option<&std::fs::File>,
    ) -> Value {
        self.send_encoded(name, &encode(name, args), fd)
    }

    /// Sends `bytes` (a request named `name`), with `fd` if given, and waits for its reply; events
    /// before it are skipped. Returns the reply's `return`.
    pub fn send_encoded(&mut self, name: &str, bytes: &[u8], fd: Option<&std::fs::File>) -> Value {
        write_request(&self.write, bytes, fd);
        let mut line = String::new();
        loop {
            line.clear();
            self.read.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_some() {
                continue;
            }
            return v
                .get("return")
                .cloned()
                .unwrap_or_else(|| panic!("{name}: {v}"));
        }
    }

    /// `send`, timed into `steps`.
    pub fn step<A: serde::Serialize>(
        &mut self,
        steps: &mut Vec<(&'static str, Duration)>,
        name: &'static str,
        args: &A,
        fd: Option<&std::fs::File>,
    ) -> Value {
        self.step_encoded(steps, name, &encode(name, args), fd)
    }

    /// `send_encoded`, timed into `steps`.
    pub fn step_encoded(
        &mut self,
        steps: &mut Vec<(&'static str, Duration)>,
        name: &'static str,
        bytes: &[u8],
        fd: Option<&std::fs::File>,
    ) -> Value {
        let start = Instant::now();
        let out = self.send_encoded(name, bytes, fd);
        steps.push((name, start.elapsed()));
        out
    }

    /// Reads until an event named `name` whose `data` satisfies `want` (other events and no
    /// replies expected in between); returns its data.
    pub fn wait_event(&mut self, name: &str, want: impl Fn(&Value) -> bool) -> Value {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.read.read_line(&mut line).unwrap();
            assert!(n > 0, "the monitor closed while waiting for {name}");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("event").and_then(Value::as_str) == Some(name) && want(&v["data"]) {
                return v["data"].clone();
            }
        }
    }

    /// The SDK's disk sequence for `disk`, by hand, with the same command values; the time of each
    /// step.
    pub fn add_disk(&mut self, disk: &Disk) -> Vec<(&'static str, Duration)> {
        let (add, file) = disk_add_fd(disk);
        let mut steps = Vec::new();
        let info = self.step_encoded(&mut steps, "add-fd", &add, Some(&file));
        drop(file);
        for (name, bytes) in disk_after_add_fd(disk, &info) {
            self.step_encoded(&mut steps, name, &bytes, None);
        }
        steps
    }

    /// The SDK's hot-add of network disk `disk` (no secret), by hand: `blockdev-add` of the
    /// protocol node (QEMU connects to the server), of the format node, `device_add`; the time of
    /// each step.
    pub fn add_network_disk(&mut self, disk: &Disk) -> Vec<(&'static str, Duration)> {
        let mut steps = Vec::new();
        for node in disk.blockdev_add("") {
            self.step_encoded(
                &mut steps,
                "blockdev-add",
                &encode("blockdev-add", &node),
                None,
            );
        }
        let device = encode("device_add", &disk.device_add());
        self.step_encoded(&mut steps, "device_add", &device, None);
        steps
    }

    /// The SDK's removal of `disk`, by hand: `device_del`, wait for its `DEVICE_DELETED` (which
    /// may come before the reply: a SCSI disk goes at once), then `blockdev-del` of the format and
    /// protocol nodes, and the removal of its fd sets. Needs no guest for a SCSI disk.
    pub fn remove_disk(&mut self, disk: &Disk) {
        write_request(&self.write, &device_del(disk), None);
        let mut waiting = Removal::new(disk);
        let mut line = String::new();
        while !waiting.done() {
            line.clear();
            self.read.read_line(&mut line).unwrap();
            waiting.saw(&serde_json::from_str(&line).unwrap());
        }
        for (name, bytes) in disk_after_deleted(disk) {
            self.send_encoded(name, &bytes, None);
        }
        let sets = self.send_encoded("query-fdsets", &query_fdsets(), None);
        for remove in remove_disk_fdsets(disk, &sets) {
            self.send_encoded("remove-fd", &remove, None);
        }
    }

    /// Runs `ops` one after another; returns the instant before the first and the instant each
    /// one ended (as [`epoll_floor::run`](crate::epoll_floor::run) does for many monitors).
    pub fn run_batch(&mut self, ops: &[RawOp]) -> Vec<Instant> {
        let mut marks = vec![Instant::now()];
        for op in ops {
            match op {
                RawOp::AddDisk(disk) => {
                    self.add_disk(disk);
                }
                RawOp::RemoveDisk(disk) => self.remove_disk(disk),
            }
            marks.push(Instant::now());
        }
        marks
    }

    /// The connection's socket, for a caller that drives many monitors from one loop, and what
    /// was read from it but not yet consumed.
    pub fn parts(&mut self) -> (&UnixStream, Vec<u8>) {
        let buffered = self.read.buffer().to_vec();
        self.read.consume(buffered.len());
        (&self.write, buffered)
    }

    /// The SDK's NIC sequence on a new one-queue tap, by hand; the time of each step.
    pub fn add_nic(&mut self, id: &str, slot: u8) -> Vec<(&'static str, Duration)> {
        let tap = TapBuilder::new("qhb%d").create().unwrap();
        let fd = std::fs::File::from(tap.into_queues().pop().unwrap());
        let nic = Nic {
            id: id.into(),
            mac: MacAddr::random_qemu(),
            queues: 1,
            pci: Pci::new("pci.0", slot),
            vhost: false,
            link_up: true,
        };
        let mut steps = Vec::new();
        let fdname = qhotplug_cmdline::names::tap_fd(id, 0);
        self.step(
            &mut steps,
            "getfd",
            &Getfd {
                fdname: fdname.clone(),
            },
            Some(&fd),
        );
        drop(fd);
        self.step(
            &mut steps,
            "netdev_add",
            &nic.netdev_add(&[fdname], &[]),
            None,
        );
        self.step(&mut steps, "device_add", &nic.device_add(), None);
        steps
    }
}

/// One operation of a floor's batch, in the SDK's sequence.
pub enum RawOp {
    /// The disk hot-add (`add-fd`, `blockdev-add` ×2, `device_add`).
    AddDisk(Disk),
    /// The disk removal (`device_del`, its `DEVICE_DELETED`, `blockdev-del` ×2, `query-fdsets`,
    /// `remove-fd`).
    RemoveDisk(Disk),
}

/// A `scsi-hd` at target `target` of the test VMs' controller bus `scsi0.0`, as the floor adds it.
pub fn scsi_disk(id: &str, path: &Path, target: u16) -> Disk {
    Disk::scsi_hd(
        id,
        path,
        ScsiAddr {
            bus: "scsi0.0".into(),
            channel: 0,
            scsi_id: target,
            lun: 0,
        },
    )
}

/// `name` and `args` as a request, encoded as the SDK encodes it.
pub fn encode<A: serde::Serialize>(name: &str, args: &A) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_request(&mut bytes, name, args, Execution::InBand).unwrap();
    bytes
}

/// Writes a whole request, passing `fd` with its first bytes if given. (For a non-blocking
/// socket too: a request is far smaller than the socket's buffer, which QEMU keeps reading.)
pub fn write_request(mut socket: &UnixStream, bytes: &[u8], fd: Option<&std::fs::File>) {
    let sent = match fd {
        Some(f) => socket.send_with_fd(bytes, &[f.as_raw_fd()]).unwrap(),
        None => 0,
    };
    socket.write_all(&bytes[sent..]).unwrap();
}

/// The `add-fd` that begins the SDK's disk sequence, encoded, and the image opened read-write to
/// pass with it.
pub fn disk_add_fd(disk: &Disk) -> (Vec<u8>, std::fs::File) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk.path)
        .unwrap();
    let add = AddFd {
        fdset_id: None,
        opaque: Some(qhotplug_cmdline::names::fdset_tag(&disk.id)),
    };
    (encode("add-fd", &add), file)
}

/// The rest of the SDK's disk sequence once `add-fd` answered `info`, encoded: the
/// `blockdev-add`s on the new fd set (which stays while they are open), `device_add`.
pub fn disk_after_add_fd(disk: &Disk, info: &Value) -> Vec<(&'static str, Vec<u8>)> {
    let set = info["fdset-id"]
        .as_i64()
        .expect("add-fd answers an fdset-id");
    disk.blockdev_add(&format!("/dev/fdset/{set}"))
        .iter()
        .map(|node| ("blockdev-add", encode("blockdev-add", node)))
        .chain([("device_add", encode("device_add", &disk.device_add()))])
        .collect()
}

/// `query-fdsets`, encoded: how the SDK finds a removed disk's fd sets.
pub fn query_fdsets() -> Vec<u8> {
    encode("query-fdsets", &QueryFdsets)
}

/// The `remove-fd` of each set `query-fdsets` answered (`sets`) that is tagged for `disk`.
pub fn remove_disk_fdsets(disk: &Disk, sets: &Value) -> Vec<Vec<u8>> {
    let tag = qhotplug_cmdline::names::fdset_tag(&disk.id);
    let sets: Vec<FdsetInfo> = serde_json::from_value(sets.clone()).expect("query-fdsets' reply");
    sets.into_iter()
        .filter(|s| {
            s.fds
                .iter()
                .any(|f| f.opaque.as_deref() == Some(tag.as_str()))
        })
        .map(|s| {
            let remove = RemoveFd {
                fdset_id: s.fdset_id,
                fd: None,
            };
            encode("remove-fd", &remove)
        })
        .collect()
}

/// `disk`'s `device_del`, encoded.
pub fn device_del(disk: &Disk) -> Vec<u8> {
    encode("device_del", &json!({ "id": disk.id }))
}

/// The end of the SDK's removal of `disk` once it is deleted, encoded: `blockdev-del` of the
/// format and the protocol node (then, as the SDK does, [`query_fdsets`] and
/// [`remove_disk_fdsets`]).
pub fn disk_after_deleted(disk: &Disk) -> Vec<(&'static str, Vec<u8>)> {
    [disk.top_node(), disk.file_node()]
        .into_iter()
        .map(|node| {
            (
                "blockdev-del",
                encode("blockdev-del", &json!({ "node-name": node })),
            )
        })
        .collect()
}

/// What a `device_del` waits for: its reply and the device's `DEVICE_DELETED`, in either order.
pub struct Removal {
    id: String,
    replied: bool,
    deleted: bool,
}

impl Removal {
    /// Waiting for both, for `disk`.
    pub fn new(disk: &Disk) -> Removal {
        Removal {
            id: disk.id.clone(),
            replied: false,
            deleted: false,
        }
    }

    /// Takes in one message from the monitor. Panics on an error reply.
    pub fn saw(&mut self, message: &Value) {
        match message.get("event").and_then(Value::as_str) {
            Some("DEVICE_DELETED") => {
                self.deleted |= message["data"]["device"].as_str() == Some(self.id.as_str())
            }
            Some(_) => {}
            None => {
                assert!(
                    message.get("return").is_some(),
                    "device_del {}: {message}",
                    self.id
                );
                self.replied = true;
            }
        }
    }

    /// Both came.
    pub fn done(&self) -> bool {
        self.replied && self.deleted
    }
}
