//! The public layer: `Vm` (a budget, swap devices, background threads) and
//! `AddressSpace` (regions of virtual memory in it), plus the page guards.
//!
//! Both are cheap `Arc` handles, `Send + Sync`; every call may come from any thread.
//! The threads a Vm starts (the background reclaimer and the page-I/O threads) run
//! until the last handle of the Vm and of its spaces is dropped.

use crate::addr::{Pfn, SwapId, VAddr, PAGE_SIZE};
use crate::config::Config;
use crate::device::spec::{SwapKind, SwapSpec};
use crate::device::BlockDevice;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::filemap::inode::{FileTable, Inode};
use crate::mm::fault::Want;
use crate::mm::pagetable::LeafPool;
use crate::mm::region::{Region, Share};
use crate::mm::space::SpaceInner;
use crate::stats::{Stats, SwapInfo};
use crate::sync::EngineSpawn;
use crate::sync::{Arc, AtomicU64, Mutex, Weak};
use std::marker::PhantomData;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug)]
struct VmInner {
    eng: Arc<Engine>,
    /// Leaves of every page table of this Vm (type-stable, recycled); counts the
    /// bytes of all page-table nodes.
    leaves: Arc<LeafPool>,
    /// The background reclaimer and the page-I/O threads, joined on drop. Protected by
    /// its mutex (a leaf; taken only at start and drop).
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The userfaultfd host of transparent regions, made with the first one.
    /// Protected by its mutex (a leaf; taken by `map_transparent` and drop).
    transparent: Mutex<Option<Arc<crate::mm::transparent::Host>>>,
    /// The host files open through `map_file` and `open` (see `filemap::inode`).
    files: Arc<FileTable>,
}

impl VmInner {
    /// The inode of `path` (one page cache per file), recovering its journal when
    /// it is opened afresh.
    fn open_inode(&self, path: &Path) -> Result<Arc<Inode>> {
        self.files.open(
            &self.eng,
            &self.leaves,
            path,
            &crate::mm::msync::recover_on_open,
        )
    }
}

