//! What one page-table entry holds, taken or given back as a whole: copying an
//! entry of a shared leaf into a private copy (`copy_entry`, for the on-demand fork)
//! and releasing an entry (`release_entry`, for unmap, exit and the last user of a
//! leaf). Below `space` and `fork`, which both use them.
//!
//! ## Locking
//! Frame lock, then the entry's bit lock, as everywhere; a swapped entry is claimed
//! (`BUSY`) while its slot reference is taken. Neither function allocates a frame
//! or holds a lock while it waits (it polls with `sync::wait_until`): the waits are
//! for another thread's fault (ends with its device read, which has a timeout) or
//! a guard (ends when its holder drops it).

use crate::engine::Engine;
use crate::frame::F_TRANSPARENT;
use crate::pte::{
    try_lock_present, unlock_entry, Pte, BUSY, EMPTY, P_ACCESSED, P_COW, P_DIRTY, P_EXCL, P_LOCK,
    P_SHARED, P_STAGED, TAG_MASK, TAG_PRESENT,
};
use crate::sync::{wait_until, AtomicU64, Ordering};

/// Copies one entry of a shared leaf into a private copy, taking its own references:
/// a resident page gets one more mapping and both entries become copy-on-write; a
/// swapped page's slot gets one more reference. Returns false (nothing taken) when
/// the slot already has the most references a count holds (65,535): the caller
/// fails with `OutOfSwap` instead of waiting for another space to let go.
pub(crate) fn copy_entry(eng: &Engine, src: &AtomicU64, dst: &AtomicU64) -> bool {
    loop {
        let v = src.load(Ordering::Acquire);
        match Pte::decode(v) {
            Pte::Empty => return true,
            // Another space is faulting this page in through the shared leaf.
            Pte::Busy => wait_until(|| src.load(Ordering::Acquire) != BUSY),
            Pte::Swapped(_) => {
                // Claim the entry so nobody frees the slot between our look and our
                // reference.
                if src
                    .compare_exchange(v, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
                {
                    continue;
                }
                let ok = eng.swap.dup_encoded(v, 1);
                src.store(v, Ordering::Release);
                if ok {
                    dst.store(v, Ordering::Release);
                }
                return ok;
            }
            Pte::Present(pfn) => {
                let d = eng.frames.desc(pfn);
                // A third mapping goes to the reverse map's side table, which may
                // allocate: room is made before the frame lock is taken, and checked
                // under it (invariant 4: no allocation under a frame lock).
                if d.mapcount.load(Ordering::Relaxed) >= 2 {
                    eng.rmap.reserve(pfn);
                }
                d.lock();
                if d.mapcount.load(Ordering::Relaxed) >= 2 && !eng.rmap.has_room(pfn) {
                    d.unlock();
                    continue;
                }
                let Some(cur) = try_lock_present(src, 0) else {
                    d.unlock();
                    wait_until(|| {
                        let now = src.load(Ordering::Acquire);
                        now & TAG_MASK != TAG_PRESENT || now & P_LOCK == 0
                    });
                    continue;
                };
                if Pte::pfn(cur) != pfn {
                    unlock_entry(src, 0, 0);
                    d.unlock();
                    continue;
                }
                dst.store((cur | P_COW) & !(P_SHARED | P_EXCL), Ordering::Release);
                eng.rmap.add(d, pfn, dst);
                unlock_entry(src, 0, P_COW);
                d.unlock();
                return true;
            }
        }
    }
}

/// Releases one entry: drops its slot reference or its mapping of a frame (freeing
/// the frame with the last mapping), waiting out short locks and guards. Leaves it
/// `EMPTY`.
pub(crate) fn release_entry(eng: &Engine, pte: &AtomicU64) {
    loop {
        let v = pte.load(Ordering::Acquire);
        match Pte::decode(v) {
            Pte::Empty => return,
            Pte::Busy => {
                // A fault in a space that shares this leaf; let it finish.
                wait_until(|| pte.load(Ordering::Acquire) != BUSY);
            }
            Pte::Swapped(e) => {
                if pte
                    .compare_exchange(v, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    eng.swap.put(e);
                    return;
                }
            }
            Pte::Present(pfn) => {
                let d = eng.frames.desc(pfn);
                d.lock();
                let v = pte.load(Ordering::Acquire);
                if Pte::decode(v) != Pte::Present(pfn) {
                    d.unlock();
                    continue;
                }
                if v & (P_LOCK | P_EXCL | P_SHARED) != 0 {
                    // A writer (short) or a guard (until dropped): wait unlocked.
                    d.unlock();
                    wait_until(|| {
                        let now = pte.load(Ordering::Acquire);
                        now != v || now & (P_LOCK | P_EXCL | P_SHARED) == 0
                    });
                    continue;
                }
                if pte
                    .compare_exchange(v, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
                {
                    d.unlock();
                    continue;
                }
                if eng.rmap.remove(d, pfn, pte) > 0 {
                    // Still mapped by another space (shared copy-on-write).
                    d.unlock();
                    return;
                }
                eng.swap.put_encoded(d.swap.swap(0, Ordering::Relaxed));
                if v & P_STAGED != 0 && d.flags.load(Ordering::Relaxed) & F_TRANSPARENT != 0 {
                    crate::reclaim::drop_staged(eng, pfn);
                }
                d.unlock();
                eng.frames.free(pfn);
                return;
            }
        }
    }
}

/// Releases entry `pte` (as `release_entry`) only if it still holds the page it
/// held when its value was `expect`: present in the same frame with the same
/// version, not locked or pinned (the reference, dirty and copy-on-write bits may
/// differ: they change without the bytes changing). Returns whether it did. Used
/// by an Atomic commit to drop private copies that now equal the file.
pub(crate) fn release_if_unchanged(eng: &Engine, pte: &AtomicU64, expect: u64) -> bool {
    const LOOSE: u64 = P_ACCESSED | P_DIRTY | P_COW;
    let same = |v: u64| (v | LOOSE) == (expect | LOOSE);
    let v = pte.load(Ordering::Acquire);
    let Pte::Present(pfn) = Pte::decode(v) else {
        return false;
    };
    if !same(v) || v & (P_LOCK | P_EXCL | P_SHARED) != 0 {
        return false;
    }
    let d = eng.frames.desc(pfn);
    d.lock();
    let Some(v) = try_lock_present(pte, P_EXCL | P_SHARED) else {
        d.unlock();
        return false;
    };
    if !same(v) || Pte::pfn(v) != pfn {
        unlock_entry(pte, 0, 0);
        d.unlock();
        return false;
    }
    pte.store(EMPTY, Ordering::Release);
    crate::pte::released(pte);
    if eng.rmap.remove(d, pfn, pte) > 0 {
        d.unlock();
        return true;
    }
    eng.swap.put_encoded(d.swap.swap(0, Ordering::Relaxed));
    d.unlock();
    eng.frames.free(pfn);
    true
}
