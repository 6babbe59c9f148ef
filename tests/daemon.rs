//! `agentd serve` and `agentctl` on the real kernel: jobs over the API (submit and
//! wait, kill with a grace period, capped and followed logs, freeze and thaw, metrics).
//! Each test starts its own daemon (its own socket, state and runtime directories, see
//! `common::daemon`), whose drop guard kills and waits for every job, checks that their
//! cgroups and runtime directories are gone, and stops the daemon.
//!
//! The other daemon tests: `daemon_access` (who may talk to the daemon, bad requests,
//! many clients), `daemon_leases` (leases and detach), `daemon_restart` (crash and
//! restart, the operation table's hash chain).

mod common;

use common::cgroups_of;
use common::daemon::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;

#[test]
fn submit_and_wait() {
    let d = TestDaemon::start(&[]);
    let o = d.ctl(&["run", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert_eq!(out_text(&o), "out\n", "{}", show(&o));
    assert_eq!(err_text(&o), "err\n", "{}", show(&o));

    let jobs = d.jobs();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let id = str_of(&jobs[0], "id").to_owned();

    let o = d.ctl(&["--json", "inspect", &id]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let j: Value = serde_json::from_slice(&o.stdout).expect("inspect --json prints JSON");
    assert_eq!(j["id"], id.as_str());
    assert_eq!(j["state"], "exited", "{j}");
    assert_eq!(j["exit"]["code"], 3, "{j}");
    assert_eq!(
        j["command"],
        serde_json::json!(["sh", "-c", "echo out; echo err >&2; exit 3"])
    );
    assert_eq!(j["policy"], "default");
    assert_eq!(j["requester"]["uid"], 0);
    assert!(j.get("pid").is_none(), "an ended job has no pid: {j}");
    // agentctl ran it under a lease of its own, and released that lease at the end.
    let lease = str_of(&j, "lease").to_owned();
    let leases = d.get("/v1/leases").json();
    let l = leases
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == lease.as_str())
        .unwrap_or_else(|| panic!("lease {lease} not listed: {leases}"));
    assert_eq!(l["state"], "released", "{l}");

    let r = &j["report"];
    assert_eq!(r["job_id"], id.as_str(), "{r}");
    assert_eq!(r["exit"]["status"], 3, "{r}");
    assert_eq!(r["exit"]["code"], 3, "{r}");
    let e = &r["enforced"];
    let sha = e["seccomp"]["sha256"].as_str().unwrap_or_default();
    assert_eq!(sha.len(), 64, "seccomp sha256 in {e}");
    assert!(
        e["seccomp"]["instructions"].as_u64().unwrap_or(0) > 0,
        "{e}"
    );
    assert!(
        e["seccomp"]["denied"]
            .as_array()
            .is_some_and(|d| d.iter().any(|s| s == "ptrace")),
        "{e}"
    );
    for ns in ["user", "pid", "mount", "net", "ipc", "uts", "cgroup"] {
        assert!(
            e["namespaces"]
                .as_array()
                .is_some_and(|a| a.iter().any(|n| n == ns)),
            "namespace {ns} not in {e}"
        );
    }
    assert_eq!(e["capabilities"], serde_json::json!([]), "{e}");
    assert_eq!(e["no_new_privs"], true, "{e}");
    assert!(r["wall_time_sec"].as_f64().is_some(), "{r}");

    let o = d.ctl(&["wait", &id]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(
        out_text(&o).contains(&format!("job {id} exited")),
        "{}",
        show(&o)
    );

    let audit = d.audit();
    for action in ["job.submit", "job.admit", "job.start", "job.exit"] {
        assert_eq!(rows(&audit, action, &id).len(), 1, "{action} for {id}");
    }
    assert_eq!(d.verify()["ok"], true);
    assert!(cgroups_of(&id).is_empty(), "{:?}", cgroups_of(&id));
}

#[test]
fn kill_with_grace() {
    let d = TestDaemon::start(&[]);
    // The shell ignores TERM (and so do the sleeps it starts): only the cgroup kill at
    // the end of the grace period ends it.
    let stubborn = d.run_detached(
        &[],
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 0.1; done",
        ],
    );
    let polite = d.run_detached(
        &[],
        &["sh", "-c", "echo ready; while :; do sleep 0.1; done"],
    );
    wait_for_output(&d, &stubborn, "ready");
    wait_for_output(&d, &polite, "ready");

    let kill = |id: &str, grace: &str| -> u32 {
        let c = d
            .ctl_cmd(&["kill", "--grace", grace, id])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = c.id();
        let o = c.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        assert!(
            out_text(&o).contains(&format!("job {id}: sent SIGTERM")),
            "{}",
            show(&o)
        );
        pid
    };

    let stubborn_killer = kill(&stubborn, "1s");
    let j = d.wait_ended(&stubborn);
    assert_eq!(j["state"], "killed", "{j}");
    assert_eq!(j["exit"]["signal"], 9, "ended by the cgroup kill: {j}");
    assert_eq!(j["exit"]["code"], 137, "{j}");
    assert!(
        str_of(&j, "reason").contains(&format!("killed by root (pid {stubborn_killer})")),
        "{j}"
    );

    // TERM ends this one; the minute of grace shows it was not the cgroup kill.
    let polite_killer = kill(&polite, "60s");
    let j = d.wait_ended(&polite);
    assert_eq!(j["state"], "killed", "{j}");
    assert_eq!(j["exit"]["code"], 143, "{j}");
    assert_eq!(j["exit"]["signal"], 15, "{j}");

    let audit = d.audit();
    for (id, killer, grace_ms) in [
        (&stubborn, stubborn_killer, 1000),
        (&polite, polite_killer, 60000),
    ] {
        let kills = rows(&audit, "job.kill", id);
        assert_eq!(kills.len(), 1, "{kills:?}");
        let k = kills[0];
        assert_eq!(k["requester"]["uid"], 0, "{k}");
        assert_eq!(k["requester"]["pid"], killer, "{k}");
        assert!(
            str_of(k, "authority").contains(&format!("root (pid {killer})")),
            "{k}"
        );
        assert_eq!(k["change"]["signal"], 15, "{k}");
        assert_eq!(k["change"]["grace_ms"], grace_ms, "{k}");
        assert_eq!(rows(&audit, "job.exit", id).len(), 1);
    }
    for id in [&stubborn, &polite] {
        assert!(cgroups_of(id).is_empty(), "{:?}", cgroups_of(id));
    }

    // A second kill can bring the cgroup kill forward (never back): a minute of grace,
    // then one second.
    let forward = d.run_detached(
        &[],
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 0.1; done",
        ],
    );
    wait_for_output(&d, &forward, "ready");
    let first = kill(&forward, "60s");
    assert_eq!(d.job(&forward)["state"], "running");
    kill(&forward, "1s");
    let j = d.wait_ended(&forward);
    assert_eq!(j["state"], "killed", "{j}");
    assert_eq!(j["exit"]["signal"], 9, "{j}");
    assert!(
        str_of(&j, "reason").contains(&format!("killed by root (pid {first})")),
        "the first cancellation's reason stays: {j}"
    );
    assert_eq!(rows(&d.audit(), "job.kill", &forward).len(), 2);
    // An ended job cannot be killed.
    let msg = d.post(&format!("/v1/jobs/{forward}/kill"), "{}").error(409);
    assert!(msg.contains("already ended"), "{msg}");
}

#[test]
fn logs_are_capped_and_followed() {
    let d = TestDaemon::start(&[]);
    let policy = default_policy_with(&d, "capped", "log_cap = \"16M\"", "log_cap = \"1K\"");
    let o = d.ctl(&[
        "run",
        "--policy-file",
        &policy,
        "--",
        "sh",
        "-c",
        "yes x | head -c 100000; echo done >&2",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let marker = "\n[agentd: output truncated here: this log reached its size cap]\n";
    let expected = format!("{}{marker}", "x\n".repeat(512));
    assert_eq!(out_text(&o), expected, "agentctl run's output");
    assert_eq!(err_text(&o), "done\n");
    let id = str_of(&d.jobs()[0], "id").to_owned();
    let logged = d.get(&format!("/v1/jobs/{id}/logs")).text();
    assert_eq!(logged, expected, "the stdout log");
    let on_disk = std::fs::read_to_string(d.state_dir().join("jobs").join(&id).join("stdout"));
    assert_eq!(on_disk.unwrap(), expected, "the log file");
    assert_eq!(d.ctl_ok(&["logs", "--stderr", &id]), "done");

    // Follow a job that is still running: output arrives as it is written, and the
    // stream ends when the job does.
    let ws = d.path("ws");
    std::fs::create_dir(&ws).unwrap();
    let id = d.run_detached(
        &["--workspace", ws.to_str().unwrap()],
        &[
            "sh",
            "-c",
            "echo first; while [ ! -e go ]; do sleep 0.1; done; echo second",
        ],
    );
    let mut follower = Reaped(Some(
        d.ctl_cmd(&["logs", "-f", &id])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let out = follower.child().stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    assert_eq!(rx.recv_timeout(LIVENESS).unwrap(), "first");
    assert_eq!(d.job(&id)["state"], "running", "streamed while it runs");
    std::fs::write(ws.join("go"), "").unwrap();
    assert_eq!(rx.recv_timeout(LIVENESS).unwrap(), "second");
    // The stream ends (EOF) because the job ended.
    assert_eq!(
        rx.recv_timeout(LIVENESS),
        Err(mpsc::RecvTimeoutError::Disconnected)
    );
    reader.join().unwrap();
    let status = follower.child().wait().unwrap();
    follower.0 = None;
    assert_eq!(status.code(), Some(0));
    let j = d.wait_ended(&id);
    assert_eq!(j["state"], "exited", "{j}");
}

#[test]
fn freeze_and_thaw() {
    let d = TestDaemon::start(&[]);
    let id = d.run_detached(&[], &["sh", "-c", "while :; do sleep 0.1; done"]);
    let cg = v2_dir(&d.job(&id));
    let freeze_file = || {
        std::fs::read_to_string(cg.join("cgroup.freeze"))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(freeze_file(), "0");

    let out = d.ctl_ok(&["freeze", &id]);
    assert_eq!(out, format!("job {id} frozen"));
    assert_eq!(d.job(&id)["state"], "frozen");
    assert_eq!(freeze_file(), "1");
    wait_until("the cgroup reports frozen", LIVENESS, || {
        std::fs::read_to_string(cg.join("cgroup.events"))
            .unwrap()
            .contains("frozen 1")
    });
    // Freezing twice is a conflict, not a second freeze.
    let msg = d.post(&format!("/v1/jobs/{id}/freeze"), "").error(409);
    assert!(msg.contains("frozen"), "{msg}");

    let out = d.ctl_ok(&["thaw", &id]);
    assert_eq!(out, format!("job {id} running"));
    assert_eq!(d.job(&id)["state"], "running");
    assert_eq!(freeze_file(), "0");

    // A frozen job is killed by TERM (it is thawed to act on it) ...
    d.ctl_ok(&["freeze", &id]);
    d.ctl_ok(&["kill", &id]);
    let j = d.wait_ended(&id);
    assert_eq!(j["state"], "killed", "{j}");
    assert_eq!(j["exit"]["code"], 143, "{j}");
    // ... and by KILL.
    let id2 = d.run_detached(&[], &["sleep", "100"]);
    d.ctl_ok(&["freeze", &id2]);
    assert_eq!(freeze_file_of(&d, &id2), "1");
    d.ctl_ok(&["kill", "--signal", "KILL", &id2]);
    let j = d.wait_ended(&id2);
    assert_eq!(j["state"], "killed", "{j}");
    assert_eq!(j["exit"]["signal"], 9, "{j}");

    let events = d.events();
    for kind in ["frozen", "thawed", "killed"] {
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == kind && e["job"] == id.as_str()),
            "no {kind} event: {events:#?}"
        );
    }
    for id in [&id, &id2] {
        assert!(cgroups_of(id).is_empty(), "{:?}", cgroups_of(id));
    }
}

fn freeze_file_of(d: &TestDaemon, id: &str) -> String {
    std::fs::read_to_string(v2_dir(&d.job(id)).join("cgroup.freeze"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The value of the metric line that starts with `prefix` (name and labels).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l[prefix.len()..].trim().parse().ok())
}

#[test]
fn metrics() {
    let d = TestDaemon::start(&[]);
    let id = d.run_detached(
        &[],
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo spun; sleep 1000",
        ],
    );
    wait_for_output(&d, &id, "spun");
    let msg = d
        .post(
            "/v1/jobs",
            r#"{"command": ["true"], "durable": true, "cpu": "-1"}"#,
        )
        .error(400);
    assert!(msg.contains("cpu"), "{msg}");

    let r = d.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    let m = r.text();
    assert_eq!(
        metric(&m, "agentd_jobs{state=\"running\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "agentd_jobs{state=\"exited\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "agentd_spawn_seconds_bucket{le=\"+Inf\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "agentd_spawn_seconds_count"), Some(1.0), "{m}");
    assert!(
        metric(&m, "agentd_operations_written_total").unwrap_or(0.0) >= 4.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "agentd_denials_total{rule=\"policy validation\"}"),
        Some(1.0),
        "{m}"
    );
    let cpu = metric(
        &m,
        &format!("agentd_job_cpu_seconds_total{{job=\"{id}\",agent=\"unknown\"}}"),
    )
    .unwrap_or_else(|| panic!("no CPU time for job {id}:\n{m}"));
    assert!(cpu > 0.0, "the job spun, yet its CPU time is {cpu}:\n{m}");
    assert!(m.contains(&format!("agentd_job_pids{{job=\"{id}\"")), "{m}");
    // agentctl prints the same exposition.
    assert!(
        d.ctl_ok(&["metrics"])
            .contains("agentd_spawn_seconds_bucket")
    );

    d.ctl_ok(&["kill", "--signal", "KILL", &id]);
    d.wait_ended(&id);
    let m = d.get("/metrics").text();
    assert_eq!(
        metric(&m, "agentd_jobs{state=\"running\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "agentd_jobs{state=\"killed\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "agentd_jobs_ended_total{state=\"killed\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(!m.contains("agentd_job_cpu_seconds_total{"), "{m}");
}

/// A failure forced at each step of the creation pipeline (test builds, AGENTD_FAULT):
/// the job ends `failed` with exit 125 and a reason, and nothing of it is left.
#[test]
fn a_failed_creation_leaves_nothing_behind() {
    for step in [
        "after-runtime-dir",
        "after-cgroup",
        "after-clone",
        "after-handshake",
        "after-mounts",
        "after-landlock",
    ] {
        let d = TestDaemon::start_with_env(&[], &[("AGENTD_FAULT", step)]);
        let r = d.post(
            "/v1/jobs",
            r#"{"command": ["sleep", "100"], "durable": true}"#,
        );
        assert_eq!(r.status, 201, "{step}: {}", r.text());
        let id = str_of(&r.json(), "id").to_owned();
        let j = d.wait_ended(&id);
        assert_eq!(j["state"], "failed", "{step}: {j}");
        assert_eq!(j["exit"]["code"], 125, "{step}: {j}");
        assert!(!str_of(&j, "reason").is_empty(), "{step}: {j}");
        assert!(j.get("pid").is_none(), "{step}: {j}");
        assert!(cgroups_of(&id).is_empty(), "{step}: {:?}", cgroups_of(&id));
        assert!(
            !d.path("run").join("jobs").join(&id).exists(),
            "{step}: runtime directory left"
        );
        let o = d.ctl(&["wait", &id]);
        assert_eq!(o.status.code(), Some(125), "{step}: {}", show(&o));
        let events = d.events();
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "failed" && e["job"] == id.as_str()),
            "{step}: {events:#?}"
        );
        assert!(
            str_of(&j, "reason").contains("injected fault"),
            "{step}: {j}"
        );
        // A failure on the daemon's side (up to the clone) never starts the job: job.fail.
        // A failure in the child's setup is reported by the job's init, and the job ends
        // like any other: job.exit.
        let audit = d.audit();
        let ended = rows(&audit, "job.fail", &id)
            .into_iter()
            .chain(rows(&audit, "job.exit", &id))
            .collect::<Vec<_>>();
        assert_eq!(ended.len(), 1, "{step}: {audit:#?}");
        assert_eq!(ended[0]["change"]["state"]["after"], "failed", "{step}");
        let m = d.get("/metrics").text();
        let spawn_failed = ["after-runtime-dir", "after-cgroup", "after-clone"].contains(&step);
        assert_eq!(
            metric(&m, "agentd_spawn_failures_total"),
            Some(if spawn_failed { 1.0 } else { 0.0 }),
            "{step}: {m}"
        );
        assert_eq!(
            metric(&m, "agentd_jobs_ended_total{state=\"failed\"}"),
            Some(1.0),
            "{step}: {m}"
        );
    }
}

/// `--keep-ended N`: only the last N ended jobs stay in memory (and in `ps --all`); an
/// older one is still found, from the store, by inspect (with its report), wait and logs.
#[test]
fn ended_jobs_beyond_the_bound_are_answered_from_the_store() {
    let d = TestDaemon::start(&["--keep-ended", "2"]);
    let mut ids = Vec::new();
    for i in 0..5 {
        let script = format!("echo out{i}; exit {i}");
        let id = d.ctl_ok(&["run", "--detach", "--", "sh", "-c", &script]);
        d.wait_ended(&id);
        ids.push(id);
    }
    let listed: Vec<String> = d
        .jobs()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        listed.len() <= 2,
        "more ended jobs listed than kept: {listed:?}"
    );
    assert!(
        !listed.contains(&ids[0]),
        "the oldest job is still in memory: {listed:?}"
    );
    // The oldest job, from the store.
    let j = d.job(&ids[0]);
    assert_eq!(j["state"], "exited", "{j}");
    assert_eq!(j["exit"]["code"], 0, "{j}");
    assert!(
        j["report"]["enforced"]["seccomp"].is_object(),
        "no report: {j}"
    );
    let j = d.wait_ended(&ids[1]);
    assert_eq!(j["exit"]["code"], 1, "{j}");
    assert_eq!(d.ctl_ok(&["logs", &ids[1]]), "out1");
    let o = d.ctl(&["wait", &ids[1]]);
    assert_eq!(o.status.code(), Some(1), "agentctl wait: {}", show(&o));
    // An id that never existed is still 404.
    assert_eq!(d.get("/v1/jobs/0123456789ab").status, 404);
}

/// A client that goes away while its submit is being carried out does not leave a job
/// half made: the request runs to its end (the job starts and its start is recorded),
/// and the job can be killed as any other. (Spawns are slowed down in this test, so the
/// client is gone while its job is admitted but not yet running.)
#[test]
fn a_submit_whose_client_vanishes_still_completes() {
    use std::io::Write;
    let d = TestDaemon::start_with_env(&[], &[("AGENTD_FAULT", "slow-spawn")]);
    let body = r#"{"command": ["sleep", "100"], "durable": true}"#;
    let mut s = std::os::unix::net::UnixStream::connect(d.sock()).unwrap();
    s.write_all(&build_request("POST", "/v1/jobs", Some(body.as_bytes())))
        .unwrap();
    let mut id = String::new();
    wait_until("the job is admitted", LIVENESS, || {
        if let Some(j) = d.jobs().first() {
            id = j["id"].as_str().unwrap().to_owned();
        }
        !id.is_empty()
    });
    assert_eq!(
        d.job(&id)["state"],
        "admitted",
        "not admitted when the client left"
    );
    drop(s); // gone before the answer
    wait_until("the job runs", LIVENESS, || {
        d.job(&id)["state"] == "running"
    });
    d.ctl_ok(&["kill", "--signal", "KILL", &id]);
    assert_eq!(d.wait_ended(&id)["state"], "killed");
    let starts = d
        .audit()
        .into_iter()
        .filter(|r| r["action"] == "job.start")
        .count();
    assert_eq!(starts, 1, "the job's start is recorded");
}
