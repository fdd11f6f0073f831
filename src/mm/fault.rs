//! Resolving an access: the lock-free hit path for resident pages, and the fault
//! path for the rest (zero-fill, swap-in, waiting for another thread's fault).
//!
//! ## Hit path (no lock, no shared store)
//! Read: load the entry; if present and neither locked nor pinned exclusively, copy
//! with atomic loads and load the entry again; the same value means the copy is the
//! page (the entry is the page's sequence lock, see `pagetable`). Any failure falls
//! back to the locked path; readers never spin on a lock (docs/design.md invariant 5).
//! Write: lock the entry (one CAS), copy in, store the entry back dirty with its
//! version moved on. Neither touches the frame's descriptor.
//!
//! ## Fault path
//! First the region (`lookup::find`): speculatively, with no lock (a snapshot of the
//! space's regions and the region's sequence count), or, when that does not
//! validate or `Config::speculative_faults(false)`, under the space's regions read
//! lock, held until the entry is claimed. A speculative fault validates after its
//! claim (`Found::confirm`: the region still mapped, the entry still in this
//! table's unshared leaf) and, if that fails, undoes the claim and does the step
//! again on the locked path; a step that claims nothing (zeros for a never-written
//! page, the page cache of a file mapping) validates after reading the entry
//! (`Found::valid`). Either way unmap cannot go past a claimed entry (its release
//! waits for the claim) and no fault installs into a region that is gone. Then:
//! - `Empty`: a read returns zeros and takes no frame; a write (or a guard) claims the
//!   entry (`Empty` → `BUSY` by CAS), takes a frame, zeroes it and installs it.
//! - `Swapped(e)`: claim the entry (`BUSY`), take a frame, read the slot *in this
//!   thread* (a handoff to another thread costs more than the read, see docs/design.md),
//!   check its checksum and install the page clean with its swap copy kept, so it can
//!   be dropped again without I/O. The claim is the swap cache: a concurrent fault on
//!   the same page sees `BUSY` and waits for the one read, instead of reading again.
//!   On a device error the entry goes back to `Swapped(e)` (nothing is lost) and the
//!   access gets `Error::Device`. (In a leaf shared with a fork child the claim is
//!   made on the locked path: see `lookup`.)
//! - `BUSY`: another thread is faulting the page in: wait until it is done.
//! - copy-on-write (`cow_break`): allocates with nothing held, then looks the region
//!   up again and validates once it holds the entry lock.
//!
//! Taking a frame may reclaim directly (see `reclaim`), with only the claimed entry
//! held; reclaim needs none. A file region found speculatively is used through the
//! fault's own `Arc<Inode>`, taken before validation.

use crate::addr::{Pfn, VAddr, PAGE_SIZE, VADDR_END};
use crate::device::AlignedPages;
use crate::error::{Error, Result};
use crate::filemap::inode::Inode;
use crate::frame::{copy_in, copy_out, zero_frame, AllocCtx};
use crate::mm::lookup::{self, Found};
use crate::mm::pagetable::Hit;
use crate::mm::region::Share;
use crate::mm::space::SpaceInner;
use crate::pte::{
    lock_present, released, try_lock_present, unlock_entry, Pte, BUSY, EMPTY, P_ACCESSED, P_COW,
    P_DIRTY, P_EXCL, P_LOCK, P_SHARED, P_SHARED_ONE, TAG_MASK, TAG_PRESENT,
};
use crate::stats::Counters;
use crate::sync::{fence, wait_until, Arc, AtomicU64, Ordering};
use std::cell::RefCell;
// Under the model checker these are per model thread: shuttle runs all its threads
// on one OS thread, whose own thread-locals they would share.
#[cfg(usermm_shuttle)]
use shuttle::thread_local;

thread_local! {
    /// A page-aligned buffer per faulting thread (`RA_MAX + 1` pages, for a read
    /// with readahead): swap-in reads the device into it
    /// and copies into the frame with atomic stores, so no non-atomic write ever
    /// lands in a frame that a stale optimistic reader may be loading (item 8).
    static BOUNCE: RefCell<Option<AlignedPages>> = const { RefCell::new(None) };
}

pub(crate) fn space_key(sp: &SpaceInner) -> usize {
    sp as *const SpaceInner as usize
}

/// Records a pin taken by a guard of this thread.
pub(crate) fn note_pin(sp: &SpaceInner, vpn: u64, exclusive: bool) {
    note_pin_key(space_key(sp), vpn, exclusive);
}

/// Forgets a pin recorded by `note_pin`.
pub(crate) fn note_unpin(sp: &SpaceInner, vpn: u64, exclusive: bool) {
    note_unpin_key(space_key(sp), vpn, exclusive);
}

pub(crate) use crate::pins::{holds_pin_key, note_pin_key, note_unpin_key};

/// Whether this thread holds a pin in `sp` on a page in `[first, end)`: any pin, or
/// only exclusive ones.
pub(crate) fn holds_pin(sp: &SpaceInner, first: u64, end: u64, exclusive_only: bool) -> bool {
    holds_pin_key(space_key(sp), first, end, exclusive_only)
}

/// How a page is wanted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Want {
    Shared,
    Exclusive,
}

/// Copies `buf.len()` bytes at `addr` out of the space.
// Always inlined into its one caller (`AddressSpace::read`), so that the hit path
// costs no call of its own (with the leaf cache's miss branch in it, the compiler
// stopped inlining it there, which cost ~10 ns a read in `cargo bench --bench paths`).
#[inline(always)]
pub(crate) fn read(sp: &SpaceInner, addr: VAddr, buf: &mut [u8]) -> Result<()> {
    // The hit path of an access inside one page, kept small enough to inline.
    if addr.page_offset() + buf.len() <= PAGE_SIZE
        && addr.0 < VADDR_END
        && !buf.is_empty()
        && read_fast(sp, addr, buf)
    {
        return Ok(());
    }
    read_general(sp, addr, buf)
}

