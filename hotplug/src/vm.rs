//! The VM handle: hot-add and hot-remove of disks and NICs, and what the SDK knows of the VM.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use qhotplug_cmdline::{
    Disk, DiskFrontend, Launcher, Machine, Nic, Pci, QemuProcess, ScsiAddr, VmSpec,
};
use qhotplug_netdev::{open_vhost, MacAddr, Vhost};
use qhotplug_qmp::command::{AddFd, DeviceDel, QomList, QueryPci, RemoveFd};
use qhotplug_qmp::event::EventKind;
use qhotplug_qmp::message::VersionTriple;
use qhotplug_qmp::{Client, Lagged};
use tracing::Instrument;

use crate::config::{At, DiskConfig, DiskModel, NicConfig};
use crate::error::{Error, Result};
use crate::slots::{PciMap, ScsiMap, SlotError};
use crate::txn::{is_absent, Outcome, Transaction, Undo};

/// What [`Vm::reconcile`] found and fixed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Devices the SDK listed that QEMU no longer has (an unplug that completed late, a removal
    /// that was cancelled): dropped from the SDK's view, their slots freed.
    pub gone: Vec<String>,
    /// Block nodes of ours that no device used any more, deleted.
    pub nodes_deleted: Vec<String>,
    /// Netdevs of ours that no device used any more, deleted.
    pub netdevs_deleted: Vec<String>,
    /// Fd sets of ours (tagged `qhotplug:<id>`) that no node held, removed.
    pub fdsets_removed: Vec<i64>,
}

/// The oldest QEMU the SDK drives: 5.0, the first whose `query-named-block-nodes` takes `flat`
/// (what `reconcile` lists block nodes with). Every later piece it uses (`blockdev-add`, `add-fd`
/// with `opaque`, `qom-list`/`qom-get`, `DEVICE_DELETED` with the device's id) is older still.
/// Tested: 7.2 and 10.0.
pub const MIN_QEMU: VersionTriple = VersionTriple {
    major: 5,
    minor: 0,
    micro: 0,
};

/// How long a hot-remove waits for the guest by default.
pub const DEFAULT_UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

const DISK_COMMANDS: &[&str] = &[
    "add-fd",
    "remove-fd",
    "query-fdsets",
    "blockdev-add",
    "blockdev-del",
    "device_add",
    "device_del",
];
const NIC_COMMANDS: &[&str] = &[
    "getfd",
    "closefd",
    "netdev_add",
    "netdev_del",
    "device_add",
    "device_del",
];

/// A running QEMU that the SDK hot-plugs into. Cheap to clone; every clone drives the same VM, and
/// hotplugs through clones run concurrently. A VM launched with [`Vm::launch`] is killed when the
/// last clone is dropped (use [`Vm::quit`] for an orderly exit).
///
/// ```no_run
/// use qhotplug::{DiskConfig, Vm};
/// use qhotplug_cmdline::{Launcher, Machine, VmSpec};
/// # async fn demo() -> qhotplug::Result<()> {
/// let mut spec = VmSpec::new("demo", Machine::Pc);
/// spec.paused = true;
/// let vm = Vm::launch(Launcher::new(spec, "/run/qhotplug/demo")).await?;
/// let disk = vm.add_disk(DiskConfig::virtio_blk("data-1", "/var/lib/images/data-1.raw")).await?;
/// println!("data-1 is at {:?}", disk.frontend);
/// assert!(vm.has_device("data-1").await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Vm {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.inner.state().spec.name)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    client: Client,
    state: Mutex<State>,
    process: Mutex<Option<QemuProcess>>,
    /// Rollbacks of cancelled hot-adds, running in the background.
    rollbacks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

struct State {
    spec: VmSpec,
    pci: PciMap,
    scsi: ScsiMap,
    devices: HashMap<String, Entry>,
    /// Every id a hot-add through this handle used: what `reconcile` may clean up after.
    touched: HashSet<String>,
    unplug_timeout: Duration,
}

/// What the SDK knows of a device id besides its description, which lives in `State::spec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// A hot-add holds the id.
    Adding,
    /// A disk in `spec.disks`; `busy` while a removal runs.
    Disk { busy: bool },
    /// A NIC in `spec.nics`; `busy` while a removal runs.
    Nic { busy: bool },
}

