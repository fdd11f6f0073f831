//! The benchmark workload, identical for every system it is run against: usermm
//! through the API, plain memory, and anonymous memory under kernel swap (in the
//! `bench-kernel-child` process).
//!
//! Thread `t` draws from `Rng::new(seed + (t+1)·φ)`: per access a page from the
//! pattern's sampler over the whole working set, a write/read choice (`unit() <
//! write_ratio`) and `words` word offsets. A read loads an 8-byte word; a write
//! stores one. Before timing, every page is written once, whole (the fill), and the
//! workload runs untimed for a warm-up. Every 64th access is timed with `Instant`.
//!
//! A [`Stream`] carries each thread's generator and count from one [`measure_stream`]
//! to the next, so a system kept alive across repeated timed phases (`usermm bench
//! --repeats`) sees one continuing access sequence: its state (what is resident,
//! what the policy learnt) carries over, and the content check replays one sequence.
//!
//! The driver knows nothing of the program that runs it: a program with a Ctrl-C
//! handler and things to clean up installs [`Hooks`] (`usermm bench` does), so
//! that the workload stops when interrupted and a stuck run cleans up before the
//! process exits.

use crate::workload::{splitmix, Pattern, Rng, Sampler, GOLDEN};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use usermm::{AddressSpace, VAddr, PAGE_SIZE};

/// What the program running the driver adds: how to tell it was interrupted, and
/// what to do before the process exits when the system under test is stuck.
#[derive(Debug, Clone, Copy)]
pub struct Hooks {
    /// Whether the user asked to stop (Ctrl-C): the workload stops early and the
    /// driver returns `Err("interrupted")`.
    pub interrupted: fn() -> bool,
    /// Called once before the process exits (status 1) because the workload made
    /// no progress for [`STALL_LIMIT`] (stuck threads cannot be joined).
    pub before_exit: fn(),
}

static HOOKS: OnceLock<Hooks> = OnceLock::new();

/// Installs the hooks (once; later calls are ignored). Without hooks, nothing
/// interrupts the workload and nothing runs before a stall exits.
pub fn set_hooks(h: Hooks) {
    let _ = HOOKS.set(h);
}

fn interrupted() -> bool {
    HOOKS.get().is_some_and(|h| (h.interrupted)())
}

pub(crate) const WORDS_PER_PAGE: u64 = (PAGE_SIZE / 8) as u64;
/// One access in this many is timed.
pub const SAMPLE_EVERY: u64 = 64;

/// Memory the workload runs on. Offsets are bytes from the start of the working set,
/// always 8-byte aligned and inside it.
pub trait Target: Sync {
    /// Loads the word at `off`.
    fn read(&self, off: u64) -> Result<u64, usermm::Error>;
    /// Stores `v` at `off`.
    fn write(&self, off: u64, v: u64) -> Result<(), usermm::Error>;
    /// Writes page `page` whole (used by the fill only; one thread per page).
    fn fill(&self, page: u64, data: &[u8]) -> Result<(), usermm::Error>;
}

/// usermm through the public API (`read`/`write` of 8 bytes).
#[derive(Debug)]
pub struct UsermmTarget {
    /// The address space.
    pub mm: AddressSpace,
    /// Start of the working set's region.
    pub base: VAddr,
}

