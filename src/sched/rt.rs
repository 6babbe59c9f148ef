//! The bounded real-time class: fixed priorities above every fair job, FIFO within a
//! priority, and one budget for the whole class — `runtime` of CPU time in every
//! `period`, as sched_rt_runtime_us bounds real-time tasks — so a privileged agent can
//! never starve the control plane or the fair class entirely. When the class has used
//! its budget, all its jobs are throttled until the period ends.
//!
//! On the kernel side an rt job runs with its cgroup's cpu.max set from the class
//! budget (and, on cgroup v1 with real-time policies, cpu.rt_runtime_us).

use super::{ClassKind, JobId, SchedClass, SchedError, SchedParams, TickOutcome};
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

pub struct RtClass {
    /// CPU time the class may use per period (summed over its running jobs), ns.
    runtime: u64,
    period: u64,
    period_start: u64,
    used: u64,
    throttled_until: Option<u64>,
    /// (priority, arrival) by job, for those that are queued.
    jobs: HashMap<JobId, (u8, u64, bool)>,
    /// Queued, not running: highest priority first, then first come.
    queue: BTreeSet<(Reverse<u8>, u64, JobId)>,
    arrivals: u64,
    service: HashMap<JobId, u64>,
}

impl RtClass {
    /// `runtime` of every `period` (ns); runtime ≤ period × slots is the caller's to keep.
    pub fn new(runtime: u64, period: u64) -> RtClass {
        RtClass {
            runtime,
            period: period.max(1),
            period_start: 0,
            used: 0,
            throttled_until: None,
            jobs: HashMap::new(),
            queue: BTreeSet::new(),
            arrivals: 0,
            service: HashMap::new(),
        }
    }

    pub fn used_in_period(&self) -> u64 {
        self.used
    }
}

impl SchedClass for RtClass {
    fn kind(&self) -> ClassKind {
        ClassKind::Rt
    }

    fn enqueue(&mut self, id: JobId, params: SchedParams, _now: u64) -> Result<(), SchedError> {
        let SchedParams::Rt { priority } = params else {
            unreachable!("the runqueue routes by class")
        };
        if !(1..=99).contains(&priority) {
            return Err(SchedError::Invalid {
                param: "priority",
                rule: format!("{priority} is outside 1..99"),
            });
        }
        if self.jobs.contains_key(&id) {
            return Err(SchedError::Duplicate(id));
        }
        self.arrivals += 1;
        self.jobs.insert(id, (priority, self.arrivals, false));
        self.queue.insert((Reverse(priority), self.arrivals, id));
        Ok(())
    }

    fn dequeue(&mut self, id: JobId, _now: u64) {
        if let Some((p, a, _)) = self.jobs.remove(&id) {
            self.queue.remove(&(Reverse(p), a, id));
        }
    }

    fn pick_next(&mut self, _now: u64) -> Option<JobId> {
        if self.throttled_until.is_some() {
            return None;
        }
        self.queue.first().map(|&(_, _, id)| id)
    }

    fn set_running(&mut self, id: JobId, _now: u64) {
        if let Some((p, a, running)) = self.jobs.get_mut(&id) {
            self.queue.remove(&(Reverse(*p), *a, id));
            *running = true;
        }
    }

    fn put_prev(&mut self, id: JobId, _now: u64) {
        if let Some((p, a, running)) = self.jobs.get_mut(&id)
            && *running
        {
            *running = false;
            self.queue.insert((Reverse(*p), *a, id));
        }
    }

    fn tick(&mut self, id: JobId, service: u64, _now: u64) -> TickOutcome {
        self.used += service;
        *self.service.entry(id).or_default() += service;
        if self.used >= self.runtime {
            let until = self.period_start + self.period;
            self.throttled_until = Some(until);
            return TickOutcome::Throttled { until };
        }
        TickOutcome::Continue
    }

    fn update(&mut self, now: u64) {
        if now >= self.period_start + self.period {
            self.period_start += (now - self.period_start) / self.period * self.period;
            self.used = 0;
            self.throttled_until = None;
        }
    }

    fn check_preempt(&self, running: JobId, waking: JobId) -> bool {
        match (self.jobs.get(&running), self.jobs.get(&waking)) {
            (Some(r), Some(w)) => self.throttled_until.is_none() && w.0 > r.0,
            _ => false,
        }
    }

    fn complete(&mut self, id: JobId, now: u64) {
        self.dequeue(id, now);
        self.service.remove(&id);
    }

    fn runnable(&self, _now: u64) -> usize {
        if self.throttled_until.is_some() {
            0
        } else {
            self.queue.len()
        }
    }

    fn describe(&self, id: JobId) -> Option<serde_json::Value> {
        let (p, _, running) = self.jobs.get(&id)?;
        Some(serde_json::json!({
            "priority": p, "running": running,
            "service_ns": self.service.get(&id).copied().unwrap_or(0),
            "class_used_ns": self.used, "class_runtime_ns": self.runtime,
            "class_period_ns": self.period, "throttled_until_ns": self.throttled_until,
        }))
    }
}
