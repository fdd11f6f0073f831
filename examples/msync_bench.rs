//! File mappings, side by side in one run (issue 12's measurements):
//!
//! 1. `msync` of 1 / 64 / 4096 dirty pages: usermm `Share::Atomic` and
//!    `Share::Shared`, against the same writes with `pwrite` + `fdatasync` on a plain
//!    file, and the kernel's `mmap(MAP_SHARED)` + `msync(MS_SYNC)`. Median of
//!    `--reps` rounds (default 9), each dirtying pages spread over a 64 MiB file,
//!    the four systems' rounds interleaved (so drift and other load hit all alike);
//!    the last column is the ratio of the means (an Atomic msync's flush, the
//!    file's sync, comes once every few commits: the means count it).
//! 2. Page-out of dirty shared pages under pressure: write every page of a file 4×
//!    the budget through a shared mapping, then `msync`: usermm (budget B) against
//!    the kernel in a memory cgroup v1 of B (root; skipped otherwise).
//!
//! `cargo run --release --example msync_bench -- [--dir DIR] [--reps N] [--budget-mib B] [--part1]`
//! (`--part1`: part 1 only.)

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use usermm::{Config, Share, SwapSpec, Vm, PAGE_SIZE};

const PS: usize = PAGE_SIZE;
const FILE_PAGES: u64 = 16384; // 64 MiB

fn arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1).cloned())
}

fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / v.len() as u32
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The pages round `r` dirties: `n` of them spread over the file.
fn pages(n: u64, r: u64) -> impl Iterator<Item = u64> {
    let stride = FILE_PAGES / n;
    (0..n).map(move |i| (i * stride + r * 7) % FILE_PAGES)
}

fn make(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(FILE_PAGES * PS as u64).unwrap();
    let chunk = vec![1u8; 1 << 20];
    for i in 0..(FILE_PAGES * PS as u64) >> 20 {
        f.write_all_at(&chunk, i << 20).unwrap();
    }
    f.sync_all().unwrap();
}

fn main() {
    let dir = PathBuf::from(arg("--dir").unwrap_or_else(|| "/var/tmp".into()));
    let reps: u64 = arg("--reps").and_then(|v| v.parse().ok()).unwrap_or(9);
    let budget_mib: usize = arg("--budget-mib")
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let work = tempfile::tempdir_in(&dir).expect("a directory for the files");
    let page = vec![0xA5u8; PS];
    println!(
        "msync of N dirty pages (median of {reps}), a 64 MiB file in {}",
        dir.display()
    );
    println!(
        "{:>6} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>14}",
        "pages",
        "usermm-atomic",
        "usermm-shared",
        "pwrite+fsync",
        "kernel-msync",
        "atomic/pw",
        "shared/pw",
        "mean atomic/pw"
    );
    let vm = Vm::new(Config::default().memory_budget(64 << 20)).unwrap();
    vm.swapon(SwapSpec::file(work.path().join("swap"), 256 << 20))
        .unwrap();
    for n in [1u64, 64, 4096] {
        // The four systems' rounds interleave (their order rotating), so the
        // machine's drift and other load fall on all of them alike.
        let mut t_atomic = Vec::new();
        let mut t_shared = Vec::new();
        let mut t_pw = Vec::new();
        let mut t_k = Vec::new();
        // usermm, Atomic and Shared.
        let mut maps = Vec::new();
        for share in [Share::Atomic, Share::Shared] {
            let p = work.path().join(format!("u-{n}-{share:?}"));
            make(&p);
            let mm = vm.new_space();
            let r = mm.map_file(&p, share).unwrap();
            maps.push((mm, r));
        }
        // pwrite + fdatasync.
        let p = work.path().join(format!("p-{n}"));
        make(&p);
        let pf = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        // Kernel mmap + msync(MS_SYNC).
        let p = work.path().join(format!("k-{n}"));
        make(&p);
        let kf = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let len = FILE_PAGES as usize * PS;
        // SAFETY: a fresh shared mapping of a file we own, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&kf),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        for round in 0..reps {
            for sys in 0..4 {
                match (sys + round) % 4 {
                    s @ (0 | 1) => {
                        let (mm, r) = &maps[s as usize];
                        for i in pages(n, round) {
                            mm.write(r.start() + i * PS as u64, &page).unwrap();
                        }
                        let t = Instant::now();
                        mm.msync(r).unwrap();
                        let out = if s == 0 { &mut t_atomic } else { &mut t_shared };
                        out.push(t.elapsed());
                    }
                    2 => {
                        let t = Instant::now();
                        for i in pages(n, round) {
                            pf.write_all_at(&page, i * PS as u64).unwrap();
                        }
                        pf.sync_data().unwrap();
                        t_pw.push(t.elapsed());
                    }
                    _ => {
                        for i in pages(n, round) {
                            // SAFETY: inside the mapping.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    page.as_ptr(),
                                    (base as *mut u8).add(i as usize * PS),
                                    PS,
                                )
                            };
                        }
                        let t = Instant::now();
                        // SAFETY: the mapping above.
                        assert_eq!(unsafe { libc::msync(base, len, libc::MS_SYNC) }, 0);
                        t_k.push(t.elapsed());
                    }
                }
            }
        }
        // SAFETY: the mapping above, no longer used.
        unsafe { libc::munmap(base, len) };
        drop(maps);
        // Means as well: an Atomic msync's flush (file sync) comes every few commits.
        let mean_ratio = mean(&t_atomic).as_secs_f64() / mean(&t_pw).as_secs_f64();
        let (a, s, pw, k) = (
            median(t_atomic),
            median(t_shared),
            median(t_pw),
            median(t_k),
        );
        let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1e3);
        println!(
            "{n:>6} {:>12} {:>12} {:>12} {:>12} {:>9.2}x {:>9.2}x {:>13.2}x",
            ms(a),
            ms(s),
            ms(pw),
            ms(k),
            a.as_secs_f64() / pw.as_secs_f64(),
            s.as_secs_f64() / pw.as_secs_f64(),
            mean_ratio
        );
    }
    drop(vm);
    if std::env::args().any(|a| a == "--part1") {
        return;
    }
    pageout(work.path(), budget_mib);
}

