//! Jobs over the API once they exist: inspect, list, cancel, freeze, thaw, detach,
//! wait (creation is `submit`). Every state change goes through `lifecycle::check`, is
//! written to the store with its operation row in one transaction, and is announced as
//! an event. Reading is open to every caller the socket admits; changing a job is for
//! root and for the user who submitted it.

use super::{Daemon, lifecycle, now_ms};
use crate::api::types::{EventKind, JobInfo, JobState, KillRequest, UsageInfo};
use crate::audit::{NewOperation, Requester};
use crate::store::WriteBatch;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// An API error: the HTTP status and the message the caller sees verbatim.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// A typed refusal's machine-readable part (ErrorBody::refusal).
    pub refusal: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            refusal: None,
        }
    }
    /// A quota refusal (429), with what was held and asked for a program to read.
    pub fn quota(e: &crate::telemetry::classes::QuotaExceeded, policy: &str) -> ApiError {
        let key = crate::spec::quotas::key_of(e.class, e.bound);
        ApiError {
            status: 429,
            message: format!("refused: {e} (policy {policy}: {key} = {})", e.limit),
            refusal: Some(serde_json::json!({
                "kind": "quota-exceeded", "class": e.class.name(), "bound": e.bound,
                "limit": e.limit, "held": e.held, "asked": e.asked,
                "rule": format!("{policy}:{key}"),
            })),
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

/// Forgets the oldest ended jobs beyond `--keep-ended` (they stay in the store, and
/// `inspect`, `wait` and `logs` answer from there). Prunes in batches (a tenth more
/// than the bound) so the sort is not paid for every job that ends.
pub fn prune_ended(d: &Daemon) {
    let keep = d.opts.keep_ended;
    let mut jobs = d.jobs.lock().expect("jobs lock");
    let ended_count = jobs.values().filter(|e| e.info.state.is_terminal()).count();
    if ended_count <= keep + keep / 10 {
        return;
    }
    let mut ended: Vec<(u64, String)> = jobs
        .values()
        .filter(|e| e.info.state.is_terminal())
        .map(|e| (e.info.ended_ms.unwrap_or(0), e.info.id.clone()))
        .collect();
    ended.sort_unstable();
    let excess = ended.len() - keep;
    for (_, id) in ended.into_iter().take(excess) {
        jobs.remove(&id);
        d.regions.forget_job(&id);
    }
}

/// A job the daemon no longer holds in memory, from the store.
fn stored(d: &Daemon, id: &str) -> Result<JobInfo, ApiError> {
    match d.store.job(id) {
        Ok(Some(record)) => Ok(record.info),
        Ok(None) => Err(no_such_job(id)),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

/// The job's current info, with live usage while it runs.
pub fn inspect(d: &Daemon, id: &str) -> Result<JobInfo, ApiError> {
    let (mut info, cgroup) = {
        let jobs = d.jobs.lock().expect("jobs lock");
        match jobs.get(id) {
            Some(e) => (e.info.clone(), e.cgroup.clone()),
            None => {
                drop(jobs);
                return stored(d, id);
            }
        }
    };
    if let Some(cg) = cgroup {
        info.usage = Some(usage_info(&cg.lock().expect("cgroup lock").usage()));
    }
    // An ended job's report lives in the store only (see `watch::finish`).
    if info.state.is_terminal()
        && info.report.is_none()
        && let Ok(Some(record)) = d.store.job(id)
    {
        info.report = record.info.report;
    }
    Ok(info)
}

/// Every job in memory (all that have not ended, and the last `--keep-ended` that
/// have), without reports (`inspect` has those).
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

/// Changing a job is for root and for the user who submitted it; anyone else is
/// refused, and the refusal recorded.
pub async fn check_owner(
    d: &Daemon,
    id: &str,
    requester: &Requester,
    action: &str,
) -> Result<(), ApiError> {
    if requester.uid == 0 {
        return Ok(());
    }
    let owner = d
        .jobs
        .lock()
        .expect("jobs lock")
        .get(id)
        .ok_or_else(|| no_such_job(id))?
        .info
        .requester
        .uid;
    if owner == requester.uid {
        return Ok(());
    }
    let why =
        format!("job {id} was submitted by uid {owner}; only that user or root may change it");
    deny(d, requester, action, Some(id), "job ownership", &why).await;
    Err(ApiError::forbidden(why))
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
    check_owner(d, id, &requester, "job.kill").await?;
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
    let _ordered = d.ordered(id).await.ok_or_else(|| no_such_job(id))?;
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
            // Frozen by its owner, or waiting for a slot: frozen either way.
            e.info.state == JobState::Frozen || e.info.waiting,
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
    if let Err(e) = d.commit(WriteBatch::job(record, op)).await {
        tracing::error!(job = %id, "job {id}: cannot record the kill: {e}");
    }
    if let Some(e) = d.jobs.lock().expect("jobs lock").get(id) {
        e.wake.notify_one();
    }
    tracing::info!(job = %id, "job {id}: cancelling ({reason}), signal {signal}, grace {grace_ms} ms");
    Ok(info)
}

/// POST /v1/jobs/{id}/freeze and /thaw.
pub async fn set_frozen(
    d: &Arc<Daemon>,
    id: &str,
    freeze: bool,
    requester: Requester,
) -> Result<JobInfo, ApiError> {
    let action = if freeze { "job.freeze" } else { "job.thaw" };
    check_owner(d, id, &requester, action).await?;
    let (from, to) = if freeze {
        (JobState::Running, JobState::Frozen)
    } else {
        (JobState::Frozen, JobState::Running)
    };
    let _ordered = d.ordered(id).await.ok_or_else(|| no_such_job(id))?;
    let (cgroup, sched) = {
        let jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs.get(id).ok_or_else(|| no_such_job(id))?;
        lifecycle::check(id, e.info.state, to).map_err(ApiError::conflict)?;
        if e.info.state != from {
            return Err(ApiError::conflict(format!("job {id} is {}", e.info.state)));
        }
        let cgroup = e
            .cgroup
            .clone()
            .ok_or_else(|| ApiError::conflict(format!("job {id} has no cgroup")))?;
        (cgroup, e.runtime.sched)
    };
    // With --slots, a thawed job joins the runqueue again and stays frozen, waiting,
    // unless it gets a slot.
    let (waits, decisions) = match (freeze, sched) {
        (false, Some(params)) => {
            let (runs, decisions) = super::sched::owner_thawed(d, id, params);
            (!runs, decisions)
        }
        _ => (false, Vec::new()),
    };
    if !waits {
        let result = tokio::task::spawn_blocking(move || {
            let cg = cgroup.lock().expect("cgroup lock");
            if freeze { cg.freeze() } else { cg.thaw() }
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
        result.map_err(|e| ApiError::internal(format!("job {id}: {e}")))?;
    }
    // A frozen job leaves the runqueue: its slot goes to a waiting one.
    let decisions = if freeze && sched.is_some() {
        super::sched::owner_froze(d, id)
    } else {
        decisions
    };
    let (info, record) = {
        let mut jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs.get_mut(id).ok_or_else(|| no_such_job(id))?;
        if e.info.state == from {
            e.info.state = to;
            e.state_tx.send_replace(to);
        }
        e.info.waiting = waits;
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
    d.commit(WriteBatch::job(record, op))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    d.events
        .emit(kind, Some(id), info.lease.as_deref(), String::new());
    super::sched::apply(d, decisions).await;
    Ok(info)
}

/// POST /v1/jobs/{id}/detach: the job leaves its lease and becomes durable, if its
/// policy grants that.
pub async fn detach(d: &Arc<Daemon>, id: &str, requester: Requester) -> Result<JobInfo, ApiError> {
    check_owner(d, id, &requester, "job.detach").await?;
    let _ordered = d.ordered(id).await.ok_or_else(|| no_such_job(id))?;
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
    d.commit(WriteBatch::job(record, op))
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
    let rx = d
        .jobs
        .lock()
        .expect("jobs lock")
        .get(id)
        .map(|e| e.state_tx.subscribe());
    let Some(mut rx) = rx else {
        return stored(d, id); // ended long ago
    };
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
    let known = d.jobs.lock().expect("jobs lock").contains_key(id);
    if !known {
        stored(d, id)?;
    }
    // The id is a known job's (12 hex digits), so it is safe in a path.
    Ok(d.opts.state_dir.join("jobs").join(id).join(stream))
}

/// Whether the job has ended (its logs are complete).
pub fn has_ended(d: &Daemon, id: &str) -> bool {
    d.jobs
        .lock()
        .expect("jobs lock")
        .get(id)
        .is_none_or(|e| e.info.state.is_terminal())
}
