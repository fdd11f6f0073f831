//! File mappings (issue 12): the page cache shared by mappings and `File` handles,
//! `Share::Shared` write-back by the page-I/O threads and `msync`, `Share::Private`
//! copy-on-write, `Share::Atomic` before and after `msync`, and the errors.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use usermm::{Config, Error, Share, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::Rng;

const PS: usize = PAGE_SIZE;

fn vm(dir: &Path, budget: usize) -> Vm {
    let vm = Vm::new(Config::default().memory_budget(budget)).unwrap();
    vm.swapon(SwapSpec::file(dir.join("swap"), 256 << 20))
        .unwrap();
    vm
}

/// A file of `pages` pages (plus `tail` bytes) whose page i holds `stamp(0, i)`.
fn make_file(dir: &Path, name: &str, pages: usize, tail: usize) -> PathBuf {
    let p = dir.join(name);
    let mut data = Vec::with_capacity(pages * PS + tail);
    for i in 0..pages {
        data.extend_from_slice(&page(0, i as u64));
    }
    data.extend(std::iter::repeat_n(0xEE, tail));
    std::fs::write(&p, &data).unwrap();
    p
}

/// Page `i`'s bytes at version `ver`: the page number and version in its first
/// 16 bytes, then a pattern of both.
fn page(ver: u64, i: u64) -> Vec<u8> {
    let mut b = vec![0u8; PS];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b[8..16].copy_from_slice(&ver.to_le_bytes());
    for (k, x) in b[16..].iter_mut().enumerate() {
        *x = (k as u64 ^ i.wrapping_mul(31) ^ ver.wrapping_mul(131)) as u8;
    }
    b
}

fn file_page(p: &Path, i: u64) -> Vec<u8> {
    let f = std::fs::File::open(p).unwrap();
    let mut b = vec![0u8; PS];
    f.read_exact_at(&mut b, i * PS as u64).unwrap();
    b
}

#[test]
fn shared_mapping_reads_the_file_and_msync_writes_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm(dir.path(), 4 << 20);
    let p = make_file(dir.path(), "data", 64, 0);
    let mm = vm.new_space();
    let r = mm.map_file(&p, Share::Shared).unwrap();
    assert_eq!(r.len(), 64 * PS as u64);
    let mut b = vec![0u8; PS];
    mm.read(r.start() + 5 * PS as u64, &mut b).unwrap();
    assert_eq!(b, page(0, 5));
    mm.write(r.start() + 7 * PS as u64, &page(1, 7)).unwrap();
    // Not on disk before msync (nothing forced it out: the budget is ample).
    assert_eq!(file_page(&p, 7), page(0, 7));
    mm.msync(&r).unwrap();
    assert_eq!(file_page(&p, 7), page(1, 7));
    // A File handle sees the mapping's bytes, and the mapping sees its writes.
    let f = vm.open(&p).unwrap();
    assert_eq!(f.len(), 64 * PS as u64);
    f.read_at(&mut b, 7 * PS as u64).unwrap();
    assert_eq!(b, page(1, 7));
    f.write_at(b"hello", 9 * PS as u64 + 10).unwrap();
    let mut h = [0u8; 5];
    mm.read(r.start() + 9 * PS as u64 + 10, &mut h).unwrap();
    assert_eq!(&h, b"hello");
    // A second mapping of the same file (another space) shares the cache.
    let mm2 = vm.new_space();
    let r2 = mm2.map_file(&p, Share::Shared).unwrap();
    mm2.read(r2.start() + 9 * PS as u64 + 10, &mut h).unwrap();
    assert_eq!(&h, b"hello");
    f.sync().unwrap();
    assert_eq!(&file_page(&p, 9)[10..15], b"hello");
    assert!(vm.stats().fileout >= 2, "{:?}", vm.stats());
}

