//! Regions of an address space (the kernel's VMAs) and the tree that holds them.
//!
//! Owns: [`Region`] (the public, `Copy` handle `map_anon` returns), `Vma` (what the
//! engine keeps per region: kind, flags, backing, a sequence count) and `RegionTree`
//! (start → `Vma`). The tree as a whole is covered by its space's `regions_seq`.
//!
//! Kinds: anonymous today; file-backed (`map_file`) and transparent (userfaultfd)
//! regions are added as new `RegionKind`/`Backing` variants, and the fault path
//! dispatches on the kind it finds, so its shape does not change.
//!
//! ## Locking
//! A `RegionTree` lives inside its space's `regions` RwLock: read to look a region
//! up, write to change it. Every change also moves the space's `regions_seq` (and the
//! removed region's own count), so an optimistic reader that looked regions up without the lock
//! can tell that what it read is stale and fall back to the locked path.

use crate::addr::{VAddr, VADDR_END};
use crate::error::{Error, Result};
use crate::sync::SeqCount;
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

/// What kind of memory a region is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum RegionKind {
    /// Zero-filled on first touch; its pages go to swap.
    Anonymous,
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
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) enum Backing {
    /// Nothing: zeros.
    Zero,
}

/// One region: the engine's view.
#[derive(Debug)]
pub(crate) struct Vma {
    pub start: u64,
    pub len: u64,
    pub kind: RegionKind,
    pub flags: RegionFlags,
    pub backing: Backing,
    /// Moved on every change of this region (see the module header).
    pub seq: SeqCount,
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
            seq: SeqCount::default(),
        }
    }
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
    pub fn handle(&self) -> Region {
        Region {
            start: VAddr(self.start),
            len: self.len,
        }
    }
}

impl Clone for Vma {
    /// A copy for a forked space: same kind, flags and backing; its sequence count
    /// starts where the original's is.
    fn clone(&self) -> Vma {
        Vma {
            start: self.start,
            len: self.len,
            kind: self.kind,
            flags: self.flags,
            backing: self.backing.clone(),
            seq: SeqCount::new(self.seq.get()),
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
        // Whoever read it optimistically must see it changed.
        v.seq.write_begin();
        v.seq.write_end();
        Some(v)
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
