//! The mirror device, `mirror:(A,B)`: every page is written to both legs and
//! read from one that holds it; losing one leg costs the application nothing.
//!
//! Owns: per slot a state word (which legs hold the slot's current content, a
//! version, a resync bit) and the checksum of the content last written; per leg a
//! health state; and the resync thread (`usermm-mirror-resync`) with its one
//! preallocated page buffer. All of it is allocated in [`MirrorDevice::new`]
//! (4 + 4 bytes per slot), so the I/O path allocates nothing (docs/design.md
//! invariant 2), and the legs are used as they are (no merging either).
//!
//! ## When a slot counts as written
//! `write_page` returns `Ok` exactly when **at least one leg acknowledged the
//! write**. From then on the slot is readable from every leg that acknowledged it
//! (its bit in the slot's state word). Writes go to each leg in service, one after
//! the other. A leg that fails a write is marked *degraded* — unless that would
//! leave a slot on no leg in service: the other leg is degraded (this is the last
//! leg in service), or some slot is held by this leg alone (the other is syncing
//! and has not got it back yet, or missed a write while a degrade of it was
//! refused); then only that request fails (the engine keeps the page dirty and
//! retries) and the resync thread is asked to copy such slots over. Two legs
//! failing at once are decided one after the other (`Shared::degrading`), so one
//! stays. A write counts only the legs still in service that hold it when it ends. A degraded leg gets no writes and no reads; all its bits are
//! cleared at that moment (a server that comes back may have lost everything, like
//! an `nbdkit memory` restarted), so its content counts as stale.
//!
//! ## Resync
//! The resync thread probes a degraded leg with backoff (50 ms doubling to 1 s).
//! When the leg answers it becomes *syncing*: new writes go to it again, and the
//! thread copies every slot held by the other leg only, one at a time (setting
//! the slot's resync bit, so a concurrent write of that slot waits for the copy
//! instead of racing it). After a full pass that copied every such slot the leg
//! is *healthy*; a slot the other leg could not read keeps it syncing for another
//! pass, after a pause that doubles from 50 ms to 1 s while passes keep failing
//! (a slot whose bytes there fail the checksum is held by no leg any more).
//! A slot is redundant again once both bits are set.
//!
//! ## Reads
//! From a leg whose bit is set (alternating between the legs by slot when both
//! hold it), checked against the slot's checksum; on an error or a mismatch the
//! other leg is tried. A leg that cannot be reached (not connected, reset, timed
//! out) is marked degraded like one that failed a write; NBD legs opened from a
//! spec fail such reads at once instead of waiting for a reconnection. A mismatching leg loses its bit for that slot (the resync
//! repairs it). Only if no leg returns the content last written is the read an
//! error — never wrong data.
//!
//! ## Locking
//! `Shared::degrading` (a leaf, taken only when a leg fails); otherwise none: slot
//! state words and leg states are atomics. A write waits (polling) only
//! for the resync copy of the same slot, which is bounded by the legs' timeouts.

use super::BlockDevice;
use crate::device::AlignedPages;
use crate::error::{Error, Result};
use crate::sync::EngineSpawn;
use crate::sync::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const RESYNC: u32 = 1 << 2;
const VSHIFT: u32 = 3;

/// Whether an error means the leg cannot be reached (rather than refused one request).
fn unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOTCONN | libc::ECONNRESET | libc::ETIMEDOUT | libc::EPIPE | libc::ECONNREFUSED
        )
    )
}

fn bit(leg: usize) -> u32 {
    1 << leg
}

/// Health of one leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegState {
    /// In service and holding every slot the other leg holds (as far as known).
    Healthy,
    /// Failed a write: gets no I/O; probed by the resync thread.
    Degraded,
    /// Answering again: gets new writes while the resync copies old slots to it.
    Syncing,
}

const HEALTHY: u8 = 0;
const DEGRADED: u8 = 1;
const SYNCING: u8 = 2;

fn leg_state(v: u8) -> LegState {
    match v {
        HEALTHY => LegState::Healthy,
        DEGRADED => LegState::Degraded,
        _ => LegState::Syncing,
    }
}

