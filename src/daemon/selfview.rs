//! A job's own state as files, at /run/agentd/self inside the job: its identity, grants,
//! limits and current usage, pressure, scheduling, lease, and the denials so far with the
//! rule and the reason. One small plain-text file per fact, plus `json` with all of it,
//! so an agent that was refused something can read why instead of parsing logs.
//!
//! A file tree the daemon keeps current, not FUSE: the tree lives in the job's own
//! directory (`jobsock::dir`, bind-mounted read-only at /run/agentd), so a read is a
//! tmpfs read that costs the daemon nothing and never blocks on it, and the view
//! survives a daemon restart (a FUSE mount would fail with ENOTCONN until a new daemon
//! served it). The price is freshness: usage is rewritten once a second; identity,
//! grants and denials when they change (a denial at once). Only files whose content
//! changed are rewritten, each atomically (a temporary file renamed over it), so a
//! reader never sees half a file. Nothing outside the job's own state is written there.

use super::Daemon;
use crate::api::types::EventKind;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often usage and pressure are rewritten.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Per job: the files last written, so unchanged ones are not rewritten, and its report
/// as of its start (parsed once: limits and grants do not change).
#[derive(Default)]
pub struct SelfViews {
    open: Mutex<HashMap<String, View>>,
}

/// Kept small: a thousand running jobs each have one.
#[derive(Default)]
struct View {
    /// What was written last.
    writer: crate::job::selfview::Writer,
    /// The counters that turn into events, as last seen.
    throttled_usec: Option<u64>,
    oom_kills: Option<u64>,
    throttled_periods: Option<u64>,
    /// The parts of the job's start report the view shows (limits, grants), as compact
    /// JSON text: parsed again at each refresh, which costs less than keeping the
    /// parsed document for every running job.
    start_report: Option<Arc<str>>,
}

/// The view's directory inside the job's directory.
pub fn dir(d: &Daemon, id: &str) -> PathBuf {
    super::jobsock::dir(d, id).join("self")
}

/// Rewrites job `id`'s view (what changed of it). Blocking file I/O: call it from a
/// blocking thread or where a few small tmpfs writes do not matter.
pub fn refresh(d: &Daemon, id: &str) {
    let Some(cached) = d
        .selfviews
        .open
        .lock()
        .expect("self views lock")
        .get(id)
        .map(|v| v.start_report.clone())
    else {
        return;
    };
    let Some((files, start_report)) = snapshot(d, id, cached) else {
        return;
    };
    let dir = dir(d, id);
    let mut all = d.selfviews.open.lock().expect("self views lock");
    // Only a view that is open: `forget` closes it (under this lock) before the job's
    // directory is removed, so a job that has ended is never written again. (No other
    // lock is taken while this one is held: `forget` is called with the jobs lock held.)
    let Some(view) = all.get_mut(id) else {
        return;
    };
    view.start_report = Some(start_report);
    // Throttling and OOM kills since the last look become events (the view is where
    // usage is read once a second anyway).
    let counter = |f: &str| -> Option<u64> { files.get(f).and_then(|v| v.trim().parse().ok()) };
    let (throttled, ooms) = (counter("usage/throttled_usec"), counter("usage/oom_kills"));
    for (before, now, kind) in [
        (view.throttled_usec, throttled, EventKind::Throttled),
        (view.oom_kills, ooms, EventKind::OomKill),
    ] {
        if let (Some(before), Some(now)) = (before, now)
            && now > before
        {
            let detail = match kind {
                EventKind::Throttled => format!(
                    "held back {:.3}s by its CPU limit (cpu.max {})",
                    (now - before) as f64 / 1e6,
                    files.get("sched/cpu_max").map_or("", |s| s.trim())
                ),
                _ => format!(
                    "{} process(es) OOM-killed at its memory limit of {} bytes",
                    now - before,
                    files.get("limits/memory").map_or("", |s| s.trim())
                ),
            };
            d.events.emit(kind, Some(id), None, detail);
        }
    }
    // A deadline job throttled in a period used up its runtime there: an overrun.
    let periods = counter("usage/throttled_periods");
    if files.get("sched/class").map(|c| c.trim()) == Some("deadline")
        && let (Some(before), Some(now)) = (view.throttled_periods, periods)
        && now > before
    {
        d.metrics
            .deadline_overruns
            .fetch_add(now - before, std::sync::atomic::Ordering::Relaxed);
        d.events.emit(
            EventKind::DeadlineOverrun,
            Some(id),
            None,
            format!(
                "used up its runtime in {} period(s) since the last look and was throttled until the next (cpu.max {})",
                now - before,
                files.get("sched/cpu_max").map_or("", |s| s.trim())
            ),
        );
    }
    view.throttled_periods = periods.or(view.throttled_periods);
    view.throttled_usec = throttled.or(view.throttled_usec);
    view.oom_kills = ooms.or(view.oom_kills);
    if let Err(e) = view.writer.write_changed(&dir, &files) {
        tracing::warn!(job = %id, "job {id}: cannot write its view: {e}");
    }
}

