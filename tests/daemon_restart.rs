//! `agentd serve` on the real kernel: jobs outlive a killed or stopped daemon and the
//! next one adopts them, recording each end once; the operation table's hash chain
//! names a row edited or removed behind the daemon's back. See tests/daemon.rs for the
//! setup.

mod common;

use common::cgroups_of;
use common::daemon::*;

#[test]
fn daemon_sigkill_with_20_running_jobs_readopts_them() {
    let mut d = TestDaemon::start(&[]);
    // The jobs wait for a file in their workspace, so none ends while no daemon runs.
    let ws = d.path("gate");
    std::fs::create_dir(&ws).unwrap();
    let ws_arg = ws.to_str().unwrap().to_owned();
    let mut jobs = Vec::new();
    for i in 0..20 {
        let script = if i % 4 == 0 {
            // Some live on a while after the gate opens.
            "while [ ! -e go ]; do sleep 0.2; done; sleep 2; exit 7"
        } else {
            "while [ ! -e go ]; do sleep 0.2; done; exit 7"
        };
        let id = d.run_detached(&["--workspace", &ws_arg], &["sh", "-c", script]);
        let pid = d.job(&id)["pid"].as_i64().unwrap() as i32;
        jobs.push((id, pid));
    }
    d.sigkill();
    for (id, pid) in &jobs {
        assert!(alive(*pid), "job {id}: its init {pid} died with the daemon");
        assert!(!cgroups_of(id).is_empty(), "job {id} lost its cgroups");
    }

    d.launch();
    let events = d.events();
    for (id, pid) in &jobs {
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "adopted" && e["job"] == id.as_str()),
            "job {id} not adopted: {events:#?}"
        );
        let j = d.job(id);
        assert_eq!(j["state"], "running", "{j}");
        assert_eq!(j["pid"], *pid, "{j}");
    }
    let ps = d.ctl_ok(&["ps"]);
    assert_eq!(ps.lines().count(), 21, "a header and 20 jobs:\n{ps}");

    std::fs::write(ws.join("go"), "").unwrap();
    for (id, _) in &jobs {
        let j = d.wait_ended(id);
        assert_eq!(j["state"], "exited", "{j}");
        assert_eq!(j["exit"]["code"], 7, "{j}");
        assert!(cgroups_of(id).is_empty(), "{id}: {:?}", cgroups_of(id));
    }
    let audit = d.audit();
    for (id, _) in &jobs {
        assert_eq!(rows(&audit, "job.adopt", id).len(), 1, "job.adopt for {id}");
        let exits = rows(&audit, "job.exit", id);
        assert_eq!(exits.len(), 1, "job.exit rows for {id}: {exits:#?}");
        assert_eq!(exits[0]["change"]["exit"]["code"], 7, "{}", exits[0]);
        assert!(rows(&audit, "job.recover", id).is_empty());
    }
    let v = d.verify();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["rows"].as_u64(), Some(audit.len() as u64), "{v}");
    assert_eq!(d.ctl_ok(&["audit", "--verify"]).lines().count(), 1);
}

#[test]
fn jobs_survive_a_graceful_daemon_stop() {
    let mut d = TestDaemon::start(&[]);
    let id = d.run_detached(&[], &["sleep", "1000"]);
    let pid = d.job(&id)["pid"].as_i64().unwrap() as i32;
    let status = d.sigterm();
    assert!(status.success(), "agentd serve exited with {status}");
    assert!(!d.sock().exists(), "the stopped daemon left its socket");
    assert!(alive(pid), "the job died with the daemon");
    assert!(!cgroups_of(&id).is_empty());

    d.launch();
    let j = d.job(&id);
    assert_eq!(j["state"], "running", "{j}");
    assert_eq!(j["pid"], pid, "{j}");
    assert!(
        d.events()
            .iter()
            .any(|e| e["kind"] == "adopted" && e["job"] == id.as_str())
    );
    assert_eq!(rows(&d.audit(), "job.adopt", &id).len(), 1);
    d.ctl_ok(&["kill", "--signal", "KILL", &id]);
    let j = d.wait_ended(&id);
    assert_eq!(j["state"], "killed", "{j}");
    assert_eq!(j["exit"]["signal"], 9, "{j}");
    assert!(cgroups_of(&id).is_empty(), "{:?}", cgroups_of(&id));
    assert_eq!(d.verify()["ok"], true);
}

