//! The seed-002 stress command, shortened for CI: swapoff/swapon of one of three
//! devices in a loop while workers fork, write, verify and exit. It must exit 0
//! (no mismatch, no leaked slot or frame, no stall).

use std::process::Command;

#[test]
fn stress_swapoff_short_run_is_clean() {
    let out = Command::new(env!("CARGO_BIN_EXE_usermm"))
        .args(["stress", "swapoff", "--duration", "5s", "--stall", "30"])
        .output()
        .expect("run usermm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "usermm stress failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stdout.contains("OK: every page verified"), "{stdout}");
    let cycles: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("done in "))
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(cycles > 0, "no swapoff cycle completed:\n{stdout}");
}

#[test]
fn swaps_lists_devices_and_rejects_bad_specs() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("file:{}?size=4M&prio=7", dir.path().join("a").display());
    let out = Command::new(env!("CARGO_BIN_EXE_usermm"))
        .args(["swaps", "--swap", &spec])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("4096") && stdout.contains("active") && stdout.contains(" 7 "),
        "{stdout}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_usermm"))
        .args(["swaps", "--swap", "file:/nonexistent-dir/x?size=1M"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonexistent-dir"));
}
