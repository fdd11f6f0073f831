//! The page cache of host files: one `Inode` per open file, shared by every mapping
//! of it (`map_file`) and every `usermm::File` handle, so all of them see the same
//! bytes (the kernel's "one page cache").
//!
//! Owns: `Inode` (the descriptor, a page table of cache entries indexed by page
//! number, the file's length), `FileTable` (path → inode, so a second open of the
//! same file finds the same cache), and the page operations on a cache: reading,
//! writing and pinning a page, `read_at`/`write_at`, write-back (`sync`), and the
//! cache's coherence with writes made behind it by the journal (`Behind`,
//! `invalidate`; a copy a guard pins then is marked `P_STALE`).
//!
//! A cache entry uses the encoding of a page-table entry (`crate::pte`): `EMPTY`
//! means "not cached: the file has the bytes", `BUSY` a fault reading it in,
//! present a frame of the budget (flag `F_FILE`, identity in `PageDesc::index`).
//! Cache pages share frames, reclaim and policy with anonymous pages: reclaim drops
//! a clean one (its entry goes back to `EMPTY`) and hands a dirty one to the
//! page-I/O threads, which write it in place through the file's slot
//! (`filemap::slots`; the kpiod of seed 000). Nothing here is ever written to swap.
//!
//! ## Locking
//! `FileTable::map` (Mutex) is taken by open and by the last handle's teardown; it
//! is held across the open of the file and its journal recovery (I/O, no frame
//! allocation) and is never taken by reclaim. `Inode::size` (Mutex) serialises
//! growing the file; nothing is taken under it but the entry lock of the old last
//! page. Entries follow the crate's protocol: claim (`BUSY`) → may-reclaim (frame
//! allocation) → frame lock → `P_LOCK`. Write-back by `sync` marks each page
//! `F_WRITEBACK` (as the page-I/O threads do) while it is being written, so reclaim
//! neither drops it (a reader would then read the old bytes from the file) nor
//! writes it again meanwhile. No lock is held across a file read or write; a
//! checkpoint's `Behind` holds one entry's claim (`BUSY`, as a fault does) across
//! the journal's write of that page, under the commit lock. `sync` settles the
//! journal (`try_lock` of the commit lock) before it writes any page.
//!
//! ## Lifetime
//! Mappings (`Backing::File`) and `File` handles hold the inode's `Arc`. The last
//! one to go writes the dirty pages back and syncs the file, frees the cache's
//! frames, waits for write-backs still in flight (they name its slot) and gives
//! the slot back. Errors of that final write-back cannot be returned (it runs in a
//! `drop`); they are counted (`Stats::file_write_errors`) — call `msync` or
//! `File::sync` first to see them.

use crate::addr::{Pfn, PAGE_SIZE};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::frame::{copy_in, copy_out, AllocCtx, F_FILE, F_INUSE, F_WRITEBACK};
use crate::mm::pagetable::{LeafPool, PageTable};
use crate::pte::{
    lock_present, try_lock_present, unlock_entry, Pte, BUSY, EMPTY, P_ACCESSED, P_DIRTY, P_EXCL,
    P_LOCK, P_SHARED, P_SHARED_ONE, P_STALE, TAG_MASK, TAG_PRESENT,
};
use crate::stats::Counters;
use crate::sync::{fence, wait_until, Arc, AtomicU64, Mutex, Ordering, Weak};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

thread_local! {
    /// A page buffer per thread for reads from a file: the frame is then filled with
    /// atomic stores (stale optimistic readers may be loading it, see `mm::fault`).
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Pages written back per `pwrite` by `sync` (a run of adjacent dirty pages).
const RUN: usize = 64;

fn with_path(path: &Path, e: io::Error) -> Error {
    Error::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The open files of a Vm, by (device, inode number).
#[derive(Debug, Default)]
pub(crate) struct FileTable {
    map: Mutex<HashMap<(u64, u64), Weak<Inode>>>,
}

impl FileTable {
    /// The inode of the file at `path`, opening it (read-write) if no mapping or
    /// handle has it open. `recover` runs on a file being opened afresh, before any
    /// page of it is cached (the journal recovery of `Share::Atomic`).
    ///
    /// Errors: `Io` (with the path) if it cannot be opened read-write;
    /// `InvalidArgument` if it is not a regular file; `Io` (`EMFILE`) when
    /// `Config::max_files` files are open already.
    pub fn open(
        self: &Arc<Self>,
        eng: &Arc<Engine>,
        leaves: &Arc<LeafPool>,
        path: &Path,
        recover: &dyn Fn(&Path, &std::fs::File) -> Result<()>,
    ) -> Result<Arc<Inode>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| with_path(path, e))?;
        let meta = file.metadata().map_err(|e| with_path(path, e))?;
        if !meta.is_file() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let key = (meta.dev(), meta.ino());
        loop {
            let mut map = self.map.lock();
            if let Some(w) = map.get(&key) {
                if let Some(ino) = w.upgrade() {
                    return Ok(ino);
                }
                // Its last handle is writing it back and tearing it down: a second
                // cache of the same file meanwhile could read what is not written
                // yet. Wait for the teardown (it ends with its write-back).
                drop(map);
                wait_until(|| {
                    self.map
                        .lock()
                        .get(&key)
                        .is_none_or(|w| w.strong_count() > 0)
                });
                continue;
            }
            recover(path, &file)?;
            let len = file.metadata().map_err(|e| with_path(path, e))?.len();
            let Some(slot) = eng.files.take(file.as_raw_fd(), len) else {
                return Err(Error::Io(io::Error::other(format!(
                    "{}: too many open files (Config::max_files is {})",
                    path.display(),
                    eng.files.capacity()
                ))));
            };
            let ino = Arc::new(Inode {
                eng: eng.clone(),
                slot,
                file,
                path: path.to_path_buf(),
                key,
                table: Arc::downgrade(self),
                pt: PageTable::new(leaves.clone()),
                size: Mutex::new(()),
                len_unsynced: std::sync::atomic::AtomicBool::new(false),
                errors_seen: AtomicU64::new(0),
                commit: Mutex::new(None),
                commit_waits: [AtomicU64::new(0), AtomicU64::new(0)],
            });
            map.insert(key, Arc::downgrade(&ino));
            return Ok(ino);
        }
    }
}

