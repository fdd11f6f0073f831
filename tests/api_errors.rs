//! Bad input never panics and gets a clear error (the API contract: "Nothing the caller
//! passes can make the library panic"), and running out of memory or swap fails the
//! access that needed a frame, with every page already stored intact.

mod common;

use common::*;
use std::io;
use std::sync::Arc;
use usermm::device::BlockDevice;
use usermm::VADDR_END;
use usermm::{AddressSpace, Config, Error, SwapSpec, VAddr, Vm, PAGE_SIZE};
use usermm_testkit::pattern::{fill_random, first_diff, page_pattern};

const PS: u64 = PAGE_SIZE as u64;

fn is_bad(r: Result<(), Error>, want: u64, ctx: &str) {
    match r {
        Err(Error::BadAddress { addr }) => {
            assert_eq!(
                addr, want,
                "{ctx}: BadAddress reports {addr:#x}, want {want:#x}"
            )
        }
        other => panic!("{ctx}: got {other:?}, want BadAddress {{ addr: {want:#x} }}"),
    }
}

fn small_vm() -> Vm {
    Vm::new(Config::default().memory_budget(1 << 20)).unwrap()
}

#[test]
fn bad_configs_are_config_errors() {
    for (what, cfg) in [
        ("budget 0", Config::default().memory_budget(0)),
        (
            "budget 15 frames",
            Config::default().memory_budget(15 * PAGE_SIZE),
        ),
        (
            "budget 16 frames - 1 byte",
            Config::default().memory_budget(16 * PAGE_SIZE - 1),
        ),
        (
            "io_threads 0",
            Config::default().memory_budget(1 << 20).io_threads(0),
        ),
        (
            "io_requests < io_threads",
            Config::default()
                .memory_budget(1 << 20)
                .io_threads(8)
                .io_requests(4),
        ),
        (
            "watermarks min 0",
            Config::default().memory_budget(1 << 20).watermarks(0, 1, 2),
        ),
        (
            "watermarks out of order",
            Config::default().memory_budget(1 << 20).watermarks(5, 4, 6),
        ),
        (
            "watermarks high >= frames",
            Config::default()
                .memory_budget(1 << 20)
                .watermarks(2, 4, 256),
        ),
    ] {
        match Vm::new(cfg) {
            Err(Error::Config(msg)) => {
                assert!(!msg.is_empty(), "{what}: empty message");
                println!("{what}: {msg}");
            }
            other => panic!("{what}: got {other:?}, want Error::Config"),
        }
    }
    // The smallest budget works.
    let vm = Vm::new(Config::default().memory_budget(16 * PAGE_SIZE)).unwrap();
    assert_eq!(vm.memory_budget(), 16 * PAGE_SIZE);
    assert_eq!(vm.stats().total_frames, 16);
    let vm = Vm::new(Config::default().memory_budget(64 * PAGE_SIZE + 100)).unwrap();
    assert_eq!(vm.stats().total_frames, 64, "budget rounds down to pages");
}

#[test]
fn bad_map_lengths() {
    let vm = small_vm();
    let mm = vm.new_space();
    for (what, len) in [
        ("0", 0usize),
        ("usize::MAX", usize::MAX),
        ("usize::MAX - 4095", usize::MAX - 4095),
    ] {
        match mm.map_anon(len) {
            Err(Error::InvalidArgument(m)) => println!("map_anon({what}): {m}"),
            other => panic!("map_anon({what}): got {other:?}, want InvalidArgument"),
        }
    }
    // Larger than the whole address space: InvalidArgument or OutOfMemory, never Ok.
    match mm.map_anon(1 << 48) {
        Err(Error::InvalidArgument(_)) | Err(Error::OutOfMemory) => {}
        other => panic!("map_anon(2^48): got {other:?}"),
    }
    // A huge sparse region costs nothing until touched; a second one does not fit.
    let big = mm.map_anon(100 << 40).unwrap();
    assert_eq!(big.len(), 100 << 40);
    let mut b = [1u8; 16];
    mm.read(VAddr(big.end().as_u64() - 16), &mut b).unwrap();
    assert_eq!(b, [0; 16], "never-written memory must read as zeros");
    mm.write(VAddr(big.end().as_u64() - 8), b"far away")
        .unwrap();
    let mut c = [0u8; 8];
    mm.read(VAddr(big.end().as_u64() - 8), &mut c).unwrap();
    assert_eq!(&c, b"far away");
    match mm.map_anon(100 << 40) {
        Err(Error::OutOfMemory) => {}
        other => panic!("second 100 TiB map_anon: got {other:?}, want OutOfMemory"),
    }
    assert!(
        vm.stats().metadata_bytes < 16 << 20,
        "a sparse region took metadata: {:?}",
        vm.stats()
    );
    mm.unmap(big).unwrap();
    drop(mm);
    assert_no_leak(&vm, std::time::Duration::from_secs(5), "huge map");
}

