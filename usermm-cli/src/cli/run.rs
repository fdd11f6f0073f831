//! `usermm run`: a verified random-access workload under a memory budget.
//!
//! Pages are partitioned among the worker threads (page `p` belongs to thread
//! `p % threads`), so each thread keeps an exact model of its pages: a version
//! counter per page. Every page carries a header word (offset 0) equal to
//! `page << 32 | version`, and every other word a stamp `version << 32 | hash(page,
//! word, version)` written by the access that last touched it. A write bumps the
//! version and writes the header and the touched words; a read checks the header
//! exactly and checks that each touched word is a stamp of this page and word with
//! a version between 1 and the current one. The fill writes every word of every
//! page (version 1), and a final pass reads every page whole and checks all of it.
//! The stamps and their checks are the test kit's (`usermm_testkit::pattern`); the
//! worker threads announce their steps on a `usermm_testkit::watchdog::Board`, which
//! says what each one waits on if the run stalls.

use super::util::{self, fmt_bytes, fmt_count, fmt_dur, fmt_num, Progress, Undo};
use clap::Parser;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use usermm::stats::Stats;
use usermm::{AddressSpace, Config, SwapSpec, VAddr, Vm, PAGE_SIZE};
use usermm_testkit::pattern::{
    check_header, check_stamp, check_stamped, fill_stamped, header, stamp, WordMismatch,
    WORDS_PER_PAGE,
};
use usermm_testkit::watchdog::{Board, Me};
use usermm_testkit::workload::{Pattern, Rng, Sampler};

/// Arguments of `usermm run`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Every access is checked: each page carries a header word (page, version) and every \
word a stamp of the write that last touched it; a final pass reads every page back. \
A mismatch prints the page, what was expected, what was read and the seed, and exits 1.

Without --swap, a temporary swap file sized for the working set is created in \
$TMPDIR (or /tmp), or in /var/tmp when that is a tmpfs (RAM), and deleted at exit; \
the summary says where.

Exit codes: 0 all data verified, 1 verification or library error, 2 bad flags, \
130 interrupted.

Examples:
  usermm run
  usermm run --budget 128M --working-set 1G --pattern zipf --threads 2 --duration 30s
  usermm run --swap file:/var/tmp/a.swap?size=2G --accesses 1000000 --seed 42 --json out.json")]
pub struct RunArgs {
    /// RAM budget for page frames (K/M/G suffixes; at least 64K).
    #[arg(long, default_value = "64M", value_name = "SIZE", value_parser = util::parse_budget)]
    pub budget: u64,
    /// Bytes of memory the workload maps and touches (rounded up to whole pages).
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = util::parse_working_set)]
    pub working_set: u64,
    /// Which pages are accessed: uniform, hotcold (90% of accesses to 10% of pages;
    /// hotcold:FRAC:PROB), zipf (theta 0.99; zipf:THETA).
    #[arg(long, default_value = "uniform", value_name = "PATTERN", value_parser = util::parse_pattern)]
    pub pattern: Pattern,
    /// Fraction of accesses that write (0 to 1).
    #[arg(long, default_value = "0.3", value_name = "RATIO", value_parser = util::parse_ratio)]
    pub write_ratio: f64,
    /// Worker threads, sharing one address space (each owns every N-th page).
    #[arg(long, default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// How long to run random accesses after the fill: 10s, 2m, 500ms or plain
    /// seconds [default: 10s, or no limit with --accesses].
    #[arg(long, value_name = "TIME", value_parser = util::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many accesses in total (instead of, or as well as, --duration).
    #[arg(long, value_name = "N")]
    pub accesses: Option<u64>,
    /// A swap device spec, e.g. file:/var/tmp/a.swap?size=1G&prio=0 (repeatable)
    /// [default: a temporary file sized for the working set].
    #[arg(long = "swap", value_name = "SPEC", value_parser = util::parse_swap)]
    pub swap: Vec<SwapSpec>,
    /// Seed of the access generator [default: from the clock; printed for replay].
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// 8-byte words read or written per access (1 to 511), at random offsets.
    #[arg(long, default_value = "1", value_name = "N", value_parser = util::parse_words)]
    pub words: u32,
    /// Also write the summary as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Page-I/O threads of the engine [default: the library's, 16].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub io_threads: Option<u32>,
    /// How long a fault's read of a swap file watches for its completion before it
    /// sleeps (0: at once, as the kernel's swap-in) [default: the library's, 200us].
    #[arg(long, value_name = "TIME", value_parser = util::parse_duration)]
    pub read_poll: Option<Duration>,
    /// How page-I/O threads write a swap file: `pwritev` (the default: one
    /// positioned write per run) or `uring` (through io_uring, naming registered
    /// buffers).
    #[arg(long, default_value = "pwritev", value_parser = ["uring", "pwritev"])]
    pub page_out: String,
    /// Testing the checker: after the fill, overwrite one word of page 0 behind the
    /// model's back; the run must then fail verification (exit 1).
    #[arg(long, hide = true)]
    pub inject_corruption: bool,
}

