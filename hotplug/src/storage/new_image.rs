//! A new image the SDK creates for a disk (a mirror's target, a snapshot's overlay): the file
//! made on the host (never over an existing one), handed to QEMU as an fd, its protocol node,
//! for qcow2 QEMU's own `blockdev-create` job (no `qemu-img` on the host), then its format node
//! with the backing the operation wants. Every QEMU step is in the caller's transaction; the file
//! is removed if the operation does not get as far as [`NewImage::keep`].

use std::path::{Path, PathBuf};

use qhotplug_cmdline::{DeviceModel, Disk, DiskLayer, Format};
use qhotplug_qmp::command::BlockdevCreate;
use qhotplug_qmp::{Client, EventStream};

use crate::engine::holds::Hold;
use crate::engine::run_backends;
use crate::engine::transaction::Transaction;
use crate::error::{Error, Result};
use crate::kinds::Backend;
use crate::qemu::delete::Delete;
use crate::qemu::jobs;

/// What the new image's format node stands on.
pub(crate) enum Backing<'a> {
    /// Nothing: a full copy, or an overlay `blockdev-snapshot` links itself (which requires a
    /// null backing). `header`: the backing file its qcow2 header names, for offline tools.
    Null { header: Option<&'a DiskLayer> },
    /// The existing format node of this layer (a mirror of the top only).
    Node(&'a DiskLayer),
}

/// The image to make: the layer it is, its size, and what it stands on. Its fd stays in its set
/// (tagged for the disk) while its nodes are open, for a later process to find its file.
pub(crate) struct ImageSpec<'a> {
    pub(crate) layer: DiskLayer,
    pub(crate) size: u64,
    pub(crate) backing: Backing<'a>,
}

/// An image made for disk `disk`; its file is removed on drop unless kept.
pub(crate) struct NewImage {
    /// The image, as a layer of the disk.
    pub(crate) layer: DiskLayer,
    created: Option<PathBuf>,
}

impl NewImage {
    /// The operation went through: the file stays.
    pub(crate) fn keep(mut self) -> DiskLayer {
        self.created = None;
        self.layer.clone()
    }
}

impl Drop for NewImage {
    fn drop(&mut self) {
        if let Some(path) = self.created.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Creates image `new` for `disk` and adds its nodes, each step in `txn`.
pub(crate) async fn create<H: Hold>(
    client: &Client,
    txn: &mut Transaction<H>,
    events: &mut EventStream,
    disk: &Disk,
    new: ImageSpec<'_>,
) -> Result<NewImage> {
    let ImageSpec {
        layer,
        size,
        backing,
    } = new;
    // Names QEMU would refuse are refused before the host is touched.
    let as_disk = disk.with_top(&layer);
    as_disk.check()?;
    let file = create_file(&layer.path, layer.format, size)?;
    let image = NewImage {
        created: Some(layer.path.clone()),
        layer,
    };
    let mut nodes = as_disk.blockdev_add("");
    let mut format_node = nodes.pop().expect("a disk's format node");
    let backends = vec![
        Backend::Fdset {
            fd: file.into(),
            tag: qhotplug_cmdline::names::fdset_tag(&disk.id),
        },
        Backend::Blockdev {
            add: nodes.pop().expect("a disk's protocol node"),
            on_fdset: true,
        },
    ];
    run_backends(client, txn, backends).await?;
    if image.layer.format == Format::Qcow2 {
        let header = match &backing {
            Backing::Null { header } => *header,
            Backing::Node(layer) => Some(*layer),
        };
        format_qcow2(client, txn, events, &as_disk, size, header).await?;
        let node = match backing {
            Backing::Null { .. } => serde_json::Value::Null,
            Backing::Node(layer) => {
                qhotplug_cmdline::names::format_node_at(&disk.id, layer.generation).into()
            }
        };
        format_node.props.insert("backing".into(), node);
    }
    let undo = Delete::BlockNode(as_disk.top_node());
    txn.step("blockdev-add", Some(undo), client.execute(&format_node))
        .await?;
    Ok(image)
}

/// Creates the file (never an existing one) and opens it read-write. A raw image is made `size`
/// bytes here; a qcow2 one is formatted by QEMU.
fn create_file(path: &Path, format: Format, size: u64) -> Result<std::fs::File> {
    let open = |source| Error::Open {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(open)?;
    if format == Format::Raw {
        file.set_len(size).map_err(open)?;
    }
    Ok(file)
}

/// Formats `image`'s protocol node as a qcow2 image of `size` bytes with `blockdev-create`,
/// waited for and dismissed. `header`: the backing file its header names.
async fn format_qcow2<H: Hold>(
    client: &Client,
    txn: &mut Transaction<H>,
    events: &mut EventStream,
    image: &Disk,
    size: u64,
    header: Option<&DiskLayer>,
) -> Result<()> {
    let job = qhotplug_cmdline::names::create_job(&image.top_node());
    let mut options =
        serde_json::json!({"driver": "qcow2", "file": image.file_node(), "size": size});
    if let Some(layer) = header {
        options["backing-file"] = layer.path.to_string_lossy().into_owned().into();
        options["backing-fmt"] = match layer.format {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
        .into();
    }
    let create = BlockdevCreate {
        job_id: job.clone(),
        options,
    };
    txn.step("blockdev-create", None, client.execute(&create))
        .await?;
    jobs::conclude(client, events, &job).await
}
