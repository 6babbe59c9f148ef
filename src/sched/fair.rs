//! The fair class: EEVDF (Earliest Eligible Virtual Deadline First) at job level, as
//! kernel/sched/fair.c does it for tasks.
//!
//! The maths. Each job i has a weight w_i (`weight_of_nice`, nice 0 = W0 = 1024) and a
//! requested slice r_i (CPU time per turn). When it receives δ ns of CPU time its
//! virtual runtime advances by δ·W0/w_i, so heavier jobs age slower:
//!
//!   v_i += δ · W0 / w_i
//!
//! The class's virtual time is the weighted average over its runnable jobs (queued and
//! running, as avg_vruntime includes `curr`):
//!
//!   V = Σ w_i·v_i / Σ w_i
//!
//! A job's lag is the service it is owed against an ideal fluid scheduler,
//!
//!   lag_i = w_i · (V − v_i) / W0        (ns of CPU time)
//!
//! and Σ w_i·(V − v_i) = 0 by construction. A job is eligible when lag_i ≥ 0, i.e.
//! v_i ≤ V (compared without division: v_i·Σw ≤ Σ w·v). Its virtual deadline is where
//! its slice would end in virtual time,
//!
//!   vd_i = v_i + r_i · W0 / w_i
//!
//! set when it is placed and again each time it has used a slice (update_deadline).
//! pick_next takes the eligible job with the earliest vd_i; so a job with a short slice
//! has an earlier deadline and waits less (its turns are shorter and more frequent),
//! while weights decide the share. A job that leaves (blocks, is frozen by its owner)
//! keeps its lag, clamped to ±max(2·r_i, one tick) as fair.c clamps it, and is placed at
//! v_i = V − lag_i·W0/w_i when it comes back, so sleeping earns no credit beyond that.
//! (fair.c also scales the lag by (W + w_i)/W at placement to compensate for the
//! average moving when the job joins; with many jobs that factor is close to 1 and it is
//! left out here.)
//!
//! Virtual times are kept scaled by 1024 (`VSCALE` = W0·1024) in i128, so small
//! services to heavy jobs do not round to nothing and sums never overflow.
//!
//! Structures: the queued (not running) jobs are in two sets by eligibility: the
//! ineligible ones ordered by v_i, the eligible ones ordered both by vd_i (to pick) and
//! by v_i (to move back when V falls). When V moves, jobs cross between the sets at the
//! boundary only, so pick_next is O(log n) amortized.

use super::{ClassKind, JobId, NSEC_PER_MSEC, SchedClass, SchedError, SchedParams, TickOutcome};
use std::collections::{BTreeSet, HashMap};

/// Weight of nice 0.
pub const NICE_0_WEIGHT: u64 = 1024;
const VSCALE: i128 = (NICE_0_WEIGHT as i128) * 1024;

/// Default requested slice: 3 ms of CPU time per turn (jobs are coarser than tasks).
pub const DEFAULT_SLICE: u64 = 3 * NSEC_PER_MSEC;
/// Slices a job may ask for: 0.1 ms to 100 ms, the kernel's bounds for sched_runtime.
pub const MIN_SLICE: u64 = NSEC_PER_MSEC / 10;
pub const MAX_SLICE: u64 = 100 * NSEC_PER_MSEC;

/// kernel/sched/core.c sched_prio_to_weight: nice -20..19; each step is about 10% CPU.
const PRIO_TO_WEIGHT: [u64; 40] = [
    88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916, 9548, 7620, 6100, 4904,
    3906, 3121, 2501, 1991, 1586, 1277, 1024, 820, 655, 526, 423, 335, 272, 215, 172, 137, 110, 87,
    70, 56, 45, 36, 29, 23, 18, 15,
];

/// A nice value's weight (-20..=19).
pub fn weight_of_nice(nice: i8) -> Result<u64, SchedError> {
    if !(-20..=19).contains(&nice) {
        return Err(SchedError::Invalid {
            param: "nice",
            rule: format!("{nice} is outside -20..19"),
        });
    }
    Ok(PRIO_TO_WEIGHT[(nice + 20) as usize])
}

