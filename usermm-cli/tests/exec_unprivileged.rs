//! `usermm exec` as an ordinary user (issue 11): with /dev/userfaultfd granted to
//! the user's group, as README's "Transparent memory" section says, a program's
//! system calls into evicted heap memory (`read(2)` into it, `write(2)` from it)
//! are served; without the grant, `usermm exec` refuses with exit 126 and a message
//! that names the grant.
//!
//! The host is not changed: each case runs in a private mount namespace
//! (`unshare --mount --propagation private`) where a copy of the device node, on a
//! tmpfs mounted there, is bind-mounted over /dev/userfaultfd; the program runs as
//! uid/gid 65534 (`setpriv`). Needs root, `unshare`, `setpriv`, `mknod`, python3;
//! otherwise SKIP (a failure with USERMM_REQUIRE_UFFD=1).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const USERMM: &str = env!("CARGO_BIN_EXE_usermm");
const PYTHON: &str = "/usr/bin/python3";
const NOBODY: u32 = 65534;

fn tool(name: &str) -> bool {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists())
}

/// Whether this test can run here; prints SKIP (or panics with
/// USERMM_REQUIRE_UFFD=1) when not.
fn can_run() -> bool {
    // SAFETY: a plain query of this process's effective uid.
    let root = unsafe { libc::geteuid() } == 0;
    let dev = Path::new("/dev/userfaultfd").exists();
    let lib = Path::new(USERMM)
        .parent()
        .is_some_and(|d| d.join("libusermm_preload.so").exists());
    let tools = ["unshare", "setpriv", "mknod", "mount", "sh"]
        .iter()
        .all(|t| tool(t));
    let py = Path::new(PYTHON).exists();
    if root && dev && lib && tools && py {
        return true;
    }
    let why = format!(
        "root {root}, /dev/userfaultfd {dev}, preload library {lib}, \
         unshare/setpriv/mknod/mount {tools}, {PYTHON} {py}"
    );
    if std::env::var("USERMM_REQUIRE_UFFD").as_deref() == Ok("1") {
        panic!("unprivileged usermm exec test cannot run: {why}");
    }
    eprintln!("SKIP: unprivileged usermm exec test: {why}");
    false
}

/// A work directory under /var/tmp (a disk, not tmpfs: the swap file is O_DIRECT),
/// mode 1777 so uid 65534 can write there, holding copies of the binary and the
/// preload library in a 0755 subdirectory (the target dir may not be reachable by
/// other users). Removed when dropped.
struct Work {
    dir: tempfile::TempDir,
    usermm: PathBuf,
}

