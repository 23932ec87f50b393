//! [`Agent`]: one connection to a guest agent, one command at a time, resynchronised with
//! `guest-sync-delimited` whenever what the agent sends next is in doubt.
//!
//! The agent has no greeting and no request ids of its own, answers strictly in order, and keeps
//! answering requests written while it was not running (or after its client gave up). So:
//! - a call first resynchronises unless the last call ended cleanly: it writes `0xFF` (which makes
//!   the agent drop a half-read request) and `guest-sync-delimited` with a random id, and skips
//!   every line until the `0xFF`-prefixed reply carrying that id;
//! - every request carries an `id` of ours, which the agent echoes: a reply without it (a stale
//!   one, or one to a command never sent) is skipped, never returned;
//! - a call dropped part-way, a timeout, or a reply over the frame limit leaves the connection out
//!   of sync, so the next call resynchronises first;
//! - a line is read for its `id`, `return` and `error` members only, borrowed from the line: no
//!   JSON value is built from what the agent sends, and only our own reply is decoded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use qhotplug_qmp::codec::FrameCodec;
use qhotplug_qmp::message::{encode_request, Execution};
use qhotplug_qmp::{Command, FrameError};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tracing::Instrument;

use crate::error::{Error, Result};

/// The default frame limit: 64 MiB and 64 KiB. The largest reply qemu-ga sends is
/// `guest-file-read`'s largest count (48 MiB: 64 MiB of base64, and the JSON around it);
/// `guest-exec`'s captured output (up to 16 MiB each of stdout and stderr, base64: about 43 MB)
/// comes back as one line too. QMP's 16 MiB default is too small for either.
///
/// What a line costs: the read buffer grows to at most twice the longest line, and a line that is
/// not our reply is read for its `id` without building anything, so the agent's lines never make
/// the process hold more than 4× the frame limit on their account; our own reply adds what its
/// typed value holds (a file read: its bytes, ¾ of the base64).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024 + 64 * 1024;

/// The byte the agent puts before its reply to `guest-sync-delimited` (and that a client puts
/// before the request, so the agent drops whatever half request it holds). Never valid in JSON.
pub const SENTINEL: u8 = 0xFF;

/// The name of the span each agent command runs in (fields `command`, `id`).
pub const QGA_SPAN: &str = "qga";

/// How an [`Agent`] waits and how much it reads.
#[derive(Debug, Clone)]
pub struct Config {
    timeout: Duration,
    sync_timeout: Duration,
    max_frame: usize,
    pub(crate) thaw_deadline: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

impl Config {
    /// 10 s per command, 5 s to resynchronise, a frame limit of [`DEFAULT_MAX_FRAME`], and a
    /// minute for a freeze guard to get its thaw through.
    pub fn new() -> Config {
        Config {
            timeout: Duration::from_secs(10),
            sync_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME,
            thaw_deadline: Duration::from_secs(60),
        }
    }

    /// How long a command waits for its reply.
    pub fn timeout(mut self, timeout: Duration) -> Config {
        self.timeout = timeout;
        self
    }

    /// How long a resynchronisation waits for its reply (skipping stale lines meanwhile).
    pub fn sync_timeout(mut self, timeout: Duration) -> Config {
        self.sync_timeout = timeout;
        self
    }

    /// The longest line read from the agent; a longer one is discarded as it arrives.
    pub fn max_frame(mut self, bytes: usize) -> Config {
        self.max_frame = bytes;
        self
    }

    /// How long a freeze guard keeps retrying a thaw the agent refuses or does not answer
    /// (resynchronising, or connecting again, before each try) before it gives up and leaves
    /// the state [`FreezeState::Unknown`](crate::FreezeState::Unknown).
    pub fn thaw_deadline(mut self, deadline: Duration) -> Config {
        self.thaw_deadline = deadline;
        self
    }
}

/// A client of one guest agent, through the host side of its virtio-serial port (QEMU's socket
/// chardev). Cheap to share behind an `Arc`: calls from many tasks run one at a time, in turn.
///
/// ```no_run
/// # async fn demo() -> qhotplug_qga::Result<()> {
/// use qhotplug_qga::{command::GuestPing, Agent, Config};
///
/// let agent = Agent::connect("/run/vm1/qga.sock", Config::new()).await?;
/// agent.execute(&GuestPing).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Agent {
    path: PathBuf,
    pub(crate) config: Config,
    conn: tokio::sync::Mutex<Conn>,
    /// Set by [`Agent::resync_before_next`]: the next call resynchronises whatever the last left.
    stale: std::sync::atomic::AtomicBool,
    /// What is known of the guest's filesystems' freeze, and which guard holds it.
    pub(crate) freeze: std::sync::Mutex<crate::freeze::FreezeBook>,
    /// Told whenever a freeze stops being anybody's to thaw.
    pub(crate) freeze_changed: tokio::sync::Notify,
}

