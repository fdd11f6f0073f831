//! A sequence count (the kernel's `seqcount_t`): writers, already serialised by a
//! lock of their own, make the count odd while they change what it covers and even
//! again after; a reader samples it before and after an optimistic read and retries
//! (or falls back to the lock) when it moved or was odd. Readers never spin on it:
//! `read_begin` returns `None` while a write is in progress, and the caller takes
//! its locked path instead (docs/design.md invariant 5).

use super::{fence, AtomicU64, Ordering};

/// See the module header.
#[derive(Debug, Default)]
pub struct SeqCount(AtomicU64);

impl SeqCount {
    /// A count at `v` (rounded down to even: no write in progress).
    pub fn new(v: u64) -> SeqCount {
        SeqCount(AtomicU64::new(v & !1))
    }
    /// The current value (even unless a write is in progress).
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
    /// Starts a write. Precondition: the caller holds the lock that serialises writers.
    pub fn write_begin(&self) {
        let v = self.0.load(Ordering::Relaxed);
        debug_assert_eq!(v & 1, 0, "nested seqcount write");
        self.0.store(v.wrapping_add(1), Ordering::Relaxed);
        // Stores of the write must not become visible before the odd count.
        fence(Ordering::Release);
    }
    /// Ends a write begun by `write_begin`.
    pub fn write_end(&self) {
        let v = self.0.load(Ordering::Relaxed);
        debug_assert_eq!(v & 1, 1, "seqcount write_end without write_begin");
        self.0.store(v.wrapping_add(1), Ordering::Release);
    }
    /// Starts an optimistic read: `None` while a write is in progress.
    pub fn read_begin(&self) -> Option<u64> {
        let v = self.0.load(Ordering::Acquire);
        (v & 1 == 0).then_some(v)
    }
    /// `read_retry` for a reader whose last step was a SeqCst read-modify-write (a
    /// claim): a SeqCst load, ordered after it in the single total order, so a
    /// writer that fences (SeqCst) after `write_begin` and then reads what the
    /// claim wrote sees the claim, or this sees the write. No fence on x86.
    pub fn read_retry_sc(&self, start: u64) -> bool {
        self.0.load(Ordering::SeqCst) != start
    }
    /// Whether a read begun at `start` must be discarded (a write happened since).
    pub fn read_retry(&self, start: u64) -> bool {
        // Loads of the read must complete before the count is sampled again.
        fence(Ordering::Acquire);
        self.0.load(Ordering::Relaxed) != start
    }
}

#[cfg(test)]
mod tests {
    use super::SeqCount;

    #[test]
    fn writes_invalidate_reads() {
        let s = SeqCount::new(7);
        let r = s.read_begin().expect("no write in progress");
        assert!(!s.read_retry(r));
        s.write_begin();
        assert_eq!(
            s.read_begin(),
            None,
            "a reader must not start inside a write"
        );
        s.write_end();
        assert!(s.read_retry(r), "a write in between must be seen");
        assert_eq!(s.get(), r + 2);
    }
}
