//! The socket's shared write side and the task that reads it.
//!
//! A caller writes its own request straight to the socket when nothing is queued ahead of it (no
//! hop through another task on the way out); what the socket does not take at once, or what must
//! wait, stays in a shared outbox that the [`Connection`] task flushes. Queue order is write order,
//! since both change under one lock.
//!
//! The task reads every frame. In-band replies are matched first-in first-out (QEMU answers
//! in-band commands in order, exactly one reply each), `exec-oob` replies by their `id`, and events
//! go to a broadcast channel. What keeps replies with their callers:
//!
//! - A caller that goes away before its request's first byte is written takes the request back
//!   (bytes, fd and queue slot): QEMU never sees it. Once a byte is out, the request stays whole and
//!   its slot stays, so its reply is read and discarded and the stream stays in step.
//! - A reply that cannot be paired for certain ends the connection with [`Error::Frame`] for every
//!   waiter: an `id` the client never issued, an id-less reply when every command carries an id
//!   ([`Config::inband_ids`](crate::Config::inband_ids)), a reply with nothing in flight, or a reply
//!   to a request not yet completely written (an fd-carrying one included: its fd is closed, and
//!   the caller never sees `Ok`). A late reply to an `exec-oob` whose caller has gone is discarded.
//! - Unsent requests are capped ([`Config::max_outbox`](crate::Config::max_outbox)): past the cap a
//!   caller gets [`Error::Backlog`], so a QEMU that stops reading its monitor cannot grow us.
//! - If the task ends in any way, a panic included, every waiter fails at once and the client
//!   reads as closed.
//!
//! [`Client`]: crate::Client

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::io::Interest;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio_util::codec::FramedRead;

use crate::codec::QmpCodec;
use crate::error::{Error, FrameError, QmpError, Result};
use crate::event::{Event, MAX_EVENT_BYTES};
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
    /// The `id` the request carries, if any (always for `exec-oob`).
    pub id: Option<u64>,
    /// True for `exec-oob`: answered by id, not in order.
    pub oob: bool,
    /// Where the reply goes. Dropped unanswered when the connection ends.
    pub reply: oneshot::Sender<ReplyResult>,
}

/// A request's place in write order, given when it is submitted.
pub(crate) type Seq = u64;

struct InBand {
    seq: Seq,
    id: Option<u64>,
    reply: oneshot::Sender<ReplyResult>,
    carries_fd: bool,
}

struct OobWaiter {
    seq: Seq,
    reply: oneshot::Sender<ReplyResult>,
}

/// One request not yet completely written.
struct Unsent {
    seq: Seq,
    bytes: Vec<u8>,
    /// Rides on the first byte; dropped (our copy closed) once that byte is out.
    fd: Option<OwnedFd>,
}

/// Requests waiting to be written, in write order. Only the front one can be partly written.
#[derive(Default)]
struct Outbox {
    queue: VecDeque<Unsent>,
    /// How many bytes of the front request are out.
    written: usize,
}

/// How many requests one `sendmsg` gathers at most.
const MAX_GATHER: usize = 64;

impl Outbox {
    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The first request not completely written: every request before it is out.
    fn first_unsent(&self) -> Seq {
        self.queue.front().map_or(Seq::MAX, |u| u.seq)
    }

