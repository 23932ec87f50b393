//! The socket's shared write side and the task that reads it.
//!
//! A caller writes its own request straight to the socket when nothing is queued ahead of it (no
//! hop through another task on the way out); what the socket does not take at once, or what must
//! wait, stays in a shared outbox that the [`Connection`] task flushes. The task reads every frame:
//! in-band replies are matched first-in first-out (QEMU answers in-band commands in order, exactly
//! one reply each), `exec-oob` replies by their `id`, and events go to a broadcast channel. Queue
//! order is write order, since both change under one lock. A caller that went away leaves its slot
//! in the queue, so its reply is read and discarded and the stream stays in step. When the socket
//! closes, every waiter fails at once.
//!
//! [`Client`]: crate::Client

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use sendfd::SendWithFd;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio_util::codec::FramedRead;

use crate::codec::QmpCodec;
use crate::error::{Error, FrameError, QmpError, Result};
use crate::event::Event;
use crate::message::{Message, Reply};

/// What a waiter receives: the raw `return` value, QEMU's error, or why the connection closed
/// under it.
pub(crate) type ReplyResult = std::result::Result<Box<RawValue>, Failure>;

/// Why a command got no `return`.
pub(crate) enum Failure {
    /// QEMU answered with an error.
    Qmp(QmpError),
    /// The connection closed with this error before the reply came.
    Closed(Error),
}

/// A request on its way from a [`Client`](crate::Client) to the socket.
pub(crate) struct Op {
    /// The encoded request, CRLF included.
    pub bytes: Vec<u8>,
    /// An fd to send with the first byte of `bytes` (`getfd`, `add-fd`).
    pub fd: Option<OwnedFd>,
    /// `Some(id)` for `exec-oob`.
    pub oob_id: Option<u64>,
    /// Where the reply goes. Dropped unanswered when the connection ends.
    pub reply: oneshot::Sender<ReplyResult>,
}

struct InBand {
    reply: oneshot::Sender<ReplyResult>,
    carries_fd: bool,
}

/// Bytes waiting to be written, and the one fd (if any) that must ride on a given byte of them.
#[derive(Default)]
struct Outbox {
    buf: BytesMut,
    /// The fd and the offset in `buf` of the first byte of the request that carries it.
    fd: Option<(usize, OwnedFd)>,
}

