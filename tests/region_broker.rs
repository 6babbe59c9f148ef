//! The region broker on its own, in this process: a real userfaultfd from
//! /dev/userfaultfd, a real SOCK_SEQPACKET handshake, the client library reading the
//! region. (tests/regions.rs does the same through the daemon, from inside jobs.)

mod common;

use agentd::region::broker::{Hooks, Injected, Live};
use agentd::region::content::Content;
use agentd::region::session::{self, Allowed, Broker, Refusal};
use agentd::region::stats::{Counters, StatsView};
use agentd::region::store::RegionFiles;
use agentd::region::{Base, RegionInfo, RegionState};
use agentd_region::Region;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Recorded {
    failures: Mutex<Vec<String>>,
}

impl Hooks for Recorded {
    fn failed(&self, _job: &str, _region: &str, offset: u64, reason: &str) {
        self.failures
            .lock()
            .unwrap()
            .push(format!("{offset}: {reason}"));
    }
    fn written(&self, _: &str, _: &str, _: &[(u64, Vec<u8>)]) -> Result<(), String> {
        Ok(())
    }
    fn closed(&self, _: &str, _: &str) {}
}

fn info(name: &str, size: u64, base: Base) -> RegionInfo {
    RegionInfo {
        name: name.into(),
        size,
        generation: 1,
        state: RegionState::Active,
        base,
        base_inherited: false,
        layer_pages: 0,
        parent: None,
        created_ms: 0,
        published_ms: None,
        revoked_ms: None,
        owner_uid: 0,
    }
}

/// One region served on a socket in `dir`; the client finds it through the env var.
fn serve(
    dir: &std::path::Path,
    region: RegionInfo,
    injected: Injected,
) -> (session::Listener, Arc<Live>, Arc<Recorded>) {
    let files = RegionFiles::new(dir);
    files.ensure().unwrap();
    let live = Arc::new(Live::new(region.generation, false));
    let hooks = Arc::new(Recorded::default());
    let job_stats = Arc::new(Counters::default());
    let decide = {
        let live = live.clone();
        move |name: &str, _write: bool| {
            if name != region.name {
                return Err(Refusal {
                    kind: "no-such-region",
                    why: format!("no region {name}"),
                });
            }
            Ok(Allowed {
                live: live.clone(),
                content: Content::open(&files, &region).map_err(|why| Refusal {
                    kind: "unavailable",
                    why,
                })?,
                job_stats: job_stats.clone(),
                charge: None,
            })
        }
    };
    let sock = dir.join("regions.sock");
    let listener = session::listen(
        &sock,
        Broker {
            job: "test".into(),
            decide: Box::new(decide),
            hooks: hooks.clone(),
            injected: Arc::new(injected),
            active: Default::default(),
        },
    )
    .unwrap();
    // SAFETY: set before any client of this test reads it; tests here are serial.
    unsafe { std::env::set_var(agentd_region::proto::SOCKET_ENV, &sock) };
    (listener, live, hooks)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 4096 * 7 + i % 251) as u8).collect()
}

#[test]
fn file_region_serves_sparse_reads_and_sequential_read_ahead() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(32 << 20);
    let file = dir.path().join("backing");
    std::fs::write(&file, &data).unwrap();
    let base = Base::File {
        path: file.display().to_string(),
    };
    let (_l, live, hooks) = serve(
        dir.path(),
        info("f", data.len() as u64, base),
        Injected::default(),
    );
    let r = Region::open("f", false).unwrap();
    assert_eq!(r.len(), data.len() as u64);
    let s = r.as_slice();
    // Sparse: 8 pages far apart, each served alone.
    for i in 0..8usize {
        let at = i * (4 << 20) + 123;
        assert_eq!(s[at], data[at], "byte {at}");
    }
    let st = settled(&live, |s| s.faults["fetch"] >= 8);
    assert_eq!(st.faults["fetch"], 8, "{st:?}");
    assert_eq!(st.bytes_fetched, 8 * 4096, "{st:?}");
    // Sequential: the whole first 8 MiB, with read-ahead.
    assert_eq!(&s[..8 << 20], &data[..8 << 20]);
    let st = settled(&live, |s| {
        s.readahead_pages > 1500 && s.readahead_hits > 1000
    });
    assert!(
        st.faults_total() < 200,
        "read-ahead serves most pages: {st:?}"
    );
    assert!(
        st.readahead_pages > 1500 && st.readahead_hits > 1000,
        "{st:?}"
    );
    assert!(hooks.failures.lock().unwrap().is_empty());
    drop(r);
}

