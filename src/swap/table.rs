//! Swap devices and their slots: the swap table (priorities, striping), the slot
//! allocator, per-slot reference counts and per-slot checksums.
//!
//! Owns: `SwapTable` (every device of a Vm) and per device a `SlotMap`.
//!
//! Slots are handed out a cluster (256 slots, 1 MiB) at a time in increasing order,
//! so page-out of a batch lands sequentially on the device. A slot's count is the
//! number of references: a swapped page-table entry, a resident page's swap copy
//! (`PageDesc::swap`), or a page-out request in flight each hold one; the slot is free
//! at zero. Each written slot records the CRC32C of what was written; a read whose
//! data does not match is an error, never data.
//!
//! A compressed pool (`swap::zpool`) is listed in the table like a device, but no
//! slot is ever allocated on it: it fronts the devices of lower priority. Their
//! `write`/`write_runs` offer each page to it first, `read`/`read_span` look there
//! first (a slot's location word, `zloc`), and `put` drops a freed slot's chunk.
//!
//! ## Discard
//! A slot whose page is gone (an unmap, an exit, a discard of the range, a failed
//! fork's duplicates) is given back to its device; a slot whose page lives on (its
//! copy went stale because the page was written or its page-out failed, or the page
//! came back into memory without keeping it: `put_live`) is freed but kept, as
//! the kernel keeps its swap file's blocks: the page takes a slot again at its next
//! page-out, and giving the space back only to take it again costs. Punching those
//! slots out of a local file (grown over free neighbours to `MIN_FILE_RUN`) made
//! the next writes there allocate blocks again and took the file's inode lock
//! against the page-I/O threads; keeping them raised the bench's uniform 50 %-write
//! cells at W/B 1.25 from 17.7k to 19.9k major faults/s with 1 thread and from
//! 22.3k to 25.7k with 2 (p99 135-209 µs to 109-125), the means of six runs of
//! the old way and five of this alternated with them (`usermm bench --quick
//! --no-kernel --no-transparent --patterns uniform --threads 1,2`; W/B 4: 19.2k to
//! 20.3k and 26.9k to 28.4k). The file holds at most the slots written since their
//! last discard, as the kernel's swap file holds all of them.
//!
//! A slot whose last reference goes otherwise is given back: `put` sets its bit
//! in the device's discard bitmap (one bit per slot, allocated at swapon: unlike a
//! ring of slot numbers it cannot overflow when an unmap frees a million slots at
//! once, and it hands the slots back in order, so adjacent ones merge), and the
//! maintenance thread (`maintain`, "usermm-discard", every 50 ms or when 256 are
//! pending) takes them in batches of up to 1024: it claims each one still free
//! under the map lock (a reference of its own, so the slot cannot be handed out and
//! written while it is discarded), merges adjacent ones into ranges (joined across
//! gaps of up to `MAX_GAP` free slots, and a range shorter than a local file's
//! minimum grown over free neighbours, both claimed the same way: an unmap frees in
//! page order, not slot order, so one batch may hold every other slot of a stretch
//! whose rest an earlier batch took), calls `BlockDevice::discard` once per range
//! (a hole punched in a file, one NBD TRIM) with no lock held, and releases the
//! claims. No request is made per freed page
//! on the freeing path, and nothing is allocated. It also gives a pool's empty
//! frames back to the budget. A device whose discard fails stops being asked.
//!
//! ## Held-back slots
//! A write or discard that fails with its outcome unknown (`device::nbd::
//! outcome_unknown`: an NBD request sent, then a timeout or a lost link) may
//! still be carried out by the server later, after a newer write to the same
//! slot on another or a later connection. Such a slot is held back
//! (`SwapDevice::hold_back`, a bitmap under the map lock): once its references
//! are gone it is free for swapoff's count but never handed out or discarded
//! again while the device is in service, a bounded leak counted in `held_back`.
//!
//! ## Locking
//! `SwapTable::devs` (RwLock): read on every slot operation, written by swapon and
//! at the end of swapoff.
//! `SwapDevice::map` (Mutex): a lock around one device's counts and clusters; nothing
//! allocates under it (all vectors are sized at swapon), and the only lock taken
//! under it is the pool's `Zpool::inner` (a leaf: a freed slot drops its chunk,
//! `put`; a write-back completes, `Lower::unpin`). Checksums are atomics, written by
//! the page-I/O thread that wrote the slot before the slot is published as a page's
//! swap copy. `Shared::front` (RwLock, leaf): which pool fronts the devices; read
//! (an `Arc` clone) by stores, loads and frees, written by swapon/swapoff of the pool.
//! `Shared::maint` (Mutex<bool>, leaf): parks the maintenance thread.

use super::zpool::{Lower, Zpool};
use crate::addr::{SwapEntry, SwapId, PAGE_SIZE};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::pte::Pte;
use crate::sync::{
    Arc, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Condvar, Mutex, Ordering, RwLock,
};
use std::io;
use std::time::{Duration, Instant};

/// Slots per allocation cluster.
pub(crate) const CLUSTER: u64 = 256;
/// At most this many devices (the page-table entry has 6 bits for the device).
pub(crate) const MAX_DEVICES: usize = 64;
/// A device whose last this many page writes all failed is failing: it gets new slots
/// only when no other device has room, or as a probe (below).
pub(crate) const FAILING_AFTER: u64 = 8;
/// A failing device may take one new slot (a probe) this often, so it comes back into
/// service once its writes succeed again.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Queued discards that wake the maintenance thread before its next tick.
const DISCARD_BATCH: usize = 256;
/// The shortest run of free slots punched out of a local swap file (256 KiB; see
/// `SwapDevice::flush_discards`).
const MIN_FILE_RUN: usize = 64;
/// The widest gap of free slots `flush_discards` joins two queued runs across.
const MAX_GAP: u64 = 8;
/// The maintenance thread's tick.
const MAINT_TICK: Duration = Duration::from_millis(50);

/// What the table shares with each of its devices: the pool in front of them and
/// the maintenance thread's parking spot.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The compressed pool in front of the devices below its priority, if one is on.
    /// Protected by its RwLock (a leaf).
    front: RwLock<Option<Arc<Zpool>>>,
    /// Whether the maintenance thread was asked to run (with `wake`; a leaf).
    maint: Mutex<bool>,
    wake: Condvar,
}

impl Shared {
    fn front(&self) -> Option<Arc<Zpool>> {
        self.front.read().clone()
    }

    fn kick(&self) {
        let mut w = self.maint.lock();
        *w = true;
        self.wake.notify_one();
    }
}

/// One device's slot bookkeeping; every field is protected by `SwapDevice::map`.
#[derive(Debug)]
struct SlotMap {
    /// References per slot.
    count: Box<[u16]>,
    /// Slots in use per cluster.
    cluster_used: Box<[u16]>,
    /// Empty clusters not being filled (capacity: all clusters, so pushes never allocate).
    free_clusters: Vec<u32>,
    in_free: Box<[bool]>,
    /// Next slot to try in the cluster being filled, and its end.
    cur: u64,
    cur_end: u64,
    /// Where a scan for free slots in partly used clusters resumes.
    scan: u64,
    used: u64,
    /// Slots held back (one bit per slot, sized at swapon): a write or discard of
    /// theirs failed with its outcome unknown (`SwapDevice::hold_back`). Neither
    /// handed out nor claimed for a discard again; a held slot is counted in
    /// `used` only while references remain.
    held: Box<[u64]>,
}

