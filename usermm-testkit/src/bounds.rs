//! What the bench's access traces allow: miss ratios computed offline on the very
//! access sequence the systems run (same seed, same generator calls), for a cache of
//! the budget's size.
//!
//! - **MIN** (Belady): evict the page whose next use is furthest away. The optimum
//!   for any policy that knows the future; nobody reaches it online.
//! - **A0**: keep the pages with the highest access probability, a fixed set. On
//!   the bench's independent-reference traces, the best any online policy can do in
//!   the long run (Aho, Denning and Ullman 1971). The generator's rank order is its
//!   probability order (rank 0 most likely), so the set is the pages of ranks below
//!   the budget, read off the sampler, not learned from the trace.
//! - **LRU** and **CLOCK** (one reference bit, the hand sweeps): what plain recency
//!   gets on the same trace, the baseline a better policy must beat.
//!
//! The trace is the fill (every page once, in the fill's order), the warm-up (one
//! access per page of the working set, the bench's rule) and then `timed` accesses,
//! interleaved round-robin when there are several threads (the real interleaving
//! is the scheduler's; for independent references it does not change the ratios).
//! Misses are counted over the timed part only, with the cache as the first two
//! parts left it.

use crate::driver::{thread_rng, WorkSpec};
use crate::workload::Sampler;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Miss ratios (misses per access, 0..=1) of the offline bounds and the recency
/// baselines on one trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Belady's MIN.
    pub min: f64,
    /// The fixed set of the most likely pages.
    pub a0: f64,
    /// Least recently used, simulated.
    pub lru: f64,
    /// CLOCK (one reference bit), simulated.
    pub clock: f64,
    /// Accesses the ratios were counted over.
    pub accesses: u64,
}

/// The page sequence of `spec` (see the module header) and where its timed part
/// starts. The generator calls match `driver`'s worker: per access, one sample,
/// one draw for read/write, one per word.
pub fn trace(spec: &WorkSpec, timed: u64) -> (Vec<u32>, usize) {
    let n = spec.pages;
    let threads = u64::from(spec.threads.max(1));
    let mut t = Vec::with_capacity((2 * n + timed) as usize);
    // The fill: thread k writes pages k, k + threads, ...; round-robin.
    for k in 0..threads {
        let mut p = k;
        while p < n {
            t.push(p as u32);
            p += threads;
        }
    }
    let sampler = Sampler::new(spec.pattern, n);
    let mut rngs: Vec<_> = (0..threads)
        .map(|k| thread_rng(spec.seed, k as u32))
        .collect();
    let nt = rngs.len();
    let mut k = 0usize;
    let mut next = || {
        let rng = &mut rngs[k];
        k = (k + 1) % nt;
        let page = sampler.sample(rng);
        let _write = rng.unit();
        for _ in 0..spec.words {
            let _ = rng.below(crate::driver::WORDS_PER_PAGE);
        }
        page as u32
    };
    for _ in 0..n {
        t.push(next());
    }
    let start = t.len();
    for _ in 0..timed {
        t.push(next());
    }
    (t, start)
}

/// All four ratios for a cache of `frames` pages on `spec`'s trace with `timed`
/// measured accesses.
pub fn bounds(spec: &WorkSpec, frames: u64, timed: u64) -> Bounds {
    let (t, start) = trace(spec, timed);
    let frames = frames.max(1) as usize;
    let sampler = Sampler::new(spec.pattern, spec.pages);
    let ratio = |m: u64| m as f64 / (t.len() - start).max(1) as f64;
    Bounds {
        min: ratio(min_misses(&t, start, frames, spec.pages)),
        a0: ratio(a0_misses(&t, start, frames, &sampler, spec.pages)),
        lru: ratio(lru_misses(&t, start, frames, spec.pages)),
        clock: ratio(clock_misses(&t, start, frames, spec.pages)),
        accesses: (t.len() - start) as u64,
    }
}

