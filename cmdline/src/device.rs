//! Devices: one value renders as launch arguments and as hotplug (QMP) arguments.

use std::path::{Path, PathBuf};

use qhotplug_netdev::MacAddr;
use qhotplug_qmp::command::{BlockdevAdd, NetdevAdd};

use crate::error::{Error, Result};
use crate::model::DeviceModel;
use crate::network_disk::NetworkSource;
use crate::value::{blockdev, p, props_to_json, render, validate_id, Prop, Props};

/// A PCI address: a bus and a slot (and function) on it. `addr` is hexadecimal on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Pci {
    /// The bus: `pci.0` on `pc`, `pcie.0` or a root port's id on `q35`.
    pub bus: String,
    /// The slot, 0–31.
    pub slot: u8,
    /// The function, 0–7.
    pub function: u8,
}

impl Pci {
    /// Slot `slot`, function 0, on `bus`.
    pub fn new(bus: impl Into<String>, slot: u8) -> Self {
        Pci {
            bus: bus.into(),
            slot,
            function: 0,
        }
    }

    /// No address yet: the SDK gives one (a free slot at launch, in
    /// [`VmSpec::assign_addresses`](crate::VmSpec::assign_addresses), and at hot-add), and the
    /// spec it returns says which. A desired spec's `auto` address matches any
    /// (`qhotplug::Vm::plan`).
    pub fn auto() -> Self {
        Pci::new("", 0)
    }

    /// True for [`Pci::auto`]: an address the SDK is still to give.
    pub fn is_auto(&self) -> bool {
        self.bus.is_empty()
    }

    /// The `addr` property: `0x9`, or `0x9.0x1` for a function other than 0.
    pub fn addr(&self) -> String {
        if self.function == 0 {
            format!("{:#x}", self.slot)
        } else {
            format!("{:#x}.{:#x}", self.slot, self.function)
        }
    }

    pub(crate) fn props(&self) -> Props {
        vec![p("bus", self.bus.clone()), p("addr", self.addr())]
    }

    /// A device's `id` and its placement here: how every PCI device's properties begin.
    pub(crate) fn with_id(&self, id: &str) -> Props {
        let mut props = vec![p("id", id)];
        props.extend(self.props());
        props
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.slot > 31 || self.function > 7 {
            return Err(Error::InvalidSpec(format!(
                "PCI address {}:{} out of range",
                self.slot, self.function
            )));
        }
        Ok(())
    }
}

/// A SCSI address on a virtio-scsi controller's bus.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ScsiAddr {
    /// The controller's bus, `<controller id>.0`.
    pub bus: String,
    /// The channel (0).
    pub channel: u8,
    /// The target.
    pub scsi_id: u16,
    /// The LUN.
    pub lun: u16,
}

impl ScsiAddr {
    /// No address yet: the SDK gives a free target (on the first SCSI controller at launch, in
    /// [`VmSpec::assign_addresses`](crate::VmSpec::assign_addresses); on any at hot-add), and the
    /// spec it returns says which. A desired spec's `auto` address matches any.
    pub fn auto() -> Self {
        ScsiAddr {
            bus: String::new(),
            channel: 0,
            scsi_id: 0,
            lun: 0,
        }
    }

    /// True for [`ScsiAddr::auto`]: an address the SDK is still to give.
    pub fn is_auto(&self) -> bool {
        self.bus.is_empty()
    }

    pub(crate) fn props(&self) -> Props {
        vec![
            p("bus", self.bus.clone()),
            p("channel", i64::from(self.channel)),
            p("scsi-id", i64::from(self.scsi_id)),
            p("lun", i64::from(self.lun)),
        ]
    }
}

/// The guest-facing side of a disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFrontend {
    /// `virtio-blk-pci` at a PCI address.
    VirtioBlk(Pci),
    /// `scsi-hd` on a virtio-scsi controller.
    ScsiHd(ScsiAddr),
    /// `scsi-generic` (SCSI passthrough of a host `/dev/sgN`) on a virtio-scsi controller.
    ScsiGeneric(ScsiAddr),
}

