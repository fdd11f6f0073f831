//! Differential test: random operations on usermm from several threads, compared byte
//! for byte with a plain in-memory model, under a budget far smaller than the data.
//!
//! Four workers; workers 0 and 1 share one address space, workers 2 and 3 each have
//! their own. Every worker owns its regions, so its model (a `Vec<u8>` per region) is
//! exact even in the shared space. Operations: map, unmap, write, read (both often
//! crossing page boundaries), writes and reads through page guards, large fills, and
//! accesses at bad addresses (which must fail with `BadAddress` and change nothing).
//! At the end every byte of every live region is checked, the spaces are dropped, and
//! every frame and swap slot must be free again.
//!
//! `map_during_unmap_gets_a_clean_range` is the deterministic form of a race this test
//! found: a range being unmapped handed out again by `map_anon` before its pages are gone.
//!
//! Seeded: `USERMM_SEED=N cargo test --release --test differential` replays the same
//! operation sequences (the interleaving of the threads differs from run to run).
//! Every assertion message carries the seed, the worker and the operation index.

mod common;

use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use usermm::VADDR_END;
use usermm::{AddressSpace, Config, Error, Region, SwapSpec, VAddr, Vm, PAGE_SIZE};
use usermm_testkit::pattern::{fill_random, first_diff};
use usermm_testkit::watchdog::run_workers;
use usermm_testkit::workload::Rng;

const THREADS: usize = 4;
const OPS_PER_THREAD: usize = 10_000;
/// Frames: 2 MiB.
const BUDGET: usize = 2 << 20;
/// Each worker keeps at least this much mapped (so ≥ 16 MiB over the four: 8× the budget).
const MIN_LIVE: u64 = 4 << 20;
const MAX_LIVE: u64 = 8 << 20;
const PS: u64 = PAGE_SIZE as u64;

struct Reg {
    r: Region,
    data: Vec<u8>,
    /// Pages ever written (to count reads of never-written memory).
    written: Vec<bool>,
}

struct Worker {
    tid: usize,
    seed: u64,
    mm: AddressSpace,
    /// The space is this worker's alone (so it knows every mapped address of it).
    own_space: bool,
    rng: Rng,
    regs: Vec<Reg>,
    op: usize,
    opname: &'static str,
    bytes_written: u64,
    zero_reads: u64,
    bad_checks: u64,
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(PS) * PS
}

impl Worker {
    fn ctx(&self) -> String {
        format!(
            "seed={} thread={} op#{} ({})",
            self.seed, self.tid, self.op, self.opname
        )
    }

    fn live(&self) -> u64 {
        self.regs.iter().map(|g| g.r.len()).sum()
    }

    /// Whether `addr` is inside one of this worker's regions.
    fn mine(&self, addr: u64) -> bool {
        self.regs.iter().any(|g| g.r.contains(VAddr(addr)))
    }

    fn map(&mut self, min: u64, max: u64) {
        let len = (min + self.rng.below(max - min)) as usize;
        let r = self
            .mm
            .map_anon(len)
            .unwrap_or_else(|e| panic!("{}: map_anon({len}) failed: {e:?}", self.ctx()));
        assert_eq!(
            r.len(),
            round_up(len as u64),
            "{}: region length",
            self.ctx()
        );
        assert!(
            r.start().is_page_aligned(),
            "{}: {r:?} not aligned",
            self.ctx()
        );
        for g in &self.regs {
            assert!(
                r.end() <= g.r.start() || g.r.end() <= r.start(),
                "{}: new region {r:?} overlaps {:?}",
                self.ctx(),
                g.r
            );
        }
        // The space lists it.
        assert!(
            self.mm.regions().contains(&r),
            "{}: regions() does not list new {r:?}",
            self.ctx()
        );
        let pages = (r.len() / PS) as usize;
        self.regs.push(Reg {
            r,
            data: vec![0; r.len() as usize],
            written: vec![false; pages],
        });
    }

