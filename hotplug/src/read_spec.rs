//! A VM's spec read from QEMU alone, for a process that attaches with none
//! ([`Vm::attach_without_spec`](crate::Vm::attach_without_spec)): the machine, memory and vCPUs
//! from the machine's own properties, every device the SDK plugs from QOM
//! (`/machine/peripheral`: its type and properties), a disk's image chain as QEMU runs it from
//! `query-block` and its named nodes, the file behind an fd QEMU was handed from
//! `/proc/<qemu>/fd`, sockets from `query-chardev`, memory devices from
//! `query-memory-devices`. What QEMU does not tell is reported as [`Unreadable`], never guessed.

use std::collections::HashMap;
use std::path::PathBuf;

use qhotplug_cmdline::names;
use qhotplug_cmdline::{
    Accel, Balloon, Cache, Cdrom, CdromBus, CpuTopology, Disk, DiskBackend, DiskFrontend,
    DiskLayer, ErrorPolicy, Format, IdeAddr, Machine, MemoryBackend, MemoryDevice,
    MemoryDeviceKind, MemoryKind, NetworkSource, Nic, OnError, Pci, Rng, RootPort, ScsiAddr,
    ScsiController, Secret, Serial, SerialPort, VhostUserBlk, VirtioFs, VirtioSerial, VmSpec, Vnc,
    VncListen,
};
use qhotplug_qmp::command::{
    BlockDeviceInfo, BlockInfo, ChardevInfo, JobDismiss, JobInfo, MemoryDeviceInfo, QomGet,
    QomList, QueryChardev, QueryHotpluggableCpus, QueryJobs, QueryKvm, QueryMachines,
    QueryMemoryDevices, QueryName, QueryVnc,
};
use qhotplug_qmp::{Client, EventKind};
use serde_json::Value;

use crate::discover::pci_at;
use crate::ended_job::EndedJob;
use crate::error::Result;
use crate::qemu::block::{named_block_node_infos, Blocks};
use crate::qemu::fd_files::fd_files;
use crate::read_network;
pub(crate) use crate::unreadable::Unreadable;

/// What was read: the spec, and what QEMU did not tell.
pub(crate) struct ReadSpec {
    pub(crate) spec: VmSpec,
    pub(crate) unreadable: Vec<Unreadable>,
    /// Jobs of the SDK's a dead process left concluded, dismissed so QEMU lists its nodes.
    pub(crate) ended: Vec<EndedJob>,
}

/// Reads the VM's spec from QEMU, whose process is `pid` (for the files behind its fds).
pub(crate) async fn read_spec(client: &Client, pid: Option<u32>) -> Result<ReadSpec> {
    let mut read = Reader {
        qom: Qom(client),
        spec: VmSpec::default(),
        unreadable: vec![Unreadable::LaunchOptions],
    };
    let chardevs = client.execute(&QueryChardev).await?;
    read.machine(client).await?;
    read.consoles(client, &chardevs).await?;
    read.vcpus(client).await?;
    let blocks = Blocks::read(client).await?;
    let mut ended = Vec::new();
    let nodes = match named_block_node_infos(client).await? {
        Some(nodes) => nodes,
        None => {
            ended = dismiss_orphaned_concluded(client).await?;
            named_block_node_infos(client).await?.unwrap_or_default()
        }
    };
    let files = FdFiles::read(client, pid).await?;
    let memory = client.execute(&QueryMemoryDevices).await?;
    let found = Found {
        chardevs: &chardevs,
        blocks: &blocks,
        nodes: &nodes,
        files: &files,
        memory: &memory,
    };
    for (id, driver) in read.qom.children(names::PERIPHERAL).await? {
        read.device(&id, &driver, &found).await?;
    }
    let mut spec = read.spec;
    spec.sort_by_id();
    Ok(ReadSpec {
        spec,
        unreadable: read.unreadable,
        ended,
    })
}

