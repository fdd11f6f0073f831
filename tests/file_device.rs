//! The file device and the fault injector, at the device level and through the
//! engine's batched page-out:
//! - O_DIRECT refused by the file system is an error naming the path, unless the
//!   spec asks for buffered I/O with `direct=0` (issue 9 item 11);
//! - the error paths a page-I/O thread can take (short read, short write, slot out of
//!   range, injected failure) allocate nothing (issue 9 item 12), checked with a
//!   counting global allocator that counts per thread;
//! - the fault injector covers the batched `write_pages` (`pwritev`) path, and a
//!   failure there is an error that loses no page.
//!
//! The tests take one lock: the short-write test lowers RLIMIT_FSIZE, which is
//! process-wide.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use usermm::device::faulty::FaultyDevice;
use usermm::device::file::FileDevice;
use usermm::device::{AlignedPages, BlockDevice};
use usermm::{Config, Error, SwapSpec, Vm, PAGE_SIZE};

const PS: u64 = PAGE_SIZE as u64;

// ------------------------------------------------------------ counting allocator

thread_local! {
    /// Allocations (alloc, alloc_zeroed, realloc) made by this thread.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

fn bump() {
    // `try_with`: the counter may be gone while the thread is torn down.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: forwarded; `ptr` came from this allocator, which is `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from this allocator, which is `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the allocations this thread made during it.
fn allocs_during<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCS.with(Cell::get);
    let r = f();
    let after = ALLOCS.with(Cell::get);
    (r, after - before)
}

/// Asserts that `f` fails with `kind` and allocates nothing on the way.
fn assert_fails_without_alloc(what: &str, kind: io::ErrorKind, f: impl FnOnce() -> io::Result<()>) {
    let (r, n) = allocs_during(f);
    let e = match r {
        Ok(()) => panic!("{what}: succeeded, want an error of kind {kind:?}"),
        Err(e) => e,
    };
    assert_eq!(e.kind(), kind, "{what}: {e}");
    assert_eq!(n, 0, "{what}: the error path allocated {n} times ({e})");
}

// ------------------------------------------------------------ helpers

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn pattern(key: u64, out: &mut [u8]) {
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let mut z = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_add(1);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^= z >> 31;
        w.copy_from_slice(&z.to_le_bytes());
    }
}

/// `pages` aligned pages, page `i` filled with pattern `key + i`.
fn filled(pages: usize, key: u64) -> AlignedPages {
    let mut b = AlignedPages::new(pages).unwrap();
    for i in 0..pages {
        pattern(key + i as u64, b.page_mut(i));
    }
    b
}

/// Reads `slot` and says whether it holds pattern `key`.
fn holds(dev: &dyn BlockDevice, slot: u64, key: u64) -> bool {
    let mut got = AlignedPages::new(1).unwrap();
    dev.read_page(slot, got.page_mut(0))
        .unwrap_or_else(|e| panic!("read of slot {slot}: {e}"));
    let mut want = vec![0u8; PAGE_SIZE];
    pattern(key, &mut want);
    got.page(0) == &want[..]
}

/// A directory whose file system refuses O_DIRECT: /dev/shm where tmpfs refuses it
/// (before Linux 6.6), else a ramfs mounted on a temporary directory when root.
struct NoDirectDir {
    path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    mounted: bool,
}

impl Drop for NoDirectDir {
    fn drop(&mut self) {
        if self.mounted {
            let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: plain syscall with a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn refuses_odirect(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(format!("usermm-probe-{}", std::process::id()));
    let r = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p);
    let _ = std::fs::remove_file(&p);
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EINVAL))
}

