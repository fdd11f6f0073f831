//! The LD_PRELOAD library of `usermm exec`: an unmodified program's heap (the malloc
//! family) in a transparent region of a usermm Vm, inside a hard budget, with its
//! pages paged to usermm's swap devices.
//!
//! ## How
//! - At load (a constructor, after libc's), it reads its settings from the
//!   environment `usermm exec` prepared (`USERMM_BUDGET`, `USERMM_SWAP`,
//!   `USERMM_SWAP_DIR`, `USERMM_HEAP`, `USERMM_READ_POLL_US`), makes a Vm, adds the swap devices (or a
//!   temporary swap file, created 0600 and unlinked at once), maps one transparent
//!   region for the heap and hands it to `talc`, a maintained allocator that works
//!   over a given span of memory.
//! - `malloc`, `free`, `calloc`, `realloc`, `reallocarray`, `memalign`,
//!   `posix_memalign`, `aligned_alloc`, `valloc`, `pvalloc` and `malloc_usable_size`
//!   are ours. Each block carries a 16-byte header (its size and the offset back to
//!   what talc gave), so `free` needs no size. Pointers from outside the heap (made
//!   before the constructor ran, by glibc's allocator) go back to glibc.
//! - usermm's own allocations (page tables, the handler's bookkeeping) do not come
//!   from the program's heap: this library's Rust global allocator calls glibc's
//!   `__libc_malloc` family directly. So the fault handler never waits for the lock
//!   of the allocator whose page faulted (seeds 003 and 004 in a new form).
//! - `fork()`: a child that does not exec sees exactly its parent's memory, pages
//!   that were on swap included, under a budget of its own (the same size; each
//!   process of the tree has its own). The kernel does not carry userfaultfd
//!   registration into a child, so the wrapper does (`usermm::Vm::prepare_fork`,
//!   the library's `mm::transparent_fork`): in the parent, with the heap's lock held
//!   and evictions frozen, every heap page on swap gets one more slot reference and
//!   a record (the swap file's descriptor, the slot's offset and checksum); in the
//!   child (one thread; malloc served by glibc meanwhile), a new Vm with a new
//!   temporary swap file registers the heap, takes the pages resident in the child
//!   into its budget, and reads each of the others from its parent's swap file on
//!   its first fault. A pipe tells the parent when the child no longer needs the
//!   slots (it exited, exec'd, or read them all). A heap page on a swap device
//!   another process cannot read (NBD, mirror) makes `fork` fail with ENOMEM and a
//!   line on stderr. Before the fork the wrapper brings in the heap pages of every
//!   open `FILE` (glibc's fork writes their locks in the child before any atfork
//!   handler runs there) and of the locale data (every thread the child's Vm starts
//!   reads it); the child repairs any other page it finds touched that way. The
//!   child's Vm is made in our atfork child handler (registered at start-up, so it
//!   runs before the program's own child handlers). `posix_spawn`/`vfork` (the
//!   child shares the parent's memory, then execs) are not interposed; a child that
//!   execs gets its own usermm, with a temporary swap file of its own (the
//!   `--swap` devices are the first program's: `USERMM_SWAP` is taken out of the
//!   environment at start).
//! - Freed malloc blocks of 64 KiB or more have their whole pages discarded
//!   (`TransparentRegion::discard`: frame and swap slot back, the page reads as
//!   zeros), as glibc gives large freed memory back to the kernel; a large `calloc`
//!   is zeroed the same way instead of by writing every byte.
//!
//! ## mmap
//! `mmap`/`mmap64` of exactly a private anonymous read-write mapping (flags
//! `MAP_PRIVATE|MAP_ANONYMOUS`, optionally `MAP_NORESERVE`; fd -1, offset 0, no
//! address) is served from the heap, so memory a program maps itself (CPython's
//! object arenas, numpy's large arrays through malloc, C programs) is in the budget
//! too. Everything else goes to the kernel: shared, file, `MAP_FIXED*`, `MAP_STACK`,
//! `MAP_GROWSDOWN`, `MAP_HUGETLB`, `MAP_32BIT`, `MAP_POPULATE`, `MAP_LOCKED`,
//! another protection, and any call with an address hint (a program that passes
//! one may depend on where the memory lands). So do calls before the heap is set
//! up and calls from usermm's own threads. The kernel is reached by the raw system
//! call (`syscall(SYS_mmap, …)`), not by a `dlsym(RTLD_NEXT)` lookup, which could
//! allocate and recurse into this library; a later LD_PRELOAD library that also
//! interposes mmap is bypassed.
//!
//! A block is a talc allocation aligned to a page, its length rounded up to pages,
//! recorded in `MAPS` with the parts still mapped. It reads as zeros because it is
//! discarded when it is handed out (cheap where its pages were discarded already:
//! an untouched entry costs a load), and it gives its memory back because every
//! part is discarded when it is unmapped. `munmap` of a whole block frees it; of a
//! part, discards that part, and the block is freed when nothing of it is left.
//! `mremap` shrinks in place (the tail discarded); grows in place when the pages
//! after the range are unmapped parts of the same block or free heap space talc
//! can extend the block into, else with `MREMAP_MAYMOVE` into a new block (copied),
//! else fails with ENOMEM. `madvise(MADV_DONTNEED|MADV_FREE|MADV_REMOVE)` on the
//! heap discards (the kernel doing it would drop pages behind usermm's back);
//! other advice on the heap is accepted and ignored.
//!
//! Deviations from the kernel's behaviour, on heap memory only:
//! - an access to an unmapped part of a block (or a freed block) does not SIGSEGV:
//!   it reads zeros or whatever the space holds by then;
//! - `munmap` of heap memory that is no mmap block (malloc's) does nothing and
//!   returns 0; address hints are not honoured (such calls go to the kernel);
//! - `mremap` with `MREMAP_FIXED` or `MREMAP_DONTUNMAP` fails with EINVAL (a line
//!   on stderr, once), and a moving `mremap` copies the bytes (the kernel moves page
//!   tables), faulting in the old range;
//! - `mmap(MAP_FIXED)` over the heap fails with EINVAL (it would replace usermm's
//!   mapping) with a line on stderr, once;
//! - `mprotect` is not interposed: a program that changes the protection of heap
//!   memory it mapped, then unmaps it, leaves that protection on space the heap
//!   hands out again (not seen in the programs tested; a known gap);
//! - `mremap` is defined with its optional fifth argument as a fixed one (Rust has
//!   no stable variadic definitions): on x86-64 and AArch64 Linux it is passed in
//!   the same register either way.
//!
//! usermm's own calls to `mmap`/`madvise` resolve to these definitions too (this
//! library exports them): they happen at set-up (before the heap is ready, so they
//! go to the kernel) and on usermm's threads (likewise); `discard` calls the
//! `madvise` system call directly.
//!
//! ## Locking
//! The heap (`HEAP`) is one lock around talc; a thread may fault on heap memory
//! while holding it, which is fine: the fault handler never takes it. It and
//! `FORKING` are futex words of our own (`FutexLock`), not parking_lot mutexes: the
//! heap's lock is held across the fork (taken in our atfork prepare handler, after
//! the program's own, which may malloc) and the child (one thread) resets both
//! words; a parking_lot unlock there could hand a lock to a parent thread that does
//! not exist in the child. Order in `fork()`: `FORKING` (one fork at a time through
//! the wrapper), the Vm's freeze and its locks (`prepare_fork`; glibc's stream list
//! lock in `touch_stdio`, which takes no lock of ours), then, inside libc's fork,
//! `HEAP`.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::ptr::{null_mut, NonNull};
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
    fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
}

