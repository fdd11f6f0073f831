//! Address spaces (the kernel's mm): regions, the page table, and tearing pages
//! down on unmap and exit.
//!
//! Owns: `SpaceInner`: its regions (`BTreeMap` start → length) and its page table.
//!
//! ## Locking
//! `regions` (RwLock) is taken for reading by every slow-path access (fault,
//! zero read, pinning) for as long as it installs a page, and for writing by
//! `map_anon` and `unmap`. Order: regions → frame lock → swap map lock. Frames are
//! allocated (and direct reclaim runs) under the regions read lock, never under a
//! frame lock; reclaim takes no region lock (DESIGN.md invariant 4).
//! The hit path takes no lock at all (see `fault`).
//!
//! `unmap` removes the region under the write lock, so no new fault can start in it,
//! and then releases its pages with the lock dropped: resident pages under their
//! frame lock, swapped pages by dropping their slot reference.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::pagetable::{
    try_lock_present, unlock_entry, PageTable, Pte, BUSY, EMPTY, P_COW, P_EXCL, P_LOCK, P_SHARED,
};
use crate::sync::{wait_until, Arc, AtomicU64, Ordering, RwLock};
use crate::types::{VAddr, PAGE_SIZE, VADDR_END};
use std::collections::BTreeMap;

/// Lowest address handed out: the first 4 GiB stay unmapped, so small integers and
/// null are bad addresses.
pub(crate) const MAP_BASE: u64 = 1 << 32;

/// A mapped region of an address space, as returned by `map_anon`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Region {
    start: VAddr,
    len: u64,
}

impl Region {
    /// First address.
    pub fn start(&self) -> VAddr {
        self.start
    }
    /// Length in bytes (a multiple of the page size).
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// One past the last address.
    pub fn end(&self) -> VAddr {
        VAddr(self.start.0 + self.len)
    }
    /// Whether `addr` is inside the region.
    pub fn contains(&self, addr: VAddr) -> bool {
        addr >= self.start && addr < self.end()
    }
}

#[derive(Debug)]
pub(crate) struct SpaceInner {
    pub eng: Arc<Engine>,
    pub pt: PageTable,
    /// start → length in bytes.
    pub regions: RwLock<BTreeMap<u64, u64>>,
}

impl SpaceInner {
    pub fn new(eng: Arc<Engine>) -> SpaceInner {
        SpaceInner {
            pt: PageTable::new(eng.pt_bytes.clone()),
            eng,
            regions: RwLock::new(BTreeMap::new()),
        }
    }

    /// Whether `[addr, addr + len)` lies inside mapped regions (contiguous ones count).
    pub fn range_mapped(regions: &BTreeMap<u64, u64>, addr: u64, len: u64) -> Result<()> {
        let end = addr
            .checked_add(len)
            .filter(|&e| e <= VADDR_END)
            .ok_or(Error::BadAddress { addr })?;
        let mut at = addr;
        while at < end {
            match regions.range(..=at).next_back() {
                Some((&s, &l)) if at < s + l => at = s + l,
                _ => return Err(Error::BadAddress { addr: at }),
            }
        }
        Ok(())
    }

    pub fn map_anon(&self, len: usize) -> Result<Region> {
        if len == 0 {
            return Err(Error::InvalidArgument("map_anon of zero bytes".into()));
        }
        let len = (len as u64)
            .checked_add(PAGE_SIZE as u64 - 1)
            .map(|l| l & !(PAGE_SIZE as u64 - 1))
            .filter(|&l| l <= VADDR_END - MAP_BASE)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "map_anon of {len} bytes exceeds the {} bytes of an address space",
                    VADDR_END - MAP_BASE
                ))
            })?;
        let mut regions = self.regions.write();
        // First fit above MAP_BASE.
        let mut at = MAP_BASE;
        for (&s, &l) in regions.range(MAP_BASE..) {
            if s - at >= len {
                break;
            }
            at = s + l;
        }
        if VADDR_END - at < len {
            return Err(Error::OutOfMemory);
        }
        regions.insert(at, len);
        Ok(Region {
            start: VAddr(at),
            len,
        })
    }

    pub fn regions(&self) -> Vec<Region> {
        self.regions
            .read()
            .iter()
            .map(|(&s, &l)| Region {
                start: VAddr(s),
                len: l,
            })
            .collect()
    }

    pub fn unmap(&self, r: Region) -> Result<()> {
        {
            let mut regions = self.regions.write();
            match regions.get(&r.start.0) {
                Some(&l) if l == r.len => {
                    regions.remove(&r.start.0);
                }
                _ => return Err(Error::BadAddress { addr: r.start.0 }),
            }
        }
        self.release(r.start.0, r.len);
        Ok(())
    }

    /// Frees every page of `[start, start + len)`, which no region covers any more.
    fn release(&self, start: u64, len: u64) {
        let eng = &*self.eng;
        let first = start / PAGE_SIZE as u64;
        let end = (start + len) / PAGE_SIZE as u64;
        self.pt.for_each(first, end, |_, pte| loop {
            let v = pte.load(Ordering::Acquire);
            match Pte::decode(v) {
                Pte::Empty => return,
                Pte::Busy => {
                    // Faults finish before the region can be removed; be safe anyway.
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
                    if eng.rmap_remove(d, pfn, pte) > 0 {
                        // Still mapped by another space (shared copy-on-write).
                        d.unlock();
                        return;
                    }
                    eng.swap.put_encoded(d.swap.swap(0, Ordering::Relaxed));
                    d.unlock();
                    eng.frames.free(pfn);
                    return;
                }
            }
        });
    }
}

