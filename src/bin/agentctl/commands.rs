//! Every command but `run`: one request (or stream) each, printed as a table or line
//! for people, or as the daemon's JSON with --json.

use agentd::api::client::{Client, encode, with_query};
use agentd::api::types::{
    Event, JobInfo, KillRequest, LeaseInfo, LeaseRequest, OperationRow, RenewRequest, VerifyReport,
};
use serde::Deserialize;

use crate::output::{age, bytes, clock, now_ms, shell_join, table, until};
use crate::run::{exit_status, wait_until_ended};
use crate::{Fail, emit, emit_json};

pub fn job_path(id: &str) -> String {
    format!("/v1/jobs/{}", encode(id))
}

fn lease_path(id: &str) -> String {
    format!("/v1/leases/{}", encode(id))
}

/// "-" for an empty cell.
fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

/// The LEASE column: the lease id, "durable", or "-".
fn lease_cell(job: &JobInfo) -> String {
    match (&job.lease, job.durable) {
        (Some(l), _) => l.clone(),
        (None, true) => "durable".into(),
        (None, false) => "-".into(),
    }
}

/// `sched`: the budget and each job's class.
pub async fn sched(client: &Client, json: bool) -> Result<i32, Fail> {
    let view: serde_json::Value = client.get("/v1/sched").await?;
    if json {
        emit_json(&view)?;
        return Ok(0);
    }
    let ns = |v: &serde_json::Value| format!("{:.1}ms", v.as_u64().unwrap_or(0) as f64 / 1e6);
    let rows: Vec<Vec<String>> = view["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .map(|j| {
                    let d = &j["detail"];
                    let params = match j["class"].as_str().unwrap_or("") {
                        "fair" => format!("weight {} slice {}", d["weight"], ns(&d["slice_ns"])),
                        "deadline" => format!(
                            "runtime {} deadline {} period {}",
                            ns(&d["runtime_ns"]),
                            ns(&d["deadline_ns"]),
                            ns(&d["period_ns"])
                        ),
                        "rt" => format!("priority {}", d["priority"]),
                        _ => "-".into(),
                    };
                    let ms = |v: &serde_json::Value| match v.as_i64() {
                        Some(n) => format!("{:.1}ms", n as f64 / 1e6),
                        None => "-".into(),
                    };
                    let us = |v: &serde_json::Value| match v.as_u64() {
                        Some(n) => format!("{:.1}ms", n as f64 / 1e3),
                        None => "-".into(),
                    };
                    let state = if j["waiting"] == true {
                        "waiting"
                    } else if d["running"] == false && d["queued"] == false {
                        "sleeping" // gave its slot up: it used (almost) no CPU
                    } else if d["running"] == false && j["class"] == "fair" {
                        "queued"
                    } else {
                        "running"
                    };
                    vec![
                        j["job"].as_str().unwrap_or("").to_owned(),
                        j["class"].as_str().unwrap_or("").to_owned(),
                        state.to_owned(),
                        params,
                        ms(&d["service_ns"]),
                        ms(&d["lag_ns"]),
                        ms(&d["virtual_deadline_ns"]),
                        us(&j["cpu_usec"]),
                        us(&j["throttled_usec"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let slots = match view["slots"].as_u64() {
        Some(n) => format!("{n} slots, {} job(s) waiting", view["waiting"]),
        None => "no slot limit".into(),
    };
    let mut text = format!(
        "CPU budget {:.2} CPUs{}; deadline bandwidth admitted {:.4} CPUs; {slots}\n",
        view["cpu_budget"].as_f64().unwrap_or(0.0),
        if view["cpu_budget_enforced"] == false {
            " (not enforced: no cpu controller)"
        } else {
            ""
        },
        view["deadline_admitted"].as_f64().unwrap_or(0.0)
    );
    text.push_str(&table(
        &[
            "JOB",
            "CLASS",
            "STATE",
            "PARAMETERS",
            "SERVICE",
            "LAG",
            "VDEADLINE",
            "CPU",
            "THROTTLED",
        ],
        &rows,
    ));
    emit(&text)?;
    Ok(0)
}

/// `classes`: the daemon's objects by class, then per job (or the export policy).
pub async fn classes(
    client: &Client,
    job: Option<&str>,
    fields: bool,
    json: bool,
) -> Result<i32, Fail> {
    let report: agentd::api::types::ClassesReport = client
        .get(&with_query("/v1/classes", &[("job", job)]))
        .await?;
    if json {
        emit_json(&report)?;
        return Ok(0);
    }
    if fields {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".into()
            } else {
                v.join(",")
            }
        };
        let rows: Vec<Vec<String>> = report
            .classes
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    list(&c.agent_fields),
                    list(&c.operator_fields),
                    list(&c.never_fields),
                ]
            })
            .collect();
        emit(&table(&["CLASS", "AGENT", "OPERATOR ONLY", "NEVER"], &rows))?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = report
        .classes
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.live.to_string(),
                bytes(c.bytes),
                c.high_water_live.to_string(),
                bytes(c.high_water_bytes),
                c.allocs_total.to_string(),
                format!("{:.1}", c.allocs_per_sec),
            ]
        })
        .collect();
    let mut text = table(
        &[
            "CLASS",
            "LIVE",
            "BYTES",
            "HIGH-LIVE",
            "HIGH-BYTES",
            "ALLOCS",
            "ALLOCS/S",
        ],
        &rows,
    );
    if !report.jobs.is_empty() {
        let rows: Vec<Vec<String>> = report
            .jobs
            .iter()
            .map(|j| {
                vec![
                    j.job.clone(),
                    j.class.clone(),
                    j.live.to_string(),
                    bytes(j.bytes),
                    j.high_water_live.to_string(),
                    bytes(j.high_water_bytes),
                    j.allocs_total.to_string(),
                    format!("{:.1}", j.allocs_per_sec),
                ]
            })
            .collect();
        text.push('\n');
        text.push_str(&table(
            &[
                "JOB",
                "CLASS",
                "LIVE",
                "BYTES",
                "HIGH-LIVE",
                "HIGH-BYTES",
                "ALLOCS",
                "ALLOCS/S",
            ],
            &rows,
        ));
    }
    emit(&text)?;
    Ok(0)
}

