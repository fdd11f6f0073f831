//! The frame arena: the memory budget as `budget / 4096` page frames mapped once at
//! start-up, their page descriptors, the free list, the watermarks and the reserve.
//!
//! Owns: the arena mapping, `PageDesc` for every frame, the free list.
//! Keeps: the budget (docs/design.md "memory discipline"): nothing else in the engine
//! holds page data; every page a space shows lives in one of these frames, in a
//! request buffer of the page-I/O pool (preallocated, metadata) or on a device.
//!
//! ## The per-frame protocol
//! Each descriptor has a small spin lock (`PageDesc::lock`) for its ownership: which
//! page-table entry maps the frame (`owner`), its swap copy, its flags and epoch. It
//! is held only for short, bounded sections that never block, do I/O or allocate.
//! An entry becomes present or stops being present only with the frame's lock held,
//! so reclaim, holding it, can follow `owner` to the entry safely.
//!
//! The page's bytes are guarded by its page-table entry, not by the frame: see
//! `pagetable` (the entry is the page's sequence lock). Lock order: frame lock, then
//! entry lock. The hit path takes neither.
//!
//! ## Locking
//! `free` (the free list mutex) is a leaf lock: nothing is taken under it. It is never
//! held while waiting; waiters sleep on `freed` (a condvar on the same mutex).
//! Frame kinds: today every frame is a page of the arena; a resident page of a
//! transparent (userfaultfd) region will be a second kind with the same descriptor,
//! counted against the same budget.

use crate::addr::{Pfn, PAGE_SIZE};
use crate::sync::raw::{AtomicU64 as RawU64, AtomicU8 as RawU8};
use crate::sync::{
    AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Condvar, Mutex, Ordering,
};
use std::io;
use std::time::Duration;

/// Frame is allocated (owned by a page, or being filled for one).
pub(crate) const F_INUSE: u32 = 1;
/// A page-out request for this page is in flight.
pub(crate) const F_WRITEBACK: u32 = 4;
/// The frame is the budget token of a resident page of a transparent region: the
/// page's bytes live in the region's own mapping at `PageDesc::owner2` (its address),
/// not in the arena. See `mm::transparent`.
pub(crate) const F_TRANSPARENT: u32 = 8;
/// The frame holds a page of a host file's page cache (`filemap`): its one mapping
/// is the cache's entry, `PageDesc::index` says which file and page, and the file
/// (not a swap slot) is where it is written back (see `reclaim`).
pub(crate) const F_FILE: u32 = 16;
/// The page is in reclaim's small FIFO (S3-FIFO's probation queue, see `reclaim`).
pub(crate) const F_SMALL: u32 = 32;
/// ... and the small FIFO has visited it once already.
pub(crate) const F_SEEN: u32 = 64;

/// Who may take a frame below the min watermark.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum AllocCtx {
    /// An application access: stops at the min watermark.
    Normal,
    /// May use the reserve below min: a swap-in when memory and swap are both full,
    /// whose read frees a slot so reclaim can make progress again (reclaim and
    /// page-I/O themselves never need a frame: page-out copies into the
    /// preallocated request pool).
    Reserve,
}

