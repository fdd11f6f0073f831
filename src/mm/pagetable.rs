//! Sparse page tables: a three-level radix tree over the 35-bit virtual page number
//! (47-bit addresses), built on demand, so a terabyte region costs nothing until it
//! is touched. A leaf holds 4096 entries (16 MiB of address space, 32 KiB of
//! metadata: 0.2 % of the memory it describes when full). What an entry means is
//! `crate::pte`.
//!
//! Owns: the nodes (top, mids, leaves), the `LeafPool` of recycled leaves.
//!
//! Nodes are created with a compare-and-swap and freed only when the table is
//! dropped, so a lock-free reader can hold `&AtomicU64` for as long as it holds the
//! address space. Leaves are shared between tables after a fork (a use count in the
//! leaf) and copied on the first write through them (`unshare`).
//!
//! ## Locking
//! No lock on lookups or node creation (CAS). `LeafPool::free` (Mutex) is a leaf lock
//! around the recycled-leaf list. `unshare` and `share_into` run under the owning
//! space's regions write lock (their callers say so).
//!
//! A fault that found its region without that lock (`mm::lookup`) claims an entry
//! of a leaf it looked up without it too, so it must be able to tell, after the
//! claim, that the table did not replace the leaf meanwhile. Two changes replace
//! a slot's value: fork's tag (`tag_all`) and `unshare`, which copies only a tagged
//! leaf. Such a fault claims only in a leaf that was not tagged when it looked it
//! up, then checks the slot again (`Hit::still`; the claim and the check are
//! SeqCst): a copy of that leaf needs a tag first, which the fault sees, or else
//! the copy (which fences before it reads the entries) sees the claim and waits. A claim in a leaf that
//! was already tagged is made under the regions read lock instead, which keeps
//! `unshare` out.

use crate::addr::{PAGE_SHIFT, VADDR_BITS};
use crate::pte::EMPTY;
use crate::sync::{fence, Arc, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Mutex, Ordering};
use std::alloc::{alloc_zeroed, dealloc, Layout};

const LEAF_BITS: u32 = 12;
const MID_BITS: u32 = 12;
const TOP_BITS: u32 = VADDR_BITS - PAGE_SHIFT - LEAF_BITS - MID_BITS;
const LEAF_LEN: usize = 1 << LEAF_BITS;
/// Pages covered by one leaf.
pub(crate) const LEAF_PAGES: u64 = LEAF_LEN as u64;
const MID_LEN: usize = 1 << MID_BITS;
const TOP_LEN: usize = 1 << TOP_BITS;

/// A leaf: 4096 entries (16 MiB of address space) and the number of page tables
/// whose slot points to it (more than one after a fork shares it).
#[repr(C)]
pub(crate) struct Leaf {
    e: [AtomicU64; LEAF_LEN],
    users: AtomicU32,
}

#[repr(C)]
struct Mid {
    e: [AtomicPtr<Leaf>; MID_LEN],
}

fn new_zeroed<T>() -> *mut T {
    let layout = Layout::new::<T>();
    // SAFETY: the layout has non-zero size (both node types are 32 KiB); all-zero bytes
    // are a valid `T` here (arrays of atomics whose zero is null / EMPTY, a zero count).
    let p = unsafe { alloc_zeroed(layout) } as *mut T;
    if p.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    p
}

/// Slot tag: the leaf is shared with another page table (copy-on-write at leaf level).
const SHARED: usize = 1;

#[inline]
fn untag(p: *mut Leaf) -> *mut Leaf {
    (p as usize & !SHARED) as *mut Leaf
}

/// Leaves of every page table of a Vm, recycled instead of freed while the Vm lives.
///
/// Type-stable memory (like the kernel's SLAB_TYPESAFE_BY_RCU): a lock-free reader
/// may still hold a pointer to a leaf that its table just replaced (after a fork, the
/// first write into a shared leaf gives the writer's table a copy). The old leaf may
/// be recycled into another table meanwhile, but its memory stays a leaf, so the
/// reader's loads are harmless, and the reader notices by checking its table's slot
/// again after its copy (see `fault::read_fast`).
#[derive(Debug)]
pub(crate) struct LeafPool {
    /// Recycled leaves (all entries `EMPTY`, no users). Protected by its mutex (a
    /// leaf lock).
    free: Mutex<Vec<usize>>,
    /// Bytes of page-table nodes (leaves, mids, tops) of the Vm, for `stats`.
    pub bytes: AtomicUsize,
}

