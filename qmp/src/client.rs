//! The cheap-to-clone handle that callers use, and the configuration that makes one.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::Value;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::ReusableBoxFuture;
use tracing::Instrument;

use crate::codec::{QmpCodec, DEFAULT_MAX_FRAME};
use crate::command::{AddFd, AddFdInfo, Command, Getfd, QmpCapabilities};
use crate::connection::{finish, raw_to_value, Connection, Op, Rules, Seq, Shared};
use crate::error::{Error, FrameError, Result};
use crate::event::Event;
use crate::message::{encode_request, Execution, Greeting, Message};
use crate::schema::Schema;

/// The name of the span each QMP command runs in (fields `command`, `id`): a contract tools
/// and tests match on.
pub const QMP_SPAN: &str = "qmp";

/// How to connect: capabilities, timeouts, buffer sizes. `Config::default()` suits most callers.
#[derive(Debug, Clone)]
pub struct Config {
    oob: bool,
    default_timeout: Option<Duration>,
    connect_timeout: Duration,
    event_capacity: usize,
    max_frame: usize,
    inband_ids: bool,
    max_outbox: usize,
}

/// The default cap on a connection's unsent requests: 1 MiB.
pub const DEFAULT_MAX_OUTBOX: usize = 1 << 20;

impl Default for Config {
    fn default() -> Self {
        Self {
            oob: true,
            default_timeout: Some(Duration::from_secs(30)),
            connect_timeout: Duration::from_secs(10),
            event_capacity: 256,
            max_frame: DEFAULT_MAX_FRAME,
            inband_ids: false,
            max_outbox: DEFAULT_MAX_OUTBOX,
        }
    }
}

impl Config {
    /// The defaults: `oob` when offered, 30 s per command, 10 s to connect, 256 buffered events per
    /// subscriber, 16 MiB frames, no in-band ids, 1 MiB of unsent requests.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether to enable out-of-band execution when the server offers it (default: yes). With `oob`
    /// QEMU reads ahead in its I/O thread, which makes pipelined commands faster.
    pub fn oob(mut self, enable: bool) -> Self {
        self.oob = enable;
        self
    }

