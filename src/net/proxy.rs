//! The proxy that serves one job's endpoints: HTTP (CONNECT and plain requests), SOCKS5
//! and DNS, each destination checked against the job's `EgressPolicy`.
//!
//! Order for every connection: parse the request → match the name against the domain
//! rules (a bare address only if this job's resolver answered it for an allowed name) →
//! resolve with the host's resolver → drop addresses that are not public unless
//! `allow_private` → connect to one of exactly those addresses → relay, counting bytes.
//! A refusal answers in the protocol's own words (HTTP 403 with the rule in a header and
//! the body, SOCKS5 "not allowed by ruleset", NXDOMAIN), so a tool fails at once and an
//! agent can read why; the observer turns every decision into an event (and, in the
//! daemon, every denial into an operation row).

use super::{EgressPolicy, ProxyListeners, dns, rules};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};

/// A request head larger than this is refused (a proxy request is a line and a few
/// headers).
const MAX_HEAD: usize = 16 * 1024;
/// A client that has not finished its request head by then is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections and DNS queries one job may have in flight.
const MAX_CONNECTIONS: usize = 1024;
const MAX_DNS_IN_FLIGHT: usize = 256;
/// Denials kept for the report (all are counted).
const DENIALS_KEPT: usize = 200;
/// Bounds on what one job can make the proxy remember, so a job that loops over random
/// names (a wildcard rule allows any number) cannot grow the supervisor's memory:
/// destinations counted separately (the rest are summed under `OTHER`), addresses the
/// resolver answered, names it refused (each refused name is one decision; past the
/// bound every refused query is).
const DESTINATIONS_KEPT: usize = 1024;
const ANSWERED_KEPT: usize = 4096;
const REFUSED_NAMES_KEPT: usize = 1024;
/// Records per DNS answer: a UDP answer stays below 512 bytes, so the client never needs
/// the TCP fallback the resolver does not offer.
const MAX_ANSWERS: usize = 16;
const OTHER: &str = "(other destinations)";

/// One egress decision, for events, audit rows and the report.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// "http", "connect" (HTTP CONNECT), "socks5" or "dns".
    pub protocol: &'static str,
    /// NAME:PORT (or ADDRESS:PORT) as the job asked.
    pub destination: String,
    /// The address connected to (allowed connections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    pub allowed: bool,
    /// The rule that allowed it, or the rule that was missing.
    pub rule: String,
    /// Why, in words.
    pub reason: String,
}

/// Who hears of decisions: `agentd run` prints denials; the daemon emits events and
/// writes operation rows.
pub trait EgressObserver: Send + Sync {
    fn decided(&self, decision: &Decision);
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
    address: Mutex<Option<SocketAddr>>,
}

#[derive(Default)]
struct State {
    /// By NAME:PORT.
    destinations: BTreeMap<String, Arc<Counters>>,
    /// Addresses this job's resolver answered, and the allowed name each answered.
    answered: HashMap<IpAddr, String>,
    /// Names the resolver refused already (one decision per name, not per query).
    refused_names: HashSet<String>,
    denials: VecDeque<Decision>,
    allowed: u64,
    denied: u64,
}

/// One job's egress: its rules, its counters, its observer.
pub struct Membrane {
    job: String,
    policy: EgressPolicy,
    observer: Arc<dyn EgressObserver>,
    state: Mutex<State>,
    connections: Arc<Semaphore>,
    dns_in_flight: Arc<Semaphore>,
}

