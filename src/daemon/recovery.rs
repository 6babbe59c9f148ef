//! Start-up after a crash or restart: every job the store says is unfinished is found
//! again (its init by pid and start time, its cgroup by path) and watched as before; a
//! job whose processes vanished meanwhile is recorded as ended if its status file says
//! how, else as lost; a job that never got to start is failed and its leftovers removed.

use super::{Daemon, JobEntry, JobRuntime, daemon_op, now_ms, watch};
use crate::api::types::{EventKind, JobState};
use crate::job::report::JobExit;
use crate::store::WriteBatch;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open with a pid and no flags returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a fresh fd owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads leases and jobs from the store and takes back every running job.
pub async fn recover(d: &Arc<Daemon>) -> Result<(), crate::store::StoreError> {
    for lease in d.store.leases()? {
        d.leases
            .lock()
            .expect("leases lock")
            .insert(lease.id.clone(), lease);
    }
    let records = d.store.jobs()?;
    let mut unfinished = Vec::new();
    {
        let mut jobs = d.jobs.lock().expect("jobs lock");
        for r in records {
            let runtime: JobRuntime = serde_json::from_value(r.runtime).unwrap_or_default();
            if !r.info.state.is_terminal() {
                unfinished.push(r.info.id.clone());
            }
            let mut info = r.info;
            // Reports stay in the store; `inspect` reads them from there.
            info.report = None;
            jobs.insert(info.id.clone(), JobEntry::new(info, runtime, &d.classes));
        }
    }
    super::jobs::prune_ended(d);
    let (mut adopted, mut ended) = (0, 0);
    for id in unfinished {
        if adopt(d, &id).await {
            adopted += 1;
        } else {
            ended += 1;
        }
    }
    if adopted + ended > 0 {
        tracing::info!("recovered the last run: {adopted} job(s) adopted, {ended} found ended");
    }
    // Leases that ran out while no daemon ran end now (and cancel their jobs).
    super::leases::expire_due(d).await;
    Ok(())
}

