//! The job's JSON report: what ran, how it ended, what it used, what was enforced.

use super::plan::{Degradation, JobIds, JobPlan};
use super::supervise::Outcome;
use crate::cgroup::Usage;
use crate::sandbox::handshake::ChildMessage;
use crate::sandbox::{SandboxPlan, Step};
use serde::Serialize;
use std::collections::BTreeMap;

/// How the job ended, from agentd's point of view.
#[derive(Debug, Clone, PartialEq)]
pub enum JobExit {
    Exited(i32),
    Signaled(i32),
    SetupFailed { step: String, errno: i32 },
    ExecFailed { command: String, errno: i32 },
}

impl JobExit {
    /// How the job ended; a failed setup step is put in words from the `plan`.
    pub fn from_outcome(o: &Outcome, plan: &SandboxPlan) -> JobExit {
        Self::from_messages(&o.messages, o.si_code, o.si_status, &|s, i| {
            plan.describe(s, i)
        })
    }

    /// How the job ended from what its child side reported, else from init's own wait
    /// status; `describe` puts a failed setup step in words.
    pub fn from_messages(
        messages: &[ChildMessage],
        si_code: i32,
        si_status: i32,
        describe: &dyn Fn(Step, usize) -> String,
    ) -> JobExit {
        // The first message is the decisive one: a failure ends the child's account.
        if let Some(m) = messages.first() {
            match m {
                ChildMessage::SetupFailed { step, index, errno } => {
                    let step = match Step::from_code(*step) {
                        Some(s) => describe(s, *index as usize),
                        None => format!("setup step {step}"),
                    };
                    return JobExit::SetupFailed {
                        step,
                        errno: *errno,
                    };
                }
                ChildMessage::ExecFailed { command, errno } => {
                    return JobExit::ExecFailed {
                        command: command.clone(),
                        errno: *errno,
                    };
                }
                ChildMessage::Exited { wait_status } => {
                    let ws = *wait_status;
                    return if libc::WIFSIGNALED(ws) {
                        JobExit::Signaled(libc::WTERMSIG(ws))
                    } else {
                        JobExit::Exited(libc::WEXITSTATUS(ws))
                    };
                }
            }
        }
        // Init ended without a word: it was killed (timeout's SIGKILL, OOM) or failed
        // before it could say why.
        match si_code {
            libc::CLD_EXITED => JobExit::Exited(si_status),
            _ => JobExit::Signaled(si_status),
        }
    }

    /// agentd's exit status: the job's own, 128+N for signal N, 125 setup, 126/127 exec.
    pub fn code(&self) -> i32 {
        match self {
            JobExit::Exited(c) => *c,
            JobExit::Signaled(s) => 128 + s,
            JobExit::SetupFailed { .. } => 125,
            JobExit::ExecFailed { errno, .. } => {
                if *errno == libc::ENOENT {
                    127
                } else {
                    126
                }
            }
        }
    }

    /// A one-line explanation for statuses 125-127.
    pub fn message(&self) -> Option<String> {
        match self {
            JobExit::SetupFailed { step, errno: 0 } => {
                Some(format!("sandbox setup failed: {step}"))
            }
            JobExit::SetupFailed { step, errno } => Some(format!(
                "sandbox setup failed: {step}: {}",
                std::io::Error::from_raw_os_error(*errno)
            )),
            JobExit::ExecFailed { command, errno } if *errno == libc::ENOENT => {
                Some(format!("command not found: {command}"))
            }
            JobExit::ExecFailed { command, errno } => Some(format!(
                "cannot execute {command}: {}",
                std::io::Error::from_raw_os_error(*errno)
            )),
            _ => None,
        }
    }
}

#[derive(Serialize)]
pub struct PolicyRef {
    pub name: String,
    pub source: String,
    pub sha256: String,
}

