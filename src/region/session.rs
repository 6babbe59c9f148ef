//! The broker's side of the region protocol (agentd_region::proto): a listener per job,
//! a thread per connection that makes the handshake and then serves the handle.
//!
//! Handshake, numbered as in the protocol: (1) the job asks for a region; (2) `decide`
//! (the daemon's policy hook) allows it or refuses with a kind and a reason; allowed,
//! the broker sends an open /dev/userfaultfd (the job cannot open the device itself
//! and is denied the syscall) and, for a writable region, the memfd to map shared;
//! (3) the job sends the userfaultfd registered over its mapping and the mapping's
//! address and length; (4) the broker checks them and serves.

use super::PAGE;
use super::broker::{Handle, Hooks, Injected, Live};
use super::content::Content;
use super::stats::Counters;
use agentd_region::proto::{self, Reply, Request};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What `decide` hands the broker for an allowed open.
pub struct Allowed {
    pub live: Arc<Live>,
    pub content: Content,
    pub job_stats: Arc<Counters>,
    /// The daemon's accounting of the handle (`region_handle` class), held while it is
    /// open.
    pub charge: Option<crate::telemetry::classes::Charge>,
}

/// A refused open: `kind` (not-granted, no-such-region, revoked, unavailable) and why.
pub struct Refusal {
    pub kind: &'static str,
    pub why: String,
}

pub type Decide = dyn Fn(&str, bool) -> Result<Allowed, Refusal> + Send + Sync;

/// Everything a job's listener needs.
pub struct Broker {
    pub job: String,
    pub decide: Box<Decide>,
    pub hooks: Arc<dyn Hooks>,
    pub injected: Arc<Injected>,
    /// Connections being served (each a thread).
    pub active: AtomicUsize,
}

/// Handles (and handshakes) one job may have at once.
pub const MAX_HANDLES_PER_JOB: usize = 64;
/// How long a handshake step may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn set_receive_timeout(conn: &OwnedFd, t: Option<std::time::Duration>) {
    let tv = t.map_or(
        libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        |t| libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        },
    );
    // SAFETY: setsockopt with a timeval that lives across the call.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}

/// A bound listener; `stop` (or drop) stops taking connections (open handles go on).
pub struct Listener {
    fd: Arc<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    pub fn stop(&mut self) {
        // SAFETY: shutdown on a socket we own: accept() returns EINVAL and the
        // thread leaves.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds a SOCK_SEQPACKET socket at `path` (mode 0666: the job's user connects; the
/// directory decides who reaches it) and serves it on a thread.
pub fn listen(path: &std::path::Path, broker: Broker) -> std::io::Result<Listener> {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, socket};
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    nix::sys::socket::listen(&fd, Backlog::new(64)?)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    let fd = Arc::new(fd);
    let broker = Arc::new(broker);
    let thread = {
        let fd = fd.clone();
        std::thread::Builder::new()
            .name("agentd-regions".into())
            .spawn(move || accept_loop(&fd, &broker))?
    };
    Ok(Listener {
        fd,
        thread: Some(thread),
    })
}

fn accept_loop(fd: &OwnedFd, broker: &Arc<Broker>) {
    loop {
        // SAFETY: accept4 on our listening socket; no address wanted.
        let c = unsafe {
            libc::accept4(
                fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
                Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM) => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    continue;
                }
                _ => return,
            }
        }
        // SAFETY: accept4 returned a new descriptor nobody else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(c) };
        // Each connection is a thread of the daemon: a job gets a bounded number.
        let active = broker.active.fetch_add(1, Ordering::SeqCst);
        if active >= MAX_HANDLES_PER_JOB {
            broker.active.fetch_sub(1, Ordering::SeqCst);
            refuse(
                &conn,
                "unavailable",
                format!(
                    "this job has {MAX_HANDLES_PER_JOB} region handles open or opening; close one first"
                ),
            );
            continue;
        }
        // The handshake must come promptly; serving afterwards polls without a timeout.
        set_receive_timeout(&conn, Some(HANDSHAKE_TIMEOUT));
        let broker = broker.clone();
        let spawned = std::thread::Builder::new()
            .name("agentd-region".into())
            .spawn(move || {
                session(conn, &broker);
                broker.active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::warn!("cannot start a region handle's thread; the open fails");
        }
    }
}