/// The host-side protocol driver.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskBackend {
    /// A regular file (`file`).
    File,
    /// A block or character device (`host_device`).
    HostDevice,
    /// A network export QEMU opens itself: NBD, iSCSI or Ceph RBD. The disk's `path` is then
    /// its URI, for people.
    Network(Box<NetworkSource>),
}

/// The image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `raw`.
    Raw,
    /// `qcow2`.
    Qcow2,
}

/// Host cache mode, as libvirt names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cache {
    /// Page cache, flushes honoured (QEMU's default).
    #[default]
    Writeback,
    /// `O_DIRECT`, flushes honoured.
    None,
    /// Page cache, flushes ignored (`unsafe`): for throw-away guests only.
    Unsafe,
    /// `O_DIRECT`, flushes honoured, and the guest sees a write-through cache.
    Directsync,
}

impl Cache {
    fn direct(self) -> bool {
        matches!(self, Cache::None | Cache::Directsync)
    }
    fn no_flush(self) -> bool {
        matches!(self, Cache::Unsafe)
    }
}

/// What the guest's disk device does when I/O on its image fails (`rerror`, `werror`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The guest gets the error.
    Report,
    /// The error is dropped; the guest is told the I/O succeeded.
    Ignore,
    /// The VM pauses (`BLOCK_IO_ERROR` with action `stop`); resuming it retries the I/O.
    Stop,
    /// Pause on "no space left", report anything else (writes only; QEMU's default for them).
    Enospc,
}

impl OnError {
    fn as_str(self) -> &'static str {
        match self {
            OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Stop => "stop",
            OnError::Enospc => "enospc",
        }
    }
}

/// A disk's error policy: what its device does when a read or a write fails. QEMU's default:
/// reads report, writes pause on "no space left" and report anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorPolicy {
    /// On a failed read (`rerror`; not [`OnError::Enospc`]).
    pub read: OnError,
    /// On a failed write (`werror`).
    pub write: OnError,
}

impl Default for ErrorPolicy {
    fn default() -> Self {
        ErrorPolicy {
            read: OnError::Report,
            write: OnError::Enospc,
        }
    }
}

impl ErrorPolicy {
    /// The same action on reads and writes.
    pub fn both(on: OnError) -> Self {
        ErrorPolicy {
            read: on,
            write: on,
        }
    }

    /// `rerror`/`werror`, each only where it differs from QEMU's default.
    fn props(self) -> Props {
        let default = ErrorPolicy::default();
        let mut props = Vec::new();
        if self.read != default.read {
            props.push(p("rerror", self.read.as_str()));
        }
        if self.write != default.write {
            props.push(p("werror", self.write.as_str()));
        }
        props
    }
}

/// A disk: image, format, and how the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Disk {
    /// The device id; node names derive from it and [`Disk::generation`] (`<id>-file`,
    /// `<id>-fmt`, then `<id>-file.<n>`, `<id>-fmt.<n>`).
    pub id: String,
    /// The guest side.
    pub frontend: DiskFrontend,
    /// The image (opened by QEMU at boot; by us and passed as an fd at hotplug).
    pub path: PathBuf,
    /// The protocol driver.
    pub backend: DiskBackend,
    /// The format.
    pub format: Format,
    /// Read-only.
    pub read_only: bool,
    /// Host cache mode.
    pub cache: Cache,
    /// I/O limits (`block_set_io_throttle`); `None` for none. QEMU takes them on a device, not on
    /// its command line: a VM launched with them starts paused, gets them, then runs
    /// (`qhotplug::Vm::launch`), and a hot-add sets them right after its `device_add`.
    pub io_limits: Option<qhotplug_qmp::command::IoLimits>,
    /// Which image the disk runs on: 0 for the one it was added with, a new number each time the
    /// SDK put another on top of it or moved it (a snapshot's overlay, a mirror's pivot, a
    /// commit). The node names carry it, so a new image's nodes can exist beside the old one's.
    pub generation: u32,
    /// The images under [`Disk::path`], nearest first: what a live snapshot put it on. Empty for
    /// a disk that is one image.
    pub backing: Vec<DiskLayer>,
    /// What the device does when I/O fails.
    pub on_error: ErrorPolicy,
    /// The disk's checkpoints, oldest first: persistent dirty bitmaps of these names on its top
    /// image (qcow2), each recording the writes from its making until the next one's, the last
    /// still recording. An incremental backup since one copies what it and every later one
    /// recorded. QEMU keeps them in the image across a clean shutdown; this list keeps the order.
    pub checkpoints: Vec<String>,
}

