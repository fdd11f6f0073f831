//! Finding the region of a fault: speculatively, without the space's regions lock,
//! or under its read lock (the fallback). Keeps the "optimistic readers never spin"
//! half of docs/design.md invariant 5 for the fault path.
//!
//! ## What is read optimistically
//! The space's current `Snapshot` (`SpaceInner::snap`, an `ArcSwap`: a load takes no
//! lock, and the snapshot lives while this lookup holds it), the `RegionView` of
//! the region containing the address (start, length, for a file mapping a `Weak`
//! of its inode and how it is shared) and that view's sequence count; then (by the
//! caller) the page table's slot of the leaf and the entry. A file region's `Weak`
//! is upgraded at once: the fault holds its own `Arc<Inode>` from then on, whatever
//! happens to the region.
//!
//! ## How it is validated
//! A snapshot is consistent by construction (the writer builds it under the write
//! lock), but may be stale. A view's count is even while its region is mapped and
//! odd for good once it is removed, so:
//! - `Found::valid`: for a step that claims nothing (a read of a never-written page
//!   as zeros, a read or write through the page cache): the count has not moved
//!   since the lookup, so the region was mapped when the entry was read.
//! - `Found::confirm`: after the fault claimed its entry (`BUSY` by a SeqCst CAS,
//!   or `P_LOCK` and a SeqCst fence for a copy-on-write break), SeqCst loads: the
//!   region's count has not moved (unmap makes it odd, fences, then releases the
//!   entries: it either sees the claim and waits for it, or the fault sees the odd
//!   count), and the table's slot
//!   still holds the leaf the entry is in, untagged as it was at the lookup (fork's
//!   tag and `unshare` both change it: fork tags, fences, then looks for locked
//!   entries, as for the hit path's writes; `unshare` copies only a tagged leaf and
//!   fences before it reads the entries, see `pagetable`). A claim in a leaf that
//!   was already shared at the lookup (after a fork, only a swap-in read makes
//!   one) is not confirmed: the copy of such a leaf may be under way, reading
//!   entries before it replaces the slot, so that claim is made under the lock.
//!   Once confirmed, the claim is what keeps unmap and fork off the page, exactly
//!   as on the locked path.
//!
//! An address in no region of the snapshot is `BadAddress` at once: every `map_*`
//! and `unmap` publishes its snapshot before it returns, so the snapshot a fault
//! loads reflects every change that happened before the fault began.
//!
//! ## The fallback
//! When the view's count is odd at the lookup, the inode is already gone, or a
//! validation fails, the fault undoes its claim (the entry gets back the value it
//! claimed) and does that step again under the regions read lock, which it holds
//! from the lookup to the claim as before. Each step tries speculatively at most
//! once per round of its caller (a round ends by waiting for another thread's
//! claim, lock or pin, as on the locked path): no reader spins or retries
//! unboundedly on a count. With
//! `Config::speculative_faults(false)` every lookup takes the lock.

use crate::addr::PAGE_SIZE;
use crate::error::{Error, Result};
use crate::filemap::inode::Inode;
use crate::mm::pagetable::Hit;
use crate::mm::region::{RegionTree, Share, Snapshot};
use crate::mm::space::SpaceInner;
use crate::sync::{Arc, Ordering, RwLockReadGuard};
use arc_swap::Guard;

/// A region found for a fault, and what keeps the finding good until the fault has
/// claimed its entry. Drop it right after the claim is confirmed: on the locked
/// path it holds the regions read lock.
pub(crate) struct Found<'a> {
    how: How<'a>,
    /// For a file mapping: its inode (this fault's own reference), how it is shared,
    /// and the file page of the address.
    pub file: Option<(Arc<Inode>, Share, u64)>,
}

enum How<'a> {
    /// Under the regions read lock, held since the lookup (until this drops).
    Locked {
        _held: RwLockReadGuard<'a, RegionTree>,
    },
    /// Without it: the snapshot, the view's index in it and the view's count at
    /// the lookup.
    Spec {
        snap: Guard<Arc<Snapshot>>,
        idx: usize,
        seq: u64,
    },
}

impl Found<'_> {
    /// Whether the lookup still holds, for a step that claimed nothing: the region
    /// is still mapped (see the module header). Always true on the locked path.
    #[inline]
    pub fn valid(&self) -> bool {
        match &self.how {
            How::Locked { .. } => true,
            How::Spec { snap, idx, seq, .. } => !snap.view(*idx).seq.read_retry(*seq),
        }
    }

    /// Whether a claim just taken on `hit.pte` may stand: the region is still mapped
    /// and the entry still in this table's leaf, unshared (see the module header).
    /// Always true on the locked path. On false the caller undoes its claim and
    /// falls back to the locked path.
    ///
    /// Precondition: the claim was a SeqCst read-modify-write, or the caller fenced
    /// (SeqCst) after it. The loads here are SeqCst, so in the single total order
    /// they come after the claim: paired with unmap's count-then-fence-then-release
    /// and fork's tag-then-fence-then-scan (which `unshare` follows), either the
    /// writer sees the claim or this sees the writer.
    #[inline]
    pub fn confirm(&self, hit: &Hit<'_>) -> bool {
        match &self.how {
            How::Locked { .. } => true,
            How::Spec { snap, idx, seq } => {
                !hit.shared()
                    && !snap.view(*idx).seq.read_retry_sc(*seq)
                    && hit.still(Ordering::SeqCst)
            }
        }
    }

    /// Whether this lookup took no lock.
    pub fn speculative(&self) -> bool {
        matches!(self.how, How::Spec { .. })
    }
}

/// Finds the region containing `addr`: without the regions lock if `spec` (and the
/// snapshot's view of it is usable), else under the read lock.
///
/// Errors: `BadAddress` when no region contains `addr` (in the current snapshot,
/// which every `map_*` and `unmap` publishes before it returns).
#[inline]
pub(crate) fn find(sp: &SpaceInner, addr: u64, spec: bool) -> Result<Found<'_>> {
    if spec {
        if let Some(f) = find_spec(sp, addr)? {
            return Ok(f);
        }
    }
    let regions = sp.regions.read();
    let vma = regions.find(addr).ok_or(Error::BadAddress { addr })?;
    let file = vma.file_page(addr).map(|(i, s, p)| (i.clone(), s, p));
    Ok(Found {
        how: How::Locked { _held: regions },
        file,
    })
}

/// The speculative lookup; `None` when it cannot be used (fall back).
#[inline]
fn find_spec(sp: &SpaceInner, addr: u64) -> Result<Option<Found<'_>>> {
    let snap = sp.snap.load();
    let Some(idx) = snap.index_of(addr) else {
        return Err(Error::BadAddress { addr });
    };
    let view = snap.view(idx);
    let Some(seq) = view.seq.read_begin() else {
        return Ok(None); // removed: this snapshot is stale
    };
    let file = match &view.file {
        None => None,
        Some((w, share)) => match w.upgrade() {
            Some(ino) => Some((ino, *share, (addr - view.start) / PAGE_SIZE as u64)),
            None => return Ok(None), // its last mapping is going
        },
    };
    if !sp.eng.lookup_delay.is_zero() {
        std::thread::sleep(sp.eng.lookup_delay); // tests widen the race window
    }
    Ok(Some(Found {
        how: How::Spec { snap, idx, seq },
        file,
    }))
}
