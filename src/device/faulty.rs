//! A fault-injecting wrapper around any device, for tests of the error paths.
//!
//! It fails reads or writes on command (the next N, all, or a seeded fraction),
//! or corrupts the data a read returns, and counts what it injected. It is a test
//! tool, not a replacement for real devices: the real device underneath does the I/O.
//! State is atomics only; no locks; injected errors are an errno (EIO, like a failing
//! disk), so the error paths allocate nothing, as on the real device.
//!
//! Batched writes (`write_pages`, the file device's one-`pwritev` page-out path) go
//! through the same knobs: a batch stands for its page writes in order, the knobs pick
//! the first that fails, the pages before it reach the inner device (a partial write)
//! and the whole call fails. The engine sends batches only after
//! [`FaultyDevice::set_merge_writes`]; by default it writes page by page.

use super::BlockDevice;
use crate::sync::{AtomicBool, AtomicU64, Ordering};
use std::io;
use std::sync::Arc;

/// Wraps a device and injects failures.
#[derive(Debug)]
pub struct FaultyDevice {
    inner: Arc<dyn BlockDevice>,
    name: String,
    fail_writes_next: AtomicU64,
    fail_reads_next: AtomicU64,
    fail_writes: AtomicBool,
    fail_reads: AtomicBool,
    corrupt_reads: AtomicBool,
    fail_span_reads: AtomicBool,
    merge_writes: AtomicBool,
    /// Failure probability in parts per million, applied to reads and writes.
    rate_ppm: AtomicU64,
    rng: AtomicU64,
    /// Number of page writes failed by injection (a failed batch counts each of its
    /// pages, as the engine's `write_errors` does).
    pub injected_write_errors: AtomicU64,
    /// Number of failures injected into reads (corruptions included).
    pub injected_read_errors: AtomicU64,
}

impl FaultyDevice {
    /// Wraps `inner`; it injects nothing until told to.
    pub fn new(inner: Arc<dyn BlockDevice>) -> FaultyDevice {
        FaultyDevice {
            name: format!("faulty({})", inner.name()),
            inner,
            fail_writes_next: AtomicU64::new(0),
            fail_reads_next: AtomicU64::new(0),
            fail_writes: AtomicBool::new(false),
            fail_reads: AtomicBool::new(false),
            corrupt_reads: AtomicBool::new(false),
            fail_span_reads: AtomicBool::new(false),
            merge_writes: AtomicBool::new(false),
            rate_ppm: AtomicU64::new(0),
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
            injected_write_errors: AtomicU64::new(0),
            injected_read_errors: AtomicU64::new(0),
        }
    }
    /// Fails the next `n` writes.
    pub fn fail_next_writes(&self, n: u64) {
        self.fail_writes_next.store(n, Ordering::SeqCst);
    }
    /// Fails the next `n` reads.
    pub fn fail_next_reads(&self, n: u64) {
        self.fail_reads_next.store(n, Ordering::SeqCst);
    }
    /// Fails every write while `on`.
    pub fn set_fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }
    /// Fails every read while `on`.
    pub fn set_fail_reads(&self, on: bool) {
        self.fail_reads.store(on, Ordering::SeqCst);
    }
    /// Flips a byte of every page read while `on` (the read itself succeeds).
    pub fn set_corrupt_reads(&self, on: bool) {
        self.corrupt_reads.store(on, Ordering::SeqCst);
    }
    /// Fails every read of more than one page (`read_pages`: a readahead span,
    /// swapoff's drain) while `on`, as a device that cannot serve some slot of a
    /// span would; single pages still read.
    pub fn set_fail_span_reads(&self, on: bool) {
        self.fail_span_reads.store(on, Ordering::SeqCst);
    }
    /// While `on`, says it merges writes when the inner device does, so the engine
    /// sends runs of adjacent slots through [`BlockDevice::write_pages`] (the batched
    /// page-out path). Off by default (the engine then writes page by page).
    pub fn set_merge_writes(&self, on: bool) {
        self.merge_writes.store(on, Ordering::SeqCst);
    }
    /// Fails a fraction (parts per million) of all reads and writes, from a seeded generator.
    pub fn set_failure_rate(&self, ppm: u64, seed: u64) {
        self.rng.store(seed | 1, Ordering::SeqCst);
        self.rate_ppm.store(ppm, Ordering::SeqCst);
    }

    fn roll(&self) -> bool {
        let ppm = self.rate_ppm.load(Ordering::Relaxed);
        if ppm == 0 {
            return false;
        }
        // splitmix64 step on a shared state; races only reorder the sequence.
        let s = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        z % 1_000_000 < ppm
    }

    /// Whether the next page write fails, per the knobs (consumes one of the next-N).
    fn write_fails(&self) -> bool {
        self.fail_writes.load(Ordering::SeqCst) || Self::take(&self.fail_writes_next) || self.roll()
    }

    fn take(counter: &AtomicU64) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// An injected failure: EIO, built without allocating (the engine calls devices from
/// page-I/O threads, which must not allocate).
fn injected() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl BlockDevice for FaultyDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn pages(&self) -> u64 {
        self.inner.pages()
    }
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() > crate::addr::PAGE_SIZE && self.fail_span_reads.load(Ordering::SeqCst) {
            self.injected_read_errors.fetch_add(1, Ordering::SeqCst);
            return Err(injected());
        }
        // Page by page, so every page meets the other knobs.
        for (i, page) in buf.chunks_exact_mut(crate::addr::PAGE_SIZE).enumerate() {
            self.read_page(first + i as u64, page)?;
        }
        Ok(())
    }
    fn read_page(&self, slot: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.fail_reads.load(Ordering::SeqCst)
            || Self::take(&self.fail_reads_next)
            || self.roll()
        {
            self.injected_read_errors.fetch_add(1, Ordering::SeqCst);
            return Err(injected());
        }
        self.inner.read_page(slot, buf)?;
        if self.corrupt_reads.load(Ordering::SeqCst) {
            self.injected_read_errors.fetch_add(1, Ordering::SeqCst);
            buf[17] ^= 0x5a;
        }
        Ok(())
    }
    fn write_page(&self, slot: u64, buf: &[u8]) -> io::Result<()> {
        if self.write_fails() {
            self.injected_write_errors.fetch_add(1, Ordering::SeqCst);
            return Err(injected());
        }
        self.inner.write_page(slot, buf)
    }
    fn merges_writes(&self) -> bool {
        self.merge_writes.load(Ordering::SeqCst) && self.inner.merges_writes()
    }
    fn write_pages(&self, first: u64, bufs: &[&[u8]]) -> io::Result<()> {
        let Some(k) = (0..bufs.len()).find(|_| self.write_fails()) else {
            return self.inner.write_pages(first, bufs);
        };
        self.injected_write_errors
            .fetch_add(bufs.len() as u64, Ordering::SeqCst);
        if k > 0 {
            // The pages before the failing one reach the device, as in a real partial
            // write; the call fails all the same, so none of them counts as stored.
            let _ = self.inner.write_pages(first, &bufs[..k]);
        }
        Err(injected())
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, first: u64, count: u64) -> io::Result<()> {
        self.inner.discard(first, count)
    }
}