    /// The timeout of a command when the caller gives none (`None`: wait for ever).
    pub fn default_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.default_timeout = timeout;
        self
    }

    /// The deadline for connecting and the handshake. While it runs, a socket path that does not
    /// exist yet or refuses connections is tried again.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many events a subscriber may fall behind before it lags (and is told so).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// The largest frame accepted from the server.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Whether every in-band command carries an `id` (default: no). QEMU echoes it, so a stray
    /// reply (one QEMU did not send for our command, from a buggy QEMU or a proxy) ends the
    /// connection with [`Error::Frame`] instead of being taken for the oldest command's answer.
    /// Off by default because QEMU reads its monitor a byte at a time: each id costs about 3 µs a
    /// command (see BENCHMARKS.md).
    pub fn inband_ids(mut self, enable: bool) -> Self {
        self.inband_ids = enable;
        self
    }

    /// The most bytes of requests that may wait unsent (QEMU not reading its monitor, or requests
    /// held behind an fd-carrying one) before a new command fails with [`Error::Backlog`] instead
    /// of queueing (default 1 MiB). A request whose caller has gone is taken back if none of its
    /// bytes were written, so callers that time out free their room.
    pub fn max_outbox(mut self, bytes: usize) -> Self {
        self.max_outbox = bytes;
        self
    }

    /// Connects to a QMP socket, negotiates capabilities and spawns the connection task on the
    /// current tokio runtime.
    pub async fn connect(&self, path: impl AsRef<Path>) -> Result<Client> {
        let path = path.as_ref();
        let deadline = Instant::now() + self.connect_timeout;
        let mut pause = Duration::from_millis(5);
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() + pause < deadline =>
                {
                    // The socket is not there yet (QEMU is starting): poll the path, backing off.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.connect_stream_until(stream, deadline).await
    }

    /// Takes an already connected stream (for example one end of a socketpair whose other end QEMU
    /// got as `-chardev socket,fd=N`), negotiates and spawns the connection task.
    pub async fn connect_stream(&self, stream: UnixStream) -> Result<Client> {
        self.connect_stream_until(stream, Instant::now() + self.connect_timeout)
            .await
    }

    async fn connect_stream_until(&self, stream: UnixStream, deadline: Instant) -> Result<Client> {
        let (client, connection) = tokio::time::timeout_at(deadline, self.handshake(stream))
            .await
            .map_err(|_| Error::Timeout {
                command: "handshake".into(),
                after: self.connect_timeout,
            })??;
        tokio::spawn(connection.run());
        Ok(client)
    }

    /// Reads the greeting (skipping any events before it), negotiates capabilities, and returns the
    /// client with the connection future, which the caller must run (tokio-postgres style).
    pub async fn handshake(&self, stream: UnixStream) -> Result<(Client, Connection)> {
        // The kernel names the process that listened: for a socket this process bound and
        // handed QEMU (a launch's monitor), that is this process, not QEMU.
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|&pid| pid != std::process::id());
        let (read, write) = stream.into_split();
        let mut frames = FramedRead::new(read, QmpCodec::new(self.max_frame));
        let greeting = loop {
            match next_message(&mut frames, "greeting").await? {
                Message::Greeting(g) => break g,
                Message::Event(_) => continue,
                Message::Reply(_) => {
                    return Err(Error::Protocol("a reply came before the greeting".into()))
                }
            }
        };
        let oob = self.oob && greeting.offers_oob();
        let caps = QmpCapabilities {
            enable: if oob { vec!["oob".into()] } else { vec![] },
        };
        let mut bytes = Vec::new();
        encode_request(&mut bytes, QmpCapabilities::NAME, &caps, Execution::InBand).map_err(
            |e| Error::Serialize {
                command: QmpCapabilities::NAME.into(),
                source: std::sync::Arc::new(e),
            },
        )?;
        send_all(&write, &bytes).await?;
        loop {
            match next_message(&mut frames, "qmp_capabilities").await? {
                Message::Reply(reply) => {
                    finish(
                        QmpCapabilities::NAME,
                        Ok(reply.result.map_err(crate::connection::Failure::Qmp)),
                    )?;
                    break;
                }
                Message::Event(_) => continue,
                Message::Greeting(_) => {
                    return Err(Error::Protocol(
                        "a second greeting during negotiation".into(),
                    ))
                }
            }
        }
        tracing::debug!(version = %greeting.version.qemu, oob, "QMP connected");
        let (alive_tx, alive_rx) = mpsc::unbounded_channel();
        let (events_tx, _) = broadcast::channel(self.event_capacity);
        let rules = Rules {
            inband_ids: self.inband_ids,
            max_outbox: self.max_outbox,
        };
        let shared = Arc::new(Shared::new(write, rules));
        let client = Client {
            inner: Arc::new(Inner {
                shared: shared.clone(),
                alive: alive_tx,
                events: events_tx.downgrade(),
                greeting,
                oob,
                inband_ids: self.inband_ids,
                default_timeout: self.default_timeout,
                schema: std::sync::OnceLock::new(),
                peer_pid,
            }),
        };
        let connection = Connection {
            frames,
            shared,
            clients: alive_rx,
            events: events_tx,
        };
        Ok((client, connection))
    }
}

/// Writes all of `bytes` during the handshake (`MSG_NOSIGNAL`: a peer that hung up is an error,
/// never SIGPIPE).
async fn send_all(write: &tokio::net::unix::OwnedWriteHalf, mut bytes: &[u8]) -> Result<()> {
    use std::os::fd::AsFd;
    while !bytes.is_empty() {
        write.as_ref().writable().await?;
        let slice = [std::io::IoSlice::new(bytes)];
        match write.as_ref().try_io(tokio::io::Interest::WRITABLE, || {
            crate::sys::send(write.as_ref().as_fd(), &slice, None)
        }) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(hangup_or(e)),
        }
    }
    Ok(())
}

/// A peer that hung up is [`Error::Disconnected`], whichever way the socket reports it.
fn hangup_or(e: std::io::Error) -> Error {
    let error = Error::from(e);
    if error.is_disconnected() {
        Error::Disconnected
    } else {
        error
    }
}

async fn next_message(
    frames: &mut FramedRead<tokio::net::unix::OwnedReadHalf, QmpCodec>,
    waiting_for: &str,
) -> Result<Message> {
    match frames.next().await {
        None | Some(Ok(Err(FrameError::Incomplete { .. }))) => Err(Error::Disconnected),
        Some(Err(e)) => Err(hangup_or(e)),
        Some(Ok(Err(bad))) => Err(Error::Protocol(format!(
            "bad frame while waiting for the {waiting_for}: {bad}"
        ))),
        Some(Ok(Ok(message))) => Ok(message),
    }
}

