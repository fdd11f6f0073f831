//! The child processes of `usermm bench` that run the access sequence through plain
//! pointers: the kernel column's (anonymous memory in a memory cgroup, see
//! `kernel`) and the transparent column's (a `Vm::map_transparent` region, see
//! `transparent`). Both run `driver::drive` on a `RawTarget`, so "the access
//! sequence through pointers" has one implementation, then check a sample of pages
//! (`verify`) and print one line of JSON on stdout.
//!
//! A process of its own keeps what would end the bench out of it: an OOM kill in the
//! cgroup, or the SIGBUS a transparent fault delivers when it cannot be served.
//! The parent side (`run`) kills the child on Ctrl-C or when it overruns.

use super::util::{self, Undo};
use super::verify::{self, Verified};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use usermm_testkit::driver::{self as access, Content, Snap, Target, WorkSpec};
use usermm_testkit::workload::Pattern;

/// Exit status of a child that could not set up its memory at all (the column is
/// unavailable on this machine, e.g. no userfaultfd), as opposed to one that failed.
pub const EXIT_UNAVAILABLE: i32 = 3;

/// Pages whose contents a child checks after the timed phase (fewer if the working
/// set is smaller): enough to catch a systematic error, few enough (a swap-in each
/// at most) to cost milliseconds.
pub const VERIFY_PAGES: u64 = 256;

/// A pattern as text that `Pattern::parse` reads back exactly.
pub fn pattern_arg(p: &Pattern) -> String {
    match p {
        Pattern::Uniform => "uniform".into(),
        Pattern::HotCold { hot_frac, hot_prob } => format!("hotcold:{hot_frac}:{hot_prob}"),
        Pattern::Zipf { theta } => format!("zipf:{theta}"),
    }
}

/// The workload of a child: the cell's `WorkSpec` and phases, as flags.
#[derive(clap::Args, Debug)]
pub struct WorkArgs {
    #[arg(long)]
    pages: u64,
    #[arg(long, value_parser = util::parse_pattern)]
    pattern: Pattern,
    #[arg(long, value_parser = util::parse_ratio)]
    write_ratio: f64,
    #[arg(long)]
    threads: u32,
    #[arg(long, value_parser = util::parse_words)]
    words: u32,
    #[arg(long)]
    seed: u64,
    #[arg(long)]
    warmup_ms: u64,
    #[arg(long, default_value_t = u64::MAX)]
    warmup_accesses: u64,
    #[arg(long)]
    timed_ms: u64,
    /// Pages to check after the timed phase (0: none).
    #[arg(long, default_value_t = 0)]
    verify_pages: u64,
    /// Page contents (`Content::parse`).
    #[arg(long, default_value = "incompressible", value_parser = Content::parse)]
    content: Content,
}

impl WorkArgs {
    /// The cell's workload.
    pub fn spec(&self) -> WorkSpec {
        WorkSpec {
            pages: self.pages,
            pattern: self.pattern,
            write_ratio: self.write_ratio,
            threads: self.threads,
            words: self.words,
            seed: self.seed,
            warm_accesses: self.warmup_accesses,
            content: self.content,
        }
    }

