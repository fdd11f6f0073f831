//! The lock validator (feature `lockdep`, docs/design.md invariant 5) against the
//! three orderings of the seeds, planted in miniatures that run through the real
//! engine, and against a correct ordering that must report nothing.
//!
//! Each miniature is a Vm whose swap device (a file device behind a hook, the
//! "file system" of the seeds) takes a lock of the test's while it writes a page
//! out. Page-out runs on a page-I/O thread in reclaim context, so the device's lock
//! is taken under the reclaim pseudo-lock; the test's own thread takes the same
//! lock around an allocation (a first write to a page: `alloc_frame`). Neither side
//! waits for the other — the two orders are seen at different times, as lockdep
//! sees them — and the validator must still report the cycle, once, with both
//! chains. The planted locks are marked (`lockdep::plant`), so their reports are
//! expected and do not fail the run; any other report does.
//!
//! This binary also installs `lockdep::CheckedAlloc`, so every page-out and every
//! transparent fault in it is checked for heap allocation; and it drives the
//! validator's hooks directly for the other reports (a blocking wait under a spin
//! lock, reclaim recursion, AB-BA).
#![cfg(feature = "lockdep")]

mod common;

use common::vm_with_hook;
use std::panic::Location;
use std::sync::Arc;
use std::time::{Duration, Instant};
use usermm::lockdep::{self, CheckedAlloc, Report};
use usermm::sync::{Mutex, RwLock};
use usermm::{AddressSpace, Vm, PAGE_SIZE};

#[global_allocator]
static ALLOC: CheckedAlloc<std::alloc::System> = CheckedAlloc(std::alloc::System);

const PS: u64 = PAGE_SIZE as u64;

/// Writes 4× the budget so reclaim pages out (through the hook), then waits for it.
fn pressure(vm: &Vm, mm: &AddressSpace) {
    let r = mm.map_anon(256 * PAGE_SIZE).unwrap();
    for p in 0..256u64 {
        mm.write(r.start() + p * PS, &p.to_le_bytes()).unwrap();
    }
    vm.reclaim(32);
}

