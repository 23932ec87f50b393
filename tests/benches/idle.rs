//! `cargo bench -p qhotplug-tests --bench idle`
//!
//! Memory per idle connection: 1000 clients connected to a mock QMP server (a separate process,
//! so its memory is not counted), measured as the growth of this process's resident set, beside
//! the floor: 1000 raw Unix sockets that did the same handshake and hold nothing else. Prints each
//! figure and, last, `client_kib_per_connection=… floor_kib_per_connection=…`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const CONNECTIONS: usize = 1000;
const GREETING: &[u8] =
    b"{\"QMP\":{\"version\":{\"qemu\":{\"micro\":0,\"minor\":2,\"major\":7},\"package\":\"mock\"},\"capabilities\":[\"oob\"]}}\r\n";

/// The server: greets every connection, answers `qmp_capabilities`, then holds it until it closes.
fn serve(path: &Path) {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    for stream in listener.incoming() {
        let mut stream = stream.unwrap();
        std::thread::spawn(move || {
            // A client that goes away is the end of its thread, not an error.
            if stream.write_all(GREETING).is_err() {
                return;
            }
            let mut read = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while read.read_line(&mut line).unwrap_or(0) > 0 {
                if stream.write_all(b"{\"return\":{}}\r\n").is_err() {
                    break;
                }
                line.clear();
            }
        });
    }
}

fn raw_handshake(path: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(path).unwrap();
    let mut read = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    read.read_line(&mut line).unwrap();
    stream
        .write_all(b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}\r\n")
        .unwrap();
    line.clear();
    read.read_line(&mut line).unwrap();
    stream
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve") {
        serve(Path::new(&args[i + 1]));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mock.sock");
    let mut server = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--serve")
        .arg(&path)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&path).is_err() {
        assert!(Instant::now() < deadline, "mock server did not start");
        std::thread::yield_now();
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = qhotplug_qmp::Config::new();
    // One connection first, so the runtime's own one-time allocations are not counted.
    let warm = runtime.block_on(config.connect(&path)).unwrap();
    drop(warm);

    let before = qhotplug_tests::rss_mib() * 1024.0;
    let clients: Vec<_> = runtime.block_on(async {
        let mut clients = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            clients.push(config.connect(&path).await.unwrap());
        }
        clients
    });
    // Idle: give the connection tasks a moment to settle into their first read.
    runtime.block_on(async {
        for c in &clients {
            assert!(!c.is_closed());
        }
        tokio::task::yield_now().await;
    });
    let client_kib = ((qhotplug_tests::rss_mib() * 1024.0) - before) / CONNECTIONS as f64;

    let before = qhotplug_tests::rss_mib() * 1024.0;
    let raw: Vec<UnixStream> = (0..CONNECTIONS).map(|_| raw_handshake(&path)).collect();
    let floor_kib = ((qhotplug_tests::rss_mib() * 1024.0) - before) / CONNECTIONS as f64;
    assert_eq!(raw.len(), CONNECTIONS);

    println!(
        "{CONNECTIONS} idle connections to a mock QMP server (resident set growth of this process):"
    );
    println!("  floor  (raw sockets after the handshake) {floor_kib:6.1} KiB per connection");
    println!("  client (qhotplug-qmp Client + task)      {client_kib:6.1} KiB per connection");
    println!("client_kib_per_connection={client_kib:.1} floor_kib_per_connection={floor_kib:.1}");
    drop(clients);
    drop(raw);
    let _ = server.kill();
    let _ = server.wait();
}
