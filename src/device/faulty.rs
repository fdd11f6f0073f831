//! A fault-injecting wrapper around any device, for tests of the error paths.
//!
//! It fails reads or writes on command (the next N, all, or a seeded fraction),
//! or corrupts the data a read returns, and counts what it injected. It is a test
//! tool, not a replacement for real devices: the real device underneath does the I/O.
//! State is atomics only; no locks.

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
    /// Failure probability in parts per million, applied to reads and writes.
    rate_ppm: AtomicU64,
    rng: AtomicU64,
    /// Number of failures injected into writes.
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

    fn take(counter: &AtomicU64) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected {what} failure"))
}

impl BlockDevice for FaultyDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn pages(&self) -> u64 {
        self.inner.pages()
    }
    fn read_page(&self, slot: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.fail_reads.load(Ordering::SeqCst)
            || Self::take(&self.fail_reads_next)
            || self.roll()
        {
            self.injected_read_errors.fetch_add(1, Ordering::SeqCst);
            return Err(injected("read"));
        }
        self.inner.read_page(slot, buf)?;
        if self.corrupt_reads.load(Ordering::SeqCst) {
            self.injected_read_errors.fetch_add(1, Ordering::SeqCst);
            buf[17] ^= 0x5a;
        }
        Ok(())
    }
    fn write_page(&self, slot: u64, buf: &[u8]) -> io::Result<()> {
        if self.fail_writes.load(Ordering::SeqCst)
            || Self::take(&self.fail_writes_next)
            || self.roll()
        {
            self.injected_write_errors.fetch_add(1, Ordering::SeqCst);
            return Err(injected("write"));
        }
        self.inner.write_page(slot, buf)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, first: u64, count: u64) -> io::Result<()> {
        self.inner.discard(first, count)
    }
}
