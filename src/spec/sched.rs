//! `[sched]`: the scheduling class a job of this policy gets, and what a job may ask for
//! (`--class`, `--weight`, `--slice`, `--runtime`, `--deadline`, `--period`,
//! `--priority`). See src/sched/ for the classes.

use super::units::parse_duration;
use super::values::UnitValue;
use crate::sched::{ClassKind, SchedParams, fair};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use toml::Spanned;

/// A policy's scheduling: the default class and parameters, and the bounds on requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchedPolicy {
    pub class: ClassKind,
    /// Classes a job may ask for (its default is always one of them).
    pub classes: Vec<ClassKind>,
    pub weight: u64,
    /// The most weight a job may ask for.
    pub max_weight: u64,
    pub slice_ns: u64,
    /// Deadline class defaults (ns; 0 = none: a deadline job must give them).
    pub runtime_ns: u64,
    pub deadline_ns: u64,
    pub period_ns: u64,
    pub priority: u8,
    /// CPUs an rt job's cgroup may use (its cpu.max), so even a runaway privileged job
    /// leaves the rest of the machine.
    pub rt_cpus: f64,
    /// Whether a deadline job may ask for SCHED_DEADLINE on its main process
    /// (`--kernel-deadline`).
    pub allow_kernel_deadline: bool,
}

