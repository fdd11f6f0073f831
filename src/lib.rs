//! usermm: a virtual memory manager in user space.
//!
//! A [`Vm`] owns a hard budget of page frames and the swap devices behind it; an
//! [`AddressSpace`] maps regions of virtual memory whose pages live in those frames
//! and move to swap when memory is short. `docs/design.md` describes the architecture
//! and the five invariants; each module's header says which it keeps.
//!
//! ```no_run
//! use usermm::{Config, SwapSpec, Vm, VAddr};
//! # fn main() -> usermm::Result<()> {
//! let vm = Vm::new(Config::default().memory_budget(64 << 20))?;
//! vm.swapon(SwapSpec::parse("file:/var/tmp/app.swap?size=1G")?)?;
//! let mm = vm.new_space();
//! let r = mm.map_anon(256 << 20)?;
//! mm.write(r.start() + 4096, b"hello")?;
//! let mut b = [0u8; 5];
//! mm.read(r.start() + 4096, &mut b)?;
//! assert_eq!(&b, b"hello");
//! # Ok(()) }
//! ```
//!
//! # Layers
//! `model` (hooks of the model tests, only with `--cfg usermm_shuttle`) → `vm` (the
//! public handles) → `mm` (spaces, regions, page tables, faults, fork,
//! msync) → `filemap` (the page cache of host files, the journal; `filemap::slots`
//! sits below `reclaim`, which writes file pages back through it) →
//! `swap::swapoff` and `reclaim` → `engine` (the struct of parts) → `swap::table`,
//! `pageio`, `frame` (arena, reverse map), `pte` (entry encoding and bit locks) →
//! `device` (trait, spec and `open`, file, nbd, mirror, faulty), `sync`, `sys` (raw
//! memory system calls), `addr`, `error`, `stats`, `psi` (pressure stall
//! information: stall marks, averages, triggers), `lockdep` (the lock validator,
//! feature `lockdep`: hooks only, below everything). Nothing imports upward (`scripts/check-cycles.py src` checks
//! that no two modules import each other, directly or through others). The
//! architecture, the life of a page and the invariants: `docs/design.md`.
//!
//! # Lock order
//! The one tree for the crate. A lock may be taken while holding the locks above it
//! on its path, never the other way round; the function named is where that nesting
//! happens. "leaf" means nothing is taken under it; "(claim)" is not a lock anyone
//! blocks on but a state others wait out with bounded polling (`sync::wait_until`).
//! `[may-reclaim]` is the pseudo-lock of docs/design.md invariant 5: every call that may
//! allocate a frame (`reclaim::alloc_frame`) is a point where reclaim may run, so
//! whatever reclaim takes below it must not be held above it.
//!
//! With the feature `lockdep` this tree is checked as the engine runs
//! (`src/lockdep.rs`): each `sync` lock is a class named by the line that made it,
//! the frame lock, `P_LOCK` and the `BUSY` claim are classes of their own, and
//! `[may-reclaim]` is acquired for an instant by `alloc_frame` and held by reclaim
//! scans (`reclaim::shrink_for`) and by page-I/O work (`PageIo::run`). Three
//! nestings against the plain tree are annotated there, each safe for the reason
//! given: fork's second regions lock (`RwLock::write_nested`: the child's, which
//! nobody else can reach yet), `Engine::install`'s lock of the frame it publishes
//! (`PageDesc::lock_fresh`: just allocated, mapped by nobody; `cow_break` holds the
//! entry lock there), and `P_LOCK` inside `P_LOCK` under a frame lock (reclaim
//! locking every mapping of one page).
//! ```text
//! SpaceInner::regions (RwLock; write: map, unmap, fork; read: a fault's fallback
//! │   when its speculative lookup did not validate, msync, swapoff's walk)
//! │   mm::lookup::find (from mm::fault::{read_slow, prepare_write, cow_break}),
//! │   mm::space::{map_vma, unmap}, mm::fork::fork_into
//! │   (A fault's speculative lookup takes no lock: `SpaceInner::snap`, an `ArcSwap`
//! │   stored under the write lock, and the region's sequence count; it is validated
//! │   after the claim below and never waited on: docs/design.md invariant 5.)
//! ├── SpaceInner::dying (Mutex, leaf)                  map_anon, unmap
//! ├── LeafPool::free (Mutex, leaf)                     PageTable::{entry, unshare} (leaf alloc/recycle;
//! │                                                   also under nothing: a speculative fault's entry_hit)
//! ├── LeafPool::shared (Mutex, leaf)                   PageTable::{share_into, unshare, clear} (use counts of
//! │                                                   shared leaves; also under nothing: Vm::stats, a table's drop)
//! ├── entry claim BUSY (claim; held across a frame allocation and one device read)
//! │   │   mm::fault::{fault_zero, fault_swapin}, mm::fork::copy_entry, swap::swapoff::bring_back,
//! │   │   mm::transparent_fork::prepare (a transparent entry, around SwapDevice::dup only)
//! │   └── [may-reclaim]                               reclaim::alloc_frame
//! │       ├── frame lock (PageDesc spin lock; try-lock only inside reclaim)
//! │       │   │   reclaim::reclaim_frame, reclaim::finish_writeback, Engine::install,
//! │       │   │   mm::fault::cow_break, mm::space::release_entry, swap::swapoff::forget_copies_on
//! │       │   ├── entry bit lock P_LOCK (spin; try-lock inside reclaim)
//! │       │   │                                       reclaim::try_lock_mappings, pte::lock_present
//! │       │   ├── Rmap::side (Mutex, leaf; dropped before any callback)  Rmap::{add, remove, for_each}
//! │       │   └── SwapTable::devs (read) → SwapDevice::map (Mutex)
//! │       │       │                                   SwapTable::{alloc, put}, SwapDevice::dup
//! │       │       ├── Shared::front (RwLock, leaf)    SwapDevice::put_inner (which pool)
//! │       │       └── Zpool::inner (Mutex, leaf)      SwapDevice::put_inner (a freed slot drops
//! │       │                                           its chunk), Lower::unpin (write-back done)
//! │       ├── FrameArena::free (Mutex, leaf; `freed` Condvar)  FrameArena::{alloc, free, wait_event}
//! │       └── (reclaim context: a scan, or page-I/O work)   reclaim::shrink_for, PageIo::run
//! │           ├── the frame-lock subtree above, try-locks only
//! │           ├── PageIo::sleep, Engine::kswapd_lock (leaves) PageIo::kick, reclaim::wake_kswapd
//! │           └── a device's write (its internals, or a test device's hook)
//! └── (the same frame-lock subtree, without a claim)  mm::fault::cow_break, mm::space::release_entry
//!
//! Entry bit lock P_LOCK alone (no frame lock): the hit path's write       mm::fault::write_fast
//! SwapTable::devs (write; nothing allocated under it)                     SwapTable::{add, remove}
//! └── Shared::front (RwLock, leaf)              SwapTable::remove (a pool leaves)
//! Zpool::inner alone (no other lock held; never across compression, I/O or a frame
//!   allocation)                                 Zpool::{store, load, reap, write_back_*}
//! Shared::maint (Mutex<bool>, leaf; `wake`)     SwapTable::maintain, Shared::kick
//! SwapDevice::discard_gate (Mutex, held across discard I/O by the maintenance thread)
//! └── SwapDevice::map (claims)                  SwapDevice::{flush_discards, stop_discards}
//! Engine::spaces (Mutex, leaf)                  Engine::{register_space, live_spaces}
//! Inode::commit (Mutex: an Atomic mapping's msync; outermost, held across faults,
//! │   frame allocation and journal I/O — reclaim and page-I/O never take it)
//! │                                             mm::msync::{commit, prepare_atomic}
//! └── SpaceInner::regions (read) and everything under it     (the pins of the commit)
//! FileTable::map (Mutex; held across opening a file and recovering its journal: I/O,
//!   no frame allocation)                        FileTable::open, Inode::drop
//! Inode::size (Mutex, held while growing a file) Inode::grow
//! └── entry bit lock P_LOCK of the old last page (zeroing its tail)
//! FileSlots::free (Mutex, leaf)                 FileSlots::{take, give_back}
//! A file page's cache entry takes the place of a space's entry everywhere above:
//! claim BUSY → [may-reclaim] → frame lock → P_LOCK (Inode::{fault, sync, invalidate}).
//! transparent_foreign::Keepers::fds (Mutex, leaf)  transparent_fork::prepare, Keepers::close
//!   (a fork child's pipe ends; the handler closes them, a fork duplicates them)
//! Engine::kswapd_lock (Mutex<bool>, leaf; `kswapd_wake`)  reclaim::{kswapd, wake_kswapd}
//! PageIo::sleep (Mutex<()>, leaf; `wake`)       PageIo::{run, kick}
//! VmInner::threads (Mutex, leaf)                Vm::new, VmInner::drop
//! Psi::ctl (Mutex, leaf; `wake`)                Vm::{pressure, on_pressure}, PressureTrigger::drop,
//!   Psi::{run, stop} (the `usermm-psi` thread; never held across a callback; the fault
//!   path takes no lock of psi's, only its atomics)
//! Psi::thread (Mutex, leaf)                     Psi::{start, stop}
//! sync::plant's session lock (a `std` Mutex; only with --cfg usermm_shuttle): held
//!   by a model test for its whole run, outside any model execution; no engine lock
//!   is taken under or over it                   sync::plant::session
//! device internals (nbd send/parked/broke/reconnector, mirror resync, mirror degrading): leaves under
//!   nothing of the engine's: a device is called with at most a BUSY claim held.
//! ```
//! Rules that keep the tree a tree:
//! - No lock is held across device I/O: a fault holds only its `BUSY` claim while it
//!   reads a slot (the regions read lock, on the fallback path, only until the
//!   claim); swapoff holds none while it reads (`SpaceWalk::swapped_on` drops the
//!   regions lock before the reads); page-I/O threads hold none while they write.
//! - Reclaim and the page-I/O threads never take a regions lock, never wait on a
//!   `BUSY` claim and never allocate a frame (invariants 1 and 2); they only
//!   try-lock frames and entries, so they cannot wait on a fault that waits on them.
//! - Nothing allocates from the budget under a frame lock or an entry lock
//!   (invariant 4).
//! - The one exception to "short, never blocking" for the frame and entry locks:
//!   a transparent page is write-protected (`UFFDIO_WRITEPROTECT`), staged or
//!   brought back (`UFFDIO_MOVE`, `UFFDIO_COPY`) or dropped from its mapping
//!   (`MADV_DONTNEED`) with them held, so the program cannot change or refault it
//!   half-way. Those are system calls on our own mapping, not device
//!   I/O; they may wait for the kernel's mmap lock, never for a lock of ours.

