//! Transparent regions (`Vm::map_transparent`): ordinary memory through userfaultfd,
//! inside the budget, paged to swap like the rest. Plain loads and stores from
//! several threads against a model, many threads on one page, system calls into
//! evicted pages, and no leak when a region goes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use usermm::{Config, Vm, PAGE_SIZE};

mod common;
use common::{transparent_setup as setup, transparent_setup_with, word};
use usermm_testkit::workload::Rng;

const PS: usize = PAGE_SIZE;

/// Re-runs this test binary's test `name` alone with `env` set (its child half),
/// asserts it died of SIGBUS within two minutes (a hang fails, the child killed),
/// and returns its stderr.
fn child_dies_of_sigbus(name: &str, env: &str) -> String {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    // The child dies of the signal without running destructors: its temporary
    // directories (a 16 MiB swap file) go in one of ours, removed when we return.
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture"])
        .env(env, "1")
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Both pipes drained by threads, so a chatty child never blocks on them.
    let drain = |mut p: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = p.read_to_end(&mut v);
            v
        })
    };
    let (so, se) = (
        drain(Box::new(child.stdout.take().unwrap())),
        drain(Box::new(child.stderr.take().unwrap())),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&se.join().unwrap()).into_owned();
            panic!("the child did not end within 120 s (killed); stderr: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::process::Output {
        status,
        stdout: so.join().unwrap(),
        stderr: se.join().unwrap(),
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGBUS),
        "child status {:?}\nstdout: {}\nstderr: {stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// 4 threads, each with its own pages, do random loads and stores through plain
/// pointers (atomic words) over 32 MiB with a 4 MiB budget (1/8), against a model.
#[test]
fn differential_plain_loads_and_stores_under_pressure() {
    let Some((_d, vm)) = setup(4 << 20, 256 << 20) else {
        return;
    };
    let bytes = 32 << 20;
    let r = Arc::new(vm.map_transparent(bytes).unwrap());
    let threads = 4;
    let words = bytes / 8;
    let per = words / threads;
    let seed = 0x5eed;
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed + t as u64);
                let mut model = vec![0u64; per];
                let base = t * per;
                for op in 0..30_000u64 {
                    let i = rng.below(per as u64) as usize;
                    if rng.below(2) == 0 {
                        let v = rng.next_u64() | 1;
                        word(&r, base + i).store(v, Ordering::Relaxed);
                        model[i] = v;
                    } else {
                        let got = word(&r, base + i).load(Ordering::Relaxed);
                        assert_eq!(got, model[i], "thread {t} op {op} word {i}");
                    }
                }
                for (i, &m) in model.iter().enumerate() {
                    assert_eq!(
                        word(&r, base + i).load(Ordering::Relaxed),
                        m,
                        "final {t}/{i}"
                    );
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let s = vm.stats();
    assert!(s.pswpout > 0 && s.pswpin > 0, "no paging happened: {s:?}");
    drop(r);
    usermm_testkit::check::wait_no_leak(&vm, Duration::from_secs(10)).unwrap();
}

/// Many threads touch the same evicted page at once: one read, every thread sees it.
#[test]
fn many_threads_fault_the_same_page() {
    let Some((_d, vm)) = setup(1 << 20, 64 << 20) else {
        return;
    };
    let r = Arc::new(vm.map_transparent(8 << 20).unwrap());
    for p in 0..(8 << 20) / PS {
        word(&r, p * PS / 8).store(p as u64 + 7, Ordering::Relaxed);
    }
    vm.reclaim(1 << 20);
    for round in 0..20 {
        let target = (round * 37) % ((8 << 20) / PS);
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || word(&r, target * PS / 8).load(Ordering::Relaxed))
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), target as u64 + 7);
        }
        vm.reclaim(1 << 20);
    }
}

