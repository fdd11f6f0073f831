//! Miss rates of reclaim's policies on one seeded trace (issue 10 item 1):
//! `cargo run --release --example policy_probe -- [zipf|hotcold|uniform] [W/B] [frames]`.
//! Runs the same accesses with each `Policy` and prints the major faults per
//! access and the probation counters.

use usermm::{Config, Policy, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::{Pattern, Rng, Sampler};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pat = Pattern::parse(args.get(1).map_or("zipf", |s| s.as_str())).unwrap();
    let wb: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4.0);
    let frames: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let pages = (frames as f64 * wb) as u64;
    let dir = tempfile::tempdir().unwrap();
    for pol in [Policy::Frequency, Policy::S3Fifo, Policy::Clock] {
        let vm = Vm::new(
            Config::default()
                .memory_budget(frames * PAGE_SIZE)
                .policy(pol),
        )
        .unwrap();
        vm.swapon(SwapSpec::file(
            dir.path().join(format!("swap{pol:?}")),
            pages * 2 * PAGE_SIZE as u64,
        ))
        .unwrap();
        let mm = vm.new_space();
        let r = usermm_testkit::pattern::map_numbered(&mm, pages).unwrap();
        let sampler = Sampler::new(pat, pages);
        let mut rng = Rng::new(869731107);
        let mut b = [0u8; 8];
        let n: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(400_000);
        for _ in 0..pages {
            let p = sampler.sample(&mut rng);
            mm.read(r.start() + p * PAGE_SIZE as u64, &mut b).unwrap();
        }
        let s0 = vm.stats();
        let mut windows = Vec::new();
        let mut w0 = s0.pgmajfault;
        for i in 0..n {
            let p = sampler.sample(&mut rng);
            mm.read(r.start() + p * PAGE_SIZE as u64, &mut b).unwrap();
            if (i + 1) % 200_000 == 0 {
                let m = vm.stats().pgmajfault;
                windows.push(format!("{:.1}", 100.0 * (m - w0) as f64 / 200_000.0));
                w0 = m;
            }
        }
        // Miss % of each window of 200,000 accesses: how fast the policy learns.
        println!("  windows: {}", windows.join(" "));
        let s = vm.stats();
        println!(
            "{:9} {} W/B={wb}: miss {:.2}%  small evicted {} promoted {} ghost hits {} scanned {} stolen {}",
            format!("{pol:?}"),
            pat.name(),
            100.0 * (s.pgmajfault - s0.pgmajfault) as f64 / n as f64,
            s.small_evicted - s0.small_evicted,
            s.small_promoted - s0.small_promoted,
            s.ghost_hits - s0.ghost_hits,
            s.pgscan - s0.pgscan,
            s.pgsteal - s0.pgsteal,
        );
    }
}
