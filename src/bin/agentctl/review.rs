//! `agentctl diff`, `accept` and `reject`: a review job's change, shown and decided.

use agentd::api::client::Client;
use agentd::api::types::{
    AcceptRequest, ChangeKind, DiffResponse, JobInfo, ReviewState, SnapshotInfo,
};

use crate::commands::job_path;
use crate::{Fail, emit, emit_json};

/// `diff`: a review job's change, for people (a summary line per entry, then the
/// unified diffs) or as JSON.
pub async fn diff(client: &Client, id: &str, stat: bool, json: bool) -> Result<i32, Fail> {
    let d: DiffResponse = client.get(&format!("{}/diff", job_path(id))).await?;
    if json {
        emit_json(&d)?;
        return Ok(0);
    }
    let mut out = format!(
        "job {}: {} change(s) to {} ({})\n",
        d.job,
        d.changes.len(),
        d.source,
        review_state_name(d.state)
    );
    for c in &d.changes {
        let what = match (c.kind, &c.from) {
            (ChangeKind::Renamed, Some(from)) => format!("renamed  {from} -> {}", c.path),
            (ChangeKind::Added, _) => format!("added    {}", c.path),
            (ChangeKind::Removed, _) => format!("removed  {}", c.path),
            _ => format!("modified {}", c.path),
        };
        let mut notes = Vec::new();
        if c.file_type != "file" {
            notes.push(c.file_type.clone());
        }
        if let Some(t) = &c.target {
            notes.push(format!("-> {t}"));
        }
        if let (Some(a), Some(b)) = (c.mode_before, c.mode_after)
            && a != b
        {
            notes.push(format!("mode {a:o} -> {b:o}"));
        }
        if c.binary {
            notes.push(format!("binary or large, {} bytes", c.size.unwrap_or(0)));
        }
        if notes.is_empty() {
            out.push_str(&format!("  {what}\n"));
        } else {
            out.push_str(&format!("  {what} ({})\n", notes.join(", ")));
        }
    }
    if !stat {
        for c in &d.changes {
            if let Some(text) = &c.diff {
                out.push('\n');
                out.push_str(text);
            }
        }
    }
    emit(&out)?;
    Ok(0)
}

pub fn review_state_name(s: ReviewState) -> &'static str {
    match s {
        ReviewState::Open => "job still running",
        ReviewState::Pending => "pending review",
        ReviewState::Accepted => "accepted",
        ReviewState::Rejected => "rejected",
        ReviewState::RolledBack => "rolled back",
    }
}

/// `accept`: applies the change (and commits it with --commit).
pub async fn accept(
    client: &Client,
    id: &str,
    commit: bool,
    message: Option<String>,
    publish: bool,
    json: bool,
) -> Result<i32, Fail> {
    let body = AcceptRequest {
        commit,
        message,
        publish,
    };
    let job: JobInfo = client
        .post(&format!("{}/accept", job_path(id)), &body)
        .await?;
    if json {
        emit_json(&job)?;
        return Ok(0);
    }
    let mut out = String::new();
    if let Some(snapshot) = job.review.as_ref().and_then(|r| r.snapshot.as_ref()) {
        emit(&format!("{snapshot}\n"))?;
        return Ok(0);
    }
    if let Some(r) = &job.review {
        out.push_str(&format!(
            "job {}: change accepted into {} ({} entries); what it replaced is in {}\n",
            job.id,
            r.source,
            r.changes.unwrap_or(0),
            r.before.as_deref().unwrap_or("?")
        ));
        if !r.skipped.is_empty() {
            out.push_str(&format!(
                "not applied (git metadata is never taken from a job): {}\n",
                r.skipped.join(", ")
            ));
        }
        if let Some(sha) = &r.commit {
            out.push_str(&format!("committed as {sha}\n"));
        }
    }
    emit(&out)?;
    Ok(0)
}

/// `reject` (discards the change) and `rollback` (undoes an accepted one): POST the
/// action, say where the directory stands.
pub async fn undo(client: &Client, id: &str, action: &str, json: bool) -> Result<i32, Fail> {
    let job: JobInfo = client
        .post_empty(&format!("{}/{action}", job_path(id)))
        .await?;
    if json {
        emit_json(&job)?;
        return Ok(0);
    }
    let source = job
        .review
        .as_ref()
        .map_or("the workspace", |r| r.source.as_str());
    let (what, since) = match action {
        "rollback" => ("rolled back", " before the accept"),
        _ => ("rejected", ""),
    };
    emit(&format!(
        "job {}: change {what}; {source} is as it was{since}\n",
        job.id
    ))?;
    Ok(0)
}

/// `snapshot ls`.
pub async fn snapshot_ls(client: &Client, json: bool) -> Result<i32, Fail> {
    let all: Vec<SnapshotInfo> = client.get("/v1/snapshots").await?;
    if json {
        emit_json(&all)?;
        return Ok(0);
    }
    let mut out = String::from("ID            FILES        BYTES  HOLDERS  SOURCE\n");
    for s in &all {
        out.push_str(&format!(
            "{:<12}  {:>5}  {:>11}  {:>7}  {}{}\n",
            &s.meta.id[..12],
            s.meta.files,
            s.meta.bytes,
            s.holders.len(),
            s.meta.source,
            if s.meta.removing { " (removing)" } else { "" }
        ));
    }
    emit(&out)?;
    Ok(0)
}

/// `snapshot show ID`.
pub async fn snapshot_show(client: &Client, id: &str, json: bool) -> Result<i32, Fail> {
    let s: SnapshotInfo = client
        .get(&format!(
            "/v1/snapshots/{}",
            agentd::api::client::encode(id)
        ))
        .await?;
    if json {
        emit_json(&s)?;
        return Ok(0);
    }
    emit(&format!(
        "id:       {}\npath:     {}\nsource:   {} (job {})\nfiles:    {}\nbytes:    {}\nholders:  {}\nstate:    {}\n",
        s.meta.id,
        s.path,
        s.meta.source,
        s.meta.job,
        s.meta.files,
        s.meta.bytes,
        if s.holders.is_empty() {
            "-".into()
        } else {
            s.holders.join(" ")
        },
        if s.meta.removing {
            "removing (waits for its holders)"
        } else {
            "published"
        }
    ))?;
    Ok(0)
}

/// `snapshot rm ID`.
pub async fn snapshot_rm(client: &Client, id: &str, json: bool) -> Result<i32, Fail> {
    let s: SnapshotInfo = client
        .delete(&format!(
            "/v1/snapshots/{}",
            agentd::api::client::encode(id)
        ))
        .await?;
    if json {
        emit_json(&s)?;
    } else if s.meta.removing {
        emit(&format!(
            "snapshot {} goes when its holders end: {}\n",
            s.meta.id,
            s.holders.join(" ")
        ))?;
    } else {
        emit(&format!("snapshot {} removed\n", s.meta.id))?;
    }
    Ok(0)
}
