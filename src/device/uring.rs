//! Several reads in flight at once through io_uring, for readahead of pages whose
//! slots are not all adjacent (`BlockDevice::read_scattered` of the file device:
//! one read per run of adjacent slots): a fault that reads a stride's next 32
//! pages submits them together and waits for all of them, so the device sees them
//! at depth 32 instead of one after another. And polled reads (`polled`,
//! `read_at`): a fault's read submitted through the same ring, its completion
//! watched for by the thread instead of slept for (the sleeping vCPU's wake-up
//! was a quarter of a read's time on these VMs). And page-out with
//! `Config::uring_writes` (`write_runs`): a page-I/O thread's batch of runs, one
//! vectored write a run, all in flight at once, naming the request pool's buffers
//! registered with the kernel once (`Registered`, cloned into each thread's ring
//! by `prepare_writes`).
//!
//! Owns: one ring per calling thread (thread-local, made at its first use, or by
//! `prepare` for a thread that must not allocate while it serves faults — the
//! transparent-fault handlers: a few pages of ring memory outside the budget, like
//! the fault path's bounce buffer — or by `prepare_writes` for a page-I/O thread,
//! which never reads), the registration ring `Registered` (kept by
//! `pageio::PageIo`), and whether io_uring
//! works on this machine at all (`available`, probed once). Where it does not (an
//! old kernel, `kernel.io_uring_disabled`, a seccomp filter), callers fall back to
//! one positioned read or write after another.
//!
//! A ring inherited through `fork` is the parent's (its queues are shared memory):
//! the child never touches it and makes its own (the owner's pid is kept).
//!
//! No locks; one atomic (`SPINNERS`, how many threads spin now). Every submitted
//! read is waited for before `read_scattered` returns, and every write before
//! `write_runs` does, errors included (`wait_all`), so the kernel never touches a
//! buffer its caller has taken back.

use crate::addr::PAGE_SIZE;
use io_uring::{opcode, types, IoUring};
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Reads submitted at once at most (readahead asks for at most 33).
pub(crate) const MAX_READS: usize = 64;

struct Ring {
    ring: IoUring,
    pid: u32,
}

thread_local! {
    static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
    /// The request pool's buffers this thread's ring may name by index (`(base,
    /// len)` of the one registered buffer), if `prepare_writes` cloned them.
    static WRITES: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
    /// This thread writes pages through its ring (`prepare_writes` made it, on a
    /// page-I/O thread).
    static WRITES_ON: Cell<bool> = const { Cell::new(false) };
    /// How long this thread's reads spin on the ring for their completions before
    /// they sleep in the kernel (`polled`); zero: they sleep at once.
    static POLL: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// Threads spinning on their rings right now (`spin_cap()` at most).
static SPINNERS: AtomicUsize = AtomicUsize::new(0);

/// At most this many threads spin at once: one per CPU. Leaving one CPU to the
/// reclaimer and the page-I/O threads (a cap of CPUs - 1) measured worse in the
/// bench's 2-thread cells on these 2-vCPU VMs (`usermm bench --quick --patterns
/// uniform,hotcold --w-over-b 1.25,4 --threads 2 --write-ratios 0` and `0.5`,
/// both caps alternating, two runs each): usermm's accesses/s were higher with
/// one per CPU in 11 of 16 cell pairs (uniform W/B 1.25 by 12–35 %, hot/cold W/B
/// 1.25 by 8–22 %), within 2 % in 3, lower in 2 (hot/cold W/B 4: 18 % and 7 %).
/// A thread that needs a CPU still gets one from the scheduler; a spinner spins
/// only while its own thread would otherwise sleep.
fn spin_cap() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `f` with this thread's device reads polled for up to `spin` each
/// (`Config::read_poll`): a read of the file device then goes through the
/// thread's ring, and the thread watches the completion queue instead of sleeping
/// until the interrupt's wake-up (measured on these VMs: a 4 KiB O_DIRECT read at
/// depth 1 completes at p50 37–43 µs polled against 52–62 µs slept; the
/// difference is the sleeping vCPU's wake-up). A read still in flight after
/// `spin` sleeps as before.
pub(crate) fn polled<R>(spin: Duration, f: impl FnOnce() -> R) -> R {
    /// Puts the thread's setting back, however `f` ends.
    struct Restore(Duration);
    impl Drop for Restore {
        fn drop(&mut self) {
            POLL.set(self.0);
        }
    }
    let _restore = Restore(POLL.replace(spin));
    f()
}

/// Whether this thread's reads are polled now (inside `polled` with a non-zero
/// spin). Callers know whether io_uring works (the file device's `uring`).
pub(crate) fn polling() -> bool {
    !POLL.get().is_zero()
}

/// Whether io_uring works here (probed once, by making a small ring).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| IoUring::new(4).is_ok())
}

