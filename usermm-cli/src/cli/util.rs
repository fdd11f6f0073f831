//! Helpers shared by the subcommands: flag parsers, number formatting, a progress
//! display that also works without a terminal, Ctrl-C handling and a registry of
//! things to undo (temporary files, kernel swap, cgroups, child processes) that the
//! Ctrl-C handler can run if the user insists.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use usermm::SwapSpec;
use usermm_testkit::workload::Pattern;

// ---------------------------------------------------------------- flag parsers

/// A byte size such as `64M`, `1G`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    usermm::config::parse_size(s)
}

/// A memory budget: a size of at least 64 KiB (16 pages).
pub fn parse_budget(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    let min = (usermm::config::MIN_BUDGET_FRAMES * usermm::PAGE_SIZE) as u64;
    if v < min {
        return Err(format!(
            "a budget of {s} is below the minimum of 64K ({} pages)",
            usermm::config::MIN_BUDGET_FRAMES
        ));
    }
    if usize::try_from(v).is_err() {
        return Err(format!("a budget of {s} does not fit in memory"));
    }
    Ok(v)
}

/// A working set: a non-zero size.
pub fn parse_working_set(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if v == 0 {
        return Err("the working set must be at least one byte (e.g. 256M)".into());
    }
    if v > (1u64 << 46) {
        return Err(format!("a working set of {s} is above the 64 TiB limit"));
    }
    Ok(v)
}

/// A duration: `10s`, `2m`, `500ms`, `1.5s`, `1h`, or plain seconds (`10`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("duration {s:?} is not a number with an optional unit (us, ms, s, m, h)")
    })?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => {
            return Err(format!(
                "duration {s:?} has an unknown unit {u:?} (us, ms, s, m, h)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1e7).contains(&secs) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A fraction in `0..=1`.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number between 0 and 1"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s} is not between 0 and 1"));
    }
    Ok(v)
}

/// An access pattern: `uniform`, `hotcold`, `zipf` (with optional parameters).
pub fn parse_pattern(s: &str) -> Result<Pattern, String> {
    Pattern::parse(s.trim())
}

/// A swap device spec.
pub fn parse_swap(s: &str) -> Result<SwapSpec, String> {
    SwapSpec::parse(s).map_err(|e| e.to_string())
}

/// Words touched per access: 1 ..= 511 (a page has 512 words; one is kept for the
/// verification header).
pub fn parse_words(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if !(1..=511).contains(&v) {
        return Err(format!(
            "words per access must be between 1 and 511, not {v}"
        ));
    }
    Ok(v)
}

/// A seed taken from the clock, for runs without `--seed`.
pub fn time_seed() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // Keep it short enough to type back in.
    (d.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)) % 1_000_000_000
}

// ---------------------------------------------------------------- formatting

/// `1234567.0` → `1.23M`.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// A count with thousands separators.
pub fn fmt_count(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes as MiB/GiB.
pub fn fmt_bytes(v: u64) -> String {
    let v = v as f64;
    if v >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", v / (1u64 << 30) as f64)
    } else if v >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", v / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", v / 1024.0)
    }
}

/// A duration as `1.23 s` / `450 ms`.
pub fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

/// The process's peak resident set (VmHWM) in bytes, if readable.
pub fn peak_rss() -> Option<u64> {
    proc_status_kb("VmHWM:")
}

fn proc_status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

// ---------------------------------------------------------------- progress

/// Whether stderr is a terminal (progress bars) or not (plain progress lines).
pub fn stderr_is_tty() -> bool {
    std::io::stderr().is_terminal()
}

/// A progress display: an indicatif bar on a terminal, and otherwise a plain line
/// on stderr every few seconds.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    tty: bool,
    last_plain: Instant,
    every: Duration,
}

impl Progress {
    /// A bar of `len` steps, labelled `prefix`.
    pub fn new(len: u64, prefix: &str) -> Progress {
        let tty = stderr_is_tty();
        let target = if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        bar.set_prefix(prefix.to_string());
        let p = Progress {
            bar,
            tty,
            last_plain: Instant::now(),
            every: Duration::from_secs(3),
        };
        p.style(false);
        p
    }

