//! `usermm stress files`: the reproducer of seed 000 as a bounded stress run.
//!
//! Each worker thread creates a file of its own, maps it `Share::Shared` and also
//! writes it with `File::write_at`, reads it back both ways and through `read_at`,
//! and `msync`s now and then; it also keeps an anonymous region, so file pages and
//! swapped anonymous pages compete for a budget of a few dozen frames. Reclaim must
//! hand dirty file pages to the page-I/O threads (it never writes one itself, nor
//! takes a file's lock): if it did, a thread would wait on itself, and the test
//! kit's watchdog — which shows what each thread is waiting on — fails the run as a
//! stall. Every read is checked against a model of the file; at the end each file's
//! bytes on disk are compared with its model. Exit codes: 0 clean, 1 mismatch or
//! error, 3 stall.

use super::stress::{setup, StressArgs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use usermm::{Share, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::watchdog::{Failure, Me, Watchdog};
use usermm_testkit::Rng;

const PS: u64 = PAGE_SIZE as u64;
/// The budget without `--budget`: 48 frames.
const DEFAULT_BUDGET: u64 = 48 * PS;

/// Runs the command; returns the exit code.
pub fn main(a: StressArgs) -> i32 {
    let budget = a.budget.unwrap_or(DEFAULT_BUDGET);
    let (dir, vm) = match setup(&a.dir, budget) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let swap_bytes = (a.workers as u64 * a.pages * 2 + 1024) * PS;
    if let Err(e) = vm.swapon(SwapSpec::file(dir.path().join("swap"), swap_bytes)) {
        eprintln!("usermm stress files: swapon: {e}");
        return 1;
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!(
        "stress files: {} threads x a file of {} pages (and {} anonymous), budget {} frames, seed {seed}, for {:?}",
        a.workers,
        a.pages,
        a.pages / 2,
        budget / PS,
        a.duration
    );
    let ops = Arc::new(AtomicU64::new(0));
    let error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let stats_vm = vm.clone();
    let mut wd = Watchdog::new(Duration::from_secs(a.stall))
        .extra(move || format!("  stats: {:?}\n", stats_vm.stats()));
    let t0 = Instant::now();
    for t in 0..a.workers {
        let (vm, ops, error) = (vm.clone(), ops.clone(), error.clone());
        let path = dir.path().join(format!("file{t}"));
        let (pages, duration) = (a.pages, a.duration);
        wd = wd.thread(format!("file worker {t}"), move |me| {
            let r = worker(
                &vm,
                &path,
                pages,
                Rng::for_thread(seed, t as u64),
                me,
                || t0.elapsed() >= duration,
            );
            match r {
                Ok(n) => {
                    ops.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(format!("file worker {t}: {e}"));
                    me.board().stop();
                }
            }
        });
    }
    match wd.try_run() {
        Ok(()) => {}
        Err(f @ Failure::Stalled { .. }) => {
            eprintln!("STALL: {f}");
            return 3;
        }
        Err(f @ Failure::Panicked { .. }) => {
            error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(f.to_string());
        }
    }
    let s = vm.stats();
    println!(
        "done in {:.1}s: {} operations; file pages read {} written back {} (errors {}), swap in {} out {}, direct reclaim {}",
        t0.elapsed().as_secs_f64(),
        ops.load(Ordering::Relaxed),
        s.filein,
        s.fileout,
        s.file_write_errors,
        s.pswpin - s.filein,
        s.pswpout - s.fileout,
        s.direct_reclaim
    );
    let err = error.lock().unwrap_or_else(|p| p.into_inner()).take();
    match err {
        Some(e) => {
            eprintln!("FAILED: {e}");
            1
        }
        None if s.fileout == 0 => {
            eprintln!("FAILED: no file page was written back: the run did not exercise write-back");
            1
        }
        None => {
            println!("OK: every read and every file on disk matched its model");
            0
        }
    }
}

/// One worker: its own file, mapped shared and written with `write_at`, and an
/// anonymous region; returns the operations done.
fn worker(
    vm: &Vm,
    path: &std::path::Path,
    pages: u64,
    mut rng: Rng,
    me: &Me,
    over: impl Fn() -> bool,
) -> Result<u64, String> {
    let len = pages * PS;
    let mut model = vec![0u8; len as usize];
    for (i, b) in model.iter_mut().enumerate() {
        *b = (i as u64).wrapping_mul(0x9e37_79b9) as u8;
    }
    std::fs::write(path, &model).map_err(|e| format!("create {}: {e}", path.display()))?;
    let mm = vm.new_space();
    let r = mm
        .map_file(path, Share::Shared)
        .map_err(|e| format!("map_file: {e}"))?;
    let file = vm.open(path).map_err(|e| format!("open: {e}"))?;
    let anon_pages = (pages / 2).max(1);
    let anon = mm
        .map_anon((anon_pages * PS) as usize)
        .map_err(|e| format!("map_anon: {e}"))?;
    let mut anon_model = vec![0u64; anon_pages as usize];
    let mut buf = vec![0u8; 2 * PS as usize];
    let mut n = 0u64;
    while !over() && !me.should_stop() {
        n += 1;
        let off = rng.below(len);
        let k = (1 + rng.below(2 * PS)).min(len - off) as usize;
        let fill = rng.next_u64() as u8;
        let what = rng.below(8);
        me.begin(|| format!("op {n} ({what}) at {off} len {k}"));
        match what {
            0 | 1 => {
                buf[..k].fill(fill);
                mm.write(r.start() + off, &buf[..k])
                    .map_err(|e| format!("write at {off}: {e}"))?;
                model[off as usize..][..k].fill(fill);
            }
            2 => {
                buf[..k].fill(fill);
                file.write_at(&buf[..k], off)
                    .map_err(|e| format!("write_at {off}: {e}"))?;
                model[off as usize..][..k].fill(fill);
            }
            3 | 4 => {
                mm.read(r.start() + off, &mut buf[..k])
                    .map_err(|e| format!("read at {off}: {e}"))?;
                check(&buf[..k], &model[off as usize..][..k], off, "mapping")?;
            }
            5 => {
                let got = file
                    .read_at(&mut buf[..k], off)
                    .map_err(|e| format!("read_at {off}: {e}"))?;
                if got != k {
                    return Err(format!("read_at {off}: {got} bytes of {k}"));
                }
                check(&buf[..k], &model[off as usize..][..k], off, "read_at")?;
            }
            6 => {
                let p = rng.below(anon_pages);
                let at = anon.start() + p * PS;
                let mut w = [0u8; 8];
                mm.read(at, &mut w).map_err(|e| format!("anon read: {e}"))?;
                if u64::from_le_bytes(w) != anon_model[p as usize] {
                    return Err(format!(
                        "anonymous page {p}: stamp {} != {}",
                        u64::from_le_bytes(w),
                        anon_model[p as usize]
                    ));
                }
                anon_model[p as usize] = n;
                mm.write(at, &n.to_le_bytes())
                    .map_err(|e| format!("anon write: {e}"))?;
            }
            _ => {
                if rng.below(8) == 0 {
                    mm.msync(&r).map_err(|e| format!("msync: {e}"))?;
                }
            }
        }
        me.done();
    }
    me.begin(|| "final msync".into());
    mm.msync(&r).map_err(|e| format!("msync: {e}"))?;
    me.done();
    let disk = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    check(&disk, &model, 0, "the file on disk")?;
    Ok(n)
}

fn check(got: &[u8], want: &[u8], at: u64, what: &str) -> Result<(), String> {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None if got.len() == want.len() => Ok(()),
        None => Err(format!(
            "{what}: {} bytes, {} expected",
            got.len(),
            want.len()
        )),
        Some(i) => Err(format!(
            "{what}: byte {} is {:#x}, the model says {:#x}",
            at + i as u64,
            got[i],
            want[i]
        )),
    }
}