/// Reads, writes and guards at addresses outside every region.
#[test]
fn bad_addresses() {
    let vm = small_vm();
    let mm = vm.new_space();
    let r = mm.map_anon(8 * PAGE_SIZE).unwrap();
    let end = r.end().as_u64();
    assert!(r.start().as_u64() > 0);
    // Fill the region with a pattern to check nothing changes.
    let mut orig = vec![0u8; 8 * PAGE_SIZE];
    fill_random(&mut usermm_testkit::workload::Rng::new(1), &mut orig);
    mm.write(r.start(), &orig).unwrap();

    let cases: Vec<(&str, u64, usize, u64)> = vec![
        ("null", 0, 1, 0),
        ("null, 8 bytes", 0, 8, 0),
        ("null page end", PS - 1, 1, PS - 1),
        ("u64::MAX", u64::MAX, 1, u64::MAX),
        (
            "u64::MAX - 1, 8 bytes (overflows)",
            u64::MAX - 1,
            8,
            u64::MAX - 1,
        ),
        (
            "u64::MAX - 4095, 8192 bytes (overflows)",
            u64::MAX - 4095,
            8192,
            u64::MAX - 4095,
        ),
        ("end of the address space", VADDR_END, 1, VADDR_END),
        (
            "last byte of the address space + 1",
            VADDR_END - 1,
            2,
            VADDR_END - 1,
        ),
        ("just past the region", end, 1, end),
        ("a page past the region", end + PS, 100, end + PS),
        ("straddling the region end", end - 10, 20, end),
        (
            "straddling the region end, 3 pages",
            end - 2 * PS - 5,
            3 * PAGE_SIZE,
            end,
        ),
        (
            "whole region + 1",
            r.start().as_u64(),
            8 * PAGE_SIZE + 1,
            end,
        ),
        (
            "just before the region",
            r.start().as_u64() - 1,
            1,
            r.start().as_u64() - 1,
        ),
        (
            "straddling the region start",
            r.start().as_u64() - 3,
            10,
            r.start().as_u64() - 3,
        ),
    ];
    for (what, addr, len, want) in cases {
        let mut buf = vec![0x5Au8; len];
        is_bad(
            mm.read(VAddr(addr), &mut buf),
            want,
            &format!("read {what}"),
        );
        assert!(
            buf.iter().all(|&b| b == 0x5A),
            "read {what}: failed read filled the buffer"
        );
        let data = vec![0xEEu8; len];
        is_bad(mm.write(VAddr(addr), &data), want, &format!("write {what}"));
        if len == 1 {
            is_bad(
                mm.page(VAddr(addr)).map(|_| ()),
                want,
                &format!("page {what}"),
            );
            is_bad(
                mm.page_mut(VAddr(addr)).map(|_| ()),
                want,
                &format!("page_mut {what}"),
            );
        }
        let mut now = vec![0u8; orig.len()];
        mm.read(r.start(), &mut now).unwrap();
        if let Some(d) = first_diff(&now, &orig) {
            panic!("write {what}: a failed write changed the region: {d}");
        }
    }
    // A region with a hole after it: straddling into the hole writes nothing either.
    let a = mm.map_anon(2 * PAGE_SIZE).unwrap();
    let hole = mm.map_anon(PAGE_SIZE).unwrap();
    let c = mm.map_anon(2 * PAGE_SIZE).unwrap();
    assert_eq!(
        a.end(),
        hole.start(),
        "first fit places regions back to back"
    );
    mm.unmap(hole).unwrap();
    mm.write(a.start(), &vec![7u8; 2 * PAGE_SIZE]).unwrap();
    mm.write(c.start(), &vec![9u8; 2 * PAGE_SIZE]).unwrap();
    // From a into c over the hole.
    let span = (c.start().as_u64() + 10 - (a.end().as_u64() - 10)) as usize;
    is_bad(
        mm.write(VAddr(a.end().as_u64() - 10), &vec![1u8; span]),
        a.end().as_u64(),
        "write over a hole",
    );
    is_bad(
        mm.read(VAddr(a.end().as_u64() - 10), &mut vec![0u8; span]),
        a.end().as_u64(),
        "read over a hole",
    );
    let mut got = vec![0u8; 2 * PAGE_SIZE];
    mm.read(a.start(), &mut got).unwrap();
    assert!(
        got.iter().all(|&b| b == 7),
        "write over a hole changed the region before it"
    );
    mm.read(c.start(), &mut got).unwrap();
    assert!(
        got.iter().all(|&b| b == 9),
        "write over a hole changed the region after it"
    );
    // Adjacent regions count as one range.
    if a.start() == r.end() {
        mm.write(VAddr(end - 5), &[3u8; 10])
            .unwrap_or_else(|e| panic!("write across two adjacent regions failed: {e:?}"));
        let mut b = [0u8; 10];
        mm.read(VAddr(end - 5), &mut b).unwrap();
        assert_eq!(b, [3u8; 10]);
    }
    // Zero-length accesses are fine anywhere inside, harmless outside.
    mm.read(r.start(), &mut []).unwrap();
    mm.write(r.start(), &[]).unwrap();
    drop(mm);
    assert_no_leak(&vm, std::time::Duration::from_secs(5), "bad addresses");
}

