//! Page-out that keeps failing (issue 9, item 6).
//!
//! - An access that needs a frame while every page-out fails gives up with
//!   `Error::Device` within a bounded time, whatever the budget (the old threshold,
//!   `64 + 2 * frames` failed writes, grew with the budget).
//! - With two devices of equal priority, a device whose writes keep failing stops
//!   getting new slots: page-out goes to the healthy one and nothing is lost.
//! - A device that works again gets slots again after its back-off.
//!
//! Each test body runs under a watchdog that fails the test instead of hanging it.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use usermm::device::faulty::FaultyDevice;
use usermm::device::file::FileDevice;
use usermm::device::BlockDevice;
use usermm::{AddressSpace, Config, Error, Region, SwapId, VAddr, Vm, PAGE_SIZE};

const PS: u64 = PAGE_SIZE as u64;
/// A test body that takes longer than this is stuck.
const WATCHDOG: Duration = Duration::from_secs(60);

/// Runs `f` on its own thread; panics with `report()` if it does not finish within
/// `limit` (the stuck thread is left behind), and re-raises its panic if it panicked.
fn under_watchdog<T: Send + 'static>(
    limit: Duration,
    what: &str,
    report: impl Fn() -> String,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::Builder::new()
        .name(what.into())
        .spawn(move || {
            let r = f();
            let _ = tx.send(());
            r
        })
        .unwrap();
    match rx.recv_timeout(limit) {
        Ok(()) => h.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!(
                "watchdog: {what} did not finish within {limit:?}; {}",
                report()
            )
        }
    }
}

/// A swap file of `bytes` (sparse until written) behind a fault-injecting wrapper,
/// turned on in `vm` with priority 0.
fn faulty_swap(vm: &Vm, dir: &Path, name: &str, bytes: u64) -> (Arc<FaultyDevice>, SwapId) {
    let file = FileDevice::open(&dir.join(name), Some(bytes), name).expect("create swap file");
    let faulty = Arc::new(FaultyDevice::new(Arc::new(file)));
    let id = vm
        .swapon_device(faulty.clone() as Arc<dyn BlockDevice>, 0)
        .expect("swapon of the faulty device");
    (faulty, id)
}

/// A device whose failed writes take `latency` to report, as on a failing disk that
/// retries before it gives up (the fault injector fails at once, which makes any
/// count of failures cheap to reach).
#[derive(Debug)]
struct SlowFailures {
    inner: Arc<FaultyDevice>,
    latency: Duration,
}

impl BlockDevice for SlowFailures {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn pages(&self) -> u64 {
        self.inner.pages()
    }
    fn read_page(&self, slot: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_page(slot, buf)
    }
    fn write_page(&self, slot: u64, buf: &[u8]) -> std::io::Result<()> {
        let r = self.inner.write_page(slot, buf);
        if r.is_err() {
            std::thread::sleep(self.latency);
        }
        r
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, first: u64, count: u64) -> std::io::Result<()> {
        self.inner.discard(first, count)
    }
}

/// The content of page `p`: its number in every 8-byte word, mixed with `salt`.
fn fill(p: u64, salt: u64, buf: &mut [u8]) {
    let v = (p << 8) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(v ^ i as u64).to_le_bytes());
    }
}

fn used_on(vm: &Vm, id: SwapId) -> u64 {
    vm.swaps()
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.used / PS)
        .expect("device in service")
}

// ---------------------------------------------------------------------------------
// a. Giving up is bounded, whatever the budget.

/// The budget: 65,536 frames. The old give-up needed more than `64 + 2 * 65536` =
/// 131,136 failed page-outs seen by one access: with 16 page-I/O threads and 5 ms per
/// failed write, about 41 s.
const BIG_BUDGET: usize = 256 << 20;
/// How long a failed write takes to report.
const FAIL_LATENCY: Duration = Duration::from_millis(5);
/// An access that needs a frame must have its answer within this.
const GIVE_UP_LIMIT: Duration = Duration::from_secs(10);