    /// A range for an access (see `usermm_testkit::workload::pick_range`).
    fn pick_range(&mut self, ri: usize) -> (u64, usize) {
        let rlen = self.regs[ri].r.len();
        usermm_testkit::workload::pick_range(&mut self.rng, rlen)
    }

    fn check_read(&mut self, ri: usize, off: u64, len: usize) {
        let g = &self.regs[ri];
        let addr = g.r.start() + off;
        let mut buf = vec![0xA5u8; len];
        if let Err(e) = self.mm.read(addr, &mut buf) {
            panic!("{}: read({addr:?}, {len}) failed: {e:?}", self.ctx());
        }
        let want = &g.data[off as usize..off as usize + len];
        if let Some(d) = first_diff(&buf, want) {
            panic!(
                "{}: read({addr:?}, {len}) of region {:?} at offset {off}: {d} \
                 (page at {:?})",
                self.ctx(),
                g.r,
                VAddr((addr.as_u64() + d_off(&buf, want)) & !(PS - 1)),
            );
        }
        let p0 = (off / PS) as usize;
        let p1 = ((off + len as u64 - 1) / PS) as usize;
        if (p0..=p1).all(|p| !g.written[p]) {
            self.zero_reads += 1;
        }
    }

    fn write(&mut self, ri: usize, off: u64, len: usize) {
        let mut data = vec![0u8; len];
        fill_random(&mut self.rng, &mut data);
        let g = &mut self.regs[ri];
        let addr = g.r.start() + off;
        if let Err(e) = self.mm.write(addr, &data) {
            panic!(
                "seed={} thread={} op#{} ({}): write({addr:?}, {len}) failed: {e:?}",
                self.seed, self.tid, self.op, self.opname
            );
        }
        g.data[off as usize..off as usize + len].copy_from_slice(&data);
        for p in (off / PS)..=((off + len as u64 - 1) / PS) {
            g.written[p as usize] = true;
        }
        self.bytes_written += len as u64;
    }

    fn guard_write(&mut self, ri: usize) {
        let g = &self.regs[ri];
        let page = self.rng.below(g.r.len() / PS);
        let within = self.rng.below(PS);
        let addr = g.r.start() + page * PS + within;
        let a = (self.rng.below(PS)) as usize;
        let b = (a + 1 + self.rng.below(PS - a as u64) as usize).min(PAGE_SIZE);
        let mut data = vec![0u8; b - a];
        fill_random(&mut self.rng, &mut data);
        let g = &mut self.regs[ri];
        let pofs = (page * PS) as usize;
        {
            let mut guard = self.mm.page_mut(addr).unwrap_or_else(|e| {
                panic!(
                    "seed={} thread={} op#{}: page_mut({addr:?}) failed: {e:?}",
                    self.seed, self.tid, self.op
                )
            });
            assert_eq!(guard.len(), PAGE_SIZE);
            if let Some(d) = first_diff(&guard, &g.data[pofs..pofs + PAGE_SIZE]) {
                panic!(
                    "seed={} thread={} op#{} (guard write): page_mut({addr:?}) shows wrong \
                     page content before the write: {d}",
                    self.seed, self.tid, self.op
                );
            }
            guard[a..b].copy_from_slice(&data);
        }
        g.data[pofs + a..pofs + b].copy_from_slice(&data);
        g.written[page as usize] = true;
        self.bytes_written += data.len() as u64;
    }

    fn guard_read(&mut self, ri: usize) {
        let g = &self.regs[ri];
        let page = self.rng.below(g.r.len() / PS);
        let addr = g.r.start() + page * PS + self.rng.below(PS);
        let pofs = (page * PS) as usize;
        let guard = self
            .mm
            .page(addr)
            .unwrap_or_else(|e| panic!("{}: page({addr:?}) failed: {e:?}", self.ctx()));
        assert_eq!(guard.len(), PAGE_SIZE, "{}", self.ctx());
        if let Some(d) = first_diff(&guard, &g.data[pofs..pofs + PAGE_SIZE]) {
            panic!(
                "{}: page({addr:?}) guard shows wrong content: {d}",
                self.ctx()
            );
        }
    }

