//! Reclaim: choosing pages to drop from memory, the background reclaimer, direct
//! reclaim, and the completion of page-out.
//!
//! ## Policy (issue 10 item 1): `Config::policy`
//! Three, all on the one reference bit per entry that the hit path sets (it stores
//! nothing else), the frame arena in frame order, and the clock hand:
//! - **CLOCK** (`Policy::Clock`): second chance; the hand drops a page whose bit
//!   it finds clear and clears the bits it finds set.
//! - **S3-FIFO** (`Policy::S3Fifo`): a page that comes into memory by a fault goes
//!   on probation: into the small FIFO (`Engine::small`, 10 % of the frames,
//!   lock-free, entries `pfn | epoch << 32`) and marked `F_SMALL`. While the FIFO
//!   holds more than its share (or the hand has found nothing to take in a whole
//!   sweep: `Engine::hand_idle`), reclaim takes from its head: the first visit only
//!   clears the reference bit (the faulting access set it) and sends the page round
//!   once more (`F_SEEN`); at the second, a page used since is promoted to main, and
//!   one not used is dropped at once and leaves a ghost (`Engine::ghost`, a hash
//!   table of `frames / 2` keys: its swap entry, or its file page). A page faulted
//!   back while its ghost is there skips probation. Main is CLOCK: the hand passes
//!   over probation pages. A page reclaim cannot take now (locked, pinned) goes
//!   back to the FIFO; if the FIFO is full it becomes an orphan (`Engine::orphans`)
//!   that the hand takes as a main page, so none is lost to both.
//! - **Frequency** (`Policy::Frequency`, the default): W-TinyLFU's admission test
//!   (Einziger et al., 2017) with exact counts instead of a sketch. The same
//!   probation FIFO, 1 % of the frames. Every page has a use count (`PageDesc::freq`,
//!   4 bits and the 4-bit epoch it was counted in): its faults (a demand fault adds
//!   one; readahead does not) and the reference bits reclaim finds set (the first
//!   probation visit's bit is the fault's own and is not counted again). It
//!   survives the page's trips to swap in a byte per slot (`SwapDevice::freq`,
//!   written when the page leaves memory, read when it comes back; swapoff carries
//!   it), and it ages: `freq_count` halves a count once per epoch since it was
//!   stamped, and the epoch moves on every `FREQ_PERIOD` × frames uses counted
//!   (a lazy version of TinyLFU's reset). At its second probation visit a page
//!   enters main only if its count beats what main gives up: `Engine::victim_freq`,
//!   a moving average of the counts of the pages the hand takes from main, so a
//!   page used once (a scan, a cold page's fault) cannot push out one used often,
//!   while a page that keeps coming back gets in. A promoted page is marked `F_SEEN`
//!   so the hand spares it once (a second chance, not counted as a use). No ghosts.
//!   File pages (no slot to keep a count in) keep S3-FIFO's rule.
//!
//! Why the default won. The engine, one thread, 16,384 frames, zipf 0.99 at W/B 4
//! (`cargo run --release --example policy_probe -- zipf 4 16384 1400000`; miss %
//! per window of 200,000 accesses after one access per page):
//!
//! | policy    | windows 1–7                          | all  |
//! |-----------|--------------------------------------|------|
//! | Frequency | 16.5 14.9 14.4 13.7 13.8 13.7 13.3   | 14.3 |
//! | S3-FIFO   | 17.4 15.3 15.2 15.0 15.2 15.4 15.1   | 15.5 |
//! | CLOCK     | 18.0 18.1 18.2 18.0 18.2 18.4 18.2   | 18.1 |
//!
//! Settled (windows 7–10 of a 2,000,000-access run) the frequency policy misses
//! 13.2–13.3 % where S3-FIFO misses 15.1–15.3 and A0, the best any online policy
//! can do on this trace, 12.2. On hot/cold and uniform all three are within 0.1
//! point (hot/cold is at A0 already), and on zipf at W/B 1.25 it misses 2.9–3.1 %
//! against S3-FIFO's 3.1–3.3 (windows 3–4). What it costs: it learns. The counts
//! of pages out of memory grow one per fault, so the first 200,000 accesses miss
//! about as much as S3-FIFO, and it takes some 20 accesses per page of the working
//! set to settle; S3-FIFO settles after two. Tried and not kept (a simulation of
//! the engine's information on the bench's traces, then the engine): the same test
//! against the next victim found by the hand (a true duel: the same misses as the
//! moving average), counts in a count-min sketch of 1–4 × frames counters per row
//! (15.6–14.7 %, hash collisions among four times as many pages as frames), every
//! hit counted (no better: the counts of resident pages saturate), a probation
//! FIFO of 10 % (13.9 settled), the ghost table kept beside the counts (a ghost hit
//! skips the test: 15 %), and GCLOCK's counts in main (17.8–18.0 %).
//!
//! ## Who reclaims
//! - The background reclaimer (kswapd) wakes when free frames fall below the low
//!   watermark and works until they reach high.
//! - An allocation that finds no frame above min reclaims directly: it scans and
//!   drops clean pages and queues dirty ones, but never writes a page itself and
//!   never waits on I/O while holding a lock (docs/design.md invariant 1); when nothing
//!   can be dropped yet it sleeps until a page-out completes.
//!
//! ## Locking
//! Frame lock (`PageDesc::seq`) → swap map lock (`SwapDevice::map`): `reclaim_frame`
//! drops a stale slot under the frame lock, `complete_writeback` likewise. The free
//! list lock is taken only with no frame lock held (`FrameArena::free` after unlock).
//! Nothing here allocates: the request pool and the swap maps are preallocated
//! (invariants 2 and 4).

use crate::addr::{Pfn, PAGE_SIZE};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::frame::{
    AllocCtx, PageDesc, F_FILE, F_INUSE, F_SEEN, F_SMALL, F_TRANSPARENT, F_WRITEBACK,
};
use crate::pageio::FILE_REQ;
use crate::pte::{
    lock_present, try_lock_present, unlock_entry, Pte, EMPTY, P_ACCESSED, P_DIRTY, P_EXCL, P_HEAT,
    P_HEAT_ONE, P_LOCK, P_SHARED, P_STAGED,
};
use crate::stats::Counters;
use crate::swap::NoSlot;
use crate::sync::Ordering;
use crate::uffd::{MOVE_DONTWAKE, WP_SET};
use std::time::{Duration, Instant};

/// `Policy::Frequency`: use counts halve once per this many uses counted per frame
/// (see "Policy").
const FREQ_PERIOD: usize = 50;

/// Frames looked at per batch.
const SCAN_BATCH: usize = 64;

/// kswapd wakes the page-I/O threads once this many page-outs are queued (the
/// most a thread gathers into runs at once, `complete_batch`'s `BATCH`), or
/// before it waits: a run of adjacent slots is one device request, and single
/// 4 KiB writes slow the faults' reads on the same device more than a few large
/// ones (measured with `examples/write_interference`).
const KICK_BATCH: usize = 32;

/// Direct reclaim gives up (`Error::Device`) once it has seen this many page-outs
/// fail with none succeeding since it began waiting on failures (see `alloc_frame`).
/// Two full request pools' worth at the default size; not tied to the budget.
const GIVE_UP_FAILURES: u64 = 512;
/// ... or once page-outs have kept failing, none succeeding, for this long.
const GIVE_UP_AFTER: Duration = Duration::from_secs(2);
/// How long an allocation waits for pages that are only busy (locked, pinned, being
/// written by msync) before it reports `OutOfMemory`. None under the model checker
/// (`usermm_shuttle`), whose schedules are not timed: there the scan count alone
/// decides, as before.
#[cfg(not(usermm_shuttle))]
const BUSY_WAIT: Duration = Duration::from_millis(200);
#[cfg(usermm_shuttle)]
const BUSY_WAIT: Duration = Duration::ZERO;
/// How long an allocation that finds nothing to free waits for a process fork's
/// freeze of transparent evictions to end (a fork takes milliseconds; one that
/// holds it longer fails the allocation instead of hanging it).
const FROZEN_WAIT: Duration = Duration::from_secs(10);

