//! Creating a job over the API: validate → record (submitted, admitted) → allocate →
//! spawn, the same pipeline and sandbox as `agentd run`, with the daemon's differences:
//! output goes to capped logs through the job's init, the status to a file, no
//! parent-death signal, and the runtime directory belongs to the job.

use super::jobs::{ApiError, deny, who};
use super::spawner::SpawnRequest;
use super::{Daemon, JobEntry, JobRuntime, daemon_op, now_ms};
use crate::api::types::{
    EventKind, ExitInfo, JobInfo, JobState, ReviewInfo, ReviewState, SubmitRequest, WorkspaceMode,
};
use crate::audit::{NewOperation, Requester};
use crate::job::{self, RunOptions, plan::JobPlan};
use crate::store::WriteBatch;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    check_policy_source(d, &req, &requester).await?;
    let mut req = req;
    if let Some(id) = &req.snapshot {
        // A published snapshot: borrowed read-only (anyone's), or the lower layer of a
        // unique review handle (the job runs as its owner; a snapshot never changes, so
        // any number of such handles may be live at once).
        if req.workspace.is_some() || req.workspace_mode == WorkspaceMode::Readonly {
            return Err(ApiError::bad_request(
                "snapshot: a job gets a snapshot or a workspace directory, not both",
            ));
        }
        let store = crate::workspace::snapshot::SnapshotStore::new(&d.opts.state_dir);
        match store.get(id) {
            Some(meta) if !meta.removing => {}
            Some(_) => {
                return Err(ApiError::conflict(format!(
                    "snapshot {id} is being removed (it waits for its borrowers to end); it takes no new ones"
                )));
            }
            None => return Err(ApiError::not_found(format!("no snapshot {id}"))),
        }
        req.workspace = Some(store.tree(id).display().to_string());
        if req.workspace_mode == WorkspaceMode::Direct {
            req.workspace_mode = WorkspaceMode::Readonly;
        }
    } else if let Some(ws) = &req.workspace {
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
        workspace_mode: req.workspace_mode,
        job_socket_dir: None,
        net: req.net.clone(),
        allow_domain: req.allow_domain.clone(),
        allow_private: req.allow_private,
        sched: req.sched.clone(),
    };
    let spawn_options = options.clone();
    let t_validate = Instant::now();
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
    if requester.uid != 0
        && let Some(why) = network_widening(&plan)
    {
        deny(d, &requester, "job.submit", None, "network", &why).await;
        return Err(ApiError::forbidden(why));
    }

    // Its regions: each granted by the policy, at the access asked.
    let region_grants = super::regions::grant(d, &req.regions, policy, &requester).await?;

    // A review job's source: the canonical directory (validation resolved it).
    let review_source = (req.workspace_mode == WorkspaceMode::Review)
        .then(|| plan.workspace.as_ref().map(|w| w.display().to_string()))
        .flatten();
    // The policy may let a second review job on a busy directory have its own overlay.
    let review_clone = policy.workspace.clone_concurrent_review || req.snapshot.is_some();
    let validate_us = t_validate.elapsed().as_micros();
    // Published: the job exists from here on, in the store and in the table.
    let id = job::new_job_id();
    // Its class's admission: a deadline job reserves its bandwidth or is refused with
    // the numbers.
    let sched_params = plan.sched;
    let admission = match super::sched::admit(d, &id, sched_params) {
        Ok(what) => what,
        Err(why) => {
            deny(d, &requester, "job.submit", None, "sched.admission", &why).await;
            return Err(ApiError::conflict(why));
        }
    };
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
        snapshot: req.snapshot.clone(),
        tool_calls: Vec::new(),
        waiting: false,
        review: review_source.clone().map(|source| ReviewInfo {
            state: ReviewState::Open,
            source,
            decided_by: None,
            decided_ms: None,
            changes: None,
            before: None,
            skipped: Vec::new(),
            commit: None,
            snapshot: None,
        }),
        regions: region_grants
            .iter()
            .map(|g| format!("{}:{}", g.name, if g.write { "rw" } else { "ro" }))
            .collect(),
    };
    let runtime = JobRuntime {
        kill_grace_ms: policy.lifecycle.kill_grace.as_millis() as u64,
        policy_durable: policy.lifecycle.durable,
        timeout_ms: plan.limits.timeout.map(|t| t.as_millis() as u64),
        quotas: policy.quotas,
        regions: region_grants,
        ..Default::default()
    };
    let entry = JobEntry::new(info.clone(), runtime, &d.classes);
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
                admission.as_str(),
                serde_json::json!({"job": id, "state": {"before": "submitted", "after": "admitted"}}),
                format!("agentctl kill {id}"),
            ),
        ],
        ..Default::default()
    };
    let order = entry.order.clone();
    let _ordered = order.lock().await;
    let unique_conflict = {
        // The lease again, in one step with the insert: a lease that ended since the
        // first check (validation takes a while) would not find this job among its own
        // and never cancel it.
        let leases = d.leases.lock().expect("leases lock");
        if let Some(lease) = &req.lease {
            super::leases::check_usable_in(&leases, lease, &requester)?;
        }
        // One unique handle per source: claimed with the insert, so two submits on
        // the same directory cannot both get one.
        match review_source
            .as_deref()
            .filter(|_| !review_clone)
            .map(|source| (source, super::review::claim(d, source, &id)))
        {
            Some((source, Err(holder))) => Some(format!(
                "{source} has a unique review handle already: job {holder}; a second one is refused until that change is accepted or rejected (agentctl accept|reject {holder})"
            )),
            _ => {
                d.jobs.lock().expect("jobs lock").insert(id.clone(), entry);
                None
            }
        }
    };
    if let Some(why) = unique_conflict {
        super::sched::release(d, &id);
        deny(d, &requester, "job.submit", None, "workspace.unique", &why).await;
        return Err(ApiError::conflict(why));
    }
    let t_commit = Instant::now();
    let commit = d.commit(batch).await;
    tracing::debug!(
        "job {id}: validated in {validate_us} us, recorded in {} us",
        t_commit.elapsed().as_micros()
    );
    if let Err(e) = commit {
        super::sched::release(d, &id);
        d.jobs.lock().expect("jobs lock").remove(&id);
        if let Some(source) = &review_source {
            super::review::release(d, source, &id);
        }
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
    start(d, &id, plan, spawn_options, t0).await
}

