//! The job's identity: its uid/gid, no supplementary groups, no capabilities, ever.

use super::{SetupError, fail};
use caps::CapSet;

// securebits (include/uapi/linux/securebits.h).
const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;

fn caps_err(step: &'static str) -> impl FnOnce(caps::errors::CapsError) -> SetupError {
    move |_| SetupError {
        step: step.into(),
        errno: nix::errno::Errno::last() as i32,
    }
}

/// Becomes the job's user while keeping capabilities in the job's user namespace (the
/// root filesystem is still to be built), and locks the securebits so that nothing can
/// ever raise capabilities again.
pub fn become_job_user(uid: u32, gid: u32) -> Result<(), SetupError> {
    // Locked securebits first (needs CAP_SETPCAP, which we still hold): uid 0 inside the
    // namespace never regains capabilities through execve (NOROOT), a uid change never
    // adjusts them (NO_SETUID_FIXUP: we clear them explicitly below), and ambient
    // capabilities can never be raised.
    let bits = SECBIT_NOROOT
        | SECBIT_NOROOT_LOCKED
        | SECBIT_NO_SETUID_FIXUP
        | SECBIT_NO_SETUID_FIXUP_LOCKED
        | SECBIT_KEEP_CAPS_LOCKED
        | SECBIT_NO_CAP_AMBIENT_RAISE
        | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits) } != 0 {
        return Err(fail("lock the securebits")(nix::errno::Errno::last()));
    }
    // No supplementary groups: host root's groups must not follow the job in.
    nix::unistd::setgroups(&[]).map_err(fail("drop supplementary groups"))?;
    let (g, u) = (
        nix::unistd::Gid::from_raw(gid),
        nix::unistd::Uid::from_raw(uid),
    );
    nix::unistd::setresgid(g, g, g).map_err(fail(format!("switch to gid {gid}")))?;
    nix::unistd::setresuid(u, u, u).map_err(fail(format!("switch to uid {uid}")))
}

/// Clears every capability set and sets no_new_privs.
pub fn drop_capabilities() -> Result<(), SetupError> {
    // The bounding set caps what any later execve could grant; empty it while we still
    // have CAP_SETPCAP, then the ambient set, then the rest.
    caps::clear(None, CapSet::Bounding).map_err(caps_err("clear the capability bounding set"))?;
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clear the ambient capabilities"))?;
    // Now the remaining sets. After this the job holds no capability in any namespace.
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set).map_err(caps_err("clear the capability sets"))?;
    }

    // No execve may ever grant privileges again (setuid bits, file capabilities).
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(fail("set no_new_privs")(nix::errno::Errno::last()));
    }
    Ok(())
}
