//! Live changes to plugged devices: a NIC's link, a disk's size. Each is one QMP command, checked
//! first against what the SDK knows (the device exists and is of the right kind, no removal is
//! running, the input makes sense) so bad input changes nothing, and recorded in the spec so a
//! relaunch from `vm.spec()` keeps it (a disk's new size is in its image).

use qhotplug_qmp::command::{
    BlockResize, BlockSetIoThrottle, IoLimits, QueryNamedBlockNodes, SetLink,
};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::state::{self, Device, Entry};
use crate::vm::Vm;

/// The sector size QEMU resizes in.
const SECTOR: u64 = 512;

impl Vm {
    /// Takes NIC `id`'s link up or down (`set_link`): the guest sees its carrier follow, and the
    /// NIC stays plugged. The state is part of the NIC's spec, so a VM launched from `vm.spec()`
    /// starts with the link as it is now.
    pub async fn set_link(&self, id: &str, up: bool) -> Result<()> {
        let span = tracing::info_span!("hotplug", op = "set_link", id);
        async {
            self.require("NIC link changes", &["set_link"]).await?;
            self.idle_device(id, state::Kind::Nic)?;
            let step = tracing::debug_span!("step", name = "set_link", id);
            self.client()
                .execute(&SetLink {
                    name: id.to_owned(),
                    up,
                })
                .instrument(step)
                .await?;
            let mut state = self.inner().state();
            if let Some(nic) = state.spec.nics.iter_mut().find(|n| n.id == id) {
                nic.link_up = up;
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Sets disk `id`'s I/O limits (`block_set_io_throttle`); `IoLimits::default()` clears them.
    /// Limits QEMU would refuse are [`Error::InvalidIoLimits`] before anything is sent. They are
    /// part of the disk's spec: a VM launched from `vm.spec()` gets them before it runs.
    pub async fn set_io_limits(&self, id: &str, limits: IoLimits) -> Result<()> {
        let span = tracing::info_span!("hotplug", op = "set_io_limits", id);
        async {
            self.require("disk I/O limits", &["block_set_io_throttle"])
                .await?;
            let Device::Disk(disk) = self.idle_device(id, state::Kind::Disk)? else {
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
            self.client().execute(&cmd).instrument(step).await?;
            let mut state = self.inner().state();
            if let Some(disk) = state.spec.disks.iter_mut().find(|d| d.id == id) {
                disk.io_limits = Some(limits).filter(|l| !l.is_unlimited());
            }
            Ok(())
        }
        .instrument(span)
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
        let span = tracing::info_span!("hotplug", op = "resize_disk", id);
        async {
            self.require("online disk resize", &["block_resize"])
                .await?;
            let Device::Disk(disk) = self.idle_device(id, state::Kind::Disk)? else {
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
            let current = self
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
                self.client()
                    .execute(&BlockResize {
                        node_name: Some(node),
                        size: size as i64,
                    })
                    .instrument(step)
                    .await?;
            }
            Ok(current)
        }
        .instrument(span)
        .await
    }

    /// The device `id`, as the spec lists it, when it is placed, of `kind`, and no removal runs.
    pub(crate) fn idle_device(&self, id: &str, kind: state::Kind) -> Result<Device> {
        let state = self.inner().state();
        match state.devices.get(id) {
            Some(Entry::Placed {
                kind: k,
                busy: false,
                ..
            }) if *k == kind => Ok(state.device(id).expect("a placed entry is in the spec")),
            Some(Entry::Placed { kind: k, .. }) if *k == kind => Err(Error::Busy(id.to_owned())),
            Some(Entry::Adding) => Err(Error::Busy(id.to_owned())),
            _ => Err(Error::NotFound {
                kind: kind.name(),
                id: id.to_owned(),
            }),
        }
    }
}