/// One image in a disk's backing chain ([`Disk::backing`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskLayer {
    /// The image.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// The generation its node names carry (`<id>-file.<n>`, `<id>-fmt.<n>`).
    pub generation: u32,
    /// The checkpoints it holds (persistent dirty bitmaps), oldest first. An image keeps them
    /// while it is under the disk's top, so they are the disk's checkpoints again when it comes
    /// back on top (an active commit's pivot).
    pub checkpoints: Vec<String>,
}

impl DiskLayer {
    /// Its node names on disk `id`: the format node, then the protocol node under it.
    pub fn node_names(&self, id: &str) -> [String; 2] {
        [
            crate::names::format_node_at(id, self.generation),
            crate::names::file_node_at(id, self.generation),
        ]
    }
}

impl Disk {
    /// A raw, read-write, writeback disk on a file.
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>, frontend: DiskFrontend) -> Disk {
        Disk {
            id: id.into(),
            frontend,
            path: path.into(),
            backend: DiskBackend::File,
            format: Format::Raw,
            read_only: false,
            cache: Cache::default(),
            io_limits: None,
            generation: 0,
            backing: Vec::new(),
            on_error: ErrorPolicy::default(),
            checkpoints: Vec::new(),
        }
    }

    /// A raw, read-write, writeback `virtio-blk-pci` disk on a file.
    pub fn virtio_blk(id: impl Into<String>, path: impl Into<PathBuf>, pci: Pci) -> Disk {
        Disk::new(id, path, DiskFrontend::VirtioBlk(pci))
    }

    /// A raw, read-write, writeback `scsi-hd` disk on a file.
    pub fn scsi_hd(id: impl Into<String>, path: impl Into<PathBuf>, addr: ScsiAddr) -> Disk {
        Disk::new(id, path, DiskFrontend::ScsiHd(addr))
    }

    /// A raw, read-write, writeback disk on a network export; its `path` is the export's URI.
    pub fn on_network(
        id: impl Into<String>,
        source: impl Into<NetworkSource>,
        frontend: DiskFrontend,
    ) -> Disk {
        let source = source.into();
        Disk {
            backend: DiskBackend::Network(Box::new(source.clone())),
            ..Disk::new(id, source.uri(), frontend)
        }
    }

    /// The protocol node's name.
    pub fn file_node(&self) -> String {
        crate::names::file_node_at(&self.id, self.generation)
    }

    /// The format node's name (what the device's `drive` names), or the protocol node for
    /// `scsi-generic`, which sits on it directly.
    pub fn top_node(&self) -> String {
        match self.frontend {
            DiskFrontend::ScsiGeneric(_) => self.file_node(),
            _ => crate::names::format_node_at(&self.id, self.generation),
        }
    }

    /// What QMP's commands on the disk's block backend (`block_set_io_throttle`) name it by: the
    /// device owning the backend, which for `virtio-blk-pci` is its inner virtio device
    /// (`/machine/peripheral/<id>/virtio-backend`), and for SCSI disks the device itself.
    pub fn backend_device(&self) -> String {
        match self.frontend {
            DiskFrontend::VirtioBlk(_) => {
                format!("{}/virtio-backend", crate::names::peripheral_path(&self.id))
            }
            _ => self.id.clone(),
        }
    }

    /// The id and placement properties (the Ganeti seed form, without the backend).
    pub fn frontend_props(&self) -> Props {
        let mut props = vec![p("id", self.id.clone())];
        props.extend(match &self.frontend {
            DiskFrontend::VirtioBlk(pci) => pci.props(),
            DiskFrontend::ScsiHd(a) | DiskFrontend::ScsiGeneric(a) => a.props(),
        });
        props
    }

    /// The protocol node's properties; `filename` is the path at boot, `/dev/fdset/N` at hotplug
    /// (a network disk has none: QEMU connects to its server).
    pub fn protocol_props(&self, filename: &str) -> Props {
        let mut props = match &self.backend {
            DiskBackend::File => vec![p("driver", "file"), p("filename", filename)],
            DiskBackend::HostDevice => vec![p("driver", "host_device"), p("filename", filename)],
            DiskBackend::Network(source) => source.props(&self.id, 0),
        };
        props.insert(1, p("node-name", self.file_node()));
        props.extend(self.non_default_options());
        props
    }

    /// Its network source, if it is a network disk.
    pub fn network_source(&self) -> Option<&NetworkSource> {
        match &self.backend {
            DiskBackend::Network(source) => Some(source),
            _ => None,
        }
    }

    /// The host files the disk runs on: its image, then its chain's, nearest first; none for a
    /// network disk (its `path` is a URI).
    pub fn image_paths(&self) -> Vec<&Path> {
        if self.network_source().is_some() {
            return Vec::new();
        }
        std::iter::once(self.path.as_path())
            .chain(self.backing.iter().map(|l| l.path.as_path()))
            .collect()
    }

    /// `read-only` and the cache options, only where they differ from QEMU's defaults (all
    /// false): QEMU reads a monitor request a byte at a time, so every byte left out is time saved.
    fn non_default_options(&self) -> Props {
        [
            ("read-only", self.read_only),
            ("cache.direct", self.cache.direct()),
            ("cache.no-flush", self.cache.no_flush()),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(k, on)| p(k, on))
        .collect()
    }

    /// The format node's properties (none for `scsi-generic`).
    pub fn format_props(&self) -> Option<Props> {
        if matches!(self.frontend, DiskFrontend::ScsiGeneric(_)) {
            return None;
        }
        Some(
            vec![
                p(
                    "driver",
                    match self.format {
                        Format::Raw => "raw",
                        Format::Qcow2 => "qcow2",
                    },
                ),
                p("node-name", self.top_node()),
                p("file", self.file_node()),
            ]
            .into_iter()
            .chain(self.non_default_options())
            .collect(),
        )
    }

    /// The image on top, as a layer (what a snapshot puts under a new overlay).
    pub fn top_layer(&self) -> DiskLayer {
        DiskLayer {
            path: self.path.clone(),
            format: self.format,
            generation: self.generation,
            checkpoints: self.checkpoints.clone(),
        }
    }

    /// The disk with `layer` as its top image (the rest of its chain unchanged). Its checkpoints
    /// are the top image's bitmaps: another image brings its own ([`DiskLayer::checkpoints`]).
    pub fn with_top(&self, layer: &DiskLayer) -> Disk {
        let same = layer.generation == self.generation;
        Disk {
            path: layer.path.clone(),
            format: layer.format,
            generation: layer.generation,
            // The image's own checkpoints (none for a new one).
            checkpoints: if same {
                self.checkpoints.clone()
            } else {
                layer.checkpoints.clone()
            },
            ..self.clone()
        }
    }

    /// The next free generation of node names: one above every image's in the chain.
    pub fn next_generation(&self) -> u32 {
        self.backing
            .iter()
            .map(|l| l.generation)
            .chain([self.generation])
            .max()
            .unwrap_or(0)
            .wrapping_add(1)
    }

    /// The node names of every image, top first, each format node before its protocol node.
    pub fn node_names(&self) -> Vec<String> {
        let mut nodes = vec![self.top_node()];
        if self.top_node() != self.file_node() {
            nodes.push(self.file_node());
        }
        for layer in &self.backing {
            nodes.extend(layer.node_names(&self.id));
        }
        nodes
    }

    /// Every node of a disk with a backing chain, bottom first, as `blockdev-add` arguments: each
    /// format node names the one under it as `backing` (the lowest a null one, for qcow2), so
    /// QEMU opens the chain the SDK knows rather than what the images' headers say.
    fn chain_blockdevs(&self) -> Vec<BlockdevAdd> {
        let mut layers: Vec<DiskLayer> = self.backing.iter().rev().cloned().collect();
        layers.push(self.top_layer());
        let mut out = Vec::new();
        let mut below: Option<String> = None;
        for layer in &layers {
            let mut nodes = self
                .with_top(layer)
                .blockdev_add(&layer.path.to_string_lossy());
            if let Some(fmt) = nodes.get_mut(1) {
                let backing = match (&below, layer.format) {
                    (Some(node), _) => Some(serde_json::Value::String(node.clone())),
                    (None, Format::Qcow2) => Some(serde_json::Value::Null),
                    (None, Format::Raw) => None,
                };
                if let Some(backing) = backing {
                    fmt.props.insert("backing".into(), backing);
                }
                below = Some(fmt.node_name.clone());
            }
            out.extend(nodes);
        }
        out
    }

    /// Launch arguments: `-blockdev` (protocol, then format) and `-device`. A disk with a
    /// backing chain gives every node, bottom first, in QEMU's JSON form (keyval has no null).
    /// A network disk's TLS credentials come first as an `-object`; its secret is the
    /// launcher's to give (it needs the VM's master key).
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = self
            .network_source()
            .and_then(|n| n.tls_object(&self.id, 0))
            .map(|tls| tls.args().to_vec())
            .unwrap_or_default();
        args.extend(self.node_and_device_args());
        args
    }

    fn node_and_device_args(&self) -> Vec<String> {
        if !self.backing.is_empty() {
            let mut args = Vec::new();
            for node in self.chain_blockdevs() {
                let json = serde_json::to_string(&node).expect("a blockdev is JSON");
                args.extend(["-blockdev".to_owned(), json]);
            }
            args.extend(["-device".to_owned(), self.device_arg()]);
            return args;
        }
        let mut args = vec![
            "-blockdev".to_owned(),
            render_kv(&self.protocol_props(&self.path.to_string_lossy())),
        ];
        if let Some(format) = self.format_props() {
            args.extend(["-blockdev".to_owned(), render_kv(&format)]);
        }
        args.extend(["-device".to_owned(), self.device_arg()]);
        args
    }

    /// `blockdev-add` arguments: the protocol node, then the format node when there is one.
    pub fn blockdev_add(&self, filename: &str) -> Vec<BlockdevAdd> {
        let mut out = vec![blockdev(&self.protocol_props(filename))];
        out.extend(self.format_props().as_deref().map(blockdev));
        out
    }
}

