//! The file table the page-I/O threads see: one preallocated slot per open host
//! file (descriptor, length, write-backs in flight, write errors).
//!
//! Owns: `FileSlots`, sized when the Vm starts (`Config::max_files`), and the
//! encoding of a file page's identity in a frame descriptor (`index`). Reclaim and
//! the page-I/O threads write a dirty file page back through its slot: they need no
//! `Arc` of the file's inode, take no lock and allocate nothing (invariants 1, 2).
//! An inode (`filemap::inode`) holds its slot from open to teardown, and does not
//! give it back (nor close the descriptor) while a write-back through it is in
//! flight (`inflight`), so a descriptor a request names is always the file's.
//!
//! ## Locking
//! `free` (Mutex, leaf) is taken only to take or give back a slot, by the inode's
//! open and teardown; the slots themselves are atomics.

use crate::addr::PAGE_SIZE;
use crate::sync::{AtomicI32, AtomicU64, Mutex, Ordering};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

/// Bits of a page number in an `index` (the page table's limit is 2^35 pages).
const PGOFF_BITS: u32 = 40;

/// A file page's identity as kept in `PageDesc::index` and in a page-out request.
pub(crate) fn index(slot: u32, pgoff: u64) -> u64 {
    debug_assert!(pgoff < 1 << PGOFF_BITS);
    (u64::from(slot) << PGOFF_BITS) | pgoff
}

/// The (slot, page number) of an `index`.
pub(crate) fn split(index: u64) -> (u32, u64) {
    (
        (index >> PGOFF_BITS) as u32,
        index & ((1 << PGOFF_BITS) - 1),
    )
}

/// One open file as the I/O threads see it.
#[derive(Debug)]
pub(crate) struct FileSlot {
    /// The descriptor (read-write), or -1 while the slot is free.
    fd: AtomicI32,
    /// The file's length in bytes as usermm knows it: write-back never writes
    /// past it (the tail of the last page stays out of the file).
    pub len: AtomicU64,
    /// Write-backs of this file's pages queued or being written.
    pub inflight: AtomicU64,
    /// Write-backs queued ever, and completed ever: a sync waits for those queued
    /// before it began (`completed` reaching `submitted` as it read it), not for
    /// the queue to empty, which under steady pressure it may never do.
    pub submitted: AtomicU64,
    pub completed: AtomicU64,
    /// Write-backs that failed, ever (`msync` and `File::sync` report a change).
    pub errors: AtomicU64,
    /// The errno of the last failed write-back.
    pub last_errno: AtomicI32,
}

/// The preallocated table of file slots.
#[derive(Debug)]
pub(crate) struct FileSlots {
    slots: Box<[FileSlot]>,
    /// Free slot numbers (capacity reserved at start: pushing never allocates).
    free: Mutex<Vec<u32>>,
}

impl FileSlots {
    pub fn new(n: usize) -> FileSlots {
        let n = n.min(1 << 20);
        FileSlots {
            slots: (0..n)
                .map(|_| FileSlot {
                    fd: AtomicI32::new(-1),
                    len: AtomicU64::new(0),
                    inflight: AtomicU64::new(0),
                    submitted: AtomicU64::new(0),
                    completed: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    last_errno: AtomicI32::new(0),
                })
                .collect(),
            free: Mutex::new((0..n as u32).rev().collect()),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn metadata_bytes(&self) -> usize {
        self.slots.len() * (std::mem::size_of::<FileSlot>() + 4)
    }

    /// Takes a free slot for descriptor `fd` of a file of `len` bytes. None when
    /// every slot is taken.
    pub fn take(&self, fd: i32, len: u64) -> Option<u32> {
        let s = self.free.lock().pop()?;
        let slot = &self.slots[s as usize];
        slot.len.store(len, Ordering::Relaxed);
        slot.inflight.store(0, Ordering::Relaxed);
        slot.submitted.store(0, Ordering::Relaxed);
        slot.completed.store(0, Ordering::Relaxed);
        slot.errors.store(0, Ordering::Relaxed);
        slot.last_errno.store(0, Ordering::Relaxed);
        slot.fd.store(fd, Ordering::Release);
        Some(s)
    }

    /// Gives slot `s` back. Precondition: no write-back through it is in flight and
    /// no frame names it any more; the caller closes the descriptor afterwards.
    pub fn give_back(&self, s: u32) {
        debug_assert_eq!(self.get(s).inflight.load(Ordering::Acquire), 0);
        self.slots[s as usize].fd.store(-1, Ordering::Release);
        self.free.lock().push(s);
    }

    pub fn get(&self, s: u32) -> &FileSlot {
        &self.slots[s as usize]
    }

    /// Writes one page of buffer `buf` as page `pgoff` of the file in slot `s`,
    /// clipped to the file's length (runs on a page-I/O thread: no allocation).
    pub fn write_page(&self, s: u32, pgoff: u64, buf: &[u8]) -> io::Result<()> {
        let slot = self.get(s);
        let fd = slot.fd.load(Ordering::Acquire);
        if fd < 0 {
            return Err(io::Error::other("file closed"));
        }
        let off = pgoff * PAGE_SIZE as u64;
        let len = slot.len.load(Ordering::Relaxed);
        let n = len.saturating_sub(off).min(PAGE_SIZE as u64) as usize;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: `fd` is open for as long as this write-back is in flight (the
        // inode waits for `inflight` to drop before it closes it); ManuallyDrop keeps
        // the temporary File from closing it.
        let f = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
        f.write_all_at(&buf[..n], off)
    }

    /// Records a failed write-back of slot `s`.
    pub fn failed(&self, s: u32, e: &io::Error) {
        let slot = self.get(s);
        slot.last_errno
            .store(e.raw_os_error().unwrap_or(libc::EIO), Ordering::Relaxed);
        slot.errors.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips() {
        for (s, p) in [(0, 0), (1, 5), (1023, (1 << 35) - 1)] {
            assert_eq!(split(index(s, p)), (s, p));
        }
    }

    #[test]
    fn slots_run_out_and_come_back() {
        let t = FileSlots::new(2);
        let a = t.take(10, 0).unwrap();
        let b = t.take(11, 0).unwrap();
        assert_ne!(a, b);
        assert!(t.take(12, 0).is_none());
        t.give_back(a);
        assert_eq!(t.take(13, 0), Some(a));
    }
}