#[test]
fn shared_pages_are_written_back_under_pressure_and_stay_within_budget() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB budget (256 frames), a 16 MiB file (4096 pages): 1/16.
    let vm = vm(dir.path(), 1 << 20);
    let n = 4096u64;
    let p = make_file(dir.path(), "big", n as usize, 0);
    let mm = vm.new_space();
    let r = mm.map_file(&p, Share::Shared).unwrap();
    for i in 0..n {
        mm.write(r.start() + i * PS as u64, &page(2, i)).unwrap();
    }
    let s = vm.stats();
    assert!(
        s.fileout > n / 2,
        "the page-I/O threads should have written most pages back: {s:?}"
    );
    // No file page goes to swap: no slot is in use on any device. (Not
    // `pswpout == fileout`: a file page-out bumps the two counters one after
    // the other while this snapshot is taken, so they may differ by one.)
    assert!(
        s.swap_used.iter().all(|&(_, used)| used == 0),
        "no file page goes to swap: {s:?}"
    );
    mm.msync(&r).unwrap();
    for i in (0..n).step_by(97) {
        assert_eq!(file_page(&p, i), page(2, i), "page {i}");
    }
    // And everything reads back through the mapping.
    let mut b = vec![0u8; PS];
    for i in 0..n {
        mm.read(r.start() + i * PS as u64, &mut b).unwrap();
        assert_eq!(b, page(2, i), "page {i}");
    }
}

#[test]
fn private_mapping_is_copy_on_write_and_never_reaches_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm(dir.path(), 1 << 20);
    let n = 1024u64;
    let p = make_file(dir.path(), "priv", n as usize, 0);
    let mm = vm.new_space();
    let r = mm.map_file(&p, Share::Private).unwrap();
    let shared = mm.map_file(&p, Share::Shared).unwrap();
    for i in (0..n).step_by(2) {
        mm.write(r.start() + i * PS as u64, &page(3, i)).unwrap();
    }
    mm.msync(&r).unwrap();
    let mut b = vec![0u8; PS];
    for i in 0..n {
        mm.read(r.start() + i * PS as u64, &mut b).unwrap();
        let want = if i % 2 == 0 { page(3, i) } else { page(0, i) };
        assert_eq!(b, want, "private page {i}");
        mm.read(shared.start() + i * PS as u64, &mut b).unwrap();
        assert_eq!(b, page(0, i), "shared page {i} saw a private write");
    }
    assert!(
        vm.stats().pswpout > 0,
        "private pages go to swap under pressure"
    );
    drop((mm, r, shared));
    for i in (0..n).step_by(31) {
        assert_eq!(file_page(&p, i), page(0, i));
    }
}

#[test]
fn atomic_mapping_touches_the_file_only_at_msync() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm(dir.path(), 1 << 20);
    let n = 512u64;
    let p = make_file(dir.path(), "atomic", n as usize, 100);
    let mm = vm.new_space();
    let r = mm.map_file(&p, Share::Atomic).unwrap();
    let journal = dir.path().join("atomic.usermm-journal");
    assert!(journal.exists());
    for i in 0..n {
        mm.write(r.start() + i * PS as u64, &page(4, i)).unwrap();
    }
    // Under pressure (512 pages in 256 frames) the dirty pages went to swap, not
    // to the file.
    for i in (0..n).step_by(13) {
        assert_eq!(
            file_page(&p, i),
            page(0, i),
            "page {i} reached the file early"
        );
    }
    mm.msync(&r).unwrap();
    for i in 0..n {
        assert_eq!(file_page(&p, i), page(4, i), "page {i}");
    }
    // The journal is emptied in place: its first header zeroed, its size kept.
    let jb = std::fs::read(&journal).unwrap();
    assert!(
        jb.len() >= 64 && jb[..64].iter().all(|&b| b == 0),
        "journal not emptied"
    );
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        n * PS as u64 + 100,
        "the file's length did not change"
    );
    // The private copies were dropped: a File write shows through the mapping.
    let f = vm.open(&p).unwrap();
    f.write_at(b"after", 3 * PS as u64).unwrap();
    let mut h = [0u8; 5];
    mm.read(r.start() + 3 * PS as u64, &mut h).unwrap();
    assert_eq!(&h, b"after");
    // A second msync with nothing dirtied writes nothing.
    let before = std::fs::read(&p).unwrap();
    mm.msync(&r).unwrap();
    f.sync().unwrap();
    let mut after = std::fs::read(&p).unwrap();
    after[3 * PS..3 * PS + 5].copy_from_slice(&before[3 * PS..3 * PS + 5]);
    assert_eq!(before, after);
}

