//! Swap: the table of devices (priorities, striping), the slot allocator with
//! per-slot reference counts and checksums, discard of freed slots (`table`), the
//! compressed pool in front of the devices (`zpool`), and taking a device out of
//! service (`swapoff`, docs/design.md invariant 3).
//!
//! The swap cache of the kernel has no table of its own here: a page being read in
//! is a `BUSY` page-table entry (see `crate::pte`), so a concurrent fault on the same
//! page waits for the one read instead of issuing another.

pub(crate) mod swapoff;
pub(crate) mod table;
pub(crate) mod zpool;

pub(crate) use table::{NoSlot, SwapDevice, SwapTable};
