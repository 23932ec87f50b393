//! Moving a running VM to another QEMU: the migration itself, and the copy of its disks when
//! the two do not share storage; and what a dead process's migration left.

pub(crate) mod migrate;
pub(crate) mod orphaned;
pub(crate) mod storage_copy;
