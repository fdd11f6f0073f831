//! Pressure stall information, in the sense of Linux PSI (`/proc/pressure/memory`):
//! how much of the wall time threads lost waiting on memory, and triggers that call
//! an application back when that loss crosses a threshold.
//!
//! Owns: [`Psi`] (one per Vm, in the engine): the stall counters the fault path
//! moves, the decaying averages, the triggers and the thread that serves them
//! (`usermm-psi`, started by `Vm::new`, stopped with the Vm). The public types
//! [`Pressure`], [`Shares`] and [`PressureTrigger`].
//!
//! ## What is a stall
//! A thread stalls while it waits for a fault's device read (`fault_swapin`, and
//! `wait_page` waiting for another thread's swap-in of the same page), or on reclaim
//! (`reclaim::alloc_frame` from its first failed allocation until it has a frame or
//! gives up). A program thread faulting on a transparent region is stalled while
//! the handler resolves a fault that needs a read (a swap-in, or a forked child's
//! page from its parent's swap): the handler marks the stall for it. Nested marks
//! (the allocation inside a swap-in) count once: a per-thread depth.
//!
//! `some`: at least one thread stalled. `full`: every non-idle thread stalled at
//! once. Non-idle: a thread that made a usermm call (`AddressSpace::read`, `write`,
//! `page`, `page_mut`, `fork`, `map_anon`, `unmap`) within the last 30 to 40 ms, or
//! is stalled itself (a program thread in a transparent fault counts only while
//! its fault is served: usermm cannot see it run between faults, so for a
//! program on transparent memory alone `full` equals `some`). Not "inside a call
//! at this instant": that would need every call to move a shared counter twice,
//! and it would count a thread computing between two calls as idle — the kernel
//! counts a running thread as non-idle, and so a thread that keeps working while
//! another waits keeps `full` at zero (`tests/pressure.rs`).
//!
//! `some` is exact to the microsecond: the count of stalled threads and the start
//! of the current stalled period share one atomic word, moved by CAS at each start
//! and end of a stall. `full` is decided at the same moments and at every tick of
//! the clock below, against the count of non-idle threads; a change in between
//! (a thread going idle) is seen at the next of them (10 ms at most).
//!
//! Who is non-idle, at the cost of nothing on the hit path: each thread that makes
//! usermm calls owns one of 64 slots (process-wide, taken on its first call, given
//! back when it exits); each Vm keeps one word per slot, alone on its cache line,
//! where a call writes `tick`, a coarse clock the `usermm-psi` thread moves on
//! every 10 ms. A call loads `tick` and, when it is running, loads its own word and
//! stores the tick if it moved on: no locked instruction, no line another thread
//! writes. The clock stops (its `RUNNING` bit cleared) after 2 s without a stall,
//! and a call then costs one load of a line nobody writes; the first stall starts
//! it again (one condvar wake-up per episode of pressure), its count jumped ahead
//! so that no stamp of an earlier episode reads as recent. A stalled thread's word reads `STALLED`
//! meanwhile; a stalled thread without a slot (the transparent-fault handler,
//! marking for a program thread) is counted in `shared`. Threads beyond the 64th
//! count only while stalled. `read_fast`/`write_fast` do not change.

