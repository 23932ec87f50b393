//! The files behind the fds QEMU holds in its fd sets, as the kernel names them
//! (`/proc/<qemu>/fd/<n>`): how a process that attaches later learns which image each set is.
//! Every image fd the SDK hands QEMU stays in its set while a node is open on it.

use std::path::PathBuf;

use qhotplug_qmp::command::{FdsetInfo, QueryFdsets};
use qhotplug_qmp::Client;

use crate::error::Result;

/// One fd of an fd set and the file it is.
pub(crate) struct FdFile {
    /// Its set.
    pub(crate) set: i64,
    /// The tag it was added with (`add-fd`'s `opaque`).
    pub(crate) tag: Option<String>,
    /// The file.
    pub(crate) path: PathBuf,
}

/// Every fd in QEMU's fd sets whose file QEMU's process `pid` lets us read; none without a pid.
pub(crate) async fn fd_files(client: &Client, pid: Option<u32>) -> Result<Vec<FdFile>> {
    if pid.is_none() {
        return Ok(Vec::new());
    }
    Ok(files_of(&client.execute(&QueryFdsets).await?, pid))
}

/// The files behind the fds of `sets` (a `query-fdsets` already made), as [`fd_files`] reads them.
pub(crate) fn files_of(sets: &[FdsetInfo], pid: Option<u32>) -> Vec<FdFile> {
    let Some(pid) = pid else {
        return Vec::new();
    };
    sets.iter()
        .flat_map(|set| set.fds.iter().map(move |fd| (set.fdset_id, fd)))
        .filter_map(|(set, fd)| {
            let path = std::fs::read_link(format!("/proc/{pid}/fd/{}", fd.fd)).ok()?;
            Some(FdFile {
                set,
                tag: fd.opaque.clone(),
                path,
            })
        })
        .collect()
}