/// Makes the calling thread's ring now (if io_uring works), so that its first
/// `read_scattered` or polled read does not, and settles `spin_cap`.
pub(crate) fn prepare() {
    // Its first call reads the cgroup's CPU limit (allocating): made here, before
    // a handler's no-allocation section.
    spin_cap();
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

/// Pages written at once at most (a page-I/O thread gathers 32; `write_pages`
/// takes 64).
pub(crate) const MAX_WRITES: usize = 64;

/// The page-out request pool's buffers registered with the kernel once (pinned,
/// counted against RLIMIT_MEMLOCK once: 1 MiB for the default 256 requests) in a
/// ring of their own, which the page-I/O threads' rings clone
/// (`IORING_REGISTER_CLONE_BUFFERS`, Linux 6.12) instead of registering them
/// again each (16 threads would count 16 MiB against a limit of 8).
pub(crate) struct Registered {
    ring: IoUring,
    base: usize,
    len: usize,
    /// Whether a ring could clone the registration when it was made and the
    /// kernel has `WRITEV_FIXED` (probed once: Linux 6.15 and later); where not,
    /// the threads' rings write without registered buffers.
    clones: bool,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("len", &self.len)
            .finish()
    }
}

impl Registered {
    /// Registers `len` bytes at `base` as buffer 0 of a new ring.
    ///
    /// # Safety
    /// The memory stays mapped while the returned value lives (writes name
    /// addresses inside it). The kernel pins its pages for as long as this ring or
    /// a ring that cloned the registration lives (a page-I/O thread's may outlive
    /// it), so an unmapping while a clone lives frees nothing the kernel uses;
    /// no write is in flight then (every one is waited for).
    pub(crate) unsafe fn new(base: *mut u8, len: usize) -> io::Result<Registered> {
        if !available() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let ring = IoUring::new(1)?;
        let iov = libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        // SAFETY: the caller keeps the memory mapped while the ring lives; the
        // kernel only reads it (writes to the device).
        unsafe { ring.submitter().register_buffers(&[iov])? };
        // Writes name the buffers with `WRITEV_FIXED` (Linux 6.15), in rings that
        // clone the registration (6.12): both, or the rings write without them.
        let mut ops = io_uring::Probe::new();
        let writev_fixed = ring.submitter().register_probe(&mut ops).is_ok()
            && ops.is_supported(opcode::WritevFixed::CODE);
        let clones = writev_fixed
            && IoUring::new(1).is_ok_and(|probe| {
                let src = std::os::fd::AsRawFd::as_raw_fd(&ring);
                probe.submitter().register_buffers_clone(src).is_ok()
            });
        Ok(Registered {
            ring,
            base: base as usize,
            len,
            clones,
        })
    }

    /// Whether the page-I/O threads' rings name these buffers (the clone works
    /// here).
    pub(crate) fn clones(&self) -> bool {
        self.clones
    }
}

/// How a page-I/O thread writes pages (`prepare_writes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteMode {
    /// Through its ring, naming the request pool's registered buffers.
    Registered,
    /// Through its ring, buffers mapped by the kernel per write.
    Uring,
    /// One `pwritev` per run (no io_uring here).
    Positioned,
}

/// Makes the calling page-I/O thread's ring and clones `reg`'s buffers into it,
/// so that its page-outs go through `write_runs`. Called before the thread's
/// no-allocation section (making a ring allocates).
pub(crate) fn prepare_writes(reg: Option<&Registered>) -> WriteMode {
    prepare();
    RING.with(|cell| {
        let slot = cell.borrow();
        let Some(r) = slot.as_ref() else {
            return WriteMode::Positioned;
        };
        WRITES_ON.set(true);
        match reg {
            Some(reg)
                if reg.clones
                    && r.ring
                        .submitter()
                        .register_buffers_clone(std::os::fd::AsRawFd::as_raw_fd(&reg.ring))
                        .is_ok() =>
            {
                WRITES.set(Some((reg.base, reg.len)));
                WriteMode::Registered
            }
            _ => WriteMode::Uring,
        }
    })
}

