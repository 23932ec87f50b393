//! QEMU's real state, the host's and the guest's, compared with what the SDK says
//! (`vm.spec()`): the check the race and apply tests run after each round.

use std::collections::BTreeSet;
use std::time::Duration;

use qhotplug::Vm;
use qhotplug_cmdline::names;
use qhotplug_qmp::command::{PciInfo, QueryNamedBlockNodes, QueryPci};

use crate::{Console, Snapshot};

/// What a check compares, and with what.
pub struct Check<'a> {
    /// The handle whose spec is compared (and that plugs a probe when reconciled).
    pub vm: &'a Vm,
    /// QEMU's process, for its fd table.
    pub pid: u32,
    /// The guest's console, for each NIC's carrier.
    pub console: &'a Console,
    /// What the VM had before the test's calls.
    pub start: &'a Start,
    /// The prefix of the host taps the test makes.
    pub tap_prefix: &'a str,
    /// Peripherals someone else plugs, behind the SDK's back.
    pub ignore: &'a [&'a str],
    /// How long the guest may take to show a change.
    pub seen: Duration,
}

/// The q35 root ports with nothing behind them, by id.
pub fn free_ports(pci: &[PciInfo]) -> Vec<String> {
    pci.iter()
        .flat_map(|b| &b.devices)
        .filter_map(|d| {
            let bridge = d.pci_bridge.as_ref()?;
            (d.qdev_id.starts_with("rp") && bridge.devices.is_empty()).then(|| d.qdev_id.clone())
        })
        .collect()
}