//! ## Averages
//! As the kernel's: an exponentially decaying average of the stalled share of wall
//! time, with time constants 10, 60 and 300 s. It is brought up to date every 2 s by
//! the `usermm-psi` thread and by every `Vm::pressure` call: over an interval of
//! length `dt` with stalled share `s`, `avg = s + (avg - s) * exp(-dt / tau)`, which is
//! the exact result of a stall spread evenly over the interval (the kernel applies
//! the same factor per 2 s period). Shares are percentages, 0 to 100, as in
//! `/proc/pressure`.
//!
//! ## Triggers
//! `Vm::on_pressure(threshold, window, callback)` as the kernel's PSI triggers: the
//! thread samples the `some` total of each trigger ten times per window (a ring of
//! eleven samples, allocated when the trigger is made), and when the growth over the
//! last window reaches the threshold it calls the callback, at most once per window.
//! Callbacks run on the `usermm-psi` thread, with no lock of ours held, never on the
//! fault path.
//!
//! ## Memory discipline
//! Marking a stall allocates nothing and takes no lock: thread-local cells with
//! constant initializers (no destructor to register), atomics of the `Psi`, and
//! for the first stall of an episode a condvar notify (no lock). The slot's
//! destructor (which may allocate when it is registered) is touched only by a
//! thread's first usermm call, never by the engine's threads. The page-I/O threads
//! and the transparent-fault handler, which the lock validator checks for heap
//! allocations (`tests/pressure.rs` runs under it with `--features lockdep`), only
//! ever take the stall path.
//!
//! ## Locking
//! `Psi::ctl` (Mutex, leaf; `wake` Condvar): the averages, the triggers, the stop
//! flag. Taken by `Vm::pressure`, `Vm::on_pressure`, a trigger's drop, `Psi::stop`
//! and the `usermm-psi` thread; never on the fault path, never across a callback (a
//! callback may call anything of the Vm, drop its own trigger, or drop the Vm).
//! `Psi::thread` (Mutex, leaf): the thread's handle, taken by `start` and `stop`.
//! Everything else is atomics.

use crate::error::{Error, Result};
use crate::sync::EngineSpawn;
use crate::sync::{Arc, AtomicU64, Condvar, Mutex, Ordering};
use std::cell::Cell;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Shares of wall time, in percent (0.0 to 100.0, as in `/proc/pressure`), averaged
/// over the last 10 s, 60 s and 300 s (exponentially decaying).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Shares {
    /// Over about 10 s.
    pub avg10: f64,
    /// Over about 60 s.
    pub avg60: f64,
    /// Over about 300 s.
    pub avg300: f64,
}

/// Memory pressure of a Vm, as `/proc/pressure/memory`: the share of wall time
/// during which threads were stalled on memory (a fault's device read, or reclaim).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pressure {
    /// At least one thread stalled.
    pub some: Shares,
    /// Every non-idle thread stalled at once. Non-idle: made a usermm call in the
    /// last 30 to 40 ms, or stalled (a program thread on transparent memory counts
    /// only while its fault is served).
    pub full: Shares,
    /// Total time with at least one thread stalled, since the Vm started.
    pub total_some: Duration,
    /// Total time with every non-idle thread stalled, since the Vm started.
    pub total_full: Duration,
}

/// Threads with a slot of their own (see `MY_SLOT`); more go uncounted.
const SLOTS: usize = 64;
/// `MY_SLOT`: no slot chosen yet / none free.
const UNSET: usize = usize::MAX;
const NONE_FREE: usize = SLOTS;
/// Bits of the microsecond clock in a state word; the rest is the count.
const TIME_BITS: u32 = 48;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
const ONE: u64 = 1 << TIME_BITS;
/// The averaging period of the `usermm-psi` thread.
const PERIOD: Duration = Duration::from_secs(2);
/// The clock of `Psi::tick`, while it runs.
const TICK: Duration = Duration::from_millis(10);
/// A thread is non-idle for this many ticks after a usermm call (30 to 40 ms).
const RECENT_TICKS: u64 = 4;
/// A slot's value while its thread is stalled (non-idle whatever the tick).
const STALLED: u64 = u64::MAX;
/// `Psi::tick`: the clock runs. The count below it only grows (a restart jumps it
/// `RECENT_TICKS` ahead), so a call stamped in an earlier episode never reads as
/// recent in a later one.
const RUNNING: u64 = 1 << 63;
/// Time constants of the three averages, in seconds.
const TAUS: [f64; 3] = [10.0, 60.0, 300.0];
/// Samples per trigger window.
const UPDATES_PER_WINDOW: u64 = 10;
/// A trigger's window bounds (the kernel's).
const WINDOW_MIN: Duration = Duration::from_millis(500);
const WINDOW_MAX: Duration = Duration::from_secs(10);

