//! One task per running job: waits for its init to exit (pidfd), enforces the
//! wall-clock timeout and the kill deadline of a cancellation, then accounts the job,
//! removes its cgroup and runtime directory, and records how it ended.

use super::{Daemon, daemon_op, jobs, now_ms};
use crate::api::types::{EventKind, ExitInfo, JobState};
use crate::job::plan::JobPlan;
use crate::job::report::{self, JobExit};
use crate::sandbox::handshake::{ChildMessage, read_all};
use crate::store::WriteBatch;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Watches job `id` until it ends. `ours`: this daemon process started it (false: adopted
/// after a restart), which the end's operation row says;
/// `plan`: present for jobs this process spawned, to put setup failures in words.
pub async fn watch(
    d: Arc<Daemon>,
    id: String,
    pidfd: Arc<OwnedFd>,
    ours: bool,
    plan: Option<Box<JobPlan>>,
) {
    // SAFETY: the Arc keeps the pidfd open, and it always names the same descriptor, for
    // as long as the AsyncFd (which holds a clone of the Arc) lives.
    let afd = match unsafe { AsyncFd::register_with_interest(pidfd.clone(), Interest::READABLE) } {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(job = %id, "job {id}: cannot watch its pidfd: {e}");
            return;
        }
    };
    loop {
        let Some((deadline, kill_at, wake)) = timers(&d, &id) else {
            return;
        };
        let next = [deadline, kill_at].into_iter().flatten().min();
        let sleep = async {
            match next {
                Some(at) => {
                    tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = afd.readable() => {
                if r.is_ok() { break; }
            }
            _ = wake.notified() => {}
            _ = sleep => {
                let now = now_ms();
                if kill_at.is_some_and(|k| now >= k) {
                    kill_cgroup(&d, &id).await;
                } else if deadline.is_some_and(|t| now >= t) {
                    let timeout = d.jobs.lock().expect("jobs lock").get(&id).and_then(|e| e.runtime.timeout_ms).unwrap_or(0);
                    let reason = format!("timed out after {}", super::human_duration(Duration::from_millis(timeout)));
                    let _ = jobs::cancel(&d, &id, libc::SIGTERM, None, reason,
                        crate::audit::Requester::daemon(),
                        "the policy's limits.timeout (or --timeout) expired".into()).await;
                }
            }
        }
    }
    finish(&d, &id, &pidfd, ours, plan.as_deref()).await;
}

/// The job's timeout deadline (unless already cancelled), its kill deadline, and its
/// wake-up; None if the job is gone.
fn timers(d: &Daemon, id: &str) -> Option<(Option<u64>, Option<u64>, Arc<tokio::sync::Notify>)> {
    let jobs = d.jobs.lock().expect("jobs lock");
    let e = jobs.get(id)?;
    let deadline = match (
        &e.runtime.cancel_reason,
        e.info.started_ms,
        e.runtime.timeout_ms,
    ) {
        (None, Some(start), Some(t)) => Some(start + t),
        _ => None,
    };
    Some((deadline, e.runtime.kill_at_ms, e.wake.clone()))
}

/// The end of a grace period: every process in the job's cgroup is killed.
async fn kill_cgroup(d: &Daemon, id: &str) {
    let (cgroup, pidfd) = {
        let mut jobs = d.jobs.lock().expect("jobs lock");
        let Some(e) = jobs.get_mut(id) else { return };
        e.runtime.kill_at_ms = None;
        (e.cgroup.clone(), e.pidfd.clone())
    };
    if let Some(p) = &pidfd {
        jobs::pidfd_signal(p, libc::SIGKILL);
    }
    if let Some(cg) = cgroup {
        let r = tokio::task::spawn_blocking(move || cg.lock().expect("cgroup lock").kill()).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(job = %id, "job {id}: killing its cgroup: {e}");
        }
    }
}

/// init's wait status if this process is its parent (reaping it), else None.
fn reap(pidfd: &OwnedFd) -> Option<(i32, i32)> {
    // SAFETY: siginfo_t is plain data the kernel fills in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(P_PIDFD) on a pidfd we hold; fails with ECHILD if not our child.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    // SAFETY: for CLD_* codes si_status is the valid union member.
    (r == 0 && unsafe { info.si_pid() } != 0).then(|| (info.si_code, unsafe { info.si_status() }))
}

/// What the job's status file says.
pub fn read_status(jobdir: &str) -> Vec<ChildMessage> {
    match std::fs::File::open(std::path::Path::new(jobdir).join("status")) {
        Ok(f) => read_all(f),
        Err(_) => Vec::new(),
    }
}

/// How a job ended, in words and statuses.
pub fn exit_info(exit: &JobExit) -> ExitInfo {
    ExitInfo {
        code: exit.code(),
        signal: match exit {
            JobExit::Signaled(s) => Some(*s),
            _ => None,
        },
        message: exit.message().unwrap_or_else(|| match exit {
            JobExit::Exited(c) => format!("exited with status {c}"),
            JobExit::Signaled(s) => format!("killed by signal {s}"),
            _ => String::new(),
        }),
    }
}

async fn finish(d: &Arc<Daemon>, id: &str, pidfd: &OwnedFd, ours: bool, plan: Option<&JobPlan>) {
    // Jobs are the spawners' children (and the daemon's, as subreaper, once a spawner
    // died); reaping fails harmlessly for an init that is someone else's.
    let wait = reap(pidfd);
    let Some(_ordered) = d.ordered(id).await else {
        return;
    };
    let (jobdir, rundir, cgroup, cgroup_dirs) = {
        let jobs = d.jobs.lock().expect("jobs lock");
        let e = &jobs[id];
        (
            e.runtime.jobdir.clone(),
            e.runtime.rundir.clone(),
            e.cgroup.clone(),
            e.runtime.cgroup_dirs.clone(),
        )
    };
    // The job's processes are gone: its proxy has nothing left to serve.
    let network = super::egress::stop(d, id);
    let messages = read_status(&jobdir);
    // Without a word from init and without its wait status (adopted job), init was
    // killed: by a cancellation or an OOM kill.
    let (si_code, si_status) = wait.unwrap_or((libc::CLD_KILLED, libc::SIGKILL));
    let exit = JobExit::from_messages(&messages, si_code, si_status, &|s, i| match plan {
        Some(p) => p.sandbox.describe(s, i),
        None => format!("{s:?}"),
    });
    // Account, then remove the cgroup (it may take a moment for the last tasks to go).
    let (usage, removal) = match cgroup {
        Some(cg) => tokio::task::spawn_blocking(move || {
            let mut cg = cg.lock().expect("cgroup lock");
            let usage = cg.usage();
            (Some(usage), cg.remove().err().map(|e| e.to_string()))
        })
        .await
        .unwrap_or((None, Some("the cleanup thread failed".into()))),
        None => (None, None),
    };
    if let Some(e) = removal {
        tracing::warn!(job = %id, "job {id}: {e}");
    }
    // Whatever the handle did not remove (a job adopted without one, or a removal a
    // killed daemon left half done) goes by its recorded paths.
    let leftover: Vec<std::path::PathBuf> = cgroup_dirs
        .iter()
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_dir())
        .collect();
    if !leftover.is_empty() {
        let _ = tokio::task::spawn_blocking(move || crate::cgroup::remove_stale(&leftover)).await;
    }
    let _ = std::fs::remove_dir_all(&rundir);
    let (info, record) = {
        let mut jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs
            .get_mut(id)
            .expect("job entry exists until its end is recorded");
        let state = if e.runtime.cancel_reason.is_some() {
            JobState::Killed
        } else if matches!(
            exit,
            JobExit::SetupFailed { .. } | JobExit::ExecFailed { .. }
        ) {
            JobState::Failed
        } else {
            JobState::Exited
        };
        let ended = now_ms();
        e.info.state = state;
        // No longer waiting for a slot: it has ended.
        e.info.waiting = false;
        e.info.exit = Some(exit_info(&exit));
        e.info.ended_ms = Some(ended);
        super::review::job_ended(&mut e.info);
        e.info.pid = None;
        e.info.reason = e.runtime.cancel_reason.clone().or_else(|| exit.message());
        e.info.usage = usage.as_ref().map(jobs::usage_info);
        if let Some(mut report) = e
            .runtime
            .report
            .take()
            .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
        {
            let wall = ended.saturating_sub(e.info.started_ms.unwrap_or(ended)) as f64 / 1e3;
            report["wall_time_sec"] = serde_json::json!(wall);
            report["exit"] = serde_json::to_value(report::exit_report(
                &exit,
                e.info
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("timed out")),
            ))
            .unwrap_or_default();
            if let Some(u) = &usage {
                report["usage"] = serde_json::to_value(u).unwrap_or_default();
            }
            if let Some(n) = &network {
                report["network"] = serde_json::to_value(n).unwrap_or_default();
            }
            e.info.report = Some(report);
        }
        e.cgroup = None;
        e.pidfd = None;
        (e.info.clone(), e.record())
    };
    let exit_text = info
        .exit
        .as_ref()
        .map(|x| x.message.clone())
        .unwrap_or_default();
    let op = daemon_op(
        "job.exit",
        id,
        match (&info.reason, ours) {
            (Some(r), _) if info.state == JobState::Killed => format!("cancelled: {r}"),
            (_, true) => "the job's init ended; its status file says how".to_owned(),
            (_, false) => "the adopted job's init ended; its status file says how".to_owned(),
        },
        serde_json::json!({"job": id, "state": {"before": "running", "after": info.state},
            "exit": info.exit, "usage": info.usage}),
        "cannot be undone: the job has ended; its cgroup and runtime directory were removed",
    );
    if let Err(e) = d.commit(WriteBatch::job(record, op)).await {
        tracing::error!(job = %id, "job {id}: cannot record its end: {e}");
    }
    // Recorded: the report now lives in the store, where `inspect` reads it, and no
    // longer in memory (a daemon keeps every job it ran).
    if let Some(e) = d.jobs.lock().expect("jobs lock").get_mut(id) {
        e.info.report = None;
        // Its context segments went with it (they live while the job runs).
        e.context.clear();
        super::sched::release(d, id);
        e.recharge();
    }
    jobs::prune_ended(d);
    let kind = match info.state {
        JobState::Killed => EventKind::Killed,
        JobState::Failed => EventKind::Failed,
        _ => EventKind::Exited,
    };
    d.metrics.ended(info.state);
    d.events
        .emit(kind, Some(id), info.lease.as_deref(), exit_text.clone());
    super::jobsock::close(d, id);
    if let Some(snapshot) = &info.snapshot {
        super::snapshots::released(d, snapshot).await;
    }
    // Waiters hear of the end only now: once it is on disk, counted and announced, so
    // whoever `wait` answers finds the job.exit row and the event already there.
    if let Some(e) = d.jobs.lock().expect("jobs lock").get(id) {
        e.state_tx.send_replace(info.state);
    }
}