/// A device as placed, for committing a hot-add.
enum Added {
    Disk(Disk),
    Nic(Nic),
}

/// Where a device sits, for the slot maps.
#[derive(Debug, Clone)]
pub(crate) enum Place {
    Pci(Pci),
    Scsi(ScsiAddr),
}

impl Inner {
    /// Keeps a background rollback's handle, so [`Vm::reconcile`] can wait for it.
    pub(crate) fn track_rollback(&self, task: tokio::task::JoinHandle<()>) {
        let mut tasks = self.rollbacks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way later calls
        // rely on, so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn release(&mut self, place: &Place) {
        match place {
            Place::Pci(pci) => self.pci.release(pci),
            Place::Scsi(addr) => self.scsi.release(addr),
        }
    }

    /// Drops a device that is gone from QEMU: its entry, its slot, its place in the spec.
    fn forget(&mut self, id: &str) {
        self.devices.remove(id);
        let place = if let Some(at) = self.spec.disks.iter().position(|d| d.id == id) {
            place_of_disk(&self.spec.disks.remove(at))
        } else if let Some(at) = self.spec.nics.iter().position(|n| n.id == id) {
            Place::Pci(self.spec.nics.remove(at).pci)
        } else {
            return;
        };
        self.release(&place);
    }
}

fn place_of_disk(disk: &Disk) -> Place {
    match &disk.frontend {
        DiskFrontend::VirtioBlk(p) => Place::Pci(p.clone()),
        DiskFrontend::ScsiHd(a) | DiskFrontend::ScsiGeneric(a) => Place::Scsi(a.clone()),
    }
}

/// An id and an address held for a hot-add. Dropped uncommitted, it frees both.
pub(crate) struct Reservation {
    inner: Arc<Inner>,
    id: String,
    place: Place,
    armed: bool,
}

impl Reservation {
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }

    /// Keeps the id and address taken forever (until a reconcile): used when a rollback could not
    /// run, so nothing reuses what QEMU may still hold.
    pub(crate) fn leak(mut self) {
        self.armed = false;
    }

    fn commit(mut self, added: Added) {
        self.armed = false;
        let mut state = self.inner.state();
        let entry = match added {
            Added::Disk(disk) => {
                state.spec.disks.push(disk);
                Entry::Disk { busy: false }
            }
            Added::Nic(nic) => {
                state.spec.nics.push(nic);
                Entry::Nic { busy: false }
            }
        };
        state.devices.insert(self.id.clone(), entry);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.inner.state();
            state.devices.remove(&self.id);
            state.release(&self.place);
        }
    }
}

/// Marks a device busy for a removal; clears the mark when dropped.
struct Busy {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(Entry::Disk { busy, .. } | Entry::Nic { busy, .. }) =
            self.inner.state().devices.get_mut(&self.id)
        {
            *busy = false;
        }
    }
}

fn slot_error(e: SlotError) -> Error {
    match e {
        SlotError::Full { bus } => Error::NoFreeSlot { bus },
        SlotError::Taken { bus, slot } => Error::AddressTaken { bus, slot },
    }
}

/// What QEMU's QOM tree says about its devices.
struct Peripherals {
    /// The ids of the devices made with one (`/machine/peripheral`).
    ids: HashSet<String>,
    /// The buses of the virtio-scsi controllers (`<id>.0`).
    scsi_buses: Vec<String>,
    /// Where every PCI device sits: each device's `parent_bus` (a path ending in the bus name) and
    /// `addr` (slot × 8 + function). Unlike `query-pci`, this does not depend on the firmware having
    /// numbered the buses, so it sees what sits behind q35 root ports on a VM that has not run yet.
    placements: Vec<Pci>,
}

