//! Accepting a review handle's change: apply the upper layer to the source directory,
//! keeping what it replaces (the snapshot to return to).
//!
//! Safety: every path is resolved below the source directory's fd with openat2
//! (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV), and
//! every write is an *at call on the parent's fd that does not follow the last
//! component. A symlink the change adds is created as a symlink and never followed, so
//! no file of the change can land outside the source directory. Files are written to a
//! temporary name, fsynced and renamed over their target; setuid and setgid bits are
//! dropped; owners are the upper layer's (the job's user).

use super::diff::{Change, ChangeKind};
use super::{WorkspaceError, io_err};
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

/// What accept did.
#[derive(Debug)]
pub struct Applied {
    pub changes: usize,
    /// The pre-image: every replaced or removed entry, at its relative path.
    pub before: PathBuf,
    /// Paths the change created (to delete when returning to the pre-image).
    pub created: Vec<String>,
    /// Paths the change wrote or removed (what a commit of it covers).
    pub paths: Vec<String>,
    /// Entries not applied: git metadata (a `.git` directory or file at any depth).
    /// Hooks and config there run code for whoever uses the repository next, so an
    /// agent's edits to them never leave its sandbox; its work-tree change does.
    pub skipped: Vec<String>,
}

/// Whether a path is (or is below) git metadata.
pub fn is_git_metadata(rel: &str) -> bool {
    Path::new(rel).components().any(|c| c.as_os_str() == ".git")
}

/// Entries of `source` whose status changed at or after `since` (ctime, which no
/// user can set back), up to `limit` of them: the source "moved on" under the job.
/// Git metadata is not looked at: `git status` alone rewrites .git/index, and what a
/// change was made against is the work tree (a commit that changed work-tree files shows
/// in those files).
pub fn changed_since(
    source: &Path,
    since: SystemTime,
    limit: usize,
) -> Result<Vec<String>, WorkspaceError> {
    let since = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let (s, ns) = (since.as_secs() as i64, since.subsec_nanos() as i64);
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = source.join(&rel);
        let entries = std::fs::read_dir(&dir).map_err(io_err("read", &dir))?;
        for e in entries {
            let e = e.map_err(io_err("read", &dir))?;
            if e.file_name() == ".git" {
                continue;
            }
            let r = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(source.join(&r))
                .map_err(io_err("stat", &source.join(&r)))?;
            if (m.ctime(), m.ctime_nsec()) >= (s, ns) {
                found.push(r.display().to_string());
                if found.len() >= limit {
                    return Ok(found);
                }
            }
            if m.is_dir() {
                stack.push(r);
            }
        }
    }
    // The directory itself: an entry added or removed at its top changes its ctime.
    let m = std::fs::symlink_metadata(source).map_err(io_err("stat", source))?;
    if (m.ctime(), m.ctime_nsec()) >= (s, ns) {
        found.push(".".into());
    }
    Ok(found)
}