impl Default for SchedPolicy {
    fn default() -> Self {
        SchedPolicy {
            class: ClassKind::Fair,
            classes: vec![ClassKind::Fair, ClassKind::Idle],
            weight: fair::NICE_0_WEIGHT,
            max_weight: fair::NICE_0_WEIGHT,
            slice_ns: fair::DEFAULT_SLICE,
            runtime_ns: 0,
            deadline_ns: 0,
            period_ns: 0,
            priority: 10,
            rt_cpus: 0.5,
            allow_kernel_deadline: false,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSched {
    class: Option<Spanned<String>>,
    classes: Option<Spanned<Vec<String>>>,
    nice: Option<Spanned<i64>>,
    weight: Option<Spanned<i64>>,
    max_weight: Option<Spanned<i64>>,
    slice: Option<Spanned<UnitValue>>,
    runtime: Option<Spanned<UnitValue>>,
    deadline: Option<Spanned<UnitValue>>,
    period: Option<Spanned<UnitValue>>,
    priority: Option<Spanned<i64>>,
    rt_cpus: Option<Spanned<super::values::Number>>,
    allow_kernel_deadline: Option<bool>,
}

pub fn class_of(name: &str) -> Result<ClassKind, String> {
    match name {
        "fair" => Ok(ClassKind::Fair),
        "deadline" => Ok(ClassKind::Deadline),
        "rt" => Ok(ClassKind::Rt),
        "idle" => Ok(ClassKind::Idle),
        other => Err(format!(
            "expected \"fair\", \"deadline\", \"rt\" or \"idle\", got \"{other}\""
        )),
    }
}

pub fn class_name(c: ClassKind) -> &'static str {
    match c {
        ClassKind::Fair => "fair",
        ClassKind::Deadline => "deadline",
        ClassKind::Rt => "rt",
        ClassKind::Idle => "idle",
    }
}

/// A duration in ns, written as everywhere in policies: "3ms", "1s", or seconds.
fn duration_ns(v: &UnitValue) -> Result<u64, String> {
    let d = match v {
        UnitValue::Int(n) if *n >= 0 => Duration::from_secs(*n as u64),
        UnitValue::Int(n) => return Err(format!("{n} is negative")),
        UnitValue::Text(t) => parse_duration(t)?,
    };
    Ok(d.as_nanos().min(u64::MAX as u128) as u64)
}

type RawError = (std::ops::Range<usize>, &'static str, String);

impl RawSched {
    pub(super) fn parse(&self) -> Result<SchedPolicy, RawError> {
        let mut s = SchedPolicy::default();
        if let Some(c) = &self.classes {
            let mut list = Vec::new();
            for name in c.get_ref() {
                let k = class_of(name).map_err(|m| (c.span(), "sched.classes", m))?;
                if !list.contains(&k) {
                    list.push(k);
                }
            }
            if list.is_empty() {
                return Err((
                    c.span(),
                    "sched.classes",
                    "must name at least one class".into(),
                ));
            }
            s.classes = list;
        }
        if let Some(c) = &self.class {
            s.class = class_of(c.get_ref()).map_err(|m| (c.span(), "sched.class", m))?;
            if self.classes.is_none() && !s.classes.contains(&s.class) {
                s.classes.push(s.class);
            }
            if !s.classes.contains(&s.class) {
                return Err((
                    c.span(),
                    "sched.class",
                    format!("\"{}\" is not in sched.classes", c.get_ref()),
                ));
            }
        }
        let weight = |key: &'static str, v: &Spanned<i64>| -> Result<u64, RawError> {
            let w = u64::try_from(*v.get_ref()).unwrap_or(0);
            fair::check(w, fair::DEFAULT_SLICE).map_err(|e| (v.span(), key, e.to_string()))?;
            Ok(w)
        };
        if let Some(n) = &self.nice {
            let nice = i8::try_from(*n.get_ref()).unwrap_or(i8::MAX);
            s.weight =
                fair::weight_of_nice(nice).map_err(|e| (n.span(), "sched.nice", e.to_string()))?;
        }
        if let Some(w) = &self.weight {
            s.weight = weight("sched.weight", w)?;
        }
        s.max_weight = s.weight.max(fair::NICE_0_WEIGHT);
        if let Some(w) = &self.max_weight {
            s.max_weight = weight("sched.max_weight", w)?;
            if s.max_weight < s.weight {
                return Err((
                    w.span(),
                    "sched.max_weight",
                    format!("{} is below sched.weight {}", s.max_weight, s.weight),
                ));
            }
        }
        if let Some(v) = &self.slice {
            s.slice_ns = duration_ns(v.get_ref()).map_err(|m| (v.span(), "sched.slice", m))?;
            fair::check(s.weight, s.slice_ns)
                .map_err(|e| (v.span(), "sched.slice", e.to_string()))?;
        }
        for (key, raw, slot) in [
            ("sched.runtime", &self.runtime, &mut s.runtime_ns),
            ("sched.deadline", &self.deadline, &mut s.deadline_ns),
            ("sched.period", &self.period, &mut s.period_ns),
        ] {
            if let Some(v) = raw {
                *slot = duration_ns(v.get_ref()).map_err(|m| (v.span(), key, m))?;
            }
        }
        if s.runtime_ns != 0 || s.deadline_ns != 0 {
            let span = self
                .runtime
                .as_ref()
                .or(self.deadline.as_ref())
                .map(|v| v.span())
                .unwrap_or_default();
            crate::sched::deadline::check(s.runtime_ns, s.deadline_ns, s.period_ns)
                .map_err(|e| (span, "sched.runtime", e.to_string()))?;
        } else if s.class == ClassKind::Deadline {
            let span = self.class.as_ref().map(|c| c.span()).unwrap_or_default();
            return Err((
                span,
                "sched.class",
                "a deadline class needs sched.runtime and sched.deadline (and sched.period)".into(),
            ));
        }
        if let Some(p) = &self.priority {
            s.priority = match *p.get_ref() {
                n @ 1..=99 => n as u8,
                n => return Err((p.span(), "sched.priority", format!("{n} is outside 1..99"))),
            };
        }
        if let Some(c) = &self.rt_cpus {
            let cpus = c.get_ref().0;
            if !(0.01..=1024.0).contains(&cpus) {
                return Err((
                    c.span(),
                    "sched.rt_cpus",
                    format!("{cpus} is outside 0.01..1024 CPUs"),
                ));
            }
            s.rt_cpus = cpus;
        }
        s.allow_kernel_deadline = self.allow_kernel_deadline.unwrap_or(false);
        Ok(s)
    }
}

/// What a job asks for on top of its policy (`agentd run` and `agentctl run` flags,
/// the API's `sched` object).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct SchedRequest {
    /// Scheduling class: fair, deadline, rt or idle (the policy's sched.classes say
    /// which it grants; default: its sched.class).
    #[arg(long, value_name = "CLASS")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// fair: the job's weight (nice 0 = 1024, each nice step about 25%), up to the
    /// policy's sched.max_weight.
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u64>,
    /// fair: CPU time per turn (0.1ms..100ms); shorter means shorter waits.
    #[arg(long, value_name = "DURATION")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<String>,
    /// deadline: CPU time guaranteed every period (runtime <= deadline <= period).
    #[arg(long, value_name = "DURATION")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// deadline: within how long of each period's start the runtime is delivered.
    #[arg(long, value_name = "DURATION")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// deadline: the period (0.1ms..4.19s; default the deadline).
    #[arg(long, value_name = "DURATION")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
    /// rt: priority 1..99 (higher first).
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// deadline: also run the job's main process under SCHED_DEADLINE with these
    /// parameters (reset on fork: its children are ordinary tasks; SIGXCPU on each
    /// overrun). For a single-threaded worker; the policy must allow it
    /// (sched.allow_kernel_deadline).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kernel_deadline: bool,
}

impl SchedRequest {
    pub fn is_empty(&self) -> bool {
        *self == SchedRequest::default()
    }
}

/// The job's class and parameters: the policy's, with the request's changes, within
/// the policy's bounds. Errors name the flag and the rule.
pub fn resolve(
    policy: &SchedPolicy,
    name: &str,
    req: &SchedRequest,
) -> Result<SchedParams, String> {
    let class = match &req.class {
        Some(c) => class_of(c).map_err(|m| format!("--class: {m}"))?,
        None => policy.class,
    };
    if !policy.classes.contains(&class) {
        return Err(format!(
            "--class {}: policy {name} grants {} (sched.classes)",
            class_name(class),
            policy
                .classes
                .iter()
                .map(|c| class_name(*c))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let dur = |flag: &str, v: &Option<String>, default: u64| -> Result<u64, String> {
        match v {
            Some(t) => parse_duration(t)
                .map(|d| d.as_nanos().min(u64::MAX as u128) as u64)
                .map_err(|m| format!("{flag}: {m}")),
            None => Ok(default),
        }
    };
    let only = |flag: &str, set: bool, for_class: ClassKind| -> Result<(), String> {
        if set && class != for_class {
            return Err(format!(
                "{flag} is for the {} class, and this job's class is {}",
                class_name(for_class),
                class_name(class)
            ));
        }
        Ok(())
    };
    only("--weight", req.weight.is_some(), ClassKind::Fair)?;
    only("--slice", req.slice.is_some(), ClassKind::Fair)?;
    only("--runtime", req.runtime.is_some(), ClassKind::Deadline)?;
    only("--deadline", req.deadline.is_some(), ClassKind::Deadline)?;
    only("--period", req.period.is_some(), ClassKind::Deadline)?;
    only("--priority", req.priority.is_some(), ClassKind::Rt)?;
    Ok(match class {
        ClassKind::Fair => {
            let weight = req.weight.unwrap_or(policy.weight);
            if weight > policy.max_weight {
                return Err(format!(
                    "--weight {weight}: policy {name} allows at most {} (sched.max_weight)",
                    policy.max_weight
                ));
            }
            let slice = dur("--slice", &req.slice, policy.slice_ns)?;
            fair::check(weight, slice).map_err(|e| format!("--{e}"))?;
            SchedParams::Fair { weight, slice }
        }
        ClassKind::Deadline => {
            let runtime = dur("--runtime", &req.runtime, policy.runtime_ns)?;
            let deadline = dur("--deadline", &req.deadline, policy.deadline_ns)?;
            let period = dur("--period", &req.period, policy.period_ns)?;
            let period = crate::sched::deadline::check(runtime, deadline, period)
                .map_err(|e| format!("--{e}"))?;
            SchedParams::Deadline {
                runtime,
                deadline,
                period,
            }
        }
        ClassKind::Rt => {
            let priority = req.priority.unwrap_or(policy.priority);
            if !(1..=99).contains(&priority) {
                return Err(format!("--priority {priority}: outside 1..99"));
            }
            SchedParams::Rt { priority }
        }
        ClassKind::Idle => SchedParams::Idle,
    })
}

/// `--kernel-deadline`: the (runtime, deadline, period) in ns for SCHED_DEADLINE on the
/// job's main process, if asked for and allowed.
pub fn kernel_deadline(
    policy: &SchedPolicy,
    name: &str,
    req: &SchedRequest,
    params: &SchedParams,
) -> Result<Option<(u64, u64, u64)>, String> {
    if !req.kernel_deadline {
        return Ok(None);
    }
    let SchedParams::Deadline {
        runtime,
        deadline,
        period,
    } = *params
    else {
        return Err(format!(
            "--kernel-deadline is for the deadline class, and this job's class is {}",
            class_name(params.class())
        ));
    };
    if !policy.allow_kernel_deadline {
        return Err(format!(
            "--kernel-deadline: policy {name} does not allow SCHED_DEADLINE on a job's main process (sched.allow_kernel_deadline)"
        ));
    }
    Ok(Some((runtime, deadline, period)))
}
