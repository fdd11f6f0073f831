//! `TransparentRegion::discard`: pages of a transparent region given back (frame to
//! the budget, slot to its device) while the region lives, reading as zeros after;
//! what `usermm exec`'s heap does with freed and unmapped memory.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use usermm::{TransparentRegion, Vm, PAGE_SIZE};

mod common;
use common::{transparent_setup as setup, word};

const PS: usize = PAGE_SIZE;

/// Writes two words (first and last) of every page in `pages`.
fn fill(r: &TransparentRegion, pages: std::ops::Range<usize>, salt: u64) {
    for p in pages {
        word(r, p * PS / 8).store((p as u64) << 8 | salt, Ordering::Relaxed);
        word(r, (p + 1) * PS / 8 - 1).store(!((p as u64) << 8 | salt), Ordering::Relaxed);
    }
}

fn check(r: &TransparentRegion, pages: std::ops::Range<usize>, salt: u64) {
    for p in pages {
        assert_eq!(
            word(r, p * PS / 8).load(Ordering::Relaxed),
            (p as u64) << 8 | salt,
            "page {p}"
        );
        assert_eq!(
            word(r, (p + 1) * PS / 8 - 1).load(Ordering::Relaxed),
            !((p as u64) << 8 | salt),
            "page {p} (last word)"
        );
    }
}

fn swap_used(vm: &Vm) -> u64 {
    vm.stats().swap_used.iter().map(|&(_, u)| u).sum()
}

/// 16 MiB written under a 2 MiB budget (most of it on swap); discarding the middle
/// gives its slots back and leaves the rest intact; the discarded pages read as
/// zeros. Discarding everything returns every frame and every slot while the region
/// still exists.
#[test]
fn discard_frees_frames_and_slots_and_reads_zero() {
    let Some((_d, vm)) = setup(2 << 20, 64 << 20) else {
        return;
    };
    let pages = (16 << 20) / PS;
    let r = vm.map_transparent(pages * PS).unwrap();
    fill(&r, 0..pages, 1);
    check(&r, 0..pages, 1);
    let out_before = vm.transparent_pages_out();
    let used_before = swap_used(&vm);
    assert!(out_before > 0, "nothing went to swap: {:?}", vm.stats());
    assert!(used_before > 0);

    // The middle half: most of it is on swap.
    let (lo, hi) = (pages / 4, 3 * pages / 4);
    r.discard(lo * PS, (hi - lo) * PS).unwrap();
    let out_after = vm.transparent_pages_out();
    assert!(
        out_after < out_before,
        "evicted pages did not go: {out_before} -> {out_after}"
    );
    let used_after = swap_used(&vm);
    assert!(
        used_after < used_before,
        "swap use did not go down: {used_before} -> {used_after}"
    );
    check(&r, 0..lo, 1);
    check(&r, hi..pages, 1);

    // Everything: no frame and no slot is held any more (page-outs in flight
    // finish and give their slots back), with the region still mapped.
    r.discard(0, pages * PS).unwrap();
    assert_eq!(vm.transparent_pages_out(), 0);
    usermm_testkit::check::wait_no_leak(&vm, Duration::from_secs(10)).unwrap();
    // Reads as zeros (each read takes a frame again, for the zero page).
    for p in (0..pages).step_by(7) {
        assert_eq!(word(&r, p * PS / 8).load(Ordering::Relaxed), 0, "page {p}");
        assert_eq!(word(&r, (p + 1) * PS / 8 - 1).load(Ordering::Relaxed), 0);
    }
    // Usable again.
    fill(&r, 0..pages, 2);
    check(&r, 0..pages, 2);
    drop(r);
    usermm_testkit::check::wait_no_leak(&vm, Duration::from_secs(10)).unwrap();
}

/// Bad ranges are refused and change nothing.
#[test]
fn discard_rejects_unaligned_and_out_of_range() {
    let Some((_d, vm)) = setup(1 << 20, 16 << 20) else {
        return;
    };
    let r = vm.map_transparent(4 * PS).unwrap();
    word(&r, 0).store(9, Ordering::Relaxed);
    assert!(r.discard(1, PS).is_err());
    assert!(r.discard(0, PS + 1).is_err());
    assert!(r.discard(0, 5 * PS).is_err());
    assert!(r.discard(usize::MAX - PS + 1, PS).is_err());
    assert_eq!(word(&r, 0).load(Ordering::Relaxed), 9);
    r.discard(0, 0).unwrap();
    assert_eq!(word(&r, 0).load(Ordering::Relaxed), 9);
}

/// Discard races reclaim and the fault handler: 4 threads each write their own
/// pages and discard them again, 20 rounds, under a budget of 1/8 of what they
/// write, while reclaim evicts and pages out. After each discard the pages read as
/// zeros; at the end, with the region discarded, nothing is held.
#[test]
fn discard_races_reclaim_and_faults() {
    let Some((_d, vm)) = setup(1 << 20, 64 << 20) else {
        return;
    };
    let threads = 4;
    let per = (2 << 20) / PS; // 2 MiB each, 8 MiB in all under 1 MiB
    let r = Arc::new(vm.map_transparent(threads * per * PS).unwrap());
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                let pages = t * per..(t + 1) * per;
                for round in 0..20u64 {
                    fill(&r, pages.clone(), round + 1);
                    check(&r, pages.clone(), round + 1);
                    // Half the time only the second half, so discarded and kept
                    // pages sit side by side.
                    let from = if round % 2 == 0 {
                        pages.start
                    } else {
                        pages.start + per / 2
                    };
                    r.discard(from * PS, (pages.end - from) * PS).unwrap();
                    for p in from..pages.end {
                        assert_eq!(
                            word(&r, p * PS / 8).load(Ordering::Relaxed),
                            0,
                            "thread {t} round {round} page {p}"
                        );
                    }
                    check(&r, pages.start..from, round + 1);
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert!(vm.stats().pswpout > 0, "no pressure: {:?}", vm.stats());
    r.discard(0, r.len()).unwrap();
    usermm_testkit::check::wait_no_leak(&vm, Duration::from_secs(10)).unwrap();
}