    /// Checks that `addr..addr+len` is rejected with `BadAddress` by read, write and
    /// (for the first byte) the guards, and that a read leaves the buffer untouched.
    fn expect_bad(&mut self, addr: u64, len: usize, want_addr: Option<u64>) {
        let ctx = self.ctx();
        let check = |what: &str, r: Result<(), Error>| match r {
            Err(Error::BadAddress { addr: a }) => {
                if let Some(w) = want_addr {
                    assert_eq!(
                        a, w,
                        "{ctx}: {what}({addr:#x}, {len}) reported the wrong address"
                    );
                }
            }
            other => panic!("{ctx}: {what}({addr:#x}, {len}) gave {other:?}, want BadAddress"),
        };
        let mut buf = vec![0xA5u8; len];
        check("read", self.mm.read(VAddr(addr), &mut buf));
        assert!(
            buf.iter().all(|&b| b == 0xA5),
            "{ctx}: a failed read({addr:#x}, {len}) wrote into the buffer"
        );
        let mut data = vec![0u8; len];
        fill_random(&mut self.rng, &mut data);
        check("write", self.mm.write(VAddr(addr), &data));
        if len == 1 || want_addr == Some(addr) {
            check("page", self.mm.page(VAddr(addr)).map(|_| ()));
            check("page_mut", self.mm.page_mut(VAddr(addr)).map(|_| ()));
        }
        self.bad_checks += 1;
    }

    fn bad_address(&mut self) {
        let kind = self.rng.below(if self.own_space { 6 } else { 3 });
        match kind {
            0 => {
                // Null page.
                let a = self.rng.below(PS);
                let len = 1 + self.rng.below(16) as usize;
                self.expect_bad(a, len, Some(a));
            }
            1 => {
                // Beyond the address space, up to u64::MAX (overflowing ranges).
                let a = if self.rng.below(2) == 0 {
                    VADDR_END + self.rng.below(1 << 40)
                } else {
                    u64::MAX - self.rng.below(8)
                };
                let len = 1 + self.rng.below(64) as usize;
                self.expect_bad(a, len, Some(a));
            }
            2 => {
                // A range running off the end of the address space.
                let k = 1 + self.rng.below(PS);
                let len = (k + 1 + self.rng.below(PS)) as usize;
                self.expect_bad(VADDR_END - k, len, None);
            }
            _ => {
                // Own space: straddle the end of a region not followed by another,
                // and check the in-region part was not written.
                let ri = self.rng.below(self.regs.len() as u64) as usize;
                let r = self.regs[ri].r;
                let end = r.end().as_u64();
                if self.mine(end) {
                    // Followed by another region: look inside a gap instead, if any.
                    return;
                }
                let inside = 1 + self.rng.below(2 * PS);
                let inside = inside.min(r.len());
                let past = 1 + self.rng.below(PS);
                let start = end - inside;
                let want = if kind == 5 { end + past - 1 } else { end };
                if kind == 5 && self.mine(end + past - 1) {
                    return;
                }
                if kind == 5 {
                    // Entirely past the end.
                    self.expect_bad(end + past - 1, 1, Some(want));
                } else {
                    self.expect_bad(start, (inside + past) as usize, Some(end));
                }
                // The in-region bytes are unchanged.
                self.check_read(ri, r.len() - inside, inside as usize);
            }
        }
    }

    fn verify_all(&mut self) {
        for ri in 0..self.regs.len() {
            let len = self.regs[ri].r.len();
            let mut off = 0;
            while off < len {
                let n = (1 + self.rng.below(64 << 10)).min(len - off);
                self.check_read(ri, off, n as usize);
                off += n;
            }
        }
    }

