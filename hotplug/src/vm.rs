//! The VM handle: what callers hold, and a thin facade. Every public call is a short delegation
//! into the operation that does it (the [engine](crate::engine), `live`, `medium`, `memory`,
//! `cpus`, `migrate`, `reconcile`), which takes the shared [core](crate::vm_core) rather than the
//! handle; a handle adds only its unplug policy. Calls that change QEMU run through
//! [`Vm::call`]: their span, and the rule that they run to their end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qhotplug_cmdline::{
    Balloon, Cdrom, CdromBus, Disk, Launcher, Medium, MemoryDevice, Nic, QemuProcess, Rng,
    SerialPort, VhostUserBlk, VirtioFs, VirtioSerial, VmSpec,
};
use qhotplug_qmp::command::{HotpluggableCpu, IoLimits, RunState};
use qhotplug_qmp::message::VersionTriple;
use qhotplug_qmp::Client;
use tracing::Instrument;

use crate::cpus::{self, VcpuChange};
use crate::desired::{Applied, Change, Desired, Plan, Step};
use crate::dump::{DumpFormat, DumpProgress};
use crate::error::{Error, Result};
use crate::guest_agent::GuestAgent;
use crate::kinds::{Device, DeviceKind, Plug};
use crate::life::{self, PowerVia, Stopped};
use crate::medium::{self, MediumOptions, TrayStatus};
use crate::migration::migrate::{self, MigrationOptions, Progress};
use crate::migration::save;
use crate::onlining::{self, Onlined};
use crate::qemu::unplug::{self, UnplugPolicy};
use crate::reconcile::{self, Reconciled};
use crate::run_to_end::RunToEnd;
use crate::state::Entry;
use crate::storage::backup::{self, Backup, BackupConfig};
use crate::storage::block_job::BlockJob;
use crate::storage::checkpoint::{self, CheckpointInfo};
use crate::storage::found_job::{self, JobOrigin};
use crate::storage::mirror::{self, MirrorConfig};
use crate::storage::pull::{self, PullBackup, PullConfig};
use crate::storage::snapshot::{self, SnapshotConfig};
use crate::storage::{commit, stream};
use crate::unreadable::Unreadable;
use crate::vm_core::{hotplug_span, Core};
use crate::{engine, live, memory, virtio_devices};
use crate::{
    BalloonConfig, CdromConfig, DiskConfig, MemoryConfig, NicConfig, RngConfig, SerialPortConfig,
    VhostUserBlkConfig, VirtioFsConfig, VirtioSerialConfig,
};

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
    core: Arc<Core>,
    /// This handle's unplug policy; other clones keep their own.
    policy: UnplugPolicy,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.core.state().spec().name)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Launches QEMU with `launcher` and attaches to it. The launcher's spec is the starting
    /// topology: its disks and NICs can be hot-removed like hot-added ones. What the command line
    /// cannot say is set over QMP before the guest runs: a NIC whose `link_up` is false has its
    /// link taken down, a disk with `io_limits` gets them, the VNC display gets its password (the
    /// VM starts paused for that, and runs once they are set, unless the spec says paused).
    ///
    /// A device whose address is [`Pci::auto`](qhotplug_cmdline::Pci::auto) or
    /// [`ScsiAddr::auto`](qhotplug_cmdline::ScsiAddr::auto) gets a free one
    /// ([`VmSpec::assign_addresses`]); [`Vm::spec`] says which.
    pub async fn launch(launcher: Launcher) -> Result<Vm> {
        let mut launcher = launcher;
        launcher
            .spec_mut()
            .assign_addresses()
            .map_err(Error::Launch)?;
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
            vm.call("set_vnc_password", "", |core, _| async move {
                life::set_vnc_password(&core, password).await
            })
            .await?;
        }
        if resume {
            vm.resume().await?;
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

    /// Takes charge of a QEMU an earlier process launched and left running (it died, or was
    /// restarted): connects to the adopted process's monitor and attaches with `spec` (the one
    /// the earlier process kept: [`VmSpec::from_json`], its secrets resolved). The VM is then this
    /// handle's as a launched one is: [`Vm::quit`] and [`Vm::shutdown`] end the process, dropping
    /// the last handle kills it, and secrets are encrypted with the master key the launch kept.
    /// Run [`Vm::reconcile`] next: what the dead process left half-done is settled there.
    pub async fn adopt(process: QemuProcess, spec: VmSpec) -> Result<Vm> {
        let client = qhotplug_qmp::Config::new()
            .connect(process.qmp_path())
            .await?;
        Self::attach_inner(client, spec, Some(process)).await
    }

    /// Attaches to a running QEMU with no spec: what the VM is comes from QEMU alone. The
    /// machine, memory and vCPUs, and every device of every kind the SDK plugs with its
    /// configuration (a disk's image chain as QEMU runs it, each image's file from
    /// `/proc/<qemu>/fd` when QEMU was handed an fd and this process may read QEMU's fds;
    /// checkpoints; sockets; memory backends), as [`Vm::spec`] then shows it. What QEMU does not
    /// tell comes back as [`Unreadable`], each saying what the spec holds in its place: a
    /// process that kept its spec ([`VmSpec::to_json`]) attaches with it instead.
    ///
    /// A value QEMU chose where the launch left it to QEMU (a vCPU topology, a vhost-user disk's
    /// queues) is read back as QEMU has it. One thing is changed, not read: a job of the SDK's
    /// a dead process left concluded is dismissed after a second (QEMU lists no block node beside
    /// a concluded job; what the job did is in QEMU's graph, read next), and the next
    /// [`Vm::reconcile`] reports it with its outcome ([`Reconciled::jobs_ended`]). Run it
    /// next, as after any restart: it deletes what a dead process's unfinished hot-adds left,
    /// found by the SDK's names.
    pub async fn attach_without_spec(client: Client) -> Result<(Vm, Vec<Unreadable>)> {
        Self::attach_reading(client, None).await
    }

    /// [`Vm::adopt`] with no spec: the spec is read from QEMU as [`Vm::attach_without_spec`]
    /// reads it.
    pub async fn adopt_without_spec(process: QemuProcess) -> Result<(Vm, Vec<Unreadable>)> {
        let client = qhotplug_qmp::Config::new()
            .connect(process.qmp_path())
            .await?;
        Self::attach_reading(client, Some(process)).await
    }

    async fn attach_reading(
        client: Client,
        process: Option<QemuProcess>,
    ) -> Result<(Vm, Vec<Unreadable>)> {
        check_version(&client)?;
        let pid = process.as_ref().map(QemuProcess::pid);
        let pid = pid.or_else(|| client.peer_pid());
        let read = crate::read_spec::read_spec(&client, pid).await?;
        let vm = Self::attach_inner(client, read.spec, process).await?;
        *vm.core.unreadable.lock().unwrap_or_else(|p| p.into_inner()) = read.unreadable.clone();
        *vm.core
            .ended_at_attach
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = read.ended;
        Ok((vm, read.unreadable))
    }

    async fn attach_inner(
        client: Client,
        spec: VmSpec,
        process: Option<QemuProcess>,
    ) -> Result<Vm> {
        check_version(&client)?;
        let state = crate::discover::discover(&client, spec).await?;
        let core = Arc::new(Core::new(client, state, process));
        *core.watcher.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(crate::guest_removals::watch(&core));
        Ok(Vm {
            core,
            policy: UnplugPolicy::default(),
        })
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
        work: impl FnOnce(Arc<Core>, String) -> Fut,
    ) -> Result<T>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        use tracing::instrument::WithSubscriber;
        let span = hotplug_span(op, id);
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let running = self.core.enter_call();
        let work = work(self.core.clone(), id.to_owned());
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
        self.core.settled().await;
    }

    /// The QMP client, for commands and events of your own.
    pub fn client(&self) -> &Client {
        &self.core.client
    }

    /// The VM's current topology: the spec it was launched (or attached) with, with every device
    /// hot-added since and without every device hot-removed. A VM launched from it has the same
    /// devices at the same addresses (restart, migration target). NIC tap fds are the caller's to
    /// give again ([`Launcher::nic_fds`]).
    pub fn spec(&self) -> VmSpec {
        self.core.state().spec().clone()
    }

    /// The disks the SDK knows of, by id.
    pub fn disks(&self) -> Vec<Disk> {
        self.core.state().spec().disks.clone()
    }

    /// Which of the VM's disks a `BLOCK_IO_ERROR` is about: by the node it names (any image of a
    /// disk's chain), else by the device's QOM path (QEMU 8.2+). `None` for a disk the SDK does
    /// not know.
    pub fn disk_of_io_error(&self, error: &qhotplug_qmp::event::BlockIoError) -> Option<String> {
        let by_node = |d: &&Disk| {
            error
                .node_name
                .as_deref()
                .is_some_and(|node| d.node_names().iter().any(|n| n == node))
        };
        let by_path = |d: &&Disk| {
            error
                .qom_path
                .as_deref()
                .and_then(qhotplug_cmdline::names::part_of)
                .is_some_and(|(id, _)| id == d.id)
        };
        let state = self.core.state();
        let disks = &state.spec().disks;
        let found = disks
            .iter()
            .find(by_node)
            .or_else(|| disks.iter().find(by_path));
        found.map(|d| d.id.clone())
    }

    /// The NICs the SDK knows of, by id.
    pub fn nics(&self) -> Vec<Nic> {
        self.core.state().spec().nics.clone()
    }

    /// The CD-ROM drives the SDK knows of, with the medium each holds.
    pub fn cdroms(&self) -> Vec<Cdrom> {
        self.core.state().spec().cdroms.clone()
    }

    /// The QEMU process id, when the SDK launched it.
    pub fn pid(&self) -> Option<u32> {
        self.core.launched_pid()
    }

    /// A handle on the same VM whose hot-removes ask the guest by `policy`. Only the new handle
    /// is affected: `vm.with_unplug_policy(p).remove_disk(id)` is a per-call policy.
    pub fn with_unplug_policy(&self, policy: UnplugPolicy) -> Vm {
        Vm {
            core: self.core.clone(),
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
            self.core.state().devices.get(id),
            Some(Entry::Placed {
                unplug_pending: true,
                ..
            })
        )
    }

    /// Asks QEMU to exit (`quit`) and, when the SDK launched it, waits for the process to end.
    pub async fn quit(&self) -> Result<()> {
        self.core.quit().await
    }

    /// The VM's guest agent, on its port named `org.qemu.guest_agent.0` (declared in the spec, or
    /// hot-added with [`SerialPortConfig::guest_agent`]); [`Error::NoGuestAgent`] without one.
    /// Every call returns a handle on the same connection. Whether an agent runs in the guest is
    /// read from QEMU (the port's `frontend-open`, then `VSERPORT_CHANGE`), so a call to an agent
    /// that is not running fails at once, typed, and is never taken for a slow one.
    pub async fn agent(&self) -> Result<GuestAgent> {
        self.core.agent().await
    }

    /// Shuts the VM down gracefully: asks the guest by `via` (the agent's `guest-shutdown` when
    /// one runs, else the ACPI power button), waits for `SHUTDOWN` by `deadline`, and waits for
    /// QEMU to exit (reaped, when the SDK launched it). A guest that has not shut down by the
    /// deadline (it ignores the button, or hangs) is stopped with `quit`: [`Stopped::Forced`].
    /// Either way QEMU is gone when it returns; it runs to its end if the caller stops waiting.
    pub async fn shutdown(&self, via: PowerVia, deadline: Duration) -> Result<Stopped> {
        self.call("shutdown", "", move |core, _| async move {
            life::shutdown(&core, via, deadline).await
        })
        .await
    }

    /// Reboots the guest: through the agent (`guest-shutdown` `reboot`), waiting for `RESET` by
    /// `deadline`, and resetting the VM (`system_reset`) if it has not come by then
    /// ([`Stopped::Forced`]). ACPI has no reboot request: with [`PowerVia::Acpi`] (or
    /// [`PowerVia::Auto`] and no agent running) the VM is reset at once.
    pub async fn reboot(&self, via: PowerVia, deadline: Duration) -> Result<Stopped> {
        self.call("reboot", "", move |core, _| async move {
            life::reboot(&core, via, deadline).await
        })
        .await
    }

    /// Suspends the guest to RAM (S3) through its agent, and waits by `deadline` for QMP's
    /// `SUSPEND`: the guest's memory stays, its vCPUs stop, and only [`Vm::wakeup`] (or a
    /// device the guest armed) brings it back. A machine that cannot wake a suspended guest is
    /// [`Error::Precondition`], nothing asked; a guest that has not suspended to RAM by the
    /// deadline is the agent's [`Timeout`](qhotplug_qga::Error::Timeout) (it may still do so
    /// later; a guest whose ACPI offers no S3 may suspend to idle instead, which QEMU does not
    /// see).
    pub async fn suspend(&self, deadline: Duration) -> Result<()> {
        self.call("suspend", "", move |core, _| async move {
            life::suspend(&core, deadline).await
        })
        .await
    }

    /// Wakes a guest suspended to RAM (`system_wakeup`) and waits by `deadline` for `WAKEUP`;
    /// a guest that is not suspended is left alone.
    pub async fn wakeup(&self, deadline: Duration) -> Result<()> {
        self.call("wakeup", "", move |core, _| async move {
            life::wakeup(&core, deadline).await
        })
        .await
    }

    /// Dumps the guest's memory and vCPU state into `file` (opened by the caller, written from
    /// where it is) in `format`, the guest running on meanwhile, `progress` told as it goes;
    /// returns the bytes of guest memory written. QEMU takes the file's fd and closes it when
    /// done. A format this QEMU was not built with is [`Error::Unsupported`], nothing sent; a
    /// dump that fails (its file system full) is [`Error::DumpFailed`]. QEMU cannot cancel a
    /// dump: the call runs to its end even if its caller stops waiting.
    pub async fn dump_memory(
        &self,
        file: std::fs::File,
        format: DumpFormat,
        progress: impl FnMut(DumpProgress) + Send + 'static,
    ) -> Result<DumpProgress> {
        self.call("dump_memory", "", move |core, _| async move {
            crate::dump::dump(&core, file, format, progress).await
        })
        .await
    }

    /// Pauses the VM (`stop`): its vCPUs stop; QEMU and its devices stay. Pausing a paused VM
    /// does nothing.
    pub async fn pause(&self) -> Result<()> {
        self.call(
            "pause",
            "",
            |core, _| async move { life::pause(&core).await },
        )
        .await
    }

    /// Resumes a paused VM (`cont`), also one QEMU paused itself (an I/O error with
    /// `werror=stop`, a guest panic with `-action panic=pause`).
    pub async fn resume(&self) -> Result<()> {
        self.call(
            "resume",
            "",
            |core, _| async move { life::resume(&core).await },
        )
        .await
    }

    /// The VM's run state (`query-status`): running, paused, shut down, …
    pub async fn run_state(&self) -> Result<RunState> {
        life::run_state(&self.core).await
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

    /// Checks, from QEMU's own schema, that this QEMU has every command disk hotplug uses; the
    /// error names the first one missing.
    pub async fn check_disk_hotplug(&self) -> Result<()> {
        self.core
            .require(DiskConfig::OPERATION, DiskConfig::COMMANDS)
            .await
    }

    /// Checks that this QEMU has every command NIC hotplug uses.
    pub async fn check_nic_hotplug(&self) -> Result<()> {
        self.core
            .require(NicConfig::OPERATION, NicConfig::COMMANDS)
            .await
    }

    /// Checks that a `scsi-hd` can be hot-added: disk hotplug works and the VM has a virtio-scsi
    /// controller.
    pub async fn check_scsi_hotplug(&self) -> Result<()> {
        self.check_disk_hotplug().await?;
        if !self.core.state().scsi.has_buses() {
            return Err(Error::NoScsiController("scsi-hd".into()));
        }
        Ok(())
    }

    /// Brings the SDK's view back in line with QEMU's, from `qom-list`, `query-pci`,
    /// `query-named-block-nodes`, `query-fdsets` and `query-block`: after an unplug that was
    /// reported pending completed, after someone else changed the VM, or after a rollback could not
    /// finish. (A device that goes without the SDK asking, its `DEVICE_DELETED` seen, is followed
    /// at once: a task per VM runs this for it.)
    ///
    /// It first waits for the background rollbacks of cancelled hot-adds. Then devices the SDK
    /// lists but QEMU no longer has are dropped from the view and their backends deleted; block
    /// nodes, netdevs, fd sets, objects and chardevs left behind by hot-adds through this handle
    /// are deleted; a device a failed hot-add could not take back is adopted if QEMU has it; the
    /// slot maps are rebuilt from what QEMU reports plus the SDK's own devices and running hot-adds
    /// (so a slot someone else freed is free again); I/O limits and media are taken from
    /// `query-block`; and each NIC's recorded link state is applied again (QMP cannot read it). It
    /// judges only from what was known when its queries began: devices a running call holds, or
    /// that joined after, are left alone, and a hot-add of an id it is cleaning up is
    /// [`Error::Busy`] until it is done. Everything this handle never made is left alone too.
    /// [`Reconciled::is_empty`] says whether there was anything to do.
    pub async fn reconcile(&self) -> Result<Reconciled> {
        self.call("reconcile", "", |core, _| async move {
            reconcile::reconcile(&core).await
        })
        .await
    }

    /// What it takes to make this VM match `desired`, against [`Vm::spec`] (QEMU's truth):
    /// removals, additions, live changes, in an order that respects what depends on what, and
    /// what needs a restart because QEMU cannot change it live (machine, base memory,
    /// `maxmem`/`maxcpus`, a device whose model, bus, address or backend type changed, boot
    /// order, display), each with its reason. Nothing that changes QEMU is sent: only
    /// `query-block` when a disk size is desired, and `query-balloon` when a balloon target is or
    /// the VM has memory devices (and this process set no target). See [`Desired`] for the
    /// fields left to the SDK.
    ///
    /// On a VM attached without a spec ([`Vm::attach_without_spec`]), what QEMU could not tell
    /// ([`Unreadable`]) is not taken for a difference: a NIC's vhost, a file console, launch
    /// options; a desired device of an id QEMU has but the SDK could not read needs a restart.
    ///
    /// [`Error::Spec`] when the desired spec contradicts itself.
    pub async fn plan(&self, desired: &Desired) -> Result<Plan> {
        let seen = crate::desired::seen(&self.core, desired).await?;
        crate::desired::plan::plan(&seen, desired)
    }

    /// Makes this VM match `desired`: plans ([`Vm::plan`]), then runs the steps, each as the
    /// public call it names ([`Vm::add_disk`], [`Vm::set_link`], …) with its own transaction and
    /// busy marks, at most [`Desired::concurrency`] at once, a step only after those it waits for
    /// ([`Step::after`](crate::Step::after)) are done. Every step's [`Outcome`](crate::Outcome)
    /// comes back: done; failed with its typed error (its own transaction undid it); or skipped,
    /// because a step it waited for failed. **A failure does not undo independent steps that
    /// succeeded**: the VM is then part-way, `vm.spec()` says exactly where, and a second `apply`
    /// retries what is left. What needs a restart is returned, not attempted.
    ///
    /// A second `apply` of the same desired state plans nothing and sends nothing but the queries
    /// of [`Vm::plan`]. Two `apply`s at once, or an `apply` beside other calls: each plans from the
    /// spec as it is when it starts, and its steps take the usual busy marks, so a step that meets
    /// another call on its device fails with [`Error::Busy`] or [`Error::DuplicateId`] (or finds
    /// its device gone: [`Error::NotFound`]) and changes nothing; the spec never parts from QEMU,
    /// and the next `apply` converges. Like every call, it runs to its end if its future is
    /// dropped: every step planned still runs.
    ///
    /// [`Error::Spec`] (nothing sent) when the desired spec contradicts itself.
    pub async fn apply(&self, desired: Desired) -> Result<Applied> {
        let vm = self.clone();
        self.call("apply", "", move |core, _| async move {
            let seen = crate::desired::seen(&core, &desired).await?;
            let plan = crate::desired::plan::plan(&seen, &desired)?;
            let Desired {
                mut nic_fds,
                concurrency,
                ..
            } = desired;
            let outcomes = crate::desired::apply::run(&plan.steps, concurrency, |i| {
                let step = plan.steps[i].clone();
                let taps = match &step.change {
                    Change::Add { id, .. } => nic_fds.remove(id),
                    _ => None,
                };
                let vm = vm.clone();
                async move { vm.run_step(step, taps).await }
            })
            .await;
            Ok(Applied {
                steps: plan.steps.into_iter().zip(outcomes).collect(),
                needs_restart: plan.needs_restart,
            })
        })
        .await
    }

    /// One step of a plan, as the public call it names.
    async fn run_step(&self, step: Step, taps: Option<Vec<std::os::fd::OwnedFd>>) -> Result<()> {
        use crate::desired::configs;
        match step.change {
            Change::Remove { kind, id } => match kind {
                DeviceKind::Disk => self.remove_disk(&id).await,
                DeviceKind::Nic => self.remove_nic(&id).await,
                DeviceKind::Cdrom => self.remove_cdrom(&id).await,
                DeviceKind::Memory => self.remove_memory(&id).await,
                DeviceKind::Balloon => self.remove_balloon(&id).await,
                DeviceKind::VhostUserBlk => self.remove_vhost_user_blk(&id).await,
                DeviceKind::VirtioFs => self.remove_virtio_fs(&id).await,
                DeviceKind::VirtioSerial => self.remove_virtio_serial(&id).await,
                DeviceKind::SerialPort => self.remove_serial_port(&id).await,
                DeviceKind::Rng => self.remove_rng(&id).await,
                DeviceKind::Vcpu => unreachable!("the planner removes no vCPU by id"),
            },
            Change::Add { .. } => match step.device {
                Some(Device::Disk(d)) => self.add_disk(configs::disk(&d)?).await.map(drop),
                Some(Device::Nic(n)) => self.add_nic(configs::nic(&n, taps)?).await.map(drop),
                Some(Device::Cdrom(c)) => self.add_cdrom(configs::cdrom(&c)?).await.map(drop),
                Some(Device::Memory(m)) => self.add_memory(configs::memory(&m)).await.map(drop),
                Some(Device::Balloon(b)) => self.add_balloon(configs::balloon(&b)).await.map(drop),
                Some(Device::VhostUserBlk(d)) => self
                    .add_vhost_user_blk(configs::vhost_user_blk(&d))
                    .await
                    .map(drop),
                Some(Device::VirtioFs(d)) => {
                    self.add_virtio_fs(configs::virtio_fs(&d)).await.map(drop)
                }
                Some(Device::VirtioSerial(d)) => self
                    .add_virtio_serial(configs::virtio_serial(&d))
                    .await
                    .map(drop),
                Some(Device::SerialPort(p)) => self
                    .add_serial_port(configs::serial_port(&p))
                    .await
                    .map(drop),
                Some(Device::Rng(r)) => self.add_rng(configs::rng(&r)).await.map(drop),
                Some(Device::Vcpu(_)) | None => unreachable!("the planner adds no vCPU by id"),
            },
            Change::ResizeDisk { id, from, to } if to < from => {
                self.shrink_disk(&id, to).await.map(drop)
            }
            Change::ResizeDisk { id, to, .. } => self.resize_disk(&id, to).await.map(drop),
            Change::SetIoLimits { id, limits } => self.set_io_limits(&id, limits).await,
            Change::SetLink { id, up } => self.set_link(&id, up).await,
            Change::ChangeMedium { id, medium } => {
                self.change_medium(&id, medium, MediumOptions::default())
                    .await
            }
            Change::SetVcpus { to, .. } => self.set_vcpus(to).await.map(drop),
            Change::ResizeVirtioMem { id, to, .. } => {
                self.resize_virtio_mem(&id, to).await.map(drop)
            }
            Change::SetBalloon { target } => self.set_balloon(target).await,
        }
    }

    /// Hot-adds a disk: opens the image, passes it with `add-fd`, adds the protocol and format
    /// nodes on `/dev/fdset/N`, lets go of the fd set once QEMU holds its own copy (`remove-fd`),
    /// then adds the device. Returns the disk as placed.
    ///
    /// `device_add` is the last step on purpose: undoing it would take a `device_del` that needs
    /// the guest's help, so every step that can fail comes before it. On failure everything done is
    /// undone and [`Error::Step`] names the step.
    pub async fn add_disk(&self, config: DiskConfig) -> Result<Disk> {
        self.add_kind("add_disk", config, no_check).await
    }

    /// Hot-adds a `virtio-net-pci` NIC: passes each tap fd (and vhost fd) with `getfd`, adds the
    /// netdev, then the device. Our copies of the fds are closed once QEMU has them. Returns the
    /// NIC as placed.
    pub async fn add_nic(&self, config: NicConfig) -> Result<Nic> {
        self.add_kind("add_nic", config, no_check).await
    }

    /// Hot-adds a `scsi-cd` drive on a virtio-scsi controller, empty or holding an ISO image (opened
    /// read-only and passed as an fd, like a disk's). Returns the drive as placed. Change its medium
    /// with [`change_medium`](Vm::change_medium).
    pub async fn add_cdrom(&self, config: CdromConfig) -> Result<Cdrom> {
        self.add_kind("add_cdrom", config, no_check).await
    }

    /// Hot-removes a `scsi-cd` drive: its medium out, `device_del`, wait for `DEVICE_DELETED`,
    /// then its medium's nodes. An `ide-cd` cannot be removed ([`Error::NotHotpluggable`]: IDE has
    /// no hotplug). Errors as for [`remove_disk`](Vm::remove_disk).
    pub async fn remove_cdrom(&self, id: &str) -> Result<()> {
        let policy = self.policy;
        self.call("remove_cdrom", id, move |core, id| async move {
            if let Some(Device::Cdrom(Cdrom {
                bus: CdromBus::Ide(_),
                ..
            })) = core.state().device(&id)
            {
                return Err(Error::NotHotpluggable {
                    id,
                    reason: "an IDE drive is there from boot to shutdown",
                });
            }
            engine::remove(&core, &id, DeviceKind::Cdrom, &policy).await
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
        self.remove_kind("remove_disk", id, DeviceKind::Disk).await
    }

    /// Hot-removes a NIC: `device_del`, wait for `DEVICE_DELETED`, then `netdev_del` (which closes
    /// QEMU's tap and vhost fds). Errors as for [`remove_disk`](Vm::remove_disk).
    pub async fn remove_nic(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_nic", id, DeviceKind::Nic).await
    }

    /// Takes NIC `id`'s link up or down (`set_link`): the guest sees its carrier follow, and the
    /// NIC stays plugged. The state is part of the NIC's spec, so a VM launched from `vm.spec()`
    /// starts with the link as it is now.
    pub async fn set_link(&self, id: &str, up: bool) -> Result<()> {
        self.call("set_link", id, move |core, id| async move {
            live::set_link(&core, &id, up).await
        })
        .await
    }

    /// Sets disk `id`'s I/O limits (`block_set_io_throttle`); `IoLimits::default()` clears them.
    /// Limits QEMU would refuse are [`Error::InvalidIoLimits`] before anything is sent. They are
    /// part of the disk's spec: a VM launched from `vm.spec()` gets them before it runs.
    pub async fn set_io_limits(&self, id: &str, limits: IoLimits) -> Result<()> {
        self.call("set_io_limits", id, move |core, id| async move {
            live::set_io_limits(&core, &id, limits).await
        })
        .await
    }

    /// The I/O limits QEMU applies to disk `id` now (`query-block`; all zero when none), without
    /// the throttle group QEMU names after a disk given none. [`Error::NotFound`] when QEMU has no
    /// such disk.
    pub async fn io_limits(&self, id: &str) -> Result<IoLimits> {
        live::io_limits(&self.core, id).await
    }

    /// Grows disk `id` to `size` bytes (`block_resize` on its format node); the guest's device
    /// follows. Refuses to shrink ([`Error::ShrinkRefused`]): shrinking a disk under a guest loses
    /// data unless the guest made room first, so it takes [`shrink_disk`](Vm::shrink_disk). The
    /// size must be a positive multiple of 512, and the disk writable. Returns the size before.
    pub async fn resize_disk(&self, id: &str, size: u64) -> Result<u64> {
        self.call("resize_disk", id, move |core, id| async move {
            live::resize(&core, &id, size, false).await
        })
        .await
    }

    /// Shrinks (or grows) disk `id` to `size` bytes: only once the guest no longer uses what is cut
    /// off. Returns the size before.
    pub async fn shrink_disk(&self, id: &str, size: u64) -> Result<u64> {
        self.call("resize_disk", id, move |core, id| async move {
            live::resize(&core, &id, size, true).await
        })
        .await
    }

    /// Starts copying disk `id` to a new image ([`MirrorConfig`]): the SDK creates the target
    /// (never over an existing file), opens it and hands it to QEMU as an fd, and starts
    /// `blockdev-mirror`. The returned [`BlockJob`] reports progress, pauses, resumes, sets the
    /// speed, and ends the copy: [`pivot`](BlockJob::pivot) (the disk runs on the copy from then
    /// on, and `vm.spec()` says so), [`abandon`](BlockJob::abandon) (a consistent copy, the
    /// disk stays), or [`cancel`](BlockJob::cancel). While it runs, the disk is busy: another
    /// job or a hot-remove of it is [`Error::Busy`] before anything is sent. A failure while
    /// starting undoes every step before it.
    pub async fn mirror_disk(&self, id: &str, config: MirrorConfig) -> Result<BlockJob> {
        self.call("mirror_disk", id, |core, id| async move {
            mirror::start(&core, &id, config).await
        })
        .await
    }

    /// Finds the job an earlier process started on disk `id` (an orchestrator that restarted and
    /// attached again): `mirror-<id>`, `commit-<id>`, `commit-<id>-gen<n>` or `stream-<id>` by
    /// `origin`, running or concluded, and gives its handle back (its progress goes on; its end
    /// reads the outcome, dismisses the job and brings the spec to what QEMU runs the disk on).
    /// `None` when QEMU has no such job. The disk is busy while the handle lives, as for a job
    /// started here. [`jobs`](Vm::jobs) finds them all without being told what they are.
    pub async fn find_job(&self, id: &str, origin: JobOrigin) -> Result<Option<BlockJob>> {
        found_job::find(&self.core, id, origin).await
    }

    /// Every storage job QEMU has that the SDK started on one of this VM's disks, running or
    /// concluded, as handles: what an orchestrator that restarted calls after
    /// [`attach`](Vm::attach). What each job was started to do is read from QEMU: the job's id
    /// (the SDK names its jobs after the operation and the disk) and, for a mirror, the target
    /// file behind the fd QEMU holds (`/proc/<qemu>/fd`; on the same host, as fd passing is).
    /// A concluded job's end ([`BlockJob::wait`]) reads its outcome and dismisses it. Jobs the
    /// SDK did not start are left alone; a mirror whose target cannot be told is left for
    /// [`find_job`](Vm::find_job), with a warning.
    pub async fn jobs(&self) -> Result<Vec<BlockJob>> {
        // Not through `call`: a caller that gives up must not have the handles made and dropped
        // (a dropped handle cancels its job); `all` makes them after its last await.
        found_job::all(&self.core).await
    }

    /// Starts a push backup of one or several disks at once ([`BackupConfig`]): full, or
    /// incremental since a checkpoint; each disk into a new image the SDK creates and hands to
    /// QEMU as an fd; all disks at one point in time (one QMP `transaction`), failing and
    /// cancelled together. With [`BackupConfig::checkpoint`] the backup also makes the point from
    /// which the next incremental one starts. A failure while starting undoes every step; the
    /// disks are busy until the returned [`Backup`] ends. A checkpoint that cannot be used (an
    /// unknown name; inconsistent after QEMU was killed) is [`Error::Checkpoint`], nothing sent.
    pub async fn backup(&self, config: BackupConfig) -> Result<Backup> {
        self.call("backup", "", |core, _| async move {
            backup::start(&core, config).await
        })
        .await
    }

    /// Starts a pull backup ([`PullConfig`]): each disk's view as of now served read-only by
    /// QEMU's NBD server for a backup tool to read at its pace, while the guest writes on (the
    /// blocks it overwrites are first copied into a scratch image the SDK creates). An
    /// incremental one offers the changed extents as a dirty bitmap. The returned
    /// [`PullBackup`] says where to read and ends it; a failure while starting undoes every step.
    pub async fn pull_backup(&self, config: PullConfig) -> Result<PullBackup> {
        self.call("pull_backup", "", |core, _| async move {
            pull::start(&core, config).await
        })
        .await
    }

    /// Disk `id`'s checkpoints, oldest first, as QEMU has them: whether each is usable, what
    /// it recorded, and what an incremental backup since it would copy now.
    pub async fn checkpoints(&self, id: &str) -> Result<Vec<CheckpointInfo>> {
        checkpoint::list(&self.core, id).await
    }

    /// Deletes checkpoint `name` of disk `id`, losing nothing: what it recorded joins the
    /// checkpoint before it, so an incremental backup since that one still copies everything.
    pub async fn delete_checkpoint(&self, id: &str, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.call("delete_checkpoint", id, move |core, id| async move {
            checkpoint::delete(&core, &id, &name).await
        })
        .await
    }

    /// Takes an external live snapshot of one or several disks at once ([`SnapshotConfig`]):
    /// each gets a new qcow2 overlay the SDK creates, all in one QMP `transaction`, so a failure
    /// leaves every disk as it was (and the overlays' nodes and files gone). Afterwards the
    /// guest writes into the overlays; each disk's image is under its overlay, unchanged, in the
    /// disk's backing chain ([`Disk::backing`]), which `vm.spec()` and a relaunch from it keep.
    /// Returns the disks as they now are. A disk with a job running is [`Error::Busy`].
    pub async fn snapshot(&self, config: SnapshotConfig) -> Result<Vec<Disk>> {
        self.call("snapshot", "", |core, _| async move {
            snapshot::snapshot(&core, config).await
        })
        .await
    }

    /// Starts merging disk `id`'s top image into the image under it (the active commit): wait
    /// for [`BlockJob::wait_ready`], then [`BlockJob::pivot`] moves the disk onto that image and
    /// deletes the top's nodes. A disk with no backing image is refused before anything is sent.
    pub async fn commit_disk(&self, id: &str) -> Result<BlockJob> {
        self.call("commit_disk", id, |core, id| async move {
            commit::start(&core, &id, None).await
        })
        .await
    }

    /// Starts merging backing layer `layer` of disk `id` ([`Disk::backing`], 0 the nearest) into
    /// the layer under it (an intermediate commit); it completes by itself:
    /// [`BlockJob::wait`]. The merged layer leaves the chain and its nodes go.
    pub async fn commit_layer(&self, id: &str, layer: usize) -> Result<BlockJob> {
        self.call("commit_disk", id, move |core, id| async move {
            commit::start(&core, &id, Some(layer)).await
        })
        .await
    }

    /// Starts pulling disk `id`'s backing chain into its top image ([`BlockJob::wait`] for its
    /// end): then the top stands alone, the images under it are no longer opened (their files
    /// can go), and `vm.spec()` has no backing chain for the disk.
    pub async fn stream_disk(&self, id: &str) -> Result<BlockJob> {
        self.call("stream_disk", id, |core, id| async move {
            stream::start(&core, &id).await
        })
        .await
    }

    /// Puts `medium` into CD-ROM drive `id`, replacing what was in it, and closes the tray: the
    /// ISO image at a path (opened read-only by the SDK and passed as an fd), or a
    /// [`NetworkSource`](qhotplug_cmdline::NetworkSource) QEMU opens read-only. See
    /// [`change_medium`](Vm::change_medium).
    pub async fn insert_medium(&self, id: &str, medium: impl Into<Medium>) -> Result<()> {
        self.change_medium(id, Some(medium.into()), MediumOptions::default())
            .await
    }

    /// Takes the medium out of CD-ROM drive `id` and closes the tray: the guest sees an empty
    /// drive. See [`change_medium`](Vm::change_medium).
    pub async fn eject_medium(&self, id: &str) -> Result<()> {
        self.change_medium(id, None, MediumOptions::default()).await
    }

    /// Changes the medium in CD-ROM drive `id` to `medium` (`None`: none), then
    /// closes the tray. On failure the drive is as it was ([`Error::Step`] names the step). A tray
    /// the guest holds locked is [`Error::TrayLocked`] unless `options` force it. The drive's
    /// medium is part of the spec: a VM launched from `vm.spec()` boots with it.
    pub async fn change_medium(
        &self,
        id: &str,
        medium: Option<Medium>,
        options: MediumOptions,
    ) -> Result<()> {
        self.call("change_medium", id, move |core, id| async move {
            medium::change(&core, &id, medium, options).await
        })
        .await
    }

    /// Drive `id`'s tray and medium, from `query-block`.
    pub async fn tray_status(&self, id: &str) -> Result<TrayStatus> {
        medium::tray_status(&self.core, id).await
    }

    /// Brings the VM to `count` vCPUs. Up: hot-adds a vCPU into each of the lowest free slots
    /// (ids `vcpu<N>`, N the slot's index), then, on a running VM, waits (by the handle's
    /// [`UnplugPolicy`] deadline) for the guest's ACPI acknowledgement of each. Down: hot-removes
    /// the SDK's vCPUs, highest first, each waiting for the guest to let it go. The guest must
    /// online new vCPUs itself.
    ///
    /// A count below the vCPUs the SDK cannot remove (those from `-smp`) or above `maxcpus` is
    /// [`Error::InvalidVcpuCount`] before anything is sent; under TCG, what would crash QEMU is
    /// refused too ([`Error::TcgVcpuUnplug`], [`Error::TcgVcpuContexts`]; the README's QEMU
    /// section). The vCPUs are part of the spec: a VM launched from `vm.spec()` has them, with
    /// their ids.
    pub async fn set_vcpus(&self, count: u32) -> Result<VcpuChange> {
        let policy = self.policy;
        self.call("set_vcpus", &count.to_string(), move |core, _| async move {
            cpus::set_vcpus(&core, count, &policy).await
        })
        .await
    }

    /// [`set_vcpus`](Vm::set_vcpus), then the guest agent brings the new vCPUs online (only
    /// those: the guest's ids it did not list before), and [`VcpuChange::guest`] says what it did
    /// and what the guest now has: the guest's acknowledgement and its listing are waited for by
    /// the handle's unplug deadline, a CPU the guest could not online is listed with its words.
    ///
    /// The agent must be running ([`Vm::agent`]); if not, [`Error::Agent`] with
    /// `NotRunning` before anything is sent. If the agent fails after the hot-add, the vCPUs stay
    /// (`vm.spec()` has them) and the error is the agent's.
    pub async fn set_vcpus_online(&self, count: u32) -> Result<VcpuChange> {
        let agent = self.agent().await?;
        onlining::vcpus(&agent, self.policy.deadline, self.set_vcpus(count)).await
    }

    /// The VM's vCPU slots, as QEMU lists them (plugged ones have a `qom_path`), in slot order.
    pub async fn vcpu_slots(&self) -> Result<Vec<HotpluggableCpu>> {
        cpus::vcpu_slots(&self.core).await
    }

    /// Hot-adds a memory device: its backend (`object-add`), then the device. A DIMM with no
    /// memory slot left is [`Error::NoFreeSlot`], a device that would take the VM over `maxmem`
    /// is [`Error::OverMaxMemory`], both from `query-memory-devices` before anything is sent. The
    /// guest onlines the new memory (with `memhp_default_state=online_movable` on its kernel
    /// command line, as movable memory it can give back).
    pub async fn add_memory(&self, config: MemoryConfig) -> Result<MemoryDevice> {
        let id = config.id().to_owned();
        self.call("add_memory", &id, |core, _| async move {
            memory::check_fits(&core, &config).await?;
            engine::add(&core, config).await
        })
        .await
    }

    /// [`add_memory`](Vm::add_memory), then the guest agent brings the new memory blocks online
    /// (for a guest that does not online hot-plugged memory itself; blocks it already onlined are
    /// listed in [`Onlined::new`] only). The blocks of the device's size (a virtio-mem device's
    /// `requested`) are waited for by the handle's unplug deadline. The agent must be running,
    /// as for [`set_vcpus_online`](Vm::set_vcpus_online).
    pub async fn add_memory_online(&self, config: MemoryConfig) -> Result<(MemoryDevice, Onlined)> {
        let agent = self.agent().await?;
        onlining::memory(&agent, self.policy.deadline, self.add_memory(config)).await
    }

    /// Hot-removes a memory device: `device_del`, wait for the guest to let it go, then its
    /// backend (`object-del`). A guest that cannot give the memory back (onlined as normal memory,
    /// or in use) refuses: [`Error::UnplugRejected`] as soon as QEMU says so (ACPI `_OST` 0x82 for
    /// a DIMM), and the device and its backend stay.
    pub async fn remove_memory(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_memory", id, DeviceKind::Memory)
            .await
    }

    /// Asks the guest to plug `requested` bytes of virtio-mem device `id` (grow or shrink), and
    /// waits, by the handle's unplug deadline, for `MEMORY_DEVICE_SIZE_CHANGE` to say it did.
    /// Returns what the guest has plugged then, which may fall short of `requested` (the guest
    /// could not free enough, or is slow). `requested` must be a multiple of the device's block
    /// size and at most its size ([`Error::InvalidSize`]).
    pub async fn resize_virtio_mem(&self, id: &str, requested: u64) -> Result<u64> {
        let deadline = self.policy.deadline;
        self.call("resize_virtio_mem", id, move |core, id| async move {
            memory::resize_vmem(&core, &id, requested, deadline).await
        })
        .await
    }

    /// Hot-adds a `virtio-balloon-pci`. Drive it with [`set_balloon`](Vm::set_balloon).
    pub async fn add_balloon(&self, config: BalloonConfig) -> Result<Balloon> {
        self.add_kind("add_balloon", config, no_check).await
    }

    /// Hot-removes the balloon.
    pub async fn remove_balloon(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_balloon", id, DeviceKind::Balloon)
            .await
    }

    /// Asks the guest's balloon driver to bring the guest's memory to `target` bytes (`balloon`).
    /// The guest gives memory back at its own pace: follow [`balloon_actual`](Vm::balloon_actual)
    /// or `BALLOON_CHANGE` events.
    pub async fn set_balloon(&self, target: u64) -> Result<()> {
        self.call(
            "set_balloon",
            &target.to_string(),
            move |core, _| async move { memory::set_balloon(&core, target).await },
        )
        .await
    }

    /// The guest's memory as the balloon leaves it, in bytes (`query-balloon`).
    /// [`Error::NotFound`] for the balloon when the VM has none.
    pub async fn balloon_actual(&self) -> Result<u64> {
        memory::balloon_actual(&self.core).await
    }

    /// Hot-adds a vhost-user disk: `chardev-add` (QEMU connects to the backend's socket), then
    /// `device_add vhost-user-blk-pci`. The VM's memory must be shared
    /// ([`Error::NeedsSharedMemory`] otherwise, before anything is sent).
    pub async fn add_vhost_user_blk(&self, config: VhostUserBlkConfig) -> Result<VhostUserBlk> {
        self.add_kind("add_vhost_user_blk", config, |core, c| {
            virtio_devices::require_shared_memory(core, c.id())
        })
        .await
    }

    /// Hot-removes a vhost-user disk: `device_del`, wait for the guest, then `chardev-remove`.
    pub async fn remove_vhost_user_blk(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_vhost_user_blk", id, DeviceKind::VhostUserBlk)
            .await
    }

    /// Hot-adds a virtio-fs share on virtiofsd's socket; the guest mounts it by its tag
    /// (`mount -t virtiofs <tag> /mnt`). The VM's memory must be shared.
    pub async fn add_virtio_fs(&self, config: VirtioFsConfig) -> Result<VirtioFs> {
        self.add_kind("add_virtio_fs", config, |core, c| {
            virtio_devices::require_shared_memory(core, c.id())
        })
        .await
    }

    /// Hot-removes a virtio-fs share (the guest must have unmounted it to let it go).
    pub async fn remove_virtio_fs(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_virtio_fs", id, DeviceKind::VirtioFs)
            .await
    }

    /// Hot-adds a `virtio-serial-pci` controller, for [`add_serial_port`](Vm::add_serial_port).
    pub async fn add_virtio_serial(&self, config: VirtioSerialConfig) -> Result<VirtioSerial> {
        self.add_kind("add_virtio_serial", config, no_check).await
    }

    /// Hot-removes a virtio-serial controller; its ports must be removed first
    /// ([`Error::NotHotpluggable`] otherwise).
    pub async fn remove_virtio_serial(&self, id: &str) -> Result<()> {
        let policy = self.policy;
        self.call("remove_virtio_serial", id, move |core, id| async move {
            virtio_devices::remove_virtio_serial(&core, &id, &policy).await
        })
        .await
    }

    /// Hot-adds a named serial port on a controller the SDK knows, with QEMU listening on the
    /// config's socket for the host's side.
    pub async fn add_serial_port(&self, config: SerialPortConfig) -> Result<SerialPort> {
        self.add_kind("add_serial_port", config, virtio_devices::controller_known)
            .await
    }

    /// Hot-removes a serial port, then its chardev.
    pub async fn remove_serial_port(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_serial_port", id, DeviceKind::SerialPort)
            .await
    }

    /// Hot-adds a virtio RNG: its `rng-random` source, then the device.
    pub async fn add_rng(&self, config: RngConfig) -> Result<Rng> {
        self.add_kind("add_rng", config, no_check).await
    }

    /// Hot-removes a virtio RNG, then its source.
    pub async fn remove_rng(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_rng", id, DeviceKind::Rng).await
    }

    /// A launcher for this VM's migration target: its spec as it is now (every hot-plugged
    /// device in), waiting for the migration (`-incoming defer`) rather than paused. Give it each
    /// NIC's new tap fds ([`Launcher::nic_fds`]) and, where the spec names host paths the source
    /// still holds (a console socket), new ones ([`Launcher::spec_mut`]); then [`Vm::launch`].
    pub fn migration_launcher(&self, runtime_dir: impl Into<PathBuf>) -> Launcher {
        migrate::migration_launcher(self.spec(), runtime_dir.into())
    }

    /// Migrates the guest to `target` (launched from [`migration_launcher`](Vm::migration_launcher)
    /// and not yet migrated into), calling `progress` at each status change and each pass.
    /// Returns the running target, or [`Error::Migration`] with the source running as before and
    /// the target QEMU quit. Dropping the future cancels the migration (the one call that a drop
    /// stops: it is what a caller who gives up on a migration wants).
    pub async fn migrate(
        &self,
        target: Vm,
        options: MigrationOptions,
        progress: impl FnMut(&Progress),
    ) -> Result<Migrated> {
        let start = std::time::Instant::now();
        let info = migrate::migrate(&self.core, &target.core, options, progress).await?;
        let millis = |ms: Option<u64>| Duration::from_millis(ms.unwrap_or(0));
        Ok(Migrated {
            target,
            total_time: millis(info.total_time),
            downtime: millis(info.downtime),
            elapsed: start.elapsed(),
        })
    }

    /// Saves the VM to a new file at `path` (refused if one is there) and stops it: the
    /// migration stream goes into the file, `progress` told at each status change and pass, and
    /// QEMU quits once it completed. [`Vm::restore`] brings it back. A save that fails (its file
    /// system full) leaves the VM running as it was and removes the file: [`Error::Migration`]
    /// with QEMU's reason. Dropping the future cancels the save, as a migration's.
    pub async fn save(
        &self,
        path: impl AsRef<Path>,
        progress: impl FnMut(&Progress),
    ) -> Result<()> {
        let span = hotplug_span("save", &self.spec().name);
        save::save(&self.core, path.as_ref(), progress)
            .instrument(span)
            .await?;
        Ok(())
    }

    /// Restores a VM saved with [`Vm::save`] into a new QEMU launched from `launcher` (the saved
    /// VM's spec, every hot-plugged device in: [`Vm::spec`] kept before the save), which waits
    /// for the file (`-incoming defer`) and runs on where the guest was once it is read. A
    /// restore that fails quits the new QEMU.
    pub async fn restore(launcher: Launcher, path: impl AsRef<Path>) -> Result<Vm> {
        let mut launcher = launcher;
        launcher.spec_mut().incoming = true;
        launcher.spec_mut().paused = false;
        let span = hotplug_span("restore", &launcher.spec().name);
        let vm = Vm::launch(launcher).await?;
        let restored = save::restore(&vm.core, path.as_ref())
            .instrument(span)
            .await;
        if let Err(error) = restored {
            if let Err(e) = vm.core.quit().await {
                tracing::warn!(error = %e, "quitting the QEMU a restore failed in");
            }
            return Err(error);
        }
        Ok(vm)
    }

    /// Cancels this VM's outgoing migration (`migrate_cancel`): the pending [`migrate`](Vm::migrate)
    /// returns [`MigrationFailure::Cancelled`](crate::MigrationFailure::Cancelled) and the source
    /// runs on.
    pub async fn cancel_migration(&self) -> Result<()> {
        self.call("cancel_migration", "", |core, _| async move {
            migrate::cancel(&core).await
        })
        .await
    }

    /// A hot-remove as a call of its own (see [`Vm::call`]).
    async fn remove_kind(&self, op: &'static str, id: &str, kind: DeviceKind) -> Result<()> {
        let policy = self.policy;
        self.call(op, id, move |core, id| async move {
            engine::remove(&core, &id, kind, &policy).await
        })
        .await
    }

    /// A hot-add as a call of its own (see [`Vm::call`]): `check` (what only the VM's state can
    /// answer) first, then the engine.
    async fn add_kind<K: Plug + Send + 'static>(
        &self,
        op: &'static str,
        config: K,
        check: impl FnOnce(&Core, &K) -> Result<()> + Send + 'static,
    ) -> Result<K::Added>
    where
        K::Added: Send + 'static,
    {
        let id = config.id().to_owned();
        self.call(op, &id, |core, _| async move {
            check(&core, &config)?;
            engine::add(&core, config).await
        })
        .await
    }
}

/// The check of a kind that needs none before the engine's.
fn no_check<K>(_: &Core, _: &K) -> Result<()> {
    Ok(())
}

/// A completed migration.
#[derive(Debug)]
pub struct Migrated {
    /// The VM on the target, running.
    pub target: Vm,
    /// The whole migration, as QEMU measured it.
    pub total_time: Duration,
    /// How long the guest was paused, as QEMU measured it.
    pub downtime: Duration,
    /// The whole call, as the caller saw it.
    pub elapsed: Duration,
}

/// Refuses a QEMU older than [`MIN_QEMU`] before anything is sent to it.
fn check_version(client: &Client) -> Result<()> {
    let found = client.greeting().version.qemu;
    if found < MIN_QEMU {
        return Err(Error::QemuTooOld {
            found,
            minimum: MIN_QEMU,
        });
    }
    Ok(())
}