#[test]
fn errors_are_clear_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm(dir.path(), 1 << 20);
    let mm = vm.new_space();
    let missing = dir.path().join("missing");
    match mm.map_file(&missing, Share::Shared) {
        Err(Error::Io(e)) => assert!(e.to_string().contains("missing"), "{e}"),
        other => panic!("{other:?}"),
    }
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        mm.map_file(&empty, Share::Shared),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        mm.map_file(dir.path(), Share::Private),
        Err(Error::Io(_) | Error::InvalidArgument(_))
    ));
    // A file of 2 pages and 10 bytes: 3 pages mapped; a 4th page is not.
    let p = make_file(dir.path(), "short", 2, 10);
    let r = mm.map_file(&p, Share::Shared).unwrap();
    assert_eq!(r.len(), 3 * PS as u64);
    let mut b = [0u8; 16];
    mm.read(r.start() + 2 * PS as u64, &mut b).unwrap();
    assert_eq!(&b[..10], &[0xEE; 10]);
    assert_eq!(&b[10..], &[0; 6], "past the end of the file reads zeros");
    let end = r.start() + 3 * PS as u64;
    assert!(matches!(
        mm.read(end, &mut b),
        Err(Error::BadAddress { .. })
    ));
    // Bytes written past the end of the file stay out of it.
    mm.write(r.start() + 2 * PS as u64 + 10, b"XXXX").unwrap();
    mm.msync(&r).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 * PS as u64 + 10);
    // msync of an anonymous region is refused.
    let a = mm.map_anon(PS).unwrap();
    assert!(matches!(mm.msync(&a), Err(Error::InvalidArgument(_))));
    // Truncated under the mapping by someone else: a clear error, then fine again.
    let t = make_file(dir.path(), "trunc", 8, 0);
    let rt = mm.map_file(&t, Share::Shared).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&t)
        .unwrap()
        .set_len(PS as u64)
        .unwrap();
    match mm.read(rt.start() + 5 * PS as u64, &mut b) {
        Err(Error::Io(e)) => assert!(e.to_string().contains("truncated"), "{e}"),
        other => panic!("{other:?}"),
    }
    mm.read(rt.start(), &mut b).unwrap();
    assert_eq!(&b[..8], &0u64.to_le_bytes());
}

#[test]
fn file_guards_pin_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm(dir.path(), 1 << 20);
    let p = make_file(dir.path(), "guards", 4, 0);
    let mm = vm.new_space();
    let r = mm.map_file(&p, Share::Shared).unwrap();
    let r2 = mm.map_file(&p, Share::Shared).unwrap();
    {
        let mut g = mm.page_mut(r.start() + PS as u64).unwrap();
        g[100] = 42;
        // The same file page through the other mapping would wait for this guard.
        let mut b = [0u8; 1];
        assert!(matches!(
            mm.read(r2.start() + PS as u64 + 100, &mut b),
            Err(Error::WouldDeadlock(_))
        ));
        let f = vm.open(&p).unwrap();
        assert!(matches!(
            f.write_at(b"x", PS as u64),
            Err(Error::WouldDeadlock(_))
        ));
    }
    let g = mm.page(r2.start() + PS as u64).unwrap();
    assert_eq!(g[100], 42);
    drop(g);
    mm.msync(&r).unwrap();
    assert_eq!(file_page(&p, 1)[100], 42);
}

