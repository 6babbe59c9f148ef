//! agentctl: the command-line client of `agentd serve`. It speaks the control API
//! (HTTP/1.1 + JSON over the daemon's Unix socket, see `agentd::api`) and prints tables
//! for people or, with --json, the daemon's JSON for programs.
//!
//! Exit status: 0 when the request succeeded; for `run` and `wait` the job's own exit
//! status (125 if it ended without one: failed or lost); 125 when agentctl itself failed
//! (cannot connect, the daemon refused, bad usage), with one line "agentctl: ..." on stderr.

mod commands;
mod output;
mod regions;
mod review;
mod run;

use std::io::Write;
use std::path::PathBuf;

use agentd::api::client::{Client, ClientError, DEFAULT_SOCKET};
use clap::{Parser, Subcommand};

use run::RunArgs;

/// agentctl's own failure: printed as "agentctl: MESSAGE", exit status 125.
#[derive(Debug)]
pub struct Fail(pub String);

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Fail {
        Fail(e.to_string())
    }
}

impl From<String> for Fail {
    fn from(s: String) -> Fail {
        Fail(s)
    }
}

/// The exit status of agentctl's own failures (as agentd's refusals).
pub const EXIT_FAILURE: i32 = 125;

const EXAMPLES: &str = "\
Examples:
  agentctl run -- sh -c 'echo hello'             run attached, exit with the job's status
  agentctl run --workspace . --policy ci-coding-agent -- make test
  agentctl run --detach -- ./long-task           durable job, prints its id
  agentctl ps --all
  agentctl logs -f JOB
  agentctl kill --signal INT --grace 5s JOB
  agentctl events -f --kind started,exited
  agentctl audit --verify
  LEASE=$(agentctl lease take --ttl 5m); agentctl run --lease \"$LEASE\" --detach -- ./task
  agentctl run --review --workspace . -- ./agent   the change waits for review:
  agentctl diff JOB; agentctl accept --commit JOB  (or: agentctl reject JOB)
  agentctl run --net proxy --allow-domain pypi.org --allow-domain files.pythonhosted.org -- pip download x
  agentctl region create index --from-file /srv/index.bin; agentctl run --region index -- ./agent

Environment:
  AGENTD_SOCKET   the daemon's socket (as --socket)";