/// The broker counts a fault once the page is in place, and the copy that puts it
/// there wakes the reader first: the counters settle a moment after the access.
fn settled(live: &Live, done: impl Fn(&StatsView) -> bool) -> StatsView {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let st = live.stats.snapshot();
        if done(&st) || std::time::Instant::now() > until {
            return st;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn a_busy_store_is_retried_and_a_truncated_file_fails_with_sigbus_not_a_hang() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(1 << 20);
    let file = dir.path().join("backing");
    std::fs::write(&file, &data).unwrap();
    let base = Base::File {
        path: file.display().to_string(),
    };
    let busy = Injected::default();
    busy.busy.store(3, std::sync::atomic::Ordering::SeqCst);
    let (_l, live, hooks) = serve(dir.path(), info("t", data.len() as u64, base), busy);
    let r = Region::open("t", false).unwrap();
    assert_eq!(r.as_slice()[5000], data[5000]);
    let st = settled(&live, |s| s.faults["retry"] >= 1);
    assert_eq!(st.faults["retry"], 1, "{st:?}");
    // Shrink the file: a page past its new end must fail with SIGBUS, not hang.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(64 << 10)
        .unwrap();
    let out = read_in_child(&[("READ_AT", "524288")]);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGBUS),
        "{out:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("truncated"),
        "the reason reaches the job: {err}"
    );
    let failures = hooks.failures.lock().unwrap().clone();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].starts_with("524288: the backing file"),
        "{failures:?}"
    );
    assert_eq!(
        settled(&live, |s| s.faults["failure"] >= 1).faults["failure"],
        1
    );
    // Bytes before the new end still read.
    assert_eq!(read_in_child(&[("READ_AT", "4096")]).status.code(), Some(0));
    drop(r);
}

#[test]
fn a_broker_that_stops_answering_and_dies_fails_the_access() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let stall = Injected::default();
    stall.stall.store(true, std::sync::atomic::Ordering::SeqCst);
    let (listener, _live, _hooks) = serve(dir.path(), info("z", 1 << 20, Base::Zero), stall);
    // The reader faults and waits; then the broker's side goes away: its handle's
    // connection is shut down, as a broker's death would close it.
    let mut child = reader_cmd(&[("READ_AT", "8192")]).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the access waits on the stalled broker"
    );
    drop(listener);
    close_broker_sockets();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed().as_secs() < 20, "the reader hangs");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGBUS)
    );
}

/// Shuts down this process's region sockets (the broker's side of every handle).
fn close_broker_sockets() {
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.to_string_lossy().starts_with("socket:") {
            let fd: i32 = e.file_name().to_string_lossy().parse().unwrap();
            let mut ty = 0i32;
            let mut len = 4u32;
            // SAFETY: getsockopt into a local int.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_TYPE,
                    (&raw mut ty).cast(),
                    &mut len,
                )
            };
            if r == 0 && ty == libc::SOCK_SEQPACKET {
                // SAFETY: shutdown of a socket of this test process.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
    }
}

fn reader_cmd(env: &[(&str, &str)]) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args([
        "--ignored",
        "--exact",
        "reader",
        "--nocapture",
        "--test-threads=1",
    ]);
    c.envs(env.iter().copied());
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

fn read_in_child(env: &[(&str, &str)]) -> std::process::Output {
    reader_cmd(env).output().unwrap()
}

/// Run by the tests above as a separate process (a SIGBUS must not take the test
/// harness with it): opens the region named by the socket in AGENTD_REGIONS_SOCKET and
/// reads the byte at READ_AT, reporting a SIGBUS's reason on stderr.
#[test]
#[ignore = "a helper the other tests run as a subprocess"]
fn reader() {
    let at: usize = std::env::var("READ_AT").unwrap().parse().unwrap();
    let r = ["f", "t", "z"]
        .iter()
        .find_map(|n| Region::open(n, false).ok())
        .expect("one of the test regions opens");
    extern "C" fn on_sigbus(_: i32) {
        let mut buf = [0u8; 512];
        for _ in 0..50 {
            let n = agentd_region::client::last_failure_into(&mut buf);
            if n > 0 {
                // SAFETY: write(2) is async-signal-safe.
                unsafe { libc::write(2, buf.as_ptr().cast(), n) };
                break;
            }
            // SAFETY: nanosleep-based usleep is async-signal-safe.
            unsafe { libc::usleep(10_000) };
        }
        // SAFETY: restore the default action and re-raise: the exit status says SIGBUS.
        unsafe {
            libc::signal(libc::SIGBUS, libc::SIG_DFL);
            libc::raise(libc::SIGBUS);
        }
    }
    // SAFETY: installing a handler that only calls async-signal-safe functions.
    unsafe { libc::signal(libc::SIGBUS, on_sigbus as *const () as usize) };
    // SAFETY: reading the mapped region; a page that cannot be served raises SIGBUS.
    let b = unsafe { std::ptr::read_volatile(r.as_ptr().add(at)) };
    println!("byte {b}");
}
