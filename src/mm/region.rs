//! Regions of an address space (the kernel's VMAs) and the tree that holds them.
//!
//! Owns: [`Region`] (the public, `Copy` handle `map_anon` returns), `Vma` (what the
//! engine keeps per region: kind, flags, backing, and a `RegionView` with its
//! sequence count), `RegionTree` (start → `Vma`) and `Snapshot` (what faults read).
//!
//! Kinds: anonymous, and file-backed (`map_file`, with a [`Share`] mode). The fault
//! path dispatches on the kind it finds:
//! - `Share::Shared`: the region has no entries of its own; every access goes to the
//!   file's page cache (`filemap::inode`), shared with every other mapping of the
//!   file and every `File` handle.
//! - `Share::Private` and `Share::Atomic`: an entry of the space's own page table
//!   that is `EMPTY` means "as in the file" (reads go to the page cache); the first
//!   write (or guard) copies the page into a private anonymous page, which reclaim
//!   sends to swap like any other. For `Atomic`, the private pages are exactly the
//!   pages dirtied since the last `msync`, which commits them to the file through a
//!   journal (`mm::msync`).
//!
//! ## Locking
//! A `RegionTree` lives inside its space's `regions` RwLock: read to look a region
//! up on the fallback path, write to change it. A fault looks its region up without
//! that lock (`mm::lookup`), in a [`Snapshot`]: an immutable sorted copy of what it
//! needs of every region (`RegionView`s, shared with the `Vma`s), which the writer
//! publishes through the space's `ArcSwap` after every change, under the write lock.
//! A snapshot may be stale by the time it is read; each view carries the region's
//! sequence count, made odd for good when the region is removed (`RegionTree::remove`),
//! so a reader that begins with an even count and validates after it has claimed its
//! entry knows the region was still mapped when the claim landed.

use crate::addr::{VAddr, PAGE_SIZE, VADDR_END};
use crate::error::{Error, Result};
use crate::filemap::inode::Inode;
use crate::sync::{Arc, SeqCount, Weak};
use std::collections::BTreeMap;

/// A mapped region of an address space, as returned by `map_anon`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Region {
    pub(crate) start: VAddr,
    pub(crate) len: u64,
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

/// How a file mapping (`AddressSpace::map_file`) shares its pages with the file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Share {
    /// Writes go to the file's page cache, seen by every other `Shared` mapping and
    /// `File` handle of the file, and reach the file by write-back (the page-I/O
    /// threads, under memory pressure) or `msync` (the kernel's `MAP_SHARED`).
    Shared,
    /// Copy-on-write: a page reads as in the file until this mapping writes it; its
    /// writes are its own and never reach the file (their pages go to swap)
    /// (`MAP_PRIVATE`).
    Private,
    /// Failure-atomic: as `Private` until `msync`, which makes every page this
    /// mapping dirtied since the previous `msync` reach the file, or none of them,
    /// whatever crashes when (a write-ahead journal beside the file,
    /// `PATH.usermm-journal`, replayed when the file is next mapped or opened, or by
    /// `usermm fsck PATH`). Until `msync` the file is untouched.
    Atomic,
}

/// What kind of memory a region is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum RegionKind {
    /// Zero-filled on first touch; its pages go to swap.
    Anonymous,
    /// A mapping of a host file (`Backing::File`).
    File(Share),
}

/// Region flags (`VM_*` in the kernel).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) struct RegionFlags(u32);

impl RegionFlags {
    /// Pages may be read.
    pub const READ: RegionFlags = RegionFlags(1);
    /// Pages may be written.
    pub const WRITE: RegionFlags = RegionFlags(2);

    pub const fn union(self, o: RegionFlags) -> RegionFlags {
        RegionFlags(self.0 | o.0)
    }
}

/// Where a region's pages come from when they have never been written.
#[derive(Clone, Debug)]
pub(crate) enum Backing {
    /// Nothing: zeros.
    Zero,
    /// A host file's page cache; page 0 of the region is page 0 of the file.
    File(Arc<Inode>),
}

