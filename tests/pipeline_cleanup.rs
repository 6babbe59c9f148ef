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
