//! Block commands: nodes (`blockdev-add`/`-del`), fd sets for images QEMU cannot open itself,
//! `query-block`, online resize and I/O limits.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Command, Empty};

command!(
    /// `query-block`: the block devices (with a drive or a `BlockBackend`).
    "query-block", QueryBlock, Vec<BlockInfo>
);

command!(
    /// `query-fdsets`: the fd sets made with `add-fd`, global to the VM.
    "query-fdsets", QueryFdsets, Vec<FdsetInfo>
);

command!(
    /// `query-named-block-nodes`: every block node with a node name.
    "query-named-block-nodes", QueryNamedBlockNodes {
        /// Leave out the backing chain of each node (QEMU 5.0+).
        #[serde(skip_serializing_if = "Option::is_none")]
        flat: Option<bool>,
    } -> Vec<BlockDeviceInfo>
);

command!(
    /// `blockdev-del`: removes a block node that nothing uses any more.
    "blockdev-del", BlockdevDel {
        /// The node's name.
        node_name: String,
    } -> Empty
);

command!(
    /// `add-fd`: adds the fd sent with this command to an fd set (global to the VM). Send it with
    /// [`Client::add_fd`](crate::Client::add_fd).
    "add-fd", AddFd {
        /// The set to add to; QEMU picks a free one when `None`.
        #[serde(skip_serializing_if = "Option::is_none")]
        fdset_id: Option<i64>,
        /// A free-form tag, shown by `query-fdsets`.
        #[serde(skip_serializing_if = "Option::is_none")]
        opaque: Option<String>,
    } -> AddFdInfo
);

command!(
    /// `remove-fd`: removes one fd, or a whole set, from the fd sets. QEMU keeps its own dups.
    "remove-fd", RemoveFd {
        /// The set.
        fdset_id: i64,
        /// One fd of the set (QEMU's number); the whole set when `None`.
        #[serde(skip_serializing_if = "Option::is_none")]
        fd: Option<i64>,
    } -> Empty
);

command!(
    /// `block_resize`: grows (or shrinks) a block node to `size` bytes; the guest's device
    /// follows (virtio-blk announces the new capacity).
    "block_resize", BlockResize {
        /// The node to resize (the format node, for a disk).
        #[serde(skip_serializing_if = "Option::is_none")]
        node_name: Option<String>,
        /// The new size, in bytes.
        size: i64,
    } -> Empty
);

command!(
    /// `blockdev-open-tray`: opens a removable-media drive's tray. On a tray the guest has locked
    /// it only asks the guest to open it (and still answers `{}`), unless `force`.
    "blockdev-open-tray", BlockdevOpenTray {
        /// The drive's qdev id.
        id: String,
        /// Open it even though the guest locked it.
        #[serde(skip_serializing_if = "Option::is_none")]
        force: Option<bool>,
    } -> Empty
);
command!(
    /// `blockdev-close-tray`: closes a drive's tray (nothing happens if it is closed).
    "blockdev-close-tray", BlockdevCloseTray {
        /// The drive's qdev id.
        id: String,
    } -> Empty
);
command!(
    /// `blockdev-remove-medium`: takes the medium out of a drive whose tray is open; the medium's
    /// nodes stay until `blockdev-del`. An empty drive answers `{}`.
    "blockdev-remove-medium", BlockdevRemoveMedium {
        /// The drive's qdev id.
        id: String,
    } -> Empty
);
command!(
    /// `blockdev-insert-medium`: puts block node `node_name` into an empty drive whose tray is
    /// open.
    "blockdev-insert-medium", BlockdevInsertMedium {
        /// The drive's qdev id.
        id: String,
        /// The medium's (top) node.
        node_name: String,
    } -> Empty
);

/// A disk's I/O limits (QAPI `BlockIOThrottle` without the device): bytes and operations per
/// second, in total or for reads and writes apart, with optional bursts, and an optional group
/// whose disks share one budget. 0 is no limit. `IoLimits::default()` is none at all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IoLimits {
    /// Bytes per second, reads and writes together.
    pub bps: u64,
    /// Bytes per second read.
    pub bps_rd: u64,
    /// Bytes per second written.
    pub bps_wr: u64,
    /// Operations per second, reads and writes together.
    pub iops: u64,
    /// Read operations per second.
    pub iops_rd: u64,
    /// Write operations per second.
    pub iops_wr: u64,
    /// Burst for `bps`, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_max: Option<u64>,
    /// Burst for `bps_rd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_rd_max: Option<u64>,
    /// Burst for `bps_wr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_wr_max: Option<u64>,
    /// Burst for `iops`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_max: Option<u64>,
    /// Burst for `iops_rd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_rd_max: Option<u64>,
    /// Burst for `iops_wr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_wr_max: Option<u64>,
    /// The throttle group: disks in one group share its limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// QEMU's largest limit (`THROTTLE_VALUE_MAX`).
const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

