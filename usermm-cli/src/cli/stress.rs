//! `usermm stress swapoff`: the reproducer of seed 002 as a bounded stress run.
//!
//! Three swap devices; one of them is removed (`swapoff`) and a fresh one added in a
//! loop, while workers map memory larger than the budget, fork, write, verify in
//! parent and child, and let children exit. Every page is checked against the
//! generation its owner last wrote. A watchdog prints what each thread was doing and
//! fails the run if any thread makes no progress for `--stall` seconds. At the end
//! every space is dropped and the run checks that no slot and no frame leaked.
//! Exit codes: 0 clean, 1 mismatch or error, 3 stall.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use usermm::{AddressSpace, Config, SwapSpec, VAddr, Vm, PAGE_SIZE};

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

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let v: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 30s, 2m)"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    usermm::config::parse_size(s)
}

/// What one thread is doing, for the watchdog.
struct Progress {
    name: String,
    ops: AtomicU64,
    doing: Mutex<&'static str>,
}

impl Progress {
    fn step(&self, what: &'static str) {
        *self.doing.lock().unwrap() = what;
        self.ops.fetch_add(1, Ordering::Relaxed);
    }
}

fn stamp(page: u64, gen: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&page.to_le_bytes());
    b[8..].copy_from_slice(&gen.to_le_bytes());
    b
}

fn verify(mm: &AddressSpace, base: VAddr, pages: u64, gen: u64, who: &str) -> Result<(), String> {
    for p in 0..pages {
        let mut b = [0u8; 16];
        mm.read(base + p * PAGE_SIZE as u64 + 64, &mut b)
            .map_err(|e| format!("{who}: read of page {p} failed: {e}"))?;
        if b != stamp(p, gen) {
            return Err(format!(
                "{who}: page {p} holds {:?}, expected generation {gen}",
                (
                    u64::from_le_bytes(b[..8].try_into().unwrap()),
                    u64::from_le_bytes(b[8..].try_into().unwrap())
                )
            ));
        }
    }
    Ok(())
}

fn fill(mm: &AddressSpace, base: VAddr, pages: u64, gen: u64) -> Result<(), String> {
    for p in 0..pages {
        mm.write(base + p * PAGE_SIZE as u64 + 64, &stamp(p, gen))
            .map_err(|e| format!("write of page {p} failed: {e}"))?;
    }
    Ok(())
}

