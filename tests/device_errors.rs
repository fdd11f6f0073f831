//! Swap device failures, injected by `FaultyDevice` around a real swap file.
//!
//! The contract (docs/design.md, error handling): a device failure is an error for the
//! access that needed it, never silent corruption and never a lost page.
//! - A failed page-out leaves the page resident and dirty; a later page-out retries.
//! - A failed swap-in is `Error::Device` for that access only; the page stays stored.
//! - Data that fails its checksum is `Error::Device`, never data.
//! - Under a random failure rate, every access returns the right data or an error.

mod common;

use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use usermm::device::faulty::FaultyDevice;
use usermm::{AddressSpace, Config, Error, Region, VAddr, Vm, PAGE_SIZE};
use usermm_testkit::pattern::{fill_random, first_diff, page_pattern};
use usermm_testkit::watchdog::run_workers;

const PS: u64 = PAGE_SIZE as u64;
const FRAMES: usize = 64;
/// A `Vm::reclaim` that takes longer than this is stuck.
const RECLAIM_LIMIT: Duration = Duration::from_secs(20);

struct Setup {
    _dir: tempfile::TempDir,
    vm: Vm,
    faulty: Arc<FaultyDevice>,
    mm: AddressSpace,
    r: Region,
}

fn setup(pages: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    // No readahead: these tests count one device read (and one major fault) per
    // page they read back, and decide which reads fail page by page.
    let vm = Vm::new(
        Config::default()
            .memory_budget(FRAMES * PAGE_SIZE)
            .readahead(false),
    )
    .unwrap();
    let (faulty, _) = faulty_swap(&vm, dir.path(), "swap", 32 << 20);
    let mm = vm.new_space();
    let r = mm.map_anon((pages * PS) as usize).unwrap();
    Setup {
        _dir: dir,
        vm,
        faulty,
        mm,
        r,
    }
}

fn key(p: u64, version: u64) -> u64 {
    (p << 20) ^ version
}

fn want_page(p: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_SIZE];
    if version != 0 {
        page_pattern(key(p, version), &mut b);
    }
    b
}

impl Setup {
    fn addr(&self, p: u64) -> VAddr {
        self.r.start() + p * PS
    }
    fn write(&self, p: u64, version: u64) -> Result<(), Error> {
        self.mm.write(self.addr(p), &want_page(p, version))
    }
    fn read(&self, p: u64) -> Result<Vec<u8>, Error> {
        let mut b = vec![0u8; PAGE_SIZE];
        self.mm.read(self.addr(p), &mut b).map(|_| b)
    }
    /// Reads page `p` and checks it holds `version`.
    fn check(&self, p: u64, version: u64, ctx: &str) {
        let got = self
            .read(p)
            .unwrap_or_else(|e| panic!("{ctx}: read of page {p} failed: {e:?}"));
        if let Some(d) = first_diff(&got, &want_page(p, version)) {
            panic!("{ctx}: page {p} (version {version}) reads back wrong: {d}");
        }
    }
    /// Evicts every resident page (panics if memory cannot be emptied).
    fn evict_all(&self) {
        for _ in 0..20 {
            reclaim_within(&self.vm, 10 * FRAMES, RECLAIM_LIMIT, "evict_all");
            let s = self.vm.stats();
            if s.free_frames == s.total_frames {
                return;
            }
        }
        let s = self.vm.stats();
        panic!("reclaim could not empty memory: {s:?}");
    }
}

/// Checks `e` is `Error::Device` naming the faulty device.
fn assert_device_error(e: &Error, ctx: &str) {
    match e {
        Error::Device { dev, .. } => {
            assert!(
                dev.contains("faulty"),
                "{ctx}: Device error names {dev:?}: {e}"
            );
        }
        other => panic!("{ctx}: got {other:?}, want Error::Device"),
    }
}

