//! agentd: run one agent job in a sandbox (`run`), serve many over a control API
//! (`serve`), or report what this host offers (`check`).

use agentd::job::{self, RunOptions};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "agentd", version, about = "Linux-native supervisor for AI agent jobs", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one job to completion in a sandbox, on the built-in default policy unless
    /// --policy names another.
    ///
    /// The job gets its own user, pid, mount, network, ipc, uts and cgroup namespaces and
    /// a cgroup with the policy's limits; it sees only the paths its policy grants, runs as
    /// an unprivileged host user with no capabilities, under Landlock and seccomp.
    ///
    /// Exit status: the job's own; 128+N if it was killed by signal N; 125 if agentd
    /// failed or refused to run it; 126 if the command cannot be executed; 127 if it
    /// is not found.
    #[command(
        after_help = "Examples:\n  agentd run -- sh -c 'id; ls /; touch /etc/x'\n  agentd run --workspace \"$PWD\" --policy ci-coding-agent --report job.json -- make test\n  agentd run --net proxy --allow-domain registry.npmjs.org --workspace \"$PWD\" -- npm ci"
    )]
    Run(Box<RunArgs>),
    /// Run the supervisor daemon: jobs are submitted over a Unix socket (see agentctl),
    /// recorded in SQLite with a hash-chained operation table, and survive a restart of
    /// the daemon (the next one adopts them).
    ///
    /// Root and members of --group may use the socket; every other caller is refused
    /// and the refusal recorded. SIGTERM stops the daemon and leaves jobs running.
    #[command(
        after_help = "Examples:\n  agentd serve\n  agentd serve --socket /tmp/a.sock --state-dir /tmp/agentd-state\n  agentctl --socket /tmp/a.sock run -- sh -c 'echo hi'"
    )]
    Serve(Box<ServeArgs>),
    /// Internal: a spawner process of `agentd serve` (its socket is stdin).
    #[command(name = "__spawner", hide = true)]
    Spawner,
    /// Report what this kernel and host offer: cgroup layout and usable controllers,
    /// Landlock ABI, seccomp, userfaultfd, SCHED_DEADLINE, EEVDF slices, namespaces,
    /// overlayfs, PSI.
    Check {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Check controllers below this cgroup instead of agentd's own (as for run).
        #[arg(long, env = "AGENTD_CGROUP_PARENT", value_name = "CGROUP")]
        cgroup_parent: Option<String>,
    },
    /// Inside a job: use a region the job was given (agentctl run --region NAME).
    #[command(subcommand)]
    Region(RegionCommand),
}

