//! A job's side of a region: open it through the broker's socket, map it, hand the
//! broker the userfaultfd that serves it, and read it like memory.
//!
//! A watchdog thread per handle listens to the broker: it keeps the reason of a failure
//! the broker announces (an access about to get SIGBUS), and if the broker goes away it
//! poisons every page not yet present and answers later faults the same way, so no
//! access waits forever on a supervisor that is gone.

use crate::proto::{self, Reply, Request};
use crate::uffd;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Why a region could not be opened.
#[derive(Debug)]
pub enum Error {
    /// The broker's socket is not there or does not answer.
    Connect(String, std::io::Error),
    /// The policy or the region's state refused the open (`kind` as the broker said it).
    Refused { kind: String, message: String },
    /// A kernel step of the handshake failed.
    Kernel(&'static str, std::io::Error),
    /// The broker said something this client does not understand.
    Protocol(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(path, e) => write!(
                f,
                "cannot reach the region broker at {path}: {e} (is this a job of agentd serve started with --region?)"
            ),
            Error::Refused { kind, message } => write!(f, "refused ({kind}): {message}"),
            Error::Kernel(step, e) => write!(f, "{step}: {e}"),
            Error::Protocol(m) => write!(f, "region protocol: {m}"),
        }
    }
}

impl std::error::Error for Error {}

struct Shared {
    closing: AtomicBool,
    failure: Mutex<Option<String>>,
}

/// An open region: `size` bytes at `as_ptr()`, filled by the broker as they are touched.
pub struct Region {
    name: String,
    addr: *mut u8,
    mapped: u64,
    size: u64,
    generation: u64,
    write: bool,
    conn: OwnedFd,
    shared: Arc<Shared>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

// SAFETY: the mapping is plain memory owned by this handle; the raw pointer is only an
// address, and every other field is Send and Sync.
unsafe impl Send for Region {}
// SAFETY: as above; reads of the mapping from several threads are what it is for.
unsafe impl Sync for Region {}

fn socket_path() -> String {
    std::env::var(proto::SOCKET_ENV).unwrap_or_else(|_| proto::DEFAULT_SOCKET.to_owned())
}

fn connect(path: &str) -> Result<OwnedFd, Error> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let err = |e: nix::Error| Error::Connect(path.to_owned(), e.into());
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    let addr = UnixAddr::new(path).map_err(err)?;
    connect(fd.as_raw_fd(), &addr).map_err(err)?;
    Ok(fd)
}

fn expect_reply(conn: BorrowedFd) -> Result<(Reply, Vec<OwnedFd>), Error> {
    match proto::recv::<Reply>(conn) {
        Ok(Some((Reply::Refused { kind, error }, _))) => Err(Error::Refused {
            kind,
            message: error,
        }),
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(Error::Protocol("the broker closed the connection".into())),
        Err(e) => Err(Error::Protocol(e.to_string())),
    }
}

