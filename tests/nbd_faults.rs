//! Swap over NBD when the server fails: killed with SIGKILL in the middle of a
//! verified workload and restarted (qemu-nbd on a file: the data survives;
//! nbdkit memory: the data is gone), and nbdkit's error and delay filters (EIO on
//! 30% of requests, 5 ms per read). In every case each page reads back right or
//! the access that needed the server gets `Error::Device` — never wrong data, and
//! nothing is lost that the server kept.

use usermm_testkit::nbd::{disk, nbdkit, qemu_nbd, run_test, skip_without, Endpoint};
use usermm_testkit::pattern::{check_page, write_page};
use usermm_testkit::workload::Rng;

/// How long the test may make no progress before the watchdog fails it.
const STALL: std::time::Duration = std::time::Duration::from_secs(60);
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use usermm::device::nbd::{NbdAddr, NbdDevice, NbdOptions};
use usermm::{Config, Error, Vm, PAGE_SIZE};

fn nbd_dev(sock: &std::path::Path, timeout_ms: u64) -> Arc<NbdDevice> {
    Arc::new(
        NbdDevice::connect(
            &NbdAddr::Unix(sock.to_path_buf()),
            &NbdOptions {
                export: "swap".into(),
                timeout: Duration::from_millis(timeout_ms),
                ..NbdOptions::default()
            },
            "nbd-under-test",
        )
        .unwrap(),
    )
}

struct Tally {
    ok: AtomicU64,
    device_errors: AtomicU64,
}

/// Random writes (new versions) and verified reads over `model` until `stop`.
/// A failed write leaves the model unchanged; a failed read is counted. Any error
/// other than `Error::Device`, and any wrong data, fails the test.
fn churn(
    mm: &usermm::AddressSpace,
    r: &usermm::Region,
    model: &[AtomicU64],
    stop: &AtomicBool,
    tally: &Tally,
    seed: u64,
    part: (u64, u64),
) {
    let (tid, nthreads) = part;
    let mut rng = Rng::for_thread(seed, tid);
    let n = model.len() as u64 / nthreads;
    while !stop.load(Ordering::Relaxed) {
        // Each thread owns the pages p ≡ tid (mod nthreads): the model stays exact.
        let p = rng.below(n) * nthreads + tid;
        let cur = model[p as usize].load(Ordering::Relaxed);
        let res = if rng.below(2) == 0 {
            let v = cur + 1;
            write_page(mm, r, p, v).map(|()| model[p as usize].store(v, Ordering::Relaxed))
        } else {
            check_page(mm, r, p, cur).map(|good| assert!(good, "page {p} read back wrong data"))
        };
        match res {
            Ok(()) => tally.ok.fetch_add(1, Ordering::Relaxed),
            Err(e @ Error::Device { .. }) => {
                if tally.device_errors.fetch_add(1, Ordering::Relaxed) < 3 {
                    println!("  (expected during the outage) {e}");
                }
                0
            }
            Err(e) => panic!("page {p}: unexpected error {e:?}"),
        };
    }
}

#[test]
fn qemu_nbd_killed_and_restarted() {
    run_test("qemu_nbd_killed_and_restarted", STALL, || {
        if skip_without("qemu_nbd_killed_and_restarted", "qemu-nbd") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = disk(dir.path(), "disk.img", 32 << 20);
        let sock = dir.path().join("q.sock");
        let mut srv = qemu_nbd(&img, Endpoint::Unix(sock.clone()));
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        // The outage (1 s) is longer than the timeout (0.4 s): accesses that need the
        // server fail with Error::Device during it, and work again after the restart.
        let dev = nbd_dev(&sock, 400);
        vm.swapon_device(dev.clone(), 0).unwrap();
        let mm = vm.new_space();
        let pages = 2048u64;
        let r = mm.map_anon(pages as usize * PAGE_SIZE).unwrap();
        let model: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(1)).collect();
        for p in 0..pages {
            write_page(&mm, &r, p, 1).unwrap();
        }
        let stop = AtomicBool::new(false);
        let tally = Tally {
            ok: AtomicU64::new(0),
            device_errors: AtomicU64::new(0),
        };
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for t in 0..2 {
                let (mm, r, model, stop, tally) = (&mm, &r, &model, &stop, &tally);
                s.spawn(move || churn(mm, r, model, stop, tally, 0x9E37, (t, 2)));
            }
            std::thread::sleep(Duration::from_millis(300));
            let before = tally.ok.load(Ordering::Relaxed);
            println!(
                "  SIGKILL qemu-nbd (pid {:?}) after {before} operations",
                srv.pid()
            );
            srv.kill();
            std::thread::sleep(Duration::from_millis(1000));
            let outage_errors = tally.device_errors.load(Ordering::Relaxed);
            let ok_at_restart = tally.ok.load(Ordering::Relaxed);
            println!("  restart; during the outage: {outage_errors} device errors");
            assert!(
                outage_errors > 0,
                "accesses that needed the dead server must fail"
            );
            srv = qemu_nbd(&img, Endpoint::Unix(sock.clone()));
            // The reconnector finds the server within its backoff (at most 0.5 s).
            let t = Instant::now();
            while dev.stats().reconnects == 0 {
                assert!(t.elapsed() < Duration::from_secs(10), "no reconnection");
                std::thread::sleep(Duration::from_millis(10));
            }
            println!("  reconnected {:?} after the restart", t.elapsed());
            std::thread::sleep(Duration::from_millis(500));
            stop.store(true, Ordering::Relaxed);
            assert!(
                tally.ok.load(Ordering::Relaxed) > ok_at_restart + 100,
                "the workload continues after the restart"
            );
        });
        let during = vm.stats();
        println!(
            "  churn {:?}: {} ok, {} device errors; {:?}; {:?}",
            t0.elapsed(),
            tally.ok.load(Ordering::Relaxed),
            tally.device_errors.load(Ordering::Relaxed),
            dev.stats(),
            during
        );
        assert!(dev.stats().reconnects >= 1, "{:?}", dev.stats());
        // Every page reads back as last written (the server is back: retry transient errors).
        for p in 0..pages {
            let want = model[p as usize].load(Ordering::Relaxed);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match check_page(&mm, &r, p, want) {
                    Ok(good) => {
                        assert!(good, "page {p} lost its version {want}");
                        break;
                    }
                    Err(e @ Error::Device { .. }) if Instant::now() < deadline => {
                        println!("  retry page {p}: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("page {p}: {e}"),
                }
            }
        }
        let after = vm.stats();
        assert!(
            after.pswpin > during.pswpin,
            "nothing was read after the restart"
        );
        assert!(tally.ok.load(Ordering::Relaxed) > 100);
        drop(srv);
    });
}

