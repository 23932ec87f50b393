//! A `virtio-rng-pci` on an `rng-random` object (`<id>-rng`) reading a host source.

use std::path::PathBuf;

use qhotplug_qmp::command::{DeviceAdd, ObjectAdd};

use crate::device::{device_add, p, props_to_json, Pci, Props};
use crate::error::Result;
use crate::names;
use crate::value::{render, validate_id};

/// A virtio RNG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    /// The device id.
    pub id: String,
    /// Where it sits.
    pub pci: Pci,
    /// The host's entropy source (`/dev/urandom`).
    pub source: PathBuf,
}

impl Rng {
    /// Checks the id and address.
    pub fn check(&self) -> Result<()> {
        validate_id(&self.id)?;
        self.pci.check()
    }

    fn object_props(&self) -> Props {
        vec![
            p("id", names::rng(&self.id)),
            p("filename", self.source.to_string_lossy().into_owned()),
        ]
    }

    /// Every device property.
    pub fn device_props(&self) -> Props {
        let mut props = self.pci.with_id(&self.id);
        props.push(p("rng", names::rng(&self.id)));
        props
    }

    /// Launch arguments: `-object`, then `-device`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "-object".into(),
            render("rng-random", &self.object_props()),
            "-device".into(),
            render("virtio-rng-pci", &self.device_props()),
        ]
    }

    /// `object-add` arguments for its source.
    pub fn object_add(&self) -> ObjectAdd {
        let mut props = props_to_json(&self.object_props());
        props.remove("id");
        ObjectAdd {
            qom_type: "rng-random".into(),
            id: names::rng(&self.id),
            props,
        }
    }

    /// `device_add` arguments.
    pub fn device_add(&self) -> DeviceAdd {
        device_add("virtio-rng-pci", &self.device_props())
    }
}
