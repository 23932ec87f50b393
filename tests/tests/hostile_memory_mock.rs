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

async fn qmp_events_and_late_replies() {
    let config = qhotplug_qmp::Config::new();
    let (mut server, client) = MockServer::connected(config).await;
    let _events = client.events();
    // Warm up: the connection's buffers and the runtime's first allocations.
    let call = {
        let c = client.clone();
        tokio::spawn(async move { c.execute(&QueryStatus).await })
    };
    server.recv().await.unwrap();
    server
        .reply(json!({"running": true, "status": "running"}))
        .await;
    call.await.unwrap().unwrap();

    for (shape, json) in shapes() {
        // An event whose data is the line.
        let line = format!(
            "{{\"event\":\"FLOOD\",\"data\":{json},\"timestamp\":{{\"seconds\":1,\"microseconds\":1}}}}\r\n"
        );
        let peak = peak_during(async {
            let call = {
                let c = client.clone();
                tokio::spawn(async move { c.execute(&QueryStatus).await })
            };
            server.recv().await.unwrap();
            server.send_raw(line.as_bytes()).await;
            server
                .reply(json!({"running": true, "status": "running"}))
                .await;
            call.await.unwrap().unwrap();
        })
        .await;
        assert_bounded("QMP", shape, "an event", line.len(), peak);

        // A reply whose caller gave up (in order, so not a protocol error), and nobody's.
        let line = format!("{{\"return\":{json}}}\r\n");
        let peak = peak_during(async {
            let late = client
                .execute_timeout(&QueryStatus, Some(Duration::from_millis(1)))
                .await;
            assert!(late.is_err());
            let _ = server.recv().await.unwrap();
            server.send_raw(line.as_bytes()).await;
            let call = {
                let c = client.clone();
                tokio::spawn(async move { c.execute(&QueryStatus).await })
            };
            server.recv().await.unwrap();
            server
                .reply(json!({"running": true, "status": "running"}))
                .await;
            call.await.unwrap().unwrap();
        })
        .await;
        assert_bounded("QMP", shape, "a late reply", line.len(), peak);
    }
}

async fn agent_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let config = qhotplug_qga::Config::new().max_frame(16 << 20);
    let agent = std::sync::Arc::new(qhotplug_qga::Agent::new(&path, config));
    let ping = |agent: &std::sync::Arc<qhotplug_qga::Agent>| {
        let agent = agent.clone();
        tokio::spawn(async move { agent.execute(&GuestPing).await })
    };
    let first = ping(&agent);
    let (stream, _) = listener.accept().await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut recv = async move || {
        let mut line = Vec::new();
        read.read_until(b'\n', &mut line).await.unwrap();
        let sentinel = line.first() == Some(&qhotplug_qga::SENTINEL);
        serde_json::from_slice::<serde_json::Value>(&line[usize::from(sentinel)..]).unwrap()
    };
    let sync = recv().await;
    let sync_id = &sync["arguments"]["id"];
    write.write_all(&[qhotplug_qga::SENTINEL]).await.unwrap();
    write
        .write_all(format!("{{\"return\": {sync_id}}}\n").as_bytes())
        .await
        .unwrap();
    let request = recv().await;
    write
        .write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", request["id"]).as_bytes())
        .await
        .unwrap();
    first.await.unwrap().unwrap();

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
            let peak = peak_during(async {
                let call = ping(&agent);
                let request = recv().await;
                write.write_all(line.as_bytes()).await.unwrap();
                write
                    .write_all(
                        format!("{{\"return\": {{}}, \"id\": {}}}\n", request["id"]).as_bytes(),
                    )
                    .await
                    .unwrap();
                call.await.unwrap().unwrap();
            })
            .await;
            assert_bounded("agent", shape, what, line.len(), peak);
        }
    }
}
