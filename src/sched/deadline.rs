//! The deadline class: SLAs as SCHED_DEADLINE gives them to tasks (CBS + EDF), for jobs.
//!
//! The maths. A job asks for `runtime` of CPU time every `period`, delivered within
//! `deadline` of the period's start, with runtime ≤ deadline ≤ period. Its bandwidth is
//!
//!   u_i = runtime_i / period_i          (CPUs)
//!
//! Admission control: a job is admitted only if Σ u_i over admitted jobs, its own
//! included, stays within the class's budget (CPUs). Under that bound EDF meets every
//! admitted job's deadlines on the slots it has (Liu & Layland: Σu ≤ 1 per CPU when
//! deadline = period; with deadline < period the density test Σ runtime/deadline ≤ 1 is
//! the sufficient one, which the budget should then allow for).
//!
//! Enforcement (the constant bandwidth server): at the start of each period the job's
//! remaining runtime is refilled to `runtime` and its absolute deadline set to period
//! start + `deadline`. Running consumes the remaining runtime; at zero the job is
//! throttled until the next period (an overrun: it wanted more than it reserved). Among
//! runnable deadline jobs the earliest absolute deadline runs first (EDF). A job that
//! was runnable when its absolute deadline passed with runtime left was not given the
//! CPU it reserved: a missed deadline. Both are counted and become events.
//!
//! On the kernel side the same numbers become cpu.max = runtime/period on the job's
//! cgroup (throttling on overrun, replenishment each period), and optionally
//! SCHED_DEADLINE for a single-threaded worker (see `check` for the kernel's rules).

use super::{
    ClassKind, JobId, NSEC_PER_SEC, NSEC_PER_USEC, SchedClass, SchedError, SchedParams, TickOutcome,
};
use std::collections::{BTreeSet, HashMap};

/// The kernel's bounds (kernel/sched/deadline.c, __checkparam_dl; sysctl defaults
/// sched_deadline_period_min_us = 100, sched_deadline_period_max_us = 1<<22).
pub const MIN_RUNTIME: u64 = 1 << 10;
pub const MIN_PERIOD: u64 = 100 * NSEC_PER_USEC;
pub const MAX_PERIOD: u64 = (1 << 22) * NSEC_PER_USEC;

/// Validates (runtime, deadline, period) by the kernel's rules, in its order, naming the
/// parameter and the rule; a period of 0 means period = deadline. Returns the period.
pub fn check(runtime: u64, deadline: u64, period: u64) -> Result<u64, SchedError> {
    let bad = |param, rule: String| Err(SchedError::Invalid { param, rule });
    let ms = |ns: u64| format!("{} ms", ns as f64 / 1e6);
    if deadline == 0 {
        return bad("deadline", "must not be 0".into());
    }
    if runtime < MIN_RUNTIME {
        return bad(
            "runtime",
            format!("{runtime} ns is below the kernel's minimum of 1024 ns (1 << DL_SCALE)"),
        );
    }
    if deadline >> 63 != 0 || period >> 63 != 0 {
        return bad(
            "deadline",
            "deadline and period must be below 2^63 ns".into(),
        );
    }
    let period = if period == 0 { deadline } else { period };
    if runtime > deadline {
        return bad(
            "runtime",
            format!(
                "{} is longer than the deadline {}: runtime <= deadline <= period",
                ms(runtime),
                ms(deadline)
            ),
        );
    }
    if deadline > period {
        return bad(
            "deadline",
            format!(
                "{} is longer than the period {}: runtime <= deadline <= period",
                ms(deadline),
                ms(period)
            ),
        );
    }
    if !(MIN_PERIOD..=MAX_PERIOD).contains(&period) {
        return bad(
            "period",
            format!(
                "{} is outside 0.1 ms..4194.304 ms (sched_deadline_period_min_us and _max_us, which guard against timer storms)",
                ms(period)
            ),
        );
    }
    Ok(period)
}

#[derive(Debug, Clone)]
struct Dl {
    runtime: u64,
    deadline: u64,
    period: u64,
    remaining: u64,
    period_start: u64,
    abs_deadline: u64,
    throttled_until: Option<u64>,
    queued: bool,
    running: bool,
    service: u64,
    overruns: u64,
    misses: u64,
}

pub struct DeadlineClass {
    /// CPUs the class may hand out as bandwidth.
    budget: f64,
    /// Admitted jobs' bandwidth, by job (kept while the job exists, runnable or not).
    admitted: HashMap<JobId, f64>,
    jobs: HashMap<JobId, Dl>,
    /// Runnable, not running, not throttled: by absolute deadline.
    queue: BTreeSet<(u64, JobId)>,
}