/// usermm's own memory: glibc's allocator, never the program's heap.
struct Glibc;

// SAFETY: forwards to glibc's allocator, which meets GlobalAlloc's contract for
// alignments it is asked for through memalign.
unsafe impl GlobalAlloc for Glibc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: glibc allocation with a valid alignment (a power of two).
        unsafe {
            if l.align() <= 16 {
                __libc_malloc(l.size()).cast()
            } else {
                __libc_memalign(l.align(), l.size()).cast()
            }
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, _: Layout) {
        // SAFETY: `p` came from `alloc` above.
        unsafe { __libc_free(p.cast()) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as for alloc.
        unsafe {
            if l.align() <= 16 {
                __libc_calloc(1, l.size()).cast()
            } else {
                let p: *mut u8 = __libc_memalign(l.align(), l.size()).cast();
                if !p.is_null() {
                    p.write_bytes(0, l.size());
                }
                p
            }
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: `p` came from `alloc` with layout `l`.
        unsafe {
            if l.align() <= 16 {
                __libc_realloc(p.cast(), new).cast()
            } else {
                let q = self.alloc(Layout::from_size_align_unchecked(new, l.align()));
                if !q.is_null() {
                    std::ptr::copy_nonoverlapping(p, q, l.size().min(new));
                    self.dealloc(p, l);
                }
                q
            }
        }
    }
}

#[global_allocator]
static GLOBAL: Glibc = Glibc;

/// 0: not set up (glibc serves), 1: setting up, 2: ready, 3: failed.
static STATE: AtomicU8 = AtomicU8::new(0);
static BASE: AtomicUsize = AtomicUsize::new(0);
static END: AtomicUsize = AtomicUsize::new(0);
/// The heap: talc behind a `FutexLock`.
static HEAP: FutexCell<Option<talc::Talc<talc::ErrOnOom>>> = FutexCell::new(None);
/// The Vm of the heap: a leaked `Box`, set at start-up and replaced in a fork child
/// (the old one is leaked too: its threads do not exist there).
static VM: AtomicPtr<usermm::Vm> = AtomicPtr::new(null_mut());
/// The heap's transparent region (freed blocks and mmap blocks are discarded
/// through it): a leaked `Box`, set at start-up and replaced in a fork child.
static REGION: AtomicPtr<usermm::TransparentRegion> = AtomicPtr::new(null_mut());

fn region() -> Option<&'static usermm::TransparentRegion> {
    let p = REGION.load(Ordering::Acquire);
    // SAFETY: a leaked `Box` (never freed), published with release.
    (!p.is_null()).then(|| unsafe { &*p })
}
/// The settings a fork child needs for its own Vm (set once at start-up: the child
/// must not read the environment, whose strings may be in the heap).
static BUDGET: AtomicU64 = AtomicU64::new(0);
static HEAP_LEN: AtomicU64 = AtomicU64::new(0);
static SWAP_DIR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn vm() -> Option<&'static usermm::Vm> {
    let p = VM.load(Ordering::Acquire);
    // SAFETY: a leaked `Box` (never freed), published with release.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// A futex mutex (0 free, 1 locked, 2 locked with sleepers) whose whole state is
/// one word, so a fork child (one thread) can reset it: a lock with sleepers must not
/// be handed, in the child, to a thread that does not exist there (parking_lot's
/// would be; its parking table is process-global).
struct FutexLock(AtomicU32);

impl FutexLock {
    const fn new() -> FutexLock {
        FutexLock(AtomicU32::new(0))
    }

    fn lock(&self) {
        for _ in 0..64 {
            if self
                .0
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
            std::hint::spin_loop();
        }
        while self.0.swap(2, Ordering::Acquire) != 0 {
            // SAFETY: futex wait on our word while it is 2 (no timeout).
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.0.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    2,
                    null_mut::<libc::timespec>(),
                )
            };
        }
    }

    /// Unlocks a lock this thread holds.
    fn unlock(&self) {
        if self.0.swap(0, Ordering::Release) == 2 {
            // SAFETY: futex wake of one sleeper on our word.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.0.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    1,
                )
            };
        }
    }

    /// In a fork child (one thread): free, whoever held it in the parent.
    fn reset(&self) {
        self.0.store(0, Ordering::Release);
    }
}

/// A value behind a `FutexLock` (the heap, the mmap table).
struct FutexCell<T> {
    lock: FutexLock,
    val: UnsafeCell<T>,
}

// SAFETY: `val` is only reached through a `FutexGuard`, which exists only while
// `lock` is held by this thread.
unsafe impl<T: Send> Sync for FutexCell<T> {}

struct FutexGuard<T: 'static>(&'static FutexCell<T>);

impl<T> FutexCell<T> {
    const fn new(val: T) -> FutexCell<T> {
        FutexCell {
            lock: FutexLock::new(),
            val: UnsafeCell::new(val),
        }
    }

    fn lock(&'static self) -> FutexGuard<T> {
        self.lock.lock();
        FutexGuard(self)
    }
}

impl<T> Drop for FutexGuard<T> {
    fn drop(&mut self) {
        self.0.lock.unlock();
    }
}

impl<T> std::ops::Deref for FutexGuard<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the lock is held (see `FutexCell`).
        unsafe { &*self.0.val.get() }
    }
}