thread_local! {
    /// Stall marks this thread holds (only the outermost counts).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// This thread's index into every Vm's `Psi::slots`, `UNSET` or `NONE_FREE`.
    /// No destructor: one load in a call.
    static MY_SLOT: Cell<usize> = const { Cell::new(UNSET) };
    /// Gives this thread's slot back when it exits. Touched once, when the slot
    /// is taken: its first access registers the destructor, which may allocate, so
    /// only threads that make usermm calls touch it, never the engine's own.
    static RELEASE: SlotRelease = const { SlotRelease(Cell::new(UNSET)) };
}

/// Which of the `SLOTS` thread slots are taken (process-wide, like thread ids), and
/// one past the highest ever taken (so readers scan no further).
static SLOT_TAKEN: [std::sync::atomic::AtomicBool; SLOTS] =
    [const { std::sync::atomic::AtomicBool::new(false) }; SLOTS];
static SLOTS_USED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Takes a free slot for this thread (`NONE_FREE` if none is).
#[cold]
#[inline(never)]
fn take_slot() -> usize {
    use std::sync::atomic::Ordering as O;
    let i = (0..SLOTS)
        .find(|&i| {
            SLOT_TAKEN[i]
                .compare_exchange(false, true, O::Acquire, O::Relaxed)
                .is_ok()
        })
        .unwrap_or(NONE_FREE);
    if i < SLOTS {
        SLOTS_USED.fetch_max(i + 1, O::Relaxed);
        RELEASE.with(|r| r.0.set(i));
    }
    i
}

struct SlotRelease(Cell<usize>);

impl Drop for SlotRelease {
    fn drop(&mut self) {
        // The next owner inherits the last tick this thread wrote in each Vm: it
        // counts as non-idle for at most `RECENT_TICKS` unless it makes a call.
        let i = self.0.get();
        if i < SLOTS {
            SLOT_TAKEN[i].store(false, std::sync::atomic::Ordering::Release);
        }
    }
}

/// One word alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot(AtomicU64);

/// The pressure state of one Vm.
#[derive(Debug)]
pub(crate) struct Psi {
    /// Zero of the microsecond clock of the state words.
    epoch: Instant,
    /// Stalled threads (high bits) and, while there are any, the start (µs) of the
    /// current stalled period (low `TIME_BITS`). CAS only.
    some: AtomicU64,
    /// 1 (high bits) while every non-idle thread is stalled, with the start of that
    /// period; 0 otherwise. CAS only.
    full: AtomicU64,
    /// Microseconds of finished `some` and `full` periods.
    some_us: AtomicU64,
    full_us: AtomicU64,
    /// The `tick` of the last usermm call of the thread owning slot `i`. Written
    /// only by that thread, and only when the tick moved on: a plain store, no
    /// locked instruction, no line another thread writes.
    slots: [Slot; SLOTS],
    /// A coarse clock: 0 while nobody needs to know who is non-idle (no stall for
    /// a `PERIOD`); set to 1 by a stall, then moved on every `TICK` by the
    /// `usermm-psi` thread, which puts it back to 0 after a quiet `PERIOD`. Alone
    /// on its line (read by every call, written at most every `TICK`).
    tick: Slot,
    /// Stalled threads not counted non-idle by a recent call: program threads in
    /// a transparent fault (marked by the handler), threads whose calls were not
    /// recorded.
    shared: Slot,
    /// Averages, triggers, stop flag. Protected by its mutex (a leaf).
    ctl: Mutex<Ctl>,
    wake: Condvar,
    /// The `usermm-psi` thread, until `stop` joins it. Protected by its mutex (a
    /// leaf; taken by `start` and `stop` only).
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Ctl {
    stop: bool,
    /// When the averages were last brought up to date, and the totals (µs) then.
    avg_at: u64,
    avg_some_us: u64,
    avg_full_us: u64,
    some: [f64; 3],
    full: [f64; 3],
    triggers: Vec<Trigger>,
    next_id: u64,
    /// The trigger whose callback is running now (its callback is out of `triggers`).
    running: Option<u64>,
    /// The `usermm-psi` thread's id, once it runs.
    thread_id: Option<std::thread::ThreadId>,
}

type Callback = Box<dyn FnMut(Duration) + Send>;

struct Trigger {
    id: u64,
    threshold_us: u64,
    window_us: u64,
    /// Sample every `window / UPDATES_PER_WINDOW`; the next at `next_us`.
    interval_us: u64,
    next_us: u64,
    /// (time, some total) samples, oldest at `head` once full.
    ring: Box<[(u64, u64)]>,
    head: usize,
    len: usize,
    last_fire: Option<u64>,
    /// `None` while it runs (see `Ctl::running`).
    cb: Option<Callback>,
}

impl std::fmt::Debug for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trigger")
            .field("id", &self.id)
            .field("threshold_us", &self.threshold_us)
            .field("window_us", &self.window_us)
            .finish_non_exhaustive()
    }
}

