//! Review workspaces over the API: a job given `workspace_mode: review` works on a
//! unique overlay of its source directory; after it ends its change is shown (diff),
//! applied (accept) or thrown away (reject). One live unique handle per source: a
//! second review job on the same directory is refused until the first is decided.

use super::jobs::{ApiError, check_owner, deny, who};
use super::{Daemon, now_ms};
use crate::api::types::{AcceptRequest, DiffResponse, EventKind, JobInfo, ReviewInfo, ReviewState};
use crate::audit::{NewOperation, Requester};
use crate::store::{JobRecord, WriteBatch};
use crate::workspace::{ReviewLayers, WorkspaceError, apply, diff, git};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How many changed source entries a refusal names.
const MOVED_ON_SHOWN: usize = 10;

/// Claims `source` for job `id`; the job holding it if another does.
pub fn claim(d: &Daemon, source: &str, id: &str) -> Result<(), String> {
    let mut reviews = d.reviews.lock().expect("reviews lock");
    match reviews.get(source) {
        Some(holder) if holder != id => Err(holder.clone()),
        _ => {
            reviews.insert(source.to_owned(), id.to_owned());
            Ok(())
        }
    }
}

/// Gives `source` up (the change was decided, or the job never started).
pub fn release(d: &Daemon, source: &str, id: &str) {
    let mut reviews = d.reviews.lock().expect("reviews lock");
    if reviews.get(source).is_some_and(|j| j == id) {
        reviews.remove(source);
    }
}

/// The sources held by undecided review jobs, from the store (at start-up).
pub fn held_sources(records: &[JobRecord]) -> Vec<(String, String)> {
    records
        .iter()
        .filter_map(|r| {
            let review = r.info.review.as_ref()?;
            matches!(review.state, ReviewState::Open | ReviewState::Pending)
                .then(|| (review.source.clone(), r.info.id.clone()))
        })
        .collect()
}

/// A job's end makes its change complete: open → pending.
pub fn job_ended(info: &mut JobInfo) {
    if let Some(r) = &mut info.review
        && r.state == ReviewState::Open
    {
        r.state = ReviewState::Pending;
    }
}

/// The job's record (memory first, then the store) with its review, which must be
/// pending for accept and reject.
fn load(d: &Daemon, id: &str) -> Result<(JobRecord, ReviewInfo), ApiError> {
    let in_memory = d
        .jobs
        .lock()
        .expect("jobs lock")
        .get(id)
        .map(|e| e.record());
    let record = match in_memory {
        Some(r) => r,
        None => d
            .store
            .job(id)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?,
    };
    let review = record.info.review.clone().ok_or_else(|| {
        ApiError::conflict(format!(
            "job {id} has no review workspace (submit it with workspace_mode \"review\": agentctl run --review)"
        ))
    })?;
    Ok((record, review))
}

async fn owner_or_root(
    d: &Daemon,
    record: &JobRecord,
    requester: &Requester,
    action: &str,
) -> Result<(), ApiError> {
    if requester.uid == 0 || requester.uid == record.info.requester.uid {
        return Ok(());
    }
    if d.jobs
        .lock()
        .expect("jobs lock")
        .contains_key(&record.info.id)
    {
        return check_owner(d, &record.info.id, requester, action).await;
    }
    let why = format!(
        "job {} was submitted by uid {}; only that user or root may decide its change",
        record.info.id, record.info.requester.uid
    );
    deny(
        d,
        requester,
        action,
        Some(&record.info.id),
        "job ownership",
        &why,
    )
    .await;
    Err(ApiError::forbidden(why))
}

/// GET /v1/jobs/{id}/diff
pub async fn diff(
    d: &Arc<Daemon>,
    id: &str,
    requester: &Requester,
) -> Result<DiffResponse, ApiError> {
    let (record, review) = load(d, id)?;
    owner_or_root(d, &record, requester, "workspace.diff").await?;
    let layers = ReviewLayers::for_job(&d.opts.state_dir, id);
    let changes = match review.state {
        ReviewState::Open | ReviewState::Pending => {
            let (source, upper) = (review.source.clone(), layers.upper());
            blocking(move || {
                diff::scan(source.as_ref(), &upper).map_err(|e| ApiError::internal(e.to_string()))
            })
            .await?
        }
        state => {
            return Err(ApiError::conflict(format!(
                "job {id}'s change was {} already; there is nothing left to show",
                state_name(state)
            )));
        }
    };
    Ok(DiffResponse {
        job: id.to_owned(),
        source: review.source,
        state: review.state,
        changes,
    })
}