#[derive(Debug)]
struct Conn {
    io: Option<Io>,
    /// The last call ended with its own reply read: the next line is the next command's.
    in_sync: bool,
    /// The id the next request carries: counted up from a random start, so an agent cannot
    /// answer a request before it exists by guessing its id.
    next_id: u64,
}

#[derive(Debug)]
struct Io {
    read: FramedRead<OwnedReadHalf, FrameCodec>,
    write: OwnedWriteHalf,
}

/// What a line from the agent is, to a call waiting for reply `id`.
enum Line<'a> {
    /// Our reply: `return` (borrowed from the line) or `error` (class, desc).
    Reply(std::result::Result<&'a RawValue, (String, String)>),
    /// Anything else: a stale reply, garbage, a parse error about an earlier request.
    Other,
}

/// The members of a line that a call reads; everything else is skipped unread (at any depth).
#[derive(Deserialize)]
struct Members<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "return")]
    ret: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

/// An `error` member's words; anything else in it is skipped.
#[derive(Deserialize, Default)]
struct Refusal {
    #[serde(default)]
    class: String,
    #[serde(default)]
    desc: String,
}

impl Refusal {
    fn read(raw: &RawValue) -> Refusal {
        serde_json::from_str(raw.get()).unwrap_or_default()
    }
}

impl Agent {
    /// An agent at `path`, connected on first use.
    pub fn new(path: impl Into<PathBuf>, config: Config) -> Agent {
        Agent {
            path: path.into(),
            config,
            conn: tokio::sync::Mutex::new(Conn {
                io: None,
                in_sync: false,
                // Exact in a double, as any JSON reader may hold it.
                next_id: fastrand::u64(1..1 << 52),
            }),
            stale: std::sync::atomic::AtomicBool::new(false),
            freeze: std::sync::Mutex::default(),
            freeze_changed: tokio::sync::Notify::new(),
        }
    }

