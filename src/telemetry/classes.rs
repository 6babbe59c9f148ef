//! Object classes: the slab idea one level up. The daemon's repeated runtime objects
//! (job descriptors, operation rows in flight, events in the ring, tool-call records,
//! context segments a job stores) are charged to a typed class when they are made and
//! returned when they go, so the daemon can say, like /proc/slabinfo, how many of each
//! live, how many bytes they hold, their high-water mark and how fast they are made —
//! per class and, for the classes a job owns, per job. A job's classes carry quotas from
//! its policy: a charge past one is refused (`QuotaExceeded`), before the memory is taken.
//!
//! Each class also declares an export policy per field (`Export`): what an agent may
//! see of its own objects, what only the operator may see, and what never leaves the
//! daemon. The declaration is checked against the types' serialization in the tests, and
//! `export` filters a serialized object for an audience, dropping every undeclared key.
//!
//! Bytes are the object's own size plus the heap it owns (strings, buffers), estimated
//! by the code that makes it: close enough to see growth and enforce quotas, not an
//! allocator's exact count.
//!
//! Written by hand: no crate does per-type accounting with quotas and export rules.

use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Who may see a field of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Export {
    /// The job it belongs to (its /run/agentd/self view, its socket) and the operator.
    Agent,
    /// The operator only (the control API: root and the socket's group).
    Operator,
    /// Nobody: the field stays in the daemon's memory (not the store, the API, the
    /// events, the view or the logs).
    Never,
}

/// Who is reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Agent,
    Operator,
}

impl Export {
    pub fn visible_to(self, who: Audience) -> bool {
        match self {
            Export::Agent => true,
            Export::Operator => who == Audience::Operator,
            Export::Never => false,
        }
    }
}

pub struct Field {
    pub name: &'static str,
    pub export: Export,
}

const fn f(name: &'static str, export: Export) -> Field {
    Field { name, export }
}

/// One class's declaration.
pub struct ClassSpec {
    pub name: &'static str,
    pub what: &'static str,
    /// Charged to a job (accounted per job, may carry a quota).
    pub per_job: bool,
    pub fields: &'static [Field],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Class {
    Job = 0,
    Operation = 1,
    Event = 2,
    ToolCall = 3,
    ContextSegment = 4,
    RegionHandle = 5,
}

pub const CLASSES: usize = 6;
pub const ALL: [Class; CLASSES] = [
    Class::Job,
    Class::Operation,
    Class::Event,
    Class::ToolCall,
    Class::ContextSegment,
    Class::RegionHandle,
];

use Export::{Agent as A, Never as N, Operator as O};

static SPECS: [ClassSpec; CLASSES] = [
    ClassSpec {
        name: "job",
        what: "job descriptors the daemon holds (running, and the last --keep-ended ended)",
        per_job: true,
        fields: &[
            f("id", A),
            f("state", A),
            f("policy", A),
            f("policy_hash", A),
            f("agent", A),
            f("model", A),
            f("lease", A),
            f("durable", A),
            f("command", O),
            f("workspace", O),
            f("requester", O),
            f("submitted_ms", O),
            f("started_ms", O),
            f("ended_ms", O),
            f("pid", O),
            f("cgroup", O),
            f("exit", O),
            f("reason", O),
            f("usage", O),
            f("report", O),
            f("review", O),
            f("snapshot", O),
            f("tool_calls", O),
            f("waiting", A),
        ],
    },
    ClassSpec {
        name: "operation",
        what: "operation rows on their way to the store (made, not yet durable)",
        per_job: false,
        fields: &[
            f("requester", O),
            f("action", O),
            f("target", O),
            f("authority", O),
            f("change", O),
            f("rollback", O),
        ],
    },
    ClassSpec {
        name: "event",
        what: "events in the daemon's ring (the last 4096)",
        per_job: false,
        fields: &[
            f("seq", O),
            f("time_ms", O),
            f("kind", O),
            f("job", O),
            f("lease", O),
            f("detail", O),
        ],
    },
    ClassSpec {
        name: "tool_call",
        what: "tool-call records jobs made through their socket (provenance)",
        per_job: true,
        fields: &[
            f("name", A),
            f("status", A),
            f("time_ms", A),
            f("args_digest", A),
            f("args_bytes", O),
            f("args", N),
        ],
    },
    ClassSpec {
        name: "context_segment",
        what: "prompt or context segments jobs store with the daemon, while they run",
        per_job: true,
        fields: &[
            f("name", A),
            f("bytes", A),
            f("sha256", A),
            f("stored_ms", A),
            f("content", A),
        ],
    },
    ClassSpec {
        name: "region_handle",
        what: "open region handles: a broker thread each, with its read buffers and layer map",
        per_job: true,
        fields: &[
            f("job", A),
            f("region", A),
            f("generation", A),
            f("write", A),
            f("bytes", A),
            f("opened_ms", A),
        ],
    },
];

