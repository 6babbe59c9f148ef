//! The creation pipeline unwinds: a failure forced at each step (test builds only,
//! AGENTD_FAULT=STEP) leaves no cgroup, mount, directory or process behind.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime};

const STEPS: &[&str] = &[
    // parent side, before start
    "after-runtime-dir",
    "after-cgroup",
    "after-guards",
    "after-publish",
    // between clone and release: the child exists and must be killed
    "after-clone",
    // child side: the sandbox is half-built in the child's namespaces
    "after-handshake",
    "after-mounts",
    "after-landlock",
];

#[test]
fn fault_injection_is_compiled_in() {
    let env = Env::new();
    let out = env.agentd_with_env(
        &["run", "--", "/bin/true"],
        &[("AGENTD_FAULT", "after-cgroup")],
    );
    assert_eq!(
        code(&out),
        125,
        "this suite must be built with --features fault-injection (README's test command)"
    );
}

#[test]
fn a_failure_at_each_step_leaves_nothing_behind() {
    let env = Env::new();
    let ws = env.workspace("ws", None);
    for step in STEPS {
        let marker = format!("agentd-fault-marker-{step}");
        let out = env.agentd_with_env(
            &[
                "run",
                "--workspace",
                ws.to_str().unwrap(),
                "--",
                "sleep",
                "123",
                &marker,
            ],
            &[("AGENTD_FAULT", step)],
        );
        assert_eq!(code(&out), 125, "{step}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("injected fault"), "{step}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{step}: {err}");
        let job = job_id_in(&err).unwrap_or_else(|| panic!("{step}: no job id in {err}"));

        // No cgroup in any hierarchy (a v1/v2 cgroup with tasks could not be removed).
        assert_eq!(
            cgroups_of(&job),
            Vec::<std::path::PathBuf>::new(),
            "{step}: cgroups left"
        );
        // No runtime directory (checked by Env after every run) and no mount of it.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&job), "{step}: mount left: {mounts}");
        // No process: the job's command never ran, nor anything of the half-built sandbox.
        let ps = std::process::Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap();
        assert!(
            ps.stdout.is_empty(),
            "{step}: process left: {}",
            stdout(&ps)
        );
    }
}

/// Starts `agentd run ARGS` in the background and waits until its job directory
/// satisfies `ready`; returns agentd, the directory and the job id.
fn start_and_wait(
    env: &Env,
    args: &[&str],
    fault: Option<&str>,
    ready: impl Fn(&Path, &str) -> bool,
) -> (Child, PathBuf, String) {
    // The killed agentd's children (the job's init) are orphaned: make this test their
    // reaper, so they are not left as zombies on the host's init.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let mut cmd = Command::new(AGENTD);
    cmd.args(args).env("AGENTD_RUNTIME_DIR", env.runtime_dir());
    if let Some(f) = fault {
        cmd.env("AGENTD_FAULT", f);
    }
    let mut agentd = cmd.spawn().unwrap();
    let jobs = env.runtime_dir().join("jobs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let found = std::fs::read_dir(&jobs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path());
        if let Some(dir) = found {
            let id = dir.file_name().unwrap().to_str().unwrap().to_owned();
            if ready(&dir, &id) {
                return (agentd, dir, id);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    agentd.kill().unwrap();
    agentd.wait().unwrap();
    panic!("the job never got ready");
}

/// The children of `pid` (the job's init, a netns helper), read from /proc.
fn children_of(pid: u32) -> Vec<i32> {
    let parent = pid.to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": the ppid is the second field after the comm.
            stat.rsplit_once(") ")
                .and_then(|(_, tail)| tail.split(' ').nth(1))
                == Some(parent.as_str())
        })
        .collect()
}

/// Reaps `orphans`, adopted by this test (a child subreaper) when their agentd died;
/// fails if they do not die, since their parent-death signal must kill them.
fn reap_orphans(orphans: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for &pid in orphans {
        loop {
            // SAFETY: reaping an adopted child by its pid.
            let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            if r != 0 {
                break; // reaped, or not ours (already gone)
            }
            assert!(
                Instant::now() < deadline,
                "process {pid} outlived its agentd"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Kills agentd itself (no cleanup runs; its job dies by the parent-death signal), ages
/// the job directory past the sweep's grace period, and checks the next run sweeps it.
fn kill_then_sweep(env: &Env, mut agentd: Child, job: &Path, id: &str) {
    let orphans = children_of(agentd.id());
    agentd.kill().unwrap();
    agentd.wait().unwrap();
    // The job died with it (parent-death signal), before anything swept it: its cgroups
    // are empty.
    reap_orphans(&orphans);
    for dir in cgroups_of(id) {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        assert!(
            procs.trim().is_empty(),
            "the job outlived its agentd: {} holds {procs}",
            dir.display()
        );
    }
    assert!(
        !cgroups_of(id).is_empty(),
        "expected the killed run's cgroups to remain until swept"
    );
    std::fs::File::open(job)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(60))
        .unwrap();
    let out = env.agentd(&["run", "--", "/bin/true"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains(&format!("removed job {id}")),
        "{}",
        stderr(&out)
    );
    assert_eq!(cgroups_of(id), Vec::<PathBuf>::new());
    assert!(!job.exists());
}

#[test]
fn leftovers_of_a_killed_agentd_are_swept_by_the_next_run() {
    let env = Env::new();
    // Ready once the job runs: its init and `sleep` are both in its cgroup.
    let running = |_: &Path, id: &str| {
        cgroups_of(id).iter().any(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .count()
                >= 2
        })
    };
    let (agentd, job, id) = start_and_wait(&env, &["run", "--", "sleep", "300"], None, running);
    kill_then_sweep(&env, agentd, &job, &id);
    let sleepers = stdout(
        &Command::new("pgrep")
            .args(["-x", "sleep"])
            .output()
            .unwrap(),
    );
    for pid in sleepers.lines() {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(!cg.contains(&id), "the killed run's job survived: {pid}");
    }
}

#[test]
fn cgroups_of_an_agentd_killed_before_publish_are_swept_too() {
    let env = Env::new();
    let (agentd, job, id) = start_and_wait(
        &env,
        &["run", "--", "/bin/true"],
        Some("hang-after-cgroup"),
        |_, id| !cgroups_of(id).is_empty(),
    );
    assert!(
        !job.join("state.json").exists(),
        "the hang is before publish"
    );
    kill_then_sweep(&env, agentd, &job, &id);
}

/// agentd prints to its stderr while the job runs (an egress denial here); a reader of
/// that stderr that went away must not kill agentd before it cleans up (EPIPE, not a
/// panic-abort that leaves the cgroups and the runtime directory behind).
#[test]
fn a_closed_stderr_does_not_stop_the_cleanup() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let env = Env::new();
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created; the read end is closed at once.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let out = Command::new(common::AGENTD)
        .args(["run", "--net", "proxy", "--allow-domain", "a.example", "--"])
        .args(["sh", "-c", "echo $AGENTD_JOB_ID; curl -sS --max-time 5 http://blocked.example/ >/dev/null 2>&1; echo done"])
        .env("AGENTD_RUNTIME_DIR", env.runtime_dir())
        .stderr(std::process::Stdio::from(write))
        .output()
        .expect("run agentd");
    let text = common::stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "agentd died: {:?}\n{text}",
        out.status
    );
    assert!(text.ends_with("done\n"), "{text}");
    let id = text.lines().next().unwrap_or_default();
    assert!(
        common::cgroups_of(id).is_empty(),
        "{:?}",
        common::cgroups_of(id)
    );
    env.assert_clean();
}
