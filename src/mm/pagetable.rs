//! Sparse page tables: a four-level radix tree over the 35-bit virtual page number
//! (47-bit addresses), laid out like the kernel's x86-64 tables: a leaf holds 512
//! entries (2 MiB of address space) in exactly one 4 KiB page; a mid holds 512 leaf
//! slots (1 GiB) and an upper 512 mid slots (512 GiB), 4 KiB each; the top has 256
//! upper slots (2 KiB, made with the table). Nodes are built on demand, so a
//! terabyte region costs nothing until it is touched, and a page touched alone in
//! its 2 MiB costs one 4 KiB leaf, as in the kernel (plus, the first time its 1 GiB
//! or 512 GiB is touched, a 4 KiB mid or upper). Dense use costs 4 KiB per 2 MiB
//! (0.195 %) plus 4 KiB per GiB above it. What an entry means is `crate::pte`.
//!
//! Owns: the nodes (top, uppers, mids, leaves), the `LeafPool` of recycled leaves
//! with the use counts of leaves shared after a fork, and each thread's cache of the
//! leaves it last looked up (`TLB`).
//!
//! Nodes are created with a compare-and-swap and freed only when the table is
//! dropped, so a lock-free reader can hold `&AtomicU64` for as long as it holds the
//! address space. Leaves are shared between tables after a fork (a use count kept
//! by the pool, beside the leaf, so that a leaf is one page) and copied on the first
//! write through them (`unshare`).
//!
//! ## The leaf cache (a software TLB)
//! `hit` does not walk four levels each time: each thread keeps the slot and the
//! (tagged) leaf pointer of the last leaves it looked up, 64 lines direct-mapped by
//! `vpn >> 9`, each keyed by the table's id (a 64-bit count, never reused) and the
//! leaf number. A cached pair is used only if the slot still holds that exact
//! value, loaded at the call, as the walk's last step would load it, so `hit`
//! returns what the walk returns. The slot address is safe to load: a line whose key
//! is this table's was filled by this table, its slot lies in a mid node that lives
//! as long as the table, and the caller holds the table. Only the thread's own
//! cache is written (no shared store on the hit path); a table that changes a slot
//! writes no cache, the next `hit` sees the new value in the slot and walks. What
//! it saves is measured in docs/design.md ("Hit path"): the walk was not the cost.
//!
//! ## Locking
//! No lock on lookups or node creation (CAS). `LeafPool::free` and `LeafPool::shared`
//! (Mutexes) are leaf locks around the recycled-leaf list and the use counts.
//! `unshare` and `share_into` run under the owning space's regions write lock
//! (their callers say so).
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
use crate::sync::{fence, Arc, AtomicPtr, AtomicU64, AtomicUsize, Mutex, Ordering};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::Cell;
use std::collections::HashMap;

const LEAF_BITS: u32 = 9;
const DIR_BITS: u32 = 9;
const TOP_BITS: u32 = VADDR_BITS - PAGE_SHIFT - LEAF_BITS - 2 * DIR_BITS;
const LEAF_LEN: usize = 1 << LEAF_BITS;
/// Pages covered by one leaf.
pub(crate) const LEAF_PAGES: u64 = LEAF_LEN as u64;
const DIR_LEN: usize = 1 << DIR_BITS;
const TOP_LEN: usize = 1 << TOP_BITS;
/// Pages covered by one mid (its 512 leaves) and by one upper (its 512 mids).
const MID_SHIFT: u32 = LEAF_BITS + DIR_BITS;
const UPPER_SHIFT: u32 = MID_SHIFT + DIR_BITS;

/// A leaf: 512 entries (2 MiB of address space), one page. How many tables point
/// to it is kept by the pool (`LeafPool::shared`).
#[repr(C, align(4096))]
pub(crate) struct Leaf {
    e: [AtomicU64; LEAF_LEN],
}

/// An inner node: 512 slots, one page.
#[repr(C, align(4096))]
struct Dir<T> {
    e: [AtomicPtr<T>; DIR_LEN],
}

/// Slots to leaves (1 GiB of address space).
type Mid = Dir<Leaf>;
/// Slots to mids (512 GiB).
type Upper = Dir<Mid>;

