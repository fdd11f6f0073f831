//! The one place locks and atomics come from.
//!
//! Every protocol in the engine (frame locks, page-table entries, the request pool,
//! the region sequence counts) uses the types re-exported here, so that a model
//! checker can replace them without touching the engine (tokio's `loom` module does
//! the same). Two backends, chosen at build time:
//!
//! - default: `std::sync` locks behind parking_lot's API, and `std` atomics
//!   (`std_imp.rs`: parking_lot's global parking table does not survive a process
//!   fork, which `usermm exec` children need);
//! - `--cfg usermm_shuttle`: `shuttle`'s locks, condition variables and atomics,
//!   behind wrappers with parking_lot's API (no poisoning; `Condvar::wait_for` on a
//!   guard in place), so a shuttle test can schedule the engine's own code.
//!
//! Page-table nodes are allocated zeroed (`mm::pagetable`); shuttle's atomics are
//! valid when zeroed (a `RefCell` and an `Option` with a null niche), which the
//! shuttle model test checks before relying on it.
//!
//! Threads and I/O are not switched: under the cfg `Vm::new` starts no thread, and a
//! model test drives the engine from shuttle threads of its own (`crate::model`;
//! the page-I/O loop among them). Waits are switched: every round of [`wait_until`] and
//! every [`sleep`] yields to the schedule instead of spinning or sleeping, since an
//! OS sleep would stop every model thread.
//!
//! What is model-checked this way (docs/design.md, "Model checking"):
//! `tests/model_sync.rs` (`SeqCount` on a miniature) and `tests/model_engine.rs`
//! (the engine's swapoff against swap-in faults and reclaim with page-out, and its
//! speculative faults against unmap and fork, through the public API, with
//! `crate::model::check` after every schedule). Each has a planted bug it must
//! catch: `plant.rs` holds the switch (only under the cfg), and the engine's code
//! reads it through the crate root's `planted!` macro, the constant `false`
//! without the cfg. Run them with
//! `RUSTFLAGS="--cfg usermm_shuttle" CARGO_TARGET_DIR=target/shuttle cargo test
//! --release -p usermm --test model_sync --test model_engine`.
//!
//! With the feature `lockdep` the default backend's locks report every acquisition
//! and release to the lock validator (`crate::lockdep`); the shuttle backend is not
//! instrumented (a model checker explores the orders itself).

#[cfg(not(usermm_shuttle))]
#[path = "std_imp.rs"]
mod imp;

#[cfg(usermm_shuttle)]
mod imp;

pub use imp::*;

/// Atomics laid over raw memory (page bytes in frames): the data the protocols move,
/// not the protocols themselves, so they stay `std`'s under every backend.
pub mod raw {
    pub use std::sync::atomic::{AtomicU64, AtomicU8};
}
pub use std::sync::{Arc, Weak};

mod seqcount;
pub use seqcount::SeqCount;

#[cfg(usermm_shuttle)]
mod plant;
#[cfg(usermm_shuttle)]
pub use plant::{planted, session, Plant, Session};

/// Spin, then yield, then sleep in growing steps until `done()` holds.
///
/// Used for the rare waits on another thread's short critical section (a page being
/// faulted in, a frame locked by a writer). It never holds a lock while it waits,
/// and it cannot miss a wake-up because there is none to miss: it polls.
///
/// Under the model checker (`--cfg usermm_shuttle`) every round yields to the
/// schedule instead: a spin or an OS sleep would never let the thread it waits
/// for run.
pub fn wait_until(mut done: impl FnMut() -> bool) {
    let mut round = 0u32;
    while !done() {
        if cfg!(usermm_shuttle) {
            yield_now();
        } else if round < 64 {
            std::hint::spin_loop();
        } else if round < 80 {
            yield_now();
        } else {
            let us = (20u64 << ((round - 80).min(6))).min(1000);
            sleep(std::time::Duration::from_micros(us));
        }
        round = round.saturating_add(1);
    }
}

/// Sleeps for `d`; under the model checker, yields to the schedule instead (time
/// does not pass there, and an OS sleep would stop every model thread).
pub fn sleep(d: std::time::Duration) {
    #[cfg(usermm_shuttle)]
    {
        let _ = d;
        shuttle::thread::yield_now();
    }
    #[cfg(not(usermm_shuttle))]
    std::thread::sleep(d);
}

/// `wait_until` with a bound: false if `done()` still does not hold after `limit`.
pub fn wait_until_for(limit: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    let mut timed_out = false;
    wait_until(|| {
        if done() {
            return true;
        }
        timed_out = std::time::Instant::now() >= end;
        timed_out
    });
    !timed_out
}

