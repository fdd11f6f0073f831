//! Swap-in readahead (issue 10 item 3), with and without (`Config::readahead`):
//! after filling W = 4 × budget, a sequential scan, a stride-16 scan and uniform
//! random reads of the whole working set; prints pages/s, major faults and the
//! pages read ahead (`Stats::read_around`).
//!
//! `cargo run --release --example readahead_probe -- [budget-MiB]`

use std::time::Instant;
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::Rng;

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let frames = (mib << 20) / PAGE_SIZE;
    let pages = 4 * frames as u64;
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    for ra in [true, false] {
        let vm = Vm::new(Config::default().memory_budget(mib << 20).readahead(ra)).unwrap();
        vm.swapon(SwapSpec::file(
            dir.path().join(format!("swap{ra}")),
            pages * 2 * PAGE_SIZE as u64,
        ))
        .unwrap();
        let mm = vm.new_space();
        let r = usermm_testkit::pattern::map_numbered(&mm, pages).unwrap();
        let mut b = [0u8; 8];
        let mut rng = Rng::new(7);
        let order = |kind: &str, i: u64, rng: &mut Rng| match kind {
            "sequential" => i,
            "stride-16" => (i * 16) % pages + (i * 16) / pages,
            _ => rng.below(pages),
        };
        for kind in ["sequential", "stride-16", "uniform"] {
            let s0 = vm.stats();
            let t = Instant::now();
            for i in 0..pages {
                let p = order(kind, i, &mut rng);
                mm.read(r.start() + p * PAGE_SIZE as u64, &mut b).unwrap();
                assert_eq!(u64::from_le_bytes(b), p);
            }
            let dt = t.elapsed().as_secs_f64();
            let s = vm.stats();
            let reads = s.pswpin - s0.pswpin;
            println!(
                "readahead {:>3} {kind:>10}: {:>8.0} pages/s  major faults {:>6}  swap reads {:>6}  read ahead {:>6} ({:.1} % of reads)",
                if ra { "on" } else { "off" },
                pages as f64 / dt,
                s.pgmajfault - s0.pgmajfault,
                reads,
                s.read_around - s0.read_around,
                100.0 * (s.read_around - s0.read_around) as f64 / reads.max(1) as f64
            );
        }
    }
}
