//! The one view of QEMU's block layer every module reads: `query-block` (the drives, the node
//! each device runs on, its size, I/O limits and dirty bitmaps) and the list of named nodes.
//!
//! Sizes and bitmaps come from `query-block`, never from `query-named-block-nodes`: QEMU 7.2 and
//! 10.0 crash answering that while a concluded `block-stream` job waits to be dismissed
//! (`tests/tests/jobs_qemu.rs` shows it), so [`named_block_nodes`] refuses to ask then.

use qhotplug_cmdline::names;
use qhotplug_qmp::command::{
    BlockDeviceInfo, BlockInfo, DirtyBitmapInfo, IoLimits, QueryBlock, QueryBlockExports,
    QueryJobs, QueryNamedBlockNodes,
};
use qhotplug_qmp::Client;

use crate::device_kind::DeviceKind;
use crate::error::{Error, Result};

/// QEMU's block devices as one `query-block` saw them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Blocks(Vec<BlockInfo>);

impl Blocks {
    /// Asks QEMU.
    pub(crate) async fn read(client: &Client) -> Result<Blocks> {
        Ok(Blocks(client.execute(&QueryBlock).await?))
    }

    /// The drive of device `id`: its `qdev` is the id, or a QOM path through it (a virtio
    /// device's drive is on `/machine/peripheral/<id>/virtio-backend`).
    pub(crate) fn drive(&self, id: &str) -> Option<&BlockInfo> {
        let inside = format!("{}/", names::peripheral_path(id));
        self.0.iter().find(|b| {
            b.qdev
                .as_deref()
                .is_some_and(|q| q == id || q.starts_with(&inside))
        })
    }

    /// The drive of CD-ROM `id`, or [`Error::NotFound`].
    pub(crate) fn cdrom(&self, id: &str) -> Result<&BlockInfo> {
        self.drive(id).ok_or_else(|| Error::NotFound {
            kind: DeviceKind::Cdrom,
            id: id.to_owned(),
        })
    }

    /// The nodes QEMU's block devices run on.
    pub(crate) fn roots(&self) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|b| b.inserted.as_ref()?.node_name.clone())
            .collect()
    }

    /// The size the guest sees of the device running on node `node`.
    pub(crate) fn size_of(&self, node: &str) -> Option<u64> {
        self.0
            .iter()
            .filter_map(|b| b.inserted.as_ref())
            .find(|i| i.node_name.as_deref() == Some(node))
            .and_then(|i| i.image.as_ref())
            .map(|i| i.virtual_size as u64)
    }

    /// Disk `disk`'s size as its guest sees it (the node its device runs on), or
    /// [`Error::NotFound`].
    pub(crate) fn disk_size(&self, disk: &qhotplug_cmdline::Disk) -> Result<u64> {
        self.size_of(&disk.top_node())
            .ok_or_else(|| Error::NotFound {
                kind: DeviceKind::Disk,
                id: disk.id.clone(),
            })
    }

    /// The dirty bitmaps on node `node`, the root of a device.
    pub(crate) fn bitmaps_of(&self, node: &str) -> Vec<DirtyBitmapInfo> {
        self.0
            .iter()
            .filter_map(|b| b.inserted.as_ref())
            .find(|i| i.node_name.as_deref() == Some(node))
            .map(|i| i.dirty_bitmaps.clone())
            .unwrap_or_default()
    }

    /// Device `id`'s I/O limits, without the implicit throttle group QEMU names after the
    /// device when none was given.
    pub(crate) fn limits_of(&self, id: &str) -> Option<IoLimits> {
        let mut limits = self.drive(id)?.inserted.as_ref()?.limits.clone();
        if limits
            .group
            .as_deref()
            .is_some_and(|g| names::is_implicit_throttle_group(id, g))
        {
            limits.group = None;
        }
        Some(limits)
    }
}

/// Disk `disk`'s size as its guest sees it, from a fresh `query-block`.
pub(crate) async fn disk_size(client: &Client, disk: &qhotplug_cmdline::Disk) -> Result<u64> {
    Blocks::read(client).await?.disk_size(disk)
}

/// The ids of the block exports QEMU serves (none before QEMU 5.2, which has no exports).
pub(crate) async fn export_ids(client: &Client) -> Result<Vec<String>> {
    if !client.schema().await?.has_command("query-block-exports") {
        return Ok(Vec::new());
    }
    let exports = client.execute(&QueryBlockExports).await?;
    Ok(exports.into_iter().map(|e| e.id).collect())
}

/// The names of QEMU's named block nodes: [`named_block_node_infos`]'s.
pub(crate) async fn named_block_nodes(client: &Client) -> Result<Option<Vec<String>>> {
    Ok(named_block_node_infos(client)
        .await?
        .map(|nodes| nodes.into_iter().filter_map(|n| n.node_name).collect()))
}

/// `query-named-block-nodes`, unless a job is `concluded` and not yet dismissed: QEMU 7.2 and
/// 10.0 crash (a segfault) answering it while a `block-stream` job waits in that state, which
/// is where a job an earlier process started and nobody has dismissed sits. `None` then.
pub(crate) async fn named_block_node_infos(
    client: &Client,
) -> Result<Option<Vec<BlockDeviceInfo>>> {
    let concluded = client
        .execute(&QueryJobs)
        .await?
        .into_iter()
        .any(|j| j.status == "concluded");
    if concluded {
        tracing::warn!("a job is concluded and not dismissed: block nodes not listed (QEMU crashes listing them then)");
        return Ok(None);
    }
    let nodes = client
        .execute(&QueryNamedBlockNodes { flat: Some(true) })
        .await?;
    Ok(Some(nodes))
}