impl Drop for VmInner {
    fn drop(&mut self) {
        // Every transparent region holds the Vm, so none is left: stop its handler.
        if let Some(h) = self.transparent.get_mut().take() {
            h.shutdown();
        }
        self.eng
            .shutdown
            .store(true, crate::sync::Ordering::Release);
        crate::reclaim::wake_kswapd(&self.eng);
        self.eng.swap.kick_maintenance();
        self.eng.io.shutdown();
        self.eng.psi.stop();
        // Threads finish their current request and exit. One stuck in a device that
        // never answers must not hang the last `drop`: after the bound it is left
        // to finish on its own (it holds its own `Arc` of the engine, so nothing it
        // touches goes away).
        let threads: Vec<JoinHandle<()>> = self.threads.get_mut().drain(..).collect();
        crate::sync::wait_until_for(Duration::from_secs(10), || {
            threads.iter().all(|t| t.is_finished())
        });
        for t in threads {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// A virtual memory manager: a hard budget of page frames and the swap devices
/// behind it. Clone it freely; it is a handle.
#[derive(Clone, Debug)]
pub struct Vm {
    inner: Arc<VmInner>,
}

impl Vm {
    /// Maps the frame arena and the page-out pool and starts the background
    /// reclaimer and the page-I/O threads (none under the model checker's
    /// `--cfg usermm_shuttle`: see `sync`).
    ///
    /// Errors: `Error::Config` for a budget under 64 KiB (16 frames) or bad
    /// watermarks, thread counts or pool sizes; `Error::Io` if memory cannot be mapped
    /// or a thread cannot start.
    pub fn new(cfg: Config) -> Result<Vm> {
        let eng = Arc::new(Engine::new(&cfg)?);
        #[cfg(not(usermm_shuttle))]
        let threads = Self::start_threads(&eng, &cfg)?;
        // Under the model checker the engine's threads would be OS threads using
        // shuttle's primitives outside a schedule: none starts, and a model test
        // runs their work from threads of its own (`crate::model`).
        #[cfg(usermm_shuttle)]
        let threads = Vec::new();
        Ok(Vm {
            inner: Arc::new(VmInner {
                eng,
                leaves: Arc::new(LeafPool::new()),
                threads: Mutex::new(threads),
                transparent: Mutex::new(None),
                files: Arc::new(FileTable::default()),
            }),
        })
    }

    /// Starts the page-I/O threads, the discard thread, the background reclaimer
    /// (unless turned off) and the pressure thread. (Not called under the model
    /// checker, but built: what it starts stays checked by the compiler there.)
    #[cfg_attr(usermm_shuttle, allow(dead_code))]
    fn start_threads(eng: &Arc<Engine>, cfg: &Config) -> Result<Vec<JoinHandle<()>>> {
        let mut threads = Vec::new();
        for i in 0..cfg.io_threads {
            let e = eng.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("usermm-pageio-{i}"))
                    .spawn_engine(move || {
                        crate::sync::mark_engine_thread();
                        e.io.run(&|req| crate::reclaim::complete_writeback(&e, req))
                    })?,
            );
        }
        {
            let e = eng.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("usermm-discard".into())
                    .spawn_engine(move || {
                        crate::sync::mark_engine_thread();
                        e.swap.maintain(&e.shutdown)
                    })?,
            );
        }
        if cfg.background_reclaim {
            let e = eng.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("usermm-kswapd".into())
                    .spawn_engine(move || {
                        crate::sync::mark_engine_thread();
                        crate::reclaim::kswapd(&e)
                    })?,
            );
        }
        eng.psi.start()?;
        Ok(threads)
    }

    /// The engine (for `crate::model`).
    #[cfg(usermm_shuttle)]
    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.inner.eng
    }

    fn eng(&self) -> &Engine {
        &self.inner.eng
    }

    /// Adds a swap device from a spec: `file:PATH?size=…`, `nbd://host[:port]/export`,
    /// `nbd+unix:///export?socket=PATH`, `mirror:(A,B)`, each with `prio=…`.
    ///
    /// Errors: `Error::Config` for a spec the library cannot use (missing size for a
    /// new file, …), `Error::Io` when the file cannot be created or sized,
    /// `Error::TooManyDevices` past 64 devices.
    pub fn swapon(&self, spec: SwapSpec) -> Result<SwapId> {
        if let SwapKind::Zpool { size, algo } = spec.kind {
            let budget = (self.eng().frames.nframes() * PAGE_SIZE) as u64;
            if size > budget {
                return Err(Error::Config(format!(
                    "swap spec {:?}: size {size} is more than the memory budget ({budget} \
                     bytes): the pool's frames come from the budget",
                    spec.text
                )));
            }
            let pool = crate::swap::zpool::Zpool::new(
                &spec.text,
                size,
                algo,
                spec.prio,
                self.eng().frames.clone(),
            )?;
            return self.eng().swap.add_pool(Arc::new(pool));
        }
        let dev = crate::device::spec::open(&spec, false)?;
        self.swapon_device(dev, spec.prio)
    }

    /// Adds any block device as swap (for devices built in code, such as the
    /// fault-injecting wrapper used in tests).
    pub fn swapon_device(&self, dev: Arc<dyn BlockDevice>, prio: i32) -> Result<SwapId> {
        self.eng().swap.add(dev, prio)
    }

    /// Maps `len` bytes (rounded up to pages) of ordinary memory in this Vm's budget:
    /// plain loads and stores through `as_ptr()` from any thread, and system calls
    /// (`read(2)` into it, …), with pages that go to this Vm's swap devices like any
    /// other (userfaultfd; see `mm::transparent`). Untouched pages read as zeros and
    /// take no frame. Dropping the region unmaps it.
    ///
    /// Errors: `InvalidArgument` for a zero or huge length; `Io` with
    /// `PermissionDenied` and what to do when this process may not open
    /// `/dev/userfaultfd` (see the README, "Transparent memory"); `Config` on a kernel
    /// without userfaultfd write-protect.
    pub fn map_transparent(&self, len: usize) -> Result<crate::TransparentRegion> {
        self.host()?.map(len, self.inner.clone())
    }

    /// The userfaultfd host of transparent regions, started with the first one.
    fn host(&self) -> Result<Arc<crate::mm::transparent::Host>> {
        let mut t = self.inner.transparent.lock();
        match &*t {
            Some(h) => Ok(h.clone()),
            None => {
                let h = crate::mm::transparent::Host::start(self.inner.eng.clone())?;
                *t = Some(h.clone());
                Ok(h)
            }
        }
    }

    /// Prepares a process fork (`usermm exec`'s `fork()`; see
    /// `mm::transparent_fork`): freezes transparent evictions, runs `after_freeze`
    /// (the caller brings in pages its C library touches in the child before the
    /// child can serve faults; it may run again if a fault in flight makes the
    /// preparation start over), then takes a slot reference for every transparent
    /// page on swap and records where the child can read it. The ticket must be
    /// given `parent(pid)` in the parent and `child()` in the child.
    ///
    /// Errors: `Config` when a page is on a swap device a child cannot read (not a
    /// local file); `OutOfSwap` when a slot's count is full; `Io` when no pipe can be
    /// made. Nothing is held then.
    #[doc(hidden)]
    pub fn prepare_fork(&self, mut after_freeze: impl FnMut()) -> Result<ForkTicket<'_>> {
        let host = self.inner.transparent.lock().clone();
        let mut attempt = 0;
        loop {
            let freeze = self.freeze_transparent_eviction();
            after_freeze();
            let prep = match &host {
                // After 50 short tries, wait for the fault in flight however long.
                Some(h) => {
                    match crate::mm::transparent_fork::prepare(&self.inner.eng, h, attempt >= 50)? {
                        Some(p) => Some(p),
                        None => {
                            // A fault in flight may need an eviction: let evictions
                            // run for a moment.
                            drop(freeze);
                            attempt += 1;
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                    }
                }
                None => None,
            };
            return Ok(ForkTicket {
                prep,
                freeze: Some(freeze),
            });
        }
    }

    /// In a forked child, on a new Vm: registers the child's copy of its parent's
    /// transparent regions with this Vm and takes them into its budget (see
    /// `mm::transparent_fork`). The regions must never be dropped (they are the
    /// program's memory).
    ///
    /// Errors: `Io` when a region cannot be registered; `OutOfMemory` when this
    /// budget cannot hold the pages resident in the child.
    #[doc(hidden)]
    pub fn adopt_fork(
        &self,
        c: crate::mm::transparent_fork::ForkChild,
    ) -> Result<Vec<crate::TransparentRegion>> {
        crate::sys::note_fork();
        crate::sys::note_adopted();
        crate::mm::transparent_fork::adopt(&self.host()?, c, self.inner.clone())
    }

    /// Swap slots this Vm still holds for forked children (pages they may read).
    #[doc(hidden)]
    pub fn fork_held_pages(&self) -> u64 {
        self.eng().fork_held.load(crate::sync::Ordering::Relaxed)
    }

    /// Pages this process (a forked child) read from an ancestor's swap.
    #[doc(hidden)]
    pub fn foreign_reads(&self) -> u64 {
        self.eng()
            .foreign_reads
            .load(crate::sync::Ordering::Relaxed)
    }

    /// Pages of this Vm's transparent regions that are evicted now (on a swap device,
    /// absent from the mapping). A process fork copies a transparent region as it is
    /// mapped, so a child sees an evicted page as zeros: `usermm exec` forks only
    /// while this is 0, under `freeze_transparent_eviction`.
    #[doc(hidden)]
    pub fn transparent_pages_out(&self) -> u64 {
        self.eng()
            .transparent_out
            .load(crate::sync::Ordering::Relaxed)
    }

    /// Stops transparent pages from leaving their mappings until the guard is dropped
    /// (page-outs may still be written; the pages stay mapped), and waits for
    /// evictions already under way. For a process fork (see `transparent_pages_out`).
    #[doc(hidden)]
    pub fn freeze_transparent_eviction(&self) -> TransparentFreeze<'_> {
        let eng = self.eng();
        crate::sys::note_fork();
        eng.transparent_frozen
            .fetch_add(1, crate::sync::Ordering::SeqCst);
        crate::sync::wait_until(|| {
            eng.transparent_evicting.load(crate::sync::Ordering::SeqCst) == 0
        });
        // Staged pages are out of their mappings too: bring them back.
        if let Some(h) = self.inner.transparent.lock().clone() {
            h.unstage_all();
        }
        TransparentFreeze { vm: self }
    }

    /// The swap devices in service, one entry each, like `/proc/swaps`.
    pub fn swaps(&self) -> Vec<SwapInfo> {
        use crate::device::uring::WriteMode;
        let mode = self.eng().io.write_mode();
        let uring_writes = mode != WriteMode::Positioned;
        let registered = mode == WriteMode::Registered;
        self.eng()
            .swap
            .all()
            .iter()
            .map(|d| SwapInfo {
                id: d.id,
                name: d.name().to_string(),
                size: d.pages * PAGE_SIZE as u64,
                used: d.used_bytes(),
                discarded: d.discarded_bytes(),
                held_back: d.held_back() * PAGE_SIZE as u64,
                memory: d.memory_bytes(),
                prio: d.prio,
                state: d.state_name(),
                concurrent_reads: d.reads_concurrently(),
                uring_writes: uring_writes && d.writes_through_uring(),
                registered_buffers: registered && d.writes_through_uring(),
            })
            .collect()
    }

    /// Opens the host file at `path` read-write through the Vm's page cache: a
    /// [`File`] whose reads and writes are coherent with every mapping of the file
    /// (`map_file`). Recovers the file's `Share::Atomic` journal first if one is
    /// left from a crash.
    ///
    /// Errors: `Io` (naming the path) if it cannot be opened or recovered;
    /// `InvalidArgument` if it is not a regular file.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<File> {
        Ok(File {
            ino: self.inner.open_inode(path.as_ref())?,
            _vm: self.inner.clone(),
        })
    }

    /// A new, empty address space.
    pub fn new_space(&self) -> AddressSpace {
        AddressSpace::register(&self.inner)
    }

    /// Takes swap device `id` out of service: every page stored on it comes back to
    /// memory, or moves to another device when memory is short; then the device is
    /// closed. Runs while the spaces are in use (faults, forks, exits).
    ///
    /// Errors: `InvalidArgument` for an unknown device or one already being removed;
    /// `OutOfMemory` when neither memory nor another device can take a page (the
    /// device then stays in service with every page intact); `Device` if the device
    /// fails a read (likewise).
    pub fn swapoff(&self, id: SwapId) -> Result<()> {
        let host = self.inner.transparent.lock().clone();
        crate::swap::swapoff::swapoff(self.eng(), id, &|dev| {
            host.as_ref().map_or(Ok(()), |h| h.drain_device(dev))
        })
    }

    /// Memory pressure, as `/proc/pressure/memory`: the share of wall time threads
    /// lost stalled on memory (a fault's device read, or reclaim) — `some` (at least
    /// one thread) and `full` (at once every thread that made a usermm call in the
    /// last 30–40 ms, or is stalled) — as
    /// decaying averages over 10, 60 and 300 s, in percent, and the totals since the
    /// Vm started. See `docs/design.md`, "Pressure".
    pub fn pressure(&self) -> crate::Pressure {
        self.eng().psi.pressure()
    }

    /// Calls `callback` when threads were stalled on memory (`some`) for at least
    /// `threshold` within the last `window`, at most once per window, with the stall
    /// time of that window — as the kernel's PSI triggers. It runs on a thread of the
    /// Vm (`usermm-psi`), never on the fault path; a slow callback delays the others.
    /// Dropping the returned handle removes the trigger (no call starts after the
    /// drop returns); dropping the last handle of the Vm waits for a callback
    /// that is running (unless made by it).
    ///
    /// Errors: `InvalidArgument` for a window outside 500 ms ..= 10 s, or a threshold
    /// of zero or longer than the window.
    pub fn on_pressure(
        &self,
        threshold: Duration,
        window: Duration,
        callback: impl FnMut(Duration) + Send + 'static,
    ) -> Result<crate::PressureTrigger> {
        self.eng()
            .psi
            .trigger(threshold, window, Box::new(callback))
    }

    /// With `Config::fault_timing`: how many swap-in faults were timed and the mean
    /// nanoseconds of each of their steps (`stats::FAULT_STEPS`); `None` without.
    #[doc(hidden)]
    pub fn fault_timing(&self) -> Option<(u64, [f64; 6])> {
        self.eng().timing.as_ref().map(|t| t.means())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.eng().stats(self.inner.leaves.page_table_bytes())
    }

    /// The budget in bytes (frames × page size).
    pub fn memory_budget(&self) -> usize {
        self.eng().frames.nframes() * PAGE_SIZE
    }

    /// Reclaims now, like writing to cgroup v2's `memory.reclaim`: drops up to
    /// `pages` resident pages, writing dirty ones to swap first, and waits for that
    /// page-out. Returns how many frames it freed (fewer when pages are pinned,
    /// recently used, or swap is full).
    pub fn reclaim(&self, pages: usize) -> usize {
        let eng = self.eng();
        let n = eng.frames.nframes();
        let steal0 = eng.cnt.pgsteal.load(crate::sync::Ordering::Relaxed);
        let freed = || (eng.cnt.pgsteal.load(crate::sync::Ordering::Relaxed) - steal0) as usize;
        // Sweeps clear reference bits, queue dirty pages and drop clean ones; a page
        // queued in one sweep is dropped by its completion or by a later sweep.
        // Bounded work: a page needs about three visits of the clock hand (clear its
        // reference bit, queue it, drop it; a transparent page one more turn, to
        // stage it, and more while it is hot, a turn coming on one visit in
        // `config::DEFAULT_STAGE_EVERY`), so this is plenty unless pages cannot go
        // (pinned, swap full, or page-out failing).
        let limit = n.saturating_add(pages).saturating_mul(16);
        let mut scanned = 0;
        let mut idle = 0;
        let mut progress = 0;
        while freed() < pages && scanned < limit {
            let seen = eng.frames.events();
            let r = crate::reclaim::shrink(eng, 64, pages - freed());
            scanned += r.scanned;
            if r.evicted > 0 || r.queued > 0 || r.staged > 0 {
                idle = 0;
            } else {
                idle += r.scanned;
            }
            if r.pool_empty || (r.evicted == 0 && r.queued == 0 && eng.io.inflight() > 0) {
                eng.frames.wait_event(seen, Duration::from_millis(10));
            } else if idle > 4 * n && eng.io.inflight() == 0 {
                // Four sweeps without queueing or dropping anything (a page may need
                // a sweep to enter the probation FIFO's turn, its two visits there,
                // and the hand's spared pass after a promotion): stop if they freed
                // nothing either (completions free pages too).
                if freed() == progress {
                    break;
                }
                progress = freed();
                idle = 0;
            }
        }
        // Bounded: a device that never completes a write must not hang the caller
        // (what completes later is freed by then or by background reclaim).
        crate::sync::wait_until_for(Duration::from_secs(10), || eng.io.inflight() == 0);
        freed()
    }
}