/// Counters of a mirror.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorStats {
    /// Times a leg was marked degraded.
    pub degraded: u64,
    /// Slots copied by the resync.
    pub resynced_slots: u64,
    /// Reads served by the second leg tried after the first failed or mismatched.
    pub read_fallbacks: u64,
    /// Reads whose data did not match the slot's checksum.
    pub checksum_mismatches: u64,
    /// Writes acknowledged by only one leg.
    pub single_leg_writes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    degraded: AtomicU64,
    resynced_slots: AtomicU64,
    read_fallbacks: AtomicU64,
    checksum_mismatches: AtomicU64,
    single_leg_writes: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    name: String,
    legs: [Arc<dyn BlockDevice>; 2],
    pages: u64,
    state: Box<[AtomicU32]>,
    csum: Box<[AtomicU32]>,
    health: [AtomicU8; 2],
    shutdown: AtomicBool,
    /// A read found a healthy leg missing a slot: the resync thread should look.
    repair: AtomicBool,
    cnt: Counters,
    resync: crate::sync::Mutex<Option<std::thread::Thread>>,
    /// Held by `degrade` while it decides (a leaf, rarely taken: only when a leg
    /// fails).
    degrading: crate::sync::Mutex<()>,
}

/// Two devices holding the same pages.
#[derive(Debug)]
pub struct MirrorDevice {
    sh: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl MirrorDevice {
    /// Mirrors `a` and `b` (the size is the smaller of the two). Starts the resync
    /// thread and allocates the per-slot state.
    pub fn new(
        a: Arc<dyn BlockDevice>,
        b: Arc<dyn BlockDevice>,
        name: &str,
    ) -> Result<MirrorDevice> {
        let pages = a.pages().min(b.pages());
        if pages == 0 {
            return Err(Error::Config(format!("mirror {name}: a leg has no pages")));
        }
        let n = usize::try_from(pages)
            .map_err(|_| Error::Config(format!("mirror {name}: too many pages")))?;
        let sh = Arc::new(Shared {
            name: name.to_string(),
            legs: [a, b],
            pages,
            state: (0..n).map(|_| AtomicU32::new(0)).collect(),
            csum: (0..n).map(|_| AtomicU32::new(0)).collect(),
            health: [AtomicU8::new(HEALTHY), AtomicU8::new(HEALTHY)],
            shutdown: AtomicBool::new(false),
            repair: AtomicBool::new(false),
            cnt: Counters::default(),
            resync: crate::sync::Mutex::new(None),
            degrading: crate::sync::Mutex::new(()),
        });
        let buf = AlignedPages::new(1)?;
        let s2 = sh.clone();
        let t = std::thread::Builder::new()
            .name("usermm-mirror-resync".into())
            .spawn_engine(move || {
                crate::sync::mark_engine_thread();
                resync_thread(&s2, buf)
            })?;
        *sh.resync.lock() = Some(t.thread().clone());
        Ok(MirrorDevice {
            sh,
            thread: Some(t),
        })
    }

    /// Health of the two legs.
    pub fn leg_states(&self) -> [LegState; 2] {
        [0, 1].map(|i| leg_state(self.sh.health[i].load(Ordering::SeqCst)))
    }

    /// Counters.
    pub fn stats(&self) -> MirrorStats {
        let c = &self.sh.cnt;
        MirrorStats {
            degraded: c.degraded.load(Ordering::Relaxed),
            resynced_slots: c.resynced_slots.load(Ordering::Relaxed),
            read_fallbacks: c.read_fallbacks.load(Ordering::Relaxed),
            checksum_mismatches: c.checksum_mismatches.load(Ordering::Relaxed),
            single_leg_writes: c.single_leg_writes.load(Ordering::Relaxed),
        }
    }

    /// Slots held by leg `leg`, and slots held by both.
    pub fn held(&self, leg: usize) -> (u64, u64) {
        let mut one = 0;
        let mut both = 0;
        for w in self.sh.state.iter() {
            let w = w.load(Ordering::Relaxed);
            one += u64::from(w & bit(leg) != 0);
            both += u64::from(w & 3 == 3);
        }
        (one, both)
    }

    /// The legs.
    pub fn legs(&self) -> &[Arc<dyn BlockDevice>; 2] {
        &self.sh.legs
    }
}

impl Shared {
    /// Takes `leg` out of service, unless that would leave a slot on no leg in
    /// service: when the other leg is degraded (this is the last in service), or
    /// when some slot is held by this leg alone (the other leg is syncing and has
    /// not got it back yet, or missed a write this leg took while a degrade of it
    /// was refused) — clearing this leg's bits would lose those for good. Refused,
    /// only the failing request fails, and the resync thread is asked to copy the
    /// slots over (`repair`). Decided, and the bits cleared, under `degrading`, so
    /// that two legs failing at once cannot both go and a probe cannot put the leg
    /// back to syncing while its bits are being cleared. True if the leg is (now or
    /// already) degraded.
    fn degrade(&self, leg: usize) -> bool {
        let other = 1 - leg;
        let degraded = {
            let _one_at_a_time = self.degrading.lock();
            if self.health[leg].load(Ordering::SeqCst) == DEGRADED {
                return true;
            }
            let alone = |w: &AtomicU32| {
                let w = w.load(Ordering::SeqCst);
                w & bit(leg) != 0 && w & bit(other) == 0
            };
            if self.health[other].load(Ordering::SeqCst) == DEGRADED {
                false
            } else if self.state.iter().any(alone) {
                self.repair.store(true, Ordering::SeqCst);
                false
            } else {
                self.health[leg].store(DEGRADED, Ordering::SeqCst);
                for w in self.state.iter() {
                    w.fetch_and(!bit(leg), Ordering::SeqCst);
                }
                true
            }
        };
        if degraded {
            self.cnt.degraded.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(t) = self.resync.lock().as_ref() {
            t.unpark();
        }
        degraded
    }

    /// Sets `leg`'s bit on `slot` if its version is still `v`.
    fn mark(&self, slot: usize, v: u32, leg: usize) {
        let _ = self.state[slot].fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
            (w >> VSHIFT == v).then_some(w | bit(leg))
        });
    }
}

