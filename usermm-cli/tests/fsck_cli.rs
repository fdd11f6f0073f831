//! `usermm fsck PATH` (issue 12 item 3): recovery of a `Share::Atomic` file's
//! journal from the command line. A committed msync left in the journal is covered
//! by tests/filemap_crash.rs (which recovers through `usermm::fsck` on every other
//! round); here: no journal, a torn journal, and a journal in use.

use std::process::Command;
use usermm::{Config, Share, Vm};

fn fsck(path: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_usermm"))
        .arg("fsck")
        .arg(path)
        .output()
        .expect("run usermm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fsck_reports_what_it_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data");
    std::fs::write(&p, vec![7u8; 3 * 4096]).unwrap();
    let (ok, out, err) = fsck(&p);
    assert!(ok, "{out}{err}");
    assert!(out.contains("no journal"), "{out}");

    // A torn journal (garbage, no commit record): discarded, the file untouched.
    let j = dir.path().join("data.usermm-journal");
    std::fs::write(&j, vec![0xAB; 5000]).unwrap();
    let (ok, out, err) = fsck(&p);
    assert!(ok, "{out}{err}");
    assert!(out.contains("5000 byte(s)"), "{out}");
    assert_eq!(std::fs::metadata(&j).unwrap().len(), 0);
    assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 3 * 4096]);

    // In use by a live Atomic mapping: refused, not recovered under its feet.
    let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
    let mm = vm.new_space();
    let r = mm.map_file(&p, Share::Atomic).unwrap();
    let (ok, out, err) = fsck(&p);
    assert!(!ok, "{out}");
    assert!(err.contains("in use"), "{err}");
    drop((r, mm, vm));

    // A missing file: a clear error naming it.
    let (ok, _, err) = fsck(&dir.path().join("nope"));
    assert!(!ok);
    assert!(err.contains("nope"), "{err}");
}
