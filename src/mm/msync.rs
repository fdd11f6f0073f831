//! `msync` of file mappings, and the failure-atomic commit of `Share::Atomic`
//! mappings through the file's journal (`filemap::journal`).
//!
//! Owns: the commit protocol of an Atomic mapping, the journal's place beside the
//! file (`PATH.usermm-journal`), its recovery when the file is opened afresh, and
//! `fsck`.
//!
//! ## The commit (docs/design.md, "Failure-atomic msync")
//! An Atomic mapping's private pages (entries of the space's own table that are not
//! `EMPTY`) are exactly the pages it dirtied since its last `msync`; the file is
//! untouched by them until then (reclaim sends them to swap). `msync`:
//! 1. takes the file's commit lock (`Inode::commit`);
//! 2. lists the region's private pages, then for each pins it shared (a swapped
//!    page is read back in), copies it into the journal's transaction and notes the
//!    entry's value; the journal streams records through its preallocated shadow
//!    buffer;
//! 3. commits: the log is synced — **the durability point**;
//! 4. checkpoints: the journal writes the committed pages to the file in place,
//!    without syncing it: the transaction stays in the log, and the next commit
//!    goes after it. Once another as large would not fit in the log's working size
//!    (`RESERVE`, 1 MiB of zeros written once by `prepare_atomic`; none if the
//!    file system has no room: then every checkpoint flushes), the checkpoint flushes:
//!    syncs the file, then empties the log in place (its first header zeroed, its
//!    size kept, so a commit's log sync only overwrites written blocks: a flush of
//!    data alone). `File::sync`, `Share::Shared` msyncs and the file's teardown
//!    flush first (`Inode::sync` → `Journal::settle`). So a small msync costs one
//!    sync, the log's;
//! 5. keeps the page cache coherent with step 4: just before each page is written
//!    (the checkpoint's `on_page`, `Inode::behind`) its write-back in flight is
//!    waited for, a clean cached copy dropped (or marked stale, if a reader's guard
//!    pins it: the guard keeps its bytes, others read the file) and the empty entry
//!    claimed until the write is done; then drops the private copies whose entry did
//!    not change since step 2 (a page written again meanwhile stays private: it
//!    belongs to the next commit).
//!
//! A crash before 3 leaves the previous version (the log has no commit record); a
//! crash after 3 is repaired by replaying the log — every committed transaction
//! not yet flushed, in order — when the file is next mapped or opened
//! (`recover_on_open`) or by `usermm fsck PATH`. Until a flush, the file's pages
//! are written but not durable; the log is what makes them so.
//!
//! ## Locking and allocation (invariant 4)
//! `Inode::commit` (Mutex) is taken first — by a thread holding a mutable guard,
//! with `try_lock` and polling, so that it can see the holder wait for one of its
//! guards (`Inode::commit_waits`) and fail instead of waiting for ever; under it the region's regions lock (read,
//! briefly), the pins of step 2 (which may fault and allocate frames), the
//! journal's I/O, and step 5's cache work (frame and entry locks, a claim held
//! across one page's write, waits for a fault's read or a write-back's I/O, which
//! end without the commit lock). That is allowed because nothing reclaim does ever needs the
//! commit lock: an Atomic mapping's pages go to swap, never to the file, and the
//! page-I/O threads write only `Share::Shared` cache pages. The journal's buffer is
//! allocated when the first Atomic mapping of the file is made (`prepare_atomic`),
//! not under the lock. The journal file is `flock`ed by the Vm that holds it, so a
//! second process mapping the same file `Atomic` (or `fsck`) is refused instead of
//! interleaving commits.

use crate::addr::{VAddr, PAGE_SIZE};
use crate::device::AlignedPages;
use crate::error::{Error, Result};
use crate::filemap::inode::Inode;
use crate::filemap::journal::{log_bytes, Clipped, Journal, SHADOW_RECORDS};
use crate::frame::copy_out;
use crate::mm::fault::{pin, unpin, Want};
use crate::mm::region::{Region, Share};
use crate::mm::space::SpaceInner;
use crate::pte::{Pte, EMPTY, P_SHARED_ONE};
use crate::sync::Ordering;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The journal of the file at `path`.
pub(crate) fn journal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".usermm-journal");
    PathBuf::from(p)
}

