//! Jobs whose `agentd run` died without cleaning up (SIGKILL, OOM, power loss of the
//! supervisor): their init died with it (parent-death signal), but the runtime directory
//! and cgroups remain. Every `agentd run` sweeps them before allocating its own.
//!
//! A live job holds an exclusive flock on its runtime directory for as long as agentd (or
//! its init) lives; a directory whose lock can be taken belongs to a dead run.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A directory younger than this may belong to a run that has not taken its lock yet.
const MIN_AGE: Duration = Duration::from_secs(5);

/// Takes the job's lock; the returned file must live as long as the job.
pub fn lock(dir: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::File::open(dir)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Removes dead runs' leftovers below `runtime_dir/jobs`; returns the job ids removed.
/// `cgroup_parents` are where this run would create its cgroups: a run that died before
/// it published its state left its cgroups (if any) there, named agentd-ID.
pub fn sweep(runtime_dir: &Path, cgroup_parents: &[PathBuf]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(runtime_dir.join("jobs")) else {
        return Vec::new();
    };
    let mut swept = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if id.len() != 12 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let old_enough = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age >= MIN_AGE);
        if !old_enough {
            continue;
        }
        let Ok(_lock) = lock(&dir) else { continue }; // alive
        let name = format!("agentd-{id}");
        let mut cgroups: Vec<PathBuf> = std::fs::read_to_string(dir.join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["cgroup"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.as_str().map(PathBuf::from))
            // Only ever touch this job's own cgroups.
            .filter(|p| {
                p.starts_with("/sys/fs/cgroup") && p.file_name().is_some_and(|n| n == name.as_str())
            })
            .collect();
        cgroups.extend(cgroup_parents.iter().map(|p| p.join(&name)));
        crate::cgroup::remove_stale(&cgroups);
        if std::fs::remove_dir_all(&dir).is_ok() {
            let _ = std::fs::remove_dir_all(runtime_dir.join("views").join(&id));
            swept.push(id);
        }
    }
    // A view whose job directory is gone (its run died between removing the two).
    if let Ok(views) = std::fs::read_dir(runtime_dir.join("views")) {
        for v in views.flatten() {
            let old_enough = v
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age >= MIN_AGE);
            if old_enough && !runtime_dir.join("jobs").join(v.file_name()).exists() {
                let _ = std::fs::remove_dir_all(v.path());
            }
        }
    }
    swept
}
