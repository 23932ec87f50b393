//! The steps that need nothing but the QMP client: QEMU's error strings, the unplug and its wait,
//! deleting what the SDK made, QEMU's jobs, the one view of its block layer, and the files behind
//! its fd sets. A leaf layer: it knows no VM, no state and no device kind.

pub(crate) mod block;
pub(crate) mod delete;
pub mod errors;
pub(crate) mod fd_files;
pub(crate) mod jobs;
pub(crate) mod unplug;
