//! The job's network namespace, made off the critical path.
//!
//! Creating a network namespace is the most expensive namespace (≈ 0.7 ms here: every
//! per-namespace network subsystem initializes), so the job's is not made by clone3.
//! Right after clone3 the parent forks a short-lived helper that enters the job's user
//! namespace, unshares a network namespace (owned by that user namespace), brings up
//! loopback and sends the namespace to the child over a socketpair, while the child
//! builds its root. The child then joins it with setns. Both sides are allocation-free.
//! In `proxy` mode the helper sends the namespace to the parent too, which binds the
//! proxy's endpoints inside it (see `net::listeners`).

use super::{SetupError, Step, errno};
use std::ffi::CStr;
use std::os::fd::RawFd;

/// Runs in the helper (a fork of the parent): never returns. `to_parent` is -1 unless
/// the parent wants the namespace as well.
pub fn helper_main(child_userns: &CStr, to_child: RawFd, to_parent: RawFd) -> ! {
    // SAFETY (all calls): raw syscalls on C strings and fds we own; no allocation.
    unsafe {
        let userns = libc::open(child_userns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if userns < 0 || libc::setns(userns, libc::CLONE_NEWUSER) != 0 {
            libc::_exit(1);
        }
        if libc::unshare(libc::CLONE_NEWNET) != 0 || super::mounts::loopback_up().is_err() {
            libc::_exit(2);
        }
        let net = libc::open(
            c"/proc/thread-self/ns/net".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if net < 0 || send_fd(to_child, net) != 1 {
            libc::_exit(3);
        }
        if to_parent >= 0 && send_fd(to_parent, net) != 1 {
            libc::_exit(4);
        }
        libc::_exit(0)
    }
}

/// Space for one SCM_RIGHTS control message carrying one fd (CMSG_SPACE(sizeof(int))),
/// aligned for cmsghdr.
#[repr(C, align(8))]
struct CmsgBuf([u8; 24]);

/// A one-byte message with room for one fd, over the caller's buffers.
fn one_fd_msg(iov: &mut libc::iovec, buf: &mut CmsgBuf) -> libc::msghdr {
    // SAFETY: msghdr is plain data; zero is the neutral value of every field.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = buf.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    msg
}

fn send_fd(sock: RawFd, fd: RawFd) -> isize {
    let mut byte = [b'n'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut buf = CmsgBuf([0; 24]);
    let msg = one_fd_msg(&mut iov, &mut buf);
    // SAFETY: msg points at the local buffers above, sized for one fd.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    }
}

/// Receives one descriptor sent by `send_fd`; Err(errno) on EOF or error.
/// Allocation-free.
pub fn recv_fd(sock: RawFd) -> Result<RawFd, i32> {
    let mut byte = [0u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut buf = CmsgBuf([0; 24]);
    let mut msg = one_fd_msg(&mut iov, &mut buf);
    // SAFETY: msg points at the local buffers above, sized for one fd; the fd read from
    // it is checked before use and closed after.
    unsafe {
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if n != 1 || cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            // EOF: the helper failed (it exits with a code the parent does not need).
            return Err(if n < 0 { errno() } else { libc::ECHILD });
        }
        Ok(std::ptr::read_unaligned(
            libc::CMSG_DATA(cmsg).cast::<RawFd>(),
        ))
    }
}

/// Runs in the child: receives the namespace from the helper and joins it.
pub fn join(from_helper: RawFd) -> Result<(), SetupError> {
    let fail = |errno| SetupError {
        step: Step::NetNamespace,
        index: 0,
        errno,
    };
    let net = recv_fd(from_helper).map_err(fail)?;
    // SAFETY: setns on the descriptor just received, closed after; the helper's socket
    // is ours to close.
    unsafe {
        let r = libc::setns(net, libc::CLONE_NEWNET);
        let e = errno();
        libc::close(net);
        libc::close(from_helper);
        if r != 0 {
            return Err(fail(e));
        }
    }
    Ok(())
}
