//! `usermm bench --compressed`: usermm's compressed tier against the kernel's, on
//! pages of a given compressibility (`driver::Content`), the same seeded trace for
//! all three systems, interleaved cell by cell in an order that rotates:
//!
//! - `usermm-zpool`: a child process (`usermm bench-zpool-child`, hidden) with a
//!   fresh `Vm` of the budget, `zpool:?size=B/2&algo=lz4&prio=10` (`--zpool-size`) above a swap
//!   file, doing the accesses through the API like the `usermm` column. Its memory
//!   is the child's peak RSS (VmHWM: everything, the pool's frames included) and
//!   the most the pool held (sampled every 20 ms).
//! - `kernel-zram`: the `bench-kernel-child` (anonymous memory) in a memory cgroup
//!   limited to the budget, swapping to `/dev/zram0` (sized like the file, lz4 or
//!   lzo-rle, highest priority; `kernel_comp::Zram`). Its memory: the cgroup's
//!   peak charge and zram's `mem_used_max` (not charged to the cgroup).
//! - `kernel-zswap`: the same child and cgroup, swapping to a swap file with zswap
//!   enabled (lz4 where the kernel has it, pool percent as it was;
//!   `kernel_comp::Zswap`). Its pool: debugfs `pool_total_size` sampled every 10 ms.
//!   Neither kernel pool is charged to a v1 memory cgroup here (the pools grew past
//!   the limit while the cgroup's peak stayed at it), so the process's memory is
//!   the cgroup's peak plus the pool.
//!
//! A kernel child the OOM killer kills (the cgroup's `oom_kill` count rose) is
//! recorded as such — `oom_kills` ≥ 1 and an error, no rate — and never run again.
//! Without root, zram or zswap, a column says `SKIP: reason` and the rest runs.

use super::bench::{pattern_label, HitPath, JsonOut, Meta, Record};
use super::bench_child::{self, WorkArgs};
use super::kernel::KernelSwap;
use super::kernel_comp::{Zram, Zswap};
use super::util::{self, fmt_bytes, fmt_dur, fmt_num, Undo};
use super::verify::{self, Verified};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::driver::{Content, Measured, UsermmTarget, WorkSpec};
use usermm_testkit::workload::Pattern;

/// The comparison's parameters (from `usermm bench`'s flags).
pub use super::bench::CompPlan as Plan;

/// Runs the comparison `usermm bench --compressed` asked for; returns the exit
/// code.
pub fn main(p: Plan) -> i32 {
    match run(p) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("usermm bench: error: {e}");
            1
        }
    }
}

/// The systems, in the order of the table.
pub const SYSTEMS: [&str; 3] = ["usermm-zpool", "kernel-zram", "kernel-zswap"];

#[derive(Debug, Clone, Copy)]
struct Cell {
    pattern: Pattern,
    w_over_b: f64,
    threads: u32,
    write_ratio: f64,
    content: Content,
}

/// One system's run of one cell.
#[derive(Debug)]
struct SysOut {
    result: Result<Measured, String>,
    verified: Option<Verified>,
    /// OOM kills during the run (kernel systems; `None` for usermm, which has none).
    oom_kills: Option<u64>,
    /// usermm: the child's peak RSS; kernel: the cgroup's peak charge.
    peak_bytes: Option<u64>,
    /// The compressed pool at its largest (zpool frames, zram mem_used_max, zswap
    /// pool_total_size).
    pool_bytes: Option<u64>,
}

impl SysOut {
    fn failed(e: String) -> SysOut {
        SysOut {
            result: Err(e),
            verified: None,
            oom_kills: None,
            peak_bytes: None,
            pool_bytes: None,
        }
    }
}

#[derive(Debug)]
struct CellOut {
    cell: Cell,
    sys: [SysOut; 3],
}

/// The zpool spec of the usermm column.
fn zpool_spec(bytes: u64) -> String {
    let size = (bytes / PAGE_SIZE as u64).max(1) * PAGE_SIZE as u64;
    format!("zpool:?size={size}&algo=lz4&prio=10")
}

