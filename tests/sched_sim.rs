//! The scheduling classes on a virtual clock with synthetic jobs: deterministic, no
//! kernel involved. Each step of 1 ms gives every running job the CPU time its demand
//! wants, tells the runqueue (as the daemon tells it what the cgroups used), and wakes
//! or blocks jobs as their demand says.

use agentd::sched::fair::{DEFAULT_SLICE, NICE_0_WEIGHT};
use agentd::sched::{JobId, NSEC_PER_MSEC as MS, NSEC_PER_SEC as SEC, Runqueue, SchedParams};
use std::collections::BTreeMap;

const TICK: u64 = MS;

#[derive(Clone, Copy)]
enum Demand {
    /// Always wants the CPU.
    Hog,
    /// Wants `work` of CPU every `period`, from the start of each period.
    Periodic { work: u64, period: u64 },
    /// Runs `burst`, then sleeps `sleep`, again and again.
    Interactive { burst: u64, sleep: u64 },
}

struct SimJob {
    params: SchedParams,
    demand: Demand,
    /// Work left in the current burst or period; None while asleep.
    left: Option<u64>,
    wake_at: u64,
    woke: u64,
    waits: Vec<u64>,
    waiting_since: Option<u64>,
    service: u64,
    /// Periodic: periods whose work was not done by the period's deadline.
    late: u64,
}

struct Sim {
    rq: Runqueue,
    now: u64,
    jobs: BTreeMap<JobId, SimJob>,
}

impl Sim {
    fn new(rq: Runqueue) -> Sim {
        Sim {
            rq,
            now: 0,
            jobs: BTreeMap::new(),
        }
    }

    fn add(&mut self, id: JobId, params: SchedParams, demand: Demand) {
        self.rq.admit(id, params).expect("admitted");
        self.jobs.insert(
            id,
            SimJob {
                params,
                demand,
                left: None,
                wake_at: 0,
                woke: 0,
                waits: Vec::new(),
                waiting_since: None,
                service: 0,
                late: 0,
            },
        );
    }

    fn fair(weight: u64, slice: u64) -> SchedParams {
        SchedParams::Fair { weight, slice }
    }

    /// Runs for `duration`, calling `check` after every step.
    fn run(&mut self, duration: u64, mut check: impl FnMut(&Sim)) {
        let end = self.now + duration;
        while self.now < end {
            // Wake the jobs whose time has come.
            let now = self.now;
            let waking: Vec<JobId> = self
                .jobs
                .iter()
                .filter(|(_, j)| j.left.is_none() && j.wake_at <= now)
                .map(|(&id, _)| id)
                .collect();
            for id in waking {
                let j = self.jobs.get_mut(&id).unwrap();
                j.left = Some(match j.demand {
                    Demand::Hog => u64::MAX,
                    Demand::Periodic { work, .. } => work,
                    Demand::Interactive { burst, .. } => burst,
                });
                j.woke = now;
                j.waiting_since = Some(now);
                let params = j.params;
                self.rq.enqueue(id, params, now).expect("enqueue");
            }
            // One tick of CPU time to each running job that wants it.
            let mut served = BTreeMap::new();
            for &id in self.rq.running() {
                let j = self.jobs.get_mut(&id).unwrap();
                let want = j.left.unwrap_or(0).min(TICK);
                if let Some(since) = j.waiting_since.take() {
                    j.waits.push(now - since);
                }
                j.service += want;
                if let Some(l) = j.left.as_mut() {
                    *l -= want;
                }
                served.insert(id, want);
            }
            self.now += TICK;
            let now = self.now;
            self.rq
                .tick(now, |id| served.get(&id).copied().unwrap_or(0));
            // Jobs that finished their work block until their next wake-up.
            let done: Vec<JobId> = self
                .jobs
                .iter()
                .filter(|(_, j)| j.left == Some(0))
                .map(|(&id, _)| id)
                .collect();
            for id in done {
                let j = self.jobs.get_mut(&id).unwrap();
                j.left = None;
                j.wake_at = match j.demand {
                    Demand::Hog => now,
                    Demand::Periodic { period, .. } => j.woke + period,
                    Demand::Interactive { sleep, .. } => now + sleep,
                };
                self.rq.dequeue(id, now);
            }
            // Periodic jobs whose period ended with work left were late.
            for j in self.jobs.values_mut() {
                if let (Demand::Periodic { period, .. }, Some(left)) = (j.demand, j.left)
                    && left > 0
                    && now >= j.woke + period
                {
                    j.late += 1;
                    j.woke += period;
                    j.left = Some(match j.demand {
                        Demand::Periodic { work, .. } => work,
                        _ => unreachable!(),
                    });
                }
            }
            check(self);
        }
    }