/// Waits (the page-I/O thread records its edge on its own time) for a report that
/// names every class in `names`.
fn wait_report(names: &[&str]) -> Report {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let s = lockdep::summary();
        if let Some(r) = s
            .list
            .iter()
            .find(|r| names.iter().all(|n| r.classes.iter().any(|c| c == n)))
        {
            return r.clone();
        }
        assert!(
            Instant::now() < end,
            "no report naming {names:?}; reports: {:#?}",
            s.list
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Seed 000 (kpiod): a writer holds its file's lock while it allocates a page
/// (`generic_file_write` → page cache), and reclaim writes dirty pages of that file
/// out through the file system, which takes the same lock. The cycle is
/// file lock → [may-reclaim] → file lock.
#[test]
fn seed_000_file_lock_held_while_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let file_lock = Arc::new(Mutex::new(()));
    lockdep::plant(&*file_lock);
    let l = file_lock.clone();
    let vm = vm_with_hook(dir.path(), move || drop(l.lock()));
    let mm = vm.new_space();
    let r = mm.map_anon(16 * PAGE_SIZE).unwrap();
    {
        let _i_mutex = file_lock.lock();
        // The first write to a page allocates a frame: a point where reclaim may run.
        mm.write(r.start(), b"data").unwrap();
    }
    pressure(&vm, &mm);
    let name = lockdep::name_of(&*file_lock);
    let rep = wait_report(&[&name, "[may-reclaim]"]);
    assert_eq!(rep.kind, "cycle", "{}", rep.text);
    assert!(rep.expected);
    // Both chains, each acquisition with its file:line: the test's allocation under
    // the file lock, and the page-out's acquisition of it under reclaim.
    assert!(rep.text.contains("tests/lockdep.rs:"), "{}", rep.text);
    assert!(rep.text.contains("src/pageio/mod.rs:"), "{}", rep.text);
    assert_eq!(rep.text.matches("->").count(), 2, "{}", rep.text);
    // Reported once, the first time the ordering was seen, not again.
    let more = lockdep::summary();
    assert_eq!(more.naming(&name).len(), 1, "{:#?}", more.list);
}

/// Seed 003 (XFS shadow buffers): a transaction commit allocates its shadow
/// buffers while it holds the commit (CIL context) lock for writing, and reclaim
/// needs that lock to push the log before it can write a page out. The cycle is
/// commit lock → [may-reclaim] → commit lock (read side: a reader waits behind a
/// writer, so it closes the cycle as well).
#[test]
fn seed_003_allocation_under_commit_lock_reclaim_needs() {
    let dir = tempfile::tempdir().unwrap();
    let commit = Arc::new(RwLock::new(0u64));
    lockdep::plant(&*commit);
    let c = commit.clone();
    let vm = vm_with_hook(dir.path(), move || {
        // Log force: the write-back waits for the commit in progress.
        let _seq = *c.read();
    });
    let mm = vm.new_space();
    let r = mm.map_anon(16 * PAGE_SIZE).unwrap();
    {
        let mut ctx = commit.write();
        // The shadow buffer, allocated under the commit lock (invariant 4 says:
        // allocate before taking it and swap it in under it).
        mm.write(r.start() + PS, b"shadow").unwrap();
        *ctx += 1;
    }
    pressure(&vm, &mm);
    let name = lockdep::name_of(&*commit);
    let rep = wait_report(&[&name, "[may-reclaim]"]);
    assert_eq!(rep.kind, "cycle", "{}", rep.text);
    assert!(rep.text.contains("tests/lockdep.rs:"), "{}", rep.text);
}

/// Seed 004 (the VMA sequence count): `move_vma` holds mmap_sem and the VMA's
/// sequence lock while it allocates a page table (vm_seq → fs_reclaim); reclaim
/// walks the file's mappings under i_mmap_rwsem (fs_reclaim → i_mmap); and
/// `unmap_mapping_range` takes the VMA's sequence lock under i_mmap (i_mmap →
/// vm_seq). Three locks, each pair in order, and still a cycle:
/// vm_seq → [may-reclaim] → i_mmap → vm_seq. (The sequence count's write side is a
/// mutex here: what matters to the order is that a writer excludes others.)
#[test]
fn seed_004_fault_path_lock_allocation_reclaim_same_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mmap_sem = Arc::new(RwLock::new(()));
    let vm_seq = Arc::new(Mutex::new(0u64));
    let i_mmap = Arc::new(RwLock::new(()));
    lockdep::plant(&*vm_seq);
    let im = i_mmap.clone();
    let vm = vm_with_hook(dir.path(), move || {
        // rmap_walk_file: reclaim looks at the file's mappings.
        let _walk = im.read();
    });
    let mm = vm.new_space();
    let r = mm.map_anon(16 * PAGE_SIZE).unwrap();
    {
        // move_vma → move_page_tables → __pte_alloc.
        let _mmap = mmap_sem.write();
        let mut seq = vm_seq.lock();
        *seq += 1;
        mm.write(r.start() + 2 * PS, b"pte").unwrap();
        *seq += 1;
    }
    {
        // unmap_mapping_range → unmap_page_range.
        let _walk = i_mmap.write();
        let _seq = vm_seq.lock();
    }
    pressure(&vm, &mm);
    let seq_name = lockdep::name_of(&*vm_seq);
    let im_name = lockdep::name_of(&*i_mmap);
    let rep = wait_report(&[&seq_name, &im_name, "[may-reclaim]"]);
    assert_eq!(rep.kind, "cycle", "{}", rep.text);
    // The new edge and the two edges of the order seen before, each with the sites
    // of both its acquisitions.
    assert_eq!(rep.text.matches("->").count(), 3, "{}", rep.text);
    assert!(!rep.classes.contains(&lockdep::name_of(&*mmap_sem)));
}

/// The same shape in a correct order: the device's lock is a leaf under reclaim,
/// never held around an allocation, and the test's outer lock is taken before
/// both. Nothing may be reported, and the run so far must hold no unexpected report.
#[test]
fn correct_ordering_reports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let outer = Arc::new(Mutex::new(()));
    let dev_lock = Arc::new(Mutex::new(0u64));
    let d = dev_lock.clone();
    let vm = vm_with_hook(dir.path(), move || *d.lock() += 1);
    let mm = vm.new_space();
    let r = mm.map_anon(16 * PAGE_SIZE).unwrap();
    {
        let _o = outer.lock();
        mm.write(r.start() + 3 * PS, b"ok").unwrap(); // outer → [may-reclaim]
        *dev_lock.lock() += 1; // outer → device lock: the same direction
    }
    pressure(&vm, &mm);
    let end = Instant::now() + Duration::from_secs(2);
    while *dev_lock.lock() < 2 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(*dev_lock.lock() >= 2, "the device was never written");
    let s = lockdep::summary();
    for l in [lockdep::name_of(&*outer), lockdep::name_of(&*dev_lock)] {
        assert!(s.naming(&l).is_empty(), "{:#?}", s.list);
    }
    assert_eq!(s.unexpected, 0, "{:#?}", s.list);
    assert!(s.edges > 0 && s.classes > 4, "{s:?}");
}

