//! `cargo bench -p qhotplug-tests --bench codec`
//!
//! Decode throughput of the QMP codec on replies and events recorded from a real QEMU in the same
//! run (a large `query-pci`, `query-qmp-schema`, and a stream of events), beside the floor:
//! `serde_json::from_slice::<Value>` on the same lines (split at newlines with `memchr`). The codec's
//! figure includes what a caller gets: framing, classifying (greeting / reply / event), and the reply
//! payload as a `Value` (what `execute_raw` returns) or a typed event. Prints each figure and,
//! last, `ratio_pci=… ratio_schema=… ratio_events=…` (floor time / codec time; 1.0 = as fast).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use qhotplug_qmp::codec::QmpCodec;
use qhotplug_qmp::message::Message;
use qhotplug_tests::Qemu;
use serde_json::Value;
use tokio_util::codec::Decoder;

const ROUNDS: usize = 15;

/// Sends raw requests on a second monitor and records the lines QEMU answers with.
struct Recorder {
    write: UnixStream,
    read: BufReader<UnixStream>,
}

impl Recorder {
    fn connect(path: &std::path::Path) -> Recorder {
        let stream = UnixStream::connect(path).expect("connect to the recording monitor");
        let mut r = Recorder {
            write: stream.try_clone().unwrap(),
            read: BufReader::new(stream),
        };
        r.line();
        r.call("{\"execute\":\"qmp_capabilities\"}");
        r
    }

    fn line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        self.read.read_until(b'\n', &mut line).unwrap();
        line
    }

    /// The reply line to `request`, and the event lines that came before it.
    fn call(&mut self, request: &str) -> (Vec<u8>, Vec<Vec<u8>>) {
        self.write.write_all(request.as_bytes()).unwrap();
        self.write.write_all(b"\r\n").unwrap();
        let mut events = Vec::new();
        loop {
            let line = self.line();
            if line.starts_with(b"{\"event\"") || line.starts_with(b"{\"timestamp\"") {
                events.push(line);
            } else {
                return (line, events);
            }
        }
    }
}

fn floor(stream: &[u8]) -> usize {
    let mut n = 0;
    for line in stream.split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let v: Value = serde_json::from_slice(line).unwrap();
        std::hint::black_box(&v);
        n += 1;
    }
    n
}

fn codec(stream: &[u8]) -> usize {
    let mut codec = QmpCodec::new(64 << 20);
    let mut buf = BytesMut::from(stream);
    let mut n = 0;
    while let Some(item) = codec.decode(&mut buf).unwrap() {
        match item.unwrap() {
            Message::Reply(reply) => {
                let v: Value = serde_json::from_str(reply.result.unwrap().get()).unwrap();
                std::hint::black_box(&v);
            }
            Message::Event(e) => {
                std::hint::black_box(&e);
            }
            Message::Greeting(g) => {
                std::hint::black_box(&g);
            }
        }
        n += 1;
    }
    n
}

fn time(f: impl Fn(&[u8]) -> usize, stream: &[u8], frames: usize) -> Duration {
    let start = Instant::now();
    assert_eq!(f(stream), frames);
    start.elapsed()
}

fn measure(name: &str, stream: &[u8], frames: usize) -> f64 {
    // Warm up, then alternate floor and codec; the median of per-round ratios.
    floor(stream);
    codec(stream);
    let (mut fl, mut co, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let f = time(floor, stream, frames);
        let c = time(codec, stream, frames);
        ratios.push(f.as_secs_f64() / c.as_secs_f64());
        fl.push(f);
        co.push(c);
    }
    fl.sort();
    co.sort();
    ratios.sort_by(f64::total_cmp);
    let mib = stream.len() as f64 / (1 << 20) as f64;
    let rate = |d: Duration| mib / d.as_secs_f64();
    println!(
        "{name}: {frames} frames, {:.1} MiB; floor (serde_json::from_slice::<Value>) {:7.1} MiB/s, codec {:7.1} MiB/s",
        mib,
        rate(fl[ROUNDS / 2]),
        rate(co[ROUNDS / 2]),
    );
    ratios[ROUNDS / 2]
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A machine with a crowded PCI tree, for a large query-pci.
    let mut extra: Vec<String> = vec![
        "-chardev".into(),
        "socket,id=rec,path={dir}/rec.sock,server=on,wait=off".into(),
        "-mon".into(),
        "chardev=rec,mode=control".into(),
    ];
    for bridge in 0..4u32 {
        extra.push("-device".into());
        extra.push(format!(
            "pci-bridge,id=br{bridge},chassis_nr={},bus=pci.0,addr={:#x}",
            bridge + 1,
            bridge + 4
        ));
        for slot in 1..25u32 {
            extra.push("-device".into());
            extra.push(format!(
                "virtio-net-pci,id=n{bridge}x{slot},bus=br{bridge},addr={slot:#x}"
            ));
        }
    }
    let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (qemu, _client) = runtime.block_on(Qemu::launch(&extra_refs, qhotplug_qmp::Config::new()));
    let mut rec = Recorder::connect(&qemu.dir().join("rec.sock"));
    println!(
        "QEMU {}",
        runtime
            .block_on(_client.execute(&qhotplug_qmp::command::QueryVersion))
            .unwrap()
            .qemu
    );

    // Devices behind bridges are listed once the firmware has numbered the buses: let it run
    // until query-pci shows the last of them.
    rec.call("{\"execute\":\"cont\"}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let pci = loop {
        let (pci, _) = rec.call("{\"execute\":\"query-pci\"}");
        if pci.windows(6).any(|w| w == b"n3x24\"") {
            break pci;
        }
        assert!(
            Instant::now() < deadline,
            "the firmware never numbered the bridges"
        );
    };
    rec.call("{\"execute\":\"stop\"}");
    let (schema, _) = rec.call("{\"execute\":\"query-qmp-schema\"}");
    let mut events = Vec::new();
    for _ in 0..2000 {
        events.extend(rec.call("{\"execute\":\"cont\"}").1);
        events.extend(rec.call("{\"execute\":\"stop\"}").1);
    }
    // The last events may trail the last reply.
    rec.call("{\"execute\":\"query-status\"}");
    let events: Vec<u8> = events.concat();
    let event_count = floor(&events);

    let ratio_pci = measure("query-pci x200", &pci.repeat(200), 200);
    let ratio_schema = measure("query-qmp-schema x20", &schema.repeat(20), 20);
    let ratio_events = measure("events (STOP/RESUME)", &events, event_count);
    println!(
        "ratio_pci={ratio_pci:.3} ratio_schema={ratio_schema:.3} ratio_events={ratio_events:.3}"
    );
}