/// System calls into and out of evicted pages: `read(2)` fills evicted memory from
/// a file, `write(2)` sends evicted memory to a file; both must work (not EFAULT).
#[test]
fn read_and_write_syscalls_on_evicted_pages() {
    use std::io::{Read, Seek, Write};
    let Some((d, vm)) = setup(1 << 20, 64 << 20) else {
        return;
    };
    let len = 4 << 20;
    let r = vm.map_transparent(len).unwrap();
    let mut rng = Rng::new(42);
    let mut data = vec![0u8; len];
    usermm_testkit::pattern::fill_random(&mut rng, &mut data);
    let path = d.path().join("data");
    std::fs::write(&path, &data).unwrap();
    // Touch every page, then push them all out.
    for p in 0..len / PS {
        word(&r, p * PS / 8).store(1, Ordering::Relaxed);
    }
    vm.reclaim(1 << 20);
    // SAFETY: the region is ours, `len` bytes, alive for the whole test; no other
    // thread touches it meanwhile.
    let buf = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), len) };
    let mut f = std::fs::File::open(&path).unwrap();
    f.read_exact(buf)
        .expect("read(2) into evicted transparent memory");
    assert!(buf == &data[..], "read(2) put the wrong bytes");
    vm.reclaim(1 << 20);
    let out = d.path().join("out");
    let mut g = std::fs::File::create(&out).unwrap();
    g.write_all(buf)
        .expect("write(2) from evicted transparent memory");
    g.flush().unwrap();
    g.rewind().unwrap();
    assert!(
        std::fs::read(&out).unwrap() == data,
        "write(2) sent the wrong bytes"
    );
    let s = vm.stats();
    assert!(s.pswpin > 0, "nothing was swapped in: {s:?}");
}

/// Untouched pages read as zeros and take no frame; a region's frames and slots go
/// back when it is dropped.
#[test]
fn untouched_pages_are_zero_and_dropping_frees_everything() {
    let Some((_d, vm)) = setup(2 << 20, 64 << 20) else {
        return;
    };
    let total = vm.stats().total_frames;
    let r = vm.map_transparent(1 << 30).unwrap();
    assert_eq!(r.len(), 1 << 30);
    assert_eq!(word(&r, 12345).load(Ordering::Relaxed), 0);
    for p in 0..2048 {
        word(&r, p * PS / 8).store(p as u64 + 1, Ordering::Relaxed);
    }
    for p in 0..2048 {
        assert_eq!(word(&r, p * PS / 8).load(Ordering::Relaxed), p as u64 + 1);
    }
    let s = vm.stats();
    assert!(s.total_frames - s.free_frames <= total, "{s:?}");
    drop(r);
    usermm_testkit::check::wait_no_leak(&vm, Duration::from_secs(10)).unwrap();
}

/// When neither a frame nor a slot can be had, the faulting thread gets SIGBUS with
/// a line on stderr, never silent zeros. Runs in a child process (this test binary,
/// re-run with an environment variable) so the signal kills only the child.
#[test]
fn no_frame_and_no_swap_is_sigbus_not_zeros() {
    if std::env::var("USERMM_SIGBUS_CHILD").is_ok() {
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        let r = vm.map_transparent(8 << 20).unwrap();
        for p in 0..(8 << 20) / PS {
            word(&r, p * PS / 8).store(1, Ordering::Relaxed);
        }
        println!("CHILD: all pages written without swap (should not happen)");
        return;
    }
    if setup(1 << 20, 16 << 20).is_none() {
        return;
    }
    let stderr = child_dies_of_sigbus(
        "no_frame_and_no_swap_is_sigbus_not_zeros",
        "USERMM_SIGBUS_CHILD",
    );
    assert!(
        stderr.contains("usermm: transparent page fault failed"),
        "no line on stderr: {stderr}"
    );
}