/// One open host file and its page cache.
#[derive(Debug)]
pub(crate) struct Inode {
    pub eng: Arc<Engine>,
    /// Its slot in `Engine::files` (held until teardown).
    pub slot: u32,
    pub file: std::fs::File,
    pub path: PathBuf,
    key: (u64, u64),
    table: Weak<FileTable>,
    /// Cache entries by page number (see the module header).
    pt: PageTable,
    /// Serialises growing the file (`write_at` past its end).
    size: Mutex<()>,
    /// The file grew since its length was last made durable (`grow`, `sync_len`).
    len_unsynced: std::sync::atomic::AtomicBool,
    /// Write-back errors already reported by `sync` (the slot counts them all).
    errors_seen: AtomicU64,
    /// The journal of this file's `Share::Atomic` mappings, opened with the first
    /// one; the mutex is the commit lock (see `mm::msync`).
    pub commit: Mutex<Option<crate::filemap::journal::Journal<std::fs::File>>>,
    /// The page the commit in progress waits to pin, if it waits (`mm::msync`):
    /// the space's key (`mm::fault::space_key`; 0: none) and the page number. A
    /// thread that wants the commit lock while it holds a guard there would wait
    /// for itself. Set by the holder of the commit lock; the key is stored last
    /// and cleared first.
    pub commit_waits: [AtomicU64; 2],
}

/// Where a file page's fault gets its bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill<'a> {
    /// Read the file.
    Read,
    /// These bytes (a whole page): a write of the whole page, whose bytes are in
    /// the frame before the page is published (never a page of zeros meanwhile).
    Data(&'a [u8]),
}

/// What `Inode::behind_step` did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    /// Nothing cached: the next access reads the file.
    Empty,
    /// The entry is as it may stay: dirty (a Shared write, newer), or marked
    /// `P_STALE`.
    Done,
    /// It changed, or was waited for: look again.
    Again,
}

/// The cache's side of a checkpoint (`Journal::checkpoint`'s `on_page`, in
/// `mm::msync`): before the journal writes committed page `pg` to the file,
/// `page(pg)` waits out a write-back of the page in flight (older bytes, which
/// must not land after the commit's), then drops a clean cached copy, or marks it
/// `P_STALE` if a guard pins it (its bytes cannot change under the guard), and
/// claims the empty entry (`BUSY`) until the journal's write of the page is done,
/// so no read of the file can cache the old bytes meanwhile. A dirty copy (a
/// Shared write racing with the commit) stays. `end` (or the drop) releases the
/// claim; call it before anything that may read the page (the commit's pins).
///
/// Runs under the commit lock: every wait here ends without it (a fault's read, a
/// write-back's I/O), and the claim is held across one file write only.
pub(crate) struct Behind<'a> {
    ino: &'a Inode,
    /// The entry claimed for the page being written.
    claim: Option<&'a AtomicU64>,
}

impl Behind<'_> {
    /// Before the journal writes page `pg` (see the type).
    pub fn page(&mut self, pg: u64) {
        self.end();
        // Beyond the file's end the write is clipped away, and nothing is cached.
        if pg >= self.ino.pages() {
            return;
        }
        let pte = self.ino.pt.entry(pg);
        loop {
            match self.ino.behind_step(pte) {
                Step::Done => return,
                Step::Again => {}
                Step::Empty => {
                    if pte
                        .compare_exchange(EMPTY, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        crate::pte::claimed(pte);
                        self.claim = Some(pte);
                        return;
                    }
                }
            }
        }
    }

    /// Releases the claim of the last page (its write is done, or failed).
    pub fn end(&mut self) {
        if let Some(pte) = self.claim.take() {
            pte.store(EMPTY, Ordering::Release);
            crate::pte::released(pte);
        }
    }
}

impl Drop for Behind<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

impl Inode {
    /// The file's length in bytes as usermm knows it.
    pub fn len(&self) -> u64 {
        self.eng.files.get(self.slot).len.load(Ordering::Acquire)
    }