fn no_direct_dir() -> Option<NoDirectDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && refuses_odirect(shm) {
        let tmp = tempfile::tempdir_in(shm).ok()?;
        return Some(NoDirectDir {
            path: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
            mounted: false,
        });
    }
    // tmpfs takes O_DIRECT since Linux 6.6; ramfs still refuses it.
    let tmp = tempfile::tempdir().ok()?;
    let c = std::ffi::CString::new(tmp.path().as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: plain syscall with valid C strings; a failure (not root) is handled.
    let rc = unsafe {
        libc::mount(
            c"ramfs".as_ptr(),
            c.as_ptr(),
            c"ramfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return None;
    }
    let d = NoDirectDir {
        path: tmp.path().to_path_buf(),
        _tmp: Some(tmp),
        mounted: true,
    };
    refuses_odirect(&d.path).then_some(d)
}

// ------------------------------------------------------------ item 11: O_DIRECT

#[test]
fn odirect_refused_is_an_error_unless_direct_0() {
    let _g = serial();
    let Some(dir) = no_direct_dir() else {
        eprintln!(
            "SKIP odirect_refused_is_an_error_unless_direct_0: no file system refusing \
             O_DIRECT (/dev/shm takes it, and mounting a ramfs needs root)"
        );
        return;
    };
    let path = dir.path.join("a.swap");

    // Without direct=0: an error naming the path, O_DIRECT and the way out.
    let e = FileDevice::open(&path, Some(16 * PS), "a")
        .expect_err("a file system refusing O_DIRECT was accepted (silent buffered fallback)");
    let msg = e.to_string();
    for want in [path.to_str().unwrap(), "refused O_DIRECT", "direct=0"] {
        assert!(msg.contains(want), "error {msg:?} does not say {want:?}");
    }
    assert!(
        matches!(&e, Error::Io(io) if io.kind() == io::ErrorKind::InvalidInput),
        "{e:?}"
    );
    // The same through a spec and `swapon`, with direct=1 spelled out too.
    let vm = Vm::new(Config::default().memory_budget(64 * PAGE_SIZE)).unwrap();
    for text in [
        format!("file:{}?size=64K", path.display()),
        format!("file:{}?size=64K&direct=1", path.display()),
    ] {
        let spec = SwapSpec::parse(&text).unwrap();
        assert!(!spec.buffered(), "{text}");
        let e = vm.swapon(spec).expect_err(&text);
        assert!(e.to_string().contains("refused O_DIRECT"), "{text}: {e}");
    }
    assert!(vm.swaps().is_empty());

    // With direct=0: buffered, and it works.
    let text = format!("file:{}?size=64K&direct=0", path.display());
    let spec = SwapSpec::parse(&text).unwrap();
    assert!(spec.buffered(), "{text}");
    let dev = FileDevice::open(&path, Some(16 * PS), &spec.text).unwrap();
    assert!(!dev.is_direct());
    let b = filled(4, 100);
    let bufs: Vec<&[u8]> = (0..4).map(|i| b.page(i)).collect();
    dev.write_pages(3, &bufs).unwrap();
    dev.write_page(9, b.page(0)).unwrap();
    for i in 0..4 {
        assert!(holds(&dev, 3 + i, 100 + i), "slot {}", 3 + i);
    }
    assert!(holds(&dev, 9, 100));
    drop(dev);
    vm.swapon(spec).expect("swapon with direct=0");
    assert_eq!(vm.swaps().len(), 1);
    assert!(vm.swaps()[0].name.contains("direct=0"));
}

#[test]
fn direct_is_kept_where_the_file_system_takes_it() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    if refuses_odirect(dir.path()) {
        eprintln!("SKIP direct_is_kept_where_the_file_system_takes_it: the temporary directory refuses O_DIRECT");
        return;
    }
    let d = FileDevice::open(&dir.path().join("a"), Some(16 * PS), "a").unwrap();
    assert!(
        d.is_direct(),
        "O_DIRECT dropped on a file system that takes it"
    );
    let spec = SwapSpec::parse(&format!(
        "file:{}?size=64K&direct=1",
        dir.path().join("b").display()
    ))
    .unwrap();
    let d = FileDevice::open(&dir.path().join("b"), Some(16 * PS), &spec.text).unwrap();
    assert!(d.is_direct());
    // direct=0 asks for buffered I/O even where O_DIRECT would work.
    let spec = SwapSpec::parse(&format!(
        "file:{}?size=64K&direct=0",
        dir.path().join("c").display()
    ))
    .unwrap();
    let d = FileDevice::open(&dir.path().join("c"), Some(16 * PS), &spec.text).unwrap();
    assert!(!d.is_direct());
}

