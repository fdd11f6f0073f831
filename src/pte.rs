//! Page-table entries: their encoding and their bit locks.
//!
//! Owns: the meaning of every bit of an entry (`AtomicU64`). It sits below `mm`, so
//! that reclaim, page-out completion and swapoff, which reach entries through the
//! reverse map or a space's walk, decode and lock them without importing `mm`.
//!
//! Entries (`AtomicU64`) encode one of:
//! - `EMPTY` (0): never touched (reads as zeros, owns nothing);
//! - `Present`: resident in a frame, with the frame number, a version and the bits
//!   `P_LOCK`, `P_EXCL`, `P_SHARED`, `P_DIRTY`, `P_ACCESSED`, `P_COW` (below);
//! - `Swapped(entry)`: on a swap device, holding one reference on the slot;
//! - `BUSY`: a fault is filling the page; others wait until it changes.
//!
//! ## A present entry is the page's sequence lock
//! The page's bytes and its entry change only while the entry is locked (`P_LOCK`,
//! taken by CAS, held for short sections that never block: a write, a page-out copy,
//! an eviction). Every unlock after the bytes may have changed bumps the version. A
//! reader loads the entry, copies the bytes with atomic loads and loads the entry
//! again: the same value means it read the page as it was at some instant, with no
//! store of its own.
//!
//! The version is 25 bits: its top 13 bits start, each time a page is installed,
//! from the low 13 bits of the frame's allocation count (`PageDesc::epoch`), and its
//! low 12 bits count the writes since (a 4097th write carries into the top bits).
//! So a reader is fooled (ABA) only if, between its two loads of the entry, the
//! entry comes back to exactly the value it first read: the same frame, the same
//! bits and the same version. The version moves by 4,096 per install and by 1 per
//! write, so it comes back only after installs × 4,096 + writes reach a multiple of
//! 2^25: at least 8,191 frees and installs of that frame in between (8,192 with no
//! write), or some 2^25 writes to the page. Each install is a fault (a zero-fill or a device
//! read, microseconds at least) and the reader copies at most one page (tens of
//! nanoseconds), so it takes the reader being descheduled for several milliseconds
//! in that window while one frame cycles 8,192 times through faults of this very
//! entry's page table position and evictions, and then the page's bits and write
//! count lining up again. We accept that bound; it is the same kind of bound the
//! kernel's seqcount readers live with. (The bits would not fit more: 28 go to the
//! frame number, 11 to the tag and flags.)
//!
//! Guards are bits too: `P_EXCL` (a mutable guard: readers and writers stay off) and
//! `P_SHARED` (a count of shared guards taken through this entry: writers stay off).
//! `P_DIRTY` says the page differs from its swap copy; `P_ACCESSED` is the CLOCK
//! reference bit, set by any access (by CAS, so it can never land on an entry that
//! changed meanwhile) and cleared by reclaim; `P_COW` marks a frame shared with
//! another entry after a fork, read-only until a write copies it.
//!
//! An entry goes `EMPTY`/`Swapped` → `BUSY` → present by the fault path (CAS), and to
//! or from present only under the frame's lock (see `frame`). The tree that holds the
//! entries is `mm::pagetable`.
//!
//! ## Locking
//! `P_LOCK` is a bit spin lock: held for short sections that never block, allocate
//! or do I/O; taken after the frame lock, never before it. `BUSY` is a claim held by
//! the faulting thread (or swapoff) across a frame allocation and a device read; it
//! is not a lock anybody spins on: waiters poll it with bounded back-off.

use crate::addr::{Pfn, SwapEntry};
use crate::sync::{fence, AtomicU64, Ordering};