/// The page descriptor of one frame (the kernel's `struct page`).
#[derive(Debug)]
pub(crate) struct PageDesc {
    /// The frame lock itself (1 = held): a spin lock taken by CAS, held only for
    /// short sections that never block, allocate or do I/O.
    lock: AtomicU32,
    /// Number of page-table entries mapping the frame (see `rmap`). Protected by the
    /// frame lock.
    pub mapcount: AtomicU32,
    /// `F_*` flags. Protected by the frame lock.
    pub flags: AtomicU32,
    /// Bumped at every allocation, so a page-out completion can tell whether the frame
    /// still holds the page it copied, and so entry versions start afresh. Protected
    /// by the frame lock.
    pub epoch: AtomicU32,
    /// The first page-table entry that maps this frame (null while unmapped); others
    /// are in the reverse map's side table. Protected by the frame lock.
    pub owner: AtomicPtr<AtomicU64>,
    /// The second mapping, after a fork. Protected by the frame lock.
    pub owner2: AtomicPtr<AtomicU64>,
    /// Encoded swap entry of the page's swap copy (`Pte::swapped`), 0 if none. The copy
    /// is valid while the entry is not `P_DIRTY`. Holds one slot reference. Protected
    /// by the frame lock.
    pub swap: AtomicU64,
    /// An `F_FILE` page's file slot and page number (`filemap::slots::index`).
    /// Protected by the frame lock; meaningless without `F_FILE`.
    pub index: AtomicU64,
    /// The page's use count and the epoch it was counted in (`Engine::freq_stamp`):
    /// faults and reference bits seen by reclaim, for `Policy::Frequency`. Written
    /// at install and under the frame lock; relaxed (a heuristic: a lost update
    /// costs nothing but a point of count).
    pub freq: AtomicU8,
}

impl PageDesc {
    fn new() -> PageDesc {
        PageDesc {
            lock: AtomicU32::new(0),
            mapcount: AtomicU32::new(0),
            flags: AtomicU32::new(0),
            epoch: AtomicU32::new(0),
            owner: AtomicPtr::new(std::ptr::null_mut()),
            owner2: AtomicPtr::new(std::ptr::null_mut()),
            swap: AtomicU64::new(0),
            index: AtomicU64::new(0),
            freq: AtomicU8::new(0),
        }
    }

    /// Takes the frame lock if it is free.
    #[inline]
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn try_lock(&self) -> bool {
        let ok = self.raw_try_lock();
        #[cfg(feature = "lockdep")]
        if ok {
            self.lockdep_acquire(true);
        }
        ok
    }

    #[inline]
    fn raw_try_lock(&self) -> bool {
        self.lock.load(Ordering::Relaxed) == 0
            && self
                .lock
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    }

    /// Takes the frame lock, waiting for a holder to leave its short section.
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn lock(&self) {
        #[cfg(feature = "lockdep")]
        self.lockdep_acquire(false);
        crate::sync::wait_until(|| self.raw_try_lock());
    }

    /// Takes the lock of a frame just allocated and mapped by nobody: no thread can
    /// be waiting for it while holding a lock of ours (reclaim only try-locks), so
    /// it is not ordered against what the caller holds (the lock validator records
    /// it as a try-lock). `Engine::install` takes it under an entry lock in
    /// `cow_break`, against the usual frame → entry order.
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn lock_fresh(&self) {
        crate::sync::wait_until(|| self.raw_try_lock());
        #[cfg(feature = "lockdep")]
        self.lockdep_acquire(true);
    }

    /// Releases the frame lock.
    #[inline]
    pub fn unlock(&self) {
        debug_assert_eq!(self.lock.load(Ordering::Relaxed), 1);
        self.lock.store(0, Ordering::Release);
        #[cfg(feature = "lockdep")]
        crate::lockdep::release(self as *const Self as usize);
    }

    /// Records the acquisition (class `lockdep::FRAME`, a spin lock).
    #[cfg(feature = "lockdep")]
    #[track_caller]
    fn lockdep_acquire(&self, try_: bool) {
        use crate::lockdep::{acquire_at, Kind, FRAME};
        acquire_at(FRAME, Kind::Spin, self, try_);
    }

    /// Whether the lock is held (for assertions).
    pub fn is_locked(&self) -> bool {
        self.lock.load(Ordering::Relaxed) != 0
    }
}

