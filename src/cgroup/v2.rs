//! cgroup v2 backend: cpu.max, memory.max, memory.swap.max, pids.max, cgroup.kill,
//! cgroup.freeze with cgroup.events, memory.events, memory.peak. Also used for the core
//! files (kill, freeze, events, CLONE_INTO_CGROUP) of a hybrid host's cgroup2 tree.

use super::{
    CgroupError, CgroupLimits, HostCgroups, JobCgroup, Usage, io_err, parent_dir, read_keyed,
    read_u64, rmdir_patiently, write_file,
};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The period cpu.max quotas are expressed in (the kernel's default, 100 ms).
pub const CPU_PERIOD_USEC: u64 = 100_000;

/// One cgroup2 directory.
#[derive(Debug)]
pub struct CgroupV2 {
    dir: PathBuf,
    /// Opened O_DIRECTORY for CLONE_INTO_CGROUP.
    fd: File,
    applied: Vec<(String, String)>,
    removed: bool,
    /// See `JobCgroup::disown`.
    disowned: bool,
}

pub(super) fn usable_controllers(host: &HostCgroups, parent: Option<&str>) -> Vec<String> {
    let Some(tree) = &host.v2 else {
        return Vec::new();
    };
    let Ok(dir) = parent_dir(&tree.mount, &tree.own, parent) else {
        return Vec::new();
    };
    std::fs::read_to_string(dir.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

impl CgroupV2 {
    /// Creates `name` below the parent with `limits`. Pure v2 host.
    pub fn create(
        host: &HostCgroups,
        parent: Option<&str>,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<Self, CgroupError> {
        let tree = host
            .v2
            .as_ref()
            .ok_or(super::layout::LayoutError::NoCgroups)?;
        let parent = parent_dir(&tree.mount, &tree.own, parent)?;
        let needed = super::required_controllers(limits);
        enable_controllers(&parent, &needed)?;
        let mut cg = Self::mkdir(&parent.join(name))?;
        if let Err(e) = cg.apply(limits) {
            let _ = cg.remove_dir();
            return Err(e);
        }
        Ok(cg)
    }

    /// Opens a job cgroup that exists already (a job adopted after a daemon restart).
    pub fn open(dir: &Path) -> Result<Self, CgroupError> {
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .map_err(io_err("open", dir))?;
        Ok(CgroupV2 {
            dir: dir.to_path_buf(),
            fd,
            applied: Vec::new(),
            removed: false,
            disowned: false,
        })
    }

    /// Creates a bare directory (hybrid hosts: core files only, no controllers).
    pub fn mkdir(dir: &Path) -> Result<Self, CgroupError> {
        std::fs::create_dir(dir).map_err(io_err("create", dir))?;
        let fd = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
        {
            Ok(fd) => fd,
            Err(e) => {
                let _ = std::fs::remove_dir(dir);
                return Err(io_err("open", dir)(e));
            }
        };
        Ok(CgroupV2 {
            dir: dir.to_path_buf(),
            fd,
            applied: Vec::new(),
            removed: false,
            disowned: false,
        })
    }

    fn set(&mut self, file: &str, value: String) -> Result<(), CgroupError> {
        write_file(&self.dir.join(file), &value)?;
        self.applied.push((file.to_owned(), value));
        Ok(())
    }

    fn apply(&mut self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let cpu_limit = limits.cpu.map(|cpu| {
            (
                ((cpu * CPU_PERIOD_USEC as f64) as u64).max(1000),
                CPU_PERIOD_USEC,
            )
        });
        if let Some((quota, period)) = limits.sched.cpu_max(cpu_limit) {
            self.set("cpu.max", format!("{quota} {period}"))?;
        }
        if limits.sched.idle && self.dir.join("cpu.idle").exists() {
            self.set("cpu.idle", "1".into())?;
        } else if let Some(w) = limits.sched.cpu_weight() {
            self.set("cpu.weight", w.to_string())?;
        }
        if let Some(mem) = limits.memory {
            self.set("memory.max", mem.to_string())?;
            // The limit is on memory, not memory that may be pushed to swap.
            if self.dir.join("memory.swap.max").exists() {
                self.set("memory.swap.max", "0".into())?;
            }
        }
        if let Some(pids) = limits.pids {
            self.set("pids.max", pids.to_string())?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn applied_files(&self) -> &[(String, String)] {
        &self.applied
    }

    pub fn write_procs(&self, pid: i32) -> Result<(), CgroupError> {
        write_file(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    pub fn is_populated(&self) -> bool {
        read_keyed(&self.dir.join("cgroup.events"), "populated").is_some_and(|v| v == 1)
    }

    pub fn freeze_and_wait(&self, freeze: bool) -> Result<(), CgroupError> {
        write_file(
            &self.dir.join("cgroup.freeze"),
            if freeze { "1" } else { "0" },
        )?;
        let want = u64::from(freeze);
        let start = Instant::now();
        // cgroup.events changes raise an inotify event; a short poll is enough for the
        // one-shot runner and avoids an extra fd.
        while read_keyed(&self.dir.join("cgroup.events"), "frozen") != Some(want) {
            if start.elapsed() > Duration::from_secs(5) {
                return Err(CgroupError::Io {
                    action: "wait for the freezer on",
                    path: self.dir.clone(),
                    source: std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    pub fn kill_all(&self) -> Result<(), CgroupError> {
        write_file(&self.dir.join("cgroup.kill"), "1")
    }

    pub fn core_usage(&self, usage: &mut Usage) {
        let stat = self.dir.join("cpu.stat");
        usage.cpu_usec = usage.cpu_usec.or_else(|| read_keyed(&stat, "usage_usec"));
        usage.throttled_usec = usage
            .throttled_usec
            .or_else(|| read_keyed(&stat, "throttled_usec"));
        usage.throttled_periods = usage
            .throttled_periods
            .or_else(|| read_keyed(&stat, "nr_throttled"));
        usage.peak_memory_bytes = usage
            .peak_memory_bytes
            .or_else(|| read_u64(&self.dir.join("memory.peak")));
        usage.oom_kills = usage
            .oom_kills
            .or_else(|| read_keyed(&self.dir.join("memory.events"), "oom_kill"));
        usage.memory_bytes = usage
            .memory_bytes
            .or_else(|| read_u64(&self.dir.join("memory.current")));
        usage.pids = usage
            .pids
            .or_else(|| read_u64(&self.dir.join("pids.current")));
    }

    pub fn remove_dir(&mut self) -> Result<(), CgroupError> {
        if self.removed || self.disowned {
            return Ok(());
        }
        if self.is_populated() {
            let _ = self.kill_all();
        }
        rmdir_patiently(&self.dir)?;
        self.removed = true;
        Ok(())
    }
}

/// Makes sure the parent hands `needed` controllers down to its children.
pub(super) fn enable_controllers(
    parent: &Path,
    needed: &[&'static str],
) -> Result<(), CgroupError> {
    let available = std::fs::read_to_string(parent.join("cgroup.controllers"))
        .map_err(io_err("read", parent))?;
    let enabled = std::fs::read_to_string(parent.join("cgroup.subtree_control"))
        .map_err(io_err("read", parent))?;
    for controller in needed {
        if enabled.split_whitespace().any(|c| c == *controller) {
            continue;
        }
        if !available.split_whitespace().any(|c| c == *controller) {
            return Err(CgroupError::MissingController {
                controller,
                place: format!("in {} (not delegated to it)", parent.display()),
                hint: "delegate it (systemd: Delegate=yes or Delegate=cpu memory pids), point --cgroup-parent at a cgroup that has it, or pass --allow-degraded cgroup-".to_owned() + controller,
            });
        }
        let file = parent.join("cgroup.subtree_control");
        if let Err(e) = std::fs::write(&file, format!("+{controller}")) {
            let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                "that cgroup holds processes, and cgroup v2 lets only cgroups without processes hand controllers down; run agentd as a service with Delegate=yes or pass --cgroup-parent".to_owned()
            } else {
                format!("enabling it failed: {e}")
            };
            return Err(CgroupError::MissingController {
                controller,
                place: format!("for children of {}", parent.display()),
                hint,
            });
        }
    }
    Ok(())
}

impl JobCgroup for CgroupV2 {
    fn version(&self) -> &'static str {
        "v2"
    }
    fn clone_into_fd(&self) -> Option<RawFd> {
        Some(self.raw_fd())
    }
    fn attach(&self, _pid: i32) -> Result<(), CgroupError> {
        Ok(()) // born inside it by CLONE_INTO_CGROUP
    }
    fn freeze(&self) -> Result<(), CgroupError> {
        self.freeze_and_wait(true)
    }
    fn thaw(&self) -> Result<(), CgroupError> {
        self.freeze_and_wait(false)
    }
    fn kill(&self) -> Result<(), CgroupError> {
        self.kill_all()
    }
    fn populated(&self) -> bool {
        self.is_populated()
    }
    fn usage(&self) -> Usage {
        let mut u = Usage::default();
        self.core_usage(&mut u);
        u
    }
    fn applied(&self) -> Vec<(String, String)> {
        self.applied.clone()
    }
    fn dirs(&self) -> Vec<PathBuf> {
        vec![self.dir.clone()]
    }
    fn remove(&mut self) -> Result<(), CgroupError> {
        self.remove_dir()
    }

    fn disown(&mut self) {
        self.disowned = true;
    }
}

impl Drop for CgroupV2 {
    fn drop(&mut self) {
        let _ = self.remove_dir();
    }
}
