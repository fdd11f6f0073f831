//! Sparse page tables: a three-level radix tree over the 35-bit virtual page number
//! (47-bit addresses), built on demand, so a terabyte region costs nothing until it
//! is touched. A leaf holds 4096 entries (16 MiB of address space, 32 KiB of
//! metadata: 0.2 % of the memory it describes when full).
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
//! store of its own. The version starts each time a page is installed from the
//! frame's allocation count, so a frame that leaves and comes back does not bring
//! back an old value (ABA) unless 2^25 versions pass during one read.
//!
//! Guards are bits too: `P_EXCL` (a mutable guard: readers and writers stay off) and
//! `P_SHARED` (a count of shared guards taken through this entry: writers stay off).
//! `P_DIRTY` says the page differs from its swap copy; `P_ACCESSED` is the CLOCK
//! reference bit, set by any access (by CAS, so it can never land on an entry that
//! changed meanwhile) and cleared by reclaim; `P_COW` marks a frame shared with
//! another entry after a fork, read-only until a write copies it.
//!
//! Nodes are created with a compare-and-swap and freed only when the table is
//! dropped, so a lock-free reader can hold `&AtomicU64` for as long as it holds the
//! address space. An entry goes `EMPTY`/`Swapped` → `BUSY` → present by the fault
//! path (CAS), and to or from present only under the frame's lock (see `frame`).

use crate::sync::{fence, Arc, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use crate::types::{Pfn, SwapEntry, PAGE_SHIFT, VADDR_BITS};
use std::alloc::{alloc_zeroed, dealloc, Layout};

const LEAF_BITS: u32 = 12;
const MID_BITS: u32 = 12;
const TOP_BITS: u32 = VADDR_BITS - PAGE_SHIFT - LEAF_BITS - MID_BITS;
const LEAF_LEN: usize = 1 << LEAF_BITS;
const MID_LEN: usize = 1 << MID_BITS;
const TOP_LEN: usize = 1 << TOP_BITS;

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
/// Returns the unlocked value it had. The caller stores the new (unlocked) value.
#[inline]
pub(crate) fn try_lock_present(pte: &AtomicU64, forbid: u64) -> Option<u64> {
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
}

/// Locks a present entry that maps `pfn`, waiting out short holders of `P_LOCK`.
/// `None` if the entry does not map `pfn` (any more).
pub(crate) fn lock_present(pte: &AtomicU64, pfn: Pfn) -> Option<u64> {
    loop {
        let v = pte.load(Ordering::Acquire);
        if Pte::decode(v) != Pte::Present(pfn) {
            return None;
        }
        if let Some(v) = try_lock_present(pte, 0) {
            if Pte::pfn(v) == pfn {
                return Some(v);
            }
            pte.store(v, Ordering::Release);
            return None;
        }
        crate::sync::wait_until(|| pte.load(Ordering::Relaxed) & P_LOCK == 0);
    }
}

#[repr(C)]
struct Leaf {
    e: [AtomicU64; LEAF_LEN],
}

#[repr(C)]
struct Mid {
    e: [AtomicPtr<Leaf>; MID_LEN],
}

fn new_zeroed<T>() -> *mut T {
    let layout = Layout::new::<T>();
    // SAFETY: the layout has non-zero size (both node types are 32 KiB); all-zero bytes
    // are a valid `T` here (arrays of atomics whose zero is null / EMPTY).
    let p = unsafe { alloc_zeroed(layout) } as *mut T;
    if p.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    p
}

/// A page table of one address space.
pub(crate) struct PageTable {
    top: Box<[AtomicPtr<Mid>]>,
    /// Bytes of nodes allocated, shared with the Vm's metadata counter.
    bytes: Arc<AtomicUsize>,
    own_bytes: AtomicUsize,
}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTable")
            .field("bytes", &self.own_bytes.load(Ordering::Relaxed))
            .finish()
    }
}

#[inline]
fn split(vpn: u64) -> (usize, usize, usize) {
    (
        (vpn >> (LEAF_BITS + MID_BITS)) as usize,
        ((vpn >> LEAF_BITS) as usize) & (MID_LEN - 1),
        (vpn as usize) & (LEAF_LEN - 1),
    )
}

impl PageTable {
    /// A new, empty table. `bytes` accumulates the metadata it allocates.
    pub fn new(bytes: Arc<AtomicUsize>) -> PageTable {
        let top: Box<[AtomicPtr<Mid>]> = (0..TOP_LEN)
            .map(|_| AtomicPtr::new(std::ptr::null_mut()))
            .collect();
        let own = TOP_LEN * std::mem::size_of::<AtomicPtr<Mid>>();
        bytes.fetch_add(own, Ordering::Relaxed);
        PageTable {
            top,
            bytes,
            own_bytes: AtomicUsize::new(own),
        }
    }

