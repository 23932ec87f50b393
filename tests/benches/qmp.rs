//! `cargo bench -p qhotplug-tests --bench qmp`
//!
//! Starts one paused QEMU with two QMP sockets and measures, against the same process: sequential
//! `query-status` round trips and 64-in-flight throughput for the client, and the same two for the
//! floor, a raw blocking Unix-socket loop sending the shortest valid request (pipelined with `oob`
//! enabled for the concurrent figure). Sequential round trips alternate one floor op and one client
//! op on the same thread; the concurrent figures alternate by round. A third client, on a third
//! monitor, runs with `Config::inband_ids(true)` in the same sequential rotation, to price the id
//! every command then carries. Prints each figure and, last, `ratio_seq=X ratio_concurrent=Y
//! ratio_seq_inband_ids=Z` where a ratio is floor time / client time (1.0 = no overhead).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use futures::StreamExt;
use qhotplug_qmp::command::QueryStatus;
use qhotplug_tests::Qemu;

const SEQ: usize = 500;
const CONC: usize = 5_000;
const WINDOW: usize = 64;
const ROUNDS: usize = 21;
const REQUEST: &[u8] = b"{\"execute\":\"query-status\"}\r\n";

struct Raw {
    write: UnixStream,
    read: BufReader<UnixStream>,
    line: String,
}

impl Raw {
    fn connect(path: &std::path::Path) -> Raw {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("raw connect: {e}"),
            }
        };
        let mut raw = Raw {
            write: stream.try_clone().unwrap(),
            read: BufReader::new(stream),
            line: String::new(),
        };
        raw.read_line(); // greeting
        raw.write
            .write_all(
                b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}\r\n",
            )
            .unwrap();
        raw.read_line();
        raw
    }

    fn read_line(&mut self) {
        self.line.clear();
        self.read.read_line(&mut self.line).unwrap();
        assert!(
            self.line.starts_with("{\"return\"") || self.line.starts_with("{\"QMP\""),
            "{}",
            self.line
        );
    }

    fn sequential(&mut self, n: usize) -> Duration {
        let start = Instant::now();
        for _ in 0..n {
            self.write.write_all(REQUEST).unwrap();
            self.read_line();
        }
        start.elapsed()
    }

    fn pipelined(&mut self, n: usize) -> Duration {
        let start = Instant::now();
        let first = WINDOW.min(n);
        self.write.write_all(&REQUEST.repeat(first)).unwrap();
        let mut sent = first;
        for _ in 0..n {
            self.read_line();
            if sent < n {
                self.write.write_all(REQUEST).unwrap();
                sent += 1;
            }
        }
        start.elapsed()
    }
}

/// `n` sequential round trips of each, alternating one floor op and one client op on the same
/// thread, so both see the same machine at the same moment. Returns (floor total, client total).
async fn interleaved(
    raw: &mut Raw,
    client: &qhotplug_qmp::Client,
    with_ids: &qhotplug_qmp::Client,
    n: usize,
) -> (Duration, Duration, Duration) {
    let (mut floor, mut ours, mut ided) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        // Blocking I/O on this worker for one round trip: nothing else runs meanwhile.
        let start = Instant::now();
        raw.write.write_all(REQUEST).unwrap();
        raw.read_line();
        floor += start.elapsed();
        let start = Instant::now();
        client.execute(&QueryStatus).await.unwrap();
        ours += start.elapsed();
        let start = Instant::now();
        with_ids.execute(&QueryStatus).await.unwrap();
        ided += start.elapsed();
    }
    (floor, ours, ided)
}

async fn client_sequential(client: &qhotplug_qmp::Client, n: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        client.execute(&QueryStatus).await.unwrap();
    }
    start.elapsed()
}

async fn client_pipelined(client: &qhotplug_qmp::Client, n: usize) -> Duration {
    let start = Instant::now();
    let done = futures::stream::iter(0..n)
        .map(|_| client.execute(&QueryStatus))
        .buffer_unordered(WINDOW)
        .fold(0usize, |acc, r| async move {
            r.unwrap();
            acc + 1
        })
        .await;
    assert_eq!(done, n);
    start.elapsed()
}