/// The must-show differential test: Shared and Private mappings of several files,
/// several threads, a budget of 1/8 of the data; every read is checked against a
/// model, and at the end the files' bytes after `msync` against the model of the
/// shared side.
#[test]
fn differential_shared_and_private_under_pressure() {
    let seed = common::seed(0x5eed_f11e);
    let dir = tempfile::tempdir().unwrap();
    let files = 4usize;
    let pages = 512usize; // 2 MiB a file, 8 MiB in all; budget 1 MiB
    let vm = vm(dir.path(), 1 << 20);
    let paths: Vec<PathBuf> = (0..files)
        .map(|k| make_file(dir.path(), &format!("f{k}"), pages, 0))
        .collect();
    std::thread::scope(|s| {
        for (t, path) in paths.iter().enumerate() {
            let vm = vm.clone();
            s.spawn(move || {
                let mut rng = Rng::for_thread(seed, t as u64);
                let mm = vm.new_space();
                let sh = mm.map_file(path, Share::Shared).unwrap();
                let pr = mm.map_file(path, Share::Private).unwrap();
                let file = vm.open(path).unwrap();
                // The file as the shared side and the private side see it.
                let mut shared: Vec<Vec<u8>> = (0..pages as u64).map(|i| page(0, i)).collect();
                let mut private: Vec<Option<Vec<u8>>> = vec![None; pages];
                let deadline = std::time::Instant::now() + Duration::from_secs(3);
                let mut ops = 0u64;
                let mut buf = vec![0u8; PS];
                while std::time::Instant::now() < deadline || ops < 2000 {
                    ops += 1;
                    let i = rng.below(pages as u64) as usize;
                    let off = rng.below(PS as u64 - 64) as usize;
                    let len = 1 + rng.below(64) as usize;
                    let val = rng.next_u64().to_le_bytes();
                    let bytes: Vec<u8> = (0..len).map(|k| val[k % 8]).collect();
                    let at = i as u64 * PS as u64 + off as u64;
                    match rng.below(6) {
                        0 => {
                            mm.write(sh.start() + at, &bytes).unwrap();
                            shared[i][off..off + len].copy_from_slice(&bytes);
                        }
                        1 => {
                            file.write_at(&bytes, at).unwrap();
                            shared[i][off..off + len].copy_from_slice(&bytes);
                        }
                        2 => {
                            mm.write(pr.start() + at, &bytes).unwrap();
                            let p = private[i].get_or_insert_with(|| shared[i].clone());
                            p[off..off + len].copy_from_slice(&bytes);
                        }
                        3 => {
                            mm.read(sh.start() + i as u64 * PS as u64, &mut buf)
                                .unwrap();
                            assert_eq!(buf, shared[i], "shared page {i} of file {t}, op {ops}");
                        }
                        4 => {
                            mm.read(pr.start() + i as u64 * PS as u64, &mut buf)
                                .unwrap();
                            let want = private[i].as_ref().unwrap_or(&shared[i]);
                            assert_eq!(&buf, want, "private page {i} of file {t}, op {ops}");
                        }
                        _ => {
                            file.read_at(&mut buf, i as u64 * PS as u64).unwrap();
                            assert_eq!(buf, shared[i], "read_at page {i} of file {t}, op {ops}");
                        }
                    }
                    if ops.is_multiple_of(1000) {
                        mm.msync(&sh).unwrap();
                    }
                }
                mm.msync(&sh).unwrap();
                let disk = std::fs::read(path).unwrap();
                for (i, want) in shared.iter().enumerate() {
                    assert_eq!(
                        &disk[i * PS..(i + 1) * PS],
                        &want[..],
                        "file {t} page {i} on disk"
                    );
                }
                for i in 0..pages {
                    mm.read(pr.start() + i as u64 * PS as u64, &mut buf)
                        .unwrap();
                    assert_eq!(
                        &buf,
                        private[i].as_ref().unwrap_or(&shared[i]),
                        "final private {i}"
                    );
                }
            });
        }
    });
    let s = vm.stats();
    assert!(
        s.fileout > 0 && s.filein > 0 && s.pswpout > s.fileout,
        "{s:?}"
    );
}

