//! `agentd serve` on the real kernel: leases end the jobs started under them (expiry,
//! a dead client, submitters racing the expiry), and a detached job outlives its lease.
//! See tests/daemon.rs for the setup.

mod common;

use common::cgroups_of;
use common::daemon::*;
use serde_json::Value;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Instant;

#[test]
fn lease_expiry_kills_its_jobs() {
    let d = TestDaemon::start(&[]);
    let lease = d.ctl_ok(&["lease", "take", "--ttl", "2s"]);
    assert_eq!(lease.len(), 12, "not a lease id: {lease:?}");
    let id = d.ctl_ok(&["run", "--lease", &lease, "--detach", "--", "sleep", "100"]);
    let j = d.job(&id);
    assert_eq!(j["lease"], lease.as_str(), "{j}");
    assert_eq!(j["durable"], false, "{j}");

    let j = d.wait_ended(&id);
    assert_eq!(j["state"], "killed", "{j}");
    let reason = str_of(&j, "reason");
    assert!(
        reason.contains("lease") && reason.contains(&lease) && reason.contains("expired"),
        "{j}"
    );
    let events = d.events();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "lease-expired" && e["lease"] == lease.as_str()),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "killed" && e["job"] == id.as_str()),
        "{events:#?}"
    );
    let leases = d.get("/v1/leases").json();
    assert_eq!(leases[0]["state"], "expired", "{leases}");
    let audit = d.audit();
    let expired = rows(&audit, "lease.expire", &lease);
    assert_eq!(expired.len(), 1, "{audit:#?}");
    assert_eq!(
        expired[0]["change"]["jobs_cancelled"],
        serde_json::json!([id])
    );
    assert!(cgroups_of(&id).is_empty());
    // An expired lease takes no more jobs.
    let o = d.ctl(&["run", "--lease", &lease, "--detach", "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(err_text(&o).contains("expired"), "{}", show(&o));

    // A job its expired lease is cancelling (it ignores TERM and has a long grace) can
    // no longer leave the lease: detaching it now would promise a job that gets killed.
    let policy = default_policy_with(
        &d,
        "slow-grace",
        "kill_grace = \"5s\"",
        "kill_grace = \"60s\"",
    );
    let lease = d.ctl_ok(&["lease", "take", "--ttl", "2s"]);
    let id = d.ctl_ok(&[
        "run",
        "--lease",
        &lease,
        "--policy-file",
        &policy,
        "--detach",
        "--",
        "sh",
        "-c",
        "trap '' TERM; while :; do sleep 0.1; done",
    ]);
    wait_until("the lease expired", LIVENESS, || {
        d.get("/v1/leases").json()[1]["state"] == "expired"
    });
    wait_until("the job was told to stop", LIVENESS, || {
        rows(&d.audit(), "job.kill", &id).len() == 1
    });
    assert_eq!(
        d.job(&id)["state"],
        "running",
        "TERM is ignored; the grace is 60 s"
    );
    let o = d.ctl(&["detach", &id]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(
        err_text(&o).contains(&format!("lease {lease}, which is expired")),
        "{}",
        show(&o)
    );
    let j = d.job(&id);
    assert_eq!(j["durable"], false, "{j}");
    assert_eq!(j["lease"], lease.as_str(), "{j}");
}

/// Submitters racing a lease's expiry: every job the daemon accepted under the lease is
/// cancelled with it, none keeps running under a lease that is gone.
#[test]
fn jobs_submitted_as_their_lease_expires_do_not_outlive_it() {
    let d = TestDaemon::start(&[]);
    for round in 0..3 {
        let lease = d.ctl_ok(&["lease", "take", "--ttl", "1s"]);
        let body = format!(r#"{{"command": ["sleep", "100"], "lease": "{lease}"}}"#);
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let sock = d.sock();
                let body = body.clone();
                std::thread::spawn(move || {
                    let mut accepted = 0;
                    loop {
                        let r = http(&sock, "POST", "/v1/jobs", Some(&body));
                        if r.status != 201 {
                            let msg = r.error(409);
                            assert!(msg.contains("expired"), "{msg}");
                            return accepted;
                        }
                        accepted += 1;
                    }
                })
            })
            .collect();
        let accepted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let under_lease = |d: &TestDaemon| -> Vec<Value> {
            d.jobs()
                .into_iter()
                .filter(|j| j["lease"] == lease.as_str())
                .collect()
        };
        assert_eq!(under_lease(&d).len(), accepted, "round {round}");
        assert!(accepted > 0, "round {round}: no job was accepted");
        let deadline = Instant::now() + LIVENESS;
        loop {
            let running: Vec<String> = under_lease(&d)
                .iter()
                .filter(|j| !is_terminal(j))
                .map(|j| str_of(j, "id").to_owned())
                .collect();
            if running.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: jobs outlive their expired lease {lease}: {running:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        for j in under_lease(&d) {
            assert!(
                j["state"] == "killed" || j["state"] == "failed",
                "round {round}: {j}"
            );
        }
    }
}

#[test]
fn detach_survives_the_client() {
    let d = TestDaemon::start(&[]);
    // A long TTL while the jobs are set up, then a short one that is never renewed.
    let lease = d.ctl_ok(&["lease", "take", "--ttl", "60s"]);
    let keep = d.ctl_ok(&["run", "--lease", &lease, "--detach", "--", "sleep", "100"]);
    let doomed = d.ctl_ok(&["run", "--lease", &lease, "--detach", "--", "sleep", "100"]);
    let out = d.ctl_ok(&["detach", &keep]);
    assert!(out.contains("durable now"), "{out}");
    let j = d.job(&keep);
    assert_eq!(j["durable"], true, "{j}");
    assert!(j.get("lease").is_none(), "{j}");
    let pid = j["pid"].as_i64().expect("a running job's pid") as i32;
    d.ctl_ok(&["lease", "renew", &lease, "--ttl", "2s"]);

    let j = d.wait_ended(&doomed);
    assert_eq!(j["state"], "killed", "{j}");
    assert!(str_of(&j, "reason").contains(&lease), "{j}");
    wait_until("the lease expired", LIVENESS, || {
        d.get("/v1/leases").json()[0]["state"] == "expired"
    });
    let j = d.job(&keep);
    assert_eq!(j["state"], "running", "the detached job was cancelled: {j}");
    assert_eq!(j["pid"], pid);
    assert!(alive(pid), "the detached job's init {pid} is gone");
    let events = d.events();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "detached" && e["job"] == keep.as_str()),
        "{events:#?}"
    );
    d.ctl_ok(&["kill", "--signal", "KILL", &keep]);
    assert_eq!(d.wait_ended(&keep)["state"], "killed");

    // Durability is the policy's to grant: offline-build does not.
    let o = d.ctl(&["run", "--policy", "offline-build", "--detach", "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(
        err_text(&o).contains("does not grant durable jobs"),
        "{}",
        show(&o)
    );
    let lease = d.ctl_ok(&["lease", "take", "--ttl", "60s"]);
    let bound = d.ctl_ok(&[
        "run",
        "--policy",
        "offline-build",
        "--lease",
        &lease,
        "--detach",
        "--",
        "sleep",
        "100",
    ]);
    let msg = d.post(&format!("/v1/jobs/{bound}/detach"), "").error(403);
    assert!(msg.contains("lifecycle.durable = false"), "{msg}");
    assert_eq!(d.job(&bound)["lease"], lease.as_str());
    let denials = d
        .audit()
        .into_iter()
        .filter(|r| {
            r["authority"]
                .as_str()
                .is_some_and(|a| a.starts_with("denied by lifecycle.durable"))
        })
        .count();
    assert_eq!(denials, 2, "both refusals are recorded");
    d.ctl_ok(&["lease", "release", &lease]);
    let j = d.wait_ended(&bound);
    assert_eq!(j["state"], "killed", "{j}");
    assert!(str_of(&j, "reason").contains("was released"), "{j}");

    // An attached client that dies: its job goes when the lease it ran under expires.
    let lease = d.ctl_ok(&["lease", "take", "--ttl", "2s"]);
    let mut client = Reaped(Some(
        d.ctl_cmd(&["run", "--lease", &lease, "--", "sleep", "100"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let mut id = String::new();
    wait_until("the attached job was submitted", LIVENESS, || {
        if let Some(j) = d.jobs().iter().find(|j| j["lease"] == lease.as_str()) {
            id = str_of(j, "id").to_owned();
        }
        !id.is_empty()
    });
    // SAFETY: signalling the agentctl this test started, by pid.
    unsafe { libc::kill(client.child().id() as i32, libc::SIGKILL) };
    let status = client.child().wait().unwrap();
    client.0 = None;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let j = d.wait_ended(&id);
    assert_eq!(j["state"], "killed", "{j}");
    let reason = str_of(&j, "reason");
    assert!(reason.contains(&lease) && reason.contains("expired"), "{j}");
    assert!(cgroups_of(&id).is_empty());
}