/// `Vm::reclaim` while every page-out fails: it returns (having freed nothing), the
/// pages stay resident (no swap-in needed to read them), dirty and intact, and their
/// slots are given back.
#[test]
fn failed_page_out_keeps_page_resident_and_dirty() {
    let s = setup(256);
    let n = 40;
    for p in 0..n {
        s.write(p, 1).unwrap();
    }
    s.faulty.set_fail_writes(true);
    let s0 = s.vm.stats();
    let freed = reclaim_within(
        &s.vm,
        n as usize,
        RECLAIM_LIMIT,
        "reclaim with failing writes",
    );
    let s1 = s.vm.stats();
    println!("after failing reclaim: freed {freed}, {s1:?}");
    assert_eq!(
        freed, 0,
        "reclaim freed frames although every page-out failed: {s1:?}"
    );
    assert!(
        s1.write_errors > s0.write_errors,
        "no write error counted: {s1:?}"
    );
    assert_eq!(
        s1.write_errors,
        s.faulty.injected_write_errors.load(Ordering::SeqCst),
        "write_errors differs from the failures injected"
    );
    assert_eq!(s1.pswpout, 0, "{s1:?}");
    assert_eq!(
        s1.swap_used[0].1, 0,
        "failed page-outs kept their slots: {s1:?}"
    );
    // Still resident (no swap-in needed) and intact.
    for p in 0..n {
        s.check(p, 1, "after failed page-out");
    }
    let s2 = s.vm.stats();
    assert_eq!(
        s2.pgmajfault, s1.pgmajfault,
        "pages were dropped although their page-out failed"
    );
    // Failures off: the retried page-outs succeed.
    s.faulty.set_fail_writes(false);
    s.evict_all();
    let s3 = s.vm.stats();
    assert_eq!(s3.pswpout, n, "{s3:?}");
    for p in 0..n {
        s.check(p, 1, "after failures stopped");
    }
    assert_eq!(s.vm.stats().pgmajfault, s2.pgmajfault + n);
}

/// Memory pressure while every page-out fails: each access either succeeds or fails
/// with `Error::Device` (no frame can be freed); nothing stored is lost, a failed
/// write writes nothing, and once the device works again everything goes out and
/// comes back right.
#[test]
fn pressure_with_failing_page_out_loses_nothing() {
    let s = setup(256);
    let n = 40;
    for p in 0..n {
        s.write(p, 1).unwrap();
    }
    s.faulty.set_fail_writes(true);
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for p in n..160 {
        match s.write(p, 1) {
            Ok(()) => ok.push(p),
            Err(e) => {
                assert_device_error(&e, &format!("write of page {p} under pressure"));
                failed.push(p);
            }
        }
    }
    let s3 = s.vm.stats();
    println!(
        "pressure with failing writes: {} writes ok, {} failed; {s3:?}",
        ok.len(),
        failed.len()
    );
    assert!(
        !failed.is_empty(),
        "160 pages fit in 64 frames without page-out?"
    );
    assert!(
        n as usize + ok.len() <= FRAMES,
        "more pages stored than frames: {s3:?}"
    );
    assert!(s3.write_errors > 0, "{s3:?}");
    assert_eq!(s3.pswpout, 0);
    for p in (0..n).chain(ok.iter().copied()) {
        s.check(p, 1, "pressure with failing writes");
    }
    for &p in &failed {
        s.check(p, 0, "a failed write must not have written");
    }

    // Failures off: the retried page-outs succeed and everything is still right.
    s.faulty.set_fail_writes(false);
    for &p in &failed {
        s.write(p, 1)
            .unwrap_or_else(|e| panic!("write of page {p} after failures stopped: {e:?}"));
    }
    s.evict_all();
    let s4 = s.vm.stats();
    assert!(s4.pswpout >= 160, "not every page was written out: {s4:?}");
    for p in 0..160 {
        s.check(p, 1, "after failures stopped");
    }
    let s5 = s.vm.stats();
    assert!(
        s5.pgmajfault >= s4.pgmajfault + 160,
        "pages were not read from swap: {s5:?}"
    );
    drop(s.mm);
    assert_no_leak(&s.vm, Duration::from_secs(10), "failed writes");
}

#[test]
fn some_failed_page_outs_are_retried() {
    let s = setup(256);
    let n = 40;
    for p in 0..n {
        s.write(p, 1).unwrap();
    }
    s.faulty.fail_next_writes(10);
    s.evict_all();
    let st = s.vm.stats();
    assert_eq!(s.faulty.injected_write_errors.load(Ordering::SeqCst), 10);
    assert_eq!(st.write_errors, 10, "{st:?}");
    assert_eq!(st.pswpout, n, "each page written out exactly once: {st:?}");
    assert_eq!(st.swap_used[0].1, n * PS, "{st:?}");
    for p in 0..n {
        s.check(p, 1, "after retried page-outs");
    }
    assert_eq!(s.vm.stats().pgmajfault, n);
}

