//! The daemon's event stream, per event: emitted with nobody listening (the ring and
//! the broadcast send), and with one follower that takes every event. Events are emitted
//! on every job transition and every proxied connection, so the first must cost next to
//! nothing.

use agentd::api::types::EventKind;
use agentd::daemon::events::EventBus;
use criterion::{Criterion, criterion_group, criterion_main};

fn emit(c: &mut Criterion) {
    let bus = EventBus::new();
    c.bench_function("event emit, no listener", |b| {
        b.iter(|| {
            bus.emit(
                EventKind::EgressAllowed,
                Some("0123456789ab"),
                None,
                String::new(),
            )
        })
    });
    let bus = EventBus::new();
    let (_, mut rx) = bus.subscribe(u64::MAX);
    c.bench_function("event emit, one listener", |b| {
        b.iter(|| {
            bus.emit(
                EventKind::EgressAllowed,
                Some("0123456789ab"),
                None,
                String::new(),
            );
            rx.try_recv().expect("the follower gets it")
        })
    });
}

criterion_group!(benches, emit);
criterion_main!(benches);
