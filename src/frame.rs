//! The frame arena: the memory budget as `budget / 4096` page frames mapped once at
//! start-up, their page descriptors, the free list, the watermarks and the reserve.
//!
//! Owns: the arena mapping, `PageDesc` for every frame, the free list.
//! Keeps: the budget (DESIGN.md "memory discipline"): nothing else in the engine
//! holds page data; every page a space shows lives in one of these frames, in a
//! request buffer of the page-I/O pool (preallocated, metadata) or on a device.
//!
//! ## The per-frame protocol
//! Each descriptor carries a sequence lock `seq` (odd = locked). It is held only for
//! short, bounded critical sections that never block, do I/O or allocate: copying a
//! page into or out of the frame, changing the frame's owner, its flags or the
//! page-table entry that maps it. Every transition of a page-table entry to or from
//! `Present(pfn)` happens with `pfn`'s lock held, so "the entry still says `pfn`"
//! checked under the lock means the frame holds that page.
//!
//! Readers of resident pages do not lock: they read `seq`, check the entry, copy
//! with atomic loads and check `seq` again (the seqlock pattern, on atomics so it is
//! not a data race; see `copy_out`). A reader that finds the lock held does not spin
//! on it: it falls back to the locked path (DESIGN.md invariant 5).
//!
//! Long-lived holds are pins (`pins`), taken and given under the lock: a count of
//! shared guards, or `PIN_EXCL` for a mutable guard. Reclaim and writers skip or wait
//! for pinned frames; optimistic readers skip frames pinned exclusively.
//!
//! ## Locking
//! `free` (the free list mutex) is a leaf lock: nothing is taken under it. It is never
//! held while waiting; waiters sleep on `freed` (a condvar on the same mutex).
//! Frame kinds: today every frame is a page of the arena; a resident page of a
//! transparent (userfaultfd) region will be a second kind with the same descriptor,
//! counted against the same budget.

use crate::sync::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering,
};
use crate::types::{Pfn, PAGE_SIZE};
use std::io;
use std::time::Duration;

/// Frame is allocated (owned by a page, or being filled for one).
pub(crate) const F_INUSE: u32 = 1;
/// The page was written since its swap copy was made (or it has none yet).
pub(crate) const F_DIRTY: u32 = 2;
/// A page-out request for this page is in flight.
pub(crate) const F_WRITEBACK: u32 = 4;

/// `pins` value of a mutable guard.
pub(crate) const PIN_EXCL: u32 = 1 << 31;

/// Who may take a frame below the min watermark.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum AllocCtx {
    /// An application access: stops at the min watermark.
    Normal,
    /// Reclaim or page-I/O: may use the reserve below min. Today neither needs a
    /// frame (page-out copies into the preallocated request pool); swapoff and
    /// swap-in readahead, which pull pages in on reclaim's behalf, will.
    #[allow(dead_code)]
    Reserve,
}

/// The page descriptor of one frame (the kernel's `struct page`), minus the two
/// words the hit path reads, which live in compact arrays of their own (see
/// `FrameRef`) so that a read of a resident page touches no descriptor.
#[derive(Debug)]
pub(crate) struct PageDesc {
    /// Guard pins: a count of shared guards or `PIN_EXCL`. Protected by the frame lock.
    pub pins: AtomicU32,
    /// `F_*` flags. Protected by the frame lock.
    pub flags: AtomicU32,
    /// Bumped at every allocation, so a page-out completion can tell whether the frame
    /// still holds the page it copied. Protected by the frame lock.
    pub epoch: AtomicU32,
    /// The page-table entry that maps this frame (null while unowned). Protected by
    /// the frame lock.
    pub owner: AtomicPtr<AtomicU64>,
    /// Encoded swap entry of the page's swap copy (`Pte::swapped`), 0 if none. The copy
    /// is valid when the page is not `F_DIRTY`. Holds one slot reference. Protected by
    /// the frame lock.
    pub swap: AtomicU64,
}

impl PageDesc {
    fn new() -> PageDesc {
        PageDesc {
            pins: AtomicU32::new(0),
            flags: AtomicU32::new(0),
            epoch: AtomicU32::new(0),
            owner: AtomicPtr::new(std::ptr::null_mut()),
            swap: AtomicU64::new(0),
        }
    }
}