/// Applies `changes` (from `diff::scan` of `upper` against `source`) to `source`,
/// saving the pre-image under `before`. Refuses (before writing anything) a change
/// with an entry that is not a file, directory or symlink, or a path that leaves the
/// directory.
pub fn apply(
    source: &Path,
    upper: &Path,
    changes: &[Change],
    before: &Path,
) -> Result<Applied, WorkspaceError> {
    let (skipped, changes): (Vec<&Change>, Vec<&Change>) = changes
        .iter()
        .partition(|c| is_git_metadata(&c.path) || c.from.as_deref().is_some_and(is_git_metadata));
    let skipped: Vec<String> = skipped.into_iter().map(|c| c.path.clone()).collect();
    for c in &changes {
        check_rel(&c.path)?;
        if let Some(from) = &c.from {
            check_rel(from)?;
        }
        if c.kind != ChangeKind::Removed
            && !matches!(c.file_type.as_str(), "file" | "dir" | "symlink")
        {
            return Err(WorkspaceError::Refused(format!(
                "{}: a {} has no place in a workspace; the change was not applied",
                c.path, c.file_type
            )));
        }
    }
    let root = open_dir_beneath(None, Path::new(source)).map_err(io_err("open", source))?;
    // A pre-image left by an attempt that stopped before writing is stale.
    match std::fs::remove_dir_all(before) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err("remove", before)(e));
        }
        _ => {}
    }
    std::fs::create_dir_all(before).map_err(io_err("create", before))?;

    // 1. The pre-image of every entry the change replaces or removes.
    let mut created = Vec::new();
    for c in &changes {
        let touched: Vec<&str> = match c.kind {
            ChangeKind::Renamed => vec![c.from.as_deref().unwrap_or_default(), &c.path],
            _ => vec![&c.path],
        };
        for rel in touched {
            let saved = save(&root, Path::new(rel), before).map_err(|e| {
                WorkspaceError::Refused(format!(
                    "cannot keep the pre-image of the change ({e}); nothing was applied"
                ))
            })?;
            if !saved && c.kind != ChangeKind::Removed && rel == c.path {
                created.push(c.path.clone());
            }
        }
    }
    // 2. Removals, deepest first (a renamed file's old name too).
    let mut gone: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c.kind {
            ChangeKind::Removed => Some(c.path.as_str()),
            ChangeKind::Renamed => c.from.as_deref(),
            _ => None,
        })
        .collect();
    gone.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for rel in gone {
        let (dir, name) = parent_of(&root, Path::new(rel))
            .map_err(io_err("open the parent of", Path::new(rel)))?;
        remove_entry(&dir, &name).map_err(io_err("remove", Path::new(rel)))?;
    }
    // 3. Directories, parents first; then files and symlinks.
    let mut adds: Vec<&Change> = changes
        .iter()
        .copied()
        .filter(|c| c.kind != ChangeKind::Removed)
        .collect();
    adds.sort_by(|a, b| {
        (a.file_type != "dir", a.path.matches('/').count(), &a.path).cmp(&(
            b.file_type != "dir",
            b.path.matches('/').count(),
            &b.path,
        ))
    });
    for c in &adds {
        let rel = Path::new(&c.path);
        let from = upper.join(rel);
        let meta = std::fs::symlink_metadata(&from).map_err(io_err("stat", &from))?;
        let (dir, name) = parent_of(&root, rel).map_err(io_err("open the parent of", rel))?;
        match c.file_type.as_str() {
            "dir" => put_dir(&dir, &name, &meta).map_err(io_err("create the directory", rel))?,
            "symlink" => {
                let target = std::fs::read_link(&from).map_err(io_err("read the link", &from))?;
                put_symlink(&dir, &name, &target, &meta)
                    .map_err(io_err("create the symlink", rel))?
            }
            _ => put_file(&dir, &name, &from, &meta).map_err(io_err("write", rel))?,
        }
    }
    // 4. The pre-image's manifest.
    let manifest = serde_json::json!({
        "source": source.display().to_string(),
        "created": created,
        "restore": "copy every entry below this directory back to its path in the source, and delete the paths in \"created\"",
    });
    let mpath = before.join(".agentd-preimage.json");
    std::fs::write(&mpath, serde_json::to_vec_pretty(&manifest).expect("json"))
        .map_err(io_err("write", &mpath))?;
    let mut paths: Vec<String> = changes.iter().map(|c| c.path.clone()).collect();
    paths.extend(changes.iter().filter_map(|c| c.from.clone()));
    paths.sort();
    paths.dedup();
    Ok(Applied {
        changes: changes.len(),
        before: before.to_path_buf(),
        created,
        paths,
        skipped,
    })
}

fn check_rel(rel: &str) -> Result<(), WorkspaceError> {
    let p = Path::new(rel);
    if rel.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(WorkspaceError::Refused(format!(
            "{rel}: not a path inside the workspace; the change was not applied"
        )));
    }
    Ok(())
}

fn cstr(p: &OsStr) -> std::io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

