//! QEMU's NBD server and its block exports (`qapi/block-export.json`): a node of the VM's served
//! to NBD clients (a pull backup's point-in-time view, a storage migration's target).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Empty;

command!(
    /// `nbd-server-start`: QEMU's one NBD server, listening on `addr`.
    "nbd-server-start", NbdServerStart {
        /// Where (`SocketAddressLegacy`: `{"type": "unix", "data": {"path": …}}` or
        /// `{"type": "inet", "data": {"host": …, "port": …}}`).
        addr: Value,
        /// A `tls-creds-x509` object (server endpoint) clients must use.
        #[serde(skip_serializing_if = "Option::is_none")]
        tls_creds: Option<String>,
    } -> Empty
);

command!(
    /// `nbd-server-stop`: stops the NBD server and drops its exports' clients.
    "nbd-server-stop", NbdServerStop, Empty
);

command!(
    /// `block-export-add` of an NBD export (QEMU 5.2+).
    "block-export-add", BlockExportAddNbd {
        /// Always `nbd`.
        #[serde(rename = "type")]
        kind: String,
        /// The export's id (for `block-export-del` and `BLOCK_EXPORT_DELETED`).
        id: String,
        /// The node served.
        node_name: String,
        /// The name clients ask for.
        name: String,
        /// Clients may write.
        writable: bool,
        /// Dirty bitmaps reachable from the node, offered as `qemu:dirty-bitmap:<name>` meta
        /// contexts.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        bitmaps: Vec<String>,
    } -> Empty
);

command!(
    /// `block-export-del`: ends an export; `BLOCK_EXPORT_DELETED` says when it is gone.
    "block-export-del", BlockExportDel {
        /// The export's id.
        id: String,
        /// `safe` (QEMU's default: refused while clients are connected) or `hard` (drops them).
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
    } -> Empty
);

command!(
    /// `query-block-exports` (QEMU 5.2+): the block exports QEMU serves.
    "query-block-exports", QueryBlockExports, Vec<BlockExportInfo>
);

/// One block export, as `query-block-exports` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct BlockExportInfo {
    /// Its id.
    pub id: String,
    /// Its type: `nbd`, `vhost-user-blk`, `fuse`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The node it serves.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Ending (`block-export-del` sent, clients still connected).
    #[serde(rename = "shutting-down", default)]
    pub shutting_down: bool,
}