impl Class {
    pub fn spec(self) -> &'static ClassSpec {
        &SPECS[self as usize]
    }
    pub fn name(self) -> &'static str {
        self.spec().name
    }
    pub fn by_name(name: &str) -> Option<Class> {
        ALL.into_iter().find(|c| c.name() == name)
    }
}

/// Keeps only the fields of a serialized object of `class` that `who` may see; every
/// key the class does not declare is dropped (so a field added to a type and forgotten
/// here fails closed).
pub fn export(class: Class, value: &serde_json::Value, who: Audience) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.iter()
                .filter(|(k, _)| {
                    class
                        .spec()
                        .fields
                        .iter()
                        .any(|f| f.name == k.as_str() && f.export.visible_to(who))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(|v| export(class, v, who)).collect())
        }
        other => other.clone(),
    }
}

/// A job's bound on one class: objects, bytes, or both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// Whether `asked` (objects, bytes) more on top of `held` fits `quota`; the one place
/// the rule is written (charges use it, and so does a check made before the memory is
/// taken, like a context segment's from its Content-Length).
pub fn check_quota(
    class: Class,
    job: &str,
    held: (u64, u64),
    asked: (u64, u64),
    quota: Quota,
) -> Result<(), QuotaExceeded> {
    for (bound, limit, held, asked) in [
        ("objects", quota.objects, held.0, asked.0),
        ("bytes", quota.bytes, held.1, asked.1),
    ] {
        if let Some(limit) = limit
            && asked > 0
            && held + asked > limit
        {
            return Err(QuotaExceeded {
                class,
                job: job.to_owned(),
                bound,
                limit,
                held,
                asked,
            });
        }
    }
    Ok(())
}

/// A charge a job's quota did not allow: what it held, what it asked, the bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub class: Class,
    pub job: String,
    /// "objects" or "bytes".
    pub bound: &'static str,
    pub limit: u64,
    pub held: u64,
    pub asked: u64,
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "job {} holds {} {} of {} and asked for {} more; its quota is {}",
            self.job,
            self.held,
            self.bound,
            self.class.name(),
            self.asked,
            self.limit
        )
    }
}

#[derive(Default)]
struct Counters {
    live: AtomicU64,
    bytes: AtomicU64,
    high_live: AtomicU64,
    high_bytes: AtomicU64,
    allocs: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JobCounters {
    pub live: u64,
    pub bytes: u64,
    pub high_live: u64,
    pub high_bytes: u64,
    pub allocs: u64,
}

/// One job's counters, per class, since it was first charged.
struct JobTable {
    since: Instant,
    classes: [JobCounters; CLASSES],
}

/// The daemon's accounting: global counters are atomics (events are charged on every
/// emit and must stay cheap); per-job counters sit behind one lock, taken only by the
/// classes a job owns.
pub struct Accounting {
    global: [Counters; CLASSES],
    per_job: Mutex<HashMap<Arc<str>, JobTable>>,
    /// (when, allocations so far per class): the last `RATE_WINDOW` samples.
    samples: Mutex<VecDeque<(Instant, [u64; CLASSES])>>,
}

/// Samples kept for the allocation rate (one per `sample` call, once a second).
const RATE_WINDOW: usize = 11;

impl Default for Accounting {
    fn default() -> Self {
        Accounting {
            global: Default::default(),
            per_job: Mutex::new(HashMap::new()),
            samples: Mutex::new(VecDeque::with_capacity(RATE_WINDOW)),
        }
    }
}

/// One class as `agentctl classes` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ClassStats {
    pub name: String,
    pub what: String,
    pub live: u64,
    pub bytes: u64,
    pub high_water_live: u64,
    pub high_water_bytes: u64,
    pub allocs_total: u64,
    /// Over the last ten seconds (0 until two samples exist).
    pub allocs_per_sec: f64,
    /// Field names by who may see them.
    pub agent_fields: Vec<String>,
    pub operator_fields: Vec<String>,
    pub never_fields: Vec<String>,
}

