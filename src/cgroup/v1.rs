//! cgroup v1 backend: cpu.cfs_quota_us/cfs_period_us, memory.limit_in_bytes (and memsw),
//! memory.oom_control, pids.max, freezer.state; kill = freeze, signal every pid, thaw.
//!
//! On a hybrid host the job also gets a directory in the cgroup2 tree, for the core files
//! v2 has and v1 lacks: it is born there by CLONE_INTO_CGROUP, and cgroup.kill,
//! cgroup.freeze and cgroup.events work on it without any controller.

use super::v2::{CPU_PERIOD_USEC, CgroupV2};
use super::{
    CgroupError, CgroupLimits, HostCgroups, JobCgroup, Layout, Usage, io_err, parent_dir,
    read_keyed, read_u64, rmdir_patiently, write_file,
};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct V1Dir {
    controllers: Vec<String>,
    dir: PathBuf,
    removed: bool,
}

#[derive(Debug)]
pub struct CgroupV1 {
    dirs: Vec<V1Dir>,
    /// The cgroup2 part on hybrid hosts.
    unified: Option<CgroupV2>,
    applied: Vec<(String, String)>,
    /// See `JobCgroup::disown`.
    disowned: bool,
}

/// Hierarchies a job gets a directory in: the ones its limits need, memory always (peak
/// and OOM kills for the report), and without a cgroup2 tree, cpuacct for CPU time and
/// the freezer for kill and freeze. (On hybrid hosts the cgroup2 directory's cpu.stat
/// counts CPU time, so cpuacct would only cost another migration.)
fn wanted(controller: &str, limits: &CgroupLimits, layout: Layout) -> bool {
    match controller {
        "cpu" => limits.cpu.is_some(),
        "pids" => limits.pids.is_some(),
        "memory" => true,
        "cpuacct" | "freezer" => layout == Layout::Legacy,
        _ => false,
    }
}

impl CgroupV1 {
    pub fn create(
        host: &HostCgroups,
        parent: Option<&str>,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<Self, CgroupError> {
        for controller in super::required_controllers(limits) {
            if host.v1_for(controller).is_none() {
                return Err(CgroupError::MissingController {
                    controller,
                    place: "on this host (no v1 hierarchy has it mounted)".into(),
                    hint: format!("mount it, or pass --allow-degraded cgroup-{controller}"),
                });
            }
        }
        let mut cg = CgroupV1 {
            dirs: Vec::new(),
            unified: None,
            applied: Vec::new(),
            disowned: false,
        };
        // Build step by step; on any error `cg` drops and removes what exists so far.
        for h in &host.v1 {
            if !h.controllers.iter().any(|c| wanted(c, limits, host.layout)) {
                continue;
            }
            let dir = parent_dir(&h.mount, &h.own, parent)?.join(name);
            std::fs::create_dir(&dir).map_err(io_err("create", &dir))?;
            cg.dirs.push(V1Dir {
                controllers: h.controllers.clone(),
                dir,
                removed: false,
            });
        }
        if host.layout == Layout::Hybrid
            && let Some(tree) = &host.v2
        {
            let dir = parent_dir(&tree.mount, &tree.own, parent)?.join(name);
            cg.unified = Some(CgroupV2::mkdir(&dir)?);
        }
        cg.apply(limits)?;
        Ok(cg)
    }

    /// Opens a job cgroup that exists already, from its directories (as `dirs()` listed
    /// them): each belongs to the hierarchy mounted above it.
    pub fn open(host: &HostCgroups, dirs: &[PathBuf]) -> Result<Self, CgroupError> {
        let mut cg = CgroupV1 {
            dirs: Vec::new(),
            unified: None,
            applied: Vec::new(),
            disowned: false,
        };
        for dir in dirs {
            if host.v2.as_ref().is_some_and(|t| dir.starts_with(&t.mount)) {
                cg.unified = Some(CgroupV2::open(dir)?);
            } else if let Some(h) = host.v1.iter().find(|h| dir.starts_with(&h.mount)) {
                if !dir.is_dir() {
                    return Err(io_err("open", dir)(std::io::ErrorKind::NotFound.into()));
                }
                cg.dirs.push(V1Dir {
                    controllers: h.controllers.clone(),
                    dir: dir.clone(),
                    removed: false,
                });
            } else {
                return Err(CgroupError::Parent(
                    dir.display().to_string(),
                    "is in no cgroup hierarchy of this host".into(),
                ));
            }
        }
        Ok(cg)
    }

    fn dir_of(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|d| d.controllers.iter().any(|c| c == controller))
            .map(|d| d.dir.as_path())
    }

