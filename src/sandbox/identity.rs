//! The job's identity: its uid/gid, no supplementary groups, no capabilities, ever.
//!
//! Raw prctl/capset rather than the caps crate: caps allocates (HashSet, Vec), and this
//! code runs where allocation is not allowed (see the module comment of `sandbox`).

use super::{SetupError, Step, check, errno};

// securebits (include/uapi/linux/securebits.h).
const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;
/// _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Becomes the job's user while keeping capabilities in the job's user namespace (the
/// root filesystem is still to be built), and locks the securebits so that nothing can
/// ever raise capabilities again.
pub fn become_job_user(uid: u32, gid: u32) -> Result<(), SetupError> {
    // Locked securebits first (needs CAP_SETPCAP, which we still hold): uid 0 inside the
    // namespace never regains capabilities through execve (NOROOT), a uid change never
    // adjusts them (NO_SETUID_FIXUP: they are cleared explicitly later), and ambient
    // capabilities can never be raised.
    let bits = SECBIT_NOROOT
        | SECBIT_NOROOT_LOCKED
        | SECBIT_NO_SETUID_FIXUP
        | SECBIT_NO_SETUID_FIXUP_LOCKED
        | SECBIT_KEEP_CAPS_LOCKED
        | SECBIT_NO_CAP_AMBIENT_RAISE
        | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    // SAFETY (all calls): integer arguments only.
    check(
        unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits) }.into(),
        Step::Securebits,
    )?;
    // No supplementary groups: host root's groups must not follow the job in.
    // Raw system calls, not glibc's wrappers: those apply the change to every thread of
    // the process (POSIX semantics) by signalling the threads glibc believes exist and
    // waiting for them. A child cloned from the multithreaded daemon has one thread but
    // inherits glibc's list of the others, and would wait for them forever.
    check(
        unsafe { libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) },
        Step::DropGroups,
    )?;
    check(
        unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) },
        Step::SetGid,
    )?;
    check(
        unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) },
        Step::SetUid,
    )?;
    Ok(())
}

/// Clears every capability set and sets no_new_privs.
pub fn drop_capabilities() -> Result<(), SetupError> {
    // The bounding set caps what any later execve could grant; empty it while we still
    // have CAP_SETPCAP (EINVAL marks the end of the kernel's capabilities).
    for cap in 0..64 {
        // SAFETY: integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap) } != 0 {
            match errno() {
                libc::EINVAL if cap > 0 => break,
                e => {
                    return Err(SetupError {
                        step: Step::BoundingSet,
                        index: cap as u32,
                        errno: e,
                    });
                }
            }
        }
    }
    // SAFETY: integer arguments only.
    check(
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        }
        .into(),
        Step::AmbientCaps,
    )?;
    // Permitted, effective and inheritable: all zero. After this the job holds no
    // capability in any namespace.
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and data are valid for capset's version 3 layout.
    check(
        unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) },
        Step::Capset,
    )?;
    // No execve may ever grant privileges again (setuid bits, file capabilities).
    // SAFETY: integer arguments only.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into(),
        Step::NoNewPrivs,
    )?;
    Ok(())
}