fn per_op(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let runtime = match std::env::var("QHOTPLUG_BENCH_RUNTIME").as_deref() {
        Ok("current_thread") => tokio::runtime::Builder::new_current_thread(),
        Ok(workers) if workers.parse::<usize>().is_ok() => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers.parse().unwrap());
            b
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .unwrap();
    // Run on a worker thread, as an orchestrator's tasks do: in a multi-thread runtime the future
    // given to `block_on` runs on the main thread, which is not a worker, so every wake-up would
    // cross threads.
    runtime.block_on(async { tokio::spawn(run()).await.unwrap() });
}

async fn run() {
    let (qemu, client) = Qemu::launch(
        &[
            "-qmp",
            "unix:{dir}/floor.sock,server=on,wait=off",
            "-qmp",
            "unix:{dir}/ids.sock,server=on,wait=off",
        ],
        qhotplug_qmp::Config::new(),
    )
    .await;
    let with_ids = qhotplug_qmp::Config::new()
        .inband_ids(true)
        .connect(qemu.dir().join("ids.sock"))
        .await
        .unwrap();
    let floor_path = qemu.dir().join("floor.sock");
    let mut raw = tokio::task::spawn_blocking(move || Raw::connect(&floor_path))
        .await
        .unwrap();
    println!(
        "QEMU {} ({}), client oob={}",
        client.greeting().version.qemu,
        client.greeting().version.package,
        client.oob_enabled()
    );

    // Warm up every path.
    client_sequential(&client, 200).await;
    client_sequential(&with_ids, 200).await;
    raw = tokio::task::spawn_blocking(move || {
        raw.sequential(200);
        raw
    })
    .await
    .unwrap();

    let (mut fs, mut cs, mut is, mut fc, mut cc) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let (floor, ours, ided) = interleaved(&mut raw, &client, &with_ids, SEQ).await;
        fs.push(floor);
        cs.push(ours);
        is.push(ided);
        let (r, conc) = tokio::task::spawn_blocking(move || {
            let mut raw = raw;
            let conc = raw.pipelined(CONC);
            (raw, conc)
        })
        .await
        .unwrap();
        raw = r;
        fc.push(conc);
        cc.push(client_pipelined(&client, CONC).await);
    }
    // Each round measures floor and client moments apart; the median of the per-round ratios
    // resists the drift of a shared 2-core machine better than a ratio of medians.
    let ratio = qhotplug_tests::median_ratio;
    let (ratio_seq, ratio_conc) = (ratio(&fs, &cs), ratio(&fc, &cc));
    let ratio_ids = ratio(&fs, &is);
    let total = |v: &[Duration]| v.iter().sum::<Duration>();
    let (fs_all, cs_all, is_all) = (total(&fs), total(&cs), total(&is));
    let (fc, cc) = (qhotplug_tests::median(fc), qhotplug_tests::median(cc));
    println!(
        "sequential query-status, {ROUNDS} rounds of {SEQ} round trips, floor and client alternating op by op:"
    );
    println!(
        "  floor  (raw socket loop) {:8.1} us/op",
        per_op(fs_all, SEQ * ROUNDS)
    );
    println!(
        "  client (qhotplug-qmp)    {:8.1} us/op",
        per_op(cs_all, SEQ * ROUNDS)
    );
    println!(
        "  client, inband_ids(true) {:8.1} us/op ({:+.1} us/op for the id)",
        per_op(is_all, SEQ * ROUNDS),
        per_op(is_all, SEQ * ROUNDS) - per_op(cs_all, SEQ * ROUNDS)
    );
    println!("{WINDOW}-in-flight query-status, {CONC} commands, median of {ROUNDS} rounds:");
    println!(
        "  floor  (raw, pipelined, oob) {:8.0} ops/s",
        CONC as f64 / fc.as_secs_f64()
    );
    println!(
        "  client (qhotplug-qmp)        {:8.0} ops/s",
        CONC as f64 / cc.as_secs_f64()
    );
    println!(
        "ratio_seq={ratio_seq:.3} ratio_concurrent={ratio_conc:.3} ratio_seq_inband_ids={ratio_ids:.3}"
    );
}
