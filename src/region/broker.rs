//! One open region handle's fault service: a thread that reads the job's userfaultfd
//! and answers each fault with one outcome (zero, fetch, cow, retry, failure), fills
//! ahead of sequential readers, and at the end keeps a writable handle's writes.
//!
//! Read-ahead: a fault on the page right after the last window is sequential access,
//! and the window doubles (16 pages, then up to 512 = 2 MiB); any other fault is served
//! alone (one page), so sparse access fetches only what it touches.
//!
//! Failures: the broker first tells the job's client why (a `Failure` message), then
//! poisons the pages (UFFDIO_POISON): the access gets SIGBUS. A stale handle (its
//! region revoked or republished) fails all its missing pages at once.

use super::PAGE;
use super::content::{Content, Fail, Run};
use super::stats::{Counters, Outcome};
use agentd_region::proto::{self, Reply};
use agentd_region::uffd;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest a fault waits for a busy backing store before it fails.
pub const RETRY_BOUND: Duration = Duration::from_secs(2);
const READAHEAD_FIRST: u64 = 16;
const READAHEAD_MAX: u64 = 512;
/// Times a fill refused with EAGAIN is tried again before it is given up.
const EAGAIN_TRIES: u32 = 200;
/// How long the broker keeps polling the userfaultfd after a fault before it sleeps.
const SPIN: Duration = Duration::from_micros(50);
/// Failures reported (rows, events) per handle; later ones are only counted.
const REPORTED_FAILURES: u32 = 16;

/// A region's state that every handle of it watches.
pub struct Live {
    pub generation: AtomicU64,
    pub revoked: AtomicBool,
    /// `region delete`: the region is going (a handle that slipped in fails).
    pub deleted: AtomicBool,
    pub stats: Counters,
    /// Held while a handle writes its pages back (one layer writer at a time).
    pub write_lock: std::sync::Mutex<()>,
    pub handles: AtomicU64,
    /// The open handles, by a number of their own.
    pub open: std::sync::Mutex<std::collections::BTreeMap<u64, HandleInfo>>,
}

/// An open handle as the operator sees it (the `region_handle` object class).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HandleInfo {
    pub job: String,
    pub region: String,
    pub generation: u64,
    pub write: bool,
    /// What the daemon holds for it: read buffers and layer map (its thread's stack is
    /// not counted).
    pub bytes: u64,
    pub opened_ms: u64,
}

/// What the broker tells the daemon.
pub trait Hooks: Send + Sync {
    /// An access failed (SIGBUS in the job) for `reason`.
    fn failed(&self, job: &str, region: &str, offset: u64, reason: &str);
    /// A writable handle's changed pages were written to the region's layer.
    fn written(&self, job: &str, region: &str, pages: &[(u64, Vec<u8>)]) -> Result<(), String>;
    /// The handle ended.
    fn closed(&self, job: &str, region: &str);
}

/// Test builds: `AGENTD_REGION_FAULT=busy:N` makes the first N reads of the backing
/// store busy (transient); `stall` makes the broker read faults and never answer.
#[derive(Debug, Default)]
pub struct Injected {
    pub busy: AtomicU64,
    pub stall: AtomicBool,
}

