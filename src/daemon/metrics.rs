//! GET /metrics in the Prometheus text format: jobs by state, spawn latency, operations
//! written, denials by rule, and per-job CPU, memory and pids read from the cgroups at
//! scrape time. (Formatted by hand: the format is a few lines of text, and the daemon
//! holds the values already.)

use super::Daemon;
use crate::api::types::JobState;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the spawn-latency histogram, in seconds.
const BUCKETS: [f64; 10] = [
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.025, 0.050, 0.100, 0.500,
];

#[derive(Default)]
pub struct Metrics {
    spawn_buckets: [AtomicU64; BUCKETS.len()],
    spawn_count: AtomicU64,
    spawn_sum_us: AtomicU64,
    spawn_failures: AtomicU64,
    operations: AtomicU64,
    /// Slots the runqueue took from a job (preempted, turn ended).
    pub preemptions: AtomicU64,
    /// Throttled periods of deadline-class jobs (runtime used up: overruns).
    pub deadline_overruns: AtomicU64,
    /// Periods a deadline job spent waiting for a slot (missed deadlines).
    pub deadline_misses: AtomicU64,
    ended: Mutex<BTreeMap<&'static str, u64>>,
    denials: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    pub fn spawned(&self, latency: Duration) {
        let s = latency.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.spawn_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.spawn_count.fetch_add(1, Ordering::Relaxed);
        self.spawn_sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn spawn_failed(&self) {
        self.spawn_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn operations_written(&self, n: u64) {
        self.operations.fetch_add(n, Ordering::Relaxed);
    }

    pub fn ended(&self, state: JobState) {
        *self
            .ended
            .lock()
            .expect("metrics lock")
            .entry(state.as_str())
            .or_default() += 1;
    }

    pub fn denied(&self, rule: &str) {
        *self
            .denials
            .lock()
            .expect("metrics lock")
            .entry(rule.to_owned())
            .or_default() += 1;
    }
}

/// The HELP and TYPE lines that open a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition.
pub fn render(d: &Daemon) -> String {
    let m = &d.metrics;
    let mut out = String::new();
    let (by_state, running) = {
        let jobs = d.jobs.lock().expect("jobs lock");
        let mut by_state: BTreeMap<&str, u64> =
            JobState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        let mut running = Vec::new();
        for e in jobs.values() {
            *by_state.entry(e.info.state.as_str()).or_default() += 1;
            if let Some(cg) = &e.cgroup {
                running.push((e.info.id.clone(), e.info.agent.clone(), cg.clone()));
            }
        }
        (by_state, running)
    };
    family(
        &mut out,
        "agentd_jobs",
        "gauge",
        "Jobs this daemon knows, by state.",
    );
    for (s, n) in &by_state {
        let _ = writeln!(out, "agentd_jobs{{state=\"{s}\"}} {n}");
    }
    family(
        &mut out,
        "agentd_jobs_ended_total",
        "counter",
        "Jobs that ended under this daemon process, by final state.",
    );
    for (s, n) in m.ended.lock().expect("metrics lock").iter() {
        let _ = writeln!(out, "agentd_jobs_ended_total{{state=\"{s}\"}} {n}");
    }
    family(
        &mut out,
        "agentd_spawn_seconds",
        "histogram",
        "Time from a submit request to the job running (validate, record, allocate, spawn).",
    );
    for (i, b) in BUCKETS.iter().enumerate() {
        let _ = writeln!(
            out,
            "agentd_spawn_seconds_bucket{{le=\"{b}\"}} {}",
            m.spawn_buckets[i].load(Ordering::Relaxed)
        );
    }
    let count = m.spawn_count.load(Ordering::Relaxed);
    let _ = writeln!(out, "agentd_spawn_seconds_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(
        out,
        "agentd_spawn_seconds_sum {}",
        m.spawn_sum_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(out, "agentd_spawn_seconds_count {count}");
    family(
        &mut out,
        "agentd_spawn_failures_total",
        "counter",
        "Jobs whose creation pipeline failed.",
    );
    let _ = writeln!(
        out,
        "agentd_spawn_failures_total {}",
        m.spawn_failures.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "agentd_operations_written_total",
        "counter",
        "Operation rows this daemon process wrote.",
    );
    let _ = writeln!(
        out,
        "agentd_operations_written_total {}",
        m.operations.load(Ordering::Relaxed)
    );
    for (name, help, v) in [
        (
            "agentd_sched_preemptions_total",
            "Slots the runqueue took from jobs (frozen for another job).",
            &m.preemptions,
        ),
        (
            "agentd_sched_deadline_overruns_total",
            "Periods in which a deadline job used up its runtime and was throttled (cpu.stat nr_throttled).",
            &m.deadline_overruns,
        ),
        (
            "agentd_sched_deadline_misses_total",
            "Periods a deadline job waited through for a slot (--slots), each a missed deadline.",
            &m.deadline_misses,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    }
    family(
        &mut out,
        "agentd_denials_total",
        "counter",
        "Refused requests, by the rule that refused them.",
    );
    for (rule, n) in m.denials.lock().expect("metrics lock").iter() {
        let _ = writeln!(out, "agentd_denials_total{{rule=\"{}\"}} {n}", label(rule));
    }
    let mut cpu = String::new();
    let mut mem = String::new();
    let mut pids = String::new();
    for (id, agent, cg) in running {
        let u = cg.lock().expect("cgroup lock").usage();
        let l = format!("job=\"{}\",agent=\"{}\"", label(&id), label(&agent));
        if let Some(v) = u.cpu_usec {
            let _ = writeln!(
                cpu,
                "agentd_job_cpu_seconds_total{{{l}}} {}",
                v as f64 / 1e6
            );
        }
        if let Some(v) = u.memory_bytes {
            let _ = writeln!(mem, "agentd_job_memory_bytes{{{l}}} {v}");
        }
        if let Some(v) = u.pids {
            let _ = writeln!(pids, "agentd_job_pids{{{l}}} {v}");
        }
    }
    family(
        &mut out,
        "agentd_job_cpu_seconds_total",
        "counter",
        "CPU time of a running job's cgroup.",
    );
    out.push_str(&cpu);
    family(
        &mut out,
        "agentd_job_memory_bytes",
        "gauge",
        "Memory in use by a running job's cgroup.",
    );
    out.push_str(&mem);
    family(
        &mut out,
        "agentd_job_pids",
        "gauge",
        "Processes and threads in a running job's cgroup.",
    );
    out.push_str(&pids);
    regions(d, &mut out);
    out
}

/// Region telemetry: per region, and per job and region.
fn regions(d: &Daemon, out: &mut String) {
    let (regions, jobs) = d.regions.all_stats();
    family(
        out,
        "agentd_region_faults_total",
        "counter",
        "Faults a region's broker served, by outcome (zero, fetch, cow, retry, failure).",
    );
    for (r, s) in &regions {
        for (outcome, n) in &s.faults {
            let _ = writeln!(
                out,
                "agentd_region_faults_total{{region=\"{}\",outcome=\"{outcome}\"}} {n}",
                label(r)
            );
        }
    }
    family(
        out,
        "agentd_region_bytes_total",
        "counter",
        "Bytes put into jobs' memory by a region's broker, by kind (fetched from its store, zeroed, copied from the parent).",
    );
    for (r, s) in &regions {
        for (kind, n) in [
            ("fetched", s.bytes_fetched),
            ("zeroed", s.bytes_zeroed),
            ("cow", s.bytes_cow),
        ] {
            let _ = writeln!(
                out,
                "agentd_region_bytes_total{{region=\"{}\",kind=\"{kind}\"}} {n}",
                label(r)
            );
        }
    }
    family(
        out,
        "agentd_region_readahead_pages_total",
        "counter",
        "Pages filled ahead of a sequential reader, and (hit=\"true\") those read without a fault.",
    );
    for (r, s) in &regions {
        let _ = writeln!(
            out,
            "agentd_region_readahead_pages_total{{region=\"{}\",hit=\"false\"}} {}",
            label(r),
            s.readahead_pages
        );
        let _ = writeln!(
            out,
            "agentd_region_readahead_pages_total{{region=\"{}\",hit=\"true\"}} {}",
            label(r),
            s.readahead_hits
        );
    }
    family(
        out,
        "agentd_region_fault_seconds",
        "histogram",
        "Time a region's broker took to serve a fault.",
    );
    for (r, s) in &regions {
        for (le, n) in &s.latency_us_buckets {
            let le = le
                .parse::<f64>()
                .map_or("+Inf".to_owned(), |us| format!("{}", us / 1e6));
            let _ = writeln!(
                out,
                "agentd_region_fault_seconds_bucket{{region=\"{}\",le=\"{le}\"}} {n}",
                label(r)
            );
        }
        let _ = writeln!(
            out,
            "agentd_region_fault_seconds_sum{{region=\"{}\"}} {}",
            label(r),
            s.latency_us_sum as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "agentd_region_fault_seconds_count{{region=\"{}\"}} {}",
            label(r),
            s.faults_total()
        );
    }
    family(
        out,
        "agentd_job_region_faults_total",
        "counter",
        "Faults a job's region handles took, by region and outcome.",
    );
    for (j, r, s) in &jobs {
        for (outcome, n) in &s.faults {
            let _ = writeln!(
                out,
                "agentd_job_region_faults_total{{job=\"{j}\",region=\"{}\",outcome=\"{outcome}\"}} {n}",
                label(r)
            );
        }
    }
    family(
        out,
        "agentd_job_region_bytes_fetched_total",
        "counter",
        "Bytes a job's region handles fetched (from the region's store or its parent).",
    );
    for (j, r, s) in &jobs {
        let _ = writeln!(
            out,
            "agentd_job_region_bytes_fetched_total{{job=\"{j}\",region=\"{}\"}} {}",
            label(r),
            s.bytes_fetched + s.bytes_cow
        );
    }
}
