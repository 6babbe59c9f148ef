//! The cgroup backend on this host: v1 limit files, and the cgroup2 core files (kill,
//! freeze, events) on the unified tree of a hybrid host (or the whole tree on a v2 host).

mod common;
use agentd::cgroup::{CgroupLimits, HostCgroups, Layout, create_job_cgroup};
use common::*;
use std::process::Command;

/// The cgroup parent an operator named for this host (as `agentd run` reads it), for
/// hosts whose own cgroup is not delegated every controller.
fn operator_parent() -> Option<String> {
    std::env::var("AGENTD_CGROUP_PARENT").ok()
}

fn spawn_sleeper_in(dirs: &[std::path::PathBuf]) -> std::process::Child {
    let child = Command::new("sleep").arg("60").spawn().unwrap();
    for d in dirs {
        std::fs::write(d.join("cgroup.procs"), child.id().to_string()).unwrap();
    }
    child
}

#[test]
fn limits_freeze_thaw_kill_and_removal() {
    require_root();
    let host = HostCgroups::detect().unwrap();
    let name = format!("agentd-test-{}", std::process::id());
    let limits = CgroupLimits {
        cpu: Some(0.25),
        memory: Some(64 << 20),
        pids: Some(10),
        ..Default::default()
    };
    let mut cg =
        create_job_cgroup(&host, operator_parent().as_deref(), &name, &limits, &[]).unwrap();
    let dirs = cg.dirs();
    assert!(dirs.iter().all(|d| d.is_dir()));

    // The limits are in the kernel's files.
    let applied: std::collections::BTreeMap<_, _> = cg.applied().into_iter().collect();
    let read = |file: &str| {
        dirs.iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .map(|s| s.trim().to_owned())
    };
    match host.layout {
        Layout::Unified => {
            assert_eq!(read("cpu.max").unwrap(), "25000 100000");
            assert_eq!(read("memory.max").unwrap(), (64u64 << 20).to_string());
        }
        _ => {
            assert_eq!(read("cpu.cfs_quota_us").unwrap(), "25000");
            assert_eq!(read("cpu.cfs_period_us").unwrap(), "100000");
            assert_eq!(
                read("memory.limit_in_bytes").unwrap(),
                (64u64 << 20).to_string()
            );
            assert_eq!(applied["cpu.cfs_quota_us"], "25000");
        }
    }
    assert_eq!(read("pids.max").unwrap(), "10");

    let mut sleeper = spawn_sleeper_in(&dirs);
    assert!(cg.populated());

    // Freeze: the kernel reports the cgroup frozen, and the task stops running.
    cg.freeze().unwrap();
    if let Some(v2) = dirs.iter().find(|d| d.join("cgroup.events").exists()) {
        let events = std::fs::read_to_string(v2.join("cgroup.events")).unwrap();
        assert!(events.contains("frozen 1"), "{events}");
    }
    cg.thaw().unwrap();

    // Kill: every task dies, and the cgroup empties.
    cg.kill().unwrap();
    let status = sleeper.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    cg.remove().unwrap();
    assert!(
        dirs.iter().all(|d| !d.exists()),
        "cgroup directories left: {dirs:?}"
    );
}

#[test]
fn dropping_a_cgroup_with_tasks_kills_them_and_removes_it() {
    require_root();
    let host = HostCgroups::detect().unwrap();
    let name = format!("agentd-test-drop-{}", std::process::id());
    let cg = create_job_cgroup(
        &host,
        operator_parent().as_deref(),
        &name,
        &CgroupLimits {
            pids: Some(5),
            ..Default::default()
        },
        &[],
    )
    .unwrap();
    let dirs = cg.dirs();
    let mut sleeper = spawn_sleeper_in(&dirs);
    drop(cg);
    assert!(sleeper.wait().unwrap().code().is_none());
    assert!(dirs.iter().all(|d| !d.exists()));
}

