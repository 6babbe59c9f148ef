//! Regions through the daemon, from inside real jobs: a C agent (tests/region_probe.c,
//! linked with libagentd_region.so) and `agentd region cat` open regions through
//! /run/agentd/regions.sock; the daemon's broker serves their faults with userfaultfd.

mod common;

use common::daemon::{LIVENESS, TestDaemon, rows, wait_until};
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The byte the test files hold at offset `o` (region_probe.c has the same).
fn pattern(o: u64) -> u8 {
    ((o / 4096 * 31 + o % 4096) % 251) as u8
}

/// A file of `len` bytes holding the pattern.
fn pattern_file(path: &Path, len: u64) {
    let f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(at + i as u64);
        }
        f.write_all_at(&buf[..n], at).unwrap();
        at += n as u64;
    }
}

/// The directory of the agentd binary, with libagentd_region.so beside it (built here
/// when it is missing: `cargo test` builds the binaries, not the cdylib crate).
fn lib_dir() -> PathBuf {
    let dir = Path::new(common::AGENTD).parent().unwrap().to_path_buf();
    let so = dir.join("libagentd_region.so");
    if !so.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(&cargo)
            .args(["build", "--release", "--locked", "-p", "agentd-region-cabi"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{} is missing and {cargo} cannot build it: {e}",
                    so.display()
                )
            });
        assert!(
            out.status.success(),
            "build libagentd_region.so: {}",
            common::daemon::show(&out)
        );
    }
    assert!(so.exists(), "{} is missing", so.display());
    dir
}

struct Lab {
    d: TestDaemon,
    /// The probe, libagentd_region.so and agentd, in the workspace.
    bin: PathBuf,
    /// A workspace the jobs write (owned by uid 1000).
    ws: PathBuf,
    policy: String,
}