fn cell_name(c: &Cell) -> String {
    format!(
        "{} W/B={} thr={} wr={} {}",
        pattern_label(&c.pattern),
        c.w_over_b,
        c.threads,
        c.write_ratio,
        c.content.name()
    )
}

/// Runs the comparison; returns the exit code.
pub fn run(p: Plan) -> Result<i32, String> {
    let budget = p.budget;
    let pages_of = |wb: f64| ((budget as f64 * wb) as u64 / PAGE_SIZE as u64).max(1);
    let max_ws = p.wbs.iter().map(|&w| pages_of(w)).max().unwrap_or(1) * PAGE_SIZE as u64;
    let swap_size =
        (max_ws + max_ws / 4 + (16 << 20)).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
    let mut cells = Vec::new();
    for &pattern in &p.patterns {
        for &content in &p.contents {
            for &write_ratio in &p.wrs {
                for &threads in &p.threads {
                    for &w_over_b in &p.wbs {
                        cells.push(Cell {
                            pattern,
                            w_over_b,
                            threads,
                            write_ratio,
                            content,
                        });
                    }
                }
            }
        }
    }
    eprintln!(
        "usermm bench --compressed: budget {}, W/B {:?}, {} cells x 3 systems, warm-up up to {} + {} \
         timed, seed {}; usermm: {} above a swap file",
        fmt_bytes(budget),
        p.wbs,
        cells.len(),
        fmt_dur(p.warmup),
        fmt_dur(p.timed),
        p.seed,
        zpool_spec(p.zpool_size)
    );
    for l in super::bench::stale_leftovers() {
        eprintln!("warning: left over by an earlier run (not touched): {l}");
    }

    // Set-up. usermm's swap file; the kernel's cgroup and swap file (kept off but
    // for zswap's runs); zram; zswap.
    let um_swap = tempfile::Builder::new()
        .prefix("usermm-bench-")
        .suffix(".swap")
        .tempfile_in(&p.dir)
        .map_err(|e| format!("cannot create a swap file in {}: {e}", p.dir.display()))?
        .into_temp_path();
    let um_swap_undo = util::register(Undo::RemoveFile(um_swap.to_path_buf()));
    let mut kernel = if p.no_kernel {
        Err("SKIP: --no-kernel".to_string())
    } else {
        KernelSwap::setup(&p.dir, swap_size, budget)
            .map_err(|e| format!("SKIP: {e}"))
            .and_then(|k| {
                k.swap_enable(false)?;
                Ok(k)
            })
    };
    let mut zram = match &kernel {
        Ok(_) => Zram::setup(swap_size).map_err(|e| format!("SKIP: zram: {e}")),
        Err(e) => Err(e.clone()),
    };
    let mut zswap = match &kernel {
        Ok(_) => Zswap::setup().map_err(|e| format!("SKIP: zswap: {e}")),
        Err(e) => Err(e.clone()),
    };
    let status = |r: Result<String, &String>| match r {
        Ok(d) => format!("ok: {d}"),
        Err(e) => e.clone(),
    };
    let kernel_status = format!(
        "cgroup: {}; zram: {}; zswap: {}",
        status(kernel.as_ref().map(|k| k.describe())),
        status(zram.as_ref().map(|z| z.describe())),
        status(zswap.as_ref().map(|z| z.describe()))
    );
    eprintln!("kernel: {kernel_status}");

    let t_all = Instant::now();
    let total = cells.len() * 3;
    let mut step = 0;
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
            words: p.words,
            seed: p.seed,
            warm_accesses: pages,
            content: c.content,
        };
        let name = cell_name(c);
        let mut sys = [
            SysOut::failed("not run".into()),
            SysOut::failed("not run".into()),
            SysOut::failed("not run".into()),
        ];
        for k in 0..3 {
            if util::interrupted() {
                break;
            }
            let i = (k + outs.len()) % 3;
            sys[i] = match i {
                0 => run_zpool(&p, &um_swap, swap_size, &spec),
                1 => match (&kernel, &zram) {
                    (Ok(k), Ok(z)) => run_zram(k, z, &spec, p.warmup, p.timed),
                    (Err(e), _) | (_, Err(e)) => SysOut::failed(e.clone()),
                },
                _ => match (&kernel, &zswap) {
                    (Ok(k), Ok(z)) => run_zswap(k, z, &spec, p.warmup, p.timed),
                    (Err(e), _) | (_, Err(e)) => SysOut::failed(e.clone()),
                },
            };
            step += 1;
            let s = &sys[i];
            eprintln!(
                "[{step}/{total}] {name} {}: {}",
                SYSTEMS[i],
                match &s.result {
                    Ok(m) => format!(
                        "{}/s, peak {}, pool {}",
                        fmt_num(m.rate()),
                        s.peak_bytes.map(fmt_bytes).unwrap_or("-".into()),
                        s.pool_bytes.map(fmt_bytes).unwrap_or("-".into())
                    ),
                    Err(e) => e.clone(),
                }
            );
        }
        outs.push(CellOut { cell: *c, sys });
    }

    // Clean-up (also done on drop), then check it.
    let mut cleanup_ok = true;
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r {
            eprintln!("usermm bench: cleanup: {e}");
            cleanup_ok = false;
        }
    };
    if let Ok(z) = &mut zswap {
        note(z.teardown());
    }
    if let Ok(z) = &mut zram {
        note(z.teardown());
    }
    if let Ok(k) = &mut kernel {
        note(k.teardown());
    }
    drop((zswap, zram, kernel));
    um_swap_undo.forget();
    note(
        um_swap
            .close()
            .map_err(|e| format!("cannot delete the swap file: {e}")),
    );
    let leftovers = super::bench::leftover_check();
    if !leftovers.is_empty() {
        eprintln!("usermm bench: cleanup incomplete: {}", leftovers.join("; "));
        cleanup_ok = false;
    }

    print_table(&outs, budget);
    println!(
        "seed {}; total time {}; kernel: {kernel_status}; cleanup {}",
        p.seed,
        fmt_dur(t_all.elapsed()),
        if cleanup_ok { "ok" } else { "INCOMPLETE" }
    );

    if let Some(path) = &p.json {
        let out = JsonOut {
            meta: Meta {
                command: std::env::args().collect::<Vec<_>>().join(" "),
                date_unix: super::bench::now_unix(),
                seed: p.seed,
                budget_bytes: budget,
                words_per_access: p.words,
                warmup_s: p.warmup.as_secs_f64(),
                warmup_rule:
                    "one access per page of the working set, or warmup_s, whichever ends first"
                        .into(),
                timed_s: p.timed.as_secs_f64(),
                plain_timed_s: 0.0,
                dir: p.dir.display().to_string(),
                kernel: kernel_status.clone(),
                transparent: "not run (--compressed)".into(),
                device_buffered: false,
                machine: super::bench::machine_desc(),
                zpool: Some(format!("{} above a swap file", zpool_spec(p.zpool_size))),
                repeats: None,
                rewarm_s: None,
                spread: None,
            },
            records: records(&outs),
            device_probe: Vec::new(),
            hit_path: HitPath {
                working_set_bytes: 0,
                usermm_accesses_per_s: None,
                plain_accesses_per_s: None,
                ratio: None,
                ratio_min: None,
                ratio_max: None,
                ratio_rounds: Vec::new(),
                usermm_p50_us: None,
                plain_p50_us: None,
                error: Some("not measured (--compressed)".into()),
            },
        };
        let text = serde_json::to_string_pretty(&out).expect("serializable");
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    // usermm failing, or any content check failing, fails the run; a kernel
    // system's OOM kill is a result, not a failure.
    let failed = outs.iter().any(|o| {
        o.sys[0].result.is_err()
            || o.sys
                .iter()
                .any(|s| s.result.as_ref().is_err_and(|e| e.contains(verify::FAILED)))
    });
    Ok(if util::interrupted() {
        130
    } else if failed || !cleanup_ok {
        1
    } else {
        0
    })
}