impl Outbox {
    fn push(&mut self, bytes: &[u8], fd: Option<OwnedFd>) {
        if let Some(fd) = fd {
            debug_assert!(self.fd.is_none(), "one fd-carrying request at a time");
            self.fd = Some((self.buf.len(), fd));
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Writes as much as the socket takes without blocking.
    fn write_some(&mut self, sock: &OwnedWriteHalf) -> io::Result<()> {
        while !self.buf.is_empty() {
            let written = match &self.fd {
                Some((0, fd)) => sock.as_ref().send_with_fd(&self.buf, &[fd.as_raw_fd()]),
                Some((at, _)) => sock.try_write(&self.buf[..*at]),
                None => sock.try_write(&self.buf),
            };
            let n = match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.buf.advance(n);
            self.fd = match self.fd.take() {
                // Sent along with the first byte: our copy closes here, QEMU has its own.
                Some((0, _)) => None,
                Some((at, fd)) => Some((at - n, fd)),
                None => None,
            };
        }
        Ok(())
    }
}

/// The future that drives one QMP connection. [`connect`](crate::connect) spawns it for you; with
/// [`Config::handshake`](crate::Config::handshake) you run it yourself.
#[must_use = "a Connection does nothing unless it is run"]
pub struct Connection {
    pub(crate) frames: FramedRead<OwnedReadHalf, QmpCodec>,
    pub(crate) shared: Arc<Shared>,
    /// Closes when the last client is dropped; nothing is ever sent on it.
    pub(crate) clients: mpsc::UnboundedReceiver<()>,
    pub(crate) events: broadcast::Sender<Event>,
}

/// What callers and the connection task share: the socket's write half and the queues.
pub(crate) struct Shared {
    write: OwnedWriteHalf,
    state: Mutex<State>,
    /// Tells the task that the outbox holds bytes the socket did not take.
    flush: Notify,
}

impl Shared {
    pub(crate) fn new(write: OwnedWriteHalf) -> Self {
        Shared {
            write,
            state: Mutex::new(State {
                closed: false,
                outbox: Outbox::default(),
                inband: VecDeque::new(),
                oob: HashMap::new(),
                held: VecDeque::new(),
                fd_in_flight: false,
            }),
            flush: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `op` and writes what the socket takes now. `Err(Disconnected)` once the connection
    /// has ended. Write errors are left for the task, which owns the connection's end.
    pub(crate) fn submit(&self, op: Op) -> Result<()> {
        let mut state = self.lock();
        if state.closed {
            return Err(Error::Disconnected);
        }
        state.accept(op);
        let pending = match state.outbox.write_some(&self.write) {
            Ok(()) => !state.outbox.buf.is_empty(),
            Err(_) => true,
        };
        drop(state);
        if pending {
            self.flush.notify_one();
        }
        Ok(())
    }
}

struct State {
    /// Set once the connection task has ended; nothing is queued after that.
    closed: bool,
    outbox: Outbox,
    inband: VecDeque<InBand>,
    oob: HashMap<u64, oneshot::Sender<ReplyResult>>,
    /// Requests held back while an fd-carrying request is unanswered (see [`State::accept`]).
    held: VecDeque<Op>,
    fd_in_flight: bool,
}

impl State {
    /// Queues a request for writing, or holds it back.
    ///
    /// Nothing is written while an fd-carrying request (`getfd`, `add-fd`) is unanswered. QEMU
    /// keeps a received fd in its socket chardev until the command's handler takes it, and with
    /// `oob` on, the monitor's I/O thread goes on reading while the main thread runs the command:
    /// seen on QEMU 7.2, more bytes arriving in that window crash QEMU (a NULL dereference in the
    /// chardev's fd bookkeeping) or cost the fd. So the fd's command must be the last thing QEMU
    /// reads until it has answered.
    fn accept(&mut self, op: Op) {
        if self.fd_in_flight {
            self.held.push_back(op);
            return;
        }
        if op.fd.is_some() {
            self.fd_in_flight = true;
        }
        let Op {
            bytes,
            fd,
            oob_id,
            reply,
        } = op;
        match oob_id {
            Some(id) => {
                self.oob.insert(id, reply);
            }
            None => self.inband.push_back(InBand {
                reply,
                carries_fd: fd.is_some(),
            }),
        }
        self.outbox.push(&bytes, fd);
    }

    fn on_reply(&mut self, reply: Reply) {
        match reply.id {
            Some(id) => {
                let waiter = id.as_u64().and_then(|id| self.oob.remove(&id));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(reply.result.map_err(Failure::Qmp));
                    }
                    None => tracing::warn!(%id, "dropping a reply with an unknown id"),
                }
            }
            None => match self.inband.pop_front() {
                Some(waiter) => {
                    // A waiter that timed out or was dropped is gone; its reply is discarded.
                    let _ = waiter.reply.send(reply.result.map_err(Failure::Qmp));
                    if waiter.carries_fd {
                        self.fd_in_flight = false;
                        while !self.fd_in_flight {
                            let Some(next) = self.held.pop_front() else {
                                break;
                            };
                            self.accept(next);
                        }
                    }
                }
                None => tracing::warn!(result = ?reply.result, "dropping a reply nobody waits for"),
            },
        }
    }
}

impl Connection {
    /// Runs the connection until the socket closes or every [`Client`](crate::Client) is dropped.
    ///
    /// Returns `Ok(())` on a clean end (EOF, or no client left) and the I/O error otherwise. Either
    /// way every pending command fails with [`Error::Disconnected`] and event streams end.
    pub async fn run(self) -> Result<()> {
        let Connection {
            mut frames,
            shared,
            mut clients,
            events,
        } = self;
        // True while the outbox holds bytes the socket did not take.
        let mut pending = false;
        let result: Result<()> = loop {
            tokio::select! {
                frame = frames.next() => match frame {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(e.into()),
                    Some(Ok(Err(FrameError::Incomplete { len }))) => {
                        // The socket closed part-way through a line: a disconnect, not garbage.
                        tracing::debug!(len, "connection closed inside a frame");
                        break Ok(());
                    }
                    // A frame that is not QMP (bad JSON or UTF-8, over the size limit, unknown
                    // shape) may have been a reply: after it, replies can no longer be paired
                    // with their commands, so the connection ends and every waiter is told why.
                    Some(Ok(Err(bad))) => break Err(Error::Frame(bad)),
                    Some(Ok(Ok(Message::Reply(reply)))) => {
                        let mut state = shared.lock();
                        state.on_reply(reply);
                        // An answered fd command may have released held requests.
                        if !state.outbox.buf.is_empty() {
                            if let Err(e) = state.outbox.write_some(&shared.write) {
                                break Err(e.into());
                            }
                            pending = !state.outbox.buf.is_empty();
                        }
                    }
                    Some(Ok(Ok(Message::Event(event)))) => {
                        tracing::trace!(event = event.name(), "event");
                        // No subscriber is not an error; a slow one lags, it never blocks us.
                        let _ = events.send(event);
                    }
                    Some(Ok(Ok(Message::Greeting(_)))) => tracing::warn!("ignoring a second greeting"),
                },
                () = shared.flush.notified(), if !pending => pending = true,
                writable = shared.write.as_ref().writable(), if pending => {
                    let mut state = shared.lock();
                    if let Err(e) = writable.and_then(|()| state.outbox.write_some(&shared.write)) {
                        break Err(e.into());
                    }
                    pending = !state.outbox.buf.is_empty();
                }
                _ = clients.recv() => break Ok(()),
            }
        };
        // Fail everything still queued: a waiter learns the error that ended the connection, or
        // (a clean end, or QEMU gone) sees its reply sender dropped, which reads as Disconnected.
        let waiters: Vec<oneshot::Sender<ReplyResult>> = {
            let mut guard = shared.lock();
            let state = &mut *guard;
            state.closed = true;
            state.outbox = Outbox::default();
            state
                .inband
                .drain(..)
                .map(|w| w.reply)
                .chain(state.oob.drain().map(|(_, tx)| tx))
                .chain(state.held.drain(..).map(|op| op.reply))
                .collect()
        };
        // Clients keep the write half alive; shut the socket itself so the peer sees the end now.
        if let Ok(fd) = shared.write.as_ref().as_fd().try_clone_to_owned() {
            let _ = std::os::unix::net::UnixStream::from(fd).shutdown(std::net::Shutdown::Both);
        }
        if let Err(error @ Error::Frame(_)) = &result {
            for tx in waiters {
                let _ = tx.send(Err(Failure::Closed(error.clone())));
            }
        }
        if let Err(e) = &result {
            tracing::debug!(error = %e, "QMP connection ended");
        }
        result
    }
}

/// Turns a waiter's outcome into the caller's result.
pub(crate) fn finish(
    command: &str,
    outcome: std::result::Result<ReplyResult, oneshot::error::RecvError>,
) -> Result<Box<RawValue>> {
    match outcome {
        Ok(Ok(raw)) => Ok(raw),
        Ok(Err(Failure::Qmp(error))) => Err(Error::Qmp {
            command: command.to_owned(),
            error,
        }),
        Ok(Err(Failure::Closed(error))) => Err(error),
        Err(_) => Err(Error::Disconnected),
    }
}

/// `Value` of a raw reply, for `execute_raw`.
pub(crate) fn raw_to_value(command: &str, raw: &RawValue) -> Result<Value> {
    serde_json::from_str(raw.get()).map_err(|e| Error::UnexpectedReply {
        command: command.to_owned(),
        reason: e.to_string(),
    })
}
