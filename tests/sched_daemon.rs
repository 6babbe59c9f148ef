//! Scheduling classes on the real kernel, through the daemon: what a class writes to
//! the job's cgroup, admission control at submission, and weights that divide a CPU.

mod common;

use common::daemon::{TestDaemon, default_policy_with, rows, show, str_of};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// The cgroup file `name` of a job, from whichever of its directories has it.
fn cgroup_file(job: &Value, name: &str) -> Option<String> {
    job["cgroup"].as_array()?.iter().find_map(|d| {
        std::fs::read_to_string(Path::new(d.as_str()?).join(name))
            .ok()
            .map(|s| s.trim().to_owned())
    })
}

/// cpu.max as "QUOTA PERIOD", from v2's file or v1's two.
fn cpu_max(job: &Value) -> String {
    cgroup_file(job, "cpu.max").unwrap_or_else(|| {
        format!(
            "{} {}",
            cgroup_file(job, "cpu.cfs_quota_us").expect("cpu.cfs_quota_us"),
            cgroup_file(job, "cpu.cfs_period_us").expect("cpu.cfs_period_us")
        )
    })
}

fn deadline_policy(d: &TestDaemon) -> String {
    default_policy_with(
        d,
        "deadline",
        "classes = [\"fair\", \"idle\"]",
        "classes = [\"fair\", \"idle\", \"deadline\"]",
    )
}

#[test]
fn deadline_jobs_are_admitted_within_the_budget_and_carry_their_bandwidth() {
    let d = TestDaemon::start(&["--cpu-budget", "0.5"]);
    let policy = deadline_policy(&d);
    let dl = |runtime: &str| -> std::process::Output {
        d.ctl(&[
            "run",
            "--detach",
            "--policy-file",
            &policy,
            "--class",
            "deadline",
            "--runtime",
            runtime,
            "--deadline",
            "100ms",
            "--period",
            "100ms",
            "--",
            "sleep",
            "60",
        ])
    };
    let first = dl("20ms");
    assert!(first.status.success(), "{}", show(&first));
    let first = common::daemon::out_text(&first).trim().to_owned();
    let job = d.job(&first);
    assert_eq!(cpu_max(&job), "20000 100000", "{job}");
    let second = dl("25ms");
    assert!(second.status.success(), "{}", show(&second));
    let second = common::daemon::out_text(&second).trim().to_owned();
    // 0.2 + 0.25 admitted of 0.5: 0.1 more would overflow.
    let third = dl("10ms");
    assert_eq!(third.status.code(), Some(125), "{}", show(&third));
    let err = common::daemon::err_text(&third);
    assert!(
        err.contains("asks for 0.1000 CPUs") && err.contains("0.4500 of the budget of 0.5000 CPUs"),
        "{err}"
    );
    let audit = d.audit();
    assert!(
        audit.iter().any(|r| r["action"] == "job.submit"
            && str_of(r, "authority").starts_with("denied by sched.admission")),
        "no refusal row"
    );
    let admitted = rows(&audit, "job.admit", &first);
    assert!(
        str_of(admitted[0], "authority").contains("class deadline: 0.2000 CPUs"),
        "{:?}",
        admitted
    );
    // The job reads its class in its own view.
    let sched = d.get("/v1/sched").json();
    assert_eq!(
        sched["deadline_admitted"].as_f64().unwrap(),
        0.45,
        "{sched}"
    );
    let table = d.ctl_ok(&["sched"]);
    assert!(
        table.lines().any(|l| l.starts_with(&first)
            && l.contains("deadline")
            && l.contains("runtime 20.0ms")),
        "{table}"
    );
    // The first ends: its bandwidth returns, and the third fits.
    d.ctl_ok(&["kill", "--signal", "KILL", &first]);
    d.wait_ended(&first);
    let third = dl("10ms");
    assert!(third.status.success(), "{}", show(&third));
    let third = common::daemon::out_text(&third).trim().to_owned();
    for id in [&second, &third] {
        d.ctl_ok(&["kill", "--signal", "KILL", id]);
        d.wait_ended(id);
    }
    let sched = d.get("/v1/sched").json();
    assert_eq!(sched["deadline_admitted"].as_f64().unwrap(), 0.0, "{sched}");
}

