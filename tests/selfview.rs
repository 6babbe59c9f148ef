//! /run/agentd/self: a daemon job reads its own state as files, and only its own.

mod common;

use common::daemon::{TestDaemon, show, wait_until};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// The cgroup file `name` of a job, from whichever of its directories has it.
fn cgroup_file(job: &Value, name: &str) -> Option<String> {
    job["cgroup"].as_array()?.iter().find_map(|d| {
        std::fs::read_to_string(Path::new(d.as_str()?).join(name))
            .ok()
            .map(|s| s.trim().to_owned())
    })
}

#[test]
fn a_job_reads_its_own_limits_usage_and_identity() {
    let d = TestDaemon::start(&[]);
    // The job waits for the view's first refresh, burns a little CPU, then shows it.
    let script = r#"
i=0; while [ ! -s /run/agentd/self/json ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
x=0; while [ $x -lt 200000 ]; do x=$((x+1)); done
sleep 1.5
for f in identity/job_id identity/agent limits/memory limits/pids usage/cpu_usec usage/memory_bytes usage/memory_headroom_bytes usage/pids state lease/id grants/network sched/class; do
  printf '%s=%s\n' "$f" "$(cat /run/agentd/self/$f)"
done
echo "entries=$(ls /run/agentd/self | tr '\n' ' ')"
cat /run/agentd/self/json > json.out
touch done
sleep 30
"#;
    let ws = d.path("ws");
    std::fs::create_dir(&ws).unwrap();
    std::os::unix::fs::chown(&ws, Some(1000), Some(1000)).unwrap();
    let id = d.run_detached(
        &[
            "--workspace",
            ws.to_str().unwrap(),
            "--memory",
            "96M",
            "--pids",
            "64",
            "--agent",
            "viewer",
        ],
        &["sh", "-c", script],
    );
    wait_until("the job has read its view", Duration::from_secs(30), || {
        ws.join("done").exists()
    });
    let log = d.ctl_ok(&["logs", &id]);
    let job = d.job(&id);
    let field = |name: &str| -> String {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in:\n{log}"))
            .to_owned()
    };
    assert_eq!(field("identity/job_id"), id);
    assert_eq!(field("identity/agent"), "viewer");
    assert_eq!(field("state"), "running");
    assert_eq!(field("sched/class"), "fair");
    assert_eq!(field("lease/id"), "none", "a detached job is durable");
    assert!(field("grants/network").contains("mode none"), "{log}");
    // Limits as the cgroup carries them.
    let memory: u64 = field("limits/memory").parse().unwrap();
    assert_eq!(memory, 96 << 20);
    let cg_memory = cgroup_file(&job, "memory.max")
        .or_else(|| cgroup_file(&job, "memory.limit_in_bytes"))
        .expect("the job's memory limit file");
    assert_eq!(cg_memory, memory.to_string(), "{job}");
    assert_eq!(field("limits/pids"), "64");
    assert_eq!(cgroup_file(&job, "pids.max").as_deref(), Some("64"));
    // Usage from the cgroup: the loop's CPU time, memory below the limit, its processes.
    assert!(field("usage/cpu_usec").parse::<u64>().unwrap() > 0, "{log}");
    // Each file is one fact; the two memory files may come from two refreshes (the
    // shell reads them one after the other), so their sum is checked in the JSON,
    // which is one refresh's snapshot.
    let used: u64 = field("usage/memory_bytes").parse().unwrap();
    let headroom: u64 = field("usage/memory_headroom_bytes").parse().unwrap();
    assert!(used > 0 && headroom > 0 && headroom < memory, "{log}");
    let pids: u64 = field("usage/pids").parse().unwrap();
    assert!((2..64).contains(&pids), "{log}");
    // The fixed set of entries: the job's own state, nothing else.
    assert_eq!(
        field("entries").trim(),
        "denials grants identity json lease limits objects pressure sched state usage",
        "{log}"
    );
    let all: Value = serde_json::from_str(&std::fs::read_to_string(ws.join("json.out")).unwrap())
        .expect("the view's json parses");
    assert_eq!(all["identity"]["job_id"], id.as_str());
    assert_eq!(all["limits"]["memory"], memory);
    let json_used = all["usage"]["memory_bytes"]
        .as_u64()
        .expect("usage.memory_bytes");
    let json_headroom = all["usage"]["memory_headroom_bytes"]
        .as_u64()
        .expect("usage.memory_headroom_bytes");
    assert!(json_used > 0, "{all}");
    assert_eq!(json_used + json_headroom, memory, "{all}");
    d.ctl_ok(&["kill", "--signal", "KILL", &id]);
    d.wait_ended(&id);
    assert!(
        !d.path("run").join("sockets").join(&id).exists(),
        "the view went with the job"
    );
}

#[test]
fn a_denied_job_reads_why_and_sees_no_other_job() {
    let d = TestDaemon::start(&[]);
    let other = d.run_detached(&[], &["sleep", "60"]);
    // No lab needed: a name no pattern matches is refused before any lookup.
    let script = format!(
        r#"
curl -sS --max-time 5 http://blocked.example/ >/dev/null
i=0; while [ ! -s /run/agentd/self/denials ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
echo "denials:"; cat /run/agentd/self/denials
echo "total=$(cat /run/agentd/self/json | grep -c denied_total)"
if grep -rq {other} /run/agentd/self; then echo "sees-other"; else echo "alone"; fi
"#
    );
    let out = d.ctl(&[
        "run",
        "--net",
        "proxy",
        "--allow-domain",
        "allowed.example",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let text = common::daemon::out_text(&out);
    assert!(
        text.contains("http blocked.example:80: no network.allow_domains pattern of policy default matches blocked.example:80 [default:network.allow_domains]"),
        "{}",
        show(&out)
    );
    assert!(text.contains("alone"), "{}", show(&out));
    d.ctl_ok(&["kill", "--signal", "KILL", &other]);
    d.wait_ended(&other);
}

#[test]
fn throttling_and_oom_kills_become_events() {
    let d = TestDaemon::start(&[]);
    let hog = d.run_detached(
        &["--cpu", "0.1"],
        &["sh", "-c", "sleep 1.2; while :; do :; done"],
    );
    let oom = d.run_detached(
        &["--memory", "32M"],
        &[
            "sh",
            "-c",
            "sleep 1.2; python3 -c 'x = bytearray(256 << 20)'; sleep 30",
        ],
    );
    let seen = |kind: &str, job: &str| {
        d.events()
            .iter()
            .find(|e| e["kind"] == kind && e["job"] == job)
            .map(|e| e["detail"].as_str().unwrap_or("").to_owned())
    };
    wait_until(
        "a throttled event for the CPU hog",
        Duration::from_secs(20),
        || seen("throttled", &hog).is_some(),
    );
    assert!(
        seen("throttled", &hog)
            .unwrap()
            .contains("by its CPU limit"),
        "{:?}",
        seen("throttled", &hog)
    );
    wait_until("an oom-kill event", Duration::from_secs(20), || {
        seen("oom-kill", &oom).is_some()
    });
    assert!(
        seen("oom-kill", &oom)
            .unwrap()
            .contains("OOM-killed at its memory limit of 33554432 bytes"),
        "{:?}",
        seen("oom-kill", &oom)
    );
    for id in [&hog, &oom] {
        d.ctl_ok(&["kill", "--signal", "KILL", id]);
        d.wait_ended(id);
    }
}

#[test]
fn an_agentd_run_job_reads_its_own_state_too() {
    let env = common::Env::new();
    let script = r#"
i=0; while [ ! -s /run/agentd/self/json ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
[ "$(cat /run/agentd/self/identity/job_id)" = "$AGENTD_JOB_ID" ] && echo same-id
echo "memory=$(cat /run/agentd/self/limits/memory)"
echo "pids=$(cat /run/agentd/self/usage/pids)"
curl -sS --max-time 5 http://blocked.example/ >/dev/null
i=0; while [ ! -s /run/agentd/self/denials ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
cat /run/agentd/self/denials
touch /run/agentd/self/x 2>/dev/null || echo read-only
"#;
    let out = env.sh(
        &[
            "--memory",
            "80M",
            "--net",
            "proxy",
            "--allow-domain",
            "allowed.example",
        ],
        script,
    );
    let text = common::stdout(&out);
    assert_eq!(common::code(&out), 0, "{text}{}", common::stderr(&out));
    assert!(text.contains("same-id"), "{text}");
    assert!(text.contains(&format!("memory={}", 80u64 << 20)), "{text}");
    let pids: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("pids="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    // The view as last written: at its first write the job may still be only its init.
    assert!(pids >= 1, "{text}");
    assert!(
        text.contains("http blocked.example:80: no network.allow_domains pattern"),
        "{text}"
    );
    assert!(text.contains("read-only"), "{text}");
    let views = env.runtime_dir().join("views");
    let left: Vec<_> = std::fs::read_dir(&views)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "views left behind: {left:?}");
}

/// A follower that stops reading is told how many events it missed when it reads again;
/// meanwhile the daemon answers everyone else (it never waits for a follower).
#[test]
fn a_slow_event_follower_is_told_how_many_it_missed_and_the_daemon_goes_on() {
    use std::io::{Read, Write};
    let d = TestDaemon::start(&[]);
    let mut follower = std::os::unix::net::UnixStream::connect(d.sock()).unwrap();
    follower
        .write_all(&common::daemon::build_request(
            "GET",
            "/v1/events?follow=true",
            None,
        ))
        .unwrap();
    // It reads nothing while the daemon makes 4,000 events (each lease taken and
    // released): more than its socket buffer and its queue (1,024) hold.
    let take = || -> String {
        let r = d.post("/v1/leases", r#"{"ttl": "60s"}"#);
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_owned()
    };
    for _ in 0..2000 {
        let id = take();
        let r = d.request("POST", &format!("/v1/leases/{id}/release"), None);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Now it reads: what it had, then one `lagged` line with the count, then live ones.
    follower
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 65536];
    let text = |seen: &[u8]| String::from_utf8_lossy(seen).into_owned();
    while !text(&seen).contains(r#""kind":"lagged""#) {
        let n = follower.read(&mut buf).expect("the follower's stream");
        assert!(n > 0, "the stream ended before a lagged line");
        seen.extend_from_slice(&buf[..n]);
    }
    let all = text(&seen);
    let at = all.find(r#""kind":"lagged""#).unwrap();
    let line = &all[all[..at].rfind('{').unwrap()..];
    let line = &line[..line.find('}').unwrap() + 1];
    let lagged: serde_json::Value = serde_json::from_str(line).unwrap();
    let missed: u64 = lagged["detail"]
        .as_str()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{lagged}"));
    assert!(missed > 0 && missed < 4000, "{lagged}");
    // The stream is live again after the gap: a new event reaches it.
    let last = take();
    while !text(&seen).contains(&last) {
        let n = follower.read(&mut buf).expect("the follower's stream");
        assert!(n > 0, "the stream ended");
        seen.extend_from_slice(&buf[..n]);
    }
    let r = d.request("POST", &format!("/v1/leases/{last}/release"), None);
    assert_eq!(r.status, 200, "{}", r.text());
}