    /// Pages the file has (its last one may be partial).
    pub fn pages(&self) -> u64 {
        self.len().div_ceil(PAGE_SIZE as u64)
    }

    /// A key for this inode in the guard bookkeeping of `mm::fault`.
    pub fn key(&self) -> usize {
        self as *const Inode as usize
    }

    fn in_file(&self, pgoff: u64) -> Result<()> {
        if pgoff < self.pages() {
            Ok(())
        } else {
            Err(Error::BadAddress {
                addr: pgoff * PAGE_SIZE as u64,
            })
        }
    }

    /// Brings page `pgoff` into the cache, or waits for whoever holds its entry
    /// (a fault, or a lock or pin in `forbid`). Returns when a retry may find the
    /// page present and free: true if this call installed it (with `Fill::Data`,
    /// the write is done).
    fn fault(&self, pgoff: u64, fill: Fill<'_>, forbid: u64) -> Result<bool> {
        let pte = self.pt.entry(pgoff);
        let v = pte.load(Ordering::Acquire);
        match Pte::decode(v) {
            Pte::Empty => {}
            Pte::Busy => {
                crate::pte::wait_claim();
                wait_until(|| pte.load(Ordering::Acquire) != BUSY);
                return Ok(false);
            }
            Pte::Present(_) => {
                wait_until(|| {
                    let now = pte.load(Ordering::Acquire);
                    now != v || now & (P_LOCK | forbid) == 0
                });
                return Ok(false);
            }
            Pte::Swapped(_) => {
                debug_assert!(false, "a file page in swap");
                return Err(Error::Io(io::Error::other("corrupt page-cache entry")));
            }
        }
        self.in_file(pgoff)?;
        if pte
            .compare_exchange(EMPTY, BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return Ok(false);
        }
        crate::pte::claimed(pte);
        let eng = &*self.eng;
        // The frame (may reclaim) and the file read are a stall (`crate::psi`).
        let _stall = (fill == Fill::Read).then(|| eng.psi.stall());
        let undo = |e: Error| {
            pte.store(EMPTY, Ordering::Release);
            crate::pte::released(pte);
            Err(e)
        };
        let pfn = match crate::reclaim::alloc_frame(eng, AllocCtx::Normal) {
            Ok(p) => p,
            Err(e) => return undo(e),
        };
        let frame = eng.frames.frame_ptr(pfn);
        match fill {
            // SAFETY: the frame was just allocated to us and is not yet visible;
            // `copy_in` stores atomically (stale optimistic readers may load it).
            Fill::Data(src) => unsafe { copy_in(frame, src) },
            Fill::Read => {
                if let Err(e) = self.read_file_page(pgoff, |page| {
                    // SAFETY: as above; stale optimistic readers only load from it,
                    // and `copy_in` stores atomically.
                    unsafe { copy_in(frame, page) }
                }) {
                    eng.frames.free(pfn);
                    return undo(e);
                }
                Counters::inc(&eng.cnt.pgmajfault);
                Counters::inc(&eng.cnt.pswpin);
                Counters::inc(&eng.cnt.filein);
            }
        }
        let index = crate::filemap::slots::index(self.slot, pgoff);
        let data = matches!(fill, Fill::Data(_));
        eng.install_file(pte, pfn, index, data);
        Counters::inc(&eng.cnt.pgfault);
        Ok(data)
    }

