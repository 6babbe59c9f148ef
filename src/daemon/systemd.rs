//! Living under systemd (and without it): readiness and watchdog notifications, logs
//! to journald with structured fields (stderr otherwise), the daemon's own leaf cgroup,
//! and the descriptor limit a thousand jobs need.

use crate::cgroup::{HostCgroups, Layout};
use std::time::Duration;

/// journald when systemd connected our output to it (JOURNAL_STREAM), else stderr.
/// RUST_LOG (or AGENTD_LOG) filters, default `info`.
pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTD_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = tracing_subscriber::registry()
            .with(filter)
            // No "F_" prefix (the crate's default) on our fields: README and the unit
            // promise `journalctl -u agentd JOB=ID EVENT=started`.
            .with(
                journald
                    .with_syslog_identifier("agentd".into())
                    .with_field_prefix(None),
            )
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Each running job holds a pidfd, and each API connection a socket: lift the soft
/// descriptor limit to the hard one. Returns the limit jobs should get instead: the
/// usual soft limit (at most 1024, which select()-based programs and programs that
/// close every possible descriptor expect), with the hard limit as it was.
pub fn raise_fd_limit() -> Option<(u64, u64)> {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        let for_jobs = (lim.rlim_cur.min(1024), lim.rlim_max);
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        Some(for_jobs)
    }
}

/// The leaf the daemon moves itself into (DelegateSubgroup= in the unit names the same).
pub const SUPERVISOR_LEAF: &str = "supervisor";

/// On a cgroup v2 host without `--cgroup-parent`: job cgroups go next to the daemon's
/// own, below the service's delegated cgroup. If systemd put the daemon in the
/// `supervisor` leaf already (DelegateSubgroup=supervisor), the parent is the service's
/// cgroup. If the daemon is alone in its cgroup, it creates that leaf and moves itself
/// there (the v2 "no internal processes" rule forbids controllers for children of a
/// cgroup that has processes). Otherwise jobs go below the daemon's own cgroup, as for
/// `agentd run`. Returns the job parent, if it is not the default.
pub fn enter_leaf_cgroup(
    host: &HostCgroups,
    parent: Option<&str>,
) -> Result<Option<String>, String> {
    let (Layout::Unified, None, Some(tree)) = (host.layout, parent, host.v2.as_ref()) else {
        return Ok(None);
    };
    let own = tree.own.trim_end_matches('/').to_owned();
    if let Some(service) = own.strip_suffix(&format!("/{SUPERVISOR_LEAF}")) {
        return Ok(Some(if service.is_empty() {
            "/".into()
        } else {
            service.into()
        }));
    }
    if own.is_empty() || own == "/" {
        return Ok(None);
    }
    let own_dir = crate::cgroup::join_cgroup(&tree.mount, &own);
    let procs = std::fs::read_to_string(own_dir.join("cgroup.procs")).unwrap_or_default();
    let me = std::process::id().to_string();
    if procs.lines().any(|p| p != me) {
        return Ok(None);
    }
    let leaf = own_dir.join(SUPERVISOR_LEAF);
    if let Err(e) = std::fs::create_dir(&leaf)
        && e.kind() != std::io::ErrorKind::AlreadyExists
    {
        return Err(format!("cannot create {}: {e}", leaf.display()));
    }
    std::fs::write(leaf.join("cgroup.procs"), &me)
        .map_err(|e| format!("cannot move agentd into {}: {e}", leaf.display()))?;
    Ok(Some(own))
}

pub fn notify_ready() {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("accepting requests"),
    ]);
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Pings systemd's watchdog at half its interval, from the runtime that serves the
/// API: a wedged runtime stops the pings and systemd restarts the daemon.
pub async fn watchdog_loop() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval((interval / 2).max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
    }
}
