//! Configuration of a [`Vm`](crate::Vm): the budget, watermarks, page-I/O threads and
//! request pool. Swap device specs are parsed in `device::spec` (re-exported here:
//! `usermm::config::SwapSpec` and `usermm::SwapSpec` are the same type).

use crate::addr::PAGE_SIZE;
use crate::error::{Error, Result};

/// `Config::stage_every`'s default. Of reclaim's visits to a transparent page that
/// find it unused and not staged, one in this many is the page's turn: it is
/// staged, or spared by its heat (`P_HEAT`, counted down on turns only); on the
/// others it is passed over as it is. Without a staging area (no `UFFDIO_MOVE`)
/// every visit is a turn. A staged page is evicted when the hand comes back to
/// it, so the fewer pages it stages per sweep, the faster it sweeps and the
/// shorter a page stays staged: a page that is only as hot as the rest (uniform
/// access) is then rarely touched while staged, where every such touch costs a
/// userfaultfd round trip and each staging and unstaging a TLB flush of the
/// program's CPUs, while a hot page is still touched within the shorter stay and
/// kept. Measured
/// (`cargo run --release --example transparent_staging -- W/B secs pattern every`,
/// 64 MiB budget, one thread reading random words; accesses/s and staged refaults
/// per access; two runs for 1 and 4, one for 8 and 16):
///
/// | every | uniform W/B 1.25 | uniform 4 | hot/cold 1.25 | hot/cold 4 | zipf 1.25 | zipf 4 |
/// |---|---|---|---|---|---|---|
/// | 1 | 27.9k, 32.1k; 29 % | 12.3–12.6k; 12 % | 274–309k; 3.6 % | 91–95k; 6 % | 171–209k; 6–7 % | 46–56k; 6–8 % |
/// | 4 | 42.7k, 49.3k; 10 % | 12.4–13.1k; 4 % | 390–395k; 1.3 % | 93–102k; 4 % | 209–210k; 2.4 % | 53–56k; 3 % |
/// | 8 | 42.9k; 6 % | 12.4k; 2.3 % | 356k; 0.9 % | 88k; 3 % | 248k; 1.6 % | 48k; 2.1 % |
/// | 16 | 54.0k; 3.6 % | 14.9k; 1.3 % | 388k; 0.6 % | 102k; 2.3 % | 205k; 1.1 % | 52k; 1.3 % |
///
/// Misses: the same in every column but zipf W/B 4 (17.9–18.0 % with every page,
/// 18.4–18.5 with one in 4, 18.9–19.3 with 8 and 16) and hot/cold W/B 4 at 16
/// (9.9 % against 8.7–9.2). Four: most of the gain for half a point of misses on
/// zipf W/B 4 (the bench's transparent zipf W/B 4 cell: 18.4–18.7 % against
/// 17.5–17.6 before).
pub const DEFAULT_STAGE_EVERY: usize = 4;

/// [`Config::read_poll`]'s default: how long a fault's read polls for its
/// completion before it sleeps.
pub const DEFAULT_READ_POLL: std::time::Duration = std::time::Duration::from_micros(200);

/// The smallest budget accepted: 16 frames.
pub const MIN_BUDGET_FRAMES: usize = 16;

/// Reclaim's replacement policy ([`Config::policy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Policy {
    /// CLOCK (second chance): one reference bit, a hand over the frames.
    Clock,
    /// S3-FIFO in front of CLOCK: new pages on probation in a small FIFO (10 % of
    /// the frames), promoted if used there; a ghost table brings back the pages
    /// it dropped straight to main.
    S3Fifo,
    /// The default: a probation FIFO of 1 % of the frames whose pages enter main
    /// only if they are used more often than what main last gave up, counted per
    /// page across its trips to swap (W-TinyLFU's admission test with exact,
    /// aged counts instead of a sketch).
    #[default]
    Frequency,
}

/// Settings of a [`Vm`](crate::Vm). Start from `Config::default()` and chain setters.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) memory_budget: usize,
    pub(crate) watermarks: Option<[usize; 3]>,
    pub(crate) io_threads: usize,
    pub(crate) io_requests: usize,
    pub(crate) background_reclaim: bool,
    pub(crate) max_files: usize,
    pub(crate) policy: Policy,
    pub(crate) readahead: bool,
    pub(crate) speculative_faults: bool,
    pub(crate) fault_lookup_delay: std::time::Duration,
    pub(crate) fault_timing: bool,
    pub(crate) stage_every: usize,
    pub(crate) read_poll: std::time::Duration,
    pub(crate) uring_writes: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            memory_budget: 256 << 20,
            watermarks: None,
            io_threads: 16,
            io_requests: 256,
            background_reclaim: true,
            max_files: 1024,
            policy: Policy::Frequency,
            readahead: true,
            speculative_faults: true,
            fault_lookup_delay: std::time::Duration::ZERO,
            fault_timing: false,
            stage_every: DEFAULT_STAGE_EVERY,
            read_poll: DEFAULT_READ_POLL,
            uring_writes: false,
        }
    }
}

