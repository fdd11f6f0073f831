//! Faults against a mapper: does `map_anon`/`unmap` on one thread slow the faults
//! of others in the same space? (issue 13 item 4, docs/design.md invariant 5)
//!
//! `cargo run --release --example spec_fault [-- SECS [MAPPER_PAUSE_US [REGIONS]]]`
//!
//! Per mode (speculative region lookup, then the locked one, forced with
//! `Config::speculative_faults(false)`), one Vm (32 MiB budget, swap file in
//! /var/tmp) and one space with:
//! - a zero-fill thread writing 8 bytes to each fresh page of a 64 GiB region
//!   (every write a zero-fill fault; reclaim pages the filled ones out);
//! - a swap-in thread reading 8 bytes of random pages of a 128 MiB region filled
//!   beforehand (4× the budget: most reads are swap-in faults);
//! - REGIONS (default 1000) one-page regions mapped beforehand, each written
//!   once, as a program's many small mappings (they make each map and unmap
//!   walk and copy that many regions under the write lock);
//! - a mapper thread that, in alternate phases of 250 ms, maps a 64 KiB region,
//!   writes its first page and unmaps it, in a loop (sleeping MAPPER_PAUSE_US
//!   between rounds, default 50: on 2 cores an unpaced mapper takes a core from
//!   the faulting threads, which is not what is measured), or sleeps.
//!
//! The phases alternate for SECS (default 8; less if the zero-fill thread has
//! filled 3/4 of the 8 GiB swap file by then) so that both conditions see the same
//! machine (other builds share its 2 cores). Printed per mode and condition:
//! faults/s of each faulting thread (zero-fill: its writes; swap-in: major faults,
//! from `Vm::stats`), their sum, the p99.9 and worst latency of one access of the
//! two threads (every zero-fill write is a fault; 3 in 4 swap-in reads are), and
//! the mapper's rounds/s; then the ratio of the sum with the mapper running to
//! without.
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::Rng;

const PS: u64 = PAGE_SIZE as u64;
const BUDGET: usize = 32 << 20;
const SWAPIN_WS: u64 = 128 << 20;
/// Swap file size, and the most pages the zero-fill thread fills (each goes to
/// swap in the end): a mode ends early when they are used up.
const SWAP: u64 = 8 << 30;
const ZERO_PAGES: u64 = 3 * (SWAP / PS) / 4;

/// Counts of one condition (mapper off = 0, on = 1).
#[derive(Default)]
struct Cond {
    zero: AtomicU64,
    reads: AtomicU64,
    major: AtomicU64,
    rounds: AtomicU64,
    /// Nanoseconds the mapper spent in map, write and unmap.
    busy: AtomicU64,
    nanos: AtomicU64,
}

/// Latencies (ns) of faults, per condition.
type Lat = std::sync::Mutex<[Vec<u32>; 2]>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args.get(1).map_or(8.0, |s| s.parse().expect("SECS"));
    let pause: u64 = args
        .get(2)
        .map_or(50, |s| s.parse().expect("MAPPER_PAUSE_US"));
    let regions: u64 = args.get(3).map_or(1000, |s| s.parse().expect("REGIONS"));
    println!(
        "spec_fault: {secs} s per mode, phases of 250 ms, mapper pause {pause} us, \
         {regions} other regions, budget {} MiB",
        BUDGET >> 20
    );
    println!(
        "{:<8} {:<7} {:>10} {:>10} {:>10} {:>9} {:>9} {:>11} {:>9}",
        "mode", "mapper", "zero/s", "swapin/s", "faults/s", "p99.9", "max", "mapper/s", "round"
    );
    let mut ratios = Vec::new();
    for spec in [true, false] {
        let (c, lat) = run(spec, secs, pause, regions);
        let mode = if spec { "spec" } else { "locked" };
        let mut sum = [0.0; 2];
        for (i, cond) in c.iter().enumerate() {
            let s = cond.nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let zero = cond.zero.load(Ordering::Relaxed) as f64 / s;
            let major = cond.major.load(Ordering::Relaxed) as f64 / s;
            sum[i] = zero + major;
            let mut l = std::mem::take(&mut lat.lock().unwrap()[i]);
            l.sort_unstable();
            let pct = |q: f64| {
                l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1)))
                    .map_or(0.0, |&n| f64::from(n) / 1e3)
            };
            println!(
                "{:<8} {:<7} {:>10.0} {:>10.0} {:>10.0} {:>7.0}us {:>7.0}us {:>11.0} {:>7.1}us",
                mode,
                if i == 0 { "off" } else { "running" },
                zero,
                major,
                sum[i],
                pct(0.999),
                pct(1.0),
                cond.rounds.load(Ordering::Relaxed) as f64 / s,
                cond.busy.load(Ordering::Relaxed) as f64
                    / 1e3
                    / cond.rounds.load(Ordering::Relaxed).max(1) as f64
            );
        }
        ratios.push((mode, sum[1] / sum[0]));
    }
    for (mode, r) in ratios {
        println!("{mode}: fault rate with the mapper running / without = {r:.3}");
    }
}

