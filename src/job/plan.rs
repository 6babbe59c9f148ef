//! Validate: turn a policy, the command line's overrides and the host's features into a
//! complete plan, or refuse. Nothing is created here.

use crate::Error;
use crate::cgroup::{self, CgroupLimits, HostCgroups};
use crate::net::{DomainRule, EgressPolicy, NetMode};
use crate::sandbox::{LandlockPlan, SandboxPlan, seccomp};
use crate::spec::{self, Policy, SpecError};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `nobody`: the job's host user when the workspace belongs to root or there is none.
pub const NOBODY: u32 = 65534;

/// Features a job may run without, if and only if `--allow-degraded` names them.
pub const DEGRADABLE: &[&str] = &["landlock", "cgroup-cpu", "cgroup-memory", "cgroup-pids"];

/// What the command line asks for.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunOptions {
    pub policy: String,
    pub policy_dir: PathBuf,
    pub workspace: Option<PathBuf>,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub pids: Option<String>,
    pub timeout: Option<String>,
    pub env: Vec<String>,
    pub agent: Option<String>,
    pub model: Option<String>,
    pub report: Option<PathBuf>,
    pub allow_degraded: Vec<String>,
    pub runtime_dir: PathBuf,
    pub cgroup_parent: Option<String>,
    pub command: Vec<String>,
    /// An inline policy (the daemon's API), used instead of looking `policy` up.
    pub policy_text: Option<String>,
    /// How the workspace is given to the job (direct, read-only, or a review overlay,
    /// which only the daemon offers).
    #[serde(default)]
    pub workspace_mode: crate::workspace::WorkspaceMode,
    /// A host directory holding the job's socket to the daemon (`agentd.sock`), shown
    /// to the job read-only at /run/agentd (the daemon's jobs only).
    #[serde(default)]
    pub job_socket_dir: Option<PathBuf>,
    /// `--net none|proxy|host`: overrides the policy's network.mode.
    #[serde(default)]
    pub net: Option<String>,
    /// `--allow-domain PATTERN[:PORT]`: added to the policy's network.allow_domains.
    #[serde(default)]
    pub allow_domain: Vec<String>,
    /// `--allow-private`: private, loopback and link-local destinations too.
    #[serde(default)]
    pub allow_private: bool,
    /// `--class`, `--weight`, `--slice`, `--runtime`, `--deadline`, `--period`,
    /// `--priority`: changes to the policy's `[sched]`, within its bounds.
    #[serde(default)]
    pub sched: spec::sched::SchedRequest,
}

/// Where a daemon job finds its socket to the daemon.
pub const JOB_SOCKET_DIR: &str = "/run/agentd";

/// The ids the job runs under.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct JobIds {
    /// The unprivileged host user the job is.
    pub host_uid: u32,
    pub host_gid: u32,
    /// The same user as the job sees itself (inside its user namespace).
    pub uid: u32,
    pub gid: u32,
    /// Whether the workspace is mounted idmapped, so the job owns it.
    pub workspace_idmapped: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Degradation {
    pub feature: String,
    pub reason: String,
}

/// A validated job, ready to allocate.
pub struct JobPlan {
    pub policy: Policy,
    pub options: RunOptions,
    pub workspace: Option<PathBuf>,
    pub ids: JobIds,
    pub limits: spec::Limits,
    pub host_cgroups: HostCgroups,
    pub skip_controllers: Vec<&'static str>,
    pub landlock_abi: u32,
    pub landlock_dropped: Vec<String>,
    pub degraded: Vec<Degradation>,
    /// The job's network grant: the policy's, with the command line's changes.
    pub egress: EgressPolicy,
    pub sandbox: SandboxPlan,
    /// Where a review workspace's layers go (set by the daemon before allocate).
    pub review_layers: Option<crate::workspace::ReviewLayers>,
    /// The job's scheduling class and parameters, and what they write to its cgroup.
    pub sched: crate::sched::SchedParams,
    pub sched_cgroup: crate::sched::kernel::CgroupSched,
    /// A fair job's own slice for the kernel: Ok(ns) to apply, Err(why not) to record;
    /// None when the job asked for none.
    pub kernel_slice: Option<Result<u64, String>>,
}

impl JobPlan {
    /// The job's cgroup limits: its own, and its class's share of the CPU controller.
    pub fn cgroup_limits(&self) -> CgroupLimits {
        CgroupLimits {
            cpu: self.limits.cpu,
            memory: self.limits.memory,
            pids: self.limits.pids,
            sched: self.sched_cgroup,
        }
    }
}