/// `ps`: the jobs that have not ended (or all), oldest first.
pub async fn ps(client: &Client, all: bool, json: bool) -> Result<i32, Fail> {
    let mut jobs: Vec<JobInfo> = client.get("/v1/jobs").await?;
    jobs.retain(|j| all || !j.state.is_terminal());
    jobs.sort_by(|a, b| a.submitted_ms.cmp(&b.submitted_ms).then(a.id.cmp(&b.id)));
    if json {
        emit_json(&jobs)?;
        return Ok(0);
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                if j.waiting {
                    format!("{} (waiting)", j.state)
                } else {
                    j.state.to_string()
                },
                age(j.submitted_ms, now),
                or_dash(&j.policy),
                or_dash(&j.agent),
                lease_cell(j),
                shell_join(&j.command),
            ]
        })
        .collect();
    emit(&table(
        &["ID", "STATE", "AGE", "POLICY", "AGENT", "LEASE", "COMMAND"],
        &rows,
    ))?;
    Ok(0)
}

/// `inspect`: every field of a job, one per line (--json: the JobInfo with its report).
pub async fn inspect(client: &Client, id: &str, json: bool) -> Result<i32, Fail> {
    let job: JobInfo = client.get(&job_path(id)).await?;
    if json {
        emit_json(&job)?;
    } else {
        emit(&describe(&job, now_ms()))?;
    }
    Ok(0)
}

