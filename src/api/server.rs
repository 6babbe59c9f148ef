//! The daemon's side of the control API: a Unix socket, one HTTP/1.1 connection task
//! per client, the peer's credentials on every request, and the routes.
//!
//! Bounds, so a slow or hostile client cannot stall the daemon: at most
//! `--max-connections` connections (more are closed at once), request headers within
//! 10 s, bodies within 10 s and at most `MAX_BODY_BYTES`; long-running responses
//! (follow, wait) hold only their own connection.

use super::types::*;
use crate::daemon::events::EventFilter;
use crate::daemon::jobs::{self, ApiError};
use crate::daemon::{Daemon, leases};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tower::ServiceExt;

const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a `wait` request holds its connection before answering "not yet".
const MAX_WAIT: Duration = Duration::from_secs(300);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            axum::Json(ErrorBody {
                error: self.message,
                refusal: self.refusal,
            }),
        )
            .into_response()
    }
}

/// Who is on the other end of a connection (SO_PEERCRED, checked against the peer's
/// pidfd where the kernel offers SO_PEERPIDFD).
#[derive(Debug, Clone)]
pub struct Peer {
    pub requester: Requester,
    /// The peer's supplementary groups, read while its pidfd proved the pid was still it.
    pub groups: Vec<u32>,
}

/// Creates the socket: its directory, the file (refusing if another daemon answers
/// there), mode 0660 and the group that may use it.
pub fn bind(d: &Daemon) -> Result<UnixListener, String> {
    let path = &d.opts.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another agentd serve is listening on {}; stop it or pick another --socket",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    if let Some(gid) = d.group_gid {
        std::os::unix::fs::chown(path, Some(0), Some(gid))
            .map_err(|e| format!("chown {}: {e}", path.display()))?;
    }
    Ok(listener)
}

/// The rule that lets `r` use the API, for operation rows.
pub fn access_rule(d: &Daemon, r: &Requester) -> String {
    if r.uid == 0 {
        "root".into()
    } else {
        format!("member of group {}", d.opts.group)
    }
}

fn authorize(d: &Daemon, peer: &Peer) -> Result<(), String> {
    let r = &peer.requester;
    if r.uid == 0 {
        return Ok(());
    }
    match d.group_gid {
        Some(gid) if r.gid == gid || peer.groups.contains(&gid) => Ok(()),
        Some(_) => Err(format!(
            "uid {} (pid {}) is neither root nor a member of group {}",
            r.uid, r.pid, d.opts.group
        )),
        None => Err(format!(
            "uid {} (pid {}) is not root, and group {} does not exist on this host",
            r.uid, r.pid, d.opts.group
        )),
    }
}

const SO_PEERPIDFD: libc::c_int = 77;

fn peer_of(stream: &tokio::net::UnixStream) -> Option<Peer> {
    let cred = stream.peer_cred().ok()?;
    let pid = cred.pid().unwrap_or(0);
    let mut peer = Peer {
        requester: Requester {
            uid: cred.uid(),
            gid: cred.gid(),
            pid,
            agent: None,
        },
        groups: Vec::new(),
    };
    if cred.uid() == 0 || pid <= 0 {
        return Some(peer);
    }
    // The peer's supplementary groups from /proc, trusted only if its pidfd (taken by
    // the kernel at connect time) shows the process still lives, so the pid was not
    // reused by another process in between.
    let pidfd = {
        let mut fd: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes an int into `fd`.
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&mut fd as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        // SAFETY: on success the kernel gave us a new fd.
        (r == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let alive = match &pidfd {
        // SAFETY: signal 0 through a pidfd we own only checks that the process exists.
        Some(fd) => unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ) == 0
        },
        None => true, // kernels before 6.5: the pid as SO_PEERCRED gave it
    };
    if alive {
        peer.groups = status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
    }
    Some(peer)
}