impl BlockDevice for MirrorDevice {
    fn name(&self) -> &str {
        &self.sh.name
    }

    fn pages(&self) -> u64 {
        self.sh.pages
    }

    fn read_page(&self, slot: u64, buf: &mut [u8]) -> io::Result<()> {
        let sh = &*self.sh;
        if slot >= sh.pages {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let s = slot as usize;
        let first = (slot & 1) as usize;
        let mut last_err = None;
        let mut tried = 0;
        for leg in [first, 1 - first] {
            let w = sh.state[s].load(Ordering::SeqCst);
            if w & bit(leg) == 0 || sh.health[leg].load(Ordering::SeqCst) == DEGRADED {
                continue;
            }
            tried += 1;
            match sh.legs[leg].read_page(slot, buf) {
                Ok(()) => {
                    if crc32c::crc32c(buf) == sh.csum[s].load(Ordering::SeqCst) {
                        if tried > 1 {
                            sh.cnt.read_fallbacks.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(());
                    }
                    sh.cnt.checksum_mismatches.fetch_add(1, Ordering::Relaxed);
                    // This leg lost the content: drop its bit (the resync repairs it).
                    let v = w >> VSHIFT;
                    let _ = sh.state[s].fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| {
                        (x >> VSHIFT == v).then_some(x & !bit(leg))
                    });
                    sh.repair.store(true, Ordering::SeqCst);
                    if let Some(t) = sh.resync.lock().as_ref() {
                        t.unpark();
                    }
                    last_err = Some(io::Error::from_raw_os_error(libc::EBADMSG));
                }
                Err(e) => {
                    // An unreachable leg is taken out of service like one that
                    // failed a write; an error reply (EIO) only fails this read.
                    if unreachable(&e) {
                        sh.degrade(leg);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENODATA)))
    }

    fn write_page(&self, slot: u64, buf: &[u8]) -> io::Result<()> {
        let sh = &*self.sh;
        if slot >= sh.pages {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let s = slot as usize;
        let sum = crc32c::crc32c(buf);
        // New version, no leg holds it yet; wait out a resync copy of this slot.
        let mut round = 0u32;
        let v = loop {
            let w = sh.state[s].load(Ordering::SeqCst);
            if w & RESYNC != 0 {
                round += 1;
                if round < 64 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(100));
                }
                continue;
            }
            let v = (w >> VSHIFT).wrapping_add(1) & (u32::MAX >> VSHIFT);
            if sh.state[s]
                .compare_exchange(w, v << VSHIFT, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                break v;
            }
        };
        sh.csum[s].store(sum, Ordering::SeqCst);
        let mut ok = 0;
        let mut last_err = None;
        for leg in 0..2 {
            if sh.health[leg].load(Ordering::SeqCst) == DEGRADED {
                continue;
            }
            match sh.legs[leg].write_page(slot, buf) {
                Ok(()) => {
                    sh.mark(s, v, leg);
                    ok += 1;
                }
                Err(e) => {
                    sh.degrade(leg);
                    last_err = Some(e);
                }
            }
        }
        // Counted again as it stands now: an acknowledgement from a leg degraded
        // meanwhile (its bit set after the degrade cleared them) holds nothing a
        // read would use.
        let w = sh.state[s].load(Ordering::SeqCst);
        let ok = (0..2)
            .filter(|&leg| {
                w >> VSHIFT == v
                    && w & bit(leg) != 0
                    && sh.health[leg].load(Ordering::SeqCst) != DEGRADED
            })
            .count()
            .min(ok);
        match ok {
            0 => Err(last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO))),
            1 => {
                sh.cnt.single_leg_writes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn flush(&self) -> io::Result<()> {
        let sh = &*self.sh;
        let mut ok = false;
        let mut last_err = None;
        for leg in 0..2 {
            if sh.health[leg].load(Ordering::SeqCst) == DEGRADED {
                continue;
            }
            match sh.legs[leg].flush() {
                Ok(()) => ok = true,
                Err(e) => {
                    sh.degrade(leg);
                    last_err = Some(e);
                }
            }
        }
        if ok {
            Ok(())
        } else {
            Err(last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOTCONN)))
        }
    }

