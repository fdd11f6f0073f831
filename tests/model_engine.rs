//! The engine's own code under the model checker (issue 13 item 5): built with
//! `RUSTFLAGS="--cfg usermm_shuttle"`, every lock, atomic and wait of the engine is
//! shuttle's (`usermm::sync`), and these tests run the real fault, unmap, swapoff,
//! reclaim and page-out paths from shuttle threads through the public API, over
//! many schedules, with a real swap device (a file in /dev/shm). After each
//! schedule they check what the program sees (every page reads what was last
//! written to it) and the engine's bookkeeping (`usermm::model::check`: entries,
//! frames, slot counts, devices).
//!
//! - `swapoff_races_swapin_and_reclaim`: a thread faults swapped pages back in and
//!   writes them, a second reads them in the other order, another takes their
//!   device out of service (`Vm::swapoff`), a fourth reclaims (pages go to the
//!   second device); the page-I/O loop runs on a fifth.
//! - `speculative_fault_races_unmap`: faults through the speculative region lookup
//!   (`mm::lookup`, the region's sequence count) race `unmap` of their region
//!   (zero-fill, resident and, with a swap device, swap-in).
//! - `speculative_fault_races_fork`: a speculative zero-fill fault and a hit-path
//!   write race `fork` of their space; afterwards the two spaces stay separate.
//!
//! Each has a planted twin: exactly one change in the engine, switched on for that
//! test only (`usermm::model::session`, see `sync::plant`), which the checker must
//! catch with the message of the invariant the bug breaks. Without the cfg this
//! file is empty; CI runs it with the cfg (.ci/run).
#![cfg(usermm_shuttle)]

use shuttle::scheduler::{PctScheduler, RandomScheduler, Scheduler};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use usermm::model::{self, Plant};
use usermm::{Config, Error, SwapSpec, VAddr, Vm, PAGE_SIZE};

/// Pages of the model's region.
const PAGES: usize = 3;

/// A Vm small enough to check after every schedule: 16 frames, a few page-out
/// requests, no background threads (none start under the cfg).
fn small_vm() -> Vm {
    Vm::new(
        Config::default()
            .memory_budget(16 * PAGE_SIZE)
            .io_threads(1)
            .io_requests(4)
            .max_files(1),
    )
    .expect("vm")
}

/// Swap files for one test: a directory in /dev/shm (removed with the test), and a
/// new file name per device (a device holds an exclusive lock on its file, and a
/// schedule that failed may not have closed its own).
struct Files {
    dir: tempfile::TempDir,
    next: AtomicUsize,
}

