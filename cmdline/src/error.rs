//! The crate's error type.

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a spec is invalid or QEMU did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An id QEMU would reject.
    #[error("invalid id {id:?}: {reason}")]
    InvalidId {
        /// The id.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The spec contradicts itself (duplicate id or address, bad count, …).
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// QEMU could not be spawned.
    #[error("cannot run {program}")]
    Spawn {
        /// The binary.
        program: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited during start-up; `stderr` is what it said.
    #[error("QEMU exited during start-up ({status}): {stderr}")]
    Exited {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its standard error.
        stderr: String,
    },
    /// The monitor did not answer in time, or the handshake failed.
    #[error("QEMU's QMP monitor")]
    Qmp(#[from] qhotplug_qmp::Error),
    /// Preparing the launch failed (sockets, files).
    #[error("preparing the launch")]
    Io(#[from] std::io::Error),
}