    /// Reads page `pgoff` from the file (zeros past its end) and hands it to `f`.
    ///
    /// Errors: `Io` if the read fails, or if the file ends before this page (it was
    /// truncated under its mappings by someone else).
    fn read_file_page(&self, pgoff: u64, f: impl FnOnce(&[u8])) -> Result<()> {
        BOUNCE.with(|b| {
            let mut b = b.borrow_mut();
            b.resize(PAGE_SIZE, 0);
            let off = pgoff * PAGE_SIZE as u64;
            let mut got = 0;
            while got < PAGE_SIZE {
                match self.file.read_at(&mut b[got..], off + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(with_path(&self.path, e)),
                }
            }
            if got == 0 && off < self.len() {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: page {pgoff} is past the end of the file (truncated under its mapping?)",
                        self.path.display()
                    ),
                )));
            }
            b[got..].fill(0);
            f(&b);
            Ok(())
        })
    }

    /// Copies `dst.len()` bytes at offset `off` of page `pgoff` (inside one page)
    /// out of the cache, reading the page in if needed.
    pub fn read(&self, pgoff: u64, off: usize, dst: &mut [u8]) -> Result<()> {
        debug_assert!(off + dst.len() <= PAGE_SIZE);
        let frames = &self.eng.frames;
        loop {
            if let Some(pte) = self.pt.lookup(pgoff) {
                let v = pte.load(Ordering::Acquire);
                if v & (TAG_MASK | P_LOCK | P_EXCL | P_STALE) == TAG_PRESENT | P_STALE {
                    if !self.drop_stale(pte, Pte::pfn(v)) {
                        // A guard still pins the old copy: the file has the bytes.
                        return self.read_file_page(pgoff, |p| {
                            dst.copy_from_slice(&p[off..off + dst.len()])
                        });
                    }
                    continue;
                }
                if v & (TAG_MASK | P_LOCK | P_EXCL) == TAG_PRESENT {
                    // SAFETY: inside the frame the entry maps; atomic loads.
                    unsafe { copy_out(frames.frame_ptr(Pte::pfn(v)).add(off), dst) };
                    fence(Ordering::Acquire);
                    if pte.load(Ordering::Relaxed) == v {
                        if v & P_ACCESSED == 0 {
                            let _ = pte.compare_exchange(
                                v,
                                v | P_ACCESSED,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                        }
                        return Ok(());
                    }
                    continue;
                }
            }
            self.fault(pgoff, Fill::Read, P_EXCL)?;
        }
    }

    /// A whole page for a private copy (`Share::Private`/`Atomic` regions): from
    /// the cache if it holds the page, else straight from the file (without
    /// caching it: the private copy is what will be used).
    pub fn read_page(&self, pgoff: u64, dst: &mut [u8]) -> Result<()> {
        debug_assert_eq!(dst.len(), PAGE_SIZE);
        let v = self
            .pt
            .lookup(pgoff)
            .map_or(EMPTY, |p| p.load(Ordering::Acquire));
        if Pte::decode(v) == Pte::Empty {
            self.in_file(pgoff)?;
            return self.read_file_page(pgoff, |p| dst.copy_from_slice(p));
        }
        self.read(pgoff, 0, dst)
    }

    /// Copies `src` into page `pgoff` at `off` (inside one page), reading the page
    /// in first unless `src` covers all of it. The page becomes dirty.
    pub fn write(&self, pgoff: u64, off: usize, src: &[u8]) -> Result<()> {
        debug_assert!(off + src.len() <= PAGE_SIZE);
        let frames = &self.eng.frames;
        loop {
            let pte = self.pt.entry(pgoff);
            if let Some(v) = try_lock_present(pte, P_EXCL | P_SHARED) {
                if v & P_STALE != 0 {
                    // Unpinned now: dropped, and the write starts from the file.
                    unlock_entry(pte, 0, 0);
                    self.drop_stale(pte, Pte::pfn(v));
                    continue;
                }
                // SAFETY: inside the frame; we hold the entry lock (sole writer).
                unsafe { copy_in(frames.frame_ptr(Pte::pfn(v)).add(off), src) };
                pte.store(Pte::bump(v) | P_DIRTY | P_ACCESSED, Ordering::Release);
                crate::pte::released(pte);
                return Ok(());
            }
            let fill = if off == 0 && src.len() == PAGE_SIZE {
                Fill::Data(src)
            } else {
                Fill::Read
            };
            if self.fault(pgoff, fill, P_EXCL | P_SHARED)? && off == 0 && src.len() == PAGE_SIZE {
                return Ok(());
            }
        }
    }

    /// Pins page `pgoff` for a guard: shared (`exclusive` false) or exclusive (the
    /// page is then dirty). Returns its entry and frame; `unpin` in `mm::fault`
    /// gives it back.
    pub fn pin(&self, pgoff: u64, exclusive: bool) -> Result<(&AtomicU64, Pfn)> {
        let forbid = if exclusive { P_EXCL | P_SHARED } else { P_EXCL };
        loop {
            let pte = self.pt.entry(pgoff);
            if let Some(v) = try_lock_present(pte, forbid) {
                if v & P_STALE != 0 {
                    // A new guard must not show the old bytes: wait, as a writer
                    // does, for the guards that pin them, then read the file.
                    unlock_entry(pte, 0, 0);
                    if self.drop_stale(pte, Pte::pfn(v)) {
                        continue;
                    }
                    if crate::pins::holds_pin_key(self.key(), pgoff, pgoff + 1, false) {
                        return Err(Error::WouldDeadlock(
                            "a guard on a page that an Atomic msync rewrote while this thread held a guard on it",
                        ));
                    }
                    wait_until(|| {
                        let now = pte.load(Ordering::Acquire);
                        now & P_SHARED == 0 || now & (TAG_MASK | P_STALE) != TAG_PRESENT | P_STALE
                    });
                    continue;
                }
                let new = if exclusive {
                    v | P_EXCL | P_DIRTY
                } else if v & P_SHARED == P_SHARED {
                    // The shared count is full: wait for one to go.
                    pte.store(v, Ordering::Release);
                    crate::pte::released(pte);
                    wait_until(|| pte.load(Ordering::Acquire) & P_SHARED != P_SHARED);
                    continue;
                } else {
                    v + P_SHARED_ONE
                };
                pte.store(new | P_ACCESSED, Ordering::Release);
                crate::pte::released(pte);
                return Ok((pte, Pte::pfn(v)));
            }
            self.fault(pgoff, Fill::Read, forbid)?;
        }
    }

    /// `FileExt::read_at`: reads up to `buf.len()` bytes at `offset`; returns how
    /// many (0 at or past the end of the file).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let len = self.len();
        if offset >= len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(len - offset) as usize;
        let mut done = 0;
        while done < n {
            let at = offset + done as u64;
            let off = (at % PAGE_SIZE as u64) as usize;
            let k = (PAGE_SIZE - off).min(n - done);
            self.read(at / PAGE_SIZE as u64, off, &mut buf[done..done + k])?;
            done += k;
        }
        Ok(n)
    }

    /// `FileExt::write_at`: writes all of `buf` at `offset`, growing the file if it
    /// ends past it (the file's new length is set at once; its pages reach the file
    /// by write-back, `sync` or reclaim). Returns `buf.len()`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<usize> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(|| {
            Error::InvalidArgument(format!("write_at past the largest offset ({offset})"))
        })?;
        if end > (1u64 << 35) * PAGE_SIZE as u64 {
            return Err(Error::InvalidArgument(format!(
                "write_at ending at {end}: files are limited to 128 TiB"
            )));
        }
        if end > self.len() {
            self.grow(end)?;
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let off = (at % PAGE_SIZE as u64) as usize;
            let k = (PAGE_SIZE - off).min(buf.len() - done);
            self.write(at / PAGE_SIZE as u64, off, &buf[done..done + k])?;
            done += k;
        }
        Ok(buf.len())
    }

    /// Makes the file's length durable if it grew since it last was: an Atomic
    /// commit calls it before its commit record, since recovery clips what it
    /// replays to the length the file has after a crash — without this, a commit
    /// that wrote past an extension not yet synced would come back in part.
    pub(crate) fn sync_len(&self) -> Result<()> {
        use std::sync::atomic::Ordering as O;
        if self.len_unsynced.swap(false, O::AcqRel) {
            if let Err(e) = self.file.sync_data() {
                self.len_unsynced.store(true, O::Release);
                return Err(with_path(&self.path, e));
            }
        }
        Ok(())
    }

    /// Grows the file to `end` bytes: sets its length, and zeroes the tail of the
    /// old last page in the cache (a mapping may have written past the old end;
    /// those bytes were never the file's).
    fn grow(&self, end: u64) -> Result<()> {
        let _g = self.size.lock();
        let old = self.len();
        if end <= old {
            return Ok(());
        }
        self.file
            .set_len(end)
            .map_err(|e| with_path(&self.path, e))?;
        self.len_unsynced
            .store(true, std::sync::atomic::Ordering::Release);
        let tail = (old % PAGE_SIZE as u64) as usize;
        if tail != 0 {
            if let Some(pte) = self.pt.lookup(old / PAGE_SIZE as u64) {
                loop {
                    let v = pte.load(Ordering::Acquire);
                    let Pte::Present(pfn) = Pte::decode(v) else {
                        if v == BUSY {
                            wait_until(|| pte.load(Ordering::Acquire) != BUSY);
                            continue;
                        }
                        break;
                    };
                    let Some(v) = lock_present(pte, pfn) else {
                        continue;
                    };
                    if v & P_STALE != 0 {
                        // Never used again (see `P_STALE`); the file's new bytes
                        // past the old end are zeros already (`set_len`).
                        unlock_entry(pte, 0, 0);
                        break;
                    }
                    let zeros = [0u8; PAGE_SIZE];
                    // SAFETY: inside the frame; entry lock held.
                    unsafe {
                        copy_in(
                            self.eng.frames.frame_ptr(pfn).add(tail),
                            &zeros[..PAGE_SIZE - tail],
                        )
                    };
                    pte.store(Pte::bump(v) | P_DIRTY, Ordering::Release);
                    crate::pte::released(pte);
                    break;
                }
            }
        }
        self.eng
            .files
            .get(self.slot)
            .len
            .store(end, Ordering::Release);
        Ok(())
    }

    /// Writes the dirty cache pages in `[first, end)` to the file in place and, if
    /// `durable`, syncs it (`fdatasync`). Pages pinned exclusively by a guard are
    /// left dirty (their bytes are in the guard until it is dropped).
    ///
    /// Errors: `Io` if a write or the sync fails, or if a write-back by the
    /// page-I/O threads failed since the last `sync` of this file (reported once,
    /// as `fsync` does); the pages that failed stay dirty and resident.
    pub fn sync(&self, first: u64, end: u64, durable: bool) -> Result<()> {
        let eng = &*self.eng;
        if durable {
            // Atomic commits still in the journal (unflushed, or emptied but not
            // synced) must not be replayed over what this sync makes durable:
            // `Journal::settle` syncs their pages and empties the log first —
            // before the dirty pages are written, since after a failed flush it
            // writes the whole run again (`recover`), which would put older
            // committed bytes over a Shared write just written and marked clean.
            // `try_lock`: a commit in progress holds it (and may wait for a guard
            // of the thread that called us); then the journal's run stays until
            // its next flush, and a crash before that replays it — over a page
            // this sync made durable only if a Shared mapping or handle wrote a
            // page that an Atomic commit of the same file also wrote (racing
            // writers of one page: the order between them is not promised).
            // A commit whose checkpoint failed is checkpointed by `settle` first,
            // with the cache kept coherent as `msync`'s checkpoint keeps it.
            if let Some(mut c) = self.commit.try_lock() {
                if let Some(j) = c.as_mut() {
                    let mut behind = self.behind();
                    j.settle(
                        &crate::filemap::journal::Clipped {
                            file: &self.file,
                            len: self.len(),
                        },
                        &mut |pg, _| behind.page(pg),
                    )
                    .map_err(|e| with_path(&self.path, e))?;
                }
            }
        }
        let end = end.min(self.pages());
        let mut buf = vec![0u8; RUN * PAGE_SIZE];
        // (pfn, epoch) of the pages in `buf`, and the page number of its first one:
        // a run of adjacent dirty pages, written with one `pwrite`.
        let mut run: Vec<(Pfn, u32)> = Vec::with_capacity(RUN);
        let mut run_start = 0;
        let mut result = Ok(());
        let mut flush = |run: &mut Vec<(Pfn, u32)>, start: u64, buf: &[u8]| {
            if !run.is_empty() {
                let r = self.write_run(start, run, buf);
                result = std::mem::replace(&mut result, Ok(())).and(r);
                run.clear();
            }
        };
        self.pt.for_each(first, end, |pg, pte| {
            if !run.is_empty() && (run.len() == RUN || run_start + run.len() as u64 != pg) {
                flush(&mut run, run_start, &buf);
            }
            if let Some(p) = self.grab_dirty(pte, &mut buf[run.len() * PAGE_SIZE..][..PAGE_SIZE]) {
                if run.is_empty() {
                    run_start = pg;
                }
                run.push(p);
            }
        });
        flush(&mut run, run_start, &buf);
        result?;
        if durable {
            // The page-I/O threads' write-backs of this file queued before now are
            // part of what must be durable (later ones are not ours to wait for).
            let slot = eng.files.get(self.slot);
            let target = slot.submitted.load(Ordering::Acquire);
            wait_until(|| slot.completed.load(Ordering::Acquire) >= target);
            self.file
                .sync_data()
                .map_err(|e| with_path(&self.path, e))?;
        }
        let slot = eng.files.get(self.slot);
        let errs = slot.errors.load(Ordering::Acquire);
        if self.errors_seen.swap(errs, Ordering::AcqRel) != errs {
            let errno = slot.last_errno.load(Ordering::Relaxed);
            return Err(with_path(
                &self.path,
                io::Error::new(
                    io::Error::from_raw_os_error(errno).kind(),
                    format!(
                        "a write-back of this file failed: {}",
                        io::Error::from_raw_os_error(errno)
                    ),
                ),
            ));
        }
        Ok(())
    }

    /// If the page of cache entry `pte` is present and dirty (and not pinned exclusively), copies it
    /// into `dst`, marks it clean and under write-back, and returns its frame and
    /// epoch. Waits out a write-back of it already in flight.
    fn grab_dirty(&self, pte: &AtomicU64, dst: &mut [u8]) -> Option<(Pfn, u32)> {
        let eng = &*self.eng;
        loop {
            let v = pte.load(Ordering::Acquire);
            if v == BUSY {
                wait_until(|| pte.load(Ordering::Acquire) != BUSY);
                continue;
            }
            let Pte::Present(pfn) = Pte::decode(v) else {
                return None;
            };
            let d = eng.frames.desc(pfn);
            if v & P_DIRTY == 0 {
                // Clean — or cleaned by a write-back still in flight (reclaim sets
                // `F_WRITEBACK` before it clears `P_DIRTY`): a durable sync must
                // not return before that write lands. Waiting on the page itself,
                // not on the file's count of write-backs, which completions out of
                // order (16 page-I/O threads) could reach before this one is done.
                if d.flags.load(Ordering::Acquire) & F_WRITEBACK != 0 {
                    wait_until(|| {
                        d.flags.load(Ordering::Acquire) & F_WRITEBACK == 0
                            || pte.load(Ordering::Acquire) != v
                    });
                    continue;
                }
                return None;
            }
            d.lock();
            if Pte::decode(pte.load(Ordering::Acquire)) != Pte::Present(pfn) {
                d.unlock();
                continue;
            }
            let f = d.flags.load(Ordering::Relaxed);
            if f & F_WRITEBACK != 0 {
                d.unlock();
                wait_until(|| {
                    d.flags.load(Ordering::Relaxed) & F_WRITEBACK == 0
                        || Pte::decode(pte.load(Ordering::Acquire)) != Pte::Present(pfn)
                });
                continue;
            }
            let Some(v) = lock_present(pte, pfn) else {
                d.unlock();
                continue;
            };
            if v & P_DIRTY == 0 || v & P_EXCL != 0 {
                unlock_entry(pte, 0, 0);
                d.unlock();
                return None;
            }
            // SAFETY: entry lock held: nobody writes the frame while we copy.
            unsafe { copy_out(eng.frames.frame_ptr(pfn), dst) };
            unlock_entry(pte, P_DIRTY, 0);
            d.flags.store(f | F_WRITEBACK, Ordering::Relaxed);
            let epoch = d.epoch.load(Ordering::Relaxed);
            d.unlock();
            return Some((pfn, epoch));
        }
    }

    /// Writes a run grabbed by `grab_dirty` and ends its pages' write-back.
    fn write_run(&self, start: u64, run: &[(Pfn, u32)], buf: &[u8]) -> Result<()> {
        let off = start * PAGE_SIZE as u64;
        let n = (run.len() * PAGE_SIZE).min(self.len().saturating_sub(off) as usize);
        let res = self.file.write_all_at(&buf[..n], off);
        self.end_writeback(run, res.is_ok());
        match res {
            Ok(()) => {
                Counters::add(&self.eng.cnt.fileout, run.len() as u64);
                Counters::add(&self.eng.cnt.pswpout, run.len() as u64);
                Ok(())
            }
            Err(e) => {
                Counters::add(&self.eng.cnt.file_write_errors, run.len() as u64);
                Err(with_path(&self.path, e))
            }
        }
    }

    /// Ends the write-back `grab_dirty` began on these frames; on failure the pages
    /// are dirty again.
    fn end_writeback(&self, run: &[(Pfn, u32)], ok: bool) {
        let eng = &*self.eng;
        for &(pfn, epoch) in run {
            let d = eng.frames.desc(pfn);
            d.lock();
            let f = d.flags.load(Ordering::Relaxed);
            if f & (F_INUSE | F_FILE | F_WRITEBACK) == F_INUSE | F_FILE | F_WRITEBACK
                && d.epoch.load(Ordering::Relaxed) == epoch
            {
                d.flags.store(f & !F_WRITEBACK, Ordering::Relaxed);
                if !ok && d.mapcount.load(Ordering::Relaxed) > 0 {
                    let pte = d.owner.load(Ordering::Relaxed);
                    // SAFETY: the frame's one mapping (its cache entry), valid
                    // while the frame is locked and mapped (see `frame::rmap`).
                    let pte = unsafe { &*pte };
                    if lock_present(pte, pfn).is_some() {
                        unlock_entry(pte, 0, P_DIRTY);
                    }
                }
            }
            d.unlock();
        }
        eng.frames.notify_waiters();
    }

    /// The file's page `pg` was written behind the cache (a journal replayed into
    /// it): drops its cached copy if it is clean — or marks it `P_STALE` if a guard
    /// pins it — so the next access reads the file. A dirty copy stays (a Shared
    /// write, newer than what it would read). Waits out a write-back in flight.
    pub fn invalidate(&self, pg: u64) {
        if let Some(pte) = self.pt.lookup(pg) {
            while self.behind_step(pte) == Step::Again {}
        }
    }

    /// One step of making the cache entry `pte` coherent with a write of its page
    /// to the file behind the cache (`invalidate`, `Behind::page`).
    fn behind_step(&self, pte: &AtomicU64) -> Step {
        let eng = &*self.eng;
        let v = pte.load(Ordering::Acquire);
        let pfn = match Pte::decode(v) {
            Pte::Empty => return Step::Empty,
            Pte::Busy => {
                // A read of the file that may predate the write: wait for it.
                crate::pte::wait_claim();
                wait_until(|| pte.load(Ordering::Acquire) != BUSY);
                return Step::Again;
            }
            Pte::Swapped(_) => return Step::Done,
            Pte::Present(pfn) => pfn,
        };
        let d = eng.frames.desc(pfn);
        if d.flags.load(Ordering::Acquire) & F_WRITEBACK != 0 {
            // A write-back of older bytes in flight: it must land before the write
            // behind the cache does, not after, and it ends without any of our locks
            // (a page-I/O thread's completion, or `sync`'s `write_run`).
            wait_until(|| {
                d.flags.load(Ordering::Acquire) & F_WRITEBACK == 0
                    || Pte::decode(pte.load(Ordering::Acquire)) != Pte::Present(pfn)
            });
            return Step::Again;
        }
        if v & (P_DIRTY | P_EXCL) != 0 {
            return Step::Done;
        }
        d.lock();
        if d.flags.load(Ordering::Relaxed) & F_WRITEBACK != 0 {
            d.unlock();
            return Step::Again;
        }
        let Some(v) = lock_present(pte, pfn) else {
            d.unlock();
            return Step::Again;
        };
        if v & (P_DIRTY | P_EXCL) != 0 {
            unlock_entry(pte, 0, 0);
            d.unlock();
            return Step::Done;
        }
        if v & P_SHARED != 0 {
            // A guard shows these bytes: nobody writes under it (see `P_STALE`).
            unlock_entry(pte, 0, P_STALE);
            d.unlock();
            return Step::Done;
        }
        crate::reclaim::evict_file_locked(eng, d, pfn);
        d.unlock();
        eng.frames.free(pfn);
        Step::Again
    }

    /// Drops the `P_STALE` copy in frame `pfn` of entry `pte` if no guard pins it
    /// any more. False if one still does (the caller reads the file, or waits);
    /// true if it is gone (or was never there): retry.
    fn drop_stale(&self, pte: &AtomicU64, pfn: Pfn) -> bool {
        let eng = &*self.eng;
        let d = eng.frames.desc(pfn);
        d.lock();
        let Some(v) = lock_present(pte, pfn) else {
            d.unlock();
            return true;
        };
        if v & P_STALE == 0 {
            unlock_entry(pte, 0, 0);
            d.unlock();
            return true;
        }
        if v & (P_SHARED | P_EXCL) != 0 {
            unlock_entry(pte, 0, 0);
            d.unlock();
            return false;
        }
        debug_assert_eq!(v & P_DIRTY, 0, "a stale copy was written");
        debug_assert_eq!(d.flags.load(Ordering::Relaxed) & F_WRITEBACK, 0);
        crate::reclaim::evict_file_locked(eng, d, pfn);
        d.unlock();
        eng.frames.free(pfn);
        true
    }

    /// Keeps the cache coherent with a checkpoint of the journal, which writes
    /// committed pages to the file behind it: its `on_page` is `Behind::page`.
    pub(crate) fn behind(&self) -> Behind<'_> {
        Behind {
            ino: self,
            claim: None,
        }
    }

    /// `invalidate` of every cached page (the file was written behind the cache:
    /// a journal replayed into it).
    pub fn invalidate_all(&self) {
        let mut pages = Vec::new();
        self.pt.for_each(0, self.pages(), |pg, pte| {
            if pte.load(Ordering::Relaxed) != EMPTY {
                pages.push(pg);
            }
        });
        for pg in pages {
            self.invalidate(pg);
        }
    }

    /// Frees a cache entry's frame (teardown). Waits out short locks.
    fn release(eng: &Engine, pte: &AtomicU64) {
        loop {
            let v = pte.load(Ordering::Acquire);
            match Pte::decode(v) {
                Pte::Empty | Pte::Swapped(_) => return,
                Pte::Busy => wait_until(|| pte.load(Ordering::Acquire) != BUSY),
                Pte::Present(pfn) => {
                    let d = eng.frames.desc(pfn);
                    d.lock();
                    let Some(v) = lock_present(pte, pfn) else {
                        d.unlock();
                        continue;
                    };
                    debug_assert_eq!(v & (P_EXCL | P_SHARED), 0, "a pin outlived its file");
                    pte.store(EMPTY, Ordering::Release);
                    crate::pte::released(pte);
                    eng.rmap.remove(d, pfn, pte);
                    d.unlock();
                    eng.frames.free(pfn);
                    return;
                }
            }
        }
    }
}