/// Small Atomic commits cost one sync: their pages reach the file at `msync` (and
/// read back from it), but stay in the journal, unflushed, until the file is
/// synced (`File::sync`) or its last mapping goes; then the journal is emptied.
#[test]
fn small_atomic_commits_stay_in_the_journal_until_the_file_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm(dir.path(), 1 << 20);
    let p = make_file(dir.path(), "small", 16, 0);
    let journal = dir.path().join("small.usermm-journal");
    let held = |j: &Path| std::fs::read(j).unwrap()[..64].iter().any(|&b| b != 0);
    let mm = vm.new_space();
    let r = mm.map_file(&p, Share::Atomic).unwrap();
    // The journal's working size, written once at the first Atomic mapping.
    let jlen = std::fs::metadata(&journal).unwrap().len();
    assert!(jlen >= 1 << 20, "journal of {jlen} bytes");
    assert!(!held(&journal));
    for v in 1..=3u64 {
        mm.write(r.start() + v * PS as u64, &page(v, v)).unwrap();
        mm.msync(&r).unwrap();
        assert_eq!(file_page(&p, v), page(v, v), "commit {v} is in the file");
        assert!(held(&journal), "commit {v} stays in the journal");
    }
    assert_eq!(
        std::fs::metadata(&journal).unwrap().len(),
        jlen,
        "no growth"
    );
    // `File::sync` flushes the run: the file synced, then the journal emptied.
    let f = vm.open(&p).unwrap();
    f.sync().unwrap();
    assert!(!held(&journal), "File::sync flushes the journal");
    // Another commit, then teardown flushes it too.
    mm.write(r.start(), &page(4, 0)).unwrap();
    mm.msync(&r).unwrap();
    assert!(held(&journal));
    drop((f, r, mm, vm));
    assert!(!held(&journal), "the file's teardown flushes the journal");
    let want: Vec<Vec<u8>> = (0..16)
        .map(|i| match i {
            0 => page(4, 0),
            1..=3 => page(i, i),
            _ => page(0, i),
        })
        .collect();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&file_page(&p, i as u64), w, "page {i}");
    }
}

/// The version stamped in a page by `page` (for short failure messages).
fn ver(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[8..16].try_into().unwrap())
}

/// An Atomic commit of pages whose cached copies a reader pins (shared guards
/// through a Shared mapping, held across the `msync`), then partial writes of them
/// (through the Shared mapping, and `File::write_at`) once the guards are gone:
/// the commit must not be lost to the copies' pre-commit bytes.
#[test]
fn atomic_commit_is_not_lost_to_a_pinned_cached_page() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm(dir.path(), 4 << 20);
    let p = make_file(dir.path(), "pinned", 4, 0);
    let mm = vm.new_space();
    let shared = mm.map_file(&p, Share::Shared).unwrap();
    let atomic = mm.map_file(&p, Share::Atomic).unwrap();
    let at = |r: &usermm::Region, pg: u64, off: u64| r.start() + pg * PS as u64 + off;
    mm.write(at(&atomic, 1, 0), &page(7, 1)).unwrap();
    mm.write(at(&atomic, 2, 0), &page(7, 2)).unwrap();
    let g1 = mm.page(at(&shared, 1, 0)).unwrap();
    let g2 = mm.page(at(&shared, 2, 0)).unwrap();
    assert_eq!(ver(&g1), 0);
    mm.msync(&atomic).unwrap();
    // Nobody writes under a guard: they still show what they pinned.
    assert_eq!((ver(&g1), ver(&g2)), (0, 0), "a guard's bytes changed");
    drop((g1, g2));
    mm.write(at(&shared, 1, 100), b"shared").unwrap();
    let f = vm.open(&p).unwrap();
    f.write_at(b"handle", 2 * PS as u64 + 200).unwrap();
    f.sync().unwrap();
    let mut want1 = page(7, 1);
    want1[100..106].copy_from_slice(b"shared");
    let mut want2 = page(7, 2);
    want2[200..206].copy_from_slice(b"handle");
    let (got1, got2) = (file_page(&p, 1), file_page(&p, 2));
    assert!(
        got1 == want1,
        "page 1 is version {}: the commit was lost",
        ver(&got1)
    );
    assert!(
        got2 == want2,
        "page 2 is version {}: the commit was lost",
        ver(&got2)
    );
    drop((f, shared, atomic, mm, vm));
    assert!(file_page(&p, 1) == want1, "page 1 after teardown");
    assert!(file_page(&p, 2) == want2, "page 2 after teardown");
}

