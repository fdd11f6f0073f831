//! Page contents that can be checked, and their verifiers: one home for what
//! `usermm run`, `usermm stress`, the integration tests and the NBD tests write into
//! pages and how they read it back.
//!
//! Three families, all deterministic (a function of their arguments only) and all
//! built on the one mixer [`crate::workload::mix`]:
//!
//! - **Keyed pages** ([`page_pattern`], [`versioned_page`]): a whole page from a key
//!   (or a page number and a version); every 8-byte word differs. With
//!   [`write_page`], [`check_page`] and [`verified_workload`] for an address space.
//! - **Stamped words** ([`header`], [`stamp`], [`stamp_ok`], [`fill_stamped`],
//!   [`check_stamped`]): what `usermm run` keeps exact per-word models with: word 0
//!   of a page is a header `page << 32 | version`, every other word a stamp
//!   `version << 32 | hash(page, word, version)` of the write that last touched it.
//! - **Generation stamps** ([`gen_stamp`], [`write_gen`], [`check_gen`],
//!   [`fill_gens`], [`verify_gens`]): 16 bytes `(page, generation)` at
//!   [`GEN_OFFSET`] in a page, for the fork/swapoff races where each side of a fork
//!   writes its own generation.
//!
//! And [`fill_random`], [`first_diff`] (a readable description of a mismatch) and
//! [`map_numbered`] (a region whose pages hold their own numbers, for probes that
//! only need to tell pages apart).

use std::time::Instant;

use usermm::{AddressSpace, Region, VAddr, Vm, PAGE_SIZE};

use crate::watchdog;
use crate::workload::{mix, Rng, GOLDEN};

/// Maps `pages` anonymous pages in `mm` and writes each page's number (little
/// endian) into its first 8 bytes, in address order.
pub fn map_numbered(mm: &AddressSpace, pages: u64) -> usermm::Result<Region> {
    let r = mm.map_anon(pages as usize * PAGE_SIZE)?;
    for p in 0..pages {
        mm.write(r.start() + p * PAGE_SIZE as u64, &p.to_le_bytes())?;
    }
    Ok(r)
}

/// 8-byte words in a page.
pub const WORDS_PER_PAGE: u64 = (PAGE_SIZE / 8) as u64;

/// Fills `buf` with random bytes from `rng`.
pub fn fill_random(rng: &mut Rng, buf: &mut [u8]) {
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let w = rng.next_u64().to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&w[..n]);
}

/// Describes the first difference between `got` and `want` (None if equal).
pub fn first_diff(got: &[u8], want: &[u8]) -> Option<String> {
    assert_eq!(got.len(), want.len());
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let n = got[i..]
        .iter()
        .zip(&want[i..])
        .filter(|(a, b)| a != b)
        .count();
    let end = (i + 16).min(got.len());
    Some(format!(
        "first difference at byte {i} of {} ({n} bytes differ): got {:02x?}, want {:02x?}",
        got.len(),
        &got[i..end],
        &want[i..end]
    ))
}

// ------------------------------------------------------------------ keyed pages

/// The content of a page identified by `key` (any mix of page number, thread and
/// version): every 8-byte word differs, and no two keys give the same page.
pub fn page_pattern(key: u64, out: &mut [u8]) {
    assert_eq!(out.len(), PAGE_SIZE);
    let base = mix(key.wrapping_add(0x1234_5678_9ABC_DEF1));
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(base ^ (i as u64).wrapping_mul(GOLDEN)).to_le_bytes());
    }
}

/// The key of page `page` at version `ver` for [`page_pattern`].
pub fn version_key(page: u64, ver: u64) -> u64 {
    page.wrapping_mul(GOLDEN) ^ mix(ver)
}

/// The content of page `page` at version `ver`. Version 0 means "never written":
/// all zeroes.
pub fn versioned_page(page: u64, ver: u64, out: &mut [u8]) {
    if ver == 0 {
        out.fill(0);
    } else {
        page_pattern(version_key(page, ver), out);
    }
}

