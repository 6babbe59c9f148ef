//! Bad input: every case gets a clear message naming file, line and key (or the flag),
//! exit status 125, and nothing is created.

mod common;
use common::*;

fn refused(env: &Env, args: &[&str]) -> String {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    if !args.contains(&"--") {
        full.extend_from_slice(&["--", "/bin/true"]);
    }
    let out = env.agentd(&full);
    assert_eq!(
        code(&out),
        125,
        "expected 125 for {args:?}\nstderr: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(
        err.starts_with("agentd: "),
        "message should start with 'agentd: ': {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(
        !env.runtime_dir().join("jobs").exists()
            || std::fs::read_dir(env.runtime_dir().join("jobs"))
                .unwrap()
                .next()
                .is_none()
    );
    err
}

fn policy_error(text: &str, line: usize, key: &str, words: &str) {
    let env = Env::new();
    let p = env.policy("bad", text);
    let err = refused(&env, &["--policy", p.to_str().unwrap()]);
    let want = format!("{}:{line}: {key}:", p.display());
    assert!(err.contains(&want), "expected '{want}' in: {err}");
    assert!(err.contains(words), "expected '{words}' in: {err}");
}

#[test]
fn unknown_key() {
    policy_error(
        "[limits]\ncpu = 1\nmemroy = \"1G\"\n",
        3,
        "memroy",
        "unknown field",
    );
}

#[test]
fn unknown_table() {
    policy_error(
        "name = \"x\"\n\n[limit]\ncpu = 1\n",
        3,
        "limit",
        "unknown field",
    );
}

#[test]
fn wrong_type() {
    policy_error("[limits]\npids = \"many\"\n", 2, "syntax", "invalid type");
    policy_error(
        "[filesystem]\nread = \"/usr\"\n",
        2,
        "syntax",
        "invalid type",
    );
}

#[test]
fn relative_path() {
    policy_error(
        "[filesystem]\nexec = [\"usr/bin\"]\n",
        2,
        "filesystem.exec",
        "relative",
    );
}

#[test]
fn nonexistent_path() {
    policy_error(
        "[filesystem]\nread = [\n  \"/usr\",\n  \"/nonexistent/agentd\",\n]\n",
        4,
        "filesystem.read",
        "does not exist",
    );
}

#[test]
fn impossible_limits() {
    policy_error("[limits]\ncpu = 0\n", 2, "limits.cpu", "not a usable limit");
    policy_error("[limits]\ncpu = 4096\n", 2, "limits.cpu", "exceeds");
    policy_error(
        "[limits]\nmemory = \"1K\"\n",
        2,
        "limits.memory",
        "too little",
    );
    policy_error(
        "[limits]\nmemory = \"lots\"\n",
        2,
        "limits.memory",
        "expected a size",
    );
    policy_error("[limits]\npids = 1\n", 2, "limits.pids", "too few");
    policy_error(
        "[limits]\ntimeout = \"0s\"\n",
        2,
        "limits.timeout",
        "timeout of 0",
    );
    policy_error(
        "[limits]\ntimeout = \"soon\"\n",
        2,
        "limits.timeout",
        "duration",
    );
    policy_error(
        "[network]\ntcp_bind = [70000]\n",
        2,
        "network.tcp_bind",
        "not a TCP port",
    );
    policy_error(
        "[user]\nuid = 0\n",
        2,
        "user.uid",
        "never runs as host root",
    );
}

#[test]
fn bad_flags() {
    let env = Env::new();
    for (flag, value, words) in [
        ("--memory", "lots", "expected a size"),
        ("--memory", "1K", "too little"),
        ("--cpu", "-1", "not a usable limit"),
        ("--cpu", "half", "expected a number of CPUs"),
        ("--pids", "x", "expected a number"),
        ("--pids", "1", "too few"),
        ("--timeout", "0", "timeout of 0"),
        ("--env", "1BAD=x", "is not KEY=VALUE"),
        ("--allow-degraded", "everything", "unknown feature"),
    ] {
        let err = refused(&env, &[flag, value]);
        assert!(
            err.contains(&format!("command line: {flag}:")),
            "{flag}: {err}"
        );
        assert!(
            err.contains(words),
            "{flag} {value}: expected '{words}' in {err}"
        );
    }
}

#[test]
fn missing_workspace() {
    let env = Env::new();
    let err = refused(&env, &["--workspace", "/nonexistent/agentd-ws"]);
    assert!(
        err.contains("--workspace") && err.contains("no such directory"),
        "{err}"
    );
}

#[test]
fn workspace_is_a_file() {
    let env = Env::new();
    let f = env.path("file");
    std::fs::write(&f, "x").unwrap();
    let err = refused(&env, &["--workspace", f.to_str().unwrap()]);
    assert!(err.contains("is not a directory"), "{err}");
}

#[test]
fn unknown_policy_name() {
    let env = Env::new();
    let err = refused(&env, &["--policy", "no-such-policy"]);
    assert!(
        err.contains("no policy named \"no-such-policy\"")
            && err.contains("default, ci-coding-agent, offline-build"),
        "{err}"
    );
}

#[test]
fn unreadable_policy_file() {
    let env = Env::new();
    let err = refused(&env, &["--policy", "/nonexistent/p.toml"]);
    assert!(
        err.contains("/nonexistent/p.toml") && err.contains("cannot read the policy file"),
        "{err}"
    );
}

#[test]
fn no_command_and_unknown_flag() {
    let env = Env::new();
    let out = env.agentd(&["run"]);
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(stderr(&out).contains("COMMAND"), "{}", stderr(&out));
    let out = env.agentd(&["run", "--frobnicate", "--", "true"]);
    assert_eq!(code(&out), 125);
    assert!(stderr(&out).contains("--frobnicate"), "{}", stderr(&out));
}

#[test]
fn report_directory_missing() {
    let env = Env::new();
    let err = refused(&env, &["--report", "/nonexistent/dir/job.json"]);
    assert!(err.contains("--report"), "{err}");
}

#[test]
fn operator_policy_dir_takes_precedence_and_is_validated() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("policies")).unwrap();
    std::fs::write(
        env.path("policies/default.toml"),
        "[sandbox]\nhostname = \"bad host\"\n",
    )
    .unwrap();
    let err = refused(&env, &[]);
    assert!(
        err.contains("policies/default.toml:2: sandbox.hostname:"),
        "{err}"
    );
}

#[test]
fn a_runtime_directory_the_jobs_user_cannot_pass_through_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    // The operator's directory above the runtime directory: only root may pass.
    let private = env.path("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let run = private.join("run");
    let out = env.agentd_with_env(
        &["run", "--", "/bin/true"],
        &[("AGENTD_RUNTIME_DIR", run.to_str().unwrap())],
    );
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("below {} (mode 0700)", private.display()))
            && err.contains("chmod o+x"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let jobs: Vec<_> = std::fs::read_dir(run.join("jobs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(jobs.is_empty(), "left behind: {jobs:?}");
    // Passable, the same job runs.
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o711)).unwrap();
    let out = env.agentd_with_env(
        &["run", "--", "/bin/true"],
        &[("AGENTD_RUNTIME_DIR", run.to_str().unwrap())],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}