#[derive(Parser)]
#[command(
    name = "agentctl",
    version,
    about = "Control agentd: submit, watch and steer agent jobs",
    long_about = "Control agentd: submit, watch and steer agent jobs.\n\n\
        agentctl talks to `agentd serve` over its Unix socket. Exit status: 0 on success; \
        for `run` and `wait` the job's own status (125 if it failed to start or was lost); \
        125 when agentctl fails (cannot connect, the daemon refused, bad usage).",
    after_help = EXAMPLES
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "AGENTD_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
    /// Machine output: the daemon's JSON (one document per command, JSON lines for
    /// streams). `run --json` prints the final job as one line after its output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a job and, unless --detach, stay attached: stream its stdout and stderr,
    /// forward SIGINT/SIGTERM/SIGHUP to it, and exit with its status.
    ///
    /// Attached without --lease, agentctl takes a 30 s lease, renews it every 10 s and
    /// releases it at the end: if agentctl dies, the job is cancelled when the lease
    /// expires. With --lease the job runs under that lease, which the caller renews and
    /// releases. --detach starts a durable job (or one under --lease) and prints its id.
    #[command(after_help = "Examples:\n  \
        agentctl run -- sh -c 'id; ls /'\n  \
        agentctl run --workspace \"$PWD\" --policy ci-coding-agent --memory 2G -- make test\n  \
        agentctl run --policy-file ./my.toml --env API_BASE=http://10.0.0.1 --env HOME -- ./agent\n  \
        agentctl run --detach --timeout 2h -- ./nightly
  \
        agentctl run --net proxy --allow-domain '*.github.com' -- git clone https://github.com/o/r")]
    Run(Box<RunArgs>),
    /// List jobs: ID STATE AGE POLICY AGENT LEASE COMMAND (jobs that have not ended, or
    /// all with --all).
    Ps {
        /// Also list jobs that have ended.
        #[arg(short, long)]
        all: bool,
    },
    /// Show everything the daemon knows about a job (--json adds its report).
    Inspect { job: String },
    /// Print a job's output (its stdout, or --stderr); -f follows it until the job ends.
    #[command(after_help = "Examples:\n  agentctl logs JOB\n  agentctl logs -f --stderr JOB")]
    Logs {
        job: String,
        /// Keep printing new output until the job has ended.
        #[arg(short, long)]
        follow: bool,
        /// Print the job's stderr instead of its stdout (to agentctl's stdout).
        #[arg(long)]
        stderr: bool,
    },
    /// Signal a job; after the grace time the daemon kills its whole cgroup.
    Kill {
        job: String,
        /// Signal name or number (TERM, INT, KILL, HUP, 9, ...); default TERM.
        #[arg(short, long, value_parser = output::parse_signal, value_name = "SIG")]
        signal: Option<String>,
        /// Time between the signal and killing the cgroup, e.g. 5s; "0s" kills at once.
        /// Default: the policy's lifecycle.kill_grace.
        #[arg(long, value_parser = check_duration, value_name = "DURATION")]
        grace: Option<String>,
    },
    /// Freeze a job: all its processes stop (cgroup freezer) until `thaw`.
    Freeze { job: String },
    /// Thaw a frozen job.
    Thaw { job: String },
    /// Wait until a job ends and exit with its status (125 if it failed or was lost).
    Wait { job: String },
    /// Make a job durable: it no longer depends on its lease and outlives its client.
    Detach { job: String },
    /// Show the change a review job (run --review) made: files added, removed,
    /// modified and renamed, with a unified diff for text.
    Diff {
        job: String,
        /// Only the list of changed paths, no content.
        #[arg(long)]
        stat: bool,
    },
    /// Apply a review job's change to its workspace directory. Refused if the directory
    /// changed since the job started; what it replaces is kept as the way back. Changes
    /// to git metadata (.git) are never applied.
    Accept {
        job: String,
        /// Also commit the change in the workspace's git repository: authored and
        /// signed off by you (your git user.name and user.email), with an
        /// "Assisted-by: AGENT:MODEL" trailer for the job.
        #[arg(long)]
        commit: bool,
        /// The commit message (default "agentd job ID: COMMAND").
        #[arg(short, long, requires = "commit")]
        message: Option<String>,
        /// Publish the workspace with the change as an immutable snapshot instead of
        /// applying it (the directory does not change); prints the snapshot's id, which
        /// `run --snapshot ID` borrows.
        #[arg(long, conflicts_with = "commit")]
        publish: bool,
    },
    /// The daemon's runtime objects by class, like /proc/slabinfo: NAME LIVE BYTES
    /// HIGH-WATER ALLOCS/S, then what each job holds (--job: one job). --fields prints
    /// each class's export policy instead: which fields an agent may see of its own
    /// objects, which only the operator, which never leave the daemon.
    #[command(
        after_help = "Examples:\n  agentctl classes\n  agentctl classes --job 0f8f76bd9dcb\n  agentctl classes --fields"
    )]
    Classes {
        /// Only this job's holdings.
        #[arg(long)]
        job: Option<String>,
        /// Print the export policy of each class's fields.
        #[arg(long)]
        fields: bool,
    },
    /// Scheduling: the CPU budget, the deadline bandwidth admitted within it, and each
    /// running job's class with its parameters (JOB CLASS PARAMETERS).
    Sched,
    /// Regions: byte ranges jobs map as memory, served lazily by the daemon
    /// (userfaultfd): create, publish, revoke, delete, inspect, list.
    #[command(subcommand)]
    Region(RegionCommand),
    /// Published snapshots: list, show, remove.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Discard a review job's change; the workspace directory never changed.
    Reject { job: String },
    /// Undo an accepted change: return the workspace directory to what accept kept
    /// (refused if the directory changed since; a commit stays in git history).
    Rollback { job: String },
    /// Print lifecycle events, one line each: TIME SEQ KIND JOB DETAIL.
    #[command(
        after_help = "Kinds: submitted admitted started frozen thawed exited killed failed lost adopted\n\
        detached denied lease-taken lease-renewed lease-released lease-expired accepted rejected\n\
        rolled-back egress-allowed egress-denied throttled oom-kill lagged\n\n\
        Examples:\n  agentctl events -f --job JOB\n  agentctl events --kind exited,failed --since 100\n  \
        agentctl events -f --filter egress-denied,JOB"
    )]
    Events {
        /// Keep printing events as they happen (never ends by itself).
        #[arg(short, long)]
        follow: bool,
        /// Only this job's events.
        #[arg(long, value_name = "ID")]
        job: Option<String>,
        /// Only these kinds, comma-separated.
        #[arg(long, value_name = "KIND,...")]
        kind: Option<String>,
        /// Only events after this sequence number.
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
        /// Kinds and a job in one list: `--filter egress-denied,started,0123456789ab`
        /// (each item a kind, or a job id); adds to --kind and --job.
        #[arg(long, value_name = "KIND,JOB,...")]
        filter: Option<String>,
    },
    /// Print the operation table (SEQ TIME UID ACTION TARGET AUTHORITY), or check its
    /// hash chain with --verify (exit 1 if it is broken).
    Audit {
        /// Check the hash chain: "audit: N rows, chain intact, head HASH" (exit 0) or
        /// "audit: row N: PROBLEM" (exit 1).
        #[arg(long, conflicts_with = "since")]
        verify: bool,
        /// Only rows after this sequence number.
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
    },
    /// Take, renew, release and list leases: scoped authority that the jobs started under
    /// it live within.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Print the daemon's Prometheus metrics.
    Metrics,
    /// Check that the daemon answers: prints its version and pid.
    Health,
}