/// Writes runs of pages, `runs[k] = (byte offset, pages)`, taking their pages
/// from `bufs` in order, all in flight at once, one vectored write a run (one
/// request, as `pwritev`; a write a page, left to the block layer's plug to
/// merge, made 4.6 pages a request where `pwritev` made 7.2 in a `usermm run`
/// probe); `ok[k]` says whether run `k` was written whole. A run whose pages are
/// all in the registered pool names them by buffer index (`WRITEV_FIXED`, Linux
/// 6.15: no mapping of them per write). `None` on a thread that
/// `prepare_writes` did not set up (the caller writes itself).
pub(crate) fn write_runs(
    fd: RawFd,
    runs: &[(u64, u32)],
    bufs: &[&[u8]],
    ok: &mut [bool],
) -> Option<()> {
    if !WRITES_ON.get() {
        return None;
    }
    let pages: usize = runs.iter().map(|r| r.1 as usize).sum();
    if pages > MAX_WRITES
        || runs.len() > MAX_WRITES
        || runs.iter().any(|r| r.1 == 0)
        || bufs.len() != pages
        || ok.len() < runs.len()
    {
        return None;
    }
    let fixed = WRITES.get();
    // One iovec a page, on the stack: run `k`'s are a slice of these, alive until
    // every write has completed (below).
    let iov = iovecs(bufs);
    let inside = |b: &[u8]| {
        fixed.is_some_and(|(base, len)| {
            let a = b.as_ptr() as usize;
            a >= base && a + b.len() <= base + len
        })
    };
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ring = &mut slot.as_mut()?.ring;
        ok[..runs.len()].fill(true);
        // The bytes each run must write (`user_data` is the run's index).
        let mut want = [0i32; MAX_WRITES];
        let mut submitted = 0usize;
        {
            let mut sq = ring.submission();
            let mut at = 0usize;
            for (k, &(off, n)) in runs.iter().enumerate() {
                let n = n as usize;
                let vec = &iov[at..at + n];
                want[k] = vec.iter().map(|v| v.iov_len as i32).sum();
                // One vectored write a run (one request, as `pwritev` makes),
                // naming the registered buffers when every page is in them.
                let e = if bufs[at..at + n].iter().all(|b| inside(b)) {
                    opcode::WritevFixed::new(types::Fd(fd), vec.as_ptr(), n as u32, 0)
                        .offset(off)
                        .build()
                } else {
                    opcode::Writev::new(types::Fd(fd), vec.as_ptr(), n as u32)
                        .offset(off)
                        .build()
                };
                at += n;
                // SAFETY: the entry points to `iov[..]` and through it into
                // `bufs`, which all outlive the write: every submitted write is
                // waited for below, whatever fails.
                if unsafe { sq.push(&e.user_data(k as u64)) }.is_err() {
                    ok[k] = false;
                } else {
                    submitted += 1;
                }
            }
        }
        let mut on_cqe = |r: i32, user: u64| {
            let k = user as usize;
            if want.get(k) != Some(&r) {
                // An error or a short write: the run's pages stay resident.
                if let Some(o) = ok.get_mut(k) {
                    *o = false;
                }
            }
        };
        if wait_all(ring, submitted, 0, &mut on_cqe).is_err() {
            ok[..runs.len()].fill(false);
        }
        Some(())
    })
}

/// One iovec per buffer of `bufs` (the first `MAX_WRITES`), on the stack: the
/// write paths allocate nothing (invariant 2).
pub(crate) fn iovecs(bufs: &[&[u8]]) -> [libc::iovec; MAX_WRITES] {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_WRITES];
    for (v, b) in iov.iter_mut().zip(bufs) {
        v.iov_base = b.as_ptr() as *mut libc::c_void;
        v.iov_len = b.len();
    }
    iov
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
    with_ring(|ring| submit_and_reap(ring, fd, reqs, buf))
}

/// Reads `buf.len()` bytes (whole pages) at byte offset `off` of `fd` through
/// the thread's ring, polled as `polled` set. `None` if this thread has no ring
/// and cannot make one (the caller reads with `pread`).
pub(crate) fn read_at(fd: RawFd, off: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
    let len = u32::try_from(buf.len()).ok()?;
    read_scattered(fd, &[(off, len)], buf)
}

/// Runs `f` on this thread's ring, made first if need be; `None` if it cannot be.
fn with_ring<R>(f: impl FnOnce(&mut IoUring) -> R) -> Option<R> {
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
        Some(f(&mut slot.as_mut().expect("made above").ring))
    })
}

/// Reaps the completions there are into `on`; returns how many.
fn reap(ring: &mut IoUring, on: &mut impl FnMut(i32, u64)) -> usize {
    let mut n = 0;
    for cqe in ring.completion() {
        n += 1;
        on(cqe.result(), cqe.user_data());
    }
    n
}