#[derive(Parser)]
struct Defaults {
    #[command(flatten)]
    a: RunArgs,
}

impl RunArgs {
    /// The defaults, as if `usermm run` was given no flags.
    pub fn default_args() -> RunArgs {
        Defaults::parse_from(["usermm"]).a
    }
}

// ------------------------------------------------------------------ failures

#[derive(Debug, Clone)]
enum Failure {
    Mismatch {
        phase: &'static str,
        page: u64,
        addr: VAddr,
        word: u64,
        expected: String,
        got: u64,
    },
    Library {
        phase: &'static str,
        op: &'static str,
        page: u64,
        addr: VAddr,
        err: String,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Mismatch {
                phase,
                page,
                addr,
                word,
                expected,
                got,
            } => write!(
                f,
                "verification failed during the {phase}: page {page} (address {addr}), word {word} \
                 (byte offset {}): expected {expected}, got {got:#018x}",
                word * 8
            ),
            Failure::Library {
                phase,
                op,
                page,
                addr,
                err,
            } => write!(
                f,
                "library error during the {phase}: {op} of page {page} (address {addr}): {err}"
            ),
        }
    }
}

// ------------------------------------------------------------------ shared state

#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(AtomicU64);

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    accesses: u64,
    reads: u64,
    writes: u64,
    words_checked: u64,
}

struct Ctx<'a> {
    mm: &'a AddressSpace,
    base: VAddr,
    pages: u64,
    threads: u64,
    pattern: Pattern,
    write_ratio: f64,
    words: u64,
    seed: u64,
    stop: AtomicBool,
    /// Per thread: pages filled / accesses done / pages verified in this phase.
    done: Vec<Padded>,
    failure: Mutex<Option<Failure>>,
}

impl Ctx<'_> {
    fn mismatch(&self, phase: &'static str, page: u64, m: WordMismatch) {
        self.fail(Failure::Mismatch {
            phase,
            page,
            addr: self.addr(page) + m.word * 8,
            word: m.word,
            expected: m.expected,
            got: m.got,
        });
    }
    fn fail(&self, f: Failure) {
        let mut g = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(f);
        }
        self.stop.store(true, Ordering::Relaxed);
    }
    fn failed(&self) -> bool {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
    fn done_total(&self) -> u64 {
        self.done.iter().map(|d| d.0.load(Ordering::Relaxed)).sum()
    }
    fn reset_done(&self) {
        for d in &self.done {
            d.0.store(0, Ordering::Relaxed);
        }
    }
    /// Pages owned by thread `t`.
    fn owned(&self, t: u64) -> u64 {
        (self.pages - t).div_ceil(self.threads)
    }
    fn addr(&self, p: u64) -> VAddr {
        self.base + p * PAGE_SIZE as u64
    }
    fn lib(&self, phase: &'static str, op: &'static str, p: u64, addr: VAddr, e: usermm::Error) {
        self.fail(Failure::Library {
            phase,
            op,
            page: p,
            addr,
            err: e.to_string(),
        });
    }
}

// ------------------------------------------------------------------ phases

fn fill_thread(ctx: &Ctx, t: u64, versions: &mut [u32], me: &Me) {
    let mut buf = vec![0u8; PAGE_SIZE];
    for (i, ver) in versions.iter_mut().enumerate() {
        if ctx.stop.load(Ordering::Relaxed) {
            return;
        }
        let p = i as u64 * ctx.threads + t;
        fill_stamped(&mut buf, p, 1);
        let a = ctx.addr(p);
        me.begin(|| format!("fill: write of page {p}"));
        if let Err(e) = ctx.mm.write(a, &buf) {
            ctx.lib("fill", "write", p, a, e);
            return;
        }
        me.done();
        *ver = 1;
        ctx.done[t as usize]
            .0
            .store(i as u64 + 1, Ordering::Relaxed);
    }
}

