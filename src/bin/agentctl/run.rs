//! `agentctl run`: submit a job and, unless detached, stay with it until it ends:
//! stream its output, keep its lease alive, forward signals, exit with its status.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentd::api::client::{Client, ClientError, encode, with_query};
use agentd::api::types::{
    ExitInfo, JobInfo, JobState, KillRequest, LeaseInfo, LeaseRequest, RenewRequest, SubmitRequest,
};
use clap::Args;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{EXIT_FAILURE, Fail, emit, emit_json};

/// The TTL of the lease an attached `run` takes, and how often it renews it.
const LEASE_TTL: &str = "30s";
const RENEW_EVERY: Duration = Duration::from_secs(10);

#[derive(Args)]
pub struct RunArgs {
    /// Policy name (the daemon's policy directory, then built in); default "default".
    #[arg(long, value_name = "NAME", conflicts_with = "policy_file")]
    pub policy: Option<String>,
    /// A policy file on this machine, sent to the daemon as an inline policy.
    #[arg(long, value_name = "PATH")]
    pub policy_file: Option<PathBuf>,
    /// Directory the job may write; its working directory (made absolute here).
    /// DIR:ro gives it read-only (a borrowed view).
    #[arg(long, value_name = "DIR[:ro]")]
    pub workspace: Option<PathBuf>,
    /// Give the job a unique overlay of --workspace (or --snapshot) instead of the
    /// directory: the directory does not change while the job runs, and its change waits
    /// for `agentctl diff`, `accept` or `reject`.
    #[arg(long)]
    pub review: bool,
    /// Borrow a published snapshot (its id, from `accept --publish` or `snapshot ls`)
    /// as the job's read-only workspace.
    /// With --review: a unique handle on the snapshot instead (accept --publish then
    /// makes a new snapshot of the change).
    #[arg(long, value_name = "ID", conflicts_with = "workspace")]
    pub snapshot: Option<String>,
    /// Give the job region NAME (read-only; NAME:rw to let it write): it opens it at
    /// /run/agentd/regions.sock (libagentd_region, or `agentd region cat`). The policy's
    /// [regions] allow must grant it. Repeatable.
    #[arg(long = "region", value_name = "NAME[:rw]")]
    pub regions: Vec<String>,
    /// Set KEY=VALUE in the job's environment, or pass KEY with agentctl's own value.
    /// Repeatable.
    #[arg(long = "env", value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// CPU limit in CPUs, fractions allowed (0.5 = half a CPU). Overrides the policy.
    #[arg(long, value_name = "CPUS", allow_negative_numbers = true)]
    pub cpu: Option<String>,
    /// Memory limit, e.g. 512M or 2G. Overrides the policy.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Limit on processes and threads. Overrides the policy.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub pids: Option<String>,
    /// Wall-clock limit, e.g. 30s, 10m, 1h. Overrides the policy.
    #[arg(long, value_parser = crate::check_duration, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Agent name recorded for the job (overrides the policy's identity.agent).
    #[arg(long)]
    pub agent: Option<String>,
    /// Model recorded for the job (overrides the policy's identity.model).
    #[arg(long)]
    pub model: Option<String>,
    /// Run even though the kernel lacks FEATURE (landlock, cgroup-cpu, cgroup-memory,
    /// cgroup-pids). Repeatable.
    #[arg(long = "allow-degraded", value_name = "FEATURE")]
    pub allow_degraded: Vec<String>,
    /// Network: none (loopback only), proxy (only through agentd's proxy, to the
    /// policy's allowed domains), host (the host's network; trusted jobs only).
    /// Overrides the policy's network.mode (only root may widen it).
    #[arg(long, value_name = "none|proxy|host")]
    pub net: Option<String>,
    /// Let the job reach a domain through the proxy: example.org (ports 80 and 443),
    /// *.example.org (names below it), example.org:8443, example.org:*. Repeatable;
    /// needs --net proxy (or a policy in proxy mode).
    #[arg(long = "allow-domain", value_name = "PATTERN[:PORT]")]
    pub allow_domain: Vec<String>,
    /// Let the proxy connect to private, loopback and link-local addresses (refused by
    /// default, after resolving, so a name cannot smuggle them in).
    #[arg(long = "allow-private")]
    pub allow_private: bool,
    #[command(flatten)]
    pub sched: agentd::spec::sched::SchedRequest,
    /// Run under this lease (yours: you renew and release it); the job is cancelled when
    /// the lease ends.
    #[arg(long, value_name = "ID")]
    pub lease: Option<String>,
    /// Print the job id and exit at once. Without --lease the job is durable (its policy
    /// must allow that).
    #[arg(long)]
    pub detach: bool,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Runs `agentctl run`; returns agentctl's exit status.
pub async fn run(client: &Client, args: RunArgs, json: bool) -> Result<i32, Fail> {
    let mut req = submit_request(&args, |k| std::env::var(k).ok())?;
    if args.detach {
        match &args.lease {
            Some(lease) => req.lease = Some(lease.clone()),
            None => req.durable = true,
        }
        let job: JobInfo = client.post("/v1/jobs", &req).await?;
        if json {
            emit_json(&job)?;
        } else {
            emit(&format!("{}\n", job.id))?;
        }
        return Ok(0);
    }

    // Catch the signals before anything exists: one that arrives while the job is being
    // submitted is forwarded as soon as it runs.
    let mut signals = Signals::new().map_err(|e| Fail(format!("cannot catch signals: {e}")))?;
    let owned_lease = match &args.lease {
        Some(lease) => {
            req.lease = Some(lease.clone());
            None
        }
        None => {
            let lease: LeaseInfo = client
                .post(
                    "/v1/leases",
                    &LeaseRequest {
                        ttl: LEASE_TTL.into(),
                    },
                )
                .await?;
            req.lease = Some(lease.id.clone());
            Some(lease.id)
        }
    };
    let renewer = owned_lease
        .clone()
        .map(|id| tokio::spawn(renew_forever(client.clone(), id)));

    let result = attach(client, &req, &mut signals).await;

    if let Some(task) = renewer {
        task.abort();
    }
    if let Some(id) = owned_lease {
        let path = format!("/v1/leases/{}/release", encode(&id));
        if let Err(e) = client.post_empty::<LeaseInfo>(&path).await {
            // It expires on its own within LEASE_TTL; say so, but the job's status stands.
            eprintln!("agentctl: cannot release lease {id} (it expires by itself): {e}");
        }
    }

    let job = result?;
    if json {
        emit_json(&job)?;
    }
    if let Some(line) = end_problem(&job.id, job.state, job.reason.as_deref()) {
        eprintln!("agentctl: {line}");
    }
    Ok(exit_status(job.exit.as_ref()))
}

/// The SubmitRequest for `args` (without lease or durable: the caller decides those).
/// `getenv` resolves `--env KEY` without a value.
fn submit_request(
    args: &RunArgs,
    getenv: impl Fn(&str) -> Option<String>,
) -> Result<SubmitRequest, Fail> {
    let policy_toml = match &args.policy_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| Fail(format!("cannot read policy file {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let (workspace_arg, mut workspace_mode) = match &args.workspace {
        Some(w) => {
            let (dir, mode) = agentd::workspace::parse_workspace_arg(w);
            (Some(dir), mode)
        }
        None => (None, Default::default()),
    };
    if args.review {
        if workspace_arg.is_none() && args.snapshot.is_none() {
            return Err(Fail(
                "--review needs --workspace DIR or --snapshot ID: the handle's source".into(),
            ));
        }
        if workspace_mode == agentd::workspace::WorkspaceMode::Readonly {
            return Err(Fail(
                "--review gives the job a writable overlay; it does not go with --workspace DIR:ro"
                    .into(),
            ));
        }
        workspace_mode = agentd::workspace::WorkspaceMode::Review;
    }
    let workspace = match &workspace_arg {
        Some(dir) => {
            let abs = std::path::absolute(dir)
                .map_err(|e| Fail(format!("workspace {}: {e}", dir.display())))?;
            Some(
                abs.into_os_string()
                    .into_string()
                    .map_err(|p| Fail(format!("workspace {}: not UTF-8", p.display())))?,
            )
        }
        None => None,
    };
    let env = args
        .env
        .iter()
        .map(|e| {
            if e.contains('=') {
                Ok(e.clone())
            } else {
                getenv(e).map(|v| format!("{e}={v}")).ok_or_else(|| {
                    Fail(format!(
                        "--env {e}: {e} is not set in agentctl's environment (use {e}=VALUE)"
                    ))
                })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SubmitRequest {
        command: args.command.clone(),
        policy: args.policy.clone(),
        policy_toml,
        workspace,
        workspace_mode,
        snapshot: args.snapshot.clone(),
        env,
        cpu: args.cpu.clone(),
        memory: args.memory.clone(),
        pids: args.pids.clone(),
        timeout: args.timeout.clone(),
        agent: args.agent.clone(),
        model: args.model.clone(),
        lease: None,
        durable: false,
        allow_degraded: args.allow_degraded.clone(),
        regions: args.regions.clone(),
        net: args.net.clone(),
        allow_domain: args.allow_domain.clone(),
        allow_private: args.allow_private,
        sched: args.sched.clone(),
    })
}

/// Submits the job and stays with it until it has ended: its output streams to ours,
/// signals we get are forwarded to it. Returns the job as it ended.
async fn attach(
    client: &Client,
    req: &SubmitRequest,
    signals: &mut Signals,
) -> Result<JobInfo, Fail> {
    let job: JobInfo = client.post("/v1/jobs", req).await?;
    let id = job.id.clone();
    let out = tokio::spawn(pump(client.clone(), id.clone(), false));
    let err = tokio::spawn(pump(client.clone(), id.clone(), true));
    let finish = async {
        for (task, name) in [(out, "stdout"), (err, "stderr")] {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("agentctl: job {id}: cannot stream its {name}: {e}"),
                Err(e) => eprintln!("agentctl: job {id}: streaming its {name} failed: {e}"),
            }
        }
        wait_until_ended(client, &id).await
    };
    tokio::pin!(finish);
    loop {
        tokio::select! {
            ended = &mut finish => return Ok(ended?),
            sig = signals.recv() => {
                let path = format!("/v1/jobs/{}/kill", encode(&id));
                let body = KillRequest { signal: Some(sig.into()), grace: None };
                if let Err(e) = client.post::<_, JobInfo>(&path, &body).await {
                    eprintln!("agentctl: cannot send SIG{sig} to job {id}: {e}");
                }
            }
        }
    }
}

/// How long an attached client keeps trying to reach a daemon that went away (a
/// restart): as long as its lease lives, and a little more.
const RECONNECT_FOR: Duration = Duration::from_secs(40);

/// Whether `e` means the daemon is (for now) out of reach, rather than that it refused.
fn unreachable(e: &ClientError) -> bool {
    matches!(e, ClientError::Connect { .. } | ClientError::Io(_))
}

/// Retries `op` while the daemon is out of reach, for up to `RECONNECT_FOR`; says so once.
async fn reconnecting<T, F, Fut>(what: &str, mut op: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut since: Option<Instant> = None;
    loop {
        match op().await {
            Err(e) if unreachable(&e) => {
                if since.is_none() {
                    eprintln!("agentctl: lost agentd ({e}); reconnecting to follow {what}");
                }
                if since.get_or_insert_with(Instant::now).elapsed() > RECONNECT_FOR {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

/// Copies one of the job's streams (stdout, or stderr if `stderr`) to ours until the
/// daemon ends it (the job has ended and all its output was sent). Once our side is
/// closed the rest is read and dropped. If the daemon goes away (a restart), it
/// reconnects and goes on from the bytes it already has: nothing twice, nothing lost.
async fn pump(client: Client, id: String, stderr: bool) -> Result<(), ClientError> {
    let which = if stderr { "stderr" } else { "stdout" };
    let mut received: u64 = 0;
    let mut open = true;
    let mut lost_at: Option<Instant> = None;
    loop {
        let offset = received.to_string();
        let path = with_query(
            &format!("/v1/jobs/{}/logs", encode(&id)),
            &[
                ("stream", Some(which)),
                ("follow", Some("true")),
                ("offset", Some(offset.as_str())),
            ],
        );
        let result: Result<(), ClientError> = async {
            let mut body = client.stream(&path).await?;
            while let Some(chunk) = body.next_chunk().await? {
                lost_at = None;
                received += chunk.len() as u64;
                if open {
                    // Blocking writes go to tokio's blocking pool, so that a slow reader
                    // of one stream holds up neither the other stream nor signal
                    // forwarding.
                    open = tokio::task::spawn_blocking(move || write_all(stderr, &chunk))
                        .await
                        .is_ok_and(|r| r.is_ok());
                }
            }
            Ok(())
        }
        .await;
        match result {
            Err(e) if unreachable(&e) => {
                if lost_at.is_none() {
                    eprintln!(
                        "agentctl: lost agentd ({e}); reconnecting to follow job {id}'s {which}"
                    );
                }
                if lost_at.get_or_insert_with(Instant::now).elapsed() > RECONNECT_FOR {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

/// Writes `bytes` to our stderr or stdout and flushes.
fn write_all(stderr: bool, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if stderr {
        let mut err = std::io::stderr().lock();
        err.write_all(bytes).and_then(|()| err.flush())
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes).and_then(|()| out.flush())
    }
}

/// Asks the daemon to wait for the job until it reports a terminal state.
pub async fn wait_until_ended(client: &Client, id: &str) -> Result<JobInfo, ClientError> {
    let path = format!("/v1/jobs/{}/wait?timeout=30s", encode(id));
    loop {
        let asked = Instant::now();
        let job: JobInfo =
            reconnecting(&format!("job {id}"), || client.get::<JobInfo>(&path)).await?;
        if job.state.is_terminal() {
            return Ok(job);
        }
        // A daemon that answers at once must not make us spin.
        if asked.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Keeps the lease alive while attached; says once if renewing fails (and keeps trying).
async fn renew_forever(client: Client, id: String) {
    let path = format!("/v1/leases/{}/renew", encode(&id));
    let mut complained = false;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + RENEW_EVERY, RENEW_EVERY);
    loop {
        tick.tick().await;
        if let Err(e) = client
            .post::<_, LeaseInfo>(&path, &RenewRequest::default())
            .await
            && !complained
        {
            eprintln!(
                "agentctl: cannot renew lease {id}: {e} (the job is cancelled when it expires)"
            );
            complained = true;
        }
    }
}

/// agentctl's exit status for an ended job: its own, or 125 if it has none (it failed
/// to start or was lost).
pub fn exit_status(exit: Option<&ExitInfo>) -> i32 {
    exit.map_or(EXIT_FAILURE, |e| e.code)
}

/// One line for stderr when the job did not simply exit: failed, lost, or killed with a
/// reason.
pub fn end_problem(id: &str, state: JobState, reason: Option<&str>) -> Option<String> {
    match (state, reason) {
        (JobState::Exited, _) => None,
        (_, Some(reason)) => Some(format!("job {id} {state}: {reason}")),
        (JobState::Killed, None) => None,
        (state, None) => Some(format!("job {id} {state}")),
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught while attached.
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal, by the name the API takes.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "INT",
            _ = self.term.recv() => "TERM",
            _ = self.hup.recv() => "HUP",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cli;
    use clap::Parser;

    fn args(argv: &[&str]) -> RunArgs {
        let mut full = vec!["agentctl", "run"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).unwrap().command {
            crate::Command::Run(a) => *a,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn builds_the_submit_request() {
        let a = args(&[
            "--env",
            "A=1",
            "--env",
            "HOME",
            "--workspace",
            "ws",
            "--memory",
            "1G",
            "--",
            "true",
        ]);
        let req = submit_request(&a, |k| (k == "HOME").then(|| "/root".to_string())).unwrap();
        assert_eq!(req.command, ["true"]);
        assert_eq!(req.env, ["A=1", "HOME=/root"]);
        assert_eq!(req.memory.as_deref(), Some("1G"));
        let ws = req.workspace.unwrap();
        assert!(ws.starts_with('/') && ws.ends_with("/ws"), "{ws}");
        assert!(!req.durable && req.lease.is_none());

        let a = args(&["--env", "NOPE", "--", "true"]);
        let err = submit_request(&a, |_| None).unwrap_err();
        assert!(err.0.contains("NOPE is not set"), "{}", err.0);
    }

    #[test]
    fn exit_statuses() {
        let exit = |code| ExitInfo {
            code,
            signal: None,
            message: String::new(),
        };
        assert_eq!(exit_status(Some(&exit(3))), 3);
        assert_eq!(exit_status(Some(&exit(143))), 143);
        assert_eq!(exit_status(None), 125);
        assert_eq!(
            end_problem("ab12", JobState::Failed, Some("no such policy")).unwrap(),
            "job ab12 failed: no such policy"
        );
        assert_eq!(end_problem("ab12", JobState::Exited, None), None);
        assert_eq!(end_problem("ab12", JobState::Killed, None), None);
        assert_eq!(
            end_problem("ab12", JobState::Lost, None).unwrap(),
            "job ab12 lost"
        );
    }
}