/// Accepts connections until the listener fails.
pub async fn serve(d: Arc<Daemon>, listener: UnixListener) -> std::io::Result<()> {
    let router = routes(d.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(d.opts.max_connections));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                tracing::warn!("out of descriptors accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the bound: close at once rather than queue.
            drop(stream);
            continue;
        };
        let Some(peer) = peer_of(&stream) else {
            continue;
        };
        let router = router.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    router.clone().oneshot(req.map(Body::new))
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = conn.await;
            drop(slot);
        });
    }
}

fn routes(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/jobs", post(submit).get(list_jobs))
        .route("/v1/jobs/{id}", get(inspect))
        .route("/v1/jobs/{id}/kill", post(kill))
        .route("/v1/jobs/{id}/freeze", post(freeze))
        .route("/v1/jobs/{id}/thaw", post(thaw))
        .route("/v1/jobs/{id}/detach", post(detach))
        .route("/v1/jobs/{id}/wait", get(wait))
        .route("/v1/jobs/{id}/logs", get(logs))
        .route("/v1/jobs/{id}/diff", get(diff))
        .route("/v1/jobs/{id}/accept", post(accept))
        .route("/v1/jobs/{id}/reject", post(reject))
        .route("/v1/jobs/{id}/rollback", post(rollback))
        .route("/v1/snapshots", get(list_snapshots))
        .route(
            "/v1/snapshots/{id}",
            get(get_snapshot).delete(remove_snapshot),
        )
        .route("/v1/events", get(events))
        .route("/v1/audit", get(audit))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/leases", post(take_lease).get(list_leases))
        .route("/v1/leases/{id}/renew", post(renew_lease))
        .route("/v1/leases/{id}/release", post(release_lease))
        .route("/v1/regions", post(create_region).get(list_regions))
        .route("/v1/regions/{name}", get(get_region).delete(delete_region))
        .route("/v1/regions/{name}/publish", post(publish_region))
        .route("/v1/regions/{name}/revoke", post(revoke_region))
        .route("/v1/classes", get(classes))
        .route("/v1/sched", get(sched))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::not_found("no such endpoint (see README, \"Control API\")")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(405, "this endpoint does not take that method")
        })
        .layer(axum::middleware::from_fn_with_state(d.clone(), guard))
        .with_state(d)
}

/// Every request: the peer must be root or in the socket's group; a refusal is 403
/// and an operation row.
async fn guard(
    State(d): State<Arc<Daemon>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(peer) = req.extensions().get::<Peer>().cloned() else {
        return ApiError::forbidden("no peer credentials").into_response();
    };
    if let Err(why) = authorize(&d, &peer) {
        let action = format!("api {} {}", req.method(), req.uri().path());
        jobs::deny(&d, &peer.requester, &action, None, "socket access", &why).await;
        return ApiError::forbidden(why).into_response();
    }
    next.run(req).await
}

fn peer(req: &Request) -> Requester {
    req.extensions()
        .get::<Peer>()
        .map(|p| p.requester.clone())
        .expect("guard checked the peer")
}

/// Reads and parses a JSON body: bounded in size and time, unknown fields refused.
/// An empty body reads as `{}` (for requests whose fields are all optional).
async fn json_body<T: DeserializeOwned>(req: Request) -> Result<(Requester, T), ApiError> {
    let who = peer(&req);
    let body = req.into_body();
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES))
        .await
    {
        Err(_) => {
            return Err(ApiError::new(
                408,
                "the request body did not arrive within 10 s",
            ));
        }
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|s| s.to_string().contains("length limit"))
                || e.to_string().contains("length limit");
            return Err(if too_big {
                ApiError::new(
                    413,
                    format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            });
        }
        Ok(Ok(b)) => b,
    };
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        Bytes::from_static(b"{}")
    } else {
        bytes
    };
    serde_json::from_slice(&bytes)
        .map(|v| (who, v))
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

type ApiResult<T> = Result<axum::Json<T>, ApiError>;

async fn health(State(d): State<Arc<Daemon>>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "ok": true, "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id(),
        "socket": d.opts.socket, "state_dir": d.opts.state_dir,
    }))
}

