//! `cargo bench -p qhotplug-tests --bench migration`
//!
//! Live migration of the test guest (Debian cloud kernel + busybox under TCG, 256 MiB, counting
//! in a tmpfs file all the time) over a Unix socket, hop after hop: each hop moves the guest from
//! the VM it runs on to a new target launched from that VM's spec. Hops alternate between the
//! SDK (`Vm::migrate`) and the floor: a raw blocking monitor loop on each QEMU's second monitor
//! sending the same commands (`migrate-set-capabilities` with `events` on both sides,
//! `migrate-incoming`, `migrate`, then `MIGRATION` `completed` on the source and on the target,
//! `query-migrate`, `quit`). Both measure the same things: QEMU's own `total-time` and
//! `downtime`, and the wall time from the first command to the target's `completed`. Launching
//! the target is outside both.
//!
//! Prints each hop and, last, `ratio_wall=…` (floor wall time / SDK wall time, the median of
//! per-pair ratios).

use std::path::Path;
use std::time::{Duration, Instant};

use qhotplug::{MigrationOptions, Serial, Transport, Vm};
use qhotplug_tests::raw::RawMonitor;
use qhotplug_tests::{pc_spec, second_monitor, Guest};
use serde_json::json;

const PAIRS: usize = 4;

fn main() {
    qhotplug_tests::bench_main(run());
}

/// A target for `vm`, with its own console and second monitor in `dir`.
async fn target(vm: &Vm, dir: &Path, hop: usize) -> Vm {
    let mut launcher = vm.migration_launcher(dir.join(format!("t{hop}")));
    let spec = launcher.spec_mut();
    spec.serials = vec![Serial::Socket(dir.join(format!("console{hop}.sock")))];
    spec.extra_args.clear();
    second_monitor(spec, &dir.join(format!("mon{hop}.sock")));
    Vm::launch(launcher).await.unwrap()
}

struct Hop {
    wall: Duration,
    total: Duration,
    downtime: Duration,
}

/// The floor: the migration driven raw from `source_mon` to `target_mon`.
fn raw_hop(source_mon: &Path, target_mon: &Path, uri: &str) -> Hop {
    let mut src = RawMonitor::connect(source_mon);
    let mut dst = RawMonitor::connect(target_mon);
    let caps = json!({"capabilities": [{"capability": "events", "state": true}]});
    let start = Instant::now();
    src.send("migrate-set-capabilities", &caps, None);
    dst.send("migrate-set-capabilities", &caps, None);
    dst.send("migrate-incoming", &json!({ "uri": uri }), None);
    src.send("migrate", &json!({ "uri": uri }), None);
    src.wait_event("MIGRATION", |d| d["status"] == "completed");
    dst.wait_event("MIGRATION", |d| d["status"] == "completed");
    let wall = start.elapsed();
    let info = src.send("query-migrate", &json!({}), None);
    src.send("quit", &json!({}), None);
    Hop {
        wall,
        total: Duration::from_millis(info["total-time"].as_u64().unwrap()),
        downtime: Duration::from_millis(info["downtime"].as_u64().unwrap()),
    }
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let mut spec = pc_spec();
    second_monitor(&mut spec, &d.join("mon0.sock"));
    let g = Guest::boot(spec, |l| l).await;
    g.console
        .run(
            "(i=0; while :; do i=$((i+1)); echo $i > /tmp/count; done) >/dev/null 2>&1 & true",
            Duration::from_secs(60),
        )
        .await;
    let mut current = g.vm.clone();
    let mut current_mon = d.join("mon0.sock");
    let (mut sdk, mut floor) = (Vec::new(), Vec::new());
    for hop in 1..=2 * PAIRS {
        let next = target(&current, &d, hop).await;
        let next_mon = d.join(format!("mon{hop}.sock"));
        let uri_path = d.join(format!("m{hop}.sock"));
        let result = if hop % 2 == 1 {
            let start = Instant::now();
            let m = current
                .migrate(
                    next.clone(),
                    MigrationOptions::new(Transport::Unix(uri_path)),
                    |_| {},
                )
                .await
                .unwrap();
            let h = Hop {
                wall: start.elapsed(),
                total: m.total_time,
                downtime: m.downtime,
            };
            sdk.push(h.wall);
            ("sdk", h)
        } else {
            let (src, dst) = (current_mon.clone(), next_mon.clone());
            let uri = format!("unix:{}", uri_path.display());
            let h = tokio::task::spawn_blocking(move || raw_hop(&src, &dst, &uri))
                .await
                .unwrap();
            floor.push(h.wall);
            ("floor", h)
        };
        println!(
            "hop {hop} {:<5} wall {:>7.1} ms  total {:>5} ms  downtime {:>4} ms",
            result.0,
            result.1.wall.as_secs_f64() * 1e3,
            result.1.total.as_millis(),
            result.1.downtime.as_millis()
        );
        current = next;
        current_mon = next_mon;
    }
    println!(
        "ratio_wall={:.3}",
        qhotplug_tests::median_ratio(&floor, &sdk)
    );
}
