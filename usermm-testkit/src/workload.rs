//! Seeded workload generators shared by `usermm run`, `usermm bench` and the tests:
//! a small fast PRNG and page samplers for uniform, hot/cold and Zipf access.
//!
//! Everything here is deterministic given the seed, so a failing run can be
//! replayed with the seed it printed. No locks; each thread owns its generator.

use std::cell::Cell;

/// xoshiro256** seeded through splitmix64.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

/// The golden-ratio increment of splitmix64 (also used to spread seeds and keys).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 finalizer: a stateless bijective mixer of 64 bits (the project's
/// one mixer; [`splitmix`], seeds and page patterns all go through it).
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One step of splitmix64: advances `x` by [`GOLDEN`] and returns [`mix`] of it.
#[inline]
pub fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(GOLDEN);
    mix(*x)
}

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        Rng {
            s: [
                splitmix(&mut x),
                splitmix(&mut x),
                splitmix(&mut x),
                splitmix(&mut x),
            ],
        }
    }
    /// The generator of thread `t` (0-based) of a run with `seed`: seeded with
    /// `seed + (t + 1)·GOLDEN`, so threads draw independent streams.
    pub fn for_thread(seed: u64, t: u64) -> Rng {
        Rng::new(seed.wrapping_add(t.wrapping_add(1).wrapping_mul(GOLDEN)))
    }
    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }
    /// Uniform in `0..n` (`n > 0`).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
    /// Uniform in `[0, 1)`.
    #[inline]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Which pages an access goes to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pattern {
    /// Every page equally likely.
    Uniform,
    /// `hot_prob` of the accesses go to a hot set of `hot_frac` of the pages.
    HotCold {
        /// Fraction of pages that are hot (0.1 = 10 %).
        hot_frac: f64,
        /// Fraction of accesses that go to the hot pages (0.9 = 90 %).
        hot_prob: f64,
    },
    /// Zipf-distributed popularity with exponent `theta` (0.99 is YCSB's default),
    /// popular pages scattered over the range.
    Zipf {
        /// The exponent, in (0, 1).
        theta: f64,
    },
    /// A scan: each thread's sampler visits `0, s, 2s, …` up to the end, then
    /// `1, 1 + s, …`, and so on (`s` = `stride`; 1 is a sequential scan), from a
    /// random first page, wrapping around for ever. Every page is equally likely
    /// over a whole cycle, so the replacement bounds treat it as uniform.
    Seq {
        /// Pages between two accesses (≥ 1).
        stride: u64,
    },
}

impl Pattern {
    /// Parses `uniform`, `hotcold` (90 % of accesses to 10 % of pages), `hotcold:F:P`,
    /// `zipf` (θ = 0.99), `zipf:THETA`, `seq` (a sequential scan) or `seq:STRIDE`
    /// (a strided one, STRIDE pages apart: `seq:16`).
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let mut it = s.split(':');
        let name = it.next().unwrap_or("");
        let nums: Result<Vec<f64>, _> = it.map(|x| x.parse::<f64>()).collect();
        let nums = nums.map_err(|_| format!("pattern {s:?}: parameters must be numbers"))?;
        let p = match (name, nums.as_slice()) {
            ("uniform", []) => Pattern::Uniform,
            ("hotcold", []) => Pattern::HotCold {
                hot_frac: 0.1,
                hot_prob: 0.9,
            },
            ("hotcold", [f, p]) if *f > 0.0 && *f < 1.0 && *p >= 0.0 && *p <= 1.0 => {
                Pattern::HotCold {
                    hot_frac: *f,
                    hot_prob: *p,
                }
            }
            ("zipf", []) => Pattern::Zipf { theta: 0.99 },
            ("zipf", [t]) if *t > 0.0 && *t < 1.0 => Pattern::Zipf { theta: *t },
            ("seq", []) => Pattern::Seq { stride: 1 },
            ("seq", [k]) if *k >= 1.0 && *k <= 1e9 && k.fract() == 0.0 => {
                Pattern::Seq { stride: *k as u64 }
            }
            _ => {
                return Err(format!(
                    "unknown pattern {s:?} (uniform, hotcold[:FRAC:PROB], zipf[:THETA] with \
                     0<THETA<1, seq[:STRIDE] with a whole STRIDE >= 1)"
                ))
            }
        };
        Ok(p)
    }

    /// A short name for tables.
    pub fn name(&self) -> String {
        match self {
            Pattern::Uniform => "uniform".into(),
            Pattern::HotCold { hot_frac, hot_prob } => {
                format!("hotcold{:.0}/{:.0}", hot_prob * 100.0, hot_frac * 100.0)
            }
            Pattern::Zipf { theta } => format!("zipf{theta}"),
            Pattern::Seq { stride: 1 } => "seq".into(),
            Pattern::Seq { stride } => format!("seq-stride{stride}"),
        }
    }
}

