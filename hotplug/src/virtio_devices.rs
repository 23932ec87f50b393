//! The checks of the virtio devices that sit on a host-side service, which only the VM's state can
//! answer and which come before the engine's hot-add or hot-remove: vhost-user disks and virtio-fs
//! shares need the VM's memory shared, a serial port needs its controller, and a controller goes
//! only once its ports have. (Their public calls are on [`Vm`](crate::Vm).)

use std::sync::Arc;

use qhotplug_cmdline::names;

use crate::engine;
use crate::error::{Error, Result};
use crate::kinds::DeviceKind;
use crate::qemu::unplug::UnplugPolicy;
use crate::vm_core::Core;
use crate::SerialPortConfig;

/// [`Error::NeedsSharedMemory`] unless the VM's memory is shared (vhost-user, virtio-fs).
pub(crate) fn require_shared_memory(core: &Core, id: &str) -> Result<()> {
    if core.state().spec().has_shared_memory() {
        Ok(())
    } else {
        Err(Error::NeedsSharedMemory(id.to_owned()))
    }
}

/// [`Error::NotFound`] unless the port's controller is one the SDK knows.
pub(crate) fn controller_known(core: &Core, port: &SerialPortConfig) -> Result<()> {
    let state = core.state();
    if state
        .spec()
        .virtio_serials
        .iter()
        .any(|v| v.id == port.controller())
    {
        Ok(())
    } else {
        Err(Error::NotFound {
            kind: DeviceKind::VirtioSerial,
            id: port.controller().to_owned(),
        })
    }
}

/// See [`Vm::remove_virtio_serial`](crate::Vm::remove_virtio_serial).
pub(crate) async fn remove_virtio_serial(
    core: &Arc<Core>,
    id: &str,
    policy: &UnplugPolicy,
) -> Result<()> {
    let bus = names::controller_bus(id);
    if core
        .state()
        .spec()
        .serial_ports
        .iter()
        .any(|p| p.bus == bus)
    {
        return Err(Error::NotHotpluggable {
            id: id.to_owned(),
            reason: "ports are still on it; remove them first",
        });
    }
    engine::remove(core, id, DeviceKind::VirtioSerial, policy).await
}