#[test]
fn failed_swap_in_is_an_error_for_that_access_only() {
    let s = setup(256);
    let n = 128;
    for p in 0..n {
        s.write(p, 1).unwrap();
    }
    s.evict_all();
    // Pages 0..8 back in memory (clean, with their swap copy).
    for p in 0..8 {
        s.check(p, 1, "swap-in before failures");
    }
    s.faulty.set_fail_reads(true);
    let r0 = s.vm.stats().read_errors;
    let mut errs = Vec::new();
    for p in 0..n {
        match s.read(p) {
            Ok(got) => {
                if let Some(d) = first_diff(&got, &want_page(p, 1)) {
                    panic!("page {p} read while reads fail returned wrong data: {d}");
                }
            }
            Err(e) => {
                assert_device_error(&e, &format!("read of page {p} with failing reads"));
                assert!(p >= 8, "resident page {p} needed the device: {e}");
                errs.push(p);
            }
        }
    }
    assert_eq!(
        errs.len() as u64,
        n - 8,
        "pages on swap that read without the device"
    );
    assert_eq!(s.vm.stats().read_errors - r0, errs.len() as u64);
    // Writes and guards that need the page fail the same way, and write nothing.
    let p = errs[0];
    let e = s.mm.write(s.addr(p) + 100, b"must not land").unwrap_err();
    assert_device_error(&e, "partial write of a page that cannot be read");
    let e = s.mm.page_mut(s.addr(p)).map(|_| ()).unwrap_err();
    assert_device_error(&e, "page_mut of a page that cannot be read");
    let e = s.mm.page(s.addr(p) + 5).map(|_| ()).unwrap_err();
    assert_device_error(&e, "page of a page that cannot be read");
    let e =
        s.mm.read(VAddr(s.addr(p).as_u64() - 10), &mut [0u8; 20])
            .unwrap_err();
    assert_device_error(&e, "read across into a page that cannot be read");
    // A fresh page is still writable (zero fill needs no device read).
    s.write(200, 1).unwrap();
    s.check(200, 1, "new page while reads fail");

    s.faulty.set_fail_reads(false);
    for p in 0..n {
        s.check(p, 1, "after read failures stopped");
    }

    // Exactly one failure: that access fails, the next read of the same page works.
    s.evict_all();
    let inj0 = s.faulty.injected_read_errors.load(Ordering::SeqCst);
    s.faulty.fail_next_reads(1);
    let e = s.read(77).unwrap_err();
    assert_device_error(&e, "read of page 77 with one failure injected");
    s.check(77, 1, "reread after a single failure");
    s.check(78, 1, "other page after a single failure");
    assert_eq!(
        s.faulty.injected_read_errors.load(Ordering::SeqCst) - inj0,
        1
    );
    drop(s.mm);
    assert_no_leak(&s.vm, Duration::from_secs(10), "failed reads");
}

#[test]
fn corrupt_data_is_an_error_never_data() {
    let s = setup(256);
    let n = 128;
    for p in 0..n {
        s.write(p, 1).unwrap();
    }
    s.evict_all();
    s.faulty.set_corrupt_reads(true);
    let mut errs = 0;
    for p in 0..n {
        match s.read(p) {
            Ok(got) => panic!(
                "page {p} read from a corrupting device returned data ({})",
                first_diff(&got, &want_page(p, 1)).unwrap_or_else(|| "right data".into())
            ),
            Err(e) => {
                assert_device_error(&e, &format!("corrupt read of page {p}"));
                if let Error::Device { source, .. } = &e {
                    assert_eq!(
                        source.kind(),
                        std::io::ErrorKind::InvalidData,
                        "checksum mismatch should be InvalidData: {e}"
                    );
                }
                errs += 1;
            }
        }
    }
    assert_eq!(errs, n);
    let g = s.mm.page(s.addr(3)).map(|_| ());
    assert_device_error(&g.unwrap_err(), "page guard on corrupt data");
    s.faulty.set_corrupt_reads(false);
    for p in 0..n {
        s.check(p, 1, "after corruption stopped");
    }
    assert!(s.vm.stats().read_errors >= n);
}