/// What QEMU, the host and the guest have, compared with `vm.spec()` of `check.vm`; each
/// difference in words. With `reconciled`, the SDK has also seen devices plugged behind its back,
/// so a root port QEMU has free must be one it hands out.
pub async fn differences(check: &Check<'_>, reconciled: bool) -> Vec<String> {
    let vm = check.vm;
    let start = check.start;
    let c = vm.client();
    let spec = vm.spec();
    let mut out = Vec::new();
    let pending: BTreeSet<String> = spec
        .disks
        .iter()
        .map(|d| &d.id)
        .chain(spec.nics.iter().map(|n| &n.id))
        .chain(spec.cdroms.iter().map(|c| &c.id))
        .filter(|id| vm.unplug_pending(id))
        .cloned()
        .collect();

    let snapshot = Snapshot::take_of(vm, Some(check.pid)).await;

    // Devices.
    let peripherals: BTreeSet<String> = snapshot
        .peripherals
        .iter()
        .filter(|id| !check.ignore.contains(&id.as_str()) && !pending.contains(*id))
        .cloned()
        .collect();
    let mut expected: BTreeSet<String> = start.peripherals.clone();
    expected.extend(spec.disks.iter().map(|d| d.id.clone()));
    expected.extend(spec.nics.iter().map(|n| n.id.clone()));
    expected.extend(spec.cdroms.iter().map(|c| c.id.clone()));
    expected.extend(spec.vcpus.iter().map(|c| c.id.clone()));
    expected.extend(spec.rngs.iter().map(|r| r.id.clone()));
    expected.extend(spec.memory_devices.iter().map(|m| m.id.clone()));
    expected.extend(spec.serial_ports.iter().map(|p| p.id.clone()));
    expected.extend(spec.virtio_serials.iter().map(|p| p.id.clone()));
    expected.extend(spec.balloon.iter().map(|b| b.id.clone()));
    expected.extend(spec.vhost_user_blks.iter().map(|d| d.id.clone()));
    expected.extend(spec.virtio_fs.iter().map(|d| d.id.clone()));
    expected.retain(|id| !pending.contains(id));
    differ(
        &mut out,
        "peripherals",
        format!("{peripherals:?}"),
        format!("{expected:?}"),
    );

    // Block nodes, sizes, limits, media.
    let nodes = c
        .execute(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .expect("query-named-block-nodes");
    let names: BTreeSet<String> = nodes.iter().filter_map(|n| n.node_name.clone()).collect();
    let mut want: BTreeSet<String> = start.nodes.clone();
    for d in &spec.disks {
        want.extend(d.node_names());
    }
    for cd in spec.cdroms.iter().filter(|c| c.medium.is_some()) {
        want.extend([cd.file_node(), cd.top_node()]);
    }
    differ(
        &mut out,
        "block nodes",
        format!("{names:?}"),
        format!("{want:?}"),
    );
    let blocks = &snapshot.block;
    for d in &spec.disks {
        let size = nodes
            .iter()
            .find(|n| n.node_name.as_deref() == Some(d.top_node().as_str()))
            .and_then(|n| n.image.as_ref())
            .map(|i| i.virtual_size as u64);
        // A raw image's size is its file's length; a qcow2 one's is in its header.
        let file = match d.format {
            qhotplug::Format::Raw => std::fs::metadata(&d.path).map(|m| m.len()).ok(),
            _ => crate::storage::virtual_size(&d.path),
        };
        differ(
            &mut out,
            &format!("{} size (node, file)", d.id),
            format!("{size:?}"),
            format!("{file:?}"),
        );
        differ(
            &mut out,
            &format!("{} I/O limits", d.id),
            format!("{:?}", vm.io_limits(&d.id).await.ok()),
            format!("{:?}", Some(d.io_limits.clone().unwrap_or_default())),
        );
    }
    for cd in &spec.cdroms {
        let inserted = blocks
            .iter()
            .find(|b| b.qdev.as_deref() == Some(cd.id.as_str()))
            .and_then(|b| b.inserted.as_ref())
            .and_then(|i| i.node_name.clone());
        let want = cd.medium.as_ref().map(|_| cd.top_node());
        differ(
            &mut out,
            &format!("{} medium", cd.id),
            format!("{inserted:?}"),
            format!("{want:?}"),
        );
    }

    // Fd sets: every tag of ours names a disk or drive the SDK lists.
    for set in &snapshot.fdsets {
        for fd in &set.fds {
            let Some(id) = fd
                .opaque
                .as_deref()
                .and_then(|t| t.strip_prefix("qhotplug:"))
            else {
                continue;
            };
            let listed =
                spec.disks.iter().any(|d| d.id == id) || spec.cdroms.iter().any(|c| c.id == id);
            if !listed {
                out.push(format!(
                    "fd set {} of {id}, which the SDK does not list",
                    set.fdset_id
                ));
            }
        }
    }

    // Netdevs (HMP's `info network`: 7.2 has no query for them), objects, chardevs.
    let netdevs: BTreeSet<String> = snapshot
        .network
        .lines()
        .filter_map(|l| l.trim_start_matches([' ', '\\']).split(": index=").next())
        .filter(|name| name.ends_with("-net"))
        .map(str::to_owned)
        .collect();
    let want: BTreeSet<String> = spec.nics.iter().map(|n| n.netdev_id()).collect();
    differ(
        &mut out,
        "netdevs",
        format!("{netdevs:?}"),
        format!("{want:?}"),
    );
    let objects: BTreeSet<String> = snapshot.objects.iter().cloned().collect();
    let mut want = start.objects.clone();
    want.extend(spec.rngs.iter().map(|r| names::rng(&r.id)));
    want.extend(spec.memory_devices.iter().map(|m| names::memdev(&m.id)));
    differ(
        &mut out,
        "objects",
        format!("{objects:?}"),
        format!("{want:?}"),
    );
    let chardevs: BTreeSet<String> = snapshot.chardevs.iter().cloned().collect();
    let mut want = start.chardevs.clone();
    want.extend(spec.serial_ports.iter().map(|p| names::chardev(&p.id)));
    want.extend(spec.vhost_user_blks.iter().map(|d| names::chardev(&d.id)));
    want.extend(spec.virtio_fs.iter().map(|d| names::chardev(&d.id)));
    differ(
        &mut out,
        "chardevs",
        format!("{chardevs:?}"),
        format!("{want:?}"),
    );

    // vCPUs.
    let plugged = snapshot
        .cpus
        .iter()
        .filter(|s| s.qom_path.is_some())
        .count();
    differ(
        &mut out,
        "plugged vCPUs",
        plugged.to_string(),
        (start.vcpus + spec.vcpus.len()).to_string(),
    );

    // Slots: once reconciled, a free root port in QEMU is one the SDK hands out (q35).
    if reconciled && spec.machine == qhotplug::Machine::Q35 {
        let pci = c.execute(&QueryPci).await.expect("query-pci");
        if !free_ports(&pci).is_empty() {
            let probe = qhotplug::RngConfig::new("probe");
            match vm.add_rng(probe).await {
                Ok(_) => vm.remove_rng("probe").await.expect("remove the probe"),
                Err(e) => out.push(format!("QEMU has a free root port, the SDK says {e}")),
            }
        }
    }

    // Host: our fds, and a tap per NIC.
    differ(
        &mut out,
        "our fds",
        format!("{:?}", snapshot.our_fds),
        format!("{:?}", start.our_fds),
    );
    // QEMU holds a tap fd per queue of each NIC it has, and none else (a `getfd` left behind
    // would show here).
    let tun_fds = snapshot
        .qemu_fds
        .iter()
        .filter(|t| *t == "/dev/net/tun")
        .count();
    let queues: usize = spec.nics.iter().map(|n| usize::from(n.queues)).sum();
    differ(
        &mut out,
        "QEMU's tap fds",
        tun_fds.to_string(),
        queues.to_string(),
    );
    // A tap goes once its last fd is closed; the kernel may take a while to unregister it when
    // the machine is busy (IPv6 address configuration holds it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while taps(check.tap_prefix) != spec.nics.len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    differ(
        &mut out,
        "host taps",
        taps(check.tap_prefix).to_string(),
        spec.nics.len().to_string(),
    );

    // The guest: each NIC's carrier is its recorded link.
    if out.is_empty() && !spec.nics.is_empty() {
        let want: BTreeSet<String> = spec
            .nics
            .iter()
            .map(|n| format!("{} {}", n.mac, u8::from(n.link_up)))
            .collect();
        // Panics at the deadline, naming what the guest still says.
        check
            .console
            .until(
                "for i in /sys/class/net/eth*; do ip link set ${i##*/} up; echo $(cat $i/address) $(cat $i/carrier); done",
                |lines| lines.iter().cloned().collect::<BTreeSet<_>>() == want,
                check.seen,
            )
            .await;
    }
    out
}