/// A process fork in preparation: see `Vm::prepare_fork`. Dropped without
/// `parent`/`child`, it gives everything back.
#[doc(hidden)]
#[derive(Debug)]
pub struct ForkTicket<'a> {
    prep: Option<crate::mm::transparent_fork::ForkPrep>,
    freeze: Option<TransparentFreeze<'a>>,
}

impl ForkTicket<'_> {
    /// In the parent after the fork (`pid` < 0 if it failed): evictions resume; the
    /// slot references are dropped when the child no longer needs them.
    pub fn parent(mut self, pid: i32) {
        drop(self.freeze.take());
        if let Some(p) = self.prep.take() {
            p.parent(pid);
        }
    }

    /// In the child after the fork (one thread): the table to give `adopt_fork` on
    /// a new Vm. Nothing of this Vm is called (its threads do not exist here).
    pub fn child(mut self) -> crate::mm::transparent_fork::ForkChild {
        std::mem::forget(self.freeze.take());
        self.prep.take().map(|p| p.child()).unwrap_or_default()
    }
}

/// See `Vm::freeze_transparent_eviction`.
#[doc(hidden)]
#[derive(Debug)]
pub struct TransparentFreeze<'a> {
    vm: &'a Vm,
}

impl Drop for TransparentFreeze<'_> {
    fn drop(&mut self) {
        self.vm
            .eng()
            .transparent_frozen
            .fetch_sub(1, crate::sync::Ordering::SeqCst);
    }
}

