//! Speculative faults (issue 13 item 4, docs/design.md invariant 5): a fault finds
//! its region without the space's regions lock, so a writer holding that lock does
//! not stall it, and an unmap racing it never lets it install a page into a region
//! that is gone. Every test runs under a watchdog.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};
use usermm::device::BlockDevice;
use usermm::{Config, Error, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::Rng;

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

/// A file device whose single-page reads by one chosen thread wait at a gate.
#[derive(Debug)]
struct Gate {
    inner: usermm::device::file::FileDevice,
    closed: AtomicBool,
    thread: Mutex<Option<ThreadId>>,
    held: AtomicU64,
}

impl Gate {
    fn new(dir: &std::path::Path, bytes: u64) -> Arc<Gate> {
        let inner =
            usermm::device::file::FileDevice::open(&dir.join("gate"), Some(bytes), "gate").unwrap();
        Arc::new(Gate {
            inner,
            closed: AtomicBool::new(false),
            thread: Mutex::new(None),
            held: AtomicU64::new(0),
        })
    }
}

impl BlockDevice for Gate {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn pages(&self) -> u64 {
        self.inner.pages()
    }
    fn read_page(&self, slot: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if *self.thread.lock().unwrap() == Some(std::thread::current().id()) {
            self.held.fetch_add(1, Ordering::SeqCst);
            // Bounded: a test that forgets to open the gate fails by its watchdog.
            let t = Instant::now();
            while self.closed.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
        self.inner.read_page(slot, buf)
    }
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_pages(first, buf)
    }
    fn write_page(&self, slot: u64, buf: &[u8]) -> std::io::Result<()> {
        self.inner.write_page(slot, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, first: u64, count: u64) -> std::io::Result<()> {
        self.inner.discard(first, count)
    }
}

/// Evicts every resident page it can.
fn evict(vm: &Vm) {
    for _ in 0..20 {
        vm.reclaim(1 << 20);
        let s = vm.stats();
        if s.free_frames == s.total_frames {
            return;
        }
    }
}

/// What `faults_while_unmap_holds_the_write_lock` saw: whether the faults in the
/// space finished while `unmap` held its write lock, and how long they took.
fn fault_under_held_unmap(spec: bool, wait: Duration, note: &Note) -> (bool, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(
        Config::default()
            .memory_budget(8 << 20)
            .speculative_faults(spec),
    )
    .unwrap();
    let gate = Gate::new(dir.path(), 64 << 20);
    vm.swapon_device(gate.clone(), 0).unwrap();
    let mm = vm.new_space();
    note.set("fill a region, evict it, fork");
    let r = mm.map_anon(64 * PAGE_SIZE).unwrap();
    for p in 0..64u64 {
        mm.write(r.start() + p * PS, &(p + 1000).to_le_bytes())
            .unwrap();
    }
    evict(&vm);
    // The child shares the region's page-table leaf; a child thread's swap-in held
    // at the gate keeps an entry of that leaf claimed.
    let child = mm.fork().unwrap();
    // A region mapped after the fork: its pages 32 MiB in are in leaves of their
    // own (a leaf spans 16 MiB), which nobody shares.
    let f = mm.map_anon(64 << 20).unwrap();
    let sw = f.start() + (32 << 20);
    let zf = f.start() + (40 << 20);
    for p in 0..32u64 {
        mm.write(sw + p * PS, &(p + 7).to_le_bytes()).unwrap();
    }
    evict(&vm);
    note.set("hold a child's swap-in at the gate");
    gate.closed.store(true, Ordering::SeqCst);
    let reader = {
        let (child, gate) = (child.clone(), gate.clone());
        let at = r.start();
        std::thread::spawn(move || {
            *gate.thread.lock().unwrap() = Some(std::thread::current().id());
            let mut b = [0u8; 8];
            child.read(at, &mut b).map(|_| b)
        })
    };
    let t = Instant::now();
    while gate.held.load(Ordering::SeqCst) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "nothing reached the gate"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    note.set("unmap the shared region: its leaf copy waits for the claim, write-locked");
    let unmapper = {
        let mm = mm.clone();
        std::thread::spawn(move || mm.unmap(r))
    };
    // Wait until it holds (or waits for) the write lock: a reader of the region
    // list (`regions()`, which takes the read lock) then blocks. It cannot get past
    // the claim while the gate is shut.
    let t = Instant::now();
    let probe = loop {
        let probe = {
            let mm = mm.clone();
            std::thread::spawn(move || mm.regions().len())
        };
        std::thread::sleep(Duration::from_millis(100));
        if !probe.is_finished() {
            break probe;
        }
        probe.join().unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "unmap never took the lock"
        );
    };
    note.set("fault in the same space: swap-in, zero-fill, a never-written read");
    let swapins = vm.stats().pswpin;
    let faulter = {
        let mm = mm.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut b = [0u8; 8];
            for p in 0..32u64 {
                mm.read(sw + p * PS, &mut b).unwrap();
                assert_eq!(u64::from_le_bytes(b), p + 7, "page {p} read wrong");
                mm.write(zf + p * PS, &p.to_le_bytes()).unwrap();
                mm.read(zf + (1 << 20) + p * PS, &mut b).unwrap();
                assert_eq!(b, [0; 8]);
            }
            t.elapsed()
        })
    };
    let t = Instant::now();
    while !faulter.is_finished() && t.elapsed() < wait {
        std::thread::sleep(Duration::from_millis(5));
    }
    let done = faulter.is_finished();
    assert!(
        !unmapper.is_finished(),
        "unmap finished with the gate shut: the setup did not hold its write lock"
    );
    note.set("open the gate");
    gate.closed.store(false, Ordering::SeqCst);
    let took = faulter.join().unwrap();
    probe.join().unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), 1000u64.to_le_bytes());
    unmapper.join().unwrap().unwrap();
    if done {
        assert!(
            vm.stats().pswpin >= swapins + 32,
            "the faults did not swap in: the test lost its point"
        );
    }
    // The child kept its copy of the region; the parent's is gone.
    let mut b = [0u8; 8];
    for p in 0..64u64 {
        child.read(r.start() + p * PS, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), p + 1000);
    }
    assert!(matches!(
        mm.read(r.start(), &mut b),
        Err(Error::BadAddress { .. })
    ));
    (done, took)
}