#[test]
fn direct_option_parses_for_files_only() {
    for bad in [
        "file:/x?size=1M&direct=2",
        "file:/x?direct=",
        "file:/x?direct=yes",
        "nbd://h/e?direct=0",
        "nbd+unix:///e?socket=/s&direct=1",
    ] {
        assert!(
            matches!(SwapSpec::parse(bad), Err(Error::Config(_))),
            "{bad} parsed"
        );
    }
    let buffered = |s: &str| SwapSpec::parse(s).unwrap().buffered();
    assert!(buffered("file:/x?size=1M&direct=0"));
    assert!(!buffered("file:/x?size=1M&direct=1"));
    assert!(!buffered("file:/x?size=1M"));
    assert!(
        !buffered("file:/x?direct=0&direct=1"),
        "the last direct= wins"
    );
    assert!(buffered(
        "mirror:(file:/a?size=1M&direct=0,file:/b?size=1M)?prio=3"
    ));
    assert!(!buffered("mirror:(file:/a?size=1M,file:/b?size=1M)"));
    assert!(!SwapSpec::file("/x", 1 << 20).buffered());
}

// ------------------------------------------------------------ item 12: no allocation

/// Restores RLIMIT_FSIZE and SIGXFSZ's disposition when dropped.
struct FsizeLimit {
    old: libc::rlimit,
    old_sig: libc::sighandler_t,
}

impl FsizeLimit {
    fn set(bytes: u64) -> FsizeLimit {
        // SAFETY: plain syscalls on structs we own; SIG_IGN is a valid disposition.
        unsafe {
            let mut old: libc::rlimit = std::mem::zeroed();
            assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut old), 0);
            let old_sig = libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let new = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: old.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &new), 0);
            FsizeLimit { old, old_sig }
        }
    }
}

impl Drop for FsizeLimit {
    fn drop(&mut self) {
        // SAFETY: restores the values read in `set`.
        unsafe {
            libc::setrlimit(libc::RLIMIT_FSIZE, &self.old);
            libc::signal(libc::SIGXFSZ, self.old_sig);
        }
    }
}

