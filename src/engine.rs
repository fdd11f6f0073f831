//! The engine a Vm runs (the kernel's pgdat plus the swap table): the frame arena,
//! the reverse map, the swap table, the page-I/O pool, the counters, the reclaim
//! control, and the list of address spaces. Shared (`Arc<Engine>`) by the public
//! handles, the background reclaimer and the page-I/O threads.
//!
//! Owns: the struct and what needs all of its parts at once (`install`, `stats`).
//! The mechanisms that work on it are free functions in their own modules:
//! `reclaim` (scanning, kswapd, direct reclaim, page-out completion),
//! `swap::swapoff`, `mm::fault`. It sits below them and above the parts it holds, so
//! it imports none of `mm`, `reclaim` or `swap::swapoff`: swapoff walks address spaces
//! through the narrow [`SpaceWalk`] interface that `mm::space` implements.
//!
//! ## Locking
//! `kswapd_lock` (`Mutex<bool>`, leaf) pairs with `kswapd_wake` to park the background
//! reclaimer. `spaces` (Mutex, leaf) is held only to add, prune or snapshot the list,
//! never across a walk. See the crate root for the whole lock order.

use crate::addr::{Pfn, PAGE_SIZE};
use crate::config::{Config, Policy};
use crate::error::Result;
use crate::frame::rmap::Rmap;
use crate::frame::{FrameArena, F_FILE, F_INUSE, F_SMALL, F_TRANSPARENT};
use crate::pageio::PageIo;
use crate::pte::{Pte, P_ACCESSED, P_DIRTY};
use crate::stats::{Counters, Stats};
use crate::swap::SwapTable;
use crate::sync::{
    Arc, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Condvar, Mutex, Ordering, Weak,
};

/// The ghost key of a swapped page: its entry (`Pte::swapped`, never 0).
pub(crate) fn ghost_key_swap(entry: u64) -> u64 {
    entry
}

/// The ghost key of a file page (`filemap::slots::index`): odd, so it never equals
/// a swapped entry (whose low bits are 2).
pub(crate) fn ghost_key_file(index: u64) -> u64 {
    (index << 2) | 1
}

fn ghost_slot(key: u64, len: usize) -> usize {
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % len
}

/// What kind of page `Engine::publish` installs.
#[derive(Clone, Copy)]
enum Kind {
    Anon,
    /// A transparent page at this address.
    Transparent(u64),
    /// A file page with this `filemap::slots::index`.
    File(u64),
}

/// What swapoff needs from an address space (implemented by `mm::space::SpaceInner`).
pub(crate) trait SpaceWalk: Send + Sync + std::fmt::Debug {
    /// Appends `(slot, vpn)` for every entry of a mapped region of this space that
    /// holds a slot on swap device `dev`. Takes and drops the space's regions read
    /// lock; the caller holds no lock.
    fn swapped_on(&self, dev: u8, out: &mut Vec<(u64, u64)>);
    /// The entry of page `vpn`, if its page table has one. Entries stay valid memory
    /// while the space lives (page-table nodes are freed only with the table, leaves
    /// are type-stable), so a caller that holds an `Arc` of the space may CAS it.
    fn entry(&self, vpn: u64) -> Option<&AtomicU64>;
}

