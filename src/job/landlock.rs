//! Landlock, parent side: the ruleset is created before clone (so the child inherits
//! its fd) and the policy's rules are added while the child builds its root. Rules
//! attach to inodes, and a bind mount shows the host's inodes, so a rule made here on
//! /usr holds for the job's /usr. The child adds rules only for what it mounts itself.
//!
//! The ruleset asks for every right the landlock crate knows (best effort): the kernel
//! keeps what its ABI supports. The job is refused beforehand when the kernel's ABI is
//! older than the policy's `sandbox.landlock_abi` (unless the downgrade is asked for),
//! and the report lists the rights the kernel dropped.

use crate::spec::Access;
use landlock::{
    ABI, Access as _, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, Scope, make_bitflags,
};
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// The newest ABI this build knows.
const NEWEST: ABI = ABI::V10;

/// The rights a policy grant gives beneath its path.
fn policy_rights(access: Access) -> BitFlags<AccessFs> {
    match access {
        Access::Read => make_bitflags!(AccessFs::{ReadFile | ReadDir}),
        Access::Exec => make_bitflags!(AccessFs::{ReadFile | ReadDir | Execute}),
        Access::Write => AccessFs::from_all(NEWEST),
    }
}

/// TCP only: UDP rights (ABI 10) would also cut the job's DNS on loopback. Connecting is
/// not restricted in `host` mode unless the policy lists ports: that mode grants the
/// host's network.
fn handled_net(restrict_connect: bool) -> BitFlags<AccessNet> {
    if restrict_connect {
        make_bitflags!(AccessNet::{BindTcp | ConnectTcp})
    } else {
        make_bitflags!(AccessNet::{BindTcp})
    }
}

/// Maps the kernel's ABI number to the crate's enum, to compute what it handles.
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
pub fn rights_dropped(kernel_abi: u32) -> Vec<String> {
    let have = abi_of(kernel_abi);
    let fs = (AccessFs::from_all(NEWEST) & !AccessFs::from_all(have))
        .iter()
        .map(|r| format!("fs:{r:?}"));
    let net = (handled_net(true) & !AccessNet::from_all(have))
        .iter()
        .map(|r| format!("net:{r:?}"));
    let scope = (Scope::from_all(NEWEST) & !Scope::from_all(have))
        .iter()
        .map(|r| format!("scope:{r:?}"));
    fs.chain(net).chain(scope).collect()
}

/// Rules for what the child mounts itself, as the job sees the paths, limited to what
/// a kernel with `kernel_abi` handles: "/" may only be listed (so `ls /` works and
/// nothing else is implied); /proc and /dev: read, write existing files, device ioctls,
/// create nothing; /dev/pts likewise; /dev/shm and /tmp: everything.
pub fn child_rules(kernel_abi: u32) -> Vec<(CString, u64)> {
    let handled = AccessFs::from_all(abi_of(kernel_abi));
    let devices = make_bitflags!(AccessFs::{ReadFile | ReadDir | WriteFile | IoctlDev});
    [
        (c"/", make_bitflags!(AccessFs::{ReadDir})),
        (c"/proc", devices),
        (c"/dev", devices),
        (c"/dev/pts", devices),
        (c"/dev/shm", AccessFs::from_all(NEWEST)),
        (c"/tmp", AccessFs::from_all(NEWEST)),
    ]
    .into_iter()
    .map(|(path, rights)| (path.to_owned(), (rights & handled).bits()))
    .collect()
}

/// The parent's handle on the job's ruleset and the fd the child inherits.
pub struct JobRuleset {
    ruleset: RulesetCreated,
    /// Kept open until clone; the child's copy has the same number.
    pub child_fd: Option<OwnedFd>,
}

fn err(what: &str) -> impl FnOnce(landlock::RulesetError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Creates the job's ruleset with every right handled (best effort); TCP connect only
/// when `restrict_connect`.
pub fn create(restrict_connect: bool) -> Result<JobRuleset, String> {
    let ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(NEWEST))
        .map_err(err("Landlock filesystem rights"))?
        .handle_access(handled_net(restrict_connect))
        .map_err(err("Landlock network rights"))?
        .scope(Scope::from_all(NEWEST))
        .map_err(err("Landlock scoping"))?
        .create()
        .map_err(err("create the Landlock ruleset"))?;
    let copy = ruleset
        .try_clone()
        .map_err(|e| format!("duplicate the Landlock ruleset: {e}"))?;
    Ok(JobRuleset {
        ruleset,
        child_fd: copy.into(),
    })
}

impl JobRuleset {
    /// Adds the policy's path rules (host paths; their inodes are what the job's bind
    /// mounts show) and port rules.
    pub fn add_policy_rules(
        self,
        paths: &[(PathBuf, Access)],
        fd_rules: Vec<(std::os::fd::OwnedFd, Access)>,
        tcp_bind: &[u16],
        tcp_connect: &[u16],
    ) -> Result<(), String> {
        let mut ruleset = self.ruleset;
        for (path, access) in paths {
            let fd = PathFd::new(path)
                .map_err(|e| format!("open {} for a Landlock rule: {e}", path.display()))?;
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, policy_rights(*access)))
                .map_err(err("add a Landlock path rule"))?;
        }
        for (fd, access) in fd_rules {
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, policy_rights(access)))
                .map_err(err("add a Landlock rule for the workspace"))?;
        }
        for port in tcp_bind {
            ruleset = ruleset
                .add_rule(NetPort::new(*port, AccessNet::BindTcp))
                .map_err(err("add a Landlock port rule"))?;
        }
        for port in tcp_connect {
            ruleset = ruleset
                .add_rule(NetPort::new(*port, AccessNet::ConnectTcp))
                .map_err(err("add a Landlock port rule"))?;
        }
        Ok(())
    }
}
