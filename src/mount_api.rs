//! The new mount API calls agentd uses that neither libc nor nix wraps (open_tree,
//! move_mount, mount_setattr, fsopen, fsconfig, fsmount), with their constants from
//! include/uapi/linux/mount.h. Shared by the parent (cloning and idmapping the
//! workspace, making a review overlay) and the child (moving it into place, restricting
//! every bind mount).

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

const FSOPEN_CLOEXEC: u32 = 1;
const FSCONFIG_SET_STRING: u32 = 1;
const FSCONFIG_CMD_CREATE: u32 = 6;
const FSMOUNT_CLOEXEC: u32 = 1;

/// A detached mount of a new `fstype` file system configured with `options` (key,
/// value) pairs: fsopen, fsconfig for each option, create, fsmount. On failure the
/// error carries the kernel's own message from the fs context log when it has one.
pub fn new_detached_mount(fstype: &CStr, options: &[(&CStr, &CStr)]) -> io::Result<OwnedFd> {
    // SAFETY: fsopen with a valid C string; returns a new fd we own.
    let fs = check(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: fs is a fresh descriptor from fsopen.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as RawFd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fs);
    let with_log = |e: io::Error| {
        let log = fs_context_log(raw);
        if log.is_empty() {
            e
        } else {
            io::Error::new(e.kind(), format!("{e} ({log})"))
        }
    };
    for (key, value) in options {
        // SAFETY: key and value are valid C strings for the call.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                raw,
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        })
        .map_err(with_log)?;
    }
    // SAFETY: the create command takes no key or value.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            raw,
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })
    .map_err(with_log)?;
    // SAFETY: fsmount on a created context; returns a new mount fd we own.
    let mnt = check(unsafe { libc::syscall(libc::SYS_fsmount, raw, FSMOUNT_CLOEXEC, 0) })
        .map_err(with_log)?;
    // SAFETY: mnt is a fresh descriptor from fsmount.
    Ok(unsafe { OwnedFd::from_raw_fd(mnt as RawFd) })
}

/// The messages the file system left in its context (read(2) on the fsopen fd), joined.
fn fs_context_log(fs: RawFd) -> String {
    let mut lines = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        // SAFETY: reading into a buffer we own, at most its length.
        let n = unsafe { libc::read(fs, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        lines.push(String::from_utf8_lossy(&buf[..n as usize]).into_owned());
    }
    lines.join("; ")
}