#[inline(never)]
fn read_general(sp: &SpaceInner, addr: VAddr, buf: &mut [u8]) -> Result<()> {
    for_each_page(sp, addr, buf.len(), |this, a, range| {
        let dst = &mut buf[range];
        if read_fast(this, a, dst) {
            return Ok(());
        }
        read_slow(this, a, dst)
    })
}

/// Copies `data` into the space at `addr`.
pub(crate) fn write(sp: &SpaceInner, addr: VAddr, data: &[u8]) -> Result<()> {
    for_each_page(sp, addr, data.len(), |this, a, range| {
        let src = &data[range];
        loop {
            if write_fast(this, a, src) {
                return Ok(());
            }
            if let Some((ino, pg)) = prepare_write(this, a, P_EXCL | P_SHARED | P_COW)? {
                return ino
                    .write(pg, a.page_offset(), src)
                    .map_err(|e| at_addr(e, a));
            }
        }
    })
}

/// Splits `[addr, addr + len)` at page boundaries. A range of more than one page
/// is checked against the regions first, so a bad range fails before any byte moves.
#[inline]
fn for_each_page(
    sp: &SpaceInner,
    addr: VAddr,
    len: usize,
    mut f: impl FnMut(&SpaceInner, VAddr, std::ops::Range<usize>) -> Result<()>,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let off = addr.page_offset();
    if off + len <= PAGE_SIZE {
        if addr.0 >= VADDR_END {
            return Err(Error::BadAddress { addr: addr.0 });
        }
        return f(sp, addr, 0..len);
    }
    sp.range_mapped(addr.0, len as u64)?;
    let mut done = 0;
    while done < len {
        let a = VAddr(addr.0 + done as u64);
        let n = (PAGE_SIZE - a.page_offset()).min(len - done);
        f(sp, a, done..done + n)?;
        done += n;
    }
    Ok(())
}

/// The hit path of a read inside one page. True if it copied the bytes. Always
/// inlined, as `read` (its other callers are the slow paths).
#[inline(always)]
fn read_fast(sp: &SpaceInner, a: VAddr, dst: &mut [u8]) -> bool {
    let Some(hit) = sp.pt.hit(a.vpn()) else {
        return false;
    };
    let pte = hit.pte;
    let v = pte.load(Ordering::Acquire);
    if v & (TAG_MASK | P_LOCK | P_EXCL) != TAG_PRESENT {
        return false;
    }
    let frames = &sp.eng.frames;
    let pfn = Pte::pfn(v);
    if pfn.0 as usize >= frames.nframes() {
        return false;
    }
    // SAFETY: the offset plus length stays within frame `pfn` (one page), which is
    // inside the arena; the copy uses atomic loads (see `copy_out`).
    unsafe { copy_out(frames.frame_ptr(pfn).add(a.page_offset()), dst) };
    fence(Ordering::Acquire);
    // The entry did not move, and the table still points to its leaf (a leaf
    // replaced after a fork may have been recycled: see `pagetable::LeafPool`).
    if pte.load(Ordering::Relaxed) != v || !hit.still(Ordering::Relaxed) {
        return false;
    }
    if v & P_ACCESSED == 0 {
        // By CAS: the bit must never land on an entry that changed meanwhile.
        let _ = pte.compare_exchange(v, v | P_ACCESSED, Ordering::Relaxed, Ordering::Relaxed);
    }
    true
}

/// The hit path of a write inside one page. True if it stored the bytes.
#[inline]
fn write_fast(sp: &SpaceInner, a: VAddr, src: &[u8]) -> bool {
    let Some(hit) = sp.pt.hit(a.vpn()) else {
        return false;
    };
    if hit.shared() {
        return false;
    }
    let pte = hit.pte;
    let Some(v) = try_lock_present(pte, P_EXCL | P_SHARED | P_COW) else {
        return false;
    };
    // A fork may have shared the leaf just now: it tags the slot, then looks for
    // locked entries; we lock the entry, then look at the slot (both SeqCst).
    fence(Ordering::SeqCst);
    if !hit.still(Ordering::SeqCst) {
        unlock_entry(pte, 0, 0);
        return false;
    }
    let frames = &sp.eng.frames;
    let pfn = Pte::pfn(v);
    debug_assert!((pfn.0 as usize) < frames.nframes());
    // SAFETY: inside frame `pfn`; we hold the entry lock, so we are the only writer.
    unsafe { copy_in(frames.frame_ptr(pfn).add(a.page_offset()), src) };
    pte.store(Pte::bump(v) | P_DIRTY | P_ACCESSED, Ordering::Release);
    released(pte);
    true
}

fn read_slow(sp: &SpaceInner, a: VAddr, dst: &mut [u8]) -> Result<()> {
    if holds_pin(sp, a.vpn(), a.vpn() + 1, true) {
        return Err(Error::WouldDeadlock("reading a page"));
    }
    loop {
        // One speculative try per round; a change seen falls back to the lock.
        let mut spec = sp.eng.speculative;
        let done = loop {
            match read_found(sp, a, dst, lookup::find(sp, a.0, spec)?)? {
                Step::Done(done) => break done,
                Step::Fallback => spec = false,
            }
        };
        if done || read_fast(sp, a, dst) {
            return Ok(());
        }
        wait_page(sp, a, P_EXCL);
    }
}

/// What a step of the fault path that found its region (`lookup::find`) did.
enum Step<T> {
    /// It went as far as it could: the caller goes on with `T`.
    Done(T),
    /// A speculative lookup did not validate; nothing was changed (a claim taken
    /// was undone). Do the step again under the regions lock.
    Fallback,
}

