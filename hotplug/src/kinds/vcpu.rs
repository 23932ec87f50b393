//! vCPUs: one `device_add` of the CPU model's device type into a free slot that
//! `query-hotpluggable-cpus` lists. No backend; nothing to tear down. The guest onlines a new vCPU
//! itself (or not): the SDK reports what QEMU confirms. See [`Vm::set_vcpus`](crate::Vm::set_vcpus).

use qhotplug_cmdline::{DeviceModel, Vcpu};

use super::{Place, Placed, Plan, Plug, Want};
use crate::error::{Error, Result};

impl Plug for Vcpu {
    type Added = Vcpu;
    const OPERATION: &'static str = "vCPU hotplug";
    const COMMANDS: &'static [&'static str] =
        &["query-hotpluggable-cpus", "device_add", "device_del"];

    fn id(&self) -> &str {
        &self.id
    }

    fn want(&self) -> Result<Want> {
        Ok(Want::Fixed)
    }

    fn plan(self, _place: Place) -> Result<Plan<Vcpu>> {
        self.check().map_err(Error::Spec)?;
        Ok(Plan {
            backends: Vec::new(),
            device: self.device_add(),
            after: Vec::new(),
            added: self,
        })
    }
}

impl Placed for Vcpu {
    type Config = Vcpu;

    fn place(&self) -> Place {
        Place::Fixed
    }
}