/// One worker: fork, write on both sides, verify both, let the child exit.
fn worker(vm: Vm, pages: u64, stop: Arc<AtomicBool>, prog: Arc<Progress>) -> Result<u64, String> {
    let mm = vm.new_space();
    let r = mm
        .map_anon((pages * PAGE_SIZE as u64) as usize)
        .map_err(|e| e.to_string())?;
    let mut gen = 1;
    prog.step("initial fill");
    fill(&mm, r.start(), pages, gen)?;
    let mut rounds = 0;
    while !stop.load(Ordering::Relaxed) {
        prog.step("fork");
        let child = mm.fork().map_err(|e| format!("fork: {e}"))?;
        prog.step("verify child");
        verify(&child, r.start(), pages, gen, "child after fork")?;
        prog.step("write child");
        fill(&child, r.start(), pages / 2, gen + 1000)?;
        prog.step("write parent");
        gen += 1;
        fill(&mm, r.start(), pages, gen)?;
        prog.step("verify parent");
        verify(&mm, r.start(), pages, gen, "parent")?;
        prog.step("verify child again");
        verify(&child, r.start(), pages / 2, gen - 1 + 1000, "child")?;
        prog.step("exit child");
        drop(child);
        rounds += 1;
    }
    prog.step("done");
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
    let stop = Arc::new(AtomicBool::new(false));
    let mut progs = Vec::new();
    let mut handles = Vec::new();
    for w in 0..a.workers {
        let prog = Arc::new(Progress {
            name: format!("worker {w}"),
            ops: AtomicU64::new(0),
            doing: Mutex::new("starting"),
        });
        progs.push(prog.clone());
        let (vm, stop, pages) = (vm.clone(), stop.clone(), a.pages);
        handles.push(std::thread::spawn(move || worker(vm, pages, stop, prog)));
    }
    let off = Arc::new(Progress {
        name: "swapoff loop".into(),
        ops: AtomicU64::new(0),
        doing: Mutex::new("starting"),
    });
    progs.push(off.clone());
    // Watchdog.
    let stalled = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (progs, stop, stalled) = (progs.clone(), stop.clone(), stalled.clone());
        let limit = Duration::from_secs(a.stall);
        let vm = vm.clone();
        std::thread::spawn(move || {
            let mut last: Vec<(u64, Instant)> = progs.iter().map(|_| (0, Instant::now())).collect();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                for (i, p) in progs.iter().enumerate() {
                    let ops = p.ops.load(Ordering::Relaxed);
                    if ops != last[i].0 {
                        last[i] = (ops, Instant::now());
                    } else if last[i].1.elapsed() > limit {
                        eprintln!("STALL: no progress for {limit:?}. Threads:");
                        for q in &progs {
                            eprintln!(
                                "  {:<14} {:>8} ops, now: {}",
                                q.name,
                                q.ops.load(Ordering::Relaxed),
                                q.doing.lock().unwrap()
                            );
                        }
                        eprintln!("  stats: {:?}", vm.stats());
                        stalled.store(true, Ordering::SeqCst);
                        std::process::exit(3);
                    }
                }
            }
        })
    };
    let t0 = Instant::now();
    let mut cycles = 0u64;
    let mut failed_swapoffs = 0u64;
    let mut victim_idx = 0usize;
    let mut error = None;
    let mut next_report = Instant::now() + Duration::from_secs(5);
    while t0.elapsed() < a.duration && error.is_none() {
        if handles.iter().any(|h| h.is_finished()) {
            break; // a worker stopped early: collect its error below
        }
        let victim = ids[victim_idx];
        off.step("swapoff");
        match vm.swapoff(victim) {
            Ok(()) => {
                let path = dir.path().join(format!("dev{victim_idx}"));
                let _ = std::fs::remove_file(&path);
                off.step("swapon");
                match vm.swapon(SwapSpec::file(&path, dev_bytes)) {
                    Ok(id) => ids[victim_idx] = id,
                    Err(e) => error = Some(format!("swapon: {e}")),
                }
                cycles += 1;
            }
            Err(usermm::Error::OutOfMemory) => failed_swapoffs += 1,
            Err(e) => error = Some(format!("swapoff: {e}")),
        }
        victim_idx = (victim_idx + 1) % 3;
        if Instant::now() >= next_report {
            let s = vm.stats();
            println!(
                "  {:>5.1}s: {cycles} swapoff cycles, pswpin {} pswpout {} cow {} free {}/{}",
                t0.elapsed().as_secs_f64(),
                s.pswpin,
                s.pswpout,
                s.cow_faults,
                s.free_frames,
                s.total_frames
            );
            next_report += Duration::from_secs(5);
        }
    }
    stop.store(true, Ordering::Relaxed);
    off.step("joining");
    let mut rounds = 0;
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => rounds += r,
            Ok(Err(e)) => error = error.or(Some(e)),
            Err(_) => error = error.or(Some("a worker panicked".into())),
        }
    }
    let _ = watchdog.join();
    if stalled.load(Ordering::SeqCst) {
        return 3;
    }
    // Leak check: every space is gone, so every slot and frame must be free.
    let t = Instant::now();
    let leak = loop {
        let s = vm.stats();
        let used: u64 = s.swap_used.iter().map(|x| x.1).sum();
        if s.free_frames == s.total_frames && used == 0 {
            break None;
        }
        if t.elapsed() > Duration::from_secs(10) {
            break Some(format!("leak after all spaces were dropped: {s:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
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
