//! Published snapshots over the API: list, show, remove (which waits for borrowers),
//! and the release of a snapshot when the last job borrowing it ends.

use super::jobs::{ApiError, who};
use super::{Daemon, daemon_op};
use crate::api::types::SnapshotInfo;
use crate::audit::{NewOperation, Requester};
use crate::store::WriteBatch;
use crate::workspace::snapshot::{SnapshotMeta, SnapshotStore};
use std::sync::Arc;

pub fn store(d: &Daemon) -> SnapshotStore {
    SnapshotStore::new(&d.opts.state_dir)
}

/// Jobs that borrow snapshot `id` and have not ended.
pub fn holders(d: &Daemon, id: &str) -> Vec<String> {
    let mut ids: Vec<String> = d
        .jobs
        .lock()
        .expect("jobs lock")
        .values()
        .filter(|e| e.info.snapshot.as_deref() == Some(id) && !e.info.state.is_terminal())
        .map(|e| e.info.id.clone())
        .collect();
    ids.sort();
    ids
}

fn info(d: &Daemon, meta: SnapshotMeta) -> SnapshotInfo {
    SnapshotInfo {
        path: store(d).tree(&meta.id).display().to_string(),
        holders: holders(d, &meta.id),
        meta,
    }
}

/// GET /v1/snapshots
pub fn list(d: &Daemon) -> Vec<SnapshotInfo> {
    store(d).list().into_iter().map(|m| info(d, m)).collect()
}

/// GET /v1/snapshots/{id}
pub fn get(d: &Daemon, id: &str) -> Result<SnapshotInfo, ApiError> {
    store(d)
        .get(id)
        .map(|m| info(d, m))
        .ok_or_else(|| ApiError::not_found(format!("no snapshot {id}")))
}

/// DELETE /v1/snapshots/{id}: removes it now if nobody borrows it, else marks it so
/// it takes no new borrowers and goes when the last one ends (202).
pub async fn remove(
    d: &Arc<Daemon>,
    id: &str,
    requester: Requester,
) -> Result<(u16, SnapshotInfo), ApiError> {
    if requester.uid != 0 {
        let why = "removing a published snapshot is for root (other jobs may build on it)";
        super::jobs::deny(
            d,
            &requester,
            "snapshot.remove",
            Some(id),
            "snapshot removal",
            why,
        )
        .await;
        return Err(ApiError::forbidden(why));
    }
    let s = store(d);
    let meta = s
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no snapshot {id}")))?;
    let held = holders(d, id);
    let (status, after) = if held.is_empty() {
        let id2 = id.to_owned();
        tokio::task::spawn_blocking(move || s.remove(&id2))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::internal(e.to_string()))?;
        (200, "removed")
    } else {
        s.mark_removing(id)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        (202, "removing")
    };
    let op = NewOperation {
        requester: requester.clone(),
        action: "snapshot.remove".into(),
        target: Some(id.to_owned()),
        authority: format!("{} may remove snapshots (root)", who(&requester)),
        change: serde_json::json!({"snapshot": id, "state": {"before": "published", "after": after},
            "holders": held, "files": meta.files, "bytes": meta.bytes}),
        rollback: format!(
            "publish it again from its source {} (job {}): its content, and so its id, is the same",
            meta.source, meta.job
        ),
    };
    d.commit(WriteBatch {
        ops: vec![op],
        ..Default::default()
    })
    .await
    .map_err(|e| ApiError::internal(format!("cannot record the removal: {e}")))?;
    let mut meta = meta;
    meta.removing = after == "removing";
    Ok((
        status,
        SnapshotInfo {
            path: store(d).tree(id).display().to_string(),
            holders: held,
            meta,
        },
    ))
}

/// After a job that borrowed snapshot `id` ended: removes the snapshot if a removal
/// was waiting for it.
pub async fn released(d: &Arc<Daemon>, id: &str) {
    let s = store(d);
    let Some(meta) = s.get(id) else { return };
    if !meta.removing || !holders(d, id).is_empty() {
        return;
    }
    let id2 = id.to_owned();
    let removed = tokio::task::spawn_blocking(move || s.remove(&id2)).await;
    let outcome = match removed {
        Ok(Ok(())) => "removed",
        _ => "removal failed",
    };
    let op = daemon_op(
        "snapshot.remove",
        id,
        "its removal waited for its borrowers; the last one ended",
        serde_json::json!({"snapshot": id, "state": {"before": "removing", "after": outcome}}),
        format!(
            "publish it again from its source {} (job {})",
            meta.source, meta.job
        ),
    );
    let _ = d
        .commit(WriteBatch {
            ops: vec![op],
            ..Default::default()
        })
        .await;
}