/// The frame arena.
#[derive(Debug)]
pub(crate) struct FrameArena {
    /// The arena mapping (immutable after `new`; frame bytes follow the entry
    /// protocol of `crate::pte`).
    base: *mut u8,
    /// Frames in the arena (immutable).
    nframes: usize,
    /// One descriptor per frame; each protected by its own frame lock.
    descs: Box<[PageDesc]>,
    /// Free frame numbers (a stack: the most recently freed, cache-warm frame first).
    /// Capacity `nframes`, so pushing never allocates. Protected by its mutex (a
    /// leaf, never taken under a frame lock).
    free: Mutex<Vec<u32>>,
    /// Signalled (with `free` held) when frames are freed or a page-out completes,
    /// for allocators waiting in direct reclaim.
    freed: Condvar,
    /// Length of `free`, readable without the lock (relaxed; exact under it).
    nfree: AtomicUsize,
    /// Counts frees and page-out completions, so a waiter that saw a value before
    /// scanning sleeps only if nothing happened since (relaxed atomic).
    events: AtomicU64,
    /// Threads sleeping on `freed` (relaxed; lets `free` skip the notify).
    waiters: AtomicUsize,
    /// `[min, low, high]` in frames (immutable).
    pub wmark: [usize; 3],
}

// SAFETY: `base` points to a private mapping owned by the arena for its whole life;
// all access to frame memory goes through the per-frame protocol above (atomics and
// the sequence lock), so sharing the arena between threads is sound.
unsafe impl Send for FrameArena {}
// SAFETY: as for Send.
unsafe impl Sync for FrameArena {}

/// Says on stderr that frame `pfn` was freed while free (a few times a process),
/// with the trail of the frame (`USERMM_TRAIL=1`). No allocation.
#[cold]
fn double_free(pfn: Pfn) {
    use std::fmt::Write;
    static SAID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if SAID.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 4 {
        return;
    }
    let mut c = crate::trail::StackBuf::<160>::new();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let _ = writeln!(c, "usermm: BUG: frame {} freed twice (pid {pid})", pfn.0);
    c.flush();
    crate::trail::dump(u64::MAX, Some(pfn.0));
}

