//! Parent side: the creation pipeline, in the order the kernel creates a task.
//!
//!   validate  → policy, flags and host features become a `JobPlan`; nothing exists yet
//!   allocate  → job id, runtime directory, cgroup with limits (each undone on drop)
//!   guards    → agentd's own interrupt signals are blocked and read from a signalfd,
//!               so a Ctrl-C from here on goes through cleanup, never around it
//!   publish   → the job's state file appears in the runtime directory
//!   start     → clone3 into namespaces and cgroup, handshake, supervise
//!
//! A failure before start unwinds everything allocated so far (drop order does it); after
//! start, cancellation is SIGTERM, a grace period, then SIGKILL of the job's init, which
//! takes its whole pid namespace down.

mod landlock;
pub mod plan;
pub mod report;
mod rootfs;
pub mod selfview;
pub mod spawn;
mod stale;
pub mod supervise;

pub use plan::RunOptions;

use crate::Error;
use crate::cgroup;
use crate::workspace::WorkspaceMode;
use report::{CgroupReport, JobExit, JobReport};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

/// One line on agentd's stderr. A write error is ignored: `eprintln!` would panic (and,
/// with panic=abort, kill agentd before it removed the job's cgroup and runtime
/// directory) when the reader of our stderr went away.
pub fn say(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(line.as_bytes());
    let _ = err.write_all(b"\n");
}

/// Runs one job to completion; returns agentd's exit status.
pub fn run(options: RunOptions) -> i32 {
    match run_pipeline(options) {
        Ok(code) => code,
        Err(e) => {
            say(&format!("agentd: {e}"));
            e.exit_code()
        }
    }
}

/// The runtime directory of one job, locked while the job lives; removed on drop.
pub struct RuntimeDir {
    dir: PathBuf,
    _lock: std::fs::File,
}

impl RuntimeDir {
    fn create(base: &Path, id: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let jobs = base.join("jobs");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&jobs)?;
        let dir = jobs.join(id);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let _lock = match stale::lock(&dir) {
            Ok(lock) => lock,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        };
        let rd = RuntimeDir { dir, _lock };
        // The job's root is mounted here, in the job's mount namespace only.
        std::fs::DirBuilder::new().mode(0o755).create(rd.root())?;
        Ok(rd)
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Hands the directory to the job: it is no longer removed on drop (the daemon
    /// removes it when the job ends, whichever daemon process sees that).
    pub fn keep(self) -> PathBuf {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: each field is read out once and `me` is never dropped; the lock file
        // is closed here, the path returned.
        unsafe {
            drop(std::ptr::read(&me._lock));
            std::ptr::read(&me.dir)
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Writes state.json atomically.
    pub fn publish(&self, state: &serde_json::Value) -> std::io::Result<()> {
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(&tmp, state.to_string())?;
        std::fs::rename(tmp, self.dir.join("state.json"))
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A random 12-hex-digit job id.
pub fn new_job_id() -> String {
    let mut bytes = [0u8; 6];
    // SAFETY: getrandom writes at most 6 bytes into the local buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            ^ u64::from(std::process::id());
        bytes.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    crate::spec::hex(&bytes)
}

/// Test builds read AGENTD_FAULT to fail at a named pipeline step; release builds never do.
pub fn injected_fault() -> Option<String> {
    if cfg!(feature = "fault-injection") {
        std::env::var("AGENTD_FAULT").ok()
    } else {
        None
    }
}

/// What the allocate step made for one job; each part is undone when dropped, until the
/// job has started and its supervisor owns them.
pub struct Allocated {
    /// `agentd run`: the directory of the job's /run/agentd/self (the daemon's jobs have
    /// theirs in their socket directory).
    pub view: Option<selfview::ViewDir>,
    pub rundir: RuntimeDir,
    pub cgroup: Box<dyn cgroup::JobCgroup>,
    pub workspace_tree: Option<std::os::fd::OwnedFd>,
    pub landlock: Option<spawn::LandlockWork>,
}

/// Makes agentd's runtime directory exist and lets every job's user pass through it
/// (execute, not list): a job's setup binds files below it as the job's user (its view,
/// its socket directory, the resolver configuration). Each job's own runtime directory
/// below stays 0700. The directories above it are the operator's: one that other users
/// cannot pass through is an error that names it (else the job's setup would fail with
/// a bare "Permission denied").
pub fn make_passable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)?;
    let absolute = std::path::absolute(dir)?;
    for above in absolute.ancestors().skip(1) {
        let mode = std::fs::metadata(above)?.permissions().mode();
        if mode & 0o001 == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "the runtime directory {} is below {} (mode {:04o}), which other users cannot pass through; \
                     a job's setup binds files from the runtime directory as the job's user: \
                     chmod o+x {} or choose another runtime directory",
                    dir.display(),
                    above.display(),
                    mode & 0o7777,
                    above.display()
                ),
            ));
        }
    }
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o011 != 0o011 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))?;
    }
    Ok(())
}

