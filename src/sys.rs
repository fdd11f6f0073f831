//! Raw memory system calls for usermm's own mappings (the frame arena, I/O
//! buffers, transparent regions, the staging area, page zaps).
//!
//! Raw, not libc's symbols: `usermm exec`'s preload library exports `mmap`,
//! `munmap` and `madvise` to serve the program's heap from a transparent region, and
//! usermm's own mappings and zaps must never be served by (or recurse into) the heap
//! they manage. Owns nothing; no locks.

use libc::c_void;

/// `mmap(2)`; `MAP_FAILED` with errno set on failure.
///
/// # Safety
/// As the system call: mapping over existing memory (`MAP_FIXED`) must not pull
/// memory from under live references.
pub(crate) unsafe fn mmap(
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
pub(crate) unsafe fn munmap(addr: *mut c_void, len: usize) -> i32 {
    // SAFETY: per the caller.
    unsafe { libc::syscall(libc::SYS_munmap, addr, len) as i32 }
}

/// `madvise(2)`.
///
/// # Safety
/// Advice that drops pages (`MADV_DONTNEED`) must only be given where nothing
/// relies on their contents.
pub(crate) unsafe fn madvise(addr: *mut c_void, len: usize, advice: i32) -> i32 {
    // SAFETY: per the caller.
    unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) as i32 }
}