fn with_path(path: &Path, e: io::Error) -> Error {
    Error::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Takes the journal's `flock` (exclusive, not waiting). False if another open
/// file description holds it.
fn try_flock(f: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The working size of an Atomic file's log (`Journal::reserve`): four
/// transactions of a shadow buffer's worth of pages (1 MiB).
const RESERVE: u64 = 4 * log_bytes(SHADOW_RECORDS as u64);

/// What `fsck` found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsckReport {
    /// Whether a journal was there.
    pub journal: bool,
    /// Pages of a committed transaction written to the file (0: none was pending).
    pub replayed_pages: u64,
    /// Bytes of an uncommitted (torn) transaction thrown away.
    pub discarded_bytes: u64,
}

/// Recovers the journal of the file at `path` (opened as `file`), if there is one
/// that no one else holds: a committed transaction is written to the file, an
/// uncommitted one discarded. Runs when a file is opened afresh by a Vm.
pub(crate) fn recover_on_open(path: &Path, file: &File) -> Result<()> {
    recover(path, file, false).map(|_| ())
}

fn recover(path: &Path, file: &File, strict: bool) -> Result<FsckReport> {
    let jp = journal_path(path);
    let log = match std::fs::OpenOptions::new().read(true).write(true).open(&jp) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(FsckReport::default()),
        Err(e) => return Err(with_path(&jp, e)),
    };
    if !try_flock(&log).map_err(|e| with_path(&jp, e))? {
        // Its owner is alive and checkpoints it itself.
        if strict {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{}: in use by a running process", jp.display()),
            )));
        }
        return Ok(FsckReport {
            journal: true,
            ..FsckReport::default()
        });
    }
    let mut j = Journal::with_capacity(log, 1).map_err(|e| with_path(&jp, e))?;
    let len = file.metadata().map_err(|e| with_path(path, e))?.len();
    let r = j
        .recover(&Clipped { file, len }, &mut |_, _| {})
        .map_err(|e| with_path(&jp, e))?;
    Ok(FsckReport {
        journal: true,
        replayed_pages: r.replayed_pages,
        discarded_bytes: r.discarded_bytes,
    })
}

/// `usermm fsck PATH`: recovers the journal of the file at `path` (see
/// [`Share::Atomic`]). Errors: `Io` if the file or its journal cannot be opened,
/// read or written, or if a running process holds the journal.
pub fn fsck(path: impl AsRef<Path>) -> Result<FsckReport> {
    let path = path.as_ref();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| with_path(path, e))?;
    recover(path, &file, true)
}

/// Opens the file's journal for its first Atomic mapping in this Vm (creating it,
/// and recovering what another process may have left since the file was opened).
pub(crate) fn prepare_atomic(ino: &Inode) -> Result<()> {
    let mut c = ino.commit.lock();
    if c.is_some() {
        return Ok(());
    }
    let jp = journal_path(&ino.path);
    let log = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&jp)
        .map_err(|e| with_path(&jp, e))?;
    if !try_flock(&log).map_err(|e| with_path(&jp, e))? {
        return Err(Error::Io(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{}: in use by another process (one process at a time may map a file Atomic)",
                jp.display()
            ),
        )));
    }
    let mut j = Journal::new(log).map_err(|e| with_path(&jp, e))?;
    let clip = Clipped {
        file: &ino.file,
        len: ino.len(),
    };
    let rep = j
        .recover(&clip, &mut |_, _| {})
        .map_err(|e| with_path(&jp, e))?;
    if rep.replayed_pages > 0 {
        // Another process's commit reached the file behind this Vm's cache.
        ino.invalidate_all();
    }
    // The log's working size, written once: commits that fit overwrite it in place.
    // Without it (no room on the file system, say) the journal still works: it
    // grows the log as commits need and flushes at every checkpoint; a real I/O
    // error shows again at the first commit.
    let _ = j.reserve(RESERVE);
    *c = Some(j);
    Ok(())
}

