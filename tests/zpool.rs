//! The compressed tier (`zpool:`) above a file device, and discard of freed slots.
//!
//! - `differential_lz4` / `differential_zstd`: a child process (a fresh one, so its
//!   peak RSS means something, as in `tests/budget.rs`) runs two threads of random
//!   page writes and reads, incompressible, compressible and zero pages mixed, under
//!   a budget of 1/10 of the data, with a pool of half the budget above a file device;
//!   every read is compared with a model (a version and a kind per page, from which
//!   the bytes are regenerated), the pool is swapped off and on in the middle, every
//!   page is checked at the end, and the peak RSS must stay within the budget plus
//!   metadata plus 32 MiB. Then everything is unmapped and every frame (the pool's
//!   too) and slot must come back.
//! - `full_pool_writes_back_and_survives_a_failing_device`: a small pool fills and
//!   writes back to the file; the device then fails every write (compressible pages
//!   stay in the pool, incompressible ones resident; no access gets an error that
//!   did not need a failed read), then every read (only pages on the device fail),
//!   and once healed every page reads back.
//! - `discard_*`: freed slots are given back: holes punched in the swap file
//!   (`st_blocks`), the pool's frames freed, TRIMs reaching qemu-nbd's image.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use usermm::{Config, Error, Region, SwapSpec, Vm, PAGE_SIZE};

const PS: u64 = PAGE_SIZE as u64;

/// Page kinds: how compressible its bytes are.
const INCOMPRESSIBLE: u8 = 0;
/// One 8-byte word in 4 random, the rest zero (compresses to about half a page).
const QUARTER: u8 = 1;
/// One word in 16 random.
const SIXTEENTH: u8 = 2;
const ZERO: u8 = 3;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The bytes of page `p` at version `v` of kind `k` (version 0: never written, zeros).
fn content(p: u64, v: u32, k: u8, out: &mut [u8]) {
    out.fill(0);
    if v == 0 || k == ZERO {
        return;
    }
    let every = match k {
        INCOMPRESSIBLE => 1,
        QUARTER => 4,
        _ => 16,
    };
    let mut s = mix(p << 32 | u64::from(v)) ^ u64::from(k);
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        if i % every == 0 {
            s = mix(s);
            w.copy_from_slice(&s.to_le_bytes());
        }
    }
    // A stamp, so that a page of another version or page never matches.
    out[..8].copy_from_slice(&(p << 32 | u64::from(v)).to_le_bytes());
}

fn kind_for(r: u64) -> u8 {
    match r % 10 {
        0..=2 => INCOMPRESSIBLE,
        3..=6 => QUARTER,
        7 | 8 => SIXTEENTH,
        _ => ZERO,
    }
}

fn check(p: u64, got: &[u8], v: u32, k: u8, ctx: &str) {
    let mut want = vec![0u8; PAGE_SIZE];
    content(p, v, k, &mut want);
    if let Some(d) = usermm_testkit::pattern::first_diff(got, &want) {
        panic!("{ctx}: page {p} (version {v}, kind {k}) read back wrong: {d}");
    }
}

// ---------------------------------------------------------------------------------
// The differential test, in a child process.

const ENV: &str = "USERMM_ZPOOL_CHILD";
const MARK: &str = "USERMM-ZPOOL-RESULT";
const BUDGET: usize = 16 << 20;
/// 10× the budget.
const DATA: u64 = 160 << 20;
const SLACK: u64 = 32 << 20;
const THREADS: u64 = 2;
const OPS: u64 = 60_000;

