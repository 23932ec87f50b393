//! `cargo bench -p qhotplug-tests --bench qga`
//!
//! `guest-ping` round trips to Debian's `qemu-ga` in the booted test guest (TCG), through QEMU's
//! socket chardev, beside the floor: a raw blocking Unix-socket loop that sends the same bytes
//! (`encode_request` with the same ids) and reads one line per ping. Each round, the floor and the
//! SDK (in turn, who goes first alternating) connect (the chardev takes one client at a time),
//! resynchronise (not timed), and send `PINGS` pings one after another. Prints the medians per ping and, last,
//! `ratio_ping=…` (floor time / SDK time, the median of per-round ratios).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use qhotplug_qga::command::GuestPing;
use qhotplug_qga::{Agent, Config, SENTINEL};
use qhotplug_qmp::message::{encode_request, Execution};
use qhotplug_tests::{pc_spec, with_guest_agent, Guest};

const ROUNDS: usize = 20;
const PINGS: usize = 50;

fn main() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

/// The floor: connect, resync as the SDK does, then `PINGS` pings with ids 0.., the same bytes
/// the SDK sends. Returns the pings' time.
fn floor_round(socket: &Path) -> Duration {
    let stream = UnixStream::connect(socket).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut sync = vec![SENTINEL];
    let id = sync_id();
    let args = serde_json::json!({ "id": id });
    encode_request(&mut sync, "guest-sync-delimited", &args, Execution::InBand).unwrap();
    writer.write_all(&sync).unwrap();
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.read_until(b'\n', &mut line).unwrap();
        if line.contains(&SENTINEL) && String::from_utf8_lossy(&line).contains(&id.to_string()) {
            break;
        }
    }
    let requests: Vec<Vec<u8>> = (0..PINGS as u64)
        .map(|i| {
            let mut r = Vec::new();
            encode_request(&mut r, "guest-ping", &GuestPing, Execution::InBandWithId(i)).unwrap();
            r
        })
        .collect();
    let started = Instant::now();
    for request in &requests {
        writer.write_all(request).unwrap();
        line.clear();
        reader.read_until(b'\n', &mut line).unwrap();
        assert!(
            line.starts_with(b"{\"return\""),
            "{}",
            String::from_utf8_lossy(&line)
        );
    }
    started.elapsed()
}

async fn floor_in_task(socket: &Path) -> Duration {
    let path = socket.to_owned();
    tokio::task::spawn_blocking(move || floor_round(&path))
        .await
        .unwrap()
}

/// The SDK's round: connect and resynchronise (not timed), then `PINGS` pings.
async fn sdk_round(socket: &Path) -> Duration {
    let agent = Agent::connect(socket, Config::new()).await.unwrap();
    let started = Instant::now();
    for _ in 0..PINGS {
        agent.execute(&GuestPing).await.unwrap();
    }
    started.elapsed()
}

fn sync_id() -> i64 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000) as i64
        + 1
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qga.sock");
    let mut spec = pc_spec();
    with_guest_agent(&mut spec, &socket);
    let guest = Guest::boot(spec, |l| l).await;
    let patient = Config::new()
        .timeout(Duration::from_secs(30))
        .sync_timeout(Duration::from_secs(60));
    drop(Agent::connect(&socket, patient).await.unwrap());
    println!("guest-ping to qemu-ga in the booted guest (TCG), {ROUNDS} rounds of {PINGS}");

    let (mut floor, mut sdk) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Who goes first alternates, so neither gains from the order (the guest's state after
        // the other's connection closed).
        if round % 2 == 0 {
            floor.push(floor_in_task(&socket).await);
            sdk.push(sdk_round(&socket).await);
        } else {
            sdk.push(sdk_round(&socket).await);
            floor.push(floor_in_task(&socket).await);
        }
    }
    let ratio = qhotplug_tests::median_ratio(&floor, &sdk);
    let per_ping = |v: Vec<Duration>| qhotplug_tests::median(v).as_secs_f64() * 1e6 / PINGS as f64;
    println!(
        "per ping (µs, median): floor {:.0}, sdk {:.0}",
        per_ping(floor),
        per_ping(sdk)
    );
    println!("ratio_ping={ratio:.3}");
    drop(guest);
}
