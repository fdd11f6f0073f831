//! The resident memory of a process using usermm stays within budget + metadata + a
//! constant, whatever it stores (the memory discipline of docs/design.md).
//!
//! The measurement needs a fresh process (the peak RSS of a test binary that ran
//! other tests means nothing), so the test re-executes its own binary to run
//! `child_entry` alone: a 64 MiB budget, 1 GiB written one page at a time and then
//! verified page by page. The child reads its peak RSS (`VmHWM`) at the end, checks
//! it and prints the numbers; the parent checks them again from the child's output.

mod common;

use common::*;
use std::time::Instant;
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::pattern::{first_diff, page_pattern};

const ENV: &str = "USERMM_BUDGET_CHILD";
const BUDGET: usize = 64 << 20;
const DATA: u64 = 1 << 30;
/// Allowed beyond budget + metadata: the test binary, its threads' stacks, the harness.
const SLACK: u64 = 32 << 20;
const THREADS: u64 = 4;
const MARK: &str = "USERMM-BUDGET-RESULT";

fn child() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(BUDGET)).unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("swap"), DATA + (64 << 20)))
        .unwrap();
    let mm = vm.new_space();
    let r = mm.map_anon(DATA as usize).unwrap();
    let pages = DATA / PAGE_SIZE as u64;
    let ps = PAGE_SIZE as u64;
    let key = |p: u64| p.wrapping_mul(0x1000_0000_01B3) ^ 0xB0D6E7;
    // Pass 1: each thread writes its interleaved share of the pages, one page a write.
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let mm = &mm;
            s.spawn(move || {
                let mut buf = vec![0u8; PAGE_SIZE];
                for p in (t..pages).step_by(THREADS as usize) {
                    page_pattern(key(p), &mut buf);
                    mm.write(r.start() + p * ps, &buf)
                        .unwrap_or_else(|e| panic!("write of page {p} failed: {e:?}"));
                }
            });
        }
    });
    let t1 = t0.elapsed();
    // Pass 2: read every page back (in reverse order, so the resident tail of pass 1
    // does not answer everything) and compare all of it.
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let mm = &mm;
            s.spawn(move || {
                let mut want = vec![0u8; PAGE_SIZE];
                let mut got = vec![0u8; PAGE_SIZE];
                for p in (t as usize..pages as usize)
                    .step_by(THREADS as usize)
                    .rev()
                    .map(|p| p as u64)
                {
                    page_pattern(key(p), &mut want);
                    mm.read(r.start() + p * ps, &mut got)
                        .unwrap_or_else(|e| panic!("read of page {p} failed: {e:?}"));
                    if let Some(d) = first_diff(&got, &want) {
                        panic!("page {p} read back wrong: {d}");
                    }
                }
            });
        }
    });
    let t2 = t0.elapsed();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let (hwm_kib, rss_kib) = hwm_rss_kib(&status);
    let s = vm.stats();
    println!(
        "{MARK} hwm_kib={hwm_kib} rss_kib={rss_kib} budget={BUDGET} metadata={} pages={pages} \
         pswpout={} pswpin={} write_s={:.1} verify_s={:.1}",
        s.metadata_bytes,
        s.pswpout,
        s.pswpin,
        t1.as_secs_f64(),
        (t2 - t1).as_secs_f64()
    );
    assert!(
        s.pswpout >= pages - (BUDGET / PAGE_SIZE) as u64,
        "fewer page-outs than pages beyond the budget: {s:?}"
    );
    assert!(s.pswpin > 0, "{s:?}");
    assert_eq!(s.write_errors + s.read_errors, 0, "{s:?}");
    let limit = BUDGET as u64 + s.metadata_bytes + SLACK;
    assert!(
        hwm_kib * 1024 <= limit,
        "peak RSS {hwm_kib} KiB exceeds budget {BUDGET} + metadata {} + slack {SLACK} = {limit} bytes",
        s.metadata_bytes
    );
}

/// The child process's body; does nothing unless run by `rss_stays_within_budget`.
#[test]
fn child_entry() {
    if std::env::var_os(ENV).is_some() {
        child();
    }
}

#[test]
fn rss_stays_within_budget() {
    let t0 = Instant::now();
    let line = run_self_child(ENV, "1", MARK);
    let field = |k: &str| result_field(&line, k);
    let (hwm, budget, meta) = (field("hwm_kib") * 1024, field("budget"), field("metadata"));
    let limit = budget + meta + SLACK;
    println!("{line}");
    println!(
        "peak RSS {:.1} MiB; budget {:.1} MiB + metadata {:.2} MiB + slack {:.0} MiB = limit {:.1} MiB \
         (child ran {:.1} s)",
        hwm as f64 / 1048576.0,
        budget as f64 / 1048576.0,
        meta as f64 / 1048576.0,
        SLACK as f64 / 1048576.0,
        limit as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(budget, BUDGET as u64);
    assert_eq!(field("pages"), DATA / PAGE_SIZE as u64);
    assert!(hwm <= limit, "peak RSS {hwm} > limit {limit}: {line}");
    // The measurement is real: the frames of the budget were all used.
    assert!(
        hwm >= budget / 2,
        "peak RSS {hwm} implausibly small: {line}"
    );
}
