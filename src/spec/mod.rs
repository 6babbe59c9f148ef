//! Job spec and policy: parse TOML, validate, and report errors with file, line and key.
//!
//! A policy is data. It grants typed capabilities (filesystem paths by access kind, TCP
//! ports), sets limits, names the job's identity and the user it runs as. Anything the
//! parser does not know is an error, never ignored: a typo in a security policy must not
//! silently widen or narrow it.

pub mod quotas;
pub mod regions;
pub mod sched;
mod units;
mod values;

pub use units::{parse_duration, parse_size};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;
use toml::Spanned;
use values::{IdChoice, Number, PathEntry, UnitValue};

/// Policies shipped in the binary, so `agentd run` works with no files installed.
pub const BUILTIN_POLICIES: &[(&str, &str)] = &[
    ("default", include_str!("../../policies/default.toml")),
    (
        "ci-coding-agent",
        include_str!("../../policies/ci-coding-agent.toml"),
    ),
    (
        "offline-build",
        include_str!("../../policies/offline-build.toml"),
    ),
];

/// Where operators put their own policies; `--policy NAME` looks here first.
pub const POLICY_DIR: &str = "/etc/agentd/policies";

/// A policy or command-line value that cannot be accepted.
#[derive(Debug, thiserror::Error)]
#[error("{origin}{}: {key}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct SpecError {
    /// The file, "built-in policy NAME", or "command line".
    pub origin: String,
    pub line: Option<usize>,
    /// The offending key, dotted (`limits.memory`), or the flag (`--memory`).
    pub key: String,
    pub message: String,
}

/// How much a filesystem grant allows. Each level includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Exec,
    Write,
}

/// One filesystem grant, with the rule that made it (for reports and the audit trail).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PathGrant {
    pub path: PathBuf,
    pub access: Access,
    pub rule: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Limits {
    /// CPUs, possibly fractional (0.5 = half of one CPU).
    pub cpu: Option<f64>,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    #[serde(serialize_with = "ser_opt_duration")]
    pub timeout: Option<Duration>,
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Identity {
    pub agent: String,
    pub model: String,
}

/// A validated policy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Policy {
    pub name: String,
    /// The file it came from, or "built-in".
    pub source: String,
    /// sha256 of the policy text, so a report names exactly what was applied.
    pub sha256: String,
    pub description: String,
    pub identity: Identity,
    /// Host uid/gid the job runs as; None = "auto" (the workspace owner, or nobody).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub filesystem: Vec<PathGrant>,
    pub tcp_bind: Vec<u16>,
    pub tcp_connect: Vec<u16>,
    /// How the job reaches the network (`network.mode`, `allow_domains`, `allow_private`).
    pub egress: crate::net::EgressPolicy,
    pub limits: Limits,
    pub env_pass: Vec<String>,
    pub env_set: BTreeMap<String, String>,
    pub hostname: String,
    /// The lowest Landlock ABI this policy is willing to run under.
    pub landlock_abi: u32,
    pub lifecycle: Lifecycle,
    pub workspace: WorkspacePolicy,
    /// What the job may make the daemon hold (tool-call records, context segments).
    pub quotas: quotas::Quotas,
    /// Its scheduling class and what a job may ask for (`[sched]`).
    pub sched: sched::SchedPolicy,
    /// The regions a job may be given (`[regions]`).
    pub regions: Vec<regions::RegionRule>,
}

/// Which workspace handles a job of this policy may get.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkspacePolicy {
    /// "direct", "readonly" (a borrowed directory or published snapshot), "review".
    pub modes: Vec<crate::workspace::WorkspaceMode>,
    /// A second review job on a directory that has one: refused (false), or given its
    /// own overlay of the same directory (true; the accept of the second then finds the
    /// directory changed if the first was accepted, and is refused).
    pub clone_concurrent_review: bool,
}

impl Default for WorkspacePolicy {
    fn default() -> Self {
        use crate::workspace::WorkspaceMode::*;
        WorkspacePolicy {
            modes: vec![Direct, Readonly, Review],
            clone_concurrent_review: false,
        }
    }
}

