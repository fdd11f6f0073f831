//! Helpers shared by the integration tests: seeds, a fault-injecting swap device on
//! a real file, leak checks. Page patterns and the watchdog come from the test kit
//! (`usermm_testkit::pattern`, `usermm_testkit::watchdog`): tests import them there.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use usermm::device::faulty::FaultyDevice;
use usermm::device::file::FileDevice;
use usermm::device::BlockDevice;
use usermm::{SwapId, Vm};
use usermm_testkit::workload::Rng;

/// The seed of this run: `USERMM_SEED` (decimal or 0x-hex) or `default`.
pub fn seed(default: u64) -> u64 {
    let s = match std::env::var("USERMM_SEED") {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("USERMM_SEED={v:?} is not a number"))
        }
        Err(_) => default,
    };
    println!("seed = {s} (rerun with USERMM_SEED={s})");
    s
}

/// A generator for thread `tid` of a run with `seed`.
pub fn thread_rng(seed: u64, tid: usize) -> Rng {
    Rng::for_thread(seed, tid as u64)
}

/// A swap file of `bytes` in `dir` behind a fault-injecting wrapper, turned on in `vm`.
pub fn faulty_swap(vm: &Vm, dir: &Path, name: &str, bytes: u64) -> (Arc<FaultyDevice>, SwapId) {
    let file = FileDevice::open(&dir.join(name), Some(bytes), name).expect("create swap file");
    let faulty = Arc::new(FaultyDevice::new(Arc::new(file)));
    let id = vm
        .swapon_device(faulty.clone() as Arc<dyn BlockDevice>, 0)
        .expect("swapon of the faulty device");
    (faulty, id)
}

/// [`usermm_testkit::check::wait_no_leak`], panicking with `ctx` and the counters.
pub fn assert_no_leak(vm: &Vm, limit: Duration, ctx: &str) {
    if let Err(e) = usermm_testkit::check::wait_no_leak(vm, limit) {
        panic!("{ctx}: {e}");
    }
}

/// Reads `VmHWM` and `VmRSS` (in KiB) from `/proc/<pid>/status`.
pub fn hwm_rss_kib(status: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc status:\n{status}"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// `vm.reclaim(pages)`, run on a helper thread so that a reclaim that never returns
/// fails the test after `limit` instead of hanging it (the stuck thread is left behind).
pub fn reclaim_within(vm: &Vm, pages: usize, limit: Duration, ctx: &str) -> usize {
    let (tx, rx) = std::sync::mpsc::channel();
    let vm2 = vm.clone();
    std::thread::Builder::new()
        .name("reclaim".into())
        .spawn(move || {
            let _ = tx.send(vm2.reclaim(pages));
        })
        .unwrap();
    match rx.recv_timeout(limit) {
        Ok(n) => n,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
            "{ctx}: vm.reclaim({pages}) did not return within {limit:?}; stats {:?}",
            vm.stats()
        ),
        Err(e) => panic!("{ctx}: vm.reclaim({pages}) panicked ({e})"),
    }
}

/// A Vm with a file swap device that can map transparent memory, or None (SKIP on
/// stderr) where this process may not open a userfaultfd that serves kernel-mode
/// faults; with USERMM_REQUIRE_UFFD=1 that is a failure instead.
pub fn transparent_setup(budget: usize, swap: u64) -> Option<(tempfile::TempDir, Vm)> {
    transparent_setup_with(usermm::Config::default().memory_budget(budget), swap)
}

/// `transparent_setup` with a configuration of the caller's.
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn transparent_setup_with(cfg: usermm::Config, swap: u64) -> Option<(tempfile::TempDir, Vm)> {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::new(cfg).unwrap();
    vm.swapon(usermm::SwapSpec::file(dir.path().join("swap"), swap))
        .unwrap();
    match vm.map_transparent(usermm::PAGE_SIZE) {
        Ok(_) => Some((dir, vm)),
        Err(e) if std::env::var("USERMM_REQUIRE_UFFD").as_deref() == Ok("1") => {
            panic!("userfaultfd required but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("SKIP: transparent memory unavailable here: {e}");
            None
        }
    }
}

/// Whether a test that needs io_uring reads on its swap file (`SwapInfo::
/// concurrent_reads`) may run: true if it has them; else SKIP on stderr, or a
/// failure with USERMM_REQUIRE_URING=1 (as CI sets it).
pub fn has_uring(vm: &Vm, what: &str) -> bool {
    if vm.swaps().first().is_some_and(|d| d.concurrent_reads) {
        return true;
    }
    if std::env::var("USERMM_REQUIRE_URING").as_deref() == Ok("1") {
        panic!("{what}: io_uring required but the swap file has none here");
    }
    eprintln!("SKIP: {what}: the swap file has no io_uring here");
    false
}

/// Word `i` (8-byte index) of a transparent region, for atomic loads and stores.
pub fn word(r: &usermm::TransparentRegion, i: usize) -> &std::sync::atomic::AtomicU64 {
    assert!(i * 8 < r.len());
    // SAFETY: inside the region, 8-byte aligned; the region outlives the reference
    // and is accessed only atomically by these tests.
    unsafe { &*(r.as_ptr().add(i * 8) as *const std::sync::atomic::AtomicU64) }
}

/// Runs this test binary again as a child process with `env=val`, running only its
/// `child_entry` test (a fresh process, so that its peak RSS means something), and
/// returns the line of its stdout that contains `mark` (the child's result). Panics,
/// with the child's output, if it fails or prints no such line.
pub fn run_self_child(env: &str, val: &str, mark: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(&exe)
        .args(["--exact", "child_entry", "--nocapture"])
        .env(env, val)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child {exe:?} ({env}={val}) failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
        .lines()
        .find(|l| l.contains(mark))
        .unwrap_or_else(|| panic!("child printed no result (did it run?):\n{stdout}\n{stderr}"))
        .to_string()
}

/// The number after `key=` in a child's result line.
pub fn result_field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// A file device that runs `hook` before every write (on the page-I/O thread).
pub struct HookDev {
    inner: FileDevice,
    hook: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for HookDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HookDev")
    }
}

impl BlockDevice for HookDev {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn pages(&self) -> u64 {
        self.inner.pages()
    }
    fn read_page(&self, slot: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_page(slot, buf)
    }
    fn write_page(&self, slot: u64, buf: &[u8]) -> std::io::Result<()> {
        (self.hook)();
        self.inner.write_page(slot, buf)
    }
    fn merges_writes(&self) -> bool {
        self.inner.merges_writes()
    }
    fn write_pages(&self, first: u64, bufs: &[&[u8]]) -> std::io::Result<()> {
        (self.hook)();
        self.inner.write_pages(first, bufs)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, first: u64, count: u64) -> std::io::Result<()> {
        self.inner.discard(first, count)
    }
}

/// A Vm of 64 frames swapping to a hooked file device.
pub fn vm_with_hook(dir: &Path, hook: impl Fn() + Send + Sync + 'static) -> Vm {
    let vm = Vm::new(usermm::Config::default().memory_budget(64 * usermm::PAGE_SIZE)).unwrap();
    let inner = FileDevice::open(&dir.join("swap"), Some(16 << 20), "hooked").unwrap();
    let dev = Arc::new(HookDev {
        inner,
        hook: Box::new(hook),
    });
    vm.swapon_device(dev as Arc<dyn BlockDevice>, 0).unwrap();
    vm
}
