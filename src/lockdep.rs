//! The lock validator (feature `lockdep`, off by default): lock classes, the
//! "held before" graph, and the reports of docs/design.md invariant 5.
//!
//! Owns: the class table, the dependency graph (edges and the two acquisition sites
//! that first made each one), the per-thread stack of held locks, the no-allocation
//! flag, and the list of reports. Keeps invariant 5 (lock order is checked, with
//! "may reclaim" as a lock) and checks invariants 1, 2 and 4 as orderings.
//!
//! ## Classes
//! A class is what lockdep orders: every lock of the `sync` facade made at one source
//! line (`Mutex::new`, `RwLock::new`, `Default`, found with `#[track_caller]`) is
//! one class, named by that line, as the kernel keys a class by its lock's static
//! init site; so every space's `regions` lock is the one class `src/mm/space.rs:58`. The
//! hand-made locks are four fixed classes: [`RECLAIM`] (the pseudo-lock of seed 004's
//! `fs_reclaim`: `reclaim::alloc_frame` "acquires" it for an instant, reclaim scans
//! and the page-I/O threads' page-out work hold it), [`FRAME`] (`PageDesc`'s spin
//! lock), [`PTE_LOCK`] (the entry bit lock `P_LOCK`) and [`BUSY`] (an entry's fault
//! claim, which others wait out). `P_LOCK` may nest in itself under a frame lock
//! (reclaim locks every entry of a page: the kernel's `nest_lock`); a second lock
//! of a held class taken with [`acquire_nested`] (fork's `RwLock::write_nested`) is
//! the caller's promise of an order, as the kernel's `SINGLE_DEPTH_NESTING`.
//!
//! ## What is recorded and reported
//! Each thread keeps a fixed stack of what it holds (class, kind, instance address,
//! acquisition site). A blocking acquisition of class B while holding A adds the
//! edge A → B once, with the sites of both acquisitions; a try-lock adds none (it
//! cannot wait). A new edge whose reverse path B →…→ A already exists is a possible
//! deadlock, reported the first time the ordering is seen, not when it hangs: the new
//! edge's two sites and every edge of the existing path with its two sites (the two
//! acquisition chains). Also reported: taking a class the thread already holds (but
//! for the nesting above); a blocking wait (device I/O, condvar) while holding a
//! spin or bit lock; `alloc_frame` from reclaim context (reclaim recursing into
//! itself); a heap allocation on a thread inside a [`no_alloc`] section (page-I/O
//! work, the transparent-fault handler), seen by [`CheckedAlloc`], the global
//! allocator wrapper a test binary installs (the library cannot install one: the
//! preload library and some tests have their own, so the flag is checked by a
//! wrapper any of them can put around theirs). A cycle is reported once (its new
//! edge is stored once); a blocking wait once per lock site and wait site; an
//! allocation once per no-allocation section.
//!
//! ## How a report fails a test
//! Every report is written to stderr at once (formatted on the stack, one `write(2)`)
//! and kept for [`summary`]. A report that was not expected then
//! - panics the thread that saw it, if that is an application thread outside a
//!   no-allocation section: the test that ran the offending call fails with the
//!   report in its output;
//! - otherwise (an engine thread — page-I/O, kswapd, fault handler — or the
//!   allocator, where unwinding is no option) is counted, and the process's exit
//!   status becomes 101 (an `atexit` hook registered at the first such report), so
//!   the test binary, and CI, fails.
//!
//! Tests that plant an ordering on purpose say so: [`plant`] marks a lock's class
//! (a report whose cycle goes through it is expected), [`expect_reports_here`] the
//! current thread.
//!
//! ## Its own locking and memory
//! None: every table is a fixed-size static of atomics (classes, a hash of sites to
//! classes, an edge matrix, edge records, reports), claimed by `fetch_add` or CAS and
//! never waited on, and the per-thread stack is a constant-initialised thread-local
//! without destructor. Recording allocates nothing, takes no lock and never spins, so
//! it may run inside the global allocator and on threads where allocating is
//! forbidden; it is async-signal-safe but for one window (a handler interrupting the
//! removal of a lock from the middle of the stack sees it half-shifted). It sits
//! below every lock of the crate's lock order: it is called with any of them held
//! and takes none. Only [`summary`] allocates (its result), on the caller's thread.
//! When a table is full the validator stops growing it and says so in the summary
//! (`overflow`); it never reports on missing data.
//!
//! With the feature off this module is empty hooks the compiler removes: no field,
//! no thread-local, no call is left in the engine.

#[cfg(feature = "lockdep")]
pub use on::*;

#[cfg(not(feature = "lockdep"))]
pub(crate) use off::*;