/// What one scan did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ScanResult {
    pub scanned: usize,
    /// Clean pages dropped (frames freed).
    pub evicted: usize,
    /// Dirty pages queued for page-out.
    pub queued: usize,
    /// Transparent pages staged (moved out of their mappings to see whether they
    /// are used; the next visit of the hand drops those still unused): progress,
    /// like clearing a reference bit, but worth counting so scanners go on.
    pub staged: usize,
    /// Pages skipped because locked or pinned right now.
    pub busy: usize,
    /// The request pool was empty when a dirty page needed it.
    pub pool_empty: bool,
    /// No swap slot could be had for a dirty page.
    pub no_slot: Option<NoSlot>,
    /// Uses counted (`Policy::Frequency`: reference bits seen).
    pub uses: usize,
}

/// Scans up to `nr` frames from the clock hand; stops early once `want` frames
/// are freed or queued for page-out (whose completion frees them). Queued
/// page-outs are kicked before returning.
pub(crate) fn shrink(eng: &Engine, nr: usize, want: usize) -> ScanResult {
    kicked(eng, shrink_for(eng, nr, want, true))
}

/// `shrink` for direct reclaim: only a frame freed now satisfies the caller, so a
/// queued page-out does not end the scan; it goes on looking for a clean page to
/// drop (and queues the dirty ones it passes) before anyone has to wait for I/O.
pub(crate) fn shrink_direct(eng: &Engine, nr: usize) -> ScanResult {
    kicked(eng, shrink_for(eng, nr, 1, false))
}

/// Wakes the page-I/O threads for what a scan queued (kswapd instead gathers
/// `KICK_BATCH` first).
fn kicked(eng: &Engine, r: ScanResult) -> ScanResult {
    if r.queued > 0 {
        eng.io.kick();
    }
    r
}

fn shrink_for(eng: &Engine, nr: usize, want: usize, queued_counts: bool) -> ScanResult {
    // Reclaim context (the lock validator's pseudo-lock; nothing without it).
    let _reclaim = crate::lockdep::reclaim();
    let n = eng.frames.nframes();
    let mut r = ScanResult::default();
    let mut zap = ZapBatch::new();
    let mut small_next = true;
    while r.scanned < nr.min(n) {
        r.scanned += 1;
        if zap.full() {
            zap.flush(eng);
        }
        // The small FIFO first while it holds more than its share, or when the
        // hand has found nothing in a whole sweep. A visit there that freed
        // nothing because the page was dirty (queued) or busy hands the next turn
        // to the hand, so clean main pages are still found while the FIFO's head is
        // all dirty (a failing device: only clean pages can be freed then); one
        // that sent the page round again or promoted it keeps the turn (the hand
        // would otherwise sweep main faster than the policy means it to).
        let small_turn = std::mem::replace(&mut small_next, true);
        if small_turn
            && (eng.small.len() > eng.small_cap
                || (eng.hand_idle.load(Ordering::Relaxed) > n && !eng.small.is_empty()))
        {
            if let Some(key) = eng.small.pop() {
                let pfn = Pfn(key as u32);
                let d = eng.frames.desc(pfn);
                // Stale if the frame was freed (and maybe reused) since.
                if d.epoch.load(Ordering::Relaxed) == (key >> 32) as u32
                    && d.flags.load(Ordering::Relaxed) & F_SMALL != 0
                {
                    let before = (r.evicted, r.queued, r.busy);
                    reclaim_frame(eng, pfn, true, &mut r, &mut zap);
                    // Progress: a page dropped, or sent round the FIFO, or promoted.
                    small_next =
                        r.evicted > before.0 || (r.queued == before.1 && r.busy == before.2);
                }
                if r.evicted + if queued_counts { r.queued } else { 0 } >= want || r.pool_empty {
                    break;
                }
                continue;
            }
        }
        // One frame at a time, so that stopping early (below) leaves the hand on
        // the page that could not be queued, instead of skipping past it.
        let pfn = Pfn((eng.hand.fetch_add(1, Ordering::Relaxed) % n) as u32);
        let before = r.evicted + r.queued + r.staged;
        reclaim_frame(eng, pfn, false, &mut r, &mut zap);
        if r.evicted + r.queued + r.staged == before {
            eng.hand_idle.fetch_add(1, Ordering::Relaxed);
        } else if eng.hand_idle.load(Ordering::Relaxed) != 0 {
            eng.hand_idle.store(0, Ordering::Relaxed);
        }
        if r.evicted + if queued_counts { r.queued } else { 0 } >= want {
            break;
        }
        if r.pool_empty {
            // Every request is in flight: going on would only pass over dirty
            // pages. The caller waits for a completion.
            eng.hand.fetch_sub(1, Ordering::Relaxed);
            break;
        }
    }
    zap.flush(eng);
    Counters::add(&eng.cnt.pgscan, r.scanned as u64);
    if eng.freq_on {
        // The use counts age: halved each time `FREQ_PERIOD` × frames more uses
        // (faults and reference bits seen) have been counted.
        let uses = eng.freq_uses.fetch_add(r.uses, Ordering::Relaxed) + r.uses;
        let now = uses.wrapping_add(eng.cnt.pgmajfault.load(Ordering::Relaxed) as usize);
        let mark = eng.freq_mark.load(Ordering::Relaxed);
        if now.wrapping_sub(mark) >= FREQ_PERIOD * n
            && eng
                .freq_mark
                .compare_exchange(mark, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            eng.freq_epoch.fetch_add(1, Ordering::Relaxed);
        }
    }
    r
}