impl DeviceModel for Disk {
    fn id(&self) -> &str {
        &self.id
    }

    /// The device model.
    fn driver(&self) -> &str {
        match self.frontend {
            DiskFrontend::VirtioBlk(_) => "virtio-blk-pci",
            DiskFrontend::ScsiHd(_) => "scsi-hd",
            DiskFrontend::ScsiGeneric(_) => "scsi-generic",
        }
    }

    /// Checks ids, node names and addresses.
    fn check(&self) -> Result<()> {
        validate_id(&self.id)?;
        if self.file_node().len() > 31 {
            return Err(Error::InvalidId {
                id: self.id.clone(),
                reason: "too long for a block node name (26 bytes at most)",
            });
        }
        if let DiskFrontend::VirtioBlk(pci) = &self.frontend {
            pci.check()?;
        }
        if self.on_error.read == OnError::Enospc {
            return Err(Error::InvalidSpec(format!(
                "{}: `enospc` is a policy for writes, not reads",
                self.id
            )));
        }
        if matches!(self.frontend, DiskFrontend::ScsiGeneric(_))
            && self.backend != DiskBackend::HostDevice
        {
            return Err(Error::InvalidSpec(format!(
                "{}: scsi-generic needs a host_device backend",
                self.id
            )));
        }
        Ok(())
    }

