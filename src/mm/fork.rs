//! fork: a copy-on-write snapshot of an address space.
//!
//! The page table's leaves are shared, not copied (the kernel's "on-demand fork"):
//! fork costs a few operations per 2 MiB of mapped address space. The first write
//! through a shared leaf (in either space) copies that leaf (`SpaceInner::unshare`
//! with `entry::copy_entry`), taking a reference on every page and slot in it and marking
//! shared pages copy-on-write; the write then breaks the copy-on-write of its page
//! (`fault::cow_break`).
//!
//! ## Locking
//! The parent's regions write lock for the whole snapshot (so no unmap runs and no
//! fault on the locked path claims meanwhile), then the child's, under which the
//! child's first snapshot of regions is published. Faults that found their region
//! speculatively do not take the lock: one whose claim lands after `tag_all` sees the
//! tag when it validates (a SeqCst claim, then a SeqCst load of the slot;
//! `tag_all` stores, fences, then scans) and undoes it, one that claimed earlier is a `BUSY` entry like any
//! other claimed before the fork (the leaf is shared with the claim in it, and the
//! page is installed into the shared leaf), and a swap-in claim in an already
//! shared leaf is made on the locked path (`mm::lookup`). `copy_entry` takes a frame lock, then the
//! entry's bit lock, as everywhere; it claims a swapped entry (`BUSY`) to take a
//! slot reference, and never allocates a frame.

use crate::addr::PAGE_SIZE;
use crate::error::Result;
use crate::mm::space::SpaceInner;
use crate::pte::{P_EXCL, P_LOCK, P_SHARED, TAG_MASK, TAG_PRESENT};
use crate::sync::{wait_until, AtomicU64, Ordering};

/// A copy-on-write snapshot of this space into `child` (which the caller has
/// registered with the Vm, so swapoff sees it from the start).
///
/// The page table's leaves are shared, not copied (the kernel's "on-demand fork"):
/// fork costs a few operations per 2 MiB of mapped address space. The first
/// write through a shared leaf (in either space) copies that leaf, taking a
/// reference on every page and slot in it and marking shared pages
/// copy-on-write; see `unshare` and `fault::cow_break`.
///
/// Waits for guards on this space's pages to be dropped (a guard pins an entry,
/// and a shared leaf holds no pinned entry), without holding any lock meanwhile.
pub(crate) fn fork_into(sp: &SpaceInner, child: &SpaceInner) -> Result<()> {
    loop {
        let regions = sp.regions.write();
        if !sp.dying.lock().is_empty() {
            // An unmap is releasing entries with the lock dropped. Its leaves may
            // also cover a live region (a leaf spans 2 MiB), so sharing them now
            // would hand the child entries it has no region for — and, once it maps
            // that range, the parent's old pages (issue 9 item 1). Wait it out: the
            // release takes no lock and ends when the guards on its pages are
            // dropped (a guard held by this thread is refused before we get here).
            drop(regions);
            wait_until(|| sp.dying.lock().is_empty());
            continue;
        }
        let mut tagged = Vec::new();
        for (start, len) in regions.spans_from(0) {
            sp.pt.tag_all(
                start / PAGE_SIZE as u64,
                (start + len) / PAGE_SIZE as u64,
                &mut tagged,
            );
        }
        // From here, hit-path writers and new pins see the tag (or we see them).
        let mut pinned = None;
        for (start, len) in regions.spans_from(0) {
            sp.pt.for_each(
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
            sp.pt.untag(&tagged);
            drop(regions);
            // SAFETY: entries of this table stay valid while the space lives.
            let pte = unsafe { &*(p as *const AtomicU64) };
            wait_until(|| {
                let v = pte.load(Ordering::Acquire);
                v & TAG_MASK != TAG_PRESENT || v & (P_EXCL | P_SHARED) == 0
            });
            continue;
        }
        // Two regions locks: the child's is nobody else's yet (lockdep: nested).
        let mut theirs = child.regions.write_nested();
        *theirs = regions.clone();
        child.publish(&theirs);
        drop(theirs);
        for (start, len) in regions.spans_from(0) {
            sp.pt.share_into(
                &child.pt,
                start / PAGE_SIZE as u64,
                (start + len) / PAGE_SIZE as u64,
            );
        }
        return Ok(());
    }
}