/// Looks at frame `pfn` for reclaim: from the small FIFO (`small`: popped from it)
/// or from the CLOCK hand (which passes over pages of the small FIFO, except the
/// orphans: see `Engine::orphans`).
fn reclaim_frame(eng: &Engine, pfn: Pfn, small: bool, r: &mut ScanResult, zap: &mut ZapBatch) {
    let d = eng.frames.desc(pfn);
    let f = d.flags.load(Ordering::Relaxed);
    if f & F_INUSE == 0
        || (small && f & F_SMALL == 0)
        || (!small && f & F_SMALL != 0 && !eng.is_orphan(pfn))
    {
        return;
    }
    if f & F_WRITEBACK != 0 {
        if small {
            requeue(eng, d, pfn);
        }
        return;
    }
    if !d.try_lock() {
        r.busy += 1;
        if small {
            requeue(eng, d, pfn);
        }
        return;
    }
    let f = d.flags.load(Ordering::Relaxed);
    if f & F_INUSE == 0 || (small && f & F_SMALL == 0) {
        d.unlock();
        return;
    }
    if f & F_WRITEBACK != 0 || d.mapcount.load(Ordering::Relaxed) == 0 {
        // Under write-back (a queued page-out's, or an msync's, `Inode::sync`) or
        // being unmapped: still on probation, not to be lost from the FIFO. Busy:
        // free again soon, so an allocation that finds only such pages waits
        // (`alloc_frame`).
        r.busy += 1;
        d.unlock();
        if small {
            requeue(eng, d, pfn);
        }
        return;
    }
    // Second chance: a page used through any of its mappings stays.
    let mut accessed = false;
    eng.rmap.for_each(d, pfn, |pte| {
        let v = pte.load(Ordering::Relaxed);
        debug_assert_eq!(Pte::decode(v), Pte::Present(pfn));
        if v & P_ACCESSED != 0 {
            accessed = true;
            // A CAS, so a concurrent writer's store is never undone.
            let _ = pte.compare_exchange(v, v & !P_ACCESSED, Ordering::Relaxed, Ordering::Relaxed);
        }
        true
    });
    let first_visit = small && f & F_SEEN == 0;
    // `Policy::Frequency` marks a page it promotes `F_SEEN` instead of setting its
    // reference bit: spared by the hand once, like a used page, but not counted as
    // a use.
    let spared = !small && f & (F_SMALL | F_SEEN) == F_SEEN;
    let f = if spared {
        d.flags.store(f & !F_SEEN, Ordering::Relaxed);
        f & !F_SEEN
    } else {
        f
    };
    if accessed && eng.freq_on && !first_visit {
        // A use seen (the first visit's bit is the fault's own, counted by it).
        let c = eng.freq_count(d.freq.load(Ordering::Relaxed));
        d.freq.store(eng.freq_stamp(c + 1), Ordering::Relaxed);
        r.uses += 1;
    }
    if first_visit {
        // The first visit of the small FIFO: the bit was the faulting access's
        // own. Round the FIFO once more; a use before the next visit promotes it.
        let key = u64::from(pfn.0) | (u64::from(d.epoch.load(Ordering::Relaxed)) << 32);
        if eng.small.push(key).is_ok() {
            d.flags.store(f | F_SEEN, Ordering::Relaxed);
        } else {
            promote(eng, d, pfn, f);
        }
        d.unlock();
        return;
    }
    if small && eng.freq_on && f & F_FILE == 0 {
        // `Policy::Frequency`: into main only if used more often than the last
        // page main gave up, whether or not it was used on probation.
        let uses = eng.freq_count(d.freq.load(Ordering::Relaxed));
        if uses * 16 > eng.victim_freq.load(Ordering::Relaxed) {
            promote(eng, d, pfn, f);
            d.unlock();
            return;
        }
    } else if accessed || spared {
        if small {
            // Used while on probation: into main, where the hand gives it its
            // second chance as to any used page.
            promote(eng, d, pfn, f);
        }
        d.unlock();
        return;
    }
    let Some(dirty) = try_lock_mappings(eng, d, pfn) else {
        if small {
            promote(eng, d, pfn, f);
        }
        d.unlock();
        r.busy += 1;
        return;
    };
    let transparent = f & F_TRANSPARENT != 0;
    // A transparent page not used since it was last looked at leaves the program's
    // mapping for its staging page first; only if it is still unused when the hand
    // comes back is it dropped (see `mm::transparent`, "Knowing what is hot").
    let bits = if transparent {
        entry_bits(eng, d, pfn)
    } else {
        0
    };
    let staged = transparent && bits & P_STAGED != 0;
    if transparent
        && !staged
        && eng.staging_addr(pfn).is_some()
        && !eng
            .stage_turn
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(eng.stage_every)
    {
        // Not this page's turn to be looked at (`config::DEFAULT_STAGE_EVERY`):
        // passed over as it is, a probation page round the FIFO again. Without a
        // staging area pages are evicted in place, every visit a turn.
        unlock_mappings(eng, d, pfn, 0, 0);
        d.unlock();
        if small {
            requeue(eng, d, pfn);
        }
        return;
    }
    // Unused on probation (found by the FIFO, or by the hand, which treats a
    // probation page as main): it goes, and a ghost remembers it; if it must be
    // written first and then stays, it is main's.
    let probation = f & F_SMALL != 0;
    if probation {
        d.flags.store(f & !(F_SMALL | F_SEEN), Ordering::Relaxed);
        eng.set_orphan(pfn, false);
        Counters::inc(&eng.cnt.small_evicted);
    }
    let f = f & !(F_SMALL | F_SEEN);
    // Frame lock and every entry lock held: the page is ours to drop or copy.
    if f & F_FILE != 0 {
        if probation {
            eng.ghost_insert(crate::engine::ghost_key_file(
                d.index.load(Ordering::Relaxed),
            ));
        }
        return reclaim_file(eng, d, pfn, f, dirty, r);
    }
    if transparent && !staged && bits & P_HEAT != 0 {
        // Used again after its last staging: spared this visit (GCLOCK).
        unlock_mappings(eng, d, pfn, P_HEAT, (bits & P_HEAT) - P_HEAT_ONE);
        d.unlock();
        r.staged += 1;
        return;
    }
    if transparent && !staged {
        match stage(eng, d, pfn) {
            Staging::Staged => {
                unlock_mappings(eng, d, pfn, 0, P_STAGED);
                // The staging counts as an eviction until its entry says `P_STAGED`
                // (`stage`).
                eng.transparent_evicting.fetch_sub(1, Ordering::SeqCst);
                d.unlock();
                r.staged += 1;
                return;
            }
            Staging::Pinned => {
                // A device may be writing into it behind the page tables: a copy
                // taken now could miss those bytes, and the page, dropped as clean
                // after, would lose them. Left where it is, as the kernel leaves a
                // pinned page; tried again at the hand's next visit.
                unlock_mappings(eng, d, pfn, 0, 0);
                d.unlock();
                Counters::inc(&eng.cnt.pinned_skips);
                r.busy += 1;
                return;
            }
            Staging::Refused => {}
        }
    }
    let sw = d.swap.load(Ordering::Relaxed);
    if !dirty && sw != 0 {
        if probation && !eng.freq_on {
            eng.ghost_insert(crate::engine::ghost_key_swap(sw));
        }
        if let Some(release) = evict_locked(eng, d, pfn, sw, zap) {
            if eng.freq_on {
                leaving(eng, d, sw, probation);
            }
            d.unlock();
            if release == Release::Now {
                eng.frames.free(pfn);
            }
            r.evicted += 1;
            return;
        }
        if transparent && eng.transparent_frozen.load(Ordering::SeqCst) != 0 {
            // A fork's freeze keeps it in its mapping, and its copy is good: writing
            // it again would only churn the device. Busy until the freeze ends.
            unlock_mappings(eng, d, pfn, 0, 0);
            d.unlock();
            r.busy += 1;
            return;
        }
    }
    // Dirty, or never written out: queue a page-out. A staged page is out of the
    // program's reach already; a transparent page still mapped is write-protected
    // first, so the program cannot change it while it is copied out (its next write
    // faults and marks it dirty again, see `mm::transparent`).
    let src = if staged {
        eng.staging_addr(pfn)
            .expect("a staged page implies a staging area") as *const u8
    } else if transparent {
        let addr = d.owner2.load(Ordering::Relaxed) as u64;
        let wp = eng
            .uffd
            .get()
            .map(|u| u.writeprotect(addr, PAGE_SIZE as u64, WP_SET));
        if !matches!(wp, Some(Ok(()))) {
            unlock_mappings(eng, d, pfn, 0, 0);
            d.unlock();
            r.busy += 1;
            return;
        }
        crate::trail::note(crate::trail::Op::Protect, addr, pfn.0, bits);
        addr as *const u8
    } else {
        eng.frames.frame_ptr(pfn).cast_const()
    };
    if (staged || transparent) && !crate::sys::page_there(src as u64) {
        // The page is not where its entry says (a broken invariant): copying it
        // would fault, and the fault's handler waits for the entry lock we hold.
        // Leave it; the program's next touch of it fails loudly
        // (`mm::transparent`, `say_lost`).
        // The reclaimer comes back to such a page on every pass: the first few
        // reports are enough.
        static SAID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        if SAID.fetch_add(1, Ordering::Relaxed) < 4 {
            say_lost(
                if staged {
                    Lost::FromStaging
                } else {
                    Lost::FromMapping
                },
                "page-out copy",
                d.owner2.load(Ordering::Relaxed) as u64,
                entry_bits(eng, d, pfn) & !P_LOCK,
                eng,
            );
        }
        unlock_mappings(eng, d, pfn, 0, 0);
        d.unlock();
        r.busy += 1;
        return;
    }
    let Some(req) = eng.io.take() else {
        unlock_mappings(eng, d, pfn, 0, 0);
        d.unlock();
        r.pool_empty = true;
        return;
    };
    let e = match eng.swap.alloc() {
        Ok(e) => e,
        Err(why) => {
            unlock_mappings(eng, d, pfn, 0, 0);
            d.unlock();
            eng.io.release(req);
            r.no_slot = Some(why);
            return;
        }
    };
    if sw != 0 {
        // The old copy is stale: give its slot back; the page gets a fresh one,
        // next to the other pages of this batch.
        eng.swap.put_encoded_live(sw);
        d.swap.store(0, Ordering::Relaxed);
    }
    // SAFETY: we hold every entry lock of the page, so no writer stores into the
    // frame (a transparent page: it is write-protected, and mapped while its entry
    // is present and locked); the request buffer is ours (taken from the pool).
    // Concurrent optimistic readers only load, so reading here is not a race.
    unsafe { std::ptr::copy_nonoverlapping(src, eng.io.buf(req), PAGE_SIZE) };
    // The bytes did not change: no version bump; clean from now on.
    unlock_mappings(eng, d, pfn, P_DIRTY, 0);
    d.flags.store(f | F_WRITEBACK, Ordering::Relaxed);
    let rq = &eng.io.reqs[req as usize];
    rq.pfn.store(pfn.0, Ordering::Relaxed);
    rq.epoch
        .store(d.epoch.load(Ordering::Relaxed), Ordering::Relaxed);
    rq.entry.store(Pte::swapped(e), Ordering::Relaxed);
    rq.file.store(0, Ordering::Relaxed);
    if eng.freq_on {
        leaving(eng, d, Pte::swapped(e), probation);
    } else if probation {
        eng.ghost_insert(crate::engine::ghost_key_swap(Pte::swapped(e)));
    }
    eng.swap.page_out_begun(e.dev);
    d.unlock();
    eng.io.submit(req);
    r.queued += 1;
}