/// How the daemon may keep and stop a job of this policy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Lifecycle {
    /// Whether a job may outlive its client (`agentctl run --detach`, `agentctl detach`).
    pub durable: bool,
    /// Time between SIGTERM and killing the whole cgroup when a job is cancelled.
    #[serde(serialize_with = "ser_duration")]
    pub kill_grace: Duration,
    /// Bytes of stdout and of stderr the daemon keeps per job.
    pub log_cap: u64,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            durable: false,
            kill_grace: Duration::from_secs(5),
            log_cap: 16 << 20,
        }
    }
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

// ---- raw TOML shape -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<Spanned<String>>,
    description: Option<String>,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    user: RawUser,
    #[serde(default)]
    filesystem: RawFilesystem,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    env: RawEnv,
    #[serde(default)]
    sandbox: RawSandbox,
    #[serde(default)]
    lifecycle: RawLifecycle,
    #[serde(default)]
    workspace: RawWorkspace,
    #[serde(default)]
    quotas: quotas::RawQuotas,
    #[serde(default)]
    sched: sched::RawSched,
    #[serde(default)]
    regions: regions::RawRegions,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWorkspace {
    modes: Option<Spanned<Vec<String>>>,
    concurrent_review: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLifecycle {
    durable: Option<bool>,
    kill_grace: Option<Spanned<UnitValue>>,
    log_cap: Option<Spanned<UnitValue>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    agent: Option<String>,
    model: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUser {
    uid: Option<Spanned<IdChoice>>,
    gid: Option<Spanned<IdChoice>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFilesystem {
    #[serde(default)]
    read: Vec<Spanned<PathEntry>>,
    #[serde(default)]
    exec: Vec<Spanned<PathEntry>>,
    #[serde(default)]
    write: Vec<Spanned<PathEntry>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    tcp_bind: Vec<Spanned<i64>>,
    #[serde(default)]
    tcp_connect: Vec<Spanned<i64>>,
    mode: Option<Spanned<String>>,
    #[serde(default)]
    allow_domains: Vec<Spanned<String>>,
    allow_private: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    cpu: Option<Spanned<Number>>,
    memory: Option<Spanned<UnitValue>>,
    pids: Option<Spanned<i64>>,
    timeout: Option<Spanned<UnitValue>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEnv {
    #[serde(default)]
    pass: Vec<Spanned<String>>,
    #[serde(default)]
    set: BTreeMap<String, Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    hostname: Option<Spanned<String>>,
    landlock_abi: Option<Spanned<i64>>,
}

// ---- loading --------------------------------------------------------------------------

/// Finds and parses the policy `--policy` names: a path (contains '/' or ends in .toml),
/// else NAME.toml in `policy_dir`, else a built-in policy of that name.
pub fn load_policy(name_or_path: &str, policy_dir: &Path) -> Result<Policy, SpecError> {
    let looks_like_path = name_or_path.contains('/') || name_or_path.ends_with(".toml");
    if looks_like_path {
        let text = std::fs::read_to_string(name_or_path).map_err(|e| SpecError {
            origin: name_or_path.to_owned(),
            line: None,
            key: "--policy".into(),
            message: format!("cannot read the policy file: {e}"),
        })?;
        return parse_policy(&text, name_or_path, default_name(name_or_path));
    }
    if name_or_path.is_empty()
        || !name_or_path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(SpecError {
            origin: "command line".into(),
            line: None,
            key: "--policy".into(),
            message: format!(
                "\"{name_or_path}\" is neither a policy name (letters, digits, '-', '_') nor a path"
            ),
        });
    }
    let file = policy_dir.join(format!("{name_or_path}.toml"));
    match std::fs::read_to_string(&file) {
        Ok(text) => return parse_policy(&text, &file.display().to_string(), name_or_path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(SpecError {
                origin: file.display().to_string(),
                line: None,
                key: "--policy".into(),
                message: format!("cannot read the policy file: {e}"),
            });
        }
    }
    match BUILTIN_POLICIES.iter().find(|(n, _)| *n == name_or_path) {
        Some((name, text)) => parse_policy(text, &format!("built-in policy {name}"), name),
        None => Err(SpecError {
            origin: "command line".into(),
            line: None,
            key: "--policy".into(),
            message: format!(
                "no policy named \"{name_or_path}\" in {} or built in (built-in: {})",
                policy_dir.display(),
                BUILTIN_POLICIES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

fn default_name(path: &str) -> &str {
    Path::new(path)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("policy")
}

/// Parses and validates one policy text. `origin` names it in errors.
pub fn parse_policy(text: &str, origin: &str, default_name: &str) -> Result<Policy, SpecError> {
    let line_of = |span: std::ops::Range<usize>| {
        // Counted on bytes: a span is never trusted to fall on a char boundary.
        let upto = &text.as_bytes()[..span.start.min(text.len())];
        Some(upto.iter().filter(|&&b| b == b'\n').count() + 1)
    };
    let err = |span: Option<std::ops::Range<usize>>, key: &str, message: String| SpecError {
        origin: origin.to_owned(),
        line: span.and_then(line_of),
        key: key.to_owned(),
        message,
    };

    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
        let (key, message) = describe_toml_error(&e);
        err(e.span(), &key, message)
    })?;

    let name = match &raw.name {
        Some(n) => {
            let ok = !n.get_ref().is_empty()
                && n.get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(err(
                    Some(n.span()),
                    "name",
                    format!(
                        "\"{}\" is not a valid policy name (letters, digits, '-', '_')",
                        n.get_ref()
                    ),
                ));
            }
            n.get_ref().clone()
        }
        None => default_name.to_owned(),
    };

    // Filesystem grants, merged per path to the widest access asked for.
    let mut grants: BTreeMap<PathBuf, PathGrant> = BTreeMap::new();
    for (key, list, access) in [
        ("filesystem.read", &raw.filesystem.read, Access::Read),
        ("filesystem.exec", &raw.filesystem.exec, Access::Exec),
        ("filesystem.write", &raw.filesystem.write, Access::Write),
    ] {
        for (index, entry) in list.iter().enumerate() {
            let span = Some(entry.span());
            let path = validate_grant_path(&entry.get_ref().path)
                .map_err(|m| err(span.clone(), key, m))?;
            match std::fs::symlink_metadata(&path) {
                Ok(_) => {}
                Err(_) if entry.get_ref().optional => continue,
                Err(e) => {
                    return Err(err(
                        span,
                        key,
                        format!(
                            "{} {} (write {{ path = \"{}\", optional = true }} if it may be absent)",
                            path.display(),
                            if e.kind() == std::io::ErrorKind::NotFound {
                                "does not exist".to_owned()
                            } else {
                                format!("cannot be inspected: {e}")
                            },
                            path.display()
                        ),
                    ));
                }
            }
            let rule = format!("{name}:{key}[{index}]");
            let slot = grants.entry(path.clone()).or_insert(PathGrant {
                path,
                access,
                rule: rule.clone(),
            });
            if access > slot.access {
                slot.access = access;
                slot.rule = rule;
            }
        }
    }

    let ports = |key: &str, list: &[Spanned<i64>]| -> Result<Vec<u16>, SpecError> {
        list.iter()
            .map(|p| match u16::try_from(*p.get_ref()) {
                Ok(port) if port != 0 => Ok(port),
                _ => Err(err(
                    Some(p.span()),
                    key,
                    format!("{} is not a TCP port (1-65535)", p.get_ref()),
                )),
            })
            .collect()
    };
    let tcp_bind = ports("network.tcp_bind", &raw.network.tcp_bind)?;
    let tcp_connect = ports("network.tcp_connect", &raw.network.tcp_connect)?;
    let mode = match &raw.network.mode {
        None => crate::net::NetMode::None,
        Some(m) => crate::net::NetMode::parse(m.get_ref()).ok_or_else(|| {
            err(
                Some(m.span()),
                "network.mode",
                format!(
                    "expected \"none\", \"proxy\" or \"host\", got \"{}\"",
                    m.get_ref()
                ),
            )
        })?,
    };
    let mut allow = Vec::new();
    for (index, p) in raw.network.allow_domains.iter().enumerate() {
        let pattern = crate::net::rules::validate_pattern(p.get_ref())
            .map_err(|m| err(Some(p.span()), "network.allow_domains", m))?;
        allow.push(crate::net::DomainRule {
            pattern,
            rule: format!("{name}:network.allow_domains[{index}]"),
        });
    }
    if mode != crate::net::NetMode::Proxy
        && let Some(first) = raw.network.allow_domains.first()
    {
        return Err(err(
            Some(first.span()),
            "network.allow_domains",
            format!(
                "domains are allowed through agentd's proxy, and network.mode is \"{}\"; set mode = \"proxy\"",
                mode.name()
            ),
        ));
    }
    let egress = crate::net::EgressPolicy {
        mode,
        allow,
        allow_private: raw.network.allow_private.unwrap_or(false),
        policy_name: name.clone(),
    };

    let mut limits = Limits::default();
    if let Some(cpu) = &raw.limits.cpu {
        limits.cpu =
            Some(check_cpu(cpu.get_ref().0).map_err(|m| err(Some(cpu.span()), "limits.cpu", m))?);
    }
    if let Some(mem) = &raw.limits.memory {
        let bytes = match mem.get_ref() {
            UnitValue::Int(n) if *n >= 0 => Ok(*n as u64),
            UnitValue::Int(n) => Err(format!("{n} is negative")),
            UnitValue::Text(t) => parse_size(t),
        };
        limits.memory = Some(
            bytes
                .and_then(check_memory)
                .map_err(|m| err(Some(mem.span()), "limits.memory", m))?,
        );
    }
    if let Some(pids) = &raw.limits.pids {
        limits.pids = Some(
            check_pids(*pids.get_ref()).map_err(|m| err(Some(pids.span()), "limits.pids", m))?,
        );
    }
    if let Some(t) = &raw.limits.timeout {
        let d = match t.get_ref() {
            UnitValue::Int(n) if *n >= 0 => Ok(Duration::from_secs(*n as u64)),
            UnitValue::Int(n) => Err(format!("{n} is negative")),
            UnitValue::Text(s) => parse_duration(s),
        };
        limits.timeout = Some(
            d.and_then(check_timeout)
                .map_err(|m| err(Some(t.span()), "limits.timeout", m))?,
        );
    }

    let mut lifecycle = Lifecycle::default();
    if let Some(d) = raw.lifecycle.durable {
        lifecycle.durable = d;
    }
    if let Some(t) = &raw.lifecycle.kill_grace {
        let d = match t.get_ref() {
            UnitValue::Int(n) if *n >= 0 => Ok(Duration::from_secs(*n as u64)),
            UnitValue::Int(n) => Err(format!("{n} is negative")),
            UnitValue::Text(s) => parse_duration(s),
        };
        lifecycle.kill_grace = d
            .and_then(|d| {
                if d > Duration::from_secs(3600) {
                    Err("a grace period over 1h would let a cancelled job run on".into())
                } else {
                    Ok(d)
                }
            })
            .map_err(|m| err(Some(t.span()), "lifecycle.kill_grace", m))?;
    }
    if let Some(c) = &raw.lifecycle.log_cap {
        let bytes = match c.get_ref() {
            UnitValue::Int(n) if *n >= 0 => Ok(*n as u64),
            UnitValue::Int(n) => Err(format!("{n} is negative")),
            UnitValue::Text(t) => parse_size(t),
        };
        lifecycle.log_cap = bytes.map_err(|m| err(Some(c.span()), "lifecycle.log_cap", m))?;
    }

    let mut workspace = WorkspacePolicy::default();
    if let Some(m) = &raw.workspace.modes {
        use crate::workspace::WorkspaceMode;
        let mut modes = Vec::new();
        for name in m.get_ref() {
            let mode = match name.as_str() {
                "direct" => WorkspaceMode::Direct,
                "readonly" => WorkspaceMode::Readonly,
                "review" => WorkspaceMode::Review,
                other => {
                    return Err(err(
                        Some(m.span()),
                        "workspace.modes",
                        format!("expected \"direct\", \"readonly\" or \"review\", got \"{other}\""),
                    ));
                }
            };
            if !modes.contains(&mode) {
                modes.push(mode);
            }
        }
        workspace.modes = modes;
    }
    if let Some(c) = &raw.workspace.concurrent_review {
        workspace.clone_concurrent_review = match c.get_ref().as_str() {
            "refuse" => false,
            "clone" => true,
            other => {
                return Err(err(
                    Some(c.span()),
                    "workspace.concurrent_review",
                    format!("expected \"refuse\" or \"clone\", got \"{other}\""),
                ));
            }
        };
    }

    let id = |key: &str, v: &Option<Spanned<IdChoice>>| -> Result<Option<u32>, SpecError> {
        match v {
            None => Ok(None),
            Some(s) => match *s.get_ref() {
                IdChoice::Auto => Ok(None),
                IdChoice::Id(0) => Err(err(
                    Some(s.span()),
                    key,
                    "0 is root: a job never runs as host root; use \"auto\" or an unprivileged id"
                        .into(),
                )),
                IdChoice::Id(n) if (1..=u32::MAX as i64 - 1).contains(&n) => Ok(Some(n as u32)),
                IdChoice::Id(n) => Err(err(Some(s.span()), key, format!("{n} is not a valid id"))),
            },
        }
    };
    let uid = id("user.uid", &raw.user.uid)?;
    let gid = id("user.gid", &raw.user.gid)?;

    let mut env_pass = Vec::new();
    for v in &raw.env.pass {
        check_env_name(v.get_ref()).map_err(|m| err(Some(v.span()), "env.pass", m))?;
        env_pass.push(v.get_ref().clone());
    }
    let mut env_set = BTreeMap::new();
    for (k, v) in &raw.env.set {
        check_env_name(k).map_err(|m| err(Some(v.span()), &format!("env.set.{k}"), m))?;
        if v.get_ref().contains('\0') {
            return Err(err(
                Some(v.span()),
                &format!("env.set.{k}"),
                "value contains a NUL byte".into(),
            ));
        }
        env_set.insert(k.clone(), v.get_ref().clone());
    }

    let hostname = match &raw.sandbox.hostname {
        Some(h) => {
            let v = h.get_ref();
            let ok = !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !ok {
                return Err(err(
                    Some(h.span()),
                    "sandbox.hostname",
                    format!("\"{v}\" is not a hostname (1-64 letters, digits, '-', '.')"),
                ));
            }
            v.clone()
        }
        None => "agentd".into(),
    };
    let landlock_abi = match &raw.sandbox.landlock_abi {
        Some(a) if (1..=64).contains(a.get_ref()) => *a.get_ref() as u32,
        Some(a) => {
            return Err(err(
                Some(a.span()),
                "sandbox.landlock_abi",
                format!("{} is not a Landlock ABI version (1 or more)", a.get_ref()),
            ));
        }
        None => 1,
    };

    let quotas = raw
        .quotas
        .parse()
        .map_err(|(span, key, m)| err(Some(span), key, m))?;

    let sched = raw
        .sched
        .parse()
        .map_err(|(span, key, m)| err(Some(span), key, m))?;

    let regions = raw
        .regions
        .parse()
        .map_err(|(span, key, m)| err(Some(span), key, m))?;

    Ok(Policy {
        name,
        source: origin.to_owned(),
        sha256: hex(&Sha256::digest(text.as_bytes())),
        description: raw.description.unwrap_or_default(),
        identity: Identity {
            agent: raw.identity.agent.unwrap_or_else(|| "unknown".into()),
            model: raw.identity.model.unwrap_or_else(|| "unknown".into()),
        },
        uid,
        gid,
        filesystem: grants.into_values().collect(),
        tcp_bind,
        tcp_connect,
        egress,
        limits,
        env_pass,
        env_set,
        hostname,
        landlock_abi,
        lifecycle,
        workspace,
        quotas,
        sched,
        regions,
    })
}

/// Turns a toml error into (key, message) without the multi-line source excerpt.
fn describe_toml_error(e: &toml::de::Error) -> (String, String) {
    let message = e.message().trim().to_owned();
    let key = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field") || message.starts_with("missing field"))
        .unwrap_or("syntax")
        .to_owned();
    (key, message)
}

/// Filesystem grants must be absolute, normalized, and not a place agentd builds itself.
fn validate_grant_path(p: &str) -> Result<PathBuf, String> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(format!("\"{p}\" is relative; grants need absolute paths"));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!(
            "\"{p}\" contains '.' or '..'; write the normalized path"
        ));
    }
    let path: PathBuf = path.components().collect();
    if path == Path::new("/") {
        return Err("\"/\" grants the whole host; list the directories the job needs".into());
    }
    for own in ["/proc", "/dev", "/tmp"] {
        if path.starts_with(own) {
            return Err(format!(
                "\"{p}\" is inside {own}, which agentd creates fresh for every job"
            ));
        }
    }
    Ok(path)
}

fn check_env_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!("\"{name}\" is not an environment variable name"))
    }
}