    fn discard(&self, first: u64, count: u64) -> io::Result<()> {
        let sh = &*self.sh;
        let end = first.saturating_add(count).min(sh.pages);
        for s in first..end {
            sh.state[s as usize].fetch_and(!3, Ordering::SeqCst);
        }
        for leg in 0..2 {
            if sh.health[leg].load(Ordering::SeqCst) != DEGRADED {
                let _ = sh.legs[leg].discard(first, count);
            }
        }
        Ok(())
    }
}

impl Drop for MirrorDevice {
    fn drop(&mut self) {
        self.sh.shutdown.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// What `copy_slot` did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Copied {
    /// Copied: both legs hold the slot.
    Yes,
    /// Nothing to copy (not held by `src`, held by `dst` already, being written).
    No,
    /// The source could not be read now: the pass is not complete, and the
    /// destination does not count as healthy after it.
    SourceFailed,
}

/// Copies slot `s` from leg `src` to leg `dst` if `src` holds it and `dst` does
/// not. Err when the destination failed (the leg goes back to degraded). A source
/// whose bytes do not match the slot's checksum loses its bit for the slot (as a
/// read finds it): no leg holds the slot's content, and no pass can copy it.
fn copy_slot(
    sh: &Shared,
    s: usize,
    src: usize,
    dst: usize,
    buf: &mut [u8],
) -> std::result::Result<Copied, ()> {
    let w = sh.state[s].load(Ordering::SeqCst);
    if w & bit(src) == 0 || w & bit(dst) != 0 || w & RESYNC != 0 {
        return Ok(Copied::No);
    }
    if sh.state[s]
        .compare_exchange(w, w | RESYNC, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Ok(Copied::No); // written meanwhile: the writer takes care of both legs
    }
    let slot = s as u64;
    let res = match sh.legs[src].read_page(slot, buf) {
        Err(_) => Ok(Copied::SourceFailed),
        Ok(()) if crc32c::crc32c(buf) != sh.csum[s].load(Ordering::SeqCst) => {
            sh.cnt.checksum_mismatches.fetch_add(1, Ordering::Relaxed);
            sh.state[s].fetch_and(!bit(src), Ordering::SeqCst);
            Ok(Copied::No)
        }
        Ok(()) => match sh.legs[dst].write_page(slot, buf) {
            Ok(()) => {
                sh.state[s].fetch_or(bit(dst), Ordering::SeqCst);
                sh.cnt.resynced_slots.fetch_add(1, Ordering::Relaxed);
                Ok(Copied::Yes)
            }
            Err(_) => Err(()),
        },
    };
    sh.state[s].fetch_and(!RESYNC, Ordering::SeqCst);
    res
}

/// How a resync pass over a syncing leg ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    /// Every slot the other leg held was copied: the leg is healthy now.
    Done,
    /// A slot could not be read from the other leg: the leg stays syncing.
    Incomplete,
    /// A write to the leg failed: it is degraded again.
    DestinationFailed,
    /// Shutdown, or the leg stopped syncing meanwhile.
    Stopped,
}