/// Short reads (the file shrank under the device) and short writes (the file size
/// limit) come back as errors without allocating, as do out-of-range slots and bad
/// buffers: these paths run on page-I/O threads.
#[test]
fn io_error_paths_allocate_nothing() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.swap");
    let dev = FileDevice::open(&path, Some(8 * PS), "a").unwrap();
    let b = filled(8, 1);
    let mut rbuf = AlignedPages::new(4).unwrap();

    // Out of range, bad buffer sizes.
    assert_fails_without_alloc(
        "read beyond the device",
        io::ErrorKind::InvalidInput,
        || dev.read_page(8, rbuf.page_mut(0)),
    );
    assert_fails_without_alloc(
        "write beyond the device",
        io::ErrorKind::InvalidInput,
        || dev.write_page(99, b.page(0)),
    );
    assert_fails_without_alloc("half-page buffer", io::ErrorKind::InvalidInput, || {
        dev.write_page(0, &b.page(0)[..PAGE_SIZE / 2])
    });
    assert_fails_without_alloc("run past the end", io::ErrorKind::InvalidInput, || {
        dev.write_pages(7, &[b.page(0), b.page(1)])
    });

    // Short reads: the file is cut to 2 pages and 100 bytes under the device.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(2 * PS + 100)
        .unwrap();
    assert_fails_without_alloc("read of a cut page", io::ErrorKind::UnexpectedEof, || {
        dev.read_page(2, rbuf.page_mut(0))
    });
    assert_fails_without_alloc(
        "read past the end of the file",
        io::ErrorKind::UnexpectedEof,
        || dev.read_page(5, rbuf.page_mut(0)),
    );
    assert_fails_without_alloc(
        "span read past the end of the file",
        io::ErrorKind::UnexpectedEof,
        || {
            let buf = &mut rbuf;
            // SAFETY: the mapping holds 4 pages; `buf` is borrowed exclusively.
            let all = unsafe { std::slice::from_raw_parts_mut(buf.ptr(0), 4 * PAGE_SIZE) };
            dev.read_pages(2, all)
        },
    );

    // Short writes: a buffered device (O_DIRECT would refuse the unaligned tail) under
    // a file size limit 100 bytes into slot 3.
    let bpath = dir.path().join("b.swap");
    let bdev = FileDevice::open_with(&bpath, Some(8 * PS), "b", false).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bpath)
        .unwrap()
        .set_len(0)
        .unwrap();
    {
        let _limit = FsizeLimit::set(3 * PS + 100);
        assert_fails_without_alloc("short write", io::ErrorKind::WriteZero, || {
            bdev.write_page(3, b.page(3))
        });
        assert_fails_without_alloc("short batched write", io::ErrorKind::WriteZero, || {
            bdev.write_pages(2, &[b.page(2), b.page(3), b.page(4)])
        });
        let (r, n) = allocs_during(|| bdev.write_page(5, b.page(5)));
        let e = r.expect_err("write past the file size limit succeeded");
        assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");
        assert_eq!(n, 0, "EFBIG allocated {n} times");
    }
    // Below the limit nothing was lost: slot 2 holds what the batch wrote.
    assert!(holds(&bdev, 2, 1 + 2));
}

/// The fault injector's failures allocate nothing either (they stand in for device
/// errors on page-I/O threads), on the page and the batched paths.
#[test]
fn injected_failures_allocate_nothing() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let file = FileDevice::open(&dir.path().join("a"), Some(16 * PS), "a").unwrap();
    let f = FaultyDevice::new(Arc::new(file));
    let b = filled(4, 1);
    let mut r = AlignedPages::new(1).unwrap();
    f.set_fail_writes(true);
    f.set_fail_reads(true);
    let eio = |what: &str, res: (io::Result<()>, u64)| {
        let e = res.0.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}");
        assert_eq!(
            res.1, 0,
            "{what}: injected failure allocated {} times",
            res.1
        );
    };
    eio("write_page", allocs_during(|| f.write_page(0, b.page(0))));
    eio(
        "write_pages",
        allocs_during(|| f.write_pages(0, &[b.page(0), b.page(1)])),
    );
    eio("read_page", allocs_during(|| f.read_page(0, r.page_mut(0))));
}

// ------------------------------------------------------------ batched writes

/// Counts the `write_pages` calls of more than one page the engine makes.
#[derive(Debug)]
struct Batches {
    inner: Arc<dyn BlockDevice>,
    runs: AtomicU64,
}

impl BlockDevice for Batches {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn pages(&self) -> u64 {
        self.inner.pages()
    }
    fn read_page(&self, slot: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_page(slot, buf)
    }
    fn write_page(&self, slot: u64, buf: &[u8]) -> io::Result<()> {
        self.inner.write_page(slot, buf)
    }
    fn merges_writes(&self) -> bool {
        self.inner.merges_writes()
    }
    fn write_pages(&self, first: u64, bufs: &[&[u8]]) -> io::Result<()> {
        if bufs.len() > 1 {
            self.runs.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.write_pages(first, bufs)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, first: u64, count: u64) -> io::Result<()> {
        self.inner.discard(first, count)
    }
}

/// A batch through the injector: a failure is an error for the whole call, counts
/// each page, writes at most the pages before the failing one, and a retry succeeds.
#[test]
fn batched_write_failure_is_reported_and_loses_no_page() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let inner = Arc::new(FileDevice::open(&dir.path().join("a"), Some(64 * PS), "a").unwrap());
    let f = FaultyDevice::new(inner.clone());
    assert!(!f.merges_writes(), "batching is opt-in");
    f.set_merge_writes(true);
    assert!(f.merges_writes(), "the batched path is not offered");