#[derive(Subcommand)]
enum RegionCommand {
    /// Create a region from exactly one source: a file's bytes (read when a job
    /// touches them), zeros, or a copy-on-write clone of another region.
    #[command(after_help = "Examples:\n  \
        agentctl region create index --from-file /srv/index.bin\n  \
        agentctl region create scratch --zero 1G\n  \
        agentctl region create index-try --clone index\n  \
        agentctl run --region index --region index-try:rw -- ./agent")]
    Create {
        name: String,
        /// Serve this file (absolute path; read as it is when a page is first touched:
        /// `publish` freezes it).
        #[arg(long, value_name = "FILE", group = "source")]
        from_file: Option<PathBuf>,
        /// A region of SIZE zero bytes (e.g. 1G).
        #[arg(long, value_name = "SIZE", group = "source")]
        zero: Option<String>,
        /// A clone of PARENT's content as it is now; its writes never reach PARENT.
        #[arg(long, value_name = "PARENT", group = "source")]
        clone: Option<String>,
    },
    /// Freeze the region's content into the chunk store (shared by hash); its
    /// generation moves on and handles of the old one fail at their next fault.
    Publish { name: String },
    /// Refuse new opens and fail open handles at their next fault (SIGBUS).
    Revoke { name: String },
    /// Remove the region: its record, its own pages, and the chunks no other region
    /// names. Refused while handles are open (revoke first, then delete once they
    /// have closed).
    Delete { name: String },
    /// One region: its record, open handles, fault counters by outcome, bytes,
    /// read-ahead, fault latency, latest failures.
    Inspect {
        name: String,
        /// That job's counters instead of the region's.
        #[arg(long, value_name = "JOB")]
        job: Option<String>,
    },
    /// List regions: NAME SIZE GEN STATE BASE HANDLES FAULTS FETCHED.
    Ls {
        /// Only the regions job JOB used, with its counters.
        #[arg(long, value_name = "JOB")]
        job: Option<String>,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// List snapshots: ID FILES BYTES HOLDERS SOURCE.
    Ls,
    /// Everything about one snapshot.
    Show { id: String },
    /// Remove a snapshot (root). If jobs borrow it, it takes no new borrowers and goes
    /// when the last one ends.
    Rm { id: String },
}

#[derive(Subcommand)]
enum LeaseCommand {
    /// Take a lease and print its id (--json: the lease). Renew it before the TTL passes.
    Take {
        /// Time to live, e.g. 30s, 5m.
        #[arg(long, value_parser = check_duration, value_name = "DURATION")]
        ttl: String,
    },
    /// Renew a lease: it expires TTL from now (default its own TTL).
    Renew {
        id: String,
        /// A new time to live.
        #[arg(long, value_parser = check_duration, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Release a lease: the jobs still running under it are cancelled.
    Release { id: String },
    /// List leases: ID STATE EXPIRES-IN JOBS.
    Ls,
}

/// Checks a duration flag with the daemon's own parser and keeps the text as given.
fn check_duration(text: &str) -> Result<String, String> {
    agentd::spec::parse_duration(text).map(|_| text.to_string())
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let _ = e.print();
            let informational =
                matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
            // Usage errors are agentctl failing: 125, like its other failures.
            std::process::exit(if informational { 0 } else { EXIT_FAILURE });
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentctl: cannot start the async runtime: {e}");
            std::process::exit(EXIT_FAILURE);
        }
    };
    let client = Client::new(cli.socket);
    let code = match rt.block_on(dispatch(&client, cli.command, cli.json)) {
        Ok(code) => code,
        Err(Fail(message)) => {
            let _ = std::io::stdout().flush();
            eprintln!("agentctl: {message}");
            EXIT_FAILURE
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

async fn dispatch(client: &Client, command: Command, json: bool) -> Result<i32, Fail> {
    use commands as c;
    match command {
        Command::Run(args) => run::run(client, *args, json).await,
        Command::Ps { all } => c::ps(client, all, json).await,
        Command::Sched => c::sched(client, json).await,
        Command::Classes { job, fields } => c::classes(client, job.as_deref(), fields, json).await,
        Command::Inspect { job } => c::inspect(client, &job, json).await,
        Command::Logs {
            job,
            follow,
            stderr,
        } => c::logs(client, &job, follow, stderr).await,
        Command::Kill { job, signal, grace } => c::kill(client, &job, signal, grace, json).await,
        Command::Freeze { job } => c::job_action(client, &job, "freeze", json).await,
        Command::Thaw { job } => c::job_action(client, &job, "thaw", json).await,
        Command::Detach { job } => c::job_action(client, &job, "detach", json).await,
        Command::Diff { job, stat } => review::diff(client, &job, stat, json).await,
        Command::Accept {
            job,
            commit,
            message,
            publish,
        } => review::accept(client, &job, commit, message, publish, json).await,
        Command::Snapshot(s) => match s {
            SnapshotCommand::Ls => review::snapshot_ls(client, json).await,
            SnapshotCommand::Show { id } => review::snapshot_show(client, &id, json).await,
            SnapshotCommand::Rm { id } => review::snapshot_rm(client, &id, json).await,
        },
        Command::Region(r) => match r {
            RegionCommand::Create {
                name,
                from_file,
                zero,
                clone,
            } => regions::create(client, name, from_file, zero, clone, json).await,
            RegionCommand::Publish { name } => {
                regions::change(client, &name, "publish", json).await
            }
            RegionCommand::Revoke { name } => regions::change(client, &name, "revoke", json).await,
            RegionCommand::Delete { name } => regions::delete(client, &name, json).await,
            RegionCommand::Inspect { name, job } => {
                regions::inspect(client, &name, job.as_deref(), json).await
            }
            RegionCommand::Ls { job } => regions::ls(client, job.as_deref(), json).await,
        },
        Command::Reject { job } => review::undo(client, &job, "reject", json).await,
        Command::Rollback { job } => review::undo(client, &job, "rollback", json).await,
        Command::Wait { job } => c::wait(client, &job, json).await,
        Command::Events {
            follow,
            job,
            kind,
            since,
            filter,
        } => {
            let (job, kind) = c::merge_event_filter(job, kind, filter.as_deref())?;
            c::events(client, follow, job, kind, since, json).await
        }
        Command::Audit { verify, since } => c::audit(client, verify, since, json).await,
        Command::Lease(l) => match l {
            LeaseCommand::Take { ttl } => c::lease_take(client, ttl, json).await,
            LeaseCommand::Renew { id, ttl } => c::lease_renew(client, &id, ttl, json).await,
            LeaseCommand::Release { id } => c::lease_release(client, &id, json).await,
            LeaseCommand::Ls => c::lease_ls(client, json).await,
        },
        Command::Metrics => c::metrics(client).await,
        Command::Health => c::health(client, json).await,
    }
}

/// Writes `text` to stdout. A closed stdout (`agentctl events -f | head`) ends agentctl
/// quietly with status 0; other write errors are failures.
pub fn emit(text: &str) -> Result<(), Fail> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Fail(format!("cannot write to stdout: {e}"))),
    }
}

