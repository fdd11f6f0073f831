//! `usermm bench`: usermm side by side with plain memory, the device's own limit and
//! the kernel's swap in a memory cgroup, on the same workloads from one seeded
//! generator (see `access`), interleaved cell by cell.
//!
//! Per cell (pattern × W/B × threads × write ratio) the systems are: the device
//! (random 4 KiB O_DIRECT reads at queue depth = threads, polled as faults poll),
//! plain memory (a `Vec` that holds the working set), usermm (a fresh `Vm` with
//! the budget, on a swap file), transparent (a child process doing the accesses
//! through pointers into a `map_transparent` region of a fresh `Vm` with the
//! budget, on a swap file of its own; see `transparent`) and the kernel (a child process in a memory cgroup
//! limited to the budget, with a swap file of the same size).
//!
//! **Cells to be trusted** (issue 10, item 5). On a shared 2-CPU machine one timed
//! window per system moved per-cell ratios by up to ±30 % between runs. So:
//! - *Repeats, alternating.* Each system is timed `--repeats` times (3 by default);
//!   repeat `r` runs every system once, in an order that rotates with `r` and with
//!   the cell, so a burst of load from elsewhere hits one repeat of each system
//!   rather than all of one. The tables and the JSON give per system the median
//!   of its repeats (accesses/s, and each other figure's own median; p50/p99 over
//!   all repeats' samples), and per cell the median of the per-repeat ratios
//!   usermm/kernel and transparent/kernel (repeat `r` of both ran in the same round)
//!   with their min–max.
//! - *State kept, warm-up in accesses.* Each compared system is filled and warmed up
//!   once per cell and then kept alive across the repeats: the usermm `Vm` in this
//!   process, the transparent and kernel children as `bench_child::Session`s that
//!   run one timed phase per request, the plain buffer. The access sequence
//!   continues from repeat to repeat (`driver::Stream`), so the replacement
//!   policy's state carries over and the content check at the end replays one
//!   sequence. The first warm-up is counted in accesses, not time, so that each
//!   policy is settled when the timed rounds start (`warm_per_page`: 16 accesses
//!   per page on zipf, where usermm's frequency policy learns from the faults of
//!   pages out of memory, two on hot/cold, one on uniform and the scans), capped
//!   by `--warmup` (15 s with `--quick`) for a slow machine. A
//!   re-warm of a fifth of the timed window (50–500 ms) before each repeat
//!   restarts the threads on the kept state, so no timed window starts cold.
//! - *Sized for ten minutes.* `--quick` (16 cells, 3 rounds of 1.5 s, plus the two
//!   scan cells below) took about seven minutes here (413–432 s) before the scan
//!   cells. Two back-to-back runs agreed on um/kern
//!   within ±10 % in 6 and 9 of 16 cells (two pairs; 7 rounds of 0.6 s, the same
//!   time, gave 3 of 16): a round's ratio moves by ±15–20 % and whole runs drift,
//!   so ±10 % in every cell is not reached on this shared machine (README,
//!   "Results"). The NBD column (usermm on qemu-nbd, measured once per cell after
//!   the rounds) is left out of `--quick` unless `--nbd`. `--compare A.json
//!   B.json` prints two runs' ratios cell by cell and how many agree within ±10 %.
//!
//! **Scan cells** (readahead's, issue 10 item 3): with the default patterns, ratios
//! and threads, two more cells run at W/B = 4, one thread, reads only: a sequential
//! scan (`seq`) and a stride-16 one (`seq-stride16`, `Pattern::Seq`), each thread
//! scanning from a random page and wrapping around.
//!
//! The two pointer columns check a sample of pages against the access sequence after
//! their last repeat (`verify`).
//!
//! `--compressed` runs the compressed-tier comparison instead (`bench_comp`):
//! usermm on a zpool against kernel zram and zswap, on pages of a given
//! compressibility (`--content`, `driver::Content`; the matrix above keeps the
//! incompressible default unless told otherwise).

use super::bench_child::{self, Setup};
use super::device::{Op, ProbeFile, ProbeResult};
use super::kernel::KernelSwap;
use super::transparent;
use super::util::{self, fmt_bytes, fmt_dur, fmt_num, Progress, Undo};
use super::verify::{self, Verified};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::driver::{
    self as access, Content, Measured, RawTarget, Snap, Stream, UsermmTarget, WorkSpec,
};
use usermm_testkit::workload::Pattern;

/// Arguments of `usermm bench`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Systems, measured in the same run and interleaved per cell:
  usermm  the library through its API (read/write of 8-byte words), swap file in --dir
  usermm-nbd  the same, its swap on a qemu-nbd server (Unix socket) the bench starts and stops
  transparent  a child process running the identical access sequence through plain pointers
          into a Vm::map_transparent region (userfaultfd), same budget, swap file in --dir;
          \"unavailable: <reason>\" where userfaultfd cannot be used (/dev/userfaultfd)
  kernel  a child process running the identical access sequence on anonymous memory in a
          memory cgroup limited to the budget, with its own swap file (same size, same file
          system) enabled by swapon; needs root. Always cleaned up (swapoff, cgroup, file).
  plain   the same accesses on a Vec<u8> that holds the working set (the ceiling)
  device  random 4 KiB O_DIRECT reads on a file in --dir at queue depth = threads, polled
          for as usermm's faults poll for theirs (the miss-path ceiling); a separate table
          shows reads and writes at depth 1, threads, 32

With --compressed, only the compressed tiers, on compressible and incompressible pages:
  usermm-zpool  a child with a Vm of the budget, zpool:?size=B/2&algo=lz4&prio=10 above a
          swap file (--zpool-size); peak = its peak RSS, pool = the zpool's frames
  kernel-zram   the kernel child in a memory cgroup of the budget swapping to /dev/zram0
          (sized like the file, lz4 or lzo-rle); pool = zram mem_used_max
  kernel-zswap  the same, swapping to a swap file with zswap enabled; pool = pool_total_size
  An OOM kill of a kernel child is counted (oom_kills) and never retried; without root or
  with zram/zswap missing a column says SKIP: reason. zram, zswap's parameters and debugfs
  are put back as they were.

Ratios: um/kern, tr/kern and um/plain compare accesses/s (tr = transparent); um/dev
compares usermm's major faults/s with the device's random reads/s at equal queue depth.
After the timed phase, the transparent and kernel children check 256 pages against the
access sequence; a wrong word is the column's error and the exit status is 1.

Examples:
  usermm bench --quick --json out.json --plot out.svg
  usermm bench --budget 256M --patterns uniform,zipf --threads 1,2 --duration 5s
  usermm bench --compressed --quick --json out.json")]
pub struct BenchArgs {
    /// RAM budget B for usermm and the kernel's cgroup [default: 64M with --quick, else 128M].
    #[arg(long, value_name = "SIZE", value_parser = util::parse_budget)]
    budget: Option<u64>,
    /// A small matrix that runs in under ten minutes: budget 64M, W/B 1.25 and 4,
    /// all patterns, write ratio 0 and 0.5, 1 thread (2 threads for the first
    /// pattern), 3 rounds of 1.5 s timed per cell and system, no NBD column.
    #[arg(long)]
    quick: bool,
    /// Timed phases (rounds) per cell and system, the systems alternating within
    /// each round; the tables show medians [default: 5; --quick: 3].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    repeats: Option<u32>,
    /// The scale check: the same cells at budget 64M and 2G (W/B 4: a working
    /// set of 256 MiB, then 8 GiB), uniform and zipf, read-only, 2 threads, usermm
    /// and the kernel (no transparent or NBD column), then each system's major
    /// faults/s and accesses/s at both sizes side by side: the cost of a fault
    /// must not grow with the size. Needs about 32 GiB free in --dir and 12 GiB
    /// of RAM; takes about 15 minutes. `--json F` writes F-64M.json and F-2G.json.
    #[arg(long, conflicts_with_all = ["quick", "compressed", "compare", "budget", "w_over_b", "threads", "write_ratios"])]
    scale: bool,
    /// The two budgets of `--scale` (for a quick check of the mode itself).
    #[arg(long, hide = true, num_args = 2, value_parser = util::parse_budget, requires = "scale")]
    scale_budgets: Vec<u64>,
    /// Compare two JSON files of `usermm bench --json` cell by cell (um/kern and
    /// tr/kern) and exit; nothing is measured.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    compare: Vec<PathBuf>,
    /// Write one record per cell and system as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw accesses/s against W/B, one panel per pattern, as SVG to FILE.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Directory for the swap and probe files (all systems use the same file
    /// system) [default: the temporary directory].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seed of the access generator [default: from the clock; printed].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// 8-byte words touched per access (1 to 511), at random offsets in the page.
    #[arg(long, default_value = "1", value_name = "N", value_parser = util::parse_words)]
    words: u32,
    /// Thread counts, comma separated [default: 1,2; --quick: 1, and 2 for the first pattern].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: Vec<u32>,
    /// Patterns, comma separated [default: uniform,hotcold,zipf].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = util::parse_pattern)]
    patterns: Vec<Pattern>,
    /// Working set over budget ratios, comma separated [default: 1.25,2,4; --quick: 1.25,4].
    #[arg(long = "w-over-b", value_name = "LIST", value_delimiter = ',', value_parser = parse_wb)]
    w_over_b: Vec<f64>,
    /// Write ratios, comma separated [default: 0,0.5].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = util::parse_ratio)]
    write_ratios: Vec<f64>,
    /// Timed phase per cell, system and round [default: 3s; --quick: 1.5s].
    #[arg(long, value_name = "TIME", value_parser = util::parse_duration)]
    duration: Option<Duration>,
    /// Longest untimed warm-up after the fill, per cell and system (once: the
    /// systems are kept alive across the repeats); it ends earlier after 16 accesses
    /// per page of the working set on zipf, two on hot/cold, one on uniform and scans
    /// [default: 30s; --quick: 15s].
    #[arg(long, value_name = "TIME", value_parser = util::parse_duration)]
    warmup: Option<Duration>,
    /// Skip the usermm-over-NBD column (usermm swapping to a qemu-nbd server on a
    /// Unix socket, which the bench starts and stops; measured once per cell).
    #[arg(long)]
    no_nbd: bool,
    /// Run the NBD column with --quick too (it is left out there).
    #[arg(long, conflicts_with = "no_nbd")]
    nbd: bool,
    /// Skip the kernel-swap column.
    #[arg(long)]
    no_kernel: bool,
    /// Skip the transparent column (the accesses through pointers into a
    /// `map_transparent` region).
    #[arg(long)]
    no_transparent: bool,
    /// Only the compressed-tier comparison: usermm on a zpool (half the budget, lz4)
    /// above a swap file against kernel zram and kernel zswap in a memory cgroup of
    /// the budget (root), on compressible and incompressible pages. With --quick:
    /// budget 64M, W/B 4, uniform and hotcold, write ratio 0 and 0.5, 1 thread.
    #[arg(long)]
    compressed: bool,
    /// Page contents, comma separated: compressible (1 word in 4 random, the rest
    /// zero) or incompressible (every word random) [default: incompressible;
    /// --compressed: both]. The regular matrix takes one.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = Content::parse)]
    content: Vec<Content>,
    /// The size of usermm's zpool in --compressed (at most the budget) [default:
    /// half the budget].
    #[arg(long, value_name = "SIZE", value_parser = util::parse_size)]
    zpool_size: Option<u64>,
    /// Page-I/O threads of usermm's engine [default: the library's, 16].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    io_threads: Option<u32>,
    /// usermm's replacement policy: `frequency` (the default: probation pages enter
    /// main by their use count), `s3fifo` or `clock` (plain second chance), to
    /// compare.
    #[arg(long, default_value = "frequency", value_parser = ["frequency", "s3fifo", "clock"])]
    policy: String,
    /// How usermm's page-I/O threads write the swap file: `pwritev` (the default:
    /// one positioned write per run) or `uring` (through io_uring, naming
    /// registered buffers), to compare.
    #[arg(long, default_value = "pwritev", value_parser = ["uring", "pwritev"])]
    page_out: String,
}

