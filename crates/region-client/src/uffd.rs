//! The userfaultfd ABI (include/uapi/linux/userfaultfd.h, x86-64), written by hand: the
//! `userfaultfd` crate generates its bindings with bindgen at build time (libclang on
//! every build host) and has neither UFFDIO_POISON nor USERFAULTFD_IOC_NEW on a device
//! descriptor received from someone else, which is how a job gets its uffd.

use std::os::fd::{AsRawFd, BorrowedFd};

pub const UFFD_API: u64 = 0xAA;
pub const PAGE_SIZE: u64 = 4096;

pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const FEATURE_POISON: u64 = 1 << 14;

pub const REGISTER_MODE_MISSING: u64 = 1;

pub const EVENT_PAGEFAULT: u8 = 0x12;
pub const EVENT_REMAP: u8 = 0x14;
pub const EVENT_REMOVE: u8 = 0x15;
pub const EVENT_UNMAP: u8 = 0x16;
pub const PAGEFAULT_FLAG_WRITE: u64 = 1;

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const WRITE: u64 = 1;
const READ: u64 = 2;

/// `_IO(0xAA, 0x00)` on /dev/userfaultfd: a new userfaultfd for the caller's memory.
pub const USERFAULTFD_IOC_NEW: u64 = 0xAA00;
const UFFDIO_API: u64 = ioc(READ | WRITE, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(READ | WRITE, 0x00, 32);
const UFFDIO_WAKE: u64 = ioc(READ, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(READ | WRITE, 0x03, 40);
const UFFDIO_ZEROPAGE: u64 = ioc(READ | WRITE, 0x04, 32);
const UFFDIO_POISON: u64 = ioc(READ | WRITE, 0x08, 32);

#[repr(C)]
#[derive(Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// uffdio_zeropage and uffdio_poison have the same layout.
#[repr(C)]
#[derive(Default)]
struct Fill {
    range: Range,
    mode: u64,
    done: i64,
}

/// One message read from a userfaultfd (struct uffd_msg, 32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Msg {
    pub event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    /// pagefault: flags, address, thread id; remove/unmap: start, end.
    pub arg: [u64; 3],
}

fn ioctl<T>(fd: BorrowedFd, request: u64, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: every request here is paired with the #[repr(C)] struct its uapi
    // declaration names, and `arg` is valid for reads and writes of that size.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// USERFAULTFD_IOC_NEW on an open /dev/userfaultfd: a userfaultfd bound to the calling
/// process's memory (kernel faults included: the device's file mode, not a capability,
/// is what allows it).
pub fn new_from_device(device: BorrowedFd) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new descriptor.
    let fd = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            USERFAULTFD_IOC_NEW as _,
            libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// UFFDIO_API: asks for `features`; returns what the kernel offers.
pub fn api(uffd: BorrowedFd, features: u64) -> std::io::Result<u64> {
    let mut a = Api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(uffd, UFFDIO_API, &mut a)?;
    Ok(a.features)
}

/// UFFDIO_REGISTER in missing mode.
pub fn register_missing(uffd: BorrowedFd, start: u64, len: u64) -> std::io::Result<()> {
    let mut r = Register {
        range: Range { start, len },
        mode: REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl(uffd, UFFDIO_REGISTER, &mut r)
}

/// The outcome of a fill: bytes done before the kernel stopped, and why it stopped.
pub type Filled = (u64, Option<std::io::Error>);

fn filled(r: std::io::Result<()>, done: i64, len: u64) -> Filled {
    match r {
        Ok(()) => (len, None),
        Err(e) => (done.max(0) as u64, Some(e)),
    }
}

/// UFFDIO_COPY: fills `len` bytes at `dst` (in the uffd's process) from `src` (in ours)
/// and wakes the faulting threads.
pub fn copy(uffd: BorrowedFd, dst: u64, src: *const u8, len: u64) -> Filled {
    let mut c = Copy {
        dst,
        src: src as u64,
        len,
        mode: 0,
        copy: 0,
    };
    let r = ioctl(uffd, UFFDIO_COPY, &mut c);
    filled(r, c.copy, len)
}

/// UFFDIO_ZEROPAGE: maps zeros over `len` bytes at `dst`.
pub fn zeropage(uffd: BorrowedFd, dst: u64, len: u64) -> Filled {
    let mut z = Fill {
        range: Range { start: dst, len },
        ..Default::default()
    };
    let r = ioctl(uffd, UFFDIO_ZEROPAGE, &mut z);
    filled(r, z.done, len)
}

/// UFFDIO_POISON: any access to these pages now raises SIGBUS.
pub fn poison(uffd: BorrowedFd, dst: u64, len: u64) -> Filled {
    let mut p = Fill {
        range: Range { start: dst, len },
        ..Default::default()
    };
    let r = ioctl(uffd, UFFDIO_POISON, &mut p);
    filled(r, p.done, len)
}

/// UFFDIO_WAKE: wakes the threads waiting on faults in the range.
pub fn wake(uffd: BorrowedFd, start: u64, len: u64) -> std::io::Result<()> {
    let mut r = Range { start, len };
    ioctl(uffd, UFFDIO_WAKE, &mut r)
}

/// Poisons every page of the range that is not already present, page run by page run
/// (a fill stops at the first present page with EEXIST).
pub fn poison_missing(uffd: BorrowedFd, start: u64, len: u64) {
    let end = start + len;
    let mut at = start;
    while at < end {
        match poison(uffd, at, end - at) {
            (_, None) => return,
            (done, Some(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                at += done + PAGE_SIZE;
            }
            (done, Some(e)) if e.raw_os_error() == Some(libc::EAGAIN) => at += done,
            // ENOENT/EINVAL: the range is no longer (all) mapped; nothing faults there.
            _ => return,
        }
    }
}

/// Reads the messages waiting on a non-blocking userfaultfd (none: an empty vector).
pub fn read_msgs(uffd: BorrowedFd, out: &mut Vec<Msg>) -> std::io::Result<()> {
    out.clear();
    let mut buf = [Msg::default(); 32];
    // SAFETY: `buf` is valid for writes of its whole size; the kernel writes whole
    // uffd_msg structs into it.
    let n = unsafe {
        libc::read(
            uffd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            std::mem::size_of_val(&buf),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(()),
            _ => Err(e),
        };
    }
    let count = n as usize / std::mem::size_of::<Msg>();
    out.extend_from_slice(&buf[..count]);
    Ok(())
}