impl FrameArena {
    pub fn new(nframes: usize, wmark: [usize; 3]) -> io::Result<FrameArena> {
        let len = nframes * PAGE_SIZE;
        // SAFETY: anonymous private mapping, no address hint; the result is checked.
        let base = unsafe {
            crate::sys::mmap(
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
        unsafe { crate::sys::madvise(base, len, libc::MADV_HUGEPAGE) };
        let mut free = Vec::with_capacity(nframes);
        free.extend((0..nframes as u32).rev());
        Ok(FrameArena {
            base: base.cast(),
            nframes,
            descs: (0..nframes).map(|_| PageDesc::new()).collect(),
            free: Mutex::new(free),
            freed: Condvar::new(),
            nfree: AtomicUsize::new(nframes),
            events: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            wmark,
        })
    }

    pub fn nframes(&self) -> usize {
        self.nframes
    }

    /// Bytes of metadata the arena holds besides the frames.
    pub fn metadata_bytes(&self) -> usize {
        self.nframes * (std::mem::size_of::<PageDesc>() + 4)
    }

    #[inline]
    pub fn desc(&self, pfn: Pfn) -> &PageDesc {
        &self.descs[pfn.0 as usize]
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
        d.lock();
        debug_assert_eq!(d.flags.load(Ordering::Relaxed), 0);
        d.flags.store(F_INUSE, Ordering::Relaxed);
        d.epoch.store(
            d.epoch.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
        d.unlock();
        Some(Pfn(pfn))
    }

    /// Returns a frame to the free list. Precondition: the caller has cleared its
    /// owner and swap entry and holds no reference to its memory.
    pub fn free(&self, pfn: Pfn) {
        let d = self.desc(pfn);
        d.lock();
        debug_assert!(d.owner.load(Ordering::Relaxed).is_null());
        debug_assert_eq!(d.swap.load(Ordering::Relaxed), 0);
        debug_assert_eq!(d.mapcount.load(Ordering::Relaxed), 0);
        if d.flags.load(Ordering::Relaxed) & F_INUSE == 0 {
            // Freed twice (a broken invariant): pushing it again would hand one
            // frame to two pages. Said, and left out of the list.
            d.unlock();
            double_free(pfn);
            return;
        }
        d.flags.store(0, Ordering::Relaxed);
        d.unlock();
        {
            let mut free = self.free.lock();
            debug_assert!(free.len() < self.nframes);
            free.push(pfn.0);
            self.nfree.store(free.len(), Ordering::Relaxed);
        }
        self.notify_waiters();
    }

    /// The event count to pass to `wait_event`; read it before looking for work.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    /// Records an event (a frame freed, a page-out completed) and wakes waiters.
    pub fn notify_waiters(&self) {
        self.events.fetch_add(1, Ordering::SeqCst);
        // Pairs with the waiter's increment-then-check: one of the two sees the other.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.free.lock();
            self.freed.notify_all();
        }
    }

    /// Sleeps until an event happens after `seen` was read, at most `timeout`.
    pub fn wait_event(&self, seen: u64, timeout: Duration) {
        let mut g = self.free.lock();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        if self.events.load(Ordering::SeqCst) == seen {
            self.freed.wait_for(&mut g, timeout);
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for FrameArena {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this length and nothing
        // refers to it any more (the arena is being dropped).
        let rc = unsafe { crate::sys::munmap(self.base.cast(), self.nframes * PAGE_SIZE) };
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
    if dst.len() == 8 && (src as usize).is_multiple_of(8) {
        // The common case of a word-sized access: one load.
        // SAFETY: inside the arena (caller's contract) and 8-byte aligned.
        let w = unsafe { RawU64::from_ptr(src as *mut u64) }.load(Ordering::Relaxed);
        dst.copy_from_slice(&w.to_ne_bytes());
        return;
    }
    let mut i = 0;
    let n = dst.len();
    while i < n && !(src as usize + i).is_multiple_of(8) {
        // SAFETY: inside the arena (caller's contract); AtomicU8 has alignment 1.
        dst[i] = unsafe { RawU8::from_ptr(src.add(i) as *mut u8) }.load(Ordering::Relaxed);
        i += 1;
    }
    while i + 8 <= n {
        // SAFETY: inside the arena and 8-byte aligned (loop above).
        let w = unsafe { RawU64::from_ptr(src.add(i) as *mut u64) }.load(Ordering::Relaxed);
        dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: inside the arena; alignment 1.
        dst[i] = unsafe { RawU8::from_ptr(src.add(i) as *mut u8) }.load(Ordering::Relaxed);
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
    while i < n && !(dst as usize + i).is_multiple_of(8) {
        // SAFETY: inside the arena (caller's contract); alignment 1.
        unsafe { RawU8::from_ptr(dst.add(i)) }.store(src[i], Ordering::Relaxed);
        i += 1;
    }
    while i + 8 <= n {
        let mut w = [0u8; 8];
        w.copy_from_slice(&src[i..i + 8]);
        // SAFETY: inside the arena and 8-byte aligned.
        unsafe { RawU64::from_ptr(dst.add(i) as *mut u64) }
            .store(u64::from_ne_bytes(w), Ordering::Relaxed);
        i += 8;
    }
    while i < n {
        // SAFETY: inside the arena; alignment 1.
        unsafe { RawU8::from_ptr(dst.add(i)) }.store(src[i], Ordering::Relaxed);
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
        unsafe { RawU64::from_ptr(dst.add(i) as *mut u64) }.store(0, Ordering::Relaxed);
    }
}
pub(crate) mod rmap;

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame freed twice goes into the free list once: handed out twice, it
    /// would hold two pages at once.
    #[test]
    fn a_frame_freed_twice_is_listed_once() {
        let a = FrameArena::new(4, [0, 1, 2]).unwrap();
        let p = a.alloc(AllocCtx::Reserve).unwrap();
        assert_eq!(a.free_count(), 3);
        a.free(p);
        assert_eq!(a.free_count(), 4);
        a.free(p);
        assert_eq!(a.free_count(), 4, "the second free listed the frame again");
        let mut got: Vec<u32> = (0..4)
            .map(|_| a.alloc(AllocCtx::Reserve).unwrap().0)
            .collect();
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2, 3]);
        assert!(a.alloc(AllocCtx::Reserve).is_none());
    }
}