impl Target for UsermmTarget {
    #[inline]
    fn read(&self, off: u64) -> Result<u64, usermm::Error> {
        let mut b = [0u8; 8];
        self.mm.read(self.base + off, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    #[inline]
    fn write(&self, off: u64, v: u64) -> Result<(), usermm::Error> {
        self.mm.write(self.base + off, &v.to_le_bytes())
    }
    fn fill(&self, page: u64, data: &[u8]) -> Result<(), usermm::Error> {
        self.mm.write(self.base + page * PAGE_SIZE as u64, data)
    }
}

/// Ordinary memory (a `Vec` or an anonymous mapping), accessed with relaxed
/// atomic loads and stores (plain `mov`s) so threads may share pages.
#[derive(Debug)]
pub struct RawTarget {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: all accesses through the pointer are atomic word accesses, except the
// fill, which writes each page from exactly one thread with no concurrent reader.
unsafe impl Sync for RawTarget {}
// SAFETY: as above; the memory is owned by the caller, who outlives the target.
unsafe impl Send for RawTarget {}

impl RawTarget {
    /// # Safety
    /// `ptr..ptr+len` must be valid, 8-byte aligned, writable memory for as long as
    /// the target is used, and not accessed otherwise meanwhile.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> RawTarget {
        RawTarget { ptr, len }
    }
    #[inline]
    fn word(&self, off: u64) -> &AtomicU64 {
        debug_assert!(off as usize + 8 <= self.len && off.is_multiple_of(8));
        // SAFETY: offsets are in bounds and 8-byte aligned (the workload only makes
        // such offsets); the memory lives as long as `self` (see `new`).
        unsafe { AtomicU64::from_ptr(self.ptr.add(off as usize).cast::<u64>()) }
    }
}

impl Target for RawTarget {
    #[inline]
    fn read(&self, off: u64) -> Result<u64, usermm::Error> {
        Ok(self.word(off).load(Ordering::Relaxed))
    }
    #[inline]
    fn write(&self, off: u64, v: u64) -> Result<(), usermm::Error> {
        self.word(off).store(v, Ordering::Relaxed);
        Ok(())
    }
    fn fill(&self, page: u64, data: &[u8]) -> Result<(), usermm::Error> {
        let off = page as usize * PAGE_SIZE;
        assert!(off + data.len() <= self.len);
        // SAFETY: in bounds (checked); during the fill each page has one writer and
        // no reader.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }
}

/// The workload of one cell.
#[derive(Debug, Clone, Copy)]
pub struct WorkSpec {
    /// Pages in the working set.
    pub pages: u64,
    /// Access pattern.
    pub pattern: Pattern,
    /// Fraction of accesses that write.
    pub write_ratio: f64,
    /// Threads.
    pub threads: u32,
    /// Words per access.
    pub words: u32,
    /// Seed.
    pub seed: u64,
    /// Warm-up length in accesses (all threads together), capped by a time limit.
    pub warm_accesses: u64,
    /// What the pages hold: the fill and the words the accesses write.
    pub content: Content,
}

/// Page contents of a workload: how well they compress. The fill writes them, and
/// the accesses' writes keep them that way (see [`Content::write_off`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Content {
    /// Every word random ([`fill_data`]): what compressors cannot shrink. The
    /// default, and the only content before compressed tiers were measured.
    #[default]
    Incompressible,
    /// One word in four random, the other three zero: ~3× with lz4 or lzo, well
    /// under the half page a zpool (or zswap) wants. Writes go to the random words
    /// only, so a page written many times compresses as well as after the fill.
    Compressible,
}

impl Content {
    /// `compressible` or `incompressible` (also `random`).
    pub fn parse(s: &str) -> Result<Content, String> {
        match s.trim() {
            "incompressible" | "random" => Ok(Content::Incompressible),
            "compressible" => Ok(Content::Compressible),
            _ => Err(format!(
                "content {s:?} is neither compressible nor incompressible"
            )),
        }
    }

    /// The name `parse` reads back.
    pub fn name(self) -> &'static str {
        match self {
            Content::Incompressible => "incompressible",
            Content::Compressible => "compressible",
        }
    }

    /// The byte offset a write drawn at `off` goes to: `off` itself, or for
    /// compressible pages the random word of its group of four (so the zero words
    /// stay zero). Reads go to `off`. The verifier maps offsets the same way.
    #[inline]
    pub fn write_off(self, off: u64) -> u64 {
        match self {
            Content::Incompressible => off,
            Content::Compressible => off & !31,
        }
    }

    /// Contents of page `page` for the fill.
    pub fn fill(self, page: u64, seed: u64, buf: &mut [u8]) {
        fill_data(page, seed, buf);
        if self == Content::Compressible {
            for (i, c) in buf.chunks_exact_mut(8).enumerate() {
                if i % 4 != 0 {
                    c.fill(0);
                }
            }
        }
    }
}

/// Counters of the system under test, read at the phase boundaries.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snap {
    /// Major faults so far.
    pub major_faults: u64,
    /// Pages read from swap so far.
    pub reads: u64,
    /// Pages written to swap so far.
    pub writes: u64,
    /// Microseconds with at least one thread stalled on memory so far (usermm's
    /// `Vm::pressure().total_some`; 0 for systems without it).
    pub stall_some_us: u64,
    /// Likewise with every thread stalled (`total_full`).
    pub stall_full_us: u64,
}