/// The feature-off hooks: each is empty and inlined away.
#[cfg(not(feature = "lockdep"))]
mod off {
    /// Nothing (the feature is off).
    pub(crate) struct Section;
    /// A point where a frame may be allocated.
    #[inline(always)]
    pub(crate) fn might_reclaim() {}
    /// Holding the reclaim pseudo-lock.
    #[inline(always)]
    pub(crate) fn reclaim() -> Section {
        Section
    }
    /// A no-allocation section.
    #[inline(always)]
    pub(crate) fn no_alloc(_what: &'static str) -> Section {
        Section
    }
    /// A blocking wait.
    #[inline(always)]
    pub(crate) fn might_block(_what: &'static str) {}
}

#[cfg(feature = "lockdep")]
mod on {
    use std::alloc::{GlobalAlloc, Layout};
    use std::cell::Cell;
    use std::fmt::Write as _;
    use std::panic::Location;
    use std::sync::atomic::{
        compiler_fence, AtomicBool, AtomicPtr, AtomicU16, AtomicU32, AtomicU8, AtomicUsize,
        Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst},
    };

    /// Class ids: 0 not looked up yet, 1 untracked (a table was full), then the
    /// fixed classes, then the lock sites in order of first use.
    pub type ClassId = u16;
    const UNTRACKED: ClassId = 1;
    /// The pseudo-lock "may reclaim" (seed 004's `fs_reclaim`).
    pub const RECLAIM: ClassId = 2;
    /// A frame's spin lock (`PageDesc`).
    pub const FRAME: ClassId = 3;
    /// A page-table entry's bit lock `P_LOCK`.
    pub const PTE_LOCK: ClassId = 4;
    /// A page-table entry's fault claim `BUSY`.
    pub const BUSY: ClassId = 5;
    const FIXED_NAMES: [&str; 6] = [
        "?",
        "(untracked)",
        "[may-reclaim]",
        "frame lock (PageDesc)",
        "entry bit lock P_LOCK",
        "entry claim BUSY",
    ];
    const FIRST_SITE: usize = 8;
    const MAX_CLASSES: usize = 512;
    const HASH: usize = 2048;
    const MAX_EDGES: usize = 8192;
    const MAX_REPORTS: usize = 64;
    const MAX_PATH: usize = 12;
    const DEPTH: usize = 48;

