//! Device probe: O_DIRECT random/sequential 4 KiB writes and reads at several depths
//! (threads). `cargo run --release --example devprobe`.
use std::time::Instant;
use usermm::device::{file::FileDevice, BlockDevice};
use usermm_testkit::workload::Rng;

fn main() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("probe");
    let pages = (1u64 << 30) / 4096;
    std::fs::write(&path, vec![7u8; 1 << 30]).unwrap();
    let dev = FileDevice::open(&path, None, "probe").unwrap();
    for (what, write, seq) in [
        ("rand read", false, false),
        ("rand write", true, false),
        ("seq write", true, true),
    ] {
        for depth in [1usize, 4, 8, 16, 32] {
            let per = 20_000u64 / depth as u64 + 2000;
            let next = std::sync::atomic::AtomicU64::new(0);
            let t = Instant::now();
            std::thread::scope(|s| {
                for th in 0..depth {
                    let dev = &dev;
                    let next = &next;
                    s.spawn(move || {
                        let mut b = usermm::device::AlignedPages::new(1).unwrap();
                        let mut rng = Rng::new(th as u64 + 1);
                        for _ in 0..per {
                            let slot = if seq {
                                next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % pages
                            } else {
                                rng.below(pages)
                            };
                            if write {
                                dev.write_page(slot, b.page(0)).unwrap();
                            } else {
                                dev.read_page(slot, b.page_mut(0)).unwrap();
                            }
                        }
                    });
                }
            });
            println!(
                "{what} depth {depth}: {:.0} IOPS",
                (per * depth as u64) as f64 / t.elapsed().as_secs_f64()
            );
        }
    }
}
