//! Resource containment, measured by the kernel's cgroup accounting.

mod common;
use common::*;

#[test]
fn fork_bomb_stops_at_pids_max_and_host_stays_responsive() {
    let env = Env::new();
    let report_path = env.path("r.json");
    let bomb = "import os, time\nn=0\ntry:\n    while n < 10000:\n        if os.fork() == 0:\n            time.sleep(30); os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('stopped after', n, 'errno', e.errno, flush=True)\n";
    let child = std::process::Command::new(AGENTD)
        .args([
            "run",
            "--pids",
            "64",
            "--report",
            report_path.to_str().unwrap(),
            "--",
            "python3",
            "-c",
            bomb,
        ])
        .env("AGENTD_RUNTIME_DIR", env.runtime_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While the bomb runs, the host can still start processes.
    for _ in 0..5 {
        assert!(
            std::process::Command::new("/bin/true")
                .status()
                .unwrap()
                .success()
        );
    }
    let out = child.wait_with_output().unwrap();
    env.assert_clean();
    assert_ok(&out);
    let s = stdout(&out);
    let n: u32 = s
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{s}"));
    assert!(n < 64, "forked {n} processes under pids.max 64");
    assert!(
        s.ends_with("errno 11\n"),
        "fork should fail with EAGAIN: {s}"
    );
    assert_eq!(
        report(&report_path)["enforced"]["cgroup"]["limits_applied"]["pids.max"],
        "64"
    );
}

#[test]
fn memory_hog_is_oom_killed_inside_its_cgroup_and_counted() {
    let env = Env::new();
    let report_path = env.path("r.json");
    let out = env.agentd(&[
        "run",
        "--memory",
        "64M",
        "--report",
        report_path.to_str().unwrap(),
        "--",
        "python3",
        "-c",
        "b=[]\nwhile True:\n    b.append(bytearray(16 << 20))\n",
    ]);
    assert_eq!(
        code(&out),
        137,
        "expected SIGKILL (128+9)\nstderr: {}",
        stderr(&out)
    );
    let r = report(&report_path);
    assert!(
        r["usage"]["oom_kills"].as_u64().unwrap_or(0) >= 1,
        "{}",
        r["usage"]
    );
    assert_eq!(r["exit"]["signal"], 9);
    let peak = r["usage"]["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak <= 64 << 20, "peak {peak} above the limit");
}

#[test]
fn cpu_hog_under_half_a_cpu_uses_half_a_cpu() {
    let env = Env::new();
    let report_path = env.path("r.json");
    let out = env.agentd(&[
        "run",
        "--cpu",
        "0.5",
        "--report",
        report_path.to_str().unwrap(),
        "--",
        "python3",
        "-c",
        "import time\nend=time.monotonic()+4\nwhile time.monotonic()<end: pass\n",
    ]);
    assert_ok(&out);
    let r = report(&report_path);
    let cpu = r["usage"]["cpu_usec"].as_f64().unwrap() / 1e6;
    let wall = r["wall_time_sec"].as_f64().unwrap();
    let share = cpu / wall;
    assert!(
        (0.45..=0.55).contains(&share),
        "used {share:.3} CPU ({cpu:.2}s CPU over {wall:.2}s)"
    );
    assert!(
        r["usage"]["throttled_usec"].as_u64().unwrap() > 1_000_000,
        "{}",
        r["usage"]
    );
}
