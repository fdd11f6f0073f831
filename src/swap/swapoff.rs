//! swapoff: taking a swap device out of service without losing a page (docs/design.md
//! invariant 3; seed 002).
//!
//! 1. The device stops handing out slots (`begin_drain`); faults may still read it.
//! 2. Passes repeat until no slot on it is referenced:
//!    - resident pages whose swap copy is on the device forget it (they become dirty,
//!      to be written elsewhere when reclaimed); page-outs in flight to the device
//!      finish first (waited for at most 30 s: a device that never completes a write
//!      fails the swapoff, and stays in service);
//!    - every live space (the Vm's list, each held by an `Arc` while it is walked)
//!      is scanned once for entries on the device, through `SpaceWalk`, under its
//!      regions read lock for the scan only; the entries are sorted by slot and read
//!      in large sequential requests, verified against their checksums, and each is
//!      claimed by value (`Swapped(dev, slot)` → `BUSY`; one that changed meanwhile
//!      is left to the next pass) and put in a frame (direct reclaim may push other
//!      pages to other devices), or, when no frame can be had, copied to another
//!      device.
//!    - the pages of the Vm's transparent regions on the device (not in any space:
//!      their entries are the regions') are brought back into their mappings one by
//!      one, each as a missing-page fault would (`Host::drain_device`), their copies
//!      not kept; reclaim writes others to the remaining devices meanwhile;
//!    - a fault that reads a page from the device meanwhile drops its slot there
//!      (`fault_swapin`), so reclaim cannot put the page back on it.
//!
//!    Repeating catches what a pass cannot see: a child forked after its parent was
//!    scanned (fork registers the child before copying), a page-out that completed
//!    with a slot on the device, a space that was dropping while we walked.
//! 3. If a page can go neither to memory nor to another device, swapoff stops with
//!    `OutOfMemory` and the device returns to service with every page intact.
//!
//! A zpool (`swap::zpool`) is removed differently: it holds no slots of its own,
//! only the bytes of slots of the devices below it, so it writes every page back to
//! its slot (`Zpool::write_back_all`) and leaves the table; no entry changes. If a
//! device below fails those writes, the pool stays in service with what it holds.
//!
//! Locking: a space's regions read lock only while `SpaceWalk::swapped_on` scans it;
//! then the claimed (`BUSY`) entry, then frame locks, as on the fault path. No lock is
//! held across a device read or write.

use crate::addr::{Pfn, SwapEntry, SwapId, PAGE_SIZE};
use crate::device::AlignedPages;
use crate::engine::Engine;
use crate::engine::SpaceWalk;
use crate::error::{Error, Result};
use crate::frame::{copy_in, F_INUSE};
use crate::pte::{Pte, BUSY, P_DIRTY};
use crate::swap::SwapDevice;
use crate::sync::{wait_until_for, Ordering};
use std::time::{Duration, Instant};

/// Slots read per request while draining (1 MiB).
const SPAN: usize = 256;

/// Removes swap device `id`; see the module header. `transparent` brings back the
/// pages of the Vm's transparent regions that are on a device (by its number):
/// their entries are not in a space, and their pages go into the program's
/// mapping, not only into a frame (`mm::transparent::Host::drain_device`).
pub(crate) fn swapoff(
    eng: &Engine,
    id: SwapId,
    transparent: &dyn Fn(u8) -> Result<()>,
) -> Result<()> {
    let dev = eng
        .swap
        .get(id.0)
        .ok_or_else(|| Error::InvalidArgument(format!("no swap device {}", id.0)))?;
    if !dev.begin_drain() {
        return Err(Error::InvalidArgument(format!(
            "swap device {} is already being removed",
            dev.name()
        )));
    }
    if let Some(pool) = dev.pool.clone() {
        // A pool holds no slots: its pages belong to the devices' slots below it.
        // Write them all there; no page-table entry changes.
        pool.set_draining(true);
        return match pool.write_back_all() {
            Ok(()) => {
                eng.swap.remove(id);
                Ok(())
            }
            Err(source) => {
                pool.set_draining(false);
                dev.end_drain();
                Err(Error::Device {
                    dev: dev.name().to_string(),
                    source,
                })
            }
        };
    }
    match drain(eng, &dev, transparent) {
        Ok(()) => {
            // The drain freed every slot, and their discards may be under way on the
            // maintenance thread: they end before the device goes (a file swapped on
            // again at once must not get holes punched into its new pages).
            dev.stop_discards();
            eng.swap.remove(id);
            Ok(())
        }
        Err(e) => {
            dev.end_drain();
            Err(e)
        }
    }
}