/// Address of page `p` of region `r`.
pub fn at(r: &Region, p: u64) -> VAddr {
    r.start() + p * PAGE_SIZE as u64
}

/// Writes page `p` of `r` with version `ver` ([`versioned_page`]).
/// Announces the write to the calling thread's [`watchdog`] slot, if any.
pub fn write_page(mm: &AddressSpace, r: &Region, p: u64, ver: u64) -> usermm::Result<()> {
    let mut b = vec![0u8; PAGE_SIZE];
    versioned_page(p, ver, &mut b);
    watchdog::begin(|| format!("write page {p} version {ver}"));
    mm.write(at(r, p), &b)?;
    watchdog::done();
    Ok(())
}

/// Reads page `p` of `r` and compares it with version `ver`: `Ok(None)` if it
/// matches, `Ok(Some(description))` of the first difference otherwise. Announces
/// the read to the calling thread's [`watchdog`] slot, if any.
pub fn diff_page(
    mm: &AddressSpace,
    r: &Region,
    p: u64,
    ver: u64,
) -> usermm::Result<Option<String>> {
    let mut got = vec![0u8; PAGE_SIZE];
    let mut want = vec![0u8; PAGE_SIZE];
    watchdog::begin(|| format!("read page {p} (expect version {ver})"));
    mm.read(at(r, p), &mut got)?;
    watchdog::done();
    versioned_page(p, ver, &mut want);
    Ok(first_diff(&got, &want))
}

/// Reads page `p` of `r` and compares it with version `ver`; `Ok(false)` on a
/// mismatch.
pub fn check_page(mm: &AddressSpace, r: &Region, p: u64, ver: u64) -> usermm::Result<bool> {
    diff_page(mm, r, p, ver).map(|d| d.is_none())
}

/// Writes `pages` pages (version 1, every 7th page zeroes), then reads them all back
/// in a shuffled order and checks them; asserts that page-out and page-in happened
/// and that no read failed. Every error panics. Announces its steps to the
/// [`watchdog`] of the calling thread (if any).
pub fn verified_workload(vm: &Vm, pages: u64) {
    let mm = vm.new_space();
    let r = mm.map_anon(pages as usize * PAGE_SIZE).unwrap();
    let t0 = Instant::now();
    for p in 0..pages {
        watchdog::begin(|| format!("verified_workload: write page {p} of {pages}"));
        write_page(&mm, &r, p, 1).unwrap_or_else(|e| panic!("write page {p}: {e}"));
        watchdog::done();
    }
    // Zero pages too (WRITE_ZEROES where the server has it).
    for p in (0..pages).step_by(7) {
        watchdog::begin(|| format!("verified_workload: zero page {p}"));
        write_page(&mm, &r, p, 0).unwrap_or_else(|e| panic!("zero page {p}: {e}"));
        watchdog::done();
    }
    let tw = t0.elapsed();
    let t1 = Instant::now();
    let mut order: Vec<u64> = (0..pages).collect();
    let mut rng = Rng::new(0x2545_F491_4F6C_DD1D);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for &p in &order {
        watchdog::begin(|| format!("verified_workload: check page {p}"));
        let ver = if p % 7 == 0 { 0 } else { 1 };
        if let Some(d) = diff_page(&mm, &r, p, ver).unwrap_or_else(|e| panic!("read page {p}: {e}"))
        {
            panic!("page {p} has wrong content: {d}");
        }
        watchdog::done();
    }
    let s = vm.stats();
    println!(
        "  {pages} pages: write {:?}, verify {:?}; pswpout {} pswpin {} write_errors {} read_errors {}",
        tw,
        t1.elapsed(),
        s.pswpout,
        s.pswpin,
        s.write_errors,
        s.read_errors
    );
    assert!(s.pswpout > pages / 2, "too little page-out: {s:?}");
    assert!(s.pswpin > pages / 2, "too little page-in: {s:?}");
    assert_eq!(s.read_errors, 0, "{s:?}");
}

