//! Leases: scoped authority. A client takes a lease with a time to live and keeps
//! renewing it; jobs started under it are cancelled when it expires or is released, so
//! a client that dies leaves no job behind. A durable job (`detach`) has no lease.

use super::jobs::{ApiError, who};
use super::{Daemon, now_ms};
use crate::api::types::{EventKind, LeaseInfo, LeaseState};
use crate::audit::{NewOperation, Requester};
use crate::store::WriteBatch;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Shortest and longest time to live a lease may ask for.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

fn parse_ttl(ttl: &str) -> Result<Duration, ApiError> {
    let d =
        crate::spec::parse_duration(ttl).map_err(|m| ApiError::bad_request(format!("ttl: {m}")))?;
    if d < MIN_TTL || d > MAX_TTL {
        return Err(ApiError::bad_request(format!(
            "ttl: expected between 1s and 24h, got {ttl}"
        )));
    }
    Ok(d)
}

/// Jobs bound to `lease` that have not ended.
pub fn jobs_of(d: &Daemon, lease: &str) -> Vec<String> {
    let jobs = d.jobs.lock().expect("jobs lock");
    let mut ids: Vec<String> = jobs
        .values()
        .filter(|e| e.info.lease.as_deref() == Some(lease) && !e.info.state.is_terminal())
        .map(|e| e.info.id.clone())
        .collect();
    ids.sort();
    ids
}

fn with_jobs(d: &Daemon, mut lease: LeaseInfo) -> LeaseInfo {
    lease.jobs = jobs_of(d, &lease.id);
    lease
}

pub fn list(d: &Daemon) -> Vec<LeaseInfo> {
    let leases: Vec<LeaseInfo> = d
        .leases
        .lock()
        .expect("leases lock")
        .values()
        .cloned()
        .collect();
    let mut out: Vec<LeaseInfo> = leases.into_iter().map(|l| with_jobs(d, l)).collect();
    out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    out
}

/// A job may be started under `id` only by its owner (or root) while it is active.
pub fn check_usable(d: &Daemon, id: &str, requester: &Requester) -> Result<(), ApiError> {
    check_usable_in(&d.leases.lock().expect("leases lock"), id, requester)
}

/// `check_usable` on the leases table the caller holds locked: a lease ends by marking
/// itself under that lock and only then lists its jobs, so whatever the caller does to
/// the jobs table before letting go is seen by the lease's end.
pub fn check_usable_in(
    leases: &HashMap<String, LeaseInfo>,
    id: &str,
    requester: &Requester,
) -> Result<(), ApiError> {
    let l = leases
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no lease {id}")))?;
    if l.state != LeaseState::Active {
        return Err(ApiError::conflict(format!(
            "lease {id} is {}; take a new one",
            l.state.as_str()
        )));
    }
    if requester.uid != 0 && requester.uid != l.owner_uid {
        return Err(ApiError::forbidden(format!(
            "lease {id} belongs to uid {}, not to uid {}",
            l.owner_uid, requester.uid
        )));
    }
    Ok(())
}

/// POST /v1/leases
pub async fn take(d: &Daemon, requester: Requester, ttl: &str) -> Result<LeaseInfo, ApiError> {
    let ttl = parse_ttl(ttl)?;
    let now = now_ms();
    let lease = LeaseInfo {
        id: crate::job::new_job_id(),
        owner_uid: requester.uid,
        state: LeaseState::Active,
        ttl_ms: ttl.as_millis() as u64,
        created_ms: now,
        expires_ms: now + ttl.as_millis() as u64,
        jobs: Vec::new(),
    };
    let op = NewOperation {
        requester: requester.clone(),
        action: "lease.take".into(),
        target: Some(lease.id.clone()),
        authority: format!("{} may take leases", who(&requester)),
        change: serde_json::json!({"lease": lease.id, "state": {"before": null, "after": "active"}, "ttl_ms": lease.ttl_ms}),
        rollback: format!("agentctl lease release {}", lease.id),
    };
    d.commit(WriteBatch::lease(lease.clone(), op))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    d.leases
        .lock()
        .expect("leases lock")
        .insert(lease.id.clone(), lease.clone());
    d.events.emit(
        EventKind::LeaseTaken,
        None,
        Some(&lease.id),
        format!("ttl {}", super::human_duration(ttl)),
    );
    Ok(lease)
}

fn owned_active(d: &Daemon, id: &str, requester: &Requester) -> Result<LeaseInfo, ApiError> {
    check_usable(d, id, requester)?;
    Ok(d.leases.lock().expect("leases lock")[id].clone())
}