/// An address space: regions of virtual memory whose pages live in the Vm's frames
/// or on its swap devices. Clone it freely; it is a handle, and the space (with its
/// pages and slots) is released when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct AddressSpace {
    inner: Arc<SpaceInner>,
    _vm: Arc<VmInner>,
}

impl AddressSpace {
    /// The space's insides (for `crate::model`).
    #[cfg(usermm_shuttle)]
    pub(crate) fn space(&self) -> &Arc<SpaceInner> {
        &self.inner
    }

    fn register(vm: &Arc<VmInner>) -> AddressSpace {
        let inner = Arc::new(SpaceInner::new(vm.eng.clone(), vm.leaves.clone()));
        let weak: Weak<SpaceInner> = Arc::downgrade(&inner);
        vm.eng.register_space(weak);
        AddressSpace {
            inner,
            _vm: vm.clone(),
        }
    }

    /// A copy-on-write snapshot of this space: the child sees every byte as it is now;
    /// later writes on either side are private to it. Resident pages are shared until
    /// written (then copied); swapped pages share their slot.
    ///
    /// Waits for mutable guards on this space's pages to be dropped (do not fork while
    /// holding one in the same thread). Errors: `OutOfSwap` if a slot is already
    /// shared by 65,535 spaces.
    pub fn fork(&self) -> Result<AddressSpace> {
        if crate::mm::fault::holds_pin(&self.inner, 0, u64::MAX, false) {
            return Err(Error::WouldDeadlock("fork"));
        }
        self.inner.eng.psi.touch();
        let child = AddressSpace::register(&self._vm);
        crate::mm::fork::fork_into(&self.inner, &child.inner)?;
        Ok(child)
    }