    fn service(&self, id: JobId) -> u64 {
        self.jobs[&id].service
    }
}

#[test]
fn equal_weights_keep_lag_within_one_slice() {
    let mut sim = Sim::new(Runqueue::new(1, 0.95, 0, SEC));
    for id in 1..=4 {
        sim.add(id, Sim::fair(NICE_0_WEIGHT, DEFAULT_SLICE), Demand::Hog);
    }
    let mut worst = 0i128;
    sim.run(2 * SEC, |s| {
        for id in 1..=4 {
            worst = worst.max(s.rq.fair().lag(id).unwrap().abs());
        }
    });
    assert!(
        worst <= (DEFAULT_SLICE + TICK) as i128,
        "worst lag {worst} ns against a slice of {DEFAULT_SLICE} ns"
    );
    // And the service is even.
    let s: Vec<u64> = (1..=4).map(|id| sim.service(id)).collect();
    let (lo, hi) = (*s.iter().min().unwrap(), *s.iter().max().unwrap());
    assert!(hi - lo <= DEFAULT_SLICE, "{s:?}");
}

#[test]
fn weight_two_gets_twice_the_service() {
    let mut sim = Sim::new(Runqueue::new(1, 0.95, 0, SEC));
    sim.add(1, Sim::fair(2 * NICE_0_WEIGHT, DEFAULT_SLICE), Demand::Hog);
    sim.add(2, Sim::fair(NICE_0_WEIGHT, DEFAULT_SLICE), Demand::Hog);
    sim.run(3 * SEC, |_| {});
    let ratio = sim.service(1) as f64 / sim.service(2) as f64;
    assert!((1.9..=2.1).contains(&ratio), "ratio {ratio}");
    // On two slots both run all the time: weights divide contention, not CPUs.
    let mut sim = Sim::new(Runqueue::new(2, 0.95, 0, SEC));
    sim.add(1, Sim::fair(2 * NICE_0_WEIGHT, DEFAULT_SLICE), Demand::Hog);
    sim.add(2, Sim::fair(NICE_0_WEIGHT, DEFAULT_SLICE), Demand::Hog);
    sim.run(SEC, |_| {});
    assert_eq!(sim.service(1), sim.service(2));
}

/// The wait of an interactive job (from its wake-up to its first CPU time) among three
/// hogs, with a short slice and with the hogs' long one.
fn interactive_wait(slice: u64) -> f64 {
    let mut sim = Sim::new(Runqueue::new(1, 0.95, 0, SEC));
    for id in 1..=3 {
        sim.add(id, Sim::fair(NICE_0_WEIGHT, 10 * MS), Demand::Hog);
    }
    sim.add(
        9,
        Sim::fair(NICE_0_WEIGHT, slice),
        Demand::Interactive {
            burst: MS,
            sleep: 20 * MS,
        },
    );
    sim.run(3 * SEC, |_| {});
    let waits = &sim.jobs[&9].waits;
    assert!(waits.len() > 50, "{}", waits.len());
    waits.iter().sum::<u64>() as f64 / waits.len() as f64
}

#[test]
fn a_short_slice_job_waits_less() {
    let short = interactive_wait(MS);
    let long = interactive_wait(10 * MS);
    eprintln!(
        "interactive job's mean wait: {:.2} ms with a 1 ms slice, {:.2} ms with 10 ms",
        short / 1e6,
        long / 1e6
    );
    assert!(
        short < long / 2.0,
        "mean wait with a 1 ms slice {:.2} ms, with 10 ms {:.2} ms",
        short / 1e6,
        long / 1e6
    );
}

