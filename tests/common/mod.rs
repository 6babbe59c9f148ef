//! Shared helpers for the integration tests: they run the real `agentd` binary as root
//! on the real kernel and assert from inside the job.
#![allow(dead_code)]

pub mod daemon;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const AGENTD: &str = env!("CARGO_BIN_EXE_agentd");

/// Fails (never skips) when a test cannot do its job without root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "agentd's integration tests create namespaces and cgroups and must run as root (euid is {euid})"
    );
}

/// A test's private runtime directory and scratch space, removed on drop.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        require_root();
        // 0755 whatever the umask: the job's unprivileged user must be able to reach
        // files the tests put below it.
        let dir = tempfile::Builder::new()
            .prefix("agentd-test-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .tempdir()
            .expect("create a temp dir");
        Env { dir }
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// A fresh directory for use as a workspace, owned by `owner` (uid, gid).
    pub fn workspace(&self, name: &str, owner: Option<(u32, u32)>) -> PathBuf {
        let ws = self.dir.path().join(name);
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::set_permissions(&ws, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        if let Some((u, g)) = owner {
            std::os::unix::fs::chown(&ws, Some(u), Some(g)).unwrap();
        }
        ws
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `agentd run ARGS...` with this test's runtime directory.
    pub fn agentd(&self, args: &[&str]) -> Output {
        let out = Command::new(AGENTD)
            .args(args)
            .env("AGENTD_RUNTIME_DIR", self.runtime_dir())
            .env("AGENTD_POLICY_DIR", self.dir.path().join("policies"))
            .env_remove("AGENTD_FAULT")
            .output()
            .expect("run agentd");
        self.assert_clean();
        out
    }

    pub fn agentd_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(AGENTD);
        cmd.args(args)
            .env("AGENTD_RUNTIME_DIR", self.runtime_dir())
            .env("AGENTD_POLICY_DIR", self.dir.path().join("policies"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run agentd");
        self.assert_clean();
        out
    }

    /// `agentd run [extra...] -- sh -c SCRIPT`.
    pub fn sh(&self, extra: &[&str], script: &str) -> Output {
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", script]);
        self.agentd(&args)
    }

    /// Writes a policy file and returns its path.
    pub fn policy(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    /// No job directory may outlive `agentd run`.
    pub fn assert_clean(&self) {
        let jobs = self.runtime_dir().join("jobs");
        if let Ok(entries) = std::fs::read_dir(&jobs) {
            let left: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            assert!(left.is_empty(), "runtime directories left behind: {left:?}");
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Asserts the job ran and exited 0, showing its output otherwise.
pub fn assert_ok(o: &Output) {
    assert_eq!(
        code(o),
        0,
        "job failed\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

/// The job id agentd names in its messages ("job 0123456789ab: ...").
pub fn job_id_in(text: &str) -> Option<String> {
    let i = text.find("job ")?;
    let id: String = text[i + 4..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    (id.len() == 12).then_some(id)
}

/// Every cgroup directory named for this job, in any hierarchy.
pub fn cgroups_of(job: &str) -> Vec<PathBuf> {
    cgroups_named(&format!("agentd-{job}"))
}

/// Every cgroup directory with this name, in any hierarchy.
pub fn cgroups_named(name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    fn walk(dir: &Path, name: &str, depth: usize, found: &mut Vec<PathBuf>) {
        if depth > 8 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if p.file_name()
                    .is_some_and(|n| n == std::ffi::OsStr::new(name))
                {
                    found.push(p.clone());
                }
                walk(&p, name, depth + 1, found);
            }
        }
    }
    walk(Path::new("/sys/fs/cgroup"), name, 0, &mut found);
    found
}

pub fn report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read report {}: {e}", path.display()));
    serde_json::from_str(&text).expect("report is JSON")
}

impl Env {
    /// Starts `agentd ARGS` in the background (stdout piped) and waits until the job
    /// has created `ready` in `workspace`, i.e. until the job itself runs.
    pub fn start_until_ready(&self, workspace: &Path, args: &[&str]) -> std::process::Child {
        let mut child = Command::new(AGENTD)
            .args(args)
            .env("AGENTD_RUNTIME_DIR", self.runtime_dir())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run agentd");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !workspace.join("ready").exists() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the job never started");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child
    }

    /// Sends `signal` to a background agentd and collects its output.
    pub fn signal_and_wait(&self, child: std::process::Child, signal: i32) -> Output {
        // SAFETY: signalling the agentd process this test started.
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = child.wait_with_output().expect("wait for agentd");
        self.assert_clean();
        out
    }
}
