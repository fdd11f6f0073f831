//! The watchdog: threads announce what they are doing, and when one of them shows no
//! progress for a stall limit the run fails with a report of what every thread is
//! waiting on, instead of hanging. A panic in a watched thread fails the run with
//! its message.
//!
//! - A [`Board`] holds one slot per thread: operations completed, when the last one
//!   completed, the operation in progress. A thread takes its slot with
//!   [`Board::enter`] (a [`Me`]), then calls [`Me::begin`] before an operation that
//!   may block and [`Me::done`] after it. The free functions [`begin`] and [`done`]
//!   do the same for the slot the calling thread entered (and nothing in a thread
//!   that is not watched), so helpers deep in a call chain can announce their steps.
//! - [`Watchdog`] spawns named threads on a board and watches them from the calling
//!   thread: [`Watchdog::try_run`] returns a [`Failure`] (stall or panic, with the
//!   report), [`Watchdog::run`] panics with it. Stuck threads are left behind (they
//!   cannot be joined); the process exits with the test harness or the command.
//! - [`watched`] runs one closure on a watched thread and returns its result: the
//!   way a whole test runs under the watchdog.
//!
//! Code that spawns its own (scoped) threads uses a [`Board`] directly and checks
//! [`Board::idle`] itself (`usermm run` does, to warn and then give up).

use std::any::Any;
use std::cell::RefCell;
use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One thread's progress.
#[derive(Debug)]
struct Slot {
    name: String,
    /// Operations completed.
    done: AtomicU64,
    /// Milliseconds since the board's start when the last operation completed (or
    /// the thread entered).
    last_ms: AtomicU64,
    /// Inside an operation (between `begin` and `done`).
    busy: AtomicBool,
    finished: AtomicBool,
    /// The last operation begun.
    current: Mutex<String>,
}

/// The progress of a set of threads.
#[derive(Debug)]
pub struct Board {
    start: Instant,
    slots: Vec<Slot>,
    stop: AtomicBool,
}