fn run_zpool(p: &Plan, swap: &std::path::Path, swap_size: u64, spec: &WorkSpec) -> SysOut {
    let mut extra = vec![
        "--budget".to_string(),
        p.budget.to_string(),
        "--swap-file".to_string(),
        swap.display().to_string(),
        "--swap-size".to_string(),
        swap_size.to_string(),
        "--zpool".to_string(),
        zpool_spec(p.zpool_size),
    ];
    if let Some(n) = p.io_threads {
        extra.extend(["--io-threads".to_string(), n.to_string()]);
    }
    match bench_child::run_watched(
        "bench-zpool-child",
        &extra,
        "usermm-zpool",
        spec,
        p.warmup,
        p.timed,
        &mut || {},
    ) {
        Ok((m, v, mem)) => SysOut {
            result: Ok(m),
            verified: Some(v),
            oom_kills: None,
            peak_bytes: mem.peak_rss_bytes,
            pool_bytes: mem.pool_bytes,
        },
        Err(e) => SysOut::failed(e),
    }
}

fn kernel_out(r: super::kernel::KernelRun, pool: Option<u64>) -> SysOut {
    let (result, verified) = match r.result {
        Ok((m, v, _)) => (Ok(m), Some(v)),
        Err(e) => (Err(e), None),
    };
    SysOut {
        result,
        verified,
        oom_kills: Some(r.oom_kills),
        peak_bytes: r.peak_bytes,
        pool_bytes: pool,
    }
}

