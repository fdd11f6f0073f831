//! The write-ahead (redo) journal behind failure-atomic msync: every page dirtied
//! since the previous msync reaches the file, or none of them, whatever crashes when.
//!
//! Owns: the log store (one file per mapped file, say) and the shadow buffer, a fixed
//! block of `SHADOW_RECORDS` page records plus one commit record, allocated by
//! [`Journal::new`] and reused for everything: staging records on their way to the
//! log, and reading them back at checkpoint and recovery. The data store (the mapped
//! file) is the caller's; the journal only writes pages of a committed transaction
//! to it (through [`Clipped`], the data file as a store of whole pages cut at its
//! length, which `mm::msync` and `filemap::inode` both hand it). Keeps docs/design.md invariant 4 (seed 003, XFS shadow buffers; see
//! "Locking/allocation" below).
//!
//! ## On-disk format (log store)
//! The log holds a **run** of transactions, back to back from offset 0. A
//! transaction is a run of records, all little-endian, each with a 64-byte header:
//! ```text
//! offset  size  page record ("UMJP")        commit record ("UMJC")
//!  0       4    magic b"UMJP"               magic b"UMJC"
//!  4       4    format version (1)          format version (1)
//!  8       8    transaction seq             transaction seq
//! 16       8    ordinal in the txn (0, 1,…) page count n
//! 24       8    page index in the data file 0
//! 32       4    0                           chain
//! 36      24    zero                        zero
//! 60       4    crc32c(bytes 0..60 ++ page) crc32c(bytes 0..60)
//! 64    4096    the page image              (nothing: the record is 64 bytes)
//! ```
//! so in a transaction starting at `s`, page record `i` is at `s + i * 4160` and
//! the commit record at `s + n * 4160`.
//! `chain` = crc32c(seq as 8 bytes) extended by the crc of every page record in
//! order (4 bytes each, `crc32c_append`). A transaction starting at `s` is committed
//! iff, read from `s`, records 0..n all carry the magic, version, the seq of record 0
//! and their own ordinal, each checks against its crc, and the record after them is
//! a commit record with the same seq, the count n, the chain of those n crcs and a
//! valid crc. The run is read from offset 0: the first transaction (any seq), then
//! the one starting at its end if it is committed **and its seq is one more**, and
//! so on; the run ends at the first place where that fails. Anything there — a
//! zero-filled hole, a torn record (its crc), garbage, a record of another
//! transaction (its seq or ordinal), a commit record whose transaction lost or
//! changed a record (its count or chain), an older transaction (its seq) — ends
//! the run and is ignored: an unfinished next transaction, or stale bytes of
//! earlier ones (see below). A log of 0 bytes, or whose first 64 bytes are zeros,
//! is **empty**. A page index may appear more than once; records are replayed in
//! order, transactions in the run's order, so the later image wins.
//!
//! ## Emptying in place
//! The log is not truncated after a flush: it keeps its length, and is emptied by
//! zeroing its first header (one 64-byte write at offset 0). The next run
//! overwrites the same blocks from offset 0; a log sync that only overwrites
//! blocks the file already has is a flush of data alone (`fdatasync` has no size or
//! extent change to commit through the file system's journal — on ext4 that halves
//! the cost of a small commit's log sync). [`Journal::reserve`] makes the log a
//! given size of written zeros once, when it is opened (the first Atomic mapping
//! of the file), so small transactions never grow it; a larger one grows it by its
//! own writes, once. Only `recover` truncates the log (to 0 bytes, synced): `fsck`
//! leaves no journal bytes behind.
//!
//! ## Deferred flush
//! A checkpoint writes the committed pages to the data store but does not sync it:
//! the transaction stays in the log, and the next one is written after it (the
//! run). So a commit costs one sync, the log's. The run is **flushed** — the data
//! store synced, then the log emptied — when another transaction as large as the
//! last would not fit in the `reserve`d size (without `reserve`, at every
//! checkpoint), by `settle` (which `Inode::sync` calls before it makes the file
//! durable, and so its teardown), and before the log of an abandoned transaction
//! is emptied (its seq is not reused: the next transaction begins a new run).
//! Recovery replays the whole run in order. Until the flush, readers of the data
//! store see the new pages (they are written), and a crash loses only the data
//! store's unsynced writes, which the log holds.
//!
//! Sequence numbers start at a random value per [`Journal`] (std's `RandomState`
//! keys) and increase by one per transaction, so a record left in the file by an
//! earlier process — which a file system that exposes stale blocks after a crash
//! (ext4 `data=writeback`) could show beyond a run's end — does not carry the seq
//! that continues the run, and records of an earlier run of this journal have
//! smaller seqs. An older *committed* run can reappear only if the emptying that
//! followed its flush did not reach the disk; it is then replayed again,
//! harmlessly: its pages are already in the file (synced before the emptying), and
//! nothing newer is, because a newer transaction commits by a log sync, which makes
//! that emptying durable too.
//!
//! ## Protocol and sync points
//! 1. `begin`: if an earlier transaction was abandoned (or failed), the log is
//!    emptied first (in place, synced) — if the run before it is unflushed,
//!    `begin` refuses and `checkpoint` flushes and empties. A transaction is
//!    written at the end of the run: offset 0 of an empty log (emptied by this
//!    journal, synced or see step 5; found empty by `new`; or recovered), or just
//!    after the last checkpointed transaction, with the next seq.
//! 2. `add`: the page record goes into the shadow buffer; a full buffer is written
//!    to the log (no sync).
//! 3. `commit`: the buffered records and the commit record are written in one
//!    write, then the log is synced. **Log sync = commit**: the durability point.
//! 4. `checkpoint`: the transaction is scanned where `commit` wrote it, checked as
//!    above, and each of its pages is read back from the log and written to the
//!    data store at `index * 4096` (no sync). `recover` does the same for every
//!    transaction of the run, in order, then syncs the data store and truncates
//!    the log (synced). A flush (see above) **syncs the data store before the log
//!    is emptied**.
//! 5. A flush does not sync the emptied log: that sync would be a third per
//!    msync. Until the log's next sync (the next commit, or `settle`) a crash may
//!    find the flushed run still there and replay it, which rewrites pages the
//!    data store already holds durably (idempotent); a new transaction written over
//!    it from offset 0 has another seq, so no mix of the two can validate. The one
//!    thing a stale replay could undo is a write to the data store made durable by
//!    someone else after the flush: such a writer calls `settle` first
//!    (`Inode::sync` does).
//!
//! Data is written only by step 4, only for a transaction whose commit record the
//! scan has just found valid, and the log is emptied only once the writes of every
//! transaction in it are durable. So at any crash:
//! - before the commit's log sync returned: the new transaction has no valid
//!   commit record (it, or a page record, or part of one, did not reach the disk:
//!   the crc, count or chain fails), so the run ends before it, and the data store
//!   holds none of it: recovery replays the run before it (the previous version).
//!   Or the device happened to persist everything before the crash: recovery
//!   makes the file the new version. `commit` had not returned `Ok`, so the caller
//!   promised nothing; either way it is one version.
//! - after `commit` returned `Ok`, during the data writes, before or during the
//!   flush's data sync: the file may hold any mix of old and new pages of the
//!   run's transactions, but the log still holds the whole run: recovery writes
//!   every page of it again in order (full-page images: idempotent) and syncs,
//!   giving the last version.
//! - after the flush's data sync, during the log's emptying: the log is either
//!   still the run (replayed again, harmlessly) or empty; the file is the last
//!   version. The emptying is one write of 64 bytes inside the first sector: if
//!   only part of it reached the disk, the first header no longer checks (its
//!   crc), so the log holds no run — the same as empty.
//! - after the emptying, while the next transaction is written over the old run
//!   (before its log sync): if the emptying did not reach the disk, the disk holds
//!   the old run with some of the new transaction's sectors written over it. A
//!   record with any sector of the new one fails its crc (the page and header are
//!   one crc) or carries the new seq; so either the run ends earlier (what it
//!   still replays is durable in the file already), or the old run replays whole,
//!   because every sector the new one wrote there held the same bytes (again,
//!   harmlessly).
//! - after a new transaction committed over an old run: the bytes after its commit
//!   record are the old run's (smaller seqs) or zeros: they end the run. The old
//!   run's record 0 was overwritten durably by the new commit's log sync, so it
//!   can never validate again.
//! - during `recover` itself: the same cases as the last four; recovering again is
//!   always allowed.
//! - during `begin`'s emptying of an abandoned transaction: it has no commit record
//!   (or one its `commit` did not report: in doubt, as above); emptied or not, it
//!   is one of the two versions.
//! - during `reserve`: it writes zeros past the log's end only, on an empty log.
//!
//! ## Errors
//! I/O errors propagate unchanged. A failing `add` or `commit` (ENOSPC on the log,
//! say) leaves the transaction uncommitted and the data store untouched by it;
//! the next `begin` (or `checkpoint`) empties the log. `checkpoint` after a failed data
//! write keeps the transaction committed: it may be retried, and `begin` refuses
//! (`InvalidInput`) until it succeeds, as it does before `recover` on a log that was
//! not empty at `new`. A flush whose data sync failed does not trust a later sync
//! (the kernel may have dropped the failed pages): `begin` refuses, and the next
//! `checkpoint` recovers — writes the whole run again from the log, syncs, and
//! truncates the log. A log that changes under a committed transaction (its scan
//! no longer finds exactly what `commit` wrote) is `InvalidData`. Errors the journal
//! makes itself are bare `ErrorKind`s (no message: building one would allocate).
//!
//! ## Locking/allocation
//! No locks: the caller serialises transactions (`begin`, `checkpoint` and `recover`
//! take `&mut self`, a [`Txn`] borrows the journal mutably), and the stores do
//! positioned I/O. Invariant 4: whatever a commit needs is allocated before, in
//! `new` (the shadow buffer); `add`, `commit`, `checkpoint`, `settle`, `reserve`
//! and `recover` allocate
//! nothing — records are encoded in place in the shadow buffer, read back into it
//! in chunks, and the pages handed to `on_page` and written to the data store are
//! slices of it — so a commit or a checkpoint under a lock that reclaim needs cannot
//! wait on reclaim for memory. They run in `lockdep::no_alloc` sections, except
//! around the caller's `on_page`.
//!
//! ## Tests
//! `MemStore` keeps a durable image and the unsynced operations; its `crash` keeps
//! a random subset of them, writes torn at 512-byte sectors. The exhaustive test
//! runs three transactions (random pages, duplicate indices) over a data store
//! of 8 pages (a third of the scenarios flush at every checkpoint, a third
//! sometimes, a third only at the final `settle`), crashes the machine at every
//! I/O operation in turn, then crashes recovery at every one of its operations and
//! recovers again, and checks that the file is exactly one version: the last
//! committed, or the next if its commit failed only at the log sync. Transactions
//! differ in size, so shorter ones are written over longer ones in place. Two
//! planted bugs (no log sync in `commit`; the in-place emptying before the data
//! sync in a flush) must be caught by the same checker.

