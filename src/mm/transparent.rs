//! Transparent regions: ordinary memory (plain loads and stores through a pointer,
//! from any thread, and system calls such as `read(2)` into it) whose pages live in
//! the Vm's budget and go to its swap devices, through userfaultfd.
//!
//! Owns: `TransparentRegion` (the public handle), `TRegion` (a mapping registered
//! with the Vm's userfaultfd and one entry per page) and `Host` (the descriptor, the
//! handler thread and the list of regions, one per Vm, made with the first region).
//!
//! ## A page's life
//! Entries use the encoding of `crate::pte`. `EMPTY`: not mapped; the first touch
//! faults (MISSING), the handler takes a frame from the budget as the page's token,
//! maps a zero page with `UFFDIO_COPY` and publishes the entry present and dirty.
//! Reclaim treats the frame as any other (`F_TRANSPARENT` tells it where the bytes
//! are; see "Knowing what is hot" for how it picks). The next touch of an evicted
//! page faults (MISSING) and the handler reads the slot (checksum checked) into its
//! own buffer and maps it write-protected (`UFFDIO_COPY_MODE_WP`), clean, keeping
//! the copy — or writable and dirty on a write fault, or when the page's hint says
//! it was written in one of its recent residencies (`WRITE_HINT`); the pages after
//! it whose slots follow its slot come in the same read (`READ_AROUND`). The first write
//! to a clean page faults (WP): the handler marks the entry dirty and lifts the
//! protection, holding the entry's lock meanwhile, so reclaim never sees a writable
//! page as clean.
//!
//! ## Knowing what is hot
//! usermm does not see loads and stores, and an unprivileged process cannot read
//! accessed bits. Dirtiness comes from write-protect faults (above). Recency comes
//! from staging: when the reclaim hand finds a page not used since its last visit,
//! it moves the page (`UFFDIO_MOVE`, no copy) out of the mapping into its frame's
//! page of the staging area (`Staging`) and marks the entry `P_STAGED`; the frame
//! stays. A touch faults (MISSING) and the handler brings it back without I/O
//! (`unstage`: moved back if dirty, copied back write-protected if clean) and marks
//! it referenced, raising its heat (`P_HEAT`, which spares it that many of its
//! turns, below). A page still staged when the hand comes back is evicted from the
//! staging page. Of the unused, unstaged pages the hand comes to, only one in
//! `config::DEFAULT_STAGE_EVERY` has its turn (is staged, or spared by its heat,
//! which counts down on turns only); the rest wait for a later visit. So a page
//! stays staged for a short while: long enough for a hot page to be touched,
//! seldom so for one no hotter than the rest (each touch is a round trip through
//! the handler). Without `UFFDIO_MOVE` (or when the kernel refuses a move) a page
//! is evicted in place: write-protected and copied if dirty, zapped if clean; every
//! visit is a turn then.
//!
//! ## Who serves faults
//! One handler thread per CPU this process may run on, pinned to it, all reading
//! the one descriptor (message mode, so faults the kernel takes inside system calls
//! are served too). Every handler is woken by a fault; the one on the faulting
//! thread's CPU runs as soon as that thread sleeps (a local switch, a few µs, where
//! a wake-up across CPUs costs tens in a VM), so it usually takes the message, and
//! resolves it itself: frame, device read into its preallocated buffer,
//! `UFFDIO_COPY`. It allocates nothing from the heap on that path and takes no lock
//! the faulting code could hold (the regions list is a leaf lock of ours, never
//! held by program code).
//!
//! When no frame or slot can be had or the device fails the read, the faulting
//! thread gets SIGBUS, with a line on stderr, as the kernel does on a failed fault;
//! never silent zeros.
//!
//! ## Locking
//! `Host::regions` (Mutex, leaf): held only to add, remove or look up a region. Entry
//! bit locks and frame locks as in `crate::pte`/`crate::frame`; the handler holds an
//! entry's `P_LOCK` across the `UFFDIO_WRITEPROTECT` that lifts the protection and
//! across the move or copy that brings a staged page back; reclaim holds the frame
//! lock and the entry lock across the move that stages a page. A staging page is
//! touched only by the holder of its frame's entry lock, or, to drop it, by the
//! holder of its frame's lock or of the evicted frame itself (`reclaim::ZapBatch`:
//! the frame is freed only after its staging page is gone).
//! The `BUSY` claim is held across the frame allocation and the device read, as on
//! the explicit fault path.

use super::transparent_foreign::Foreign;
use crate::addr::PAGE_SIZE;
use crate::device::AlignedPages;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::frame::AllocCtx;
use crate::pte::{
    lock_present, try_lock_present, unlock_entry, wait_unlocked, Pte, BUSY, EMPTY, P_ACCESSED,
    P_DIRTY, P_HEAT, P_HEAT_ONE, P_STAGED,
};
use crate::reclaim::{say_lost, Lost};
use crate::stats::Counters;
use crate::sync::raw::AtomicU8;
use crate::sync::EngineSpawn;
use crate::sync::{wait_until, Arc, AtomicU64, Mutex, Ordering};
use crate::uffd::{self, Fault, Uffd};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread::JoinHandle;

const PS: u64 = PAGE_SIZE as u64;

/// A write to a clean transparent page sets its hint to this: the next this-many
/// swap-ins map it writable and dirty (no write-protect fault; its swap copy is let
/// go), the one after maps it clean and protected again, to notice a page that is
/// no longer written.
const WRITE_HINT: u8 = 3;

/// At most this many pages after a swapped-in page come in with it when they are
/// swapped on the same device — in the slots right after its slot (they were
/// evicted together: one read), or anywhere where the device keeps several reads
/// in flight at once (`SwapDevice::reads_concurrently`: one read per page, all at
/// once) — and the region's recent swap-in faults were mostly next to each other
/// (`sequential`: off by itself on random access, where it only takes frames from
/// hotter pages). Only with frames free above the min watermark (never reclaiming
/// for them; above the low one, where the background reclaimer keeps the free
/// count, read-around got a few pages at a time and a scan faulted on 11 % of its
/// pages instead of 3 %); each comes in clean, keeping its copy, so an unused one
/// costs a frame until the hand drops it. 31 (128 KiB with the faulting page): with 7, a
/// sequential scan in `usermm bench` faulted on 17 % of its pages and ran at 0.87×
/// the kernel's rate; with 31, 5 % and 1.54×.
const READ_AROUND: usize = 31;

/// A swap-in fault this many pages after the last one (or the end of its
/// read-around) still counts as sequential (`sequential`): the pages between were
/// resident, so the scan did not fault on them.
const SEQ_GAP: u64 = 8;

/// A page `claim_around` claimed: where, its entry before the claim, its frame.
#[derive(Clone, Copy, Debug, Default)]
struct RaClaim {
    page: u64,
    old: u64,
    pfn: crate::addr::Pfn,
}

/// The per-Vm part: one descriptor and one handler thread for all regions.
#[derive(Debug)]
pub(crate) struct Host {
    pub(super) eng: Arc<Engine>,
    pub(super) uffd: Arc<Uffd>,
    /// Live regions, by start address. Protected by its mutex (a leaf).
    pub(super) regions: Mutex<Vec<Arc<TRegion>>>,
    /// Written once to stop the handlers.
    stop: OwnedFd,
    /// The handler threads (joined when the Vm goes).
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The staging area (unmapped when the Vm goes), if the kernel has UFFDIO_MOVE.
    _staging: Option<Staging>,
}

/// The staging area: one page per frame of the budget (virtual; a page is resident
/// only while a staged page is in it), registered with the descriptor because
/// `UFFDIO_MOVE` moves pages only into registered ranges. Nothing but `UFFDIO_MOVE`,
/// page-out copies of staged pages and `MADV_DONTNEED` ever touch it, always with
/// the page's entry locked and `P_STAGED`, so no access of ours faults there.
#[derive(Debug)]
struct Staging {
    base: u64,
    len: u64,
}