impl Config {
    /// The hard RAM budget for page frames, in bytes (rounded down to whole pages).
    /// At least 64 KiB (16 frames). Default 256 MiB.
    pub fn memory_budget(mut self, bytes: usize) -> Self {
        self.memory_budget = bytes;
        self
    }
    /// Watermarks `[min, low, high]` in frames (must satisfy `0 < min < low < high <
    /// frames`). Default: min = frames/512 (frames/128 up to 16 on small budgets; at
    /// least 2), low = 2·min, high = 3·min.
    pub fn watermarks(mut self, min: usize, low: usize, high: usize) -> Self {
        self.watermarks = Some([min, low, high]);
        self
    }
    /// Number of page-I/O threads (= write-back queue depth). Default 16: each
    /// waits in its own positioned write, so the device sees that depth.
    pub fn io_threads(mut self, n: usize) -> Self {
        self.io_threads = n;
        self
    }
    /// Number of preallocated page-out requests (each owns a 4 KiB buffer). Default 256.
    pub fn io_requests(mut self, n: usize) -> Self {
        self.io_requests = n;
        self
    }
    /// Whether a background reclaimer thread keeps free frames between the low and
    /// high watermarks (default true). Without it only direct reclaim runs.
    pub fn background_reclaim(mut self, on: bool) -> Self {
        self.background_reclaim = on;
        self
    }

    /// Most host files open at once through `map_file` and `Vm::open` (each holds a
    /// preallocated slot the page-I/O threads write it back through). Default 1024.
    pub fn max_files(mut self, n: usize) -> Self {
        self.max_files = n;
        self
    }