fn work() -> Work {
    let dir = tempfile::Builder::new()
        .prefix("usermm-unpriv")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = Path::new(USERMM).parent().unwrap();
    for f in ["usermm", "libusermm_preload.so"] {
        let to = bin.join(f);
        let from = if f == "usermm" {
            PathBuf::from(USERMM)
        } else {
            src.join(f)
        };
        std::fs::copy(from, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    Work {
        usermm: bin.join("usermm"),
        dir,
    }
}

fn quote(p: &Path) -> String {
    let s = p.to_str().unwrap();
    assert!(!s.contains('\''), "path with a quote: {s}");
    format!("'{s}'")
}

/// Runs `usermm exec --budget 16M --stats -- python3 PROG ARGS` as uid/gid 65534 in
/// a private mount namespace where /dev/userfaultfd is a node with `mode`, owned by
/// root and group 65534. Returns (exit code, stdout, stderr).
fn run_as_nobody(w: &Work, mode: u32, prog: &Path, args: &[&Path]) -> (i32, String, String) {
    let rdev = std::fs::metadata("/dev/userfaultfd").unwrap().rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let mnt = w.dir.path().join("dev");
    std::fs::create_dir_all(&mnt).unwrap();
    let node = mnt.join("userfaultfd");
    let args: Vec<String> = args.iter().map(|a| quote(a)).collect();
    // The tmpfs, the node and the bind mount exist only in the namespace; they go
    // with it. `setpriv` drops to 65534 with no supplementary groups (and so no
    // capabilities) before `usermm exec` runs.
    let script = format!(
        "set -e
mount -t tmpfs -o mode=0755 usermm-test {mnt}
mknod {node} c {maj} {min}
chown 0:{NOBODY} {node}
chmod {mode:o} {node}
mount --bind {node} /dev/userfaultfd
exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- \
    {usermm} exec --budget 16M --stats -- {PYTHON} {prog} {args}",
        mnt = quote(&mnt),
        node = quote(&node),
        usermm = quote(&w.usermm),
        prog = quote(prog),
        args = args.join(" "),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("TMPDIR", w.dir.path())
        .env_remove("USERMM_SWAP_DIR")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// 64 MiB of bytearrays written under a 16 MiB budget (the first ones go to swap),
/// then `readinto` (read(2)) from a file into the earliest, now evicted ones; more
/// pressure; then `os.write` (write(2)) of them to another file. The kernel takes
/// those faults inside the system calls.
const PROG: &str = r#"
import hashlib, os, sys
src, dst = sys.argv[1], sys.argv[2]
MiB = 1 << 20
bufs = [bytearray(MiB) for _ in range(64)]
for i, b in enumerate(bufs):
    b[:] = bytes([i % 251 + 1]) * MiB
n = os.path.getsize(src) // MiB
with open(src, 'rb', buffering=0) as f:
    for k in range(n):
        assert f.readinto(memoryview(bufs[k])) == MiB
for i in range(n, 64):
    b = bufs[i]
    b[:] = bytes([i % 251 + 2]) * MiB
fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for k in range(n):
    assert os.write(fd, memoryview(bufs[k])) == MiB
os.close(fd)
ok = all(bufs[i] == bytes([i % 251 + 2]) * MiB for i in range(n, 64))
h = hashlib.sha256()
for k in range(n):
    h.update(bufs[k])
print('uid', os.getuid(), 'rest', ok, 'sha', h.hexdigest())
"#;

/// With the grant (a 0660 node of group 65534): uid 65534 runs the program; the
/// bytes read into evicted memory and written out from it are the file's own, the
/// heap's other pages are intact, and pages were swapped in (`--stats`).
#[test]
fn nobody_with_the_grant_reads_and_writes_evicted_memory() {
    if !can_run() {
        return;
    }
    let w = work();
    let src = w.dir.path().join("in.bin");
    let dst = w.dir.path().join("out.bin");
    let prog = w.dir.path().join("prog.py");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&src, &data).unwrap();
    std::fs::write(&prog, PROG).unwrap();
    for f in [&src, &prog] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (code, out, err) = run_as_nobody(&w, 0o660, &prog, &[&src, &dst]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let want = {
        // The program's sha256 of the 8 buffers: that of the file.
        let py = Command::new(PYTHON)
            .args(["-c", "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())"])
            .arg(&src)
            .output()
            .unwrap();
        String::from_utf8_lossy(&py.stdout).trim().to_string()
    };
    assert_eq!(
        out.trim(),
        format!("uid {NOBODY} rest True sha {want}"),
        "stderr: {err}"
    );
    let written = std::fs::read(&dst).unwrap();
    assert!(
        written == data,
        "write(2) from evicted memory sent other bytes"
    );
    let pswpin: u64 = err
        .lines()
        .rfind(|l| l.starts_with("usermm exec: pid "))
        .and_then(|l| l.split(", ").find_map(|f| f.strip_prefix("pswpin ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no stats line: {err}"));
    assert!(pswpin > 0, "nothing was swapped in: {err}");
}

/// Without the grant (the node 0600, root's): `usermm exec` refuses with 126 and
/// says how to grant it; the program does not run.
#[test]
fn nobody_without_the_grant_is_refused_with_the_way_to_grant() {
    if !can_run() {
        return;
    }
    let w = work();
    let prog = w.dir.path().join("prog.py");
    std::fs::write(&prog, "print('ran')\n").unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, err) = run_as_nobody(&w, 0o600, &prog, &[]);
    assert_eq!(code, 126, "stdout: {out}\nstderr: {err}");
    assert!(!out.contains("ran"), "the program ran: {out}");
    assert!(
        err.contains("cannot open /dev/userfaultfd") && err.contains("Grant it once"),
        "{err}"
    );
    assert!(err.contains("Transparent memory"), "{err}");
}