impl Lab {
    fn start(env: &[(&str, &str)]) -> Lab {
        let d = TestDaemon::start_with_env(&[], env);
        let lib = lib_dir();
        // The job's workspace (it may write and execute there), owned by uid 1000, with
        // the probe, the library and agentd itself in bin/: a checkout under /tmp could
        // not be granted (every job gets a /tmp of its own).
        let ws = d.path("ws");
        let bin = ws.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::chown(&ws, Some(1000), Some(1000)).unwrap();
        std::fs::copy(
            lib.join("libagentd_region.so"),
            bin.join("libagentd_region.so"),
        )
        .unwrap();
        std::fs::copy(common::AGENTD, bin.join("agentd")).unwrap();
        let probe = bin.join("region_probe");
        let out = std::process::Command::new("cc")
            .args(["-O2", "-Wall", "-o"])
            .arg(&probe)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/region_probe.c"))
            .arg(concat!(
                "-I",
                env!("CARGO_MANIFEST_DIR"),
                "/crates/region-cabi/include"
            ))
            .arg(format!("-L{}", bin.display()))
            .arg("-lagentd_region")
            .arg("-Wl,-rpath,$ORIGIN")
            .output()
            .expect("cc (the C compiler) is needed to build the region probe");
        assert!(out.status.success(), "cc: {}", common::daemon::show(&out));
        let default = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/policies/default.toml"
        ))
        .unwrap();
        let text = default.replace(
            "[regions]\nallow = []",
            "[regions]\nallow = [\"child*:rw\", \"*\"]",
        );
        assert!(
            text.contains("child*:rw"),
            "policies/default.toml has [regions] allow = []"
        );
        let policy = d.path("regions.toml");
        std::fs::write(&policy, text).unwrap();
        let policy = policy.display().to_string();
        Lab { d, bin, ws, policy }
    }

    fn agentd(&self) -> String {
        self.bin.join("agentd").display().to_string()
    }

    fn probe(&self) -> String {
        self.bin.join("region_probe").display().to_string()
    }

    /// Runs a job with `regions` (NAME or NAME:rw) and `command`; returns it ended.
    fn job(&self, regions: &[&str], command: &[&str]) -> Value {
        let id = self.start_job(regions, command);
        self.d.wait_ended(&id)
    }

    fn start_job(&self, regions: &[&str], command: &[&str]) -> String {
        let mut flags = vec!["--policy-file", &self.policy, "--workspace"];
        let ws = self.ws.display().to_string();
        flags.push(&ws);
        for r in regions {
            flags.push("--region");
            flags.push(r);
        }
        // Not run_detached: a short job may have ended by the time it would look.
        let mut args = vec!["run", "--detach"];
        args.extend_from_slice(&flags);
        args.push("--");
        args.extend_from_slice(command);
        let id = self.d.ctl_ok(&args);
        assert_eq!(id.len(), 12, "not a job id: {id:?}");
        id
    }

    fn out(&self, job: &Value) -> String {
        let id = job["id"].as_str().unwrap();
        self.d.get(&format!("/v1/jobs/{id}/logs")).text()
    }
    fn err(&self, job: &Value) -> String {
        let id = job["id"].as_str().unwrap();
        self.d
            .get(&format!("/v1/jobs/{id}/logs?stream=stderr"))
            .text()
    }

    fn region(&self, name: &str) -> Value {
        let r = self.d.get(&format!("/v1/regions/{name}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    fn job_region(&self, job: &Value, name: &str) -> Value {
        let id = job["id"].as_str().unwrap();
        let r = self.d.get(&format!("/v1/regions/{name}?job={id}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }
}

fn exit_code(j: &Value) -> Option<i64> {
    j["exit"]["code"].as_i64()
}
fn exit_signal(j: &Value) -> Option<i64> {
    j["exit"]["signal"].as_i64()
}

#[test]
fn a_job_touching_one_percent_of_a_1gib_file_region_fetches_about_that_and_reads_the_right_bytes() {
    let lab = Lab::start(&[]);
    let file = lab.d.path("big.bin");
    pattern_file(&file, 1 << 30);
    lab.d.ctl_ok(&[
        "region",
        "create",
        "data",
        "--from-file",
        file.to_str().unwrap(),
    ]);
    // One page in every hundred, each checked against the pattern inside the job.
    let j = lab.job(&["data"], &[&lab.probe(), "stride", "data", "100"]);
    assert_eq!(exit_code(&j), Some(0), "{j} {}", lab.err(&j));
    let pages: u64 = 262_144u64.div_ceil(100);
    assert_eq!(lab.out(&j).trim(), format!("ok {pages}"));
    let v = lab.job_region(&j, "data");
    let fetched = v["stats"]["bytes_fetched"].as_u64().unwrap();
    let total = 1u64 << 30;
    assert!(
        fetched >= pages * 4096 && fetched <= total / 100 + total / 200,
        "fetched {fetched} bytes of {total} (1% is {}): {v}",
        total / 100
    );
    assert_eq!(
        v["stats"]["faults"]["fetch"].as_u64().unwrap(),
        pages,
        "{v}"
    );
    assert_eq!(v["stats"]["faults"]["failure"], 0);
    // The region's own counters saw the same, and so does /metrics.
    assert_eq!(
        lab.region("data")["stats"]["bytes_fetched"].as_u64(),
        Some(fetched)
    );
    let metrics = lab.d.get("/metrics").text();
    assert!(
        metrics.contains(&format!(
            "agentd_region_bytes_total{{region=\"data\",kind=\"fetched\"}} {fetched}"
        )),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("region"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The open is an operation row, with the rule that granted it.
    let audit = lab.d.audit();
    let id = j["id"].as_str().unwrap();
    let opens = rows(&audit, "region.open", id);
    assert_eq!(opens.len(), 1, "{audit:?}");
    assert!(
        opens[0]["authority"]
            .as_str()
            .unwrap()
            .contains("regions.allow[1]"),
        "{}",
        opens[0]
    );
    assert!(lab.d.verify()["ok"].as_bool().unwrap());
}

#[test]
fn a_zero_region_reads_zeros_and_region_cat_reads_a_slice_lazily() {
    let lab = Lab::start(&[]);
    lab.d
        .ctl_ok(&["region", "create", "zeros", "--zero", "64M"]);
    let j = lab.job(&["zeros"], &[&lab.probe(), "sum", "zeros", "0", "67108864"]);
    assert_eq!(exit_code(&j), Some(0), "{j} {}", lab.err(&j));
    assert_eq!(lab.out(&j).trim(), "sum 0");
    let v = lab.job_region(&j, "zeros");
    assert_eq!(v["stats"]["bytes_zeroed"].as_u64(), Some(64 << 20), "{v}");
    assert_eq!(v["stats"]["bytes_fetched"], 0);
    assert!(v["stats"]["faults"]["zero"].as_u64().unwrap() > 0);

    // `agentd region cat` in a shell job: a slice of a file region, byte for byte.
    let file = lab.d.path("small.bin");
    pattern_file(&file, 1 << 20);
    lab.d.ctl_ok(&[
        "region",
        "create",
        "small",
        "--from-file",
        file.to_str().unwrap(),
    ]);
    let cat = format!(
        "{} region cat small 100000 5000 | od -An -v -tu1 | tr -s ' ' '\\n' | grep -v '^$' | tail -1",
        lab.agentd()
    );
    let j = lab.job(&["small"], &["sh", "-c", &cat]);
    assert_eq!(exit_code(&j), Some(0), "{j} {}", lab.err(&j));
    assert_eq!(lab.out(&j).trim(), pattern(104_999).to_string());
    let v = lab.job_region(&j, "small");
    assert!(
        v["stats"]["bytes_fetched"].as_u64().unwrap() <= 128 << 10,
        "a slice, not the 1 MiB file: {v}"
    );
}

#[test]
fn a_clone_sees_its_parent_and_its_writes_never_reach_the_parent() {
    let lab = Lab::start(&[]);
    let file = lab.d.path("parent.bin");
    pattern_file(&file, 4 << 20);
    let before = std::fs::read(&file).unwrap();
    lab.d.ctl_ok(&[
        "region",
        "create",
        "parent",
        "--from-file",
        file.to_str().unwrap(),
    ]);
    lab.d
        .ctl_ok(&["region", "create", "child", "--clone", "parent"]);
    // A job writes into the clone.
    let j = lab.job(
        &["child:rw"],
        &[&lab.probe(), "write", "child", "8192", "hello clone"],
    );
    assert_eq!(exit_code(&j), Some(0), "{j} {}", lab.err(&j));
    let audit = lab.d.audit();
    assert_eq!(
        rows(&audit, "region.write", "child").len(),
        1,
        "the kept write is a row"
    );
    assert_eq!(lab.region("child")["layer_pages"], 1);
    // The next job sees the clone's write there, and the parent's bytes elsewhere.
    let j = lab.job(&["child"], &[&lab.probe(), "text", "child", "8192", "11"]);
    assert_eq!(lab.out(&j).trim(), "hello clone", "{}", lab.err(&j));
    let j2 = lab.job(&["child"], &[&lab.probe(), "stride", "child", "7"]);
    // Page 2 (offset 8192) holds the write: the stride probe reads pages 0, 7, 14, ...
    assert_eq!(exit_code(&j2), Some(0), "{}", lab.out(&j2));
    let v = lab.job_region(&j2, "child");
    assert!(
        v["stats"]["faults"]["cow"].as_u64().unwrap() > 0,
        "parent pages are copy-on-write: {v}"
    );
    // The parent is untouched: in a job, and on disk.
    let j = lab.job(&["parent"], &[&lab.probe(), "sum", "parent", "8192", "11"]);
    let expect: u64 = (8192..8192 + 11).map(|o| pattern(o) as u64).sum();
    assert_eq!(lab.out(&j).trim(), format!("sum {expect}"));
    assert_eq!(std::fs::read(&file).unwrap(), before);
    // A read-only grant cannot be opened for writing.
    let j = lab.job(&["child"], &[&lab.probe(), "open", "child", "rw"]);
    assert_eq!(exit_code(&j), Some(3));
    assert!(lab.err(&j).contains("read-only"), "{}", lab.err(&j));
    // Publishing the clone freezes its content into chunks: same bytes, new generation.
    let v: Value =
        serde_json::from_str(&lab.d.ctl_ok(&["--json", "region", "publish", "child"])).unwrap();
    assert_eq!(v["generation"], 2);
    assert_eq!(v["base"]["kind"], "chunks");
    let j = lab.job(&["child"], &[&lab.probe(), "text", "child", "8192", "11"]);
    assert_eq!(lab.out(&j).trim(), "hello clone");
    // Regions outlive the daemon.
    let mut lab = lab;
    lab.d.sigterm();
    lab.d.launch();
    assert_eq!(lab.region("child")["generation"], 2);
    assert_eq!(lab.region("parent")["state"], "active");
}

#[test]
fn a_failing_backing_store_gets_sigbus_in_the_job_and_a_recorded_failure_not_a_hang() {
    let lab = Lab::start(&[]);
    let file = lab.d.path("short.bin");
    pattern_file(&file, 1 << 20);
    lab.d.ctl_ok(&[
        "region",
        "create",
        "short",
        "--from-file",
        file.to_str().unwrap(),
    ]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(64 << 10)
        .unwrap();
    let t0 = Instant::now();
    let j = lab.job(&["short"], &[&lab.probe(), "sum", "short", "0", "1048576"]);
    assert!(t0.elapsed() < LIVENESS);
    assert_eq!(exit_signal(&j), Some(libc::SIGBUS as i64), "{j}");
    let err = lab.err(&j);
    assert!(err.contains("SIGBUS") && err.contains("truncated"), "{err}");
    let v = lab.region("short");
    assert_eq!(v["stats"]["faults"]["failure"], 1, "{v}");
    assert!(
        v["failures"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("truncated")
    );
    let id = j["id"].as_str().unwrap();
    assert_eq!(rows(&lab.d.audit(), "region.fault-failed", id).len(), 1);
    assert!(
        lab.d
            .events()
            .iter()
            .any(|e| e["kind"] == "region-failure" && e["job"] == id)
    );

    // A corrupt chunk of a published region fails the same way, with its reason.
    let file = lab.d.path("pub.bin");
    pattern_file(&file, 1 << 20);
    lab.d.ctl_ok(&[
        "region",
        "create",
        "pub",
        "--from-file",
        file.to_str().unwrap(),
    ]);
    lab.d.ctl_ok(&["region", "publish", "pub"]);
    let chunks = lab.d.state_dir().join("regions/chunks");
    let victim = walk(&chunks).into_iter().next().expect("a chunk");
    std::fs::write(&victim, b"not the chunk").unwrap();
    let j = lab.job(&["pub"], &[&lab.probe(), "sum", "pub", "0", "1048576"]);
    assert_eq!(exit_signal(&j), Some(libc::SIGBUS as i64), "{j}");
    assert!(lab.err(&j).contains("corrupt"), "{}", lab.err(&j));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn revoke_invalidates_an_open_handle_and_refuses_new_opens() {
    let lab = Lab::start(&[]);
    let file = lab.d.path("r.bin");
    pattern_file(&file, 8 << 20);
    lab.d.ctl_ok(&[
        "region",
        "create",
        "r",
        "--from-file",
        file.to_str().unwrap(),
    ]);
    let go = lab.ws.join("go");
    let id = lab.start_job(
        &["r"],
        &[&lab.probe(), "hold", "r", "4194304", go.to_str().unwrap()],
    );
    common::daemon::wait_for_output(&lab.d, &id, "opened");
    // The open handle is listed, and accounted to the job's region_handle class.
    let v = lab.region("r");
    assert_eq!(
        (v["handles"].as_u64(), v["open"][0]["job"].as_str()),
        (Some(1), Some(id.as_str())),
        "{v}"
    );
    let classes = lab.d.get(&format!("/v1/classes?job={id}")).text();
    assert!(classes.contains("region_handle"), "{classes}");
    lab.d.ctl_ok(&["region", "revoke", "r"]);
    std::fs::write(&go, b"").unwrap();
    let j = lab.d.wait_ended(&id);
    assert_eq!(exit_signal(&j), Some(libc::SIGBUS as i64), "{j}");
    assert!(lab.err(&j).contains("revoked"), "{}", lab.err(&j));
    let v = lab.region("r");
    assert_eq!(
        (v["state"].as_str(), v["generation"].as_u64()),
        (Some("revoked"), Some(2))
    );
    // A new job cannot be given it, and a running one cannot open it.
    let out = lab.d.ctl(&[
        "run",
        "--policy-file",
        &lab.policy,
        "--region",
        "r",
        "--",
        "true",
    ]);
    assert!(!out.status.success() && common::daemon::err_text(&out).contains("revoked"));
    let audit = lab.d.audit();
    assert_eq!(rows(&audit, "region.revoke", "r").len(), 1);
    assert!(lab.d.verify()["ok"].as_bool().unwrap());
}

fn chunk_files(lab: &Lab) -> usize {
    walk(&lab.d.state_dir().join("regions/chunks")).len()
}

#[test]
fn delete_waits_for_open_handles_and_frees_only_what_no_other_region_names() {
    let lab = Lab::start(&[]);
    let file = lab.d.path("d.bin");
    pattern_file(&file, 4 << 20);
    lab.d.ctl_ok(&[
        "region",
        "create",
        "base-d",
        "--from-file",
        file.to_str().unwrap(),
    ]);
    lab.d.ctl_ok(&["region", "publish", "base-d"]);
    assert_eq!(chunk_files(&lab), 64, "4 MiB of distinct 64 KiB chunks");
    // A clone shares the parent's chunks; its one written page makes one chunk its own.
    lab.d
        .ctl_ok(&["region", "create", "child-d", "--clone", "base-d"]);
    let j = lab.job(
        &["child-d:rw"],
        &[&lab.probe(), "write", "child-d", "8192", "kept"],
    );
    assert_eq!(exit_code(&j), Some(0), "{}", lab.err(&j));
    lab.d.ctl_ok(&["region", "publish", "child-d"]);
    assert_eq!(chunk_files(&lab), 65);

    // An open handle: the delete is refused, and says what to do.
    let go = lab.ws.join("go-d");
    let id = lab.start_job(
        &["base-d"],
        &[
            &lab.probe(),
            "hold",
            "base-d",
            "1048576",
            go.to_str().unwrap(),
        ],
    );
    common::daemon::wait_for_output(&lab.d, &id, "opened");
    let out = lab.d.ctl(&["region", "delete", "base-d"]);
    let err = common::daemon::err_text(&out);
    assert!(
        !out.status.success() && err.contains("1 open handle") && err.contains("revoke"),
        "{err}"
    );
    assert_eq!(lab.region("base-d")["state"], "active");
    // Revoked, the handle fails at its next fault; closed, the region can go.
    lab.d.ctl_ok(&["region", "revoke", "base-d"]);
    std::fs::write(&go, b"").unwrap();
    let j = lab.d.wait_ended(&id);
    assert_eq!(exit_signal(&j), Some(libc::SIGBUS as i64), "{j}");
    wait_until("the handle closes", LIVENESS, || {
        lab.region("base-d")["handles"] == 0
    });
    let v: Value =
        serde_json::from_str(&lab.d.ctl_ok(&["--json", "region", "delete", "base-d"])).unwrap();
    // Only the chunk the clone replaced and the parent's manifest were its alone.
    assert_eq!(
        (
            v["freed"]["chunks"].as_u64(),
            v["freed"]["manifests"].as_u64()
        ),
        (Some(1), Some(1)),
        "{v}"
    );
    assert_eq!(v["region"]["name"], "base-d");
    assert_eq!(chunk_files(&lab), 64);
    assert_eq!(lab.d.get("/v1/regions/base-d").status, 404);
    let out = lab.d.ctl(&[
        "run",
        "--policy-file",
        &lab.policy,
        "--region",
        "base-d",
        "--",
        "true",
    ]);
    assert!(
        !out.status.success() && common::daemon::err_text(&out).contains("no region"),
        "{}",
        common::daemon::err_text(&out)
    );
    // The clone still reads its parent's bytes and its own write, after a restart too.
    let mut lab = lab;
    lab.d.sigterm();
    // As a crash between a recorded delete and its sweep would leave it: a chunk no
    // manifest names, an orphan layer, and the mark. The next daemon takes them back.
    let store = lab.d.state_dir().join("regions");
    let orphan_chunk = store.join("chunks/ab").join("ab".repeat(32));
    std::fs::create_dir_all(orphan_chunk.parent().unwrap()).unwrap();
    std::fs::write(&orphan_chunk, b"garbage").unwrap();
    let orphan_layer = store.join("layers/gone.map");
    std::fs::write(&orphan_layer, b"\x01").unwrap();
    std::fs::write(store.join("sweep-pending"), b"").unwrap();
    lab.d.launch();
    assert!(!orphan_chunk.exists() && !orphan_layer.exists());
    assert!(!store.join("sweep-pending").exists());
    assert_eq!(chunk_files(&lab), 64);
    assert_eq!(lab.d.get("/v1/regions/base-d").status, 404);
    let j = lab.job(
        &["child-d"],
        &[&lab.probe(), "text", "child-d", "8192", "4"],
    );
    assert_eq!(lab.out(&j).trim(), "kept", "{}", lab.err(&j));
    let j = lab.job(
        &["child-d"],
        &[&lab.probe(), "sum", "child-d", "3145728", "11"],
    );
    let expect: u64 = (3145728..3145728 + 11).map(|o| pattern(o) as u64).sum();
    assert_eq!(lab.out(&j).trim(), format!("sum {expect}"));
    // The last region goes with every chunk.
    lab.d.ctl_ok(&["region", "delete", "child-d"]);
    assert_eq!(chunk_files(&lab), 0);
    let audit = lab.d.audit();
    assert_eq!(rows(&audit, "region.delete", "base-d").len(), 1);
    assert_eq!(rows(&audit, "region.delete", "child-d").len(), 1);
    assert!(lab.d.verify()["ok"].as_bool().unwrap());
}

#[test]
fn a_job_without_a_grant_cannot_open_a_region_nor_call_userfaultfd() {
    let lab = Lab::start(&[]);
    lab.d
        .ctl_ok(&["region", "create", "secret", "--zero", "1M"]);
    lab.d.ctl_ok(&["region", "create", "other", "--zero", "1M"]);
    // No region at all: no broker socket, no device, the syscall denied.
    let j = lab.job(&[], &[&lab.probe(), "uffd"]);
    let out = lab.out(&j);
    assert!(
        out.contains("userfaultfd syscall: Operation not permitted"),
        "{out}"
    );
    assert!(
        out.contains("/dev/userfaultfd: No such file or directory"),
        "{out}"
    );
    let j = lab.job(&[], &[&lab.agentd(), "region", "cat", "secret"]);
    assert_eq!(exit_code(&j), Some(125));
    assert!(
        lab.err(&j).contains("cannot reach the region broker"),
        "{}",
        lab.err(&j)
    );
    // Given another region: this one is refused by the broker, and that is a row.
    let j = lab.job(&["other"], &[&lab.probe(), "open", "secret"]);
    assert_eq!(exit_code(&j), Some(3), "{}", lab.out(&j));
    assert!(lab.err(&j).contains("not-granted"), "{}", lab.err(&j));
    let id = j["id"].as_str().unwrap();
    let audit = lab.d.audit();
    let denied = rows(&audit, "region.open", id);
    assert_eq!(denied.len(), 1);
    assert!(
        denied[0]["authority"]
            .as_str()
            .unwrap()
            .starts_with("denied by region grant")
    );
    // Even a job with a region keeps the syscall denied: it gets the device only
    // through the broker.
    let j = lab.job(&["other"], &[&lab.probe(), "uffd"]);
    assert!(
        lab.out(&j)
            .contains("userfaultfd syscall: Operation not permitted")
    );
    // The policy decides at submit: a region it does not grant read-write is refused.
    let strict = lab.d.path("strict.toml");
    std::fs::write(
        &strict,
        std::fs::read_to_string(&lab.policy)
            .unwrap()
            .replace("allow = [\"child*:rw\", \"*\"]", "allow = [\"other\"]"),
    )
    .unwrap();
    for asked in ["other:rw", "secret"] {
        let out = lab.d.ctl(&[
            "run",
            "--policy-file",
            strict.to_str().unwrap(),
            "--region",
            asked,
            "--",
            "true",
        ]);
        assert_eq!(out.status.code(), Some(125));
        assert!(
            common::daemon::err_text(&out).contains("does not grant region"),
            "{}",
            common::daemon::show(&out)
        );
    }
}

#[test]
fn a_broker_killed_mid_fault_fails_the_access_instead_of_hanging_the_job() {
    // The broker reads the job's fault and never answers (injected); then the whole
    // daemon is killed with SIGKILL, as a crash would.
    let mut lab = Lab::start(&[("AGENTD_REGION_FAULT", "stall")]);
    lab.d.ctl_ok(&["region", "create", "stuck", "--zero", "1M"]);
    let go = lab.ws.join("go");
    std::fs::write(&go, b"").unwrap();
    let id = lab.start_job(
        &["stuck"],
        &[&lab.probe(), "hold", "stuck", "8192", go.to_str().unwrap()],
    );
    // Its first read already waits on the stalled broker.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.d.job(&id)["state"], "running");
    lab.d.sigkill();
    // The job does not wait forever: its watchdog fails the access.
    lab.d.launch();
    let j = lab.d.wait_ended(&id);
    assert_eq!(exit_signal(&j), Some(libc::SIGBUS as i64), "{j}");
    assert!(lab.err(&j).contains("went away"), "{}", lab.err(&j));
    wait_until("the audit chain verifies", LIVENESS, || {
        lab.d.verify()["ok"] == true
    });
}

#[test]
fn a_job_cannot_hold_more_than_64_handshakes_of_the_daemon() {
    let lab = Lab::start(&[]);
    lab.d.ctl_ok(&["region", "create", "z", "--zero", "1M"]);
    // 64 connections that never finish their handshake, then a 65th: refused at once.
    let py = r#"
import json, socket
held = []
for i in range(64):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect("/run/agentd/regions.sock")
    held.append(s)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect("/run/agentd/regions.sock")
s.settimeout(5)
print(json.loads(s.recv(4096))["kind"])
"#;
    let j = lab.job(&["z"], &["python3", "-c", py]);
    assert_eq!(exit_code(&j), Some(0), "{}", lab.err(&j));
    assert_eq!(lab.out(&j).trim(), "unavailable");
    // Those connections went with the job: the next job opens the region as usual.
    let j = lab.job(&["z"], &[&lab.probe(), "sum", "z", "0", "4096"]);
    assert_eq!(lab.out(&j).trim(), "sum 0", "{}", lab.err(&j));
}