/// A stall mark (`Psi::stall`): the stall ends when it is dropped.
#[derive(Debug)]
pub(crate) struct Stall<'a> {
    psi: &'a Psi,
    /// The stalled thread's slot, or `None`: it is counted in `Psi::shared`.
    slot: Option<&'a Slot>,
}

impl Psi {
    pub fn new() -> Psi {
        Psi {
            epoch: Instant::now(),
            some: AtomicU64::new(0),
            full: AtomicU64::new(0),
            some_us: AtomicU64::new(0),
            full_us: AtomicU64::new(0),
            slots: std::array::from_fn(|_| Slot::default()),
            shared: Slot::default(),
            tick: Slot::default(),
            ctl: Mutex::new(Ctl {
                stop: false,
                avg_at: 0,
                avg_some_us: 0,
                avg_full_us: 0,
                some: [0.0; 3],
                full: [0.0; 3],
                triggers: Vec::new(),
                next_id: 0,
                running: None,
                thread_id: None,
            }),
            wake: Condvar::new(),
            thread: Mutex::new(None),
        }
    }

    fn now_us(&self) -> u64 {
        (self.epoch.elapsed().as_micros() as u64) & TIME_MASK
    }

    /// Records that the calling thread uses the Vm now (at the start of every
    /// usermm call): it counts as non-idle for the next `RECENT_TICKS`. While the
    /// clock is stopped (no stall lately) one load of a line nobody writes; else a
    /// thread-local load, a load of the thread's own line and, once per tick, a
    /// store to it.
    #[inline(always)]
    pub fn touch(&self) {
        let t = self.tick.0.load(Ordering::Relaxed);
        if t & RUNNING != 0 {
            self.touch_at(t & !RUNNING);
        }
    }

    #[inline]
    fn touch_at(&self, t: u64) {
        let mut i = MY_SLOT.with(Cell::get);
        if i == UNSET {
            i = take_slot();
            MY_SLOT.with(|s| s.set(i));
        }
        if let Some(s) = self.slots.get(i) {
            if s.0.load(Ordering::Relaxed) != t {
                s.0.store(t, Ordering::Relaxed);
            }
        }
    }

    /// The clock's count now.
    fn ticks(&self) -> u64 {
        self.tick.0.load(Ordering::SeqCst) & !RUNNING
    }

    fn recent(&self, s: &Slot, now: u64) -> bool {
        let t = s.0.load(Ordering::SeqCst);
        t != 0 && (t == STALLED || t + RECENT_TICKS > now)
    }

