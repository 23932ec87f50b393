//! A QMP proxy in front of real QEMU that fails one chosen command: the rollback tests' way to
//! force a failure at any step of a sequence while everything else (and the state they check
//! afterwards) is QEMU's own.
//!
//! The client connects to the proxy; the proxy to one of QEMU's monitors. Bytes and fds pass
//! through unchanged, except the `n`th request for the chosen command, which QEMU never sees: the
//! proxy answers it with a `GenericError` (after QEMU has answered everything before it, so replies
//! stay in order) and closes any fd that came with it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use sendfd::{RecvWithFd, SendWithFd};
use serde_json::Value;

/// The error the proxy answers a failed command with.
pub const INJECTED: &str = "qhotplug-tests: injected failure";

/// Requests forwarded and replies seen: a failure is answered once they are equal.
#[derive(Default)]
struct Flight {
    forwarded: u64,
    replied: u64,
}

/// A running proxy. Dropping it ends both connections.
pub struct FaultProxy {
    path: PathBuf,
    streams: Arc<Mutex<Vec<UnixStream>>>,
    threads: Vec<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens at `path` for one client and relays it to QEMU's monitor at `monitor`, failing the
    /// `nth` (1-based) request for `command`.
    pub fn start(path: &Path, monitor: &Path, command: &str, nth: usize) -> FaultProxy {
        let listener = UnixListener::bind(path).expect("bind the proxy");
        let monitor = monitor.to_owned();
        let command = command.to_owned();
        let streams = Arc::new(Mutex::new(Vec::new()));
        let keep = streams.clone();
        let main = std::thread::spawn(move || {
            let Ok((client, _)) = listener.accept() else {
                return;
            };
            let qemu = UnixStream::connect(&monitor).expect("connect to QEMU's monitor");
            keep.lock()
                .unwrap()
                .extend([client.try_clone().unwrap(), qemu.try_clone().unwrap()]);
            let flight = Arc::new((Mutex::new(Flight::default()), Condvar::new()));
            let to_client = Arc::new(Mutex::new(client.try_clone().unwrap()));
            let replies = {
                let (qemu, to_client, flight) =
                    (qemu.try_clone().unwrap(), to_client.clone(), flight.clone());
                std::thread::spawn(move || relay_replies(qemu, &to_client, &flight))
            };
            relay_requests(&client, &qemu, &to_client, &flight, &command, nth);
            let _ = qemu.shutdown(std::net::Shutdown::Both);
            let _ = replies.join();
        });
        FaultProxy {
            path: path.to_owned(),
            streams,
            threads: vec![main],
        }
    }

    /// Where clients connect.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // A proxy nobody connected to: wake its accept.
        let _ = UnixStream::connect(&self.path);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The command a request line names (`execute` or `exec-oob`).
fn command_of(line: &[u8]) -> Option<(String, Option<Value>)> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let name = v
        .get("execute")
        .or_else(|| v.get("exec-oob"))?
        .as_str()?
        .to_owned();
    Some((name, v.get("id").cloned()))
}

fn relay_requests(
    client: &UnixStream,
    qemu: &UnixStream,
    to_client: &Mutex<UnixStream>,
    flight: &(Mutex<Flight>, Condvar),
    fail: &str,
    nth: usize,
) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let mut raw = [0; 8];
        let Ok((n, nfds)) = client.recv_with_fd(&mut buf, &mut raw) else {
            return;
        };
        fds.extend(crate::sys::own_received(&raw[..nfds]));
        if n == 0 {
            return;
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let request = command_of(&line);
            let count = request.as_ref().map(|(name, _)| {
                let c = seen.entry(name.clone()).or_default();
                *c += 1;
                (name == fail).then_some(*c)
            });
            if let (Some(Some(c)), Some((_, id))) = (count, &request) {
                if c == nth {
                    // QEMU never sees it; its fd (if any) is closed here.
                    fds.clear();
                    let (lock, cv) = flight;
                    let mut f = lock.lock().unwrap();
                    while f.replied < f.forwarded {
                        f = cv.wait(f).unwrap();
                    }
                    let mut reply = serde_json::json!({
                        "error": {"class": "GenericError", "desc": INJECTED}
                    });
                    if let Some(id) = id {
                        reply["id"] = id.clone();
                    }
                    let mut out = serde_json::to_vec(&reply).unwrap();
                    out.extend_from_slice(b"\r\n");
                    let _ = to_client.lock().unwrap().write_all(&out);
                    continue;
                }
            }
            if request.is_some() {
                flight.0.lock().unwrap().forwarded += 1;
            }
            let raw: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
            if qemu.send_with_fd(&line, &raw).is_err() {
                return;
            }
            // QEMU holds its own copies now.
            fds.clear();
        }
    }
}

fn relay_replies(
    qemu: UnixStream,
    to_client: &Mutex<UnixStream>,
    flight: &(Mutex<Flight>, Condvar),
) {
    let mut read = BufReader::new(qemu);
    let mut line = Vec::new();
    loop {
        line.clear();
        match read.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let is_reply = serde_json::from_slice::<Value>(&line)
            .ok()
            .is_some_and(|v| v.get("return").is_some() || v.get("error").is_some());
        // Written before it is counted, so an injected error can never overtake it.
        if to_client.lock().unwrap().write_all(&line).is_err() {
            break;
        }
        if is_reply {
            flight.0.lock().unwrap().replied += 1;
            flight.1.notify_all();
        }
    }
    // QEMU hung up: so does the proxy, and nothing waits for replies any more.
    let _ = to_client.lock().unwrap().shutdown(std::net::Shutdown::Both);
    let mut f = flight.0.lock().unwrap();
    f.replied = u64::MAX;
    flight.1.notify_all();
}

/// Runs `change` on a [`Vm`](qhotplug::Vm) attached to `t`'s QEMU through a [`FaultProxy`] on its
/// second monitor `monitor` (see [`second_monitor`](crate::second_monitor)) that fails the `nth`
/// request for `command`. Asserts the call failed at that step with a clean rollback, and that
/// QEMU's state and our fd table come back to what they were. Returns the attached VM (for more
/// checks of the SDK's view) and the proxy it talks through.
pub async fn assert_rolls_back<F, Fut, T>(
    t: &crate::TestVm,
    monitor: &Path,
    command: &str,
    nth: usize,
    change: F,
) -> (qhotplug::Vm, FaultProxy)
where
    F: FnOnce(qhotplug::Vm) -> Fut,
    Fut: std::future::Future<Output = qhotplug::Result<T>>,
    T: std::fmt::Debug,
{
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let proxy = FaultProxy::start(
        &monitor.with_file_name(format!("fault-proxy-{n}.sock")),
        monitor,
        command,
        nth,
    );
    let client = qhotplug_qmp::connect(proxy.path()).await.unwrap();
    let vm = qhotplug::Vm::attach(client, t.vm.spec()).await.unwrap();
    let before = t.snapshot().await;
    match change(vm.clone()).await {
        Err(qhotplug::Error::Step {
            step,
            undo_failures,
            ..
        }) => {
            assert_eq!(step, command, "the step that failed");
            assert!(undo_failures.is_empty(), "{command}: {undo_failures:?}");
        }
        other => panic!("a failure at {command} #{nth}: {other:?}"),
    }
    t.assert_settles_to(&before, &format!("after a failure at {command} #{nth}"))
        .await;
    (vm, proxy)
}
