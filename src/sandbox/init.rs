//! The job's init (pid 1 of its pid namespace) and the fork into its main process.
//!
//! Init reaps every orphan, forwards every signal it receives to the main process, and
//! when the main process ends reports its wait status and exits, which makes the kernel
//! kill whatever else is left in the namespace.
//!
//! For the daemon's jobs init also relays output: the main process writes into two
//! pipes, and init copies them into the log files the daemon opened, up to a cap per
//! stream. Init rather than the daemon holds the logs so that output is neither lost nor
//! blocked while the daemon restarts, and the cap holds without trusting the job.

use super::handshake::{MSG_EXEC_FAILED, MSG_EXITED, send, send_setup_failed};
use super::{ExecArrays, OutputRelay, SandboxPlan, SetupError, Step, check};

/// `hold`: the parent's pipe, where the main process waits for one more byte before it
/// execs (`--kernel-deadline`: the parent puts it under SCHED_DEADLINE first); -1: none.
pub fn run(
    plan: &SandboxPlan,
    exec: &ExecArrays,
    status_fd: i32,
    hold: i32,
) -> Result<std::convert::Infallible, SetupError> {
    // Init keeps only stdio, the status channel and the log files: the cgroup and mount
    // fds the parent prepared are no business of the job's.
    let mut keep = [status_fd, -1, -1, -1, hold];
    if let Some(o) = &plan.output {
        keep[1..4].copy_from_slice(&[o.stdin, o.stdout_log, o.stderr_log]);
    }
    close_all_except(&mut keep);
    // A name of its own: init is a copy of agentd, and `pkill agentd` meant for the
    // supervisor must not take the jobs down with it.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"job-init".as_ptr()) };
    // Block everything before the fork so no signal is lost between the fork and the
    // wait loop; the main process unblocks its copy before exec. (Blocked signals reach
    // a pid-namespace init even without handlers, which is what lets it forward them.)
    // SAFETY: sigset operations on a local set.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
    let pipes = match &plan.output {
        Some(_) => Some((pipe()?, pipe()?)),
        None => None,
    };
    let main = check(super::raw_fork(), Step::ForkMain)? as libc::pid_t;
    if main == 0 {
        if let (Some(o), Some((out, err))) = (&plan.output, pipes) {
            // SAFETY: dup2 onto stdio in the forked main process; the originals are
            // close-on-exec.
            unsafe {
                libc::dup2(o.stdin, 0);
                libc::dup2(out[1], 1);
                libc::dup2(err[1], 2);
            }
        }
        if hold >= 0 {
            // Not one instruction of the job before the parent has set its policy (or
            // given up: EOF ends this process with 125).
            super::wait_for_parent(hold);
        }
        exec_main(plan, exec, status_fd);
    }
    if hold >= 0 {
        // SAFETY: closing init's copy of the parent's pipe.
        unsafe { libc::close(hold) };
    }
    // The job runs as the same uid as init: make init's /proc entries (its fds, the
    // status channel and logs among them) unreachable for it.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
    match (&plan.output, pipes) {
        (Some(o), Some((out, err))) => {
            // SAFETY: closing init's copies of the write ends, so the pipes reach EOF
            // once every job process has closed them.
            unsafe {
                libc::close(out[1]);
                libc::close(err[1]);
            }
            relay_loop(o, [out[0], err[0]], &all, main, status_fd)
        }
        _ => wait_loop(&all, main, status_fd),
    }
}

/// Closes every descriptor from 3 up except those in `keep` (-1 entries ignored).
/// Allocation-free: `keep` is sorted in place.
fn close_all_except(keep: &mut [i32]) {
    keep.sort_unstable();
    let mut from = 3;
    for &fd in keep.iter().filter(|&&fd| fd >= 3) {
        if fd > from {
            // SAFETY: closing a descriptor range this process owns.
            unsafe { libc::syscall(libc::SYS_close_range, from as u32, (fd - 1) as u32, 0u32) };
        }
        from = from.max(fd + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from as u32, u32::MAX, 0u32) };
}

fn pipe() -> Result<[i32; 2], SetupError> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the local array.
    check(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }.into(),
        Step::OutputPipes,
    )?;
    Ok(fds)
}

/// Handles one signal init received: reaps on SIGCHLD (returns the main process's wait
/// status once it ended), forwards anything else that did not come from the kernel's
/// terminal handling.
fn on_signal(sig: i32, code: i32, main: libc::pid_t) -> Option<i32> {
    if sig == libc::SIGCHLD {
        loop {
            let mut status = 0;
            // SAFETY: reaping any child of init, without blocking.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return None;
            }
            if pid == main {
                return Some(status);
            }
        }
    } else if sig > 0 && code != libc::SI_KERNEL {
        // Forward what agentd (or anyone) sent; a terminal's keyboard signals reach
        // the whole foreground process group, the main process included, already.
        // SAFETY: forwarding a signal number we received to our own child.
        unsafe { libc::kill(main, sig) };
    }
    None
}