    /// An agent at `path`, connected and resynchronised now: a running agent has answered.
    pub async fn connect(path: impl Into<PathBuf>, config: Config) -> Result<Agent> {
        let agent = Agent::new(path, config);
        agent.sync().await?;
        Ok(agent)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resynchronises now (`guest-sync-delimited`), whatever the last call left.
    pub async fn sync(&self) -> Result<()> {
        let mut conn = self.conn.lock().await;
        conn.in_sync = false;
        self.ensure_sync(&mut conn).await
    }

    /// Makes the next call resynchronise before it sends anything, without waiting for the
    /// calls running now: for a caller that learnt the agent restarted (its port reopened), so
    /// whatever the new agent holds from before is skipped.
    pub fn resync_before_next(&self) {
        self.stale.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Runs `command` and returns its reply, within the configured timeout.
    pub async fn execute<C: Command>(&self, command: &C) -> Result<C::Returns> {
        self.execute_timeout(command, self.config.timeout).await
    }

    /// Runs `command` and returns its reply, within `timeout` (after any resynchronisation).
    pub async fn execute_timeout<C: Command>(
        &self,
        command: &C,
        timeout: Duration,
    ) -> Result<C::Returns> {
        let mut conn = self.conn.lock().await;
        self.ensure_sync(&mut conn).await?;
        let id = conn.next_id;
        conn.next_id += 1;
        let span = tracing::debug_span!(QGA_SPAN, command = C::NAME, id);
        async {
            let mut request = Vec::with_capacity(64);
            encode_request(&mut request, C::NAME, command, Execution::InBandWithId(id))
                .map_err(|e| Error::Io(std::io::Error::other(e)))?;
            // Out of sync until our own reply is read: a call dropped or failed part-way makes
            // the next one resynchronise.
            conn.in_sync = false;
            let deadline = Instant::now() + timeout;
            self.write(&mut conn, &request, deadline, C::NAME, timeout)
                .await?;
            loop {
                let frame = self
                    .next_frame(&mut conn, deadline, C::NAME, timeout)
                    .await
                    .map_err(|e| e.after_send(C::NAME))?;
                match classify(&frame, id) {
                    Line::Reply(reply) => {
                        conn.in_sync = true;
                        let raw = reply.map_err(|(class, desc)| {
                            refusal(C::NAME, class, redact(desc, &command.redacted()))
                        })?;
                        return decode(command, raw);
                    }
                    Line::Other => tracing::debug!("skipped a line that is not this reply"),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Sends a command that does not reply when it succeeds (`guest-shutdown`,
    /// `guest-suspend-*`): its success is seen elsewhere (QEMU's `SHUTDOWN`, `RESET`, `SUSPEND`).
    /// The connection is left out of sync, so an error it answers with is skipped by the next
    /// call's resynchronisation.
    pub async fn send_no_reply<C: Command>(&self, command: &C) -> Result<()> {
        let mut conn = self.conn.lock().await;
        self.ensure_sync(&mut conn).await?;
        let mut request = Vec::with_capacity(64);
        encode_request(&mut request, C::NAME, command, Execution::InBand)
            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        conn.in_sync = false;
        let timeout = self.config.timeout;
        self.write(
            &mut conn,
            &request,
            Instant::now() + timeout,
            C::NAME,
            timeout,
        )
        .await
    }

    /// Connects if needed, and resynchronises unless the last call ended cleanly.
    async fn ensure_sync(&self, conn: &mut Conn) -> Result<()> {
        if conn.io.is_none() {
            let stream =
                UnixStream::connect(&self.path)
                    .await
                    .map_err(|source| Error::NotConnected {
                        path: self.path.clone(),
                        source,
                    })?;
            let (read, write) = stream.into_split();
            conn.io = Some(Io {
                read: FramedRead::new(read, FrameCodec::new(self.config.max_frame)),
                write,
            });
            conn.in_sync = false;
        }
        if self.stale.swap(false, std::sync::atomic::Ordering::SeqCst) {
            conn.in_sync = false;
        }
        if conn.in_sync {
            return Ok(());
        }
        // Positive, and well inside the agent's int64.
        let id = fastrand::i64(1..i64::MAX / 2);
        let span = tracing::debug_span!(QGA_SPAN, command = SYNC, id);
        async {
            let mut request = vec![SENTINEL];
            let args = serde_json::json!({ "id": id });
            // The request's own id too, so that the agent's refusal of it can be told from a
            // stale line.
            encode_request(
                &mut request,
                SYNC,
                &args,
                Execution::InBandWithId(id.unsigned_abs()),
            )
            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
            let after = self.config.sync_timeout;
            let deadline = Instant::now() + after;
            self.write(conn, &request, deadline, SYNC, after).await?;
            let mut skipped = 0u64;
            loop {
                let frame = match self.next_frame(conn, deadline, SYNC, after).await {
                    // A stale line past the limit is only more to skip.
                    Err(Error::FrameTooLong { .. }) => {
                        skipped += 1;
                        continue;
                    }
                    other => other?,
                };
                match sync_line(&frame, id) {
                    SyncLine::InSync => {
                        tracing::debug!(skipped, "in sync");
                        conn.in_sync = true;
                        return Ok(());
                    }
                    SyncLine::Refused(refused) => return Err(refused),
                    SyncLine::Other => skipped += 1,
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Writes a whole request by `deadline` (an agent that stops reading fills the socket, and
    /// a write must not wait for ever). A write that fails or times out did not deliver the whole
    /// request, so the agent cannot have run it: the next resynchronisation's `0xFF` makes it drop
    /// the part it has.
    async fn write(
        &self,
        conn: &mut Conn,
        bytes: &[u8],
        deadline: Instant,
        command: &str,
        after: Duration,
    ) -> Result<()> {
        let io = conn.io.as_mut().ok_or(Error::Disconnected)?;
        let written = tokio::time::timeout_at(deadline, io.write.write_all(bytes))
            .await
            .map_err(|_| Error::Timeout {
                command: command.to_owned(),
                after,
            })?;
        if let Err(e) = written {
            conn.io = None;
            return Err(match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    Error::Disconnected
                }
                _ => Error::Io(e),
            });
        }
        Ok(())
    }

    /// The next line, by `deadline` (else the timeout of `command`, which waited `after`). The
    /// socket closing drops the connection (the next call connects again).
    async fn next_frame(
        &self,
        conn: &mut Conn,
        deadline: Instant,
        command: &str,
        after: Duration,
    ) -> Result<BytesMut> {
        let io = conn.io.as_mut().ok_or(Error::Disconnected)?;
        let item = tokio::time::timeout_at(deadline, io.read.next())
            .await
            .map_err(|_| Error::Timeout {
                command: command.to_owned(),
                after,
            })?;
        match item {
            Some(Ok(Ok(frame))) => Ok(frame),
            Some(Ok(Err(FrameError::TooLong { limit }))) => Err(Error::FrameTooLong { limit }),
            Some(Ok(Err(_))) | None => {
                conn.io = None;
                Err(Error::Disconnected)
            }
            Some(Err(e)) => {
                conn.io = None;
                Err(Error::Io(e))
            }
        }
    }
}

/// The command that resynchronises.
const SYNC: &str = "guest-sync-delimited";

/// What a line is, to a resynchronisation waiting for the reply to its sync `id`.
enum SyncLine {
    /// The sync's reply: the last `0xFF` on the line followed by `{"return": id}` (whatever came
    /// before it is garbage).
    InSync,
    /// The agent's refusal of the sync (disabled with `--block-rpcs`, or an agent that lacks it):
    /// an error carrying the sync's id, or, from an agent that does not echo ids, a
    /// `CommandNotFound`/`CommandDisabled` naming the command. A resynchronisation cannot work
    /// then, and waiting for it would only look like a slow agent.
    Refused(Error),
    /// Anything else: stale lines and garbage, skipped.
    Other,
}

/// Reads a line once for what a resynchronisation needs.
fn sync_line(frame: &[u8], id: i64) -> SyncLine {
    if let Some(at) = frame.iter().rposition(|&b| b == SENTINEL) {
        let ours = serde_json::from_slice::<Members<'_>>(&frame[at + 1..])
            .ok()
            .and_then(|members| members.ret)
            .and_then(number::<i64>)
            == Some(id);
        return if ours {
            SyncLine::InSync
        } else {
            SyncLine::Other
        };
    }
    let Ok(Members {
        id: echoed,
        error: Some(error),
        ..
    }) = serde_json::from_slice::<Members<'_>>(frame)
    else {
        return SyncLine::Other;
    };
    let Refusal { class, desc } = Refusal::read(error);
    let ours = echoed.and_then(number::<i64>) == Some(id);
    let names_sync =
        matches!(class.as_str(), "CommandNotFound" | "CommandDisabled") && desc.contains(SYNC);
    match ours || names_sync {
        true => SyncLine::Refused(refusal(SYNC, class, desc)),
        false => SyncLine::Other,
    }
}

/// A JSON number, read from its text.
fn number<T: std::str::FromStr>(raw: &RawValue) -> Option<T> {
    raw.get().parse().ok()
}

/// Whether `frame` is the reply to request `id`: an object with our `id`, and `return` or
/// `error`. A line with a sentinel is a sync reply, never a command's. Nothing is built from the
/// line but an error's words.
fn classify(frame: &[u8], id: u64) -> Line<'_> {
    if frame.contains(&SENTINEL) {
        return Line::Other;
    }
    let Ok(members) = serde_json::from_slice::<Members<'_>>(frame) else {
        return Line::Other;
    };
    if members.id.and_then(number::<u64>) != Some(id) {
        return Line::Other;
    }
    match (members.ret, members.error) {
        (Some(ret), None) => Line::Reply(Ok(ret)),
        (None, Some(error)) => {
            let Refusal { class, desc } = Refusal::read(error);
            Line::Reply(Err((class, desc)))
        }
        // Both, or neither: not a reply, whatever its id says.
        _ => Line::Other,
    }
}

/// Our reply, decoded strictly (a struct only from an object) and checked against the request.
fn decode<C: Command>(command: &C, raw: &RawValue) -> Result<C::Returns> {
    qhotplug_qmp::decode::reply(command, raw.get()).map_err(|source| Error::Decode {
        command: C::NAME.into(),
        source,
    })
}

/// The error for a refusal of `command`: frozen, not offered, or failed.
fn refusal(command: &str, class: String, desc: String) -> Error {
    let command = command.to_owned();
    match class.as_str() {
        "CommandNotFound" if desc.contains("frozen state") => Error::Frozen { command },
        "CommandNotFound" | "CommandDisabled" => Error::Unsupported { command, desc },
        _ => Error::Agent {
            command,
            class,
            desc,
        },
    }
}

/// `desc` with each of `secrets` in it replaced by `<redacted>`.
fn redact(desc: String, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(desc, |desc, secret| desc.replace(secret, "<redacted>"))
}
