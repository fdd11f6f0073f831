//! Page-aligned buffers for device I/O (O_DIRECT needs them): one anonymous mapping
//! per buffer, mapped once at start-up by whoever owns it (the page-I/O request pool,
//! swapoff's bounce buffer, the mirror's resync page). No locks.

use crate::addr::PAGE_SIZE;
use std::io;

/// Page-aligned buffers from one anonymous mapping.
#[derive(Debug)]
pub struct AlignedPages {
    ptr: *mut u8,
    pages: usize,
}

// SAFETY: the mapping is owned by this value; shared access goes through `&self`
// methods that hand out raw pointers, whose users synchronise (one request has one
// owner at a time, handed over through the request queues).
unsafe impl Send for AlignedPages {}
// SAFETY: as above.
unsafe impl Sync for AlignedPages {}

impl AlignedPages {
    /// Maps `pages` zeroed, page-aligned pages.
    pub fn new(pages: usize) -> io::Result<AlignedPages> {
        let len = pages.max(1) * PAGE_SIZE;
        // SAFETY: anonymous private mapping; the result is checked.
        let ptr = unsafe {
            crate::sys::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(AlignedPages {
            ptr: ptr.cast(),
            pages: pages.max(1),
        })
    }
    /// Raw pointer to page `i`.
    pub fn ptr(&self, i: usize) -> *mut u8 {
        assert!(i < self.pages);
        // SAFETY: i < pages, inside the mapping.
        unsafe { self.ptr.add(i * PAGE_SIZE) }
    }
    /// Page `i`.
    pub fn page(&self, i: usize) -> &[u8] {
        // SAFETY: inside the mapping; `&self` means no `&mut` from `page_mut` is live.
        unsafe { std::slice::from_raw_parts(self.ptr(i), PAGE_SIZE) }
    }
    /// Page `i`, mutable.
    pub fn page_mut(&mut self, i: usize) -> &mut [u8] {
        // SAFETY: inside the mapping; `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(i), PAGE_SIZE) }
    }
    /// The first `n` pages, mutable, as one slice.
    pub fn pages_mut(&mut self, n: usize) -> &mut [u8] {
        assert!(n <= self.pages);
        // SAFETY: inside the mapping; `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, n * PAGE_SIZE) }
    }
    /// Bytes mapped.
    pub fn bytes(&self) -> usize {
        self.pages * PAGE_SIZE
    }
}

impl Drop for AlignedPages {
    fn drop(&mut self) {
        // SAFETY: the mapping created in `new`, unmapped once.
        let rc = unsafe { crate::sys::munmap(self.ptr.cast(), self.pages * PAGE_SIZE) };
        assert_eq!(rc, 0, "munmap of a buffer mapping failed");
    }
}
