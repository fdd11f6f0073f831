//! What a model test needs to drive the engine's own code under the model checker
//! (only with `--cfg usermm_shuttle`; hidden from the documentation). The tests are
//! `tests/model_engine.rs`; `docs/design.md` ("Model checking") says what they
//! check.
//!
//! Under that cfg `Vm::new` starts no thread (its page-I/O threads, reclaimer,
//! discard and pressure threads would be OS threads using shuttle's primitives
//! outside a schedule). A model test runs, from shuttle threads of its own:
//! - the page-I/O loop ([`start_pageio`]: the engine's `PageIo::run` with its
//!   completion, `reclaim::complete_writeback`), so page-out, direct reclaim and
//!   `Vm::reclaim` work as in the library;
//! - the public API for the rest (`read`, `write`, `unmap`, `Vm::swapoff`,
//!   `Vm::reclaim`): the engine's own fault, unmap, swapoff and reclaim code, with
//!   every lock, atomic and wait of theirs a scheduling point (`sync`).
//!
//! After a schedule, [`check`] walks the engine's state and reports what does not
//! add up (entries outside any region, claims or locks left behind, frames leaked,
//! slot counts that differ from the references to them, references to a removed
//! device).
//!
//! Planted bugs: [`session`] plants one (see `sync::plant`) for the length of a
//! test, and serialises the model tests (the plant flag is process-wide).
//!
//! Owns no state of its own beyond the page-I/O thread handle; takes the locks the
//! engine's own paths take (a space's regions read lock, a device's slot map) and
//! only after the model's threads are joined.

use crate::addr::PAGE_SIZE;
use crate::engine::Engine;
use crate::frame::F_INUSE;
use crate::pte::{Pte, P_EXCL, P_LOCK, P_SHARED};
use crate::sync::{Arc, Ordering};
use crate::vm::{AddressSpace, Vm};
use std::collections::HashMap;
use std::ops::Range;

pub use crate::sync::{session, Plant, Session};

/// The Vm's page-I/O work running on a shuttle thread: see [`start_pageio`].
pub struct PageIoThread {
    eng: Arc<Engine>,
    handle: shuttle::thread::JoinHandle<()>,
}

impl std::fmt::Debug for PageIoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageIoThread").finish_non_exhaustive()
    }
}

/// Starts the engine's page-I/O loop (`PageIo::run` completing each request with
/// `reclaim::complete_writeback`, as a page-I/O thread of `Vm::new` does) on a
/// shuttle thread. Call inside a shuttle execution; stop it with
/// [`PageIoThread::stop`] before the execution ends.
pub fn start_pageio(vm: &Vm) -> PageIoThread {
    let eng = vm.engine().clone();
    let e = eng.clone();
    let handle = shuttle::thread::spawn(move || {
        e.io.run(&|req| crate::reclaim::complete_writeback(&e, req))
    });
    PageIoThread { eng, handle }
}

impl PageIoThread {
    /// Lets the loop drain its queue and exit (the Vm's page-out queue is shut for
    /// good: nothing can be paged out after this), and joins it.
    pub fn stop(self) {
        self.eng.io.shutdown();
        self.handle.join().expect("page-I/O model thread panicked");
    }
}

