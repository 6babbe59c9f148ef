//! `agentd serve` on the real kernel: who may use the socket (and that refusals are
//! recorded), bad requests answered with 4xx and a message, and many clients, some of
//! them stalled, that do not stall the daemon. See tests/daemon.rs for the setup.

mod common;

use common::daemon::*;
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

#[test]
fn unauthorized_peer_is_refused_and_recorded() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let d = TestDaemon::start(&[]);
    let meta = std::fs::metadata(d.sock()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
    // Let anyone connect, so that the daemon's own check is what refuses.
    std::fs::set_permissions(d.sock(), std::fs::Permissions::from_mode(0o666)).unwrap();

    let raw = raw_exchange_as(
        65534,
        65533,
        &[],
        &d.sock(),
        &build_request("GET", "/v1/jobs", None),
    );
    let msg = parse_response(&raw).error(403);
    assert!(msg.contains("uid 65534"), "{msg}");
    let submit = br#"{"command":["true"],"durable":true}"#;
    let raw = raw_exchange_as(
        65534,
        65533,
        &[],
        &d.sock(),
        &build_request("POST", "/v1/jobs", Some(submit)),
    );
    let msg = parse_response(&raw).error(403);
    assert!(msg.contains("uid 65534"), "{msg}");
    assert!(d.jobs().is_empty(), "a refused submit created a job");

    let o = Command::new(AGENTCTL)
        .arg("--socket")
        .arg(d.sock())
        .arg("ps")
        .uid(65534)
        .gid(65533)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(err_text(&o).contains("uid 65534"), "{}", show(&o));

    let audit = d.audit();
    let denials: Vec<&Value> = audit
        .iter()
        .filter(|r| {
            r["requester"]["uid"] == 65534
                && r["authority"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("denied") && a.contains("uid 65534"))
        })
        .collect();
    assert_eq!(denials.len(), 3, "one row per refused request: {audit:#?}");
    assert!(denials.iter().any(|r| r["action"] == "api POST /v1/jobs"));
    assert_eq!(d.verify()["ok"], true);
    let events = d.events();
    assert!(events.iter().any(|e| e["kind"] == "denied"), "{events:?}");

    // A daemon whose group is nogroup lets its members in.
    let g = TestDaemon::start(&["--group", "nogroup"]);
    let meta = std::fs::metadata(g.sock()).unwrap();
    assert_eq!(meta.gid(), 65534, "the socket belongs to the group");
    assert_eq!(meta.mode() & 0o777, 0o660);
    let raw = raw_exchange_as(
        65534,
        65534,
        &[],
        &g.sock(),
        &build_request("GET", "/v1/jobs", None),
    );
    let r = parse_response(&raw);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!([]));
    // A member by a supplementary group is let in too (the daemon reads the peer's
    // groups from /proc while its pidfd shows it is still the same process) ...
    let raw = raw_exchange_as(
        65533,
        65533,
        &[65534],
        &g.sock(),
        &build_request("GET", "/v1/leases", None),
    );
    let r = parse_response(&raw);
    assert_eq!(r.status, 200, "{}", r.text());
    // ... and a non-member that can connect is refused.
    std::fs::set_permissions(g.sock(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let raw = raw_exchange_as(
        65533,
        65533,
        &[],
        &g.sock(),
        &build_request("GET", "/v1/jobs", None),
    );
    let msg = parse_response(&raw).error(403);
    assert!(
        msg.contains("uid 65533") && msg.contains("nogroup"),
        "{msg}"
    );
    let audit = g.audit();
    assert_eq!(
        audit
            .iter()
            .filter(|r| str_of(r, "authority").starts_with("denied"))
            .count(),
        1,
        "{audit:#?}"
    );
}

#[test]
fn bad_requests_get_4xx_with_a_message() {
    let d = TestDaemon::start(&[]);
    let before = all_agentd_cgroups();

    let msg = d
        .post("/v1/jobs", r#"{"command": ["true"], "durable": tr"#)
        .error(400);
    assert!(msg.contains("JSON"), "{msg}");
    let msg = d.post("/v1/jobs", "[1, 2").error(400);
    assert!(msg.contains("JSON"), "{msg}");

    // Over 1 MiB: written from a thread, since the daemon may answer before it read
    // it all.
    let big = format!(
        r#"{{"command": ["true"], "durable": true, "env": ["A={}"]}}"#,
        "x".repeat((1 << 20) + 16)
    );
    let req = build_request("POST", "/v1/jobs", Some(big.as_bytes()));
    let mut s = UnixStream::connect(d.sock()).unwrap();
    s.set_read_timeout(Some(LIVENESS)).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&req);
    });
    let mut raw = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut raw);
    drop(s);
    writer.join().unwrap();
    let msg = parse_response(&raw).error(413);
    assert!(msg.contains("larger than"), "{msg}");

    let msg = d
        .post(
            "/v1/jobs",
            r#"{"command": ["true"], "durable": true, "frobnicate": 1}"#,
        )
        .error(400);
    assert!(msg.contains("frobnicate"), "{msg}");
    let msg = d
        .post(
            "/v1/jobs/0123456789ab/kill",
            r#"{"signal": "TERM", "nice": 1}"#,
        )
        .error(400);
    assert!(msg.contains("nice"), "{msg}");

    let unknown = "0123456789ab";
    for (method, path) in [
        ("GET", format!("/v1/jobs/{unknown}")),
        ("POST", format!("/v1/jobs/{unknown}/kill")),
        ("GET", format!("/v1/jobs/{unknown}/wait")),
        ("POST", format!("/v1/jobs/{unknown}/freeze")),
        ("GET", format!("/v1/jobs/{unknown}/logs")),
    ] {
        let body = (method == "POST").then_some("{}");
        let msg = d.request(method, &path, body).error(404);
        assert!(msg.contains(unknown), "{method} {path}: {msg}");
    }
    d.get("/v1/nothing-here").error(404);

    let msg = d.post("/v1/jobs", r#"{"command": ["true"]}"#).error(400);
    assert!(msg.contains("owner"), "{msg}");
    let msg = d
        .post("/v1/jobs", r#"{"command": [], "durable": true}"#)
        .error(400);
    assert!(msg.contains("command"), "{msg}");

    let msg = d
        .post(
            "/v1/jobs",
            r#"{"command": ["true"], "durable": true, "cpu": "-1"}"#,
        )
        .error(400);
    assert!(msg.contains("cpu"), "{msg}");
    let msg = d
        .post(
            "/v1/jobs",
            r#"{"command": ["true"], "durable": true, "policy_toml": "[limits]\nmemory = \"lots\"\n"}"#,
        )
        .error(400);
    assert!(msg.contains("limits.memory"), "{msg}");
    // Nothing was created for any of them.
    assert!(d.jobs().is_empty(), "{:?}", d.jobs());
    assert_eq!(all_agentd_cgroups(), before, "a refused job left cgroups");
    let jobs_dir = d.path("run").join("jobs");
    assert!(
        std::fs::read_dir(&jobs_dir).map_or(true, |mut e| e.next().is_none()),
        "a refused job left a runtime directory"
    );
    let audit = d.audit();
    assert!(
        audit
            .iter()
            .all(|r| r["action"] != "job.submit" || str_of(r, "authority").starts_with("denied")),
        "{audit:#?}"
    );
    // The daemon still works.
    let o = d.ctl(&["run", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}

#[test]
fn two_hundred_clients_do_not_stall_the_daemon() {
    let d = TestDaemon::start(&[]);
    let stalled: Vec<UnixStream> = (0..200)
        .map(|_| {
            let mut s = UnixStream::connect(d.sock()).unwrap();
            s.write_all(b"GET /v1/jo").unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    let sock = d.sock();
    let threads: Vec<_> = (0..200)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let r = http(&sock, "GET", "/v1/jobs", None);
                (r.status, r.text())
            })
        })
        .collect();
    for t in threads {
        let (status, text) = t.join().unwrap();
        assert_eq!(status, 200, "{text}");
        assert!(text.starts_with('['), "{text}");
    }
    let o = d.ctl(&["run", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        started.elapsed() < LIVENESS,
        "200 requests and a job took {:?}",
        started.elapsed()
    );
    // The stalled connections were held open all along (the daemon gives a request's
    // headers 10 s) ...
    if started.elapsed() < std::time::Duration::from_secs(8) {
        for s in &stalled {
            s.set_nonblocking(true).unwrap();
            let r = std::io::Read::read(&mut &*s, &mut [0u8; 1]);
            assert!(
                r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
                "a stalled connection was answered or closed early: {r:?}"
            );
            s.set_nonblocking(false).unwrap();
        }
    }
    // ... and are closed once that time is up, so they cannot hold their slots forever.
    for mut s in stalled {
        s.set_read_timeout(Some(LIVENESS)).unwrap();
        let mut rest = Vec::new();
        let r = std::io::Read::read_to_end(&mut s, &mut rest);
        assert!(
            r.is_ok(),
            "a stalled connection was still open after {LIVENESS:?}: {r:?}"
        );
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "{rest}"
        );
    }
    assert_eq!(d.get("/v1/health").json()["ok"], true);
}

/// What a member of the socket's group (not root) may do: run jobs under its own lease
/// and in its own workspace, not under another uid's lease or in another's workspace.
#[test]
fn a_group_member_runs_jobs_within_its_own_leases_and_workspaces() {
    use std::os::unix::fs::MetadataExt;
    let d = TestDaemon::start(&["--group", "nogroup"]);
    let as_member = |method: &str, path: &str, body: Option<&str>| -> Http {
        let req = build_request(method, path, body.map(str::as_bytes));
        parse_response(&raw_exchange_as(65534, 65534, &[], &d.sock(), &req))
    };
    let r = as_member("POST", "/v1/leases", Some(r#"{"ttl": "60s"}"#));
    assert_eq!(r.status, 201, "{}", r.text());
    let lease = r.json();
    assert_eq!(lease["owner_uid"], 65534, "{lease}");
    let lease = str_of(&lease, "id").to_owned();

    // A job in a workspace the member owns: it runs as that uid and writes there.
    let ws = d.path("member-ws");
    std::fs::create_dir(&ws).unwrap();
    std::os::unix::fs::chown(&ws, Some(65534), Some(65534)).unwrap();
    let body = format!(
        r#"{{"command": ["sh", "-c", "id -u > out"], "lease": "{lease}", "workspace": "{}"}}"#,
        ws.display()
    );
    let r = as_member("POST", "/v1/jobs", Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = str_of(&r.json(), "id").to_owned();
    let j = d.wait_ended(&id);
    assert_eq!(j["state"], "exited", "{j}");
    assert_eq!(j["exit"]["code"], 0, "{j}");
    assert_eq!(j["requester"]["uid"], 65534, "{j}");
    let out = ws.join("out");
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "65534");
    assert_eq!(std::fs::metadata(&out).unwrap().uid(), 65534);

    // Not in a workspace that belongs to someone else (root) ...
    let theirs = d.path("root-ws");
    std::fs::create_dir(&theirs).unwrap();
    let body = format!(
        r#"{{"command": ["true"], "lease": "{lease}", "workspace": "{}"}}"#,
        theirs.display()
    );
    let msg = as_member("POST", "/v1/jobs", Some(&body)).error(403);
    assert!(msg.contains("belongs to uid 0"), "{msg}");
    // ... nor under root's lease.
    let roots = d.ctl_ok(&["lease", "take", "--ttl", "60s"]);
    let body = format!(r#"{{"command": ["true"], "lease": "{roots}"}}"#);
    let msg = as_member("POST", "/v1/jobs", Some(&body)).error(403);
    assert!(
        msg.contains(&format!("lease {roots} belongs to uid 0")),
        "{msg}"
    );
    let msg = as_member("POST", &format!("/v1/leases/{roots}/release"), Some("")).error(403);
    assert!(msg.contains("uid 65534"), "{msg}");

    // Policies are the operator's: no inline policy, no policy by path.
    let body = format!(
        r#"{{"command": ["true"], "lease": "{lease}", "policy_toml": "[user]\nuid = 1000\n"}}"#
    );
    let msg = as_member("POST", "/v1/jobs", Some(&body)).error(403);
    assert!(
        msg.contains("inline policies (policy_toml) are for root"),
        "{msg}"
    );
    let body = format!(r#"{{"command": ["true"], "lease": "{lease}", "policy": "/etc/passwd"}}"#);
    let msg = as_member("POST", "/v1/jobs", Some(&body)).error(403);
    assert!(msg.contains("a policy given by path is for root"), "{msg}");
    // A job root started is not the member's to kill, freeze or detach.
    let roots_job = d.ctl_ok(&["run", "--detach", "--", "sleep", "60"]);
    for action in ["kill", "freeze", "detach"] {
        let msg = as_member("POST", &format!("/v1/jobs/{roots_job}/{action}"), Some("")).error(403);
        assert!(
            msg.contains("only that user or root may change it"),
            "{action}: {msg}"
        );
    }
    assert_eq!(d.job(&roots_job)["state"], "running");
    d.ctl_ok(&["kill", "--signal", "KILL", &roots_job]);
    d.wait_ended(&roots_job);

    assert_eq!(d.jobs().len(), 2, "only the allowed job and root's exist");
    let audit = d.audit();
    for rule in ["policy source", "job ownership"] {
        assert!(
            audit.iter().any(|r| r["requester"]["uid"] == 65534
                && str_of(r, "authority").starts_with(&format!("denied by {rule}"))),
            "no refusal by {rule}: {audit:#?}"
        );
    }
    assert!(
        audit.iter().any(|r| r["requester"]["uid"] == 65534
            && str_of(r, "authority").starts_with("denied by workspace ownership")),
        "{audit:#?}"
    );
    let r = as_member("POST", &format!("/v1/leases/{lease}/release"), Some(""));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// `--max-connections`: a connection over the bound is closed at once, without an
/// answer; a slot frees up when a connection ends.
#[test]
fn connections_over_the_bound_are_closed_at_once() {
    let d = TestDaemon::start(&["--max-connections", "5"]);
    let stalled: Vec<UnixStream> = (0..5)
        .map(|_| {
            let mut s = UnixStream::connect(d.sock()).unwrap();
            s.write_all(b"GET /v1/jo").unwrap();
            s
        })
        .collect();
    // The five are being served (the daemon accepts in order), so a sixth is closed.
    let raw = raw_exchange(&d.sock(), &build_request("GET", "/v1/health", None));
    assert!(
        raw.as_ref().map_or(true, |r| r.is_empty()),
        "a connection over the bound was answered: {:?}",
        raw.map(|r| String::from_utf8_lossy(&r).into_owned())
    );
    drop(stalled);
    wait_until("a slot is free again", LIVENESS, || {
        raw_exchange(&d.sock(), &build_request("GET", "/v1/health", None))
            .is_ok_and(|r| !r.is_empty() && parse_response(&r).status == 200)
    });
}

/// Regions belong to their creator: a group member may make and delete its own, not
/// publish, revoke or delete root's; each refusal is a row.
#[test]
fn a_group_member_changes_only_its_own_regions() {
    let d = TestDaemon::start(&["--group", "nogroup"]);
    let as_member = |method: &str, path: &str, body: Option<&str>| -> Http {
        let req = build_request(method, path, body.map(str::as_bytes));
        parse_response(&raw_exchange_as(65534, 65534, &[], &d.sock(), &req))
    };
    d.ctl_ok(&["region", "create", "roots", "--zero", "1M"]);
    for (method, path) in [
        ("DELETE", "/v1/regions/roots"),
        ("POST", "/v1/regions/roots/publish"),
        ("POST", "/v1/regions/roots/revoke"),
    ] {
        let msg = as_member(method, path, Some("")).error(403);
        assert!(msg.contains("belongs to uid 0"), "{method} {path}: {msg}");
    }
    assert_eq!(d.get("/v1/regions/roots").status, 200, "still there");
    let audit = d.audit();
    for action in ["region.delete", "region.publish", "region.revoke"] {
        assert!(
            audit.iter().any(|r| r["action"] == action
                && r["authority"]
                    .as_str()
                    .is_some_and(|a| a.contains("denied"))),
            "no refusal row for {action}"
        );
    }
    let r = as_member(
        "POST",
        "/v1/regions",
        Some(r#"{"name": "mine", "zero": "1M"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = as_member("DELETE", "/v1/regions/mine", Some(""));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["region"]["owner_uid"], 65534);
    assert_eq!(d.get("/v1/regions/mine").status, 404);
}