fn run_zram(
    k: &KernelSwap,
    z: &Zram,
    spec: &WorkSpec,
    warmup: Duration,
    timed: Duration,
) -> SysOut {
    if let Err(e) = z.swap_enable(true) {
        return SysOut::failed(e);
    }
    z.reset_peak();
    let r = k.run_counted(spec, warmup, timed, &mut || {});
    let pool = z.peak_used();
    let mut out = kernel_out(r, pool);
    if let Err(e) = z.swap_enable(false) {
        out.result = Err(e);
    }
    out
}

fn run_zswap(
    k: &KernelSwap,
    z: &Zswap,
    spec: &WorkSpec,
    warmup: Duration,
    timed: Duration,
) -> SysOut {
    if let Err(e) = k.swap_enable(true).and_then(|()| z.enable(true)) {
        let _ = k.swap_enable(false);
        return SysOut::failed(e);
    }
    let mut peak = 0u64;
    let r = k.run_counted(spec, warmup, timed, &mut || {
        peak = peak.max(z.pool_bytes().unwrap_or(0));
    });
    let mut out = kernel_out(r, z.pool_bytes().map(|_| peak));
    if let Err(e) = z.enable(false).and_then(|()| k.swap_enable(false)) {
        out.result = Err(e);
    }
    out
}

fn mib(v: Option<u64>) -> String {
    v.map(|b| format!("{:.1}", b as f64 / (1u64 << 20) as f64))
        .unwrap_or_else(|| "-".into())
}