/// Belady's MIN: misses in `t[from..]`, the cache run from the start of `t`.
pub fn min_misses(t: &[u32], from: usize, frames: usize, pages: u64) -> u64 {
    // next[i]: where the page of access i is used next (usize::MAX: never).
    let mut next = vec![usize::MAX; t.len()];
    let mut last = vec![usize::MAX; pages as usize];
    for i in (0..t.len()).rev() {
        next[i] = last[t[i] as usize];
        last[t[i] as usize] = i;
    }
    // In the cache: a page's next use (usize::MAX when not cached). The heap holds
    // (next use, page) for cached pages; stale entries (next use moved) are skipped.
    let mut due = vec![usize::MAX; pages as usize];
    let mut cached = vec![false; pages as usize];
    let mut heap: BinaryHeap<(usize, u32)> = BinaryHeap::with_capacity(frames + 1);
    let mut used = 0usize;
    let mut misses = 0u64;
    for (i, &p) in t.iter().enumerate() {
        let pi = p as usize;
        if !cached[pi] {
            if i >= from {
                misses += 1;
            }
            if used == frames {
                // Evict the cached page used furthest in the future.
                loop {
                    let (d, q) = heap.pop().expect("a full cache has entries");
                    if cached[q as usize] && due[q as usize] == d {
                        cached[q as usize] = false;
                        break;
                    }
                }
                used -= 1;
            }
            cached[pi] = true;
            used += 1;
        }
        due[pi] = next[i];
        heap.push((next[i], p));
        // Keep the heap from growing without bound on stale entries.
        if heap.len() > 4 * frames + 1024 {
            heap.retain(|&(d, q)| cached[q as usize] && due[q as usize] == d);
        }
    }
    misses
}

/// A0: misses in `t[from..]` of the fixed set of the `frames` most likely pages.
pub fn a0_misses(t: &[u32], from: usize, frames: usize, s: &Sampler, pages: u64) -> u64 {
    let mut keep = vec![false; pages as usize];
    for r in 0..(frames as u64).min(pages) {
        keep[s.page_of_rank(r) as usize] = true;
    }
    t[from..].iter().filter(|&&p| !keep[p as usize]).count() as u64
}

/// LRU: misses in `t[from..]`. Recency by last-use time; eviction of the oldest
/// through a min-heap of (last use, page) with stale entries skipped.
pub fn lru_misses(t: &[u32], from: usize, frames: usize, pages: u64) -> u64 {
    let mut stamp = vec![usize::MAX; pages as usize];
    let mut heap: BinaryHeap<Reverse<(usize, u32)>> = BinaryHeap::new();
    let mut used = 0usize;
    let mut misses = 0u64;
    for (i, &p) in t.iter().enumerate() {
        let pi = p as usize;
        if stamp[pi] == usize::MAX {
            if i >= from {
                misses += 1;
            }
            if used == frames {
                loop {
                    let Reverse((s, q)) = heap.pop().expect("a full cache has entries");
                    if stamp[q as usize] == s {
                        stamp[q as usize] = usize::MAX;
                        break;
                    }
                }
                used -= 1;
            }
            used += 1;
        }
        stamp[pi] = i;
        heap.push(Reverse((i, p)));
        if heap.len() > 4 * frames + 1024 {
            heap.retain(|&Reverse((s, q))| stamp[q as usize] == s);
        }
    }
    misses
}

/// CLOCK: misses in `t[from..]`; a hit sets the page's bit, the hand clears bits
/// until it finds a clear one and evicts that page.
pub fn clock_misses(t: &[u32], from: usize, frames: usize, pages: u64) -> u64 {
    const NONE: u32 = u32::MAX;
    let mut slot_of = vec![NONE; pages as usize];
    let mut ring = vec![NONE; frames];
    let mut bit = vec![false; frames];
    let mut hand = 0usize;
    let mut misses = 0u64;
    for (i, &p) in t.iter().enumerate() {
        let s = slot_of[p as usize];
        if s != NONE {
            bit[s as usize] = true;
            continue;
        }
        if i >= from {
            misses += 1;
        }
        while ring[hand] != NONE && bit[hand] {
            bit[hand] = false;
            hand = (hand + 1) % frames;
        }
        if ring[hand] != NONE {
            slot_of[ring[hand] as usize] = NONE;
        }
        ring[hand] = p;
        bit[hand] = false;
        slot_of[p as usize] = hand as u32;
        hand = (hand + 1) % frames;
    }
    misses
}

