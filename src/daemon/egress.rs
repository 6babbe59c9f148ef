//! The daemon's side of the egress membrane: one proxy per `proxy` job, all served on
//! the daemon's runtime. Every decision is an event; every denial is also an operation
//! row, whose requester is the job (its host user, its init, its agent).

use super::{Daemon, now_ms};
use crate::api::types::EventKind;
use crate::audit::{NewOperation, Requester};
use crate::net::{Decision, EgressObserver, EgressPolicy, Membrane, ProxyListeners};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Denials of one job written as operation rows; past this, they are counted (events and
/// the report still carry them), so a job retrying in a loop cannot flood the table.
const DENIAL_ROWS_PER_JOB: u64 = 1000;

struct DaemonObserver {
    daemon: std::sync::Weak<Daemon>,
    job: String,
    requester: Requester,
    rows: AtomicU64,
}

impl EgressObserver for DaemonObserver {
    fn decided(&self, dec: &Decision) {
        let Some(d) = self.daemon.upgrade() else {
            return;
        };
        let (kind, detail) = if dec.allowed {
            (
                EventKind::EgressAllowed,
                format!(
                    "{} {} via {} ({})",
                    dec.protocol,
                    dec.destination,
                    dec.address.map(|a| a.to_string()).unwrap_or_default(),
                    dec.rule
                ),
            )
        } else {
            (
                EventKind::EgressDenied,
                format!(
                    "{} {}: {} [{}]",
                    dec.protocol, dec.destination, dec.reason, dec.rule
                ),
            )
        };
        d.events.emit(kind, Some(&self.job), None, detail);
        if dec.allowed {
            return;
        }
        d.metrics.denied(&dec.rule);
        // The job learns why at once, in its /run/agentd/self/denials.
        super::selfview::refresh_soon(&d, &self.job);
        let n = self.rows.fetch_add(1, Ordering::Relaxed);
        if n >= DENIAL_ROWS_PER_JOB {
            return;
        }
        let op = NewOperation {
            requester: self.requester.clone(),
            action: "egress.connect".into(),
            target: Some(self.job.clone()),
            authority: format!("denied by {}: {}", dec.rule, dec.reason),
            change: serde_json::json!({
                "job": self.job, "protocol": dec.protocol, "destination": dec.destination,
                "allowed": false, "time_ms": now_ms(),
                "note": if n + 1 == DENIAL_ROWS_PER_JOB {
                    "the last denial of this job recorded as a row; the rest are counted in its report"
                } else { "" },
            }),
            rollback: "nothing to undo: no connection was made".into(),
        };
        tokio::spawn(async move { d.record_op(op).await });
    }
}

/// Serves job `id`'s proxy endpoints; the membrane and its handle go into the job's
/// entry. `pid`: the job's init (the requester of what the job asks for).
pub fn serve(
    d: &Arc<Daemon>,
    id: &str,
    pid: i32,
    policy: EgressPolicy,
    listeners: ProxyListeners,
) -> std::io::Result<()> {
    let (agent, uid, gid) = {
        let jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs
            .get(id)
            .ok_or_else(|| std::io::Error::other("the job is gone"))?;
        (e.info.agent.clone(), e.runtime.job_uid, e.runtime.job_gid)
    };
    let observer = Arc::new(DaemonObserver {
        daemon: Arc::downgrade(d),
        job: id.to_owned(),
        requester: Requester {
            uid,
            gid,
            pid,
            agent: Some(agent),
        },
        rows: AtomicU64::new(0),
    });
    let membrane = Membrane::new(id, policy, observer);
    let serving = membrane.serve(listeners)?;
    if let Some(e) = d.jobs.lock().expect("jobs lock").get_mut(id) {
        e.egress = Some((membrane, serving));
    }
    Ok(())
}

/// After a restart: binds job `id`'s endpoints again inside its network namespace (the
/// previous daemon's sockets closed with it) and serves them. Counters start from zero.
pub fn readopt(
    d: &Arc<Daemon>,
    id: &str,
    pid: i32,
    pidfd: &std::os::fd::OwnedFd,
    policy: EgressPolicy,
) -> std::io::Result<()> {
    let listeners = crate::net::listeners::open_in(std::os::fd::AsFd::as_fd(pidfd))?;
    serve(d, id, pid, policy, listeners)
}

/// Stops job `id`'s proxy; its report section, if it had one.
pub fn stop(d: &Daemon, id: &str) -> Option<crate::net::NetworkReport> {
    let taken = d.jobs.lock().expect("jobs lock").get_mut(id)?.egress.take();
    taken.map(|(membrane, serving)| {
        drop(serving);
        membrane.report()
    })
}
