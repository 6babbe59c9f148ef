//! The creation pipeline unwinds: a failure forced at each step (test builds only,
//! AGENTD_FAULT=STEP) leaves no cgroup, mount, directory or process behind.

mod common;
use common::*;

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

#[test]
fn leftovers_of_a_killed_agentd_are_swept_by_the_next_run() {
    let env = Env::new();
    let mut agentd = std::process::Command::new(AGENTD)
        .args(["run", "--", "sleep", "300"])
        .env("AGENTD_RUNTIME_DIR", env.runtime_dir())
        .spawn()
        .unwrap();
    let jobs = env.runtime_dir().join("jobs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let job = loop {
        let found = std::fs::read_dir(&jobs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path());
        if let Some(dir) = found.filter(|d| d.join("state.json").exists()) {
            break dir;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job never published its state"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let id = job.file_name().unwrap().to_str().unwrap().to_owned();
    // Kill agentd itself: no cleanup runs. Its job dies with it (parent-death signal).
    agentd.kill().unwrap();
    agentd.wait().unwrap();
    let left = cgroups_of(&id);
    assert!(
        !left.is_empty(),
        "expected the killed run's cgroups to remain until swept"
    );
    // Age the directory past the sweep's grace period, then run another job.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    std::fs::File::open(&job)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let out = env.agentd(&["run", "--", "/bin/true"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains(&format!("removed job {id}")),
        "{}",
        stderr(&out)
    );
    assert_eq!(cgroups_of(&id), Vec::<std::path::PathBuf>::new());
    assert!(!job.exists());
    let ps = std::process::Command::new("pgrep")
        .args(["-x", "sleep"])
        .output()
        .unwrap();
    let sleepers = stdout(&ps);
    for pid in sleepers.lines() {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(!cg.contains(&id), "the killed run's job survived: {pid}");
    }
}

#[test]
fn cgroups_of_an_agentd_killed_before_publish_are_swept_too() {
    let env = Env::new();
    let mut agentd = std::process::Command::new(AGENTD)
        .args(["run", "--", "/bin/true"])
        .env("AGENTD_RUNTIME_DIR", env.runtime_dir())
        .env("AGENTD_FAULT", "hang-after-cgroup")
        .spawn()
        .unwrap();
    let jobs = env.runtime_dir().join("jobs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (job, id) = loop {
        let found = std::fs::read_dir(&jobs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path());
        if let Some(dir) = found {
            let id = dir.file_name().unwrap().to_str().unwrap().to_owned();
            if !cgroups_of(&id).is_empty() {
                break (dir, id);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agentd never created the job's cgroups"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    agentd.kill().unwrap();
    agentd.wait().unwrap();
    assert!(
        !job.join("state.json").exists(),
        "the hang is before publish"
    );
    std::fs::File::open(&job)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60))
        .unwrap();
    let out = env.agentd(&["run", "--", "/bin/true"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains(&format!("removed job {id}")),
        "{}",
        stderr(&out)
    );
    assert_eq!(cgroups_of(&id), Vec::<std::path::PathBuf>::new());
}