impl DeadlineClass {
    pub fn new(budget_cpus: f64) -> DeadlineClass {
        DeadlineClass {
            budget: budget_cpus,
            admitted: HashMap::new(),
            jobs: HashMap::new(),
            queue: BTreeSet::new(),
        }
    }

    pub fn admitted_bandwidth(&self) -> f64 {
        self.admitted.values().sum()
    }

    pub fn budget(&self) -> f64 {
        self.budget
    }

    /// Admission control: reserves the job's bandwidth or says why not, with the numbers.
    pub fn admit(&mut self, id: JobId, params: SchedParams) -> Result<(), SchedError> {
        let SchedParams::Deadline {
            runtime,
            deadline,
            period,
        } = params
        else {
            unreachable!("the runqueue routes by class")
        };
        let period = check(runtime, deadline, period)?;
        let asked = runtime as f64 / period as f64;
        let used = self.admitted_bandwidth();
        // A little slack for the float sum of many exact fractions.
        if asked + used > self.budget + 1e-9 {
            return Err(SchedError::Overflow {
                asked,
                used,
                budget: self.budget,
            });
        }
        self.admitted.insert(id, asked);
        Ok(())
    }

    /// Reserves the bandwidth whatever the budget (see Runqueue::force_admit).
    pub fn force_admit(&mut self, id: JobId, params: SchedParams) {
        if let SchedParams::Deadline {
            runtime,
            deadline,
            period,
        } = params
        {
            let period = if period == 0 { deadline } else { period };
            self.admitted
                .insert(id, runtime as f64 / period.max(1) as f64);
        }
    }

    /// (overruns, misses) of a job so far.
    pub fn counts(&self, id: JobId) -> Option<(u64, u64)> {
        self.jobs.get(&id).map(|d| (d.overruns, d.misses))
    }

    fn start_period(d: &mut Dl, start: u64) {
        d.period_start = start;
        d.remaining = d.runtime;
        d.abs_deadline = start + d.deadline;
        d.throttled_until = None;
    }
}

impl SchedClass for DeadlineClass {
    fn kind(&self) -> ClassKind {
        ClassKind::Deadline
    }

    fn enqueue(&mut self, id: JobId, params: SchedParams, now: u64) -> Result<(), SchedError> {
        let SchedParams::Deadline {
            runtime,
            deadline,
            period,
        } = params
        else {
            unreachable!("the runqueue routes by class")
        };
        let period = check(runtime, deadline, period)?;
        if !self.admitted.contains_key(&id) {
            // Enqueued without admission (the runqueue always admits first).
            self.admit(id, params)?;
        }
        if self.jobs.get(&id).is_some_and(|d| d.queued) {
            return Err(SchedError::Duplicate(id));
        }
        let d = self.jobs.entry(id).or_insert_with(|| Dl {
            runtime,
            deadline,
            period,
            remaining: 0,
            period_start: now,
            abs_deadline: 0,
            throttled_until: None,
            queued: false,
            running: false,
            service: 0,
            overruns: 0,
            misses: 0,
        });
        d.queued = true;
        // CBS wake-up rule: a job whose remaining runtime could not fit before its
        // deadline at its bandwidth gets a fresh period now.
        let left = d.abs_deadline.saturating_sub(now);
        if d.throttled_until.is_none()
            && (left == 0
                || (d.remaining as u128) * (d.period as u128)
                    > (left as u128) * (d.runtime as u128))
        {
            Self::start_period(d, now);
        }
        if d.throttled_until.is_none() {
            self.queue.insert((d.abs_deadline, id));
        }
        Ok(())
    }

    fn dequeue(&mut self, id: JobId, _now: u64) {
        if let Some(d) = self.jobs.get_mut(&id) {
            self.queue.remove(&(d.abs_deadline, id));
            d.queued = false;
            d.running = false;
        }
    }

    fn pick_next(&mut self, _now: u64) -> Option<JobId> {
        self.queue.first().map(|&(_, id)| id)
    }

    fn set_running(&mut self, id: JobId, _now: u64) {
        if let Some(d) = self.jobs.get_mut(&id)
            && self.queue.remove(&(d.abs_deadline, id))
        {
            d.running = true;
        }
    }

    fn put_prev(&mut self, id: JobId, _now: u64) {
        if let Some(d) = self.jobs.get_mut(&id)
            && d.running
        {
            d.running = false;
            if d.queued && d.throttled_until.is_none() {
                self.queue.insert((d.abs_deadline, id));
            }
        }
    }

    fn tick(&mut self, id: JobId, service: u64, _now: u64) -> TickOutcome {
        let Some(d) = self.jobs.get_mut(&id) else {
            return TickOutcome::Resched;
        };
        d.service += service;
        d.remaining = d.remaining.saturating_sub(service);
        if d.remaining == 0 {
            let until = d.period_start + d.period;
            d.throttled_until = Some(until);
            d.overruns += 1;
            d.running = false;
            return TickOutcome::Throttled { until };
        }
        TickOutcome::Continue
    }

