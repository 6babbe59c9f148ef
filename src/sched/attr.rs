//! sched_setattr(2), by hand: libc has the syscall number but no wrapper, and no
//! well-kept crate offers one. Used for a job's EEVDF slice (sched_attr.sched_runtime
//! with SCHED_OTHER, Linux ≥ 6.12), for SCHED_DEADLINE on a job's main process
//! (`--kernel-deadline`), and by `agentd check`'s probes.

/// struct sched_attr (uapi linux/sched/types.h), the 48-byte first version.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SchedAttr {
    pub size: u32,
    pub policy: u32,
    pub flags: u64,
    pub nice: i32,
    pub priority: u32,
    pub runtime: u64,
    pub deadline: u64,
    pub period: u64,
}

pub const SCHED_OTHER: u32 = 0;
pub const SCHED_DEADLINE: u32 = 6;
pub const SCHED_ATTR_SIZE_VER0: u32 = 48;
/// Children of the task start as SCHED_OTHER (a SCHED_DEADLINE task may not fork
/// without it).
pub const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;
/// SIGXCPU to the task each time it overruns its runtime.
pub const SCHED_FLAG_DL_OVERRUN: u64 = 0x04;

/// sched_setattr(pid, attr, 0); pid 0 is the calling thread.
pub fn sched_setattr(pid: i32, attr: &SchedAttr) -> std::io::Result<()> {
    // SAFETY: attr is a valid, fully initialized sched_attr of the size it declares, and
    // the kernel only reads it.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, pid, attr as *const SchedAttr, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Gives task `pid` an EEVDF slice (what its children inherit at fork), and says what
/// went wrong in terms of the rule that was broken.
pub fn set_eevdf_slice(pid: i32, slice_ns: u64) -> Result<(), String> {
    let attr = SchedAttr {
        size: SCHED_ATTR_SIZE_VER0,
        policy: SCHED_OTHER,
        runtime: slice_ns,
        ..Default::default()
    };
    sched_setattr(pid, &attr).map_err(|e| match e.raw_os_error() {
        Some(libc::EINVAL) => format!(
            "sched_setattr(SCHED_OTHER, sched_runtime = {slice_ns} ns) on pid {pid}: EINVAL (the kernel refuses the slice; Linux before 6.12 takes no sched_runtime for fair tasks)"
        ),
        Some(libc::EPERM) => format!(
            "sched_setattr on pid {pid}: EPERM (agentd needs CAP_SYS_NICE or to own the task)"
        ),
        Some(libc::ESRCH) => format!("sched_setattr on pid {pid}: the task is gone"),
        _ => format!("sched_setattr on pid {pid}: {e}"),
    })
}

/// Whether this kernel honours a fair task's slice (sets one on a short-lived thread
/// and reads it back from /proc). Cached.
pub fn eevdf_slice_supported() -> Result<(), String> {
    static ANSWER: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ANSWER
        .get_or_init(|| {
            std::thread::spawn(|| {
                set_eevdf_slice(0, 1_000_000)?;
                let sched = std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default();
                match sched
                    .lines()
                    .find(|l| l.starts_with("se.slice"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|v| v.trim().to_owned())
                {
                    Some(v) if v == "1000000" => Ok(()),
                    Some(v) => Err(format!(
                        "the kernel ignores a fair task's slice (se.slice reads {v} after asking for 1 ms; Linux ≥ 6.12 honours it)"
                    )),
                    None => Err("the kernel shows no se.slice in /proc/PID/sched (Linux ≥ 6.12 honours a fair task's slice)".into()),
                }
            })
            .join()
            .unwrap_or_else(|_| Err("the probe thread panicked".into()))
        })
        .clone()
}

/// Puts task `pid` under SCHED_DEADLINE (runtime, deadline, period in ns) with reset on
/// fork and overrun notification (SIGXCPU), and says what went wrong in terms of the
/// rule that was broken. Only a process with CAP_SYS_NICE in the host's user namespace
/// may do this, so the supervisor does it, never the job.
pub fn set_deadline(pid: i32, runtime: u64, deadline: u64, period: u64) -> Result<(), String> {
    let attr = SchedAttr {
        size: SCHED_ATTR_SIZE_VER0,
        policy: SCHED_DEADLINE,
        flags: SCHED_FLAG_RESET_ON_FORK | SCHED_FLAG_DL_OVERRUN,
        runtime,
        deadline,
        period,
        ..Default::default()
    };
    sched_setattr(pid, &attr).map_err(|e| {
        let what = format!(
            "sched_setattr(SCHED_DEADLINE, runtime {runtime} ns, deadline {deadline} ns, period {period} ns) on the job's main process (pid {pid})"
        );
        match e.raw_os_error() {
            Some(libc::EBUSY) => format!(
                "{what}: EBUSY: the kernel's own admission control refused it: the SCHED_DEADLINE bandwidth of the CPUs this task may run on (kernel.sched_rt_runtime_us / sched_rt_period_us of each CPU of its root domain) is used up by other deadline tasks; ask for less runtime per period, or free bandwidth"
            ),
            Some(libc::EPERM) => format!(
                "{what}: EPERM: either agentd lacks CAP_SYS_NICE in the host's user namespace, or the task's CPU affinity does not cover every CPU of its root domain (SCHED_DEADLINE needs them all: do not start the job under taskset or a cpuset that narrows it), or it is in a cgroup v1 cpu cgroup with real-time bandwidth of 0 on a kernel with CONFIG_RT_GROUP_SCHED"
            ),
            Some(libc::EINVAL) => format!(
                "{what}: EINVAL: the kernel refuses the parameters (runtime >= 1024 ns, runtime <= deadline <= period, period within kernel.sched_deadline_period_{{min,max}}_us) or the flags (overrun notification needs Linux >= 4.16)"
            ),
            Some(libc::ESRCH) => format!("{what}: the process is gone"),
            _ => format!("{what}: {e}"),
        }
    })
}

/// The job's main process: init's child (init forks it once its root is built). Waits
/// up to `wait` for it to appear.
pub fn main_process_of(init: i32, wait: std::time::Duration) -> Option<i32> {
    let end = std::time::Instant::now() + wait;
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).ok()?;
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
        {
            return Some(pid);
        }
        if std::time::Instant::now() >= end {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