/// A page dropped from the mapping behind usermm's back (here a raw
/// `MADV_DONTNEED`; a broken invariant in real life) while its entry says it is
/// mapped fails loudly — a line on stderr naming the page, then SIGBUS for the
/// thread that touches it — instead of hanging: the reclaimer, which would copy it
/// out, checks that it is there first (its copy would fault to a handler waiting
/// for the entry lock the reclaimer holds), and the handler, which would wake the
/// thread to fault again forever, checks too. In a child process.
#[test]
fn a_page_dropped_behind_usermms_back_is_sigbus_not_a_hang() {
    if std::env::var("USERMM_LOST_CHILD").is_ok() {
        let (_d, vm) = setup(1 << 20, 64 << 20).unwrap();
        let r = vm.map_transparent(8 << 20).unwrap();
        word(&r, 0).store(7, Ordering::Relaxed);
        // SAFETY: our own region's first page; the point is to lose it.
        unsafe { libc::madvise(r.as_ptr().cast(), PS, libc::MADV_DONTNEED) };
        // Pressure: the reclaimer comes to page 0 (dirty, so it would copy it).
        for round in 0..3 {
            for p in 1..(8 << 20) / PS {
                word(&r, p * PS / 8).store(round, Ordering::Relaxed);
            }
        }
        let v = word(&r, 0).load(Ordering::Relaxed);
        println!("CHILD: the lost page read {v} (should not happen)");
        return;
    }
    if setup(1 << 20, 16 << 20).is_none() {
        return;
    }
    let stderr = child_dies_of_sigbus(
        "a_page_dropped_behind_usermms_back_is_sigbus_not_a_hang",
        "USERMM_LOST_CHILD",
    );
    assert!(
        stderr.contains("is missing from its mapping but its entry is mapped (missing-page fault"),
        "no line from the fault handler: {stderr}"
    );
    assert!(
        stderr.contains("(page-out copy"),
        "the reclaimer did not notice (did it come to the page?): {stderr}"
    );
}

/// Without access to /dev/userfaultfd (an unprivileged user, the device root-only as
/// by default), `map_transparent` refuses and says what to do. Runs this test binary
/// as `nobody` through `setpriv` when we are root; SKIP otherwise.
#[test]
fn unprivileged_without_the_device_is_refused_clearly() {
    if std::env::var("USERMM_UNPRIV_CHILD").is_ok() {
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        match vm.map_transparent(PS) {
            Ok(_) => println!("CHILD: mapped"),
            Err(e) => println!("CHILD: refused: {e}"),
        }
        return;
    }
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let dev_open_to_all = std::fs::metadata("/dev/userfaultfd")
        .map(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.permissions().mode() & 0o006 != 0
        })
        .unwrap_or(false);
    if !root
        || dev_open_to_all
        || std::process::Command::new("setpriv")
            .arg("--help")
            .output()
            .is_err()
    {
        let why = "needs root, setpriv and a root-only /dev/userfaultfd";
        if std::env::var("USERMM_REQUIRE_UFFD").as_deref() == Ok("1") {
            panic!("required but cannot run: {why}");
        }
        eprintln!("SKIP: {why}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "unprivileged_without_the_device_is_refused_clearly",
            "--nocapture",
        ])
        .env("USERMM_UNPRIV_CHILD", "1")
        .env("TMPDIR", "/tmp")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("CHILD: refused")
            && stdout.contains("/dev/userfaultfd")
            && stdout.contains("chmod"),
        "expected a refusal that says how to grant the device; got\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Staging (how usermm learns that a transparent page is still used): a page moved