impl Injected {
    pub fn from_env() -> Injected {
        let i = Injected::default();
        if cfg!(feature = "fault-injection")
            && let Ok(v) = std::env::var("AGENTD_REGION_FAULT")
        {
            if v == "stall" {
                i.stall.store(true, Ordering::SeqCst);
            } else if let Some(n) = v.strip_prefix("busy:").and_then(|n| n.parse().ok()) {
                i.busy.store(n, Ordering::SeqCst);
            }
        }
        i
    }
    fn take_busy(&self) -> bool {
        self.busy
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

pub struct Handle {
    pub job: String,
    pub write: bool,
    pub live: Arc<Live>,
    pub job_stats: Arc<Counters>,
    pub content: Content,
    pub uffd: OwnedFd,
    pub conn: OwnedFd,
    pub memfd: Option<OwnedFd>,
    pub addr: u64,
    pub len: u64,
    pub hooks: Arc<dyn Hooks>,
    pub injected: Arc<Injected>,
    next_sequential: u64,
    window: u64,
    ahead: u64,
    reported: u32,
    failed_all: bool,
    spin_until: Option<Instant>,
    /// Faults read while another was being served.
    deferred: std::collections::VecDeque<u64>,
}

impl Handle {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        job: String,
        write: bool,
        live: Arc<Live>,
        job_stats: Arc<Counters>,
        content: Content,
        uffd: OwnedFd,
        conn: OwnedFd,
        memfd: Option<OwnedFd>,
        (addr, len): (u64, u64),
        hooks: Arc<dyn Hooks>,
        injected: Arc<Injected>,
    ) -> Handle {
        Handle {
            job,
            write,
            live,
            job_stats,
            content,
            uffd,
            conn,
            memfd,
            addr,
            len,
            hooks,
            injected,
            next_sequential: u64::MAX,
            window: 1,
            ahead: 0,
            reported: 0,
            failed_all: false,
            spin_until: None,
            deferred: Default::default(),
        }
    }

    /// Serves faults until the job closes the connection (or dies), then keeps a
    /// writable handle's writes.
    pub fn serve(mut self) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut msgs = Vec::new();
        loop {
            // Right after a fault, the next one usually follows within microseconds:
            // spin on the userfaultfd for a moment before sleeping in poll, so the
            // broker is awake when it comes (a sleeping thread's wake-up costs more
            // than serving the fault).
            if self.spin(&mut msgs) {
                self.handle_msgs(&mut msgs);
                continue;
            }
            let (uffd_ready, conn_ready) = {
                let mut fds = [
                    PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.conn.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Err(nix::Error::EINTR) => continue,
                    Err(_) => break,
                    Ok(_) => {}
                }
                let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]))
            };
            if uffd_ready {
                if uffd::read_msgs(self.uffd.as_fd(), &mut msgs).is_err() {
                    break;
                }
                self.handle_msgs(&mut msgs);
                self.spin_until = Some(Instant::now() + SPIN);
            }
            if conn_ready {
                match proto::recv::<proto::Request>(self.conn.as_fd()) {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        if self.write {
            self.write_back();
        }
        self.live.handles.fetch_sub(1, Ordering::SeqCst);
        self.hooks.closed(&self.job, &self.content.name);
    }

    fn handle_msgs(&mut self, msgs: &mut Vec<uffd::Msg>) {
        for m in std::mem::take(msgs) {
            match m.event {
                uffd::EVENT_PAGEFAULT => self.fault(m.arg[1]),
                // MADV_DONTNEED or an unmap: the pages are gone; a later touch faults
                // again and is served again. No read-ahead continues.
                uffd::EVENT_REMOVE | uffd::EVENT_UNMAP => self.next_sequential = u64::MAX,
                _ => {}
            }
            while let Some(address) = self.deferred.pop_front() {
                self.fault(address);
            }
        }
    }

    /// Reads the messages waiting while a fault is being served: events are handled at
    /// once (so a change of the job's memory map can finish), faults wait their turn.
    fn drain_events(&mut self) {
        let mut msgs = Vec::new();
        if uffd::read_msgs(self.uffd.as_fd(), &mut msgs).is_err() {
            return;
        }
        for m in msgs {
            match m.event {
                uffd::EVENT_PAGEFAULT => self.deferred.push_back(m.arg[1]),
                uffd::EVENT_REMOVE | uffd::EVENT_UNMAP => self.next_sequential = u64::MAX,
                _ => {}
            }
        }
    }

    /// Polls the userfaultfd without sleeping until the spin window closes; true when
    /// messages came (in `msgs`).
    fn spin(&mut self, msgs: &mut Vec<uffd::Msg>) -> bool {
        let Some(until) = self.spin_until else {
            return false;
        };
        while Instant::now() < until {
            match uffd::read_msgs(self.uffd.as_fd(), msgs) {
                Ok(()) if !msgs.is_empty() => {
                    self.spin_until = Some(Instant::now() + SPIN);
                    return true;
                }
                Ok(()) => std::hint::spin_loop(),
                Err(_) => break,
            }
        }
        self.spin_until = None;
        false
    }

    fn stale(&self) -> Option<String> {
        let now = self.live.generation.load(Ordering::SeqCst);
        if self.live.deleted.load(Ordering::SeqCst) {
            Some(format!(
                "region {} was deleted; this handle is no longer valid",
                self.content.name
            ))
        } else if self.live.revoked.load(Ordering::SeqCst) {
            Some(format!(
                "region {} was revoked (generation {now}); this handle is no longer valid",
                self.content.name
            ))
        } else if now != self.content.generation {
            Some(format!(
                "region {} was republished (generation {now}); this handle serves generation {}: open it again",
                self.content.name, self.content.generation
            ))
        } else {
            None
        }
    }

    fn fault(&mut self, address: u64) {
        let t0 = Instant::now();
        let page = (address.saturating_sub(self.addr)) / PAGE;
        if page >= self.content.pages {
            // Past the region's bytes, in its last mapped page's tail: nothing to serve.
            let _ = uffd::wake(self.uffd.as_fd(), address & !(PAGE - 1), PAGE);
            return;
        }
        if self.failed_all {
            self.poison(page, 1);
            return;
        }
        if let Some(why) = self.stale() {
            // Every page this handle has not read yet fails now: one report.
            self.fail(page, 0, self.content.pages, why, t0);
            self.failed_all = true;
            return;
        }
        if self.injected.stall.load(Ordering::SeqCst) {
            return;
        }
        let sequential = page == self.next_sequential;
        if sequential {
            self.stat(|s| s.readahead_hit(self.ahead));
            self.window = (self.window * 2).clamp(READAHEAD_FIRST, READAHEAD_MAX);
        } else {
            self.window = 1;
        }
        let end = (page + self.window).min(self.content.pages);
        let mut at = page;
        let mut outcome = None;
        let mut retried = false;
        let mut refreshed = false;
        let mut eagain = 0;
        while at < end {
            let run = match self.run_bounded(at, end - at, &mut retried) {
                Ok(r) => r,
                Err(why) if at == page => {
                    // The run that failed: the pages it would have served (for a file
                    // that shrank, everything past its end).
                    let span = self.content.pages - page;
                    self.fail(page, page, span.min(READAHEAD_MAX), why, t0);
                    return;
                }
                // Read-ahead stops where the store fails; the job's own access there
                // will fail (or succeed) on its own fault.
                Err(_) => break,
            };
            let dst = self.addr + at * PAGE;
            let bytes = run.pages * PAGE;
            let (done, err) = match run.bytes {
                None => uffd::zeropage(self.uffd.as_fd(), dst, bytes),
                Some(src) => uffd::copy(self.uffd.as_fd(), dst, src, bytes),
            };
            if done > 0 {
                self.stat(|s| s.filled(run.class, done));
                if at == page {
                    outcome = Some(run.class);
                }
            }
            match err {
                None => at += run.pages,
                Some(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // A page already present (another thread's fault, or read-ahead):
                    // skip it, and wake whoever waits on it.
                    let skipped = at + done / PAGE;
                    let _ = uffd::wake(self.uffd.as_fd(), self.addr + skipped * PAGE, PAGE);
                    if skipped == page {
                        outcome.get_or_insert(run.class);
                    }
                    at = skipped + 1;
                }
                Some(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    at += done / PAGE;
                    if done == 0 {
                        // The job's memory map is changing (an unmap or remove event
                        // waits to be read: reading it lets the change finish), or the
                        // kernel lost a race. Try again, a bounded number of times.
                        eagain += 1;
                        self.drain_events();
                        if eagain > EAGAIN_TRIES {
                            if at == page && outcome.is_none() {
                                let why = "the kernel kept refusing to fill the page (EAGAIN)";
                                self.fail(page, page, 1, why.into(), t0);
                                return;
                            }
                            break;
                        }
                        if eagain > 10 {
                            std::thread::sleep(Duration::from_micros(100));
                        }
                    }
                }
                Some(e) if e.raw_os_error() == Some(libc::EFAULT) && !refreshed => {
                    // The source could not be read: a file that shrank (its length is
                    // looked at again, and the run recomputed) or an I/O error.
                    refreshed = true;
                    self.content.refresh();
                    at += done / PAGE;
                }
                Some(e) => {
                    if at + done / PAGE == page && outcome.is_none() {
                        let why = match e.raw_os_error() {
                            Some(libc::EFAULT) => "the backing store could not be read (an I/O error, or a file that shrank)".to_owned(),
                            Some(libc::ENOENT) | Some(libc::ESRCH) => {
                                // The job unmapped the range or exited meanwhile.
                                return;
                            }
                            _ => format!("UFFDIO_COPY: {e}"),
                        };
                        self.fail(page, page, 1, why, t0);
                        return;
                    }
                    break;
                }
            }
        }
        self.next_sequential = at;
        self.ahead = at.saturating_sub(page + 1);
        if self.ahead > 0 {
            self.stat(|s| s.readahead(self.ahead));
        }
        let outcome = if retried {
            Outcome::Retry
        } else {
            outcome.unwrap_or(Outcome::Fetch)
        };
        let us = t0.elapsed().as_micros() as u64;
        self.stat(|s| s.fault(outcome, us));
    }

    /// A run of the content, waiting out a busy backing store for up to RETRY_BOUND.
    fn run_bounded(&mut self, page: u64, max: u64, retried: &mut bool) -> Result<Run, String> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let attempt = if self.injected.take_busy() {
                Err(Fail::Transient(
                    "the backing store is busy (injected)".into(),
                ))
            } else {
                self.content.run(page, max)
            };
            match attempt {
                Ok(run) => return Ok(run),
                Err(Fail::Fatal(why)) => return Err(why),
                Err(Fail::Transient(why)) => {
                    *retried = true;
                    if started.elapsed() >= RETRY_BOUND {
                        return Err(format!(
                            "the backing store stayed busy for {} s: {why}",
                            RETRY_BOUND.as_secs()
                        ));
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
            }
        }
    }

    fn stat(&self, f: impl Fn(&Counters)) {
        f(&self.live.stats);
        f(&self.job_stats);
    }

    fn poison(&self, page: u64, pages: u64) {
        let start = self.addr + page * PAGE;
        uffd::poison_missing(self.uffd.as_fd(), start, pages * PAGE);
        let _ = uffd::wake(self.uffd.as_fd(), start, pages * PAGE);
    }

    /// The access at `page` fails: tell the job why, poison `pages` pages from `from`
    /// (the faulting one among them), count it and report it.
    fn fail(&mut self, page: u64, from: u64, pages: u64, why: String, t0: Instant) {
        let offset = page * PAGE;
        let _ = proto::send(
            self.conn.as_fd(),
            &Reply::Failure {
                offset,
                reason: why.clone(),
            },
            &[],
        );
        self.poison(from, pages.max(1));
        if !(from..from + pages.max(1)).contains(&page) {
            self.poison(page, 1);
        }
        self.next_sequential = u64::MAX;
        let us = t0.elapsed().as_micros() as u64;
        self.stat(|s| s.fault(Outcome::Failure, us));
        if self.reported < REPORTED_FAILURES {
            self.reported += 1;
            self.hooks
                .failed(&self.job, &self.content.name, offset, &why);
        }
    }

    /// A writable handle ends: the pages that differ from what the broker served go to
    /// the region's layer (unless the handle went stale: then they are dropped, and
    /// that is reported).
    fn write_back(&mut self) {
        let Some(memfd) = self.memfd.take() else {
            return;
        };
        if let Some(why) = self.stale() {
            self.hooks.failed(
                &self.job,
                &self.content.name,
                0,
                &format!("the handle's writes were dropped: {why}"),
            );
            return;
        }
        let mut changed = Vec::new();
        let mut mine = vec![0u8; PAGE as usize];
        let mut theirs = vec![0u8; PAGE as usize];
        let mut at = 0i64;
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::from(memfd);
        loop {
            // SAFETY: lseek on a descriptor we own.
            let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
            let hole = if hole < 0 { self.len as i64 } else { hole };
            let mut page = data as u64 / PAGE;
            while page * PAGE < hole as u64 && page < self.content.pages {
                if file.read_exact_at(&mut mine, page * PAGE).is_ok()
                    && self.content.read_page(page, &mut theirs).is_ok()
                    && mine != theirs
                {
                    changed.push((page, mine.clone()));
                }
                page += 1;
            }
            at = hole;
        }
        if changed.is_empty() {
            return;
        }
        let _one_writer = self.live.write_lock.lock();
        if let Err(e) = self.hooks.written(&self.job, &self.content.name, &changed) {
            self.hooks.failed(
                &self.job,
                &self.content.name,
                changed[0].0 * PAGE,
                &format!("the handle's writes could not be kept: {e}"),
            );
        }
    }
}
