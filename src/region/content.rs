//! Which bytes a region's page holds, and where they come from: its layer (own or
//! inherited pages), else its base (a file, a published chunk, zeros). A `Content` is
//! one generation's view, opened once per handle.

use super::stats::Outcome;
use super::store::{BASE, INHERITED, Manifest, RegionFiles};
use super::{Base, CHUNK, PAGE, RegionInfo};
use std::os::fd::AsRawFd;

/// Why a page cannot be served now.
#[derive(Debug, Clone, PartialEq)]
pub enum Fail {
    /// Busy or slow: the fault may wait and try again (bounded).
    Transient(String),
    /// The access must fail.
    Fatal(String),
}

/// A read-only mapping of a file, unmapped on drop.
struct Mapped {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a read-only mapping owned by this value; only the kernel (UFFDIO_COPY) and
// `read_page` read through it.
unsafe impl Send for Mapped {}

impl Mapped {
    fn file(f: &std::fs::File, len: u64) -> std::io::Result<Mapped> {
        let len = len.max(PAGE) as usize;
        // SAFETY: a shared read-only mapping of a file we hold open; pages past its end
        // are never touched (sizes are checked before each use).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Mapped {
    /// Maps the page cache pages of `pages` pages from `page` into this process's page
    /// tables before the kernel copies from them: a UFFDIO_COPY whose source is not
    /// mapped takes a slow path, page by page, which some kernels (6.12) answer with
    /// EAGAIN. MADV_POPULATE_READ fails (EFAULT) instead of raising SIGBUS past the end
    /// of a file.
    fn populate(&self, page: u64, pages: u64) -> std::io::Result<()> {
        // SAFETY: madvise on a range inside this mapping; it changes no contents.
        let r = unsafe {
            libc::madvise(
                self.ptr.add((page * PAGE) as usize) as *mut _,
                (pages * PAGE) as usize,
                libc::MADV_POPULATE_READ,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}

enum BaseReader {
    File {
        path: String,
        file: std::fs::File,
        map: Mapped,
        len: u64,
    },
    Chunks {
        manifest: Manifest,
        cached: Option<usize>,
        buf: Vec<u8>,
    },
    Zero,
}

/// A run of pages from one source: `pages` pages starting at the asked one, copied from
/// `bytes` (None: zeros). `bytes` stays valid until the next call on the same Content.
pub struct Run {
    pub class: Outcome,
    pub pages: u64,
    pub bytes: Option<*const u8>,
}

pub struct Content {
    pub name: String,
    pub size: u64,
    pub pages: u64,
    pub generation: u64,
    base: BaseReader,
    base_inherited: bool,
    map: Vec<u8>,
    layer: Option<Mapped>,
    files: RegionFiles,
    /// One page read from a file (sparse faults).
    one: Vec<u8>,
}

impl Content {
    pub fn open(files: &RegionFiles, info: &RegionInfo) -> Result<Content, String> {
        let pages = info.pages();
        let base = match &info.base {
            Base::Zero => BaseReader::Zero,
            Base::File { path } => {
                let file = std::fs::File::open(path)
                    .map_err(|e| format!("cannot open the backing file {path}: {e}"))?;
                let map = Mapped::file(&file, pages * PAGE)
                    .map_err(|e| format!("cannot map the backing file {path}: {e}"))?;
                let len = file
                    .metadata()
                    .map_err(|e| format!("cannot stat the backing file {path}: {e}"))?
                    .len();
                BaseReader::File {
                    path: path.clone(),
                    file,
                    map,
                    len,
                }
            }
            Base::Chunks { manifest } => BaseReader::Chunks {
                manifest: files.manifest(manifest).map_err(|e| e.to_string())?,
                cached: None,
                buf: Vec::new(),
            },
        };
        // A region without pages of its own has no map (it would cost a byte per page
        // of every handle).
        let map = if info.layer_pages > 0 {
            files
                .load_map(&info.name, pages)
                .map_err(|e| e.to_string())?
        } else {
            Vec::new()
        };
        let layer = if map.iter().any(|&b| b != BASE) {
            let path = files.layer_data(&info.name);
            let f = std::fs::File::open(&path)
                .map_err(|e| format!("cannot open the layer {}: {e}", path.display()))?;
            Some(
                Mapped::file(&f, pages * PAGE)
                    .map_err(|e| format!("cannot map the layer {}: {e}", path.display()))?,
            )
        } else {
            None
        };
        Ok(Content {
            name: info.name.clone(),
            size: info.size,
            pages,
            generation: info.generation,
            base,
            base_inherited: info.base_inherited,
            map,
            layer,
            files: files.clone(),
            one: Vec::new(),
        })
    }

    /// The memory this view holds (layer map, chunk and page buffers).
    pub fn held_bytes(&self) -> u64 {
        let chunk = match &self.base {
            BaseReader::Chunks { buf, .. } => buf.capacity(),
            _ => 0,
        };
        (std::mem::size_of::<Content>() + self.map.capacity() + chunk + super::PAGE as usize) as u64
    }

    /// Looks at the backing file's length again (a copy from it failed).
    pub fn refresh(&mut self) {
        if let BaseReader::File { file, len, .. } = &mut self.base
            && let Ok(m) = file.metadata()
        {
            *len = m.len();
        }
    }

    /// The run of pages starting at `page` (at most `max`) that share a source.
    pub fn run(&mut self, page: u64, max: u64) -> Result<Run, Fail> {
        let max = max.min(self.pages - page).max(1);
        let (kind, same) = match self.map.get(page as usize..(page + max) as usize) {
            Some(run) => (
                run[0],
                run.iter().take_while(|&&b| b == run[0]).count() as u64,
            ),
            None => (BASE, max),
        };
        if kind != BASE {
            let layer = self.layer.as_ref().expect("a layer page has a layer");
            layer
                .populate(page, same)
                .map_err(|e| Fail::Transient(format!("read the layer of {}: {e}", self.name)))?;
            return Ok(Run {
                class: if kind == INHERITED {
                    Outcome::Cow
                } else {
                    Outcome::Fetch
                },
                pages: same,
                // SAFETY: the layer mapping covers every page of the region.
                bytes: Some(unsafe { layer.ptr.add((page * PAGE) as usize) }),
            });
        }
        let class = if self.base_inherited {
            Outcome::Cow
        } else {
            Outcome::Fetch
        };
        match &mut self.base {
            BaseReader::Zero => Ok(Run {
                class: Outcome::Zero,
                pages: same,
                bytes: None,
            }),
            BaseReader::File {
                path,
                map,
                len,
                file,
            } => {
                // The file is read as it is: one that shrank fails the pages it no longer
                // has instead of handing the job bytes that are not there. Its length is
                // known from the open or the last `refresh` (a copy from pages it lost
                // fails with EFAULT, and the broker refreshes then).
                let known = *len;
                let have = known.div_ceil(PAGE);
                if page >= have {
                    return Err(Fail::Fatal(format!(
                        "the backing file {path} is {known} bytes now, shorter than the region ({} bytes): it was truncated",
                        self.size
                    )));
                }
                if max == 1 {
                    // One page (sparse access): read it. Copying from the mapping would
                    // first fault the page into this process's page tables, which costs
                    // more than the read.
                    use std::os::unix::fs::FileExt;
                    self.one.resize(PAGE as usize, 0);
                    let mut got = 0;
                    while got < PAGE as usize {
                        match file.read_at(&mut self.one[got..], page * PAGE + got as u64) {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(Fail::Transient(format!("read {path}: {e}"))),
                        }
                    }
                    if got == 0 {
                        return Err(Fail::Fatal(format!(
                            "the backing file {path} is {} bytes now, shorter than the region ({} bytes): it was truncated",
                            page * PAGE,
                            self.size
                        )));
                    }
                    self.one[got..].fill(0);
                    return Ok(Run {
                        class,
                        pages: 1,
                        bytes: Some(self.one.as_ptr()),
                    });
                }
                let pages = same.min(have - page);
                if let Err(e) = map.populate(page, pages) {
                    // Past the end of a file that shrank (the length is looked at again
                    // on the next try), or an I/O error.
                    if let Ok(m) = file.metadata() {
                        *len = m.len();
                    }
                    return Err(Fail::Transient(format!("read {path}: {e}")));
                }
                Ok(Run {
                    class,
                    pages,
                    // SAFETY: `page` is below the file's pages, within the mapping.
                    bytes: Some(unsafe { map.ptr.add((page * PAGE) as usize) }),
                })
            }
            BaseReader::Chunks {
                manifest,
                cached,
                buf,
            } => {
                let per_chunk = CHUNK / PAGE;
                let ci = (page / per_chunk) as usize;
                let in_chunk = per_chunk - page % per_chunk;
                let pages = same.min(in_chunk);
                let Some(hash) = &manifest.chunks[ci] else {
                    return Ok(Run {
                        class: Outcome::Zero,
                        pages,
                        bytes: None,
                    });
                };
                if *cached != Some(ci) {
                    *cached = None;
                    self.files
                        .read_chunk(hash, buf)
                        .map_err(|why| Fail::Fatal(format!("region {}: {why}", self.name)))?;
                    // The last chunk may end mid-page: pad it to whole pages.
                    buf.resize(CHUNK as usize, 0);
                    *cached = Some(ci);
                }
                let at = (page % per_chunk) * PAGE;
                Ok(Run {
                    class,
                    pages,
                    // SAFETY: `buf` holds CHUNK bytes and `at` is a page within it.
                    bytes: Some(unsafe { buf.as_ptr().add(at as usize) }),
                })
            }
        }
    }

    /// Page `page`'s bytes copied into `out` (PAGE bytes), for write-back comparisons
    /// and publishing.
    pub fn read_page(&mut self, page: u64, out: &mut [u8]) -> Result<(), Fail> {
        let run = self.run(page, 1)?;
        match run.bytes {
            None => out.fill(0),
            Some(p) => {
                if let BaseReader::File { file, .. } = &self.base
                    && self.map.get(page as usize).is_none_or(|&b| b == BASE)
                {
                    // pread, not the mapping: a file that shrinks meanwhile gives a
                    // short read here, not a SIGBUS in the daemon.
                    use std::os::unix::fs::FileExt;
                    out.fill(0);
                    let mut got = 0;
                    while got < out.len() {
                        match file.read_at(&mut out[got..], page * PAGE + got as u64) {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(Fail::Fatal(format!("read: {e}"))),
                        }
                    }
                } else {
                    // SAFETY: `run` points at a whole page of a mapping or chunk
                    // buffer that lives as long as `self`.
                    out.copy_from_slice(unsafe { std::slice::from_raw_parts(p, PAGE as usize) })
                }
            }
        }
        Ok(())
    }
}
