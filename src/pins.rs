//! The pins this thread's guards hold, so that an access that would wait for one
//! of them can tell it would wait for itself (and fail with `WouldDeadlock`
//! instead). Below `mm` and `filemap`, which both ask.
//!
//! Owns: one thread-local list of (key, page number, exclusive): a key is a space
//! (`mm::fault::note_pin`) or a file's inode (`Inode::key`, a page of a file being
//! reachable through several mappings and `File` handles). Guards are `!Send`, so
//! a pin belongs to the thread that took it.
//!
//! ## Locking
//! None: thread-local.

use std::cell::RefCell;
// Under the model checker these are per model thread: shuttle runs all its threads
// on one OS thread, whose own thread-locals they would share.
#[cfg(usermm_shuttle)]
use shuttle::thread_local;

thread_local! {
    static HELD: RefCell<Vec<(usize, u64, bool)>> = const { RefCell::new(Vec::new()) };
}

/// Records a pin under `key` (see the module header).
pub(crate) fn note_pin_key(key: usize, page: u64, exclusive: bool) {
    HELD.with(|h| h.borrow_mut().push((key, page, exclusive)));
}

/// Forgets a pin recorded by `note_pin_key`.
pub(crate) fn note_unpin_key(key: usize, page: u64, exclusive: bool) {
    let k = (key, page, exclusive);
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        if let Some(i) = h.iter().rposition(|&x| x == k) {
            h.swap_remove(i);
        }
    });
}

/// Whether this thread holds any exclusive pin.
pub(crate) fn holds_exclusive() -> bool {
    HELD.with(|h| h.borrow().iter().any(|&(_, _, x)| x))
}

/// Whether this thread holds a pin under `key` on a page in `[first, end)`: any
/// pin, or only exclusive ones.
pub(crate) fn holds_pin_key(key: usize, first: u64, end: u64, exclusive_only: bool) -> bool {
    HELD.with(|h| {
        h.borrow()
            .iter()
            .any(|&(s, v, x)| s == key && v >= first && v < end && (x || !exclusive_only))
    })
}
