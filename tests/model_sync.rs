//! The `sync` facade under the model checker, for real: built with
//! `RUSTFLAGS="--cfg usermm_shuttle"`, `usermm::sync` is shuttle's, and these tests
//! explore schedules of the engine's own `SeqCount` (the region sequence count of
//! `mm::region`) — including one with the write-side bump left out, which the
//! checker must catch. Without the cfg this file is empty (CI runs it with the cfg:
//! see .ci/run).
#![cfg(usermm_shuttle)]

use std::sync::Arc;
use usermm::sync::{AtomicU64, Mutex, Ordering, SeqCount};

/// Two words that a writer keeps equal, covered by a sequence count.
struct Pair {
    lock: Mutex<()>,
    seq: SeqCount,
    a: AtomicU64,
    b: AtomicU64,
}

fn model(bump: bool) {
    let p = Arc::new(Pair {
        lock: Mutex::new(()),
        seq: SeqCount::default(),
        a: AtomicU64::new(0),
        b: AtomicU64::new(0),
    });
    let w = {
        let p = p.clone();
        shuttle::thread::spawn(move || {
            for v in 1..=2 {
                let _g = p.lock.lock();
                if bump {
                    p.seq.write_begin();
                }
                p.a.store(v, Ordering::Relaxed);
                p.b.store(v, Ordering::Relaxed);
                if bump {
                    p.seq.write_end();
                }
            }
        })
    };
    // An optimistic reader: what it accepts must be consistent; it never spins (a
    // failed read would fall back to the lock).
    if let Some(s) = p.seq.read_begin() {
        let a = p.a.load(Ordering::Relaxed);
        let b = p.b.load(Ordering::Relaxed);
        if !p.seq.read_retry(s) {
            assert_eq!(a, b, "optimistic read accepted a torn pair");
        }
    }
    w.join().unwrap();
}

#[test]
fn seqcount_readers_never_accept_a_torn_read() {
    shuttle::check_random(|| model(true), 2000);
}

#[test]
fn planted_missing_write_bump_is_caught() {
    let r = std::panic::catch_unwind(|| shuttle::check_random(|| model(false), 2000));
    let msg = match r {
        Ok(()) => panic!("the checker missed a writer that does not bump the count"),
        Err(e) => e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    };
    assert!(msg.contains("torn pair"), "unexpected failure: {msg}");
}

#[test]
fn zeroed_atomics_are_valid() {
    // mm::pagetable allocates nodes zeroed; under this backend that must be a valid
    // atomic holding 0 (sync's module header relies on it).
    shuttle::check_random(
        || {
            let z = std::mem::MaybeUninit::<AtomicU64>::zeroed();
            // SAFETY: what this test checks; a failure shows up as a wrong value or a
            // crash here, not silently in the engine.
            let z = unsafe { z.assume_init() };
            assert_eq!(z.load(Ordering::Relaxed), 0);
            z.store(5, Ordering::Relaxed);
            assert_eq!(z.load(Ordering::Relaxed), 5);
        },
        10,
    );
}
