//! Swap-in readahead (issue 10 item 3): a sequential scan over swapped pages reads
//! most pages ahead of their faults (and every page is right), and so do a
//! backward scan and a strided one whose pages were written in its order; random
//! access reads
//! nothing ahead (at most 2 % of its reads); a device being removed gets none
//! (invariant 3); `Config::readahead(false)` turns it off.

mod common;

use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::Rng;

const PS: u64 = PAGE_SIZE as u64;

fn setup(
    readahead: bool,
) -> (
    tempfile::TempDir,
    Vm,
    usermm::AddressSpace,
    usermm::Region,
    u64,
) {
    let dir = tempfile::tempdir().unwrap();
    let frames = 1024u64;
    let pages = 4 * frames;
    let vm = Vm::new(
        Config::default()
            .memory_budget((frames * PS) as usize)
            .readahead(readahead),
    )
    .unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("swap"), pages * 2 * PS))
        .unwrap();
    let mm = vm.new_space();
    let r = usermm_testkit::pattern::map_numbered(&mm, pages).unwrap();
    (dir, vm, mm, r, pages)
}

fn scan(mm: &usermm::AddressSpace, r: &usermm::Region, order: impl Iterator<Item = u64>) {
    let mut b = [0u8; 8];
    for p in order {
        mm.read(r.start() + p * PS, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), p, "page {p}");
    }
}

/// Scans in `order` (checking every page), prints and returns the pages read from
/// swap and how many of them came in ahead of their fault.
fn measured_scan(
    what: &str,
    vm: &Vm,
    mm: &usermm::AddressSpace,
    r: &usermm::Region,
    order: impl Iterator<Item = u64>,
) -> (u64, u64) {
    let s0 = vm.stats();
    scan(mm, r, order);
    let s1 = vm.stats();
    let (reads, ahead) = (s1.pswpin - s0.pswpin, s1.read_around - s0.read_around);
    println!(
        "{what}: {reads} reads, {ahead} ahead, {} faults",
        s1.pgmajfault - s0.pgmajfault
    );
    (reads, ahead)
}

/// A scan that swaps most of the pages in and reads at least a quarter of them
/// ahead.
fn read_ahead_scan(
    what: &str,
    vm: &Vm,
    mm: &usermm::AddressSpace,
    r: &usermm::Region,
    pages: u64,
    order: impl Iterator<Item = u64>,
) {
    let (reads, ahead) = measured_scan(what, vm, mm, r, order);
    assert!(
        reads > pages / 2,
        "{what}: most pages should swap in: {reads}"
    );
    assert!(ahead * 4 > reads, "{what}: {ahead} of {reads} ahead");
}

#[test]
fn a_sequential_scan_is_read_ahead_and_random_access_is_not() {
    let (_d, vm, mm, r, pages) = setup(true);
    // About 95 % here (see `fault::claim_ahead`).
    read_ahead_scan("sequential", &vm, &mm, &r, pages, 0..pages);
    let mut rng = Rng::new(3);
    let order = (0..pages).map(|_| rng.below(pages));
    let (reads, ahead) = measured_scan("uniform", &vm, &mm, &r, order);
    assert!(reads > pages / 4, "{reads}");
    assert!(
        ahead * 50 <= reads,
        "random access read ahead {ahead} of {reads}"
    );
}

/// Pages `0, s, 2s, …`, then `1, 1 + s, …`: a stride-`s` scan of `pages`.
fn strided(pages: u64, s: u64) -> impl Iterator<Item = u64> {
    (0..s).flat_map(move |j| (j..pages).step_by(s as usize))
}

#[test]
fn strided_and_backward_scans_are_read_ahead_when_their_slots_follow_them() {
    let (_d, vm, mm, r, pages) = setup(true);
    // Backwards over pages written (and evicted) in address order: the span of
    // slots lies before the faulting page's.
    read_ahead_scan("backwards", &vm, &mm, &r, pages, (0..pages).rev());
    // Stride 16 over pages in address order: their slots are 16 apart, so only a
    // device that keeps scattered reads in flight at once (io_uring on a local
    // file) reads them ahead.
    if common::has_uring(&vm, "scattered readahead") {
        let order = strided(pages, 16);
        read_ahead_scan("stride 16, address order", &vm, &mm, &r, pages, order);
    }
    // Rewritten in a stride-16 order, the pages are evicted (and their new copies
    // written) in that order; a strided read scan then finds them together.
    for p in strided(pages, 16) {
        mm.write(r.start() + p * PS, &p.to_le_bytes()).unwrap();
    }
    let order = strided(pages, 16);
    read_ahead_scan("stride 16, stride order", &vm, &mm, &r, pages, order);
}