#[derive(Debug)]
pub(crate) struct Engine {
    /// The budget: every frame and its descriptor. Internally locked (see `frame`).
    pub frames: Arc<FrameArena>,
    /// Mappings of frames shared copy-on-write beyond the two inline ones. Changed
    /// for a frame only under that frame's lock.
    pub rmap: Rmap,
    /// Swap devices and their slots. `SwapTable::devs` (RwLock) inside.
    pub swap: Arc<SwapTable>,
    /// Page-out requests and the queue to the page-I/O threads (lock-free).
    pub io: PageIo,
    /// vmstat counters (relaxed atomics).
    pub cnt: Counters,
    /// CLOCK hand over the frame arena (relaxed atomic; any reclaimer moves it).
    pub hand: AtomicUsize,
    /// Frames the hand has visited since it last dropped or queued a page (relaxed):
    /// past a whole sweep, main has nothing to give and reclaim takes from the small
    /// FIFO whatever its length (S3-FIFO's "or main is empty").
    pub hand_idle: AtomicUsize,
    /// Unused transparent pages reclaim has come to for staging (relaxed): every
    /// `stage_every`-th is taken, the others are passed over this time.
    pub stage_turn: AtomicUsize,
    /// `Config::stage_every` (`config::DEFAULT_STAGE_EVERY` by default).
    pub stage_every: usize,
    /// `Policy::Frequency` (see `reclaim`, "Policy"): probation pages enter main by
    /// their use count (`PageDesc::freq`, kept per slot while on swap).
    pub freq_on: bool,
    /// The age of the use counts: a count stamped in an older epoch is halved once
    /// per epoch since (see `freq_count`). Moved on by reclaim every
    /// `FREQ_PERIOD` × frames uses counted (relaxed).
    pub freq_epoch: AtomicU32,
    /// Uses reclaim has counted (reference bits seen), ever (relaxed).
    pub freq_uses: AtomicUsize,
    /// Uses counted (`freq_uses` + major faults) when `freq_epoch` last moved.
    pub freq_mark: AtomicUsize,
    /// The use count of the pages the hand takes from main, in sixteenths, as a
    /// moving average: what a probation page must beat to enter main (relaxed). It
    /// starts at one use, so before main has given anything up a page must have
    /// been used twice to enter it (a first pass over new pages, a fill or a scan,
    /// leaves in the order it came, as it would through S3-FIFO).
    pub victim_freq: AtomicU32,
    /// Whether kswapd was asked to run. Protected by itself (the mutex), paired with
    /// `kswapd_wake`.
    pub kswapd_lock: Mutex<bool>,
    pub kswapd_wake: Condvar,
    /// Set once when the Vm is dropped; threads exit when they see it.
    pub shutdown: AtomicBool,
    /// Every live address space (the kernel's mmlist), for swapoff. A space is added
    /// before anything can map a slot into it (fork adds the child before copying)
    /// and drops out when its last handle goes. Protected by its mutex (a leaf).
    pub spaces: Mutex<Vec<Weak<dyn SpaceWalk>>>,
    /// The userfaultfd descriptor of the Vm's transparent regions, once one exists
    /// (set once, then read-only): reclaim write-protects a transparent page through
    /// it before copying it out.
    pub uffd: std::sync::OnceLock<Arc<crate::uffd::Uffd>>,
    /// Transparent pages evicted (their entry `Swapped`, the page gone from the
    /// mapping); relaxed counter, see `Vm::transparent_pages_out`.
    pub transparent_out: AtomicU64,
    /// Non-zero while a process fork must see no transparent page leave its
    /// mapping: how many freezes are held (`Vm::freeze_transparent_eviction`; two
    /// threads may fork at once, and the first to finish must not lift the
    /// second's freeze). `transparent_evicting` counts evictions past that check,
    /// so the freezer can wait for them.
    pub transparent_frozen: AtomicU64,
    pub transparent_evicting: AtomicU64,
    /// Set while an allocation has found nothing to free but pages that look
    /// pinned (`reclaim::stage`): reclaim then evicts those in place, as it did
    /// before it told pinned pages apart, rather than fail the allocation.
    pub evict_pinned: AtomicBool,
    /// Base of the staging area of transparent pages (one page per frame, at
    /// `staging + pfn * PAGE_SIZE`), or 0 without `UFFDIO_MOVE`. Set once, before
    /// the first transparent region exists.
    pub staging: AtomicU64,
    /// Set once a frame has held a page in the arena's own memory (`install`); until
    /// then a transparent page's token frame need not be given back to the kernel.
    pub arena_used: AtomicBool,
    /// Slot references held for forked child processes that may still read those
    /// slots (`mm::transparent_fork`); relaxed counter, for `usermm exec --stats`.
    pub fork_held: AtomicU64,
    /// Pages a forked child read from an ancestor's slot (`mm::transparent_fork`);
    /// relaxed counter.
    pub foreign_reads: AtomicU64,
    /// Device of the most recent failed page-out (for the error of an allocation
    /// that cannot progress because page-out keeps failing). Relaxed atomic.
    pub last_write_error_dev: AtomicU8,
    /// The errno of the most recent failed write-back of a file page, or 0 when the
    /// most recent failed page-out was to a swap device (relaxed): what an
    /// allocation that gives up reports (see `reclaim::alloc_frame`).
    pub last_write_error_file: crate::sync::AtomicI32,
    /// The host files open through `map_file` and `Vm::open`, as the page-I/O
    /// threads see them (preallocated; see `filemap::slots`).
    pub files: crate::filemap::slots::FileSlots,
    /// The probation FIFO (see `reclaim`, "Policy"): `pfn | epoch << 32` of the
    /// pages on probation, pushed at install, popped by reclaim. Lock-free, sized
    /// at start (`4 × small_cap`, at least an eighth of the frames); a page that
    /// finds it full starts in main.
    pub small: crossbeam_queue::ArrayQueue<u64>,
    /// How many pages the small FIFO keeps before reclaim takes from it (10 % of
    /// the frames); 0 with plain CLOCK (`Config::s3fifo(false)`).
    pub small_cap: usize,
    /// S3-FIFO's ghosts: keys (`ghost_key`) of pages evicted from the small FIFO
    /// unused; one per slot of a hash table of `frames / 2` (a later key that hashes
    /// to a slot replaces it). A page faulted in while its ghost is here skips the
    /// small FIFO.
    pub ghost: Box<[AtomicU64]>,
    /// Frames whose page is on probation (`F_SMALL`) but whose entry in the small
    /// FIFO was dropped (reclaim found the frame busy and the FIFO full): the hand
    /// takes them as main pages instead of passing over them. A bit per frame.
    pub orphans: Box<[AtomicU64]>,
    /// Swap-in readahead on (`Config::readahead`).
    pub readahead: bool,
    /// Frames taken by readahead (and transparent read-around) for pages being read,
    /// not yet installed or given back: `alloc_frame` waits for them rather than
    /// report memory full while a read in flight holds them (relaxed atomic).
    pub ra_frames: AtomicUsize,
    /// Stall accounting and pressure triggers (`crate::psi`; atomics on the fault
    /// path, its own leaf mutex elsewhere).
    pub psi: Arc<crate::psi::Psi>,
    /// `Config::speculative_faults`: faults look their region up without the
    /// regions lock (`mm::lookup`). Set at start-up.
    pub speculative: bool,
    /// `Config::fault_lookup_delay` (tests only). Set at start-up.
    pub lookup_delay: std::time::Duration,
    /// `Config::fault_timing`: the swap-in fault's steps, timed (measurements only).
    pub timing: Option<crate::stats::FaultTiming>,
    /// How long a fault's device read polls for its completion (`Config::read_poll`).
    pub read_poll: std::time::Duration,
}

