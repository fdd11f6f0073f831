//! Races found in review (issue 9), each reproduced here before its fix. Every test
//! runs under a watchdog that fails it with what it was doing instead of hanging.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};

const PS: u64 = PAGE_SIZE as u64;

/// Runs `f` on a thread; fails with the last `note` if it takes longer than `limit`.
fn watchdog<F: FnOnce(&Note) + Send + 'static>(limit: Duration, f: F) {
    let note = Note::default();
    let n2 = note.clone();
    let t = std::thread::spawn(move || f(&n2));
    let start = Instant::now();
    while !t.is_finished() {
        if start.elapsed() > limit {
            panic!(
                "watchdog: no result after {limit:?}; last step: {}",
                note.0.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = t.join() {
        std::panic::resume_unwind(e);
    }
}

#[derive(Clone, Default)]
struct Note(Arc<Mutex<String>>);
impl Note {
    fn set(&self, s: impl Into<String>) {
        *self.0.lock().unwrap() = s.into();
    }
}

fn vm_with_swap(budget: usize, swap: u64) -> (tempfile::TempDir, Vm) {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(budget)).unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("swap"), swap))
        .unwrap();
    (dir, vm)
}

/// Item 1: `unmap` racing `fork`. One thread keeps a one-page region and maps,
/// fills and unmaps an 8 MiB region in a loop (so both share page-table leaves);
/// another forks and reads fresh memory in each child. No child may ever see the
/// parent's old bytes, and no slot or frame may outlive every space.
#[test]
fn unmap_racing_fork_never_shows_another_spaces_data() {
    watchdog(Duration::from_secs(120), |note| {
        let (_dir, vm) = vm_with_swap(16 << 20, 2 << 30);
        let mm = vm.new_space();
        let keep = mm.map_anon(PAGE_SIZE).unwrap();
        mm.write(keep.start(), &[1]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let cycles = Arc::new(AtomicU64::new(0));
        let mapper = {
            let (mm, stop, cycles) = (mm.clone(), stop.clone(), cycles.clone());
            std::thread::spawn(move || {
                let fill = [0xA5u8; PAGE_SIZE];
                while !stop.load(Ordering::Relaxed) {
                    let r = mm.map_anon(8 << 20).unwrap();
                    for p in 0..(8 << 20) / PS {
                        mm.write(r.start() + p * PS, &fill).unwrap();
                    }
                    mm.unmap(r).unwrap();
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(4);
        let (mut leaked_pages, mut forks) = (0u64, 0u64);
        let mut buf = vec![0u8; PAGE_SIZE];
        let nofork = std::env::var("RACES_NOFORK").is_ok();
        while Instant::now() < deadline {
            if nofork {
                std::thread::sleep(Duration::from_millis(10));
                forks += 1;
                continue;
            }
            note.set(format!("fork {forks}"));
            let child = mm.fork().unwrap();
            if std::env::var("RACES_NOREAD").is_ok() {
                drop(child);
                forks += 1;
                continue;
            }
            let r = child.map_anon(8 << 20).unwrap();
            for p in 0..(8 << 20) / PS {
                child.read(r.start() + p * PS, &mut buf).unwrap();
                if buf.iter().any(|&b| b != 0) {
                    leaked_pages += 1;
                }
            }
            drop(child);
            forks += 1;
        }
        stop.store(true, Ordering::Relaxed);
        mapper.join().unwrap();
        note.set("leak check");
        assert_eq!(
            leaked_pages,
            0,
            "{leaked_pages} fresh child pages held the parent's old bytes ({forks} forks, {} unmap cycles)",
            cycles.load(Ordering::Relaxed)
        );
        assert!(
            forks > 0 && cycles.load(Ordering::Relaxed) > 0,
            "the race did not run"
        );
        // Only the kept page remains: nothing leaked to an unreachable entry.
        drop(mm);
        usermm_testkit::check::wait_no_leak(&vm, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("after every space is gone: {e}"));
    });
}

/// Item 1, the slot leak: two regions in one page-table leaf (a leaf spans 16 MiB)
/// made fork count the child's use of that leaf twice, so the leaf — and every page
/// and slot in it — outlived both spaces. Deterministic: one thread.
#[test]
fn fork_of_two_regions_in_one_leaf_leaks_nothing() {
    watchdog(Duration::from_secs(60), |note| {
        let (_dir, vm) = vm_with_swap(16 << 20, 1 << 30);
        {
            let mm = vm.new_space();
            let a = mm.map_anon(PAGE_SIZE).unwrap();
            let b = mm.map_anon(64 * PAGE_SIZE).unwrap();
            mm.write(a.start(), &[1]).unwrap();
            for p in 0..64 {
                mm.write(b.start() + p * PS, &[2]).unwrap();
            }
            note.set("reclaim, fork, drop the child");
            vm.reclaim(65);
            drop(mm.fork().unwrap());
            mm.unmap(b).unwrap();
        }
        note.set("leak check");
        usermm_testkit::check::wait_no_leak(&vm, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("pages or slots outlived every space: {e}"));
    });
}

/// A file device whose reads of spans (swapoff's sequential drain), single-page
/// reads, or writes can be held at a gate, to open race windows on purpose.
#[derive(Debug)]
struct GateDevice {
    inner: usermm::device::file::FileDevice,
    hold_spans: AtomicBool,
    hold_reads: AtomicBool,
    hold_writes: AtomicBool,
    /// Reads by this thread are held (while `hold_spans` is set) whatever their size.
    hold_thread: Mutex<Option<std::thread::ThreadId>>,
    /// Calls currently held at a gate.
    held: AtomicU64,
}

impl GateDevice {
    fn new(dir: &std::path::Path, name: &str, bytes: u64) -> Arc<GateDevice> {
        let path = dir.join(name);
        let inner = usermm::device::file::FileDevice::open(&path, Some(bytes), name).unwrap();
        Arc::new(GateDevice {
            inner,
            hold_spans: AtomicBool::new(false),
            hold_reads: AtomicBool::new(false),
            hold_writes: AtomicBool::new(false),
            hold_thread: Mutex::new(None),
            held: AtomicU64::new(0),
        })
    }
    fn gate(&self, g: &AtomicBool) {
        if g.load(Ordering::SeqCst) {
            self.held.fetch_add(1, Ordering::SeqCst);
            // Bounded: a test that forgets to open its gate fails by its watchdog,
            // and this returns after a minute anyway.
            let t = Instant::now();
            while g.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
    }
    fn wait_held(&self, n: u64) {
        let t = Instant::now();
        while self.held.load(Ordering::SeqCst) < n {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "nothing reached the gate"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl usermm::device::BlockDevice for GateDevice {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn pages(&self) -> u64 {
        self.inner.pages()
    }
    fn read_page(&self, slot: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if *self.hold_thread.lock().unwrap() == Some(std::thread::current().id()) {
            self.gate(&self.hold_spans);
        }
        self.gate(&self.hold_reads);
        self.inner.read_page(slot, buf)
    }
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.gate(&self.hold_spans);
        self.inner.read_pages(first, buf)
    }
    fn write_page(&self, slot: u64, buf: &[u8]) -> std::io::Result<()> {
        self.gate(&self.hold_writes);
        self.inner.write_page(slot, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, first: u64, count: u64) -> std::io::Result<()> {
        self.inner.discard(first, count)
    }
}

fn used_on(vm: &Vm, id: usermm::SwapId) -> u64 {
    vm.swaps().iter().find(|s| s.id == id).map_or(0, |s| s.used)
}

/// Item 2: a page read back from a device being drained must lose its copy there;
/// otherwise reclaim drops the clean page back onto that device without I/O and
/// undoes the swapoff.
#[test]
fn swap_in_from_a_draining_device_drops_its_copy_there() {
    watchdog(Duration::from_secs(90), |note| {
        let dir = tempfile::tempdir().unwrap();
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        let a = GateDevice::new(dir.path(), "a", 64 << 20);
        let ida = vm.swapon_device(a.clone(), 10).unwrap();
        let idb = vm
            .swapon(SwapSpec::file(dir.path().join("b"), 64 << 20))
            .unwrap();
        let mm = vm.new_space();
        let r = mm.map_anon(64 * PAGE_SIZE).unwrap();
        for p in 0..64u64 {
            mm.write(r.start() + p * PS, &[p as u8 + 1; 64]).unwrap();
        }
        note.set("reclaim to a");
        vm.reclaim(64);
        assert!(
            used_on(&vm, ida) >= 64 * PS,
            "pages did not go to a: {:?}",
            vm.swaps()
        );
        // Swapoff of `a` stops at its first read, before it moved any page.
        a.hold_spans.store(true, Ordering::SeqCst);
        let swapoff = {
            let (vm, a) = (vm.clone(), a.clone());
            std::thread::spawn(move || {
                *a.hold_thread.lock().unwrap() = Some(std::thread::current().id());
                vm.swapoff(ida)
            })
        };
        note.set("wait for swapoff to reach the gate");
        a.wait_held(1);
        // A fault reads a page from `a` (single-page reads of this thread are not
        // held). Pages reclaim left resident are skipped: the first read that is a
        // swap-in (pswpin moves) is the one under test.
        let mut b = [0u8; 64];
        let mut swapped_in = None;
        for p in (0..64u64).rev() {
            let (before, in0) = (used_on(&vm, ida), vm.stats().pswpin);
            mm.read(r.start() + p * PS, &mut b).unwrap();
            assert_eq!(b, [p as u8 + 1; 64], "page {p}");
            if vm.stats().pswpin > in0 {
                swapped_in = Some((before, used_on(&vm, ida)));
                break;
            }
        }
        let (before, after) = swapped_in.expect("no page was on the device");
        assert_eq!(
            after,
            before - PS,
            "the swap-in kept its copy on the device being drained"
        );
        // Reclaim must write the page elsewhere, not drop it back onto `a`.
        note.set("reclaim again");
        vm.reclaim(64);
        assert_eq!(used_on(&vm, ida), after, "reclaim put a page back on a");
        assert!(
            used_on(&vm, idb) >= PS,
            "the page did not go to b: {:?}",
            vm.swaps()
        );
        a.hold_spans.store(false, Ordering::SeqCst);
        note.set("swapoff finishing");
        swapoff.join().unwrap().unwrap();
        for p in 0..64u64 {
            mm.read(r.start() + p * PS, &mut b).unwrap();
            assert_eq!(b, [p as u8 + 1; 64], "page {p}");
        }
    });
}

/// Item 3: swapoff waits only for page-outs to the device it drains, and for those
/// only for a bounded time; a device whose writes hang elsewhere does not hang it.
#[test]
fn swapoff_is_not_hung_by_another_devices_stuck_writes() {
    watchdog(Duration::from_secs(90), |note| {
        let dir = tempfile::tempdir().unwrap();
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        let stuck = GateDevice::new(dir.path(), "stuck", 64 << 20);
        stuck.hold_writes.store(true, Ordering::SeqCst);
        vm.swapon_device(stuck.clone(), 10).unwrap();
        let other = vm
            .swapon(SwapSpec::file(dir.path().join("other"), 64 << 20))
            .unwrap();
        let mm = vm.new_space();
        let r = mm.map_anon(64 * PAGE_SIZE).unwrap();
        for p in 0..64u64 {
            mm.write(r.start() + p * PS, &[7; 8]).unwrap();
        }
        // Page-outs to `stuck` start and hang there.
        let reclaimer = {
            let vm = vm.clone();
            std::thread::spawn(move || vm.reclaim(64))
        };
        note.set("wait for a page-out to hang");
        stuck.wait_held(1);
        note.set("swapoff of the other device");
        let t = Instant::now();
        vm.swapoff(other).unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "swapoff waited {:?} for another device's writes",
            t.elapsed()
        );
        stuck.hold_writes.store(false, Ordering::SeqCst);
        reclaimer.join().unwrap();
        let mut b = [0u8; 8];
        for p in 0..64u64 {
            mm.read(r.start() + p * PS, &mut b).unwrap();
            assert_eq!(b, [7; 8]);
        }
    });
}

/// Item 4: no lock is held across a device read on the fault path: while a fault
/// waits for its read, map and unmap in the same space go on.
#[test]
fn a_slow_swap_in_does_not_stall_map_and_unmap() {
    watchdog(Duration::from_secs(90), |note| {
        let dir = tempfile::tempdir().unwrap();
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        let slow = GateDevice::new(dir.path(), "slow", 64 << 20);
        vm.swapon_device(slow.clone(), 0).unwrap();
        let mm = vm.new_space();
        let r = mm.map_anon(64 * PAGE_SIZE).unwrap();
        for p in 0..64u64 {
            mm.write(r.start() + p * PS, &[9; 8]).unwrap();
        }
        vm.reclaim(64);
        slow.hold_reads.store(true, Ordering::SeqCst);
        let reader = {
            let mm = mm.clone();
            let at = r.start();
            std::thread::spawn(move || {
                let mut b = [0u8; 8];
                mm.read(at, &mut b).map(|_| b)
            })
        };
        note.set("wait for the fault to reach the device");
        slow.wait_held(1);
        note.set("map and unmap while the read is held");
        let t = Instant::now();
        let other = mm.map_anon(16 * PAGE_SIZE).unwrap();
        mm.write(other.start(), &[1]).unwrap();
        mm.unmap(other).unwrap();
        let took = t.elapsed();
        slow.hold_reads.store(false, Ordering::SeqCst);
        assert_eq!(reader.join().unwrap().unwrap(), [9; 8]);
        assert!(
            took < Duration::from_secs(5),
            "map/unmap waited {took:?} for another thread's device read"
        );
    });
}

/// Item 7: nothing a caller does with its own guards may hang it: an access that
/// would wait for a guard the same thread holds gets `WouldDeadlock`, and the
/// guard, the page and the space are unharmed.
#[test]
fn waiting_for_ones_own_guard_is_an_error_not_a_hang() {
    watchdog(Duration::from_secs(60), |note| {
        let (_dir, vm) = vm_with_swap(4 << 20, 64 << 20);
        let mm = vm.new_space();
        let r = mm.map_anon(4 * PAGE_SIZE).unwrap();
        let (p0, p1) = (r.start(), r.start() + PS);
        mm.write(p0, &[1; 8]).unwrap();
        mm.write(p1, &[2; 8]).unwrap();
        let dl = |e: usermm::Result<()>, what: &str| match e {
            Err(usermm::Error::WouldDeadlock(_)) => {}
            other => panic!("{what}: expected WouldDeadlock, got {other:?}"),
        };
        let mut b = [0u8; 8];
        {
            note.set("PageMut, then read/write/page of the same page");
            let mut g = mm.page_mut(p0).unwrap();
            g[0] = 9;
            dl(mm.read(p0, &mut b), "read under own PageMut");
            dl(mm.write(p0, &[3]), "write under own PageMut");
            dl(mm.page(p0).map(drop), "page under own PageMut");
            dl(mm.page_mut(p0).map(drop), "page_mut under own PageMut");
            dl(mm.fork().map(drop), "fork under own PageMut");
            dl(mm.unmap(r), "unmap under own PageMut");
            // Another page is fine.
            mm.read(p1, &mut b).unwrap();
            assert_eq!(b, [2; 8]);
        }
        mm.read(p0, &mut b).unwrap();
        assert_eq!(b[0], 9, "the guard's write was lost");
        {
            note.set("PageRef, then write of the same page; reads are fine");
            let g = mm.page(p0).unwrap();
            let g2 = mm.page(p0).unwrap();
            assert_eq!(g[0], 9);
            assert_eq!(g2[1], 1);
            mm.read(p0, &mut b).unwrap();
            dl(mm.write(p0, &[3]), "write under own PageRef");
            dl(mm.page_mut(p0).map(drop), "page_mut under own PageRef");
            dl(mm.fork().map(drop), "fork under own PageRef");
        }
        note.set("after the guards");
        mm.write(p0, &[4]).unwrap();
        let child = mm.fork().unwrap();
        child.read(p0, &mut b).unwrap();
        assert_eq!(b[0], 4);
        mm.unmap(r).unwrap();
    });
}