    /// What kind of lock a held entry is: a spin or bit lock may not be held across
    /// a blocking wait.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Kind {
        /// A sleeping lock (mutex, rwlock) or a claim.
        Sleep,
        /// A spin or bit lock (frame lock, `P_LOCK`).
        Spin,
        /// The reclaim pseudo-lock.
        Pseudo,
    }

    // ---- the tables (statics of atomics: zero-initialised, in .bss) ----

    #[allow(clippy::declare_interior_mutable_const)]
    const NULL_LOC: AtomicPtr<Location<'static>> = AtomicPtr::new(std::ptr::null_mut());
    #[allow(clippy::declare_interior_mutable_const)]
    const Z16: AtomicU16 = AtomicU16::new(0);
    #[allow(clippy::declare_interior_mutable_const)]
    const Z8: AtomicU8 = AtomicU8::new(0);

    /// Site of each site class (null for the fixed ones).
    static CLASS_SITE: [AtomicPtr<Location<'static>>; MAX_CLASSES] = [NULL_LOC; MAX_CLASSES];
    /// `PLANTED` per class.
    static CLASS_FLAGS: [AtomicU8; MAX_CLASSES] = [Z8; MAX_CLASSES];
    const PLANTED: u8 = 1;
    static NCLASSES: AtomicUsize = AtomicUsize::new(FIRST_SITE);
    /// Open-addressing hash of sites to classes (compared by value: one call site may
    /// have several `Location` statics after inlining).
    static HT_KEY: [AtomicPtr<Location<'static>>; HASH] = [NULL_LOC; HASH];
    static HT_ID: [AtomicU16; HASH] = [Z16; HASH];

    /// `EDGE[a * MAX_CLASSES + b]`: 0 if no edge a → b, else its record's index + 1
    /// (`NO_RECORD` if the records were full).
    static EDGE: [AtomicU16; MAX_CLASSES * MAX_CLASSES] = [Z16; MAX_CLASSES * MAX_CLASSES];
    const NO_RECORD: u16 = u16::MAX;
    /// The first time an edge was seen: classes and the two acquisition sites.
    struct EdgeRec {
        from: AtomicU16,
        to: AtomicU16,
        from_site: AtomicPtr<Location<'static>>,
        to_site: AtomicPtr<Location<'static>>,
    }
    #[allow(clippy::declare_interior_mutable_const)]
    const EDGE_REC: EdgeRec = EdgeRec {
        from: Z16,
        to: Z16,
        from_site: NULL_LOC,
        to_site: NULL_LOC,
    };
    static EDGES: [EdgeRec; MAX_EDGES] = [EDGE_REC; MAX_EDGES];
    static NEDGES: AtomicUsize = AtomicUsize::new(0);

    /// What a report is about.
    const R_CYCLE: u8 = 1;
    const R_RECURSIVE: u8 = 2;
    const R_BLOCK: u8 = 3;
    const R_ALLOC: u8 = 4;
    const R_RECLAIM_RECURSION: u8 = 5;
    struct ReportRec {
        /// Set last (Release): the record is complete.
        kind: AtomicU8,
        expected: AtomicBool,
        /// Cycle: the new edge's record first, then the existing path back.
        npath: AtomicU8,
        path: [AtomicU16; MAX_PATH],
        /// Recursive / block: the class held, where it was taken, where the new
        /// acquisition or the wait is.
        class: AtomicU16,
        site1: AtomicPtr<Location<'static>>,
        site2: AtomicPtr<Location<'static>>,
        /// Block / alloc: what waited or which section forbade allocation.
        what_ptr: AtomicPtr<u8>,
        what_len: AtomicUsize,
        size: AtomicUsize,
    }
    #[allow(clippy::declare_interior_mutable_const)]
    const REPORT_REC: ReportRec = ReportRec {
        kind: Z8,
        expected: AtomicBool::new(false),
        npath: Z8,
        path: [Z16; MAX_PATH],
        class: Z16,
        site1: NULL_LOC,
        site2: NULL_LOC,
        what_ptr: AtomicPtr::new(std::ptr::null_mut()),
        what_len: AtomicUsize::new(0),
        size: AtomicUsize::new(0),
    };
    static REPORTS: [ReportRec; MAX_REPORTS] = [REPORT_REC; MAX_REPORTS];
    static NREPORTS: AtomicUsize = AtomicUsize::new(0);
    static UNEXPECTED: AtomicUsize = AtomicUsize::new(0);
    static OVERFLOW: AtomicUsize = AtomicUsize::new(0);
    static ATEXIT: AtomicBool = AtomicBool::new(false);
    /// Acquisitions recorded (for the summary; relaxed).
    static ACQUIRES: AtomicU32 = AtomicU32::new(0);

    // ---- per thread ----

    #[derive(Clone, Copy)]
    struct Entry {
        class: ClassId,
        kind: Kind,
        addr: usize,
        site: *const Location<'static>,
    }
    const NONE: Entry = Entry {
        class: 0,
        kind: Kind::Sleep,
        addr: 0,
        site: std::ptr::null(),
    };

    thread_local! {
        static STACK: [Cell<Entry>; DEPTH] = const { [const { Cell::new(NONE) }; DEPTH] };
        static TOP: Cell<usize> = const { Cell::new(0) };
        /// The no-allocation section the thread is in (`""`: none).
        static NO_ALLOC: Cell<&'static str> = const { Cell::new("") };
        static EXPECT: Cell<bool> = const { Cell::new(false) };
        /// Inside the allocator hook: never panic there.
        static IN_ALLOC: Cell<bool> = const { Cell::new(false) };
        /// One of usermm's own threads (`sync::mark_engine_thread` says so): a
        /// report there cannot fail a test by unwinding.
        static ENGINE: Cell<bool> = const { Cell::new(false) };
    }

    /// The calling thread is one of usermm's own (called by
    /// `sync::mark_engine_thread`, so this module imports nothing of the engine's).
    pub(crate) fn mark_engine_thread() {
        ENGINE.with(|e| e.set(true));
    }

    // ---- classes ----

    fn hash(l: &Location<'_>) -> usize {
        let mut h = (l.line() as usize).wrapping_mul(0x9e37_79b9) ^ (l.column() as usize);
        for b in l.file().bytes().rev().take(24) {
            h = h.wrapping_mul(31).wrapping_add(b as usize);
        }
        h
    }

    /// The class of the locks made at `site` (a new one the first time).
    pub fn class_of(site: &'static Location<'static>) -> ClassId {
        let mut i = hash(site) % HASH;
        for _ in 0..HASH {
            let k = HT_KEY[i].load(Acquire);
            if k.is_null() {
                let me = site as *const Location<'static> as *mut Location<'static>;
                match HT_KEY[i].compare_exchange(std::ptr::null_mut(), me, AcqRel, Acquire) {
                    Ok(_) => {
                        let id = NCLASSES.fetch_add(1, Relaxed);
                        if id >= MAX_CLASSES {
                            OVERFLOW.fetch_add(1, Relaxed);
                            HT_ID[i].store(UNTRACKED, Release);
                            return UNTRACKED;
                        }
                        CLASS_SITE[id].store(me, Release);
                        HT_ID[i].store(id as ClassId, Release);
                        return id as ClassId;
                    }
                    Err(_) => continue, // look at the slot again: someone took it
                }
            }
            // SAFETY: keys are only ever `&'static Location`s.
            if unsafe { &*k } == site {
                // 0 while its inserter is between the two stores: untracked this
                // once rather than wait (we never spin).
                return match HT_ID[i].load(Acquire) {
                    0 => UNTRACKED,
                    id => id,
                };
            }
            i = (i + 1) % HASH;
        }
        OVERFLOW.fetch_add(1, Relaxed);
        UNTRACKED
    }

    /// A lock's identity for the validator: its creation site, and its class once
    /// looked up (a field of every `sync` lock under the feature).
    #[derive(Debug)]
    pub struct LockKey {
        site: &'static Location<'static>,
        class: AtomicU16,
    }

    impl LockKey {
        /// The key of a lock made at `site`.
        pub const fn new(site: &'static Location<'static>) -> LockKey {
            LockKey {
                site,
                class: AtomicU16::new(0),
            }
        }
        /// The lock's class.
        pub fn class(&self) -> ClassId {
            match self.class.load(Relaxed) {
                0 => {
                    let c = class_of(self.site);
                    self.class.store(c, Relaxed);
                    c
                }
                c => c,
            }
        }
        /// Where the lock was made.
        pub fn site(&self) -> &'static Location<'static> {
            self.site
        }
    }

    /// A lock of the `sync` facade, as the validator sees it.
    pub trait Tracked {
        /// Its key.
        fn lockdep_key(&self) -> &LockKey;
    }

    /// Marks the class of `lock` as planted: a report whose cycle goes through it is
    /// expected (a test that builds a bad ordering on purpose).
    pub fn plant(lock: &impl Tracked) {
        let c = lock.lockdep_key().class();
        if (c as usize) < MAX_CLASSES {
            CLASS_FLAGS[c as usize].fetch_or(PLANTED, Relaxed);
        }
    }

    /// Reports made on the calling thread from now on are expected (`on`) or not.
    pub fn expect_reports_here(on: bool) {
        EXPECT.with(|e| e.set(on));
    }

    /// The name of class `c`: a lock site `file:line:col`, or a fixed class's name.
    pub fn class_name(c: ClassId) -> String {
        let mut s = String::new();
        let _ = write_class(&mut s, c);
        s
    }

    fn write_class(w: &mut impl std::fmt::Write, c: ClassId) -> std::fmt::Result {
        let c = c as usize;
        if c < FIXED_NAMES.len() {
            return w.write_str(FIXED_NAMES[c]);
        }
        let p = CLASS_SITE
            .get(c)
            .map_or(std::ptr::null_mut(), |s| s.load(Acquire));
        if p.is_null() {
            return write!(w, "class#{c}");
        }
        // SAFETY: class sites are `&'static Location`s.
        let l = unsafe { &*p };
        write!(w, "lock made at {}:{}", l.file(), l.line())
    }

    fn write_site(w: &mut impl std::fmt::Write, p: *const Location<'static>) -> std::fmt::Result {
        if p.is_null() {
            return w.write_str("?");
        }
        // SAFETY: sites are `&'static Location`s.
        let l = unsafe { &*p };
        write!(w, "{}:{}", l.file(), l.line())
    }

    // ---- acquisition and release ----

    fn held_classes(mut f: impl FnMut(&Entry)) {
        let _ = STACK.try_with(|s| {
            let top = TOP.with(|t| t.get());
            for h in &s[..top] {
                f(&h.get());
            }
        });
    }

    /// Records the acquisition of a lock of class `class` at `addr` from `site`
    /// (`try_` if it did not wait for it), checking the order against every lock
    /// the thread holds. Call before waiting for the lock; it never blocks.
    pub fn acquire(
        class: ClassId,
        kind: Kind,
        addr: usize,
        try_: bool,
        site: &'static Location<'static>,
    ) {
        acquire_impl(class, kind, addr, try_, false, site)
    }

    /// `acquire` of the hand-made lock `obj` (its address is the instance), taken
    /// at the caller's caller (`#[track_caller]` all the way up).
    #[track_caller]
    pub fn acquire_at<T>(class: ClassId, kind: Kind, obj: &T, try_: bool) {
        acquire(
            class,
            kind,
            obj as *const T as usize,
            try_,
            Location::caller(),
        )
    }

    /// `acquire` of a second lock of a class the thread holds, in an order the
    /// caller guarantees (the kernel's `SINGLE_DEPTH_NESTING`: fork takes the
    /// parent's regions lock, then the new child's, which nobody else can reach).
    pub fn acquire_nested(
        class: ClassId,
        kind: Kind,
        addr: usize,
        site: &'static Location<'static>,
    ) {
        acquire_impl(class, kind, addr, false, true, site)
    }

    fn acquire_impl(
        class: ClassId,
        kind: Kind,
        addr: usize,
        try_: bool,
        nested: bool,
        site: &'static Location<'static>,
    ) {
        ACQUIRES.fetch_add(1, Relaxed);
        if !try_ && class != UNTRACKED {
            let mut nest_ok = nested;
            if class == PTE_LOCK {
                held_classes(|h| nest_ok |= h.class == FRAME);
            }
            held_classes(|h| {
                if h.class == UNTRACKED || h.class == 0 {
                    return;
                }
                if h.class == class {
                    if !nest_ok {
                        report_recursive(class, h.site, site);
                    }
                } else {
                    add_edge(h.class, class, h.site, site);
                }
            });
        }
        push(Entry {
            class,
            kind,
            addr,
            site,
        });
    }

    fn push(h: Entry) {
        let _ = STACK.try_with(|s| {
            let top = TOP.with(|t| t.get());
            if top == DEPTH {
                // Not pushed (its release finds nothing): counted as overflow.
                OVERFLOW.fetch_add(1, Relaxed);
                return;
            }
            s[top].set(h);
            // A signal handler that interrupts us sees the entry only once complete.
            compiler_fence(SeqCst);
            TOP.with(|t| t.set(top + 1));
        });
    }

    /// Records the release of the lock at `addr` (the innermost one held there).
    pub fn release(addr: usize) {
        let _ = STACK.try_with(|s| {
            let top = TOP.with(|t| t.get());
            let Some(i) = (0..top).rev().find(|&i| s[i].get().addr == addr) else {
                // Not held: a store that may or may not end a lock (`pte::released`
                // after a claim), or one pushed out by a full stack.
                return;
            };
            for j in i..top - 1 {
                s[j].set(s[j + 1].get());
            }
            compiler_fence(SeqCst);
            TOP.with(|t| t.set(top - 1));
        });
    }

    /// Whether the calling thread holds a lock of class `c`.
    pub fn holds(c: ClassId) -> bool {
        let mut yes = false;
        held_classes(|h| yes |= h.class == c);
        yes
    }

    /// Locks the calling thread holds (for assertions in tests).
    pub fn held_count() -> usize {
        TOP.try_with(|t| t.get()).unwrap_or(0)
    }

    /// A point where a frame may be allocated, and so reclaim may run
    /// (`reclaim::alloc_frame`): the reclaim pseudo-lock is acquired and released
    /// at once, so every lock held here is ordered before everything reclaim takes.
    /// From reclaim context itself (a page-I/O thread, a scan) it is reported.
    #[track_caller]
    pub fn might_reclaim() {
        let site = Location::caller();
        let mut taken = None;
        held_classes(|h| {
            if h.class == RECLAIM {
                taken = Some(h.site);
            }
        });
        if let Some(at) = taken {
            report(R_RECLAIM_RECURSION, |r| {
                r.class.store(RECLAIM, Relaxed);
                r.site1.store(at as *mut _, Relaxed);
                r.site2.store(site as *const _ as *mut _, Relaxed);
            });
            return;
        }
        acquire(RECLAIM, Kind::Pseudo, RECLAIM_ADDR, false, site);
        release(RECLAIM_ADDR);
    }
    const RECLAIM_ADDR: usize = 1;

    /// Holds the reclaim pseudo-lock (or a no-allocation section) until dropped.
    #[derive(Debug)]
    #[must_use]
    pub struct Section {
        addr: usize,
        prev: Option<&'static str>,
    }

    impl Drop for Section {
        fn drop(&mut self) {
            if self.addr != 0 {
                release(self.addr);
            }
            if let Some(p) = self.prev {
                NO_ALLOC.with(|n| n.set(p));
            }
        }
    }

    /// Enters reclaim context: the caller scans or writes pages out for reclaim.
    /// Nested entries (a scan called from a page-I/O thread) are not a new order.
    #[track_caller]
    pub fn reclaim() -> Section {
        if holds(RECLAIM) {
            return Section {
                addr: 0,
                prev: None,
            };
        }
        acquire(
            RECLAIM,
            Kind::Pseudo,
            RECLAIM_ADDR,
            false,
            Location::caller(),
        );
        Section {
            addr: RECLAIM_ADDR,
            prev: None,
        }
    }

    /// A section of the calling thread where allocating from the heap is a bug
    /// (`what` names it in the report): page-I/O work, the transparent-fault
    /// handler. Checked by [`CheckedAlloc`].
    pub fn no_alloc(what: &'static str) -> Section {
        let prev = NO_ALLOC.with(|n| n.replace(what));
        Section {
            addr: 0,
            prev: Some(prev),
        }
    }

    /// A blocking wait (device I/O, a condvar): reported if the thread holds a spin
    /// or bit lock, which others spin on for as long as the wait lasts.
    #[track_caller]
    pub fn might_block(what: &'static str) {
        let site = Location::caller();
        let mut spin = None;
        held_classes(|h| {
            if h.kind == Kind::Spin && spin.is_none() {
                spin = Some(*h);
            }
        });
        if let Some(h) = spin.filter(|h| {
            first_time((h.site as usize) ^ (site as *const _ as usize).rotate_left(17) | 1)
        }) {
            report(R_BLOCK, |r| {
                r.class.store(h.class, Relaxed);
                r.site1.store(h.site as *mut _, Relaxed);
                r.site2.store(site as *const _ as *mut _, Relaxed);
                r.what_ptr.store(what.as_ptr() as *mut u8, Relaxed);
                r.what_len.store(what.len(), Relaxed);
            });
        }
    }

    // ---- the graph ----

    fn edge(a: ClassId, b: ClassId) -> &'static AtomicU16 {
        &EDGE[a as usize * MAX_CLASSES + b as usize]
    }

    fn add_edge(
        a: ClassId,
        b: ClassId,
        sa: *const Location<'static>,
        sb: &'static Location<'static>,
    ) {
        if (a as usize) >= MAX_CLASSES || (b as usize) >= MAX_CLASSES {
            return;
        }
        let cell = edge(a, b);
        if cell.load(Acquire) != 0 {
            return;
        }
        let idx = NEDGES.fetch_add(1, Relaxed);
        let val = if idx < MAX_EDGES {
            let r = &EDGES[idx];
            r.from.store(a, Relaxed);
            r.to.store(b, Relaxed);
            r.from_site.store(sa as *mut _, Relaxed);
            r.to_site.store(sb as *const _ as *mut _, Relaxed);
            (idx + 1) as u16
        } else {
            OVERFLOW.fetch_add(1, Relaxed);
            NO_RECORD
        };
        if cell.compare_exchange(0, val, Release, Acquire).is_err() {
            return; // another thread recorded it first (and checks it)
        }
        // Inserted first, checked after: of two threads adding a → b and b → a at
        // once, at least one sees the other's edge.
        let mut path = [0u16; MAX_PATH];
        if let Some(n) = find_path(b, a, &mut path[1..]) {
            path[0] = val;
            report(R_CYCLE, |r| {
                for (i, p) in path[..=n].iter().enumerate() {
                    r.path[i].store(*p, Relaxed);
                }
                r.npath.store((n + 1) as u8, Relaxed);
            });
        }
    }

    /// Breadth-first search of a path `from` →…→ `to`; writes its edges' record
    /// values into `out` (up to its length) and returns how many. On the stack.
    fn find_path(from: ClassId, to: ClassId, out: &mut [u16]) -> Option<usize> {
        let n = NCLASSES.load(Acquire).min(MAX_CLASSES);
        let mut parent = [u16::MAX; MAX_CLASSES];
        let mut queue = [0u16; MAX_CLASSES];
        let (mut head, mut tail) = (0, 1);
        queue[0] = from;
        parent[from as usize] = from;
        while head < tail {
            let u = queue[head];
            head += 1;
            for v in 0..n {
                if parent[v] != u16::MAX || edge(u, v as u16).load(Acquire) == 0 {
                    continue;
                }
                parent[v] = u;
                if v == to as usize {
                    // Walk back from `to`, then reverse.
                    let mut k = 0;
                    let mut x = to;
                    while x != from && k < out.len() {
                        let p = parent[x as usize];
                        out[k] = edge(p, x).load(Acquire);
                        k += 1;
                        x = p;
                    }
                    out[..k].reverse();
                    return Some(k);
                }
                queue[tail] = v as u16;
                tail += 1;
            }
        }
        None
    }

    // ---- reports ----

    /// Keys of the blocking-wait and allocation reports made: each is made once.
    static SEEN: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

    /// Whether `key` (never 0) is new; records it. A full table says "new".
    fn first_time(key: usize) -> bool {
        let mut i = key % SEEN.len();
        for _ in 0..SEEN.len() {
            match SEEN[i].compare_exchange(0, key, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(k) if k == key => return false,
                Err(_) => i = (i + 1) % SEEN.len(),
            }
        }
        true
    }

    fn report(kind: u8, fill: impl FnOnce(&ReportRec)) {
        let idx = NREPORTS.fetch_add(1, Relaxed);
        let mut expected = EXPECT.try_with(|e| e.get()).unwrap_or(false);
        let mut buf = crate::trail::StackBuf::<2048>::new();
        if idx < MAX_REPORTS {
            let r = &REPORTS[idx];
            fill(r);
            expected |= involves_planted(r);
            r.expected.store(expected, Relaxed);
            r.kind.store(kind, Release);
            let _ = write_report(&mut buf, r, kind);
        } else {
            OVERFLOW.fetch_add(1, Relaxed);
            // Not kept: format it from a scratch record on the stack.
            let r = REPORT_REC;
            fill(&r);
            expected |= involves_planted(&r);
            let _ = write_report(&mut buf, &r, kind);
        }
        if expected {
            let _ = buf.write_str("(expected by the test)\n");
        }
        buf.flush();
        if expected {
            return;
        }
        UNEXPECTED.fetch_add(1, Relaxed);
        let engine = ENGINE.try_with(|e| e.get()).unwrap_or(true);
        let in_alloc = IN_ALLOC.try_with(|a| a.get()).unwrap_or(true);
        let no_alloc = !NO_ALLOC.try_with(|n| n.get()).unwrap_or("").is_empty();
        if engine || in_alloc || no_alloc || std::thread::panicking() {
            if !ATEXIT.swap(true, Relaxed) {
                // SAFETY: registers a plain `extern "C"` function; no other effect.
                unsafe { libc::atexit(fail_at_exit) };
            }
            return;
        }
        panic!("lockdep: a possible deadlock or a forbidden wait or allocation (report above)");
    }

    extern "C" fn fail_at_exit() {
        if UNEXPECTED.load(Relaxed) > 0 {
            let msg = b"lockdep: reports were made (above); failing the process\n";
            // SAFETY: writing a static buffer to stderr, then leaving at once.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(101);
            }
        }
    }

    fn involves_planted(r: &ReportRec) -> bool {
        let planted = |c: u16| {
            (c as usize) < MAX_CLASSES && CLASS_FLAGS[c as usize].load(Relaxed) & PLANTED != 0
        };
        let n = r.npath.load(Relaxed) as usize;
        let mut yes = planted(r.class.load(Relaxed));
        for p in &r.path[..n] {
            if let Some(e) = rec(p.load(Relaxed)) {
                yes |= planted(e.from.load(Relaxed)) || planted(e.to.load(Relaxed));
            }
        }
        yes
    }

    fn rec(v: u16) -> Option<&'static EdgeRec> {
        match v {
            0 | NO_RECORD => None,
            v => EDGES.get(v as usize - 1),
        }
    }

    fn write_edge(w: &mut impl std::fmt::Write, v: u16) -> std::fmt::Result {
        let Some(e) = rec(v) else {
            return w.write_str("    (an edge whose record did not fit)\n");
        };
        w.write_str("    ")?;
        write_class(w, e.from.load(Relaxed))?;
        w.write_str(" (held, taken at ")?;
        write_site(w, e.from_site.load(Relaxed))?;
        w.write_str(")\n      -> ")?;
        write_class(w, e.to.load(Relaxed))?;
        w.write_str(" (taken at ")?;
        write_site(w, e.to_site.load(Relaxed))?;
        w.write_str(")\n")
    }

    fn write_report(w: &mut impl std::fmt::Write, r: &ReportRec, kind: u8) -> std::fmt::Result {
        let class = r.class.load(Relaxed);
        let (s1, s2) = (r.site1.load(Relaxed), r.site2.load(Relaxed));
        match kind {
            R_CYCLE => {
                let n = r.npath.load(Relaxed) as usize;
                w.write_str("lockdep: possible circular locking dependency\n  new order:\n")?;
                write_edge(w, r.path[0].load(Relaxed))?;
                w.write_str("  closes a cycle with the order seen before:\n")?;
                for p in &r.path[1..n] {
                    write_edge(w, p.load(Relaxed))?;
                }
                Ok(())
            }
            R_RECURSIVE => {
                w.write_str("lockdep: possible recursive locking: ")?;
                write_class(w, class)?;
                w.write_str(" taken at ")?;
                write_site(w, s2)?;
                w.write_str(" while one of its class is held (taken at ")?;
                write_site(w, s1)?;
                w.write_str(")\n")
            }
            R_RECLAIM_RECURSION => {
                w.write_str("lockdep: frame allocation (may reclaim) at ")?;
                write_site(w, s2)?;
                w.write_str(" from reclaim context (entered at ")?;
                write_site(w, s1)?;
                w.write_str(")\n")
            }
            R_BLOCK => {
                w.write_str("lockdep: blocking wait (")?;
                w.write_str(what(r))?;
                w.write_str(") at ")?;
                write_site(w, s2)?;
                w.write_str(" while holding ")?;
                write_class(w, class)?;
                w.write_str(" (taken at ")?;
                write_site(w, s1)?;
                w.write_str(")\n")
            }
            R_ALLOC => writeln!(
                w,
                "lockdep: heap allocation of {} bytes in a no-allocation section ({})",
                r.size.load(Relaxed),
                what(r)
            ),
            _ => w.write_str("lockdep: ?\n"),
        }
    }

    fn what(r: &ReportRec) -> &'static str {
        let (p, n) = (r.what_ptr.load(Relaxed), r.what_len.load(Relaxed));
        if p.is_null() {
            return "?";
        }
        // SAFETY: stored from a `&'static str` by `might_block` / `check_alloc`.
        unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(p, n)) }
    }

    fn report_recursive(
        class: ClassId,
        held: *const Location<'static>,
        now: &'static Location<'static>,
    ) {
        report(R_RECURSIVE, |r| {
            r.class.store(class, Relaxed);
            r.site1.store(held as *mut _, Relaxed);
            r.site2.store(now as *const _ as *mut _, Relaxed);
        });
    }

    // ---- the allocation check ----

    fn check_alloc(size: usize) {
        let what = NO_ALLOC.try_with(|n| n.get()).unwrap_or("");
        if what.is_empty() || !first_time(what.as_ptr() as usize | 2) {
            return;
        }
        IN_ALLOC.with(|a| a.set(true));
        // A report does not allocate, so this does not recurse.
        report(R_ALLOC, |r| {
            r.what_ptr.store(what.as_ptr() as *mut u8, Relaxed);
            r.what_len.store(what.len(), Relaxed);
            r.size.store(size, Relaxed);
        });
        IN_ALLOC.with(|a| a.set(false));
    }

    /// A global allocator wrapper that reports an allocation made inside a
    /// [`no_alloc`] section. A test binary installs it around its allocator:
    /// `#[global_allocator] static A: CheckedAlloc<System> = CheckedAlloc(System);`
    #[derive(Debug)]
    pub struct CheckedAlloc<A>(pub A);

    // SAFETY: every call is passed on unchanged to the wrapped allocator; the check
    // before it allocates nothing and takes no lock.
    unsafe impl<A: GlobalAlloc> GlobalAlloc for CheckedAlloc<A> {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            check_alloc(l.size());
            // SAFETY: the caller's contract, passed on.
            unsafe { self.0.alloc(l) }
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            check_alloc(l.size());
            // SAFETY: the caller's contract, passed on.
            unsafe { self.0.alloc_zeroed(l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            check_alloc(new);
            // SAFETY: the caller's contract, passed on.
            unsafe { self.0.realloc(p, l, new) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            // SAFETY: the caller's contract, passed on.
            unsafe { self.0.dealloc(p, l) }
        }
    }

    // ---- the summary ----

    /// One report, formatted.
    #[derive(Debug, Clone)]
    pub struct Report {
        /// `cycle`, `recursive`, `block`, `alloc` or `reclaim-recursion`.
        pub kind: &'static str,
        /// Whether a test planted it (see [`plant`], [`expect_reports_here`]).
        pub expected: bool,
        /// The classes it names (for a cycle: every class on it).
        pub classes: Vec<String>,
        /// The report as printed.
        pub text: String,
    }

    /// What the validator has seen so far in this process.
    #[derive(Debug, Clone)]
    pub struct Summary {
        /// Lock classes seen (the fixed ones included).
        pub classes: usize,
        /// Distinct "held before" edges.
        pub edges: usize,
        /// Reports made (expected ones included).
        pub reports: usize,
        /// Reports not expected by a test (each fails its test or the process).
        pub unexpected: usize,
        /// Acquisitions recorded (wraps at 2^32).
        pub acquisitions: u32,
        /// Entries the fixed tables could not take (the validator went on without).
        pub overflow: usize,
        /// The reports kept (the first 64).
        pub list: Vec<Report>,
    }

    impl Summary {
        /// The reports that name class `c`.
        pub fn naming(&self, c: &str) -> Vec<&Report> {
            self.list
                .iter()
                .filter(|r| r.classes.iter().any(|x| x == c))
                .collect()
        }
    }

    /// Classes, edges and reports so far.
    pub fn summary() -> Summary {
        let n = NREPORTS.load(Acquire).min(MAX_REPORTS);
        let mut list = Vec::new();
        for r in &REPORTS[..n] {
            let kind = r.kind.load(Acquire);
            if kind == 0 {
                continue; // still being written
            }
            let mut text = String::new();
            let _ = write_report(&mut text, r, kind);
            let mut classes = Vec::new();
            let np = r.npath.load(Relaxed) as usize;
            for p in &r.path[..np] {
                if let Some(e) = rec(p.load(Relaxed)) {
                    for c in [e.from.load(Relaxed), e.to.load(Relaxed)] {
                        let name = class_name(c);
                        if !classes.contains(&name) {
                            classes.push(name);
                        }
                    }
                }
            }
            let c = r.class.load(Relaxed);
            if c != 0 {
                classes.push(class_name(c));
            }
            list.push(Report {
                kind: match kind {
                    R_CYCLE => "cycle",
                    R_RECURSIVE => "recursive",
                    R_BLOCK => "block",
                    R_ALLOC => "alloc",
                    _ => "reclaim-recursion",
                },
                expected: r.expected.load(Relaxed),
                classes,
                text,
            });
        }
        Summary {
            // The four fixed classes and the lock sites seen.
            classes: 4 + NCLASSES.load(Relaxed).min(MAX_CLASSES) - FIRST_SITE,
            edges: NEDGES.load(Relaxed),
            reports: NREPORTS.load(Relaxed),
            unexpected: UNEXPECTED.load(Relaxed),
            acquisitions: ACQUIRES.load(Relaxed),
            overflow: OVERFLOW.load(Relaxed),
            list,
        }
    }

    /// The class name of a `sync` lock, as reports name it.
    pub fn name_of(lock: &impl Tracked) -> String {
        class_name(lock.lockdep_key().class())
    }
}