/// What one timed phase measured.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Accesses in the timed phase.
    pub accesses: u64,
    /// Length of the timed phase.
    pub secs: f64,
    /// Fill time.
    pub fill_secs: f64,
    /// Deltas of the counters over the timed phase.
    pub major_faults: u64,
    /// Swap-ins over the timed phase.
    pub device_reads: u64,
    /// Swap-outs over the timed phase.
    pub device_writes: u64,
    /// Latency of the sampled accesses.
    pub hist: LatHist,
    /// Sink of the values read, so the loads are not optimised away.
    pub sink: u64,
    /// Accesses done in the warm-up.
    pub warm_accesses: u64,
    /// Accesses of the stream before this warm-up (all threads; 0 for a fresh
    /// stream): the sequence ends at `stream_start + warm_accesses + accesses`.
    pub stream_start: u64,
    /// Microseconds of the timed phase with at least one thread stalled on memory
    /// (usermm's pressure; 0 for systems without it).
    pub stall_some_us: u64,
    /// Likewise with every thread stalled.
    pub stall_full_us: u64,
}

impl Measured {
    /// Accesses per second.
    pub fn rate(&self) -> f64 {
        self.accesses as f64 / self.secs.max(1e-9)
    }
}

/// Latency histogram in nanoseconds: 16 sub-buckets per power of two (≤ 6 % error).
#[derive(Debug, Clone)]
pub struct LatHist {
    b: Vec<u64>,
    n: u64,
}

impl Default for LatHist {
    fn default() -> Self {
        LatHist {
            b: vec![0; 64 * 16],
            n: 0,
        }
    }
}

impl LatHist {
    #[inline]
    fn idx(ns: u64) -> usize {
        if ns < 16 {
            ns as usize
        } else {
            let msb = 63 - ns.leading_zeros() as u64;
            let sub = (ns >> (msb - 4)) & 15;
            ((msb - 3) * 16 + sub) as usize
        }
    }
    fn value(i: usize) -> f64 {
        if i < 16 {
            i as f64
        } else {
            let msb = (i / 16 + 3) as u32;
            let sub = (i % 16) as u64;
            // Middle of the bucket.
            ((16 + sub) << (msb - 4)) as f64 + (1u64 << (msb - 4)) as f64 / 2.0
        }
    }
    /// Adds one sample.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.b[Self::idx(ns).min(64 * 16 - 1)] += 1;
        self.n += 1;
    }
    /// Adds another histogram.
    pub fn merge(&mut self, o: &LatHist) {
        for (a, b) in self.b.iter_mut().zip(&o.b) {
            *a += b;
        }
        self.n += o.n;
    }
    /// The `q` quantile (0..1) in microseconds (0 with no samples).
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let want = ((self.n as f64 * q).ceil() as u64).clamp(1, self.n);
        let mut acc = 0;
        for (i, &c) in self.b.iter().enumerate() {
            acc += c;
            if acc >= want {
                return Self::value(i) / 1000.0;
            }
        }
        0.0
    }
    /// The non-empty buckets, for sending a histogram between processes.
    pub fn buckets(&self) -> Vec<(u32, u64)> {
        self.b
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (i as u32, c))
            .collect()
    }
    /// A histogram from `buckets()`.
    pub fn from_buckets(v: &[(u32, u64)]) -> LatHist {
        let mut h = LatHist::default();
        for &(i, c) in v {
            if let Some(b) = h.b.get_mut(i as usize) {
                *b += c;
                h.n += c;
            }
        }
        h
    }
}

/// Contents of page `page` for the fill: pseudo-random (splitmix64 from a key of
/// the seed and the page), never all zero.
pub fn fill_data(page: u64, seed: u64, buf: &mut [u8]) {
    let mut x = seed ^ page.wrapping_mul(GOLDEN) ^ 0x5851_F42D_4C95_7F2D;
    for c in buf.chunks_exact_mut(8) {
        c.copy_from_slice(&(splitmix(&mut x) | 1).to_le_bytes());
    }
}

/// The generator of thread `t`.
pub fn thread_rng(seed: u64, t: u32) -> Rng {
    Rng::for_thread(seed, u64::from(t))
}

/// How long the workload may make no progress at all before the run is declared
/// stuck (a deadlock in the system under test): the undo actions run and the process
/// exits with status 1, since stuck threads cannot be joined.
pub const STALL_LIMIT: Duration = Duration::from_secs(120);

/// Tracks progress of a counter; aborts the process after `STALL_LIMIT` without any.
#[derive(Debug)]
struct Stall {
    what: &'static str,
    last: u64,
    since: Instant,
}