/// `read_slow`'s step: `Done(true)` if it copied the bytes, `Done(false)` if the
/// fast path may now succeed or the page must be waited for.
fn read_found(sp: &SpaceInner, a: VAddr, dst: &mut [u8], mut f: Found<'_>) -> Result<Step<bool>> {
    let hit = sp.pt.hit(a.vpn());
    let v = hit
        .as_ref()
        .map_or(EMPTY, |h| h.pte.load(Ordering::Acquire));
    match (Pte::decode(v), f.file.as_ref().map(|x| x.1)) {
        // A shared file mapping reads the page cache; a private one an untouched
        // page as in the file.
        (_, Some(Share::Shared)) | (Pte::Empty, Some(_)) => {
            if !f.valid() {
                return Ok(Step::Fallback);
            }
            let (ino, _, pg) = f.file.take().expect("matched a file");
            drop(f);
            file_access(&ino, pg, a, true)?;
            ino.read(pg, a.page_offset(), dst)
                .map_err(|e| at_addr(e, a))?;
            Ok(Step::Done(true))
        }
        (Pte::Empty, None) => {
            if !f.valid() {
                return Ok(Step::Fallback);
            }
            dst.fill(0);
            Ok(Step::Done(true))
        }
        (Pte::Swapped(_), _) => match hit {
            Some(hit) => Ok(fault_swapin(sp, a.vpn(), &hit, v, f)?.map(|()| false)),
            None => Ok(Step::Done(false)),
        },
        (Pte::Busy | Pte::Present(_), _) => Ok(Step::Done(false)),
    }
}

impl<T> Step<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        match self {
            Step::Done(t) => Step::Done(f(t)),
            Step::Fallback => Step::Fallback,
        }
    }
}

/// Checks an access to page `pg` of a file through a mapping at `a`: inside the
/// file, and not waiting for a guard of this thread on the same file page (taken
/// through another mapping or handle). `read`: the access only reads.
fn file_access(ino: &Inode, pg: u64, a: VAddr, read: bool) -> Result<()> {
    if pg >= ino.pages() {
        return Err(Error::BadAddress { addr: a.0 });
    }
    if holds_pin_key(ino.key(), pg, pg + 1, read) {
        return Err(Error::WouldDeadlock("accessing a file page"));
    }
    Ok(())
}

/// An error of a file page access, with a bad address reported at `a` (the
/// page cache knows file offsets, not addresses).
fn at_addr(e: Error, a: VAddr) -> Error {
    match e {
        Error::BadAddress { .. } => Error::BadAddress { addr: a.0 },
        e => e,
    }
}

/// What `prepare_write` found when the page is a shared file mapping's: the file
/// and page to access through the page cache instead.
type FilePage = Option<(Arc<Inode>, u64)>;

/// Makes the page at `a` resident (for a write or a guard), or waits for whoever
/// holds it (a lock, or a pin in `forbid`). Returns when a retry of the fast path
/// may succeed.
///
/// Errors: `WouldDeadlock` if what it would wait for is a guard of this thread (a
/// write or exclusive pin conflicts with any of our pins on the page; a shared pin
/// with our exclusive ones, or with our shared ones when the shared count is full).
///
/// Returns `Some((inode, page))` for a page of a `Share::Shared` file mapping: the
/// caller accesses it in the page cache.
fn prepare_write(sp: &SpaceInner, a: VAddr, forbid: u64) -> Result<FilePage> {
    if holds_pin(sp, a.vpn(), a.vpn() + 1, forbid & P_SHARED == 0) {
        return Err(Error::WouldDeadlock(if forbid & P_SHARED == 0 {
            "pinning a page shared"
        } else {
            "writing or pinning a page"
        }));
    }
    if sp.pt.is_shared(a.vpn()) {
        // Writes and guards need this space's own copy of the leaf. Copying it
        // changes the table's slots: under the regions write lock.
        let regions = sp.regions.write();
        regions.range_mapped(a.0, 1)?;
        sp.unshare(a.vpn())?;
        return Ok(None);
    }
    let mut spec = sp.eng.speculative;
    loop {
        match write_found(sp, a, forbid, lookup::find(sp, a.0, spec)?)? {
            Step::Done(Next::Wait) => break,
            Step::Done(Next::Retry) => return Ok(None),
            Step::Done(Next::File(ino, pg)) => return Ok(Some((ino, pg))),
            Step::Fallback => spec = false,
        }
    }
    wait_page(sp, a, forbid & !P_COW);
    Ok(None)
}

/// What `prepare_write` does after its step.
enum Next {
    /// Retry the fast path.
    Retry,
    /// The page is present (locked or pinned) or being faulted in: wait for it with
    /// no lock held, then retry.
    Wait,
    /// A page of a shared file mapping: the caller accesses the page cache.
    File(Arc<Inode>, u64),
}