// ------------------------------------------------------------------ stamped words

/// The header word (word 0) of page `p` at version `v`.
#[inline]
pub fn header(p: u64, v: u32) -> u64 {
    p << 32 | u64::from(v)
}

#[inline]
fn stamp_hash(p: u64, w: u64, v: u32) -> u32 {
    mix(p.wrapping_mul(GOLDEN)
        ^ w.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ u64::from(v).wrapping_mul(0x1656_67B1_9E37_79F9)) as u32
}

/// The stamp of word `w` of page `p` written at version `v`.
#[inline]
pub fn stamp(p: u64, w: u64, v: u32) -> u64 {
    u64::from(v) << 32 | u64::from(stamp_hash(p, w, v))
}

/// Whether `got` is a stamp of word `w` of page `p` with a version in `1..=cur`
/// (a word keeps the stamp of the last write that touched it).
#[inline]
pub fn stamp_ok(p: u64, w: u64, cur: u32, got: u64) -> bool {
    let v = (got >> 32) as u32;
    v >= 1 && v <= cur && got as u32 == stamp_hash(p, w, v)
}

/// Page `p` whole at version `v`: the header and every word stamped.
pub fn fill_stamped(buf: &mut [u8], p: u64, v: u32) {
    buf[..8].copy_from_slice(&header(p, v).to_le_bytes());
    for w in 1..WORDS_PER_PAGE {
        let o = w as usize * 8;
        buf[o..o + 8].copy_from_slice(&stamp(p, w, v).to_le_bytes());
    }
}

/// A word that is not what the model says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordMismatch {
    /// Word index in the page (0 is the header).
    pub word: u64,
    /// What was expected, in words.
    pub expected: String,
    /// What was read.
    pub got: u64,
}

/// Checks the header word `got` of page `p` at current version `cur`.
pub fn check_header(p: u64, cur: u32, got: u64) -> Result<(), WordMismatch> {
    if got == header(p, cur) {
        Ok(())
    } else {
        Err(WordMismatch {
            word: 0,
            expected: format!("header {:#018x} (page {p}, version {cur})", header(p, cur)),
            got,
        })
    }
}

/// Checks word `w` (≥ 1) of page `p` read as `got`, at current version `cur`.
pub fn check_stamp(p: u64, w: u64, cur: u32, got: u64) -> Result<(), WordMismatch> {
    if stamp_ok(p, w, cur, got) {
        Ok(())
    } else {
        Err(WordMismatch {
            word: w,
            expected: format!(
                "a stamp of page {p} word {w} with version 1..={cur} \
                 (e.g. {:#018x} for version {cur})",
                stamp(p, w, cur)
            ),
            got,
        })
    }
}

/// Checks a whole page `buf` of page `p` at current version `cur`: the header
/// exactly, every other word a stamp of a version in `1..=cur`.
pub fn check_stamped(buf: &[u8], p: u64, cur: u32) -> Result<(), WordMismatch> {
    let word = |w: u64| {
        let o = w as usize * 8;
        u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"))
    };
    check_header(p, cur, word(0))?;
    (1..WORDS_PER_PAGE).try_for_each(|w| check_stamp(p, w, cur, word(w)))
}

// ------------------------------------------------------------------ generation stamps

/// Where in a page the generation stamp lives.
pub const GEN_OFFSET: u64 = 100;

/// The 16-byte generation stamp of `page` at generation `gen` (`gen` 0 means
/// never written: zeroes).
pub fn gen_stamp(page: u64, gen: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    if gen != 0 {
        b[..8].copy_from_slice(&page.to_le_bytes());
        b[8..].copy_from_slice(&gen.to_le_bytes());
    }
    b
}

fn gen_addr(base: VAddr, page: u64) -> VAddr {
    base + page * PAGE_SIZE as u64 + GEN_OFFSET
}

