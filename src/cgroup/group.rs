//! The daemon's group of job cgroups: one cgroup (per hierarchy) that every job cgroup
//! of an `agentd serve` sits below and that carries the supervisor's CPU budget, so the
//! jobs' weights divide the budget and what is left over stays with the control plane
//! and the host however hard every job spins.
//!
//!   <parent>/<name>/agentd-<job>     parent: --cgroup-parent, the systemd service
//!                                    cgroup, or the daemon's own cgroup
//!
//! The budget is cpu.max (v2) or cpu.cfs_quota_us/cfs_period_us (v1) on the group.
//! Where the cpu controller is not usable below the parent, the group is made without
//! it and `budget_enforced` says so (the job cgroups then cannot carry cpu limits
//! either; job creation refuses those as before).

use super::v2::{CPU_PERIOD_USEC, enable_controllers};
use super::{CgroupError, HostCgroups, Layout, io_err, parent_dir, write_file};
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct JobGroup {
    /// What job cgroups are created below, as a cgroup parent (`parent_dir` form).
    pub parent: String,
    /// The group's directories, one per hierarchy.
    pub dirs: Vec<PathBuf>,
    /// CPUs the group may use (cpu.max), if the cpu controller is usable there.
    pub budget_enforced: Option<f64>,
}

impl JobGroup {
    /// Makes (or reuses: a restarted daemon finds its jobs in it) `name` below `parent`
    /// in every hierarchy and writes `cpu_budget` (CPUs) on it.
    pub fn ensure(
        host: &HostCgroups,
        parent: Option<&str>,
        name: &str,
        cpu_budget: f64,
    ) -> Result<JobGroup, CgroupError> {
        let quota = ((cpu_budget * CPU_PERIOD_USEC as f64) as u64).max(1000);
        let mut dirs = Vec::new();
        let mut budget_enforced = None;
        for h in &host.v1 {
            // Only the hierarchies job cgroups are made in (v1::wanted).
            if !h
                .controllers
                .iter()
                .any(|c| ["cpu", "cpuacct", "memory", "pids", "freezer"].contains(&c.as_str()))
            {
                continue;
            }
            let dir = parent_dir(&h.mount, &h.own, parent)?.join(name);
            mkdir(&dir)?;
            if h.controllers.iter().any(|c| c == "cpu") {
                write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_USEC.to_string())?;
                write_file(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                budget_enforced = Some(cpu_budget);
            }
            dirs.push(dir);
        }
        if let Some(tree) = &host.v2 {
            let base = parent_dir(&tree.mount, &tree.own, parent)?;
            let dir = base.join(name);
            if host.layout == Layout::Unified {
                // The controllers job cgroups may need, handed down to the group and
                // from it; only those the parent has (the rest stay refused per job).
                let available = std::fs::read_to_string(base.join("cgroup.controllers"))
                    .map_err(io_err("read", &base))?;
                let wanted: Vec<&'static str> = ["cpu", "memory", "pids"]
                    .into_iter()
                    .filter(|c| available.split_whitespace().any(|a| a == *c))
                    .collect();
                enable_controllers(&base, &wanted)?;
                mkdir(&dir)?;
                enable_controllers(&dir, &wanted)?;
                if wanted.contains(&"cpu") {
                    write_file(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_USEC}"))?;
                    budget_enforced = Some(cpu_budget);
                }
            } else {
                mkdir(&dir)?;
            }
            dirs.push(dir);
        }
        let parent = match parent {
            Some(p) => format!("{}/{name}", p.trim_end_matches('/')),
            None => format!("./{name}"),
        };
        Ok(JobGroup {
            parent,
            dirs,
            budget_enforced,
        })
    }

    /// Removes the group where it is empty (at a graceful stop with no jobs left; a
    /// group that still holds jobs stays for the next daemon).
    pub fn remove_if_empty(&self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn mkdir(dir: &std::path::Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("create", dir)(e)),
    }
}
