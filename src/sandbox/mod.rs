//! Child side only: the code between clone3 and execve, in the order it runs.
//!
//! The parent prepares a [`SandboxPlan`] in which every path, string, argument vector
//! and mount operation is already built; the child only carries it out with raw system
//! calls. It never allocates and never takes a lock, so the same code is safe when the
//! cloning process has other threads (the daemon) whose locks a clone would copy in a
//! held state. Errors are a step code, an index into the plan and an errno; the parent
//! turns them into words. Every way out is `_exit`.
//!
//! Order, and why:
//!  1. die with the parent, then wait for it to write the id maps;
//!  2. mount namespace made private, then a fresh root: only the policy's paths, the
//!     workspace, /proc, a minimal /dev, a private /tmp; pivot_root into it. Midway the
//!     process becomes the job's uid/gid (an unprivileged host user, no supplementary
//!     groups) with securebits locked, keeping its namespace capabilities to finish;
//!  3. hostname in the job's own UTS namespace; join the network namespace (with
//!     loopback up) that a helper of the parent made meanwhile (see `netns`);
//!  4. wait until the parent has joined us to every cgroup (v1 needs a migration; v2 had
//!     us born there) and filled the Landlock ruleset, then unshare the cgroup namespace
//!     so its root is the job's cgroup;
//!  5. every capability set cleared, no_new_privs;
//!  6. Landlock: the parent's ruleset (every right the kernel's ABI has, granted per
//!     policy path and port) plus rules for what this process mounted itself;
//!  7. init: this process stays as pid 1 (reaps, forwards signals, reports the exit) and
//!     forks the job's main process, which installs seccomp last and execs.

pub mod handshake;
mod identity;
mod init;
mod landlock;
mod mounts;
pub mod netns;
pub mod seccomp;

pub use landlock::LandlockPlan;
pub use mounts::MountOp;

use std::ffi::CString;
use std::os::fd::RawFd;

/// Everything the child needs, prepared by the parent before clone.
#[derive(Debug)]
pub struct SandboxPlan {
    /// Host directory the job's new root (a tmpfs) is mounted on, in the child's mount
    /// namespace only, and that tmpfs's options.
    pub root: CString,
    pub root_options: CString,
    /// What the new root receives, in order, relative to it (see `job::rootfs`).
    pub mount_ops: Vec<MountOp>,
    /// A detached clone of the workspace mount (open_tree, by the parent), idmapped when
    /// the workspace owner differs from the job's host user; `MountOp::MoveTree`
    /// attaches it.
    pub workspace_tree: Option<RawFd>,
    pub hostname: CString,
    /// Ids inside the job's user namespace.
    pub uid: u32,
    pub gid: u32,
    pub cwd: CString,
    pub landlock: LandlockPlan,
    pub seccomp: seccomp::SeccompProgram,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// Paths to try for the command, in order: itself if it contains '/', else each
    /// directory of the job's PATH joined with it.
    pub exec_candidates: Vec<CString>,
    /// `host`: the job stays in agentd's network namespace (no helper makes one).
    pub net_mode: crate::net::NetMode,
    /// `agentd run`: the job dies with agentd (parent-death signal), so nothing outlives
    /// its supervisor unobserved. The daemon leaves it off: its jobs outlive a daemon
    /// restart and are adopted again.
    pub die_with_parent: bool,
    /// The daemon's jobs: stdin from /dev/null, stdout and stderr through pipes that init
    /// copies into log files, capped. None: the job inherits agentd's stdio.
    pub output: Option<OutputRelay>,
    /// The descriptor limit (soft, hard) the job's main process gets, where agentd's own
    /// differs from what a job should inherit (the daemon raises its own).
    pub nofile: Option<(u64, u64)>,
    /// Test builds only: the setup step to fail at.
    pub fault: Option<Step>,
    /// The EEVDF slice the parent gives the job's init before releasing it (inherited
    /// by every process of the job): a fair job that asked for its own slice, on a
    /// kernel that honours one.
    pub eevdf_slice: Option<u64>,
    /// SCHED_DEADLINE (runtime, deadline, period in ns) for the job's main process, set
    /// by the supervisor once init has forked it (`--kernel-deadline`).
    pub kernel_deadline: Option<(u64, u64, u64)>,
}

/// Descriptors the parent opened for a job whose output goes to log files (see
/// `init`): init holds the logs, so output is kept even while no daemon runs.
#[derive(Debug, Clone, Copy)]
pub struct OutputRelay {
    /// /dev/null, the main process's stdin.
    pub stdin: RawFd,
    pub stdout_log: RawFd,
    pub stderr_log: RawFd,
    /// Bytes kept per stream; the rest is read and dropped, and the log says so.
    pub cap: u64,
}