impl<T> std::ops::DerefMut for FutexGuard<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the lock is held by this guard alone.
        unsafe { &mut *self.0.val.get() }
    }
}

const HDR: usize = 16;

fn ours(p: *mut c_void) -> bool {
    let a = p as usize;
    a >= BASE.load(Ordering::Acquire) && a < END.load(Ordering::Acquire)
}

fn say(msg: &str) {
    let line = format!("usermm exec: {msg}\n");
    // SAFETY: writing our buffer to stderr.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

fn parse_size(v: &str) -> Option<u64> {
    usermm::config::parse_size(v).ok()
}

/// Sets the heap up from the environment; see the module header.
fn setup() -> Result<(), String> {
    let env = |k: &str| std::env::var(k).ok();
    let budget = env("USERMM_BUDGET")
        .and_then(|v| parse_size(&v))
        .ok_or("USERMM_BUDGET is not set (run the program through `usermm exec`)")?;
    let heap = env("USERMM_HEAP")
        .and_then(|v| parse_size(&v))
        .unwrap_or(64 << 30);
    let specs: Vec<String> = env("USERMM_SWAP")
        .map(|s| {
            s.split('\n')
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let dir = env("USERMM_SWAP_DIR").unwrap_or_else(|| "/var/tmp".into());
    // The devices of `--swap` are this process's: a descendant that execs gets a
    // temporary swap file of its own (two processes on one device would hand out
    // the same slots; a swap file is locked while in use and a second user would
    // be refused).
    // SAFETY: a constructor, before the program's main: no other thread reads the
    // environment yet.
    unsafe { std::env::remove_var("USERMM_SWAP") };
    BUDGET.store(budget, Ordering::Relaxed);
    HEAP_LEN.store(heap, Ordering::Relaxed);
    let _ = SWAP_DIR.set(dir.clone());
    // SAFETY: registering plain functions (see `fork`).
    unsafe {
        libc::pthread_atfork(
            Some(atfork_prepare),
            Some(atfork_parent),
            Some(atfork_child),
        )
    };
    let vm = new_vm(budget, heap, &specs, &dir)?;
    let region = vm
        .map_transparent(heap as usize)
        .map_err(|e| e.to_string())?;
    let base = region.as_ptr() as usize;
    let len = region.len();
    let mut t = talc::Talc::new(talc::ErrOnOom);
    // SAFETY: the region is ours for the life of the process (leaked below) and
    // nothing else uses it.
    unsafe {
        t.claim(talc::Span::from_base_size(base as *mut u8, len))
            .map_err(|_| "the allocator could not take the heap region".to_string())?;
    }
    *HEAP.lock() = Some(t);
    BASE.store(base, Ordering::Release);
    END.store(base + len, Ordering::Release);
    // Kept for the life of the process (leaked): freed blocks and mmap blocks are
    // discarded through it.
    REGION.store(Box::into_raw(Box::new(region)), Ordering::Release);
    VM.store(Box::into_raw(Box::new(vm)), Ordering::Release);
    if env("USERMM_STATS").is_some_and(|v| !v.is_empty()) {
        // Programs close stderr before exit (coreutils do): keep a copy.
        // SAFETY: duplicating a descriptor; registering a plain function.
        unsafe {
            STATS_FD.store(libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 64), Ordering::Relaxed);
            libc::atexit(print_stats);
        }
    }
    Ok(())
}

/// A Vm of `budget` bytes with the swap devices `specs`, or a temporary swap file of
/// `heap` bytes in `dir` when there are none.
fn new_vm(budget: u64, heap: u64, specs: &[String], dir: &str) -> Result<usermm::Vm, String> {
    let mut cfg = usermm::Config::default().memory_budget(budget as usize);
    if let Some(us) = std::env::var("USERMM_READ_POLL_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        cfg = cfg.read_poll(std::time::Duration::from_micros(us));
    }
    let vm = usermm::Vm::new(cfg).map_err(|e| e.to_string())?;
    for s in specs {
        let spec = usermm::SwapSpec::parse(s).map_err(|e| e.to_string())?;
        vm.swapon(spec).map_err(|e| e.to_string())?;
    }
    if specs.is_empty() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::path::Path::new(&dir)
            .join(format!("usermm-exec-{}-{nanos}.swap", std::process::id()));
        // Created 0600, sparse, and unlinked at once: nothing is left after a kill.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("cannot create the swap file {}: {e}", path.display()))?;
        }
        let spec = format!("file:{}?size={heap}&sparse=1", path.display());
        let r = usermm::SwapSpec::parse(&spec).and_then(|s| vm.swapon(s));
        let _ = std::fs::remove_file(&path);
        r.map_err(|e| e.to_string())?;
    }
    Ok(vm)
}

/// Where `--stats` writes (a copy of stderr made at start).
static STATS_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// `usermm exec --stats`: the heap's counters, one line, at exit.
extern "C" fn print_stats() {
    let Some(vm) = vm() else { return };
    let s = vm.stats();
    let line = format!(
        "usermm exec: pid {} budget {} frames: faults {} (major {}), write-protect faults {}, staged {} (used again {}), read-around {}, \
         pswpin {}, pswpout {}, scanned {}, reclaimed {}, direct reclaim {}, \
         read errors {}, write errors {}, swap used {} KiB, held for children {} pages, \
         read from parent {} pages, zpool stored {} pages, metadata {} KiB\n",
        std::process::id(),
        s.total_frames,
        s.pgfault,
        s.pgmajfault,
        s.wp_faults,
        s.staged,
        s.staged_refaults,
        s.read_around,
        s.pswpin,
        s.pswpout,
        s.pgscan,
        s.pgsteal,
        s.direct_reclaim,
        s.read_errors,
        s.write_errors,
        s.swap_used.iter().map(|(_, b)| b).sum::<u64>() >> 10,
        vm.fork_held_pages(),
        vm.foreign_reads(),
        s.zpool_stored,
        s.metadata_bytes >> 10
    );
    let fd = STATS_FD.load(Ordering::Relaxed);
    // SAFETY: writing our buffer to our copy of stderr.
    unsafe {
        libc::write(
            if fd >= 0 { fd } else { 2 },
            line.as_ptr().cast(),
            line.len(),
        )
    };
}

