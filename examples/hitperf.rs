//! The bench's hit-path cell alone, in seconds instead of `usermm bench --quick`'s
//! ten minutes: budget 64 MiB, a resident working set of half of it, uniform random
//! 8-byte reads on one thread through `usermm_testkit::driver` (the bench's own
//! driver, for usermm and plain memory alike), three alternating rounds, medians.
//! `cargo run --release --example hitperf`.
use std::time::Duration;
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::driver::{self, Content, Measured, RawTarget, Snap, UsermmTarget, WorkSpec};
use usermm_testkit::workload::Pattern;

fn main() {
    let budget: u64 = 64 << 20;
    let pages = budget / 2 / PAGE_SIZE as u64;
    let spec = WorkSpec {
        pages,
        pattern: Pattern::Uniform,
        write_ratio: 0.0,
        threads: 1,
        words: 1,
        seed: 1,
        warm_accesses: pages,
        content: Content::Incompressible,
    };
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let vm = Vm::new(Config::default().memory_budget(budget as usize)).unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("swap"), 256 << 20))
        .unwrap();
    let mm = vm.new_space();
    let len = (pages * PAGE_SIZE as u64) as usize;
    let r = mm.map_anon(len).unwrap();
    let um = UsermmTarget {
        mm,
        base: r.start(),
    };
    let mut plain_buf = vec![0u64; len / 8];
    // SAFETY: `plain_buf` is ours, 8-byte aligned, and outlives `plain`.
    let plain = unsafe { RawTarget::new(plain_buf.as_mut_ptr().cast(), len) };
    driver::fill(&um, &spec).unwrap();
    driver::fill(&plain, &spec).unwrap();
    let (warm, round) = (Duration::from_millis(100), Duration::from_millis(700));
    let (mut us, mut ps) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        us.push(driver::measure(&um, &spec, warm, round, &Snap::default).unwrap());
        ps.push(driver::measure(&plain, &spec, warm, round, &Snap::default).unwrap());
    }
    let median = |mut v: Vec<Measured>| {
        v.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        v.swap_remove(1).rate()
    };
    let (u, p) = (median(us), median(ps));
    println!(
        "hit path (W = {} MiB resident, uniform random 8-byte reads, 1 thread): usermm {:.1} M/s, plain {:.1} M/s, ratio {:.2}",
        len >> 20,
        u / 1e6,
        p / 1e6,
        u / p
    );
    let s = vm.stats();
    println!(
        "page tables: {} bytes ({:.3} % of the {} MiB mapped)",
        s.page_table_bytes,
        s.page_table_bytes as f64 * 100.0 / len as f64,
        len >> 20
    );
}
