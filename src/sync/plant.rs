//! Planted bugs for the model tests (only with `--cfg usermm_shuttle`).
//!
//! A model test proves that it can fail by running once more with one bug planted
//! in the engine's own code and expecting the checker to report the invariant that
//! bug breaks. Each plant is exactly one change at one place in the engine, written
//! `if planted!(Name) { buggy } else { right }` (or `if !planted!(Name) { step }`):
//! the macro (crate root) is the constant `false` without the cfg, so the default
//! build has no plant and no check. With the cfg it reads the flag set here.
//!
//! The flag is process-wide (a plain `std` atomic, not a model-checked one: it is
//! the test's switch, not part of any protocol), and the test harness runs tests in
//! parallel: every model test of the engine holds a [`Session`] for its whole run,
//! which serialises them and sets the plant (none for the ordinary runs).
//!
//! Owns: the flag and the session lock (a `std` mutex taken by the test's main
//! thread outside any model execution; nothing of the engine's is held with it).

use std::sync::atomic::{AtomicU8, Ordering};

/// The bugs that can be planted; see where each is used (`planted!`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Plant {
    /// No bug: the engine as built.
    None = 0,
    /// `swap::swapoff::bring_back` takes the entry it found on the draining device
    /// with a plain store of `BUSY` instead of a compare-and-swap from the value
    /// its walk read: it no longer notices that a fault brought the page in (and a
    /// program wrote it) meanwhile.
    SwapoffClaimsByStore = 1,
    /// `mm::region::RegionTree::remove` (unmap) leaves the removed region's
    /// sequence count even: a speculative fault that found the region in an old
    /// snapshot no longer sees that it went.
    UnmapKeepsCountEven = 2,
}

static PLANT: AtomicU8 = AtomicU8::new(Plant::None as u8);
static SESSIONS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether bug `p` is planted now (see `planted!`).
#[inline]
pub fn planted(p: Plant) -> bool {
    PLANT.load(Ordering::Relaxed) == p as u8
}

/// One model test's hold on the plant flag: see [`session`].
#[derive(Debug)]
pub struct Session {
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// Waits for any other model test to finish, then plants `p` (`Plant::None` for
/// an ordinary run) until the returned session is dropped.
pub fn session(p: Plant) -> Session {
    // A test that panicked while holding it (a planted run, by design) poisons it;
    // the flag is reset by `Drop` either way.
    let g = SESSIONS.lock().unwrap_or_else(|e| e.into_inner());
    PLANT.store(p as u8, Ordering::Relaxed);
    Session { _serial: g }
}

impl Drop for Session {
    fn drop(&mut self) {
        PLANT.store(Plant::None as u8, Ordering::Relaxed);
    }
}
