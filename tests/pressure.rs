//! Pressure stall information (`Vm::pressure`, `Vm::on_pressure`; `src/psi.rs`):
//! none when the working set fits, more as it outgrows the budget, triggers that
//! fire under pressure and only then, argument checks. Orderings and thresholds
//! with wide margins: a shared 2-core machine is noisy.
//!
//! With the feature `lockdep` the binary installs the allocation checker, so a heap
//! allocation on a page-I/O thread or in the transparent-fault handler (where the
//! stall marks are made for program threads) fails the run.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use usermm::{Config, Error, Pressure, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::Rng;

#[cfg(feature = "lockdep")]
#[global_allocator]
static ALLOC: usermm::lockdep::CheckedAlloc<std::alloc::System> =
    usermm::lockdep::CheckedAlloc(std::alloc::System);

const BUDGET: usize = 4 << 20;
/// Computing between two accesses of the loads that compare shares.
const THINK: Duration = Duration::from_micros(50);

/// A Vm with a `BUDGET` budget and a file swap device.
fn vm() -> (tempfile::TempDir, Vm) {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(BUDGET)).unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("swap"), 256 << 20))
        .unwrap();
    (dir, vm)
}

/// What a load did: the pressure before and after, and its wall time.
struct Load {
    before: Pressure,
    after: Pressure,
    wall: Duration,
}

impl Load {
    /// The `some` stall share of the load's wall time, in percent.
    fn some_share(&self) -> f64 {
        (self.after.total_some - self.before.total_some).as_secs_f64() / self.wall.as_secs_f64()
            * 100.0
    }
    fn full_share(&self) -> f64 {
        (self.after.total_full - self.before.total_full).as_secs_f64() / self.wall.as_secs_f64()
            * 100.0
    }
}

/// Writes every page of a working set of `ws` bytes, then runs random 8-byte
/// accesses (half writes) from `threads` threads for `dur`, each after `think` of
/// computing (a loop that stalls on every miss spends nearly all its time stalled
/// at any miss rate: the share would say nothing). Pressure is measured over the
/// random phase only.
fn load(vm: &Vm, ws: usize, threads: usize, dur: Duration, think: Duration) -> Load {
    let mm = vm.new_space();
    let r = mm.map_anon(ws).unwrap();
    let pages = (ws / PAGE_SIZE) as u64;
    for p in 0..pages {
        mm.write(r.start() + p * PAGE_SIZE as u64, &p.to_le_bytes())
            .unwrap();
    }
    let before = vm.pressure();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let mm = &mm;
            s.spawn(move || {
                let mut rng = Rng::for_thread(0x9e55, t as u64);
                let mut n = 0u64;
                while !n.is_multiple_of(64) || t0.elapsed() < dur {
                    let busy = Instant::now();
                    while busy.elapsed() < think {
                        std::hint::spin_loop();
                    }
                    let p = rng.below(pages);
                    let a = r.start() + p * PAGE_SIZE as u64;
                    if rng.below(2) == 0 {
                        mm.write(a + 8, &n.to_le_bytes()).unwrap();
                    } else {
                        let mut b = [0u8; 8];
                        mm.read(a, &mut b).unwrap();
                        assert_eq!(u64::from_le_bytes(b), p, "page {p}");
                    }
                    n += 1;
                }
            });
        }
    });
    let wall = t0.elapsed();
    let after = vm.pressure();
    mm.unmap(r).unwrap();
    Load {
        before,
        after,
        wall,
    }
}

#[test]
fn no_pressure_when_the_working_set_fits() {
    let (_d, vm) = vm();
    let l = load(
        &vm,
        BUDGET / 2,
        2,
        Duration::from_millis(800),
        Duration::ZERO,
    );
    let p = l.after;
    println!("fits: {p:?}, some {:.3}% of {:?}", l.some_share(), l.wall);
    assert!(l.some_share() < 1.0, "{p:?}");
    assert!(p.some.avg10 < 1.0 && p.full.avg10 < 1.0, "{p:?}");
    assert!(p.total_some < Duration::from_millis(20), "{p:?}");
}