/// A job for people: "key:  value" lines; times absolute and relative.
fn describe(j: &JobInfo, now: u64) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("id", j.id.clone()),
        (
            "state",
            if j.waiting {
                format!("{} (waiting for a slot)", j.state)
            } else {
                j.state.to_string()
            },
        ),
        ("command", shell_join(&j.command)),
        ("policy", format!("{} (sha256 {})", j.policy, j.policy_hash)),
        ("agent", or_dash(&j.agent)),
        ("model", or_dash(&j.model)),
    ];
    if let Some(ws) = &j.workspace {
        lines.push(("workspace", ws.clone()));
    }
    if let Some(r) = &j.review {
        let by = match (&r.decided_by, r.decided_ms) {
            (Some(who), Some(ms)) => format!(" by uid {} at {}", who.uid, clock(ms)),
            _ => String::new(),
        };
        lines.push((
            "review",
            format!("{}{by}", crate::review::review_state_name(r.state)),
        ));
    }
    lines.push(("lease", lease_cell(j)));
    let r = &j.requester;
    let agent = r
        .agent
        .as_deref()
        .map_or(String::new(), |a| format!(" agent {a}"));
    lines.push((
        "requester",
        format!("uid {} gid {} pid {}{agent}", r.uid, r.gid, r.pid),
    ));
    let when = |ms: u64| format!("{} ({} ago)", clock(ms), age(ms, now));
    lines.push(("submitted", when(j.submitted_ms)));
    if let Some(ms) = j.started_ms {
        lines.push(("started", when(ms)));
    }
    if let Some(ms) = j.ended_ms {
        lines.push(("ended", when(ms)));
    }
    if let Some(pid) = j.pid {
        lines.push(("pid", pid.to_string()));
    }
    if !j.cgroup.is_empty() {
        lines.push(("cgroup", j.cgroup.join(" ")));
    }
    if let Some(exit) = &j.exit {
        lines.push(("exit", format!("{} ({})", exit.code, exit.message)));
    }
    if let Some(reason) = &j.reason {
        lines.push(("reason", reason.clone()));
    }
    if let Some(u) = &j.usage {
        let mut parts = Vec::new();
        if let Some(v) = u.cpu_usec {
            parts.push(format!("cpu {:.3}s", v as f64 / 1e6));
        }
        if let Some(v) = u.memory_bytes {
            parts.push(format!("memory {}", bytes(v)));
        }
        if let Some(v) = u.peak_memory_bytes {
            parts.push(format!("peak {}", bytes(v)));
        }
        if let Some(v) = u.pids {
            parts.push(format!("pids {v}"));
        }
        if let Some(v) = u.oom_kills {
            parts.push(format!("oom-kills {v}"));
        }
        if let Some(v) = u.throttled_usec {
            parts.push(format!("throttled {:.3}s", v as f64 / 1e6));
        }
        if !parts.is_empty() {
            lines.push(("usage", parts.join(", ")));
        }
    }
    if let Some(n) = j.report.as_ref().and_then(|r| r.get("network")) {
        lines.push(("network", network_summary(n)));
    }
    if j.report.is_some() {
        lines.push(("report", "yes (inspect --json shows it)".into()));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    lines
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

/// The report's network section in one line: the mode, and through the proxy the
/// destinations with their bytes and the denials.
fn network_summary(n: &serde_json::Value) -> String {
    let mut text = n["mode"].as_str().unwrap_or("?").to_owned();
    let dests = n["destinations"].as_array().cloned().unwrap_or_default();
    if !dests.is_empty() {
        let shown: Vec<String> = dests
            .iter()
            .map(|d| {
                format!(
                    "{} ({} down, {} up)",
                    d["destination"].as_str().unwrap_or("?"),
                    bytes(d["bytes_down"].as_u64().unwrap_or(0)),
                    bytes(d["bytes_up"].as_u64().unwrap_or(0))
                )
            })
            .collect();
        text.push_str(&format!("; {}", shown.join(", ")));
    }
    if let Some(denied) = n["denied"].as_u64().filter(|d| *d > 0) {
        text.push_str(&format!("; {denied} denied"));
    }
    text
}

/// `logs`: one of the job's streams to our stdout, raw.
pub async fn logs(client: &Client, id: &str, follow: bool, stderr: bool) -> Result<i32, Fail> {
    let path = with_query(
        &format!("{}/logs", job_path(id)),
        &[
            ("stream", Some(if stderr { "stderr" } else { "stdout" })),
            ("follow", Some(if follow { "true" } else { "false" })),
        ],
    );
    let mut body = client.stream(&path).await?;
    while let Some(chunk) = body.next_chunk().await? {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        match out.write_all(&chunk).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
            Err(e) => return Err(Fail(format!("cannot write to stdout: {e}"))),
        }
    }
    Ok(0)
}

