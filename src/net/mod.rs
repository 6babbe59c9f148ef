//! The egress membrane: how a job reaches the network, if at all.
//!
//! Every job has its own network namespace. In `none` mode it holds only loopback. In
//! `proxy` mode it holds only loopback too, but agentd's proxy endpoints listen there
//! (sockets agentd created inside the namespace and serves from outside, see
//! `listeners`): an HTTP proxy (CONNECT and plain HTTP), a SOCKS5 endpoint and a DNS
//! resolver. Each connection's destination is checked against the job's domain rules
//! (`rules`), resolved with the host's resolver, checked again by address (no private,
//! loopback or link-local targets unless granted), and connected to exactly the address
//! that was checked (no DNS rebinding). Landlock then lets the job connect to no TCP port
//! but the proxy's. `host` mode shares the host's network namespace, for trusted jobs;
//! the report says so.

pub mod dns;
pub mod listeners;
pub mod proxy;
mod relay;
pub mod rules;
pub mod standalone;

pub use listeners::ProxyListeners;
pub use proxy::{Decision, EgressObserver, Membrane, NetworkReport};
pub use rules::DomainRule;

use serde::{Deserialize, Serialize};

/// The proxy endpoints on the job's loopback (its own namespace, so fixed ports).
pub const HTTP_PORT: u16 = 3128;
pub const SOCKS_PORT: u16 = 1080;
pub const DNS_PORT: u16 = 53;

/// How the job reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// Loopback only.
    #[default]
    None,
    /// Loopback plus agentd's proxy, to allowed destinations only.
    Proxy,
    /// The host's network namespace (no isolation; for trusted jobs).
    Host,
}

impl NetMode {
    pub fn parse(s: &str) -> Option<NetMode> {
        match s {
            "none" => Some(NetMode::None),
            "proxy" => Some(NetMode::Proxy),
            "host" => Some(NetMode::Host),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NetMode::None => "none",
            NetMode::Proxy => "proxy",
            NetMode::Host => "host",
        }
    }

    /// Strictness order: none is the strictest, host the widest.
    pub fn rank(self) -> u8 {
        match self {
            NetMode::None => 0,
            NetMode::Proxy => 1,
            NetMode::Host => 2,
        }
    }
}

/// A job's network grant, after the policy and the command line are merged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPolicy {
    pub mode: NetMode,
    /// Domain patterns the proxy lets through, in the order they are checked.
    pub allow: Vec<DomainRule>,
    /// Private, loopback and link-local destinations too.
    pub allow_private: bool,
    /// The rule that set `allow_private` (for denials that name what would allow them).
    #[serde(default)]
    pub policy_name: String,
}

/// The variables that point tools at the proxy (`proxy` mode). Upper and lower case,
/// since tools disagree; npm, pip, cargo and git read their own as well.
pub fn proxy_env() -> Vec<(&'static str, String)> {
    let http = format!("http://127.0.0.1:{HTTP_PORT}");
    let socks = format!("socks5h://127.0.0.1:{SOCKS_PORT}");
    let no_proxy = "localhost,127.0.0.1,::1".to_string();
    vec![
        ("HTTP_PROXY", http.clone()),
        ("http_proxy", http.clone()),
        ("HTTPS_PROXY", http.clone()),
        ("https_proxy", http.clone()),
        ("ALL_PROXY", socks.clone()),
        ("all_proxy", socks),
        ("NO_PROXY", no_proxy.clone()),
        ("no_proxy", no_proxy),
        ("npm_config_proxy", http.clone()),
        ("npm_config_https_proxy", http.clone()),
        ("PIP_PROXY", http.clone()),
        ("CARGO_HTTP_PROXY", http.clone()),
        // git reads http_proxy too, but its own setting wins over a global gitconfig.
        ("GIT_CONFIG_COUNT", "1".into()),
        ("GIT_CONFIG_KEY_0", "http.proxy".into()),
        ("GIT_CONFIG_VALUE_0", http),
    ]
}

/// /etc/resolv.conf inside a `proxy` job: its resolver is the proxy's.
pub const RESOLV_CONF: &str = "# agentd: this job's resolver answers only for the names its policy allows\nnameserver 127.0.0.1\noptions timeout:2 attempts:2\n";
