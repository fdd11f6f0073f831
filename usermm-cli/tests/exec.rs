//! `usermm exec`: unmodified programs with their heap in a usermm budget (through
//! the LD_PRELOAD library built beside the binary). Output and exit status are the
//! program's own; the heap stays inside the budget; refusals are clear.

mod common;
use common::{python, run_sampled, USERMM};

use std::process::Command;
use std::time::Duration;

const BUILD_1G: &str = "
import hashlib
b = bytearray(1 << 30)
for i in range(0, len(b), 4096):
    b[i] = (i >> 12) % 251
    b[i + 4095] = (i >> 13) % 241
print(hashlib.sha256(b).hexdigest())
";

/// A Python program builds and checksums 1 GiB under a 64 MiB budget: the same
/// output as without usermm, and its anonymous memory stays within the budget plus
/// metadata plus 32 MiB.
#[test]
fn python_builds_and_checksums_1g_under_64m() {
    if !common::can_run("usermm exec test", "python", python().is_some()) {
        return;
    }
    let py = python().unwrap();
    let native = Command::new(py).args(["-c", BUILD_1G]).output().unwrap();
    assert!(native.status.success());
    let mut cmd = Command::new(USERMM);
    cmd.args([
        "exec", "--budget", "64M", "--stats", "--", py, "-c", BUILD_1G,
    ]);
    let (out, err, status, peak_kib) = run_sampled(cmd, Duration::from_secs(600));
    assert_eq!(status, 0, "stderr: {err}");
    assert_eq!(
        out,
        String::from_utf8_lossy(&native.stdout),
        "stderr: {err}"
    );
    // Budget 64 MiB + metadata + 32 MiB, with the metadata taken as 8 MiB: stricter
    // than the figure usermm reports (`--stats`), which counts the swap map of the
    // sparse temporary swap file in full although only the pages of used slots are
    // ever touched.
    let meta_kib: u64 = err
        .lines()
        .find_map(|l| l.split("metadata ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no metadata figure in the stats line: {err}"));
    let limit_kib = (64 + 8 + 32) << 10;
    assert!(
        peak_kib <= limit_kib,
        "peak RssAnon {peak_kib} KiB exceeds {limit_kib} KiB (reported metadata {meta_kib} KiB)"
    );
    eprintln!(
        "peak RssAnon under usermm exec: {} MiB (limit {} MiB; reported metadata {} KiB)",
        peak_kib >> 10,
        limit_kib >> 10,
        meta_kib
    );
}

/// fork: a child sees exactly its parent's memory, whether nothing of the heap is on
/// swap or most of it is (never a child that reads zeros). More in `exec_fork.rs`.
#[test]
fn fork_sees_the_parents_heap() {
    if !common::can_run("usermm exec test", "python", python().is_some()) {
        return;
    }
    let py = python().unwrap();
    let prog = "
import os, hashlib, sys
small = bytearray(8 << 20)
for i in range(0, len(small), 4096): small[i] = (i >> 12) % 199
want = hashlib.sha256(small).hexdigest()
pid = os.fork()
if pid == 0:
    os._exit(0 if hashlib.sha256(small).hexdigest() == want else 3)
_, st = os.waitpid(pid, 0)
print('child', os.waitstatus_to_exitcode(st))
big = bytearray(256 << 20)
for i in range(0, len(big), 4096): big[i] = 1
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0 if hashlib.sha256(small).hexdigest() == want else 3)
    _, st = os.waitpid(pid, 0)
    print('child2', os.waitstatus_to_exitcode(st))
except OSError as e:
    print('refused', e.errno)
";
    // Its handler's reads slept (`--read-poll 0`); the other exec tests poll them.
    let out = Command::new(USERMM)
        .args([
            "exec",
            "--budget",
            "32M",
            "--read-poll",
            "0",
            "--",
            py,
            "-c",
            prog,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("child 0"),
        "the child did not see its parent's heap: {stdout}"
    );
    assert!(
        stdout.contains("child2 0"),
        "the child did not see its parent's heap, part of it on swap: {stdout}\n{stderr}"
    );
}