/// `Policy::Frequency`: page `d` leaves memory for the slot of encoded entry `sw`
/// (dropped, or queued for page-out): the slot keeps its use count, and a page
/// leaving main moves what probation pages must beat to enter
/// (`Engine::victim_freq`). Frame lock held.
fn leaving(eng: &Engine, d: &PageDesc, sw: u64, probation: bool) {
    let stamp = d.freq.load(Ordering::Relaxed);
    eng.swap.set_slot_freq(sw, stamp);
    if !probation {
        // A moving average (weight 1/4, in sixteenths): one hot page that went
        // unused for a sweep does not shut main for everybody.
        let t = eng.victim_freq.load(Ordering::Relaxed);
        let avg = (3 * t + eng.freq_count(stamp) * 16) / 4;
        eng.victim_freq.store(avg, Ordering::Relaxed);
    }
}

/// Sends a probation page that reclaim could not look at now back to the small
/// FIFO's tail; if the FIFO is full (installs took the room), it becomes an orphan
/// that the hand takes (`Engine::orphans`): never in neither.
fn requeue(eng: &Engine, d: &PageDesc, pfn: Pfn) {
    let key = u64::from(pfn.0) | (u64::from(d.epoch.load(Ordering::Relaxed)) << 32);
    if eng.small.push(key).is_err() {
        eng.set_orphan(pfn, true);
    }
}

/// Moves a page of the small FIFO to main (it was used on probation, or could not
/// be looked at): the hand will find it with its reference bit set. Frame lock held.
fn promote(eng: &Engine, d: &PageDesc, pfn: Pfn, f: u32) {
    eng.set_orphan(pfn, false);
    Counters::inc(&eng.cnt.small_promoted);
    if eng.freq_on {
        // Spared by the hand once (see `reclaim_frame`), without a use to count.
        d.flags.store((f & !F_SMALL) | F_SEEN, Ordering::Relaxed);
        return;
    }
    d.flags.store(f & !(F_SMALL | F_SEEN), Ordering::Relaxed);
    eng.rmap.for_each(d, pfn, |pte| {
        let v = pte.load(Ordering::Relaxed);
        if v & P_ACCESSED == 0 {
            let _ = pte.compare_exchange(v, v | P_ACCESSED, Ordering::Relaxed, Ordering::Relaxed);
        }
        true
    });
}

/// Reclaims a page of a host file's page cache (`filemap`): a clean one is dropped
/// (the file has its bytes; its entry goes back to `EMPTY`, so the next access
/// reads the file), a dirty one is copied into a request that a page-I/O thread
/// writes to the file in place (the kpiod of seed 000: reclaim never writes a file
/// page itself nor takes a file's lock). Frame lock and the entry lock held.
fn reclaim_file(eng: &Engine, d: &PageDesc, pfn: Pfn, f: u32, dirty: bool, r: &mut ScanResult) {
    if !dirty {
        evict_file_locked(eng, d, pfn);
        d.unlock();
        eng.frames.free(pfn);
        r.evicted += 1;
        return;
    }
    let Some(req) = eng.io.take() else {
        unlock_mappings(eng, d, pfn, 0, 0);
        d.unlock();
        r.pool_empty = true;
        return;
    };
    // SAFETY: we hold the page's entry lock, so nobody stores into the frame; the
    // request buffer is ours.
    unsafe {
        std::ptr::copy_nonoverlapping(
            eng.frames.frame_ptr(pfn).cast_const(),
            eng.io.buf(req),
            PAGE_SIZE,
        )
    };
    // Under write-back before it looks clean: a durable sync that finds the page
    // clean (`Inode::grab_dirty`) then sees the flag and waits for this write.
    d.flags.store(f | F_WRITEBACK, Ordering::Release);
    unlock_mappings(eng, d, pfn, P_DIRTY, 0);
    let index = d.index.load(Ordering::Relaxed);
    let rq = &eng.io.reqs[req as usize];
    rq.pfn.store(pfn.0, Ordering::Relaxed);
    rq.epoch
        .store(d.epoch.load(Ordering::Relaxed), Ordering::Relaxed);
    rq.entry.store(0, Ordering::Relaxed);
    rq.file.store(FILE_REQ | index, Ordering::Relaxed);
    let (slot, _) = crate::filemap::slots::split(index);
    let fs = eng.files.get(slot);
    fs.inflight.fetch_add(1, Ordering::AcqRel);
    fs.submitted.fetch_add(1, Ordering::AcqRel);
    d.unlock();
    eng.io.submit(req);
    r.queued += 1;
}

/// Drops a clean file page: its entry becomes `EMPTY` (which also unlocks it).
/// Frame lock and the entry lock held; the caller frees the frame after unlocking.
pub(crate) fn evict_file_locked(eng: &Engine, d: &PageDesc, pfn: Pfn) {
    eng.rmap.for_each(d, pfn, |pte| {
        pte.store(EMPTY, Ordering::Release);
        crate::pte::released(pte);
        true
    });
    eng.rmap.clear(d, pfn);
    Counters::inc(&eng.cnt.pgsteal);
}

/// The union of the values of the entries mapping `pfn` (a transparent page has
/// exactly one). Frame lock held.
fn entry_bits(eng: &Engine, d: &PageDesc, pfn: Pfn) -> u64 {
    let mut bits = 0;
    eng.rmap.for_each(d, pfn, |pte| {
        bits |= pte.load(Ordering::Relaxed);
        true
    });
    bits
}

/// What `stage` did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Staging {
    /// The page is in its staging page now.
    Staged,
    /// Not moved (no staging area, a fork freeze, a page shared with a fork
    /// child): the caller may evict it in place.
    Refused,
    /// The kernel refused the move (`EBUSY`) of a page mapped only here, in a
    /// process that never forked since it has transparent memory
    /// (`sys::process_forked`): the page is pinned (an `O_DIRECT`
    /// read or an io_uring buffer a device may be writing into). It must not be
    /// copied out and dropped now, unless an allocation can free nothing else
    /// (`Engine::evict_pinned`).
    Pinned,
}

/// Moves a transparent page out of the program's mapping into its frame's staging
/// page (`UFFDIO_MOVE`, no copy), to see whether it is used: a touch faults and the
/// handler moves it back. `Refused` (nothing changed) without a staging area, while
/// evictions are frozen for a fork, or when the kernel refuses the move of a page
/// shared with a forked child; the caller then treats the page as before.
/// `Pinned`: refused, and the page must stay (see `Staging`).
/// `Staged`: moved, and still counted in `transparent_evicting` — the caller marks the
/// entry `P_STAGED` and only then lets the count go, so a fork's freeze, which
/// waits for that count to reach 0 before it brings staged pages back
/// (`Vm::freeze_transparent_eviction`), never misses a page moved but not yet
/// marked. Frame lock and the entry lock held.
fn stage(eng: &Engine, d: &PageDesc, pfn: Pfn) -> Staging {
    let (Some(st), Some(u)) = (eng.staging_addr(pfn), eng.uffd.get()) else {
        return Staging::Refused;
    };
    // A staged page is out of the mapping, as an evicted one: the fork freeze
    // applies (see `evict_locked`).
    eng.transparent_evicting.fetch_add(1, Ordering::SeqCst);
    if eng.transparent_frozen.load(Ordering::SeqCst) != 0 {
        eng.transparent_evicting.fetch_sub(1, Ordering::SeqCst);
        return Staging::Refused;
    }
    let addr = d.owner2.load(Ordering::Relaxed) as u64;
    // SAFETY: the page of a live transparent region whose entry we hold locked, and
    // its frame's staging page, which only the holder of that lock touches.
    let mut moved = unsafe { u.move_pages(st, addr, PAGE_SIZE as u64, MOVE_DONTWAKE) };
    if matches!(&moved, Err(e) if e.raw_os_error() == Some(libc::EEXIST)) {
        // A page left in the staging slot (its frame was freed by a path that
        // raced with staging): drop it and try once more.
        crate::trail::note(crate::trail::Op::StageEexist, addr, pfn.0, 0);
        drop_staged(eng, pfn);
        // SAFETY: as above.
        moved = unsafe { u.move_pages(st, addr, PAGE_SIZE as u64, MOVE_DONTWAKE) };
    }
    if let Err(e) = moved {
        eng.transparent_evicting.fetch_sub(1, Ordering::SeqCst);
        let errno = e.raw_os_error().unwrap_or(0) as u64;
        crate::trail::note(crate::trail::Op::StageRefused, addr, pfn.0, errno);
        // `EBUSY`: shared copy-on-write or pinned. A page a device writes into is
        // pinned exclusive (the pin breaks the sharing first); after a fork a page
        // may stay refused while mapped once (the kernel marks it exclusive again
        // only at its next write), so then the page is evicted in place as before.
        // An unreadable pagemap counts as exclusive: leaving a page costs a visit,
        // dropping a pinned one loses data. But when an allocation finds nothing
        // else to free (`evict_pinned`), the page goes as before: a budget full of
        // pinned pages would otherwise fail every allocation.
        if e.raw_os_error() == Some(libc::EBUSY)
            && !crate::sys::process_forked()
            && !eng.evict_pinned.load(Ordering::Relaxed)
            && crate::sys::page_exclusive(addr) != Some(false)
        {
            return Staging::Pinned;
        }
        return Staging::Refused;
    }
    Counters::inc(&eng.cnt.staged);
    crate::trail::note(crate::trail::Op::Stage, addr, pfn.0, 0);
    Staging::Staged
}