/// Generalised CLOCK: a counter per page (saturating at `max`) raised by each hit;
/// the hand lowers a non-zero counter and passes, and evicts a page at zero.
/// `max = 1` is CLOCK.
pub fn gclock_misses(t: &[u32], from: usize, frames: usize, pages: u64, max: u8) -> u64 {
    const NONE: u32 = u32::MAX;
    let mut slot_of = vec![NONE; pages as usize];
    let mut ring = vec![NONE; frames];
    let mut cnt = vec![0u8; frames];
    let mut hand = 0usize;
    let mut misses = 0u64;
    for (i, &p) in t.iter().enumerate() {
        let s = slot_of[p as usize];
        if s != NONE {
            let c = &mut cnt[s as usize];
            *c = (*c + 1).min(max);
            continue;
        }
        if i >= from {
            misses += 1;
        }
        while ring[hand] != NONE && cnt[hand] > 0 {
            cnt[hand] -= 1;
            hand = (hand + 1) % frames;
        }
        if ring[hand] != NONE {
            slot_of[ring[hand] as usize] = NONE;
        }
        ring[hand] = p;
        cnt[hand] = 0;
        slot_of[p as usize] = hand as u32;
        hand = (hand + 1) % frames;
    }
    misses
}

/// S3-FIFO (Yang et al., SOSP 2023): a small FIFO (10 % of the frames) that new
/// pages enter, a main FIFO, and a ghost list of pages recently evicted from the
/// small one (as many as the main FIFO holds). A page leaving the small FIFO moves to
/// main if it was hit there, else is evicted (and remembered as a ghost); a miss on
/// a ghost enters main directly. Main evicts like CLOCK with a 2-bit counter.
pub fn s3fifo_misses(t: &[u32], from: usize, frames: usize, pages: u64, fmax: u8) -> u64 {
    use std::collections::VecDeque;
    const OUT: u8 = 0;
    const SMALL: u8 = 1;
    const MAIN: u8 = 2;
    let small_cap = (frames / 10).max(1);
    let main_cap = frames.saturating_sub(small_cap).max(1);
    let mut state = vec![OUT; pages as usize];
    let mut freq = vec![0u8; pages as usize];
    let mut ghost_seq = vec![0u64; pages as usize]; // 0: not a ghost
    let mut small: VecDeque<u32> = VecDeque::with_capacity(small_cap + 1);
    let mut main: VecDeque<u32> = VecDeque::with_capacity(main_cap + 1);
    let mut ghosts: VecDeque<(u32, u64)> = VecDeque::new();
    let mut gseq = 0u64;
    let mut misses = 0u64;
    for (i, &p) in t.iter().enumerate() {
        let pi = p as usize;
        if state[pi] != OUT {
            freq[pi] = (freq[pi] + 1).min(fmax);
            continue;
        }
        if i >= from {
            misses += 1;
        }
        // Make room: evict until small + main < frames.
        while small.len() + main.len() >= frames {
            if small.len() >= small_cap || main.is_empty() {
                let q = small.pop_front().expect("small is not empty");
                let qi = q as usize;
                if freq[qi] > 0 {
                    state[qi] = MAIN;
                    freq[qi] = 0;
                    main.push_back(q);
                    // Main over capacity: evict from it (below, next round).
                } else {
                    state[qi] = OUT;
                    gseq += 1;
                    ghost_seq[qi] = gseq;
                    ghosts.push_back((q, gseq));
                    while ghosts.len() > main_cap {
                        let (g, sq) = ghosts.pop_front().expect("not empty");
                        if ghost_seq[g as usize] == sq {
                            ghost_seq[g as usize] = 0;
                        }
                    }
                }
            } else {
                loop {
                    let q = main.pop_front().expect("main is not empty");
                    let qi = q as usize;
                    if freq[qi] > 0 {
                        freq[qi] -= 1;
                        main.push_back(q);
                    } else {
                        state[qi] = OUT;
                        break;
                    }
                }
            }
        }
        freq[pi] = 0;
        if ghost_seq[pi] != 0 {
            ghost_seq[pi] = 0;
            state[pi] = MAIN;
            main.push_back(p);
        } else {
            state[pi] = SMALL;
            small.push_back(p);
        }
    }
    misses
}

