//! The proxy's listening sockets, created inside the job's network namespace.
//!
//! A socket belongs to the network namespace it was created in, whoever holds it. So
//! agentd makes the job's proxy endpoints there (a thread joins the namespace, binds
//! loopback addresses, and ends) and keeps the descriptors: connections the job makes to
//! its loopback arrive at agentd, outside the sandbox, with nothing of agentd's running
//! inside it to attack. The same call serves a new job (its namespace from the helper
//! that made it) and a job adopted after a daemon restart (its namespace from /proc).

use super::{DNS_PORT, HTTP_PORT, SOCKS_PORT};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// The job's three proxy endpoints on its loopback.
#[derive(Debug)]
pub struct ProxyListeners {
    pub http: TcpListener,
    pub socks: TcpListener,
    pub dns: UdpSocket,
}

impl ProxyListeners {
    /// As plain descriptors, in a fixed order (for SCM_RIGHTS).
    pub fn into_fds(self) -> [OwnedFd; 3] {
        [self.http.into(), self.socks.into(), self.dns.into()]
    }

    /// Back from descriptors in `into_fds` order.
    pub fn from_fds([http, socks, dns]: [OwnedFd; 3]) -> ProxyListeners {
        ProxyListeners {
            http: http.into(),
            socks: socks.into(),
            dns: dns.into(),
        }
    }
}

/// Binds the endpoints inside the network namespace `netns`: a namespace fd, or a pidfd
/// of a process in it (setns accepts both).
pub fn open_in(netns: BorrowedFd<'_>) -> std::io::Result<ProxyListeners> {
    let netns = netns.try_clone_to_owned()?;
    // setns changes only the calling thread's namespace: a thread of its own, which ends
    // right after, so no other code of agentd ever runs inside the job's namespace.
    std::thread::Builder::new()
        .name("agentd-netns".into())
        .spawn(move || {
            // SAFETY: setns on a namespace fd we own, affecting only this thread.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let at = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let bind = |port| {
                TcpListener::bind(at(port)).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("bind 127.0.0.1:{port} in the job's network namespace: {e}"),
                    )
                })
            };
            let listeners = ProxyListeners {
                http: bind(HTTP_PORT)?,
                socks: bind(SOCKS_PORT)?,
                dns: UdpSocket::bind(at(DNS_PORT)).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "bind 127.0.0.1:{DNS_PORT}/udp in the job's network namespace: {e}"
                        ),
                    )
                })?,
            };
            listeners.http.set_nonblocking(true)?;
            listeners.socks.set_nonblocking(true)?;
            listeners.dns.set_nonblocking(true)?;
            Ok(listeners)
        })?
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}
