//! A `virtio-rng-pci` on an `rng-random` object (`<id>-rng`) reading a host source.

use std::path::PathBuf;

use qhotplug_qmp::command::ObjectAdd;

use crate::device::Pci;
use crate::error::Result;
use crate::model::DeviceModel;
use crate::names;
use crate::value::{p, validate_id, Props, QomObject};

/// A virtio RNG.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng {
    /// The device id.
    pub id: String,
    /// Where it sits.
    pub pci: Pci,
    /// The host's entropy source (`/dev/urandom`).
    pub source: PathBuf,
}

impl Rng {
    fn object(&self) -> QomObject {
        QomObject {
            qom_type: "rng-random",
            props: vec![
                p("id", names::rng(&self.id)),
                p("filename", self.source.to_string_lossy().into_owned()),
            ],
        }
    }

    /// Launch arguments: `-object`, then `-device`.
    pub fn args(&self) -> Vec<String> {
        let mut args = self.object().args().to_vec();
        args.extend(["-device".into(), self.device_arg()]);
        args
    }

    /// `object-add` arguments for its source.
    pub fn object_add(&self) -> ObjectAdd {
        self.object().object_add()
    }
}

impl DeviceModel for Rng {
    fn id(&self) -> &str {
        &self.id
    }

    fn driver(&self) -> &str {
        "virtio-rng-pci"
    }

    /// Checks the id and address.
    fn check(&self) -> Result<()> {
        validate_id(&self.id)?;
        self.pci.check()
    }

    /// Every device property.
    fn device_props(&self) -> Props {
        let mut props = self.pci.with_id(&self.id);
        props.push(p("rng", names::rng(&self.id)));
        props
    }
}