impl Stall {
    fn new(what: &'static str) -> Stall {
        Stall {
            what,
            last: u64::MAX,
            since: Instant::now(),
        }
    }
    fn check(&mut self, progress: u64) {
        if progress != self.last {
            self.last = progress;
            self.since = Instant::now();
        } else if self.since.elapsed() >= STALL_LIMIT {
            eprintln!(
                "\nerror: no progress for {} s during the {}: the system under test appears \
                 stuck (deadlock?); cleaning up and exiting",
                STALL_LIMIT.as_secs(),
                self.what
            );
            if let Some(h) = HOOKS.get() {
                (h.before_exit)();
            }
            std::process::exit(1);
        }
    }
}

/// Waits for scoped threads to finish, watching `progress` for a stall.
fn wait_all<T>(
    hs: &[std::thread::ScopedJoinHandle<'_, T>],
    what: &'static str,
    progress: impl Fn() -> u64,
) {
    let mut stall = Stall::new(what);
    while !hs.iter().all(|h| h.is_finished()) {
        stall.check(progress());
        std::thread::sleep(Duration::from_millis(20));
    }
}

const WARM: u8 = 0;
const TIMED: u8 = 1;
const STOP: u8 = 2;

#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(AtomicU64);

/// Writes every page once, whole, with `threads` threads (page `p` by thread
/// `p % threads`).
pub fn fill<T: Target>(target: &T, spec: &WorkSpec) -> Result<(), String> {
    let err = Mutex::new(None);
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..u64::from(spec.threads))
            .map(|t| {
                let (err, done) = (&err, &done);
                s.spawn(move || {
                    let mut buf = vec![0u8; PAGE_SIZE];
                    let mut p = t;
                    while p < spec.pages {
                        if interrupted() || err.lock().map(|e| e.is_some()).unwrap_or(true) {
                            return;
                        }
                        spec.content.fill(p, spec.seed, &mut buf);
                        if let Err(e) = target.fill(p, &buf) {
                            *err.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(format!("fill: write of page {p}: {e}"));
                            return;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        p += u64::from(spec.threads);
                    }
                })
            })
            .collect();
        wait_all(&hs, "fill", || done.load(Ordering::Relaxed));
    });
    if let Some(e) = err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    if interrupted() {
        return Err("interrupted".into());
    }
    Ok(())
}

/// Each thread's place in the access sequence: its generator and its count of
/// accesses so far (the `n` its writes store). A fresh stream starts every thread at
/// access 0; [`measure_stream`] leaves it where the threads stopped.
#[derive(Debug, Clone)]
pub struct Stream {
    rngs: Vec<Rng>,
    counts: Vec<u64>,
}

impl Stream {
    /// Every thread of `spec` at the start of its sequence.
    pub fn new(spec: &WorkSpec) -> Stream {
        Stream {
            rngs: (0..spec.threads)
                .map(|t| thread_rng(spec.seed, t))
                .collect(),
            counts: vec![0; spec.threads as usize],
        }
    }

    /// Accesses of all threads so far.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

fn worker<T: Target>(
    target: &T,
    spec: &WorkSpec,
    place: (&mut Rng, &mut u64),
    phase: &AtomicU8,
    count: &AtomicU64,
    err: &Mutex<Option<String>>,
) -> (LatHist, u64) {
    let sampler = Sampler::new(spec.pattern, spec.pages);
    let (rng, n_out) = place;
    let mut hist = LatHist::default();
    let mut sink = 0u64;
    let mut n = *n_out;
    let words = spec.words;
    loop {
        let ph = phase.load(Ordering::Relaxed);
        if ph == STOP {
            break;
        }
        let timed = ph == TIMED;
        for k in 0..SAMPLE_EVERY {
            let t0 = (timed && k == 0).then(Instant::now);
            let page = sampler.sample(rng);
            let write = rng.unit() < spec.write_ratio;
            for _ in 0..words {
                let off = page * PAGE_SIZE as u64 + rng.below(WORDS_PER_PAGE) * 8;
                let r = if write {
                    let off = spec.content.write_off(off);
                    target.write(off, off ^ n)
                } else {
                    target.read(off).map(|v| sink ^= v)
                };
                if let Err(e) = r {
                    let what = if write { "write" } else { "read" };
                    *err.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("{what} of page {page}: {e}"));
                    phase.store(STOP, Ordering::Relaxed);
                    *n_out = n;
                    return (hist, sink);
                }
            }
            if let Some(t0) = t0 {
                hist.record(t0.elapsed().as_nanos() as u64);
            }
            n += 1;
        }
        count.store(n, Ordering::Relaxed);
    }
    *n_out = n;
    (hist, sink)
}

