//! Child side only: the code between clone3 and execve, in the order it runs.
//!
//! The parent hands over a [`SandboxPlan`] (everything already validated and resolved);
//! the child only carries it out. agentd is single-threaded when it clones, so the child
//! may allocate; it must not return into the parent's code paths, so every way out is
//! `_exit`.
//!
//! Order, and why:
//!  1. die with the parent, then wait for it to write the id maps;
//!  2. (see 4)
//!  3. mount namespace made private, then a fresh root: only the policy's paths, the
//!     workspace, /proc, a minimal /dev, a private /tmp; pivot_root into it. Midway the
//!     process becomes the job's uid/gid (an unprivileged host user, no supplementary
//!     groups) with securebits locked, keeping its namespace capabilities to finish;
//!  4. hostname and loopback in the job's own UTS and network namespaces; then wait
//!     until the parent has joined us to every cgroup (v1 needs a migration; v2 had us
//!     born there), and unshare the cgroup namespace so its root is the job's cgroup;
//!  5. every capability set cleared, no_new_privs;
//!  6. Landlock: every right the kernel's ABI has, granted per path and port;
//!  7. init: this process stays as pid 1 (reaps, forwards signals, reports the exit) and
//!     forks the job's main process, which installs seccomp last and execs.

pub mod handshake;
mod identity;
mod init;
mod landlock;
mod mounts;
pub mod seccomp;

pub use landlock::{LandlockAccess, LandlockPlan, landlock_rights_dropped};

use crate::spec::Access;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// A path bound into the job's root at the same place.
#[derive(Debug, Clone)]
pub struct BindMount {
    pub path: PathBuf,
    pub access: Access,
}

/// Everything the child needs, prepared by the parent before clone.
#[derive(Debug)]
pub struct SandboxPlan {
    /// Host directory the job's new root (a tmpfs) is mounted on, in the child's mount
    /// namespace only.
    pub root: PathBuf,
    /// Sorted so that a parent directory is bound before anything beneath it.
    pub binds: Vec<BindMount>,
    pub workspace: Option<PathBuf>,
    /// A detached, idmapped clone of the workspace mount (open_tree), when the workspace
    /// owner differs from the job's host user.
    pub workspace_tree: Option<RawFd>,
    pub hostname: String,
    /// Ids inside the job's user namespace.
    pub uid: u32,
    pub gid: u32,
    pub cwd: PathBuf,
    pub landlock: LandlockPlan,
    pub seccomp: seccomp::SeccompProgram,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// Directories searched for a command without '/' (the job's PATH).
    pub search_path: Vec<PathBuf>,
    /// Size of the private /tmp in bytes (tmpfs `size=`), if limited.
    pub tmp_size: Option<u64>,
    /// Test builds only: the setup step to fail at.
    pub fault: Option<String>,
}

/// A failed setup step: what was being done and the errno (0 when `step` already says
/// everything, as the landlock crate's messages do).
#[derive(Debug)]
pub struct SetupError {
    pub step: String,
    pub errno: i32,
}

pub(crate) fn fail(step: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> SetupError {
    let step = step.into();
    move |e| SetupError {
        step,
        errno: e as i32,
    }
}

pub(crate) fn fail_io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> SetupError {
    let step = step.into();
    move |e| SetupError {
        step,
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Pipe ends the child holds.
pub struct ChildPipes {
    pub sync_read: RawFd,
    pub status_write: RawFd,
}

/// Entry point of the cloned child. Never returns.
pub fn child_main(plan: &SandboxPlan, pipes: ChildPipes) -> ! {
    match setup(plan, &pipes) {
        Ok(never) => match never {},
        Err(e) => {
            handshake::send(
                pipes.status_write,
                handshake::MSG_SETUP_FAILED,
                e.errno,
                e.step.as_bytes(),
            );
            // SAFETY: leaving the child without running the parent's destructors.
            unsafe { libc::_exit(125) }
        }
    }
}

/// Blocks until the parent writes one byte; exits quietly on EOF (the parent failed and
/// reports that itself).
fn wait_for_parent(sync_read: RawFd) {
    let mut byte = [0u8; 1];
    // SAFETY: reading one byte into a local buffer.
    if unsafe { libc::read(sync_read, byte.as_mut_ptr().cast(), 1) } != 1 {
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(125) };
    }
}

fn fault_point(plan: &SandboxPlan, step: &str) -> Result<(), SetupError> {
    if plan.fault.as_deref() == Some(step) {
        return Err(SetupError {
            step: format!("{step} (injected fault)"),
            errno: libc::EIO,
        });
    }
    Ok(())
}

fn setup(plan: &SandboxPlan, pipes: &ChildPipes) -> Result<std::convert::Infallible, SetupError> {
    // 1. If agentd dies, so does the job: nothing may outlive its supervisor unobserved.
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(fail("set the parent-death signal")(
            nix::errno::Errno::last(),
        ));
    }
    // Handshake step 2: one byte means the parent has written our id maps; EOF means
    // it gave up, and we must not run anything.
    wait_for_parent(pipes.sync_read);
    fault_point(plan, "after-handshake")?;

    // 3. The filesystem view: an empty root, then (as the job's user, so what is
    //    created there is owned by an id the namespace maps) its contents, then pivot.
    mounts::enter_new_root(plan)?;
    identity::become_job_user(plan.uid, plan.gid)?;
    mounts::populate_root(plan)?;
    fault_point(plan, "after-mounts")?;

    // 4. Hostname and loopback: the job's UTS and network namespaces start bare.
    nix::unistd::sethostname(&plan.hostname).map_err(fail("set the hostname"))?;
    mounts::loopback_up()?;

    // Handshake step 3: the parent joined us to the v1 cgroups meanwhile (a migration
    // costs an RCU grace period, so it overlaps the work above). No job code has run.
    wait_for_parent(pipes.sync_read);
    // SAFETY: closing our copy of a pipe fd we own.
    unsafe { libc::close(pipes.sync_read) };
    // A cgroup namespace rooted at the job's cgroup, now that we are inside all of them.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(fail("create the cgroup namespace"))?;

    // 5. No capability survives this; no execve can grant one again.
    identity::drop_capabilities()?;

    // 6. Landlock, while the paths are still open-able by name.
    std::env::set_current_dir(&plan.cwd).map_err(fail_io(format!(
        "enter the working directory {}",
        plan.cwd.display()
    )))?;
    landlock::restrict(&plan.landlock)?;
    fault_point(plan, "after-landlock")?;

    // 7. Become the job's init; the main process installs seccomp and execs.
    init::run(plan, pipes.status_write)
}
