//! The crate's only `unsafe`: placing inherited fds at known numbers in QEMU's process, keeping
//! every other fd of ours out of it, and waiting for its exit on a pidfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// `CLOSE_RANGE_CLOEXEC` (Linux 5.11): mark the range close-on-exec instead of closing it now, so
/// std's own exec-status pipe keeps working until exec.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Arranges for `fds[i]` to be fd `3 + i` in the child, and for every fd above those to be closed at
/// exec.
pub(crate) fn inherit_fds(command: &mut Command, fds: Vec<OwnedFd>) -> io::Result<()> {
    let first_free = 3 + fds.len() as RawFd;
    // Move the sources above every target first, so no dup2 overwrites a source still to be moved.
    let high: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| {
            // SAFETY: F_DUPFD_CLOEXEC takes an int and returns a new fd we then own exactly once.
            let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, first_free) };
            if dup < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `dup` is a fresh fd nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(dup) })
        })
        .collect::<io::Result<_>>()?;
    drop(fds);
    // SAFETY: the closure runs in the forked child before exec and calls only dup2 and close_range,
    // which are async-signal-safe; it allocates nothing. `high` is moved in and lives until exec.
    unsafe {
        command.pre_exec(move || {
            for (i, fd) in high.iter().enumerate() {
                if libc::dup2(fd.as_raw_fd(), 3 + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::syscall(
                libc::SYS_close_range,
                first_free as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A pidfd for our child `pid` (Linux 5.3+), registered with the current tokio runtime: it becomes
/// readable when the process exits, so an async wait needs no polling. The child is not reaped
/// yet, so its pid cannot have been reused.
pub(crate) fn pidfd(pid: u32) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    let fd = pidfd_open(pid)?;
    // SAFETY: an OwnedFd's as_raw_fd is the one fd it owns, open until the OwnedFd (here, inside
    // the AsyncFd) is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd (O_CLOEXEC by definition of pidfds); we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A pidfd for process `pid`, any process (one another process launched), registered with the
/// current tokio runtime.
pub(crate) fn pidfd_of(pid: u32) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    pidfd(pid)
}

/// Sends SIGKILL through `pidfd` (no pid reuse can redirect it).
pub(crate) fn pidfd_kill(pidfd: &OwnedFd) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes a pidfd we own, a signal number, a null siginfo and flags;
    // no memory of ours is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        // Already gone.
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Whether the process behind `pidfd` has exited (a pidfd becomes readable then), without
/// waiting.
pub(crate) fn pidfd_exited(pidfd: &OwnedFd) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own for the duration of the call, a zero timeout.
    let r = unsafe { libc::poll(&mut poll, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(poll.revents & libc::POLLIN != 0)
}

/// Reaps `pid` if it is our child and has exited; nothing if it is another's (its parent, or
/// init, reaps it).
pub(crate) fn reap_if_ours(pid: u32) {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on one pid writes the status int we pass and returns at once.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
}