#[derive(Subcommand)]
enum RegionCommand {
    /// Write LEN bytes of region NAME from OFFSET to stdout (default: all of it), read
    /// lazily: only the pages these bytes are on are fetched. A byte the supervisor
    /// cannot serve ends the command with SIGBUS and the reason on stderr.
    #[command(after_help = "Examples (inside a job):\n  \
        agentd region cat index 0 4096 | xxd | head\n  \
        agentd region cat scratch > /tmp/copy\n\n\
        Exit status: 0; 125 if the region cannot be opened (not given, revoked, no\n\
        broker); killed by SIGBUS if an access fails.")]
    Cat {
        name: String,
        offset: Option<u64>,
        len: Option<u64>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// The control socket (HTTP/1.1 + JSON), mode 0660.
    #[arg(
        long,
        env = "AGENTD_SOCKET",
        default_value = "/run/agentd/agentd.sock",
        value_name = "PATH"
    )]
    socket: PathBuf,
    /// Durable state: the SQLite database (jobs, leases, operation table) and each
    /// job's logs and status.
    #[arg(
        long,
        env = "AGENTD_STATE_DIR",
        default_value = "/var/lib/agentd",
        value_name = "DIR"
    )]
    state_dir: PathBuf,
    /// Runtime files of running jobs (their root mount points).
    #[arg(
        long,
        env = "AGENTD_DAEMON_RUNTIME_DIR",
        default_value = "/run/agentd/daemon",
        value_name = "DIR"
    )]
    runtime_dir: PathBuf,
    /// Directory of operator policies.
    #[arg(long, env = "AGENTD_POLICY_DIR", default_value = agentd::spec::POLICY_DIR, value_name = "DIR")]
    policy_dir: PathBuf,
    /// Create job cgroups below this cgroup instead of next to the daemon's own.
    #[arg(long, env = "AGENTD_CGROUP_PARENT", value_name = "CGROUP")]
    cgroup_parent: Option<String>,
    /// Members of this group may use the socket (it is the socket's group when it exists).
    #[arg(
        long,
        env = "AGENTD_GROUP",
        default_value = "agentd",
        value_name = "GROUP"
    )]
    group: String,
    /// Connections served at once; more are closed at once.
    #[arg(
        long,
        env = "AGENTD_MAX_CONNECTIONS",
        default_value_t = 1024,
        value_name = "N"
    )]
    max_connections: usize,
    /// Spawner processes: small processes jobs are cloned from, so a job never copies
    /// the daemon's memory; this many jobs can be starting at once.
    #[arg(long, env = "AGENTD_SPAWNERS", default_value_t = 4, value_name = "N")]
    spawners: usize,
    /// Ended jobs kept in memory for `agentctl ps --all`; older ones stay in the store,
    /// where `inspect`, `wait`, `logs` and `audit` still find them.
    #[arg(
        long,
        env = "AGENTD_KEEP_ENDED",
        default_value_t = 10_000,
        value_name = "N"
    )]
    keep_ended: usize,
    /// CPUs the supervisor hands to jobs; the rest stays with the control plane and the
    /// host. Deadline jobs are admitted while their runtime/period sum stays within it.
    /// Default: 95% of the host's CPUs.
    #[arg(long, env = "AGENTD_CPU_BUDGET", value_name = "CPUS", value_parser = parse_cpu_budget)]
    cpu_budget: Option<f64>,
    /// Jobs that may run at once. The runqueue keeps the others waiting, frozen, and
    /// hands slots out by class (deadline, rt, fair by EEVDF, idle), rotating fair jobs
    /// each tick. Default: no limit (every admitted job runs; the kernel shares the CPU
    /// budget by the classes' weights).
    #[arg(long, env = "AGENTD_SLOTS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    slots: Option<u32>,
    /// How often the runqueue accounts the jobs' CPU time and decides (e.g. 500ms).
    #[arg(long, env = "AGENTD_SCHED_TICK", value_name = "DURATION", default_value = "500ms", value_parser = parse_tick)]
    sched_tick: std::time::Duration,
}

