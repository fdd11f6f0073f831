//! fork (copy-on-write) and swapoff, against a plain model, under memory pressure.
//! Every test runs under the test kit's watchdog: a hang fails with what each thread
//! was waiting on (the page reads and writes announce themselves).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use usermm::{AddressSpace, Config, Error, SwapSpec, VAddr, Vm, PAGE_SIZE};
use usermm_testkit::pattern::{check_gen, gen_stamp, write_gen, GEN_OFFSET};
use usermm_testkit::watchdog::{watched, Watchdog};
use usermm_testkit::workload::Rng;

/// How long a thread may complete no page operation before the test fails.
const STALL: Duration = Duration::from_secs(30);

/// The generation stamp's bytes within a page.
const G: std::ops::Range<usize> = GEN_OFFSET as usize..GEN_OFFSET as usize + 16;

const PS: u64 = PAGE_SIZE as u64;

fn vm_with(budget_pages: usize, devs: &[u64]) -> (tempfile::TempDir, Vm, Vec<usermm::SwapId>) {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(budget_pages * PAGE_SIZE)).unwrap();
    let ids = devs
        .iter()
        .enumerate()
        .map(|(i, &pages)| {
            vm.swapon(SwapSpec::file(dir.path().join(format!("s{i}")), pages * PS))
                .unwrap()
        })
        .collect();
    (dir, vm, ids)
}

fn check(mm: &AddressSpace, base: VAddr, page: u64, gen: u64, what: &str) {
    check_gen(mm, base, page, gen, what).unwrap_or_else(|e| panic!("{e}"));
}

fn put(mm: &AddressSpace, base: VAddr, page: u64, gen: u64) {
    write_gen(mm, base, page, gen).unwrap_or_else(|e| panic!("{e}"));
}

fn assert_no_leak(vm: &Vm, what: &str) {
    // Page-outs in flight finish on their own; give them a moment.
    common::assert_no_leak(vm, Duration::from_secs(10), what);
}

#[test]
fn fork_is_a_snapshot_under_pressure() {
    watched("fork_is_a_snapshot_under_pressure", STALL, |_| {
        let (_d, vm, _) = vm_with(64, &[4096]);
        let mm = vm.new_space();
        let pages = 512u64; // 8x the budget
        let r = mm.map_anon((pages * PS) as usize).unwrap();
        for p in 0..pages {
            put(&mm, r.start(), p, 1);
        }
        let child = mm.fork().unwrap();
        // Both see generation 1.
        for p in 0..pages {
            check(&mm, r.start(), p, 1, "parent after fork");
            check(&child, r.start(), p, 1, "child after fork");
        }
        // Writes on each side are private.
        for p in (0..pages).step_by(2) {
            put(&mm, r.start(), p, 2);
        }
        for p in (1..pages).step_by(2) {
            put(&child, r.start(), p, 3);
        }
        for p in 0..pages {
            check(&mm, r.start(), p, if p % 2 == 0 { 2 } else { 1 }, "parent");
            check(
                &child,
                r.start(),
                p,
                if p % 2 == 0 { 1 } else { 3 },
                "child",
            );
        }
        // (Under this much pressure most shared pages are on swap, where the copy shares
        // the slot; resident shared pages are copied on write: see the next test.)
        let s = vm.stats();
        assert!(s.pswpout > 0 && s.pswpin > 0, "{s:?}");
        // A grandchild of the child, then the child goes away.
        let grandchild = child.fork().unwrap();
        drop(child);
        for p in 0..pages {
            check(
                &grandchild,
                r.start(),
                p,
                if p % 2 == 0 { 1 } else { 3 },
                "grandchild",
            );
        }
        drop(grandchild);
        for p in 0..pages {
            check(
                &mm,
                r.start(),
                p,
                if p % 2 == 0 { 2 } else { 1 },
                "parent at end",
            );
        }
        drop(mm);
        assert_no_leak(&vm, "fork");
    });
}

