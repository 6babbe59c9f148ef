//! Relaying a proxied connection: bytes both ways until both sides are done, counted.
//!
//! With splice(2) through a pipe per direction: the kernel moves the socket buffers'
//! pages from one socket to the other and the proxy never copies a byte through user
//! space (on loopback that halves the CPU a download costs, which is what the
//! throughput target needs). tokio has no splice, so this drives it with the sockets'
//! readiness (`try_io`); a plain read/write copy is the fallback when a pipe cannot be
//! had (descriptor limit).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// Bytes moved per splice call, and the pipe's capacity we ask for.
const CHUNK: usize = 1 << 20;
/// The copy fallback's buffer.
const COPY_BUFFER: usize = 128 * 1024;

/// Relays until both directions have ended; `up` counts client → upstream bytes.
pub async fn relay(client: TcpStream, upstream: TcpStream, up: &AtomicU64, down: &AtomicU64) {
    match (Pipe::new(), Pipe::new()) {
        (Ok(p1), Ok(p2)) => {
            tokio::join!(
                splice_pump(&client, &upstream, &p1, up),
                splice_pump(&upstream, &client, &p2, down)
            );
        }
        _ => copy_relay(client, upstream, up, down).await,
    }
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> std::io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A larger pipe moves more per call; the default (64 KiB) works too.
        // SAFETY: fcntl on our own pipe with an integer argument.
        unsafe {
            libc::fcntl(
                pipe.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                CHUNK as libc::c_int,
            )
        };
        Ok(pipe)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> std::io::Result<usize> {
    // SAFETY: splice between descriptors we hold, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One direction: `from` → pipe → `to`, until `from` ends or either side fails; then
/// half-closes `to` so its peer sees the end of this direction.
async fn splice_pump(from: &TcpStream, to: &TcpStream, pipe: &Pipe, count: &AtomicU64) {
    'outer: loop {
        if from.readable().await.is_err() {
            break;
        }
        let n = match from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
        }) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
        };
        let mut left = n;
        while left > 0 {
            if to.writable().await.is_err() {
                break 'outer;
            }
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break 'outer,
            }
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    // SAFETY: shutdown of the write side of a socket we hold.
    unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
}

async fn copy_relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    up: &AtomicU64,
    down: &AtomicU64,
) {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    tokio::join!(
        copy_pump(&mut cr, &mut uw, up),
        copy_pump(&mut ur, &mut cw, down)
    );
}

async fn copy_pump<R, W>(r: &mut R, w: &mut W, count: &AtomicU64)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = w.shutdown().await;
}
