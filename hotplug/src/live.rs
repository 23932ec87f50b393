//! Live changes to plugged devices: a NIC's link, a disk's size. Each is one QMP command, checked
//! first against what the SDK knows (the device exists and is of the right kind, no removal is
//! running, the input makes sense) so bad input changes nothing, and recorded in the spec so a
//! relaunch from `vm.spec()` keeps it (a disk's new size is in its image).

use qhotplug_qmp::command::{
    BlockResize, BlockSetIoThrottle, IoLimits, QueryNamedBlockNodes, SetLink,
};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::state::{self, Busy, Device};
use crate::vm::Vm;

/// The sector size QEMU resizes in.
const SECTOR: u64 = 512;

impl Vm {
    /// Takes NIC `id`'s link up or down (`set_link`): the guest sees its carrier follow, and the
    /// NIC stays plugged. The state is part of the NIC's spec, so a VM launched from `vm.spec()`
    /// starts with the link as it is now.
    pub async fn set_link(&self, id: &str, up: bool) -> Result<()> {
        let owned = id.to_owned();
        self.call("set_link", id, |vm| async move {
            let id = owned.as_str();
            vm.require("NIC link changes", &["set_link"]).await?;
            let (_busy, _) = vm.busy_device(id, state::Kind::Nic)?;
            let step = tracing::debug_span!("step", name = "set_link", id);
            vm.client()
                .execute(&SetLink {
                    name: id.to_owned(),
                    up,
                })
                .instrument(step)
                .await?;
            let mut state = vm.inner().state();
            if let Some(nic) = state.spec.nics.iter_mut().find(|n| n.id == id) {
                nic.link_up = up;
            }
            Ok(())
        })
        .await
    }

    /// Sets disk `id`'s I/O limits (`block_set_io_throttle`); `IoLimits::default()` clears them.
    /// Limits QEMU would refuse are [`Error::InvalidIoLimits`] before anything is sent. They are
    /// part of the disk's spec: a VM launched from `vm.spec()` gets them before it runs.
    pub async fn set_io_limits(&self, id: &str, limits: IoLimits) -> Result<()> {
        let owned = id.to_owned();
        self.call("set_io_limits", id, |vm| async move {
            let id = owned.as_str();
            vm.require("disk I/O limits", &["block_set_io_throttle"])
                .await?;
            let (_busy, Device::Disk(disk)) = vm.busy_device(id, state::Kind::Disk)? else {
                unreachable!("a disk entry is a disk")
            };
            limits.check().map_err(|reason| Error::InvalidIoLimits {
                id: id.to_owned(),
                reason,
            })?;
            let step = tracing::debug_span!("step", name = "block_set_io_throttle", id);
            let cmd = BlockSetIoThrottle {
                id: disk.backend_device(),
                limits: limits.clone(),
            };
            vm.client().execute(&cmd).instrument(step).await?;
            let mut state = vm.inner().state();
            if let Some(disk) = state.spec.disks.iter_mut().find(|d| d.id == id) {
                disk.io_limits = Some(limits).filter(|l| !l.is_unlimited());
            }
            Ok(())
        })
        .await
    }

    /// Grows disk `id` to `size` bytes (`block_resize` on its format node); the guest's device
    /// follows. Refuses to shrink ([`Error::ShrinkRefused`]): shrinking a disk under a guest loses
    /// data unless the guest made room first, so it takes [`shrink_disk`](Vm::shrink_disk). The
    /// size must be a positive multiple of 512, and the disk writable. Returns the size before.
    pub async fn resize_disk(&self, id: &str, size: u64) -> Result<u64> {
        self.resize(id, size, false).await
    }

    /// Shrinks (or grows) disk `id` to `size` bytes: only once the guest no longer uses what is cut
    /// off. Returns the size before.
    pub async fn shrink_disk(&self, id: &str, size: u64) -> Result<u64> {
        self.resize(id, size, true).await
    }

    async fn resize(&self, id: &str, size: u64, may_shrink: bool) -> Result<u64> {
        let owned = id.to_owned();
        self.call("resize_disk", id, |vm| async move {
            let id = owned.as_str();
            vm.require("online disk resize", &["block_resize"]).await?;
            let (_busy, Device::Disk(disk)) = vm.busy_device(id, state::Kind::Disk)? else {
                unreachable!("a disk entry is a disk")
            };
            if disk.read_only {
                return Err(Error::ReadOnly(id.to_owned()));
            }
            if size == 0 || size % SECTOR != 0 || i64::try_from(size).is_err() {
                return Err(Error::InvalidSize {
                    id: id.to_owned(),
                    size,
                });
            }
            let node = disk.top_node();
            let current = vm
                .client()
                .execute(&QueryNamedBlockNodes { flat: Some(true) })
                .await?
                .into_iter()
                .find(|n| n.node_name.as_deref() == Some(node.as_str()))
                .and_then(|n| n.image)
                .map(|i| i.virtual_size as u64)
                .ok_or_else(|| Error::NotFound {
                    kind: "block node",
                    id: node.clone(),
                })?;
            if size < current && !may_shrink {
                return Err(Error::ShrinkRefused {
                    id: id.to_owned(),
                    current,
                    requested: size,
                });
            }
            if size != current {
                let step = tracing::debug_span!("step", name = "block_resize", id);
                vm.client()
                    .execute(&BlockResize {
                        node_name: Some(node),
                        size: size as i64,
                    })
                    .instrument(step)
                    .await?;
            }
            Ok(current)
        })
        .await
    }

    /// Marks device `id`, of `kind`, busy for a change, and returns it as the spec lists it: held
    /// from the check to the spec's update, so no removal or other change runs under it
    /// ([`Error::Busy`] for the one that comes second).
    pub(crate) fn busy_device(&self, id: &str, kind: state::Kind) -> Result<(Busy, Device)> {
        let busy = crate::engine::mark_busy(self, id, kind)?;
        let device = self
            .inner()
            .state()
            .device(id)
            .expect("a placed entry is in the spec");
        Ok((busy, device))
    }
}