/// Prints `value` as one line of JSON.
pub fn emit_json<T: serde::Serialize>(value: &T) -> Result<(), Fail> {
    let text =
        serde_json::to_string(value).map_err(|e| Fail(format!("cannot encode JSON: {e}")))?;
    emit(&format!("{text}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_after_its_flags() {
        let cli = Cli::try_parse_from([
            "agentctl", "--json", "run", "--env", "A=1", "--detach", "--", "sh", "-c", "echo hi",
        ])
        .unwrap();
        assert!(cli.json);
        match cli.command {
            Command::Run(a) => {
                assert!(a.detach);
                assert_eq!(a.env, ["A=1"]);
                assert_eq!(a.command, ["sh", "-c", "echo hi"]);
            }
            _ => panic!("not run"),
        }
        // Flags of the job's command are not agentctl's, even without "--".
        let cli = Cli::try_parse_from(["agentctl", "run", "ls", "-l", "--json"]).unwrap();
        match cli.command {
            Command::Run(a) => assert_eq!(a.command, ["ls", "-l", "--json"]),
            _ => panic!("not run"),
        }
        assert!(!cli.json);
    }

    #[test]
    fn flags_are_checked() {
        assert!(Cli::try_parse_from(["agentctl", "kill", "--signal", "FOO", "j"]).is_err());
        assert!(Cli::try_parse_from(["agentctl", "kill", "--grace", "soon", "j"]).is_err());
        assert!(Cli::try_parse_from(["agentctl", "lease", "take", "--ttl", "5y"]).is_err());
        assert!(Cli::try_parse_from(["agentctl", "lease", "take"]).is_err());
        assert!(
            Cli::try_parse_from([
                "agentctl",
                "run",
                "--policy",
                "a",
                "--policy-file",
                "b",
                "--",
                "x"
            ])
            .is_err()
        );
        match Cli::try_parse_from(["agentctl", "kill", "-s", "sigint", "j"])
            .unwrap()
            .command
        {
            Command::Kill { signal, .. } => assert_eq!(signal.as_deref(), Some("INT")),
            _ => panic!("not kill"),
        }
    }
}
