//! `usermm stress swapoff`: the reproducer of seed 002 as a bounded stress run.
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
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::check::wait_no_leak;
use usermm_testkit::pattern::{fill_gens, verify_gens};
use usermm_testkit::watchdog::{Failure, Me, Watchdog};

/// Arguments of `usermm stress`.
#[derive(clap::Args, Debug)]
pub struct StressArgs {
    /// Which stress: `swapoff` (seed 002: swapoff racing fork, fault and exit).
    #[arg(value_parser = ["swapoff"])]
    pub which: String,
    /// How long to run (e.g. 60s, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Memory budget.
    #[arg(long, default_value = "2M", value_parser = parse_bytes)]
    pub budget: u64,
    /// Worker threads (each forks, writes, verifies, exits).
    #[arg(long, default_value_t = 3)]
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
}

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
    let dir = match &a.dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    };
    let dir = match dir {
        Ok(d) => d,
        Err(e) => {
            eprintln!("usermm stress: cannot create a directory for swap files: {e}");
            return 1;
        }
    };
    let vm = match Vm::new(Config::default().memory_budget(a.budget as usize)) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("usermm stress: {e}");
            return 2;
        }
    };
    // Each device can hold every worker's pages twice over, so any two suffice.
    let dev_bytes = (a.workers as u64 * a.pages * 4 + 1024) * PAGE_SIZE as u64;
    let mut ids = Vec::new();
    for i in 0..3 {
        match vm.swapon(SwapSpec::file(
            dir.path().join(format!("dev{i}")),
            dev_bytes,
        )) {
            Ok(id) => ids.push(id),
            Err(e) => {
                eprintln!("usermm stress: swapon: {e}");
                return 1;
            }
        }
    }
    println!(
        "stress swapoff: {} workers x {} pages, budget {} KiB, 3 devices of {} MiB, for {:?}",
        a.workers,
        a.pages,
        a.budget >> 10,
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
                let victim = ids[victim_idx];
                me.begin(|| format!("swapoff of {victim:?}"));
                match vm.swapoff(victim) {
                    Ok(()) => {
                        let path = dir.join(format!("dev{victim_idx}"));
                        let _ = std::fs::remove_file(&path);
                        me.begin(|| format!("swapon of {}", path.display()));
                        match vm.swapon(SwapSpec::file(&path, dev_bytes)) {
                            Ok(id) => ids[victim_idx] = id,
                            Err(e) => fail(&error, format!("swapon: {e}")),
                        }
                        cycles.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(usermm::Error::OutOfMemory) => {
                        failed_swapoffs.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => fail(&error, format!("swapoff: {e}")),
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
