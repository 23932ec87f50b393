//! The crate's only `unsafe`: one `sendmsg` that never raises SIGPIPE and can carry one fd.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Sends `bufs` on the stream socket `sock` without blocking, with `fd` attached (SCM_RIGHTS) to
/// the first byte when given. `MSG_NOSIGNAL`: a peer that hung up gives `EPIPE`, never SIGPIPE, so
/// a host process whose SIGPIPE is at its default (a C or Python program embedding this library)
/// is not killed. Returns how many bytes the kernel took; `WouldBlock` when none.
pub(crate) fn send(
    sock: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    // Room for one fd's control message, aligned as cmsghdr needs.
    #[repr(C)]
    union Control {
        buf: [u8; 64],
        _align: libc::cmsghdr,
    }
    // SAFETY: both are plain C structs for which all-zero bytes are a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut control: Control = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with iovec on Unix.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
        debug_assert!(space <= std::mem::size_of::<Control>());
        // SAFETY: `control.buf` is live for the whole call and at least `space` bytes long.
        msg.msg_control = unsafe { control.buf.as_mut_ptr() }.cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` zeroed bytes, enough for one header, so
        // CMSG_FIRSTHDR returns a valid, aligned pointer into `control`.
        let cmsg = unsafe { &mut *libc::CMSG_FIRSTHDR(&msg) };
        cmsg.cmsg_level = libc::SOL_SOCKET;
        cmsg.cmsg_type = libc::SCM_RIGHTS;
        // SAFETY: pure arithmetic.
        cmsg.cmsg_len = unsafe { libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) } as _;
        // SAFETY: CMSG_DATA points inside `control`, with room for one c_int after the header;
        // it may be unaligned for c_int, hence write_unaligned.
        unsafe {
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd.as_raw_fd())
        };
    }
    // SAFETY: `msg` points at live iovecs and control bytes for the duration of the call; the
    // kernel only reads them. The fd is borrowed: the kernel dups it into the message.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