/// out of the mapping and touched again comes back without I/O; a clean one comes
/// back write-protected, so a write after that is still noticed and survives the
/// page's eviction (moved back writable, the write would be lost).
#[test]
fn a_staged_page_used_again_keeps_its_later_writes() {
    let Some((_d, vm)) = setup(1 << 20, 16 << 20) else {
        return;
    };
    let pages = 128;
    let r = vm.map_transparent(pages * PS).unwrap();
    let at = |p: usize| word(&r, p * PS / 8);
    for p in 0..pages {
        at(p).store(p as u64 + 1, Ordering::Relaxed);
    }
    // Out to swap and back: every page resident, clean, its copy kept.
    assert!(vm.reclaim(pages) >= pages / 2, "{:?}", vm.stats());
    for p in 0..pages {
        assert_eq!(at(p).load(Ordering::Relaxed), p as u64 + 1);
    }
    let before = vm.stats();
    // One eviction's worth of scanning stages the pages it passes.
    vm.reclaim(1);
    let mid = vm.stats();
    assert!(mid.staged > before.staged, "nothing staged: {mid:?}");
    for p in 0..pages {
        assert_eq!(at(p).load(Ordering::Relaxed), p as u64 + 1, "page {p}");
        at(p).store(p as u64 + 1000, Ordering::Relaxed);
    }
    let after = vm.stats();
    assert!(
        after.staged_refaults > mid.staged_refaults,
        "no staged page was used again: {after:?}"
    );
    // Staged pages come back without I/O; only the few evicted ones are read.
    assert!(
        after.pgmajfault - mid.pgmajfault < pages as u64 / 4,
        "staged pages were read from swap: {after:?}"
    );
    assert!(vm.reclaim(pages) >= pages / 2, "{:?}", vm.stats());
    for p in 0..pages {
        assert_eq!(
            at(p).load(Ordering::Relaxed),
            p as u64 + 1000,
            "page {p} lost its write"
        );
    }
}

/// Staging one in four of the unused pages reclaim comes to (`config::DEFAULT_STAGE_EVERY`), not
/// every one: on uniform random reads, where every page is as hot as the next and
/// staging learns nothing, far fewer staged pages are touched again (each a
/// userfaultfd round trip), and no more pages are read from swap. The same trace
/// with every page staged (`stage_every(1)`, the behaviour before) is the planted
/// bug: it must come out worse.
#[test]
fn staging_fewer_pages_costs_fewer_round_trips_and_no_misses() {
    let (budget, pages) = (8usize << 20, 2560usize); // W/B = 1.25
    let run = |every: Option<usize>| {
        let mut cfg = Config::default().memory_budget(budget);
        if let Some(k) = every {
            cfg = cfg.stage_every(k);
        }
        let (_d, vm) = transparent_setup_with(cfg, (2 * pages * PS) as u64)?;
        let r = vm.map_transparent(pages * PS).unwrap();
        for p in 0..pages {
            word(&r, p * PS / 8).store(p as u64, Ordering::Relaxed);
        }
        let mut rng = Rng::new(11);
        let mut touch = |n: usize| {
            for _ in 0..n {
                let p = rng.below(pages as u64) as usize;
                assert_eq!(word(&r, p * PS / 8).load(Ordering::Relaxed), p as u64);
            }
        };
        touch(30_000);
        let s0 = vm.stats();
        let n = 60_000;
        touch(n);
        let s1 = vm.stats();
        let per = |a: u64, b: u64| (b - a) as f64 / n as f64;
        Some((
            per(s0.staged_refaults, s1.staged_refaults),
            per(s0.pgmajfault, s1.pgmajfault),
        ))
    };
    let Some((refaults, majors)) = run(None) else {
        return;
    };
    let (all_refaults, all_majors) = run(Some(1)).expect("set up once already");
    eprintln!(
        "staged refaults per access {refaults:.3} (every page staged: {all_refaults:.3}), \
         major faults {majors:.3} ({all_majors:.3})"
    );
    assert!(
        refaults < 0.6 * all_refaults,
        "staged refaults per access: {refaults:.3} by default, {all_refaults:.3} with every \
         unused page staged"
    );
    assert!(
        majors < all_majors + 0.02,
        "fewer stagings cost misses: {majors:.3} per access against {all_majors:.3}"
    );
}

/// Read-around: pages evicted together (consecutive slots) come back in one read
/// with the page that faulted, each checked against its checksum and holding its
/// own bytes.
#[test]
fn neighbours_on_consecutive_slots_come_in_one_read() {
    let Some((_d, vm)) = setup(1 << 20, 16 << 20) else {
        return;
    };
    let pages = 128;
    let r = vm.map_transparent(pages * PS).unwrap();
    let at = |p: usize, w: usize| word(&r, p * PS / 8 + w);
    for p in 0..pages {
        at(p, 0).store(p as u64 * 7 + 1, Ordering::Relaxed);
        at(p, 511).store(!(p as u64), Ordering::Relaxed);
    }
    assert!(vm.reclaim(pages) >= pages / 2, "{:?}", vm.stats());
    let _ = read_back_batched(&vm, pages, |p| p as u64 * 7 + 1, at);
}

