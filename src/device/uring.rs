//! Several reads in flight at once through io_uring, for readahead of pages whose
//! slots are not all adjacent (`BlockDevice::read_scattered` of the file device:
//! one read per run of adjacent slots): a fault that reads a stride's next 32
//! pages submits them together and waits for all of them, so the device sees them
//! at depth 32 instead of one after another.
//!
//! Owns: one ring per calling thread (thread-local, made at its first use, or by
//! `prepare` for a thread that must not allocate while it serves faults — the
//! transparent-fault handlers: a few pages of ring memory outside the budget, like
//! the fault path's bounce buffer; never on a page-I/O thread, which does not
//! read), and whether io_uring
//! works on this machine at all (`available`, probed once). Where it does not (an
//! old kernel, `kernel.io_uring_disabled`, a seccomp filter), callers fall back to
//! one positioned read after another.
//!
//! A ring inherited through `fork` is the parent's (its queues are shared memory):
//! the child never touches it and makes its own (the owner's pid is kept).
//!
//! No locks. Every submitted read is waited for before `read_scattered` returns,
//! errors included, so the kernel never writes into a buffer its caller has
//! taken back.

use crate::addr::PAGE_SIZE;
use io_uring::{opcode, types, IoUring};
use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;

/// Reads submitted at once at most (readahead asks for at most 33).
pub(crate) const MAX_READS: usize = 64;

struct Ring {
    ring: IoUring,
    pid: u32,
}

thread_local! {
    static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
}

/// Whether io_uring works here (probed once, by making a small ring).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| IoUring::new(4).is_ok())
}

/// Makes the calling thread's ring now (if io_uring works), so that its first
/// `read_scattered` does not.
pub(crate) fn prepare() {
    if available() {
        RING.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                if let Ok(ring) = IoUring::new(MAX_READS as u32) {
                    *slot = Some(Ring {
                        ring,
                        pid: std::process::id(),
                    });
                }
            }
        });
    }
}

/// Reads `reqs[k] = (byte offset, bytes)` of `fd` one after the other into `buf`
/// (each a multiple of pages), all in flight at once. `None` if this thread has
/// no ring and cannot make one (the caller reads them itself).
pub(crate) fn read_scattered(
    fd: RawFd,
    reqs: &[(u64, u32)],
    buf: &mut [u8],
) -> Option<io::Result<()>> {
    let n = reqs.len();
    let total: usize = reqs.iter().map(|r| r.1 as usize).sum();
    if n == 0
        || n > MAX_READS
        || buf.len() != total
        || reqs
            .iter()
            .any(|r| r.1 == 0 || !(r.1 as usize).is_multiple_of(PAGE_SIZE))
    {
        return Some(Err(io::ErrorKind::InvalidInput.into()));
    }
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        let pid = std::process::id();
        if slot.as_ref().is_some_and(|r| r.pid != pid) {
            // The parent's ring, inherited by fork: not ours to use or to tear down.
            std::mem::forget(slot.take());
        }
        if slot.is_none() {
            let ring = IoUring::new(MAX_READS as u32).ok()?;
            *slot = Some(Ring { ring, pid });
        }
        let ring = &mut slot.as_mut().expect("made above").ring;
        Some(submit_and_reap(ring, fd, reqs, buf))
    })
}

fn submit_and_reap(
    ring: &mut IoUring,
    fd: RawFd,
    reqs: &[(u64, u32)],
    buf: &mut [u8],
) -> io::Result<()> {
    let n = reqs.len();
    let mut submitted = 0usize;
    // The expected length of each read, by its index (`user_data`).
    let mut want = [0u32; MAX_READS];
    {
        let mut sq = ring.submission();
        let mut rest = buf;
        for (i, &(off, len)) in reqs.iter().enumerate() {
            let (part, tail) = rest.split_at_mut(len as usize);
            rest = tail;
            want[i] = len;
            let e = opcode::Read::new(types::Fd(fd), part.as_mut_ptr(), len)
                .offset(off)
                .build()
                .user_data(i as u64);
            // SAFETY: the entry points into `buf`, which outlives every read: this
            // function waits for the completion of each one it submitted before it
            // returns (below), whatever fails.
            if unsafe { sq.push(&e) }.is_err() {
                break;
            }
            submitted += 1;
        }
    }
    let mut result = if submitted < n {
        Err(io::Error::from(io::ErrorKind::OutOfMemory))
    } else {
        Ok(())
    };
    let mut reaped = 0usize;
    let mut waits = 0u32;
    while reaped < submitted {
        match ring.submit_and_wait(submitted - reaped) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Reads may be in flight: they must land before `buf` is given back.
                // A ring that refuses to wait at all is broken; give it a few
                // tries, then wait for the reads' own completion by polling.
                waits += 1;
                if result.is_ok() {
                    result = Err(e);
                }
                if waits > 3 {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
            }
        }
        for cqe in ring.completion() {
            reaped += 1;
            let r = cqe.result();
            let len = want[(cqe.user_data() as usize).min(MAX_READS - 1)];
            if r as i64 != i64::from(len) && result.is_ok() {
                result = Err(if r < 0 {
                    io::Error::from_raw_os_error(-r)
                } else {
                    // A short read (the file shrank under us).
                    io::ErrorKind::UnexpectedEof.into()
                });
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    #[test]
    fn scattered_reads_land_in_order_and_errors_are_reported() {
        if !available() {
            // CI asks for everything (USERMM_REQUIRE_URING=1): then a failure.
            assert_ne!(
                std::env::var("USERMM_REQUIRE_URING").as_deref(),
                Ok("1"),
                "io_uring required but not available here"
            );
            eprintln!("SKIP: io_uring is not available here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create_new(dir.path().join("f")).unwrap();
        for p in 0..64u64 {
            f.write_all_at(&[p as u8; PAGE_SIZE], p * PAGE_SIZE as u64)
                .unwrap();
        }
        // Runs of pages (first page, count), in any order, one overlapping another.
        let runs = [(5u64, 1u32), (60, 4), (0, 2), (17, 1), (17, 3)];
        let reqs: Vec<(u64, u32)> = runs.iter().map(|&(p, c)| (p * 4096, c * 4096)).collect();
        let pages: Vec<u64> = runs
            .iter()
            .flat_map(|&(p, c)| p..p + u64::from(c))
            .collect();
        let mut buf = vec![0u8; pages.len() * PAGE_SIZE];
        read_scattered(f.as_raw_fd(), &reqs, &mut buf)
            .expect("a ring")
            .unwrap();
        for (i, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
            assert!(page.iter().all(|&b| b == pages[i] as u8), "page {i}");
        }
        // Past the end: a short read, reported; the other reads still land.
        let reqs = [(63 * 4096u64, 2 * 4096u32), (3 * 4096, 4096)];
        let mut buf = vec![0u8; 3 * PAGE_SIZE];
        let r = read_scattered(f.as_raw_fd(), &reqs, &mut buf).expect("a ring");
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(buf[2 * PAGE_SIZE..].iter().all(|&b| b == 3));
        // A bad descriptor.
        let r = read_scattered(-1, &[(0, 4096)], &mut [0u8; PAGE_SIZE]).expect("a ring");
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
        // Lengths that are not whole pages, or do not match the buffer.
        for bad in [&[(0u64, 4096u32)][..], &[(0, 10)], &[(0, 0)]] {
            assert_eq!(
                read_scattered(f.as_raw_fd(), bad, &mut [0u8; 10])
                    .expect("checked before any ring")
                    .unwrap_err()
                    .kind(),
                io::ErrorKind::InvalidInput
            );
        }
    }
}