/// Checks the engine's bookkeeping once the model's threads are done: the entries
/// of `spaces` between the addresses `scan` (the model's regions), every frame, and
/// every slot of every swap device in service. The model uses anonymous memory and
/// swap devices only (no file mappings, transparent regions or compressed pool).
///
/// Errors: one line per broken invariant, each naming it:
/// - "page-outs still in flight";
/// - "entry outside any mapped region" (a fault installed into a region that was
///   gone), "entry left claimed" (`BUSY`), "entry left locked";
/// - "references removed swap device" (an entry or a resident page's swap copy);
/// - "frame leaked" (in use, mapped by no entry), "mapcount mismatch", "entry maps
///   a free frame";
/// - "slot count mismatch" (a slot's count differs from the entries, swap copies
///   and requests that hold it).
pub fn check(vm: &Vm, spaces: &[&AddressSpace], scan: Range<u64>) -> Result<(), String> {
    let eng = &**vm.engine();
    let mut errs: Vec<String> = Vec::new();
    if eng.io.inflight() != 0 {
        errs.push(format!("page-outs still in flight: {}", eng.io.inflight()));
    }
    let devs = eng.swap.all();
    let mut maps: HashMap<u32, u32> = HashMap::new();
    let mut refs: HashMap<(u8, u64), u64> = HashMap::new();
    let mut swap_ref = |what: String, v: u64, errs: &mut Vec<String>| {
        if let Pte::Swapped(e) = Pte::decode(v) {
            if !devs.iter().any(|d| d.id.0 == e.dev) {
                errs.push(format!(
                    "{what} references removed swap device {} (slot {})",
                    e.dev, e.slot
                ));
            }
            *refs.entry((e.dev, e.slot)).or_default() += 1;
        }
    };
    let ps = PAGE_SIZE as u64;
    // A leaf shared after a fork holds one entry for both spaces: count it once.
    let mut seen: std::collections::HashSet<usize> = std::collections::HashSet::new();
    for (k, mm) in spaces.iter().enumerate() {
        let sp = mm.space();
        let regions = sp.regions.read();
        sp.pt
            .for_each(scan.start / ps, scan.end.div_ceil(ps), |vpn, pte| {
                if !seen.insert(pte as *const _ as usize) {
                    return;
                }
                let v = pte.load(Ordering::SeqCst);
                let addr = vpn * ps;
                let p = Pte::decode(v);
                if p == Pte::Empty {
                    return;
                }
                if regions.find(addr).is_none() {
                    errs.push(format!(
                        "entry outside any mapped region: space {k}, {addr:#x} holds {p:?}"
                    ));
                }
                match p {
                    Pte::Busy => errs.push(format!("entry left claimed: space {k}, {addr:#x}")),
                    Pte::Present(pfn) => {
                        if v & (P_LOCK | P_EXCL | P_SHARED) != 0 {
                            errs.push(format!("entry left locked: space {k}, {addr:#x}: {v:#x}"));
                        }
                        *maps.entry(pfn.0).or_default() += 1;
                    }
                    Pte::Swapped(_) => swap_ref(format!("entry at {addr:#x}"), v, &mut errs),
                    Pte::Empty => {}
                }
            });
    }
    for i in 0..eng.frames.nframes() {
        let d = eng.frames.desc(crate::addr::Pfn(i as u32));
        let inuse = d.flags.load(Ordering::SeqCst) & F_INUSE != 0;
        let mapped = maps.get(&(i as u32)).copied().unwrap_or(0);
        if inuse {
            let mc = d.mapcount.load(Ordering::SeqCst);
            if mapped == 0 {
                errs.push(format!(
                    "frame leaked: frame {i} in use (mapcount {mc}) but mapped by no entry"
                ));
            } else if mc != mapped {
                errs.push(format!(
                    "mapcount mismatch: frame {i} has mapcount {mc}, {mapped} entries map it"
                ));
            }
            let sw = d.swap.load(Ordering::SeqCst);
            swap_ref(format!("swap copy of frame {i}"), sw, &mut errs);
        } else if mapped > 0 {
            errs.push(format!(
                "entry maps a free frame: frame {i}, {mapped} entries"
            ));
        }
    }
    for d in &devs {
        if d.pool.is_some() {
            continue;
        }
        for (slot, &c) in d.slot_counts().iter().enumerate() {
            let r = refs.get(&(d.id.0, slot as u64)).copied().unwrap_or(0);
            if u64::from(c) != r {
                errs.push(format!(
                    "slot count mismatch: device {} slot {slot} has count {c}, {r} references",
                    d.name()
                ));
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

/// Frames in use (the budget minus the free frames).
pub fn frames_in_use(vm: &Vm) -> usize {
    let f = &vm.engine().frames;
    f.nframes() - f.free_count()
}
