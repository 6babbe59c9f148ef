//! The daemon's runqueue (src/sched/): admission of each job's class at submission
//! (deadline bandwidth within the CPU budget, refused with the numbers), its place in
//! the class's queue while it runs, and its release when it ends.
//!
//! Slots. With `--slots N` at most N jobs run at once; the runqueue hands the slots out
//! by class (deadline, rt, fair, idle) and the daemon carries its decisions out: a job
//! that loses its slot is frozen (cgroup freezer) and marked `waiting` (its state stays
//! running: it is not frozen by its owner), a job that gets one is thawed. Every tick
//! (`--sched-tick`) the running fair and idle jobs are charged the CPU time their
//! cgroups accounted, so EEVDF rotates the fair slots by lag and virtual deadline. The
//! deadline and rt classes' budgets are the kernel's to enforce (cpu.max on each job,
//! written at creation), so they are charged nothing here and keep their slots while
//! they run; their throttling is the kernel's, and shows as `deadline-overrun` events.
//! Each preemption and resumption is an event and an operation row with its reason.
//! Without `--slots` every admitted job runs and nothing is frozen.

use super::{Daemon, daemon_op};
use crate::api::types::{EventKind, JobState};
use crate::sched::{Decision, JobId, Runqueue, SchedParams};
use crate::store::WriteBatch;
use std::collections::HashMap;
use std::sync::Arc;

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