/// Sequence word: locked.
pub(crate) const SEQ_LOCK: u32 = 1;
/// Sequence word: pinned by a mutable guard (optimistic readers stay off).
pub(crate) const SEQ_EXCL: u32 = 2;
const SEQ_ONE: u32 = 4;

/// One frame's sequence word, reference bit and descriptor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameRef<'a> {
    /// Sequence lock: `SEQ_LOCK` while locked, `SEQ_EXCL` while a mutable guard pins
    /// the frame, and a count (in steps of `SEQ_ONE`) that moves at every unlock.
    pub seq: &'a AtomicU32,
    /// CLOCK reference bit: set by any access without a lock, cleared by reclaim.
    pub referenced: &'a AtomicBool,
    desc: &'a PageDesc,
}

impl std::ops::Deref for FrameRef<'_> {
    type Target = PageDesc;
    fn deref(&self) -> &PageDesc {
        self.desc
    }
}

impl FrameRef<'_> {
    /// Takes the frame lock if it is free; returns the locked sequence value.
    #[inline]
    pub fn try_lock(&self) -> Option<u32> {
        let s = self.seq.load(Ordering::Relaxed);
        if s & SEQ_LOCK != 0 {
            return None;
        }
        self.seq
            .compare_exchange(s, s | SEQ_LOCK, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // Seqlock writer side: the locked value must be visible before any store made
        // under the lock, so a reader that sees such a store also sees the count move.
        crate::sync::fence(Ordering::Release);
        Some(s | SEQ_LOCK)
    }

    /// Takes the frame lock, waiting for a holder to leave its short section.
    pub fn lock(&self) -> u32 {
        let mut got = 0;
        crate::sync::wait_until(|| match self.try_lock() {
            Some(s) => {
                got = s;
                true
            }
            None => false,
        });
        got
    }

    /// Releases the lock taken as `locked`, publishing everything written under it.
    /// The count moves, and `SEQ_EXCL` follows whether a mutable guard holds the pin.
    #[inline]
    pub fn unlock(&self, locked: u32) {
        debug_assert_eq!(self.seq.load(Ordering::Relaxed), locked);
        let excl = if self.desc.pins.load(Ordering::Relaxed) == PIN_EXCL {
            SEQ_EXCL
        } else {
            0
        };
        let next = (locked & !(SEQ_LOCK | SEQ_EXCL)).wrapping_add(SEQ_ONE) | excl;
        self.seq.store(next, Ordering::Release);
    }

    /// Sets the reference bit (no store when it is set already).
    #[inline]
    pub fn touch(&self) {
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
    }
}

/// The frame arena.
#[derive(Debug)]
pub(crate) struct FrameArena {
    base: *mut u8,
    nframes: usize,
    descs: Box<[PageDesc]>,
    seqs: Box<[AtomicU32]>,
    refs: Box<[AtomicBool]>,
    /// Free frame numbers (a stack: the most recently freed, cache-warm frame first).
    /// Capacity `nframes`, so pushing never allocates.
    free: Mutex<Vec<u32>>,
    freed: Condvar,
    nfree: AtomicUsize,
    waiters: AtomicUsize,
    /// `[min, low, high]` in frames.
    pub wmark: [usize; 3],
}

// SAFETY: `base` points to a private mapping owned by the arena for its whole life;
// all access to frame memory goes through the per-frame protocol above (atomics and
// the sequence lock), so sharing the arena between threads is sound.
unsafe impl Send for FrameArena {}
// SAFETY: as for Send.
unsafe impl Sync for FrameArena {}

