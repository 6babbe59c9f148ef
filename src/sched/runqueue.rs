//! The runqueue: `slots` jobs may run at once (thawed); the others that are runnable
//! wait (frozen). It asks the classes in their fixed order, as the kernel's
//! pick_next_task does, and returns each decision so the caller can carry it out
//! (freeze, thaw) and record it (an event, an operation row).

use super::deadline::DeadlineClass;
use super::fair::FairClass;
use super::idle::IdleClass;
use super::rt::RtClass;
use super::{CLASS_ORDER, ClassKind, JobId, SchedClass, SchedError, SchedParams, TickOutcome};
use std::collections::HashMap;

/// One decision, for the caller to enforce and record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum Decision {
    /// The job takes a slot (thaw it).
    Run { job: JobId, class: ClassKind },
    /// The job leaves its slot for another (freeze it); `reason` says why.
    Preempt {
        job: JobId,
        by: JobId,
        reason: &'static str,
    },
    /// Its turn ended (slice used) and another job took the slot.
    Yield { job: JobId },
    /// Its budget is spent until `until` (ns on the caller's clock).
    Throttle { job: JobId, until: u64 },
}

pub struct Runqueue {
    slots: usize,
    deadline: DeadlineClass,
    rt: RtClass,
    fair: FairClass,
    idle: IdleClass,
    running: Vec<JobId>,
    class_of: HashMap<JobId, ClassKind>,
}

impl Runqueue {
    /// `slots` jobs at once; the deadline class may admit `deadline_budget` CPUs of
    /// bandwidth; the rt class may use `rt_runtime` of every `rt_period` (ns, summed
    /// over its running jobs).
    pub fn new(slots: usize, deadline_budget: f64, rt_runtime: u64, rt_period: u64) -> Runqueue {
        Runqueue {
            slots: slots.max(1),
            deadline: DeadlineClass::new(deadline_budget),
            rt: RtClass::new(rt_runtime, rt_period),
            fair: FairClass::new(),
            idle: IdleClass::new(),
            running: Vec::new(),
            class_of: HashMap::new(),
        }
    }

    fn class(&mut self, kind: ClassKind) -> &mut dyn SchedClass {
        match kind {
            ClassKind::Deadline => &mut self.deadline,
            ClassKind::Rt => &mut self.rt,
            ClassKind::Fair => &mut self.fair,
            ClassKind::Idle => &mut self.idle,
        }
    }

    fn class_ref(&self, kind: ClassKind) -> &dyn SchedClass {
        match kind {
            ClassKind::Deadline => &self.deadline,
            ClassKind::Rt => &self.rt,
            ClassKind::Fair => &self.fair,
            ClassKind::Idle => &self.idle,
        }
    }

    pub fn fair(&self) -> &FairClass {
        &self.fair
    }
    pub fn deadline(&self) -> &DeadlineClass {
        &self.deadline
    }
    pub fn rt(&self) -> &RtClass {
        &self.rt
    }

    pub fn running(&self) -> &[JobId] {
        &self.running
    }

    pub fn is_running(&self, id: JobId) -> bool {
        self.running.contains(&id)
    }

    /// Admission at submission: deadline jobs reserve bandwidth (or are refused with
    /// the numbers); other classes' parameters are checked.
    pub fn admit(&mut self, id: JobId, params: SchedParams) -> Result<(), SchedError> {
        match params {
            SchedParams::Deadline { .. } => self.deadline.admit(id, params),
            SchedParams::Fair { weight, slice } => super::fair::check(weight, slice),
            SchedParams::Rt { priority } if !(1..=99).contains(&priority) => {
                Err(SchedError::Invalid {
                    param: "priority",
                    rule: format!("{priority} is outside 1..99"),
                })
            }
            _ => Ok(()),
        }
    }

    /// Reserves a deadline job's bandwidth without the budget check (a job adopted
    /// after a restart runs already).
    pub fn force_admit(&mut self, id: JobId, params: SchedParams) {
        self.deadline.force_admit(id, params);
    }

    /// The job became runnable; it may take a slot at once.
    pub fn enqueue(
        &mut self,
        id: JobId,
        params: SchedParams,
        now: u64,
    ) -> Result<Vec<Decision>, SchedError> {
        let kind = params.class();
        self.class(kind).enqueue(id, params, now)?;
        self.class_of.insert(id, kind);
        let mut out = Vec::new();
        // Same class: does it preempt a running job (an earlier deadline)?
        if self.running.len() == self.slots
            && let Some(&victim) = self.running.iter().find(|&&r| {
                self.class_of.get(&r) == Some(&kind) && {
                    self.class_ref(kind).check_preempt(r, id)
                }
            })
        {
            self.stop(victim, now);
            self.start(id, now);
            out.push(Decision::Preempt {
                job: victim,
                by: id,
                reason: "the waking job's deadline is earlier",
            });
            out.push(Decision::Run {
                job: id,
                class: kind,
            });
        }
        out.extend(self.schedule(now));
        Ok(out)
    }

