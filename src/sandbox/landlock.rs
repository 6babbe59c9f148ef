//! Landlock, child side: the parent created the ruleset before clone (with every right
//! the kernel's ABI has, handled) and adds the policy's path and port rules while this
//! process builds the root; here the rules for what the child mounted itself (the root
//! tmpfs, /proc, /dev, /tmp) are added with raw calls, and the ruleset is enforced.

use super::{SetupError, Step, check};
use std::ffi::CString;
use std::os::fd::RawFd;

const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;

#[derive(Debug, Clone)]
pub struct LandlockPlan {
    /// This process's copy of the parent's ruleset fd; None when the kernel has no
    /// Landlock (and the downgrade was asked for).
    pub ruleset: Option<RawFd>,
    /// Paths as the job sees them, with the access bits (already limited to what the
    /// ruleset handles).
    pub child_rules: Vec<(CString, u64)>,
    /// Refuse to run without a ruleset (false only with --allow-degraded landlock).
    pub required: bool,
}

/// struct landlock_path_beneath_attr (packed in the uapi header).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

pub fn restrict(plan: &LandlockPlan) -> Result<(), SetupError> {
    let Some(ruleset) = plan.ruleset else {
        return if plan.required {
            Err(SetupError {
                step: Step::LandlockMissing,
                index: 0,
                errno: libc::ENOSYS,
            })
        } else {
            Ok(())
        };
    };
    for (index, (path, access)) in plan.child_rules.iter().enumerate() {
        let fail = |errno| SetupError {
            step: Step::LandlockRule,
            index: index as u32,
            errno,
        };
        // SAFETY: open with a valid C path; the fd is closed below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(fail(super::errno()));
        }
        let attr = PathBeneathAttr {
            allowed_access: *access,
            parent_fd: fd,
        };
        // SAFETY: attr is a valid landlock_path_beneath_attr for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset,
                LANDLOCK_RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0,
            )
        };
        let errno = super::errno();
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
        if r < 0 {
            return Err(fail(errno));
        }
    }
    // no_new_privs is already set, as landlock_restrict_self requires.
    // SAFETY: restrict_self on our ruleset fd, no flags.
    check(
        unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0) },
        Step::LandlockRestrict,
    )?;
    // SAFETY: the ruleset fd is ours and no longer needed.
    unsafe { libc::close(ruleset) };
    Ok(())
}