    /// Every device property: placement, then `drive`, then the error policy where it is not
    /// QEMU's default (`scsi-generic` has none).
    fn device_props(&self) -> Props {
        let mut props = self.frontend_props();
        props.push(p("drive", self.top_node()));
        if !matches!(self.frontend, DiskFrontend::ScsiGeneric(_)) {
            props.extend(self.on_error.props());
        }
        props
    }
}

pub(crate) fn render_kv(props: &[(String, Prop)]) -> String {
    let s = render("", props);
    s.strip_prefix(',').unwrap_or(&s).to_owned()
}

/// A `virtio-net-pci` NIC on a tap.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Nic {
    /// The device id; the netdev is `<id>-net`.
    pub id: String,
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// Queue pairs (one tap fd each).
    pub queues: u16,
    /// Where it sits.
    pub pci: Pci,
    /// Use vhost-net (one vhost fd per queue).
    pub vhost: bool,
    /// The link is up (the default). QEMU has no command-line option for a NIC's link: a VM
    /// launched with it down gets `set_link` as soon as QEMU is up (`qhotplug::Vm::launch`).
    pub link_up: bool,
}

impl Nic {
    /// The netdev's id.
    pub fn netdev_id(&self) -> String {
        crate::names::netdev(&self.id)
    }

    /// The id and placement properties (the Ganeti seed form).
    pub fn frontend_props(&self) -> Props {
        self.pci.with_id(&self.id)
    }

