use usermm::{Config, SwapSpec, VAddr, Vm};

#[test]
fn write_read_under_pressure() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
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
}
