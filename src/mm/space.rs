//! Address spaces (the kernel's mm): regions, the page table, and tearing pages
//! down on unmap and exit.
//!
//! Owns: `SpaceInner`: its regions (a `RegionTree` of `Vma`s, see `region`), the
//! snapshot of them that faults read without a lock (`snap`), the ranges being
//! unmapped (`dying`) and its page table; and how swapoff walks a space
//! (`SpaceWalk`).
//!
//! ## Locking
//! `regions` (RwLock) is taken for writing by `map_anon`, `map_file`, `unmap` and
//! fork, which publish a new `Snapshot` of the tree into `snap` before they let go
//! of it. A fault reads `snap` instead of taking the lock (`mm::lookup`, docs/design.md
//! invariant 5) and validates what it read after claiming its entry; only when a
//! validation fails, or with `Config::speculative_faults(false)`, does it take
//! `regions` for reading, until it has claimed the entry it fills (`BUSY`) or found
//! the page present. Either way, frames are allocated (and direct reclaim runs)
//! with no regions lock held: the claim keeps unmap and fork from going past the
//! page meanwhile. Order: regions → frame lock → entry lock → swap map lock;
//! reclaim takes no region lock (invariant 4). The hit path takes no lock at all
//! (see `fault`).
//!
//! `unmap` removes the region under the write lock (its view's count goes odd for
//! good, a snapshot without it is published, then a SeqCst fence), so no new fault
//! can start in it, and a speculative fault that found it earlier either sees the
//! odd count after its claim and undoes the claim, or has claimed before the fence,
//! and the release below waits for it and releases what it installed. The release
//! runs with the lock dropped: resident pages under their frame lock, swapped pages
//! by dropping their slot reference. Until that is done the range is in `dying`:
//! `map_anon` does not hand it out (so no page of the old region can appear in a
//! new one at the same address) and fork waits for it (a fork in that window would
//! share leaves that still hold the dying entries).

use crate::addr::{PAGE_SIZE, VADDR_END};
use crate::engine::{Engine, SpaceWalk};
use crate::error::{Error, Result};
use crate::filemap::inode::Inode;
use crate::mm::entry::{copy_entry, release_entry};
use crate::mm::pagetable::{LeafPool, PageTable, LEAF_PAGES};
use crate::mm::region::{Region, RegionTree, Share, Snapshot, Vma};
use crate::pte::Pte;
use crate::sync::{fence, Arc, AtomicU64, Ordering, RwLock};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;

/// Lowest address handed out: the first 4 GiB stay unmapped, so small integers and
/// null are bad addresses.
pub(crate) const MAP_BASE: u64 = 1 << 32;

#[derive(Debug)]
pub(crate) struct SpaceInner {
    pub eng: Arc<Engine>,
    pub pt: PageTable,
    /// The regions. Write-locked by map, unmap and fork; read-locked by a fault
    /// only on its fallback path (see the module header), and by msync and swapoff.
    pub regions: RwLock<RegionTree>,
    /// What faults read instead of `regions`: a snapshot of it, replaced (stored
    /// only under `regions`' write lock, by `publish`) after every change. Loads
    /// take no lock; a snapshot lives while a reader holds it (`arc-swap`).
    pub snap: ArcSwap<Snapshot>,
    /// Ranges being unmapped (start → length): no longer accessible, not yet free to
    /// map again until their pages are released. Protected by `regions`' write lock
    /// for insertion and lookup; removal takes it too.
    pub dying: crate::sync::Mutex<BTreeMap<u64, u64>>,
    /// Readahead state of swap-in faults (`fault::claim_ahead`): the last page a
    /// fault brought in (or read ahead), the stride of the last faults and how many
    /// faults in a row kept it (`fault::ra_pack`). Relaxed: a lost update only
    /// costs a window.
    pub ra: AtomicU64,
}

impl SpaceInner {
    pub fn new(eng: Arc<Engine>, leaves: Arc<LeafPool>) -> SpaceInner {
        SpaceInner {
            pt: PageTable::new(leaves),
            eng,
            regions: RwLock::new(RegionTree::default()),
            snap: ArcSwap::from_pointee(Snapshot::default()),
            dying: crate::sync::Mutex::new(BTreeMap::new()),
            ra: AtomicU64::new(0),
        }
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
        self.map_vma(len, |at| Vma::anonymous(at, len))
    }

