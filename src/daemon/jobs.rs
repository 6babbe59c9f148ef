//! Jobs over the API: submit (validate → record → allocate → spawn, the same pipeline
//! as `agentd run`), cancel, freeze, thaw, detach, wait. Every state change goes through
//! `lifecycle::check`, is written to the store with its operation row in one
//! transaction, and is announced as an event.

use super::{Daemon, JobEntry, JobRuntime, daemon_op, human_duration, lifecycle, now_ms};
use crate::api::types::{
    EventKind, ExitInfo, JobInfo, JobState, KillRequest, SubmitRequest, UsageInfo,
};
use crate::audit::{NewOperation, Requester};
use crate::job::{self, RunOptions, plan::JobPlan, report, spawn};
use crate::sandbox::OutputRelay;
use crate::store::WriteBatch;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An API error: the HTTP status and the message the caller sees verbatim.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        Self::new(400, m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        Self::new(403, m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        Self::new(404, m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        Self::new(409, m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        Self::new(500, m)
    }
}

fn no_such_job(id: &str) -> ApiError {
    ApiError::not_found(format!("no job {id} (agentctl ps --all lists them)"))
}

/// The job's current info, with live usage while it runs.
pub fn inspect(d: &Daemon, id: &str) -> Result<JobInfo, ApiError> {
    let (mut info, cgroup) = {
        let jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs.get(id).ok_or_else(|| no_such_job(id))?;
        (e.info.clone(), e.cgroup.clone())
    };
    if let Some(cg) = cgroup {
        info.usage = Some(usage_info(&cg.lock().expect("cgroup lock").usage()));
    }
    Ok(info)
}

pub fn list(d: &Daemon) -> Vec<JobInfo> {
    let jobs = d.jobs.lock().expect("jobs lock");
    let mut all: Vec<JobInfo> = jobs.values().map(|e| e.info.clone()).collect();
    all.sort_by(|a, b| (a.submitted_ms, &a.id).cmp(&(b.submitted_ms, &b.id)));
    all
}

pub fn usage_info(u: &crate::cgroup::Usage) -> UsageInfo {
    UsageInfo {
        cpu_usec: u.cpu_usec,
        memory_bytes: u.memory_bytes,
        peak_memory_bytes: u.peak_memory_bytes,
        pids: u.pids,
        oom_kills: u.oom_kills,
        throttled_usec: u.throttled_usec,
    }
}

/// Describes the requester for an authority string.
pub fn who(r: &Requester) -> String {
    if r.uid == 0 {
        format!("root (pid {})", r.pid)
    } else {
        format!("uid {} (pid {})", r.uid, r.pid)
    }
}

/// Records a refused request: an operation row, a `denied` event, the metric.
pub async fn deny(
    d: &Daemon,
    who_asked: &Requester,
    action: &str,
    target: Option<&str>,
    rule: &str,
    why: &str,
) {
    d.metrics.denied(rule);
    d.events.emit(
        EventKind::Denied,
        target.filter(|t| t.len() == 12),
        None,
        format!("{action}: {why}"),
    );
    d.record_op(NewOperation {
        requester: who_asked.clone(),
        action: action.into(),
        target: target.map(str::to_owned),
        authority: format!("denied by {rule}: {why}"),
        change: serde_json::json!({}),
        rollback: "nothing changed".into(),
    })
    .await;
}

/// POST /v1/jobs
pub async fn submit(
    d: &Arc<Daemon>,
    req: SubmitRequest,
    requester: Requester,
) -> Result<JobInfo, ApiError> {
    let t0 = Instant::now();
    if req.command.is_empty() {
        return Err(ApiError::bad_request(
            "command: expected the command and its arguments, a non-empty list",
        ));
    }
    if req.policy.is_some() && req.policy_toml.is_some() {
        return Err(ApiError::bad_request(
            "policy and policy_toml: give a policy name or an inline policy, not both",
        ));
    }
    if let Some(ws) = &req.workspace {
        check_workspace(d, &requester, ws).await?;
    }
    // Ownership: a job belongs to a lease or is durable; nothing runs unowned.
    if let Some(lease) = &req.lease {
        super::leases::check_usable(d, lease, &requester)?;
    } else if !req.durable {
        return Err(ApiError::bad_request(
            "a job needs an owner: start it under a lease (\"lease\": ID; agentctl run takes one) or ask for a durable job (\"durable\": true)",
        ));
    }
    let options = RunOptions {
        policy: req.policy.clone().unwrap_or_else(|| "default".into()),
        policy_dir: d.opts.policy_dir.clone(),
        workspace: req.workspace.as_ref().map(PathBuf::from),
        cpu: req.cpu.clone(),
        memory: req.memory.clone(),
        pids: req.pids.clone(),
        timeout: req.timeout.clone(),
        env: req.env.clone(),
        agent: req.agent.clone(),
        model: req.model.clone(),
        report: None,
        allow_degraded: req.allow_degraded.clone(),
        runtime_dir: d.opts.runtime_dir.clone(),
        cgroup_parent: d.opts.cgroup_parent.clone(),
        command: req.command.clone(),
        policy_text: req.policy_toml.clone(),
    };
    let plan = match tokio::task::spawn_blocking(move || job::plan::validate(options)).await {
        Ok(Ok(plan)) => plan,
        Ok(Err(e)) => {
            let (status, rule) = match &e {
                crate::Error::Refused { .. } => (422, "host features"),
                _ => (400, "policy validation"),
            };
            let message = e.to_string();
            deny(d, &requester, "job.submit", None, rule, &message).await;
            return Err(ApiError::new(status, message));
        }
        Err(e) => return Err(ApiError::internal(format!("validation panicked: {e}"))),
    };
    let policy = &plan.policy;
    if req.durable && req.lease.is_none() && !policy.lifecycle.durable {
        let why = format!(
            "policy {} does not grant durable jobs (lifecycle.durable = false); run it under a lease",
            policy.name
        );
        deny(d, &requester, "job.submit", None, "lifecycle.durable", &why).await;
        return Err(ApiError::forbidden(why));
    }

    // Published: the job exists from here on, in the store and in the table.
    let id = job::new_job_id();
    let mut requester = requester;
    requester.agent = None;
    let info = JobInfo {
        id: id.clone(),
        state: JobState::Admitted,
        command: req.command.clone(),
        policy: policy.name.clone(),
        policy_hash: policy.sha256.clone(),
        agent: policy.identity.agent.clone(),
        model: policy.identity.model.clone(),
        workspace: req.workspace.clone(),
        lease: req.lease.clone(),
        durable: req.lease.is_none(),
        requester: requester.clone(),
        submitted_ms: now_ms(),
        started_ms: None,
        ended_ms: None,
        pid: None,
        cgroup: Vec::new(),
        exit: None,
        reason: None,
        usage: None,
        report: None,
    };
    let runtime = JobRuntime {
        kill_grace_ms: policy.lifecycle.kill_grace.as_millis() as u64,
        policy_durable: policy.lifecycle.durable,
        timeout_ms: plan.limits.timeout.map(|t| t.as_millis() as u64),
        ..Default::default()
    };
    let entry = JobEntry::new(info.clone(), runtime);
    let owner = match &req.lease {
        Some(l) => format!("lease {l}"),
        None => format!("durable (policy {}: lifecycle.durable = true)", policy.name),
    };
    let batch = WriteBatch {
        jobs: vec![entry.record()],
        ops: vec![
            NewOperation {
                requester: requester.clone(),
                action: "job.submit".into(),
                target: Some(id.clone()),
                authority: format!(
                    "{} may submit ({}); policy {} ({}) validated; owner: {owner}",
                    who(&requester),
                    super::super::api::server::access_rule(d, &requester),
                    policy.name,
                    &policy.sha256[..12]
                ),
                change: serde_json::json!({
                    "job": id, "state": {"before": null, "after": "submitted"},
                    "command": req.command, "policy": policy.name, "lease": req.lease,
                    "workspace": req.workspace,
                }),
                rollback: format!("agentctl kill {id}"),
            },
            daemon_op(
                "job.admit",
                &id,
                "no scheduling class limits admission: admitted at once",
                serde_json::json!({"job": id, "state": {"before": "submitted", "after": "admitted"}}),
                format!("agentctl kill {id}"),
            ),
        ],
        ..Default::default()
    };
    let order = entry.order.clone();
    let _ordered = order.lock().await;
    {
        // The lease again, in one step with the insert: a lease that ended since the
        // first check (validation takes a while) would not find this job among its own
        // and never cancel it.
        let leases = d.leases.lock().expect("leases lock");
        if let Some(lease) = &req.lease {
            super::leases::check_usable_in(&leases, lease, &requester)?;
        }
        d.jobs.lock().expect("jobs lock").insert(id.clone(), entry);
    }
    if let Err(e) = d.commit(batch).await {
        d.jobs.lock().expect("jobs lock").remove(&id);
        return Err(ApiError::internal(format!(
            "cannot record the job; nothing was started: {e}"
        )));
    }
    d.events.emit(
        EventKind::Submitted,
        Some(&id),
        req.lease.as_deref(),
        String::new(),
    );
    d.events.emit(
        EventKind::Admitted,
        Some(&id),
        req.lease.as_deref(),
        String::new(),
    );
    drop(_ordered);
    start(d, &id, plan, t0).await
}

/// A group member (not root) may only hand a job a workspace it owns itself.
async fn check_workspace(d: &Daemon, requester: &Requester, ws: &str) -> Result<(), ApiError> {
    use std::os::unix::fs::MetadataExt;
    if !Path::new(ws).is_absolute() {
        return Err(ApiError::bad_request(format!(
            "workspace: expected an absolute path, got \"{ws}\""
        )));
    }
    if requester.uid == 0 {
        return Ok(());
    }
    match std::fs::metadata(ws) {
        Ok(m) if m.uid() == requester.uid => Ok(()),
        Ok(m) => {
            let why = format!(
                "workspace {ws} belongs to uid {}, not to the requester (uid {})",
                m.uid(),
                requester.uid
            );
            deny(
                d,
                requester,
                "job.submit",
                None,
                "workspace ownership",
                &why,
            )
            .await;
            Err(ApiError::forbidden(why))
        }
        Err(e) => Err(ApiError::bad_request(format!("workspace {ws}: {e}"))),
    }
}

/// What spawning produced, handed from the blocking spawn to the async side.
struct Spawned {
    pid: i32,
    pidfd: OwnedFd,
    cgroup: Box<dyn crate::cgroup::JobCgroup>,
    runtime: JobRuntime,
    plan: Box<JobPlan>,
}

/// Allocate and spawn, on a blocking thread: the same steps as `agentd run`, with the
/// daemon's differences (output to capped logs, status in a file, no parent-death
/// signal, runtime directory handed to the job).
fn spawn_blocking_job(d: &Daemon, id: &str, mut plan: JobPlan) -> Result<Spawned, String> {
    let fault = job::injected_fault();
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
    let alloc = job::allocate(&mut plan, id, &d.opts.runtime_dir, &step_fault)
        .map_err(|e| e.to_string())?;
    let jobdir = d.opts.state_dir.join("jobs").join(id);
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
        alloc.landlock,
        Some(&status_path),
        fault.as_deref(),
    )
    .map_err(|e| format!("start the job: {e}"))?;
    let (pid, pidfd, _status) = child.into_parts();
    drop(alloc.workspace_tree);
    let cgroup_report = report::CgroupReport {
        version: alloc.cgroup.version().into(),
        dirs: alloc
            .cgroup
            .dirs()
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        limits_applied: alloc.cgroup.applied().into_iter().collect(),
    };
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
    let runtime = JobRuntime {
        rundir: alloc.rundir.keep().display().to_string(),
        jobdir: jobdir.display().to_string(),
        pid_start_ticks: super::recovery::start_ticks(pid),
        cgroup_dirs: alloc
            .cgroup
            .dirs()
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        timeout_ms: plan.limits.timeout.map(|t| t.as_millis() as u64),
        kill_grace_ms: plan.policy.lifecycle.kill_grace.as_millis() as u64,
        policy_durable: plan.policy.lifecycle.durable,
        cancel_reason: None,
        kill_at_ms: None,
        report: serde_json::to_value(&report).ok(),
    };
    Ok(Spawned {
        pid,
        pidfd,
        cgroup: alloc.cgroup,
        runtime,
        plan: Box::new(plan),
    })
}

pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Start an admitted job; answers with its info (running, or failed with the reason).
async fn start(d: &Arc<Daemon>, id: &str, plan: JobPlan, t0: Instant) -> Result<JobInfo, ApiError> {
    let order = d.jobs.lock().expect("jobs lock")[id].order.clone();
    let _ordered = order.lock().await;
    let d2 = d.clone();
    let id2 = id.to_owned();
    let spawned = tokio::task::spawn_blocking(move || spawn_blocking_job(&d2, &id2, plan))
        .await
        .unwrap_or_else(|e| Err(format!("the spawn thread failed: {e}")));
    match spawned {
        Ok(s) => {
            let latency = t0.elapsed();
            d.metrics.spawned(latency);
            let pidfd = Arc::new(s.pidfd);
            let (info, record, cancel) = {
                let mut jobs = d.jobs.lock().expect("jobs lock");
                let e = jobs.get_mut(id).expect("job entry exists while starting");
                let cancel = e.runtime.cancel_reason.clone();
                let mut runtime = s.runtime;
                runtime.cancel_reason = cancel.clone();
                runtime.kill_at_ms = e.runtime.kill_at_ms;
                e.runtime = runtime;
                e.info.state = JobState::Running;
                e.info.pid = Some(s.pid);
                e.info.started_ms = Some(now_ms());
                e.info.cgroup = e.runtime.cgroup_dirs.clone();
                e.cgroup = Some(Arc::new(Mutex::new(s.cgroup)));
                e.pidfd = Some(pidfd.clone());
                e.state_tx.send_replace(JobState::Running);
                (e.info.clone(), e.record(), cancel)
            };
            let op = daemon_op(
                "job.start",
                id,
                "admitted job; the pipeline allocated its cgroup and sandbox",
                serde_json::json!({"job": id, "state": {"before": "admitted", "after": "running"},
                    "pid": s.pid, "cgroup": info.cgroup, "spawn_ms": latency.as_secs_f64() * 1e3}),
                format!("agentctl kill {id}"),
            );
            if let Err(e) = d
                .commit(WriteBatch {
                    jobs: vec![record],
                    ops: vec![op],
                    ..Default::default()
                })
                .await
            {
                tracing::error!("job {id}: cannot record its start: {e}");
            }
            d.events.emit(
                EventKind::Started,
                Some(id),
                info.lease.as_deref(),
                format!("pid {}", s.pid),
            );
            tokio::spawn(super::watch::watch(
                d.clone(),
                id.to_owned(),
                pidfd,
                true,
                Some(s.plan),
            ));
            if cancel.is_some() {
                // Cancelled while it was being created (its lease ended): go on now.
                if let Some(e) = d.jobs.lock().expect("jobs lock").get(id) {
                    e.wake.notify_one();
                }
            }
            Ok(info)
        }
        Err(reason) => {
            d.metrics.spawn_failed();
            let (info, record) = {
                let mut jobs = d.jobs.lock().expect("jobs lock");
                let e = jobs.get_mut(id).expect("job entry exists while starting");
                e.info.state = JobState::Failed;
                e.info.reason = Some(reason.clone());
                e.info.ended_ms = Some(now_ms());
                e.info.exit = Some(ExitInfo {
                    code: 125,
                    signal: None,
                    message: reason.clone(),
                });
                (e.info.clone(), e.record())
            };
            let op = daemon_op(
                "job.fail",
                id,
                "the creation pipeline failed; everything it made was removed",
                serde_json::json!({"job": id, "state": {"before": "admitted", "after": "failed"}, "reason": reason}),
                "nothing to undo: nothing remains of the job",
            );
            let _ = d
                .commit(WriteBatch {
                    jobs: vec![record],
                    ops: vec![op],
                    ..Default::default()
                })
                .await;
            d.metrics.ended(JobState::Failed);
            d.events
                .emit(EventKind::Failed, Some(id), info.lease.as_deref(), reason);
            // Waiters hear of it once it is recorded and announced (as in watch::finish).
            if let Some(e) = d.jobs.lock().expect("jobs lock").get(id) {
                e.state_tx.send_replace(JobState::Failed);
            }
            Ok(info)
        }
    }
}

/// Parses a signal given as a name ("TERM", "SIGINT") or a number.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("signal {n} is out of range (1-64)"))
        };
    }
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    let n = match name.as_str() {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "ALRM" => libc::SIGALRM,
        "WINCH" => libc::SIGWINCH,
        _ => {
            return Err(format!(
                "unknown signal \"{s}\" (a name like TERM or a number)"
            ));
        }
    };
    Ok(n)
}