    /// Maps `len` bytes (rounded up to pages) of zero-filled anonymous memory. No
    /// frame is taken until a page is written.
    ///
    /// Errors: `InvalidArgument` for a zero or overflowing length; `OutOfMemory` when
    /// no gap of that size is left in the 128 TiB address space.
    pub fn map_anon(&self, len: usize) -> Result<Region> {
        self.inner.eng.psi.touch();
        self.inner.map_anon(len)
    }

    /// Unmaps a region returned by `map_anon`, freeing its frames and swap slots.
    /// Waits for guards on its pages to be dropped (so do not call it while holding
    /// one from the same thread).
    ///
    /// Errors: `BadAddress` if `r` is not a mapped region of this space.
    pub fn unmap(&self, r: Region) -> Result<()> {
        let (first, end) = (r.start().vpn(), r.end().vpn());
        if crate::mm::fault::holds_pin(&self.inner, first, end, false) {
            return Err(Error::WouldDeadlock("unmap"));
        }
        self.inner.eng.psi.touch();
        self.inner.unmap(r)
    }

    /// Maps all of the host file at `path` (opened read-write), its length rounded
    /// up to whole pages. `mm.read`/`write`/`page`/`page_mut` work on it as on
    /// anonymous memory; an access to a page past the end of the file is
    /// `BadAddress` (the bytes of the last page past the end read as zeros and never
    /// reach the file, as with `mmap`). How writes reach the file is `share`'s
    /// (see [`Share`]). Every mapping and [`File`] handle of one file shares one page
    /// cache inside the budget.
    ///
    /// Errors: `Io` (naming the path) if the file cannot be opened read-write or its
    /// journal cannot be recovered; `InvalidArgument` for an empty file or one that
    /// is not a regular file; `OutOfMemory` when no gap of that size is left.
    pub fn map_file(&self, path: impl AsRef<Path>, share: Share) -> Result<Region> {
        self.inner.eng.psi.touch();
        let ino = self._vm.open_inode(path.as_ref())?;
        if share == Share::Atomic {
            crate::mm::msync::prepare_atomic(&ino)?;
        }
        self.inner.map_file(ino, share)
    }

