//! Object classes: accounting that returns to zero, quotas that refuse before the
//! daemon's memory grows, and fields that never leave the daemon.

mod common;

use common::daemon::{
    Http, TestDaemon, build_request, default_policy_with, out_text, parse_response,
    raw_exchange_as, show, str_of, wait_until,
};
use serde_json::Value;
use std::time::Duration;

/// A job's HTTP client for its own socket (python: no curl needed for PUT bodies and
/// raw statuses). `call(method, path, body, send_body=True)` prints nothing; returns
/// (status, body). With send_body False only the headers go (the quota is checked
/// before the body is read, so the answer comes without it).
const CLIENT_PY: &str = r#"
import json, os, socket, sys
def call(method, path, body=b"", send_body=True, length=None):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(os.environ["AGENTD_SOCKET"])
    n = len(body) if length is None else length
    head = f"{method} {path} HTTP/1.1\r\nHost: job\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n".encode()
    try:
        s.sendall(head + (body if send_body else b""))
    except OSError:
        pass
    out = b""
    while True:
        try:
            b = s.recv(65536)
        except OSError:
            break
        if not b:
            break
        out += b
    s.close()
    head, _, rest = out.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head else 0
    if b"transfer-encoding: chunked" in head.lower():
        body, data = b"", rest
        while data:
            size, _, data = data.partition(b"\r\n")
            k = int(size, 16)
            if k == 0:
                break
            body, data = body + data[:k], data[k + 2:]
        rest = body
    return status, rest
"#;

fn python_job(script: &str) -> String {
    format!("{CLIENT_PY}\n{script}")
}