fn parse_wb(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.01..=1000.0).contains(&v) {
        return Err(format!("W/B of {s} is out of range (0.01 to 1000)"));
    }
    Ok(v)
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    pattern: Pattern,
    w_over_b: f64,
    threads: u32,
    write_ratio: f64,
}

#[derive(Debug)]
struct CellOut {
    cell: Cell,
    /// The cell's workload (for the replacement bounds: one access per page of
    /// warm-up).
    spec: WorkSpec,
    usermm: Result<Agg, String>,
    kernel: Result<Agg, String>,
    /// Set when the kernel OOM-killed its child once and it was started again.
    kernel_note: Option<String>,
    plain: Result<Agg, String>,
    /// The repeat with the median rate.
    device: Result<ProbeResult, String>,
    /// Every repeat's random reads/s, in run order.
    device_iops: Vec<f64>,
    /// usermm with its swap on a qemu-nbd server instead of the file (once).
    nbd: Result<Measured, String>,
    /// The accesses through pointers into a transparent region.
    transparent: Result<Agg, String>,
    /// The content checks of the two pointer columns (when they ran).
    transparent_verified: Option<Verified>,
    kernel_verified: Option<Verified>,
}

/// The repeats of one system in one cell.
#[derive(Debug, Clone)]
struct Agg {
    /// Every repeat's timed phase, in run order.
    reps: Vec<Measured>,
    /// The median of each per-repeat figure (accesses, seconds, faults, I/O,
    /// stall), with the latency histogram of all repeats merged.
    med: Measured,
    /// Accesses/s: the median repeat's and the extremes.
    rate: Spread,
    /// The fill and the first warm-up (systems kept alive across the repeats).
    setup: Option<Setup>,
}

impl Agg {
    fn majflt_per_s(&self) -> f64 {
        self.med.major_faults as f64 / self.med.secs.max(1e-9)
    }
    fn miss_pct(&self) -> f64 {
        100.0 * self.med.major_faults as f64 / self.med.accesses.max(1) as f64
    }
}

/// The median and the extremes (min–max) of a few values.
#[derive(Debug, Clone, Copy, Default)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

impl Spread {
    /// Of `v` (NaN-free): with an even count the median is the mean of the middle two.
    fn of(v: &[f64]) -> Spread {
        if v.is_empty() {
            return Spread::default();
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Spread {
            median,
            min: s[0],
            max: s[n - 1],
            n,
        }
    }
}

/// The repeats of a system as one `Agg` (`Err` if none ran).
fn aggregate(reps: Vec<Measured>, setup: Option<Setup>) -> Result<Agg, String> {
    if reps.is_empty() {
        return Err(if util::interrupted() {
            "interrupted".into()
        } else {
            "no repeat ran".into()
        });
    }
    let med_u = |f: fn(&Measured) -> u64| {
        Spread::of(&reps.iter().map(|m| f(m) as f64).collect::<Vec<_>>())
            .median
            .round() as u64
    };
    let mut med = Measured {
        accesses: med_u(|m| m.accesses),
        secs: Spread::of(&reps.iter().map(|m| m.secs).collect::<Vec<_>>()).median,
        fill_secs: setup.map(|s| s.fill_secs).unwrap_or(0.0),
        major_faults: med_u(|m| m.major_faults),
        device_reads: med_u(|m| m.device_reads),
        device_writes: med_u(|m| m.device_writes),
        warm_accesses: setup
            .map(|s| s.warm_accesses)
            .unwrap_or_else(|| med_u(|m| m.warm_accesses)),
        stall_some_us: med_u(|m| m.stall_some_us),
        stall_full_us: med_u(|m| m.stall_full_us),
        ..Default::default()
    };
    for m in &reps {
        med.hist.merge(&m.hist);
    }
    Ok(Agg {
        rate: Spread::of(&reps.iter().map(Measured::rate).collect::<Vec<_>>()),
        reps,
        med,
        setup,
    })
}

/// `a`'s accesses/s over `b`'s, repeat by repeat (repeat `r` of both ran side by
/// side in the same round).
fn per_repeat_ratios(a: &Agg, b: &Agg) -> Vec<f64> {
    a.reps
        .iter()
        .zip(&b.reps)
        .map(|(x, y)| x.rate() / y.rate().max(1e-9))
        .collect()
}

/// Records a round of a system kept alive: its measurement, or its error (the
/// system then sits out the remaining repeats; its state is dropped).
#[allow(clippy::too_many_arguments)]
fn round_done<S>(
    state: &mut Result<S, String>,
    reps: &mut Vec<Measured>,
    m: Result<Measured, String>,
    prog: &mut Progress,
    tick: &mut impl FnMut(&mut Progress, String),
    what: &str,
    system: &str,
) {
    match m {
        Ok(m) => {
            tick(prog, format!("{what} {system}: {}/s", fmt_num(m.rate())));
            reps.push(m);
        }
        Err(e) => {
            tick(prog, format!("{what} {system}: failed: {e}"));
            *state = Err(e);
        }
    }
}

fn show_setup(r: &Result<Option<Setup>, &String>) -> String {
    match r {
        Ok(Some(s)) => format!(
            "filled in {:.1} s, warmed up with {} accesses in {:.1} s",
            s.fill_secs,
            fmt_num(s.warm_accesses as f64),
            s.warm_secs
        ),
        Ok(None) => "set up".into(),
        Err(e) => format!("failed: {e}"),
    }
}

/// `--quick`'s rounds per cell and system, and each round's timed window.
const QUICK_REPEATS: u32 = 3;
const QUICK_TIMED_MS: u64 = 1500;

/// How often a cell starts the kernel's child again after an OOM kill during its
/// rounds (each time: the fill and the warm-up again).
const KERNEL_RESTARTS: u32 = 3;

/// The systems of a round, by the numbers of the matrix loop (0 device, 1 plain,
/// 2 usermm, 3 transparent, 4 kernel). usermm and the kernel, whose ratio is the
/// bench's headline, always run back to back with transparent on the other side
/// of the kernel, their order flipping from round to round (so neither always
/// follows the other's write-back); the two cheap references run first or last.
fn round_order(r: usize) -> [usize; 5] {
    let three = if r.is_multiple_of(2) {
        [2, 4, 3]
    } else {
        [3, 4, 2]
    };
    if (r / 2).is_multiple_of(2) {
        [0, 1, three[0], three[1], three[2]]
    } else {
        [three[0], three[1], three[2], 1, 0]
    }
}

/// Accesses per page of the working set in the first warm-up, so that the timed
/// rounds see each policy settled (the state the A0 column assumes): usermm's
/// frequency policy learns zipf's many levels of popularity from the faults of
/// pages out of memory, some 16–20 accesses per page (`reclaim`, "Policy"); on
/// hot/cold two accesses per page settle every policy (CLOCK is at A0 there);
/// on uniform and scans every policy misses alike, so one pass (every frame turned
/// over) is enough.
fn warm_per_page(p: &Pattern) -> u64 {
    match p {
        Pattern::Uniform | Pattern::Seq { .. } => 1,
        Pattern::Zipf { .. } => 16,
        _ => 2,
    }
}

/// usermm kept alive across a cell's repeats: a fresh Vm, filled and warmed up
/// (`spec.warm_accesses` accesses, at most `warmup`).
fn usermm_setup(
    budget: u64,
    io_threads: Option<u32>,
    swap: SwapSpec,
    spec: &WorkSpec,
    warmup: Duration,
) -> Result<(Vm, UsermmTarget, Stream, Setup), String> {
    let (vm, target) = usermm_vm(budget, io_threads, swap, spec)?;
    let f0 = Instant::now();
    access::fill(&target, spec)?;
    let fill_secs = f0.elapsed().as_secs_f64();
    let mut st = Stream::new(spec);
    let w0 = Instant::now();
    let w = access::measure_stream(&target, spec, &mut st, warmup, Duration::ZERO, &|| {
        bench_child::vm_snap(&vm)
    })?;
    let setup = Setup {
        fill_secs,
        warm_accesses: w.warm_accesses,
        warm_secs: w0.elapsed().as_secs_f64(),
    };
    Ok((vm, target, st, setup))
}

/// The kernel's session, started once more if the kernel OOM-killed the first
/// (memcg reclaim sometimes gives up while swap writes are in flight); `note` says so.
fn kernel_session(
    k: &KernelSwap,
    spec: &WorkSpec,
    warmup: Duration,
    note: &mut Option<String>,
) -> Result<(bench_child::Session, Setup), String> {
    let before = k.oom_kills();
    match k.start_session(spec, warmup) {
        Err(e) if k.oom_kills() > before && !util::interrupted() => {
            *note = Some(format!(
                "the kernel OOM-killed the child in its memory cgroup during the fill or warm-up                  ({e}) although swap had room; it was started again"
            ));
            let again = k.oom_kills();
            k.start_session(spec, warmup).map_err(|e2| {
                if k.oom_kills() > again {
                    format!(
                        "OOM-killed by the kernel twice in its memory cgroup (limit = budget,                          swap free): {e2}"
                    )
                } else {
                    e2
                }
            })
        }
        r => r,
    }
}

#[derive(Serialize, Debug)]
pub(super) struct Record {
    pub(super) system: &'static str,
    pub(super) pattern: String,
    pub(super) w_over_b: f64,
    pub(super) threads: u32,
    pub(super) write_ratio: f64,
    pub(super) accesses_per_s: Option<f64>,
    pub(super) major_faults: Option<u64>,
    pub(super) p50_us: Option<f64>,
    pub(super) p99_us: Option<f64>,
    pub(super) device_reads: Option<u64>,
    pub(super) device_writes: Option<u64>,
    /// Accesses (or device operations) in the timed phase, and its length.
    pub(super) accesses: Option<u64>,
    pub(super) seconds: Option<f64>,
    /// Accesses of the untimed warm-up.
    pub(super) warmup_accesses: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) queue_depth: Option<u32>,
    /// Percent of the timed phase with at least one thread stalled on memory / all
    /// of them stalled (usermm's `Vm::pressure`; usermm systems only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) stall_some_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) stall_full_pct: Option<f64>,
    /// Words of the sampled pages checked after the timed phase (pointer columns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) verified_words: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) note: Option<String>,
    /// Page contents of the cell (`Content::name`).
    pub(super) content: &'static str,
    /// OOM kills of the run (kernel systems of `--compressed`; not retried).
    pub(super) oom_kills: Option<u64>,
    /// Peak memory of the run: a child's peak RSS (usermm-zpool) or the memory
    /// cgroup's peak charge (kernel-zram, kernel-zswap).
    pub(super) peak_bytes: Option<u64>,
    /// The compressed pool at its largest (zpool frames, zram `mem_used_max`, zswap
    /// `pool_total_size`).
    pub(super) pool_bytes: Option<u64>,
    /// Timed phases behind the record (`--repeats`; the NBD column runs once). The
    /// measured fields above are the medians of the per-repeat values; p50/p99 are
    /// over all repeats' samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) repeats: Option<u32>,
    /// The slowest and the fastest repeat's accesses/s, and every repeat's in run
    /// order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) accesses_per_s_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) accesses_per_s_max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) accesses_per_s_repeats: Option<Vec<f64>>,
    /// usermm and transparent: the median over the repeats of this system's
    /// accesses/s over the kernel's in the same repeat; its min and max; the spread
    /// (max − min, the `meta.spread` rule); and each repeat's ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) ratio_vs_kernel: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) ratio_vs_kernel_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) ratio_vs_kernel_max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) ratio_spread: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) ratio_vs_kernel_repeats: Option<Vec<f64>>,
    /// Seconds of the fill and of the first warm-up (systems kept alive across the
    /// repeats: once per cell).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) fill_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) warmup_seconds: Option<f64>,
}