fn last() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// openat2 of a directory, never through a symlink: the source itself (`dir` None, an
/// absolute path, which may well cross mount points on its way: /home, /tmp), or a
/// path strictly below `dir` that stays on its file system (the overlay's lower layer
/// did not see what is mounted inside the source, so the change is not about it).
/// Hand-written: neither libc nor nix 0.32 wraps openat2.
fn open_dir_beneath(dir: Option<&OwnedFd>, path: &Path) -> std::io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    let mut how: libc::open_how = unsafe_zeroed_how();
    how.flags = (libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    if dir.is_some() {
        how.resolve |= libc::RESOLVE_BENEATH | libc::RESOLVE_NO_XDEV;
    }
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: openat2 with a valid path and a fully initialized open_how.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            at,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        // ELOOP: a symlink on the way (RESOLVE_NO_SYMLINKS); agentd never writes
        // through one.
        return Err(last());
    }
    // SAFETY: a fresh fd from openat2.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn unsafe_zeroed_how() -> libc::open_how {
    // SAFETY: open_how is plain data; zero is "no flags".
    unsafe { std::mem::zeroed() }
}

/// The directory holding `rel` (opened beneath `root`) and its last component.
fn parent_of(root: &OwnedFd, rel: &Path) -> std::io::Result<(OwnedFd, CString)> {
    let name = cstr(rel.file_name().ok_or(std::io::ErrorKind::InvalidInput)?)?;
    let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = match parent {
        Some(p) => open_dir_beneath(Some(root), p)?,
        None => {
            // SAFETY: duplicating an fd we own.
            let fd = unsafe { libc::fcntl(root.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            if fd < 0 {
                return Err(last());
            }
            // SAFETY: a fresh fd from fcntl.
            unsafe { OwnedFd::from_raw_fd(fd) }
        }
    };
    Ok((dir, name))
}

fn lstat_at(dir: &OwnedFd, name: &CString) -> std::io::Result<Option<libc::stat>> {
    // SAFETY: stat is plain data the kernel fills in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstatat on our dir fd, a valid name, not following a symlink.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        return Ok(Some(st));
    }
    match last() {
        e if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        e => Err(e),
    }
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Copies the source's entry at `rel` (if any) to `before/rel`; false if there was none.
fn save(root: &OwnedFd, rel: &Path, before: &Path) -> Result<bool, WorkspaceError> {
    let (dir, name) = match parent_of(root, rel) {
        Ok(found) => found,
        // Below a directory the change adds, or one that replaces a file or symlink of
        // the source (saved at its own path): nothing there to keep.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)
            ) =>
        {
            return Ok(false);
        }
        Err(e) => return Err(io_err("open the parent of", rel)(e)),
    };
    let Some(st) = lstat_at(&dir, &name).map_err(io_err("stat", rel))? else {
        return Ok(false);
    };
    let dst = before.join(rel);
    if dst.symlink_metadata().is_ok() {
        return Ok(true); // saved already (a directory saved whole, or a second mention)
    }
    if let Some(p) = dst.parent() {
        std::fs::create_dir_all(p).map_err(io_err("create", p))?;
    }
    copy_out(&dir, &name, &st, &dst).map_err(io_err("save the pre-image of", rel))?;
    Ok(true)
}

/// Copies one entry (recursively for a directory) from `dir`/`name` to `dst`, keeping
/// modes and owners, never following symlinks.
fn copy_out(dir: &OwnedFd, name: &CString, st: &libc::stat, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{PermissionsExt, symlink};
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => {
            std::fs::create_dir(dst)?;
            let sub = open_dir_beneath(Some(dir), Path::new(OsStr::from_bytes(name.as_bytes())))?;
            let listing = std::fs::read_dir(format!("/proc/self/fd/{}", sub.as_raw_fd()))?;
            for e in listing {
                let e = e?;
                let n = cstr(&e.file_name())?;
                if let Some(cst) = lstat_at(&sub, &n)? {
                    copy_out(&sub, &n, &cst, &dst.join(e.file_name()))?;
                }
            }
        }
        libc::S_IFLNK => {
            let mut buf = vec![0u8; libc::PATH_MAX as usize];
            // SAFETY: readlinkat into our buffer, at most its length.
            let n = unsafe {
                libc::readlinkat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(last());
            }
            symlink(OsStr::from_bytes(&buf[..n as usize]), dst)?;
        }
        libc::S_IFREG => {
            // SAFETY: openat of a regular file below our dir fd, not following a symlink.
            let fd = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(last());
            }
            // SAFETY: a fresh fd from openat.
            let mut src = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            let mut out = std::fs::File::create(dst)?;
            std::io::copy(&mut src, &mut out)?;
        }
        _ => return Ok(()), // nothing else is ever written by accept
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(st.st_mode & 0o7777))?;
    }
    std::os::unix::fs::lchown(dst, Some(st.st_uid), Some(st.st_gid))?;
    Ok(())
}