impl PartialEq for Backing {
    fn eq(&self, o: &Backing) -> bool {
        match (self, o) {
            (Backing::Zero, Backing::Zero) => true,
            (Backing::File(a), Backing::File(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// One region: the engine's view.
#[derive(Debug)]
pub(crate) struct Vma {
    pub start: u64,
    pub len: u64,
    pub kind: RegionKind,
    pub flags: RegionFlags,
    pub backing: Backing,
    /// What a fault reads of this region without the regions lock (the same
    /// `Arc` is in every snapshot published while the region is mapped).
    pub view: Arc<RegionView>,
}

/// What a fault needs of a region, read without the regions lock: immutable but
/// for `seq`.
#[derive(Debug)]
pub(crate) struct RegionView {
    pub start: u64,
    pub len: u64,
    /// For a file mapping: its inode and how it is shared. `Weak`: a view may live
    /// on in a reader's stale snapshot after the region is gone, and must not keep
    /// the file open (its last mapping writes it back when it goes, see `unmap`); a
    /// fault upgrades it to a reference of its own before validating.
    pub file: Option<(Weak<Inode>, Share)>,
    /// The region's sequence count: even while it is mapped, odd for good once
    /// `RegionTree::remove` took it out (no region changes in place today).
    pub seq: SeqCount,
}

impl RegionView {
    fn new(start: u64, len: u64, file: Option<(Weak<Inode>, Share)>) -> Arc<RegionView> {
        Arc::new(RegionView {
            start,
            len,
            file,
            seq: SeqCount::default(),
        })
    }
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// An immutable copy of a space's regions for lock-free lookups (see the module
/// header): their views, sorted by start.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    views: Vec<Arc<RegionView>>,
}

impl Snapshot {
    /// The index of the region containing `addr`.
    #[inline]
    pub fn index_of(&self, addr: u64) -> Option<usize> {
        let i = self
            .views
            .partition_point(|v| v.start <= addr)
            .checked_sub(1)?;
        (addr < self.views[i].end()).then_some(i)
    }
    /// The view at `idx` (from `index_of`).
    #[inline]
    pub fn view(&self, idx: usize) -> &RegionView {
        &self.views[idx]
    }
    /// As `RegionTree::range_mapped`.
    pub fn range_mapped(&self, addr: u64, len: u64) -> Result<()> {
        let end = addr
            .checked_add(len)
            .filter(|&e| e <= VADDR_END)
            .ok_or(Error::BadAddress { addr })?;
        let mut at = addr;
        while at < end {
            match self.index_of(at) {
                Some(i) => at = self.views[i].end(),
                None => return Err(Error::BadAddress { addr: at }),
            }
        }
        Ok(())
    }
}

impl Vma {
    /// A read-write anonymous region.
    pub fn anonymous(start: u64, len: u64) -> Vma {
        Vma {
            start,
            len,
            kind: RegionKind::Anonymous,
            flags: RegionFlags::READ.union(RegionFlags::WRITE),
            backing: Backing::Zero,
            view: RegionView::new(start, len, None),
        }
    }
    /// A read-write mapping of the file `inode` (`len` bytes, a page multiple).
    pub fn file(start: u64, len: u64, share: Share, inode: Arc<Inode>) -> Vma {
        Vma {
            start,
            len,
            kind: RegionKind::File(share),
            flags: RegionFlags::READ.union(RegionFlags::WRITE),
            view: RegionView::new(start, len, Some((Arc::downgrade(&inode), share))),
            backing: Backing::File(inode),
        }
    }
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
    /// For a file mapping: its inode, how it shares, and the file page of `addr`.
    pub fn file_page(&self, addr: u64) -> Option<(&Arc<Inode>, Share, u64)> {
        match (&self.backing, self.kind) {
            (Backing::File(ino), RegionKind::File(share)) => {
                Some((ino, share, (addr - self.start) / PAGE_SIZE as u64))
            }
            _ => None,
        }
    }
    pub fn handle(&self) -> Region {
        Region {
            start: VAddr(self.start),
            len: self.len,
        }
    }
}

impl Clone for Vma {
    /// A copy for a forked space: same kind, flags and backing; a view of its own
    /// (the child's snapshots are the child's), whose sequence count starts where the
    /// original's is.
    fn clone(&self) -> Vma {
        let view = Arc::new(RegionView {
            start: self.view.start,
            len: self.view.len,
            file: self.view.file.clone(),
            seq: SeqCount::new(self.view.seq.get()),
        });
        Vma {
            start: self.start,
            len: self.len,
            kind: self.kind,
            flags: self.flags,
            backing: self.backing.clone(),
            view,
        }
    }
}

/// The regions of one space, by start address.
#[derive(Debug, Default, Clone)]
pub(crate) struct RegionTree {
    map: BTreeMap<u64, Vma>,
}

impl RegionTree {
    /// The region containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Vma> {
        self.map
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| addr < v.end())
    }
    /// The region starting exactly at `start`.
    pub fn get(&self, start: u64) -> Option<&Vma> {
        self.map.get(&start)
    }
    pub fn insert(&mut self, vma: Vma) {
        self.map.insert(vma.start, vma);
    }
    pub fn remove(&mut self, start: u64) -> Option<Vma> {
        let v = self.map.remove(&start)?;
        // Whoever reads it optimistically (in a snapshot that still holds it) must
        // see it gone: the count stays odd for good, so a reader that begins now
        // falls back, and one that began before fails its validation.
        if !planted!(UnmapKeepsCountEven) {
            v.view.seq.write_begin();
        }
        Some(v)
    }
    /// A snapshot of the tree for lock-free lookups (published by the writer that
    /// holds the write lock, see `SpaceInner::publish`).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            views: self.map.values().map(|v| v.view.clone()).collect(),
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = &Vma> {
        self.map.values()
    }
    /// Regions starting at or above `from`, as (start, len).
    pub fn spans_from(&self, from: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.range(from..).map(|(&s, v)| (s, v.len))
    }
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Whether `[addr, addr + len)` lies inside mapped regions (adjacent ones count).
    /// Errors: `BadAddress` with the first address that is not mapped.
    pub fn range_mapped(&self, addr: u64, len: u64) -> Result<()> {
        let end = addr
            .checked_add(len)
            .filter(|&e| e <= VADDR_END)
            .ok_or(Error::BadAddress { addr })?;
        let mut at = addr;
        while at < end {
            match self.find(at) {
                Some(v) => at = v.end(),
                None => return Err(Error::BadAddress { addr: at }),
            }
        }
        Ok(())
    }
}