impl Record {
    /// A record with the cell's fields and nothing measured.
    pub(super) fn empty(
        system: &'static str,
        pattern: String,
        w_over_b: f64,
        threads: u32,
        write_ratio: f64,
        content: Content,
    ) -> Record {
        Record {
            system,
            pattern,
            w_over_b,
            threads,
            write_ratio,
            accesses_per_s: None,
            major_faults: None,
            p50_us: None,
            p99_us: None,
            device_reads: None,
            device_writes: None,
            accesses: None,
            seconds: None,
            warmup_accesses: None,
            queue_depth: None,
            stall_some_pct: None,
            stall_full_pct: None,
            verified_words: None,
            error: None,
            note: None,
            content: content.name(),
            oom_kills: None,
            peak_bytes: None,
            pool_bytes: None,
            repeats: None,
            accesses_per_s_min: None,
            accesses_per_s_max: None,
            accesses_per_s_repeats: None,
            ratio_vs_kernel: None,
            ratio_vs_kernel_min: None,
            ratio_vs_kernel_max: None,
            ratio_spread: None,
            ratio_vs_kernel_repeats: None,
            fill_seconds: None,
            warmup_seconds: None,
        }
    }
}

#[derive(Serialize, Debug)]
pub(super) struct ProbeRecord {
    op: &'static str,
    queue_depth: u32,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Serialize, Debug)]
pub(super) struct HitPath {
    pub(super) working_set_bytes: u64,
    pub(super) usermm_accesses_per_s: Option<f64>,
    pub(super) plain_accesses_per_s: Option<f64>,
    /// The median of the rounds' ratios usermm / plain (`hit_path`).
    pub(super) ratio: Option<f64>,
    pub(super) ratio_min: Option<f64>,
    pub(super) ratio_max: Option<f64>,
    /// Every round's ratio, in order.
    pub(super) ratio_rounds: Vec<f64>,
    pub(super) usermm_p50_us: Option<f64>,
    pub(super) plain_p50_us: Option<f64>,
    pub(super) error: Option<String>,
}

#[derive(Serialize, Debug)]
pub(super) struct Meta {
    pub(super) command: String,
    pub(super) date_unix: u64,
    pub(super) seed: u64,
    pub(super) budget_bytes: u64,
    pub(super) words_per_access: u32,
    pub(super) warmup_s: f64,
    pub(super) warmup_rule: String,
    pub(super) timed_s: f64,
    pub(super) plain_timed_s: f64,
    pub(super) dir: String,
    pub(super) kernel: String,
    pub(super) transparent: String,
    pub(super) device_buffered: bool,
    pub(super) machine: String,
    /// usermm's zpool spec (`--compressed` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) zpool: Option<String>,
    /// Repeats per cell and system, the re-warm before each, and what `ratio_spread`
    /// measures (the regular matrix only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) repeats: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) rewarm_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) spread: Option<String>,
}

#[derive(Serialize, Debug)]
pub(super) struct JsonOut {
    pub(super) meta: Meta,
    pub(super) records: Vec<Record>,
    pub(super) device_probe: Vec<ProbeRecord>,
    pub(super) hit_path: HitPath,
}

/// The device probe a cell is compared with: a sequential scan with the device's
/// sequential reads (in pages/s), everything else with its random reads.
fn dev_op(p: &Pattern) -> Op {
    match p {
        Pattern::Seq { stride: 1 } => Op::SeqRead,
        _ => Op::Read,
    }
}

/// A cell as the progress lines and notes name it.
fn cell_name(c: &Cell) -> String {
    format!(
        "{} W/B={} thr={} wr={}",
        pattern_label(&c.pattern),
        c.w_over_b,
        c.threads,
        c.write_ratio
    )
}

pub(super) fn pattern_label(p: &Pattern) -> String {
    match p {
        Pattern::Uniform => "uniform".into(),
        Pattern::HotCold { hot_frac, hot_prob } => {
            if *hot_frac == 0.1 && *hot_prob == 0.9 {
                "hotcold".into()
            } else {
                format!("hotcold:{hot_frac}:{hot_prob}")
            }
        }
        Pattern::Zipf { theta } => format!("zipf{theta}"),
        Pattern::Seq { .. } => p.name(),
    }
}

fn fmt_ratio(r: f64) -> String {
    if r >= 0.1 {
        format!("{r:.2}")
    } else if r >= 0.0001 {
        format!("{r:.4}")
    } else {
        format!("{r:.1e}")
    }
}