fn child(algo: &str) {
    let seed = seed(0x2F00_1CAFE);
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(BUDGET)).unwrap();
    // 4 MiB: small enough that even zstd (about 4.5:1 on this mix) fills it again
    // in the second half and must write back (with 8 MiB a zstd pool sometimes
    // never overflowed after coming back, and the write-back check below failed).
    let pool_spec = format!("zpool:?size=4M&algo={algo}&prio=10");
    let mut pool = vm.swapon(SwapSpec::parse(&pool_spec).unwrap()).unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("swap"), DATA + (32 << 20)))
        .unwrap();
    let mm = vm.new_space();
    let r = mm.map_anon(DATA as usize).unwrap();
    let pages = DATA / PS;
    let per = pages / THREADS;
    let swapped = AtomicBool::new(false);
    let pool_cell = std::sync::Mutex::new(&mut pool);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (mm, vm, swapped, pool_cell, pool_spec) =
                (&mm, &vm, &swapped, &pool_cell, &pool_spec);
            s.spawn(move || {
                let mut rng = thread_rng(seed, t as usize);
                let first = t * per;
                // The model: version and kind of each of this thread's pages.
                let mut ver = vec![0u32; per as usize];
                let mut kind = vec![ZERO; per as usize];
                let mut buf = vec![0u8; 3 * PAGE_SIZE];
                // Fill every page once, then random operations.
                for i in 0..per + OPS {
                    let ctx = format!("seed {seed} thread {t} op {i}");
                    let fill = i < per;
                    let q = if fill { i } else { rng.below(per) };
                    let p = first + q;
                    let op = if fill { 0 } else { rng.below(100) };
                    if op < 45 {
                        ver[q as usize] += 1;
                        kind[q as usize] = kind_for(rng.next_u64());
                        content(p, ver[q as usize], kind[q as usize], &mut buf[..PAGE_SIZE]);
                        mm.write(r.start() + p * PS, &buf[..PAGE_SIZE])
                            .unwrap_or_else(|e| panic!("{ctx}: write of page {p}: {e:?}"));
                    } else if op < 95 {
                        mm.read(r.start() + p * PS, &mut buf[..PAGE_SIZE])
                            .unwrap_or_else(|e| panic!("{ctx}: read of page {p}: {e:?}"));
                        check(
                            p,
                            &buf[..PAGE_SIZE],
                            ver[q as usize],
                            kind[q as usize],
                            &ctx,
                        );
                    } else {
                        // Three pages in one read (crossing page boundaries).
                        let q = q.min(per - 3);
                        let p = first + q;
                        mm.read(r.start() + p * PS, &mut buf)
                            .unwrap_or_else(|e| panic!("{ctx}: read of pages {p}..: {e:?}"));
                        for j in 0..3 {
                            let k = (q + j) as usize;
                            let b = &buf[j as usize * PAGE_SIZE..(j as usize + 1) * PAGE_SIZE];
                            check(p + j, b, ver[k], kind[k], &ctx);
                        }
                    }
                    // Half-way: the pool goes (every page in it written back to its
                    // slot) and comes back, while the other thread goes on.
                    if t == 0 && i == per + OPS / 2 && !swapped.swap(true, Ordering::Relaxed) {
                        let mut id = pool_cell.lock().unwrap();
                        vm.swapoff(**id)
                            .unwrap_or_else(|e| panic!("{ctx}: swapoff of the pool: {e:?}"));
                        **id = vm.swapon(SwapSpec::parse(pool_spec).unwrap()).unwrap();
                    }
                }
                // Every page, once more.
                for q in 0..per {
                    let p = first + q;
                    mm.read(r.start() + p * PS, &mut buf[..PAGE_SIZE])
                        .unwrap_or_else(|e| panic!("final read of page {p}: {e:?}"));
                    check(
                        p,
                        &buf[..PAGE_SIZE],
                        ver[q as usize],
                        kind[q as usize],
                        "final",
                    );
                }
            });
        }
    });
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let (hwm_kib, _) = hwm_rss_kib(&status);
    let s = vm.stats();
    let swaps = vm.swaps();
    let p = swaps.iter().find(|d| d.name.starts_with("zpool:")).unwrap();
    println!("{swaps:?}");
    println!(
        "{MARK} hwm_kib={hwm_kib} budget={BUDGET} metadata={} pages={pages} stored={} refused={} \
         written_back={} pswpout={} pswpin={} pool_used={} pool_memory={}",
        s.metadata_bytes,
        s.zpool_stored,
        s.zpool_refused,
        s.zpool_written_back,
        s.pswpout,
        s.pswpin,
        p.used,
        p.memory,
    );
    assert_eq!(
        s.write_errors + s.read_errors + s.zpool_writeback_errors,
        0,
        "{s:?}"
    );
    // (Counted since the pool came back half-way.)
    assert!(s.zpool_stored > pages / 8, "the pool took few pages: {s:?}");
    assert!(
        s.zpool_refused > 0,
        "incompressible pages went into the pool: {s:?}"
    );
    assert!(s.zpool_written_back > 0, "the pool never wrote back: {s:?}");
    assert!(
        p.memory <= 4 << 20,
        "the pool holds more than its size: {p:?}"
    );
    // Everything goes: every frame, the pool's included, and every slot.
    mm.unmap(r).unwrap();
    drop(mm);
    assert_no_leak(&vm, Duration::from_secs(10), "after unmapping everything");
    let p = vm
        .swaps()
        .into_iter()
        .find(|d| d.name.starts_with("zpool:"))
        .unwrap();
    assert_eq!((p.used, p.memory), (0, 0), "{p:?}");
    assert!(p.discarded > 0, "{p:?}");
}