fn access_thread(ctx: &Ctx, t: u64, versions: &mut [u32], quota: Option<u64>, me: &Me) -> Tally {
    let mut tally = Tally::default();
    let n = versions.len() as u64;
    let sampler = Sampler::new(ctx.pattern, n);
    let mut rng = Rng::for_thread(ctx.seed, t);
    let mut touched = vec![0u64; ctx.words as usize];
    let quota = quota.unwrap_or(u64::MAX);
    let mut b = [0u8; 8];
    while tally.accesses < quota {
        if tally.accesses % 64 == 0 {
            ctx.done[t as usize]
                .0
                .store(tally.accesses, Ordering::Relaxed);
            if ctx.stop.load(Ordering::Relaxed) {
                break;
            }
            // Announced per batch of 64 accesses, so the hot path stays cheap.
            if tally.accesses > 0 {
                me.done();
            }
            let first = tally.accesses;
            me.begin(|| format!("accesses {first}..{}", first + 64));
        }
        let i = sampler.sample(&mut rng);
        let p = i * ctx.threads + t;
        let write = rng.unit() < ctx.write_ratio;
        for w in touched.iter_mut() {
            *w = 1 + rng.below(WORDS_PER_PAGE - 1);
        }
        let a = ctx.addr(p);
        let cur = versions[i as usize];
        if write {
            let v = cur.wrapping_add(1).max(1);
            if let Err(e) = ctx.mm.write(a, &header(p, v).to_le_bytes()) {
                ctx.lib("timed phase", "write", p, a, e);
                break;
            }
            // Header first: from here on the model says version v.
            versions[i as usize] = v;
            for &w in &touched {
                let wa = a + w * 8;
                if let Err(e) = ctx.mm.write(wa, &stamp(p, w, v).to_le_bytes()) {
                    ctx.lib("timed phase", "write", p, wa, e);
                    return tally;
                }
            }
            tally.writes += 1;
        } else {
            if let Err(e) = ctx.mm.read(a, &mut b) {
                ctx.lib("timed phase", "read", p, a, e);
                break;
            }
            if let Err(m) = check_header(p, cur, u64::from_le_bytes(b)) {
                ctx.mismatch("timed phase", p, m);
                break;
            }
            for &w in &touched {
                let wa = a + w * 8;
                if let Err(e) = ctx.mm.read(wa, &mut b) {
                    ctx.lib("timed phase", "read", p, wa, e);
                    return tally;
                }
                if let Err(m) = check_stamp(p, w, cur, u64::from_le_bytes(b)) {
                    ctx.mismatch("timed phase", p, m);
                    return tally;
                }
            }
            tally.reads += 1;
            tally.words_checked += 1 + ctx.words;
        }
        tally.accesses += 1;
    }
    ctx.done[t as usize]
        .0
        .store(tally.accesses, Ordering::Relaxed);
    tally
}

fn verify_thread(ctx: &Ctx, t: u64, versions: &[u32], me: &Me) -> u64 {
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut verified = 0;
    for (i, &cur) in versions.iter().enumerate() {
        if ctx.stop.load(Ordering::Relaxed) {
            break;
        }
        let p = i as u64 * ctx.threads + t;
        let a = ctx.addr(p);
        me.begin(|| format!("final verification: read of page {p}"));
        if let Err(e) = ctx.mm.read(a, &mut buf) {
            ctx.lib("final verification", "read", p, a, e);
            break;
        }
        me.done();
        if let Err(m) = check_stamped(&buf, p, cur) {
            ctx.mismatch("final verification", p, m);
            break;
        }
        verified += 1;
        ctx.done[t as usize].0.store(verified, Ordering::Relaxed);
    }
    verified
}

/// Watches a running phase: updates the progress display, stops the phase at its
/// deadline or on Ctrl-C, and detects a stall (no progress at all for a long time).
struct Watch<'a> {
    ctx: &'a Ctx<'a>,
    /// What each worker of the phase is doing.
    board: &'a Board,
    vm: &'a Vm,
    phase: &'static str,
    deadline: Option<Instant>,
    len: u64,
    by_time: bool,
}