use crate::addr::PAGE_SIZE;
use crate::lockdep;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

#[cfg(test)]
thread_local! {
    /// Tests outside this module: the next data sync of a flush on this thread
    /// fails (`EIO`), as a failing disk's would.
    pub(crate) static FAIL_FLUSH_SYNC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Where journal and data bytes go. Implemented for `std::fs::File` (positioned
/// I/O, `sync` = fdatasync) and, in tests, by a crash-simulating store.
pub(crate) trait Store: Send + Sync {
    /// Reads at `off`; fewer bytes than asked (0 at the end) as `pread`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `off`, extending the store as needed.
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Everything written (and every `set_len`) before is durable.
    fn sync(&self) -> io::Result<()>;
    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// The data file as the journal writes it: whole pages, clipped to the file's
/// length (the tail of its last page is not the file's).
pub(crate) struct Clipped<'a> {
    pub file: &'a File,
    pub len: u64,
}

impl Store for Clipped<'_> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self.file, buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(off)) as usize;
        if n == 0 {
            return Ok(());
        }
        std::os::unix::fs::FileExt::write_all_at(self.file, &buf[..n], off)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::other(
            "the journal does not change a data file's length",
        ))
    }
}

impl Store for File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        // fdatasync also makes a changed file size durable (it is needed to read the data).
        self.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

impl<T: Store + ?Sized> Store for Arc<T> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        (**self).read_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        (**self).write_all_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
}

/// Page records the shadow buffer holds (64 × 4160 bytes + a commit record: 260 KiB).
pub(crate) const SHADOW_RECORDS: usize = 64;
/// Record header bytes.
const HDR: usize = 64;
/// The log bytes of a transaction of `pages` pages (what [`Journal::reserve`]
/// needs for it to fit).
pub(crate) const fn log_bytes(pages: u64) -> u64 {
    pages * REC as u64 + COMMIT as u64
}
/// A page record: header and page image.
const REC: usize = HDR + PAGE_SIZE;
/// A commit record: a header alone.
const COMMIT: usize = HDR;
const MAGIC_PAGE: [u8; 4] = *b"UMJP";
const MAGIC_COMMIT: [u8; 4] = *b"UMJC";
const VERSION: u32 = 1;
/// Where the crc sits in the header (it covers the bytes before it and the page).
const CRC_AT: usize = HDR - 4;
/// The largest page index whose page fits below 2^64 bytes.
const MAX_INDEX: u64 = u64::MAX / PAGE_SIZE as u64 - 1;

/// What `recover` or `checkpoint` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// Page records written to the data store (duplicates included).
    pub replayed_pages: u64,
    /// The log's length if it held bytes but no committed transaction and was not
    /// empty (an unfinished or torn transaction, garbage); else 0 (bytes after a
    /// committed transaction's end, or behind an emptied header, are stale or
    /// reserved, not discarded).
    pub discarded_bytes: u64,
    /// The seq of the replayed transaction (0: none).
    pub seq: u64,
}

/// What the journal knows of its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not empty at `new` and not recovered yet (or being recovered): `begin`
    /// refuses.
    Unknown,
    /// No transaction open or waiting: the log holds the unflushed run
    /// `[0, tail)` (none if `tail` is 0), then nothing that validates.
    Ready,
    /// May hold records of a transaction that was abandoned or whose commit failed.
    Dirty,
    /// Holds this committed transaction, not yet (all) written to the data store.
    Committed(Found),
}

/// A committed transaction as found in (or written to) the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Found {
    seq: u64,
    pages: u64,
    /// Log offset of its first record.
    start: u64,
    /// Log offset just past the commit record.
    end: u64,
}

/// The write-ahead journal of one data store. See the module header.
pub(crate) struct Journal<S: Store> {
    log: S,
    /// The shadow buffer: `records * REC + COMMIT` bytes, allocated once.
    shadow: Box<[u8]>,
    state: State,
    /// The seq the next transaction gets.
    next_seq: u64,
    /// `checkpoint` emptied the log without syncing it (see `settle`).
    unsynced_reset: bool,
    /// The end of the run of checkpointed, unflushed transactions at the log's
    /// start: where the next transaction goes (0: none, the log is empty).
    tail: u64,
    /// What `reserve` made the log: the run is flushed before it outgrows it.
    reserved: u64,
    /// The log bytes of the last transaction checkpointed.
    last_bytes: u64,
    /// The planted bug of the crash test: `commit` returns without syncing the log.
    #[cfg(test)]
    plant_skip_commit_sync: bool,
    /// The planted bug of the emptying: `checkpoint` empties the log before it
    /// syncs the data store.
    #[cfg(test)]
    plant_empty_before_data_sync: bool,
}

impl<S: Store> std::fmt::Debug for Journal<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("shadow_bytes", &self.shadow.len())
            .field("state", &self.state)
            .field("next_seq", &self.next_seq)
            .field("tail", &self.tail)
            .field("reserved", &self.reserved)
            .finish()
    }
}

/// One transaction being built; see [`Journal::begin`].
pub(crate) struct Txn<'a, S: Store> {
    j: &'a mut Journal<S>,
    seq: u64,
    /// Page records added so far.
    pages: u64,
    /// The chain over the crcs of those records.
    chain: u32,
    /// Bytes staged in the shadow buffer.
    fill: usize,
    /// Log offset of the transaction's first record.
    start: u64,
    /// Log offset where the shadow buffer's first byte goes.
    off: u64,
}

impl<S: Store> std::fmt::Debug for Txn<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("seq", &self.seq)
            .field("pages", &self.pages)
            .field("log_bytes", &(self.off + self.fill as u64))
            .finish()
    }
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Writes a header into `rec[..HDR]` (crc left to [`seal`]).
fn put_header(rec: &mut [u8], magic: [u8; 4], seq: u64, a: u64, b: u64, chain: u32) {
    let h = &mut rec[..HDR];
    h.fill(0);
    h[0..4].copy_from_slice(&magic);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&a.to_le_bytes());
    h[24..32].copy_from_slice(&b.to_le_bytes());
    h[32..36].copy_from_slice(&chain.to_le_bytes());
}

/// The crc of a whole record (header without its crc field, then the page if any).
fn record_crc(rec: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&rec[..CRC_AT]), &rec[HDR..])
}

/// Stores the record's crc in its header and returns it.
fn seal(rec: &mut [u8]) -> u32 {
    let crc = record_crc(rec);
    rec[CRC_AT..HDR].copy_from_slice(&crc.to_le_bytes());
    crc
}

fn chain_seed(seq: u64) -> u32 {
    crc32c::crc32c(&seq.to_le_bytes())
}

fn chain_next(chain: u32, crc: u32) -> u32 {
    crc32c::crc32c_append(chain, &crc.to_le_bytes())
}

/// A header as read.
struct Hdr {
    magic: [u8; 4],
    version: u32,
    seq: u64,
    a: u64,
    b: u64,
    chain: u32,
    crc: u32,
}

impl Hdr {
    fn parse(h: &[u8]) -> Self {
        Hdr {
            magic: h[0..4].try_into().unwrap(),
            version: get_u32(h, 4),
            seq: get_u64(h, 8),
            a: get_u64(h, 16),
            b: get_u64(h, 24),
            chain: get_u32(h, 32),
            crc: get_u32(h, CRC_AT),
        }
    }
}