/// Runs the workload on `target`: the fill, an untimed warm-up of
/// `spec.warm_accesses` accesses (or `warmup`, whichever ends first: the same rule
/// for every system), then `timed` measured. `snap` reads the system's counters at
/// the boundaries of the timed phase.
pub fn drive<T: Target>(
    target: &T,
    spec: &WorkSpec,
    warmup: Duration,
    timed: Duration,
    snap: &(dyn Fn() -> Snap + Sync),
) -> Result<Measured, String> {
    let f0 = Instant::now();
    fill(target, spec)?;
    let fill_secs = f0.elapsed().as_secs_f64();
    let mut m = measure(target, spec, warmup, timed, snap)?;
    m.fill_secs = fill_secs;
    Ok(m)
}

/// The warm-up and the timed phase of `drive`, on a target already filled.
pub fn measure<T: Target>(
    target: &T,
    spec: &WorkSpec,
    warmup: Duration,
    timed: Duration,
    snap: &(dyn Fn() -> Snap + Sync),
) -> Result<Measured, String> {
    measure_stream(target, spec, &mut Stream::new(spec), warmup, timed, snap)
}

/// `measure`, continuing the access sequence where `stream` left it (and leaving
/// it where the threads stop). The warm-up is `spec.warm_accesses` accesses from
/// here (or `warmup`, whichever ends first); `Measured::warm_accesses` counts the
/// accesses of this warm-up only. A `timed` of zero makes it a warm-up alone.
pub fn measure_stream<T: Target>(
    target: &T,
    spec: &WorkSpec,
    stream: &mut Stream,
    warmup: Duration,
    timed: Duration,
    snap: &(dyn Fn() -> Snap + Sync),
) -> Result<Measured, String> {
    assert_eq!(
        stream.counts.len(),
        spec.threads as usize,
        "a stream of this spec"
    );
    let phase = AtomicU8::new(WARM);
    let start = stream.total();
    let counts: Vec<Padded> = stream
        .counts
        .iter()
        .map(|&c| Padded(AtomicU64::new(c)))
        .collect();
    let err = Mutex::new(None);
    let total = || {
        counts
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    // Sleeps `d` (or until `enough` accesses) unless stopped (error or Ctrl-C);
    // false if stopped.
    let nap = |d: Duration, enough: u64, stall: &mut Stall| {
        let end = Instant::now() + d;
        loop {
            let n = total();
            stall.check(n);
            if n >= enough {
                return true;
            }
            if phase.load(Ordering::Relaxed) == STOP {
                return false;
            }
            if interrupted() {
                phase.store(STOP, Ordering::Relaxed);
                return false;
            }
            let now = Instant::now();
            if now >= end {
                return true;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(5)));
        }
    };
    let mut m = Measured::default();
    let results: Vec<(LatHist, u64)> = std::thread::scope(|s| {
        let hs: Vec<_> = stream
            .rngs
            .iter_mut()
            .zip(stream.counts.iter_mut())
            .zip(&counts)
            .map(|((rng, n), count)| {
                let (phase, count, err) = (&phase, &count.0, &err);
                s.spawn(move || worker(target, spec, (rng, n), phase, count, err))
            })
            .collect();
        let mut stall = Stall::new("timed accesses");
        if nap(warmup, start.saturating_add(spec.warm_accesses), &mut stall) {
            let s0 = snap();
            let n0 = total();
            m.warm_accesses = n0 - start;
            m.stream_start = start;
            let t0 = Instant::now();
            phase.store(TIMED, Ordering::Relaxed);
            let ok = nap(timed, u64::MAX, &mut stall);
            let n1 = total();
            let s1 = snap();
            m.secs = t0.elapsed().as_secs_f64();
            phase.store(STOP, Ordering::Relaxed);
            if ok {
                m.accesses = n1 - n0;
                m.major_faults = s1.major_faults.saturating_sub(s0.major_faults);
                m.device_reads = s1.reads.saturating_sub(s0.reads);
                m.device_writes = s1.writes.saturating_sub(s0.writes);
                m.stall_some_us = s1.stall_some_us.saturating_sub(s0.stall_some_us);
                m.stall_full_us = s1.stall_full_us.saturating_sub(s0.stall_full_us);
            }
        }
        phase.store(STOP, Ordering::Relaxed);
        wait_all(&hs, "end of the timed phase", total);
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    for (h, s) in &results {
        m.hist.merge(h);
        m.sink ^= s;
    }
    if let Some(e) = err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    if interrupted() {
        return Err("interrupted".into());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `t` filled, then the first `n` accesses of `spec`'s thread-0 sequence
    /// applied (the writes among them, as the worker does); returns the generator
    /// where it stopped.
    fn replay_writes(t: &RawTarget, spec: &WorkSpec, n: u64) -> Rng {
        fill(t, spec).unwrap();
        let mut rng = thread_rng(spec.seed, 0);
        let sampler = Sampler::new(spec.pattern, spec.pages);
        for k in 0..n {
            let page = sampler.sample(&mut rng);
            let write = rng.unit() < spec.write_ratio;
            for _ in 0..spec.words {
                let off = page * PAGE_SIZE as u64 + rng.below(WORDS_PER_PAGE) * 8;
                if write {
                    t.write(off, off ^ k).unwrap();
                }
            }
        }
        rng
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = LatHist::default();
        for ns in 1..=10_000u64 {
            h.record(ns * 100);
        }
        let p50 = h.quantile_us(0.5);
        let p99 = h.quantile_us(0.99);
        assert!((p50 - 500.0).abs() / 500.0 < 0.07, "{p50}");
        assert!((p99 - 990.0).abs() / 990.0 < 0.07, "{p99}");
        let h2 = LatHist::from_buckets(&h.buckets());
        assert_eq!(h2.quantile_us(0.5), p50);
    }

    #[test]
    fn fill_and_sequence_are_deterministic() {
        // Plain memory twice with the same seed: identical contents afterwards.
        let spec = WorkSpec {
            pages: 64,
            pattern: Pattern::Zipf { theta: 0.99 },
            write_ratio: 0.5,
            threads: 1,
            words: 2,
            seed: 9,
            warm_accesses: 0,
            content: Content::Incompressible,
        };
        let run = || {
            let mut v = vec![0u64; 64 * 512];
            // SAFETY: `v` outlives the target and is not used otherwise meanwhile.
            let t = unsafe { RawTarget::new(v.as_mut_ptr().cast(), v.len() * 8) };
            replay_writes(&t, &spec, 10_000);
            v
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn compressible_content() {
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        Content::Incompressible.fill(3, 5, &mut a);
        fill_data(3, 5, &mut b);
        assert_eq!(a, b, "the default content is the old fill");
        Content::Compressible.fill(3, 5, &mut a);
        for (i, w) in a.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(w.try_into().unwrap());
            assert_eq!(v == 0, i % 4 != 0, "word {i}");
        }
        assert_eq!(Content::Compressible.write_off(4096 + 7 * 8), 4096 + 4 * 8);
        assert_eq!(
            Content::Incompressible.write_off(4096 + 7 * 8),
            4096 + 7 * 8
        );
        for c in [Content::Compressible, Content::Incompressible] {
            assert_eq!(Content::parse(c.name()), Ok(c));
        }
    }

    #[test]
    fn a_stream_continues_one_sequence() {
        // Two warm-ups on one stream leave memory exactly as one fresh sequence of
        // the same length does (the writes store their access number), and the
        // generator where that sequence leaves it.
        let spec = WorkSpec {
            pages: 64,
            pattern: Pattern::Zipf { theta: 0.99 },
            write_ratio: 0.5,
            threads: 1,
            words: 2,
            seed: 11,
            warm_accesses: 5000,
            content: Content::Incompressible,
        };
        let mut v = vec![0u64; 64 * 512];
        // SAFETY: `v` outlives the target and is not used otherwise meanwhile.
        let t = unsafe { RawTarget::new(v.as_mut_ptr().cast(), v.len() * 8) };
        fill(&t, &spec).unwrap();
        let mut st = Stream::new(&spec);
        let long = Duration::from_secs(60);
        let a = measure_stream(&t, &spec, &mut st, long, Duration::ZERO, &Snap::default).unwrap();
        let b = measure_stream(&t, &spec, &mut st, long, Duration::ZERO, &Snap::default).unwrap();
        let n = st.total();
        assert_eq!(a.stream_start, 0);
        assert!(b.stream_start >= a.warm_accesses && b.stream_start + b.warm_accesses <= n);
        assert!(n >= 10_000, "{n}");

        let mut model = vec![0u64; 64 * 512];
        // SAFETY: as above, for `model`.
        let mt = unsafe { RawTarget::new(model.as_mut_ptr().cast(), model.len() * 8) };
        let mut rng = replay_writes(&mt, &spec, n);
        assert!(
            v == model,
            "memory differs from one sequence of {n} accesses"
        );
        assert_eq!(st.rngs[0].next_u64(), rng.next_u64());
    }
}