/// Checks fair parameters with the kernel's bounds.
pub fn check(weight: u64, slice: u64) -> Result<(), SchedError> {
    if !(1..=PRIO_TO_WEIGHT[0]).contains(&weight) {
        return Err(SchedError::Invalid {
            param: "weight",
            rule: format!(
                "{weight} is outside 1..{} (nice 19..-20)",
                PRIO_TO_WEIGHT[0]
            ),
        });
    }
    if !(MIN_SLICE..=MAX_SLICE).contains(&slice) {
        return Err(SchedError::Invalid {
            param: "slice",
            rule: format!(
                "{} ms is outside 0.1 ms..100 ms (the kernel clamps sched_runtime to this)",
                slice as f64 / 1e6
            ),
        });
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Entity {
    weight: u64,
    slice: u64,
    vruntime: i128,
    deadline: i128,
    /// Service since its deadline was last set.
    used: u64,
    /// Total service.
    service: u64,
    running: bool,
    queued: bool,
    /// Lag kept while not runnable, in ns.
    saved_lag: i128,
}

#[derive(Default)]
pub struct FairClass {
    jobs: HashMap<JobId, Entity>,
    /// Σ w over runnable jobs, Σ w·v over them.
    sum_w: i128,
    sum_wv: i128,
    /// V when the class last had runnable jobs (placement when it is empty).
    last_v: i128,
    eligible_by_deadline: BTreeSet<(i128, JobId)>,
    eligible_by_vruntime: BTreeSet<(i128, JobId)>,
    waiting_by_vruntime: BTreeSet<(i128, JobId)>,
}

impl FairClass {
    pub fn new() -> FairClass {
        FairClass::default()
    }

    /// V, the weighted average virtual runtime (scaled).
    fn avg_vruntime(&self) -> i128 {
        if self.sum_w == 0 {
            self.last_v
        } else {
            self.sum_wv.div_euclid(self.sum_w)
        }
    }

    fn eligible(&self, v: i128) -> bool {
        self.sum_w == 0 || v * self.sum_w <= self.sum_wv
    }

    /// A job's lag in ns of CPU time (positive: owed service).
    pub fn lag(&self, id: JobId) -> Option<i128> {
        let e = self.jobs.get(&id)?;
        if !e.queued {
            return Some(e.saved_lag);
        }
        Some((self.avg_vruntime() - e.vruntime) * e.weight as i128 / VSCALE)
    }

    pub fn service(&self, id: JobId) -> Option<u64> {
        self.jobs.get(&id).map(|e| e.service)
    }

    /// Puts a queued, not running job into the set its eligibility says.
    fn insert_queued(&mut self, id: JobId) {
        let e = &self.jobs[&id];
        let (v, vd) = (e.vruntime, e.deadline);
        if self.eligible(v) {
            self.eligible_by_deadline.insert((vd, id));
            self.eligible_by_vruntime.insert((v, id));
        } else {
            self.waiting_by_vruntime.insert((v, id));
        }
    }

    fn remove_queued(&mut self, id: JobId) {
        let e = &self.jobs[&id];
        let (v, vd) = (e.vruntime, e.deadline);
        if !self.eligible_by_vruntime.remove(&(v, id)) {
            self.waiting_by_vruntime.remove(&(v, id));
        } else {
            self.eligible_by_deadline.remove(&(vd, id));
        }
    }

    /// Moves jobs across the eligibility boundary after V moved.
    fn rebalance(&mut self) {
        while let Some(&(v, id)) = self.waiting_by_vruntime.first() {
            if !self.eligible(v) {
                break;
            }
            self.waiting_by_vruntime.pop_first();
            self.eligible_by_vruntime.insert((v, id));
            self.eligible_by_deadline
                .insert((self.jobs[&id].deadline, id));
        }
        while let Some(&(v, id)) = self.eligible_by_vruntime.last() {
            if self.eligible(v) {
                break;
            }
            self.eligible_by_vruntime.pop_last();
            self.eligible_by_deadline
                .remove(&(self.jobs[&id].deadline, id));
            self.waiting_by_vruntime.insert((v, id));
        }
        if self.sum_w != 0 {
            self.last_v = self.avg_vruntime();
        }
    }
}

impl SchedClass for FairClass {
    fn kind(&self) -> ClassKind {
        ClassKind::Fair
    }

    fn enqueue(&mut self, id: JobId, params: SchedParams, _now: u64) -> Result<(), SchedError> {
        let SchedParams::Fair { weight, slice } = params else {
            unreachable!("the runqueue routes by class")
        };
        check(weight, slice)?;
        if self.jobs.get(&id).is_some_and(|e| e.queued) {
            return Err(SchedError::Duplicate(id));
        }
        let saved = self.jobs.get(&id).map_or(0, |e| e.saved_lag);
        let service = self.jobs.get(&id).map_or(0, |e| e.service);
        let v = self.avg_vruntime() - saved * VSCALE / weight as i128;
        let e = Entity {
            weight,
            slice,
            vruntime: v,
            deadline: v + slice as i128 * VSCALE / weight as i128,
            used: 0,
            service,
            running: false,
            queued: true,
            saved_lag: 0,
        };
        self.sum_w += weight as i128;
        self.sum_wv += weight as i128 * v;
        self.jobs.insert(id, e);
        self.rebalance();
        self.insert_queued(id);
        Ok(())
    }

    fn dequeue(&mut self, id: JobId, _now: u64) {
        let Some(e) = self.jobs.get(&id) else { return };
        if !e.queued {
            return;
        }
        let lag = self.lag(id).unwrap_or(0);
        let e = &self.jobs[&id];
        let limit = (2 * e.slice).max(NSEC_PER_MSEC) as i128;
        if !e.running {
            self.remove_queued(id);
        }
        let e = self.jobs.get_mut(&id).expect("present");
        e.saved_lag = lag.clamp(-limit, limit);
        e.queued = false;
        e.running = false;
        self.sum_w -= e.weight as i128;
        self.sum_wv -= e.weight as i128 * e.vruntime;
        self.rebalance();
    }

    fn pick_next(&mut self, _now: u64) -> Option<JobId> {
        if let Some(&(_, id)) = self.eligible_by_deadline.first() {
            return Some(id);
        }
        // Only while the running jobs hold all the eligible weight: the earliest
        // virtual runtime is the next to become eligible.
        self.waiting_by_vruntime.first().map(|&(_, id)| id)
    }

    fn set_running(&mut self, id: JobId, _now: u64) {
        if self.jobs.get(&id).is_some_and(|e| e.queued && !e.running) {
            self.remove_queued(id);
            self.jobs.get_mut(&id).expect("present").running = true;
        }
    }

    fn put_prev(&mut self, id: JobId, _now: u64) {
        if self.jobs.get(&id).is_some_and(|e| e.queued && e.running) {
            self.jobs.get_mut(&id).expect("present").running = false;
            self.rebalance();
            self.insert_queued(id);
        }
    }

    fn tick(&mut self, id: JobId, service: u64, _now: u64) -> TickOutcome {
        let Some(e) = self.jobs.get_mut(&id) else {
            return TickOutcome::Resched;
        };
        let dv = service as i128 * VSCALE / e.weight as i128;
        e.vruntime += dv;
        e.service += service;
        e.used += service;
        let expired = e.used >= e.slice;
        if expired {
            e.used = 0;
            e.deadline = e.vruntime + e.slice as i128 * VSCALE / e.weight as i128;
        }
        if e.queued {
            self.sum_wv += e.weight as i128 * dv;
        }
        self.rebalance();
        if expired {
            TickOutcome::Resched
        } else {
            TickOutcome::Continue
        }
    }

    fn update(&mut self, _now: u64) {}

    fn check_preempt(&self, running: JobId, waking: JobId) -> bool {
        match (self.jobs.get(&running), self.jobs.get(&waking)) {
            (Some(r), Some(w)) => self.eligible(w.vruntime) && w.deadline < r.deadline,
            _ => false,
        }
    }

    fn complete(&mut self, id: JobId, now: u64) {
        self.dequeue(id, now);
        self.jobs.remove(&id);
    }

    fn runnable(&self, _now: u64) -> usize {
        self.eligible_by_deadline.len() + self.waiting_by_vruntime.len()
    }

    fn describe(&self, id: JobId) -> Option<serde_json::Value> {
        let e = self.jobs.get(&id)?;
        let v = self.avg_vruntime();
        Some(serde_json::json!({
            "weight": e.weight, "slice_ns": e.slice, "service_ns": e.service,
            "lag_ns": self.lag(id).unwrap_or(0) as i64,
            "eligible": e.queued && self.eligible(e.vruntime),
            "virtual_deadline_ns": ((e.deadline - v) / 1024) as i64,
            "running": e.running,
            "queued": e.queued,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_maps_to_the_kernels_weights() {
        assert_eq!(weight_of_nice(0).unwrap(), 1024);
        assert_eq!(weight_of_nice(-20).unwrap(), 88761);
        assert_eq!(weight_of_nice(19).unwrap(), 15);
        assert!(weight_of_nice(20).is_err());
    }

    #[test]
    fn slices_outside_the_kernels_bounds_are_refused() {
        assert!(check(1024, MIN_SLICE).is_ok());
        let e = check(1024, 50_000).unwrap_err();
        assert!(
            e.to_string().starts_with("slice: 0.05 ms is outside"),
            "{e}"
        );
        assert!(check(0, DEFAULT_SLICE).is_err());
    }

    #[test]
    fn the_lags_of_runnable_jobs_sum_to_zero() {
        let mut f = FairClass::new();
        for (id, w) in [(1, 1024), (2, 2048), (3, 335)] {
            f.enqueue(
                id,
                SchedParams::Fair {
                    weight: w,
                    slice: DEFAULT_SLICE,
                },
                0,
            )
            .unwrap();
        }
        for (id, s) in [
            (1, 5 * NSEC_PER_MSEC),
            (2, NSEC_PER_MSEC),
            (3, 7 * NSEC_PER_MSEC),
        ] {
            f.set_running(id, 0);
            f.tick(id, s, 0);
            f.put_prev(id, 0);
        }
        let sum: i128 = [1, 2, 3].iter().map(|&id| f.lag(id).unwrap()).sum();
        assert!(sum.abs() <= 3, "{sum}");
    }
}
