//! Every request and response body of the control API, shared by `agentd serve` and
//! `agentctl`. README ("Control API") documents them; keep the two in step.
//!
//! Conventions: JSON bodies; unknown fields in a request are an error (400); times are
//! milliseconds since the Unix epoch (`*_ms`); durations are strings like "30s", "5m";
//! every error is `{"error": "..."}` with a 4xx or 5xx status.

use serde::{Deserialize, Serialize};

pub use crate::audit::{OperationRow, Requester, VerifyReport};

/// Largest request body the daemon reads (bytes); larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// POST /v1/jobs
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The command and its arguments (required, non-empty).
    pub command: Vec<String>,
    /// A policy name (the daemon's policy dir, then built in); default "default".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// An inline policy (TOML text) instead of a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_toml: Option<String>,
    /// Absolute path of the job's writable workspace (its working directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// How the job gets the workspace: "direct" (writable, the default), "readonly"
    /// (a borrowed view) or "review" (a unique overlay whose change waits for
    /// `accept` or `reject`).
    #[serde(default, skip_serializing_if = "is_direct")]
    pub workspace_mode: WorkspaceMode,
    /// Borrow a published snapshot (its id) as the read-only workspace, instead of a
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// KEY=VALUE to set in the job's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Run under this lease (the caller's): the job is cancelled when the lease ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// Start durable (outlives its client). Needs a policy with `lifecycle.durable = true`.
    /// Without `lease` and without `durable` a job is refused: it would have no owner.
    #[serde(default)]
    pub durable: bool,
    /// Kernel features the job may run without (as `agentd run --allow-degraded`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_degraded: Vec<String>,
    /// Network mode instead of the policy's: "none", "proxy" or "host" (only root may
    /// widen it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<String>,
    /// Domain patterns added to the policy's network.allow_domains (root only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_domain: Vec<String>,
    /// Private, loopback and link-local destinations too (root only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_private: bool,
    /// The scheduling class and its parameters, within the policy's `[sched]`:
    /// `{"class": "fair"|"deadline"|"rt"|"idle", "weight", "slice", "runtime",
    /// "deadline", "period", "priority"}` (durations as "3ms").
    #[serde(
        default,
        skip_serializing_if = "crate::spec::sched::SchedRequest::is_empty"
    )]
    pub sched: crate::spec::sched::SchedRequest,
    /// Regions the job may open: "NAME" (read-only) or "NAME:rw", each granted by the
    /// policy's `[regions] allow`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
}

/// A job's lifecycle state. Transitions (one place: `daemon::lifecycle`):
/// submitted → admitted → running ⇄ frozen → exited | killed | failed | lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Submitted,
    Admitted,
    Running,
    Frozen,
    Exited,
    Killed,
    Failed,
    Lost,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Submitted,
        JobState::Admitted,
        JobState::Running,
        JobState::Frozen,
        JobState::Exited,
        JobState::Killed,
        JobState::Failed,
        JobState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Submitted => "submitted",
            JobState::Admitted => "admitted",
            JobState::Running => "running",
            JobState::Frozen => "frozen",
            JobState::Exited => "exited",
            JobState::Killed => "killed",
            JobState::Failed => "failed",
            JobState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No further transition is possible.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Exited | JobState::Killed | JobState::Failed | JobState::Lost
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a job ended, in `agentd run`'s exit-status convention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The job's exit status; 128+N if killed by signal N; 125–127 as for `agentd run`.
    pub code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// One line: what happened ("exited with status 0", "killed by SIGKILL", ...).
    pub message: String,
}

/// What the job's cgroup accounts, now (running) or at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttled_usec: Option<u64>,
}

/// GET /v1/jobs/{id}, and the element of GET /v1/jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: String,
    pub state: JobState,
    pub command: Vec<String>,
    pub policy: String,
    pub policy_hash: String,
    pub agent: String,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// The lease the job is bound to; none for a durable job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    pub durable: bool,
    pub requester: Requester,
    pub submitted_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// The job's init in the host's pid namespace, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroup: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitInfo>,
    /// Why the job is in its state, where that is not obvious (failed, killed, lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
    /// Once ended: the same JSON report `agentd run --report` writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
    /// A review workspace's state: who decided what about the job's change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewInfo>,
    /// The published snapshot the job borrows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The tool calls the job recorded through its socket (provenance).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Held frozen by the runqueue: runnable, but waiting for one of the daemon's
    /// `--slots` (not frozen by its owner: `state` stays running).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waiting: bool,
    /// The regions the job was given: "NAME:ro" or "NAME:rw".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
}