/// Reads every page back in order (word 0 must be `first(p)`, word 511 `!p`) and
/// checks that read-around brought at least half the pages with another's fault;
/// returns the major faults and the pages read.
fn read_back_batched<'a>(
    vm: &Vm,
    pages: usize,
    first: impl Fn(usize) -> u64,
    at: impl Fn(usize, usize) -> &'a AtomicU64,
) -> (u64, u64) {
    let before = vm.stats();
    for p in 0..pages {
        assert_eq!(at(p, 0).load(Ordering::Relaxed), first(p), "page {p}");
        assert_eq!(at(p, 511).load(Ordering::Relaxed), !(p as u64), "page {p}");
    }
    let after = vm.stats();
    let majors = after.pgmajfault - before.pgmajfault;
    let ins = after.pswpin - before.pswpin;
    println!(
        "{majors} major faults, {ins} pages read, {} around",
        after.read_around - before.read_around
    );
    assert!(
        majors * 2 < ins,
        "{majors} major faults for {ins} pages read: read-around did not batch"
    );
    (majors, ins)
}

/// A Vm with a 1 MiB budget whose swap file reads through io_uring, or None (the
/// reason on stderr) where that cannot be had.
fn uring_setup(what: &str) -> Option<(tempfile::TempDir, Vm)> {
    let (d, vm) = setup(1 << 20, 16 << 20)?;
    common::has_uring(&vm, what).then_some((d, vm))
}

/// Read-around of pages whose slots are scattered (rewritten in a shuffled order,
/// so evicted out of address order): where the swap file reads through io_uring,
/// a sequential pass still brings most pages in with the page that faulted, each
/// with its own bytes.
#[test]
fn neighbours_on_scattered_slots_come_in_together_with_io_uring() {
    let Some((_d, vm)) = uring_setup("scattered read-around") else {
        return;
    };
    let pages = 128;
    let r = vm.map_transparent(pages * PS).unwrap();
    let at = |p: usize, w: usize| word(&r, p * PS / 8 + w);
    for p in 0..pages {
        at(p, 0).store(p as u64, Ordering::Relaxed);
    }
    assert!(vm.reclaim(pages) >= pages / 2, "{:?}", vm.stats());
    // Rewritten in a shuffled order (37 is coprime with 128), a few at a time
    // with reclaim in between, so their new slots follow the shuffle.
    for chunk in (0..pages)
        .map(|i| i * 37 % pages)
        .collect::<Vec<_>>()
        .chunks(16)
    {
        for &p in chunk {
            at(p, 0).store(p as u64 * 3 + 5, Ordering::Relaxed);
            at(p, 511).store(!(p as u64), Ordering::Relaxed);
        }
        vm.reclaim(16);
    }
    vm.reclaim(pages);
    let before = vm.stats();
    assert!(
        before.pswpout >= 2 * pages as u64 * 3 / 4,
        "the rewritten pages were not written out again: {before:?}"
    );
    let _ = read_back_batched(&vm, pages, |p| p as u64 * 3 + 5, at);
}