#[test]
fn a_secret_in_tool_call_arguments_never_leaves_the_daemon() {
    let d = TestDaemon::start(&["--group", "nogroup"]);
    const SECRET: &str = "sk-SECRET-7f3a9c1e55d0";
    let script = python_job(
        r#"
# The secret comes from a file: in the command line it would be the operator's to see.
secret = open("secret.txt").read()
args = {"token": secret}
st, body = call("POST", "/v1/self/tool-calls", json.dumps({"name": "http.get", "status": "ok", "args": args}).encode())
print("record", st, body.decode())
# A malformed call that carries the secret: the error must not echo it.
st, body = call("POST", "/v1/self/tool-calls", json.dumps({"name": "x", "status": "ok", "args": args, "extra": secret}).encode())
print("malformed", st, body.decode())
st, body = call("GET", "/v1/self/tool-calls")
print("agent-sees", st, body.decode())
st, body = call("GET", "/v1/self")
print("self", st, body.decode())
st, body = call("GET", "/v1/self/objects")
print("objects", st, body.decode())
import hashlib, time
print("digest", hashlib.sha256(json.dumps(args, separators=(",", ":")).encode()).hexdigest())
time.sleep(1.5)
view = ""
for root, dirs, files in os.walk("/run/agentd/self"):
    for f in files:
        view += open(os.path.join(root, f)).read()
print("view", "leaks" if secret in view else "clean", len(view))
print("view-tool-calls", open("/run/agentd/self/objects/tool_call").read().replace("\n", " "))
open("done", "w").close()
time.sleep(60)
"#,
    );
    let ws = d.path("ws");
    std::fs::create_dir(&ws).unwrap();
    std::os::unix::fs::chown(&ws, Some(65534), Some(65534)).unwrap();
    std::fs::write(ws.join("secret.txt"), SECRET).unwrap();
    std::os::unix::fs::chown(ws.join("secret.txt"), Some(65534), Some(65534)).unwrap();
    let id = d.run_detached(
        &["--workspace", ws.to_str().unwrap()],
        &["python3", "-u", "-c", &script],
    );
    wait_until(
        "the job recorded its calls",
        Duration::from_secs(60),
        || ws.join("done").exists(),
    );
    let log = d.get(&format!("/v1/jobs/{id}/logs")).text();
    let line = |what: &str| -> String {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("{what} ")))
            .unwrap_or_else(|| panic!("{what} in:\n{log}\n{}", d.log()))
            .to_owned()
    };
    // The job's own side: recorded (digest by the daemon), the error quotes nothing,
    // it sees its calls without the arguments or their size, and its view is clean.
    assert!(line("record").starts_with("201 "), "{log}");
    let digest = line("digest");
    let recorded: Value = serde_json::from_str(line("record").trim_start_matches("201 ")).unwrap();
    assert_eq!(recorded["args_digest"], digest.as_str(), "{log}");
    assert!(line("malformed").starts_with("400 "), "{log}");
    let agent_sees: Value =
        serde_json::from_str(line("agent-sees").trim_start_matches("200 ")).unwrap();
    assert_eq!(agent_sees[0]["name"], "http.get", "{log}");
    assert!(
        agent_sees[0].get("args_bytes").is_none(),
        "operator only: {log}"
    );
    assert!(line("view").starts_with("clean "), "{log}");
    assert!(line("view-tool-calls").starts_with("live 1 "), "{log}");
    assert!(!log.contains(SECRET), "the job's output: {log}");

    // The operator's side, as a member of the socket's group (not root): the job, the
    // list, the classes, the events, the audit; and root's view of the same.
    let as_member = |path: &str| -> Http {
        let req = build_request("GET", path, None);
        parse_response(&raw_exchange_as(65534, 65534, &[], &d.sock(), &req))
    };
    let job = as_member(&format!("/v1/jobs/{id}"));
    assert_eq!(job.status, 200, "{}", job.text());
    let call = &job.json()["tool_calls"][0];
    assert_eq!(call["args_digest"], digest.as_str(), "{call}");
    assert!(call["args_bytes"].as_u64().unwrap() > 0, "{call}");
    assert!(call.get("args").is_none(), "{call}");
    for path in [
        format!("/v1/jobs/{id}"),
        "/v1/jobs".to_owned(),
        "/v1/classes".to_owned(),
        format!("/v1/classes?job={id}"),
        "/v1/events".to_owned(),
        "/v1/audit".to_owned(),
        format!("/v1/jobs/{id}/logs"),
        format!("/v1/jobs/{id}/logs?stream=stderr"),
    ] {
        let r = as_member(&path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(!r.text().contains(SECRET), "{path} carries the secret");
        let r = d.get(&path);
        assert!(
            !r.text().contains(SECRET),
            "{path} (root) carries the secret"
        );
    }
    d.ctl_ok(&["kill", "--signal", "KILL", &id]);
    d.wait_ended(&id);
    // After the end too: the stored job, the daemon's log, every file of its state.
    assert!(!d.get(&format!("/v1/jobs/{id}")).text().contains(SECRET));
    assert!(!d.log().contains(SECRET), "the daemon's log");
    let mut leaked = Vec::new();
    for entry in walk(&d.state_dir()) {
        if std::fs::read(&entry)
            .map(|b| b.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()))
            .unwrap_or(false)
        {
            leaked.push(entry);
        }
    }
    assert!(
        leaked.is_empty(),
        "state files carry the secret: {leaked:?}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_job_over_its_quota_is_refused_and_the_daemon_memory_stays_flat() {
    let d = TestDaemon::start(&[]);
    let policy = default_policy_with(
        &d,
        "small",
        "tool_calls = 10000\ntool_call_bytes = \"16M\"\ncontext_segments = 1024\ncontext_bytes = \"64M\"",
        "tool_calls = 3\ntool_call_bytes = \"16M\"\ncontext_segments = 8\ncontext_bytes = \"1M\"",
    );
    let script = python_job(
        r#"
import time
for i in range(4):
    st, body = call("PUT", f"/v1/self/context/seg{i}", b"x" * 200_000)
    print("store", i, st)
st, body = call("GET", "/v1/self/context/seg2")
print("read", st, len(body), body[:3].decode())
# Past the bytes quota, with the body sent: refused, typed.
st, body = call("PUT", "/v1/self/context/big", b"y" * 300_000)
print("over", st, body.decode())
# Replacing a segment with a smaller one fits.
st, body = call("PUT", "/v1/self/context/seg0", b"z" * 10)
print("replace", st)
# A flood of over-quota stores that claim 1 MiB each: each refused from its headers.
refused = 0
for i in range(300):
    st, _ = call("PUT", f"/v1/self/context/flood{i}", b"", send_body=False, length=1_000_000)
    refused += st == 429
print("flood-refused", refused)
for i in range(5):
    st, body = call("POST", "/v1/self/tool-calls", json.dumps({"name": "t", "status": "ok"}).encode())
    print("call", i, st)
time.sleep(1.5)
print("denials", open("/run/agentd/self/denials").read().count("quota"))
print("objects", open("/run/agentd/self/objects/context_segment").read().replace("\n", " "))
open("done", "w").close()
time.sleep(60)
"#,
    );
    let ws = d.path("ws");
    std::fs::create_dir(&ws).unwrap();
    std::os::unix::fs::chown(&ws, Some(65534), Some(65534)).unwrap();
    let before_kib = rss_kib(d.pid());
    let id = d.run_detached(
        &[
            "--policy-file",
            &policy,
            "--workspace",
            ws.to_str().unwrap(),
        ],
        &["python3", "-u", "-c", &script],
    );
    wait_until("the job tried its stores", Duration::from_secs(120), || {
        ws.join("done").exists()
    });
    let after_kib = rss_kib(d.pid());
    let log = d.get(&format!("/v1/jobs/{id}/logs")).text();
    let line = |what: &str| -> String {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("{what} ")))
            .unwrap_or_else(|| panic!("{what} in:\n{log}\n{}", d.log()))
            .to_owned()
    };
    for i in 0..4 {
        assert!(log.contains(&format!("store {i} 201")), "{log}");
    }
    assert_eq!(line("read"), "200 200000 xxx", "{log}");
    let over = line("over");
    assert!(over.starts_with("429 "), "{log}");
    let body: Value = serde_json::from_str(over.trim_start_matches("429 ")).unwrap();
    assert_eq!(body["refusal"]["kind"], "quota-exceeded", "{body}");
    assert_eq!(body["refusal"]["class"], "context_segment", "{body}");
    assert_eq!(body["refusal"]["bound"], "bytes", "{body}");
    assert_eq!(body["refusal"]["limit"], 1 << 20, "{body}");
    // (The file keeps the default policy's name.)
    assert_eq!(
        body["refusal"]["rule"], "default:quotas.context_bytes",
        "{body}"
    );
    assert!(
        str_of(&body, "error").contains("quotas.context_bytes"),
        "{body}"
    );
    assert_eq!(line("replace"), "201", "{log}");
    assert_eq!(line("flood-refused"), "300", "{log}");
    let calls: Vec<String> = log
        .lines()
        .filter_map(|l| l.strip_prefix("call "))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        calls,
        ["0 201", "1 201", "2 201", "3 429", "4 429"],
        "{log}"
    );
    assert!(line("denials").parse::<u32>().unwrap() >= 3, "{log}");
    assert!(line("objects").starts_with("live 4 "), "{log}");
    // Each refusal is an operation row with the rule.
    let audit = d.audit();
    let refused = |action: &str| {
        audit
            .iter()
            .filter(|r| r["action"] == action && r["target"] == id.as_str())
            .filter(|r| str_of(r, "authority").starts_with("denied by refused:"))
            .count()
    };
    assert_eq!(refused("context.store"), 301, "{}", d.log());
    assert_eq!(refused("tool-call.record"), 2);
    // The daemon's memory: 300 refused 1 MiB stores did not become 300 MiB, nor the
    // refused 300 kB one a copy. Bounded generously (the allocator, the rows).
    assert!(
        after_kib < before_kib + 16 * 1024,
        "the daemon grew from {before_kib} KiB to {after_kib} KiB"
    );
    // What the job holds is charged to it, and goes when it ends.
    let classes = d.get(&format!("/v1/classes?job={id}")).json();
    let held = |class: &str| -> u64 {
        classes["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["class"] == class)
            .map_or(0, |j| j["bytes"].as_u64().unwrap())
    };
    assert!(held("context_segment") > 600_000, "{classes}");
    assert!(held("context_segment") < 1 << 20, "{classes}");
    d.ctl_ok(&["kill", "--signal", "KILL", &id]);
    d.wait_ended(&id);
    let classes = d.get(&format!("/v1/classes?job={id}")).json();
    let segments = classes["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["class"] == "context_segment")
        .cloned()
        .unwrap_or_else(|| panic!("{classes}"));
    assert_eq!(
        (segments["live"].as_u64(), segments["bytes"].as_u64()),
        (Some(0), Some(0)),
        "{segments}"
    );
    assert_eq!(
        segments["allocs_total"], 4,
        "a replacement is the same object: {segments}"
    );
}

#[test]
fn class_accounting_returns_to_zero_after_a_thousand_jobs() {
    // Ended jobs are not kept in memory, so every job's objects must go when it does.
    let d = TestDaemon::start(&["--keep-ended", "0"]);
    // Each job stores a context segment and records a tool call through its socket
    // (one curl process: two requests).
    let job = r#"curl -sS -o /dev/null --unix-socket "$AGENTD_SOCKET" -X PUT --data-binary ctx http://job/v1/self/context/c --next -o /dev/null --unix-socket "$AGENTD_SOCKET" -H 'Content-Type: application/json' -d '{"name":"t","status":"ok","args":{"k":"v"}}' http://job/v1/self/tool-calls"#;
    const JOBS: usize = 1000;
    const AT_ONCE: usize = 25;
    let mut ids = Vec::new();
    for _ in 0..JOBS / AT_ONCE {
        let batch: Vec<String> = (0..AT_ONCE)
            .map(|_| {
                let body =
                    serde_json::json!({"command": ["sh", "-c", job], "durable": true}).to_string();
                let r = d.post("/v1/jobs", &body);
                assert_eq!(r.status, 201, "{}", r.text());
                str_of(&r.json(), "id").to_owned()
            })
            .collect();
        for id in &batch {
            let j = d.wait_ended(id);
            assert_eq!(j["exit"]["code"], 0, "{j}\n{}", d.log());
        }
        ids.extend(batch);
    }
    let classes = d.get("/v1/classes").json();
    let class = |name: &str| -> Value {
        classes["classes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {classes}"))
    };
    for name in ["job", "tool_call", "context_segment", "operation"] {
        let c = class(name);
        assert_eq!(
            (c["live"].as_u64(), c["bytes"].as_u64()),
            (Some(0), Some(0)),
            "{c}"
        );
        assert!(c["high_water_live"].as_u64().unwrap() > 0, "{c}");
    }
    assert!(class("job")["allocs_total"].as_u64().unwrap() >= JOBS as u64);
    assert!(class("tool_call")["allocs_total"].as_u64().unwrap() >= JOBS as u64);
    assert!(class("context_segment")["allocs_total"].as_u64().unwrap() >= JOBS as u64);
    assert_eq!(
        classes["jobs"],
        serde_json::json!([]),
        "no job holds anything"
    );
    // The ring holds a bounded number of events, whatever came before.
    let events = class("event");
    assert!(events["live"].as_u64().unwrap() <= 4096, "{events}");
    // agentctl shows the same, as a table and the export policy.
    let table = d.ctl_ok(&["classes"]);
    assert!(
        table.lines().next().unwrap().starts_with("CLASS"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("tool_call ")),
        "{table}"
    );
    let fields = d.ctl(&["classes", "--fields"]);
    assert!(fields.status.success(), "{}", show(&fields));
    let text = out_text(&fields);
    let row = text
        .lines()
        .find(|l| l.starts_with("tool_call"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.trim_end().ends_with("args"), "{row}");
    // Every job is in the store still (pruned from memory, not lost).
    assert_eq!(d.job(ids.last().unwrap())["state"], "exited");
}
