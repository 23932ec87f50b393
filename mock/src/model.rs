//! The mock's QEMU: its objects, and one handler per command. Error texts are QEMU 7.2's.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::args::{error_reply, generic, not_found, required, str_arg, Reply};
use crate::storage::{Graph, Storage};
use crate::{GuestPower, GuestUnplug};

/// A device, as the mock holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockDevice {
    /// Its id.
    pub id: String,
    /// Its driver, for example `virtio-blk-pci`.
    pub driver: String,
    /// Where it sits.
    pub place: MockPlace,
    /// The block node it uses (`drive`).
    pub drive: Option<String>,
    /// The netdev it uses.
    pub netdev: Option<String>,
    /// The chardev it uses (a serial port's, a vhost-user device's).
    pub chardev: Option<String>,
    /// The QOM object it uses (an RNG's source).
    pub object: Option<String>,
    /// A drive with removable media (`scsi-cd`): whether its tray is open.
    pub tray_open: Option<bool>,
    /// A virtio-mem device's sizes.
    pub virtio_mem: Option<MockVirtioMem>,
    /// A `device_del` is waiting for the guest.
    pub unplugging: bool,
    /// The NIC's link (`set_link`); true for every other device.
    pub link_up: bool,
    /// The disk's I/O limits (`block_set_io_throttle`), as given; `Null` for none.
    pub io_limits: Value,
}

impl MockDevice {
    /// A device with nothing attached: no backend, link up, no limits, not unplugging.
    fn new(id: &str, driver: &str, place: MockPlace) -> MockDevice {
        MockDevice {
            id: id.into(),
            driver: driver.into(),
            place,
            drive: None,
            netdev: None,
            chardev: None,
            object: None,
            tray_open: None,
            virtio_mem: None,
            unplugging: false,
            link_up: true,
            io_limits: Value::Null,
        }
    }
}

/// Where a device sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MockPlace {
    /// A PCI slot and function on a bus (`pci.0`, `pcie.0`, or a root port's id).
    Pci {
        /// The bus.
        bus: String,
        /// The slot.
        slot: u8,
        /// The function.
        function: u8,
    },
    /// A target and LUN on a SCSI bus (`<controller>.0`).
    Scsi {
        /// The bus.
        bus: String,
        /// The target (`scsi-id`).
        target: u16,
        /// The LUN.
        lun: u16,
    },
    /// A port on a virtio-serial bus (`<controller>.0`).
    Port {
        /// The bus.
        bus: String,
    },
    /// A vCPU slot (`core-id`; one socket, one thread per core, as `-smp N,maxcpus=M` gives).
    Cpu {
        /// The core.
        core: u32,
    },
    /// A memory slot (`pc-dimm`).
    Dimm {
        /// The slot.
        slot: u32,
    },
}

/// A virtio-mem device's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockVirtioMem {
    /// What the host asked for (`requested-size`).
    pub requested: u64,
    /// What the guest has plugged.
    pub size: u64,
}

/// A named block node.
#[derive(Debug, Clone)]
pub struct MockBlockNode {
    /// Its name.
    pub node_name: String,
    /// Its driver (`file`, `raw`, `qcow2`, …).
    pub driver: String,
    /// The node under it, for a format node.
    pub file: Option<String>,
    /// The file it opened, for a protocol node (`/dev/fdset/N`, or a path).
    pub filename: Option<String>,
    /// Read-only.
    pub read_only: bool,
    /// The node it stands on, for a format node with a backing image (`backing`, a snapshot's
    /// overlay, what a stream or commit leaves).
    pub backing: Option<String>,
    /// The fd it holds (its own dup of the fd set's, as QEMU's).
    fd: Option<Arc<OwnedFd>>,
}

impl MockBlockNode {
    /// The fd it holds, for a protocol node opened from an fd set.
    pub(crate) fn fd(&self) -> Option<Arc<OwnedFd>> {
        self.fd.clone()
    }
}

/// An fd set as `query-fdsets` shows it: each fd's number in the mock and its `opaque`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockFdset {
    /// The set's id.
    pub id: i64,
    /// Its fds.
    pub fds: Vec<(i64, Option<String>)>,
}

pub(crate) struct Netdev {
    pub(crate) id: String,
    /// The tap (and vhost) fds it took over.
    _fds: Vec<Arc<OwnedFd>>,
}