#[test]
fn classes_and_weights_reach_the_cgroup_within_the_policys_bounds() {
    let d = TestDaemon::start(&[]);
    let id = d.run_detached(&["--weight", "512"], &["sleep", "60"]);
    let job = d.job(&id);
    match cgroup_file(&job, "cpu.shares") {
        Some(shares) => assert_eq!(shares, "512", "{job}"),
        None => assert_eq!(
            cgroup_file(&job, "cpu.weight").as_deref(),
            Some("50"),
            "{job}"
        ),
    }
    let idle = d.run_detached(&["--class", "idle"], &["sleep", "60"]);
    let job = d.job(&idle);
    // v1's cpu hierarchy where there is one (a hybrid host's empty cgroup2 tree shows
    // cpu.idle without the cpu controller), else v2's cpu.idle.
    match cgroup_file(&job, "cpu.shares") {
        Some(shares) => assert_eq!(shares, "2", "{job}"),
        None => assert_eq!(cgroup_file(&job, "cpu.idle").as_deref(), Some("1"), "{job}"),
    }
    // The job sees its class and parameters.
    let view = d.ctl(&[
        "run",
        "--slice",
        "1ms",
        "--",
        "sh",
        "-c",
        "i=0; while [ ! -s /run/agentd/self/sched/params ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; cat /run/agentd/self/sched/class /run/agentd/self/sched/params; grep se.slice /proc/self/sched",
    ]);
    let text = common::daemon::out_text(&view);
    assert!(text.starts_with("fair\n"), "{}", show(&view));
    assert!(text.contains("slice_ns 1000000"), "{}", show(&view));
    // The kernel gives every process of the job that slice (Linux >= 6.12).
    let slice_line = text.lines().find(|l| l.starts_with("se.slice")).unwrap_or_else(|| {
        panic!(
            "this kernel shows no se.slice in /proc/PID/sched: the EEVDF slice needs Linux >= 6.12 ({})",
            show(&view)
        )
    });
    assert!(
        slice_line.ends_with(" 1000000"),
        "{slice_line}: {}",
        show(&view)
    );
    assert!(
        text.contains("kernel_slice 1000000 ns (sched_attr.sched_runtime)"),
        "{}",
        show(&view)
    );
    // What the policy does not grant is refused before anything is made.
    for (flags, want) in [
        (&["--weight", "4096"][..], "sched.max_weight"),
        (
            &[
                "--class",
                "deadline",
                "--runtime",
                "1ms",
                "--deadline",
                "10ms",
            ][..],
            "sched.classes",
        ),
        (&["--class", "rt"][..], "sched.classes"),
        (&["--slice", "500ms"][..], "--slice"),
    ] {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "true"]);
        let o = d.ctl(&args);
        assert_eq!(o.status.code(), Some(125), "{flags:?}: {}", show(&o));
        assert!(
            common::daemon::err_text(&o).contains(want),
            "{flags:?}: {}",
            show(&o)
        );
    }
    for id in [&id, &idle] {
        d.ctl_ok(&["kill", "--signal", "KILL", id]);
        d.wait_ended(id);
    }
}

/// Two CPU hogs pinned to one CPU, weights 1 and 3: the kernel splits the CPU about
/// 1:3, as their cgroups account it.
#[test]
fn weights_one_and_three_split_one_cpu_about_one_to_three() {
    let d = TestDaemon::start(&[]);
    let hog = ["taskset", "-c", "0", "sh", "-c", "while :; do :; done"];
    let light = d.run_detached(&["--weight", "256"], &hog);
    let heavy = d.run_detached(&["--weight", "768"], &hog);
    let usage = |id: &str| -> u64 { d.job(id)["usage"]["cpu_usec"].as_u64().unwrap_or(0) };
    let (l0, h0) = (usage(&light), usage(&heavy));
    // Both have run a while (a second of CPU between them) before the split counts.
    std::thread::sleep(Duration::from_secs(4));
    let (l1, h1) = (usage(&light), usage(&heavy));
    for id in [&light, &heavy] {
        d.ctl_ok(&["kill", "--signal", "KILL", id]);
        d.wait_ended(id);
    }
    let (l, h) = ((l1 - l0) as f64, (h1 - h0) as f64);
    assert!(l + h > 1e6, "the hogs hardly ran: {l} + {h} µs");
    let ratio = h / l.max(1.0);
    assert!(
        (2.2..=4.0).contains(&ratio),
        "heavy:light = {h}:{l} µs = {ratio:.2}, expected about 3"
    );
}

