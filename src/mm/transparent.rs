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
//! are): a dirty page is write-protected (`UFFDIO_WRITEPROTECT`), copied into a
//! page-out request and written by a page-I/O thread; a clean page with a valid copy
//! is dropped from the mapping (`MADV_DONTNEED`) and its entry becomes `Swapped`. The
//! next touch faults (MISSING) and the handler reads the slot (checksum checked) into
//! its own buffer and maps it write-protected (`UFFDIO_COPY_MODE_WP`), clean, keeping
//! the copy. The first write to a clean page faults (WP): the handler marks the entry
//! dirty and lifts the protection, holding the entry's lock meanwhile, so reclaim
//! never sees a writable page as clean.
//!
//! ## Knowing what is hot
//! usermm does not see loads and stores to a transparent page. It learns dirtiness
//! from write-protect faults (above) and recency from faults only: a page is marked
//! referenced when it is faulted in, and the CLOCK hand clears that mark on its first
//! pass and reclaims the page on the next, so transparent pages leave in roughly the
//! order they came (FIFO with a second chance). Sampling (unmapping a page while
//! keeping its copy, for a cheap refault) is not done yet.
//!
//! ## Who serves faults
//! One handler thread per Vm reads the descriptor (message mode, so faults the kernel
//! takes inside system calls are served too) and resolves each fault itself: frame,
//! device read into a preallocated buffer, `UFFDIO_COPY`. It allocates nothing from
//! the heap on that path and takes no lock the faulting code could hold (the regions
//! list is a leaf lock of ours, never held by program code).
//!
//! When no frame or slot can be had or the device fails the read, the faulting
//! thread gets SIGBUS, with a line on stderr, as the kernel does on a failed fault;
//! never silent zeros.
//!
//! ## Locking
//! `Host::regions` (Mutex, leaf): held only to add, remove or look up a region. Entry
//! bit locks and frame locks as in `crate::pte`/`crate::frame`; the handler holds an
//! entry's `P_LOCK` across the `UFFDIO_WRITEPROTECT` that lifts the protection.
//! The `BUSY` claim is held across the frame allocation and the device read, as on
//! the explicit fault path.

use super::transparent_foreign::Foreign;
use crate::addr::PAGE_SIZE;
use crate::device::AlignedPages;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::frame::AllocCtx;
use crate::pte::{try_lock_present, unlock_entry, Pte, BUSY, EMPTY, P_DIRTY, P_LOCK};
use crate::stats::Counters;
use crate::sync::{wait_until, Arc, AtomicU64, Mutex, Ordering};
use crate::uffd::{self, Fault, Uffd};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread::JoinHandle;

const PS: u64 = PAGE_SIZE as u64;

/// The per-Vm part: one descriptor and one handler thread for all regions.
#[derive(Debug)]
pub(crate) struct Host {
    pub(super) eng: Arc<Engine>,
    pub(super) uffd: Arc<Uffd>,
    /// Live regions, by start address. Protected by its mutex (a leaf).
    pub(super) regions: Mutex<Vec<Arc<TRegion>>>,
    /// Written once to stop the handler.
    stop: OwnedFd,
    /// The handler thread (joined when the Vm goes).
    thread: Mutex<Option<JoinHandle<()>>>,
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
    /// Opens the descriptor and starts the handler thread.
    pub fn start(eng: Arc<Engine>) -> Result<Arc<Host>> {
        let want = uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_THREAD_ID;
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
        let host = Arc::new(Host {
            eng,
            uffd: u,
            regions: Mutex::new(Vec::new()),
            stop,
            thread: Mutex::new(None),
        });
        let h = host.clone();
        // Preallocated here: the zero page and the read buffer of the handler.
        let zero = AlignedPages::new(1)?;
        let bounce = AlignedPages::new(1)?;
        let t = std::thread::Builder::new()
            .name("usermm-uffd".into())
            .spawn(move || {
                crate::sync::mark_engine_thread();
                h.run(zero, bounce)
            })?;
        *host.thread.lock() = Some(t);
        Ok(host)
    }