    /// Maps all of the file `inode` (its length rounded up to pages) with `share`.
    ///
    /// Errors: `InvalidArgument` for an empty file; `OutOfMemory` when no gap of
    /// that size is left.
    pub fn map_file(&self, inode: Arc<Inode>, share: Share) -> Result<Region> {
        let flen = inode.len();
        if flen == 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot map {}: the file is empty",
                inode.path.display()
            )));
        }
        let len = flen.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
        if len > VADDR_END - MAP_BASE {
            return Err(Error::InvalidArgument(format!(
                "cannot map {}: {flen} bytes exceed an address space",
                inode.path.display()
            )));
        }
        self.map_vma(len, |at| Vma::file(at, len, share, inode))
    }

    /// Places a region of `len` bytes (a page multiple) at the first gap above
    /// `MAP_BASE` and inserts `make(start)`.
    fn map_vma(&self, len: u64, make: impl FnOnce(u64) -> Vma) -> Result<Region> {
        let mut regions = self.regions.write();
        // First fit above MAP_BASE, around mapped regions and ranges still being
        // unmapped (their old pages are not all released yet).
        let dying = self.dying.lock();
        let mut taken: Vec<(u64, u64)> = regions
            .spans_from(MAP_BASE)
            .chain(dying.range(MAP_BASE..).map(|(&s, &l)| (s, l)))
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
        let vma = make(at);
        let r = vma.handle();
        regions.insert(vma);
        self.publish(&regions);
        Ok(r)
    }

    /// Publishes a snapshot of `regions` for speculative faults. Precondition: the
    /// caller holds the regions write lock (`regions` is its guard), so snapshots
    /// are stored in the order of the changes. The old snapshot goes when its last
    /// reader lets go of it; it holds no file open (views hold `Weak`s).
    pub fn publish(&self, regions: &RegionTree) {
        self.snap.store(Arc::new(regions.snapshot()));
    }

    /// Whether `[addr, addr + len)` lies inside mapped regions (see
    /// `RegionTree::range_mapped`), read from the snapshot unless speculative faults
    /// are off.
    pub fn range_mapped(&self, addr: u64, len: u64) -> Result<()> {
        if self.eng.speculative {
            self.snap.load().range_mapped(addr, len)
        } else {
            self.regions.read().range_mapped(addr, len)
        }
    }

    pub fn regions(&self) -> Vec<Region> {
        self.regions.read().iter().map(Vma::handle).collect()
    }

    pub fn unmap(&self, r: Region) -> Result<()> {
        // The region's backing (a file's inode) is dropped after the locks: the
        // last mapping of a file writes its dirty pages back then.
        let gone = {
            let mut regions = self.regions.write();
            match regions.get(r.start.0) {
                Some(v) if v.len == r.len => {}
                _ => return Err(Error::BadAddress { addr: r.start.0 }),
            }
            // Leaves shared with a fork are copied before their entries are cleared,
            // so the other space keeps its pages. Under the write lock: nothing else
            // changes this table's slots meanwhile. A copy that cannot take a slot
            // reference fails the unmap before anything changed.
            let first = r.start.0 / PAGE_SIZE as u64;
            let end = r.end().0 / PAGE_SIZE as u64;
            let mut vpn = first;
            while vpn < end {
                self.unshare(vpn)?;
                vpn = (vpn | (LEAF_PAGES - 1)) + 1;
            }
            let gone = regions.remove(r.start.0);
            self.publish(&regions);
            // The region's count is odd now; a speculative fault claims its entry,
            // reads the count (SeqCst, both), and the release below reads the entries
            // after this fence: one of the two sees the other (see the header).
            fence(Ordering::SeqCst);
            self.dying.lock().insert(r.start.0, r.len);
            gone
        };
        let eng = &*self.eng;
        self.pt.for_each(
            r.start.0 / PAGE_SIZE as u64,
            r.end().0 / PAGE_SIZE as u64,
            |_, pte| release_entry(eng, pte),
        );
        let regions = self.regions.write();
        self.dying.lock().remove(&r.start.0);
        drop(regions);
        drop(gone);
        Ok(())
    }

    /// Makes the leaf covering `vpn` private to this space (copying it if another
    /// space shares it). Precondition: the regions write lock is held.
    ///
    /// Errors: `OutOfSwap` when a swapped page in it is already shared by 65,535
    /// entries (its slot's count is full); the leaf stays shared, nothing changed.
    pub fn unshare(&self, vpn: u64) -> Result<()> {
        let eng = &*self.eng;
        if self.pt.unshare(
            vpn,
            |src, dst| copy_entry(eng, src, dst),
            |e| release_entry(eng, e),
        ) {
            Ok(())
        } else {
            Err(Error::OutOfSwap)
        }
    }
}

impl Drop for SpaceInner {
    fn drop(&mut self) {
        // Regions first (a file mapping's inode may write back its pages as it
        // goes), then the pages.
        self.regions.get_mut().clear();
        let eng = self.eng.clone();
        self.pt.clear(|e| release_entry(&eng, e));
    }
}

impl SpaceWalk for SpaceInner {
    fn swapped_on(&self, dev: u8, out: &mut Vec<(u64, u64)>) {
        let regions = self.regions.read();
        for v in regions.iter() {
            let first = v.start / PAGE_SIZE as u64;
            let end = v.end() / PAGE_SIZE as u64;
            self.pt.for_each(first, end, |vpn, pte| {
                if let Pte::Swapped(e) = Pte::decode(pte.load(Ordering::Acquire)) {
                    if e.dev == dev {
                        out.push((e.slot, vpn));
                    }
                }
            });
        }
    }

    fn entry(&self, vpn: u64) -> Option<&AtomicU64> {
        self.pt.lookup(vpn)
    }
}