/// Removes `dir`/`name`, a directory with everything below it.
fn remove_entry(dir: &OwnedFd, name: &CString) -> std::io::Result<()> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if is_dir(&st) {
        let sub = open_dir_beneath(Some(dir), Path::new(OsStr::from_bytes(name.as_bytes())))?;
        for e in std::fs::read_dir(format!("/proc/self/fd/{}", sub.as_raw_fd()))? {
            remove_entry(&sub, &cstr(&e?.file_name())?)?;
        }
        // SAFETY: unlinkat on our dir fd and a valid name.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            return Err(last());
        }
    } else if unsafe {
        // SAFETY: as above, for a non-directory.
        libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0)
    } != 0
    {
        return Err(last());
    }
    Ok(())
}

/// Permission bits kept on accept: setuid and setgid are dropped.
fn kept_mode(meta: &std::fs::Metadata) -> libc::mode_t {
    meta.mode() & 0o1777
}

fn put_dir(dir: &OwnedFd, name: &CString, meta: &std::fs::Metadata) -> std::io::Result<()> {
    match lstat_at(dir, name)? {
        Some(st) if is_dir(&st) => {}
        Some(_) => return Err(std::io::Error::other("a non-directory is in the way")),
        None => {
            // SAFETY: mkdirat on our dir fd and a valid name.
            if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) } != 0 {
                return Err(last());
            }
        }
    }
    let sub = open_dir_beneath(Some(dir), Path::new(OsStr::from_bytes(name.as_bytes())))?;
    // SAFETY: fchmod/fchown on a directory fd we own.
    if unsafe { libc::fchmod(sub.as_raw_fd(), kept_mode(meta)) } != 0
        || unsafe { libc::fchown(sub.as_raw_fd(), meta.uid(), meta.gid()) } != 0
    {
        return Err(last());
    }
    Ok(())
}

fn temp_name() -> CString {
    CString::new(format!(".agentd-accept-{:016x}", rand_u64())).expect("no NUL")
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into our 8-byte buffer.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    u64::from_ne_bytes(b)
}

fn rename_into_place(dir: &OwnedFd, tmp: &CString, name: &CString) -> std::io::Result<()> {
    // SAFETY: renameat within one directory fd; replaces `name` itself, never what a
    // symlink there points to.
    if unsafe {
        libc::renameat(
            dir.as_raw_fd(),
            tmp.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
        )
    } != 0
    {
        let e = last();
        // SAFETY: removing our own temporary entry.
        unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
        return Err(e);
    }
    Ok(())
}

fn put_file(
    dir: &OwnedFd,
    name: &CString,
    from: &Path,
    meta: &std::fs::Metadata,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)?;
    let tmp = temp_name();
    // SAFETY: openat creating a new file below our dir fd.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(last());
    }
    // SAFETY: a fresh fd from openat.
    let mut out = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let written = (|| {
        std::io::copy(&mut src, &mut out)?;
        // SAFETY: fchown/fchmod on the file we just created.
        if unsafe { libc::fchown(out.as_raw_fd(), meta.uid(), meta.gid()) } != 0
            || unsafe { libc::fchmod(out.as_raw_fd(), kept_mode(meta)) } != 0
        {
            return Err(last());
        }
        out.sync_all()
    })();
    if let Err(e) = written {
        // SAFETY: removing our own temporary file.
        unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
        return Err(e);
    }
    rename_into_place(dir, &tmp, name)
}