/// Read-around passes over resident pages: a sequential pass through swapped pages
/// with every eighth one back in memory (a scan hits those without a fault) still
/// brings most pages in with another's fault. (It stopped at each resident page,
/// and the fault past it did not count as sequential.)
#[test]
fn resident_pages_along_a_scan_do_not_stop_read_around() {
    let Some((_d, vm)) = uring_setup("read-around past resident pages") else {
        return;
    };
    let pages = 128;
    let r = vm.map_transparent(pages * PS).unwrap();
    let at = |p: usize, w: usize| word(&r, p * PS / 8 + w);
    for p in 0..pages {
        at(p, 0).store(p as u64 * 5 + 2, Ordering::Relaxed);
        at(p, 511).store(!(p as u64), Ordering::Relaxed);
    }
    assert!(vm.reclaim(pages) >= pages * 3 / 4, "{:?}", vm.stats());
    // Islands, brought back backwards (no read-around for them).
    for p in (0..pages).step_by(8).rev() {
        assert_eq!(at(p, 0).load(Ordering::Relaxed), p as u64 * 5 + 2);
    }
    let (majors, ins) = read_back_batched(&vm, pages, |p| p as u64 * 5 + 2, at);
    assert!(
        ins >= pages as u64 / 2,
        "{ins} pages read: were they evicted?"
    );
    assert!(
        majors * 6 <= ins,
        "{majors} major faults for {ins} pages read past resident pages"
    );
}

/// A swap device that fails the read of an evicted page: the faulting thread gets
/// SIGBUS with a line on stderr that names the device, never zeros. In a child
/// process, as above.
#[test]
fn a_failed_swap_in_is_sigbus_naming_the_device() {
    use usermm::device::{faulty::FaultyDevice, file::FileDevice};
    if std::env::var("USERMM_DEVFAIL_CHILD").is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        let file =
            FileDevice::open(&dir.path().join("swap"), Some(16 << 20), "failing-disk").unwrap();
        let dev = Arc::new(FaultyDevice::new(Arc::new(file)));
        vm.swapon_device(dev.clone(), 0).unwrap();
        let pages = 512;
        let r = vm.map_transparent(pages * PS).unwrap();
        for p in 0..pages {
            word(&r, p * PS / 8).store(p as u64 + 1, Ordering::Relaxed);
        }
        vm.reclaim(pages);
        eprintln!("CHILD: device {}", vm.swaps()[0].name);
        dev.set_fail_reads(true);
        let mut sum = 0;
        for p in 0..pages {
            sum += word(&r, p * PS / 8).load(Ordering::Relaxed);
        }
        println!("CHILD: read every page, sum {sum} (should not happen)");
        return;
    }
    if setup(1 << 20, 16 << 20).is_none() {
        return;
    }
    let stderr = child_dies_of_sigbus(
        "a_failed_swap_in_is_sigbus_naming_the_device",
        "USERMM_DEVFAIL_CHILD",
    );
    assert!(
        stderr.contains(
            "usermm: transparent page fault failed: swap device faulty(failing-disk) failed"
        ),
        "no line naming the device: {stderr}"
    );
}

/// swapoff of a device that holds transparent pages: each comes back into its
/// mapping (as a fault would bring it, its copy not kept), reclaim writes others
/// to the device that stays, the device leaves the table, and every word reads as
/// written. (Before, swapoff walked only the explicit spaces: it gave up after
/// 30 s of no progress with the device still in service.)
#[test]
fn swapoff_of_a_device_with_transparent_pages_keeps_every_page() {
    let Some((d, vm)) = setup(1 << 20, 64 << 20) else {
        return;
    };
    let first = vm.swaps()[0].id;
    let second = vm
        .swapon(usermm::SwapSpec::file(d.path().join("swap2"), 64 << 20))
        .unwrap();
    let r = vm.map_transparent(8 << 20).unwrap();
    let pages = (8 << 20) / PS;
    let val = |p: usize| (p as u64) * 7 + 1;
    for p in 0..pages {
        word(&r, p * PS / 8).store(val(p), Ordering::Relaxed);
    }
    let used = |id| vm.swaps().iter().find(|s| s.id == id).map_or(0, |s| s.used);
    assert!(
        used(first) > 0,
        "no transparent page went to the first device (the test proves nothing): {:?}",
        vm.swaps()
    );
    let t0 = std::time::Instant::now();
    vm.swapoff(first).unwrap();
    assert!(
        vm.swaps().iter().all(|s| s.id != first),
        "the device is still listed: {:?}",
        vm.swaps()
    );
    eprintln!(
        "swapoff of {pages} transparent pages took {:?}",
        t0.elapsed()
    );
    assert!(used(second) > 0, "nothing went to the device that stays");
    for p in 0..pages {
        assert_eq!(
            word(&r, p * PS / 8).load(Ordering::Relaxed),
            val(p),
            "page {p} after swapoff"
        );
    }
    drop(r);
    usermm_testkit::check::wait_no_leak(&vm, Duration::from_secs(10)).unwrap();
}