impl SlotMap {
    fn is_held(&self, slot: u64) -> bool {
        self.held[(slot / 64) as usize] & (1 << (slot % 64)) != 0
    }

    /// Whether `slot` may be handed out or claimed: no reference, not held back.
    fn is_free(&self, slot: u64) -> bool {
        self.count[slot as usize] == 0 && !self.is_held(slot)
    }
}

/// One swap device in service.
#[derive(Debug)]
pub(crate) struct SwapDevice {
    /// Immutable after swapon.
    pub id: SwapId,
    pub dev: Arc<dyn BlockDevice>,
    pub prio: i32,
    pub pages: u64,
    /// Counts and clusters. Protected by this mutex (a leaf: nothing is taken or
    /// allocated under it).
    map: Mutex<SlotMap>,
    /// CRC32C of what was last written to each slot: stored (release) by the thread
    /// that wrote the slot before the slot is published, loaded (acquire) by readers.
    csum: Box<[AtomicU32]>,
    /// The use count of the page in each slot (`PageDesc::freq`, stamped), kept
    /// while the page is out for `Policy::Frequency`. Relaxed: a hint.
    freq: Box<[AtomicU8]>,
    /// Slots in use, readable without `map` (relaxed; exact under it).
    used: AtomicU64,
    /// `DEV_ACTIVE` or `DEV_DRAINING` (swapoff running: no new slots).
    state: AtomicU8,
    /// Page writes that failed in a row (reset by a write that succeeds), counted by
    /// page-out completion (`note_write`). Relaxed atomic: a hint for `alloc`.
    write_fails: AtomicU64,
    /// When a failing device may next take a probe slot, in milliseconds since
    /// `born`. Relaxed atomic; claimed by a CAS so one allocation gets the probe.
    next_probe_ms: AtomicU64,
    born: Instant,
    /// Page-outs queued to this device and not yet completed (reclaim bumps it when
    /// it queues one, completion drops it). Relaxed atomic; swapoff waits for it to
    /// reach zero on the device it drains, not for page-outs to other devices.
    pub inflight: AtomicU64,
    /// Per slot, where its data is when a pool holds it (see `swap::zpool`), else 0.
    /// Set under the pool's lock; cleared under this device's map lock and the pool's.
    zloc: Box<[AtomicU64]>,
    /// The pool in front and the maintenance thread (the table's).
    shared: Arc<Shared>,
    /// Set on the table's entry of a pool itself (no slot is allocated on it).
    pub pool: Option<Arc<Zpool>>,
    /// Freed slots waiting to be discarded: one bit per slot (atomics, sized at
    /// swapon), and how many bits are set (relaxed).
    discards: Box<[AtomicU64]>,
    discard_pending: AtomicUsize,
    /// Slots given back to the device (discarded). Relaxed counter.
    pub discarded: AtomicU64,
    /// Slots held back for good (`hold_back`). Relaxed counter.
    held_back: AtomicU64,
    /// Cleared when the device refuses a discard (it is not asked again), and by
    /// `stop_discards` before the device leaves the table.
    discard_on: AtomicBool,
    /// Held by the maintenance thread across one `flush_discards` (device I/O, no
    /// other lock held); `stop_discards` takes it to wait that flush out, so no hole
    /// is punched in a file after its device was removed (and perhaps swapped on
    /// again, with new pages in those slots). A leaf.
    discard_gate: Mutex<()>,
}

const DEV_ACTIVE: u8 = 0;
const DEV_DRAINING: u8 = 1;

impl SwapDevice {
    fn new(
        id: SwapId,
        dev: Arc<dyn BlockDevice>,
        prio: i32,
        shared: Arc<Shared>,
        pool: Option<Arc<Zpool>>,
    ) -> SwapDevice {
        let pages = dev.pages();
        let nclusters = pages.div_ceil(CLUSTER) as usize;
        let mut free_clusters = Vec::with_capacity(nclusters);
        free_clusters.extend((0..nclusters as u32).rev());
        SwapDevice {
            id,
            prio,
            pages,
            map: Mutex::new(SlotMap {
                count: vec![0; pages as usize].into_boxed_slice(),
                cluster_used: vec![0; nclusters].into_boxed_slice(),
                free_clusters,
                in_free: vec![true; nclusters].into_boxed_slice(),
                cur: 0,
                cur_end: 0,
                scan: 0,
                used: 0,
                held: vec![0; pages.div_ceil(64) as usize].into_boxed_slice(),
            }),
            csum: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            freq: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            used: AtomicU64::new(0),
            state: AtomicU8::new(DEV_ACTIVE),
            write_fails: AtomicU64::new(0),
            next_probe_ms: AtomicU64::new(0),
            born: Instant::now(),
            inflight: AtomicU64::new(0),
            zloc: (0..if pool.is_some() { 0 } else { pages })
                .map(|_| AtomicU64::new(0))
                .collect(),
            shared,
            discards: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            discard_pending: AtomicUsize::new(0),
            discarded: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
            discard_on: AtomicBool::new(pool.is_none()),
            discard_gate: Mutex::new(()),
            pool,
            dev,
        }
    }

    /// Bytes of metadata (counts, checksums, use counts, cluster map).
    pub fn metadata_bytes(&self) -> usize {
        let n = self.pages as usize;
        n * 7
            + self.zloc.len() * 8
            + self.discards.len() * 8 // and as much for the held-back bitmap
            + self.discards.len() * 8
            + n.div_ceil(CLUSTER as usize) * 7
            + self.pool.as_ref().map_or(0, |p| p.metadata_bytes())
    }

    /// The pool in front of this device, if its priority is below the pool's.
    fn front(&self) -> Option<Arc<Zpool>> {
        if self.pool.is_some() {
            return None;
        }
        self.shared.front().filter(|p| p.prio > self.prio)
    }

    /// Offers a page being written to `slot` to the pool in front; true if stored.
    fn pool_store(&self, slot: u64, buf: &[u8]) -> bool {
        if !self.is_active() {
            return false; // draining: its pages go to the device (or elsewhere)
        }
        self.front()
            .is_some_and(|p| p.store(self.id.0, slot, &self.zloc[slot as usize], buf))
    }

    /// Reads `slot` from the pool if it is there (None: read the device).
    fn pool_load(&self, slot: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let z = self.zloc.get(slot as usize)?;
        if z.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.shared.front()?.load(z, buf)
    }

    /// Moves `slot`'s page from the pool to the device, if it is in the pool (for a
    /// forked process that reads the device directly). The caller holds a
    /// reference to the slot. `Error::Device` if the write fails.
    pub fn unpool(&self, slot: u64) -> Result<()> {
        let Some(z) = self.zloc.get(slot as usize) else {
            return Ok(());
        };
        if z.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        match self.shared.front() {
            Some(p) => p
                .write_back_slot(self.id.0, slot, z)
                .map_err(|source| Error::Device {
                    dev: self.dev.name().to_string(),
                    source,
                }),
            None => Ok(()),
        }
    }

    /// Whether `slot`'s data is in the pool now (a hint: write-back may move it).
    pub fn pooled(&self, slot: u64) -> bool {
        self.zloc
            .get(slot as usize)
            .is_some_and(|z| z.load(Ordering::Acquire) != 0)
    }

    pub fn is_active(&self) -> bool {
        self.state.load(Ordering::Acquire) == DEV_ACTIVE
    }

