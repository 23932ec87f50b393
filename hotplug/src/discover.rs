//! Learning a VM's layout from QEMU when the SDK attaches, and again when it reconciles: the
//! machine type, the PCI buses and occupied slots (`query-pci`, and each device's QOM
//! `parent_bus` and `addr`, which also covers what sits behind q35 root ports before the firmware
//! has numbered their buses), the virtio-scsi controllers (added to the spec where the caller's
//! did not name them), and the ids of the devices QEMU has.

use std::collections::HashSet;

use qhotplug_cmdline::names;
use qhotplug_cmdline::{Machine, Pci, ScsiController, VmSpec};
use qhotplug_qmp::command::{QomGet, QomList, QueryPci};
use qhotplug_qmp::Client;

use crate::error::Result;
use crate::slots::{PciMap, ScsiMap};
use crate::state::State;

/// What QEMU's QOM tree says about its devices.
pub(crate) struct Peripherals {
    /// The ids of the devices made with one (`/machine/peripheral`).
    pub(crate) ids: HashSet<String>,
    /// The buses of the virtio-scsi controllers (`<id>.0`).
    pub(crate) scsi_buses: Vec<String>,
    /// The virtio-scsi controllers whose place QOM gave.
    pub(crate) scsi_controllers: Vec<ScsiController>,
    /// Where every PCI device sits: each device's `parent_bus` (a path ending in the bus name) and
    /// `addr` (slot × 8 + function). Unlike `query-pci`, this does not depend on the firmware having
    /// numbered the buses, so it sees what sits behind q35 root ports on a VM that has not run yet.
    pub(crate) placements: Vec<Pci>,
}

pub(crate) async fn scan_peripherals(client: &Client) -> Result<Peripherals> {
    let mut found = Peripherals {
        ids: HashSet::new(),
        scsi_buses: Vec::new(),
        scsi_controllers: Vec::new(),
        placements: Vec::new(),
    };
    let mut paths = Vec::new();
    let mut controllers = HashSet::new();
    for container in [names::PERIPHERAL, names::PERIPHERAL_ANON] {
        let children = client
            .execute(&QomList {
                path: container.into(),
            })
            .await?;
        for child in children {
            let Some(kind) = child.child_type() else {
                continue;
            };
            if container == names::PERIPHERAL {
                if kind == "virtio-scsi-pci" {
                    found.scsi_buses.push(names::controller_bus(&child.name));
                    controllers.insert(child.name.clone());
                }
                found.ids.insert(child.name.clone());
            }
            paths.push(format!("{container}/{}", child.name));
        }
    }
    let get = |path: &str, property: &'static str| {
        let get = QomGet {
            path: path.to_owned(),
            property: property.into(),
        };
        async move { client.execute(&get).await }
    };
    // All asked at once: the connection pipelines them.
    let places = futures::future::join_all(
        paths
            .iter()
            .map(|path| futures::future::join(get(path, "parent_bus"), get(path, "addr"))),
    )
    .await;
    for (path, (bus, addr)) in paths.iter().zip(places) {
        // Not a PCI device (no `addr`), or one going away right now: nothing to mark.
        let (Ok(bus), Ok(addr)) = (bus, addr) else {
            continue;
        };
        let (Some(bus), Some(addr)) = (bus.as_str(), addr.as_u64()) else {
            continue;
        };
        let Some(pci) = pci_at(bus, addr) else {
            continue;
        };
        if let Some(id) = path.strip_prefix(&format!("{}/", names::PERIPHERAL)) {
            if controllers.contains(id) {
                found.scsi_controllers.push(ScsiController {
                    id: id.to_owned(),
                    pci: pci.clone(),
                });
            }
        }
        found.placements.push(pci);
    }
    Ok(found)
}

/// The PCI address a device's QOM `parent_bus` (a path ending in the bus name) and `addr`
/// (slot × 8 + function) say.
pub(crate) fn pci_at(parent_bus: &str, addr: u64) -> Option<Pci> {
    let bus = parent_bus.rsplit('/').next().filter(|n| !n.is_empty())?;
    Some(Pci {
        bus: bus.to_owned(),
        slot: u8::try_from(addr >> 3).unwrap_or(u8::MAX),
        function: (addr & 7) as u8,
    })
}

/// The SDK's starting view of a VM: `spec` (what the caller knows), corrected and completed by
/// what QEMU reports. The machine type is QEMU's own.
pub(crate) async fn discover(client: &Client, mut spec: VmSpec) -> Result<State> {
    let machine_type = client
        .execute(&QomGet {
            path: "/machine".into(),
            property: "type".into(),
        })
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
    let found = scan_peripherals(client).await?;
    for placed in &found.placements {
        pci.mark(placed);
    }
    // A controller QEMU has is in the view, whether or not the caller's spec named it.
    for c in found.scsi_controllers {
        if !spec.scsi_controllers.iter().any(|x| x.id == c.id) {
            spec.scsi_controllers.push(c);
        }
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
    Ok(State::new(spec, pci, scsi))
}