/// One job's holding of one class.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct JobClassStats {
    pub job: String,
    pub class: String,
    pub live: u64,
    pub bytes: u64,
    pub high_water_live: u64,
    pub high_water_bytes: u64,
    pub allocs_total: u64,
    /// Over the time the daemon has held the job.
    pub allocs_per_sec: f64,
}

impl Accounting {
    /// Charges `live` objects and `bytes` to `class` (and to `job`, for a class a job
    /// owns), unless that would take the job past `quota`.
    pub fn charge(
        self: &Arc<Self>,
        class: Class,
        job: Option<&str>,
        live: u64,
        bytes: u64,
        quota: Quota,
    ) -> Result<Charge, QuotaExceeded> {
        let job: Option<Arc<str>> = job.map(Arc::from);
        self.add(class, job.as_ref(), live, bytes, quota)?;
        Ok(Charge {
            accounting: self.clone(),
            class,
            job,
            live,
            bytes,
        })
    }

    /// Sets a class's counters from an owner that keeps them itself under its own lock
    /// (the event ring: plain stores there cost less than atomic adds on every emit).
    pub fn publish(&self, class: Class, now: JobCounters) {
        let c = &self.global[class as usize];
        c.live.store(now.live, Relaxed);
        c.bytes.store(now.bytes, Relaxed);
        c.high_live.store(now.high_live, Relaxed);
        c.high_bytes.store(now.high_bytes, Relaxed);
        c.allocs.store(now.allocs, Relaxed);
    }

    /// Adds to the counters without a `Charge`.
    pub fn add_global(&self, class: Class, live: u64, bytes: u64) {
        let c = &self.global[class as usize];
        let now_live = c.live.fetch_add(live, Relaxed) + live;
        let now_bytes = c.bytes.fetch_add(bytes, Relaxed) + bytes;
        c.high_live.fetch_max(now_live, Relaxed);
        c.high_bytes.fetch_max(now_bytes, Relaxed);
        c.allocs.fetch_add(live, Relaxed);
    }

    pub fn sub_global(&self, class: Class, live: u64, bytes: u64) {
        let c = &self.global[class as usize];
        c.live.fetch_sub(live, Relaxed);
        c.bytes.fetch_sub(bytes, Relaxed);
    }

    fn add(
        &self,
        class: Class,
        job: Option<&Arc<str>>,
        live: u64,
        bytes: u64,
        quota: Quota,
    ) -> Result<(), QuotaExceeded> {
        if let Some(job) = job {
            let mut per_job = self.per_job.lock().expect("class accounting lock");
            let held = per_job
                .get(job)
                .map(|t| t.classes[class as usize])
                .unwrap_or_default();
            check_quota(class, job, (held.live, held.bytes), (live, bytes), quota)?;
            let table = per_job.entry(job.clone()).or_insert_with(|| JobTable {
                since: Instant::now(),
                classes: Default::default(),
            });
            let slot = &mut table.classes[class as usize];
            slot.live += live;
            slot.bytes += bytes;
            slot.high_live = slot.high_live.max(slot.live);
            slot.high_bytes = slot.high_bytes.max(slot.bytes);
            slot.allocs += live;
        }
        self.add_global(class, live, bytes);
        Ok(())
    }

    fn sub(&self, class: Class, job: Option<&Arc<str>>, live: u64, bytes: u64) {
        if let Some(job) = job {
            let mut per_job = self.per_job.lock().expect("class accounting lock");
            if let Some(table) = per_job.get_mut(job) {
                let slot = &mut table.classes[class as usize];
                slot.live = slot.live.saturating_sub(live);
                slot.bytes = slot.bytes.saturating_sub(bytes);
                // A job that holds nothing any more leaves the table (while the daemon
                // holds a job its descriptor is charged, so that is when it is gone).
                if table.classes.iter().all(|c| c.live == 0 && c.bytes == 0) {
                    per_job.remove(job);
                }
            }
        }
        self.sub_global(class, live, bytes);
    }

    /// What `job` holds of `class` now.
    pub fn held(&self, job: &str, class: Class) -> JobCounters {
        self.per_job
            .lock()
            .expect("class accounting lock")
            .get(job)
            .map(|t| t.classes[class as usize])
            .unwrap_or_default()
    }