/// Each of `disks` whose image chain QEMU runs differently from the one it holds (another top,
/// other images under it, other checkpoints): the disk with QEMU's chain, read as
/// [`read_spec`] reads it. A layer that stays keeps its path as `disks` named it (the file
/// behind an fd is read canonical). A disk whose chain cannot be read (a network disk, an image
/// no node tells apart) is left out, as are all while QEMU lists no node (a job waits
/// concluded). `reconcile`'s: a pivot a dead process's job made, or a checkpoint its backup
/// left, is what QEMU runs, whatever the kept spec said.
pub(crate) async fn chains_as_run(
    client: &Client,
    pid: Option<u32>,
    disks: &[Disk],
) -> Result<Vec<Disk>> {
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    let Some(nodes) = named_block_node_infos(client).await? else {
        return Ok(Vec::new());
    };
    let blocks = Blocks::read(client).await?;
    let files = FdFiles::read(client, pid).await?;
    let found = Found {
        chardevs: &[],
        blocks: &blocks,
        nodes: &nodes,
        files: &files,
        memory: &[],
    };
    let reader = Reader {
        qom: Qom(client),
        spec: VmSpec::default(),
        unreadable: Vec::new(),
    };
    let mut changed = Vec::new();
    for disk in disks
        .iter()
        .filter(|d| !matches!(d.backend, DiskBackend::Network(_)))
    {
        let read = reader.disk_read(&disk.id, disk.frontend.clone(), &found);
        let Ok((run, gaps)) = read.await? else {
            continue;
        };
        let layers = |d: &Disk| -> Vec<(u32, Format, Vec<String>)> {
            std::iter::once(d.top_layer())
                .chain(d.backing.iter().cloned())
                .map(|l| (l.generation, l.format, l.checkpoints))
                .collect()
        };
        if layers(&run) == layers(disk) {
            continue;
        }
        let known = |layer: DiskLayer| {
            let kept = std::iter::once(disk.top_layer())
                .chain(disk.backing.iter().cloned())
                .find(|l| l.generation == layer.generation);
            DiskLayer {
                path: kept.map_or(layer.path, |l| l.path),
                ..layer
            }
        };
        // A layer whose file is not known (its fd set gone, or no /proc to read) keeps the
        // path the spec gave it; a new one must be named.
        let unnamed = |layer: &DiskLayer| {
            gaps.iter().any(|g| {
                matches!(g, Unreadable::ImagePath { node, .. }
                    if names::generation_of(&disk.id, node) == Some(layer.generation))
            })
        };
        let spec_has = |layer: &DiskLayer| {
            std::iter::once(disk.top_layer())
                .chain(disk.backing.iter().cloned())
                .any(|l| l.generation == layer.generation)
        };
        let new_unnamed = std::iter::once(run.top_layer())
            .chain(run.backing.iter().cloned())
            .any(|l| unnamed(&l) && !spec_has(&l));
        if new_unnamed {
            continue;
        }
        let top = known(run.top_layer());
        changed.push(Disk {
            path: top.path,
            format: top.format,
            generation: top.generation,
            checkpoints: top.checkpoints,
            backing: run.backing.into_iter().map(known).collect(),
            ..disk.clone()
        });
    }
    Ok(changed)
}

/// How long a concluded job of the SDK's may wait for the call that started it to dismiss it (it
/// does so at once) before it is taken for a dead process's.
const CONCLUDED_DISMISSED: std::time::Duration = std::time::Duration::from_secs(1);

/// QEMU lists no block node while a job waits concluded (it would crash). A job of the SDK's
/// (`names::is_sdk_job`) that stays concluded was left by a process that died between the job's
/// end and its dismissal; it is dismissed, and returned with its outcome. Nothing is lost: what the job did
/// is in QEMU's graph (the node a device runs on after a pivot, a chain a commit or a stream
/// shortened), which is what is read next, and what it left unused is `reconcile`'s to delete.
async fn dismiss_orphaned_concluded(client: &Client) -> Result<Vec<EndedJob>> {
    let mut events = client.events();
    let concluded: Vec<JobInfo> = client
        .execute(&QueryJobs)
        .await?
        .into_iter()
        .filter(|j| j.status == "concluded" && names::is_sdk_job(&j.id))
        .collect();
    // One wait for them all: a live caller dismisses its job at once.
    let deadline = tokio::time::Instant::now() + CONCLUDED_DISMISSED;
    let mut ended = Vec::new();
    for job in concluded {
        let gone = events
            .wait_for(deadline, |e| {
                matches!(e, EventKind::JobStatusChange(c) if c.id == job.id && c.status == "null")
            })
            .await;
        if gone {
            continue;
        }
        tracing::info!(job = %job.id, error = ?job.error, "a dead process's concluded job: dismissed");
        match client.execute(&JobDismiss { id: job.id.clone() }).await {
            Ok(_) => ended.push(EndedJob::of(&job)),
            Err(e) if !crate::qemu::errors::is_absent(&e) => return Err(e.into()),
            Err(_) => {}
        }
    }
    Ok(ended)
}

/// What QEMU's queries said, shared by every device.
struct Found<'a> {
    chardevs: &'a [ChardevInfo],
    blocks: &'a Blocks,
    nodes: &'a [BlockDeviceInfo],
    files: &'a FdFiles,
    memory: &'a [MemoryDeviceInfo],
}

struct Reader<'a> {
    qom: Qom<'a>,
    spec: VmSpec,
    unreadable: Vec<Unreadable>,
}