#[test]
fn bad_unmaps() {
    let vm = small_vm();
    let mm = vm.new_space();
    let other = vm.new_space();
    let r = mm.map_anon(4 * PAGE_SIZE).unwrap();
    mm.write(r.start(), b"x").unwrap();
    mm.unmap(r).unwrap();
    is_bad(mm.unmap(r), r.start().as_u64(), "second unmap");
    is_bad(
        mm.read(r.start(), &mut [0u8; 1]),
        r.start().as_u64(),
        "read after unmap",
    );
    // A region of another space (different length) is not a region of this one.
    let o = other.map_anon(3 * PAGE_SIZE).unwrap();
    let r2 = mm.map_anon(5 * PAGE_SIZE).unwrap();
    assert!(
        matches!(mm.unmap(o), Err(Error::BadAddress { .. })),
        "unmap of another space's region"
    );
    // Same start, other length: not the region that was mapped.
    let r3 = mm.map_anon(PAGE_SIZE).unwrap();
    mm.unmap(r2).unwrap();
    let r4 = mm.map_anon(2 * PAGE_SIZE).unwrap();
    assert_eq!(r4.start(), r2.start(), "first fit reuses the freed range");
    is_bad(
        mm.unmap(r2),
        r2.start().as_u64(),
        "unmap of a stale region with a new one at its start",
    );
    // The failed unmaps changed nothing.
    mm.write(r4.start(), b"still here").unwrap();
    let mut b = [0u8; 10];
    mm.read(r4.start(), &mut b).unwrap();
    assert_eq!(&b, b"still here");
    other.write(o.start(), b"other").unwrap();
    let mut b = [0u8; 5];
    other.read(o.start(), &mut b).unwrap();
    assert_eq!(&b, b"other");
    mm.unmap(r3).unwrap();
    mm.unmap(r4).unwrap();
    other.unmap(o).unwrap();
    assert!(mm.regions().is_empty() && other.regions().is_empty());
    drop((mm, other));
    assert_no_leak(&vm, std::time::Duration::from_secs(5), "bad unmaps");
}