#[derive(Args)]
struct RunArgs {
    /// Policy name (looked up in --policy-dir, then built in) or path to a TOML file.
    #[arg(long, default_value = "default", value_name = "NAME|PATH")]
    policy: String,
    /// Directory of operator policies.
    #[arg(long, env = "AGENTD_POLICY_DIR", default_value = agentd::spec::POLICY_DIR, value_name = "DIR")]
    policy_dir: PathBuf,
    /// Directory the job may write; it appears at the same path and is the working
    /// directory. DIR:ro gives it read-only (a borrowed view).
    #[arg(long, value_name = "DIR[:ro]")]
    workspace: Option<PathBuf>,
    /// CPU limit in CPUs, fractions allowed (0.5 = half a CPU). Overrides the policy.
    #[arg(long, value_name = "CPUS", allow_negative_numbers = true)]
    cpu: Option<String>,
    /// Memory limit, e.g. 512M or 2G. Overrides the policy.
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Limit on processes and threads. Overrides the policy.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pids: Option<String>,
    /// Wall-clock limit, e.g. 30s, 10m, 1h; then SIGTERM and, after the policy's lifecycle.kill_grace (default 5s), SIGKILL.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Set KEY=VALUE in the job's environment, or pass KEY from agentd's. Repeatable.
    #[arg(long = "env", value_name = "KEY[=VALUE]")]
    env: Vec<String>,
    /// Agent name recorded in the report (overrides the policy's identity.agent).
    #[arg(long)]
    agent: Option<String>,
    /// Model recorded in the report (overrides the policy's identity.model).
    #[arg(long)]
    model: Option<String>,
    /// Write the job's JSON report here when it ends.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Run even though the kernel lacks FEATURE (landlock, cgroup-cpu, cgroup-memory,
    /// cgroup-pids); the report lists it. Repeatable.
    #[arg(long = "allow-degraded", value_name = "FEATURE")]
    allow_degraded: Vec<String>,
    /// Network: none (loopback only), proxy (only through agentd's proxy, to the
    /// policy's allowed domains), host (the host's network; trusted jobs only).
    /// Overrides the policy's network.mode.
    #[arg(long, value_name = "none|proxy|host")]
    net: Option<String>,
    /// Let the job reach a domain through the proxy: example.org (ports 80 and 443),
    /// *.example.org (names below it), example.org:8443, example.org:*. Repeatable;
    /// needs --net proxy (or a policy in proxy mode).
    #[arg(long = "allow-domain", value_name = "PATTERN[:PORT]")]
    allow_domain: Vec<String>,
    /// Let the proxy connect to private, loopback and link-local addresses (refused by
    /// default, after resolving, so a name cannot smuggle them in).
    #[arg(long = "allow-private")]
    allow_private: bool,
    #[command(flatten)]
    sched: agentd::spec::sched::SchedRequest,
    /// Where runtime files go (one directory per job, removed when it ends).
    #[arg(
        long,
        env = "AGENTD_RUNTIME_DIR",
        default_value = "/run/agentd",
        value_name = "DIR"
    )]
    runtime_dir: PathBuf,
    /// Create job cgroups below this cgroup (e.g. /agentd.slice) instead of agentd's own.
    #[arg(long, env = "AGENTD_CGROUP_PARENT", value_name = "CGROUP")]
    cgroup_parent: Option<String>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let informational = matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            let _ = e.print();
            // Usage errors are agentd refusing to run: 125, like every other refusal.
            std::process::exit(
                if informational && e.kind() != ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                {
                    0
                } else {
                    125
                },
            );
        }
    };
    let code = match cli.command {
        Command::Run(a) => job::run({
            let (workspace, workspace_mode) = match &a.workspace {
                Some(w) => {
                    let (dir, mode) = agentd::workspace::parse_workspace_arg(w);
                    (Some(dir), mode)
                }
                None => (None, Default::default()),
            };
            RunOptions {
                command: a.command.clone(),
                policy: a.policy,
                policy_dir: a.policy_dir,
                workspace,
                workspace_mode,
                cpu: a.cpu,
                memory: a.memory,
                pids: a.pids,
                timeout: a.timeout,
                env: a.env,
                agent: a.agent,
                model: a.model,
                report: a.report,
                allow_degraded: a.allow_degraded,
                runtime_dir: a.runtime_dir,
                cgroup_parent: a.cgroup_parent,
                policy_text: None,
                job_socket_dir: None,
                net: a.net,
                allow_domain: a.allow_domain,
                allow_private: a.allow_private,
                sched: a.sched,
            }
        }),
        Command::Serve(a) => agentd::daemon::serve(agentd::daemon::ServeOptions {
            socket: a.socket,
            state_dir: a.state_dir,
            runtime_dir: a.runtime_dir,
            policy_dir: a.policy_dir,
            cgroup_parent: a.cgroup_parent,
            group: a.group,
            max_connections: a.max_connections.max(1),
            spawners: a.spawners.clamp(1, 64),
            keep_ended: a.keep_ended,
            cpu_budget: a.cpu_budget,
            slots: a.slots.map(|n| n as usize),
            sched_tick: a.sched_tick,
        }),
        Command::Spawner => agentd::daemon::spawner::spawner_main(),
        Command::Region(RegionCommand::Cat { name, offset, len }) => {
            agentd::region::cat::cat(&name, offset.unwrap_or(0), len)
        }
        Command::Check {
            json,
            cgroup_parent,
        } => check(json, cgroup_parent.as_deref()),
    };
    std::process::exit(code);
}

fn check(json: bool, cgroup_parent: Option<&str>) -> i32 {
    let report = agentd::host::check_host(cgroup_parent);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        println!("kernel {}", report.kernel);
        for p in &report.probes {
            println!(
                "{:<20} {:<4} {}",
                p.feature,
                if p.available { "yes" } else { "no" },
                p.detail
            );
        }
    }
    0
}

fn parse_tick(s: &str) -> Result<std::time::Duration, String> {
    match agentd::spec::parse_duration(s) {
        Ok(d)
            if d >= std::time::Duration::from_millis(10)
                && d <= std::time::Duration::from_secs(60) =>
        {
            Ok(d)
        }
        Ok(_) => Err(format!("{s}: expected a tick between 10ms and 60s")),
        Err(e) => Err(format!("{s}: {e}")),
    }
}

fn parse_cpu_budget(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(c) if (0.01..=4096.0).contains(&c) => Ok(c),
        _ => Err(format!(
            "expected a number of CPUs like 3.5 (0.01 to 4096), got \"{s}\""
        )),
    }
}