    /// "active" or "draining".
    pub fn state_name(&self) -> &'static str {
        if self.is_active() {
            "active"
        } else {
            "draining"
        }
    }

    /// Stops handing out slots (swapoff begins). False if already draining.
    pub fn begin_drain(&self) -> bool {
        self.state
            .compare_exchange(
                DEV_ACTIVE,
                DEV_DRAINING,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Puts a device back in service after a failed swapoff.
    pub fn end_drain(&self) {
        self.state.store(DEV_ACTIVE, Ordering::Release);
    }

    /// Reads `buf.len() / PAGE_SIZE` consecutive slots from `first` in one request
    /// (no checksum check: see `verify`).
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn read_span(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        crate::lockdep::might_block("device read");
        let dev_err = |source| Error::Device {
            dev: self.dev.name().to_string(),
            source,
        };
        // Slots in the pool before the device read: a page written back meanwhile
        // may have missed the device read, so it is read again on its own.
        let n = buf.len() / PAGE_SIZE;
        let mut pooled = [0u64; 4];
        let track = n <= 256;
        for i in 0..n.min(256) {
            if self.pooled(first + i as u64) {
                pooled[i / 64] |= 1 << (i % 64);
            }
        }
        self.dev.read_pages(first, buf).map_err(dev_err)?;
        for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let was = !track || pooled[i / 64] & (1 << (i % 64)) != 0;
            if !was {
                continue;
            }
            match self.pool_load(first + i as u64, page) {
                Some(r) => r.map_err(dev_err)?,
                None if track => self
                    .dev
                    .read_page(first + i as u64, page)
                    .map_err(dev_err)?,
                None => {}
            }
        }
        Ok(())
    }

    /// Reads slots `slots[i]` (distinct, at most 64) into `buf`, one page each:
    /// slot `i` lands at page `at[i]` (the slots in increasing order), and each run
    /// of adjacent slots comes in one request, all in flight at once where the
    /// device can (`reads_concurrently`). No checksum check.
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn read_gather(&self, slots: &[u64], buf: &mut [u8], at: &mut [usize]) -> Result<()> {
        crate::lockdep::might_block("device read");
        let dev_err = |source| Error::Device {
            dev: self.dev.name().to_string(),
            source,
        };
        let n = slots.len();
        if n > 64 || buf.len() != n * PAGE_SIZE || at.len() != n {
            return Err(dev_err(io::ErrorKind::InvalidInput.into()));
        }
        let mut order = [0u8; 64];
        for (i, o) in order[..n].iter_mut().enumerate() {
            *o = i as u8;
        }
        order[..n].sort_unstable_by_key(|&i| slots[i as usize]);
        let mut runs = [(0u64, 0u32); 64];
        let mut nruns = 0usize;
        // As in `read_span`: slots in the pool before the device read are taken
        // from the pool after it, or read again if they left it meanwhile (bit
        // `rank` for the `rank`-th slot in increasing order).
        let mut pooled = 0u64;
        for (rank, &i) in order[..n].iter().enumerate() {
            let slot = slots[i as usize];
            at[i as usize] = rank;
            if self.pooled(slot) {
                pooled |= 1 << rank;
            }
            match nruns.checked_sub(1).map(|k| &mut runs[k]) {
                Some(r) if r.0 + u64::from(r.1) == slot => r.1 += 1,
                Some(r) if r.0 + u64::from(r.1) > slot => {
                    // Not distinct.
                    return Err(dev_err(io::ErrorKind::InvalidInput.into()));
                }
                _ => {
                    runs[nruns] = (slot, 1);
                    nruns += 1;
                }
            }
        }
        self.dev
            .read_scattered(&runs[..nruns], buf)
            .map_err(dev_err)?;
        for (rank, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if pooled & (1 << rank) == 0 {
                continue;
            }
            let slot = slots[order[rank] as usize];
            match self.pool_load(slot, page) {
                Some(r) => r.map_err(dev_err)?,
                None => self.dev.read_page(slot, page).map_err(dev_err)?,
            }
        }
        Ok(())
    }

    /// Whether page-I/O threads write this device through io_uring
    /// (`write_runs`) where their rings are set up for it: not while a pool
    /// fronts it (its runs then go out through `write_pages`).
    pub fn writes_through_uring(&self) -> bool {
        self.dev.writes_through_uring() && self.front().is_none()
    }

    /// Whether `read_gather` keeps its reads in flight at once.
    pub fn reads_concurrently(&self) -> bool {
        self.dev.reads_concurrently()
    }

    /// The use-count stamp kept for the page in `slot` (0, never used, for a slot
    /// out of range).
    pub fn slot_freq(&self, slot: u64) -> u8 {
        self.freq
            .get(slot as usize)
            .map_or(0, |f| f.load(Ordering::Relaxed))
    }

    /// Keeps use-count stamp `stamp` for the page in `slot`.
    pub fn set_slot_freq(&self, slot: u64, stamp: u8) {
        if let Some(f) = self.freq.get(slot as usize) {
            f.store(stamp, Ordering::Relaxed);
        }
    }

    /// Checks a page read from `slot` against the checksum recorded when it was written.
    pub fn verify(&self, slot: u64, page: &[u8]) -> Result<()> {
        let want = self.csum[slot as usize].load(Ordering::Acquire);
        let got = crc32c::crc32c(page);
        if got != want {
            return Err(Error::Device {
                dev: self.dev.name().to_string(),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "checksum mismatch in slot {slot}: read {got:#010x}, wrote {want:#010x}"
                    ),
                ),
            });
        }
        Ok(())
    }

    /// The CRC32C recorded for what was last written to `slot`.
    pub fn csum_of(&self, slot: u64) -> u32 {
        self.csum[slot as usize].load(Ordering::Acquire)
    }

    /// Records the outcome of one page write (page-out completion, on a page-I/O
    /// thread: atomics only, no allocation, no lock).
    pub fn note_write(&self, ok: bool) {
        if ok {
            // Load first: the common case (healthy) stores nothing.
            if self.write_fails.load(Ordering::Relaxed) != 0 {
                self.write_fails.store(0, Ordering::Relaxed);
            }
        } else if self.write_fails.fetch_add(1, Ordering::Relaxed) + 1 == FAILING_AFTER {
            // Just became failing: the first probe waits a full back-off.
            self.next_probe_ms.store(
                self.now_ms() + PROBE_EVERY.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
    }

    /// Whether the last `FAILING_AFTER` page writes to this device all failed.
    pub fn is_failing(&self) -> bool {
        self.write_fails.load(Ordering::Relaxed) >= FAILING_AFTER
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Whether a new slot should prefer this device: it can take I/O now and its
    /// writes are not failing, or it is failing and its back-off has passed (the
    /// caller's slot is the probe; the next one is allowed `PROBE_EVERY` later).
    fn preferred(&self) -> bool {
        if !self.dev.available() {
            return false;
        }
        if !self.is_failing() {
            return true;
        }
        let now = self.now_ms();
        let at = self.next_probe_ms.load(Ordering::Relaxed);
        now >= at
            && self
                .next_probe_ms
                .compare_exchange(
                    at,
                    now + PROBE_EVERY.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes in use: of slots in use, or for a pool, of the pages it holds.
    pub fn used_bytes(&self) -> u64 {
        match &self.pool {
            Some(p) => p.cnt.pages.load(Ordering::Relaxed) * PAGE_SIZE as u64,
            None => self.used() * PAGE_SIZE as u64,
        }
    }

    /// Bytes given back since swapon: discarded slots, or for a pool, the pages it
    /// dropped because their slots were freed.
    pub fn discarded_bytes(&self) -> u64 {
        let pages = match &self.pool {
            Some(p) => p.cnt.freed.load(Ordering::Relaxed),
            None => self.discarded.load(Ordering::Relaxed),
        };
        pages * PAGE_SIZE as u64
    }

    /// Bytes of budget frames the device holds (a pool's), else 0.
    pub fn memory_bytes(&self) -> u64 {
        self.pool
            .as_ref()
            .map_or(0, |p| (p.frames_held() * PAGE_SIZE) as u64)
    }

    pub fn name(&self) -> &str {
        self.dev.name()
    }

    fn alloc(&self) -> Option<u64> {
        let mut m = self.map.lock();
        if m.used >= self.pages {
            return None;
        }
        let slot = 'found: loop {
            while m.cur < m.cur_end {
                let s = m.cur;
                m.cur += 1;
                if m.is_free(s) {
                    break 'found s;
                }
            }
            if let Some(c) = m.free_clusters.pop() {
                m.in_free[c as usize] = false;
                m.cur = u64::from(c) * CLUSTER;
                m.cur_end = (m.cur + CLUSTER).min(self.pages);
                continue;
            }
            // No empty cluster: take any free slot, scanning from where we left off.
            let start = m.scan;
            let mut s = start;
            let found = loop {
                if m.is_free(s) {
                    break Some(s);
                }
                s = (s + 1) % self.pages;
                if s == start {
                    break None;
                }
            };
            let s = found?;
            m.scan = (s + 1) % self.pages;
            break s;
        };
        m.count[slot as usize] = 1;
        m.used += 1;
        let c = (slot / CLUSTER) as usize;
        m.cluster_used[c] += 1;
        if m.in_free[c] {
            // A scan took a slot of a cluster still listed as empty: unlist it.
            m.in_free[c] = false;
            if let Some(i) = m.free_clusters.iter().position(|&x| x as usize == c) {
                m.free_clusters.swap_remove(i);
            }
        }
        self.used.store(m.used, Ordering::Relaxed);
        Some(slot)
    }

    /// Adds `n` references to a slot in use (copy-on-write shares). False, and
    /// nothing changed, if the count would overflow.
    pub fn dup(&self, slot: u64, n: u32) -> bool {
        let mut m = self.map.lock();
        let c = &mut m.count[slot as usize];
        debug_assert!(*c > 0, "dup of a free slot");
        match u16::try_from(u32::from(*c) + n) {
            Ok(v) => {
                *c = v;
                true
            }
            Err(_) => false,
        }
    }

    /// The reference count of every slot (for the model tests' checks, `crate::model`).
    #[cfg(usermm_shuttle)]
    pub fn slot_counts(&self) -> Vec<u16> {
        self.map.lock().count.to_vec()
    }

    /// Drops one reference on `slot`.
    pub fn put_slot(&self, slot: u64) {
        self.put(slot)
    }

    fn put(&self, slot: u64) {
        if self.put_inner(slot) {
            self.queue_discard(slot);
        }
    }

    /// Drops a reference of a page that lives on (`SwapTable::put_live`): the slot
    /// is free, but not discarded.
    fn put_live(&self, slot: u64) {
        self.put_inner(slot);
    }

    /// Drops a reference; true if the slot became free with its data on the device
    /// (a chunk in the pool is dropped here, under the map lock, so the slot is never
    /// handed out again with its old page's chunk attached).
    fn put_inner(&self, slot: u64) -> bool {
        let mut m = self.map.lock();
        let c = &mut m.count[slot as usize];
        debug_assert!(*c > 0, "free of a free slot {slot}");
        if *c == 0 {
            return false;
        }
        *c -= 1;
        if *c > 0 {
            return false;
        }
        let mut on_device = true;
        if let Some(z) = self.zloc.get(slot as usize) {
            let loc = z.load(Ordering::Acquire);
            if loc != 0 {
                if let Some(p) = self.shared.front() {
                    p.drop_chunk(loc);
                    crate::stats::Counters::inc(&p.cnt.freed);
                }
                z.store(0, Ordering::Release);
                on_device = false;
            }
        }
        m.used -= 1;
        let cl = (slot / CLUSTER) as usize;
        m.cluster_used[cl] -= 1;
        let filling = m.cur_end > 0 && (m.cur_end - 1) / CLUSTER == cl as u64;
        if m.cluster_used[cl] == 0 && !m.in_free[cl] && !filling {
            m.in_free[cl] = true;
            m.free_clusters.push(cl as u32);
        }
        self.used.store(m.used, Ordering::Relaxed);
        // A held slot is free (not in `used`, so swapoff does not wait for it) but
        // never handed out again: nothing to give back either.
        on_device && !m.is_held(slot)
    }

    /// Holds back `n` slots from `first` for as long as the device is in service
    /// (page-I/O threads and the maintenance thread, on a failed write or discard;
    /// takes the map lock). Their write or discard failed with its outcome unknown
    /// (`device::nbd::outcome_unknown`: sent, then a timeout or a lost link): the
    /// server may still carry it out, after a newer write to the slot on another
    /// or a later connection, and no NBD command orders the two. Handing the slot
    /// out again would let that old request overwrite (or trim) a newer page's only
    /// copy, which the checksum would then turn into a lost page. So the slot is
    /// leaked instead, and counted (`held_back`): at most the requests in flight
    /// when a link breaks (64 per connection), and one discard range (discards stop
    /// on the first failure). swapoff does not wait for held slots; a device
    /// swapped on again starts with none.
    pub fn hold_back(&self, first: u64, n: u64) {
        let end = first.saturating_add(n).min(self.pages);
        let mut m = self.map.lock();
        let mut new = 0;
        for s in first..end {
            let (w, b) = ((s / 64) as usize, 1u64 << (s % 64));
            if m.held[w] & b == 0 {
                m.held[w] |= b;
                new += 1;
            }
        }
        drop(m);
        self.held_back.fetch_add(new, Ordering::Relaxed);
    }

    /// Slots held back since swapon (`hold_back`).
    pub fn held_back(&self) -> u64 {
        self.held_back.load(Ordering::Relaxed)
    }

    /// Takes a free slot for a discard: its count becomes 1, so `alloc` passes it
    /// over, but it is not counted in use (`used`, clusters): the claim is the
    /// discarder's, not a page's (`release_claim` gives it back). False if the slot
    /// is in use again.
    fn claim_free(&self, m: &mut SlotMap, slot: u64) -> bool {
        if !m.is_free(slot) {
            return false;
        }
        m.count[slot as usize] = 1;
        true
    }

    /// Gives back a claim of `claim_free`: the slot is free again.
    fn release_claim(m: &mut SlotMap, slot: u64) {
        debug_assert_eq!(m.count[slot as usize], 1);
        m.count[slot as usize] = 0;
    }

    fn queue_discard(&self, slot: u64) {
        if !self.discard_on.load(Ordering::Relaxed) {
            return;
        }
        let bit = 1u64 << (slot % 64);
        let old = self.discards[(slot / 64) as usize].fetch_or(bit, Ordering::Relaxed);
        if old & bit == 0
            && self.discard_pending.fetch_add(1, Ordering::Relaxed) + 1 == DISCARD_BATCH
        {
            self.shared.kick();
        }
    }

    /// No more discards on this device, and none in flight when this returns (swapoff,
    /// before the device leaves the table).
    pub fn stop_discards(&self) {
        self.discard_on.store(false, Ordering::Release);
        drop(self.discard_gate.lock());
    }

    /// Discards the slots queued on this device (the maintenance thread): taken from
    /// the bitmap in slot order, claimed, merged into ranges, one
    /// `BlockDevice::discard` per range.
    fn flush_discards(&self) {
        const MAX: usize = 1024;
        if self.discard_pending.load(Ordering::Relaxed) == 0 {
            return;
        }
        let _gate = self.discard_gate.lock();
        if !self.discard_on.load(Ordering::Acquire) {
            return;
        }
        let mut w = 0;
        while w < self.discards.len() {
            let mut slots = [0u64; MAX];
            let mut n = 0;
            while w < self.discards.len() && n + 64 <= MAX {
                let mut bits = self.discards[w].swap(0, Ordering::Relaxed);
                while bits != 0 {
                    slots[n] = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    n += 1;
                    bits &= bits - 1;
                }
                w += 1;
            }
            if n == 0 {
                continue;
            }
            self.discard_pending.fetch_sub(n, Ordering::Relaxed);
            let mut k = 0;
            {
                let mut m = self.map.lock();
                for i in 0..n {
                    let s = slots[i];
                    if s < self.pages && self.claim_free(&mut m, s) {
                        slots[k] = s;
                        k += 1;
                    }
                }
            }
            // A local file gets only runs of `MIN_FILE_RUN` slots or more: punching a
            // hole takes the file's inode lock against the page-I/O threads' reads
            // and writes and makes the next write there allocate blocks again, and
            // punching the scattered single slots that rewrites free cost 40 % of
            // the bench's 50 %-write cells (81k -> 49k accesses/s at uniform W/B
            // 1.25). Large frees (an unmap, an exit) come as long runs and still
            // give their space back; a network device takes every run (one TRIM
            // each, from this thread).
            let min_run = if self.dev.merges_writes() {
                MIN_FILE_RUN
            } else {
                1
            };
            let mut i = 0;
            while i < k {
                // A run: this batch's slots in a row, joined across small gaps of free
                // slots (claimed here). Frees arrive interleaved (an unmap frees in
                // page order, slots were handed out in page-out order), so a batch may
                // hold every other slot of a stretch whose rest an earlier batch took.
                let mut j = i + 1;
                let mut hi = slots[i] + 1;
                loop {
                    while j < k && slots[j] == hi {
                        hi += 1;
                        j += 1;
                    }
                    if j < k && slots[j] - hi <= MAX_GAP && self.claim_range(hi, slots[j]) {
                        hi = slots[j];
                        continue;
                    }
                    break;
                }
                let mut lo = slots[i];
                // Freed slots the run covers (this batch's and those between them).
                let freed = hi - lo;
                if hi - lo < min_run as u64 {
                    // A short run may be part of a long free one whose other slots an
                    // earlier batch took, or that were free already: claim free
                    // neighbours so the hole covers it. On a busy device the
                    // neighbours are in use and nothing grows.
                    (lo, hi) = self.grow_run(lo, hi, min_run as u64);
                }
                if hi - lo >= min_run as u64 && self.discard_on.load(Ordering::Relaxed) {
                    match self.dev.discard(lo, hi - lo) {
                        Ok(()) => {
                            self.discarded.fetch_add(freed, Ordering::Relaxed);
                        }
                        Err(e) => {
                            // A trim that may still be carried out: its slots are
                            // not handed out again (their claims go below).
                            if crate::device::nbd::outcome_unknown(&e) {
                                self.hold_back(lo, hi - lo);
                            }
                            self.discard_on.store(false, Ordering::Relaxed)
                        }
                    }
                }
                if hi - lo > (j - i) as u64 {
                    // The claims of the free slots taken into the run go (the batch's
                    // own go below).
                    let mut m = self.map.lock();
                    let mut b = i;
                    for s in lo..hi {
                        if b < j && slots[b] == s {
                            b += 1;
                            continue;
                        }
                        Self::release_claim(&mut m, s);
                    }
                }
                i = j;
            }
            if k > 0 {
                // The claims go; the slots are free again.
                let mut m = self.map.lock();
                for &s in &slots[..k] {
                    Self::release_claim(&mut m, s);
                }
            }
        }
    }

    /// Claims the slots of `[a, b)` if every one is free; claims none otherwise.
    fn claim_range(&self, a: u64, b: u64) -> bool {
        let mut m = self.map.lock();
        if (a..b).any(|s| !m.is_free(s)) {
            return false;
        }
        for s in a..b {
            self.claim_free(&mut m, s);
        }
        true
    }

    /// Grows the run of claimed slots `[lo, hi)` over free neighbours (claiming
    /// them), at most `4 * min` slots each way, and returns the grown run. If it does
    /// not reach `min` slots the neighbours' claims are given back and `[lo, hi)`
    /// returned unchanged.
    fn grow_run(&self, lo: u64, hi: u64, min: u64) -> (u64, u64) {
        let mut m = self.map.lock();
        let (mut a, mut b) = (lo, hi);
        while a > 0 && lo - a < 4 * min && self.claim_free(&mut m, a - 1) {
            a -= 1;
        }
        while b < self.pages && b - hi < 4 * min && self.claim_free(&mut m, b) {
            b += 1;
        }
        if b - a >= min {
            return (a, b);
        }
        for s in (a..lo).chain(hi..b) {
            Self::release_claim(&mut m, s);
        }
        (lo, hi)
    }

    /// Writes a page to `slot` and records its checksum.
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn write(&self, slot: u64, buf: &[u8]) -> io::Result<()> {
        crate::lockdep::might_block("device write");
        let sum = crc32c::crc32c(buf);
        if !self.pool_store(slot, buf) {
            if let Err(e) = self.dev.write_page(slot, buf) {
                if crate::device::nbd::outcome_unknown(&e) {
                    self.hold_back(slot, 1);
                }
                return Err(e);
            }
        }
        self.csum[slot as usize].store(sum, Ordering::Release);
        Ok(())
    }

    /// Writes runs of consecutive slots, `runs[k] = (first, count)`, their pages
    /// taken from `bufs` in order (at most 64 in all), each in one request where
    /// the device merges and all in flight at once where it writes through
    /// io_uring; records the checksums of the runs written and says in `ok[k]`
    /// whether run `k` was.
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn write_runs(&self, runs: &[(u64, u32)], bufs: &[&[u8]], ok: &mut [bool]) {
        crate::lockdep::might_block("device write");
        if self.front().is_none() {
            self.dev.write_runs(runs, bufs, ok);
        } else {
            crate::device::each_run(runs, bufs, ok, |first, b, o| {
                *o = self.write_run_fronted(first, b).is_ok()
            });
        }
        // The checksums of the runs written.
        crate::device::each_run(runs, bufs, ok, |first, b, o| {
            if *o {
                for (i, b) in b.iter().enumerate() {
                    let sum = crc32c::crc32c(b);
                    self.csum[(first + i as u64) as usize].store(sum, Ordering::Release);
                }
            }
        });
    }

    /// Writes one run where a pool fronts the device: pages the pool takes leave
    /// holes; the rest go out as runs.
    fn write_run_fronted(&self, first: u64, bufs: &[&[u8]]) -> io::Result<()> {
        let mut i = 0;
        while i < bufs.len() {
            let mut j = i;
            while j < bufs.len() && !self.pool_store(first + j as u64, bufs[j]) {
                j += 1;
            }
            if j > i {
                if let Err(e) = self.dev.write_pages(first + i as u64, &bufs[i..j]) {
                    if crate::device::nbd::outcome_unknown(&e) {
                        self.hold_back(first + i as u64, (j - i) as u64);
                    }
                    return Err(e);
                }
            }
            i = j + 1; // page `j`, if any, is in the pool
        }
        Ok(())
    }

    /// Reads `slot` into `buf` and checks it against the recorded checksum.
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn read(&self, slot: u64, buf: &mut [u8]) -> Result<()> {
        self.read_unchecked(slot, buf)?;
        self.verify(slot, buf)
    }

    /// Reads `slot` into `buf` (from the pool if it holds the slot) without the
    /// checksum check (`verify`).
    #[cfg_attr(feature = "lockdep", track_caller)]
    pub fn read_unchecked(&self, slot: u64, buf: &mut [u8]) -> Result<()> {
        crate::lockdep::might_block("device read");
        let dev_err = |source| Error::Device {
            dev: self.dev.name().to_string(),
            source,
        };
        match self.pool_load(slot, buf) {
            Some(r) => r.map_err(dev_err),
            None => self.dev.read_page(slot, buf).map_err(dev_err),
        }
    }
}

/// Why no slot could be had.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum NoSlot {
    /// There is no swap device at all.
    NoDevice,
    /// Every device is full.
    Full,
}

/// Every swap device of a Vm.
#[derive(Debug)]
pub(crate) struct SwapTable {
    /// Indexed by `SwapId`; `None` where a device was removed (ids are reused).
    /// Read-locked by every slot operation (reclaim and page-I/O included),
    /// write-locked only to publish or remove a device, with nothing allocated under
    /// it: the vector's capacity is `MAX_DEVICES` from the start and a device's slot
    /// map is built before the lock is taken (docs/design.md invariant 4).
    devs: RwLock<Vec<Option<Arc<SwapDevice>>>>,
    /// Round-robin cursor for striping equal priorities (relaxed atomic).
    rr: AtomicUsize,
    /// The pool in front and the maintenance thread's parking spot, shared with
    /// every device.
    shared: Arc<Shared>,
}

impl Default for SwapTable {
    fn default() -> SwapTable {
        SwapTable {
            devs: RwLock::new(Vec::with_capacity(MAX_DEVICES)),
            rr: AtomicUsize::new(0),
            shared: Arc::default(),
        }
    }
}

impl SwapTable {
    pub fn add(&self, dev: Arc<dyn BlockDevice>, prio: i32) -> Result<SwapId> {
        self.add_inner(dev, prio, None)
    }

    /// Puts a compressed pool in front of the devices below `pool.prio`. One pool
    /// per table.
    pub fn add_pool(self: &Arc<Self>, pool: Arc<Zpool>) -> Result<SwapId> {
        let lower: std::sync::Weak<dyn Lower> = Arc::downgrade(self) as _;
        pool.set_lower(lower);
        let busy = |p: &Zpool| {
            Error::Config(format!(
                "a zpool is on already ({}); a Vm has at most one",
                BlockDevice::name(p)
            ))
        };
        if let Some(p) = self.shared.front() {
            return Err(busy(&p));
        }
        // `front` is a leaf: not held across `add_inner` (which takes `devs`).
        let id = self.add_inner(pool.clone(), pool.prio, Some(pool.clone()))?;
        let mut front = self.shared.front.write();
        if let Some(p) = front.clone() {
            drop(front);
            self.remove(id);
            return Err(busy(&p));
        }
        *front = Some(pool);
        Ok(id)
    }

    fn add_inner(
        &self,
        dev: Arc<dyn BlockDevice>,
        prio: i32,
        pool: Option<Arc<Zpool>>,
    ) -> Result<SwapId> {
        if dev.pages() == 0 || dev.pages() >= (1 << 40) {
            return Err(Error::Config(format!(
                "device {} has {} pages; usable sizes are 1 page to 4 PiB",
                dev.name(),
                dev.pages()
            )));
        }
        loop {
            // Pick an id under the read lock, build the device (its slot map is the
            // allocation) with no lock held, publish it under the write lock if the
            // id is still free; another swapon that took it meanwhile means a retry.
            let i = {
                let devs = self.devs.read();
                match devs.iter().position(|d| d.is_none()) {
                    Some(i) => i,
                    None if devs.len() < MAX_DEVICES => devs.len(),
                    None => return Err(Error::TooManyDevices(MAX_DEVICES)),
                }
            };
            let id = SwapId(i as u8);
            let sd = Arc::new(SwapDevice::new(
                id,
                dev.clone(),
                prio,
                self.shared.clone(),
                pool.clone(),
            ));
            let mut devs = self.devs.write();
            if i == devs.len() {
                debug_assert!(devs.len() < devs.capacity(), "reserved at MAX_DEVICES");
                devs.push(Some(sd));
                return Ok(id);
            }
            if devs[i].is_none() {
                devs[i] = Some(sd);
                return Ok(id);
            }
        }
    }

    /// Takes a device out of the table (after swapoff drained it; a pool after it
    /// wrote everything back).
    pub fn remove(&self, id: SwapId) {
        let mut devs = self.devs.write();
        if let Some(d) = devs.get_mut(id.0 as usize) {
            if let Some(p) = d.as_ref().and_then(|d| d.pool.as_ref()) {
                let mut front = self.shared.front.write();
                if front.as_ref().is_some_and(|f| Arc::ptr_eq(f, p)) {
                    *front = None;
                }
            }
            *d = None;
        }
    }

    /// Body of the maintenance thread ("usermm-discard"): drains the discard rings
    /// and gives a pool's empty frames back, every `MAINT_TICK` or when a ring fills
    /// to `DISCARD_BATCH`, until `stop` is set.
    pub fn maintain(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::Acquire) {
            {
                let mut w = self.shared.maint.lock();
                if !*w {
                    self.shared.wake.wait_for(&mut w, MAINT_TICK);
                }
                *w = false;
            }
            self.maintain_once();
        }
    }

    /// One round of the maintenance thread's work.
    pub fn maintain_once(&self) {
        for d in self.all() {
            d.flush_discards();
        }
        if let Some(p) = self.shared.front() {
            p.reap();
        }
    }

    /// Wakes the maintenance thread (a Vm being dropped).
    pub fn kick_maintenance(&self) {
        self.shared.kick();
    }

    /// The pool in front of the devices, if one is on.
    pub fn pool(&self) -> Option<Arc<Zpool>> {
        self.shared.front()
    }

    pub fn get(&self, id: u8) -> Option<Arc<SwapDevice>> {
        self.devs.read().get(id as usize).cloned().flatten()
    }

    pub fn all(&self) -> Vec<Arc<SwapDevice>> {
        self.devs.read().iter().flatten().cloned().collect()
    }

    /// Free slots on the active devices.
    pub fn free_slots(&self) -> u64 {
        self.devs
            .read()
            .iter()
            .flatten()
            .filter(|d| d.is_active() && d.pool.is_none())
            .map(|d| (d.pages - d.used()).saturating_sub(d.held_back()))
            .sum()
    }

    pub fn metadata_bytes(&self) -> usize {
        self.devs
            .read()
            .iter()
            .flatten()
            .map(|d| d.metadata_bytes())
            .sum()
    }

    /// Takes a free slot: from the highest-priority active devices with room,
    /// round-robin among equals. The slot comes with one reference.
    ///
    /// Devices that cannot take I/O now (a server reconnecting) or whose writes keep
    /// failing (`SwapDevice::is_failing`) are used only when no other device, of any
    /// priority, has room: sending page-out there only turns it into failed writes
    /// while a working device could store the page. A failing device still gets one
    /// slot per `PROBE_EVERY` in the first pass, so a write there shows when it works
    /// again (a success resets its failure count). No allocation: page-out and
    /// swapoff call this with frame locks held.
    pub fn alloc(&self) -> std::result::Result<SwapEntry, NoSlot> {
        let devs = self.devs.read();
        // A pool holds no slots of its own: it is never allocated from.
        let active = |d: &&Arc<SwapDevice>| d.is_active() && d.pool.is_none();
        if !devs.iter().flatten().any(|d| active(&d)) {
            return Err(NoSlot::NoDevice);
        }
        let n = devs.len();
        let turn = self.rr.fetch_add(1, Ordering::Relaxed);
        for preferred_only in [true, false] {
            let mut best_tried = i32::MAX;
            // The highest priority below the ones already exhausted.
            while let Some(p) = devs
                .iter()
                .flatten()
                .filter(active)
                .map(|d| d.prio)
                .filter(|&p| p < best_tried)
                .max()
            {
                for k in 0..n {
                    let Some(d) = &devs[(turn + k) % n] else {
                        continue;
                    };
                    // The second pass tries every device (one that had room in the
                    // first was taken then; a state that changed meanwhile does not
                    // make a device with room look full).
                    if d.prio == p && active(&d) && (!preferred_only || d.preferred()) {
                        if let Some(slot) = d.alloc() {
                            return Ok(SwapEntry { dev: d.id.0, slot });
                        }
                    }
                }
                best_tried = p;
            }
        }
        Err(NoSlot::Full)
    }

    /// Records the outcome of a page write to device `dev` (see
    /// `SwapDevice::note_write`).
    /// A page-out to `dev` was queued (counted until `page_out_done`).
    pub fn page_out_begun(&self, dev: u8) {
        if let Some(Some(d)) = self.devs.read().get(dev as usize) {
            d.inflight.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A page-out to `dev` completed, its write having succeeded (`ok`) or not: one
    /// lookup for both the in-flight count and the run of failures.
    pub fn page_out_done(&self, dev: u8, ok: bool) {
        if let Some(Some(d)) = self.devs.read().get(dev as usize) {
            d.note_write(ok);
            d.inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drops one reference on a slot.
    pub fn put(&self, e: SwapEntry) {
        if let Some(Some(d)) = self.devs.read().get(e.dev as usize) {
            d.put(e.slot);
        }
    }

    /// `f` on the device and slot of encoded entry `v`; None if `v` is not a swap
    /// entry or names no device.
    fn on_encoded<R>(&self, v: u64, f: impl FnOnce(&SwapDevice, u64) -> R) -> Option<R> {
        let Pte::Swapped(e) = Pte::decode(v) else {
            return None;
        };
        let devs = self.devs.read();
        let d = devs.get(e.dev as usize)?.as_ref()?;
        Some(f(d, e.slot))
    }

    /// Adds `n` references to the slot of an encoded entry.
    pub fn dup_encoded(&self, v: u64, n: u32) -> bool {
        self.on_encoded(v, |d, slot| d.dup(slot, n))
            .unwrap_or(false)
    }

    /// Keeps use-count stamp `stamp` for the page going to (or staying in) the slot
    /// of encoded entry `v`.
    pub fn set_slot_freq(&self, v: u64, stamp: u8) {
        self.on_encoded(v, |d, slot| d.set_slot_freq(slot, stamp));
    }

    /// Drops the reference held by an encoded entry (`PageDesc::swap`), if any.
    pub fn put_encoded(&self, v: u64) {
        if let Pte::Swapped(e) = Pte::decode(v) {
            self.put(e);
        }
    }

    /// Drops one reference on a slot whose page lives on: its copy went stale (the
    /// page was written, or its page-out failed) or the page came back into memory
    /// without keeping it. The slot is free, but it is not discarded: the page
    /// takes a slot again at its next page-out, and giving the space back only to
    /// take it again costs (see "Discard" above).
    pub fn put_live(&self, e: SwapEntry) {
        if let Some(Some(d)) = self.devs.read().get(e.dev as usize) {
            d.put_live(e.slot);
        }
    }

    /// `put_live` of an encoded entry (`PageDesc::swap`), if any.
    pub fn put_encoded_live(&self, v: u64) {
        if let Pte::Swapped(e) = Pte::decode(v) {
            self.put_live(e);
        }
    }
}

/// Write-back from the pool to the slots it caches.
impl Lower for SwapTable {
    fn pin(&self, dev: u8, slot: u64, loc: u64) -> bool {
        let Some(d) = self.get(dev) else { return false };
        let Some(z) = d.zloc.get(slot as usize) else {
            return false;
        };
        let mut m = d.map.lock();
        let c = &mut m.count[slot as usize];
        if *c == 0 || *c == u16::MAX || z.load(Ordering::Acquire) != loc {
            return false;
        }
        *c += 1;
        true
    }

    fn write_back(&self, dev: u8, slot: u64, page: &[u8]) -> io::Result<()> {
        let d = self
            .get(dev)
            .ok_or_else(|| io::Error::other("the device is gone"))?;
        let r = d.dev.write_page(slot, page);
        d.note_write(r.is_ok());
        if let Err(e) = &r {
            if crate::device::nbd::outcome_unknown(e) {
                d.hold_back(slot, 1);
            }
        }
        r
    }

    fn unpin(&self, dev: u8, slot: u64, loc: u64, written: bool) {
        let Some(d) = self.get(dev) else { return };
        if written {
            let m = d.map.lock();
            let z = &d.zloc[slot as usize];
            if z.load(Ordering::Acquire) == loc {
                if let Some(p) = self.shared.front() {
                    p.drop_chunk(loc);
                }
                z.store(0, Ordering::Release);
            }
            drop(m);
        }
        d.put(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::file::FileDevice;

    fn dev(pages: u64) -> (tempfile::TempDir, Arc<dyn BlockDevice>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let f = FileDevice::open(&p, Some(pages * 4096), "t").unwrap();
        (d, Arc::new(f))
    }

    #[test]
    fn slots_are_sequential_and_recycled() {
        let (_d, dv) = dev(600);
        let t = SwapTable::default();
        t.add(dv, 0).unwrap();
        let a: Vec<_> = (0..300).map(|_| t.alloc().unwrap().slot).collect();
        assert_eq!(a[..256], (0..256).collect::<Vec<_>>()[..]);
        let mut all = a.clone();
        while let Ok(e) = t.alloc() {
            all.push(e.slot);
        }
        assert_eq!(all.len(), 600);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 600, "a slot was handed out twice");
        assert_eq!(t.alloc(), Err(NoSlot::Full));
        t.put(SwapEntry { dev: 0, slot: 7 });
        assert_eq!(t.alloc().unwrap().slot, 7);
    }

    /// A device whose writes to slot 0 and whose discards fail with their outcome
    /// unknown (as an NBD timeout does).
    #[derive(Debug)]
    struct Unsure;

    impl BlockDevice for Unsure {
        fn name(&self) -> &str {
            "unsure"
        }
        fn pages(&self) -> u64 {
            256
        }
        fn read_page(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
            Ok(())
        }
        fn write_page(&self, slot: u64, _: &[u8]) -> io::Result<()> {
            match slot {
                0 => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
                1 => Err(io::Error::from_raw_os_error(libc::EIO)),
                _ => Ok(()),
            }
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ECONNRESET))
        }
    }

    /// A slot whose write (or discard) may still land is never handed out again,
    /// and does not count as used (swapoff does not wait for it); a plain failed
    /// write gives its slot back.
    #[test]
    fn slots_of_uncertain_writes_and_discards_are_held_back() {
        let t = SwapTable::default();
        t.add(Arc::new(Unsure), 0).unwrap();
        let s = t.get(0).unwrap();
        let buf = [0u8; PAGE_SIZE];
        let a = t.alloc().unwrap();
        let b = t.alloc().unwrap();
        assert_eq!((a.slot, b.slot), (0, 1));
        assert!(s.write(0, &buf).is_err());
        assert!(s.write(1, &buf).is_err());
        t.put_live(a);
        t.put_live(b);
        assert_eq!(s.used(), 0);
        assert_eq!(s.held_back(), 1);
        // Slots 2..10 freed for good: their discard fails with its outcome unknown.
        let gone: Vec<_> = (2..10).map(|_| t.alloc().unwrap()).collect();
        for e in gone {
            t.put(e);
        }
        s.flush_discards();
        assert_eq!(s.held_back(), 9, "the discarded run is held back too");
        assert_eq!(t.free_slots(), 256 - 9);
        let mut got = Vec::new();
        while let Ok(e) = t.alloc() {
            got.push(e.slot);
        }
        assert_eq!(got.len(), 256 - 9);
        assert!(got.contains(&1), "a plain failed write gives its slot back");
        for held in [0, 2, 9] {
            assert!(
                !got.contains(&held),
                "held-back slot {held} handed out again"
            );
        }
    }

    #[test]
    fn priorities_and_striping() {
        let (_a, da) = dev(256);
        let (_b, db) = dev(256);
        let (_c, dc) = dev(256);
        let t = SwapTable::default();
        t.add(da, 0).unwrap();
        t.add(db, 5).unwrap();
        t.add(dc, 5).unwrap();
        let mut per = [0; 3];
        for _ in 0..512 {
            per[t.alloc().unwrap().dev as usize] += 1;
        }
        assert_eq!(per, [0, 256, 256]);
        assert_eq!(t.alloc().unwrap().dev, 0);
        assert_eq!(SwapTable::default().alloc(), Err(NoSlot::NoDevice));
    }

    #[test]
    fn failing_device_is_avoided_then_probed() {
        let (_a, da) = dev(512);
        let (_b, db) = dev(512);
        let t = SwapTable::default();
        t.add(da, 5).unwrap();
        t.add(db, 0).unwrap();
        assert_eq!(t.alloc().unwrap().dev, 0);
        for _ in 0..FAILING_AFTER - 1 {
            t.get(0).unwrap().note_write(false);
        }
        assert_eq!(
            t.alloc().unwrap().dev,
            0,
            "failing only after FAILING_AFTER"
        );
        t.get(0).unwrap().note_write(false);
        // Failing: even a lower priority with room comes first.
        for _ in 0..100 {
            assert_eq!(t.alloc().unwrap().dev, 1);
        }
        // Past the back-off, one probe slot, then the lower priority again.
        std::thread::sleep(PROBE_EVERY + Duration::from_millis(50));
        assert_eq!(t.alloc().unwrap().dev, 0, "probe");
        assert_eq!(t.alloc().unwrap().dev, 1);
        // No other room: the failing device is still used.
        while t.get(1).unwrap().used() < 512 {
            t.alloc().unwrap();
        }
        assert_eq!(t.alloc().unwrap().dev, 0);
        // A write that succeeds puts it back in front.
        t.put(SwapEntry { dev: 1, slot: 3 });
        t.get(0).unwrap().note_write(true);
        assert_eq!(t.alloc().unwrap().dev, 0);
        assert_eq!(t.alloc().unwrap().dev, 0);
    }

    /// A table of one 1024-slot file device with 512 slots taken and written
    /// (their entries returned, the file flushed), and a reader of the bytes
    /// the file has allocated.
    fn half_written() -> (
        tempfile::TempDir,
        SwapTable,
        Vec<SwapEntry>,
        impl Fn() -> u64,
    ) {
        use std::os::unix::fs::MetadataExt;
        let (d, dv) = dev(1024);
        let path = d.path().join("s");
        let t = SwapTable::default();
        t.add(dv, 0).unwrap();
        let s = t.get(0).unwrap();
        let mut buf = crate::device::AlignedPages::new(1).unwrap();
        buf.page_mut(0).fill(7);
        let slots: Vec<_> = (0..512)
            .map(|_| {
                let e = t.alloc().unwrap();
                s.write(e.slot, buf.page(0)).unwrap();
                e
            })
            .collect();
        s.dev.flush().unwrap();
        let blocks = move || std::fs::metadata(&path).unwrap().blocks() * 512;
        (d, t, slots, blocks)
    }

    /// A slot freed while its page lives on (`put_live`: a stale copy, a page back
    /// in memory) keeps its blocks; the same slots freed because their pages are
    /// gone are punched.
    #[test]
    fn live_frees_keep_their_blocks_and_gone_frees_do_not() {
        let (_d, t, slots, blocks) = half_written();
        let s = t.get(0).unwrap();
        let mut buf = crate::device::AlignedPages::new(1).unwrap();
        buf.page_mut(0).fill(9);
        let before = blocks();
        for &e in &slots {
            t.put_live(e);
        }
        s.flush_discards();
        assert_eq!(blocks(), before, "live frees punched holes");
        assert_eq!(s.discarded_bytes(), 0);
        assert_eq!(s.used(), 0, "live frees free their slots");
        // Taken again and freed for good: punched.
        for _ in 0..512 {
            let e = t.alloc().unwrap();
            s.write(e.slot, buf.page(0)).unwrap();
            t.put(e);
        }
        s.flush_discards();
        assert!(
            before - blocks() >= 256 * 4096,
            "{} of {before} bytes still allocated after gone frees",
            blocks()
        );
        assert!(s.discarded_bytes() >= 256 * 4096);
    }

    /// An unmap frees slots in page order, which is not slot order: a batch of the
    /// discard thread may hold every other slot of a stretch and the next batch the
    /// rest. Each batch's runs are one slot long; the stretch must still be punched.
    #[test]
    fn interleaved_frees_are_punched() {
        let (_d, t, _, blocks) = half_written();
        let s = t.get(0).unwrap();
        let before = blocks();
        for parity in [1, 0] {
            for slot in (parity..512).step_by(2) {
                t.put(SwapEntry { dev: 0, slot });
            }
            s.flush_discards();
        }
        let after = blocks();
        // The file is preallocated (1024 slots); the 512 written ones must be holes.
        assert!(before >= 1024 * 4096, "{before} bytes allocated");
        assert!(
            before - after >= 512 * 4096,
            "{after} of {before} bytes still allocated after 512 slots were freed"
        );
        // Counted: the freed slots each punch covered (not the grown edges).
        let n = s.discarded_bytes() / 4096;
        assert!((500..=512).contains(&n), "{n} slots counted discarded");
        // The claims were all given back.
        assert_eq!(s.used(), 0);
        let got: Vec<_> = (0..1024).map(|_| t.alloc().unwrap().slot).collect();
        assert_eq!(got.len(), 1024);
    }

    #[test]
    fn checksum_mismatch_is_an_error() {
        let (_d, dv) = dev(4);
        let t = SwapTable::default();
        t.add(dv.clone(), 0).unwrap();
        let d = t.get(0).unwrap();
        let mut buf = crate::device::AlignedPages::new(1).unwrap();
        buf.page_mut(0).fill(7);
        d.write(1, buf.page(0)).unwrap();
        d.read(1, buf.page_mut(0)).unwrap();
        buf.page_mut(0)[3] = 8;
        dv.write_page(1, buf.page(0)).unwrap();
        assert!(matches!(
            d.read(1, buf.page_mut(0)),
            Err(Error::Device { .. })
        ));
    }
}