// With std's atomics the nodes are exactly a page, as the kernel's (the model
// checker's atomics are larger).
#[cfg(not(usermm_shuttle))]
const _: () = assert!(std::mem::size_of::<Leaf>() == 4096 && std::mem::size_of::<Mid>() == 4096);

fn new_zeroed<T>() -> *mut T {
    let layout = Layout::new::<T>();
    // SAFETY: the layout has non-zero size (every node type is a page); all-zero
    // bytes are a valid `T` here (arrays of atomics whose zero is null / EMPTY).
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
    /// The number of tables pointing to each leaf that more than one table points
    /// to (after a fork); a leaf not here has one. Kept beside the leaves so a leaf
    /// is exactly one page; used only by fork, `unshare` and the table's drop.
    /// Protected by its mutex (a leaf lock).
    shared: Mutex<HashMap<usize, u32>>,
    /// Bytes of page-table nodes (leaves, mids, uppers, tops) of the Vm.
    pub bytes: AtomicUsize,
}

impl LeafPool {
    pub fn new() -> LeafPool {
        LeafPool {
            free: Mutex::new(Vec::new()),
            shared: Mutex::new(HashMap::new()),
            bytes: AtomicUsize::new(0),
        }
    }

    /// Bytes of page tables, for `Stats::page_table_bytes`: every node, and the use
    /// counts of shared leaves.
    pub fn page_table_bytes(&self) -> usize {
        let counts = self.shared.lock().capacity() * (std::mem::size_of::<(usize, u32)>() + 1);
        self.bytes.load(Ordering::Relaxed) + counts
    }

    /// A leaf with every entry `EMPTY` and one user.
    fn get(&self) -> *mut Leaf {
        match self.free.lock().pop() {
            Some(p) => p as *mut Leaf,
            None => {
                self.bytes
                    .fetch_add(std::mem::size_of::<Leaf>(), Ordering::Relaxed);
                new_zeroed::<Leaf>()
            }
        }
    }

    /// Gives a leaf whose entries are all `EMPTY` and which no table points to back.
    fn put(&self, p: *mut Leaf) {
        // SAFETY: pooled leaves are live (never deallocated before the pool).
        debug_assert!(unsafe { &*p }
            .e
            .iter()
            .all(|e| e.load(Ordering::Relaxed) == EMPTY));
        debug_assert!(!self.shared.lock().contains_key(&(p as usize)));
        self.free.lock().push(p as usize);
    }

    /// The number of tables pointing to leaf `p` (untagged).
    fn users(&self, p: *mut Leaf) -> u32 {
        self.shared.lock().get(&(p as usize)).copied().unwrap_or(1)
    }

    /// One more table points to leaf `p`.
    fn add_user(&self, p: *mut Leaf) {
        let mut shared = self.shared.lock();
        let n = shared.entry(p as usize).or_insert(1);
        *n = n.saturating_add(1);
    }

    /// One table less points to leaf `p`; true if it was the last.
    fn drop_user(&self, p: *mut Leaf) -> bool {
        let mut shared = self.shared.lock();
        match shared.get_mut(&(p as usize)) {
            None => true,
            Some(n) => {
                *n -= 1;
                if *n <= 1 {
                    shared.remove(&(p as usize));
                }
                false
            }
        }
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

/// Ids of page tables, for the leaf cache's keys: never reused (a 64-bit count).
/// `std`'s atomic under every backend: a counter, not a protocol to model (and a
/// `static` needs a `const` constructor).
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Bits of a leaf number (`vpn >> LEAF_BITS`).
const LPN_BITS: u32 = VADDR_BITS - PAGE_SHIFT - LEAF_BITS;
/// A table whose id does not fit beside a leaf number in a key (after 2^37 tables)
/// is never cached: its keys have the top bit, which no cached key has.
const UNCACHED: u64 = 1 << 63;

/// One line of a thread's leaf cache: `key` is a table's `key_base` with a leaf
/// number (`vpn >> LEAF_BITS`) in its low bits; `slot` is that table's slot for
/// that leaf number, which held `leaf` when this thread last looked.
#[derive(Clone, Copy)]
struct Cached {
    key: u64,
    slot: *const AtomicPtr<Leaf>,
    leaf: *mut Leaf,
}

const TLB_LEN: usize = 64;

thread_local! {
    /// This thread's leaf cache (see the module header). Key 0 is table 0's,
    /// and table ids start at 1, so the initial lines match nothing.
    static TLB: [Cell<Cached>; TLB_LEN] = const {
        [const {
            Cell::new(Cached {
                key: 0,
                slot: std::ptr::null(),
                leaf: std::ptr::null_mut(),
            })
        }; TLB_LEN]
    };
}

/// A page table of one address space.
pub(crate) struct PageTable {
    top: Box<[AtomicPtr<Upper>]>,
    /// This table's id above the leaf-number bits: with a leaf number, the key of
    /// its lines in the leaf caches (`UNCACHED` if the id does not fit).
    key_base: u64,
    pool: Arc<LeafPool>,
}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTable").finish()
    }
}

