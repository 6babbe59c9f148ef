//! Start: clone3 into the job's namespaces (and its cgroup), then the parent's half of
//! the handshake (see `sandbox::handshake` for the numbered steps).

use super::landlock::JobRuleset;
use super::plan::JobIds;
use crate::cgroup::JobCgroup;
use crate::mount_api;
use crate::sandbox::{ChildPipes, ExecArrays, SandboxPlan, child_main};
use crate::spec::Access;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::path::PathBuf;

/// The namespaces every job gets. (cgroup: unshared by the child once it is inside its
/// cgroups, so that cgroup is its namespace root.)
pub const NAMESPACES: &[&str] = &["user", "pid", "mount", "net", "ipc", "uts", "cgroup"];

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// A started job: its init's pid (in agentd's namespace), pidfd and status pipe.
/// Dropping it before it was reaped kills and reaps it.
pub struct Child {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub status: File,
    pub reaped: bool,
    /// `proxy` mode: the proxy's endpoints, bound inside the job's network namespace
    /// before the job could run anything; whoever supervises the job serves them.
    pub proxy: Option<crate::net::ProxyListeners>,
}

impl Child {
    pub fn signal(&self, sig: i32) {
        // SAFETY: pidfd_send_signal on our own child's pidfd; no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    /// Gives up ownership without killing: (pid, pidfd, status channel). For the daemon,
    /// whose jobs must outlive the object that started them. (Take `proxy` first.)
    pub fn into_parts(self) -> (i32, OwnedFd, File) {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: each field is read out exactly once and `me` is never dropped, so
        // nothing is closed twice (the proxy endpoints, if not taken, are closed here).
        unsafe {
            drop(std::ptr::read(&me.proxy));
            (
                me.pid,
                std::ptr::read(&me.pidfd),
                std::ptr::read(&me.status),
            )
        }
    }

    /// Waits for the child; returns (si_code, si_status).
    pub fn wait(&mut self) -> (i32, i32) {
        loop {
            // SAFETY: siginfo_t is plain data the kernel fills in.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid(P_PIDFD) on our child's pidfd.
            let r = unsafe {
                libc::waitid(
                    libc::P_PIDFD,
                    self.pidfd.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED,
                )
            };
            if r == 0 {
                self.reaped = true;
                // SAFETY: for CLD_* codes si_status is the valid union member.
                return (info.si_code, unsafe { info.si_status() });
            }
            if nix::errno::Errno::last() != nix::errno::Errno::EINTR {
                self.reaped = true;
                return (libc::CLD_KILLED, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(libc::SIGKILL);
            self.wait();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0}: {1}")]
    Sys(&'static str, std::io::Error),
    #[error(
        "cannot idmap the workspace {path} for uid {uid}: {source} (its filesystem may not support idmapped mounts; make the workspace owned by the job's user or set user.uid in the policy)"
    )]
    Idmap {
        path: String,
        uid: u32,
        source: std::io::Error,
    },
    #[error("{0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("{0}")]
    Landlock(String),
    #[error("cannot set the job's kernel scheduling: {0}")]
    Sched(String),
    #[error("injected fault at {0}")]
    Fault(&'static str),
}

fn last(what: &'static str) -> SpawnError {
    SpawnError::Sys(what, std::io::Error::last_os_error())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last("pipe2"));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A detached clone of the workspace mount, to be idmapped once the job's user
/// namespace exists. Opened before clone so the child inherits the fd.
pub fn open_workspace_tree(workspace: &Path) -> Result<OwnedFd, SpawnError> {
    let c = std::ffi::CString::new(workspace.as_os_str().as_encoded_bytes())
        .map_err(|_| SpawnError::Sys("workspace path", std::io::ErrorKind::InvalidInput.into()))?;
    mount_api::clone_tree(&c).map_err(|e| SpawnError::Sys("open_tree(workspace)", e))
}

/// The Landlock rules the parent adds while the child builds its root.
pub struct LandlockWork {
    pub ruleset: JobRuleset,
    pub paths: Vec<(PathBuf, Access)>,
    /// Rules on objects that have no host path (a review workspace's overlay root).
    pub fd_rules: Vec<(OwnedFd, Access)>,
    pub tcp_bind: Vec<u16>,
    pub tcp_connect: Vec<u16>,
}

pub fn spawn(
    plan: &SandboxPlan,
    cgroup: &dyn JobCgroup,
    ids: &JobIds,
    workspace: Option<&Path>,
    landlock: Option<LandlockWork>,
    status_file: Option<&Path>,
    fault: Option<&str>,
) -> Result<Child, SpawnError> {
    let (sync_read, sync_write) = pipe()?;
    // The child's account (setup failure, exec failure, exit status): a pipe for `agentd
    // run`; for the daemon a file, which outlives a daemon restart so that a job adopted
    // by the next daemon still reports how it ended.
    let (status_read, status_write) = match status_file {
        None => pipe()?,
        Some(path) => status_file_ends(path)?,
    };
    let (net_helper_end, net_child_end) = socketpair()?;
    // `proxy` mode: the helper sends the namespace here as well.
    let wants_netns = plan.net_mode == crate::net::NetMode::Proxy;
    let (net_parent_end, net_helper_parent_end) = if wants_netns {
        let (a, b) = socketpair()?;
        (Some(a), Some(b))
    } else {
        (None, None)
    };
    // Built before clone: the child may not allocate.
    let exec = ExecArrays::new(plan);

    // Handshake 1: clone3 into new namespaces, born in the v2 cgroup where there is one.
    let mut pidfd: RawFd = -1;
    // SAFETY: clone_args is plain data; zero is the neutral value of every field.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    // No CLONE_NEWNET: a helper makes the network namespace concurrently (sandbox::netns).
    args.flags = (libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS) as u64
        | libc::CLONE_PIDFD as u64;
    args.pidfd = &mut pidfd as *mut RawFd as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    if let Some(fd) = cgroup.clone_into_fd() {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd as u64;
    }
    // SAFETY: the child is a copy of this process without CLONE_VM; it runs only
    // child_main, which allocates nothing and takes no lock (so other threads of this
    // process, whose locks the copy may hold, do not matter) and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if pid == 0 {
        // SAFETY: closing the parent's pipe ends in the child, without Drop (no
        // allocation, and the parent's objects are not ours to destroy).
        unsafe {
            libc::close(sync_write.as_raw_fd());
            libc::close(status_read.as_raw_fd());
            libc::close(net_helper_end.as_raw_fd());
            if let (Some(a), Some(b)) = (&net_parent_end, &net_helper_parent_end) {
                libc::close(a.as_raw_fd());
                libc::close(b.as_raw_fd());
            }
        }
        let pipes = ChildPipes {
            sync_read: sync_read.as_raw_fd(),
            status_write: status_write.as_raw_fd(),
            netns: net_child_end.as_raw_fd(),
        };
        child_main(plan, &exec, pipes);
    }
    if pid < 0 {
        return Err(last("clone3 into the job's namespaces"));
    }
    drop(sync_read);
    drop(status_write);
    drop(net_child_end);
    // The network-namespace helper: forked now, it works while we write the id maps
    // and the child builds its root. (`host` mode: none; the job keeps our network.)
    let userns_path = std::ffi::CString::new(format!("/proc/{pid}/ns/user")).expect("no NUL");
    let helper = if plan.net_mode == crate::net::NetMode::Host {
        0
    } else {
        // The helper runs only netns::helper_main (allocation-free) and exits.
        let helper = crate::sandbox::raw_fork();
        if helper == 0 {
            let to_parent = net_helper_parent_end.as_ref().map_or(-1, |f| f.as_raw_fd());
            crate::sandbox::netns::helper_main(&userns_path, net_helper_end.as_raw_fd(), to_parent);
        }
        helper
    };
    drop(net_helper_end);
    drop(net_helper_parent_end);
    let helper = Helper(helper as libc::pid_t);
    let mut child = Child {
        pid: pid as i32,
        // SAFETY: the kernel stored a fresh pidfd for the child.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        status: File::from(status_read),
        reaped: false,
        proxy: None,
    };
    let landlock = landlock.map(|mut work| {
        drop(work.ruleset.child_fd.take()); // the child has its copy
        work
    });

    // Handshake 2: id maps, idmapped workspace; then release the child to build its root.
    // Any error drops `child` (killed and reaped) and `sync_write` (the child sees EOF).
    std::fs::write(
        format!("/proc/{pid}/uid_map"),
        format!("{} {} 1\n", ids.uid, ids.host_uid),
    )
    .map_err(|e| SpawnError::Sys("write uid_map", e))?;
    std::fs::write(
        format!("/proc/{pid}/gid_map"),
        format!("{} {} 1\n", ids.gid, ids.host_gid),
    )
    .map_err(|e| SpawnError::Sys("write gid_map", e))?;
    if let (Some(tree), Some(ws), true) = (plan.workspace_tree, workspace, ids.workspace_idmapped) {
        idmap(tree, child.pid).map_err(|source| SpawnError::Idmap {
            path: ws.display().to_string(),
            uid: ids.host_uid,
            source,
        })?;
    }
    // The job's EEVDF slice, on its init before it runs anything: every process of the
    // job inherits it at fork.
    if let Some(slice) = plan.eevdf_slice {
        crate::sched::attr::set_eevdf_slice(child.pid, slice).map_err(SpawnError::Sched)?;
    }
    if fault == Some("after-clone") {
        return Err(SpawnError::Fault("after-clone"));
    }
    // A child that already failed its setup has closed its end (EPIPE): return it, so
    // the supervisor collects its own account of what failed.
    if !release(&sync_write)? {
        return Ok(child);
    }
    // Handshake 3, while the child builds its root: the proxy's endpoints inside the
    // job's network namespace (before the job can run anything, so its first connection
    // finds them), the policy's Landlock rules into the shared ruleset, the v1 cgroups;
    // then let the child go on to exec.
    if let Some(sock) = &net_parent_end {
        let netns = crate::sandbox::netns::recv_fd(sock.as_raw_fd()).map_err(|e| {
            SpawnError::Sys(
                "receive the job's network namespace from the helper",
                std::io::Error::from_raw_os_error(e),
            )
        })?;
        // SAFETY: the descriptor was just received and is owned by nobody else.
        let netns = unsafe { OwnedFd::from_raw_fd(netns) };
        child.proxy = Some(
            crate::net::listeners::open_in(std::os::fd::AsFd::as_fd(&netns))
                .map_err(|e| SpawnError::Sys("open the proxy endpoints", e))?,
        );
    }
    if let Some(work) = landlock {
        work.ruleset
            .add_policy_rules(
                &work.paths,
                work.fd_rules,
                &work.tcp_bind,
                &work.tcp_connect,
            )
            .map_err(SpawnError::Landlock)?;
    }
    cgroup.attach(child.pid)?;
    release(&sync_write)?;
    drop(helper);
    // Handshake 4, `--kernel-deadline` only: SCHED_DEADLINE on the main process, which
    // init has forked and which waits on the pipe before it execs (only the supervisor
    // may set it: it needs CAP_SYS_NICE in the host's namespace). A refusal fails the
    // job before any of its code ran (fail closed), with the kernel's reason explained.
    if let Some((runtime, deadline, period)) = plan.kernel_deadline {
        let main =
            crate::sched::attr::main_process_of(child.pid, std::time::Duration::from_secs(5))
                .ok_or_else(|| {
                    SpawnError::Sched(
                        "--kernel-deadline: the job's main process did not appear within 5 s"
                            .into(),
                    )
                })?;
        crate::sched::attr::set_deadline(main, runtime, deadline, period)
            .map_err(SpawnError::Sched)?;
        release(&sync_write)?;
    }
    Ok(child)
}

/// The network-namespace helper, reaped on drop (it has finished, or fails fast).
struct Helper(libc::pid_t);

impl Drop for Helper {
    fn drop(&mut self) {
        if self.0 > 0 {
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(self.0, std::ptr::null_mut(), 0) };
        }
    }
}

/// Both ends of a status file: the child appends, the parent reads.
fn status_file_ends(path: &Path) -> Result<(OwnedFd, OwnedFd), SpawnError> {
    use std::os::unix::fs::OpenOptionsExt;
    let write = std::fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| SpawnError::Sys("create the job's status file", e))?;
    let read = File::open(path).map_err(|e| SpawnError::Sys("open the job's status file", e))?;
    Ok((OwnedFd::from(read), OwnedFd::from(write)))
}

fn socketpair() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(last("socketpair"));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Writes one byte to the child; false if it is already gone.
fn release(sync_write: &OwnedFd) -> Result<bool, SpawnError> {
    // SAFETY: writing one byte from a static buffer to our pipe.
    if unsafe { libc::write(sync_write.as_raw_fd(), b"1".as_ptr().cast(), 1) } == 1 {
        return Ok(true);
    }
    match nix::errno::Errno::last() {
        nix::errno::Errno::EPIPE => Ok(false),
        _ => Err(last("release the child")),
    }
}

/// Attaches the job's user namespace to the detached workspace mount as its idmap.
fn idmap(tree: RawFd, pid: i32) -> std::io::Result<()> {
    let userns = File::open(format!("/proc/{pid}/ns/user"))?;
    let flags = libc::AT_EMPTY_PATH as u32 | mount_api::AT_RECURSIVE;
    mount_api::mount_setattr(
        tree,
        c"",
        flags,
        mount_api::MOUNT_ATTR_IDMAP,
        Some(userns.as_raw_fd()),
    )
}
