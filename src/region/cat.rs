//! `agentd region cat NAME [OFFSET LEN]`: a shell-driven agent's way to read a slice of
//! a region lazily (only the pages it covers are faulted in).

use std::io::Write;

/// Exit status when the region cannot be opened or the slice is out of range.
const EXIT_REFUSED: i32 = 125;

/// SIGBUS: say why (the broker announced it just before), then die of the signal so
/// the exit status tells the caller.
extern "C" fn on_sigbus(_: libc::c_int) {
    let mut buf = [0u8; 600];
    let prefix = b"agentd region cat: SIGBUS: ";
    buf[..prefix.len()].copy_from_slice(prefix);
    // The broker sends the reason before it poisons the page; the watchdog thread
    // publishes it. Wait for it a little (async-signal-safe: usleep, atomics).
    let mut n = 0;
    for _ in 0..100 {
        n = agentd_region::client::last_failure_into(&mut buf[prefix.len()..599]);
        if n > 0 {
            break;
        }
        // SAFETY: usleep is async-signal-safe.
        unsafe { libc::usleep(5_000) };
    }
    let mut end = prefix.len() + n;
    if n == 0 {
        let unknown = b"the region could not be served";
        buf[end..end + unknown.len()].copy_from_slice(unknown);
        end += unknown.len();
    }
    buf[end] = b'\n';
    // SAFETY: write, signal and raise are async-signal-safe.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), end + 1);
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        libc::raise(libc::SIGBUS);
    }
}

pub fn cat(name: &str, offset: u64, len: Option<u64>) -> i32 {
    let region = match agentd_region::Region::open(name, false) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agentd region cat: region {name}: {e}");
            return EXIT_REFUSED;
        }
    };
    let size = region.len();
    let len = len.unwrap_or(size.saturating_sub(offset));
    if offset > size || len > size - offset {
        eprintln!(
            "agentd region cat: region {name} is {size} bytes: {offset}+{len} is past its end"
        );
        return EXIT_REFUSED;
    }
    // SAFETY: installs a handler that only uses async-signal-safe calls.
    unsafe { libc::signal(libc::SIGBUS, on_sigbus as *const () as libc::sighandler_t) };
    let bytes = &region.as_slice()[offset as usize..(offset + len) as usize];
    // Copy through a buffer in this process: a fault then happens in user mode, where
    // SIGBUS can be caught and explained, not inside write(2) as EFAULT.
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    for piece in bytes.chunks(buf.len()) {
        buf[..piece.len()].copy_from_slice(piece);
        match out.write_all(&buf[..piece.len()]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return 0,
            Err(e) => {
                eprintln!("agentd region cat: write: {e}");
                return 1;
            }
        }
    }
    let _ = out.flush();
    0
}