#[test]
fn the_budget_caps_all_jobs_together_and_the_api_answers_while_20_hogs_run() {
    let d = TestDaemon::start(&["--cpu-budget", "1"]);
    let sched = d.get("/v1/sched").json();
    assert_eq!(sched["cpu_budget_enforced"], true, "{sched}");
    let group: Vec<String> = sched["job_group"]
        .as_array()
        .expect("job_group")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    // The group carries the budget: 1 CPU.
    let budget = group.iter().find_map(|g| {
        let g = Path::new(g);
        std::fs::read_to_string(g.join("cpu.max"))
            .ok()
            .map(|s| s.trim().to_owned())
            .or_else(|| {
                let q = std::fs::read_to_string(g.join("cpu.cfs_quota_us")).ok()?;
                let p = std::fs::read_to_string(g.join("cpu.cfs_period_us")).ok()?;
                Some(format!("{} {}", q.trim(), p.trim()))
            })
    });
    assert_eq!(budget.as_deref(), Some("100000 100000"), "{group:?}");

    let hog = ["sh", "-c", "while :; do :; done"];
    let ids: Vec<String> = (0..20).map(|_| d.run_detached(&[], &hog)).collect();
    for id in &ids {
        let job = d.job(id);
        for dir in job["cgroup"].as_array().unwrap() {
            let dir = dir.as_str().unwrap();
            assert!(
                group.iter().any(|g| dir.starts_with(&format!("{g}/"))),
                "{dir} is not below the job group {group:?}"
            );
        }
    }
    let usage = || -> u64 {
        ids.iter()
            .map(|id| d.job(id)["usage"]["cpu_usec"].as_u64().unwrap_or(0))
            .sum()
    };
    std::thread::sleep(Duration::from_secs(1));
    let (u0, t0) = (usage(), std::time::Instant::now());
    // The control plane answers while every job spins: each request gets its answer.
    // The bound is liveness, not a latency target (bench-daemon measures latency).
    let mut worst = Duration::ZERO;
    for _ in 0..40 {
        let t = std::time::Instant::now();
        let r = d.get("/v1/jobs");
        assert_eq!(r.status, 200, "{}", r.text());
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let cpus = (usage() - u0) as f64 / t0.elapsed().as_micros() as f64;
    for id in &ids {
        d.ctl_ok(&["kill", "--signal", "KILL", id]);
    }
    for id in &ids {
        d.wait_ended(id);
    }
    assert!(
        worst < Duration::from_secs(2),
        "an API request took {worst:?} while 20 hogs ran"
    );
    // Twenty hogs together get the budget, not the machine (the lower bound only says
    // they ran: a busy host may give them less than the budget).
    assert!(
        (0.1..=1.15).contains(&cpus),
        "20 hogs used {cpus:.2} CPUs together; the budget is 1"
    );
}

/// Polls `cond` every 50 ms for up to `secs` seconds.
fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

#[test]
fn with_one_slot_the_waiting_job_is_frozen_uses_no_cpu_and_takes_its_turn() {
    let d = TestDaemon::start(&["--slots", "1", "--sched-tick", "2s"]);
    let hog = ["sh", "-c", "while :; do :; done"];
    let a = d.run_detached(&[], &hog);
    let b = d.run_detached(&[], &hog);
    let waiting = |id: &str| d.job(id)["waiting"] == true;
    let cpu = |id: &str| d.job(id)["usage"]["cpu_usec"].as_u64().unwrap_or(0);
    let resumed = |id: &str| rows(&d.audit(), "sched.resume", id).len();
    // One slot: exactly one of them waits, frozen, its state still "running".
    assert!(
        eventually(5, || waiting(&a) != waiting(&b)),
        "a: {}, b: {}",
        d.job(&a),
        d.job(&b)
    );
    // The waiting one uses no CPU while it waits (measured between two looks at which it
    // waited with no resumption in between).
    let mut checked = false;
    for _ in 0..10 {
        let w = if waiting(&a) { a.clone() } else { b.clone() };
        let (u0, r0) = (cpu(&w), resumed(&w));
        std::thread::sleep(Duration::from_millis(300));
        if waiting(&w) && resumed(&w) == r0 {
            assert_eq!(cpu(&w), u0, "job {w} used CPU while it waited for a slot");
            assert_eq!(d.job(&w)["state"], "running");
            checked = true;
            break;
        }
    }
    assert!(checked, "never saw a job wait through a whole look");
    // Turns rotate: each tick the running fair job's slice is used, and the waiting one
    // (eligible, earlier virtual deadline) takes the slot; both make progress.
    assert!(
        eventually(12, || resumed(&a) + resumed(&b) >= 2),
        "no rotation: {:?}",
        d.audit()
            .iter()
            .filter(|r| r["action"].as_str().unwrap_or("").starts_with("sched."))
            .collect::<Vec<_>>()
    );
    assert!(
        cpu(&a) > 100_000 && cpu(&b) > 100_000,
        "{} {}",
        cpu(&a),
        cpu(&b)
    );
    let preempt = rows(&d.audit(), "sched.preempt", &a)
        .into_iter()
        .chain(rows(&d.audit(), "sched.preempt", &b))
        .next()
        .cloned()
        .expect("a sched.preempt row");
    assert!(
        preempt["authority"].as_str().unwrap().contains("runqueue"),
        "{preempt}"
    );
    // The owner freezes the running one: the waiting one gets the slot at once. Thawed
    // again, it joins the queue: one of the two holds the slot and the other waits,
    // frozen, both "running" to their owners (the thawed job may take the slot back at
    // once: a waking job with an earlier virtual deadline preempts, as in EEVDF).
    let (running, other) = if waiting(&a) {
        (b.clone(), a.clone())
    } else {
        (a.clone(), b.clone())
    };
    d.ctl_ok(&["freeze", &running]);
    assert!(eventually(3, || !waiting(&other)), "{}", d.job(&other));
    assert_eq!(d.job(&running)["state"], "frozen");
    d.ctl_ok(&["thaw", &running]);
    assert_eq!(d.job(&running)["state"], "running");
    assert!(
        eventually(3, || waiting(&a) != waiting(&b)),
        "a: {}, b: {}",
        d.job(&a),
        d.job(&b)
    );
    let table = d.ctl_ok(&["sched"]);
    assert!(table.contains("1 slots, 1 job(s) waiting"), "{table}");
    assert!(table.contains("waiting"), "{table}");
    let metrics = d.get("/metrics").text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("agentd_sched_preemptions_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // A waiting job can be killed (it is thawed to take the signal).
    for id in [&a, &b] {
        d.ctl_ok(&["kill", id]);
    }
    for id in [&a, &b] {
        d.wait_ended(id);
    }
}

#[test]
fn deadline_overruns_and_deadlines_missed_waiting_for_a_slot_are_events_and_metrics() {
    let d = TestDaemon::start(&["--slots", "1", "--sched-tick", "100ms"]);
    let policy = deadline_policy(&d);
    let dl = |script: &str| {
        d.run_detached(
            &[
                "--policy-file",
                &policy,
                "--class",
                "deadline",
                "--runtime",
                "10ms",
                "--deadline",
                "100ms",
                "--period",
                "100ms",
            ],
            &["sh", "-c", script],
        )
    };
    // A spins: every period it uses up its 10 ms and cpu.max throttles it (overruns).
    let a = dl("while :; do :; done");
    // B arrives with a later deadline and no free slot: it waits, and each period that
    // passes is a missed deadline.
    let b = dl("sleep 60");
    let kinds = |id: &str| -> Vec<String> {
        d.events()
            .iter()
            .filter(|e| e["job"] == id)
            .filter_map(|e| e["kind"].as_str().map(str::to_owned))
            .collect()
    };
    let ok = eventually(6, || {
        kinds(&a).iter().any(|k| k == "deadline-overrun")
            && kinds(&b).iter().any(|k| k == "deadline-miss")
    });
    assert!(ok, "a: {:?}\nb: {:?}", kinds(&a), kinds(&b));
    assert_eq!(d.job(&b)["waiting"], true, "{}", d.job(&b));
    assert_eq!(d.job(&a)["waiting"], Value::Null, "{}", d.job(&a));
    let metrics = d.get("/metrics").text();
    for name in [
        "agentd_sched_deadline_overruns_total",
        "agentd_sched_deadline_misses_total",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&format!("{name} ")) && !l.ends_with(" 0")),
            "{name}: {metrics}"
        );
    }
    for id in [&a, &b] {
        d.ctl_ok(&["kill", "--signal", "KILL", id]);
    }
    for id in [&a, &b] {
        d.wait_ended(id);
    }
}

