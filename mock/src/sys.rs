//! The crate's only `unsafe`: one `recvmsg` that takes the fds a client attached (SCM_RIGHTS).
//! Both of the crate's peers receive through it, so an fd is owned the moment it arrives.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Reads what the socket holds without blocking, taking the fds that came with it (SCM_RIGHTS,
/// close-on-exec) into `fds`. `Ok(0)` at the end of the stream; `WouldBlock` when nothing waits.
pub(crate) fn recv(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
) -> io::Result<usize> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const MAX_FDS: usize = 8;
    #[repr(C)]
    union Control {
        buf: [u8; 128],
        _align: libc::cmsghdr,
    }
    // SAFETY: plain C structs for which all-zero bytes are a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut control: Control = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: `control.buf` lives for the whole call.
    msg.msg_control = unsafe { control.buf.as_mut_ptr() }.cast();
    // SAFETY: pure arithmetic.
    msg.msg_controllen =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<libc::c_int>()) as u32) } as _;
    // SAFETY: msg points at `buf` and `control`, both live and writable for the call.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled msg_control; the CMSG_* walk stays within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and points at a header the kernel wrote.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: pure arithmetic on a header the kernel wrote.
            let data_len = header.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            let count = data_len / std::mem::size_of::<libc::c_int>();
            // SAFETY: CMSG_DATA points at `count` c_ints inside `control`; possibly unaligned.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            for i in 0..count {
                // SAFETY: within the data just measured; each fd was installed for us by the
                // kernel and nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))) });
            }
        }
        // SAFETY: advancing within the control buffer the kernel filled.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(n as usize)
}