    const N: usize = 8;
    let old = filled(N, 1000);
    let new = filled(N, 2000);
    let old_bufs: Vec<&[u8]> = (0..N).map(|i| old.page(i)).collect();
    let new_bufs: Vec<&[u8]> = (0..N).map(|i| new.page(i)).collect();
    f.write_pages(0, &old_bufs).unwrap();

    // The whole batch fails: nothing written, each page counted.
    f.fail_next_writes(1);
    let e = f
        .write_pages(0, &new_bufs)
        .expect_err("injected batch failure not reported");
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert_eq!(f.injected_write_errors.load(Ordering::SeqCst), N as u64);
    for s in 0..N as u64 {
        assert!(
            holds(&*inner, s, 1000 + s),
            "slot {s} changed by a failed batch"
        );
    }
    f.set_fail_writes(true);
    assert!(f.write_pages(0, &new_bufs).is_err());
    for s in 0..N as u64 {
        assert!(
            holds(&*inner, s, 1000 + s),
            "slot {s} changed by a failed batch"
        );
    }
    f.set_fail_writes(false);

    // A page in the middle fails (seeded rate): the pages before it may be written,
    // the failing page and those after it are untouched.
    f.set_failure_rate(150_000, 7);
    let mut partial = 0;
    for round in 0..200 {
        inner.write_pages(0, &old_bufs).unwrap();
        if f.write_pages(0, &new_bufs).is_ok() {
            continue;
        }
        let k = (0..N as u64)
            .position(|s| !holds(&*inner, s, 2000 + s))
            .expect("a failed batch wrote every page");
        for s in k as u64..N as u64 {
            assert!(
                holds(&*inner, s, 1000 + s),
                "round {round}: slot {s} at or after the failing page {k} was written"
            );
        }
        if k > 0 {
            partial += 1;
        }
    }
    assert!(
        partial > 0,
        "no failure in the middle of a batch in 200 rounds"
    );

    // Failures off: the retry succeeds and every page reads back.
    f.set_failure_rate(0, 0);
    f.write_pages(0, &new_bufs).unwrap();
    for s in 0..N as u64 {
        assert!(holds(&f, s, 2000 + s), "slot {s} after the retry");
    }
}