    fn step(&mut self) {
        let x = self.rng.below(1000);
        let nregs = self.regs.len() as u64;
        let ri = self.rng.below(nregs) as usize;
        match x {
            0..=14 if self.live() < MAX_LIVE => {
                self.opname = "map";
                self.map(16 << 10, 1536 << 10);
                // A fresh region reads as zeros.
                let ri = self.regs.len() - 1;
                let (off, len) = self.pick_range(ri);
                self.check_read(ri, off, len);
            }
            15..=29 if self.live() - self.regs[ri].r.len() >= MIN_LIVE => {
                self.opname = "unmap";
                if self.rng.below(2) == 0 {
                    let len = self.regs[ri].r.len();
                    self.check_read(ri, 0, len as usize);
                }
                let g = self.regs.swap_remove(ri);
                if let Err(e) = self.mm.unmap(g.r) {
                    panic!("{}: unmap({:?}) failed: {e:?}", self.ctx(), g.r);
                }
                if self.own_space {
                    let a = g.r.start().as_u64() + self.rng.below(g.r.len());
                    if !self.mine(a) {
                        self.expect_bad(a, 1, Some(a));
                    }
                    match self.mm.unmap(g.r) {
                        Err(Error::BadAddress { .. }) => {}
                        other => panic!(
                            "{}: second unmap of {:?} gave {other:?}, want BadAddress",
                            self.ctx(),
                            g.r
                        ),
                    }
                }
            }
            0..=379 => {
                self.opname = "write";
                let (off, len) = self.pick_range(ri);
                self.write(ri, off, len);
            }
            380..=699 => {
                self.opname = "read";
                let (off, len) = self.pick_range(ri);
                self.check_read(ri, off, len);
            }
            700..=799 => {
                self.opname = "guard write";
                self.guard_write(ri);
            }
            800..=899 => {
                self.opname = "guard read";
                self.guard_read(ri);
            }
            900..=954 => {
                self.opname = "fill";
                let rlen = self.regs[ri].r.len();
                let len = ((1 + self.rng.below(16)) * PS).min(rlen);
                let off = self.rng.below((rlen - len) / PS + 1) * PS;
                self.write(ri, off, len as usize);
            }
            _ => {
                self.opname = "bad address";
                self.bad_address();
            }
        }
    }
}

/// Where the first difference is (for the message).
fn d_off(a: &[u8], b: &[u8]) -> u64 {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0) as u64
}

