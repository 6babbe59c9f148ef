//! `agentd serve`: one daemon that runs many jobs, each through the same pipeline and
//! sandbox as `agentd run`, with a control API on a Unix socket, durable state in
//! SQLite and a hash-chained operation table.
//!
//! Start-up, in order: refuse without root → logging (journald under systemd, stderr
//! otherwise) → open the store → place the daemon in its own leaf cgroup (v2) so job
//! cgroups can be its siblings → adopt the jobs a previous daemon left running → bind
//! the socket → READY=1 → serve. A SIGTERM stops the daemon and leaves jobs running:
//! the next daemon adopts them.

pub mod context;
pub mod egress;
pub mod events;
pub mod jobs;
pub mod jobsock;
pub mod leases;
pub mod lifecycle;
pub mod metrics;
pub mod recovery;
pub mod regions;
pub mod review;
pub mod sched;
pub mod selfview;
pub mod snapshots;
pub mod spawner;
pub mod submit;
pub mod systemd;
mod watch;

use crate::api::types::{JobInfo, LeaseInfo};
use crate::audit::{NewOperation, Requester};
use crate::cgroup::{HostCgroups, JobCgroup};
use crate::store::{JobRecord, Store, WriteBatch};
use crate::telemetry::classes::{Accounting, Charge, Class, Quota};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, watch as watch_ch};

/// What `agentd serve` was told.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub policy_dir: PathBuf,
    pub cgroup_parent: Option<String>,
    /// The group whose members may use the API (besides root).
    pub group: String,
    pub max_connections: usize,
    /// Spawner processes (jobs started at once).
    pub spawners: usize,
    /// Ended jobs kept in memory; older ones are read from the store.
    pub keep_ended: usize,
    /// CPUs the supervisor hands to jobs (deadline bandwidth is admitted within it);
    /// None: 95% of the host's.
    pub cpu_budget: Option<f64>,
    /// Jobs that may run at once (the others wait, frozen); None: no limit.
    pub slots: Option<usize>,
    /// The runqueue's accounting period.
    pub sched_tick: Duration,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// What the daemon must remember about a job to adopt it after a restart; stored with
/// the job, opaque to the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobRuntime {
    /// The job's runtime directory (its root's mount point, its lock).
    pub rundir: String,
    /// The job's state directory: stdout, stderr, status.
    pub jobdir: String,
    /// Start time of the job's init (field 22 of /proc/PID/stat), so a recycled pid is
    /// never mistaken for the job.
    #[serde(default)]
    pub pid_start_ticks: Option<u64>,
    #[serde(default)]
    pub cgroup_dirs: Vec<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    pub kill_grace_ms: u64,
    /// The policy lets the job be durable.
    pub policy_durable: bool,
    /// A cancellation in progress: why, and when the whole cgroup is killed.
    #[serde(default)]
    pub cancel_reason: Option<String>,
    #[serde(default)]
    pub kill_at_ms: Option<u64>,
    /// The job's report (JSON) as of its start; the end fills in exit, wall time and
    /// usage. Kept as text: a parsed document costs ten times the memory.
    #[serde(default)]
    pub report: Option<String>,
    /// `proxy` mode: the job's network grant, so a restarted daemon serves its proxy
    /// endpoints again.
    #[serde(default)]
    pub egress: Option<crate::net::EgressPolicy>,
    /// The host user the job runs as (the requester of what the job itself asks for).
    #[serde(default)]
    pub job_uid: u32,
    #[serde(default)]
    pub job_gid: u32,
    /// What the job may make the daemon hold (its policy's `[quotas]`).
    #[serde(default)]
    pub quotas: crate::spec::quotas::Quotas,
    /// Its scheduling class and parameters (admitted again after a restart).
    #[serde(default)]
    pub sched: Option<crate::sched::SchedParams>,
    /// The regions it was given, and the rules that gave them (served again by a
    /// restarted daemon).
    #[serde(default)]
    pub regions: Vec<crate::region::RegionGrant>,
}