fn state_name(s: ReviewState) -> &'static str {
    match s {
        ReviewState::Open => "open",
        ReviewState::Pending => "pending",
        ReviewState::Accepted => "accepted",
        ReviewState::Rejected => "rejected",
        ReviewState::RolledBack => "rolled back",
    }
}

fn pending(id: &str, review: &ReviewInfo) -> Result<(), ApiError> {
    match review.state {
        ReviewState::Pending => Ok(()),
        ReviewState::Open => Err(ApiError::conflict(format!(
            "job {id} is still running: its change is complete only when it ends (agentctl wait {id})"
        ))),
        s => Err(ApiError::conflict(format!(
            "job {id}'s change was {} already",
            state_name(s)
        ))),
    }
}

/// POST /v1/jobs/{id}/accept: applies the change to the source directory.
pub async fn accept(
    d: &Arc<Daemon>,
    id: &str,
    req: AcceptRequest,
    requester: Requester,
) -> Result<JobInfo, ApiError> {
    let _ordered = d.ordered(id).await;
    let (mut record, review) = load(d, id)?;
    owner_or_root(d, &record, &requester, "workspace.accept").await?;
    pending(id, &review)?;
    if record.info.snapshot.is_some() && !req.publish {
        return Err(ApiError::conflict(format!(
            "job {id} worked on a published snapshot, which never changes: accept --publish makes a new snapshot of the change"
        )));
    }
    if req.publish {
        if req.commit {
            return Err(ApiError::bad_request(
                "publish and commit: a change is published as a snapshot or applied and committed, not both",
            ));
        }
        return publish(d, id, &mut record, review, requester).await;
    }
    // With --commit: a git work tree, and an accepting user git can name; both checked
    // before anything is applied.
    let provenance = if req.commit {
        let source = review.source.clone();
        let (uid, gid) = (requester.uid, requester.gid);
        let checked = blocking(move || Ok(commit_prerequisites(&source, uid, gid))).await?;
        match checked {
            Ok(p) => Some(p),
            Err(why) => return Err(ApiError::conflict(why)),
        }
    } else {
        None
    };
    let layers = ReviewLayers::for_job(&d.opts.state_dir, id);
    // The source may not have changed since the job was submitted: the job saw it
    // live through the overlay, and the change was made against that state.
    let since = since_submission(&record);
    let source = review.source.clone();
    let (upper, before) = (layers.upper(), layers.before());
    let outcome = blocking(move || {
        if let Some(moved) = moved_on(&source, since)? {
            return Ok(Err(format!(
                "{source} changed since the job started: {moved}; the job's change was made against an older state and is not applied (agentctl diff shows it; reject it, or run the job again)"
            )));
        }
        let changes = diff::scan(source.as_ref(), &upper)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        match apply::apply(source.as_ref(), &upper, &changes, &before) {
            Ok(a) => Ok(Ok(a)),
            Err(WorkspaceError::Refused(why)) => Ok(Err(why)),
            Err(e) => Err(ApiError::internal(format!(
                "applying the change failed part way: {e}; what it replaced is in {}",
                before.display()
            ))),
        }
    })
    .await?;
    let applied = match outcome {
        Ok(a) => a,
        Err(why) => return Err(refuse(d, &requester, "workspace.accept", id, why).await),
    };
    // The layers are spent; the pre-image stays, as the way back.
    let _ = std::fs::remove_dir_all(layers.upper());
    let _ = std::fs::remove_dir_all(layers.work());
    // The commit, authored and signed off by the accepting user, assisted by the job.
    let mut commit_error = None;
    let commit = match (&provenance, applied.paths.is_empty()) {
        (Some((uid, gid, human)), false) => {
            let message = req.message.clone().unwrap_or_else(|| {
                format!("agentd job {id}: {}", shell_words(&record.info.command))
            });
            // AGENT:MODEL and the tools the job recorded, each once, in order of first use.
            let mut tools: Vec<&str> = Vec::new();
            for t in &record.info.tool_calls {
                if !tools.contains(&t.name.as_str()) {
                    tools.push(&t.name);
                }
            }
            let mut assisted_by = format!("{}:{}", record.info.agent, record.info.model);
            for t in tools {
                assisted_by.push(' ');
                assisted_by.push_str(t);
            }
            let (source, paths, human, owner) = (
                review.source.clone(),
                applied.paths.clone(),
                human.clone(),
                (*uid, *gid),
            );
            match blocking(move || {
                Ok(git::commit(
                    source.as_ref(),
                    owner,
                    &paths,
                    &message,
                    &assisted_by,
                    &human,
                ))
            })
            .await?
            {
                Ok(sha) => Some(sha),
                Err(e) => {
                    commit_error = Some(e);
                    None
                }
            }
        }
        _ => None,
    };
    let decided = ReviewInfo {
        changes: Some(applied.changes),
        before: Some(applied.before.display().to_string()),
        skipped: applied.skipped.clone(),
        commit: commit.clone(),
        ..decided(&review, ReviewState::Accepted, &requester)
    };
    let op = decision_op(
        &requester,
        "workspace.accept",
        id,
        "; the source has not changed since the job started",
        serde_json::json!({
            "job": id, "source": review.source, "review": {"before": "pending", "after": "accepted"},
            "entries": applied.changes, "created": applied.created,
            "skipped": applied.skipped, "commit": commit, "commit_error": commit_error,
            "signed_off_by": provenance.as_ref().map(|p| p.2.line()),
        }),
        format!(
            "agentctl rollback {id}: return {} to the snapshot {} (its entries back over the source, the paths its .agentd-preimage.json lists as created deleted)",
            review.source,
            applied.before.display()
        ),
    );
    let info = finish(d, id, &mut record, decided, op, EventKind::Accepted).await?;
    match commit_error {
        None => Ok(info),
        Some(e) => Err(ApiError::internal(format!(
            "the change was applied to {}, but the commit failed: {e}",
            review.source
        ))),
    }
}