#[derive(Serialize)]
pub struct ExitReport {
    pub status: i32,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct CgroupReport {
    pub version: String,
    pub dirs: Vec<String>,
    pub limits_applied: BTreeMap<String, String>,
    /// How the job's init got into its cgroup, before it ran any job code:
    /// "clone_into_cgroup" (born there by clone3, cgroup v2), "attach" (moved in by
    /// the supervisor while it waited, legacy v1), or "clone_into_cgroup+attach"
    /// (hybrid: born in the v2 cgroup, moved into the v1 controllers' cgroups).
    pub entry: &'static str,
}

impl CgroupReport {
    pub fn of(cgroup: &dyn crate::cgroup::JobCgroup) -> Self {
        let born = cgroup.clone_into_fd().is_some();
        let entry = match (born, cgroup.version()) {
            (true, "v2") => "clone_into_cgroup",
            (true, _) => "clone_into_cgroup+attach",
            (false, _) => "attach",
        };
        CgroupReport {
            version: cgroup.version().into(),
            dirs: cgroup
                .dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect(),
            limits_applied: cgroup.applied().into_iter().collect(),
            entry,
        }
    }
}

#[derive(Serialize)]
pub struct LandlockReport {
    /// The kernel's ABI, which is what was enforced.
    pub abi: u32,
    pub policy_min_abi: u32,
    pub rights_dropped_best_effort: Vec<String>,
    pub path_rules: usize,
    pub tcp_bind: Vec<u16>,
    pub tcp_connect: Vec<u16>,
    /// False in `host` mode without network.tcp_connect: any port.
    pub tcp_connect_restricted: bool,
    pub scoped: Vec<&'static str>,
}

#[derive(Serialize)]
pub struct SeccompReport {
    pub instructions: usize,
    pub denied: Vec<String>,
    pub sha256: String,
    pub default_action: &'static str,
    pub deny_action: &'static str,
}

#[derive(Serialize)]
pub struct Enforced {
    pub namespaces: Vec<&'static str>,
    /// Every path the job can reach, its access, and the rule that granted it.
    pub filesystem: Vec<crate::spec::PathGrant>,
    pub cgroup: CgroupReport,
    pub landlock: Option<LandlockReport>,
    pub seccomp: SeccompReport,
    /// Capabilities the job holds in any set: always none.
    pub capabilities: Vec<String>,
    pub no_new_privs: bool,
    pub user: JobIds,
    pub degraded: Vec<Degradation>,
}

#[derive(Serialize)]
pub struct JobReport {
    pub job_id: String,
    pub command: Vec<String>,
    pub workspace: Option<String>,
    pub policy: PolicyRef,
    pub agent: String,
    pub model: String,
    pub started_at_unix: f64,
    pub wall_time_sec: f64,
    pub exit: ExitReport,
    pub limits: crate::spec::Limits,
    pub usage: Usage,
    pub signals_forwarded: Vec<i32>,
    /// How the job reached the network: its mode, grants, and (through the proxy)
    /// bytes per destination and the denials.
    pub network: crate::net::NetworkReport,
    /// The scheduling class, its parameters, and its cgroup settings.
    pub sched: serde_json::Value,
    pub enforced: Enforced,
}

pub fn exit_report(exit: &JobExit, timed_out: bool) -> ExitReport {
    ExitReport {
        status: exit.code(),
        code: match exit {
            JobExit::Exited(c) => Some(*c),
            _ => None,
        },
        signal: match exit {
            JobExit::Signaled(s) => Some(*s),
            _ => None,
        },
        timed_out,
        error: exit.message(),
    }
}

/// Writes the report next to its final name, then renames, so a reader never sees half.
pub fn write_report(path: &std::path::Path, report: &JobReport) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    text.push('\n');
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// What happened to one run, gathered by the pipeline for its report.
pub struct RunFacts<'a> {
    pub job_id: &'a str,
    pub started_at: std::time::SystemTime,
    pub wall: std::time::Duration,
    pub exit: &'a JobExit,
    pub outcome: &'a Outcome,
    pub usage: Usage,
    pub cgroup: CgroupReport,
}