impl LeafPool {
    pub fn new() -> LeafPool {
        LeafPool {
            free: Mutex::new(Vec::new()),
            bytes: AtomicUsize::new(0),
        }
    }

    /// A leaf with every entry `EMPTY` and one user.
    fn get(&self) -> *mut Leaf {
        let p = match self.free.lock().pop() {
            Some(p) => p as *mut Leaf,
            None => {
                self.bytes
                    .fetch_add(std::mem::size_of::<Leaf>(), Ordering::Relaxed);
                new_zeroed::<Leaf>()
            }
        };
        // SAFETY: pooled leaves are live (never deallocated before the pool).
        unsafe { &*p }.users.store(1, Ordering::Relaxed);
        p
    }

    /// Gives a leaf whose entries are all `EMPTY` and which no table points to back.
    fn put(&self, p: *mut Leaf) {
        // SAFETY: as in `get`.
        debug_assert!(unsafe { &*p }
            .e
            .iter()
            .all(|e| e.load(Ordering::Relaxed) == EMPTY));
        self.free.lock().push(p as usize);
    }
}

impl Drop for LeafPool {
    fn drop(&mut self) {
        for &p in self.free.get_mut().iter() {
            // SAFETY: allocated by `new_zeroed::<Leaf>` and pooled; nobody can hold a
            // pointer once the pool (owned by the engine, outliving every table) goes.
            unsafe { dealloc(p as *mut u8, Layout::new::<Leaf>()) };
        }
    }
}

/// A page table of one address space.
pub(crate) struct PageTable {
    top: Box<[AtomicPtr<Mid>]>,
    pool: Arc<LeafPool>,
}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTable").finish()
    }
}

#[inline]
fn split(vpn: u64) -> (usize, usize, usize) {
    (
        (vpn >> (LEAF_BITS + MID_BITS)) as usize,
        ((vpn >> LEAF_BITS) as usize) & (MID_LEN - 1),
        (vpn as usize) & (LEAF_LEN - 1),
    )
}

/// What a hit path needs to validate its access: the entry, and the table slot with
/// the (tagged) leaf pointer it held.
pub(crate) struct Hit<'a> {
    pub pte: &'a AtomicU64,
    pub slot: &'a AtomicPtr<Leaf>,
    pub leaf: *mut Leaf,
}

impl Hit<'_> {
    /// Whether the leaf is shared with another table (writes must copy it first).
    #[inline]
    pub fn shared(&self) -> bool {
        self.leaf as usize & SHARED != 0
    }
    /// Whether the table still points to the same leaf.
    #[inline]
    pub fn still(&self, order: Ordering) -> bool {
        self.slot.load(order) == self.leaf
    }
}

impl PageTable {
    /// A new, empty table whose leaves come from `pool`.
    pub fn new(pool: Arc<LeafPool>) -> PageTable {
        let top: Box<[AtomicPtr<Mid>]> = (0..TOP_LEN)
            .map(|_| AtomicPtr::new(std::ptr::null_mut()))
            .collect();
        pool.bytes.fetch_add(
            TOP_LEN * std::mem::size_of::<AtomicPtr<Mid>>(),
            Ordering::Relaxed,
        );
        PageTable { top, pool }
    }

    #[inline]
    fn slot(&self, vpn: u64) -> Option<&AtomicPtr<Leaf>> {
        let (t, m, _) = split(vpn);
        let mid = self.top.get(t)?.load(Ordering::Acquire);
        if mid.is_null() {
            return None;
        }
        // SAFETY: non-null mid pointers point to live nodes, freed only in `drop`
        // (which needs `&mut self`).
        Some(&unsafe { &*mid }.e[m])
    }