/// S3-FIFO as the engine runs it (`reclaim`): a 1-bit reference (the entry's
/// accessed bit, which the faulting access itself sets), a small FIFO of 10 % of the
/// frames that new pages enter, a main CLOCK over the rest, and a ghost table of
/// `frames / 2` entries (a later key that hashes to an entry overwrites it). A small
/// page's first visit only clears the bit the fault set and sends it round the small
/// FIFO once more; at its second visit a page used since is promoted to main, one
/// not used is evicted and leaves a ghost. A page faulted back while its ghost is
/// there goes to main.
pub fn s3fifo_engine_misses(t: &[u32], from: usize, frames: usize, pages: u64) -> u64 {
    use std::collections::VecDeque;
    const OUT: u8 = 0;
    const SMALL1: u8 = 1; // not yet visited
    const SMALL2: u8 = 2; // visited once
    const MAIN: u8 = 3;
    let small_cap = (frames / 10).max(1);
    let nghost = (frames / 2).max(1);
    let mut state = vec![OUT; pages as usize];
    let mut refb = vec![false; pages as usize];
    let mut ghost = vec![u32::MAX; nghost];
    let gh = |p: u32| (u64::from(p).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % nghost;
    let mut small: VecDeque<u32> = VecDeque::new();
    let mut main: VecDeque<u32> = VecDeque::new();
    let mut misses = 0u64;
    for (i, &p) in t.iter().enumerate() {
        let pi = p as usize;
        if state[pi] != OUT {
            refb[pi] = true;
            continue;
        }
        if i >= from {
            misses += 1;
        }
        while small.len() + main.len() >= frames {
            if small.len() > small_cap || main.is_empty() {
                let q = small.pop_front().expect("small is not empty");
                let qi = q as usize;
                if state[qi] == SMALL1 {
                    refb[qi] = false;
                    state[qi] = SMALL2;
                    small.push_back(q);
                } else if refb[qi] {
                    refb[qi] = false;
                    state[qi] = MAIN;
                    main.push_back(q);
                } else {
                    state[qi] = OUT;
                    ghost[gh(q)] = q;
                }
            } else {
                let q = main.pop_front().expect("main is not empty");
                let qi = q as usize;
                if refb[qi] {
                    refb[qi] = false;
                    main.push_back(q);
                } else {
                    state[qi] = OUT;
                }
            }
        }
        refb[pi] = true; // the faulting access
        let g = gh(p);
        if ghost[g] == p {
            ghost[g] = u32::MAX;
            state[pi] = MAIN;
            main.push_back(p);
        } else {
            state[pi] = SMALL1;
            small.push_back(p);
        }
    }
    misses
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Pattern;

    fn spec(pattern: Pattern, pages: u64) -> WorkSpec {
        WorkSpec {
            pages,
            pattern,
            write_ratio: 0.5,
            threads: 1,
            words: 1,
            seed: 42,
            warm_accesses: pages,
            content: Default::default(),
        }
    }

    #[test]
    #[allow(clippy::print_stdout)]
    fn policies_on_the_quick_traces() {
        // Not an assertion of which wins (the module header says); a check that the
        // frequency policies never lose to CLOCK by much and stay above MIN.
        for (name, pat) in [
            ("uniform", Pattern::Uniform),
            (
                "hotcold",
                Pattern::HotCold {
                    hot_frac: 0.1,
                    hot_prob: 0.9,
                },
            ),
            ("zipf", Pattern::Zipf { theta: 0.99 }),
        ] {
            for wb in [1.25f64, 4.0] {
                let frames = 4096usize;
                let s = spec(pat, (frames as f64 * wb) as u64);
                let (t, start) = trace(&s, 400_000);
                let n = (t.len() - start) as f64;
                let pct = |m: u64| 100.0 * m as f64 / n;
                let clock = pct(clock_misses(&t, start, frames, s.pages));
                let g2 = pct(gclock_misses(&t, start, frames, s.pages, 2));
                let g3 = pct(gclock_misses(&t, start, frames, s.pages, 3));
                let s3 = pct(s3fifo_misses(&t, start, frames, s.pages, 3));
                let s1 = pct(s3fifo_misses(&t, start, frames, s.pages, 1));
                let cs3 = pct(s3fifo_engine_misses(&t, start, frames, s.pages));
                let min = pct(min_misses(&t, start, frames, s.pages));
                println!("{name} W/B={wb}: CLOCK {clock:.1} GCLOCK2 {g2:.1} GCLOCK3 {g3:.1} S3-FIFO {s3:.1} S3-FIFO-1bit {s1:.1} S3-FIFO-engine {cs3:.1} MIN {min:.1}");
                for x in [g2, g3, s3, s1, cs3] {
                    assert!(
                        x < clock + 1.5 && x > min,
                        "{name} {wb}: {x} vs CLOCK {clock}"
                    );
                }
            }
        }
    }

    #[test]
    fn small_traces_by_hand() {
        // 3 frames; 1 2 3 4 1 2 5 1 2 3 4 5: MIN 7 misses, LRU 10 (the textbook
        // example), counted from the start.
        let t = [1u32, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5];
        assert_eq!(min_misses(&t, 0, 3, 6), 7);
        assert_eq!(lru_misses(&t, 0, 3, 6), 10);
        // CLOCK on a loop one larger than the cache misses every time, like LRU.
        let l: Vec<u32> = (0..40).map(|i| i % 4).collect();
        assert_eq!(clock_misses(&l, 0, 3, 4), 40);
        assert_eq!(lru_misses(&l, 0, 3, 4), 40);
        // MIN on the same loop keeps 2 of the 3 pages it does not need next.
        assert!(min_misses(&l, 0, 3, 4) < 20);
    }

    #[test]
    fn the_bounds_are_ordered_and_uniform_matches_its_formula() {
        let u = bounds(&spec(Pattern::Uniform, 4000), 1000, 200_000);
        // A0 of uniform: 1 - B/W.
        assert!((u.a0 - 0.75).abs() < 0.01, "{u:?}");
        assert!(
            u.min < u.a0 && u.a0 <= u.lru + 0.01 && u.a0 <= u.clock + 0.01,
            "{u:?}"
        );
        let z = bounds(&spec(Pattern::Zipf { theta: 0.99 }, 4000), 1000, 200_000);
        assert!(z.min < z.a0 && z.a0 < z.clock && z.a0 < z.lru, "{z:?}");
        let h = bounds(
            &spec(
                Pattern::HotCold {
                    hot_frac: 0.1,
                    hot_prob: 0.9,
                },
                4000,
            ),
            1000,
            200_000,
        );
        // A0 keeps the 400 hot pages and 600 of 3600 cold ones: 0.1 * 3000/3600.
        assert!((h.a0 - 0.1 * 3000.0 / 3600.0).abs() < 0.01, "{h:?}");
        assert!(h.min < h.a0, "{h:?}");
    }

    #[test]
    fn the_trace_is_the_drivers_sequence() {
        // The timed part starts after the fill and one access per page.
        let s = spec(Pattern::Uniform, 100);
        let (t, start) = trace(&s, 50);
        assert_eq!(start, 200);
        assert_eq!(t.len(), 250);
        assert_eq!(&t[..100], &(0..100).collect::<Vec<u32>>()[..]);
        // Same generator calls as the driver's worker for thread 0.
        let sampler = Sampler::new(s.pattern, s.pages);
        let mut rng = thread_rng(s.seed, 0);
        let first = sampler.sample(&mut rng);
        assert_eq!(t[100], first as u32);
    }
}