extern "C" fn init() {
    // Loaded without `usermm exec`'s settings (a test harness, a stray LD_PRELOAD):
    // stay out of the way; glibc serves every call.
    if std::env::var_os("USERMM_BUDGET").is_none() {
        STATE.store(3, Ordering::Release);
        return;
    }
    if STATE
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    // The constructor runs on the program's thread (before `main`, or in the
    // thread that loads us): known to be the program's even if the threads the Vm
    // starts have not marked themselves yet when it first allocates.
    usermm::sync::mark_program_thread();
    match setup() {
        Ok(()) => STATE.store(2, Ordering::Release),
        Err(e) => {
            STATE.store(3, Ordering::Release);
            say(&format!("cannot set up the heap: {e}"));
            // The program must not run outside its budget without saying so.
            // SAFETY: ending the process.
            unsafe { libc::_exit(125) };
        }
    }
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

/// Whether this call is served from the budgeted heap: set up, and not from one of
/// usermm's own threads (a fault handler must never fault on what it serves; glibc
/// calls malloc for such a thread's TLS destructors, for instance).
fn ready() -> bool {
    STATE.load(Ordering::Acquire) == 2
        && !spawning()
        // Not one of usermm's threads, nor one that has started but not marked
        // itself yet (it allocates before its own code runs, glibc's bookkeeping of
        // its thread-locals, and it may be the fault handler that a program thread,
        // holding the heap's lock and faulting on the heap, waits for): a thread
        // known to be the program's. glibc serves the others (`free` tells the
        // blocks apart by address). Program threads are served from the heap
        // while one of usermm's threads starts (see `usermm::sync::program_thread`).
        && usermm::sync::program_thread()
}

/// The thread that is starting one of usermm's threads from the program's side
/// (`fork` in the parent), or 0: glibc serves it meanwhile, so the new thread's
/// bookkeeping (its TLS vector) is not in the heap, which a later fork child
/// touches while its heap is not registered yet (glibc reuses the stacks of the
/// parent's threads there).
static SPAWNER: AtomicU64 = AtomicU64::new(0);

fn spawning() -> bool {
    let t = SPAWNER.load(Ordering::Relaxed);
    // SAFETY: gettid has no arguments.
    t != 0 && t == unsafe { libc::syscall(libc::SYS_gettid) } as u64
}

/// Allocates `size` bytes aligned to `align` (≥ 16) from the heap.
fn heap_alloc(size: usize, align: usize) -> *mut c_void {
    let align = align.max(HDR);
    let Some(total) = size.checked_add(align) else {
        return null_mut();
    };
    let Ok(layout) = Layout::from_size_align(total.max(1), align) else {
        return null_mut();
    };
    let raw = {
        let mut h = HEAP.lock();
        let Some(t) = h.as_mut() else {
            return null_mut();
        };
        // SAFETY: a nonzero layout.
        match unsafe { t.malloc(layout) } {
            Ok(p) => p.as_ptr(),
            Err(()) => return null_mut(),
        }
    };
    // The block starts `align` bytes in, so the header fits before it.
    // SAFETY: `raw` has `total` ≥ align + size bytes.
    let p = unsafe { raw.add(align) };
    // SAFETY: the header lies inside the block: [p - 16, p).
    unsafe {
        (p.sub(16) as *mut usize).write(size);
        (p.sub(8) as *mut usize).write(align);
    }
    p.cast()
}

/// Size and alignment recorded for a heap block.
///
/// # Safety
/// `p` must be a live block from `heap_alloc`.
unsafe fn header(p: *mut c_void) -> (usize, usize) {
    let p = p as *mut u8;
    // SAFETY: per the contract, the header precedes `p`.
    unsafe {
        (
            (p.sub(16) as *const usize).read(),
            (p.sub(8) as *const usize).read(),
        )
    }
}

/// # Safety
/// `p` must be a live block from `heap_alloc`.
unsafe fn heap_free(p: *mut c_void) {
    // SAFETY: per the contract.
    let (size, align) = unsafe { header(p) };
    let raw_addr = p as usize - align;
    if size >= DISCARD_MIN {
        // Its whole pages go back to the budget and swap before talc may hand the
        // space out again (talc keeps its own bookkeeping outside the block).
        discard_inside(raw_addr, raw_addr + align + size);
    }
    // SAFETY: the block began `align` bytes before `p`, with this layout.
    unsafe {
        let raw = (p as *mut u8).sub(align);
        let layout = Layout::from_size_align_unchecked(size + align, align);
        if let Some(t) = HEAP.lock().as_mut() {
            t.free(NonNull::new_unchecked(raw), layout);
        }
    }
}

/// `malloc(3)`.
#[no_mangle]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    if !ready() {
        // SAFETY: glibc's allocator.
        return unsafe { __libc_malloc(size) };
    }
    let p = heap_alloc(size, 16);
    if p.is_null() {
        // SAFETY: setting errno for this thread.
        unsafe { *libc::__errno_location() = libc::ENOMEM };
    }
    p
}

/// `free(3)`.
///
/// # Safety
/// `p` is null or a live block of this allocator or glibc's.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    if ours(p) {
        if STATE.load(Ordering::Acquire) != 2 {
            // A fork child setting its heap up (glibc freeing one of its blocks while
            // starting threads): the heap may not be touched yet; the block leaks.
            return;
        }
        // SAFETY: a block of our heap, per the caller.
        unsafe { heap_free(p) }
    } else {
        // SAFETY: a block of glibc's, per the caller.
        unsafe { __libc_free(p) }
    }
}

/// `cfree`, an old alias of `free`.
///
/// # Safety
/// As `free`.
#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: as free.
    unsafe { free(p) }
}

/// `calloc(3)`.
#[no_mangle]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    if !ready() {
        // SAFETY: glibc's allocator.
        return unsafe { __libc_calloc(n, size) };
    }
    let Some(total) = n.checked_mul(size) else {
        // SAFETY: setting errno.
        unsafe { *libc::__errno_location() = libc::ENOMEM };
        return null_mut();
    };
    let p = malloc(total);
    if p.is_null() {
        return p;
    }
    let (a, e) = (p as usize, p as usize + total);
    // A large block is zeroed by discarding its whole pages (no frame is taken for
    // them until they are written); only the partial pages at its ends are cleared.
    let (lo, hi) = if total >= DISCARD_MIN && discard_inside(a, e) {
        (page_up(a), page_down(e))
    } else {
        (e, e)
    };
    // SAFETY: both spans lie inside the fresh block of `total` bytes.
    unsafe {
        (a as *mut u8).write_bytes(0, lo.min(e) - a);
        (hi as *mut u8).write_bytes(0, e - hi);
    }
    p
}

