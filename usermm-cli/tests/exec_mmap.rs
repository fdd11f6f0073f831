//! `usermm exec` with programs that map their own anonymous memory: `mmap`,
//! `munmap` and `mremap` served from the budgeted heap (see usermm-preload's module
//! header, "mmap"). A C program that maps, unmaps, remaps and verifies 256 MiB
//! under a 32 MiB budget, and CPython building ~512 MiB of small objects (its
//! object arenas are mmap'd) under 64 MiB: the same output as without usermm, and
//! anonymous memory bounded by the budget.

mod common;
use common::{run_sampled, USERMM};

use std::process::Command;
use std::time::{Duration, Instant};

const PYTHON: &str = "/usr/bin/python3";

/// The `pswpout` count of `usermm exec --stats`'s line (the last one: the
/// program's own process).
fn pswpout(stderr: &str) -> Option<u64> {
    stderr
        .lines()
        .rfind(|l| l.starts_with("usermm exec: pid "))?
        .split(", ")
        .find_map(|f| f.strip_prefix("pswpout "))?
        .parse()
        .ok()
}

const MMAP_TEST_C: &str = r#"/* mmap/munmap/mremap under usermm exec: 256 MiB in 4 MiB chunks, parts unmapped,
   grown and shrunk, space mapped again; every byte checked. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define CH (4u << 20)
#define N 64
#define PG 4096u

static uint64_t val(unsigned c, size_t i) {
    uint64_t x = ((uint64_t)c << 40) ^ ((uint64_t)i * 0x9E3779B97F4A7C15ull);
    return x ^ (x >> 29);
}
static int fails;
static void fill(unsigned c, unsigned char *p, size_t from, size_t to) {
    for (size_t i = from / 8; i < to / 8; i++) ((uint64_t *)p)[i] = val(c, i);
}
static uint64_t check(const char *what, unsigned c, unsigned char *p, size_t from, size_t to) {
    uint64_t sum = 0;
    for (size_t i = from / 8; i < to / 8; i++) {
        uint64_t v = ((uint64_t *)p)[i];
        if (v != val(c, i)) {
            if (fails++ < 5) printf("MISMATCH %s chunk %u word %zu\n", what, c, i);
        }
        sum += v * (i | 1);
    }
    return sum;
}
static void zero(const char *what, unsigned char *p, size_t len) {
    for (size_t i = 0; i < len / 8; i++)
        if (((uint64_t *)p)[i] != 0) {
            if (fails++ < 5) printf("NOT ZERO %s word %zu\n", what, i);
            return;
        }
}
static void *map(size_t len) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(3); }
    return p;
}

int main(void) {
    unsigned char *c[N];
    size_t len[N];
    for (unsigned i = 0; i < N; i++) {
        c[i] = map(CH);
        len[i] = CH;
        if ((uintptr_t)c[i] % PG) { printf("unaligned\n"); return 4; }
        zero("fresh", c[i], CH);
        fill(i, c[i], 0, CH);
    }
    /* munmap: the second half of some, a hole in others, all of a few. */
    for (unsigned i = 0; i < N; i++) {
        if (i % 4 == 1) { if (munmap(c[i] + CH / 2, CH / 2)) return 5; len[i] = CH / 2; }
        if (i % 8 == 2) { if (munmap(c[i] + PG * 100, PG * 50)) return 5; }
        if (i % 8 == 3) { if (munmap(c[i], CH)) return 5; c[i] = NULL; len[i] = 0; }
    }
    /* mremap: grow with MREMAP_MAYMOVE (new part zero), shrink, and grow back into
       an unmapped tail without moving. */
    for (unsigned i = 0; i < N; i++) {
        if (i % 4 == 0) {
            unsigned char *q = mremap(c[i], CH, CH + CH / 2, MREMAP_MAYMOVE);
            if (q == MAP_FAILED) { perror("mremap grow"); return 6; }
            c[i] = q;
            len[i] = CH + CH / 2;
            zero("grown", q + CH, CH / 2);
            fill(i, q, CH, len[i]);
        } else if (i % 4 == 1) {
            unsigned char *q = mremap(c[i], CH / 2, CH / 4, 0);
            if (q != c[i]) { perror("mremap shrink"); return 7; }
            len[i] = CH / 4;
            /* The tail just cut is unmapped: growing back in place gives zeros. */
            q = mremap(c[i], CH / 4, CH / 2, 0);
            if (q == MAP_FAILED) {
                if (errno != ENOMEM) { perror("mremap in place"); return 8; }
            } else {
                if (q != c[i]) { printf("moved without MAYMOVE\n"); return 8; }
                zero("regrown", q + CH / 4, CH / 4);
                fill(i, q, CH / 4, CH / 2);
                len[i] = CH / 2;
            }
        }
    }
    /* Map again (reusing space that held data, some of it on swap): zeros. */
    unsigned char *again[16];
    for (unsigned k = 0; k < 16; k++) {
        again[k] = map(CH / 2);
        zero("remapped", again[k], CH / 2);
        fill(1000 + k, again[k], 0, CH / 2);
    }
    uint64_t sum = 0;
    for (unsigned i = 0; i < N; i++) {
        if (!c[i]) continue;
        if (i % 8 == 2) {
            sum += check("head", i, c[i], 0, PG * 100);
            sum += check("tail", i, c[i], PG * 150, len[i]);
        } else {
            sum += check("chunk", i, c[i], 0, len[i]);
        }
    }
    for (unsigned k = 0; k < 16; k++) sum += check("again", 1000 + k, again[k], 0, CH / 2);
    for (unsigned i = 0; i < N; i++)
        if (c[i] && munmap(c[i], len[i])) return 9;
    /* munmap of a range not ours still works; EINVAL for a misaligned address. */
    void *k = map(PG);
    if (munmap((char *)k + 1, PG) == 0 || errno != EINVAL) { printf("misaligned munmap accepted\n"); return 10; }
    printf("%s sum %016llx\n", fails ? "FAILED" : "ok", (unsigned long long)sum);
    return fails ? 1 : 0;
}
"#;