thread_local! {
    static ENGINE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Known to be the program's (see `program_thread`).
    static PROGRAM_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Inside `spawn_engine` (the creator of one of usermm's threads).
    static SPAWNING_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Threads of usermm's spawned and not yet marked (`engine_spawning`,
/// `mark_engine_thread`).
static ENGINE_STARTING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Says that the caller is about to start one of usermm's threads (call
/// `engine_spawn_failed` if the spawn fails). Until the thread marks itself, an
/// allocator that serves a program from transparent memory must not serve
/// anyone from it (`engine_threads_starting`): the new thread allocates before its
/// own code runs (the C library's bookkeeping of its thread-locals), and it may be
/// the fault handler that the program, holding the allocator's lock, waits for.
pub fn engine_spawning() {
    ENGINE_STARTING.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
}

/// Undoes `engine_spawning` for a thread that did not start.
pub fn engine_spawn_failed() {
    let _ = ENGINE_STARTING.fetch_update(
        std::sync::atomic::Ordering::AcqRel,
        std::sync::atomic::Ordering::Acquire,
        |n| n.checked_sub(1),
    );
}

/// Starting one of usermm's threads: `engine_spawning` around
/// `std::thread::Builder::spawn` (the thread marks itself with
/// `mark_engine_thread`, first thing).
pub trait EngineSpawn {
    /// `spawn`, counted in `engine_threads_starting` until the thread marks itself.
    fn spawn_engine<F, T>(self, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static;
}

impl EngineSpawn for std::thread::Builder {
    fn spawn_engine<F, T>(self, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        engine_spawning();
        // The C library allocates the new thread's bookkeeping (its TLS vector) in
        // this thread, inside `spawn`: not from the program's heap either.
        let outer = SPAWNING_HERE.with(|c| c.replace(true));
        let r = self.spawn(f);
        SPAWNING_HERE.with(|c| c.set(outer));
        if r.is_err() {
            engine_spawn_failed();
        }
        r
    }
}

/// In a process fork child (one thread): no thread of usermm's is starting here
/// (those the parent was starting at the fork do not exist in the child).
pub fn forget_engine_threads_starting() {
    ENGINE_STARTING.store(0, std::sync::atomic::Ordering::Release);
}

/// How many of usermm's threads are starting (spawned, not yet marked).
pub fn engine_threads_starting() -> usize {
    ENGINE_STARTING.load(std::sync::atomic::Ordering::Acquire)
}

/// Marks the calling thread as one of usermm's own (page-I/O, reclaim, fault
/// handler, device helpers). Called first thing by every thread the library starts
/// (after `engine_spawning` in the thread that started it).
pub fn mark_engine_thread() {
    ENGINE_THREAD.with(|c| c.set(true));
    engine_spawn_failed();
    #[cfg(feature = "lockdep")]
    crate::lockdep::mark_engine_thread();
}

/// Whether the calling thread is one of usermm's own. An allocator that serves a
/// program from transparent memory (`usermm exec`'s) must send such a thread's
/// allocations elsewhere: a thread that serves faults must never fault on the memory
/// it serves. Static TLS with a constant initializer: no allocation, no destructor.
pub fn is_engine_thread() -> bool {
    ENGINE_THREAD.with(|c| c.get())
}

/// Whether the calling thread is known to be one of the program's, so that an
/// allocator serving the program from transparent memory (`usermm exec`'s) may
/// serve it while one of usermm's threads is starting: it is not usermm's (not
/// marked), is not starting one of usermm's threads (`spawn_engine`), and either
/// was declared so (`mark_program_thread`) or is seen now with no thread of
/// usermm's starting. A thread of usermm's is counted in `engine_threads_starting`
/// from before it exists until it marks itself, so a thread that sees the count at
/// zero unmarked is not one of them; remembered, it stays known while others
/// start. The thread that is starting is never known: its allocations (the C
/// library's, before its own code runs) go elsewhere, and it may be the fault
/// handler a program thread holding the allocator's lock waits for.
///
/// Not "no thread of usermm's is starting", as it was: that sent every program
/// allocation outside the budget for as long as a new thread took to be scheduled
/// (at start-up, 1,000 and more of a program's first 64 KiB blocks on a busy
/// machine: `usermm-cli/tests/exec_fork.rs`).
pub fn program_thread() -> bool {
    if is_engine_thread() || SPAWNING_HERE.with(|c| c.get()) {
        return false;
    }
    if PROGRAM_THREAD.with(|c| c.get()) {
        return true;
    }
    if engine_threads_starting() == 0 {
        PROGRAM_THREAD.with(|c| c.set(true));
        return true;
    }
    false
}

/// Declares the calling thread one of the program's (`program_thread`): a thread
/// that is certainly not usermm's, such as the one running a library constructor
/// before the program's `main`.
pub fn mark_program_thread() {
    if !is_engine_thread() {
        PROGRAM_THREAD.with(|c| c.set(true));
    }
}

/// Gives the CPU (or, under the model checker, the schedule) to another thread.
pub fn yield_now() {
    #[cfg(usermm_shuttle)]
    shuttle::thread::yield_now();
    #[cfg(not(usermm_shuttle))]
    std::thread::yield_now();
}

#[cfg(all(test, not(usermm_shuttle)))]
mod tests {
    use crate::sync::{
        engine_threads_starting, is_engine_thread, mark_engine_thread, mark_program_thread,
        program_thread, EngineSpawn,
    };

    /// A thread known to be the program's stays known while one of usermm's
    /// threads is starting (held here before it marks itself); the starting thread
    /// and a program thread never seen before are not. Under the old rule ("no
    /// thread of usermm's is starting") the known thread was refused too, and
    /// `usermm exec` served its allocations outside the budget.
    #[test]
    fn program_thread_is_served_while_an_engine_thread_starts() {
        std::thread::spawn(|| {
            // Other tests of this binary start Vms: declared, not seen.
            mark_program_thread();
            assert!(program_thread());
            let gate = std::sync::Arc::new(std::sync::Barrier::new(2));
            let g = gate.clone();
            let starting = std::thread::Builder::new()
                .spawn_engine(move || {
                    // Counted in `engine_threads_starting`, not marked yet.
                    let before = program_thread();
                    g.wait();
                    mark_engine_thread();
                    (before, program_thread(), is_engine_thread())
                })
                .unwrap();
            assert!(engine_threads_starting() >= 1);
            assert!(program_thread(), "a known program thread was refused");
            let unknown = std::thread::spawn(program_thread).join().unwrap();
            assert!(!unknown, "a thread never seen may be usermm's, starting");
            gate.wait();
            let (before, after, engine) = starting.join().unwrap();
            assert!(
                !before,
                "a starting thread of usermm's was taken for the program's"
            );
            assert!(!after && engine);
        })
        .join()
        .unwrap();
    }
}
