//! Each daemon job's own socket to the daemon: `/run/agentd/agentd.sock` inside the job
//! (`AGENTD_SOCKET`), a directory of the daemon's runtime directory bind-mounted
//! read-only. The socket is the job's identity: whoever connects to it speaks for that
//! job, and only for it. It offers what a job may do about itself:
//!   GET  /v1/self             its id, identity, policy;
//!   POST /v1/self/tool-calls  record a tool call (name, digest of the arguments,
//!                             status), kept with the job as provenance.
//! The directory, not the socket, is what the job's mount holds, so a restarted daemon
//! binds a new socket in it and a running job reaches the new daemon.

use super::Daemon;
use super::jobs::ApiError;
use crate::api::types::{SelfInfo, ToolCall};
use crate::store::WriteBatch;
use axum::extract::State;
use axum::routing::{get, post};
use std::path::PathBuf;
use std::sync::Arc;

/// A job may record at most this many tool calls (a bound on what it can make the
/// daemon keep).
pub const MAX_TOOL_CALLS: usize = 10_000;

/// `<runtime_dir>/sockets/<job>`: the directory the job sees at /run/agentd.
pub fn dir(d: &Daemon, id: &str) -> PathBuf {
    d.opts.runtime_dir.join("sockets").join(id)
}

/// Binds the job's socket (replacing one a previous daemon left) and serves it until
/// the job ends (`close`).
pub fn open(d: &Arc<Daemon>, id: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = dir(d, id);
    // 0711: the job's user passes through to the socket; nobody lists the jobs.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&dir)?;
    std::fs::set_permissions(
        dir.parent().expect("sockets/"),
        std::fs::Permissions::from_mode(0o711),
    )?;
    let path = dir.join("agentd.sock");
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    // The job runs as some unprivileged user: it must be able to connect.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    let router = axum::Router::new()
        .route("/v1/self", get(whoami))
        .route("/v1/self/tool-calls", post(tool_call))
        .fallback(|| async {
            ApiError::not_found("a job's socket offers /v1/self and /v1/self/tool-calls only")
        })
        .with_state((d.clone(), id.to_owned()));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    d.job_sockets
        .lock()
        .expect("job sockets lock")
        .insert(id.to_owned(), task.abort_handle());
    Ok(())
}

/// Stops serving the job's socket and removes its directory (the job has ended).
pub fn close(d: &Daemon, id: &str) {
    if let Some(task) = d.job_sockets.lock().expect("job sockets lock").remove(id) {
        task.abort();
    }
    // First: no view refresh is under way or starts after this (see selfview::refresh).
    super::selfview::forget(d, id);
    let _ = std::fs::remove_dir_all(dir(d, id));
}

type JobState = State<(Arc<Daemon>, String)>;

async fn whoami(State((d, id)): JobState) -> Result<axum::Json<SelfInfo>, ApiError> {
    let jobs = d.jobs.lock().expect("jobs lock");
    let e = jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found("this job is not known to the daemon"))?;
    Ok(axum::Json(SelfInfo {
        id: id.clone(),
        agent: e.info.agent.clone(),
        model: e.info.model.clone(),
        policy: e.info.policy.clone(),
        tool_calls: e.info.tool_calls.len(),
    }))
}

fn check(call: &ToolCall) -> Result<(), String> {
    let name_ok = !call.name.is_empty()
        && call.name.len() <= 64
        && call
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:".contains(c));
    if !name_ok {
        return Err(format!(
            "name: expected 1 to 64 of letters, digits and . _ - / :, got {:?}",
            call.name
        ));
    }
    if let Some(dg) = &call.args_digest
        && (dg.is_empty() || dg.len() > 128 || !dg.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(
            "args_digest: expected up to 128 hex digits (a digest, never the arguments)".into(),
        );
    }
    if call.status.is_empty()
        || call.status.len() > 32
        || !call
            .status
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
    {
        return Err(format!(
            "status: expected a word of up to 32 letters, digits, _ and -, got {:?}",
            call.status
        ));
    }
    Ok(())
}

async fn tool_call(
    State((d, id)): JobState,
    body: axum::body::Bytes,
) -> Result<(axum::http::StatusCode, axum::Json<ToolCall>), ApiError> {
    let mut call: ToolCall = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("a tool call: {e}")))?;
    check(&call).map_err(ApiError::bad_request)?;
    call.time_ms = super::now_ms();
    let _ordered = d.ordered(&id).await;
    let record = {
        let mut jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs
            .get_mut(&id)
            .ok_or_else(|| ApiError::not_found("this job is not known to the daemon"))?;
        if e.info.state.is_terminal() {
            return Err(ApiError::conflict("the job has ended"));
        }
        if e.info.tool_calls.len() >= MAX_TOOL_CALLS {
            return Err(ApiError::new(
                429,
                format!("this job recorded {MAX_TOOL_CALLS} tool calls, the most a job may"),
            ));
        }
        e.info.tool_calls.push(call.clone());
        e.record()
    };
    d.commit(WriteBatch {
        jobs: vec![record],
        ..Default::default()
    })
    .await
    .map_err(|e| ApiError::internal(format!("cannot record the tool call: {e}")))?;
    Ok((axum::http::StatusCode::CREATED, axum::Json(call)))
}
