//! Spawner processes: where the daemon's jobs are cloned from.
//!
//! Cloning a job copies the cloning process's page tables, and while the job's init
//! lives it shares every page of that process copy-on-write. The daemon is large and
//! multithreaded (its runtime, the store, a thousand jobs' state): cloning from it costs
//! a page-table copy, TLB shootdowns to its other threads, and a copy-on-write fault for
//! each page it touches afterwards, for every job. So the daemon starts a few spawners,
//! fresh `agentd __spawner` processes (exec'd, so they share nothing), each small and
//! single-threaded, and hands each job to one of them. A spawner runs the same pipeline
//! as `agentd run` (validate, allocate, spawn) and answers with the job's facts and a
//! pidfd of its init (SCM_RIGHTS). The job's init is the spawner's child; the spawner
//! reaps it, and the daemon watches it through the pidfd and its status file, as it
//! watches jobs it adopted after a restart.
//!
//! Protocol: one SOCK_SEQPACKET message per request (JSON `SpawnRequest`), one per
//! reply (JSON `SpawnReply`, with the pidfd attached when it is `Started`, followed by
//! the three proxy endpoints of a `proxy` job: HTTP, SOCKS5, DNS).

use super::JobRuntime;
use crate::job::{self, RunOptions, report, spawn};
use crate::sandbox::OutputRelay;
use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Largest message either side sends (a reply carries the job's report).
const MAX_MESSAGE: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub struct SpawnRequest {
    pub id: String,
    pub options: RunOptions,
    /// The daemon's runtime directory (jobs' root mount points).
    pub runtime_dir: PathBuf,
    /// The daemon's state directory (jobs' logs and status files).
    pub state_dir: PathBuf,
    /// The descriptor limit the job's main process gets.
    pub nofile: Option<(u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum SpawnReply {
    Started { pid: i32, runtime: Box<JobRuntime> },
    Failed { message: String },
}

/// The spawner's side: `agentd __spawner`, with its socket as stdin. Serves requests
/// until the daemon closes the socket; returns the exit status.
pub fn spawner_main() -> i32 {
    // SAFETY: fd 0 is the socket the daemon handed us; nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(0) };
    // exec'd as /proc/self/exe, whose name would be "exe".
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"agentd-spawner".as_ptr()) };
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        reap_children();
        // Wake at least every second to reap the inits of jobs that ended meanwhile.
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one valid descriptor in a local struct.
        if unsafe { libc::poll(&mut pfd, 1, 1000) } == 0 {
            continue;
        }
        let n = match recv_message(&sock, &mut buf) {
            Ok((0, _)) => return 0, // the daemon is gone
            Ok((n, _)) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                eprintln!("agentd spawner: cannot read from the daemon: {e}");
                return 1;
            }
        };
        let (reply, fds) = match serde_json::from_slice::<SpawnRequest>(&buf[..n]) {
            Ok(req) => match spawn_job(&req) {
                Ok(job) => {
                    let mut fds = vec![job.pidfd];
                    fds.extend(job.proxy.map(|p| p.into_fds()).into_iter().flatten());
                    (
                        SpawnReply::Started {
                            pid: job.pid,
                            runtime: Box::new(job.runtime),
                        },
                        fds,
                    )
                }
                Err(message) => (SpawnReply::Failed { message }, Vec::new()),
            },
            Err(e) => (
                SpawnReply::Failed {
                    message: format!("the spawner could not read the request: {e}"),
                },
                Vec::new(),
            ),
        };
        let text = serde_json::to_vec(&reply).expect("reply serializes");
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        if let Err(e) = send_message(&sock, &text, &raw) {
            eprintln!("agentd spawner: cannot answer the daemon: {e}");
            return 1;
        }
    }
}

/// Reaps every job init that has ended (they are this process's children). Only here,
/// between requests: during a spawn the pipeline reaps its own helper by pid.
fn reap_children() {
    loop {
        // SAFETY: waitpid on any child, not blocking; the status is not needed (the
        // daemon learns how a job ended from its status file).
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r <= 0 {
            break;
        }
    }
}

fn recv_message(sock: &OwnedFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = c {
            for f in received {
                // SAFETY: the kernel installed this descriptor for us.
                fds.push(unsafe { OwnedFd::from_raw_fd(f) });
            }
        }
    }
    Ok((msg.bytes, fds))
}