impl Engine {
    /// The staging page of frame `pfn` (see `staging`), if there is a staging area.
    #[inline]
    pub fn staging_addr(&self, pfn: Pfn) -> Option<u64> {
        let base = self.staging.load(Ordering::Relaxed);
        (base != 0).then(|| base + u64::from(pfn.0) * PAGE_SIZE as u64)
    }

    pub fn new(cfg: &Config) -> Result<Engine> {
        cfg.check()?;
        crate::trail::init();
        let n = cfg.frames()?;
        let wm = cfg.resolved_watermarks(n)?;
        let small_cap = match cfg.policy {
            Policy::Clock => 0,
            Policy::S3Fifo => (n / 10).max(1),
            Policy::Frequency => (n / 100).max(1),
        };
        Ok(Engine {
            // Room for bursts of installs (readahead, a fill outrunning reclaim)
            // above the share: a page that finds the FIFO full starts in main.
            small: crossbeam_queue::ArrayQueue::new((4 * small_cap).max(n / 8).clamp(1, n.max(1))),
            freq_on: cfg.policy == Policy::Frequency,
            freq_epoch: AtomicU32::new(0),
            freq_uses: AtomicUsize::new(0),
            freq_mark: AtomicUsize::new(0),
            victim_freq: AtomicU32::new(16),
            small_cap,
            ghost: (0..(n / 2).max(64)).map(|_| AtomicU64::new(0)).collect(),
            orphans: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            readahead: cfg.readahead,
            ra_frames: AtomicUsize::new(0),
            frames: Arc::new(FrameArena::new(n, wm)?),
            rmap: Rmap::default(),
            swap: Arc::new(SwapTable::default()),
            io: PageIo::new(cfg.io_requests, cfg.uring_writes)?,
            cnt: Counters::default(),
            hand: AtomicUsize::new(0),
            hand_idle: AtomicUsize::new(0),
            stage_turn: AtomicUsize::new(0),
            stage_every: cfg.stage_every,
            kswapd_lock: Mutex::new(false),
            kswapd_wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            last_write_error_dev: AtomicU8::new(0),
            last_write_error_file: crate::sync::AtomicI32::new(0),
            uffd: std::sync::OnceLock::new(),
            transparent_out: AtomicU64::new(0),
            transparent_frozen: AtomicU64::new(0),
            evict_pinned: AtomicBool::new(false),
            transparent_evicting: AtomicU64::new(0),
            staging: AtomicU64::new(0),
            arena_used: AtomicBool::new(false),
            fork_held: AtomicU64::new(0),
            foreign_reads: AtomicU64::new(0),
            spaces: Mutex::new(Vec::new()),
            files: crate::filemap::slots::FileSlots::new(cfg.max_files),
            psi: Arc::new(crate::psi::Psi::new()),
            speculative: cfg.speculative_faults,
            lookup_delay: cfg.fault_lookup_delay,
            timing: cfg.fault_timing.then(crate::stats::FaultTiming::default),
            read_poll: cfg.read_poll,
        })
    }