    /// Writes a file mapping's changes to the file (see [`Share`]):
    /// - `Shared`: its dirty pages, then `fdatasync`; also reports a failed
    ///   background write-back of the file since the last `msync`/`sync`;
    /// - `Private`: nothing (its changes never reach the file);
    /// - `Atomic`: every page this mapping dirtied since its previous `msync`, all
    ///   or none, whatever crashes when.
    ///
    /// Errors: `BadAddress` if `r` is not a mapped region of this space;
    /// `InvalidArgument` if it is not a file mapping; `Io` if a write or sync
    /// fails (the pages stay dirty, the mapping usable; for `Atomic` the file then
    /// holds the previous commit, or this one if it reached the journal).
    pub fn msync(&self, r: &Region) -> Result<()> {
        self.inner.eng.psi.touch();
        crate::mm::msync::msync(&self.inner, *r)
    }

    /// The mapped regions, in address order.
    pub fn regions(&self) -> Vec<Region> {
        self.inner.regions()
    }

    /// Reads `buf.len()` bytes at `addr`. Pages never written read as zeros and take
    /// no frame.
    ///
    /// Errors: `BadAddress` if any byte is outside a mapped region (nothing is read
    /// then); `Device` if a swap device fails the read (or the data fails its
    /// checksum) — the page stays stored and a later read may succeed; `OutOfMemory` /
    /// `OutOfSwap` if no frame can be had.
    #[inline]
    pub fn read(&self, addr: VAddr, buf: &mut [u8]) -> Result<()> {
        self.inner.eng.psi.touch();
        crate::mm::fault::read(&self.inner, addr, buf)
    }

    /// Writes `data` at `addr`. Errors as for `read` (a bad range writes nothing).
    #[inline]
    pub fn write(&self, addr: VAddr, data: &[u8]) -> Result<()> {
        self.inner.eng.psi.touch();
        crate::mm::fault::write(&self.inner, addr, data)
    }