/// The resolver configuration of `proxy` jobs, shared by all of them: written once
/// (atomically, so a job starting meanwhile never sees half of it), world-readable
/// since each job's setup binds it as the job's user.
fn write_resolv_conf(runtime_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = plan::resolv_conf_path(runtime_dir);
    make_passable(runtime_dir)?;
    if std::fs::read_to_string(&path).is_ok_and(|t| t == crate::net::RESOLV_CONF) {
        return Ok(());
    }
    let tmp = runtime_dir.join(format!("resolv.conf.{}", std::process::id()));
    std::fs::write(&tmp, crate::net::RESOLV_CONF)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, &path)
}

/// The job cgroup's directory name in every hierarchy.
pub fn cgroup_name(id: &str) -> String {
    format!("agentd-{id}")
}

/// Step 2 of the pipeline: runtime directory, cgroup with limits, the workspace's mount
/// clone and the Landlock ruleset, for job `id` under `runtime_dir`. Shared by `agentd
/// run` and the daemon.
pub fn allocate(
    plan: &mut plan::JobPlan,
    id: &str,
    runtime_dir: &Path,
    step_fault: &dyn Fn(&str, &'static str) -> Result<(), Error>,
) -> Result<Allocated, Error> {
    let pipeline = |job: &str, step: &'static str| {
        let job = job.to_owned();
        move |e: std::io::Error| Error::Pipeline {
            job,
            step,
            message: e.to_string(),
        }
    };
    let rundir = RuntimeDir::create(runtime_dir, id)
        .map_err(pipeline(id, "create the runtime directory"))?;
    plan.sandbox.root = std::ffi::CString::new(rundir.root().into_os_string().into_encoded_bytes())
        .map_err(|_| Error::Usage("the runtime directory's path contains a NUL byte".into()))?;
    // The job may name itself in logs and requests to agentd.
    plan.sandbox
        .envp
        .push(std::ffi::CString::new(format!("AGENTD_JOB_ID={id}")).expect("hex id"));
    if plan.egress.mode == crate::net::NetMode::Proxy {
        write_resolv_conf(runtime_dir).map_err(pipeline(id, "write the job's resolv.conf"))?;
    }
    step_fault(id, "after-runtime-dir")?;
    // `agentd run`: the job's view of itself, bound read-only at /run/agentd/self (after
    // everything else in its root).
    let view = if plan.options.job_socket_dir.is_none() {
        let view = selfview::ViewDir::create(runtime_dir, id)
            .map_err(pipeline(id, "create the job's /run/agentd/self"))?;
        let src = std::ffi::CString::new(view.path().into_os_string().into_encoded_bytes())
            .map_err(|_| Error::Usage("the runtime directory's path contains a NUL byte".into()))?;
        for dir in ["./run", "./run/agentd", "./run/agentd/self"] {
            plan.sandbox.mount_ops.push(crate::sandbox::MountOp::Mkdir(
                std::ffi::CString::new(dir).expect("no NUL"),
            ));
        }
        plan.sandbox.mount_ops.push(crate::sandbox::MountOp::Bind {
            src,
            dst: std::ffi::CString::new("./run/agentd/self").expect("no NUL"),
            attrs: crate::mount_api::MOUNT_ATTR_RDONLY
                | crate::mount_api::MOUNT_ATTR_NOSUID
                | crate::mount_api::MOUNT_ATTR_NODEV,
            recursive: false,
        });
        Some(view)
    } else {
        None
    };
    let limits = plan.cgroup_limits();
    let cgroup = cgroup::create_job_cgroup(
        &plan.host_cgroups,
        plan.options.cgroup_parent.as_deref(),
        &cgroup_name(id),
        &limits,
        &plan.skip_controllers,
    )
    .map_err(|source| Error::Cgroup {
        job: id.to_owned(),
        source,
    })?;
    step_fault(id, "after-cgroup")?;
    // The workspace is cloned here, by root, so the job's user need not be able to reach
    // it through the host's directories; idmapped after clone when its owner differs.
    // A review workspace is an overlay made here (its upper layer in the daemon's state
    // directory); a read-only one is the clone, made read-only before the job sees it.
    let workspace_step = |step: &'static str| {
        let job = id.to_owned();
        move |e: String| Error::Pipeline {
            job,
            step,
            message: e,
        }
    };
    let workspace_tree = match (&plan.workspace, plan.options.workspace_mode) {
        (Some(ws), WorkspaceMode::Review) => {
            let layers = plan.review_layers.as_ref().ok_or_else(|| {
                Error::Usage(
                    "a review workspace is offered by the daemon only: agentctl run --review"
                        .into(),
                )
            })?;
            layers
                .create()
                .map_err(|e| workspace_step("create the review layers")(e.to_string()))?;
            Some(
                layers
                    .mount(ws)
                    .map_err(|e| workspace_step("mount the review overlay")(e.to_string()))?,
            )
        }
        (Some(ws), mode) => {
            let tree = spawn::open_workspace_tree(ws)
                .map_err(|e| workspace_step("clone the workspace mount")(e.to_string()))?;
            if mode == WorkspaceMode::Readonly {
                crate::mount_api::mount_setattr(
                    std::os::fd::AsRawFd::as_raw_fd(&tree),
                    c"",
                    libc::AT_EMPTY_PATH as u32 | crate::mount_api::AT_RECURSIVE,
                    crate::mount_api::MOUNT_ATTR_RDONLY,
                    None,
                )
                .map_err(|e| workspace_step("make the workspace read-only")(e.to_string()))?;
            }
            Some(tree)
        }
        _ => None,
    };
    plan.sandbox.workspace_tree = workspace_tree.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    // The Landlock ruleset: created now so the child inherits it; the parent fills it
    // while the child builds its root.
    let landlock = if plan.landlock_abi > 0 {
        let ruleset =
            landlock::create(plan.landlock_tcp_connect().is_some()).map_err(|message| {
                Error::Pipeline {
                    job: id.to_owned(),
                    step: "create the Landlock ruleset",
                    message,
                }
            })?;
        plan.sandbox.landlock.ruleset = ruleset
            .child_fd
            .as_ref()
            .map(std::os::fd::AsRawFd::as_raw_fd);
        let mut paths: Vec<_> = plan
            .policy
            .filesystem
            .iter()
            .map(|g| (g.path.clone(), g.access))
            .collect();
        // The daemon's jobs: their directory at /run/agentd (the socket, and the
        // job's own state under self/) is readable.
        if let Some(dir) = &plan.options.job_socket_dir {
            paths.push((dir.clone(), crate::spec::Access::Read));
        }
        if let Some(v) = &view {
            paths.push((v.path(), crate::spec::Access::Read));
        }
        // The resolver configuration the network mode binds at /etc/resolv.conf.
        match plan.egress.mode {
            crate::net::NetMode::Proxy => paths.push((
                plan::resolv_conf_path(&plan.options.runtime_dir),
                crate::spec::Access::Read,
            )),
            crate::net::NetMode::Host if Path::new("/etc/resolv.conf").exists() => {
                paths.push(("/etc/resolv.conf".into(), crate::spec::Access::Read))
            }
            _ => {}
        }
        // The workspace's rule: on the host path for a bind (the same inodes), on the
        // overlay's own root for a review handle (the merged view has inodes of its own).
        let mut fd_rules = Vec::new();
        match (
            &plan.workspace,
            plan.options.workspace_mode,
            &workspace_tree,
        ) {
            (Some(_), WorkspaceMode::Review, Some(tree)) => {
                let root = tree
                    .try_clone()
                    .map_err(|e| workspace_step("open the overlay for Landlock")(e.to_string()))?;
                fd_rules.push((root, crate::spec::Access::Write));
            }
            (Some(w), mode, _) => {
                let access = match mode {
                    WorkspaceMode::Readonly => crate::spec::Access::Exec,
                    _ => crate::spec::Access::Write,
                };
                paths.push((w.clone(), access));
            }
            _ => {}
        }
        Some(spawn::LandlockWork {
            ruleset,
            paths,
            fd_rules,
            tcp_bind: plan.policy.tcp_bind.clone(),
            tcp_connect: plan.landlock_tcp_connect().unwrap_or_default(),
        })
    } else {
        None
    };

    Ok(Allocated {
        view,
        rundir,
        cgroup,
        workspace_tree,
        landlock,
    })
}

