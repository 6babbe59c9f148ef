//! The job's filesystem view: an empty tmpfs root with only what the policy grants.
//! The parent computes the operations (`job::rootfs`); this file performs them with raw
//! system calls on prepared C strings.

use super::{SandboxPlan, SetupError, Step, check, errno};
use crate::mount_api::{
    AT_RECURSIVE, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY, mount_setattr, move_tree,
};
use std::ffi::{CStr, CString};
use std::ptr::null;

/// One step of building the new root. Paths are relative to it (it is the working
/// directory while they run).
#[derive(Debug, Clone)]
pub enum MountOp {
    /// mkdir, where it may already exist (inside a bind of a host tree).
    Mkdir(CString),
    /// An empty file as the mount point of a file.
    Touch(CString),
    /// Bind `src` (a host path; symlinks followed) at `dst`, then set `attrs` on it and,
    /// when `recursive`, on every mount below it.
    Bind {
        src: CString,
        dst: CString,
        attrs: u64,
        recursive: bool,
    },
    /// A fresh filesystem (proc, tmpfs, devpts).
    Mount {
        fstype: CString,
        dst: CString,
        flags: libc::c_ulong,
        data: CString,
    },
    /// Mount attributes on an existing mount (and, when `recursive`, every one below).
    SetAttrs {
        path: CString,
        attrs: u64,
        recursive: bool,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    /// Attach the workspace's mount clone (`SandboxPlan::workspace_tree`) at `dst`.
    MoveTree {
        dst: CString,
    },
}

impl MountOp {
    /// Words for an error message (parent side).
    pub fn describe(&self) -> String {
        let show = |c: &CString| format!("/{}", c.to_string_lossy().trim_start_matches("./"));
        match self {
            MountOp::Mkdir(p) | MountOp::Touch(p) => format!("create the mount point {}", show(p)),
            MountOp::Bind { src, .. } => format!("bind-mount {}", src.to_string_lossy()),
            MountOp::Mount { fstype, dst, .. } => {
                format!("mount {} on {}", fstype.to_string_lossy(), show(dst))
            }
            MountOp::SetAttrs { path, .. } => format!("restrict the mount {}", show(path)),
            MountOp::Symlink { link, .. } => format!("link {}", show(link)),
            MountOp::MoveTree { dst } => format!("mount the idmapped workspace {}", show(dst)),
        }
    }
}

/// Mounts the empty tmpfs that becomes the job's root and makes it the working
/// directory. Runs before the switch to the job's user: the runtime directory above it
/// belongs to host root and is not searchable by the job's user, so everything after
/// this works relative to the working directory.
pub fn enter_new_root(plan: &SandboxPlan) -> Result<(), SetupError> {
    // Nothing mounted from here on may propagate back to the host's mount namespace.
    // SAFETY (all calls below): valid C strings from the plan or literals; no memory is
    // written.
    check(
        unsafe {
            libc::mount(
                null(),
                c"/".as_ptr(),
                null(),
                libc::MS_REC | libc::MS_PRIVATE,
                null(),
            )
        }
        .into(),
        Step::PrivateMounts,
    )?;
    // An empty tmpfs is the root: what the policy does not grant simply is not there. It
    // belongs to the job's user, who fills it next (it is read-only before the job runs).
    check(
        unsafe {
            libc::mount(
                c"agentd-root".as_ptr(),
                plan.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                plan.root_options.as_ptr().cast(),
            )
        }
        .into(),
        Step::RootTmpfs,
    )?;
    check(
        unsafe { libc::chdir(plan.root.as_ptr()) }.into(),
        Step::EnterRoot,
    )?;
    Ok(())
}

/// Fills the new root (the working directory) and pivots into it. Runs as the job's
/// user, still holding capabilities in the job's user namespace: files created in the
/// root tmpfs must belong to an id mapped in that namespace.
pub fn populate_root(plan: &SandboxPlan) -> Result<(), SetupError> {
    for (index, op) in plan.mount_ops.iter().enumerate() {
        run(op, plan).map_err(|errno| SetupError {
            step: Step::MountOp,
            index: index as u32,
            errno,
        })?;
    }
    // Drop the host's root: pivot_root(".", ".") stacks the old root on top of the new
    // one (our working directory), and the lazy unmount removes it.
    // SAFETY: pivot_root/umount2/chdir with literal paths.
    check(
        unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) },
        Step::PivotRoot,
    )?;
    check(
        unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) }.into(),
        Step::DetachHostRoot,
    )?;
    check(
        unsafe { libc::chdir(c"/".as_ptr()) }.into(),
        Step::EnterSlash,
    )?;
    // The root's own tmpfs becomes read-only now that every mount point exists.
    mount_setattr(
        libc::AT_FDCWD,
        c"/",
        0,
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        None,
    )
    .map_err(|e| SetupError {
        step: Step::RootReadOnly,
        index: 0,
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    })
}

/// Performs one operation; returns the errno on failure.
fn run(op: &MountOp, plan: &SandboxPlan) -> Result<(), i32> {
    let ok = |r: libc::c_int| if r < 0 { Err(errno()) } else { Ok(()) };
    let attrs = |path: &CStr, attrs: u64, recursive: bool| {
        mount_setattr(
            libc::AT_FDCWD,
            path,
            if recursive { AT_RECURSIVE } else { 0 },
            attrs,
            None,
        )
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    };
    // SAFETY (all calls): valid C strings from the plan; nothing else is read or written.
    match op {
        MountOp::Mkdir(p) => match ok(unsafe { libc::mkdir(p.as_ptr(), 0o755) }) {
            Err(libc::EEXIST) => Ok(()),
            r => r,
        },
        MountOp::Touch(p) => {
            // Read-only open: an existing file inside a read-only bind is fine as it is.
            let fd = unsafe {
                libc::open(
                    p.as_ptr(),
                    libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644,
                )
            };
            ok(fd)?;
            unsafe { libc::close(fd) };
            Ok(())
        }
        MountOp::Bind {
            src,
            dst,
            attrs: a,
            recursive,
        } => {
            let flags = libc::MS_BIND | if *recursive { libc::MS_REC } else { 0 };
            ok(unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), null(), flags, null()) })?;
            attrs(dst, *a, *recursive)
        }
        MountOp::Mount {
            fstype,
            dst,
            flags,
            data,
        } => ok(unsafe {
            libc::mount(
                fstype.as_ptr(),
                dst.as_ptr(),
                fstype.as_ptr(),
                *flags,
                data.as_ptr().cast(),
            )
        }),
        MountOp::SetAttrs {
            path,
            attrs: a,
            recursive,
        } => attrs(path, *a, *recursive),
        MountOp::Symlink { target, link } => {
            ok(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) })
        }
        MountOp::MoveTree { dst } => {
            let tree = plan.workspace_tree.ok_or(libc::EBADF)?;
            move_tree(tree, dst).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
        }
    }
}

/// Brings up `lo` in the job's network namespace, which starts with it down.
pub fn loopback_up() -> Result<(), SetupError> {
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
    let sock = check(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) }.into(),
        Step::Loopback,
    )? as libc::c_int;
    // SAFETY: ifreq is plain data; the name "lo" fits in IFNAMSIZ; both ioctls read and
    // write only that struct.
    let r = unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        let mut r = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr);
        }
        r
    };
    let result = check(r.into(), Step::Loopback);
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(sock) };
    result.map(drop)
}
