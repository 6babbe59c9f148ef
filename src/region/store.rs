//! A region's bytes on disk, below `<state-dir>/regions/`:
//!   chunks/HH/SHA256     published chunks (64 KiB, zero chunks not stored), by content,
//!                        so regions that publish the same bytes share them;
//!   manifests/SHA256     a published region's chunk list (JSON);
//!   layers/NAME.data     pages a region has over its base (sparse, region-sized),
//!   layers/NAME.map      one byte per page: 0 base, 1 its own write, 2 inherited.
//! Every file is written to a temporary name, synced, then renamed, so a crash leaves
//! the old version or the new one.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A layer map byte.
pub const BASE: u8 = 0;
pub const OWN: u8 = 1;
pub const INHERITED: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {id}: {why}")]
    BadManifest { id: String, why: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A published region's content: one entry per chunk, None for all zeros.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub size: u64,
    pub chunk: u64,
    pub chunks: Vec<Option<String>>,
}

#[derive(Debug, Clone)]
pub struct RegionFiles {
    root: PathBuf,
}

impl RegionFiles {
    pub fn new(state_dir: &Path) -> RegionFiles {
        RegionFiles {
            root: state_dir.join("regions"),
        }
    }

    pub fn ensure(&self) -> Result<(), StoreError> {
        for d in ["chunks", "manifests", "layers"] {
            let p = self.root.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(())
    }

    /// `chunks`, `manifests` or `layers`.
    pub(super) fn dir(&self, which: &str) -> PathBuf {
        self.root.join(which)
    }

    pub fn chunk_path(&self, hash: &str) -> PathBuf {
        self.root.join("chunks").join(&hash[..2]).join(hash)
    }

    /// Stores a chunk (unless its content is there already); returns its hash.
    pub fn put_chunk(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let hash = hex(&Sha256::digest(bytes));
        let path = self.chunk_path(&hash);
        if !path.exists() {
            let dir = path.parent().expect("chunks/HH");
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            write_atomic(&path, bytes)?;
        }
        Ok(hash)
    }

    /// Reads chunk `hash` into `buf` and checks it is what its name says.
    pub fn read_chunk(&self, hash: &str, buf: &mut Vec<u8>) -> Result<(), String> {
        let path = self.chunk_path(hash);
        buf.clear();
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "chunk {} is missing from the chunk store ({})",
                &hash[..12],
                path.display()
            ),
            _ => format!("cannot read chunk {}: {e}", path.display()),
        })?;
        if hex(&Sha256::digest(&bytes)) != hash {
            return Err(format!(
                "chunk {} is corrupt: its content does not match its hash ({})",
                &hash[..12],
                path.display()
            ));
        }
        *buf = bytes;
        Ok(())
    }

    pub fn put_manifest(&self, m: &Manifest) -> Result<String, StoreError> {
        let text = serde_json::to_vec(m).expect("manifest serializes");
        let id = hex(&Sha256::digest(&text));
        let path = self.root.join("manifests").join(&id);
        if !path.exists() {
            write_atomic(&path, &text)?;
        }
        Ok(id)
    }

    pub fn manifest(&self, id: &str) -> Result<Manifest, StoreError> {
        let path = self.root.join("manifests").join(id);
        let text = std::fs::read(&path).map_err(io(&path))?;
        let m: Manifest = serde_json::from_slice(&text).map_err(|e| StoreError::BadManifest {
            id: id.into(),
            why: e.to_string(),
        })?;
        if m.chunk != super::CHUNK || m.chunks.len() as u64 != m.size.div_ceil(m.chunk) {
            return Err(StoreError::BadManifest {
                id: id.into(),
                why: "its chunk list does not cover its size".into(),
            });
        }
        Ok(m)
    }

    pub fn layer_data(&self, name: &str) -> PathBuf {
        self.root.join("layers").join(format!("{name}.data"))
    }
    pub fn layer_map(&self, name: &str) -> PathBuf {
        self.root.join("layers").join(format!("{name}.map"))
    }

    /// A region's layer map (all BASE when it has none).
    pub fn load_map(&self, name: &str, pages: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.layer_map(name);
        match std::fs::read(&path) {
            Ok(mut m) => {
                m.resize(pages as usize, BASE);
                Ok(m)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![BASE; pages as usize]),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Writes pages into a region's layer: the data first (synced), then the map, so
    /// the map never names a page whose bytes are not there.
    pub fn write_layer(
        &self,
        name: &str,
        size: u64,
        pages: &[(u64, Vec<u8>)],
        map: &mut [u8],
    ) -> Result<(), StoreError> {
        let path = self.layer_data(name);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        f.set_len(size).map_err(io(&path))?;
        for (page, bytes) in pages {
            f.write_all_at(bytes, page * super::PAGE)
                .map_err(io(&path))?;
            map[*page as usize] = OWN;
        }
        f.sync_all().map_err(io(&path))?;
        write_atomic(&self.layer_map(name), map)
    }

    /// Gives region `to` the layer of `from`, every page marked inherited.
    pub fn inherit_layer(&self, from: &str, to: &str, pages: u64) -> Result<u64, StoreError> {
        let map = self.load_map(from, pages)?;
        let held = map.iter().filter(|&&b| b != BASE).count() as u64;
        if held == 0 {
            return Ok(0);
        }
        let (src, dst) = (self.layer_data(from), self.layer_data(to));
        let input = std::fs::File::open(&src).map_err(io(&src))?;
        let output = std::fs::File::create(&dst).map_err(io(&dst))?;
        output
            .set_len(input.metadata().map_err(io(&src))?.len())
            .map_err(io(&dst))?;
        let mut buf = vec![0u8; super::PAGE as usize];
        for (page, _) in map.iter().enumerate().filter(|(_, b)| **b != BASE) {
            let at = page as u64 * super::PAGE;
            input.read_exact_at(&mut buf, at).map_err(io(&src))?;
            output.write_all_at(&buf, at).map_err(io(&dst))?;
        }
        output.sync_all().map_err(io(&dst))?;
        let inherited: Vec<u8> = map
            .iter()
            .map(|&b| if b == BASE { BASE } else { INHERITED })
            .collect();
        write_atomic(&self.layer_map(to), &inherited)?;
        Ok(held)
    }

    pub fn remove_layer(&self, name: &str) {
        let _ = std::fs::remove_file(self.layer_map(name));
        let _ = std::fs::remove_file(self.layer_data(name));
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename, then syncs the
/// directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_shared_verified_and_layers_inherit() {
        let dir = tempfile::tempdir().unwrap();
        let files = RegionFiles::new(dir.path());
        files.ensure().unwrap();
        let a = files.put_chunk(b"hello").unwrap();
        assert_eq!(
            files.put_chunk(b"hello").unwrap(),
            a,
            "same bytes, same chunk"
        );
        let mut buf = Vec::new();
        files.read_chunk(&a, &mut buf).unwrap();
        assert_eq!(buf, b"hello");
        std::fs::write(files.chunk_path(&a), b"jello").unwrap();
        let e = files.read_chunk(&a, &mut buf).unwrap_err();
        assert!(e.contains("corrupt"), "{e}");
        std::fs::remove_file(files.chunk_path(&a)).unwrap();
        assert!(
            files
                .read_chunk(&a, &mut buf)
                .unwrap_err()
                .contains("missing")
        );

        let m = Manifest {
            size: 3 * super::super::CHUNK,
            chunk: super::super::CHUNK,
            chunks: vec![None, Some(a.clone()), None],
        };
        let id = files.put_manifest(&m).unwrap();
        assert_eq!(files.manifest(&id).unwrap(), m);

        let mut map = files.load_map("r", 4).unwrap();
        assert_eq!(map, vec![BASE; 4]);
        files
            .write_layer("r", 4 * 4096, &[(2, vec![7u8; 4096])], &mut map)
            .unwrap();
        assert_eq!(files.load_map("r", 4).unwrap(), vec![BASE, BASE, OWN, BASE]);
        assert_eq!(files.inherit_layer("r", "c", 4).unwrap(), 1);
        assert_eq!(
            files.load_map("c", 4).unwrap(),
            vec![BASE, BASE, INHERITED, BASE]
        );
        let data = std::fs::read(files.layer_data("c")).unwrap();
        assert_eq!(&data[8192..8192 + 4096], &[7u8; 4096][..]);
    }
}
