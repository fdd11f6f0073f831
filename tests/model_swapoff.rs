//! A shuttle model of the protocol between a fault, a fork, an exit and swapoff, on
//! a miniature: one parent space of three pages, two devices of four slots, a few
//! frames. It follows the engine's steps (see src/swapoff.rs, src/space.rs,
//! src/fault.rs) with the same ordering decisions:
//! - fork registers the child in the space list *before* copying entries, under the
//!   parent's regions write lock; swapped entries share their slot (count + 1);
//! - a fault claims a swapped entry (`Swapped` → `BUSY` by CAS) and keeps the slot
//!   as the resident page's swap copy;
//! - exit releases the child's entries (slot references, frame mappings);
//! - swapoff stops allocation on the device, then repeats passes (forget swap copies
//!   of resident pages; walk every live space held by an `Arc`, under its regions
//!   read lock, pulling entries on the device into frames or onto the other device)
//!   until no slot on the device is referenced.
//!
//! After every schedule: no slot of the removed device is referenced, every page of
//! every live space reads its value, and the reference counts add up.
//!
//! `planted_bug_is_found` plants one bug — exactly one line, switched by
//! [`Model::PlantedBug`] in `swapoff`: swapoff trusts a single walk over the spaces
//! instead of re-checking the slot counts (the race of seed 002, where a fork copies
//! a swap entry into a child that the walk has already passed) — and checks that the
//! model catches it with the invariant that bug breaks, so the model is known to
//! have teeth.

