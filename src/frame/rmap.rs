//! Reverse map: which page-table entries map a frame.
//!
//! A frame is mapped by one entry, or by several after a fork shares it
//! copy-on-write. The first two mappings live in the descriptor (`owner`, `owner2`:
//! a parent and one child cost no extra memory and no lock); further ones in a side
//! table keyed by frame number. Reclaim walks the mappings to
//! unmap a shared page from every entry at once (the kernel's try_to_unmap).
//!
//! ## Locking
//! Every function here runs with the frame lock held (asserted). The side table's
//! mutex is a leaf taken under the frame lock and never held across anything else:
//! `for_each` drops it before calling its closure (which may wait on entry locks).
//! The frame lock is what keeps one frame's mappings from changing. Mapping pointers stay valid while the frame is locked and
//! mapped: an entry leaves the map (under the frame lock) before its page table can
//! be freed.

use crate::addr::Pfn;
use crate::frame::PageDesc;
use crate::sync::{AtomicU64, Mutex, Ordering};
use std::collections::HashMap;

fn as_ptr(pte: &AtomicU64) -> *mut AtomicU64 {
    pte as *const AtomicU64 as *mut AtomicU64
}

/// The side table of mappings beyond the two a descriptor holds inline.
#[derive(Debug, Default)]
pub(crate) struct Rmap {
    /// Frame number → entry addresses of its third and later mappings. Protected by
    /// its own mutex (a leaf), and changed for a frame only under that frame's lock.
    side: Mutex<HashMap<u32, Vec<usize>>>,
}

impl Rmap {
    /// Bytes the side table holds (counted in `Stats::metadata_bytes`).
    pub(crate) fn metadata_bytes(&self) -> usize {
        let m = self.side.lock();
        m.capacity() * (std::mem::size_of::<(u32, Vec<usize>)>() + 1)
            + m.values()
                .map(|v| v.capacity() * std::mem::size_of::<usize>())
                .sum::<usize>()
    }

    /// Makes room for one more side mapping of `pfn` (allocates; call it with no
    /// frame lock held). The room is checked with `has_room` under the frame lock.
    pub(crate) fn reserve(&self, pfn: Pfn) {
        let mut m = self.side.lock();
        m.reserve(1);
        let v = m.entry(pfn.0).or_default();
        if v.len() == v.capacity() {
            v.reserve(1);
        }
    }

    /// Whether `add` of a side mapping of `pfn` would not allocate.
    pub(crate) fn has_room(&self, pfn: Pfn) -> bool {
        let m = self.side.lock();
        match m.get(&pfn.0) {
            Some(v) => v.len() < v.capacity(),
            None => m.len() < m.capacity(),
        }
    }

    /// Adds `pte` as a mapping of `pfn`. Precondition: the frame is locked, and a
    /// third or later mapping was made room for (`reserve`, checked by `has_room`),
    /// so nothing allocates here.
    pub(crate) fn add(&self, d: &PageDesc, pfn: Pfn, pte: &AtomicU64) {
        debug_assert!(d.is_locked());
        let n = d.mapcount.load(Ordering::Relaxed);
        match n {
            0 => d.owner.store(as_ptr(pte), Ordering::Relaxed),
            1 => d.owner2.store(as_ptr(pte), Ordering::Relaxed),
            _ => self
                .side
                .lock()
                .entry(pfn.0)
                .or_default()
                .push(as_ptr(pte) as usize),
        }
        d.mapcount.store(n + 1, Ordering::Relaxed);
    }

    /// Removes `pte` from the mappings of `pfn`; returns how many remain.
    pub(crate) fn remove(&self, d: &PageDesc, pfn: Pfn, pte: &AtomicU64) -> u32 {
        debug_assert!(d.is_locked());
        let p = as_ptr(pte);
        let n = d.mapcount.load(Ordering::Relaxed);
        debug_assert!(n > 0);
        // The last mapping fills the hole `pte` leaves.
        let last = match n {
            1 => d.owner.load(Ordering::Relaxed),
            2 => d.owner2.load(Ordering::Relaxed),
            _ => {
                let mut m = self.side.lock();
                let v = m
                    .get_mut(&pfn.0)
                    .expect("shared frame without side mappings");
                let last = v.pop().expect("shared frame without side mappings") as *mut AtomicU64;
                if v.is_empty() {
                    m.remove(&pfn.0);
                }
                last
            }
        };
        if last != p {
            if d.owner.load(Ordering::Relaxed) == p {
                d.owner.store(last, Ordering::Relaxed);
            } else if n > 2 && d.owner2.load(Ordering::Relaxed) == p {
                d.owner2.store(last, Ordering::Relaxed);
            } else {
                let mut m = self.side.lock();
                let v = m
                    .get_mut(&pfn.0)
                    .expect("entry is not a mapping of this frame");
                let i = v
                    .iter()
                    .position(|&x| x == p as usize)
                    .expect("entry is not a mapping of this frame");
                v[i] = last as usize;
            }
        }
        match n {
            1 => d.owner.store(std::ptr::null_mut(), Ordering::Relaxed),
            2 => d.owner2.store(std::ptr::null_mut(), Ordering::Relaxed),
            _ => {}
        }
        d.mapcount.store(n - 1, Ordering::Relaxed);
        n - 1
    }

    /// Forgets every mapping of `pfn` (after they were all pointed elsewhere).
    pub(crate) fn clear(&self, d: &PageDesc, pfn: Pfn) {
        debug_assert!(d.is_locked());
        if d.mapcount.load(Ordering::Relaxed) > 2 {
            self.side.lock().remove(&pfn.0);
        }
        d.owner.store(std::ptr::null_mut(), Ordering::Relaxed);
        d.owner2.store(std::ptr::null_mut(), Ordering::Relaxed);
        d.mapcount.store(0, Ordering::Relaxed);
    }

    /// Calls `f` on every mapping of `pfn` until it returns false; returns whether it
    /// went through all of them.
    pub(crate) fn for_each(
        &self,
        d: &PageDesc,
        pfn: Pfn,
        mut f: impl FnMut(&AtomicU64) -> bool,
    ) -> bool {
        debug_assert!(d.is_locked());
        let n = d.mapcount.load(Ordering::Relaxed);
        for (k, o) in [&d.owner, &d.owner2].into_iter().enumerate() {
            if (k as u32) < n {
                // SAFETY: mapping pointers are valid while the frame is locked and
                // mapped (module header).
                if !f(unsafe { &*o.load(Ordering::Relaxed) }) {
                    return false;
                }
            }
        }
        // The side mutex is not held across `f` (which may wait on entry locks): the
        // frame lock keeps this frame's list from changing, so it is looked up again
        // for each element instead.
        for k in 0..n.saturating_sub(2) as usize {
            let p = match self.side.lock().get(&pfn.0).and_then(|v| v.get(k)) {
                Some(&p) => p,
                None => break,
            };
            // SAFETY: as above.
            if !f(unsafe { &*(p as *const AtomicU64) }) {
                return false;
            }
        }
        true
    }
}
