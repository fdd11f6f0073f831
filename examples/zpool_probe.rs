//! The compressed tier against the plain file device: a working set of 4× the budget
//! filled with pages of a given compressibility, then uniform random one-word reads
//! (50 % writes with `--writes`) from one thread for a few seconds; prints major
//! faults per second, the fault latency (p50/p99 of the accesses that faulted), the
//! pool's compression ratio and write-backs, and the peak RSS of this process.
//!
//! `cargo run --release --example zpool_probe -- [lz4|zstd|file] [quarter|sixteenth|random] [--writes]`
//! (the swap file goes to `$TMPDIR`, or /var/tmp).

use std::time::{Duration, Instant};
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};

const BUDGET: usize = 64 << 20;
const WS: u64 = 256 << 20;
const RUN: Duration = Duration::from_secs(5);

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let algo = args.first().map_or("lz4", |s| s.as_str()).to_string();
    let kind = args.get(1).map_or("quarter", |s| s.as_str()).to_string();
    let writes = args.iter().any(|a| a == "--writes");
    let every = match kind.as_str() {
        "quarter" => 4,
        "sixteenth" => 16,
        _ => 1,
    };
    let dir = tempfile::tempdir_in(std::env::var("TMPDIR").unwrap_or("/var/tmp".into())).unwrap();
    let vm = Vm::new(Config::default().memory_budget(BUDGET)).unwrap();
    if algo != "file" {
        vm.swapon(SwapSpec::parse(&format!("zpool:?size=32M&algo={algo}&prio=10")).unwrap())
            .unwrap();
    }
    vm.swapon(SwapSpec::file(dir.path().join("swap"), WS + (64 << 20)))
        .unwrap();
    let mm = vm.new_space();
    let r = mm.map_anon(WS as usize).unwrap();
    let pages = WS / PAGE_SIZE as u64;
    let mut buf = vec![0u8; PAGE_SIZE];
    let t0 = Instant::now();
    for p in 0..pages {
        buf.fill(0);
        let mut s = mix(p);
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            if i % every == 0 {
                s = mix(s);
                w.copy_from_slice(&s.to_le_bytes());
            }
        }
        mm.write(r.start() + p * PAGE_SIZE as u64, &buf).unwrap();
    }
    let fill = t0.elapsed();
    let s0 = vm.stats();
    let mut lat = Vec::new();
    let mut rng = 0x1234_5678u64;
    let t1 = Instant::now();
    let mut n = 0u64;
    let mut w = [0u8; 8];
    while t1.elapsed() < RUN {
        rng = mix(rng);
        let p = rng % pages;
        let a = r.start() + p * PAGE_SIZE as u64 + (rng >> 40) % 512 * 8;
        let f0 = vm.stats().pgmajfault;
        let t = Instant::now();
        if writes && rng & 1 == 1 {
            // Keep the page's kind: overwrite a word with the same value.
            mm.read(a, &mut w).unwrap();
            mm.write(a, &w).unwrap();
        } else {
            mm.read(a, &mut w).unwrap();
        }
        let d = t.elapsed();
        if vm.stats().pgmajfault != f0 {
            lat.push(d.as_nanos() as u64);
        }
        n += 1;
    }
    let el = t1.elapsed().as_secs_f64();
    let s = vm.stats();
    lat.sort_unstable();
    let q = |f: f64| {
        lat.get((lat.len() as f64 * f) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    let pool = vm
        .swaps()
        .into_iter()
        .find(|d| d.name.starts_with("zpool:"));
    println!(
        "{algo:5} {kind:9} wr={} fill {:.2}s | {:.0} acc/s, {:.0} majflt/s, fault p50 {:.1} us p99 {:.1} us | \
         pool ratio {} stored {} refused {} written back {} | peak RSS {hwm} (budget 64 MiB, metadata {:.1} MiB)",
        if writes { "0.5" } else { "0" },
        fill.as_secs_f64(),
        n as f64 / el,
        (s.pgmajfault - s0.pgmajfault) as f64 / el,
        q(0.5),
        q(0.99),
        pool.as_ref()
            .map_or("-".into(), |p| format!("{:.2}", p.used as f64 / p.memory.max(1) as f64)),
        s.zpool_stored,
        s.zpool_refused,
        s.zpool_written_back,
        s.metadata_bytes as f64 / 1048576.0,
    );
}
