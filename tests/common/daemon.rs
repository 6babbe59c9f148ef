//! A real `agentd serve` for the daemon tests: its own temp directory (socket, state,
//! runtime files, policies), raw HTTP over its socket, `agentctl` against it, and a
//! drop guard that kills every job the daemon knows, waits for them, checks that their
//! cgroups and runtime directories are gone, stops the daemon and reaps what it left.
#![allow(dead_code)]

use super::{AGENTD, cgroups_of, require_root};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const AGENTCTL: &str = env!("CARGO_BIN_EXE_agentctl");

/// The generous bound for anything that should happen "soon" on a shared, noisy machine.
pub const LIVENESS: Duration = Duration::from_secs(20);

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `within`.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTP answer, read whole.
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Http {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "answer {} is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// A JSON-lines body, parsed line by line.
    pub fn lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect()
    }

    /// Asserts an error answer: `status`, and a body `{"error": "..."}` with a
    /// non-empty message; returns the message.
    pub fn error(&self, status: u16) -> String {
        assert_eq!(
            self.status,
            status,
            "expected {status}, got {}: {}",
            self.status,
            self.text()
        );
        let v = self.json();
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"error\" string in {v}"))
            .to_owned();
        assert!(!msg.trim().is_empty(), "empty error message in {v}");
        assert_eq!(
            v.as_object().map(|o| o.len()),
            Some(1),
            "the error body has other fields: {v}"
        );
        msg
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a complete HTTP/1.1 answer (Content-Length, chunked, or read to EOF).
pub fn parse_response(raw: &[u8]) -> Http {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        let mut body = Vec::new();
        let mut at = 0;
        while let Some(eol) = rest[at..].windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&rest[at..at + eol]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            at += eol + 2;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
        body
    } else {
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(rest.len());
        rest[..len.min(rest.len())].to_vec()
    };
    Http {
        status,
        headers,
        body,
    }
}

/// Builds one HTTP/1.1 request with `Connection: close`.
pub fn build_request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    bytes
}

/// Sends raw bytes over a fresh connection and reads the answer until the daemon closes
/// it (bounded by LIVENESS).
pub fn raw_exchange(sock: &Path, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(LIVENESS))?;
    s.set_write_timeout(Some(LIVENESS))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// One request over the daemon's socket, answered in full.
pub fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Http {
    let req = build_request(method, path, body.map(str::as_bytes));
    let raw = raw_exchange(sock, &req)
        .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", sock.display()));
    parse_response(&raw)
}

/// One request as another user: a forked child drops to `uid`/`gid` with supplementary
/// `groups`, connects, sends `request` and copies the answer back through a pipe. The
/// child makes system calls only, so forking from the multithreaded test is safe.
pub fn raw_exchange_as(uid: u32, gid: u32, groups: &[u32], sock: &Path, request: &[u8]) -> Vec<u8> {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = sock.as_os_str().as_bytes();
    assert!(path.len() < addr.sun_path.len(), "socket path too long");
    for (i, b) in path.iter().enumerate() {
        addr.sun_path[i] = *b as libc::c_char;
    }
    let mut pipe = [-1; 2];
    // SAFETY: pipe2 fills the array.
    assert_eq!(
        unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) },
        0
    );
    // SAFETY: the child only makes system calls on data prepared above and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: system calls on local data, then _exit; no allocation, no locks.
        unsafe {
            libc::close(pipe[0]);
            let fail = |code: i32| -> ! { libc::_exit(code) };
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                fail(10);
            }
            if libc::setgid(gid) != 0 {
                fail(11);
            }
            if libc::setuid(uid) != 0 {
                fail(12);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                fail(13);
            }
            if libc::connect(
                s,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ) != 0
            {
                fail(14);
            }
            let mut off = 0;
            while off < request.len() {
                let n = libc::write(s, request[off..].as_ptr().cast(), request.len() - off);
                if n <= 0 {
                    fail(15);
                }
                off += n as usize;
            }
            let mut buf = [0u8; 16384];
            loop {
                let n = libc::read(s, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    break;
                }
                let mut w = 0;
                while w < n as usize {
                    let m = libc::write(pipe[1], buf[w..].as_ptr().cast(), n as usize - w);
                    if m <= 0 {
                        fail(16);
                    }
                    w += m as usize;
                }
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end; the read end becomes a File.
    unsafe { libc::close(pipe[1]) };
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(pipe[0]) };
    let mut out = Vec::new();
    f.read_to_end(&mut out).unwrap();
    let mut status = 0;
    // SAFETY: reaping the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the request as uid {uid} gid {gid} failed in its child (wait status {status:#x}; exit 10-16 = setgroups, setgid, setuid, socket, connect, write, pipe)"
    );
    out
}