/// POST /v1/leases/{id}/renew
pub async fn renew(
    d: &Daemon,
    requester: Requester,
    id: &str,
    ttl: Option<&str>,
) -> Result<LeaseInfo, ApiError> {
    let mut lease = owned_active(d, id, &requester)?;
    if let Some(t) = ttl {
        lease.ttl_ms = parse_ttl(t)?.as_millis() as u64;
    }
    let before = lease.expires_ms;
    lease.expires_ms = now_ms() + lease.ttl_ms;
    let op = NewOperation {
        requester: requester.clone(),
        action: "lease.renew".into(),
        target: Some(id.into()),
        authority: format!("{} owns lease {id}", who(&requester)),
        change: serde_json::json!({"lease": id, "expires_ms": {"before": before, "after": lease.expires_ms}}),
        rollback: "none needed: the lease expires by itself".into(),
    };
    d.commit(WriteBatch::lease(lease.clone(), op))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    {
        let mut leases = d.leases.lock().expect("leases lock");
        if let Some(l) = leases.get_mut(id).filter(|l| l.state == LeaseState::Active) {
            l.expires_ms = lease.expires_ms;
            l.ttl_ms = lease.ttl_ms;
        }
    }
    d.events
        .emit(EventKind::LeaseRenewed, None, Some(id), String::new());
    Ok(with_jobs(d, lease))
}

/// POST /v1/leases/{id}/release
pub async fn release(
    d: &Arc<Daemon>,
    requester: Requester,
    id: &str,
) -> Result<LeaseInfo, ApiError> {
    owned_active(d, id, &requester)?;
    let authority = format!("{} owns lease {id}", who(&requester));
    end(d, id, LeaseState::Released, requester, authority).await
}

/// Ends a lease (released or expired) and cancels its jobs.
async fn end(
    d: &Arc<Daemon>,
    id: &str,
    state: LeaseState,
    requester: Requester,
    authority: String,
) -> Result<LeaseInfo, ApiError> {
    let lease = {
        let mut leases = d.leases.lock().expect("leases lock");
        let l = leases
            .get_mut(id)
            .ok_or_else(|| ApiError::not_found(format!("no lease {id}")))?;
        if l.state != LeaseState::Active {
            return Err(ApiError::conflict(format!(
                "lease {id} is {}",
                l.state.as_str()
            )));
        }
        l.state = state;
        l.clone()
    };
    let jobs = jobs_of(d, id);
    let (action, kind) = match state {
        LeaseState::Expired => ("lease.expire", EventKind::LeaseExpired),
        _ => ("lease.release", EventKind::LeaseReleased),
    };
    let op = NewOperation {
        requester,
        action: action.into(),
        target: Some(id.into()),
        authority,
        change: serde_json::json!({"lease": id, "state": {"before": "active", "after": state.as_str()}, "jobs_cancelled": jobs}),
        rollback: "cannot be undone: take a new lease; the cancelled jobs are gone".into(),
    };
    d.commit(WriteBatch::lease(lease.clone(), op))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    d.events.emit(
        kind,
        None,
        Some(id),
        format!("{} job(s) cancelled", jobs.len()),
    );
    // All at once: each cancellation waits for its own row to reach the disk, and the
    // group commit writes them together.
    let cancels = jobs.iter().map(|job| {
        let reason = format!(
            "its lease {id} {}",
            match state {
                LeaseState::Expired => "expired",
                _ => "was released",
            }
        );
        if state == LeaseState::Expired {
            d.events
                .emit(EventKind::LeaseExpired, Some(job), Some(id), reason.clone());
        }
        super::jobs::cancel(
            d,
            job,
            libc::SIGTERM,
            None,
            reason,
            Requester::daemon(),
            format!("lease {id} ended ({})", state.as_str()),
        )
    });
    futures_util::future::join_all(cancels).await;
    Ok(with_jobs(d, lease))
}

/// Expires leases whose time ran out, every 100 ms.
pub async fn expiry_loop(d: Arc<Daemon>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        expire_due(&d).await;
    }
}

pub async fn expire_due(d: &Arc<Daemon>) {
    let now = now_ms();
    let due: Vec<String> = d
        .leases
        .lock()
        .expect("leases lock")
        .values()
        .filter(|l| l.state == LeaseState::Active && l.expires_ms <= now)
        .map(|l| l.id.clone())
        .collect();
    for id in due {
        let _ = end(
            d,
            &id,
            LeaseState::Expired,
            Requester::daemon(),
            "its time to live passed without a renewal".into(),
        )
        .await;
    }
}
