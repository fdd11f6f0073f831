//! Resolving an access: the lock-free hit path for resident pages, and the fault
//! path for the rest (zero-fill, swap-in, waiting for another thread's fault).
//!
//! ## Hit path (no lock, no shared store)
//! Read: load the entry; if `Present(pfn)`, read the frame's sequence count (even, no
//! exclusive pin), check the entry again, copy with atomic loads, and check the count
//! did not move. Any failure falls back to the locked path; readers never spin on a
//! frame lock (DESIGN.md invariant 5). Write: take the frame lock (one CAS), check
//! the entry and that no guard pins the page, copy in, mark dirty, unlock.
//!
//! ## Fault path
//! Under the space's regions read lock (so unmap cannot run under us):
//! - `Empty`: a read returns zeros and takes no frame; a write (or a guard) claims the
//!   entry (`Empty` → `BUSY` by CAS), takes a frame, zeroes it and installs it.
//! - `Swapped(e)`: claim the entry (`BUSY`), take a frame, read the slot *in this
//!   thread* (a handoff to another thread costs more than the read, see DESIGN.md),
//!   check its checksum and install the page clean with its swap copy kept, so it can
//!   be dropped again without I/O. The claim is the swap cache: a concurrent fault on
//!   the same page sees `BUSY` and waits for the one read, instead of reading again.
//!   On a device error the entry goes back to `Swapped(e)` (nothing is lost) and the
//!   access gets `Error::Device`.
//! - `BUSY`: another thread is faulting the page in: wait until it is done.
//!
//! Taking a frame may reclaim directly (see `reclaim`), with only the regions read
//! lock and the claimed entry held; reclaim needs neither.

use crate::error::{Error, Result};
use crate::frame::{copy_in, copy_out, zero_frame, F_DIRTY, F_INUSE, PIN_EXCL, SEQ_EXCL, SEQ_LOCK};
use crate::pagetable::{Pte, BUSY, EMPTY};
use crate::space::SpaceInner;
use crate::stats::Counters;
use crate::sync::{fence, wait_until, AtomicU64, Ordering};
use crate::types::{Pfn, VAddr, PAGE_SIZE, VADDR_END};

/// How a page is wanted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Want {
    Shared,
    Exclusive,
}

impl SpaceInner {
    /// Copies `buf.len()` bytes at `addr` out of the space.
    #[inline]
    pub fn read(&self, addr: VAddr, buf: &mut [u8]) -> Result<()> {
        // The hit path of an access inside one page, kept small enough to inline.
        if addr.page_offset() + buf.len() <= PAGE_SIZE
            && addr.0 < VADDR_END
            && !buf.is_empty()
            && self.read_fast(addr, buf)
        {
            return Ok(());
        }
        self.read_general(addr, buf)
    }

    #[inline(never)]
    fn read_general(&self, addr: VAddr, buf: &mut [u8]) -> Result<()> {
        self.for_each_page(addr, buf.len(), |this, a, range| {
            let dst = &mut buf[range];
            if this.read_fast(a, dst) {
                return Ok(());
            }
            this.read_slow(a, dst)
        })
    }

    /// Copies `data` into the space at `addr`.
    pub fn write(&self, addr: VAddr, data: &[u8]) -> Result<()> {
        self.for_each_page(addr, data.len(), |this, a, range| {
            let src = &data[range];
            loop {
                if this.write_fast(a, src) {
                    return Ok(());
                }
                this.prepare_write(a)?;
            }
        })
    }