/// Reads until `buf` is full or the store ends; returns the bytes read.
fn read_full(s: &(impl Store + ?Sized), buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match s.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A seq no earlier journal is likely to have used: random (std's per-process hash
/// keys), with 2^62 of headroom for increments.
fn fresh_seq() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (r >> 2) | 1
}

impl<S: Store> Journal<S> {
    /// A journal on `log` with the default shadow buffer. No I/O but `log.len()`:
    /// a log that is not empty must be `recover`ed before the first `begin`.
    pub fn new(log: S) -> io::Result<Self> {
        Self::with_capacity(log, SHADOW_RECORDS)
    }

    /// As [`new`](Self::new), with a shadow buffer of `records` page records (at
    /// least 1): a transaction of more pages reaches the log in several writes.
    pub fn with_capacity(log: S, records: usize) -> io::Result<Self> {
        assert!(
            records >= 1,
            "a shadow buffer holds at least one page record"
        );
        let len = log.len()?;
        Ok(Journal {
            log,
            shadow: vec![0u8; records * REC + COMMIT].into_boxed_slice(),
            state: if len == 0 {
                State::Ready
            } else {
                State::Unknown
            },
            next_seq: fresh_seq(),
            unsynced_reset: false,
            tail: 0,
            reserved: 0,
            last_bytes: 0,
            #[cfg(test)]
            plant_skip_commit_sync: false,
            #[cfg(test)]
            plant_empty_before_data_sync: false,
        })
    }

    /// The log store.
    #[cfg(test)]
    pub fn log(&self) -> &S {
        &self.log
    }

    /// Committed transactions checkpointed but not yet flushed (their pages are
    /// written to the data store, not synced there): the log bytes they hold.
    #[cfg(test)]
    pub fn pending_bytes(&self) -> u64 {
        self.tail
    }

    /// Replays every committed transaction the log holds (the run from offset 0,
    /// in order) onto `data`, syncs `data`, then empties the log (truncated to 0
    /// bytes + sync; see [`reserve`](Self::reserve) to make it its working size
    /// again). A torn or uncommitted tail is discarded. Idempotent: crashing during
    /// `recover` and recovering again is fine. `on_page(index, bytes)` is called for
    /// every page replayed, before it is written to `data`.
    pub fn recover(
        &mut self,
        data: &dyn Store,
        on_page: &mut dyn FnMut(u64, &[u8]),
    ) -> io::Result<Recovery> {
        let (len, empty) = {
            let _na = lockdep::no_alloc("journal scan");
            lockdep::might_block("journal log read");
            let len = self.log.len()?;
            let first = read_full(&self.log, &mut self.shadow[..HDR], 0)?;
            (
                len,
                first == 0 || (first == HDR && self.shadow[..HDR].iter().all(|&b| b == 0)),
            )
        };
        // From the first replayed page until the log is emptied, nothing may be
        // dropped: the data store may hold part of what the log holds.
        let mut r = Recovery::default();
        let mut off = 0u64;
        let mut expect = None;
        loop {
            let found = if empty {
                None
            } else {
                let _na = lockdep::no_alloc("journal scan");
                lockdep::might_block("journal log read");
                scan_txn(&self.log, &mut self.shadow, off, expect)?
            };
            let Some(found) = found else { break };
            self.state = State::Unknown;
            self.apply(data, found, on_page)?;
            r.replayed_pages += found.pages;
            r.seq = found.seq;
            self.next_seq = self.next_seq.max(found.seq + 1);
            off = found.end;
            expect = Some(found.seq + 1);
        }
        if r.seq != 0 {
            let _na = lockdep::no_alloc("journal data sync");
            lockdep::might_block("journal data sync");
            data.sync()?;
        } else if !empty {
            r.discarded_bytes = len;
        }
        if len != 0 || self.state != State::Ready || self.tail != 0 {
            let _na = lockdep::no_alloc("journal reset");
            lockdep::might_block("journal log sync");
            self.log.set_len(0)?;
            self.log.sync()?;
        }
        self.state = State::Ready;
        self.tail = 0;
        self.unsynced_reset = false;
        Ok(r)
    }

    /// Starts a transaction, written to the log after the transactions already
    /// checkpointed but not flushed (at offset 0 of an empty log). `InvalidInput`
    /// while a committed transaction waits for `checkpoint`, before `recover` on a
    /// log that was not empty at `new`, or after an abandoned or failed transaction
    /// while unflushed ones are in the log (`checkpoint` first: it flushes them and
    /// empties the log). After an abandoned or failed transaction with nothing
    /// unflushed, empties the log first (in place, synced).
    pub fn begin(&mut self) -> io::Result<Txn<'_, S>> {
        match self.state {
            State::Unknown | State::Committed(_) => {
                return Err(io::ErrorKind::InvalidInput.into());
            }
            State::Dirty if self.tail != 0 => return Err(io::ErrorKind::InvalidInput.into()),
            State::Dirty => self.reset()?,
            State::Ready => {}
        }
        // From the first write on, the log may hold records of this transaction.
        self.state = State::Dirty;
        let seq = self.next_seq;
        self.next_seq += 1;
        let off = self.tail;
        Ok(Txn {
            j: self,
            seq,
            pages: 0,
            chain: chain_seed(seq),
            fill: 0,
            start: off,
            off,
        })
    }

    /// After a commit: writes the committed pages to `data` (reading them back from
    /// the log, so no copy of the pages is kept in memory), calling `on_page` before
    /// each write — the same routine as recovery — and leaves the transaction in
    /// the log, unflushed (see "Deferred flush"): the next transaction goes after
    /// it. If another as large would not fit in the `reserve`d log, flushes: syncs
    /// `data`, then empties the log in place (not synced: step 5 of the protocol).
    /// With nothing committed: flushes and durably empties the log of an abandoned
    /// or failed transaction (no page replayed), or does nothing. On a log that was
    /// not empty at `new`: `recover`.
    pub fn checkpoint(
        &mut self,
        data: &dyn Store,
        on_page: &mut dyn FnMut(u64, &[u8]),
    ) -> io::Result<Recovery> {
        let c = match self.state {
            State::Ready => return Ok(Recovery::default()),
            // Not replayed even if a commit record reached the log: its `commit`
            // failed, so the transaction is not committed as far as the caller knows.
            State::Dirty => {
                let len = self.log.len()?;
                self.flush(data)?;
                self.reset()?;
                return Ok(Recovery {
                    discarded_bytes: len,
                    ..Recovery::default()
                });
            }
            State::Unknown => return self.recover(data, on_page),
            State::Committed(c) => c,
        };
        let found = {
            let _na = lockdep::no_alloc("journal scan");
            lockdep::might_block("journal log read");
            scan_txn(&self.log, &mut self.shadow, c.start, Some(c.seq))?
        };
        if found != Some(c) {
            // What `commit` synced is not there: not ours to paper over.
            return Err(io::ErrorKind::InvalidData.into());
        }
        self.apply(data, c, on_page)?;
        self.state = State::Ready;
        self.tail = c.end;
        self.last_bytes = c.end - c.start;
        if self.tail + self.last_bytes > self.reserved {
            self.flush(data)?;
        }
        Ok(Recovery {
            replayed_pages: c.pages,
            discarded_bytes: 0,
            seq: c.seq,
        })
    }

    /// If unflushed transactions are in the log (their pages written to `data`):
    /// syncs `data`, then empties the log in place, not synced (step 5).
    fn flush(&mut self, data: &dyn Store) -> io::Result<()> {
        if self.tail == 0 {
            return Ok(());
        }
        #[cfg(test)]
        if self.plant_empty_before_data_sync {
            self.invalidate()?;
        }
        {
            let _na = lockdep::no_alloc("journal data sync");
            lockdep::might_block("journal data sync");
            #[cfg(test)]
            let synced = if FAIL_FLUSH_SYNC.with(|f| f.replace(false)) {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                data.sync()
            };
            #[cfg(not(test))]
            let synced = data.sync();
            if let Err(e) = synced {
                // The kernel may have dropped the pages that failed: a later sync
                // succeeding proves nothing. The run is written again from the
                // log (`checkpoint` recovers) before the log may be emptied.
                self.state = State::Unknown;
                return Err(e);
            }
        }
        let _na = lockdep::no_alloc("journal reset");
        self.invalidate()?;
        self.tail = 0;
        self.unsynced_reset = true;
        Ok(())
    }

    /// Empties the log durably, in place (its first header zeroed). Only with
    /// nothing unflushed in it.
    fn reset(&mut self) -> io::Result<()> {
        debug_assert_eq!(self.tail, 0);
        let _na = lockdep::no_alloc("journal reset");
        self.invalidate()?;
        lockdep::might_block("journal log sync");
        self.log.sync()?;
        self.state = State::Ready;
        self.unsynced_reset = false;
        Ok(())
    }

    /// Empties the log in place, not synced: zeroes the first record's header, so
    /// no transaction starts at offset 0 (see "Emptying in place").
    fn invalidate(&mut self) -> io::Result<()> {
        lockdep::might_block("journal log write");
        self.log.write_all_at(&[0u8; HDR], 0)
    }

    /// Makes the log at least `bytes` long with written zeros (keeping what is
    /// there below its current length), syncs it, and lets checkpointed
    /// transactions accumulate in it, unflushed, while another as large as the last
    /// still fits in `bytes` (see "Deferred flush"). Later transactions that fit
    /// overwrite allocated, written blocks in place, so their log sync is a flush of
    /// data alone, without a file-system metadata commit (see "Emptying in place").
    /// Only on an empty log (`InvalidInput` otherwise: `recover` first). After an
    /// error (ENOSPC, say) the log is cut back to its length before, and the
    /// journal works as without `reserve`. Uses the shadow buffer; allocates
    /// nothing.
    pub fn reserve(&mut self, bytes: u64) -> io::Result<()> {
        if self.state != State::Ready || self.tail != 0 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let _na = lockdep::no_alloc("journal reserve");
        lockdep::might_block("journal log write");
        let was = self.log.len()?;
        if was < bytes {
            self.shadow.fill(0);
            let mut len = was;
            let mut zero_fill = || {
                while len < bytes {
                    let n = (bytes - len).min(self.shadow.len() as u64) as usize;
                    self.log.write_all_at(&self.shadow[..n], len)?;
                    len += n as u64;
                }
                self.log.sync()
            };
            if let Err(e) = zero_fill() {
                // ENOSPC, say: give the space back; the journal works without.
                let _ = self.log.set_len(was);
                return Err(e);
            }
            self.unsynced_reset = false;
        }
        self.reserved = bytes;
        Ok(())
    }

    /// Flushes what `checkpoint` left unflushed — syncs `data`, then empties the
    /// log — and makes the emptied log durable (see "Deferred flush" and step 5);
    /// after a failed flush, recovers instead (see "Errors").
    /// Call it before making other writes to the data store durable; nothing to do
    /// otherwise. A committed transaction whose checkpoint failed (a data write's
    /// error: its pages may be in the store only in part) is checkpointed first
    /// (`on_page` before each of its pages), since emptying the log would lose its
    /// only whole copy. An open or failed transaction is left as it is.
    pub fn settle(
        &mut self,
        data: &dyn Store,
        on_page: &mut dyn FnMut(u64, &[u8]),
    ) -> io::Result<()> {
        if let State::Committed(_) = self.state {
            self.checkpoint(data, on_page)?;
        }
        if self.state == State::Unknown {
            // A failed flush (or a log not recovered yet): write it all again.
            return self.recover(data, &mut |_, _| {}).map(|_| ());
        }
        self.flush(data)?;
        if self.unsynced_reset {
            let _na = lockdep::no_alloc("journal settle");
            lockdep::might_block("journal log sync");
            self.log.sync()?;
            self.unsynced_reset = false;
        }
        Ok(())
    }

    /// Reads the page records of `found` back from the log, chunk by chunk through
    /// the shadow buffer, and writes each page to `data`.
    fn apply(
        &mut self,
        data: &dyn Store,
        found: Found,
        on_page: &mut dyn FnMut(u64, &[u8]),
    ) -> io::Result<()> {
        let per_chunk = self.shadow.len() / REC;
        let mut done = 0u64;
        while done < found.pages {
            let n = (found.pages - done).min(per_chunk as u64) as usize;
            let chunk = &mut self.shadow[..n * REC];
            let got = {
                let _na = lockdep::no_alloc("journal checkpoint read");
                lockdep::might_block("journal log read");
                read_full(&self.log, chunk, found.start + done * REC as u64)?
            };
            if got != chunk.len() {
                return Err(io::ErrorKind::InvalidData.into());
            }
            for (i, rec) in chunk.chunks_exact(REC).enumerate() {
                // The scan checked these bytes; check that they are still them.
                let h = Hdr::parse(rec);
                if h.magic != MAGIC_PAGE
                    || h.seq != found.seq
                    || h.a != done + i as u64
                    || h.b > MAX_INDEX
                    || h.crc != record_crc(rec)
                {
                    return Err(io::ErrorKind::InvalidData.into());
                }
                let page = &rec[HDR..];
                on_page(h.b, page);
                let _na = lockdep::no_alloc("journal checkpoint write");
                lockdep::might_block("journal data write");
                data.write_all_at(page, h.b * PAGE_SIZE as u64)?;
            }
            done += n as u64;
        }
        Ok(())
    }
}