fn send_message(sock: &OwnedFd, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [IoSlice::new(bytes)];
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(std::io::Error::from)?;
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The pipeline for one daemon job, in the spawner: validate, allocate, spawn, with the
/// daemon's differences (output to capped logs through the job's init, status in a
/// file, no parent-death signal, runtime directory and cgroup handed to the job).
/// A job a spawner started: what the daemon gets back.
pub struct SpawnedJob {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub runtime: JobRuntime,
    /// `proxy` mode: the endpoints in the job's network namespace, for the daemon to serve.
    pub proxy: Option<crate::net::ProxyListeners>,
}

fn spawn_job(req: &SpawnRequest) -> Result<SpawnedJob, String> {
    let id = req.id.as_str();
    let mut plan = job::plan::validate(req.options.clone()).map_err(|e| e.to_string())?;
    let fault = job::injected_fault();
    // Test builds: a slow start, so a test can act while a job is admitted but not yet
    // running.
    if fault.as_deref() == Some("slow-spawn") {
        std::thread::sleep(Duration::from_secs(1));
    }
    // The child's own steps too (test builds only), as for `agentd run`.
    plan.sandbox.fault = fault
        .as_deref()
        .and_then(crate::sandbox::Step::from_fault_name);
    let step_fault = |job: &str, step: &'static str| -> Result<(), crate::Error> {
        if fault.as_deref() == Some(step) {
            return Err(crate::Error::Pipeline {
                job: job.into(),
                step,
                message: "injected fault".into(),
            });
        }
        Ok(())
    };
    if plan.options.workspace_mode == crate::workspace::WorkspaceMode::Review {
        plan.review_layers = Some(crate::workspace::ReviewLayers::for_job(&req.state_dir, id));
    }
    let mut alloc =
        job::allocate(&mut plan, id, &req.runtime_dir, &step_fault).map_err(|e| e.to_string())?;
    let jobdir = req.state_dir.join("jobs").join(id);
    create_private_dir(&jobdir).map_err(|e| format!("create {}: {e}", jobdir.display()))?;
    let log = |name: &str| -> Result<std::fs::File, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = jobdir.join(name);
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| format!("create {}: {e}", path.display()))
    };
    let (stdout, stderr) = (log("stdout")?, log("stderr")?);
    let devnull = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    plan.sandbox.die_with_parent = false;
    plan.sandbox.nofile = req.nofile;
    plan.sandbox.output = Some(OutputRelay {
        stdin: devnull.as_raw_fd(),
        stdout_log: stdout.as_raw_fd(),
        stderr_log: stderr.as_raw_fd(),
        cap: plan.policy.lifecycle.log_cap,
    });
    let status_path = jobdir.join("status");
    let started_at = std::time::SystemTime::now();
    let child = spawn::spawn(
        &plan.sandbox,
        alloc.cgroup.as_ref(),
        &plan.ids,
        plan.workspace.as_deref(),
        alloc.landlock.take(),
        Some(&status_path),
        fault.as_deref(),
    )
    .map_err(|e| format!("start the job: {e}"))?;
    let mut child = child;
    let proxy = child.proxy.take();
    let (pid, pidfd, _status) = child.into_parts();
    let cgroup_report = report::CgroupReport::of(alloc.cgroup.as_ref());
    let cgroup_dirs = cgroup_report.dirs.clone();
    let placeholder_exit = report::JobExit::Exited(0);
    let placeholder = job::supervise::Outcome {
        si_code: 0,
        si_status: 0,
        messages: Vec::new(),
        timed_out: false,
        forwarded: Vec::new(),
    };
    let report = report::JobReport::new(
        &plan,
        report::RunFacts {
            job_id: id,
            started_at,
            wall: Duration::ZERO,
            exit: &placeholder_exit,
            outcome: &placeholder,
            usage: Default::default(),
            cgroup: cgroup_report,
        },
    );
    // The job owns its cgroup and runtime directory now; the daemon removes them when
    // it ends.
    alloc.cgroup.disown();
    let runtime = JobRuntime {
        rundir: alloc.rundir.keep().display().to_string(),
        jobdir: jobdir.display().to_string(),
        pid_start_ticks: super::recovery::start_ticks(pid),
        cgroup_dirs,
        timeout_ms: plan.limits.timeout.map(|t| t.as_millis() as u64),
        kill_grace_ms: plan.policy.lifecycle.kill_grace.as_millis() as u64,
        policy_durable: plan.policy.lifecycle.durable,
        cancel_reason: None,
        kill_at_ms: None,
        report: serde_json::to_string(&report).ok(),
        egress: (plan.egress.mode == crate::net::NetMode::Proxy).then(|| plan.egress.clone()),
        job_uid: plan.ids.host_uid,
        job_gid: plan.ids.host_gid,
        quotas: plan.policy.quotas,
        sched: Some(plan.sched),
        regions: Vec::new(),
    };
    Ok(SpawnedJob {
        pid,
        pidfd,
        runtime,
        proxy,
    })
}

/// The daemon's side: a pool of spawner processes.
pub struct SpawnerPool {
    idle: Mutex<Vec<Spawner>>,
    keeper: Mutex<std::sync::mpsc::Sender<SpawnerOrder>>,
    slots: tokio::sync::Semaphore,
}

struct Spawner {
    sock: OwnedFd,
    child: std::process::Child,
}