/// Opens job `id`'s view: from now on `refresh` writes it (a job that started or was
/// adopted).
pub fn open(d: &Daemon, id: &str) {
    d.selfviews
        .open
        .lock()
        .expect("self views lock")
        .entry(id.to_owned())
        .or_default();
}

/// Closes job `id`'s view for good (its directory goes with the job's).
pub fn forget(d: &Daemon, id: &str) {
    d.selfviews.open.lock().expect("self views lock").remove(id);
}

/// Refreshes every running or frozen job's view once per `REFRESH`, for as long as the
/// daemon runs.
pub async fn refresh_loop(d: Arc<Daemon>) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The object classes' allocation rate is sampled on the same clock.
        d.classes.sample();
        let ids: Vec<String> = d
            .jobs
            .lock()
            .expect("jobs lock")
            .iter()
            .filter(|(_, e)| e.pidfd.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        if ids.is_empty() {
            continue;
        }
        let d2 = d.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for id in ids {
                refresh(&d2, &id);
            }
        })
        .await;
    }
}

/// Refreshes job `id`'s view soon, off the caller's thread (a denial, a state change).
pub fn refresh_soon(d: &Arc<Daemon>, id: &str) {
    let (d, id) = (d.clone(), id.to_owned());
    tokio::task::spawn_blocking(move || refresh(&d, &id));
}

/// Every file of the view, from the daemon's knowledge of job `id`; None if it is gone.
fn snapshot(
    d: &Daemon,
    id: &str,
    cached: Option<Arc<str>>,
) -> Option<(BTreeMap<String, String>, Arc<str>)> {
    // Only what the view shows, under the lock (not the job's tool calls or report text).
    struct Facts {
        agent: String,
        model: String,
        policy: String,
        policy_hash: String,
        state: crate::api::types::JobState,
        lease: Option<String>,
        refusals: Vec<Value>,
    }
    let (info, cgroup_dirs, cgroup, membrane) = {
        let jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs.get(id)?;
        (
            Facts {
                agent: e.info.agent.clone(),
                model: e.info.model.clone(),
                policy: e.info.policy.clone(),
                policy_hash: e.info.policy_hash.clone(),
                state: e.info.state,
                lease: e.info.lease.clone(),
                refusals: e.context.refusals.iter().cloned().collect(),
            },
            e.runtime.cgroup_dirs.clone(),
            e.cgroup.clone(),
            e.egress.as_ref().map(|(m, _)| m.clone()),
        )
    };
    let compact: Arc<str> = match cached {
        Some(r) => r,
        None => {
            // Parsed outside the jobs lock.
            let text = d
                .jobs
                .lock()
                .expect("jobs lock")
                .get(id)
                .and_then(|e| e.runtime.report.clone());
            let full: Value = text
                .and_then(|r| serde_json::from_str(&r).ok())
                .unwrap_or(Value::Null);
            crate::job::selfview::compact_start_report(&full).into()
        }
    };
    let start_report: Value = serde_json::from_str(&compact).unwrap_or(Value::Null);
    let usage = cgroup.map(|c| c.lock().expect("cgroup lock").usage());
    let network = membrane
        .map(|m| serde_json::to_value(m.report()).unwrap_or_default())
        .unwrap_or_else(|| start_report["network"].clone());
    let lease = info.lease.as_ref().map(|l| {
        let expires = d
            .leases
            .lock()
            .expect("leases lock")
            .get(l)
            .map(|l| l.expires_ms);
        (l.clone(), expires)
    });

    let facts = crate::job::selfview::Facts {
        job_id: id,
        agent: &info.agent,
        model: &info.model,
        policy: &info.policy,
        policy_sha256: &info.policy_hash,
        state: info.state.to_string(),
        lease,
        cgroup_dirs: &cgroup_dirs,
        objects: super::jobsock::job_objects(d, id),
        refusals: info.refusals,
    };
    let files =
        crate::job::selfview::render(&facts, &start_report, usage.unwrap_or_default(), &network);
    Some((files, compact))
}