/// `prepare_write`'s step, on the region `f` found.
fn write_found(sp: &SpaceInner, a: VAddr, forbid: u64, mut f: Found<'_>) -> Result<Step<Next>> {
    if let Some((ino, share, pg)) = &f.file {
        file_access(ino, *pg, a, forbid & P_SHARED == 0)?;
        if *share == Share::Shared {
            if !f.valid() {
                return Ok(Step::Fallback);
            }
            let (ino, _, pg) = f.file.take().expect("checked above");
            return Ok(Step::Done(Next::File(ino, pg)));
        }
    }
    let hit = sp.pt.entry_hit(a.vpn());
    if hit.shared() {
        // A fork shared the leaf after the check in `prepare_write`: a page
        // installed now would show this write to the child. Retry, to copy the
        // leaf first.
        return Ok(Step::Done(Next::Retry));
    }
    let v = hit.pte.load(Ordering::Acquire);
    match Pte::decode(v) {
        Pte::Empty => {
            let src = f.file.take().map(|(ino, _, pg)| (ino, pg));
            return Ok(fault_zero(sp, &hit, f, src)?.map(|()| Next::Retry));
        }
        Pte::Swapped(_) => return Ok(fault_swapin(sp, a.vpn(), &hit, v, f)?.map(|()| Next::Retry)),
        Pte::Present(pfn)
            if forbid & P_COW != 0 && v & P_COW != 0 && v & (P_LOCK | P_EXCL | P_SHARED) == 0 =>
        {
            return Ok(cow_break(sp, a, &hit, pfn, f)?.map(|()| Next::Retry))
        }
        Pte::Busy | Pte::Present(_) => {}
    }
    Ok(Step::Done(Next::Wait))
}

/// Waits (without locks) until the page at `a` is neither being faulted in nor
/// locked or pinned in a way `forbid` names, or its entry changes.
fn wait_page(sp: &SpaceInner, a: VAddr, forbid: u64) {
    let Some(pte) = sp.pt.lookup(a.vpn()) else {
        return;
    };
    let v = pte.load(Ordering::Acquire);
    match Pte::decode(v) {
        Pte::Busy => {
            let _stall = sp.eng.psi.stall(); // waiting for another thread's fault
            crate::pte::wait_claim();
            wait_until(|| pte.load(Ordering::Acquire) != BUSY)
        }
        Pte::Present(_) => wait_until(|| {
            let now = pte.load(Ordering::Acquire);
            now != v || now & (P_LOCK | forbid) == 0
        }),
        _ => {}
    }
}

/// Copy-on-write fault: `hit.pte` maps `old` shared with other entries (after a
/// fork). Gives this entry a private copy, or, if the other mappings are gone, just
/// takes the frame for itself. Returns when a retry of the write may succeed.
fn cow_break(
    sp: &SpaceInner,
    a: VAddr,
    hit: &Hit<'_>,
    old: Pfn,
    found: Found<'_>,
) -> Result<Step<()>> {
    let eng = &*sp.eng;
    let pte = hit.pte;
    let d = eng.frames.desc(old);
    d.lock();
    if d.mapcount.load(Ordering::Relaxed) == 1 {
        // The last mapping: nothing to copy. (Whichever table this entry is in by
        // now, and whether or not its region is still mapped, its page is no longer
        // shared: the frame lock orders this against unmap's release and a leaf
        // copy, which both take it.)
        if let Some(v) = try_lock_present(pte, P_EXCL | P_SHARED) {
            if Pte::pfn(v) == old {
                unlock_entry(pte, P_COW, 0);
            } else {
                unlock_entry(pte, 0, 0);
            }
        }
        d.unlock();
        return Ok(Step::Done(()));
    }
    d.unlock();
    // Allocating may reclaim (and sleep): no lock at all is held here, not even the
    // regions lock. Without it the leaf may have been copied (fork's `unshare`) or
    // the region unmapped meanwhile, so the region is looked up again and `pte`
    // trusted only if it is the same entry of a private leaf of a mapped region,
    // validated (`Found::confirm`) once the entry is locked.
    let spec = found.speculative();
    drop(found);
    let new = crate::reclaim::alloc_frame(eng, AllocCtx::Normal)?;
    let give_up = |d: Option<&crate::frame::PageDesc>| {
        if let Some(d) = d {
            d.unlock();
        }
        eng.frames.free(new);
    };
    let found = match lookup::find(sp, a.0, spec) {
        Ok(f) => f,
        Err(e) => {
            give_up(None);
            return Err(e);
        }
    };
    let now = sp.pt.hit(a.vpn());
    let Some(now) = now.filter(|h| !h.shared() && std::ptr::eq(h.pte, pte)) else {
        give_up(None);
        return Ok(Step::Done(())); // the caller retries from the start
    };
    d.lock();
    match try_lock_present(pte, P_EXCL | P_SHARED) {
        Some(v) if Pte::pfn(v) == old && v & P_COW != 0 => {}
        Some(_) => {
            unlock_entry(pte, 0, 0);
            give_up(Some(d));
            return Ok(Step::Done(()));
        }
        None => {
            give_up(Some(d));
            return Ok(Step::Done(()));
        }
    };
    // The entry lock was taken with weaker orderings than `confirm` wants.
    fence(Ordering::SeqCst);
    if !found.confirm(&now) {
        unlock_entry(pte, 0, 0);
        give_up(Some(d));
        return Ok(Step::Fallback);
    }
    if d.mapcount.load(Ordering::Relaxed) == 1 {
        unlock_entry(pte, P_COW, 0);
        give_up(Some(d));
        return Ok(Step::Done(()));
    }
    // SAFETY: `old` is shared copy-on-write, so nobody writes it; `new` is ours and
    // not yet visible (stale readers only load from it).
    unsafe {
        copy_in(
            eng.frames.frame_ptr(new),
            std::slice::from_raw_parts(eng.frames.frame_ptr(old), PAGE_SIZE),
        )
    };
    eng.rmap.remove(d, old, pte);
    d.unlock();
    // The entry is still locked (and no longer in `old`'s map); `new` is mapped by
    // nobody, so taking its frame lock here cannot wait on an entry lock.
    sp.eng.install(pte, new, 0, true, false, 1);
    drop(found);
    Counters::inc(&eng.cnt.pgfault);
    Counters::inc(&eng.cnt.cow_faults);
    Ok(Step::Done(()))
}

