//! Test harness for qhotplug: a guard for real QEMU processes, a scriptable mock QMP server for what
//! QEMU cannot be made to do (garbage, exact disconnects, floods), and fd accounting for our process.
//!
//! ```no_run
//! # async fn demo() {
//! use qhotplug_tests::Qemu;
//! use qhotplug_mock::MockServer;
//! // Real QEMU, paused, no guest:
//! let (qemu, client) = Qemu::paused().await;
//! // A mock on one end of a socketpair:
//! let (mut server, stream) = MockServer::pair();
//! # }
//! ```

#![warn(missing_docs)]

pub mod ceph;
pub mod epoll_floor;
pub mod guest;
pub mod proxy;
pub mod qemu;
pub mod raw;
mod seeded;
pub mod servers;
pub mod state_check;
pub mod storage;
mod sys;
pub mod timing;
pub mod traced;
pub mod vm;

pub use sys::{clear_cloexec, exited, kill, process_lock, raise_fd_limit};

pub use guest::{Console, Guest};
pub use proxy::{assert_rolls_back, FaultProxy};
pub use qemu::Qemu;
pub use seeded::SplitMix;
pub use vm::{
    fdset_files, image, iso, pc_spec, q35_spec, second_monitor, with_guest_agent, Snapshot, TestVm,
};

/// Serialises the tests of one binary that compare our process's fd table (or run beside ones
/// that do): under `cargo test` a binary's tests share a process and run on parallel threads, so
/// one test's fds would show up in another's before/after comparison. Under nextest (a process per
/// test) it is never contended. A test that panicked while holding it does not block the rest.
/// [`serial_test`] takes it for a whole test, runtime included.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs an async test body on its own current-thread runtime, holding [`serial`] from before the
/// runtime exists until after it is gone, so the runtime's own fds, and those of tasks still alive
/// when the body returns, never show up in another test's fd comparison. Use it in place of
/// `#[tokio::test]` in a binary whose tests compare our fd table.
pub fn serial_test(test: impl std::future::Future<Output = ()>) {
    let _serial = serial();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(test);
    // Dropped here, inside the lock: its tasks, and their fds, go first.
    drop(runtime);
}

/// The fds our process has open, as `(fd, target)` pairs from `/proc/self/fd`.
pub fn open_fds() -> Vec<(i32, String)> {
    let mut out = Vec::new();
    // The listing's own handle on the directory is not one of ours to compare: which number it
    // gets depends on what else is open for the moment (a test's server thread accepting and
    // dropping a connection once took the lowest free one, and a CI run saw the handle move).
    let listing = format!("/proc/{}/fd", std::process::id());
    for entry in std::fs::read_dir("/proc/self/fd").expect("read /proc/self/fd") {
        let entry = entry.expect("dir entry");
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // An fd closed since the directory was read is gone.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let target = target.to_string_lossy().into_owned();
            if target != listing {
                out.push((fd, target));
            }
        }
    }
    out.sort();
    out
}

/// The steps of a disk hot-add, as its `step` spans name them: what the fault and cancellation
/// tests find, one drop or kill point each.
pub const DISK_HOT_ADD_STEPS: [&str; 4] = ["add-fd", "blockdev-add", "blockdev-add", "device_add"];

/// The steps of a NIC hot-add with `queues` tap queues and no vhost-net.
pub fn nic_hot_add_steps(queues: usize) -> Vec<&'static str> {
    let mut steps = vec!["getfd"; queues];
    steps.extend(["netdev_add", "device_add"]);
    steps
}

/// The median of `times` (the upper one of an even count).
pub fn median(mut times: Vec<std::time::Duration>) -> std::time::Duration {
    times.sort();
    times[times.len() / 2]
}

/// The median of `floor[i] / ours[i]`: each floor measurement beside ours taken moments apart,
/// which resists the drift of a shared machine better than a ratio of medians (the benchmarks'
/// ratios; above 1.0, faster than the floor).
pub fn median_ratio(floor: &[std::time::Duration], ours: &[std::time::Duration]) -> f64 {
    let mut ratios: Vec<f64> = floor
        .iter()
        .zip(ours)
        .map(|(f, o)| f.as_secs_f64() / o.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

/// The first number after `key` in a `/proc` file of `key: value` lines (`/proc/self/status`,
/// `/proc/PID/status`, `/proc/meminfo`); `None` when the file or the key is not there.
pub fn proc_value(path: &str, key: &str) -> Option<f64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Our resident set size, in MiB (`VmRSS` from `/proc/self/status`).
pub fn rss_mib() -> f64 {
    proc_value("/proc/self/status", "VmRSS:").expect("VmRSS in /proc/self/status") / 1024.0
}

/// Process `pid`'s resident set size, in MiB (0 when it is gone).
pub fn rss_mib_of(pid: u32) -> f64 {
    proc_value(&format!("/proc/{pid}/status"), "VmRSS:").unwrap_or(0.0) / 1024.0
}

/// The CPU time (user and system, all threads) our process has used so far, in seconds.
pub fn cpu_seconds() -> f64 {
    cpu_seconds_in("/proc/self/stat")
}

/// The CPU time process `pid` has used so far, in seconds (0 when it is gone).
pub fn cpu_seconds_of(pid: u32) -> f64 {
    cpu_seconds_in(&format!("/proc/{pid}/stat"))
}

/// `utime` + `stime` of a `/proc/PID/stat`, in seconds (clock ticks: 10 ms here).
fn cpu_seconds_in(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // The fields after the command name (which may hold spaces) in parentheses: utime and stime
    // are the 14th and 15th of the line, the 12th and 13th after the name.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    ticks as f64 / sys::clock_ticks_per_second() as f64
}

/// How many fds our process has open.
pub fn open_fd_count() -> usize {
    open_fds().len()
}

/// A throw-away fd to pass around (one end of a fresh socketpair; the other end is closed).
pub fn pipe_fd() -> std::os::fd::OwnedFd {
    let (ours, _theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    ours.into()
}

/// Runs a benchmark's `main` future on a two-worker tokio runtime (this machine's two CPUs: one
/// for the SDK's side, one for QEMU).
pub fn bench_main<F: std::future::Future>(run: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(run)
}

/// A paused QEMU for a storage benchmark, its images' directory in memory (`/dev/shm`, where the
/// host disk's writeback cannot swamp what is compared) and a second monitor `mon2.sock` there
/// for the raw floor. Returns the QEMU, the directory, and the monitor's path.
pub async fn storage_bench_vm() -> (TestVm, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a directory for the images");
    let mon = dir.path().join("mon2.sock");
    let mut spec = pc_spec();
    second_monitor(&mut spec, &mon);
    (TestVm::launch(spec).await, dir, mon)
}

/// Asserts that `error` is a sequence's failure at step `step` (`Error::Step`), its undo clean.
pub fn assert_failed_at(error: &qhotplug::Error, step: &str) {
    match error {
        qhotplug::Error::Step {
            step: failed,
            undo_failures,
            ..
        } => {
            assert_eq!(*failed, step, "{error:?}");
            assert!(undo_failures.is_empty(), "{error:?}");
        }
        other => panic!("not a failure at {step}: {other:?}"),
    }
}
