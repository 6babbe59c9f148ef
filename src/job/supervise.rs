//! Watch a started job: forward agentd's signals to it, enforce the wall-clock timeout
//! (SIGTERM, then SIGKILL after a grace period), and collect how it ended.

use super::spawn::Child;
use crate::sandbox::handshake::{ChildMessage, read_all};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Signals agentd forwards to the job instead of dying from them.
const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Blocks the forwarded signals and reads them from a signalfd, so that an interrupt
/// during setup is handled by the cleanup path instead of killing agentd half-way.
/// Dropping it restores the old mask.
pub struct SignalGuard {
    fd: OwnedFd,
    old: libc::sigset_t,
}

impl SignalGuard {
    pub fn install() -> std::io::Result<Self> {
        // SAFETY: sigset operations on local sets; signalfd returns a new fd we own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in FORWARDED {
                libc::sigaddset(&mut set, s);
            }
            if libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                return Err(e);
            }
            Ok(SignalGuard {
                fd: OwnedFd::from_raw_fd(fd),
                old,
            })
        }
    }

    /// Next pending signal, if any.
    /// Next pending signal, if any, and whether the terminal sent it (the kernel's
    /// keyboard signals go to the whole foreground process group, which the job's
    /// processes share with agentd, so those need no forwarding).
    pub fn next_with_origin(&self) -> Option<(i32, bool)> {
        // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            )
        };
        (n == std::mem::size_of::<libc::signalfd_siginfo>() as isize)
            .then_some((info.ssi_signo as i32, info.ssi_code == libc::SI_KERNEL))
    }

    /// Next pending signal, if any.
    pub fn next(&self) -> Option<i32> {
        self.next_with_origin().map(|(sig, _)| sig)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        // SAFETY: restoring the mask saved at install.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// How the job's init ended and what the child side reported.
#[derive(Debug)]
pub struct Outcome {
    pub si_code: i32,
    pub si_status: i32,
    pub messages: Vec<ChildMessage>,
    pub timed_out: bool,
    pub forwarded: Vec<i32>,
}

pub fn supervise(
    child: &mut Child,
    signals: &SignalGuard,
    timeout: Option<Duration>,
    kill_grace: Duration,
    started: Instant,
) -> Outcome {
    let deadline = timeout.map(|t| started + t);
    let mut kill_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut forwarded = Vec::new();
    loop {
        let now = Instant::now();
        if !timed_out && deadline.is_some_and(|d| now >= d) {
            timed_out = true;
            child.signal(libc::SIGTERM);
            kill_at = Some(now + kill_grace);
        }
        if kill_at.is_some_and(|k| now >= k) {
            child.signal(libc::SIGKILL);
            kill_at = None;
        }
        let next = [if timed_out { None } else { deadline }, kill_at]
            .into_iter()
            .flatten()
            .min();
        let wait_ms = next.map_or(-1, |t| {
            t.saturating_duration_since(now)
                .as_millis()
                .min(i32::MAX as u128) as i32
                + 1
        });
        let mut fds = [
            libc::pollfd {
                fd: child.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polling two valid descriptors in a local array.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait_ms) };
        if r < 0 && nix::errno::Errno::last() != nix::errno::Errno::EINTR {
            break;
        }
        if fds[1].revents & libc::POLLIN != 0 {
            while let Some((sig, from_terminal)) = signals.next_with_origin() {
                // A Ctrl-C at the terminal already reached every job process.
                if !from_terminal {
                    child.signal(sig);
                    forwarded.push(sig);
                }
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            break;
        }
    }
    let (si_code, si_status) = child.wait();
    // Every writer of the status pipe was in the job's pid namespace, which ended with
    // its init, so this read reaches EOF.
    let messages = read_all(&mut child.status);
    Outcome {
        si_code,
        si_status,
        messages,
        timed_out,
        forwarded,
    }
}
