//! One cgroup per job: one trait, a v2 backend and a v1 backend.
//!
//! Job cgroups are created only below agentd's own cgroup (per hierarchy on v1), or
//! below the parent an operator names with `--cgroup-parent`, the way a systemd service
//! with `Delegate=yes` would. Limits are written before the job's first process enters,
//! so no instruction of the job runs unlimited.

mod group;
mod layout;
mod v1;
mod v2;

pub use group::JobGroup;
pub use layout::{HostCgroups, Layout, join_cgroup};
pub use v1::CgroupV1;
pub use v2::CgroupV2;

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The limits a job's cgroup carries.
#[derive(Debug, Clone, Default)]
pub struct CgroupLimits {
    pub cpu: Option<f64>,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    /// The scheduling class's share of the CPU controller (sched::kernel).
    pub sched: crate::sched::kernel::CgroupSched,
}

/// What the kernel accounted for the job, read just before the cgroup is removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Usage {
    pub cpu_usec: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
    pub oom_kills: Option<u64>,
    pub throttled_usec: Option<u64>,
    /// Periods in which the CPU limit held the job back (cpu.stat nr_throttled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttled_periods: Option<u64>,
    /// Memory in use at the time of reading (0 once the job has ended).
    pub memory_bytes: Option<u64>,
    /// Processes and threads at the time of reading.
    pub pids: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error("the {controller} controller is not available {place}; {hint}")]
    MissingController {
        controller: &'static str,
        place: String,
        hint: String,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--cgroup-parent {0}: {1}")]
    Parent(String, String),
}

impl CgroupError {
    /// The `--allow-degraded` feature name that would let the job run without this.
    pub fn feature(&self) -> Option<String> {
        match self {
            CgroupError::MissingController { controller, .. } => {
                Some(format!("cgroup-{controller}"))
            }
            _ => None,
        }
    }
}

pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A job's cgroup, whatever the hierarchy. Created by [`create_job_cgroup`]; the
/// supervisor (parent side) is the only caller of every method.
pub trait JobCgroup: Send + Sync {
    /// "v2", "v1" or "v1+v2" (hybrid: v1 controllers, v2 core files).
    fn version(&self) -> &'static str;
    /// A cgroup2 directory fd for clone3(CLONE_INTO_CGROUP), if there is a v2 part.
    fn clone_into_fd(&self) -> Option<RawFd>;
    /// Moves `pid` into every hierarchy CLONE_INTO_CGROUP did not place it in. Called
    /// while the child waits, before it runs any job code.
    fn attach(&self, pid: i32) -> Result<(), CgroupError>;
    /// Stops every task of the job (cgroup.freeze, or freezer.state on legacy v1) and
    /// waits until the kernel says it is frozen.
    fn freeze(&self) -> Result<(), CgroupError>;
    fn thaw(&self) -> Result<(), CgroupError>;
    /// SIGKILLs every task, forks racing with it included.
    fn kill(&self) -> Result<(), CgroupError>;
    /// Whether any task is still in the cgroup.
    fn populated(&self) -> bool;
    fn usage(&self) -> Usage;
    /// The control files written and their values, for the job's report.
    fn applied(&self) -> Vec<(String, String)>;
    /// Every directory created, for reports and leak checks.
    fn dirs(&self) -> Vec<PathBuf>;
    /// Removes the cgroup directories; kills stragglers first. Idempotent.
    fn remove(&mut self) -> Result<(), CgroupError>;
    /// The cgroup outlives this handle (another process manages it now): dropping the
    /// handle closes its descriptors and leaves the cgroup and its tasks alone.
    fn disown(&mut self);
}

/// Which controllers a job needs, given its limits: cpu, memory and pids only when a
/// limit asks for them. Accounting files are read wherever they exist.
pub fn required_controllers(limits: &CgroupLimits) -> Vec<&'static str> {
    let mut needed = Vec::new();
    if limits.cpu.is_some() || !limits.sched.is_empty() {
        needed.push("cpu");
    }
    if limits.memory.is_some() {
        needed.push("memory");
    }
    if limits.pids.is_some() {
        needed.push("pids");
    }
    needed
}

/// Creates the job's cgroup named `name` with `limits` applied. A controller listed in
/// `skip` (an allowed degradation) is not required and its limit is not applied.
/// On error nothing is left behind.
pub fn create_job_cgroup(
    host: &HostCgroups,
    parent: Option<&str>,
    name: &str,
    limits: &CgroupLimits,
    skip: &[&str],
) -> Result<Box<dyn JobCgroup>, CgroupError> {
    let mut limits = limits.clone();
    if skip.contains(&"cpu") {
        limits.cpu = None;
    }
    if skip.contains(&"memory") {
        limits.memory = None;
    }
    if skip.contains(&"pids") {
        limits.pids = None;
    }
    match host.layout {
        Layout::Unified => Ok(Box::new(CgroupV2::create(host, parent, name, &limits)?)),
        Layout::Hybrid | Layout::Legacy => {
            Ok(Box::new(CgroupV1::create(host, parent, name, &limits)?))
        }
    }
}