impl Files {
    fn new() -> Arc<Files> {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        Arc::new(Files {
            dir: tempfile::Builder::new()
                .prefix("usermm-model")
                .tempdir_in(base)
                .expect("temp dir"),
            next: AtomicUsize::new(0),
        })
    }
    /// A swap device of `slots` pages at priority `prio`, buffered (tmpfs may refuse
    /// O_DIRECT).
    fn swap(&self, slots: usize, prio: i32) -> SwapSpec {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("{n}.swap"));
        SwapSpec::parse(&format!(
            "file:{}?size={}&prio={prio}&direct=0",
            path.display(),
            slots * PAGE_SIZE
        ))
        .expect("spec")
    }
    /// Removes the files of finished schedules (called at the start of each).
    fn sweep(&self) {
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Runs `f` under `scheduler` with stacks large enough for the engine's paths.
fn run(scheduler: impl Scheduler + 'static, f: impl Fn() + Send + Sync + 'static) {
    let mut cfg = shuttle::Config::new();
    cfg.stack_size = 1 << 20;
    cfg.silence_warnings = true;
    shuttle::Runner::new(scheduler, cfg).run(f);
}

/// Runs `f` with bug `p` planted and returns the checker's failure message; fails
/// if the checker found nothing.
fn planted_failure(p: Plant, what: &str, f: impl FnOnce()) -> String {
    let _s = model::session(p);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let msg = match r {
        Ok(()) => panic!("the model checker missed the planted bug: {what}"),
        Err(e) => e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    };
    eprintln!("planted bug ({what}) caught: {msg}");
    msg
}

fn page(r: &usermm::Region, i: usize) -> VAddr {
    r.start() + (i * PAGE_SIZE) as u64
}

/// The value page `i` holds before the race, and the one the faulting thread
/// writes during it.
fn old(i: usize) -> [u8; 8] {
    [0x10 + i as u8; 8]
}
fn new(i: usize) -> [u8; 8] {
    [0x80 + i as u8; 8]
}

/// Model 1: swap-in faults and writes, swapoff of the device the pages are on, and
/// reclaim to the other device, at once.
fn swapoff_model(files: &Files) {
    files.sweep();
    let vm = small_vm();
    // The pages go to `a` first (higher priority); `b` takes what reclaim pushes
    // out while `a` drains.
    let a = vm.swapon(files.swap(8, 10)).expect("swapon a");
    vm.swapon(files.swap(8, 0)).expect("swapon b");
    let mm = vm.new_space();
    let r = mm.map_anon(PAGES * PAGE_SIZE).expect("map");
    for i in 0..PAGES {
        mm.write(page(&r, i), &old(i)).expect("write");
    }
    let io = model::start_pageio(&vm);
    assert_eq!(vm.reclaim(PAGES), PAGES, "setup: every page paged out");
    let on_a = vm.swaps().iter().find(|s| s.id == a).map(|s| s.used);
    assert_eq!(on_a, Some((PAGES * PAGE_SIZE) as u64), "setup: pages on a");

    let faulter = {
        let mm = mm.clone();
        shuttle::thread::spawn(move || {
            for i in 0..PAGES {
                let mut b = [0u8; 8];
                mm.read(page(&r, i), &mut b).expect("read during swapoff");
                assert_eq!(b, old(i), "page {i} read a value it never held");
                mm.write(page(&r, i), &new(i))
                    .expect("write during swapoff");
            }
        })
    };
    // A second faulting thread on the same pages, in the other order: a page one
    // of them is reading in is `BUSY` for the other, which waits for that one read
    // (the claim is the swap cache) and then sees the page as it was or as the
    // first thread wrote it.
    let reader = {
        let mm = mm.clone();
        shuttle::thread::spawn(move || {
            for i in (0..PAGES).rev() {
                let mut b = [0u8; 8];
                mm.read(page(&r, i), &mut b).expect("read during swapoff");
                assert!(
                    b == old(i) || b == new(i),
                    "page {i} read a value it never held: {b:?}"
                );
            }
        })
    };
    let remover = {
        let vm = vm.clone();
        shuttle::thread::spawn(move || vm.swapoff(a))
    };
    // This thread reclaims meanwhile: resident pages go to `b` (or stay).
    vm.reclaim(1);
    faulter.join().expect("faulter");
    reader.join().expect("reader");
    remover.join().expect("swapoff thread").expect("swapoff");
    io.stop();

    assert!(
        vm.swaps().iter().all(|s| s.id != a),
        "swapoff left its device in service"
    );
    if let Err(e) = model::check(&vm, &[&mm], r.start().0..r.end().0) {
        panic!("after swapoff: {e}");
    }
    for i in 0..PAGES {
        let mut b = [0u8; 8];
        mm.read(page(&r, i), &mut b).expect("read after swapoff");
        assert_eq!(b, new(i), "page {i} lost its last write");
    }
}

#[test]
fn swapoff_races_swapin_and_reclaim() {
    let _s = model::session(Plant::None);
    let files = Files::new();
    let f = files.clone();
    // PCT finds the overlaps here (a fault waiting on the other's claim, swapoff's
    // claim failing because a fault took the entry first) far more often than
    // uniform random choice, which rarely has two threads on one page at once.
    run(RandomScheduler::new(500), move || swapoff_model(&f));
    let f = files.clone();
    run(PctScheduler::new(3, 3000), move || swapoff_model(&f));
}

#[test]
fn planted_swapoff_claim_by_store_is_caught() {
    let files = Files::new();
    // The failing schedule's threads are abandoned with what they hold (shuttle
    // does not unwind them), the files among it: remove them by path.
    let dir = files.dir.path().to_owned();
    let msg = planted_failure(
        Plant::SwapoffClaimsByStore,
        "swapoff claims the entry by a store",
        || {
            let f = files.clone();
            run(PctScheduler::new(3, 2000), move || swapoff_model(&f));
        },
    );
    // Not claiming by value, swapoff overwrites whatever the entry held by then,
    // and which symptom shows first depends on the schedule: a page the fault
    // installed loses its only mapping (its frame leaks), a slot on the other
    // device that reclaim moved the page to loses a reference (its count no longer
    // matches), or a page-out completion finds the entry of the frame it holds
    // locked replaced (the engine's own assertion in `reclaim::lock_mappings`), or
    // an entry still names the device after swapoff removed it (the fault that
    // reads it fails).
    let _ = std::fs::remove_dir_all(&dir);
    let broken = [
        "frame leaked",
        "slot count mismatch",
        "mapping moved",
        "no such swap device",
    ];
    assert!(
        broken.iter().any(|b| msg.contains(b)),
        "unexpected failure: {msg}"
    );
}

/// Model 2: faults through the speculative lookup race unmap of their region: a
/// write to a page never touched (a zero-fill claim), a read of a resident page,
/// and, with `swapped`, a read of a page on swap (a swap-in claim). Each access
/// either completes on the region as it was or gets `BadAddress`; afterwards no
/// entry is left in the range, no frame or slot is left behind.
fn unmap_model(files: Option<&Files>) {
    let vm = small_vm();
    let io = files.map(|f| {
        f.sweep();
        vm.swapon(f.swap(4, 0)).expect("swapon");
        model::start_pageio(&vm)
    });
    let mm = vm.new_space();
    let r = mm.map_anon(3 * PAGE_SIZE).expect("map");
    // Page 0 never touched; pages 1 and 2 written (page 2 then paged out, with
    // swap).
    mm.write(page(&r, 1), &old(1)).expect("write");
    mm.write(page(&r, 2), &old(2)).expect("write");
    if files.is_some() {
        // Page 1 was used more recently; one page out is enough for the model.
        let _ = vm.reclaim(2);
        mm.read(page(&r, 1), &mut [0u8; 8]).expect("touch");
        assert_eq!(model::frames_in_use(&vm), 1, "setup: page 2 on swap");
    }
    let faulter = {
        let mm = mm.clone();
        shuttle::thread::spawn(move || {
            match mm.write(page(&r, 0), &new(0)) {
                Ok(()) | Err(Error::BadAddress { .. }) => {}
                Err(e) => panic!("a write racing unmap failed with {e}"),
            }
            for i in [2, 1] {
                let mut b = [0u8; 8];
                match mm.read(page(&r, i), &mut b) {
                    Ok(()) => assert_eq!(b, old(i), "read a page that was not its own"),
                    Err(Error::BadAddress { .. }) => {}
                    Err(e) => panic!("a read racing unmap failed with {e}"),
                }
            }
        })
    };
    mm.unmap(r).expect("unmap");
    faulter.join().expect("faulter");
    if let Some(io) = io {
        io.stop();
    }
    if let Err(e) = model::check(&vm, &[&mm], r.start().0..r.end().0) {
        panic!("after unmap: {e}");
    }
    assert_eq!(
        model::frames_in_use(&vm),
        0,
        "frames still in use after the region was unmapped"
    );
    for s in vm.swaps() {
        assert_eq!(
            s.used, 0,
            "swap slots still in use after the region was unmapped"
        );
    }
}

/// Model 2, fork: a speculative zero-fill fault and a hit-path write race a fork
/// of their space. The parent keeps both writes; the child sees each page as it
/// was or as written (the fork is a snapshot at some instant), and the entries
/// the two tables share add up.
fn fork_model() {
    let vm = small_vm();
    let mm = vm.new_space();
    let r = mm.map_anon(2 * PAGE_SIZE).expect("map");
    mm.write(page(&r, 1), &old(1)).expect("write");
    let faulter = {
        let mm = mm.clone();
        shuttle::thread::spawn(move || {
            mm.write(page(&r, 0), &new(0)).expect("write racing fork");
            mm.write(page(&r, 1), &new(1)).expect("write racing fork");
        })
    };
    let child = mm.fork().expect("fork");
    faulter.join().expect("faulter");
    if let Err(e) = model::check(&vm, &[&mm, &child], r.start().0..r.end().0) {
        panic!("after fork: {e}");
    }
    let read = |s: &usermm::AddressSpace, i: usize| {
        let mut b = [0u8; 8];
        s.read(page(&r, i), &mut b).expect("read after fork");
        b
    };
    assert_eq!(
        read(&mm, 0),
        new(0),
        "the parent lost a write made during fork"
    );
    assert_eq!(
        read(&mm, 1),
        new(1),
        "the parent lost a write made during fork"
    );
    let c0 = read(&child, 0);
    let c1 = read(&child, 1);
    assert!(c0 == [0; 8] || c0 == new(0), "child page 0 reads {c0:?}");
    assert!(c1 == old(1) || c1 == new(1), "child page 1 reads {c1:?}");
    // The writes are in order: a child that has the second has the first.
    assert!(
        c1 == old(1) || c0 == new(0),
        "the fork saw the writes out of order"
    );
    // From now on the two are separate: writes on either side stay there (each
    // breaks copy-on-write or unshares a leaf the race may have left shared).
    for i in 0..2 {
        mm.write(page(&r, i), &[0xee; 8]).expect("parent write");
    }
    child.write(page(&r, 1), &[0xcc; 8]).expect("child write");
    assert_eq!(
        read(&child, 0),
        c0,
        "a parent's write after fork reached the child"
    );
    assert_eq!(read(&child, 1), [0xcc; 8], "the child lost its own write");
    assert_eq!(
        read(&mm, 1),
        [0xee; 8],
        "a child's write reached the parent"
    );
    if let Err(e) = model::check(&vm, &[&mm, &child], r.start().0..r.end().0) {
        panic!("after writes on both sides of the fork: {e}");
    }
    drop(child);
    drop(mm);
    assert_eq!(
        model::frames_in_use(&vm),
        0,
        "frames left after both spaces went"
    );
}

#[test]
fn speculative_fault_races_unmap() {
    let _s = model::session(Plant::None);
    run(RandomScheduler::new(1000), || unmap_model(None));
    run(PctScheduler::new(3, 1000), || unmap_model(None));
    let files = Files::new();
    let f = files.clone();
    run(RandomScheduler::new(500), move || unmap_model(Some(&f)));
    let f = files.clone();
    run(PctScheduler::new(3, 500), move || unmap_model(Some(&f)));
}

#[test]
fn speculative_fault_races_fork() {
    let _s = model::session(Plant::None);
    run(RandomScheduler::new(1000), fork_model);
    run(PctScheduler::new(3, 1000), fork_model);
}

#[test]
fn planted_unmap_keeps_count_even_is_caught() {
    let msg = planted_failure(
        Plant::UnmapKeepsCountEven,
        "unmap leaves the region's count even",
        || run(PctScheduler::new(3, 2000), || unmap_model(None)),
    );
    assert!(
        msg.contains("entry outside any mapped region"),
        "unexpected failure: {msg}"
    );
}
