//! The job's init (pid 1 of its pid namespace) and the fork into its main process.
//!
//! Init reaps every orphan, forwards every signal it receives to the main process, and
//! when the main process ends reports its wait status and exits, which makes the kernel
//! kill whatever else is left in the namespace.

use super::handshake::{MSG_EXEC_FAILED, MSG_EXITED, send, send_setup_failed};
use super::{ExecArrays, SandboxPlan, SetupError, Step, check};

pub fn run(
    plan: &SandboxPlan,
    exec: &ExecArrays,
    status_fd: i32,
) -> Result<std::convert::Infallible, SetupError> {
    // Init keeps only stdio and the status pipe: the cgroup and mount fds the parent
    // prepared are no business of the job's.
    // SAFETY: closing descriptor ranges this process owns.
    unsafe {
        if status_fd > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, (status_fd - 1) as u32, 0u32);
        }
        libc::syscall(
            libc::SYS_close_range,
            (status_fd + 1) as u32,
            u32::MAX,
            0u32,
        );
    }
    // Block everything before the fork so no signal is lost between the fork and the
    // wait loop; the main process unblocks its copy before exec. (Blocked signals reach
    // a pid-namespace init even without handlers, which is what lets it forward them.)
    // SAFETY: sigset operations on a local set.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
    let main = check(super::raw_fork(), Step::ForkMain)? as libc::pid_t;
    if main == 0 {
        exec_main(plan, exec, status_fd);
    }
    // The job runs as the same uid as init: make init's /proc entries (its fds, the
    // status pipe among them) unreachable for it.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
    loop {
        // SAFETY: siginfo_t is plain data.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waiting on our own blocked set; info is written by the kernel.
        let sig = unsafe { libc::sigwaitinfo(&all, &mut info) };
        if sig == libc::SIGCHLD {
            loop {
                let mut status = 0;
                // SAFETY: reaping any child of init, without blocking.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if pid == main {
                    send(status_fd, MSG_EXITED, status, b"");
                    // SAFETY: init's work is done; exiting ends the pid namespace.
                    unsafe { libc::_exit(0) };
                }
            }
        } else if sig > 0 && info.si_code != libc::SI_KERNEL {
            // Forward what agentd (or anyone) sent; a terminal's keyboard signals reach
            // the whole foreground process group, the main process included, already.
            // SAFETY: forwarding a signal number we received to our own child.
            unsafe { libc::kill(main, sig) };
        }
    }
}

/// In the main process: restore a clean signal state, seccomp last, execve.
fn exec_main(plan: &SandboxPlan, exec: &ExecArrays, status_fd: i32) -> ! {
    // SAFETY: only signal-state syscalls on this process, then close_range.
    unsafe {
        // Rust ignores SIGPIPE in agentd; ignored signals survive execve, so restore all.
        for sig in 1..libc::SIGRTMIN() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // No descriptor of agentd's (or of whoever started agentd) beyond stdio reaches
        // the job: mark them all close-on-exec.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
    if let Err(e) = super::seccomp::install(&plan.seccomp) {
        let errno = e.raw_os_error().unwrap_or(libc::EPERM);
        send_setup_failed(
            status_fd,
            SetupError {
                step: Step::Seccomp,
                index: 0,
                errno,
            },
        );
        // SAFETY: leaving the forked child.
        unsafe { libc::_exit(125) };
    }
    // Like execvp: each candidate in turn; "found but not executable" (126) wins over
    // "not found" (127).
    let mut errno = libc::ENOENT;
    for candidate in &plan.exec_candidates {
        // SAFETY: argv and envp are NULL-terminated arrays of valid C strings, alive here.
        unsafe { libc::execve(candidate.as_ptr(), exec.argv.as_ptr(), exec.envp.as_ptr()) };
        let e = super::errno();
        if e != libc::ENOENT && e != libc::ENOTDIR {
            errno = e;
        }
    }
    send(status_fd, MSG_EXEC_FAILED, errno, plan.argv[0].as_bytes());
    // SAFETY: leaving the forked child after a failed exec.
    unsafe { libc::_exit(if errno == libc::ENOENT { 127 } else { 126 }) }
}
