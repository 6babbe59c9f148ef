//! Context segments: prompt or context text a running job stores with the daemon
//! (`PUT /v1/self/context/NAME` on its socket) and reads back later, so an agent can
//! keep a long context outside its own memory limit and share nothing with other jobs.
//! Segments live in the daemon's memory for as long as the job runs (dropped when it
//! ends; a restarted daemon starts the job's segments afresh, which the job sees as 404:
//! they are a cache the job can rebuild, not its state). Every byte is charged to the
//! `context_segment` class and bounded by the job's `[quotas]`, so a job cannot run the
//! daemon out of memory; a refused store is a typed 429 and an operation row.
//!
//! Also here: how any quota refusal is recorded (tool calls use it too).

use super::Daemon;
use crate::api::types::EventKind;
use crate::audit::{NewOperation, Requester};
use crate::telemetry::classes::{Charge, Quota, QuotaExceeded};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};

/// The largest one segment may be (the request body is bounded by it too).
pub const MAX_SEGMENT_BYTES: usize = 16 << 20;

/// Refusals a job's view lists (the newest; older ones are in the operation table).
const REFUSALS_KEPT: usize = 32;

/// A job's segments and what they are charged.
#[derive(Debug)]
pub struct Segments {
    map: BTreeMap<String, Segment>,
    charge: Charge,
    /// The job's recent quota refusals, for its /run/agentd/self/denials.
    pub refusals: VecDeque<serde_json::Value>,
}

#[derive(Debug)]
struct Segment {
    content: bytes::Bytes,
    sha256: String,
    stored_ms: u64,
}

/// A segment as the job (and `export`) sees it, without its content.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentInfo {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
    pub stored_ms: u64,
}

/// What one segment costs the daemon.
fn cost(name: &str, content_len: usize) -> u64 {
    (std::mem::size_of::<Segment>() + name.len() + 64 + content_len) as u64
}

/// Segment names: what a file name may be, short.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "segment name: expected 1 to 128 of letters, digits, '.', '_', '-' (not starting with '.'), got {name:?}"
        ))
    }
}

impl Segments {
    pub fn new(charge: Charge) -> Segments {
        Segments {
            map: BTreeMap::new(),
            charge,
            refusals: VecDeque::new(),
        }
    }

    /// Would storing `len` bytes as `name` fit `quota`? Asked before the body is read,
    /// so a refused store never makes the daemon buffer it.
    pub fn admits(&self, name: &str, len: usize, quota: Quota) -> Result<(), QuotaExceeded> {
        let old = self.map.get(name).map(|s| cost(name, s.content.len()));
        let new = cost(name, len);
        let (objects, bytes) = (
            u64::from(old.is_none()),
            new.saturating_sub(old.unwrap_or(0)),
        );
        crate::telemetry::classes::check_quota(
            crate::telemetry::classes::Class::ContextSegment,
            "",
            (self.charge.live(), self.charge.bytes()),
            (objects, bytes),
            quota,
        )
    }

    /// Stores (or replaces) segment `name`.
    pub fn put(
        &mut self,
        name: &str,
        content: bytes::Bytes,
        quota: Quota,
        now_ms: u64,
    ) -> Result<SegmentInfo, QuotaExceeded> {
        use sha2::Digest;
        let new = cost(name, content.len());
        match self.map.get(name).map(|s| cost(name, s.content.len())) {
            Some(old) if new > old => self.charge.grow(0, new - old, quota)?,
            Some(old) => self.charge.shrink(0, old - new),
            None => self.charge.grow(1, new, quota)?,
        }
        let segment = Segment {
            sha256: crate::spec::hex(&sha2::Sha256::digest(&content)),
            content,
            stored_ms: now_ms,
        };
        let info = info(name, &segment);
        self.map.insert(name.to_owned(), segment);
        Ok(info)
    }

    pub fn get(&self, name: &str) -> Option<bytes::Bytes> {
        self.map.get(name).map(|s| s.content.clone())
    }

    pub fn list(&self) -> Vec<SegmentInfo> {
        self.map.iter().map(|(n, s)| info(n, s)).collect()
    }

    pub fn remove(&mut self, name: &str) -> bool {
        match self.map.remove(name) {
            Some(s) => {
                self.charge.shrink(1, cost(name, s.content.len()));
                true
            }
            None => false,
        }
    }

    /// The job ended: its segments go.
    pub fn clear(&mut self) {
        self.map.clear();
        let (live, bytes) = (self.charge.live(), self.charge.bytes());
        self.charge.shrink(live, bytes);
    }

    /// Remembers a refusal for the job's view (bounded).
    pub fn remember_refusal(&mut self, refusal: serde_json::Value) {
        if self.refusals.len() == REFUSALS_KEPT {
            self.refusals.pop_front();
        }
        self.refusals.push_back(refusal);
    }
}

fn info(name: &str, s: &Segment) -> SegmentInfo {
    SegmentInfo {
        name: name.to_owned(),
        bytes: s.content.len() as u64,
        sha256: s.sha256.clone(),
        stored_ms: s.stored_ms,
    }
}

/// Records job `id`'s refused `action` over a quota: an operation row with the rule, a
/// `denied` event, the metric, and a line in the job's own view. Returns the 429.
pub async fn refuse(
    d: &std::sync::Arc<Daemon>,
    id: &str,
    action: &str,
    mut e: QuotaExceeded,
) -> super::jobs::ApiError {
    e.job = id.to_owned();
    let (policy, requester) = {
        let mut jobs = d.jobs.lock().expect("jobs lock");
        let Some(entry) = jobs.get_mut(id) else {
            return super::jobs::ApiError::not_found("this job is not known to the daemon");
        };
        let policy = entry.info.policy.clone();
        let key = crate::spec::quotas::key_of(e.class, e.bound);
        entry.context.remember_refusal(serde_json::json!({
            "protocol": "quota", "destination": key,
            "reason": format!("{action}: {e}"), "rule": format!("{policy}:{key}"),
        }));
        (
            policy,
            Requester {
                uid: entry.runtime.job_uid,
                gid: entry.runtime.job_gid,
                pid: entry.info.pid.unwrap_or(0),
                agent: Some(entry.info.agent.clone()),
            },
        )
    };
    let refusal = super::jobs::ApiError::quota(&e, &policy);
    d.metrics.denied("quota");
    d.events.emit(
        EventKind::Denied,
        Some(id),
        None,
        format!("{action}: {}", refusal.message),
    );
    d.record_op(NewOperation {
        requester,
        action: action.into(),
        target: Some(id.to_owned()),
        authority: format!("denied by {}", refusal.message),
        change: serde_json::json!({}),
        rollback: "nothing changed".into(),
    })
    .await;
    super::selfview::refresh_soon(d, id);
    refusal
}