/// A writer that holds the regions write lock for as long as another thread's
/// device read takes (here: `unmap` copying a leaf shared with a fork child, in
/// which the child's swap-in holds an entry claimed, with the read held at a gate)
/// does not stall the faults of other threads of the space: swap-in, zero-fill and
/// a read of a never-written page all complete meanwhile.
#[test]
fn faults_go_on_while_unmap_holds_the_write_lock() {
    watchdog(Duration::from_secs(120), |note| {
        let (done, took) = fault_under_held_unmap(true, Duration::from_secs(30), note);
        assert!(
            done,
            "96 faults took more than 30 s behind a held write lock ({took:?} in all)"
        );
    });
}

/// The same on the locked path (`Config::speculative_faults(false)`): the faults
/// wait for the write lock, so the test above would fail there.
#[test]
fn the_locked_path_stalls_behind_the_held_write_lock() {
    watchdog(Duration::from_secs(120), |note| {
        let (done, took) = fault_under_held_unmap(false, Duration::from_secs(2), note);
        assert!(
            !done,
            "the locked path finished its faults behind a held write lock ({took:?})"
        );
    });
}

/// Tags written into churn pages: generation, page, and who wrote it.
const BY_MAPPER: u64 = 1;
const BY_FAULTER: u64 = 2;
fn tag(gen: u64, page: u64, by: u64) -> u64 {
    (gen << 24) | (page << 8) | by
}
fn untag(v: u64) -> (u64, u64, u64) {
    (v >> 24, (v >> 8) & 0xffff, v & 0xff)
}

/// Phases of one generation of the churn region, in `state` = gen * 4 + phase.
const MAPPING: u64 = 0;
const LIVE: u64 = 1;
const UNMAPPING: u64 = 2;
const DEAD: u64 = 3;

