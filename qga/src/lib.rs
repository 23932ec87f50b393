//! A client for QEMU's guest agent (`qemu-ga`), the program inside a guest that answers on a
//! virtio-serial port (`org.qemu.guest_agent.0`) whose host side is a QEMU socket chardev.
//!
//! The agent is the guest's, so everything it sends is untrusted, and its protocol has no way of
//! its own to pair a reply with a request: it answers in order, keeps answering requests written
//! while it was not running or after its client gave up, and never says it is gone. [`Agent`]
//! makes that safe:
//! - one command at a time, in turn, however many tasks share the agent;
//! - `0xFF` + `guest-sync-delimited` with a random id on connect and after anything that leaves
//!   the stream in doubt (a timeout, a reply past the frame limit, a call dropped part-way), every
//!   line skipped until the `0xFF` reply with that id;
//! - each request carries an id the agent echoes; a line without it is skipped, never returned;
//! - request ids counted up from a random start, so an agent cannot answer a request before it
//!   exists;
//! - a frame limit of its own ([`DEFAULT_MAX_FRAME`]: qemu-ga's largest reply, a 48 MiB file
//!   read, fits), lines past it discarded as they arrive; a line is read for its `id` without
//!   building a JSON value, and only our reply is decoded, so the agent's lines never make the
//!   process hold more than 4× the frame limit on their account;
//! - replies decoded strictly and checked: a struct only from a JSON object (never an array read
//!   positionally), unknown members skipped at any depth, base64 that must decode, counts that
//!   must match their data or fit the request (`guest-file-read`, `guest-set-vcpus`,
//!   `guest-set-memory-blocks`, `guest-get-vcpus`): anything else is [`Error::Decode`];
//! - errors that tell a timeout (the agent may still answer) from a refusal while frozen, a
//!   command the agent does not offer, a failure, and a closed socket; every error after the
//!   command's bytes may have reached the agent and before its reply was read says
//!   [`Error::is_in_doubt`] (a socket that closes then is [`Error::ReplyLost`], not
//!   [`Error::Disconnected`]);
//! - an agent that refuses `guest-sync-delimited` is [`Error::Unsupported`] at once, not a slow
//!   agent's [`Error::Timeout`];
//! - a freeze that always thaws ([`Frozen`]): on `thaw`, on drop, on a safety timer, and at once
//!   when the freeze itself fails and may have frozen something; a thaw is believed only when the
//!   agent answered it, and tried again until it is ([`FreezeState`]); a second freeze never
//!   thaws the first;
//! - a password or an ssh key ([`command::Redacted`]) shown by no `Debug`, and replaced by
//!   `<redacted>` in an error where the agent repeats it.
//!
//! Reuses `qhotplug-qmp`'s line codec and request encoding; typed commands are in [`command`].
//!
//! ```no_run
//! # async fn demo() -> qhotplug_qga::Result<()> {
//! use qhotplug_qga::command::{GuestExec, GuestExecStatus, GuestGetOsinfo};
//! use qhotplug_qga::{Agent, Config};
//!
//! let agent = Agent::connect("/run/vm1/qga.sock", Config::new()).await?;
//! let os = agent.execute(&GuestGetOsinfo).await?;
//! let started = agent
//!     .execute(&GuestExec { path: "/bin/uname".into(), arg: vec!["-r".into()], capture_output: true })
//!     .await?;
//! let status = agent.execute(&GuestExecStatus { pid: started.pid }).await?;
//! println!("{:?}: {}", os.pretty_name, String::from_utf8_lossy(&status.stdout()));
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod agent;
pub mod command;
mod error;
mod freeze;

pub use agent::{Agent, Config, DEFAULT_MAX_FRAME, QGA_SPAN, SENTINEL};
pub use error::{Error, Result};
pub use freeze::{FreezeState, Frozen};

/// The README, compiled as a doctest so its example stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