fn drain(eng: &Engine, dev: &SwapDevice, transparent: &dyn Fn(u8) -> Result<()>) -> Result<()> {
    let mut bounce = AlignedPages::new(SPAN)?;
    let mut last_progress = Instant::now();
    let mut last_used = u64::MAX;
    loop {
        forget_copies_on(eng, dev)?;
        if dev.used() == 0 {
            return Ok(());
        }
        let spaces = eng.live_spaces();
        for sp in &spaces {
            drain_space(eng, &**sp, dev, &mut bounce)?;
        }
        drop(spaces);
        transparent(dev.id.0)?;
        forget_copies_on(eng, dev)?;
        let used = dev.used();
        if used == 0 {
            return Ok(());
        }
        if used < last_used {
            last_used = used;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(30) {
            return Err(Error::Device {
                dev: dev.name().to_string(),
                source: std::io::Error::other(format!(
                    "swapoff made no progress for 30 s: {used} slots still referenced"
                )),
            });
        } else {
            // Something is on its way out (a space being dropped, a page-out
            // completing); give it a moment.
            crate::sync::sleep(Duration::from_millis(1));
        }
    }
}

/// How long swapoff waits for page-outs in flight to the device it drains.
const INFLIGHT_LIMIT: Duration = Duration::from_secs(30);

/// Resident pages whose swap copy is on `dev` forget it; waits for page-outs in
/// flight to `dev` first, since their completion may attach a slot on it. The wait
/// is bounded: a device that never completes a write fails the swapoff (the device
/// stays in service). Page-outs to other devices are not waited for.
fn forget_copies_on(eng: &Engine, dev: &SwapDevice) -> Result<()> {
    if !wait_until_for(INFLIGHT_LIMIT, || dev.inflight.load(Ordering::Relaxed) == 0) {
        return Err(Error::Device {
            dev: dev.name().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "swapoff: page-outs to this device did not complete within 30 s",
            ),
        });
    }
    for i in 0..eng.frames.nframes() {
        let pfn = Pfn(i as u32);
        let d = eng.frames.desc(pfn);
        if d.flags.load(Ordering::Relaxed) & F_INUSE == 0 {
            continue;
        }
        let on_dev = |v: u64| matches!(Pte::decode(v), Pte::Swapped(e) if e.dev == dev.id.0);
        if !on_dev(d.swap.load(Ordering::Relaxed)) {
            continue;
        }
        d.lock();
        let sw = d.swap.load(Ordering::Relaxed);
        if on_dev(sw) && d.mapcount.load(Ordering::Relaxed) > 0 {
            // The copy goes: mark every mapping dirty so the page is written
            // elsewhere before it can be dropped.
            eng.rmap.for_each(d, pfn, |pte| {
                // Under the frame lock every mapping maps `pfn`, so this locks; an
                // entry that did not would be left alone, not unlocked by us.
                match crate::pte::lock_present(pte, pfn) {
                    Some(_) => crate::pte::unlock_entry(pte, 0, P_DIRTY),
                    None => debug_assert!(false, "a mapping of a locked frame moved"),
                }
                true
            });
            d.swap.store(0, Ordering::Relaxed);
            eng.swap.put_encoded(sw);
        }
        d.unlock();
    }
    Ok(())
}