/// Takes job `id` back if its init still runs; else records how it ended.
async fn adopt(d: &Arc<Daemon>, id: &str) -> bool {
    let (info, runtime) = {
        let jobs = d.jobs.lock().expect("jobs lock");
        let e = &jobs[id];
        (e.info.clone(), e.runtime.clone())
    };
    let dirs: Vec<PathBuf> = runtime.cgroup_dirs.iter().map(PathBuf::from).collect();
    let cgroup = if dirs.is_empty() {
        None
    } else {
        crate::cgroup::open_job_cgroup(&d.host_cgroups, &dirs).ok()
    };
    let alive = match (info.pid, runtime.pid_start_ticks) {
        (Some(pid), Some(ticks)) if start_ticks(pid) == Some(ticks) => pidfd_open(pid),
        _ => None,
    };
    // A live init is adopted even if its cgroup cannot be opened (then it is watched
    // and cancelled through its pidfd alone): nothing the store says runs goes
    // unwatched.
    if let (Some(pidfd), true) = (
        alive,
        matches!(info.state, JobState::Running | JobState::Frozen),
    ) {
        let pidfd = Arc::new(pidfd);
        {
            let mut jobs = d.jobs.lock().expect("jobs lock");
            let e = jobs.get_mut(id).expect("loaded above");
            e.cgroup = cgroup.map(|c| Arc::new(Mutex::new(c)));
            e.pidfd = Some(pidfd.clone());
        }
        d.record_op(daemon_op(
            "job.adopt",
            id,
            format!(
                "found running after a daemon restart: pid {} with the recorded start time, cgroup {}",
                info.pid.unwrap_or(0),
                runtime.cgroup_dirs.join(", ")
            ),
            serde_json::json!({"job": id, "state": info.state, "pid": info.pid}),
            format!("agentctl kill {id}"),
        ))
        .await;
        d.events.emit(
            EventKind::Adopted,
            Some(id),
            info.lease.as_deref(),
            format!("pid {}", info.pid.unwrap_or(0)),
        );
        // Its socket to the daemon again: a new one in the directory the job holds.
        if let Err(e) = super::jobsock::open(d, id) {
            tracing::warn!(job = %id, "job {id}: cannot bind its socket again: {e}");
        }
        // `proxy` mode: its endpoints closed with the previous daemon; bound again in
        // the job's namespace (entered through the pidfd: no pid race) and served.
        if let Some(policy) = runtime.egress.clone()
            && let Err(e) = super::egress::readopt(d, id, info.pid.unwrap_or(0), &pidfd, policy)
        {
            tracing::warn!(job = %id, "job {id}: cannot serve its proxy again: {e}");
        }
        if let Some(params) = runtime.sched {
            let decisions = {
                let _jobs = d.jobs.lock().expect("jobs lock");
                super::sched::started(d, id, params, info.state == JobState::Frozen)
            };
            // A job that waited under the last daemon is thawed if it gets a slot now
            // (and frozen if it does not).
            let d2 = d.clone();
            tokio::spawn(async move { super::sched::apply(&d2, decisions).await });
        }
        super::selfview::open(d, id);
        super::selfview::refresh_soon(d, id);
        tokio::spawn(watch::watch(d.clone(), id.to_owned(), pidfd, false, None));
        return true;
    }
    super::jobsock::close(d, id);

    // Not running any more (or never started). Whatever is left of it goes.
    let usage = cgroup.map(|mut cg| {
        let _ = cg.kill();
        let u = cg.usage();
        let _ = cg.remove();
        u
    });
    // A removal the last daemon left half done (so the set could not be opened as a
    // whole): the rest goes by its recorded paths.
    crate::cgroup::remove_stale(&dirs);
    if !runtime.rundir.is_empty() {
        let _ = std::fs::remove_dir_all(&runtime.rundir);
    } else {
        // Died before its runtime directory was recorded: the pipeline's names.
        let rundir = d.opts.runtime_dir.join("jobs").join(id);
        let _ = std::fs::remove_dir_all(rundir);
        for parent in crate::cgroup::parent_dirs(&d.host_cgroups, d.opts.cgroup_parent.as_deref()) {
            let dir = parent.join(crate::job::cgroup_name(id));
            if dir.is_dir() {
                crate::cgroup::remove_stale(&[dir]);
            }
        }
    }
    let messages = if runtime.jobdir.is_empty() {
        Vec::new()
    } else {
        watch::read_status(&runtime.jobdir)
    };
    let (state, reason, exit) = match info.state {
        JobState::Submitted | JobState::Admitted => (
            JobState::Failed,
            "the daemon stopped before the job started".to_owned(),
            None,
        ),
        _ if !messages.is_empty() => {
            let exit =
                JobExit::from_messages(&messages, libc::CLD_KILLED, libc::SIGKILL, &|s, _| {
                    format!("{s:?}")
                });
            let state = if runtime.cancel_reason.is_some() {
                JobState::Killed
            } else {
                JobState::Exited
            };
            (
                state,
                "it ended while no daemon watched it; its status file says how".to_owned(),
                Some(watch::exit_info(&exit)),
            )
        }
        _ => (
            JobState::Lost,
            "its processes vanished while no daemon watched it, without a word of how it ended"
                .to_owned(),
            None,
        ),
    };
    let (info, record) = {
        let mut jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs.get_mut(id).expect("loaded above");
        e.info.state = state;
        e.info.waiting = false;
        e.info.reason = Some(reason.clone());
        e.info.ended_ms = Some(now_ms());
        super::review::job_ended(&mut e.info);
        e.info.pid = None;
        e.info.exit = exit;
        e.info.usage = usage.as_ref().map(super::jobs::usage_info);
        e.state_tx.send_replace(state);
        (e.info.clone(), e.record())
    };
    let op = daemon_op(
        "job.recover",
        id,
        format!("daemon restart: {reason}"),
        serde_json::json!({"job": id, "state": {"before": "running", "after": state}, "exit": info.exit}),
        "cannot be undone: the job has ended",
    );
    let _ = d.commit(WriteBatch::job(record, op)).await;
    let kind = match state {
        JobState::Lost => EventKind::Lost,
        JobState::Failed => EventKind::Failed,
        JobState::Killed => EventKind::Killed,
        _ => EventKind::Exited,
    };
    d.events.emit(kind, Some(id), info.lease.as_deref(), reason);
    false
}