/// Drops frame `pfn`'s staging page (the staged page goes with its frame).
pub(crate) fn drop_staged(eng: &Engine, pfn: Pfn) {
    if let Some(st) = eng.staging_addr(pfn) {
        // SAFETY: the frame's staging page, touched only under its frame's lock.
        unsafe { crate::sys::madvise(st as *mut libc::c_void, PAGE_SIZE, libc::MADV_DONTNEED) };
    }
}

/// Locks every entry mapping `pfn` unless one is locked or pinned; returns whether
/// any is dirty. On failure nothing stays locked. Frame lock held.
fn try_lock_mappings(eng: &Engine, d: &PageDesc, pfn: Pfn) -> Option<bool> {
    let mut locked = 0u32;
    let mut dirty = false;
    let all = eng.rmap.for_each(d, pfn, |pte| {
        match try_lock_present(pte, P_EXCL | P_SHARED) {
            Some(v) if Pte::pfn(v) != pfn => {
                // The reverse map names an entry that maps another frame (a broken
                // invariant): leave both alone, and say so (a few times).
                unlock_entry(pte, 0, 0);
                static SAID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                if SAID.fetch_add(1, Ordering::Relaxed) < 4 {
                    say_stale_rmap(d, pfn, v);
                }
                false
            }
            Some(v) => {
                locked += 1;
                dirty |= v & P_DIRTY != 0;
                true
            }
            None => false,
        }
    });
    if !all {
        let mut n = 0;
        eng.rmap.for_each(d, pfn, |pte| {
            if n == locked {
                return false;
            }
            n += 1;
            unlock_entry(pte, 0, 0);
            true
        });
        return None;
    }
    Some(dirty)
}

/// Locks every entry mapping `pfn`, waiting out short lock holders (pins do not
/// stop it). Returns the union of their bits. Frame lock held.
fn lock_mappings(eng: &Engine, d: &PageDesc, pfn: Pfn) -> u64 {
    let mut bits = 0;
    eng.rmap.for_each(d, pfn, |pte| {
        let v = lock_present(pte, pfn).unwrap_or_else(|| unreachable!("mapping moved"));
        bits |= v;
        true
    });
    bits
}

/// Unlocks every entry mapping `pfn`, clearing bits `clear` and setting `set`.
fn unlock_mappings(eng: &Engine, d: &PageDesc, pfn: Pfn, clear: u64, set: u64) {
    eng.rmap.for_each(d, pfn, |pte| {
        unlock_entry(pte, clear, set);
        true
    });
}

/// Drops a clean page with a valid swap copy from memory: every entry mapping it
/// becomes `Swapped` with a slot reference of its own (which also unlocks it).
/// Preconditions: the frame lock and every entry lock are held, the page is not
/// dirty, pinned or under page-out. Returns false (nothing changed) if the slot
/// cannot take that many more references. The caller frees the frame after
/// unlocking (`Release::Now`), unless the frame went into `zap` (`Release::Batched`:
/// a staged transparent page, whose staging page `zap` drops with others before it
/// frees the frame).
fn evict_locked(
    eng: &Engine,
    d: &PageDesc,
    pfn: Pfn,
    sw: u64,
    zap: &mut ZapBatch,
) -> Option<Release> {
    debug_assert!(d.is_locked());
    debug_assert_eq!(d.flags.load(Ordering::Relaxed) & F_WRITEBACK, 0);
    let n = d.mapcount.load(Ordering::Relaxed);
    if n > 1 && !eng.swap.dup_encoded(sw, n - 1) {
        return None;
    }
    let mut release = Release::Now;
    let transparent = d.flags.load(Ordering::Relaxed) & F_TRANSPARENT != 0;
    if transparent {
        // Announce the eviction, then look at the freeze (the freezer sets it, then
        // waits for announced evictions to finish): either it sees us or we see it.
        eng.transparent_evicting.fetch_add(1, Ordering::SeqCst);
        if eng.transparent_frozen.load(Ordering::SeqCst) != 0 {
            eng.transparent_evicting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let zapped = if entry_bits(eng, d, pfn) & P_STAGED != 0 {
            // The page is out of the program's reach already: its staging page can
            // go later, with others (one TLB flush for the batch), as long as the
            // frame is not reused before that.
            let st = eng
                .staging_addr(pfn)
                .expect("a staged page implies a staging area");
            crate::trail::note(
                crate::trail::Op::EvictStaged,
                d.owner2.load(Ordering::Relaxed) as u64,
                pfn.0,
                sw,
            );
            if zap.push(st, pfn) {
                release = Release::Batched;
            } else {
                drop_staged(eng, pfn);
            }
            true
        } else {
            // The page leaves the program's mapping before its entry says so: a
            // fault on it meanwhile waits for the entry lock, then finds it swapped.
            let addr = d.owner2.load(Ordering::Relaxed).cast();
            crate::trail::note(crate::trail::Op::EvictInPlace, addr as u64, pfn.0, sw);
            // SAFETY: the page of a live transparent region (its entry is locked by
            // us, and a region releases its entries before it is unmapped).
            unsafe { crate::sys::madvise(addr, PAGE_SIZE, libc::MADV_DONTNEED) == 0 }
        };
        if !zapped {
            eng.transparent_evicting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        eng.transparent_out.fetch_add(1, Ordering::Relaxed);
    }
    eng.rmap.for_each(d, pfn, |pte| {
        debug_assert_eq!(
            pte.load(Ordering::Relaxed) & (P_LOCK | P_DIRTY | P_EXCL | P_SHARED),
            P_LOCK
        );
        pte.store(sw, Ordering::Release);
        crate::pte::released(pte);
        true
    });
    eng.rmap.clear(d, pfn);
    d.swap.store(0, Ordering::Relaxed);
    if transparent {
        // Only now, with the entry saying `Swapped`, is the eviction over for a
        // fork's freeze: its scan must find the slot, not a mapped entry whose
        // page is gone.
        eng.transparent_evicting.fetch_sub(1, Ordering::SeqCst);
    }
    Counters::inc(&eng.cnt.pgsteal);
    Some(release)
}

/// What a transparent page's entry and the page tables disagree on (see
/// `say_lost`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lost {
    /// The entry says mapped; the mapping has no page there.
    FromMapping,
    /// The entry says staged; the frame's staging page is missing.
    FromStaging,
    /// The entry says not mapped (empty or on swap); the mapping has a page there,
    /// so mapping ours would fail (`EEXIST`) and the page there is not what the
    /// entry describes.
    AlreadyMapped,
}

/// Says on stderr that a transparent page's entry and the page tables disagree (a
/// broken invariant: something dropped or placed the page behind usermm's back),
/// with what usermm knows of the page, instead of serving it (the program would
/// otherwise fault on it forever, or read bytes that are not its own). `who` is
/// the path that noticed; the line carries this process's id (a fork child and
/// its parent share stderr). No allocation: the line is built on the stack.
pub(crate) fn say_lost(what: Lost, who: &str, page: u64, entry: u64, eng: &Engine) {
    use std::fmt::Write;
    let mut c = crate::trail::StackBuf::<400>::new();
    let what = match what {
        Lost::FromMapping => "is missing from its mapping but its entry is mapped",
        Lost::FromStaging => "is missing from its staging page but its entry says it is staged",
        Lost::AlreadyMapped => "is in its mapping but its entry says it is not",
    };
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let _ = write!(
        c,
        "usermm: BUG: transparent page {page:#x} {what} ({who}; pid {pid}, {}, entry {entry:#x}",
        crate::sys::fork_role()
    );
    // The kernel's view of the page (present bit 63, swap 62, exclusive 56, …).
    match crate::sys::pagemap_entry(page) {
        Some(pm) => {
            let _ = write!(c, ", pagemap {pm:#x}");
        }
        None => {
            let _ = write!(c, ", pagemap unreadable");
        }
    }
    if let Pte::Present(pfn) = Pte::decode(entry) {
        let d = eng.frames.desc(pfn);
        let staging = eng.staging_addr(pfn);
        let _ = write!(
            c,
            ", frame {} flags {:#x} owner {:#x} slot {:#x}, staging page resident: {}",
            pfn.0,
            d.flags.load(Ordering::Relaxed),
            d.owner2.load(Ordering::Relaxed) as u64,
            d.swap.load(Ordering::Relaxed),
            staging.map_or("none", |st| if crate::sys::page_there(st) {
                "yes"
            } else {
                "no"
            }),
        );
    }
    let _ = writeln!(c, ")");
    c.flush();
    // What was done to the page and its frame lately (`USERMM_TRAIL=1`).
    let pfn = match Pte::decode(entry) {
        Pte::Present(pfn) => Some(pfn.0),
        _ => None,
    };
    crate::trail::dump(page, pfn);
}

/// Says on stderr that frame `pfn`'s reverse map holds an entry (value `v`) that
/// maps another frame. No allocation.
fn say_stale_rmap(d: &PageDesc, pfn: Pfn, v: u64) {
    use std::fmt::Write;
    let mut c = crate::trail::StackBuf::<300>::new();
    let owner = d.owner2.load(Ordering::Relaxed) as u64;
    let _ = writeln!(
        c,
        "usermm: BUG: frame {} (flags {:#x}, owner {owner:#x}) is reverse-mapped from an entry that maps frame {} (entry {v:#x}; pid {}, {})",
        pfn.0,
        d.flags.load(Ordering::Relaxed),
        Pte::pfn(v).0,
        // SAFETY: getpid has no preconditions.
        unsafe { libc::getpid() },
        crate::sys::fork_role(),
    );
    c.flush();
    crate::trail::dump(owner, Some(pfn.0));
}

/// Who frees an evicted frame (see `evict_locked`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Release {
    /// The caller, after unlocking it.
    Now,
    /// The `ZapBatch` it went into, when it is flushed.
    Batched,
}

