//! The job's filesystem view: an empty tmpfs root with only what the policy grants.

use super::{SandboxPlan, SetupError, fail, fail_io};
use crate::spec::Access;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::mount_api::{
    AT_RECURSIVE, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY, mount_setattr, move_tree,
};

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths from the plan contain no NUL")
}

/// Sets mount attributes on the mount at `path` (and, if `recursive`, every mount below).
/// Only ever sets flags: clearing a flag the host locked would fail, and is never wanted.
fn set_attrs(path: &Path, attrs: u64, recursive: bool) -> Result<(), SetupError> {
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    mount_setattr(libc::AT_FDCWD, &cpath(path), flags, attrs, None)
        .map_err(fail_io(format!("restrict the mount {}", path.display())))
}

/// Path of `job_path` (absolute, as the job will see it) under the new root.
fn under(root: &Path, job_path: &Path) -> PathBuf {
    root.join(job_path.strip_prefix("/").unwrap_or(job_path))
}

/// Creates an empty mount point of the same kind (directory or file) as `source`.
fn make_mount_point(target: &Path, source_is_dir: bool) -> Result<(), SetupError> {
    if source_is_dir {
        std::fs::create_dir_all(target).map_err(fail_io(format!("create {}", target.display())))
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(fail_io(format!("create {}", parent.display())))?;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(target)
        {
            Ok(_) => Ok(()),
            Err(e) => Err(fail_io(format!("create {}", target.display()))(e)),
        }
    }
}

/// Binds host `source` at `target`; read-only unless `writable`; never setuid or devices.
fn bind(source: &Path, target: &Path, writable: bool) -> Result<(), SetupError> {
    // Follows symlinks (/bin -> usr/bin, /etc/resolv.conf -> ../run/...): the job sees
    // the target's content at the granted path, as bwrap's --ro-bind does.
    let meta =
        std::fs::metadata(source).map_err(fail_io(format!("inspect {}", source.display())))?;
    make_mount_point(target, meta.is_dir())?;
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(fail(format!("bind-mount {}", source.display())))?;
    let attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | if writable { 0 } else { MOUNT_ATTR_RDONLY };
    set_attrs(target, attrs, true)
}

/// Mounts the empty tmpfs that becomes the job's root and makes it the working
/// directory. Runs before the switch to the job's user: the runtime directory above it
/// belongs to host root and is not searchable by the job's user, so everything after
/// this works relative to the working directory.
pub fn enter_new_root(plan: &SandboxPlan) -> Result<(), SetupError> {
    // Nothing mounted from here on may propagate back to the host's mount namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(fail("make the mount namespace private"))?;
    // An empty tmpfs is the root: what the policy does not grant simply is not there.
    // Owned by the job's user, who builds its contents next (it is read-only by the
    // time the job runs).
    let opts = format!("mode=0755,uid={},gid={}", plan.uid, plan.gid);
    mount(
        Some("agentd-root"),
        &plan.root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(fail("mount the job's root tmpfs"))?;
    std::env::set_current_dir(&plan.root).map_err(fail_io("enter the new root"))
}

/// Fills the new root (the working directory) and pivots into it. Runs as the job's
/// user, still holding capabilities in the job's user namespace: files created in the
/// root tmpfs must belong to an id mapped in that namespace.
pub fn populate_root(plan: &SandboxPlan) -> Result<(), SetupError> {
    let root = Path::new(".");

    // Policy grants, parents first (the plan is sorted).
    for b in &plan.binds {
        bind(&b.path, &under(root, &b.path), b.access == Access::Write)?;
    }

    // A fresh /proc for the job's pid namespace: it shows only the job's processes.
    let proc_dir = root.join("proc");
    make_mount_point(&proc_dir, true)?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(fail("mount /proc"))?;

    build_dev(root)?;

    // A private /tmp, gone with the job.
    let tmp = root.join("tmp");
    make_mount_point(&tmp, true)?;
    let tmp_opts = match plan.tmp_size {
        Some(bytes) => format!("mode=1777,size={bytes}"),
        None => "mode=1777".to_owned(),
    };
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(tmp_opts.as_str()),
    )
    .map_err(fail("mount /tmp"))?;

    // The workspace at its own absolute path, writable; after /tmp, so a workspace
    // below /tmp is not hidden by the private one. If its owner is not the job's
    // host user, the parent prepared an idmapped clone of the mount so the job owns it.
    if let Some(ws) = &plan.workspace {
        let target = under(root, ws);
        match plan.workspace_tree {
            Some(tree) => {
                make_mount_point(&target, true)?;
                move_tree(tree, &cpath(&target)).map_err(fail_io(format!(
                    "mount the idmapped workspace {}",
                    ws.display()
                )))?;
                set_attrs(&target, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, true)?;
            }
            None => bind(ws, &target, true)?,
        }
    }

    // Drop the host's root: pivot_root(".", ".") stacks the old root on top of the new
    // one (our working directory), and the lazy unmount removes it.
    nix::unistd::pivot_root(".", ".").map_err(fail("pivot_root into the new root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(fail("detach the host's root"))?;
    std::env::set_current_dir("/").map_err(fail_io("enter /"))?;

    // The root's own tmpfs becomes read-only now that every mount point exists.
    set_attrs(
        Path::new("/"),
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        false,
    )
}

/// A minimal /dev: the six harmless character devices, a private devpts, /dev/shm.
fn build_dev(root: &Path) -> Result<(), SetupError> {
    let dev = root.join("dev");
    make_mount_point(&dev, true)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755"),
    )
    .map_err(fail("mount /dev"))?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let host = Path::new("/dev").join(name);
        let target = dev.join(name);
        make_mount_point(&target, false)?;
        mount(
            Some(&host),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(fail(format!("bind {}", host.display())))?;
        set_attrs(&target, MOUNT_ATTR_NOSUID, false)?;
    }
    // A new devpts instance: the job's terminals are its own, the host's are not visible.
    let pts = dev.join("pts");
    make_mount_point(&pts, true)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(fail("mount /dev/pts"))?;
    std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx")).map_err(fail_io("link /dev/ptmx"))?;
    let shm = dev.join("shm");
    make_mount_point(&shm, true)?;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(fail("mount /dev/shm"))?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))
            .map_err(fail_io(format!("link /dev/{link}")))?;
    }
    // No new device nodes or files in /dev itself; pts and shm stay writable.
    set_attrs(&dev, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, false)
}

/// Brings up `lo` in the job's network namespace, which starts with it down.
pub fn loopback_up() -> Result<(), SetupError> {
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(fail("open a socket to configure loopback")(
            nix::errno::Errno::last(),
        ));
    }
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
        let errno = nix::errno::Errno::last();
        libc::close(sock);
        if r == 0 { Ok(()) } else { Err(errno) }
    };
    r.map_err(fail("bring up loopback"))
}
