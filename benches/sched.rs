//! The runqueue's hot path: picking the next fair job among n queued ones (target: ≤ 1
//! µs with 10,000, growing as log n), and one whole turn through the runqueue (tick
//! with the slice used, put back, pick, start) with 10,000 jobs waiting for one slot.

use agentd::sched::fair::{FairClass, NICE_0_WEIGHT};
use agentd::sched::{NSEC_PER_MSEC, Runqueue, SchedClass, SchedParams};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const SLICE: u64 = 3 * NSEC_PER_MSEC;

fn params(i: u64) -> SchedParams {
    // Varied weights and slices, so the sets are not trivially ordered.
    SchedParams::Fair {
        weight: NICE_0_WEIGHT / 2 + (i * 37) % NICE_0_WEIGHT,
        slice: SLICE / 2 + (i * 101) % SLICE,
    }
}

fn pick_next(c: &mut Criterion) {
    let mut group = c.benchmark_group("fair pick_next + account + put_prev");
    for n in [100u64, 1_000, 10_000] {
        let mut fair = FairClass::new();
        for i in 0..n {
            fair.enqueue(i, params(i), 0).unwrap();
        }
        let mut now = 0;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let id = fair.pick_next(now).expect("a job");
                fair.set_running(id, now);
                now += SLICE;
                fair.tick(id, SLICE, now);
                fair.put_prev(id, now);
            })
        });
    }
    group.finish();
}

fn runqueue_turn(c: &mut Criterion) {
    let mut rq = Runqueue::new(1, 0.95, 0, 1_000_000_000);
    for i in 0..10_000u64 {
        rq.enqueue(i, params(i), 0).unwrap();
    }
    let mut now = 0;
    c.bench_function("runqueue tick, 10,000 fair jobs, 1 slot", |b| {
        b.iter(|| {
            now += SLICE;
            rq.tick(now, |_| SLICE)
        })
    });
}

criterion_group!(benches, pick_next, runqueue_turn);
criterion_main!(benches);
