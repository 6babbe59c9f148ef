//! The new mount API calls agentd uses that neither libc nor nix wraps (open_tree,
//! move_mount, mount_setattr), with their constants from include/uapi/linux/mount.h.
//! Shared by the parent (cloning and idmapping the workspace) and the child (moving it
//! into place, restricting every bind mount).

use std::ffi::CStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
pub const AT_RECURSIVE: u32 = 0x8000;
const OPEN_TREE_CLONE: u32 = 1;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;

/// struct mount_attr.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Sets `attr_set` on the mount at `path` (relative to `dirfd`), and on every mount
/// below it when `recursive`. `userns` is the user namespace fd for MOUNT_ATTR_IDMAP.
/// Only ever sets flags: clearing one the host locked would fail and is never wanted.
pub fn mount_setattr(
    dirfd: RawFd,
    path: &CStr,
    flags: u32,
    attr_set: u64,
    userns: Option<RawFd>,
) -> io::Result<()> {
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |fd| fd as u64),
    };
    // SAFETY: path and attr are valid for the call; the kernel reads size_of::<MountAttr>() bytes.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// A detached copy of the mount tree at `path` (open_tree with OPEN_TREE_CLONE, recursive,
/// close-on-exec).
pub fn clone_tree(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: open_tree with a valid path; on success it returns a new fd we own.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as u32 | AT_RECURSIVE,
        )
    })?;
    // SAFETY: fd is a fresh descriptor from open_tree.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Attaches the detached tree `tree` at `target`.
pub fn move_tree(tree: RawFd, target: &CStr) -> io::Result<()> {
    // SAFETY: tree is an open_tree fd, target a valid C path.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree,
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}
