//! The VM handle: what callers hold. It launches or attaches, and hands each hot-add and
//! hot-remove to the [engine](crate::engine); what it knows of the VM lives in
//! [`state`](crate::state).

use std::sync::Arc;

use qhotplug_cmdline::{Cdrom, CdromBus, Disk, Launcher, Nic, QemuProcess, VmSpec};
use qhotplug_qmp::message::VersionTriple;
use qhotplug_qmp::Client;
use tracing::Instrument;

use crate::engine;
use crate::error::{Error, Result};
use crate::kinds::{Kind, Want};
use crate::reconcile::{self, Reconciled};
use crate::run_to_end::RunToEnd;
use crate::slots::SlotError;
use crate::state::{self, Device, Entry, Inner, Place, Reservation};
use crate::unplug::{self, UnplugPolicy};
use crate::{CdromConfig, DiskConfig, NicConfig};

/// The oldest QEMU the SDK drives: 5.0, the first whose `query-named-block-nodes` takes `flat`
/// (what `reconcile` lists block nodes with). Every later piece it uses (`blockdev-add`, `add-fd`
/// with `opaque`, `qom-list`/`qom-get`, `DEVICE_DELETED` with the device's id) is older still.
/// Tested: 7.2 and 10.0.
pub const MIN_QEMU: VersionTriple = VersionTriple {
    major: 5,
    minor: 0,
    micro: 0,
};

/// A running QEMU that the SDK hot-plugs into. Cheap to clone; every clone drives the same VM, and
/// hotplugs through clones run concurrently. A VM launched with [`Vm::launch`] is killed when the
/// last clone is dropped (use [`Vm::quit`] for an orderly exit).
///
/// Every call that changes QEMU runs to its end whether or not its caller waits: dropping the
/// future (a `tokio::time::timeout`, a `select!`) gives up the answer, not the work, so
/// [`Vm::spec`] never parts from what QEMU has. [`Vm::settle`] waits for such calls. Two calls on
/// one device at once: the second is [`Error::Busy`] before anything is sent.
///
/// ```no_run
/// use qhotplug::{DiskConfig, Launcher, Machine, Vm, VmSpec};
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
    /// This handle's unplug policy; other clones keep their own.
    policy: UnplugPolicy,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.inner.state().spec.name)
            .finish_non_exhaustive()
    }
}

fn slot_error(e: SlotError) -> Error {
    match e {
        SlotError::Full { bus } => Error::NoFreeSlot { bus },
        SlotError::Taken { bus, slot } => Error::AddressTaken { bus, slot },
    }
}

impl Vm {
    /// Launches QEMU with `launcher` and attaches to it. The launcher's spec is the starting
    /// topology: its disks and NICs can be hot-removed like hot-added ones. What the command line
    /// cannot say is set over QMP before the guest runs: a NIC whose `link_up` is false has its
    /// link taken down, a disk with `io_limits` gets them, the VNC display gets its password (the
    /// VM starts paused for that, and runs once they are set, unless the spec says paused).
    pub async fn launch(launcher: Launcher) -> Result<Vm> {
        let spec = launcher.spec().clone();
        // What QEMU's command line cannot say (a NIC's link down, a disk's I/O limits) is set
        // over QMP; a VM that should run starts paused until then, so its guest never runs
        // without it.
        let password = spec.vnc.as_ref().and_then(|v| v.password.clone());
        let later = spec.nics.iter().any(|n| !n.link_up)
            || spec.disks.iter().any(|d| d.io_limits.is_some())
            || password.is_some();
        // A migration target waits for its guest: nothing is resumed, the migration starts it.
        let resume = later && !spec.paused && !spec.incoming;
        let mut launcher = launcher;
        if resume {
            launcher.spec_mut().paused = true;
        }
        let (client, process) = launcher.launch().await.map_err(Error::Launch)?;
        let vm = Self::attach_inner(client, spec, Some(process)).await?;
        for nic in vm.nics().into_iter().filter(|n| !n.link_up) {
            vm.set_link(&nic.id, false).await?;
        }
        for disk in vm.disks() {
            if let Some(limits) = disk.io_limits {
                vm.set_io_limits(&disk.id, limits).await?;
            }
        }
        if let Some(password) = password {
            let set = qhotplug_qmp::command::SetPassword {
                protocol: "vnc".into(),
                password,
            };
            vm.client().execute(&set).await?;
        }
        if resume {
            vm.client().execute(&qhotplug_qmp::command::Cont).await?;
        }
        Ok(vm)
    }