fn run(spec: bool, secs: f64, pause: u64, regions: u64) -> (Arc<[Cond; 2]>, Arc<Lat>) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let vm = Vm::new(
        Config::default()
            .memory_budget(BUDGET)
            .speculative_faults(spec),
    )
    .unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("swap"), SWAP))
        .unwrap();
    let mm = vm.new_space();
    let s = mm.map_anon(SWAPIN_WS as usize).unwrap();
    for p in 0..SWAPIN_WS / PS {
        mm.write(s.start() + p * PS, &p.to_le_bytes()).unwrap();
    }
    for _ in 0..regions {
        let r = mm.map_anon(PAGE_SIZE).unwrap();
        mm.write(r.start(), &[1]).unwrap();
    }
    let z = mm.map_anon(64 << 30).unwrap();
    let c: Arc<[Cond; 2]> = Arc::new(Default::default());
    let lat: Arc<Lat> = Arc::new(Default::default());
    // 0: mapper off, 1: running; 2: stop.
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let exhausted = Arc::new(AtomicBool::new(false));
    let zero = {
        let (mm, c, lat, phase) = (mm.clone(), c.clone(), lat.clone(), phase.clone());
        let exhausted = exhausted.clone();
        std::thread::spawn(move || {
            let mut local: [Vec<u32>; 2] = Default::default();
            let mut p = 0u64;
            loop {
                let ph = phase.load(Ordering::Relaxed);
                if ph > 1 {
                    break;
                }
                if p == ZERO_PAGES {
                    exhausted.store(true, Ordering::Relaxed);
                    break;
                }
                let t = Instant::now();
                mm.write(z.start() + p * PS, &p.to_le_bytes()).unwrap();
                local[ph].push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                if phase.load(Ordering::Relaxed) == ph {
                    c[ph].zero.fetch_add(1, Ordering::Relaxed);
                }
                p += 1;
            }
            let mut l = lat.lock().unwrap();
            for i in 0..2 {
                l[i].append(&mut local[i]);
            }
        })
    };
    let swapin = {
        let (mm, c, lat, phase) = (mm.clone(), c.clone(), lat.clone(), phase.clone());
        std::thread::spawn(move || {
            let mut local: [Vec<u32>; 2] = Default::default();
            let mut rng = Rng::new(7);
            let pages = SWAPIN_WS / PS;
            loop {
                let ph = phase.load(Ordering::Relaxed);
                if ph > 1 {
                    break;
                }
                let p = rng.below(pages);
                let t = Instant::now();
                let mut b = [0u8; 8];
                mm.read(s.start() + p * PS, &mut b).unwrap();
                local[ph].push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                assert_eq!(u64::from_le_bytes(b), p, "page {p} read wrong");
                if phase.load(Ordering::Relaxed) == ph {
                    c[ph].reads.fetch_add(1, Ordering::Relaxed);
                }
            }
            let mut l = lat.lock().unwrap();
            for i in 0..2 {
                l[i].append(&mut local[i]);
            }
        })
    };
    let mapper = {
        let (mm, c, phase, stop) = (mm.clone(), c.clone(), phase.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if phase.load(Ordering::Relaxed) != 1 {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let t = Instant::now();
                let r = mm.map_anon(64 << 10).unwrap();
                mm.write(r.start(), &[1]).unwrap();
                mm.unmap(r).unwrap();
                c[1].busy
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                c[1].rounds.fetch_add(1, Ordering::Relaxed);
                if pause > 0 {
                    std::thread::sleep(Duration::from_micros(pause));
                }
            }
        })
    };
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut ph = 0;
    while Instant::now() < end && !exhausted.load(Ordering::Relaxed) {
        phase.store(ph, Ordering::Relaxed);
        let t = Instant::now();
        let major = vm.stats().pgmajfault;
        std::thread::sleep(Duration::from_millis(250));
        // Only the swap-in thread takes major faults.
        c[ph]
            .major
            .fetch_add(vm.stats().pgmajfault - major, Ordering::Relaxed);
        c[ph]
            .nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        ph ^= 1;
    }
    phase.store(2, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    zero.join().unwrap();
    swapin.join().unwrap();
    mapper.join().unwrap();
    (c, lat)
}
