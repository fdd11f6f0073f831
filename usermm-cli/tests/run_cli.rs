//! `usermm run` with its faults' reads polled (the default, and a long spin) and
//! slept (`--read-poll 0`, as the kernel's swap-in): the run verifies every page
//! either way; a malformed value is refused with a clear message.

use std::process::Command;

#[test]
fn run_verifies_every_page_with_polled_and_slept_reads() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    for (poll, us) in [(None, 200), (Some("0"), 0), (Some("2ms"), 2000)] {
        let json = dir.path().join("r.json");
        let swap = format!("file:{}?size=64M", dir.path().join("s.swap").display());
        let mut c = Command::new(env!("CARGO_BIN_EXE_usermm"));
        c.args(["run", "--budget", "8M", "--working-set", "32M"])
            .args([
                "--duration",
                "1s",
                "--threads",
                "2",
                "--swap",
                &swap,
                "--json",
            ])
            .arg(&json);
        if let Some(p) = poll {
            c.args(["--read-poll", p]);
        }
        let out = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "--read-poll {poll:?}: {stderr}");
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(r["ok"], true, "--read-poll {poll:?}: {r}");
        assert_eq!(r["pages_verified"], 8192, "--read-poll {poll:?}: {r}");
        assert_eq!(r["read_poll_us"], us, "--read-poll {poll:?}");
        let majors = r["timed"]["pgmajfault"].as_u64().unwrap();
        assert!(majors > 100, "--read-poll {poll:?}: {majors} major faults");
        assert_eq!(r["total"]["read_errors"], 0, "--read-poll {poll:?}: {r}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_usermm"))
        .args(["run", "--read-poll", "5x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--read-poll") && stderr.contains("unknown unit"),
        "{stderr}"
    );
}