impl JobPlan {
    /// The TCP ports Landlock lets the job connect to; None when connecting is not
    /// restricted (`host` mode without network.tcp_connect). In `proxy` mode the proxy's
    /// two TCP endpoints are the job's only way out.
    pub fn landlock_tcp_connect(&self) -> Option<Vec<u16>> {
        let mut ports = self.policy.tcp_connect.clone();
        match self.egress.mode {
            NetMode::Host if ports.is_empty() => return None,
            NetMode::Proxy => ports.extend([crate::net::HTTP_PORT, crate::net::SOCKS_PORT]),
            _ => {}
        }
        Some(ports)
    }
}

fn flag_err(flag: &str, message: impl Into<String>) -> Error {
    Error::Spec(SpecError {
        origin: "command line".into(),
        line: None,
        key: flag.into(),
        message: message.into(),
    })
}

pub fn validate(options: RunOptions) -> Result<JobPlan, Error> {
    if options.command.is_empty() {
        return Err(Error::Usage(
            "no command given: agentd run [OPTIONS] -- COMMAND [ARGS...]".into(),
        ));
    }
    check_command(&options.command)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Usage("agentd run needs root: it creates the job's cgroup, namespaces and idmapped mounts itself (the job never runs as root); run it with sudo".into()));
    }
    for feature in &options.allow_degraded {
        if !DEGRADABLE.contains(&feature.as_str()) {
            return Err(flag_err(
                "--allow-degraded",
                format!(
                    "unknown feature \"{feature}\" (one of: {})",
                    DEGRADABLE.join(", ")
                ),
            ));
        }
    }
    let mut policy = match &options.policy_text {
        Some(text) => spec::parse_policy(text, "inline policy", "inline")?,
        None => spec::load_policy(&options.policy, &options.policy_dir)?,
    };
    if let Some(a) = &options.agent {
        policy.identity.agent = a.clone();
    }
    if let Some(m) = &options.model {
        policy.identity.model = m.clone();
    }

    // Command-line limits override the policy's, with the same checks.
    let mut limits = policy.limits.clone();
    if let Some(v) = &options.cpu {
        let cpu: f64 = v.parse().map_err(|_| {
            flag_err(
                "--cpu",
                format!("expected a number of CPUs like 0.5 or 2, got \"{v}\""),
            )
        })?;
        limits.cpu = Some(spec::check_cpu(cpu).map_err(|m| flag_err("--cpu", m))?);
    }
    if let Some(v) = &options.memory {
        limits.memory = Some(
            spec::parse_size(v)
                .and_then(spec::check_memory)
                .map_err(|m| flag_err("--memory", m))?,
        );
    }
    if let Some(v) = &options.pids {
        let n: i64 = v.parse().map_err(|_| {
            flag_err(
                "--pids",
                format!("expected a number of processes, got \"{v}\""),
            )
        })?;
        limits.pids = Some(spec::check_pids(n).map_err(|m| flag_err("--pids", m))?);
    }
    if let Some(v) = &options.timeout {
        limits.timeout = Some(
            spec::parse_duration(v)
                .and_then(spec::check_timeout)
                .map_err(|m| flag_err("--timeout", m))?,
        );
    }

    let workspace = match &options.workspace {
        None => None,
        Some(w) => Some(validate_workspace(w)?),
    };
    if let Some(report) = &options.report {
        let parent = report
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(flag_err(
                "--report",
                format!(
                    "{} is not a directory, so the report could not be written",
                    parent.display()
                ),
            ));
        }
    }
    let ids = resolve_ids(&policy, workspace.as_deref())?;
    check_workspace_mode(&policy, &options, workspace.as_deref(), &ids)?;
    let egress = merge_egress(&policy, &options)?;
    let env = build_env(&policy, &options, workspace.as_deref(), &egress)?;

    // Fail closed: what the policy needs and the kernel lacks is refused, unless the
    // command line asked for exactly that downgrade.
    let allowed = |f: &str| options.allow_degraded.iter().any(|a| a == f);
    let mut degraded = Vec::new();
    let landlock_abi = crate::host::landlock_abi();
    if landlock_abi < policy.landlock_abi {
        let reason = if landlock_abi == 0 {
            format!(
                "policy {} needs Landlock ABI {} and this kernel has no Landlock",
                policy.name, policy.landlock_abi
            )
        } else {
            format!(
                "policy {} needs Landlock ABI {} and this kernel offers ABI {landlock_abi}",
                policy.name, policy.landlock_abi
            )
        };
        if !allowed("landlock") {
            return Err(Error::Refused {
                feature: "landlock".into(),
                reason,
            });
        }
        degraded.push(Degradation {
            feature: "landlock".into(),
            reason,
        });
    }
    if !crate::host::seccomp_filter_available() {
        // seccomp is never optional, so no --allow-degraded is suggested.
        return Err(Error::Usage("refused: this kernel cannot install seccomp filters (CONFIG_SECCOMP_FILTER); agentd never runs a job without seccomp".into()));
    }

    let host_cgroups = HostCgroups::detect_cached()
        .map_err(|e| Error::Usage(format!("cannot find the host's cgroups: {e}")))?;
    // The scheduling class: the policy's, with the request's changes.
    let sched = spec::sched::resolve(&policy.sched, &policy.name, &options.sched).map_err(|m| {
        let flag = m
            .split(':')
            .next()
            .unwrap_or("--class")
            .split(' ')
            .next()
            .unwrap_or("--class");
        flag_err(flag, m.clone())
    })?;
    let kernel_deadline =
        spec::sched::kernel_deadline(&policy.sched, &policy.name, &options.sched, &sched)
            .map_err(|m| flag_err("--kernel-deadline", m))?;
    let sched_cgroup = crate::sched::kernel::CgroupSched::of(&sched, policy.sched.rt_cpus);
    // A fair job that asked for its own slice (or whose policy did) gets it from the
    // kernel too, where the kernel honours one; elsewhere that is recorded, not fatal
    // (a slice is a latency wish, not a protection).
    let asked_slice = match sched {
        crate::sched::SchedParams::Fair { slice, .. }
            if options.sched.slice.is_some()
                || policy.sched.slice_ns != crate::sched::fair::DEFAULT_SLICE =>
        {
            Some(slice)
        }
        _ => None,
    };
    let kernel_slice = asked_slice.map(|slice| {
        crate::sched::attr::eevdf_slice_supported()
            .map(|()| slice)
            .map_err(|why| format!("unsupported: {why}"))
    });
    let cg_limits = CgroupLimits {
        cpu: limits.cpu,
        memory: limits.memory,
        pids: limits.pids,
        sched: sched_cgroup,
    };
    let usable = cgroup::usable_controllers(&host_cgroups, options.cgroup_parent.as_deref());
    let mut skip_controllers = Vec::new();
    for controller in cgroup::required_controllers(&cg_limits) {
        if usable.iter().any(|u| u == controller) {
            continue;
        }
        let feature = format!("cgroup-{controller}");
        let reason = format!(
            "the {controller} controller is not available where agentd creates job cgroups, so the {controller} limit cannot be enforced"
        );
        if !allowed(&feature) {
            return Err(Error::Refused { feature, reason });
        }
        degraded.push(Degradation { feature, reason });
        skip_controllers.push(controller);
    }

    let mut sandbox = build_sandbox_plan(
        &policy,
        &options,
        workspace.as_deref(),
        &ids,
        env,
        &limits,
        landlock_abi,
        !allowed("landlock"),
        &egress,
    )?;
    sandbox.eevdf_slice = kernel_slice.as_ref().and_then(|k| k.as_ref().ok().copied());
    sandbox.kernel_deadline = kernel_deadline;
    Ok(JobPlan {
        landlock_dropped: super::landlock::rights_dropped(landlock_abi),
        policy,
        options,
        workspace,
        ids,
        limits,
        host_cgroups,
        skip_controllers,
        landlock_abi,
        degraded,
        egress,
        sandbox,
        review_layers: None,
        sched,
        sched_cgroup,
        kernel_slice,
    })
}