/// Records a difference between QEMU's `qemu` and the SDK's `sdk`.
pub fn differ(out: &mut Vec<String>, what: &str, qemu: String, sdk: String) {
    if qemu != sdk {
        out.push(format!("{what}: QEMU {qemu}, SDK {sdk}"));
    }
}

/// The host's taps whose names start with `prefix`.
pub fn taps(prefix: &str) -> usize {
    std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .count()
}

/// What the VM had before any call: what the SDK's own devices are compared beside.
#[derive(Clone)]
pub struct Start {
    peripherals: BTreeSet<String>,
    nodes: BTreeSet<String>,
    objects: BTreeSet<String>,
    chardevs: BTreeSet<String>,
    vcpus: usize,
    our_fds: Vec<(i32, String)>,
}

impl Start {
    /// The same, with our fd table as it is now: for a check of a handle attached since (its
    /// monitor connection is one of ours).
    pub fn with_our_fds_now(&self) -> Start {
        Start {
            our_fds: crate::open_fds(),
            ..self.clone()
        }
    }

    /// Reads it through `vm`, QEMU's fds from process `pid`.
    pub async fn take(vm: &Vm, pid: u32) -> Start {
        let s = Snapshot::take_of(vm, Some(pid)).await;
        Start {
            peripherals: s.peripherals.into_iter().collect(),
            nodes: s.nodes.into_iter().collect(),
            objects: s.objects.into_iter().collect(),
            chardevs: s.chardevs.into_iter().collect(),
            vcpus: s.cpus.iter().filter(|c| c.qom_path.is_some()).count(),
            our_fds: s.our_fds,
        }
    }
}