/// Zero-fill fault: `hit.pte` was `Empty`. With `src`, the page of a private file
/// mapping: filled from that file page (through its page cache) instead.
///
/// Called with the region `found` (under the regions read lock, or speculatively),
/// which it drops once the entry is claimed and the claim confirmed: the `BUSY`
/// claim keeps unmap (its release waits for the claim) and fork (a copy of the leaf
/// waits for it) from going past this page, so the allocation below, which may
/// reclaim and sleep, holds no lock.
fn fault_zero(sp: &SpaceInner, hit: &Hit<'_>, found: Found<'_>, src: FilePage) -> Result<Step<()>> {
    let pte = hit.pte;
    // SeqCst: `Found::confirm` relies on it.
    if pte
        .compare_exchange(EMPTY, BUSY, Ordering::SeqCst, Ordering::Relaxed)
        .is_err()
    {
        return Ok(Step::Done(())); // someone else is faulting it; the caller retries
    }
    crate::pte::claimed(pte);
    if !found.confirm(hit) {
        pte.store(EMPTY, Ordering::Release);
        released(pte);
        return Ok(Step::Fallback);
    }
    drop(found);
    let pfn = match crate::reclaim::alloc_frame(&sp.eng, AllocCtx::Normal) {
        Ok(p) => p,
        Err(e) => {
            pte.store(EMPTY, Ordering::Release);
            released(pte);
            return Err(e);
        }
    };
    let frame = sp.eng.frames.frame_ptr(pfn);
    match src {
        // SAFETY: the frame was just allocated to us and is not yet visible.
        None => unsafe { zero_frame(frame) },
        Some((ino, pg)) => {
            let _stall = sp.eng.psi.stall(); // the file read
            let res = BOUNCE.with(|b| {
                let mut b = b.borrow_mut();
                if b.is_none() {
                    *b = Some(AlignedPages::new(RA_MAX + 1)?);
                }
                let buf = b.as_mut().expect("set above").page_mut(0);
                ino.read_page(pg, buf)?;
                // SAFETY: the frame is ours and not yet published; stale optimistic
                // readers only load from it, and `copy_in` stores atomically.
                unsafe { copy_in(frame, buf) };
                Ok(())
            });
            if let Err(e) = res {
                sp.eng.frames.free(pfn);
                pte.store(EMPTY, Ordering::Release);
                released(pte);
                return Err(e);
            }
        }
    }
    sp.eng.install(pte, pfn, 0, true, true, 1);
    Counters::inc(&sp.eng.cnt.pgfault);
    Ok(Step::Done(()))
}

