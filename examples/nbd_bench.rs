//! Measurement, not a test (`cargo run --release --example nbd_bench`):
//! swap-in over NBD through usermm versus the server's raw 4 KiB random-read
//! rate at the same depth, measured by `qemu-img bench` against the same export.
//!
//! Our side: a `Vm` with a 4 MiB budget holds a 48 MiB region (so ~92% of the
//! accesses are major faults); `depth` application threads read 8 bytes of random
//! pages; the rate is swap-ins (pswpin) per second. Raw side: `qemu-img bench -d
//! depth -s 4096` with a large prime step (scattered 4 KiB reads over the whole,
//! pre-written export). The two alternate, five rounds each; medians compared.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use usermm::{AddressSpace, Config, Region, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::nbd::{disk, nbdkit, qemu_nbd, skip_without, Endpoint};
use usermm_testkit::pattern::write_page;
use usermm_testkit::workload::Rng;

const EXPORT: u64 = 64 << 20;
const REGION_PAGES: u64 = 12288; // 48 MiB

fn qemu_img_bench(uri: &str, depth: usize, count: usize, write: bool) -> f64 {
    let step = (4099 * 4096).to_string();
    let mut args = vec!["bench", "-f", "raw", "-t", "none", "-s", "4096"];
    if write {
        args.push("-w");
    } else {
        args.extend(["-S", step.as_str()]);
    }
    let (d, c) = (depth.to_string(), count.to_string());
    args.extend(["-d", d.as_str(), "-c", c.as_str(), uri]);
    let out = Command::new("qemu-img")
        .args(&args)
        .output()
        .expect("qemu-img");
    let text = String::from_utf8_lossy(&out.stdout);
    let secs: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|l| l.trim_end_matches(" seconds.").parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "qemu-img bench: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    count as f64 / secs
}

fn swapin_rate(vm: &Vm, mm: &AddressSpace, r: &Region, depth: usize, dur: Duration) -> f64 {
    let stop = AtomicBool::new(false);
    let s0 = vm.stats().pswpin;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..depth {
            let (stop, mm, r) = (&stop, mm, r);
            s.spawn(move || {
                let mut rng = Rng::for_thread(1, t as u64);
                let mut b = [0u8; 8];
                while !stop.load(Ordering::Relaxed) {
                    let p = rng.below(REGION_PAGES);
                    mm.read(r.start() + p * PAGE_SIZE as u64, &mut b).unwrap();
                }
            });
        }
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
    });
    (vm.stats().pswpin - s0) as f64 / t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn compare(server: &str, uri: &str, spec: &str) {
    // Pre-write the whole export so both sides read data, not holes.
    qemu_img_bench(uri, 16, (EXPORT / 4096) as usize, true);
    let vm = Vm::new(Config::default().memory_budget(4 << 20)).unwrap();
    vm.swapon(SwapSpec::parse(spec).unwrap()).unwrap();
    let mm = vm.new_space();
    let r = mm.map_anon(REGION_PAGES as usize * PAGE_SIZE).unwrap();
    for p in 0..REGION_PAGES {
        write_page(&mm, &r, p, 1).unwrap();
    }
    swapin_rate(&vm, &mm, &r, 2, Duration::from_millis(300)); // warm-up
    for depth in [1usize, 4, 16] {
        let (mut raw, mut ours) = (vec![], vec![]);
        for _ in 0..5 {
            let count = 3000 * depth.min(8);
            raw.push(qemu_img_bench(uri, depth, count, false));
            ours.push(swapin_rate(&vm, &mm, &r, depth, Duration::from_millis(800)));
        }
        let (rm, om) = (median(raw.clone()), median(ours.clone()));
        println!(
            "{server:9} depth {depth:2}: raw {rm:8.0}/s  usermm swap-in {om:8.0}/s  ratio {:.2}   (raw {:?}, ours {:?})",
            om / rm,
            raw.iter().map(|x| *x as u64).collect::<Vec<_>>(),
            ours.iter().map(|x| *x as u64).collect::<Vec<_>>()
        );
    }
}

fn swapin_vs_raw_random_read() {
    if skip_without("swapin_vs_raw_random_read", "qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path(), "q.img", EXPORT);
    let q = qemu_nbd(&img, Endpoint::Unix(dir.path().join("q.sock")));
    let Endpoint::Unix(qs) = &q.endpoint else {
        unreachable!()
    };
    compare(
        "qemu-nbd",
        &format!("nbd+unix:///swap?socket={}", qs.display()),
        &q.spec(""),
    );
    drop(q);
    if skip_without("swapin_vs_raw_random_read", "nbdkit") {
        return;
    }
    let k = nbdkit(
        &["memory", "64M"],
        Endpoint::Unix(dir.path().join("k.sock")),
    );
    let Endpoint::Unix(ks) = &k.endpoint else {
        unreachable!()
    };
    compare(
        "nbdkit",
        &format!("nbd+unix:///swap?socket={}", ks.display()),
        &k.spec(""),
    );
}

/// The client alone (no `Vm`): random `read_page` at `depth` threads.
fn device_rate(dev: &usermm::device::nbd::NbdDevice, depth: usize, dur: Duration) -> f64 {
    use usermm::device::BlockDevice;
    let stop = AtomicBool::new(false);
    let n = std::sync::atomic::AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..depth {
            let (stop, n) = (&stop, &n);
            s.spawn(move || {
                let mut buf = usermm::device::AlignedPages::new(1).unwrap();
                let mut rng = Rng::for_thread(2, t as u64);
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    dev.read_page(rng.below(REGION_PAGES), buf.page_mut(0))
                        .unwrap();
                    k += 1;
                }
                n.fetch_add(k, Ordering::Relaxed);
            });
        }
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
    });
    n.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

fn client_vs_raw_random_read() {
    if skip_without("client_vs_raw_random_read", "nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = nbdkit(
        &["memory", "64M"],
        Endpoint::Unix(dir.path().join("k.sock")),
    );
    let Endpoint::Unix(ks) = &k.endpoint else {
        unreachable!()
    };
    let uri = format!("nbd+unix:///swap?socket={}", ks.display());
    qemu_img_bench(&uri, 16, (EXPORT / 4096) as usize, true);
    let conns = std::env::var("CONNS").ok().and_then(|c| c.parse().ok());
    let dev = usermm::device::nbd::NbdDevice::connect(
        &usermm::device::nbd::NbdAddr::Unix(ks.clone()),
        &usermm::device::nbd::NbdOptions {
            export: "swap".into(),
            conns,
            ..Default::default()
        },
        "bench",
    )
    .unwrap();
    for depth in [1usize, 4, 16] {
        let (mut raw, mut ours) = (vec![], vec![]);
        for _ in 0..5 {
            raw.push(qemu_img_bench(&uri, depth, 3000 * depth.min(8), false));
            ours.push(device_rate(&dev, depth, Duration::from_millis(600)));
        }
        let (rm, om) = (median(raw.clone()), median(ours.clone()));
        println!("client depth {depth:2}: raw {rm:8.0}/s  NbdDevice::read_page {om:8.0}/s  ratio {:.2}  conns {}", om / rm, dev.info().conns);
    }
}

fn main() {
    swapin_vs_raw_random_read();
    client_vs_raw_random_read();
}
