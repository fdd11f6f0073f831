//! The content check of `usermm bench`'s pointer columns (transparent and kernel):
//! after the timed phase, a sample of pages must hold what the seeded access
//! sequence (`usermm_testkit::driver`) left there.
//!
//! The driver writes `off ^ n` at byte offset `off` in access `n` of a thread (its
//! own count, from 0 at the start of the warm-up; at `Content::write_off(off)` for
//! compressible pages) over the fill (`Content::fill`). A
//! word's correct content is therefore the value of the last write to it, or the
//! fill if none. The driver does not say where each thread stopped, only the total
//! at the end of the timed phase, so the check replays every thread's generator and
//! accepts, per word:
//! - with one thread, whose count at the end of the timed phase (`lo`) is exact:
//!   the last write before `lo` (or the fill if there was none) and any write after
//!   it, since the thread runs on until it sees the stop. A lost write-back (a page
//!   brought back stale) or a page of zeros or of another page is caught.
//! - with several threads, whose counts are not known one by one: the fill or any
//!   value a thread wrote there. Zeros, garbage and another page's contents are
//!   caught; a stale version of the page is not.
//!
//! How far to replay (`hi`) comes from the values read (a written value names its
//! `n`), capped at twice the total plus 2^20 so a garbage word costs no more.

use std::collections::HashMap;
use usermm::PAGE_SIZE;
use usermm_testkit::driver::{thread_rng, Measured, Target, WorkSpec};
use usermm_testkit::workload::{Rng, Sampler};

const WORDS_PER_PAGE: u64 = (PAGE_SIZE / 8) as u64;
/// The driver's batch: a thread publishes its count (and looks for the stop) every
/// this many accesses (`driver::SAMPLE_EVERY`).
const BATCH: u64 = usermm_testkit::driver::SAMPLE_EVERY;
/// How a failed check's message starts (`usermm bench` looks for it).
pub const FAILED: &str = "content check FAILED";
/// Mismatches described in full (the rest are counted).
const DESCRIBED: usize = 5;

/// What the check found.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Verified {
    /// Pages checked.
    pub pages: u64,
    /// Words checked (every word of each page).
    pub words: u64,
    /// Of those, words the access sequence wrote during the run (the rest must hold
    /// the fill).
    pub written: u64,
    /// Words whose content is not an allowed one.
    pub mismatches: u64,
    /// The first few mismatches, described.
    pub first: Vec<String>,
    /// Whether a stale (older) value counts as a mismatch (one thread only).
    pub exact: bool,
}

impl Verified {
    /// `Err` with a description when a word was wrong.
    pub fn result(&self) -> Result<(), String> {
        if self.mismatches == 0 {
            return Ok(());
        }
        Err(format!(
            "{FAILED}: {} of {} words in {} sampled pages do not hold what the access \
             sequence wrote: {}{}",
            self.mismatches,
            self.words,
            self.pages,
            self.first.join("; "),
            if self.mismatches as usize > self.first.len() {
                "; …"
            } else {
                ""
            }
        ))
    }
}

/// Up to `n` distinct pages: half drawn from the cell's own pattern (so the hot
/// pages, where most writes go, are among them), half spread evenly.
pub fn sample_pages(spec: &WorkSpec, n: u64) -> Vec<u64> {
    let n = n.min(spec.pages);
    let mut seen = vec![false; spec.pages as usize];
    let mut out = Vec::with_capacity(n as usize);
    let mut rng = Rng::new(spec.seed ^ 0x7665_7269_6679);
    let sampler = Sampler::new(spec.pattern, spec.pages);
    let mut tries = 0;
    while (out.len() as u64) < n / 2 && tries < 8 * n {
        tries += 1;
        let p = sampler.sample(&mut rng);
        if !seen[p as usize] {
            seen[p as usize] = true;
            out.push(p);
        }
    }
    let rest = n - out.len() as u64;
    // Evenly spread, then (a working set barely larger than the sample) any other.
    let spread = (0..rest).map(|i| i * spec.pages / rest);
    for p in spread.chain(0..spec.pages) {
        if out.len() as u64 >= n {
            break;
        }
        if !seen[p as usize] {
            seen[p as usize] = true;
            out.push(p);
        }
    }
    out.sort_unstable();
    out
}

