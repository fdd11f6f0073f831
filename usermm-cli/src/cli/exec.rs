//! `usermm exec [--budget SIZE] [--swap SPEC]... -- PROGRAM [ARGS]`: runs an
//! unmodified, dynamically linked program with its heap (the malloc family) in
//! transparent memory inside a hard budget, through the LD_PRELOAD library built
//! beside this binary (`libusermm_preload.so`, see usermm-preload).
//!
//! Before it execs the program it refuses, with a message that says why: a program
//! it cannot find; a statically linked one (LD_PRELOAD cannot reach its heap); a
//! setuid/setgid one (the loader ignores LD_PRELOAD for it); a budget larger than
//! the machine's memory or this process's memory cgroup limit; and a process that
//! may not open /dev/userfaultfd (with the commands that grant it). Then it replaces
//! itself with the program: the exit status and the output are the program's own.
//! Without `--swap`, the library makes a temporary swap file on disk (not on a
//! tmpfs), sparse, 0600, unlinked at once.

use super::util::parse_budget;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// Arguments of `usermm exec`.
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Memory budget of the program's heap (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_parser = parse_budget)]
    pub budget: u64,
    /// Swap device specs (repeatable); default: a temporary swap file on disk.
    #[arg(long = "swap")]
    pub swap: Vec<String>,
    /// Virtual size of the heap region (its swap file is this size, sparse).
    #[arg(long, default_value = "64G", value_parser = parse_budget)]
    pub heap: u64,
    /// Print the heap's counters (faults, page I/O, reclaim) on stderr when the
    /// program exits.
    #[arg(long)]
    pub stats: bool,
    /// How long the fault handler's read of a swap file watches for its completion
    /// before it sleeps (0: at once) [default: the library's, 200us].
    #[arg(long, value_name = "TIME", value_parser = super::util::parse_duration)]
    pub read_poll: Option<std::time::Duration>,
    /// The program and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

fn find_program(p: &str) -> Option<PathBuf> {
    if p.contains('/') {
        return Some(PathBuf::from(p)).filter(|x| x.is_file());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(p))
        .find(|x| x.is_file())
}

/// Whether an ELF file asks for a program interpreter (is dynamically linked).
fn is_dynamic(path: &Path) -> Result<bool, String> {
    let b = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        // A script: its interpreter is the program that runs; `#!` lines are
        // followed by the kernel, so look at the interpreter instead.
        if b.starts_with(b"#!") {
            let line = b[2..].split(|&c| c == b'\n').next().unwrap_or(&[]);
            let interp = String::from_utf8_lossy(line);
            let first = interp.split_whitespace().next().unwrap_or("");
            return is_dynamic(Path::new(first));
        }
        return Err(format!("{} is not an ELF program", path.display()));
    }
    if b[4] != 2 || b[5] != 1 {
        return Err(format!(
            "{} is not a 64-bit little-endian ELF program",
            path.display()
        ));
    }
    let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64at(0x20), u16at(0x36), u16at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > b.len() {
            break;
        }
        if u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) == 3 {
            return Ok(true); // PT_INTERP
        }
    }
    Ok(false)
}

/// The memory this process may use: the machine's, or its memory cgroup's limit.
fn memory_limit() -> Option<(u64, String)> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|k| k << 10)?;
    let mut best = (total, "the machine's memory".to_string());
    if let Ok(cg) = std::fs::read_to_string("/proc/self/cgroup") {
        for l in cg.lines() {
            let mut it = l.splitn(3, ':');
            let (_, ctrl, path) = (it.next(), it.next().unwrap_or(""), it.next().unwrap_or(""));
            let file = if ctrl.is_empty() {
                format!("/sys/fs/cgroup{path}/memory.max")
            } else if ctrl.split(',').any(|c| c == "memory") {
                format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
            } else {
                continue;
            };
            if let Some(v) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                if v < best.0 {
                    best = (v, format!("the memory cgroup limit ({file})"));
                }
            }
        }
    }
    Some(best)
}

fn preload_library() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for cand in [
        dir.join("libusermm_preload.so"),
        dir.join("../libusermm_preload.so"),
    ] {
        if cand.is_file() {
            return cand.canonicalize().map_err(|e| e.to_string());
        }
    }
    Err(format!(
        "libusermm_preload.so is not next to {} (build it with `cargo build --release`)",
        exe.display()
    ))
}

fn swap_dir() -> PathBuf {
    let tmp = std::env::var_os("TMPDIR").map_or(PathBuf::from("/tmp"), PathBuf::from);
    if super::run::on_tmpfs(&tmp) {
        PathBuf::from("/var/tmp")
    } else {
        tmp
    }
}

fn check(a: &ExecArgs) -> Result<(PathBuf, PathBuf), String> {
    let prog = &a.command[0];
    let path = find_program(prog).ok_or_else(|| format!("{prog}: program not found"))?;
    let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o6000 != 0 {
            return Err(format!(
                "{} is setuid/setgid: the loader ignores LD_PRELOAD for it, so its heap \
                 cannot be put in a budget",
                path.display()
            ));
        }
    }
    if !is_dynamic(&path)? {
        return Err(format!(
            "{} is statically linked: LD_PRELOAD cannot reach its heap",
            path.display()
        ));
    }
    if let Some((limit, what)) = memory_limit() {
        if a.budget > limit {
            return Err(format!(
                "a budget of {} MiB is more than this process may use: {} is {} MiB",
                a.budget >> 20,
                what,
                limit >> 20
            ));
        }
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        return Err(format!(
            "cannot open /dev/userfaultfd ({e}): transparent memory needs it to serve \
             faults taken inside system calls. Grant it once (as root): groupadd -f \
             userfaultfd; echo 'KERNEL==\"userfaultfd\", GROUP=\"userfaultfd\", \
             MODE=\"0660\"' > /etc/udev/rules.d/60-userfaultfd.rules; udevadm control \
             --reload; udevadm trigger --name-match=userfaultfd; usermod -aG userfaultfd \
             $USER (see the README, \"Transparent memory\")"
        ));
    }
    for s in &a.swap {
        usermm::SwapSpec::parse(s).map_err(|e| e.to_string())?;
    }
    Ok((path, preload_library()?))
}

/// Runs `usermm exec`; returns only on failure (the exit code).
pub fn main(a: ExecArgs) -> i32 {
    let (path, lib) = match check(&a) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("usermm exec: {e}");
            return 126;
        }
    };
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", lib.display()),
        _ => lib.display().to_string(),
    };
    let err = std::process::Command::new(&path)
        .arg0(&a.command[0])
        .args(&a.command[1..])
        .env("LD_PRELOAD", preload)
        .env("USERMM_BUDGET", a.budget.to_string())
        .env("USERMM_HEAP", a.heap.to_string())
        .env("USERMM_SWAP", a.swap.join("\n"))
        .env("USERMM_SWAP_DIR", swap_dir())
        .env("USERMM_STATS", if a.stats { "1" } else { "" })
        .env(
            "USERMM_READ_POLL_US",
            a.read_poll
                .map_or(String::new(), |d| d.as_micros().to_string()),
        )
        .exec();
    eprintln!("usermm exec: cannot run {}: {err}", path.display());
    127
}
