//! What the job's root will contain, as a list of mount operations for the child
//! (`sandbox::MountOp`), computed here so the child only performs them. Order: the
//! policy's grants (parents first), /proc, /dev, /tmp, then the workspace (after /tmp, so
//! a workspace below /tmp is not hidden by the private one).

use crate::mount_api::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
use crate::sandbox::MountOp;
use crate::spec::{Access, PathGrant};
use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The device nodes every job gets, bound from the host's /dev.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn c(bytes: &[u8]) -> CString {
    CString::new(bytes).expect("paths and options checked for NUL bytes during validation")
}

/// `/usr/bin` as "./usr/bin", relative to the new root the child works in.
fn rel(path: &Path) -> CString {
    let mut bytes = b"./".to_vec();
    bytes.extend_from_slice(
        path.strip_prefix("/")
            .unwrap_or(path)
            .as_os_str()
            .as_bytes(),
    );
    c(&bytes)
}

struct Builder {
    ops: Vec<MountOp>,
    /// Directories known to exist in the new root.
    made: BTreeSet<PathBuf>,
}

impl Builder {
    fn mkdir(&mut self, path: &Path) {
        if self.made.insert(path.to_path_buf()) {
            self.ops.push(MountOp::Mkdir(rel(path)));
        }
    }

    /// Every ancestor of `path` below "/", outermost first.
    fn parents(&mut self, path: &Path) {
        let mut ancestors: Vec<&Path> = path
            .ancestors()
            .skip(1)
            .filter(|a| *a != Path::new("/"))
            .collect();
        ancestors.reverse();
        for a in ancestors {
            self.mkdir(a);
        }
    }

    /// A mount point of the same kind (directory or file) as `host`.
    fn mount_point(&mut self, path: &Path, is_dir: bool) {
        self.parents(path);
        if is_dir {
            self.mkdir(path);
        } else {
            self.ops.push(MountOp::Touch(rel(path)));
        }
    }

    fn mount(&mut self, fstype: &str, path: &Path, flags: libc::c_ulong, data: &str) {
        self.mkdir(path);
        self.ops.push(MountOp::Mount {
            fstype: c(fstype.as_bytes()),
            dst: rel(path),
            flags,
            data: c(data.as_bytes()),
        });
    }
}

