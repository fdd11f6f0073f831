//! What a swap-in fault costs beyond the device's own read (issue 10 item 2): one
//! thread reads random words of a working set 4× the budget (readahead off, so
//! every miss is one 4 KiB read at depth 1), and between batches of those accesses
//! reads random slots of the same swap file itself with O_DIRECT, both ways a read
//! can wait: `pread` (the thread sleeps until the interrupt wakes it) and one
//! io_uring read whose completion the thread polls for (as the fault's own read
//! does, `Config::read_poll`), so all see the same machine. Prints the p50/p90 of
//! a faulting access and of each kind of device read, what usermm adds to the read
//! it makes (polled unless `poll-µs` is 0), and the mean time of each step of the
//! fault (`Config::fault_timing`).
//!
//! With a write share (the fourth argument, 0 to 1) that share of the accesses
//! writes its word back (the same value), so evicted pages are dirty and every
//! such eviction is a page-out: the steps then show whether a fault waits for a
//! frame (page-out behind it) and how much slower its read is beside the writes.
//!
//! `cargo run --release --example fault_cost -- [budget-MiB] [dir] [poll-µs] [write-share]`

use io_uring::{opcode, types, IoUring};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};
use usermm::stats::FAULT_STEPS;
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::Rng;

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p) as usize] as f64 / 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let dir = tempfile::tempdir_in(args.get(2).map_or("/var/tmp", |s| s.as_str())).unwrap();
    let poll_us: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(200);
    let write_share: f64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    // Accesses whose draw is below this write (out of 2^20).
    let write_below = (write_share.clamp(0.0, 1.0) * f64::from(1u32 << 20)) as u64;
    let pages = 4 * (mib << 20) as u64 / PAGE_SIZE as u64;
    let swap = dir.path().join("swap");
    let vm = Vm::new(
        Config::default()
            .memory_budget(mib << 20)
            .readahead(false)
            .read_poll(Duration::from_micros(poll_us))
            .fault_timing(true),
    )
    .unwrap();
    vm.swapon(SwapSpec::file(&swap, pages * 2 * PAGE_SIZE as u64))
        .unwrap();
    let mm = vm.new_space();
    let r = usermm_testkit::pattern::map_numbered(&mm, pages).unwrap();
    // The same file, read directly (the device's own latency).
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&swap)
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(PAGE_SIZE, PAGE_SIZE).unwrap();
    // SAFETY: a page-sized, page-aligned allocation, freed at the end.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    // SAFETY: `buf` is PAGE_SIZE bytes, ours until the dealloc below.
    let page = unsafe { std::slice::from_raw_parts_mut(buf, PAGE_SIZE) };
    // Slots are handed out from the start of the file: the first half of the
    // working set's worth holds written pages (an unwritten block would read as
    // zeros without I/O).
    let slots = pages / 2;
    let mut rng = Rng::new(7);
    let (mut faults, mut reads, mut polled) = (Vec::new(), Vec::new(), Vec::new());
    let mut ring = IoUring::new(4).unwrap();
    let t0 = vm.fault_timing().unwrap();
    let start = Instant::now();
    while faults.len() < 40_000 && start.elapsed().as_secs() < 60 {
        for _ in 0..500 {
            let p = rng.below(pages);
            let mut w = [0u8; 8];
            let maj = vm.stats().pgmajfault;
            let t = Instant::now();
            mm.read(r.start() + p * PAGE_SIZE as u64, &mut w).unwrap();
            let ns = t.elapsed().as_nanos() as u64;
            assert_eq!(u64::from_le_bytes(w), p, "page {p}");
            if write_below > 0 && rng.below(1 << 20) < write_below {
                // Dirties the page (same bytes): its eviction is a page-out.
                mm.write(r.start() + p * PAGE_SIZE as u64, &w).unwrap();
            }
            if vm.stats().pgmajfault != maj {
                faults.push(ns);
            }
        }
        for _ in 0..200 {
            let s = rng.below(slots);
            let t = Instant::now();
            raw.read_exact_at(page, s * PAGE_SIZE as u64).unwrap();
            reads.push(t.elapsed().as_nanos() as u64);
        }
        for _ in 0..200 {
            let s = rng.below(slots);
            let t = Instant::now();
            let e = opcode::Read::new(types::Fd(raw.as_raw_fd()), buf, PAGE_SIZE as u32)
                .offset(s * PAGE_SIZE as u64)
                .build();
            // SAFETY: `buf` outlives the read: we wait for its completion below.
            unsafe { ring.submission().push(&e).unwrap() };
            ring.submit().unwrap();
            let c = loop {
                if let Some(c) = ring.completion().next() {
                    break c;
                }
                std::hint::spin_loop();
            };
            assert_eq!(c.result(), PAGE_SIZE as i32);
            polled.push(t.elapsed().as_nanos() as u64);
        }
    }
    let t1 = vm.fault_timing().unwrap();
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    let (f50, f90) = (pct(&mut faults, 0.5), pct(&mut faults, 0.9));
    let (d50, d90) = (pct(&mut reads, 0.5), pct(&mut reads, 0.9));
    let (q50, q90) = (pct(&mut polled, 0.5), pct(&mut polled, 0.9));
    println!(
        "budget {mib} MiB, W = {} MiB, 1 thread, readahead off, {:.0} % of accesses write: {} faulting accesses, {} device reads",
        (pages * PAGE_SIZE as u64) >> 20,
        write_share * 100.0,
        faults.len(),
        reads.len()
    );
    println!("faulting access: p50 {f50:.1} µs  p90 {f90:.1} µs");
    println!("device read, pread (slept):  p50 {d50:.1} µs  p90 {d90:.1} µs");
    println!("device read, polled:         p50 {q50:.1} µs  p90 {q90:.1} µs");
    let (b50, b90, how) = if poll_us > 0 {
        (q50, q90, "polled, as its own")
    } else {
        (d50, d90, "slept, as its own")
    };
    println!(
        "usermm adds to a read {how}: p50 {:.1} µs  p90 {:.1} µs",
        f50 - b50,
        f90 - b90
    );
    let n = t1.0 - t0.0;
    println!("steps of the {n} swap-in faults (mean µs):");
    for (i, name) in FAULT_STEPS.iter().enumerate() {
        // Means over both snapshots' totals: (t1 * n1 - t0 * n0) / n.
        let total = t1.1[i] * t1.0 as f64 - t0.1[i] * t0.0 as f64;
        println!("  {name:<38} {:>8.2}", total / n.max(1) as f64 / 1000.0);
    }
}