/// `kill`: signal the job (the daemon escalates to killing the cgroup after the grace).
pub async fn kill(
    client: &Client,
    id: &str,
    signal: Option<String>,
    grace: Option<String>,
    json: bool,
) -> Result<i32, Fail> {
    let sig = signal.clone().unwrap_or_else(|| "TERM".into());
    let body = KillRequest { signal, grace };
    let job: JobInfo = client
        .post(&format!("{}/kill", job_path(id)), &body)
        .await?;
    if json {
        emit_json(&job)?;
    } else {
        emit(&format!(
            "job {}: sent SIG{sig}, now {}\n",
            job.id, job.state
        ))?;
    }
    Ok(0)
}

/// `freeze`, `thaw`, `detach`: a bodiless POST that returns the job.
pub async fn job_action(client: &Client, id: &str, action: &str, json: bool) -> Result<i32, Fail> {
    let job: JobInfo = client
        .post_empty(&format!("{}/{action}", job_path(id)))
        .await?;
    if json {
        emit_json(&job)?;
    } else if action == "detach" {
        emit(&format!(
            "job {} is durable now: it no longer depends on a lease ({})\n",
            job.id, job.state
        ))?;
    } else {
        emit(&format!("job {} {}\n", job.id, job.state))?;
    }
    Ok(0)
}

/// `wait`: until the job ends; exit with its status.
pub async fn wait(client: &Client, id: &str, json: bool) -> Result<i32, Fail> {
    let job = wait_until_ended(client, id).await?;
    if json {
        emit_json(&job)?;
    } else {
        let how = match (&job.exit, &job.reason) {
            (Some(exit), _) => exit.message.clone(),
            (None, Some(reason)) => reason.clone(),
            (None, None) => "no exit status".into(),
        };
        emit(&format!("job {} {}: {how}\n", job.id, job.state))?;
    }
    Ok(exit_status(job.exit.as_ref()))
}

/// `events`: lifecycle events, as they come with --follow.
/// `--filter KIND,JOB,...` folded into the job and kinds: an item that is 12 hex digits
/// is a job id (one), anything else a kind (the daemon checks the names).
pub fn merge_event_filter(
    job: Option<String>,
    kind: Option<String>,
    filter: Option<&str>,
) -> Result<(Option<String>, Option<String>), Fail> {
    let Some(filter) = filter else {
        return Ok((job, kind));
    };
    let mut job = job;
    let mut kinds: Vec<String> = kind
        .map(|k| k.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    for item in filter.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if item.len() == 12 && item.chars().all(|c| c.is_ascii_hexdigit()) {
            if job.as_deref().is_some_and(|j| j != item) {
                return Err(Fail(format!(
                    "--filter: one job at a time (got {item} and {})",
                    job.unwrap_or_default()
                )));
            }
            job = Some(item.to_owned());
        } else {
            kinds.push(item.to_owned());
        }
    }
    Ok((job, (!kinds.is_empty()).then(|| kinds.join(","))))
}

pub async fn events(
    client: &Client,
    follow: bool,
    job: Option<String>,
    kind: Option<String>,
    since: Option<u64>,
    json: bool,
) -> Result<i32, Fail> {
    let since = since.map(|s| s.to_string());
    let path = with_query(
        "/v1/events",
        &[
            ("follow", Some(if follow { "true" } else { "false" })),
            ("job", job.as_deref()),
            ("kind", kind.as_deref()),
            ("since", since.as_deref()),
        ],
    );
    let mut body = client.stream(&path).await?;
    while let Some(line) = body.next_line().await? {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let text = if json {
            format!("{}\n", String::from_utf8_lossy(&line))
        } else {
            match serde_json::from_slice::<Event>(&line) {
                Ok(ev) => event_line(&ev),
                // A newer daemon's event: show it as it came rather than drop it.
                Err(_) => format!("{}\n", String::from_utf8_lossy(&line)),
            }
        };
        emit(&text)?;
    }
    Ok(0)
}