    /// The flags that give `spec` and the phases to a child.
    fn to_flags(spec: &WorkSpec, warmup: Duration, timed: Duration) -> Vec<String> {
        [
            ("--pages", spec.pages.to_string()),
            ("--pattern", pattern_arg(&spec.pattern)),
            ("--write-ratio", spec.write_ratio.to_string()),
            ("--threads", spec.threads.to_string()),
            ("--words", spec.words.to_string()),
            ("--seed", spec.seed.to_string()),
            ("--warmup-ms", warmup.as_millis().to_string()),
            ("--warmup-accesses", spec.warm_accesses.to_string()),
            ("--timed-ms", timed.as_millis().to_string()),
            ("--verify-pages", VERIFY_PAGES.to_string()),
            ("--content", spec.content.name().to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }
}

/// What a child prints (one line of JSON).
#[derive(Serialize, Deserialize, Debug)]
struct ChildReport {
    accesses: u64,
    secs: f64,
    fill_secs: f64,
    major_faults: u64,
    device_reads: u64,
    device_writes: u64,
    warm_accesses: u64,
    /// Stall time of the timed phase (usermm's pressure; absent from older children).
    #[serde(default)]
    stall_some_us: u64,
    #[serde(default)]
    stall_full_us: u64,
    /// Histogram buckets (index, count) with a non-zero count.
    hist: Vec<(u32, u64)>,
    verified: Verified,
    /// The child's memory (absent from older children).
    #[serde(default)]
    mem: ChildMem,
}

/// The memory a child used: its peak resident set, and the most its compressed
/// pool held (usermm's zpool; the kernel's pools are read by the parent).
#[derive(Serialize, Deserialize, Debug, Default, Clone, Copy)]
pub struct ChildMem {
    /// VmHWM of the child at the end: every page it ever had resident at once,
    /// heap, stacks and (for usermm) the budget's frames, the pool's included.
    pub peak_rss_bytes: Option<u64>,
    /// Peak bytes of budget frames a zpool held (sampled).
    pub pool_bytes: Option<u64>,
}

/// In the child: the fill, warm-up and timed phase on `target`, then the content
/// check; prints the report on stdout with the peak RSS and what `pool` says the
/// compressed pool held at most (`None`: no pool of ours).
pub fn run_and_report<T: Target>(
    target: &T,
    a: &WorkArgs,
    snap: &(dyn Fn() -> Snap + Sync),
    pool: &dyn Fn() -> Option<u64>,
) -> Result<(), String> {
    let spec = a.spec();
    let m = access::drive(
        target,
        &spec,
        Duration::from_millis(a.warmup_ms),
        Duration::from_millis(a.timed_ms),
        snap,
    )?;
    let pages = verify::sample_pages(&spec, a.verify_pages);
    let verified = verify::check(target, &spec, &m, &pages);
    let r = ChildReport {
        accesses: m.accesses,
        secs: m.secs,
        fill_secs: m.fill_secs,
        major_faults: m.major_faults,
        device_reads: m.device_reads,
        device_writes: m.device_writes,
        warm_accesses: m.warm_accesses,
        stall_some_us: m.stall_some_us,
        stall_full_us: m.stall_full_us,
        hist: m.hist.buckets(),
        verified,
        mem: ChildMem {
            peak_rss_bytes: util::peak_rss(),
            pool_bytes: pool(),
        },
    };
    println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
    std::hint::black_box(m.sink);
    Ok(())
}

/// In the parent: runs `usermm <subcommand> <extra> <the cell's flags>` and reads
/// its report. `what` names the column in messages. A child that exits with
/// [`EXIT_UNAVAILABLE`] gives `Err("unavailable: <its stderr>")`.
pub fn run(
    subcommand: &str,
    extra: &[String],
    what: &str,
    spec: &WorkSpec,
    warmup: Duration,
    timed: Duration,
) -> Result<(access::Measured, Verified), String> {
    run_watched(subcommand, extra, what, spec, warmup, timed, &mut || {}).map(|(m, v, _)| (m, v))
}

/// `run`, calling `watch` every 10 ms while the child runs (to sample what the
/// parent can see of it, e.g. a kernel pool), and returning the child's memory too.
pub fn run_watched(
    subcommand: &str,
    extra: &[String],
    what: &str,
    spec: &WorkSpec,
    warmup: Duration,
    timed: Duration,
    watch: &mut dyn FnMut(),
) -> Result<(access::Measured, Verified, ChildMem), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find our own binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg(subcommand)
        .args(extra)
        .args(WorkArgs::to_flags(spec, warmup, timed))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the {what} child: {e}"))?;
    let kill = util::register(Undo::Kill(child.id() as i32));
    // Drain both pipes while waiting, so a chatty child never blocks on a full pipe.
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out_pipe.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err_pipe.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    // Generous: the fill of the working set through swap plus the phases.
    let limit = Instant::now() + warmup + timed + Duration::from_secs(120);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) => {}
            Err(e) => break Err(format!("waiting for the {what} child: {e}")),
        }
        watch();
        if util::interrupted() || Instant::now() > limit {
            let _ = child.kill();
            let _ = child.wait();
            kill.forget();
            return Err(if util::interrupted() {
                "interrupted".into()
            } else {
                format!("the {what} child did not finish in time (killed)")
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    kill.forget();
    let status = status?;
    let out = out_t.join().unwrap_or_default();
    let err = err_t.join().unwrap_or_default();
    let err = err.trim();
    if status.code() == Some(EXIT_UNAVAILABLE) {
        return Err(format!("unavailable: {err}"));
    }
    if !status.success() {
        use std::os::unix::process::ExitStatusExt;
        let why = match status.signal() {
            Some(9) => "killed by SIGKILL".to_string(),
            Some(7) => "killed by SIGBUS".to_string(),
            Some(s) => format!("killed by signal {s}"),
            None => format!("exited with {status}"),
        };
        return Err(if err.is_empty() {
            format!("{what} child {why}")
        } else {
            format!("{what} child {why}: {err}")
        });
    }
    let r: ChildReport = serde_json::from_str(out.trim())
        .map_err(|e| format!("unreadable report from the {what} child ({e}): {out:?} {err:?}"))?;
    let mut m = access::Measured {
        accesses: r.accesses,
        secs: r.secs,
        fill_secs: r.fill_secs,
        major_faults: r.major_faults,
        device_reads: r.device_reads,
        device_writes: r.device_writes,
        warm_accesses: r.warm_accesses,
        stall_some_us: r.stall_some_us,
        stall_full_us: r.stall_full_us,
        ..Default::default()
    };
    m.hist = access::LatHist::from_buckets(&r.hist);
    // A content error is the column's error, with what was measured.
    r.verified
        .result()
        .map_err(|e| format!("{}/s measured, but {e}", util::fmt_num(m.rate())))?;
    Ok((m, r.verified, r.mem))
}