    /// The entry for `vpn` with what the hit path validates against.
    #[inline]
    pub fn hit(&self, vpn: u64) -> Option<Hit<'_>> {
        let slot = self.slot(vpn)?;
        let leaf = slot.load(Ordering::Acquire);
        if leaf.is_null() {
            return None;
        }
        // SAFETY: leaves are type-stable (see `LeafPool`): the memory is a live leaf
        // for as long as the Vm exists, even if this table stops pointing to it.
        let pte = unsafe { &(*untag(leaf)).e[split(vpn).2] };
        Some(Hit { pte, slot, leaf })
    }

    /// The entry for `vpn` if its leaf exists. `vpn` must be below 2^35.
    #[inline]
    pub fn lookup(&self, vpn: u64) -> Option<&AtomicU64> {
        self.hit(vpn).map(|h| h.pte)
    }

    /// Whether the leaf covering `vpn` is shared with another table.
    pub fn is_shared(&self, vpn: u64) -> bool {
        self.hit(vpn).is_some_and(|h| h.shared())
    }

    /// The leaf slot for `vpn`, creating the mid node on the way.
    fn ensure_slot(&self, vpn: u64) -> &AtomicPtr<Leaf> {
        let (t, m, _) = split(vpn);
        let slot = &self.top[t];
        let mut mid = slot.load(Ordering::Acquire);
        if mid.is_null() {
            let new = new_zeroed::<Mid>();
            match slot.compare_exchange(mid, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.pool
                        .bytes
                        .fetch_add(std::mem::size_of::<Mid>(), Ordering::Relaxed);
                    mid = new;
                }
                Err(cur) => {
                    // SAFETY: `new` was allocated above with this layout and never shared.
                    unsafe { dealloc(new.cast(), Layout::new::<Mid>()) };
                    mid = cur;
                }
            }
        }
        // SAFETY: live node, see `slot`.
        &unsafe { &*mid }.e[m]
    }

    /// The entry for `vpn`, creating the nodes on the way (metadata, not budget).
    pub fn entry(&self, vpn: u64) -> &AtomicU64 {
        self.entry_hit(vpn).pte
    }

    /// `hit` for the entry of `vpn`, creating the nodes on the way (as `entry`).
    pub fn entry_hit(&self, vpn: u64) -> Hit<'_> {
        let lslot = self.ensure_slot(vpn);
        let mut leaf = lslot.load(Ordering::Acquire);
        if leaf.is_null() {
            let new = self.pool.get();
            match lslot.compare_exchange(leaf, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => leaf = new,
                Err(cur) => {
                    self.pool.put(new);
                    leaf = cur;
                }
            }
        }
        // SAFETY: type-stable leaf, see `hit`.
        let pte = unsafe { &(*untag(leaf)).e[split(vpn).2] };
        Hit {
            pte,
            slot: lslot,
            leaf,
        }
    }

    /// Calls `f(vpn, entry)` for every existing entry in `[first, end)`, skipping
    /// ranges whose nodes were never created.
    pub fn for_each(&self, first: u64, end: u64, mut f: impl FnMut(u64, &AtomicU64)) {
        let mut vpn = first;
        while vpn < end {
            let Some(slot) = self.slot(vpn) else {
                vpn = ((vpn >> (LEAF_BITS + MID_BITS)) + 1) << (LEAF_BITS + MID_BITS);
                continue;
            };
            let leaf = untag(slot.load(Ordering::Acquire));
            let stop = (((vpn >> LEAF_BITS) + 1) << LEAF_BITS).min(end);
            if !leaf.is_null() {
                for (i, v) in (split(vpn).2..).zip(vpn..stop) {
                    // SAFETY: type-stable leaf, see `hit`.
                    f(v, unsafe { &(*leaf).e[i] });
                }
            }
            vpn = stop;
        }
    }

    /// Calls `f(first_vpn, slot)` for every leaf slot holding a leaf in `[first, end)`.
    fn for_each_slot(&self, first: u64, end: u64, mut f: impl FnMut(u64, &AtomicPtr<Leaf>)) {
        let mut vpn = first & !(LEAF_LEN as u64 - 1);
        while vpn < end {
            match self.slot(vpn) {
                None => vpn = ((vpn >> (LEAF_BITS + MID_BITS)) + 1) << (LEAF_BITS + MID_BITS),
                Some(slot) => {
                    if !slot.load(Ordering::Acquire).is_null() {
                        f(vpn, slot);
                    }
                    vpn += LEAF_LEN as u64;
                }
            }
        }
    }

    /// Shares every leaf covering `[first, end)` with `child` (fork). Precondition:
    /// nothing else changes this table's slots meanwhile (the space's regions write
    /// lock), and no entry in them is pinned (the caller checked, after `tag_all`).
    pub fn share_into(&self, child: &PageTable, first: u64, end: u64) {
        self.for_each_slot(first, end, |vpn, slot| {
            let p = slot.load(Ordering::Acquire);
            debug_assert_ne!(p as usize & SHARED, 0, "share_into without tag_all");
            let cslot = child.ensure_slot(vpn);
            // Two regions in one leaf (a leaf spans 16 MiB) reach it twice: the child
            // holds one use of it, not one per region (else the leaf is never freed
            // and every page and slot in it leaks; issue 9 item 1).
            if cslot.load(Ordering::Acquire) == p {
                return;
            }
            // SAFETY: type-stable leaf.
            unsafe { &*untag(p) }.users.fetch_add(1, Ordering::AcqRel);
            let own = cslot.swap(p, Ordering::AcqRel);
            debug_assert!(own.is_null(), "fork into a table that has leaves");
        });
    }

    /// Tags every leaf slot covering `[first, end)` as shared; returns the slots that
    /// were not tagged before (so a failed fork can untag exactly those).
    pub fn tag_all(&self, first: u64, end: u64, out: &mut Vec<u64>) {
        self.for_each_slot(first, end, |vpn, slot| {
            let p = slot.load(Ordering::Acquire);
            if p as usize & SHARED == 0 {
                slot.store((p as usize | SHARED) as *mut Leaf, Ordering::SeqCst);
                out.push(vpn);
            }
        });
        crate::sync::fence(Ordering::SeqCst);
    }

    /// Undoes `tag_all` for the slots it returned.
    pub fn untag(&self, vpns: &[u64]) {
        for &vpn in vpns {
            if let Some(slot) = self.slot(vpn) {
                let p = slot.load(Ordering::Acquire);
                slot.store(untag(p), Ordering::Release);
            }
        }
    }

    /// Makes the leaf covering `vpn` private to this table. `copy(src, dst)` copies
    /// one entry (taking its own references) or returns false when it cannot (a
    /// reference count is full); `release(entry)` drops one entry's references and
    /// leaves it `EMPTY`. Returns false, with the leaf still shared and the partial
    /// copy released, when a copy failed. Precondition: no other thread changes this
    /// table's slots meanwhile (the space's regions write lock).
    pub fn unshare(
        &self,
        vpn: u64,
        mut copy: impl FnMut(&AtomicU64, &AtomicU64) -> bool,
        mut release: impl FnMut(&AtomicU64),
    ) -> bool {
        let Some(slot) = self.slot(vpn) else {
            return true;
        };
        let p = slot.load(Ordering::Acquire);
        if p as usize & SHARED == 0 {
            return true;
        }
        let old = untag(p);
        // SAFETY: type-stable leaf.
        let l = unsafe { &*old };
        if l.users.load(Ordering::Acquire) == 1 {
            // The other tables let go: it is ours alone.
            slot.store(old, Ordering::Release);
            return true;
        }
        let new = self.pool.get();
        // SAFETY: a fresh leaf from the pool, not yet visible.
        let n = unsafe { &*new };
        // The leaf was tagged (by fork, then a fence) before this copy; a speculative
        // fault claims, then checks the slot still holds the untagged leaf it saw
        // (both SeqCst): it sees the tag (and undoes its claim) or we see its claim
        // here (and wait it out). See the module header.
        fence(Ordering::SeqCst);
        for i in 0..LEAF_LEN {
            if !copy(&l.e[i], &n.e[i]) {
                for e in &n.e[..i] {
                    release(e);
                }
                self.pool.put(new);
                return false;
            }
        }
        slot.store(new, Ordering::Release);
        self.drop_use(old, &mut release);
        true
    }

    /// Drops this table's use of leaf `p` (untagged); the last user releases its
    /// entries and recycles it.
    fn drop_use(&self, p: *mut Leaf, release: &mut impl FnMut(&AtomicU64)) {
        // SAFETY: type-stable leaf.
        let l = unsafe { &*p };
        if l.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            for e in l.e.iter() {
                release(e);
            }
            self.pool.put(p);
        }
    }

    /// Lets go of every leaf (the space is being dropped): the last user of each
    /// releases its entries with `release`.
    pub fn clear(&mut self, mut release: impl FnMut(&AtomicU64)) {
        for t in 0..TOP_LEN {
            let mid = self.top[t].load(Ordering::Acquire);
            if mid.is_null() {
                continue;
            }
            for m in 0..MID_LEN {
                // SAFETY: live node (we own the table).
                let p = unsafe { &*mid }.e[m].swap(std::ptr::null_mut(), Ordering::AcqRel);
                if !p.is_null() {
                    self.drop_use(untag(p), &mut release);
                }
            }
        }
    }
}

