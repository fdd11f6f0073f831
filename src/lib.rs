//! usermm: a virtual memory manager in user space.
//!
//! A [`Vm`] owns a hard budget of page frames and the swap devices behind it; an
//! [`AddressSpace`] maps regions of virtual memory whose pages live in those frames
//! and move to swap when memory is short. See `DESIGN.md` for the architecture and
//! the five invariants; each module's header says which it keeps.
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
//! # Lock ordering
//! ```text
//! space.regions (RwLock, read on faults, write on map/unmap)     space.rs, fault.rs
//!   -> frame lock (PageDesc::seq, short, never held across I/O)  frame.rs
//!        -> swap map lock (SwapDevice::map, leaf)                 reclaim_frame, complete_writeback, unmap
//!   -> free list lock (FrameArena::free, leaf; never under a frame lock)
//! kswapd_lock, PageIo::sleep: leaves used only to park threads.
//! ```
//! Frames are allocated (and direct reclaim runs) with at most the regions read
//! lock and a claimed (`BUSY`) page-table entry held; reclaim and page-I/O take
//! neither (invariant 4). Reclaim never does I/O; page-I/O threads never allocate
//! frames (invariants 1 and 2).

#![warn(missing_docs)]

pub mod addr;
pub mod config;
pub mod device;
mod engine;
pub mod error;
mod frame;
mod mm;
mod pageio;
mod pte;
mod reclaim;
pub mod stats;
mod swap;
pub mod sync;
mod vm;

pub use addr::{SwapId, VAddr, PAGE_SIZE, VADDR_END};
pub use config::{Config, SwapSpec};
pub use error::{Error, Result};
pub use mm::region::Region;
pub use stats::{Stats, SwapInfo};
pub use vm::{AddressSpace, PageMut, PageRef, Vm};
