//! The storage half: block jobs and their handles, new images, the operations on a disk's image
//! chain (mirror, commit, stream, snapshot), push and pull backups with their checkpoints, jobs
//! found again, and the storage daemon.

pub(crate) mod backup;
pub(crate) mod backup_prep;
pub(crate) mod block_job;
pub(crate) mod checkpoint;
pub(crate) mod commit;
pub(crate) mod daemon;
pub(crate) mod found_job;
pub(crate) mod mirror;
pub(crate) mod nbd;
pub(crate) mod new_image;
pub(crate) mod pull;
pub(crate) mod snapshot;
pub(crate) mod stream;

/// What the storage half's planners are tested on.
#[cfg(test)]
pub(crate) mod fixtures {
    use qhotplug_cmdline::{Disk, DiskLayer, Format, Pci};

    /// Disk `d` of generation 2 on `d.2.qcow2`, over `d.1.qcow2` (generation 1) and `d.0.raw`
    /// (generation 0).
    pub(crate) fn chain() -> Disk {
        let layer = |generation: u32, name: &str, format| DiskLayer {
            path: format!("/images/{name}").into(),
            format,
            generation,
            checkpoints: Vec::new(),
        };
        let mut disk = Disk::virtio_blk("d", "/images/d.2.qcow2", Pci::new("pci.0", 5));
        disk.format = Format::Qcow2;
        disk.generation = 2;
        disk.backing = vec![
            layer(1, "d.1.qcow2", Format::Qcow2),
            layer(0, "d.0.raw", Format::Raw),
        ];
        disk
    }
}