/// nbdkit's memory plugin loses everything when killed: after the restart every
/// page that was only on the server must fail with `Error::Device` (the checksum
/// does not match), never come back as zeroes.
#[test]
fn nbdkit_restarted_empty_never_returns_wrong_data() {
    run_test(
        "nbdkit_restarted_empty_never_returns_wrong_data",
        STALL,
        || {
            if skip_without("nbdkit_restarted_empty_never_returns_wrong_data", "nbdkit") {
                return;
            }
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("k.sock");
            let mut srv = nbdkit(&["memory", "32M"], Endpoint::Unix(sock.clone()));
            let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
            let dev = nbd_dev(&sock, 2000);
            vm.swapon_device(dev.clone(), 0).unwrap();
            let mm = vm.new_space();
            let pages = 1024u64;
            let r = mm.map_anon(pages as usize * PAGE_SIZE).unwrap();
            for p in 0..pages {
                write_page(&mm, &r, p, 7).unwrap();
            }
            srv.kill();
            srv = nbdkit(&["memory", "32M"], Endpoint::Unix(sock.clone()));
            let (mut good, mut lost) = (0, 0);
            for p in 0..pages {
                match check_page(&mm, &r, p, 7) {
                    Ok(true) => good += 1, // still resident
                    Ok(false) => panic!("page {p}: wrong data after the server lost it"),
                    Err(Error::Device { source, .. }) => {
                        assert_eq!(source.kind(), std::io::ErrorKind::InvalidData, "{source}");
                        lost += 1;
                    }
                    Err(e) => panic!("page {p}: {e}"),
                }
            }
            println!("  after restart: {good} resident pages intact, {lost} lost pages reported as errors");
            assert!(lost > pages / 2, "most pages were on the server");
            assert!(dev.stats().reconnects >= 1);
            drop(srv);
        },
    );
}

#[test]
fn nbdkit_error_and_delay_filters() {
    run_test("nbdkit_error_and_delay_filters", STALL, || {
        if skip_without("nbdkit_error_and_delay_filters", "nbdkit") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("e.sock");
        let srv = nbdkit(
            &[
                "--filter=error",
                "--filter=delay",
                "memory",
                "32M",
                "error-rate=30%",
                "error=EIO",
                "delay-read=5ms",
            ],
            Endpoint::Unix(sock.clone()),
        );
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        let dev = nbd_dev(&sock, 5000);
        vm.swapon_device(dev.clone(), 0).unwrap();
        let mm = vm.new_space();
        let pages = 768u64;
        let r = mm.map_anon(pages as usize * PAGE_SIZE).unwrap();
        let t0 = Instant::now();
        for p in 0..pages {
            // A write access may need a frame whose page-out keeps failing.
            let mut tries = 0;
            while let Err(e) = write_page(&mm, &r, p, 2) {
                assert!(matches!(e, Error::Device { .. }), "{e:?}");
                tries += 1;
                assert!(tries < 100, "page {p}: {e}");
            }
        }
        let read_errors = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (mm, r, read_errors) = (&mm, &r, &read_errors);
                s.spawn(move || {
                    for p in (t..pages).step_by(4) {
                        let mut tries = 0;
                        loop {
                            match check_page(mm, r, p, 2) {
                                Ok(good) => {
                                    assert!(good, "page {p} corrupted");
                                    break;
                                }
                                Err(Error::Device { source, .. }) => {
                                    assert_eq!(source.raw_os_error(), Some(libc::EIO), "{source}");
                                    read_errors.fetch_add(1, Ordering::Relaxed);
                                    tries += 1;
                                    assert!(tries < 100, "page {p} never readable");
                                }
                                Err(e) => panic!("page {p}: {e}"),
                            }
                        }
                    }
                });
            }
        });
        let s = vm.stats();
        println!(
            "  {pages} pages in {:?}: {} read errors surfaced and retried; {:?}; {:?}",
            t0.elapsed(),
            read_errors.load(Ordering::Relaxed),
            s,
            dev.stats()
        );
        assert!(
            s.write_errors > 0,
            "EIO on writes must show as write errors"
        );
        assert!(read_errors.load(Ordering::Relaxed) > 0);
        assert!(s.pswpin > pages / 2);
        assert_eq!(dev.stats().protocol_errors, 0);
        assert_eq!(
            dev.stats().reconnects,
            0,
            "an EIO reply is not a broken link"
        );
        drop(srv);
    });
}