    /// Attaches to a running QEMU through its monitor. `spec` says what the caller knows of the
    /// VM: its root ports, SCSI controllers and devices; the machine type is QEMU's own. What QEMU
    /// reports is added to it: root ports and occupied PCI slots from `query-pci` and from each
    /// device's QOM `parent_bus` and `addr` (which also covers what sits behind root ports before
    /// the firmware has run), and virtio-scsi controllers from `qom-list`.
    ///
    /// A QEMU older than [`MIN_QEMU`] is refused with [`Error::QemuTooOld`] before anything is
    /// sent to it.
    pub async fn attach(client: Client, spec: VmSpec) -> Result<Vm> {
        Self::attach_inner(client, spec, None).await
    }

    async fn attach_inner(
        client: Client,
        spec: VmSpec,
        process: Option<QemuProcess>,
    ) -> Result<Vm> {
        let found = client.greeting().version.qemu;
        if found < MIN_QEMU {
            return Err(Error::QemuTooOld {
                found,
                minimum: MIN_QEMU,
            });
        }
        let state = crate::discover::discover(&client, spec).await?;
        Ok(Vm {
            inner: Arc::new(Inner::new(client, state, process)),
            policy: UnplugPolicy::default(),
        })
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Runs one public call: in its `hotplug` span (`op`, `id`), to its end (done, or rolled back)
    /// whether or not its caller still waits: polled by the caller, and moved into a task of its
    /// own if the caller drops it part-way ([`RunToEnd`]). A caller that drops the future gives
    /// up the answer, never the consistency of the SDK's view: the rule in ARCHITECTURE.md. The
    /// caller's tracing subscriber goes with it.
    pub(crate) async fn call<T, Fut>(
        &self,
        op: &'static str,
        id: &str,
        work: impl FnOnce(Vm) -> Fut,
    ) -> Result<T>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        use tracing::instrument::WithSubscriber;
        let span = tracing::info_span!("hotplug", op, id);
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let running = self.inner.enter_call();
        let work = work(self.clone());
        RunToEnd::new(
            async move {
                let result = work.await;
                drop(running);
                result
            }
            .instrument(span)
            .with_subscriber(dispatch),
        )
        .await
    }