impl Board {
    /// A board with one slot per name.
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Arc<Board> {
        Arc::new(Board {
            start: Instant::now(),
            slots: names
                .into_iter()
                .map(|n| Slot {
                    name: n.into(),
                    done: AtomicU64::new(0),
                    last_ms: AtomicU64::new(0),
                    busy: AtomicBool::new(false),
                    finished: AtomicBool::new(false),
                    current: Mutex::new("starting".into()),
                })
                .collect(),
            stop: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The calling thread takes slot `tid`: progress is counted from now, and the
    /// free functions [`begin`]/[`done`] act on this slot until the `Me` is dropped
    /// (which marks the slot finished).
    pub fn enter(self: &Arc<Self>, tid: usize) -> Me {
        let s = &self.slots[tid];
        s.last_ms.store(self.now_ms(), Ordering::Relaxed);
        s.finished.store(false, Ordering::SeqCst);
        let prev = CURRENT.with(|c| c.borrow_mut().replace((self.clone(), tid)));
        Me {
            board: self.clone(),
            tid,
            prev,
        }
    }

    /// Asks every thread to stop (see [`Me::should_stop`]).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether [`Board::stop`] was called.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Operations completed by every thread together.
    pub fn total_done(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.done.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether every slot is finished.
    pub fn all_finished(&self) -> bool {
        self.slots.iter().all(|s| s.finished.load(Ordering::SeqCst))
    }

    /// The unfinished thread that has completed nothing for the longest time, and
    /// for how long (None when every thread has finished).
    pub fn idle(&self) -> Option<(usize, Duration)> {
        let now = self.now_ms();
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.finished.load(Ordering::SeqCst))
            .map(|(i, s)| {
                let last = s.last_ms.load(Ordering::Relaxed);
                (i, Duration::from_millis(now.saturating_sub(last)))
            })
            .max_by_key(|&(_, d)| d)
    }

    /// The slot named `name`.
    pub fn slot_of(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.name == name)
    }

    /// The name of slot `tid`.
    pub fn name(&self, tid: usize) -> &str {
        &self.slots[tid].name
    }

    /// One line per thread: what it is doing (or last did), how many operations it
    /// completed and how long ago the last one completed.
    pub fn report(&self) -> String {
        let now = self.now_ms();
        let mut out = String::new();
        for s in &self.slots {
            let cur = s.current.lock().map(|c| c.clone()).unwrap_or_default();
            let state = if s.finished.load(Ordering::SeqCst) {
                format!("finished (last: {cur})")
            } else if s.busy.load(Ordering::Relaxed) {
                format!("waiting on: {cur}")
            } else {
                format!("between operations (last done: {cur})")
            };
            let _ = writeln!(
                out,
                "  {}: {state}; {} ops done, last completed {} ms ago",
                s.name,
                s.done.load(Ordering::Relaxed),
                now.saturating_sub(s.last_ms.load(Ordering::Relaxed)),
            );
        }
        out
    }
}

thread_local! {
    static CURRENT: RefCell<Option<(Arc<Board>, usize)>> = const { RefCell::new(None) };
}

/// A thread's hold on its slot of a [`Board`]; marks the slot finished when dropped.
#[derive(Debug)]
pub struct Me {
    board: Arc<Board>,
    tid: usize,
    prev: Option<(Arc<Board>, usize)>,
}

impl Me {
    /// This thread's index on the board.
    pub fn tid(&self) -> usize {
        self.tid
    }

    /// Records the operation about to start (`what` is called every time: keep it
    /// cheap).
    pub fn begin(&self, what: impl FnOnce() -> String) {
        let s = &self.board.slots[self.tid];
        *s.current.lock().unwrap_or_else(|e| e.into_inner()) = what();
        s.busy.store(true, Ordering::Relaxed);
    }

    /// Records that an operation completed (progress).
    pub fn done(&self) {
        let s = &self.board.slots[self.tid];
        s.busy.store(false, Ordering::Relaxed);
        s.done.fetch_add(1, Ordering::Relaxed);
        s.last_ms.store(self.board.now_ms(), Ordering::Relaxed);
    }

    /// Whether the run is being abandoned (another thread failed, the watchdog
    /// fired, or the owner asked to stop).
    pub fn should_stop(&self) -> bool {
        self.board.stopping()
    }

    /// The board.
    pub fn board(&self) -> &Arc<Board> {
        &self.board
    }
}

impl Drop for Me {
    fn drop(&mut self) {
        let s = &self.board.slots[self.tid];
        s.busy.store(false, Ordering::Relaxed);
        s.finished.store(true, Ordering::SeqCst);
        let prev = self.prev.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

/// [`Me::begin`] for the slot the calling thread entered; nothing if it entered none.
pub fn begin(what: impl FnOnce() -> String) {
    CURRENT.with(|c| {
        if let Some((b, tid)) = &*c.borrow() {
            let s = &b.slots[*tid];
            *s.current.lock().unwrap_or_else(|e| e.into_inner()) = what();
            s.busy.store(true, Ordering::Relaxed);
        }
    });
}

/// [`Me::done`] for the slot the calling thread entered; nothing if it entered none.
pub fn done() {
    CURRENT.with(|c| {
        if let Some((b, tid)) = &*c.borrow() {
            let s = &b.slots[*tid];
            s.busy.store(false, Ordering::Relaxed);
            s.done.fetch_add(1, Ordering::Relaxed);
            s.last_ms.store(b.now_ms(), Ordering::Relaxed);
        }
    });
}

/// The message of a panic payload.
pub fn panic_message(e: &(dyn Any + Send)) -> String {
    if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = e.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "non-string panic".into()
    }
}

/// Why a watched run failed; `Display` gives the whole report.
#[derive(Debug, Clone)]
pub enum Failure {
    /// A thread made no progress for the stall limit.
    Stalled {
        /// The stuck thread.
        thread: String,
        /// How long it went without progress.
        idle: Duration,
        /// The stall limit.
        limit: Duration,
        /// What every thread was doing, and the extra report.
        report: String,
    },
    /// One or more threads panicked.
    Panicked {
        /// One line per failed thread: its name and the panic message.
        failures: Vec<String>,
        /// What every thread was doing.
        report: String,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Stalled {
                thread,
                idle,
                limit,
                report,
            } => write!(
                f,
                "watchdog: {thread} made no progress for {} ms (limit {limit:?}); stuck?\n\
                 threads:\n{report}",
                idle.as_millis()
            ),
            Failure::Panicked { failures, report } => {
                write!(f, "{}\nthreads:\n{report}", failures.join("\n"))
            }
        }
    }
}

type Job = Box<dyn FnOnce(&Me) + Send + 'static>;

/// Named threads run under a watchdog (see the module documentation).
pub struct Watchdog {
    stall: Duration,
    extra: Box<dyn Fn() -> String>,
    on_failure: Box<dyn Fn()>,
    jobs: Vec<(String, Job)>,
    helpers: Vec<String>,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("stall", &self.stall)
            .field("jobs", &self.jobs.iter().map(|j| &j.0).collect::<Vec<_>>())
            .finish()
    }
}

impl Watchdog {
    /// A watchdog that fails the run when a thread completes nothing for `stall`.
    pub fn new(stall: Duration) -> Watchdog {
        Watchdog {
            stall,
            extra: Box::new(String::new),
            on_failure: Box::new(|| {}),
            jobs: Vec::new(),
            helpers: Vec::new(),
        }
    }