#[inline]
fn leaf_index(vpn: u64) -> usize {
    (vpn as usize) & (LEAF_LEN - 1)
}

#[inline]
fn dir_index(vpn: u64, shift: u32) -> usize {
    ((vpn >> shift) as usize) & (DIR_LEN - 1)
}

/// The first page number after the span of `1 << shift` pages that holds `vpn`.
#[inline]
fn next_span(vpn: u64, shift: u32) -> u64 {
    ((vpn >> shift) + 1) << shift
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

/// Loads a node pointer from `slot`, creating the node (zeroed, counted in `bytes`)
/// if there is none.
fn ensure_dir<T>(slot: &AtomicPtr<Dir<T>>, bytes: &AtomicUsize) -> *mut Dir<T> {
    let cur = slot.load(Ordering::Acquire);
    if !cur.is_null() {
        return cur;
    }
    let new = new_zeroed::<Dir<T>>();
    match slot.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            bytes.fetch_add(std::mem::size_of::<Dir<T>>(), Ordering::Relaxed);
            new
        }
        Err(cur) => {
            // SAFETY: `new` was allocated above with this layout and never shared.
            unsafe { dealloc(new.cast(), Layout::new::<Dir<T>>()) };
            cur
        }
    }
}

impl PageTable {
    /// A new, empty table whose leaves come from `pool`.
    pub fn new(pool: Arc<LeafPool>) -> PageTable {
        let top: Box<[AtomicPtr<Upper>]> = (0..TOP_LEN)
            .map(|_| AtomicPtr::new(std::ptr::null_mut()))
            .collect();
        pool.bytes.fetch_add(
            TOP_LEN * std::mem::size_of::<AtomicPtr<Upper>>(),
            Ordering::Relaxed,
        );
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key_base = if id < UNCACHED >> LPN_BITS {
            id << LPN_BITS
        } else {
            UNCACHED
        };
        PageTable {
            top,
            key_base,
            pool,
        }
    }

    /// The leaf slot for `vpn`, or, if a node on the way is missing, the first page
    /// number past the span that node would cover.
    #[inline]
    fn slot_or_next(&self, vpn: u64) -> Result<&AtomicPtr<Leaf>, u64> {
        let Some(top) = self.top.get((vpn >> UPPER_SHIFT) as usize) else {
            return Err(u64::MAX);
        };
        let upper = top.load(Ordering::Acquire);
        if upper.is_null() {
            return Err(next_span(vpn, UPPER_SHIFT));
        }
        // SAFETY: non-null node pointers point to live nodes, freed only in `drop`
        // (which needs `&mut self`).
        let mid = unsafe { &*upper }.e[dir_index(vpn, MID_SHIFT)].load(Ordering::Acquire);
        if mid.is_null() {
            return Err(next_span(vpn, MID_SHIFT));
        }
        // SAFETY: as above.
        Ok(&unsafe { &*mid }.e[dir_index(vpn, LEAF_BITS)])
    }

    #[inline]
    fn slot(&self, vpn: u64) -> Option<&AtomicPtr<Leaf>> {
        self.slot_or_next(vpn).ok()
    }

