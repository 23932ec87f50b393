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
