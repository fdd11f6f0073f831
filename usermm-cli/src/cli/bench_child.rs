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

/// A Vm's counters for the driver (the usermm system in this process, and the
/// transparent and zpool children).
pub fn vm_snap(vm: &usermm::Vm) -> Snap {
    let s = vm.stats();
    let p = vm.pressure();
    Snap {
        major_faults: s.pgmajfault,
        reads: s.pswpin,
        writes: s.pswpout,
        stall_some_us: p.total_some.as_micros() as u64,
        stall_full_us: p.total_full.as_micros() as u64,
    }
}

/// A pattern as text that `Pattern::parse` reads back exactly.
pub fn pattern_arg(p: &Pattern) -> String {
    match p {
        Pattern::Uniform => "uniform".into(),
        Pattern::HotCold { hot_frac, hot_prob } => format!("hotcold:{hot_frac}:{hot_prob}"),
        Pattern::Zipf { theta } => format!("zipf:{theta}"),
        Pattern::Seq { stride } => format!("seq:{stride}"),
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
    /// A session (see [`Session`]): after the fill and the warm-up, print a ready
    /// line and run one timed phase per `run` line read on stdin until `end`.
    #[arg(long)]
    session: bool,
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
/// compressed pool held at most (`None`: no pool of ours). With `--session`, the
/// session protocol instead (`session_child`).
pub fn run_and_report<T: Target>(
    target: &T,
    a: &WorkArgs,
    snap: &(dyn Fn() -> Snap + Sync),
    pool: &dyn Fn() -> Option<u64>,
) -> Result<(), String> {
    if a.session {
        return session_child(target, a, snap, pool);
    }
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

/// How long past its phases the parent waits for a child before killing it:
/// `USERMM_BENCH_CHILD_TIMEOUT_S` seconds, 120 unless set.
fn child_timeout() -> Duration {
    let s = std::env::var("USERMM_BENCH_CHILD_TIMEOUT_S")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(120);
    Duration::from_secs(s)
}

/// Before a child that overran is killed: writes its threads' stacks to
/// `/tmp/hang-stacks-<pid>.txt` (user stacks from `gdb -batch` when it is
/// installed, and each thread's kernel stack, wchan and state from `/proc`) and
/// prints the path, so a hang leaves evidence.
fn dump_stacks(pid: u32, what: &str) {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "# {what} child {pid}: did not answer in time");
    let tasks = format!("/proc/{pid}/task");
    let mut tids: Vec<u32> = std::fs::read_dir(&tasks)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable();
    for tid in tids {
        let f = |n: &str| std::fs::read_to_string(format!("{tasks}/{tid}/{n}")).unwrap_or_default();
        let state = f("status")
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or("")
            .to_string();
        let _ = writeln!(
            out,
            "\n## task {tid} comm={} wchan={} {state}\n{}",
            f("comm").trim(),
            f("wchan").trim(),
            f("stack")
        );
    }
    let path = format!("/tmp/hang-stacks-{pid}.txt");
    let _ = writeln!(out, "\n# gdb -p {pid} -batch -ex 'thread apply all bt'");
    let file = match std::fs::write(&path, out)
        .and_then(|()| std::fs::OpenOptions::new().append(true).open(&path))
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot write {path}: {e}");
            return;
        }
    };
    // gdb writes straight into the file; given a minute at most (a stuck attach
    // must not keep the bench from killing the child).
    let gdb = file.try_clone().and_then(|err| {
        Command::new("gdb")
            .args(["-p", &pid.to_string(), "-batch", "-nx"])
            .args(["-ex", "set pagination off", "-ex", "thread apply all bt"])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
    });
    match gdb {
        Ok(mut g) => {
            let end = Instant::now() + Duration::from_secs(60);
            while matches!(g.try_wait(), Ok(None)) {
                if Instant::now() > end {
                    let _ = g.kill();
                    let _ = g.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Err(e) => {
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .and_then(|mut f| {
                    use std::io::Write as _;
                    writeln!(f, "gdb not run: {e}")
                });
        }
    }
    eprintln!("the {what} child's stacks: {path}");
}

/// In the parent: runs `usermm <subcommand> <extra> <the cell's flags>` and reads
/// its report, calling `watch` every 10 ms while the child runs (to sample what the
/// parent can see of it, e.g. a kernel pool). `what` names the column in messages.
/// A child that exits with [`EXIT_UNAVAILABLE`] gives `Err("unavailable: <its stderr>")`.
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
    let limit = Instant::now() + warmup + timed + child_timeout();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) => {}
            Err(e) => break Err(format!("waiting for the {what} child: {e}")),
        }
        watch();
        if util::interrupted() || Instant::now() > limit {
            if !util::interrupted() {
                dump_stacks(child.id(), what);
            }
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
    let m = measured_of(&r);
    // A content error is the column's error, with what was measured.
    r.verified
        .result()
        .map_err(|e| format!("{}/s measured, but {e}", util::fmt_num(m.rate())))?;
    Ok((m, r.verified, r.mem))
}

// ------------------------------------------------------------------ sessions

/// The child's first line in a session: the fill and the warm-up are done.
#[derive(Serialize, Deserialize, Debug)]
struct Ready {
    fill_secs: f64,
    warm_accesses: u64,
    warm_secs: f64,
}

/// The child's last line in a session: the content check after the last timed
/// phase, and its memory.
#[derive(Serialize, Deserialize, Debug)]
struct End {
    verified: Verified,
    mem: ChildMem,
}

/// The child side of a session: fill, the warm-up (`--warmup-accesses`, capped at
/// `--warmup-ms`), a `Ready` line; then per line `run WARM_MS WARM_ACCESSES TIMED_MS`
/// on stdin a re-warm and a timed phase continuing the same access sequence (a
/// `ChildReport` line, its `verified` empty), until `end`: the content check of the
/// whole sequence and an `End` line.
fn session_child<T: Target>(
    target: &T,
    a: &WorkArgs,
    snap: &(dyn Fn() -> Snap + Sync),
    pool: &dyn Fn() -> Option<u64>,
) -> Result<(), String> {
    let spec = a.spec();
    let f0 = Instant::now();
    access::fill(target, &spec)?;
    let fill_secs = f0.elapsed().as_secs_f64();
    let mut stream = access::Stream::new(&spec);
    let w0 = Instant::now();
    let w = access::measure_stream(
        target,
        &spec,
        &mut stream,
        Duration::from_millis(a.warmup_ms),
        Duration::ZERO,
        snap,
    )?;
    line(&Ready {
        fill_secs,
        warm_accesses: w.warm_accesses,
        warm_secs: w0.elapsed().as_secs_f64(),
    });
    let mut last: Option<access::Measured> = None;
    for l in std::io::stdin().lines() {
        let l = l.map_err(|e| format!("reading the session's stdin: {e}"))?;
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["run", wm, wa, tm] => {
                let num = |x: &str| {
                    x.parse::<u64>()
                        .map_err(|_| format!("bad session line {l:?}"))
                };
                let mut sp = spec;
                sp.warm_accesses = num(wa)?;
                let m = access::measure_stream(
                    target,
                    &sp,
                    &mut stream,
                    Duration::from_millis(num(wm)?),
                    Duration::from_millis(num(tm)?),
                    snap,
                )?;
                line(&report_of(&m, Verified::default(), ChildMem::default()));
                std::hint::black_box(m.sink);
                last = Some(m);
            }
            ["end"] => break,
            _ => return Err(format!("bad session line {l:?}")),
        }
    }
    let verified = match &last {
        Some(m) => {
            let pages = verify::sample_pages(&spec, a.verify_pages);
            verify::check(target, &spec, m, &pages)
        }
        None => Verified::default(),
    };
    line(&End {
        verified,
        mem: ChildMem {
            peak_rss_bytes: util::peak_rss(),
            pool_bytes: pool(),
        },
    });
    Ok(())
}