/// A daemon that ran two jobs and was stopped: its database, for tampering.
fn stopped_daemon_with_history() -> TestDaemon {
    let mut d = TestDaemon::start(&[]);
    for _ in 0..2 {
        let o = d.ctl(&["run", "--", "true"]);
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    }
    let out = d.ctl_ok(&["audit", "--verify"]);
    assert!(out.contains("chain intact"), "{out}");
    assert!(d.jobs().iter().all(is_terminal));
    assert!(d.sigterm().success());
    d
}

#[test]
fn tampered_row_fails_verify_and_names_it() {
    let mut d = stopped_daemon_with_history();
    let db = rusqlite::Connection::open(d.db()).unwrap();
    let changed = db
        .execute("UPDATE operations SET authority='forged' WHERE seq=2", [])
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    d.launch();
    let o = d.ctl(&["audit", "--verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert_eq!(
        out_text(&o).trim(),
        "audit: row 2: row 2 was edited: its content no longer matches its hash",
        "{}",
        show(&o)
    );
    let v = d.verify();
    assert_eq!(
        (v["ok"].clone(), v["bad_seq"].clone()),
        (false.into(), 2.into())
    );
    // The daemon goes on working on a broken chain, and keeps saying where it broke.
    let o = d.ctl(&["run", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(d.verify()["bad_seq"], 2);
}

#[test]
fn deleted_row_fails_verify_and_names_it() {
    let mut d = stopped_daemon_with_history();
    let db = rusqlite::Connection::open(d.db()).unwrap();
    let rows: i64 = db
        .query_row("SELECT count(*) FROM operations", [], |r| r.get(0))
        .unwrap();
    assert!(rows >= 10, "{rows} rows");
    assert_eq!(
        db.execute("DELETE FROM operations WHERE seq=5", [])
            .unwrap(),
        1
    );
    drop(db);
    d.launch();
    let o = d.ctl(&["audit", "--verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert_eq!(
        out_text(&o).trim(),
        "audit: row 5: row 5 is missing: row 6 follows row 4",
        "{}",
        show(&o)
    );
}

/// While no daemon runs nothing enforces deadlines; the next daemon applies those that
/// passed meanwhile at once: a kill's grace period, a timeout, a lease's time to live.
#[test]
fn deadlines_that_passed_while_no_daemon_ran_are_applied_at_restart() {
    let mut d = TestDaemon::start(&[]);
    let stubborn = d.run_detached(
        &[],
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 0.2; done",
        ],
    );
    wait_for_output(&d, &stubborn, "ready");
    d.ctl_ok(&["kill", "--grace", "4s", &stubborn]);
    let timed = d.run_detached(&["--timeout", "4s"], &["sleep", "1000"]);
    let lease = d.ctl_ok(&["lease", "take", "--ttl", "4s"]);
    let leased = d.ctl_ok(&["run", "--lease", &lease, "--detach", "--", "sleep", "1000"]);
    let pids: Vec<i32> = [&stubborn, &timed, &leased]
        .iter()
        .map(|id| d.job(id)["pid"].as_i64().unwrap() as i32)
        .collect();
    d.sigkill();
    std::thread::sleep(std::time::Duration::from_secs(5));
    for pid in &pids {
        assert!(alive(*pid), "job init {pid} ended while no daemon ran");
    }

    d.launch();
    let j = d.wait_ended(&stubborn);
    assert_eq!(j["state"], "killed", "{j}");
    assert_eq!(j["exit"]["signal"], 9, "its grace had passed: {j}");
    assert!(str_of(&j, "reason").starts_with("killed by root"), "{j}");
    let j = d.wait_ended(&timed);
    assert_eq!(j["state"], "killed", "{j}");
    assert_eq!(j["reason"], "timed out after 4s", "{j}");
    assert_eq!(j["exit"]["code"], 143, "{j}");
    assert_eq!(j["report"]["exit"]["timed_out"], true, "{j}");
    let j = d.wait_ended(&leased);
    assert_eq!(j["state"], "killed", "{j}");
    assert!(
        str_of(&j, "reason").contains(&format!("lease {lease} expired")),
        "{j}"
    );
    for id in [&stubborn, &timed, &leased] {
        assert!(cgroups_of(id).is_empty(), "{id}: {:?}", cgroups_of(id));
        assert_eq!(rows(&d.audit(), "job.exit", id).len(), 1);
    }
    assert_eq!(d.verify()["ok"], true);
}

/// Jobs that ended while no daemon ran: one exited (its status file says how), one whose
/// init was killed left no word and is lost; what is left of both is removed.
#[test]
fn jobs_that_ended_while_no_daemon_ran_are_recorded_at_restart() {
    let mut d = TestDaemon::start(&[]);
    let ws = d.path("gate");
    std::fs::create_dir(&ws).unwrap();
    let exits = d.run_detached(
        &["--workspace", ws.to_str().unwrap()],
        &[
            "sh",
            "-c",
            "while [ ! -e go ]; do sleep 0.2; done; echo bye; exit 4",
        ],
    );
    let vanishes = d.run_detached(&[], &["sleep", "1000"]);
    let pid_of = |id: &str| d.job(id)["pid"].as_i64().unwrap() as i32;
    let (exits_pid, vanishes_pid) = (pid_of(&exits), pid_of(&vanishes));
    d.sigkill();
    std::fs::write(ws.join("go"), "").unwrap();
    // SAFETY: killing the job's init, by pid, while no daemon watches it.
    unsafe { libc::kill(vanishes_pid, libc::SIGKILL) };
    for pid in [exits_pid, vanishes_pid] {
        wait_until(&format!("job init {pid} ended"), LIVENESS, || !alive(pid));
        // Reaped (this test is their subreaper), so the next daemon finds no process.
        // SAFETY: reaping an adopted child by pid.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }

    d.launch();
    let j = d.job(&exits);
    assert_eq!(j["state"], "exited", "{j}");
    assert_eq!(j["exit"]["code"], 4, "{j}");
    assert!(str_of(&j, "reason").contains("status file"), "{j}");
    assert_eq!(d.ctl_ok(&["logs", &exits]), "bye");
    let j = d.job(&vanishes);
    assert_eq!(j["state"], "lost", "{j}");
    assert!(j.get("exit").is_none(), "{j}");
    let o = d.ctl(&["wait", &vanishes]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));

    let audit = d.audit();
    let events = d.events();
    for (id, kind) in [(&exits, "exited"), (&vanishes, "lost")] {
        assert!(cgroups_of(id).is_empty(), "{id}: {:?}", cgroups_of(id));
        assert_eq!(rows(&audit, "job.recover", id).len(), 1, "{audit:#?}");
        assert!(rows(&audit, "job.exit", id).is_empty());
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == kind && e["job"] == id.as_str()),
            "{events:#?}"
        );
    }
    assert_eq!(d.verify()["ok"], true);
}

/// A second daemon on a socket that a daemon answers on is refused; the first goes on.
#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    let d = TestDaemon::start(&[]);
    let other = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(common::AGENTD)
        .arg("serve")
        .arg("--socket")
        .arg(d.sock())
        .arg("--state-dir")
        .arg(other.path().join("state"))
        .arg("--runtime-dir")
        .arg(other.path().join("run"))
        .env("AGENTD_POLICY_DIR", other.path().join("policies"))
        .env_remove("AGENTD_FAULT")
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(
        err_text(&o).contains("another agentd serve is listening"),
        "{}",
        show(&o)
    );
    assert_eq!(d.get("/v1/health").json()["pid"], d.pid());
}

/// An attached `agentctl run` rides out a daemon restart: it reconnects, its output
/// arrives whole and once (the logs endpoint resumes at the bytes it has), and it exits
/// with the job's status.
#[test]
fn an_attached_client_rides_out_a_daemon_restart() {
    use std::io::{BufRead, BufReader, Read};
    let mut d = TestDaemon::start(&[]);
    let script = "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.4; done; exit 5";
    let mut client = d
        .ctl_cmd(&["run", "--", "sh", "-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start agentctl run");
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first, "line1\n");
    d.sigkill();
    std::thread::sleep(std::time::Duration::from_millis(300));
    d.launch();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = client.wait().unwrap();
    let mut err = String::new();
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(
        format!("{first}{rest}"),
        "line1\nline2\nline3\nline4\nline5\nline6\n",
        "agentctl's stderr: {err}"
    );
    assert_eq!(status.code(), Some(5), "agentctl's stderr: {err}");
    assert!(err.contains("reconnecting"), "{err}");
}
