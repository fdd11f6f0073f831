//! The kernel-swap reference of `usermm bench`: a memory cgroup limited to the
//! budget, a swap file of our own enabled with `swapon(2)`, and a child process
//! (`usermm bench-kernel-child`, hidden) that runs the identical workload on
//! anonymous memory inside the cgroup (through `bench_child`, as the transparent
//! column's child does).
//!
//! Cleanup is unconditional: the child is killed, the cgroup removed, the swap file
//! turned off (only the exact file this process enabled) and deleted — on normal
//! exit, on error, on panic (Drop) and on Ctrl-C (the undo registry).

use super::bench_child::{self, ChildMem, WorkArgs};
use super::sys::cpath;
use super::util::{self, Registered, Undo};
use super::verify::Verified;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use usermm::PAGE_SIZE;
use usermm_testkit::driver::{self as access, RawTarget, Snap, WorkSpec};

#[derive(Debug)]
enum CgroupKind {
    V1,
    V2,
}

/// The kernel-swap setup: cgroup + swap file, torn down on drop.
#[derive(Debug)]
pub struct KernelSwap {
    swap_path: PathBuf,
    cgroup: PathBuf,
    kind: CgroupKind,
    budget: u64,
    undo_file: Registered,
    undo_swap: Registered,
    undo_cgroup: Registered,
    /// Other swap areas that were active before us (the kernel may also use them,
    /// but ours has the highest priority).
    pub others: Vec<String>,
    torn_down: bool,
}

fn write_file(p: &Path, v: &str) -> Result<(), String> {
    std::fs::write(p, v).map_err(|e| format!("cannot write {v:?} to {}: {e}", p.display()))
}

/// Writes a swap header (the format `mkswap` writes: version 1, last page, magic
/// `SWAPSPACE2` at the end of the first page).
pub fn write_swap_header(f: &File, pages: u64) -> Result<(), String> {
    let mut h = vec![0u8; PAGE_SIZE];
    h[1024..1028].copy_from_slice(&1u32.to_ne_bytes());
    let last = u32::try_from(pages - 1).map_err(|_| "swap file too large".to_string())?;
    h[1028..1032].copy_from_slice(&last.to_ne_bytes());
    // nr_badpages = 0; a UUID so tools show something sensible.
    let id = u64::from(std::process::id()) ^ util::time_seed().rotate_left(20);
    h[1036..1044].copy_from_slice(&id.to_ne_bytes());
    h[1052..1062].copy_from_slice(b"usermm-kbn");
    h[PAGE_SIZE - 10..].copy_from_slice(b"SWAPSPACE2");
    f.write_all_at(&h, 0)
        .map_err(|e| format!("cannot write the swap header: {e}"))?;
    f.sync_all()
        .map_err(|e| format!("cannot sync the swap file: {e}"))
}

/// `swapon(2)` of `path` at the highest priority, so the kernel uses it first even
/// if the machine has swap of its own. The caller has registered its swapoff.
pub fn swapon_top(path: &Path) -> Result<(), String> {
    let c = cpath(path)?;
    // SWAP_FLAG_PREFER | priority (linux/swap.h).
    const SWAP_FLAG_PREFER: libc::c_int = 0x8000;
    const SWAP_FLAG_PRIO_MASK: libc::c_int = 0x7fff;
    let flags = SWAP_FLAG_PREFER | (32767 & SWAP_FLAG_PRIO_MASK);
    // SAFETY: plain syscall with a valid C string.
    if unsafe { libc::swapon(c.as_ptr(), flags) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("swapon {}: {e}", path.display()));
    }
    Ok(())
}

/// One run of the workload in the cgroup, with what the kernel did to it.
#[derive(Debug)]
pub struct KernelRun {
    /// The measurement, or why there is none (an OOM kill among the reasons).
    pub result: Result<(access::Measured, Verified, ChildMem), String>,
    /// OOM kills in the cgroup during the run (not retried).
    pub oom_kills: u64,
    /// The cgroup's peak memory charge during the run, in bytes.
    pub peak_bytes: Option<u64>,
}

