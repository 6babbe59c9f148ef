//! Published snapshots: immutable, content-addressed trees that any number of jobs may
//! borrow read-only (kernel model: Arc, a shared published object).
//!
//! Layout under `<state_dir>/snapshots`:
//!   objects/<sha256>-<mode>-<uid>-<gid>
//!                             one file per distinct content, mode and owner; every
//!                             snapshot holding it hard-links it, so the link count is
//!                             the object's reference count and snapshots share their
//!                             storage. Objects keep the published file's mode and owner
//!                             (a unique handle on a snapshot runs as its owner) and are
//!                             never written: nobody but root reaches them, borrowers get
//!                             a read-only mount, and a review overlay writes to its
//!                             own upper layer;
//!   <id>/tree/                the snapshot's files (hard links to objects), directories
//!                             and symlinks;
//!   <id>/meta.json            SnapshotMeta.
//! The id is the sha256 of the tree's manifest (every entry's path, type, mode and
//! content hash or link target, in order): the same content published twice is one
//! snapshot.
//!
//! Who holds a snapshot is derived, not stored: the jobs that borrow it and have not
//! ended (the daemon's job table). Removal waits until none does.

use super::{WorkspaceError, io_err};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub id: String,
    pub created_ms: u64,
    /// The directory and job it was published from.
    pub source: String,
    pub job: String,
    pub files: u64,
    pub bytes: u64,
    /// Set by a removal that waits for borrowers.
    #[serde(default)]
    pub removing: bool,
}

pub struct SnapshotStore {
    pub root: PathBuf,
}

impl SnapshotStore {
    pub fn new(state_dir: &Path) -> Self {
        SnapshotStore {
            root: state_dir.join("snapshots"),
        }
    }

    fn objects(&self) -> PathBuf {
        self.root.join("objects")
    }

    /// The directory a borrowing job gets, read-only.
    pub fn tree(&self, id: &str) -> PathBuf {
        self.root.join(id).join("tree")
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.root.join(id).join("meta.json")
    }

    /// A snapshot id is 64 hex digits; anything else is not one (and never a path).
    pub fn valid_id(id: &str) -> bool {
        id.len() == 64
            && id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    }