impl Staging {
    fn map(u: &Uffd, frames: usize) -> Option<Staging> {
        let len = frames as u64 * PS;
        let p = map_registered(u, len, uffd::MODE_MISSING).ok()?;
        Some(Staging {
            base: p as u64,
            len,
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Staging::map`; the handlers and reclaim are
        // gone (the Host goes with its Vm).
        unsafe { crate::sys::munmap(self.base as *mut libc::c_void, self.len as usize) };
    }
}

/// One transparent region.
#[derive(Debug)]
pub(crate) struct TRegion {
    pub(super) base: u64,
    pub(super) len: u64,
    /// One entry per page (`crate::pte` encoding), in a mapping of their own: zeroed
    /// (`EMPTY`) by the kernel and resident only where touched, so a 64 GiB region
    /// costs metadata only for the pages it uses. Each entry is protected by its own
    /// bit lock / claim.
    entries: AlignedPages,
    /// The last page read in by a swap-in fault, and a moving average (×256) of how
    /// often such a fault was next to the one before: read-around runs only while
    /// at least a quarter were (`sequential`), so it stays off on random access.
    last_in: AtomicU64,
    seq_score: AtomicU64,
    /// One byte per page, in a mapping of its own like `entries`: how many more
    /// swap-ins of this page map it writable and dirty at once, because it was
    /// written in a recent residency (see "Knowing what is hot").
    hints: AlignedPages,
    pub(super) npages: usize,
    pub(super) eng: Arc<Engine>,
    uffd: Arc<Uffd>,
    /// One bit per chunk of `transparent_foreign::CHUNK` pages: set (before the page is
    /// mapped) when a page of the chunk is filled for the first time. A process fork
    /// scans those chunks only (`mm::transparent_fork`).
    pub(super) touched: Box<[AtomicU64]>,
    /// In a forked child of `usermm exec`: the pages its parent had on swap, read
    /// from the parent's slots on first touch (`mm::transparent_foreign`, built by
    /// `mm::transparent_fork::adopt`). Immutable.
    pub(super) foreign: Option<Box<Foreign>>,
}

impl Host {
    /// Opens the descriptor and starts the handler threads (one per CPU this process
    /// may run on, each pinned to its CPU; see "Who serves faults").
    pub fn start(eng: Arc<Engine>) -> Result<Arc<Host>> {
        crate::sys::watch_forks();
        let want = uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_THREAD_ID | uffd::FEATURE_MOVE;
        let u = Uffd::open(want).map_err(Error::Io)?;
        if u.features() & uffd::FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(Error::Config(
                "transparent memory needs userfaultfd write-protect faults on anonymous \
                 memory (Linux 5.7 or later)"
                    .into(),
            ));
        }
        let u = Arc::new(u);
        // SAFETY: a new eventfd; checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor we own.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let _ = eng.uffd.set(u.clone());
        let staging = if u.features() & uffd::FEATURE_MOVE != 0 {
            Staging::map(&u, eng.frames.nframes())
        } else {
            None
        };
        if let Some(st) = &staging {
            eng.staging.store(st.base, Ordering::Relaxed);
        }
        let host = Arc::new(Host {
            eng,
            uffd: u,
            regions: Mutex::new(Vec::new()),
            stop,
            threads: Mutex::new(Vec::new()),
            _staging: staging,
        });
        for cpu in handler_cpus() {
            let h = host.clone();
            // Preallocated here: the zero page and the read buffer of each handler.
            let zero = AlignedPages::new(1)?;
            let bounce = AlignedPages::new(1 + READ_AROUND)?;
            let spawned = std::thread::Builder::new()
                .name(format!("usermm-uffd-{cpu}"))
                .spawn_engine(move || {
                    crate::sync::mark_engine_thread();
                    pin_to(cpu);
                    // Its io_uring ring for scattered read-around, made now: serving
                    // a fault must not allocate.
                    crate::device::prepare_scattered_reads();
                    h.run(zero, bounce)
                });
            match spawned {
                Ok(t) => host.threads.lock().push(t),
                Err(e) => {
                    host.shutdown();
                    return Err(Error::Io(e));
                }
            }
        }
        Ok(host)
    }

    /// Stops the handler threads (the Vm is going away).
    pub fn shutdown(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our eventfd; it stays readable (nobody reads
        // it), so every handler sees it.
        unsafe { libc::write(self.stop.as_raw_fd(), (&raw const one).cast(), 8) };
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }

    /// Maps a new region of `len` bytes (rounded up to pages).
    pub fn map(
        self: &Arc<Host>,
        len: usize,
        vm: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<TransparentRegion> {
        if len == 0 {
            return Err(Error::InvalidArgument(
                "map_transparent of zero bytes".into(),
            ));
        }
        let len = (len as u64)
            .checked_add(PS - 1)
            .map(|l| l & !(PS - 1))
            .filter(|&l| l <= 1 << 46)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("map_transparent of {len} bytes is too large"))
            })?;
        // Entries first (metadata, 8 bytes a page), then the mapping.
        let pages = (len / PS) as usize;
        let entries = AlignedPages::new((pages * 8).div_ceil(PAGE_SIZE))?;
        let p = map_registered(&self.uffd, len, uffd::MODE_MISSING | uffd::MODE_WP)
            .map_err(Error::Io)?;
        let base = p as u64;
        self.insert(base, len, entries, None, vm).inspect_err(|_| {
            let _ = self.uffd.unregister(base, len);
            // SAFETY: unmapping what we mapped above; nothing refers to it.
            unsafe { crate::sys::munmap(p, len as usize) };
        })
    }

    /// Makes the region over `[base, base + len)`, a mapping registered with this
    /// host's descriptor, and lists it (`map`, and `transparent_fork::adopt` in a
    /// forked child).
    pub(super) fn insert(
        self: &Arc<Host>,
        base: u64,
        len: u64,
        entries: AlignedPages,
        foreign: Option<Box<Foreign>>,
        vm: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<TransparentRegion> {
        let r = Arc::new(TRegion {
            base,
            len,
            entries,
            hints: AlignedPages::new(((len / PS) as usize).div_ceil(PAGE_SIZE))?,
            last_in: AtomicU64::new(0),
            seq_score: AtomicU64::new(0),
            npages: (len / PS) as usize,
            eng: self.eng.clone(),
            uffd: self.uffd.clone(),
            touched: super::transparent_foreign::chunk_bitmap(len / PS),
            foreign,
        });
        {
            let mut list = self.regions.lock();
            let at = list.partition_point(|x| x.base < base);
            list.insert(at, r.clone());
        }
        Ok(TransparentRegion {
            host: self.clone(),
            region: r,
            _vm: vm,
        })
    }

    /// Moves every staged page back into its mapping (for a process fork, with
    /// staging frozen: see `Vm::freeze_transparent_eviction`).
    pub fn unstage_all(&self) {
        let list = self.regions.lock().clone();
        for r in list {
            for (i, pte) in r.entries().iter().enumerate() {
                if pte.load(Ordering::Acquire) & (P_STAGED | crate::pte::TAG_MASK)
                    != (P_STAGED | crate::pte::TAG_PRESENT)
                {
                    continue;
                }
                let page = r.base + i as u64 * PS;
                // A missing-page fault does just this; failures leave the page
                // staged, where the child will find it missing (and zero): say so.
                if r.missing_fault_staged(pte, page).is_err() {
                    let msg = b"usermm: a staged page could not be brought back before fork\n";
                    // SAFETY: writing a static buffer to stderr.
                    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
                }
            }
        }
    }

    /// Brings every page of the transparent regions that is on swap device `dev`
    /// back into its mapping, for swapoff (`swap::swapoff`): each as a missing-page
    /// fault would (so a fault of the program's on the same page meanwhile is
    /// arbitrated as between two faulting threads), and, the device being drained,
    /// without keeping its copy: mapped dirty, its slot freed. Reclaim may write
    /// other pages to the other devices meanwhile. Only chunks ever filled are
    /// looked at. The first error ends the pass (the device stays in service).
    pub fn drain_device(&self, dev: u8) -> Result<()> {
        let list = self.regions.lock().clone();
        if list.is_empty() {
            return Ok(());
        }
        let zero = AlignedPages::new(1)?;
        let mut bounce = AlignedPages::new(1 + READ_AROUND)?;
        for r in list {
            for i in r.touched_ranges().into_iter().flatten() {
                let pte = &r.entries()[i];
                if matches!(Pte::decode(pte.load(Ordering::Acquire)), Pte::Swapped(e) if e.dev == dev)
                {
                    r.missing_fault(r.base + i as u64 * PS, false, &zero, &mut bounce)?;
                }
            }
        }
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<Arc<TRegion>> {
        let list = self.regions.lock();
        let i = list.partition_point(|x| x.base <= addr);
        let r = list.get(i.checked_sub(1)?)?;
        (addr < r.base + r.len).then(|| r.clone())
    }

    /// The handler thread: waits for faults and serves each one.
    fn run(&self, zero: AlignedPages, mut bounce: AlignedPages) {
        loop {
            match self.uffd.poll(self.stop.as_raw_fd(), 1000) {
                Ok(true) => return,
                Ok(false) => {}
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
            // One message per wake-up: after a fault, straight back to `poll`
            // (which returns at once if another is queued) rather than a read
            // that fails, so the thread just woken runs a syscall sooner.
            if let Ok(Some(f)) = self.uffd.read_fault() {
                // Serving a fault must not allocate (lockdep feature checks it).
                let _no_alloc = crate::lockdep::no_alloc("transparent-fault handler");
                self.serve(f, &zero, &mut bounce);
            }
        }
    }

    fn serve(&self, f: Fault, zero: &AlignedPages, bounce: &mut AlignedPages) {
        let page = f.address & !(PS - 1);
        let Some(r) = self.find(page) else {
            // Not ours (any more): let the thread retry; the kernel will say SIGSEGV
            // if the address is gone.
            let _ = self.uffd.wake(page, PS);
            return;
        };
        let res = if f.flags & uffd::FLAG_WP != 0 {
            r.write_fault(page);
            Ok(())
        } else {
            r.missing_fault(page, f.flags & uffd::FLAG_WRITE != 0, zero, bounce)
        };
        if let Err(e) = res {
            sigbus(f.tid, &e);
            let _ = self.uffd.wake(page, PS);
        }
    }
}

/// A fresh private anonymous mapping of `len` bytes without transparent huge pages
/// (the kernel would fill 2 MiB at a time behind our back), registered with `u` for
/// `mode`: a transparent region or the staging area.
fn map_registered(u: &Uffd, len: u64, mode: u64) -> std::io::Result<*mut libc::c_void> {
    // SAFETY: a fresh private anonymous mapping; checked below.
    let p = unsafe {
        crate::sys::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: advice on the mapping just made.
    unsafe { crate::sys::madvise(p, len as usize, libc::MADV_NOHUGEPAGE) };
    // Never merged by KSM (a process-wide `PR_SET_MEMORY_MERGE`): a merged page is
    // shared, which `UFFDIO_MOVE` refuses as it refuses a pinned one (see
    // `reclaim::stage`). Advisory; a kernel without KSM says EINVAL.
    // SAFETY: advice on the mapping just made.
    unsafe { crate::sys::madvise(p, len as usize, libc::MADV_UNMERGEABLE) };
    if let Err(e) = u.register(p as u64, len, mode) {
        // SAFETY: unmapping what we mapped above; nothing refers to it.
        unsafe { crate::sys::munmap(p, len as usize) };
        return Err(e);
    }
    Ok(p)
}

/// The CPUs to serve faults on: those this thread may run on (a cpuset or `taskset`
/// narrows them), at most `MAX_HANDLERS`.
fn handler_cpus() -> Vec<usize> {
    const MAX_HANDLERS: usize = 64;
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: asking for this thread's mask into a set of the size given.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    let mut cpus: Vec<usize> = if r == 0 {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: reading a bit of a valid set.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .take(MAX_HANDLERS)
            .collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        cpus.push(usize::MAX);
    }
    cpus
}

/// Pins the calling thread to `cpu` (`usize::MAX`: leaves it where it is).
fn pin_to(cpu: usize) {
    if cpu == usize::MAX {
        return;
    }
    // SAFETY: an empty set with one CPU added, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Tells the faulting thread its fault failed: a line on stderr (no allocation: a
/// fixed message) and SIGBUS, as the kernel does when it cannot fill a page.
fn sigbus(tid: u32, e: &Error) {
    let msg: &[u8] = match e {
        Error::OutOfMemory => b"usermm: transparent page fault failed: out of memory (no frame can be reclaimed); SIGBUS\n",
        Error::OutOfSwap => b"usermm: transparent page fault failed: memory and every swap device are full; SIGBUS\n",
        Error::Device { .. } => b"usermm: transparent page fault failed: swap device ",
        _ => b"usermm: transparent page fault failed; SIGBUS\n",
    };
    // SAFETY: writing static buffers and the error's own bytes to stderr (no
    // allocation); sending a signal to a thread of this process (tid from the fault
    // message; 0 means unknown: the process).
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        if let Error::Device { dev, .. } = e {
            let tail: &[u8] = b" failed the read (or timed out); SIGBUS\n";
            libc::write(2, dev.as_ptr().cast(), dev.len());
            libc::write(2, tail.as_ptr().cast(), tail.len());
        }
        if tid != 0 {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                tid as libc::c_int,
                libc::SIGBUS,
            );
        } else {
            libc::kill(libc::getpid(), libc::SIGBUS);
        }
    }
}

impl TRegion {
    pub(super) fn entries(&self) -> &[AtomicU64] {
        // SAFETY: the mapping holds `npages` 8-byte, 8-aligned words, zeroed by the
        // kernel (a valid `AtomicU64` holding `EMPTY`), and lives as long as `self`;
        // it is only ever accessed atomically.
        unsafe { std::slice::from_raw_parts(self.entries.ptr(0).cast::<AtomicU64>(), self.npages) }
    }

    /// The chunks with a page ever filled (`touched`), as page ranges.
    pub(super) fn touched_ranges(&self) -> Vec<std::ops::Range<usize>> {
        use super::transparent_foreign::CHUNK;
        let mut out: Vec<std::ops::Range<usize>> = Vec::new();
        for (wi, w) in self.touched.iter().enumerate() {
            let mut bits = w.load(Ordering::SeqCst);
            while bits != 0 {
                let c = wi as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let first = (c * CHUNK) as usize;
                let end = ((c + 1) * CHUNK).min(self.npages as u64) as usize;
                match out.last_mut() {
                    Some(last) if last.end == first => last.end = end,
                    _ => out.push(first..end),
                }
            }
        }
        out
    }

    fn entry(&self, page: u64) -> &AtomicU64 {
        &self.entries()[((page - self.base) / PS) as usize]
    }

    /// The page's write hint (see `hints`).
    fn hint(&self, page: u64) -> &AtomicU8 {
        let i = ((page - self.base) / PS) as usize;
        debug_assert!(i < self.npages);
        // SAFETY: the hints mapping holds at least `npages` bytes, zeroed by the
        // kernel and only ever accessed atomically; `i` is in range because `page`
        // lies in the region.
        unsafe { &*self.hints.ptr(0).add(i).cast::<AtomicU8>() }
    }

    /// A write to a clean (write-protected) page: mark it dirty and lift the
    /// protection, both under the entry's lock, so reclaim (which copies a page only
    /// with that lock held and the page protected) never takes a writable page for a
    /// clean one.
    fn write_fault(&self, page: u64) {
        let pte = self.entry(page);
        loop {
            let v = pte.load(Ordering::Acquire);
            match Pte::decode(v) {
                Pte::Present(_) => {
                    let Some(lv) = try_lock_present(pte, 0) else {
                        // Reclaim holds it for a moment (a copy or an eviction).
                        wait_unlocked(pte);
                        continue;
                    };
                    crate::trail::note(crate::trail::Op::Unprotect, page, Pte::pfn(lv).0, lv);
                    // Lifting the protection also wakes the thread; if it failed,
                    // wake it anyway: its retry faults again and comes back here.
                    if self.uffd.writeprotect(page, PS, 0).is_err() {
                        let _ = self.uffd.wake(page, PS);
                    }
                    unlock_entry(pte, 0, P_DIRTY);
                    self.hint(page).store(WRITE_HINT, Ordering::Relaxed);
                    Counters::inc(&self.eng.cnt.wp_faults);
                    return;
                }
                // Evicted meanwhile (or being filled): the retry faults MISSING.
                Pte::Busy => wait_until(|| pte.load(Ordering::Acquire) != BUSY),
                _ => {
                    let _ = self.uffd.wake(page, PS);
                    return;
                }
            }
        }
    }

    /// Notes a swap-in fault at `page`; true while recent swap-in faults of this
    /// region come mostly next to each other (see `seq_score`). Relaxed atomics: a
    /// lost update among concurrent faults only nudges the average.
    fn sequential(&self, page: u64) -> bool {
        let last = self.last_in.swap(page, Ordering::Relaxed);
        // Next to the last (or to the end of its read-around), or a few pages on:
        // the pages between were resident (a scan hits them without a fault).
        let near = page.abs_diff(last) == PS || (page > last && page - last <= SEQ_GAP * PS);
        let s = self.seq_score.load(Ordering::Relaxed);
        let s = s - s / 8 + if near { 32 } else { 0 };
        self.seq_score.store(s, Ordering::Relaxed);
        s >= 64
    }

    /// Claims (`BUSY`) up to `READ_AROUND` pages after `page` whose entries are
    /// swapped on `e`'s device at the slots right after `e`'s (or, `scattered`, at
    /// any other slot, passing over resident pages: a scan hits them), each with a
    /// free frame taken without reclaim; stops at the first that does not qualify.
    /// Records each claimed page, its old entry and its frame in `ra`; returns how
    /// many, and whether their slots follow `e`'s. The region's last swap-in page
    /// (`sequential`) moves to the last page looked at.
    fn claim_around(
        &self,
        page: u64,
        e: crate::addr::SwapEntry,
        ra: &mut [RaClaim; READ_AROUND],
        scattered: bool,
    ) -> (usize, bool) {
        let mut adjacent = true;
        let eng = &*self.eng;
        let mut n = 0;
        // At most a sixteenth of the budget (as the explicit path's readahead).
        let most = READ_AROUND.min(eng.frames.nframes() / 16);
        let (mut k, mut skipped, mut last) = (0u64, 0, page);
        while n < most {
            k += 1;
            let q = page + k * PS;
            if q >= self.base + self.len || eng.frames.free_count() <= eng.frames.wmark[0] {
                break;
            }
            let qp = self.entry(q);
            let qv = qp.load(Ordering::Acquire);
            match Pte::decode(qv) {
                Pte::Swapped(f)
                    if adjacent && f.dev == e.dev && f.slot == e.slot + n as u64 + 1 => {}
                Pte::Swapped(f) if scattered && f.dev == e.dev && f.slot != e.slot => {
                    adjacent = false;
                }
                Pte::Present(_) if scattered && skipped < most => {
                    // In memory already (or staged: no read either).
                    skipped += 1;
                    adjacent = false;
                    last = q;
                    continue;
                }
                _ => break,
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
            token_only(eng, qpfn);
            eng.ra_frames.fetch_add(1, Ordering::Relaxed);
            ra[n] = RaClaim {
                page: q,
                old: qv,
                pfn: qpfn,
            };
            last = q;
            n += 1;
        }
        self.last_in.store(last, Ordering::Relaxed);
        (n, adjacent)
    }

    /// Gives back the claims of `claim_around` from the `from`-th on: entries as
    /// they were, frames freed.
    fn unclaim_around(&self, ra: &[RaClaim], from: usize) {
        for c in ra.iter().skip(from) {
            self.eng.ra_frames.fetch_sub(1, Ordering::Relaxed);
            self.eng.frames.free(c.pfn);
            self.entry(c.page).store(c.old, Ordering::Release);
        }
    }

    /// Maps the pages read with `page` (page `i` of `ra` at page `gather[i]` of
    /// `bounce`): each checked against its checksum, mapped clean and protected,
    /// keeping its copy. One that fails its check or cannot be mapped stays on
    /// swap, and so do those after it.
    fn map_around(
        &self,
        e: crate::addr::SwapEntry,
        dev: &crate::swap::SwapDevice,
        bounce: &AlignedPages,
        ra: &[RaClaim],
        gather: &[usize],
    ) {
        let eng = &*self.eng;
        for (i, c) in ra.iter().enumerate() {
            let (q, qv, qpfn) = (c.page, c.old, c.pfn);
            let slot = match Pte::decode(qv) {
                Pte::Swapped(f) => f.slot,
                _ => e.slot + i as u64 + 1,
            };
            let at = gather[i];
            let ok = dev.verify(slot, bounce.page(at)).is_ok() && {
                // SAFETY: page i + 1 of the bounce buffer is ours, PAGE_SIZE long.
                let mapped = unsafe { self.uffd.copy(q, bounce.ptr(at), PS, uffd::COPY_WP) };
                matches!(mapped, Ok(true))
            };
            if !ok {
                self.unclaim_around(ra, i);
                return;
            }
            eng.transparent_out.fetch_sub(1, Ordering::Relaxed);
            eng.install_transparent(self.entry(q), qpfn, q, qv, false);
            eng.ra_frames.fetch_sub(1, Ordering::Relaxed);
            Counters::inc(&eng.cnt.pswpin);
            Counters::inc(&eng.cnt.read_around);
        }
    }

    /// Brings a staged page back, if it still is staged.
    fn missing_fault_staged(&self, pte: &AtomicU64, page: u64) -> Result<()> {
        loop {
            let v = pte.load(Ordering::Acquire);
            if v & (P_STAGED | crate::pte::TAG_MASK) != (P_STAGED | crate::pte::TAG_PRESENT) {
                return Ok(());
            }
            let Some(v) = try_lock_present(pte, 0) else {
                wait_unlocked(pte);
                continue;
            };
            if v & P_STAGED == 0 {
                unlock_entry(pte, 0, 0);
                return Ok(());
            }
            return self.unstage(pte, v, page, false);
        }
    }

    /// A staged page is used again: back into the mapping, no I/O, marked
    /// referenced. A dirty page (or any page on a write fault, which dirties it) is
    /// moved back (`UFFDIO_MOVE`, no copy). A clean page is copied back
    /// write-protected (`UFFDIO_COPY_MODE_WP`) and its staging page dropped: moved
    /// back, it would be writable for a moment before it could be protected, and a
    /// write by another thread in that moment would go unnoticed. Called with the
    /// entry locked (its unlocked value `v`); unlocks it.
    fn unstage(&self, pte: &AtomicU64, v: u64, page: u64, write: bool) -> Result<()> {
        let eng = &*self.eng;
        let st = eng
            .staging_addr(Pte::pfn(v))
            .expect("a staged page implies a staging area");
        let dirty = write || v & P_DIRTY != 0;
        if !dirty && !crate::sys::page_there(st) {
            // Copying from a missing staging page would fault inside the copy, in
            // the staging area, which no handler serves: the copy would never end.
            // (A move of a missing page fails by itself, `ENOENT`.)
            say_lost(Lost::FromStaging, "unstage", page, v, eng);
            unlock_entry(pte, 0, 0);
            return Err(Error::Io(std::io::ErrorKind::InvalidData.into()));
        }
        let done = if dirty {
            // SAFETY: the staged page is ours (entry locked, `P_STAGED`) and the
            // program's page is missing (that is why it faulted).
            unsafe { self.uffd.move_pages(page, st, PS, 0) }
        } else {
            // SAFETY: as above; the staged page is readable for PS bytes (checked
            // just above, and only the holder of the entry lock drops it).
            match unsafe { self.uffd.copy(page, st as *const u8, PS, uffd::COPY_WP) } {
                Ok(true) => {
                    // SAFETY: the staging page of a frame whose entry we hold
                    // locked.
                    unsafe {
                        crate::sys::madvise(st as *mut libc::c_void, PAGE_SIZE, libc::MADV_DONTNEED)
                    };
                    Ok(())
                }
                // Something is mapped there although the entry says staged: the
                // staged page stays where it is, the entry as it was.
                other => {
                    unlock_entry(pte, 0, 0);
                    return Err(not_mapped(other, "unstage", page, v, eng));
                }
            }
        };
        if let Err(e) = done {
            unlock_entry(pte, 0, 0);
            return Err(Error::Io(e));
        }
        let op = if dirty {
            crate::trail::Op::UnstageMove
        } else {
            crate::trail::Op::UnstageCopy
        };
        crate::trail::note(op, page, Pte::pfn(v).0, v);
        let heat = ((v & P_HEAT) + P_HEAT_ONE).min(P_HEAT);
        let set = P_ACCESSED | heat | if write { P_DIRTY } else { 0 };
        unlock_entry(pte, P_STAGED | P_HEAT, set);
        if write {
            self.hint(page).store(WRITE_HINT, Ordering::Relaxed);
        }
        Counters::inc(&eng.cnt.pgfault);
        Counters::inc(&eng.cnt.staged_refaults);
        Ok(())
    }

    /// A missing page: zero-fill or swap-in.
    ///
    /// A write fault (`write`) brings a swapped page in dirty, without its copy, as
    /// the kernel does: it is about to be written, and a clean, protected page would
    /// cost a second fault (write-protect) right away.
    fn missing_fault(
        &self,
        page: u64,
        write: bool,
        zero: &AlignedPages,
        bounce: &mut AlignedPages,
    ) -> Result<()> {
        let pte = self.entry(page);
        let eng = &*self.eng;
        loop {
            let v = pte.load(Ordering::Acquire);
            match Pte::decode(v) {
                Pte::Present(pfn) if v & P_STAGED != 0 => {
                    let Some(v) = try_lock_present(pte, 0) else {
                        wait_unlocked(pte);
                        continue;
                    };
                    if v & P_STAGED == 0 || Pte::pfn(v) != pfn {
                        unlock_entry(pte, 0, 0);
                        continue;
                    }
                    return self.unstage(pte, v, page, write);
                }
                Pte::Present(pfn) => {
                    if !crate::sys::page_there(page) {
                        // Mapped by its entry, missing from the mapping. Looked at
                        // again under the entry lock: a holder (an eviction or a
                        // staging, which take the page out before the entry says
                        // so; a write-protect fault; a page-out copy) may be
                        // moving it; then the entry changes or the page is there.
                        let Some(lv) = try_lock_present(pte, 0) else {
                            wait_unlocked(pte);
                            continue;
                        };
                        if lv & P_STAGED != 0 || Pte::pfn(lv) != pfn {
                            unlock_entry(pte, 0, 0);
                            continue;
                        }
                        if !crate::sys::page_there(page) {
                            // Nobody is moving it: it is lost. Waking the thread
                            // would make it fault again forever.
                            crate::trail::note(crate::trail::Op::Lost, page, pfn.0, lv);
                            say_lost(Lost::FromMapping, "missing-page fault", page, lv, eng);
                            unlock_entry(pte, 0, 0);
                            return Err(Error::Io(std::io::ErrorKind::InvalidData.into()));
                        }
                        unlock_entry(pte, 0, 0);
                    }
                    // Served already (two threads faulted the same page).
                    let _ = self.uffd.wake(page, PS);
                    return Ok(());
                }
                Pte::Busy => wait_until(|| pte.load(Ordering::Acquire) != BUSY),
                Pte::Empty => {
                    let Some(pfn) = claim_empty(eng, pte)? else {
                        continue;
                    };
                    // A forked child: the page may be its parent's, on the parent's
                    // swap (`mm::transparent_foreign`); else a zero page.
                    let idx = (page - self.base) / PS;
                    // The program thread waits for a read from the parent's swap.
                    let _stall = self.foreign.is_some().then(|| eng.psi.stall());
                    let foreign = match super::transparent_foreign::fill(
                        self.foreign.as_deref(),
                        idx,
                        bounce,
                    ) {
                        Ok(f) => f,
                        Err(e) => {
                            eng.frames.free(pfn);
                            pte.store(EMPTY, Ordering::Release);
                            return Err(e);
                        }
                    };
                    let src: &AlignedPages = if foreign.is_some() { bounce } else { zero };
                    // Before the page is mapped, so a process fork that copies the
                    // mapping copies a bitmap that covers it.
                    super::transparent_foreign::touch(&self.touched, idx);
                    // SAFETY: the zero page and the bounce page are ours and
                    // PAGE_SIZE long.
                    let mapped = unsafe { self.uffd.copy(page, src.ptr(0), PS, 0) };
                    if !matches!(mapped, Ok(true)) {
                        eng.frames.free(pfn);
                        pte.store(EMPTY, Ordering::Release);
                        return Err(not_mapped(mapped, "zero-fill fault", page, v, eng));
                    }
                    eng.install_transparent(pte, pfn, page, 0, true);
                    super::transparent_foreign::filled(self.foreign.as_deref(), eng, foreign);
                    Counters::inc(&eng.cnt.pgfault);
                    return Ok(());
                }
                Pte::Swapped(e) => {
                    if pte
                        .compare_exchange(v, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                        .is_err()
                    {
                        continue;
                    }
                    // The program thread is stalled until the page is mapped.
                    let _stall = eng.psi.stall();
                    let pfn = match crate::reclaim::alloc_frame(eng, AllocCtx::Reserve) {
                        Ok(p) => p,
                        Err(err) => {
                            pte.store(v, Ordering::Release);
                            return Err(err);
                        }
                    };
                    token_only(eng, pfn);
                    let Some(dev) = eng.swap.get(e.dev) else {
                        eng.frames.free(pfn);
                        pte.store(v, Ordering::Release);
                        Counters::inc(&eng.cnt.read_errors);
                        return Err(Error::Device {
                            dev: String::new(),
                            source: std::io::Error::from(std::io::ErrorKind::NotFound),
                        });
                    };
                    let keeps = eng.keeps_swap_copy(&dev);
                    // Claim the pages whose slots follow (see `READ_AROUND`).
                    let mut ra = [RaClaim::default(); READ_AROUND];
                    let (mut nra, mut adjacent) = (0, true);
                    if keeps && self.sequential(page) {
                        (nra, adjacent) =
                            self.claim_around(page, e, &mut ra, dev.reads_concurrently());
                    }
                    // Where each page lands in `bounce`: `gather[0]` this page's,
                    // `gather[i + 1]` read-around page `i`'s.
                    let mut gather = [0usize; 1 + READ_AROUND];
                    let read = crate::device::uring::polled(eng.read_poll, || {
                        if adjacent {
                            for (i, g) in gather.iter_mut().enumerate() {
                                *g = i;
                            }
                            dev.read_span(e.slot, bounce.pages_mut(1 + nra))
                        } else {
                            let mut slots = [0u64; 1 + READ_AROUND];
                            slots[0] = e.slot;
                            for (s, c) in slots[1..].iter_mut().zip(&ra[..nra]) {
                                if let Pte::Swapped(f) = Pte::decode(c.old) {
                                    *s = f.slot;
                                }
                            }
                            dev.read_gather(
                                &slots[..1 + nra],
                                bounce.pages_mut(1 + nra),
                                &mut gather[..1 + nra],
                            )
                        }
                    })
                    .and_then(|()| dev.verify(e.slot, bounce.page(gather[0])));
                    if let Err(err) = read {
                        eng.frames.free(pfn);
                        pte.store(v, Ordering::Release);
                        self.unclaim_around(&ra[..nra], 0);
                        Counters::inc(&eng.cnt.read_errors);
                        return Err(err);
                    }
                    // Keep the copy (map it protected, clean) unless the page is
                    // being written, or was written in its recent residencies (a
                    // write-protect fault would follow at once), or the device is
                    // being removed or swap is nearly full (as `fault_swapin`).
                    let hint = self.hint(page);
                    let h = hint.load(Ordering::Relaxed);
                    let written = write || h > 0;
                    if write {
                        hint.store(WRITE_HINT, Ordering::Relaxed);
                    } else if h > 0 {
                        hint.store(h - 1, Ordering::Relaxed);
                    }
                    let keep = !written && keeps;
                    let mode = if keep { uffd::COPY_WP } else { 0 };
                    // SAFETY: the bounce page is ours and PAGE_SIZE long.
                    let mapped = unsafe { self.uffd.copy(page, bounce.ptr(gather[0]), PS, mode) };
                    if !matches!(mapped, Ok(true)) {
                        eng.frames.free(pfn);
                        pte.store(v, Ordering::Release);
                        self.unclaim_around(&ra[..nra], 0);
                        return Err(not_mapped(mapped, "swap-in fault", page, v, eng));
                    }
                    eng.transparent_out.fetch_sub(1, Ordering::Relaxed);
                    if keep {
                        eng.install_transparent(pte, pfn, page, v, false);
                    } else {
                        eng.install_transparent(pte, pfn, page, 0, true);
                        eng.swap.put_live(e);
                    }
                    self.map_around(e, &dev, bounce, &ra[..nra], &gather[1..1 + nra]);
                    Counters::inc(&eng.cnt.pgfault);
                    Counters::inc(&eng.cnt.pgmajfault);
                    Counters::inc(&eng.cnt.pswpin);
                    return Ok(());
                }
            }
        }
    }
}

/// Claims an `EMPTY` entry (`BUSY`) and takes the frame that stands for its page
/// (`token_only`). `None`: another thread claimed it first. On an error (no frame)
/// the entry is `EMPTY` again.
pub(super) fn claim_empty(eng: &Engine, pte: &AtomicU64) -> Result<Option<crate::addr::Pfn>> {
    if pte
        .compare_exchange(EMPTY, BUSY, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return Ok(None);
    }
    let pfn = match crate::reclaim::alloc_frame(eng, AllocCtx::Normal) {
        Ok(p) => p,
        Err(e) => {
            pte.store(EMPTY, Ordering::Release);
            return Err(e);
        }
    };
    token_only(eng, pfn);
    Ok(Some(pfn))
}

/// The error for a `UFFDIO_COPY` that did not map the page: its own error, or
/// `EEXIST` (`Ok(false)`): a page is already in the mapping although the entry
/// (`entry`, as it was before the fault claimed it) says none is — a broken
/// invariant, said on stderr (`reclaim::say_lost`); the page there is left alone
/// (it is not what the entry describes, and mapping over it is impossible).
fn not_mapped(r: std::io::Result<bool>, who: &str, page: u64, entry: u64, eng: &Engine) -> Error {
    match r {
        Err(e) => Error::Io(e),
        Ok(_) => {
            say_lost(Lost::AlreadyMapped, who, page, entry, eng);
            Error::Io(std::io::ErrorKind::AlreadyExists.into())
        }
    }
}

/// A frame that only stands for a transparent page in the budget: its own memory is
/// not used, so whatever an earlier page left there is given back to the kernel (the
/// process's resident memory must not count the page twice).
pub(super) fn token_only(eng: &Engine, pfn: crate::addr::Pfn) {
    if !eng.arena_used.load(Ordering::Relaxed) {
        // No frame ever held a page in the arena's own memory (only transparent pages
        // so far, as under `usermm exec`): its memory was never touched.
        return;
    }
    // SAFETY: the frame is ours (just allocated) and lies in the arena mapping.
    unsafe {
        crate::sys::madvise(
            eng.frames.frame_ptr(pfn).cast(),
            PAGE_SIZE,
            libc::MADV_DONTNEED,
        )
    };
}

impl Drop for TRegion {
    fn drop(&mut self) {
        // Entries first (frames back to the budget, slots back to their devices),
        // so reclaim never touches the mapping after it is gone; then the mapping.
        for e in self.entries() {
            let v = e.load(Ordering::Acquire);
            if v != EMPTY {
                if matches!(Pte::decode(v), Pte::Swapped(_)) {
                    self.eng.transparent_out.fetch_sub(1, Ordering::Relaxed);
                }
                crate::mm::entry::release_entry(&self.eng, e);
            }
        }
        let _ = self.uffd.unregister(self.base, self.len);
        // SAFETY: the mapping made in `Host::map`; nothing refers to it any more.
        unsafe { crate::sys::munmap(self.base as *mut libc::c_void, self.len as usize) };
    }
}

/// A region of ordinary memory in the Vm's budget (see `Vm::map_transparent`): plain
/// loads and stores through `as_ptr()`, from any thread; system calls may read and
/// write it too. Dropping it unmaps it.
#[derive(Debug)]
pub struct TransparentRegion {
    host: Arc<Host>,
    pub(super) region: Arc<TRegion>,
    /// Keeps the Vm (and so the handler thread) alive while the region exists.
    _vm: Arc<dyn std::any::Any + Send + Sync>,
}

impl TransparentRegion {
    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.region.base as *mut u8
    }
    /// Length in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.region.len as usize
    }
    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        self.region.len == 0
    }
}

impl Drop for TransparentRegion {
    fn drop(&mut self) {
        let mut list = self.host.regions.lock();
        list.retain(|r| !Arc::ptr_eq(r, &self.region));
    }
}

/// Discarding pages (`TransparentRegion::discard`): what `MADV_DONTNEED` is to an
/// ordinary mapping. Kept apart from the fault path above.
impl TRegion {
    /// Gives up the pages of `[start, start + len)` (page-aligned, inside the
    /// region): each page's frame and swap slot go back and its entry becomes
    /// `EMPTY`, so the page reads as zeros and costs nothing until touched again.
    ///
    /// Per page, under the protocol of `crate::pte`:
    /// - `BUSY` (the handler is filling it): wait until it is published, then look
    ///   again, as `missing_fault` does.
    /// - `Swapped`: claim it away (CAS to `EMPTY`), put the slot back, and count it
    ///   out of `transparent_out` (as `Drop` does). It is not in the mapping
    ///   (reclaim dropped it before the entry said so), so no `MADV_DONTNEED`.
    /// - Present: frame lock, then the entry's lock (waiting out a write-protect
    ///   fault or a page-out copy, which hold it briefly); with both held the page is
    ///   dropped from the mapping (`MADV_DONTNEED`), so a reclaim copy (made only
    ///   with the entry locked) never reads an unmapped page; then the entry becomes
    ///   `EMPTY` (which unlocks it), the frame leaves the reverse map, its slot (a
    ///   clean copy) goes back, and the frame is freed. A page-out in flight finds
    ///   the frame gone and gives its slot back (`finish_writeback`).
    /// - `EMPTY`: nothing is mapped there, nothing to do.
    ///
    /// A thread that touches the page meanwhile sees either the old bytes or zeros
    /// (the program's own race: it is discarding memory it still uses).
    fn discard(&self, start: u64, len: u64) {
        debug_assert!(start.is_multiple_of(PS));
        debug_assert!(len.is_multiple_of(PS));
        debug_assert!(start >= self.base && start + len <= self.base + self.len);
        let eng = &*self.eng;
        // In a fork child: these pages no longer hold their fork-time bytes, so
        // their records in the parent's swap are never to be read.
        super::transparent_foreign::forget(
            self.foreign.as_deref(),
            (start - self.base) / PS,
            len / PS,
        );
        let mut page = start;
        while page < start + len {
            self.discard_page(eng, page);
            page += PS;
        }
    }

    fn discard_page(&self, eng: &Engine, page: u64) {
        let pte = self.entry(page);
        loop {
            let v = pte.load(Ordering::Acquire);
            match Pte::decode(v) {
                Pte::Empty => return,
                Pte::Busy => wait_until(|| pte.load(Ordering::Acquire) != BUSY),
                Pte::Swapped(e) => {
                    if pte
                        .compare_exchange(v, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        eng.transparent_out.fetch_sub(1, Ordering::Relaxed);
                        eng.swap.put(e);
                        crate::trail::note(crate::trail::Op::DiscardSwapped, page, 0, v);
                        return;
                    }
                }
                Pte::Present(pfn) => {
                    let d = eng.frames.desc(pfn);
                    d.lock();
                    // Waits out a short holder of the entry lock (a write-protect
                    // fault, a reclaim copy) with the frame lock held, as
                    // `lock_mappings` does.
                    let Some(v) = lock_present(pte, pfn) else {
                        // It changed (evicted meanwhile): look again.
                        d.unlock();
                        continue;
                    };
                    if v & P_STAGED != 0 {
                        // The page is in its staging page, not in the mapping.
                        crate::reclaim::drop_staged(eng, pfn);
                    }
                    self.hint(page).store(0, Ordering::Relaxed);
                    // SAFETY: advice on one page of our own live mapping; its entry
                    // is locked by us, so no reclaim copy reads it meanwhile.
                    unsafe {
                        crate::sys::madvise(
                            page as *mut libc::c_void,
                            PAGE_SIZE,
                            libc::MADV_DONTNEED,
                        )
                    };
                    pte.store(EMPTY, Ordering::Release);
                    crate::pte::released(pte);
                    crate::trail::note(crate::trail::Op::Discard, page, pfn.0, v);
                    let left = eng.rmap.remove(d, pfn, pte);
                    debug_assert_eq!(left, 0, "a transparent frame has one mapping");
                    eng.swap.put_encoded(d.swap.swap(0, Ordering::Relaxed));
                    d.unlock();
                    eng.frames.free(pfn);
                    return;
                }
            }
        }
    }
}

impl TransparentRegion {
    /// Discards the pages of `[offset, offset + len)` of this region, as
    /// `MADV_DONTNEED` does for ordinary memory: their frames go back to the budget
    /// and their swap slots to their devices, and they read as zeros afterwards.
    /// For an allocator over the region (`usermm exec`'s heap gives freed memory
    /// back this way). `offset` and `len` must be multiples of the page size and
    /// the range must lie inside the region (`InvalidArgument` otherwise).
    #[doc(hidden)]
    pub fn discard(&self, offset: usize, len: usize) -> Result<()> {
        let end = offset.checked_add(len);
        if !offset.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || end.is_none_or(|e| e > self.region.len as usize)
        {
            return Err(Error::InvalidArgument(format!(
                "discard of {len} bytes at offset {offset} of a {}-byte transparent region",
                self.region.len
            )));
        }
        self.region
            .discard(self.region.base + offset as u64, len as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The fault path's answers to a broken invariant (a page the page tables hold
    //! and the entry does not describe, or the reverse): an error and a line on
    //! stderr, never a page installed over another, never a copy that cannot end.
    //! The fault functions are called directly (not through a touch, whose SIGBUS
    //! would end this test process).
    use super::*;
    use crate::pte::P_LOCK;
    use crate::{Config, SwapSpec, Vm};

    /// A Vm with a 16 MiB swap file and `cfg`, or `None` (SKIP on stderr) where
    /// transparent memory is unavailable; a failure if CI requires it.
    fn setup(cfg: Config) -> Option<(tempfile::TempDir, Vm)> {
        let dir = tempfile::tempdir().unwrap();
        let vm = Vm::new(cfg).unwrap();
        vm.swapon(SwapSpec::file(dir.path().join("swap"), 16 << 20))
            .unwrap();
        let required = std::env::var("USERMM_REQUIRE_UFFD").as_deref() == Ok("1");
        let Err(e) = vm.map_transparent(PAGE_SIZE) else {
            return Some((dir, vm));
        };
        assert!(!required, "userfaultfd required but unavailable: {e}");
        eprintln!("SKIP: transparent memory unavailable here: {e}");
        None
    }

    /// A page put into the mapping behind usermm's back (here a `UFFDIO_COPY` of
    /// the test's own) under an entry that says the page was never touched: a fault
    /// on it fails (`EEXIST` from the copy) and leaves both as they were — the
    /// entry empty, no frame taken, the bytes there not overwritten with zeros.
    #[test]
    fn a_page_mapped_behind_an_unmapped_entry_is_not_installed_over() {
        let Some((_d, vm)) = setup(Config::default().memory_budget(16 << 20)) else {
            return;
        };
        let r = vm.map_transparent(16 * PAGE_SIZE).unwrap();
        let t = &r.region;
        let page = t.base + 3 * PS;
        let mut src = AlignedPages::new(1).unwrap();
        src.page_mut(0).fill(0xab);
        // SAFETY: a page of our region that nothing has touched; the source is
        // ours, PAGE_SIZE long.
        let placed = unsafe { t.uffd.copy(page, src.ptr(0), PS, 0) };
        assert!(matches!(placed, Ok(true)), "{placed:?}");
        assert_eq!(t.entry(page).load(Ordering::Acquire), EMPTY);
        let used = vm.stats().total_frames - vm.stats().free_frames;
        let zero = AlignedPages::new(1).unwrap();
        let mut bounce = AlignedPages::new(1 + READ_AROUND).unwrap();
        let res = t.missing_fault(page, false, &zero, &mut bounce);
        assert!(res.is_err(), "a fault over a page already there succeeded");
        assert_eq!(
            t.entry(page).load(Ordering::Acquire),
            EMPTY,
            "entry changed"
        );
        assert_eq!(
            vm.stats().total_frames - vm.stats().free_frames,
            used,
            "the failed fault kept a frame"
        );
        // SAFETY: inside our region, mapped (placed above).
        let b = unsafe { std::ptr::read_volatile((page + 100) as *const u8) };
        assert_eq!(b, 0xab, "the page there was overwritten");
    }

    /// A staged page whose staging page vanished (dropped behind usermm's back)
    /// and that is clean, so it would be copied back: the fault fails at once with
    /// the entry unlocked, instead of a copy whose source faults in the staging
    /// area, which no handler serves (the copy would never end). On a thread of its
    /// own, bounded: a regression fails after 20 s instead of hanging.
    #[test]
    fn a_staged_page_whose_staging_page_vanished_fails_instead_of_hanging() {
        let cfg = Config::default().memory_budget(1 << 20).stage_every(1);
        let Some((_d, vm)) = setup(cfg) else {
            return;
        };
        let r = vm.map_transparent(8 << 20).unwrap();
        let t = r.region.clone();
        // All on one thread, which takes the entry lock and hands it to `unstage`
        // (the lock validator follows locks per thread).
        let (tx, rx) = std::sync::mpsc::channel();
        let t2 = t.clone();
        std::thread::spawn(move || {
            let t = t2;
            // Pressure: reclaim stages pages (every visit, `stage_every(1)`).
            let found = (0..50).find_map(|round| {
                for p in 0..t.npages {
                    // SAFETY: inside our region.
                    unsafe { ((t.base + p as u64 * PS) as *mut u64).write_volatile(round + 1) };
                }
                (0..t.npages).find_map(|p| {
                    let page = t.base + p as u64 * PS;
                    let pte = t.entry(page);
                    let v = try_lock_present(pte, 0)?;
                    if v & P_STAGED != 0 {
                        return Some((page, v));
                    }
                    unlock_entry(pte, 0, 0);
                    None
                })
            });
            let Some((page, v)) = found else {
                let _ = tx.send(Err("no page was staged under pressure with stage_every(1)"));
                return;
            };
            // Entry locked by us: drop the staged page from its staging page.
            let st = t.eng.staging_addr(Pte::pfn(v)).unwrap();
            // SAFETY: the staging page of a frame whose entry we hold locked.
            unsafe { crate::sys::madvise(st as *mut libc::c_void, PAGE_SIZE, libc::MADV_DONTNEED) };
            if crate::sys::page_there(st) {
                let _ = tx.send(Err("the staging page is still there after MADV_DONTNEED"));
                return;
            }
            // As if clean (a clean page is copied back; a dirty one moved, and a
            // move of a missing page fails by itself).
            let res = t.unstage(t.entry(page), v & !P_DIRTY, page, false);
            let _ = tx.send(Ok((res.is_err(), t.entry(page).load(Ordering::Acquire))));
        });
        let (failed, after) = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("bringing back a staged page whose staging page is missing hung")
            .unwrap();
        assert!(failed, "a page with no bytes behind it was brought back");
        // Still staged and unlocked, or (reclaim is still at work: the budget is
        // 1 MiB) evicted since, which it could only do with the entry unlocked.
        match Pte::decode(after) {
            Pte::Present(_) => {
                assert_eq!(after & P_LOCK, 0, "the entry stayed locked");
                assert_ne!(after & P_STAGED, 0, "the entry no longer says staged");
            }
            Pte::Swapped(_) => {}
            other => panic!("the entry became {other:?} ({after:#x})"),
        }
    }

    /// A handler waiting for reclaim's entry lock while reclaim evicts the page:
    /// the wait ends when the entry stops being a locked present entry. A swapped
    /// entry keeps its device number where a present one has `P_LOCK` (bit 2 is bit
    /// 0 of the device), so a wait on that bit alone never ended for a page evicted
    /// to an odd-numbered device (the second device swapped on), and the faulting
    /// thread was never woken. The eviction is played by the test: it holds the
    /// entry lock as reclaim does, then stores a swapped entry on device 1.
    #[test]
    fn a_wait_for_reclaims_lock_ends_when_the_page_goes_to_an_odd_device() {
        let Some((_d, vm)) = setup(Config::default().memory_budget(16 << 20)) else {
            return;
        };
        let r = vm.map_transparent(16 * PAGE_SIZE).unwrap();
        let t = r.region.clone();
        let page = t.base + 2 * PS;
        // SAFETY: inside our region.
        unsafe { (page as *mut u64).write_volatile(7) };
        let pte = t.entry(page);
        // The fault's copy wakes us before its handler installs the entry: wait
        // for the entry (bounded).
        let t0 = std::time::Instant::now();
        let v = loop {
            if let Some(v) = try_lock_present(pte, 0) {
                break v;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "a touched page never became present and unlocked"
            );
            std::thread::yield_now();
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let t2 = t.clone();
        std::thread::spawn(move || {
            t2.write_fault(page);
            let _ = tx.send(());
        });
        // The handler is waiting for the lock (or about to).
        std::thread::sleep(std::time::Duration::from_millis(50));
        let swapped = Pte::swapped(crate::addr::SwapEntry { dev: 1, slot: 5 });
        assert_ne!(
            swapped & P_LOCK,
            0,
            "the test needs a swapped entry with bit 2 set"
        );
        pte.store(swapped, Ordering::Release);
        let ended = rx.recv_timeout(std::time::Duration::from_secs(10));
        // Put the page back as it was (locked by us), then unlock it.
        pte.store(v, Ordering::Release);
        unlock_entry(pte, 0, 0);
        assert!(
            ended.is_ok(),
            "the write-protect handler still waits for a lock on an entry that is swapped"
        );
        // SAFETY: inside our region, present again.
        assert_eq!(unsafe { (page as *const u64).read_volatile() }, 7);
    }

    /// A page a device may write into behind the page tables (pinned: here an
    /// io_uring fixed buffer, which the kernel pins for as long as it is
    /// registered) is never copied out and dropped by reclaim: `UFFDIO_MOVE`
    /// refuses it (`EBUSY`), and evicting it in place instead (write-protect, copy,
    /// drop) would leave the device's later write in a page the program no longer
    /// maps — the program would read the old copy back from swap. Under pressure
    /// the page stays mapped; a read from a file into the buffer is then what the
    /// program reads.
    ///
    /// Run in a child process (this test binary, re-run with this test alone): a
    /// fork anywhere in a process turns the distinction off for good
    /// (`process_forked`), and other tests of this binary fork.
    #[test]
    fn a_pinned_page_stays_mapped_and_keeps_what_a_device_writes_into_it() {
        const NAME: &str =
            "mm::transparent::tests::a_pinned_page_stays_mapped_and_keeps_what_a_device_writes_into_it";
        if std::env::var("USERMM_PINNED_CHILD").as_deref() != Ok("1") {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env("USERMM_PINNED_CHILD", "1")
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "the child failed: {text}");
            assert!(
                text.contains("1 passed") || text.contains("SKIP"),
                "the child ran no test: {text}"
            );
            if text.contains("SKIP") {
                eprintln!("SKIP (in the child): {text}");
            }
            return;
        }
        assert!(
            !crate::sys::process_forked(),
            "the child process has forked already"
        );
        let cfg = Config::default().memory_budget(1 << 20).stage_every(1);
        let Some((d, vm)) = setup(cfg) else {
            return;
        };
        let r = vm.map_transparent(8 << 20).unwrap();
        let t = r.region.clone();
        if t.eng.staging.load(Ordering::Relaxed) == 0 {
            // No `UFFDIO_MOVE` (before Linux 6.8): a pin cannot be seen.
            let required = std::env::var("USERMM_REQUIRE_UFFD").as_deref() == Ok("1");
            assert!(!required, "UFFDIO_MOVE required but unavailable here");
            eprintln!("SKIP: no UFFDIO_MOVE here (pinned pages are evicted in place)");
            return;
        }
        let page = t.base;
        // SAFETY: the first page of our region.
        unsafe { std::ptr::write_bytes(page as *mut u8, 0x11, PAGE_SIZE) };
        let mut ring = io_uring::IoUring::new(4).unwrap();
        let iov = libc::iovec {
            iov_base: page as *mut libc::c_void,
            iov_len: PAGE_SIZE,
        };
        // SAFETY: the buffer is a page of our region, which outlives the
        // registration (unregistered below, before the region goes).
        if let Err(e) = unsafe { ring.submitter().register_buffers(&[iov]) } {
            let required = std::env::var("USERMM_REQUIRE_URING").as_deref() == Ok("1");
            assert!(
                !required,
                "io_uring fixed buffers required but refused: {e}"
            );
            eprintln!("SKIP: io_uring fixed buffers refused here: {e}");
            return;
        }
        let pinned_at_start = vm.stats().pinned_skips;
        for round in 0..20u64 {
            for p in 1..t.npages {
                // SAFETY: inside our region.
                unsafe { ((t.base + p as u64 * PS) as *mut u64).write_volatile(round + 1) };
            }
            let v = t.entry(page).load(Ordering::Acquire);
            assert!(
                matches!(Pte::decode(v), Pte::Present(_)) && v & P_STAGED == 0,
                "a pinned page left its mapping in round {round}: entry {v:#x}"
            );
        }
        assert!(
            vm.stats().pinned_skips > pinned_at_start,
            "reclaim never came to the pinned page (the test proves nothing)"
        );
        // The device writes into the pinned page: a read from a file of 0x22s.
        let path = d.path().join("twos");
        std::fs::write(&path, vec![0x22u8; PAGE_SIZE]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        let e = io_uring::opcode::ReadFixed::new(
            io_uring::types::Fd(f.as_raw_fd()),
            page as *mut u8,
            PAGE_SIZE as u32,
            0,
        )
        .offset(0)
        .build();
        // SAFETY: the fixed buffer 0 is the registered page, live until the
        // completion is reaped just below.
        unsafe { ring.submission().push(&e).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let res = ring.completion().next().unwrap().result();
        assert_eq!(res, PAGE_SIZE as i32, "the fixed read failed: {res}");
        ring.submitter().unregister_buffers().unwrap();
        drop(ring);
        // SAFETY: the first page of our region.
        let got = unsafe { std::slice::from_raw_parts(page as *const u8, PAGE_SIZE) };
        assert!(
            got.iter().all(|&b| b == 0x22),
            "the program does not see what the device wrote into its pinned page \
             (first byte {:#x})",
            got[0]
        );
    }

    /// Two forks at once (two threads of a program): each holds a freeze, and the
    /// first to finish must not lift the second's (the freeze is a count).
    #[test]
    fn a_freeze_lasts_until_the_last_fork_lets_go() {
        let Some((_d, vm)) = setup(Config::default().memory_budget(16 << 20)) else {
            return;
        };
        let r = vm.map_transparent(PAGE_SIZE).unwrap();
        let frozen = || r.region.eng.transparent_frozen.load(Ordering::SeqCst);
        let first = vm.freeze_transparent_eviction();
        let second = vm.freeze_transparent_eviction();
        drop(first);
        assert_ne!(
            frozen(),
            0,
            "the first fork's end lifted the second fork's freeze"
        );
        drop(second);
        assert_eq!(
            frozen(),
            0,
            "no fork holds a freeze, yet evictions stay frozen"
        );
    }
}