#[test]
fn pressure_rises_with_the_working_set() {
    let (_d1, vm1) = vm();
    let one = load(&vm1, BUDGET, 2, Duration::from_millis(1000), THINK);
    let (_d4, vm4) = vm();
    let four = load(&vm4, 4 * BUDGET, 2, Duration::from_millis(1000), THINK);
    println!(
        "W/B 1: some {:.2}% full {:.2}% {:?}\nW/B 4: some {:.2}% full {:.2}% {:?}",
        one.some_share(),
        one.full_share(),
        one.after,
        four.some_share(),
        four.full_share(),
        four.after
    );
    assert!(
        four.some_share() > 10.0,
        "W/B 4 should stall often: {:.2}%",
        four.some_share()
    );
    assert!(
        four.some_share() > one.some_share() + 10.0,
        "some share at W/B 4 ({:.2}%) not above W/B 1 ({:.2}%)",
        four.some_share(),
        one.some_share()
    );
    assert!(four.after.total_some > one.after.total_some);
    assert!(four.after.some.avg10 > one.after.some.avg10);
    // `full` never exceeds `some` (µs rounding aside), and two threads stall at
    // once only part of the time.
    for l in [&one, &four] {
        assert!(
            l.after.total_full <= l.after.total_some + Duration::from_millis(1),
            "{:?}",
            l.after
        );
        assert!(
            l.after.full.avg10 <= l.after.some.avg10 + 0.01,
            "{:?}",
            l.after
        );
    }
}

/// `full` is the time every non-idle thread is stalled: a thread that keeps
/// hitting resident pages while another thrashes keeps it low, though `some` is
/// high.
#[test]
fn full_needs_every_thread_stalled() {
    let (_d, vm) = vm();
    let mm = vm.new_space();
    let hot = mm.map_anon(64 * PAGE_SIZE).unwrap();
    let cold = mm.map_anon(4 * BUDGET).unwrap();
    let cold_pages = (4 * BUDGET / PAGE_SIZE) as u64;
    for p in 0..64u64 {
        mm.write(hot.start() + p * PAGE_SIZE as u64, &p.to_le_bytes())
            .unwrap();
    }
    for p in 0..cold_pages {
        mm.write(cold.start() + p * PAGE_SIZE as u64, &p.to_le_bytes())
            .unwrap();
    }
    let before = vm.pressure();
    let t0 = Instant::now();
    let dur = Duration::from_millis(1000);
    std::thread::scope(|s| {
        let mm = &mm;
        s.spawn(move || {
            let mut rng = Rng::new(1);
            while t0.elapsed() < dur {
                let p = rng.below(64);
                let mut b = [0u8; 8];
                mm.read(hot.start() + p * PAGE_SIZE as u64, &mut b).unwrap();
                assert_eq!(u64::from_le_bytes(b), p);
            }
        });
        s.spawn(move || {
            let mut rng = Rng::new(2);
            while t0.elapsed() < dur {
                let p = rng.below(cold_pages);
                let mut b = [0u8; 8];
                mm.read(cold.start() + p * PAGE_SIZE as u64, &mut b)
                    .unwrap();
                assert_eq!(u64::from_le_bytes(b), p);
            }
        });
    });
    let wall = t0.elapsed().as_secs_f64();
    let after = vm.pressure();
    let some = (after.total_some - before.total_some).as_secs_f64() / wall * 100.0;
    let full = (after.total_full - before.total_full).as_secs_f64() / wall * 100.0;
    println!("one thread thrashing, one hitting: some {some:.1}% full {full:.1}%");
    assert!(some > 30.0, "some {some:.1}%");
    assert!(full < some / 3.0, "some {some:.1}% full {full:.1}%");
}