/// After an Atomic commit of a page whose cached copy a reader still pins, every
/// other read shows the commit (the Atomic mapping, a `File`, a new guard once the
/// reader's is gone) while the reader's guard keeps its bytes.
#[test]
fn atomic_commit_is_what_others_read_while_a_reader_pins_the_old_copy() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm(dir.path(), 4 << 20);
    let p = make_file(dir.path(), "view", 4, 0);
    let mm = vm.new_space();
    let shared = mm.map_file(&p, Share::Shared).unwrap();
    let atomic = mm.map_file(&p, Share::Atomic).unwrap();
    let at = |r: &usermm::Region, pg: u64| r.start() + pg * PS as u64;
    mm.write(at(&atomic, 1), &page(7, 1)).unwrap();
    let g = mm.page(at(&shared, 1)).unwrap();
    mm.msync(&atomic).unwrap();
    let mut b = vec![0u8; PS];
    mm.read(at(&atomic, 1), &mut b).unwrap();
    assert!(
        b == page(7, 1),
        "the Atomic mapping reads version {}",
        ver(&b)
    );
    mm.read(at(&shared, 1), &mut b).unwrap();
    assert!(
        b == page(7, 1),
        "the Shared mapping reads version {}",
        ver(&b)
    );
    let f = vm.open(&p).unwrap();
    f.read_at(&mut b, PS as u64).unwrap();
    assert!(b == page(7, 1), "a File reads version {}", ver(&b));
    assert!(
        g[..] == page(0, 1)[..],
        "the guard's bytes changed under it"
    );
    drop(g);
    let g = mm.page(at(&shared, 1)).unwrap();
    assert!(
        g[..] == page(7, 1)[..],
        "a new guard shows version {}",
        ver(&g)
    );
}

/// A thread holding a mutable guard in one Atomic mapping calls `msync` of another
/// Atomic mapping of the same file while a commit of the first waits for that guard
/// (holding the file's commit lock): it gets `WouldDeadlock` instead of waiting for
/// ever; once the guard goes, the first commit lands, and the second succeeds.
#[test]
fn msync_while_a_commit_waits_for_this_threads_guard_is_refused() {
    usermm_testkit::watchdog::watched("cross_mapping_msync", Duration::from_secs(30), |_| {
        let dir = tempfile::tempdir().unwrap();
        let vm = vm(dir.path(), 4 << 20);
        let p = make_file(dir.path(), "cross", 4, 0);
        let mm = vm.new_space();
        let a = mm.map_file(&p, Share::Atomic).unwrap();
        let b = mm.map_file(&p, Share::Atomic).unwrap();
        mm.write(b.start() + 2 * PS as u64, &page(7, 2)).unwrap();
        std::thread::scope(|s| {
            let mut g = mm.page_mut(a.start() + PS as u64).unwrap();
            g.copy_from_slice(&page(5, 1));
            let committer = s.spawn(|| mm.msync(&a));
            // The commit of `a` takes the lock and waits for the guard meanwhile.
            std::thread::sleep(Duration::from_millis(500));
            let r = mm.msync(&b);
            assert!(
                matches!(r, Err(Error::WouldDeadlock(_))),
                "msync of the other mapping: {r:?}"
            );
            drop(g);
            committer.join().unwrap().unwrap();
        });
        assert_eq!(file_page(&p, 1), page(5, 1), "the first commit");
        mm.msync(&b).unwrap();
        assert_eq!(file_page(&p, 2), page(7, 2), "the second commit");
    });
}
