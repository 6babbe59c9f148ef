//! The daemon's runqueue (src/sched/): admission of each job's class at submission
//! (deadline bandwidth within the CPU budget, refused with the numbers), its place in
//! the class's queue while it runs, and its release when it ends. Every job runs for
//! now (the runqueue has as many slots as jobs: no job is frozen for another); the
//! kernel shares the CPUs by what the class wrote to the job's cgroup (sched::kernel).

use super::Daemon;
use crate::sched::{JobId, Runqueue, SchedParams};

/// The runqueue's id for a job (its 12 hex digits).
pub fn job_key(id: &str) -> JobId {
    u64::from_str_radix(id, 16).unwrap_or_else(|_| {
        // Not a daemon job id: a stable hash, never 0.
        id.bytes().fold(1469598103934665603u64, |h, b| {
            (h ^ b as u64).wrapping_mul(1099511628211)
        })
    })
}

/// The name of the cgroup that holds this daemon's jobs: `agentd-jobs` for the default
/// state directory, else suffixed with a digest of the state directory, so that two
/// daemons (a test's, a second instance) never share, or remove, each other's group.
pub fn job_group_name(state_dir: &std::path::Path) -> String {
    use sha2::Digest;
    if state_dir == std::path::Path::new("/var/lib/agentd") {
        return "agentd-jobs".into();
    }
    let digest = sha2::Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("agentd-jobs-{hex}")
}

pub fn new_runqueue(cpu_budget: f64) -> std::sync::Mutex<Runqueue> {
    // The rt class's own budget: half the CPU budget, every second.
    let rt_runtime = (cpu_budget * 0.5 * 1e9) as u64;
    std::sync::Mutex::new(Runqueue::new(
        usize::MAX,
        cpu_budget,
        rt_runtime,
        crate::sched::NSEC_PER_SEC,
    ))
}

/// Admission at submission: Ok(what was admitted, for the job.admit row) or the
/// refusal with the numbers.
pub fn admit(d: &Daemon, id: &str, params: SchedParams) -> Result<String, String> {
    let mut rq = d.sched.lock().expect("runqueue lock");
    rq.admit(job_key(id), params).map_err(|e| e.to_string())?;
    Ok(match params {
        SchedParams::Deadline {
            runtime, period, ..
        } => format!(
            "class deadline: {:.4} CPUs of bandwidth admitted ({:.4} of the budget of {:.4} CPUs now)",
            runtime as f64 / period as f64,
            rq.deadline().admitted_bandwidth(),
            rq.deadline().budget()
        ),
        SchedParams::Fair { weight, slice } => format!(
            "class fair: weight {weight}, slice {:.1} ms; no admission limit",
            slice as f64 / 1e6
        ),
        SchedParams::Rt { priority } => {
            format!("class rt: priority {priority}, within the rt class budget")
        }
        SchedParams::Idle => "class idle: no admission limit".into(),
    })
}

/// The job runs: it joins its class's queue (as running).
pub fn started(d: &Daemon, id: &str, params: SchedParams) {
    let now = now_ns();
    let mut rq = d.sched.lock().expect("runqueue lock");
    let key = job_key(id);
    // An adopted job was admitted by the daemon before this one; its bandwidth is
    // reserved again here whatever the budget is now (it runs already).
    if let SchedParams::Deadline { .. } = params
        && rq.admit(key, params).is_err()
    {
        rq.force_admit(key, params);
    }
    if let Err(e) = rq.enqueue(key, params, now) {
        tracing::warn!(job = %id, "job {id}: not in the runqueue: {e}");
    }
}

/// The job ended (or never started): its place and bandwidth go. (Called with the jobs
/// lock held or not; the runqueue's lock is always taken after the jobs lock.)
pub fn release(d: &Daemon, id: &str) {
    d.sched
        .lock()
        .expect("runqueue lock")
        .complete(job_key(id), now_ns());
}

fn now_ns() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// GET /v1/sched: the budget, the admitted deadline bandwidth, and each job's class
/// with its class's view of it.
pub fn view(d: &Daemon) -> serde_json::Value {
    // The jobs lock first and alone: the daemon takes the runqueue's inside it.
    let ids: std::collections::HashMap<JobId, String> = d
        .jobs
        .lock()
        .expect("jobs lock")
        .keys()
        .map(|id| (job_key(id), id.clone()))
        .collect();
    let rq = d.sched.lock().expect("runqueue lock");
    let jobs: Vec<serde_json::Value> = rq
        .describe()
        .into_iter()
        .map(|mut j| {
            let key = j["job"].as_u64().unwrap_or(0);
            j["job"] = serde_json::json!(
                ids.get(&key)
                    .cloned()
                    .unwrap_or_else(|| format!("{key:012x}"))
            );
            j
        })
        .collect();
    serde_json::json!({
        "cpu_budget": rq.deadline().budget(),
        "cpu_budget_enforced": d.job_group.budget_enforced.is_some(),
        "job_group": d.job_group.dirs,
        "deadline_admitted": rq.deadline().admitted_bandwidth(),
        "jobs": jobs,
    })
}