fn put_symlink(
    dir: &OwnedFd,
    name: &CString,
    target: &Path,
    meta: &std::fs::Metadata,
) -> std::io::Result<()> {
    let tmp = temp_name();
    let t = cstr(target.as_os_str())?;
    // SAFETY: symlinkat creating a new link below our dir fd (the target is only text).
    if unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), tmp.as_ptr()) } != 0 {
        return Err(last());
    }
    // SAFETY: fchownat on our new link itself (AT_SYMLINK_NOFOLLOW).
    if unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            tmp.as_ptr(),
            meta.uid(),
            meta.gid(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        let e = last();
        // SAFETY: removing our own temporary link.
        unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
        return Err(e);
    }
    rename_into_place(dir, &tmp, name)
}

/// Returns `source` to the pre-image an accept kept in `before`: every saved entry is
/// put back (by the same safe `*at` writes as accept), and the paths the change created
/// are removed. Returns how many entries were restored and removed.
pub fn restore(source: &Path, before: &Path) -> Result<(usize, usize), WorkspaceError> {
    let mpath = before.join(".agentd-preimage.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&mpath).map_err(io_err("read", &mpath))?)
            .map_err(|e| WorkspaceError::Refused(format!("{}: {e}", mpath.display())))?;
    let created: Vec<String> = manifest["created"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for rel in &created {
        check_rel(rel)?;
    }
    let root = open_dir_beneath(None, source).map_err(io_err("open", source))?;
    // 1. What the change created goes, deepest first.
    let mut gone: Vec<&String> = created.iter().collect();
    gone.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    let mut removed = 0;
    for rel in gone {
        match parent_of(&root, Path::new(rel)) {
            Ok((dir, name)) => {
                remove_entry(&dir, &name).map_err(io_err("remove", Path::new(rel)))?;
                removed += 1;
            }
            // Below something already removed.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(io_err("open the parent of", Path::new(rel))(e)),
        }
    }
    // 2. The saved entries come back, parents first.
    let mut restored = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let from_dir = before.join(&rel);
        let names = super::sorted_names(&from_dir)?;
        for name in names {
            if rel.as_os_str().is_empty() && name == ".agentd-preimage.json" {
                continue;
            }
            let r = rel.join(&name);
            let from = before.join(&r);
            let meta = std::fs::symlink_metadata(&from).map_err(io_err("stat", &from))?;
            let (dir, cname) = parent_of(&root, &r).map_err(io_err("open the parent of", &r))?;
            if meta.is_dir() {
                // A directory the change removed comes back with its saved mode and
                // owner; one that is there is left as it is (the pre-image may hold it
                // only as the parent of saved entries, with no attributes of its own).
                match lstat_at(&dir, &cname).map_err(io_err("stat", &r))? {
                    Some(st) if is_dir(&st) => {}
                    Some(_) => {
                        remove_entry(&dir, &cname).map_err(io_err("remove", &r))?;
                        put_dir(&dir, &cname, &meta).map_err(io_err("restore", &r))?;
                    }
                    None => {
                        put_dir(&dir, &cname, &meta).map_err(io_err("restore", &r))?;
                    }
                }
                stack.push(r);
                continue;
            }
            // Whatever the change left at this path (a file, or a directory that
            // replaced a file) gives way to the saved entry.
            if let Some(st) = lstat_at(&dir, &cname).map_err(io_err("stat", &r))?
                && is_dir(&st)
            {
                remove_entry(&dir, &cname).map_err(io_err("remove", &r))?;
            }
            if meta.file_type().is_symlink() {
                let t = std::fs::read_link(&from).map_err(io_err("read the link", &from))?;
                put_symlink(&dir, &cname, &t, &meta).map_err(io_err("restore", &r))?;
            } else {
                put_file(&dir, &cname, &from, &meta).map_err(io_err("restore", &r))?;
            }
            restored += 1;
        }
    }
    Ok((restored, removed))
}