/// The job's command as one line for a commit subject.
fn shell_words(command: &[String]) -> String {
    let line = command.join(" ");
    if line.chars().count() > 60 {
        format!("{}...", line.chars().take(57).collect::<String>())
    } else {
        line
    }
}

/// accept with `publish`: the source with the change becomes an immutable,
/// content-addressed snapshot; the source itself never changes.
async fn publish(
    d: &Arc<Daemon>,
    id: &str,
    record: &mut JobRecord,
    review: ReviewInfo,
    requester: Requester,
) -> Result<JobInfo, ApiError> {
    let layers = ReviewLayers::for_job(&d.opts.state_dir, id);
    let since = since_submission(record);
    let source = review.source.clone();
    let store = super::snapshots::store(d);
    let job = id.to_owned();
    // A published snapshot never changes, so it cannot have moved on; its ctimes say
    // nothing either: its files are hard links to shared objects, and every other
    // snapshot that links one of them changes its ctime (a link count change).
    let on_snapshot = record.info.snapshot.is_some();
    let published = blocking(move || {
        let moved = if on_snapshot {
            None
        } else {
            moved_on(&source, since)?
        };
        if let Some(moved) = moved {
            return Ok(Err(format!(
                "{source} changed since the job started: {moved}; the change is not published (reject it, or run the job again)"
            )));
        }
        let merged = layers
            .mount_merged_readonly(source.as_ref())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let root = std::path::PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&merged)
        ));
        let meta = store.publish(&root, &source, &job, now_ms());
        drop(merged);
        match meta {
            Ok(m) => {
                let _ = layers.remove();
                Ok(Ok(m))
            }
            Err(WorkspaceError::Refused(why)) => Ok(Err(why)),
            Err(e) => Err(ApiError::internal(e.to_string())),
        }
    })
    .await?;
    let meta = match published {
        Ok(m) => m,
        Err(why) => return Err(refuse(d, &requester, "workspace.publish", id, why).await),
    };
    let decided = ReviewInfo {
        snapshot: Some(meta.id.clone()),
        ..decided(&review, ReviewState::Accepted, &requester)
    };
    let op = decision_op(
        &requester,
        "workspace.publish",
        id,
        "; the source has not changed since the job started",
        serde_json::json!({
            "job": id, "source": review.source, "review": {"before": "pending", "after": "accepted"},
            "snapshot": meta.id, "files": meta.files, "bytes": meta.bytes,
        }),
        format!(
            "agentctl snapshot rm {} (the source {} never changed and is the snapshot to return to)",
            meta.id, review.source
        ),
    );
    finish(d, id, record, decided, op, EventKind::Accepted).await
}