struct Fdset {
    id: i64,
    fds: Vec<(i64, Option<String>, Arc<OwnedFd>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Machine {
    Pc,
    Q35,
}

pub(crate) struct Model {
    machine: Machine,
    /// Root ports: (id, slot on pcie.0, secondary bus number).
    root_ports: Vec<(String, u8, i64)>,
    /// Virtio-scsi controllers' buses.
    scsi_buses: Vec<String>,
    /// The buses of virtio-serial controllers (`<id>.0`).
    serial_buses: Vec<String>,
    pub(crate) devices: Vec<MockDevice>,
    pub(crate) nodes: Vec<MockBlockNode>,
    pub(crate) netdevs: Vec<Netdev>,
    fdsets: Vec<Fdset>,
    pub(crate) named_fds: Vec<(String, Arc<OwnedFd>)>,
    pub(crate) chardevs: Vec<String>,
    pub(crate) objects: Vec<(String, String)>,
    pub(crate) log: Vec<(String, Value)>,
    pub(crate) received: Vec<(String, Arc<OwnedFd>)>,
    /// Commands to fail: the command, how many of it to let pass first, and the error's text.
    failures: Vec<(String, usize, String)>,
    pub(crate) guest_unplug: GuestUnplug,
    pub(crate) guest_power: GuestPower,
    /// The virtio-serial ports (device ids) the guest has open.
    open_ports: Vec<String>,
    /// QEMU exited (`quit`, or a guest that powered off): every connection closes.
    exited: bool,
    subscribers: Vec<mpsc::UnboundedSender<Value>>,
    next_fdset: i64,
    next_fd: i64,
    running: bool,
    /// vCPU slots by core: the QOM path of the vCPU in each, if plugged.
    cpu_slots: Vec<Option<String>>,
    /// `-m boot,slots=N,maxmem=M`, in bytes.
    memory: (u64, u32, Option<u64>),
    /// Memory backends' sizes, by object id.
    object_sizes: Vec<(String, u64)>,
    /// The balloon's target, once the guest reached it.
    balloon_actual: Option<u64>,
    /// Jobs, bitmaps and NBD exports (`storage.rs`).
    pub(crate) storage: Storage,
}

/// Removes the first item `matches` picks, and returns it; `None` when there is none (the
/// mock's "not found" for every delete).
fn remove_one<T>(list: &mut Vec<T>, matches: impl Fn(&T) -> bool) -> Option<T> {
    let at = list.iter().position(matches)?;
    Some(list.remove(at))
}

/// A PCI `addr` as QEMU reads it: `0x9`, `9`, `0x9.1`.
fn parse_addr(addr: &Value) -> Option<(u8, u8)> {
    if let Some(n) = addr.as_u64() {
        return Some((u8::try_from(n).ok()?, 0));
    }
    let text = addr.as_str()?;
    let (slot, function) = text.split_once('.').unwrap_or((text, "0"));
    let number = |s: &str| match s.strip_prefix("0x") {
        Some(hex) => u8::from_str_radix(hex, 16).ok(),
        None => u8::from_str_radix(s, 16).ok(),
    };
    Some((number(slot)?, number(function)?))
}

const PCI_DRIVERS: &[(&str, (i64, i64), i64)] = &[
    ("virtio-blk-pci", (0x1af4, 0x1001), 0x0100),
    ("virtio-net-pci", (0x1af4, 0x1000), 0x0200),
    ("virtio-scsi-pci", (0x1af4, 0x1004), 0x0100),
    ("virtio-balloon-pci", (0x1af4, 0x1002), 0x00ff),
    ("virtio-rng-pci", (0x1af4, 0x1005), 0x00ff),
    ("virtio-serial-pci", (0x1af4, 0x1003), 0x0780),
    ("virtio-mem-pci", (0x1af4, 0x1058), 0x00ff),
    ("vhost-user-blk-pci", (0x1af4, 0x1001), 0x0100),
    ("vhost-user-fs-pci", (0x1af4, 0x105a), 0x0180),
    ("pcie-root-port", (0x1b36, 0x000c), 0x0604),
];
const SCSI_DRIVERS: &[&str] = &["scsi-hd", "scsi-cd", "scsi-generic"];
const MIB: u64 = 1 << 20;
/// The unit a virtio-mem device plugs in (QEMU's default on x86 with 4 KiB pages).
const VIRTIO_MEM_BLOCK: u64 = 2 * MIB;
/// The vCPU model `query-hotpluggable-cpus` names (QEMU's default for `pc`/`q35` under TCG).
const CPU_DRIVER: &str = "qemu64-x86_64-cpu";
const EVENTS: &[&str] = &[
    "DEVICE_DELETED",
    "DEVICE_UNPLUG_GUEST_ERROR",
    "DEVICE_TRAY_MOVED",
    "ACPI_DEVICE_OST",
    "MEMORY_DEVICE_SIZE_CHANGE",
    "STOP",
    "RESUME",
    "SHUTDOWN",
];

/// Each command the mock answers, with the arguments its schema lists.
const COMMANDS: &[(&str, &[&str])] = &[
    ("qmp_capabilities", &["enable"]),
    ("query-qmp-schema", &[]),
    ("query-commands", &[]),
    ("query-status", &[]),
    ("query-version", &[]),
    ("stop", &[]),
    ("cont", &[]),
    ("quit", &[]),
    ("system_powerdown", &[]),
    ("query-jobs", &[]),
    ("system_reset", &[]),
    ("qom-get", &["path", "property"]),
    ("qom-list", &["path"]),
    ("query-pci", &[]),
    ("query-block", &[]),
    ("query-named-block-nodes", &["flat"]),
    ("query-fdsets", &[]),
    ("add-fd", &["fdset-id", "opaque"]),
    ("remove-fd", &["fdset-id", "fd"]),
    ("getfd", &["fdname"]),
    ("closefd", &["fdname"]),
    (
        "blockdev-add",
        &[
            "driver",
            "node-name",
            "filename",
            "file",
            "read-only",
            "cache",
            "backing",
            "server",
            "export",
        ],
    ),
    ("blockdev-del", &["node-name"]),
    (
        "netdev_add",
        &["type", "id", "fd", "fds", "vhost", "vhostfd", "vhostfds"],
    ),
    ("netdev_del", &["id"]),
    ("device_add", &["driver", "id", "bus"]),
    ("device_del", &["id"]),
    ("chardev-add", &["id", "backend"]),
    ("chardev-remove", &["id"]),
    ("query-chardev", &[]),
    ("object-add", &["qom-type", "id"]),
    ("object-del", &["id"]),
    ("human-monitor-command", &["command-line", "cpu-index"]),
    ("set_link", &["name", "up"]),
    ("query-hotpluggable-cpus", &[]),
    ("query-kvm", &[]),
    ("query-memory-devices", &[]),
    ("qom-set", &["path", "property", "value"]),
    ("balloon", &["value"]),
    ("query-balloon", &[]),
    ("blockdev-open-tray", &["id", "force"]),
    ("blockdev-close-tray", &["id"]),
    ("blockdev-remove-medium", &["id"]),
    ("blockdev-insert-medium", &["id", "node-name"]),
    (
        "block_set_io_throttle",
        &[
            "id", "bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr", "group",
        ],
    ),
    ("block_resize", &["device", "node-name", "size"]),
    // Migration: its set-up is modelled, not the stream (a migration fails at `migrate`).
    ("query-migrate-capabilities", &[]),
    ("migrate-set-capabilities", &["capabilities"]),
    (
        "migrate-set-parameters",
        &["max-bandwidth", "downtime-limit", "multifd-channels"],
    ),
    ("migrate-incoming", &["uri"]),
    ("migrate", &["uri"]),
    ("migrate_cancel", &[]),
    ("query-migrate", &[]),
];

impl Model {
    fn empty(machine: Machine) -> Model {
        Model {
            machine,
            root_ports: Vec::new(),
            scsi_buses: Vec::new(),
            serial_buses: Vec::new(),
            devices: Vec::new(),
            nodes: Vec::new(),
            netdevs: Vec::new(),
            fdsets: Vec::new(),
            named_fds: Vec::new(),
            chardevs: Vec::new(),
            objects: Vec::new(),
            log: Vec::new(),
            received: Vec::new(),
            failures: Vec::new(),
            guest_unplug: GuestUnplug::default(),
            guest_power: GuestPower::default(),
            open_ports: Vec::new(),
            exited: false,
            subscribers: Vec::new(),
            next_fdset: 0,
            next_fd: 20,
            running: false,
            cpu_slots: vec![Some("/machine/unattached/device[0]".into())],
            memory: (128 * MIB, 0, None),
            object_sizes: Vec::new(),
            balloon_actual: None,
            storage: Default::default(),
        }
    }

    pub(crate) fn pc() -> Model {
        Self::empty(Machine::Pc)
    }

    pub(crate) fn q35(root_ports: u8) -> Model {
        let mut model = Self::empty(Machine::Q35);
        for i in 0..root_ports {
            let id = format!("rp{i}");
            model.root_ports.push((id.clone(), 4 + i, i64::from(i) + 1));
            let place = MockPlace::Pci {
                bus: "pcie.0".into(),
                slot: 4 + i,
                function: 0,
            };
            model
                .devices
                .push(MockDevice::new(&id, "pcie-root-port", place));
        }
        model
    }

    fn root_bus(&self) -> &'static str {
        match self.machine {
            Machine::Pc => "pci.0",
            Machine::Q35 => "pcie.0",
        }
    }

    /// `-m boot,slots=slots,maxmem=max` (MiB).
    pub(crate) fn boot_memory(&mut self, boot: u64, slots: u32, max: Option<u64>) {
        self.memory = (boot * MIB, slots, max.map(|m| m * MIB));
    }

    /// `-smp boot,maxcpus=max`: `boot` vCPUs plugged at boot, `max` slots.
    pub(crate) fn boot_vcpus(&mut self, boot: u32, max: u32) {
        self.cpu_slots = (0..max.max(boot))
            .map(|core| (core < boot).then(|| format!("/machine/unattached/device[{core}]")))
            .collect();
    }

    pub(crate) fn boot_scsi_controller(&mut self, id: &str, slot: u8) {
        self.scsi_buses.push(format!("{id}.0"));
        let place = MockPlace::Pci {
            bus: self.root_bus().into(),
            slot,
            function: 0,
        };
        self.devices
            .push(MockDevice::new(id, "virtio-scsi-pci", place));
    }

    pub(crate) fn greeting(&self) -> Value {
        crate::greeting(7, 2, "qhotplug mock")
    }

    /// A running guest that answers: it acknowledges a new vCPU, plugs what virtio-mem is asked
    /// for and reaches a balloon target at once. A paused one, or one that never answers an
    /// unplug ([`GuestUnplug::Never`]), does none of it.
    fn guest_answers(&self) -> bool {
        self.running && self.guest_unplug != GuestUnplug::Never
    }

    pub(crate) fn subscribe(&mut self, writer: mpsc::UnboundedSender<Value>) {
        self.subscribers.push(writer);
    }

    pub(crate) fn fail_nth(&mut self, command: &str, nth: usize, desc: &str) {
        self.failures
            .push((command.into(), nth.saturating_sub(1), desc.into()));
    }

    /// See [`MockQemu::guest_port`](crate::MockQemu::guest_port).
    pub(crate) fn guest_port(&mut self, id: &str, open: bool) {
        self.open_ports.retain(|p| p != id);
        if open {
            self.open_ports.push(id.into());
        }
        self.emit("VSERPORT_CHANGE", json!({"id": id, "open": open}));
    }

    /// QEMU exits: `SHUTDOWN` with `reason`, then every connection closes.
    fn exit(&mut self, guest: bool, reason: &str) {
        self.emit("SHUTDOWN", json!({"guest": guest, "reason": reason}));
        self.exited = true;
    }

    /// Runs `work` on the storage half with the block graph, then sends the events it made.
    fn storage<T>(&mut self, work: impl FnOnce(&mut Storage, &mut Graph<'_>) -> T) -> T {
        let mut events = Vec::new();
        let mut graph = Graph {
            nodes: &mut self.nodes,
            devices: &mut self.devices,
            events: &mut events,
        };
        let out = work(&mut self.storage, &mut graph);
        for (name, data) in events {
            self.emit(&name, data);
        }
        out
    }

    /// Moves every job as far as it goes without the user: after each reply, and when a test
    /// lets held jobs go.
    pub(crate) fn advance_jobs(&mut self) {
        self.storage(|storage, g| storage.advance_jobs(g));
    }

    pub(crate) fn emit(&mut self, name: &str, data: Value) {
        let event = crate::event_json(name, data);
        self.subscribers.retain(|w| w.send(event.clone()).is_ok());
    }

    pub(crate) fn fdset_view(&self) -> Vec<MockFdset> {
        self.fdsets
            .iter()
            .map(|s| MockFdset {
                id: s.id,
                fds: s.fds.iter().map(|(n, o, _)| (*n, o.clone())).collect(),
            })
            .collect()
    }

    /// Handles one request: the reply (and any event it causes, first) goes out through
    /// `writer`. Returns what the guest will do later, for the connection task to schedule.
    pub(crate) fn handle(
        &mut self,
        request: &Value,
        fd: Option<OwnedFd>,
        writer: &mpsc::UnboundedSender<Value>,
    ) -> Option<(String, Duration)> {
        let name = str_arg(request, "execute")
            .or_else(|| str_arg(request, "exec-oob"))
            .unwrap_or("")
            .to_owned();
        let id = request.get("id");
        let args = request.get("arguments").cloned().unwrap_or(json!({}));
        if name != "qmp_capabilities" {
            self.log.push((name.clone(), args.clone()));
        }
        let fd = fd.map(Arc::new);
        if let Some(fd) = &fd {
            self.received.push((name.clone(), fd.clone()));
        }
        let mut later = None;
        let result = match self.failures.iter().position(|(c, _, _)| *c == name) {
            Some(at) if self.failures[at].1 > 0 => {
                self.failures[at].1 -= 1;
                self.dispatch(&name, &args, fd, &mut later)
            }
            Some(at) => Err(generic(self.failures.remove(at).2)),
            None => self.dispatch(&name, &args, fd, &mut later),
        };
        let reply = match result {
            Ok(value) => {
                let mut reply = json!({ "return": value });
                if let Some(id) = id {
                    reply["id"] = id.clone();
                }
                reply
            }
            Err((class, desc)) => error_reply(class, &desc, id),
        };
        let _ = writer.send(reply);
        self.advance_jobs();
        if self.exited {
            self.subscribers.retain(|w| w.send(Value::Null).is_ok());
            let _ = writer.send(Value::Null);
        }
        match later {
            Some(Later::Unplug(id, after)) => return Some((id, after)),
            Some(Later::Refuse(id)) => {
                let path = format!("/machine/peripheral/{id}");
                self.emit(
                    "DEVICE_UNPLUG_GUEST_ERROR",
                    json!({"device": id, "path": path}),
                );
            }
            None => {}
        }
        None
    }

    fn dispatch(
        &mut self,
        name: &str,
        args: &Value,
        fd: Option<Arc<OwnedFd>>,
        later: &mut Option<Later>,
    ) -> Reply {
        match name {
            "qmp_capabilities" => Ok(json!({})),
            "query-qmp-schema" => Ok(schema()),
            "query-commands" => Ok(Value::Array(
                COMMANDS
                    .iter()
                    .chain(crate::storage::COMMANDS)
                    .map(|(c, _)| json!({ "name": c }))
                    .collect(),
            )),
            "query-status" => self.query_status(),
            "query-version" => Ok(self.greeting()["QMP"]["version"].clone()),
            "stop" => self.stop(),
            "cont" => self.cont(),
            "quit" => {
                self.exit(false, "host-qmp-quit");
                Ok(json!({}))
            }
            "system_powerdown" => {
                self.emit("POWERDOWN", Value::Null);
                if self.guest_power == GuestPower::PowersOff && self.running {
                    self.exit(true, "guest-shutdown");
                }
                Ok(json!({}))
            }
            "system_reset" => {
                self.emit(
                    "RESET",
                    json!({"guest": false, "reason": "host-qmp-system-reset"}),
                );
                Ok(json!({}))
            }
            "qom-get" => self.qom_get(required(args, "path")?, required(args, "property")?),
            "qom-list" => self.qom_list(required(args, "path")?),
            "query-pci" => Ok(self.query_pci()),
            "query-block" => Ok(self.query_block()),
            "query-named-block-nodes" => Ok(Value::Array(
                self.nodes.iter().map(|n| self.node_info(n)).collect(),
            )),
            "query-fdsets" => self.query_fdsets(),
            "add-fd" => self.add_fd(args, fd),
            "remove-fd" => self.remove_fd(args),
            "getfd" => self.getfd(args, fd),
            "closefd" => self.closefd(args),
            "blockdev-add" => self.blockdev_add(args),
            "blockdev-del" => self.blockdev_del(required(args, "node-name")?),
            "netdev_add" => self.netdev_add(args),
            "netdev_del" => self.netdev_del(args),
            "device_add" => self.device_add(args),
            "device_del" => self.device_del(required(args, "id")?, later),
            "chardev-add" => self.chardev_add(args),
            "chardev-remove" => self.chardev_remove(args),
            "query-chardev" => self.query_chardev(),
            "object-add" => self.object_add(args),
            "object-del" => self.object_del(args),
            "set_link" => self.set_link(args),
            "query-hotpluggable-cpus" => Ok(self.query_hotpluggable_cpus()),
            "query-kvm" => Ok(json!({"enabled": false, "present": true})),
            "query-memory-devices" => Ok(self.query_memory_devices()),
            "qom-set" => self.qom_set(args),
            "balloon" => self.balloon(args),
            "query-balloon" => self.query_balloon(),
            "blockdev-open-tray" => self.move_tray(required(args, "id")?, true),
            "blockdev-close-tray" => self.move_tray(required(args, "id")?, false),
            "blockdev-remove-medium" => self.remove_medium(required(args, "id")?),
            "blockdev-insert-medium" => {
                self.insert_medium(required(args, "id")?, required(args, "node-name")?)
            }
            "block_set_io_throttle" => self.block_set_io_throttle(args),
            "block_resize" => self.block_resize(args),
            "human-monitor-command" => self.human_monitor_command(args),
            "query-migrate-capabilities" => Ok(Value::Array(
                [
                    "events",
                    "postcopy-ram",
                    "multifd",
                    "dirty-bitmaps",
                    "auto-converge",
                ]
                .iter()
                .map(|c| json!({"capability": c, "state": false}))
                .collect(),
            )),
            "migrate-set-capabilities" | "migrate-set-parameters" | "migrate_cancel" => {
                Ok(json!({}))
            }
            "query-migrate" => Ok(json!({})),
            "migrate-incoming" | "migrate" => Err(generic("the mock QEMU has no migration stream")),
            other => self
                .storage(|storage, g| storage.command(g, other, args))
                .unwrap_or_else(|| {
                    Err((
                        "CommandNotFound",
                        format!("The command {other} has not been found"),
                    ))
                }),
        }
    }

    /// `query-status`.
    fn query_status(&self) -> Reply {
        Ok(json!({
            "running": self.running,
            "status": if self.running { "running" } else { "prelaunch" },
        }))
    }

    /// `stop`.
    fn stop(&mut self) -> Reply {
        self.running = false;
        self.emit("STOP", Value::Null);
        Ok(json!({}))
    }

    /// `cont`.
    fn cont(&mut self) -> Reply {
        self.running = true;
        self.emit("RESUME", Value::Null);
        Ok(json!({}))
    }

    /// `query-fdsets`.
    fn query_fdsets(&self) -> Reply {
        Ok(Value::Array(
            self.fdsets
                .iter()
                .map(|s| {
                    let fds: Vec<Value> = s
                        .fds
                        .iter()
                        .map(|(n, o, _)| match o {
                            Some(o) => json!({"fd": n, "opaque": o}),
                            None => json!({ "fd": n }),
                        })
                        .collect();
                    json!({"fdset-id": s.id, "fds": fds})
                })
                .collect(),
        ))
    }

    /// `getfd`.
    fn getfd(&mut self, args: &Value, fd: Option<Arc<OwnedFd>>) -> Reply {
        let name = required(args, "fdname")?;
        let fd = fd.ok_or_else(|| generic("No file descriptor supplied via SCM_RIGHTS"))?;
        self.named_fds.retain(|(n, _)| n != name);
        self.named_fds.push((name.into(), fd));
        Ok(json!({}))
    }

    /// `closefd`.
    fn closefd(&mut self, args: &Value) -> Reply {
        let name = required(args, "fdname")?;
        remove_one(&mut self.named_fds, |(n, _)| n == name)
            .ok_or_else(|| generic(format!("File descriptor named '{name}' not found")))?;
        Ok(json!({}))
    }

    /// `netdev_del`.
    fn netdev_del(&mut self, args: &Value) -> Reply {
        let id = required(args, "id")?;
        remove_one(&mut self.netdevs, |n| n.id == id)
            .ok_or_else(|| not_found(format!("Device '{id}' not found")))?;
        Ok(json!({}))
    }

    /// `chardev-add`.
    fn chardev_add(&mut self, args: &Value) -> Reply {
        let id = required(args, "id")?;
        if self.chardevs.iter().any(|c| c == id) {
            return Err(generic(format!("Chardev '{id}' already exists")));
        }
        self.chardevs.push(id.into());
        Ok(json!({}))
    }

    /// `chardev-remove`.
    fn chardev_remove(&mut self, args: &Value) -> Reply {
        let id = required(args, "id")?;
        if self
            .devices
            .iter()
            .any(|d| d.chardev.as_deref() == Some(id))
        {
            return Err(generic(format!("Chardev '{id}' is busy")));
        }
        remove_one(&mut self.chardevs, |c| c == id)
            .ok_or_else(|| generic(format!("Chardev '{id}' not found")))?;
        Ok(json!({}))
    }

    /// `query-chardev`.
    fn query_chardev(&self) -> Reply {
        Ok(Value::Array(
            self.chardevs
                .iter()
                .map(|c| {
                    let open = self.devices.iter().any(|d| {
                        d.chardev.as_deref() == Some(c.as_str()) && self.open_ports.contains(&d.id)
                    });
                    json!({"label": c, "filename": "mock", "frontend-open": open})
                })
                .collect(),
        ))
    }

    /// `object-add`.
    fn object_add(&mut self, args: &Value) -> Reply {
        let id = required(args, "id")?;
        let kind = required(args, "qom-type")?;
        if self.objects.iter().any(|(o, _)| o == id) {
            return Err(generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        self.objects.push((id.into(), kind.into()));
        if let Some(size) = args.get("size").and_then(Value::as_u64) {
            self.object_sizes.push((id.into(), size));
        }
        Ok(json!({}))
    }

    /// `object-del`.
    fn object_del(&mut self, args: &Value) -> Reply {
        let id = required(args, "id")?;
        if self.devices.iter().any(|d| d.object.as_deref() == Some(id)) {
            return Err(generic(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        remove_one(&mut self.objects, |(o, _)| o == id)
            .ok_or_else(|| generic(format!("object '{id}' not found")))?;
        self.object_sizes.retain(|(o, _)| o != id);
        Ok(json!({}))
    }

    /// `query-hotpluggable-cpus`: every slot, the highest first, as QEMU lists them.
    fn query_hotpluggable_cpus(&self) -> Value {
        let slots = self.cpu_slots.iter().enumerate().rev().map(|(core, path)| {
            let mut slot = json!({"props": {"core-id": core, "thread-id": 0, "socket-id": 0},
                                  "vcpus-count": 1, "type": CPU_DRIVER});
            if let Some(path) = path {
                slot["qom-path"] = json!(path);
            }
            slot
        });
        Value::Array(slots.collect())
    }

    /// A memory backend's size.
    fn object_size(&self, id: &str) -> u64 {
        self.object_sizes
            .iter()
            .find(|(o, _)| o == id)
            .map_or(0, |(_, size)| *size)
    }

    /// `query-memory-devices`: DIMMs and virtio-mem devices, in order of creation.
    fn query_memory_devices(&self) -> Value {
        let list = self.devices.iter().filter_map(|d| {
            let memdev = d.object.as_deref()?;
            let backend = self.object_size(memdev);
            let path = format!("/objects/{memdev}");
            match (&d.place, d.virtio_mem) {
                (MockPlace::Dimm { slot }, _) => Some(json!({"type": "dimm", "data": {
                    "id": d.id, "memdev": path, "size": backend, "slot": slot, "addr": 0,
                    "node": 0, "hotplugged": true, "hotpluggable": true}})),
                (_, Some(v)) => Some(json!({"type": "virtio-mem", "data": {
                    "id": d.id, "memdev": path, "size": v.size, "requested-size": v.requested,
                    "max-size": backend, "block-size": VIRTIO_MEM_BLOCK, "node": 0,
                    "memaddr": 0}})),
                _ => None,
            }
        });
        Value::Array(list.collect())
    }

    /// `qom-set`: a virtio-mem device's `requested-size`. A running guest that answers plugs it
    /// at once (`MEMORY_DEVICE_SIZE_CHANGE`); one that does not leaves the size as it was.
    fn qom_set(&mut self, args: &Value) -> Reply {
        let path = required(args, "path")?;
        let property = required(args, "property")?;
        let id = path.strip_prefix("/machine/peripheral/").unwrap_or(path);
        let answers = self.guest_answers();
        let max = self
            .devices
            .iter()
            .find(|d| d.id == id)
            .and_then(|d| d.object.as_deref())
            .map(|m| self.object_size(m));
        let device = self.device_mut(path, |d| d.id == id)?;
        let (Some(v), "requested-size") = (device.virtio_mem.as_mut(), property) else {
            return Err(generic(format!("Property '{property}' not found")));
        };
        let value = args.get("value").and_then(Value::as_u64).unwrap_or(0);
        if value > max.unwrap_or(0) || !value.is_multiple_of(VIRTIO_MEM_BLOCK) {
            return Err(generic(format!(
                "'requested-size' property has to be a multiple of '{VIRTIO_MEM_BLOCK}' and at most 'max-size'"
            )));
        }
        v.requested = value;
        if answers {
            v.size = value;
            self.emit(
                "MEMORY_DEVICE_SIZE_CHANGE",
                json!({"id": id, "size": value, "qom-path": path}),
            );
        }
        Ok(json!({}))
    }

    /// `balloon`: the target; a running guest that answers reaches it at once.
    fn balloon(&mut self, args: &Value) -> Reply {
        self.balloon_device()?;
        let value = args.get("value").and_then(Value::as_u64).unwrap_or(0);
        if self.guest_answers() {
            self.balloon_actual = Some(value);
        }
        Ok(json!({}))
    }

    /// `query-balloon`: the target the guest reached, or all the memory it has.
    fn query_balloon(&self) -> Reply {
        self.balloon_device()?;
        let plugged: u64 = self
            .devices
            .iter()
            .map(|d| match (&d.place, d.virtio_mem) {
                (MockPlace::Dimm { .. }, _) => {
                    d.object.as_deref().map_or(0, |m| self.object_size(m))
                }
                (_, Some(v)) => v.size,
                _ => 0,
            })
            .sum();
        Ok(json!({"actual": self.balloon_actual.unwrap_or(self.memory.0 + plugged)}))
    }

    fn balloon_device(&self) -> Result<(), (&'static str, String)> {
        match self
            .devices
            .iter()
            .any(|d| d.driver == "virtio-balloon-pci")
        {
            true => Ok(()),
            false => Err((
                "DeviceNotActive",
                "No balloon device has been activated".into(),
            )),
        }
    }

    /// Where a vCPU goes: socket 0, thread 0, a core in range and free.
    fn cpu_place(&self, args: &Value) -> Result<MockPlace, (&'static str, String)> {
        let max = self.cpu_slots.len();
        for (prop, range) in [("socket-id", 1), ("thread-id", 1), ("core-id", max)] {
            let n = args.get(prop).and_then(Value::as_u64).unwrap_or(0);
            if n >= range as u64 {
                return Err(generic(format!(
                    "Invalid CPU {prop}: {n} must be in range 0:{}",
                    range - 1
                )));
            }
        }
        let core = args.get("core-id").and_then(Value::as_u64).unwrap_or(0) as u32;
        if self.cpu_slots[core as usize].is_some() {
            return Err(generic(format!("CPU[{core}] with APIC ID {core} exists")));
        }
        Ok(MockPlace::Cpu { core })
    }

    /// `blockdev-open-tray` (`open`) or `blockdev-close-tray`: the guest never locks the mock's
    /// trays, so both act at once, with `DEVICE_TRAY_MOVED` when the tray moved.
    fn move_tray(&mut self, id: &str, open: bool) -> Reply {
        let device = self.removable(id)?;
        if device.tray_open == Some(open) {
            return Ok(json!({}));
        }
        device.tray_open = Some(open);
        self.emit(
            "DEVICE_TRAY_MOVED",
            json!({"device": "", "id": id, "tray-open": open}),
        );
        Ok(json!({}))
    }

    /// `blockdev-remove-medium`: the tray must be open; an empty drive stays empty.
    fn remove_medium(&mut self, id: &str) -> Reply {
        let device = self.removable(id)?;
        if device.tray_open != Some(true) {
            return Err(generic(format!("Tray of device '{id}' is not open")));
        }
        device.drive = None;
        Ok(json!({}))
    }

    /// `blockdev-insert-medium`: the tray open, the drive empty, the node there and unused.
    fn insert_medium(&mut self, id: &str, node: &str) -> Reply {
        self.free_node(node, format!("Node '{node}' is already in use"))?;
        let device = self.removable(id)?;
        if device.tray_open != Some(true) {
            return Err(generic(format!("Tray of device '{id}' is not open")));
        }
        if device.drive.is_some() {
            return Err(generic(format!(
                "There already is a medium in device '{id}'"
            )));
        }
        device.drive = Some(node.into());
        Ok(json!({}))
    }

    /// Device `id`, if it has removable media.
    fn removable(&mut self, id: &str) -> Result<&mut MockDevice, (&'static str, String)> {
        let device = self.device_mut(id, |d| d.id == id)?;
        if device.tray_open.is_none() {
            return Err(generic(format!("Device '{id}' is not removable")));
        }
        Ok(device)
    }

    /// `set_link`.
    fn set_link(&mut self, args: &Value) -> Reply {
        let name = required(args, "name")?;
        let up = args.get("up").and_then(Value::as_bool).unwrap_or(true);
        let device =
            self.device_mut(name, |d| d.id == name || d.netdev.as_deref() == Some(name))?;
        device.link_up = up;
        Ok(json!({}))
    }

    /// `block_set_io_throttle`.
    fn block_set_io_throttle(&mut self, args: &Value) -> Reply {
        // A device id, or the QOM path of the device owning the backend.
        let given = required(args, "id")?;
        let id = given
            .strip_prefix("/machine/peripheral/")
            .map(|p| p.trim_end_matches("/virtio-backend"))
            .unwrap_or(given);
        let device = self.device_mut(id, |d| d.id == id && d.drive.is_some())?;
        let mut limits = args.clone();
        if let Some(map) = limits.as_object_mut() {
            map.remove("id");
        }
        device.io_limits = limits;
        Ok(json!({}))
    }

    /// `block_resize`.
    fn block_resize(&self, args: &Value) -> Reply {
        let name = required(args, "node-name")?;
        let size = args
            .get("size")
            .and_then(Value::as_u64)
            .ok_or_else(|| generic("Parameter 'size' is missing"))?;
        let node = self
            .protocol_node(name)
            .ok_or_else(|| generic(format!("Cannot find device='' nor node-name='{name}'")))?;
        let fd = node
            .fd
            .as_deref()
            .ok_or_else(|| generic("the mock resizes only images it was given as fds"))?;
        let file = std::fs::File::from(fd.try_clone().map_err(|e| generic(e.to_string()))?);
        file.set_len(size)
            .map_err(|e| generic(format!("Could not resize: {e}")))?;
        Ok(json!({}))
    }

    /// `human-monitor-command`.
    fn human_monitor_command(&self, args: &Value) -> Reply {
        let line = required(args, "command-line")?;
        match line.trim() {
            "info network" => Ok(Value::String(
                self.netdevs
                    .iter()
                    .map(|n| format!("{}: index=0,type=tap\r\n", n.id))
                    .collect(),
            )),
            "info version" => Ok(json!("7.2.0 (qhotplug mock)\r\n")),
            other => Ok(Value::String(format!("unknown command: '{other}'\r\n"))),
        }
    }

    fn device(&self, id: &str) -> Option<&MockDevice> {
        self.devices.iter().find(|d| d.id == id)
    }

    fn qom_get(&self, path: &str, property: &str) -> Reply {
        if path == "/machine" && property == "type" {
            return Ok(json!(match self.machine {
                Machine::Pc => "pc-i440fx-7.2-machine",
                Machine::Q35 => "pc-q35-7.2-machine",
            }));
        }
        let device = path
            .strip_prefix("/machine/peripheral/")
            .and_then(|id| self.device(id))
            .ok_or_else(|| not_found(format!("Device '{path}' not found")))?;
        match (&device.place, property) {
            (MockPlace::Pci { bus, .. }, "parent_bus") => Ok(json!(match bus.as_str() {
                "pci.0" => "/machine/i440fx/pci.0".to_owned(),
                "pcie.0" => "/machine/q35/pcie.0".to_owned(),
                port => format!("/machine/peripheral/{port}/{port}"),
            })),
            (MockPlace::Pci { slot, function, .. }, "addr") => {
                Ok(json!(u32::from(*slot) * 8 + u32::from(*function)))
            }
            (MockPlace::Scsi { bus, .. }, "parent_bus") => {
                let controller = bus.trim_end_matches(".0");
                Ok(json!(format!("/machine/peripheral/{controller}/{bus}")))
            }
            _ => Err(generic(format!(
                "Property '{}.{property}' not found",
                device.driver
            ))),
        }
    }

    fn qom_list(&self, path: &str) -> Reply {
        let mut out = vec![json!({"name": "type", "type": "string"})];
        match path {
            "/machine/peripheral" => out.extend(
                self.devices
                    .iter()
                    .map(|d| json!({"name": d.id, "type": format!("child<{}>", d.driver)})),
            ),
            "/machine/peripheral-anon" => {}
            "/objects" => out.extend(
                self.objects
                    .iter()
                    .map(|(id, kind)| json!({"name": id, "type": format!("child<{kind}>")})),
            ),
            other => return Err(not_found(format!("Device '{other}' not found"))),
        }
        Ok(Value::Array(out))
    }

    fn pci_devices_on(&self, bus: &str, number: i64) -> Vec<Value> {
        let mut list: Vec<(u8, u8, Value)> = Vec::new();
        if bus == self.root_bus() {
            let builtin: &[(u8, (i64, i64), i64)] = match self.machine {
                Machine::Pc => &[(0, (0x8086, 0x1237), 0x0600), (1, (0x8086, 0x7000), 0x0601)],
                Machine::Q35 => &[
                    (0, (0x8086, 0x29c0), 0x0600),
                    (0x1f, (0x8086, 0x2918), 0x0601),
                ],
            };
            for (slot, (vendor, device), class) in builtin {
                list.push((
                    *slot,
                    0,
                    json!({"bus": number, "slot": slot, "function": 0,
                           "class_info": {"class": class}, "id": {"vendor": vendor, "device": device},
                           "qdev_id": "", "regions": []}),
                ));
            }
        }
        for d in &self.devices {
            let MockPlace::Pci {
                bus: b,
                slot,
                function,
            } = &d.place
            else {
                continue;
            };
            if b != bus {
                continue;
            }
            let (_, (vendor, device), class) = PCI_DRIVERS
                .iter()
                .find(|(driver, _, _)| *driver == d.driver)
                .copied()
                .unwrap_or(("", (0x1af4, 0), 0xff));
            let mut info = json!({"bus": number, "slot": slot, "function": function,
                                  "class_info": {"class": class},
                                  "id": {"vendor": vendor, "device": device},
                                  "qdev_id": d.id, "regions": []});
            if let Some((port, _, secondary)) = self.root_ports.iter().find(|(p, _, _)| *p == d.id)
            {
                info["pci_bridge"] = json!({
                    "bus": {"number": number, "secondary": secondary, "subordinate": secondary},
                    "devices": self.pci_devices_on(port, *secondary),
                });
            }
            list.push((*slot, *function, info));
        }
        list.sort_by_key(|(s, f, _)| (*s, *f));
        list.into_iter().map(|(_, _, v)| v).collect()
    }

    fn query_pci(&self) -> Value {
        json!([{"bus": 0, "devices": self.pci_devices_on(self.root_bus(), 0)}])
    }

    fn query_block(&self) -> Value {
        Value::Array(
            self.devices
                .iter()
                .filter_map(|d| {
                    let node = self
                        .nodes
                        .iter()
                        .find(|n| Some(&n.node_name) == d.drive.as_ref());
                    let qdev = match d.place {
                        MockPlace::Pci { .. } => {
                            format!("/machine/peripheral/{}/virtio-backend", d.id)
                        }
                        _ => d.id.clone(),
                    };
                    let mut info = json!({"device": "", "qdev": qdev, "locked": false,
                                          "removable": d.tray_open.is_some(), "type": "unknown"});
                    match (node, d.tray_open) {
                        (Some(node), _) => {
                            let mut inserted = self.node_info(node);
                            // The throttle limits set on the device, as `query-block` shows them.
                            if let (Some(to), Some(limits)) =
                                (inserted.as_object_mut(), d.io_limits.as_object())
                            {
                                to.extend(limits.clone());
                            }
                            inserted["dirty-bitmaps"] = self.storage.bitmaps_json(&node.node_name);
                            info["inserted"] = inserted;
                        }
                        (None, Some(_)) => {}
                        (None, None) => return None,
                    }
                    if let Some(open) = d.tray_open {
                        info["tray_open"] = json!(open);
                    }
                    Some(info)
                })
                .collect(),
        )
    }

    fn add_fd(&mut self, args: &Value, fd: Option<Arc<OwnedFd>>) -> Reply {
        let fd = fd.ok_or_else(|| generic("No file descriptor supplied via SCM_RIGHTS"))?;
        let opaque = str_arg(args, "opaque").map(str::to_owned);
        let number = self.next_fd;
        self.next_fd += 1;
        let set_id = match args.get("fdset-id").and_then(Value::as_i64) {
            Some(id) => id,
            None => {
                let id = self.next_fdset;
                self.next_fdset += 1;
                id
            }
        };
        match self.fdsets.iter_mut().find(|s| s.id == set_id) {
            Some(set) => set.fds.push((number, opaque, fd)),
            None => self.fdsets.push(Fdset {
                id: set_id,
                fds: vec![(number, opaque, fd)],
            }),
        }
        Ok(json!({"fdset-id": set_id, "fd": number}))
    }

    fn remove_fd(&mut self, args: &Value) -> Reply {
        let set_id = args
            .get("fdset-id")
            .and_then(Value::as_i64)
            .ok_or_else(|| generic("Parameter 'fdset-id' is missing"))?;
        let missing = || {
            generic(format!(
                "File descriptor named 'fdset-id:{set_id}' not found"
            ))
        };
        let at = self
            .fdsets
            .iter()
            .position(|s| s.id == set_id)
            .ok_or_else(missing)?;
        match args.get("fd").and_then(Value::as_i64) {
            Some(fd) => {
                let set = &mut self.fdsets[at];
                let before = set.fds.len();
                set.fds.retain(|(n, _, _)| *n != fd);
                if set.fds.len() == before {
                    return Err(missing());
                }
                if set.fds.is_empty() {
                    self.fdsets.remove(at);
                }
            }
            // Nodes opened from it hold their own dup, as QEMU's do.
            None => {
                self.fdsets.remove(at);
            }
        }
        Ok(json!({}))
    }

    fn blockdev_add(&mut self, args: &Value) -> Reply {
        let driver = required(args, "driver")?;
        let name = required(args, "node-name")?;
        if self.nodes.iter().any(|n| n.node_name == name) {
            return Err(generic(format!("Duplicate nodes with node-name='{name}'")));
        }
        let read_only = args
            .get("read-only")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut node = MockBlockNode {
            node_name: name.into(),
            driver: driver.into(),
            file: None,
            filename: None,
            read_only,
            backing: None,
            fd: None,
        };
        match driver {
            "file" | "host_device" => {
                let filename = required(args, "filename")?;
                if let Some(set) = filename.strip_prefix("/dev/fdset/") {
                    let set = set.parse::<i64>().ok();
                    let fd = self
                        .fdsets
                        .iter()
                        .find(|s| Some(s.id) == set)
                        .and_then(|s| s.fds.first())
                        .map(|(_, _, fd)| fd.clone())
                        .ok_or_else(|| {
                            generic(format!(
                                "Could not open '{filename}': No such file or directory"
                            ))
                        })?;
                    node.fd = Some(fd);
                }
                node.filename = Some(filename.into());
            }
            "raw" | "qcow2" => {
                let file = required(args, "file")?;
                let child = self
                    .nodes
                    .iter()
                    .find(|n| n.node_name == file)
                    .ok_or_else(|| {
                        generic(format!("Cannot find device='' nor node-name='{file}'"))
                    })?;
                if self.nodes.iter().any(|n| n.file.as_deref() == Some(file))
                    || self
                        .devices
                        .iter()
                        .any(|d| d.drive.as_deref() == Some(file))
                {
                    return Err(generic(format!(
                        "Conflicts with use by another node as 'file', which does not allow 'write' on {file}"
                    )));
                }
                if driver == "qcow2" && !child.fd.as_deref().is_some_and(is_qcow2) {
                    return Err(generic("Image is not in qcow2 format"));
                }
                if let Some(backing) = str_arg(args, "backing") {
                    if !self.nodes.iter().any(|n| n.node_name == backing) {
                        return Err(generic(format!(
                            "Cannot find device='' nor node-name='{backing}'"
                        )));
                    }
                    node.backing = Some(backing.into());
                }
                node.file = Some(file.into());
            }
            // A storage migration's client of the other QEMU's export: nothing is connected.
            "nbd" => node.filename = Some(format!("nbd:{}", str_arg(args, "export").unwrap_or(""))),
            other => return Err(generic(format!("Invalid parameter '{other}'"))),
        }
        self.nodes.push(node);
        Ok(json!({}))
    }

    fn blockdev_del(&mut self, name: &str) -> Reply {
        let at = self
            .nodes
            .iter()
            .position(|n| n.node_name == name)
            .ok_or_else(|| generic(format!("Failed to find node with node-name='{name}'")))?;
        if self.nodes.iter().any(|n| n.file.as_deref() == Some(name))
            || self
                .devices
                .iter()
                .any(|d| d.drive.as_deref() == Some(name))
            || self.storage(|storage, g| storage.holds(g, name))
        {
            return Err(generic(format!("Node '{name}' is busy: node is in use")));
        }
        self.nodes.remove(at);
        Ok(json!({}))
    }

    fn netdev_add(&mut self, args: &Value) -> Reply {
        let id = required(args, "id")?;
        if required(args, "type")? != "tap" {
            return Err(generic("the mock models tap netdevs only"));
        }
        if self.netdevs.iter().any(|n| n.id == id) {
            return Err(generic(format!("Duplicate ID '{id}' for netdev")));
        }
        let mut names: Vec<&str> = Vec::new();
        for key in ["fd", "vhostfd"] {
            names.extend(str_arg(args, key));
        }
        for key in ["fds", "vhostfds"] {
            if let Some(list) = str_arg(args, key) {
                names.extend(list.split(':'));
            }
        }
        if names.is_empty() {
            return Err(generic("the mock needs the tap's fd (fd or fds)"));
        }
        if let Some(missing) = names
            .iter()
            .find(|n| !self.named_fds.iter().any(|(m, _)| m == *n))
        {
            return Err(generic(format!(
                "File descriptor named '{missing}' has not been found"
            )));
        }
        let mut fds = Vec::new();
        for name in &names {
            let at = self
                .named_fds
                .iter()
                .position(|(m, _)| m == name)
                .expect("checked");
            fds.push(self.named_fds.remove(at).1);
        }
        self.netdevs.push(Netdev {
            id: id.into(),
            _fds: fds,
        });
        Ok(json!({}))
    }

    fn device_add(&mut self, args: &Value) -> Reply {
        let driver = required(args, "driver")?;
        let id = required(args, "id")?;
        if self.device(id).is_some() {
            return Err(generic(format!("Duplicate device ID '{id}'")));
        }
        let drive = str_arg(args, "drive").map(str::to_owned);
        let netdev = str_arg(args, "netdev").map(str::to_owned);
        let chardev = str_arg(args, "chardev").map(str::to_owned);
        let object = str_arg(args, "rng")
            .or_else(|| str_arg(args, "memdev"))
            .map(str::to_owned);
        if let Some(drive) = &drive {
            self.check_drive(drive)?;
        }
        if let Some(n) = &netdev {
            let exists = self.netdevs.iter().any(|x| x.id == *n);
            self.check_free(driver, "netdev", n, exists, |d| d.netdev.as_deref())?;
        }
        if let Some(c) = &chardev {
            let exists = self.chardevs.contains(c);
            self.check_free(driver, "chardev", c, exists, |d| d.chardev.as_deref())?;
        }
        if let Some(o) = &object {
            let prop = if driver == "virtio-rng-pci" {
                "rng"
            } else {
                "memdev"
            };
            let exists = self.objects.iter().any(|(x, _)| x == o);
            self.check_free(driver, prop, o, exists, |d| d.object.as_deref())?;
        }
        let place = if SCSI_DRIVERS.contains(&driver) {
            self.scsi_place(args)?
        } else if driver == "pc-dimm" {
            let taken: Vec<u32> = self
                .devices
                .iter()
                .filter_map(|d| match d.place {
                    MockPlace::Dimm { slot } => Some(slot),
                    _ => None,
                })
                .collect();
            let slot = (0..self.memory.1)
                .find(|s| !taken.contains(s))
                .ok_or_else(|| generic("no free slots"))?;
            MockPlace::Dimm { slot }
        } else if driver == CPU_DRIVER {
            self.cpu_place(args)?
        } else if driver == "virtserialport" {
            let bus = required(args, "bus")?;
            if !self.serial_buses.iter().any(|b| b == bus) {
                return Err(generic(format!("Bus '{bus}' not found")));
            }
            MockPlace::Port { bus: bus.into() }
        } else if PCI_DRIVERS.iter().any(|(d, _, _)| *d == driver) {
            self.pci_place(driver, args)?
        } else {
            return Err(generic(format!(
                "'{driver}' is not a valid device model name"
            )));
        };
        if let MockPlace::Cpu { core } = place {
            self.cpu_slots[core as usize] = Some(format!("/machine/peripheral/{id}"));
            // A guest that answers acknowledges the new vCPU (ACPI `_OST`, insertion, done).
            if self.guest_answers() {
                self.emit(
                    "ACPI_DEVICE_OST",
                    json!({"info": {"device": id, "slot": core.to_string(), "slot-type": "CPU",
                                    "source": 1, "status": 0}}),
                );
            }
        }
        match driver {
            "virtio-scsi-pci" => self.scsi_buses.push(format!("{id}.0")),
            "virtio-serial-pci" => self.serial_buses.push(format!("{id}.0")),
            _ => {}
        }
        self.devices.push(MockDevice {
            drive,
            netdev,
            chardev,
            object,
            tray_open: (driver == "scsi-cd").then_some(false),
            virtio_mem: (driver == "virtio-mem-pci").then(|| MockVirtioMem {
                requested: args
                    .get("requested-size")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                size: 0,
            }),
            ..MockDevice::new(id, driver, place)
        });
        Ok(json!({}))
    }

    /// Node `node` exists and neither a device nor another node uses it (else `in_use`).
    fn free_node(&self, node: &str, in_use: String) -> Result<(), (&'static str, String)> {
        if !self.nodes.iter().any(|n| n.node_name == node) {
            return Err(generic(format!(
                "Cannot find device='{node}' nor node-name='{node}'"
            )));
        }
        let used = self
            .devices
            .iter()
            .any(|d| d.drive.as_deref() == Some(node))
            || self.nodes.iter().any(|n| n.file.as_deref() == Some(node));
        match used {
            true => Err(generic(in_use)),
            false => Ok(()),
        }
    }

    /// A frontend's `drive`: a node that exists, that no device or node uses, and whose image no
    /// other device writes (or, if this one writes, uses).
    fn check_drive(&self, drive: &str) -> Result<(), (&'static str, String)> {
        self.free_node(drive, format!("Drive '{drive}' is already in use"))?;
        // Image locking, as QEMU takes it when a device attaches: no two users of one file
        // when either of them writes.
        if let Some((file, writes)) = self.image_of(drive) {
            let clash = self
                .devices
                .iter()
                .filter_map(|d| d.drive.as_deref())
                .any(|other| {
                    self.image_of(other)
                        .is_some_and(|(f, w)| f == file && (w || writes))
                });
            if clash {
                let filename = self.protocol_node(drive).and_then(|n| n.filename.clone());
                return Err(generic(format!(
                    "Failed to get shared \"write\" lock\nIs another process using the image [{}]?",
                    filename.unwrap_or_default()
                )));
            }
        }
        Ok(())
    }

    /// A frontend's backend property (`netdev`, `chardev`, `rng`, `memdev`) naming `value`: one
    /// that `exists` and that no device uses (`used` reads a device's).
    fn check_free(
        &self,
        driver: &str,
        prop: &str,
        value: &str,
        exists: bool,
        used: impl Fn(&MockDevice) -> Option<&str>,
    ) -> Result<(), (&'static str, String)> {
        if !exists {
            return Err(generic(format!(
                "Property '{driver}.{prop}' can't find value '{value}'"
            )));
        }
        if self.devices.iter().any(|d| used(d) == Some(value)) {
            return Err(generic(match prop {
                "memdev" => format!("can't use already busy memdev: {value}"),
                _ => format!("Property '{driver}.{prop}' can't take value '{value}', it's in use"),
            }));
        }
        Ok(())
    }

    /// Where a SCSI device goes: its bus exists, its target and LUN are free.
    fn scsi_place(&self, args: &Value) -> Result<MockPlace, (&'static str, String)> {
        let bus = required(args, "bus")?;
        if !self.scsi_buses.iter().any(|b| b == bus) {
            return Err(generic(format!("Bus '{bus}' not found")));
        }
        let target = args.get("scsi-id").and_then(Value::as_u64).unwrap_or(0) as u16;
        let lun = args.get("lun").and_then(Value::as_u64).unwrap_or(0) as u16;
        let taken = self.devices.iter().any(|d| {
            d.place
                == MockPlace::Scsi {
                    bus: bus.into(),
                    target,
                    lun,
                }
        });
        if taken {
            return Err(generic(format!(
            "lun already used by '{}'",
            self.devices
                .iter()
                .find(|d| matches!(&d.place, MockPlace::Scsi { bus: b, target: t, lun: l } if b == bus && *t == target && *l == lun))
                .map(|d| d.id.as_str())
                .unwrap_or("")
        )));
        }
        Ok(MockPlace::Scsi {
            bus: bus.into(),
            target,
            lun,
        })
    }

    /// Where a PCI device goes: its bus exists and takes hotplug, its slot is free (or a free one).
    fn pci_place(&self, driver: &str, args: &Value) -> Result<MockPlace, (&'static str, String)> {
        let bus = str_arg(args, "bus").unwrap_or(self.root_bus()).to_owned();
        let port = self.root_ports.iter().any(|(p, _, _)| *p == bus);
        if !port && bus != self.root_bus() {
            return Err(generic(format!("Bus '{bus}' not found")));
        }
        if self.machine == Machine::Q35 && bus == "pcie.0" {
            return Err(generic("Bus 'pcie.0' does not support hotplugging"));
        }
        let (slot, function) = match args.get("addr") {
            Some(addr) => parse_addr(addr).ok_or_else(|| {
                generic(format!(
                    "Property '{driver}.addr' doesn't take value {addr}"
                ))
            })?,
            None => (self.free_slot(&bus, port)?, 0),
        };
        if port && slot != 0 {
            return Err(generic(format!(
            "PCI: slot {slot} function {function} not available for {driver}, the bus is a PCIe root port"
        )));
        }
        if let Some(user) = self.pci_user(&bus, slot, function) {
            return Err(generic(format!(
                "PCI: slot {slot} function {function} not available for {driver}, in use by {user}"
            )));
        }
        Ok(MockPlace::Pci {
            bus,
            slot,
            function,
        })
    }

    /// The protocol node at the bottom of node `name`'s chain.
    fn protocol_node(&self, name: &str) -> Option<&MockBlockNode> {
        let mut node = self.nodes.iter().find(|n| n.node_name == name)?;
        while let Some(file) = &node.file {
            node = self.nodes.iter().find(|n| &n.node_name == file)?;
        }
        Some(node)
    }

    /// The file under node `name` (device and inode of its fd) and whether a device on it writes.
    fn image_of(&self, name: &str) -> Option<((u64, u64), bool)> {
        let top = self.nodes.iter().find(|n| n.node_name == name)?;
        let bottom = self.protocol_node(name)?;
        let fd = bottom.fd.as_deref()?;
        let file = std::fs::File::from(fd.try_clone().ok()?);
        let meta = file.metadata().ok()?;
        use std::os::unix::fs::MetadataExt;
        Some((
            (meta.dev(), meta.ino()),
            !(top.read_only || bottom.read_only),
        ))
    }

    /// Who uses slot `slot` of `bus`, if anything does (the builtin devices included).
    fn pci_user(&self, bus: &str, slot: u8, function: u8) -> Option<String> {
        if bus == self.root_bus() {
            let builtin: &[u8] = match self.machine {
                Machine::Pc => &[0, 1],
                Machine::Q35 => &[0, 0x1f],
            };
            if builtin.contains(&slot) {
                return Some("a device of the machine".into());
            }
        }
        self.devices
            .iter()
            .find(|d| {
                d.place
                    == MockPlace::Pci {
                        bus: bus.into(),
                        slot,
                        function,
                    }
            })
            .map(|d| format!("{},id={}", d.driver, d.id))
    }

    fn free_slot(&self, bus: &str, port: bool) -> Result<u8, (&'static str, String)> {
        let slots = if port { 0..1 } else { 0..32 };
        slots
            .into_iter()
            .find(|s| self.pci_user(bus, *s, 0).is_none())
            .ok_or_else(|| generic(format!("PCI: no slot/function available on {bus}")))
    }

    /// The device `is` picks, or QEMU's `DeviceNotFound` naming `name`.
    fn device_mut(
        &mut self,
        name: &str,
        is: impl Fn(&MockDevice) -> bool,
    ) -> Result<&mut MockDevice, (&'static str, String)> {
        self.devices
            .iter_mut()
            .find(|d| is(d))
            .ok_or_else(|| not_found(format!("Device '{name}' not found")))
    }

    fn device_del(&mut self, id: &str, later: &mut Option<Later>) -> Reply {
        let behaviour = self.guest_unplug;
        let device = self.device_mut(id, |d| d.id == id)?;
        if matches!(
            device.place,
            MockPlace::Scsi { .. } | MockPlace::Port { .. }
        ) {
            // A virtio-scsi bus lets a disk go at once, and a virtio-serial bus a port, guest or
            // no guest.
            self.finish_unplug(id);
            return Ok(json!({}));
        }
        if device.unplugging && behaviour == GuestUnplug::Never {
            return Err(generic(format!(
                "Device {id} is already in the process of unplug"
            )));
        }
        device.unplugging = true;
        *later = match behaviour {
            GuestUnplug::Release => Some(Later::Unplug(id.into(), Duration::ZERO)),
            GuestUnplug::After(after) => Some(Later::Unplug(id.into(), after)),
            GuestUnplug::Refuse => {
                device.unplugging = false;
                Some(Later::Refuse(id.into()))
            }
            GuestUnplug::Never => None,
        };
        Ok(json!({}))
    }

    /// The guest let device `id` go: it leaves, with `DEVICE_DELETED` (for a virtio device, first
    /// the one for its backend, without an id, as QEMU sends).
    pub(crate) fn finish_unplug(&mut self, id: &str) {
        let Some(at) = self.devices.iter().position(|d| d.id == id) else {
            return;
        };
        let device = self.devices.remove(at);
        let path = format!("/machine/peripheral/{id}");
        if let MockPlace::Cpu { core } = device.place {
            // An x86 vCPU: only its `lapic` child's event comes, never its own.
            self.cpu_slots[core as usize] = None;
            self.emit("DEVICE_DELETED", json!({ "path": format!("{path}/lapic") }));
            return;
        }
        if device.driver.starts_with("virtio-") {
            self.emit(
                "DEVICE_DELETED",
                json!({ "path": format!("{path}/virtio-backend") }),
            );
        }
        let bus = format!("{id}.0");
        match device.driver.as_str() {
            "virtio-scsi-pci" => self.scsi_buses.retain(|b| *b != bus),
            "virtio-serial-pci" => self.serial_buses.retain(|b| *b != bus),
            _ => {}
        }
        self.emit("DEVICE_DELETED", json!({"device": id, "path": path}));
    }
}

/// What a `device_del` leaves for later.
pub(crate) enum Later {
    /// The device goes after this long.
    Unplug(String, Duration),
    /// The guest refuses, right after the reply.
    Refuse(String),
}

impl Model {
    /// A node as `query-named-block-nodes` shows it, with its image's virtual size (the length
    /// of the file under it, as for a raw image), its dirty bitmaps (newest first, as QEMU
    /// lists them), and its backing chain (`backing_file_depth`, `image.backing-image`).
    fn node_info(&self, n: &MockBlockNode) -> Value {
        let mut info = self.image_info(n);
        let mut depth = 0;
        let mut below = n.backing.as_deref();
        while let Some(node) = below.and_then(|b| self.nodes.iter().find(|m| m.node_name == b)) {
            depth += 1;
            below = node.backing.as_deref();
        }
        info["backing_file_depth"] = json!(depth);
        info["dirty-bitmaps"] = self.storage.bitmaps_json(&n.node_name);
        info
    }

    /// [`Model::node_info`] but the bitmaps and depth; its image with the images under it.
    fn image_info(&self, n: &MockBlockNode) -> Value {
        let file = n
            .filename
            .clone()
            .or_else(|| n.file.clone())
            .unwrap_or_default();
        let file_under = self
            .protocol_node(&n.node_name)
            .and_then(|p| p.fd.as_deref())
            .and_then(|fd| fd.try_clone().ok())
            .map(std::fs::File::from);
        let size = match (&file_under, n.driver.as_str()) {
            (Some(f), "qcow2") => crate::storage::qcow2_size(f).unwrap_or(0),
            (Some(f), _) => f.metadata().map_or(0, |m| m.len()),
            (None, _) => 0,
        };
        let mut info = json!({"file": file, "node-name": n.node_name, "ro": n.read_only,
               "drv": n.driver, "encrypted": false, "detect_zeroes": "off", "bps": 0, "bps_rd": 0,
               "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0, "write_threshold": 0,
               "image": {"filename": file, "format": n.driver, "virtual-size": size},
               "cache": {"writeback": true, "direct": false, "no-flush": false}});
        let backing = n
            .backing
            .as_deref()
            .and_then(|b| self.nodes.iter().find(|m| m.node_name == b));
        if let Some(backing) = backing {
            info["image"]["backing-image"] = self.image_info(backing)["image"].take();
        }
        info
    }
}

/// True when the file behind `fd` starts with qcow2's magic.
fn is_qcow2(fd: &OwnedFd) -> bool {
    let file = std::fs::File::from(fd.try_clone().expect("dup"));
    let mut magic = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut magic, 0).is_ok() && magic == *b"QFI\xfb"
}

/// The mock's QAPI schema: each command with its arguments, and the events it sends.
fn schema() -> Value {
    let mut infos = Vec::new();
    let commands = COMMANDS.iter().chain(crate::storage::COMMANDS);
    for (i, (name, args)) in commands.enumerate() {
        let arg_type = format!("a{i}");
        let members: Vec<Value> = args
            .iter()
            .map(|a| json!({"name": a, "type": "any", "default": null}))
            .collect();
        infos.push(json!({"name": arg_type, "meta-type": "object", "members": members}));
        infos.push(
            json!({"name": name, "meta-type": "command", "arg-type": arg_type,
                          "ret-type": "any", "allow-oob": false}),
        );
    }
    for event in EVENTS.iter().chain(crate::storage::EVENTS) {
        infos.push(json!({"name": event, "meta-type": "event", "arg-type": "e"}));
    }
    let device_members = json!([{"name": "device", "type": "str", "default": null},
                                {"name": "path", "type": "str"}]);
    infos.push(json!({"name": "e", "meta-type": "object", "members": device_members}));
    infos.push(json!({"name": "any", "meta-type": "builtin", "json-type": "value"}));
    Value::Array(infos)
}
