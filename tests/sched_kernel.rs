//! `--kernel-deadline`: SCHED_DEADLINE on a deadline job's main process, set by the
//! supervisor, proven from inside the job; the kernel's overrun signal; and a refusal
//! explained.

mod common;

use common::{Env, code, report, stderr, stdout};

/// The default policy, granting the deadline class and SCHED_DEADLINE on the main
/// process.
fn policy(env: &Env) -> String {
    let default = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies/default.toml"
    ))
    .unwrap();
    let text = default.replace(
        "classes = [\"fair\", \"idle\"]",
        "classes = [\"fair\", \"idle\", \"deadline\"]\nallow_kernel_deadline = true",
    );
    assert_ne!(
        text, default,
        "policies/default.toml changed its [sched] classes"
    );
    env.policy("kdl", &text).display().to_string()
}

fn deadline_flags<'a>(policy: &'a str, runtime: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--policy",
        policy,
        "--class",
        "deadline",
        "--runtime",
        runtime,
        "--deadline",
        "100ms",
        "--period",
        "100ms",
        "--kernel-deadline",
    ]
}

#[test]
fn the_main_process_runs_under_sched_deadline_and_its_children_do_not() {
    let env = Env::new();
    let policy = policy(&env);
    let rep = env.path("report.json");
    // Runtime enough for a shell under emulation (the VM test); an overrun would end it
    // with SIGXCPU, which it ignores for this test once it runs.
    let mut args = deadline_flags(&policy, "50ms");
    args.extend(["--report", rep.to_str().unwrap(), "--", "sh", "-c"]);
    // The main process (the shell, $$) reads its own policy with builtins only (it was
    // set before its exec); `grep` is a child, so it shows what reset-on-fork gives.
    args.push(
        "trap '' XCPU; while read -r k c v; do [ \"$k\" = policy ] && echo \"main $v\"; done < /proc/$$/sched; \
         grep '^policy' /proc/self/sched | tr -s ' ' | sed 's/^/child /'",
    );
    let o = env.agentd(&args);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("main 6"),
        "main process not SCHED_DEADLINE (6): {out}"
    );
    assert!(
        out.contains("child policy : 0"),
        "a child should be SCHED_OTHER (0): {out}"
    );
    let r = report(&rep);
    assert!(
        r["sched"]["kernel_deadline"]
            .as_str()
            .is_some_and(|s| s.contains("SCHED_DEADLINE")),
        "{}",
        r["sched"]
    );
}

#[test]
fn an_overrun_sends_sigxcpu_to_the_main_process() {
    let env = Env::new();
    let policy = policy(&env);
    let mut args = deadline_flags(&policy, "1ms");
    // A busy loop uses up 1 ms of runtime in every 100 ms period at once; SIGXCPU's
    // default action ends it.
    args.extend(["--", "sh", "-c", "sleep 0.2; while :; do :; done"]);
    let o = env.agentd(&args);
    assert_eq!(
        code(&o),
        128 + libc::SIGXCPU,
        "expected death by SIGXCPU: {}{}",
        stdout(&o),
        stderr(&o)
    );
}

#[test]
fn kernel_deadline_is_refused_where_it_cannot_hold_and_says_why() {
    let env = Env::new();
    let policy = policy(&env);
    // Not granted by the default policy.
    let o = env.agentd(&[
        "run",
        "--class",
        "deadline",
        "--runtime",
        "1ms",
        "--deadline",
        "10ms",
        "--kernel-deadline",
        "--",
        "true",
    ]);
    assert_eq!(code(&o), 125, "{}", stderr(&o));
    // Only for the deadline class.
    let o = env.agentd(&[
        "run",
        "--policy",
        &policy,
        "--kernel-deadline",
        "--",
        "true",
    ]);
    assert_eq!(code(&o), 125, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--kernel-deadline is for the deadline class"),
        "{}",
        stderr(&o)
    );
    // A CPU affinity narrower than the root domain: the kernel says EPERM, agentd says
    // why, and the job does not run (fail closed).
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        panic!("this test needs at least 2 CPUs (an affinity narrower than the root domain)");
    }
    let marker = env.path("ran");
    let mut args = vec!["-c", "0", common::AGENTD];
    args.extend(deadline_flags(&policy, "1ms"));
    let script = format!("touch {}", marker.display());
    args.extend(["--", "sh", "-c", &script]);
    let o = std::process::Command::new("taskset")
        .args(&args)
        .env("AGENTD_RUNTIME_DIR", env.runtime_dir())
        .output()
        .expect("taskset (util-linux)");
    env.assert_clean();
    assert_eq!(code(&o), 125, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("EPERM") && stderr(&o).contains("affinity"),
        "{}",
        stderr(&o)
    );
    assert!(
        !marker.exists(),
        "the job ran although its SCHED_DEADLINE was refused"
    );
}