#[test]
fn child_entry() {
    if let Ok(algo) = std::env::var(ENV) {
        child(&algo);
    }
}

fn run_child(algo: &str) {
    let t0 = Instant::now();
    let line = run_self_child(ENV, algo, MARK);
    let field = |k: &str| result_field(&line, k);
    let (hwm, budget, meta) = (field("hwm_kib") * 1024, field("budget"), field("metadata"));
    let limit = budget + meta + SLACK;
    println!("{line}");
    println!(
        "{algo}: peak RSS {:.1} MiB; limit {:.1} MiB (budget {:.0} + metadata {:.2} + slack 32); \
         {:.1} s",
        hwm as f64 / 1048576.0,
        limit as f64 / 1048576.0,
        budget as f64 / 1048576.0,
        meta as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    assert!(hwm <= limit, "peak RSS {hwm} > limit {limit}: {line}");
    assert!(
        hwm >= budget / 2,
        "peak RSS {hwm} implausibly small: {line}"
    );
}

#[test]
fn differential_lz4() {
    run_child("lz4");
}

#[test]
fn differential_zstd() {
    run_child("zstd");
}

// ---------------------------------------------------------------------------------
// Write-back, and a failing device below the pool.

#[test]
fn full_pool_writes_back_and_survives_a_failing_device() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(8 << 20)).unwrap();
    let spec = SwapSpec::parse("zpool:?size=1M&prio=5").unwrap();
    let mut pool = vm.swapon(spec.clone()).unwrap();
    let (faulty, _) = faulty_swap(&vm, dir.path(), "swap", 64 << 20);
    let mm = vm.new_space();
    let pages = 6144u64; // 24 MiB: 3× the budget
    let r = mm.map_anon((pages * PS) as usize).unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    let write = |p: u64, v: u32, k: u8, buf: &mut Vec<u8>| {
        content(p, v, k, buf);
        mm.write(r.start() + p * PS, buf)
    };
    // 1. Compressible pages, far more than the 1 MiB pool holds: it writes back.
    for p in 0..pages / 2 {
        write(p, 1, QUARTER, &mut buf).unwrap();
    }
    let s = vm.stats();
    assert!(s.zpool_stored > 0 && s.zpool_written_back > 0, "{s:?}");
    for p in 0..pages / 2 {
        mm.read(r.start() + p * PS, &mut buf).unwrap();
        check(p, &buf, 1, QUARTER, "after write-back");
    }
    // The pool goes (everything in it written back) and comes back empty.
    vm.swapoff(pool).unwrap();
    pool = vm.swapon(spec).unwrap();
    let stored0 = vm.stats().zpool_stored;
    // 2. The device fails every write. Compressible pages go to the pool and stay
    //    there; incompressible ones stay resident (their page-outs fail). No access
    //    fails: none needs a read from the device.
    faulty.set_fail_writes(true);
    // 0: phase-1 content, 2: new SIXTEENTH, 3: INCOMPRESSIBLE
    let mut written = vec![0u8; pages as usize];
    for p in pages / 2..pages / 2 + 512 {
        write(p, 3, INCOMPRESSIBLE, &mut buf).unwrap_or_else(|e| panic!("page {p}: {e:?}"));
        written[p as usize] = 3;
    }
    // More than the budget of compressible pages: they go out, to the pool.
    for p in pages / 2 + 512..pages / 2 + 2560 {
        write(p, 2, SIXTEENTH, &mut buf).unwrap_or_else(|e| panic!("page {p}: {e:?}"));
        written[p as usize] = 2;
    }
    let s = vm.stats();
    assert!(s.write_errors > 0, "the device never failed a write: {s:?}");
    assert!(
        s.zpool_stored >= stored0 + 512,
        "compressible pages missed the pool: {s:?}"
    );
    let verify = |written: &[u8], allow_device_errors: bool| -> u64 {
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut errs = 0;
        for p in 0..pages {
            match mm.read(r.start() + p * PS, &mut buf) {
                Ok(()) => match written[p as usize] {
                    0 if p < pages / 2 => check(p, &buf, 1, QUARTER, "phase 1 page"),
                    0 => check(p, &buf, 0, ZERO, "never written"),
                    2 => check(p, &buf, 2, SIXTEENTH, "phase 2 page"),
                    _ => check(p, &buf, 3, INCOMPRESSIBLE, "phase 2 page"),
                },
                Err(Error::Device { .. }) if allow_device_errors => errs += 1,
                Err(e) => panic!("read of page {p}: {e:?}"),
            }
        }
        errs
    };
    // Reads work: the device reads fine, the pool holds what could not be written.
    assert_eq!(verify(&written, false), 0);
    // The pool cannot go while the device below refuses its pages: it stays.
    assert!(matches!(vm.swapoff(pool), Err(Error::Device { .. })));
    assert_eq!(verify(&written, false), 0);
    // 3. Reads fail too: only pages whose bytes are on the device fail, as
    //    `Error::Device`; pages in the pool or in memory read back.
    faulty.set_fail_reads(true);
    let errs = verify(&written, true);
    assert!(errs > 0 && errs < pages, "{errs} read errors");
    assert!(
        vm.swaps()
            .iter()
            .any(|d| d.name.starts_with("zpool:") && d.used > 0),
        "{:?}",
        vm.swaps()
    );
    // 4. Healed: every page reads back, and the pool can be written back now.
    faulty.set_fail_reads(false);
    faulty.set_fail_writes(false);
    assert_eq!(verify(&written, false), 0);
    vm.swapoff(pool).unwrap();
    assert_eq!(verify(&written, false), 0);
    println!(
        "failed page-outs while failing: {}; stats {:?}",
        s.write_errors,
        vm.stats()
    );
    mm.unmap(r).unwrap();
    drop(mm);
    assert_no_leak(&vm, Duration::from_secs(10), "end");
}