    /// The netdev's properties. `tap_fds`/`vhost_fds` are fd numbers (at boot) or `getfd` names (at
    /// hotplug), one per queue.
    pub fn netdev_props(&self, tap_fds: &[String], vhost_fds: &[String]) -> Props {
        let mut props = vec![p("id", self.netdev_id())];
        if tap_fds.len() == 1 {
            props.push(p("fd", tap_fds[0].clone()));
        } else {
            props.push(p("fds", tap_fds.join(":")));
        }
        if !vhost_fds.is_empty() {
            props.push(p("vhost", true));
            let key = if vhost_fds.len() == 1 {
                "vhostfd"
            } else {
                "vhostfds"
            };
            props.push(p(key, vhost_fds.join(":")));
        }
        props
    }

    /// Launch arguments: `-netdev` and `-device`.
    pub fn args(&self, tap_fds: &[String], vhost_fds: &[String]) -> Vec<String> {
        vec![
            "-netdev".into(),
            render("tap", &self.netdev_props(tap_fds, vhost_fds)),
            "-device".into(),
            self.device_arg(),
        ]
    }

    /// `netdev_add` arguments.
    pub fn netdev_add(&self, tap_fds: &[String], vhost_fds: &[String]) -> NetdevAdd {
        let mut map = props_to_json(&self.netdev_props(tap_fds, vhost_fds));
        let id = map
            .remove("id")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        NetdevAdd {
            kind: "tap".into(),
            id,
            props: map,
        }
    }
}

impl DeviceModel for Nic {
    fn id(&self) -> &str {
        &self.id
    }

    fn driver(&self) -> &str {
        "virtio-net-pci"
    }

    /// Checks the id, queues and address.
    fn check(&self) -> Result<()> {
        validate_id(&self.id)?;
        if !(1..=256).contains(&self.queues) {
            return Err(Error::InvalidSpec(format!(
                "{}: {} queues (1 to 256)",
                self.id, self.queues
            )));
        }
        if !self.mac.is_unicast() {
            return Err(Error::InvalidSpec(format!(
                "{}: MAC {} is not unicast",
                self.id, self.mac
            )));
        }
        self.pci.check()
    }

    /// Every device property: placement, `netdev`, `mac`, and `mq`/`vectors` (2N+2) for N > 1.
    fn device_props(&self) -> Props {
        let mut props = self.frontend_props();
        props.push(p("netdev", self.netdev_id()));
        props.push(p("mac", self.mac.to_string()));
        if self.queues > 1 {
            props.push(p("mq", true));
            props.push(p("vectors", 2 * i64::from(self.queues) + 2));
        }
        props
    }
}

/// A `virtio-scsi-pci` controller; its bus is `<id>.0`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScsiController {
    /// The id.
    pub id: String,
    /// Where it sits.
    pub pci: Pci,
}

