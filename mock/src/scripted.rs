//! A scriptable QMP server on one end of a socketpair.
//!
//! The test drives it step by step (greet, read a request, answer, send an event, send garbage,
//! close), so it can produce what real QEMU cannot be made to: a disconnect at an exact point,
//! malformed frames, floods of events. It records the fds that arrive with each request.

use std::os::fd::{AsFd, OwnedFd};

use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// One request as the server received it.
#[derive(Debug)]
pub struct Received {
    /// The request's JSON.
    pub request: Value,
    /// Its exact bytes, line ending excluded.
    pub raw: Vec<u8>,
    /// The fds that arrived with its bytes (SCM_RIGHTS).
    pub fds: Vec<OwnedFd>,
}

impl Received {
    /// The `execute` (or `exec-oob`) name.
    pub fn command(&self) -> &str {
        self.request
            .get("execute")
            .or_else(|| self.request.get("exec-oob"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// The `arguments` member (`Null` when absent).
    pub fn arguments(&self) -> &Value {
        self.request.get("arguments").unwrap_or(&Value::Null)
    }

    /// The `id` member, if any.
    pub fn id(&self) -> Option<&Value> {
        self.request.get("id")
    }
}

/// The server end of a mock QMP connection.
pub struct MockServer {
    stream: UnixStream,
    buf: BytesMut,
    /// fds received, with the offset in `buf` of the first byte that came with them.
    fds: Vec<(usize, OwnedFd)>,
}

/// The greeting the mock sends by default: QEMU 7.2.0 offering `oob`.
pub fn default_greeting() -> Value {
    json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "mock"},
                   "capabilities": ["oob"]}})
}

impl MockServer {
    /// A connected pair: the server, and the stream to hand to the client.
    pub fn pair() -> (MockServer, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (
            MockServer {
                stream: a,
                buf: BytesMut::new(),
                fds: Vec::new(),
            },
            b,
        )
    }

    /// A client connected with `config` to a new mock that has done the handshake.
    pub async fn connected(config: qhotplug_qmp::Config) -> (MockServer, qhotplug_qmp::Client) {
        let (mut server, stream) = MockServer::pair();
        let client = tokio::spawn(async move { config.connect_stream(stream).await });
        server.handshake().await;
        (server, client.await.expect("join").expect("connect"))
    }

    /// Sends the default greeting, expects `qmp_capabilities`, and acknowledges it. Returns that
    /// request.
    pub async fn handshake(&mut self) -> Received {
        self.handshake_with(&default_greeting()).await
    }

    /// As [`handshake`](MockServer::handshake), with this greeting. A client shares one parsed
    /// `query-qmp-schema` between connections whose greetings match, so a mock that answers with
    /// its own schema should greet with its own package string ([`greeting`]).
    pub async fn handshake_with(&mut self, greeting: &Value) -> Received {
        self.send(greeting).await;
        let caps = self.recv().await.expect("qmp_capabilities");
        assert_eq!(caps.command(), "qmp_capabilities");
        self.reply(json!({})).await;
        caps
    }

    /// Sends one JSON message followed by CRLF.
    pub async fn send(&mut self, message: &Value) {
        let mut line = serde_json::to_vec(message).expect("serialize");
        line.extend_from_slice(b"\r\n");
        self.send_raw(&line).await;
    }

    /// Sends bytes as they are (garbage, partial frames, no line ending).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("mock write");
    }

    /// Sends bytes, reporting a write error instead of panicking (the client may have hung up).
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Sends bytes with an fd attached (SCM_RIGHTS), as a hostile server might.
    pub async fn send_with_fd(&mut self, bytes: &[u8], fd: std::os::fd::BorrowedFd<'_>) {
        use sendfd::SendWithFd;
        use std::os::fd::AsRawFd;
        loop {
            self.stream.writable().await.expect("writable");
            match self.stream.send_with_fd(bytes, &[fd.as_raw_fd()]) {
                Ok(n) => {
                    assert_eq!(n, bytes.len(), "short send_with_fd");
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("mock send_with_fd: {e}"),
            }
        }
    }

    /// Sends `{"return": value}`.
    pub async fn reply(&mut self, value: Value) {
        self.send(&json!({ "return": value })).await;
    }

    /// Sends `{"return": value, "id": id}`.
    pub async fn reply_id(&mut self, value: Value, id: &Value) {
        self.send(&json!({ "return": value, "id": id })).await;
    }

    /// Sends an error reply.
    pub async fn error(&mut self, class: &str, desc: &str) {
        self.send(&json!({"error": {"class": class, "desc": desc}}))
            .await;
    }

    /// Sends an event.
    pub async fn event(&mut self, name: &str, data: Value) {
        self.send(&event_json(name, data)).await;
    }

    /// Reads the next request. `None` when the client closed the connection.
    pub async fn recv(&mut self) -> Option<Received> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(end + 1);
                let mut fds = Vec::new();
                let mut rest = Vec::new();
                for (at, fd) in self.fds.drain(..) {
                    if at <= end {
                        fds.push(fd);
                    } else {
                        rest.push((at - end - 1, fd));
                    }
                }
                self.fds = rest;
                let raw = line[..line.len() - 1]
                    .strip_suffix(b"\r")
                    .unwrap_or(&line[..line.len() - 1])
                    .to_vec();
                let request = serde_json::from_slice(&raw).unwrap_or_else(|e| {
                    panic!(
                        "client sent invalid JSON ({e}): {}",
                        String::from_utf8_lossy(&raw)
                    )
                });
                return Some(Received { request, raw, fds });
            }
            let mut chunk = [0u8; 4096];
            let mut got = Vec::new();
            self.stream.readable().await.expect("readable");
            let read = self.stream.try_io(tokio::io::Interest::READABLE, || {
                crate::sys::recv(self.stream.as_fd(), &mut chunk, &mut got)
            });
            match read {
                Ok(0) => return None,
                Ok(n) => {
                    let at = self.buf.len();
                    self.fds.extend(got.into_iter().map(|fd| (at, fd)));
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("mock read: {e}"),
            }
        }
    }

    /// Closes the connection (the client sees EOF).
    pub fn close(self) {}

    /// How many bytes the client sent that are not yet a whole request.
    pub fn pending_bytes(&self) -> usize {
        self.buf.remaining()
    }
}

/// A greeting from QEMU `major.minor.0` with this package string, offering `oob`.
pub fn greeting(major: u32, minor: u32, package: &str) -> Value {
    json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": minor, "major": major}, "package": package},
                   "capabilities": ["oob"]}})
}

/// A `query-qmp-schema` reply listing just these commands (argument-less) and events.
pub fn schema(commands: &[&str], events: &[&str]) -> Value {
    let mut infos = vec![json!({"name": "0", "meta-type": "object", "members": []})];
    infos.extend(
        commands
            .iter()
            .map(|c| json!({"name": c, "meta-type": "command", "arg-type": "0", "ret-type": "0"})),
    );
    infos.extend(
        events
            .iter()
            .map(|e| json!({"name": e, "meta-type": "event", "arg-type": "0"})),
    );
    Value::Array(infos)
}

/// An event in QMP's wire form, with a fixed timestamp.
pub fn event_json(name: &str, data: Value) -> Value {
    json!({"event": name, "data": data, "timestamp": {"seconds": 1700000000, "microseconds": 1}})
}