/// "TIME SEQ KIND JOB DETAIL" for one event; lease events name the lease instead.
fn event_line(ev: &Event) -> String {
    let kind = serde_json::to_value(ev.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{:?}", ev.kind));
    let target = match (&ev.job, &ev.lease) {
        (Some(job), _) => job.clone(),
        (None, Some(lease)) => format!("lease:{lease}"),
        (None, None) => "-".into(),
    };
    format!(
        "{} {} {kind} {target} {}\n",
        clock(ev.time_ms),
        ev.seq,
        ev.detail
    )
}

/// `audit`: the operation table, or `--verify` its hash chain (exit 1 if broken).
pub async fn audit(
    client: &Client,
    verify: bool,
    since: Option<u64>,
    json: bool,
) -> Result<i32, Fail> {
    if verify {
        let report: VerifyReport = client.get("/v1/audit/verify").await?;
        if json {
            emit_json(&report)?;
        } else {
            emit(&format!("{}\n", verify_line(&report)))?;
        }
        return Ok(if report.ok { 0 } else { 1 });
    }
    let since = since.map(|s| s.to_string());
    let path = with_query("/v1/audit", &[("since", since.as_deref())]);
    let mut body = client.stream(&path).await?;
    let mut rows = Vec::new();
    while let Some(line) = body.next_line().await? {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if json {
            emit(&format!("{}\n", String::from_utf8_lossy(&line)))?;
            continue;
        }
        let row: OperationRow = serde_json::from_slice(&line)
            .map_err(|e| Fail(format!("unexpected answer from agentd: audit row: {e}")))?;
        rows.push(vec![
            row.seq.to_string(),
            clock(row.time_ms),
            row.requester.uid.to_string(),
            row.action,
            row.target.unwrap_or_else(|| "-".into()),
            row.authority,
        ]);
    }
    if !json {
        emit(&table(
            &["SEQ", "TIME", "UID", "ACTION", "TARGET", "AUTHORITY"],
            &rows,
        ))?;
    }
    Ok(0)
}

/// The one line `audit --verify` prints.
fn verify_line(r: &VerifyReport) -> String {
    if r.ok {
        format!("audit: {} rows, chain intact, head {}", r.rows, r.head_hash)
    } else {
        format!(
            "audit: row {}: {}",
            r.bad_seq.map_or("?".into(), |s| s.to_string()),
            r.problem.as_deref().unwrap_or("the chain is broken")
        )
    }
}

/// `lease take`: prints the new lease's id.
pub async fn lease_take(client: &Client, ttl: String, json: bool) -> Result<i32, Fail> {
    let lease: LeaseInfo = client.post("/v1/leases", &LeaseRequest { ttl }).await?;
    if json {
        emit_json(&lease)?;
    } else {
        emit(&format!("{}\n", lease.id))?;
    }
    Ok(0)
}

/// `lease renew`.
pub async fn lease_renew(
    client: &Client,
    id: &str,
    ttl: Option<String>,
    json: bool,
) -> Result<i32, Fail> {
    let lease: LeaseInfo = client
        .post(&format!("{}/renew", lease_path(id)), &RenewRequest { ttl })
        .await?;
    if json {
        emit_json(&lease)?;
    } else {
        emit(&format!(
            "lease {} {}, expires in {}\n",
            lease.id,
            lease.state.as_str(),
            until(lease.expires_ms, now_ms())
        ))?;
    }
    Ok(0)
}

/// `lease release`: the jobs still under it are cancelled by the daemon.
pub async fn lease_release(client: &Client, id: &str, json: bool) -> Result<i32, Fail> {
    let lease: LeaseInfo = client
        .post_empty(&format!("{}/release", lease_path(id)))
        .await?;
    if json {
        emit_json(&lease)?;
    } else {
        emit(&format!("lease {} {}\n", lease.id, lease.state.as_str()))?;
    }
    Ok(0)
}

/// `lease ls`: ID STATE EXPIRES-IN JOBS.
pub async fn lease_ls(client: &Client, json: bool) -> Result<i32, Fail> {
    let leases: Vec<LeaseInfo> = client.get("/v1/leases").await?;
    if json {
        emit_json(&leases)?;
        return Ok(0);
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|l| {
            vec![
                l.id.clone(),
                l.state.as_str().into(),
                if l.state == agentd::api::types::LeaseState::Active {
                    until(l.expires_ms, now)
                } else {
                    "-".into()
                },
                or_dash(&l.jobs.join(",")),
            ]
        })
        .collect();
    emit(&table(&["ID", "STATE", "EXPIRES-IN", "JOBS"], &rows))?;
    Ok(0)
}

/// `metrics`: the Prometheus text as the daemon wrote it.
pub async fn metrics(client: &Client) -> Result<i32, Fail> {
    emit(&client.get_text("/metrics").await?)?;
    Ok(0)
}

/// GET /v1/health.
#[derive(Debug, Deserialize, serde::Serialize)]
struct Health {
    ok: bool,
    version: String,
    pid: i64,
}

/// `health`: "agentd VERSION (pid N) at SOCKET: ok".
pub async fn health(client: &Client, json: bool) -> Result<i32, Fail> {
    let h: Health = client.get("/v1/health").await?;
    if json {
        emit_json(&h)?;
    } else {
        emit(&format!(
            "agentd {} (pid {}) at {}: {}\n",
            h.version,
            h.pid,
            client.socket().display(),
            if h.ok { "ok" } else { "not ok" }
        ))?;
    }
    Ok(if h.ok { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd::api::types::{EventKind, JobState};

    #[test]
    fn event_lines() {
        let ev = Event {
            seq: 7,
            time_ms: 0,
            kind: EventKind::LeaseExpired,
            job: None,
            lease: Some("l1".into()),
            detail: "ttl 30s passed".into(),
        };
        let line = event_line(&ev);
        assert!(
            line.ends_with(" 7 lease-expired lease:l1 ttl 30s passed\n"),
            "{line}"
        );
    }

    #[test]
    fn verify_lines() {
        let mut r = VerifyReport {
            ok: true,
            rows: 12,
            head_seq: 12,
            head_hash: "abc".into(),
            bad_seq: None,
            problem: None,
        };
        assert_eq!(verify_line(&r), "audit: 12 rows, chain intact, head abc");
        r.ok = false;
        r.bad_seq = Some(5);
        r.problem = Some("its hash does not match its contents".into());
        assert_eq!(
            verify_line(&r),
            "audit: row 5: its hash does not match its contents"
        );
    }

    #[test]
    fn describes_a_job() {
        let job: JobInfo = serde_json::from_value(serde_json::json!({
            "id": "ab12", "state": "exited", "command": ["sh", "-c", "exit 3"],
            "policy": "default", "policy_hash": "ff", "agent": "", "model": "m",
            "durable": true, "requester": {"uid": 1000, "gid": 1000, "pid": 42},
            "submitted_ms": 1000, "ended_ms": 61_000,
            "exit": {"code": 3, "message": "exited with status 3"},
            "usage": {"peak_memory_bytes": 2097152}
        }))
        .unwrap();
        assert_eq!(job.state, JobState::Exited);
        let text = describe(&job, 121_000);
        assert!(text.contains("command:   sh -c 'exit 3'\n"), "{text}");
        assert!(text.contains("lease:     durable\n"), "{text}");
        assert!(
            text.contains("requester: uid 1000 gid 1000 pid 42\n"),
            "{text}"
        );
        assert!(text.contains("(1m00s ago)\n"), "{text}");
        assert!(
            text.contains("exit:      3 (exited with status 3)\n"),
            "{text}"
        );
        assert!(text.contains("usage:     peak 2.0MiB\n"), "{text}");
    }
}