use shuttle::sync::{Mutex, RwLock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

const PAGES: usize = 3;
const SLOTS: usize = 4;
const FRAMES: usize = 4;
const EMPTY: u64 = 0;
const BUSY: u64 = 3;

fn swapped(dev: u64, slot: u64) -> u64 {
    2 | dev << 2 | slot << 8
}
fn present(frame: u64) -> u64 {
    1 | frame << 2
}
enum E {
    Empty,
    Busy,
    Swapped(usize, usize),
    Present(usize),
}
fn decode(v: u64) -> E {
    match v & 3 {
        0 => E::Empty,
        1 => E::Present((v >> 2) as usize),
        2 => E::Swapped(((v >> 2) & 0x3f) as usize, (v >> 8) as usize),
        _ => E::Busy,
    }
}

struct Dev {
    draining: AtomicBool,
    count: Mutex<[u16; SLOTS]>,
    data: Mutex<[u64; SLOTS]>,
}

#[derive(Clone, Copy, Default)]
struct Frame {
    used: bool,
    data: u64,
    mapcount: u32,
    swap: Option<(usize, usize)>,
}

struct World {
    devs: [Dev; 2],
    frames: Mutex<[Frame; FRAMES]>,
    spaces: Mutex<Vec<Weak<Space>>>,
}

struct Space {
    regions: RwLock<()>,
    pte: [AtomicU64; PAGES],
    world: Arc<World>,
}

impl World {
    fn alloc_slot(&self) -> Option<(usize, usize)> {
        for (d, dev) in self.devs.iter().enumerate() {
            if dev.draining.load(Ordering::SeqCst) {
                continue;
            }
            let mut c = dev.count.lock().unwrap();
            if let Some(s) = c.iter().position(|&x| x == 0) {
                c[s] = 1;
                return Some((d, s));
            }
        }
        None
    }
    fn put(&self, d: usize, s: usize) {
        let mut c = self.devs[d].count.lock().unwrap();
        assert!(c[s] > 0, "put of a free slot {d}:{s}");
        c[s] -= 1;
    }
    fn dup(&self, d: usize, s: usize) {
        let mut c = self.devs[d].count.lock().unwrap();
        assert!(c[s] > 0, "dup of a free slot {d}:{s}");
        c[s] += 1;
    }
    fn alloc_frame(&self, data: u64, swap: Option<(usize, usize)>) -> Option<usize> {
        let mut f = self.frames.lock().unwrap();
        let i = f.iter().position(|x| !x.used)?;
        f[i] = Frame {
            used: true,
            data,
            mapcount: 1,
            swap,
        };
        Some(i)
    }
    fn register(&self, sp: &Arc<Space>) {
        self.spaces.lock().unwrap().push(Arc::downgrade(sp));
    }
}

impl Space {
    fn new(world: &Arc<World>) -> Space {
        Space {
            regions: RwLock::new(()),
            pte: Default::default(),
            world: world.clone(),
        }
    }

    /// A read fault: swap-in in the faulting thread, keeping the slot as swap copy.
    fn fault(&self, i: usize) -> Option<u64> {
        let _r = self.regions.read().unwrap();
        loop {
            let v = self.pte[i].load(Ordering::SeqCst);
            match decode(v) {
                E::Empty => return Some(0),
                E::Present(f) => return Some(self.world.frames.lock().unwrap()[f].data),
                E::Busy => shuttle::thread::yield_now(),
                E::Swapped(d, s) => {
                    if self.pte[i]
                        .compare_exchange(v, BUSY, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                    {
                        continue;
                    }
                    let data = self.world.devs[d].data.lock().unwrap()[s];
                    match self.world.alloc_frame(data, Some((d, s))) {
                        Some(f) => self.pte[i].store(present(f as u64), Ordering::SeqCst),
                        None => {
                            self.pte[i].store(v, Ordering::SeqCst);
                            return None; // out of memory: the page stays on swap
                        }
                    }
                }
            }
        }
    }

    /// fork: the child is registered before anything is copied into it.
    fn fork(self: &Arc<Self>) -> Arc<Space> {
        let child = Arc::new(Space::new(&self.world));
        self.world.register(&child);
        {
            let _w = self.regions.write().unwrap();
            for i in 0..PAGES {
                let v = self.pte[i].load(Ordering::SeqCst);
                match decode(v) {
                    E::Empty => {}
                    E::Busy => unreachable!("faults hold the regions read lock"),
                    E::Swapped(d, s) => {
                        self.world.dup(d, s);
                        child.pte[i].store(v, Ordering::SeqCst);
                    }
                    E::Present(f) => {
                        self.world.frames.lock().unwrap()[f].mapcount += 1;
                        child.pte[i].store(v, Ordering::SeqCst);
                    }
                }
                shuttle::thread::yield_now();
            }
        }
        child
    }
}

impl Drop for Space {
    /// exit: release every entry.
    fn drop(&mut self) {
        for i in 0..PAGES {
            let v = self.pte[i].swap(EMPTY, Ordering::SeqCst);
            match decode(v) {
                E::Empty => {}
                E::Busy => unreachable!("no fault can run in a space being dropped"),
                E::Swapped(d, s) => self.world.put(d, s),
                E::Present(f) => {
                    let mut fr = self.world.frames.lock().unwrap();
                    fr[f].mapcount -= 1;
                    if fr[f].mapcount == 0 {
                        if let Some((d, s)) = fr[f].swap.take() {
                            drop(fr);
                            self.world.put(d, s);
                            fr = self.world.frames.lock().unwrap();
                        }
                        fr[f].used = false;
                    }
                }
            }
        }
    }
}

/// The engine's protocol, or the protocol with the planted bug.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Model {
    Correct,
    /// swapoff trusts a single walk over the spaces (the one line that reads this).
    PlantedBug,
}

/// The assertion the planted bug breaks (checked after every schedule).
const LEAK_AFTER_SWAPOFF: &str = "swapoff finished with slots of the device still referenced";

/// swapoff of device `dev`; false if it had to give up (the device stays).
fn swapoff(world: &Arc<World>, dev: usize, model: Model) -> bool {
    world.devs[dev].draining.store(true, Ordering::SeqCst);
    for pass in 0..20 {
        if model == Model::PlantedBug && pass == 1 {
            return true; // THE PLANTED BUG: trust a single walk
        }
        // Resident pages forget their swap copy on the device.
        {
            let mut fr = world.frames.lock().unwrap();
            for f in fr.iter_mut() {
                if f.used && matches!(f.swap, Some((d, _)) if d == dev) {
                    let (d, s) = f.swap.take().unwrap();
                    world.devs[d].count.lock().unwrap()[s] -= 1;
                }
            }
        }
        if world.devs[dev]
            .count
            .lock()
            .unwrap()
            .iter()
            .all(|&c| c == 0)
        {
            return true;
        }
        let spaces: Vec<Arc<Space>> = world
            .spaces
            .lock()
            .unwrap()
            .iter()
            .filter_map(|w| w.upgrade())
            .collect();
        for sp in &spaces {
            let _r = sp.regions.read().unwrap();
            for i in 0..PAGES {
                let v = sp.pte[i].load(Ordering::SeqCst);
                let E::Swapped(d, s) = decode(v) else {
                    continue;
                };
                if d != dev
                    || sp.pte[i]
                        .compare_exchange(v, BUSY, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                {
                    continue;
                }
                let data = world.devs[d].data.lock().unwrap()[s];
                if let Some(f) = world.alloc_frame(data, None) {
                    sp.pte[i].store(present(f as u64), Ordering::SeqCst);
                } else if let Some((d2, s2)) = world.alloc_slot() {
                    world.devs[d2].data.lock().unwrap()[s2] = data;
                    sp.pte[i].store(swapped(d2 as u64, s2 as u64), Ordering::SeqCst);
                } else {
                    sp.pte[i].store(v, Ordering::SeqCst);
                    world.devs[dev].draining.store(false, Ordering::SeqCst);
                    return false;
                }
                world.put(d, s);
                shuttle::thread::yield_now();
            }
        }
        drop(spaces);
        shuttle::thread::yield_now();
    }
    world.devs[dev].draining.store(false, Ordering::SeqCst);
    false
}

fn value(sp: &Space, i: usize) -> u64 {
    let w = &sp.world;
    match decode(sp.pte[i].load(Ordering::SeqCst)) {
        E::Empty => 0,
        E::Busy => panic!("entry left busy"),
        E::Present(f) => {
            let fr = w.frames.lock().unwrap();
            assert!(fr[f].used, "page {i} maps a free frame");
            fr[f].data
        }
        E::Swapped(d, s) => {
            assert!(
                w.devs[d].count.lock().unwrap()[s] > 0,
                "page {i} on a free slot"
            );
            w.devs[d].data.lock().unwrap()[s]
        }
    }
}

fn scenario(model: Model) {
    let world = Arc::new(World {
        devs: [0, 1].map(|_| Dev {
            draining: AtomicBool::new(false),
            count: Mutex::new([0; SLOTS]),
            data: Mutex::new([0; SLOTS]),
        }),
        frames: Mutex::new([Frame::default(); FRAMES]),
        spaces: Mutex::new(Vec::new()),
    });
    // The parent: page i holds 100 + i, swapped on device i % 2.
    let parent = Arc::new(Space::new(&world));
    world.register(&parent);
    for i in 0..PAGES {
        let (d, s) = (i % 2, i);
        world.devs[d].count.lock().unwrap()[s] = 1;
        world.devs[d].data.lock().unwrap()[s] = 100 + i as u64;
        parent.pte[i].store(swapped(d as u64, s as u64), Ordering::SeqCst);
    }
    let survivor = Arc::new(std::sync::Mutex::new(None::<Arc<Space>>));
    let t_fault = {
        let p = parent.clone();
        shuttle::thread::spawn(move || {
            for i in 0..PAGES {
                if let Some(v) = p.fault(i) {
                    assert_eq!(v, 100 + i as u64, "fault read a wrong value");
                }
            }
        })
    };
    let t_fork = {
        let p = parent.clone();
        let survivor = survivor.clone();
        shuttle::thread::spawn(move || {
            let a = p.fork();
            let b = p.fork();
            drop(a); // exit of one child
            *survivor.lock().unwrap() = Some(b);
        })
    };
    let t_off = {
        let w = world.clone();
        shuttle::thread::spawn(move || swapoff(&w, 0, model))
    };
    t_fault.join().unwrap();
    t_fork.join().unwrap();
    let removed = t_off.join().unwrap();
    let child = survivor.lock().unwrap().take().unwrap();
    for sp in [&parent, &child] {
        for i in 0..PAGES {
            assert_eq!(value(sp, i), 100 + i as u64, "page {i} lost");
        }
    }
    if removed {
        assert!(
            world.devs[0].count.lock().unwrap().iter().all(|&c| c == 0),
            "{LEAK_AFTER_SWAPOFF}"
        );
        for sp in [&parent, &child] {
            for i in 0..PAGES {
                assert!(
                    !matches!(decode(sp.pte[i].load(Ordering::SeqCst)), E::Swapped(0, _)),
                    "page {i} still on the removed device"
                );
            }
        }
    }
    drop(child);
    drop(parent);
    // Every reference is gone with the spaces: counts and frames add up.
    for d in &world.devs {
        assert!(
            d.count.lock().unwrap().iter().all(|&c| c == 0),
            "slot leaked"
        );
    }
    assert!(
        world.frames.lock().unwrap().iter().all(|f| !f.used),
        "frame leaked"
    );
}

#[test]
fn fault_fork_exit_swapoff() {
    shuttle::check_random(|| scenario(Model::Correct), 3000);
    shuttle::check_pct(|| scenario(Model::Correct), 3000, 3);
}

#[test]
fn planted_bug_is_found() {
    let r = std::panic::catch_unwind(|| {
        shuttle::check_random(|| scenario(Model::PlantedBug), 3000);
    });
    let payload = r.expect_err("the model must catch the planted bug");
    let msg = usermm_testkit::watchdog::panic_message(&*payload);
    assert!(
        msg.contains(LEAK_AFTER_SWAPOFF),
        "the model failed, but not with the planted bug's invariant: {msg:?}"
    );
}