/// One tool call a job recorded (POST /v1/self/tool-calls on its own socket).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    /// The tool, e.g. "grep", "web_search": letters, digits, '.', '_', '-', '/', ':'.
    pub name: String,
    /// A digest of its arguments (hex). Computed by the daemon (sha256 of `args`) when
    /// the job sends the arguments; else as the job gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_digest: Option<String>,
    /// The arguments' size in bytes, when the job sent them (set by the daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_bytes: Option<u64>,
    /// The arguments themselves, which may hold secrets (tokens, keys): accepted from
    /// the job, kept in the daemon's memory only, never serialized (so never stored,
    /// shown, logged or sent; export policy "never", see telemetry::classes).
    #[serde(default, skip_serializing)]
    pub args: Option<serde_json::Value>,
    /// How it ended, e.g. "ok", "error".
    pub status: String,
    /// Set by the daemon.
    #[serde(default)]
    pub time_ms: u64,
}

/// GET /v1/self on a job's socket: what the job may know of itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfInfo {
    pub id: String,
    pub agent: String,
    pub model: String,
    pub policy: String,
    pub tool_calls: usize,
}

pub use crate::workspace::WorkspaceMode;
pub use crate::workspace::diff::{Change, ChangeKind};

fn is_direct(m: &WorkspaceMode) -> bool {
    *m == WorkspaceMode::Direct
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReviewState {
    /// The job runs (or has not started); its change is not complete.
    Open,
    /// The job ended; its change waits for accept or reject.
    Pending,
    Accepted,
    Rejected,
    /// Accepted, then returned to the pre-image (`agentctl rollback`).
    #[serde(rename = "rolled-back")]
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewInfo {
    pub state: ReviewState,
    /// The source directory (the overlay's lower layer).
    pub source: String,
    /// Who accepted or rejected the change, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<Requester>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_ms: Option<u64>,
    /// Entries the accepted change wrote or removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<usize>,
    /// After accept: the pre-image, the snapshot to return to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// After accept: entries of the change that were not applied (git metadata).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// After `accept --commit`: the commit that records the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// After `accept --publish`: the snapshot the change was published as (the source
    /// never changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

pub use crate::workspace::snapshot::SnapshotMeta;

/// GET /v1/snapshots, /v1/snapshots/{id}, DELETE /v1/snapshots/{id}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    #[serde(flatten)]
    pub meta: SnapshotMeta,
    /// The directory a borrowing job sees it at (read-only).
    pub path: String,
    /// Jobs that borrow it and have not ended.
    pub holders: Vec<String>,
}

/// POST /v1/jobs/{id}/accept
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptRequest {
    /// Also commit the change (the workspace must be a git work tree), with an
    /// `Assisted-by:` trailer for the job's agent and model and a `Signed-off-by:` for
    /// the accepting user (from their git configuration).
    #[serde(default)]
    pub commit: bool,
    /// The commit message's subject and body (default: "agentd job ID: COMMAND").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Publish the source with the change as an immutable snapshot instead of applying
    /// it to the source.
    #[serde(default)]
    pub publish: bool,
}

/// GET /v1/jobs/{id}/diff
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffResponse {
    pub job: String,
    pub source: String,
    pub state: ReviewState,
    pub changes: Vec<Change>,
}

/// POST /v1/jobs/{id}/kill
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    /// Signal name ("TERM", "SIGINT") or number; default TERM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Time between the signal and killing the whole cgroup; default the policy's
    /// `lifecycle.kill_grace`. "0s" kills at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
}

/// POST /v1/leases
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Time to live, e.g. "30s"; renew before it passes.
    pub ttl: String,
}

/// POST /v1/leases/{id}/renew
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A new time to live; default the lease's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    Active,
    Released,
    Expired,
}

