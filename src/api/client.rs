//! A small async client of the control API: HTTP/1.1 over the daemon's Unix socket,
//! one connection per request. `agentctl` is built on it.
//!
//! Every call returns [`ClientError`]: `Connect` when the socket cannot be reached (with a
//! hint for the operator), `Api` with the daemon's own `{"error": ...}` message verbatim,
//! `Io` when the connection breaks mid-request, `Protocol` when the reply is not what the
//! API promises (bad JSON, say).

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::types::ErrorBody;

/// Where `agentd serve` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/agentd/agentd.sock";

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached: no daemon there, or no permission to connect.
    #[error("cannot connect to agentd at {}: {source}; {}", socket.display(), connect_hint(source))]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The daemon refused or failed the request; `message` is its own, verbatim.
    #[error("{message}")]
    Api { status: u16, message: String },
    /// The connection broke while the request or its answer was in flight.
    #[error("talking to agentd: {0}")]
    Io(#[from] io::Error),
    /// The daemon's answer does not follow the API (bad JSON, a missing header, ...).
    #[error("unexpected answer from agentd: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The HTTP status of an `Api` error (404 for an unknown job, ...).
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What to tell the operator about a failed connect, by the OS error.
fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            "permission denied means you are not root or in the socket's group"
        }
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            "is `agentd serve` running? --socket or AGENTD_SOCKET picks another daemon"
        }
        _ => {
            "is `agentd serve` running? --socket or AGENTD_SOCKET picks another daemon; \
             permission denied means you are not root or in the socket's group"
        }
    }
}

/// Turns a hyper error into an I/O error, keeping the OS error kind where there is one.
fn hyper_io(e: hyper::Error) -> ClientError {
    let kind = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<io::Error>())
        .map_or(io::ErrorKind::Other, io::Error::kind);
    ClientError::Io(io::Error::new(kind, e))
}

/// A handle on one daemon, by its socket path. Cheap to clone; holds no connection.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    /// The socket this client connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// GET `path` and parse the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.send(Method::GET, path, None).await?;
        json_body(resp, "GET", path).await
    }

    /// POST `body` as JSON to `path` and parse the JSON answer.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| ClientError::Protocol(format!("cannot encode the request: {e}")))?;
        let resp = self.send(Method::POST, path, Some(bytes)).await?;
        json_body(resp, "POST", path).await
    }

    /// POST with no body at all (Content-Length: 0) and parse the JSON answer: for the
    /// actions that take no arguments (freeze, thaw, detach, release).
    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.send(Method::POST, path, None).await?;
        json_body(resp, "POST", path).await
    }

    /// DELETE `path` and parse the JSON answer.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.send(Method::DELETE, path, None).await?;
        json_body(resp, "DELETE", path).await
    }

    /// GET `path` and return the whole answer as text (e.g. /metrics).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let resp = self.send(Method::GET, path, None).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(hyper_io)?
            .to_bytes();
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ClientError::Protocol(format!("GET {path}: the answer is not UTF-8")))
    }

    /// A streaming GET: the answer's body as it arrives (logs with follow=true, events).
    /// An error status is turned into `ClientError::Api` before any byte is returned.
    pub async fn stream(&self, path: &str) -> Result<ByteStream, ClientError> {
        let resp = self.send(Method::GET, path, None).await?;
        Ok(ByteStream {
            body: resp.into_body(),
            pending: Vec::new(),
            done: false,
        })
    }

    /// Connects, sends one request and returns the response if its status is 2xx;
    /// otherwise reads the error body and returns `ClientError::Api`.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(hyper_io)?;
        // The connection driver: runs until the response body is read or dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });

        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "agentd")
            .header(hyper::header::ACCEPT, "application/json");
        let body = match body {
            Some(bytes) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req
            .body(body)
            .map_err(|e| ClientError::Protocol(format!("cannot build request for {path}: {e}")))?;
        let resp = sender.send_request(req).await.map_err(hyper_io)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(hyper_io)?
            .to_bytes();
        Err(ClientError::Api {
            status: status.as_u16(),
            message: error_message(status, &bytes),
        })
    }
}