/// Declares `Step` and the table that decodes its codes, from one list.
macro_rules! steps {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Where the child is in its setup; sent to the parent when a step fails.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Step {
            $($(#[$doc])* $name,)*
        }

        impl Step {
            const ALL: &'static [Step] = &[$(Step::$name,)*];
        }
    };
}

steps! {
    ParentDeathSignal,
    AfterHandshake,
    PrivateMounts,
    RootTmpfs,
    EnterRoot,
    Securebits,
    DropGroups,
    SetGid,
    SetUid,
    /// `index` is the position in `SandboxPlan::mount_ops`.
    MountOp,
    PivotRoot,
    DetachHostRoot,
    EnterSlash,
    RootReadOnly,
    AfterMounts,
    Hostname,
    Loopback,
    NetNamespace,
    CgroupNamespace,
    BoundingSet,
    AmbientCaps,
    Capset,
    NoNewPrivs,
    WorkingDirectory,
    /// `index` is the position in `LandlockPlan::child_rules`.
    LandlockRule,
    LandlockRestrict,
    LandlockMissing,
    AfterLandlock,
    ForkMain,
    OutputPipes,
    Seccomp,
}

impl Step {
    /// The step a code sent by the child stands for.
    pub fn from_code(code: u32) -> Option<Step> {
        Step::ALL.get(code as usize).copied()
    }

    /// The step a test build's AGENTD_FAULT names, if it names one of the child's.
    pub fn from_fault_name(name: &str) -> Option<Step> {
        match name {
            "after-handshake" => Some(Step::AfterHandshake),
            "after-mounts" => Some(Step::AfterMounts),
            "after-landlock" => Some(Step::AfterLandlock),
            _ => None,
        }
    }
}

impl SandboxPlan {
    /// Words for a failed step, for the one-line message and the report (parent side).
    pub fn describe(&self, step: Step, index: usize) -> String {
        match step {
            Step::ParentDeathSignal => "set the parent-death signal".into(),
            Step::AfterHandshake | Step::AfterMounts | Step::AfterLandlock => {
                format!("{step:?} (injected fault)")
            }
            Step::PrivateMounts => "make the mount namespace private".into(),
            Step::RootTmpfs => "mount the job's root tmpfs".into(),
            Step::EnterRoot => "enter the new root".into(),
            Step::Securebits => "lock the securebits".into(),
            Step::DropGroups => "drop supplementary groups".into(),
            Step::SetGid => format!("switch to gid {}", self.gid),
            Step::SetUid => format!("switch to uid {}", self.uid),
            Step::MountOp => self
                .mount_ops
                .get(index)
                .map_or_else(|| "a mount step".into(), MountOp::describe),
            Step::PivotRoot => "pivot_root into the new root".into(),
            Step::DetachHostRoot => "detach the host's root".into(),
            Step::EnterSlash => "enter /".into(),
            Step::RootReadOnly => "make the root read-only".into(),
            Step::Hostname => "set the hostname".into(),
            Step::Loopback => "bring up loopback".into(),
            Step::NetNamespace => "join the network namespace the helper made".into(),
            Step::CgroupNamespace => "create the cgroup namespace".into(),
            Step::BoundingSet => "clear the capability bounding set".into(),
            Step::AmbientCaps => "clear the ambient capabilities".into(),
            Step::Capset => "clear the capability sets".into(),
            Step::NoNewPrivs => "set no_new_privs".into(),
            Step::WorkingDirectory => {
                format!("enter the working directory {}", self.cwd.to_string_lossy())
            }
            Step::LandlockRule => match self.landlock.child_rules.get(index) {
                Some((path, _)) => format!("add a Landlock rule for {}", path.to_string_lossy()),
                None => "add a Landlock rule".into(),
            },
            Step::LandlockRestrict => "enforce Landlock".into(),
            Step::LandlockMissing => {
                "enforce Landlock: the kernel has none and no downgrade was asked for".into()
            }
            Step::ForkMain => "fork the job's main process".into(),
            Step::OutputPipes => "create the output pipes and the signalfd of init".into(),
            Step::Seccomp => "install the seccomp filter".into(),
        }
    }
}

/// A failed setup step: which, where in the plan, and the errno.
#[derive(Debug, Clone, Copy)]
pub struct SetupError {
    pub step: Step,
    pub index: u32,
    pub errno: i32,
}

/// The errno of the last failed call, read without allocating.
pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Fails `step` with the current errno when `r` is negative.
pub(crate) fn check(r: libc::c_long, step: Step) -> Result<libc::c_long, SetupError> {
    if r < 0 {
        Err(SetupError {
            step,
            index: 0,
            errno: errno(),
        })
    } else {
        Ok(r)
    }
}

/// fork(2) as a raw clone: glibc's fork runs atfork handlers and takes the malloc
/// locks, which a copy of a multithreaded process may hold forever. Returns 0 in the
/// child, the child's pid in the parent, negative on error.
pub fn raw_fork() -> libc::c_long {
    // SAFETY: clone with only an exit signal behaves as fork; the caller's child must
    // stay allocation-free until it execs or exits.
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    }
}

/// Pipe ends the child holds.
pub struct ChildPipes {
    pub sync_read: RawFd,
    pub status_write: RawFd,
    /// The socket the network-namespace helper sends the job's namespace on.
    pub netns: RawFd,
}

/// The NULL-terminated argument and environment arrays for execve, built by the parent
/// before clone (the child may not allocate).
pub struct ExecArrays {
    pub argv: Vec<*const libc::c_char>,
    pub envp: Vec<*const libc::c_char>,
}