#[test]
fn a_trigger_fires_under_pressure_only_and_stops_when_dropped() {
    let window = Duration::from_millis(500);
    // Without pressure: no call.
    let (_d, calm) = vm();
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let t = calm
        .on_pressure(Duration::from_millis(20), window, move |_| {
            c.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    load(
        &calm,
        BUDGET / 2,
        1,
        Duration::from_millis(1200),
        Duration::ZERO,
    );
    assert_eq!(calls.load(Ordering::Relaxed), 0, "fired without pressure");
    drop(t);

    // Under pressure (W/B 4): called, at most once per window, each time with at
    // least the threshold of stall time.
    let (_d, vm) = vm();
    let calls = Arc::new(AtomicU64::new(0));
    let least = Arc::new(AtomicU64::new(u64::MAX));
    let (c, l) = (calls.clone(), least.clone());
    let threshold = Duration::from_millis(50);
    let t = vm
        .on_pressure(threshold, window, move |stalled| {
            c.fetch_add(1, Ordering::Relaxed);
            l.fetch_min(stalled.as_micros() as u64, Ordering::Relaxed);
        })
        .unwrap();
    let t0 = Instant::now();
    let l1 = load(&vm, 4 * BUDGET, 2, Duration::from_millis(1500), THINK);
    let took = t0.elapsed();
    // Let a due sample be taken.
    std::thread::sleep(Duration::from_millis(100));
    let n = calls.load(Ordering::Relaxed);
    println!(
        "{n} calls in {took:?} (some {:.1}%), least stall {} µs",
        l1.some_share(),
        least.load(Ordering::Relaxed)
    );
    assert!(
        n >= 1,
        "no call under pressure ({:.1}% stalled)",
        l1.some_share()
    );
    let most = (took + Duration::from_millis(100)).as_millis() / window.as_millis() + 1;
    assert!(
        n as u128 <= most,
        "{n} calls in {took:?}: more than one per window"
    );
    assert!(least.load(Ordering::Relaxed) >= threshold.as_micros() as u64);

    // Dropped: no more calls, under the same pressure.
    drop(t);
    let after_drop = calls.load(Ordering::Relaxed);
    load(&vm, 4 * BUDGET, 2, Duration::from_millis(1000), THINK);
    assert_eq!(
        calls.load(Ordering::Relaxed),
        after_drop,
        "called after drop"
    );
}

#[test]
fn bad_trigger_arguments_are_refused() {
    let (_d, vm) = vm();
    let ms = Duration::from_millis;
    for (threshold, window) in [
        (ms(10), ms(499)),
        (ms(10), ms(10_001)),
        (ms(0), ms(1000)),
        (ms(1001), ms(1000)),
    ] {
        match vm.on_pressure(threshold, window, |_| {}) {
            Err(Error::InvalidArgument(_)) => {}
            other => panic!("{threshold:?}/{window:?}: {other:?}"),
        }
    }
    for (threshold, window) in [(ms(1), ms(500)), (ms(10_000), ms(10_000))] {
        vm.on_pressure(threshold, window, |_| {}).unwrap();
    }
}

/// A program thread faulting on transparent memory is stalled while the handler
/// reads its page back: the handler marks it (and, under `lockdep`, allocates
/// nothing doing so).
#[test]
fn transparent_faults_stall() {
    let Some((_d, vm)) = common::transparent_setup(BUDGET, 256 << 20) else {
        return;
    };
    let bytes = 4 * BUDGET;
    let r = vm.map_transparent(bytes).unwrap();
    let words = bytes / 8;
    let per_page = PAGE_SIZE / 8;
    for i in (0..words).step_by(per_page) {
        common::word(&r, i).store(i as u64 + 1, Ordering::Relaxed);
    }
    let before = vm.pressure();
    let mut rng = Rng::new(7);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(800) {
        let i = rng.below((words / per_page) as u64) as usize * per_page;
        assert_eq!(common::word(&r, i).load(Ordering::Relaxed), i as u64 + 1);
    }
    let after = vm.pressure();
    let share = (after.total_some - before.total_some).as_secs_f64() / t0.elapsed().as_secs_f64();
    println!("transparent W/B 4: some {:.1}% {after:?}", share * 100.0);
    assert!(share > 0.05, "{after:?}");
    // One program thread: every stall of it is a full one.
    assert!(after.total_full > Duration::ZERO, "{after:?}");
}