    /// Pins the page containing `addr` and returns a guard that reads it as a slice
    /// of `PAGE_SIZE` bytes (index 0 is the start of the page). A pinned page is never
    /// evicted; writers of that page wait until the guard is dropped.
    ///
    /// Errors as for `read`, and `WouldDeadlock` if this thread holds a `PageMut`
    /// of the same page (it would wait for itself).
    pub fn page(&self, addr: VAddr) -> Result<PageRef<'_>> {
        self.inner.eng.psi.touch();
        let p = crate::mm::fault::pin(&self.inner, addr, Want::Shared)?;
        crate::mm::fault::note_pin(&self.inner, addr.vpn(), false);
        if let Some((ino, pg)) = &p.file {
            crate::mm::fault::note_pin_key(ino.key(), *pg, false);
        }
        Ok(PageRef {
            space: &self.inner,
            vpn: addr.vpn(),
            pte: p.pte,
            pfn: p.pfn,
            ptr: self.inner.eng.frames.frame_ptr(p.pfn),
            file: p.file,
            _not_send: PhantomData,
        })
    }

    /// Pins the page containing `addr` exclusively and returns a guard that writes
    /// it. Other accesses to that page wait until the guard is dropped.
    ///
    /// The guard works on a copy of the page, written back when it is dropped (so
    /// the frame is only ever written with atomic stores, which optimistic readers
    /// of other threads may be loading concurrently). Errors as for `read`, and
    /// `WouldDeadlock` if this thread holds any guard on the same page.
    pub fn page_mut(&self, addr: VAddr) -> Result<PageMut<'_>> {
        self.inner.eng.psi.touch();
        let p = crate::mm::fault::pin(&self.inner, addr, Want::Exclusive)?;
        crate::mm::fault::note_pin(&self.inner, addr.vpn(), true);
        if let Some((ino, pg)) = &p.file {
            crate::mm::fault::note_pin_key(ino.key(), *pg, true);
        }
        let (pte, pfn) = (p.pte, p.pfn);
        let ptr = self.inner.eng.frames.frame_ptr(pfn);
        let mut copy = Box::new(PageBuf([0; PAGE_SIZE]));
        // SAFETY: `ptr` is the pinned frame (PAGE_SIZE bytes in the arena); we hold
        // it exclusively, so nobody writes it while we copy.
        unsafe { crate::frame::copy_out(ptr, &mut copy.0) };
        Ok(PageMut {
            space: &self.inner,
            vpn: addr.vpn(),
            pte,
            pfn,
            ptr,
            copy,
            file: p.file,
            _not_send: PhantomData,
        })
    }
}

/// A host file opened through a Vm's page cache (`Vm::open`): reads and writes are
/// coherent with every mapping of the file. Its pages count against the budget
/// and are written back by the page-I/O threads, `sync`, or when the last handle
/// and mapping of the file go.
#[derive(Debug)]
pub struct File {
    ino: Arc<Inode>,
    _vm: Arc<VmInner>,
}