#[test]
fn access_gives_up_within_bounded_time_at_256_mib() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(BIG_BUDGET)).unwrap();
    let file = FileDevice::open(&dir.path().join("swap"), Some(64 << 20), "swap").unwrap();
    let faulty = Arc::new(FaultyDevice::new(Arc::new(file)));
    let slow = SlowFailures {
        inner: faulty.clone(),
        latency: FAIL_LATENCY,
    };
    vm.swapon_device(Arc::new(slow), 0).unwrap();
    let vm2 = vm.clone();
    let f2 = faulty.clone();
    under_watchdog(
        WATCHDOG,
        "give-up at 256 MiB",
        move || {
            format!(
                "stats {:?}, injected write failures {}",
                vm2.stats(),
                f2.injected_write_errors.load(Ordering::SeqCst)
            )
        },
        move || {
            let _dir = dir;
            let frames = BIG_BUDGET as u64 / PS;
            faulty.set_fail_writes(true);
            let mm = vm.new_space();
            let r = mm.map_anon(2 * BIG_BUDGET).unwrap();
            let mut buf = vec![0u8; PAGE_SIZE];
            let mut failed = None;
            let mut slowest = Duration::ZERO;
            for p in 0..2 * frames {
                fill(p, 1, &mut buf);
                let t = Instant::now();
                let res = mm.write(r.start() + p * PS, &buf);
                let dt = t.elapsed();
                slowest = slowest.max(dt);
                match res {
                    Ok(()) => assert!(
                        dt < GIVE_UP_LIMIT,
                        "write of page {p} took {dt:?} (limit {GIVE_UP_LIMIT:?}); {:?}",
                        vm.stats()
                    ),
                    Err(e) => {
                        match &e {
                            Error::Device { dev, .. } => assert!(
                                dev.contains("faulty"),
                                "Device error names {dev:?}, not the failing device: {e}"
                            ),
                            other => panic!(
                                "write of page {p} with every page-out failing: got {other:?}, \
                                 want Error::Device"
                            ),
                        }
                        failed = Some((p, dt, e));
                        break;
                    }
                }
            }
            let st = vm.stats();
            let Some((p, dt, e)) = failed else {
                panic!("twice the budget written while every page-out fails: {st:?}");
            };
            println!(
                "write of page {p} gave up after {dt:?} (slowest write {slowest:?}): {e}; \
                 {} failed page-outs in all; {st:?}",
                st.write_errors
            );
            assert!(
                dt < GIVE_UP_LIMIT,
                "giving up took {dt:?} (limit {GIVE_UP_LIMIT:?}): {st:?}"
            );
            assert!(
                p + 64 >= frames - frames / 64,
                "gave up at page {p} with {frames} frames: too early? {st:?}"
            );
            // The pages written are resident and intact.
            let mut got = vec![0u8; PAGE_SIZE];
            for q in (0..p).step_by(997) {
                mm.read(r.start() + q * PS, &mut got).unwrap();
                fill(q, 1, &mut buf);
                assert!(got == buf, "page {q} reads back wrong after the give-up");
            }
            // The device works again: the same access succeeds.
            faulty.set_fail_writes(false);
            fill(p, 1, &mut buf);
            mm.write(r.start() + p * PS, &buf)
                .unwrap_or_else(|e| panic!("write of page {p} after failures stopped: {e:?}"));
        },
    );
}

