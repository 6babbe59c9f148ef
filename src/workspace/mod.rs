//! Workspace handles. A job's workspace is one of:
//!   - direct: the directory itself, bind-mounted writable (`agentd run --workspace`);
//!   - read-only (borrowed): the same bind, read-only;
//!   - review (unique): an overlay whose lower layer is the directory and whose upper
//!     layer belongs to this job alone. The directory never changes while the job runs;
//!     afterwards the upper layer is the job's change, to be shown (`diff`), applied to
//!     the directory (`accept`) or thrown away (`reject`).
//!
//! Kernel model: ArcBorrow (a borrowed view), UniqueArc (the one writable object).
//! The overlay is made by the supervisor (root, in the host's user namespace) as a
//! detached mount (fsopen/fsmount) that the job's init moves into place, exactly like
//! the direct workspace's mount clone, so the job never sees the layers' paths.

pub mod apply;
pub mod diff;
pub mod git;
pub mod snapshot;

use crate::mount_api;
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How a job gets its workspace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceMode {
    /// The directory itself, writable.
    #[default]
    Direct,
    /// The directory, read-only (a borrowed view).
    Readonly,
    /// A unique overlay handle whose change is held for review.
    Review,
}

impl WorkspaceMode {
    pub fn name(self) -> &'static str {
        match self {
            WorkspaceMode::Direct => "direct",
            WorkspaceMode::Readonly => "readonly",
            WorkspaceMode::Review => "review",
        }
    }
}

/// `--workspace DIR[:ro]`: the directory, and read-only when it ends in ":ro".
pub fn parse_workspace_arg(arg: &Path) -> (PathBuf, WorkspaceMode) {
    use std::os::unix::ffi::OsStrExt;
    match arg.as_os_str().as_bytes().strip_suffix(b":ro") {
        Some(dir) => (
            PathBuf::from(std::ffi::OsStr::from_bytes(dir)),
            WorkspaceMode::Readonly,
        ),
        None => (arg.to_path_buf(), WorkspaceMode::Direct),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot mount the review overlay on {source_dir}: {source}")]
    Overlay {
        source_dir: String,
        source: std::io::Error,
    },
    /// The change cannot be applied as it is (an escape attempt, a file type that has
    /// no place in a workspace); nothing was written.
    #[error("{0}")]
    Refused(String),
}

pub(crate) fn io_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> WorkspaceError {
    let path = path.display().to_string();
    move |source| WorkspaceError::Io { what, path, source }
}

/// The layers of one review handle: `DIR/upper` (the change) and `DIR/work`
/// (overlayfs' scratch space), in the daemon's state directory, root's alone.
#[derive(Debug, Clone)]
pub struct ReviewLayers {
    pub dir: PathBuf,
}

impl ReviewLayers {
    /// `<state_dir>/workspaces/<job>`.
    pub fn for_job(state_dir: &Path, job: &str) -> Self {
        ReviewLayers {
            dir: state_dir.join("workspaces").join(job),
        }
    }
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    /// Where accept keeps what it replaced: the snapshot to return to.
    pub fn before(&self) -> PathBuf {
        self.dir.join("before")
    }

    /// Creates the (empty) layers, mode 0700: nobody but root reaches them, the job
    /// included (it sees only the merged view).
    pub fn create(&self) -> Result<(), WorkspaceError> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [self.upper(), self.work()] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err("create", &dir))?;
        }
        Ok(())
    }

    /// Removes the layers and what accept kept (reject, prune, a failed start).
    pub fn remove(&self) -> Result<(), WorkspaceError> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err("remove", &self.dir)(e))
            }
            _ => Ok(()),
        }
    }

    /// The finished change over `source`, read-only: both as lower layers (the upper
    /// one on top, its whiteouts and opaque directories honoured), for publishing.
    pub fn mount_merged_readonly(&self, source: &Path) -> Result<OwnedFd, WorkspaceError> {
        let lower = format!("{}:{}", layer(&self.upper())?, layer(source)?);
        overlay(source, &[("lowerdir", &lower)])
    }

    /// The overlay as a detached mount: `source` below, the job's upper layer above.
    pub fn mount(&self, source: &Path) -> Result<OwnedFd, WorkspaceError> {
        // The merged root takes its owner and mode from the upper layer's root, so that
        // must look like the source's (the layers' own directory, 0700, keeps everyone
        // else out).
        let meta = std::fs::metadata(source).map_err(io_err("stat", source))?;
        let upper_root = self.upper();
        std::os::unix::fs::chown(&upper_root, Some(meta.uid()), Some(meta.gid()))
            .map_err(io_err("chown", &upper_root))?;
        std::fs::set_permissions(&upper_root, meta.permissions())
            .map_err(io_err("chmod", &upper_root))?;
        let (upper, work) = (self.upper(), self.work());
        overlay(
            source,
            &[
                ("lowerdir", &layer(source)?),
                ("upperdir", &upper.display().to_string()),
                ("workdir", &work.display().to_string()),
            ],
        )
    }
}

/// A path as one layer of an overlay's lowerdir (which separates layers with ':' and
/// escapes with '\').
fn layer(path: &Path) -> Result<String, WorkspaceError> {
    let text = path.display().to_string();
    if text.contains('\0') {
        return Err(WorkspaceError::Refused(format!(
            "{text}: a workspace path cannot contain a NUL byte"
        )));
    }
    Ok(text.replace('\\', "\\\\").replace(':', "\\:"))
}

/// A detached overlay mount with `layers` and the options every agentd overlay has,
/// chosen so an upper layer is plain files a reader can interpret: no redirects (a
/// renamed directory is copied up whole; `rename(2)` of a directory from the source
/// returns EXDEV and tools fall back to copying), no metacopy (a changed file's whole
/// content is in the upper layer), no index, no xino.
fn overlay(source: &Path, layers: &[(&str, &str)]) -> Result<OwnedFd, WorkspaceError> {
    let c = |s: &str| CString::new(s).expect("no NUL in overlay options");
    let fixed = [
        ("redirect_dir", "off"),
        ("metacopy", "off"),
        ("index", "off"),
        ("xino", "off"),
    ];
    let options: Vec<(CString, CString)> = layers
        .iter()
        .chain(fixed.iter())
        .map(|(k, v)| (c(k), c(v)))
        .collect();
    let pairs: Vec<(&std::ffi::CStr, &std::ffi::CStr)> = options
        .iter()
        .map(|(k, v)| (k.as_c_str(), v.as_c_str()))
        .collect();
    mount_api::new_detached_mount(c"overlay", &pairs).map_err(|e| WorkspaceError::Overlay {
        source_dir: source.display().to_string(),
        source: e,
    })
}

/// The names in a directory, sorted (walks that must be repeatable: diff, snapshot
/// manifests, restore).
pub(crate) fn sorted_names(dir: &Path) -> Result<Vec<std::ffi::OsString>, WorkspaceError> {
    let mut names = std::fs::read_dir(dir)
        .map_err(io_err("read", dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err("read", dir))?;
    names.sort();
    Ok(names)
}