pub fn pidfd_signal(pidfd: &OwnedFd, sig: i32) {
    // SAFETY: pidfd_send_signal on a pidfd we hold; no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// POST /v1/jobs/{id}/kill: the signal to the job's init (which passes it to the main
/// process), then, after the grace period, the whole cgroup is killed.
pub async fn kill(
    d: &Arc<Daemon>,
    id: &str,
    req: KillRequest,
    requester: Requester,
) -> Result<JobInfo, ApiError> {
    let signal = parse_signal(req.signal.as_deref().unwrap_or("TERM"))
        .map_err(|m| ApiError::bad_request(format!("signal: {m}")))?;
    let grace = match &req.grace {
        Some(g) => Some(
            crate::spec::parse_duration(g)
                .map_err(|m| ApiError::bad_request(format!("grace: {m}")))?,
        ),
        None => None,
    };
    cancel(
        d,
        id,
        signal,
        grace,
        format!("killed by {}", who(&requester)),
        requester.clone(),
        format!("{} may manage jobs", who(&requester)),
    )
    .await
}

/// Cancels a job: `signal` now, the whole cgroup after `grace` (default the policy's).
pub async fn cancel(
    d: &Arc<Daemon>,
    id: &str,
    signal: i32,
    grace: Option<Duration>,
    reason: String,
    requester: Requester,
    authority: String,
) -> Result<JobInfo, ApiError> {
    let order = d
        .jobs
        .lock()
        .expect("jobs lock")
        .get(id)
        .ok_or_else(|| no_such_job(id))?
        .order
        .clone();
    let _ordered = order.lock().await;
    let (info, record, pidfd, cgroup, frozen, grace_ms) = {
        let mut jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs.get_mut(id).ok_or_else(|| no_such_job(id))?;
        if e.info.state.is_terminal() {
            return Err(ApiError::conflict(format!(
                "job {id} has already ended ({})",
                e.info.state
            )));
        }
        let grace_ms = grace
            .map(|g| g.as_millis() as u64)
            .unwrap_or(e.runtime.kill_grace_ms);
        let grace_ms = if signal == libc::SIGKILL { 0 } else { grace_ms };
        let kill_at = now_ms() + grace_ms;
        e.runtime.kill_at_ms = Some(e.runtime.kill_at_ms.map_or(kill_at, |k| k.min(kill_at)));
        if e.runtime.cancel_reason.is_none() {
            e.runtime.cancel_reason = Some(reason.clone());
        }
        (
            e.info.clone(),
            e.record(),
            e.pidfd.clone(),
            e.cgroup.clone(),
            e.info.state == JobState::Frozen,
            grace_ms,
        )
    };
    // A frozen job cannot act on a polite signal: thaw it first.
    if frozen
        && signal != libc::SIGKILL
        && let Some(cg) = &cgroup
    {
        let cg = cg.clone();
        let _ = tokio::task::spawn_blocking(move || cg.lock().expect("cgroup lock").thaw()).await;
    }
    if let Some(p) = &pidfd {
        pidfd_signal(p, signal);
    }
    let op = NewOperation {
        requester,
        action: "job.kill".into(),
        target: Some(id.into()),
        authority,
        change: serde_json::json!({"job": id, "signal": signal, "grace_ms": grace_ms, "reason": reason,
            "state": {"before": info.state, "after": "killed (when its processes are gone)"}}),
        rollback: "cannot be undone: a delivered signal cannot be taken back".into(),
    };
    if let Err(e) = d
        .commit(WriteBatch {
            jobs: vec![record],
            ops: vec![op],
            ..Default::default()
        })
        .await
    {
        tracing::error!("job {id}: cannot record the kill: {e}");
    }
    if let Some(e) = d.jobs.lock().expect("jobs lock").get(id) {
        e.wake.notify_one();
    }
    tracing::info!("job {id}: cancelling ({reason}), signal {signal}, grace {grace_ms} ms");
    Ok(info)
}

/// POST /v1/jobs/{id}/freeze and /thaw.
pub async fn set_frozen(
    d: &Arc<Daemon>,
    id: &str,
    freeze: bool,
    requester: Requester,
) -> Result<JobInfo, ApiError> {
    let (from, to) = if freeze {
        (JobState::Running, JobState::Frozen)
    } else {
        (JobState::Frozen, JobState::Running)
    };
    let order = d
        .jobs
        .lock()
        .expect("jobs lock")
        .get(id)
        .ok_or_else(|| no_such_job(id))?
        .order
        .clone();
    let _ordered = order.lock().await;
    let cgroup = {
        let jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs.get(id).ok_or_else(|| no_such_job(id))?;
        lifecycle::check(id, e.info.state, to).map_err(ApiError::conflict)?;
        if e.info.state != from {
            return Err(ApiError::conflict(format!("job {id} is {}", e.info.state)));
        }
        e.cgroup
            .clone()
            .ok_or_else(|| ApiError::conflict(format!("job {id} has no cgroup")))?
    };
    let result = tokio::task::spawn_blocking(move || {
        let cg = cgroup.lock().expect("cgroup lock");
        if freeze { cg.freeze() } else { cg.thaw() }
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    result.map_err(|e| ApiError::internal(format!("job {id}: {e}")))?;
    let (info, record) = {
        let mut jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs.get_mut(id).ok_or_else(|| no_such_job(id))?;
        if e.info.state == from {
            e.info.state = to;
            e.state_tx.send_replace(to);
        }
        (e.info.clone(), e.record())
    };
    let (action, undo, kind) = if freeze {
        (
            "job.freeze",
            format!("agentctl thaw {id}"),
            EventKind::Frozen,
        )
    } else {
        (
            "job.thaw",
            format!("agentctl freeze {id}"),
            EventKind::Thawed,
        )
    };
    let op = NewOperation {
        requester: requester.clone(),
        action: action.into(),
        target: Some(id.into()),
        authority: format!("{} may manage jobs", who(&requester)),
        change: serde_json::json!({"job": id, "state": {"before": from, "after": to}}),
        rollback: undo,
    };
    d.commit(WriteBatch {
        jobs: vec![record],
        ops: vec![op],
        ..Default::default()
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    d.events
        .emit(kind, Some(id), info.lease.as_deref(), String::new());
    Ok(info)
}

/// POST /v1/jobs/{id}/detach: the job leaves its lease and becomes durable, if its
/// policy grants that.
pub async fn detach(d: &Arc<Daemon>, id: &str, requester: Requester) -> Result<JobInfo, ApiError> {
    let order = d
        .jobs
        .lock()
        .expect("jobs lock")
        .get(id)
        .ok_or_else(|| no_such_job(id))?
        .order
        .clone();
    let _ordered = order.lock().await;
    let outcome = {
        // Leases, then jobs: a lease that ends marks itself under its lock before it lists
        // the jobs to cancel, so a job either leaves it before that or finds it ended.
        let leases = d.leases.lock().expect("leases lock");
        let mut jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs.get_mut(id).ok_or_else(|| no_such_job(id))?;
        if e.info.state.is_terminal() {
            return Err(ApiError::conflict(format!(
                "job {id} has already ended ({})",
                e.info.state
            )));
        }
        if e.info.durable {
            return Ok(e.info.clone());
        }
        if let Some(l) = e.info.lease.as_deref().and_then(|l| leases.get(l))
            && l.state != crate::api::types::LeaseState::Active
        {
            return Err(ApiError::conflict(format!(
                "job {id} belongs to lease {}, which is {}: the job is being cancelled",
                l.id,
                l.state.as_str()
            )));
        }
        if !e.runtime.policy_durable {
            Err(format!(
                "policy {} does not grant durable jobs (lifecycle.durable = false)",
                e.info.policy
            ))
        } else {
            let lease = e.info.lease.take();
            e.info.durable = true;
            Ok((e.info.clone(), e.record(), lease))
        }
    };
    let (info, record, lease) = match outcome {
        Ok(v) => v,
        Err(why) => {
            deny(
                d,
                &requester,
                "job.detach",
                Some(id),
                "lifecycle.durable",
                &why,
            )
            .await;
            return Err(ApiError::forbidden(why));
        }
    };
    let op = NewOperation {
        requester: requester.clone(),
        action: "job.detach".into(),
        target: Some(id.into()),
        authority: format!(
            "{} may manage jobs; policy {}: lifecycle.durable = true",
            who(&requester),
            info.policy
        ),
        change: serde_json::json!({"job": id, "lease": {"before": lease, "after": null}, "durable": {"before": false, "after": true}}),
        rollback: format!(
            "cannot be undone: a durable job stays durable (agentctl kill {id} ends it)"
        ),
    };
    d.commit(WriteBatch {
        jobs: vec![record],
        ops: vec![op],
        ..Default::default()
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    d.events.emit(
        EventKind::Detached,
        Some(id),
        lease.as_deref(),
        "durable now".into(),
    );
    Ok(info)
}

/// GET /v1/jobs/{id}/wait: returns when the job ended or `timeout` passed.
pub async fn wait(d: &Daemon, id: &str, timeout: Duration) -> Result<JobInfo, ApiError> {
    let mut rx = d
        .jobs
        .lock()
        .expect("jobs lock")
        .get(id)
        .ok_or_else(|| no_such_job(id))?
        .state_tx
        .subscribe();
    let _ = tokio::time::timeout(timeout, rx.wait_for(|s| s.is_terminal())).await;
    inspect(d, id)
}

/// Reads a job's log for the logs endpoint: path of stdout or stderr.
pub fn log_path(d: &Daemon, id: &str, stream: &str) -> Result<PathBuf, ApiError> {
    if stream != "stdout" && stream != "stderr" {
        return Err(ApiError::bad_request(format!(
            "stream: expected stdout or stderr, got \"{stream}\""
        )));
    }
    let jobs = d.jobs.lock().expect("jobs lock");
    let e = jobs.get(id).ok_or_else(|| no_such_job(id))?;
    Ok(d.opts.state_dir.join("jobs").join(&e.info.id).join(stream))
}

/// Whether the job has ended (its logs are complete).
pub fn has_ended(d: &Daemon, id: &str) -> bool {
    d.jobs
        .lock()
        .expect("jobs lock")
        .get(id)
        .is_none_or(|e| e.info.state.is_terminal())
}

/// Names the cgroup kill for a log line.
pub fn grace_text(ms: u64) -> String {
    human_duration(Duration::from_millis(ms))
}