/// `realloc(3)`.
///
/// # Safety
/// `p` is null or a live block of this allocator or glibc's.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        return malloc(size);
    }
    if !ours(p) {
        if !ready() {
            // SAFETY: glibc's block, glibc's allocator.
            return unsafe { __libc_realloc(p, size) };
        }
        // A block glibc made before the heap was set up: move it into the heap.
        // SAFETY: glibc's block.
        let old = unsafe { glibc_usable_size(p) };
        let q = malloc(size);
        if !q.is_null() {
            // SAFETY: both blocks hold at least the bytes copied.
            unsafe {
                std::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, old.min(size));
                __libc_free(p);
            }
        }
        return q;
    }
    if size == 0 {
        // SAFETY: our block.
        unsafe { heap_free(p) };
        return null_mut();
    }
    // SAFETY: our block.
    let (old, align) = unsafe { header(p) };
    let q = heap_alloc(size, align);
    if !q.is_null() {
        // SAFETY: both blocks hold at least the bytes copied; `p` is freed after.
        unsafe {
            std::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, old.min(size));
            heap_free(p);
        }
    }
    q
}

/// `reallocarray(3)`.
///
/// # Safety
/// As `realloc`.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: as realloc.
        Some(t) => unsafe { realloc(p, t) },
        None => {
            // SAFETY: setting errno.
            unsafe { *libc::__errno_location() = libc::ENOMEM };
            null_mut()
        }
    }
}

/// `memalign(3)`.
#[no_mangle]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        // SAFETY: setting errno.
        unsafe { *libc::__errno_location() = libc::EINVAL };
        return null_mut();
    }
    if !ready() {
        // SAFETY: glibc's allocator.
        return unsafe { __libc_memalign(align, size) };
    }
    heap_alloc(size, align)
}

/// `aligned_alloc(3)`.
#[no_mangle]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    memalign(align, size)
}

/// `posix_memalign(3)`.
///
/// # Safety
/// `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    if !align.is_power_of_two() || !align.is_multiple_of(std::mem::size_of::<usize>()) {
        return libc::EINVAL;
    }
    let p = memalign(align, size);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: per the caller.
    unsafe { *out = p };
    0
}

/// `valloc(3)`.
#[no_mangle]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    memalign(4096, size)
}

/// `pvalloc(3)`.
#[no_mangle]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    memalign(4096, size.div_ceil(4096).max(1) * 4096)
}

/// `malloc_usable_size(3)`.
///
/// # Safety
/// `p` is null or a live block.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if ours(p) {
        // SAFETY: our block.
        unsafe { header(p).0 }
    } else {
        // SAFETY: glibc's block; ask glibc through its own symbol.
        unsafe { glibc_usable_size(p) }
    }
}

/// glibc's `malloc_usable_size`, found past ours.
///
/// # Safety
/// `p` is a live glibc block.
unsafe fn glibc_usable_size(p: *mut c_void) -> usize {
    type F = unsafe extern "C" fn(*mut c_void) -> usize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let mut f = NEXT.load(Ordering::Relaxed);
    if f == 0 {
        // SAFETY: looking up the next definition of a libc symbol.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"malloc_usable_size".as_ptr()) } as usize;
        NEXT.store(f, Ordering::Relaxed);
    }
    if f == 0 {
        return 0;
    }
    // SAFETY: the symbol has this signature.
    unsafe { std::mem::transmute::<usize, F>(f)(p) }
}

/// Reads one byte of each page of `[p, p + len)` that lies in the heap (bringing it
/// in).
fn touch(p: *const u8, len: usize) {
    let mut a = p as usize & !4095;
    while a < p as usize + len {
        let q = a.max(p as usize);
        if ours(q as *mut c_void) {
            // SAFETY: a page of our heap region, mapped for the life of the process;
            // a read brings it in.
            unsafe { std::ptr::read_volatile(q as *const u8) };
        }
        a += 4096;
    }
}

/// libc's `fork`, looked up once (`dlsym` may free an old error string: never with
/// the heap's lock held).
fn real_fork() -> libc::pid_t {
    type F = unsafe extern "C" fn() -> libc::pid_t;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let mut f = NEXT.load(Ordering::Relaxed);
    if f == 0 {
        // SAFETY: looking up the next definition of a libc symbol.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"fork".as_ptr()) } as usize;
        NEXT.store(f, Ordering::Relaxed);
    }
    if f == 0 {
        return -1;
    }
    // SAFETY: the symbol has this signature.
    unsafe { std::mem::transmute::<usize, F>(f)() }
}

/// One `fork()` at a time goes through the wrapper (its ticket is in `TICKET`).
static FORKING: FutexLock = FutexLock::new();

