//! Taking the store's space back once regions are deleted: every manifest no region's
//! base names goes, then every chunk no remaining manifest names, and the layer files
//! of regions that no longer exist.
//!
//! The caller holds the registry's change lock (no create, clone or publish writes a
//! manifest or chunk meanwhile), marks a sweep pending, and records the deletion before
//! sweeping, so a crash between the two leaves garbage, never a region without its
//! bytes; a daemon that finds the mark sweeps when it starts (and only then: a sweep
//! reads every manifest in use). If a manifest still in use cannot be read, nothing is
//! removed: the chunks it names are unknown, and losing a region's bytes is worse than
//! keeping garbage.
//! Temporary files (a write in progress, or a crash's leftover) are left alone.

use super::store::{RegionFiles, StoreError};
use std::collections::HashSet;
use std::path::Path;

/// What a sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Swept {
    pub manifests: u64,
    pub chunks: u64,
    pub layers: u64,
    /// Bytes of the files removed (as their lengths say; a sparse layer holds less).
    pub bytes: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Files of `dir` (none when it does not exist), with their names.
fn files(dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(io(dir))?;
        if let Some(name) = e.file_name().to_str() {
            out.push((name.to_owned(), e.path()));
        }
    }
    Ok(out)
}

/// A content name (a sha256 in hex), not a temporary file.
fn is_hash(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn remove(path: &Path, swept: &mut Swept) -> Result<u64, StoreError> {
    let len = std::fs::symlink_metadata(path).map_or(0, |m| m.len());
    match std::fs::remove_file(path) {
        Ok(()) => {
            swept.bytes += len;
            Ok(1)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(path)(e)),
    }
}

const PENDING: &str = "sweep-pending";

impl RegionFiles {
    /// A sweep is owed (a delete was recorded, or is about to be): survives a crash.
    pub fn mark_sweep(&self) -> Result<(), StoreError> {
        let path = self.dir(PENDING);
        std::fs::File::create(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
        let dir = self.dir("");
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))
    }

    pub fn sweep_pending(&self) -> bool {
        self.dir(PENDING).exists()
    }

    /// Removes what neither `manifests_in_use` (the manifests regions' bases name) nor
    /// `regions` (the names of the regions that exist) need.
    pub fn sweep(
        &self,
        manifests_in_use: &HashSet<String>,
        regions: &HashSet<String>,
    ) -> Result<Swept, StoreError> {
        // 1: the chunks still needed, from every manifest still in use (all of them read
        // before anything is removed).
        let mut chunks_in_use = HashSet::new();
        for id in manifests_in_use {
            let m = self.manifest(id)?;
            chunks_in_use.extend(m.chunks.into_iter().flatten());
        }
        let mut swept = Swept::default();
        // 2: manifests nobody names.
        for (name, path) in files(&self.dir("manifests"))? {
            if is_hash(&name) && !manifests_in_use.contains(&name) {
                swept.manifests += remove(&path, &mut swept)?;
            }
        }
        // 3: chunks no remaining manifest names (chunks/HH/HASH).
        for (_, sub) in files(&self.dir("chunks"))? {
            if !sub.is_dir() {
                continue;
            }
            for (name, path) in files(&sub)? {
                if is_hash(&name) && !chunks_in_use.contains(&name) {
                    swept.chunks += remove(&path, &mut swept)?;
                }
            }
            // An emptied HH directory goes too (it fails harmlessly when not empty).
            let _ = std::fs::remove_dir(&sub);
        }
        // 4: layers of regions that are gone (NAME.data, NAME.map).
        for (name, path) in files(&self.dir("layers"))? {
            let region = name
                .strip_suffix(".data")
                .or_else(|| name.strip_suffix(".map"));
            if let Some(region) = region
                && super::check_name(region).is_ok()
                && !regions.contains(region)
            {
                swept.layers += remove(&path, &mut swept)?;
            }
        }
        let _ = std::fs::remove_file(self.dir(PENDING));
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::CHUNK;
    use crate::region::store::Manifest;

    #[test]
    fn a_sweep_keeps_what_remaining_regions_name_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let files = RegionFiles::new(dir.path());
        files.ensure().unwrap();
        let shared = files.put_chunk(b"shared").unwrap();
        let only_a = files.put_chunk(b"only a").unwrap();
        let a = files
            .put_manifest(&Manifest {
                size: 2 * CHUNK,
                chunk: CHUNK,
                chunks: vec![Some(shared.clone()), Some(only_a.clone())],
            })
            .unwrap();
        let b = files
            .put_manifest(&Manifest {
                size: 2 * CHUNK,
                chunk: CHUNK,
                chunks: vec![Some(shared.clone()), None],
            })
            .unwrap();
        for r in ["a", "b"] {
            let mut map = files.load_map(r, 2).unwrap();
            files
                .write_layer(r, 2 * 4096, &[(1, vec![1u8; 4096])], &mut map)
                .unwrap();
        }
        // A write in progress is never touched.
        let tmp = files.layer_map("a").with_extension("tmp.1");
        std::fs::write(&tmp, b"x").unwrap();

        // Region a is deleted: b stays.
        files.mark_sweep().unwrap();
        assert!(files.sweep_pending());
        let in_use = HashSet::from([b.clone()]);
        let regions = HashSet::from(["b".to_owned()]);
        let swept = files.sweep(&in_use, &regions).unwrap();
        assert_eq!(
            (swept.manifests, swept.chunks, swept.layers),
            (1, 1, 2),
            "{swept:?}"
        );
        assert!(swept.bytes >= 6, "{swept:?}");
        let mut buf = Vec::new();
        files.read_chunk(&shared, &mut buf).unwrap();
        assert!(files.read_chunk(&only_a, &mut buf).is_err());
        assert!(files.manifest(&a).is_err());
        assert!(files.manifest(&b).is_ok());
        assert!(files.layer_map("b").exists() && files.layer_data("b").exists());
        assert!(!files.layer_map("a").exists() && !files.layer_data("a").exists());
        assert!(tmp.exists());
        assert!(!files.sweep_pending(), "a finished sweep clears the mark");
        // Again: nothing more to do.
        assert_eq!(files.sweep(&in_use, &regions).unwrap(), Swept::default());

        // A manifest in use that cannot be read: nothing is removed.
        std::fs::write(dir.path().join("regions/manifests").join(&b), b"{").unwrap();
        files.mark_sweep().unwrap();
        assert!(files.sweep(&in_use, &HashSet::new()).is_err());
        assert!(files.sweep_pending(), "a failed sweep stays owed");
        files.read_chunk(&shared, &mut buf).unwrap();
        assert!(files.layer_map("b").exists());
    }
}
