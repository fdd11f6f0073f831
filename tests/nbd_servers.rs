//! Swap over NBD against real servers, started by the tests on a Unix socket or a
//! free loopback port and stopped by pid: qemu-nbd (structured replies, one
//! connection), nbdkit's memory plugin (structured replies, multi-conn) and
//! nbd-server (simple replies only; reports size 0 before NBD_OPT_GO). Each runs a
//! verified workload through a `Vm` whose budget is far smaller than the data.
//! A server whose binary is missing is skipped with a message (`.ci/run`
//! installs them).

use usermm_testkit::nbd::{
    disk, free_port, nbd_server, nbdkit, qemu_nbd, run_test, skip_without, Endpoint,
};
use usermm_testkit::pattern::{check_page, verified_workload, versioned_page, write_page};
use usermm_testkit::workload::Rng;

/// How long the test may make no progress before the watchdog fails it.
const STALL: std::time::Duration = std::time::Duration::from_secs(60);
use std::sync::Arc;
use std::time::Instant;
use usermm::device::nbd::{NbdAddr, NbdDevice, NbdOptions};
use usermm::device::BlockDevice;
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};

fn small_vm() -> Vm {
    Vm::new(Config::default().memory_budget(2 << 20)).unwrap()
}

/// Device-level checks: direct page I/O, zero pages, flush, discard, bad arguments.
fn device_ops(dev: &NbdDevice) {
    let mut a = usermm::device::AlignedPages::new(2).unwrap();
    versioned_page(5, 9, a.page_mut(0));
    dev.write_page(3, a.page(0)).unwrap();
    dev.read_page(3, a.page_mut(1)).unwrap();
    assert_eq!(a.page(0), a.page(1));
    a.page_mut(0).fill(0);
    dev.write_page(4, a.page(0)).unwrap(); // WRITE_ZEROES if offered
    a.page_mut(1).fill(0xee);
    dev.read_page(4, a.page_mut(1)).unwrap();
    assert!(a.page(1).iter().all(|&b| b == 0));
    dev.flush().unwrap();
    dev.discard(10, 20).unwrap();
    let n = dev.pages();
    assert!(
        dev.read_page(n, a.page_mut(1)).is_err(),
        "slot beyond the end"
    );
    assert!(
        dev.write_page(0, &a.page(0)[..100]).is_err(),
        "short buffer"
    );
    assert!(dev.discard(n, 1).is_err());
}

#[test]
fn qemu_nbd_unix_socket() {
    run_test("qemu_nbd_unix_socket", STALL, || {
        if skip_without("qemu_nbd_unix_socket", "qemu-nbd") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = disk(dir.path(), "disk.img", 64 << 20);
        let srv = qemu_nbd(&img, Endpoint::Unix(dir.path().join("q.sock")));
        let vm = small_vm();
        let spec = srv.spec("timeout=5&prio=3");
        let id = vm.swapon(SwapSpec::parse(&spec).unwrap()).unwrap();
        let sw = vm.swaps();
        assert_eq!(sw[0].id, id);
        assert_eq!(sw[0].size, 64 << 20);
        assert_eq!(sw[0].prio, 3);
        verified_workload(&vm, 4096);
    });
}

#[test]
fn qemu_nbd_tcp() {
    run_test("qemu_nbd_tcp", STALL, || {
        if skip_without("qemu_nbd_tcp", "qemu-nbd") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = disk(dir.path(), "disk.img", 32 << 20);
        let srv = qemu_nbd(&img, Endpoint::Tcp(free_port()));
        let Endpoint::Tcp(port) = srv.endpoint else {
            unreachable!()
        };
        let dev = NbdDevice::connect(
            &NbdAddr::Tcp {
                host: "localhost".into(),
                port,
            },
            &NbdOptions {
                export: "swap".into(),
                ..NbdOptions::default()
            },
            "qemu-tcp",
        )
        .unwrap();
        let info = dev.info();
        println!("  qemu-nbd: {info:?}");
        assert!(info.structured, "qemu-nbd offers structured replies");
        // qemu-nbd advertises multi-conn when it may serve several clients (-e 8).
        assert_eq!(info.conns, if info.multi_conn { 2 } else { 1 });
        assert_eq!(info.size, 32 << 20);
        device_ops(&dev);
        let vm = small_vm();
        vm.swapon_device(Arc::new(dev), 0).unwrap();
        verified_workload(&vm, 2048);
    });
}