impl Drop for PageTable {
    fn drop(&mut self) {
        // Leaves were handed back by `clear`; only the mids and the top remain.
        let mut freed = TOP_LEN * std::mem::size_of::<AtomicPtr<Mid>>();
        for slot in self.top.iter() {
            let mid = slot.load(Ordering::Acquire);
            if mid.is_null() {
                continue;
            }
            // SAFETY: we have `&mut self`; nobody holds a node any more.
            debug_assert!(unsafe { &*mid }
                .e
                .iter()
                .all(|l| l.load(Ordering::Relaxed).is_null()));
            // SAFETY: allocated by `entry` with this layout, freed once here.
            unsafe { dealloc(mid.cast(), Layout::new::<Mid>()) };
            freed += std::mem::size_of::<Mid>();
        }
        self.pool.bytes.fetch_sub(freed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_and_iterates() {
        let pool = Arc::new(LeafPool::new());
        let mut pt = PageTable::new(pool.clone());
        let top_only = pool.bytes.load(Ordering::Relaxed);
        assert!(pt.lookup(5).is_none());
        let far = (1u64 << 35) - 1;
        pt.entry(5).store(7, Ordering::Relaxed);
        pt.entry(far).store(9, Ordering::Relaxed);
        assert_eq!(pt.lookup(5).unwrap().load(Ordering::Relaxed), 7);
        assert!(pool.bytes.load(Ordering::Relaxed) <= top_only + 4 * 32768 + 64);
        let mut seen = vec![];
        pt.for_each(0, 1 << 35, |v, e| {
            if e.load(Ordering::Relaxed) != 0 {
                seen.push(v)
            }
        });
        assert_eq!(seen, vec![5, far]);
        pt.clear(|e| e.store(EMPTY, Ordering::Relaxed));
    }

    #[test]
    fn shared_leaves_copy_on_unshare() {
        let pool = Arc::new(LeafPool::new());
        let mut a = PageTable::new(pool.clone());
        let mut b = PageTable::new(pool.clone());
        a.entry(10).store(0x100, Ordering::Relaxed);
        let mut tagged = vec![];
        a.tag_all(0, 1 << 20, &mut tagged);
        assert_eq!(tagged, vec![0]);
        a.share_into(&b, 0, 1 << 20);
        assert!(a.is_shared(10) && b.is_shared(10));
        assert_eq!(b.lookup(10).unwrap().load(Ordering::Relaxed), 0x100);
        // b copies; a keeps the original.
        let mut copied = 0;
        b.unshare(
            10,
            |s, d| {
                let v = s.load(Ordering::Relaxed);
                if v != 0 {
                    copied += 1;
                }
                d.store(v, Ordering::Relaxed);
                true
            },
            |_| panic!("a still uses the leaf"),
        );
        assert_eq!(copied, 1);
        assert!(!b.is_shared(10));
        b.lookup(10).unwrap().store(0x200, Ordering::Relaxed);
        assert_eq!(a.lookup(10).unwrap().load(Ordering::Relaxed), 0x100);
        // a is now the only user: unsharing just drops the tag.
        a.unshare(
            10,
            |_, _| panic!("no copy needed"),
            |_| panic!("no release"),
        );
        assert!(!a.is_shared(10));
        let mut released = 0;
        for t in [&mut a, &mut b] {
            t.clear(|e| {
                if e.swap(EMPTY, Ordering::Relaxed) != 0 {
                    released += 1;
                }
            });
        }
        assert_eq!(released, 2);
    }
}