/// Whether `pid` is a live process (not a zombie).
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, t)| t.split(' ').next())
        .unwrap_or("?");
    state != "Z" && state != "X"
}

/// Every cgroup directory whose name starts with `agentd-`, anywhere below
/// /sys/fs/cgroup (a few levels deep).
pub fn all_agentd_cgroups() -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, depth: usize, found: &mut BTreeSet<PathBuf>) {
        if depth > 6 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with("agentd-") {
                found.insert(p.clone());
            }
            walk(&p, depth + 1, found);
        }
    }
    let mut found = BTreeSet::new();
    walk(Path::new("/sys/fs/cgroup"), 0, &mut found);
    found
}

pub fn out_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn err_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Shows what an agentctl run printed, for assertion messages.
pub fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        out_text(o),
        err_text(o)
    )
}

/// A running `agentd serve` with a directory of its own.
pub struct TestDaemon {
    /// Removed (and checked removed) when the daemon is dropped.
    dir: Option<tempfile::TempDir>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// A command `agentd serve` runs under (`nsenter ...` into a test's network lab).
    wrapper: Vec<String>,
    child: Option<Child>,
    /// Every job init pid seen, reaped at the end (this test is their subreaper once
    /// their daemon is gone).
    pids: Mutex<BTreeSet<i32>>,
}

impl TestDaemon {
    /// Starts a daemon with its own directory; `extra` are more `agentd serve` flags.
    pub fn start(extra: &[&str]) -> TestDaemon {
        Self::start_with_env(extra, &[])
    }