/// What the report says about the job's network.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct NetworkReport {
    pub mode: String,
    pub allow_domains: Vec<String>,
    pub allow_private: bool,
    /// The proxy's endpoints on the job's loopback (`proxy` mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<BTreeMap<String, String>>,
    pub destinations: Vec<DestinationReport>,
    pub connections_allowed: u64,
    pub denied: u64,
    /// The first denials, with the rule and the reason.
    pub denials: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DestinationReport {
    pub destination: String,
    pub address: Option<String>,
    pub connections: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// A refused or failed connection, answered in the client's protocol.
enum Refusal {
    Denied {
        rule: String,
        reason: String,
    },
    /// Allowed, but the name does not resolve or no address answers.
    Failed(String),
}

/// The job's endpoints being served; dropping it stops them and every relay.
pub struct Serving {
    _stop: watch::Sender<()>,
}

impl Membrane {
    pub fn new(
        job: &str,
        policy: EgressPolicy,
        observer: Arc<dyn EgressObserver>,
    ) -> Arc<Membrane> {
        Arc::new(Membrane {
            job: job.to_owned(),
            policy,
            observer,
            state: Mutex::default(),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            dns_in_flight: Arc::new(Semaphore::new(MAX_DNS_IN_FLIGHT)),
        })
    }

    pub fn job(&self) -> &str {
        &self.job
    }

    /// Serves the endpoints on the current tokio runtime until the result is dropped.
    pub fn serve(self: &Arc<Self>, listeners: ProxyListeners) -> std::io::Result<Serving> {
        let (stop, stopped) = watch::channel(());
        let http = TcpListener::from_std(listeners.http)?;
        let socks = TcpListener::from_std(listeners.socks)?;
        let dns = UdpSocket::from_std(listeners.dns)?;
        let me = self.clone();
        let rx = stopped.clone();
        tokio::spawn(until_stopped(
            rx.clone(),
            me.clone().accept_loop(http, Protocol::Http, rx),
        ));
        let rx = stopped.clone();
        tokio::spawn(until_stopped(
            rx.clone(),
            me.clone().accept_loop(socks, Protocol::Socks, rx),
        ));
        tokio::spawn(until_stopped(stopped, me.dns_loop(dns)));
        Ok(Serving { _stop: stop })
    }

    /// The report section, as of now.
    pub fn report(&self) -> NetworkReport {
        let st = self.state.lock().expect("membrane lock");
        let mut r = NetworkReport::for_policy(&self.policy);
        r.destinations = st
            .destinations
            .iter()
            .map(|(dest, c)| DestinationReport {
                destination: dest.clone(),
                address: c
                    .address
                    .lock()
                    .expect("counter lock")
                    .map(|a| a.to_string()),
                connections: c.connections.load(Ordering::Relaxed),
                bytes_up: c.up.load(Ordering::Relaxed),
                bytes_down: c.down.load(Ordering::Relaxed),
            })
            .collect();
        r.connections_allowed = st.allowed;
        r.denied = st.denied;
        r.denials = st
            .denials
            .iter()
            .map(|d| serde_json::to_value(d).unwrap_or_default())
            .collect();
        r
    }

    /// The policy key a decision rests on, qualified by the policy's name.
    fn rule(&self, key: &str) -> String {
        format!("{}:network.{key}", self.policy.policy_name)
    }

    fn no_pattern(&self, destination: &str) -> String {
        format!(
            "no network.allow_domains pattern of policy {} matches {destination}",
            self.policy.policy_name
        )
    }

    /// The resolver's refusal of `name`: one decision per name (see `first_refusal`).
    fn refuse_name(&self, name: &str, rule: String, reason: String) {
        if self.first_refusal(name) {
            self.decide(Decision {
                protocol: "dns",
                destination: name.to_owned(),
                address: None,
                allowed: false,
                rule,
                reason,
            });
        }
    }

    /// Whether `name` is refused for the first time (one decision per name; past the
    /// bound, every refusal is one).
    fn first_refusal(&self, name: &str) -> bool {
        let mut st = self.state.lock().expect("membrane lock");
        if st.refused_names.contains(name) {
            return false;
        }
        if st.refused_names.len() < REFUSED_NAMES_KEPT {
            st.refused_names.insert(name.to_owned());
        }
        true
    }

    fn decide(&self, d: Decision) {
        {
            let mut st = self.state.lock().expect("membrane lock");
            if d.allowed {
                st.allowed += 1;
            } else {
                st.denied += 1;
                if st.denials.len() < DENIALS_KEPT {
                    st.denials.push_back(d.clone());
                }
            }
        }
        self.observer.decided(&d);
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        protocol: Protocol,
        stopped: watch::Receiver<()>,
    ) {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                // EMFILE and the like: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            // Over the limit: the connection is closed at once.
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let me = self.clone();
            tokio::spawn(until_stopped(stopped.clone(), async move {
                let _permit = permit;
                match protocol {
                    Protocol::Http => me.http_client(client).await,
                    Protocol::Socks => me.socks_client(client).await,
                }
            }));
        }
    }

    /// Checks `host:port`, resolves it, connects to a checked address.
    async fn open(
        &self,
        protocol: &'static str,
        host: &str,
        port: u16,
    ) -> Result<(TcpStream, Arc<Counters>), Refusal> {
        let destination = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let deny = |rule: String, reason: String| {
            self.decide(Decision {
                protocol,
                destination: destination.clone(),
                address: None,
                allowed: false,
                rule: rule.clone(),
                reason: reason.clone(),
            });
            Refusal::Denied { rule, reason }
        };
        // A bare address: only one this job's resolver gave out for an allowed name.
        let (name, literal) = match host.parse::<IpAddr>() {
            Ok(ip) => {
                let answered = self
                    .state
                    .lock()
                    .expect("membrane lock")
                    .answered
                    .get(&ip)
                    .cloned();
                match answered {
                    Some(name) => (name, Some(ip)),
                    None => {
                        return Err(deny(
                            self.rule("allow_domains"),
                            format!(
                                "{destination} is a bare address; only names matching network.allow_domains are allowed (and addresses the job's resolver returned for them)"
                            ),
                        ));
                    }
                }
            }
            Err(_) => (rules::normalize(host), None),
        };
        let Some(rule) = rules::matching(&self.policy.allow, &name, Some(port)) else {
            return Err(deny(
                self.rule("allow_domains"),
                self.no_pattern(&format!("{name}:{port}")),
            ));
        };
        let rule = rule.rule.clone();
        let addrs: Vec<SocketAddr> = match literal {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => match tokio::net::lookup_host((name.as_str(), port)).await {
                Ok(a) => a.collect(),
                Err(e) => return Err(Refusal::Failed(format!("cannot resolve {name}: {e}"))),
            },
        };
        let (public, private): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs
            .into_iter()
            .partition(|a| self.policy.allow_private || rules::private_kind(a.ip()).is_none());
        if public.is_empty() {
            let shown = private.first().map(|a| a.ip());
            return Err(match shown {
                Some(ip) => deny(self.rule("allow_private"), private_reason(&name, ip)),
                None => Refusal::Failed(format!("{name} has no address")),
            });
        }
        let mut last = None;
        for addr in public {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let counters = {
                        let mut st = self.state.lock().expect("membrane lock");
                        let mut key = format!("{name}:{port}");
                        if st.destinations.len() >= DESTINATIONS_KEPT
                            && !st.destinations.contains_key(&key)
                        {
                            key = OTHER.to_owned();
                        }
                        st.destinations.entry(key).or_default().clone()
                    };
                    counters.connections.fetch_add(1, Ordering::Relaxed);
                    *counters.address.lock().expect("counter lock") = Some(addr);
                    self.decide(Decision {
                        protocol,
                        destination,
                        address: Some(addr),
                        allowed: true,
                        rule,
                        reason: format!("{name}:{port} matches an allowed domain"),
                    });
                    return Ok((stream, counters));
                }
                Ok(Err(e)) => last = Some(format!("{addr}: {e}")),
                Err(_) => {
                    last = Some(format!(
                        "{addr}: no answer in {}s",
                        CONNECT_TIMEOUT.as_secs()
                    ))
                }
            }
        }
        Err(Refusal::Failed(format!(
            "cannot connect to {name}:{port}: {}",
            last.unwrap_or_default()
        )))
    }

    // ---- HTTP ----------------------------------------------------------------------

    async fn http_client(&self, mut client: TcpStream) {
        let Ok(Ok((head, rest))) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await
        else {
            let _ = client
                .write_all(&http_error(
                    400,
                    "Bad Request",
                    None,
                    "agentd proxy: no complete request head\n",
                ))
                .await;
            return;
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&head), Ok(httparse::Status::Complete(_))) {
            let _ = client
                .write_all(&http_error(
                    400,
                    "Bad Request",
                    None,
                    "agentd proxy: malformed request\n",
                ))
                .await;
            return;
        }
        let method = req.method.unwrap_or("").to_owned();
        let target = req.path.unwrap_or("").to_owned();
        let (protocol, host, port, forward) = if method.eq_ignore_ascii_case("CONNECT") {
            match split_authority(&target, None) {
                Some((h, p)) => ("connect", h, p, None),
                None => {
                    let _ = client
                        .write_all(&http_error(
                            400,
                            "Bad Request",
                            None,
                            "agentd proxy: CONNECT needs HOST:PORT\n",
                        ))
                        .await;
                    return;
                }
            }
        } else {
            let Some(rest_of_url) = target.strip_prefix("http://") else {
                let _ = client
                    .write_all(&http_error(
                        400,
                        "Bad Request",
                        None,
                        "agentd proxy: expected an absolute http:// URL, or CONNECT for https\n",
                    ))
                    .await;
                return;
            };
            let (authority, path) = match rest_of_url.find('/') {
                Some(i) => (&rest_of_url[..i], &rest_of_url[i..]),
                None => (rest_of_url, "/"),
            };
            let Some((h, p)) = split_authority(authority, Some(80)) else {
                let _ = client
                    .write_all(&http_error(
                        400,
                        "Bad Request",
                        None,
                        "agentd proxy: bad host in the URL\n",
                    ))
                    .await;
                return;
            };
            // Origin form to the server; the proxy's own headers stay here.
            let mut out =
                format!("{method} {path} HTTP/1.{}\r\n", req.version.unwrap_or(1)).into_bytes();
            for h in req.headers.iter() {
                if h.name.to_ascii_lowercase().starts_with("proxy-") {
                    continue;
                }
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            ("http", h, p, Some(out))
        };
        match self.open(protocol, &host, port).await {
            Ok((mut upstream, counters)) => {
                let first = match forward {
                    Some(head) => head,
                    None => {
                        if client
                            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                            .await
                            .is_err()
                        {
                            return;
                        }
                        Vec::new()
                    }
                };
                let mut first = first;
                first.extend_from_slice(&rest);
                if !first.is_empty() {
                    if upstream.write_all(&first).await.is_err() {
                        return;
                    }
                    counters.up.fetch_add(first.len() as u64, Ordering::Relaxed);
                }
                relay(client, upstream, &counters).await;
            }
            Err(Refusal::Denied { rule, reason }) => {
                let body = format!("agentd egress: denied: {reason} (rule: {rule})\n");
                let _ = client
                    .write_all(&http_error(403, "Forbidden", Some(&rule), &body))
                    .await;
            }
            Err(Refusal::Failed(why)) => {
                let _ = client
                    .write_all(&http_error(
                        502,
                        "Bad Gateway",
                        None,
                        &format!("agentd egress: {why}\n"),
                    ))
                    .await;
            }
        }
    }

    // ---- SOCKS5 (RFC 1928), CONNECT only, no authentication ----------------------------

    async fn socks_client(&self, mut client: TcpStream) {
        let Ok(Ok(request)) = tokio::time::timeout(HEAD_TIMEOUT, socks_request(&mut client)).await
        else {
            return;
        };
        let (host, port) = match request {
            Ok(dest) => dest,
            Err(code) => {
                let _ = client.write_all(&socks_reply(code)).await;
                return;
            }
        };
        match self.open("socks5", &host, port).await {
            Ok((upstream, counters)) => {
                if client.write_all(&socks_reply(0)).await.is_ok() {
                    relay(client, upstream, &counters).await;
                }
            }
            // 2: connection not allowed by ruleset.
            Err(Refusal::Denied { .. }) => {
                let _ = client.write_all(&socks_reply(2)).await;
            }
            // 4: host unreachable.
            Err(Refusal::Failed(_)) => {
                let _ = client.write_all(&socks_reply(4)).await;
            }
        }
    }

    // ---- DNS -------------------------------------------------------------------------

    async fn dns_loop(self: Arc<Self>, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(permit) = self.dns_in_flight.clone().try_acquire_owned() else {
                continue; // over the limit: dropped, the client retries
            };
            let (me, sock, msg) = (self.clone(), sock.clone(), buf[..n].to_vec());
            tokio::spawn(async move {
                let _permit = permit;
                let answer = me.dns_answer(&msg).await;
                let _ = sock.send_to(&answer, peer).await;
            });
        }
    }

    async fn dns_answer(&self, msg: &[u8]) -> Vec<u8> {
        let q = match dns::parse_query(msg) {
            Ok(q) => q,
            Err(id) => return dns::format_error(id.unwrap_or(0)),
        };
        if q.qclass != 1 {
            return dns::answer(&q, dns::RCODE_NOTIMP, &[]);
        }
        let name = rules::normalize(&q.name);
        if rules::matching(&self.policy.allow, &name, None).is_none() {
            self.refuse_name(&name, self.rule("allow_domains"), self.no_pattern(&name));
            return dns::answer(&q, dns::RCODE_NXDOMAIN, &[]);
        }
        if q.qtype != dns::TYPE_A && q.qtype != dns::TYPE_AAAA {
            return dns::answer(&q, dns::RCODE_NOERROR, &[]);
        }
        let addrs: Vec<IpAddr> = match tokio::net::lookup_host((name.as_str(), 0)).await {
            Ok(a) => a.map(|a| a.ip()).collect(),
            Err(_) => return dns::answer(&q, dns::RCODE_NXDOMAIN, &[]),
        };
        let public: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|ip| self.policy.allow_private || rules::private_kind(*ip).is_none())
            .collect();
        if public.is_empty() && !addrs.is_empty() {
            self.refuse_name(
                &name,
                self.rule("allow_private"),
                private_reason(&name, addrs[0]),
            );
            return dns::answer(&q, dns::RCODE_NXDOMAIN, &[]);
        }
        {
            let mut st = self.state.lock().expect("membrane lock");
            for ip in &public {
                if st.answered.len() < ANSWERED_KEPT || st.answered.contains_key(ip) {
                    st.answered.insert(*ip, name.clone());
                }
            }
        }
        // Records of the question's type only, few enough for one UDP answer.
        let public: Vec<IpAddr> = public
            .into_iter()
            .filter(|ip| match q.qtype {
                dns::TYPE_A => ip.is_ipv4(),
                _ => ip.is_ipv6(),
            })
            .take(MAX_ANSWERS)
            .collect();
        dns::answer(&q, dns::RCODE_NOERROR, &public)
    }
}