/// Unmap and remap racing faults on the same region and on a neighbouring one (in
/// the same page-table leaf), with every byte checked: a region is mapped, every
/// even page tagged by the mapper, then unmapped and mapped again at the same
/// address, in a loop, while two threads read and write it and its neighbour
/// (zero-fill, swap-in under a budget of 1/4 of the data, hits). No page of an
/// unmapped region may show up in the new one (the mapper checks each new region
/// reads as zeros, after every write begun against the old one has returned), no
/// access may succeed while the region is unmapped, none may fail while it is
/// mapped, every read is of the generation mapped at the time, and no frame or
/// slot may outlive the space.
#[test]
fn unmap_and_remap_racing_faults_never_mix_regions() {
    // Speculative with a widened window (every lookup sleeps before its claim: a
    // claim left unvalidated fails this within a few generations), speculative as
    // it runs, and the locked path.
    for (spec, delay) in [(true, 20), (true, 0), (false, 0)] {
        watchdog(Duration::from_secs(180), move |note| {
            race(
                spec,
                Duration::from_micros(delay),
                Duration::from_secs(3),
                note,
            )
        });
    }
}

fn race(spec: bool, delay: Duration, secs: Duration, note: &Note) {
    const CHURN: u64 = 64;
    const NEIGH: u64 = 256;
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(
        Config::default()
            .memory_budget(1 << 20)
            .speculative_faults(spec)
            .fault_lookup_delay(delay),
    )
    .unwrap();
    let dev = vm
        .swapon(SwapSpec::file(dir.path().join("swap"), 512 << 20))
        .unwrap();
    let mm = vm.new_space();
    let neigh = mm.map_anon((NEIGH * PS) as usize).unwrap();
    let first = mm.map_anon((CHURN * PS) as usize).unwrap();
    let at = first.start();
    mm.unmap(first).unwrap();
    let state = Arc::new(AtomicU64::new(DEAD));
    let stop = Arc::new(AtomicBool::new(false));
    let gens = Arc::new(AtomicU64::new(0));
    // Set by a faulter around each write (see the mapper).
    let writing: Arc<[AtomicBool; 2]> = Arc::new(Default::default());
    let mapper = {
        let (mm, state, stop, gens) = (mm.clone(), state.clone(), stop.clone(), gens.clone());
        let writing = writing.clone();
        std::thread::spawn(move || {
            let mut gen = 1;
            let mut b = [0u8; 8];
            while !stop.load(Ordering::SeqCst) {
                state.store(gen * 4 + MAPPING, Ordering::SeqCst);
                let r = mm.map_anon((CHURN * PS) as usize).unwrap();
                assert_eq!(r.start(), at, "the region moved: the test lost its point");
                // Every write a faulter made to an older generation has returned
                // (see below), so every page must read as zeros.
                for p in 0..CHURN {
                    mm.read(at + p * PS, &mut b).unwrap();
                    let v = u64::from_le_bytes(b);
                    let (g, pg, by) = untag(v);
                    assert!(
                        v == 0,
                        "gen {gen} page {p} of a fresh region reads {v:#x} \
                         (gen {g}, page {pg}, by {by}): a page of another region"
                    );
                }
                for p in (0..CHURN).step_by(2) {
                    mm.write(at + p * PS, &tag(gen, p, BY_MAPPER).to_le_bytes())
                        .unwrap();
                }
                state.store(gen * 4 + LIVE, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
                state.store(gen * 4 + UNMAPPING, Ordering::SeqCst);
                mm.unmap(r).unwrap();
                state.store(gen * 4 + DEAD, Ordering::SeqCst);
                assert!(matches!(mm.read(at, &mut b), Err(Error::BadAddress { .. })));
                // A faulter writes only when it saw a live generation after raising
                // its flag: once each flag has been seen down after DEAD, no write
                // begun against this generation is still under way, and none that
                // could land in the next one is.
                for w in writing.iter() {
                    while w.load(Ordering::SeqCst) {
                        std::hint::spin_loop();
                    }
                }
                gens.store(gen, Ordering::SeqCst);
                gen += 1;
            }
        })
    };
    let faulters: Vec<_> = (0..2u64)
        .map(|id| {
            let (mm, state, stop) = (mm.clone(), state.clone(), stop.clone());
            let writing = writing.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(11 + id);
                // This thread's half of the neighbour: the last value it wrote.
                let mut mine = vec![0u64; NEIGH as usize / 2];
                let mut b = [0u8; 8];
                let mut checked = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let p = rng.below(CHURN);
                    let a = at + p * PS;
                    let mut write = p % 2 == 1 && rng.below(2) == 0;
                    let me = &writing[id as usize];
                    if write {
                        me.store(true, Ordering::SeqCst);
                    }
                    let s1 = state.load(Ordering::SeqCst);
                    write &= s1 % 4 == LIVE;
                    let res = if write {
                        mm.write(a, &tag(s1 / 4, p, BY_FAULTER).to_le_bytes())
                    } else {
                        mm.read(a, &mut b)
                    };
                    me.store(false, Ordering::SeqCst);
                    let s2 = state.load(Ordering::SeqCst);
                    let same = s1 == s2;
                    let (g1, g2, ph) = (s1 / 4, s2 / 4, s1 % 4);
                    match res {
                        Ok(()) => {
                            assert!(
                                !(same && ph == DEAD),
                                "an access to page {p} succeeded while gen {g1} was \
                                 unmapped (write: {write})"
                            );
                            if !write {
                                let v = u64::from_le_bytes(b);
                                let (g, pg, by) = untag(v);
                                // Generations mapped at some time during the read.
                                let first = g1 + u64::from(ph == DEAD);
                                let mapped = g >= first && g <= g2;
                                let ok = match by {
                                    0 => v == 0 && !(same && ph == LIVE && p.is_multiple_of(2)),
                                    BY_MAPPER => pg == p && mapped && (!same || g == g1),
                                    BY_FAULTER => pg == p && mapped,
                                    _ => false,
                                };
                                assert!(
                                    ok,
                                    "page {p} read {v:#x} (gen {g}, page {pg}, by {by}) \
                                     between states {s1} and {s2}"
                                );
                                checked += 1;
                            }
                        }
                        Err(Error::BadAddress { .. }) => assert!(
                            !(same && ph == LIVE),
                            "page {p} of live gen {g1} was a bad address (write: {write})"
                        ),
                        Err(e) => panic!("page {p}: {e:?}"),
                    }
                    // The neighbour: this thread's pages hold what it wrote last.
                    let i = rng.below(NEIGH / 2);
                    let na = neigh.start() + (i * 2 + id) * PS;
                    if rng.below(2) == 0 {
                        let v = mine[i as usize] + 1;
                        mm.write(na, &v.to_le_bytes()).unwrap();
                        mine[i as usize] = v;
                    } else {
                        mm.read(na, &mut b).unwrap();
                        assert_eq!(u64::from_le_bytes(b), mine[i as usize], "neighbour page");
                    }
                }
                (checked, mine)
            })
        })
        .collect();
    note.set(format!("race for {secs:?} (speculative: {spec})"));
    std::thread::sleep(secs);
    stop.store(true, Ordering::SeqCst);
    mapper.join().unwrap();
    let mut checked = 0;
    for (id, f) in faulters.into_iter().enumerate() {
        let (n, mine) = f.join().unwrap();
        checked += n;
        let mut b = [0u8; 8];
        for (i, v) in mine.iter().enumerate() {
            mm.read(neigh.start() + (i as u64 * 2 + id as u64) * PS, &mut b)
                .unwrap();
            assert_eq!(u64::from_le_bytes(b), *v, "neighbour page at the end");
        }
    }
    let gens = gens.load(Ordering::SeqCst);
    assert!(gens >= 20, "only {gens} generations: the race barely ran");
    assert!(checked >= 1000, "only {checked} reads checked");
    let s = vm.stats();
    assert!(s.pswpin > 0, "no swap-in: the budget did not bite ({s:?})");
    note.set("tear down: nothing may be left");
    drop(mm);
    // Page-outs under way when the space went finish on the page-I/O threads.
    let used = || {
        vm.swaps()
            .iter()
            .find(|d| d.id == dev)
            .map_or(0, |d| d.used)
    };
    let t = Instant::now();
    while (used() != 0 || vm.stats().free_frames != vm.stats().total_frames)
        && t.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = vm.stats();
    assert_eq!(
        s.free_frames, s.total_frames,
        "frames left (speculative: {spec}): {s:?}"
    );
    assert_eq!(
        used(),
        0,
        "swap slots left after every space went (speculative: {spec}), {:?} later",
        t.elapsed()
    );
    eprintln!(
        "speculative {spec} (delay {delay:?}): {gens} generations, {checked} reads checked, {s:?}"
    );
}

