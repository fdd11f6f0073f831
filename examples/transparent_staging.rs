//! What staging costs transparent memory (`config::DEFAULT_STAGE_EVERY`): one thread reads
//! random words of a transparent region `W/B` times the 64 MiB budget, drawn from a
//! pattern, and prints accesses/s with major faults, pages staged and staged pages
//! touched again (each a userfaultfd round trip without I/O) per access.
//!
//! `cargo run --release --example transparent_staging -- [W/B] [seconds] [pattern] [every]`
//! (defaults 1.25, 3, uniform, the library's `config::DEFAULT_STAGE_EVERY`; patterns as `usermm
//! bench --patterns`; needs /dev/userfaultfd).
use std::time::{Duration, Instant};
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::{Pattern, Rng, Sampler};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let wb: f64 = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(1.25);
    let secs: u64 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let name = a.get(3).map_or("uniform", |s| s.as_str());
    let pattern = Pattern::parse(name).unwrap_or_else(|e| panic!("pattern {name:?}: {e}"));
    let mut cfg = Config::default().memory_budget(64 << 20);
    if let Some(k) = a.get(4).and_then(|s| s.parse().ok()) {
        cfg = cfg.stage_every(k);
    }
    let pages = ((64u64 << 20) as f64 * wb) as u64 / PAGE_SIZE as u64;
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let vm = Vm::new(cfg).unwrap();
    vm.swapon(SwapSpec::file(
        dir.path().join("swap"),
        pages * 2 * PAGE_SIZE as u64,
    ))
    .unwrap();
    let r = vm
        .map_transparent((pages * PAGE_SIZE as u64) as usize)
        .unwrap();
    let p = r.as_ptr();
    for i in 0..pages {
        // SAFETY: inside the region, 8-byte aligned.
        unsafe {
            p.add((i * PAGE_SIZE as u64) as usize)
                .cast::<u64>()
                .write_volatile(i)
        };
    }
    let sampler = Sampler::new(pattern, pages);
    let mut rng = Rng::new(3);
    let mut run = |d: Duration| {
        let end = Instant::now() + d;
        let (mut n, mut sum) = (0u64, 0u64);
        while Instant::now() < end {
            for _ in 0..64 {
                let off = sampler.sample(&mut rng) * PAGE_SIZE as u64 + 8 * rng.below(512);
                // SAFETY: inside the region, 8-byte aligned.
                sum =
                    sum.wrapping_add(unsafe { p.add(off as usize).cast::<u64>().read_volatile() });
                n += 1;
            }
        }
        std::hint::black_box(sum);
        n
    };
    run(Duration::from_secs(2)); // warm-up
    let s0 = vm.stats();
    let t = Instant::now();
    let n = run(Duration::from_secs(secs));
    let el = t.elapsed().as_secs_f64();
    let s1 = vm.stats();
    let pct = |a: u64, b: u64| (b - a) as f64 / n as f64 * 100.0;
    println!(
        "{name} W/B {wb}: {:.1}k accesses/s  major {:.1} %  staged {:.1} %  staged refaults {:.1} %  scanned {:.2} per access",
        n as f64 / el / 1000.0,
        pct(s0.pgmajfault, s1.pgmajfault),
        pct(s0.staged, s1.staged),
        pct(s0.staged_refaults, s1.staged_refaults),
        (s1.pgscan - s0.pgscan) as f64 / n as f64
    );
}
