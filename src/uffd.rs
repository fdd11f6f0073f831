//! A thin userfaultfd layer of our own (the `userfaultfd` crate needs libclang and
//! lacks COPY_MODE_WP, MOVE and WP_ASYNC): the API handshake with feature detection,
//! register/unregister, COPY, ZEROPAGE, WRITEPROTECT, WAKE and reading fault messages.
//!
//! Owns: a descriptor (`Uffd`) and the kernel ABI it speaks (ioctl numbers, the
//! `uffd_msg` layout). No locks; every call is one system call, safe from any thread.
//!
//! ## Opening
//! Through `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`) where the caller may open it: a
//! descriptor made there serves faults the kernel takes inside system calls
//! (`read(2)` into a missing page), which is what transparent memory needs. Else
//! through the `userfaultfd(2)` system call, which for an unprivileged process with
//! `vm.unprivileged_userfaultfd = 0` only gives `UFFD_USER_MODE_ONLY`: such a
//! descriptor does not see kernel-mode faults (a `read(2)` into a missing page then
//! fails with EFAULT), so `open` refuses it and says how to grant the device.
//!
//! ## Hazards, handled where they arise
//! - `EEXIST` from COPY: a page is already there. Transparent memory resolves each
//!   page once, under its entry's claim or lock, so there it is a broken invariant
//!   (the caller says so and fails the fault): `copy` returns `Ok(false)` and does
//!   *not* wake the range, so a thread waiting on that page stays blocked until the
//!   handler's SIGBUS reaches it instead of running on with bytes that are not its
//!   own. From ZEROPAGE (unused by the library): `Ok(false)`, the range woken.
//! - `EAGAIN` from COPY/ZEROPAGE/WRITEPROTECT: the address space is changing (a remove
//!   or unmap event is pending); the caller retries after reading its events.
//! - `ENOENT`/`ESRCH`: the range is no longer registered or the process is exiting;
//!   reported as an error, the caller drops the fault.
//! - Messages may arrive for a fault already resolved (two threads faulted the same
//!   page, or a write-protect fault raced an eviction): the handler re-checks its own
//!   state and wakes the range instead of assuming causal order.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xAA;
const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xAA << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, 24);
const UFFDIO_MOVE: u64 = iowr(0x05, 40);
/// `USERFAULTFD_IOC_NEW` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;
/// `userfaultfd(2)` flag: only faults taken in user mode are reported.
const UFFD_USER_MODE_ONLY: i32 = 1;

/// Register modes.
pub const MODE_MISSING: u64 = 1;
/// Register mode: write-protect faults.
pub const MODE_WP: u64 = 2;
/// COPY mode: leave the faulting thread asleep.
pub const COPY_DONTWAKE: u64 = 1;
/// COPY mode: map the page write-protected.
pub const COPY_WP: u64 = 2;
/// WRITEPROTECT mode: protect (else unprotect, which also wakes).
pub const WP_SET: u64 = 1;

/// Feature bits.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Fault messages carry the faulting thread's id.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFDIO_MOVE` (Linux 6.8): moves pages between anonymous mappings without a copy.
pub const FEATURE_MOVE: u64 = 1 << 10;
/// MOVE mode: leave the faulting thread asleep.
pub const MOVE_DONTWAKE: u64 = 1;

/// A page fault message's flags.
pub const FLAG_WRITE: u64 = 1;
/// The fault is a write-protect fault.
pub const FLAG_WP: u64 = 2;
const EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (packed, 32 bytes), as read from the descriptor.
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct RawMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

/// A page fault reported by the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address (page-aligned unless EXACT_ADDRESS was asked for).
    pub address: u64,
    /// `FLAG_WRITE`, `FLAG_WP`.
    pub flags: u64,
    /// The faulting thread (with `FEATURE_THREAD_ID`), else 0.
    pub tid: u32,
}

/// An open userfaultfd descriptor after the API handshake.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