/// Connects to the QMP socket at `path` with the default [`Config`].
pub async fn connect(path: impl AsRef<Path>) -> Result<Client> {
    Config::default().connect(path).await
}

/// A handle to one QMP connection. Clones share the connection; any number of tasks may have
/// commands in flight at once, and each gets its own reply.
///
/// Dropping a command's future (or its timeout passing) does not take the command back: QEMU still
/// runs it, and its reply is read and discarded. The connection lives while a `Client` clone does.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Never sent on: the connection task sees it close when the last client is dropped.
    alive: mpsc::UnboundedSender<()>,
    /// Makes new subscriptions while the connection lives. Weak, and no receiver is kept: the
    /// channel holds an event only until every live subscriber has it, and none when nobody
    /// subscribes; the connection task owns the only strong sender, so streams end with it.
    events: broadcast::WeakSender<Event>,
    greeting: Greeting,
    oob: bool,
    inband_ids: bool,
    default_timeout: Option<Duration>,
    /// The cell its QEMU build's schema is loaded into, shared by every connection to the build.
    schema: std::sync::OnceLock<Arc<crate::schema::Cell>>,
    /// The process at the other end of the socket, as the kernel says (`SO_PEERCRED`).
    peer_pid: Option<u32>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("qemu", &self.inner.greeting.version.qemu)
            .field("oob", &self.inner.oob)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Client {
    /// The server's greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// The process at the other end of the monitor socket (QEMU's pid), as the kernel said when
    /// the connection was made (`SO_PEERCRED`: the process that listened on the socket); `None`
    /// if it could not say, or if the listener was this process's own (a socket it bound and
    /// handed to the QEMU it launched).
    pub fn peer_pid(&self) -> Option<u32> {
        self.inner.peer_pid
    }

    /// True when out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.inner.oob
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.alive.is_closed()
    }

    /// This QEMU's QAPI schema: which commands, arguments and events it has. Read with
    /// `query-qmp-schema` on first use, then kept for this connection and its clones, and shared
    /// with every other connection to the same QEMU build. See [`Schema`].
    pub async fn schema(&self) -> Result<Arc<Schema>> {
        let cell = self
            .inner
            .schema
            .get_or_init(|| crate::schema::cell(&self.inner.greeting));
        let schema = cell
            .get_or_try_init(|| async {
                const NAME: &str = "query-qmp-schema";
                let raw = self
                    .send(
                        NAME,
                        &Value::Null,
                        None,
                        Execution::InBand,
                        self.inner.default_timeout,
                    )
                    .await?;
                let schema = Schema::from_json(raw.get()).map_err(|e| Error::UnexpectedReply {
                    command: NAME.into(),
                    source: Arc::new(e),
                })?;
                Ok::<_, Error>(Arc::new(schema))
            })
            .await?;
        Ok(schema.clone())
    }

    /// Runs a typed command with the client's default timeout.
    pub async fn execute<C: Command>(&self, command: &C) -> Result<C::Returns> {
        self.execute_timeout(command, self.inner.default_timeout)
            .await
    }

    /// Runs a typed command with the given timeout (`None`: none).
    pub async fn execute_timeout<C: Command>(
        &self,
        command: &C,
        timeout: Option<Duration>,
    ) -> Result<C::Returns> {
        let raw = self
            .send(C::NAME, command, None, Execution::InBand, timeout)
            .await?;
        decode(command, &raw)
    }

    /// Runs any command by name. `arguments` must be a JSON object, or `Null` for none.
    pub async fn execute_raw(&self, name: &str, arguments: &Value) -> Result<Value> {
        self.execute_raw_timeout(name, arguments, self.inner.default_timeout)
            .await
    }

    /// Runs any command by name with the given timeout (`None`: none).
    pub async fn execute_raw_timeout(
        &self,
        name: &str,
        arguments: &Value,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let raw = self
            .send(name, arguments, None, Execution::InBand, timeout)
            .await?;
        raw_to_value(name, &raw)
    }

    /// Runs a command out of band (`exec-oob`): QEMU runs it at once in its I/O thread and its
    /// reply may overtake in-band replies. Only commands that allow it (such as `migrate-pause`) do;
    /// fails with [`Error::OobUnavailable`] when `oob` was not negotiated.
    pub async fn execute_oob_raw(&self, name: &str, arguments: &Value) -> Result<Value> {
        if !self.inner.oob {
            return Err(Error::OobUnavailable);
        }
        let id = self.inner.shared.issue_id();
        let raw = self
            .send(
                name,
                arguments,
                None,
                Execution::OutOfBand(id),
                self.inner.default_timeout,
            )
            .await?;
        raw_to_value(name, &raw)
    }

    /// Runs a command with an fd attached (SCM_RIGHTS, in the same `sendmsg` as the command's first
    /// byte). Only `getfd` and `add-fd` consume one. While an fd-carrying command is unanswered,
    /// nothing else is written on the connection (later commands wait for its reply, then go out
    /// in order): QEMU 7.2's monitor, with `oob` on, can crash or lose the fd when more bytes
    /// arrive while its handler is taking the fd.
    ///
    /// The fd is closed on our side once sent (QEMU holds its own copy), or when the command fails
    /// before it is sent.
    pub async fn execute_with_fd<C: Command>(
        &self,
        command: &C,
        fd: OwnedFd,
    ) -> Result<C::Returns> {
        let raw = self
            .send(
                C::NAME,
                command,
                Some(fd),
                Execution::InBand,
                self.inner.default_timeout,
            )
            .await?;
        decode(command, &raw)
    }

    /// `getfd`: passes `fd` to QEMU under `name`, on this connection only (`netdev_add` takes it by
    /// name; `closefd` closes it).
    pub async fn getfd(&self, name: &str, fd: OwnedFd) -> Result<()> {
        let cmd = Getfd {
            fdname: name.to_owned(),
        };
        self.execute_with_fd(&cmd, fd).await.map(drop)
    }

    /// `add-fd`: adds `fd` to an fd set (global to the VM), which QEMU opens as `/dev/fdset/N`.
    pub async fn add_fd(&self, command: &AddFd, fd: OwnedFd) -> Result<AddFdInfo> {
        self.execute_with_fd(command, fd).await
    }

    /// A new subscription to the connection's events, starting with the next event that arrives.
    pub fn events(&self) -> EventStream {
        let rx = match self.inner.events.upgrade() {
            Some(tx) => tx.subscribe(),
            // The connection has ended: a stream that ends at once.
            None => broadcast::channel(1).1,
        };
        EventStream::new(rx)
    }

    /// Runs `command` and waits for the first event for which `filter` is true. The subscription
    /// exists before the command is sent, so an event that beats the reply is not missed. `timeout`
    /// covers both the reply and the event.
    ///
    /// Fails with [`Error::EventsLost`] when the subscription lagged while waiting (the event may
    /// have been among those lost).
    pub async fn execute_and_wait<C, F>(
        &self,
        command: &C,
        mut filter: F,
        timeout: Duration,
    ) -> Result<(C::Returns, Event)>
    where
        C: Command,
        F: FnMut(&Event) -> bool,
    {
        let mut events = self.events();
        let deadline = Instant::now() + timeout;
        let returned = self.execute_timeout(command, Some(timeout)).await?;
        let wait = async {
            while let Some(item) = events.next().await {
                match item {
                    Ok(event) if filter(&event) => return Ok(event),
                    Ok(_) => {}
                    Err(Lagged(n)) => return Err(Error::EventsLost(n)),
                }
            }
            Err(Error::Disconnected)
        };
        let event = tokio::time::timeout_at(deadline, wait)
            .await
            .map_err(|_| Error::Timeout {
                command: format!("{} (waiting for its event)", C::NAME),
                after: timeout,
            })??;
        Ok((returned, event))
    }

    async fn send<A: Serialize + ?Sized>(
        &self,
        name: &str,
        arguments: &A,
        fd: Option<OwnedFd>,
        execution: Execution,
        timeout: Option<Duration>,
    ) -> Result<Box<serde_json::value::RawValue>> {
        let execution = match execution {
            Execution::InBand if self.inner.inband_ids => {
                Execution::InBandWithId(self.inner.shared.issue_id())
            }
            other => other,
        };
        let mut bytes = Vec::with_capacity(64);
        encode_request(&mut bytes, name, arguments, execution).map_err(|e| Error::Serialize {
            command: name.to_owned(),
            source: std::sync::Arc::new(e),
        })?;
        let (reply, rx) = oneshot::channel();
        let (id, oob) = match execution {
            Execution::OutOfBand(id) => (Some(id), true),
            Execution::InBandWithId(id) => (Some(id), false),
            Execution::InBand => (None, false),
        };
        let span = tracing::debug_span!(QMP_SPAN, command = name, id);
        async move {
            let shared = &self.inner.shared;
            let seq = shared.submit(Op {
                bytes,
                fd,
                id,
                oob,
                reply,
            })?;
            // Until the outcome is in, going away (drop or timeout) takes the request back.
            let mut abandon = Abandon {
                shared,
                seq,
                oob_id: id.filter(|_| oob),
                armed: true,
            };
            let outcome = match timeout {
                None => rx.await,
                Some(after) => {
                    tokio::time::timeout(after, rx)
                        .await
                        .map_err(|_| Error::Timeout {
                            command: name.to_owned(),
                            after,
                        })?
                }
            };
            abandon.armed = false;
            let result = finish(name, outcome);
            if let Err(e) = &result {
                tracing::debug!(error = %crate::Chain(e), "command failed");
            }
            result
        }
        .instrument(span)
        .await
    }
}