impl File {
    /// Reads up to `buf.len()` bytes at `offset` (std's `FileExt` order); returns
    /// how many, 0 at or past the end of the file.
    ///
    /// Errors: `Io` if reading the file fails; `OutOfMemory`/`OutOfSwap` if no
    /// frame can be had; `WouldDeadlock` if this thread holds a `PageMut` on a page
    /// of the range (through a mapping).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.ino.eng.psi.touch();
        self.check_pins(offset, buf.len(), true)?;
        self.ino.read_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`, growing the file if it ends past it;
    /// returns `buf.len()`. The bytes reach the file by write-back (`sync` makes
    /// them durable).
    ///
    /// Errors: as `read_at`, `WouldDeadlock` for any guard on a page of the range,
    /// and `InvalidArgument` past 128 TiB.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<usize> {
        self.ino.eng.psi.touch();
        self.check_pins(offset, buf.len(), false)?;
        self.ino.write_at(buf, offset)
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.ino.len()
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the file's dirty pages and syncs it (`fdatasync`).
    ///
    /// Errors: `Io` if a write or the sync fails, or if a background write-back of
    /// the file failed since the last `sync`/`msync` (reported once); the pages
    /// that failed stay dirty.
    pub fn sync(&self) -> Result<()> {
        self.ino.sync(0, u64::MAX, true)
    }

    fn check_pins(&self, offset: u64, len: usize, read: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / PAGE_SIZE as u64;
        let end = offset.saturating_add(len as u64).div_ceil(PAGE_SIZE as u64);
        if crate::mm::fault::holds_pin_key(self.ino.key(), first, end, read) {
            return Err(Error::WouldDeadlock("a file read or write"));
        }
        Ok(())
    }
}

/// A shared pin of one resident page (see `AddressSpace::page`).
#[derive(Debug)]
pub struct PageRef<'a> {
    /// The space whose page it pins.
    space: &'a SpaceInner,
    vpn: u64,
    pte: &'a AtomicU64,
    pfn: Pfn,
    ptr: *mut u8,
    /// A page of a shared file mapping: its inode (kept alive) and page number.
    file: Option<(Arc<Inode>, u64)>,
    _not_send: PhantomData<*mut u8>,
}

impl std::ops::Deref for PageRef<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the frame is pinned shared: it stays this page's and nobody writes
        // it (writers and exclusive guards wait for the pin to go) until we drop.
        unsafe { std::slice::from_raw_parts(self.ptr, PAGE_SIZE) }
    }
}

impl Drop for PageRef<'_> {
    fn drop(&mut self) {
        crate::mm::fault::note_unpin(self.space, self.vpn, false);
        if let Some((ino, pg)) = &self.file {
            crate::mm::fault::note_unpin_key(ino.key(), *pg, false);
        }
        crate::mm::fault::unpin(self.pte, self.pfn, Want::Shared);
    }
}

/// An exclusive pin of one resident page (see `AddressSpace::page_mut`).
#[derive(Debug)]
pub struct PageMut<'a> {
    /// The space whose page it pins.
    space: &'a SpaceInner,
    vpn: u64,
    pte: &'a AtomicU64,
    pfn: Pfn,
    ptr: *mut u8,
    /// The copy the guard hands out; written back on drop.
    copy: Box<PageBuf>,
    /// As in `PageRef`.
    file: Option<(Arc<Inode>, u64)>,
    _not_send: PhantomData<*mut u8>,
}

/// One page of bytes.
#[derive(Debug)]
struct PageBuf([u8; PAGE_SIZE]);

impl std::ops::Deref for PageMut<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.copy.0
    }
}

impl std::ops::DerefMut for PageMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.copy.0
    }
}

impl Drop for PageMut<'_> {
    fn drop(&mut self) {
        // SAFETY: the frame is still pinned exclusively by us (nobody else writes it
        // or maps it elsewhere); `copy_in` stores atomically, so a stale optimistic
        // reader loading it concurrently is not a data race, and it will discard
        // what it read because `unpin` moves the entry's version.
        unsafe { crate::frame::copy_in(self.ptr, &self.copy.0) };
        crate::mm::fault::note_unpin(self.space, self.vpn, true);
        if let Some((ino, pg)) = &self.file {
            crate::mm::fault::note_unpin_key(ino.key(), *pg, true);
        }
        crate::mm::fault::unpin(self.pte, self.pfn, Want::Exclusive);
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Vm>();
    is::<AddressSpace>();
    let _ = Error::OutOfMemory;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9 item 3: a slot whose reference count is full used to make the copy of
    /// a shared leaf yield forever under the regions write lock. Now the write that
    /// needed the copy fails with `OutOfSwap`, and the page is intact.
    #[test]
    fn full_slot_count_fails_the_copy_instead_of_spinning() {
        let dir = std::env::temp_dir().join(format!("usermm-vm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        let id = vm
            .swapon(crate::SwapSpec::file(dir.join("swap"), 16 << 20))
            .unwrap();
        let mm = vm.new_space();
        let r = mm.map_anon(PAGE_SIZE).unwrap();
        mm.write(r.start(), &[5; 8]).unwrap();
        assert_eq!(vm.reclaim(1), 1);
        let dev = vm.eng().swap.get(id.0).unwrap();
        assert_eq!(dev.used(), 1);
        // The first slot handed out is slot 0; fill its count.
        assert!(dev.dup(0, u32::from(u16::MAX) - 1));
        assert!(!dev.dup(0, 1), "the count is full");
        let child = mm.fork().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let c2 = child.clone();
        let at = r.start();
        std::thread::spawn(move || tx.send(c2.write(at, &[6; 8])).unwrap());
        let got = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the write hung on a full slot count");
        assert!(matches!(got, Err(Error::OutOfSwap)), "{got:?}");
        let mut b = [0u8; 8];
        child.read(r.start(), &mut b).unwrap();
        assert_eq!(b, [5; 8]);
        mm.read(r.start(), &mut b).unwrap();
        assert_eq!(b, [5; 8]);
        // Give the extra references back so teardown balances.
        for _ in 0..u16::MAX - 1 {
            dev.put_slot(0);
        }
        drop((child, mm));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