impl Region {
    /// Opens region `name` through the job's broker (AGENTD_REGIONS_SOCKET, or
    /// /run/agentd/regions.sock), writable if `write` (the job must have been given it
    /// `:rw`). Read-only regions are mapped PROT_READ.
    pub fn open(name: &str, write: bool) -> Result<Region, Error> {
        let path = socket_path();
        let conn = connect(&path)?;
        // 1-2: ask; the broker decides (policy, grant, state) and sends the device.
        proto::send(
            conn.as_fd(),
            &Request::Open {
                name: name.to_owned(),
                write,
            },
            &[],
        )
        .map_err(|e| Error::Connect(path.clone(), e))?;
        let (reply, fds) = expect_reply(conn.as_fd())?;
        let Reply::Opened {
            size, generation, ..
        } = reply
        else {
            return Err(Error::Protocol(format!("expected opened, got {reply:?}")));
        };
        let want = if write { 2 } else { 1 };
        if fds.len() != want {
            return Err(Error::Protocol(format!(
                "expected {want} descriptor(s) with the reply, got {}",
                fds.len()
            )));
        }
        let mapped = size.div_ceil(uffd::PAGE_SIZE) * uffd::PAGE_SIZE;
        // 3: the mapping. A read-only region is private anonymous memory the job cannot
        // write; a writable one is the broker's memfd, shared, so the broker sees what
        // the job wrote when the handle closes.
        // SAFETY: a fresh mapping at an address the kernel picks; nothing aliases it.
        let addr = unsafe {
            if write {
                libc::mmap(
                    std::ptr::null_mut(),
                    mapped as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                    fds[1].as_raw_fd(),
                    0,
                )
            } else {
                libc::mmap(
                    std::ptr::null_mut(),
                    mapped as usize,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            }
        };
        if addr == libc::MAP_FAILED {
            return Err(Error::Kernel(
                "map the region",
                std::io::Error::last_os_error(),
            ));
        }
        let unmap = |e| {
            // SAFETY: the mapping made just above, not yet handed to anyone.
            unsafe { libc::munmap(addr, mapped as usize) };
            e
        };
        // 4: the userfaultfd, created for this process's memory from the device the
        // broker sent (jobs are denied the userfaultfd syscall), registered over the
        // mapping; remove and unmap events go to the broker too.
        let uffd_fd = uffd::new_from_device(fds[0].as_fd())
            .map_err(|e| unmap(Error::Kernel("create a userfaultfd", e)))?;
        let mut features =
            uffd::FEATURE_EVENT_REMOVE | uffd::FEATURE_EVENT_UNMAP | uffd::FEATURE_POISON;
        if write {
            features |= uffd::FEATURE_MISSING_SHMEM;
        }
        uffd::api(uffd_fd.as_fd(), features).map_err(|e| {
            unmap(Error::Kernel(
                "UFFDIO_API (this kernel lacks a feature regions need: POISON from 6.6)",
                e,
            ))
        })?;
        uffd::register_missing(uffd_fd.as_fd(), addr as u64, mapped)
            .map_err(|e| unmap(Error::Kernel("register the region with the userfaultfd", e)))?;
        // 5: the handshake: the uffd and the region map in one message.
        proto::send(
            conn.as_fd(),
            &Request::Map {
                addr: addr as u64,
                len: mapped,
            },
            &[uffd_fd.as_raw_fd()],
        )
        .map_err(|e| unmap(Error::Protocol(format!("send the userfaultfd: {e}"))))?;
        match expect_reply(conn.as_fd()).map_err(unmap)? {
            (Reply::Serving, _) => {}
            (other, _) => {
                return Err(unmap(Error::Protocol(format!(
                    "expected serving, got {other:?}"
                ))));
            }
        }
        let shared = Arc::new(Shared {
            closing: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        let watchdog = {
            let shared = shared.clone();
            let conn = conn
                .try_clone()
                .map_err(|e| unmap(Error::Kernel("dup the connection", e)))?;
            let (addr, name) = (addr as u64, name.to_owned());
            std::thread::Builder::new()
                .name("agentd-region".into())
                .spawn(move || watch(&name, conn, uffd_fd, addr, mapped, &shared))
                .map_err(|e| unmap(Error::Kernel("start the region's watchdog thread", e)))?
        };
        Ok(Region {
            name: name.to_owned(),
            addr: addr.cast(),
            mapped,
            size,
            generation,
            write,
            conn,
            shared,
            watchdog: Some(watchdog),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }
    pub fn len(&self) -> u64 {
        self.size
    }
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn writable(&self) -> bool {
        self.write
    }

    /// The region's bytes. Touching a page the broker cannot serve raises SIGBUS.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `size` bytes are mapped at `addr` for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.addr, self.size as usize) }
    }

    /// The last failure the broker announced for this handle.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().ok()?.clone()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        // SAFETY: the mapping this handle made; no slice of it outlives `self`.
        unsafe { libc::munmap(self.addr.cast(), self.mapped as usize) };
        // The broker sees the end of the connection and closes its side (a writable
        // region's writes are kept then); the watchdog wakes up and leaves.
        // SAFETY: shutdown on a socket this handle owns.
        unsafe { libc::shutdown(self.conn.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

/// The last failure any handle of this process was told about, for a SIGBUS handler:
/// a fixed buffer of atomics, so reading it is async-signal-safe.
static LAST_FAILURE: Mutex<()> = Mutex::new(());
static LAST_FAILURE_BUF: [AtomicU8; 512] = [const { AtomicU8::new(0) }; 512];
static LAST_FAILURE_LEN: AtomicUsize = AtomicUsize::new(0);

fn publish_failure(text: &str) {
    let _one_writer = LAST_FAILURE.lock();
    let n = text.len().min(LAST_FAILURE_BUF.len());
    LAST_FAILURE_LEN.store(0, Ordering::SeqCst);
    for (slot, b) in LAST_FAILURE_BUF.iter().zip(&text.as_bytes()[..n]) {
        slot.store(*b, Ordering::Relaxed);
    }
    LAST_FAILURE_LEN.store(n, Ordering::SeqCst);
}

/// Copies the last announced failure into `out` and returns its length (0: none).
/// Async-signal-safe (no allocation, no lock): for a SIGBUS handler.
pub fn last_failure_into(out: &mut [u8]) -> usize {
    let n = LAST_FAILURE_LEN.load(Ordering::SeqCst).min(out.len());
    for (o, slot) in out.iter_mut().zip(&LAST_FAILURE_BUF[..n]) {
        *o = slot.load(Ordering::Relaxed);
    }
    n
}

fn watch(name: &str, conn: OwnedFd, uffd_fd: OwnedFd, addr: u64, len: u64, shared: &Shared) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::Error::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        match proto::recv::<Reply>(conn.as_fd()) {
            Ok(Some((Reply::Failure { offset, reason }, _))) => {
                let text = format!("region {name}: offset {offset}: {reason}");
                publish_failure(&text);
                if let Ok(mut f) = shared.failure.lock() {
                    *f = Some(text);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    if shared.closing.load(Ordering::SeqCst) {
        return;
    }
    // The broker is gone: nothing will fill the pages still missing. Fail them rather
    // than let an access wait forever.
    let text =
        format!("region {name}: the supervisor's region broker went away; pages not yet read fail");
    publish_failure(&text);
    if let Ok(mut f) = shared.failure.lock() {
        *f = Some(text);
    }
    fallback(uffd_fd.as_fd(), addr, len, shared);
}

/// Serves the faults of a handle whose broker is gone: every one fails.
fn fallback(uffd_fd: BorrowedFd, addr: u64, len: u64, shared: &Shared) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    uffd::poison_missing(uffd_fd, addr, len);
    // Faults already read by the broker wait for a wake-up that will not come.
    let _ = uffd::wake(uffd_fd, addr, len);
    let mut msgs = Vec::new();
    while !shared.closing.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(uffd_fd, PollFlags::POLLIN)];
        if let Ok(0) | Err(_) = poll(&mut fds, PollTimeout::from(200u16)) {
            continue;
        }
        if uffd::read_msgs(uffd_fd, &mut msgs).is_err() {
            return;
        }
        for m in &msgs {
            if m.event == uffd::EVENT_PAGEFAULT {
                let page = m.arg[1] & !(uffd::PAGE_SIZE - 1);
                uffd::poison_missing(uffd_fd, page, uffd::PAGE_SIZE);
                let _ = uffd::wake(uffd_fd, page, uffd::PAGE_SIZE);
            }
        }
    }
}