/// The ticket of the fork under way, for the atfork handlers. Written and taken
/// with `FORKING` held (or in the child, which has one thread).
struct TicketCell(UnsafeCell<Option<usermm::ForkTicket<'static>>>);
// SAFETY: see `TicketCell`: accessed only under `FORKING` or by the child's only
// thread.
unsafe impl Sync for TicketCell {}
static TICKET: TicketCell = TicketCell(UnsafeCell::new(None));

/// Whether `atfork_prepare` took the heap's lock (read by the parent and child
/// handlers of the same fork).
static HEAP_HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `fork(2)`: a child that does not exec sees exactly its parent's memory, pages
/// that were on swap included, and has a budget of its own (see the module header
/// and `usermm::Vm::prepare_fork`).
///
/// Here: evictions frozen, `Vm::prepare_fork` takes a slot reference for each heap
/// page on swap and records where the child reads it; the ticket goes to the atfork
/// handlers. `atfork_prepare` takes the heap's lock (after the program's own prepare
/// handlers, which may malloc; as glibc does with its arenas), `atfork_parent`
/// drops it, and `atfork_child` gives the child its own Vm before any other child
/// handler of the program runs.
#[no_mangle]
pub extern "C" fn fork() -> libc::pid_t {
    let Some(vm) = vm().filter(|_| ready()) else {
        return real_fork();
    };
    FORKING.lock();
    // Once before the freeze (faults may need evictions), once under it (for what
    // left again meanwhile).
    touch_stdio();
    match vm.prepare_fork(touch_stdio) {
        // SAFETY: `FORKING` is held.
        Ok(t) => unsafe { *TICKET.0.get() = Some(t) },
        Err(e) => {
            FORKING.unlock();
            say(&format!(
                "this program called fork() and the child could not be given its parent's \
                 heap: {e}; fork fails with ENOMEM"
            ));
            // SAFETY: setting errno.
            unsafe { *libc::__errno_location() = libc::ENOMEM };
            return -1;
        }
    }
    let pid = real_fork();
    if pid == 0 {
        // `atfork_child` has set the heap up (or ended the child).
        FORKING.reset();
        return 0;
    }
    // SAFETY: reading this thread's errno.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: `FORKING` is held.
    let ticket = unsafe { (*TICKET.0.get()).take() };
    FORKING.unlock();
    if let Some(t) = ticket {
        // SAFETY: gettid has no arguments.
        SPAWNER.store(
            unsafe { libc::syscall(libc::SYS_gettid) } as u64,
            Ordering::Relaxed,
        );
        t.parent(pid);
        SPAWNER.store(0, Ordering::Relaxed);
    }
    // SAFETY: restoring this thread's errno (fork's, if it failed).
    unsafe { *libc::__errno_location() = errno };
    pid
}

/// Registered at start-up: see `fork`.
extern "C" fn atfork_prepare() {
    if STATE.load(Ordering::Acquire) == 2 && !usermm::sync::is_engine_thread() {
        // A thread of the parent may be inside malloc or mmap: the child must not
        // inherit talc or the mmap table half-way through a change.
        MAPS.lock.lock();
        HEAP.lock.lock();
        HEAP_HELD.store(true, Ordering::Relaxed);
    }
}

extern "C" fn atfork_parent() {
    if HEAP_HELD.swap(false, Ordering::Relaxed) {
        HEAP.lock.unlock();
        MAPS.lock.unlock();
    }
}

/// In the child, before the program's own child handlers (registered later): a Vm
/// of its own adopts the heap (see `fork`). Until then malloc goes to glibc.
extern "C" fn atfork_child() {
    if !HEAP_HELD.swap(false, Ordering::Relaxed) {
        return;
    }
    // SAFETY: the child's only thread.
    let Some(ticket) = (unsafe { (*TICKET.0.get()).take() }) else {
        // A fork that did not come through our wrapper: the heap stays plain memory
        // (pages on swap in the parent would read as zeros: nothing can be done
        // here).
        HEAP.lock.reset();
        MAPS.lock.reset();
        return;
    };
    STATE.store(1, Ordering::Release);
    let table = ticket.child();
    let budget = BUDGET.load(Ordering::Relaxed);
    let len = HEAP_LEN.load(Ordering::Relaxed);
    let dir = SWAP_DIR.get().map_or("/var/tmp", |d| d.as_str());
    let adopted = new_vm(budget, len, &[], dir).and_then(|new| {
        let regions = new.adopt_fork(table).map_err(|e| e.to_string())?;
        for r in regions {
            // The heap's region (there is one), leaked like the parent's; the
            // parent's handle in this process is leaked with its Vm.
            REGION.store(Box::into_raw(Box::new(r)), Ordering::Release);
        }
        Ok(new)
    });
    match adopted {
        Ok(new) => VM.store(Box::into_raw(Box::new(new)), Ordering::Release),
        Err(e) => {
            say(&format!(
                "fork: the child cannot take its heap into a budget of its own: {e}"
            ));
            // SAFETY: ending the child; its heap is not readable.
            unsafe { libc::_exit(125) };
        }
    }
    HEAP.lock.reset();
    MAPS.lock.reset();
    // The child's only thread, the program's: served from the heap while the new
    // Vm's threads are still starting.
    usermm::sync::mark_program_thread();
    STATE.store(2, Ordering::Release);
}

/// Brings in the heap pages of the C library's objects that a fork child touches
/// before its heap is registered, where the kernel would fill a page that was on
/// swap with zeros: every open `FILE` and its lock (glibc's fork resets them in the
/// child, `fresetlockfiles`) and the locale data (every new thread reads it,
/// `__ctype_init`; the child's Vm starts threads). Called with evictions frozen, so
/// what it brings in stays until the fork. (The child also repairs pages it finds
/// touched that way: `mm::transparent_fork::repair`.)
fn touch_stdio() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: a copy of the global locale (`LC_GLOBAL_LOCALE` is -1 in glibc;
        // its category data is shared, not
        // copied): the first 13 words of glibc's public `struct __locale_struct` are
        // the categories' data pointers.
        unsafe {
            let l = libc::duplocale(-1isize as libc::locale_t);
            if !l.is_null() {
                let cats = l as *const *const u8;
                for c in 0..13 {
                    let d = cats.add(c).read();
                    if !d.is_null() {
                        touch(d, 2 * 4096);
                    }
                }
                libc::freelocale(l);
            }
        }
    }
    #[cfg(all(target_env = "gnu", target_pointer_width = "64"))]
    {
        extern "C" {
            fn _IO_list_lock();
            fn _IO_list_unlock();
            fn _IO_iter_begin() -> *mut c_void;
            fn _IO_iter_end() -> *mut c_void;
            fn _IO_iter_next(i: *mut c_void) -> *mut c_void;
            fn _IO_iter_file(i: *mut c_void) -> *mut c_void;
        }
        /// `sizeof(FILE)` with its jump-table pointer, and where `_lock` is in it
        /// (glibc's public `struct _IO_FILE` layout on 64-bit targets).
        const FILE_BYTES: usize = 224;
        const LOCK_AT: usize = 136;
        // SAFETY: glibc's own iteration over its list of streams, under its lock (as
        // `fresetlockfiles` does); each element is a live FILE.
        unsafe {
            _IO_list_lock();
            let end = _IO_iter_end();
            let mut i = _IO_iter_begin();
            let mut n = 0;
            while i != end && n < 1 << 16 {
                let f = _IO_iter_file(i) as *const u8;
                touch(f, FILE_BYTES);
                let lock = std::ptr::read_volatile(f.add(LOCK_AT) as *const *const u8);
                if !lock.is_null() {
                    touch(lock, 16);
                }
                i = _IO_iter_next(i);
                n += 1;
            }
            _IO_list_unlock();
        }
    }
}

// ---------------------------------------------------------------------------------
// Anonymous mmap, munmap, mremap, madvise (see the module header, "mmap").

const PS: usize = 4096;
/// Freed malloc blocks of this size or more have their whole pages discarded.
const DISCARD_MIN: usize = 64 << 10;

fn page_up(a: usize) -> usize {
    a.div_ceil(PS) * PS
}
fn page_down(a: usize) -> usize {
    a & !(PS - 1)
}