/// Policies are the operator's: a caller other than root may name one (the policy
/// directory's, or a built-in one) but not bring its own, since a policy chooses the
/// host user a job runs as and the paths it may write; nor may it make the daemon read
/// a file by path.
async fn check_policy_source(
    d: &Daemon,
    req: &SubmitRequest,
    requester: &Requester,
) -> Result<(), ApiError> {
    if requester.uid == 0 {
        return Ok(());
    }
    let why = if req.policy_toml.is_some() {
        "inline policies (policy_toml) are for root: ask an operator to install the policy in the policy directory and name it"
    } else if req
        .policy
        .as_deref()
        .is_some_and(|p| p.contains('/') || p.ends_with(".toml"))
    {
        "a policy given by path is for root: name a policy of the policy directory or a built-in one"
    } else {
        return Ok(());
    };
    deny(d, requester, "job.submit", None, "policy source", why).await;
    Err(ApiError::forbidden(why))
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

/// A job a spawner started, as the daemon holds it.
struct Started {
    pid: i32,
    runtime: JobRuntime,
    cgroup: Box<dyn crate::cgroup::JobCgroup>,
    plan: Box<JobPlan>,
}

/// How a caller other than root asked for more network than the policy grants, if it
/// did: a wider mode, more domains, private destinations. (Narrowing is anyone's.)
fn network_widening(plan: &JobPlan) -> Option<String> {
    let (granted, asked) = (&plan.policy.egress, &plan.egress);
    let policy = &plan.policy.name;
    if asked.mode.rank() > granted.mode.rank() {
        return Some(format!(
            "policy {policy} grants network.mode {}; only root may widen it to {}",
            granted.mode.name(),
            asked.mode.name()
        ));
    }
    if asked.allow.len() > granted.allow.len() {
        return Some(format!(
            "only root may add domains to policy {policy}'s network.allow_domains (--allow-domain)"
        ));
    }
    if asked.allow_private && !granted.allow_private {
        return Some(format!(
            "policy {policy} does not grant private destinations (network.allow_private); only root may add them"
        ));
    }
    None
}

/// Start an admitted job; answers with its info (running, or failed with the reason).
async fn start(
    d: &Arc<Daemon>,
    id: &str,
    plan: JobPlan,
    options: RunOptions,
    t0: Instant,
) -> Result<JobInfo, ApiError> {
    let _ordered = d
        .ordered(id)
        .await
        .expect("job entry exists while starting");
    // The job's own socket to the daemon, bound before the job's root is built (its
    // directory is bind-mounted there).
    let mut options = options;
    options.job_socket_dir = Some(super::jobsock::dir(d, id));
    let request = SpawnRequest {
        id: id.to_owned(),
        options,
        runtime_dir: d.opts.runtime_dir.clone(),
        state_dir: d.opts.state_dir.clone(),
        nofile: d.job_nofile,
    };
    let t_spawn = Instant::now();
    let spawned = match super::jobsock::open(d, id) {
        Ok(()) => d.spawners.spawn(request).await,
        Err(e) => Err(format!("cannot bind the job's socket: {e}")),
    };
    tracing::debug!("job {id}: spawned in {} us", t_spawn.elapsed().as_micros());
    let spawned = spawned.and_then(|job| {
        let super::spawner::SpawnedJob {
            pid,
            pidfd,
            runtime,
            proxy,
        } = job;
        // The daemon's own handle on the job's cgroup: kill, freeze, usage, removal.
        let dirs: Vec<PathBuf> = runtime.cgroup_dirs.iter().map(PathBuf::from).collect();
        match crate::cgroup::open_job_cgroup(&d.host_cgroups, &dirs) {
            Ok(cgroup) => Ok((pid, pidfd, runtime, cgroup, proxy)),
            Err(e) => {
                let mut doomed = crate::cgroup::open_job_cgroup(&d.host_cgroups, &dirs).ok();
                if let Some(c) = doomed.as_mut() {
                    let _ = c.remove();
                }
                super::jobs::pidfd_signal(&pidfd, libc::SIGKILL);
                Err(format!("cannot open the job's cgroup: {e}"))
            }
        }
    });
    match spawned {
        Ok((pid, pidfd, runtime, cgroup, proxy)) => {
            let egress = runtime.egress.clone();
            let s = Started {
                pid,
                runtime,
                cgroup,
                plan: Box::new(plan),
            };
            let latency = t0.elapsed();
            d.metrics.spawned(latency);
            let pidfd = Arc::new(pidfd);
            let (info, record, cancel, decisions) = {
                let mut jobs = d.jobs.lock().expect("jobs lock");
                let e = jobs.get_mut(id).expect("job entry exists while starting");
                let cancel = e.runtime.cancel_reason.clone();
                let mut runtime = s.runtime;
                runtime.cancel_reason = cancel.clone();
                runtime.kill_at_ms = e.runtime.kill_at_ms;
                runtime.regions = std::mem::take(&mut e.runtime.regions);
                e.runtime = runtime;
                e.info.state = JobState::Running;
                e.info.pid = Some(s.pid);
                e.info.started_ms = Some(now_ms());
                e.info.cgroup = e.runtime.cgroup_dirs.clone();
                e.recharge();
                let decisions = match e.runtime.sched {
                    Some(params) => super::sched::started(d, id, params, false),
                    None => Vec::new(),
                };
                e.cgroup = Some(Arc::new(Mutex::new(s.cgroup)));
                e.pidfd = Some(pidfd.clone());
                e.state_tx.send_replace(JobState::Running);
                (e.info.clone(), e.record(), cancel, decisions)
            };
            let op = daemon_op(
                "job.start",
                id,
                "admitted job; the pipeline allocated its cgroup and sandbox",
                serde_json::json!({"job": id, "state": {"before": "admitted", "after": "running"},
                    "pid": s.pid, "cgroup": info.cgroup, "spawn_ms": latency.as_secs_f64() * 1e3}),
                format!("agentctl kill {id}"),
            );
            if let Err(e) = d.commit(WriteBatch::job(record, op)).await {
                tracing::error!(job = %id, "job {id}: cannot record its start: {e}");
            }
            d.events.emit(
                EventKind::Started,
                Some(id),
                info.lease.as_deref(),
                format!("pid {}", s.pid),
            );
            // With --slots: it may wait for a slot (frozen), or take one from a lower class.
            super::sched::apply(d, decisions).await;
            // `proxy` mode: serve the endpoints the spawner bound in the job's namespace
            // (connections wait in their backlog until now). Without them the job has
            // no network it was promised: it is cancelled, saying why.
            if let (Some(listeners), Some(policy)) = (proxy, egress)
                && let Err(e) = super::egress::serve(d, id, s.pid, policy, listeners)
            {
                tracing::error!(job = %id, "job {id}: cannot serve its proxy: {e}");
                let (d, id) = (d.clone(), id.to_owned());
                tokio::spawn(async move {
                    let _ = super::jobs::cancel(
                        &d,
                        &id,
                        libc::SIGKILL,
                        None,
                        format!("agentd could not serve its network proxy: {e}"),
                        crate::audit::Requester::daemon(),
                        "the job's network.mode is proxy and its proxy failed".into(),
                    )
                    .await;
                });
            }
            // The job's view of itself, as soon as it runs.
            super::selfview::open(d, id);
            super::selfview::refresh_soon(d, id);
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
            super::sched::release(d, id);
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
                super::jobsock::close(d, id);
                // A review job that never ran has no change: its layers go, its
                // source is free again.
                if let Some(r) = &mut e.info.review {
                    r.state = ReviewState::Rejected;
                    super::review::release(d, &r.source, id);
                    let _ = crate::workspace::ReviewLayers::for_job(&d.opts.state_dir, id).remove();
                }
                (e.info.clone(), e.record())
            };
            let op = daemon_op(
                "job.fail",
                id,
                "the creation pipeline failed; everything it made was removed",
                serde_json::json!({"job": id, "state": {"before": "admitted", "after": "failed"}, "reason": reason}),
                "nothing to undo: nothing remains of the job",
            );
            let _ = d.commit(WriteBatch::job(record, op)).await;
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