    /// Records allocation totals for the rate; call once a second.
    pub fn sample(&self) {
        let totals = std::array::from_fn(|i| self.global[i].allocs.load(Relaxed));
        let mut samples = self.samples.lock().expect("class samples lock");
        if samples.len() == RATE_WINDOW {
            samples.pop_front();
        }
        samples.push_back((Instant::now(), totals));
    }

    /// Every class, and what each job holds (only `job` if given).
    pub fn stats(&self, job: Option<&str>) -> (Vec<ClassStats>, Vec<JobClassStats>) {
        let rates: [f64; CLASSES] = {
            let samples = self.samples.lock().expect("class samples lock");
            match (samples.front(), samples.back()) {
                (Some((t0, a0)), Some((t1, a1))) if t1 > t0 => {
                    let secs = (*t1 - *t0).as_secs_f64();
                    std::array::from_fn(|i| (a1[i] - a0[i]) as f64 / secs)
                }
                _ => [0.0; CLASSES],
            }
        };
        let names = |class: Class, e: Export| -> Vec<String> {
            class
                .spec()
                .fields
                .iter()
                .filter(|f| f.export == e)
                .map(|f| f.name.to_owned())
                .collect()
        };
        let classes = ALL
            .iter()
            .map(|&class| {
                let c = &self.global[class as usize];
                ClassStats {
                    name: class.name().into(),
                    what: class.spec().what.into(),
                    live: c.live.load(Relaxed),
                    bytes: c.bytes.load(Relaxed),
                    high_water_live: c.high_live.load(Relaxed),
                    high_water_bytes: c.high_bytes.load(Relaxed),
                    allocs_total: c.allocs.load(Relaxed),
                    allocs_per_sec: (rates[class as usize] * 10.0).round() / 10.0,
                    agent_fields: names(class, Export::Agent),
                    operator_fields: names(class, Export::Operator),
                    never_fields: names(class, Export::Never),
                }
            })
            .collect();
        let per_job = self.per_job.lock().expect("class accounting lock");
        let mut jobs: Vec<JobClassStats> = per_job
            .iter()
            .filter(|(id, _)| job.is_none_or(|j| j == &***id))
            .flat_map(|(id, table)| {
                let secs = table.since.elapsed().as_secs_f64().max(1.0);
                ALL.iter().filter_map(move |&class| {
                    let c = table.classes[class as usize];
                    (c.allocs > 0 || c.bytes > 0).then(|| JobClassStats {
                        job: id.to_string(),
                        class: class.name().into(),
                        live: c.live,
                        bytes: c.bytes,
                        high_water_live: c.high_live,
                        high_water_bytes: c.high_bytes,
                        allocs_total: c.allocs,
                        allocs_per_sec: (c.allocs as f64 / secs * 10.0).round() / 10.0,
                    })
                })
            })
            .collect();
        jobs.sort_by(|a, b| (&a.job, &a.class).cmp(&(&b.job, &b.class)));
        (classes, jobs)
    }
}

/// Objects charged to a class; returned when dropped. Grows and shrinks with what it
/// covers (one charge can stand for a job's whole list of tool calls).
pub struct Charge {
    accounting: Arc<Accounting>,
    class: Class,
    job: Option<Arc<str>>,
    live: u64,
    bytes: u64,
}

impl Charge {
    pub fn grow(&mut self, live: u64, bytes: u64, quota: Quota) -> Result<(), QuotaExceeded> {
        self.accounting
            .add(self.class, self.job.as_ref(), live, bytes, quota)?;
        self.live += live;
        self.bytes += bytes;
        Ok(())
    }

    pub fn shrink(&mut self, live: u64, bytes: u64) {
        let (live, bytes) = (live.min(self.live), bytes.min(self.bytes));
        self.accounting
            .sub(self.class, self.job.as_ref(), live, bytes);
        self.live -= live;
        self.bytes -= bytes;
    }

    pub fn live(&self) -> u64 {
        self.live
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.accounting
            .sub(self.class, self.job.as_ref(), self.live, self.bytes);
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Charge({}: {} objects, {} bytes)",
            self.class.name(),
            self.live,
            self.bytes
        )
    }
}

#[cfg(test)]
mod tests;