/// Failures that take long to report (100 ms each, two page-I/O threads: 20 a
/// second): the give-up by count would take half a minute, the one by time answers
/// in about 2 s.
#[test]
fn slow_failures_give_up_within_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::default()
        .memory_budget(256 * PAGE_SIZE)
        .io_threads(2)
        .io_requests(8);
    let vm = Vm::new(cfg).unwrap();
    let file = FileDevice::open(&dir.path().join("swap"), Some(16 << 20), "swap").unwrap();
    let faulty = Arc::new(FaultyDevice::new(Arc::new(file)));
    let slow = SlowFailures {
        inner: faulty.clone(),
        latency: Duration::from_millis(100),
    };
    vm.swapon_device(Arc::new(slow), 0).unwrap();
    let vm2 = vm.clone();
    under_watchdog(
        WATCHDOG,
        "give-up with slow failures",
        move || format!("stats {:?}", vm2.stats()),
        move || {
            let _dir = dir;
            faulty.set_fail_writes(true);
            let mm = vm.new_space();
            let r = mm.map_anon(1024 * PAGE_SIZE).unwrap();
            let mut buf = vec![0u8; PAGE_SIZE];
            for p in 0..1024 {
                fill(p, 1, &mut buf);
                let t = Instant::now();
                let res = mm.write(r.start() + p * PS, &buf);
                let dt = t.elapsed();
                let st = vm.stats();
                assert!(
                    dt < GIVE_UP_LIMIT,
                    "write of page {p} took {dt:?} (limit {GIVE_UP_LIMIT:?}): {res:?}; {st:?}"
                );
                if let Err(e) = res {
                    assert!(
                        matches!(&e, Error::Device { dev, .. } if dev.contains("faulty")),
                        "write of page {p}: got {e:?}, want Error::Device naming the device"
                    );
                    println!("write of page {p} gave up after {dt:?}: {e}; {st:?}");
                    // The page-outs still queued complete at once (the Vm waits
                    // for them when dropped).
                    faulty.set_fail_writes(false);
                    return;
                }
            }
            panic!("1024 pages written through 256 frames with every page-out failing");
        },
    );
}

// ---------------------------------------------------------------------------------
// b, c. Two devices of equal priority, one failing.

const FRAMES: usize = 256;

struct Two {
    _dir: tempfile::TempDir,
    vm: Vm,
    bad: Arc<FaultyDevice>,
    bad_id: SwapId,
    good_id: SwapId,
    mm: AddressSpace,
    r: Region,
    /// Salt of the content last written to each page (0: never written).
    ver: Vec<u64>,
}

impl Two {
    fn new(pages: u64) -> Two {
        let dir = tempfile::tempdir().unwrap();
        let vm = Vm::new(Config::default().memory_budget(FRAMES * PAGE_SIZE)).unwrap();
        let (bad, bad_id) = faulty_swap(&vm, dir.path(), "bad", 64 << 20);
        let (_good, good_id) = faulty_swap(&vm, dir.path(), "good", 64 << 20);
        let mm = vm.new_space();
        let r = mm.map_anon((pages * PS) as usize).unwrap();
        Two {
            _dir: dir,
            vm,
            bad,
            bad_id,
            good_id,
            mm,
            r,
            ver: vec![0; pages as usize],
        }
    }
    fn addr(&self, p: u64) -> VAddr {
        self.r.start() + p * PS
    }
    fn bad_failures(&self) -> u64 {
        self.bad.injected_write_errors.load(Ordering::SeqCst)
    }
    /// Writes pages `range` with content `salt`; every write must succeed.
    fn write(&mut self, range: std::ops::Range<u64>, salt: u64, ctx: &str) {
        let mut buf = vec![0u8; PAGE_SIZE];
        for p in range {
            fill(p, salt, &mut buf);
            self.mm.write(self.addr(p), &buf).unwrap_or_else(|e| {
                panic!(
                    "{ctx}: write of page {p} failed although one device is healthy: {e:?}; \
                     {:?}, swaps {:?}",
                    self.vm.stats(),
                    self.vm.swaps()
                )
            });
            self.ver[p as usize] = salt;
        }
    }
    /// Waits for the page-outs in flight (`Vm::reclaim` returns once none is).
    fn settle(&self) {
        self.vm.reclaim(16);
    }
    /// Every page reads back what was last written to it.
    fn check_all(&self, ctx: &str) {
        let mut want = vec![0u8; PAGE_SIZE];
        let mut got = vec![0u8; PAGE_SIZE];
        for (p, &salt) in self.ver.iter().enumerate() {
            let p = p as u64;
            if salt == 0 {
                want.fill(0);
            } else {
                fill(p, salt, &mut want);
            }
            self.mm
                .read(self.addr(p), &mut got)
                .unwrap_or_else(|e| panic!("{ctx}: read of page {p} failed: {e:?}"));
            assert!(got == want, "{ctx}: page {p} reads back wrong");
        }
    }
    /// With the bad device failing every write: after a warm-up in which it is seen
    /// failing, writing `n` more pages (each page-out of a page over the budget)
    /// sends almost nothing to it and everything to the good device.
    fn failing_device_is_avoided(&mut self, warm: u64, n: u64, ctx: &str) {
        self.bad.set_fail_writes(true);
        self.write(0..warm, 1, &format!("{ctx}, warm-up"));
        self.settle();
        let f0 = self.bad_failures();
        assert!(
            f0 > 0,
            "{ctx}: warm-up sent nothing to the failing device: {:?}, swaps {:?}",
            self.vm.stats(),
            self.vm.swaps()
        );
        let good0 = used_on(&self.vm, self.good_id);
        let t = Instant::now();
        self.write(warm..warm + n, 1, ctx);
        self.settle();
        let secs = t.elapsed().as_secs();
        let f1 = self.bad_failures();
        let good1 = used_on(&self.vm, self.good_id);
        let st = self.vm.stats();
        println!(
            "{ctx}: failing device: {f0} failed writes after the warm-up, {f1} after {n} more \
             pages in {:?}; good device {good0} -> {good1} pages; {st:?}",
            t.elapsed()
        );
        // One probe a second may go to the failing device (its back-off), a couple
        // more at the edges.
        let allowed = secs + 4;
        assert!(
            f1 - f0 <= allowed,
            "{ctx}: the failing device got {} more write attempts while {n} pages were \
             written (allowed {allowed}): it is still chosen for new slots; {st:?}",
            f1 - f0
        );
        assert!(
            good1 >= good0 + n / 2,
            "{ctx}: the healthy device took only {} of {n} new pages; {st:?}",
            good1 - good0
        );
        assert_eq!(
            used_on(&self.vm, self.bad_id),
            0,
            "{ctx}: pages are stored on the failing device"
        );
    }
}

