//! Raw memory system calls for usermm's own mappings (the frame arena, I/O
//! buffers, transparent regions, the staging area, page zaps).
//!
//! Raw, not libc's symbols: `usermm exec`'s preload library exports `mmap`,
//! `munmap` and `madvise` to serve the program's heap from a transparent region, and
//! usermm's own mappings and zaps must never be served by (or recurse into) the heap
//! they manage (the preload uses these same calls to reach the kernel). Owns
//! nothing; no locks.

use libc::c_void;

/// `mmap(2)`; `MAP_FAILED` with errno set on failure.
///
/// # Safety
/// As the system call: mapping over existing memory (`MAP_FIXED`) must not pull
/// memory from under live references.
pub unsafe fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
) -> *mut c_void {
    // SAFETY: per the caller; `syscall` returns -1 (MAP_FAILED) with errno set.
    unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void }
}

/// `munmap(2)`.
///
/// # Safety
/// Nothing may refer to the range afterwards.
pub unsafe fn munmap(addr: *mut c_void, len: usize) -> i32 {
    // SAFETY: per the caller.
    unsafe { libc::syscall(libc::SYS_munmap, addr, len) as i32 }
}

/// `madvise(2)`.
///
/// # Safety
/// Advice that drops pages (`MADV_DONTNEED`) must only be given where nothing
/// relies on their contents.
pub unsafe fn madvise(addr: *mut c_void, len: usize, advice: i32) -> i32 {
    // SAFETY: per the caller.
    unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) as i32 }
}

/// Whether the page at `addr` (page-aligned, in a private anonymous mapping of
/// this process) has contents in the page table: mapped, or swapped out by the
/// kernel (its own swap, under a memory cgroup of the user's, say). False for a
/// missing page (`pte_none`: what a userfaultfd `MISSING` fault reports). Never
/// faults; allocates nothing.
///
/// `mincore(2)` first (a mapped page: done); a page it does not report resident
/// is looked up in `/proc/self/pagemap` (bit 63 present, bit 62 swapped), since
/// `mincore` does not count a page the kernel swapped out. If that file cannot be
/// read the page counts as there: the callers report a page that is *not* there
/// as a broken invariant and fail the program's access, which must never happen
/// because of a file we could not open. Raw system calls, as the rest of this
/// module (nothing of the C library's that a preload could serve).
pub fn page_there(addr: u64) -> bool {
    let mut vec = 0u8;
    // SAFETY: `mincore` writes one byte for one page into `vec`, on our stack; it
    // only looks at the page table.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mincore,
            addr as *mut c_void,
            crate::addr::PAGE_SIZE,
            &raw mut vec,
        )
    };
    if r == 0 && vec & 1 != 0 {
        return true;
    }
    in_pagemap(addr).unwrap_or(true)
}

/// Whether `/proc/self/pagemap` shows the page at `addr` present or swapped;
/// `None` if it cannot be read. No allocation.
fn in_pagemap(addr: u64) -> Option<bool> {
    pagemap_entry(addr).map(|e| e & (PM_PRESENT | PM_SWAPPED) != 0)
}

/// `/proc/self/pagemap`: the page is present.
const PM_PRESENT: u64 = 1 << 63;
/// `/proc/self/pagemap`: the page is on the kernel's swap.
const PM_SWAPPED: u64 = 1 << 62;
/// `/proc/self/pagemap`: the page is mapped exactly once (not shared with a fork
/// child copy-on-write).
const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;

/// Whether the page at `addr` is present and mapped exactly once, by this
/// mapping (`/proc/self/pagemap` bit 56): not shared copy-on-write with a fork
/// child. `None` if it cannot be read. No allocation, never faults.
///
/// `UFFDIO_MOVE` refuses (`EBUSY`) a page that is shared *or* pinned (for DMA, by
/// `O_DIRECT` or io_uring); a page pinned for a device to write into it is always
/// exclusive (the pin breaks copy-on-write first), so an exclusive page the move
/// refused may be being written behind the page tables, and a shared one cannot.
pub(crate) fn page_exclusive(addr: u64) -> Option<bool> {
    pagemap_entry(addr)
        .map(|e| e & (PM_PRESENT | PM_MMAP_EXCLUSIVE) == PM_PRESENT | PM_MMAP_EXCLUSIVE)
}