/// File mappings unmapped under faults: a file is mapped (shared, then private,
/// alternately) and unmapped at the same address in a loop while two threads read
/// it through the mapping, each speculative lookup sleeping before it goes on (so
/// the region is often gone by then, and the fault holds the only reference to the
/// file's inode). Every read that succeeds shows the file's bytes; none succeeds
/// while the file is unmapped, none fails while it is mapped; the file is intact.
#[test]
fn file_mappings_unmapped_under_faults() {
    watchdog(Duration::from_secs(120), |note| {
        const PAGES: u64 = 32;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let want = |p: u64| (p * 7919 + 3).to_le_bytes();
        let mut bytes = vec![0u8; (PAGES * PS) as usize];
        for p in 0..PAGES {
            bytes[(p * PS) as usize..][..8].copy_from_slice(&want(p));
        }
        std::fs::write(&path, &bytes).unwrap();
        let vm = Vm::new(
            Config::default()
                .memory_budget(1 << 20)
                .fault_lookup_delay(Duration::from_micros(20)),
        )
        .unwrap();
        vm.swapon(SwapSpec::file(dir.path().join("swap"), 64 << 20))
            .unwrap();
        let mm = vm.new_space();
        let first = mm.map_file(&path, usermm::Share::Shared).unwrap();
        let at = first.start();
        mm.unmap(first).unwrap();
        let state = Arc::new(AtomicU64::new(DEAD));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2u64)
            .map(|id| {
                let (mm, state, stop) = (mm.clone(), state.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(5 + id);
                    let mut b = [0u8; 8];
                    let mut ok = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let p = rng.below(PAGES);
                        let s1 = state.load(Ordering::SeqCst);
                        let res = mm.read(at + p * PS, &mut b);
                        let same = s1 == state.load(Ordering::SeqCst);
                        match res {
                            Ok(()) => {
                                assert!(!(same && s1 % 4 == DEAD), "read of an unmapped file");
                                assert_eq!(b, want(p), "page {p} of the file read wrong");
                                ok += 1;
                            }
                            Err(Error::BadAddress { .. }) => {
                                assert!(!(same && s1 % 4 == LIVE), "live file page {p} unmapped")
                            }
                            Err(e) => panic!("page {p}: {e:?}"),
                        }
                    }
                    ok
                })
            })
            .collect();
        note.set("map and unmap the file in a loop");
        let end = Instant::now() + Duration::from_secs(3);
        let mut gen = 1;
        while Instant::now() < end {
            let share = if gen % 2 == 0 {
                usermm::Share::Shared
            } else {
                usermm::Share::Private
            };
            state.store(gen * 4 + MAPPING, Ordering::SeqCst);
            let r = mm.map_file(&path, share).unwrap();
            assert_eq!(r.start(), at);
            state.store(gen * 4 + LIVE, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            state.store(gen * 4 + UNMAPPING, Ordering::SeqCst);
            mm.unmap(r).unwrap();
            state.store(gen * 4 + DEAD, Ordering::SeqCst);
            gen += 1;
        }
        stop.store(true, Ordering::SeqCst);
        let ok: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(gen > 20 && ok > 100, "{gen} generations, {ok} reads");
        drop(mm);
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the file changed");
    });
}