/// One resync pass: copies to syncing leg `leg` every slot only the other leg
/// holds, then marks `leg` healthy if nothing was left behind.
fn sync_pass(sh: &Shared, leg: usize, buf: &mut [u8]) -> Pass {
    let src = 1 - leg;
    let mut incomplete = false;
    for s in 0..sh.state.len() {
        if sh.shutdown.load(Ordering::Relaxed) || sh.health[leg].load(Ordering::SeqCst) != SYNCING {
            return Pass::Stopped;
        }
        match copy_slot(sh, s, src, leg, buf) {
            Err(()) => {
                sh.degrade(leg);
                return Pass::DestinationFailed;
            }
            Ok(Copied::SourceFailed) => incomplete = true,
            Ok(_) => {}
        }
    }
    if incomplete {
        return Pass::Incomplete;
    }
    let _ = sh.health[leg].compare_exchange(SYNCING, HEALTHY, Ordering::SeqCst, Ordering::SeqCst);
    Pass::Done
}

/// The pause before the next attempt on a leg after a resync pass that ended
/// `pass`, the pause having been `cur`: a pass that could not finish (a slot the
/// complete leg cannot read, which may never become readable) waits twice as long
/// each time, up to 1 s, as a failed probe does, instead of reading every slot
/// again every 50 ms; a finished pass starts over from 50 ms.
fn next_backoff(pass: Pass, cur: Duration) -> Duration {
    match pass {
        Pass::Done => Duration::from_millis(50),
        Pass::Incomplete => (cur * 2).min(Duration::from_secs(1)),
        Pass::DestinationFailed | Pass::Stopped => cur,
    }
}