    /// The entry for `vpn` with what the hit path validates against: the slot's
    /// value loaded now, through this thread's leaf cache when it has the slot.
    #[inline]
    pub fn hit(&self, vpn: u64) -> Option<Hit<'_>> {
        let lpn = vpn >> LEAF_BITS;
        if lpn >> LPN_BITS != 0 {
            // Past the table (and its bits would overlap the key's id).
            return None;
        }
        let key = self.key_base | lpn;
        let line = lpn as usize % TLB_LEN;
        let mut c = TLB.with(|t| t[line].get());
        let stale = c.key != key || {
            // SAFETY: the key is this table's, so this thread cached the slot for
            // this table (ids are never reused), in a mid that lives as long as the
            // table, which the caller holds (see the module header).
            let slot = unsafe { &*c.slot };
            slot.load(Ordering::Acquire) != c.leaf
        };
        if stale {
            // Walked now (the slot's value loaded by this call), or no leaf.
            c = self.fill(vpn, line)?;
        }
        // SAFETY: `c.slot` is this table's slot for `vpn`, from a line with this
        // table's key (as above) or from the walk just now.
        let slot = unsafe { &*c.slot };
        // SAFETY: leaves are type-stable (see `LeafPool`): the memory is a live leaf
        // for as long as the Vm exists, even if this table stops pointing to it.
        let pte = unsafe { &(*untag(c.leaf)).e[leaf_index(vpn)] };
        Some(Hit {
            pte,
            slot,
            leaf: c.leaf,
        })
    }

    /// Walks the table to the slot for `vpn`: the slot and the value it holds now
    /// if that is a leaf (cached in line `line` of this thread's cache unless the
    /// table is `UNCACHED`), else `None`.
    #[cold]
    #[inline(never)]
    fn fill(&self, vpn: u64, line: usize) -> Option<Cached> {
        let slot = self.slot(vpn)?;
        let leaf = slot.load(Ordering::Acquire);
        if leaf.is_null() {
            return None;
        }
        let c = Cached {
            key: self.key_base | (vpn >> LEAF_BITS),
            slot,
            leaf,
        };
        if self.key_base != UNCACHED {
            TLB.with(|t| t[line].set(c));
        }
        Some(c)
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

    /// The leaf slot for `vpn`, creating the upper and mid nodes on the way.
    fn ensure_slot(&self, vpn: u64) -> &AtomicPtr<Leaf> {
        let top = &self.top[(vpn >> UPPER_SHIFT) as usize & (TOP_LEN - 1)];
        let upper = ensure_dir(top, &self.pool.bytes);
        // SAFETY: live node, see `slot_or_next`.
        let mid = ensure_dir(
            &unsafe { &*upper }.e[dir_index(vpn, MID_SHIFT)],
            &self.pool.bytes,
        );
        // SAFETY: live node, see `slot_or_next`.
        &unsafe { &*mid }.e[dir_index(vpn, LEAF_BITS)]
    }

    /// The entry for `vpn`, creating the nodes on the way (metadata, not budget).
    pub fn entry(&self, vpn: u64) -> &AtomicU64 {
        self.entry_hit(vpn).pte
    }

    /// `hit` for the entry of `vpn`, creating the nodes on the way (as `entry`).
    pub fn entry_hit(&self, vpn: u64) -> Hit<'_> {
        if let Some(h) = self.hit(vpn) {
            return h;
        }
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
        let pte = unsafe { &(*untag(leaf)).e[leaf_index(vpn)] };
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
            let slot = match self.slot_or_next(vpn) {
                Ok(slot) => slot,
                Err(next) => {
                    vpn = next;
                    continue;
                }
            };
            let leaf = untag(slot.load(Ordering::Acquire));
            let stop = next_span(vpn, LEAF_BITS).min(end);
            if !leaf.is_null() {
                for (i, v) in (leaf_index(vpn)..).zip(vpn..stop) {
                    // SAFETY: type-stable leaf, see `hit`.
                    f(v, unsafe { &(*leaf).e[i] });
                }
            }
            vpn = stop;
        }
    }

    /// Calls `f(first_vpn, slot)` for every leaf slot holding a leaf in `[first, end)`.
    fn for_each_slot(&self, first: u64, end: u64, mut f: impl FnMut(u64, &AtomicPtr<Leaf>)) {
        let mut vpn = first & !(LEAF_PAGES - 1);
        while vpn < end {
            match self.slot_or_next(vpn) {
                Err(next) => vpn = next,
                Ok(slot) => {
                    if !slot.load(Ordering::Acquire).is_null() {
                        f(vpn, slot);
                    }
                    vpn += LEAF_PAGES;
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
            // Two regions in one leaf (a leaf spans 2 MiB) reach it twice: the child
            // holds one use of it, not one per region (else the leaf is never freed
            // and every page and slot in it leaks; issue 9 item 1).
            if cslot.load(Ordering::Acquire) == p {
                return;
            }
            self.pool.add_user(untag(p));
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
        if self.pool.users(old) == 1 {
            // The other tables let go: it is ours alone. (No table adds itself
            // meanwhile: only a table pointing to the leaf shares it, and that is
            // this one, under its write lock.)
            slot.store(old, Ordering::Release);
            return true;
        }
        // SAFETY: type-stable leaf.
        let l = unsafe { &*old };
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
        if self.pool.drop_user(p) {
            // SAFETY: type-stable leaf.
            for e in unsafe { &*p }.e.iter() {
                release(e);
            }
            self.pool.put(p);
        }
    }

    /// Lets go of every leaf (the space is being dropped): the last user of each
    /// releases its entries with `release`.
    pub fn clear(&mut self, mut release: impl FnMut(&AtomicU64)) {
        for t in 0..TOP_LEN {
            let upper = self.top[t].load(Ordering::Acquire);
            if upper.is_null() {
                continue;
            }
            for u in 0..DIR_LEN {
                // SAFETY: live node (we own the table).
                let mid = unsafe { &*upper }.e[u].load(Ordering::Acquire);
                if mid.is_null() {
                    continue;
                }
                for m in 0..DIR_LEN {
                    // SAFETY: live node (we own the table).
                    let p = unsafe { &*mid }.e[m].swap(std::ptr::null_mut(), Ordering::AcqRel);
                    if !p.is_null() {
                        self.drop_use(untag(p), &mut release);
                    }
                }
            }
        }
    }
}

impl Drop for PageTable {
    fn drop(&mut self) {
        // Leaves were handed back by `clear`; only the inner nodes and the top remain.
        let mut freed = TOP_LEN * std::mem::size_of::<AtomicPtr<Upper>>();
        for slot in self.top.iter() {
            let upper = slot.load(Ordering::Acquire);
            if upper.is_null() {
                continue;
            }
            // SAFETY: we have `&mut self`; nobody holds a node any more.
            for mslot in unsafe { &*upper }.e.iter() {
                let mid = mslot.load(Ordering::Acquire);
                if mid.is_null() {
                    continue;
                }
                // SAFETY: as above.
                debug_assert!(unsafe { &*mid }
                    .e
                    .iter()
                    .all(|l| l.load(Ordering::Relaxed).is_null()));
                // SAFETY: allocated by `ensure_dir` with this layout, freed once here.
                unsafe { dealloc(mid.cast(), Layout::new::<Mid>()) };
                freed += std::mem::size_of::<Mid>();
            }
            // SAFETY: allocated by `ensure_dir` with this layout, freed once here.
            unsafe { dealloc(upper.cast(), Layout::new::<Upper>()) };
            freed += std::mem::size_of::<Upper>();
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
        // Two pages far apart: a leaf, a mid and an upper each, one page apiece.
        let node = std::mem::size_of::<Leaf>();
        assert_eq!(pool.bytes.load(Ordering::Relaxed), top_only + 6 * node);
        // A third page in the first one's 2 MiB costs nothing; one in the next
        // 2 MiB of the same GiB costs a leaf.
        pt.entry(LEAF_PAGES - 1).store(3, Ordering::Relaxed);
        assert_eq!(pool.bytes.load(Ordering::Relaxed), top_only + 6 * node);
        pt.entry(LEAF_PAGES).store(4, Ordering::Relaxed);
        assert_eq!(pool.bytes.load(Ordering::Relaxed), top_only + 7 * node);
        let mut seen = vec![];
        pt.for_each(0, 1 << 35, |v, e| {
            if e.load(Ordering::Relaxed) != 0 {
                seen.push(v)
            }
        });
        assert_eq!(seen, vec![5, LEAF_PAGES - 1, LEAF_PAGES, far]);
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

    fn copy_entry(s: &AtomicU64, d: &AtomicU64) -> bool {
        d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
        true
    }

    #[test]
    fn cache_follows_the_slot() {
        let pool = Arc::new(LeafPool::new());
        let mut a = PageTable::new(pool.clone());
        let mut b = PageTable::new(pool.clone());
        a.entry(10).store(0x100, Ordering::Relaxed);
        let before = a.hit(10).unwrap().leaf;
        assert!(!a.hit(10).unwrap().shared());
        // Cached now; the tag must still be seen, as must the copy after unshare.
        let mut tagged = vec![];
        a.tag_all(0, 1 << 20, &mut tagged);
        assert!(a.hit(10).unwrap().shared());
        a.share_into(&b, 0, 1 << 20);
        assert_eq!(b.hit(10).unwrap().leaf, a.hit(10).unwrap().leaf);
        assert!(a.unshare(10, copy_entry, |_| panic!("b still uses it")));
        let h = a.hit(10).unwrap();
        assert!(!h.shared() && h.leaf != untag(before) && h.still(Ordering::Relaxed));
        assert_eq!(h.pte.load(Ordering::Relaxed), 0x100);
        assert_eq!(b.hit(10).unwrap().leaf as usize, before as usize | SHARED);
        // A table dropped and a new one made: the new one has its own lines (its
        // id differs), even if it lands at the same address.
        a.clear(|e| e.store(EMPTY, Ordering::Relaxed));
        assert!(a.hit(10).is_none());
        drop(a);
        let mut c = PageTable::new(pool.clone());
        assert!(c.hit(10).is_none());
        c.entry(10);
        assert!(c.hit(10).unwrap().leaf != b.hit(10).unwrap().leaf);
        for t in [&mut b, &mut c] {
            t.clear(|e| e.store(EMPTY, Ordering::Relaxed));
        }
    }

    #[test]
    fn use_counts_beside_the_leaves() {
        // One leaf shared by three tables (two forks); each unshare copies until
        // one user is left, which keeps it; the counts are gone at the end.
        let pool = Arc::new(LeafPool::new());
        let mut tables: Vec<PageTable> = (0..3).map(|_| PageTable::new(pool.clone())).collect();
        tables[0].entry(700).store(0x300, Ordering::Relaxed);
        let mut tagged = vec![];
        tables[0].tag_all(0, 1 << 20, &mut tagged);
        tables[0].share_into(&tables[1], 0, 1 << 20);
        tables[0].share_into(&tables[2], 0, 1 << 20);
        let leaf = untag(tables[0].hit(700).unwrap().leaf);
        assert_eq!(pool.users(leaf), 3);
        let mut copies = 0;
        for t in &tables[1..] {
            assert!(t.unshare(
                700,
                |s, d| {
                    copies += 1;
                    copy_entry(s, d)
                },
                |_| panic!("another table still uses it")
            ));
        }
        assert_eq!(copies, 2 * LEAF_LEN);
        assert_eq!(pool.users(leaf), 1);
        assert!(tables[0].unshare(700, |_, _| panic!("no copy"), |_| panic!("no release")));
        assert_eq!(untag(tables[0].hit(700).unwrap().leaf), leaf);
        let mut released = 0;
        for t in &mut tables {
            assert_eq!(t.lookup(700).unwrap().load(Ordering::Relaxed), 0x300);
            t.clear(|e| {
                if e.swap(EMPTY, Ordering::Relaxed) != 0 {
                    released += 1;
                }
            });
        }
        assert_eq!(released, 3);
        assert!(pool.shared.lock().is_empty());
    }
}
