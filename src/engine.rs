//! The engine a Vm runs: the frame arena, the swap table, the page-I/O pool, the
//! counters and the reclaim control, shared (`Arc<Engine>`) by the public handles,
//! the background reclaimer and the page-I/O threads.
//!
//! The engine's own lock is `kswapd_lock` (a leaf: pairs with `kswapd_wake` to park
//! the background reclaimer).

use crate::config::Config;
use crate::error::Result;
use crate::frame::FrameArena;
use crate::pageio::PageIo;
use crate::stats::{Counters, Stats};
use crate::swap::SwapTable;
use crate::sync::{Arc, AtomicBool, AtomicU8, AtomicUsize, Condvar, Mutex, Ordering};

#[derive(Debug)]
pub(crate) struct Engine {
    pub frames: FrameArena,
    pub swap: SwapTable,
    pub io: PageIo,
    pub cnt: Counters,
    /// Leaves of every page table (type-stable, recycled), and the bytes of all
    /// page-table nodes.
    pub leaves: Arc<crate::pagetable::LeafPool>,
    /// CLOCK hand over the frame arena.
    pub hand: AtomicUsize,
    pub kswapd_lock: Mutex<bool>,
    pub kswapd_wake: Condvar,
    pub shutdown: AtomicBool,
    /// Extra mappings of frames shared copy-on-write (see `rmap`): frame → entries.
    pub rmap: Mutex<std::collections::HashMap<u32, Vec<usize>>>,
    /// Every live address space (the kernel's mmlist), for swapoff. A space is added
    /// before anything can map a slot into it (fork adds the child before copying)
    /// and drops out when its last handle goes.
    pub spaces: Mutex<Vec<std::sync::Weak<crate::space::SpaceInner>>>,
    /// Device of the most recent failed page-out (for the error of an allocation
    /// that cannot progress because page-out keeps failing).
    pub last_write_error_dev: AtomicU8,
}

impl Engine {
    pub fn new(cfg: &Config) -> Result<Engine> {
        cfg.check()?;
        let n = cfg.frames()?;
        let wm = cfg.resolved_watermarks(n)?;
        Ok(Engine {
            frames: FrameArena::new(n, wm)?,
            swap: SwapTable::default(),
            io: PageIo::new(cfg.io_requests)?,
            cnt: Counters::default(),
            leaves: Arc::new(crate::pagetable::LeafPool::new()),
            hand: AtomicUsize::new(0),
            kswapd_lock: Mutex::new(false),
            kswapd_wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            last_write_error_dev: AtomicU8::new(0),
            rmap: Mutex::new(Default::default()),
            spaces: Mutex::new(Vec::new()),
        })
    }

    pub fn metadata_bytes(&self) -> usize {
        self.frames.metadata_bytes()
            + self.swap.metadata_bytes()
            + self.io.metadata_bytes()
            + self.leaves.bytes.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.cnt;
        let l = |a: &crate::sync::AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            pgfault: l(&c.pgfault),
            pgmajfault: l(&c.pgmajfault),
            pswpin: l(&c.pswpin),
            pswpout: l(&c.pswpout),
            pgscan: l(&c.pgscan),
            pgsteal: l(&c.pgsteal),
            direct_reclaim: l(&c.direct_reclaim),
            cow_faults: l(&c.cow_faults),
            write_errors: l(&c.write_errors),
            read_errors: l(&c.read_errors),
            free_frames: self.frames.free_count() as u64,
            total_frames: self.frames.nframes() as u64,
            metadata_bytes: self.metadata_bytes() as u64,
            swap_used: self
                .swap
                .all()
                .iter()
                .map(|d| (d.id, d.used() * crate::addr::PAGE_SIZE as u64))
                .collect(),
        }
    }
}
