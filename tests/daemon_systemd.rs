//! agentd serve under a service manager, without one: the notification protocol
//! systemd speaks (a datagram socket named by NOTIFY_SOCKET) is played by the test.
//! READY=1 comes only once the API answers; watchdog pings come at half of
//! WATCHDOG_USEC; STOPPING=1 comes on SIGTERM.

mod common;

use common::daemon::*;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// Reads the next notification (one datagram), within `within`.
fn next_notification(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(_) => None,
    }
}

#[test]
fn ready_after_the_socket_answers_watchdog_pings_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut d = TestDaemon::start_with_env(
        &[],
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );

    // The first word is READY=1, and by then the API answers.
    let first = next_notification(&notify, LIVENESS).expect("no notification at all");
    assert!(
        first.lines().any(|l| l == "READY=1"),
        "the first notification is not READY=1: {first:?}"
    );
    assert_eq!(
        d.get("/v1/health").status,
        200,
        "READY=1 before the API answers"
    );

    // Watchdog pings, at half the interval: several within two seconds.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(2) {
        match next_notification(&notify, Duration::from_secs(2)) {
            Some(m) if m.lines().any(|l| l == "WATCHDOG=1") => pings += 1,
            Some(other) => panic!("unexpected notification {other:?}"),
            None => break,
        }
    }
    assert!(
        pings >= 3,
        "{pings} watchdog pings in 2 s with WATCHDOG_USEC=400000"
    );

    // SIGTERM: STOPPING=1, and the daemon exits with 0 (and leaves jobs alone).
    let job = d.run_detached(&[], &["sleep", "60"]);
    let status = d.sigterm();
    assert_eq!(
        status.code(),
        Some(0),
        "the daemon's exit on SIGTERM: {status:?}"
    );
    let mut stopping = false;
    while let Some(m) = next_notification(&notify, Duration::from_secs(1)) {
        stopping |= m.lines().any(|l| l == "STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    // The job outlived it; a restarted daemon adopts it (and the guard cleans up).
    d.launch();
    let j = d.job(&job);
    assert_eq!(j["state"], "running", "{j}");
}