/// CPUs must be positive and no more than the host has.
pub fn check_cpu(cpu: f64) -> Result<f64, String> {
    let online = crate::host::online_cpus();
    if !cpu.is_finite() || cpu < 0.01 {
        return Err(format!("{cpu} CPUs is not a usable limit (at least 0.01)"));
    }
    if cpu > online as f64 {
        return Err(format!("{cpu} CPUs exceeds the {online} CPUs of this host"));
    }
    Ok(cpu)
}

/// Memory below 4 MiB cannot even start a shell; above physical memory is no limit.
pub fn check_memory(bytes: u64) -> Result<u64, String> {
    if bytes < 4 << 20 {
        return Err(format!(
            "{bytes} bytes is too little memory for any job (at least 4M)"
        ));
    }
    Ok(bytes)
}

/// The job needs its init and its command: two tasks at least.
pub fn check_pids(n: i64) -> Result<u64, String> {
    if n < 2 {
        return Err(format!(
            "{n} pids is too few (the job's init and its command need 2)"
        ));
    }
    Ok(n as u64)
}

pub fn check_timeout(d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        return Err("a timeout of 0 would kill the job before it starts".into());
    }
    Ok(d)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, SpecError> {
        parse_policy(text, "t.toml", "t")
    }

    #[test]
    fn builtin_policies_parse() {
        for (name, text) in BUILTIN_POLICIES {
            let p = parse_policy(text, name, name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&p.name, name);
        }
    }

    #[test]
    fn quotas_parse_and_bad_ones_name_line_and_key() {
        let p = parse("[quotas]\ntool_calls = 5\ncontext_bytes = \"2M\"\n").unwrap();
        assert_eq!(p.quotas.tool_calls.objects, Some(5));
        assert_eq!(p.quotas.tool_calls.bytes, Some(16 << 20), "the default");
        assert_eq!(p.quotas.context.bytes, Some(2 << 20));
        assert_eq!(parse("").unwrap().quotas, quotas::Quotas::default());
        for (text, key, line) in [
            ("[quotas]\ntool_calls = 0\n", "quotas.tool_calls", 2),
            (
                "[quotas]\n\ncontext_bytes = \"2T\"\n",
                "quotas.context_bytes",
                3,
            ),
            (
                "[quotas]\ncontext_segments = -1\n",
                "quotas.context_segments",
                2,
            ),
            (
                "[quotas]\ntool_call_bytes = \"lots\"\n",
                "quotas.tool_call_bytes",
                2,
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!((e.key.as_str(), e.line), (key, Some(line)), "{e}");
        }
        let e = parse("[quotas]\nregions = 3\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn region_grants_parse_match_and_bad_ones_name_line_and_key() {
        let p = parse("[regions]\nallow = [\"ctx-*:rw\", \"index\", \"big:ro\"]\n").unwrap();
        assert_eq!(p.regions.len(), 3);
        use regions::granting;
        assert_eq!(
            granting(&p.regions, "ctx-1", true).unwrap().rule,
            "regions.allow[0]"
        );
        assert_eq!(
            granting(&p.regions, "index", false).unwrap().rule,
            "regions.allow[1]"
        );
        assert!(
            granting(&p.regions, "index", true).is_none(),
            "read-only grant"
        );
        assert!(granting(&p.regions, "indexes", false).is_none());
        assert!(granting(&p.regions, "other", false).is_none());
        assert!(parse("").unwrap().regions.is_empty(), "nothing by default");
        for text in [
            "[regions]\nallow = [\"a:wr\"]\n",
            "[regions]\nallow = [\"../x\"]\n",
            "[regions]\nallow = [\"a*b\"]\n",
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!((e.key.as_str(), e.line), ("regions.allow", Some(2)), "{e}");
        }
        let e = parse("[regions]\ngrant = []\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn sched_sections_and_requests_are_checked_with_the_rule() {
        use crate::sched::{ClassKind, SchedParams};
        use sched::{SchedRequest, resolve};
        let p = parse(
            "[sched]\nclasses = [\"fair\", \"deadline\"]\nruntime = \"2ms\"\ndeadline = \"10ms\"\n",
        )
        .unwrap();
        assert_eq!(p.sched.classes, [ClassKind::Fair, ClassKind::Deadline]);
        let dl = resolve(
            &p.sched,
            "p",
            &SchedRequest {
                class: Some("deadline".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            dl,
            SchedParams::Deadline {
                runtime: 2_000_000,
                deadline: 10_000_000,
                period: 10_000_000
            }
        );
        let e = resolve(
            &p.sched,
            "p",
            &SchedRequest {
                class: Some("rt".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(
            e,
            "--class rt: policy p grants fair, deadline (sched.classes)"
        );
        let e = resolve(
            &p.sched,
            "p",
            &SchedRequest {
                weight: Some(4096),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(
            e,
            "--weight 4096: policy p allows at most 1024 (sched.max_weight)"
        );
        let e = resolve(
            &p.sched,
            "p",
            &SchedRequest {
                class: Some("deadline".into()),
                runtime: Some("20ms".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            e.starts_with("--runtime: 20 ms is longer than the deadline 10 ms"),
            "{e}"
        );
        let e = resolve(
            &p.sched,
            "p",
            &SchedRequest {
                slice: Some("1ms".into()),
                class: Some("deadline".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(
            e,
            "--slice is for the fair class, and this job's class is deadline"
        );
        for (text, key, line) in [
            ("[sched]\nclass = \"batch\"\n", "sched.class", 2),
            ("[sched]\nclass = \"deadline\"\n", "sched.class", 2),
            ("[sched]\n\nslice = \"500ms\"\n", "sched.slice", 3),
            ("[sched]\nweight = 0\n", "sched.weight", 2),
            ("[sched]\nnice = 30\n", "sched.nice", 2),
            (
                "[sched]\nruntime = \"5ms\"\ndeadline = \"1ms\"\n",
                "sched.runtime",
                2,
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!((e.key.as_str(), e.line), (key, Some(line)), "{e}");
        }
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse("[limits]\ncpu = 1\nmemroy = \"1G\"\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(e.key, "memroy");
    }

    #[test]
    fn wrong_type_names_line() {
        let e = parse("\n[limits]\npids = \"many\"\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn relative_and_missing_paths() {
        let e = parse("[filesystem]\nread = [\"usr\"]\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (Some(2), "filesystem.read"));
        assert!(e.message.contains("relative"));
        let e = parse("[filesystem]\nexec = [\n\"/usr\",\n\"/no/such/dir\"]\n").unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("does not exist"));
        let p =
            parse("[filesystem]\nread = [{ path = \"/no/such\", optional = true }, \"/usr\"]\n")
                .unwrap();
        assert_eq!(p.filesystem.len(), 1);
    }

    #[test]
    fn merged_grants_take_widest_access() {
        let p = parse("[filesystem]\nread = [\"/usr\"]\nwrite = [\"/usr\"]\n").unwrap();
        assert_eq!(p.filesystem[0].access, Access::Write);
        assert_eq!(p.filesystem[0].rule, "t:filesystem.write[0]");
    }

    #[test]
    fn impossible_limits() {
        assert!(
            parse("[limits]\ncpu = 0\n")
                .unwrap_err()
                .message
                .contains("not a usable")
        );
        assert!(
            parse("[limits]\ncpu = 100000\n")
                .unwrap_err()
                .message
                .contains("exceeds")
        );
        assert!(
            parse("[limits]\nmemory = \"1K\"\n")
                .unwrap_err()
                .message
                .contains("too little")
        );
        assert!(
            parse("[limits]\npids = 1\n")
                .unwrap_err()
                .message
                .contains("too few")
        );
        assert!(
            parse("[limits]\ntimeout = \"0s\"\n")
                .unwrap_err()
                .message
                .contains("timeout of 0")
        );
        assert!(
            parse("[user]\nuid = 0\n")
                .unwrap_err()
                .message
                .contains("root")
        );
    }

    /// Bad input is an error, never a panic: mutate the shipped policies byte by byte
    /// (deterministic xorshift, so a failure reproduces) and parse each variant.
    #[test]
    fn mutated_policies_never_panic() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = "[]{}=\"',.#\n 0123456789abcdefghijklmnopqrstuvwxyz/_-\\é→".as_bytes();
        for (name, text) in BUILTIN_POLICIES {
            for _ in 0..400 {
                let mut bytes = text.as_bytes().to_vec();
                for _ in 0..(1 + next() % 8) {
                    let at = (next() % bytes.len() as u64) as usize;
                    match next() % 3 {
                        0 => bytes[at] = alphabet[(next() % alphabet.len() as u64) as usize],
                        1 => {
                            bytes.remove(at);
                        }
                        _ => bytes.insert(at, alphabet[(next() % alphabet.len() as u64) as usize]),
                    }
                }
                if let Ok(text) = std::str::from_utf8(&bytes)
                    && let Err(e) = parse_policy(text, name, name)
                {
                    assert!(!e.message.is_empty() && !e.key.is_empty(), "{e}");
                }
            }
        }
    }
}
