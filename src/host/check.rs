//! `agentd check`: one probe per feature, as a table or JSON.

use crate::cgroup::{HostCgroups, usable_controllers};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct Probe {
    pub feature: &'static str,
    pub available: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub kernel: String,
    pub probes: Vec<Probe>,
}

fn probe(feature: &'static str, available: bool, detail: impl Into<String>) -> Probe {
    Probe {
        feature,
        available,
        detail: detail.into(),
    }
}

pub fn check_host(cgroup_parent: Option<&str>) -> CheckReport {
    let mut probes = Vec::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();

    match HostCgroups::detect() {
        Ok(host) => {
            let v1: Vec<String> = host
                .v1
                .iter()
                .map(|h| format!("{}:{}", h.controllers.join(","), h.own))
                .collect();
            let v2 = host
                .v2
                .as_ref()
                .map(|t| format!("{} at {}", t.own, t.mount.display()))
                .unwrap_or_else(|| "none".into());
            probes.push(probe(
                "cgroup layout",
                true,
                format!(
                    "{:?}; v2 tree: {v2}; v1: {}",
                    host.layout,
                    if v1.is_empty() {
                        "none".into()
                    } else {
                        v1.join(" ")
                    }
                )
                .to_lowercase(),
            ));
            let usable = usable_controllers(&host, cgroup_parent);
            for c in ["cpu", "memory", "pids"] {
                let ok = usable.iter().any(|u| u == c);
                probes.push(probe(
                    match c {
                        "cpu" => "cgroup cpu",
                        "memory" => "cgroup memory",
                        _ => "cgroup pids",
                    },
                    ok,
                    if ok {
                        "usable for job cgroups".to_owned()
                    } else {
                        "not delegated where job cgroups go (jobs with this limit are refused)"
                            .to_owned()
                    },
                ));
            }
            let core = host.v2.is_some();
            probes.push(probe(
                "cgroup kill/freeze",
                core || host.v1_for("freezer").is_some(),
                if core {
                    "cgroup.kill, cgroup.freeze (cgroup2)"
                } else {
                    "freezer.state (v1)"
                },
            ));
        }
        Err(e) => probes.push(probe("cgroup layout", false, e.to_string())),
    }

    let abi = super::landlock_abi();
    probes.push(probe(
        "landlock",
        abi > 0,
        if abi > 0 {
            format!("ABI {abi}{}", landlock_extras(abi))
        } else {
            "not enabled (boot with lsm=...,landlock)".into()
        },
    ));
    probes.push(probe(
        "seccomp filter",
        super::seccomp_filter_available(),
        "SECCOMP_SET_MODE_FILTER",
    ));

    let uffd = Path::new("/dev/userfaultfd").exists();
    let uffd_sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    probes.push(probe(
        "userfaultfd",
        uffd,
        format!(
            "/dev/userfaultfd {}; vm.unprivileged_userfaultfd={uffd_sysctl}",
            if uffd { "present" } else { "absent" }
        ),
    ));

    let (dl, dl_detail) = probe_sched_deadline();
    probes.push(probe("SCHED_DEADLINE", dl, dl_detail));
    let (slice, slice_detail) = probe_eevdf_slice();
    probes.push(probe("EEVDF custom slice", slice, slice_detail));

    let ns: Vec<&str> = ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup", "time"]
        .into_iter()
        .filter(|n| Path::new("/proc/self/ns").join(n).exists())
        .collect();
    let max_userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    probes.push(probe(
        "namespaces",
        ns.len() >= 7,
        format!("{}; max_user_namespaces={max_userns}", ns.join(" ")),
    ));

    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    probes.push(probe(
        "overlayfs",
        filesystems.lines().any(|l| l.ends_with("\toverlay")),
        "/proc/filesystems",
    ));
    let psi = std::fs::read_to_string("/proc/pressure/cpu").is_ok();
    probes.push(probe(
        "PSI",
        psi,
        if psi {
            "/proc/pressure/{cpu,memory,io}"
        } else {
            "absent (boot with psi=1)"
        },
    ));

    CheckReport { kernel, probes }
}

fn landlock_extras(abi: u32) -> String {
    let mut extras = Vec::new();
    if abi >= 4 {
        extras.push("tcp rules");
    }
    if abi >= 6 {
        extras.push("scoping");
    }
    if extras.is_empty() {
        String::new()
    } else {
        format!(" ({})", extras.join(", "))
    }
}

use crate::sched::attr::SchedAttr;

fn sched_setattr(attr: &SchedAttr) -> std::io::Result<()> {
    crate::sched::attr::sched_setattr(0, attr)
}

/// Tries SCHED_DEADLINE in a short-lived child, so this process keeps its policy.
fn probe_sched_deadline() -> (bool, String) {
    // SAFETY: fork in a single-threaded process; the child only makes syscalls and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let attr = SchedAttr {
            size: 48,
            policy: 6,
            runtime: 1_000_000,
            deadline: 10_000_000,
            period: 10_000_000,
            ..Default::default()
        };
        let code = match sched_setattr(&attr) {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(1).min(255),
        };
        // SAFETY: _exit in the forked child, no destructors needed.
        unsafe { libc::_exit(code) };
    }
    if pid < 0 {
        return (false, "fork failed".into());
    }
    let mut status = 0;
    // SAFETY: waiting for the child just forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let code = libc::WEXITSTATUS(status);
    if code == 0 {
        (true, "sched_setattr(SCHED_DEADLINE) accepted".into())
    } else {
        (
            false,
            format!(
                "sched_setattr(SCHED_DEADLINE): {}",
                std::io::Error::from_raw_os_error(code)
            ),
        )
    }
}

/// Sets a 1 ms EEVDF slice on this thread and reads it back from /proc (Linux ≥ 6.12).
fn probe_eevdf_slice() -> (bool, String) {
    let attr = SchedAttr {
        size: 48,
        policy: 0,
        runtime: 1_000_000,
        ..Default::default()
    };
    if let Err(e) = sched_setattr(&attr) {
        return (false, format!("sched_setattr: {e}"));
    }
    let sched = std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default();
    let slice = sched
        .lines()
        .find(|l| l.starts_with("se.slice"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().to_owned());
    let _ = sched_setattr(&SchedAttr {
        size: 48,
        ..Default::default()
    });
    match slice {
        Some(v) if v == "1000000" => (true, "sched_attr.sched_runtime sets se.slice".into()),
        Some(v) => (
            false,
            format!("se.slice reads {v} after asking for 1 ms (not honoured)"),
        ),
        None => (false, "se.slice not shown in /proc/PID/sched".into()),
    }
}