    /// Splits `[addr, addr + len)` at page boundaries. A range of more than one page
    /// is checked against the regions first, so a bad range fails before any byte moves.
    #[inline]
    fn for_each_page(
        &self,
        addr: VAddr,
        len: usize,
        mut f: impl FnMut(&Self, VAddr, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let off = addr.page_offset();
        if off + len <= PAGE_SIZE {
            if addr.0 >= VADDR_END {
                return Err(Error::BadAddress { addr: addr.0 });
            }
            return f(self, addr, 0..len);
        }
        SpaceInner::range_mapped(&self.regions.read(), addr.0, len as u64)?;
        let mut done = 0;
        while done < len {
            let a = VAddr(addr.0 + done as u64);
            let n = (PAGE_SIZE - a.page_offset()).min(len - done);
            f(self, a, done..done + n)?;
            done += n;
        }
        Ok(())
    }

    /// The hit path of a read inside one page. True if it copied the bytes.
    #[inline]
    fn read_fast(&self, a: VAddr, dst: &mut [u8]) -> bool {
        let Some(pte) = self.pt.lookup(a.vpn()) else {
            return false;
        };
        let v = pte.load(Ordering::Acquire);
        let Pte::Present(pfn) = Pte::decode(v) else {
            return false;
        };
        let frames = &self.eng.frames;
        let Some((seq, referenced)) = frames.hot(pfn) else {
            return false;
        };
        let s1 = seq.load(Ordering::Acquire);
        if s1 & (SEQ_LOCK | SEQ_EXCL) != 0 {
            return false;
        }
        if pte.load(Ordering::Relaxed) != v {
            return false;
        }
        // SAFETY: the offset plus length stays within frame `pfn` (one page), which is
        // inside the arena; the copy uses atomic loads (see `copy_out`).
        unsafe { copy_out(frames.frame_ptr(pfn).add(a.page_offset()), dst) };
        fence(Ordering::Acquire);
        if seq.load(Ordering::Relaxed) != s1 {
            return false;
        }
        if !referenced.load(Ordering::Relaxed) {
            referenced.store(true, Ordering::Relaxed);
        }
        true
    }

    /// The hit path of a write inside one page. True if it stored the bytes.
    #[inline]
    fn write_fast(&self, a: VAddr, src: &[u8]) -> bool {
        let Some(pte) = self.pt.lookup(a.vpn()) else {
            return false;
        };
        let v = pte.load(Ordering::Acquire);
        let Pte::Present(pfn) = Pte::decode(v) else {
            return false;
        };
        let frames = &self.eng.frames;
        let d = frames.desc(pfn);
        let Some(s) = d.try_lock() else {
            return false;
        };
        if d.pins.load(Ordering::Relaxed) != 0 || pte.load(Ordering::Relaxed) != v {
            d.unlock(s);
            return false;
        }
        // SAFETY: inside frame `pfn`; we hold its lock, so we are the only writer.
        unsafe { copy_in(frames.frame_ptr(pfn).add(a.page_offset()), src) };
        let f = d.flags.load(Ordering::Relaxed);
        if f & F_DIRTY == 0 {
            d.flags.store(f | F_DIRTY, Ordering::Relaxed);
        }
        d.touch();
        d.unlock(s);
        true
    }

    fn read_slow(&self, a: VAddr, dst: &mut [u8]) -> Result<()> {
        loop {
            {
                let regions = self.regions.read();
                SpaceInner::range_mapped(&regions, a.0, 1)?;
                let Some(pte) = self.pt.lookup(a.vpn()) else {
                    dst.fill(0);
                    return Ok(());
                };
                let v = pte.load(Ordering::Acquire);
                match Pte::decode(v) {
                    Pte::Empty => {
                        dst.fill(0);
                        return Ok(());
                    }
                    Pte::Swapped(_) => self.fault_swapin(pte, v)?,
                    Pte::Busy | Pte::Present(_) => {}
                }
            }
            if self.read_fast(a, dst) {
                return Ok(());
            }
            self.wait_page(a);
        }
    }

    /// Makes the page at `a` resident (for a write or a guard), or waits for whoever
    /// holds it. Returns when a retry of the fast path may succeed.
    fn prepare_write(&self, a: VAddr) -> Result<()> {
        {
            let regions = self.regions.read();
            SpaceInner::range_mapped(&regions, a.0, 1)?;
            let pte = self.pt.entry(a.vpn());
            let v = pte.load(Ordering::Acquire);
            match Pte::decode(v) {
                Pte::Empty => return self.fault_zero(pte),
                Pte::Swapped(_) => return self.fault_swapin(pte, v),
                Pte::Busy | Pte::Present(_) => {}
            }
        }
        self.wait_page(a);
        Ok(())
    }

    /// Waits (without locks) until the page at `a` is neither being faulted in nor
    /// locked or exclusively pinned, or its entry changes.
    fn wait_page(&self, a: VAddr) {
        let Some(pte) = self.pt.lookup(a.vpn()) else {
            return;
        };
        let v = pte.load(Ordering::Acquire);
        match Pte::decode(v) {
            Pte::Busy => wait_until(|| pte.load(Ordering::Acquire) != BUSY),
            Pte::Present(pfn) => {
                let d = self.eng.frames.desc(pfn);
                wait_until(|| {
                    pte.load(Ordering::Acquire) != v
                        || d.seq.load(Ordering::Acquire) & (SEQ_LOCK | SEQ_EXCL) == 0
                })
            }
            _ => {}
        }
    }

    /// Publishes `pfn` (filled) as the page of `pte`. `swap` is the encoded swap copy
    /// it keeps (0 for none); `dirty` whether it must be written before dropping.
    fn install(&self, pte: &AtomicU64, pfn: Pfn, swap: u64, dirty: bool) {
        let d = self.eng.frames.desc(pfn);
        let s = d.lock();
        d.owner
            .store(pte as *const AtomicU64 as *mut AtomicU64, Ordering::Relaxed);
        d.swap.store(swap, Ordering::Relaxed);
        d.flags
            .store(F_INUSE | if dirty { F_DIRTY } else { 0 }, Ordering::Relaxed);
        d.referenced.store(true, Ordering::Relaxed);
        pte.store(Pte::present(pfn), Ordering::Release);
        d.unlock(s);
    }

    /// Zero-fill fault: `pte` was `Empty`.
    fn fault_zero(&self, pte: &AtomicU64) -> Result<()> {
        if pte
            .compare_exchange(EMPTY, BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return Ok(()); // someone else is faulting it; the caller retries
        }
        let pfn = match self.eng.alloc_frame() {
            Ok(p) => p,
            Err(e) => {
                pte.store(EMPTY, Ordering::Release);
                return Err(e);
            }
        };
        // SAFETY: the frame was just allocated to us and is not yet visible.
        unsafe { zero_frame(self.eng.frames.frame_ptr(pfn)) };
        self.install(pte, pfn, 0, true);
        Counters::inc(&self.eng.cnt.pgfault);
        Ok(())
    }

    /// Swap-in fault: `pte` held `v` = `Swapped(e)`.
    fn fault_swapin(&self, pte: &AtomicU64, v: u64) -> Result<()> {
        let Pte::Swapped(e) = Pte::decode(v) else {
            return Ok(());
        };
        if pte
            .compare_exchange(v, BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return Ok(());
        }
        let eng = &*self.eng;
        let pfn = match eng.alloc_frame() {
            Ok(p) => p,
            Err(err) => {
                pte.store(v, Ordering::Release);
                return Err(err);
            }
        };
        let res = match eng.swap.get(e.dev) {
            Some(dev) => {
                // SAFETY: the frame is ours (allocated, not yet published); stale
                // optimistic readers may load from it, but discard what they read
                // because `install` moves the frame's sequence count.
                let buf =
                    unsafe { std::slice::from_raw_parts_mut(eng.frames.frame_ptr(pfn), PAGE_SIZE) };
                dev.read(e.slot, buf)
            }
            None => Err(Error::Device {
                dev: format!("#{}", e.dev),
                source: std::io::Error::other("no such swap device"),
            }),
        };
        if let Err(err) = res {
            eng.frames.free(pfn);
            pte.store(v, Ordering::Release);
            Counters::inc(&eng.cnt.read_errors);
            return Err(err);
        }
        self.install(pte, pfn, v, false);
        Counters::inc(&eng.cnt.pgfault);
        Counters::inc(&eng.cnt.pgmajfault);
        Counters::inc(&eng.cnt.pswpin);
        Ok(())
    }

    /// Pins the page containing `a` for a guard; returns its frame.
    pub fn pin(&self, a: VAddr, want: Want) -> Result<Pfn> {
        if a.0 >= VADDR_END {
            return Err(Error::BadAddress { addr: a.0 });
        }
        loop {
            if let Some(pfn) = self.try_pin(a, want) {
                return Ok(pfn);
            }
            self.prepare_write(a)?;
        }
    }

    fn try_pin(&self, a: VAddr, want: Want) -> Option<Pfn> {
        let pte = self.pt.lookup(a.vpn())?;
        let v = pte.load(Ordering::Acquire);
        let Pte::Present(pfn) = Pte::decode(v) else {
            return None;
        };
        let d = self.eng.frames.desc(pfn);
        let s = d.try_lock()?;
        let pins = d.pins.load(Ordering::Relaxed);
        let ok = pte.load(Ordering::Relaxed) == v
            && match want {
                Want::Shared => pins & PIN_EXCL == 0,
                Want::Exclusive => pins == 0,
            };
        if ok {
            match want {
                Want::Shared => {
                    d.pins.fetch_add(1, Ordering::Relaxed);
                }
                Want::Exclusive => {
                    d.pins.store(PIN_EXCL, Ordering::Relaxed);
                    let f = d.flags.load(Ordering::Relaxed);
                    d.flags.store(f | F_DIRTY, Ordering::Relaxed);
                }
            }
            d.touch();
        }
        d.unlock(s);
        ok.then_some(pfn)
    }

    /// Gives back a pin taken by `pin`.
    pub fn unpin(&self, pfn: Pfn, want: Want) {
        let d = self.eng.frames.desc(pfn);
        match want {
            Want::Shared => {
                d.pins.fetch_sub(1, Ordering::Release);
            }
            Want::Exclusive => {
                // Under the lock, so the sequence count moves and optimistic readers
                // that overlapped the guard's writes retry.
                let s = d.lock();
                d.pins.store(0, Ordering::Relaxed);
                d.unlock(s);
            }
        }
    }
}
