//! The floor of the benchmarks: a raw, blocking QMP monitor connection that sends exactly the
//! bytes the SDK sends for the same operation (encoded by the same `encode_request`, fds in the
//! same `sendmsg`) and waits for each reply, with nothing in between.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use qhotplug_cmdline::{Disk, Nic, Pci, ScsiAddr};
use qhotplug_netdev::{MacAddr, TapBuilder};
use qhotplug_qmp::command::{AddFd, Getfd, RemoveFd};
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
        let mut bytes = Vec::new();
        encode_request(&mut bytes, name, args, Execution::InBand).unwrap();
        match fd {
            Some(f) => {
                let n = self.write.send_with_fd(&bytes, &[f.as_raw_fd()]).unwrap();
                self.write.write_all(&bytes[n..]).unwrap();
            }
            None => self.write.write_all(&bytes).unwrap(),
        }
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
        let start = Instant::now();
        let out = self.send(name, args, fd);
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
        let (id, path) = (&disk.id, &disk.path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut steps = Vec::new();
        let add = AddFd {
            fdset_id: None,
            opaque: Some(qhotplug_cmdline::names::fdset_tag(id)),
        };
        let info = self.step(&mut steps, "add-fd", &add, Some(&file));
        drop(file);
        let set = info["fdset-id"].as_i64().unwrap();
        for node in disk.blockdev_add(&format!("/dev/fdset/{set}")) {
            self.step(&mut steps, "blockdev-add", &node, None);
        }
        self.step(
            &mut steps,
            "remove-fd",
            &RemoveFd {
                fdset_id: set,
                fd: None,
            },
            None,
        );
        self.step(&mut steps, "device_add", &disk.device_add(), None);
        steps
    }

    /// The SDK's removal of `disk`, by hand: `device_del`, wait for its `DEVICE_DELETED` (which
    /// may come before the reply: a SCSI disk goes at once), then `blockdev-del` of the format and
    /// protocol nodes. Needs no guest for a SCSI disk.
    pub fn remove_disk(&mut self, disk: &Disk) {
        let mut bytes = Vec::new();
        let args = json!({ "id": disk.id });
        encode_request(&mut bytes, "device_del", &args, Execution::InBand).unwrap();
        self.write.write_all(&bytes).unwrap();
        let (mut replied, mut deleted) = (false, false);
        let mut line = String::new();
        while !(replied && deleted) {
            line.clear();
            self.read.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            match v.get("event").and_then(Value::as_str) {
                Some("DEVICE_DELETED") => {
                    deleted |= v["data"]["device"].as_str() == Some(disk.id.as_str())
                }
                Some(_) => {}
                None => {
                    assert!(v.get("return").is_some(), "device_del {}: {v}", disk.id);
                    replied = true;
                }
            }
        }
        for node in [disk.top_node(), disk.file_node()] {
            self.send("blockdev-del", &json!({ "node-name": node }), None);
        }
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