impl SpaceInner {
    /// A copy-on-write snapshot of this space (the caller registers it with the Vm
    /// before calling, so swapoff sees it from the start).
    ///
    /// Holds the regions write lock, so no fault, unmap or other fork runs in this
    /// space meanwhile; hit-path writers are stopped page by page by the entry lock.
    /// Resident pages become shared (`P_COW` in both entries, one more mapping in the
    /// frame's reverse map); swapped pages share their slot (one more reference).
    /// Waits for mutable guards on this space's pages to be dropped.
    pub fn fork_into(&self, child: &SpaceInner) -> Result<()> {
        let eng = &*self.eng;
        let regions = self.regions.write();
        *child.regions.write() = regions.clone();
        for (&start, &len) in regions.iter() {
            let first = start / PAGE_SIZE as u64;
            let end = (start + len) / PAGE_SIZE as u64;
            let mut failed = None;
            self.pt.for_each(first, end, |vpn, pte| {
                if failed.is_some() {
                    return;
                }
                if let Err(e) = Self::fork_entry(eng, pte, child.pt.entry(vpn)) {
                    failed = Some(e);
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    fn fork_entry(eng: &Engine, pte: &AtomicU64, cpte: &AtomicU64) -> Result<()> {
        loop {
            let v = pte.load(Ordering::Acquire);
            match Pte::decode(v) {
                Pte::Empty => return Ok(()),
                // Faults run under the regions read lock, which fork holds for writing.
                Pte::Busy => wait_until(|| pte.load(Ordering::Acquire) != BUSY),
                Pte::Swapped(e) => {
                    // Entries only leave `Swapped` by a fault or swapoff, both under
                    // the regions lock we hold.
                    if !eng.swap.dup_encoded(v, 1) {
                        return Err(Error::OutOfSwap);
                    }
                    cpte.store(Pte::swapped(e), Ordering::Release);
                    return Ok(());
                }
                Pte::Present(pfn) => {
                    let d = eng.frames.desc(pfn);
                    d.lock();
                    let Some(cur) = try_lock_present(pte, P_EXCL) else {
                        d.unlock();
                        // Locked for a moment, or pinned by a mutable guard: wait.
                        wait_until(|| pte.load(Ordering::Acquire) & (P_LOCK | P_EXCL) == 0);
                        continue;
                    };
                    if Pte::pfn(cur) != pfn {
                        unlock_entry(pte, 0, 0);
                        d.unlock();
                        continue;
                    }
                    // The child's entry: same frame and bits, copy-on-write, without
                    // the parent's guard pins.
                    cpte.store((cur | P_COW) & !P_SHARED, Ordering::Release);
                    eng.rmap_add(d, pfn, cpte);
                    unlock_entry(pte, 0, P_COW);
                    d.unlock();
                    return Ok(());
                }
            }
        }
    }
}

impl Drop for SpaceInner {
    fn drop(&mut self) {
        let all: Vec<(u64, u64)> = self
            .regions
            .get_mut()
            .iter()
            .map(|(&s, &l)| (s, l))
            .collect();
        self.regions.get_mut().clear();
        for (s, l) in all {
            self.release(s, l);
        }
    }
}