    /// Text appended to a stall report (engine stats, say).
    pub fn extra(mut self, f: impl Fn() -> String + 'static) -> Watchdog {
        self.extra = Box::new(f);
        self
    }

    /// Called once when the run fails, before the failure is returned (to kill
    /// servers a stuck thread owns, say).
    pub fn on_failure(mut self, f: impl Fn() + 'static) -> Watchdog {
        self.on_failure = Box::new(f);
        self
    }

    /// Adds a thread named `name` running `f`.
    pub fn thread(mut self, name: impl Into<String>, f: impl FnOnce(&Me) + Send + 'static) -> Self {
        self.jobs.push((name.into(), Box::new(f)));
        self
    }

    /// Reserves a slot named `name` for a helper thread that the watched threads
    /// spawn themselves: it enters the slot with
    /// `me.board().enter(me.board().slot_of(name))`, and is watched while it holds it.
    pub fn helper(mut self, name: impl Into<String>) -> Self {
        self.helpers.push(name.into());
        self
    }

    /// Runs every thread and watches them until all have finished; a stall or a
    /// panic returns the failure (after asking the others to stop and giving them
    /// five seconds).
    pub fn try_run(self) -> Result<(), Failure> {
        let njobs = self.jobs.len();
        let board = Board::new(
            self.jobs
                .iter()
                .map(|j| j.0.clone())
                .chain(self.helpers.iter().cloned()),
        );
        for s in &board.slots[njobs..] {
            s.finished.store(true, Ordering::SeqCst);
            *s.current.lock().unwrap_or_else(|e| e.into_inner()) = "not started".into();
        }
        let mut handles: Vec<Option<JoinHandle<Result<(), String>>>> = self
            .jobs
            .into_iter()
            .enumerate()
            .map(|(tid, (name, job))| {
                let b = board.clone();
                Some(
                    std::thread::Builder::new()
                        .name(name)
                        .spawn(move || {
                            let me = b.enter(tid);
                            let r = std::panic::catch_unwind(AssertUnwindSafe(|| job(&me)));
                            drop(me);
                            r.map_err(|e| {
                                b.stop();
                                panic_message(&*e)
                            })
                        })
                        .expect("spawn a watched thread"),
                )
            })
            .collect();
        let mut failures = Vec::new();
        let collect = |handles: &mut Vec<Option<JoinHandle<Result<(), String>>>>,
                       failures: &mut Vec<String>| {
            for (tid, h) in handles.iter_mut().enumerate() {
                if h.as_ref().is_some_and(|h| h.is_finished()) {
                    let r = h.take().expect("checked").join();
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(m)) => failures.push(format!("{} panicked: {m}", board.name(tid))),
                        Err(e) => failures.push(format!(
                            "{} panicked: {}",
                            board.name(tid),
                            panic_message(&*e)
                        )),
                    }
                }
            }
        };
        loop {
            collect(&mut handles, &mut failures);
            if !failures.is_empty() {
                let t = Instant::now();
                while t.elapsed() < Duration::from_secs(5)
                    && handles.iter().flatten().any(|h| !h.is_finished())
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                collect(&mut handles, &mut failures);
                (self.on_failure)();
                return Err(Failure::Panicked {
                    failures,
                    report: board.report(),
                });
            }
            if handles.iter().all(|h| h.is_none()) {
                return Ok(());
            }
            if let Some((tid, idle)) = board.idle() {
                if idle > self.stall {
                    board.stop();
                    let report = board.report() + &(self.extra)();
                    (self.on_failure)();
                    return Err(Failure::Stalled {
                        thread: board.name(tid).to_string(),
                        idle,
                        limit: self.stall,
                        report,
                    });
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Watchdog::try_run`], panicking with the failure's report.
    pub fn run(self) {
        if let Err(f) = self.try_run() {
            panic!("{f}");
        }
    }
}

/// Runs `n` threads `f(me)` (named `thread 0`…) under a watchdog with stall limit
/// `stall`; `extra` is appended to a stall report. Panics on a stall or a panic.
pub fn run_workers<F>(n: usize, stall: Duration, extra: impl Fn() -> String + 'static, f: F)
where
    F: Fn(&Me) + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let mut w = Watchdog::new(stall).extra(extra);
    for tid in 0..n {
        let f = f.clone();
        w = w.thread(format!("thread {tid}"), move |me| f(me));
    }
    w.run();
}

/// Runs `f` on a thread named `name` under a watchdog with stall limit `stall` and
/// returns its result; panics (with the report) on a stall or with `f`'s panic
/// message. Everything `f` needs must move into it.
pub fn watched<T: Send + 'static>(
    name: &str,
    stall: Duration,
    f: impl FnOnce(&Me) -> T + Send + 'static,
) -> T {
    let out = Arc::new(Mutex::new(None));
    let o = out.clone();
    Watchdog::new(stall)
        .thread(name, move |me| {
            let v = f(me);
            *o.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
        })
        .run();
    let v = out.lock().unwrap_or_else(|e| e.into_inner()).take();
    v.expect("the watched thread returned")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_reported_with_what_each_thread_waits_on() {
        let f = Watchdog::new(Duration::from_millis(200))
            .extra(|| "extra line\n".into())
            .thread("busy", |me| {
                while !me.should_stop() {
                    me.begin(|| "spinning".into());
                    std::thread::sleep(Duration::from_millis(5));
                    me.done();
                }
            })
            .thread("stuck", |_| {
                begin(|| "waiting for Godot".into());
                std::thread::sleep(Duration::from_secs(2));
            })
            .try_run()
            .unwrap_err();
        let text = f.to_string();
        assert!(
            matches!(&f, Failure::Stalled { thread, .. } if thread == "stuck"),
            "{text}"
        );
        assert!(
            text.contains("stuck: waiting on: waiting for Godot"),
            "{text}"
        );
        assert!(text.contains("extra line"), "{text}");
    }

    #[test]
    fn a_panic_is_reported_with_its_message() {
        let f = Watchdog::new(Duration::from_secs(10))
            .thread("ok", |me| {
                me.begin(|| "one step".into());
                me.done();
            })
            .thread("bad", |_| panic!("the sky fell"))
            .try_run()
            .unwrap_err();
        let text = f.to_string();
        assert!(text.contains("bad panicked: the sky fell"), "{text}");
    }

    #[test]
    fn watched_returns_the_value_and_free_functions_are_no_ops_outside() {
        begin(|| unreachable!("not watched: the closure is not called"));
        done();
        let v = watched("w", Duration::from_secs(10), |me| {
            begin(|| "x".into());
            done();
            me.board().total_done()
        });
        assert_eq!(v, 1);
    }
}