pub(super) fn fmt_us(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// One usermm measurement: a fresh Vm with the budget, on the swap file.
fn run_usermm(
    budget: u64,
    io_threads: Option<u32>,
    swap: SwapSpec,
    spec: &WorkSpec,
    warmup: Duration,
    timed: Duration,
) -> Result<Measured, String> {
    let (vm, target) = usermm_vm(budget, io_threads, swap, spec)?;
    let snap = || bench_child::vm_snap(&vm);
    let m = access::drive(&target, spec, warmup, timed, &snap)?;
    let s = vm.stats();
    if s.write_errors + s.read_errors > 0 {
        return Err(format!(
            "engine reported {} write and {} read errors",
            s.write_errors, s.read_errors
        ));
    }
    Ok(m)
}

/// A fresh `Vm` with the budget and one swap file, and the workload's region in a
/// new space.
///
/// The policy comes from `--policy` (set once by `main`, before any cell runs).
fn usermm_vm(
    budget: u64,
    io_threads: Option<u32>,
    swap: SwapSpec,
    spec: &WorkSpec,
) -> Result<(Vm, UsermmTarget), String> {
    let mut cfg = Config::default().memory_budget(budget as usize).policy(
        match POLICY.load(std::sync::atomic::Ordering::Relaxed) {
            1 => usermm::Policy::S3Fifo,
            2 => usermm::Policy::Clock,
            _ => usermm::Policy::Frequency,
        },
    );
    if let Some(n) = io_threads {
        cfg = cfg.io_threads(n as usize);
    }
    cfg = cfg.uring_writes(URING_WRITES.load(std::sync::atomic::Ordering::Relaxed));
    let vm = Vm::new(cfg).map_err(|e| format!("Vm::new: {e}"))?;
    vm.swapon(swap).map_err(|e| format!("swapon: {e}"))?;
    let mm = vm.new_space();
    let r = mm
        .map_anon((spec.pages * PAGE_SIZE as u64) as usize)
        .map_err(|e| format!("map_anon: {e}"))?;
    Ok((
        vm,
        UsermmTarget {
            mm,
            base: r.start(),
        },
    ))
}

/// Rounds of the hit path (`hit_path`): each times usermm and plain memory back to
/// back, so the ratio of a round is taken over the same moment of the machine.
const HIT_ROUNDS: usize = 9;

/// The hit path: usermm and plain memory, both filled once with a working set that
/// fits in the budget, then measured alternately in `HIT_ROUNDS` rounds of
/// `timed / 3` each (at least 100 ms), the order flipping from round to round.
/// Returns the median round of each and every round's ratio usermm / plain: on
/// this shared VM the whole machine's speed moved by 2× within a run (plain
/// memory at 10.5M and 20.4M reads/s), and a ratio of two medians taken at
/// different moments moved with it (0.33–0.80 with the same code); the median of
/// per-round ratios is what the bench reports.
fn hit_path(
    budget: u64,
    io_threads: Option<u32>,
    swap: &Path,
    swap_size: u64,
    plain_buf: &mut [u64],
    spec: &WorkSpec,
    timed: Duration,
) -> Result<(Measured, Measured, Vec<f64>), String> {
    let (vm, um) = usermm_vm(budget, io_threads, SwapSpec::file(swap, swap_size), spec)?;
    let len = (spec.pages * PAGE_SIZE as u64) as usize;
    assert!(len <= plain_buf.len() * 8);
    // SAFETY: `plain_buf` is ours, 8-byte aligned, and borrowed mutably for this call.
    let plain = unsafe { RawTarget::new(plain_buf.as_mut_ptr().cast(), len) };
    access::fill(&um, spec)?;
    access::fill(&plain, spec)?;
    let snap = || bench_child::vm_snap(&vm);
    let round = (timed / 3).max(Duration::from_millis(100));
    let warm = Duration::from_millis(50);
    let (mut us, mut ps, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..HIT_ROUNDS {
        let (u, p) = if r % 2 == 0 {
            let u = access::measure(&um, spec, warm, round, &snap)?;
            (
                u,
                access::measure(&plain, spec, warm, round, &Snap::default)?,
            )
        } else {
            let p = access::measure(&plain, spec, warm, round, &Snap::default)?;
            (access::measure(&um, spec, warm, round, &snap)?, p)
        };
        ratios.push(u.rate() / p.rate().max(1e-9));
        us.push(u);
        ps.push(p);
    }
    let median = |mut v: Vec<Measured>| {
        v.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        v.swap_remove(v.len() / 2)
    };
    Ok((median(us), median(ps), ratios))
}

pub(super) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `--policy`: 0 frequency, 1 s3fifo, 2 clock (read by `usermm_vm`).
static POLICY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
/// `--page-out uring` (read by `usermm_vm`).
static URING_WRITES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What `main` leaves to its caller: an exit code, or the compressed-tier
/// comparison to run (`bench_comp`, which uses this module, so this one does not
/// call it: the CLI's dispatch does).
pub enum Outcome {
    Exit(i32),
    Compressed(Box<CompPlan>),
}

/// The compressed-tier comparison's parameters (from `usermm bench --compressed`).
#[derive(Debug)]
pub struct CompPlan {
    pub budget: u64,
    pub seed: u64,
    pub timed: Duration,
    pub warmup: Duration,
    pub patterns: Vec<Pattern>,
    pub wbs: Vec<f64>,
    pub wrs: Vec<f64>,
    pub contents: Vec<Content>,
    pub threads: Vec<u32>,
    pub words: u32,
    pub dir: PathBuf,
    pub io_threads: Option<u32>,
    pub json: Option<PathBuf>,
    pub no_kernel: bool,
    /// Bytes of usermm's zpool (`--zpool-size`, half the budget by default).
    pub zpool_size: u64,
}

/// Runs the command; returns what the caller does next (an exit code, or the
/// compressed-tier comparison).
pub fn main(a: BenchArgs) -> Outcome {
    util::install_ctrlc();
    let policy = match a.policy.as_str() {
        "s3fifo" => 1,
        "clock" => 2,
        _ => 0,
    };
    POLICY.store(policy, std::sync::atomic::Ordering::Relaxed);
    URING_WRITES.store(a.page_out == "uring", std::sync::atomic::Ordering::Relaxed);
    if a.scale {
        return Outcome::Exit(scale(a).unwrap_or_else(|e| {
            eprintln!("usermm bench: error: {e}");
            1
        }));
    }
    let mut comp = None;
    match bench(a, &mut comp) {
        Ok(code) => match comp {
            Some(p) => Outcome::Compressed(Box::new(p)),
            None => Outcome::Exit(code),
        },
        Err(e) => {
            eprintln!("usermm bench: error: {e}");
            Outcome::Exit(1)
        }
    }
}

fn bench(a: BenchArgs, comp: &mut Option<CompPlan>) -> Result<i32, String> {
    if !a.compare.is_empty() {
        return compare(&a.compare[0], &a.compare[1]);
    }
    if let Some(p) = &a.plot {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !ext.eq_ignore_ascii_case("svg") {
            eprintln!("usermm bench: error: --plot writes SVG; give a FILE ending in .svg");
            return Ok(2);
        }
    }
    let quick = a.quick;
    let budget = a.budget.unwrap_or(if quick { 64 << 20 } else { 128 << 20 });
    let budget = budget / PAGE_SIZE as u64 * PAGE_SIZE as u64;
    let seed = a.seed.unwrap_or_else(util::time_seed);
    // --quick: 3 rounds of 1.5 s. 7 rounds of 0.6 s (the same time) agreed worse
    // between two runs here (README, "Results"): a short window is more at the
    // mercy of the transient after the re-warm and of a single burst of load.
    let timed = a
        .duration
        .unwrap_or(Duration::from_millis(if quick && !a.compressed {
            QUICK_TIMED_MS
        } else if quick {
            1500
        } else {
            3000
        }));
    let repeats = a.repeats.unwrap_or(if quick { QUICK_REPEATS } else { 5 });
    // The first warm-up's cap (its length is in accesses, see `warm_per_page`); the
    // `--compressed` comparison keeps its single, shorter warm-up.
    let warmup = a
        .warmup
        .unwrap_or(Duration::from_millis(match (quick, a.compressed) {
            (true, false) => 15_000,
            (false, false) => 30_000,
            (true, true) => 1500,
            (false, true) => 5000,
        }));
    // Before each repeat's timed phase: the threads restarted on a kept state.
    let rewarm = timed
        .mul_f64(0.2)
        .clamp(Duration::from_millis(50), Duration::from_millis(500));
    let plain_rewarm = Duration::from_millis(50);
    // Plain memory does millions of accesses in a fraction of a second.
    let plain_timed = if quick {
        timed.min(Duration::from_millis(300))
    } else {
        timed
    };
    let cell_probe = if quick {
        Duration::from_millis(250)
    } else {
        timed.min(Duration::from_secs(1))
    };
    let patterns = if a.patterns.is_empty() {
        vec![
            Pattern::Uniform,
            Pattern::HotCold {
                hot_frac: 0.1,
                hot_prob: 0.9,
            },
            Pattern::Zipf { theta: 0.99 },
        ]
    } else {
        a.patterns.clone()
    };
    let wbs = if a.w_over_b.is_empty() {
        if quick {
            vec![1.25, 4.0]
        } else {
            vec![1.25, 2.0, 4.0]
        }
    } else {
        a.w_over_b.clone()
    };
    let wrs = if a.write_ratios.is_empty() {
        vec![0.0, 0.5]
    } else {
        a.write_ratios.clone()
    };
    if a.compressed {
        let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir);
        if !dir.is_dir() {
            eprintln!(
                "usermm bench: error: --dir {} is not a directory",
                dir.display()
            );
            return Ok(2);
        }
        if a.plot.is_some() {
            eprintln!("usermm bench: note: --plot is not drawn for --compressed");
        }
        let or = |v: &Vec<_>, d| if v.is_empty() { d } else { v.clone() };
        *comp = Some(CompPlan {
            budget,
            seed,
            timed,
            warmup,
            patterns: or(
                &a.patterns,
                vec![
                    Pattern::Uniform,
                    Pattern::HotCold {
                        hot_frac: 0.1,
                        hot_prob: 0.9,
                    },
                ],
            ),
            wbs: if a.w_over_b.is_empty() {
                vec![4.0]
            } else {
                a.w_over_b.clone()
            },
            wrs,
            contents: if a.content.is_empty() {
                vec![Content::Compressible, Content::Incompressible]
            } else {
                a.content.clone()
            },
            threads: if a.threads.is_empty() {
                vec![1]
            } else {
                a.threads.clone()
            },
            words: a.words,
            dir,
            io_threads: a.io_threads,
            json: a.json.clone(),
            no_kernel: a.no_kernel,
            zpool_size: a.zpool_size.unwrap_or(budget / 2).min(budget),
        });
        return Ok(0);
    }
    if a.content.len() > 1 {
        eprintln!(
            "usermm bench: error: the regular matrix takes one --content (--compressed takes a list)"
        );
        return Ok(2);
    }
    let content = a.content.first().copied().unwrap_or_default();
    let mut cells = Vec::new();
    for (pi, &pattern) in patterns.iter().enumerate() {
        let threads: Vec<u32> = if !a.threads.is_empty() {
            a.threads.clone()
        } else if quick && pi > 0 {
            vec![1]
        } else {
            vec![1, 2]
        };
        for &t in &threads {
            for &wr in &wrs {
                for &wb in &wbs {
                    cells.push(Cell {
                        pattern,
                        w_over_b: wb,
                        threads: t,
                        write_ratio: wr,
                    });
                }
            }
        }
    }
    // The scan cells (readahead's): a sequential and a stride-16 scan at W/B = 4,
    // one thread, reads only, when the patterns and ratios are the defaults.
    if a.patterns.is_empty() && wbs.contains(&4.0) && a.threads.is_empty() && wrs.contains(&0.0) {
        for stride in [1, 16] {
            cells.push(Cell {
                pattern: Pattern::Seq { stride },
                w_over_b: 4.0,
                threads: 1,
                write_ratio: 0.0,
            });
        }
    }
    let pages_of = |wb: f64| ((budget as f64 * wb) as u64 / PAGE_SIZE as u64).max(1);
    let max_pages = wbs.iter().map(|&w| pages_of(w)).max().unwrap_or(1);
    let max_ws = max_pages * PAGE_SIZE as u64;
    let swap_size =
        (max_ws + max_ws / 4 + (16 << 20)).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
    let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    if !dir.is_dir() {
        eprintln!(
            "usermm bench: error: --dir {} is not a directory",
            dir.display()
        );
        return Ok(2);
    }
    let mut depths: Vec<u32> = vec![1, 32];
    depths.extend(cells.iter().map(|c| c.threads));
    depths.sort_unstable();
    depths.dedup();

    eprintln!(
        "usermm bench: budget {}, W/B {:?}, {} cells x 5 systems x {repeats} repeats, warm-up once \
         (up to {}), then per repeat {} re-warm + {} timed, {} word{}/access, seed {seed}",
        fmt_bytes(budget),
        wbs,
        cells.len(),
        fmt_dur(warmup),
        fmt_dur(rewarm),
        fmt_dur(timed),
        a.words,
        if a.words == 1 { "" } else { "s" }
    );
    eprintln!(
        "files in {} (swap files {} each)",
        dir.display(),
        fmt_bytes(swap_size)
    );

    for l in stale_leftovers() {
        eprintln!("warning: left over by an earlier run (not touched): {l}");
    }

    // Set-up: usermm's swap file, the probe file, the kernel's cgroup and swap.
    let um_swap = tempfile::Builder::new()
        .prefix("usermm-bench-")
        .suffix(".swap")
        .tempfile_in(&dir)
        .map_err(|e| format!("cannot create a swap file in {}: {e}", dir.display()))?
        .into_temp_path();
    let um_swap_undo = util::register(Undo::RemoveFile(um_swap.to_path_buf()));
    // The transparent child's own: it runs while the usermm Vm holds the other (a
    // swap file has one user at a time).
    let tr_swap = tempfile::Builder::new()
        .prefix("usermm-bench-tr-")
        .suffix(".swap")
        .tempfile_in(&dir)
        .map_err(|e| format!("cannot create a swap file in {}: {e}", dir.display()))?
        .into_temp_path();
    let tr_swap_undo = util::register(Undo::RemoveFile(tr_swap.to_path_buf()));
    let probe = ProbeFile::create(&dir, swap_size)?;
    let nbd_server = if a.no_nbd {
        Err("skipped (--no-nbd)".to_string())
    } else if quick && !a.nbd {
        Err("skipped (--quick; --nbd runs it)".to_string())
    } else {
        super::nbdserver::NbdServer::start(&dir, swap_size)
    };
    if let Err(e) = &nbd_server {
        eprintln!("usermm bench: NBD column: {e}");
    }
    let device_buffered = probe.buffered;
    if probe.buffered {
        eprintln!(
            "warning: {} refuses O_DIRECT: the device probe uses the page cache",
            dir.display()
        );
    }
    let mut kernel = if a.no_kernel {
        Err("skipped (--no-kernel)".to_string())
    } else {
        KernelSwap::setup(&dir, swap_size, budget)
    };
    let kernel_status = match &kernel {
        Ok(k) => {
            eprintln!("kernel: {}", k.describe());
            if !k.others.is_empty() {
                eprintln!(
                    "note: other swap areas are active ({}); ours has the highest priority",
                    k.others.join(", ")
                );
            }
            format!("ok: {}", k.describe())
        }
        Err(e) => {
            eprintln!("kernel column missing: {e}");
            format!("missing: {e}")
        }
    };
    // Asked once, so a machine without userfaultfd says why once, not per cell.
    let transparent_avail = if a.no_transparent {
        Err("skipped (--no-transparent)".to_string())
    } else {
        transparent::available().map_err(|e| format!("unavailable: {e}"))
    };
    let transparent_status = match &transparent_avail {
        Ok(()) => "ok".to_string(),
        Err(e) => {
            eprintln!("transparent column missing: {e}");
            e.clone()
        }
    };
    let mut plain_buf = vec![0u64; (max_ws / 8) as usize];

    let steps = (depths.len() * 2 + 2 + cells.len() * (3 + 5 * repeats as usize)) as u64;
    let mut prog = Progress::new(steps, "bench");
    let mut step = 0u64;
    let t_all = Instant::now();
    let mut tick = |prog: &mut Progress, what: String| {
        step += 1;
        prog.set(step, &what);
        if !util::stderr_is_tty() {
            eprintln!("[{step}/{steps}] {what}");
        }
    };

    // Device table.
    let probe_dur = if quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(1)
    };
    let mut probes = Vec::new();
    for op in [Op::Read, Op::Write, Op::SeqRead] {
        for &d in &depths {
            if util::interrupted() || (op == Op::SeqRead && d != 1) {
                break;
            }
            let r = probe.probe(op, d, probe_dur, seed)?;
            tick(
                &mut prog,
                format!("device {} qd {d}: {}/s", op.name(), fmt_num(r.iops())),
            );
            probes.push((op, d, r));
        }
    }

    // Hit path: a working set that fits, random 8-byte reads, 1 thread.
    let hit_pages = (budget / 2 / PAGE_SIZE as u64).max(1);
    let hit_spec = WorkSpec {
        pages: hit_pages,
        pattern: Pattern::Uniform,
        write_ratio: 0.0,
        threads: 1,
        words: 1,
        seed,
        warm_accesses: hit_pages,
        content,
    };
    let hit = if util::interrupted() {
        Err("interrupted".to_string())
    } else {
        hit_path(
            budget,
            a.io_threads,
            &um_swap,
            swap_size,
            &mut plain_buf,
            &hit_spec,
            timed,
        )
    };
    let (hit_um, hit_plain, hit_ratios) = match hit {
        Ok((u, p, r)) => (Ok(u), Ok(p), r),
        Err(e) => (Err(e.clone()), Err(e), Vec::new()),
    };
    if let Ok(m) = &hit_um {
        if m.major_faults > 0 {
            prog.println(&format!(
                "note: the hit-path run took {} major faults (pages were reclaimed although they fit)",
                m.major_faults
            ));
        }
    }
    tick(
        &mut prog,
        format!(
            "hit path usermm: {}",
            hit_um
                .as_ref()
                .map(|m| fmt_num(m.rate()) + "/s")
                .unwrap_or_else(|e| e.clone())
        ),
    );
    tick(
        &mut prog,
        format!(
            "hit path plain: {}",
            hit_plain
                .as_ref()
                .map(|m| fmt_num(m.rate()) + "/s")
                .unwrap_or_else(|e| e.clone())
        ),
    );

    // The matrix.
    let mut outs: Vec<CellOut> = Vec::new();
    for c in &cells {
        if util::interrupted() {
            break;
        }
        let pages = pages_of(c.w_over_b);
        let spec = WorkSpec {
            pages,
            pattern: c.pattern,
            write_ratio: c.write_ratio,
            threads: c.threads,
            words: a.words,
            seed,
            // The replacement bounds' warm-up (one access per page); the systems'
            // own is `warm_spec`'s.
            warm_accesses: pages,
            content,
        };
        let warm_spec = WorkSpec {
            warm_accesses: warm_per_page(&c.pattern) * pages,
            ..spec
        };
        // A re-warm is time only: the state was kept, the threads need restarting.
        let rewarm_spec = WorkSpec {
            warm_accesses: u64::MAX,
            ..spec
        };
        let name = cell_name(c);
        let ci = outs.len();

        // Set-up: each compared system filled and warmed up once, in an order that
        // rotates from cell to cell; each is then kept alive (the usermm Vm, the two
        // children, the plain buffer) across the repeats.
        let mut um: Result<(Vm, UsermmTarget, Stream), String> = Err("not run".into());
        let mut um_setup = None;
        let mut tr: Result<bench_child::Session, String> = Err("not run".into());
        let mut tr_setup = None;
        let mut kn: Result<bench_child::Session, String> = Err("not run".into());
        let mut kn_setup = None;
        let mut note: Option<String> = None;
        for k in 0..3 {
            if util::interrupted() {
                break;
            }
            match (k + ci) % 3 {
                0 => {
                    um = usermm_setup(
                        budget,
                        a.io_threads,
                        SwapSpec::file(&um_swap, swap_size),
                        &warm_spec,
                        warmup,
                    )
                    .map(|(vm, t, st, setup)| {
                        um_setup = Some(setup);
                        (vm, t, st)
                    });
                    tick(
                        &mut prog,
                        format!(
                            "{name} usermm: {}",
                            show_setup(&um.as_ref().map(|_| um_setup))
                        ),
                    );
                }
                1 => {
                    tr = match &transparent_avail {
                        Ok(()) => transparent::start_session(
                            budget,
                            a.io_threads,
                            &tr_swap,
                            swap_size,
                            &warm_spec,
                            warmup,
                        )
                        .map(|(s, setup)| {
                            tr_setup = Some(setup);
                            s
                        }),
                        Err(e) => Err(e.clone()),
                    };
                    tick(
                        &mut prog,
                        format!(
                            "{name} transparent: {}",
                            show_setup(&tr.as_ref().map(|_| tr_setup))
                        ),
                    );
                }
                _ => {
                    kn = match &kernel {
                        Ok(k) => {
                            kernel_session(k, &warm_spec, warmup, &mut note).map(|(s, setup)| {
                                kn_setup = Some(setup);
                                s
                            })
                        }
                        Err(e) => Err(e.clone()),
                    };
                    tick(
                        &mut prog,
                        format!(
                            "{name} kernel: {}",
                            show_setup(&kn.as_ref().map(|_| kn_setup))
                        ),
                    );
                }
            }
        }
        let plain_len = (pages * PAGE_SIZE as u64) as usize;
        assert!(plain_len <= plain_buf.len() * 8);
        // SAFETY: `plain_buf` is ours, 8-byte aligned, at least `plain_len` bytes
        // (checked), and not touched otherwise while the target is used (this cell).
        let plain_t = unsafe { RawTarget::new(plain_buf.as_mut_ptr().cast(), plain_len) };
        let mut pl: Result<Stream, String> = access::fill(&plain_t, &spec).and_then(|()| {
            let mut st = Stream::new(&spec);
            access::measure_stream(
                &plain_t,
                &warm_spec,
                &mut st,
                warmup,
                Duration::ZERO,
                &Snap::default,
            )
            .map(|_| st)
        });

        // The repeats: every system once per repeat, in an order that rotates from
        // repeat to repeat (and cell to cell), so none always runs right after
        // another's write-back.
        let mut um_reps = Vec::new();
        let mut tr_reps = Vec::new();
        let mut kn_reps = Vec::new();
        let mut pl_reps = Vec::new();
        let mut dev_reps: Vec<ProbeResult> = Vec::new();
        let mut dev_err: Option<String> = None;
        let mut kn_restarts = 0u32;
        for r in 0..repeats {
            for sys in round_order(r as usize + ci) {
                if util::interrupted() {
                    break;
                }
                let rn = format!("{name} #{}", r + 1);
                match sys {
                    0 => {
                        if dev_err.is_some() {
                            continue;
                        }
                        match probe.probe(
                            dev_op(&c.pattern),
                            c.threads,
                            cell_probe,
                            seed ^ pages ^ r as u64,
                        ) {
                            Ok(d) => {
                                tick(&mut prog, format!("{rn} device: {}/s", fmt_num(d.iops())));
                                dev_reps.push(d);
                            }
                            Err(e) => {
                                tick(&mut prog, format!("{rn} device: failed: {e}"));
                                dev_err = Some(e);
                            }
                        }
                    }
                    1 => {
                        let Ok(st) = &mut pl else { continue };
                        let m = access::measure_stream(
                            &plain_t,
                            &rewarm_spec,
                            st,
                            plain_rewarm,
                            plain_timed,
                            &Snap::default,
                        );
                        round_done(&mut pl, &mut pl_reps, m, &mut prog, &mut tick, &rn, "plain");
                    }
                    2 => {
                        let Ok((vm, t, st)) = &mut um else { continue };
                        let m =
                            access::measure_stream(&*t, &rewarm_spec, st, rewarm, timed, &|| {
                                bench_child::vm_snap(vm)
                            });
                        round_done(
                            &mut um,
                            &mut um_reps,
                            m,
                            &mut prog,
                            &mut tick,
                            &rn,
                            "usermm",
                        );
                    }
                    3 => {
                        let Ok(sess) = &mut tr else { continue };
                        let m = sess.round(rewarm, u64::MAX, timed);
                        round_done(
                            &mut tr,
                            &mut tr_reps,
                            m,
                            &mut prog,
                            &mut tick,
                            &rn,
                            "transparent",
                        );
                    }
                    _ => {
                        let Ok(sess) = &mut kn else { continue };
                        let k = kernel.as_ref().expect("a session implies the cgroup");
                        let before = k.oom_kills();
                        let mut m = sess.round(rewarm, u64::MAX, timed);
                        if m.is_err() && k.oom_kills() > before && !util::interrupted() {
                            // The kernel OOM-killed the child: start it again (fill,
                            // warm-up) and run this round again, a few times per cell.
                            let e = m.as_ref().err().cloned().unwrap_or_default();
                            if kn_restarts < KERNEL_RESTARTS {
                                kn_restarts += 1;
                                let first = note.take().map(|n| n + "; then ").unwrap_or_default();
                                note = Some(format!(
                                    "{first}the kernel OOM-killed the child in round {} ({e}) \
                                     although swap had room; it was started again",
                                    r + 1
                                ));
                                m = k.start_session(&warm_spec, warmup).and_then(|(mut s, _)| {
                                    let m = s.round(rewarm, u64::MAX, timed);
                                    kn = Ok(s);
                                    m
                                });
                            } else {
                                m = Err(format!(
                                    "OOM-killed by the kernel {} times in its memory cgroup \
                                     (limit = budget, swap free): {e}",
                                    KERNEL_RESTARTS + 1
                                ));
                            }
                        }
                        round_done(
                            &mut kn,
                            &mut kn_reps,
                            m,
                            &mut prog,
                            &mut tick,
                            &rn,
                            "kernel",
                        );
                    }
                }
            }
        }
        // The end of the sessions: the content checks of the pointer columns (over
        // the whole access sequence), usermm's engine errors.
        let tr_ver: Result<Verified, String> = tr.and_then(|s| s.finish().map(|v| v.0));
        let kn_ver: Result<Verified, String> = kn.and_then(|s| s.finish().map(|v| v.0));
        if let Ok((vm, _, _)) = &um {
            let s = vm.stats();
            if s.write_errors + s.read_errors > 0 {
                um = Err(format!(
                    "engine reported {} write and {} read errors",
                    s.write_errors, s.read_errors
                ));
            }
        }
        let usermm = um.and_then(|_| aggregate(um_reps, um_setup));
        let transp = tr_ver.clone().and_then(|_| aggregate(tr_reps, tr_setup));
        let kern = kn_ver.clone().and_then(|_| aggregate(kn_reps, kn_setup));
        let plain = pl.and_then(|_| aggregate(pl_reps, None));
        let device_iops: Vec<f64> = dev_reps.iter().map(|d| d.iops()).collect();
        let device = match dev_err {
            Some(e) => Err(e),
            None if dev_reps.is_empty() => Err("not run".to_string()),
            None => {
                dev_reps.sort_by(|x, y| x.iops().total_cmp(&y.iops()));
                let mid = (dev_reps.len() - 1) / 2;
                Ok(dev_reps.swap_remove(mid))
            }
        };
        // usermm again, its swap on the NBD server (once, after the repeats).
        let nbd = match &nbd_server {
            Ok(srv) if !util::interrupted() => SwapSpec::parse(&srv.spec())
                .map_err(|e| e.to_string())
                .and_then(|sw| run_usermm(budget, a.io_threads, sw, &warm_spec, warmup, timed)),
            Ok(_) => Err("interrupted".to_string()),
            Err(e) => Err(e.clone()),
        };
        if let Ok(m) = &nbd {
            prog.println(&format!("{name} usermm over NBD: {}/s", fmt_num(m.rate())));
        }
        if let Some(n) = &note {
            prog.println(&format!("kernel in {name}: {n}"));
        }
        if let Err(e) = &usermm {
            prog.println(&format!("usermm failed in {name}: {e}"));
        }
        if let (Err(e), Ok(())) = (&transp, &transparent_avail) {
            prog.println(&format!("transparent failed in {name}: {e}"));
        }
        if let (Ok(u), Ok(k)) = (&usermm, &kern) {
            let r = Spread::of(&per_repeat_ratios(u, k));
            prog.println(&format!(
                "{name}: um/kern {:.2} (min-max {:.2}-{:.2} over {} repeats)",
                r.median, r.min, r.max, r.n
            ));
        }
        outs.push(CellOut {
            cell: *c,
            spec,
            usermm,
            kernel: kern,
            kernel_note: note,
            plain,
            device,
            device_iops,
            nbd,
            transparent: transp,
            transparent_verified: tr_ver.ok(),
            kernel_verified: kn_ver.ok(),
        });
    }
    prog.finish();

    // Clean-up (also done on drop), then check it.
    let mut cleanup_ok = true;
    if let Ok(k) = &mut kernel {
        if let Err(e) = k.teardown() {
            eprintln!("usermm bench: cleanup: {e}");
            cleanup_ok = false;
        }
    }
    drop(kernel);
    drop(probe);
    drop(nbd_server);
    um_swap_undo.forget();
    tr_swap_undo.forget();
    for f in [um_swap, tr_swap] {
        if let Err(e) = f.close() {
            eprintln!("usermm bench: cannot delete a swap file: {e}");
            cleanup_ok = false;
        }
    }
    let leftovers = leftover_check();
    if !leftovers.is_empty() {
        eprintln!("usermm bench: cleanup incomplete: {}", leftovers.join("; "));
        cleanup_ok = false;
    }
    let interrupted = util::interrupted();

    // Output.
    let hit_spread = (!hit_ratios.is_empty()).then(|| Spread::of(&hit_ratios));
    let hit = HitPath {
        working_set_bytes: hit_pages * PAGE_SIZE as u64,
        usermm_accesses_per_s: hit_um.as_ref().ok().map(|m| m.rate()),
        plain_accesses_per_s: hit_plain.as_ref().ok().map(|m| m.rate()),
        ratio: hit_spread.map(|s| s.median),
        ratio_min: hit_spread.map(|s| s.min),
        ratio_max: hit_spread.map(|s| s.max),
        ratio_rounds: hit_ratios,
        usermm_p50_us: hit_um.as_ref().ok().map(|m| m.hist.quantile_us(0.5)),
        plain_p50_us: hit_plain.as_ref().ok().map(|m| m.hist.quantile_us(0.5)),
        error: hit_um.as_ref().err().or(hit_plain.as_ref().err()).cloned(),
    };
    print_probes(&probes, device_buffered);
    print_table(&outs, repeats);
    let bounds: Vec<_> = outs
        .iter()
        .map(|o| super::bench_bounds::for_cell(&o.spec, budget / PAGE_SIZE as u64))
        .collect();
    super::bench_bounds::print(
        &outs
            .iter()
            .zip(&bounds)
            .map(|(o, b)| {
                (
                    cell_name(&o.cell),
                    [&o.usermm, &o.transparent, &o.kernel]
                        .map(|r| r.as_ref().map(|g| g.med.clone()).map_err(|e| e.clone())),
                    *b,
                )
            })
            .collect::<Vec<_>>(),
    );
    print_checks(&outs);
    print_nbd(&outs);
    match (&hit_um, &hit_plain, hit.ratio) {
        (Ok(u), Ok(p), Some(ratio)) => println!(
            "hit path (W = {} resident, uniform random 8-byte reads, 1 thread): usermm {}/s, plain {}/s \
             (medians of {} rounds), ratio {:.2} [{:.2}-{:.2}] (the median of the rounds' ratios, \
             each round timing both back to back)",
            fmt_bytes(hit.working_set_bytes),
            fmt_num(u.rate()),
            fmt_num(p.rate()),
            hit.ratio_rounds.len(),
            ratio,
            hit.ratio_min.unwrap_or(ratio),
            hit.ratio_max.unwrap_or(ratio)
        ),
        _ => println!(
            "hit path: not measured: {}",
            hit.error.clone().unwrap_or_default()
        ),
    }
    // The transparent column failing where it is available (a SIGBUS, an engine
    // error, a hang) fails the run; "ok" in the closing line says only that it could
    // run here, so a cell where it failed says so there too.
    let tr_failed_in = |o: &CellOut| {
        transparent_avail.is_ok() && o.transparent.as_ref().is_err_and(|e| e != "interrupted")
    };
    let tr_failed = outs.iter().filter(|o| tr_failed_in(o)).count();
    let transparent_line = if tr_failed > 0 {
        format!("FAILED in {tr_failed} of {} cells (see above)", outs.len())
    } else {
        transparent_status.clone()
    };
    println!(
        "seed {seed}; total time {}; kernel: {}; transparent: {}; cleanup {}",
        fmt_dur(t_all.elapsed()),
        kernel_status,
        transparent_line,
        if cleanup_ok { "ok" } else { "INCOMPLETE" }
    );

    if let Some(path) = &a.json {
        let out = JsonOut {
            meta: Meta {
                command: std::env::args().collect::<Vec<_>>().join(" "),
                date_unix: now_unix(),
                seed,
                budget_bytes: budget,
                words_per_access: a.words,
                warmup_s: warmup.as_secs_f64(),
                warmup_rule: "once per cell and system (kept alive across the repeats): 16 \
                              accesses per page of the working set on zipf, two on hot/cold, \
                              one on uniform and scans, or warmup_s, whichever ends first; \
                              then rewarm_s before each repeat"
                    .into(),
                plain_timed_s: plain_timed.as_secs_f64(),
                timed_s: timed.as_secs_f64(),
                dir: dir.display().to_string(),
                kernel: kernel_status.clone(),
                transparent: transparent_status.clone(),
                device_buffered,
                machine: machine_desc(),
                zpool: None,
                repeats: Some(repeats),
                rewarm_s: Some(rewarm.as_secs_f64()),
                spread: Some(
                    "min-max over the repeats (ratio_spread = ratio_vs_kernel_max - \
                     ratio_vs_kernel_min)"
                        .into(),
                ),
            },
            records: records(&outs, &bounds),
            device_probe: probes
                .iter()
                .map(|(op, d, r)| ProbeRecord {
                    op: op.name(),
                    queue_depth: *d,
                    iops: r.iops(),
                    p50_us: r.hist.quantile_us(0.5),
                    p99_us: r.hist.quantile_us(0.99),
                })
                .collect(),
            hit_path: hit,
        };
        let text = serde_json::to_string_pretty(&out).expect("serializable");
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        let series = plot_series(&outs);
        super::plot::draw(path, &series, budget)
            .map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    // usermm failing, a content check failing, or the transparent column failing
    // (`tr_failed_in`) fail the run.
    let failed = tr_failed > 0
        || outs.iter().any(|o| {
            o.usermm.is_err()
                || [&o.transparent, &o.kernel]
                    .iter()
                    .any(|r| r.as_ref().is_err_and(|e| e.contains(verify::FAILED)))
        });
    Ok(if interrupted {
        130
    } else if failed || !cleanup_ok {
        1
    } else {
        0
    })
}

/// Anything of ours still active: swap areas or cgroups named after this process.
pub(super) fn leftover_check() -> Vec<String> {
    let pid = std::process::id();
    let mut v = Vec::new();
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    for l in swaps.lines().skip(1) {
        if let Some(f) = l.split_whitespace().next() {
            if f.contains(&format!("usermm-kswap-{pid}-")) {
                v.push(format!("swap {f} still active (swapoff {f})"));
            }
        }
    }
    for base in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"] {
        let p = Path::new(base).join(format!("usermm-bench-{pid}"));
        if p.exists() {
            v.push(format!("cgroup {} still exists (rmdir it)", p.display()));
        }
    }
    v
}