/// Checks the sampled `pages` of `target` after `m` (the timed phase of `spec`) ran.
pub fn check<T: Target>(target: &T, spec: &WorkSpec, m: &Measured, pages: &[u64]) -> Verified {
    let mut v = Verified {
        pages: pages.len() as u64,
        exact: spec.threads == 1,
        ..Default::default()
    };
    // The values, read first (they tell how far to replay).
    let mut got: Vec<u64> = Vec::with_capacity(pages.len() * WORDS_PER_PAGE as usize);
    for &p in pages {
        for w in 0..WORDS_PER_PAGE {
            let off = p * PAGE_SIZE as u64 + w * 8;
            match target.read(off) {
                Ok(x) => got.push(x),
                Err(e) => {
                    v.mismatches += 1;
                    v.first.push(format!("read of page {p} failed: {e}"));
                    return v;
                }
            }
        }
    }
    // Each thread's count at the end of the timed phase: exact with one thread.
    let total = m.stream_start + m.warm_accesses + m.accesses;
    let lo = if v.exact { total } else { 0 };
    let cap = total.saturating_mul(2).saturating_add(1 << 20);
    let mut hi = lo + BATCH;
    for (i, &x) in got.iter().enumerate() {
        let off =
            pages[i / WORDS_PER_PAGE as usize] * PAGE_SIZE as u64 + (i as u64 % WORDS_PER_PAGE) * 8;
        let n = x ^ off;
        if n < cap {
            hi = hi.max(n + 1);
        }
    }
    // Writes to the sampled pages: offset -> (thread, n), in order of n per thread.
    let mut in_sample = vec![false; spec.pages as usize];
    for &p in pages {
        in_sample[p as usize] = true;
    }
    let mut writes: HashMap<u64, Vec<(u32, u64)>> = HashMap::new();
    let sampler = Sampler::new(spec.pattern, spec.pages);
    for t in 0..spec.threads {
        // The same draws, in the same order, as `driver::worker`.
        let mut rng = thread_rng(spec.seed, t);
        for n in 0..hi {
            let page = sampler.sample(&mut rng);
            let write = rng.unit() < spec.write_ratio;
            for _ in 0..spec.words {
                let off = page * PAGE_SIZE as u64 + rng.below(WORDS_PER_PAGE) * 8;
                if write && in_sample[page as usize] {
                    let off = spec.content.write_off(off);
                    writes.entry(off).or_default().push((t, n));
                }
            }
        }
    }
    let mut fill = vec![0u8; PAGE_SIZE];
    for (pi, &p) in pages.iter().enumerate() {
        spec.content.fill(p, spec.seed, &mut fill);
        for w in 0..WORDS_PER_PAGE {
            let off = p * PAGE_SIZE as u64 + w * 8;
            let x = got[pi * WORDS_PER_PAGE as usize + w as usize];
            let i = (w * 8) as usize;
            // What the fill's bytes read as through a pointer (a native load).
            let filled = u64::from_ne_bytes(fill[i..i + 8].try_into().expect("8 bytes"));
            v.words += 1;
            let ws = writes.get(&off).map(Vec::as_slice).unwrap_or(&[]);
            if !ws.is_empty() {
                v.written += 1;
            }
            let mut ok = false;
            let mut fill_allowed = true;
            let mut expect = None;
            for t in 0..spec.threads {
                let mine: Vec<u64> = ws.iter().filter(|w| w.0 == t).map(|w| w.1).collect();
                // From the last write before `lo` on.
                let from = mine.partition_point(|&n| n < lo);
                let from = if from > 0 {
                    fill_allowed = false;
                    expect = Some(mine[from - 1]);
                    from - 1
                } else {
                    0
                };
                ok |= mine[from..].iter().any(|&n| x == off ^ n);
            }
            ok |= fill_allowed && x == filled;
            if !ok {
                v.mismatches += 1;
                if v.first.len() < DESCRIBED {
                    let want = match expect {
                        Some(n) if v.exact => format!(
                            "0x{:x} (access {n}, the last write before the end of the timed phase)",
                            off ^ n
                        ),
                        _ if ws.is_empty() => format!("the fill 0x{filled:x} (never written)"),
                        _ => format!(
                            "the fill 0x{filled:x} or one of {} written values",
                            ws.len()
                        ),
                    };
                    v.first
                        .push(format!("page {p} word {w}: read 0x{x:x}, expected {want}"));
                }
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use usermm_testkit::driver::{self, Content, RawTarget, Snap};
    use usermm_testkit::workload::Pattern;

    fn spec(threads: u32, content: Content) -> WorkSpec {
        WorkSpec {
            pages: 64,
            pattern: Pattern::Zipf { theta: 0.99 },
            write_ratio: 0.5,
            threads,
            words: 2,
            seed: 42,
            warm_accesses: 64,
            content,
        }
    }

    /// The driver on plain memory, then the check: it must pass, and it must catch
    /// a zeroed word, a stale value and another page's contents (the staleness
    /// only with one thread).
    fn run(threads: u32, content: Content) {
        let spec = spec(threads, content);
        let mut buf = vec![0u64; 64 * 512];
        // SAFETY: `buf` outlives the target and is not used otherwise meanwhile.
        let t = unsafe { RawTarget::new(buf.as_mut_ptr().cast(), buf.len() * 8) };
        // A longer window if the machine is so loaded that the workers made no
        // access in the short one (seen under a parallel test run).
        let mut m = None;
        for ms in [50, 400, 3000] {
            let got = driver::drive(
                &t,
                &spec,
                Duration::from_millis(20),
                Duration::from_millis(ms),
                &Snap::default,
            )
            .unwrap();
            if got.accesses > 0 {
                m = Some(got);
                break;
            }
        }
        let m = m.expect("no access in 3 s");
        let pages = sample_pages(&spec, 16);
        assert_eq!(pages.len(), 16);
        let v = check(&t, &spec, &m, &pages);
        assert_eq!(v.mismatches, 0, "{:?}", v.first);
        assert!(v.written > 0, "{v:?}");
        assert_eq!(v.words, 16 * 512);

        // Zeros where a word was.
        let off = (pages[0] * 4096) as usize;
        let keep = buf[off / 8];
        buf[off / 8] = 0;
        let v = check(&t, &spec, &m, &pages);
        assert_eq!(v.mismatches, 1, "{v:?}");
        assert!(v.result().unwrap_err().contains("page"), "{v:?}");
        buf[off / 8] = keep;

        // Another page's contents.
        let (a, b) = (pages[1] as usize * 512, pages[2] as usize * 512);
        let saved: Vec<u64> = buf[a..a + 512].to_vec();
        buf.copy_within(b..b + 512, a);
        // (Compressible pages share their zero words: only the 128 random ones differ.)
        let most = if content == Content::Compressible {
            100
        } else {
            400
        };
        assert!(check(&t, &spec, &m, &pages).mismatches > most);
        buf[a..a + 512].copy_from_slice(&saved);

        // A stale value: a word written twice gets its older value back.
        let mut stale = None;
        let mut rng = thread_rng(spec.seed, 0);
        let sampler = Sampler::new(spec.pattern, spec.pages);
        let mut last: HashMap<u64, u64> = HashMap::new();
        for n in 0..m.warm_accesses + m.accesses {
            let page = sampler.sample(&mut rng);
            let write = rng.unit() < spec.write_ratio;
            for _ in 0..spec.words {
                let off = content.write_off(page * 4096 + rng.below(512) * 8);
                if write && pages.contains(&page) {
                    if let Some(old) = last.insert(off, n) {
                        if old != n {
                            stale = Some((off, old));
                        }
                    }
                }
            }
        }
        let (off, old) = stale.expect("a word written twice");
        let keep = buf[off as usize / 8];
        buf[off as usize / 8] = off ^ old;
        let v = check(&t, &spec, &m, &pages);
        buf[off as usize / 8] = keep;
        if threads == 1 {
            assert_eq!(v.mismatches, 1, "a stale value passed: {v:?}");
        } else {
            assert_eq!(v.mismatches, 0, "{v:?}");
        }
    }

    #[test]
    fn one_thread_exact() {
        run(1, Content::Incompressible);
    }

    #[test]
    fn two_threads() {
        run(2, Content::Incompressible);
    }

    #[test]
    fn compressible_pages() {
        run(1, Content::Compressible);
        run(2, Content::Compressible);
    }
}
