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
//! - In-band replies are matched in order; `exec-oob` requests carry an `id`. A command whose future
//!   is dropped, or whose timeout passes, still runs in QEMU; its reply is discarded when it comes.
//! - When the socket closes, every pending command fails with [`Error::Disconnected`] at once and
//!   event streams end.
//! - A frame that is not valid QMP is logged and skipped; the connection goes on.

#![warn(missing_docs)]

mod client;
pub mod codec;
pub mod command;
mod connection;
mod error;
pub mod event;
pub mod message;

pub use client::{connect, Client, Config, EventStream, Lagged};
pub use command::Command;
pub use connection::Connection;
pub use error::{Error, FrameError, QmpError, Result};
pub use event::{Event, EventKind};
pub use message::{Greeting, Timestamp};