/// Runs a state change to its end even if the client goes away meanwhile: hyper drops
/// a request's future when its connection closes, and a change dropped half-way (a job
/// recorded but never started, a lease ended but its jobs not cancelled) would leave
/// the daemon's state and the store apart.
async fn to_the_end<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(change).await.unwrap_or_else(|e| {
        Err(ApiError::internal(format!(
            "the request's task failed: {e}"
        )))
    })
}

async fn submit(State(d): State<Arc<Daemon>>, req: Request) -> Result<Response, ApiError> {
    let (who, body) = json_body::<SubmitRequest>(req).await?;
    let info =
        to_the_end(async move { crate::daemon::submit::submit(&d, body, who).await }).await?;
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

async fn list_jobs(State(d): State<Arc<Daemon>>) -> axum::Json<Vec<JobInfo>> {
    axum::Json(jobs::list(&d))
}

async fn inspect(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult<JobInfo> {
    jobs::inspect(&d, &id).map(axum::Json)
}

async fn kill(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<JobInfo> {
    let (who, body) = json_body::<KillRequest>(req).await?;
    to_the_end(async move { jobs::kill(&d, &id, body, who).await })
        .await
        .map(axum::Json)
}

async fn freeze(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<JobInfo> {
    let who = peer(&req);
    to_the_end(async move { jobs::set_frozen(&d, &id, true, who).await })
        .await
        .map(axum::Json)
}

async fn thaw(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<JobInfo> {
    let who = peer(&req);
    to_the_end(async move { jobs::set_frozen(&d, &id, false, who).await })
        .await
        .map(axum::Json)
}

async fn detach(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<JobInfo> {
    let who = peer(&req);
    to_the_end(async move { jobs::detach(&d, &id, who).await })
        .await
        .map(axum::Json)
}

async fn diff(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<DiffResponse> {
    let who = peer(&req);
    crate::daemon::review::diff(&d, &id, &who)
        .await
        .map(axum::Json)
}

async fn accept(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<JobInfo> {
    let (who, body) = json_body::<AcceptRequest>(req).await?;
    to_the_end(async move { crate::daemon::review::accept(&d, &id, body, who).await })
        .await
        .map(axum::Json)
}

async fn rollback(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<JobInfo> {
    let who = peer(&req);
    to_the_end(async move { crate::daemon::review::rollback(&d, &id, who).await })
        .await
        .map(axum::Json)
}

async fn reject(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<JobInfo> {
    let who = peer(&req);
    to_the_end(async move { crate::daemon::review::reject(&d, &id, who).await })
        .await
        .map(axum::Json)
}

async fn list_snapshots(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<SnapshotInfo>> {
    Ok(axum::Json(crate::daemon::snapshots::list(&d)))
}

async fn get_snapshot(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> ApiResult<SnapshotInfo> {
    crate::daemon::snapshots::get(&d, &id).map(axum::Json)
}

async fn remove_snapshot(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<(axum::http::StatusCode, axum::Json<SnapshotInfo>), ApiError> {
    let who = peer(&req);
    let (status, info) =
        to_the_end(async move { crate::daemon::snapshots::remove(&d, &id, who).await }).await?;
    Ok((
        axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::OK),
        axum::Json(info),
    ))
}

fn duration_param(
    q: &HashMap<String, String>,
    key: &str,
    default: Duration,
) -> Result<Duration, ApiError> {
    match q.get(key) {
        None => Ok(default),
        Some(v) => {
            crate::spec::parse_duration(v).map_err(|m| ApiError::bad_request(format!("{key}: {m}")))
        }
    }
}

fn bool_param(q: &HashMap<String, String>, key: &str) -> Result<bool, ApiError> {
    match q.get(key).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(v) => Err(ApiError::bad_request(format!(
            "{key}: expected true or false, got \"{v}\""
        ))),
    }
}

fn u64_param(q: &HashMap<String, String>, key: &str) -> Result<u64, ApiError> {
    match q.get(key) {
        None => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{key}: expected a number, got \"{v}\""))),
    }
}

async fn wait(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<JobInfo> {
    let timeout = duration_param(&q, "timeout", Duration::from_secs(30))?.min(MAX_WAIT);
    jobs::wait(&d, &id, timeout).await.map(axum::Json)
}

fn streaming(content_type: &'static str, body: Body) -> Response {
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A job's stdout or stderr; with follow, streamed until the job has ended and every
/// byte it wrote was sent.
async fn logs(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let stream = q.get("stream").map(String::as_str).unwrap_or("stdout");
    let path = jobs::log_path(&d, &id, stream)?;
    let follow = bool_param(&q, "follow")?;
    // Where to start: a client that lost its connection (a daemon restart) goes on from
    // the bytes it already has.
    let offset = u64_param(&q, "offset")?;
    struct Tail {
        d: Arc<Daemon>,
        id: String,
        path: std::path::PathBuf,
        file: Option<tokio::fs::File>,
        offset: u64,
        follow: bool,
    }
    let tail = Tail {
        d,
        id,
        path,
        file: None,
        offset,
        follow,
    };
    let s = futures_util::stream::unfold(Some(tail), |state| async move {
        use tokio::io::AsyncReadExt;
        let mut t = state?;
        loop {
            // Ended before this read means this read sees everything the job wrote.
            let ended = jobs::has_ended(&t.d, &t.id);
            if t.file.is_none() {
                use tokio::io::AsyncSeekExt;
                if let Ok(mut f) = tokio::fs::File::open(&t.path).await
                    && f.seek(std::io::SeekFrom::Start(t.offset)).await.is_ok()
                {
                    t.file = Some(f);
                }
            }
            if let Some(f) = t.file.as_mut() {
                let mut buf = vec![0u8; 64 * 1024];
                match f.read(&mut buf).await {
                    Ok(n) if n > 0 => {
                        buf.truncate(n);
                        return Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), Some(t)));
                    }
                    Ok(_) => {}
                    Err(e) => return Some((Err(e), None)),
                }
            }
            if !t.follow || ended {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    Ok(streaming("application/octet-stream", Body::from_stream(s)))
}

fn ndjson_line<T: serde::Serialize>(v: &T) -> Bytes {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Events as JSON lines: the ones still in the ring after `since`, then (follow) live.
async fn events(
    State(d): State<Arc<Daemon>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let follow = bool_param(&q, "follow")?;
    let since = u64_param(&q, "since")?;
    let mut filter = EventFilter {
        job: q.get("job").cloned(),
        kinds: Vec::new(),
    };
    if let Some(kinds) = q.get("kind").filter(|k| !k.is_empty()) {
        for k in kinds.split(',') {
            let kind: EventKind = serde_json::from_value(serde_json::Value::String(
                k.trim().into(),
            ))
            .map_err(|_| ApiError::bad_request(format!("kind: unknown event kind \"{k}\"")))?;
            filter.kinds.push(kind);
        }
    }
    let (past, rx) = d.events.subscribe(since);
    let last_past = past.last().map_or(since, |e| e.seq);
    let f2 = filter.clone();
    let past = futures_util::stream::iter(
        past.into_iter()
            .filter(move |e| f2.matches(e))
            .map(|e| Ok::<Bytes, std::io::Error>(ndjson_line(&e))),
    );
    let live = futures_util::stream::unfold(
        (rx, filter, last_past),
        |(mut rx, filter, last)| async move {
            loop {
                match rx.recv().await {
                    Ok(e) if e.seq <= last => continue,
                    Ok(e) if filter.matches(&e) => {
                        return Some((Ok(ndjson_line(&e)), (rx, filter, last)));
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let lagged = Event {
                            seq: 0,
                            time_ms: crate::daemon::now_ms(),
                            kind: EventKind::Lagged,
                            job: None,
                            lease: None,
                            detail: format!("{n} event(s) missed: this reader fell behind"),
                        };
                        return Some((Ok(ndjson_line(&lagged)), (rx, filter, last)));
                    }
                    Err(_) => return None,
                }
            }
        },
    );
    let body = if follow {
        Body::from_stream(past.chain(live))
    } else {
        Body::from_stream(past)
    };
    Ok(streaming("application/x-ndjson", body))
}

async fn audit(
    State(d): State<Arc<Daemon>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let since = u64_param(&q, "since")?;
    let rows = d
        .store
        .operations(since, None)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let body: Vec<Result<Bytes, std::io::Error>> =
        rows.iter().map(|r| Ok(ndjson_line(r))).collect();
    Ok(streaming(
        "application/x-ndjson",
        Body::from_stream(futures_util::stream::iter(body)),
    ))
}

async fn audit_verify(State(d): State<Arc<Daemon>>) -> ApiResult<VerifyReport> {
    let d2 = d.clone();
    tokio::task::spawn_blocking(move || d2.store.verify())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map(axum::Json)
        .map_err(|e| ApiError::internal(e.to_string()))
}

async fn take_lease(State(d): State<Arc<Daemon>>, req: Request) -> Result<Response, ApiError> {
    let (who, body) = json_body::<LeaseRequest>(req).await?;
    let lease = to_the_end(async move { leases::take(&d, who, &body.ttl).await }).await?;
    Ok((StatusCode::CREATED, axum::Json(lease)).into_response())
}

async fn list_leases(State(d): State<Arc<Daemon>>) -> axum::Json<Vec<LeaseInfo>> {
    axum::Json(leases::list(&d))
}

async fn renew_lease(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<LeaseInfo> {
    let (who, body) = json_body::<RenewRequest>(req).await?;
    to_the_end(async move { leases::renew(&d, who, &id, body.ttl.as_deref()).await })
        .await
        .map(axum::Json)
}

async fn release_lease(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<LeaseInfo> {
    let who = peer(&req);
    to_the_end(async move { leases::release(&d, who, &id).await })
        .await
        .map(axum::Json)
}

async fn sched(State(d): State<Arc<Daemon>>) -> axum::Json<serde_json::Value> {
    axum::Json(crate::daemon::sched::view(&d))
}

#[derive(serde::Deserialize)]
struct ClassesQuery {
    job: Option<String>,
}

async fn create_region(State(d): State<Arc<Daemon>>, req: Request) -> Result<Response, ApiError> {
    let (who, body) = json_body::<crate::api::types::RegionCreateRequest>(req).await?;
    let v = to_the_end(async move { crate::daemon::regions::create(&d, body, who).await }).await?;
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

async fn list_regions(
    State(d): State<Arc<Daemon>>,
    axum::extract::Query(q): axum::extract::Query<ClassesQuery>,
) -> axum::Json<Vec<crate::api::types::RegionView>> {
    axum::Json(d.regions.list(q.job.as_deref()))
}

async fn get_region(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<ClassesQuery>,
) -> ApiResult<crate::api::types::RegionView> {
    d.regions.get(&name, q.job.as_deref()).map(axum::Json)
}

async fn publish_region(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    req: Request,
) -> ApiResult<crate::api::types::RegionView> {
    let who = peer(&req);
    to_the_end(async move { crate::daemon::regions::publish(&d, &name, who).await })
        .await
        .map(axum::Json)
}

async fn delete_region(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    req: Request,
) -> ApiResult<crate::api::types::RegionDeleted> {
    let who = peer(&req);
    to_the_end(async move { crate::daemon::regions::delete(&d, &name, who).await })
        .await
        .map(axum::Json)
}

async fn revoke_region(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    req: Request,
) -> ApiResult<crate::api::types::RegionView> {
    let who = peer(&req);
    to_the_end(async move { crate::daemon::regions::revoke(&d, &name, who).await })
        .await
        .map(axum::Json)
}

async fn classes(
    State(d): State<Arc<Daemon>>,
    axum::extract::Query(q): axum::extract::Query<ClassesQuery>,
) -> axum::Json<crate::api::types::ClassesReport> {
    let (classes, jobs) = d.classes.stats(q.job.as_deref());
    axum::Json(crate::api::types::ClassesReport { classes, jobs })
}

async fn metrics(State(d): State<Arc<Daemon>>) -> Response {
    let text = crate::daemon::metrics::render(&d);
    let mut r = Response::new(Body::from(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}