    fn style(&self, time: bool) {
        // `wide_msg` takes what is left of the line and is cut to fit, so the bar
        // never wraps.
        let t = if time {
            "{prefix:>8.bold} [{elapsed_precise}] [{bar:24.cyan/blue}] {percent:>3}% {wide_msg}"
        } else {
            "{prefix:>8.bold} [{elapsed_precise}] [{bar:24.cyan/blue}] {pos}/{len} {wide_msg}"
        };
        self.bar.set_style(
            ProgressStyle::with_template(t)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
    }

    /// Changes the bar: new length (steps, or milliseconds when `time`), label and
    /// position 0.
    pub fn reset(&mut self, len: u64, prefix: &str, time: bool) {
        self.bar.set_message("");
        self.bar.set_position(0);
        self.style(time);
        self.bar.set_length(len);
        self.bar.set_prefix(prefix.to_string());
        self.bar.reset_elapsed();
        self.last_plain = Instant::now();
    }

    /// Updates position and message; without a terminal prints `plain()` every few
    /// seconds.
    pub fn update(&mut self, pos: u64, msg: &str, plain: impl FnOnce() -> String) {
        self.bar.set_position(pos);
        self.bar.set_message(msg.to_string());
        if !self.tty && self.last_plain.elapsed() >= self.every {
            self.last_plain = Instant::now();
            eprintln!("{}", plain());
        }
    }

    /// Updates position and message only.
    pub fn set(&self, pos: u64, msg: &str) {
        self.bar.set_position(pos);
        self.bar.set_message(msg.to_string());
    }

    /// Prints a line above the bar (or plainly).
    pub fn println(&self, s: &str) {
        if self.tty {
            self.bar.suspend(|| eprintln!("{s}"));
        } else {
            eprintln!("{s}");
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

// ---------------------------------------------------------------- Ctrl-C

static SIGNALS: AtomicUsize = AtomicUsize::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler (once): the first Ctrl-C asks the command to stop
/// and clean up; the second undoes everything registered and exits with 130. Also
/// gives the test kit's workload driver the same notion of "interrupted".
pub fn install_ctrlc() {
    // The workload driver stops on Ctrl-C, and cleans up before a stuck run exits.
    usermm_testkit::driver::set_hooks(usermm_testkit::driver::Hooks {
        interrupted,
        before_exit: run_all_undo_now,
    });
    let _ = ctrlc::set_handler(|| {
        let n = SIGNALS.fetch_add(1, Ordering::SeqCst) + 1;
        INTERRUPTED.store(true, Ordering::SeqCst);
        if n == 1 {
            eprintln!("\ninterrupted: stopping and cleaning up (Ctrl-C again to quit at once)");
        } else {
            eprintln!("\ninterrupted again: cleaning up and exiting");
            run_all_undo_now();
            std::process::exit(130);
        }
    });
}

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------- undo registry

/// Something to undo at exit.
#[derive(Debug, Clone)]
pub enum Undo {
    /// Delete a file we created.
    RemoveFile(PathBuf),
    /// `swapoff` a swap file we enabled (exactly this path).
    Swapoff(PathBuf),
    /// Kill a child process we started.
    Kill(i32),
    /// Remove a cgroup directory we created.
    RemoveCgroup(PathBuf),
    /// Write a value back into a kernel parameter file we changed (e.g. zswap's
    /// `enabled` and `compressor`): the path and the value it had.
    Restore(PathBuf, String),
    /// Reset a zram device we set up (`/sys/block/zramN`; after its swapoff).
    ResetZram(PathBuf),
    /// Unmount a file system we mounted (debugfs).
    Unmount(PathBuf),
    /// Unload a kernel module we loaded (`modprobe -r`).
    Unload(String),
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static UNDO: Mutex<Vec<(u64, Undo)>> = Mutex::new(Vec::new());

/// A registered undo action. Dropping the token does nothing by itself; call
/// [`Registered::run`] to perform the action now (once, whoever comes first: the
/// owner or the Ctrl-C handler) or [`Registered::forget`] when it is no longer needed.
#[derive(Debug)]
pub struct Registered(u64);

/// Registers an action to run if the process must exit early.
pub fn register(u: Undo) -> Registered {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    UNDO.lock().unwrap_or_else(|e| e.into_inner()).push((id, u));
    Registered(id)
}

impl Registered {
    fn take(&self) -> Option<Undo> {
        let mut v = UNDO.lock().unwrap_or_else(|e| e.into_inner());
        let i = v.iter().position(|(id, _)| *id == self.0)?;
        Some(v.remove(i).1)
    }
    /// Performs the action (if the Ctrl-C handler has not already).
    pub fn run(&self) -> Result<(), String> {
        match self.take() {
            Some(u) => perform(&u),
            None => Ok(()),
        }
    }
    /// Drops the action without performing it.
    pub fn forget(&self) {
        let _ = self.take();
    }
}

/// Performs every registered undo action now (last registered first).
pub fn run_all_undo_now() {
    let all: Vec<(u64, Undo)> = {
        let mut v = UNDO.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *v)
    };
    for (_, u) in all.iter().rev() {
        if let Err(e) = perform(u) {
            eprintln!("cleanup: {e}");
        }
    }
}

fn perform(u: &Undo) -> Result<(), String> {
    match u {
        Undo::RemoveFile(p) => match std::fs::remove_file(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove {}: {e}", p.display())),
        },
        Undo::Swapoff(p) => super::sys::swapoff(p),
        Undo::Kill(pid) => {
            // SAFETY: plain syscall; `pid` is a child we started and have not reaped.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
            Ok(())
        }
        Undo::RemoveCgroup(p) => super::sys::remove_cgroup(p),
        Undo::Restore(p, v) => super::sys::write_param(p, v),
        Undo::ResetZram(p) => super::sys::write_param(&p.join("reset"), "1"),
        Undo::Unmount(p) => super::sys::umount(p),
        Undo::Unload(m) => super::sys::modprobe(&["-r", m]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "s", "5x", "-1s", "1e400", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_and_ratios() {
        assert!(parse_budget("32K").is_err());
        assert_eq!(parse_budget("64K").unwrap(), 65536);
        assert!(parse_working_set("0").is_err());
        assert!(parse_ratio("1.5").is_err());
        assert!(parse_ratio("-0.1").is_err());
        assert_eq!(parse_ratio("0.5").unwrap(), 0.5);
        assert!(parse_words("0").is_err() && parse_words("512").is_err());
        assert!(parse_pattern("nope").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_count(1234567), "1,234,567");
        assert_eq!(fmt_count(12), "12");
        assert_eq!(fmt_num(1_500_000.0), "1.50M");
        assert_eq!(fmt_num(12_345.0), "12.3k");
    }
}
