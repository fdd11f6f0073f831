//! The fault-path half of a process fork of transparent regions (see
//! `mm::transparent_fork`, which builds these): a forked child's table of "foreign"
//! pages (bytes in a slot of an ancestor's swap file) as its fault handler consults
//! it, the descriptors that tell the ancestors when their slots may go, and the
//! bitmap of a region's touched chunks that a fork scans. Below `transparent`, which
//! calls it from the `Pte::Empty` branch of a missing fault; nothing here allocates
//! or blocks on that path.
//!
//! Owns: `Rec`, `Foreign`, `Keepers`, `TRegion::touched`'s layout.
//!
//! ## Locking
//! `Keepers::fds` (Mutex, leaf): taken by the handler that takes the last record
//! (to close them) and by a fork (to duplicate them for a grandchild); nothing is
//! taken or allocated under it.

use crate::addr::PAGE_SIZE;
use crate::device::AlignedPages;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::stats::Counters;
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};
use std::os::fd::RawFd;

/// Pages per bit of `TRegion::touched` (2 MiB; one page of entries).
pub(super) const CHUNK: u64 = 512;

/// The `touched` bitmap of a region of `pages` pages, all clear.
pub(super) fn chunk_bitmap(pages: u64) -> Box<[AtomicU64]> {
    (0..pages.div_ceil(CHUNK).div_ceil(64))
        .map(|_| AtomicU64::new(0))
        .collect()
}

/// Fault path (`Pte::Empty` branch, before the page is mapped, so a process fork
/// that copies the mapping copies a bitmap that covers it): page `idx` of a region
/// whose bitmap is `touched` is filled. One load when the bit is set already; no
/// allocation.
pub(super) fn touch(touched: &[AtomicU64], idx: u64) {
    let c = idx / CHUNK;
    let w = &touched[(c / 64) as usize];
    let bit = 1u64 << (c % 64);
    if w.load(Ordering::Relaxed) & bit == 0 {
        w.fetch_or(bit, Ordering::SeqCst);
    }
}

/// A page of a forked region whose bytes are in a slot of an ancestor's swap file.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rec {
    /// Page index in its region.
    pub(super) idx: u64,
    /// The ancestor's swap file, inherited through the fork.
    pub(super) fd: RawFd,
    /// Byte offset of the slot in that file.
    pub(super) off: u64,
    /// CRC32C recorded when the slot was written.
    pub(super) csum: u32,
}

/// Descriptors whose closing tells ancestors their slots may go: the write end of the
/// pipe to the parent and the duplicates of the parent's own keepers (a grandchild).
#[derive(Debug)]
pub(crate) struct Keepers {
    /// Protected by its mutex (a leaf); empty once closed.
    pub(super) fds: Mutex<Vec<RawFd>>,
    /// Records not taken yet, over all regions (relaxed is not enough: the last
    /// decrement closes the descriptors; AcqRel).
    pub(super) left: AtomicUsize,
}

impl Keepers {
    pub(super) fn close(&self) {
        let mut fds = self.fds.lock();
        for fd in fds.drain(..) {
            // SAFETY: a descriptor we own (made or inherited for this purpose); closed
            // once, under the lock.
            unsafe { libc::close(fd) };
        }
    }

    fn took_one(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.close();
        }
    }
}

/// A forked child's view of one region's foreign pages (see the module header).
#[derive(Debug)]
pub(crate) struct Foreign {
    /// Sorted by page index. Immutable.
    pub(super) recs: Box<[Rec]>,
    /// One per record: the page was mapped (or found resident) in this process.
    pub(super) taken: Box<[AtomicBool]>,
    pub(super) keepers: Arc<Keepers>,
}

impl Foreign {
    pub(super) fn find(&self, idx: u64) -> Option<usize> {
        self.recs.binary_search_by_key(&idx, |r| r.idx).ok()
    }

    pub(super) fn take(&self, k: usize) {
        if !self.taken[k].swap(true, Ordering::AcqRel) {
            self.keepers.took_one();
        }
    }
}

/// Fault path, `Pte::Empty` branch of a missing fault on page `idx` of a region
/// with foreign pages `f` (the entry claimed `BUSY` by the caller): if the page is
/// an untaken foreign page, reads it into `bounce` (checksum checked) and returns
/// its record. No allocation, no lock.
pub(super) fn fill(
    f: Option<&Foreign>,
    idx: u64,
    bounce: &mut AlignedPages,
) -> Result<Option<usize>> {
    let Some(f) = f else {
        return Ok(None);
    };
    let Some(k) = f.find(idx) else {
        return Ok(None);
    };
    if f.taken[k].load(Ordering::Acquire) {
        // Mapped once already, then released (never its bytes again).
        return Ok(None);
    }
    read_rec(&f.recs[k], bounce.page_mut(0))?;
    Ok(Some(k))
}

/// Reads a record's page into `buf` (page-sized, page-aligned) and checks its
/// checksum. No allocation.
pub(super) fn read_rec(rec: &Rec, buf: &mut [u8]) -> Result<()> {
    let fail = |kind: std::io::ErrorKind| Error::Device {
        dev: String::new(),
        source: std::io::Error::from(kind),
    };
    loop {
        // SAFETY: `buf` is a live exclusive page-sized buffer, page-aligned (the
        // ancestor's file may be O_DIRECT); the kernel writes at most PAGE_SIZE bytes.
        let n = unsafe {
            libc::pread(
                rec.fd,
                buf.as_mut_ptr().cast(),
                PAGE_SIZE,
                rec.off as libc::off_t,
            )
        };
        if n == PAGE_SIZE as isize {
            break;
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return Err(fail(if n < 0 {
            std::io::Error::last_os_error().kind()
        } else {
            std::io::ErrorKind::UnexpectedEof
        }));
    }
    if crc32c::crc32c(buf) != rec.csum {
        return Err(fail(std::io::ErrorKind::InvalidData));
    }
    Ok(())
}

/// Fault path, after the page `fill` read is mapped and published: the record is
/// taken (the last one closes the keepers).
pub(super) fn filled(f: Option<&Foreign>, eng: &Engine, k: Option<usize>) {
    if let (Some(f), Some(k)) = (f, k) {
        f.take(k);
        eng.foreign_reads.fetch_add(1, Ordering::Relaxed);
        Counters::inc(&eng.cnt.pgmajfault);
    }
}

/// Pages `[first, first + n)` of a region with foreign pages `f` no longer hold
/// their fork-time bytes (the program released them): their records must never be
/// read. For a discard of transparent pages; call with the entries claimed or known
/// `EMPTY`.
pub(super) fn forget(f: Option<&Foreign>, first: u64, n: u64) {
    let Some(f) = f else {
        return;
    };
    let at = f.recs.partition_point(|x| x.idx < first);
    for (k, rec) in f.recs.iter().enumerate().skip(at) {
        if rec.idx >= first + n {
            break;
        }
        f.take(k);
    }
}