/// Draws page indices in `0..n` following a pattern. One per thread: a scan keeps
/// its position in it.
#[derive(Clone, Debug)]
pub struct Sampler {
    pattern: Pattern,
    n: u64,
    hot: u64,
    // Zipf constants (Gray et al., "Quickly generating billion-record synthetic
    // databases", as used by YCSB).
    alpha: f64,
    zetan: f64,
    eta: f64,
    theta: f64,
    /// A scan's next page (`Pattern::Seq`); `u64::MAX` before the first.
    cursor: Cell<u64>,
}

/// A bijection of `0..n` that scatters neighbouring ranks (so hot pages are not
/// adjacent): multiplication by an odd constant coprime with `n`, modulo `n`.
fn scatter(i: u64, n: u64) -> u64 {
    const P: u64 = 2_654_435_761; // prime
    let p = if n.is_multiple_of(P) { 1 } else { P };
    ((u128::from(i) * u128::from(p)) % u128::from(n)) as u64
}

impl Sampler {
    /// A sampler over `n > 0` pages.
    pub fn new(pattern: Pattern, n: u64) -> Sampler {
        let n = n.max(1);
        let mut s = Sampler {
            pattern,
            n,
            hot: 1,
            alpha: 0.0,
            zetan: 0.0,
            eta: 0.0,
            theta: 0.0,
            cursor: Cell::new(u64::MAX),
        };
        match pattern {
            Pattern::Uniform | Pattern::Seq { .. } => {}
            Pattern::HotCold { hot_frac, .. } => {
                s.hot = ((n as f64 * hot_frac) as u64).clamp(1, n);
            }
            Pattern::Zipf { theta } => {
                let zeta = |k: u64| (1..=k).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
                let zetan = zeta(n);
                let zeta2 = zeta(2.min(n));
                s.theta = theta;
                s.zetan = zetan;
                s.alpha = 1.0 / (1.0 - theta);
                s.eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
            }
        }
        s
    }

    /// The page of popularity rank `r` (rank 0 is the most likely page; ranks are in
    /// order of probability, ties in any order): the set of the `b` most likely pages
    /// is `page_of_rank(0..b)` (`bounds`' A0).
    pub fn page_of_rank(&self, r: u64) -> u64 {
        match self.pattern {
            Pattern::Uniform | Pattern::Seq { .. } => r,
            Pattern::HotCold { .. } | Pattern::Zipf { .. } => scatter(r, self.n),
        }
    }

    /// The next page index.
    #[inline]
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        match self.pattern {
            Pattern::Uniform => rng.below(self.n),
            Pattern::HotCold { hot_prob, .. } => {
                let rank = if rng.unit() < hot_prob || self.hot == self.n {
                    rng.below(self.hot)
                } else {
                    self.hot + rng.below(self.n - self.hot)
                };
                scatter(rank, self.n)
            }
            Pattern::Zipf { .. } => {
                let u = rng.unit();
                let uz = u * self.zetan;
                let rank = if uz < 1.0 {
                    0
                } else if uz < 1.0 + 0.5f64.powf(self.theta) {
                    1
                } else {
                    ((self.n as f64) * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64
                };
                scatter(rank.min(self.n - 1), self.n)
            }
            Pattern::Seq { stride } => {
                let mut cur = self.cursor.get();
                if cur == u64::MAX {
                    cur = rng.below(self.n);
                }
                let mut next = cur + stride;
                if next >= self.n {
                    // The next offset within the stride, from its first page.
                    next = (next % stride + 1) % stride;
                    if next >= self.n {
                        next = 0;
                    }
                }
                self.cursor.set(next);
                cur
            }
        }
    }
}