fn run_pipeline(options: RunOptions) -> Result<i32, Error> {
    let fault = injected_fault();
    let step_fault = |job: &str, step: &'static str| -> Result<(), Error> {
        // "hang-STEP" stands still there, for tests that kill agentd mid-pipeline.
        if fault.as_deref().and_then(|f| f.strip_prefix("hang-")) == Some(step) {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        if fault.as_deref() == Some(step) {
            return Err(Error::Pipeline {
                job: job.into(),
                step,
                message: "injected fault".into(),
            });
        }
        Ok(())
    };
    let pipeline = |job: &str, step: &'static str| {
        let job = job.to_owned();
        move |e: std::io::Error| Error::Pipeline {
            job,
            step,
            message: e.to_string(),
        }
    };

    // 1. validate
    let mut plan = plan::validate(options)?;
    plan.sandbox.fault = fault
        .as_deref()
        .and_then(crate::sandbox::Step::from_fault_name);

    // 2. allocate, after sweeping what runs that died uncleanly left behind
    let cgroup_parents =
        cgroup::parent_dirs(&plan.host_cgroups, plan.options.cgroup_parent.as_deref());
    for stale in stale::sweep(&plan.options.runtime_dir, &cgroup_parents) {
        say(&format!(
            "agentd: removed job {stale}, left behind by an agentd that died"
        ));
    }
    let id = new_job_id();
    let runtime_dir = plan.options.runtime_dir.clone();
    let alloc = allocate(&mut plan, &id, &runtime_dir, &step_fault)?;
    let Allocated {
        view: view_dir,
        rundir,
        mut cgroup,
        workspace_tree: _workspace_tree, // open until the child has attached it
        landlock,
    } = alloc;

    // 3. guards
    let signals =
        supervise::SignalGuard::install().map_err(pipeline(&id, "install the signal guard"))?;
    step_fault(&id, "after-guards")?;

    // 4. publish
    let started_at = SystemTime::now();
    rundir
        .publish(&serde_json::json!({
            "job_id": id, "state": "starting", "agentd_pid": std::process::id(),
            "policy": plan.policy.name, "command": plan.options.command,
            "cgroup": cgroup.dirs(),
        }))
        .map_err(pipeline(&id, "publish the job state"))?;
    step_fault(&id, "after-publish")?;

    // 5. start — unless an interrupt arrived during setup.
    if let Some(sig) = signals.next() {
        say(&format!(
            "agentd: job {id}: interrupted by signal {sig} before start; nothing ran"
        ));
        return Ok(128 + sig);
    }
    let started = Instant::now();
    let mut child = spawn::spawn(
        &plan.sandbox,
        cgroup.as_ref(),
        &plan.ids,
        plan.workspace.as_deref(),
        landlock,
        None,
        fault.as_deref(),
    )
    .map_err(|e| Error::Pipeline {
        job: id.clone(),
        step: "start the job",
        message: e.to_string(),
    })?;
    // `proxy` mode: serve the endpoints bound in the job's namespace while it runs.
    let wake = selfview::Wake::default();
    let proxy = match child.proxy.take() {
        Some(listeners) => Some(
            crate::net::standalone::StandaloneProxy::start(
                &id,
                plan.egress.clone(),
                listeners,
                wake.clone(),
            )
            .map_err(pipeline(&id, "start the job's proxy"))?,
        ),
        None => None,
    };
    // Its view of itself, kept current while it runs (its own handle on the cgroup).
    let view = match &view_dir {
        Some(dir) => {
            let placeholder = supervise::Outcome {
                si_code: 0,
                si_status: 0,
                messages: Vec::new(),
                timed_out: false,
                forwarded: Vec::new(),
            };
            let start = JobReport::new(
                &plan,
                report::RunFacts {
                    job_id: &id,
                    started_at,
                    wall: std::time::Duration::ZERO,
                    exit: &JobExit::Exited(0),
                    outcome: &placeholder,
                    usage: Default::default(),
                    cgroup: CgroupReport::of(cgroup.as_ref()),
                },
            );
            let compact =
                selfview::compact_start_report(&serde_json::to_value(&start).unwrap_or_default());
            let mut handle =
                cgroup::open_job_cgroup(&plan.host_cgroups, &cgroup.dirs()).map_err(|source| {
                    Error::Cgroup {
                        job: id.clone(),
                        source,
                    }
                })?;
            // It only reads: the pipeline's own handle accounts and removes the cgroup.
            handle.disown();
            let facts = selfview::RunFacts {
                job_id: id.clone(),
                agent: plan.policy.identity.agent.clone(),
                model: plan.policy.identity.model.clone(),
                policy: plan.policy.name.clone(),
                policy_sha256: plan.policy.sha256.clone(),
                cgroup_dirs: cgroup
                    .dirs()
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect(),
            };
            Some(
                selfview::RunView::start(
                    dir.path(),
                    facts,
                    compact,
                    handle,
                    proxy.as_ref().map(|p| p.membrane()),
                    wake.clone(),
                )
                .map_err(pipeline(&id, "start the job's view writer"))?,
            )
        }
        None => None,
    };
    let outcome = supervise::supervise(
        &mut child,
        &signals,
        plan.limits.timeout,
        plan.policy.lifecycle.kill_grace,
        started,
    );
    let wall = started.elapsed();
    drop(view);
    drop(child);
    let network = proxy.map(|p| p.finish());

    // Exit: account, then remove the cgroup.
    let usage = cgroup.usage();
    let exit = JobExit::from_outcome(&outcome, &plan.sandbox);
    let cgroup_report = CgroupReport::of(cgroup.as_ref());
    if let Err(e) = cgroup.remove() {
        say(&format!("agentd: job {id}: warning: {e}"));
    }
    if let Some(m) = exit.message() {
        say(&format!("agentd: job {id}: {m}"));
    }
    if outcome.timed_out {
        say(&format!(
            "agentd: job {id}: timed out after {:?}",
            plan.limits.timeout.unwrap_or_default()
        ));
    }

    if let Some(path) = &plan.options.report {
        let facts = report::RunFacts {
            job_id: &id,
            started_at,
            wall,
            exit: &exit,
            outcome: &outcome,
            usage,
            cgroup: cgroup_report,
        };
        let mut job_report = JobReport::new(&plan, facts);
        if let Some(network) = network {
            job_report.network = network;
        }
        if let Err(e) = report::write_report(path, &job_report) {
            say(&format!(
                "agentd: job {id}: cannot write the report {}: {e}",
                path.display()
            ));
            return Ok(125);
        }
    }
    Ok(exit.code())
}