/// A device that reports a size of zero pages.
#[derive(Debug)]
struct Empty;
impl BlockDevice for Empty {
    fn name(&self) -> &str {
        "empty"
    }
    fn pages(&self) -> u64 {
        0
    }
    fn read_page(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
        Err(io::Error::other("empty"))
    }
    fn write_page(&self, _: u64, _: &[u8]) -> io::Result<()> {
        Err(io::Error::other("empty"))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn bad_swap_specs() {
    let dir = tempfile::tempdir().unwrap();
    let vm = small_vm();
    // Unwritable path.
    match vm.swapon(SwapSpec::file("/proc/nonexistent/x", 1 << 20)) {
        Err(Error::Io(e)) => println!("unwritable: {e}"),
        other => panic!("swapon of /proc/nonexistent/x: got {other:?}, want Io"),
    }
    // Missing file and no size.
    let missing = dir.path().join("missing");
    match vm.swapon(SwapSpec::parse(&format!("file:{}", missing.display())).unwrap()) {
        Err(Error::Config(m)) => println!("missing, no size: {m}"),
        other => panic!("swapon of a missing file without size: got {other:?}, want Config"),
    }
    assert!(!missing.exists(), "a failed swapon created the file");
    // Smaller than one page.
    match vm.swapon(SwapSpec::file(dir.path().join("tiny"), 100)) {
        Err(Error::Config(_)) => {}
        other => panic!("swapon of a 100-byte file: got {other:?}, want Config"),
    }
    // A directory.
    match vm.swapon(SwapSpec::file(dir.path(), 1 << 20)) {
        Err(Error::Config(_)) | Err(Error::Io(_)) => {}
        other => panic!("swapon of a directory: got {other:?}, want Config or Io"),
    }
    // Unparsable specs.
    for bad in [
        "",
        "file:",
        "file:/x?size=",
        "file:/x?size=12Q",
        "file:/x?size=0",
        "file:/x?prio=abc",
        "file:/x?prio=99999999",
        "file:/x?bogus=1",
        "file:/x?size",
        "bogus:/x",
        "nbd://127.0.0.1:99999/x",
        "nbd://127.0.0.1:1/x?bogus=1",
        "/var/tmp/no-scheme",
    ] {
        match SwapSpec::parse(bad) {
            Err(Error::Config(m)) => assert!(!m.is_empty()),
            other => panic!("SwapSpec::parse({bad:?}): got {other:?}, want Config"),
        }
    }
    // A device with no pages.
    match vm.swapon_device(Arc::new(Empty), 0) {
        Err(Error::Config(_)) => {}
        other => panic!("swapon_device of a 0-page device: got {other:?}, want Config"),
    }
    assert!(
        vm.swaps().is_empty(),
        "a failed swapon left a device: {:?}",
        vm.swaps()
    );
    // A good one still works after all that.
    let id = vm
        .swapon(
            SwapSpec::parse(&format!(
                "file:{}?size=1M&prio=3",
                dir.path().join("ok").display()
            ))
            .unwrap(),
        )
        .unwrap();
    let sw = vm.swaps();
    assert_eq!(sw.len(), 1);
    assert_eq!(
        (sw[0].id, sw[0].size, sw[0].prio, sw[0].used),
        (id, 1 << 20, 3, 0)
    );
}

/// Writes page `p` of `r` with its pattern; returns the error if any.
fn put(mm: &AddressSpace, base: VAddr, p: u64) -> Result<(), Error> {
    let mut b = vec![0u8; PAGE_SIZE];
    page_pattern(p, &mut b);
    mm.write(base + p * PS, &b)
}

fn check_page(mm: &AddressSpace, base: VAddr, p: u64, ctx: &str) {
    let mut want = vec![0u8; PAGE_SIZE];
    page_pattern(p, &mut want);
    let mut got = vec![0u8; PAGE_SIZE];
    mm.read(base + p * PS, &mut got)
        .unwrap_or_else(|e| panic!("{ctx}: read of stored page {p} failed: {e:?}"));
    if let Some(d) = first_diff(&got, &want) {
        panic!("{ctx}: stored page {p} is wrong: {d}");
    }
}

#[test]
fn out_of_memory_without_swap() {
    let vm = Vm::new(Config::default().memory_budget(32 * PAGE_SIZE)).unwrap();
    let mm = vm.new_space();
    let r = mm.map_anon(64 * PAGE_SIZE).unwrap();
    let mut stored = 0;
    let err = loop {
        match put(&mm, r.start(), stored) {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 64, "64 pages stored in 32 frames without swap");
    };
    println!("stored {stored} pages, then {err:?}; {:?}", vm.stats());
    assert!(
        matches!(err, Error::OutOfMemory),
        "got {err:?}, want OutOfMemory"
    );
    assert!(stored >= 16, "only {stored} of 32 frames usable");
    // Again: still OutOfMemory, for writes and exclusive guards of new pages.
    assert!(matches!(
        put(&mm, r.start(), stored + 1),
        Err(Error::OutOfMemory)
    ));
    assert!(matches!(
        mm.page_mut(r.start() + (stored + 2) * PS).map(|_| ()),
        Err(Error::OutOfMemory)
    ));
    // Earlier pages intact; the page that failed reads as zeros (nothing was written).
    for p in 0..stored {
        check_page(&mm, r.start(), p, "after OutOfMemory");
        // Rewriting a resident page needs no new frame.
        put(&mm, r.start(), p).unwrap();
    }
    let mut z = vec![1u8; PAGE_SIZE];
    mm.read(r.start() + stored * PS, &mut z).unwrap();
    assert!(
        z.iter().all(|&b| b == 0),
        "the failed write wrote something"
    );
    // Freeing memory makes room again.
    let r2 = mm.map_anon(PAGE_SIZE).unwrap();
    mm.unmap(r).unwrap();
    put(&mm, r2.start(), 0).unwrap();
    check_page(&mm, r2.start(), 0, "after unmap");
    drop(mm);
    assert_no_leak(&vm, std::time::Duration::from_secs(5), "out of memory");
}

#[test]
fn out_of_swap() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(32 * PAGE_SIZE)).unwrap();
    let id = vm
        .swapon(SwapSpec::file(dir.path().join("swap"), 64 * PS))
        .unwrap();
    let mm = vm.new_space();
    let r = mm.map_anon(256 * PAGE_SIZE).unwrap();
    let mut stored = 0;
    let err = loop {
        match put(&mm, r.start(), stored) {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 256, "256 pages stored in 32 frames + 64 slots");
    };
    let s = vm.stats();
    println!(
        "stored {stored} pages, then {err:?}; {s:?}; swaps {:?}",
        vm.swaps()
    );
    assert!(
        matches!(err, Error::OutOfSwap),
        "got {err:?}, want OutOfSwap"
    );
    assert!(
        stored >= 64 + 16,
        "only {stored} pages stored in 32 frames + 64 slots"
    );
    assert!(
        stored <= 64 + 32,
        "{stored} pages stored in 32 frames + 64 slots"
    );
    let sw = vm.swaps();
    assert_eq!(sw.len(), 1);
    assert_eq!(sw[0].id, id);
    assert!(sw[0].used > 0 && sw[0].used <= sw[0].size, "{sw:?}");
    // The next page still cannot be had.
    assert!(matches!(
        put(&mm, r.start(), stored + 1),
        Err(Error::OutOfSwap)
    ));
    // Every stored page is intact and readable (Error::OutOfSwap's contract: "Pages
    // already stored are intact and readable"); the failed one reads as zeros.
    let mut unreadable = Vec::new();
    let mut want = vec![0u8; PAGE_SIZE];
    let mut got = vec![0u8; PAGE_SIZE];
    for p in 0..stored {
        page_pattern(p, &mut want);
        match mm.read(r.start() + p * PS, &mut got) {
            Ok(()) => {
                if let Some(d) = first_diff(&got, &want) {
                    panic!("after OutOfSwap: stored page {p} is wrong: {d}");
                }
            }
            Err(e) => unreadable.push((p, e)),
        }
    }
    let mut z = vec![1u8; PAGE_SIZE];
    mm.read(r.start() + stored * PS, &mut z).unwrap();
    assert!(
        z.iter().all(|&b| b == 0),
        "the failed write wrote something"
    );
    let s2 = vm.stats();
    let report = format!(
        "after OutOfSwap, {} of the {stored} stored pages cannot be read: pages {:?} fail with {:?} \
         (their data is on swap; memory is full of dirty pages that cannot get a slot); stats {s2:?}",
        unreadable.len(),
        unreadable.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        unreadable.first().map(|(_, e)| e),
    );
    // Freeing memory makes room again.
    mm.unmap(r).unwrap();
    let r2 = mm.map_anon(8 * PAGE_SIZE).unwrap();
    for p in 0..8 {
        put(&mm, r2.start(), p).unwrap();
    }
    for p in 0..8 {
        check_page(&mm, r2.start(), p, "after unmap");
    }
    drop(mm);
    assert_no_leak(&vm, std::time::Duration::from_secs(5), "out of swap");
    assert!(unreadable.is_empty(), "{report}");
}

/// An NBD timeout too long to add to a deadline (`Duration::MAX`, through the
/// public `NbdOptions`) is refused with a clear error before any connection is
/// tried; it used to overflow `Instant::now() + timeout` (a panic) at the first
/// request or in the reconnecting thread.
#[test]
fn an_nbd_timeout_past_any_deadline_is_refused() {
    use usermm::device::nbd::{NbdAddr, NbdDevice, NbdOptions, MAX_TIMEOUT};
    let d = tempfile::tempdir().unwrap();
    let addr = NbdAddr::Unix(d.path().join("no-server.sock"));
    for timeout in [
        std::time::Duration::MAX,
        MAX_TIMEOUT + std::time::Duration::from_secs(1),
    ] {
        let opts = NbdOptions {
            timeout,
            ..NbdOptions::default()
        };
        match NbdDevice::connect(&addr, &opts, "nbd-test") {
            Err(Error::Config(m)) => assert!(m.contains("timeout"), "{m}"),
            Err(e) => panic!("not a configuration error: {e}"),
            Ok(_) => panic!("a timeout of {timeout:?} was taken"),
        }
    }
}