/// Swap areas and cgroups left by an earlier bench that was killed (SIGKILL, power
/// loss): reported with the commands that remove them, never touched.
pub(super) fn stale_leftovers() -> Vec<String> {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    let mut v = Vec::new();
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    for l in swaps.lines().skip(1) {
        let Some(f) = l.split_whitespace().next() else {
            continue;
        };
        let name = Path::new(f)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        if let Some(rest) = name.strip_prefix("usermm-kswap-") {
            let pid = rest.split('-').next().unwrap_or("");
            if !alive(pid) {
                v.push(format!(
                    "swap area {f} of a dead bench (pid {pid}): swapoff {f} && rm {f}"
                ));
            }
        }
    }
    for base in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"] {
        let Ok(rd) = std::fs::read_dir(base) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix("usermm-bench-") {
                if !alive(pid) {
                    v.push(format!(
                        "cgroup {} of a dead bench: rmdir {}",
                        e.path().display(),
                        e.path().display()
                    ));
                }
            }
        }
    }
    v
}

pub(super) fn machine_desc() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        .unwrap_or_default();
    format!("{cpus} CPUs, MemTotal {mem} kB, Linux {}", kernel.trim())
}

fn print_probes(probes: &[(Op, u32, ProbeResult)], buffered: bool) {
    println!();
    println!(
        "device: random 4 KiB {} I/O on the swap files' file system",
        if buffered {
            "buffered (O_DIRECT refused)"
        } else {
            "O_DIRECT"
        }
    );
    println!(
        "  {:<6} {:>5} {:>10} {:>9} {:>9}",
        "op", "depth", "IOPS", "p50 µs", "p99 µs"
    );
    for (op, d, r) in probes {
        println!(
            "  {:<6} {:>5} {:>10} {:>9} {:>9}",
            op.name(),
            d,
            fmt_num(r.iops()),
            fmt_us(r.hist.quantile_us(0.5)),
            fmt_us(r.hist.quantile_us(0.99))
        );
    }
}

