//! Process fork of transparent regions: what `usermm exec`'s `fork()` wrapper uses so
//! that a child that does not exec sees exactly its parent's memory, pages that were
//! on swap included, under a budget of its own.
//!
//! Owns: `ForkPrep` (the parent's side of one fork: the slot references taken for
//! the child, the table the child reads, the pipe that says when the child is done),
//! `ForkChild` (that table, carried into the child) and the child's adoption
//! (`adopt`, `repair`). The fault-path half — the table as the child's handler
//! consults it (`Foreign`), the descriptors whose closing tells the ancestors that
//! their slots are no longer needed (`Keepers`), the touched-chunk bitmap — is
//! `mm::transparent_foreign`, below `transparent` (no import cycle).
//!
//! ## Why
//! The kernel does not carry userfaultfd registration into a fork child (without
//! `UFFD_FEATURE_EVENT_FORK`): in the child a page that was on swap in the parent is
//! simply missing from an unregistered anonymous mapping, and reads as zeros. So the
//! child must register the heap with a descriptor of its own (a new Vm: the budget
//! is per process) and know, for every such page, where its bytes are.
//!
//! ## Parent (`prepare`, then `ForkPrep::parent`)
//! With transparent evictions frozen (`Vm::freeze_transparent_eviction`: a page
//! resident at the scan is still resident when the kernel copies the mapping), every
//! entry of the region's touched chunks is read (`TRegion::touched`: a bit per 2 MiB,
//! set by the handler when it fills a page there for the first time; the heap's
//! allocator works from the top of a 64 GiB region, so a high mark would not do). A `Swapped` entry is claimed `BUSY`
//! for a moment (as `mm::entry::copy_entry` does) while its slot gets one more
//! reference, so the parent never frees or rewrites that slot while the child may
//! read it; the record is (page, the device's shared descriptor, the slot's byte
//! offset, its checksum). A slot on a device that has no shared descriptor (NBD,
//! mirror: a socket cannot be shared by two processes) refuses the fork. A pipe
//! (both ends `O_CLOEXEC`) carries no data: the child keeps the write end; a thread
//! of the parent (`usermm-forkwait`, one per live child that holds references) reads
//! until EOF — the child exited, exec'd, or has taken every page it needed — and then
//! drops the references. It is the only thread that waits for the child; faults
//! never wait for it.
//!
//! ## Child (`ForkPrep::child`, then `adopt` on a new Vm)
//! The parent's threads do not exist in the child and its locks may have been held
//! by them: the child never calls into the old Vm; it reads only the table built
//! before the fork and the old regions' entries and touched bitmaps (the child's
//! copy of them, as they were at the fork). It closes the old
//! descriptor, registers each region with the new Vm's userfaultfd (missing and
//! write-protect) and then asks the kernel (`mincore`) which pages its mapping holds:
//! each one gets a token frame in the new budget, dirty (fork cleared the pages'
//! write-protect bits, so the child may write them unnoticed; the parent's swap copy
//! is not the child's). Every other page is missing: a page with a record is
//! "foreign" and its first fault reads it with `pread` from the recorded descriptor
//! into the handler's buffer, checks the checksum and maps it dirty; the rest are
//! zero pages as usual. The records are a sorted boxed slice, looked up by binary
//! search with a "taken" flag per record, built at adoption: the fault path
//! allocates nothing. When the last record is taken the child closes its keepers
//! early, so the parent frees its slots before the child exits.
//!
//! Code of the C library runs in the child before the heap is registered again
//! (glibc's fork resets its streams' locks; every thread the new Vm starts reads
//! the locale data), and the kernel fills a page it touches that was on the
//! parent's swap with zeros. `usermm exec` brings the known ones in before the fork;
//! for the rest, a page resident in the child whose entry in the parent was
//! `Swapped` at the fork is such a page, and `repair` puts its bytes back from the
//! record, keeping the non-zero bytes the child wrote there (and says so on stderr).
//!
//! A child that forks again (a grandchild) carries its untaken records along with a
//! duplicate of each keeper descriptor, so the grandparent keeps its slots until the
//! grandchild too is done with them.
//!
//! ## No fault gate
//! Faults are served during the fork. A gate that stopped the handler would hang the
//! process when the forking thread itself faults inside `fork()` (glibc's fork reads
//! heap objects: the NSS state in `__nss_database_fork_prepare_parent`, atfork
//! handlers). None is needed: an entry `BUSY` at the scan is waited out; a page that
//! a fault brings in after the scan is resident in the parent when the kernel copies
//! the mapping, so the child finds it with `mincore` and never reads its record (the
//! slot reference keeps the old bytes valid meanwhile); evictions are frozen, so no
//! page leaves the mapping between the scan and the fork.
//!
//! ## Locking
//! `Keepers::fds` (Mutex, leaf): taken by the handler that takes the last record
//! (to close them) and by `prepare` (to duplicate them for a grandchild); nothing is
//! taken or allocated under it. Slot references go through `SwapDevice::dup`/`put`
//! (`SwapDevice::map`, a leaf), with an entry claimed `BUSY` at most.

