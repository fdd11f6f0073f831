//! Measures fork of a resident region and the swapoff drain rate against the
//! device's own sequential read rate. `cargo run --release --example forkswapoff`.
use std::time::Instant;
use usermm::{Config, SwapSpec, Vm};

fn main() {
    let gib = 1usize << 30;
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    // Fork of a 1 GiB resident region.
    {
        let vm = Vm::new(Config::default().memory_budget(gib + (64 << 20))).unwrap();
        let mm = vm.new_space();
        let r = mm.map_anon(gib).unwrap();
        for p in 0..(gib / 4096) as u64 {
            mm.write(r.start() + p * 4096, &p.to_le_bytes()).unwrap();
        }
        for _ in 0..3 {
            let t = Instant::now();
            let child = mm.fork().unwrap();
            let fork_ms = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            drop(child);
            println!(
                "fork of 1 GiB resident: {fork_ms:.1} ms (exit of the child {:.1} ms)",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    }
    // swapoff of 1 GiB swapped.
    {
        let vm = Vm::new(Config::default().memory_budget(gib + (128 << 20))).unwrap();
        let path = dir.path().join("drain.swap");
        let id = vm.swapon(SwapSpec::file(&path, 2 * gib as u64)).unwrap();
        let mm = vm.new_space();
        let r = mm.map_anon(gib).unwrap();
        for p in 0..(gib / 4096) as u64 {
            mm.write(r.start() + p * 4096, &p.to_le_bytes()).unwrap();
        }
        let t = Instant::now();
        let freed = vm.reclaim(gib / 4096);
        println!(
            "reclaim of 1 GiB: {freed} pages in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        let used = vm.swaps()[0].used;
        let t = Instant::now();
        vm.swapoff(id).unwrap();
        let el = t.elapsed().as_secs_f64();
        let drain = used as f64 / el / 1e6;
        for p in (0..(gib / 4096) as u64).step_by(97) {
            let mut b = [0u8; 8];
            mm.read(r.start() + p * 4096, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), p);
        }
        // The device's own sequential read rate: 1 MiB O_DIRECT reads of the same file.
        let dev = usermm::device::file::FileDevice::open(&path, None, "probe").unwrap();
        use usermm::device::BlockDevice;
        let mut buf = usermm::device::AlignedPages::new(256).unwrap();
        let span = 256u64;
        let t = Instant::now();
        let mut s = 0;
        while s + span <= used / 4096 {
            // SAFETY: not needed: safe slice from the mapping.
            let b = unsafe { std::slice::from_raw_parts_mut(buf.ptr(0), 256 * 4096) };
            dev.read_pages(s, b).unwrap();
            s += span;
        }
        let seq = (s * 4096) as f64 / t.elapsed().as_secs_f64() / 1e6;
        let _ = buf.page_mut(0);
        println!(
            "swapoff drained {} MiB in {el:.2} s: {drain:.0} MB/s; device sequential read {seq:.0} MB/s; ratio {:.2}",
            used >> 20,
            drain / seq
        );
    }
}