/// Discards the whole pages inside `[start, end)` of the heap (they read as zeros
/// after, and hold no frame or slot). Returns whether there was any.
fn discard_inside(start: usize, end: usize) -> bool {
    let (s, e) = (page_up(start), page_down(end));
    if s >= e {
        return false;
    }
    let Some(r) = region() else { return false };
    let base = r.as_ptr() as usize;
    // The range is a block of our heap, so inside the region and page-aligned.
    r.discard(s - base, e - s).is_ok()
}

/// A block of the heap handed out by `mmap`: talc's allocation `[start, start +
/// len)` (page-aligned, `len` a multiple of pages), and the parts of it still
/// mapped, as sorted disjoint page ranges. Parts not mapped are discarded (they
/// read as zeros and hold nothing).
#[derive(Debug)]
struct MapBlock {
    len: usize,
    live: Vec<(usize, usize)>,
}

/// mmap blocks by start address. Protected by its lock (taken before `HEAP`, never
/// after it; `mremap` takes `HEAP` under it to grow a block in place). A
/// `FutexLock`, like `HEAP`'s, for the same reason: it is held across a fork (our
/// atfork prepare handler takes it before `HEAP`) and reset in the child. The map
/// lives in glibc's memory (usermm's global allocator), never in the heap, so
/// holding it never waits for a fault on heap memory.
static MAPS: FutexCell<std::collections::BTreeMap<usize, MapBlock>> =
    FutexCell::new(std::collections::BTreeMap::new());

fn set_errno(e: i32) {
    // SAFETY: setting errno for this thread.
    unsafe { *libc::__errno_location() = e };
}

/// Whether any byte of `[a, a + len)` lies in the heap.
fn touches_heap(a: usize, len: usize) -> bool {
    let (b, e) = (BASE.load(Ordering::Acquire), END.load(Ordering::Acquire));
    b != 0 && a < e && a.saturating_add(len) > b
}

/// Subtracts `[a, e)` from sorted disjoint ranges.
fn subtract(live: &mut Vec<(usize, usize)>, a: usize, e: usize) {
    let mut out = Vec::with_capacity(live.len() + 1);
    for &(s, t) in live.iter() {
        if t <= a || s >= e {
            out.push((s, t));
            continue;
        }
        if s < a {
            out.push((s, a));
        }
        if t > e {
            out.push((e, t));
        }
    }
    *live = out;
}

/// Adds `[a, e)` (disjoint from every range) to sorted disjoint ranges, merging.
fn add_range(live: &mut Vec<(usize, usize)>, a: usize, e: usize) {
    live.push((a, e));
    live.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(live.len());
    for &(s, t) in live.iter() {
        match out.last_mut() {
            Some(l) if l.1 == s => l.1 = t,
            _ => out.push((s, t)),
        }
    }
    *live = out;
}

/// Allocates a zeroed, page-aligned block of `len` (a multiple of pages) for mmap.
fn map_block(len: usize) -> Option<usize> {
    let layout = Layout::from_size_align(len, PS).ok()?;
    let p = {
        let mut h = HEAP.lock();
        // SAFETY: a nonzero layout.
        unsafe { h.as_mut()?.malloc(layout) }.ok()?.as_ptr() as usize
    };
    // Whatever the space held before (freed malloc blocks, talc's bookkeeping of a
    // free chunk) goes: mmap's memory reads as zeros. Cheap where it was discarded
    // already (an `EMPTY` entry costs one load).
    discard_inside(p, p + len);
    MAPS.lock().insert(
        p,
        MapBlock {
            len,
            live: vec![(p, p + len)],
        },
    );
    Some(p)
}

/// Gives a whole mmap block back to talc. Its pages were discarded when they were
/// unmapped.
fn free_block(start: usize, len: usize) {
    if let Some(t) = HEAP.lock().as_mut() {
        // SAFETY: the block talc gave `map_block` with this layout, now unused.
        unsafe {
            t.free(
                NonNull::new_unchecked(start as *mut u8),
                Layout::from_size_align_unchecked(len, PS),
            )
        };
    }
}

/// munmap of `[a, e)` (page-aligned) inside the heap: every mmap block it meets
/// loses that part (discarded); a block with nothing left mapped is freed. Space of
/// the heap that is no mmap block (malloc's) is left alone.
fn unmap_heap(a: usize, e: usize) {
    let mut gone = Vec::new();
    let mut cut = Vec::new();
    {
        let mut maps = MAPS.lock();
        let keys: Vec<usize> = maps
            .range(..e)
            .rev()
            .take_while(|(&s, b)| s + b.len > a || s >= a)
            .filter(|(&s, b)| s + b.len > a)
            .map(|(&s, _)| s)
            .collect();
        for s in keys {
            let b = maps.get_mut(&s).expect("key just read");
            let (x, y) = (a.max(s), e.min(s + b.len));
            subtract(&mut b.live, x, y);
            cut.push((x, y));
            if b.live.is_empty() {
                gone.push((s, b.len));
                maps.remove(&s);
            }
        }
    }
    for (x, y) in cut {
        discard_inside(x, y);
    }
    for (s, len) in gone {
        free_block(s, len);
    }
}

/// Whether an mmap call is one the heap serves: a private anonymous read-write
/// mapping with no address (see the module header).
fn servable(addr: *mut c_void, prot: i32, flags: i32, fd: i32, off: i64) -> bool {
    let allowed = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    addr.is_null()
        && prot == libc::PROT_READ | libc::PROT_WRITE
        && flags & (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            == libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
        && flags & !allowed == 0
        && fd == -1
        && off == 0
}

/// `mmap(2)`.
///
/// # Safety
/// As the system call.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
) -> *mut c_void {
    if !ready() || !servable(addr, prot, flags, fd, off) {
        if flags & libc::MAP_FIXED != 0 && touches_heap(addr as usize, len) && ready() {
            // Replacing part of the heap's mapping would pull it from under usermm.
            say_once(
                &FIXED_NOTE,
                "mmap(MAP_FIXED) over the heap refused (EINVAL)",
            );
            set_errno(libc::EINVAL);
            return libc::MAP_FAILED;
        }
        // SAFETY: the system call with the caller's arguments (raw: no dlsym, so
        // nothing of the loader's runs here and nothing recurses into this library).
        return unsafe { usermm::sys::mmap(addr, len, prot, flags, fd, off) };
    }
    if len == 0 || len > isize::MAX as usize {
        set_errno(if len == 0 { libc::EINVAL } else { libc::ENOMEM });
        return libc::MAP_FAILED;
    }
    match map_block(page_up(len)) {
        Some(p) => p as *mut c_void,
        None => {
            set_errno(libc::ENOMEM);
            libc::MAP_FAILED
        }
    }
}

