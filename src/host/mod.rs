//! What this kernel and host offer: probes used by `agentd check` and by the fail-closed
//! decisions of `agentd run`. Each probe asks the kernel directly (a syscall or the file
//! the feature lives in) rather than guessing from the version number.

mod check;

pub use check::{CheckReport, check_host};

/// CPUs this process may run on (its affinity mask), which is what a cpu limit can use.
pub fn online_cpus() -> usize {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            return libc::CPU_COUNT(&set).max(1) as usize;
        }
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The Landlock ABI version the kernel offers; 0 when Landlock is absent or disabled.
pub fn landlock_abi() -> u32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a NULL attr, size 0 and the VERSION flag, landlock_create_ruleset only
    // returns the ABI version (or an error); no memory is read or written.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v > 0 { v as u32 } else { 0 }
}

/// Whether seccomp filters can be installed (CONFIG_SECCOMP_FILTER).
pub fn seccomp_filter_available() -> bool {
    // SECCOMP_GET_ACTION_AVAIL for SECCOMP_RET_ERRNO: succeeds only with filter support.
    let action: u32 = 0x0005_0000;
    // SAFETY: the kernel reads one u32 from a valid pointer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            2, /* SECCOMP_GET_ACTION_AVAIL */
            0,
            &action as *const u32,
        )
    };
    r == 0
}
