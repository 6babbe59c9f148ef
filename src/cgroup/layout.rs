//! Where the host's cgroup hierarchies are mounted and where agentd sits in each.
//!
//! Read once per run from /proc/self/mountinfo and /proc/self/cgroup. On v1 every
//! controller can sit at a different path (this process may be in memory:/a/b and
//! cpu:/), so positions are kept per hierarchy, never assumed equal.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Pure cgroup v2: one tree at /sys/fs/cgroup.
    Unified,
    /// v1 controller hierarchies plus a cgroup2 tree (usually without controllers).
    Hybrid,
    /// v1 only.
    Legacy,
}

/// One mounted v1 hierarchy and this process's cgroup in it.
#[derive(Debug, Clone)]
pub struct V1Hierarchy {
    /// Controllers bound to this hierarchy ("cpu", "cpuacct", …).
    pub controllers: Vec<String>,
    pub mount: PathBuf,
    /// This process's cgroup, relative to the mount ("/" or "/a/b").
    pub own: String,
}

impl V1Hierarchy {
    pub fn own_dir(&self) -> PathBuf {
        join_cgroup(&self.mount, &self.own)
    }
}

#[derive(Debug, Clone)]
pub struct V2Tree {
    pub mount: PathBuf,
    pub own: String,
}

impl V2Tree {
    pub fn own_dir(&self) -> PathBuf {
        join_cgroup(&self.mount, &self.own)
    }
}

#[derive(Debug, Clone)]
pub struct HostCgroups {
    pub layout: Layout,
    pub v2: Option<V2Tree>,
    /// v1 hierarchies with at least one resource controller (name=systemd is skipped).
    pub v1: Vec<V1Hierarchy>,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// cannot read {0}: {1}
    #[error("cannot read {0}: {1}")]
    Read(&'static str, std::io::Error),
    #[error("no cgroup hierarchy is mounted (looked in /proc/self/mountinfo)")]
    NoCgroups,
}

pub fn join_cgroup(mount: &Path, rel: &str) -> PathBuf {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

impl HostCgroups {
    /// `detect`, once per process: a supervisor validates many jobs, and neither the
    /// host's cgroup mounts nor its own cgroup change under it (the daemon moves into
    /// its leaf before it validates any job).
    pub fn detect_cached() -> Result<Self, LayoutError> {
        static CACHE: std::sync::OnceLock<HostCgroups> = std::sync::OnceLock::new();
        if let Some(h) = CACHE.get() {
            return Ok(h.clone());
        }
        let h = Self::detect()?;
        Ok(CACHE.get_or_init(|| h).clone())
    }

    pub fn detect() -> Result<Self, LayoutError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| LayoutError::Read("/proc/self/mountinfo", e))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| LayoutError::Read("/proc/self/cgroup", e))?;
        Self::from_texts(&mountinfo, &own)
    }

    /// Parses the two proc files; split out so it can be tested on recorded texts.
    pub fn from_texts(mountinfo: &str, own_cgroups: &str) -> Result<Self, LayoutError> {
        let mut v2_mount = None;
        let mut v1_mounts: Vec<(Vec<String>, PathBuf)> = Vec::new();
        for line in mountinfo.lines() {
            // "36 25 0:31 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu"
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split(' ').nth(4).map(unescape_octal);
            let mut right = right.split(' ');
            let (fstype, _source, options) = (right.next(), right.next(), right.next());
            let Some(mount_point) = mount_point else {
                continue;
            };
            // Only mounts of the hierarchy root are usable positions.
            if left.split(' ').nth(3) != Some("/") {
                continue;
            }
            match fstype {
                Some("cgroup2") if v2_mount.is_none() => {
                    v2_mount = Some(PathBuf::from(mount_point))
                }
                Some("cgroup") => {
                    let controllers: Vec<String> = options
                        .unwrap_or("")
                        .split(',')
                        .filter(|o| is_v1_controller(o))
                        .map(str::to_owned)
                        .collect();
                    if !controllers.is_empty() && !v1_mounts.iter().any(|(c, _)| *c == controllers)
                    {
                        v1_mounts.push((controllers, PathBuf::from(mount_point)));
                    }
                }
                _ => {}
            }
        }

        let mut v2 = None;
        let mut v1 = Vec::new();
        for line in own_cgroups.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if ctrls.is_empty() {
                if let Some(mount) = &v2_mount {
                    v2 = Some(V2Tree {
                        mount: mount.clone(),
                        own: path.to_owned(),
                    });
                }
                continue;
            }
            let mut ctrls: Vec<String> = ctrls
                .split(',')
                .filter(|c| is_v1_controller(c))
                .map(str::to_owned)
                .collect();
            ctrls.sort();
            for (mount_ctrls, mount) in &v1_mounts {
                let mut sorted = mount_ctrls.clone();
                sorted.sort();
                if sorted == ctrls {
                    v1.push(V1Hierarchy {
                        controllers: mount_ctrls.clone(),
                        mount: mount.clone(),
                        own: path.to_owned(),
                    });
                }
            }
        }
        let layout = match (v1.is_empty(), v2.is_some()) {
            (true, true) => Layout::Unified,
            (false, true) => Layout::Hybrid,
            (false, false) => Layout::Legacy,
            (true, false) => return Err(LayoutError::NoCgroups),
        };
        Ok(HostCgroups { layout, v2, v1 })
    }

    /// The v1 hierarchy carrying `controller`, if it is mounted.
    pub fn v1_for(&self, controller: &str) -> Option<&V1Hierarchy> {
        self.v1
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == controller))
    }
}

fn is_v1_controller(name: &str) -> bool {
    matches!(
        name,
        "cpu"
            | "cpuacct"
            | "cpuset"
            | "memory"
            | "pids"
            | "freezer"
            | "blkio"
            | "devices"
            | "net_cls"
            | "net_prio"
            | "perf_event"
            | "hugetlb"
            | "rdma"
            | "misc"
    )
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
30 25 0:27 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:28 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
33 30 0:30 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
34 30 0:31 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct
35 30 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
36 30 0:33 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
37 30 0:34 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
";
    const HYBRID_OWN: &str =
        "9:name=systemd:/\n8:pids:/\n4:memory:/a/b\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn hybrid_per_controller_positions() {
        let h = HostCgroups::from_texts(HYBRID_MOUNTS, HYBRID_OWN).unwrap();
        assert_eq!(h.layout, Layout::Hybrid);
        assert_eq!(
            h.v1_for("memory").unwrap().own_dir(),
            Path::new("/sys/fs/cgroup/memory/a/b")
        );
        assert_eq!(
            h.v1_for("cpu").unwrap().own_dir(),
            Path::new("/sys/fs/cgroup/cpu")
        );
        assert!(h.v1_for("freezer").is_none());
        assert_eq!(h.v2.unwrap().own_dir(), Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn unified() {
        let m = "30 25 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let h = HostCgroups::from_texts(m, "0::/system.slice/agentd.service\n").unwrap();
        assert_eq!(h.layout, Layout::Unified);
        assert_eq!(
            h.v2.unwrap().own_dir(),
            Path::new("/sys/fs/cgroup/system.slice/agentd.service")
        );
    }

    #[test]
    fn co_mounted_v1_controllers() {
        let m = "33 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let h = HostCgroups::from_texts(m, "3:cpuacct,cpu:/x\n").unwrap();
        assert_eq!(h.layout, Layout::Legacy);
        assert_eq!(
            h.v1_for("cpuacct").unwrap().own_dir(),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/x")
        );
    }
}