/// Entry value of a page never touched.
pub(crate) const EMPTY: u64 = 0;
/// Entry value while a fault fills the page.
pub(crate) const BUSY: u64 = 3;
pub(crate) const TAG_MASK: u64 = 3;
pub(crate) const TAG_PRESENT: u64 = 1;
const TAG_SWAP: u64 = 2;
/// Present entry: locked.
pub(crate) const P_LOCK: u64 = 1 << 2;
/// Present entry: pinned by a mutable guard.
pub(crate) const P_EXCL: u64 = 1 << 3;
/// Present entry: the count of shared guards pinning it through this entry (a 4-bit
/// field; `v & P_SHARED != 0` means "pinned shared").
pub(crate) const P_SHARED: u64 = 0xf << 4;
/// One shared guard in `P_SHARED`.
pub(crate) const P_SHARED_ONE: u64 = 1 << 4;
/// Present entry: written since its swap copy was made (or it has none).
pub(crate) const P_DIRTY: u64 = 1 << 8;
/// Present entry: used since reclaim last looked (CLOCK reference bit).
pub(crate) const P_ACCESSED: u64 = 1 << 9;
/// Present entry: the frame is shared copy-on-write with another entry (after a
/// fork); a write must first give this entry a copy of its own.
pub(crate) const P_COW: u64 = 1 << 10;
/// Present entry of a transparent page (never shared copy-on-write, so the bit of
/// `P_COW` is free there): the page is out of the program's mapping, in its frame's
/// slot of the staging area, to see whether it is used (see `mm::transparent`).
pub(crate) const P_STAGED: u64 = P_COW;
/// Cache entry (present): the file was written behind this copy (an Atomic
/// commit's checkpoint, or a journal replayed) while a shared guard pinned it, so
/// it could not be dropped and must not be written under the guard. Its bytes are
/// the file's old ones: nothing reads it but the guards that pin it (others read
/// the file, see `read`), no write or new guard uses it, and it is dropped as soon
/// as no guard pins it (`filemap::inode`, `drop_stale`). Such a copy is clean (a dirty page is never
/// marked, and no write reaches a marked one), so `sync` and reclaim never write it.
/// The bit is `P_COW`'s: a cache entry is never shared copy-on-write (fork shares a
/// space's leaves, never an inode's), as `P_STAGED` reuses it for transparent pages.
pub(crate) const P_STALE: u64 = P_COW;
/// Present entry of a transparent page: how many more visits of the reclaim hand
/// the page is spared before it is staged again (0–3), raised each time a staged
/// page is used again. Kept in the low bits of the version, which a transparent
/// page does not use (the program reads its bytes directly, never through the
/// entry's sequence lock).
pub(crate) const P_HEAT: u64 = 3 << VER_SHIFT;
/// One unit of `P_HEAT`.
pub(crate) const P_HEAT_ONE: u64 = 1 << VER_SHIFT;
const VER_SHIFT: u32 = 11;
const VER_MASK: u64 = ((1 << 25) - 1) << VER_SHIFT;
const PFN_SHIFT: u32 = 36;
/// Frames addressable by an entry (2^28: a 1 TiB budget).
pub(crate) const MAX_FRAMES: usize = 1 << 28;

/// A decoded page-table entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Pte {
    Empty,
    Present(Pfn),
    Swapped(SwapEntry),
    Busy,
}

impl Pte {
    #[inline]
    pub fn decode(v: u64) -> Pte {
        match v & TAG_MASK {
            0 => Pte::Empty,
            TAG_PRESENT => Pte::Present(Pfn((v >> PFN_SHIFT) as u32)),
            TAG_SWAP => Pte::Swapped(SwapEntry {
                dev: ((v >> 2) & 0x3f) as u8,
                slot: v >> 8,
            }),
            _ => Pte::Busy,
        }
    }
    /// A present entry for `pfn` whose version starts from the frame's allocation
    /// count `epoch`, with `bits` (`P_DIRTY`, `P_ACCESSED`).
    #[inline]
    pub fn present(pfn: Pfn, epoch: u32, bits: u64) -> u64 {
        (u64::from(pfn.0) << PFN_SHIFT)
            | ((u64::from(epoch) << (VER_SHIFT + 12)) & VER_MASK)
            | bits
            | TAG_PRESENT
    }
    #[inline]
    pub fn swapped(e: SwapEntry) -> u64 {
        debug_assert!(e.dev < 64 && e.slot < (1 << 56));
        (e.slot << 8) | (u64::from(e.dev) << 2) | TAG_SWAP
    }
    /// The frame of a present entry.
    #[inline]
    pub fn pfn(v: u64) -> Pfn {
        Pfn((v >> PFN_SHIFT) as u32)
    }
    /// `v` (unlocked) with its version moved on.
    #[inline]
    pub fn bump(v: u64) -> u64 {
        let ver = (v & VER_MASK).wrapping_add(1 << VER_SHIFT) & VER_MASK;
        (v & !VER_MASK & !P_LOCK) | ver
    }
}