impl Drop for Inode {
    fn drop(&mut self) {
        if self.sync(0, u64::MAX, true).is_err() {
            // A failed settle returns before the dirty pages are written: they are
            // written anyway (the frames go next), without the journal.
            let _ = self.sync(0, u64::MAX, false);
        }
        let eng = self.eng.clone();
        self.pt.clear(|pte| Inode::release(&eng, pte));
        // Write-backs through the slot still in flight (of frames freed above)
        // must end before the descriptor can be closed.
        let slot = eng.files.get(self.slot);
        wait_until(|| slot.inflight.load(Ordering::Acquire) == 0);
        eng.files.give_back(self.slot);
        if let Some(t) = self.table.upgrade() {
            let mut map = t.map.lock();
            if map
                .get(&self.key)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), self as *const Inode))
            {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::addr::PAGE_SIZE;
    use crate::filemap::journal::FAIL_FLUSH_SYNC;
    use crate::{Config, Share, Vm};
    use std::os::unix::fs::FileExt;

    fn file_page(p: &std::path::Path, i: u64) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE];
        std::fs::File::open(p)
            .unwrap()
            .read_exact_at(&mut b, i * PAGE_SIZE as u64)
            .unwrap();
        b
    }

    /// `Inode::sync` settles the journal before it writes the Shared pages: after a
    /// flush whose data sync failed, settling writes the journal's whole run again,
    /// which must not land over a Shared write of one of its pages made since.
    #[test]
    fn sync_settles_the_journal_before_it_writes_shared_pages() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        std::fs::write(&p, vec![0u8; 4 * PAGE_SIZE]).unwrap();
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        let mm = vm.new_space();
        let atomic = mm.map_file(&p, Share::Atomic).unwrap();
        let f = vm.open(&p).unwrap();
        // A commit: in the file, and still in the journal's run.
        mm.write(atomic.start() + PAGE_SIZE as u64, &[1u8; PAGE_SIZE])
            .unwrap();
        mm.msync(&atomic).unwrap();
        // The flush's data sync fails: the run must be written again from the log.
        FAIL_FLUSH_SYNC.with(|x| x.set(true));
        assert!(f.sync().is_err(), "the planted sync failure was not seen");
        // A newer write of the committed page, then a sync that settles first.
        f.write_at(&[2u8; PAGE_SIZE], PAGE_SIZE as u64).unwrap();
        f.sync().unwrap();
        assert!(
            file_page(&p, 1) == [2u8; PAGE_SIZE],
            "the journal's replay overwrote a newer write (page 1 holds {})",
            file_page(&p, 1)[0]
        );
        drop((f, atomic, mm, vm));
        assert!(file_page(&p, 1) == [2u8; PAGE_SIZE], "after teardown");
    }
}