/// Submits what is queued and waits until `submitted` completions in all have
/// been reaped into `on` (`reaped` of them already were). Every I/O in flight
/// lands before this returns, so its buffer can be given back; the first error
/// of the ring itself (not of an I/O) is returned.
fn wait_all(
    ring: &mut IoUring,
    submitted: usize,
    mut reaped: usize,
    on: &mut impl FnMut(i32, u64),
) -> io::Result<()> {
    let mut result = Ok(());
    let mut waits = 0u32;
    while reaped < submitted {
        match ring.submit_and_wait(submitted - reaped) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // I/O may be in flight: it must land before its buffer is given
                // back. A ring that refuses to wait at all is broken; give it a few
                // tries, then wait for the I/O's own completion by polling.
                waits += 1;
                if result.is_ok() {
                    result = Err(e);
                }
                if waits > 3 {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
            }
        }
        reaped += reap(ring, on);
    }
    result
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
    // The first read that failed (kept apart from `result`, which the wait sets).
    let mut failed: Option<io::Error> = None;
    let mut on_cqe = |r: i32, user: u64| {
        let len = want[(user as usize).min(MAX_READS - 1)];
        if r as i64 != i64::from(len) && failed.is_none() {
            failed = Some(if r < 0 {
                io::Error::from_raw_os_error(-r)
            } else {
                // A short read (the file shrank under us).
                io::ErrorKind::UnexpectedEof.into()
            });
        }
    };
    let spin = POLL.get();
    // Polled: submit without waiting, then watch the completion queue for up to
    // `spin` (the completions are posted by the task work the interrupt queues to
    // this thread, which runs on its way back to user space), if fewer than
    // `spin_cap` threads spin already. What is still in flight then is waited for.
    if !spin.is_zero() && submitted > 0 {
        if SPINNERS.fetch_add(1, Ordering::Relaxed) < spin_cap() {
            let submit = loop {
                match ring.submit() {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            if submit.is_ok() {
                let t = Instant::now();
                loop {
                    reaped += reap(ring, &mut on_cqe);
                    if reaped == submitted || t.elapsed() >= spin {
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
        }
        SPINNERS.fetch_sub(1, Ordering::Relaxed);
    }
    if let Err(e) = wait_all(ring, submitted, reaped, &mut on_cqe) {
        if result.is_ok() {
            result = Err(e);
        }
    }
    match failed {
        Some(e) if result.is_ok() => Err(e),
        _ => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};

    /// A file of `n` pages, page `p` filled with `byte(p)`, in a temporary
    /// directory; `None` (SKIP) where io_uring is unavailable, unless CI asks for
    /// everything (USERMM_REQUIRE_URING=1): then a failure.
    fn pages_file(n: u64, byte: fn(u64) -> u8) -> Option<(tempfile::TempDir, std::fs::File)> {
        if !available() {
            assert_ne!(
                std::env::var("USERMM_REQUIRE_URING").as_deref(),
                Ok("1"),
                "io_uring required but not available here"
            );
            eprintln!("SKIP: io_uring is not available here");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create_new(dir.path().join("f")).unwrap();
        for p in 0..n {
            f.write_all_at(&[byte(p); PAGE_SIZE], p * PAGE_SIZE as u64)
                .unwrap();
        }
        Some((dir, f))
    }

    #[test]
    fn scattered_reads_land_in_order_and_errors_are_reported() {
        let Some((_dir, f)) = pages_file(64, |p| p as u8) else {
            return;
        };
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

    #[test]
    fn polled_reads_land_and_a_late_one_is_waited_for() {
        let Some((_dir, f)) = pages_file(8, |p| p as u8 + 1) else {
            return;
        };
        let spin = Duration::from_micros(200);
        assert!(!polling(), "not polled outside `polled`");
        polled(spin, || {
            assert!(polling());
            let mut page = vec![0u8; PAGE_SIZE];
            for p in [3u64, 0, 7] {
                read_at(f.as_raw_fd(), p * PAGE_SIZE as u64, &mut page)
                    .expect("a ring")
                    .unwrap();
                assert!(page.iter().all(|&b| b == p as u8 + 1), "page {p}");
            }
            // Errors as unpolled: past the end, a bad descriptor.
            let r = read_at(f.as_raw_fd(), 8 * PAGE_SIZE as u64, &mut page).expect("a ring");
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
            let r = read_at(-1, 0, &mut page).expect("a ring");
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
            // A read that completes long after the spin (a pipe written 50 ms
            // later): the thread stops spinning and waits for it; it must not
            // return while the kernel may still write into the buffer.
            let mut fds = [0i32; 2];
            // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            let writer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let data = [9u8; PAGE_SIZE];
                // SAFETY: `data` is PAGE_SIZE bytes; `fds[1]` is the pipe's write end.
                let n = unsafe { libc::write(fds[1], data.as_ptr().cast(), PAGE_SIZE) };
                assert_eq!(n, PAGE_SIZE as isize);
                // SAFETY: our descriptor, closed once.
                unsafe { libc::close(fds[1]) };
            });
            page.fill(0);
            let t = Instant::now();
            let r = read_at(fds[0], 0, &mut page).expect("a ring");
            let waited = t.elapsed();
            writer.join().unwrap();
            // SAFETY: our descriptor, closed once.
            unsafe { libc::close(fds[0]) };
            r.unwrap();
            assert!(page.iter().all(|&b| b == 9), "the late read's bytes");
            assert!(
                waited >= Duration::from_millis(40),
                "returned after {waited:?}"
            );
        });
        assert!(!polling(), "`polled` restores the thread's setting");
    }

    #[test]
    fn runs_are_written_through_registered_buffers_and_failures_are_per_run() {
        let Some((_dir, f)) = pages_file(16, |_| 0) else {
            return;
        };
        let pool = crate::device::AlignedPages::new(8).unwrap();
        // SAFETY: `pool` outlives `reg` (dropped first, below).
        let reg = unsafe { Registered::new(pool.ptr(0), pool.bytes()) }.unwrap();
        // A thread of its own, like a page-I/O thread (the rings are per thread).
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = f.as_raw_fd();
                let mut ok = [false; 3];
                assert_eq!(
                    write_runs(fd, &[(0, 1)], &[&[0u8; PAGE_SIZE]], &mut ok),
                    None
                );
                let mode = prepare_writes(Some(&reg));
                let want = if reg.clones() {
                    WriteMode::Registered
                } else {
                    WriteMode::Uring
                };
                assert_eq!(mode, want);
                let bufs: Vec<&[u8]> = (0..8)
                    .map(|i| {
                        // SAFETY: page `i` of `pool`, written here before the
                        // writes and only read after.
                        let p = unsafe { std::slice::from_raw_parts_mut(pool.ptr(i), PAGE_SIZE) };
                        p.fill(0x30 + i as u8);
                        &*p
                    })
                    .collect();
                // A page from outside the pool (not registered) as well.
                let outside = crate::device::AlignedPages::new(1).unwrap();
                // SAFETY: one page of `outside`, only read by the write.
                let out = unsafe { std::slice::from_raw_parts_mut(outside.ptr(0), PAGE_SIZE) };
                out.fill(0x7f);
                let mut all: Vec<&[u8]> = bufs.clone();
                all.push(out);
                // Runs: slots 2..5 (3 pages), 9..13 (4), then the unregistered page
                // at a byte offset O_DIRECT refuses (EINVAL): that run fails and
                // the others do not.
                let direct = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(_dir.path().join("f"))
                    .unwrap();
                let runs = [
                    (2 * PAGE_SIZE as u64, 3),
                    (9 * PAGE_SIZE as u64, 4),
                    (15 * PAGE_SIZE as u64 + 1, 1),
                ];
                let mut eight = all[..7].to_vec();
                eight.push(out);
                let fd = direct.as_raw_fd();
                assert_eq!(write_runs(fd, &runs, &eight, &mut ok), Some(()));
                assert_eq!(ok, [true, true, false]);
                // The same page at an aligned offset is written.
                let mut one = [false];
                let at = [(15 * PAGE_SIZE as u64, 1)];
                assert_eq!(write_runs(fd, &at, &eight[7..], &mut one), Some(()));
                assert_eq!(one, [true]);
                let mut page = [0u8; PAGE_SIZE];
                for (slot, want) in [(2u64, 0x30u8), (4, 0x32), (9, 0x33), (12, 0x36), (15, 0x7f)] {
                    f.read_exact_at(&mut page, slot * PAGE_SIZE as u64).unwrap();
                    assert!(page.iter().all(|&b| b == want), "slot {slot}");
                }
                f.read_exact_at(&mut page, 5 * PAGE_SIZE as u64).unwrap();
                assert!(page.iter().all(|&b| b == 0), "slot 5 was not written");
                // A descriptor that refuses writes: every run fails, nothing hangs.
                assert_eq!(write_runs(-1, &runs[..2], &eight[..7], &mut ok), Some(()));
                assert_eq!(ok[..2], [false, false]);
            });
        });
        drop(reg);
    }
}