pub fn new_runqueue(cpu_budget: f64, slots: Option<usize>) -> std::sync::Mutex<Runqueue> {
    // The rt class's own budget: half the CPU budget, every second.
    let rt_runtime = (cpu_budget * 0.5 * 1e9) as u64;
    std::sync::Mutex::new(Runqueue::new(
        slots.unwrap_or(usize::MAX),
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

/// The job runs: it joins its class's queue. With slots, it may have to wait: the
/// decisions (for it and others) are for `apply`. A job its owner froze is admitted
/// (bandwidth reserved) but not queued. (Called with the jobs lock held.)
#[must_use]
pub fn started(d: &Daemon, id: &str, params: SchedParams, frozen: bool) -> Vec<Decision> {
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
    let mut out = match rq.enqueue(key, params, now) {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(job = %id, "job {id}: not in the runqueue: {e}");
            return Vec::new();
        }
    };
    if frozen {
        out.extend(rq.dequeue(key, now));
        return out;
    }
    if !rq.is_running(key) {
        // No slot for it now: it waits.
        out.push(Decision::Preempt {
            job: key,
            by: 0,
            reason: "every slot is taken; it waits for its turn",
        });
    }
    out
}

/// Its owner froze it: it leaves the queue (another job may take its slot).
#[must_use]
pub fn owner_froze(d: &Daemon, id: &str) -> Vec<Decision> {
    d.sched
        .lock()
        .expect("runqueue lock")
        .dequeue(job_key(id), now_ns())
}

/// Its owner thawed it: it joins the queue again. (true, ...) if it holds a slot now
/// (thaw it), (false, ...) if it waits (leave it frozen); and the decisions for others.
pub fn owner_thawed(d: &Daemon, id: &str, params: SchedParams) -> (bool, Vec<Decision>) {
    let mut rq = d.sched.lock().expect("runqueue lock");
    let key = job_key(id);
    let now = now_ns();
    // Dequeued jobs keep their class entry; enqueue puts them back in the queue.
    let mut decisions = rq.dequeue(key, now);
    decisions.extend(rq.enqueue(key, params, now).unwrap_or_default());
    (rq.is_running(key), decisions)
}

/// The job ended (or never started): its place and bandwidth go; a waiting job may get
/// its slot. (Called with the jobs lock held or not; the runqueue's lock is always
/// taken after the jobs lock.)
pub fn release(d: &Arc<Daemon>, id: &str) {
    let decisions = d
        .sched
        .lock()
        .expect("runqueue lock")
        .complete(job_key(id), now_ns());
    if !decisions.is_empty() {
        let d = d.clone();
        tokio::spawn(async move { apply(&d, decisions).await });
    }
}

/// Carries decisions out: freezes the jobs that lost a slot, thaws those that got one,
/// and records each change (event, operation row). One at a time, in order.
pub async fn apply(d: &Arc<Daemon>, decisions: Vec<Decision>) {
    if decisions.is_empty() {
        return;
    }
    let _one_at_a_time = d.sched_apply.lock().await;
    for decision in decisions {
        let (key, run) = match decision {
            Decision::Run { job, .. } => (job, true),
            Decision::Preempt { job, .. } | Decision::Yield { job } => (job, false),
            Decision::Throttle { job, .. } => (job, false),
        };
        // The job, if it still runs (not ended, not frozen by its owner).
        let found = {
            let jobs = d.jobs.lock().expect("jobs lock");
            jobs.iter()
                .find(|(id, _)| job_key(id) == key)
                .filter(|(_, e)| e.info.state == JobState::Running)
                .and_then(|(id, e)| Some((id.clone(), e.cgroup.clone()?, e.info.waiting)))
        };
        let Some((id, cgroup, waiting)) = found else {
            continue;
        };
        let result = tokio::task::spawn_blocking(move || {
            let cg = cgroup.lock().expect("cgroup lock");
            if run { cg.thaw() } else { cg.freeze() }
        })
        .await;
        let outcome = match result {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = outcome {
            tracing::warn!(job = %id, "job {id}: the runqueue's decision failed: {e}");
            continue;
        }
        if run != waiting {
            continue; // no change: it ran (or waited) already
        }
        let record = {
            let mut jobs = d.jobs.lock().expect("jobs lock");
            let Some(e) = jobs.get_mut(&id) else { continue };
            e.info.waiting = !run;
            e.record()
        };
        let (action, kind, why, undo) = match decision {
            Decision::Run { class, .. } => (
                "sched.resume",
                EventKind::Resumed,
                format!("the runqueue gave it a slot (class {class:?})").to_lowercase(),
                "none needed: the runqueue takes the slot back when another job's turn comes",
            ),
            Decision::Preempt { by, reason, .. } => (
                "sched.preempt",
                EventKind::Preempted,
                if by == 0 {
                    reason.to_owned()
                } else {
                    format!("{reason} (job {by:012x})")
                },
                "none needed: the runqueue thaws it when its turn comes",
            ),
            Decision::Yield { .. } => (
                "sched.preempt",
                EventKind::Preempted,
                "its turn ended (slice used) and an eligible job with an earlier virtual deadline was waiting".to_owned(),
                "none needed: the runqueue thaws it when its turn comes",
            ),
            Decision::Throttle { until, .. } => (
                "sched.preempt",
                EventKind::Preempted,
                format!("its class's budget is spent until {until} ns"),
                "none needed: the runqueue thaws it when the budget is replenished",
            ),
        };
        if !run {
            d.metrics
                .preemptions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let op = daemon_op(
            action,
            &id,
            format!("runqueue (--slots): {why}"),
            serde_json::json!({"job": id, "waiting": {"before": waiting, "after": !run}}),
            undo,
        );
        if let Err(e) = d.commit(WriteBatch::job(record, op)).await {
            tracing::warn!(job = %id, "job {id}: cannot record the runqueue's decision: {e}");
        }
        d.events.emit(kind, Some(&id), None, why);
    }
}

/// Every tick (with `--slots` only): charges the running fair and idle jobs the CPU
/// time their cgroups accounted since the last tick, and carries out what the
/// runqueue decides.
pub async fn tick_loop(d: Arc<Daemon>) {
    let mut tick = tokio::time::interval(d.opts.sched_tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last: HashMap<JobId, u64> = HashMap::new();
    let mut asleep = std::collections::HashSet::new();
    // Deadline jobs waiting for a slot: since when (ns), and the misses counted so far.
    let mut starved: HashMap<String, (u64, u64)> = HashMap::new();
    loop {
        tick.tick().await;
        count_misses(&d, &mut starved);
        let dd = d.clone();
        let prev = std::mem::take(&mut last);
        let mut sleepers = std::mem::take(&mut asleep);
        let Ok((decisions, seen, sleepers)) = tokio::task::spawn_blocking(move || {
            let (decisions, seen) = tick_once(&dd, &prev, &mut sleepers);
            (decisions, seen, sleepers)
        })
        .await
        else {
            continue;
        };
        last = seen;
        asleep = sleepers;
        apply(&d, decisions).await;
    }
}

/// A deadline job that waits for a slot misses a deadline for each whole period that
/// passes: an event and the metric for each tick that adds some.
fn count_misses(d: &Daemon, starved: &mut HashMap<String, (u64, u64)>) {
    let now = now_ns();
    let waiting: Vec<(String, u64)> = d
        .jobs
        .lock()
        .expect("jobs lock")
        .iter()
        .filter(|(_, e)| e.info.state == JobState::Running && e.info.waiting)
        .filter_map(|(id, e)| match e.runtime.sched {
            Some(SchedParams::Deadline { period, .. }) => Some((id.clone(), period.max(1))),
            _ => None,
        })
        .collect();
    starved.retain(|id, _| waiting.iter().any(|(w, _)| w == id));
    for (id, period) in waiting {
        let (since, counted) = *starved.entry(id.clone()).or_insert((now, 0));
        let missed = (now - since) / period;
        if missed > counted {
            starved.insert(id.clone(), (since, missed));
            d.metrics
                .deadline_misses
                .fetch_add(missed - counted, std::sync::atomic::Ordering::Relaxed);
            d.events.emit(
                EventKind::DeadlineMiss,
                Some(&id),
                None,
                format!(
                    "{} period(s) of {:.1} ms passed while it waited for a slot ({missed} since it began to wait)",
                    missed - counted,
                    period as f64 / 1e6
                ),
            );
        }
    }
}

/// A running fair or idle job that used less than this share of a tick is asleep
/// (waiting on the network, a model's answer, a child): it gives its slot up without
/// being frozen, as a task that blocks leaves the kernel's runqueue.
const ASLEEP_SHARE: u64 = 100; // 1 %

/// One tick: (decisions, each fair or idle job's cgroup CPU time in µs now). `asleep`:
/// the jobs that gave their slot up because they slept (thawed, not queued); one that
/// uses the CPU again wakes up and queues for a slot (and waits, frozen, if none).
fn tick_once(
    d: &Daemon,
    last: &HashMap<JobId, u64>,
    asleep: &mut std::collections::HashSet<JobId>,
) -> (Vec<Decision>, HashMap<JobId, u64>) {
    // The fair and idle jobs and their cgroups: the running ones are charged; the
    // waiting ones' usage (still while frozen) is the base for their first turn; the
    // sleeping ones' shows when they wake.
    let charged: Vec<(JobId, SchedParams, _)> = {
        let jobs = d.jobs.lock().expect("jobs lock");
        jobs.iter()
            .filter(|(_, e)| e.info.state == JobState::Running)
            .filter_map(|(id, e)| match e.runtime.sched {
                Some(p @ (SchedParams::Fair { .. } | SchedParams::Idle)) => {
                    Some((job_key(id), p, e.cgroup.clone()?))
                }
                _ => None,
            })
            .collect()
    };
    // Read outside the locks: a few small files per job.
    let mut now_usage = HashMap::new();
    for (key, _, cg) in &charged {
        if let Some(usec) = cg.lock().expect("cgroup lock").usage().cpu_usec {
            now_usage.insert(*key, usec);
        }
    }
    // ns of CPU since the last tick, for jobs seen at both.
    let used = |key: &JobId| -> Option<u64> {
        Some(now_usage.get(key)?.saturating_sub(*last.get(key)?) * 1000)
    };
    let tick_ns = d.opts.sched_tick.as_nanos() as u64;
    asleep.retain(|k| now_usage.contains_key(k));
    let _jobs = d.jobs.lock().expect("jobs lock");
    let mut rq = d.sched.lock().expect("runqueue lock");
    let now = now_ns();
    // Only a job that held its slot through the last tick can be seen asleep (one that
    // got its slot just now used nothing while it waited).
    let held: std::collections::HashSet<JobId> = charged
        .iter()
        .map(|(k, _, _)| *k)
        .filter(|k| rq.is_running(*k))
        .collect();
    let mut decisions = rq.tick(now, |key| used(&key).unwrap_or(0));
    for (key, params, _) in &charged {
        let Some(ns) = used(key) else { continue };
        let sleeping = ns < tick_ns / ASLEEP_SHARE;
        if sleeping && held.contains(key) && rq.is_running(*key) {
            // Asleep: its slot goes to a waiting job; it stays thawed.
            decisions.extend(rq.dequeue(*key, now));
            asleep.insert(*key);
        } else if !sleeping && asleep.remove(key) {
            // Awake again: it queues for a slot.
            decisions.extend(rq.enqueue(*key, *params, now).unwrap_or_default());
            if !rq.is_running(*key) {
                decisions.push(Decision::Preempt {
                    job: *key,
                    by: 0,
                    reason: "it woke from sleep and every slot is taken; it waits for its turn",
                });
            }
        }
    }
    (decisions, now_usage)
}

fn now_ns() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// GET /v1/sched: the budget, the slots, and each job's class with its class's view of
/// it (lag, virtual deadline, service...), whether it waits, and the CPU and throttled
/// time its cgroup accounted.
pub fn view(d: &Daemon) -> serde_json::Value {
    // The jobs lock first and alone: the daemon takes the runqueue's inside it.
    let jobs: HashMap<JobId, (String, bool, Option<_>)> = d
        .jobs
        .lock()
        .expect("jobs lock")
        .iter()
        .map(|(id, e)| (job_key(id), (id.clone(), e.info.waiting, e.cgroup.clone())))
        .collect();
    let (described, budget, admitted, slots) = {
        let rq = d.sched.lock().expect("runqueue lock");
        (
            rq.describe(),
            rq.deadline().budget(),
            rq.deadline().admitted_bandwidth(),
            d.opts.slots,
        )
    };
    let mut waiting = 0;
    let jobs: Vec<serde_json::Value> = described
        .into_iter()
        .map(|mut j| {
            let key = j["job"].as_u64().unwrap_or(0);
            let Some((id, waits, cgroup)) = jobs.get(&key) else {
                j["job"] = serde_json::json!(format!("{key:012x}"));
                return j;
            };
            j["job"] = serde_json::json!(id);
            j["waiting"] = serde_json::json!(waits);
            waiting += *waits as usize;
            if let Some(cg) = cgroup {
                let u = cg.lock().expect("cgroup lock").usage();
                j["cpu_usec"] = serde_json::json!(u.cpu_usec);
                j["throttled_usec"] = serde_json::json!(u.throttled_usec);
            }
            j
        })
        .collect();
    serde_json::json!({
        "cpu_budget": budget,
        "cpu_budget_enforced": d.job_group.budget_enforced.is_some(),
        "job_group": d.job_group.dirs,
        "deadline_admitted": admitted,
        "slots": slots,
        "waiting": waiting,
        "jobs": jobs,
    })
}