impl FrameArena {
    pub fn new(nframes: usize, wmark: [usize; 3]) -> io::Result<FrameArena> {
        let len = nframes * PAGE_SIZE;
        // SAFETY: anonymous private mapping, no address hint; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Huge pages make the arena cheaper to address (fewer TLB misses on the hit
        // path); the arena is the budget, so they cost no memory beyond it. Advisory.
        // SAFETY: the range is the mapping just created.
        unsafe { libc::madvise(base, len, libc::MADV_HUGEPAGE) };
        let mut free = Vec::with_capacity(nframes);
        free.extend((0..nframes as u32).rev());
        Ok(FrameArena {
            base: base.cast(),
            nframes,
            descs: (0..nframes).map(|_| PageDesc::new()).collect(),
            seqs: (0..nframes).map(|_| AtomicU32::new(0)).collect(),
            refs: (0..nframes).map(|_| AtomicBool::new(false)).collect(),
            free: Mutex::new(free),
            freed: Condvar::new(),
            nfree: AtomicUsize::new(nframes),
            waiters: AtomicUsize::new(0),
            wmark,
        })
    }

    pub fn nframes(&self) -> usize {
        self.nframes
    }

    /// Bytes of metadata the arena holds besides the frames.
    pub fn metadata_bytes(&self) -> usize {
        self.nframes * (std::mem::size_of::<PageDesc>() + 4 + 4 + 1)
    }