fn print_table(outs: &[CellOut], repeats: u32) {
    println!();
    let sys_head = ["p50µs", "p99µs", "majflt/s", "miss%"];
    println!(
        "{:<9} {:>5} {:>3} {:>4} | {:>8} {:>6} {:>6} {:>8} {:>5} | {:>8} {:>6} {:>6} {:>8} {:>5} | {:>8} {:>6} {:>6} {:>8} {:>5} | {:>7} | {:>8} | {:>17} {:>17} {:>6} {:>8}",
        "pattern", "W/B", "thr", "wr",
        "usermm", sys_head[0], sys_head[1], sys_head[2], sys_head[3],
        "transp", sys_head[0], sys_head[1], sys_head[2], sys_head[3],
        "kernel", sys_head[0], sys_head[1], sys_head[2], sys_head[3],
        "plain", "dev rd/s", "um/kern [min-max]", "tr/kern [min-max]", "um/dev", "um/plain"
    );
    println!("{}", "-".repeat(225));
    let na = || "-".to_string();
    for o in outs {
        let c = &o.cell;
        let sys = |r: &Result<Agg, String>| -> [String; 5] {
            match r {
                Ok(g) => [
                    fmt_num(g.rate.median),
                    fmt_us(g.med.hist.quantile_us(0.5)),
                    fmt_us(g.med.hist.quantile_us(0.99)),
                    fmt_num(g.majflt_per_s()),
                    format!("{:.1}", g.miss_pct()),
                ],
                Err(_) => [na(), na(), na(), na(), na()],
            }
        };
        let u = sys(&o.usermm);
        let t = sys(&o.transparent);
        let k = sys(&o.kernel);
        let plain = o
            .plain
            .as_ref()
            .map(|g| fmt_num(g.rate.median))
            .unwrap_or_else(|_| na());
        let dev = o
            .device
            .as_ref()
            .map(|d| fmt_num(d.iops()))
            .unwrap_or_else(|_| na());
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => fmt_ratio(a / b),
            _ => na(),
        };
        let vs_kern = |x: &Result<Agg, String>| match (x, &o.kernel) {
            (Ok(x), Ok(k)) => {
                let r = Spread::of(&per_repeat_ratios(x, k));
                format!("{:.2} [{:.2}-{:.2}]", r.median, r.min, r.max)
            }
            _ => na(),
        };
        let ur = o.usermm.as_ref().ok().map(|g| g.rate.median);
        let umaj = o.usermm.as_ref().ok().map(Agg::majflt_per_s);
        println!(
            "{:<9} {:>5} {:>3} {:>4} | {:>8} {:>6} {:>6} {:>8} {:>5} | {:>8} {:>6} {:>6} {:>8} {:>5} | {:>8} {:>6} {:>6} {:>8} {:>5} | {:>7} | {:>8} | {:>17} {:>17} {:>6} {:>8}",
            pattern_label(&c.pattern),
            c.w_over_b,
            c.threads,
            c.write_ratio,
            u[0], u[1], u[2], u[3], u[4],
            t[0], t[1], t[2], t[3], t[4],
            k[0], k[1], k[2], k[3], k[4],
            plain,
            dev,
            vs_kern(&o.usermm),
            vs_kern(&o.transparent),
            ratio(
                if dev_op(&c.pattern) == Op::SeqRead {
                    ur
                } else {
                    umaj
                },
                o.device.as_ref().ok().map(|d| d.iops())
            ),
            ratio(ur, o.plain.as_ref().ok().map(|g| g.rate.median)),
        );
    }
    println!(
        "Medians of {repeats} rounds per cell and system, the systems alternating within each round, each kept alive\n\
         (filled and warmed up once) across the rounds. usermm, transp (transparent), kernel, plain: accesses/s; \
         p50/p99 of every {}th access\nover all rounds; majflt/s = major faults per second; miss% = major faults per access; \
         dev rd/s = random 4 KiB O_DIRECT reads/s at queue\ndepth = thr; um/kern, tr/kern = the median of the per-round \
         ratios of accesses/s [their min-max]; um/plain = ratio of the medians; um/dev =\nusermm major faults/s over dev rd/s \
         (the share of the device's random-read limit the miss path reaches; for seq, usermm accesses/s over the device's sequential\nreads of 128 KiB in pages/s). Warm-up before the\nfirst round: 16 accesses \
         per page of the working set on zipf, two on hot/cold, one on uniform and scans, or the warm-up limit; a short \
         re-warm before each round.",
        access::SAMPLE_EVERY
    );
    let mut errs: Vec<String> = Vec::new();
    for o in outs {
        let c = &o.cell;
        let name = cell_name(c);
        for (sys, e) in [
            ("usermm", o.usermm.as_ref().err()),
            ("transparent", o.transparent.as_ref().err()),
            ("kernel", o.kernel.as_ref().err()),
            ("plain", o.plain.as_ref().err()),
            ("device", o.device.as_ref().err()),
        ] {
            if let (Some(n), "kernel") = (&o.kernel_note, sys) {
                println!("  {name}: kernel: {n}");
            }
            if let Some(e) = e {
                let line = format!("{sys}: {e}");
                // Failures of a system under test are shown per cell; the same
                // reason for a missing column (skipped, unavailable) once.
                let per_cell = sys == "usermm" || e.contains(verify::FAILED);
                if !errs.contains(&line) || per_cell {
                    errs.push(line.clone());
                    println!("  {name}: {line}");
                }
            }
        }
        // A warm-up that hit its time limit before its accesses.
        for (sys, r) in [
            ("usermm", &o.usermm),
            ("transparent", &o.transparent),
            ("kernel", &o.kernel),
        ] {
            if let Ok(Agg {
                setup: Some(st), ..
            }) = r
            {
                let want = warm_per_page(&c.pattern) * o.spec.pages;
                if st.warm_accesses < want {
                    println!(
                        "  {name}: {sys}: the warm-up stopped at its time limit after {} of {} accesses ({:.1} s)",
                        fmt_num(st.warm_accesses as f64),
                        fmt_num(want as f64),
                        st.warm_secs
                    );
                }
            }
        }
    }
}