#[test]
fn random_failures_never_give_wrong_data() {
    const THREADS: usize = 4;
    const PAGES: u64 = 192;
    const OPS: usize = 2_500;
    let seed = seed(0x5EED_0005);
    let s = Arc::new(setup(THREADS as u64 * PAGES));
    s.faulty.set_failure_rate(300_000, seed);
    // Per thread, once it is done: the expected content of each of its pages.
    type Models = Arc<Mutex<Vec<Option<Vec<Vec<u8>>>>>>;
    let models: Models = Arc::new(Mutex::new(vec![None; THREADS]));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // ok reads, errors, ok writes, guard ops
    let (s2, m2, c2) = (s.clone(), models.clone(), counts.clone());
    let vm = s.vm.clone();
    run_workers(
        THREADS,
        Duration::from_secs(30),
        move || format!("stats: {:?}\n", vm.stats()),
        move |me| {
            let tid = me.tid();
            let s = &*s2;
            let mut rng = thread_rng(seed, tid);
            let first = tid as u64 * PAGES;
            let mut model = vec![vec![0u8; PAGE_SIZE]; PAGES as usize];
            let ctx = |i: usize| format!("seed={seed} thread={tid} op#{i}");
            for i in 0..OPS {
                if me.should_stop() {
                    return;
                }
                let p = rng.below(PAGES);
                let a = s.addr(first + p);
                let x = rng.below(10);
                if x < 5 {
                    // A write inside one page: on error it must write nothing.
                    let off = rng.below(PS) as usize;
                    let len = 1 + rng.below(PS - off as u64) as usize;
                    let mut data = vec![0u8; len];
                    fill_random(&mut rng, &mut data);
                    me.begin(|| format!("op#{i} write({:?}, {len})", a + off as u64));
                    match s.mm.write(a + off as u64, &data) {
                        Ok(()) => {
                            model[p as usize][off..off + len].copy_from_slice(&data);
                            c2[2].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            assert_device_error(&e, &ctx(i));
                            c2[1].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else if x < 9 {
                    // A read of up to two pages (within this thread's pages).
                    let off = rng.below(PS) as usize;
                    let max = if p + 1 < PAGES { 2 * PS } else { PS } - off as u64;
                    let len = 1 + rng.below(max) as usize;
                    let mut buf = vec![0u8; len];
                    me.begin(|| format!("op#{i} read({:?}, {len})", a + off as u64));
                    match s.mm.read(a + off as u64, &mut buf) {
                        Ok(()) => {
                            let mut want = model[p as usize][off..].to_vec();
                            if off + len > PAGE_SIZE {
                                want.extend_from_slice(&model[p as usize + 1]);
                            }
                            if let Some(d) = first_diff(&buf, &want[..len]) {
                                panic!(
                                    "{}: read({:?}, {len}) returned wrong data: {d}",
                                    ctx(i),
                                    a + off as u64
                                );
                            }
                            c2[0].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            assert_device_error(&e, &ctx(i));
                            c2[1].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else {
                    // Guard: check the page, change one byte.
                    me.begin(|| format!("op#{i} page_mut({a:?})"));
                    match s.mm.page_mut(a) {
                        Ok(mut g) => {
                            if let Some(d) = first_diff(&g, &model[p as usize]) {
                                panic!("{}: page_mut({a:?}) shows wrong data: {d}", ctx(i));
                            }
                            let k = rng.below(PS) as usize;
                            g[k] = g[k].wrapping_add(1);
                            model[p as usize][k] = g[k];
                            c2[3].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            assert_device_error(&e, &ctx(i));
                            c2[1].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                me.done();
            }
            m2.lock().unwrap()[tid] = Some(model);
        },
    );
    let st = s.vm.stats();
    let c: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    println!(
        "seed={seed}: ok reads {}, errors {}, ok writes {}, guard ops {}; injected {} write / {} read \
         failures; {st:?}",
        c[0],
        c[1],
        c[2],
        c[3],
        s.faulty.injected_write_errors.load(Ordering::SeqCst),
        s.faulty.injected_read_errors.load(Ordering::SeqCst),
    );
    assert!(
        c[0] > 0 && c[1] > 0 && c[2] > 0,
        "seed={seed}: workload did not exercise both outcomes"
    );
    assert!(
        st.write_errors > 0 && st.read_errors > 0,
        "seed={seed}: {st:?}"
    );
    // Failures off: every page of every thread reads back exactly.
    s.faulty.set_failure_rate(0, 0);
    let models = std::mem::take(&mut *models.lock().unwrap());
    for (tid, m) in models.into_iter().enumerate() {
        let m = m.unwrap();
        for (p, want) in m.iter().enumerate() {
            let pg = tid as u64 * PAGES + p as u64;
            let got = s.read(pg).unwrap_or_else(|e| {
                panic!("seed={seed}: final read of thread {tid} page {p}: {e:?}")
            });
            if let Some(d) = first_diff(&got, want) {
                panic!("seed={seed}: thread {tid} page {p} wrong after failures stopped: {d}");
            }
        }
    }
    let s = Arc::try_unwrap(s)
        .ok()
        .expect("workers still hold the setup");
    drop(s.mm);
    assert_no_leak(&s.vm, Duration::from_secs(10), &format!("seed={seed}"));
}