/// Reports the main process's end and leaves; exiting ends the pid namespace.
fn finish(status_fd: i32, wait_status: i32) -> ! {
    send(status_fd, MSG_EXITED, wait_status, b"");
    // SAFETY: init's work is done.
    unsafe { libc::_exit(0) }
}

/// Init without output relay: sleep in sigwaitinfo.
fn wait_loop(
    all: &libc::sigset_t,
    main: libc::pid_t,
    status_fd: i32,
) -> Result<std::convert::Infallible, SetupError> {
    loop {
        // SAFETY: siginfo_t is plain data.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waiting on our own blocked set; info is written by the kernel.
        let sig = unsafe { libc::sigwaitinfo(all, &mut info) };
        if let Some(status) = on_signal(sig, info.si_code, main) {
            finish(status_fd, status);
        }
    }
}

/// One output stream: the pipe init reads and the log it writes, with the cap.
struct Stream {
    pipe: i32,
    log: i32,
    seen: u64,
    cap: u64,
}

const TRUNCATED: &[u8] = b"\n[agentd: output truncated here: this log reached its size cap]\n";

impl Stream {
    /// Copies what the pipe holds now into the log; false once the pipe reached EOF.
    fn pump(&mut self) -> bool {
        let mut buf = [0u8; 16384];
        loop {
            // SAFETY: reading into a local buffer from our nonblocking pipe.
            let n = unsafe { libc::read(self.pipe, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                let n = n as u64;
                if self.seen < self.cap {
                    let keep = n.min(self.cap - self.seen) as usize;
                    write_all(self.log, &buf[..keep]);
                    if self.seen + n > self.cap {
                        write_all(self.log, TRUNCATED);
                    }
                }
                self.seen += n;
                continue;
            }
            let e = super::errno();
            if n < 0 && e == libc::EINTR {
                continue;
            }
            if n < 0 && e == libc::EAGAIN {
                return true;
            }
            // EOF or a broken pipe: this stream is done.
            // SAFETY: closing our own read end.
            unsafe { libc::close(self.pipe) };
            self.pipe = -1;
            return false;
        }
    }
}

fn write_all(fd: i32, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: writing initialized bytes from a live slice.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 && super::errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            return; // a full disk: the log ends here, the job goes on
        }
        bytes = &bytes[n as usize..];
    }
}

/// Init with output relay: poll a signalfd and the two pipes.
fn relay_loop(
    output: &OutputRelay,
    pipes: [i32; 2],
    all: &libc::sigset_t,
    main: libc::pid_t,
    status_fd: i32,
) -> Result<std::convert::Infallible, SetupError> {
    // SAFETY: a signalfd for the set init already blocks.
    let sfd = check(
        unsafe { libc::signalfd(-1, all, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) }.into(),
        Step::OutputPipes,
    )? as i32;
    let mut streams = [
        Stream {
            pipe: pipes[0],
            log: output.stdout_log,
            seen: 0,
            cap: output.cap,
        },
        Stream {
            pipe: pipes[1],
            log: output.stderr_log,
            seen: 0,
            cap: output.cap,
        },
    ];
    for s in &streams {
        // SAFETY: fcntl on our own pipe end.
        unsafe { libc::fcntl(s.pipe, libc::F_SETFL, libc::O_NONBLOCK) };
    }
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: streams[0].pipe,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: streams[1].pipe,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polling a local array; negative fds are ignored by the kernel.
        unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
        for (i, s) in streams.iter_mut().enumerate() {
            if s.pipe >= 0 && fds[i + 1].revents != 0 {
                s.pump();
            }
        }
        if fds[0].revents != 0 {
            loop {
                // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
                let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
                let n = unsafe {
                    libc::read(
                        sfd,
                        (&mut info as *mut libc::signalfd_siginfo).cast(),
                        std::mem::size_of::<libc::signalfd_siginfo>(),
                    )
                };
                if n != std::mem::size_of::<libc::signalfd_siginfo>() as isize {
                    break;
                }
                if let Some(status) = on_signal(info.ssi_signo as i32, info.ssi_code, main) {
                    // What the job wrote before it ended belongs in the log.
                    for s in streams.iter_mut().filter(|s| s.pipe >= 0) {
                        s.pump();
                    }
                    finish(status_fd, status);
                }
            }
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
    if let Some((soft, hard)) = plan.nofile {
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads a local struct. Lowering a limit cannot fail for lack
        // of privilege; if it fails anyway the job keeps the higher limit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
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
