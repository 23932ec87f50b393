//! A backup's preparation, push or pull alike (libvirt's `qemuBackupDiskPrepareDataOne*` in
//! `qemu_backup.c`): the disks marked busy and checked (local, their checkpoints usable, the new
//! one's name free), per disk a new image made in the backup's [`Transaction`] (a push backup's
//! target, a pull backup's scratch), and per disk the checkpoint actions of the backup's point in
//! time. What is left to each kind is its job (`blockdev-backup` with its `sync`) and its end.

use std::path::PathBuf;
use std::sync::Arc;

use qhotplug_cmdline::{Disk, DiskLayer, Format};

use crate::engine::holds::Busy;
use crate::engine::transaction::Transaction;
use crate::error::{Error, Result};
use crate::storage::checkpoint::{self, AtBackup};
use crate::storage::new_image::{self, Backing, ImageSpec, NewImage};
use crate::vm_core::Core;

/// What a backup asks of one disk.
pub(crate) struct Wanted {
    /// The disk.
    pub(crate) disk: String,
    /// The image the SDK makes for it (it must not exist).
    pub(crate) path: PathBuf,
    /// What the image is.
    pub(crate) image: Image,
}

/// The image a backup makes for a disk.
pub(crate) enum Image {
    /// A push backup's target, `format`, its header naming `previous` (the backup it adds to).
    Target {
        format: Format,
        previous: Option<PathBuf>,
    },
    /// A pull backup's scratch: qcow2 standing on the disk's top node, where the blocks the
    /// guest overwrites are kept while the backup is read.
    Scratch,
}

/// One disk, prepared.
pub(crate) struct Prepared {
    /// The disk as it was.
    pub(crate) disk: Disk,
    /// Its new image.
    pub(crate) image: NewImage,
    /// Its checkpoint actions, and the disk as they leave it.
    pub(crate) at: AtBackup,
}

/// A backup's start up to its point in time: the transaction holding every disk's busy mark and
/// the images made so far, and each disk prepared. `operation` names it in errors; `since` makes
/// it incremental; `checkpoint` is the one it adds.
pub(crate) async fn prepare(
    core: &Arc<Core>,
    operation: &'static str,
    wanted: &[Wanted],
    since: Option<&str>,
    checkpoint: Option<&str>,
) -> Result<(Transaction<Vec<Busy>>, Vec<Prepared>)> {
    if wanted.is_empty() {
        return Err(Error::Precondition {
            operation,
            reason: format!("a {operation} of no disk"),
        });
    }
    // Every disk marked busy and checked before anything is created or sent.
    let ids: Vec<String> = wanted.iter().map(|w| w.disk.clone()).collect();
    let (busy, plans) = checkpoint::plan(core, operation, &ids, since, checkpoint).await?;
    let client = core.client.clone();
    let mut events = client.events();
    let mut txn = Transaction::new(client.clone(), operation, busy);
    let mut prepared = Vec::new();
    for ((checkpoints, chain), want) in plans.into_iter().zip(wanted) {
        let disk = &checkpoints.disk;
        let made = async {
            let size = crate::qemu::block::disk_size(&client, disk).await?;
            let generation = disk.next_generation();
            let top = disk.top_layer();
            let previous = match &want.image {
                Image::Target {
                    previous: Some(path),
                    ..
                } => Some(DiskLayer {
                    path: path.clone(),
                    format: crate::kinds::disk::format_of(path),
                    generation: 0,
                    checkpoints: Vec::new(),
                }),
                _ => None,
            };
            let (format, backing) = match &want.image {
                // An incremental backup's target stands on the one before it: qcow2.
                Image::Target { format, .. } => {
                    let format = if since.is_some() {
                        Format::Qcow2
                    } else {
                        *format
                    };
                    let header = previous.as_ref();
                    (format, Backing::Null { header })
                }
                Image::Scratch => (Format::Qcow2, Backing::Node(&top)),
            };
            let spec = ImageSpec {
                layer: DiskLayer {
                    path: want.path.clone(),
                    format,
                    generation,
                    checkpoints: Vec::new(),
                },
                size,
                backing,
            };
            new_image::create(&client, &mut txn, &mut events, disk, spec).await
        };
        let image = match made.await {
            Ok(image) => image,
            Err(error) => return Err(txn.abort(error).await),
        };
        let at = checkpoints.at_backup(since.map(|_| chain.as_slice()), checkpoint);
        prepared.push(Prepared {
            disk: checkpoints.disk,
            image,
            at,
        });
    }
    Ok((txn, prepared))
}
