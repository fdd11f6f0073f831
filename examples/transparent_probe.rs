//! What a transparent-memory fault costs here, next to the device's own 4 KiB read:
//! zero-fill faults (first touch), swap-in faults (a touch of an evicted page, one
//! thread, random order) and the same reads through the explicit API, with p50/p99;
//! first, zero-fill faults under a budget above the data (no reclaim at all: the
//! userfaultfd round trip alone).
//! `cargo run --release --example transparent_probe` (needs /dev/userfaultfd).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use usermm::device::{file::FileDevice, AlignedPages, BlockDevice};
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::Rng;

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q) as usize]
}

fn report(what: &str, mut v: Vec<f64>) {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    println!(
        "{what:<38} n={n:>6}  p50 {:>7.1} µs  p99 {:>7.1} µs  mean {:>7.1} µs",
        pct(&mut v, 0.5),
        pct(&mut v, 0.99),
        mean
    );
}

/// Zero-fill faults on `pages` pages under a budget twice their size: no frame is
/// ever reclaimed, so each is the userfaultfd round trip (fault, handler, copy of
/// a zero page, wake) and nothing else.
fn round_trips(pages: usize) -> Vec<f64> {
    let vm = Vm::new(Config::default().memory_budget(2 * pages * PAGE_SIZE)).unwrap();
    let r = vm
        .map_transparent(pages * PAGE_SIZE)
        .expect("map_transparent");
    (0..pages)
        .map(|p| {
            // SAFETY: inside the region, 8-byte aligned; accessed atomically only.
            let w = unsafe { &*(r.as_ptr().add(p * PAGE_SIZE) as *const AtomicU64) };
            let t = Instant::now();
            w.store(1, Ordering::Relaxed);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

fn main() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let pages = 16384usize; // 64 MiB of data
    let rt = round_trips(pages);
    let vm = Vm::new(Config::default().memory_budget(8 << 20)).unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("swap"), 256 << 20))
        .unwrap();
    let r = vm
        .map_transparent(pages * PAGE_SIZE)
        .expect("map_transparent");
    let word = |p: usize| {
        // SAFETY: inside the region, 8-byte aligned; accessed atomically only.
        unsafe { &*(r.as_ptr().add(p * PAGE_SIZE) as *const AtomicU64) }
    };
    let mut zf = Vec::with_capacity(pages);
    for p in 0..pages {
        let t = Instant::now();
        word(p).store(p as u64 + 1, Ordering::Relaxed);
        zf.push(t.elapsed().as_secs_f64() * 1e6);
    }
    vm.reclaim(pages);
    let mut rng = Rng::new(1);
    let mut si = Vec::new();
    for _ in 0..4000 {
        let p = rng.below(pages as u64) as usize;
        let t = Instant::now();
        let v = word(p).load(Ordering::Relaxed);
        si.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(v, p as u64 + 1);
    }
    let s = vm.stats();
    // The explicit API on the same Vm and device, for comparison.
    let mm = vm.new_space();
    let reg = mm.map_anon(pages * PAGE_SIZE).unwrap();
    for p in 0..pages as u64 {
        mm.write(reg.start() + p * PAGE_SIZE as u64, &[1]).unwrap();
    }
    vm.reclaim(4 * pages);
    let mut api = Vec::new();
    let mut b = [0u8; 8];
    for _ in 0..4000 {
        let p = rng.below(pages as u64);
        let t = Instant::now();
        mm.read(reg.start() + p * PAGE_SIZE as u64, &mut b).unwrap();
        api.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // The device's own random 4 KiB O_DIRECT read at depth 1.
    let probe = dir.path().join("probe");
    std::fs::write(&probe, vec![7u8; 256 << 20]).unwrap();
    let dev = FileDevice::open(&probe, None, "probe").unwrap();
    let mut buf = AlignedPages::new(1).unwrap();
    let mut dv = Vec::new();
    for _ in 0..4000 {
        let slot = rng.below(dev.pages());
        let t = Instant::now();
        dev.read_page(slot, buf.page_mut(0)).unwrap();
        dv.push(t.elapsed().as_secs_f64() * 1e6);
    }
    report("transparent zero-fill, no reclaim", rt);
    report("transparent zero-fill fault (touch)", zf);
    report("transparent swap-in fault (random)", si);
    report("explicit API read, mostly swap-in", api);
    report("device 4 KiB O_DIRECT read, depth 1", dv);
    println!(
        "transparent part: pgfault {} pgmajfault {} pswpin {} pswpout {}",
        s.pgfault, s.pgmajfault, s.pswpin, s.pswpout
    );
}