/// Staging pages of evicted transparent pages, dropped together by one
/// `process_madvise` (one TLB flush for the batch instead of one a page, see
/// `sys::zap_pages`), and their frames, freed only after that (a frame's staging
/// page must be empty before the frame can be staged again). On the stack of the
/// evicting thread: no allocation. Every holder flushes it before it returns.
pub(crate) struct ZapBatch {
    addrs: [u64; ZAP_BATCH],
    pfns: [u32; ZAP_BATCH],
    n: usize,
}

const ZAP_BATCH: usize = 64;

impl ZapBatch {
    pub(crate) fn new() -> ZapBatch {
        ZapBatch {
            addrs: [0; ZAP_BATCH],
            pfns: [0; ZAP_BATCH],
            n: 0,
        }
    }

    /// Adds a staging page and its frame (whose lock the caller holds); false when
    /// the batch is full (callers flush before taking a frame lock when `full`).
    fn push(&mut self, st: u64, pfn: Pfn) -> bool {
        if self.n == ZAP_BATCH {
            return false;
        }
        self.addrs[self.n] = st;
        self.pfns[self.n] = pfn.0;
        self.n += 1;
        true
    }

    pub(crate) fn full(&self) -> bool {
        self.n == ZAP_BATCH
    }

    /// Drops the staging pages and frees their frames. No frame lock held.
    pub(crate) fn flush(&mut self, eng: &Engine) {
        if self.n == 0 {
            return;
        }
        // SAFETY: staging pages of evicted pages: their entries say `Swapped` and
        // their frames are not reused before the free below.
        unsafe { crate::sys::zap_pages(&self.addrs[..self.n]) };
        for &p in &self.pfns[..self.n] {
            eng.frames.free(Pfn(p));
        }
        self.n = 0;
    }
}

/// Runs on a page-I/O thread: writes request `i` and completes it. For a device
/// that merges writes, it first gathers more queued requests and writes each run
/// of adjacent slots in one request (slots are handed out sequentially, so a
/// batch of page-outs is mostly one run). No allocation: the batch is on the stack.
pub(crate) fn complete_writeback(eng: &Engine, i: u32) {
    let mut zap = ZapBatch::new();
    complete_batch(eng, i, &mut zap);
    if zap.n > 0 {
        zap.flush(eng);
        eng.frames.notify_waiters();
    }
}

/// `complete_writeback`'s body: at most `BATCH` completions, so `zap` (64) never
/// fills.
fn complete_batch(eng: &Engine, i: u32, zap: &mut ZapBatch) {
    const BATCH: usize = 32;
    if eng.io.reqs[i as usize].file.load(Ordering::Relaxed) != 0 {
        // One request each: the rest is the next thread's.
        eng.io.kick();
        return complete_file(eng, i);
    }
    let entry = |i: u32| Pte::decode(eng.io.reqs[i as usize].entry.load(Ordering::Relaxed));
    let Pte::Swapped(e) = entry(i) else {
        debug_assert!(false, "page-out request without a swap entry");
        eng.io.release(i);
        return;
    };
    let dev = match eng.swap.get(e.dev) {
        Some(dev) if dev.dev.merges_writes() => dev,
        // A network device (or one removed meanwhile): one request per page,
        // the rest the next thread's.
        _ => {
            eng.io.kick();
            return complete_one(eng, i, zap);
        }
    };
    let mut batch = [(0u64, 0u32); BATCH];
    batch[0] = (e.slot, i);
    let mut n = 1;
    while n < BATCH {
        let Some(j) = eng.io.try_pop() else { break };
        match entry(j) {
            Pte::Swapped(f) if f.dev == e.dev => {
                batch[n] = (f.slot, j);
                n += 1;
            }
            // Another device: on its own, written now, so what is queued is
            // the next thread's meanwhile.
            _ => {
                eng.io.kick();
                complete_one(eng, j, zap)
            }
        }
    }
    // What this thread did not take is the next one's.
    eng.io.kick();
    let batch = &mut batch[..n];
    batch.sort_unstable_by_key(|b| b.0);
    // The batch's runs of adjacent slots, written together (all in flight at
    // once where the device writes through io_uring).
    let mut runs = [(0u64, 0u32); BATCH];
    let mut nruns = 0;
    let mut bufs: [&[u8]; BATCH] = [&[]; BATCH];
    for (k, &(slot, j)) in batch.iter().enumerate() {
        if nruns > 0 && batch[k - 1].0 + 1 == slot {
            runs[nruns - 1].1 += 1;
        } else {
            runs[nruns] = (slot, 1);
            nruns += 1;
        }
        // SAFETY: request `j` is ours until released; nobody writes its buffer.
        bufs[k] = unsafe { eng.io.buf_slice(j) };
    }
    let mut ok = [false; BATCH];
    dev.write_runs(&runs[..nruns], &bufs[..n], &mut ok[..nruns]);
    let mut k = 0;
    for (&(_, len), &ok) in runs[..nruns].iter().zip(&ok) {
        for &(_, j) in &batch[k..k + len as usize] {
            finish_writeback(eng, j, ok, zap);
        }
        k += len as usize;
    }
}

