//! Address spaces (the kernel's mm): regions, page tables, faults, fork.
//!
//! - `region`: a region of an address space (the kernel's VMA): kind, flags,
//!   backing and a sequence count, and the public `Region` handle.
//! - `pagetable`: the sparse radix tree of entries (their meaning is `crate::pte`).
//! - `space`: `SpaceInner`, one address space: map, unmap, exit, and how swapoff
//!   walks it (`crate::engine::SpaceWalk`).
//! - `lookup`: finding a fault's region, speculatively (no lock, validated after
//!   the claim) or under the regions read lock (the fallback).
//! - `fault`: resolving an access: the lock-free hit path, zero-fill, swap-in,
//!   copy-on-write, page pins.
//! - `fork`: copy-on-write snapshots with shared page-table leaves.
//! - `entry`: copying and releasing one entry (used by `space` and `fork`).
//! - `msync`: `msync` of file mappings and the failure-atomic commit of
//!   `Share::Atomic` ones (the journal is `filemap::journal`).
//! - `transparent`: userfaultfd-backed regions and their fault handler;
//!   `transparent_fork`: what a process fork of them needs (`usermm exec`), and
//!   `transparent_foreign` its fault-path half (below `transparent`).

pub(crate) mod entry;
pub(crate) mod fault;
pub(crate) mod fork;
pub(crate) mod lookup;
pub(crate) mod msync;
pub(crate) mod pagetable;
pub(crate) mod region;
pub(crate) mod space;
pub(crate) mod transparent;
pub(crate) mod transparent_foreign;
pub(crate) mod transparent_fork;
