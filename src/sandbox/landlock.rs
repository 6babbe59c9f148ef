//! Landlock: every right the kernel's ABI has, handled; only the policy's grants allowed.
//!
//! The ruleset asks for everything the landlock crate knows (best effort): the kernel
//! keeps what its ABI supports. The parent refuses the job beforehand when the kernel's
//! ABI is older than the policy's `sandbox.landlock_abi` (unless the downgrade is asked
//! for), and reports which rights the kernel dropped.

use super::SetupError;
use crate::spec::Access;
use landlock::{
    ABI, Access as _, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, make_bitflags,
};
use std::path::PathBuf;

/// The newest ABI this build knows. Rights beyond the kernel's are dropped by best effort.
const NEWEST: ABI = ABI::V10;

#[derive(Debug, Clone)]
pub struct LandlockPlan {
    /// Paths as the job sees them, with the access granted beneath each.
    pub paths: Vec<(PathBuf, LandlockAccess)>,
    pub tcp_bind: Vec<u16>,
    pub tcp_connect: Vec<u16>,
    /// Refuse to run if the kernel enforces nothing (false only with --allow-degraded).
    pub required: bool,
}

/// Access classes beyond the policy's read/exec/write, for what agentd mounts itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LandlockAccess {
    Policy(Access),
    /// "/": list directories only, so `ls /` works and nothing else is implied.
    ListOnly,
    /// /proc and /dev: read, write existing files, device ioctls; create nothing.
    Devices,
}

fn rights(access: LandlockAccess) -> BitFlags<AccessFs> {
    match access {
        LandlockAccess::Policy(Access::Read) => make_bitflags!(AccessFs::{ReadFile | ReadDir}),
        LandlockAccess::Policy(Access::Exec) => {
            make_bitflags!(AccessFs::{ReadFile | ReadDir | Execute})
        }
        LandlockAccess::Policy(Access::Write) => AccessFs::from_all(NEWEST),
        LandlockAccess::ListOnly => make_bitflags!(AccessFs::{ReadDir}),
        LandlockAccess::Devices => {
            make_bitflags!(AccessFs::{ReadFile | ReadDir | WriteFile | IoctlDev})
        }
    }
}

fn handled_net() -> BitFlags<AccessNet> {
    // TCP only: UDP rights (ABI 10) would also cut DNS on loopback; ports come later
    // with the egress membrane.
    make_bitflags!(AccessNet::{BindTcp | ConnectTcp})
}

/// Maps the kernel's ABI number to the crate's enum, for reporting only.
fn abi_of(version: u32) -> ABI {
    match version {
        0 => ABI::Unsupported,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        6 => ABI::V6,
        7 => ABI::V7,
        8 => ABI::V8,
        9 => ABI::V9,
        _ => ABI::V10,
    }
}

/// The rights agentd asks for that a kernel with ABI `kernel_abi` cannot enforce.
pub fn landlock_rights_dropped(kernel_abi: u32) -> Vec<String> {
    let have = abi_of(kernel_abi);
    let mut dropped: Vec<String> = (AccessFs::from_all(NEWEST) & !AccessFs::from_all(have))
        .iter()
        .map(|r| format!("fs:{r:?}"))
        .collect();
    dropped.extend(
        (handled_net() & !AccessNet::from_all(have))
            .iter()
            .map(|r| format!("net:{r:?}")),
    );
    dropped.extend(
        (Scope::from_all(NEWEST) & !Scope::from_all(have))
            .iter()
            .map(|r| format!("scope:{r:?}")),
    );
    dropped
}

fn err(step: &str) -> impl FnOnce(landlock::RulesetError) -> SetupError + '_ {
    // The crate's message already names the OS error; errno 0 says "nothing to add".
    move |e| SetupError {
        step: format!("{step}: {e}"),
        errno: 0,
    }
}

pub fn restrict(plan: &LandlockPlan) -> Result<(), SetupError> {
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(NEWEST))
        .map_err(err("Landlock filesystem rights"))?
        .handle_access(handled_net())
        .map_err(err("Landlock network rights"))?
        .scope(Scope::from_all(NEWEST))
        .map_err(err("Landlock scoping"))?
        .create()
        .map_err(err("create the Landlock ruleset"))?;
    for (path, access) in &plan.paths {
        let fd = PathFd::new(path).map_err(|e| SetupError {
            step: format!("open {} for a Landlock rule", path.display()),
            errno: match e {
                landlock::PathFdError::OpenCall { source, .. } => {
                    source.raw_os_error().unwrap_or(libc::EIO)
                }
                _ => libc::EIO,
            },
        })?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, rights(*access)))
            .map_err(err("add a Landlock path rule"))?;
    }
    for port in &plan.tcp_bind {
        ruleset = ruleset
            .add_rule(NetPort::new(*port, AccessNet::BindTcp))
            .map_err(err("add a Landlock port rule"))?;
    }
    for port in &plan.tcp_connect {
        ruleset = ruleset
            .add_rule(NetPort::new(*port, AccessNet::ConnectTcp))
            .map_err(err("add a Landlock port rule"))?;
    }
    let status = ruleset.restrict_self().map_err(err("enforce Landlock"))?;
    if status.ruleset == RulesetStatus::NotEnforced && plan.required {
        return Err(SetupError {
            step: "enforce Landlock: the kernel enforced nothing".into(),
            errno: libc::ENOSYS,
        });
    }
    Ok(())
}