fn validate_workspace(w: &Path) -> Result<PathBuf, Error> {
    let shown = w.display();
    let path = std::fs::canonicalize(w)
        .map_err(|e| flag_err("--workspace", format!("{shown}: {}", describe_io(&e))))?;
    if !path.is_dir() {
        return Err(flag_err(
            "--workspace",
            format!("{shown} is not a directory"),
        ));
    }
    if path == Path::new("/")
        || ["/proc", "/dev", "/sys"]
            .iter()
            .any(|p| path.starts_with(p))
    {
        return Err(flag_err(
            "--workspace",
            format!(
                "{} cannot be a workspace (the host's root or a kernel filesystem)",
                path.display()
            ),
        ));
    }
    Ok(path)
}

/// A read-only or review workspace needs a workspace; a review overlay cannot be
/// idmapped (overlayfs does not allow it), so the job must run as the directory's owner.
fn check_workspace_mode(
    policy: &Policy,
    options: &RunOptions,
    workspace: Option<&Path>,
    ids: &JobIds,
) -> Result<(), Error> {
    use crate::workspace::WorkspaceMode;
    if workspace.is_some() && !policy.workspace.modes.contains(&options.workspace_mode) {
        return Err(flag_err(
            "--workspace",
            format!(
                "policy {} does not grant {} workspaces (workspace.modes: {})",
                policy.name,
                options.workspace_mode.name(),
                policy
                    .workspace
                    .modes
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    match (options.workspace_mode, workspace) {
        (WorkspaceMode::Direct, _) => Ok(()),
        (mode, None) => Err(flag_err(
            "--workspace",
            format!("a {} workspace needs a directory", mode.name()),
        )),
        (WorkspaceMode::Review, Some(ws)) if ids.workspace_idmapped => Err(flag_err(
            "--workspace",
            format!(
                "{} belongs to uid {} but the job would run as uid {}: a review workspace is an overlay, which cannot be idmapped, so the job must run as the directory's owner (make a non-root user own it, or set user.uid in the policy to its owner)",
                ws.display(),
                ids.uid,
                ids.host_uid
            ),
        )),
        _ => Ok(()),
    }
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such directory".into(),
        _ => e.to_string(),
    }
}

/// The job's host user: the policy's choice, else the workspace's owner, else nobody.
/// Never root. Inside its namespace the job has the workspace owner's ids, so the
/// workspace is its own; when those differ from the host user, the workspace is idmapped.
fn resolve_ids(policy: &Policy, workspace: Option<&Path>) -> Result<JobIds, Error> {
    let owner = match workspace {
        Some(ws) => {
            let m = std::fs::metadata(ws)
                .map_err(|e| flag_err("--workspace", format!("{}: {e}", ws.display())))?;
            Some((m.uid(), m.gid()))
        }
        None => None,
    };
    let host_uid = policy.uid.unwrap_or(match owner {
        Some((uid, _)) if uid != 0 => uid,
        _ => NOBODY,
    });
    let host_gid = policy.gid.unwrap_or(match owner {
        Some((_, gid)) if gid != 0 => gid,
        _ => NOBODY,
    });
    let (uid, gid) = owner.unwrap_or((host_uid, host_gid));
    Ok(JobIds {
        host_uid,
        host_gid,
        uid,
        gid,
        workspace_idmapped: owner.is_some_and(|o| o != (host_uid, host_gid)),
    })
}

/// The policy's network grant with the command line's changes: `--net` replaces the
/// mode, `--allow-domain` adds patterns, `--allow-private` adds private destinations.
/// Domains and private destinations mean something only through the proxy.
fn merge_egress(policy: &Policy, options: &RunOptions) -> Result<EgressPolicy, Error> {
    let mut egress = policy.egress.clone();
    if let Some(m) = &options.net {
        egress.mode = NetMode::parse(m).ok_or_else(|| {
            flag_err(
                "--net",
                format!("expected none, proxy or host, got \"{m}\""),
            )
        })?;
    }
    for pattern in &options.allow_domain {
        let pattern = crate::net::rules::validate_pattern(pattern)
            .map_err(|m| flag_err("--allow-domain", m))?;
        egress.allow.push(DomainRule {
            pattern,
            rule: "command line: --allow-domain".into(),
        });
    }
    egress.allow_private |= options.allow_private;
    if egress.mode != NetMode::Proxy {
        let needs_proxy = |flag: &str| {
            flag_err(
                flag,
                format!(
                    "destinations are allowed through agentd's proxy, and the job's network mode is {} (policy {}{}); add --net proxy",
                    egress.mode.name(),
                    policy.name,
                    if options.net.is_some() { ", --net" } else { "" }
                ),
            )
        };
        if !options.allow_domain.is_empty() {
            return Err(needs_proxy("--allow-domain"));
        }
        if options.allow_private {
            return Err(needs_proxy("--allow-private"));
        }
    }
    Ok(egress)
}

fn build_env(
    policy: &Policy,
    options: &RunOptions,
    workspace: Option<&Path>,
    egress: &EgressPolicy,
) -> Result<BTreeMap<String, String>, Error> {
    let mut env = BTreeMap::new();
    for name in &policy.env_pass {
        if let Ok(v) = std::env::var(name) {
            env.insert(name.clone(), v);
        }
    }
    env.extend(policy.env_set.clone());
    env.entry("HOME".into())
        .or_insert_with(|| workspace.map_or("/tmp".into(), |w| w.display().to_string()));
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
    if egress.mode == NetMode::Proxy {
        // Tools find the proxy by these; a host's own proxy settings would lead nowhere
        // from the job's namespace, so these replace them. (--env still overrides.)
        let has_git_config = env.contains_key("GIT_CONFIG_COUNT");
        for (k, v) in crate::net::proxy_env() {
            if k.starts_with("GIT_CONFIG_") && has_git_config {
                continue;
            }
            env.insert(k.to_owned(), v);
        }
    }
    if options.job_socket_dir.is_some() {
        // The job's own socket to the daemon (its tool calls, its own state).
        env.insert(
            "AGENTD_SOCKET".into(),
            format!("{JOB_SOCKET_DIR}/agentd.sock"),
        );
    }
    for item in &options.env {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
            None => (item.clone(), std::env::var(item).ok()),
        };
        let valid = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || v.as_deref().is_some_and(|v| v.contains('\0')) {
            return Err(flag_err(
                "--env",
                format!("\"{item}\" is not KEY=VALUE or the name of a variable to pass"),
            ));
        }
        if let Some(v) = v {
            env.insert(k, v);
        }
    }
    Ok(env)
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, Error> {
    CString::new(bytes).map_err(|_| Error::Usage(format!("{what} contains a NUL byte")))
}

#[allow(clippy::too_many_arguments)]
fn build_sandbox_plan(
    policy: &Policy,
    options: &RunOptions,
    workspace: Option<&Path>,
    ids: &JobIds,
    env: BTreeMap<String, String>,
    limits: &spec::Limits,
    landlock_abi: u32,
    landlock_required: bool,
    egress: &EgressPolicy,
) -> Result<SandboxPlan, Error> {
    let host_resolv = Path::new("/etc/resolv.conf");
    let resolv_conf = match egress.mode {
        NetMode::Proxy => Some(resolv_conf_path(&options.runtime_dir)),
        NetMode::Host if host_resolv.exists() => Some(host_resolv.to_path_buf()),
        _ => None,
    };
    let mount_ops = super::rootfs::mount_ops(
        &policy.filesystem,
        workspace,
        limits.memory,
        options.job_socket_dir.as_deref(),
        resolv_conf.as_deref(),
    )
    .map_err(|e| Error::Usage(format!("cannot prepare the job's root: {e}")))?;
    let path_c = |p: &Path| cstring(p.as_os_str().as_bytes(), "a path");
    let envp = env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes(), "the environment"))
        .collect::<Result<_, _>>()?;
    let argv: Vec<CString> = options
        .command
        .iter()
        .map(|a| cstring(a.as_bytes(), "the command"))
        .collect::<Result<_, _>>()?;
    // Like execvp: a name with '/' is used as is; otherwise each directory of the job's
    // PATH (absolute ones only) is tried in order.
    let command = options.command[0].as_bytes();
    let exec_candidates = if command.contains(&b'/') {
        vec![argv[0].clone()]
    } else {
        env.get("PATH")
            .map(|p| {
                p.split(':')
                    .filter(|d| d.starts_with('/'))
                    .map(|d| {
                        cstring(format!("{d}/").as_bytes(), "PATH").map(|dir| {
                            let mut bytes = dir.into_bytes();
                            bytes.extend_from_slice(command);
                            CString::new(bytes).expect("checked above")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default()
    };
    Ok(SandboxPlan {
        root: CString::default(), // set by the allocate step
        root_options: cstring(
            format!("mode=0755,uid={},gid={}", ids.uid, ids.gid).as_bytes(),
            "options",
        )?,
        mount_ops,
        workspace_tree: None,
        hostname: cstring(policy.hostname.as_bytes(), "the hostname")?,
        uid: ids.uid,
        gid: ids.gid,
        cwd: path_c(workspace.unwrap_or(Path::new("/tmp")))?,
        landlock: LandlockPlan {
            ruleset: None,
            child_rules: super::landlock::child_rules(landlock_abi),
            required: landlock_required,
        },
        seccomp: seccomp::build(),
        argv,
        envp,
        exec_candidates,
        net_mode: egress.mode,
        die_with_parent: true,
        output: None,
        nofile: None,
        fault: None,
        eevdf_slice: None,
        kernel_deadline: None,
    })
}

/// The resolver configuration `proxy` jobs see as /etc/resolv.conf, shared by all of
/// them (written by the allocate step; readable by every job user, since the job's
/// setup binds it as that user).
pub fn resolv_conf_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("resolv.conf")
}

/// Rejects arguments with NUL bytes before anything is created.
pub fn check_command(command: &[String]) -> Result<(), Error> {
    for a in command {
        cstring(a.as_bytes(), "the command")?;
    }
    if command.first().is_some_and(|c| c.is_empty()) {
        return Err(Error::Usage("the command is an empty string".into()));
    }
    Ok(())
}