    /// Waits until no call on this VM (through any handle) is running: those whose callers
    /// stopped waiting have finished too. Then `vm.spec()` is what those calls left in QEMU.
    pub async fn settle(&self) {
        self.inner.settled().await;
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

    /// The CD-ROM drives the SDK knows of, with the medium each holds.
    pub fn cdroms(&self) -> Vec<Cdrom> {
        self.inner.state().spec.cdroms.clone()
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

    /// A handle on the same VM whose hot-removes ask the guest by `policy`. Only the new handle
    /// is affected: `vm.with_unplug_policy(p).remove_disk(id)` is a per-call policy.
    pub fn with_unplug_policy(&self, policy: UnplugPolicy) -> Vm {
        Vm {
            inner: self.inner.clone(),
            policy,
        }
    }

    /// This handle's unplug policy (default: [`UnplugPolicy::default`]).
    pub fn unplug_policy(&self) -> UnplugPolicy {
        self.policy
    }

    /// True when a hot-remove of `id` ended [`Error::UnplugPending`] and the guest has not let the
    /// device go since (as far as the SDK has seen: a later remove call, or `reconcile`, finds out).
    pub fn unplug_pending(&self, id: &str) -> bool {
        matches!(
            self.inner.state().devices.get(id),
            Some(Entry::Placed {
                unplug_pending: true,
                ..
            })
        )
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

    /// The path of the pseudo-terminal behind serial console `index` (`Serial::Pty` in the spec),
    /// from `query-chardev`, for a caller to attach to. `None` when that console is no pty.
    pub async fn serial_pty(&self, index: usize) -> Result<Option<std::path::PathBuf>> {
        let label = format!("serial{index}");
        Ok(self
            .client()
            .execute(&qhotplug_qmp::command::QueryChardev)
            .await?
            .into_iter()
            .find(|c| c.label == label)
            .and_then(|c| {
                c.filename
                    .strip_prefix("pty:")
                    .map(std::path::PathBuf::from)
            }))
    }

    /// True when QEMU has a device with this id (from `qom-list /machine/peripheral`), whether or
    /// not the SDK added it.
    pub async fn has_device(&self, id: &str) -> Result<bool> {
        Ok(unplug::present(self.client(), id).await?)
    }

    /// Checks, from QEMU's own schema (read once per connection), that it has every command in
    /// `needed`; the error names the first one missing.
    pub(crate) async fn require(&self, operation: &'static str, needed: &[&str]) -> Result<()> {
        let schema = self.client().schema().await?;
        match needed.iter().find(|c| !schema.has_command(c)) {
            Some(missing) => Err(Error::Unsupported {
                command: (*missing).to_owned(),
                operation,
            }),
            None => Ok(()),
        }
    }

    /// Checks, from QEMU's own schema, that this QEMU has every command disk hotplug uses; the
    /// error names the first one missing.
    pub async fn check_disk_hotplug(&self) -> Result<()> {
        self.require(DiskConfig::OPERATION, DiskConfig::COMMANDS)
            .await
    }

    /// Checks that this QEMU has every command NIC hotplug uses.
    pub async fn check_nic_hotplug(&self) -> Result<()> {
        self.require(NicConfig::OPERATION, NicConfig::COMMANDS)
            .await
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
    /// lists but QEMU no longer has are dropped from the view and their backends deleted; block
    /// nodes, netdevs, fd sets, objects and chardevs left behind by hot-adds through this handle
    /// are deleted; the slot maps are rebuilt from what QEMU reports plus the SDK's own devices and
    /// running hot-adds (so a slot someone else freed is free again); I/O limits and media are
    /// taken from `query-block`; and each NIC's recorded link state is applied again (QMP cannot
    /// read it). It judges only from what was known when its queries began: devices a running call
    /// holds, or that joined after, are left alone, and a hot-add of an id it is cleaning up is
    /// [`Error::Busy`] until it is done. Everything this handle never made is left alone too.
    /// [`Reconciled::is_empty`] says whether there was anything to do.
    pub async fn reconcile(&self) -> Result<Reconciled> {
        self.call("reconcile", "", |vm| async move {
            reconcile::reconcile(&vm).await
        })
        .await
    }

    /// Takes the id and an address for a hot-add.
    pub(crate) fn reserve(&self, id: &str, want: Want) -> Result<(Reservation, Place)> {
        qhotplug_cmdline::validate_id(id)?;
        let mut state = self.inner.state();
        match state.devices.get(id) {
            Some(Entry::Cleaning) => return Err(Error::Busy(id.to_owned())),
            Some(_) => return Err(Error::DuplicateId(id.to_owned())),
            None => {}
        }
        let place = match want {
            Want::Pci(None) => Place::Pci(state.pci.allocate().map_err(slot_error)?),
            Want::Pci(Some(pci)) => {
                state.pci.claim(&pci).map_err(slot_error)?;
                Place::Pci(pci)
            }
            Want::Scsi { at: None, bus } => {
                if !state.scsi.has_buses() {
                    return Err(Error::NoScsiController(id.to_owned()));
                }
                Place::Scsi(state.scsi.allocate(bus.as_deref()).map_err(slot_error)?)
            }
            Want::Scsi { at: Some(addr), .. } => {
                state.scsi.claim(&addr).map_err(slot_error)?;
                Place::Scsi(addr)
            }
            Want::Fixed => Place::Fixed,
        };
        state.devices.insert(
            id.to_owned(),
            Entry::Adding {
                place: place.clone(),
            },
        );
        state.touched.insert(id.to_owned());
        drop(state);
        let reservation = Reservation::new(self.inner.clone(), id.to_owned(), place.clone());
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
        let id = config.id().to_owned();
        self.call("add_disk", &id, |vm| async move {
            let disk = engine::add(&vm, config).await?;
            tracing::info!(frontend = ?disk.frontend, "disk added");
            Ok(disk)
        })
        .await
    }

    /// Hot-adds a `virtio-net-pci` NIC: passes each tap fd (and vhost fd) with `getfd`, adds the
    /// netdev, then the device. Our copies of the fds are closed once QEMU has them. Returns the
    /// NIC as placed.
    pub async fn add_nic(&self, config: NicConfig) -> Result<Nic> {
        let id = config.id().to_owned();
        self.call("add_nic", &id, |vm| async move {
            let nic = engine::add(&vm, config).await?;
            tracing::info!(pci = ?nic.pci, queues = nic.queues, vhost = nic.vhost, "NIC added");
            Ok(nic)
        })
        .await
    }

    /// Hot-adds a `scsi-cd` drive on a virtio-scsi controller, empty or holding an ISO image (opened
    /// read-only and passed as an fd, like a disk's). Returns the drive as placed. Change its medium
    /// with [`change_medium`](Vm::change_medium).
    pub async fn add_cdrom(&self, config: CdromConfig) -> Result<Cdrom> {
        let id = config.id().to_owned();
        self.call("add_cdrom", &id, |vm| async move {
            let cd = engine::add(&vm, config).await?;
            tracing::info!(bus = ?cd.bus, medium = ?cd.medium, "CD-ROM added");
            Ok(cd)
        })
        .await
    }

    /// Hot-removes a `scsi-cd` drive: `device_del`, wait for `DEVICE_DELETED`, then its medium's
    /// nodes. An `ide-cd` cannot be removed ([`Error::NotHotpluggable`]: IDE has no hotplug).
    /// Errors as for [`remove_disk`](Vm::remove_disk).
    pub async fn remove_cdrom(&self, id: &str) -> Result<()> {
        let owned = id.to_owned();
        self.call("remove_cdrom", id, |vm| async move {
            let id = owned.as_str();
            if let Some(Device::Cdrom(Cdrom {
                bus: CdromBus::Ide(_),
                ..
            })) = vm.inner.state().device(id)
            {
                return Err(Error::NotHotpluggable {
                    id: id.to_owned(),
                    reason: "an IDE drive is there from boot to shutdown",
                });
            }
            engine::remove(&vm, id, state::Kind::Cdrom).await
        })
        .await
    }

    /// Hot-removes a disk: asks the guest to let it go (`device_del`, by this handle's
    /// [`UnplugPolicy`]), then, once `DEVICE_DELETED` says it did, deletes its block nodes; its
    /// slot is freed last.
    ///
    /// [`Error::UnplugRejected`] when the guest refuses (device kept), [`Error::UnplugPending`]
    /// when it does not answer by the deadline (device kept, [`Vm::unplug_pending`] true; call
    /// again to wait again).
    pub async fn remove_disk(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_disk", id, state::Kind::Disk).await
    }

    /// Hot-removes a NIC: `device_del`, wait for `DEVICE_DELETED`, then `netdev_del` (which closes
    /// QEMU's tap and vhost fds). Errors as for [`remove_disk`](Vm::remove_disk).
    pub async fn remove_nic(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_nic", id, state::Kind::Nic).await
    }

    /// A hot-remove as a call of its own (see [`Vm::call`]).
    pub(crate) async fn remove_kind(
        &self,
        op: &'static str,
        id: &str,
        kind: state::Kind,
    ) -> Result<()> {
        let owned = id.to_owned();
        self.call(op, id, |vm| async move {
            engine::remove(&vm, &owned, kind).await
        })
        .await
    }

    /// A hot-add as a call of its own (see [`Vm::call`]): `check` (what only the VM's state can
    /// answer) first, then the engine.
    pub(crate) async fn add_kind<K: Kind + Send + 'static>(
        &self,
        op: &'static str,
        config: K,
        check: impl FnOnce(&Vm, &K) -> Result<()> + Send + 'static,
    ) -> Result<K::Added>
    where
        K::Added: Send + 'static,
    {
        let id = config.id().to_owned();
        self.call(op, &id, |vm| async move {
            check(&vm, &config)?;
            engine::add(&vm, config).await
        })
        .await
    }
}