/// The content checks of the pointer columns: how much was checked, so a pass is
/// visible too (a failure is also in the table's error lines).
fn print_checks(outs: &[CellOut]) {
    type Get = fn(&CellOut) -> (Option<&Verified>, &Result<Agg, String>);
    let columns: [(&str, Get); 2] = [
        ("transparent", |o| {
            (o.transparent_verified.as_ref(), &o.transparent)
        }),
        ("kernel", |o| (o.kernel_verified.as_ref(), &o.kernel)),
    ];
    for (sys, get) in columns {
        let vs: Vec<&Verified> = outs.iter().filter_map(|o| get(o).0).collect();
        let failed = outs
            .iter()
            .filter(|o| get(o).1.as_ref().is_err_and(|e| e.contains(verify::FAILED)))
            .count();
        if vs.is_empty() && failed == 0 {
            continue;
        }
        println!(
            "content check, {sys}: {} cells, {} pages and {} words ({} written in the run) checked \
             after the timed phase{}: {}",
            vs.len() + failed,
            vs.iter().map(|v| v.pages).sum::<u64>(),
            vs.iter().map(|v| v.words).sum::<u64>(),
            vs.iter().map(|v| v.written).sum::<u64>(),
            if vs.iter().all(|v| v.exact) {
                ""
            } else {
                " (with 2+ threads: any value written, not only the last)"
            },
            if failed == 0 {
                "all as written".to_string()
            } else {
                format!("FAILED in {failed} cells (see above; those not counted in the totals)")
            }
        );
    }
}

/// The NBD column: usermm with its swap on qemu-nbd, next to usermm on the file.
fn print_nbd(outs: &[CellOut]) {
    if outs.iter().all(|o| o.nbd.is_err()) {
        if let Some(Err(e)) = outs.first().map(|o| &o.nbd) {
            println!("usermm over NBD: not measured: {e}");
        }
        return;
    }
    println!(
        "usermm over NBD (qemu-nbd on a Unix socket, started by the bench): accesses/s, major faults/s, ratio to usermm on the file"
    );
    for o in outs {
        let c = &o.cell;
        let label = format!(
            "{:<10} {:>4} {:>3} {:>4}",
            pattern_label(&c.pattern),
            c.w_over_b,
            c.threads,
            c.write_ratio
        );
        match (&o.nbd, &o.usermm) {
            (Ok(n), Ok(f)) => println!(
                "  {label} | {:>9}/s {:>8} majflt/s | nbd/file {:.2}",
                fmt_num(n.rate()),
                fmt_num(n.major_faults as f64 / n.secs.max(1e-9)),
                n.rate() / f.rate.median.max(1e-9)
            ),
            (Ok(n), Err(_)) => println!("  {label} | {:>9}/s", fmt_num(n.rate())),
            (Err(e), _) => println!("  {label} | {e}"),
        }
    }
}

/// The JSON records: per cell, one per measured system, the device, and the
/// replacement bounds simulated on the cell's trace (`min`, `a0`, `lru-sim`,
/// `clock-sim`: `major_faults` and `accesses` only).
fn records(outs: &[CellOut], bounds: &[usermm_testkit::bounds::Bounds]) -> Vec<Record> {
    let mut v = Vec::new();
    for (o, b) in outs.iter().zip(bounds) {
        let c = &o.cell;
        let base = |system: &'static str| {
            Record::empty(
                system,
                pattern_label(&c.pattern),
                c.w_over_b,
                c.threads,
                c.write_ratio,
                o.spec.content,
            )
        };
        let nbd = o.nbd.clone().and_then(|m| aggregate(vec![m], None));
        for (system, r) in [
            ("usermm", &o.usermm),
            ("transparent", &o.transparent),
            ("kernel", &o.kernel),
            ("plain", &o.plain),
            ("usermm-nbd", &nbd),
        ] {
            let mut rec = base(system);
            match r {
                Ok(g) => {
                    let m = &g.med;
                    rec.accesses_per_s = Some(g.rate.median);
                    rec.major_faults = Some(m.major_faults);
                    rec.p50_us = Some(m.hist.quantile_us(0.5));
                    rec.p99_us = Some(m.hist.quantile_us(0.99));
                    rec.device_reads = Some(m.device_reads);
                    rec.device_writes = Some(m.device_writes);
                    rec.accesses = Some(m.accesses);
                    rec.seconds = Some(m.secs);
                    rec.warmup_accesses = Some(m.warm_accesses);
                    if matches!(system, "usermm" | "transparent" | "usermm-nbd") {
                        let pct = |us: u64| us as f64 / 1e6 / m.secs.max(1e-9) * 100.0;
                        rec.stall_some_pct = Some(pct(m.stall_some_us));
                        rec.stall_full_pct = Some(pct(m.stall_full_us));
                    }
                    rec.repeats = Some(g.reps.len() as u32);
                    rec.accesses_per_s_min = Some(g.rate.min);
                    rec.accesses_per_s_max = Some(g.rate.max);
                    rec.accesses_per_s_repeats = Some(g.reps.iter().map(Measured::rate).collect());
                    if let Some(st) = g.setup {
                        rec.fill_seconds = Some(st.fill_secs);
                        rec.warmup_seconds = Some(st.warm_secs);
                    }
                    if let (Ok(k), "usermm" | "transparent") = (&o.kernel, system) {
                        let v = per_repeat_ratios(g, k);
                        let r = Spread::of(&v);
                        rec.ratio_vs_kernel = Some(r.median);
                        rec.ratio_vs_kernel_min = Some(r.min);
                        rec.ratio_vs_kernel_max = Some(r.max);
                        rec.ratio_spread = Some(r.max - r.min);
                        rec.ratio_vs_kernel_repeats = Some(v);
                    }
                }
                Err(e) => rec.error = Some(e.clone()),
            }
            if system == "kernel" {
                rec.note = o.kernel_note.clone();
                rec.verified_words = o.kernel_verified.as_ref().map(|v| v.words);
            }
            if system == "transparent" {
                rec.verified_words = o.transparent_verified.as_ref().map(|v| v.words);
            }
            v.push(rec);
        }
        let mut rec = base("device");
        rec.queue_depth = Some(c.threads);
        match &o.device {
            Ok(d) => {
                let r = Spread::of(&o.device_iops);
                rec.accesses_per_s = Some(d.iops());
                rec.repeats = Some(r.n as u32);
                rec.accesses_per_s_min = Some(r.min);
                rec.accesses_per_s_max = Some(r.max);
                rec.accesses_per_s_repeats = Some(o.device_iops.clone());
                rec.major_faults = Some(0);
                rec.p50_us = Some(d.hist.quantile_us(0.5));
                rec.p99_us = Some(d.hist.quantile_us(0.99));
                rec.device_reads = Some(d.ops);
                rec.device_writes = Some(0);
                rec.accesses = Some(d.ops);
                rec.seconds = Some(d.secs);
            }
            Err(e) => rec.error = Some(e.clone()),
        }
        v.push(rec);
        for (system, ratio) in [
            ("min", b.min),
            ("a0", b.a0),
            ("lru-sim", b.lru),
            ("clock-sim", b.clock),
        ] {
            let mut rec = base(system);
            rec.accesses = Some(b.accesses);
            rec.major_faults = Some((ratio * b.accesses as f64).round() as u64);
            rec.note = Some("simulated on the cell's access trace with the budget's frames".into());
            v.push(rec);
        }
    }
    v
}