impl Watch<'_> {
    fn run<T>(&self, prog: &mut Progress, handles: &[std::thread::ScopedJoinHandle<'_, T>]) {
        let start = Instant::now();
        let mut last_rate_t = Instant::now();
        let mut last_rate_n = 0u64;
        let mut rate = 0.0;
        let s0 = self.vm.stats();
        let mut warned = false;
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let total = self.ctx.done_total();
            let now = Instant::now();
            if now.duration_since(last_rate_t) >= Duration::from_secs(1) {
                rate = (total - last_rate_n) as f64 / now.duration_since(last_rate_t).as_secs_f64();
                last_rate_t = now;
                last_rate_n = total;
            } else if last_rate_n == 0 {
                // First second: the average so far.
                rate = total as f64 / start.elapsed().as_secs_f64().max(1e-3);
            }
            let s = self.vm.stats();
            let majflt = s.pgmajfault - s0.pgmajfault;
            let unit = if self.phase == "accesses" {
                "acc"
            } else {
                "pages"
            };
            let msg = format!(
                "{} {unit}/s  majflt {}",
                fmt_num(rate),
                fmt_num(majflt as f64)
            );
            let long = format!(
                "{} {unit}/s  majflt {}  swap in/out {}/{}",
                fmt_num(rate),
                fmt_count(majflt),
                fmt_num((s.pswpin - s0.pswpin) as f64),
                fmt_num((s.pswpout - s0.pswpout) as f64)
            );
            let elapsed = start.elapsed();
            let pos = if self.by_time {
                (elapsed.as_millis() as u64).min(self.len)
            } else {
                total.min(self.len)
            };
            prog.update(pos, &msg, || {
                format!(
                    "{:>8}: {:>6.1}s  {} {unit} done  {long}",
                    self.phase,
                    elapsed.as_secs_f64(),
                    fmt_count(total)
                )
            });
            if handles.iter().all(|h| h.is_finished()) {
                break;
            }
            if util::interrupted() || self.ctx.failed() {
                self.ctx.stop.store(true, Ordering::Relaxed);
            }
            if let Some(d) = self.deadline {
                if now >= d {
                    self.ctx.stop.store(true, Ordering::Relaxed);
                }
            }
            match self.board.idle() {
                Some((_, idle)) if idle >= Duration::from_secs(120) => {
                    prog.finish();
                    eprintln!(
                        "usermm run: error: no progress for 120 s in the {}: the library appears \
                         deadlocked (seed {}); stats: {:?}\nthreads:\n{}",
                        self.phase,
                        self.ctx.seed,
                        s,
                        self.board.report()
                    );
                    util::run_all_undo_now();
                    std::process::exit(1);
                }
                Some((_, idle)) if idle >= Duration::from_secs(20) && !warned => {
                    warned = true;
                    prog.println(&format!(
                        "warning: no progress for 20 s in the {} (possible deadlock in the library); \
                         stats: {:?}\nthreads:\n{}",
                        self.phase,
                        s,
                        self.board.report()
                    ));
                }
                Some((_, idle)) if idle < Duration::from_secs(20) => warned = false,
                _ => {}
            }
        }
    }
}

// ------------------------------------------------------------------ report

#[derive(Serialize, Debug, Default)]
struct Counts {
    pgfault: u64,
    pgmajfault: u64,
    pswpin: u64,
    pswpout: u64,
    pgscan: u64,
    pgsteal: u64,
    direct_reclaim: u64,
    write_errors: u64,
    read_errors: u64,
}

impl Counts {
    fn delta(a: &Stats, b: &Stats) -> Counts {
        Counts {
            pgfault: b.pgfault - a.pgfault,
            pgmajfault: b.pgmajfault - a.pgmajfault,
            pswpin: b.pswpin - a.pswpin,
            pswpout: b.pswpout - a.pswpout,
            pgscan: b.pgscan - a.pgscan,
            pgsteal: b.pgsteal - a.pgsteal,
            direct_reclaim: b.direct_reclaim - a.direct_reclaim,
            write_errors: b.write_errors - a.write_errors,
            read_errors: b.read_errors - a.read_errors,
        }
    }
}

#[derive(Serialize, Debug)]
struct Report {
    ok: bool,
    interrupted: bool,
    error: Option<String>,
    seed: u64,
    budget_bytes: u64,
    working_set_bytes: u64,
    pages: u64,
    pattern: String,
    write_ratio: f64,
    threads: u32,
    words_per_access: u32,
    /// How long each fault's read polled for its completion (`--read-poll`), µs.
    read_poll_us: u64,
    swap: Vec<String>,
    fill_s: f64,
    timed_s: f64,
    verify_s: f64,
    accesses: u64,
    accesses_per_s: f64,
    reads: u64,
    writes: u64,
    words_checked: u64,
    pages_verified: u64,
    /// Counters of the timed phase only.
    timed: Counts,
    /// Counters of the whole run (fill, timed phase, verification).
    total: Counts,
    swap_in_mib: f64,
    swap_out_mib: f64,
    peak_rss_bytes: Option<u64>,
    metadata_bytes: u64,
    /// Memory pressure (`Vm::pressure`, PSI-like).
    pressure: PressureReport,
}