    /// Stops the handler thread (the Vm is going away).
    pub fn shutdown(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&raw const one).cast(), 8) };
        if let Some(t) = self.thread.lock().take() {
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
        // SAFETY: a fresh private anonymous mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        // No transparent huge pages: the kernel would fill 2 MiB at a time behind
        // our back.
        // SAFETY: advice on the mapping we just made.
        unsafe { libc::madvise(p, len as usize, libc::MADV_NOHUGEPAGE) };
        let base = p as u64;
        if let Err(e) = self
            .uffd
            .register(base, len, uffd::MODE_MISSING | uffd::MODE_WP)
        {
            // SAFETY: unmapping what we mapped above.
            unsafe { libc::munmap(p, len as usize) };
            return Err(Error::Io(e));
        }
        self.insert(base, len, entries, None, vm)
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
            while let Ok(Some(f)) = self.uffd.read_fault() {
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

/// Tells the faulting thread its fault failed: a line on stderr (no allocation: a
/// fixed message) and SIGBUS, as the kernel does when it cannot fill a page.
fn sigbus(tid: u32, e: &Error) {
    let msg: &[u8] = match e {
        Error::OutOfMemory => b"usermm: transparent page fault failed: out of memory (no frame can be reclaimed); SIGBUS\n",
        Error::OutOfSwap => b"usermm: transparent page fault failed: memory and every swap device are full; SIGBUS\n",
        Error::Device { .. } => b"usermm: transparent page fault failed: a swap device failed the read; SIGBUS\n",
        _ => b"usermm: transparent page fault failed; SIGBUS\n",
    };
    // SAFETY: writing a static buffer to stderr; sending a signal to a thread of this
    // process (tid from the fault message; 0 means unknown: the process).
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
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

    fn entry(&self, page: u64) -> &AtomicU64 {
        &self.entries()[((page - self.base) / PS) as usize]
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
                    let Some(_) = try_lock_present(pte, 0) else {
                        // Reclaim holds it for a moment (a copy or an eviction).
                        wait_until(|| pte.load(Ordering::Acquire) & P_LOCK == 0);
                        continue;
                    };
                    let _ = self.uffd.writeprotect(page, PS, 0);
                    unlock_entry(pte, 0, P_DIRTY);
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
                Pte::Present(_) => {
                    // Served already (two threads faulted the same page).
                    let _ = self.uffd.wake(page, PS);
                    return Ok(());
                }
                Pte::Busy => wait_until(|| pte.load(Ordering::Acquire) != BUSY),
                Pte::Empty => {
                    if pte
                        .compare_exchange(EMPTY, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                        .is_err()
                    {
                        continue;
                    }
                    let pfn = match crate::reclaim::alloc_frame(eng, AllocCtx::Normal) {
                        Ok(p) => p,
                        Err(e) => {
                            pte.store(EMPTY, Ordering::Release);
                            return Err(e);
                        }
                    };
                    token_only(eng, pfn);
                    // A forked child: the page may be its parent's, on the parent's
                    // swap (`mm::transparent_foreign`); else a zero page.
                    let idx = (page - self.base) / PS;
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
                    if let Err(e) = mapped {
                        eng.frames.free(pfn);
                        pte.store(EMPTY, Ordering::Release);
                        return Err(Error::Io(e));
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
                    let pfn = match crate::reclaim::alloc_frame(eng, AllocCtx::Reserve) {
                        Ok(p) => p,
                        Err(err) => {
                            pte.store(v, Ordering::Release);
                            return Err(err);
                        }
                    };
                    token_only(eng, pfn);
                    let dev = eng.swap.get(e.dev);
                    let read = match &dev {
                        Some(d) => d.read(e.slot, bounce.page_mut(0)),
                        None => Err(Error::Device {
                            dev: String::new(),
                            source: std::io::Error::from(std::io::ErrorKind::NotFound),
                        }),
                    };
                    if let Err(err) = read {
                        eng.frames.free(pfn);
                        pte.store(v, Ordering::Release);
                        Counters::inc(&eng.cnt.read_errors);
                        return Err(err);
                    }
                    // Keep the copy (map it protected, clean) unless the device is
                    // being removed or swap is nearly full (as `fault_swapin`).
                    let keep = !write && dev.as_ref().is_some_and(|d| eng.keeps_swap_copy(d));
                    let mode = if keep { uffd::COPY_WP } else { 0 };
                    // SAFETY: the bounce page is ours and PAGE_SIZE long.
                    let mapped = unsafe { self.uffd.copy(page, bounce.ptr(0), PS, mode) };
                    if let Err(err) = mapped {
                        eng.frames.free(pfn);
                        pte.store(v, Ordering::Release);
                        return Err(Error::Io(err));
                    }
                    eng.transparent_out.fetch_sub(1, Ordering::Relaxed);
                    if keep {
                        eng.install_transparent(pte, pfn, page, v, false);
                    } else {
                        eng.install_transparent(pte, pfn, page, 0, true);
                        eng.swap.put(e);
                    }
                    Counters::inc(&eng.cnt.pgfault);
                    Counters::inc(&eng.cnt.pgmajfault);
                    Counters::inc(&eng.cnt.pswpin);
                    return Ok(());
                }
            }
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
        libc::madvise(
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
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len as usize) };
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
