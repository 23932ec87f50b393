//! The crate's error type.

use std::{io, sync::Arc, time::Duration};

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error reply from QEMU: `{"error": {"class": ..., "desc": ...}}`.
///
/// `class` is one of QAPI's `QapiErrorClass` values (almost always `GenericError`); `desc` is for
/// humans and is not meant to be parsed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct QmpError {
    /// The error class, for example `GenericError`, `CommandNotFound` or `DeviceNotFound`.
    pub class: String,
    /// QEMU's human-readable description.
    pub desc: String,
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

/// Why a frame from the server could not be used. The codec's stream goes on after any of these; a
/// [`Client`](crate::Client)'s connection ends with [`Error::Frame`], since after a bad frame it
/// cannot know which command a later reply answers.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A frame grew past the configured limit before its newline arrived; its bytes were discarded.
    #[error("frame exceeds the limit of {limit} bytes")]
    TooLong {
        /// The configured limit, in bytes.
        limit: usize,
    },
    /// The stream ended inside a frame (no newline after its last bytes).
    #[error("stream ended inside a frame ({len} bytes)")]
    Incomplete {
        /// How many bytes the unfinished frame had.
        len: usize,
    },
    /// A complete frame was not a QMP message (bad JSON or UTF-8, not an object, no known
    /// member, or the members of more than one kind of message).
    #[error("malformed frame: {reason}")]
    Malformed {
        /// What was wrong with it.
        reason: String,
    },
    /// A well-formed reply that cannot be paired with a command for certain: an `id` the client
    /// never issued, no id where every command carries one, nothing in flight, or a reply to a
    /// request not yet completely written.
    #[error("reply cannot be paired with a command: {reason}")]
    Unpaired {
        /// Why.
        reason: String,
    },
}

/// Everything that can go wrong talking QMP.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// QEMU answered the command with an error reply.
    #[error("QMP command `{command}` failed: {error}")]
    Qmp {
        /// The command that failed.
        command: String,
        /// QEMU's error.
        error: QmpError,
    },
    /// The connection is gone (QEMU exited, the socket closed, or the connection task ended). Every
    /// pending and future command fails with this.
    #[error("QMP connection closed")]
    Disconnected,
    /// No reply came within the deadline. The connection stays usable: the late reply is discarded.
    #[error("QMP command `{command}` timed out after {after:?}")]
    Timeout {
        /// The command (or `"connect"` / `"handshake"`) that timed out.
        command: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The server broke the protocol: a bad greeting, a reply that matches nothing we can use, or a
    /// frame that could not be decoded during the handshake.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// A reply arrived but its `return` value did not have the shape the command promises.
    #[error("unexpected reply to `{command}`")]
    UnexpectedReply {
        /// The command.
        command: String,
        /// The deserialization error.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// A command's arguments could not be serialized.
    #[error("cannot serialize arguments of `{command}`")]
    Serialize {
        /// The command.
        command: String,
        /// The serializer's error.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// QEMU sent something that is not a QMP message (bad JSON or UTF-8, a line over the frame
    /// limit), or a reply that cannot be paired with a command. The connection was closed: every
    /// pending command gets this error, later ones [`Error::Disconnected`].
    #[error("QEMU sent a bad frame, connection closed: {0}")]
    Frame(FrameError),
    /// An event the caller was waiting for could not be seen because the subscription lagged.
    #[error("missed {0} events while waiting (subscriber lagged)")]
    EventsLost(u64),
    /// The connection's unsent requests reached their cap
    /// ([`Config::max_outbox`](crate::Config::max_outbox)): QEMU is not reading its monitor. Nothing
    /// was queued; the connection stays usable.
    #[error("QMP outbox full: over {limit} bytes of requests unsent (QEMU is not reading)")]
    Backlog {
        /// The cap, in bytes.
        limit: usize,
    },
    /// `exec-oob` was asked for, but the connection did not negotiate `oob` (QEMU does not offer
    /// it, or [`Config::oob`](crate::Config::oob) turned it off). Nothing was sent.
    #[error("out-of-band execution was not negotiated on this connection")]
    OobUnavailable,
    /// A socket error.
    #[error("QMP socket I/O failed")]
    Io(#[source] Arc<io::Error>),
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

impl Error {
    /// True when the connection is gone and no further command can succeed on it.
    pub fn is_disconnected(&self) -> bool {
        match self {
            Error::Disconnected | Error::Frame(_) => true,
            Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::NotConnected
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }

    /// The QMP error class when this is an error reply from QEMU.
    pub fn qmp_class(&self) -> Option<&str> {
        match self {
            Error::Qmp { error, .. } => Some(&error.class),
            _ => None,
        }
    }

    /// QEMU's error description when this is an error reply from QEMU.
    pub fn qmp_desc(&self) -> Option<&str> {
        match self {
            Error::Qmp { error, .. } => Some(&error.desc),
            _ => None,
        }
    }
}

/// An error and its causes, one after another (`a: b: c`), as a reporter prints them: every
/// error of the SDK's crates says only what its own layer adds in `Display` and gives its cause as
/// `source()`, never both.
///
/// ```
/// use qhotplug_qmp::Chain;
/// let e = qhotplug_qmp::Error::from(std::io::Error::other("broken pipe"));
/// assert_eq!(Chain(&e).to_string(), "QMP socket I/O failed: broken pipe");
/// ```
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// At most the first 64 characters of a peer's text, for a log line or an error message: what a
/// peer sends can be as long as a frame.
pub(crate) fn clip(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