    /// Reclaim's replacement policy (default [`Policy::Frequency`]). See the
    /// `reclaim` module for what each does and why the default won.
    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = p;
        self
    }

    /// `policy(Policy::S3Fifo)` with `true`, `policy(Policy::Clock)` with `false`
    /// (the setter of the releases before `Policy`).
    pub fn s3fifo(self, on: bool) -> Self {
        self.policy(if on { Policy::S3Fifo } else { Policy::Clock })
    }

    /// Swap-in readahead for sequential faults (default on): after two faults on
    /// consecutive pages, the pages after the faulting one are read in the same
    /// request while they sit in the slots after its slot (4 pages, doubling to 32).
    pub fn readahead(mut self, on: bool) -> Self {
        self.readahead = on;
        self
    }

    /// Whether a fault finds its region without its space's regions lock (default
    /// true): it reads a snapshot of the regions optimistically and validates after
    /// claiming its page, so `map_anon`, `unmap` and `fork` on one thread never
    /// stall faults on others. `false` forces the locked lookup on every fault (for
    /// comparison: `cargo run --release --example spec_fault`).
    pub fn speculative_faults(mut self, on: bool) -> Self {
        self.speculative_faults = on;
        self
    }

    /// For tests only: every speculative region lookup of a fault sleeps this long
    /// after it has read the region and before the fault claims its page, so that
    /// races with `unmap` and fork happen on every run instead of once in a while
    /// (`tests/spec_fault.rs`). Default zero (no sleep).
    #[doc(hidden)]
    pub fn fault_lookup_delay(mut self, d: std::time::Duration) -> Self {
        self.fault_lookup_delay = d;
        self
    }

    /// For measurements: swap-in faults time their steps (`Vm::fault_timing`,
    /// `examples/fault_cost.rs`), at the cost of seven clock reads a fault. Default off.
    #[doc(hidden)]
    pub fn fault_timing(mut self, on: bool) -> Self {
        self.fault_timing = on;
        self
    }

    /// For measurements and tests: one in `n` of reclaim's visits to an unused,
    /// unstaged transparent page is its turn to be staged (`DEFAULT_STAGE_EVERY`,
    /// the default, says why; 1 makes every visit one, as before that). Values
    /// below 1 count as 1.
    #[doc(hidden)]
    pub fn stage_every(mut self, n: usize) -> Self {
        self.stage_every = n.max(1);
        self
    }

    /// How long a fault's read of a swap file watches for its completion before it
    /// sleeps in the kernel (default 200 µs; zero: it sleeps at once, as the
    /// kernel's swap-in does). Polled reads go through the faulting thread's
    /// io_uring ring; at most as many threads as there are CPUs poll at a time (the
    /// others sleep). On these 2-vCPU VMs a 4 KiB read at depth 1 completes
    /// at p50 37–43 µs polled against 52–62 µs slept: the difference is the wake-up
    /// of an idle vCPU. The price is a CPU kept busy while the read is in flight.
    /// No effect where io_uring is unavailable (`usermm swaps` says so) or on NBD.
    pub fn read_poll(mut self, spin: std::time::Duration) -> Self {
        self.read_poll = spin;
        self
    }

    /// Whether page-I/O threads write swap files through io_uring (default off:
    /// one `pwritev` per run of adjacent slots from each of the `io_threads`).
    /// On: each thread's ring names the request pool's buffers, registered with
    /// the kernel once (1 MiB pinned for the default 256 requests, counted against
    /// RLIMIT_MEMLOCK once: the threads' rings share the registration), and a
    /// batch's runs of slots, one vectored write each, are all in flight at once.
    /// Measured on these VMs (`usermm bench --page-out uring|pwritev`, README "Not
    /// yet"): the threads' `pwritev` faulted as fast or faster beside 50 % writes
    /// and kept the faults' p99 lower (uniform W/B 4, one thread: 109–113 µs
    /// against 152–242), so it is the default. `usermm swaps` says which a device
    /// gets. No effect on NBD or a compressed pool, or where io_uring is missing.
    pub fn uring_writes(mut self, on: bool) -> Self {
        self.uring_writes = on;
        self
    }

    /// The budget in frames, checked.
    pub(crate) fn frames(&self) -> Result<usize> {
        let n = self.memory_budget / PAGE_SIZE;
        if n < MIN_BUDGET_FRAMES {
            return Err(Error::Config(format!(
                "memory budget of {} bytes is below the minimum of {} bytes ({} frames)",
                self.memory_budget,
                MIN_BUDGET_FRAMES * PAGE_SIZE,
                MIN_BUDGET_FRAMES
            )));
        }
        if n > crate::pte::MAX_FRAMES {
            return Err(Error::Config(format!(
                "memory budget above {} GiB",
                (crate::pte::MAX_FRAMES * PAGE_SIZE) >> 30
            )));
        }
        Ok(n)
    }

    /// The watermarks in frames, checked.
    pub(crate) fn resolved_watermarks(&self, frames: usize) -> Result<[usize; 3]> {
        let w = match self.watermarks {
            Some(w) => w,
            None => {
                // The kernel reclaims a memory cgroup at its limit, keeping no free
                // pool there; a pool of frames/128 cost usermm a point of miss at
                // W/B 1.25 (uniform: 21.6 % against the kernel's 20.5).
                let min = (frames / 512).max((frames / 128).min(16)).clamp(2, 8192);
                [min, 2 * min, 3 * min]
            }
        };
        if !(0 < w[0] && w[0] < w[1] && w[1] < w[2] && w[2] < frames) {
            return Err(Error::Config(format!(
                "watermarks {w:?} must satisfy 0 < min < low < high < frames ({frames})"
            )));
        }
        Ok(w)
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.io_threads == 0 || self.io_threads > 256 {
            return Err(Error::Config("io_threads must be between 1 and 256".into()));
        }
        if self.io_requests < self.io_threads || self.io_requests > 65536 {
            return Err(Error::Config(
                "io_requests must be at least io_threads and at most 65536".into(),
            ));
        }
        if self.max_files > 1 << 20 {
            return Err(Error::Config("max_files must be at most 1048576".into()));
        }
        Ok(())
    }
}

pub use crate::device::spec::{parse_size, SwapKind, SwapSpec};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_checks() {
        assert!(Config::default().memory_budget(0).frames().is_err());
        assert!(Config::default().memory_budget(4096 * 15).frames().is_err());
        assert_eq!(
            Config::default().memory_budget(4096 * 16).frames().unwrap(),
            16
        );
        let c = Config::default();
        assert!(c.resolved_watermarks(16).is_ok());
        assert!(c
            .clone()
            .watermarks(3, 2, 5)
            .resolved_watermarks(64)
            .is_err());
    }
}