/// Opens an existing job cgroup from the directories `JobCgroup::dirs` listed when it
/// was created: how a restarted daemon takes its running jobs back.
pub fn open_job_cgroup(
    host: &HostCgroups,
    dirs: &[PathBuf],
) -> Result<Box<dyn JobCgroup>, CgroupError> {
    match (host.layout, dirs) {
        (Layout::Unified, [dir]) => Ok(Box::new(CgroupV2::open(dir)?)),
        (Layout::Unified, _) => Err(CgroupError::Parent(
            format!("{dirs:?}"),
            "a job cgroup on a cgroup v2 host is one directory".into(),
        )),
        _ => Ok(Box::new(CgroupV1::open(host, dirs)?)),
    }
}

/// Controllers usable for job cgroups under this host's layout and parent, for
/// `agentd check` and for refusing jobs before anything is created.
pub fn usable_controllers(host: &HostCgroups, parent: Option<&str>) -> Vec<String> {
    match host.layout {
        Layout::Unified => v2::usable_controllers(host, parent),
        _ => host.v1.iter().flat_map(|h| h.controllers.clone()).collect(),
    }
}

/// Removes `dir`, retrying while the kernel still finishes exiting tasks (EBUSY).
pub(crate) fn rmdir_patiently(dir: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && start.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_micros(500));
            }
            Err(e) => {
                return Err(CgroupError::Io {
                    action: "remove",
                    path: dir.to_path_buf(),
                    source: e,
                });
            }
        }
    }
}

pub(crate) fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_err("write", path))
}

/// Reads "key value" lines (cpu.stat, memory.events, memory.oom_control).
pub(crate) fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

pub(crate) fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The cgroup parent directory for one hierarchy: the operator's `--cgroup-parent`
/// (a cgroup path such as "/agentd.slice", relative to the hierarchy's mount) or this
/// process's own cgroup.
pub(crate) fn parent_dir(
    mount: &Path,
    own: &str,
    parent: Option<&str>,
) -> Result<PathBuf, CgroupError> {
    match parent {
        None => Ok(layout::join_cgroup(mount, own)),
        // "./NAME": below this process's own cgroup in each hierarchy (the daemon's group
        // of job cgroups when no parent was given; own cgroups differ per v1 hierarchy).
        Some(p) if p.starts_with("./") => {
            let rel = &p[2..];
            if rel.is_empty() || rel.split('/').any(|c| c.is_empty() || c == "..") {
                return Err(CgroupError::Parent(
                    p.into(),
                    "expected ./NAME below agentd's own cgroup".into(),
                ));
            }
            let dir = layout::join_cgroup(mount, own).join(rel);
            if !dir.is_dir() {
                return Err(CgroupError::Parent(
                    p.into(),
                    format!("{} does not exist", dir.display()),
                ));
            }
            Ok(dir)
        }
        Some(p) => {
            if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(CgroupError::Parent(
                    p.into(),
                    "expected an absolute cgroup path like /agentd.slice".into(),
                ));
            }
            let dir = layout::join_cgroup(mount, p);
            if !dir.is_dir() {
                return Err(CgroupError::Parent(
                    p.into(),
                    format!("{} does not exist", dir.display()),
                ));
            }
            Ok(dir)
        }
    }
}

/// The directories job cgroups are created in, in every hierarchy.
pub fn parent_dirs(host: &HostCgroups, parent: Option<&str>) -> Vec<PathBuf> {
    let v1 = host
        .v1
        .iter()
        .filter_map(|h| parent_dir(&h.mount, &h.own, parent).ok());
    let v2 = host
        .v2
        .iter()
        .filter_map(|t| parent_dir(&t.mount, &t.own, parent).ok());
    v1.chain(v2).collect()
}

/// Removes cgroup directories a dead run left: kills whatever is still inside (v2
/// cgroup.kill, else SIGKILL to each listed pid), then removes them.
pub fn remove_stale(dirs: &[PathBuf]) {
    for dir in dirs {
        if !dir.is_dir() {
            continue;
        }
        if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
            for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.parse::<i32>().ok())
            {
                // SAFETY: kill(2) with a pid listed in the dead job's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = rmdir_patiently(dir);
    }
}