// ---------------------------------------------------------------------------------
// Discard.

fn blocks(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Writes `pages` incompressible pages through a 4 MiB budget, so most are on swap.
fn fill(vm: &Vm, pages: u64, k: u8) -> (usermm::AddressSpace, Region) {
    let mm = vm.new_space();
    let r = mm.map_anon((pages * PS) as usize).unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in 0..pages {
        content(p, 1, k, &mut buf);
        mm.write(r.start() + p * PS, &buf).unwrap();
    }
    (mm, r)
}

fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while !done() {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[test]
fn discard_punches_holes_in_the_swap_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swap");
    let vm = Vm::new(Config::default().memory_budget(4 << 20)).unwrap();
    vm.swapon(SwapSpec::parse(&format!("file:{}?size=64M&sparse=1", path.display())).unwrap())
        .unwrap();
    let (mm, r) = fill(&vm, 8192, INCOMPRESSIBLE);
    let full = blocks(&path);
    assert!(
        full >= 16 << 20,
        "only {full} bytes allocated after 32 MiB of page-out"
    );
    mm.unmap(r).unwrap();
    let ok = wait_for(Duration::from_secs(10), || blocks(&path) < full / 8);
    let after = blocks(&path);
    let d = &vm.swaps()[0];
    println!("file: {full} bytes allocated before, {after} after; {d:?}");
    if !ok {
        let out = std::process::Command::new("filefrag")
            .arg("-v")
            .arg(&path)
            .output();
        if let Ok(o) = out {
            println!("{}", String::from_utf8_lossy(&o.stdout));
        }
    }
    assert!(
        ok,
        "holes not punched: {after} bytes still allocated of {full}"
    );
    assert_eq!(d.used, 0);
    assert!(d.discarded >= full / 2, "{d:?}");
}

#[test]
fn discard_frees_the_pools_memory() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(4 << 20)).unwrap();
    vm.swapon(SwapSpec::parse("zpool:?size=2M&prio=1").unwrap())
        .unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("swap"), 64 << 20))
        .unwrap();
    let (mm, r) = fill(&vm, 4096, SIXTEENTH);
    let pool = || {
        vm.swaps()
            .into_iter()
            .find(|d| d.name.starts_with("zpool:"))
            .unwrap()
    };
    let before = pool();
    assert!(
        before.memory > 0 && before.used > 2 * before.memory,
        "{before:?}"
    );
    mm.unmap(r).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let p = pool();
            p.used == 0 && p.memory == 0
        }),
        "the pool kept memory: {:?}",
        pool()
    );
    let s = vm.stats();
    assert_eq!(s.free_frames, s.total_frames, "{s:?}");
    let after = pool();
    println!("pool before {before:?}, after {after:?}");
    assert!(after.discarded >= before.used, "{after:?}");
}