    /// Marks the calling thread (or, from the transparent-fault handler, the
    /// program thread it serves) stalled on memory until the mark is dropped. `None`
    /// if this thread holds a mark already (it counts once). No allocation, no lock.
    pub fn stall(&self) -> Option<Stall<'_>> {
        let outer = DEPTH.with(|d| {
            let n = d.get();
            d.set(n + 1);
            n == 0
        });
        if !outer {
            DEPTH.with(|d| d.set(d.get() - 1));
            return None;
        }
        let t = self.tick.0.load(Ordering::Relaxed);
        if t & RUNNING == 0
            && self
                .tick
                .0
                .compare_exchange(
                    t,
                    (t + RECENT_TICKS) | RUNNING,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            // Start the clock: the `usermm-psi` thread moves it on. One wake-up
            // (a system call, no lock) per episode of pressure, not per stall.
            self.wake.notify_all();
        }
        // A stalled thread is non-idle for the length of the stall: in its slot
        // (`STALLED` reads as recent), or, without one (the transparent-fault
        // handler, marking for a program thread), in `shared`.
        let slot = self.slots.get(MY_SLOT.with(Cell::get));
        match slot {
            Some(s) => s.0.store(STALLED, Ordering::SeqCst),
            None => {
                self.shared.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let now = self.now_us();
        let mut cur = self.some.load(Ordering::Relaxed);
        let stalled = loop {
            let next = if cur >> TIME_BITS == 0 {
                ONE | now
            } else {
                cur + ONE
            };
            match self
                .some
                .compare_exchange_weak(cur, next, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => break next >> TIME_BITS,
                Err(v) => cur = v,
            }
        };
        self.full_check(stalled, now);
        Some(Stall { psi: self, slot })
    }

    /// Non-idle threads now: those with a recent call, and stalled threads
    /// without one.
    fn active_count(&self) -> u64 {
        let used = SLOTS_USED.load(Ordering::Relaxed);
        let now = self.ticks();
        self.slots[..used]
            .iter()
            .filter(|s| self.recent(s, now))
            .count() as u64
            + self.shared.0.load(Ordering::SeqCst)
    }

    /// Starts or ends the `full` period, given `stalled` threads now.
    fn full_check(&self, stalled: u64, now: u64) {
        let active = self.active_count();
        let full = stalled > 0 && active <= stalled;
        let cur = self.full.load(Ordering::Relaxed);
        let running = cur >> TIME_BITS != 0;
        if full && !running {
            let _ = self
                .full
                .compare_exchange(cur, ONE | now, Ordering::SeqCst, Ordering::Relaxed);
        } else if !full && running {
            self.end_full(cur, now);
        }
    }

    fn end_full(&self, cur: u64, now: u64) {
        if self
            .full
            .compare_exchange(cur, 0, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
        {
            let start = cur & TIME_MASK;
            self.full_us
                .fetch_add(now.saturating_sub(start), Ordering::Relaxed);
        }
    }

    fn unstall(&self, slot: Option<&Slot>) {
        let now = self.now_us();
        // The thread runs again: a full period ends here (it may go on at once if
        // every other non-idle thread is stalled, below).
        let cur = self.full.load(Ordering::Relaxed);
        if cur >> TIME_BITS != 0 {
            self.end_full(cur, now);
        }
        match slot {
            // It runs again: a call now.
            Some(s) => s.0.store(self.ticks(), Ordering::SeqCst),
            None => {
                self.shared.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let mut cur = self.some.load(Ordering::Relaxed);
        let stalled = loop {
            let n = cur >> TIME_BITS;
            debug_assert!(n > 0);
            let next = if n <= 1 { 0 } else { cur - ONE };
            match self
                .some
                .compare_exchange_weak(cur, next, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => {
                    if n <= 1 {
                        let start = cur & TIME_MASK;
                        self.some_us
                            .fetch_add(now.saturating_sub(start), Ordering::Relaxed);
                    }
                    break next >> TIME_BITS;
                }
                Err(v) => cur = v,
            }
        };
        if stalled > 0 {
            self.full_check(stalled, now);
        }
        DEPTH.with(|d| d.set(d.get() - 1));
    }

    /// Totals (µs) of `some` and `full` up to `now`, the current periods included.
    fn totals(&self, now: u64) -> (u64, u64) {
        let f = |state: &AtomicU64, done: &AtomicU64| {
            // A period that ends between the two loads is counted in `done` then;
            // read the state again to see whether it moved.
            loop {
                let s = state.load(Ordering::SeqCst);
                let d = done.load(Ordering::SeqCst);
                if state.load(Ordering::SeqCst) == s {
                    let open = if s >> TIME_BITS != 0 {
                        now.saturating_sub(s & TIME_MASK)
                    } else {
                        0
                    };
                    return d + open;
                }
            }
        };
        (f(&self.some, &self.some_us), f(&self.full, &self.full_us))
    }

    /// Brings the averages up to `now`.
    fn update_avgs(&self, c: &mut Ctl, now: u64) {
        let (some, full) = self.totals(now);
        let dt = now.saturating_sub(c.avg_at);
        if dt == 0 {
            return;
        }
        let share = |d: u64| (d as f64 / dt as f64).clamp(0.0, 1.0) * 100.0;
        let (s, f) = (
            share(some.saturating_sub(c.avg_some_us)),
            share(full.saturating_sub(c.avg_full_us)),
        );
        for (i, tau) in TAUS.iter().enumerate() {
            let k = (-(dt as f64) / 1e6 / tau).exp();
            c.some[i] = s + (c.some[i] - s) * k;
            c.full[i] = f + (c.full[i] - f) * k;
        }
        c.avg_at = now;
        c.avg_some_us = some;
        c.avg_full_us = full;
    }

    /// The pressure now (`Vm::pressure`).
    pub fn pressure(&self) -> Pressure {
        let mut c = self.ctl.lock();
        let now = self.now_us();
        self.update_avgs(&mut c, now);
        let sh = |a: &[f64; 3]| Shares {
            avg10: a[0],
            avg60: a[1],
            avg300: a[2],
        };
        Pressure {
            some: sh(&c.some),
            full: sh(&c.full),
            total_some: Duration::from_micros(c.avg_some_us),
            total_full: Duration::from_micros(c.avg_full_us),
        }
    }

    /// Starts the `usermm-psi` thread (`Vm::new`).
    pub fn start(self: &Arc<Self>) -> Result<()> {
        let me = self.clone();
        let t = std::thread::Builder::new()
            .name("usermm-psi".into())
            .spawn_engine(move || {
                crate::sync::mark_engine_thread();
                me.run()
            })?;
        *self.thread.lock() = Some(t);
        Ok(())
    }

    /// Stops the `usermm-psi` thread and waits for it (unless called on it: a
    /// callback that drops the last handle of its Vm; the thread then ends after
    /// the callback).
    pub fn stop(&self) {
        let me = {
            let mut c = self.ctl.lock();
            c.stop = true;
            c.thread_id
        };
        self.wake.notify_all();
        if me == Some(std::thread::current().id()) {
            return;
        }
        let t = self.thread.lock().take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// A new trigger (`Vm::on_pressure`).
    pub fn trigger(
        self: &Arc<Self>,
        threshold: Duration,
        window: Duration,
        cb: Callback,
    ) -> Result<PressureTrigger> {
        if !(WINDOW_MIN..=WINDOW_MAX).contains(&window) {
            return Err(Error::InvalidArgument(format!(
                "pressure trigger window {window:?} outside 500ms..=10s"
            )));
        }
        if threshold.is_zero() || threshold > window {
            return Err(Error::InvalidArgument(format!(
                "pressure trigger threshold {threshold:?} not in (0, window {window:?}]"
            )));
        }
        let window_us = window.as_micros() as u64;
        let interval_us = window_us / UPDATES_PER_WINDOW;
        let ring = vec![(0u64, 0u64); UPDATES_PER_WINDOW as usize + 1].into_boxed_slice();
        let id = {
            let mut c = self.ctl.lock();
            if c.stop {
                return Err(Error::InvalidArgument("the Vm is shutting down".into()));
            }
            let id = c.next_id;
            c.next_id += 1;
            let now = self.now_us();
            let (some, _) = self.totals(now);
            let mut t = Trigger {
                id,
                threshold_us: threshold.as_micros() as u64,
                window_us,
                interval_us,
                next_us: now + interval_us,
                ring,
                head: 0,
                len: 0,
                last_fire: None,
                cb: Some(cb),
            };
            t.push(now, some);
            c.triggers.push(t);
            id
        };
        self.wake.notify_all();
        Ok(PressureTrigger {
            psi: self.clone(),
            id,
        })
    }

    /// The `usermm-psi` thread: averages every `PERIOD`, triggers at their sample
    /// times, callbacks with no lock held.
    fn run(&self) {
        let mut c = self.ctl.lock();
        c.thread_id = Some(std::thread::current().id());
        let period = PERIOD.as_micros() as u64;
        let mut next_avg = self.now_us() + period;
        let mut quiet_since = u64::MAX;
        let tick = TICK.as_micros() as u64;
        let mut next_tick = self.now_us() + tick;
        loop {
            if c.stop {
                return;
            }
            let now = self.now_us();
            if now >= next_avg {
                self.update_avgs(&mut c, now);
                next_avg = now + period;
                // A period without a stall: stop the clock (the next stall starts
                // it again).
                let (some, _) = self.totals(now);
                let t = self.tick.0.load(Ordering::SeqCst);
                if some == quiet_since && self.some.load(Ordering::SeqCst) >> TIME_BITS == 0 {
                    // Fails if a stall restarted it meanwhile: then it runs on.
                    let _ = self.tick.0.compare_exchange(
                        t,
                        t & !RUNNING,
                        Ordering::SeqCst,
                        Ordering::Relaxed,
                    );
                }
                quiet_since = some;
            }
            let ticking = self.tick.0.load(Ordering::Relaxed) & RUNNING != 0;
            if ticking && now >= next_tick {
                self.tick.0.fetch_add(1, Ordering::SeqCst);
                next_tick = now + tick;
                // Threads went idle or came back since the last stall transition.
                let stalled = self.some.load(Ordering::SeqCst) >> TIME_BITS;
                self.full_check(stalled, now);
            }
            let (some, _) = self.totals(now);
            let mut due = None;
            for t in c.triggers.iter_mut() {
                if now < t.next_us {
                    continue;
                }
                t.next_us = now + t.interval_us;
                t.push(now, some);
                if due.is_none() {
                    if let Some(growth) = t.fires(now, some) {
                        t.last_fire = Some(now);
                        if let Some(cb) = t.cb.take() {
                            due = Some((t.id, cb, growth));
                        }
                    }
                }
            }
            if let Some((id, mut cb, growth)) = due {
                c.running = Some(id);
                drop(c);
                cb(Duration::from_micros(growth));
                c = self.ctl.lock();
                c.running = None;
                let back = match c.triggers.iter_mut().find(|t| t.id == id) {
                    Some(t) => {
                        t.cb = Some(cb);
                        None
                    }
                    None => Some(cb),
                };
                self.wake.notify_all();
                if back.is_some() {
                    // Dropped meanwhile: its callback goes with no lock held.
                    drop(c);
                    drop(back);
                    c = self.ctl.lock();
                }
                continue; // another trigger may be due
            }
            let wake_at = c
                .triggers
                .iter()
                .map(|t| t.next_us)
                .fold(next_avg, u64::min);
            let wake_at = if ticking {
                wake_at.min(next_tick)
            } else {
                wake_at
            };
            let now = self.now_us();
            if wake_at > now {
                self.wake
                    .wait_for(&mut c, Duration::from_micros(wake_at - now));
            }
        }
    }

    fn remove(&self, id: u64) {
        let on_thread;
        let gone = {
            let mut c = self.ctl.lock();
            on_thread = c.thread_id == Some(std::thread::current().id());
            let gone = c
                .triggers
                .iter()
                .position(|t| t.id == id)
                .map(|i| c.triggers.swap_remove(i));
            // Its callback may be running: wait for it, so none runs after the
            // handle is gone (unless we are that callback).
            while !on_thread && c.running == Some(id) {
                self.wake.wait_for(&mut c, Duration::from_millis(100));
            }
            gone
        };
        drop(gone);
    }
}

impl Trigger {
    fn push(&mut self, now: u64, total: u64) {
        let n = self.ring.len();
        if self.len < n {
            self.ring[(self.head + self.len) % n] = (now, total);
            self.len += 1;
        } else {
            self.ring[self.head] = (now, total);
            self.head = (self.head + 1) % n;
        }
    }

    /// The stall growth over the last window if it reaches the threshold and the
    /// trigger has not fired within the last window.
    fn fires(&self, now: u64, total: u64) -> Option<u64> {
        if self
            .last_fire
            .is_some_and(|t| now.saturating_sub(t) < self.window_us)
        {
            return None;
        }
        // The oldest sample not older than the window (the ring spans about one).
        let n = self.ring.len();
        let base = (0..self.len)
            .map(|i| self.ring[(self.head + i) % n])
            .find(|&(t, _)| now.saturating_sub(t) <= self.window_us + self.interval_us / 2)?;
        let growth = total.saturating_sub(base.1);
        (growth >= self.threshold_us).then_some(growth)
    }
}

impl Drop for Stall<'_> {
    fn drop(&mut self) {
        self.psi.unstall(self.slot);
    }
}

/// A pressure trigger (`Vm::on_pressure`). Dropping it removes the trigger: no
/// callback of it runs after the drop returns (unless the drop is made by the
/// callback itself).
#[derive(Debug)]
pub struct PressureTrigger {
    psi: Arc<Psi>,
    id: u64,
}

impl Drop for PressureTrigger {
    fn drop(&mut self) {
        self.psi.remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_count_once_and_add_up() {
        let p = Psi::new();
        p.touch();
        {
            let s = p.stall();
            assert!(s.is_some());
            assert!(p.stall().is_none(), "nested marks count once");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (some, full) = p.totals(p.now_us());
        assert!(some >= 19_000, "{some}");
        // One thread, stalled: every non-idle thread was.
        assert!(full >= 19_000, "{full}");
        assert_eq!(p.some.load(Ordering::Relaxed), 0);
        assert_eq!(p.shared.0.load(Ordering::Relaxed), 0);
        assert_ne!(
            p.tick.0.load(Ordering::Relaxed) & RUNNING,
            0,
            "a stall starts the clock"
        );
    }

    /// Two threads: `other` makes a call, then `ticks` pass, then this one stalls
    /// for 20 ms. Returns the `full` total.
    fn full_with_other_calling(ticks: u64) -> u64 {
        let p = Arc::new(Psi::new());
        p.tick.0.store(1 | RUNNING, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel();
        let (tx2, rx2) = std::sync::mpsc::channel::<()>();
        let q = p.clone();
        let t = std::thread::spawn(move || {
            q.touch();
            tx.send(()).unwrap();
            rx2.recv().unwrap();
        });
        rx.recv().unwrap();
        p.tick.0.fetch_add(ticks, Ordering::Relaxed);
        p.touch();
        {
            let _s = p.stall();
            std::thread::sleep(Duration::from_millis(20));
        }
        tx2.send(()).unwrap();
        t.join().unwrap();
        let (some, full) = p.totals(p.now_us());
        assert!(some >= 19_000, "{some}");
        full
    }

    #[test]
    fn a_thread_that_called_lately_keeps_full_at_zero() {
        assert_eq!(full_with_other_calling(RECENT_TICKS - 1), 0);
    }

    #[test]
    fn a_thread_that_stopped_calling_is_idle() {
        assert!(full_with_other_calling(RECENT_TICKS) >= 19_000);
    }

    #[test]
    fn a_call_of_an_earlier_episode_is_not_recent() {
        let p = Arc::new(Psi::new());
        {
            let _s = p.stall(); // starts the clock
        }
        let q = p.clone();
        std::thread::spawn(move || q.touch()).join().unwrap();
        // The clock stops (a quiet period) and a later stall starts it again.
        let t = p.tick.0.load(Ordering::Relaxed);
        p.tick.0.store(t & !RUNNING, Ordering::Relaxed);
        let full0 = p.totals(p.now_us()).1;
        {
            let _s = p.stall();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(p.totals(p.now_us()).1 - full0 >= 19_000);
    }

    #[test]
    fn averages_decay_toward_the_share() {
        let p = Psi::new();
        let mut c = p.ctl.lock();
        c.avg_at = 0;
        // Half of 10 s stalled.
        p.some_us.store(5_000_000, Ordering::Relaxed);
        p.update_avgs(&mut c, 10_000_000);
        let want = 50.0 * (1.0 - (-1.0f64).exp());
        assert!((c.some[0] - want).abs() < 0.01, "{}", c.some[0]);
        assert!(c.some[1] < c.some[0] && c.some[2] < c.some[1]);
    }
}