fn plot_series(outs: &[CellOut]) -> Vec<super::plot::Series> {
    use super::plot::Series;
    let mut v: Vec<Series> = Vec::new();
    for o in outs {
        let c = &o.cell;
        let variant = format!("wr {} t{}", c.write_ratio, c.threads);
        for (system, val) in [
            ("usermm", o.usermm.as_ref().ok().map(|g| g.rate.median)),
            (
                "transparent",
                o.transparent.as_ref().ok().map(|g| g.rate.median),
            ),
            ("kernel", o.kernel.as_ref().ok().map(|g| g.rate.median)),
            ("plain", o.plain.as_ref().ok().map(|g| g.rate.median)),
            ("device rd IOPS", o.device.as_ref().ok().map(|d| d.iops())),
        ] {
            let Some(y) = val else { continue };
            let panel = pattern_label(&c.pattern);
            match v
                .iter_mut()
                .find(|s| s.panel == panel && s.system == system && s.variant == variant)
            {
                Some(s) => s.points.push((c.w_over_b, y)),
                None => v.push(Series {
                    panel,
                    system,
                    variant: variant.clone(),
                    points: vec![(c.w_over_b, y)],
                }),
            }
        }
    }
    for s in &mut v {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    v
}

/// `--compare A B`: the um/kern and tr/kern ratios of two `--json` files, cell by
/// cell (the median per-repeat ratio where the file has it, else the ratio of the
/// rates), and how many cells agree within ±10 %.
/// The budgets `--scale` compares (`--scale-budgets` overrides them).
const SCALE_BUDGETS: [u64; 2] = [64 << 20, 2 << 30];

/// `--scale`: the regular bench at both budgets, then the per-size table.
fn scale(a: BenchArgs) -> Result<i32, String> {
    let tmp = tempfile::tempdir().map_err(|e| format!("cannot make a directory: {e}"))?;
    let mut jsons = Vec::new();
    let budgets = match a.scale_budgets[..] {
        [x, y] => [x, y],
        _ => SCALE_BUDGETS,
    };
    // 64M, 2G: as `--budget` takes them.
    let labels = budgets.map(|b| match b {
        b if b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b => format!("{}K", b >> 10),
    });
    for (budget, label) in budgets.into_iter().zip(&labels) {
        let mut s = a.clone();
        s.scale = false;
        s.budget = Some(budget);
        if s.patterns.is_empty() {
            s.patterns = vec![Pattern::Uniform, Pattern::Zipf { theta: 0.99 }];
        }
        s.w_over_b = vec![4.0];
        s.threads = vec![2];
        s.write_ratios = vec![0.0];
        s.no_transparent = true;
        s.no_nbd = true;
        s.plot = None;
        s.repeats = Some(a.repeats.unwrap_or(3));
        let path = match &a.json {
            Some(p) => {
                let stem = p.with_extension("");
                PathBuf::from(format!("{}-{label}.json", stem.display()))
            }
            None => tmp.path().join(format!("scale-{label}.json")),
        };
        s.json = Some(path.clone());
        eprintln!(
            "usermm bench --scale: budget {label}, working set {}",
            fmt_bytes(budget * 4)
        );
        let code = bench(s, &mut None)?;
        if code != 0 {
            return Ok(code);
        }
        jsons.push(path);
    }
    print_scale(&jsons[0], &jsons[1], &labels)?;
    Ok(0)
}

/// The `--scale` table from the two runs' JSON: per pattern and system, major
/// faults/s and accesses/s at both budgets, and large over small.
fn print_scale(small: &Path, large: &Path, labels: &[String; 2]) -> Result<(), String> {
    let load = |p: &Path| -> Result<Vec<serde_json::Value>, String> {
        let t =
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        let j: serde_json::Value =
            serde_json::from_str(&t).map_err(|e| format!("{} is not JSON: {e}", p.display()))?;
        Ok(j["records"].as_array().cloned().unwrap_or_default())
    };
    let (a, b) = (load(small)?, load(large)?);
    // (major faults/s, accesses/s) of a system in a pattern's cell.
    let figures = |recs: &[serde_json::Value], pat: &str, sys: &str| {
        let r = recs
            .iter()
            .find(|r| r["pattern"] == pat && r["system"] == sys);
        let rate = r.and_then(|r| r["accesses_per_s"].as_f64());
        let faults = r.and_then(|r| {
            let (f, t) = (r["major_faults"].as_f64()?, r["seconds"].as_f64()?);
            (t > 0.0).then(|| f / t)
        });
        (faults, rate)
    };
    println!();
    let [l0, l1] = labels;
    println!("scale: W/B 4, 2 threads, read-only; budget {l0} against {l1}");
    println!(
        "{:<9} {:<7} | {:>13} {:>13} {:>7} | {:>13} {:>13} {:>7}",
        "pattern",
        "system",
        format!("majflt/s {l0}"),
        format!("majflt/s {l1}"),
        "ratio",
        format!("acc/s {l0}"),
        format!("acc/s {l1}"),
        "ratio"
    );
    println!("{}", "-".repeat(88));
    let mut pats: Vec<String> = Vec::new();
    for r in &a {
        if let Some(p) = r["pattern"].as_str() {
            if !pats.iter().any(|x| x == p) {
                pats.push(p.to_string());
            }
        }
    }
    let num = |v: Option<f64>| v.map(fmt_num).unwrap_or_else(|| "-".into());
    let div = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if x > 0.0 => format!("{:.2}", y / x),
        _ => "-".into(),
    };
    for p in &pats {
        for sys in ["usermm", "kernel"] {
            let (fa, ra) = figures(&a, p, sys);
            let (fb, rb) = figures(&b, p, sys);
            println!(
                "{:<9} {:<7} | {:>13} {:>13} {:>7} | {:>13} {:>13} {:>7}",
                p,
                sys,
                num(fa),
                num(fb),
                div(fa, fb),
                num(ra),
                num(rb),
                div(ra, rb)
            );
        }
    }
    println!(
        "majflt/s: major faults per second of the timed phases (medians); ratio = {l1} over {l0}: near 1, a fault\n\
         costs the same at the larger size (the miss rate is the same at equal W/B)."
    );
    Ok(())
}

fn compare(a: &Path, b: &Path) -> Result<i32, String> {
    let load = |p: &Path| -> Result<serde_json::Value, String> {
        let t =
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        serde_json::from_str(&t).map_err(|e| format!("{} is not JSON: {e}", p.display()))
    };
    let (ja, jb) = (load(a)?, load(b)?);
    type Key = (String, String, u64, String);
    let key = |r: &serde_json::Value| -> Key {
        (
            r["pattern"].as_str().unwrap_or("").to_string(),
            r["w_over_b"].to_string(),
            r["threads"].as_u64().unwrap_or(0),
            r["write_ratio"].to_string(),
        )
    };
    // (cell) -> (um/kern, tr/kern)
    let ratios = |j: &serde_json::Value| {
        let recs = j["records"].as_array().cloned().unwrap_or_default();
        let mut cells: Vec<(Key, [Option<f64>; 2])> = Vec::new();
        let rate = |k: &Key, sys: &str| {
            recs.iter()
                .find(|r| key(r) == *k && r["system"] == sys)
                .and_then(|r| r["accesses_per_s"].as_f64())
        };
        for r in &recs {
            let k = key(r);
            let slot = match r["system"].as_str() {
                Some("usermm") => 0,
                Some("transparent") => 1,
                _ => continue,
            };
            let v = r["ratio_vs_kernel"].as_f64().or_else(|| {
                let sys = if slot == 0 { "usermm" } else { "transparent" };
                Some(rate(&k, sys)? / rate(&k, "kernel")?)
            });
            match cells.iter_mut().find(|c| c.0 == k) {
                Some(c) => c.1[slot] = v,
                None => {
                    let mut x = [None, None];
                    x[slot] = v;
                    cells.push((k, x));
                }
            }
        }
        cells
    };
    let (ra, rb) = (ratios(&ja), ratios(&jb));
    println!("A = {}\nB = {}", a.display(), b.display());
    println!(
        "{:<9} {:>5} {:>3} {:>4} | {:>8} {:>8} {:>7} | {:>8} {:>8} {:>7}",
        "pattern", "W/B", "thr", "wr", "um/kern A", "B", "B/A-1", "tr/kern A", "B", "B/A-1"
    );
    println!("{}", "-".repeat(82));
    let mut n = [0usize; 2];
    let mut ok = [0usize; 2];
    let mut worst = [0.0f64; 2];
    for (k, va) in &ra {
        let vb = rb
            .iter()
            .find(|c| c.0 == *k)
            .map(|c| c.1)
            .unwrap_or([None, None]);
        let mut cols = Vec::new();
        for s in 0..2 {
            match (va[s], vb[s]) {
                (Some(x), Some(y)) if x > 0.0 => {
                    let d = y / x - 1.0;
                    n[s] += 1;
                    if d.abs() <= 0.10 {
                        ok[s] += 1;
                    }
                    worst[s] = worst[s].max(d.abs());
                    cols.push(format!(
                        "{x:>8.2} {y:>8.2} {:>+6.1}%{}",
                        100.0 * d,
                        if d.abs() <= 0.10 { " " } else { "!" }
                    ));
                }
                _ => cols.push(format!("{:>8} {:>8} {:>7}", "-", "-", "-")),
            }
        }
        println!(
            "{:<9} {:>5} {:>3} {:>4} | {} | {}",
            k.0, k.1, k.2, k.3, cols[0], cols[1]
        );
    }
    for (s, what) in ["um/kern", "tr/kern"].iter().enumerate() {
        println!(
            "{what}: {} of {} cells agree within ±10 % (largest difference {:.1} %)",
            ok[s],
            n[s],
            100.0 * worst[s]
        );
    }
    Ok(0)
}
