//! Block commit (reference §3.1): a disk's layers merged down into an image under them. The
//! active commit merges the top into the image right under it: it goes `ready`, and its pivot
//! moves the disk onto that image, whose nodes the disk already has open read-write (the SDK
//! opens every image it adds through a read-write fd, so the writable reopen of §3.4 works). An
//! intermediate commit merges one backing layer into the one under it and completes by itself.
//! Either way the merged layer's nodes go once it is done; its file is the caller's.

use std::sync::Arc;

use qhotplug_cmdline::{names, Disk, DiskLayer};
use qhotplug_qmp::command::BlockCommit;

use crate::engine::holds;
use crate::error::{Error, Result};
use crate::kinds::{Device, DeviceKind};
use crate::qemu::jobs;
use crate::storage::block_job::{BlockJob, Ends};
use crate::vm_core::Core;

/// The commands a commit uses.
const COMMANDS: &[&str] = &["block-commit", "query-jobs", "job-complete", "job-dismiss"];

/// See [`Vm::commit_disk`](crate::Vm::commit_disk): `layer` `None` for the active commit of the
/// top, `Some(i)` for backing layer `i` into layer `i + 1`.
pub(crate) async fn start(core: &Arc<Core>, id: &str, layer: Option<usize>) -> Result<BlockJob> {
    core.require("block commit", COMMANDS).await?;
    let (busy, Device::Disk(disk)) = holds::busy_device(core, id, DeviceKind::Disk)? else {
        unreachable!("a disk entry is a disk")
    };
    jobs::require_local("block commit", &disk)?;
    let Some((top, base, ends)) = plan(&disk, layer) else {
        return Err(Error::Precondition {
            operation: "block commit",
            reason: format!(
                "{id}: no image under the layer to commit (its backing chain has {} images)",
                disk.backing.len()
            ),
        });
    };
    let client = core.client.clone();
    let events = client.events();
    let job = qhotplug_cmdline::names::commit_job(id, layer.map(|_| top.generation));
    let commit = BlockCommit {
        job_id: job.clone(),
        device: disk.top_node(),
        top_node: names::format_node_at(id, top.generation),
        base_node: names::format_node_at(id, base.generation),
        speed: None,
        auto_dismiss: Some(false),
    };
    let span = tracing::debug_span!(crate::spans::STEP, name = "block-commit", id);
    tracing::Instrument::instrument(client.execute(&commit), span).await?;
    tracing::info!(job, "commit started");
    Ok(BlockJob::new(core, job, events, busy, ends))
}

/// The layer a commit merges (`layer` `None`: the top), the one it merges into, and what its end
/// changes: the committed layer leaves the chain and its nodes go. `None` when nothing is under
/// that layer.
pub(crate) fn plan(disk: &Disk, layer: Option<usize>) -> Option<(DiskLayer, DiskLayer, Ends)> {
    let (top, base) = match layer {
        None => (disk.top_layer(), disk.backing.first()?.clone()),
        Some(i) => (
            disk.backing.get(i)?.clone(),
            disk.backing.get(i + 1)?.clone(),
        ),
    };
    let after = match layer {
        None => Disk {
            backing: disk.backing[1..].to_vec(),
            ..disk.with_top(&base)
        },
        Some(i) => {
            let mut backing = disk.backing.clone();
            backing.remove(i);
            Disk {
                backing,
                ..disk.clone()
            }
        }
    };
    let ends = Ends {
        after,
        on_complete: top.node_names(&disk.id).into(),
        on_abort: Vec::new(),
    };
    Some((top, base, ends))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fixtures::chain;

    #[test]
    fn an_active_commit_merges_the_top_into_the_image_under_it() {
        let disk = chain();
        let (top, base, ends) = plan(&disk, None).unwrap();
        assert_eq!(top.generation, 2);
        assert_eq!(base.generation, 1);
        assert_eq!(ends.after.top_node(), "d-fmt.1");
        assert_eq!(ends.after.backing.len(), 1);
        assert_eq!(ends.on_complete, ["d-fmt.2", "d-file.2"]);
        assert!(ends.on_abort.is_empty());
    }

    #[test]
    fn a_layer_commit_merges_that_layer_down_and_keeps_the_top() {
        let disk = chain();
        let (top, base, ends) = plan(&disk, Some(0)).unwrap();
        assert_eq!((top.generation, base.generation), (1, 0));
        assert_eq!(ends.after.top_node(), disk.top_node());
        assert_eq!(ends.after.backing.len(), 1);
        assert_eq!(ends.after.backing[0].generation, 0);
        assert_eq!(ends.on_complete, ["d-fmt.1", "d-file.1"]);
        // Nothing under the bottom image, and no image alone to commit.
        assert!(plan(&disk, Some(1)).is_none());
        assert!(plan(
            &Disk {
                backing: vec![],
                ..disk
            },
            None
        )
        .is_none());
    }
}