#![warn(missing_docs)]

/// Whether the model tests' planted bug `$name` (`sync::Plant::$name`) is on: the
/// constant `false` without `--cfg usermm_shuttle`, so a plant costs the default
/// build nothing. See `sync::plant` and `model`.
macro_rules! planted {
    ($name:ident) => {{
        #[cfg(usermm_shuttle)]
        let on = crate::sync::planted(crate::sync::Plant::$name);
        #[cfg(not(usermm_shuttle))]
        let on = false;
        on
    }};
}

pub mod addr;
pub mod config;
pub mod device;
mod engine;
pub mod error;
mod filemap;
mod frame;
#[cfg(feature = "lockdep")]
pub mod lockdep;
#[cfg(not(feature = "lockdep"))]
mod lockdep;
mod mm;
#[cfg(usermm_shuttle)]
#[doc(hidden)]
pub mod model;
mod pageio;
mod pins;
mod psi;
mod pte;
mod reclaim;
pub mod stats;
mod swap;
pub mod sync;
#[doc(hidden)]
pub mod sys;
mod trail;
pub mod uffd;
mod vm;

pub use addr::{SwapId, VAddr, PAGE_SIZE, VADDR_END};
pub use config::{Config, Policy, SwapSpec};
pub use error::{Error, Result};
pub use mm::msync::{fsck, FsckReport};
pub use mm::region::{Region, Share};
pub use mm::transparent::TransparentRegion;
pub use psi::{Pressure, PressureTrigger, Shares};
pub use stats::{Stats, SwapInfo};
#[doc(hidden)]
pub use vm::ForkTicket;
pub use vm::{AddressSpace, File, PageMut, PageRef, Vm};
