//! How a job's class reaches the kernel: its cgroup's CPU controller. The runqueue
//! decides which jobs run; these files decide how the kernel shares the CPUs among the
//! ones that do.
//!
//!   fair      weight → cpu.weight (v2: weight·100/1024, 1..10000) or cpu.shares (v1:
//!             the weight itself, ≥ 2), so weights divide contended CPU time;
//!   deadline  the highest weight, bounded by cpu.max = runtime/period: it wins the
//!             CPU from every other job up to its bandwidth (which admission control
//!             keeps within the budget, so every admitted job can have its own) and is
//!             throttled when its runtime is used, refilled each period;
//!   rt        a weight above any fair job's (half the highest), bounded by cpu.max =
//!             the policy's sched.rt_cpus;
//!   idle      cpu.idle = 1 (v2, SCHED_IDLE for the group) or cpu.shares = 2 (v1).
//!
//! A job's own cpu limit (limits.cpu, --cpu) still applies: the stricter quota wins.

use super::SchedParams;

/// The CPU controller's settings for one job's class.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CgroupSched {
    /// (quota, period) in µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<(u64, u64)>,
    /// The kernel weight (nice 0 = 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u64>,
    #[serde(default)]
    pub idle: bool,
}

/// cpu.weight's top (v2: 10000) as a kernel weight, for deadline jobs; rt jobs get half,
/// still above any nice level's (88761 is nice −20; cpu.weight 10000 = 102400).
const DEADLINE_WEIGHT: u64 = 10_000 * 1024 / 100;
const RT_WEIGHT: u64 = DEADLINE_WEIGHT / 2 + 40_000;

impl CgroupSched {
    /// For a job of class `params`; `rt_cpus` bounds an rt job.
    pub fn of(params: &SchedParams, rt_cpus: f64) -> CgroupSched {
        match *params {
            SchedParams::Fair { weight, .. } => CgroupSched {
                // The default weight is the kernel's default: nothing to write.
                weight: (weight != super::fair::NICE_0_WEIGHT).then_some(weight),
                ..Default::default()
            },
            SchedParams::Deadline {
                runtime, period, ..
            } => CgroupSched {
                cpu_max: Some(super::deadline::cpu_max(runtime, period)),
                weight: Some(DEADLINE_WEIGHT),
                idle: false,
            },
            SchedParams::Rt { .. } => CgroupSched {
                cpu_max: Some((((rt_cpus * 100_000.0) as u64).max(1000), 100_000)),
                weight: Some(RT_WEIGHT),
                idle: false,
            },
            SchedParams::Idle => CgroupSched {
                idle: true,
                ..Default::default()
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == CgroupSched::default()
    }

    /// The cpu.max to write: the class's and the job's own limit, the stricter (by
    /// bandwidth) of the two.
    pub fn cpu_max(&self, limit: Option<(u64, u64)>) -> Option<(u64, u64)> {
        let bw = |(q, p): (u64, u64)| q as f64 / p as f64;
        match (self.cpu_max, limit) {
            (Some(a), Some(b)) => Some(if bw(a) <= bw(b) { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// cgroup v2 cpu.weight (1..10000; 100 is the default weight 1024).
    pub fn cpu_weight(&self) -> Option<u64> {
        self.weight
            .map(|w| ((w as u128 * 100 / 1024) as u64).clamp(1, 10_000))
    }

    /// cgroup v1 cpu.shares (≥ 2; 1024 is the default).
    pub fn cpu_shares(&self) -> Option<u64> {
        if self.idle {
            return Some(2);
        }
        self.weight.map(|w| w.clamp(2, 262_144))
    }
}

/// The job report's `sched` section: the class, its parameters, and what was written
/// to the cgroup for it.
pub fn report(params: &SchedParams, cgroup: &CgroupSched) -> serde_json::Value {
    let mut v = match *params {
        SchedParams::Fair { weight, slice } => {
            serde_json::json!({"class": "fair", "weight": weight, "slice_ns": slice})
        }
        SchedParams::Deadline {
            runtime,
            deadline,
            period,
        } => serde_json::json!({"class": "deadline", "runtime_ns": runtime,
            "deadline_ns": deadline, "period_ns": period}),
        SchedParams::Rt { priority } => serde_json::json!({"class": "rt", "priority": priority}),
        SchedParams::Idle => serde_json::json!({"class": "idle"}),
    };
    v["cgroup"] = serde_json::to_value(cgroup).unwrap_or_default();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::NSEC_PER_MSEC as MS;

    #[test]
    fn classes_map_to_the_cpu_controller() {
        let fair = CgroupSched::of(
            &SchedParams::Fair {
                weight: 3072,
                slice: 3 * MS,
            },
            0.5,
        );
        assert_eq!(
            (fair.cpu_weight(), fair.cpu_shares()),
            (Some(300), Some(3072))
        );
        let default = CgroupSched::of(
            &SchedParams::Fair {
                weight: 1024,
                slice: 3 * MS,
            },
            0.5,
        );
        assert!(default.is_empty());
        let dl = CgroupSched::of(
            &SchedParams::Deadline {
                runtime: 2 * MS,
                deadline: 10 * MS,
                period: 10 * MS,
            },
            0.5,
        );
        assert_eq!(
            (dl.cpu_max, dl.cpu_weight()),
            (Some((2000, 10000)), Some(10_000))
        );
        let rt = CgroupSched::of(&SchedParams::Rt { priority: 10 }, 0.5);
        assert_eq!(
            (rt.cpu_max, rt.cpu_weight()),
            (Some((50_000, 100_000)), Some(8_906))
        );
        assert!(rt.weight > Some(88761), "above nice -20");
        let idle = CgroupSched::of(&SchedParams::Idle, 0.5);
        assert_eq!((idle.idle, idle.cpu_shares()), (true, Some(2)));
        // The stricter quota wins.
        assert_eq!(dl.cpu_max(Some((100_000, 100_000))), Some((2000, 10000)));
        assert_eq!(dl.cpu_max(Some((5_000, 100_000))), Some((5_000, 100_000)));
    }
}