/// One job as the daemon holds it.
pub struct JobEntry {
    pub info: JobInfo,
    pub runtime: JobRuntime,
    pub cgroup: Option<Arc<Mutex<Box<dyn JobCgroup>>>>,
    /// The job's init, while it runs.
    pub pidfd: Option<Arc<std::os::fd::OwnedFd>>,
    /// Current state, for waiters.
    pub state_tx: watch_ch::Sender<crate::api::types::JobState>,
    /// Wakes the job's watcher when a cancellation changed its timers.
    pub wake: Arc<Notify>,
    /// `proxy` mode: the job's proxy, served while it runs (dropping `Serving` stops it).
    pub egress: Option<(Arc<crate::net::Membrane>, crate::net::proxy::Serving)>,
    /// Serializes this job's change-then-commit sequences, so the store always ends with
    /// the latest state and operation rows follow the job's own order.
    pub order: Arc<tokio::sync::Mutex<()>>,
    /// What the job's objects are charged to (telemetry::classes): the descriptor
    /// itself, its tool-call records, and its context segments with their charge.
    pub descriptor_charge: Charge,
    pub tool_call_charge: Charge,
    pub context: context::Segments,
}

impl JobEntry {
    /// A job the daemon holds from now on, charged to the classes it owns (without
    /// quotas: what a job already holds when it is loaded or submitted is allowed).
    pub fn new(info: JobInfo, runtime: JobRuntime, classes: &Arc<Accounting>) -> JobEntry {
        let unbounded = Quota::default();
        let id = info.id.clone();
        let charge = |class, live, bytes| {
            classes
                .charge(class, Some(&id), live, bytes, unbounded)
                .expect("no quota")
        };
        let tool_calls = info.tool_calls.iter().map(tool_call_bytes).sum();
        JobEntry {
            descriptor_charge: charge(Class::Job, 1, descriptor_bytes(&info, &runtime)),
            tool_call_charge: charge(Class::ToolCall, info.tool_calls.len() as u64, tool_calls),
            context: context::Segments::new(charge(Class::ContextSegment, 0, 0)),
            state_tx: watch_ch::channel(info.state).0,
            info,
            runtime,
            cgroup: None,
            pidfd: None,
            egress: None,
            wake: Arc::new(Notify::new()),
            order: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Charges the descriptor again for what it holds now (its report came or went).
    pub fn recharge(&mut self) {
        let now = descriptor_bytes(&self.info, &self.runtime);
        let before = self.descriptor_charge.bytes();
        if now > before {
            let _ = self
                .descriptor_charge
                .grow(0, now - before, Quota::default());
        } else {
            self.descriptor_charge.shrink(0, before - now);
        }
    }

    pub fn record(&self) -> JobRecord {
        JobRecord {
            info: self.info.clone(),
            runtime: serde_json::to_value(&self.runtime).expect("runtime serializes"),
        }
    }
}

/// A job descriptor's bytes: the entry and the heap it owns that grows with the job
/// (command, report, review, tool calls are charged to their own class).
fn descriptor_bytes(info: &JobInfo, runtime: &JobRuntime) -> u64 {
    let strings = info.command.iter().map(|a| a.len() + 24).sum::<usize>()
        + info.id.len()
        + info.policy.len()
        + info.policy_hash.len()
        + info.agent.len()
        + info.model.len()
        + info.workspace.as_ref().map_or(0, String::len)
        + info.cgroup.iter().map(|c| c.len() + 24).sum::<usize>()
        + info.reason.as_ref().map_or(0, String::len)
        + runtime.rundir.len()
        + runtime.jobdir.len()
        + runtime.report.as_ref().map_or(0, String::len)
        + runtime
            .cgroup_dirs
            .iter()
            .map(|c| c.len() + 24)
            .sum::<usize>();
    (std::mem::size_of::<JobEntry>() + strings) as u64
}

/// A tool-call record's bytes (its arguments included: the daemon holds them).
pub fn tool_call_bytes(t: &crate::api::types::ToolCall) -> u64 {
    (std::mem::size_of::<crate::api::types::ToolCall>()
        + t.name.len()
        + t.status.len()
        + t.args_digest.as_ref().map_or(0, String::len)) as u64
        + t.args_bytes.unwrap_or(0)
}

/// The daemon's shared state.
pub struct Daemon {
    pub opts: ServeOptions,
    pub store: Store,
    pub events: events::EventBus,
    pub metrics: metrics::Metrics,
    pub host_cgroups: HostCgroups,
    /// Every job this daemon knows (loaded at start, then submitted).
    pub jobs: Mutex<HashMap<String, JobEntry>>,
    pub leases: Mutex<HashMap<String, LeaseInfo>>,
    /// The gid of `opts.group`, when that group exists.
    pub group_gid: Option<u32>,
    /// The descriptor limit jobs get (the daemon's own is raised).
    pub job_nofile: Option<(u64, u64)>,
    /// The processes jobs are cloned from.
    pub spawners: spawner::SpawnerPool,
    /// Source directory → the review job holding its one unique handle.
    pub reviews: Mutex<HashMap<String, String>>,
    /// Running jobs' own sockets (jobsock), by job.
    pub job_sockets: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// What each running job's /run/agentd/self shows (selfview).
    pub selfviews: selfview::SelfViews,
    /// The runtime objects the daemon holds, by class and job (`agentctl classes`).
    pub classes: Arc<Accounting>,
    /// The jobs' scheduling classes: admission, queues (`agentctl sched`).
    pub sched: Mutex<crate::sched::Runqueue>,
    /// Held while the runqueue's decisions are carried out (one batch at a time).
    pub sched_apply: tokio::sync::Mutex<()>,
    /// The cgroup every job cgroup sits below, carrying the CPU budget.
    pub job_group: crate::cgroup::JobGroup,
    /// Regions: their records, live state and counters, and the jobs' region sockets.
    pub regions: regions::Regions,
    /// The async runtime, for the threads outside it (region brokers) that record
    /// operations.
    pub rt: tokio::runtime::Handle,
}

impl Daemon {
    /// Writes a batch through the store's group commit.
    pub async fn commit(&self, batch: WriteBatch) -> Result<(), crate::store::StoreError> {
        let n = batch.ops.len() as u64;
        // The rows are charged to their class until they are durable (or failed). Their
        // `change` documents are not measured: that would serialize each a second time
        // on the commit path (the store serializes it once).
        let bytes: usize = batch
            .ops
            .iter()
            .map(|o| {
                std::mem::size_of::<NewOperation>()
                    + o.action.len()
                    + o.authority.len()
                    + o.rollback.len()
                    + o.target.as_ref().map_or(0, String::len)
            })
            .sum();
        let _in_flight = (n > 0).then(|| {
            self.classes
                .charge(Class::Operation, None, n, bytes as u64, Quota::default())
                .expect("no quota")
        });
        self.store.commit(batch).await?;
        self.metrics.operations_written(n);
        Ok(())
    }

    /// Waits for job `id`'s turn to change (see `JobEntry::order`); None if there is no
    /// such job in memory. Hold the guard until the change is committed.
    pub async fn ordered(&self, id: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let order = self.jobs.lock().expect("jobs lock").get(id)?.order.clone();
        Some(order.lock_owned().await)
    }

    /// Records one operation with nothing else.
    pub async fn record_op(&self, op: NewOperation) {
        let action = op.action.clone();
        if let Err(e) = self
            .commit(WriteBatch {
                ops: vec![op],
                ..Default::default()
            })
            .await
        {
            tracing::error!("cannot record the operation {action}: {e}");
        }
    }
}

/// An operation by the daemon itself (timeouts, lease expiry, adoption).
pub fn daemon_op(
    action: &str,
    target: &str,
    authority: impl Into<String>,
    change: serde_json::Value,
    rollback: impl Into<String>,
) -> NewOperation {
    NewOperation {
        requester: Requester::daemon(),
        action: action.into(),
        target: Some(target.into()),
        authority: authority.into(),
        change,
        rollback: rollback.into(),
    }
}

/// Formats a duration the way policies write them.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Runs the daemon until SIGTERM or SIGINT; returns the process exit status.
pub fn serve(opts: ServeOptions) -> i32 {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "agentd: serve needs root: it creates job cgroups, namespaces and idmapped mounts"
        );
        return 125;
    }
    systemd::init_logging();
    // Two malloc arenas, not eight per core: the blocking threads that validate jobs
    // would otherwise each keep an arena of their own alive.
    // SAFETY: mallopt with integer arguments, before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let job_nofile = systemd::raise_fd_limit();
    let host_cgroups = match HostCgroups::detect() {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("cannot read the host's cgroups: {e}");
            return 125;
        }
    };
    // Before any thread exists: the daemon moves into a leaf of its cgroup so that job
    // cgroups can be siblings (cgroup v2 allows no processes in a cgroup whose children
    // get controllers).
    let mut opts = opts;
    match systemd::enter_leaf_cgroup(&host_cgroups, opts.cgroup_parent.as_deref()) {
        Ok(Some(parent)) => {
            tracing::info!("job cgroups go below {parent}");
            opts.cgroup_parent = Some(parent);
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!("{e}");
            return 125;
        }
    }
    let host_cgroups = HostCgroups::detect().unwrap_or(host_cgroups);
    // Jobs are cloned from small spawner processes, not from this one (see `spawner`).
    // Should one die, its jobs' inits come to the daemon, which reaps them.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let spawners = match spawner::SpawnerPool::start(opts.spawners) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("cannot start the spawner processes: {e}");
            return 125;
        }
    };
    if let Err(e) = crate::job::make_passable(&opts.runtime_dir) {
        tracing::error!(
            "cannot prepare the runtime directory {}: {e}",
            opts.runtime_dir.display()
        );
        return 125;
    }
    let store = match Store::open(&opts.state_dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return 125;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .thread_name("agentd")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return 125;
        }
    };
    let group_gid = nix::unistd::Group::from_name(&opts.group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    // The sources undecided review jobs hold (a pending change outlives its job).
    let reviews = match store.jobs() {
        Ok(records) => review::held_sources(&records).into_iter().collect(),
        Err(e) => {
            eprintln!("agentd serve: cannot read the jobs of the last run: {e}");
            return 125;
        }
    };
    let classes = Arc::new(Accounting::default());
    let cpu_budget = opts.cpu_budget.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64) * 0.95
    });
    // Every job cgroup goes below one group that carries the budget: the jobs' weights
    // divide it, and the rest stays with this process and the host.
    let job_group = match crate::cgroup::JobGroup::ensure(
        &host_cgroups,
        opts.cgroup_parent.as_deref(),
        &sched::job_group_name(&opts.state_dir),
        cpu_budget,
    ) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!("cannot make the cgroup that holds the jobs: {e}");
            return 125;
        }
    };
    match job_group.budget_enforced {
        Some(cpus) => tracing::info!(
            "job cgroups go below {} (CPU budget {cpus:.2} CPUs)",
            job_group.parent
        ),
        None => tracing::warn!(
            "job cgroups go below {}; the cpu controller is not usable there, so the CPU budget is not enforced",
            job_group.parent
        ),
    }
    opts.cgroup_parent = Some(job_group.parent.clone());
    let regions = match regions::Regions::load(&store, &opts.state_dir) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot load the regions: {e}");
            return 125;
        }
    };
    let daemon = Arc::new(Daemon {
        regions,
        rt: runtime.handle().clone(),
        sched: sched::new_runqueue(cpu_budget, opts.slots),
        job_group: job_group.clone(),
        sched_apply: tokio::sync::Mutex::new(()),
        opts,
        store,
        events: events::EventBus::with_accounting(classes.clone()),
        classes,
        metrics: metrics::Metrics::default(),
        host_cgroups,
        jobs: Mutex::new(HashMap::new()),
        leases: Mutex::new(HashMap::new()),
        group_gid,
        job_nofile,
        spawners,
        reviews: Mutex::new(reviews),
        job_sockets: Mutex::new(HashMap::new()),
        selfviews: selfview::SelfViews::default(),
    });
    let code = runtime.block_on(async move {
        if let Err(e) = recovery::recover(&daemon).await {
            tracing::error!("cannot recover the state of the last run: {e}");
            return 125;
        }
        let listener = match crate::api::server::bind(&daemon) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}");
                return 125;
            }
        };
        tokio::spawn(leases::expiry_loop(daemon.clone()));
        tokio::spawn(selfview::refresh_loop(daemon.clone()));
        if daemon.opts.slots.is_some() {
            tokio::spawn(sched::tick_loop(daemon.clone()));
        }
        systemd::notify_ready();
        tokio::spawn(systemd::watchdog_loop());
        tracing::info!(
            "agentd serve: listening on {} (state in {})",
            daemon.opts.socket.display(),
            daemon.opts.state_dir.display()
        );
        let server = tokio::spawn(crate::api::server::serve(daemon.clone(), listener));
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut int =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        tokio::select! {
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
            _ = async { match int.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
            r = server => {
                if let Ok(Err(e)) = r { tracing::error!("the API server stopped: {e}"); return 125; }
            }
        }
        systemd::notify_stopping();
        let running = daemon
            .jobs
            .lock()
            .expect("jobs lock")
            .values()
            .filter(|j| !j.info.state.is_terminal())
            .count();
        tracing::info!(
            "agentd serve: stopping; {running} job(s) keep running and are adopted by the next agentd serve"
        );
        let _ = std::fs::remove_file(&daemon.opts.socket);
        0
    });
    // Gone only where empty: a group that still holds jobs stays for the next daemon.
    job_group.remove_if_empty();
    // Leave without running destructors: running jobs' cgroups and runtime directories
    // belong to the jobs now, not to this process.
    std::process::exit(code)
}