    fn update(&mut self, now: u64) {
        for (&id, d) in self.jobs.iter_mut() {
            // A runnable job whose deadline passed with runtime left was not served.
            if d.queued && d.remaining > 0 && d.abs_deadline <= now && d.throttled_until.is_none() {
                d.misses += 1;
                d.remaining = 0;
            }
            if now >= d.period_start + d.period {
                // Next period (or the current one, after a long sleep).
                let periods = (now - d.period_start) / d.period;
                let was_queued = !d.running && d.queued && d.throttled_until.is_none();
                if was_queued {
                    self.queue.remove(&(d.abs_deadline, id));
                }
                Self::start_period(d, d.period_start + periods * d.period);
                if d.queued && !d.running {
                    self.queue.insert((d.abs_deadline, id));
                }
            }
        }
    }

    fn check_preempt(&self, running: JobId, waking: JobId) -> bool {
        match (self.jobs.get(&running), self.jobs.get(&waking)) {
            (Some(r), Some(w)) => w.throttled_until.is_none() && w.abs_deadline < r.abs_deadline,
            _ => false,
        }
    }

    fn complete(&mut self, id: JobId, now: u64) {
        self.dequeue(id, now);
        self.jobs.remove(&id);
        self.admitted.remove(&id);
    }

    fn runnable(&self, _now: u64) -> usize {
        self.queue.len()
    }

    fn describe(&self, id: JobId) -> Option<serde_json::Value> {
        let d = self.jobs.get(&id)?;
        Some(serde_json::json!({
            "runtime_ns": d.runtime, "deadline_ns": d.deadline, "period_ns": d.period,
            "remaining_ns": d.remaining, "absolute_deadline_ns": d.abs_deadline,
            "throttled_until_ns": d.throttled_until, "service_ns": d.service,
            "overruns": d.overruns, "misses": d.misses, "running": d.running,
        }))
    }
}

/// cpu.max for a deadline job: (quota, period) in µs, its bandwidth, enforced by CFS
/// bandwidth control (throttled when the quota is used, refilled each period).
pub fn cpu_max(runtime: u64, period: u64) -> (u64, u64) {
    let us = |ns: u64| (ns / NSEC_PER_USEC).max(1);
    // cpu.max accepts periods of 1 ms..1 s; the quota keeps the bandwidth.
    let p = us(period).clamp(1000, NSEC_PER_SEC / NSEC_PER_USEC);
    let q = (us(runtime) as u128 * p as u128 / us(period) as u128).max(1000) as u64;
    (q, p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::NSEC_PER_MSEC as MS;

    #[test]
    fn the_kernels_rules_are_named_when_broken() {
        let e = |r, d, p| check(r, d, p).unwrap_err().to_string();
        assert_eq!(e(MS, 0, 0), "deadline: must not be 0");
        assert!(e(100, MS, MS).starts_with("runtime: 100 ns is below"));
        assert!(
            e(5 * MS, 2 * MS, 10 * MS)
                .starts_with("runtime: 5 ms is longer than the deadline 2 ms")
        );
        assert!(
            e(MS, 20 * MS, 10 * MS).starts_with("deadline: 20 ms is longer than the period 10 ms")
        );
        assert!(e(10_000, 50_000, 0).starts_with("period: 0.05 ms is outside"));
        assert!(e(MS, 5 * NSEC_PER_SEC, 0).starts_with("period: 5000 ms"));
        assert_eq!(
            check(MS, 10 * MS, 0).unwrap(),
            10 * MS,
            "period 0 = deadline"
        );
    }

    #[test]
    fn admission_refuses_the_job_that_overflows_with_the_numbers() {
        let mut dl = DeadlineClass::new(1.0);
        let p = |r| SchedParams::Deadline {
            runtime: r * MS,
            deadline: 10 * MS,
            period: 10 * MS,
        };
        dl.admit(1, p(4)).unwrap();
        dl.admit(2, p(5)).unwrap();
        let e = dl.admit(3, p(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "refused by admission control: this job asks for 0.2000 CPUs of deadline bandwidth (runtime/period), 0.9000 of the budget of 1.0000 CPUs is admitted already, and 0.2000 + 0.9000 > 1.0000"
        );
        dl.admit(3, p(1)).unwrap();
        dl.complete(1, 0);
        dl.admit(4, p(4)).unwrap();
    }

    #[test]
    fn cpu_max_carries_the_bandwidth() {
        assert_eq!(cpu_max(2 * MS, 10 * MS), (2000, 10000));
        assert_eq!(cpu_max(250 * MS, NSEC_PER_SEC), (250000, 1000000));
    }
}