use super::transparent::{claim_empty, Host, TRegion, TransparentRegion};
use super::transparent_foreign::{read_rec, touch, Foreign, Keepers, Rec};
use crate::addr::{SwapEntry, PAGE_SIZE};
use crate::device::AlignedPages;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::pte::{Pte, BUSY, EMPTY};
use crate::swap::SwapDevice;
use crate::sync::EngineSpawn;
use crate::sync::{wait_until, wait_until_for, Arc, AtomicBool, AtomicUsize, Mutex, Ordering};
use std::os::fd::RawFd;

const PS: u64 = PAGE_SIZE as u64;
/// How long `prepare` waits, evictions frozen, for a fault in flight.
const BUSY_PATIENCE: std::time::Duration = std::time::Duration::from_millis(20);

/// What a child needs of one region.
#[derive(Debug)]
struct ChildRegion {
    /// The parent's region (its entries as they were at the fork: the child's copy
    /// of the parent's memory). Never dropped.
    old: Arc<TRegion>,
    base: u64,
    len: u64,
    /// The chunks of the parent's region with a page ever filled, at the fork (no
    /// page outside them was ever in the parent's mapping).
    ranges: Vec<std::ops::Range<usize>>,
    recs: Vec<Rec>,
}

/// The table a forked child adopts into its new Vm (`Vm::adopt_fork`).
#[derive(Debug, Default)]
pub struct ForkChild {
    regions: Vec<ChildRegion>,
    keepers: Vec<RawFd>,
}

/// The parent's side of one fork in preparation.
#[derive(Debug)]
pub(crate) struct ForkPrep {
    eng: Arc<Engine>,
    regions: Vec<(Arc<TRegion>, Vec<Rec>)>,
    /// Slot references taken for the child; dropped by `release`.
    dups: Vec<SwapEntry>,
    /// `(read end, write end)` of the pipe, when `dups` or `keep` is not empty.
    pipe: Option<(RawFd, RawFd)>,
    /// Duplicates of this process's own keepers, for the child (closed here after
    /// the fork).
    keep: Vec<RawFd>,
    /// The old userfaultfd descriptor (closed in the child).
    uffd: RawFd,
    done: bool,
}

