//! docs/design.md invariant 2 (seed 001): the page-out path to an NBD device allocates
//! nothing. A counting global allocator counts heap allocations made on the
//! page-I/O threads (threads named `usermm-pageio-*`) during a page-out storm to
//! NBD servers (qemu-nbd; nbdkit with structured replies and several connections
//! when installed) and asserts zero. A file device runs the same storm as the
//! baseline of the engine itself, and a storm of compressible pages through a small
//! zpool above a file device (store, write-back) must allocate nothing either.
//!
//! The allocator identifies a thread by its kernel name (`prctl(PR_GET_NAME)`,
//! no allocation), cached in a const-initialised thread-local once positive; it
//! never calls `std::thread::current()` (which may allocate or recurse).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use usermm_testkit::nbd::{disk, nbdkit, qemu_nbd, run_test, skip_without, Endpoint};
use usermm_testkit::pattern::{check_page, write_page};

/// How long the test may make no progress before the watchdog fails it.
const STALL: std::time::Duration = std::time::Duration::from_secs(60);

use usermm::device::nbd::{NbdAddr, NbdDevice, NbdOptions};
use usermm::device::BlockDevice;
use usermm::{Config, Vm, PAGE_SIZE};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static PAGEIO_ALLOCS: AtomicU64 = AtomicU64::new(0);
static PAGEIO_BYTES: AtomicU64 = AtomicU64::new(0);

/// The counter is global: the tests take turns (a warm-up of one must not land in
/// the other's counting window).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

thread_local! {
    static IS_PAGEIO: Cell<bool> = const { Cell::new(false) };
}