/// Memory pressure of a run: the Vm's decaying averages at its end (percent of wall
/// time, as `/proc/pressure/memory`), the stall shares of the timed phase, and the
/// total stall time of the whole run.
#[derive(Serialize, Debug)]
struct PressureReport {
    some_avg10: f64,
    some_avg60: f64,
    some_avg300: f64,
    full_avg10: f64,
    full_avg60: f64,
    full_avg300: f64,
    /// Percent of the timed phase with at least one thread stalled / all stalled.
    timed_some_pct: f64,
    timed_full_pct: f64,
    /// Seconds stalled over the whole run (some / full).
    total_some_s: f64,
    total_full_s: f64,
}

// ------------------------------------------------------------------ main

/// Where the default swap file goes: `tmp` (`$TMPDIR` or /tmp) unless it is a tmpfs,
/// whose pages are RAM outside the budget, else `fallback` (/var/tmp). The reason
/// comes back when the file was moved.
fn swap_dir(tmp: PathBuf, fallback: &Path) -> (PathBuf, Option<String>) {
    if on_tmpfs(&tmp) {
        let why = format!("{} is a tmpfs (RAM)", tmp.display());
        (fallback.to_path_buf(), Some(why))
    } else {
        (tmp, None)
    }
}

pub(crate) fn on_tmpfs(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we pass; the path is a valid C string.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type == libc::TMPFS_MAGIC
    }
}

/// Runs the command; returns the exit code.
pub fn main(a: RunArgs) -> i32 {
    util::install_ctrlc();
    match run(a) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("usermm run: error: {msg}");
            1
        }
    }
}

fn run(a: RunArgs) -> Result<i32, String> {
    let seed = a.seed.unwrap_or_else(util::time_seed);
    let pages = a.working_set.div_ceil(PAGE_SIZE as u64);
    let threads = u64::from(a.threads);
    if pages < threads {
        eprintln!(
            "usermm run: error: a working set of {pages} pages cannot be shared by {threads} threads \
             (each thread needs at least one page)"
        );
        return Ok(2);
    }
    if pages > u64::from(u32::MAX) {
        eprintln!("usermm run: error: the working set is above 16 TiB");
        return Ok(2);
    }
    let ws_bytes = pages * PAGE_SIZE as u64;
    let duration = match (a.duration, a.accesses) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };

    eprintln!(
        "usermm run: budget {}, working set {} ({} pages, {:.2}x the budget), {}, write ratio {}, \
         {} thread{}, {} word{}/access, {}",
        fmt_bytes(a.budget),
        fmt_bytes(ws_bytes),
        fmt_count(pages),
        ws_bytes as f64 / a.budget as f64,
        a.pattern.name(),
        a.write_ratio,
        a.threads,
        if a.threads == 1 { "" } else { "s" },
        a.words,
        if a.words == 1 { "" } else { "s" },
        match (duration, a.accesses) {
            (Some(d), Some(n)) => format!("{} or {} accesses", fmt_dur(d), fmt_count(n)),
            (Some(d), None) => fmt_dur(d),
            (None, Some(n)) => format!("{} accesses", fmt_count(n)),
            (None, None) => unreachable!(),
        }
    );
    eprintln!("seed {seed} (replay with --seed {seed})");

    let mut cfg = Config::default().memory_budget(a.budget as usize);
    if let Some(n) = a.io_threads {
        cfg = cfg.io_threads(n as usize);
    }
    if let Some(d) = a.read_poll {
        cfg = cfg.read_poll(d);
    }
    cfg = cfg.uring_writes(a.page_out == "uring");
    let vm = Vm::new(cfg).map_err(|e| format!("cannot start the Vm: {e}"))?;

    // Swap: the given devices, or a temporary file sized for the working set.
    let mut temp: Option<(tempfile::TempPath, util::Registered, Option<String>)> = None;
    let specs = if a.swap.is_empty() {
        let (dir, why) = swap_dir(std::env::temp_dir(), Path::new("/var/tmp"));
        if let Some(why) = &why {
            eprintln!("usermm run: swap file in {}: {why}", dir.display());
        }
        if on_tmpfs(&dir) {
            eprintln!(
                "warning: {} is a tmpfs: the swap file lives in RAM. Set TMPDIR to a disk \
                 directory or give --swap file:PATH?size=SIZE.",
                dir.display()
            );
        }
        let size =
            (ws_bytes + ws_bytes / 4 + (16 << 20)).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
        let f = tempfile::Builder::new()
            .prefix("usermm-run-")
            .suffix(".swap")
            .tempfile_in(&dir)
            .map_err(|e| format!("cannot create a swap file in {}: {e}", dir.display()))?;
        let path = f.into_temp_path();
        let reg = util::register(Undo::RemoveFile(path.to_path_buf()));
        let spec = SwapSpec::file(path.to_path_buf(), size);
        temp = Some((path, reg, why));
        vec![spec]
    } else {
        a.swap.clone()
    };
    for s in &specs {
        vm.swapon(s.clone())
            .map_err(|e| format!("swapon {}: {e}", s.text))?;
    }
    for s in vm.swaps() {
        eprintln!(
            "swap: {} ({}, prio {}){}",
            s.name,
            fmt_bytes(s.size),
            s.prio,
            if temp.is_some() {
                " — temporary, deleted at exit"
            } else {
                ""
            }
        );
    }
    let result = workload(&a, &vm, seed, pages, duration);
    drop(vm);
    if let Some((path, reg, why)) = temp {
        if result.is_ok() {
            // The last line of the summary: where the default swap file was.
            println!(
                "  swap file   {} (temporary, deleted{})",
                path.display(),
                why.map(|w| format!("; {w}")).unwrap_or_default()
            );
        }
        reg.forget();
        if let Err(e) = path.close() {
            eprintln!("warning: cannot delete the temporary swap file: {e}");
        }
    }
    result
}