#[test]
fn admission_refuses_the_job_that_overflows_the_budget() {
    let mut rq = Runqueue::new(1, 0.95, 0, SEC);
    let dl = |runtime| SchedParams::Deadline {
        runtime,
        deadline: 10 * MS,
        period: 10 * MS,
    };
    for id in 1..=3 {
        rq.admit(id, dl(3 * MS)).unwrap();
    }
    let e = rq.admit(4, dl(MS)).unwrap_err().to_string();
    assert!(
        e.contains("asks for 0.1000 CPUs") && e.contains("0.9000 of the budget of 0.9500"),
        "{e}"
    );
    rq.admit(4, dl(MS / 2)).unwrap();
    // A malformed request is refused with the parameter and the rule, not admitted.
    let e = rq
        .admit(
            5,
            SchedParams::Deadline {
                runtime: 20 * MS,
                deadline: 10 * MS,
                period: 0,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("runtime: 20 ms is longer than the deadline"),
        "{e}"
    );
}

#[test]
fn admitted_deadline_jobs_meet_every_deadline_among_hogs() {
    let mut sim = Sim::new(Runqueue::new(1, 0.95, 0, SEC));
    let jobs = [(1, 2, 10), (2, 3, 20), (3, 5, 50), (4, 20, 100)];
    for (id, runtime, period) in jobs {
        sim.add(
            id,
            SchedParams::Deadline {
                runtime: runtime * MS,
                deadline: period * MS,
                period: period * MS,
            },
            Demand::Periodic {
                work: runtime * MS,
                period: period * MS,
            },
        );
    }
    sim.add(10, Sim::fair(NICE_0_WEIGHT, DEFAULT_SLICE), Demand::Hog);
    sim.add(11, Sim::fair(NICE_0_WEIGHT, DEFAULT_SLICE), Demand::Hog);
    sim.run(5 * SEC, |_| {});
    for (id, runtime, period) in jobs {
        assert_eq!(sim.jobs[&id].late, 0, "job {id} was late");
        assert_eq!(sim.rq.deadline().counts(id).unwrap().1, 0, "misses of {id}");
        let expected = 5 * SEC / (period * MS) * runtime * MS;
        assert!(sim.service(id) >= expected - runtime * MS, "job {id}");
    }
    // The hogs share the rest (0.35 of the CPU) evenly.
    let (a, b) = (sim.service(10), sim.service(11));
    assert!(a + b >= 5 * SEC * 34 / 100, "{a} + {b}");
    assert!(a.abs_diff(b) <= DEFAULT_SLICE, "{a} vs {b}");
}

#[test]
fn a_deadline_job_that_overruns_is_throttled_to_its_bandwidth() {
    let mut sim = Sim::new(Runqueue::new(1, 0.95, 0, SEC));
    sim.add(
        1,
        SchedParams::Deadline {
            runtime: 2 * MS,
            deadline: 10 * MS,
            period: 10 * MS,
        },
        Demand::Hog,
    );
    sim.add(2, Sim::fair(NICE_0_WEIGHT, DEFAULT_SLICE), Demand::Hog);
    sim.run(2 * SEC, |_| {});
    assert_eq!(sim.service(1), 2 * SEC / 5, "20% of the CPU, no more");
    let (overruns, _) = sim.rq.deadline().counts(1).unwrap();
    assert!(overruns >= 199, "{overruns}");
}

#[test]
fn rt_cannot_exceed_its_budget() {
    // 300 ms of every second for the whole rt class.
    let mut sim = Sim::new(Runqueue::new(1, 0.95, 300 * MS, SEC));
    sim.add(1, SchedParams::Rt { priority: 50 }, Demand::Hog);
    sim.add(2, SchedParams::Rt { priority: 10 }, Demand::Hog);
    sim.add(3, Sim::fair(NICE_0_WEIGHT, DEFAULT_SLICE), Demand::Hog);
    sim.run(5 * SEC, |s| assert!(s.rq.rt().used_in_period() <= 300 * MS));
    // The higher priority takes all of the class's time; the class no more than its
    // budget; the fair job the rest.
    assert_eq!(sim.service(1), 5 * 300 * MS);
    assert_eq!(sim.service(2), 0);
    assert_eq!(sim.service(3), 5 * 700 * MS);
}

#[test]
fn idle_runs_only_when_everything_else_sleeps() {
    let mut sim = Sim::new(Runqueue::new(1, 0.95, 0, SEC));
    sim.add(1, SchedParams::Idle, Demand::Hog);
    sim.add(
        2,
        Sim::fair(NICE_0_WEIGHT, DEFAULT_SLICE),
        Demand::Interactive {
            burst: 5 * MS,
            sleep: 15 * MS,
        },
    );
    sim.run(2 * SEC, |s| {
        if s.rq.is_running(1) {
            assert!(
                s.jobs[&2].left.is_none(),
                "idle ran while the fair job wanted the CPU"
            );
        }
    });
    let (idle, fair) = (sim.service(1), sim.service(2));
    assert_eq!(idle + fair, 2 * SEC, "the CPU was never left unused");
    assert!(fair >= 2 * SEC / 4 - 5 * MS, "{fair}");
    // Next to a hog, idle gets nothing.
    let mut sim = Sim::new(Runqueue::new(1, 0.95, 0, SEC));
    sim.add(1, SchedParams::Idle, Demand::Hog);
    sim.add(2, Sim::fair(NICE_0_WEIGHT, DEFAULT_SLICE), Demand::Hog);
    sim.run(SEC, |_| {});
    assert_eq!(sim.service(1), 0);
}
