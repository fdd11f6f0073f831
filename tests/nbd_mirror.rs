//! `mirror:(A,B)` over two real NBD servers: one leg is killed (SIGKILL) in the
//! middle of a verified workload, which must complete without a single error; the
//! leg comes back empty (a fresh disk), is resynced from the survivor, and then
//! the *other* leg is killed: every page still reads back right, from the
//! resynced leg alone.

use usermm_testkit::nbd::{disk, qemu_nbd, run_test, skip_without, Endpoint};
use usermm_testkit::pattern::{check_page, verified_workload, write_page};
use usermm_testkit::workload::Rng;

/// How long the test may make no progress before the watchdog fails it.
const STALL: std::time::Duration = std::time::Duration::from_secs(60);
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use usermm::device::mirror::{LegState, MirrorDevice};
use usermm::device::nbd::{NbdAddr, NbdDevice, NbdOptions};
use usermm::device::BlockDevice;
use usermm::{Config, SwapSpec, Vm, PAGE_SIZE};

fn leg(sock: &std::path::Path, name: &str) -> Arc<dyn BlockDevice> {
    Arc::new(
        NbdDevice::connect(
            &NbdAddr::Unix(sock.to_path_buf()),
            &NbdOptions {
                export: "swap".into(),
                timeout: Duration::from_millis(500),
                wait_for_reconnect: false,
                ..NbdOptions::default()
            },
            name,
        )
        .unwrap(),
    )
}

/// Writes and verified reads on the pages p ≡ tid (mod 2); every error fails.
fn churn(
    mm: &usermm::AddressSpace,
    r: &usermm::Region,
    model: &[AtomicU64],
    stop: &AtomicBool,
    tid: u64,
    ops: &AtomicU64,
) {
    let mut rng = Rng::for_thread(0x1234_5678_9ABC_DEF1, tid);
    let n = model.len() as u64 / 2;
    while !stop.load(Ordering::Relaxed) {
        let p = rng.below(n) * 2 + tid;
        let cur = model[p as usize].load(Ordering::Relaxed);
        if rng.below(2) == 0 {
            write_page(mm, r, p, cur + 1).unwrap_or_else(|e| panic!("write page {p}: {e}"));
            model[p as usize].store(cur + 1, Ordering::Relaxed);
        } else {
            let good = check_page(mm, r, p, cur).unwrap_or_else(|e| panic!("read page {p}: {e}"));
            assert!(good, "page {p}: wrong data");
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("  {what} after {:?}", t0.elapsed());
}

#[test]
fn mirror_survives_losing_either_leg() {
    run_test("mirror_survives_losing_either_leg", STALL, || {
        if skip_without("mirror_survives_losing_either_leg", "qemu-nbd") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
        let img_a = disk(dir.path(), "a.img", 32 << 20);
        let img_b = disk(dir.path(), "b.img", 32 << 20);
        let mut srv_a = qemu_nbd(&img_a, Endpoint::Unix(sa.clone()));
        let mut srv_b = qemu_nbd(&img_b, Endpoint::Unix(sb.clone()));
        let m = Arc::new(MirrorDevice::new(leg(&sa, "A"), leg(&sb, "B"), "mirror:(A,B)").unwrap());
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        vm.swapon_device(m.clone(), 0).unwrap();
        let mm = vm.new_space();
        let pages = 2048u64;
        let r = mm.map_anon(pages as usize * PAGE_SIZE).unwrap();
        let model: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(1)).collect();
        for p in 0..pages {
            write_page(&mm, &r, p, 1).unwrap();
        }
        assert_eq!(m.leg_states(), [LegState::Healthy; 2]);
        let stop = AtomicBool::new(false);
        let ops = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..2 {
                let (mm, r, model, stop, ops) = (&mm, &r, &model, &stop, &ops);
                s.spawn(move || churn(mm, r, model, stop, t, ops));
            }
            std::thread::sleep(Duration::from_millis(300));
            println!(
                "  SIGKILL leg B after {} operations",
                ops.load(Ordering::Relaxed)
            );
            srv_b.kill();
            std::thread::sleep(Duration::from_millis(700));
            assert_eq!(m.leg_states()[1], LegState::Degraded);
            let at_restart = ops.load(Ordering::Relaxed);
            // B comes back with an empty disk: everything it had is gone.
            std::fs::remove_file(&img_b).unwrap();
            let img_b = disk(dir.path(), "b.img", 32 << 20);
            srv_b = qemu_nbd(&img_b, Endpoint::Unix(sb.clone()));
            wait_for("leg B resynced", Duration::from_secs(20), || {
                m.leg_states() == [LegState::Healthy; 2]
            });
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::Relaxed);
            assert!(
                ops.load(Ordering::Relaxed) > at_restart,
                "the workload went on"
            );
        });
        let st = m.stats();
        println!(
            "  {} operations, no error; {st:?}; held by B: {:?}",
            ops.load(Ordering::Relaxed),
            m.held(1)
        );
        assert!(st.degraded >= 1 && st.resynced_slots > 0, "{st:?}");

        // Now lose A: B alone must hold every page.
        srv_a.kill();
        let t0 = Instant::now();
        for p in 0..pages {
            let want = model[p as usize].load(Ordering::Relaxed);
            let good = check_page(&mm, &r, p, want)
                .unwrap_or_else(|e| panic!("page {p} after losing A: {e}"));
            assert!(good, "page {p}: wrong data from the resynced leg");
        }
        let st = m.stats();
        println!(
            "  all {pages} pages verified from B alone in {:?}; {st:?}; legs {:?}",
            t0.elapsed(),
            m.leg_states()
        );
        assert_eq!(m.leg_states()[0], LegState::Degraded);
        assert!(vm.stats().pswpin > 0);
        drop(srv_b);
    });
}

/// The spec form goes through `Vm::swapon` (legs opened from their specs).
#[test]
fn mirror_spec_through_swapon() {
    run_test("mirror_spec_through_swapon", STALL, || {
        if skip_without("mirror_spec_through_swapon", "qemu-nbd") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = disk(dir.path(), "a.img", 16 << 20);
        let srv = qemu_nbd(&img, Endpoint::Unix(dir.path().join("a.sock")));
        let file = dir.path().join("b.swap");
        let spec = format!(
            "mirror:({},file:{}?size=16M)?prio=2",
            srv.spec("timeout=2"),
            file.display()
        );
        let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
        vm.swapon(SwapSpec::parse(&spec).unwrap()).unwrap();
        let sw = vm.swaps();
        assert_eq!(sw[0].prio, 2);
        assert_eq!(sw[0].size, 16 << 20);
        verified_workload(&vm, 1536);
    });
}