/// Builds the operations. Fails (with the path) when a granted path cannot be inspected.
pub fn mount_ops(
    grants: &[PathGrant],
    workspace: Option<&Path>,
    tmp_size: Option<u64>,
    job_socket_dir: Option<&Path>,
    resolv_conf: Option<&Path>,
) -> Result<Vec<MountOp>, String> {
    let mut b = Builder {
        ops: Vec::new(),
        made: BTreeSet::new(),
    };

    // Policy grants, parents first (grants are sorted by path). Symlinks are followed
    // (/bin -> usr/bin): the job sees the target's content at the granted path.
    for g in grants {
        let meta = std::fs::metadata(&g.path).map_err(|e| format!("{}: {e}", g.path.display()))?;
        b.mount_point(&g.path, meta.is_dir());
        let writable = g.access == Access::Write;
        b.ops.push(MountOp::Bind {
            src: c(g.path.as_os_str().as_bytes()),
            dst: rel(&g.path),
            attrs: MOUNT_ATTR_NOSUID
                | MOUNT_ATTR_NODEV
                | if writable { 0 } else { MOUNT_ATTR_RDONLY },
            recursive: true,
        });
    }

    // The resolver configuration the network mode needs (`proxy`: agentd's resolver on
    // the job's loopback; `host`: the host's), over any the policy granted.
    if let Some(src) = resolv_conf {
        let dst = Path::new("/etc/resolv.conf");
        b.mount_point(dst, false);
        b.ops.push(MountOp::Bind {
            src: c(src.as_os_str().as_bytes()),
            dst: rel(dst),
            attrs: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_RDONLY,
            recursive: false,
        });
    }

    // A fresh /proc for the job's pid namespace: it shows only the job's processes.
    b.mount(
        "proc",
        Path::new("/proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    );

    // A minimal /dev: the harmless character devices, a private devpts, /dev/shm; then
    // read-only, so nothing new appears in /dev itself.
    b.mount(
        "tmpfs",
        Path::new("/dev"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "mode=0755",
    );
    for name in DEVICES {
        let path = Path::new("/dev").join(name);
        b.ops.push(MountOp::Touch(rel(&path)));
        b.ops.push(MountOp::Bind {
            src: c(path.as_os_str().as_bytes()),
            dst: rel(&path),
            attrs: MOUNT_ATTR_NOSUID,
            recursive: false,
        });
    }
    b.mount(
        "devpts",
        Path::new("/dev/pts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    );
    b.ops.push(MountOp::Symlink {
        target: c(b"pts/ptmx"),
        link: c(b"./dev/ptmx"),
    });
    b.mount(
        "tmpfs",
        Path::new("/dev/shm"),
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        b.ops.push(MountOp::Symlink {
            target: c(target.as_bytes()),
            link: rel(&Path::new("/dev").join(link)),
        });
    }
    b.ops.push(MountOp::SetAttrs {
        path: c(b"./dev"),
        attrs: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
        recursive: false,
    });

    // A private /tmp, gone with the job; as large as the job's memory limit at most.
    let tmp_opts = tmp_size.map_or_else(
        || "mode=1777".to_owned(),
        |bytes| format!("mode=1777,size={bytes}"),
    );
    b.mount(
        "tmpfs",
        Path::new("/tmp"),
        libc::MS_NOSUID | libc::MS_NODEV,
        &tmp_opts,
    );

    // The daemon's jobs: their socket to the daemon, at /run/agentd (read-only: the job
    // connects to the socket, it cannot replace it).
    if let Some(dir) = job_socket_dir {
        let dst = Path::new(super::plan::JOB_SOCKET_DIR);
        b.mount_point(dst, true);
        b.ops.push(MountOp::Bind {
            src: c(dir.as_os_str().as_bytes()),
            dst: rel(dst),
            attrs: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_RDONLY,
            recursive: false,
        });
    }

    // The workspace at its own absolute path, writable: the parent's clone of its mount
    // (idmapped when its owner is not the job's host user, so the job owns it).
    if let Some(ws) = workspace {
        b.mount_point(ws, true);
        b.ops.push(MountOp::MoveTree { dst: rel(ws) });
        b.ops.push(MountOp::SetAttrs {
            path: rel(ws),
            attrs: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            recursive: true,
        });
    }
    Ok(b.ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_first_and_created_once() {
        let grants = vec![
            PathGrant {
                path: "/etc/passwd".into(),
                access: Access::Read,
                rule: "r".into(),
            },
            PathGrant {
                path: "/etc/group".into(),
                access: Access::Read,
                rule: "r".into(),
            },
            PathGrant {
                path: "/usr".into(),
                access: Access::Exec,
                rule: "r".into(),
            },
        ];
        let ops = mount_ops(
            &grants,
            Some(Path::new("/tmp/a/ws")),
            Some(1 << 20),
            None,
            None,
        )
        .unwrap();
        let mkdirs: Vec<String> = ops
            .iter()
            .filter_map(|o| {
                if let MountOp::Mkdir(p) = o {
                    Some(p.to_string_lossy().into_owned())
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(
            mkdirs.iter().filter(|m| *m == "./etc").count(),
            1,
            "{mkdirs:?}"
        );
        let pos = |want: &str| {
            mkdirs
                .iter()
                .position(|m| m == want)
                .unwrap_or_else(|| panic!("{want} in {mkdirs:?}"))
        };
        assert!(pos("./tmp") < pos("./tmp/a") && pos("./tmp/a") < pos("./tmp/a/ws"));
        match &ops[ops.len() - 2] {
            MountOp::MoveTree { dst } => assert_eq!(dst.to_bytes(), b"./tmp/a/ws"),
            other => panic!("the workspace's move expected, got {other:?}"),
        }
    }
}
