//! Agent runqueues and policy classes, modelled on the kernel's `sched_class` table.
//!
//! A host runs more agent jobs than it has room for; the runqueue decides which of the
//! runnable jobs hold one of its `slots` (run) and which wait (frozen). Classes are
//! asked in a fixed priority order, as `pick_next_task` walks them in the kernel:
//!
//!   deadline  — SLAs: runtime every period within a deadline; admission-controlled,
//!               EDF among themselves, throttled when their runtime is spent (CBS);
//!   rt        — bounded real-time: fixed priorities, FIFO within one, but the whole
//!               class gets only `rt_runtime` of every `rt_period` (sched_rt_runtime_us);
//!   fair      — EEVDF at job level: weights, lag, eligibility, virtual deadlines;
//!   idle      — runs only when no other class wants a slot.
//!
//! Time is in nanoseconds on a clock the caller owns (`now`): the daemon passes its
//! monotonic clock and the CPU time its cgroups accounted; the simulation tests pass a
//! virtual clock and synthetic service, so the same code is what both exercise.
//!
//! The hooks of `SchedClass`, and who calls them (all from `Runqueue`):
//!   enqueue      — `Runqueue::enqueue`: the job became runnable (admitted, woke,
//!                  thawed by its owner);
//!   dequeue      — `Runqueue::dequeue`: it is no longer runnable (ended, blocked,
//!                  frozen by its owner); also before `complete`;
//!   pick_next    — `Runqueue::schedule`, for each free slot, class by class;
//!   set_running  — `Runqueue::schedule`, on the job `pick_next` returned (it leaves the
//!                  class's queue and holds a slot);
//!   put_prev     — `Runqueue::schedule` / `tick`: a running job leaves its slot
//!                  (preempted, slice or budget used) and goes back to the queue;
//!   tick         — `Runqueue::tick`: accounting of the CPU time a running job used
//!                  (from its cgroup's usage); answers whether it should yield its slot;
//!   update       — `Runqueue::tick`, once per tick for the whole class: timers
//!                  (replenishment at period boundaries, throttling ends);
//!   check_preempt — `Runqueue::enqueue`: should the newly runnable job take a running
//!                  job's slot at once (same class)?
//!   complete     — `Runqueue::complete`: the job ended; its accounting and bandwidth go.

pub mod attr;
pub mod deadline;
pub mod fair;
pub mod idle;
pub mod kernel;
pub mod rt;
pub mod runqueue;

pub use runqueue::{Decision, Runqueue};

/// A job as the scheduler knows it (the daemon maps its job ids to these).
pub type JobId = u64;

pub const NSEC_PER_USEC: u64 = 1_000;
pub const NSEC_PER_MSEC: u64 = 1_000_000;
pub const NSEC_PER_SEC: u64 = 1_000_000_000;

/// The classes, in the order they are asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassKind {
    Deadline = 0,
    Rt = 1,
    Fair = 2,
    Idle = 3,
}

pub const CLASS_ORDER: [ClassKind; 4] = [
    ClassKind::Deadline,
    ClassKind::Rt,
    ClassKind::Fair,
    ClassKind::Idle,
];

/// What a job asked for (validated by its class's `check`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "class", rename_all = "lowercase")]
pub enum SchedParams {
    /// `weight` from `fair::weight_of_nice`, or given; `slice` in ns of CPU time.
    Fair {
        weight: u64,
        slice: u64,
    },
    /// ns; period 0 means period = deadline, as for sched_setattr.
    Deadline {
        runtime: u64,
        deadline: u64,
        period: u64,
    },
    /// 1..=99, higher first.
    Rt {
        priority: u8,
    },
    Idle,
}

impl SchedParams {
    pub fn class(&self) -> ClassKind {
        match self {
            SchedParams::Fair { .. } => ClassKind::Fair,
            SchedParams::Deadline { .. } => ClassKind::Deadline,
            SchedParams::Rt { .. } => ClassKind::Rt,
            SchedParams::Idle => ClassKind::Idle,
        }
    }
}

/// What `tick` tells the runqueue about a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickOutcome {
    /// Keep running.
    Continue,
    /// Its turn is over (slice used): back to the queue, pick again.
    Resched,
    /// Its budget is spent until `until` (deadline runtime, rt class budget): it may not
    /// run before then.
    Throttled { until: u64 },
}

/// A scheduling error a person can act on: which parameter, which rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedError {
    #[error("{param}: {rule}")]
    Invalid { param: &'static str, rule: String },
    #[error(
        "refused by admission control: this job asks for {asked:.4} CPUs of deadline bandwidth (runtime/period), {used:.4} of the budget of {budget:.4} CPUs is admitted already, and {asked:.4} + {used:.4} > {budget:.4}"
    )]
    Overflow { asked: f64, used: f64, budget: f64 },
    #[error("job {0} is already queued")]
    Duplicate(JobId),
}

/// One class's queue and accounting.
pub trait SchedClass {
    fn kind(&self) -> ClassKind;
    fn enqueue(&mut self, id: JobId, params: SchedParams, now: u64) -> Result<(), SchedError>;
    fn dequeue(&mut self, id: JobId, now: u64);
    fn pick_next(&mut self, now: u64) -> Option<JobId>;
    fn set_running(&mut self, id: JobId, now: u64);
    fn put_prev(&mut self, id: JobId, now: u64);
    fn tick(&mut self, id: JobId, service: u64, now: u64) -> TickOutcome;
    fn update(&mut self, now: u64);
    fn check_preempt(&self, running: JobId, waking: JobId) -> bool;
    fn complete(&mut self, id: JobId, now: u64);
    /// Queued jobs that may run now (not running, not throttled).
    fn runnable(&self, now: u64) -> usize;
    /// One line per job for `agentctl sched`: the class's view of it.
    fn describe(&self, id: JobId) -> Option<serde_json::Value>;
}