#[test]
fn random_ops_match_model() {
    let seed = seed(0x5EED_0001);
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(BUDGET)).unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("swap"), 256 << 20))
        .unwrap();
    let shared = vm.new_space();
    let spaces: Vec<(AddressSpace, bool)> = vec![
        (shared.clone(), false),
        (shared, false),
        (vm.new_space(), true),
        (vm.new_space(), true),
    ];
    let spaces = Arc::new(std::sync::Mutex::new(
        spaces.into_iter().map(Some).collect::<Vec<_>>(),
    ));
    let written = Arc::new(AtomicU64::new(0));
    let zero_reads = Arc::new(AtomicU64::new(0));
    let bad_checks = Arc::new(AtomicU64::new(0));
    let (w2, z2, b2) = (written.clone(), zero_reads.clone(), bad_checks.clone());
    let vm2 = vm.clone();
    run_workers(
        THREADS,
        Duration::from_secs(60),
        move || format!("stats: {:?}\n", vm2.stats()),
        move |me| {
            let tid = me.tid();
            let (mm, own_space) = spaces.lock().unwrap()[tid].take().unwrap();
            let mut w = Worker {
                tid,
                seed,
                mm,
                own_space,
                rng: thread_rng(seed, tid),
                regs: Vec::new(),
                op: 0,
                opname: "initial map",
                bytes_written: 0,
                zero_reads: 0,
                bad_checks: 0,
            };
            while w.live() < MIN_LIVE + (1 << 20) {
                w.map(256 << 10, 2 << 20);
            }
            for i in 0..OPS_PER_THREAD {
                if me.should_stop() {
                    return;
                }
                w.op = i;
                me.begin(|| format!("op#{i}"));
                w.step();
                me.done();
            }
            w.op = OPS_PER_THREAD;
            w.opname = "final verify";
            me.begin(|| "final verify".into());
            w.verify_all();
            if own_space {
                let mut got = w.mm.regions();
                let mut want: Vec<Region> = w.regs.iter().map(|g| g.r).collect();
                got.sort_by_key(|r| r.start());
                want.sort_by_key(|r| r.start());
                assert_eq!(got, want, "{}: regions() differs from the model", w.ctx());
            }
            // Unmap half the regions; the rest go with the space.
            let n = w.regs.len() / 2;
            for g in w.regs.drain(..n) {
                w.mm.unmap(g.r).unwrap_or_else(|e| {
                    panic!("seed={seed} thread={tid} final unmap of {:?}: {e:?}", g.r)
                });
            }
            me.done();
            w2.fetch_add(w.bytes_written, Ordering::Relaxed);
            z2.fetch_add(w.zero_reads, Ordering::Relaxed);
            b2.fetch_add(w.bad_checks, Ordering::Relaxed);
        },
    );
    let s = vm.stats();
    let written = written.load(Ordering::Relaxed);
    println!(
        "seed={seed}: {} ops, {} MiB written, {} reads of never-written memory, {} bad-address \
         checks, {:.1} s; stats {s:?}",
        THREADS * OPS_PER_THREAD,
        written >> 20,
        zero_reads.load(Ordering::Relaxed),
        bad_checks.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
    // The run really exercised what it claims to.
    assert!(
        written >= 16 << 20,
        "seed={seed}: only {written} bytes written"
    );
    assert!(
        zero_reads.load(Ordering::Relaxed) > 0,
        "seed={seed}: no read of never-written memory"
    );
    assert!(
        bad_checks.load(Ordering::Relaxed) > 0,
        "seed={seed}: no bad-address check"
    );
    assert!(
        s.pswpout > 0 && s.pswpin > 0 && s.pgmajfault > 0,
        "seed={seed}: no swapping: {s:?}"
    );
    assert_eq!(
        s.write_errors + s.read_errors,
        0,
        "seed={seed}: device errors: {s:?}"
    );
    // Everything goes back when the spaces are gone.
    assert_no_leak(&vm, Duration::from_secs(10), &format!("seed={seed}"));
}

/// Found by `random_ops_match_model` (seed 238, rarely: a fresh region read back
/// another region's data). `unmap` removes the region and then frees its pages with
/// the regions lock dropped, so `map_anon` can hand the same range out again while the
/// old pages are still there: the new region shows the old data, and the old unmap
/// later frees pages the new region has written. A shared guard on a page of the old
/// region makes the window as wide as we like.
#[test]
fn map_during_unmap_gets_a_clean_range() {
    let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
    let mm = vm.new_space();
    let x = mm.map_anon(2 * PAGE_SIZE).unwrap();
    mm.write(x.start(), &[0xAB; 2 * PAGE_SIZE]).unwrap();
    let mut problems = Vec::new();
    std::thread::scope(|s| {
        let guard = mm.page(x.start()).unwrap();
        // Unmap waits for the guard before it can free page 0 (and page 1 after it).
        let unmapper = s.spawn(|| mm.unmap(x));
        std::thread::sleep(Duration::from_millis(100));
        let y = mm.map_anon(2 * PAGE_SIZE).unwrap();
        for p in 0..2 {
            let mut b = [0u8; 8];
            mm.read(y.start() + p * PS, &mut b).unwrap();
            if b != [0; 8] {
                problems.push(format!(
                    "fresh region {y:?} (old one {x:?} still being unmapped) page {p} reads {b:02x?}, not zeros"
                ));
            }
        }
        mm.write(y.start() + PS, b"new data").unwrap();
        drop(guard);
        unmapper.join().unwrap().unwrap();
        let mut b = [0u8; 8];
        mm.read(y.start() + PS, &mut b).unwrap();
        if &b != b"new data" {
            problems.push(format!(
                "a write to the new region was lost when the old unmap finished: reads {b:02x?}"
            ));
        }
        mm.unmap(y).unwrap();
    });
    drop(mm);
    assert_no_leak(&vm, Duration::from_secs(5), "map during unmap");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