/// Takes a request back when its caller goes away before the outcome (see [`Shared::abandon`]).
struct Abandon<'a> {
    shared: &'a Shared,
    seq: Seq,
    oob_id: Option<u64>,
    armed: bool,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.abandon(self.seq, self.oob_id);
        }
    }
}

fn decode<C: Command>(command: &C, raw: &serde_json::value::RawValue) -> Result<C::Returns> {
    crate::decode::reply(command, raw.get()).map_err(|e| Error::UnexpectedReply {
        command: C::NAME.to_owned(),
        source: std::sync::Arc::new(e),
    })
}

/// A subscriber fell this many events behind and they were lost to it. The stream goes on with the
/// oldest event still buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("event subscriber lagged: {0} events lost")]
pub struct Lagged(pub u64);

type RecvOutcome = (
    std::result::Result<Event, broadcast::error::RecvError>,
    broadcast::Receiver<Event>,
);

/// The events of one connection, from the moment of subscription. Ends when the connection ends.
///
/// A subscriber that does not keep up never slows the connection or other subscribers: it is told
/// how many events it lost with an `Err(Lagged(n))` item.
pub struct EventStream {
    recv: ReusableBoxFuture<'static, RecvOutcome>,
}

async fn recv_one(mut rx: broadcast::Receiver<Event>) -> RecvOutcome {
    let result = rx.recv().await;
    (result, rx)
}