/// Refusals: a static program, a setuid one, a budget beyond the machine.
#[test]
fn refuses_what_it_cannot_budget_with_a_clear_message() {
    let run = |args: &[&str]| {
        let o = Command::new(USERMM).args(args).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["exec", "--budget", "64M", "--", "/nonexistent/prog"]);
    assert_eq!(code, Some(126));
    assert!(err.contains("not found"), "{err}");
    let (code, err) = run(&["exec", "--budget", "1T", "--", "true"]);
    assert_eq!(code, Some(126));
    assert!(err.contains("more than this process may use"), "{err}");
    // A static program, if the machine has one (ldconfig is static on glibc systems).
    if let Some(st) = ["/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    {
        let (code, err) = run(&["exec", "--budget", "64M", "--", st, "-p"]);
        assert_eq!(code, Some(126), "{err}");
        assert!(err.contains("statically linked"), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let suid = dir.path().join("suid-true");
    std::fs::copy("/bin/true", &suid).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    }
    let (code, err) = run(&["exec", "--budget", "64M", "--", suid.to_str().unwrap()]);
    assert_eq!(code, Some(126));
    assert!(err.contains("setuid"), "{err}");
}

/// `--swap file:PATH` and a program that execs another: the first program swaps to
/// the given file, the exec'd one to a temporary file of its own (one swap file
/// serves one process: a second user would overwrite its slots, and the file is
/// locked while in use). Both page out, and both print what they computed.
#[test]
fn a_child_that_execs_swaps_to_a_file_of_its_own() {
    if !common::can_run("usermm exec test", "python", python().is_some()) {
        return;
    }
    let py = python().unwrap();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let swap = dir.path().join("given.swap");
    // The parent fills 48 MiB, runs the same program as a child (fork and exec,
    // os.spawnv), then checks its own 48 MiB again.
    let prog = "
import hashlib, os, sys
b = bytearray(48 << 20)
for i in range(0, len(b), 4096): b[i] = (i >> 12) % 251
h = hashlib.sha256(b).hexdigest()
if len(sys.argv) > 1:
    print('child', h)
else:
    st = os.spawnv(os.P_WAIT, sys.executable, [sys.executable, '-c', PROG, 'child'])
    print('parent', h, hashlib.sha256(b).hexdigest() == h, st)
";
    // The program passes itself to the child as PROG.
    let prog = format!("PROG = {prog:?}\n{prog}");
    let out = Command::new(USERMM)
        .args(["exec", "--budget", "16M", "--stats", "--swap"])
        .arg(format!("file:{}?size=256M", swap.display()))
        .args(["--", py, "-c", &prog])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "{ctx}");
    let child = stdout
        .lines()
        .find_map(|l| l.strip_prefix("child "))
        .unwrap_or_else(|| panic!("the exec'd child did not finish: {ctx}"));
    let parent = stdout
        .lines()
        .find(|l| l.starts_with("parent "))
        .unwrap_or_else(|| panic!("the parent did not finish: {ctx}"));
    assert_eq!(parent, format!("parent {child} True 0"), "{ctx}");
    // Two processes, each with its own usermm, each paging out.
    let outs: Vec<u64> = stderr
        .lines()
        .filter(|l| l.starts_with("usermm exec: pid "))
        .filter_map(|l| {
            l.split(", ")
                .find_map(|f| f.strip_prefix("pswpout "))?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(outs.len(), 2, "{ctx}");
    assert!(outs.iter().all(|&n| n > 1000), "{outs:?}: {ctx}");
    // The given file was written (by the first program): blocks allocated in it.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&swap).map(|m| m.blocks()).unwrap_or(0);
    assert!(blocks > 0, "{ctx}");
}
