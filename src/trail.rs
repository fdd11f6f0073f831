//! A trail of what put transparent pages into their mappings and took them out:
//! a diagnostic for a broken invariant (`reclaim::say_lost`), which prints the
//! trail's records of the page and of its frame next to its line.
//!
//! Also `StackBuf`, the one way usermm formats a diagnostic line without
//! allocating (this trail, `reclaim::say_lost`, the frame and lock validator
//! reports); this module imports nothing of the crate, so any module may use it.
//!
//! Owns: one process-wide ring of `N` records (a static: no allocation, nothing
//! touched while it is off). Off unless the environment says `USERMM_TRAIL=1` when
//! the first Vm is made (`init`); off, a record costs one relaxed load.
//!
//! ## Locking
//! None. A writer takes a sequence number (`fetch_add`) and stores the record's
//! words with relaxed atomics; a reader may see a record torn by a writer that
//! lapped it (the ring is 65,536 records deep: only a dump racing with that many
//! newer operations), which is acceptable for a diagnostic. Callable from any
//! thread, a fault handler or a page-I/O thread included: it allocates nothing and
//! takes no lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What was done to a page (the record's operation).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum Op {
    /// A page mapped and its entry made present (zero-fill, swap-in, read-around,
    /// a parent's page read by a fork child, swapoff's drain).
    Install = 1,
    /// `discard`: the page zapped, its entry emptied.
    Discard,
    /// `discard` of a page on swap: the entry emptied, the slot freed.
    DiscardSwapped,
    /// Moved out of the mapping into its frame's staging page.
    Stage,
    /// A move to a staging page found one there (`EEXIST`): it was dropped.
    StageEexist,
    /// The move was refused (the entry's value says the errno).
    StageRefused,
    /// Moved back from the staging page (dirty, or a write fault).
    UnstageMove,
    /// Copied back from the staging page, write-protected (clean).
    UnstageCopy,
    /// Evicted in place: the page zapped from the mapping, the entry swapped.
    EvictInPlace,
    /// Evicted from its staging page.
    EvictStaged,
    /// Write-protected for a page-out copy.
    Protect,
    /// Unprotected by a write-protect fault (dirty from now on).
    Unprotect,
    /// Found missing from its mapping while its entry said mapped.
    Lost,
}

const N: usize = 1 << 16;

struct Rec {
    /// Sequence number << 8 | `Op`.
    seq_op: AtomicU64,
    page: AtomicU64,
    /// Frame number << 32 | thread id.
    pfn_tid: AtomicU64,
    /// The entry's value (or an errno, for `StageRefused`).
    entry: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const REC: Rec = Rec {
    seq_op: AtomicU64::new(0),
    page: AtomicU64::new(0),
    pfn_tid: AtomicU64::new(0),
    entry: AtomicU64::new(0),
};

static ON: AtomicBool = AtomicBool::new(false);
static NEXT: AtomicU64 = AtomicU64::new(1);
static RECS: [Rec; N] = [REC; N];

/// Turns the trail on if `USERMM_TRAIL=1` (read once, at a Vm's making: reading
/// the environment allocates, which a handler must not).
pub(crate) fn init() {
    if std::env::var_os("USERMM_TRAIL").is_some_and(|v| v == "1") {
        ON.store(true, Ordering::Relaxed);
    }
}

fn tid() -> u32 {
    thread_local! {
        static TID: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    TID.with(|t| {
        if t.get() == 0 {
            // SAFETY: gettid has no preconditions.
            t.set(unsafe { libc::gettid() } as u32);
        }
        t.get()
    })
}

/// Records `op` on the page at `page` (frame `pfn`, entry value `entry`).
#[inline]
pub(crate) fn note(op: Op, page: u64, pfn: u32, entry: u64) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let seq = NEXT.fetch_add(1, Ordering::Relaxed);
    let r = &RECS[seq as usize % N];
    r.seq_op.store(0, Ordering::Relaxed);
    r.page.store(page, Ordering::Relaxed);
    r.pfn_tid
        .store((u64::from(pfn) << 32) | u64::from(tid()), Ordering::Relaxed);
    r.entry.store(entry, Ordering::Relaxed);
    r.seq_op.store((seq << 8) | op as u64, Ordering::Release);
}

/// Writes to stderr the trail's last records (at most 32, oldest first) of the
/// page at `page` or of frame `pfn`. Nothing if the trail is off. No allocation.
pub(crate) fn dump(page: u64, pfn: Option<u32>) {
    use std::fmt::Write;
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let end = NEXT.load(Ordering::Relaxed);
    let start = end.saturating_sub(N as u64).max(1);
    // The newest matches, newest first, then printed in order.
    let mut hits = [0u64; 32];
    let mut n = 0;
    let mut s = end;
    while s > start && n < hits.len() {
        s -= 1;
        let r = &RECS[s as usize % N];
        if r.seq_op.load(Ordering::Acquire) >> 8 != s {
            continue;
        }
        let p = r.page.load(Ordering::Relaxed);
        let f = (r.pfn_tid.load(Ordering::Relaxed) >> 32) as u32;
        if p == page || pfn == Some(f) {
            hits[n] = s;
            n += 1;
        }
    }
    for &s in hits[..n].iter().rev() {
        let r = &RECS[s as usize % N];
        let op = r.seq_op.load(Ordering::Acquire) & 0xff;
        let pt = r.pfn_tid.load(Ordering::Relaxed);
        let mut c = StackBuf::<200>::new();
        let _ = writeln!(
            c,
            "usermm: trail #{s} (of {end}): {} page {:#x} frame {} tid {} entry {:#x}",
            name(op),
            r.page.load(Ordering::Relaxed),
            pt >> 32,
            pt as u32,
            r.entry.load(Ordering::Relaxed),
        );
        c.flush();
    }
}

fn name(op: u64) -> &'static str {
    const NAMES: [&str; 14] = [
        "?",
        "install",
        "discard",
        "discard-swapped",
        "stage",
        "stage-EEXIST-dropped",
        "stage-refused",
        "unstage-move",
        "unstage-copy",
        "evict-in-place",
        "evict-staged",
        "protect",
        "unprotect",
        "lost",
    ];
    NAMES.get(op as usize).copied().unwrap_or("?")
}

/// Text formatted on the stack (`N` bytes, the rest cut off) and written to stderr
/// with one `write(2)`: no allocation, no lock (stderr's own lock is not taken), so
/// a fault handler, a page-I/O thread or the lock validator can report with it.
pub(crate) struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    pub(crate) fn new() -> Self {
        StackBuf {
            buf: [0; N],
            len: 0,
        }
    }

    /// Writes what was formatted to stderr.
    pub(crate) fn flush(&self) {
        // SAFETY: writing our own initialised bytes to stderr.
        unsafe { libc::write(2, self.buf.as_ptr().cast(), self.len) };
    }
}

impl<const N: usize> std::fmt::Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
