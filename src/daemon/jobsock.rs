//! Each daemon job's own socket to the daemon: `/run/agentd/agentd.sock` inside the job
//! (`AGENTD_SOCKET`), a directory of the daemon's runtime directory bind-mounted
//! read-only. The socket is the job's identity: whoever connects to it speaks for that
//! job, and only for it. It offers what a job may do about itself:
//!   GET  /v1/self                  its id, identity, policy;
//!   POST /v1/self/tool-calls       record a tool call (name, status, and its arguments
//!                                  or their digest), kept with the job as provenance;
//!   GET  /v1/self/tool-calls       the calls it recorded (what an agent may see);
//!   PUT|GET|DELETE /v1/self/context/NAME, GET /v1/self/context
//!                                  context segments it keeps with the daemon (context);
//!   GET  /v1/self/objects          what it holds of each object class, and its quotas.
//! Tool-call arguments may hold secrets: the daemon digests them and keeps them in
//! memory only; no response, store row, event, view or log carries them.
//! The directory, not the socket, is what the job's mount holds, so a restarted daemon
//! binds a new socket in it and a running job reaches the new daemon.

use super::Daemon;
use super::jobs::ApiError;
use crate::api::types::{SelfInfo, ToolCall};
use crate::store::WriteBatch;
use crate::telemetry::classes::{self, Audience, Class};
use axum::extract::State;
use axum::routing::{get, post};
use std::path::PathBuf;
use std::sync::Arc;

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
        .route("/v1/self/tool-calls", post(tool_call).get(tool_calls))
        .route("/v1/self/context", get(context_list))
        .route(
            "/v1/self/context/{name}",
            axum::routing::put(context_put)
                .get(context_get)
                .delete(context_delete)
                .layer(axum::extract::DefaultBodyLimit::max(
                    super::context::MAX_SEGMENT_BYTES,
                )),
        )
        .route("/v1/self/objects", get(objects))
        .fallback(|| async {
            ApiError::not_found(
                "a job's socket offers /v1/self, /v1/self/tool-calls, /v1/self/context and /v1/self/objects",
            )
        })
        .with_state((d.clone(), id.to_owned()));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    d.job_sockets
        .lock()
        .expect("job sockets lock")
        .insert(id.to_owned(), task.abort_handle());
    // The region broker's socket beside it, for a job given regions.
    let grants = d
        .jobs
        .lock()
        .expect("jobs lock")
        .get(id)
        .map(|e| e.runtime.regions.clone())
        .unwrap_or_default();
    super::regions::listen(d, id, &grants)?;
    Ok(())
}

/// Stops serving the job's socket and removes its directory (the job has ended).
pub fn close(d: &Daemon, id: &str) {
    if let Some(task) = d.job_sockets.lock().expect("job sockets lock").remove(id) {
        task.abort();
    }
    super::regions::stop(d, id);
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
) -> Result<(axum::http::StatusCode, axum::Json<serde_json::Value>), ApiError> {
    // The error never quotes the body: it may hold the call's secret arguments.
    let mut call: ToolCall = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "a tool call: expected {{\"name\", \"status\", \"args\" or \"args_digest\"}} (JSON, line {} column {})",
            e.line(),
            e.column()
        ))
    })?;
    drop(body);
    check(&call).map_err(ApiError::bad_request)?;
    // The digest is the daemon's when it has the arguments.
    call.args_bytes = None;
    if let Some(args) = &call.args {
        use sha2::Digest;
        let text = args.to_string();
        call.args_digest = Some(crate::spec::hex(&sha2::Sha256::digest(text.as_bytes())));
        call.args_bytes = Some(text.len() as u64);
    }
    call.time_ms = super::now_ms();
    let _ordered = d.ordered(&id).await;
    let charged = {
        let mut jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs
            .get_mut(&id)
            .ok_or_else(|| ApiError::not_found("this job is not known to the daemon"))?;
        if e.info.state.is_terminal() {
            return Err(ApiError::conflict("the job has ended"));
        }
        let quota = e.runtime.quotas.tool_calls;
        match e
            .tool_call_charge
            .grow(1, super::tool_call_bytes(&call), quota)
        {
            Ok(()) => {
                e.info.tool_calls.push(call.clone());
                Ok(e.record())
            }
            Err(refused) => Err(refused),
        }
    };
    let record = match charged {
        Ok(r) => r,
        Err(refused) => {
            return Err(super::context::refuse(&d, &id, "tool-call.record", refused).await);
        }
    };
    d.commit(WriteBatch {
        jobs: vec![record],
        ..Default::default()
    })
    .await
    .map_err(|e| ApiError::internal(format!("cannot record the tool call: {e}")))?;
    Ok((
        axum::http::StatusCode::CREATED,
        axum::Json(for_agent(Class::ToolCall, &call)),
    ))
}