fn drain_space(
    eng: &Engine,
    sp: &dyn SpaceWalk,
    dev: &SwapDevice,
    bounce: &mut AlignedPages,
) -> Result<()> {
    // The walk takes the space's regions read lock and drops it: no lock is held
    // across the reads below. An entry found here is claimed by value later
    // (`Swapped(dev, slot)` → `BUSY`), so one that changed meanwhile is skipped and
    // the next pass sees what it became.
    let mut todo: Vec<(u64, u64)> = Vec::new();
    sp.swapped_on(dev.id.0, &mut todo);
    todo.sort_unstable();
    let mut i = 0;
    while i < todo.len() {
        let first = todo[i].0;
        let mut j = i + 1;
        while j < todo.len() && todo[j].0 - first < SPAN as u64 {
            j += 1;
        }
        let span = (todo[j - 1].0 - first + 1) as usize;
        // One sequential read for the run, unless it is mostly holes, or the span
        // cannot be read whole: a device that reads page by page may refuse a hole
        // (a mirror's never-written or discarded slot, ENODATA); then each page is
        // read alone, and only a page still in its slot counts as an error.
        let dense = span <= 4 * (j - i) && {
            // SAFETY: the bounce buffer is ours for the whole swapoff.
            let buf = unsafe { std::slice::from_raw_parts_mut(bounce.ptr(0), span * PAGE_SIZE) };
            dev.read_span(first, buf).is_ok()
        };
        for &(slot, vpn) in &todo[i..j] {
            let k = if dense { (slot - first) as usize } else { 0 };
            let checked = if !dense {
                dev.read(slot, bounce.page_mut(0))
            } else {
                dev.verify(slot, bounce.page(k))
            };
            if let Err(e) = checked {
                // Only an error if the page is still in that slot. Since the walk, a
                // fault may have read it and freed the slot (a draining device's
                // slots are never handed out again), and its discard may have
                // punched it: then the page is elsewhere and the bytes are not ours.
                let v = Pte::swapped(SwapEntry {
                    dev: dev.id.0,
                    slot,
                });
                if sp
                    .entry(vpn)
                    .is_some_and(|p| p.load(Ordering::Acquire) == v)
                {
                    crate::stats::Counters::inc(&eng.cnt.read_errors);
                    return Err(e);
                }
                continue;
            }
            bring_back(eng, sp, vpn, dev, slot, bounce.page(k))?;
        }
        i = j;
    }
    Ok(())
}

/// Moves one swapped page (its verified bytes in `data`) off `dev`: into a frame,
/// or to another device when memory cannot take it.
fn bring_back(
    eng: &Engine,
    sp: &dyn SpaceWalk,
    vpn: u64,
    dev: &SwapDevice,
    slot: u64,
    data: &[u8],
) -> Result<()> {
    let Some(pte) = sp.entry(vpn) else {
        return Ok(());
    };
    let v = Pte::swapped(SwapEntry {
        dev: dev.id.0,
        slot,
    });
    if planted!(SwapoffClaimsByStore) {
        pte.store(BUSY, Ordering::Release);
    } else if pte
        .compare_exchange(v, BUSY, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return Ok(()); // faulted in or changed meanwhile
    }
    match crate::reclaim::alloc_frame(eng, crate::frame::AllocCtx::Normal) {
        Ok(pfn) => {
            // SAFETY: the frame is ours and not yet visible.
            unsafe { copy_in(eng.frames.frame_ptr(pfn), data) };
            let uses = eng.freq_count(dev.slot_freq(slot));
            eng.install(pte, pfn, 0, true, false, uses);
            crate::stats::Counters::inc(&eng.cnt.pswpin);
        }
        Err(_) => {
            // Memory is short: move the page to another device instead.
            let moved = eng.swap.alloc().ok().and_then(|e2| {
                let d2 = eng.swap.get(e2.dev)?;
                match d2.write(e2.slot, data) {
                    Ok(()) => {
                        // The page's use count moves with it.
                        d2.set_slot_freq(e2.slot, dev.slot_freq(slot));
                        Some(e2)
                    }
                    Err(_) => {
                        eng.swap.put(e2);
                        None
                    }
                }
            });
            match moved {
                Some(e2) => pte.store(Pte::swapped(e2), Ordering::Release),
                None => {
                    pte.store(v, Ordering::Release);
                    return Err(Error::OutOfMemory);
                }
            }
        }
    }
    dev.put_slot(slot);
    Ok(())
}
