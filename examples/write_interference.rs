//! How much page-out writes slow the faults' reads on the same device, by the
//! size of a write: two threads read random 4 KiB slots of a 256 MiB O_DIRECT file
//! (polled, as faults read; queue depth 2), alone and beside a writer that writes
//! runs of `run` adjacent pages at `rate` pages/s, alternating for four 3 s rounds.
//!
//! `cargo run --release --example write_interference -- [run] [rate] [dir]`
//! (defaults 8, 16000, /tmp). Measured here (2026-11-30, rounds alone / writing):
//! runs of 1 page (the writer reached only 9.9k pages/s) 29.3–30.7k → 23.9–25.0k
//! reads/s; runs of 8: 29.2–29.4k → 27.7–28.5k; runs of 64: 28.6–28.8k →
//! 30.5–31.0k. Why kswapd hands page-outs to the I/O threads in batches
//! (`reclaim::KICK_BATCH`).
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use usermm::device::{file::FileDevice, with_read_poll, AlignedPages, BlockDevice};
use usermm_testkit::workload::Rng;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let run: usize = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let rate: f64 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(16000.0);
    let dir = tempfile::tempdir_in(a.get(3).map_or("/tmp", |s| s.as_str())).unwrap();
    let pages = 65536u64;
    let path = dir.path().join("f");
    {
        let f = std::fs::File::create(&path).unwrap();
        let chunk = vec![7u8; 1 << 20];
        for i in 0..pages / 256 {
            f.write_all_at(&chunk, i << 20).unwrap();
        }
        f.sync_all().unwrap();
    }
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let dev = FileDevice::open(&path, None, "probe").unwrap();
    let wbuf = AlignedPages::new(run).unwrap();
    for round in 0..4 {
        let writing = round % 2 == 1;
        let stop = AtomicBool::new(false);
        let (reads, written) = std::thread::scope(|s| {
            let w = s.spawn(|| {
                let (t0, mut n, mut pos) = (Instant::now(), 0u64, 0u64);
                while writing && !stop.load(Ordering::Relaxed) {
                    let due = t0 + Duration::from_secs_f64(n as f64 / rate);
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                    // SAFETY: `wbuf` is `run` pages, alive for the scope; only read.
                    let b = unsafe { std::slice::from_raw_parts(wbuf.ptr(0), run * 4096) };
                    writer.write_all_at(b, pos * 4096).unwrap();
                    pos = (pos + run as u64) % (pages - run as u64);
                    n += run as u64;
                }
                n
            });
            let readers: Vec<_> = (0..2)
                .map(|t| {
                    let (dev, stop) = (&dev, &stop);
                    s.spawn(move || {
                        let buf = AlignedPages::new(1).unwrap();
                        // SAFETY: one page, this thread's own.
                        let b = unsafe { std::slice::from_raw_parts_mut(buf.ptr(0), 4096) };
                        let (mut rng, mut n) = (Rng::new(t + 5), 0u64);
                        with_read_poll(Duration::from_micros(200), || {
                            while !stop.load(Ordering::Relaxed) {
                                dev.read_page(rng.below(pages), b).unwrap();
                                n += 1;
                            }
                        });
                        n
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_secs(3));
            stop.store(true, Ordering::Relaxed);
            let r: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
            (r, w.join().unwrap())
        });
        println!(
            "runs of {run} pages at {rate} pages/s: {}: reads {:.1}k/s, written {:.1}k pages/s",
            if writing { "writing" } else { "alone  " },
            reads as f64 / 3000.0,
            written as f64 / 3000.0
        );
    }
}
