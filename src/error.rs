//! agentd's top-level error: each module's error folded in, with the exit status the
//! command line uses. Every variant is something agentd itself failed at or refused, so
//! every one exits 125; 126 and 127 come from the job's exec, not from here.

use crate::cgroup::CgroupError;
use crate::spec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A policy or flag that cannot be accepted.
    #[error("{0}")]
    Spec(#[from] SpecError),
    /// Bad use of the command line that is not about a policy value.
    #[error("{0}")]
    Usage(String),
    /// The kernel or host lacks something the policy needs, and no downgrade was asked for.
    #[error("refused: {reason}; pass --allow-degraded {feature} to run without it")]
    Refused { feature: String, reason: String },
    #[error("job {job}: {source}")]
    Cgroup { job: String, source: CgroupError },
    /// A step of the creation pipeline failed.
    #[error("job {job}: {step}: {message}")]
    Pipeline {
        job: String,
        step: &'static str,
        message: String,
    },
}

impl Error {
    /// The exit status for `agentd run`: 125 for anything agentd failed at or refused.
    pub fn exit_code(&self) -> i32 {
        125
    }
}
