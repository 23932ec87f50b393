//! Moving a running VM to another QEMU: the migration itself, and the copy of its disks when
//! the two do not share storage; saving it to a file and restoring it; and what a dead process's
//! migration left.

pub(crate) mod migrate;
pub(crate) mod orphaned;
pub(crate) mod save;
pub(crate) mod storage_copy;
