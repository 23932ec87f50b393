//! QEMU's NBD server and the exports on it, as the SDK serves disks (a pull backup's scratch
//! views, a storage migration's target images): one helper for both, each step in the caller's
//! [`Transaction`] with its undo recorded before it is awaited (exports go before the server).

use qhotplug_cmdline::NbdServer;
use qhotplug_qmp::command::{BlockExportAddNbd, NbdServerStart};

use crate::engine::holds::Hold;
use crate::engine::transaction::Transaction;
use crate::error::Result;
use crate::qemu::delete::Delete;

/// One export to serve.
pub(crate) struct Export {
    /// Its id (`block-export-del`).
    pub(crate) id: String,
    /// The node it serves.
    pub(crate) node: String,
    /// The name a client asks for.
    pub(crate) name: String,
    /// Whether clients may write.
    pub(crate) writable: bool,
    /// Dirty bitmaps offered with it (found down the node's backing chain).
    pub(crate) bitmaps: Vec<String>,
}

/// `nbd-server-start` at `server` (over TLS with the credentials object `tls_creds`), then a
/// `block-export-add` of each of `exports`.
pub(crate) async fn serve<H: Hold>(
    txn: &mut Transaction<H>,
    client: &qhotplug_qmp::Client,
    server: &NbdServer,
    tls_creds: Option<String>,
    exports: Vec<Export>,
) -> Result<()> {
    let start = NbdServerStart {
        addr: server.legacy_address(),
        tls_creds,
    };
    txn.step(
        "nbd-server-start",
        Some(Delete::NbdServer),
        client.execute(&start),
    )
    .await?;
    for export in exports {
        let add = BlockExportAddNbd {
            kind: "nbd".into(),
            id: export.id.clone(),
            node_name: export.node,
            name: export.name,
            writable: export.writable,
            bitmaps: export.bitmaps,
        };
        txn.step(
            "block-export-add",
            Some(Delete::Export(export.id)),
            client.execute(&add),
        )
        .await?;
    }
    Ok(())
}