fn resync_thread(sh: &Shared, mut buf: AlignedPages) {
    let mut backoff = [Duration::from_millis(50); 2];
    let mut next_probe = [Instant::now(); 2];
    while !sh.shutdown.load(Ordering::SeqCst) {
        let mut wait = Duration::from_millis(500);
        for leg in 0..2 {
            let src = 1 - leg;
            match sh.health[leg].load(Ordering::SeqCst) {
                DEGRADED => {
                    let now = Instant::now();
                    if now < next_probe[leg] {
                        wait = wait.min(next_probe[leg] - now);
                        continue;
                    }
                    // Probe: a read of slot 0 (any answer but an error will do).
                    if sh.legs[leg].read_page(0, buf.page_mut(0)).is_ok() {
                        // Not while a degrade of it is clearing its bits.
                        let _g = sh.degrading.lock();
                        sh.health[leg].store(SYNCING, Ordering::SeqCst);
                        backoff[leg] = Duration::from_millis(50);
                        wait = Duration::ZERO;
                    } else {
                        backoff[leg] = (backoff[leg] * 2).min(Duration::from_secs(1));
                        next_probe[leg] = Instant::now() + backoff[leg];
                        wait = wait.min(backoff[leg]);
                    }
                }
                SYNCING => {
                    let pass = sync_pass(sh, leg, buf.page_mut(0));
                    backoff[leg] = next_backoff(pass, backoff[leg]);
                    match pass {
                        Pass::Done | Pass::Stopped => {}
                        Pass::DestinationFailed => {
                            next_probe[leg] = Instant::now() + backoff[leg];
                        }
                        // Another pass after a pause: the leg is not healthy while a
                        // slot held only by the other leg is not on it.
                        Pass::Incomplete => wait = wait.min(backoff[leg]),
                    }
                }
                _ if sh.repair.swap(false, Ordering::SeqCst) => {
                    // Healthy, but a read found a slot missing here.
                    sh.repair.store(leg == 0, Ordering::SeqCst); // leg 1 looks next
                    for s in 0..sh.state.len() {
                        let w = sh.state[s].load(Ordering::Relaxed);
                        if w & bit(src) != 0 && w & bit(leg) == 0 && w & RESYNC == 0 {
                            if sh.shutdown.load(Ordering::Relaxed) {
                                break;
                            }
                            if copy_slot(sh, s, src, leg, buf.page_mut(0)).is_err() {
                                sh.degrade(leg);
                                break;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if !wait.is_zero() {
            std::thread::park_timeout(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::faulty::FaultyDevice;
    use crate::device::file::FileDevice;

    fn page(v: u8) -> AlignedPages {
        let mut p = AlignedPages::new(1).unwrap();
        p.page_mut(0).fill(v);
        p
    }

    fn wait_healthy(m: &MirrorDevice) {
        let t0 = Instant::now();
        while m.leg_states() != [LegState::Healthy; 2] {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{:?}",
                m.leg_states()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn written_when_one_leg_acknowledges_then_resynced() {
        let d = tempfile::tempdir().unwrap();
        let a: Arc<dyn BlockDevice> =
            Arc::new(FileDevice::open(&d.path().join("a"), Some(64 * 4096), "a").unwrap());
        let fb = Arc::new(FaultyDevice::new(Arc::new(
            FileDevice::open(&d.path().join("b"), Some(64 * 4096), "b").unwrap(),
        )));
        let m = MirrorDevice::new(a, fb.clone(), "m").unwrap();
        let mut buf = page(0);
        for s in 0..16 {
            m.write_page(s, page(s as u8 + 1).page(0)).unwrap();
        }
        assert_eq!(m.held(1), (16, 16));
        // B fails a write: the write still counts (A acknowledged), B is degraded
        // and loses every slot.
        fb.set_fail_writes(true);
        m.write_page(3, page(99).page(0)).unwrap();
        // Degraded; the resync thread's probe (a read, which B still answers) may
        // already have moved it to syncing, whose copies fail while B's writes do.
        // Never healthy.
        assert_ne!(m.leg_states()[1], LegState::Healthy);
        assert_eq!(m.held(1).0, 0);
        assert_eq!(m.stats().single_leg_writes, 1);
        for s in 0..16 {
            m.read_page(s, buf.page_mut(0)).unwrap();
            let want = if s == 3 { 99 } else { s as u8 + 1 };
            assert!(buf.page(0).iter().all(|&b| b == want), "slot {s}");
        }
        // B answers again: the resync copies everything back.
        fb.set_fail_writes(false);
        wait_healthy(&m);
        assert_eq!(m.held(1), (16, 16));
        assert!(m.stats().resynced_slots >= 16);
        // A leg that returns wrong data is caught by the checksum; the other answers.
        fb.set_corrupt_reads(true);
        for s in 0..16 {
            m.read_page(s, buf.page_mut(0)).unwrap();
            let want = if s == 3 { 99 } else { s as u8 + 1 };
            assert!(buf.page(0).iter().all(|&b| b == want), "slot {s}");
        }
        assert!(m.stats().checksum_mismatches >= 8, "{:?}", m.stats());
        fb.set_corrupt_reads(false);
        // Never written: an error, not zeroes.
        assert!(m.read_page(40, buf.page_mut(0)).is_err());
    }

    #[test]
    fn last_leg_is_never_degraded() {
        let d = tempfile::tempdir().unwrap();
        let fa = Arc::new(FaultyDevice::new(Arc::new(
            FileDevice::open(&d.path().join("a"), Some(16 * 4096), "a").unwrap(),
        )));
        let fb = Arc::new(FaultyDevice::new(Arc::new(
            FileDevice::open(&d.path().join("b"), Some(16 * 4096), "b").unwrap(),
        )));
        let m = MirrorDevice::new(fa.clone(), fb.clone(), "m").unwrap();
        m.write_page(1, page(7).page(0)).unwrap();
        fb.set_fail_writes(true);
        fb.set_fail_reads(true); // the probe fails too: B stays degraded
        m.write_page(2, page(8).page(0)).unwrap();
        fa.set_fail_writes(true);
        assert!(m.write_page(1, page(9).page(0)).is_err(), "no leg took it");
        assert_eq!(m.leg_states(), [LegState::Healthy, LegState::Degraded]);
        fa.set_fail_writes(false);
        // Slot 1 was being rewritten when both failed: no leg holds any version.
        let mut buf = page(0);
        assert!(m.read_page(1, buf.page_mut(0)).is_err());
        m.read_page(2, buf.page_mut(0)).unwrap();
        assert!(buf.page(0).iter().all(|&b| b == 8));
    }

    /// A mirror over two faulty file devices whose resync thread is stopped, so
    /// the test moves the legs' states itself.
    fn still_mirror(d: &std::path::Path) -> (MirrorDevice, Arc<FaultyDevice>, Arc<FaultyDevice>) {
        let leg = |n: &str| {
            Arc::new(FaultyDevice::new(Arc::new(
                FileDevice::open(&d.join(n), Some(16 * 4096), n).unwrap(),
            )))
        };
        let (fa, fb) = (leg("a"), leg("b"));
        let mut m = MirrorDevice::new(fa.clone(), fb.clone(), "m").unwrap();
        m.sh.shutdown.store(true, Ordering::SeqCst);
        let t = m.thread.take().unwrap();
        t.thread().unpark();
        t.join().unwrap();
        // The thread is gone; passes run by the test must not see a shutdown.
        m.sh.shutdown.store(false, Ordering::SeqCst);
        (m, fa, fb)
    }

    /// While B syncs back (holding only what was written since it returned), A is
    /// the only holder of the rest: a failure of A then fails only its own request
    /// and A stays in service with its slots. (Taking A out cleared its bits and
    /// left those slots readable from no leg, for good.)
    #[test]
    fn a_complete_leg_stays_in_service_while_the_other_syncs() {
        let d = tempfile::tempdir().unwrap();
        let (m, fa, fb) = still_mirror(d.path());
        for s in 0..8 {
            m.write_page(s, page(s as u8 + 1).page(0)).unwrap();
        }
        fb.set_fail_writes(true);
        m.write_page(3, page(33).page(0)).unwrap();
        assert_eq!(m.leg_states(), [LegState::Healthy, LegState::Degraded]);
        fb.set_fail_writes(false);
        // B answers again: syncing, holding nothing yet (the resync thread is off).
        m.sh.health[1].store(SYNCING, Ordering::SeqCst);
        fa.set_fail_writes(true);
        m.write_page(5, page(55).page(0)).unwrap();
        fa.set_fail_writes(false);
        assert_eq!(
            m.leg_states(),
            [LegState::Healthy, LegState::Syncing],
            "the only leg holding most slots was taken out of service"
        );
        let mut buf = page(0);
        let check = |buf: &mut AlignedPages| {
            for s in 0..8 {
                m.read_page(s, buf.page_mut(0)).unwrap();
                let want = match s {
                    3 => 33,
                    5 => 55,
                    _ => s as u8 + 1,
                };
                assert!(buf.page(0).iter().all(|&b| b == want), "slot {s}");
            }
        };
        check(&mut buf);
        // Slot 5 is on B alone now (A refused it): B failing must not take B out
        // either, though A is healthy.
        fb.set_fail_writes(true);
        m.write_page(6, page(7).page(0)).unwrap();
        fb.set_fail_writes(false);
        assert_eq!(
            m.leg_states(),
            [LegState::Healthy, LegState::Syncing],
            "the only leg holding slot 5 was taken out of service"
        );
        check(&mut buf);
    }

    /// A resync pass that cannot read a slot from the complete leg leaves the
    /// syncing leg syncing (it does not hold that slot); the next pass finishes.
    #[test]
    fn a_pass_that_could_not_read_a_slot_does_not_make_the_leg_healthy() {
        let d = tempfile::tempdir().unwrap();
        let (m, fa, fb) = still_mirror(d.path());
        fb.set_fail_writes(true);
        for s in 0..4 {
            m.write_page(s, page(s as u8 + 1).page(0)).unwrap();
        }
        fb.set_fail_writes(false);
        m.sh.health[1].store(SYNCING, Ordering::SeqCst);
        let mut buf = page(0);
        fa.fail_next_reads(1);
        assert_eq!(sync_pass(&m.sh, 1, buf.page_mut(0)), Pass::Incomplete);
        assert_eq!(m.leg_states()[1], LegState::Syncing);
        assert_eq!(sync_pass(&m.sh, 1, buf.page_mut(0)), Pass::Done);
        assert_eq!(m.leg_states(), [LegState::Healthy; 2]);
        assert_eq!(m.held(1), (4, 4));
    }

    /// Passes that cannot finish are retried less and less often (up to once a
    /// second), and a finished pass starts the pause over.
    #[test]
    fn an_unfinished_pass_backs_off() {
        let ms = Duration::from_millis;
        let mut b = ms(50);
        let mut seen = Vec::new();
        for _ in 0..7 {
            b = next_backoff(Pass::Incomplete, b);
            seen.push(b.as_millis());
        }
        assert_eq!(seen, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(next_backoff(Pass::Done, b), ms(50));
        assert_eq!(next_backoff(Pass::Stopped, ms(400)), ms(400));
    }
}