/// A byte range `(offset, len)` of a region of `rlen` bytes for a random access:
/// small (≤ 64 bytes), up to a page, straddling a page boundary, or several pages.
/// Shared by the differential test and `usermm stress all`.
pub fn pick_range(rng: &mut Rng, rlen: u64) -> (u64, usize) {
    const PS: u64 = 4096;
    let len = match rng.below(10) {
        0..=3 => 1 + rng.below(64),
        4..=6 => 1 + rng.below(PS),
        7..=8 => {
            // Straddle a boundary: end `k` bytes before a page end, run past it.
            let page = rng.below(rlen / PS);
            let k = 1 + rng.below(PS - 1);
            let len = (k + 1 + rng.below(PS)).min(rlen);
            let off = ((page + 1) * PS).saturating_sub(k).min(rlen - len);
            return (off, len as usize);
        }
        _ => PS + rng.below(4 * PS),
    }
    .min(rlen);
    let off = rng.below(rlen - len + 1);
    (off, len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_range() {
        for p in ["uniform", "hotcold", "zipf"] {
            let s = Sampler::new(Pattern::parse(p).unwrap(), 1000);
            let mut a = Rng::new(7);
            let mut b = Rng::new(7);
            for _ in 0..10_000 {
                let x = s.sample(&mut a);
                assert!(x < 1000);
                assert_eq!(x, s.sample(&mut b));
            }
        }
    }

    #[test]
    fn skew_is_skewed() {
        let n = 10_000;
        for p in ["hotcold", "zipf"] {
            let s = Sampler::new(Pattern::parse(p).unwrap(), n);
            let mut r = Rng::new(1);
            let mut hits = vec![0u32; n as usize];
            for _ in 0..200_000 {
                hits[s.sample(&mut r) as usize] += 1;
            }
            hits.sort_unstable_by(|a, b| b.cmp(a));
            let top10: u32 = hits[..(n / 10) as usize].iter().sum();
            assert!(top10 > 200_000 / 2, "{p}: top 10% got {top10}");
        }
    }

    #[test]
    fn splitmix_is_the_finalizer_of_a_golden_step() {
        // Reference values of splitmix64 seeded with 0 (Vigna's splitmix64.c).
        let mut x = 0;
        assert_eq!(splitmix(&mut x), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix(&mut x), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(mix(GOLDEN), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn scans_visit_every_page_once_per_cycle() {
        for (p, n) in [
            ("seq", 1000u64),
            ("seq:16", 1000),
            ("seq:16", 1024),
            ("seq:7", 5),
        ] {
            let pat = Pattern::parse(p).unwrap();
            let Pattern::Seq { stride } = pat else {
                panic!("{p} is not a scan")
            };
            let s = Sampler::new(pat, n);
            let mut r = Rng::new(3);
            let mut prev = s.sample(&mut r);
            let mut seen = vec![0u32; n as usize];
            seen[prev as usize] += 1;
            let mut jumps = 0;
            for _ in 1..n {
                let x = s.sample(&mut r);
                seen[x as usize] += 1;
                if x != prev + stride {
                    jumps += 1;
                }
                prev = x;
            }
            assert!(seen.iter().all(|&c| c == 1), "{p} over {n}: {seen:?}");
            assert!(jumps <= stride.min(n), "{p} over {n}: {jumps} jumps");
        }
        assert_eq!(Pattern::parse("seq:16").unwrap().name(), "seq-stride16");
        assert_eq!(Pattern::parse("seq").unwrap().name(), "seq");
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "",
            "zipf:2",
            "hotcold:0.1",
            "nope",
            "zipf:x",
            "seq:0",
            "seq:1.5",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
