//! Dirty bitmaps (`qapi/block-core.json`): what a node records of the writes since a point in
//! time, the ground of incremental backups; as commands and as `transaction` actions.

use serde::{Deserialize, Serialize};

use super::Empty;

command!(
    /// `block-dirty-bitmap-add`: a new bitmap on a node, recording from now on (unless
    /// `disabled`); `persistent` ones are stored in the qcow2 image at a clean close.
    "block-dirty-bitmap-add", BlockDirtyBitmapAdd {
        /// The node.
        node: String,
        /// The bitmap's name on that node.
        name: String,
        /// Stored in the image (qcow2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        persistent: Option<bool>,
        /// Made not recording.
        #[serde(skip_serializing_if = "Option::is_none")]
        disabled: Option<bool>,
    } -> Empty
);

command!(
    /// `block-dirty-bitmap-remove`: deletes a bitmap (from the image too, if persistent). The one
    /// thing QEMU still does with an inconsistent bitmap.
    "block-dirty-bitmap-remove", BlockDirtyBitmapRemove {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    } -> Empty
);

command!(
    /// `block-dirty-bitmap-enable`: the bitmap records writes again.
    "block-dirty-bitmap-enable", BlockDirtyBitmapEnable {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    } -> Empty
);

command!(
    /// `block-dirty-bitmap-disable`: the bitmap stops recording (keeping what it has).
    "block-dirty-bitmap-disable", BlockDirtyBitmapDisable {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    } -> Empty
);

command!(
    /// `block-dirty-bitmap-merge`: ORs `bitmaps` (names on the same node) into `target`.
    "block-dirty-bitmap-merge", BlockDirtyBitmapMerge {
        /// The node.
        node: String,
        /// The bitmap merged into.
        target: String,
        /// The bitmaps merged.
        bitmaps: Vec<String>,
    } -> Empty
);

/// One bitmap of a node, in `query-named-block-nodes` (`BlockDirtyInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DirtyBitmapInfo {
    /// Its name.
    #[serde(default)]
    pub name: String,
    /// Bytes marked dirty.
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u32,
    /// Recording writes now.
    pub recording: bool,
    /// In use by an operation (a backup's job).
    pub busy: bool,
    /// Stored in the image.
    pub persistent: bool,
    /// Loaded from an image that was not closed cleanly (QEMU killed): not to be trusted; only
    /// removing it works.
    #[serde(default)]
    pub inconsistent: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::TransactionAction;

    #[test]
    fn bitmap_actions_carry_the_commands_arguments() {
        let add = TransactionAction::of(&BlockDirtyBitmapAdd {
            node: "d1-fmt".into(),
            name: "cp1".into(),
            persistent: Some(true),
            disabled: None,
        });
        assert_eq!(
            serde_json::to_value(add).unwrap(),
            serde_json::json!({"type": "block-dirty-bitmap-add",
                "data": {"node": "d1-fmt", "name": "cp1", "persistent": true}})
        );
        let info: DirtyBitmapInfo = serde_json::from_value(serde_json::json!({
            "name": "cp1", "count": 65536, "granularity": 65536, "recording": false,
            "busy": false, "persistent": true, "inconsistent": true}))
        .unwrap();
        assert!(info.inconsistent && !info.recording);
    }
}