/// `AddressSpace::msync`.
pub(crate) fn msync(sp: &SpaceInner, r: Region) -> Result<()> {
    let (ino, share) = {
        let regions = sp.regions.read();
        let v = regions
            .get(r.start.0)
            .filter(|v| v.len == r.len)
            .ok_or(Error::BadAddress { addr: r.start.0 })?;
        let (ino, share, _) = v.file_page(v.start).ok_or_else(|| {
            Error::InvalidArgument(format!("msync of {:#x}: not a file mapping", r.start.0))
        })?;
        (ino.clone(), share)
    };
    match share {
        Share::Shared => ino.sync(0, r.len / PAGE_SIZE as u64, true),
        Share::Private => Ok(()),
        Share::Atomic => commit(sp, &ino, r),
    }
}

/// Takes `ino`'s commit lock. A thread holding a mutable guard may be what the
/// holder waits for: a commit of another Atomic mapping of the file, whose page
/// this thread pinned, holds the lock while it waits for the guard. Such a thread
/// polls instead of blocking, and gets `WouldDeadlock` once the holder is seen
/// waiting for one of its own guards (`Inode::commit_waits`); otherwise it gets
/// the lock when the holder lets go (the holder waits for nobody who waits for
/// us, so it does).
fn lock_commit(
    ino: &Inode,
) -> Result<crate::sync::MutexGuard<'_, Option<crate::filemap::journal::Journal<std::fs::File>>>> {
    if !crate::pins::holds_exclusive() {
        return Ok(ino.commit.lock());
    }
    loop {
        if let Some(g) = ino.commit.try_lock() {
            return Ok(g);
        }
        let key = ino.commit_waits[0].load(Ordering::Acquire);
        let vpn = ino.commit_waits[1].load(Ordering::Relaxed);
        if key != 0 && crate::pins::holds_pin_key(key as usize, vpn, vpn + 1, true) {
            return Err(Error::WouldDeadlock(
                "msync of an Atomic mapping while a commit of the same file waits for a guard of this thread",
            ));
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// The commit of an Atomic mapping (see the module header).
fn commit(sp: &SpaceInner, ino: &Inode, r: Region) -> Result<()> {
    let jp = journal_path(&ino.path);
    let io_err = |e: io::Error| with_path(&jp, e);
    // The commit pins the region's pages, waiting out writers: with a guard of
    // this thread's on one of them it would wait for itself (holding the lock).
    if crate::mm::fault::holds_pin(sp, r.start.vpn(), r.end().vpn(), true) {
        return Err(Error::WouldDeadlock("msync of an Atomic mapping"));
    }
    let mut guard = lock_commit(ino)?;
    let j = guard
        .as_mut()
        .ok_or_else(|| Error::InvalidArgument("msync: the file has no journal".into()))?;
    let first = r.start.vpn();
    let end = r.end().vpn();
    let mut pages = Vec::new();
    {
        let regions = sp.regions.read();
        if regions.get(r.start.0).is_none_or(|v| v.len != r.len) {
            return Err(Error::BadAddress { addr: r.start.0 });
        }
        sp.pt.for_each(first, end, |vpn, pte| {
            if pte.load(Ordering::Acquire) != EMPTY {
                pages.push(vpn);
            }
        });
    }
    if pages.is_empty() {
        return Ok(());
    }
    // A previous commit whose checkpoint failed (its data write or sync) is still
    // in the log: finish it first (a no-op when the log is clean). Its pages go to
    // the file behind the cache too: `behind` keeps the cache coherent with them.
    let mut behind = ino.behind();
    let done = j.checkpoint(
        &Clipped {
            file: &ino.file,
            len: ino.len(),
        },
        &mut |pg, _| behind.page(pg),
    );
    // Before the pins below: one may read the page it claimed.
    behind.end();
    done.map_err(io_err)?;
    let file_pages = ino.pages();
    let mut buf = vec![0u8; PAGE_SIZE];
    // (page number, entry value after the copy) of each page committed.
    let mut copied = Vec::with_capacity(pages.len());
    let mut txn = j.begin().map_err(io_err)?;
    for vpn in pages {
        let pg = vpn - first;
        if pg >= file_pages {
            continue;
        }
        // Said while it waits (a writer's guard), for `lock_commit`.
        ino.commit_waits[1].store(vpn, Ordering::Relaxed);
        ino.commit_waits[0].store(crate::mm::fault::space_key(sp) as u64, Ordering::Release);
        let p = pin(sp, VAddr(vpn * PAGE_SIZE as u64), Want::Shared);
        ino.commit_waits[0].store(0, Ordering::Release);
        let p = p?;
        // SAFETY: the frame is pinned shared: nobody writes it while we copy.
        unsafe { copy_out(sp.eng.frames.frame_ptr(p.pfn), &mut buf) };
        // The entry as it is while pinned (no write can move it meanwhile), less
        // our pin: what it is after `unpin` if nothing writes the page since.
        let seen = p.pte.load(Ordering::Acquire) - P_SHARED_ONE;
        unpin(p.pte, p.pfn, Want::Shared);
        copied.push((vpn, seen));
        txn.add(pg, &buf).map_err(io_err)?;
    }
    // The file's length first: recovery clips what it replays to it.
    ino.sync_len()?;
    txn.commit().map_err(io_err)?;
    let clip = Clipped {
        file: &ino.file,
        len: ino.len(),
    };
    // Each page's cached copy is dropped (or marked stale under a reader's guard)
    // just before the page is written behind it (`Inode::behind`).
    let done = j.checkpoint(&clip, &mut |pg, _| behind.page(pg));
    drop(behind);
    done.map_err(io_err)?;
    drop(guard);
    // Private copies equal to the commit go; those reclaim sent to swap meanwhile
    // are compared with the file afterwards, without the regions lock.
    let mut swapped = Vec::new();
    {
        let regions = sp.regions.read();
        if regions.get(r.start.0).is_none_or(|v| v.len != r.len) {
            return Ok(());
        }
        for (vpn, v) in copied {
            if sp.pt.is_shared(vpn) {
                continue; // a fork shares the leaf: the copy stays
            }
            let Some(pte) = sp.pt.lookup(vpn) else {
                continue;
            };
            if !crate::mm::entry::release_if_unchanged(&sp.eng, pte, v) {
                let now = pte.load(Ordering::Acquire);
                if matches!(Pte::decode(now), Pte::Swapped(_)) {
                    swapped.push((vpn, now));
                }
            }
        }
    }
    if !swapped.is_empty() {
        let mut bufs = AlignedPages::new(2)?;
        for (vpn, v) in swapped {
            drop_if_as_in_file(sp, ino, r, vpn, first, v, &mut bufs);
        }
    }
    Ok(())
}

/// A private page that reclaim sent to swap after its copy was committed: its
/// entry no longer says whether it was written since, so its bytes are compared
/// with the file's (which now hold the commit). Equal: the private copy goes (the
/// mapping reads the file again); different (written again, or the file changed
/// meanwhile): it stays, and belongs to the next commit. Errors leave it.
///
/// The entry is claimed (`BUSY`, from `v`, its value seen) under the regions read
/// lock, as a fault claims; the reads run without the lock, and the claim keeps
/// unmap and fork off the entry meanwhile (and its slot from being freed and
/// reused under us).
fn drop_if_as_in_file(
    sp: &SpaceInner,
    ino: &Inode,
    r: Region,
    vpn: u64,
    first: u64,
    v: u64,
    bufs: &mut AlignedPages,
) {
    let Pte::Swapped(e) = Pte::decode(v) else {
        return;
    };
    let pte = {
        let regions = sp.regions.read();
        if regions.get(r.start.0).is_none_or(|x| x.len != r.len) || sp.pt.is_shared(vpn) {
            return;
        }
        let Some(pte) = sp.pt.lookup(vpn) else {
            return;
        };
        if pte
            .compare_exchange(v, crate::pte::BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        crate::pte::claimed(pte);
        pte
    };
    let same = sp.eng.swap.get(e.dev).is_some_and(|dev| {
        let (a, b) = bufs.pages_mut(2).split_at_mut(PAGE_SIZE);
        if dev.read(e.slot, a).is_err() {
            return false;
        }
        b.fill(0);
        let off = (vpn - first) * PAGE_SIZE as u64;
        let n = ino.len().saturating_sub(off).min(PAGE_SIZE as u64) as usize;
        std::os::unix::fs::FileExt::read_exact_at(&ino.file, &mut b[..n], off).is_ok()
            && a[..n] == b[..n]
            && a[n..].iter().all(|&x| x == 0)
    });
    if same {
        pte.store(EMPTY, Ordering::Release);
        crate::pte::released(pte);
        sp.eng.swap.put(e);
    } else {
        pte.store(v, Ordering::Release);
        crate::pte::released(pte);
    }
}