/// `mmap64(2)`, the same call on 64-bit Linux.
///
/// # Safety
/// As the system call.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
) -> *mut c_void {
    // SAFETY: as mmap.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// `munmap(2)`.
///
/// # Safety
/// As the system call.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> i32 {
    let a = addr as usize;
    if !touches_heap(a, len) {
        // SAFETY: the munmap system call with the caller's arguments.
        return unsafe { usermm::sys::munmap(addr, len) };
    }
    if !a.is_multiple_of(PS) || len == 0 {
        set_errno(libc::EINVAL);
        return -1;
    }
    let e = a.saturating_add(page_up(len));
    let (b, t) = (BASE.load(Ordering::Acquire), END.load(Ordering::Acquire));
    // Parts outside the heap (a range that straddles it) go to the kernel.
    for (x, y) in [(a, e.min(b)), (a.max(t), e)] {
        if x < y {
            // SAFETY: the munmap system call on a range outside the heap.
            unsafe { usermm::sys::munmap(x as *mut c_void, y - x) };
        }
    }
    unmap_heap(a.max(b), e.min(t));
    0
}

/// The mapped range of the mmap block holding `[a, a + len)`, if the whole range
/// lies in one mapped part: (block start, block len, that part's end).
fn live_part(a: usize, len: usize) -> Option<(usize, usize, usize)> {
    let maps = MAPS.lock();
    let (&s, b) = maps.range(..=a).next_back()?;
    let &(_, t) = b.live.iter().find(|&&(x, y)| x <= a && a + len <= y)?;
    Some((s, b.len, t))
}

static FIXED_NOTE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static REMAP_NOTE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn say_once(flag: &std::sync::atomic::AtomicBool, msg: &str) {
    if !flag.swap(true, Ordering::Relaxed) {
        say(msg);
    }
}

/// `mremap(2)`. Declared with the optional fifth argument (`new_address`) as a
/// plain one: on x86-64 and AArch64 Linux a variadic argument is passed where a
/// fixed one would be, and it is read only with `MREMAP_FIXED`.
///
/// # Safety
/// As the system call.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new_addr: *mut c_void,
) -> *mut c_void {
    let a = old as usize;
    if !touches_heap(a, old_len.max(1)) {
        // SAFETY: the mremap system call with the caller's arguments.
        return unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) }
            as *mut c_void;
    }
    let fail = |e: i32| {
        set_errno(e);
        libc::MAP_FAILED
    };
    if flags & (libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP) != 0 {
        say_once(
            &REMAP_NOTE,
            "mremap with MREMAP_FIXED or MREMAP_DONTUNMAP on heap memory is not supported \
             (EINVAL)",
        );
        return fail(libc::EINVAL);
    }
    if !a.is_multiple_of(PS) || old_len == 0 || new_len == 0 || flags & !libc::MREMAP_MAYMOVE != 0 {
        return fail(libc::EINVAL);
    }
    let (ol, nl) = (page_up(old_len), page_up(new_len));
    let Some((s, blen, part_end)) = live_part(a, ol) else {
        return fail(libc::EFAULT);
    };
    if nl <= ol {
        unmap_heap(a + nl, a + ol);
        return old;
    }
    let (grow_from, grow_to) = (a + ol, a + nl);
    // In place, inside the block: the pages after the range are unmapped (munmapped
    // or cut by a shrink before), so already discarded: they come back as zeros.
    if grow_to <= s + blen && part_end == grow_from {
        let mut maps = MAPS.lock();
        if let Some(b) = maps.get_mut(&s) {
            if !b.live.iter().any(|&(x, y)| x < grow_to && y > grow_from) {
                add_range(&mut b.live, grow_from, grow_to);
                return old;
            }
        }
    }
    // In place, past the block's end: talc grows the allocation if the space after
    // it is free; that space is discarded before it is handed over.
    if grow_to > s + blen && part_end == grow_from {
        let mut maps = MAPS.lock();
        let unmapped_tail = maps
            .get(&s)
            .is_some_and(|b| !b.live.iter().any(|&(_, y)| y > grow_from));
        if unmapped_tail {
            let grown = HEAP.lock().as_mut().is_some_and(|t| {
                // SAFETY: the block talc gave with this layout; a larger size.
                unsafe {
                    t.grow_in_place(
                        NonNull::new_unchecked(s as *mut u8),
                        Layout::from_size_align_unchecked(blen, PS),
                        grow_to - s,
                    )
                }
                .is_ok()
            });
            if grown {
                if let Some(b) = maps.get_mut(&s) {
                    b.len = grow_to - s;
                    add_range(&mut b.live, grow_from, grow_to);
                }
                drop(maps);
                // Talc's tag now lies past `grow_to`; the old one is inside.
                discard_inside(s + blen, grow_to);
                return old;
            }
        }
    }
    if flags & libc::MREMAP_MAYMOVE == 0 {
        return fail(libc::ENOMEM);
    }
    let Some(q) = map_block(nl) else {
        return fail(libc::ENOMEM);
    };
    // SAFETY: `[a, a + ol)` is mapped (checked above) and `[q, q + nl)` is a fresh
    // block at least as large; they do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(a as *const u8, q as *mut u8, ol) };
    unmap_heap(a, a + ol);
    q as *mut c_void
}

/// `madvise(2)`. On the heap, advice that drops pages (`MADV_DONTNEED`,
/// `MADV_FREE`, `MADV_REMOVE`) discards them through usermm (the kernel's doing it
/// would take them from under usermm's bookkeeping); other advice is accepted and
/// ignored (usermm decides what is resident).
///
/// # Safety
/// As the system call.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: i32) -> i32 {
    let a = addr as usize;
    if !touches_heap(a, len) || !ready() {
        // SAFETY: the madvise system call with the caller's arguments.
        return unsafe { usermm::sys::madvise(addr, len, advice) };
    }
    if !a.is_multiple_of(PS) {
        set_errno(libc::EINVAL);
        return -1;
    }
    if matches!(
        advice,
        libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE
    ) {
        let (b, t) = (BASE.load(Ordering::Acquire), END.load(Ordering::Acquire));
        discard_inside(a.max(b), a.saturating_add(page_up(len)).min(t));
    }
    0
}