/// Swap-in fault: `hit.pte` held `v` = `Swapped(e)`.
///
/// Called with the region `found`, dropped once the entry is claimed and the claim
/// confirmed (as in `fault_zero`): neither the frame allocation nor the device read
/// holds a lock.
fn fault_swapin(
    sp: &SpaceInner,
    vpn: u64,
    hit: &Hit<'_>,
    v: u64,
    found: Found<'_>,
) -> Result<Step<()>> {
    let pte = hit.pte;
    let Pte::Swapped(e) = Pte::decode(v) else {
        return Ok(Step::Done(()));
    };
    if found.speculative() && hit.shared() {
        // A claim there is made under the lock (see `lookup`).
        return Ok(Step::Fallback);
    }
    // `Config::fault_timing`: the end of each step (`stats::FAULT_STEPS`).
    let mut marks = sp
        .eng
        .timing
        .is_some()
        .then(|| [std::time::Instant::now(); 7]);
    macro_rules! mark {
        ($i:expr) => {
            if let Some(m) = marks.as_mut() {
                m[$i] = std::time::Instant::now();
            }
        };
    }
    // SeqCst: `Found::confirm` relies on it.
    if pte
        .compare_exchange(v, BUSY, Ordering::SeqCst, Ordering::Relaxed)
        .is_err()
    {
        return Ok(Step::Done(()));
    }
    crate::pte::claimed(pte);
    if !found.confirm(hit) {
        pte.store(v, Ordering::Release);
        released(pte);
        return Ok(Step::Fallback);
    }
    drop(found);
    mark!(1);
    let eng = &*sp.eng;
    let _stall = eng.psi.stall(); // the frame (may reclaim) and the device read
    let pfn = match crate::reclaim::alloc_frame(eng, AllocCtx::Reserve) {
        Ok(p) => p,
        Err(err) => {
            pte.store(v, Ordering::Release);
            released(pte);
            return Err(err);
        }
    };
    mark!(2);
    let dev = eng.swap.get(e.dev);
    // Readahead: the pages that continue this space's faults' stride (claimed,
    // with frames), read with this one as one span of slots, or (`scattered`) each
    // from its own slot, all in flight at once. `pos` gives a page's place in the
    // bounce buffer.
    let mut ra = [RaPage::NONE; RA_MAX];
    let mut nra = match &dev {
        // Not on a device being removed (invariant 3).
        Some(d) if eng.readahead && d.is_active() => {
            claim_ahead(sp, vpn, e, &mut ra, d.reads_concurrently())
        }
        _ => 0,
    };
    let (lo, hi) = ra[..nra]
        .iter()
        .fold((e.slot, e.slot), |(l, h), q| (l.min(q.slot), h.max(q.slot)));
    let scattered = nra > 0 && !dense(hi - lo + 1, nra);
    mark!(3);
    // Where each page lands in the bounce buffer: `gather[0]` the faulting page's,
    // `gather[i + 1]` readahead page `i`'s (set by `read_gather` when scattered).
    let mut gather = [0usize; RA_MAX + 1];
    if !scattered {
        gather[0] = (e.slot - lo) as usize;
        for (g, q) in gather[1..].iter_mut().zip(&ra[..nra]) {
            *g = (q.slot - lo) as usize;
        }
    }
    let res = match dev {
        Some(dev) => crate::device::uring::polled(eng.read_poll, || {
            BOUNCE.with(|b| {
                let mut b = b.borrow_mut();
                if b.is_none() {
                    *b = Some(AlignedPages::new(RA_MAX + 1)?);
                }
                let b = b.as_mut().expect("set above");
                let ahead = if nra == 0 {
                    Ok(())
                } else if scattered {
                    let mut slots = [0u64; RA_MAX + 1];
                    slots[0] = e.slot;
                    for (s, q) in slots[1..].iter_mut().zip(&ra[..nra]) {
                        *s = q.slot;
                    }
                    dev.read_gather(
                        &slots[..nra + 1],
                        b.pages_mut(nra + 1),
                        &mut gather[..nra + 1],
                    )
                } else {
                    // One read of the span of slots (at most `RA_MAX + 1`).
                    dev.read_span(lo, b.pages_mut((hi - lo) as usize + 1))
                };
                if nra == 0 || ahead.is_err() {
                    // Readahead never fails a demand read: a span may hold slots a
                    // device cannot read (a mirror's leg that does not hold a free
                    // slot), and a readahead page's read may fail where this one's
                    // would not. Its pages go back; this one is read alone.
                    unclaim_ahead(sp, &ra[..nra], 0);
                    nra = 0;
                    gather[0] = 0;
                    dev.read_unchecked(e.slot, b.page_mut(0))?;
                }
                mark!(4);
                dev.verify(e.slot, b.page(gather[0]))?;
                mark!(5);
                // SAFETY: the frame is ours (allocated, not yet published). Stale
                // optimistic readers may still load from it (and discard what they read,
                // since `install` moves the entry's version), so it is written only with
                // atomic stores (`copy_in`); the device wrote into our own buffer.
                unsafe { copy_in(eng.frames.frame_ptr(pfn), b.page(gather[0])) };
                Ok(dev)
            })
        }),
        None => Err(Error::Device {
            dev: format!("#{}", e.dev),
            source: std::io::Error::other("no such swap device"),
        }),
    };
    let dev = match res {
        Ok(dev) => dev,
        Err(err) => {
            unclaim_ahead(sp, &ra[..nra], 0);
            eng.frames.free(pfn);
            pte.store(v, Ordering::Release);
            released(pte);
            Counters::inc(&eng.cnt.read_errors);
            return Err(err);
        }
    };
    let keep = eng.keeps_swap_copy(&dev);
    install_swapped(eng, &dev, pte, pfn, v, keep, true);
    if nra > 0 {
        BOUNCE.with(|b| {
            let b = b.borrow();
            let b = b.as_ref().expect("filled above");
            for (i, q) in ra[..nra].iter().enumerate() {
                let off = gather[i + 1];
                if dev.verify(q.slot, b.page(off)).is_err() {
                    // Stays on swap (a demand read will report it), and so do
                    // the pages after it.
                    unclaim_ahead(sp, &ra[..nra], i);
                    break;
                }
                // SAFETY: as above, for the readahead page's own frame.
                unsafe { copy_in(eng.frames.frame_ptr(q.pfn), b.page(off)) };
                let pte = sp.pt.lookup(q.vpn).expect("claimed above");
                install_swapped(eng, &dev, pte, q.pfn, q.v, keep, false);
                eng.ra_frames.fetch_sub(1, Ordering::Relaxed);
                Counters::inc(&eng.cnt.pswpin);
                Counters::inc(&eng.cnt.read_around);
            }
        });
    }
    Counters::inc(&eng.cnt.pgfault);
    Counters::inc(&eng.cnt.pgmajfault);
    Counters::inc(&eng.cnt.pswpin);
    mark!(6);
    if let (Some(t), Some(m)) = (&eng.timing, &marks) {
        t.record(m);
    }
    Ok(Step::Done(()))
}

/// Most pages read ahead of one swap-in fault.
const RA_MAX: usize = 32;

/// Installs a page read from its slot (`v` = its `Swapped` entry) into `pte`,
/// which the caller claimed: clean with its swap copy kept (`keep`), or dirty
/// with the slot given back (see `Engine::keeps_swap_copy`). `dev`: the device it
/// was read from (its slot keeps the page's use count). `touched`: a demand fault
/// (the access counts as a use), not readahead.
fn install_swapped(
    eng: &crate::engine::Engine,
    dev: &crate::swap::SwapDevice,
    pte: &AtomicU64,
    pfn: Pfn,
    v: u64,
    keep: bool,
    touched: bool,
) {
    // S3-FIFO: a page evicted from the small FIFO unused and wanted again goes
    // straight to main. `Policy::Frequency`: every page comes in on probation,
    // with the use count it left with (plus this fault).
    let (fresh, uses) = if eng.freq_on {
        let slot = match Pte::decode(v) {
            Pte::Swapped(e) => e.slot,
            _ => u64::MAX, // reads as never used
        };
        let kept = eng.freq_count(dev.slot_freq(slot));
        (true, kept + u32::from(touched))
    } else {
        (!eng.ghost_take(crate::engine::ghost_key_swap(v)), 1)
    };
    if keep {
        eng.install(pte, pfn, v, false, fresh, uses);
    } else {
        eng.install(pte, pfn, 0, true, fresh, uses);
        if let Pte::Swapped(e) = Pte::decode(v) {
            eng.swap.put_live(e);
        }
    }
}

/// A page claimed by `claim_ahead`: its page number, its `Swapped` value, its
/// slot, and the frame it goes to.
#[derive(Clone, Copy)]
struct RaPage {
    vpn: u64,
    v: u64,
    slot: u64,
    pfn: Pfn,
}