    /// As `start`, with more environment variables for the daemon (AGENTD_FAULT).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> TestDaemon {
        Self::start_wrapped(&[], extra, env)
    }

    /// As `start_with_env`, with `agentd serve` run as the last argument of `wrapper`
    /// (e.g. `nsenter -t PID -n -m --`: the daemon in a test's own namespaces).
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str], env: &[(&str, &str)]) -> TestDaemon {
        require_root();
        // Job inits whose daemon is killed are re-parented to us, not to the host's
        // pid 1 (which reaps slowly here): we reap them by pid at the end.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
        // 0755 whatever the umask: job users and the unprivileged peers of the access
        // tests must be able to reach what is below it.
        let dir = tempfile::Builder::new()
            .prefix("agentd-daemon-test-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .tempdir()
            .expect("create a temp dir");
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        let mut d = TestDaemon {
            dir: Some(dir),
            args: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            child: None,
            pids: Mutex::new(BTreeSet::new()),
        };
        d.launch();
        d
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.as_ref().expect("not dropped").path().join(name)
    }

    pub fn sock(&self) -> PathBuf {
        self.path("sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    pub fn db(&self) -> PathBuf {
        self.state_dir().join("agentd.db")
    }

    /// The daemon's process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("the daemon runs").id() as i32
    }

    /// What the daemon wrote to stderr (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    fn try_launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "the daemon already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("daemon.log"))
            .map_err(|e| e.to_string())?;
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(AGENTD);
                c
            }
            None => Command::new(AGENTD),
        };
        cmd.arg("serve")
            .arg("--socket")
            .arg(self.sock())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--runtime-dir")
            .arg(self.path("run"))
            .args(&self.args)
            .env("AGENTD_POLICY_DIR", self.path("policies"))
            .env_remove("AGENTD_FAULT")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn agentd serve: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + LIVENESS;
        loop {
            if let Ok(raw) = raw_exchange(&self.sock(), &build_request("GET", "/v1/health", None))
                && parse_response(&raw).status == 200
            {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().ok().flatten() {
                self.child = None;
                return Err(format!(
                    "agentd serve exited ({status}) before answering; its log:\n{}",
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "agentd serve did not answer /v1/health within {LIVENESS:?}; its log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon (again) on the same directory and waits until it answers.
    pub fn launch(&mut self) {
        if let Err(e) = self.try_launch() {
            panic!("{e}");
        }
    }

    /// SIGKILL, by pid; reaps the daemon.
    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("the daemon runs");
        // SAFETY: signalling the daemon this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().expect("reap agentd serve");
    }

    /// SIGTERM, by pid; waits (bounded) for the daemon to exit.
    pub fn sigterm(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the daemon runs");
        // SAFETY: signalling the daemon this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + LIVENESS;
        loop {
            if let Some(s) = child.try_wait().expect("wait for agentd serve") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "agentd serve did not stop within {LIVENESS:?} of SIGTERM; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Http {
        http(&self.sock(), method, path, body)
    }

    pub fn get(&self, path: &str) -> Http {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &str) -> Http {
        self.request("POST", path, Some(body))
    }

    /// `agentctl --socket SOCK ARGS...`, not yet run.
    pub fn ctl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(AGENTCTL);
        cmd.arg("--socket")
            .arg(self.sock())
            .args(args)
            .env_remove("AGENTD_SOCKET")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `agentctl ARGS...` to its end.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_cmd(args).output().expect("run agentctl")
    }

    /// Runs `agentctl ARGS...`, asserts exit status 0, returns its trimmed stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert_eq!(o.status.code(), Some(0), "agentctl {args:?}: {}", show(&o));
        out_text(&o).trim().to_owned()
    }

    fn note(&self, job: &Value) {
        if let Some(pid) = job["pid"].as_i64() {
            self.pids.lock().unwrap().insert(pid as i32);
        }
    }

    /// GET /v1/jobs/ID (must exist).
    pub fn job(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/jobs/{id}"));
        assert_eq!(r.status, 200, "GET /v1/jobs/{id}: {}", r.text());
        let v = r.json();
        self.note(&v);
        v
    }

    /// GET /v1/jobs.
    pub fn jobs(&self) -> Vec<Value> {
        let r = self.get("/v1/jobs");
        assert_eq!(r.status, 200, "GET /v1/jobs: {}", r.text());
        let all = r.json().as_array().cloned().expect("a list of jobs");
        for j in &all {
            self.note(j);
        }
        all
    }

    /// `agentctl run --detach ARGS... -- COMMAND...`: the new job's id, once it runs.
    pub fn run_detached(&self, flags: &[&str], command: &[&str]) -> String {
        let mut args = vec!["run", "--detach"];
        args.extend_from_slice(flags);
        args.push("--");
        args.extend_from_slice(command);
        let id = self.ctl_ok(&args);
        assert_eq!(id.len(), 12, "not a job id: {id:?}");
        let j = self.job(&id);
        assert_eq!(j["state"], "running", "job {id} did not start: {j}");
        id
    }

    /// Waits (within LIVENESS) until job `id` has ended; returns it as it ended.
    pub fn wait_ended(&self, id: &str) -> Value {
        let deadline = Instant::now() + LIVENESS;
        loop {
            let r = self.get(&format!("/v1/jobs/{id}/wait?timeout=2s"));
            assert_eq!(r.status, 200, "wait for {id}: {}", r.text());
            let j = r.json();
            if is_terminal(&j) {
                return j;
            }
            self.note(&j);
            assert!(
                Instant::now() < deadline,
                "job {id} did not end within {LIVENESS:?}: {j}"
            );
        }
    }

    /// GET /v1/events (the history this daemon process holds).
    pub fn events(&self) -> Vec<Value> {
        let r = self.get("/v1/events");
        assert_eq!(r.status, 200, "{}", r.text());
        r.lines()
    }

    /// GET /v1/audit: every operation row.
    pub fn audit(&self) -> Vec<Value> {
        let r = self.get("/v1/audit");
        assert_eq!(r.status, 200, "{}", r.text());
        r.lines()
    }

    /// GET /v1/audit/verify.
    pub fn verify(&self) -> Value {
        let r = self.get("/v1/audit/verify");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Kills every job that has not ended (SIGKILL at once) and waits for all of them.
    /// Returns the problems found.
    fn kill_all_jobs(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let r = match raw_exchange(&self.sock(), &build_request("GET", "/v1/jobs", None)) {
            Ok(raw) => parse_response(&raw),
            Err(e) => return vec![format!("cannot list jobs: {e}")],
        };
        let jobs: Vec<Value> = serde_json::from_slice(&r.body).unwrap_or_default();
        for j in &jobs {
            self.note(j);
            let id = j["id"].as_str().unwrap_or_default();
            if !is_terminal(j) {
                let body = br#"{"signal":"KILL"}"#;
                let _ = raw_exchange(
                    &self.sock(),
                    &build_request("POST", &format!("/v1/jobs/{id}/kill"), Some(body)),
                );
            }
        }
        for j in &jobs {
            let id = j["id"].as_str().unwrap_or_default();
            let deadline = Instant::now() + LIVENESS;
            loop {
                let ended = raw_exchange(
                    &self.sock(),
                    &build_request("GET", &format!("/v1/jobs/{id}/wait?timeout=2s"), None),
                )
                .ok()
                .map(|raw| parse_response(&raw))
                .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
                .is_some_and(|v| is_terminal(&v));
                if ended {
                    break;
                }
                if Instant::now() > deadline {
                    problems.push(format!("job {id} did not end after SIGKILL"));
                    break;
                }
            }
            let left = cgroups_of(id);
            if !left.is_empty() {
                problems.push(format!("job {id} left cgroups behind: {left:?}"));
            }
        }
        problems
    }

    /// Reaps the job inits this test adopted as subreaper; they must be gone.
    fn reap(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for &pid in self.pids.lock().unwrap().iter() {
            let deadline = Instant::now() + LIVENESS;
            loop {
                // SAFETY: reaping a process by pid; ECHILD if it is not our child.
                let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
                if r != 0 {
                    break;
                }
                if Instant::now() > deadline {
                    problems.push(format!("job process {pid} still runs"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        problems
    }

    fn cleanup(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.child.is_none()
            && self.db().exists()
            && let Err(e) = self.try_launch()
        {
            problems.push(format!("cannot restart the daemon to clean up: {e}"));
        }
        if self.child.is_some() {
            problems.extend(self.kill_all_jobs());
            let mut child = self.child.take().unwrap();
            // SAFETY: signalling the daemon this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + LIVENESS;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        problems.push("the daemon did not stop on SIGTERM".into());
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        problems.extend(self.reap());
        // The daemon's group of job cgroups goes with its last job at a graceful stop.
        let group = agentd::daemon::sched::job_group_name(&self.state_dir());
        let left = super::cgroups_named(&group);
        if !left.is_empty() {
            problems.push(format!("the daemon's job group was left behind: {left:?}"));
            for dir in left {
                let _ = std::fs::remove_dir(dir);
            }
        }
        let jobs_dir = self.path("run").join("jobs");
        if let Ok(entries) = std::fs::read_dir(&jobs_dir) {
            let left: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            if !left.is_empty() {
                problems.push(format!("runtime directories left behind: {left:?}"));
            }
        }
        problems
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let mut problems = self.cleanup();
        let log = self.log();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                problems.push(format!("cannot remove {}: {e}", path.display()));
            }
        }
        if std::thread::panicking() {
            eprintln!("--- agentd serve log ---\n{log}");
            if !problems.is_empty() {
                eprintln!("cleanup problems: {problems:#?}");
            }
        } else if !problems.is_empty() {
            panic!("cleanup problems: {problems:#?}\n--- agentd serve log ---\n{log}");
        }
    }
}

/// Whether a job (JSON) is in a terminal state.
pub fn is_terminal(job: &Value) -> bool {
    matches!(
        job["state"].as_str(),
        Some("exited" | "killed" | "failed" | "lost")
    )
}

/// The job's directory in the cgroup2 tree (on a hybrid host, the one below
/// /sys/fs/cgroup/unified; on pure v2, its only one).
pub fn v2_dir(job: &Value) -> PathBuf {
    let dirs: Vec<&str> = job["cgroup"]
        .as_array()
        .expect("a running job has cgroup dirs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let pick = dirs
        .iter()
        .find(|d| d.contains("/unified/"))
        .or_else(|| {
            dirs.iter()
                .find(|d| Path::new(d).join("cgroup.freeze").exists())
        })
        .unwrap_or_else(|| panic!("no cgroup2 directory among {dirs:?}"));
    PathBuf::from(pick)
}

/// A child process killed (by pid) and reaped if the test fails before waiting for it.
pub struct Reaped(pub Option<Child>);

impl Reaped {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The string field `key` of `v` (it must be there).
pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// The rows of `audit` for `action` on `target`.
pub fn rows<'a>(audit: &'a [Value], action: &str, target: &str) -> Vec<&'a Value> {
    audit
        .iter()
        .filter(|r| r["action"] == action && r["target"] == target)
        .collect()
}

/// policies/default.toml with `from` replaced by `to`, written to DIR/NAME.toml.
pub fn default_policy_with(d: &TestDaemon, name: &str, from: &str, to: &str) -> String {
    let default = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies/default.toml"
    ))
    .unwrap();
    let changed = default.replace(from, to);
    assert_ne!(changed, default, "policies/default.toml has no {from}");
    let path = d.path(&format!("{name}.toml"));
    std::fs::write(&path, changed).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Waits until job `id` has written `text` to its stdout.
pub fn wait_for_output(d: &TestDaemon, id: &str, text: &str) {
    wait_until(&format!("job {id} printed {text:?}"), LIVENESS, || {
        d.get(&format!("/v1/jobs/{id}/logs")).text().contains(text)
    });
}
