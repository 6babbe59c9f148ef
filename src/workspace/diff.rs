//! What a review handle's upper layer says changed, read the way overlayfs wrote it:
//! a file or symlink in the upper layer is new or changed content; a character device
//! 0/0 is a whiteout (the entry was removed); a directory with the xattr
//! `trusted.overlay.opaque=y` replaced the source's directory of that name entirely.
//! A file copied up but left as it was (opened for writing, chmod back) is no change.
//! A removed file whose content reappears under another name is a rename.

use super::{WorkspaceError, io_err};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Text files up to this size get a unified diff; larger ones are summarized.
const TEXT_DIFF_MAX: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    Modified,
    Renamed,
}

/// One entry of a change, by its path relative to the workspace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    pub path: String,
    pub kind: ChangeKind,
    /// For a rename: the path it had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// "file", "dir", "symlink"; anything else ("fifo", "socket", "device") cannot be
    /// accepted.
    pub file_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode_before: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode_after: Option<u32>,
    /// Size after the change (files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Symlink target after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Unified diff, for text files up to 1 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    /// Content that is not shown as text (binary, or over 1 MiB).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub binary: bool,
}

impl Change {
    fn new(path: &Path, kind: ChangeKind, file_type: &str) -> Self {
        Change {
            path: path.display().to_string(),
            kind,
            from: None,
            file_type: file_type.into(),
            mode_before: None,
            mode_after: None,
            size: None,
            target: None,
            diff: None,
            binary: false,
        }
    }
}

pub fn type_name(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else {
        "device"
    }
}

/// overlayfs' whiteout: a character device with device number 0/0.
pub fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Whether an upper-layer directory hides the source's directory of its name.
pub fn is_opaque(dir: &Path) -> bool {
    matches!(xattr(dir, c"trusted.overlay.opaque").as_deref(), Some(b"y"))
}

/// Whether an upper-layer entry carries overlayfs metadata agentd does not interpret
/// (redirects or metacopy, which its mount options turn off).
pub fn has_foreign_overlay_xattrs(path: &Path) -> bool {
    xattr(path, c"trusted.overlay.redirect").is_some()
        || xattr(path, c"trusted.overlay.metacopy").is_some()
}

fn xattr(path: &Path, name: &std::ffi::CStr) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut buf = [0u8; 256];
    // SAFETY: lgetxattr with valid C strings, writing at most buf.len() bytes into buf.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

/// The change in `upper` against `source`, sorted by path (renames detected).
pub fn scan(source: &Path, upper: &Path) -> Result<Vec<Change>, WorkspaceError> {
    let mut out = Vec::new();
    walk(source, upper, Path::new(""), true, &mut out)?;
    detect_renames(source, upper, &mut out)?;
    // By path; where an entry was replaced, its removal first.
    out.sort_by(|a, b| {
        let removal_first = |c: &Change| c.kind != ChangeKind::Removed;
        a.path
            .cmp(&b.path)
            .then(removal_first(a).cmp(&removal_first(b)))
    });
    Ok(out)
}

/// `src_dir`: whether the source has a directory at `rel` whose entries show through
/// (false below an added or opaque directory: nothing there comes from the source, and
/// the source's path is not looked at, so a source symlink is never followed).
fn walk(
    source: &Path,
    upper: &Path,
    rel: &Path,
    src_dir: bool,
    out: &mut Vec<Change>,
) -> Result<(), WorkspaceError> {
    let dir = upper.join(rel);
    let names = super::sorted_names(&dir)?;
    for name in names {
        let r = rel.join(&name);
        let up = upper.join(&r);
        let umeta = std::fs::symlink_metadata(&up).map_err(io_err("stat", &up))?;
        let smeta = if src_dir {
            std::fs::symlink_metadata(source.join(&r)).ok()
        } else {
            None
        };
        if has_foreign_overlay_xattrs(&up) {
            return Err(WorkspaceError::Refused(format!(
                "{}: the upper layer has overlayfs redirect or metacopy data, which agentd does not interpret",
                r.display()
            )));
        }
        if is_whiteout(&umeta) {
            if let Some(s) = smeta {
                let mut c = Change::new(&r, ChangeKind::Removed, type_name(&s));
                c.mode_before = Some(s.mode() & 0o7777);
                out.push(c);
            }
            continue;
        }
        let utype = type_name(&umeta);
        let removed_before = |out: &mut Vec<Change>, s: &std::fs::Metadata| {
            let mut c = Change::new(&r, ChangeKind::Removed, type_name(s));
            c.mode_before = Some(s.mode() & 0o7777);
            out.push(c);
        };
        match (&smeta, utype) {
            (Some(s), "dir") if s.is_dir() && !is_opaque(&up) => {
                if s.mode() & 0o7777 != umeta.mode() & 0o7777 {
                    let mut c = Change::new(&r, ChangeKind::Modified, "dir");
                    c.mode_before = Some(s.mode() & 0o7777);
                    c.mode_after = Some(umeta.mode() & 0o7777);
                    out.push(c);
                }
                walk(source, upper, &r, true, out)?;
            }
            (_, "dir") => {
                if let Some(s) = &smeta {
                    removed_before(out, s);
                }
                let mut c = Change::new(&r, ChangeKind::Added, "dir");
                c.mode_after = Some(umeta.mode() & 0o7777);
                out.push(c);
                walk(source, upper, &r, false, out)?;
            }
            (Some(s), "file") if s.is_file() => {
                let same_mode = s.mode() & 0o7777 == umeta.mode() & 0o7777;
                let same_content = same_content(&source.join(&r), &up, s, &umeta)?;
                if same_mode && same_content {
                    continue;
                }
                let mut c = Change::new(&r, ChangeKind::Modified, "file");
                c.mode_before = Some(s.mode() & 0o7777);
                c.mode_after = Some(umeta.mode() & 0o7777);
                c.size = Some(umeta.len());
                if !same_content {
                    text_diff(&mut c, Some((&source.join(&r), s)), &up, &umeta);
                }
                out.push(c);
            }
            (Some(s), "symlink") if s.file_type().is_symlink() => {
                let before = std::fs::read_link(source.join(&r)).ok();
                let after = std::fs::read_link(&up).map_err(io_err("read the link", &up))?;
                if before.as_deref() == Some(after.as_path()) {
                    continue;
                }
                let mut c = Change::new(&r, ChangeKind::Modified, "symlink");
                c.target = Some(after.display().to_string());
                out.push(c);
            }
            _ => {
                if let Some(s) = &smeta {
                    removed_before(out, s);
                }
                let mut c = Change::new(&r, ChangeKind::Added, utype);
                c.mode_after = Some(umeta.mode() & 0o7777);
                match utype {
                    "file" => {
                        c.size = Some(umeta.len());
                        text_diff(&mut c, None, &up, &umeta);
                    }
                    "symlink" => {
                        let t = std::fs::read_link(&up).map_err(io_err("read the link", &up))?;
                        c.target = Some(t.display().to_string());
                    }
                    _ => {}
                }
                out.push(c);
            }
        }
    }
    Ok(())
}

