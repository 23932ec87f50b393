//! Live changes to plugged devices: a NIC's link, a disk's size and I/O limits. Each is one QMP
//! command, checked first against what the SDK knows (the device exists and is of the right kind,
//! no other call holds it, the input makes sense) so bad input changes nothing, and recorded in the
//! spec so a relaunch from `vm.spec()` keeps it (a disk's new size is in its image). The device's
//! busy mark is held from the check to the spec's update.

use std::sync::Arc;

use qhotplug_qmp::command::{BlockResize, BlockSetIoThrottle, IoLimits, SetLink};
use tracing::Instrument;

use crate::engine::holds;
use crate::error::{Error, Result};
use crate::kinds::{Device, DeviceKind};
use crate::qemu::block::{self, Blocks};
use crate::unreadable::Unreadable;
use crate::vm_core::Core;

/// The sector size QEMU resizes in.
const SECTOR: u64 = 512;

/// See [`Vm::set_link`](crate::Vm::set_link).
pub(crate) async fn set_link(core: &Arc<Core>, id: &str, up: bool) -> Result<()> {
    core.require("NIC link changes", &["set_link"]).await?;
    let (_busy, Device::Nic(mut nic)) = holds::busy_device(core, id, DeviceKind::Nic)? else {
        unreachable!("a NIC entry is a NIC")
    };
    let step = tracing::debug_span!(crate::spans::STEP, name = "set_link", id);
    core.client
        .execute(&SetLink {
            name: id.to_owned(),
            up,
        })
        .instrument(step)
        .await?;
    nic.link_up = up;
    core.state().update(nic.into());
    // The link is known now, whatever an attach without a spec could not read.
    (core.unreadable.lock().unwrap_or_else(|p| p.into_inner()))
        .retain(|u| !matches!(u, Unreadable::NicLink { device } if device == id));
    Ok(())
}

/// See [`Vm::set_io_limits`](crate::Vm::set_io_limits).
pub(crate) async fn set_io_limits(core: &Arc<Core>, id: &str, limits: IoLimits) -> Result<()> {
    core.require("disk I/O limits", &["block_set_io_throttle"])
        .await?;
    let (_busy, Device::Disk(mut disk)) = holds::busy_device(core, id, DeviceKind::Disk)? else {
        unreachable!("a disk entry is a disk")
    };
    limits.check().map_err(|reason| Error::InvalidIoLimits {
        id: id.to_owned(),
        reason,
    })?;
    let step = tracing::debug_span!(crate::spans::STEP, name = "block_set_io_throttle", id);
    let cmd = BlockSetIoThrottle {
        id: disk.backend_device(),
        limits: limits.clone(),
    };
    core.client.execute(&cmd).instrument(step).await?;
    disk.io_limits = Some(limits).filter(|l| !l.is_unlimited());
    core.state().update(disk.into());
    Ok(())
}

/// See [`Vm::resize_disk`](crate::Vm::resize_disk) and [`Vm::shrink_disk`](crate::Vm::shrink_disk).
pub(crate) async fn resize(core: &Arc<Core>, id: &str, size: u64, may_shrink: bool) -> Result<u64> {
    core.require("online disk resize", &["block_resize"])
        .await?;
    let (_busy, Device::Disk(disk)) = holds::busy_device(core, id, DeviceKind::Disk)? else {
        unreachable!("a disk entry is a disk")
    };
    if disk.read_only {
        return Err(Error::ReadOnly(id.to_owned()));
    }
    if size == 0 || !size.is_multiple_of(SECTOR) || i64::try_from(size).is_err() {
        return Err(Error::InvalidSize {
            id: id.to_owned(),
            size,
        });
    }
    let node = disk.top_node();
    let current = block::disk_size(&core.client, &disk).await?;
    if size < current && !may_shrink {
        return Err(Error::ShrinkRefused {
            id: id.to_owned(),
            current,
            requested: size,
        });
    }
    if size != current {
        let step = tracing::debug_span!(crate::spans::STEP, name = "block_resize", id);
        core.client
            .execute(&BlockResize {
                node_name: Some(node),
                size: size as i64,
            })
            .instrument(step)
            .await?;
    }
    Ok(current)
}

/// See [`Vm::io_limits`](crate::Vm::io_limits).
pub(crate) async fn io_limits(core: &Core, id: &str) -> Result<IoLimits> {
    Blocks::read(&core.client)
        .await?
        .limits_of(id)
        .ok_or_else(|| Error::NotFound {
            kind: DeviceKind::Disk,
            id: id.to_owned(),
        })
}