impl EventStream {
    fn new(rx: broadcast::Receiver<Event>) -> Self {
        Self {
            recv: ReusableBoxFuture::new(recv_one(rx)),
        }
    }

    /// Waits until `deadline` for an event `want` accepts; true if one came. Other events, and
    /// the news that some were lost, are passed over: a caller that must not miss its event asks
    /// QEMU after a `false`.
    ///
    /// ```no_run
    /// # async fn f(client: qhotplug_qmp::Client) {
    /// use qhotplug_qmp::EventKind;
    /// let mut events = client.events();
    /// let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    /// let resumed = events.wait_for(deadline, |e| matches!(e, EventKind::Resume)).await;
    /// # let _ = resumed; }
    /// ```
    pub async fn wait_for(
        &mut self,
        deadline: Instant,
        mut want: impl FnMut(&crate::EventKind) -> bool,
    ) -> bool {
        let seen = async {
            while let Some(item) = self.next().await {
                if item.is_ok_and(|event| want(event.kind())) {
                    return true;
                }
            }
            false
        };
        tokio::time::timeout_at(deadline, seen)
            .await
            .unwrap_or(false)
    }
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventStream")
    }
}

impl Stream for EventStream {
    type Item = std::result::Result<Event, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let (result, rx) = std::task::ready!(self.recv.poll(cx));
        self.recv.set(recv_one(rx));
        Poll::Ready(match result {
            Ok(event) => Some(Ok(event)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(Lagged(n))),
            Err(broadcast::error::RecvError::Closed) => None,
        })
    }
}