fn same_content(
    a: &Path,
    b: &Path,
    am: &std::fs::Metadata,
    bm: &std::fs::Metadata,
) -> Result<bool, WorkspaceError> {
    use std::io::Read;
    if am.len() != bm.len() {
        return Ok(false);
    }
    let mut fa = std::fs::File::open(a).map_err(io_err("read", a))?;
    let mut fb = std::fs::File::open(b).map_err(io_err("read", b))?;
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut fa, &mut ba).map_err(io_err("read", a))?;
        let m = read_full(&mut fb, &mut bb).map_err(io_err("read", b))?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match f.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(filled)
    }
}

/// Text of a file if it is small UTF-8 without NUL bytes.
fn as_text(path: &Path, meta: &std::fs::Metadata) -> Option<String> {
    if meta.len() > TEXT_DIFF_MAX {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    if bytes.contains(&0) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

fn text_diff(
    c: &mut Change,
    before: Option<(&Path, &std::fs::Metadata)>,
    after: &Path,
    after_meta: &std::fs::Metadata,
) {
    let old = match before {
        Some((p, m)) => as_text(p, m),
        None => Some(String::new()),
    };
    match (old, as_text(after, after_meta)) {
        (Some(old), Some(new)) => {
            let (a, b) = match before {
                Some(_) => (format!("a/{}", c.path), format!("b/{}", c.path)),
                None => ("/dev/null".into(), format!("b/{}", c.path)),
            };
            let diff = similar::TextDiff::from_lines(&old, &new);
            c.diff = Some(
                diff.unified_diff()
                    .context_radius(3)
                    .header(&a, &b)
                    .to_string(),
            );
        }
        _ => c.binary = true,
    }
}

/// A removed file whose exact content was added under another name is a rename.
fn detect_renames(
    source: &Path,
    upper: &Path,
    out: &mut Vec<Change>,
) -> Result<(), WorkspaceError> {
    let removed: Vec<usize> = (0..out.len())
        .filter(|&i| out[i].kind == ChangeKind::Removed && out[i].file_type == "file")
        .collect();
    let mut taken = vec![false; out.len()];
    let mut renames = Vec::new();
    for ri in removed {
        let from = source.join(&out[ri].path);
        let Ok(fm) = std::fs::symlink_metadata(&from) else {
            continue;
        };
        for ai in 0..out.len() {
            let a = &out[ai];
            if taken[ai] || a.kind != ChangeKind::Added || a.file_type != "file" {
                continue;
            }
            if a.size != Some(fm.len()) {
                continue;
            }
            let to = upper.join(&a.path);
            let tm = std::fs::symlink_metadata(&to).map_err(io_err("stat", &to))?;
            if same_content(&from, &to, &fm, &tm)? {
                taken[ai] = true;
                taken[ri] = true;
                renames.push((ri, ai));
                break;
            }
        }
    }
    for (ri, ai) in renames {
        let from = out[ri].path.clone();
        let a = &mut out[ai];
        a.kind = ChangeKind::Renamed;
        a.mode_before = out_mode(source, &from);
        a.from = Some(from);
        a.diff = None;
        a.binary = false;
    }
    let mut i = 0;
    out.retain(|c| {
        let keep = !(taken[i] && c.kind == ChangeKind::Removed);
        i += 1;
        keep
    });
    Ok(())
}

fn out_mode(source: &Path, rel: &str) -> Option<u32> {
    std::fs::symlink_metadata(source.join(rel))
        .ok()
        .map(|m| m.mode() & 0o7777)
}
