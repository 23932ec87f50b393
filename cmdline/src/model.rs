//! [`DeviceModel`]: the contract every device the SDK plugs keeps, so that booting it (`-device`)
//! and hot-plugging it (`device_add`) render the same properties.

use qhotplug_qmp::command::DeviceAdd;

use crate::error::Result;
use crate::value::{props_to_json, render, Props};

/// A device QEMU can be given at boot or hot-plugged: its id, its driver, one ordered property
/// list (id and address included), and the checks QEMU would otherwise make. `-device` and
/// `device_add` are both rendered from that list, so boot and hotplug cannot drift.
///
/// ```
/// use qhotplug_cmdline::{DeviceModel, Pci, Rng};
///
/// let rng = Rng { id: "rng0".into(), pci: Pci::new("pci.0", 6), source: "/dev/urandom".into() };
/// rng.check().unwrap();
/// assert_eq!(rng.device_arg(), "virtio-rng-pci,id=rng0,bus=pci.0,addr=0x6,rng=rng0-rng");
/// let add = rng.device_add();
/// assert_eq!((add.driver.as_str(), add.id.as_deref()), ("virtio-rng-pci", Some("rng0")));
/// ```
pub trait DeviceModel {
    /// The device id (QEMU's `id`).
    fn id(&self) -> &str;
    /// The QEMU driver, for example `virtio-blk-pci`.
    fn driver(&self) -> &str;
    /// Checks what QEMU would refuse (the id, the address, sizes), before anything is rendered or
    /// sent.
    fn check(&self) -> Result<()>;
    /// Every device property, in order, id and address included.
    fn device_props(&self) -> Props;

    /// The value of its `-device` argument.
    fn device_arg(&self) -> String {
        render(self.driver(), &self.device_props())
    }

    /// `device_add` arguments: the same properties as [`device_arg`](DeviceModel::device_arg).
    fn device_add(&self) -> DeviceAdd {
        let mut props = props_to_json(&self.device_props());
        let mut take = |k: &str| props.remove(k).and_then(|v| v.as_str().map(str::to_owned));
        let (id, bus) = (take("id"), take("bus"));
        DeviceAdd {
            driver: self.driver().to_owned(),
            id,
            bus,
            props,
        }
    }
}