fn workload(
    a: &RunArgs,
    vm: &Vm,
    seed: u64,
    pages: u64,
    duration: Option<Duration>,
) -> Result<i32, String> {
    let threads = u64::from(a.threads);
    let ws_bytes = pages * PAGE_SIZE as u64;
    let mm = vm.new_space();
    let region = mm
        .map_anon(ws_bytes as usize)
        .map_err(|e| format!("map_anon of {}: {e}", fmt_bytes(ws_bytes)))?;
    let ctx = Ctx {
        mm: &mm,
        base: region.start(),
        pages,
        threads,
        pattern: a.pattern,
        write_ratio: a.write_ratio,
        words: u64::from(a.words),
        seed,
        stop: AtomicBool::new(false),
        done: (0..threads).map(|_| Padded::default()).collect(),
        failure: Mutex::new(None),
    };
    let mut versions: Vec<Vec<u32>> = (0..threads)
        .map(|t| vec![0; ctx.owned(t) as usize])
        .collect();
    let s_start = vm.stats();
    let p_start = vm.pressure();
    let t_start = Instant::now();

    // 1. Fill: every page written once, whole.
    let mut prog = Progress::new(pages, "fill");
    let names = || (0..threads).map(|t| format!("thread {t}"));
    let board = Board::new(names());
    std::thread::scope(|s| {
        let hs: Vec<_> = versions
            .iter_mut()
            .enumerate()
            .map(|(t, v)| {
                let ctx = &ctx;
                let board = &board;
                s.spawn(move || fill_thread(ctx, t as u64, v, &board.enter(t)))
            })
            .collect();
        Watch {
            ctx: &ctx,
            board: &board,
            vm,
            phase: "fill",
            deadline: None,
            len: pages,
            by_time: false,
        }
        .run(&mut prog, &hs);
    });
    let fill_time = t_start.elapsed();
    if a.inject_corruption && !ctx.failed() {
        let a0 = ctx.addr(0) + 5 * 8;
        if let Err(e) = mm.write(a0, &0xdead_beef_u64.to_le_bytes()) {
            ctx.lib("fill", "write", 0, a0, e);
        }
        prog.println("injected: page 0 word 5 overwritten with 0xdeadbeef behind the model's back");
    }
    let s_fill = vm.stats();
    let p_fill = vm.pressure();
    if !ctx.failed() && !util::interrupted() {
        prog.println(&format!(
            "fill: {} pages in {} ({} pages/s), pswpout {}",
            fmt_count(pages),
            fmt_dur(fill_time),
            fmt_num(pages as f64 / fill_time.as_secs_f64().max(1e-9)),
            fmt_count(s_fill.pswpout - s_start.pswpout)
        ));
    }

    // 2. Timed random accesses.
    let mut tally = Tally::default();
    let t_timed = Instant::now();
    if !ctx.failed() && !util::interrupted() {
        ctx.reset_done();
        let (len, by_time) = match (duration, a.accesses) {
            (Some(d), _) => (d.as_millis() as u64, true),
            (None, Some(n)) => (n, false),
            (None, None) => unreachable!(),
        };
        prog.reset(len, "accesses", by_time);
        let board = Board::new(names());
        let quota = |t: u64| a.accesses.map(|n| n / threads + u64::from(t < n % threads));
        let tallies: Vec<Tally> = std::thread::scope(|s| {
            let hs: Vec<_> = versions
                .iter_mut()
                .enumerate()
                .map(|(t, v)| {
                    let ctx = &ctx;
                    let q = quota(t as u64);
                    let board = &board;
                    s.spawn(move || access_thread(ctx, t as u64, v, q, &board.enter(t)))
                })
                .collect();
            Watch {
                ctx: &ctx,
                board: &board,
                vm,
                phase: "accesses",
                deadline: duration.map(|d| t_timed + d),
                len,
                by_time,
            }
            .run(&mut prog, &hs);
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        for t in tallies {
            tally.accesses += t.accesses;
            tally.reads += t.reads;
            tally.writes += t.writes;
            tally.words_checked += t.words_checked;
        }
    }
    let timed_time = t_timed.elapsed();
    let s_timed = vm.stats();
    let p_timed = vm.pressure();

    // 3. Final verification: every page read whole and checked.
    let mut pages_verified = 0;
    let t_verify = Instant::now();
    let mut verify_time = Duration::ZERO;
    if !ctx.failed() && !util::interrupted() {
        ctx.reset_done();
        ctx.stop.store(false, Ordering::Relaxed);
        prog.reset(pages, "verify", false);
        let board = Board::new(names());
        let counts: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = versions
                .iter()
                .enumerate()
                .map(|(t, v)| {
                    let ctx = &ctx;
                    let board = &board;
                    s.spawn(move || verify_thread(ctx, t as u64, v, &board.enter(t)))
                })
                .collect();
            Watch {
                ctx: &ctx,
                board: &board,
                vm,
                phase: "verify",
                deadline: None,
                len: pages,
                by_time: false,
            }
            .run(&mut prog, &hs);
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        pages_verified = counts.iter().sum();
        verify_time = t_verify.elapsed();
    }
    prog.finish();
    let s_end = vm.stats();
    let p_end = vm.pressure();
    let failure = ctx
        .failure
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let interrupted = util::interrupted();

    // Summary.
    let timed = Counts::delta(&s_fill, &s_timed);
    let total = Counts::delta(&s_start, &s_end);
    let secs = timed_time.as_secs_f64().max(1e-9);
    let mib = |pages: u64| (pages * PAGE_SIZE as u64) as f64 / f64::from(1u32 << 20);
    let rss = util::peak_rss();
    let meta = s_end.metadata_bytes;
    let budget = vm.memory_budget() as u64;
    let out = |s: String| println!("{s}");
    out(String::new());
    out(format!(
        "usermm run {}: fill {}, accesses {}, verify {}",
        match (&failure, interrupted) {
            (Some(_), _) => "FAILED",
            (None, true) => "interrupted",
            (None, false) => "passed",
        },
        fmt_dur(fill_time),
        fmt_dur(timed_time),
        fmt_dur(verify_time)
    ));
    out(format!(
        "  accesses    {} in {} = {}/s  ({} reads, {} writes, {} word{} each)",
        fmt_count(tally.accesses),
        fmt_dur(timed_time),
        fmt_num(tally.accesses as f64 / secs),
        fmt_count(tally.reads),
        fmt_count(tally.writes),
        a.words,
        if a.words == 1 { "" } else { "s" }
    ));
    out(format!(
        "  faults      pgfault {}  pgmajfault {}  ({} major/s; whole run {} / {})",
        fmt_count(timed.pgfault),
        fmt_count(timed.pgmajfault),
        fmt_num(timed.pgmajfault as f64 / secs),
        fmt_count(total.pgfault),
        fmt_count(total.pgmajfault)
    ));
    out(format!(
        "  swap I/O    pswpin {} ({:.1} MiB)  pswpout {} ({:.1} MiB)  (whole run {:.1} / {:.1} MiB)",
        fmt_count(timed.pswpin),
        mib(timed.pswpin),
        fmt_count(timed.pswpout),
        mib(timed.pswpout),
        mib(total.pswpin),
        mib(total.pswpout)
    ));
    out(format!(
        "  reclaim     pgscan {}  pgsteal {}  direct reclaim {}",
        fmt_count(total.pgscan),
        fmt_count(total.pgsteal),
        fmt_count(total.direct_reclaim)
    ));
    let share = |d: Duration| 100.0 * d.as_secs_f64() / secs;
    let pressure = PressureReport {
        some_avg10: p_end.some.avg10,
        some_avg60: p_end.some.avg60,
        some_avg300: p_end.some.avg300,
        full_avg10: p_end.full.avg10,
        full_avg60: p_end.full.avg60,
        full_avg300: p_end.full.avg300,
        timed_some_pct: share(p_timed.total_some.saturating_sub(p_fill.total_some)),
        timed_full_pct: share(p_timed.total_full.saturating_sub(p_fill.total_full)),
        total_some_s: p_end
            .total_some
            .saturating_sub(p_start.total_some)
            .as_secs_f64(),
        total_full_s: p_end
            .total_full
            .saturating_sub(p_start.total_full)
            .as_secs_f64(),
    };
    out(format!(
        "  pressure    stalled some {:.1}%  full {:.1}% of the accesses' time  (avg10 {:.1}% / {:.1}%; whole run {} / {})",
        pressure.timed_some_pct,
        pressure.timed_full_pct,
        pressure.some_avg10,
        pressure.full_avg10,
        fmt_dur(Duration::from_secs_f64(pressure.total_some_s)),
        fmt_dur(Duration::from_secs_f64(pressure.total_full_s))
    ));
    out(format!(
        "  verified    {} words in {} reads; {} of {} pages in the final pass",
        fmt_count(tally.words_checked),
        fmt_count(tally.reads),
        fmt_count(pages_verified),
        fmt_count(pages)
    ));
    out(format!(
        "  errors      {}  (engine: {} page-out write errors, {} swap-in read errors)",
        match &failure {
            None => "none".to_string(),
            Some(_) => "1 (see below)".to_string(),
        },
        total.write_errors,
        total.read_errors
    ));
    match rss {
        Some(r) => out(format!(
            "  memory      peak RSS {} (VmHWM) vs budget {} + metadata {} = {} ({} {})",
            fmt_bytes(r),
            fmt_bytes(budget),
            fmt_bytes(meta),
            fmt_bytes(budget + meta),
            if r > budget + meta { "+" } else { "-" },
            fmt_bytes(r.abs_diff(budget + meta))
        )),
        None => out("  memory      peak RSS unavailable (/proc/self/status)".into()),
    }
    out(format!("  seed        {seed}"));
    if let Some(f) = &failure {
        eprintln!("usermm run: {f}");
        eprintln!("usermm run: seed {seed} (replay with --seed {seed} and the same flags)");
    }

    if let Some(path) = &a.json {
        let rep = Report {
            ok: failure.is_none() && !interrupted,
            interrupted,
            error: failure.as_ref().map(|f| f.to_string()),
            seed,
            budget_bytes: budget,
            working_set_bytes: ws_bytes,
            pages,
            pattern: a.pattern.name(),
            write_ratio: a.write_ratio,
            threads: a.threads,
            words_per_access: a.words,
            read_poll_us: a
                .read_poll
                .unwrap_or(usermm::config::DEFAULT_READ_POLL)
                .as_micros() as u64,
            swap: vm.swaps().into_iter().map(|s| s.name).collect(),
            fill_s: fill_time.as_secs_f64(),
            timed_s: timed_time.as_secs_f64(),
            verify_s: verify_time.as_secs_f64(),
            accesses: tally.accesses,
            accesses_per_s: tally.accesses as f64 / secs,
            reads: tally.reads,
            writes: tally.writes,
            words_checked: tally.words_checked,
            pages_verified,
            swap_in_mib: mib(timed.pswpin),
            swap_out_mib: mib(timed.pswpout),
            timed,
            total,
            peak_rss_bytes: rss,
            metadata_bytes: meta,
            pressure,
        };
        let text = serde_json::to_string_pretty(&rep).expect("serializable");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("usermm run: error: cannot write {}: {e}", path.display());
            return Ok(1);
        }
    }
    drop(mm);
    Ok(match (&failure, interrupted) {
        (Some(_), _) => 1,
        (None, true) => 130,
        (None, false) => 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default swap file is not put on a tmpfs: /dev/shm (a tmpfs on Linux) sends
    /// it to the fallback, a disk directory keeps it.
    #[test]
    fn default_swap_file_avoids_tmpfs() {
        let shm = PathBuf::from("/dev/shm");
        if !on_tmpfs(&shm) {
            eprintln!("SKIP default_swap_file_avoids_tmpfs: /dev/shm is not a tmpfs");
            return;
        }
        let (dir, why) = swap_dir(shm, Path::new("/var/tmp"));
        assert_eq!(dir, Path::new("/var/tmp"));
        assert!(why.is_some_and(|w| w.contains("/dev/shm") && w.contains("tmpfs")));
        let disk = std::env::current_dir().unwrap();
        if !on_tmpfs(&disk) {
            assert_eq!(swap_dir(disk.clone(), Path::new("/var/tmp")), (disk, None));
        }
    }

    #[test]
    fn defaults() {
        let a = RunArgs::default_args();
        assert_eq!(a.budget, 64 << 20);
        assert_eq!(a.working_set, 256 << 20);
        assert_eq!(a.threads, 2);
        assert_eq!(a.words, 1);
        assert!((a.write_ratio - 0.3).abs() < 1e-12);
        assert!(a.duration.is_none() && a.accesses.is_none() && a.swap.is_empty());
    }
}