/// An object as its job may see it (the class's export policy).
fn for_agent<T: serde::Serialize>(class: Class, value: &T) -> serde_json::Value {
    let v = serde_json::to_value(value).expect("serializes");
    classes::export(class, &v, Audience::Agent)
}

async fn tool_calls(State((d, id)): JobState) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let jobs = d.jobs.lock().expect("jobs lock");
    let e = jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found("this job is not known to the daemon"))?;
    Ok(axum::Json(for_agent(Class::ToolCall, &e.info.tool_calls)))
}

type NamedState = axum::extract::Path<String>;

async fn context_list(State((d, id)): JobState) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let jobs = d.jobs.lock().expect("jobs lock");
    let e = jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found("this job is not known to the daemon"))?;
    Ok(axum::Json(for_agent(
        Class::ContextSegment,
        &e.context.list(),
    )))
}

async fn context_put(
    State((d, id)): JobState,
    axum::extract::Path(name): NamedState,
    headers: axum::http::HeaderMap,
    request: axum::extract::Request,
) -> Result<(axum::http::StatusCode, axum::Json<serde_json::Value>), ApiError> {
    super::context::check_name(&name).map_err(ApiError::bad_request)?;
    // Refused before the body is read when its length says it would not fit, so an
    // over-quota job never makes the daemon buffer what it sends.
    let len = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let Some(len) = len else {
        return Err(ApiError::new(
            411,
            "a context segment needs a Content-Length (the daemon checks the quota first)",
        ));
    };
    if len > super::context::MAX_SEGMENT_BYTES {
        return Err(ApiError::new(
            413,
            format!(
                "a context segment holds at most {} bytes; this one has {len}",
                super::context::MAX_SEGMENT_BYTES
            ),
        ));
    }
    let admitted = {
        let jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs
            .get(&id)
            .ok_or_else(|| ApiError::not_found("this job is not known to the daemon"))?;
        if e.info.state.is_terminal() {
            return Err(ApiError::conflict("the job has ended"));
        }
        e.context.admits(&name, len, e.runtime.quotas.context)
    };
    if let Err(refused) = admitted {
        return Err(super::context::refuse(&d, &id, "context.store", refused).await);
    }
    let body = axum::body::to_bytes(request.into_body(), len)
        .await
        .map_err(|e| ApiError::bad_request(format!("the segment's body: {e}")))?;
    let stored = {
        let mut jobs = d.jobs.lock().expect("jobs lock");
        let e = jobs
            .get_mut(&id)
            .ok_or_else(|| ApiError::not_found("this job is not known to the daemon"))?;
        let quota = e.runtime.quotas.context;
        e.context.put(&name, body, quota, super::now_ms())
    };
    match stored {
        Ok(info) => Ok((
            axum::http::StatusCode::CREATED,
            axum::Json(for_agent(Class::ContextSegment, &info)),
        )),
        Err(refused) => Err(super::context::refuse(&d, &id, "context.store", refused).await),
    }
}

async fn context_get(
    State((d, id)): JobState,
    axum::extract::Path(name): NamedState,
) -> Result<bytes::Bytes, ApiError> {
    let jobs = d.jobs.lock().expect("jobs lock");
    let e = jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found("this job is not known to the daemon"))?;
    e.context
        .get(&name)
        .ok_or_else(|| ApiError::not_found(format!("this job has no context segment {name:?}")))
}

async fn context_delete(
    State((d, id)): JobState,
    axum::extract::Path(name): NamedState,
) -> Result<axum::http::StatusCode, ApiError> {
    let mut jobs = d.jobs.lock().expect("jobs lock");
    let e = jobs
        .get_mut(&id)
        .ok_or_else(|| ApiError::not_found("this job is not known to the daemon"))?;
    if e.context.remove(&name) {
        Ok(axum::http::StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "this job has no context segment {name:?}"
        )))
    }
}

/// What the job holds of each class it owns, with its quota.
pub fn job_objects(d: &Daemon, id: &str) -> Option<serde_json::Value> {
    let quotas = d.jobs.lock().expect("jobs lock").get(id)?.runtime.quotas;
    let mut out = serde_json::Map::new();
    for (class, quota) in [
        (Class::ToolCall, Some(quotas.tool_calls)),
        (Class::ContextSegment, Some(quotas.context)),
        (Class::Job, None),
    ] {
        let held = d.classes.held(id, class);
        out.insert(
            class.name().into(),
            serde_json::json!({"live": held.live, "bytes": held.bytes,
                "quota_objects": quota.and_then(|q| q.objects),
                "quota_bytes": quota.and_then(|q| q.bytes)}),
        );
    }
    Some(serde_json::Value::Object(out))
}

async fn objects(State((d, id)): JobState) -> Result<axum::Json<serde_json::Value>, ApiError> {
    job_objects(&d, &id)
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found("this job is not known to the daemon"))
}