impl KernelSwap {
    /// Sets up the cgroup (limit `budget`) and a swap file of `swap_bytes` in `dir`.
    /// `Err` says why the kernel column cannot be filled.
    pub fn setup(dir: &Path, swap_bytes: u64, budget: u64) -> Result<KernelSwap, String> {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (swapon and a memory cgroup); run as root to fill it".into());
        }
        let kind = if std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .map(|s| s.split_whitespace().any(|c| c == "memory"))
            .unwrap_or(false)
        {
            CgroupKind::V2
        } else if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
            CgroupKind::V1
        } else {
            return Err("no memory cgroup controller (neither v2 nor v1 is mounted)".into());
        };
        let others: Vec<String> = std::fs::read_to_string("/proc/swaps")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect();

        // The swap file.
        let pages = swap_bytes.div_ceil(PAGE_SIZE as u64);
        let tmp = tempfile::Builder::new()
            .prefix(&format!("usermm-kswap-{}-", std::process::id()))
            .suffix(".swap")
            .tempfile_in(dir)
            .map_err(|e| format!("cannot create a swap file in {}: {e}", dir.display()))?;
        let (file, path) = tmp
            .keep()
            .map_err(|e| format!("cannot keep the swap file: {e}"))?;
        let undo_file = util::register(Undo::RemoveFile(path.clone()));
        let cleanup_file = |e: String| {
            let _ = undo_file.run();
            e
        };
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        let len = i64::try_from(pages * PAGE_SIZE as u64)
            .map_err(|_| "swap size too large".to_string())?;
        // SAFETY: plain syscall on a descriptor we own.
        let rc = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, len) };
        if rc != 0 {
            return Err(cleanup_file(format!(
                "cannot allocate the kernel swap file {}: {}",
                path.display(),
                std::io::Error::from_raw_os_error(rc)
            )));
        }
        write_swap_header(&file, pages).map_err(cleanup_file)?;
        drop(file);
        let undo_swap = util::register(Undo::Swapoff(path.clone()));
        if let Err(e) = swapon_top(&path) {
            undo_swap.forget();
            return Err(cleanup_file(e));
        }

        // The cgroup.
        let cgroup = match kind {
            CgroupKind::V1 => PathBuf::from("/sys/fs/cgroup/memory"),
            CgroupKind::V2 => PathBuf::from("/sys/fs/cgroup"),
        }
        .join(format!("usermm-bench-{}", std::process::id()));
        let mut ks = KernelSwap {
            swap_path: path,
            cgroup: cgroup.clone(),
            kind,
            budget,
            undo_file,
            undo_swap,
            undo_cgroup: util::register(Undo::RemoveCgroup(cgroup.clone())),
            others,
            torn_down: false,
        };
        if let CgroupKind::V2 = ks.kind {
            let sub = std::fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control")
                .unwrap_or_default();
            if !sub.split_whitespace().any(|c| c == "memory") {
                write_file(
                    Path::new("/sys/fs/cgroup/cgroup.subtree_control"),
                    "+memory",
                )?;
            }
        }
        std::fs::create_dir(&cgroup)
            .map_err(|e| format!("cannot create cgroup {}: {e}", cgroup.display()))?;
        ks.set_limit(budget)?;
        Ok(ks)
    }

    /// Sets the cgroup's memory limit.
    pub fn set_limit(&mut self, bytes: u64) -> Result<(), String> {
        match self.kind {
            CgroupKind::V1 => write_file(
                &self.cgroup.join("memory.limit_in_bytes"),
                &bytes.to_string(),
            )?,
            CgroupKind::V2 => {
                write_file(&self.cgroup.join("memory.max"), &bytes.to_string())?;
                let _ = write_file(&self.cgroup.join("memory.swap.max"), "max");
            }
        }
        self.budget = bytes;
        Ok(())
    }

    /// A short description for the report.
    pub fn describe(&self) -> String {
        format!(
            "cgroup {} {} = {} bytes, swap file {} (priority 32767)",
            match self.kind {
                CgroupKind::V1 => "v1",
                CgroupKind::V2 => "v2",
            },
            self.cgroup
                .join(match self.kind {
                    CgroupKind::V1 => "memory.limit_in_bytes",
                    CgroupKind::V2 => "memory.max",
                })
                .display(),
            self.budget,
            self.swap_path.display()
        )
    }

    /// A session of the workload in a child inside the cgroup (`bench_child::Session`):
    /// filled and warmed up once, then timed round by round.
    pub fn start_session(
        &self,
        spec: &WorkSpec,
        warmup: Duration,
    ) -> Result<(bench_child::Session, bench_child::Setup), String> {
        let procs = self.cgroup.join("cgroup.procs");
        let extra = ["--cgroup-procs".to_string(), procs.display().to_string()];
        bench_child::Session::start("bench-kernel-child", &extra, "kernel", spec, warmup)
    }

    /// OOM kills in the cgroup so far.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.kind {
            CgroupKind::V1 => "memory.oom_control",
            CgroupKind::V2 => "memory.events",
        };
        std::fs::read_to_string(self.cgroup.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Turns the swap file on (at the highest priority) or off; the comparison with
    /// zram keeps it off while zram is the swap.
    pub fn swap_enable(&self, on: bool) -> Result<(), String> {
        if on == super::sys::swap_active(&self.swap_path) {
            return Ok(());
        }
        if on {
            swapon_top(&self.swap_path)
        } else {
            super::sys::swapoff(&self.swap_path)
        }
    }

    /// The cgroup's peak charge so far (v1 `memory.max_usage_in_bytes`, v2
    /// `memory.peak`), and its reset (v1 only: v2's is since creation).
    fn peak(&self) -> Option<u64> {
        let f = match self.kind {
            CgroupKind::V1 => "memory.max_usage_in_bytes",
            CgroupKind::V2 => "memory.peak",
        };
        std::fs::read_to_string(self.cgroup.join(f))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    fn reset_peak(&self) {
        if let CgroupKind::V1 = self.kind {
            let _ = write_file(&self.cgroup.join("memory.max_usage_in_bytes"), "0");
        }
    }

    /// Runs the workload once in the cgroup, calling `watch` every 10 ms meanwhile:
    /// an OOM kill is counted and is the run's result (never run again), with the
    /// cgroup's peak charge.
    pub fn run_counted(
        &self,
        spec: &WorkSpec,
        warmup: Duration,
        timed: Duration,
        watch: &mut dyn FnMut(),
    ) -> KernelRun {
        let before = self.oom_kills();
        self.reset_peak();
        let procs = self.cgroup.join("cgroup.procs");
        let extra = ["--cgroup-procs".to_string(), procs.display().to_string()];
        let result = bench_child::run_watched(
            "bench-kernel-child",
            &extra,
            "kernel",
            spec,
            warmup,
            timed,
            watch,
        );
        let oom_kills = self.oom_kills().saturating_sub(before);
        let result = match result {
            Err(e) if oom_kills > 0 => Err(format!(
                "OOM-killed by the kernel in its memory cgroup (limit = budget, swap free): {e}"
            )),
            r => r,
        };
        KernelRun {
            result,
            oom_kills,
            peak_bytes: self.peak(),
        }
    }

    /// Removes the cgroup, turns the swap file off and deletes it.
    pub fn teardown(&mut self) -> Result<(), String> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut errs = Vec::new();
        if let Err(e) = self.undo_cgroup.run() {
            errs.push(e);
        }
        match self.undo_swap.run() {
            Ok(()) => {
                if let Err(e) = self.undo_file.run() {
                    errs.push(e);
                }
            }
            Err(e) => {
                // Never delete a swap file that is still active.
                self.undo_file.forget();
                errs.push(e);
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}

impl Drop for KernelSwap {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("usermm bench: cleanup: {e}");
        }
    }
}

// ------------------------------------------------------------------ the child

/// Arguments of the hidden `bench-kernel-child` command.
#[derive(clap::Args, Debug)]
pub struct ChildArgs {
    /// cgroup.procs file to join before touching memory.
    #[arg(long)]
    cgroup_procs: Option<PathBuf>,
    #[command(flatten)]
    work: WorkArgs,
}

fn vmstat() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.trim().parse().ok()))
            .unwrap_or(0)
    };
    (get("pswpin "), get("pswpout "))
}

fn majflt() -> u64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru.ru_majflt as u64
    }
}

/// The child: joins the cgroup, maps anonymous memory and runs the workload.
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
    if let Some(p) = &a.cgroup_procs {
        let mut f = OpenOptions::new()
            .write(true)
            .open(p)
            .map_err(|e| format!("cannot open {}: {e}", p.display()))?;
        f.write_all(std::process::id().to_string().as_bytes())
            .map_err(|e| format!("cannot join the cgroup ({}): {e}", p.display()))?;
    }
    let len = (a.work.spec().pages as usize)
        .checked_mul(PAGE_SIZE)
        .ok_or("working set too large")?;
    // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(format!(
            "mmap of {len} bytes: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: advice on our own mapping; failure is harmless.
    unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
    // SAFETY: the mapping is ours, page aligned, and lives until the process exits.
    let target = unsafe { RawTarget::new(ptr.cast(), len) };
    let snap = || {
        let (i, o) = vmstat();
        Snap {
            major_faults: majflt(),
            reads: i,
            writes: o,
            ..Snap::default()
        }
    };
    bench_child::run_and_report(&target, &a.work, &snap, &|| None)
}
