//! The public hot-plug calls of the virtio devices that sit on a host-side service: vhost-user
//! disks and virtio-fs shares (on a backend process's socket), virtio-serial controllers and their
//! ports (on a socket QEMU listens on), and RNGs. Each runs on the engine; the checks only the VM's
//! state can answer (shared memory, the port's controller) come first.

use crate::engine;
use crate::error::{Error, Result};
use crate::kinds::Kind;
use crate::state;
use crate::vm::Vm;
use crate::{RngConfig, SerialPortConfig, VhostUserBlkConfig, VirtioFsConfig, VirtioSerialConfig};
use qhotplug_cmdline::{Rng, SerialPort, VhostUserBlk, VirtioFs, VirtioSerial};

impl Vm {
    /// Hot-adds a vhost-user disk: `chardev-add` (QEMU connects to the backend's socket), then
    /// `device_add vhost-user-blk-pci`. The VM's memory must be shared
    /// ([`Error::NeedsSharedMemory`] otherwise, before anything is sent).
    pub async fn add_vhost_user_blk(&self, config: VhostUserBlkConfig) -> Result<VhostUserBlk> {
        self.add_kind("add_vhost_user_blk", config, |vm, c| {
            vm.require_shared_memory(c.id())
        })
        .await
    }

    /// Hot-removes a vhost-user disk: `device_del`, wait for the guest, then `chardev-remove`.
    pub async fn remove_vhost_user_blk(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_vhost_user_blk", id, state::Kind::VhostUserBlk)
            .await
    }

    /// Hot-adds a virtio-fs share on virtiofsd's socket; the guest mounts it by its tag
    /// (`mount -t virtiofs <tag> /mnt`). The VM's memory must be shared.
    pub async fn add_virtio_fs(&self, config: VirtioFsConfig) -> Result<VirtioFs> {
        self.add_kind("add_virtio_fs", config, |vm, c| {
            vm.require_shared_memory(c.id())
        })
        .await
    }

    /// Hot-removes a virtio-fs share (the guest must have unmounted it to let it go).
    pub async fn remove_virtio_fs(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_virtio_fs", id, state::Kind::VirtioFs)
            .await
    }

    /// Hot-adds a `virtio-serial-pci` controller, for [`add_serial_port`](Vm::add_serial_port).
    pub async fn add_virtio_serial(&self, config: VirtioSerialConfig) -> Result<VirtioSerial> {
        self.add_kind("add_virtio_serial", config, |_, _| Ok(()))
            .await
    }

    /// Hot-removes a virtio-serial controller; its ports must be removed first
    /// ([`Error::NotHotpluggable`] otherwise).
    pub async fn remove_virtio_serial(&self, id: &str) -> Result<()> {
        let owned = id.to_owned();
        self.call("remove_virtio_serial", id, |vm| async move {
            let bus = qhotplug_cmdline::names::controller_bus(&owned);
            if vm
                .inner()
                .state()
                .spec
                .serial_ports
                .iter()
                .any(|p| p.bus == bus)
            {
                return Err(Error::NotHotpluggable {
                    id: owned,
                    reason: "ports are still on it; remove them first",
                });
            }
            engine::remove(&vm, &owned, state::Kind::VirtioSerial).await
        })
        .await
    }

    /// Hot-adds a named serial port on a controller the SDK knows, with QEMU listening on the
    /// config's socket for the host's side.
    pub async fn add_serial_port(&self, config: SerialPortConfig) -> Result<SerialPort> {
        self.add_kind("add_serial_port", config, |vm, c| {
            let state = vm.inner().state();
            if state
                .spec
                .virtio_serials
                .iter()
                .any(|v| v.id == c.controller())
            {
                Ok(())
            } else {
                Err(Error::NotFound {
                    kind: "virtio-serial controller",
                    id: c.controller().to_owned(),
                })
            }
        })
        .await
    }

    /// Hot-removes a serial port, then its chardev.
    pub async fn remove_serial_port(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_serial_port", id, state::Kind::SerialPort)
            .await
    }

    /// Hot-adds a virtio RNG: its `rng-random` source, then the device.
    pub async fn add_rng(&self, config: RngConfig) -> Result<Rng> {
        self.add_kind("add_rng", config, |_, _| Ok(())).await
    }

    /// Hot-removes a virtio RNG, then its source.
    pub async fn remove_rng(&self, id: &str) -> Result<()> {
        self.remove_kind("remove_rng", id, state::Kind::Rng).await
    }

    fn require_shared_memory(&self, id: &str) -> Result<()> {
        if self.inner().state().spec.has_shared_memory() {
            Ok(())
        } else {
            Err(Error::NeedsSharedMemory(id.to_owned()))
        }
    }
}