async fn scan_peripherals(client: &Client) -> Result<Peripherals> {
    let mut found = Peripherals {
        ids: HashSet::new(),
        scsi_buses: Vec::new(),
        placements: Vec::new(),
    };
    let mut paths = Vec::new();
    for container in ["/machine/peripheral", "/machine/peripheral-anon"] {
        let children = client
            .execute(&QomList {
                path: container.into(),
            })
            .await?;
        for child in children {
            let Some(kind) = child.child_type() else {
                continue;
            };
            if container == "/machine/peripheral" {
                if kind == "virtio-scsi-pci" {
                    found.scsi_buses.push(format!("{}.0", child.name));
                }
                found.ids.insert(child.name.clone());
            }
            paths.push(format!("{container}/{}", child.name));
        }
    }
    let get = |path: &str, property: &'static str| {
        let args = serde_json::json!({"path": path, "property": property});
        async move { client.execute_raw("qom-get", &args).await }
    };
    // All asked at once: the connection pipelines them.
    let places = futures::future::join_all(
        paths
            .iter()
            .map(|path| futures::future::join(get(path, "parent_bus"), get(path, "addr"))),
    )
    .await;
    for (bus, addr) in places {
        // Not a PCI device (no `addr`), or one going away right now: nothing to mark.
        let (Ok(bus), Ok(addr)) = (bus, addr) else {
            continue;
        };
        let (Some(bus), Some(addr)) = (bus.as_str(), addr.as_u64()) else {
            continue;
        };
        if let Some(name) = bus.rsplit('/').next().filter(|n| !n.is_empty()) {
            found.placements.push(Pci {
                bus: name.to_owned(),
                slot: u8::try_from(addr >> 3).unwrap_or(u8::MAX),
                function: (addr & 7) as u8,
            });
        }
    }
    Ok(found)
}

impl Vm {
    /// Launches QEMU with `launcher` and attaches to it. The launcher's spec is the starting
    /// topology: its disks and NICs can be hot-removed like hot-added ones.
    pub async fn launch(launcher: Launcher) -> Result<Vm> {
        let spec = launcher.spec().clone();
        let (client, process) = launcher.launch().await.map_err(Error::Launch)?;
        Self::attach_inner(client, spec, Some(process)).await
    }

    /// Attaches to a running QEMU through its monitor. `spec` says what the caller knows of the
    /// VM: its root ports, SCSI controllers and devices; the machine type is QEMU's own. What QEMU
    /// reports is added to it: root ports and occupied PCI slots from `query-pci` and from each
    /// device's QOM `parent_bus` and `addr` (which also covers what sits behind root ports before
    /// the firmware has run), and virtio-scsi controllers from `qom-list`.
    pub async fn attach(client: Client, spec: VmSpec) -> Result<Vm> {
        Self::attach_inner(client, spec, None).await
    }