/// Reads the log from `start` through `buf` and returns the committed transaction
/// that begins there, if one does (the rules in the module header); `expect`: the
/// seq it must have (the one after its predecessor in the run).
fn scan_txn<S: Store>(
    log: &S,
    buf: &mut [u8],
    start: u64,
    expect: Option<u64>,
) -> io::Result<Option<Found>> {
    debug_assert!(buf.len() >= REC + HDR);
    let mut off = start;
    let mut seq = 0u64;
    let mut pages = 0u64;
    let mut chain = 0u32;
    loop {
        let got = read_full(log, buf, off)?;
        // A short read is the end of the log; a full buffer may cut a record, which
        // is read again at the start of the next fill (the buffer holds at least one).
        let full = got == buf.len();
        let mut p = 0usize;
        loop {
            if got - p < HDR {
                if full {
                    break;
                }
                return Ok(None);
            }
            let h = Hdr::parse(&buf[p..p + HDR]);
            if h.version != VERSION {
                return Ok(None);
            }
            if pages == 0 {
                // Record 0 names the transaction.
                seq = h.seq;
                if expect.is_some_and(|e| e != seq) {
                    return Ok(None);
                }
                chain = chain_seed(seq);
            }
            if h.magic == MAGIC_PAGE {
                if got - p < REC {
                    if full {
                        break;
                    }
                    return Ok(None);
                }
                let rec = &buf[p..p + REC];
                if h.seq != seq
                    || h.a != pages
                    || h.b > MAX_INDEX
                    || h.chain != 0
                    || h.crc != record_crc(rec)
                {
                    return Ok(None);
                }
                chain = chain_next(chain, h.crc);
                pages += 1;
                p += REC;
            } else if h.magic == MAGIC_COMMIT {
                let ok = h.seq == seq
                    && h.a == pages
                    && h.b == 0
                    && h.chain == chain
                    && h.crc == record_crc(&buf[p..p + COMMIT]);
                return Ok(ok.then_some(Found {
                    seq,
                    pages,
                    start,
                    end: off + (p + COMMIT) as u64,
                }));
            } else {
                return Ok(None);
            }
        }
        debug_assert!(p > 0);
        off += p as u64;
    }
}

