//! The parent/child handshake, numbered the same on both sides.
//!
//! 1. parent: clone3 into the namespaces (and the v2 cgroup); child blocks reading the
//!    sync pipe.
//! 2. parent: writes uid_map and gid_map, idmaps the workspace mount, then writes one
//!    byte to the sync pipe. (EOF instead: the parent failed, and the child exits
//!    without running anything.) The child builds its root meanwhile.
//! 3. parent: adds the policy's rules to the Landlock ruleset the child inherited and
//!    joins the child to the v1 cgroups (each migration waits for an RCU grace period),
//!    both while the child works, then writes a second byte. The child
//!    waits for it before it unshares its cgroup namespace and drops its capabilities;
//!    any setup failure is written to the status pipe as `SetupFailed` and the child
//!    exits.
//! 4. child: forks the job's main process, which installs seccomp and execs; an exec
//!    failure is written as `ExecFailed`.
//! 5. child (init): when the main process ends, writes `Exited` with its wait status and
//!    exits, which ends the pid namespace.
//!
//! Messages are small fixed headers plus a detail string, written with one write(2)
//! each (atomic below PIPE_BUF).

use std::io::Read;

pub const MSG_SETUP_FAILED: u32 = 1;
pub const MSG_EXEC_FAILED: u32 = 2;
pub const MSG_EXITED: u32 = 3;
const MAX_DETAIL: usize = 480;

/// What the child said, decoded by the parent.
#[derive(Debug, Clone, PartialEq)]
pub enum ChildMessage {
    /// `step` is a `sandbox::Step` code, `index` its position in the plan.
    SetupFailed {
        step: u32,
        index: u32,
        errno: i32,
    },
    ExecFailed {
        command: String,
        errno: i32,
    },
    Exited {
        wait_status: i32,
    },
}

/// Encodes one message into `buf`; returns its length. Allocation-free, since the child
/// may call it at any point.
pub fn encode(buf: &mut [u8; 512], kind: u32, value: i32, detail: &[u8]) -> usize {
    let detail = &detail[..detail.len().min(MAX_DETAIL)];
    buf[0..4].copy_from_slice(&kind.to_le_bytes());
    buf[4..8].copy_from_slice(&value.to_le_bytes());
    buf[8..12].copy_from_slice(&(detail.len() as u32).to_le_bytes());
    buf[12..12 + detail.len()].copy_from_slice(detail);
    12 + detail.len()
}

/// Writes a message to `fd` with a single write(2).
pub fn send(fd: i32, kind: u32, value: i32, detail: &[u8]) {
    let mut buf = [0u8; 512];
    let len = encode(&mut buf, kind, value, detail);
    // SAFETY: buf holds `len` initialized bytes; fd is the status pipe's write end.
    unsafe { libc::write(fd, buf.as_ptr().cast(), len) };
}

/// Reports a failed setup step: the detail is the step code and index, little endian.
pub fn send_setup_failed(fd: i32, e: super::SetupError) {
    let mut detail = [0u8; 8];
    detail[..4].copy_from_slice(&(e.step as u32).to_le_bytes());
    detail[4..].copy_from_slice(&e.index.to_le_bytes());
    send(fd, MSG_SETUP_FAILED, e.errno, &detail);
}

/// Reads every message until EOF.
pub fn read_all(mut pipe: impl Read) -> Vec<ChildMessage> {
    let mut bytes = Vec::new();
    let _ = pipe.read_to_end(&mut bytes);
    let mut out = Vec::new();
    let mut rest = bytes.as_slice();
    while rest.len() >= 12 {
        let kind = u32::from_le_bytes(rest[0..4].try_into().unwrap());
        let value = i32::from_le_bytes(rest[4..8].try_into().unwrap());
        let len = u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize;
        if len > MAX_DETAIL || rest.len() < 12 + len {
            break;
        }
        let raw = &rest[12..12 + len];
        let detail = String::from_utf8_lossy(raw).into_owned();
        let word = |i: usize| {
            raw.get(i..i + 4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()))
        };
        out.push(match kind {
            MSG_SETUP_FAILED => ChildMessage::SetupFailed {
                step: word(0),
                index: word(4),
                errno: value,
            },
            MSG_EXEC_FAILED => ChildMessage::ExecFailed {
                command: detail,
                errno: value,
            },
            MSG_EXITED => ChildMessage::Exited { wait_status: value },
            _ => break,
        });
        rest = &rest[12 + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut stream = Vec::new();
        let mut buf = [0u8; 512];
        let n = encode(
            &mut buf,
            MSG_SETUP_FAILED,
            libc::EPERM,
            &[10, 0, 0, 0, 3, 0, 0, 0],
        );
        stream.extend_from_slice(&buf[..n]);
        let n = encode(&mut buf, MSG_EXITED, 0x0900, b"");
        stream.extend_from_slice(&buf[..n]);
        assert_eq!(
            read_all(stream.as_slice()),
            vec![
                ChildMessage::SetupFailed {
                    step: 10,
                    index: 3,
                    errno: libc::EPERM
                },
                ChildMessage::Exited {
                    wait_status: 0x0900
                }
            ]
        );
    }
}