/// A scan through swapped pages with resident ones among them (pages reclaim kept,
/// every eighth here) is still read ahead: a resident page is passed over, not the
/// end of the window, and a fault past it continues the scan's run. (Each one
/// restarted the window at 4 pages: the bench's sequential cell faulted on 12-18 %
/// of its accesses instead of 3 %.)
#[test]
fn resident_pages_along_a_scan_do_not_stop_readahead() {
    // CLOCK, so that the first quarter surely leaves memory (the frequency policy
    // keeps some of it, the pages it saw twice).
    let dir = tempfile::tempdir().unwrap();
    let pages = 4096u64;
    let vm = Vm::new(
        Config::default()
            .memory_budget((pages / 4 * PS) as usize)
            .policy(usermm::Policy::Clock),
    )
    .unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("swap"), pages * 2 * PS))
        .unwrap();
    let mm = vm.new_space();
    let r = usermm_testkit::pattern::map_numbered(&mm, pages).unwrap();
    // Everything through swap once; the last quarter stays resident.
    scan(&mm, &r, 0..pages);
    let part = pages / 4;
    // Islands: every eighth page of the first quarter, brought back in.
    scan(&mm, &r, (0..part).step_by(8));
    let s = vm.stats();
    let (reads, ahead) = measured_scan("islands", &vm, &mm, &r, 0..part);
    let faults = vm.stats().pgmajfault - s.pgmajfault;
    assert!(reads >= part / 2, "{reads} of {part} read back");
    assert!(
        faults * 8 <= reads,
        "{faults} faults for {reads} pages read ({ahead} ahead)"
    );
}

#[test]
fn readahead_off_reads_nothing_ahead_and_a_scan_racing_swapoff_reads_right() {
    let (_d, vm, mm, r, pages) = setup(false);
    let s0 = vm.stats();
    scan(&mm, &r, 0..pages);
    assert_eq!(vm.stats().read_around, s0.read_around);
    // On: a swapoff running during the scan brings everything back itself; the
    // scan reads correct bytes and reads nothing ahead from the draining device
    // (each page the scan faults is either resident or read alone).
    let (d2, vm2, mm2, r2, pages2) = setup(true);
    let id = vm2.swaps()[0].id;
    // A second device, so the drained pages (and the scan's evictions) have room.
    vm2.swapon(SwapSpec::file(d2.path().join("swap2"), pages2 * 2 * PS))
        .unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = vm2.swapoff(id);
        });
        scan(&mm2, &r2, 0..pages2);
    });
    scan(&mm2, &r2, 0..pages2);
    drop((mm, r, vm));
}

/// A readahead read that fails never fails the demand read it rode on: its pages
/// go back to swap and the faulting page is read alone. (A mirror whose surviving
/// leg did not hold a free slot in the middle of a span failed the whole span, and
/// with it the access.) Here the device fails every read of more than one page.
#[test]
fn a_failed_readahead_read_does_not_fail_the_access() {
    let dir = tempfile::tempdir().unwrap();
    let frames = 1024u64;
    let pages = 4 * frames;
    let vm = Vm::new(Config::default().memory_budget((frames * PS) as usize)).unwrap();
    let (faulty, _) = common::faulty_swap(&vm, dir.path(), "swap", pages * 2 * PS);
    let mm = vm.new_space();
    let r = usermm_testkit::pattern::map_numbered(&mm, pages).unwrap();
    faulty.set_fail_span_reads(true);
    let s0 = vm.stats();
    for p in 0..pages {
        let mut b = [0u8; 8];
        mm.read(r.start() + p * PS, &mut b)
            .unwrap_or_else(|e| panic!("page {p}: {e}"));
        assert_eq!(u64::from_le_bytes(b), p, "page {p}");
    }
    let s1 = vm.stats();
    let spans = faulty
        .injected_read_errors
        .load(std::sync::atomic::Ordering::SeqCst);
    println!(
        "{spans} span reads failed; {} pages read, {} ahead, {} read errors",
        s1.pswpin - s0.pswpin,
        s1.read_around - s0.read_around,
        s1.read_errors - s0.read_errors
    );
    assert!(
        spans > 10,
        "the scan should have tried readahead spans: {spans}"
    );
    assert_eq!(s1.read_around, s0.read_around, "nothing came in ahead");
    assert_eq!(s1.read_errors, s0.read_errors, "no access saw an error");
}
