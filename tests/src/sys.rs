//! The harness's only `unsafe`: taking ownership of fds the kernel handed us.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Wraps fds received with SCM_RIGHTS.
pub(crate) fn own_received(fds: &[RawFd]) -> Vec<OwnedFd> {
    fds.iter()
        // SAFETY: each fd was just installed in our table by recvmsg(SCM_RIGHTS) and nothing else
        // owns it; wrapping it once makes it closed exactly once.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Sends `signal` to process `pid`.
pub fn kill(pid: u32, signal: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Clock ticks per second, the unit of the CPU times in `/proc/PID/stat`.
pub(crate) fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf(3) reads a configuration value and touches no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks.max(1) as u64
}

/// Clears close-on-exec on `fd`, so a child would inherit it unless the spawner closes it.
pub fn clear_cloexec(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETFD with 0 only clears the close-on-exec flag of an fd the caller borrows.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises this process's soft limit on open files to its hard limit; children (QEMU) inherit it.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// A lock across processes (nextest runs each test in its own): an exclusive `flock` on a file
/// in the temp directory, held until the returned file is dropped.
pub fn process_lock(name: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join(format!("qhotplug-{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("open the lock file");
    // SAFETY: flock takes the fd of a file we own and blocks until the lock is ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {}", path.display());
    file
}

/// Waits, up to `timeout`, for process `pid` to exit, woken by its pidfd (readable at exit).
/// `Ok(false)` at the deadline; `Ok(true)` also when the process was already gone.
pub async fn exited(pid: u32, timeout: std::time::Duration) -> std::io::Result<bool> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(true)
        } else {
            Err(e)
        };
    }
    // SAFETY: the kernel just gave us this fd; we own it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: an OwnedFd's as_raw_fd is the one fd it owns, open until the AsyncFd is dropped.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(tokio::time::timeout(timeout, fd.readable()).await.is_ok())
}