/// Locks a present entry that has none of the bits in `forbid` (besides `P_LOCK`).
/// Returns the unlocked value it had. The caller stores the new (unlocked) value:
/// with `unlock_entry`, or with a store of its own followed by `released`.
#[inline]
#[cfg_attr(feature = "lockdep", track_caller)]
pub(crate) fn try_lock_present(pte: &AtomicU64, forbid: u64) -> Option<u64> {
    let v = raw_try_lock_present(pte, forbid)?;
    #[cfg(feature = "lockdep")]
    lockdep_acquire(pte, true);
    Some(v)
}

#[inline]
fn raw_try_lock_present(pte: &AtomicU64, forbid: u64) -> Option<u64> {
    let v = pte.load(Ordering::Relaxed);
    if v & (TAG_MASK | P_LOCK | forbid) != TAG_PRESENT {
        return None;
    }
    pte.compare_exchange(v, v | P_LOCK, Ordering::Acquire, Ordering::Relaxed)
        .ok()?;
    // Seqlock writer side: the locked value must be visible before any store made
    // under the lock, so a reader that sees such a store also sees the entry move.
    fence(Ordering::Release);
    Some(v)
}

/// Unlocks an entry locked by this thread, clearing bits `clear` and setting `set`;
/// the version stays (the bytes did not change).
#[inline]
pub(crate) fn unlock_entry(pte: &AtomicU64, clear: u64, set: u64) {
    let cur = pte.load(Ordering::Relaxed);
    debug_assert_ne!(cur & P_LOCK, 0);
    pte.store((cur & !P_LOCK & !clear) | set, Ordering::Release);
    released(pte);
}

/// Says that the caller's store released the entry lock it held on `pte` (a store
/// of a new value instead of `unlock_entry`): the lock validator's record. Nothing
/// without the feature `lockdep`.
#[inline(always)]
pub(crate) fn released(pte: &AtomicU64) {
    #[cfg(feature = "lockdep")]
    crate::lockdep::release(pte as *const AtomicU64 as usize);
    #[cfg(not(feature = "lockdep"))]
    let _ = pte;
}

/// Says that the caller's CAS just claimed `pte` (`BUSY`): the lock validator
/// holds the claim (class `lockdep::BUSY`) until `released`. What the claimer takes
/// next (a frame allocation, a device read) is ordered after the claim, so a wait
/// for a claim under one of those is seen as the cycle it is.
#[inline(always)]
#[cfg_attr(feature = "lockdep", track_caller)]
pub(crate) fn claimed(pte: &AtomicU64) {
    #[cfg(feature = "lockdep")]
    crate::lockdep::acquire_at(crate::lockdep::BUSY, crate::lockdep::Kind::Sleep, pte, true);
    #[cfg(not(feature = "lockdep"))]
    let _ = pte;
}

/// Says that the caller is about to wait for another thread's claim to end: for
/// the lock validator, an acquisition of the claim class (ordered after whatever
/// the caller holds) and its release.
#[inline(always)]
#[cfg_attr(feature = "lockdep", track_caller)]
pub(crate) fn wait_claim() {
    #[cfg(feature = "lockdep")]
    {
        crate::lockdep::acquire(
            crate::lockdep::BUSY,
            crate::lockdep::Kind::Sleep,
            WAIT_ADDR,
            false,
            std::panic::Location::caller(),
        );
        crate::lockdep::release(WAIT_ADDR);
    }
}
/// The instance the validator records for a claim waited on (any claim: the class
/// is what orders).
#[cfg(feature = "lockdep")]
const WAIT_ADDR: usize = 2;

/// Records an acquisition of `P_LOCK` (class `lockdep::PTE_LOCK`, a bit spin lock).
#[cfg(feature = "lockdep")]
#[track_caller]
fn lockdep_acquire(pte: &AtomicU64, try_: bool) {
    use crate::lockdep::{acquire_at, Kind, PTE_LOCK};
    acquire_at(PTE_LOCK, Kind::Spin, pte, try_);
}

