//! Memory is bounded by the frame, for both protocol clients: whatever a peer sends within the
//! frame limit that is not our reply (an event, a late reply, a stale or foreign agent line,
//! garbage), the process never holds more than 4× that line on its account. A counting allocator
//! measures every byte this test binary allocates; each case sends an 8 MiB line of one shape
//! (objects, arrays of numbers, one long string, deep nesting) and reads the peak past what was
//! held before it, after a normal command has shown the line was read.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use qhotplug_mock::MockServer;
use qhotplug_qga::command::GuestPing;
use qhotplug_qmp::command::QueryStatus;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`, passed on.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // Old and new are both held for a moment while the bytes move.
            let during = CURRENT.load(Ordering::SeqCst) + new_size;
            PEAK.fetch_max(during, Ordering::SeqCst);
            CURRENT.fetch_add(new_size, Ordering::SeqCst);
            CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// How large each hostile line is.
const LINE: usize = 8 << 20;
/// The documented bound: what a line not ours may make the process hold, as a multiple of it.
const BOUND: usize = 4;

/// JSON text of about `LINE` bytes in each shape a parser can be made to pay for.
fn shapes() -> Vec<(&'static str, String)> {
    let repeat = |unit: &str, sep: &str| {
        let n = LINE / (unit.len() + sep.len());
        let mut s = String::with_capacity(LINE + 16);
        s.push('[');
        for i in 0..n {
            if i > 0 {
                s.push_str(sep);
            }
            s.push_str(unit);
        }
        s.push(']');
        s
    };
    let depth = LINE / 2;
    vec![
        ("objects", repeat("{\"a\":0}", ",")),
        ("numbers", repeat("0", ",")),
        ("empty strings", repeat("\"\"", ",")),
        ("one long string", format!("\"{}\"", "x".repeat(LINE))),
        (
            "deep nesting",
            format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        ),
    ]
}

/// Runs `send` (which puts one hostile line on the wire and proves it was read), and returns the
/// peak of what was allocated meanwhile past what was held before.
async fn peak_during<F: std::future::Future<Output = ()>>(send: F) -> usize {
    let before = CURRENT.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    send.await;
    PEAK.load(Ordering::SeqCst).saturating_sub(before)
}

fn assert_bounded(client: &str, shape: &str, what: &str, line: usize, peak: usize) {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    eprintln!(
        "{client}, {what} of {shape}: line {:.1} MiB, peak {:.1} MiB ({:.2}×)",
        mib(line),
        mib(peak),
        peak as f64 / line as f64
    );
    assert!(
        peak <= BOUND * line,
        "{client}, {what} of {shape}: {:.1} MiB held for a {:.1} MiB line",
        mib(peak),
        mib(line)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_line_that_is_not_ours_costs_at_most_four_times_its_bytes_in_either_client() {
    qmp_events_and_late_replies().await;
    agent_lines().await;
}

/// A `query-status` round trip with `before` sent ahead of its reply: when the call returns, the
/// client has read `before`.
async fn status_after(server: &mut MockServer, client: &qhotplug_qmp::Client, before: &[u8]) {
    let call = {
        let c = client.clone();
        tokio::spawn(async move { c.execute(&QueryStatus).await })
    };
    server.recv().await.unwrap();
    server.send_raw(before).await;
    server
        .reply(json!({"running": true, "status": "running"}))
        .await;
    call.await.unwrap().unwrap();
}

async fn qmp_events_and_late_replies() {
    let config = qhotplug_qmp::Config::new();
    let (mut server, client) = MockServer::connected(config).await;
    let _events = client.events();
    // Warm up: the connection's buffers and the runtime's first allocations.
    status_after(&mut server, &client, b"").await;

    for (shape, json) in shapes() {
        // An event whose data is the line.
        let line = format!(
            "{{\"event\":\"FLOOD\",\"data\":{json},\"timestamp\":{{\"seconds\":1,\"microseconds\":1}}}}\r\n"
        );
        let peak = peak_during(status_after(&mut server, &client, line.as_bytes())).await;
        assert_bounded("QMP", shape, "an event", line.len(), peak);

        // A reply whose caller gave up (in order, so not a protocol error), and nobody's.
        let line = format!("{{\"return\":{json}}}\r\n");
        let peak = peak_during(async {
            let late = client
                .execute_timeout(&QueryStatus, Some(Duration::from_millis(1)))
                .await;
            assert!(late.is_err());
            server.recv().await.unwrap();
            server.send_raw(line.as_bytes()).await;
            status_after(&mut server, &client, b"").await;
        })
        .await;
        assert_bounded("QMP", shape, "a late reply", line.len(), peak);
    }
}

/// The agent's end of the socket.
struct AgentPeer {
    read: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl AgentPeer {
    async fn send(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.unwrap();
    }

    /// The next request (a sync starts with the sentinel byte).
    async fn request(&mut self) -> serde_json::Value {
        let mut line = Vec::new();
        self.read.read_until(b'\n', &mut line).await.unwrap();
        let sentinel = line.first() == Some(&qhotplug_qga::SENTINEL);
        serde_json::from_slice(&line[usize::from(sentinel)..]).unwrap()
    }

    async fn answer_sync(&mut self, sync: &serde_json::Value) {
        assert_eq!(sync["execute"], "guest-sync-delimited");
        let reply = format!("{{\"return\": {}}}\n", sync["arguments"]["id"]);
        self.send(&[qhotplug_qga::SENTINEL]).await;
        self.send(reply.as_bytes()).await;
    }

    /// A `guest-ping` by `agent`, with `before` sent ahead of its reply: when the call returns,
    /// the client has read `before` (and resynchronised, if it had to).
    async fn ping_after(&mut self, agent: &std::sync::Arc<qhotplug_qga::Agent>, before: &[u8]) {
        let call = {
            let agent = agent.clone();
            tokio::spawn(async move { agent.execute(&GuestPing).await })
        };
        let mut request = self.request().await;
        if request["execute"] == "guest-sync-delimited" {
            self.answer_sync(&request).await;
            request = self.request().await;
        }
        self.send(before).await;
        let reply = format!("{{\"return\": {{}}, \"id\": {}}}\n", request["id"]);
        self.send(reply.as_bytes()).await;
        call.await.unwrap().unwrap();
    }
}

async fn agent_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let config = qhotplug_qga::Config::new().max_frame(16 << 20);
    let connect = tokio::spawn(qhotplug_qga::Agent::connect(path, config));
    let (stream, _) = listener.accept().await.unwrap();
    let (read, write) = stream.into_split();
    let mut peer = AgentPeer {
        read: BufReader::new(read),
        write,
    };
    let sync = peer.request().await;
    peer.answer_sync(&sync).await;
    let agent = std::sync::Arc::new(connect.await.unwrap().unwrap());
    // Warm up: the client's buffers and the runtime's first allocations.
    peer.ping_after(&agent, b"").await;

    for (shape, json) in shapes() {
        let lines = [
            (
                "a foreign reply",
                format!("{{\"return\":{json},\"id\":7}}\n"),
            ),
            ("a bare value", format!("{json}\n")),
            (
                "an error",
                format!("{{\"error\":{{\"class\":\"X\",\"desc\":\"y\",\"data\":{json}}}}}\n"),
            ),
        ];
        for (what, line) in lines {
            let peak = peak_during(peer.ping_after(&agent, line.as_bytes())).await;
            assert_bounded("agent", shape, what, line.len(), peak);
        }
    }
}