impl LeaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Active => "active",
            LeaseState::Released => "released",
            LeaseState::Expired => "expired",
        }
    }
}

/// A lease: scoped authority that the jobs started under it live within.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub id: String,
    pub owner_uid: u32,
    pub state: LeaseState,
    pub ttl_ms: u64,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// Jobs started under it that have not ended.
    #[serde(default)]
    pub jobs: Vec<String>,
}

/// POST /v1/regions: exactly one of `from_file`, `zero`, `clone`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionCreateRequest {
    pub name: String,
    /// An absolute path: the region serves this file's bytes (as they are when read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_file: Option<String>,
    /// A size ("1G", "4096"): a region of zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero: Option<String>,
    /// A parent region: a copy-on-write clone of its content as it is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<String>,
}

/// A failure a region's broker recorded (the access got SIGBUS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionFailure {
    pub time_ms: u64,
    pub job: String,
    pub offset: u64,
    pub reason: String,
}

/// A region as GET /v1/regions/NAME shows it: its record, open handles, counters and
/// its latest failures. With `?job=ID`, `stats` are that job's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionView {
    #[serde(flatten)]
    pub info: crate::region::RegionInfo,
    pub handles: u64,
    /// The open handles: job, generation, access, what the daemon holds for each.
    #[serde(default)]
    pub open: Vec<crate::region::broker::HandleInfo>,
    pub stats: crate::region::stats::StatsView,
    #[serde(default)]
    pub failures: Vec<RegionFailure>,
}

/// DELETE /v1/regions/NAME: the region as it was, and the store's space taken back
/// (chunks other regions still name stay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionDeleted {
    pub region: crate::region::RegionInfo,
    pub freed: crate::region::gc::Swept,
}

/// The typed lifecycle events of GET /v1/events (JSON lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    Submitted,
    Admitted,
    Started,
    Frozen,
    Thawed,
    Exited,
    Killed,
    Failed,
    Lost,
    Adopted,
    Detached,
    Denied,
    LeaseTaken,
    LeaseRenewed,
    LeaseReleased,
    LeaseExpired,
    /// A review workspace's change was applied to its source.
    Accepted,
    /// A review workspace's change was discarded.
    Rejected,
    /// An accepted change was undone (the source returned to its pre-image).
    RolledBack,
    /// The job's proxy let a connection through (`detail`: protocol, destination,
    /// address, rule).
    EgressAllowed,
    /// The job's proxy or resolver refused a destination (`detail`: why, and the rule).
    EgressDenied,
    /// The job's cgroup was held back by its CPU limit since the last look (`detail`:
    /// throttled time, and the limit).
    Throttled,
    /// The kernel's OOM killer killed a process of the job inside its memory limit.
    OomKill,
    /// Sent to a follower that fell behind: `detail` says how many events it missed.
    Lagged,
    /// The runqueue took the job's slot (froze it): `detail` says why and for whom.
    Preempted,
    /// The runqueue gave the job a slot (thawed it).
    Resumed,
    /// A deadline job used its runtime within a period and the kernel throttled it
    /// (cpu.max): `detail` counts the periods since the last look.
    DeadlineOverrun,
    /// A deadline job waited for a slot (`--slots`) through whole periods: each such
    /// period's deadline passed without its runtime (`detail` counts them).
    DeadlineMiss,
    /// A region access of the job failed with SIGBUS (`detail`: region, offset, why).
    RegionFailure,
    /// A region was created, published or revoked (`detail` says which and how).
    Region,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub time_ms: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    pub detail: String,
}

/// GET /v1/classes: the daemon's runtime objects by class (like /proc/slabinfo), and
/// what each job holds of the classes jobs own (only `?job=ID`'s if given).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassesReport {
    pub classes: Vec<crate::telemetry::classes::ClassStats>,
    pub jobs: Vec<crate::telemetry::classes::JobClassStats>,
}

/// Every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// A typed refusal, for a program to act on: `{"kind": "quota-exceeded", "class",
    /// "bound" ("objects" or "bytes"), "limit", "held", "asked", "rule"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<serde_json::Value>,
}