/// Writes a file page's request to its file and completes it.
fn complete_file(eng: &Engine, i: u32) {
    let rq = &eng.io.reqs[i as usize];
    let (slot, pgoff) = crate::filemap::slots::split(rq.file.load(Ordering::Relaxed) & !FILE_REQ);
    // SAFETY: request `i` is ours until released; nobody writes its buffer.
    let res = eng
        .files
        .write_page(slot, pgoff, unsafe { eng.io.buf_slice(i) });
    let ok = match &res {
        Ok(()) => {
            Counters::inc(&eng.cnt.pswpout);
            Counters::inc(&eng.cnt.fileout);
            true
        }
        Err(e) => {
            eng.files.failed(slot, e);
            Counters::inc(&eng.cnt.file_write_errors);
            // A failed page-out like any other for an allocation's give-up.
            Counters::inc(&eng.cnt.write_errors);
            eng.last_write_error_file
                .store(e.raw_os_error().unwrap_or(libc::EIO), Ordering::Relaxed);
            false
        }
    };
    let pfn = Pfn(rq.pfn.load(Ordering::Relaxed));
    let epoch = rq.epoch.load(Ordering::Relaxed);
    let d = eng.frames.desc(pfn);
    d.lock();
    let f = d.flags.load(Ordering::Relaxed);
    let mine = f & (F_INUSE | F_WRITEBACK | F_FILE) == F_INUSE | F_WRITEBACK | F_FILE
        && d.epoch.load(Ordering::Relaxed) == epoch
        && d.mapcount.load(Ordering::Relaxed) > 0;
    let mut freed = false;
    if mine {
        d.flags.store(f & !F_WRITEBACK, Ordering::Relaxed);
        let bits = lock_mappings(eng, d, pfn);
        if !ok {
            // The page stays resident and dirty; a later scan or msync retries.
            unlock_mappings(eng, d, pfn, 0, P_DIRTY);
        } else if bits & P_DIRTY == 0
            && eng.frames.free_count() < eng.frames.wmark[2]
            && bits & (P_ACCESSED | P_EXCL | P_SHARED) == 0
        {
            evict_file_locked(eng, d, pfn);
            freed = true;
        } else {
            unlock_mappings(eng, d, pfn, 0, 0);
        }
    }
    d.unlock();
    if freed {
        eng.frames.free(pfn);
    }
    // Last: the file's descriptor may be closed once this reaches zero.
    let fs = eng.files.get(slot);
    fs.completed.fetch_add(1, Ordering::AcqRel);
    fs.inflight.fetch_sub(1, Ordering::AcqRel);
    eng.io.release(i);
    eng.frames.notify_waiters();
}

/// Writes one request on its own and completes it.
fn complete_one(eng: &Engine, i: u32, zap: &mut ZapBatch) {
    if eng.io.reqs[i as usize].file.load(Ordering::Relaxed) != 0 {
        return complete_file(eng, i);
    }
    let ev = eng.io.reqs[i as usize].entry.load(Ordering::Relaxed);
    let ok = match Pte::decode(ev) {
        Pte::Swapped(e) => eng.swap.get(e.dev).is_some_and(|dev| {
            // SAFETY: request `i` is ours until released; nobody writes its buffer.
            dev.write(e.slot, unsafe { eng.io.buf_slice(i) }).is_ok()
        }),
        _ => false,
    };
    finish_writeback(eng, i, ok, zap);
}

/// The completion of request `i`, whose write succeeded (`ok`) or failed.
fn finish_writeback(eng: &Engine, i: u32, ok: bool, zap: &mut ZapBatch) {
    let rq = &eng.io.reqs[i as usize];
    let pfn = Pfn(rq.pfn.load(Ordering::Relaxed));
    let epoch = rq.epoch.load(Ordering::Relaxed);
    let ev = rq.entry.load(Ordering::Relaxed);
    let Pte::Swapped(e) = Pte::decode(ev) else {
        eng.io.release(i);
        return;
    };
    if ok {
        Counters::inc(&eng.cnt.pswpout);
    } else {
        Counters::inc(&eng.cnt.write_errors);
        eng.last_write_error_dev.store(e.dev, Ordering::Relaxed);
        eng.last_write_error_file.store(0, Ordering::Relaxed);
    }
    let d = eng.frames.desc(pfn);
    d.lock();
    let f = d.flags.load(Ordering::Relaxed);
    let mine = f & F_INUSE != 0
        && f & F_WRITEBACK != 0
        && d.epoch.load(Ordering::Relaxed) == epoch
        && d.mapcount.load(Ordering::Relaxed) > 0;
    let mut freed = false;
    if mine {
        d.flags.store(f & !F_WRITEBACK, Ordering::Relaxed);
        let bits = lock_mappings(eng, d, pfn);
        match ok {
            true if bits & P_DIRTY == 0 => {
                debug_assert_eq!(d.swap.load(Ordering::Relaxed), 0);
                d.swap.store(ev, Ordering::Relaxed);
                // Reclaim chose this page; drop it now unless it was used since.
                // (Also when memory is no longer short, as the kernel reclaims a
                // page it wrote at once: left resident, it was often written again,
                // its copy dropped, and written out a second time; the bench's
                // 50 %-write cells at W/B 1.25 wrote 1.05-1.15 pages per page read,
                // 0.66-0.77 since.)
                let evicted = if bits & (P_ACCESSED | P_EXCL | P_SHARED) == 0 {
                    evict_locked(eng, d, pfn, ev, zap)
                } else {
                    None
                };
                freed = evicted == Some(Release::Now);
                if evicted.is_none() {
                    unlock_mappings(eng, d, pfn, 0, 0);
                }
            }
            // Written again while in flight: the copy is stale already.
            true => {
                unlock_mappings(eng, d, pfn, 0, 0);
                eng.swap.put_live(e);
            }
            false => {
                // The page stays resident and dirty; a later scan retries.
                unlock_mappings(eng, d, pfn, 0, P_DIRTY);
                eng.swap.put_live(e);
            }
        }
    } else {
        // The page was unmapped while in flight.
        eng.swap.put(e);
    }
    d.unlock();
    if freed {
        eng.frames.free(pfn);
    }
    // Per device: the run of failures (new slots avoid a failing device) and the
    // page-outs swapoff waits for; counted done after the slot was attached above.
    eng.swap.page_out_done(e.dev, ok);
    eng.io.release(i);
    eng.frames.notify_waiters();
}

/// Wakes the background reclaimer.
pub(crate) fn wake_kswapd(eng: &Engine) {
    let mut w = eng.kswapd_lock.lock();
    if !*w {
        *w = true;
        eng.kswapd_wake.notify_one();
    }
}

/// Body of the background reclaimer thread.
pub(crate) fn kswapd(eng: &Engine) {
    let n = eng.frames.nframes();
    let [_, low, high] = eng.frames.wmark;
    loop {
        {
            let mut w = eng.kswapd_lock.lock();
            while !*w && !eng.shutdown.load(Ordering::Acquire) {
                if eng.frames.free_count() < low {
                    break;
                }
                eng.kswapd_wake.wait_for(&mut w, Duration::from_millis(100));
            }
            *w = false;
        }
        if eng.shutdown.load(Ordering::Acquire) {
            return;
        }
        let mut idle_scan = 0usize;
        // Page-outs queued since the last kick: the I/O threads are woken once
        // `KICK_BATCH` are queued (or before kswapd waits or sleeps), so that
        // they find runs of adjacent slots to write as one request.
        let mut unkicked = 0usize;
        while eng.frames.free_count() < high && !eng.shutdown.load(Ordering::Acquire) {
            let want = high - eng.frames.free_count();
            let seen = eng.frames.events();
            let r = shrink_for(eng, SCAN_BATCH, want, true);
            unkicked += r.queued;
            if unkicked >= KICK_BATCH || r.pool_empty {
                eng.io.kick();
                unkicked = 0;
            }
            if r.evicted > 0 || r.staged > 0 {
                idle_scan = 0;
                continue;
            }
            idle_scan += r.scanned;
            if r.queued > 0 && !r.pool_empty && eng.io.inflight() < want {
                continue;
            }
            if unkicked > 0 {
                eng.io.kick();
                unkicked = 0;
            }
            if eng.io.inflight() > 0 {
                // Page-outs are in flight; their completions free frames.
                eng.frames.wait_event(seen, Duration::from_millis(10));
                continue;
            }
            if idle_scan > 2 * n {
                // Nothing reclaimable (no swap, all pinned, or swap full): sleep
                // until woken again.
                break;
            }
        }
        if unkicked > 0 {
            eng.io.kick();
        }
    }
}