    /// Writes as much as the socket takes without blocking. Requests that complete leave the
    /// queue; returns how many bytes of theirs left it, for the cap's count.
    fn write_some(&mut self, sock: &OwnedWriteHalf) -> io::Result<usize> {
        let mut freed = 0;
        while let Some(front) = self.queue.front() {
            let sent = if self.written == 0 && front.fd.is_some() {
                // An fd rides alone with its request's first byte.
                let slice = [IoSlice::new(&front.bytes)];
                send(sock, &slice, front.fd.as_ref().map(AsFd::as_fd))
            } else {
                // On the stack: every request the SDK sends is written through here.
                let mut slices = [IoSlice::new(&[]); MAX_GATHER];
                slices[0] = IoSlice::new(&front.bytes[self.written..]);
                let mut count = 1;
                for (slot, unsent) in slices[1..]
                    .iter_mut()
                    .zip(self.queue.iter().skip(1).take_while(|u| u.fd.is_none()))
                {
                    *slot = IoSlice::new(&unsent.bytes);
                    count += 1;
                }
                send(sock, &slices[..count], None)
            };
            let mut n = match sent {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(freed),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            while n > 0 {
                let front = self
                    .queue
                    .front_mut()
                    .expect("the kernel took no more than we gave");
                // Sent along with the first byte: our copy closes here, QEMU has its own.
                front.fd = None;
                let left = front.bytes.len() - self.written;
                if n < left {
                    self.written += n;
                    break;
                }
                n -= left;
                self.written = 0;
                freed += front.bytes.len();
                self.queue.pop_front();
            }
        }
        Ok(freed)
    }
}

fn send(
    sock: &OwnedWriteHalf,
    bufs: &[IoSlice<'_>],
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> io::Result<usize> {
    // try_io clears tokio's write readiness on WouldBlock, so `writable()` waits for real.
    sock.as_ref().try_io(Interest::WRITABLE, || {
        crate::sys::send(sock.as_ref().as_fd(), bufs, fd)
    })
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
    /// The next request id: every id below it was issued.
    next_id: AtomicU64,
}

/// The rules a connection keeps, from its [`Config`](crate::Config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    /// Every in-band request carries an id, so an id-less reply is a stray.
    pub inband_ids: bool,
    /// The most bytes of unsent requests (queued or held) before callers get `Backlog`.
    pub max_outbox: usize,
}

impl Shared {
    pub(crate) fn new(write: OwnedWriteHalf, rules: Rules) -> Self {
        Shared {
            write,
            state: Mutex::new(State {
                closed: false,
                rules,
                next_seq: 0,
                unsent_bytes: 0,
                outbox: Outbox::default(),
                inband: VecDeque::new(),
                oob: HashMap::new(),
                held: VecDeque::new(),
                fd_in_flight: false,
            }),
            flush: Notify::new(),
            next_id: AtomicU64::new(1),
        }
    }

    /// A fresh request id.
    pub(crate) fn issue_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `op` and writes what the socket takes now. `Err(Disconnected)` once the connection
    /// has ended, `Err(Backlog)` when the unsent requests are at the cap. Write errors are left for
    /// the task, which owns the connection's end.
    pub(crate) fn submit(&self, op: Op) -> Result<Seq> {
        let mut state = self.lock();
        if state.closed {
            return Err(Error::Disconnected);
        }
        let limit = state.rules.max_outbox;
        // One request always fits an empty outbox, however large.
        if state.unsent_bytes > 0 && state.unsent_bytes + op.bytes.len() > limit {
            return Err(Error::Backlog { limit });
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.unsent_bytes += op.bytes.len();
        state.accept(seq, op);
        let pending = match state.outbox.write_some(&self.write) {
            Ok(freed) => {
                state.unsent_bytes -= freed;
                !state.outbox.is_empty()
            }
            Err(_) => true,
        };
        drop(state);
        if pending {
            self.flush.notify_one();
        }
        Ok(seq)
    }

    /// The caller of request `seq` has gone (dropped, or timed out). A request none of whose bytes
    /// are out is taken back whole, fd included (our copy closes); its `exec-oob` entry goes too.
    /// A request partly or wholly written stays, and its in-band slot with it.
    pub(crate) fn abandon(&self, seq: Seq, oob_id: Option<u64>) {
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(id) = oob_id {
            if state.oob.get(&id).is_some_and(|w| w.seq == seq) {
                state.oob.remove(&id);
            }
        }
        if let Ok(at) = state.held.binary_search_by_key(&seq, |(s, _)| *s) {
            let (_, op) = state.held.remove(at).expect("found");
            state.unsent_bytes -= op.bytes.len();
            return;
        }
        let Ok(at) = state.outbox.queue.binary_search_by_key(&seq, |u| u.seq) else {
            return;
        };
        if at == 0 && state.outbox.written > 0 {
            return;
        }
        let unsent = state.outbox.queue.remove(at).expect("found");
        state.unsent_bytes -= unsent.bytes.len();
        if oob_id.is_none() {
            if let Ok(at) = state.inband.binary_search_by_key(&seq, |w| w.seq) {
                state.inband.remove(at);
            }
        }
        if unsent.fd.is_some() {
            // QEMU never got it: nothing is in flight any more.
            state.fd_in_flight = false;
            state.release_held();
        }
    }
}

struct State {
    /// Set once the connection task has ended; nothing is queued after that.
    closed: bool,
    rules: Rules,
    next_seq: Seq,
    /// Bytes of requests in the outbox or held, for the cap.
    unsent_bytes: usize,
    outbox: Outbox,
    /// Callers of in-band requests, in write order.
    inband: VecDeque<InBand>,
    oob: HashMap<u64, OobWaiter>,
    /// Requests held back while an fd-carrying request is unanswered (see [`State::accept`]).
    held: VecDeque<(Seq, Op)>,
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
    fn accept(&mut self, seq: Seq, op: Op) {
        if self.fd_in_flight {
            self.held.push_back((seq, op));
            return;
        }
        let Op {
            bytes,
            fd,
            id,
            oob,
            reply,
        } = op;
        let carries_fd = fd.is_some();
        self.fd_in_flight = carries_fd;
        match id.filter(|_| oob) {
            Some(id) => {
                self.oob.insert(id, OobWaiter { seq, reply });
            }
            None => self.inband.push_back(InBand {
                seq,
                id,
                reply,
                carries_fd,
            }),
        }
        self.outbox.queue.push_back(Unsent { seq, bytes, fd });
    }

    /// Lets held requests go, in order, until the next fd-carrying one.
    fn release_held(&mut self) {
        while !self.fd_in_flight {
            let Some((seq, next)) = self.held.pop_front() else {
                break;
            };
            self.accept(seq, next);
        }
    }

    /// Gives a reply to its caller, or says why it cannot belong to anybody.
    fn on_reply(&mut self, reply: Reply, issued_below: u64) -> std::result::Result<(), FrameError> {
        let first_unsent = self.outbox.first_unsent();
        let early = || unpaired("a reply came before its command was completely sent");
        let id = reply.numeric_id();
        let result = reply.result.map_err(Failure::Qmp);
        let Some(raw_id) = reply.id else {
            if self.rules.inband_ids {
                return Err(unpaired(
                    "an id-less reply, though every command carries an id",
                ));
            }
            return self.answer_inband(result, first_unsent);
        };
        if self.rules.inband_ids && id.is_some() && self.inband.front().is_some_and(|w| w.id == id)
        {
            return self.answer_inband(result, first_unsent);
        }
        match id {
            Some(id) if self.oob.contains_key(&id) => {
                let waiter = self.oob.remove(&id).expect("present");
                if waiter.seq >= first_unsent {
                    return Err(early());
                }
                let _ = waiter.reply.send(result);
                Ok(())
            }
            // Issued, and its caller gone (an oob call dropped or timed out): nobody to tell.
            Some(id) if id > 0 && id < issued_below => {
                tracing::debug!(id, "discarding a reply whose caller has gone");
                Ok(())
            }
            _ => Err(unpaired(format!(
                "a reply with id {}, which no command carried",
                crate::error::clip(raw_id.get())
            ))),
        }
    }

    fn answer_inband(
        &mut self,
        result: ReplyResult,
        first_unsent: Seq,
    ) -> std::result::Result<(), FrameError> {
        let Some(waiter) = self.inband.front() else {
            return Err(unpaired("a reply with no command in flight"));
        };
        if waiter.seq >= first_unsent {
            return Err(unpaired(
                "a reply came before its command was completely sent",
            ));
        }
        let waiter = self.inband.pop_front().expect("present");
        // A waiter that timed out or was dropped is gone; its reply is discarded.
        let _ = waiter.reply.send(result);
        if waiter.carries_fd {
            self.fd_in_flight = false;
            self.release_held();
        }
        Ok(())
    }
}

fn unpaired(reason: impl Into<String>) -> FrameError {
    FrameError::Unpaired {
        reason: reason.into(),
    }
}

/// Ends a connection however its task ends, a panic included: the client reads as closed, every
/// waiter fails at once (with the error that ended the connection when there is one), unsent fds
/// are closed, and the socket is shut so the peer sees the end now.
struct Closer {
    shared: Arc<Shared>,
    error: Option<Error>,
}

impl Drop for Closer {
    fn drop(&mut self) {
        let waiters: Vec<oneshot::Sender<ReplyResult>> = {
            let mut guard = self.shared.lock();
            let state = &mut *guard;
            state.closed = true;
            state.outbox = Outbox::default();
            state.unsent_bytes = 0;
            state
                .inband
                .drain(..)
                .map(|w| w.reply)
                .chain(state.oob.drain().map(|(_, w)| w.reply))
                .chain(state.held.drain(..).map(|(_, op)| op.reply))
                .collect()
        };
        // Clients keep the write half alive; shut the socket itself.
        if let Ok(fd) = self.shared.write.as_ref().as_fd().try_clone_to_owned() {
            let _ = std::os::unix::net::UnixStream::from(fd).shutdown(std::net::Shutdown::Both);
        }
        // A dropped sender reads as Disconnected; a bad frame is worth saying.
        if let Some(error @ Error::Frame(_)) = &self.error {
            for tx in waiters {
                let _ = tx.send(Err(Failure::Closed(error.clone())));
            }
        }
    }
}

impl Connection {
    /// Runs the connection until the socket closes, every [`Client`](crate::Client) is dropped, or
    /// the peer breaks the protocol.
    ///
    /// Returns `Ok(())` on a clean end (EOF, or no client left). A frame that is not QMP, or a reply
    /// that cannot be paired with its command (see the module docs), ends it with
    /// [`Error::Frame`], which every pending command also gets; a socket error ends it with
    /// [`Error::Io`], and pending commands get [`Error::Disconnected`], as they do on a clean end.
    /// Event streams end either way.
    pub async fn run(self) -> Result<()> {
        let Connection {
            mut frames,
            shared,
            mut clients,
            events,
        } = self;
        let mut closer = Closer {
            shared: shared.clone(),
            error: None,
        };
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
                    // A frame that is not QMP (bad JSON or UTF-8, over the size limit, not an
                    // object, members of two kinds) may have been a reply: after it, replies can
                    // no longer be paired with their commands, so the connection ends and every
                    // waiter is told why.
                    Some(Ok(Err(bad))) => break Err(Error::Frame(bad)),
                    Some(Ok(Ok(Message::Reply(reply)))) => {
                        let issued_below = shared.next_id.load(Ordering::Relaxed);
                        let mut state = shared.lock();
                        if let Err(bad) = state.on_reply(reply, issued_below) {
                            break Err(Error::Frame(bad));
                        }
                        // An answered fd command may have released held requests.
                        if !state.outbox.is_empty() {
                            match state.outbox.write_some(&shared.write) {
                                Ok(freed) => state.unsent_bytes -= freed,
                                Err(e) => break Err(e.into()),
                            }
                            pending = !state.outbox.is_empty();
                        }
                    }
                    Some(Ok(Ok(Message::Event(event)))) if event.wire_len() > MAX_EVENT_BYTES => {
                        tracing::warn!(
                            event = crate::error::clip(event.name()),
                            bytes = event.wire_len(),
                            "dropped an event larger than MAX_EVENT_BYTES"
                        );
                    }
                    Some(Ok(Ok(Message::Event(event)))) => {
                        tracing::trace!(event = event.name(), "event");
                        #[cfg(test)]
                        if event.name() == tests::PANIC_EVENT {
                            panic!("forced by a test");
                        }
                        // No subscriber is not an error; a slow one lags, it never blocks us.
                        let _ = events.send(event);
                    }
                    Some(Ok(Ok(Message::Greeting(_)))) => tracing::warn!("ignoring a second greeting"),
                },
                () = shared.flush.notified(), if !pending => pending = true,
                writable = shared.write.as_ref().writable(), if pending => {
                    let mut state = shared.lock();
                    match writable.and_then(|()| state.outbox.write_some(&shared.write)) {
                        Ok(freed) => state.unsent_bytes -= freed,
                        Err(e) => break Err(e.into()),
                    }
                    pending = !state.outbox.is_empty();
                }
                _ = clients.recv() => break Ok(()),
            }
        };
        if let Err(e) = &result {
            tracing::debug!(error = %crate::Chain(e), "QMP connection ended");
        }
        closer.error = result.as_ref().err().cloned();
        drop(closer);
        drop(events);
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
        source: std::sync::Arc::new(e),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    /// An event name that makes the connection task panic, in this crate's own tests only.
    pub(super) const PANIC_EVENT: &str = "QHOTPLUG_TEST_PANIC";

    #[tokio::test]
    async fn a_panicking_connection_task_fails_every_waiter_and_reads_as_closed() {
        let (mut server, stream) = UnixStream::pair().unwrap();
        let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;
        let serve = async {
            server.write_all(greeting).await.unwrap();
            server.write_all(b"\r\n").await.unwrap();
            let mut buf = [0u8; 256];
            let n = server.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"{\"execute\":\"qmp_capabilities\""));
            server.write_all(b"{\"return\": {}}\r\n").await.unwrap();
            server
        };
        let config = crate::Config::new();
        let (client, mut server) = tokio::join!(config.connect_stream(stream), serve);
        let client = client.unwrap();
        let call = {
            let c = client.clone();
            tokio::spawn(async move { c.execute(&crate::command::QueryStatus).await })
        };
        let mut buf = [0u8; 256];
        let _ = server.read(&mut buf).await.unwrap();
        let event = format!("{{\"event\": \"{PANIC_EVENT}\", \"timestamp\": {{\"seconds\": 1, \"microseconds\": 1}}}}\r\n");
        server.write_all(event.as_bytes()).await.unwrap();
        // The waiter fails at once, long before its 30 s timeout.
        let result = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("the waiter was failed")
            .unwrap();
        assert!(
            matches!(result, Err(crate::Error::Disconnected)),
            "{result:?}"
        );
        assert!(client.is_closed());
        assert!(matches!(
            client.execute(&crate::command::QueryStatus).await,
            Err(crate::Error::Disconnected)
        ));
    }
}
