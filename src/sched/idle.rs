//! The idle class: jobs that run only when no other class wants a slot (batch work
//! that must never slow anyone down). Round robin among themselves, one slice each; on
//! the kernel side their cgroup gets cpu.idle = 1 (v2) or the lowest cpu.shares (v1).

use super::{ClassKind, JobId, NSEC_PER_MSEC, SchedClass, SchedError, SchedParams, TickOutcome};
use std::collections::{HashMap, VecDeque};

/// Turn length among idle jobs.
pub const IDLE_SLICE: u64 = 10 * NSEC_PER_MSEC;

#[derive(Default)]
pub struct IdleClass {
    queue: VecDeque<JobId>,
    /// Queued jobs: service in their current turn, total service, running.
    jobs: HashMap<JobId, (u64, u64, bool)>,
}

impl IdleClass {
    pub fn new() -> IdleClass {
        IdleClass::default()
    }
}

impl SchedClass for IdleClass {
    fn kind(&self) -> ClassKind {
        ClassKind::Idle
    }

    fn enqueue(&mut self, id: JobId, params: SchedParams, _now: u64) -> Result<(), SchedError> {
        debug_assert!(matches!(params, SchedParams::Idle));
        if self.jobs.contains_key(&id) {
            return Err(SchedError::Duplicate(id));
        }
        self.jobs.insert(id, (0, 0, false));
        self.queue.push_back(id);
        Ok(())
    }

    fn dequeue(&mut self, id: JobId, _now: u64) {
        if self.jobs.remove(&id).is_some() {
            self.queue.retain(|&j| j != id);
        }
    }

    fn pick_next(&mut self, _now: u64) -> Option<JobId> {
        self.queue.front().copied()
    }

    fn set_running(&mut self, id: JobId, _now: u64) {
        if let Some(j) = self.jobs.get_mut(&id) {
            self.queue.retain(|&q| q != id);
            j.2 = true;
        }
    }

    fn put_prev(&mut self, id: JobId, _now: u64) {
        if let Some(j) = self.jobs.get_mut(&id)
            && j.2
        {
            j.2 = false;
            j.0 = 0;
            self.queue.push_back(id);
        }
    }

    fn tick(&mut self, id: JobId, service: u64, _now: u64) -> TickOutcome {
        let Some(j) = self.jobs.get_mut(&id) else {
            return TickOutcome::Resched;
        };
        j.0 += service;
        j.1 += service;
        if j.0 >= IDLE_SLICE {
            TickOutcome::Resched
        } else {
            TickOutcome::Continue
        }
    }

    fn update(&mut self, _now: u64) {}

    fn check_preempt(&self, _running: JobId, _waking: JobId) -> bool {
        false
    }

    fn complete(&mut self, id: JobId, now: u64) {
        self.dequeue(id, now);
    }

    fn runnable(&self, _now: u64) -> usize {
        self.queue.len()
    }

    fn describe(&self, id: JobId) -> Option<serde_json::Value> {
        let (turn, service, running) = self.jobs.get(&id)?;
        Some(serde_json::json!({"turn_ns": turn, "service_ns": service, "running": running}))
    }
}
