//! Crash test of failure-atomic `msync` (issue 12): a child process loops — dirty
//! random pages of a `Share::Atomic` mapping with a version stamp, `msync` — and is
//! killed with SIGKILL at random moments. After each kill the file is mapped again
//! (which recovers its journal) and must be exactly one committed version: the
//! state after some commit k (replayed from the same seeded choices), never a mix.
//!
//! `USERMM_CRASH_KILLS` (default 1000) and `USERMM_CRASH_SECS` (default 30) bound
//! the run: it stops at whichever comes first. The number of kills, and how many
//! landed inside a commit (the version moved by less than the child's progress
//! would suggest is not checked: every outcome is checked the same way), are printed.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use usermm::{Config, Share, SwapSpec, Vm, PAGE_SIZE};
use usermm_testkit::workload::Rng;

const PS: usize = PAGE_SIZE;
const PAGES: u64 = 64;
const ENV: &str = "USERMM_CRASH_CHILD";

/// Page `i` as version `ver` writes it: stamp (page, version), then a pattern.
fn page(ver: u64, i: u64) -> Vec<u8> {
    let mut b = vec![0u8; PS];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b[8..16].copy_from_slice(&ver.to_le_bytes());
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ver;
    for w in b[16..].chunks_mut(8) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    b
}

/// The pages version `ver` of a run with `seed` dirties (1 to 24 of them).
fn touched(seed: u64, ver: u64) -> Vec<u64> {
    let mut r = Rng::new(seed ^ ver.wrapping_mul(0xd6e8_feb8_6659_fd93));
    let n = 1 + r.below(24);
    (0..n).map(|_| r.below(PAGES)).collect()
}

/// The child: commits versions `from + 1, from + 2, …` until killed.
#[test]
fn child_entry() {
    let Ok(arg) = std::env::var(ENV) else { return };
    let mut it = arg.split(',');
    let path = it.next().unwrap().to_string();
    let seed: u64 = it.next().unwrap().parse().unwrap();
    let from: u64 = it.next().unwrap().parse().unwrap();
    let dir = Path::new(&path).parent().unwrap().to_path_buf();
    // A budget of 32 frames for 64 pages: commits read pages back from swap.
    let vm = Vm::new(Config::default().memory_budget(128 << 10)).unwrap();
    vm.swapon(SwapSpec::file(
        dir.join(format!("swap-{}", std::process::id())),
        16 << 20,
    ))
    .unwrap();
    let mm = vm.new_space();
    let r = mm.map_file(&path, Share::Atomic).unwrap();
    println!("usermm-child-ready");
    let mut ver = from;
    loop {
        ver += 1;
        for i in touched(seed, ver) {
            mm.write(r.start() + i * PS as u64, &page(ver, i)).unwrap();
        }
        mm.msync(&r).unwrap();
    }
}

#[test]
fn sigkill_during_atomic_msync_leaves_one_committed_version() {
    let kills: u64 = std::env::var("USERMM_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let secs: u64 = std::env::var("USERMM_CRASH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let seed = common::seed(0xc0ffee);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("atomic.dat");
    let mut init = Vec::new();
    for i in 0..PAGES {
        init.extend_from_slice(&page(0, i));
    }
    std::fs::write(&path, &init).unwrap();
    // The model: the version of each page after each commit is replayed from
    // `touched`; `state` is the committed state the file was last seen in.
    let mut state = vec![0u64; PAGES as usize];
    let mut base = 0u64;
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let exe = std::env::current_exe().unwrap();
    let (mut done, mut moved, mut torn_logs, mut replayed) = (0u64, 0u64, 0u64, 0u64);
    let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
    while done < kills && start.elapsed() < Duration::from_secs(secs) {
        let round_seed = rng.next_u64();
        let mut child = Command::new(&exe)
            .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env(ENV, format!("{},{round_seed},{base}", path.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let n = out.read_line(&mut line).unwrap();
            assert!(n > 0, "child exited before it mapped the file");
            if line.contains("usermm-child-ready") {
                break;
            }
        }
        std::thread::sleep(Duration::from_micros(rng.below(20_000)));
        // SAFETY: kill(2) of the child we spawned, by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let st = child.wait().unwrap();
        assert!(!st.success(), "the child cannot end on its own");
        let _ = std::fs::remove_file(dir.path().join(format!("swap-{}", child.id())));
        done += 1;
        // The journal keeps its size (emptied in place: its first header zeroed);
        // one whose first header is not zeros holds a transaction, whole or torn.
        let jbytes =
            std::fs::read(dir.path().join("atomic.dat.usermm-journal")).unwrap_or_default();
        let jlen = jbytes.len();
        let held = jbytes.iter().take(64).any(|&b| b != 0);
        if held {
            torn_logs += 1;
        }
        // Every other round recovers with `usermm::fsck` first (what `usermm fsck
        // PATH` runs); the others let mapping the file again recover it.
        if done % 2 == 0 {
            let rep = usermm::fsck(&path).unwrap();
            assert!(rep.journal, "round {done}: the journal is gone: {rep:?}");
            assert!(
                rep.replayed_pages > 0 || rep.discarded_bytes > 0 || !held,
                "round {done}: a journal of {jlen} bytes holding a transaction, but fsck did nothing: {rep:?}"
            );
            if rep.replayed_pages > 0 {
                replayed += 1;
            }
        }
        // Map it again (recovery runs if the journal holds anything); then read
        // every page through the mapping.
        let mm = vm.new_space();
        let r = mm.map_file(&path, Share::Atomic).unwrap();
        let mut got = vec![0u64; PAGES as usize];
        let mut b = vec![0u8; PS];
        for i in 0..PAGES {
            mm.read(r.start() + i * PS as u64, &mut b).unwrap();
            let ver = u64::from_le_bytes(b[8..16].try_into().unwrap());
            assert_eq!(b, page(ver, i), "round {done}: page {i} is torn or foreign");
            got[i as usize] = ver;
        }
        drop((mm, r));
        // Which commit is it? The highest version present; replay up to it.
        let top = *got.iter().max().unwrap();
        let mut want = state.clone();
        if top > base {
            for v in base + 1..=top {
                for i in touched(round_seed, v) {
                    want[i as usize] = v;
                }
            }
            moved += 1;
        }
        assert_eq!(
            got, want,
            "round {done} (seed {round_seed}, base {base}): the file is not the state after commit {top}"
        );
        state = want;
        base = top.max(base);
        // The file on disk agrees with what the mapping showed.
        let f = std::fs::File::open(&path).unwrap();
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), state[0]);
    }
    println!(
        "{done} kills in {:.1} s: {moved} rounds committed something, {torn_logs} left a journal \
         to recover ({replayed} of them a committed msync that fsck replayed), {base} commits in all",
        start.elapsed().as_secs_f64()
    );
    assert!(done >= 20, "too few rounds ran: {done}");
    assert!(
        moved > done / 4,
        "too few commits happened: {moved} of {done}"
    );
}
