//! A virtio RNG: `object-add rng-random` (reading a host source) → `device_add virtio-rng-pci`.
//! Teardown: `object-del`.

use std::path::PathBuf;

use qhotplug_cmdline::{DeviceModel, Pci, Rng};

use super::{Backend, Place, Placed, Plan, Plug, Want};
use crate::error::Result;
use crate::qemu::delete::Delete;

/// A `virtio-rng-pci` to hot-add.
///
/// ```
/// let rng = qhotplug::RngConfig::new("rng0");
/// # let _ = rng;
/// ```
#[derive(Debug, Clone)]
pub struct RngConfig {
    id: String,
    source: PathBuf,
    at: Option<Pci>,
}

impl RngConfig {
    /// An RNG reading `/dev/urandom`, in a free PCI slot.
    pub fn new(id: impl Into<String>) -> Self {
        RngConfig {
            id: id.into(),
            source: "/dev/urandom".into(),
            at: None,
        }
    }

    /// Reads this host source instead.
    pub fn source(mut self, path: impl Into<PathBuf>) -> Self {
        self.source = path.into();
        self
    }

    /// At this PCI address instead of a free one.
    pub fn at_pci(mut self, pci: Pci) -> Self {
        self.at = Some(pci);
        self
    }
}

impl Plug for RngConfig {
    type Added = Rng;
    const OPERATION: &'static str = "RNG hotplug";
    const COMMANDS: &'static [&'static str] =
        &["object-add", "object-del", "device_add", "device_del"];

    fn id(&self) -> &str {
        &self.id
    }

    fn want(&self) -> Result<Want> {
        Ok(Want::Pci(self.at.clone()))
    }

    fn plan(self, place: Place) -> Result<Plan<Rng>> {
        let pci = place.pci(&self.id)?;
        let rng = Rng {
            id: self.id,
            pci,
            source: self.source,
        };
        rng.check()?;
        Ok(Plan {
            backends: vec![Backend::Object(rng.object_add())],
            device: rng.device_add(),
            after: Vec::new(),
            added: rng,
        })
    }
}

impl Placed for Rng {
    type Config = RngConfig;

    fn place(&self) -> Place {
        Place::Pci(self.pci.clone())
    }

    /// Its source object.
    fn teardown(&self) -> Vec<Delete> {
        vec![Delete::Object(qhotplug_cmdline::names::rng(&self.id))]
    }
}
