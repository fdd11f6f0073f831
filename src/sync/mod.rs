//! The one place locks and atomics come from.
//!
//! Every protocol in the engine (frame sequence locks, page-table entries, the
//! request pool) uses the types re-exported here, so that a model checker (loom or
//! shuttle, behind `cfg(loom)`) can replace them without touching the engine. Today
//! the engine is built on `parking_lot` locks and `std` atomics.

pub use parking_lot::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
pub use std::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
pub use std::sync::{Arc, Weak};

mod seqcount;
pub use seqcount::SeqCount;

/// Spin, then yield, then sleep in growing steps until `done()` holds.
///
/// Used for the rare waits on another thread's short critical section (a page being
/// faulted in, a frame locked by a writer). It never holds a lock while it waits,
/// and it cannot miss a wake-up because there is none to miss: it polls.
pub fn wait_until(mut done: impl FnMut() -> bool) {
    let mut round = 0u32;
    while !done() {
        if round < 64 {
            std::hint::spin_loop();
        } else if round < 80 {
            std::thread::yield_now();
        } else {
            let us = (20u64 << ((round - 80).min(6))).min(1000);
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
        round = round.saturating_add(1);
    }
}