/// POST /v1/jobs/{id}/rollback: returns the source to the pre-image an accept kept.
/// Refused if the source changed since the accept (what changed would be lost).
pub async fn rollback(
    d: &Arc<Daemon>,
    id: &str,
    requester: Requester,
) -> Result<JobInfo, ApiError> {
    let _ordered = d.ordered(id).await;
    let (mut record, review) = load(d, id)?;
    owner_or_root(d, &record, &requester, "workspace.rollback").await?;
    let before = match (&review.state, &review.before) {
        (ReviewState::Accepted, Some(before)) => before.clone(),
        (ReviewState::Accepted, None) => {
            return Err(ApiError::conflict(format!(
                "job {id}'s change was published as a snapshot; the source never changed (agentctl snapshot rm removes the snapshot)"
            )));
        }
        (s, _) => {
            return Err(ApiError::conflict(format!(
                "job {id}'s change is {}: only an accepted change can be rolled back",
                state_name(*s)
            )));
        }
    };
    let since = UNIX_EPOCH + Duration::from_millis(review.decided_ms.unwrap_or(0) + 1);
    let source = review.source.clone();
    let before_dir = before.clone();
    let outcome = blocking(move || {
        if let Some(moved) = moved_on(&source, since)? {
            return Ok(Err(format!(
                "{source} changed since the change was accepted: {moved}; rolling back would lose that, so nothing was restored (the pre-image is {before_dir})"
            )));
        }
        match apply::restore(source.as_ref(), before_dir.as_ref()) {
            Ok(n) => Ok(Ok(n)),
            Err(WorkspaceError::Refused(why)) => Ok(Err(why)),
            Err(e) => Err(ApiError::internal(format!(
                "restoring failed part way: {e}; the pre-image is still in {before_dir}"
            ))),
        }
    })
    .await?;
    let (restored, removed) = match outcome {
        Ok(n) => n,
        Err(why) => return Err(refuse(d, &requester, "workspace.rollback", id, why).await),
    };
    let decided = decided(&review, ReviewState::RolledBack, &requester);
    let op = decision_op(
        &requester,
        "workspace.rollback",
        id,
        "; the source has not changed since the accept",
        serde_json::json!({
            "job": id, "source": review.source, "review": {"before": "accepted", "after": "rolled-back"},
            "restored": restored, "removed": removed, "from": before,
            "commit_left": review.commit,
        }),
        format!(
            "the accepted state is job {id}'s change: run the job again and accept it (a commit it made stays in git history: git revert it if wanted)"
        ),
    );
    finish(d, id, &mut record, decided, op, EventKind::RolledBack).await
}

/// POST /v1/jobs/{id}/reject: discards the change; the source never changed.
pub async fn reject(d: &Arc<Daemon>, id: &str, requester: Requester) -> Result<JobInfo, ApiError> {
    let _ordered = d.ordered(id).await;
    let (mut record, review) = load(d, id)?;
    owner_or_root(d, &record, &requester, "workspace.reject").await?;
    pending(id, &review)?;
    let layers = ReviewLayers::for_job(&d.opts.state_dir, id);
    let layers_dir = layers.dir.clone();
    blocking(move || {
        layers
            .remove()
            .map_err(|e| ApiError::internal(e.to_string()))
    })
    .await?;
    let decided = decided(&review, ReviewState::Rejected, &requester);
    let op = decision_op(
        &requester,
        "workspace.reject",
        id,
        "",
        serde_json::json!({
            "job": id, "source": review.source, "review": {"before": "pending", "after": "rejected"},
            "discarded": layers_dir.display().to_string(),
        }),
        format!(
            "none needed: {} is the snapshot to return to, and it never changed; the discarded change is gone",
            review.source
        ),
    );
    finish(d, id, &mut record, decided, op, EventKind::Rejected).await
}