/// Page-out failures seen by one access, for its give-up (`alloc_frame`).
#[derive(Clone, Copy)]
struct Failing {
    /// When this access first saw a page-out fail with none succeeding since.
    since: Instant,
    /// `write_errors` just before that failure, and `pswpout` then.
    errs0: u64,
    outs0: u64,
}

/// Takes a frame for an access, reclaiming directly when none is free. Errors:
/// `OutOfMemory` (no swap device, or everything is pinned), `OutOfSwap` (memory
/// and swap full), `Device` (page-out keeps failing so no frame can be freed).
///
/// `ctx == Reserve` (a swap-in) may take a frame below the min watermark when
/// memory and swap are both full: reading a page in frees its slot (see
/// `fault_swapin`), which lets reclaim write a dirty page there and give the frame
/// back, so stored pages stay readable even then.
///
/// ## Giving up when page-out keeps failing
/// Each access decides for itself, from what it sees while it waits, and the bound
/// does not grow with the budget. A window opens when this access first sees the
/// failure counter move with no page-out succeeding; any successful page-out (from
/// any thread: frames are being freed, so waiting is making progress) closes it.
/// The access gives up, naming the device that failed last, when in one window
/// - `GIVE_UP_FAILURES` page-outs have failed: more failures than two full request
///   pools, with not one success, is a device that does not take writes, not a
///   transient error; or
/// - `GIVE_UP_AFTER` has passed and failures went on after the window opened: the
///   bound for a device whose failures are slow to report (a disk retrying, a server
///   timing out), where the count would take long to reach.
///
/// Failures of other threads' page-outs count too: they are evidence about the same
/// devices, and any success resets the window, so a device that works part of the
/// time (a failure rate) never makes an access give up. A frame freed for this
/// access ends the loop (it returns the frame). Every wait in the loop is bounded
/// (`wait_event` at most 10 ms); a device that neither completes nor fails a write
/// keeps `inflight` up and the access waits for it, as before.
#[cfg_attr(feature = "lockdep", track_caller)]
pub(crate) fn alloc_frame(eng: &Engine, ctx: AllocCtx) -> Result<Pfn> {
    // A point where reclaim may run: whatever the caller holds is ordered before
    // everything reclaim takes (seed 004; docs/design.md invariant 5).
    crate::lockdep::might_reclaim();
    let n = eng.frames.nframes();
    let mut fruitless = 0usize;
    let mut errs_seen = None;
    let mut failing: Option<Failing> = None;
    let mut no_slot = None;
    let mut stall = None; // from the first failed allocation on (`crate::psi`)
    let mut busy_since: Option<Instant> = None;
    let mut frozen_since: Option<Instant> = None;
    let pinned0 = eng.cnt.pinned_skips.load(Ordering::Relaxed);
    loop {
        let seen = eng.frames.events();
        if let Some(p) = eng.frames.alloc(AllocCtx::Normal) {
            if eng.frames.free_count() < eng.frames.wmark[1] {
                wake_kswapd(eng);
            }
            if eng.evict_pinned.load(Ordering::Relaxed) {
                eng.evict_pinned.store(false, Ordering::Relaxed);
            }
            return Ok(p);
        }
        wake_kswapd(eng);
        stall.get_or_insert_with(|| eng.psi.stall());
        Counters::inc(&eng.cnt.direct_reclaim);
        let r = shrink_direct(eng, SCAN_BATCH);
        if r.evicted > 0 {
            fruitless = 0;
            busy_since = None;
            continue;
        }
        no_slot = r.no_slot.or(no_slot);
        let errs = eng.cnt.write_errors.load(Ordering::Relaxed);
        let outs = eng.cnt.pswpout.load(Ordering::Relaxed);
        let before = errs_seen.replace(errs).unwrap_or(errs);
        match failing {
            Some(f) if outs != f.outs0 => failing = None,
            None if errs != before => {
                failing = Some(Failing {
                    since: Instant::now(),
                    errs0: before,
                    outs0: outs,
                })
            }
            _ => {}
        }
        let give_up = failing.is_some_and(|f| {
            let failed = errs - f.errs0;
            failed >= GIVE_UP_FAILURES
                || (errs != before && failed > 1 && f.since.elapsed() >= GIVE_UP_AFTER)
        });
        if give_up {
            let errno = eng.last_write_error_file.load(Ordering::Relaxed);
            if errno != 0 {
                let os = std::io::Error::from_raw_os_error(errno);
                return Err(Error::Io(std::io::Error::new(
                    os.kind(),
                    format!(
                        "write-back of a mapped file keeps failing ({os}): no frame can be \
                         freed for this access; the file's pages stay dirty in memory"
                    ),
                )));
            }
            let dev = eng.last_write_error_dev.load(Ordering::Relaxed);
            let name = eng
                .swap
                .get(dev)
                .map(|d| d.name().to_string())
                .unwrap_or_default();
            return Err(Error::Device {
                dev: name,
                source: std::io::Error::other(
                    "page-out keeps failing: no frame can be freed for this access",
                ),
            });
        }
        if eng.transparent_frozen.load(Ordering::SeqCst) != 0
            && frozen_since.get_or_insert_with(Instant::now).elapsed() < FROZEN_WAIT
        {
            // A process fork holds transparent pages in their mappings for a moment
            // (`Vm::freeze_transparent_eviction`); its own thread may fault in that
            // time (the C library's fork touches memory), served by a handler that
            // needs a frame here. The reserve below the min watermark serves
            // faults while the freeze lasts; when it is gone too, they wait for the
            // freeze to end, `FROZEN_WAIT` at most.
            if let Some(p) = eng.frames.alloc(AllocCtx::Reserve) {
                return Ok(p);
            }
            eng.frames.wait_event(seen, Duration::from_millis(1));
            continue;
        }
        if r.queued > 0 || eng.io.inflight() > 0 {
            // Page-out is under way: its completion frees a frame (or makes a
            // clean page to drop). Sleep until something happens.
            eng.frames.wait_event(seen, Duration::from_millis(10));
            continue;
        }
        fruitless = if r.staged > 0 {
            0
        } else {
            fruitless + r.scanned
        };
        if fruitless < 3 * n {
            continue; // still sweeping: reference bits are being cleared
        }
        if r.busy > 0 {
            // Pages locked or pinned right now, or being written by an msync (which
            // writes from its own thread, not counted in `io.inflight`): their
            // holders let go. A bounded wait, not a scan count: 8 sweeps of a tiny
            // budget take microseconds, less than one write (`usermm stress files`,
            // 48 frames, failed with OutOfMemory on a loaded CI machine).
            if fruitless < 8 * n {
                crate::sync::yield_now();
                continue;
            }
            if busy_since.get_or_insert_with(Instant::now).elapsed() < BUSY_WAIT {
                eng.frames.wait_event(seen, Duration::from_millis(1));
                continue;
            }
            if eng.cnt.pinned_skips.load(Ordering::Relaxed) != pinned0
                && !eng.evict_pinned.swap(true, Ordering::Relaxed)
            {
                // Nothing to free but pages that look pinned: evict those in place
                // too (as before pins were told apart) rather than fail. Until an
                // allocation succeeds again.
                fruitless = 0;
                busy_since = None;
                continue;
            }
        }
        if eng.frames.free_count() > eng.frames.wmark[0] {
            fruitless = 0;
            continue;
        }
        if eng.ra_frames.load(Ordering::Relaxed) > 0 {
            // Frames held by readahead reads in flight: installed (then
            // reclaimable) or given back when their read ends, which it does
            // (a device read completes or fails). Wait for that.
            eng.frames.wait_event(seen, Duration::from_millis(1));
            fruitless = 0;
            continue;
        }
        if no_slot == Some(NoSlot::Full) && ctx == AllocCtx::Reserve {
            if let Some(p) = eng.frames.alloc(AllocCtx::Reserve) {
                return Ok(p);
            }
        }
        return Err(match no_slot {
            Some(NoSlot::Full) => Error::OutOfSwap,
            _ => Error::OutOfMemory,
        });
    }
}