#[test]
fn missing_parent_is_a_clear_error_and_creates_nothing() {
    require_root();
    let host = HostCgroups::detect().unwrap();
    let err = match create_job_cgroup(
        &host,
        Some("/no-such-agentd-parent"),
        "agentd-x",
        &CgroupLimits::default(),
        &[],
    ) {
        Ok(_) => panic!("created a cgroup below a missing parent"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("/no-such-agentd-parent") && err.contains("does not exist"),
        "{err}"
    );
}

/// The pure-v2 backend, run against this host's cgroup2 tree. On a hybrid host that tree
/// has no controllers, so this proves the v2 job cgroup (born-into fd, kill, freeze,
/// events) and the fail-closed refusal of limits whose controller is not delegated.
#[test]
fn v2_backend_on_the_cgroup2_tree() {
    require_root();
    let detected = HostCgroups::detect().unwrap();
    let v2_only = HostCgroups {
        layout: Layout::Unified,
        v2: detected.v2.clone(),
        v1: Vec::new(),
    };
    let tree = v2_only.v2.clone().expect("this host has a cgroup2 tree");
    let available = std::fs::read_to_string(tree.own_dir().join("cgroup.controllers")).unwrap();

    // A cpu limit: refused (naming the feature to downgrade) where the controller is not
    // delegated, as on a hybrid host's cgroup2 tree; written to cpu.max where it is.
    let cpu_limit = CgroupLimits {
        cpu: Some(0.5),
        ..Default::default()
    };
    match create_job_cgroup(&v2_only, None, "agentd-test-v2-cpu", &cpu_limit, &[]) {
        Err(err) => {
            assert!(
                !available.split_whitespace().any(|c| c == "cpu"),
                "cpu is available yet refused: {err}"
            );
            assert_eq!(err.feature().as_deref(), Some("cgroup-cpu"), "{err}");
            assert!(
                err.to_string().contains("cpu controller is not available"),
                "{err}"
            );
            assert!(!tree.own_dir().join("agentd-test-v2-cpu").exists());
        }
        Ok(mut cg) => {
            let max = std::fs::read_to_string(cg.dirs()[0].join("cpu.max")).unwrap();
            assert_eq!(max.trim(), "50000 100000");
            cg.remove().unwrap();
        }
    }

    let name = format!("agentd-test-v2-{}", std::process::id());
    let mut cg = create_job_cgroup(&v2_only, None, &name, &CgroupLimits::default(), &[]).unwrap();
    assert_eq!(cg.version(), "v2");
    assert!(cg.clone_into_fd().is_some());
    let dirs = cg.dirs();
    let mut sleeper = spawn_sleeper_in(&dirs);
    assert!(cg.populated());
    cg.freeze().unwrap();
    assert!(
        std::fs::read_to_string(dirs[0].join("cgroup.events"))
            .unwrap()
            .contains("frozen 1")
    );
    cg.thaw().unwrap();
    assert!(
        std::fs::read_to_string(dirs[0].join("cgroup.events"))
            .unwrap()
            .contains("frozen 0")
    );
    cg.kill().unwrap();
    sleeper.wait().unwrap();
    assert!(
        cg.usage().cpu_usec.is_some(),
        "cpu.stat usage_usec is a core file"
    );
    cg.remove().unwrap();
    assert!(!dirs[0].exists());
}

/// cgroup.kill (or, on legacy v1, freeze + SIGKILL + thaw) takes down a tree that keeps
/// forking while it is killed.
#[test]
fn kill_takes_down_a_forking_tree() {
    require_root();
    let host = HostCgroups::detect().unwrap();
    let name = format!("agentd-test-forker-{}", std::process::id());
    let mut cg = create_job_cgroup(
        &host,
        operator_parent().as_deref(),
        &name,
        &CgroupLimits {
            pids: Some(200),
            ..Default::default()
        },
        &[],
    )
    .unwrap();
    let dirs = cg.dirs();
    let mut forker = Command::new("sh")
        .args(["-c", "while :; do (sleep 30 &) ; sleep 0.01; done"])
        .spawn()
        .unwrap();
    for d in &dirs {
        std::fs::write(d.join("cgroup.procs"), forker.id().to_string()).unwrap();
    }
    let procs = |d: &std::path::Path| {
        std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    // Wait until the tree has grown (slow under emulation), then kill it mid-fork.
    let grown = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dirs.iter().any(|d| procs(d) > 5) {
        assert!(
            std::time::Instant::now() < grown,
            "the tree did not grow inside the cgroup"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    cg.kill().unwrap();
    assert!(
        forker.wait().unwrap().code().is_none(),
        "the forking shell survived"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while cg.populated() {
        assert!(
            std::time::Instant::now() < deadline,
            "tasks remain after kill: {:?}",
            dirs.iter().map(|d| procs(d)).collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    cg.remove().unwrap();
    assert!(dirs.iter().all(|d| !d.exists()));
}
