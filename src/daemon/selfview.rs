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
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
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
    /// A hash of each file's content as last written, in the order of the (fixed) set
    /// of files.
    written: Vec<u64>,
    /// The counters that turn into events, as last seen.
    throttled_usec: Option<u64>,
    oom_kills: Option<u64>,
    /// The parts of the job's start report the view shows (limits, grants), as compact
    /// JSON text: parsed again at each refresh, which costs less than keeping the
    /// parsed document for every running job.
    start_report: Option<Arc<str>>,
}

fn hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
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
    view.throttled_usec = throttled.or(view.throttled_usec);
    view.oom_kills = ooms.or(view.oom_kills);
    if view.written.len() != files.len() {
        view.written = vec![0; files.len()];
    }
    for (i, (name, content)) in files.iter().enumerate() {
        let h = hash(content);
        if view.written[i] == h {
            continue;
        }
        if let Err(e) = write_atomic(&dir, name, content) {
            tracing::warn!(job = %id, "job {id}: cannot write its view {name}: {e}");
            return;
        }
        view.written[i] = h;
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

/// Writes `dir/name` atomically. `dir` (the view) and the directories in `name` are
/// made as needed, but never the job's own directory above them: a job that ended
/// meanwhile took it away, and it must not come back.
fn write_atomic(dir: &Path, name: &str, content: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = dir.join(name);
    let parent = path.parent().expect("a file below the view");
    let mut made = dir.to_path_buf();
    let below = parent.strip_prefix(dir).unwrap_or(Path::new(""));
    for part in std::iter::once(std::ffi::OsStr::new("")).chain(below.iter()) {
        if !part.is_empty() {
            made.push(part);
        }
        match std::fs::DirBuilder::new().mode(0o755).create(&made) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    let tmp = parent.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f")
    ));
    std::fs::write(&tmp, content)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, &path)
}

fn or_none<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "none".to_owned(), |v| v.to_string())
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
            // Only what the view shows is kept (the whole report is ten times larger).
            let e = &full["enforced"];
            json!({
                "limits": full["limits"],
                "network": full["network"],
                "enforced": {
                    "filesystem": e["filesystem"],
                    "landlock": {"tcp_bind": e["landlock"]["tcp_bind"],
                        "tcp_connect": e["landlock"]["tcp_connect"]},
                    "cgroup": {"limits_applied": e["cgroup"]["limits_applied"]},
                },
            })
            .to_string()
            .into()
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

    let limits = &start_report["limits"];
    let memory_limit = limits["memory"].as_u64();
    let pids_limit = limits["pids"].as_u64();
    // The CPU bandwidth the job's cgroup carries: "QUOTA PERIOD" in µs, or "max".
    let applied = &start_report["enforced"]["cgroup"]["limits_applied"];
    let cpu_max = match (
        applied["cpu.max"].as_str(),
        applied["cpu.cfs_quota_us"].as_str(),
        applied["cpu.cfs_period_us"].as_str(),
    ) {
        (Some(max), _, _) => max.to_owned(),
        (None, Some(q), Some(p)) => format!("{q} {p}"),
        _ => "max".to_owned(),
    };
    let pressure = |what: &str| -> String {
        for dir in &cgroup_dirs {
            if let Ok(text) =
                std::fs::read_to_string(Path::new(dir).join(format!("{what}.pressure")))
            {
                return text;
            }
        }
        "unavailable: the kernel reports pressure per cgroup on cgroup v2 only\n".into()
    };
    let denials: Vec<Value> = network["denials"].as_array().cloned().unwrap_or_default();
    let denial_lines: String = denials
        .iter()
        .map(|d| {
            format!(
                "{} {}: {} [{}]\n",
                d["protocol"].as_str().unwrap_or(""),
                d["destination"].as_str().unwrap_or(""),
                d["reason"].as_str().unwrap_or(""),
                d["rule"].as_str().unwrap_or("")
            )
        })
        .collect();
    let grants_fs: String = start_report["enforced"]["filesystem"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|g| {
                    format!(
                        "{} {} {}\n",
                        g["access"].as_str().unwrap_or(""),
                        g["path"].as_str().unwrap_or(""),
                        g["rule"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let u = usage.unwrap_or_default();
    let headroom = |limit: Option<u64>, used: Option<u64>| match (limit, used) {
        (Some(l), Some(u)) => Some(l.saturating_sub(u)),
        _ => None,
    };

    let all = json!({
        "identity": {"job_id": id, "agent": info.agent, "model": info.model,
            "policy": info.policy, "policy_sha256": info.policy_hash},
        "state": info.state,
        "limits": limits,
        "usage": {
            "cpu_usec": u.cpu_usec, "memory_bytes": u.memory_bytes,
            "memory_headroom_bytes": headroom(memory_limit, u.memory_bytes),
            "peak_memory_bytes": u.peak_memory_bytes, "pids": u.pids,
            "pids_headroom": headroom(pids_limit, u.pids),
            "oom_kills": u.oom_kills, "throttled_usec": u.throttled_usec,
        },
        "pressure": {"cpu": pressure("cpu"), "memory": pressure("memory"), "io": pressure("io")},
        "sched": {"class": "fair", "cpu_max": cpu_max},
        "lease": lease.as_ref().map(|(l, e)| json!({"id": l, "expires_ms": e})),
        "grants": {"filesystem": start_report["enforced"]["filesystem"], "network": {
            "mode": network["mode"], "allow_domains": network["allow_domains"],
            "allow_private": network["allow_private"],
            "tcp_bind": start_report["enforced"]["landlock"]["tcp_bind"],
            "tcp_connect": start_report["enforced"]["landlock"]["tcp_connect"]}},
        "denials": denials,
        "denied_total": network["denied"],
    });

    let text = |v: &Value| match v {
        Value::Null => "none".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut files = BTreeMap::new();
    let mut put = |name: &str, content: String| {
        let content = if content.ends_with('\n') {
            content
        } else {
            content + "\n"
        };
        files.insert(name.to_owned(), content);
    };
    for key in ["job_id", "agent", "model", "policy", "policy_sha256"] {
        put(&format!("identity/{key}"), text(&all["identity"][key]));
    }
    put("state", text(&all["state"]));
    for key in ["cpu", "memory", "pids", "timeout"] {
        put(&format!("limits/{key}"), text(&limits[key]));
    }
    for (key, v) in all["usage"].as_object().expect("an object") {
        put(&format!("usage/{key}"), text(v));
    }
    for key in ["cpu", "memory", "io"] {
        put(&format!("pressure/{key}"), text(&all["pressure"][key]));
    }
    put("sched/class", "fair".into());
    put("sched/cpu_max", cpu_max.clone());
    put("lease/id", or_none(lease.as_ref().map(|(l, _)| l.clone())));
    put(
        "lease/expires_ms",
        or_none(lease.as_ref().and_then(|(_, e)| *e)),
    );
    put("grants/filesystem", grants_fs);
    put(
        "grants/network",
        format!(
            "mode {}\nallow_domains {}\nallow_private {}\n",
            text(&network["mode"]),
            network["allow_domains"]
                .as_array()
                .map(|a| a.iter().map(text).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            text(&network["allow_private"])
        ),
    );
    put("denials", denial_lines);
    put("json", format!("{all:#}"));
    Some((files, compact))
}