/// Scans `host`'s regions and takes the references a child needs (see the module
/// header). The caller has frozen transparent evictions.
///
/// `Ok(None)` (nothing held) when an entry stayed `BUSY` for `BUSY_PATIENCE` and
/// `patient` is false: the fault filling it may need an eviction to get its frame,
/// which the freeze forbids; the caller lifts the freeze for a moment and tries
/// again. Errors: `Config` when a swapped page is on a device that has no shared
/// descriptor or is being removed; `OutOfSwap` when a slot's count is full; `Io`
/// when no pipe can be made.
pub(crate) fn prepare(
    eng: &Arc<Engine>,
    host: &Arc<Host>,
    patient: bool,
) -> Result<Option<ForkPrep>> {
    let regions: Vec<Arc<TRegion>> = host.regions.lock().clone();
    let mut prep = ForkPrep {
        eng: eng.clone(),
        regions: Vec::with_capacity(regions.len()),
        dups: Vec::new(),
        pipe: None,
        keep: Vec::new(),
        uffd: host.uffd.raw_fd(),
        done: false,
    };
    // This process's own keepers first (it is a forked child itself with records
    // left): duplicated under their lock, so the handler cannot close them between
    // our look and the fork. Records taken meanwhile are simply not carried.
    let mut carried = false;
    for r in &regions {
        if let Some(f) = r.foreign.as_deref() {
            let fds = f.keepers.fds.lock();
            if !fds.is_empty() && prep.keep.is_empty() {
                for &fd in fds.iter() {
                    // SAFETY: duplicating a descriptor we own, close-on-exec.
                    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
                    if d < 0 {
                        return Err(Error::Io(std::io::Error::last_os_error()));
                    }
                    prep.keep.push(d);
                }
            }
            carried |= !prep.keep.is_empty();
        }
    }
    let mut devs: [Option<(Arc<SwapDevice>, Option<RawFd>)>; crate::swap::table::MAX_DEVICES] =
        std::array::from_fn(|_| None);
    for r in regions {
        let mut recs = Vec::new();
        let ents = r.entries();
        for i in r.touched_ranges().into_iter().flatten() {
            let e = &ents[i];
            loop {
                let v = e.load(Ordering::Acquire);
                match Pte::decode(v) {
                    Pte::Busy if patient => wait_until(|| e.load(Ordering::Acquire) != BUSY),
                    Pte::Busy => {
                        if !wait_until_for(BUSY_PATIENCE, || e.load(Ordering::Acquire) != BUSY) {
                            return Ok(None);
                        }
                    }
                    Pte::Present(_) => break,
                    Pte::Empty => {
                        // A page this process has not read from its own parent yet:
                        // the grandchild reads it from there too.
                        if let Some(f) = r.foreign.as_deref().filter(|_| carried) {
                            if let Some(k) = f.find(i as u64) {
                                if !f.taken[k].load(Ordering::Acquire) {
                                    recs.push(f.recs[k]);
                                }
                            }
                        }
                        break;
                    }
                    Pte::Swapped(se) => {
                        let slot = &mut devs[se.dev as usize];
                        if slot.is_none() {
                            *slot = eng.swap.get(se.dev).map(|d| (d.clone(), d.dev.shared_fd()));
                        }
                        let (d, fd) = match slot {
                            Some((d, Some(fd))) if d.is_active() => (d.clone(), *fd),
                            Some((d, _)) => {
                                return Err(Error::Config(format!(
                                    "part of the heap is on swap device {}, which a forked \
                                     child cannot read (only a local file can be shared, \
                                     and not while it is being removed)",
                                    d.name()
                                )))
                            }
                            None => {
                                return Err(Error::Config(format!(
                                    "a page is on swap device {}, which is gone",
                                    se.dev
                                )))
                            }
                        };
                        // Claim the entry so no fault frees the slot between our
                        // look and our reference.
                        if e.compare_exchange(v, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                            .is_err()
                        {
                            continue;
                        }
                        let ok = d.dup(se.slot, 1);
                        let csum = d.csum_of(se.slot);
                        e.store(v, Ordering::Release);
                        if !ok {
                            return Err(Error::OutOfSwap);
                        }
                        // Counted with the reference it holds (the release of
                        // `prep.dups` subtracts one for each, even if we fail next).
                        prep.dups.push(se);
                        eng.fork_held.fetch_add(1, Ordering::Relaxed);
                        // The child reads the file itself: a page the zpool holds
                        // goes to its slot first.
                        d.unpool(se.slot)?;
                        recs.push(Rec {
                            idx: i as u64,
                            fd,
                            off: se.slot * PS,
                            csum,
                        });
                        break;
                    }
                }
            }
        }
        prep.regions.push((r, recs));
    }
    if !prep.dups.is_empty() {
        let mut p = [0; 2];
        // SAFETY: `p` has room for the two descriptors.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        prep.pipe = Some((p[0], p[1]));
    }
    Ok(Some(prep))
}

fn close(fd: RawFd) {
    // SAFETY: a descriptor this module made (or was handed) and closes once.
    unsafe { libc::close(fd) };
}

impl ForkPrep {
    fn release(eng: &Engine, dups: &[SwapEntry]) {
        for &e in dups {
            eng.swap.put(e);
        }
        eng.fork_held
            .fetch_sub(dups.len() as u64, Ordering::Relaxed);
    }

    /// In the parent after the fork (`pid` the child, or negative if the fork
    /// failed): hands the references to a thread that drops them when the child is
    /// done with them, or drops them now.
    pub fn parent(mut self, pid: i32) {
        self.done = true;
        for &fd in &self.keep {
            close(fd);
        }
        let dups = std::mem::take(&mut self.dups);
        let Some((rd, wr)) = self.pipe.take() else {
            Self::release(&self.eng, &dups);
            return;
        };
        close(wr);
        if pid <= 0 {
            close(rd);
            Self::release(&self.eng, &dups);
            return;
        }
        let eng = self.eng.clone();
        let spawned = std::thread::Builder::new()
            .name("usermm-forkwait".into())
            .stack_size(64 << 10)
            .spawn_engine(move || {
                crate::sync::mark_engine_thread();
                let mut b = [0u8; 64];
                loop {
                    // SAFETY: reading into our buffer from our pipe.
                    let n = unsafe { libc::read(rd, b.as_mut_ptr().cast(), b.len()) };
                    if n > 0
                        || (n < 0
                            && std::io::Error::last_os_error().kind()
                                == std::io::ErrorKind::Interrupted)
                    {
                        continue;
                    }
                    break;
                }
                close(rd);
                Self::release(&eng, &dups);
            });
        if spawned.is_err() {
            // Nobody can tell when the child is done: keep the references (the
            // slots stay used until this process exits; never a wrong page).
            close(rd);
        }
    }

    /// In the child after the fork: the table to adopt. Touches nothing of the old
    /// Vm but this table and the regions' touched bitmaps; closes the old descriptor and
    /// the pipe's read end.
    pub fn child(mut self) -> ForkChild {
        // The parent's threads that were starting at the fork are not here: the
        // count must not wait for them (`adopt`, `usermm exec`'s allocator).
        crate::sync::forget_engine_threads_starting();
        let mut out = ForkChild::default();
        if let Some((rd, wr)) = self.pipe.take() {
            close(rd);
            out.keepers.push(wr);
        }
        out.keepers.append(&mut self.keep);
        for (r, recs) in std::mem::take(&mut self.regions) {
            out.regions.push(ChildRegion {
                base: r.base,
                len: r.len,
                ranges: r.touched_ranges(),
                recs,
                old: r,
            });
        }
        close(self.uffd);
        // Its references belong to the parent; its engine is the parent's.
        std::mem::forget(self);
        out
    }
}

impl Drop for ForkPrep {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Refused or abandoned before the fork.
        for &fd in &self.keep {
            close(fd);
        }
        if let Some((rd, wr)) = self.pipe.take() {
            close(rd);
            close(wr);
        }
        Self::release(&self.eng, &self.dups);
    }
}