fn on_pageio_thread() -> bool {
    if IS_PAGEIO.try_with(|c| c.get()).unwrap_or(false) {
        return true;
    }
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer we pass.
    let rc = unsafe {
        libc::prctl(
            libc::PR_GET_NAME,
            name.as_mut_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let yes = rc == 0 && name.starts_with(b"usermm-pageio");
    if yes {
        let _ = IS_PAGEIO.try_with(|c| c.set(true));
    }
    yes
}

fn note(size: usize) {
    if COUNTING.load(Ordering::Relaxed) && on_pageio_thread() {
        PAGEIO_ALLOCS.fetch_add(1, Ordering::Relaxed);
        PAGEIO_BYTES.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; the counting
// touches only atomics, a const thread-local without destructor, and a syscall.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note(n);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Page-out storm through `dev`: warm up, then count allocations on the
/// page-I/O threads while `pages` pages are written under a 1 MiB budget.
/// `uring`: page-out through io_uring (`Config::uring_writes`).
fn storm(name: &str, dev: Arc<dyn BlockDevice>, pages: u64, uring: bool) -> (u64, u64) {
    let cfg = Config::default()
        .memory_budget(1 << 20)
        .io_threads(4)
        .uring_writes(uring);
    let vm = Vm::new(cfg).unwrap();
    vm.swapon_device(dev, 0).unwrap();
    if uring && !vm.swaps()[0].uring_writes {
        // The storm still runs, through `pwritev`: say what was not checked.
        assert_ne!(
            std::env::var("USERMM_REQUIRE_URING").as_deref(),
            Ok("1"),
            "io_uring page-out required but not available here"
        );
        eprintln!("SKIP: {name}: io_uring page-out is not available here");
    }
    let mm = vm.new_space();
    let r = mm.map_anon(pages as usize * PAGE_SIZE).unwrap();
    // Warm-up: every page-I/O thread has run, parked and woken (first-use
    // allocations of the runtime, e.g. its parking data, would happen here; they
    // are reported, not asserted).
    PAGEIO_ALLOCS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    for p in 0..pages / 2 {
        write_page(&mm, &r, p, 1).unwrap();
    }
    for p in 0..64 {
        assert!(check_page(&mm, &r, p, 1).unwrap());
    }
    COUNTING.store(false, Ordering::SeqCst);
    let warm = PAGEIO_ALLOCS.load(Ordering::SeqCst);
    let out0 = vm.stats().pswpout;
    PAGEIO_ALLOCS.store(0, Ordering::SeqCst);
    PAGEIO_BYTES.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    for v in 2..4 {
        for p in 0..pages {
            write_page(&mm, &r, p, v).unwrap();
        }
    }
    vm.reclaim(usize::MAX / 2);
    COUNTING.store(false, Ordering::SeqCst);
    let outs = vm.stats().pswpout - out0;
    let allocs = PAGEIO_ALLOCS.load(Ordering::SeqCst);
    println!(
        "  {name}: {outs} page-outs in {:?}; {allocs} allocations ({} bytes) on page-I/O threads (warm-up: {warm})",
        t0.elapsed(),
        PAGEIO_BYTES.load(Ordering::SeqCst)
    );
    // Sanity: the pages are right.
    for p in (0..pages).step_by(97) {
        assert!(check_page(&mm, &r, p, 3).unwrap(), "page {p}");
    }
    (outs, allocs)
}

#[test]
fn page_out_storm_allocates_nothing_on_page_io_threads() {
    run_test(
        "page_out_storm_allocates_nothing_on_page_io_threads",
        STALL,
        || {
            let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            // The detector works: a pageio-named thread that allocates is counted.
            COUNTING.store(true, Ordering::SeqCst);
            std::thread::Builder::new()
                .name("usermm-pageio-x".into())
                .spawn(|| std::hint::black_box(vec![1u8; 100]).len())
                .unwrap()
                .join()
                .unwrap();
            COUNTING.store(false, Ordering::SeqCst);
            assert!(
                PAGEIO_ALLOCS.load(Ordering::SeqCst) >= 1,
                "the counter must see a planted allocation"
            );

            let dir = tempfile::tempdir().unwrap();
            let pages = 4096u64;

            // Baseline: the engine with a file device.
            let file = |name: &str| {
                let f = usermm::device::file::FileDevice::open(
                    &dir.path().join(name),
                    Some(64 << 20),
                    "file",
                );
                Arc::new(f.unwrap())
            };
            let (outs, allocs) = storm("file", file("f.swap"), pages, false);
            assert!(outs > pages, "a storm: {outs} page-outs");
            assert_eq!(allocs, 0, "the engine's page-out path allocated");
            // The same through io_uring page-out (rings made before the threads'
            // no-allocation sections; the writes allocate nothing).
            let (outs, allocs) = storm("file, io_uring page-out", file("u.swap"), pages, true);
            assert!(outs > pages, "a storm: {outs} page-outs");
            assert_eq!(allocs, 0, "io_uring page-out allocated on page-I/O threads");

            if skip_without(
                "page_out_storm_allocates_nothing_on_page_io_threads",
                "qemu-nbd",
            ) {
                return;
            }
            let img = disk(dir.path(), "q.img", 64 << 20);
            let q = qemu_nbd(&img, Endpoint::Unix(dir.path().join("q.sock")));
            let Endpoint::Unix(qs) = &q.endpoint else {
                unreachable!()
            };
            let dev = NbdDevice::connect(
                &NbdAddr::Unix(qs.clone()),
                &NbdOptions {
                    export: "swap".into(),
                    ..NbdOptions::default()
                },
                "qemu-nbd",
            )
            .unwrap();
            let (outs, allocs) = storm("qemu-nbd", Arc::new(dev), pages, false);
            assert!(outs > pages, "a storm: {outs} page-outs");
            assert_eq!(
                allocs, 0,
                "page-out to qemu-nbd allocated on page-I/O threads"
            );

            if skip_without(
                "page_out_storm_allocates_nothing_on_page_io_threads",
                "nbdkit",
            ) {
                return;
            }
            let k = nbdkit(
                &["memory", "64M"],
                Endpoint::Unix(dir.path().join("k.sock")),
            );
            let Endpoint::Unix(ks) = &k.endpoint else {
                unreachable!()
            };
            let dev = NbdDevice::connect(
                &NbdAddr::Unix(ks.clone()),
                &NbdOptions {
                    export: "swap".into(),
                    conns: Some(3),
                    ..NbdOptions::default()
                },
                "nbdkit",
            )
            .unwrap();
            assert_eq!(dev.info().conns, 3);
            let (outs, allocs) = storm("nbdkit (3 connections)", Arc::new(dev), pages, false);
            assert!(outs > pages, "a storm: {outs} page-outs");
            assert_eq!(
                allocs, 0,
                "page-out to nbdkit allocated on page-I/O threads"
            );
        },
    );
}

/// A page of which one 8-byte word in four is random (it compresses to about half).
fn compressible(p: u64, v: u64, out: &mut [u8]) {
    out.fill(0);
    let mut s = (p << 20 | v).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for w in out.chunks_exact_mut(32) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w[..8].copy_from_slice(&s.to_le_bytes());
    }
    out[8..16].copy_from_slice(&(p << 20 | v).to_le_bytes());
}

/// The zpool's store, write-back and the discard of freed slots allocate nothing
/// on the page-I/O threads either: a storm of compressible pages through a pool
/// much smaller than them (so it writes back all the time) above a file device.
#[test]
fn zpool_page_out_allocates_nothing_on_page_io_threads() {
    run_test(
        "zpool_page_out_allocates_nothing_on_page_io_threads",
        STALL,
        || {
            let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            for algo in ["lz4", "zstd"] {
                let dir = tempfile::tempdir().unwrap();
                let vm = Vm::new(Config::default().memory_budget(1 << 20).io_threads(4)).unwrap();
                vm.swapon(
                    usermm::SwapSpec::parse(&format!("zpool:?size=256K&algo={algo}&prio=5"))
                        .unwrap(),
                )
                .unwrap();
                vm.swapon(usermm::SwapSpec::file(dir.path().join("f.swap"), 64 << 20))
                    .unwrap();
                let pages = 4096u64;
                let mm = vm.new_space();
                let r = mm.map_anon(pages as usize * PAGE_SIZE).unwrap();
                let at = |p: u64| r.start() + p * PAGE_SIZE as u64;
                let mut buf = vec![0u8; PAGE_SIZE];
                // Warm-up (first-use allocations of the runtime are not counted).
                for p in 0..pages / 2 {
                    compressible(p, 1, &mut buf);
                    mm.write(at(p), &buf).unwrap();
                }
                let s0 = vm.stats();
                PAGEIO_ALLOCS.store(0, Ordering::SeqCst);
                PAGEIO_BYTES.store(0, Ordering::SeqCst);
                COUNTING.store(true, Ordering::SeqCst);
                for v in 2..4 {
                    for p in 0..pages {
                        compressible(p, v, &mut buf);
                        mm.write(at(p), &buf).unwrap();
                    }
                }
                vm.reclaim(usize::MAX / 2);
                COUNTING.store(false, Ordering::SeqCst);
                let s = vm.stats();
                let allocs = PAGEIO_ALLOCS.load(Ordering::SeqCst);
                println!(
                    "  zpool {algo}: {} stored, {} written back; {allocs} allocations ({} bytes) \
                     on page-I/O threads",
                    s.zpool_stored - s0.zpool_stored,
                    s.zpool_written_back - s0.zpool_written_back,
                    PAGEIO_BYTES.load(Ordering::SeqCst)
                );
                assert!(s.zpool_stored - s0.zpool_stored > pages, "{s:?}");
                assert!(s.zpool_written_back > s0.zpool_written_back, "{s:?}");
                assert_eq!(allocs, 0, "the zpool's page-out path ({algo}) allocated");
                let mut want = vec![0u8; PAGE_SIZE];
                for p in (0..pages).step_by(31) {
                    mm.read(at(p), &mut buf).unwrap();
                    compressible(p, 3, &mut want);
                    assert!(buf == want, "page {p}");
                }
            }
        },
    );
}