fn cc() -> bool {
    Command::new("cc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The C program: 64 chunks of 4 MiB mapped (each checked zero, then filled),
/// parts munmapped (halves, holes, whole chunks), chunks grown with
/// `MREMAP_MAYMOVE` (the new part zero), shrunk and grown back in place without
/// it, 8 MiB mapped again over reused space (zero), every live byte verified.
/// Under a 32 MiB budget: the same output as natively, exit 0, swap-outs counted,
/// and peak RssAnon within budget + 48 MiB (natively it is far above that).
#[test]
fn c_program_maps_unmaps_and_remaps_256m_under_32m() {
    if !common::can_run("usermm exec mmap test", "cc", cc()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("mmap_test.c");
    let bin = dir.path().join("mmap_test");
    std::fs::write(&src, MMAP_TEST_C).unwrap();
    let out = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let limit_kib = (32 + 48) << 10;

    let (native, nerr, nstatus, npeak) = run_sampled(Command::new(&bin), Duration::from_secs(60));
    assert_eq!(nstatus, 0, "native run: {native}{nerr}");
    assert!(native.starts_with("ok sum "), "native run: {native}");
    // The bound means something: without usermm the program holds far more.
    assert!(npeak > limit_kib, "native peak RssAnon only {npeak} KiB");

    let mut cmd = Command::new(USERMM);
    cmd.args(["exec", "--budget", "32M", "--stats", "--"])
        .arg(&bin);
    let t = Instant::now();
    let (out, err, status, peak) = run_sampled(cmd, Duration::from_secs(90));
    eprintln!(
        "usermm exec: {:?}, peak RssAnon {} MiB (native {} MiB)",
        t.elapsed(),
        peak >> 10,
        npeak >> 10
    );
    assert_eq!(status, 0, "stdout: {out}\nstderr: {err}");
    assert_eq!(out, native, "stderr: {err}");
    let outs = pswpout(&err).unwrap_or_else(|| panic!("no stats line: {err}"));
    assert!(outs > 0, "nothing was swapped out: {err}");
    assert!(
        peak <= limit_kib,
        "peak RssAnon {peak} KiB exceeds {limit_kib} KiB"
    );
}

/// CPython's small objects live in 1 MiB arenas it gets from mmap: before mmap was
/// interposed they escaped the budget. ~512 MiB of tuples, ints and floats under a
/// 64 MiB budget: the same checksum as without usermm, and peak RssAnon within
/// budget + 48 MiB (natively ~500 MiB). `os._exit` skips freeing every object at
/// exit (another pass over swap that proves nothing more).
#[test]
fn python_small_objects_512m_under_64m() {
    let have = std::path::Path::new(PYTHON).exists();
    if !common::can_run("usermm exec mmap test", PYTHON, have) {
        return;
    }
    let prog = "
import os, sys
l = [(i, i * 7919 % 1000003, float(i)) for i in range(3_000_000)]
s = 0
for a, b, c in l:
    s = (s * 31 + a + b + int(c)) % (1 << 61)
print(len(l), s)
sys.stdout.flush()
os._exit(0)
";
    let limit_kib = (64 + 48) << 10;
    let mut native = Command::new(PYTHON);
    native.args(["-c", prog]);
    let (nout, nerr, nstatus, npeak) = run_sampled(native, Duration::from_secs(60));
    assert_eq!(nstatus, 0, "native: {nerr}");
    assert!(npeak > limit_kib, "native peak RssAnon only {npeak} KiB");

    // `os._exit` skips the `--stats` line (an atexit handler): what went to swap is
    // read from the swap file instead (sparse: its allocated blocks were written).
    let dir = tempfile::Builder::new()
        .prefix("usermm-exec-mmap")
        .tempdir_in("/var/tmp")
        .unwrap();
    let swap = dir.path().join("swap");
    let spec = format!("file:{}?size=2G&sparse=1", swap.display());
    let mut cmd = Command::new(USERMM);
    cmd.args([
        "exec", "--budget", "64M", "--swap", &spec, "--", PYTHON, "-c", prog,
    ]);
    let t = Instant::now();
    let (out, err, status, peak) = run_sampled(cmd, Duration::from_secs(90));
    eprintln!(
        "usermm exec: {:?}, peak RssAnon {} MiB (native {} MiB)",
        t.elapsed(),
        peak >> 10,
        npeak >> 10
    );
    assert_eq!(status, 0, "stderr: {err}");
    assert_eq!(out, nout, "stderr: {err}");
    let written = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&swap).unwrap().blocks() * 512
    };
    assert!(
        written >= 256 << 20,
        "only {} MiB went to swap: were the arenas in the budget? {err}",
        written >> 20
    );
    assert!(
        peak <= limit_kib,
        "peak RssAnon {peak} KiB exceeds {limit_kib} KiB"
    );
}