    #[inline]
    pub fn desc(&self, pfn: Pfn) -> FrameRef<'_> {
        let i = pfn.0 as usize;
        FrameRef {
            seq: &self.seqs[i],
            referenced: &self.refs[i],
            desc: &self.descs[i],
        }
    }

    /// The sequence word and reference bit of `pfn` alone (all the hit path looks at).
    /// `None` for a frame number outside the arena (never stored in an entry).
    #[inline]
    pub fn hot(&self, pfn: Pfn) -> Option<(&AtomicU32, &AtomicBool)> {
        let i = pfn.0 as usize;
        Some((self.seqs.get(i)?, self.refs.get(i)?))
    }

    /// Start of frame `pfn`'s memory.
    #[inline]
    pub fn frame_ptr(&self, pfn: Pfn) -> *mut u8 {
        debug_assert!((pfn.0 as usize) < self.nframes);
        // SAFETY: pfn < nframes, so the offset stays inside the arena mapping.
        unsafe { self.base.add(pfn.0 as usize * PAGE_SIZE) }
    }

    pub fn free_count(&self) -> usize {
        self.nfree.load(Ordering::Relaxed)
    }

    /// Takes a free frame: above the min watermark for `Normal`, down to the last
    /// frame for `Reserve`. The frame comes back `F_INUSE` with a new epoch, no owner.
    pub fn alloc(&self, ctx: AllocCtx) -> Option<Pfn> {
        let floor = match ctx {
            AllocCtx::Normal => self.wmark[0],
            AllocCtx::Reserve => 0,
        };
        let pfn = {
            let mut free = self.free.lock();
            if free.len() <= floor {
                return None;
            }
            let p = free.pop()?;
            self.nfree.store(free.len(), Ordering::Relaxed);
            p
        };
        let d = self.desc(Pfn(pfn));
        let s = d.lock();
        debug_assert_eq!(d.flags.load(Ordering::Relaxed), 0);
        d.flags.store(F_INUSE, Ordering::Relaxed);
        d.epoch.store(
            d.epoch.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
        d.referenced.store(true, Ordering::Relaxed);
        d.unlock(s);
        Some(Pfn(pfn))
    }

    /// Returns a frame to the free list. Precondition: the caller has cleared its
    /// owner and swap entry and holds no reference to its memory.
    pub fn free(&self, pfn: Pfn) {
        let d = self.desc(pfn);
        let s = d.lock();
        debug_assert!(d.owner.load(Ordering::Relaxed).is_null());
        debug_assert_eq!(d.swap.load(Ordering::Relaxed), 0);
        debug_assert_eq!(d.pins.load(Ordering::Relaxed), 0);
        d.flags.store(0, Ordering::Relaxed);
        d.unlock(s);
        let mut free = self.free.lock();
        debug_assert!(free.len() < self.nframes);
        free.push(pfn.0);
        self.nfree.store(free.len(), Ordering::Relaxed);
        if self.waiters.load(Ordering::Relaxed) > 0 {
            self.freed.notify_all();
        }
    }

    /// Wakes threads waiting in `wait_for_free` (after a page-out completed, say).
    pub fn notify_waiters(&self) {
        if self.waiters.load(Ordering::Relaxed) > 0 {
            let _g = self.free.lock();
            self.freed.notify_all();
        }
    }

    /// Sleeps until a frame is freed or `notify_waiters` is called, at most `timeout`.
    pub fn wait_for_free(&self, timeout: Duration) {
        let mut free = self.free.lock();
        if free.len() > self.wmark[0] {
            return;
        }
        self.waiters.fetch_add(1, Ordering::Relaxed);
        self.freed.wait_for(&mut free, timeout);
        self.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for FrameArena {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this length and nothing
        // refers to it any more (the arena is being dropped).
        let rc = unsafe { libc::munmap(self.base.cast(), self.nframes * PAGE_SIZE) };
        // Keeping memory mapped that nobody can reach is worse than stopping here.
        assert_eq!(rc, 0, "munmap of the frame arena failed");
    }
}

/// Copies `dst.len()` bytes from frame memory at `src` with relaxed atomic loads, so
/// that a concurrent writer (who stores atomically under the frame lock) is not a data
/// race; the caller validates the result with the frame's sequence count.
///
/// # Safety
/// `src..src + dst.len()` must lie inside the arena mapping.
#[inline]
pub(crate) unsafe fn copy_out(src: *const u8, dst: &mut [u8]) {
    if dst.len() == 8 && (src as usize) % 8 == 0 {
        // The common case of a word-sized access: one load.
        // SAFETY: inside the arena (caller's contract) and 8-byte aligned.
        let w = unsafe { AtomicU64::from_ptr(src as *mut u64) }.load(Ordering::Relaxed);
        dst.copy_from_slice(&w.to_ne_bytes());
        return;
    }
    let mut i = 0;
    let n = dst.len();
    while i < n && (src as usize + i) % 8 != 0 {
        // SAFETY: inside the arena (caller's contract); AtomicU8 has alignment 1.
        dst[i] = unsafe { crate::sync::AtomicU8::from_ptr(src.add(i) as *mut u8) }
            .load(Ordering::Relaxed);
        i += 1;
    }
    while i + 8 <= n {
        // SAFETY: inside the arena and 8-byte aligned (loop above).
        let w = unsafe { AtomicU64::from_ptr(src.add(i) as *mut u64) }.load(Ordering::Relaxed);
        dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: inside the arena; alignment 1.
        dst[i] = unsafe { crate::sync::AtomicU8::from_ptr(src.add(i) as *mut u8) }
            .load(Ordering::Relaxed);
        i += 1;
    }
}

/// Copies `src` into frame memory at `dst` with relaxed atomic stores (see `copy_out`).
///
/// # Safety
/// `dst..dst + src.len()` must lie inside the arena mapping, and the caller must hold
/// the frame's lock (or own the frame exclusively).
#[inline]
pub(crate) unsafe fn copy_in(dst: *mut u8, src: &[u8]) {
    let mut i = 0;
    let n = src.len();
    while i < n && (dst as usize + i) % 8 != 0 {
        // SAFETY: inside the arena (caller's contract); alignment 1.
        unsafe { crate::sync::AtomicU8::from_ptr(dst.add(i)) }.store(src[i], Ordering::Relaxed);
        i += 1;
    }
    while i + 8 <= n {
        let mut w = [0u8; 8];
        w.copy_from_slice(&src[i..i + 8]);
        // SAFETY: inside the arena and 8-byte aligned.
        unsafe { AtomicU64::from_ptr(dst.add(i) as *mut u64) }
            .store(u64::from_ne_bytes(w), Ordering::Relaxed);
        i += 8;
    }
    while i < n {
        // SAFETY: inside the arena; alignment 1.
        unsafe { crate::sync::AtomicU8::from_ptr(dst.add(i)) }.store(src[i], Ordering::Relaxed);
        i += 1;
    }
}

/// Zeroes one frame with atomic stores.
///
/// # Safety
/// `dst` must be the start of a frame the caller owns.
pub(crate) unsafe fn zero_frame(dst: *mut u8) {
    for i in (0..PAGE_SIZE).step_by(8) {
        // SAFETY: inside the frame; frames are page aligned.
        unsafe { AtomicU64::from_ptr(dst.add(i) as *mut u64) }.store(0, Ordering::Relaxed);
    }
}