fn refuse(conn: &OwnedFd, kind: &str, why: impl Into<String>) {
    let _ = proto::send(
        conn.as_fd(),
        &Reply::Refused {
            kind: kind.into(),
            error: why.into(),
        },
        &[],
    );
}

/// One connection: the handshake, then the handle's service until it closes.
fn session(conn: OwnedFd, broker: &Broker) {
    // (1) The job's request.
    let (name, write) = match proto::recv::<Request>(conn.as_fd()) {
        Ok(Some((Request::Open { name, write }, _))) => (name, write),
        Ok(Some(_)) => return refuse(&conn, "bad-request", "expected open first"),
        _ => return,
    };
    // (2) The policy hook decides.
    let allowed = match (broker.decide)(&name, write) {
        Ok(a) => a,
        Err(r) => return refuse(&conn, r.kind, r.why),
    };
    let size = allowed.content.size;
    let mapped = allowed.content.pages * PAGE;
    let device = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(f) => OwnedFd::from(f),
        Err(e) => {
            return refuse(
                &conn,
                "unavailable",
                format!("the supervisor cannot open /dev/userfaultfd: {e}"),
            );
        }
    };
    let memfd = if write {
        match shared_memory(&name, mapped) {
            Ok(m) => Some(m),
            Err(e) => {
                return refuse(
                    &conn,
                    "unavailable",
                    format!("cannot make the shared memory of a writable region: {e}"),
                );
            }
        }
    } else {
        None
    };
    let mut fds = vec![device.as_raw_fd()];
    fds.extend(memfd.as_ref().map(|m| m.as_raw_fd()));
    let opened = Reply::Opened {
        size,
        generation: allowed.content.generation,
        write,
    };
    if proto::send(conn.as_fd(), &opened, &fds).is_err() {
        return;
    }
    drop(device);
    // (3) The userfaultfd and the mapping it covers.
    let (addr, len, uffd) = match proto::recv::<Request>(conn.as_fd()) {
        Ok(Some((Request::Map { addr, len }, mut fds))) if fds.len() == 1 => {
            (addr, len, fds.pop().expect("one"))
        }
        Ok(Some(_)) => {
            return refuse(
                &conn,
                "bad-request",
                "expected map with one userfaultfd descriptor",
            );
        }
        _ => return,
    };
    if len != mapped || addr % PAGE != 0 {
        return refuse(
            &conn,
            "bad-request",
            format!(
                "the mapping must be page-aligned and {mapped} bytes long, not {len} at {addr:#x}"
            ),
        );
    }
    // The broker reads faults without blocking, between the socket and the uffd.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(uffd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(uffd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    // (4) Serving: no receive timeout from here on (the connection is idle while the
    // job reads its region).
    set_receive_timeout(&conn, None);
    if proto::send(conn.as_fd(), &Reply::Serving, &[]).is_err() {
        return;
    }
    allowed.live.stats.opened();
    allowed.job_stats.opened();
    allowed
        .live
        .handles
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let live = allowed.live.clone();
    live.open.lock().expect("open handles lock").insert(
        number,
        super::broker::HandleInfo {
            job: broker.job.clone(),
            region: name.clone(),
            generation: allowed.content.generation,
            write,
            bytes: allowed.content.held_bytes(),
            opened_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
        },
    );
    let _charge = allowed.charge;
    Handle::new(
        broker.job.clone(),
        write,
        allowed.live,
        allowed.job_stats,
        allowed.content,
        uffd,
        conn,
        memfd,
        (addr, len),
        broker.hooks.clone(),
        broker.injected.clone(),
    )
    .serve();
    live.open.lock().expect("open handles lock").remove(&number);
}

/// A writable region's memory: a memfd the job maps shared, sealed at its size so the
/// job cannot shrink it under the broker.
fn shared_memory(name: &str, len: u64) -> std::io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(format!("agentd-region-{name}")).expect("no NUL");
    // SAFETY: memfd_create with a valid C string.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate and fcntl on the descriptor we own.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), len as i64) < 0
            || libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}

impl Live {
    pub fn new(generation: u64, revoked: bool) -> Live {
        Live {
            generation: generation.into(),
            revoked: revoked.into(),
            deleted: false.into(),
            stats: Counters::default(),
            write_lock: std::sync::Mutex::new(()),
            handles: 0.into(),
            open: Default::default(),
        }
    }
}
