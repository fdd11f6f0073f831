//! vmstat-style counters. Counters are relaxed atomics bumped on slow paths only
//! (faults, reclaim, I/O); the hit path touches none of them.

use crate::addr::SwapId;
use crate::sync::{AtomicU64, Ordering};

/// Live counters of a Vm.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub pgfault: AtomicU64,
    pub pgmajfault: AtomicU64,
    pub pswpin: AtomicU64,
    pub pswpout: AtomicU64,
    pub pgscan: AtomicU64,
    pub pgsteal: AtomicU64,
    pub direct_reclaim: AtomicU64,
    pub cow_faults: AtomicU64,
    pub wp_faults: AtomicU64,
    pub staged_refaults: AtomicU64,
    pub pinned_skips: AtomicU64,
    pub staged: AtomicU64,
    pub read_around: AtomicU64,
    pub write_errors: AtomicU64,
    pub read_errors: AtomicU64,
    pub filein: AtomicU64,
    pub fileout: AtomicU64,
    pub file_write_errors: AtomicU64,
    pub small_evicted: AtomicU64,
    pub small_promoted: AtomicU64,
    pub ghost_hits: AtomicU64,
}

impl Counters {
    #[inline]
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(c: &AtomicU64, n: u64) {
        if n > 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Use of one swap device, as in `/proc/swaps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapInfo {
    /// The id `swapon` returned.
    pub id: SwapId,
    /// The device's name (its spec).
    pub name: String,
    /// Capacity in bytes.
    pub size: u64,
    /// Bytes of slots in use (for a zpool: of the pages it holds, uncompressed).
    pub used: u64,
    /// Bytes given back since swapon: freed slots discarded on the device (holes
    /// punched in a file, NBD trims); for a zpool, pages dropped from it because
    /// their slots were freed.
    pub discarded: u64,
    /// Bytes of slots held back for good since swapon: a write or trim of theirs
    /// failed with its outcome unknown (an NBD timeout or lost link), so the
    /// server may still carry it out later; they are never handed out again while
    /// the device is in service (a bounded leak, see `device::nbd`).
    pub held_back: u64,
    /// Bytes of budget frames the device holds: a zpool's compressed pages (so
    /// `used / memory` is its compression ratio); 0 for other devices.
    pub memory: u64,
    /// Priority.
    pub prio: i32,
    /// "active" for a device in service.
    pub state: &'static str,
    /// Whether readahead keeps its reads of scattered slots on this device in
    /// flight at once (io_uring on a local file); false where it reads them one
    /// by one, and then reads ahead only pages whose slots are close together.
    pub concurrent_reads: bool,
    /// Whether page-outs to this device go through io_uring (a local file where
    /// it works and `Config::uring_writes` is on): a batch's runs all in flight
    /// at once; false: one positioned write per run, or per page on NBD.
    pub uring_writes: bool,
    /// Whether those io_uring writes name the request pool's buffers registered
    /// with the kernel (no mapping of each buffer per write; Linux 6.15 and later).
    pub registered_buffers: bool,
}

/// A snapshot of a Vm's counters (`Vm::stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Faults taken: zero-fill and swap-in (accesses that found no resident page).
    pub pgfault: u64,
    /// Faults that read a page from a swap device.
    pub pgmajfault: u64,
    /// Pages read from swap devices.
    pub pswpin: u64,
    /// Pages written to swap devices.
    pub pswpout: u64,
    /// Frames looked at by reclaim.
    pub pgscan: u64,
    /// Frames reclaimed (pages dropped from memory).
    pub pgsteal: u64,
    /// Times an allocating thread ran reclaim itself (direct reclaim).
    pub direct_reclaim: u64,
    /// Writes that had to copy a page shared copy-on-write after a fork.
    pub cow_faults: u64,
    /// First writes to clean transparent pages (write-protect faults: how usermm
    /// learns that such a page is dirty).
    pub wp_faults: u64,
    /// Transparent pages moved out of their mapping to see whether they are used
    /// (their frame kept; see `mm::transparent`, "Knowing what is hot").
    pub staged: u64,
    /// Faults on staged pages (used again: moved back, no I/O).
    pub staged_refaults: u64,
    /// Reclaim's visits that left a transparent page where it was because the
    /// kernel refused to move it while it is pinned (an `O_DIRECT` read or an
    /// io_uring buffer a device may be writing into); see `reclaim`.
    pub pinned_skips: u64,
    /// Transparent pages read in the same request as a faulting neighbour (their
    /// slots followed its slot), counted in `pswpin`.
    pub read_around: u64,
    /// Page-out writes that failed (the pages stayed resident and dirty).
    pub write_errors: u64,
    /// Swap-in reads that failed or did not match their checksum.
    pub read_errors: u64,
    /// Pages of host files read into the page cache (counted in `pswpin` too).
    pub filein: u64,
    /// Pages of host files written back in place: by the page-I/O threads, `msync`
    /// and `File::sync` (counted in `pswpout` too).
    pub fileout: u64,
    /// File write-backs that failed (the pages stayed resident and dirty).
    pub file_write_errors: u64,
    /// Pages reclaim evicted from S3-FIFO's small FIFO unused since they came in
    /// (`Config::s3fifo`).
    pub small_evicted: u64,
    /// Pages promoted from the small FIFO to main (used while on probation).
    pub small_promoted: u64,
    /// Faults on pages whose ghost was there (they skipped the small FIFO).
    pub ghost_hits: u64,
    /// Free frames now.
    pub free_frames: u64,
    /// Frames in the budget.
    pub total_frames: u64,
    /// Bytes of metadata: page descriptors, page tables, swap maps, the I/O pool.
    pub metadata_bytes: u64,
    /// Bytes of page tables, part of `metadata_bytes`: every node of every space's
    /// and file's table (4 KiB a node, 2 KiB a table's top) and the use counts of
    /// leaves shared after a fork.
    pub page_table_bytes: u64,
    /// Bytes in use on each swap device, by `SwapId`.
    pub swap_used: Vec<(SwapId, u64)>,
    /// Pages the zpool stored (compressed) since swapon (0 without a pool).
    pub zpool_stored: u64,
    /// Pages the zpool refused (did not compress to half a page, or no room could
    /// be made): they went to the device below.
    pub zpool_refused: u64,
    /// Pages the zpool wrote back to their slots on the device below (it was full,
    /// or the Vm short of frames).
    pub zpool_written_back: u64,
    /// Write-backs that failed (the page stayed in the pool).
    pub zpool_writeback_errors: u64,
}

/// The steps of a swap-in fault that `Config::fault_timing` times, in order.
pub const FAULT_STEPS: [&str; 6] = [
    "claim (entry CAS, region check)",
    "frame (allocation, direct reclaim)",
    "readahead claims",
    "device read (submission and wait)",
    "checksum",
    "map (copy into the frame, install)",
];

/// Nanoseconds spent in each of `FAULT_STEPS` over all timed swap-in faults, and
/// how many there were (relaxed atomics; `Config::fault_timing` only).
/// (`std`'s atomics under every backend: counters, not a protocol.)
#[derive(Debug, Default)]
pub struct FaultTiming {
    pub(crate) ns: [std::sync::atomic::AtomicU64; 6],
    pub(crate) faults: std::sync::atomic::AtomicU64,
}

impl FaultTiming {
    /// Adds one fault whose steps ended at `marks[1..]`, having begun at `marks[0]`.
    pub(crate) fn record(&self, marks: &[std::time::Instant; 7]) {
        for (i, ns) in self.ns.iter().enumerate() {
            let d = marks[i + 1].saturating_duration_since(marks[i]);
            ns.fetch_add(d.as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.faults
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// (faults timed, mean nanoseconds of each step).
    pub fn means(&self) -> (u64, [f64; 6]) {
        let n = self.faults.load(std::sync::atomic::Ordering::Relaxed);
        let mut m = [0.0; 6];
        for (x, ns) in m.iter_mut().zip(&self.ns) {
            *x = ns.load(std::sync::atomic::Ordering::Relaxed) as f64 / n.max(1) as f64;
        }
        (n, m)
    }
}
