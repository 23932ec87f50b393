//! A real Linux guest: Debian's cloud kernel and busybox, booted under TCG from the image that
//! `tests/guest/build-image` builds (and caches), with its serial console on a socket.
//!
//! The guest's init reports hotplug on the console (`qhg: add block vda size=2048`,
//! `qhg: add net eth0 mac=…`, `qhg: remove block vda`) and then runs a shell there, so a test can
//! wait for what the guest saw and ask it more.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qhotplug::Vm;
use qhotplug_cmdline::{Launcher, Serial, VmSpec};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

/// How long a boot to the `qhg: ready` line may take (about 6 s here under TCG).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// The kernel and initramfs, built on first use. Returns `(vmlinuz, initramfs)`.
pub fn image() -> (PathBuf, PathBuf) {
    let top = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::var_os("QHOTPLUG_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| top.join("../target/qhotplug-guest"));
    let status = std::process::Command::new(top.join("guest/build-image"))
        .arg(&out)
        .status()
        .expect("run tests/guest/build-image");
    assert!(status.success(), "tests/guest/build-image failed: {status}");
    (out.join("vmlinuz"), out.join("initramfs.gz"))
}

/// Sets `spec` up to boot the guest image with its console on `console` (a socket QEMU listens on).
/// Kernel arguments already in `spec.append` are kept, after the image's own.
pub fn boot_spec(spec: &mut VmSpec, console: PathBuf) {
    let (kernel, initrd) = image();
    spec.kernel = Some(kernel);
    spec.initrd = Some(initrd);
    // printk.devkmsg=on: the guest's hotplug reports go through /dev/kmsg, not rate-limited.
    // memhp_default_state=online_movable: hot-plugged memory is onlined as movable, so the guest
    // can give it back. Whatever the spec's `append` held comes after (and so overrides).
    let mut append = "console=ttyS0 edd=off panic=-1 quiet printk.devkmsg=on \
                      memhp_default_state=online_movable"
        .to_owned();
    if let Some(extra) = spec.append.take() {
        append.push(' ');
        append.push_str(&extra);
    }
    spec.append = Some(append);
    spec.serials = vec![Serial::Socket(console)];
    spec.paused = false;
    spec.memory_mib = spec.memory_mib.max(256);
}

/// The guest's serial console: every line it printed, and a way to type.
#[derive(Clone)]
pub struct Console {
    lines: Arc<Mutex<Vec<String>>>,
    changed: Arc<Notify>,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
}

impl Console {
    /// Connects to the console socket and collects lines in the background.
    pub async fn connect(path: &std::path::Path) -> Console {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .expect("connect to the guest console");
        let (read, write) = stream.into_split();
        let console = Console {
            lines: Arc::default(),
            changed: Arc::default(),
            writer: Arc::new(tokio::sync::Mutex::new(write)),
        };
        let (lines, changed) = (console.lines.clone(), console.changed.clone());
        tokio::spawn(async move {
            let mut read = BufReader::new(read);
            let mut buf = Vec::new();
            while read.read_until(b'\n', &mut buf).await.unwrap_or(0) > 0 {
                let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                buf.clear();
                tracing::trace!(target: "guest", "{line}");
                lines.lock().unwrap().push(line);
                changed.notify_waiters();
            }
        });
        console
    }

    /// How many lines have arrived: a mark to wait from.
    pub fn mark(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a line after `mark` that contains `needle`; returns it, or `None` at the deadline.
    pub async fn wait_for(&self, mark: usize, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if let Some(line) = self.lines.lock().unwrap()[mark..]
                .iter()
                .find(|l| l.contains(needle))
            {
                return Some(line.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Waits for the guest's report that a `what` device (`block` or `net`) arrived after `mark`,
    /// and returns its name (`vda`, `eth0`).
    pub async fn added(&self, mark: usize, what: &str) -> String {
        let line = self
            .wait_for(mark, &format!("qhg: add {what} "), Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("the guest never reported a new {what}: {:?}", self.lines()));
        reported_name(&line, what)
    }

    /// Waits for the guest's report that a disk arrived after `mark`, and returns its name (`vda`)
    /// and its size in 512-byte sectors, as the guest read it.
    pub async fn added_disk(&self, mark: usize) -> (String, u64) {
        let line = self
            .wait_for(mark, "qhg: add block ", Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("the guest never reported a new disk: {:?}", self.lines()));
        let sectors = line
            .split(" size=")
            .nth(1)
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no size in {line:?}"));
        (reported_name(&line, "block"), sectors)
    }

    /// Runs a shell command in the guest and returns the lines it printed (stdout and stderr), and
    /// only those.
    ///
    /// The serial console also carries kernel messages (the init's hotplug reports among them),
    /// and the kernel writes them straight to the UART, even into the middle of a line the shell
    /// is printing. So every line of the command's output is prefixed with a tag unique to this
    /// call; kernel messages (`[ seconds.micros] text`, through their line ending) are cut out of
    /// the captured text, which glues an interrupted line back together; and a line that still
    /// does not carry the tag fails the test rather than being misread.
    pub async fn run(&self, command: &str, timeout: Duration) -> Vec<String> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The shell echoes what we type; `$((n+0))` only reads as `n` in the output.
        let begin = format!("qhg-begin-{n}");
        let end = format!("qhg-end-{n}");
        let tag = format!("qhg-out-{n}|");
        let mark = self.mark();
        let line = format!(
            "echo qhg-begin-$(({n}+0)); {{ {command}; }} 2>&1 | sed \"s/^/qhg-out-$(({n}+0))|/\"; echo qhg-end-$(({n}+0))\n"
        );
        self.writer
            .lock()
            .await
            .write_all(line.as_bytes())
            .await
            .expect("write to the guest console");
        self.wait_for(mark, &end, timeout)
            .await
            .unwrap_or_else(|| panic!("guest did not finish {command:?}: {:?}", self.lines()));
        let captured = self.lines.lock().unwrap()[mark..].join("\n");
        let text = strip_kernel_messages(&captured);
        let lines: Vec<&str> = text.lines().collect();
        let start = lines
            .iter()
            .position(|l| l.ends_with(&begin))
            .unwrap_or_else(|| panic!("no {begin} in what the guest printed: {captured:?}"));
        let stop = lines
            .iter()
            .position(|l| l.ends_with(&end))
            .unwrap_or_else(|| panic!("no {end} in what the guest printed: {captured:?}"));
        lines[start + 1..stop]
            .iter()
            .map(|l| match l.strip_prefix(&tag) {
                Some(out) => out.to_owned(),
                None => panic!("console line {l:?} is not output of {command:?}: {captured:?}"),
            })
            .collect()
    }
}

impl Console {
    /// Types `command` and a newline, and waits for nothing: for a command that never comes back
    /// (a panic, a reboot).
    pub async fn send(&self, command: &str) {
        self.writer
            .lock()
            .await
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("write to the guest console");
    }

    /// Runs `command` in the guest until its output satisfies `done` (what the guest shows can take
    /// a while to follow a change under TCG), up to `timeout`; returns that output. Fails the test
    /// at the deadline, with the last output.
    pub async fn until(
        &self,
        command: &str,
        done: impl Fn(&[String]) -> bool,
        timeout: Duration,
    ) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let out = self.run(command, timeout).await;
            if done(&out) {
                return out;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{command}: still {out:?}"
            );
        }
    }

    /// Runs `command` in the guest until it prints exactly `want` (one line), up to `timeout`.
    pub async fn until_says(&self, command: &str, want: &str, timeout: Duration) {
        self.until(command, |out| out == [want], timeout).await;
    }
}

/// `text` without its kernel messages: each `[ seconds.micros] …` through its line ending. One
/// printed into the middle of another line leaves that line whole again.
pub fn strip_kernel_messages(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_kernel_timestamp(rest) {
        out.push_str(&rest[..at]);
        rest = match rest[at..].find('\n') {
            Some(nl) => &rest[at + nl + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// Where the next `[<spaces><digits>.<digits>] ` starts, if anywhere.
fn find_kernel_timestamp(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    (0..bytes.len()).find(|&i| {
        let mut j = i;
        if bytes[j] != b'[' {
            return false;
        }
        j += 1;
        while bytes.get(j) == Some(&b' ') {
            j += 1;
        }
        let digits = |mut k: usize| {
            let from = k;
            while bytes.get(k).is_some_and(u8::is_ascii_digit) {
                k += 1;
            }
            (k > from).then_some(k)
        };
        let Some(k) = digits(j) else { return false };
        if bytes.get(k) != Some(&b'.') {
            return false;
        }
        let Some(k) = digits(k + 1) else { return false };
        bytes.get(k) == Some(&b']') && bytes.get(k + 1) == Some(&b' ')
    })
}

/// The device name in a guest report such as `qhg: add block vda size=2048` (`what` is `block` or
/// `net`).
pub fn reported_name(line: &str, what: &str) -> String {
    let rest = line
        .split(&format!("qhg: add {what} "))
        .nth(1)
        .unwrap_or_else(|| panic!("not an add {what} report: {line}"));
    rest.split(' ').next().unwrap().to_owned()
}

/// Waits (up to 20 s) for `DEVICE_DELETED` of device `id` on `events`.
pub async fn deleted(events: &mut qhotplug_qmp::EventStream, id: &str) {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(item) = events.next().await {
            if item.is_ok_and(|e| e.deleted_device() == Some(id)) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("DEVICE_DELETED for {id}"));
}

/// A booted guest: the VM handle and its console. QEMU is killed when it is dropped.
pub struct Guest {
    /// The VM.
    pub vm: Vm,
    /// Its console.
    pub console: Console,
    dir: tempfile::TempDir,
}

impl Guest {
    /// Boots the guest from `spec` (its kernel, console and `paused` are set here) and waits for
    /// its init to say it is ready. `launcher` may add NIC fds.
    pub async fn boot(spec: VmSpec, launcher: impl FnOnce(Launcher) -> Launcher) -> Guest {
        Self::boot_in(tempfile::tempdir().expect("tempdir"), spec, launcher).await
    }

    /// Boots the guest from `spec` with the guest agent's port (its socket in the guest's
    /// scratch directory, see [`crate::with_guest_agent`]), and waits until the agent runs.
    pub async fn boot_with_agent(mut spec: VmSpec) -> Guest {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::with_guest_agent(&mut spec, &dir.path().join("qga.sock"));
        let g = Self::boot_in(dir, spec, |l| l).await;
        let agent = g.vm.agent().await.expect("the VM's agent");
        agent
            .wait_running(BOOT_TIMEOUT)
            .await
            .expect("the guest agent runs");
        g
    }

    async fn boot_in(
        dir: tempfile::TempDir,
        mut spec: VmSpec,
        launcher: impl FnOnce(Launcher) -> Launcher,
    ) -> Guest {
        let console_path = dir.path().join("console.sock");
        boot_spec(&mut spec, console_path.clone());
        let l = launcher(Launcher::new(spec, dir.path().join("run")));
        let vm = Vm::launch(l.start_timeout(Duration::from_secs(30)))
            .await
            .unwrap_or_else(|e| panic!("launching the guest: {e}: {e:?}"));
        let console = Console::connect(&console_path).await;
        if console
            .wait_for(0, "qhg: ready", BOOT_TIMEOUT)
            .await
            .is_none()
        {
            panic!("the guest did not boot: {:?}", console.lines());
        }
        Guest { vm, console, dir }
    }

    /// The scratch directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

#[cfg(test)]
mod tests {
    use super::strip_kernel_messages;

    #[test]
    fn kernel_messages_are_cut_out_even_mid_line() {
        let console = "qhg-out-5|sda\nqhg-out-5|vd[   12.345678] qhg: remove block vda\na\n[    1.000000] x\nqhg-out-5|eth0";
        assert_eq!(
            strip_kernel_messages(console),
            "qhg-out-5|sda\nqhg-out-5|vda\nqhg-out-5|eth0"
        );
        assert_eq!(
            strip_kernel_messages("[not a stamp] ok"),
            "[not a stamp] ok"
        );
    }
}