/// Page-out storms and transparent faults allocate nothing on the page-I/O threads
/// and the fault handler (this binary's allocator checks every allocation).
#[test]
fn page_io_and_fault_handler_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm_with_hook(dir.path(), || {});
    let mm = vm.new_space();
    pressure(&vm, &mm);
    let mut b = [0u8; 8];
    mm.read(mm.map_anon(PAGE_SIZE).unwrap().start(), &mut b)
        .unwrap();
    if let Some((_dir, tvm)) = common::transparent_setup(64 * PAGE_SIZE, 16 << 20) {
        let t = tvm.map_transparent(256 * PAGE_SIZE).unwrap();
        for round in 0..2u64 {
            for p in 0..256 {
                common::word(&t, p * 512)
                    .store(p as u64 ^ round, std::sync::atomic::Ordering::Relaxed);
            }
        }
        for p in 0..256 {
            assert_eq!(
                common::word(&t, p * 512).load(std::sync::atomic::Ordering::Relaxed),
                p as u64 ^ 1
            );
        }
    }
    let s = lockdep::summary();
    let allocs: Vec<_> = s.list.iter().filter(|r| r.kind == "alloc").collect();
    assert!(allocs.is_empty(), "{allocs:#?}");
}

/// A wait (condvar, device I/O) with a spin lock held is reported, naming
/// the lock, where it was taken and where the wait is.
#[test]
fn blocking_wait_under_a_spin_lock_is_reported() {
    lockdep::expect_reports_here(true);
    lockdep::acquire(
        lockdep::FRAME,
        lockdep::Kind::Spin,
        0x1000,
        false,
        Location::caller(),
    );
    lockdep::might_block("a test's wait");
    lockdep::release(0x1000);
    // A sleeping lock held across the same wait is fine.
    let m = Mutex::new(());
    let g = m.lock();
    lockdep::might_block("a test's second wait");
    drop(g);
    lockdep::expect_reports_here(false);
    let s = lockdep::summary();
    let r: Vec<_> = s.list.iter().filter(|r| r.kind == "block").collect();
    assert!(
        r.iter().any(|r| r.text.contains("a test's wait")
            && r.text.contains("frame lock")
            && r.text.contains("tests/lockdep.rs:")),
        "{r:#?}"
    );
    assert!(!r.iter().any(|r| r.text.contains("second wait")), "{r:#?}");
    assert_eq!(lockdep::held_count(), 0);
}

/// Allocating a frame in reclaim context (a page-I/O thread, a scan) is
/// reclaim recursing into itself: reported (invariant 1).
#[test]
fn frame_allocation_from_reclaim_context_is_reported() {
    lockdep::expect_reports_here(true);
    {
        let _r = lockdep::reclaim();
        lockdep::might_reclaim();
    }
    lockdep::might_reclaim(); // outside: fine
    lockdep::expect_reports_here(false);
    let s = lockdep::summary();
    assert!(
        s.list.iter().any(|r| r.kind == "reclaim-recursion"),
        "{:#?}",
        s.list
    );
    assert_eq!(lockdep::held_count(), 0);
}

/// The classic AB-BA on one thread, at different times: reported once, when
/// the second order is first seen, with both chains.
#[test]
fn ab_ba_is_reported_the_first_time_it_is_seen() {
    let a = Mutex::new(());
    let b = Mutex::new(());
    let (na, nb) = (lockdep::name_of(&a), lockdep::name_of(&b));
    lockdep::expect_reports_here(true);
    for _ in 0..3 {
        let ga = a.lock();
        let gb = b.lock();
        drop((gb, ga));
    }
    let s = lockdep::summary();
    assert!(s.naming(&na).is_empty(), "{:#?}", s.list);
    for _ in 0..3 {
        let gb = b.lock();
        let ga = a.lock();
        drop((ga, gb));
    }
    lockdep::expect_reports_here(false);
    let s = lockdep::summary();
    let r = s.naming(&na);
    assert_eq!(r.len(), 1, "{:#?}", s.list);
    assert_eq!(r[0].kind, "cycle");
    assert!(r[0].classes.contains(&nb));
    assert_eq!(r[0].text.matches("->").count(), 2, "{}", r[0].text);
}