#[test]
fn failing_device_gets_no_new_slots() {
    let mut t = Two::new(4096);
    let vm2 = t.vm.clone();
    under_watchdog(
        WATCHDOG,
        "failing device avoided",
        move || format!("stats {:?}, swaps {:?}", vm2.stats(), vm2.swaps()),
        move || {
            t.failing_device_is_avoided(1024, 3072, "one device failing");
            t.check_all("one device failing");
        },
    );
}

#[test]
fn device_working_again_gets_slots_after_back_off() {
    let mut t = Two::new(6144);
    let vm2 = t.vm.clone();
    under_watchdog(
        WATCHDOG,
        "failing device back in service",
        move || format!("stats {:?}, swaps {:?}", vm2.stats(), vm2.swaps()),
        move || {
            t.failing_device_is_avoided(1024, 2048, "before recovery");
            t.bad.set_fail_writes(false);
            // Past the back-off, the next new slot may probe it; once a write there
            // succeeds it is healthy again and takes its share of new pages.
            std::thread::sleep(Duration::from_millis(1500));
            let bad0 = used_on(&t.vm, t.bad_id);
            let good0 = used_on(&t.vm, t.good_id);
            // Rewrite the old pages (their swap copies go stale) and write new ones.
            t.write(0..1024, 2, "after recovery");
            t.write(3072..6144, 2, "after recovery");
            t.settle();
            let bad1 = used_on(&t.vm, t.bad_id);
            let good1 = used_on(&t.vm, t.good_id);
            let st = t.vm.stats();
            println!(
                "after recovery: device that failed {bad0} -> {bad1} pages, healthy one \
                 {good0} -> {good1}; {st:?}, swaps {:?}",
                t.vm.swaps()
            );
            assert!(
                bad1 >= 512,
                "the device that works again holds only {bad1} pages after 4096 more were \
                 written: it was not taken back into service; {st:?}"
            );
            t.check_all("after recovery");
        },
    );
}
