//! In-process hot paths of `agentd run`, before any syscall that creates something:
//! parsing and validating the default policy (TOML, path checks, sha256) and compiling
//! the seccomp filter. The whole-process start cost is measured by scripts/bench-spawn.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

fn policy_parse(c: &mut Criterion) {
    let (name, text) = agentd::spec::BUILTIN_POLICIES[0];
    c.bench_function("parse+validate default policy", |b| {
        b.iter(|| agentd::spec::parse_policy(black_box(text), "bench", name).unwrap())
    });
}

fn seccomp_build(c: &mut Criterion) {
    c.bench_function("compile seccomp filter", |b| {
        b.iter(agentd::sandbox::seccomp::build)
    });
}

criterion_group!(benches, policy_parse, seccomp_build);
criterion_main!(benches);