impl NetworkReport {
    /// The report of a job's network grant, before any traffic.
    pub fn for_policy(p: &EgressPolicy) -> NetworkReport {
        NetworkReport {
            mode: p.mode.name().into(),
            allow_domains: p.allow.iter().map(|r| r.pattern.clone()).collect(),
            allow_private: p.allow_private,
            endpoints: (p.mode == super::NetMode::Proxy).then(|| {
                BTreeMap::from([
                    (
                        "http".to_string(),
                        format!("127.0.0.1:{}", super::HTTP_PORT),
                    ),
                    (
                        "socks5".to_string(),
                        format!("127.0.0.1:{}", super::SOCKS_PORT),
                    ),
                    (
                        "dns".to_string(),
                        format!("127.0.0.1:{}/udp", super::DNS_PORT),
                    ),
                ])
            }),
            ..Default::default()
        }
    }
}

fn private_reason(name: &str, ip: IpAddr) -> String {
    format!(
        "{name} resolves to {ip}, a {} address; such destinations need network.allow_private (or --allow-private)",
        rules::private_kind(ip).unwrap_or("private")
    )
}

#[derive(Clone, Copy)]
enum Protocol {
    Http,
    Socks,
}

/// Runs `work` until it ends or the membrane stops.
async fn until_stopped(
    mut stopped: watch::Receiver<()>,
    work: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        _ = work => {}
        _ = stopped.changed() => {}
    }
}