fn ioctl(fd: RawFd, req: u64, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: `req` is one of the userfaultfd requests above and `arg` points to a
    // live struct of the size its number encodes (each caller passes its own).
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A new descriptor (non-blocking, close-on-exec) that serves kernel-mode faults:
/// through /dev/userfaultfd, else the system call if it gives a full descriptor.
fn new_descriptor() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let fd = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => {
            // SAFETY: a plain ioctl on the device we just opened; the argument is the
            // flags of the new descriptor, passed by value.
            let r = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    USERFAULTFD_IOC_NEW as libc::c_ulong,
                    flags as libc::c_long,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            r
        }
        Err(e) => {
            // Without the device only the system call is left; it gives a full
            // descriptor to root, or with unprivileged_userfaultfd = 1.
            // SAFETY: the userfaultfd system call with plain flags.
            let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
            if r < 0 {
                let e2 = io::Error::last_os_error();
                // SAFETY: as above, asking only for a user-mode descriptor.
                let um =
                    unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
                if um >= 0 {
                    // SAFETY: a descriptor we own; closed at once.
                    drop(unsafe { OwnedFd::from_raw_fd(um as RawFd) });
                }
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "userfaultfd: cannot open /dev/userfaultfd ({e}) and the system \
                         call gives {} ({e2}); transparent memory needs a descriptor \
                         that serves faults inside system calls. Grant the device once \
                         (as root): `groupadd -f userfaultfd && chgrp userfaultfd \
                         /dev/userfaultfd && chmod 660 /dev/userfaultfd && usermod -aG \
                         userfaultfd $USER` (see README, \"Transparent memory\")",
                        if um >= 0 {
                            "only UFFD_USER_MODE_ONLY"
                        } else {
                            "nothing"
                        }
                    ),
                ));
            }
            r as RawFd
        }
    };
    // SAFETY: `fd` is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Uffd {
    /// Opens a descriptor that serves kernel-mode faults too, in non-blocking mode,
    /// and negotiates `want` features (those the kernel lacks are left out; see
    /// `features`). Errors: `PermissionDenied` with what to do when only a user-mode
    /// descriptor can be had.
    pub fn open(want: u64) -> io::Result<Uffd> {
        let fd = new_descriptor()?;
        // The handshake: ask for nothing first to learn what the kernel offers, then
        // for what we want of it (a descriptor takes one successful UFFDIO_API; the
        // probe uses a second descriptor).
        let offered = {
            let probe = new_descriptor()?;
            let mut api = UffdioApi {
                api: UFFD_API,
                features: 0,
                ioctls: 0,
            };
            ioctl(probe.as_raw_fd(), UFFDIO_API, (&raw mut api).cast())?;
            api.features
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: want & offered,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, (&raw mut api).cast())?;
        Ok(Uffd {
            fd,
            features: want & offered,
        })
    }

    /// The features in force.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The descriptor (for poll).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Registers `[start, start + len)` for `mode` (`MODE_MISSING | MODE_WP`).
    pub fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        ioctl(self.raw_fd(), UFFDIO_REGISTER, (&raw mut r).cast())
    }

    /// Unregisters a range (its pending faults are woken and retried by the kernel).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        ioctl(self.raw_fd(), UFFDIO_UNREGISTER, (&raw mut r).cast())
    }

    /// Wakes threads waiting on faults in `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        ioctl(self.raw_fd(), UFFDIO_WAKE, (&raw mut r).cast())
    }

    /// Copies `len` bytes from `src` into the missing page(s) at `dst`, mapping them
    /// (write-protected with `COPY_WP`) and waking the faulting threads (unless
    /// `COPY_DONTWAKE`). `Ok(false)` if a page was already there (EEXIST); nobody is
    /// woken then (see the module header).
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64, mode: u64) -> io::Result<bool> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode,
            copy: 0,
        };
        match ioctl(self.raw_fd(), UFFDIO_COPY, (&raw mut c).cast()) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Moves the page(s) `[src, src + len)` to the missing page(s) at `dst`, both in
    /// anonymous private mappings of this process, `dst` registered with this
    /// descriptor: the page itself changes place (no copy), `src` is left missing,
    /// and the faulting threads at `dst` are woken (unless `MOVE_DONTWAKE`).
    /// Hazards: EEXIST when `dst` is already mapped, EBUSY for a page shared with
    /// another process (after a fork) or pinned, ENOENT when `src` is missing; the
    /// caller falls back to copying.
    ///
    /// # Safety
    /// Both ranges must be pages the caller owns exclusively for the call (nobody
    /// else may rely on `src` staying mapped).
    pub unsafe fn move_pages(&self, dst: u64, src: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut m = UffdioMove {
            dst,
            src,
            len,
            mode,
            moved: 0,
        };
        ioctl(self.raw_fd(), UFFDIO_MOVE, (&raw mut m).cast())
    }

    /// Maps the zero page at the missing page(s) `[start, start + len)`.
    pub fn zeropage(&self, start: u64, len: u64) -> io::Result<bool> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: 0,
            zeropage: 0,
        };
        match ioctl(self.raw_fd(), UFFDIO_ZEROPAGE, (&raw mut z).cast()) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                self.wake(start, len)?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Write-protects (`WP_SET`) or unprotects (0, which also wakes writers) a range.
    pub fn writeprotect(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        ioctl(self.raw_fd(), UFFDIO_WRITEPROTECT, (&raw mut w).cast())
    }

    /// Reads the next page-fault message, if one is queued (non-blocking). Other
    /// events (none are asked for) are skipped.
    pub fn read_fault(&self) -> io::Result<Option<Fault>> {
        loop {
            let mut m = std::mem::MaybeUninit::<RawMsg>::zeroed();
            // SAFETY: reading at most one message into a buffer of its size.
            let n = unsafe {
                libc::read(
                    self.raw_fd(),
                    m.as_mut_ptr().cast(),
                    std::mem::size_of::<RawMsg>(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            if n as usize != std::mem::size_of::<RawMsg>() {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            // SAFETY: the kernel filled the whole message; every bit pattern is valid.
            let m = unsafe { m.assume_init() };
            if m.event != EVENT_PAGEFAULT {
                continue;
            }
            let arg = m.arg;
            return Ok(Some(Fault {
                flags: arg[0],
                address: arg[1],
                tid: arg[2] as u32,
            }));
        }
    }

    /// Waits until a message is queued or `other` is readable, at most `timeout_ms`.
    /// Returns whether `other` fired.
    pub fn poll(&self, other: RawFd, timeout_ms: i32) -> io::Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: self.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: other,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd entries.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(fds[1].revents != 0)
    }
}
