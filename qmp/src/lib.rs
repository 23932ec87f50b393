//! An async client for QEMU's Machine Protocol (QMP).
//!
//! One [`Client`] drives one QMP socket: any number of tasks may have commands in flight on it and
//! each gets its own reply; events go to any number of subscribers; `getfd` and `add-fd` carry their
//! fd in the same `sendmsg` as the command.
//!
//! ```no_run
//! use futures::StreamExt;
//! use qhotplug_qmp::{command::QueryStatus, Client};
//!
//! # async fn demo() -> qhotplug_qmp::Result<()> {
//! let client: Client = qhotplug_qmp::connect("/run/vm1/qmp.sock").await?;
//! println!("QEMU {}", client.greeting().version.qemu);
//!
//! let mut events = client.events();
//! let status = client.execute(&QueryStatus).await?;
//! println!("running: {}", status.running);
//!
//! // Anything without a typed command:
//! let kvm = client.execute_raw("query-kvm", &serde_json::Value::Null).await?;
//! println!("{kvm}");
//!
//! while let Some(Ok(event)) = events.next().await {
//!     println!("{}: {}", event.name(), event.data());
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Behaviour
//!
//! - Requests go out as the shortest valid JSON: QEMU reads its monitor one byte at a time.
//! - In-band replies are matched in order; `exec-oob` requests carry an `id`
//!   ([`Config::inband_ids`] puts one on every command). A command whose future is dropped, or whose
//!   timeout passes, is taken back if none of it was written yet; otherwise it still runs in QEMU and
//!   its reply is discarded when it comes.
//! - No caller ever gets another caller's reply. A frame that is not a QMP message (bad JSON or
//!   UTF-8, over the frame limit, not a JSON object, the members of two kinds of message) or a reply
//!   that cannot be paired for certain (an id never issued, nothing in flight, a reply before its
//!   command was completely sent) ends the connection with [`Error::Frame`] for every waiter.
//! - An event whose `data` or `timestamp` cannot be decoded is still delivered, as
//!   [`EventKind::Other`] with `Null` data: it cannot be a reply, so it fails nothing in flight.
//! - Memory is bounded whatever the peer does: frames by [`Config::max_frame`], unsent requests by
//!   [`Config::max_outbox`] (past it, [`Error::Backlog`]), buffered events by
//!   [`Config::event_capacity`] per subscriber, and an event is held only until every live
//!   subscriber has it (none when nobody subscribes).
//! - When the socket closes, or the connection task ends in any way (a panic included), every
//!   pending command fails at once and event streams end.
//! - Writes use `MSG_NOSIGNAL`: a QEMU that hangs up is an error, never a SIGPIPE.

#![warn(missing_docs)]

mod client;
pub mod codec;
pub mod command;
mod connection;
pub mod decode;
mod error;
pub mod event;
pub mod message;
pub mod schema;
mod sys;

pub use client::{connect, Client, Config, EventStream, Lagged, DEFAULT_MAX_OUTBOX, QMP_SPAN};
pub use command::Command;
pub use connection::Connection;
pub use error::{Chain, Error, FrameError, QmpError, Result};
pub use event::Timestamp;
pub use event::{Event, EventKind};
pub use message::Greeting;
pub use schema::Schema;

/// The README, compiled as a doctest so its example stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
