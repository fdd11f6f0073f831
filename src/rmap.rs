//! Reverse map: which page-table entries map a frame.
//!
//! A frame is mapped by one entry, or by several after a fork shares it
//! copy-on-write. The first mapping lives in the descriptor (`PageDesc::owner`); the
//! others in a side table keyed by frame number, which stays empty until a fork, so
//! the common case costs no memory and no lock. Reclaim walks the mappings to
//! unmap a shared page from every entry at once (the kernel's try_to_unmap).
//!
//! ## Locking
//! Every function here runs with the frame lock held (asserted). The side table's
//! mutex is a leaf taken under the frame lock; `for_each` calls its closure with the
//! mutex held, so the closure may only take entry locks (which are short and never
//! wait for a frame lock). Mapping pointers stay valid while the frame is locked and
//! mapped: an entry leaves the map (under the frame lock) before its page table can
//! be freed.

use crate::engine::Engine;
use crate::frame::PageDesc;
use crate::sync::{AtomicU64, Ordering};
use crate::types::Pfn;

impl Engine {
    /// Adds `pte` as a mapping of `pfn`.
    pub(crate) fn rmap_add(&self, d: &PageDesc, pfn: Pfn, pte: &AtomicU64) {
        debug_assert!(d.is_locked());
        let p = pte as *const AtomicU64 as *mut AtomicU64;
        let n = d.mapcount.load(Ordering::Relaxed);
        if n == 0 {
            d.owner.store(p, Ordering::Relaxed);
        } else {
            let mut m = self.rmap.lock();
            let v = m.entry(pfn.0).or_default();
            v.push(p as usize);
        }
        d.mapcount.store(n + 1, Ordering::Relaxed);
    }

    /// Removes `pte` from the mappings of `pfn`; returns how many remain.
    pub(crate) fn rmap_remove(&self, d: &PageDesc, pfn: Pfn, pte: &AtomicU64) -> u32 {
        debug_assert!(d.is_locked());
        let p = pte as *const AtomicU64 as *mut AtomicU64;
        let n = d.mapcount.load(Ordering::Relaxed);
        debug_assert!(n > 0);
        if n > 1 {
            let mut m = self.rmap.lock();
            let v = m
                .get_mut(&pfn.0)
                .expect("shared frame without side mappings");
            if d.owner.load(Ordering::Relaxed) == p {
                let next = v.pop().expect("shared frame without side mappings");
                d.owner.store(next as *mut AtomicU64, Ordering::Relaxed);
            } else {
                let i = v
                    .iter()
                    .position(|&x| x == p as usize)
                    .expect("entry is not a mapping of this frame");
                v.swap_remove(i);
            }
            if v.is_empty() {
                m.remove(&pfn.0);
            }
        } else {
            debug_assert_eq!(d.owner.load(Ordering::Relaxed), p);
            d.owner.store(std::ptr::null_mut(), Ordering::Relaxed);
        }
        d.mapcount.store(n - 1, Ordering::Relaxed);
        n - 1
    }

    /// Forgets every mapping of `pfn` (after they were all pointed elsewhere).
    pub(crate) fn rmap_clear(&self, d: &PageDesc, pfn: Pfn) {
        debug_assert!(d.is_locked());
        if d.mapcount.load(Ordering::Relaxed) > 1 {
            self.rmap.lock().remove(&pfn.0);
        }
        d.owner.store(std::ptr::null_mut(), Ordering::Relaxed);
        d.mapcount.store(0, Ordering::Relaxed);
    }

    /// Calls `f` on every mapping of `pfn` until it returns false; returns whether it
    /// went through all of them.
    pub(crate) fn rmap_for_each(
        &self,
        d: &PageDesc,
        pfn: Pfn,
        mut f: impl FnMut(&AtomicU64) -> bool,
    ) -> bool {
        debug_assert!(d.is_locked());
        let owner = d.owner.load(Ordering::Relaxed);
        if owner.is_null() {
            return true;
        }
        // SAFETY: mapping pointers are valid while the frame is locked and mapped
        // (module header).
        if !f(unsafe { &*owner }) {
            return false;
        }
        if d.mapcount.load(Ordering::Relaxed) > 1 {
            let m = self.rmap.lock();
            for &p in m.get(&pfn.0).map(|v| v.as_slice()).unwrap_or(&[]) {
                // SAFETY: as above.
                if !f(unsafe { &*(p as *const AtomicU64) }) {
                    return false;
                }
            }
        }
        true
    }
}