/// What `accept --commit` needs, checked before anything is applied: the source is in
/// a git work tree (asked as its owner, who will run the commit), and the accepting
/// user has a git identity. Returns the owner and that identity.
fn commit_prerequisites(
    source: &str,
    uid: u32,
    gid: u32,
) -> Result<(u32, u32, git::Identity), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(source).map_err(|e| format!("{source}: {e}"))?;
    let owner = (meta.uid(), meta.gid());
    if !git::is_work_tree(source.as_ref(), owner) {
        return Err(format!(
            "{source} is not in a git work tree: accept without --commit, or make it one"
        ));
    }
    let human = git::identity_of(uid, gid, source.as_ref())?;
    Ok((owner.0, owner.1, human))
}

/// Runs blocking file work (walks, copies, git) off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

/// When a change's source is taken to be "as the job saw it": the job's submission.
/// ctime is kept by the kernel at a coarse clock, so the bound is taken a little early:
/// a false alarm is possible within those 20 ms, a missed change is not.
fn since_submission(record: &JobRecord) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(record.info.submitted_ms) - Duration::from_millis(20)
}

/// The entries of `source` changed at or after `since`, as a list for a refusal, or
/// None if it has not moved on.
fn moved_on(source: &str, since: SystemTime) -> Result<Option<String>, ApiError> {
    let moved = apply::changed_since(source.as_ref(), since, MOVED_ON_SHOWN)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((!moved.is_empty()).then(|| {
        let more = if moved.len() >= MOVED_ON_SHOWN {
            ", ..."
        } else {
            ""
        };
        format!("{}{more}", moved.join(", "))
    }))
}

/// A refusal of a decision: an operation row, and 409 with the reason.
async fn refuse(
    d: &Daemon,
    requester: &Requester,
    action: &str,
    id: &str,
    why: String,
) -> ApiError {
    deny(d, requester, action, Some(id), "workspace review", &why).await;
    ApiError::conflict(why)
}

/// The review as decided by `requester` now.
fn decided(review: &ReviewInfo, state: ReviewState, requester: &Requester) -> ReviewInfo {
    ReviewInfo {
        state,
        decided_by: Some(requester.clone()),
        decided_ms: Some(now_ms()),
        ..review.clone()
    }
}

/// The operation row of a decision on job `id`'s change; `condition` is what was
/// checked beyond who decides.
fn decision_op(
    requester: &Requester,
    action: &str,
    id: &str,
    condition: &str,
    change: serde_json::Value,
    rollback: String,
) -> NewOperation {
    let role = if requester.uid == 0 {
        "root"
    } else {
        "its submitter"
    };
    NewOperation {
        requester: requester.clone(),
        action: action.into(),
        target: Some(id.to_owned()),
        authority: format!(
            "{} may decide job {id}'s change ({role}){condition}",
            who(requester)
        ),
        change,
        rollback,
    }
}

async fn finish(
    d: &Arc<Daemon>,
    id: &str,
    record: &mut JobRecord,
    decided: ReviewInfo,
    op: NewOperation,
    kind: EventKind,
) -> Result<JobInfo, ApiError> {
    record.info.review = Some(decided.clone());
    d.commit(WriteBatch::job(record.clone(), op))
        .await
        .map_err(|e| ApiError::internal(format!("cannot record the decision: {e}")))?;
    if let Some(e) = d.jobs.lock().expect("jobs lock").get_mut(id) {
        e.info.review = Some(decided.clone());
    }
    release(d, &decided.source, id);
    d.events.emit(
        kind,
        Some(id),
        record.info.lease.as_deref(),
        decided.source.clone(),
    );
    Ok(record.info.clone())
}