impl IoLimits {
    /// True when nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        [
            self.bps,
            self.bps_rd,
            self.bps_wr,
            self.iops,
            self.iops_rd,
            self.iops_wr,
        ]
        .iter()
        .all(|v| *v == 0)
    }

    /// Checks what QEMU would refuse, so it can be refused before anything is sent: a total
    /// together with its read or write limit, a burst without its base or below it, a value past
    /// QEMU's maximum.
    pub fn check(&self) -> Result<(), String> {
        if self.bps > 0 && (self.bps_rd > 0 || self.bps_wr > 0) {
            return Err("bps and bps_rd/bps_wr cannot both be set".into());
        }
        if self.iops > 0 && (self.iops_rd > 0 || self.iops_wr > 0) {
            return Err("iops and iops_rd/iops_wr cannot both be set".into());
        }
        let pairs = [
            ("bps", self.bps, self.bps_max),
            ("bps_rd", self.bps_rd, self.bps_rd_max),
            ("bps_wr", self.bps_wr, self.bps_wr_max),
            ("iops", self.iops, self.iops_max),
            ("iops_rd", self.iops_rd, self.iops_rd_max),
            ("iops_wr", self.iops_wr, self.iops_wr_max),
        ];
        for (name, base, max) in pairs {
            if base > THROTTLE_VALUE_MAX || max.is_some_and(|m| m > THROTTLE_VALUE_MAX) {
                return Err(format!(
                    "{name} is over QEMU's limit of {THROTTLE_VALUE_MAX}"
                ));
            }
            match max {
                Some(m) if base == 0 => return Err(format!("{name}_max ({m}) needs {name}")),
                Some(m) if m < base => {
                    return Err(format!("{name}_max ({m}) is below {name} ({base})"))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// `block_set_io_throttle`: sets (or, with all zero, clears) the I/O limits of the device `id`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockSetIoThrottle {
    /// The device's id.
    pub id: String,
    /// The limits.
    #[serde(flatten)]
    pub limits: IoLimits,
}

impl Command for BlockSetIoThrottle {
    const NAME: &'static str = "block_set_io_throttle";
    type Returns = Empty;
}

/// `blockdev-add`: creates a block node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockdevAdd {
    /// The block driver, for example `file`, `host_device`, `raw` or `qcow2`.
    pub driver: String,
    /// The node name.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The driver's options (`filename`, `file`, `read-only`, `cache`, …).
    #[serde(flatten)]
    pub props: Map<String, Value>,
}

impl Command for BlockdevAdd {
    const NAME: &'static str = "blockdev-add";
    type Returns = Empty;
}

/// One block device in `query-block`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct BlockInfo {
    /// The device name (empty for `-blockdev`/`blockdev-add` backends).
    pub device: String,
    /// The qdev id or QOM path of the device it is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdev: Option<String>,
    /// The medium, when one is inserted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inserted: Option<BlockDeviceInfo>,
    /// True for a removable-media drive (a CD-ROM).
    #[serde(default)]
    pub removable: bool,
    /// True when the guest locked the drive's tray.
    #[serde(default)]
    pub locked: bool,
    /// Whether the tray is open, for a drive that has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tray_open: Option<bool>,
}

/// A block node, in `query-block` and `query-named-block-nodes`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct BlockDeviceInfo {
    /// The file name (may be `/dev/fdset/N` or a `json:` description).
    pub file: String,
    /// The node name.
    #[serde(rename = "node-name", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// True when read-only.
    pub ro: bool,
    /// The driver, for example `raw`.
    pub drv: String,
    /// The I/O limits of the device on this node, in `query-block` (all zero when none).
    #[serde(flatten, default)]
    pub limits: IoLimits,
    /// What the node's image is, when QEMU says (its virtual size, among others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
    /// The node's cache mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<BlockdevCacheInfo>,
    /// How many images are under this one in its backing chain (0 for one that stands alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file_depth: Option<u32>,
    /// The node's dirty bitmaps.
    #[serde(
        rename = "dirty-bitmaps",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub dirty_bitmaps: Vec<super::DirtyBitmapInfo>,
}

/// A node's image, in `BlockDeviceInfo` (QAPI `ImageInfo`; only what the SDK reads).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ImageInfo {
    /// The size the guest sees, in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: i64,
    /// The image's file name as QEMU opened it (a path, `/dev/fdset/N`, or a `json:` description).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// The image's format, for example `qcow2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The image under it, for an image with a backing chain (in `query-block`, the whole chain).
    #[serde(
        rename = "backing-image",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_image: Option<Box<ImageInfo>>,
}

/// A node's cache mode, in `BlockDeviceInfo` (QAPI `BlockdevCacheInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct BlockdevCacheInfo {
    /// The guest sees a write-back cache.
    pub writeback: bool,
    /// The host's page cache is bypassed (`O_DIRECT`).
    pub direct: bool,
    /// Flushes are ignored.
    #[serde(rename = "no-flush")]
    pub no_flush: bool,
}

/// One fd set in `query-fdsets`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FdsetInfo {
    /// The set's id.
    #[serde(rename = "fdset-id")]
    pub fdset_id: i64,
    /// The fds in it.
    pub fds: Vec<FdsetFdInfo>,
}

/// One fd in an fd set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FdsetFdInfo {
    /// QEMU's fd number.
    pub fd: i64,
    /// The tag given to `add-fd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opaque: Option<String>,
}

/// The reply to `add-fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct AddFdInfo {
    /// The set the fd went into.
    #[serde(rename = "fdset-id")]
    pub fdset_id: i64,
    /// QEMU's number for the fd.
    pub fd: i64,
}