impl ScsiController {
    /// The bus its disks plug into.
    pub fn bus(&self) -> String {
        crate::names::controller_bus(&self.id)
    }

    /// Launch arguments.
    pub fn args(&self) -> Vec<String> {
        let props = self.pci.with_id(&self.id);
        vec!["-device".into(), render("virtio-scsi-pci", &props)]
    }
}

/// A `pcie-root-port` on `q35`: one hot-pluggable device sits behind each.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RootPort {
    /// The id (the bus name of the device behind it).
    pub id: String,
    /// The chassis number (unique per port).
    pub chassis: u8,
    /// Its address on `pcie.0`.
    pub pci: Pci,
}

impl RootPort {
    /// Launch arguments.
    pub fn args(&self) -> Vec<String> {
        let mut props = vec![
            p("id", self.id.clone()),
            p("chassis", i64::from(self.chassis)),
        ];
        props.extend(self.pci.props());
        vec!["-device".into(), render("pcie-root-port", &props)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::parse;
    use proptest::prelude::*;
    use qhotplug_qmp::command::DeviceAdd;
    use serde_json::Value;

    fn mac() -> MacAddr {
        "52:54:00:12:34:56".parse().unwrap()
    }

    #[test]
    fn golden_seed_forms() {
        let disk = Disk::virtio_blk("disk-1234", "/img", Pci::new("pci.0", 9));
        assert_eq!(
            render(disk.driver(), &disk.frontend_props()),
            "virtio-blk-pci,id=disk-1234,bus=pci.0,addr=0x9"
        );
        let nic = Nic {
            id: "nic-1234".into(),
            mac: mac(),
            queues: 1,
            pci: Pci::new("pci.0", 9),
            vhost: false,
            link_up: true,
        };
        assert_eq!(
            render("virtio-net-pci", &nic.frontend_props()),
            "virtio-net-pci,id=nic-1234,bus=pci.0,addr=0x9"
        );
        let sg = Disk {
            frontend: DiskFrontend::ScsiGeneric(ScsiAddr {
                bus: "scsi.0".into(),
                channel: 0,
                scsi_id: 1,
                lun: 0,
            }),
            backend: DiskBackend::HostDevice,
            ..Disk::virtio_blk("disk-1234", "/dev/sg0", Pci::new("pci.0", 9))
        };
        assert_eq!(
            render(sg.driver(), &sg.frontend_props()),
            "scsi-generic,id=disk-1234,bus=scsi.0,channel=0,scsi-id=1,lun=0"
        );
        assert_eq!(
            Pci {
                bus: "pci.0".into(),
                slot: 0x1f,
                function: 3
            }
            .addr(),
            "0x1f.0x3"
        );
    }

    #[test]
    fn nic_queues_set_mq_and_vectors() {
        let nic = Nic {
            id: "nic0".into(),
            mac: mac(),
            queues: 2,
            pci: Pci::new("pci.0", 4),
            vhost: true,
            link_up: true,
        };
        let args = nic.args(&["3".into(), "4".into()], &["5".into(), "6".into()]);
        assert_eq!(args[1], "tap,id=nic0-net,fds=3:4,vhost=on,vhostfds=5:6");
        assert_eq!(args[3], "virtio-net-pci,id=nic0,bus=pci.0,addr=0x4,netdev=nic0-net,mac=52:54:00:12:34:56,mq=on,vectors=6");
        let add = nic.netdev_add(&["t0".into(), "t1".into()], &[]);
        assert_eq!(
            serde_json::to_value(&add).unwrap(),
            serde_json::json!({"type": "tap", "id": "nic0-net", "fds": "t0:t1"})
        );
    }

    #[test]
    fn dotted_keys_nest_in_qmp() {
        let disk = Disk {
            cache: Cache::None,
            ..Disk::virtio_blk("d", "/a,b", Pci::new("pci.0", 5))
        };
        let adds = disk.blockdev_add("/dev/fdset/3");
        assert_eq!(
            serde_json::to_value(&adds[0]).unwrap(),
            serde_json::json!({"driver": "file", "node-name": "d-file", "filename": "/dev/fdset/3",
                               "cache": {"direct": true}})
        );
        assert_eq!(
            disk.args()[1],
            "driver=file,node-name=d-file,filename=/a,,b,cache.direct=on"
        );
        // Defaults are left out; what differs from them is said.
        let plain = Disk::virtio_blk("p", "/p", Pci::new("pci.0", 6));
        assert_eq!(
            serde_json::to_value(&plain.blockdev_add("/dev/fdset/4")[1]).unwrap(),
            serde_json::json!({"driver": "raw", "node-name": "p-fmt", "file": "p-file"})
        );
        let ro = Disk {
            read_only: true,
            cache: Cache::Unsafe,
            ..plain
        };
        assert_eq!(
            serde_json::to_value(&ro.blockdev_add("/dev/fdset/4")[1]).unwrap(),
            serde_json::json!({"driver": "raw", "node-name": "p-fmt", "file": "p-file",
                               "read-only": true, "cache": {"no-flush": true}})
        );
    }

    /// The `-device` string, parsed back the way QEMU parses it, equals the `device_add` arguments.
    fn assert_same(driver: &str, args: &[String], add: &DeviceAdd) {
        let device = &args[args.iter().rposition(|a| a == "-device").unwrap() + 1];
        let (parsed_driver, pairs) = parse(device);
        assert_eq!(parsed_driver, driver);
        let qmp = serde_json::to_value(add).unwrap();
        let qmp = qmp.as_object().unwrap();
        assert_eq!(qmp["driver"], driver);
        assert_eq!(pairs.len() + 1, qmp.len(), "{device} vs {qmp:?}");
        for (k, v) in pairs {
            let cli = match &qmp[&k] {
                Value::String(s) => s.clone(),
                Value::Bool(b) => if *b { "on" } else { "off" }.to_owned(),
                other => other.to_string(),
            };
            assert_eq!(cli, v, "property {k}");
        }
    }

    fn id() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9._-]{0,15}"
    }