/// Part 2: page-out of dirty shared pages, usermm against the kernel in a cgroup.
fn pageout(dir: &Path, budget_mib: usize) {
    let budget = budget_mib << 20;
    let n = (4 * budget / PS) as u64;
    println!(
        "\npage-out of dirty shared pages: write {} MiB through a shared mapping, budget {budget_mib} MiB, then msync",
        (n as usize * PS) >> 20
    );
    let page = vec![0x5Au8; PS];
    // usermm.
    let p = dir.join("po-usermm");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(n * PS as u64)
        .unwrap();
    let vm = Vm::new(Config::default().memory_budget(budget)).unwrap();
    let mm = vm.new_space();
    let r = mm.map_file(&p, Share::Shared).unwrap();
    let t = Instant::now();
    for i in 0..n {
        mm.write(r.start() + i * PS as u64, &page).unwrap();
    }
    let w = t.elapsed();
    let during = vm.stats().fileout;
    mm.msync(&r).unwrap();
    let u = t.elapsed();
    let s = vm.stats();
    println!(
        "  usermm: writes {:.2} s, with msync {:.2} s ({:.0} pages/s); written back {} pages (during the writes {})",
        w.as_secs_f64(),
        u.as_secs_f64(),
        n as f64 / u.as_secs_f64(),
        s.fileout,
        during
    );
    drop((r, mm, vm));
    // Kernel, in a memory cgroup v1 of the same size.
    let cg = Path::new("/sys/fs/cgroup/memory");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !cg.join("memory.limit_in_bytes").exists() || !root {
        println!("  kernel: SKIP (needs root and a cgroup v1 memory controller)");
        return;
    }
    let group = cg.join(format!("usermm-msync-{}", std::process::id()));
    std::fs::create_dir(&group).unwrap();
    std::fs::write(group.join("memory.limit_in_bytes"), budget.to_string()).unwrap();
    let p = dir.join("po-kernel");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(n * PS as u64)
        .unwrap();
    let t = Instant::now();
    // SAFETY: fork; the child only does system calls and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = std::fs::write(group.join("cgroup.procs"), std::process::id().to_string()).is_ok();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let len = n as usize * PS;
        // SAFETY: as in part 1.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        for i in 0..n as usize {
            // SAFETY: inside the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(page.as_ptr(), (base as *mut u8).add(i * PS), PS)
            };
        }
        // SAFETY: the mapping above.
        let rc = unsafe { libc::msync(base, len, libc::MS_SYNC) };
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(if ok && rc == 0 { 0 } else { 1 }) };
    }
    let mut st = 0;
    // SAFETY: waiting for our child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    let k = t.elapsed();
    let peak = std::fs::read_to_string(group.join("memory.max_usage_in_bytes")).unwrap_or_default();
    let _ = std::fs::remove_dir(&group);
    println!(
        "  kernel: {:.2} s ({:.0} pages/s), exit {}, cgroup peak {} MiB",
        k.as_secs_f64(),
        n as f64 / k.as_secs_f64(),
        st,
        peak.trim().parse::<u64>().unwrap_or(0) >> 20
    );
    println!(
        "  usermm/kernel rate: {:.2}x",
        k.as_secs_f64() / u.as_secs_f64()
    );
}