#[test]
fn discard_trims_the_nbd_export() {
    use usermm_testkit::nbd;
    if nbd::skip_without("discard_trims_the_nbd_export", "qemu-nbd") {
        return;
    }
    nbd::run_test(
        "discard_trims_the_nbd_export",
        Duration::from_secs(60),
        || {
            let dir = tempfile::tempdir().unwrap();
            let img = nbd::disk(dir.path(), "img", 64 << 20);
            let srv = nbd::qemu_nbd(&img, nbd::Endpoint::Unix(dir.path().join("sock")));
            let vm = Vm::new(Config::default().memory_budget(4 << 20)).unwrap();
            vm.swapon(SwapSpec::parse(&srv.spec("")).unwrap()).unwrap();
            let (mm, r) = fill(&vm, 4096, INCOMPRESSIBLE);
            let full = blocks(&img);
            assert!(full >= 8 << 20, "only {full} bytes allocated in the image");
            mm.unmap(r).unwrap();
            let ok = wait_for(Duration::from_secs(20), || blocks(&img) < full / 8);
            let d = &vm.swaps()[0];
            println!("image: {full} bytes before, {} after; {d:?}", blocks(&img));
            assert!(
                ok,
                "TRIM did not reach the image: {} of {full} bytes",
                blocks(&img)
            );
            assert!(d.discarded >= full / 2, "{d:?}");
        },
    );
}

#[test]
fn zpool_swapon_errors_are_clear() {
    let vm = Vm::new(Config::default().memory_budget(4 << 20)).unwrap();
    // More than the budget: the pool's frames come from it.
    match vm.swapon(SwapSpec::parse("zpool:?size=8M").unwrap()) {
        Err(Error::Config(m)) => assert!(m.contains("budget"), "{m}"),
        other => panic!("{other:?}"),
    }
    let id = vm
        .swapon(SwapSpec::parse("zpool:?size=1M&prio=3").unwrap())
        .unwrap();
    // One pool per Vm.
    match vm.swapon(SwapSpec::parse("zpool:?size=1M&algo=zstd").unwrap()) {
        Err(Error::Config(m)) => assert!(m.contains("at most one"), "{m}"),
        other => panic!("{other:?}"),
    }
    let d = &vm.swaps()[0];
    assert_eq!(
        (d.size, d.used, d.memory, d.prio),
        (1 << 20, 0, 0, 3),
        "{d:?}"
    );
    // Without a device below, nothing goes to the pool and nothing breaks: memory
    // beyond the budget has nowhere to go.
    let mm = vm.new_space();
    let r = mm.map_anon(8 << 20).unwrap();
    let mut hit = None;
    for p in 0..2048u64 {
        if let Err(e) = mm.write(r.start() + p * PS, &[1u8; 64]) {
            hit = Some(e);
            break;
        }
    }
    assert!(
        matches!(hit, Some(Error::OutOfMemory | Error::OutOfSwap)),
        "{hit:?}"
    );
    // Off and on again.
    vm.swapoff(id).unwrap();
    assert!(vm.swaps().is_empty());
    vm.swapon(SwapSpec::parse("zpool:?size=1M").unwrap())
        .unwrap();
}