    fn account(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.own_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// The entry for `vpn` if its leaf exists. `vpn` must be below 2^35.
    #[inline]
    pub fn lookup(&self, vpn: u64) -> Option<&AtomicU64> {
        let (t, m, l) = split(vpn);
        let mid = self.top.get(t)?.load(Ordering::Acquire);
        if mid.is_null() {
            return None;
        }
        // SAFETY: non-null node pointers in the table point to live nodes that are
        // freed only in `drop`, which needs `&mut self`.
        let leaf = unsafe { &*mid }.e[m].load(Ordering::Acquire);
        if leaf.is_null() {
            return None;
        }
        // SAFETY: as above.
        Some(unsafe { &(*leaf).e[l] })
    }

    /// The entry for `vpn`, creating the nodes on the way (metadata, not budget).
    pub fn entry(&self, vpn: u64) -> &AtomicU64 {
        let (t, m, l) = split(vpn);
        let slot = &self.top[t];
        let mut mid = slot.load(Ordering::Acquire);
        if mid.is_null() {
            let new = new_zeroed::<Mid>();
            match slot.compare_exchange(mid, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.account(std::mem::size_of::<Mid>());
                    mid = new;
                }
                Err(cur) => {
                    // SAFETY: `new` was allocated above with this layout and never shared.
                    unsafe { dealloc(new.cast(), Layout::new::<Mid>()) };
                    mid = cur;
                }
            }
        }
        // SAFETY: live node, see `lookup`.
        let lslot = &unsafe { &*mid }.e[m];
        let mut leaf = lslot.load(Ordering::Acquire);
        if leaf.is_null() {
            let new = new_zeroed::<Leaf>();
            match lslot.compare_exchange(leaf, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.account(std::mem::size_of::<Leaf>());
                    leaf = new;
                }
                Err(cur) => {
                    // SAFETY: allocated above, never shared.
                    unsafe { dealloc(new.cast(), Layout::new::<Leaf>()) };
                    leaf = cur;
                }
            }
        }
        // SAFETY: live node, see `lookup`.
        unsafe { &(*leaf).e[l] }
    }

    /// Calls `f(vpn, entry)` for every existing entry in `[first, end)`, skipping
    /// ranges whose nodes were never created.
    pub fn for_each(&self, first: u64, end: u64, mut f: impl FnMut(u64, &AtomicU64)) {
        let mut vpn = first;
        while vpn < end {
            let (t, m, l) = split(vpn);
            let mid = self.top[t].load(Ordering::Acquire);
            if mid.is_null() {
                vpn = ((vpn >> (LEAF_BITS + MID_BITS)) + 1) << (LEAF_BITS + MID_BITS);
                continue;
            }
            // SAFETY: live node, see `lookup`.
            let leaf = unsafe { &*mid }.e[m].load(Ordering::Acquire);
            if leaf.is_null() {
                vpn = ((vpn >> LEAF_BITS) + 1) << LEAF_BITS;
                continue;
            }
            let stop = (((vpn >> LEAF_BITS) + 1) << LEAF_BITS).min(end);
            for (i, v) in (l..).zip(vpn..stop) {
                // SAFETY: live node, see `lookup`.
                f(v, unsafe { &(*leaf).e[i] });
            }
            vpn = stop;
        }
    }

    /// Bytes of nodes this table holds.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.own_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for PageTable {
    fn drop(&mut self) {
        for slot in self.top.iter() {
            let mid = slot.load(Ordering::Acquire);
            if mid.is_null() {
                continue;
            }
            // SAFETY: we have `&mut self`; no reader can hold a node any more.
            for l in unsafe { &*mid }.e.iter() {
                let leaf = l.load(Ordering::Acquire);
                if !leaf.is_null() {
                    // SAFETY: allocated by `entry` with this layout, freed once here.
                    unsafe { dealloc(leaf.cast(), Layout::new::<Leaf>()) };
                }
            }
            // SAFETY: allocated by `entry` with this layout, freed once here.
            unsafe { dealloc(mid.cast(), Layout::new::<Mid>()) };
        }
        self.bytes
            .fetch_sub(self.own_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn sparse_and_iterates() {
        let pt = PageTable::new(Arc::new(AtomicUsize::new(0)));
        let top_only = pt.bytes();
        assert!(pt.lookup(5).is_none());
        let far = (1u64 << 35) - 1;
        pt.entry(5).store(7, Ordering::Relaxed);
        pt.entry(far).store(9, Ordering::Relaxed);
        assert_eq!(pt.lookup(5).unwrap().load(Ordering::Relaxed), 7);
        assert!(pt.bytes() <= top_only + 4 * 32768);
        let mut seen = vec![];
        pt.for_each(0, 1 << 35, |v, e| {
            if e.load(Ordering::Relaxed) != 0 {
                seen.push(v)
            }
        });
        assert_eq!(seen, vec![5, far]);
    }
}
