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

use crate::addr::{VAddr, PAGE_SIZE, VADDR_END};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::pagetable::{
    try_lock_present, unlock_entry, PageTable, Pte, BUSY, EMPTY, LEAF_PAGES, P_COW, P_EXCL, P_LOCK,
    P_SHARED, TAG_MASK, TAG_PRESENT,
};
use crate::sync::{wait_until, Arc, AtomicU64, Ordering, RwLock};
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
    /// Ranges being unmapped (start → length): no longer accessible, not yet free to
    /// map again until their pages are released. Protected by `regions`' write lock
    /// for insertion and lookup; removal takes it too.
    dying: crate::sync::Mutex<BTreeMap<u64, u64>>,
}

impl SpaceInner {
    pub fn new(eng: Arc<Engine>) -> SpaceInner {
        SpaceInner {
            pt: PageTable::new(eng.leaves.clone()),
            eng,
            regions: RwLock::new(BTreeMap::new()),
            dying: crate::sync::Mutex::new(BTreeMap::new()),
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
        // First fit above MAP_BASE, around mapped regions and ranges still being
        // unmapped (their old pages are not all released yet).
        let dying = self.dying.lock();
        let mut taken: Vec<(u64, u64)> = regions
            .range(MAP_BASE..)
            .chain(dying.range(MAP_BASE..))
            .map(|(&s, &l)| (s, l))
            .collect();
        drop(dying);
        taken.sort_unstable();
        let mut at = MAP_BASE;
        for (s, l) in taken {
            if s >= at && s - at >= len {
                break;
            }
            at = at.max(s + l);
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
                    self.dying.lock().insert(r.start.0, r.len);
                }
                _ => return Err(Error::BadAddress { addr: r.start.0 }),
            }
            // Leaves shared with a fork are copied before their entries are cleared,
            // so the other space keeps its pages. Under the write lock: nothing else
            // changes this table's slots meanwhile.
            let first = r.start.0 / PAGE_SIZE as u64;
            let end = r.end().0 / PAGE_SIZE as u64;
            let mut vpn = first;
            while vpn < end {
                self.unshare(vpn);
                vpn = (vpn | (LEAF_PAGES - 1)) + 1;
            }
        }
        let eng = &*self.eng;
        self.pt.for_each(
            r.start.0 / PAGE_SIZE as u64,
            r.end().0 / PAGE_SIZE as u64,
            |_, pte| release_entry(eng, pte),
        );
        let _regions = self.regions.write();
        self.dying.lock().remove(&r.start.0);
        Ok(())
    }

    /// Makes the leaf covering `vpn` private to this space (copying it if another
    /// space shares it). Precondition: the regions write lock is held.
    pub fn unshare(&self, vpn: u64) {
        let eng = &*self.eng;
        self.pt.unshare(
            vpn,
            |src, dst| copy_entry(eng, src, dst),
            |e| release_entry(eng, e),
        );
    }

    /// A copy-on-write snapshot of this space into `child` (which the caller has
    /// registered with the Vm, so swapoff sees it from the start).
    ///
    /// The page table's leaves are shared, not copied (the kernel's "on-demand fork"):
    /// fork costs a few operations per 16 MiB of mapped address space. The first
    /// write through a shared leaf (in either space) copies that leaf, taking a
    /// reference on every page and slot in it and marking shared pages
    /// copy-on-write; see `unshare` and `fault::cow_break`.
    ///
    /// Waits for guards on this space's pages to be dropped (a guard pins an entry,
    /// and a shared leaf holds no pinned entry), without holding any lock meanwhile.
    pub fn fork_into(&self, child: &SpaceInner) -> Result<()> {
        loop {
            let regions = self.regions.write();
            let mut tagged = Vec::new();
            for (&start, &len) in regions.iter() {
                self.pt.tag_all(
                    start / PAGE_SIZE as u64,
                    (start + len) / PAGE_SIZE as u64,
                    &mut tagged,
                );
            }
            // From here, hit-path writers and new pins see the tag (or we see them).
            let mut pinned = None;
            for (&start, &len) in regions.iter() {
                self.pt.for_each(
                    start / PAGE_SIZE as u64,
                    (start + len) / PAGE_SIZE as u64,
                    |_, pte| {
                        if pinned.is_some() {
                            return;
                        }
                        let present = |v: u64| v & TAG_MASK == TAG_PRESENT;
                        // A writer that locked before seeing the tag: let it finish.
                        wait_until(|| {
                            let v = pte.load(Ordering::Acquire);
                            !present(v) || v & P_LOCK == 0
                        });
                        let v = pte.load(Ordering::Acquire);
                        if present(v) && v & (P_EXCL | P_SHARED) != 0 {
                            pinned = Some(pte as *const AtomicU64 as usize);
                        }
                    },
                );
            }
            if let Some(p) = pinned {
                self.pt.untag(&tagged);
                drop(regions);
                // SAFETY: entries of this table stay valid while the space lives.
                let pte = unsafe { &*(p as *const AtomicU64) };
                wait_until(|| {
                    let v = pte.load(Ordering::Acquire);
                    v & TAG_MASK != TAG_PRESENT || v & (P_EXCL | P_SHARED) == 0
                });
                continue;
            }
            *child.regions.write() = regions.clone();
            for (&start, &len) in regions.iter() {
                self.pt.share_into(
                    &child.pt,
                    start / PAGE_SIZE as u64,
                    (start + len) / PAGE_SIZE as u64,
                );
            }
            return Ok(());
        }
    }
}

/// Copies one entry of a shared leaf into a private copy, taking its own references:
/// a resident page gets one more mapping and both entries become copy-on-write; a
/// swapped page's slot gets one more reference.
fn copy_entry(eng: &Engine, src: &AtomicU64, dst: &AtomicU64) {
    loop {
        let v = src.load(Ordering::Acquire);
        match Pte::decode(v) {
            Pte::Empty => return,
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
                    return;
                }
                // 65,535 references: the copy cannot share the slot. Bring the page in
                // is not possible here without a frame; wait and retry (another space
                // dropping its share frees a reference).
                std::thread::yield_now();
            }
            Pte::Present(pfn) => {
                let d = eng.frames.desc(pfn);
                d.lock();
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
                return;
            }
        }
    }
}

/// Releases one entry: drops its slot reference or its mapping of a frame (freeing
/// the frame with the last mapping), waiting out short locks and guards. Leaves it
/// `EMPTY`.
fn release_entry(eng: &Engine, pte: &AtomicU64) {
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
                d.unlock();
                eng.frames.free(pfn);
                return;
            }
        }
    }
}

impl Drop for SpaceInner {
    fn drop(&mut self) {
        self.regions.get_mut().clear();
        let eng = self.eng.clone();
        self.pt.clear(|e| release_entry(&eng, e));
    }
}
