//! Exit statuses (the job's own, 128+N, 125, 126, 127), the timeout, the report, and
//! fail-closed refusal with explicit downgrades.

mod common;
use common::*;

#[test]
fn exit_status_is_the_jobs_own() {
    let env = Env::new();
    assert_eq!(code(&env.sh(&[], "exit 7")), 7);
    assert_eq!(code(&env.sh(&[], "exit 0")), 0);
    let out = env.sh(&[], "kill -TERM $$");
    assert_eq!(code(&out), 128 + 15, "{}", stderr(&out));
}

#[test]
fn command_not_found_is_127_with_a_message() {
    let env = Env::new();
    let out = env.agentd(&["run", "--", "no-such-command-agentd"]);
    assert_eq!(code(&out), 127);
    let err = stderr(&out);
    assert!(
        err.contains("command not found: no-such-command-agentd") && err.lines().count() == 1,
        "{err}"
    );
    let out = env.agentd(&["run", "--", "/usr/bin/no-such-command"]);
    assert_eq!(code(&out), 127);
}

#[test]
fn command_not_executable_is_126_with_a_message() {
    let env = Env::new();
    let ws = env.workspace("ws", None);
    std::fs::write(ws.join("data.txt"), "not a program").unwrap();
    let out = env.agentd(&[
        "run",
        "--workspace",
        ws.to_str().unwrap(),
        "--",
        "./data.txt",
    ]);
    assert_eq!(code(&out), 126);
    assert!(
        stderr(&out).contains("cannot execute ./data.txt: Permission denied"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn timeout_terminates_the_job_and_says_so() {
    let env = Env::new();
    let report_path = env.path("r.json");
    let out = env.agentd(&[
        "run",
        "--timeout",
        "1s",
        "--report",
        report_path.to_str().unwrap(),
        "--",
        "sleep",
        "60",
    ]);
    assert_eq!(code(&out), 128 + 15, "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
    let r = report(&report_path);
    assert_eq!(r["exit"]["timed_out"], true);
    assert!(r["wall_time_sec"].as_f64().unwrap() < 10.0);
}

#[test]
fn timeout_kills_a_job_that_ignores_sigterm() {
    let env = Env::new();
    let out = env.sh(
        &["--timeout", "1s"],
        "trap '' TERM; while :; do sleep 1; done",
    );
    // init forwards SIGTERM; the shell ignores it; after the grace period init is killed.
    assert_eq!(code(&out), 128 + 9, "{}", stderr(&out));
}

#[test]
fn report_says_what_ran_and_what_was_enforced() {
    let env = Env::new();
    let ws = env.workspace("ws", None);
    let report_path = env.path("job.json");
    let out = env.agentd(&[
        "run",
        "--workspace",
        ws.to_str().unwrap(),
        "--policy",
        "ci-coding-agent",
        "--agent",
        "claude",
        "--model",
        "m-1",
        "--cpu",
        "1",
        "--report",
        report_path.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(code(&out), 3);
    let r = report(&report_path);
    assert_eq!(r["job_id"].as_str().unwrap().len(), 12);
    assert_eq!(r["command"], serde_json::json!(["sh", "-c", "exit 3"]));
    assert_eq!(r["policy"]["name"], "ci-coding-agent");
    assert_eq!(r["policy"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        (r["agent"].as_str(), r["model"].as_str()),
        (Some("claude"), Some("m-1"))
    );
    assert_eq!(r["exit"]["code"], 3);
    assert_eq!(r["exit"]["status"], 3);
    assert!(r["wall_time_sec"].as_f64().unwrap() > 0.0);
    assert!(
        r["usage"]["cpu_usec"].as_u64().is_some()
            && r["usage"]["peak_memory_bytes"].as_u64().unwrap() > 0
    );
    assert_eq!(r["usage"]["oom_kills"], 0);
    let e = &r["enforced"];
    assert_eq!(
        e["namespaces"],
        serde_json::json!(["user", "pid", "mount", "net", "ipc", "uts", "cgroup"])
    );
    assert!(e["cgroup"]["version"].as_str().unwrap().starts_with('v'));
    assert!(
        e["cgroup"]["limits_applied"].as_object().unwrap().len() >= 3,
        "{}",
        e["cgroup"]
    );
    assert!(e["landlock"]["abi"].as_u64().unwrap() >= 1);
    assert!(e["landlock"]["rights_dropped_best_effort"].is_array());
    assert_eq!(
        e["landlock"]["tcp_bind"],
        serde_json::json!([3000, 5000, 8000, 8080])
    );
    assert!(e["seccomp"]["instructions"].as_u64().unwrap() > 50);
    assert!(
        e["seccomp"]["denied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d == "bpf")
    );
    assert_eq!(e["seccomp"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(e["capabilities"], serde_json::json!([]));
    assert_eq!(e["no_new_privs"], true);
    assert_eq!(e["user"]["host_uid"], 65534);
    assert_eq!(e["user"]["workspace_idmapped"], true);
    assert_eq!(e["degraded"], serde_json::json!([]));
    let fs = e["filesystem"].as_array().unwrap();
    let usr = fs.iter().find(|g| g["path"] == "/usr").unwrap();
    assert_eq!(
        (usr["access"].as_str(), usr["rule"].as_str()),
        (Some("exec"), Some("ci-coding-agent:filesystem.exec[0]"))
    );
    assert!(fs.iter().any(|g| g["path"] == ws.to_str().unwrap()
        && g["access"] == "write"
        && g["rule"] == "command line:--workspace"));
}

#[test]
fn landlock_abi_the_kernel_lacks_is_refused_unless_downgrade_is_asked() {
    let env = Env::new();
    let p = env.policy("future", "[sandbox]\nlandlock_abi = 60\n[filesystem]\nexec = [\"/usr\", \"/bin\", \"/lib\", { path = \"/lib64\", optional = true }]\n");
    let out = env.agentd(&["run", "--policy", p.to_str().unwrap(), "--", "/bin/true"]);
    assert_eq!(code(&out), 125);
    let err = stderr(&out);
    assert!(
        err.contains("refused")
            && err.contains("Landlock ABI 60")
            && err.contains("--allow-degraded landlock"),
        "{err}"
    );

    let report_path = env.path("r.json");
    let out = env.agentd(&[
        "run",
        "--policy",
        p.to_str().unwrap(),
        "--allow-degraded",
        "landlock",
        "--report",
        report_path.to_str().unwrap(),
        "--",
        "/bin/true",
    ]);
    assert_ok(&out);
    let r = report(&report_path);
    assert_eq!(r["enforced"]["degraded"][0]["feature"], "landlock");
    assert!(
        r["enforced"]["degraded"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("ABI 60")
    );
}

#[test]
fn check_reports_the_host() {
    let out = std::process::Command::new(AGENTD)
        .args(["check", "--json"])
        .output()
        .unwrap();
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let probes = v["probes"].as_array().unwrap();
    for f in [
        "cgroup layout",
        "landlock",
        "seccomp filter",
        "userfaultfd",
        "SCHED_DEADLINE",
        "EEVDF custom slice",
        "namespaces",
        "overlayfs",
        "PSI",
    ] {
        assert!(
            probes.iter().any(|p| p["feature"] == f),
            "missing probe {f}"
        );
    }
    let landlock = probes.iter().find(|p| p["feature"] == "landlock").unwrap();
    assert_eq!(
        landlock["available"], true,
        "this suite needs Landlock: {landlock}"
    );
    let table = std::process::Command::new(AGENTD)
        .arg("check")
        .output()
        .unwrap();
    assert!(stdout(&table).contains("landlock"));
}

#[test]
fn signals_to_agentd_reach_the_job() {
    let env = Env::new();
    let ws = env.workspace("ws", None);
    let script = "trap 'echo got TERM; exit 3' TERM; touch ready; while :; do sleep 0.05; done";
    let child = env.start_until_ready(
        &ws,
        &[
            "run",
            "--workspace",
            ws.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let out = env.signal_and_wait(child, libc::SIGTERM);
    assert_eq!(stdout(&out), "got TERM\n");
    assert_eq!(code(&out), 3);
}

#[test]
fn init_reaps_orphans() {
    let env = Env::new();
    // Orphaned grandchildren exit while the main process still runs; init must reap them.
    let out = env.sh(
        &[],
        "for i in 1 2 3; do (sleep 0.05 &); done; sleep 0.5; ps -eo stat= | grep -c '^Z' || true",
    );
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), "0", "zombies inside the job");
}

#[test]
fn a_failed_setup_step_is_named_and_exits_125() {
    // A grant the job's user cannot reach: its parent directory is root's, mode 0700.
    // The bind mount runs as the job's user, so it fails, and says where.
    let env = Env::new();
    let locked = tempfile::Builder::new()
        .prefix("agentd-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(
        locked.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let inner = locked.path().join("inner");
    std::fs::create_dir(&inner).unwrap();
    let p = env.policy("locked", &format!("[filesystem]\nexec = [\"/usr\", \"/bin\", \"/lib\", {{ path = \"/lib64\", optional = true }}]\nread = [\"{}\"]\n", inner.display()));
    let out = env.agentd(&["run", "--policy", p.to_str().unwrap(), "--", "/bin/true"]);
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "sandbox setup failed: bind-mount {}: Permission denied",
            inner.display()
        )),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn ctrl_c_at_a_terminal_reaches_the_job_once_and_kill_is_forwarded() {
    // A pty makes agentd the terminal's foreground process group. Ctrl-C: the kernel
    // signals the whole group (the job included), so agentd must not forward a second
    // copy. `kill -INT agentd`: only agentd gets it, so it forwards.
    let env = Env::new();
    let harness = r#"
import os, pty, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
buf = b""
while b"ready" not in buf:
    buf += os.read(fd, 1024)
os.write(fd, b"\x03")
try:
    while os.read(fd, 1024):
        pass
except OSError:
    pass
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"#;
    let report_path = env.path("tty.json");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            harness,
            AGENTD,
            "run",
            "--report",
            report_path.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo ready; sleep 10",
        ])
        .env("AGENTD_RUNTIME_DIR", env.runtime_dir())
        .output()
        .unwrap();
    env.assert_clean();
    assert_eq!(
        stdout(&out).trim(),
        "130",
        "agentd's exit status: {}",
        stderr(&out)
    );
    let r = report(&report_path);
    assert_eq!(r["exit"]["signal"], 2);
    assert_eq!(
        r["signals_forwarded"],
        serde_json::json!([]),
        "a terminal's Ctrl-C was forwarded a second time"
    );

    let report_path = env.path("kill.json");
    let ws = env.workspace("ws", None);
    let args = [
        "run",
        "--workspace",
        ws.to_str().unwrap(),
        "--report",
        report_path.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "touch ready; exec sleep 10",
    ];
    let child = env.start_until_ready(&ws, &args);
    let out = env.signal_and_wait(child, libc::SIGINT);
    assert_eq!(code(&out), 130);
    assert_eq!(
        report(&report_path)["signals_forwarded"],
        serde_json::json!([2])
    );
}

/// The job's init is inside its cgroup before it runs any job code: born there by
/// clone3(CLONE_INTO_CGROUP) where the host has cgroup2 (the report says so), moved in
/// while it waits on a legacy v1 host. The kernel's evidence, two sides of it: from the
/// host, the job's process is in every cgroup made for the job; from inside, its cgroup
/// namespace (created by the init before it execs) has that cgroup as its root, so each
/// line of /proc/self/cgroup reads "/". A process moved in after the namespace was made
/// would see "/.." paths there.
#[test]
fn job_starts_inside_its_cgroup_and_the_report_says_how() {
    let env = Env::new();
    let ws = env.workspace("entry", None);
    let report_path = env.path("entry.json");
    let child = env.start_until_ready(
        &ws,
        &[
            "run",
            "--workspace",
            ws.to_str().unwrap(),
            "--report",
            report_path.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "cat /proc/self/cgroup; echo $$ > pid; echo \"$AGENTD_JOB_ID\" > ready.tmp; \
             mv ready.tmp ready; \
             while [ ! -e go ]; do sleep 0.05; done",
        ],
    );
    let job = std::fs::read_to_string(ws.join("ready")).unwrap();
    let dirs = cgroups_of(job.trim());
    assert!(!dirs.is_empty(), "no cgroup named for job {job}");
    for dir in &dirs {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().count() >= 2,
            "the job's shell and its init are not both in {}: {procs:?}",
            dir.display()
        );
    }
    std::fs::write(ws.join("go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_ok(&out);
    env.assert_clean();
    let lines = stdout(&out);
    assert!(
        !lines.is_empty() && lines.lines().all(|l| l.ends_with(":/")),
        "the job sees a cgroup other than its own namespace root:\n{lines}"
    );
    let r = report(&report_path);
    let host = agentd::cgroup::HostCgroups::detect().expect("cgroups detected");
    let want = match (host.layout, r["enforced"]["cgroup"]["version"].as_str()) {
        (agentd::cgroup::Layout::Unified, _) => "clone_into_cgroup",
        (_, Some("v1")) => "attach",
        (_, Some(v)) => {
            assert_eq!(v, "v1+v2", "{r}");
            "clone_into_cgroup+attach"
        }
        (_, None) => panic!("no cgroup version in the report: {r}"),
    };
    assert_eq!(r["enforced"]["cgroup"]["entry"], want, "{}", r["enforced"]);
    assert_eq!(
        r["enforced"]["cgroup"]["dirs"].as_array().map(Vec::len),
        Some(dirs.len()),
        "{}",
        r["enforced"]
    );
}