impl Drop for Spawner {
    fn drop(&mut self) {
        // Closing the socket ends it; reap it so no zombie stays.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one spawner. Only ever called on the keeper thread (see `keeper`): a
/// spawner dies with the thread that started it (parent-death signal), and that thread
/// lives as long as the daemon.
fn start_spawner() -> std::io::Result<Spawner> {
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let daemon = std::process::id() as libc::pid_t;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg("__spawner")
        .stdin(std::process::Stdio::from(theirs));
    // A spawner must not outlive the daemon: one still allocating a job when the daemon
    // dies would race the next daemon's recovery, which removes what the dead daemon
    // had not recorded as started. Killed with it, its half-made job is all the
    // recovery finds. (A job already cloned survives: it is not the spawner.)
    // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != daemon {
                return Err(std::io::Error::other("the daemon is gone"));
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok(Spawner { sock: ours, child })
}

type SpawnerOrder = std::sync::mpsc::Sender<std::io::Result<Spawner>>;

/// The one thread that starts spawners, for the daemon's whole life.
fn keeper() -> std::sync::mpsc::Sender<SpawnerOrder> {
    let (tx, rx) = std::sync::mpsc::channel::<SpawnerOrder>();
    std::thread::Builder::new()
        .name("agentd-keeper".into())
        .spawn(move || {
            for reply in rx {
                let _ = reply.send(start_spawner());
            }
        })
        .expect("start the spawner keeper thread");
    tx
}

impl SpawnerPool {
    /// A new spawner, started by the keeper thread (blocks briefly).
    fn new_spawner(&self) -> std::io::Result<Spawner> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.keeper
            .lock()
            .expect("keeper lock")
            .send(tx)
            .map_err(|_| std::io::Error::other("the spawner keeper is gone"))?;
        rx.recv()
            .map_err(|_| std::io::Error::other("the spawner keeper is gone"))?
    }

    /// Starts `n` spawners.
    pub fn start(n: usize) -> std::io::Result<SpawnerPool> {
        let keeper = keeper();
        let new = || -> std::io::Result<Spawner> {
            let (tx, rx) = std::sync::mpsc::channel();
            keeper
                .send(tx)
                .map_err(|_| std::io::Error::other("the spawner keeper is gone"))?;
            rx.recv()
                .map_err(|_| std::io::Error::other("the spawner keeper is gone"))?
        };
        let spawners = (0..n).map(|_| new()).collect::<Result<Vec<_>, _>>()?;
        Ok(SpawnerPool {
            idle: Mutex::new(spawners),
            keeper: Mutex::new(keeper),
            slots: tokio::sync::Semaphore::new(n),
        })
    }

    /// Has one spawner run the pipeline for `req`: the job's init pid, a pidfd of it,
    /// and what the daemon must remember; or why it failed (nothing remains then).
    pub async fn spawn(&self, req: SpawnRequest) -> Result<SpawnedJob, String> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| "the spawner pool is closed".to_owned())?;
        let spawner = match self.idle.lock().expect("spawner pool lock").pop() {
            Some(s) => s,
            None => self
                .new_spawner()
                .map_err(|e| format!("cannot start a spawner: {e}"))?,
        };
        let text = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        let (result, spawner) = tokio::task::spawn_blocking(move || {
            let r = exchange(&spawner, &text);
            (r, spawner)
        })
        .await
        .map_err(|e| format!("the spawn thread failed: {e}"))?;
        match result {
            Ok(reply) => {
                self.idle.lock().expect("spawner pool lock").push(spawner);
                reply
            }
            Err(e) => {
                // A broken spawner is replaced: drop it (killed, reaped), start another.
                drop(spawner);
                if let Ok(s) = self.new_spawner() {
                    self.idle.lock().expect("spawner pool lock").push(s);
                }
                Err(format!("the spawner failed: {e}"))
            }
        }
    }
}

/// One request and its reply, on a blocking thread.
fn exchange(spawner: &Spawner, text: &[u8]) -> std::io::Result<Result<SpawnedJob, String>> {
    send_message(&spawner.sock, text, &[])?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, fds) = recv_message(&spawner.sock, &mut buf)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the spawner exited",
        ));
    }
    let reply: SpawnReply = serde_json::from_slice(&buf[..n]).map_err(std::io::Error::other)?;
    let mut fds = fds.into_iter();
    Ok(match (reply, fds.next()) {
        (SpawnReply::Started { pid, runtime }, Some(pidfd)) => {
            let rest: Vec<OwnedFd> = fds.collect();
            let proxy = match <[OwnedFd; 3]>::try_from(rest) {
                Ok(three) => Some(crate::net::ProxyListeners::from_fds(three)),
                Err(rest) if rest.is_empty() => None,
                Err(_) => {
                    return Ok(Err(
                        "the spawner sent a partial set of proxy endpoints".into()
                    ));
                }
            };
            if runtime.egress.is_some() != proxy.is_some() {
                return Ok(Err(
                    "the spawner's proxy endpoints do not match the job's network mode".into(),
                ));
            }
            Ok(SpawnedJob {
                pid,
                pidfd,
                runtime: *runtime,
                proxy,
            })
        }
        (SpawnReply::Started { .. }, None) => Err("the spawner sent no pidfd".into()),
        (SpawnReply::Failed { message }, _) => Err(message),
    })
}