impl JobReport {
    pub fn new(plan: &JobPlan, run: RunFacts<'_>) -> JobReport {
        let sandbox = &plan.sandbox;
        JobReport {
            job_id: run.job_id.to_owned(),
            command: plan.options.command.clone(),
            workspace: plan.workspace.as_ref().map(|w| w.display().to_string()),
            policy: PolicyRef {
                name: plan.policy.name.clone(),
                source: plan.policy.source.clone(),
                sha256: plan.policy.sha256.clone(),
            },
            agent: plan.policy.identity.agent.clone(),
            model: plan.policy.identity.model.clone(),
            started_at_unix: run
                .started_at
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            wall_time_sec: run.wall.as_secs_f64(),
            exit: exit_report(run.exit, run.outcome.timed_out),
            limits: plan.limits.clone(),
            usage: run.usage,
            signals_forwarded: run.outcome.forwarded.clone(),
            network: crate::net::NetworkReport::for_policy(&plan.egress),
            sched: {
                let mut s = crate::sched::kernel::report(&plan.sched, &plan.sched_cgroup);
                match &plan.kernel_slice {
                    Some(Ok(ns)) => {
                        s["kernel_slice"] =
                            serde_json::json!(format!("{ns} ns (sched_attr.sched_runtime)"))
                    }
                    Some(Err(why)) => s["kernel_slice"] = serde_json::json!(why),
                    None => {}
                }
                if let Some((r, dl, p)) = plan.sandbox.kernel_deadline {
                    s["kernel_deadline"] = serde_json::json!(format!(
                        "SCHED_DEADLINE on the main process: runtime {r} ns, deadline {dl} ns, period {p} ns; reset on fork, SIGXCPU on overrun"
                    ));
                }
                s
            },
            enforced: Enforced {
                namespaces: super::spawn::NAMESPACES
                    .iter()
                    .copied()
                    .filter(|n| *n != "net" || plan.egress.mode != crate::net::NetMode::Host)
                    .collect(),
                filesystem: filesystem_grants(plan),
                cgroup: run.cgroup,
                landlock: (plan.landlock_abi > 0).then(|| LandlockReport {
                    abi: plan.landlock_abi,
                    policy_min_abi: plan.policy.landlock_abi,
                    rights_dropped_best_effort: plan.landlock_dropped.clone(),
                    path_rules: sandbox.landlock.child_rules.len()
                        + plan.policy.filesystem.len()
                        + usize::from(plan.workspace.is_some()),
                    tcp_bind: plan.policy.tcp_bind.clone(),
                    tcp_connect: plan.landlock_tcp_connect().unwrap_or_default(),
                    tcp_connect_restricted: plan.landlock_tcp_connect().is_some(),
                    scoped: if plan.landlock_abi >= 6 {
                        vec!["abstract-unix-socket", "signal"]
                    } else {
                        vec![]
                    },
                }),
                seccomp: SeccompReport {
                    instructions: sandbox.seccomp.instructions.len(),
                    denied: sandbox.seccomp.denied.clone(),
                    sha256: sandbox.seccomp.sha256.clone(),
                    default_action: "allow",
                    deny_action: "errno(EPERM); clone3 errno(ENOSYS)",
                },
                capabilities: Vec::new(),
                no_new_privs: true,
                user: plan.ids,
                degraded: plan.degraded.clone(),
            },
        }
    }
}

/// The policy's grants plus what agentd itself grants, each with its rule.
fn filesystem_grants(plan: &JobPlan) -> Vec<crate::spec::PathGrant> {
    use crate::spec::{Access, PathGrant};
    let mut grants = plan.policy.filesystem.clone();
    if let Some(ws) = &plan.workspace {
        grants.push(PathGrant {
            path: ws.clone(),
            access: Access::Write,
            rule: "command line:--workspace".into(),
        });
    }
    for (path, access) in [
        ("/tmp", Access::Write),
        ("/dev/shm", Access::Write),
        ("/proc", Access::Read),
        ("/dev", Access::Read),
    ] {
        grants.push(PathGrant {
            path: path.into(),
            access,
            rule: "agentd:private".into(),
        });
    }
    grants
}