/// In a forked child, on its new Vm's host: registers each region of `c` and sets
/// its entries (see the module header). Errors: `Io` when a region cannot be
/// registered or `mincore` fails; `OutOfMemory` when the new budget cannot hold the
/// resident pages.
pub(crate) fn adopt(
    host: &Arc<Host>,
    c: ForkChild,
    vm: Arc<dyn std::any::Any + Send + Sync>,
) -> Result<Vec<TransparentRegion>> {
    // Every thread the new Vm started (its handlers among them) reads the C
    // library's locale data when it starts, before it marks itself, and that data
    // may be in the heap. Until the regions are adopted nothing of the new Vm can
    // take a page out of the mapping; after, its reclaim may (staging the locale
    // data), and a handler still starting would fault there with no handler to
    // serve it. So the threads run first.
    crate::sync::wait_until(|| crate::sync::engine_threads_starting() == 0);
    let eng = host.eng.clone();
    // A record whose page the parent discarded between its scan and the fork (a
    // large `free` or `calloc` on another thread, outside the heap's lock): the
    // parent's entry at the fork is `EMPTY`, the page reads as zeros there, and so
    // it must here — the record's bytes are stale. Taken from the start.
    let stale: Vec<Vec<bool>> = c
        .regions
        .iter()
        .map(|cr| {
            cr.recs
                .iter()
                .map(|rec| {
                    cr.old
                        .entries()
                        .get(rec.idx as usize)
                        .is_some_and(|e| e.load(Ordering::Acquire) == EMPTY)
                })
                .collect()
        })
        .collect();
    let total = stale.iter().flatten().filter(|&&st| !st).count();
    let keepers = Arc::new(Keepers {
        fds: Mutex::new(c.keepers),
        left: AtomicUsize::new(total),
    });
    let mut out = Vec::with_capacity(c.regions.len());
    let mut patched = 0u64;
    for (cr, stale) in c.regions.into_iter().zip(stale) {
        let pages = (cr.len / PS) as usize;
        let entries = AlignedPages::new((pages * 8).div_ceil(PAGE_SIZE))?;
        host.uffd
            .register(
                cr.base,
                cr.len,
                crate::uffd::MODE_MISSING | crate::uffd::MODE_WP,
            )
            .map_err(Error::Io)?;
        let foreign = (!cr.recs.is_empty()).then(|| {
            Box::new(Foreign {
                taken: stale.iter().map(|&st| AtomicBool::new(st)).collect(),
                recs: cr.recs.into_boxed_slice(),
                keepers: keepers.clone(),
            })
        });
        let t = host.insert(cr.base, cr.len, entries, foreign, vm.clone())?;
        // The old region stays mapped as the child's memory: never dropped.
        let old = cr.old;
        let old = &*std::mem::ManuallyDrop::new(old);
        let r = t.region.clone();
        let mut buf = AlignedPages::new(2)?;
        let mut resident = Vec::new();
        let mut swapped = Vec::new();
        for range in &cr.ranges {
            resident.clear();
            resident.resize(range.len(), 0u8);
            // SAFETY: the range lies in the region's mapping; the vector has one byte
            // per page.
            let rc = unsafe {
                libc::mincore(
                    (cr.base + range.start as u64 * PS) as *mut libc::c_void,
                    range.len() * PAGE_SIZE,
                    resident.as_mut_ptr(),
                )
            };
            if rc != 0 {
                return Err(Error::Io(std::io::Error::last_os_error()));
            }
            // Pages the kernel's own swap holds (a memory cgroup's limit, DAMON's
            // page-out) have contents too, which `mincore` does not count.
            swapped.clear();
            swapped.resize(range.len(), false);
            crate::sys::kernel_swapped(cr.base + range.start as u64 * PS, &mut swapped);
            for i in range.clone() {
                touch(&r.touched, i as u64);
                if resident[i - range.start] & 1 != 0 || swapped[i - range.start] {
                    adopt_resident(&eng, &r, old, cr.base, i, &mut buf, &mut patched)?;
                }
            }
        }
        out.push(t);
    }
    if total == 0 {
        keepers.close();
    }
    if patched > 0 {
        let msg = format!(
            "usermm: fork: {patched} heap page(s) of the parent's swap were written in the \
             child before its heap was registered; bytes written as zero there may show \
             the parent's values\n"
        );
        // SAFETY: writing our buffer to stderr.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    }
    Ok(out)
}

/// Page `i` of `r` (at `base`) is in the child's mapping: its bytes are the child's
/// (repaired if the child touched it before registration), a token frame in the
/// new budget stands for it, dirty.
fn adopt_resident(
    eng: &Arc<Engine>,
    r: &TRegion,
    old: &TRegion,
    base: u64,
    i: usize,
    buf: &mut AlignedPages,
    patched: &mut u64,
) -> Result<()> {
    let f = r.foreign.as_deref();
    let k = f.and_then(|f| f.find(i as u64));
    if let (Some(f), Some(k)) = (f, k) {
        repair(old, i, base + i as u64 * PS, &f.recs[k], buf, patched)?;
    }
    let pte = &r.entries()[i];
    let Some(pfn) = claim_empty(eng, pte)? else {
        return Ok(());
    };
    eng.install_transparent(pte, pfn, base + i as u64 * PS, 0, true);
    // Resident here: its bytes are the child's own, never its record's.
    if let (Some(f), Some(k)) = (f, k) {
        f.take(k);
    }
    Ok(())
}

/// A page resident in the child whose record says it was on the parent's swap: if
/// the parent's entry at the fork says so too, the page was not in the parent's
/// mapping then, and the child touched it before its heap was registered (a new
/// thread's start reads the C library's locale data, for one): the kernel filled it
/// with zeros. Its bytes are put back from the record; bytes the child wrote there
/// (non-zero ones: zeros cannot be told from the kernel's) are kept, and counted in
/// `patched`.
fn repair(
    old: &TRegion,
    i: usize,
    addr: u64,
    rec: &Rec,
    buf: &mut AlignedPages,
    patched: &mut u64,
) -> Result<()> {
    let at_fork = old.entries().get(i).map(|e| e.load(Ordering::Acquire));
    // `Busy` at the fork with a record: the page was on swap at the scan and was
    // being brought in when the fork came (a read-around neighbour of a page the
    // forking thread faulted on after the scan); its `UFFDIO_COPY` may have landed
    // after the fork, so the child's page may be the kernel's zeros. Repaired as a
    // swapped one: if the copy had landed, the child's page is the record's bytes
    // (and any the parent wrote since, which the merge keeps unless they are zeros).
    if matches!(at_fork.map(Pte::decode), Some(Pte::Present(_)) | None) {
        // In the parent's mapping at the fork: the child's copy is the page.
        return Ok(());
    }
    read_rec(rec, buf.page_mut(0))?;
    // SAFETY: `addr` is a resident page of the child's heap mapping (one thread
    // runs the program's code here: this one); read as bytes.
    let now = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) };
    if now.iter().any(|&b| b != 0) {
        *patched += 1;
        let (page, cur) = {
            let p = buf.page_mut(0).as_mut_ptr();
            // SAFETY: two distinct pages of `buf`.
            unsafe {
                (
                    std::slice::from_raw_parts_mut(p, PAGE_SIZE),
                    std::slice::from_raw_parts_mut(p.add(PAGE_SIZE), PAGE_SIZE),
                )
            }
        };
        cur.copy_from_slice(now);
        for (b, &c) in page.iter_mut().zip(cur.iter()) {
            if c != 0 {
                *b = c;
            }
        }
    }
    // SAFETY: writing one page into the child's own resident heap page (not
    // write-protected for userfaultfd: fork cleared those bits).
    unsafe { std::ptr::copy_nonoverlapping(buf.ptr(0), addr as *mut u8, PAGE_SIZE) };
    Ok(())
}
