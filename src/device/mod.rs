//! Block devices that hold swapped pages.
//!
//! A device is the small [`BlockDevice`] trait: read and write one page-sized slot,
//! flush, discard, size, name and availability. Implementations: [`file::FileDevice`]
//! (a local file with O_DIRECT), [`nbd::NbdDevice`] (our NBD client),
//! [`mirror::MirrorDevice`] (two devices, losing one costs nothing) and
//! [`faulty::FaultyDevice`] (a wrapper that injects errors, for tests). The
//! compressed pool plugs in here later.
//!
//! Devices hold no engine locks; they may be called from any thread at once
//! (page-I/O threads write, faulting threads read).

mod buf;
pub mod faulty;
pub mod file;
pub mod mirror;
pub mod nbd;
pub mod spec;
pub(crate) mod uring;

/// Makes the calling thread's io_uring ring for scattered reads now, if io_uring
/// works here (a thread that must not allocate while it serves faults calls it
/// first: the transparent-fault handlers).
pub(crate) fn prepare_scattered_reads() {
    uring::prepare();
}
pub use buf::AlignedPages;

/// Runs `f` with the device reads it makes on this thread polled, as a fault's
/// reads are (`Config::read_poll`): a read of a [`file::FileDevice`] goes through
/// the thread's io_uring ring, and the thread watches for its completion for up
/// to `spin` before it sleeps (at most as many threads as CPUs poll at a time).
/// For measuring a device the way faults use it (`usermm bench`'s device probe);
/// no effect on other devices or where io_uring is unavailable.
pub fn with_read_poll<R>(spin: std::time::Duration, f: impl FnOnce() -> R) -> R {
    uring::polled(spin, f)
}

use std::fmt;
use std::io;

/// A block device of page-sized slots.
///
/// Buffers passed in are exactly `PAGE_SIZE` bytes and aligned to `PAGE_SIZE`
/// (frames of the arena, or buffers of the request pool), so O_DIRECT works.
/// Methods must not allocate on the write path (docs/design.md invariant 2).
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// The device's name, as shown by `swaps()` and in errors (its spec).
    fn name(&self) -> &str;
    /// Capacity in page-sized slots.
    fn pages(&self) -> u64;
    /// Reads slot `slot` into `buf`.
    fn read_page(&self, slot: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` to slot `slot`.
    fn write_page(&self, slot: u64, buf: &[u8]) -> io::Result<()>;
    /// Reads `buf.len() / PAGE_SIZE` consecutive slots from `first` (swapoff's
    /// sequential drain). The default reads page by page; devices that can do one
    /// large request override it.
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        for (i, page) in buf.chunks_exact_mut(crate::addr::PAGE_SIZE).enumerate() {
            self.read_page(first + i as u64, page)?;
        }
        Ok(())
    }
    /// Reads runs of consecutive slots, `runs[k] = (first, count)`, one after the
    /// other into `buf` (at most 64 runs; a readahead of pages whose slots are
    /// not all adjacent). The default reads them one after the other; a device
    /// that keeps them all in flight at once overrides it and says so in
    /// `reads_concurrently`.
    fn read_scattered(&self, runs: &[(u64, u32)], buf: &mut [u8]) -> io::Result<()> {
        let pages: usize = runs.iter().map(|r| r.1 as usize).sum();
        if buf.len() != pages * crate::addr::PAGE_SIZE {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut at = 0;
        for &(first, count) in runs {
            let len = count as usize * crate::addr::PAGE_SIZE;
            self.read_pages(first, &mut buf[at..at + len])?;
            at += len;
        }
        Ok(())
    }
    /// Whether `read_scattered` keeps its reads in flight at once (then a
    /// scattered readahead costs about one read's latency, not one per page).
    fn reads_concurrently(&self) -> bool {
        false
    }
    /// Whether `write_pages` merges adjacent slots into one request (a local file
    /// does; a network client must not: ordering and merging are the server's job,
    /// docs/design.md invariant 2). Page-out gathers runs only for devices that say yes.
    fn merges_writes(&self) -> bool {
        false
    }
    /// Writes `bufs.len()` consecutive slots from `first` (at most 64). The default
    /// writes page by page.
    fn write_pages(&self, first: u64, bufs: &[&[u8]]) -> io::Result<()> {
        for (i, b) in bufs.iter().enumerate() {
            self.write_page(first + i as u64, b)?;
        }
        Ok(())
    }
    /// Writes runs of consecutive slots, `runs[k] = (first, count)`, taking their
    /// pages from `bufs` in order (at most 64 pages in all), and says in `ok[k]`
    /// whether run `k` was written whole: a page-I/O thread's batch. The default
    /// writes the runs one after the other (`write_pages`); a device that keeps
    /// them all in flight at once overrides it and says so in
    /// `writes_through_uring`.
    fn write_runs(&self, runs: &[(u64, u32)], bufs: &[&[u8]], ok: &mut [bool]) {
        write_runs_in_turn(self, runs, bufs, ok)
    }
    /// Whether page-I/O threads write this device through io_uring
    /// (`write_runs`) where they could set up a ring.
    fn writes_through_uring(&self) -> bool {
        false
    }
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Whether the device can take I/O now. A network device that lost its server
    /// says no while it reconnects, so new page-outs go to other devices.
    fn available(&self) -> bool {
        true
    }
    /// Tells the device that `count` slots from `first` hold nothing of value.
    fn discard(&self, first: u64, count: u64) -> io::Result<()>;
    /// A descriptor from which any process that inherits it may `pread` slot `s` at
    /// byte offset `s * PAGE_SIZE` (a local file does; a network client does not: its
    /// socket cannot be shared by two processes). For a forked child of `usermm exec`
    /// that reads its parent's swapped pages (`mm::transparent_fork`).
    fn shared_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// `BlockDevice::write_runs` one run after the other, each through `write_pages`.
pub(crate) fn write_runs_in_turn<D: BlockDevice + ?Sized>(
    dev: &D,
    runs: &[(u64, u32)],
    bufs: &[&[u8]],
    ok: &mut [bool],
) {
    each_run(runs, bufs, ok, |first, b, o| {
        *o = dev.write_pages(first, b).is_ok()
    })
}

/// Calls `f(first, pages, &mut ok[k])` for each run `runs[k] = (first, count)`,
/// its pages taken from `bufs` in order; a run `bufs` is too short for gets
/// `ok[k] = false` and no call.
pub(crate) fn each_run(
    runs: &[(u64, u32)],
    bufs: &[&[u8]],
    ok: &mut [bool],
    mut f: impl FnMut(u64, &[&[u8]], &mut bool),
) {
    let mut at = 0;
    for (&(first, count), o) in runs.iter().zip(ok.iter_mut()) {
        let n = count as usize;
        match bufs.get(at..at + n) {
            Some(b) => f(first, b, o),
            None => *o = false,
        }
        at += n;
    }
}