#[test]
fn a_sleeping_job_gives_its_slot_up_and_queues_again_when_it_wakes() {
    let d = TestDaemon::start(&["--slots", "1", "--sched-tick", "200ms"]);
    let waiting = |id: &str| d.job(id)["waiting"] == true;
    // A holds the only slot but sleeps (as an agent waiting for a model's answer does),
    // then spins; B spins from the start.
    let a = d.run_detached(&[], &["sh", "-c", "sleep 6; while :; do :; done"]);
    let b = d.run_detached(&[], &["sh", "-c", "while :; do :; done"]);
    // Asleep, A gives its slot up without being frozen: B gets it, neither waits, and
    // `agentctl sched` shows A sleeping.
    let mut table = String::new();
    assert!(
        eventually(5, || {
            table = d.ctl_ok(&["sched"]);
            !waiting(&a) && !waiting(&b) && table.contains("sleeping")
        }),
        "a: {}\nb: {}\n{table}",
        d.job(&a),
        d.job(&b)
    );
    // Awake and spinning, A queues for the slot again: one of the two waits.
    assert!(
        eventually(10, || waiting(&a) != waiting(&b)),
        "a: {}\nb: {}",
        d.job(&a),
        d.job(&b)
    );
    for id in [&a, &b] {
        d.ctl_ok(&["kill", "--signal", "KILL", id]);
    }
    for id in [&a, &b] {
        d.wait_ended(id);
    }
}