/// Waits until `pte` is not a locked present entry: unlocked, or no longer
/// present. Only a present entry has a lock bit; a swapped entry keeps its
/// device number in those bits (bit 2 is `P_LOCK` of a present entry and bit 0
/// of a swapped entry's device), so a wait for `P_LOCK` alone would never end on
/// a page evicted to an odd-numbered device while it waited.
pub(crate) fn wait_unlocked(pte: &AtomicU64) {
    crate::sync::wait_until(|| unlocked_or_gone(pte.load(Ordering::Acquire)));
}

/// `wait_unlocked`'s condition on one value of an entry.
#[inline]
pub(crate) fn unlocked_or_gone(v: u64) -> bool {
    v & TAG_MASK != TAG_PRESENT || v & P_LOCK == 0
}

/// Locks a present entry that maps `pfn`, waiting out short holders of `P_LOCK`.
/// `None` if the entry does not map `pfn` (any more).
#[cfg_attr(feature = "lockdep", track_caller)]
pub(crate) fn lock_present(pte: &AtomicU64, pfn: Pfn) -> Option<u64> {
    // Recorded before waiting, so an ordering is checked before it can hang.
    #[cfg(feature = "lockdep")]
    lockdep_acquire(pte, false);
    loop {
        let v = pte.load(Ordering::Acquire);
        if Pte::decode(v) != Pte::Present(pfn) {
            released(pte);
            return None;
        }
        if let Some(v) = raw_try_lock_present(pte, 0) {
            if Pte::pfn(v) == pfn {
                return Some(v);
            }
            pte.store(v, Ordering::Release);
            released(pte);
            return None;
        }
        // Only a present entry has a lock bit; other kinds use those bits for data.
        crate::sync::wait_until(|| unlocked_or_gone(pte.load(Ordering::Relaxed)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{Pfn, SwapEntry};

    #[test]
    fn encode_decode() {
        let e = SwapEntry {
            dev: 63,
            slot: (1 << 40) + 5,
        };
        assert_eq!(Pte::decode(Pte::swapped(e)), Pte::Swapped(e));
        let p = Pte::present(Pfn((MAX_FRAMES - 1) as u32), 77, P_DIRTY);
        assert_eq!(Pte::decode(p), Pte::Present(Pfn((MAX_FRAMES - 1) as u32)));
        assert_eq!(
            Pte::decode(Pte::bump(p)),
            Pte::Present(Pfn((MAX_FRAMES - 1) as u32))
        );
        assert_ne!(Pte::bump(p), p);
        assert_eq!(Pte::bump(p) & P_DIRTY, P_DIRTY);
        assert_eq!(Pte::bump(p | P_LOCK) & P_LOCK, 0);
        // The version wraps inside its field.
        let mut q = p;
        for _ in 0..(1 << 13) {
            q = Pte::bump(q);
        }
        assert_eq!(Pte::pfn(q), Pfn((MAX_FRAMES - 1) as u32));
        assert_eq!(q & (P_DIRTY | TAG_MASK), P_DIRTY | TAG_PRESENT);
        assert_eq!(Pte::decode(EMPTY), Pte::Empty);
        assert_eq!(Pte::decode(BUSY), Pte::Busy);
    }

    /// The real ABA bound of the module header: installs of the same frame repeat
    /// an entry value only 8,192 allocations apart, and 4,096 writes carry into the
    /// part that comes from the allocation count.
    #[test]
    fn version_bound_is_what_the_header_says() {
        let pfn = Pfn(7);
        let at = |epoch: u32| Pte::present(pfn, epoch, P_DIRTY);
        for e in [0u32, 1, 4095, 8191, 123_456] {
            assert_ne!(at(e), at(e + 1), "consecutive installs must differ");
            assert_ne!(at(e), at(e + 4096));
            assert_eq!(at(e), at(e + 8192), "the bound is 2^13 installs");
        }
        let mut v = at(0);
        for _ in 0..4096 {
            v = Pte::bump(v);
        }
        assert_eq!(v, at(1), "4,096 writes carry into the install count");
    }
}