fn print_table(outs: &[CellOut], budget: u64) {
    println!();
    println!(
        "{:<8} {:>3} {:>3} {:>3} {:<6} | {:>21} | {:>21} | {:>21} | {:>7} {:>7}",
        "", "", "", "", "", SYSTEMS[0], SYSTEMS[1], SYSTEMS[2], "", ""
    );
    let h = [
        "acc/s", "p50µs", "p99µs", "majflt/s", "peakMiB", "poolMiB", "oom",
    ];
    let sys_h = format!(
        "{:>8} {:>6} {:>6} {:>8} {:>7} {:>7} {:>3}",
        h[0], h[1], h[2], h[3], h[4], h[5], h[6]
    );
    println!(
        "{:<8} {:>3} {:>3} {:>3} {:<6} | {sys_h} | {sys_h} | {sys_h} | {:>7} {:>7}",
        "pattern", "W/B", "thr", "wr", "pages", "um/zram", "um/zswp"
    );
    println!("{}", "-".repeat(181));
    let na = || "-".to_string();
    for o in outs {
        let c = &o.cell;
        let col = |s: &SysOut| -> String {
            let oom = s.oom_kills.map(|n| n.to_string()).unwrap_or_else(na);
            match &s.result {
                Ok(m) => format!(
                    "{:>8} {:>6} {:>6} {:>8} {:>7} {:>7} {:>3}",
                    fmt_num(m.rate()),
                    super::bench::fmt_us(m.hist.quantile_us(0.5)),
                    super::bench::fmt_us(m.hist.quantile_us(0.99)),
                    fmt_num(m.major_faults as f64 / m.secs.max(1e-9)),
                    mib(s.peak_bytes),
                    mib(s.pool_bytes),
                    oom
                ),
                Err(e) => {
                    let what = if s.oom_kills.unwrap_or(0) > 0 {
                        "OOM-KILLED"
                    } else if e.starts_with("SKIP") {
                        "SKIP"
                    } else {
                        "FAILED"
                    };
                    format!(
                        "{what:>8} {:>6} {:>6} {:>8} {:>7} {:>7} {oom:>3}",
                        na(),
                        na(),
                        na(),
                        mib(s.peak_bytes),
                        mib(s.pool_bytes)
                    )
                }
            }
        };
        let rate = |s: &SysOut| s.result.as_ref().ok().map(|m| m.rate());
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => na(),
        };
        println!(
            "{:<8} {:>3} {:>3} {:>3} {:<6} | {} | {} | {} | {:>7} {:>7}",
            pattern_label(&c.pattern),
            c.w_over_b,
            c.threads,
            c.write_ratio,
            match c.content {
                Content::Compressible => "compr",
                Content::Incompressible => "random",
            },
            col(&o.sys[0]),
            col(&o.sys[1]),
            col(&o.sys[2]),
            ratio(rate(&o.sys[0]), rate(&o.sys[1])),
            ratio(rate(&o.sys[0]), rate(&o.sys[2])),
        );
    }
    println!(
        "acc/s = accesses/s; p50/p99 of every {}th access; majflt/s = major faults/s (usermm: from the \
         pool or the file; kernel: from zram or swap, zswap hits included);\n\
         peakMiB: usermm = the child's peak RSS (the pool's frames included), kernel = the cgroup's peak \
         charge (limit {}); poolMiB: zpool frames (inside peakMiB) / zram mem_used_max / zswap\n\
         pool_total_size (the kernel's pools are not charged to the cgroup: add them); oom = the cgroup's \
         OOM kills in the run (not retried); pages: compr = 1 word in 4 random, the rest zero; random = \
         every word random.",
        usermm_testkit::driver::SAMPLE_EVERY,
        fmt_bytes(budget)
    );
    let mut shown: Vec<String> = Vec::new();
    for o in outs {
        for (i, s) in o.sys.iter().enumerate() {
            if let Err(e) = &s.result {
                let line = format!("{}: {e}", SYSTEMS[i]);
                let per_cell = !e.starts_with("SKIP");
                if per_cell || !shown.contains(&line) {
                    println!(
                        "  {}{line}",
                        if per_cell {
                            format!("{}: ", cell_name(&o.cell))
                        } else {
                            String::new()
                        }
                    );
                    shown.push(line);
                }
            }
        }
    }
    for (i, sys) in SYSTEMS.iter().enumerate() {
        let vs: Vec<&Verified> = outs
            .iter()
            .filter_map(|o| o.sys[i].verified.as_ref())
            .collect();
        let failed = outs
            .iter()
            .filter(|o| {
                o.sys[i]
                    .result
                    .as_ref()
                    .is_err_and(|e| e.contains(verify::FAILED))
            })
            .count();
        if !vs.is_empty() || failed > 0 {
            println!(
                "content check, {sys}: {} cells, {} pages and {} words checked after the timed phase: {}",
                vs.len() + failed,
                vs.iter().map(|v| v.pages).sum::<u64>(),
                vs.iter().map(|v| v.words).sum::<u64>(),
                if failed == 0 {
                    "all as written".to_string()
                } else {
                    format!("FAILED in {failed} cells (see above; not counted in the totals)")
                }
            );
        }
    }
}