/// Writes the generation stamp of `page` (of the region at `base`).
/// Announces the write to the calling thread's [`watchdog`] slot, if any.
pub fn write_gen(mm: &AddressSpace, base: VAddr, page: u64, gen: u64) -> Result<(), String> {
    watchdog::begin(|| format!("write generation {gen} to page {page}"));
    mm.write(gen_addr(base, page), &gen_stamp(page, gen))
        .map_err(|e| format!("write of page {page} failed: {e}"))?;
    watchdog::done();
    Ok(())
}

/// Checks that `page` holds generation `gen`; the error names `who`, the page, what
/// it holds and what was expected. Announces the read to the calling thread's
/// [`watchdog`] slot, if any.
pub fn check_gen(
    mm: &AddressSpace,
    base: VAddr,
    page: u64,
    gen: u64,
    who: &str,
) -> Result<(), String> {
    let mut b = [0u8; 16];
    watchdog::begin(|| format!("{who}: read page {page} (expect generation {gen})"));
    mm.read(gen_addr(base, page), &mut b)
        .map_err(|e| format!("{who}: read of page {page} failed: {e}"))?;
    watchdog::done();
    if b == gen_stamp(page, gen) {
        return Ok(());
    }
    Err(format!(
        "{who}: page {page} holds (page {}, generation {}), expected generation {gen}",
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(b[8..].try_into().expect("8 bytes"))
    ))
}

/// Writes generation `gen` to pages `0..pages`.
pub fn fill_gens(mm: &AddressSpace, base: VAddr, pages: u64, gen: u64) -> Result<(), String> {
    (0..pages).try_for_each(|p| write_gen(mm, base, p, gen))
}

/// Checks generation `gen` on pages `0..pages`.
pub fn verify_gens(
    mm: &AddressSpace,
    base: VAddr,
    pages: u64,
    gen: u64,
    who: &str,
) -> Result<(), String> {
    (0..pages).try_for_each(|p| check_gen(mm, base, p, gen, who))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_pages_differ_by_key_and_word() {
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        page_pattern(1, &mut a);
        page_pattern(2, &mut b);
        assert!(first_diff(&a, &b).is_some());
        assert_ne!(a[..8], a[8..16]);
        versioned_page(3, 0, &mut a);
        assert!(a.iter().all(|&x| x == 0));
        versioned_page(3, 1, &mut a);
        versioned_page(3, 2, &mut b);
        assert!(first_diff(&a, &b)
            .unwrap()
            .starts_with("first difference at byte 0"));
    }

    #[test]
    fn stamps_check_page_word_and_version() {
        let s = stamp(7, 3, 5);
        assert!(stamp_ok(7, 3, 5, s));
        assert!(stamp_ok(7, 3, 9, s), "an older version is allowed");
        assert!(!stamp_ok(7, 3, 4, s), "a version from the future is not");
        assert!(!stamp_ok(8, 3, 5, s), "another page's stamp");
        assert!(!stamp_ok(7, 4, 5, s), "another word's stamp");
        assert!(!stamp_ok(7, 3, 5, 0), "zeros");
        assert!(!stamp_ok(7, 3, 5, 0xdead_beef));
        assert_eq!(header(3, 2), 3 << 32 | 2);
    }

    #[test]
    fn stamped_page_is_checkable_and_corruption_is_found() {
        let mut b = vec![0u8; PAGE_SIZE];
        fill_stamped(&mut b, 11, 1);
        assert_eq!(check_stamped(&b, 11, 1), Ok(()));
        assert_eq!(check_stamped(&b, 11, 0).unwrap_err().word, 0);
        b[5 * 8..6 * 8].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
        let e = check_stamped(&b, 11, 1).unwrap_err();
        assert_eq!((e.word, e.got), (5, 0xdead_beef));
    }

    #[test]
    fn gen_stamps() {
        assert_eq!(gen_stamp(4, 0), [0; 16]);
        assert_ne!(gen_stamp(4, 1), gen_stamp(4, 2));
        assert_ne!(gen_stamp(4, 1), gen_stamp(5, 1));
    }
}