impl<S: Store> Txn<'_, S> {
    /// This transaction's sequence number (what `Recovery::seq` reports for it).
    #[cfg(test)]
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Appends one page image: `index` is the page number in the data file, `page`
    /// is 4096 bytes (`InvalidInput` if not, or if `index * 4096` overflows). Goes
    /// into the shadow buffer; the buffer is written to the log when it fills. Never
    /// allocates. After an error the transaction is as before the call.
    pub fn add(&mut self, index: u64, page: &[u8]) -> io::Result<()> {
        if page.len() != PAGE_SIZE || index > MAX_INDEX {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let _na = lockdep::no_alloc("journal add");
        // Keep room for the commit record after the last page record.
        if self.fill + REC > self.j.shadow.len() - COMMIT {
            self.flush()?;
        }
        let rec = &mut self.j.shadow[self.fill..self.fill + REC];
        put_header(rec, MAGIC_PAGE, self.seq, self.pages, index, 0);
        rec[HDR..].copy_from_slice(page);
        let crc = seal(rec);
        self.chain = chain_next(self.chain, crc);
        self.fill += REC;
        self.pages += 1;
        Ok(())
    }

    /// Writes the staged bytes to the log.
    fn flush(&mut self) -> io::Result<()> {
        if self.fill > 0 {
            lockdep::might_block("journal log write");
            self.j
                .log
                .write_all_at(&self.j.shadow[..self.fill], self.off)?;
            self.off += self.fill as u64;
            self.fill = 0;
        }
        Ok(())
    }

    /// Writes what is buffered and the commit record, and syncs the log: the
    /// durability point. After `Ok`, a crash at any later moment recovers to this
    /// transaction's pages. After an error the transaction is not committed (unless
    /// the log sync failed after the device had stored everything: then a crash
    /// before the next `begin` or `checkpoint` may recover it whole) and the data
    /// store is untouched. A transaction without pages commits without I/O.
    pub fn commit(mut self) -> io::Result<()> {
        let _na = lockdep::no_alloc("journal commit");
        if self.pages == 0 {
            // Nothing was written since `begin`.
            self.j.state = State::Ready;
            return Ok(());
        }
        let at = self.fill;
        let rec = &mut self.j.shadow[at..at + COMMIT];
        put_header(rec, MAGIC_COMMIT, self.seq, self.pages, 0, self.chain);
        seal(rec);
        self.fill += COMMIT;
        self.flush()?;
        #[cfg(test)]
        let skip_sync = self.j.plant_skip_commit_sync;
        #[cfg(not(test))]
        let skip_sync = false;
        if !skip_sync {
            lockdep::might_block("journal log sync");
            self.j.log.sync()?;
        }
        self.j.state = State::Committed(Found {
            seq: self.seq,
            pages: self.pages,
            start: self.start,
            end: self.off,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;

    const SECTOR: usize = 512;

    /// xorshift64*: deterministic, and enough to pick crash subsets.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            // Nearby seeds give correlated first outputs: skip them.
            for _ in 0..4 {
                r.next();
            }
            r
        }
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn coin(&mut self) -> bool {
            self.next() & (1 << 40) != 0
        }
    }

    fn put(v: &mut Vec<u8>, off: u64, b: &[u8]) {
        let (off, end) = (off as usize, off as usize + b.len());
        if v.len() < end {
            v.resize(end, 0);
        }
        v[off..end].copy_from_slice(b);
    }

    #[derive(Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        SetLen(u64),
    }

    #[derive(Default)]
    struct Mem {
        /// What survives a crash for certain.
        durable: Vec<u8>,
        /// What reads see: `durable` with `pending` applied.
        cur: Vec<u8>,
        /// Unsynced writes and truncations, in order.
        pending: Vec<Op>,
        writes: u64,
        syncs: u64,
    }

    /// A store that separates what was written from what is durable: `sync` makes
    /// everything durable; `crash` keeps a random subset of the unsynced operations
    /// (each write possibly torn at 512-byte boundaries) and drops the rest.
    #[derive(Default)]
    struct MemStore {
        m: Mutex<Mem>,
        /// Writes reaching past this many bytes fail with ENOSPC.
        enospc_past: Option<u64>,
    }

    impl MemStore {
        fn with_image(img: Vec<u8>) -> Self {
            let s = MemStore::default();
            s.restore(img);
            s
        }
        fn restore(&self, img: Vec<u8>) {
            let mut m = self.m.lock().unwrap();
            m.cur = img.clone();
            m.durable = img;
            m.pending.clear();
        }
        fn durable(&self) -> Vec<u8> {
            self.m.lock().unwrap().durable.clone()
        }
        fn current(&self) -> Vec<u8> {
            self.m.lock().unwrap().cur.clone()
        }
        fn counts(&self) -> (u64, u64) {
            let m = self.m.lock().unwrap();
            (m.writes, m.syncs)
        }
        fn crash(&self, rng: &mut Rng) {
            let mut m = self.m.lock().unwrap();
            let mut img = m.durable.clone();
            for op in std::mem::take(&mut m.pending) {
                if !rng.coin() {
                    continue;
                }
                match op {
                    Op::SetLen(l) => img.resize(l as usize, 0),
                    Op::Write(off, d) if rng.below(3) == 0 => {
                        // Torn: each 512-byte sector (absolute) on its own.
                        let end = off + d.len() as u64;
                        let mut s = off / SECTOR as u64 * SECTOR as u64;
                        while s < end {
                            let (a, b) = (s.max(off), (s + SECTOR as u64).min(end));
                            if rng.coin() {
                                put(&mut img, a, &d[(a - off) as usize..(b - off) as usize]);
                            }
                            s += SECTOR as u64;
                        }
                    }
                    Op::Write(off, d) => put(&mut img, off, &d),
                }
            }
            m.cur = img.clone();
            m.durable = img;
        }
    }

    impl Store for MemStore {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            let m = self.m.lock().unwrap();
            let off = off as usize;
            if off >= m.cur.len() {
                return Ok(0);
            }
            let n = buf.len().min(m.cur.len() - off);
            buf[..n].copy_from_slice(&m.cur[off..off + n]);
            Ok(n)
        }
        fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            if self.enospc_past.is_some_and(|l| off + buf.len() as u64 > l) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            if off + buf.len() as u64 > 1 << 30 {
                return Err(io::Error::from_raw_os_error(libc::EFBIG));
            }
            let mut m = self.m.lock().unwrap();
            put(&mut m.cur, off, buf);
            m.pending.push(Op::Write(off, buf.to_vec()));
            m.writes += 1;
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            let mut m = self.m.lock().unwrap();
            m.durable = m.cur.clone();
            m.pending.clear();
            m.syncs += 1;
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(self.m.lock().unwrap().cur.len() as u64)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            let mut m = self.m.lock().unwrap();
            m.cur.resize(len as usize, 0);
            m.pending.push(Op::SetLen(len));
            Ok(())
        }
    }

    /// The machine's clock of I/O operations, shared by the stores of one run:
    /// operation number `crash_at` fails (a write leaves a torn prefix behind) and so
    /// does every operation after it, as if the machine had stopped there.
    struct Clock {
        ops: AtomicU64,
        crash_at: u64,
        crashed: AtomicBool,
        /// What the crashing operation was.
        failed: Mutex<Option<&'static str>>,
        rng: Mutex<Rng>,
    }

    impl Clock {
        fn new(crash_at: u64, seed: u64) -> Arc<Self> {
            Arc::new(Clock {
                ops: AtomicU64::new(0),
                crash_at,
                crashed: AtomicBool::new(false),
                failed: Mutex::new(None),
                rng: Mutex::new(Rng::new(seed)),
            })
        }
        fn never() -> Arc<Self> {
            Self::new(u64::MAX, 0)
        }
        fn fired(&self) -> bool {
            self.crashed.load(Ordering::SeqCst)
        }
    }

    struct Crashy {
        mem: Arc<MemStore>,
        clock: Arc<Clock>,
    }

    fn crashy(mem: &Arc<MemStore>, clock: &Arc<Clock>) -> Crashy {
        Crashy {
            mem: mem.clone(),
            clock: clock.clone(),
        }
    }

    impl Crashy {
        fn tick(&self, what: &'static str, write: Option<(&[u8], u64)>) -> io::Result<()> {
            let c = &self.clock;
            if c.fired() {
                return Err(io::Error::other("machine stopped"));
            }
            if c.ops.fetch_add(1, Ordering::SeqCst) != c.crash_at {
                return Ok(());
            }
            c.crashed.store(true, Ordering::SeqCst);
            *c.failed.lock().unwrap() = Some(what);
            if let Some((buf, off)) = write {
                // A failed write did not complete: some whole sectors, never all.
                let sectors = buf.len().div_ceil(SECTOR) as u64;
                let k = c.rng.lock().unwrap().below(sectors) as usize * SECTOR;
                if k > 0 {
                    self.mem.write_all_at(&buf[..k], off)?;
                }
            }
            Err(io::Error::other("crash"))
        }
    }

    impl Store for Crashy {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            self.tick("read", None)?;
            self.mem.read_at(buf, off)
        }
        fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            self.tick("write", Some((buf, off)))?;
            self.mem.write_all_at(buf, off)
        }
        fn sync(&self) -> io::Result<()> {
            self.tick("sync", None)?;
            self.mem.sync()
        }
        fn len(&self) -> io::Result<u64> {
            self.tick("len", None)?;
            self.mem.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.tick("set_len", None)?;
            self.mem.set_len(len)
        }
    }

    // ---- versions of a data file and the checker ----

    /// Pages of the data file in the crash tests.
    const NP: u64 = 8;
    /// Transactions (versions 1..=V) per scenario.
    const V: u64 = 3;
    /// The stamp of an image that a later one of the same transaction replaces.
    const JUNK: u64 = 0xdead;

    /// Page `page` as written by version `version`: a stamp and a pattern, so a
    /// page of another version, another page or a torn page never matches.
    fn image(version: u64, page: u64) -> Vec<u8> {
        let mut b = vec![(version * 16 + page) as u8 ^ 0x5a; PAGE_SIZE];
        b[0..8].copy_from_slice(&version.to_le_bytes());
        b[8..16].copy_from_slice(&page.to_le_bytes());
        b[PAGE_SIZE - 8..].copy_from_slice(&(version ^ page << 32).to_le_bytes());
        b
    }

    struct Scenario {
        /// Per version: the (page, stamp) pairs its transaction adds, in order.
        txns: Vec<Vec<(u64, u64)>>,
        /// Per version: a transaction abandoned (after a flush) before it begins.
        abandon: Vec<bool>,
        /// expected[v][p]: the version page p carries at version v.
        expected: Vec<Vec<u64>>,
        /// The log is `reserve`d to this many bytes (zero-filled) before the first
        /// transaction (0: not): none, some or all of the transactions accumulate
        /// in it unflushed.
        reserve: u64,
    }

    impl Scenario {
        fn new(seed: u64) -> Self {
            let mut rng = Rng::new(seed);
            let mut txns = Vec::new();
            let mut abandon = Vec::new();
            let mut expected = vec![vec![0; NP as usize]];
            for v in 1..=V {
                let mut pages: Vec<u64> = (0..NP).filter(|_| rng.coin()).collect();
                if pages.is_empty() {
                    pages.push(rng.below(NP));
                }
                for i in (1..pages.len()).rev() {
                    pages.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let mut t = Vec::new();
                for &p in &pages {
                    if rng.below(4) == 0 {
                        // An image the same transaction replaces: the later must win.
                        t.insert(rng.below(t.len() as u64 + 1) as usize, (p, JUNK));
                    }
                    t.push((p, v));
                }
                let mut e = expected.last().unwrap().clone();
                for &p in &pages {
                    e[p as usize] = v;
                }
                txns.push(t);
                abandon.push(rng.below(3) == 0);
                expected.push(e);
            }
            Scenario {
                txns,
                abandon,
                expected,
                reserve: [0, 6, 40][rng.below(3) as usize] * REC as u64,
            }
        }

        fn base() -> Vec<u8> {
            (0..NP).flat_map(|p| image(0, p)).collect()
        }

        /// Ok if `data` is exactly one of the versions in `allowed`.
        fn check(&self, data: &[u8], allowed: &[u64]) -> Result<u64, String> {
            let mut got = Vec::new();
            for p in 0..NP {
                let at = (p as usize) * PAGE_SIZE;
                let Some(page) = data.get(at..at + PAGE_SIZE) else {
                    return Err(format!("data is {} bytes: page {p} missing", data.len()));
                };
                match (0..=V).find(|&v| page == image(v, p)) {
                    Some(v) => got.push(v),
                    None => return Err(format!("page {p} is torn or a replaced image")),
                }
            }
            allowed
                .iter()
                .copied()
                .find(|&v| got == self.expected[v as usize])
                .ok_or_else(|| format!("data pages {got:?} are none of versions {allowed:?}"))
        }
    }

    /// How far a run got before its crash.
    struct Outcome {
        /// The last version whose `commit` returned Ok.
        committed: u64,
        /// The next version's commit failed at its log sync, after its commit record
        /// was written: it may have reached the disk anyway.
        in_doubt: bool,
    }

    /// Runs the scenario's transactions, each committed then checkpointed, until an
    /// operation fails.
    fn run(sc: &Scenario, log: Crashy, data: &Crashy, plant: Plant) -> Outcome {
        let clock = log.clock.clone();
        let mut out = Outcome {
            committed: 0,
            in_doubt: false,
        };
        let Ok(mut j) = Journal::with_capacity(log, 3) else {
            return out;
        };
        j.plant_skip_commit_sync = plant == Plant::SkipCommitSync;
        j.plant_empty_before_data_sync = plant == Plant::EmptyBeforeDataSync;
        if sc.reserve > 0 && j.reserve(sc.reserve).is_err() {
            return out;
        }
        for v in 1..=V {
            if sc.abandon[v as usize - 1] {
                // Its records reach the log (more than a buffer's worth); the next
                // begin must empty the log of them.
                {
                    let Ok(mut t) = j.begin() else { return out };
                    for p in 0..4 {
                        if t.add(p, &image(JUNK, p)).is_err() {
                            return out;
                        }
                    }
                }
                // With unflushed transactions in the log `begin` refuses: a
                // checkpoint flushes them and empties the log.
                if j.pending_bytes() > 0 && j.checkpoint(data, &mut |_, _| {}).is_err() {
                    return out;
                }
            }
            let Ok(mut t) = j.begin() else { return out };
            for &(p, s) in &sc.txns[v as usize - 1] {
                if t.add(p, &image(s, p)).is_err() {
                    return out;
                }
            }
            if t.commit().is_err() {
                out.in_doubt = *clock.failed.lock().unwrap() == Some("sync");
                return out;
            }
            out.committed = v;
            let mut seen = 0u64;
            match j.checkpoint(data, &mut |_, _| seen += 1) {
                Ok(r) => {
                    assert_eq!(r.replayed_pages, sc.txns[v as usize - 1].len() as u64);
                    assert_eq!(r.replayed_pages, seen);
                }
                Err(_) => return out,
            }
        }
        // Flush what is left unflushed, as `Inode::sync` does before its data sync.
        let _ = j.settle(data, &mut |_, _| {});
        out
    }

    /// One recovery on the two stores with a clock; Err if the clock fired.
    fn recover_on(
        log: &Arc<MemStore>,
        data: &Arc<MemStore>,
        clock: &Arc<Clock>,
    ) -> Result<Recovery, ()> {
        let mut j = Journal::with_capacity(crashy(log, clock), 3).map_err(|_| ())?;
        let mut seen = 0u64;
        let r = j
            .recover(&crashy(data, clock), &mut |i, b| {
                assert!(i < NP && b.len() == PAGE_SIZE);
                seen += 1;
            })
            .map_err(|_| ())?;
        assert!(!clock.fired());
        assert_eq!(r.replayed_pages, seen);
        assert_eq!(r.seq == 0, r.replayed_pages == 0);
        Ok(r)
    }

    /// Crashes every scenario at every I/O operation, crash-simulates both stores,
    /// and recovers — crashing the recovery at each of its operations too, then
    /// recovering again. Returns what was checked and the violations found.
    fn exhaustive(seeds: std::ops::Range<u64>, plant: Plant) -> (Coverage, Vec<String>) {
        let mut cov = Coverage::default();
        let mut bad = Vec::new();
        for seed in seeds {
            let sc = Scenario::new(seed);
            let total = {
                let clock = Clock::never();
                let log = Arc::new(MemStore::default());
                let data = Arc::new(MemStore::with_image(Scenario::base()));
                let out = run(&sc, crashy(&log, &clock), &crashy(&data, &clock), plant);
                assert_eq!(out.committed, V);
                assert_eq!(sc.check(&data.current(), &[V]), Ok(V));
                clock.ops.load(Ordering::SeqCst)
            };
            for k in 0..=total {
                let mut rng = Rng::new(seed << 20 ^ k);
                let clock = Clock::new(k, rng.next());
                let log = Arc::new(MemStore::default());
                let data = Arc::new(MemStore::with_image(Scenario::base()));
                let out = run(&sc, crashy(&log, &clock), &crashy(&data, &clock), plant);
                assert_eq!(clock.fired(), k < total);
                log.crash(&mut rng);
                data.crash(&mut rng);
                let allowed: &[u64] = if out.in_doubt {
                    &[out.committed, out.committed + 1]
                } else {
                    &[out.committed]
                };
                let (log0, data0) = (log.durable(), data.durable());
                for r in 0.. {
                    assert!(r < 10_000, "recovery never finishes");
                    log.restore(log0.clone());
                    data.restore(data0.clone());
                    let rclock = Clock::new(r, rng.next());
                    let first = recover_on(&log, &data, &rclock);
                    let rec = match first {
                        Ok(rec) => rec,
                        Err(()) => {
                            // Crashed in recovery: crash-simulate again, then recover.
                            log.crash(&mut rng);
                            data.crash(&mut rng);
                            recover_on(&log, &data, &Clock::never()).expect("recovery")
                        }
                    };
                    cov.checked += 1;
                    cov.replayed += u64::from(rec.replayed_pages > 0);
                    let what = format!(
                        "seed {seed}, crash at op {k} (committed {}, in doubt {}), recovery crash at op {r}",
                        out.committed, out.in_doubt
                    );
                    match sc.check(&data.durable(), allowed) {
                        Ok(v) => cov.in_doubt_landed += u64::from(v > out.committed),
                        Err(e) => bad.push(format!("{what}: {e}")),
                    }
                    if !log.durable().is_empty() {
                        bad.push(format!("{what}: log not emptied"));
                    }
                    if first.is_ok() {
                        break;
                    }
                }
            }
        }
        (cov, bad)
    }

    /// A bug planted in the journal for the checker to catch.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Plant {
        None,
        SkipCommitSync,
        EmptyBeforeDataSync,
    }

    /// What an exhaustive run went through.
    #[derive(Debug, Default)]
    struct Coverage {
        /// (crash point, recovery crash point) pairs checked.
        checked: u64,
        /// Recoveries that replayed a committed transaction.
        replayed: u64,
        /// Recoveries to the version whose commit failed at its log sync.
        in_doubt_landed: u64,
    }

    #[test]
    fn every_crash_point_recovers_to_one_version() {
        let (cov, bad) = exhaustive(0..32, Plant::None);
        // The interesting cases happened: crashes mid-checkpoint repaired by a replay,
        // and commits that failed at the sync yet reached the disk.
        assert!(
            cov.checked > 1000 && cov.replayed > 100 && cov.in_doubt_landed > 0,
            "{cov:?}"
        );
        assert!(
            bad.is_empty(),
            "{} violations, first: {:#?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
    }

    /// The planted bug: `commit` skips the log sync. The checker must see a version
    /// that `commit` promised lost, or a mix of two.
    #[test]
    fn planted_skipped_commit_sync_is_caught() {
        let (_, bad) = exhaustive(0..4, Plant::SkipCommitSync);
        assert!(
            !bad.is_empty(),
            "the checker missed the skipped commit sync"
        );
    }

    /// The planted bug of the in-place emptying: `checkpoint` zeroes the log's
    /// first header before the data sync. A crash in between must be seen to lose
    /// the committed version (the log empty, the data a mix).
    #[test]
    fn planted_empty_before_data_sync_is_caught() {
        let (_, bad) = exhaustive(0..4, Plant::EmptyBeforeDataSync);
        assert!(
            !bad.is_empty(),
            "the checker missed the emptying before the data sync"
        );
    }

    // ---- single cases ----

    fn page_of(tag: u64, index: u64) -> Vec<u8> {
        image(tag, index)
    }

    fn data_page(data: &[u8], index: u64) -> &[u8] {
        &data[index as usize * PAGE_SIZE..(index as usize + 1) * PAGE_SIZE]
    }

    /// 1000 pages through a 64-record shadow buffer: 16 log writes, one sync; the
    /// transaction survives a crash right after commit, and recovers whole.
    #[test]
    fn large_txn_spans_many_flushes() {
        let log = Arc::new(MemStore::default());
        let data = Arc::new(MemStore::default());
        let mut j = Journal::new(log.clone()).unwrap();
        let mut t = j.begin().unwrap();
        let seq = t.seq();
        for i in 0..1000u64 {
            t.add(i * 3, &page_of(7, i * 3)).unwrap();
        }
        // 15 full buffers so far, nothing synced.
        assert_eq!(log.counts(), (15, 0));
        t.commit().unwrap();
        assert_eq!(log.counts(), (16, 1));
        assert_eq!(log.len().unwrap(), 1000 * REC as u64 + COMMIT as u64);
        drop(j);
        log.crash(&mut Rng::new(1));
        data.crash(&mut Rng::new(2));

        let mut j = Journal::new(log.clone()).unwrap();
        assert_eq!(
            j.begin().unwrap_err().kind(),
            io::ErrorKind::InvalidInput,
            "begin before recover on a full log"
        );
        let mut order = Vec::new();
        let r = j.recover(&*data, &mut |i, _| order.push(i)).unwrap();
        assert_eq!(
            r,
            Recovery {
                replayed_pages: 1000,
                discarded_bytes: 0,
                seq
            }
        );
        assert_eq!(order, (0..1000).map(|i| i * 3).collect::<Vec<_>>());
        let d = data.durable();
        for i in 0..1000u64 {
            assert!(data_page(&d, i * 3) == page_of(7, i * 3), "page {}", i * 3);
        }
        assert!(log.durable().is_empty());
        // The next transaction gets a later seq than the one recovered.
        assert!(j.begin().unwrap().seq() > seq);
    }

    /// The same index twice in one transaction: the later image is what the file
    /// gets, by checkpoint and by recovery.
    #[test]
    fn duplicate_index_later_image_wins() {
        for crash in [false, true] {
            let log = Arc::new(MemStore::default());
            let data = Arc::new(MemStore::default());
            let mut j = Journal::with_capacity(log.clone(), 2).unwrap();
            let mut t = j.begin().unwrap();
            t.add(5, &page_of(1, 5)).unwrap();
            t.add(2, &page_of(1, 2)).unwrap();
            t.add(5, &page_of(2, 5)).unwrap();
            t.commit().unwrap();
            let mut seen = Vec::new();
            let r = if crash {
                drop(j);
                log.crash(&mut Rng::new(3));
                let mut j = Journal::new(log.clone()).unwrap();
                j.recover(&*data, &mut |i, p| seen.push((i, p[0]))).unwrap()
            } else {
                j.checkpoint(&*data, &mut |i, p| seen.push((i, p[0])))
                    .unwrap()
            };
            assert_eq!(r.replayed_pages, 3);
            assert_eq!(seen, [(5, 1), (2, 1), (5, 2)]);
            let d = data.durable();
            assert!(data_page(&d, 5) == page_of(2, 5));
            assert!(data_page(&d, 2) == page_of(1, 2));
        }
    }

    /// Random bytes, and bytes that look like a record but do not check, are
    /// discarded; the data store is not touched; the journal works afterwards.
    #[test]
    fn garbage_log_is_discarded() {
        let mut rng = Rng::new(9);
        let mut forged = vec![0u8; REC];
        put_header(&mut forged, MAGIC_PAGE, 42, 0, 1, 0);
        seal(&mut forged);
        forged[HDR + 100] ^= 1; // the page no longer matches its crc
        let mut commit_only = vec![0u8; COMMIT];
        put_header(&mut commit_only, MAGIC_COMMIT, 42, 1, 0, chain_seed(42));
        seal(&mut commit_only);
        let random: Vec<u8> = (0..20_000).map(|_| rng.next() as u8).collect();
        // A valid page record whose commit claims a page more than precede it.
        let mut short = vec![0u8; REC];
        put_header(&mut short, MAGIC_PAGE, 42, 0, 1, 0);
        let crc = seal(&mut short);
        let mut c = vec![0u8; COMMIT];
        put_header(
            &mut c,
            MAGIC_COMMIT,
            42,
            2,
            0,
            chain_next(chain_seed(42), crc),
        );
        seal(&mut c);
        short.extend_from_slice(&c);
        for junk in [random, [forged.clone(), commit_only].concat(), short] {
            let log = Arc::new(MemStore::with_image(junk.clone()));
            let data = Arc::new(MemStore::with_image(Scenario::base()));
            let mut j = Journal::new(log.clone()).unwrap();
            let r = j
                .recover(&*data, &mut |_, _| panic!("replayed garbage"))
                .unwrap();
            assert_eq!(
                r,
                Recovery {
                    discarded_bytes: junk.len() as u64,
                    ..Recovery::default()
                }
            );
            assert_eq!(data.counts(), (0, 0));
            assert!(log.durable().is_empty());
            let mut t = j.begin().unwrap();
            t.add(0, &page_of(1, 0)).unwrap();
            t.commit().unwrap();
            assert_eq!(
                j.checkpoint(&*data, &mut |_, _| {}).unwrap().replayed_pages,
                1
            );
            assert!(data_page(&data.durable(), 0) == page_of(1, 0));
        }
    }

    /// A committed log is replayed; the same log with an older transaction's records
    /// showing through a newer uncommitted one, a flipped bit anywhere, or its last
    /// byte cut is not.
    #[test]
    fn stale_and_damaged_records_never_commit() {
        // Transaction A, committed, three pages.
        let a_log = Arc::new(MemStore::default());
        let mut ja = Journal::new(a_log.clone()).unwrap();
        let mut t = ja.begin().unwrap();
        for i in 0..3 {
            t.add(i, &page_of(1, i)).unwrap();
        }
        t.commit().unwrap();
        let a = a_log.durable();
        // Transaction B, abandoned after its first record reached the log.
        let b_log = Arc::new(MemStore::default());
        let mut jb = Journal::with_capacity(b_log.clone(), 1).unwrap();
        {
            let mut t = jb.begin().unwrap();
            t.add(0, &page_of(2, 0)).unwrap();
            t.add(1, &page_of(2, 1)).unwrap();
        }
        let b = b_log.current();
        assert_eq!(b.len(), REC);
        let mut b_over_a = a.clone();
        b_over_a[..REC].copy_from_slice(&b);

        let replays = |img: &[u8]| {
            let log = Arc::new(MemStore::with_image(img.to_vec()));
            let data = Arc::new(MemStore::default());
            let mut j = Journal::new(log).unwrap();
            j.recover(&*data, &mut |_, _| {}).unwrap().replayed_pages
        };
        assert_eq!(replays(&a), 3);
        assert_eq!(replays(&b_over_a), 0, "A's records behind B's");
        assert_eq!(replays(&a[..a.len() - 1]), 0, "cut commit record");
        assert_eq!(replays(&a[..2 * REC]), 0, "no commit record");
        let mut rng = Rng::new(4);
        for _ in 0..200 {
            let mut img = a.clone();
            let bit = rng.below(img.len() as u64 * 8);
            img[(bit / 8) as usize] ^= 1 << (bit % 8);
            assert_eq!(replays(&img), 0, "bit {bit} flipped");
        }
        // Records of A moved one record later (a stale copy at another offset).
        let shifted = [vec![0u8; REC], a.clone()].concat();
        assert_eq!(replays(&shifted), 0);
    }

    /// An empty log: nothing replayed, no I/O on either store, begin allowed.
    #[test]
    fn empty_log_recovers_to_nothing() {
        let log = Arc::new(MemStore::default());
        let data = Arc::new(MemStore::with_image(Scenario::base()));
        let mut j = Journal::new(log.clone()).unwrap();
        let r = j
            .recover(&*data, &mut |_, _| panic!("nothing to replay"))
            .unwrap();
        assert_eq!(r, Recovery::default());
        assert_eq!((log.counts(), data.counts()), ((0, 0), (0, 0)));
        // A transaction without pages commits without I/O and checkpoints to nothing.
        j.begin().unwrap().commit().unwrap();
        assert_eq!(
            j.checkpoint(&*data, &mut |_, _| {}).unwrap(),
            Recovery::default()
        );
        assert_eq!((log.counts(), data.counts()), ((0, 0), (0, 0)));
    }

    /// ENOSPC on the log, at a flush inside `add` and at `commit`: the transaction
    /// is not committed, the data store is untouched, the next begin starts from an
    /// empty log and commits.
    #[test]
    fn enospc_on_the_log_leaves_data_untouched() {
        for capacity in [64, 4] {
            let log = Arc::new(MemStore {
                enospc_past: Some(10 * REC as u64),
                ..MemStore::default()
            });
            let data = Arc::new(MemStore::with_image(Scenario::base()));
            let mut j = Journal::with_capacity(log.clone(), capacity).unwrap();
            let mut t = j.begin().unwrap();
            let mut err = None;
            for i in 0..20 {
                if let Err(e) = t.add(i % NP, &page_of(1, i % NP)) {
                    err = Some(e);
                    break;
                }
            }
            let err = match err {
                Some(e) => e,
                None => t.commit().unwrap_err(),
            };
            assert_eq!(
                err.raw_os_error(),
                Some(libc::ENOSPC),
                "capacity {capacity}"
            );
            assert_eq!(data.counts(), (0, 0));
            // A checkpoint now replays nothing (and empties the log).
            let r = j
                .checkpoint(&*data, &mut |_, _| panic!("not committed"))
                .unwrap();
            assert_eq!(r.replayed_pages, 0);
            assert_eq!(data.counts(), (0, 0));
            assert!(emptied(&log.durable()));
            // A transaction that fits.
            let mut t = j.begin().unwrap();
            for i in 0..3 {
                t.add(i, &page_of(1, i)).unwrap();
            }
            t.commit().unwrap();
            assert_eq!(
                j.checkpoint(&*data, &mut |_, _| {}).unwrap().replayed_pages,
                3
            );
            let d = data.durable();
            assert!((0..3).all(|i| data_page(&d, i) == page_of(1, i)));
            assert!((3..NP).all(|i| data_page(&d, i) == image(0, i)));
        }
    }

    /// ENOSPC with the transaction already spread over the log: the next `begin`
    /// (not a checkpoint) empties it.
    #[test]
    fn begin_after_a_failed_commit_starts_clean() {
        let log = Arc::new(MemStore {
            enospc_past: Some(5 * REC as u64),
            ..MemStore::default()
        });
        let mut j = Journal::with_capacity(log.clone(), 2).unwrap();
        let mut t = j.begin().unwrap();
        let failed = (0..8).any(|i| t.add(i, &page_of(1, i)).is_err());
        assert!(failed || t.commit().is_err());
        assert!(log.len().unwrap() > 0);
        assert!(!emptied(&log.current()));
        let _t = j.begin().unwrap();
        assert!(log.len().unwrap() > 0, "emptied in place");
        assert!(emptied(&log.durable()));
    }

    /// A log whose first header is zeros: what the in-place emptying leaves.
    fn emptied(img: &[u8]) -> bool {
        img.len() >= HDR && img[..HDR].iter().all(|&b| b == 0)
    }

    /// The in-place log: `reserve` makes it its working size of zeros once; a
    /// checkpoint empties it by its first header alone (no `set_len`, length
    /// kept); a shorter transaction is written over a longer one and recovers as
    /// itself; stale records behind an emptied header are not replayed and not
    /// "discarded"; only recovery truncates.
    #[test]
    fn emptying_in_place_keeps_the_log() {
        let log = Arc::new(MemStore::default());
        let data = Arc::new(MemStore::with_image(Scenario::base()));
        let mut j = Journal::with_capacity(log.clone(), 2).unwrap();
        let size = 8 * REC as u64;
        j.reserve(size).unwrap();
        assert_eq!(log.durable(), vec![0u8; size as usize]);
        assert_eq!(log.counts().1, 1);
        // Smaller than the log already: nothing to do.
        j.reserve(REC as u64).unwrap();
        assert_eq!(log.counts().1, 1);
        let mut t = j.begin().unwrap();
        for i in 0..5 {
            t.add(i, &page_of(1, i)).unwrap();
        }
        t.commit().unwrap();
        j.checkpoint(&*data, &mut |_, _| {}).unwrap();
        assert_eq!(log.len().unwrap(), size, "length kept");
        assert!(emptied(&log.current()));
        assert!(
            !log.m
                .lock()
                .unwrap()
                .pending
                .iter()
                .any(|o| matches!(o, Op::SetLen(_))),
            "no truncation on the common path"
        );
        // A transaction of 2 pages over the stale one of 5, crashed after commit.
        let mut t = j.begin().unwrap();
        let seq = t.seq();
        t.add(6, &page_of(2, 6)).unwrap();
        t.add(7, &page_of(2, 7)).unwrap();
        t.commit().unwrap();
        drop(j);
        log.crash(&mut Rng::new(5));
        data.crash(&mut Rng::new(6));
        let mut j = Journal::new(log.clone()).unwrap();
        let mut seen = Vec::new();
        let r = j.recover(&*data, &mut |i, _| seen.push(i)).unwrap();
        assert_eq!(
            r,
            Recovery {
                replayed_pages: 2,
                discarded_bytes: 0,
                seq
            }
        );
        assert_eq!(seen, [6, 7]);
        let d = data.durable();
        assert!((0..5).all(|i| data_page(&d, i) == page_of(1, i)));
        assert!((6..8).all(|i| data_page(&d, i) == page_of(2, i)));
        assert!(log.durable().is_empty(), "recovery truncates");
        // An emptied log with stale records behind its header: nothing replayed,
        // nothing reported discarded, and truncated.
        let mut img = vec![0u8; HDR];
        img.extend_from_slice(&vec![0xAB; 3 * REC]);
        log.restore(img);
        let mut j = Journal::new(log.clone()).unwrap();
        let r = j.recover(&*data, &mut |_, _| panic!("stale")).unwrap();
        assert_eq!(r, Recovery::default());
        assert!(log.durable().is_empty());
        // `reserve` refuses a log that may hold a transaction.
        let mut j = Journal::new(Arc::new(MemStore::with_image(vec![1; 100]))).unwrap();
        assert_eq!(
            j.reserve(size).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn misuse_is_refused() {
        let log = Arc::new(MemStore::default());
        let data = Arc::new(MemStore::default());
        let mut j = Journal::new(log.clone()).unwrap();
        let mut t = j.begin().unwrap();
        assert_eq!(
            t.add(0, &[0; 100]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            t.add(u64::MAX / PAGE_SIZE as u64, &page_of(1, 0))
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidInput
        );
        t.add(MAX_INDEX, &page_of(1, 0)).unwrap();
        t.commit().unwrap();
        // A committed transaction must be checkpointed before the next begins.
        assert_eq!(j.begin().unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // A log changed under a committed transaction is not replayed.
        let saved = log.current();
        log.restore(vec![]);
        let err = j.checkpoint(&*data, &mut |_, _| {}).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        log.restore(saved);
        let mut last = None;
        j.checkpoint(&*data, &mut |i, _| last = Some(i))
            .unwrap_err(); // the data store cannot grow to 2^64 bytes
        assert_eq!(last, Some(MAX_INDEX));
    }

    /// The deferred flush: checkpointed transactions accumulate in a reserved log
    /// (their pages written to the data store, not synced: one sync per commit),
    /// are all replayed in order after a crash, and are flushed (data sync, log
    /// emptied) when another as large would not fit, or by `settle`.
    #[test]
    fn deferred_flush_accumulates_and_replays_in_order() {
        let log = Arc::new(MemStore::default());
        let data = Arc::new(MemStore::with_image(Scenario::base()));
        let mut j = Journal::with_capacity(log.clone(), 2).unwrap();
        j.reserve(9 * REC as u64).unwrap();
        let txn = |j: &mut Journal<Arc<MemStore>>, v: u64, pages: &[u64]| {
            let mut t = j.begin().unwrap();
            let seq = t.seq();
            for &p in pages {
                t.add(p, &image(v, p)).unwrap();
            }
            t.commit().unwrap();
            let r = j.checkpoint(&*data, &mut |_, _| {}).unwrap();
            assert_eq!((r.replayed_pages, r.seq), (pages.len() as u64, seq));
            seq
        };
        txn(&mut j, 1, &[0, 1]);
        txn(&mut j, 2, &[1, 2]);
        let last = txn(&mut j, 3, &[2, 3]);
        // Three transactions of 2 pages in a log of 9 records: none flushed yet.
        assert_eq!(j.pending_bytes(), 3 * (2 * REC + COMMIT) as u64);
        assert_eq!(
            data.counts(),
            (6, 0),
            "pages written, the data store not synced"
        );
        assert_eq!(log.counts().1, 4, "the reserve's sync and one per commit");
        // The data store's writes are lost in the crash; the log has them all.
        log.crash(&mut Rng::new(7));
        data.crash(&mut Rng::new(8));
        let mut j2 = Journal::new(log.clone()).unwrap();
        let mut order = Vec::new();
        let r = j2
            .recover(&*data, &mut |i, p| order.push((i, p[0])))
            .unwrap();
        assert_eq!((r.replayed_pages, r.seq, r.discarded_bytes), (6, last, 0));
        let stamp = |v: u64, p: u64| image(v, p)[0];
        assert_eq!(
            order,
            [(0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3)].map(|(p, v)| (p, stamp(v, p)))
        );
        assert_eq!(sc_versions(&data.durable()), [1, 2, 3, 3, 0, 0, 0, 0]);
        // Transactions of 3 pages: the second leaves no room for a third.
        let log = Arc::new(MemStore::default());
        let data = Arc::new(MemStore::with_image(Scenario::base()));
        let mut j = Journal::with_capacity(log.clone(), 2).unwrap();
        j.reserve(9 * REC as u64).unwrap();
        let mut t = j.begin().unwrap();
        for p in 0..3 {
            t.add(p, &image(1, p)).unwrap();
        }
        t.commit().unwrap();
        j.checkpoint(&*data, &mut |_, _| {}).unwrap();
        assert_eq!(j.pending_bytes(), (3 * REC + COMMIT) as u64);
        assert_eq!(data.counts().1, 0);
        let mut t = j.begin().unwrap();
        for p in 3..6 {
            t.add(p, &image(1, p)).unwrap();
        }
        t.commit().unwrap();
        j.checkpoint(&*data, &mut |_, _| {}).unwrap();
        // 2 × (3 records + commit) in, a third as large would not fit: flushed.
        assert_eq!(j.pending_bytes(), 0);
        assert_eq!(data.counts().1, 1);
        assert!(emptied(&log.current()) && !emptied(&log.durable()));
        // `settle` makes the emptied log durable; with nothing unflushed, no data sync.
        j.settle(&*data, &mut |_, _| {}).unwrap();
        assert!(emptied(&log.durable()));
        assert_eq!(data.counts().1, 1);
        // A transaction left unflushed, then `settle`: data synced, log emptied.
        let mut t = j.begin().unwrap();
        t.add(7, &image(2, 7)).unwrap();
        t.commit().unwrap();
        j.checkpoint(&*data, &mut |_, _| {}).unwrap();
        assert!(j.pending_bytes() > 0);
        j.settle(&*data, &mut |_, _| {}).unwrap();
        assert_eq!(j.pending_bytes(), 0);
        assert_eq!(data.counts().1, 2);
        assert!(emptied(&log.durable()));
        assert!(data_page(&data.durable(), 7) == image(2, 7));
        // A transaction abandoned behind an unflushed one: `begin` refuses until a
        // checkpoint flushes and empties the log.
        let mut t = j.begin().unwrap();
        t.add(0, &image(3, 0)).unwrap();
        t.commit().unwrap();
        j.checkpoint(&*data, &mut |_, _| {}).unwrap();
        {
            let mut t = j.begin().unwrap();
            t.add(1, &image(JUNK, 1)).unwrap();
        }
        assert_eq!(j.begin().unwrap_err().kind(), io::ErrorKind::InvalidInput);
        j.checkpoint(&*data, &mut |_, _| panic!("abandoned"))
            .unwrap();
        assert_eq!(j.pending_bytes(), 0);
        assert!(emptied(&log.durable()));
        assert!(data_page(&data.durable(), 0) == image(3, 0));
        j.begin().unwrap();
    }

    /// `reserve` on a log without room: the error, the log cut back to its
    /// length, and the journal working without a reserve (flushing every time).
    #[test]
    fn reserve_without_room_leaves_the_log_as_it_was() {
        let log = Arc::new(MemStore {
            enospc_past: Some(5 * REC as u64),
            ..MemStore::default()
        });
        let data = Arc::new(MemStore::with_image(Scenario::base()));
        let mut j = Journal::with_capacity(log.clone(), 2).unwrap();
        let err = j.reserve(8 * REC as u64).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(log.len().unwrap(), 0);
        let mut t = j.begin().unwrap();
        t.add(1, &image(1, 1)).unwrap();
        t.commit().unwrap();
        j.checkpoint(&*data, &mut |_, _| {}).unwrap();
        assert_eq!(j.pending_bytes(), 0, "flushed: nothing reserved");
        assert_eq!(data.counts().1, 1);
        assert!(data_page(&data.durable(), 1) == image(1, 1));
    }

    /// A flushed run's second transaction, left whole right where a new run's
    /// first one (of the same size) ends, does not continue the new run: its seq
    /// is not the next one. Replayed, it would put an older page over a newer.
    #[test]
    fn stale_transaction_of_a_flushed_run_does_not_continue_a_new_one() {
        let log = Arc::new(MemStore::default());
        let data = Arc::new(MemStore::with_image(Scenario::base()));
        let mut j = Journal::with_capacity(log.clone(), 2).unwrap();
        j.reserve(20 * REC as u64).unwrap();
        let txn = |j: &mut Journal<Arc<MemStore>>, v: u64, pages: &[u64]| {
            let mut t = j.begin().unwrap();
            for &p in pages {
                t.add(p, &image(v, p)).unwrap();
            }
            let seq = t.seq();
            t.commit().unwrap();
            j.checkpoint(&*data, &mut |_, _| {}).unwrap();
            seq
        };
        txn(&mut j, 1, &[1, 2]);
        txn(&mut j, 2, &[1]);
        j.settle(&*data, &mut |_, _| {}).unwrap();
        assert_eq!(sc_versions(&data.durable()), [0, 2, 1, 0, 0, 0, 0, 0]);
        // The new run's first transaction ends where the stale second one starts.
        let seq = txn(&mut j, 3, &[1, 2]);
        drop(j);
        let img = log.durable();
        let at = 2 * REC + COMMIT;
        assert_eq!(&img[at..at + 4], b"UMJP", "the stale transaction is there");
        let mut j = Journal::new(log.clone()).unwrap();
        let r = j.recover(&*data, &mut |_, _| {}).unwrap();
        assert_eq!((r.replayed_pages, r.seq), (2, seq));
        assert_eq!(sc_versions(&data.durable()), [0, 3, 3, 0, 0, 0, 0, 0]);
    }

    /// A data store whose next `sync` fails (EIO), as a disk error would.
    struct FailSync {
        mem: Arc<MemStore>,
        fail: AtomicBool,
    }

    impl Store for FailSync {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            self.mem.read_at(buf, off)
        }
        fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            self.mem.write_all_at(buf, off)
        }
        fn sync(&self) -> io::Result<()> {
            if self.fail.swap(false, Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.mem.sync()
        }
        fn len(&self) -> io::Result<u64> {
            self.mem.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.mem.set_len(len)
        }
    }

    /// A data store whose next page write fails (EIO).
    struct FailWrite {
        mem: Arc<MemStore>,
        fail: AtomicBool,
    }

    impl Store for FailWrite {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            self.mem.read_at(buf, off)
        }
        fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            if self.fail.swap(false, Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.mem.write_all_at(buf, off)
        }
        fn sync(&self) -> io::Result<()> {
            self.mem.sync()
        }
        fn len(&self) -> io::Result<u64> {
            self.mem.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.mem.set_len(len)
        }
    }

    /// A committed transaction whose checkpoint failed at a data write (its pages
    /// in the store in part, or not at all) is applied by `settle` before the log
    /// is emptied: the log is its only whole copy.
    #[test]
    fn settle_applies_a_commit_whose_checkpoint_failed() {
        let log = Arc::new(MemStore::default());
        let mem = Arc::new(MemStore::with_image(Scenario::base()));
        let data = FailWrite {
            mem: mem.clone(),
            fail: AtomicBool::new(false),
        };
        let mut j = Journal::with_capacity(log.clone(), 2).unwrap();
        j.reserve(9 * REC as u64).unwrap();
        // One transaction checkpointed and not flushed (settle has a flush to do).
        let mut t = j.begin().unwrap();
        t.add(1, &image(1, 1)).unwrap();
        t.commit().unwrap();
        j.checkpoint(&data, &mut |_, _| {}).unwrap();
        // Then one committed whose checkpoint fails at its first data write.
        let mut t = j.begin().unwrap();
        t.add(2, &image(2, 2)).unwrap();
        t.add(3, &image(2, 3)).unwrap();
        t.commit().unwrap();
        data.fail.store(true, Ordering::SeqCst);
        assert!(j.checkpoint(&data, &mut |_, _| {}).is_err());
        let mut seen = Vec::new();
        j.settle(&data, &mut |pg, _| seen.push(pg)).unwrap();
        assert_eq!(
            sc_versions(&mem.durable()),
            [0, 1, 2, 2, 0, 0, 0, 0],
            "the commit whose checkpoint failed is not in the store"
        );
        assert_eq!(seen, [2, 3], "the cache was not told of its pages");
    }

    /// A flush whose data sync fails is not retried as a bare sync (the kernel may
    /// have dropped the failed pages): `begin` refuses, and the next `checkpoint`
    /// (or `settle`) writes the whole run again from the log before emptying it.
    #[test]
    fn failed_flush_rewrites_the_run_from_the_log() {
        for via_settle in [false, true] {
            let log = Arc::new(MemStore::default());
            let mem = Arc::new(MemStore::with_image(Scenario::base()));
            let data = FailSync {
                mem: mem.clone(),
                fail: AtomicBool::new(false),
            };
            let mut j = Journal::with_capacity(log.clone(), 2).unwrap();
            j.reserve(9 * REC as u64).unwrap();
            for v in 1..=2u64 {
                let mut t = j.begin().unwrap();
                t.add(v, &image(v, v)).unwrap();
                t.commit().unwrap();
                j.checkpoint(&data, &mut |_, _| {}).unwrap();
            }
            data.fail.store(true, Ordering::SeqCst);
            assert_eq!(
                j.settle(&data, &mut |_, _| {}).unwrap_err().raw_os_error(),
                Some(libc::EIO)
            );
            // The pages the failed sync lost.
            mem.restore(Scenario::base());
            assert_eq!(j.begin().unwrap_err().kind(), io::ErrorKind::InvalidInput);
            let mut seen = Vec::new();
            if via_settle {
                j.settle(&data, &mut |_, _| {}).unwrap();
            } else {
                let r = j.checkpoint(&data, &mut |i, _| seen.push(i)).unwrap();
                assert_eq!(r.replayed_pages, 2);
                assert_eq!(seen, [1, 2]);
            }
            assert_eq!(sc_versions(&mem.durable()), [0, 1, 2, 0, 0, 0, 0, 0]);
            assert!(log.durable().is_empty(), "recovered: truncated");
            j.begin().unwrap();
        }
    }

    /// The version each page of a data image carries (`image`'s stamp).
    fn sc_versions(data: &[u8]) -> Vec<u64> {
        (0..NP)
            .map(|p| u64::from_le_bytes(data_page(data, p)[0..8].try_into().unwrap()))
            .collect()
    }

    /// The `std::fs::File` store: commit in one journal, recover in another.
    #[test]
    fn file_store_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.path().join(name))
                .unwrap()
        };
        let mut j = Journal::new(open("log")).unwrap();
        let mut t = j.begin().unwrap();
        for i in 0..5 {
            t.add(i * 2, &page_of(3, i * 2)).unwrap();
        }
        let seq = t.seq();
        t.commit().unwrap();
        drop(j);
        let mut j = Journal::new(open("log")).unwrap();
        let data = open("data");
        let r = j.recover(&data, &mut |_, _| {}).unwrap();
        assert_eq!((r.replayed_pages, r.seq), (5, seq));
        assert_eq!(j.log().len().unwrap(), 0);
        let d = std::fs::read(dir.path().join("data")).unwrap();
        assert_eq!(d.len(), 9 * PAGE_SIZE);
        assert!((0..5).all(|i| data_page(&d, i * 2) == page_of(3, i * 2)));
        assert!(data_page(&d, 1).iter().all(|&b| b == 0));
    }
}