#[test]
fn fork_resident_pages_are_shared_not_copied() {
    watched("fork_resident_pages_are_shared_not_copied", STALL, |_| {
        let (_d, vm, _) = vm_with(4096, &[8192]);
        let mm = vm.new_space();
        let pages = 1024u64;
        let r = mm.map_anon((pages * PS) as usize).unwrap();
        for p in 0..pages {
            put(&mm, r.start(), p, 1);
        }
        let free_before = vm.stats().free_frames;
        let child = mm.fork().unwrap();
        assert_eq!(vm.stats().free_frames, free_before, "fork took frames");
        put(&child, r.start(), 0, 9);
        assert_eq!(
            vm.stats().free_frames,
            free_before - 1,
            "a COW write copies one page"
        );
        check(&mm, r.start(), 0, 1, "parent");
        check(&child, r.start(), 0, 9, "child");
        // Guards: a shared guard in the child on a shared page, a mutable one in the parent.
        {
            let g = child.page(r.start() + PS).unwrap();
            assert_eq!(&g[G], &gen_stamp(1, 1));
            let mut m = mm.page_mut(r.start() + PS).unwrap();
            m[G].copy_from_slice(&gen_stamp(1, 5));
            assert_eq!(
                &g[G],
                &gen_stamp(1, 1),
                "child's guard saw the parent's write"
            );
        }
        check(&mm, r.start(), 1, 5, "parent after guard");
        check(&child, r.start(), 1, 1, "child after guard");
        drop(child);
        drop(mm);
        assert_no_leak(&vm, "fork resident");
    });
}