impl RaPage {
    const NONE: RaPage = RaPage {
        vpn: 0,
        v: 0,
        slot: 0,
        pfn: Pfn(0),
    };
}

/// Whether a span of `span` slots holding `used` readahead pages (besides the
/// faulting one) is worth one read of the whole span: at most `RA_MAX + 1` slots,
/// at most half of them other pages.
fn dense(span: u64, used: usize) -> bool {
    span <= RA_MAX as u64 + 1 && span <= 2 * (used as u64 + 1)
}

/// Largest stride (in pages, either direction) that readahead follows.
const RA_STRIDE_MAX: i64 = 256;

/// `SpaceInner::ra`: the last page a fault brought in or read ahead (bits 28..64),
/// the stride between the last two faults (bits 8..28, two's complement), and how
/// many faults in a row kept that stride (bits 0..8).
fn ra_pack(last: u64, stride: i64, run: u64) -> u64 {
    (last << 28) | (((stride as u64) & 0xf_ffff) << 8) | run.min(255)
}

fn ra_unpack(v: u64) -> (u64, i64, u64) {
    let stride = (((v >> 8) & 0xf_ffff) << 44) as i64 >> 44;
    (v >> 28, stride, v & 0xff)
}

/// The page `k` strides after `vpn`, if it is a page number.
fn ra_page(vpn: u64, stride: i64, k: usize) -> Option<u64> {
    let q = vpn.checked_add_signed(stride.checked_mul(k as i64)?)?;
    (q < VADDR_END >> crate::addr::PAGE_SHIFT).then_some(q)
}

/// Readahead for a swap-in fault of page `vpn` (slot `e`): adaptive, from the
/// space's fault history (`SpaceInner::ra`). After three faults in a row a
/// constant stride apart (1 for a sequential scan, −1 backwards, 16 for a strided
/// one; at most `RA_STRIDE_MAX` pages) the window opens at 4 pages and doubles
/// with each further such fault (up to `RA_MAX`); a fault a few strides on (the
/// pages between were resident: hits) keeps the run, any other fault closes it, so
/// random access reads nothing ahead. Within the window it claims (`BUSY`) the
/// pages that continue the stride while they are swapped on the same device,
/// passing over resident ones (at most a window's worth: pages reclaim kept along
/// a scan must not end its readahead).
/// Where the device keeps several reads in flight (`scattered`: a local file
/// with io_uring) their slots may be anywhere: the caller reads them all at once
/// unless they make a `dense` span. Elsewhere only slots that keep the span
/// (this one's and the claimed ones', before or after it) `dense` are taken: one
/// request reads them. Pages evicted together, in the order they were used,
/// were written close together (interleaved with other pages when two
/// reclaimers evict at once, and scattered where the CLOCK hand, which goes in
/// frame order, evicted them), and a page read back keeps its slot while it
/// stays clean. Each page gets a frame taken without reclaim (never below the
/// min watermark; the background reclaimer is woken below low). Returns how
/// many it claimed, in `ra`.
fn claim_ahead(
    sp: &SpaceInner,
    vpn: u64,
    e: crate::addr::SwapEntry,
    ra: &mut [RaPage],
    scattered: bool,
) -> usize {
    let eng = &*sp.eng;
    let (last, stride, run) = ra_unpack(sp.ra.load(Ordering::Relaxed));
    let delta = (vpn as i64).wrapping_sub(last as i64);
    let (stride, run) = if delta == 0 {
        (stride, run)
    } else if delta == stride {
        (stride, run + 1)
    } else if delta.checked_rem(stride) == Some(0)
        && delta
            .checked_div(stride)
            .is_some_and(|k| (2..=RA_MAX as i64).contains(&k))
    {
        // The stride held, but the pages between were resident (hits): the scan
        // goes on.
        (stride, run + 1)
    } else if delta.abs() <= RA_STRIDE_MAX {
        (delta, 1)
    } else {
        (0, 0)
    };
    // At most a sixteenth of the budget in one window (a tiny budget shared by
    // several scanning threads must keep frames for their demand faults).
    let window = if run >= 2 && stride != 0 {
        (4usize << (run - 2).min(3))
            .min(ra.len())
            .min(eng.frames.nframes() / 16)
    } else {
        0
    };
    let mut n = 0;
    let mut end = vpn;
    let (mut lo, mut hi) = (e.slot, e.slot);
    let mut shrunk = false;
    // Pages looked at, and how many of them were resident already.
    let (mut k, mut skipped) = (0, 0);
    while n < window {
        k += 1;
        let Some(q) = ra_page(vpn, stride, k) else {
            break;
        };
        // Not through a leaf shared with a fork child (its claims are made under
        // the regions lock, see `lookup`).
        if sp.pt.is_shared(q) {
            break;
        }
        let Some(qp) = sp.pt.lookup(q) else { break };
        let qv = qp.load(Ordering::Acquire);
        let slot = match Pte::decode(qv) {
            Pte::Swapped(f) if f.dev == e.dev && f.slot != e.slot => f.slot,
            // Resident already (the scan will hit it): passed over, so that pages
            // reclaim left in memory along the scan do not close the window (each
            // would restart it at 4 pages); at most a window's worth.
            Pte::Present(_) if skipped < window => {
                skipped += 1;
                end = q;
                continue;
            }
            _ => break,
        };
        let (nlo, nhi) = (lo.min(slot), hi.max(slot));
        if !scattered && !dense(nhi - nlo + 1, n + 1) {
            break;
        }
        let want = window - n;
        if !shrunk && eng.frames.free_count() < eng.frames.wmark[0] + want {
            // Room for the rest of the window: clean pages dropped, dirty ones
            // queued (no I/O here, invariant 1), a bounded scan, once; what it
            // does not free, the window loses.
            crate::reclaim::shrink(eng, 4 * want, want);
            shrunk = true;
        }
        if eng.frames.free_count() <= eng.frames.wmark[0] {
            break;
        }
        if qp
            .compare_exchange(qv, BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            break;
        }
        let Some(qpfn) = eng.frames.alloc(AllocCtx::Normal) else {
            qp.store(qv, Ordering::Release);
            break;
        };
        eng.ra_frames.fetch_add(1, Ordering::Relaxed);
        ra[n] = RaPage {
            vpn: q,
            v: qv,
            slot,
            pfn: qpfn,
        };
        (lo, hi) = (nlo, nhi);
        end = q;
        n += 1;
    }
    sp.ra.store(ra_pack(end, stride, run), Ordering::Relaxed);
    n
}