    fn set(&mut self, controller: &str, file: &str, value: String) -> Result<(), CgroupError> {
        let dir = self
            .dir_of(controller)
            .expect("hierarchy checked at creation")
            .to_path_buf();
        write_file(&dir.join(file), &value)?;
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
            self.set("cpu", "cpu.cfs_period_us", period.to_string())?;
            self.set("cpu", "cpu.cfs_quota_us", quota.to_string())?;
        }
        if let Some(shares) = limits.sched.cpu_shares() {
            self.set("cpu", "cpu.shares", shares.to_string())?;
        }
        if let Some(mem) = limits.memory {
            self.set("memory", "memory.limit_in_bytes", mem.to_string())?;
            // With swap accounting, cap memory+swap too: the limit is on memory, not on
            // memory that may be pushed to swap.
            if self
                .dir_of("memory")
                .is_some_and(|d| d.join("memory.memsw.limit_in_bytes").exists())
            {
                self.set("memory", "memory.memsw.limit_in_bytes", mem.to_string())?;
            }
        }
        if let Some(pids) = limits.pids {
            self.set("pids", "pids.max", pids.to_string())?;
        }
        Ok(())
    }

    fn freezer_state(&self, state: &str) -> Result<(), CgroupError> {
        let dir = self
            .dir_of("freezer")
            .ok_or(CgroupError::MissingController {
                controller: "freezer",
                place: "on this host".into(),
                hint: "without a cgroup2 tree, freezing needs the v1 freezer hierarchy".into(),
            })?;
        let file = dir.join("freezer.state");
        write_file(&file, state)?;
        let start = Instant::now();
        while std::fs::read_to_string(&file)
            .map_err(io_err("read", &file))?
            .trim()
            != state
        {
            if start.elapsed() > Duration::from_secs(5) {
                return Err(CgroupError::Io {
                    action: "wait for",
                    path: file,
                    source: std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Every pid in any of the job's hierarchies.
    fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter(|d| !d.removed)
            .flat_map(|d| {
                std::fs::read_to_string(d.dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.parse().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl JobCgroup for CgroupV1 {
    fn disown(&mut self) {
        self.disown_all();
    }

    fn version(&self) -> &'static str {
        if self.unified.is_some() {
            "v1+v2"
        } else {
            "v1"
        }
    }

    fn clone_into_fd(&self) -> Option<RawFd> {
        self.unified.as_ref().map(CgroupV2::raw_fd)
    }

    fn attach(&self, pid: i32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write_file(&d.dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn freeze(&self) -> Result<(), CgroupError> {
        match &self.unified {
            Some(u) => u.freeze_and_wait(true),
            None => self.freezer_state("FROZEN"),
        }
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        match &self.unified {
            Some(u) => u.freeze_and_wait(false),
            None => self.freezer_state("THAWED"),
        }
    }

    fn kill(&self) -> Result<(), CgroupError> {
        if let Some(u) = &self.unified {
            return u.kill_all();
        }
        // v1 has no cgroup.kill: freeze so nothing forks while we list, kill every pid,
        // thaw so the kills are delivered.
        self.freezer_state("FROZEN")?;
        for pid in self.pids() {
            // SAFETY: kill(2) with a pid read from the job's own cgroup and a constant
            // signal; it touches no memory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.freezer_state("THAWED")
    }

    fn populated(&self) -> bool {
        match &self.unified {
            Some(u) => u.is_populated(),
            None => !self.pids().is_empty(),
        }
    }

    fn usage(&self) -> Usage {
        let mut u = Usage::default();
        if let Some(d) = self.dir_of("cpuacct") {
            u.cpu_usec = read_u64(&d.join("cpuacct.usage")).map(|ns| ns / 1000);
        }
        if let Some(d) = self.dir_of("cpu") {
            u.throttled_usec =
                read_keyed(&d.join("cpu.stat"), "throttled_time").map(|ns| ns / 1000);
            u.throttled_periods = read_keyed(&d.join("cpu.stat"), "nr_throttled");
        }
        if let Some(d) = self.dir_of("memory") {
            u.peak_memory_bytes = read_u64(&d.join("memory.max_usage_in_bytes"));
            u.oom_kills = read_keyed(&d.join("memory.oom_control"), "oom_kill");
            u.memory_bytes = read_u64(&d.join("memory.usage_in_bytes"));
        }
        if let Some(d) = self.dir_of("pids") {
            u.pids = read_u64(&d.join("pids.current"));
        }
        if let Some(unified) = &self.unified {
            unified.core_usage(&mut u);
        }
        u
    }

    fn applied(&self) -> Vec<(String, String)> {
        self.applied.clone()
    }

    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self.dirs.iter().map(|d| d.dir.clone()).collect();
        dirs.extend(self.unified.as_ref().map(|u| u.dir().to_path_buf()));
        dirs
    }

    fn remove(&mut self) -> Result<(), CgroupError> {
        if self.disowned {
            return Ok(());
        }
        if self.populated() {
            let _ = self.kill();
        }
        let mut first_error = None;
        for d in self.dirs.iter_mut().filter(|d| !d.removed) {
            match rmdir_patiently(&d.dir) {
                Ok(()) => d.removed = true,
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(u) = &mut self.unified
            && let Err(e) = u.remove_dir()
        {
            first_error = first_error.or(Some(e));
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl CgroupV1 {
    fn disown_all(&mut self) {
        self.disowned = true;
        if let Some(u) = &mut self.unified {
            u.disown();
        }
    }
}

impl Drop for CgroupV1 {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}