/// A page on swap when a fork's scan records it, then discarded before the fork
/// itself (a large `free` or `calloc` on another thread: `usermm exec` discards
/// outside the heap's lock): the child reads zeros there, as the parent does, not
/// the record's stale bytes; a recorded page left alone reads as written. Through
/// the hidden fork API `usermm exec` uses, in a child process of its own (this
/// binary, re-run with this test alone), which forks.
#[test]
fn a_page_discarded_between_the_forks_scan_and_the_fork_reads_zero_in_the_child() {
    const ENV: &str = "USERMM_DISCARD_FORK_CHILD";
    if std::env::var(ENV).as_deref() != Ok("1") {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_page_discarded_between_the_forks_scan_and_the_fork_reads_zero_in_the_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "the child failed: {text}");
        assert!(text.contains("1 passed"), "the child ran no test: {text}");
        return;
    }
    let Some((d, vm)) = setup(1 << 20, 64 << 20) else {
        return;
    };
    let r = vm.map_transparent(8 << 20).unwrap();
    let pages = (8 << 20) / PS;
    for p in 0..pages {
        word(&r, p * PS / 8).store(p as u64 + 1, Ordering::Relaxed);
    }
    let ticket = vm.prepare_fork(|| {}).unwrap();
    // Evictions are frozen and staged pages back: a page out of the mapping now is
    // on swap, and the scan recorded it.
    let out_of_mapping = |p: usize| {
        let mut v = 0u8;
        // SAFETY: one page of our region; one byte of result on our stack.
        let rc = unsafe { libc::mincore(r.as_ptr().add(p * PS).cast(), PS, &mut v) };
        rc == 0 && v & 1 == 0
    };
    let swapped: Vec<usize> = (0..pages).filter(|&p| out_of_mapping(p)).take(2).collect();
    assert_eq!(
        swapped.len(),
        2,
        "fewer than two pages on swap under a 1 MiB budget"
    );
    let (gone, kept) = (swapped[0], swapped[1]);
    r.discard(gone * PS, PS).unwrap();
    // SAFETY: fork; the child runs only the code below and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let table = ticket.child();
        let code = (|| -> Result<i32, String> {
            let new =
                Vm::new(Config::default().memory_budget(1 << 20)).map_err(|e| e.to_string())?;
            new.swapon(usermm::SwapSpec::file(
                d.path().join("child-swap"),
                64 << 20,
            ))
            .map_err(|e| e.to_string())?;
            let regions = new.adopt_fork(table).map_err(|e| e.to_string())?;
            let g = word(&r, gone * PS / 8).load(Ordering::Relaxed);
            let k = word(&r, kept * PS / 8).load(Ordering::Relaxed);
            std::mem::forget(regions);
            std::mem::forget(new);
            Ok(if g != 0 {
                2
            } else if k != kept as u64 + 1 {
                3
            } else {
                0
            })
        })()
        .unwrap_or_else(|e| {
            eprintln!("child: {e}");
            4
        });
        // SAFETY: ending the forked child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    assert!(pid > 0, "fork failed");
    ticket.parent(pid);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    match libc::WEXITSTATUS(status) {
        0 => {}
        2 => panic!("the page discarded before the fork shows its record's bytes in the child"),
        3 => panic!("a recorded page reads wrong in the child"),
        c => panic!("the child failed (exit {c}; see its stderr)"),
    }
    assert_eq!(word(&r, gone * PS / 8).load(Ordering::Relaxed), 0);
    assert_eq!(
        word(&r, kept * PS / 8).load(Ordering::Relaxed),
        kept as u64 + 1
    );
}