/// Which of the `out.len()` pages from `addr` (page-aligned) the kernel's own swap
/// holds (`/proc/self/pagemap` bit 62): `out[i]` is set for page `i`. Pages
/// `mincore` does not count as resident but whose contents exist. False for all if
/// the file cannot be read. One read per 512 pages; no allocation.
pub(crate) fn kernel_swapped(addr: u64, out: &mut [bool]) -> bool {
    const CHUNK: usize = 512;
    let mut buf = [0u64; CHUNK];
    let Some(fd) = open_pagemap() else {
        out.fill(false);
        return false;
    };
    let mut ok = true;
    for (k, part) in out.chunks_mut(CHUNK).enumerate() {
        let first = addr / crate::addr::PAGE_SIZE as u64 + (k * CHUNK) as u64;
        let want = part.len() * 8;
        // SAFETY: reading at most `want` bytes into `buf`, on our stack, which has
        // room for `CHUNK` entries.
        let n = unsafe {
            libc::syscall(
                libc::SYS_pread64,
                fd,
                buf.as_mut_ptr().cast::<c_void>(),
                want,
                first * 8,
            )
        };
        if n != want as i64 {
            part.fill(false);
            ok = false;
            continue;
        }
        for (o, &e) in part.iter_mut().zip(buf.iter()) {
            *o = e & PM_SWAPPED != 0;
        }
    }
    // SAFETY: our descriptor, closed once.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    ok
}

/// `/proc/self/pagemap` opened read-only (a raw descriptor the caller closes), or
/// `None`. No allocation.
fn open_pagemap() -> Option<i64> {
    // SAFETY: opening a static NUL-terminated path read-only, close-on-exec.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/proc/self/pagemap".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    (fd >= 0).then_some(fd)
}

/// The page's 64-bit entry in `/proc/self/pagemap`; `None` if it cannot be read.
/// No allocation.
pub(crate) fn pagemap_entry(addr: u64) -> Option<u64> {
    let fd = open_pagemap()?;
    let mut e = 0u64;
    let off = addr / crate::addr::PAGE_SIZE as u64 * 8;
    // SAFETY: reading 8 bytes into `e`, on our stack, from our descriptor, which
    // we close right after.
    let n = unsafe {
        let n = libc::syscall(
            libc::SYS_pread64,
            fd,
            (&raw mut e).cast::<c_void>(),
            8usize,
            off,
        );
        libc::syscall(libc::SYS_close, fd);
        n
    };
    (n == 8).then_some(e)
}