/// Reads up to the end of the request head; returns (head, bytes after it).
async fn read_head(client: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + i + 4;
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
}

/// "host:port", "[v6]:port", or "host" with a default port.
fn split_authority(s: &str, default_port: Option<u16>) -> Option<(String, u16)> {
    let s = s.rsplit_once('@').map_or(s, |(_, h)| h); // no userinfo to the server
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port?,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Some((h.to_owned(), p.parse().ok().filter(|p| *p != 0)?)),
        Some(_) => None,
        None if !s.is_empty() => Some((s.to_owned(), default_port?)),
        None => None,
    }
}

fn http_error(code: u16, text: &str, rule: Option<&str>, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(rule) = rule {
        out.push_str(&format!("X-Agentd-Denied: {rule}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// The SOCKS5 greeting and request; Ok(Err(code)) for a request answered with an error.
async fn socks_request(client: &mut TcpStream) -> std::io::Result<Result<(String, u16), u8>> {
    let mut hdr = [0u8; 2];
    client.read_exact(&mut hdr).await?;
    if hdr[0] != 5 {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    let mut methods = vec![0u8; hdr[1] as usize];
    client.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        client.write_all(&[5, 0xff]).await?; // no acceptable method
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    client.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    client.read_exact(&mut req).await?;
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            client.read_exact(&mut a).await?;
            IpAddr::from(a).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            client.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
        4 => {
            let mut a = [0u8; 16];
            client.read_exact(&mut a).await?;
            IpAddr::from(a).to_string()
        }
        _ => return Ok(Err(8)), // address type not supported
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    if req[1] != 1 {
        return Ok(Err(7)); // command not supported: CONNECT only
    }
    Ok(Ok((host, u16::from_be_bytes(port))))
}

fn socks_reply(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Relays both ways, counting into the destination's counters.
async fn relay(client: TcpStream, upstream: TcpStream, counters: &Counters) {
    super::relay::relay(client, upstream, &counters.up, &counters.down).await
}

#[cfg(test)]
mod tests {
    use super::split_authority;

    #[test]
    fn authorities() {
        assert_eq!(split_authority("a.b:443", None), Some(("a.b".into(), 443)));
        assert_eq!(split_authority("a.b", Some(80)), Some(("a.b".into(), 80)));
        assert_eq!(split_authority("a.b", None), None);
        assert_eq!(
            split_authority("[::1]:8080", None),
            Some(("::1".into(), 8080))
        );
        assert_eq!(
            split_authority("u:p@a.b:81", Some(80)),
            Some(("a.b".into(), 81))
        );
        assert_eq!(split_authority(":80", None), None);
        assert_eq!(split_authority("a.b:0", None), None);
        assert_eq!(split_authority("a.b:x", None), None);
    }
}
