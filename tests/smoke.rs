use usermm::{Config, SwapSpec, VAddr, Vm};

#[test]
fn write_read_under_pressure() {
    write_read_with(Config::default());
}

/// The same through io_uring page-out (`Config::uring_writes`): the pages come
/// back as written, and the device says it was written through the ring, with
/// registered buffers on this kernel. SKIP where io_uring is unavailable, unless
/// CI asks for everything (USERMM_REQUIRE_URING=1).
#[test]
fn write_read_under_pressure_with_uring_page_out() {
    let vm = write_read_with(Config::default().uring_writes(true));
    let ring = vm.swaps().first().is_some_and(|d| d.concurrent_reads);
    if !ring {
        assert_ne!(
            std::env::var("USERMM_REQUIRE_URING").as_deref(),
            Ok("1"),
            "io_uring required but not available here"
        );
        eprintln!("SKIP: io_uring is not available here");
        return;
    }
    let d = &vm.swaps()[0];
    assert!(d.uring_writes, "{d:?}");
    // `WRITEV_FIXED` and cloned registrations: Linux 6.15.
    let (major, minor) = kernel_version();
    if (major, minor) >= (6, 15) {
        assert!(d.registered_buffers, "{d:?}");
    }
    let d = &write_read_with(Config::default()).swaps()[0];
    assert!(
        !d.uring_writes && !d.registered_buffers,
        "the default: {d:?}"
    );
}

/// The running kernel's (major, minor) version, from uname.
fn kernel_version() -> (u32, u32) {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Writes 16 MiB of numbered pages under a 1 MiB budget, reads them back, and
/// returns the Vm (its swap device still on).
fn write_read_with(cfg: Config) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(cfg.memory_budget(1 << 20)).unwrap();
    vm.swapon(SwapSpec::file(dir.path().join("s"), 64 << 20))
        .unwrap();
    let mm = vm.new_space();
    let r = mm.map_anon(16 << 20).unwrap();
    let pages = (16 << 20) / 4096u64;
    for p in 0..pages {
        mm.write(r.start() + p * 4096 + 8, &p.to_le_bytes())
            .unwrap();
    }
    for p in 0..pages {
        let mut b = [0u8; 8];
        mm.read(r.start() + p * 4096 + 8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), p, "page {p}");
        let mut z = [1u8; 8];
        mm.read(r.start() + p * 4096 + 16, &mut z).unwrap();
        assert_eq!(z, [0; 8]);
    }
    let s = vm.stats();
    assert!(s.pswpout > 0 && s.pswpin > 0, "{s:?}");
    assert!(mm.read(VAddr(5), &mut [0u8; 1]).is_err());
    mm.unmap(r).unwrap();
    drop(mm);
    let s = vm.stats();
    assert_eq!(s.free_frames, s.total_frames);
    assert_eq!(s.swap_used[0].1, 0, "{s:?}");
    vm
}