/// Prints one message of a session as a line of JSON on stdout.
fn line<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    );
}

fn report_of(m: &access::Measured, verified: Verified, mem: ChildMem) -> ChildReport {
    ChildReport {
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
        mem,
    }
}

fn measured_of(r: &ChildReport) -> access::Measured {
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
    m
}

/// What a session's set-up did: the fill and the first warm-up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Setup {
    /// Seconds of the fill.
    pub fill_secs: f64,
    /// Accesses of the first warm-up, and its seconds.
    pub warm_accesses: u64,
    pub warm_secs: f64,
}

/// A child kept alive across the repeats of a cell (`usermm bench --repeats`): it
/// fills and warms up once, then runs one timed phase per [`Session::round`], the
/// access sequence continuing from round to round, and checks its content at
/// [`Session::finish`]. Killed when dropped unfinished.
#[derive(Debug)]
pub struct Session {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    err_t: Option<std::thread::JoinHandle<String>>,
    kill: util::Registered,
    what: String,
}

impl Session {
    /// Starts `usermm <subcommand> <extra> <the cell's flags> --session` and waits
    /// for its fill and warm-up (`spec.warm_accesses` accesses, at most `warmup`).
    pub fn start(
        subcommand: &str,
        extra: &[String],
        what: &str,
        spec: &WorkSpec,
        warmup: Duration,
    ) -> Result<(Session, Setup), String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find our own binary: {e}"))?;
        let mut child = Command::new(exe)
            .arg(subcommand)
            .args(extra)
            .args(WorkArgs::to_flags(spec, warmup, Duration::ZERO))
            .arg("--session")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the {what} child: {e}"))?;
        let kill = util::register(Undo::Kill(child.id() as i32));
        let out = child.stdout.take();
        let mut err_pipe = child.stderr.take();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            if let Some(o) = out {
                for l in std::io::BufReader::new(o).lines() {
                    let Ok(l) = l else { break };
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            }
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = err_pipe.as_mut() {
                let _ = e.read_to_string(&mut s);
            }
            s
        });
        let mut s = Session {
            stdin: child.stdin.take(),
            child,
            lines,
            err_t: Some(err_t),
            kill,
            what: what.to_string(),
        };
        let l = s.line(warmup + child_timeout())?;
        let r: Ready = serde_json::from_str(&l)
            .map_err(|e| format!("unreadable ready line from the {what} child ({e}): {l:?}"))?;
        Ok((
            s,
            Setup {
                fill_secs: r.fill_secs,
                warm_accesses: r.warm_accesses,
                warm_secs: r.warm_secs,
            },
        ))
    }

    /// One re-warm (`warm_accesses`, at most `warmup`) and timed phase.
    pub fn round(
        &mut self,
        warmup: Duration,
        warm_accesses: u64,
        timed: Duration,
    ) -> Result<access::Measured, String> {
        self.send(&format!(
            "run {} {warm_accesses} {}",
            warmup.as_millis(),
            timed.as_millis()
        ))?;
        let l = self.line(warmup + timed + child_timeout())?;
        let r: ChildReport = serde_json::from_str(&l).map_err(|e| {
            format!(
                "unreadable report from the {} child ({e}): {l:?}",
                self.what
            )
        })?;
        Ok(measured_of(&r))
    }

    /// Ends the session: the content check of the sequence so far (an `Err` for a
    /// wrong word) and the child's memory.
    pub fn finish(mut self) -> Result<(Verified, ChildMem), String> {
        self.send("end")?;
        let l = self.line(child_timeout())?;
        let e: End = serde_json::from_str(&l).map_err(|e| {
            format!(
                "unreadable end line from the {} child ({e}): {l:?}",
                self.what
            )
        })?;
        self.stdin = None;
        let _ = self.child.wait();
        self.kill.forget();
        e.verified.result()?;
        Ok((e.verified, e.mem))
    }

    fn send(&mut self, l: &str) -> Result<(), String> {
        use std::io::Write;
        let r = match self.stdin.as_mut() {
            Some(i) => writeln!(i, "{l}").and_then(|()| i.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        r.map_err(|_| self.died())
    }

    /// The child's next line of stdout, within `limit`.
    fn line(&mut self, limit: Duration) -> Result<String, String> {
        let end = Instant::now() + limit;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(10)) {
                Ok(l) => return Ok(l),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(self.died()),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            if util::interrupted() {
                self.stop();
                return Err("interrupted".into());
            }
            if Instant::now() > end {
                dump_stacks(self.child.id(), &self.what);
                self.stop();
                return Err(format!(
                    "the {} child did not answer in time (killed)",
                    self.what
                ));
            }
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.kill.forget();
    }

    /// Why the child went away: its exit status and stderr.
    fn died(&mut self) -> String {
        self.stdin = None;
        let status = self.child.wait();
        self.kill.forget();
        let err = self
            .err_t
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let err = err.trim();
        let why = match status {
            Ok(st) => {
                use std::os::unix::process::ExitStatusExt;
                if st.code() == Some(EXIT_UNAVAILABLE) {
                    return format!("unavailable: {err}");
                }
                match st.signal() {
                    Some(9) => "killed by SIGKILL".to_string(),
                    Some(7) => "killed by SIGBUS".to_string(),
                    Some(s) => format!("killed by signal {s}"),
                    None => format!("exited with {st}"),
                }
            }
            Err(e) => format!("could not be waited for ({e})"),
        };
        if err.is_empty() {
            format!("{} child {why}", self.what)
        } else {
            format!("{} child {why}: {err}", self.what)
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Reaped already (finished, died or stopped): kill and wait do nothing.
        self.stop();
    }
}
