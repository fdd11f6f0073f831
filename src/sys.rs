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

/// Whether the page at `addr` (page-aligned, in a mapping of this process) is in
/// the page table now (`mincore(2)`: for an anonymous page, mapped or in the swap
/// cache). A missing or unmapped page, or a failed call, is not resident. Never
/// faults; allocates nothing.
pub fn resident(addr: u64) -> bool {
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
    r == 0 && vec & 1 != 0
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