impl Reader<'_> {
    /// The machine: its type, accelerator, name, direct boot, boot memory and its backend, the
    /// vCPU topology.
    async fn machine(&mut self, client: &Client) -> Result<()> {
        let qom = &self.qom;
        let spec = &mut self.spec;
        let kind = qom.string("/machine", "type").await?.unwrap_or_default();
        spec.machine = if kind.contains("q35") {
            Machine::Q35
        } else {
            Machine::Pc
        };
        let name = kind.strip_suffix("-machine").unwrap_or(&kind);
        let machines = client.execute(&QueryMachines).await?;
        let defaults = machines.iter().find(|m| m.name == name);
        spec.accel = if client.execute(&QueryKvm).await?.enabled {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        spec.name = client.execute(&QueryName).await?.name.unwrap_or_default();
        let path = |p: Option<String>| p.filter(|p| !p.is_empty()).map(PathBuf::from);
        spec.kernel = path(qom.string("/machine", "kernel").await?);
        spec.initrd = path(qom.string("/machine", "initrd").await?);
        spec.append = qom
            .string("/machine", "append")
            .await?
            .filter(|a| !a.is_empty());
        let memory = qom.get("/machine", "memory").await?.unwrap_or_default();
        let bytes = |key: &str| memory.get(key).and_then(Value::as_u64).unwrap_or(0);
        spec.memory_mib = bytes("size") / qhotplug_cmdline::MIB;
        spec.memory_slots = bytes("slots") as u32;
        if spec.memory_slots > 0 || bytes("max-size") > bytes("size") {
            spec.max_memory_mib = Some(bytes("max-size") / qhotplug_cmdline::MIB);
        }
        let backend = qom.string("/machine", "memory-backend").await?;
        let backend = backend.as_deref().and_then(|p| p.rsplit('/').next());
        let default_ram = defaults.and_then(|m| m.default_ram_id.as_deref());
        if let Some(id) = backend.filter(|id| !id.is_empty() && Some(*id) != default_ram) {
            spec.memory_backend = Some(self.qom.memory_backend(id).await?);
        }
        if let Some(cpu) = self
            .qom
            .string("/machine/unattached/device[0]", "type")
            .await?
        {
            let default_cpu = defaults.and_then(|m| m.default_cpu_type.as_deref());
            if Some(cpu.as_str()) != default_cpu {
                self.spec.cpu = cpu
                    .strip_suffix("-x86_64-cpu")
                    .map(str::to_owned)
                    .or(Some(cpu));
            }
        }
        Ok(())
    }

    /// The serial consoles (`serial<i>` chardevs, in order) and the VNC display.
    async fn consoles(&mut self, client: &Client, chardevs: &[ChardevInfo]) -> Result<()> {
        for index in 0.. {
            let Some(chardev) = chardevs
                .iter()
                .find(|c| c.label == format!("serial{index}"))
            else {
                break;
            };
            let serial = match chardev.filename.split_once(':') {
                Some(("pty", _)) => Serial::Pty,
                _ => match socket_path(&chardev.filename) {
                    Some(path) => Serial::Socket(path),
                    None => {
                        self.unreadable.push(Unreadable::SerialConsole { index });
                        break;
                    }
                },
            };
            self.spec.serials.push(serial);
        }
        let vnc = client.execute(&QueryVnc).await?;
        if vnc.enabled {
            // A TCP display's service is its port; a Unix socket's is its path.
            let service = vnc.service.unwrap_or_default();
            let listen = match service.parse::<u16>() {
                Ok(port) => VncListen::Tcp {
                    host: vnc.host.unwrap_or_default(),
                    display: port.saturating_sub(5900),
                },
                Err(_) => VncListen::Unix(service.into()),
            };
            let password = (vnc.auth.as_deref() == Some("vnc")).then(|| {
                self.unreadable.push(Unreadable::VncPassword);
                Secret::unresolved("vnc-password")
            });
            self.spec.vnc = Some(Vnc { listen, password });
        }
        Ok(())
    }

    /// The vCPU topology, the vCPUs at boot, and the hot-plugged ones (`query-hotpluggable-cpus`:
    /// a vCPU under `/machine/peripheral` is a device with an id).
    async fn vcpus(&mut self, client: &Client) -> Result<()> {
        let smp = self.qom.get("/machine", "smp").await?.unwrap_or_default();
        let count = |key: &str| smp.get(key).and_then(Value::as_u64).unwrap_or(0) as u32;
        let slots = client.execute(&QueryHotpluggableCpus).await?;
        let mut boot = 0;
        for slot in &slots {
            let Some(path) = &slot.qom_path else {
                continue;
            };
            let peripheral = path
                .strip_prefix(names::PERIPHERAL)
                .and_then(|p| p.strip_prefix('/'))
                .filter(|id| !id.contains('/'));
            match peripheral {
                Some(id) => self.spec.vcpus.push(crate::cpus::vcpu_in(id, slot)),
                _ => boot += slot.vcpus_count.max(1) as u32,
            }
        }
        self.spec.smp = boot.max(1);
        let max = count("maxcpus");
        if max > self.spec.smp + self.spec.vcpus.len() as u32 || !self.spec.vcpus.is_empty() {
            self.spec.cpu_topology = Some(CpuTopology {
                max,
                sockets: count("sockets"),
                cores: count("cores"),
                threads: count("threads"),
            });
        }
        Ok(())
    }

    /// Device `id` of QOM type `driver`, into the spec's list for its kind.
    async fn device(&mut self, id: &str, driver: &str, found: &Found<'_>) -> Result<()> {
        let path = names::peripheral_path(id);
        let qom = &self.qom;
        let foreign = |reason: &str| Unreadable::Foreign {
            device: id.to_owned(),
            driver: driver.to_owned(),
            reason: reason.to_owned(),
        };
        let pci = || async { qom.pci(&path).await };
        let spec = &mut self.spec;
        match driver {
            "virtio-blk-pci" | "scsi-hd" | "scsi-generic" | "scsi-block" => {
                let frontend = match driver {
                    "virtio-blk-pci" => pci().await?.map(DiskFrontend::VirtioBlk),
                    "scsi-hd" => qom.scsi(&path).await?.map(DiskFrontend::ScsiHd),
                    _ => qom.scsi(&path).await?.map(DiskFrontend::ScsiGeneric),
                };
                let Some(frontend) = frontend else {
                    self.unreadable.push(foreign("no address"));
                    return Ok(());
                };
                match self.disk(id, frontend, found).await? {
                    Ok(disk) => {
                        if let Some(source) = disk.network_source() {
                            self.unreadable.extend(read_network::unsaid(id, source));
                        }
                        self.spec.disks.push(disk);
                    }
                    Err(gap) => self.unreadable.push(gap),
                }
            }
            "scsi-cd" | "ide-cd" => {
                let bus = match driver {
                    "scsi-cd" => qom.scsi(&path).await?.map(CdromBus::Scsi),
                    _ => qom.ide(&path).await?.map(CdromBus::Ide),
                };
                let Some(bus) = bus else {
                    self.unreadable.push(foreign("no address"));
                    return Ok(());
                };
                let boot = qom.get(&path, "bootindex").await?.and_then(|v| v.as_i64()) == Some(0);
                match self.cdrom(id, bus, boot, found).await? {
                    Ok(cd) => {
                        if let Some(source) = cd.network_source() {
                            self.unreadable.extend(read_network::unsaid(id, source));
                        }
                        self.spec.cdroms.push(cd);
                    }
                    Err(gap) => self.unreadable.push(gap),
                }
            }
            "virtio-net-pci" => {
                let (Some(pci), Some(mac)) = (pci().await?, qom.string(&path, "mac").await?) else {
                    self.unreadable.push(foreign("no address or MAC"));
                    return Ok(());
                };
                let Ok(mac) = mac.parse() else {
                    self.unreadable
                        .push(foreign("a MAC address that does not parse"));
                    return Ok(());
                };
                let vectors = qom.number(&path, "vectors").await?;
                let mq = qom.get(&path, "mq").await?.and_then(|v| v.as_bool()) == Some(true);
                let queues = match (mq, vectors) {
                    (true, Some(v)) if v >= 4 => ((v - 2) / 2) as u16,
                    _ => 1,
                };
                spec.nics.push(Nic {
                    id: id.to_owned(),
                    mac,
                    queues,
                    pci,
                    vhost: false,
                    link_up: true,
                });
                self.unreadable.push(Unreadable::NicLink {
                    device: id.to_owned(),
                });
            }
            "virtio-scsi-pci" | "pcie-root-port" | "virtio-balloon-pci" | "virtio-serial-pci" => {
                let Some(pci) = pci().await? else {
                    self.unreadable.push(foreign("no address"));
                    return Ok(());
                };
                let id = id.to_owned();
                match driver {
                    "virtio-scsi-pci" => spec.scsi_controllers.push(ScsiController { id, pci }),
                    "virtio-balloon-pci" => spec.balloon = Some(Balloon { id, pci }),
                    "virtio-serial-pci" => spec.virtio_serials.push(VirtioSerial { id, pci }),
                    _ => {
                        let chassis = qom.number(&path, "chassis").await?;
                        spec.root_ports.push(RootPort {
                            id,
                            chassis: chassis.unwrap_or(0) as u8,
                            pci,
                        });
                    }
                }
            }
            "virtserialport" => {
                let bus = qom.bus(&path).await?;
                let name = qom.string(&path, "name").await?;
                let socket = self.chardev_socket(&path, found).await?;
                let (Some(bus), Some(name), Some(socket)) = (bus, name, socket) else {
                    self.unreadable
                        .push(foreign("not on a Unix socket chardev"));
                    return Ok(());
                };
                self.spec.serial_ports.push(SerialPort {
                    id: id.to_owned(),
                    bus,
                    name,
                    socket,
                });
            }
            "vhost-user-blk-pci" | "vhost-user-fs-pci" => {
                let socket = self.chardev_socket(&path, found).await?;
                let (Some(pci), Some(socket)) = (self.qom.pci(&path).await?, socket) else {
                    self.unreadable
                        .push(foreign("no address, or not on a Unix socket chardev"));
                    return Ok(());
                };
                let qom = &self.qom;
                let number = |n: Option<u64>| n.and_then(|n| u16::try_from(n).ok());
                if driver == "vhost-user-blk-pci" {
                    let num_queues = number(qom.number(&path, "num-queues").await?);
                    self.spec.vhost_user_blks.push(VhostUserBlk {
                        id: id.to_owned(),
                        socket,
                        pci,
                        num_queues,
                    });
                } else {
                    let tag = qom.string(&path, "tag").await?.unwrap_or_default();
                    // QEMU's default, which the SDK leaves unsaid.
                    let queue_size =
                        number(qom.number(&path, "queue-size").await?).filter(|&n| n != 128);
                    self.spec.virtio_fs.push(VirtioFs {
                        id: id.to_owned(),
                        socket,
                        tag,
                        pci,
                        queue_size,
                    });
                }
            }
            "virtio-rng-pci" => {
                let source = match qom.string(&path, "rng").await? {
                    Some(object) => qom.string(&object, "filename").await?,
                    None => None,
                };
                let (Some(pci), Some(source)) = (pci().await?, source) else {
                    self.unreadable
                        .push(foreign("no address, or not on rng-random"));
                    return Ok(());
                };
                spec.rngs.push(Rng {
                    id: id.to_owned(),
                    pci,
                    source: source.into(),
                });
            }
            "pc-dimm" | "virtio-mem-pci" => match self.memory_device(id, found).await? {
                Some(device) => self.spec.memory_devices.push(device),
                None => self.unreadable.push(foreign("not in query-memory-devices")),
            },
            "usb-tablet" if id == "tablet0" => spec.usb_tablet = true,
            _ if driver.ends_with("-cpu") => {} // Read from the CPU slots.
            _ => self.unreadable.push(foreign("not a kind the SDK plugs")),
        }
        Ok(())
    }

    /// The socket path of the chardev device `path` is on, if it is a Unix socket.
    async fn chardev_socket(&self, path: &str, found: &Found<'_>) -> Result<Option<PathBuf>> {
        let Some(chardev) = self.qom.string(path, "chardev").await? else {
            return Ok(None);
        };
        // A socket chardev's address; `query-chardev` names no path for a connected client.
        let addr = self
            .qom
            .get(&format!("/chardevs/{chardev}"), "addr")
            .await?;
        if let Some(addr) = addr.filter(|a| a.get("type").and_then(Value::as_str) == Some("unix")) {
            return Ok(addr.get("path").and_then(Value::as_str).map(PathBuf::from));
        }
        Ok(found
            .chardevs
            .iter()
            .find(|c| c.label == chardev)
            .and_then(|c| socket_path(&c.filename)))
    }

    /// Disk `id`: its image chain as QEMU runs it, top first, each layer's file, format,
    /// generation and checkpoints; its cache, I/O limits and error policy.
    async fn disk(
        &self,
        id: &str,
        frontend: DiskFrontend,
        found: &Found<'_>,
    ) -> Result<std::result::Result<Disk, Unreadable>> {
        Ok(match self.disk_read(id, frontend, found).await? {
            Ok((disk, gaps)) => gaps.into_iter().next().map_or(Ok(disk), Err),
            Err(gap) => Err(gap),
        })
    }

    /// [`Reader::disk`], with the images whose file is not known ([`Unreadable::ImagePath`])
    /// named by the node's file name.
    async fn disk_read(
        &self,
        id: &str,
        frontend: DiskFrontend,
        found: &Found<'_>,
    ) -> Result<std::result::Result<(Disk, Vec<Unreadable>), Unreadable>> {
        let path = names::peripheral_path(id);
        let Some(inserted) = found.blocks.drive(id).and_then(|b| b.inserted.as_ref()) else {
            return Ok(Err(Unreadable::Foreign {
                device: id.to_owned(),
                driver: "disk".into(),
                reason: "no image inserted".into(),
            }));
        };
        let mut top = inserted.node_name.clone().unwrap_or_default();
        if top.starts_with('#') {
            // A job's implicit filter (a backup's copy-before-write) sits between the device and
            // its image while the job runs; it reports its child's file name.
            let under: Vec<&BlockDeviceInfo> = found
                .nodes
                .iter()
                .filter(|n| {
                    n.node_name
                        .as_deref()
                        .is_some_and(|name| names::is_format_node_of(id, name))
                        && n.file == inserted.file
                })
                .collect();
            if let [node] = &under[..] {
                top = node.node_name.clone().unwrap_or_default();
            }
        }
        let Some(generation) = names::generation_of(id, &top) else {
            return Ok(Err(Unreadable::Foreign {
                device: id.to_owned(),
                driver: "disk".into(),
                reason: format!("its node {top} is not named as the SDK names them"),
            }));
        };
        let protocol = found
            .nodes
            .iter()
            .find(|n| n.node_name.as_deref() == Some(&names::file_node_at(id, generation)));
        let network = || Unreadable::NetworkBackend {
            device: id.to_owned(),
        };
        let backend = match protocol {
            Some(n) if n.drv == "file" => DiskBackend::File,
            Some(n) if n.drv == "host_device" => DiskBackend::HostDevice,
            Some(n) => match self.network_source(id, generation, n).await? {
                Some(source) => DiskBackend::Network(Box::new(source)),
                None => return Ok(Err(network())),
            },
            None => return Ok(Err(network())),
        };
        // The chain's images, top first, as QEMU runs them; each below the top is the format
        // node of this disk's whose file name is that image's (a format node's names its whole
        // chain), or else the one that has as many images under it as that image has. (The
        // nodes are listed flat, so QEMU counts no image under any: only the bottom one's depth
        // tells.)
        let mut chain = Vec::new();
        let mut image = inserted.image.as_ref();
        while let Some(info) = image {
            chain.push(info);
            image = info.backing_image.as_deref();
        }
        // A filter over the image (a job's) heads the chain with a format of its own.
        let images = chain
            .iter()
            .position(|i| matches!(i.format.as_deref(), Some("raw" | "qcow2")))
            .unwrap_or(0);
        let chain = chain.split_off(images);
        let depth = chain.len().saturating_sub(1) as u32;
        let mut on = vec![top.clone()];
        for below in 1..=depth as usize {
            let file = chain.get(below).and_then(|info| info.filename.as_ref());
            let depth = depth - below as u32;
            let unclaimed: Vec<&BlockDeviceInfo> = found
                .nodes
                .iter()
                .filter(|n| {
                    n.node_name.as_deref().is_some_and(|name| {
                        names::is_format_node_of(id, name) && !on.iter().any(|m| m == name)
                    })
                })
                .collect();
            let by_file = unclaimed.iter().copied().find(|n| Some(&n.file) == file);
            let by_depth: Vec<&BlockDeviceInfo> = unclaimed
                .iter()
                .copied()
                .filter(|n| n.backing_file_depth == Some(depth))
                .collect();
            let node = match (by_file, &by_depth[..]) {
                (Some(node), _) | (None, &[node]) => node,
                _ => {
                    return Ok(Err(Unreadable::Foreign {
                        device: id.to_owned(),
                        driver: "disk".into(),
                        reason: format!(
                            "image {below} of its chain is on no node QEMU tells apart"
                        ),
                    }))
                }
            };
            on.push(node.node_name.clone().unwrap_or_default());
        }
        let mut gaps = Vec::new();
        let layers: Vec<DiskLayer> = on
            .iter()
            .map(|node| self.layer(id, node, found, &mut gaps))
            .collect();
        let mut layers = layers.into_iter();
        let Some(mut top_layer) = layers.next() else {
            return Ok(Err(Unreadable::Foreign {
                device: id.to_owned(),
                driver: "disk".into(),
                reason: "no image".into(),
            }));
        };
        // A network image is named by its source, not by a file.
        if let DiskBackend::Network(source) = &backend {
            if on.len() > 1 {
                return Ok(Err(Unreadable::Foreign {
                    device: id.to_owned(),
                    driver: "disk".into(),
                    reason: "a chain over a network image".into(),
                }));
            }
            top_layer.path = source.uri().into();
            gaps.clear();
        }
        // The node's `direct` and `no-flush` are the SDK's; `writeback` is the guest's (a
        // virtio-blk driver without the write-cache feature turns it off), so it is not read.
        // `Cache::Directsync` opens the image as `Cache::None` does, and reads back as it.
        let cache = match inserted.cache {
            Some(c) if c.no_flush => Cache::Unsafe,
            Some(c) if c.direct => Cache::None,
            _ => Cache::Writeback,
        };
        let on_error = ErrorPolicy {
            read: on_error(self.qom.string(&path, "rerror").await?, OnError::Report),
            write: on_error(self.qom.string(&path, "werror").await?, OnError::Enospc),
        };
        let disk = Disk {
            id: id.to_owned(),
            frontend,
            path: top_layer.path,
            backend,
            format: top_layer.format,
            read_only: inserted.ro,
            cache,
            io_limits: found.blocks.limits_of(id).filter(|l| !l.is_unlimited()),
            generation,
            backing: layers.collect(),
            on_error,
            checkpoints: top_layer.checkpoints,
        };
        Ok(Ok((disk, gaps)))
    }

    /// One image of disk `id`'s chain, on node `node` (a format node, or the protocol node a
    /// disk without one runs on): its file from the protocol node's, its format, its checkpoints.
    fn layer(
        &self,
        id: &str,
        node: &str,
        found: &Found<'_>,
        gaps: &mut Vec<Unreadable>,
    ) -> DiskLayer {
        let generation = names::generation_of(id, node).unwrap_or(0);
        let info = |name: &str| {
            found
                .nodes
                .iter()
                .find(|n| n.node_name.as_deref() == Some(name))
        };
        let protocol = info(&names::file_node_at(id, generation));
        let filename = protocol.map(|n| n.file.clone()).unwrap_or_default();
        let path = found.files.path_of(&filename).unwrap_or_else(|| {
            gaps.push(Unreadable::ImagePath {
                device: id.to_owned(),
                node: node.to_owned(),
            });
            PathBuf::from(&filename)
        });
        let format = match info(node).map(|n| n.drv.as_str()) {
            Some("qcow2") => Format::Qcow2,
            _ => Format::Raw,
        };
        // QEMU lists a node's bitmaps newest first; checkpoints are oldest first.
        let checkpoints = info(node)
            .map(|n| {
                n.dirty_bitmaps
                    .iter()
                    .rev()
                    .filter(|b| b.persistent)
                    .map(|b| b.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        DiskLayer {
            path,
            format,
            generation,
            checkpoints,
        }
    }

    /// The network source device `id`'s image number `generation` is opened on, its protocol
    /// node being `protocol`; `None` for a source the SDK does not make.
    async fn network_source(
        &self,
        id: &str,
        generation: u32,
        protocol: &BlockDeviceInfo,
    ) -> Result<Option<NetworkSource>> {
        let object = |name: &str| format!("/objects/{name}");
        let secret = names::secret_at(id, generation);
        let secret = self
            .qom
            .string(&object(&secret), "type")
            .await?
            .map(|_| secret);
        let tls_dir = self
            .qom
            .string(&object(&names::tls_creds_at(id, generation)), "dir")
            .await?
            .map(PathBuf::from);
        let objects = read_network::Objects { secret, tls_dir };
        Ok(read_network::network_source(
            &protocol.drv,
            &protocol.file,
            objects,
        ))
    }

    /// CD-ROM drive `id`: its medium, an ISO the SDK handed over or a network source.
    async fn cdrom(
        &self,
        id: &str,
        bus: CdromBus,
        boot: bool,
        found: &Found<'_>,
    ) -> Result<std::result::Result<Cdrom, Unreadable>> {
        let drive: Option<&BlockInfo> = found.blocks.drive(id);
        let inserted = drive.and_then(|d| d.inserted.as_ref());
        let mut cd = Cdrom {
            id: id.to_owned(),
            bus,
            medium: None,
            generation: 0,
            boot,
        };
        let Some(inserted) = inserted else {
            return Ok(Ok(cd));
        };
        let top = inserted.node_name.clone().unwrap_or_default();
        cd.generation = names::generation_of(id, &top).unwrap_or(0);
        let protocol = found
            .nodes
            .iter()
            .find(|n| n.node_name.as_deref() == Some(&names::file_node_at(id, cd.generation)));
        let file = found.files.path_of(&inserted.file);
        match (file, protocol) {
            (Some(path), _) => cd.medium = Some(path.into()),
            (None, Some(node)) if !matches!(node.drv.as_str(), "file" | "host_device") => {
                match self.network_source(id, cd.generation, node).await? {
                    Some(source) => cd.medium = Some(source.into()),
                    None => {
                        return Ok(Err(Unreadable::NetworkBackend {
                            device: id.to_owned(),
                        }))
                    }
                }
            }
            (None, _) => {
                return Ok(Err(Unreadable::ImagePath {
                    device: id.to_owned(),
                    node: top,
                }))
            }
        }
        Ok(Ok(cd))
    }

    /// Memory device `id` and its backend.
    async fn memory_device(&self, id: &str, found: &Found<'_>) -> Result<Option<MemoryDevice>> {
        let path = names::peripheral_path(id);
        let Some(info) = found.memory.iter().find(|m| match m {
            MemoryDeviceInfo::Dimm(d) => d.id.as_deref() == Some(id),
            MemoryDeviceInfo::VirtioMem(v) => v.id.as_deref() == Some(id),
            _ => false,
        }) else {
            return Ok(None);
        };
        let (memdev, kind) = match info {
            MemoryDeviceInfo::Dimm(d) => (d.memdev.clone(), MemoryDeviceKind::Dimm),
            MemoryDeviceInfo::VirtioMem(v) => {
                let Some(pci) = self.qom.pci(&path).await? else {
                    return Ok(None);
                };
                (
                    v.memdev.clone(),
                    MemoryDeviceKind::VirtioMem {
                        pci,
                        requested: v.requested_size,
                    },
                )
            }
            _ => return Ok(None),
        };
        let backend_id = memdev.rsplit('/').next().unwrap_or(&memdev);
        Ok(Some(MemoryDevice {
            id: id.to_owned(),
            kind,
            backend: self.qom.memory_backend(backend_id).await?,
        }))
    }
}

/// A `rerror`/`werror` value (`auto` is QEMU's default).
fn on_error(value: Option<String>, default: OnError) -> OnError {
    match value.as_deref() {
        Some("report") => OnError::Report,
        Some("ignore") => OnError::Ignore,
        Some("stop") => OnError::Stop,
        Some("enospc") => OnError::Enospc,
        _ => default,
    }
}

/// The path of a Unix socket chardev from its `query-chardev` file name
/// (`unix:/run/x.sock,server=on`, `disconnected:unix:…` while no peer is connected).
fn socket_path(filename: &str) -> Option<PathBuf> {
    let rest = filename.strip_prefix("disconnected:").unwrap_or(filename);
    let rest = rest.strip_prefix("unix:")?;
    let path = rest.split(',').next()?;
    Some(PathBuf::from(path))
}

/// The files behind the fds QEMU holds in its fd sets, by set (`/proc/<qemu>/fd`).
struct FdFiles(HashMap<i64, PathBuf>);

impl FdFiles {
    async fn read(client: &Client, pid: Option<u32>) -> Result<FdFiles> {
        let files = fd_files(client, pid).await?;
        Ok(FdFiles(
            files.into_iter().map(|f| (f.set, f.path)).collect(),
        ))
    }

    /// The file a node's file name stands for: the path itself, or the file behind fd set `N`
    /// for `/dev/fdset/N`. `None` for a set QEMU no longer lists, or a `json:` description.
    fn path_of(&self, filename: &str) -> Option<PathBuf> {
        match filename.strip_prefix("/dev/fdset/") {
            Some(set) => self.0.get(&set.parse().ok()?).cloned(),
            None if filename.starts_with('/') => Some(PathBuf::from(filename)),
            None => None,
        }
    }
}

/// QOM reads on one client: a missing property or object is `None`, not an error.
struct Qom<'a>(&'a Client);

impl Qom<'_> {
    async fn get(&self, path: &str, property: &str) -> Result<Option<Value>> {
        let get = QomGet {
            path: path.to_owned(),
            property: property.to_owned(),
        };
        match self.0.execute(&get).await {
            Ok(value) => Ok(Some(value)),
            Err(qhotplug_qmp::Error::Qmp { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn string(&self, path: &str, property: &str) -> Result<Option<String>> {
        Ok(self
            .get(path, property)
            .await?
            .and_then(|v| v.as_str().map(str::to_owned)))
    }

    /// The children of `container` with their types, by name.
    async fn children(&self, container: &str) -> Result<Vec<(String, String)>> {
        let list = self
            .0
            .execute(&QomList {
                path: container.to_owned(),
            })
            .await?;
        Ok(list
            .into_iter()
            .filter_map(|c| Some((c.name.clone(), c.child_type()?.to_owned())))
            .collect())
    }

    /// The name of the bus the device at `path` sits on (its `parent_bus`'s last part).
    async fn bus(&self, path: &str) -> Result<Option<String>> {
        Ok(self
            .string(path, "parent_bus")
            .await?
            .and_then(|b| b.rsplit('/').next().map(str::to_owned))
            .filter(|b| !b.is_empty()))
    }

    /// A number property of the object at `path`.
    async fn number(&self, path: &str, property: &str) -> Result<Option<u64>> {
        Ok(self.get(path, property).await?.and_then(|v| v.as_u64()))
    }

    /// The PCI address of the device at `path`.
    async fn pci(&self, path: &str) -> Result<Option<Pci>> {
        let bus = self.string(path, "parent_bus").await?;
        let addr = self.number(path, "addr").await?;
        Ok(bus.zip(addr).and_then(|(bus, addr)| pci_at(&bus, addr)))
    }

    /// The SCSI address of the device at `path`.
    async fn scsi(&self, path: &str) -> Result<Option<ScsiAddr>> {
        let bus = self.bus(path).await?;
        let channel = self.number(path, "channel").await?;
        let scsi_id = self.number(path, "scsi-id").await?;
        let lun = self.number(path, "lun").await?;
        Ok(match (bus, channel, scsi_id, lun) {
            (Some(bus), Some(channel), Some(scsi_id), Some(lun)) => Some(ScsiAddr {
                bus,
                channel: channel as u8,
                scsi_id: scsi_id as u16,
                lun: lun as u16,
            }),
            _ => None,
        })
    }

    /// The IDE address of the device at `path`.
    async fn ide(&self, path: &str) -> Result<Option<IdeAddr>> {
        let bus = self.bus(path).await?;
        let unit = self.number(path, "unit").await?;
        Ok(match (bus, unit) {
            (Some(bus), Some(unit)) => Some(IdeAddr {
                bus,
                unit: unit as u8,
            }),
            _ => None,
        })
    }

    /// Memory backend object `id`.
    async fn memory_backend(&self, id: &str) -> Result<MemoryBackend> {
        let path = format!("/objects/{id}");
        let kind = self.string(&path, "type").await?.unwrap_or_default();
        let flag = |v: Option<Value>| v.and_then(|v| v.as_bool()).unwrap_or(false);
        let kind = match kind.as_str() {
            "memory-backend-memfd" => MemoryKind::Memfd,
            "memory-backend-file" => MemoryKind::File(
                self.string(&path, "mem-path")
                    .await?
                    .unwrap_or_default()
                    .into(),
            ),
            _ => MemoryKind::Ram,
        };
        let hugepages =
            matches!(kind, MemoryKind::Memfd) && flag(self.get(&path, "hugetlb").await?);
        Ok(MemoryBackend {
            id: id.to_owned(),
            kind,
            size: self.number(&path, "size").await?.unwrap_or(0),
            share: flag(self.get(&path, "share").await?),
            hugepages,
        })
    }
}