    pub fn get(&self, id: &str) -> Option<SnapshotMeta> {
        if !Self::valid_id(id) {
            return None;
        }
        let text = std::fs::read(self.meta_path(id)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn list(&self) -> Vec<SnapshotMeta> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut all: Vec<SnapshotMeta> = entries
            .flatten()
            .filter_map(|e| self.get(&e.file_name().to_string_lossy()))
            .collect();
        all.sort_by_key(|m| (m.created_ms, m.id.clone()));
        all
    }

    /// Marks a snapshot as waiting for its borrowers to end.
    pub fn mark_removing(&self, id: &str) -> Result<(), WorkspaceError> {
        let mut meta = self
            .get(id)
            .ok_or_else(|| WorkspaceError::Refused(format!("no snapshot {id}")))?;
        meta.removing = true;
        write_meta(&self.meta_path(id), &meta)
    }

    /// Removes a snapshot (nobody may hold it) and the objects no other snapshot links.
    pub fn remove(&self, id: &str) -> Result<(), WorkspaceError> {
        if !Self::valid_id(id) {
            return Err(WorkspaceError::Refused(format!("{id}: not a snapshot id")));
        }
        let dir = self.root.join(id);
        make_writable(&dir);
        std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
        self.collect_objects()
    }

    /// Deletes objects whose only link is their own name.
    fn collect_objects(&self) -> Result<(), WorkspaceError> {
        let objects = self.objects();
        let Ok(entries) = std::fs::read_dir(&objects) else {
            return Ok(());
        };
        for e in entries.flatten() {
            if e.metadata().is_ok_and(|m| m.nlink() == 1) {
                std::fs::remove_file(e.path()).map_err(io_err("remove", &e.path()))?;
            }
        }
        Ok(())
    }

    /// Publishes the tree at `merged` (read without following any symlink) as a
    /// snapshot; the existing one if the same content was published before.
    pub fn publish(
        &self,
        merged: &Path,
        source: &str,
        job: &str,
        now_ms: u64,
    ) -> Result<SnapshotMeta, WorkspaceError> {
        let objects = self.objects();
        std::fs::create_dir_all(&objects).map_err(io_err("create", &objects))?;
        let staging = self.root.join(format!(".staging-{job}"));
        if staging.exists() {
            make_writable(&staging);
            std::fs::remove_dir_all(&staging).map_err(io_err("remove", &staging))?;
        }
        let tree = staging.join("tree");
        std::fs::create_dir_all(&tree).map_err(io_err("create", &tree))?;
        // The tree's root looks like the published root (owner and mode): a job on the
        // snapshot runs as that owner.
        let top = std::fs::metadata(merged).map_err(io_err("stat", merged))?;
        std::os::unix::fs::chown(&tree, Some(top.uid()), Some(top.gid()))
            .map_err(io_err("chown", &tree))?;
        std::fs::set_permissions(&tree, std::fs::Permissions::from_mode(top.mode() & 0o7777))
            .map_err(io_err("chmod", &tree))?;
        let mut manifest = Sha256::new();
        let (mut files, mut bytes) = (0u64, 0u64);
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let from_dir = merged.join(&rel);
            let names = super::sorted_names(&from_dir)?;
            // Directories are pushed in reverse so the walk (and the manifest) goes in
            // sorted order depth-first.
            let mut subdirs = Vec::new();
            for name in names {
                let r = rel.join(&name);
                let from = merged.join(&r);
                let to = tree.join(&r);
                let m = std::fs::symlink_metadata(&from).map_err(io_err("stat", &from))?;
                let mode = m.mode() & 0o7777;
                let owner = (m.uid(), m.gid());
                let entry = if m.is_dir() {
                    std::fs::create_dir(&to).map_err(io_err("create", &to))?;
                    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                        .map_err(io_err("chmod", &to))?;
                    std::os::unix::fs::chown(&to, Some(owner.0), Some(owner.1))
                        .map_err(io_err("chown", &to))?;
                    subdirs.push(r.clone());
                    format!("dir\0{mode:o}\0{}:{}", owner.0, owner.1)
                } else if m.file_type().is_symlink() {
                    let t = std::fs::read_link(&from).map_err(io_err("read the link", &from))?;
                    std::os::unix::fs::symlink(&t, &to).map_err(io_err("create", &to))?;
                    std::os::unix::fs::lchown(&to, Some(owner.0), Some(owner.1))
                        .map_err(io_err("chown", &to))?;
                    format!("symlink\0{}\0{}:{}", t.display(), owner.0, owner.1)
                } else if m.is_file() {
                    let key = format!("{:o}-{}-{}", mode & 0o1777, owner.0, owner.1);
                    let hash = self.store_object(&from, mode & 0o1777, owner, &key)?;
                    let object = objects.join(format!("{hash}-{key}"));
                    std::fs::hard_link(&object, &to).map_err(io_err("link", &to))?;
                    files += 1;
                    bytes += m.len();
                    format!("file\0{hash}-{key}")
                } else {
                    return Err(WorkspaceError::Refused(format!(
                        "{}: a special file cannot be published",
                        r.display()
                    )));
                };
                manifest.update(r.as_os_str().as_encoded_bytes());
                manifest.update(b"\0");
                manifest.update(entry.as_bytes());
                manifest.update(b"\n");
            }
            stack.extend(subdirs.into_iter().rev());
        }
        let id = hex(&manifest.finalize());
        let dir = self.root.join(&id);
        if dir.exists() {
            // The same content is published already: one snapshot.
            make_writable(&staging);
            let _ = std::fs::remove_dir_all(&staging);
            return self
                .get(&id)
                .ok_or_else(|| WorkspaceError::Refused(format!("snapshot {id} has no metadata")));
        }
        let meta = SnapshotMeta {
            id: id.clone(),
            created_ms: now_ms,
            source: source.to_owned(),
            job: job.to_owned(),
            files,
            bytes,
            removing: false,
        };
        write_meta(&staging.join("meta.json"), &meta)?;
        std::fs::rename(&staging, &dir).map_err(io_err("publish", &dir))?;
        Ok(meta)
    }

    /// Copies a file into the object store (if its content and mode are new there);
    /// returns its content hash.
    fn store_object(
        &self,
        from: &Path,
        mode: u32,
        owner: (u32, u32),
        key: &str,
    ) -> Result<String, WorkspaceError> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut src = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(from)
            .map_err(io_err("read", from))?;
        let tmp = self.objects().join(format!(".tmp-{}", std::process::id()));
        let mut out = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 128 * 1024];
        loop {
            let n = src.read(&mut buf).map_err(io_err("read", from))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err("write", &tmp))?;
        }
        let hash = hex(&hasher.finalize());
        let object = self.objects().join(format!("{hash}-{key}"));
        if object.exists() {
            let _ = std::fs::remove_file(&tmp);
        } else {
            out.sync_all().map_err(io_err("write", &tmp))?;
            std::os::unix::fs::chown(&tmp, Some(owner.0), Some(owner.1))
                .map_err(io_err("chown", &tmp))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", &tmp))?;
            std::fs::rename(&tmp, &object).map_err(io_err("store", &object))?;
        }
        Ok(hash)
    }
}

fn write_meta(path: &Path, meta: &SnapshotMeta) -> Result<(), WorkspaceError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(meta).expect("json"))
        .map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("write", path))
}

/// Directories published read-only (0555) must become writable to be removed.
fn make_writable(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(m) = std::fs::symlink_metadata(&d)
            && m.is_dir()
        {
            let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
            if let Ok(entries) = std::fs::read_dir(&d) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
