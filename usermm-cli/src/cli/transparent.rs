//! The transparent column of `usermm bench`: the cell's access sequence through
//! plain loads and stores into a `Vm::map_transparent` region (pages in the Vm's
//! budget, faults served through userfaultfd), with the same budget and the same
//! kind of swap device (a swap file) as the usermm column.
//!
//! It runs in a child process (`usermm bench-transparent-child`, hidden) through
//! `bench_child`, the kernel column's loop: the same pointer accesses, fill,
//! warm-up, timing and content check. A child also keeps a failed transparent fault
//! (SIGBUS, as the kernel does) from ending the bench. Where userfaultfd cannot be
//! used, `available` says why once and the column reads "unavailable: <reason>".

use super::bench_child::{self, WorkArgs, EXIT_UNAVAILABLE};
use std::path::{Path, PathBuf};
use std::time::Duration;
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::driver::{RawTarget, WorkSpec};

/// Whether this process can map a transparent region (a one-page region of a
/// small Vm without swap, dropped at once); `Err` is the reason it cannot.
pub fn available() -> Result<(), String> {
    let vm = Vm::new(Config::default().memory_budget(64 * PAGE_SIZE))
        .map_err(|e| format!("Vm::new: {e}"))?;
    let r = vm.map_transparent(PAGE_SIZE).map_err(|e| e.to_string())?;
    drop(r);
    Ok(())
}

/// A session (`bench_child::Session`): the child with a fresh Vm of `budget` on the
/// swap file `swap`, filled and warmed up once, then timed round by round.
pub fn start_session(
    budget: u64,
    io_threads: Option<u32>,
    swap: &Path,
    swap_size: u64,
    spec: &WorkSpec,
    warmup: Duration,
) -> Result<(bench_child::Session, bench_child::Setup), String> {
    let mut extra = vec![
        "--budget".to_string(),
        budget.to_string(),
        "--swap-file".to_string(),
        swap.display().to_string(),
        "--swap-size".to_string(),
        swap_size.to_string(),
    ];
    if let Some(n) = io_threads {
        extra.extend(["--io-threads".to_string(), n.to_string()]);
    }
    bench_child::Session::start(
        "bench-transparent-child",
        &extra,
        "transparent",
        spec,
        warmup,
    )
}

// ------------------------------------------------------------------ the child

/// Arguments of the hidden `bench-transparent-child` command.
#[derive(clap::Args, Debug)]
pub struct ChildArgs {
    /// The Vm's budget in bytes.
    #[arg(long)]
    budget: u64,
    /// The swap file (created or reused at `swap_size` bytes).
    #[arg(long)]
    swap_file: PathBuf,
    #[arg(long)]
    swap_size: u64,
    #[arg(long)]
    io_threads: Option<u32>,
    #[command(flatten)]
    work: WorkArgs,
}

/// The child: a Vm with the budget and the swap file, the working set as one
/// transparent region, the workload through pointers into it.
pub fn child_main(a: ChildArgs) -> i32 {
    match child(a) {
        Ok(()) => 0,
        Err((code, e)) => {
            eprintln!("{e}");
            code
        }
    }
}

fn child(a: ChildArgs) -> Result<(), (i32, String)> {
    let fail = |e: String| (1, e);
    let len = (a.work.spec().pages as usize)
        .checked_mul(PAGE_SIZE)
        .ok_or_else(|| fail("working set too large".into()))?;
    let mut cfg = Config::default().memory_budget(a.budget as usize);
    if let Some(n) = a.io_threads {
        cfg = cfg.io_threads(n as usize);
    }
    let vm = Vm::new(cfg).map_err(|e| fail(format!("Vm::new: {e}")))?;
    vm.swapon(SwapSpec::file(&a.swap_file, a.swap_size))
        .map_err(|e| fail(format!("swapon: {e}")))?;
    // The one error that means "not on this machine" rather than "failed".
    let region = vm
        .map_transparent(len)
        .map_err(|e| (EXIT_UNAVAILABLE, format!("map_transparent: {e}")))?;
    // SAFETY: the region is page aligned, `len` bytes long (map_transparent rounds up
    // to pages, and `len` is a page multiple), readable and writable, and lives until
    // the end of this function, after the target's last use; nothing else touches it.
    let target = unsafe { RawTarget::new(region.as_ptr(), region.len()) };
    let snap = || bench_child::vm_snap(&vm);
    bench_child::run_and_report(&target, &a.work, &snap, &|| None).map_err(fail)?;
    let s = vm.stats();
    if s.write_errors + s.read_errors > 0 {
        return Err(fail(format!(
            "engine reported {} write and {} read errors",
            s.write_errors, s.read_errors
        )));
    }
    drop(region);
    Ok(())
}