    /// The job is no longer runnable (blocked, frozen by its owner).
    pub fn dequeue(&mut self, id: JobId, now: u64) -> Vec<Decision> {
        if let Some(kind) = self.class_of.get(&id).copied() {
            self.running.retain(|&r| r != id);
            self.class(kind).dequeue(id, now);
        }
        self.schedule(now)
    }

    /// The job ended: its accounting and any reserved bandwidth go.
    pub fn complete(&mut self, id: JobId, now: u64) -> Vec<Decision> {
        if let Some(kind) = self.class_of.remove(&id) {
            self.running.retain(|&r| r != id);
            self.class(kind).complete(id, now);
        }
        self.schedule(now)
    }

    fn start(&mut self, id: JobId, now: u64) {
        let kind = self.class_of[&id];
        self.class(kind).set_running(id, now);
        self.running.push(id);
    }

    fn stop(&mut self, id: JobId, now: u64) {
        let kind = self.class_of[&id];
        self.running.retain(|&r| r != id);
        self.class(kind).put_prev(id, now);
    }

    /// Accounts `service(job)` ns of CPU time to each running job (its cgroup's usage
    /// since the last tick), runs the classes' timers, and schedules.
    pub fn tick(&mut self, now: u64, service: impl Fn(JobId) -> u64) -> Vec<Decision> {
        let mut out = Vec::new();
        let mut yielded = Vec::new();
        for id in self.running.clone() {
            let kind = self.class_of[&id];
            match self.class(kind).tick(id, service(id), now) {
                TickOutcome::Continue => {}
                TickOutcome::Resched => {
                    self.stop(id, now);
                    yielded.push(id);
                }
                TickOutcome::Throttled { until } => {
                    self.stop(id, now);
                    out.push(Decision::Throttle { job: id, until });
                    // The rt budget is the class's: every rt job stops with it.
                    if kind == ClassKind::Rt {
                        for other in self.running.clone() {
                            if self.class_of[&other] == ClassKind::Rt {
                                self.stop(other, now);
                                out.push(Decision::Throttle { job: other, until });
                            }
                        }
                    }
                }
            }
        }
        for kind in CLASS_ORDER {
            self.class(kind).update(now);
        }
        let started = self.schedule(now);
        for &id in &yielded {
            if !self.running.contains(&id) {
                out.push(Decision::Yield { job: id });
            }
        }
        // A job that yielded and was picked again simply keeps running.
        for d in started {
            if let Decision::Run { job, .. } = d
                && yielded.contains(&job)
            {
                continue;
            }
            out.push(d);
        }
        out
    }

    /// Fills free slots class by class, and lets a runnable job of a higher class take
    /// the slot of a running job of a lower one.
    pub fn schedule(&mut self, now: u64) -> Vec<Decision> {
        let mut out = Vec::new();
        while let Some((kind, id)) = CLASS_ORDER
            .into_iter()
            .find_map(|k| self.class(k).pick_next(now).map(|id| (k, id)))
        {
            if self.running.len() < self.slots {
                self.start(id, now);
                out.push(Decision::Run {
                    job: id,
                    class: kind,
                });
                continue;
            }
            // Full: the running job of the lowest class, if lower than this one.
            let victim = self
                .running
                .iter()
                .copied()
                .max_by_key(|r| self.class_of[r])
                .filter(|r| self.class_of[r] > kind);
            let Some(victim) = victim else { break };
            self.stop(victim, now);
            self.start(id, now);
            out.push(Decision::Preempt {
                job: victim,
                by: id,
                reason: "a job of a higher class is runnable",
            });
            out.push(Decision::Run {
                job: id,
                class: kind,
            });
        }
        out
    }

    /// Each job's class and its class's view of it (for `agentctl sched`).
    pub fn describe(&self) -> Vec<serde_json::Value> {
        let mut ids: Vec<_> = self.class_of.iter().collect();
        ids.sort();
        ids.into_iter()
            .map(|(&id, &kind)| {
                serde_json::json!({"job": id, "class": kind,
                    "detail": self.class_ref(kind).describe(id)})
            })
            .collect()
    }
}
