//! The LD_PRELOAD library of `usermm exec`: an unmodified program's heap (the malloc
//! family) in a transparent region of a usermm Vm, inside a hard budget, with its
//! pages paged to usermm's swap devices.
//!
//! ## How
//! - At load (a constructor, after libc's), it reads its settings from the
//!   environment `usermm exec` prepared (`USERMM_BUDGET`, `USERMM_SWAP`,
//!   `USERMM_SWAP_DIR`, `USERMM_HEAP`), makes a Vm, adds the swap devices (or a
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
//! - `fork()` without exec is refused (ENOMEM, with a line on stderr): the kernel does
//!   not carry userfaultfd registration into a child, so the child would read zeros
//!   where its parent's pages were on swap. `posix_spawn`/`vfork` (the child shares
//!   the parent's memory, then execs) work; a child that execs gets its own usermm
//!   (the budget is per process: each process of the tree has its own).
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

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::ptr::{null_mut, NonNull};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

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
static HEAP: parking_lot::Mutex<Option<talc::Talc<talc::ErrOnOom>>> = parking_lot::Mutex::new(None);
/// The Vm of the heap (kept for `fork`).
static VM: std::sync::OnceLock<usermm::Vm> = std::sync::OnceLock::new();
/// The heap's transparent region (kept to discard pages of it).
static REGION: std::sync::OnceLock<usermm::TransparentRegion> = std::sync::OnceLock::new();

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
    let vm = usermm::Vm::new(usermm::Config::default().memory_budget(budget as usize))
        .map_err(|e| e.to_string())?;
    let specs: Vec<String> = env("USERMM_SWAP")
        .map(|s| {
            s.split('\n')
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    for s in &specs {
        let spec = usermm::SwapSpec::parse(s).map_err(|e| e.to_string())?;
        vm.swapon(spec).map_err(|e| e.to_string())?;
    }
    if specs.is_empty() {
        let dir = env("USERMM_SWAP_DIR").unwrap_or_else(|| "/var/tmp".into());
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
    // Kept for the life of the process (a static is never dropped): freed blocks
    // and mmap blocks are discarded through it.
    let _ = REGION.set(region);
    let _ = VM.set(vm);
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

/// Where `--stats` writes (a copy of stderr made at start).
static STATS_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// `usermm exec --stats`: the heap's counters, one line, at exit.
extern "C" fn print_stats() {
    let Some(vm) = VM.get() else { return };
    let s = vm.stats();
    let line = format!(
        "usermm exec: pid {} budget {} frames: faults {} (major {}), write-protect faults {}, staged {} (used again {}), read-around {}, \
         pswpin {}, pswpout {}, scanned {}, reclaimed {}, direct reclaim {}, \
         read errors {}, write errors {}\n",
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
        s.write_errors
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
    STATE.load(Ordering::Acquire) == 2 && !usermm::sync::is_engine_thread()
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

/// libc's `fork`.
fn real_fork() -> libc::pid_t {
    type F = unsafe extern "C" fn() -> libc::pid_t;
    // SAFETY: looking up and calling libc's fork.
    unsafe {
        let f = libc::dlsym(libc::RTLD_NEXT, c"fork".as_ptr());
        if f.is_null() {
            return -1;
        }
        std::mem::transmute::<*mut c_void, F>(f)()
    }
}

/// `fork(2)`. The child gets a copy of the heap as it is mapped; the kernel does not
/// carry the userfaultfd registration into it, so a page that is on swap at that
/// moment would read as zeros there. So the fork happens with evictions frozen and
/// only while no heap page is on swap; otherwise it fails with ENOMEM and a line on
/// stderr (see the module header). The child runs on without a budget (its heap is
/// plain memory); if it execs, the new program gets a usermm of its own.
#[no_mangle]
pub extern "C" fn fork() -> libc::pid_t {
    let Some(vm) = VM.get().filter(|_| ready()) else {
        return real_fork();
    };
    let freeze = vm.freeze_transparent_eviction();
    if vm.transparent_pages_out() > 0 {
        drop(freeze);
        say(
            "this program called fork() while part of its heap is on swap; a child would \
             not see those pages, so fork fails with ENOMEM (fork without exec under \
             pressure is not supported yet)",
        );
        // SAFETY: setting errno.
        unsafe { *libc::__errno_location() = libc::ENOMEM };
        return -1;
    }
    let pid = real_fork();
    drop(freeze);
    pid
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
    let Some(r) = REGION.get() else { return false };
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

/// mmap blocks by start address. Protected by its mutex (a leaf, taken after
/// nothing but itself; `mremap` takes `HEAP` under it to grow a block in place).
/// The map lives in glibc's memory (usermm's global allocator), never in the heap,
/// so holding it never waits for a fault on heap memory.
static MAPS: parking_lot::Mutex<std::collections::BTreeMap<usize, MapBlock>> =
    parking_lot::Mutex::new(std::collections::BTreeMap::new());

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

/// The raw system call (no dlsym, so nothing of the loader's runs here and nothing
/// can recurse into this library's malloc).
fn sys_mmap(a: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut c_void {
    // SAFETY: the mmap system call with the caller's arguments; the kernel checks
    // them. `syscall` returns -1 with errno set on failure, which is MAP_FAILED.
    unsafe { libc::syscall(libc::SYS_mmap, a, len, prot, flags, fd, off) as *mut c_void }
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
        return sys_mmap(addr, len, prot, flags, fd, off);
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
        return unsafe { libc::syscall(libc::SYS_munmap, addr, len) } as i32;
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
            unsafe { libc::syscall(libc::SYS_munmap, x, y - x) };
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
        return unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) } as i32;
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
