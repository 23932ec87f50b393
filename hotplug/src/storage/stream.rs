//! Block stream (reference §3.2): a disk's backing chain pulled into its top image, which then
//! stands alone; the images that were under it stay valid, their nodes go, their files are the
//! caller's (a template can be deleted while the guest goes on reading).

use std::sync::Arc;

use qhotplug_cmdline::Disk;
use qhotplug_qmp::command::BlockStream;

use crate::engine::holds;
use crate::error::{Error, Result};
use crate::kinds::{Device, DeviceKind};
use crate::qemu::jobs;
use crate::storage::block_job::{BlockJob, Ends};
use crate::vm_core::Core;

/// The commands a stream uses.
const COMMANDS: &[&str] = &["block-stream", "query-jobs", "job-dismiss"];

/// See [`Vm::stream_disk`](crate::Vm::stream_disk).
pub(crate) async fn start(core: &Arc<Core>, id: &str) -> Result<BlockJob> {
    core.require("block stream", COMMANDS).await?;
    let (busy, Device::Disk(disk)) = holds::busy_device(core, id, DeviceKind::Disk)? else {
        unreachable!("a disk entry is a disk")
    };
    jobs::require_local("block stream", &disk)?;
    if disk.backing.is_empty() {
        return Err(Error::Precondition {
            operation: "block stream",
            reason: format!("{id}: no backing image to stream from"),
        });
    }
    let client = core.client.clone();
    let events = client.events();
    let job = qhotplug_cmdline::names::stream_job(id);
    let stream = BlockStream {
        job_id: job.clone(),
        device: disk.top_node(),
        speed: None,
        auto_dismiss: Some(false),
    };
    let span = tracing::debug_span!(crate::spans::STEP, name = "block-stream", id);
    tracing::Instrument::instrument(client.execute(&stream), span).await?;
    tracing::info!(job, "stream started");
    Ok(BlockJob::new(core, job, events, busy, ends(&disk)))
}

/// What a stream's end changes: the top stands alone, and every node under it goes.
pub(crate) fn ends(disk: &Disk) -> Ends {
    let alone = Disk {
        backing: Vec::new(),
        ..disk.clone()
    };
    let on_complete = disk.node_names()[alone.node_names().len()..].to_vec();
    Ends {
        after: alone,
        on_complete,
        on_abort: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fixtures::chain;

    #[test]
    fn a_stream_leaves_the_top_alone_and_deletes_every_layer_under_it() {
        let ends = ends(&chain());
        assert!(ends.after.backing.is_empty());
        assert_eq!(ends.after.top_node(), "d-fmt.2");
        assert_eq!(ends.on_complete, ["d-fmt.1", "d-file.1", "d-fmt", "d-file"]);
        assert!(ends.on_abort.is_empty());
    }
}