#[test]
fn nbdkit_memory_multi_conn() {
    run_test("nbdkit_memory_multi_conn", STALL, || {
        if skip_without("nbdkit_memory_multi_conn", "nbdkit") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let srv = nbdkit(
            &["memory", "64M"],
            Endpoint::Unix(dir.path().join("k.sock")),
        );
        let Endpoint::Unix(sock) = &srv.endpoint else {
            unreachable!()
        };
        let dev = Arc::new(
            NbdDevice::connect(
                &NbdAddr::Unix(sock.clone()),
                &NbdOptions {
                    export: "swap".into(),
                    conns: Some(4),
                    ..NbdOptions::default()
                },
                "nbdkit",
            )
            .unwrap(),
        );
        let info = dev.info();
        println!("  nbdkit: {info:?}");
        assert!(info.structured && info.multi_conn);
        assert_eq!(info.conns, 4);
        assert_eq!(dev.conns_up(), 4);
        device_ops(&dev);
        let vm = small_vm();
        vm.swapon_device(dev.clone(), 0).unwrap();
        verified_workload(&vm, 4096);

        // Several application threads faulting at once share the connections and
        // take turns reading replies.
        let mm = vm.new_space();
        let pages = 2048u64;
        let r = mm.map_anon(pages as usize * PAGE_SIZE).unwrap();
        for p in 0..pages {
            write_page(&mm, &r, p, 3).unwrap();
        }
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (mm, r) = (&mm, &r);
                s.spawn(move || {
                    for p in (t..pages).step_by(4) {
                        assert!(check_page(mm, r, p, 3).unwrap(), "page {p}");
                    }
                });
            }
        });
        println!("  4 threads verified {pages} pages in {:?}", t0.elapsed());
        assert_eq!(dev.stats().protocol_errors, 0);
    });
}

#[test]
fn nbd_server_simple_replies() {
    run_test("nbd_server_simple_replies", STALL, || {
        if skip_without("nbd_server_simple_replies", "nbd-server") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = disk(dir.path(), "disk.img", 48 << 20);
        let srv = nbd_server(dir.path(), &img, free_port());
        let Endpoint::Tcp(port) = srv.endpoint else {
            unreachable!()
        };
        let dev = Arc::new(
            NbdDevice::connect(
                &NbdAddr::Tcp {
                    host: "127.0.0.1".into(),
                    port,
                },
                &NbdOptions {
                    export: "swap".into(),
                    ..NbdOptions::default()
                },
                "nbd-server",
            )
            .unwrap(),
        );
        let info = dev.info();
        println!("  nbd-server: {info:?}");
        assert!(!info.structured, "nbd-server speaks simple replies only");
        assert_eq!(info.size, 48 << 20, "size from the GO reply");
        device_ops(&dev);
        let vm = small_vm();
        vm.swapon_device(dev, 0).unwrap();
        verified_workload(&vm, 3072);
    });
}

/// Many threads on several connections, each writing and verifying its own
/// slots: a reply delivered to the wrong request would show as wrong data.
#[test]
fn client_stress_no_crosstalk() {
    run_test("client_stress_no_crosstalk", STALL, || {
        if skip_without("client_stress_no_crosstalk", "nbdkit") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let srv = nbdkit(
            &["memory", "16M"],
            Endpoint::Unix(dir.path().join("s.sock")),
        );
        let Endpoint::Unix(sock) = &srv.endpoint else {
            unreachable!()
        };
        let dev = NbdDevice::connect(
            &NbdAddr::Unix(sock.clone()),
            &NbdOptions {
                export: "swap".into(),
                conns: Some(3),
                ..NbdOptions::default()
            },
            "stress",
        )
        .unwrap();
        let threads = 8u64;
        let per = dev.pages() / threads;
        let ops = std::sync::atomic::AtomicU64::new(0);
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let (dev, ops) = (&dev, &ops);
                s.spawn(move || {
                    let mut w = usermm::device::AlignedPages::new(1).unwrap();
                    let mut r = usermm::device::AlignedPages::new(1).unwrap();
                    let mut ver = vec![0u64; per as usize];
                    let mut rng = Rng::for_thread(0x5851_F42D_4C95_7F2D, t);
                    while t0.elapsed() < std::time::Duration::from_millis(800) {
                        let i = rng.below(per);
                        let slot = t * per + i;
                        if rng.below(2) == 0 || ver[i as usize] == 0 {
                            ver[i as usize] += 1;
                            versioned_page(slot, ver[i as usize], w.page_mut(0));
                            dev.write_page(slot, w.page(0)).unwrap();
                        } else {
                            dev.read_page(slot, r.page_mut(0)).unwrap();
                            versioned_page(slot, ver[i as usize], w.page_mut(0));
                            assert!(
                                r.page(0) == w.page(0),
                                "slot {slot}: data of another request"
                            );
                        }
                        ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        println!(
            "  {} verified operations by {threads} threads on {} connections in {:?}",
            ops.load(std::sync::atomic::Ordering::Relaxed),
            dev.info().conns,
            t0.elapsed()
        );
        assert_eq!(dev.stats(), usermm::device::nbd::NbdStats::default());
    });
}