/// Set once this process has forked since its first transparent memory
/// (`mm::transparent::Host::start` registers the handler): its pages may then be,
/// or have been, shared copy-on-write with another process, which `UFFDIO_MOVE`
/// refuses as it refuses a pinned page (`reclaim::stage`). Set by a
/// `pthread_atfork` prepare handler, so every fork through the C library counts
/// (`usermm exec`'s wrapper, `libc::fork`, `std::process::Command`'s fallback,
/// `daemon`); a raw `clone` without `CLONE_VM` does not. A fork child inherits it.
static FORKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process has forked since its first transparent memory (`FORKED`).
pub(crate) fn process_forked() -> bool {
    FORKED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Set in a forked child of `usermm exec` once its Vm adopted its parent's
/// transparent memory (`Vm::adopt_fork`); said in `reclaim::say_lost`'s line.
static ADOPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks this process as a forked child that adopted its parent's memory.
pub(crate) fn note_adopted() {
    ADOPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// What this process is as to forks, for a diagnostic line: "a forked child
/// (adopted)", "forked", or "never forked".
pub(crate) fn fork_role() -> &'static str {
    if ADOPTED.load(std::sync::atomic::Ordering::Relaxed) {
        "a forked child (adopted)"
    } else if process_forked() {
        "forked"
    } else {
        "never forked"
    }
}

/// Marks this process as forked (`FORKED`); also what the atfork handler does.
pub(crate) fn note_fork() {
    FORKED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Registers the atfork handler that sets `FORKED`, once per process.
pub(crate) fn watch_forks() {
    extern "C" fn prepare() {
        note_fork();
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a handler that only stores to an atomic
        // (async-signal-safe); nothing is unregistered, ever.
        unsafe { libc::pthread_atfork(Some(prepare), None, None) };
    });
}

/// `pidfd` sentinel for the calling process (Linux 6.14).
const PIDFD_SELF_THREAD_GROUP: i32 = -10001;

/// How `zap_pages` reaches the kernel here: 0 not tried yet, 1 `process_madvise`
/// on `PIDFD_SELF_THREAD_GROUP`, 2 on a pidfd opened per call, 3 one `madvise`
/// per page (a kernel without `process_madvise(MADV_DONTNEED)` for oneself).
static ZAP_MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Drops the pages at `addrs` (each one page) with `MADV_DONTNEED`, in one
/// `process_madvise` call per 64 pages where the kernel allows it, so that the
/// batch costs one TLB flush (one interrupt of each CPU running this process)
/// instead of one per page. Allocates nothing (the I/O vector is on the stack).
///
/// # Safety
/// Nothing may rely on the contents of those pages.
pub(crate) unsafe fn zap_pages(addrs: &[u64]) {
    use std::sync::atomic::Ordering;
    const PAGE: usize = crate::addr::PAGE_SIZE;
    for chunk in addrs.chunks(64) {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 64];
        for (v, &a) in iov.iter_mut().zip(chunk) {
            v.iov_base = a as *mut c_void;
            v.iov_len = PAGE;
        }
        let want = (chunk.len() * PAGE) as isize;
        let mut done = false;
        let mode = ZAP_MODE.load(Ordering::Relaxed);
        if mode <= 1 {
            // SAFETY: a vector of `chunk.len()` valid iovecs on the stack; per the
            // caller, the pages may be dropped.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    PIDFD_SELF_THREAD_GROUP,
                    iov.as_ptr(),
                    chunk.len(),
                    libc::MADV_DONTNEED,
                    0,
                )
            } as isize;
            done = r == want;
            ZAP_MODE.store(if done { 1 } else { 2 }, Ordering::Relaxed);
        }
        if !done && ZAP_MODE.load(Ordering::Relaxed) == 2 {
            // SAFETY: pidfd_open of our own pid; checked below, closed after.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as i32;
            if fd >= 0 {
                // SAFETY: as above, on a pidfd of this process.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_process_madvise,
                        fd,
                        iov.as_ptr(),
                        chunk.len(),
                        libc::MADV_DONTNEED,
                        0,
                    )
                } as isize;
                // SAFETY: closing the pidfd we opened.
                unsafe { libc::close(fd) };
                done = r == want;
            }
            if !done {
                ZAP_MODE.store(3, Ordering::Relaxed);
            }
        }
        if !done {
            // One page at a time (dropping a page twice is harmless).
            for &a in chunk {
                // SAFETY: per the caller.
                unsafe { madvise(a as *mut c_void, PAGE, libc::MADV_DONTNEED) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `page_there` tells a mapped page from a missing one, whichever of its two
    /// lookups answers: a touched page is there; one dropped with `MADV_DONTNEED`
    /// and one never touched are not.
    #[test]
    fn page_there_tells_mapped_from_missing() {
        const PS: usize = crate::addr::PAGE_SIZE;
        // SAFETY: a fresh private anonymous mapping of three pages, checked below,
        // unmapped at the end.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                3 * PS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // No transparent huge page (which would make the untouched page resident).
        // SAFETY: advice on our own mapping.
        unsafe { madvise(p, 3 * PS, libc::MADV_NOHUGEPAGE) };
        let a = p as u64;
        // SAFETY: inside our mapping.
        unsafe {
            (p as *mut u8).write_volatile(1);
            (p as *mut u8).add(PS).write_volatile(1);
        }
        assert!(page_there(a));
        assert!(page_there(a + PS as u64));
        assert_eq!(in_pagemap(a), Some(true), "pagemap misses a mapped page");
        // SAFETY: dropping our own second page.
        let r = unsafe { madvise((p as *mut u8).add(PS).cast(), PS, libc::MADV_DONTNEED) };
        assert_eq!(r, 0);
        assert!(!page_there(a + PS as u64), "a dropped page is there");
        assert!(!page_there(a + 2 * PS as u64), "an untouched page is there");
        assert_eq!(in_pagemap(a + PS as u64), Some(false));
        assert!(page_there(a));
        // SAFETY: our mapping, no longer used.
        unsafe { munmap(p, 3 * PS) };
    }

    /// The pagemap bits the pinned-page rule reads (`page_exclusive`): a written
    /// private page is mapped once; while a fork child shares it, not. And a page
    /// in memory is not on the kernel's swap (`kernel_swapped` reads it).
    #[test]
    fn pagemap_tells_a_page_mapped_once_from_one_shared_with_a_fork_child() {
        const PS: usize = crate::addr::PAGE_SIZE;
        // SAFETY: a fresh private anonymous page, checked below, unmapped at the end.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                PS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: inside our mapping.
        unsafe { (p as *mut u8).write_volatile(1) };
        let a = p as u64;
        assert_eq!(page_exclusive(a), Some(true), "a written private page");
        let mut swapped = [true; 1];
        assert!(kernel_swapped(a, &mut swapped), "pagemap could not be read");
        assert!(
            !swapped[0],
            "a page in memory counted as on the kernel's swap"
        );
        let mut fds = [0; 2];
        // SAFETY: a pipe; two descriptors into our array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only reads the pipe and leaves with `_exit`
        // (async-signal-safe calls only).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut b = 0u8;
            // SAFETY: our pipe's read end; one byte into `b`. Ends at EOF.
            unsafe {
                libc::close(fds[1]);
                libc::read(fds[0], (&raw mut b).cast(), 1);
                libc::_exit(0);
            }
        }
        assert!(pid > 0);
        let shared = page_exclusive(a);
        // SAFETY: our descriptors; closing the write end lets the child go.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        let mut st = 0;
        // SAFETY: our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
        assert_eq!(shared, Some(false), "a page shared with a fork child");
        // SAFETY: our own mapping.
        unsafe { munmap(p, PS) };
    }
}