/// The message of an error answer: the daemon's `{"error": ...}`, else its text, else
/// the status line.
fn error_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        return e.error;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        format!(
            "HTTP {} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .trim_end()
        .to_string()
    } else {
        text.to_string()
    }
}

async fn json_body<T: DeserializeOwned>(
    resp: Response<Incoming>,
    method: &str,
    path: &str,
) -> Result<T, ClientError> {
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(hyper_io)?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Protocol(format!("{method} {path}: {e}")))
}

/// The body of a streaming answer, read chunk by chunk or line by line.
pub struct ByteStream {
    body: Incoming,
    /// Bytes received but not yet returned (a partial line).
    pending: Vec<u8>,
    done: bool,
}

impl ByteStream {
    /// The next piece of the body as it arrived; `None` once the daemon ended it.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        if !self.pending.is_empty() {
            return Ok(Some(Bytes::from(std::mem::take(&mut self.pending))));
        }
        self.next_data().await
    }

    /// The next line, without its newline (for JSON lines); a last line without a newline
    /// is returned too. `None` once the daemon ended the body.
    pub async fn next_line(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        loop {
            if let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=nl).collect();
                line.pop();
                return Ok(Some(line));
            }
            match self.next_data().await? {
                Some(chunk) => self.pending.extend_from_slice(&chunk),
                None if self.pending.is_empty() => return Ok(None),
                None => return Ok(Some(std::mem::take(&mut self.pending))),
            }
        }
    }

    /// The next data frame from the wire, skipping trailers.
    async fn next_data(&mut self) -> Result<Option<Bytes>, ClientError> {
        while !self.done {
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(e)) => return Err(hyper_io(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Ok(Some(data));
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Percent-encodes `s` for use as a query value or a path segment: everything but the
/// unreserved characters (RFC 3986: letters, digits, `-._~`) becomes `%XX`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `path` followed by a query string of the pairs that have a value, each encoded:
/// `with_query("/v1/events", &[("follow", Some("true")), ("job", None)])` is
/// `/v1/events?follow=true`.
pub fn with_query(path: &str, pairs: &[(&str, Option<&str>)]) -> String {
    let mut out = path.to_string();
    let mut sep = '?';
    for (key, value) in pairs {
        if let Some(v) = value {
            out.push(sep);
            out.push_str(&encode(key));
            out.push('=');
            out.push_str(&encode(v));
            sep = '&';
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_reserved_bytes() {
        assert_eq!(encode("0a1b2c"), "0a1b2c");
        assert_eq!(encode("started,exited"), "started%2Cexited");
        assert_eq!(encode("a b&c=d/e?"), "a%20b%26c%3Dd%2Fe%3F");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(encode("-._~"), "-._~");
    }

    #[test]
    fn builds_queries() {
        assert_eq!(with_query("/v1/jobs", &[]), "/v1/jobs");
        assert_eq!(
            with_query(
                "/v1/events",
                &[
                    ("follow", Some("true")),
                    ("job", None),
                    ("kind", Some("started,exited"))
                ]
            ),
            "/v1/events?follow=true&kind=started%2Cexited"
        );
    }

    #[test]
    fn error_messages_are_the_daemons() {
        assert_eq!(
            error_message(StatusCode::NOT_FOUND, br#"{"error":"no job abc"}"#),
            "no job abc"
        );
        assert_eq!(
            error_message(StatusCode::BAD_GATEWAY, b" upstream gone\n"),
            "upstream gone"
        );
        assert_eq!(
            error_message(StatusCode::INTERNAL_SERVER_ERROR, b""),
            "HTTP 500 Internal Server Error"
        );
    }

    #[test]
    fn connect_errors_say_where_and_why() {
        let e = ClientError::Connect {
            socket: "/run/x.sock".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        let text = e.to_string();
        assert!(text.contains("/run/x.sock"), "{text}");
        assert!(text.contains("not root or in the socket's group"), "{text}");
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let client = Client::new("/nonexistent/agentd.sock");
        let err = client
            .get::<serde_json::Value>("/v1/health")
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("agentd serve"), "{err}");
    }

    /// A stand-in daemon on a Unix socket in a temporary directory.
    fn fake_daemon() -> (tempfile::TempDir, Client) {
        use http_body_util::StreamBody;
        use http_body_util::combinators::BoxBody;
        use hyper::body::Frame;
        use std::convert::Infallible;

        async fn answer(
            req: Request<Incoming>,
        ) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
            let full = |status: u16, body: &str| {
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from(body.to_string())).boxed())
                    .unwrap()
            };
            let (parts, body) = req.into_parts();
            let path_and_query = parts.uri.path_and_query().unwrap().as_str().to_string();
            let body = body.collect().await.unwrap().to_bytes();
            Ok(match (parts.method.as_str(), path_and_query.as_str()) {
                ("GET", "/v1/health") => full(200, r#"{"ok":true,"version":"t","pid":1}"#),
                ("GET", "/v1/jobs/nope") => full(404, r#"{"error":"no job \"nope\""}"#),
                ("GET", "/bad") => full(200, "not json"),
                ("GET", "/metrics") => full(200, "# HELP x\nx 1\n"),
                ("POST", "/echo") => {
                    let ct = parts
                        .headers
                        .get(hyper::header::CONTENT_TYPE)
                        .map_or("", |v| v.to_str().unwrap());
                    assert_eq!(ct, "application/json");
                    full(201, std::str::from_utf8(&body).unwrap())
                }
                ("POST", "/empty") => {
                    assert!(body.is_empty());
                    full(200, "[]")
                }
                ("GET", "/v1/events?follow=true&kind=started%2Cexited") => {
                    let chunks = ["{\"a\":1}\n{\"a\"", ":2}\n", "\n{\"a\":3}"];
                    let frames = futures_util::stream::iter(
                        chunks.map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c)))),
                    );
                    Response::new(StreamBody::new(frames).boxed())
                }
                _ => full(500, ""),
            })
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer)),
                );
            }
        });
        (dir, Client::new(path))
    }

    #[tokio::test]
    async fn talks_to_a_daemon() {
        let (_dir, client) = fake_daemon();
        let health: serde_json::Value = client.get("/v1/health").await.unwrap();
        assert_eq!(health["pid"], 1);

        let err = client
            .get::<serde_json::Value>("/v1/jobs/nope")
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(404));
        assert_eq!(err.to_string(), "no job \"nope\"");

        let err = client.get::<serde_json::Value>("/bad").await.unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err}");
        let err = client.get::<serde_json::Value>("/other").await.unwrap_err();
        assert_eq!(err.to_string(), "HTTP 500 Internal Server Error");

        let sent = serde_json::json!({"ttl": "30s"});
        let back: serde_json::Value = client.post("/echo", &sent).await.unwrap();
        assert_eq!(back, sent);
        let none: Vec<u8> = client.post_empty("/empty").await.unwrap();
        assert!(none.is_empty());
        assert_eq!(
            client.get_text("/metrics").await.unwrap(),
            "# HELP x\nx 1\n"
        );

        let path = with_query(
            "/v1/events",
            &[("follow", Some("true")), ("kind", Some("started,exited"))],
        );
        let mut lines = Vec::new();
        let mut stream = client.stream(&path).await.unwrap();
        while let Some(line) = stream.next_line().await.unwrap() {
            lines.push(String::from_utf8(line).unwrap());
        }
        assert_eq!(lines, [r#"{"a":1}"#, r#"{"a":2}"#, "", r#"{"a":3}"#]);
    }
}
