//! `usermm stress swapoff`: the reproducer of seed 002 as a bounded stress run;
//! `usermm stress all`: everything at once (see [`main_all`]); `usermm stress
//! files`: seed 000's reproducer (see `stress_files`).
//!
//! Three swap devices; one of them is removed (`swapoff`) and a fresh one added in a
//! loop, while workers map memory larger than the budget, fork, write, verify in
//! parent and child, and let children exit. Every page is checked against the
//! generation its owner last wrote (the test kit's generation stamps). The test
//! kit's watchdog prints what each thread was waiting on and fails the run if any
//! thread makes no progress for `--stall` seconds. At the end
//! every space is dropped and the run checks that no slot and no frame leaked.
//! Exit codes: 0 clean, 1 mismatch or error, 3 stall.

use super::util::parse_duration;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use usermm::config::SwapKind;
use usermm::device::nbd::NbdDevice;
use usermm::{AddressSpace, Config, Region, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::check::wait_no_leak;
use usermm_testkit::nbd::{
    disk, have, kill_all, package_of, servers_required, try_qemu_nbd, Endpoint, Server,
    QEMU_NBD_TEST_ARGS,
};
use usermm_testkit::pattern::{
    fill_gens, fill_random, first_diff, gen_stamp, verify_gens, GEN_OFFSET,
};
use usermm_testkit::watchdog::{Failure, Me, Watchdog};
use usermm_testkit::Rng;

/// Arguments of `usermm stress`.
#[derive(clap::Args, Debug)]
pub struct StressArgs {
    /// Which stress: `swapoff` (seed 002: swapoff racing fork, fault and exit),
    /// `files` (seed 000: threads writing their own files through shared mappings
    /// and `write_at` under a budget of a few dozen frames), or `all` (the
    /// differential workload, fork/exit workers, swapoff/swapon and an NBD server
    /// killed and restarted, all at once).
    #[arg(value_parser = ["swapoff", "files", "all"])]
    pub which: String,
    /// How long to run (e.g. 60s, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Memory budget (default 2M; 192K, 48 frames, for `files`).
    #[arg(long, value_parser = parse_bytes)]
    pub budget: Option<u64>,
    /// Worker threads (each forks, writes, verifies, exits; for `files`, each
    /// writes its own file).
    #[arg(long, visible_alias = "threads", default_value_t = 3)]
    pub workers: usize,
    /// Pages each worker maps.
    #[arg(long, default_value_t = 512)]
    pub pages: u64,
    /// Seconds without progress that count as a stall.
    #[arg(long, default_value_t = 20)]
    pub stall: u64,
    /// Directory for the swap files (default: the temporary directory).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// `all`: differential workers (random map, write, read, fork, unmap and exit
    /// checked byte for byte against an in-memory model).
    #[arg(long, default_value_t = 2)]
    pub diff_workers: usize,
    /// `all`: seed of the differential workload's operation sequences (default: from
    /// the clock; printed, so a run can be replayed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// `all`: how often the NBD server is killed (SIGKILL) and restarted.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub nbd_restart: Duration,
}

/// The budget of `swapoff` and `all` without `--budget`.
const DEFAULT_BUDGET: u64 = 2 << 20;

fn parse_bytes(s: &str) -> Result<u64, String> {
    usermm::config::parse_size(s)
}

/// One worker: fork, write on both sides, verify both, let the child exit. The page
/// reads and writes announce themselves to the watchdog.
fn worker(vm: &Vm, pages: u64, me: &Me) -> Result<u64, String> {
    let mm = vm.new_space();
    let r = mm
        .map_anon((pages * PAGE_SIZE as u64) as usize)
        .map_err(|e| e.to_string())?;
    let mut gen = 1;
    fill_gens(&mm, r.start(), pages, gen)?;
    let mut rounds = 0;
    while !me.should_stop() {
        me.begin(|| "fork".into());
        let child = mm.fork().map_err(|e| format!("fork: {e}"))?;
        me.done();
        verify_gens(&child, r.start(), pages, gen, "child after fork")?;
        fill_gens(&child, r.start(), pages / 2, gen + 1000)?;
        gen += 1;
        fill_gens(&mm, r.start(), pages, gen)?;
        verify_gens(&mm, r.start(), pages, gen, "parent")?;
        verify_gens(&child, r.start(), pages / 2, gen - 1 + 1000, "child")?;
        me.begin(|| "exit child".into());
        drop(child);
        me.done();
        rounds += 1;
    }
    Ok(rounds)
}

/// Runs the command; returns the exit code.
pub fn main(a: StressArgs) -> i32 {
    if a.which == "all" {
        return main_all(a);
    }
    let budget = a.budget.unwrap_or(DEFAULT_BUDGET);
    let (dir, vm) = match setup(&a.dir, budget) {
        Ok(x) => x,
        Err(code) => return code,
    };
    // Each device can hold every worker's pages twice over, so any two suffice.
    let dev_bytes = (a.workers as u64 * a.pages * 4 + 1024) * PAGE_SIZE as u64;
    let mut ids = match add_devices(&vm, dir.path(), dev_bytes) {
        Ok(ids) => ids,
        Err(code) => return code,
    };
    println!(
        "stress swapoff: {} workers x {} pages, budget {} KiB, 3 devices of {} MiB, for {:?}",
        a.workers,
        a.pages,
        budget >> 10,
        dev_bytes >> 20,
        a.duration
    );
    let rounds = Arc::new(AtomicU64::new(0));
    let error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let fail = |error: &Mutex<Option<String>>, e: String| {
        let mut g = error.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert(e);
    };
    let stats_vm = vm.clone();
    let mut wd = Watchdog::new(Duration::from_secs(a.stall))
        .extra(move || format!("  stats: {:?}\n", stats_vm.stats()));
    for w in 0..a.workers {
        let (vm, rounds, error, pages) = (vm.clone(), rounds.clone(), error.clone(), a.pages);
        wd = wd.thread(format!("worker {w}"), move |me| {
            match worker(&vm, pages, me) {
                Ok(r) => {
                    rounds.fetch_add(r, Ordering::Relaxed);
                }
                Err(e) => {
                    fail(&error, e);
                    me.board().stop();
                }
            }
        });
    }
    let t0 = Instant::now();
    let cycles = Arc::new(AtomicU64::new(0));
    let failed_swapoffs = Arc::new(AtomicU64::new(0));
    {
        let (vm, error, cycles, failed_swapoffs) = (
            vm.clone(),
            error.clone(),
            cycles.clone(),
            failed_swapoffs.clone(),
        );
        let (dir, duration) = (dir.path().to_path_buf(), a.duration);
        wd = wd.thread("swapoff loop", move |me| {
            let mut victim_idx = 0usize;
            let mut next_report = Instant::now() + Duration::from_secs(5);
            while t0.elapsed() < duration && !me.should_stop() {
                match cycle_device(&vm, &mut ids, victim_idx, &dir, dev_bytes, me) {
                    Ok(Ok(())) => {
                        cycles.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(usermm::Error::OutOfMemory)) => {
                        failed_swapoffs.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => fail(&error, format!("swapoff: {e}")),
                    Err(e) => {
                        fail(&error, e);
                        cycles.fetch_add(1, Ordering::Relaxed);
                    }
                }
                me.done();
                if error.lock().map(|e| e.is_some()).unwrap_or(true) {
                    break;
                }
                victim_idx = (victim_idx + 1) % 3;
                if Instant::now() >= next_report {
                    let s = vm.stats();
                    println!(
                        "  {:>5.1}s: {} swapoff cycles, pswpin {} pswpout {} cow {} free {}/{}",
                        t0.elapsed().as_secs_f64(),
                        cycles.load(Ordering::Relaxed),
                        s.pswpin,
                        s.pswpout,
                        s.cow_faults,
                        s.free_frames,
                        s.total_frames
                    );
                    next_report += Duration::from_secs(5);
                }
            }
            // The workers finish their round and stop.
            me.board().stop();
        });
    }
    match wd.try_run() {
        Ok(()) => {}
        Err(f @ Failure::Stalled { .. }) => {
            eprintln!("STALL: {f}");
            return 3;
        }
        Err(f @ Failure::Panicked { .. }) => fail(&error, f.to_string()),
    }
    let (cycles, failed_swapoffs, rounds) = (
        cycles.load(Ordering::Relaxed),
        failed_swapoffs.load(Ordering::Relaxed),
        rounds.load(Ordering::Relaxed),
    );
    let error = error.lock().unwrap_or_else(|p| p.into_inner()).take();
    // Leak check: every space is gone, so every slot and frame must be free.
    let leak = wait_no_leak(&vm, Duration::from_secs(10)).err();
    let s = vm.stats();
    println!(
        "done in {:.1}s: {cycles} swapoff/swapon cycles ({failed_swapoffs} refused for lack of room), {rounds} fork rounds, pswpin {} pswpout {} cow faults {}",
        t0.elapsed().as_secs_f64(),
        s.pswpin,
        s.pswpout,
        s.cow_faults
    );
    match error.or(leak) {
        Some(e) => {
            eprintln!("FAILED: {e}");
            1
        }
        None => {
            println!("OK: every page verified, no slot or frame leaked");
            0
        }
    }
}

// ------------------------------------------------------------------ stress all

/// How long the NBD server stays down at a restart: shorter than the request
/// timeout (reads wait for the restarted server)…
const NBD_DOWN: Duration = Duration::from_millis(300);
/// … except at every [`NBD_LONG_EVERY`]th restart: longer than the timeout, so the
/// accesses that need the server fail with `Error::Device` and are retried.
const NBD_LONG_DOWN: Duration = Duration::from_millis(2500);
const NBD_LONG_EVERY: u64 = 5;
/// The NBD options of `stress all`: a request (a read waiting for the restarted
/// server) may take 2 s, well over an outage.
const NBD_OPTS: &str = "timeout=2";
/// Spaces a differential worker keeps at most (forks add one, exits remove one).
const DIFF_MAX_SPACES: usize = 3;
/// Bytes mapped in each differential space, at least and at most.
const DIFF_MIN_LIVE: u64 = 1 << 20;
const DIFF_MAX_LIVE: u64 = 3 << 20;
const PS: u64 = PAGE_SIZE as u64;
/// The differential operations, as counted.
const DIFF_OPS: [&str; 6] = ["map", "write", "read", "fork", "unmap", "exit"];
const MAP: usize = 0;
const WRITE: usize = 1;
const READ: usize = 2;
const FORK: usize = 3;
const UNMAP: usize = 4;
const EXIT: usize = 5;

/// The counters of `stress all`, shared by its threads.
#[derive(Default)]
struct Counters {
    diff: [AtomicU64; 6],
    diff_pages: AtomicU64,
    fork_rounds: AtomicU64,
    fork_pages: AtomicU64,
    retried_device: AtomicU64,
    retried_oom: AtomicU64,
    retried_oos: AtomicU64,
    mismatches: AtomicU64,
    cycles: AtomicU64,
    refused_oom: AtomicU64,
    refused_other: AtomicU64,
    nbd_restarts: AtomicU64,
    /// Pages stored on the NBD device when its server was killed, summed over the
    /// kills (each must read back after the restart).
    nbd_pages_at_kill: AtomicU64,
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What every thread of `stress all` shares.
struct Shared {
    seed: u64,
    deadline: Instant,
    c: Counters,
    /// The first error or mismatch.
    error: Mutex<Option<String>>,
}

/// Why a thread of `stress all` stops early.
enum Stop {
    /// An error the library must not return here, or a thread that cannot go on.
    Error(String),
    /// Data read back is not what was written.
    Mismatch(String),
    /// Another thread failed (or the watchdog fired): give up quietly.
    Aborted,
}

impl Shared {
    /// The duration is over: finish the current round, verify, stop.
    fn ending(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Records an error found outside the threads (a panic the watchdog reported).
    fn fail_quiet(&self, e: String) {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }

    /// Records why `me` stopped and stops the others.
    fn fail(&self, me: &Me, s: Stop) {
        let msg = match s {
            Stop::Aborted => return,
            Stop::Error(e) => e,
            Stop::Mismatch(m) => {
                bump(&self.c.mismatches, 1);
                eprintln!("MISMATCH: {m}");
                format!("mismatch: {m}")
            }
        };
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(msg);
        me.board().stop();
    }
}

/// Runs `f` (announced to the watchdog as `what`) until it succeeds, counting and
/// retrying the errors the library may return under pressure: `Device` (the NBD
/// server is down), `OutOfMemory` (no page can be written out right now),
/// `OutOfSwap`. Only success counts as progress, so an access that keeps failing
/// is a stall. A device error that keeps reporting bad data (a page the device
/// lost: the checksum caught it) fails after ten tries; any other error fails at
/// once.
fn retry<T>(
    sh: &Shared,
    me: &Me,
    what: &dyn Fn() -> String,
    mut f: impl FnMut() -> usermm::Result<T>,
) -> Result<T, Stop> {
    let mut bad_data = 0;
    loop {
        me.begin(what);
        let e = match f() {
            Ok(v) => {
                me.done();
                return Ok(v);
            }
            Err(e) => e,
        };
        match &e {
            usermm::Error::Device { source, .. } => {
                bump(&sh.c.retried_device, 1);
                if source.kind() == std::io::ErrorKind::InvalidData {
                    bad_data += 1;
                    if bad_data >= 10 {
                        return Err(Stop::Error(format!(
                            "seed={}: {}: {e} ({bad_data} times in a row: data lost by the device?)",
                            sh.seed,
                            what()
                        )));
                    }
                }
            }
            usermm::Error::OutOfMemory => bump(&sh.c.retried_oom, 1),
            usermm::Error::OutOfSwap => bump(&sh.c.retried_oos, 1),
            _ => return Err(Stop::Error(format!("seed={}: {}: {e}", sh.seed, what()))),
        }
        if me.should_stop() {
            return Err(Stop::Aborted);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------- fork/exit workers

fn gen_at(base: usermm::VAddr, page: u64) -> usermm::VAddr {
    base + page * PS + GEN_OFFSET
}

/// Writes generation `gen` to `pages` (retrying transient errors).
fn put_gens(
    sh: &Shared,
    me: &Me,
    mm: &AddressSpace,
    base: usermm::VAddr,
    pages: std::ops::Range<u64>,
    gen: u64,
    who: &str,
) -> Result<(), Stop> {
    for p in pages {
        let stamp = gen_stamp(p, gen);
        retry(
            sh,
            me,
            &|| format!("{who}: write generation {gen:#x} to page {p}"),
            || mm.write(gen_at(base, p), &stamp),
        )?;
    }
    Ok(())
}

/// Checks generation `gen` on `pages`; a wrong stamp is a mismatch.
fn check_gens(
    sh: &Shared,
    me: &Me,
    mm: &AddressSpace,
    base: usermm::VAddr,
    pages: std::ops::Range<u64>,
    gen: u64,
    who: &str,
) -> Result<(), Stop> {
    let show = |b: &[u8; 16]| {
        format!(
            "(page {}, generation {:#x})",
            u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(b[8..].try_into().expect("8 bytes"))
        )
    };
    for p in pages {
        let mut b = [0u8; 16];
        retry(
            sh,
            me,
            &|| format!("{who}: read page {p} (expect generation {gen:#x})"),
            || mm.read(gen_at(base, p), &mut b),
        )?;
        bump(&sh.c.fork_pages, 1);
        if b != gen_stamp(p, gen) {
            let mut again = [0u8; 16];
            let second = match mm.read(gen_at(base, p), &mut again) {
                Ok(()) => format!("a second read gives {}", show(&again)),
                Err(e) => format!("a second read failed: {e}"),
            };
            return Err(Stop::Mismatch(format!(
                "seed={} {who}: page {p} holds {}, expected generation {gen:#x}; {second}",
                sh.seed,
                show(&b)
            )));
        }
    }
    Ok(())
}

/// A fork/exit worker of `stress all`: `worker` with the retries of [`retry`]. The
/// child's own writes carry generation `gen | 1 << 32`, so no stamp of one side can
/// pass for the other's.
fn fork_worker(vm: &Vm, pages: u64, sh: &Shared, me: &Me) -> Result<(), Stop> {
    let mm = vm.new_space();
    let len = (pages * PS) as usize;
    let r = retry(sh, me, &|| format!("map_anon({len})"), || mm.map_anon(len))?;
    let base = r.start();
    let half = pages / 2;
    let mut gen = 1;
    put_gens(sh, me, &mm, base, 0..pages, gen, "parent")?;
    while !sh.ending() && !me.should_stop() {
        let child = retry(sh, me, &|| "fork".into(), || mm.fork())?;
        check_gens(sh, me, &child, base, 0..pages, gen, "child after fork")?;
        put_gens(sh, me, &child, base, 0..half, gen | 1 << 32, "child")?;
        gen += 1;
        put_gens(sh, me, &mm, base, 0..pages, gen, "parent")?;
        check_gens(sh, me, &mm, base, 0..pages, gen, "parent")?;
        check_gens(sh, me, &child, base, 0..half, (gen - 1) | 1 << 32, "child")?;
        check_gens(
            sh,
            me,
            &child,
            base,
            half..pages,
            gen - 1,
            "child (pages it did not write)",
        )?;
        me.begin(|| "exit child".into());
        drop(child);
        me.done();
        bump(&sh.c.fork_rounds, 1);
    }
    me.begin(|| "exit parent".into());
    drop(mm);
    me.done();
    Ok(())
}

// ------------------------------------------------------- differential workers

/// A region and the model of its bytes.
#[derive(Clone)]
struct DReg {
    r: Region,
    data: Vec<u8>,
}

/// A space and the model of its regions (this worker is the space's only user, so
/// the model is exact).
struct DSpace {
    id: u64,
    mm: AddressSpace,
    regs: Vec<DReg>,
}

/// A differential worker: random map, write, read, fork, unmap and exit over its
/// spaces, every read compared byte for byte with the model (the ideas of
/// tests/differential.rs, plus fork: a child starts with a copy of the parent's
/// model, and after that each side's writes are its own).
struct Diff<'a> {
    sh: &'a Shared,
    me: &'a Me,
    vm: Vm,
    tid: usize,
    rng: Rng,
    spaces: Vec<DSpace>,
    next_id: u64,
    op: u64,
    opname: &'static str,
}

impl Diff<'_> {
    fn ctx(&self, si: usize) -> String {
        format!(
            "seed={} differential worker {} op#{} ({}) space #{}",
            self.sh.seed, self.tid, self.op, self.opname, self.spaces[si].id
        )
    }

    fn live(&self, si: usize) -> u64 {
        self.spaces[si].regs.iter().map(|g| g.r.len()).sum()
    }

    fn count(&self, op: usize) {
        bump(&self.sh.c.diff[op], 1);
    }

    fn new_space(&mut self) -> Result<(), Stop> {
        self.spaces.push(DSpace {
            id: self.next_id,
            mm: self.vm.new_space(),
            regs: Vec::new(),
        });
        self.next_id += 1;
        let si = self.spaces.len() - 1;
        while self.live(si) < DIFF_MIN_LIVE + (256 << 10) {
            self.map(si)?;
        }
        Ok(())
    }

    fn map(&mut self, si: usize) -> Result<(), Stop> {
        let len = (16 << 10) + self.rng.below(512 << 10);
        let ctx = self.ctx(si);
        let mm = self.spaces[si].mm.clone();
        let r = retry(
            self.sh,
            self.me,
            &|| format!("{ctx}: map_anon({len})"),
            || mm.map_anon(len as usize),
        )?;
        if r.len() != len.div_ceil(PS) * PS || !r.start().is_page_aligned() {
            return Err(Stop::Error(format!(
                "{ctx}: map_anon({len}) returned {r:?}"
            )));
        }
        if let Some(g) = self.spaces[si]
            .regs
            .iter()
            .find(|g| r.start() < g.r.end() && g.r.start() < r.end())
        {
            return Err(Stop::Error(format!(
                "{ctx}: new region {r:?} overlaps {:?}",
                g.r
            )));
        }
        self.spaces[si].regs.push(DReg {
            r,
            data: vec![0; r.len() as usize],
        });
        self.count(MAP);
        // A fresh region reads as zeros.
        let ri = self.spaces[si].regs.len() - 1;
        let (off, len) = self.pick_range(si, ri);
        self.check_read(si, ri, off, len)
    }

    /// A range of region `ri` (see `usermm_testkit::workload::pick_range`).
    fn pick_range(&mut self, si: usize, ri: usize) -> (u64, usize) {
        let rlen = self.spaces[si].regs[ri].r.len();
        usermm_testkit::workload::pick_range(&mut self.rng, rlen)
    }

    fn check_read(&mut self, si: usize, ri: usize, off: u64, len: usize) -> Result<(), Stop> {
        let ctx = self.ctx(si);
        let sp = &self.spaces[si];
        let g = &sp.regs[ri];
        let addr = g.r.start() + off;
        let mut buf = vec![0xA5u8; len];
        retry(
            self.sh,
            self.me,
            &|| format!("{ctx}: read({addr:?}, {len})"),
            || sp.mm.read(addr, &mut buf),
        )?;
        bump(
            &self.sh.c.diff_pages,
            (off + len as u64 - 1) / PS - off / PS + 1,
        );
        let want = &g.data[off as usize..off as usize + len];
        let Some(d) = first_diff(&buf, want) else {
            return Ok(());
        };
        let at = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0) as u64;
        let mut again = vec![0u8; len];
        let second = match sp.mm.read(addr, &mut again) {
            Ok(()) if again == buf => "a second read gives the same wrong bytes".to_string(),
            Ok(()) => match first_diff(&again, want) {
                None => "a second read gives the right bytes".to_string(),
                Some(d2) => format!("a second read is wrong differently: {d2}"),
            },
            Err(e) => format!("a second read failed: {e}"),
        };
        Err(Stop::Mismatch(format!(
            "{ctx}: read({addr:?}, {len}) of region {:?} at offset {off}: {d} \
             (page at {:#x}); {second}",
            g.r,
            (addr.as_u64() + at) & !(PS - 1)
        )))
    }

    fn write(&mut self, si: usize, ri: usize, off: u64, len: usize) -> Result<(), Stop> {
        let mut data = vec![0u8; len];
        fill_random(&mut self.rng, &mut data);
        let ctx = self.ctx(si);
        let sp = &self.spaces[si];
        let addr = sp.regs[ri].r.start() + off;
        // A write that failed may have written part of the range: the same write
        // again makes the model exact.
        retry(
            self.sh,
            self.me,
            &|| format!("{ctx}: write({addr:?}, {len})"),
            || sp.mm.write(addr, &data),
        )?;
        self.spaces[si].regs[ri].data[off as usize..off as usize + len].copy_from_slice(&data);
        self.count(WRITE);
        Ok(())
    }

    fn verify_space(&mut self, si: usize) -> Result<(), Stop> {
        for ri in 0..self.spaces[si].regs.len() {
            let len = self.spaces[si].regs[ri].r.len();
            let mut off = 0;
            while off < len {
                let n = (1 + self.rng.below(64 << 10)).min(len - off);
                self.check_read(si, ri, off, n as usize)?;
                off += n;
            }
        }
        Ok(())
    }

    fn fork(&mut self, si: usize) -> Result<(), Stop> {
        let ctx = self.ctx(si);
        let mm = self.spaces[si].mm.clone();
        let child = retry(self.sh, self.me, &|| format!("{ctx}: fork"), || mm.fork())?;
        let regs = self.spaces[si].regs.clone();
        self.spaces.push(DSpace {
            id: self.next_id,
            mm: child,
            regs,
        });
        self.next_id += 1;
        self.count(FORK);
        // The child sees the parent's bytes, the parent still sees them.
        let ci = self.spaces.len() - 1;
        for s in [ci, si] {
            let ri = self.rng.below(self.spaces[s].regs.len() as u64) as usize;
            let (off, len) = self.pick_range(s, ri);
            self.check_read(s, ri, off, len)?;
        }
        Ok(())
    }

    fn exit(&mut self, si: usize) -> Result<(), Stop> {
        if self.rng.below(2) == 0 {
            self.verify_space(si)?;
        }
        let sp = self.spaces.swap_remove(si);
        self.me.begin(|| format!("exit of space #{}", sp.id));
        drop(sp);
        self.me.done();
        self.count(EXIT);
        Ok(())
    }

    fn unmap(&mut self, si: usize, ri: usize) -> Result<(), Stop> {
        if self.rng.below(2) == 0 {
            let len = self.spaces[si].regs[ri].r.len();
            self.check_read(si, ri, 0, len as usize)?;
        }
        let ctx = self.ctx(si);
        let g = self.spaces[si].regs.swap_remove(ri);
        let mm = self.spaces[si].mm.clone();
        retry(
            self.sh,
            self.me,
            &|| format!("{ctx}: unmap({:?})", g.r),
            || mm.unmap(g.r),
        )?;
        self.count(UNMAP);
        // Nothing of this worker's is mapped there any more.
        let a = g.r.start() + self.rng.below(g.r.len());
        if !self.spaces[si].regs.iter().any(|h| h.r.contains(a)) {
            let mut b = [0u8; 1];
            match mm.read(a, &mut b) {
                Err(usermm::Error::BadAddress { .. }) => {}
                other => {
                    return Err(Stop::Error(format!(
                        "{ctx}: read at {a:?} in unmapped {:?} gave {other:?}, want BadAddress",
                        g.r
                    )))
                }
            }
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), Stop> {
        let si = self.rng.below(self.spaces.len() as u64) as usize;
        let ri = self.rng.below(self.spaces[si].regs.len() as u64) as usize;
        match self.rng.below(1000) {
            0..=29 if self.live(si) < DIFF_MAX_LIVE => {
                self.opname = "map";
                self.map(si)
            }
            30..=59 if self.live(si) - self.spaces[si].regs[ri].r.len() >= DIFF_MIN_LIVE => {
                self.opname = "unmap";
                self.unmap(si, ri)
            }
            60..=69 if self.spaces.len() < DIFF_MAX_SPACES => {
                self.opname = "fork";
                self.fork(si)
            }
            70..=79 if self.spaces.len() > 1 => {
                self.opname = "exit";
                self.exit(si)
            }
            0..=499 => {
                self.opname = "write";
                let (off, len) = self.pick_range(si, ri);
                self.write(si, ri, off, len)
            }
            _ => {
                self.opname = "read";
                let (off, len) = self.pick_range(si, ri);
                self.count(READ);
                self.check_read(si, ri, off, len)
            }
        }
    }

    fn run(&mut self) -> Result<(), Stop> {
        self.opname = "initial map";
        self.new_space()?;
        self.new_space()?;
        while !self.sh.ending() && !self.me.should_stop() {
            self.op += 1;
            self.step()?;
        }
        self.opname = "final verify";
        for si in 0..self.spaces.len() {
            self.verify_space(si)?;
        }
        while let Some(sp) = self.spaces.pop() {
            self.me.begin(|| format!("exit of space #{}", sp.id));
            drop(sp);
            self.me.done();
        }
        Ok(())
    }
}

// ------------------------------------------------------------ the NBD device

/// The NBD part of `stress all`: qemu-nbd on a Unix socket, its backing file, and
/// the client device (for its reconnection counters).
struct Nbd {
    img: std::path::PathBuf,
    sock: std::path::PathBuf,
    srv: Arc<Mutex<Option<Server>>>,
    dev: Arc<NbdDevice>,
    id: usermm::SwapId,
}

impl Nbd {
    /// Pages stored on the device now.
    fn used_pages(&self, vm: &Vm) -> u64 {
        vm.swaps()
            .iter()
            .find(|d| d.id == self.id)
            .map_or(0, |d| d.used / PS)
    }
}

fn start_nbd(vm: &Vm, dir: &std::path::Path, bytes: u64) -> Result<Nbd, String> {
    let img = disk(dir, "nbd.img", bytes);
    let sock = dir.join("nbd.sock");
    let srv = try_qemu_nbd(&img, Endpoint::Unix(sock.clone()), QEMU_NBD_TEST_ARGS)?;
    let spec = SwapSpec::parse(&srv.spec(NBD_OPTS)).map_err(|e| e.to_string())?;
    let SwapKind::Nbd { addr, options } = &spec.kind else {
        return Err(format!("{}: not an NBD spec", spec.text));
    };
    let dev = Arc::new(
        NbdDevice::connect(addr, options, &spec.text)
            .map_err(|e| format!("connect to {}: {e}", spec.text))?,
    );
    let id = vm
        .swapon_device(dev.clone(), spec.prio)
        .map_err(|e| format!("swapon {}: {e}", spec.text))?;
    Ok(Nbd {
        img,
        sock,
        srv: Arc::new(Mutex::new(Some(srv))),
        dev,
        id,
    })
}

/// Kills the server (SIGKILL, by pid) every `every`, leaves it down for
/// [`NBD_DOWN`] (or [`NBD_LONG_DOWN`]), restarts it on the same socket and backing
/// file. The server is up when this returns.
fn nbd_restarter(vm: &Vm, nbd: &Nbd, every: Duration, sh: &Shared, me: &Me) -> Result<(), Stop> {
    let mut next = Instant::now() + every;
    while !sh.ending() && !me.should_stop() {
        std::thread::sleep(
            Duration::from_millis(20).min(next.saturating_duration_since(Instant::now())),
        );
        me.done();
        if Instant::now() < next {
            continue;
        }
        let mut g = nbd.srv.lock().unwrap_or_else(|p| p.into_inner());
        let pid = g.as_ref().and_then(|s| s.pid());
        me.begin(|| format!("kill qemu-nbd (pid {pid:?})"));
        if let Some(mut s) = g.take() {
            bump(&sh.c.nbd_pages_at_kill, nbd.used_pages(vm));
            s.kill();
        }
        let n = get(&sh.c.nbd_restarts) + 1;
        std::thread::sleep(if n.is_multiple_of(NBD_LONG_EVERY) {
            NBD_LONG_DOWN
        } else {
            NBD_DOWN
        });
        let mut tries = 0;
        loop {
            me.begin(|| format!("restart qemu-nbd on {}", nbd.sock.display()));
            match try_qemu_nbd(
                &nbd.img,
                Endpoint::Unix(nbd.sock.clone()),
                QEMU_NBD_TEST_ARGS,
            ) {
                Ok(s) => {
                    *g = Some(s);
                    break;
                }
                Err(e) if tries < 3 => {
                    eprintln!("  (restart of qemu-nbd failed, retrying: {e})");
                    tries += 1;
                }
                Err(e) => return Err(Stop::Error(format!("restart of qemu-nbd: {e}"))),
            }
        }
        me.done();
        bump(&sh.c.nbd_restarts, 1);
        next = Instant::now() + every;
    }
    Ok(())
}

// ---------------------------------------------------------------- the command

/// `usermm stress all`: for `--duration`, all at once under one watchdog:
/// - `--diff-workers` differential workers ([`Diff`]): random map, write, read,
///   fork, unmap and exit on their own spaces, compared byte for byte with a plain
///   model, seeded (`--seed`);
/// - `--workers` fork/exit workers ([`fork_worker`]): the workers of `stress
///   swapoff`, retrying what the NBD outages and swapoff make fail;
/// - swapoff/swapon of one of three file devices in a loop;
/// - an NBD swap device (qemu-nbd on a Unix socket) whose server is killed and
///   restarted every `--nbd-restart`; its backing file persists, so every page on it
///   must survive. Without qemu-nbd this part is skipped (said so), or the run fails
///   when `USERMM_REQUIRE_SERVERS=1`.
///
/// Then every space is dropped and no slot or frame may be left. Exit codes as
/// `stress swapoff`: 0 clean, 1 mismatch or error, 3 stall.
pub fn main_all(a: StressArgs) -> i32 {
    let seed = a.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        usermm_testkit::mix(t ^ u64::from(std::process::id())) % 1_000_000
    });
    let have_nbd = have("qemu-nbd");
    if !have_nbd && servers_required() {
        eprintln!(
            "usermm stress all: qemu-nbd not found and USERMM_REQUIRE_SERVERS=1: install it with `apt-get install {}`",
            package_of("qemu-nbd")
        );
        return 1;
    }
    let budget = a.budget.unwrap_or(DEFAULT_BUDGET);
    let (dir, vm) = match setup(&a.dir, budget) {
        Ok(x) => x,
        Err(code) => return code,
    };
    // What can be stored at once: each fork worker's parent and child, each
    // differential worker's spaces. Every device can hold it all twice over, so
    // swapoff always has room elsewhere.
    let data = a.workers as u64 * a.pages * 2 * PS
        + a.diff_workers as u64 * DIFF_MAX_SPACES as u64 * (DIFF_MAX_LIVE + (512 << 10));
    let dev_bytes = (2 * data + (4 << 20)).div_ceil(1 << 20) << 20;
    let mut ids = match add_devices(&vm, dir.path(), dev_bytes) {
        Ok(ids) => ids,
        Err(code) => return code,
    };
    let nbd = if have_nbd {
        match start_nbd(&vm, dir.path(), dev_bytes) {
            Ok(n) => Some(Arc::new(n)),
            Err(e) => {
                eprintln!("usermm stress all: NBD device: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    let nbd_line = match &nbd {
        Some(n) => format!(
            "nbd: qemu-nbd on {} ({NBD_OPTS}), {} MiB, killed and restarted every {:?}, down {NBD_DOWN:?} (every {NBD_LONG_EVERY}th time {NBD_LONG_DOWN:?})",
            n.sock.display(),
            dev_bytes >> 20,
            a.nbd_restart
        ),
        None => format!(
            "nbd: skipped (qemu-nbd not found; apt-get install {})",
            package_of("qemu-nbd")
        ),
    };
    println!(
        "stress all: seed {seed} (replay the operation sequences with --seed {seed}), budget {} KiB, for {:?}\n  \
         differential: {} workers, {}..{} MiB per space, up to {DIFF_MAX_SPACES} spaces each\n  \
         fork/exit: {} workers x {} pages\n  \
         swapoff: 3 file devices of {} MiB, one removed and re-added in a loop\n  {nbd_line}",
        budget >> 10,
        a.duration,
        a.diff_workers,
        DIFF_MIN_LIVE >> 20,
        DIFF_MAX_LIVE >> 20,
        a.workers,
        a.pages,
        dev_bytes >> 20,
    );
    let t0 = Instant::now();
    let sh = Arc::new(Shared {
        seed,
        deadline: t0 + a.duration,
        c: Counters::default(),
        error: Mutex::new(None),
    });
    let (stats_vm, stats_nbd) = (vm.clone(), nbd.clone());
    let mut wd = Watchdog::new(Duration::from_secs(a.stall))
        .extra(move || {
            let n = stats_nbd
                .as_ref()
                .map(|n| {
                    format!(
                        "  nbd: {:?}, {} links up\n",
                        n.dev.stats(),
                        n.dev.conns_up()
                    )
                })
                .unwrap_or_default();
            format!("  stats: {:?}\n{n}", stats_vm.stats())
        })
        .on_failure(kill_all);
    for tid in 0..a.diff_workers {
        let (vm, sh) = (vm.clone(), sh.clone());
        wd = wd.thread(format!("differential {tid}"), move |me| {
            let mut d = Diff {
                sh: &sh,
                me,
                vm,
                tid,
                rng: Rng::for_thread(seed, tid as u64),
                spaces: Vec::new(),
                next_id: 0,
                op: 0,
                opname: "start",
            };
            if let Err(s) = d.run() {
                sh.fail(me, s);
            }
        });
    }
    for w in 0..a.workers {
        let (vm, sh, pages) = (vm.clone(), sh.clone(), a.pages);
        wd = wd.thread(format!("fork/exit {w}"), move |me| {
            if let Err(s) = fork_worker(&vm, pages, &sh, me) {
                sh.fail(me, s);
            }
        });
    }
    if let Some(n) = &nbd {
        let (vm, n, sh, every) = (vm.clone(), n.clone(), sh.clone(), a.nbd_restart);
        wd = wd.thread("nbd restarter", move |me| {
            if let Err(s) = nbd_restarter(&vm, &n, every, &sh, me) {
                sh.fail(me, s);
            }
        });
    }
    {
        let (vm, sh, nbd) = (vm.clone(), sh.clone(), nbd.clone());
        let dir = dir.path().to_path_buf();
        wd = wd.thread("swapoff loop", move |me| {
            let mut victim_idx = 0usize;
            let mut next_report = Instant::now() + Duration::from_secs(5);
            while !sh.ending() && !me.should_stop() {
                match cycle_device(&vm, &mut ids, victim_idx, &dir, dev_bytes, me) {
                    Ok(Ok(())) => bump(&sh.c.cycles, 1),
                    Err(e) => {
                        sh.fail(me, Stop::Error(e));
                        break;
                    }
                    // No room for its pages right now (memory and the other
                    // devices full, or page-outs to the NBD device refused while
                    // its server is down): the device stays, intact.
                    Ok(Err(usermm::Error::OutOfMemory)) => bump(&sh.c.refused_oom, 1),
                    Ok(Err(usermm::Error::Device { .. })) => bump(&sh.c.refused_other, 1),
                    Ok(Err(e)) => {
                        sh.fail(me, Stop::Error(format!("swapoff: {e}")));
                        break;
                    }
                }
                me.done();
                victim_idx = (victim_idx + 1) % 3;
                if Instant::now() >= next_report {
                    let s = vm.stats();
                    let c = &sh.c;
                    println!(
                        "  {:>5.1}s: {} differential ops, {} fork rounds, {} swapoff cycles, {} nbd restarts{}; pswpin {} pswpout {} free {}/{}",
                        t0.elapsed().as_secs_f64(),
                        c.diff.iter().map(get).sum::<u64>(),
                        get(&c.fork_rounds),
                        get(&c.cycles),
                        get(&c.nbd_restarts),
                        nbd.as_ref()
                            .map(|n| format!(
                                " ({} reconnects, {} pages on nbd)",
                                n.dev.stats().reconnects,
                                n.used_pages(&vm)
                            ))
                            .unwrap_or_default(),
                        s.pswpin,
                        s.pswpout,
                        s.free_frames,
                        s.total_frames
                    );
                    next_report += Duration::from_secs(5);
                }
            }
        });
    }
    let stalled = match wd.try_run() {
        Ok(()) => None,
        Err(f @ Failure::Stalled { .. }) => Some(f.to_string()),
        Err(f @ Failure::Panicked { .. }) => {
            sh.fail_quiet(f.to_string());
            None
        }
    };
    let elapsed = t0.elapsed();
    // Every space is gone (the threads dropped theirs): every slot and frame must be
    // free. The NBD server stays up until this is checked.
    let leak = if stalled.is_none() {
        wait_no_leak(&vm, Duration::from_secs(10)).err()
    } else {
        None
    };
    let c = &sh.c;
    let s = vm.stats();
    let diff_total: u64 = c.diff.iter().map(get).sum();
    let per_op = DIFF_OPS
        .iter()
        .zip(&c.diff)
        .map(|(n, v)| format!("{n} {}", get(v)))
        .collect::<Vec<_>>()
        .join(", ");
    println!("done in {:.1}s (seed {seed}):", elapsed.as_secs_f64());
    println!(
        "  differential: {diff_total} operations ({per_op}), {} pages verified",
        get(&c.diff_pages)
    );
    println!(
        "  fork/exit: {} fork rounds, {} pages verified",
        get(&c.fork_rounds),
        get(&c.fork_pages)
    );
    println!(
        "  forks: {} ({} differential, {} fork/exit)",
        get(&c.diff[FORK]) + get(&c.fork_rounds),
        get(&c.diff[FORK]),
        get(&c.fork_rounds)
    );
    println!(
        "  swapoff: {} swapoff/swapon cycles ({} refused for lack of room, {} for a device error)",
        get(&c.cycles),
        get(&c.refused_oom),
        get(&c.refused_other)
    );
    match &nbd {
        Some(n) => {
            let ns = n.dev.stats();
            println!(
                "  nbd: {} restarts ({} pages stored on it at the kills), {} reconnects, {} writes refused while down, {} timeouts, {} server errors",
                get(&c.nbd_restarts),
                get(&c.nbd_pages_at_kill),
                ns.reconnects,
                ns.fast_failed_writes,
                ns.timeouts,
                ns.server_errors
            );
        }
        None => println!("  {nbd_line}"),
    }
    println!(
        "  retried: {} device errors, {} out of memory, {} out of swap",
        get(&c.retried_device),
        get(&c.retried_oom),
        get(&c.retried_oos)
    );
    println!(
        "  vm: pswpin {} pswpout {} cow faults {} read errors {} write errors {}",
        s.pswpin, s.pswpout, s.cow_faults, s.read_errors, s.write_errors
    );
    println!(
        "  pages verified: {}",
        get(&c.diff_pages) + get(&c.fork_pages)
    );
    println!("  mismatches: {}", get(&c.mismatches));
    match (&stalled, &leak) {
        (Some(_), _) => println!("  leaks: not checked (stalled threads still hold their spaces)"),
        (None, Some(_)) => println!("  leaks: 1"),
        (None, None) => println!("  leaks: 0"),
    }
    println!("  stalls: {}", u64::from(stalled.is_some()));
    if let Some(f) = stalled {
        eprintln!("STALL (seed {seed}): {f}");
        return 3;
    }
    // The server goes after the leak check.
    if let Some(n) = &nbd {
        n.srv.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
    let error = sh.error.lock().unwrap_or_else(|p| p.into_inner()).take();
    match error.or(leak) {
        Some(e) => {
            eprintln!("FAILED (seed {seed}): {e}");
            1
        }
        None => {
            println!("OK: every page verified, no slot or frame leaked");
            0
        }
    }
}

/// The swap-file directory and the Vm of a stress run; `Err(exit code)` after saying
/// why on stderr.
pub(super) fn setup(
    dir: &Option<std::path::PathBuf>,
    budget: u64,
) -> Result<(tempfile::TempDir, Vm), i32> {
    let dir = match dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .map_err(|e| {
        eprintln!("usermm stress: cannot create a directory for swap files: {e}");
        1
    })?;
    let vm = Vm::new(Config::default().memory_budget(budget as usize)).map_err(|e| {
        eprintln!("usermm stress: {e}");
        2
    })?;
    Ok((dir, vm))
}

/// The three swap files of a stress run, `dev_bytes` each; `Err(exit code)` after
/// saying why on stderr.
fn add_devices(vm: &Vm, dir: &std::path::Path, dev_bytes: u64) -> Result<Vec<usermm::SwapId>, i32> {
    (0..3)
        .map(|i| {
            vm.swapon(SwapSpec::file(dir.join(format!("dev{i}")), dev_bytes))
                .map_err(|e| {
                    eprintln!("usermm stress: swapon: {e}");
                    1
                })
        })
        .collect()
}

/// One cycle of a swapoff loop: takes device `idx` out of service and puts a fresh
/// swap file in its place (`ids[idx]` follows). `Ok(Ok(()))` when both happened,
/// `Ok(Err(e))` when swapoff refused (the device stays in service), `Err(message)`
/// when the new device could not be added.
fn cycle_device(
    vm: &Vm,
    ids: &mut [usermm::SwapId],
    idx: usize,
    dir: &std::path::Path,
    dev_bytes: u64,
    me: &Me,
) -> Result<usermm::Result<()>, String> {
    let victim = ids[idx];
    me.begin(|| format!("swapoff of {victim:?}"));
    if let Err(e) = vm.swapoff(victim) {
        return Ok(Err(e));
    }
    let path = dir.join(format!("dev{idx}"));
    let _ = std::fs::remove_file(&path);
    me.begin(|| format!("swapon of {}", path.display()));
    ids[idx] = vm
        .swapon(SwapSpec::file(&path, dev_bytes))
        .map_err(|e| format!("swapon: {e}"))?;
    Ok(Ok(()))
}
