//! The job's init (pid 1 of its pid namespace) and the fork into its main process.
//!
//! Init reaps every orphan, forwards every signal it receives to the main process, and
//! when the main process ends reports its wait status and exits, which makes the kernel
//! kill whatever else is left in the namespace.

use super::handshake::{MSG_EXEC_FAILED, MSG_EXITED, send};
use super::{SandboxPlan, SetupError, fail};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

pub fn run(plan: &SandboxPlan, status_fd: i32) -> Result<std::convert::Infallible, SetupError> {
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
    // SAFETY: single-threaded process; the child only calls exec_main, which ends in
    // execve or _exit.
    let main = unsafe { libc::fork() };
    if main < 0 {
        return Err(fail("fork the job's main process")(
            nix::errno::Errno::last(),
        ));
    }
    if main == 0 {
        exec_main(plan, status_fd);
    }
    // The job runs as the same uid as init: make init's /proc entries (its fds, the
    // status pipe among them) unreachable for it.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
    loop {
        // SAFETY: waiting on our own blocked set; info is written by the kernel.
        let sig = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::sigwaitinfo(&all, &mut info)
        };
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
        } else if sig > 0 {
            // SAFETY: forwarding a signal number we received to our own child.
            unsafe { libc::kill(main, sig) };
        }
    }
}

/// In the main process: restore a clean signal state, seccomp last, execve.
fn exec_main(plan: &SandboxPlan, status_fd: i32) -> ! {
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
        send(
            status_fd,
            super::handshake::MSG_SETUP_FAILED,
            e.raw_os_error().unwrap_or(libc::EPERM),
            b"install the seccomp filter",
        );
        // SAFETY: leaving the forked child.
        unsafe { libc::_exit(125) };
    }
    let argv: Vec<*const libc::c_char> = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = plan
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let command = plan.argv[0].as_bytes();

    // Like execvp: a name with '/' is used as is; otherwise each PATH directory is tried,
    // and "found but not executable" (126) wins over "not found" (127).
    let mut errno = libc::ENOENT;
    let candidates: Vec<CString> = if command.contains(&b'/') {
        vec![plan.argv[0].clone()]
    } else {
        plan.search_path
            .iter()
            .map(|d| {
                let mut p = d.as_os_str().as_bytes().to_vec();
                p.push(b'/');
                p.extend_from_slice(command);
                CString::new(p).expect("no NUL in PATH entries")
            })
            .collect()
    };
    for candidate in &candidates {
        // SAFETY: argv and envp are NULL-terminated arrays of valid C strings, alive here.
        unsafe { libc::execve(candidate.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        let e = nix::errno::Errno::last() as i32;
        if e != libc::ENOENT && e != libc::ENOTDIR {
            errno = e;
        }
    }
    send(status_fd, MSG_EXEC_FAILED, errno, command);
    // SAFETY: leaving the forked child after a failed exec.
    unsafe { libc::_exit(if errno == libc::ENOENT { 127 } else { 126 }) }
}