    /// Adds a space to the list swapoff walks (pruning dead ones).
    pub fn register_space(&self, sp: Weak<dyn SpaceWalk>) {
        let mut list = self.spaces.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(sp);
    }

    /// The live spaces, each held by an `Arc` (so none is torn down while walked).
    pub fn live_spaces(&self) -> Vec<Arc<dyn SpaceWalk>> {
        let mut list = self.spaces.lock();
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(|w| w.upgrade()).collect()
    }

    /// Metadata of the engine's parts (page tables are counted by their pool, see
    /// `Vm::stats`).
    pub fn metadata_bytes(&self) -> usize {
        self.small.capacity() * 16
            + self.ghost.len() * 8
            + self.orphans.len() * 8
            + self.frames.metadata_bytes()
            + self.swap.metadata_bytes()
            + self.io.metadata_bytes()
            + self.rmap.metadata_bytes()
            + self.files.metadata_bytes()
    }

    /// Whether a page just read from `dev` keeps its slot there as a clean copy. Not
    /// when the device is being removed — a copy kept there would let reclaim drop
    /// the clean page back onto it and undo swapoff (invariant 3) — nor when swap is
    /// (nearly) full, as the kernel does, so reclaim can write another page there.
    pub fn keeps_swap_copy(&self, dev: &crate::swap::SwapDevice) -> bool {
        dev.is_active() && self.swap.free_slots() >= self.io.capacity() as u64
    }

    /// Records a ghost (see `ghost`): `key` is a page's `ghost_key`.
    pub fn ghost_insert(&self, key: u64) {
        if self.small_cap > 0 {
            self.ghost[ghost_slot(key, self.ghost.len())].store(key, Ordering::Relaxed);
        }
    }

