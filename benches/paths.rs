//! Micro-benchmarks of the hit path and the fault path (divan).
//! `cargo bench --bench paths`. Ratios against plain memory are printed by
//! `usermm bench`; these isolate one operation each.

use std::sync::OnceLock;
use usermm::{AddressSpace, Config, Region, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::Rng;

fn main() {
    divan::main();
}

const RESIDENT: usize = 32 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    _vm: Vm,
    mm: AddressSpace,
    r: Region,
}

fn resident() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let vm = Vm::new(Config::default().memory_budget(64 << 20)).unwrap();
        vm.swapon(SwapSpec::file(dir.path().join("s"), 256 << 20))
            .unwrap();
        let mm = vm.new_space();
        let r = mm.map_anon(RESIDENT).unwrap();
        for p in 0..(RESIDENT / PAGE_SIZE) as u64 {
            mm.write(r.start() + p * PAGE_SIZE as u64, &p.to_le_bytes())
                .unwrap();
        }
        Fixture {
            _dir: dir,
            _vm: vm,
            mm,
            r,
        }
    })
}

/// Random 8-byte read of a resident page through the API.
#[divan::bench]
fn hit_read_8(b: divan::Bencher) {
    let f = resident();
    let mut rng = Rng::new(1);
    b.bench_local(|| {
        let off = rng.below(RESIDENT as u64 / 8) * 8;
        let mut w = [0u8; 8];
        f.mm.read(f.r.start() + off, &mut w).unwrap();
        divan::black_box(w)
    });
}

/// The same on a plain Vec (the ceiling).
#[divan::bench]
fn plain_read_8(b: divan::Bencher) {
    let v = vec![1u8; RESIDENT];
    let mut rng = Rng::new(1);
    b.bench_local(|| {
        let off = (rng.below(RESIDENT as u64 / 8) * 8) as usize;
        let mut w = [0u8; 8];
        w.copy_from_slice(&v[off..off + 8]);
        divan::black_box(w)
    });
}

/// Random 8-byte write of a resident page through the API.
#[divan::bench]
fn hit_write_8(b: divan::Bencher) {
    let f = resident();
    let mut rng = Rng::new(2);
    b.bench_local(|| {
        let off = rng.below(RESIDENT as u64 / 8) * 8;
        f.mm.write(f.r.start() + off, &off.to_le_bytes()).unwrap();
    });
}

/// Zero-fill fault: the first write to a page (and its unmap, amortised).
#[divan::bench]
fn fault_zero_fill(b: divan::Bencher) {
    let vm = Vm::new(Config::default().memory_budget(256 << 20)).unwrap();
    let mm = vm.new_space();
    let pages = 16 * 1024u64;
    let mut r = mm.map_anon(pages as usize * PAGE_SIZE).unwrap();
    let mut next = 0;
    b.bench_local(|| {
        if next == pages {
            mm.unmap(r).unwrap();
            r = mm.map_anon(pages as usize * PAGE_SIZE).unwrap();
            next = 0;
        }
        mm.write(r.start() + next * PAGE_SIZE as u64, &[1]).unwrap();
        next += 1;
    });
}

/// Swap-in fault: a read of a page that is on the swap file (working set 4x the
/// budget, uniform; most reads miss).
#[divan::bench(sample_count = 20, sample_size = 200)]
fn fault_swap_in(b: divan::Bencher) {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(16 << 20)).unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("s"), 128 << 20))
        .unwrap();
    let mm = vm.new_space();
    let ws = 64 << 20;
    let r = mm.map_anon(ws).unwrap();
    let pages = (ws / PAGE_SIZE) as u64;
    for p in 0..pages {
        mm.write(r.start() + p * PAGE_SIZE as u64, &p.to_le_bytes())
            .unwrap();
    }
    let mut rng = Rng::new(3);
    b.bench_local(|| {
        let p = rng.below(pages);
        let mut w = [0u8; 8];
        mm.read(r.start() + p * PAGE_SIZE as u64, &mut w).unwrap();
        assert_eq!(u64::from_le_bytes(w), p);
    });
}