    async fn attach_inner(
        client: Client,
        mut spec: VmSpec,
        process: Option<QemuProcess>,
    ) -> Result<Vm> {
        let found = client.greeting().version.qemu;
        if found < MIN_QEMU {
            return Err(Error::QemuTooOld {
                found,
                minimum: MIN_QEMU,
            });
        }
        let machine_type = client
            .execute_raw(
                "qom-get",
                &serde_json::json!({"path": "/machine", "property": "type"}),
            )
            .await?;
        if let Some(t) = machine_type.as_str() {
            spec.machine = if t.contains("q35") {
                Machine::Q35
            } else {
                Machine::Pc
            };
        }
        let mut pci = PciMap::new(spec.machine);
        for port in &spec.root_ports {
            pci.add_root_port(&port.id, None);
        }
        pci.fill_from(&client.execute(&QueryPci).await?);
        let found = scan_peripherals(&client).await?;
        for placed in &found.placements {
            pci.mark(placed);
        }

        let mut scsi = ScsiMap::default();
        for bus in spec
            .scsi_controllers
            .iter()
            .map(|c| c.bus())
            .chain(found.scsi_buses)
        {
            scsi.add_bus(&bus);
        }

        let mut devices = HashMap::new();
        for disk in &spec.disks {
            match &disk.frontend {
                DiskFrontend::VirtioBlk(a) => pci.mark(a),
                DiskFrontend::ScsiHd(a) | DiskFrontend::ScsiGeneric(a) => {
                    let _ = scsi.claim(a);
                }
            }
            devices.insert(disk.id.clone(), Entry::Disk { busy: false });
        }
        for nic in &spec.nics {
            pci.mark(&nic.pci);
            devices.insert(nic.id.clone(), Entry::Nic { busy: false });
        }
        let state = State {
            spec,
            pci,
            scsi,
            devices,
            touched: HashSet::new(),
            unplug_timeout: DEFAULT_UNPLUG_TIMEOUT,
        };
        Ok(Vm {
            inner: Arc::new(Inner {
                client,
                state: Mutex::new(state),
                process: Mutex::new(process),
                rollbacks: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The QMP client, for commands and events of your own.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The VM's current topology: the spec it was launched (or attached) with, with every device
    /// hot-added since and without every device hot-removed. A VM launched from it has the same
    /// devices at the same addresses (restart, migration target). NIC tap fds are the caller's to
    /// give again ([`Launcher::nic_fds`]).
    pub fn spec(&self) -> VmSpec {
        self.inner.state().spec.clone()
    }

    /// The disks the SDK knows of, by id.
    pub fn disks(&self) -> Vec<Disk> {
        self.inner.state().spec.disks.clone()
    }

    /// The NICs the SDK knows of, by id.
    pub fn nics(&self) -> Vec<Nic> {
        self.inner.state().spec.nics.clone()
    }

    /// The QEMU process id, when the SDK launched it.
    pub fn pid(&self) -> Option<u32> {
        self.inner
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(QemuProcess::pid)
    }

    /// How long hot-removes wait for the guest to release a device (default 10 s).
    pub fn set_unplug_timeout(&self, timeout: Duration) {
        self.inner.state().unplug_timeout = timeout;
    }

    /// Asks QEMU to exit (`quit`) and, when the SDK launched it, waits for the process to end.
    pub async fn quit(&self) -> Result<()> {
        match self.client().execute(&qhotplug_qmp::command::Quit).await {
            Ok(_) | Err(qhotplug_qmp::Error::Disconnected) => {}
            Err(e) => return Err(e.into()),
        }
        let process = self
            .inner
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut process) = process {
            process
                .wait()
                .await
                .map_err(|e| Error::Launch(qhotplug_cmdline::Error::Io(e)))?;
        }
        Ok(())
    }

    /// True when QEMU has a device with this id (from `qom-list /machine/peripheral`), whether or
    /// not the SDK added it.
    pub async fn has_device(&self, id: &str) -> Result<bool> {
        let list = self
            .client()
            .execute(&QomList {
                path: "/machine/peripheral".into(),
            })
            .await?;
        Ok(list
            .iter()
            .any(|p| p.name == id && p.child_type().is_some()))
    }

    async fn require(&self, operation: &'static str, needed: &[&str]) -> Result<()> {
        let schema = self.client().schema().await?;
        match needed.iter().find(|c| !schema.has_command(c)) {
            Some(missing) => Err(Error::Unsupported {
                command: (*missing).to_owned(),
                operation,
            }),
            None => Ok(()),
        }
    }

    /// Checks, from QEMU's own schema (read once per connection), that this QEMU has every
    /// command disk hotplug uses; the error names the first one missing.
    pub async fn check_disk_hotplug(&self) -> Result<()> {
        self.require("disk hotplug", DISK_COMMANDS).await
    }

    /// Checks that this QEMU has every command NIC hotplug uses.
    pub async fn check_nic_hotplug(&self) -> Result<()> {
        self.require("NIC hotplug", NIC_COMMANDS).await
    }

    /// Checks that a `scsi-hd` can be hot-added: disk hotplug works and the VM has a virtio-scsi
    /// controller.
    pub async fn check_scsi_hotplug(&self) -> Result<()> {
        self.check_disk_hotplug().await?;
        if !self.inner.state().scsi.has_buses() {
            return Err(Error::NoScsiController("scsi-hd".into()));
        }
        Ok(())
    }

    /// Brings the SDK's view back in line with QEMU's, from `qom-list`, `query-pci`,
    /// `query-named-block-nodes` and `query-fdsets`: after a hot-add or hot-remove future was
    /// dropped part-way, after an unplug that was reported pending completed, or after a rollback
    /// could not finish.
    ///
    /// It first waits for the background rollbacks of cancelled hot-adds. Then devices the SDK
    /// lists but QEMU no longer has are dropped from the view (their slots freed) and their
    /// backends deleted; block nodes, netdevs and fd sets left behind by hot-adds through this
    /// handle are deleted; and every PCI slot QEMU reports is marked taken. Devices being added or
    /// removed by a call still running are left alone; so is everything this handle never made.
    pub async fn reconcile(&self) -> Result<Reconciled> {
        let span = tracing::info_span!("hotplug", op = "reconcile");
        self.reconcile_inner().instrument(span).await
    }

    async fn reconcile_inner(&self) -> Result<Reconciled> {
        let rollbacks = std::mem::take(
            &mut *self
                .inner
                .rollbacks
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for task in rollbacks {
            let _ = task.await;
        }
        let client = self.client();
        let pci = client.execute(&QueryPci).await?;
        let found = scan_peripherals(client).await?;
        let present = &found.ids;
        let nodes: HashSet<String> = client
            .execute(&qhotplug_qmp::command::QueryNamedBlockNodes { flat: Some(true) })
            .await?
            .into_iter()
            .filter_map(|n| n.node_name)
            .collect();
        let fdsets = client.execute(&qhotplug_qmp::command::QueryFdsets).await?;

        let mut report = Reconciled::default();
        // Ids whose leftovers may go: touched by us, not a device in QEMU, and not in use by a
        // running call.
        let orphans = {
            let mut state = self.inner.state();
            let gone: Vec<String> = state
                .devices
                .iter()
                .filter(|(id, e)| {
                    matches!(
                        e,
                        Entry::Disk { busy: false, .. } | Entry::Nic { busy: false, .. }
                    ) && !present.contains(*id)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in &gone {
                state.forget(id);
            }
            state.pci.fill_from(&pci);
            for p in &found.placements {
                state.pci.mark(p);
            }
            // Leftovers may belong to the devices just found gone, or to ids this handle used.
            let orphans: std::collections::BTreeSet<String> = state
                .touched
                .iter()
                .filter(|id| !present.contains(*id) && !state.devices.contains_key(*id))
                .chain(&gone)
                .cloned()
                .collect();
            report.gone = gone;
            orphans
        };
        for id in &orphans {
            // The same steps a rollback would take, for what is there (netdevs cannot be listed
            // on QEMU 7.2: ours is asked for, and "not found" is the usual answer).
            let tag = format!("qhotplug:{id}");
            let mut steps: Vec<Undo> = fdsets
                .iter()
                .filter(|set| set.fds.iter().any(|f| f.opaque.as_ref() == Some(&tag)))
                .map(|set| Undo::RemoveFd {
                    fdset: Some(set.fdset_id),
                    opaque: tag.clone(),
                })
                .collect();
            steps.push(Undo::NetdevDel(format!("{id}-net")));
            for node in [format!("{id}-fmt"), format!("{id}-file")] {
                if nodes.contains(&node) {
                    steps.push(Undo::BlockdevDel(node));
                }
            }
            for step in steps {
                match step.run(client).await {
                    Err(e) => tracing::warn!(%step, error = %e, "reconcile: left in place"),
                    Ok(Outcome::Absent) => {}
                    Ok(Outcome::Done) => match step {
                        Undo::RemoveFd {
                            fdset: Some(set), ..
                        } => report.fdsets_removed.push(set),
                        Undo::BlockdevDel(node) => report.nodes_deleted.push(node),
                        Undo::NetdevDel(netdev) => report.netdevs_deleted.push(netdev),
                        _ => {}
                    },
                }
            }
        }
        {
            // What is clean now needs no second look.
            let mut state = self.inner.state();
            for id in &orphans {
                state.touched.remove(id);
            }
        }
        tracing::info!(?report, "reconciled");
        Ok(report)
    }

    /// Takes the id and an address for a hot-add.
    fn reserve(&self, id: &str, at: &At, pci_device: bool) -> Result<(Reservation, Place)> {
        qhotplug_cmdline::validate_id(id)?;
        let mut state = self.inner.state();
        if state.devices.contains_key(id) {
            return Err(Error::DuplicateId(id.to_owned()));
        }
        let place = match (at, pci_device) {
            (At::Auto { .. }, true) => Place::Pci(state.pci.allocate().map_err(slot_error)?),
            (At::Auto { scsi_bus }, false) => {
                if !state.scsi.has_buses() {
                    return Err(Error::NoScsiController(id.to_owned()));
                }
                Place::Scsi(
                    state
                        .scsi
                        .allocate(scsi_bus.as_deref())
                        .map_err(slot_error)?,
                )
            }
            (At::Pci(pci), true) => {
                state.pci.claim(pci).map_err(slot_error)?;
                Place::Pci(pci.clone())
            }
            (At::Scsi(addr), false) => {
                state.scsi.claim(addr).map_err(slot_error)?;
                Place::Scsi(addr.clone())
            }
            (At::Pci(_), false) | (At::Scsi(_), true) => {
                return Err(Error::Spec(qhotplug_cmdline::Error::InvalidSpec(format!(
                    "{id}: the address does not fit the device model"
                ))))
            }
        };
        state.devices.insert(id.to_owned(), Entry::Adding);
        state.touched.insert(id.to_owned());
        drop(state);
        let reservation = Reservation {
            inner: self.inner.clone(),
            id: id.to_owned(),
            place: place.clone(),
            armed: true,
        };
        Ok((reservation, place))
    }

    /// Hot-adds a disk: opens the image, passes it with `add-fd`, adds the protocol and format
    /// nodes on `/dev/fdset/N`, lets go of the fd set once QEMU holds its own copy (`remove-fd`),
    /// then adds the device. Returns the disk as placed.
    ///
    /// `device_add` is the last step on purpose: undoing it would take a `device_del` that needs
    /// the guest's help, so every step that can fail comes before it. On failure everything done is
    /// undone and [`Error::Step`] names the step.
    pub async fn add_disk(&self, config: DiskConfig) -> Result<Disk> {
        let span = tracing::info_span!("hotplug", op = "add_disk", id = %config.id);
        self.add_disk_inner(config).instrument(span).await
    }

    async fn add_disk_inner(&self, config: DiskConfig) -> Result<Disk> {
        self.check_disk_hotplug().await?;
        let pci_device = config.model == DiskModel::VirtioBlk;
        let (reservation, place) = self.reserve(&config.id, &config.at, pci_device)?;
        let frontend = match place {
            Place::Pci(pci) => DiskFrontend::VirtioBlk(pci),
            Place::Scsi(addr) => DiskFrontend::ScsiHd(addr),
        };
        let mut disk = Disk::new(config.id.clone(), config.path.clone(), frontend);
        disk.format = config.format;
        disk.backend = config.backend;
        disk.read_only = config.read_only;
        disk.cache = config.cache;
        disk.check()?;

        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| Error::Open {
                path: config.path.clone(),
                source,
            })?;

        let mut txn = Transaction::new(self.client().clone(), reservation);
        let opaque = format!("qhotplug:{}", disk.id);
        let add = AddFd {
            fdset_id: None,
            opaque: Some(opaque.clone()),
        };
        let client = txn.client().clone();
        let info = txn
            .step(
                "add-fd",
                Some(Undo::RemoveFd {
                    fdset: None,
                    opaque: opaque.clone(),
                }),
                client.add_fd(&add, file.into()),
            )
            .await?;
        txn.amend(|u| {
            if let Undo::RemoveFd { fdset, .. } = u {
                *fdset = Some(info.fdset_id);
            }
        });

        let filename = format!("/dev/fdset/{}", info.fdset_id);
        for node in disk.blockdev_add(&filename) {
            let undo = Undo::BlockdevDel(node.node_name.clone());
            txn.step("blockdev-add", Some(undo), client.execute(&node))
                .await?;
        }

        // QEMU holds its own dup of the fd now; the set goes away with the last node using it.
        let remove = RemoveFd {
            fdset_id: info.fdset_id,
            fd: None,
        };
        txn.step("remove-fd", None, client.execute(&remove)).await?;
        txn.forget(|u| !matches!(u, Undo::RemoveFd { .. }));

        txn.step(
            "device_add",
            Some(Undo::DeviceDel(disk.id.clone())),
            client.execute(&disk.device_add()),
        )
        .await?;
        txn.commit().commit(Added::Disk(disk.clone()));
        tracing::info!(frontend = ?disk.frontend, "disk added");
        Ok(disk)
    }

    /// Hot-adds a `virtio-net-pci` NIC: passes each tap fd (and vhost fd) with `getfd`, adds the
    /// netdev, then the device. Our copies of the fds are closed once QEMU has them. Returns the
    /// NIC as placed.
    pub async fn add_nic(&self, config: NicConfig) -> Result<Nic> {
        let span = tracing::info_span!("hotplug", op = "add_nic", id = %config.id);
        self.add_nic_inner(config).instrument(span).await
    }

    async fn add_nic_inner(&self, config: NicConfig) -> Result<Nic> {
        self.check_nic_hotplug().await?;
        let NicConfig {
            id,
            taps,
            mac,
            vhost,
            at,
        } = config;
        let queues = u16::try_from(taps.len()).unwrap_or(u16::MAX);
        let at = at.map(At::Pci).unwrap_or(At::Auto { scsi_bus: None });
        let (reservation, place) = self.reserve(&id, &at, true)?;
        let Place::Pci(pci) = place else {
            unreachable!("a NIC always gets a PCI address")
        };
        let vhost_fds = match vhost {
            Some(policy) => match open_vhost(taps.len().max(1), policy)? {
                Vhost::Enabled(fds) => fds,
                Vhost::Unavailable { reason } => {
                    tracing::debug!(%reason, "no vhost-net");
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let nic = Nic {
            id: id.clone(),
            mac: mac.unwrap_or_else(MacAddr::random_qemu),
            queues,
            pci,
            vhost: !vhost_fds.is_empty(),
        };
        nic.check()?;

        let mut txn = Transaction::new(self.client().clone(), reservation);
        let client = txn.client().clone();
        let mut names = (Vec::new(), Vec::new());
        let fds = taps
            .into_iter()
            .enumerate()
            .map(|(i, fd)| (format!("{id}-tap{i}"), fd, false))
            .chain(
                vhost_fds
                    .into_iter()
                    .enumerate()
                    .map(|(i, fd)| (format!("{id}-vhost{i}"), fd, true)),
            );
        for (name, fd, is_vhost) in fds {
            txn.step(
                "getfd",
                Some(Undo::Closefd(name.clone())),
                client.getfd(&name, fd),
            )
            .await?;
            if is_vhost {
                names.1.push(name);
            } else {
                names.0.push(name);
            }
        }
        txn.step(
            "netdev_add",
            Some(Undo::NetdevDel(nic.netdev_id())),
            client.execute(&nic.netdev_add(&names.0, &names.1)),
        )
        .await?;
        // netdev_add took the named fds; the netdev's removal closes them.
        txn.forget(|u| !matches!(u, Undo::Closefd(_)));
        txn.step(
            "device_add",
            Some(Undo::DeviceDel(nic.id.clone())),
            client.execute(&nic.device_add()),
        )
        .await?;
        txn.commit().commit(Added::Nic(nic.clone()));
        tracing::info!(pci = ?nic.pci, queues, vhost = nic.vhost, "NIC added");
        Ok(nic)
    }

    /// Hot-removes a disk: `device_del` with the wait armed first, then, once `DEVICE_DELETED`
    /// says the guest let it go, `blockdev-del` of its nodes; its slot is freed last.
    ///
    /// [`Error::UnplugRejected`] when the guest refuses (device kept), [`Error::UnplugPending`]
    /// when it does not answer in time (device kept; call again to wait again).
    pub async fn remove_disk(&self, id: &str) -> Result<()> {
        let span = tracing::info_span!("hotplug", op = "remove_disk", id);
        self.remove(id, true).instrument(span).await
    }

    /// Hot-removes a NIC: `device_del`, wait for `DEVICE_DELETED`, then `netdev_del` (which closes
    /// QEMU's tap and vhost fds). Errors as for [`remove_disk`](Vm::remove_disk).
    pub async fn remove_nic(&self, id: &str) -> Result<()> {
        let span = tracing::info_span!("hotplug", op = "remove_nic", id);
        self.remove(id, false).instrument(span).await
    }

    async fn remove(&self, id: &str, disk: bool) -> Result<()> {
        let kind = if disk { "disk" } else { "NIC" };
        if disk {
            self.check_disk_hotplug().await?;
        } else {
            self.check_nic_hotplug().await?;
        }
        let (entry_backends, timeout, _busy) = {
            let mut state = self.inner.state();
            let timeout = state.unplug_timeout;
            // What goes once the device is gone, in order: the format node, then the protocol
            // node under it; or the netdev.
            let backends = if disk {
                state.spec.disks.iter().find(|d| d.id == id).map(|d| {
                    let mut nodes = vec![Undo::BlockdevDel(d.top_node())];
                    if d.top_node() != d.file_node() {
                        nodes.push(Undo::BlockdevDel(d.file_node()));
                    }
                    nodes
                })
            } else {
                state
                    .spec
                    .nics
                    .iter()
                    .find(|n| n.id == id)
                    .map(|n| vec![Undo::NetdevDel(n.netdev_id())])
            };
            let found = match state.devices.get_mut(id) {
                Some(Entry::Disk { busy }) if disk => backends.map(|b| (busy, b)),
                Some(Entry::Nic { busy }) if !disk => backends.map(|b| (busy, b)),
                Some(Entry::Adding) => return Err(Error::Busy(id.to_owned())),
                _ => None,
            };
            let Some((busy, backends)) = found else {
                return Err(Error::NotFound {
                    kind,
                    id: id.to_owned(),
                });
            };
            if *busy {
                return Err(Error::Busy(id.to_owned()));
            }
            *busy = true;
            let guard = Busy {
                inner: self.inner.clone(),
                id: id.to_owned(),
            };
            (backends, timeout, guard)
        };
        self.unplug(id, timeout).await?;

        // The device is gone: whatever happens to the backend, the slot and the id are free.
        let result = self.remove_backends(id, &entry_backends).await;
        self.inner.state().forget(id);
        if result.is_ok() {
            tracing::info!("{kind} removed");
        }
        result
    }

    async fn remove_backends(&self, id: &str, backends: &[Undo]) -> Result<()> {
        for step in backends {
            let span = tracing::debug_span!("step", name = step.command(), id);
            step.run(self.client())
                .instrument(span)
                .await
                .map_err(|e| Error::Backend {
                    id: id.to_owned(),
                    step: step.command(),
                    source: Box::new(e),
                })?;
        }
        Ok(())
    }

    /// `device_del` and the wait for the guest. Ok once the device is gone.
    async fn unplug(&self, id: &str, timeout: Duration) -> Result<()> {
        let client = self.client();
        let mut events = client.events();
        let del = DeviceDel { id: id.to_owned() };
        let span = tracing::debug_span!("step", name = "device_del", id);
        match client.execute(&del).instrument(span).await {
            Ok(_) => {}
            // A pending unplug that completed while nobody waited.
            Err(e) if is_absent(&e) => return Ok(()),
            Err(e)
                if e.qmp_desc()
                    .is_some_and(|d| d.contains("already in the process of unplug")) => {}
            Err(e) => return Err(e.into()),
        }
        let wait = async {
            while let Some(item) = events.next().await {
                match item {
                    Ok(event) => match &event.kind {
                        EventKind::DeviceDeleted(d) if d.device.as_deref() == Some(id) => {
                            return Ok(())
                        }
                        EventKind::DeviceUnplugGuestError(d) if d.device.as_deref() == Some(id) => {
                            return Err(Error::UnplugRejected(id.to_owned()))
                        }
                        _ => {}
                    },
                    // Events were lost: ask QEMU rather than guess.
                    Err(Lagged(_)) => {
                        if !self.has_device(id).await? {
                            return Ok(());
                        }
                    }
                }
            }
            Err(Error::Qmp(qhotplug_qmp::Error::Disconnected))
        };
        let span = tracing::debug_span!("step", name = "wait DEVICE_DELETED", id);
        match tokio::time::timeout(timeout, wait).instrument(span).await {
            Ok(result) => result,
            Err(_) => Err(Error::UnplugPending {
                id: id.to_owned(),
                after: timeout,
            }),
        }
    }
}
