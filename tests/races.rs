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
        let t = Instant::now();
        loop {
            let s = vm.stats();
            let used: u64 = s.swap_used.iter().map(|x| x.1).sum();
            if s.free_frames == s.total_frames && used == 0 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "frames or slots leaked after every space is gone: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
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
        let t = Instant::now();
        loop {
            let s = vm.stats();
            let used: u64 = s.swap_used.iter().map(|x| x.1).sum();
            if s.free_frames == s.total_frames && used == 0 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "pages or slots outlived every space: {} frames, {used} bytes of swap",
                s.total_frames - s.free_frames
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}
