//! The region protocol between a job and the supervisor's broker: JSON messages on a
//! SOCK_SEQPACKET Unix socket (one message per packet), descriptors alongside as
//! SCM_RIGHTS. One connection is one open region (a handle):
//!
//! 1. job → broker  `Open {name, write}`
//! 2. broker → job  `Opened {size, generation, write}` with /dev/userfaultfd (and, for a
//!    writable region, the memfd the job maps shared), or `Refused {kind, error}`.
//! 3. job → broker  `Map {addr, len}` with the userfaultfd it created and registered over
//!    that range: uffd and region map in one message (Firecracker's handshake).
//! 4. broker → job  `Serving`; from then on the broker answers every fault, and sends
//!    `Failure {offset, reason}` right before it makes an access fail (SIGBUS).
//! 5. The job closes the connection to close the handle (after unmapping).

use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Where a job finds the broker (inside the sandbox), unless AGENTD_REGIONS_SOCKET says.
pub const DEFAULT_SOCKET: &str = "/run/agentd/regions.sock";
pub const SOCKET_ENV: &str = "AGENTD_REGIONS_SOCKET";
/// The most a message may hold (bytes of JSON).
pub const MAX_MESSAGE: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Open { name: String, write: bool },
    Map { addr: u64, len: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "reply", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reply {
    Opened {
        size: u64,
        generation: u64,
        write: bool,
    },
    /// `kind`: not-granted, no-such-region, revoked, unavailable, bad-request.
    Refused {
        kind: String,
        error: String,
    },
    Serving,
    /// The next access at `offset` fails with SIGBUS, for `reason`.
    Failure {
        offset: u64,
        reason: String,
    },
}

/// Sends one message with `fds` attached.
pub fn send<T: Serialize>(sock: BorrowedFd, msg: &T, fds: &[RawFd]) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let iov = [std::io::IoSlice::new(&body)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one message and the descriptors that came with it; Ok(None) at end of file.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd,
) -> std::io::Result<Option<(T, Vec<OwnedFd>)>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(list) = c {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process for
                // us; nothing else refers to them.
                fds.extend(
                    list.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[..n]).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a region protocol message: {e}"),
        )
    })?;
    Ok(Some((msg, fds)))
}
