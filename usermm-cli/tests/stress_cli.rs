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
    // The default page-out: the threads' positioned writes, and it says so.
    assert!(stdout.contains(", pwritev writes"), "{stdout}");
    let out = Command::new(env!("CARGO_BIN_EXE_usermm"))
        .args(["swaps", "--swap", "file:/nonexistent-dir/x?size=1M"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonexistent-dir"));
}

/// The first number on the line of the final summary (after `done in`) that starts
/// with `prefix` (e.g. `  swapoff: 12 swapoff/swapon cycles`).
fn summary_count(stdout: &str, prefix: &str) -> Option<u64> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("done in "))
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// `usermm stress all`, shortened for CI: the differential workload, fork/exit,
/// swapoff/swapon and (with qemu-nbd) an NBD server killed and restarted, all at
/// once. It must exit 0, complete a swapoff cycle and, with qemu-nbd, an NBD restart.
#[test]
fn stress_all_short_run_is_clean() {
    let out = Command::new(env!("CARGO_BIN_EXE_usermm"))
        .args([
            "stress",
            "all",
            "--duration",
            "5s",
            "--stall",
            "30",
            "--nbd-restart",
            "1500ms",
        ])
        .output()
        .expect("run usermm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "usermm stress all failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stdout.contains("OK: every page verified"), "{stdout}");
    for (prefix, what) in [
        ("  mismatches: ", "mismatches"),
        ("  leaks: ", "leaks"),
        ("  stalls: ", "stalls"),
    ] {
        assert_eq!(summary_count(&stdout, prefix), Some(0), "{what}:\n{stdout}");
    }
    let cycles = summary_count(&stdout, "  swapoff: ").unwrap_or(0);
    assert!(cycles > 0, "no swapoff cycle completed:\n{stdout}");
    let ops = summary_count(&stdout, "  differential: ").unwrap_or(0);
    assert!(ops > 0, "no differential operation:\n{stdout}");
    if usermm_testkit::nbd::skip_without("stress_all_short_run_is_clean (nbd part)", "qemu-nbd") {
        assert!(
            stdout.contains("nbd: skipped (qemu-nbd not found; apt-get install qemu-utils)"),
            "{stdout}"
        );
        return;
    }
    let restarts = summary_count(&stdout, "  nbd: ").unwrap_or(0);
    assert!(restarts > 0, "no NBD restart:\n{stdout}");
}

/// Without qemu-nbd `stress all` runs without its NBD part and says so; with
/// `USERMM_REQUIRE_SERVERS=1` it fails at once.
#[test]
fn stress_all_without_qemu_nbd_skips_or_fails_as_required() {
    let empty = tempfile::tempdir().unwrap();
    let run = |required: &str| {
        Command::new(env!("CARGO_BIN_EXE_usermm"))
            .args(["stress", "all", "--duration", "1s", "--stall", "30"])
            .env("PATH", empty.path())
            .env("USERMM_REQUIRE_SERVERS", required)
            .output()
            .expect("run usermm")
    };
    let out = run("1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("apt-get install qemu-utils"), "{stderr}");
    let out = run("0");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("nbd: skipped (qemu-nbd not found; apt-get install qemu-utils)"),
        "{stdout}"
    );
    assert!(stdout.contains("OK: every page verified"), "{stdout}");
}

/// Seed 000's reproducer, shortened for CI (issue 12 item 4): threads writing their
/// own files through shared mappings and `write_at` under 48 frames, with swap. It
/// must exit 0: no stall (the watchdog), every read and every file on disk as its
/// model says, and file pages written back by the page-I/O threads.
#[test]
fn stress_files_short_run_is_clean() {
    let out = Command::new(env!("CARGO_BIN_EXE_usermm"))
        .args([
            "stress",
            "files",
            "--threads",
            "4",
            "--duration",
            "5s",
            "--stall",
            "30",
        ])
        .output()
        .expect("run usermm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "usermm stress files failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("OK: every read and every file on disk matched"),
        "{stdout}"
    );
    let written_back: u64 = stdout
        .split("written back ")
        .nth(1)
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(written_back > 0, "{stdout}");
}