/// The engine's batched page-out through the injector: with every write failing,
/// reclaim frees nothing and counts one error per page of each failed run, the pages
/// stay resident and intact; with failures off they go out (in runs) and come back.
#[test]
fn batched_page_out_failure_loses_no_page() {
    let _g = serial();
    const FRAMES: usize = 64;
    let n: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(Config::default().memory_budget(FRAMES * PAGE_SIZE)).unwrap();
    let file = FileDevice::open(&dir.path().join("a"), Some(32 << 20), "a").unwrap();
    let f = Arc::new(FaultyDevice::new(Arc::new(file)));
    f.set_merge_writes(true);
    let counted = Arc::new(Batches {
        inner: f.clone(),
        runs: AtomicU64::new(0),
    });
    vm.swapon_device(counted.clone(), 0).unwrap();
    let mm = vm.new_space();
    let r = mm.map_anon((n * PS) as usize).unwrap();
    let want = |p: u64| {
        let mut b = vec![0u8; PAGE_SIZE];
        pattern(p * 31 + 5, &mut b);
        b
    };
    for p in 0..n {
        mm.write(r.start() + p * PS, &want(p)).unwrap();
    }
    let check = |ctx: &str| {
        let mut b = vec![0u8; PAGE_SIZE];
        for p in 0..n {
            mm.read(r.start() + p * PS, &mut b)
                .unwrap_or_else(|e| panic!("{ctx}: read of page {p}: {e}"));
            assert!(b == want(p), "{ctx}: page {p} reads back wrong");
        }
    };
    let reclaim = |pages: usize| {
        let (tx, rx) = std::sync::mpsc::channel();
        let vm2 = vm.clone();
        std::thread::spawn(move || {
            let _ = tx.send(vm2.reclaim(pages));
        });
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("vm.reclaim({pages}) hung: {:?}", vm.stats()))
    };

    f.set_fail_writes(true);
    let freed = reclaim(n as usize);
    let s1 = vm.stats();
    assert_eq!(
        freed, 0,
        "reclaim freed frames although every page-out failed: {s1:?}"
    );
    assert!(s1.write_errors > 0, "no page-out was tried: {s1:?}");
    assert!(
        f.injected_write_errors.load(Ordering::SeqCst) > 0,
        "the injector saw no write"
    );
    assert_eq!(
        s1.write_errors,
        f.injected_write_errors.load(Ordering::SeqCst),
        "write_errors differs from the page writes failed"
    );
    assert!(
        counted.runs.load(Ordering::SeqCst) > 0,
        "no failing page-out went through the batched path"
    );
    assert_eq!(s1.pswpout, 0, "{s1:?}");
    assert_eq!(
        s1.swap_used[0].1, 0,
        "failed page-outs kept their slots: {s1:?}"
    );
    check("after failed batched page-out");
    assert_eq!(vm.stats().pgmajfault, s1.pgmajfault, "pages were dropped");

    f.set_fail_writes(false);
    let runs0 = counted.runs.load(Ordering::SeqCst);
    for _ in 0..20 {
        reclaim(10 * FRAMES);
        let s = vm.stats();
        if s.free_frames == s.total_frames {
            break;
        }
    }
    let s2 = vm.stats();
    assert_eq!(
        s2.free_frames, s2.total_frames,
        "memory not emptied: {s2:?}"
    );
    assert_eq!(s2.pswpout, n, "{s2:?}");
    assert!(
        counted.runs.load(Ordering::SeqCst) > runs0,
        "no successful page-out went through the batched path"
    );
    check("after the retried page-outs");
    // Every page came back from the device (by its own fault or read ahead).
    assert_eq!(vm.stats().pswpin, s2.pswpin + n);
}

/// One swap device per file: a second device on a file in use (another `open`,
/// another Vm's `swapon`) is refused with an error that says why, and the file is
/// free again once the first device is gone (dropped, or `swapoff`).
#[test]
fn a_file_serves_one_swap_device_at_a_time() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let first = FileDevice::open(&path, Some(64 * PS), "s").unwrap();
    let in_use = |r: Result<(), Error>| match r {
        Err(Error::Config(m)) => assert!(m.contains("in use"), "{m}"),
        other => panic!("a second device on a file in use: {other:?}"),
    };
    in_use(FileDevice::open(&path, None, "s").map(|_| ()));
    let spec = || SwapSpec::parse(&format!("file:{}", path.display())).unwrap();
    let a = Vm::new(Config::default().memory_budget(64 * PAGE_SIZE)).unwrap();
    in_use(a.swapon(spec()).map(|_| ()));
    drop(first);
    let id = a
        .swapon(spec())
        .expect("the file is free once the device is dropped");
    let b = Vm::new(Config::default().memory_budget(64 * PAGE_SIZE)).unwrap();
    in_use(b.swapon(spec()).map(|_| ()));
    a.swapoff(id).unwrap();
    b.swapon(spec()).expect("the file is free after swapoff");
}
