//! A handle on `qemu-storage-daemon`: launched by the SDK (its QMP monitor one end of a socket
//! pair, stderr kept for errors, killed and reaped with the handle), it serves images as
//! vhost-user-blk exports a VM plugs with [`Vm::add_vhost_user_blk`](crate::Vm::add_vhost_user_blk).
//! An orchestrator serves a disk and plugs it with one library.
//!
//! Export: `blockdev-add` (a `file` node on the path, then a `raw` node on it, named as a disk's:
//! `<id>-file`, `<id>-fmt`) → `block-export-add` (type `vhost-user-blk` on a Unix socket), as the
//! engine's transaction: a failure deletes the nodes already added, and the error names the step.
//! Unexport: `block-export-del` → wait for `BLOCK_EXPORT_DELETED` (its clients are gone) → the
//! nodes.

use std::path::Path;
use std::time::Duration;

use qhotplug_cmdline::{names, QemuProcess, StorageDaemonLauncher};
use qhotplug_qmp::command::{BlockExportDel, BlockdevAdd};
use qhotplug_qmp::{Client, EventKind, EventStream};
use serde_json::json;
use tracing::Instrument;

use crate::engine::holds::Named;
use crate::engine::transaction::Transaction;
use crate::error::{Error, Result};
use crate::qemu::delete::Delete;

/// How long an export's removal may wait for its clients to go.
const UNEXPORT_DEADLINE: Duration = Duration::from_secs(10);

/// A running `qemu-storage-daemon`, killed and reaped when dropped.
#[derive(Debug)]
pub struct StorageDaemon {
    client: Client,
    process: QemuProcess,
}

impl StorageDaemon {
    /// Launches it.
    pub async fn launch(launcher: StorageDaemonLauncher) -> Result<StorageDaemon> {
        let (client, process) = launcher.launch().await.map_err(Error::Launch)?;
        Ok(StorageDaemon { client, process })
    }

    /// Its QMP client, for any command and its events.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Its events (`BLOCK_EXPORT_DELETED`, `BLOCK_JOB_*`, …).
    pub fn events(&self) -> EventStream {
        self.client.events()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Serves the raw image at `path` as vhost-user-blk export `id` on a Unix socket at `socket`
    /// (the daemon listens there once this returns). The daemon opens the image itself, read-write
    /// when `writable`.
    pub async fn export(&self, id: &str, path: &Path, socket: &Path, writable: bool) -> Result<()> {
        let span = crate::vm_core::hotplug_span("export", id);
        async {
            qhotplug_cmdline::validate_id(id)?;
            let (file, fmt) = (names::file_node(id), names::format_node(id));
            let read_only = !writable;
            let node = |driver: &str, node_name: String, props: serde_json::Value| BlockdevAdd {
                driver: driver.into(),
                node_name,
                props: match props {
                    serde_json::Value::Object(map) => map,
                    _ => unreachable!("node properties are an object"),
                },
            };
            let file_add = node(
                "file",
                file.clone(),
                json!({"filename": path.to_string_lossy(), "read-only": read_only}),
            );
            let fmt_add = node(
                "raw",
                fmt.clone(),
                json!({"file": file, "read-only": read_only}),
            );
            let export = json!({"type": "vhost-user-blk", "id": id, "node-name": fmt,
                "writable": writable, "addr": {"type": "unix", "path": socket.to_string_lossy()}});
            // The engine's transaction: each node's undo recorded before it is added, all undone
            // in reverse if a later step fails.
            let client = &self.client;
            let mut txn = Transaction::new(client.clone(), "export", Named(id.to_owned(), None));
            let undo = Some(Delete::BlockNode(file.clone()));
            txn.step("blockdev-add", undo, client.execute(&file_add))
                .await?;
            let undo = Some(Delete::BlockNode(fmt.clone()));
            txn.step("blockdev-add", undo, client.execute(&fmt_add))
                .await?;
            // No typed command: the vhost-user-blk export's arguments are this one's alone.
            txn.step(
                "block-export-add",
                None,
                client.execute_raw("block-export-add", &export),
            )
            .await?;
            txn.commit();
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Ends export `id` (`block-export-del`), waits for `BLOCK_EXPORT_DELETED` (its clients are
    /// disconnected then: unplug the VM's disk first), and deletes its nodes.
    pub async fn unexport(&self, id: &str) -> Result<()> {
        let span = crate::vm_core::hotplug_span("unexport", id);
        async {
            let mut events = self.client.events();
            let step = tracing::debug_span!(crate::spans::STEP, name = "block-export-del", id);
            self.client
                .execute(&BlockExportDel {
                    id: id.to_owned(),
                    mode: None,
                })
                .instrument(step)
                .await?;
            let step =
                tracing::debug_span!(crate::spans::STEP, name = "wait BLOCK_EXPORT_DELETED", id);
            let deleted =
                |e: &EventKind| matches!(e, EventKind::BlockExportDeleted(d) if d.id == id);
            let deadline = tokio::time::Instant::now() + UNEXPORT_DEADLINE;
            if !events.wait_for(deadline, deleted).instrument(step).await {
                return Err(Error::UnexportPending {
                    id: id.to_owned(),
                    after: UNEXPORT_DEADLINE,
                });
            }
            for node in [names::format_node(id), names::file_node(id)] {
                Delete::BlockNode(node).run(&self.client).await?;
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Asks the daemon to quit and waits for it to exit.
    pub async fn quit(mut self) -> Result<()> {
        let _ = self.client.execute(&qhotplug_qmp::command::Quit).await;
        self.process.wait().await.map_err(|source| Error::Io {
            what: "waiting for qemu-storage-daemon to exit",
            source,
        })?;
        Ok(())
    }
}
