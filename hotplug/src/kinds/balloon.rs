//! The memory balloon: one `virtio-balloon-pci` in a PCI slot, no backend. See
//! [`Vm::set_balloon`](crate::Vm::set_balloon) for driving it.

use qhotplug_cmdline::{Balloon, DeviceModel, Pci};

use super::{Place, Placed, Plan, Plug, Want};
use crate::error::Result;

/// A `virtio-balloon-pci` to hot-add.
///
/// ```
/// let balloon = qhotplug::BalloonConfig::new("balloon0");
/// # let _ = balloon;
/// ```
#[derive(Debug, Clone)]
pub struct BalloonConfig {
    id: String,
    at: Option<Pci>,
}

impl BalloonConfig {
    /// A balloon in a free PCI slot.
    pub fn new(id: impl Into<String>) -> Self {
        BalloonConfig {
            id: id.into(),
            at: None,
        }
    }

    /// At this PCI address instead of a free one.
    pub fn at_pci(mut self, pci: Pci) -> Self {
        self.at = Some(pci);
        self
    }
}

impl Plug for BalloonConfig {
    type Added = Balloon;
    const OPERATION: &'static str = "balloon hotplug";
    const COMMANDS: &'static [&'static str] =
        &["device_add", "device_del", "balloon", "query-balloon"];

    fn id(&self) -> &str {
        &self.id
    }

    fn want(&self) -> Result<Want> {
        Ok(Want::Pci(self.at.clone()))
    }

    fn plan(self, place: Place) -> Result<Plan<Balloon>> {
        let pci = place.pci(&self.id)?;
        qhotplug_cmdline::validate_id(&self.id)?;
        let balloon = Balloon { id: self.id, pci };
        Ok(Plan {
            backends: Vec::new(),
            device: balloon.device_add(),
            after: Vec::new(),
            added: balloon,
        })
    }
}

impl Placed for Balloon {
    type Config = BalloonConfig;

    fn place(&self) -> Place {
        Place::Pci(self.pci.clone())
    }
}