#[test]
fn random_forks_match_model() {
    watched("random_forks_match_model", STALL, |_| {
        let seed: u64 = std::env::var("USERMM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_f0f0);
        let (_d, vm, _) = vm_with(48, &[16384]);
        let pages = 96u64;
        let root = vm.new_space();
        let r = root.map_anon((pages * PS) as usize).unwrap();
        let mut spaces: Vec<(AddressSpace, Vec<u64>)> = vec![(root, vec![0; pages as usize])];
        let mut rng = Rng::new(seed);
        for op in 0..6000 {
            let i = rng.below(spaces.len() as u64) as usize;
            match rng.below(100) {
                0..=4 if spaces.len() < 6 => {
                    let child = spaces[i].0.fork().unwrap();
                    let model = spaces[i].1.clone();
                    spaces.push((child, model));
                }
                5..=7 if spaces.len() > 1 => {
                    spaces.swap_remove(i);
                }
                8..=50 => {
                    let p = rng.below(pages);
                    let g = op as u64 + 1;
                    put(&spaces[i].0, r.start(), p, g);
                    spaces[i].1[p as usize] = g;
                }
                _ => {
                    let p = rng.below(pages);
                    let (mm, model) = &spaces[i];
                    // Generation 0 (never written) reads as zeroes.
                    check(
                        mm,
                        r.start(),
                        p,
                        model[p as usize],
                        &format!("seed {seed} op {op} space {i}"),
                    );
                }
            }
        }
        for (k, (mm, model)) in spaces.iter().enumerate() {
            for p in 0..pages {
                check(
                    mm,
                    r.start(),
                    p,
                    model[p as usize],
                    &format!("seed {seed} final space {k}"),
                );
            }
        }
        drop(spaces);
        assert_no_leak(&vm, "random forks");
    });
}

#[test]
fn swapoff_brings_pages_back_or_moves_them() {
    watched("swapoff_brings_pages_back_or_moves_them", STALL, |_| {
        // Memory can hold everything: swapoff pulls pages in.
        let (_d, vm, ids) = vm_with(1024, &[2048, 2048]);
        let mm = vm.new_space();
        let pages = 600u64;
        let r = mm.map_anon((pages * PS) as usize).unwrap();
        for p in 0..pages {
            put(&mm, r.start(), p, 1);
        }
        assert!(vm.reclaim(pages as usize) > 0);
        let used0 = vm.swaps()[0].used;
        assert!(used0 > 0, "{:?}", vm.swaps());
        vm.swapoff(ids[0]).unwrap();
        assert_eq!(vm.swaps().len(), 1);
        for p in 0..pages {
            check(&mm, r.start(), p, 1, "after swapoff");
        }
        // Memory too small: pages move to the other device.
        let (_d2, vm2, ids2) = vm_with(64, &[2048, 2048]);
        let mm2 = vm2.new_space();
        let r2 = mm2.map_anon((pages * PS) as usize).unwrap();
        for p in 0..pages {
            put(&mm2, r2.start(), p, 7);
        }
        vm2.reclaim(pages as usize);
        vm2.swapoff(ids2[0]).unwrap();
        vm2.swapoff(ids2[1]).expect_err("nowhere to put the pages");
        assert_eq!(vm2.swaps().len(), 1);
        assert_eq!(vm2.swaps()[0].state, "active");
        for p in 0..pages {
            check(&mm2, r2.start(), p, 7, "after moving swapoff");
        }
        // And back: a new device, then the old one can go.
        let id3 = vm2
            .swapon(SwapSpec::file(_d2.path().join("s3"), 4096 * PS))
            .unwrap();
        vm2.swapoff(ids2[1]).unwrap();
        assert_eq!(vm2.swaps().len(), 1);
        assert_eq!(vm2.swaps()[0].id, id3);
        for p in 0..pages {
            check(&mm2, r2.start(), p, 7, "after second swapoff");
        }
        drop(mm);
        drop(mm2);
        assert_no_leak(&vm, "swapoff");
        assert_no_leak(&vm2, "swapoff moving");
    });
}

#[test]
fn swapoff_without_room_fails_and_keeps_the_device() {
    watched(
        "swapoff_without_room_fails_and_keeps_the_device",
        STALL,
        |_| {
            let (_d, vm, ids) = vm_with(32, &[1024]);
            let mm = vm.new_space();
            let pages = 300u64;
            let r = mm.map_anon((pages * PS) as usize).unwrap();
            for p in 0..pages {
                put(&mm, r.start(), p, 4);
            }
            assert!(matches!(vm.swapoff(ids[0]), Err(Error::OutOfMemory)));
            let sw = vm.swaps();
            assert_eq!(sw.len(), 1);
            assert_eq!(sw[0].state, "active");
            for p in 0..pages {
                check(&mm, r.start(), p, 4, "after failed swapoff");
            }
            assert!(matches!(
                vm.swapoff(usermm::SwapId(9)),
                Err(Error::InvalidArgument(_))
            ));
        },
    );
}

/// The races of seed 002, shortened: workers fork, write, verify and exit while one of
/// three devices is removed and re-added in a loop.
#[test]
fn swapoff_races_fork_fault_and_exit() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(96 * PAGE_SIZE)).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            vm.swapon(SwapSpec::file(dir.path().join(format!("s{i}")), 4096 * PS))
                .unwrap(),
        );
    }
    let pages = 64u64;
    let rounds = Arc::new(AtomicU64::new(0));
    let cycles = Arc::new(AtomicU64::new(0));
    let stats = vm.clone();
    let mut wd = Watchdog::new(STALL).extra(move || format!("stats: {:?}\n", stats.stats()));
    for w in 0..3u64 {
        let (vm, rounds) = (vm.clone(), rounds.clone());
        wd = wd.helper(format!("child of worker {w}"));
        wd = wd.thread(format!("worker {w}"), move |me| {
            let mm = vm.new_space();
            let r = mm.map_anon((pages * PS) as usize).unwrap();
            let mut gen = 1u64;
            for p in 0..pages {
                put(&mm, r.start(), p, gen);
            }
            let child_slot = me.board().slot_of(&format!("child of worker {w}")).unwrap();
            while !me.should_stop() {
                me.begin(|| "fork".into());
                let child = mm.fork().unwrap();
                me.done();
                let h = std::thread::spawn({
                    let child = child.clone();
                    let board = me.board().clone();
                    move || {
                        let _me = board.enter(child_slot);
                        for p in 0..pages {
                            check(&child, r.start(), p, gen, "child");
                            put(&child, r.start(), p, 0);
                        }
                    }
                });
                gen += 1;
                for p in 0..pages {
                    put(&mm, r.start(), p, gen);
                }
                me.begin(|| "join the child's thread".into());
                h.join().unwrap();
                me.done();
                me.begin(|| "drop the child (exit)".into());
                drop(child);
                me.done();
                for p in 0..pages {
                    check(&mm, r.start(), p, gen, &format!("worker {w}"));
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let (vm2, cycles2) = (vm.clone(), cycles.clone());
    let dir_path = dir.path().to_path_buf();
    wd = wd.thread("swapoff loop", move |me| {
        let t = std::time::Instant::now();
        let mut victim = ids[1];
        let mut path = dir_path.join("s1");
        while t.elapsed() < Duration::from_secs(4) && !me.should_stop() {
            let n = cycles2.load(Ordering::Relaxed);
            me.begin(|| format!("swapoff of {victim:?} (cycle {n})"));
            vm2.swapoff(victim).unwrap();
            std::fs::remove_file(&path).unwrap();
            path = dir_path.join(format!("r{}", n % 2));
            me.begin(|| format!("swapon of {} (cycle {n})", path.display()));
            victim = vm2.swapon(SwapSpec::file(&path, 4096 * PS)).unwrap();
            me.done();
            cycles2.fetch_add(1, Ordering::Relaxed);
        }
        // Done: the workers see the stop and finish their round.
        me.board().stop();
    });
    wd.run();
    let (cycles, rounds) = (
        cycles.load(Ordering::Relaxed),
        rounds.load(Ordering::Relaxed),
    );
    assert!(cycles > 0 && rounds > 0, "cycles {cycles} rounds {rounds}");
    println!(
        "swapoff cycles {cycles}, fork rounds {rounds}, {:?}",
        vm.stats()
    );
    assert_no_leak(&vm, "swapoff races");
}

/// swapoff of a mirror whose slots have holes: pages unmapped between pages still
/// on it (their slots discarded, which a mirror forgets on both legs, so a read
/// there is ENODATA). The drain's span read fails there; it reads those pages one
/// by one instead of failing the swapoff (which it did on every try).
#[test]
fn swapoff_of_a_mirror_with_discarded_holes_drains() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(64 * PAGE_SIZE)).unwrap();
    let leg = |n: &str| format!("file:{}?size=16M", dir.path().join(n).display());
    let spec = format!("mirror:({},{})", leg("a"), leg("b"));
    let m = vm.swapon(SwapSpec::parse(&spec).unwrap()).unwrap();
    let mm = vm.new_space();
    let regions: Vec<_> = (0..32)
        .map(|_| mm.map_anon(16 * PAGE_SIZE).unwrap())
        .collect();
    let val = |i: usize, p: u64| (i as u64) * 1000 + p + 1;
    for (i, r) in regions.iter().enumerate() {
        for p in 0..16 {
            mm.write(r.start() + p * PS, &val(i, p).to_le_bytes())
                .unwrap();
        }
    }
    // Every other region goes: its slots are discarded by the maintenance thread
    // (every 50 ms), leaving holes between the slots of the others.
    let mut kept = Vec::new();
    for (i, r) in regions.into_iter().enumerate() {
        if i % 2 == 0 {
            kept.push((i, r));
        } else {
            mm.unmap(r).unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    vm.swapon(SwapSpec::file(dir.path().join("c"), 32 << 20))
        .unwrap();
    vm.swapoff(m).unwrap();
    assert!(vm.swaps().iter().all(|s| s.id != m), "{:?}", vm.swaps());
    for (i, r) in &kept {
        for p in 0..16 {
            let mut b = [0u8; 8];
            mm.read(r.start() + p * PS, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), val(*i, p), "region {i} page {p}");
        }
    }
}