    fn pci() -> impl Strategy<Value = Pci> {
        (
            prop_oneof![Just("pci.0".to_owned()), Just("pcie.0".to_owned()), id()],
            0u8..32,
            0u8..8,
        )
            .prop_map(|(bus, slot, function)| Pci {
                bus,
                slot,
                function,
            })
    }

    proptest! {
        #[test]
        fn disks_render_the_same_both_ways(id in id(), path in "[/a-z,=.]{1,30}", pci in pci(), scsi in proptest::option::of((0u16..256, 0u16..64)), ro: bool, fmt: bool) {
            let frontend = match scsi {
                Some((t, l)) => DiskFrontend::ScsiHd(ScsiAddr { bus: "scsi0.0".into(), channel: 0, scsi_id: t, lun: l }),
                None => DiskFrontend::VirtioBlk(pci),
            };
            let disk = Disk { id, frontend, path: path.into(), backend: DiskBackend::File,
                              format: if fmt { Format::Qcow2 } else { Format::Raw }, read_only: ro, cache: Cache::Writeback, io_limits: None, generation: 0,
                              backing: Vec::new(), on_error: ErrorPolicy::default(), checkpoints: Vec::new() };
            assert_same(disk.driver(), &disk.args(), &disk.device_add());
            // The -blockdev strings parse back to the image path exactly, commas and all.
            let (_, pairs) = parse(&disk.args()[1]);
            let filename = pairs.iter().find(|(k, _)| k == "filename").unwrap();
            prop_assert_eq!(&filename.1, &disk.path.to_string_lossy().into_owned());
        }

        #[test]
        fn nics_render_the_same_both_ways(id in id(), pci in pci(), queues in 1u16..9, mac in any::<[u8; 6]>()) {
            let mut mac = mac;
            mac[0] &= !1;
            let nic = Nic { id, mac: MacAddr(mac), queues, pci, vhost: false, link_up: true };
            let fds: Vec<String> = (0..queues).map(|q| (10 + q).to_string()).collect();
            assert_same("virtio-net-pci", &nic.args(&fds, &[]), &nic.device_add());
        }
    }
}