    /// Whether `key`'s ghost is here (taking it out).
    pub fn ghost_take(&self, key: u64) -> bool {
        let hit = self.small_cap > 0
            && self.ghost[ghost_slot(key, self.ghost.len())]
                .compare_exchange(key, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if hit {
            Counters::inc(&self.cnt.ghost_hits);
        }
        hit
    }

    /// The use count a stamp (`PageDesc::freq`, a slot's `freq`) stands for now: its
    /// count (low 4 bits) halved once per epoch since its epoch (high 4 bits). An
    /// epoch 16 or more behind reads as a recent one (the stamp keeps 4 bits of it);
    /// its count has been halved to nothing by then anyway, unless nothing was
    /// stamped for 16 epochs.
    #[inline]
    pub fn freq_count(&self, stamp: u8) -> u32 {
        let age = (self.freq_epoch.load(Ordering::Relaxed) as u8).wrapping_sub(stamp >> 4) & 15;
        u32::from(stamp & 15) >> age.min(4)
    }

    /// The stamp of use count `count` (at most 15) now.
    #[inline]
    pub fn freq_stamp(&self, count: u32) -> u8 {
        ((self.freq_epoch.load(Ordering::Relaxed) as u8 & 15) << 4) | count.min(15) as u8
    }

    /// Marks (`on`) or clears frame `pfn` in `orphans`.
    pub fn set_orphan(&self, pfn: Pfn, on: bool) {
        let (w, b) = (pfn.0 as usize / 64, 1u64 << (pfn.0 % 64));
        if on {
            self.orphans[w].fetch_or(b, Ordering::Relaxed);
        } else if self.orphans[w].load(Ordering::Relaxed) & b != 0 {
            self.orphans[w].fetch_and(!b, Ordering::Relaxed);
        }
    }

    /// Whether frame `pfn` is in `orphans`.
    pub fn is_orphan(&self, pfn: Pfn) -> bool {
        self.orphans[pfn.0 as usize / 64].load(Ordering::Relaxed) & (1 << (pfn.0 % 64)) != 0
    }

    /// Publishes `pfn` (filled) as the page of `pte`, which the caller claimed as
    /// `BUSY` (or holds locked). `swap` is the encoded swap copy it keeps (0 for none);
    /// `dirty` whether it must be written before it can be dropped; `fresh`: a page
    /// coming into memory (a fault), which starts on probation in the small FIFO
    /// (not a copy-on-write copy or swapoff's, nor one whose ghost was here); `uses`:
    /// the page's use count (`PageDesc::freq`) from now.
    pub fn install(
        &self,
        pte: &AtomicU64,
        pfn: Pfn,
        swap: u64,
        dirty: bool,
        fresh: bool,
        uses: u32,
    ) {
        if !self.arena_used.load(Ordering::Relaxed) {
            self.arena_used.store(true, Ordering::Relaxed);
        }
        self.frames
            .desc(pfn)
            .freq
            .store(self.freq_stamp(uses), Ordering::Relaxed);
        self.publish(pte, pfn, swap, dirty, Kind::Anon, fresh);
    }

    /// Publishes `pfn` as the budget token of the transparent page at `addr`, whose
    /// entry `pte` the caller claimed (`BUSY`) and whose bytes it has just mapped
    /// (`UFFDIO_COPY`). As `install`, with the frame marked `F_TRANSPARENT`.
    pub fn install_transparent(
        &self,
        pte: &AtomicU64,
        pfn: Pfn,
        addr: u64,
        swap: u64,
        dirty: bool,
    ) {
        self.publish(pte, pfn, swap, dirty, Kind::Transparent(addr), false);
    }

    /// Publishes `pfn` (filled) as page `index` (`filemap::slots::index`) of a
    /// host file's page cache, at the cache's entry `pte`, which the caller claimed
    /// (`BUSY`). `dirty`: it differs from the file.
    pub fn install_file(&self, pte: &AtomicU64, pfn: Pfn, index: u64, dirty: bool) {
        self.arena_used.store(true, Ordering::Relaxed);
        let fresh = !self.ghost_take(ghost_key_file(index));
        self.frames.desc(pfn).freq.store(0, Ordering::Relaxed);
        self.publish(pte, pfn, 0, dirty, Kind::File(index), fresh);
    }

    fn publish(&self, pte: &AtomicU64, pfn: Pfn, swap: u64, dirty: bool, kind: Kind, fresh: bool) {
        let d = self.frames.desc(pfn);
        // A frame just allocated for this page: mapped by nobody, so nobody can be
        // waiting for it while holding a lock we hold (reclaim only try-locks).
        d.lock_fresh();
        d.swap.store(swap, Ordering::Relaxed);
        match kind {
            Kind::Anon => d.flags.store(F_INUSE, Ordering::Relaxed),
            Kind::Transparent(addr) => {
                d.flags.store(F_INUSE | F_TRANSPARENT, Ordering::Relaxed);
                d.owner2.store(addr as *mut AtomicU64, Ordering::Relaxed);
            }
            Kind::File(index) => {
                d.flags.store(F_INUSE | F_FILE, Ordering::Relaxed);
                d.index.store(index, Ordering::Relaxed);
            }
        }
        if fresh && self.small_cap > 0 {
            let epoch = u64::from(d.epoch.load(Ordering::Relaxed));
            if self.small.push(u64::from(pfn.0) | (epoch << 32)).is_ok() {
                d.flags.fetch_or(F_SMALL, Ordering::Relaxed);
                self.set_orphan(pfn, false);
            }
        }
        self.rmap.add(d, pfn, pte);
        let bits = P_ACCESSED | if dirty { P_DIRTY } else { 0 };
        let epoch = d.epoch.load(Ordering::Relaxed);
        let v = Pte::present(pfn, epoch, bits);
        pte.store(v, Ordering::Release);
        if let Kind::Transparent(addr) = kind {
            crate::trail::note(crate::trail::Op::Install, addr, pfn.0, v);
        }
        // That store ends the claim, or the entry lock of a copy-on-write break.
        crate::pte::released(pte);
        d.unlock();
    }

    /// The counters, with `pt_bytes` of page tables added to the metadata.
    pub fn stats(&self, pt_bytes: usize) -> Stats {
        let c = &self.cnt;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let pool = self.swap.pool();
        let pl = |f: fn(&crate::swap::zpool::PoolCounters) -> &AtomicU64| {
            pool.as_ref().map_or(0, |p| l(f(&p.cnt)))
        };
        Stats {
            zpool_stored: pl(|c| &c.stored),
            zpool_refused: pl(|c| &c.refused) + pl(|c| &c.incompressible),
            zpool_written_back: pl(|c| &c.written_back),
            zpool_writeback_errors: pl(|c| &c.writeback_errors),
            pgfault: l(&c.pgfault),
            pgmajfault: l(&c.pgmajfault),
            wp_faults: l(&c.wp_faults),
            staged: l(&c.staged),
            staged_refaults: l(&c.staged_refaults),
            pinned_skips: l(&c.pinned_skips),
            read_around: l(&c.read_around),
            pswpin: l(&c.pswpin),
            pswpout: l(&c.pswpout),
            pgscan: l(&c.pgscan),
            pgsteal: l(&c.pgsteal),
            direct_reclaim: l(&c.direct_reclaim),
            cow_faults: l(&c.cow_faults),
            write_errors: l(&c.write_errors),
            read_errors: l(&c.read_errors),
            filein: l(&c.filein),
            fileout: l(&c.fileout),
            file_write_errors: l(&c.file_write_errors),
            small_evicted: l(&c.small_evicted),
            small_promoted: l(&c.small_promoted),
            ghost_hits: l(&c.ghost_hits),
            free_frames: self.frames.free_count() as u64,
            total_frames: self.frames.nframes() as u64,
            metadata_bytes: (self.metadata_bytes() + pt_bytes) as u64,
            page_table_bytes: pt_bytes as u64,
            swap_used: self
                .swap
                .all()
                .iter()
                .map(|d| (d.id, d.used_bytes()))
                .collect(),
        }
    }
}
