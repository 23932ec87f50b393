//! The agent client's errors. Each says whether the command may have run: [`Error::is_in_doubt`]
//! is true for every error that came after the command's bytes may have reached the agent and
//! before its reply was read ([`Error::Timeout`], [`Error::FrameTooLong`], [`Error::Gone`],
//! [`Error::ReplyLost`]); a caller that retries only what is not in doubt never runs a command
//! twice. After any of them the next call resynchronises first.

use std::path::PathBuf;
use std::time::Duration;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a call to the guest agent can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The agent's host socket could not be reached (QEMU is gone, or the path is wrong).
    #[error("cannot reach the guest agent's socket {path:?}")]
    NotConnected {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No agent runs in the guest: the guest has not opened the agent's port (QEMU's
    /// `frontend-open` for its chardev is false, or `VSERPORT_CHANGE` said it closed). Nothing
    /// was sent. Told apart from [`Error::Timeout`] by the VM's own QMP connection (the
    /// `qhotplug` crate's `GuestAgent`), which an [`Agent`](crate::Agent) alone cannot see.
    #[error("the guest agent is not running: the guest has not opened port {port}")]
    NotRunning {
        /// The port's device id.
        port: String,
    },
    /// The guest closed the agent's port while `command` ran: the agent stopped or restarted
    /// mid-command. Nothing is known of what the command did; the next call resynchronises.
    #[error("the guest agent went away while running {command}")]
    Gone {
        /// The command.
        command: String,
    },
    /// The socket closed before the command was sent whole (QEMU went away, or its chardev was
    /// removed): the agent cannot have run it. Not in doubt. The next call connects again.
    #[error("the guest agent's socket closed")]
    Disconnected,
    /// The socket closed or failed after `command` was sent and before its reply was read: the
    /// agent may have run it. In doubt. The next call connects again.
    #[error("the guest agent's socket closed after {command} was sent, before its reply")]
    ReplyLost {
        /// The command.
        command: String,
        /// The socket's error, when it failed rather than closed.
        #[source]
        source: Option<std::io::Error>,
    },
    /// No answer in time (or the request could not be written in time): the agent is not
    /// running, is slow, or is busy with an earlier command. In doubt. The next call
    /// resynchronises before it sends anything, so a late answer is never taken for another
    /// command's.
    #[error("the guest agent did not answer {command} within {after:?}")]
    Timeout {
        /// The command.
        command: String,
        /// How long the call waited.
        after: Duration,
    },
    /// The agent refused because the guest's filesystems are frozen: only ping, info, sync, and
    /// freeze status and thaw are allowed then. For a freeze: they were frozen already, by a guard
    /// that still holds them or by someone else.
    #[error("the guest agent refused {command}: the filesystems are frozen")]
    Frozen {
        /// The command.
        command: String,
    },
    /// The agent does not offer the command, or has it disabled (`CommandNotFound`).
    #[error("the guest agent does not offer {command}: {desc}")]
    Unsupported {
        /// The command.
        command: String,
        /// The agent's words.
        desc: String,
    },
    /// The agent ran the command and it failed. Not in doubt: the agent said so.
    #[error("the guest agent's {command} failed: {class}: {desc}")]
    Agent {
        /// The command.
        command: String,
        /// The error class.
        class: String,
        /// The agent's words.
        desc: String,
    },
    /// A line from the agent was longer than the frame limit; it was discarded as it came. In
    /// doubt (it may have been the reply). The next call resynchronises.
    #[error("a line from the guest agent exceeded {limit} bytes")]
    FrameTooLong {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The agent's reply to `command` did not have the shape the command returns (a struct read
    /// only from an object, base64 that decodes, a count that matches its data), or did not fit
    /// the request (a count past what was asked). The agent ran the command: not in doubt, but
    /// what it did is only what it claimed.
    #[error("the guest agent's reply to {command} did not decode")]
    Decode {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A request could not be encoded, or the socket failed.
    #[error("guest agent I/O")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// True when nothing is known of what the command did: its bytes may have reached the agent
    /// and its reply was not read (no answer in time, a reply lost to the frame limit or to a
    /// closed socket, an agent that went away mid-command).
    pub fn is_in_doubt(&self) -> bool {
        match self {
            Error::Timeout { .. }
            | Error::FrameTooLong { .. }
            | Error::Gone { .. }
            | Error::ReplyLost { .. } => true,
            Error::NotConnected { .. }
            | Error::NotRunning { .. }
            | Error::Disconnected
            | Error::Frozen { .. }
            | Error::Unsupported { .. }
            | Error::Agent { .. }
            | Error::Decode { .. }
            | Error::Io(_) => false,
        }
    }

    /// The same error, as seen after `command` was sent whole: a closed or failed socket is then
    /// [`Error::ReplyLost`].
    pub(crate) fn after_send(self, command: &str) -> Error {
        match self {
            Error::Disconnected => Error::ReplyLost {
                command: command.into(),
                source: None,
            },
            Error::Io(e) => Error::ReplyLost {
                command: command.into(),
                source: Some(e),
            },
            other => other,
        }
    }
}