impl ExecArrays {
    pub fn new(plan: &SandboxPlan) -> ExecArrays {
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        ExecArrays {
            argv: ptrs(&plan.argv),
            envp: ptrs(&plan.envp),
        }
    }
}

/// Entry point of the cloned child. Never returns.
pub fn child_main(plan: &SandboxPlan, exec: &ExecArrays, pipes: ChildPipes) -> ! {
    match setup(plan, exec, &pipes) {
        Ok(never) => match never {},
        Err(e) => {
            handshake::send_setup_failed(pipes.status_write, e);
            // SAFETY: leaving the child without running the parent's destructors.
            unsafe { libc::_exit(125) }
        }
    }
}

/// Blocks until the parent writes one byte; exits quietly on EOF (the parent failed and
/// reports that itself).
pub(super) fn wait_for_parent(sync_read: RawFd) {
    let mut byte = [0u8; 1];
    // SAFETY: reading one byte into a local buffer.
    if unsafe { libc::read(sync_read, byte.as_mut_ptr().cast(), 1) } != 1 {
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(125) };
    }
}

fn fault_point(plan: &SandboxPlan, step: Step) -> Result<(), SetupError> {
    if plan.fault == Some(step) {
        return Err(SetupError {
            step,
            index: 0,
            errno: libc::EIO,
        });
    }
    Ok(())
}

fn set_parent_death_signal(plan: &SandboxPlan) -> Result<(), SetupError> {
    if plan.die_with_parent {
        // SAFETY: prctl with integer arguments.
        check(
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) }.into(),
            Step::ParentDeathSignal,
        )?;
    }
    Ok(())
}

fn setup(
    plan: &SandboxPlan,
    exec: &ExecArrays,
    pipes: &ChildPipes,
) -> Result<std::convert::Infallible, SetupError> {
    // 1. If agentd run dies, so does the job: nothing may outlive its supervisor
    //    unobserved. (The daemon's jobs outlive it; a new daemon adopts them.)
    set_parent_death_signal(plan)?;
    // Handshake step 2: one byte means the parent has written our id maps; EOF means
    // it gave up, and we must not run anything.
    wait_for_parent(pipes.sync_read);
    fault_point(plan, Step::AfterHandshake)?;

    // 2. The filesystem view: an empty root, then (as the job's user, so what is
    //    created there is owned by an id the namespace maps) its contents, then pivot.
    mounts::enter_new_root(plan)?;
    identity::become_job_user(plan.uid, plan.gid)?;
    // The uid change cleared the parent-death signal (the kernel does that on any
    // credential change): set it again. Had agentd died meanwhile, the next wait for the
    // parent sees EOF.
    set_parent_death_signal(plan)?;
    mounts::populate_root(plan)?;
    fault_point(plan, Step::AfterMounts)?;

    // 3. Hostname and loopback: the job's UTS and network namespaces start bare.
    let name = plan.hostname.as_bytes();
    // SAFETY: name points at len valid bytes.
    check(
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }.into(),
        Step::Hostname,
    )?;
    // Join the network namespace the parent's helper made meanwhile (loopback is up);
    // in `host` mode there is none: the job keeps the host's network.
    if plan.net_mode != crate::net::NetMode::Host {
        netns::join(pipes.netns)?;
    }

    // 4. Handshake step 3: the parent joined us to the v1 cgroups and filled the Landlock
    //    ruleset meanwhile (a v1 migration costs an RCU grace period, so it overlaps the
    //    work above). No job code has run.
    wait_for_parent(pipes.sync_read);
    // With `--kernel-deadline` the main process waits for the parent once more, after
    // the fork, while the parent puts it under SCHED_DEADLINE: it keeps the pipe.
    let hold = if plan.kernel_deadline.is_some() {
        pipes.sync_read
    } else {
        // SAFETY: closing our copy of a pipe fd we own.
        unsafe { libc::close(pipes.sync_read) };
        -1
    };
    // A cgroup namespace rooted at the job's cgroup, now that we are inside all of them.
    // SAFETY: unshare with a constant flag.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWCGROUP) }.into(),
        Step::CgroupNamespace,
    )?;

    // 5. No capability survives this; no execve can grant one again.
    identity::drop_capabilities()?;

    // 6. Landlock, while the paths it names can still be opened.
    // SAFETY: chdir to a valid C path.
    check(
        unsafe { libc::chdir(plan.cwd.as_ptr()) }.into(),
        Step::WorkingDirectory,
    )?;
    landlock::restrict(&plan.landlock)?;
    fault_point(plan, Step::AfterLandlock)?;

    // 7. Become the job's init; the main process installs seccomp and execs.
    init::run(plan, exec, pipes.status_write, hold)
}

#[cfg(test)]
mod tests {
    use super::Step;

    #[test]
    fn every_step_code_round_trips() {
        let mut code = 1;
        while let Some(step) = Step::from_code(code) {
            assert_eq!(step as u32, code);
            code += 1;
        }
        assert_eq!(
            code - 1,
            Step::Seccomp as u32,
            "Step::from_code misses a step"
        );
    }
}
