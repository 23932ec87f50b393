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
//! - a frame limit of its own (64 MiB by default: `guest-exec` output comes back as one line),
//!   lines past it discarded as they arrive, so memory stays bounded whatever the agent sends;
//! - errors that tell a timeout (the agent may still answer) from a refusal while frozen, a
//!   command the agent does not offer, a failure, and a closed socket;
//! - a freeze that always thaws ([`Frozen`]): on `thaw`, on drop, on a safety timer, and at once
//!   when the freeze itself fails.
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
pub use freeze::Frozen;