fn records(outs: &[CellOut]) -> Vec<Record> {
    let mut v = Vec::new();
    for o in outs {
        let c = &o.cell;
        for (i, s) in o.sys.iter().enumerate() {
            let mut rec = Record::empty(
                SYSTEMS[i],
                pattern_label(&c.pattern),
                c.w_over_b,
                c.threads,
                c.write_ratio,
                c.content,
            );
            match &s.result {
                Ok(m) => {
                    rec.accesses_per_s = Some(m.rate());
                    rec.major_faults = Some(m.major_faults);
                    rec.p50_us = Some(m.hist.quantile_us(0.5));
                    rec.p99_us = Some(m.hist.quantile_us(0.99));
                    rec.device_reads = Some(m.device_reads);
                    rec.device_writes = Some(m.device_writes);
                    rec.accesses = Some(m.accesses);
                    rec.seconds = Some(m.secs);
                    rec.warmup_accesses = Some(m.warm_accesses);
                    if i == 0 {
                        let pct = |us: u64| us as f64 / 1e6 / m.secs.max(1e-9) * 100.0;
                        rec.stall_some_pct = Some(pct(m.stall_some_us));
                        rec.stall_full_pct = Some(pct(m.stall_full_us));
                    }
                }
                Err(e) => rec.error = Some(e.clone()),
            }
            rec.verified_words = s.verified.as_ref().map(|v| v.words);
            rec.oom_kills = s.oom_kills;
            rec.peak_bytes = s.peak_bytes;
            rec.pool_bytes = s.pool_bytes;
            v.push(rec);
        }
    }
    v
}

// ------------------------------------------------------------------ the child

/// Arguments of the hidden `bench-zpool-child` command.
#[derive(clap::Args, Debug)]
pub struct ChildArgs {
    /// The Vm's budget in bytes.
    #[arg(long)]
    budget: u64,
    /// The swap file below the pool (created or reused at `swap_size` bytes).
    #[arg(long)]
    swap_file: PathBuf,
    #[arg(long)]
    swap_size: u64,
    /// The zpool spec.
    #[arg(long)]
    zpool: String,
    #[arg(long)]
    io_threads: Option<u32>,
    #[command(flatten)]
    work: WorkArgs,
}

/// The child: a Vm with the budget, the pool above the swap file, the workload
/// through the API; reports its peak RSS and the pool's peak.
pub fn child_main(a: ChildArgs) -> i32 {
    match child(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn child(a: ChildArgs) -> Result<(), String> {
    let len = (a.work.spec().pages as usize)
        .checked_mul(PAGE_SIZE)
        .ok_or("working set too large")?;
    let mut cfg = Config::default().memory_budget(a.budget as usize);
    if let Some(n) = a.io_threads {
        cfg = cfg.io_threads(n as usize);
    }
    let vm = Vm::new(cfg).map_err(|e| format!("Vm::new: {e}"))?;
    let zspec = SwapSpec::parse(&a.zpool).map_err(|e| format!("{}: {e}", a.zpool))?;
    vm.swapon(zspec)
        .map_err(|e| format!("swapon {}: {e}", a.zpool))?;
    vm.swapon(SwapSpec::file(&a.swap_file, a.swap_size))
        .map_err(|e| format!("swapon of the file: {e}"))?;
    let mm = vm.new_space();
    let r = mm.map_anon(len).map_err(|e| format!("map_anon: {e}"))?;
    let target = UsermmTarget {
        mm,
        base: r.start(),
    };
    let pool_now = || {
        vm.swaps()
            .iter()
            .filter(|d| d.name.starts_with("zpool:"))
            .map(|d| d.memory)
            .sum::<u64>()
    };
    let peak = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let snap = || bench_child::vm_snap(&vm);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(pool_now(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let r = bench_child::run_and_report(&target, &a.work, &snap, &|| {
            Some(peak.load(Ordering::Relaxed).max(pool_now()))
        });
        stop.store(true, Ordering::Relaxed);
        r
    })?;
    let s = vm.stats();
    if s.write_errors + s.read_errors + s.zpool_writeback_errors > 0 {
        return Err(format!(
            "engine reported {} write, {} read and {} pool write-back errors",
            s.write_errors, s.read_errors, s.zpool_writeback_errors
        ));
    }
    Ok(())
}