/// Gives back the claims of `claim_ahead` from the `from`-th on: entries as they
/// were, frames freed.
fn unclaim_ahead(sp: &SpaceInner, ra: &[RaPage], from: usize) {
    for q in ra.iter().skip(from) {
        sp.eng.ra_frames.fetch_sub(1, Ordering::Relaxed);
        sp.eng.frames.free(q.pfn);
        if let Some(qp) = sp.pt.lookup(q.vpn) {
            qp.store(q.v, Ordering::Release);
        }
    }
}

/// A page pinned for a guard: its entry and frame, and for a page of a shared
/// file mapping its inode (held, so the page cache outlives the guard) and page.
pub(crate) struct Pinned<'a> {
    pub pte: &'a AtomicU64,
    pub pfn: Pfn,
    pub file: FilePage,
}

/// Pins the page containing `a` for a guard.
pub(crate) fn pin(sp: &SpaceInner, a: VAddr, want: Want) -> Result<Pinned<'_>> {
    if a.0 >= VADDR_END {
        return Err(Error::BadAddress { addr: a.0 });
    }
    let forbid = match want {
        Want::Shared => P_EXCL,
        Want::Exclusive => P_EXCL | P_SHARED | P_COW,
    };
    loop {
        if let Some((pte, pfn)) = try_pin(sp, a, want, forbid) {
            return Ok(Pinned {
                pte,
                pfn,
                file: None,
            });
        }
        // Shared pins are counted in 4 bits of the entry: when full, wait for one
        // to go.
        let full = sp
            .pt
            .lookup(a.vpn())
            .is_some_and(|p| p.load(Ordering::Relaxed) & P_SHARED == P_SHARED);
        if let Some((ino, pg)) =
            prepare_write(sp, a, if full { forbid | P_SHARED } else { forbid })?
        {
            let (pte, pfn) = ino
                .pin(pg, want == Want::Exclusive)
                .map_err(|e| at_addr(e, a))?;
            // SAFETY: page-table leaves are type-stable for the Vm's life (see
            // `pagetable::LeafPool`), and the guard holds the inode, whose table is
            // not cleared while it lives: the entry outlives the borrow of `sp`.
            let pte = unsafe { &*(pte as *const AtomicU64) };
            return Ok(Pinned {
                pte,
                pfn,
                file: Some((ino, pg)),
            });
        }
    }
}

fn try_pin(sp: &SpaceInner, a: VAddr, want: Want, forbid: u64) -> Option<(&AtomicU64, Pfn)> {
    let hit = sp.pt.hit(a.vpn())?;
    if hit.shared() {
        return None; // guards need a private leaf (see `SpaceInner::fork_into`)
    }
    let pte = hit.pte;
    let v = try_lock_present(pte, forbid)?;
    fence(Ordering::SeqCst);
    if !hit.still(Ordering::SeqCst) {
        unlock_entry(pte, 0, 0);
        return None;
    }
    let new = match want {
        Want::Shared if v & P_SHARED == P_SHARED => {
            pte.store(v, Ordering::Release);
            released(pte);
            return None;
        }
        Want::Shared => v + P_SHARED_ONE,
        Want::Exclusive => v | P_EXCL | P_DIRTY,
    };
    pte.store(new | P_ACCESSED, Ordering::Release);
    released(pte);
    Some((pte, Pte::pfn(v)))
}

/// Gives back a pin taken by `pin`.
pub(crate) fn unpin(pte: &AtomicU64, pfn: Pfn, want: Want) {
    // A pinned page stays present in `pfn`: neither reclaim nor unmap takes it.
    let Some(v) = lock_present(pte, pfn) else {
        debug_assert!(false, "pinned page left its frame");
        return;
    };
    let new = match want {
        Want::Shared => {
            debug_assert_ne!(v & P_SHARED, 0);
            v - P_SHARED_ONE
        }
        // The guard may have written: move the version on.
        Want::Exclusive => Pte::bump(v) & !P_EXCL,
    };
    pte.store(new, Ordering::Release);
    released(pte);
}

#[cfg(test)]
mod tests {
    use super::{ra_pack, ra_page, ra_unpack, RA_STRIDE_MAX};

    #[test]
    fn readahead_state_round_trips() {
        let last = (1u64 << 35) - 1;
        for stride in [-RA_STRIDE_MAX, -16, -1, 0, 1, 16, RA_STRIDE_MAX] {
            for run in [0u64, 1, 2, 255] {
                assert_eq!(ra_unpack(ra_pack(last, stride, run)), (last, stride, run));
            }
        }
        assert_eq!(ra_unpack(ra_pack(5, 1, 1000)).2, 255, "run saturates");
        assert_eq!(ra_page(10, -1, 3), Some(7));
        assert_eq!(ra_page(2, -1, 3), None, "below page 0");
        assert_eq!(ra_page(last, 1, 1), None, "past the last page");
        assert_eq!(ra_page(100, 16, 2), Some(132));
    }
}
