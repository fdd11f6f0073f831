//! Helpers shared by the integration tests: seeds, page patterns, a fault-injecting
//! swap device on a real file, and a runner that watches worker threads for progress
//! so a deadlock fails the test with a report instead of hanging it.
#![allow(dead_code)]

use std::any::Any;
use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use usermm::device::faulty::FaultyDevice;
use usermm::device::file::FileDevice;
use usermm::device::BlockDevice;
use usermm::{SwapId, Vm, PAGE_SIZE};
use usermm_testkit::workload::Rng;

/// The seed of this run: `USERMM_SEED` (decimal or 0x-hex) or `default`.
pub fn seed(default: u64) -> u64 {
    let s = match std::env::var("USERMM_SEED") {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("USERMM_SEED={v:?} is not a number"))
        }
        Err(_) => default,
    };
    println!("seed = {s} (rerun with USERMM_SEED={s})");
    s
}

/// A generator for thread `tid` of a run with `seed`.
pub fn thread_rng(seed: u64, tid: usize) -> Rng {
    Rng::new(seed ^ (tid as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Fills `buf` with random bytes.
pub fn fill_random(rng: &mut Rng, buf: &mut [u8]) {
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let w = rng.next_u64().to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&w[..n]);
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The content of a page identified by `key` (any mix of page number, thread and
/// version): every 8-byte word differs, and no two keys give the same page.
pub fn page_pattern(key: u64, out: &mut [u8]) {
    assert_eq!(out.len(), PAGE_SIZE);
    let base = mix(key.wrapping_add(0x1234_5678_9ABC_DEF1));
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(base ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes());
    }
}

/// Describes the first difference between `got` and `want` (or None if equal).
pub fn first_diff(got: &[u8], want: &[u8]) -> Option<String> {
    assert_eq!(got.len(), want.len());
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let n = got[i..]
        .iter()
        .zip(&want[i..])
        .filter(|(a, b)| a != b)
        .count();
    let end = (i + 16).min(got.len());
    Some(format!(
        "first difference at byte {i} of {} ({n} bytes differ): got {:02x?}, want {:02x?}",
        got.len(),
        &got[i..end],
        &want[i..end]
    ))
}

/// A swap file of `bytes` in `dir` behind a fault-injecting wrapper, turned on in `vm`.
pub fn faulty_swap(vm: &Vm, dir: &Path, name: &str, bytes: u64) -> (Arc<FaultyDevice>, SwapId) {
    let file = FileDevice::open(&dir.join(name), Some(bytes), name).expect("create swap file");
    let faulty = Arc::new(FaultyDevice::new(Arc::new(file)));
    let id = vm
        .swapon_device(faulty.clone() as Arc<dyn BlockDevice>, 0)
        .expect("swapon of the faulty device");
    (faulty, id)
}

/// Waits until every frame is free and every swap device is empty (page-outs still
/// in flight when the last space went away give their slots back when they finish),
/// then returns; panics with the stats if that does not happen within `limit`.
pub fn assert_no_leak(vm: &Vm, limit: Duration, ctx: &str) {
    let t0 = Instant::now();
    loop {
        let s = vm.stats();
        let swap_free = s.swap_used.iter().all(|&(_, u)| u == 0);
        let swaps_free = vm.swaps().iter().all(|d| d.used == 0);
        if s.free_frames == s.total_frames && swap_free && swaps_free {
            return;
        }
        if t0.elapsed() > limit {
            panic!(
                "{ctx}: leak after dropping every space: free_frames {} of {}, swap_used {:?}, \
                 swaps {:?}, stats {s:?}",
                s.free_frames,
                s.total_frames,
                s.swap_used,
                vm.swaps()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads `VmHWM` and `VmRSS` (in KiB) from `/proc/<pid>/status`.
pub fn hwm_rss_kib(status: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc status:\n{status}"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

// ---------------------------------------------------------------------------------
// Worker threads under a watchdog.

/// What one worker is doing, for the watchdog's report.
#[derive(Debug, Default)]
pub struct Slot {
    /// Operations completed.
    pub done: AtomicU64,
    /// Milliseconds since the start when the last operation completed.
    pub last_ms: AtomicU64,
    pub finished: AtomicBool,
    /// The operation in progress (set by `begin`).
    pub current: Mutex<String>,
}

/// Progress of every worker of a run.
#[derive(Debug)]
pub struct Progress {
    pub start: Instant,
    pub slots: Vec<Slot>,
    /// Set when a worker failed or the watchdog fired: workers should stop.
    pub stop: AtomicBool,
}

/// A worker's view of its own progress slot.
pub struct Me<'a> {
    pub tid: usize,
    p: &'a Progress,
}

impl Me<'_> {
    /// Records the operation about to start (kept short: it is formatted lazily only
    /// when the closure is called, which is every operation, so keep it cheap).
    pub fn begin(&self, what: impl FnOnce() -> String) {
        *self.p.slots[self.tid].current.lock().unwrap() = what();
    }
    /// Records that an operation completed.
    pub fn done(&self) {
        let s = &self.p.slots[self.tid];
        s.done.fetch_add(1, Ordering::Relaxed);
        s.last_ms
            .store(self.p.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// Whether the run is being abandoned (another worker failed).
    pub fn should_stop(&self) -> bool {
        self.p.stop.load(Ordering::Relaxed)
    }
}

fn panic_message(e: &Box<dyn Any + Send>) -> String {
    if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = e.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "non-string panic".into()
    }
}

impl Progress {
    fn report(&self) -> String {
        let now = self.start.elapsed().as_millis() as u64;
        let mut out = String::new();
        for (i, s) in self.slots.iter().enumerate() {
            let _ = writeln!(
                out,
                "  thread {i}: {} ops done, last completed {} ms ago, finished={}, in progress: {}",
                s.done.load(Ordering::Relaxed),
                now.saturating_sub(s.last_ms.load(Ordering::Relaxed)),
                s.finished.load(Ordering::Relaxed),
                s.current.lock().map(|c| c.clone()).unwrap_or_default()
            );
        }
        out
    }
}

/// Runs `n` workers `f(me)` and watches them: if a worker that has not finished
/// completes no operation for `stall`, the test fails with what every worker was
/// doing (the stuck threads are left behind; the process exits with the harness).
/// A worker's panic fails the test with its message. `extra` is called with the
/// report when the watchdog fires (to add engine stats).
pub fn run_workers<F>(n: usize, stall: Duration, extra: impl Fn() -> String, f: F)
where
    F: Fn(&Me) + Send + Sync + 'static,
{
    let p = Arc::new(Progress {
        start: Instant::now(),
        slots: (0..n).map(|_| Slot::default()).collect(),
        stop: AtomicBool::new(false),
    });
    let f = Arc::new(f);
    let mut handles: Vec<Option<JoinHandle<Result<(), String>>>> = (0..n)
        .map(|tid| {
            let p = p.clone();
            let f = f.clone();
            Some(
                std::thread::Builder::new()
                    .name(format!("worker-{tid}"))
                    .spawn(move || {
                        let me = Me { tid, p: &p };
                        let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(&me)));
                        p.slots[tid].finished.store(true, Ordering::SeqCst);
                        r.map_err(|e| {
                            p.stop.store(true, Ordering::SeqCst);
                            panic_message(&e)
                        })
                    })
                    .unwrap(),
            )
        })
        .collect();
    let mut failures = Vec::new();
    loop {
        let mut running = 0;
        for (tid, h) in handles.iter_mut().enumerate() {
            if h.as_ref().is_some_and(|h| h.is_finished()) {
                if let Err(m) = h.take().unwrap().join().unwrap() {
                    failures.push(format!("thread {tid} failed: {m}"));
                }
            }
            if h.is_some() {
                running += 1;
            }
        }
        if !failures.is_empty() {
            // Give the others a moment to notice `stop`, then report.
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5)
                && handles.iter().flatten().any(|h| !h.is_finished())
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            for (tid, h) in handles.iter_mut().enumerate() {
                if h.as_ref().is_some_and(|h| h.is_finished()) {
                    if let Err(m) = h.take().unwrap().join().unwrap() {
                        if !failures
                            .iter()
                            .any(|f| f.starts_with(&format!("thread {tid} ")))
                        {
                            failures.push(format!("thread {tid} failed: {m}"));
                        }
                    }
                }
            }
            panic!("{}\nprogress:\n{}", failures.join("\n"), p.report());
        }
        if running == 0 {
            return;
        }
        let now = p.start.elapsed().as_millis() as u64;
        for (tid, s) in p.slots.iter().enumerate() {
            if s.finished.load(Ordering::SeqCst) {
                continue;
            }
            let last = s.last_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) > stall.as_millis() as u64 {
                p.stop.store(true, Ordering::SeqCst);
                panic!(
                    "watchdog: thread {tid} made no progress for {} ms (limit {:?}); \
                     the engine is stuck\nprogress:\n{}{}",
                    now - last,
                    stall,
                    p.report(),
                    extra()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `vm.reclaim(pages)`, run on a helper thread so that a reclaim that never returns
/// fails the test after `limit` instead of hanging it (the stuck thread is left behind).
pub fn reclaim_within(vm: &Vm, pages: usize, limit: Duration, ctx: &str) -> usize {
    let (tx, rx) = std::sync::mpsc::channel();
    let vm2 = vm.clone();
    std::thread::Builder::new()
        .name("reclaim".into())
        .spawn(move || {
            let _ = tx.send(vm2.reclaim(pages));
        })
        .unwrap();
    match rx.recv_timeout(limit) {
        Ok(n) => n,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
            "{ctx}: vm.reclaim({pages}) did not return within {limit:?}; stats {:?}",
            vm.stats()
        ),
        Err(e) => panic!("{ctx}: vm.reclaim({pages}) panicked ({e})"),
    }
}
