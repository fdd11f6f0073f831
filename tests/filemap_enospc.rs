//! A full disk under file mappings (issue 12 item 5): on a small tmpfs, an Atomic
//! commit whose journal does not fit fails with a clear `Io` error, the file keeps
//! its last committed version, the mapping keeps every page, and the same `msync`
//! succeeds once there is room; a Shared mapping's write-back into a sparse file
//! fails the same way and succeeds later. Needs root (to mount the tmpfs); says SKIP
//! without it, and fails instead with `USERMM_REQUIRE_ROOT=1` (as CI sets it).

use std::path::{Path, PathBuf};
use std::process::Command;
use usermm::{Config, Error, Share, SwapSpec, Vm, PAGE_SIZE};

const PS: usize = PAGE_SIZE;

/// A tmpfs of `kib` KiB mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(kib: u64) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let why = "needs root to mount a small tmpfs";
            assert!(
                std::env::var_os("USERMM_REQUIRE_ROOT").is_none(),
                "USERMM_REQUIRE_ROOT is set but: {why}"
            );
            eprintln!("SKIP: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount of a tmpfs failed");
        Some(Tmpfs { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the file system at `dir` with a file until fewer than `leave` bytes are
/// free; returns its path.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let p = dir.join("filler");
    let st = nix_statvfs(dir);
    let free = st.0 * st.1;
    let n = free.saturating_sub(leave);
    std::fs::write(&p, vec![1u8; n as usize]).unwrap();
    p
}

/// (free blocks, block size) of the file system at `dir`.
fn nix_statvfs(dir: &Path) -> (u64, u64) {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    (st.f_bavail, st.f_frsize)
}

fn page(ver: u8, i: usize) -> Vec<u8> {
    let mut b = vec![ver; PS];
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    b
}

fn vm(swapdir: &Path) -> Vm {
    let vm = Vm::new(Config::default().memory_budget(1 << 20)).unwrap();
    vm.swapon(SwapSpec::file(swapdir.join("swap"), 16 << 20))
        .unwrap();
    vm
}

#[test]
fn atomic_commit_on_a_full_disk_fails_cleanly_and_succeeds_later() {
    let Some(fs) = Tmpfs::mount(512) else { return };
    let swapdir = tempfile::tempdir().unwrap();
    let p = fs.path().join("data");
    let n = 16usize;
    let v0: Vec<u8> = (0..n).flat_map(|i| page(0, i)).collect();
    std::fs::write(&p, &v0).unwrap();
    let vm = vm(swapdir.path());
    let mm = vm.new_space();
    let r = mm.map_file(&p, Share::Atomic).unwrap();
    // Room for less than the 16 records (66 KiB) the commit needs.
    let filler = fill(fs.path(), 16 << 10);
    for i in 0..n {
        mm.write(r.start() + (i * PS) as u64, &page(1, i)).unwrap();
    }
    match mm.msync(&r) {
        Err(Error::Io(e)) => {
            assert_eq!(e.raw_os_error(), None, "a message with the path: {e}");
            assert!(e.to_string().contains("usermm-journal"), "{e}");
        }
        other => panic!("msync on a full disk: {other:?}"),
    }
    assert_eq!(
        std::fs::read(&p).unwrap(),
        v0,
        "the file changed without a commit"
    );
    let mut b = vec![0u8; PS];
    for i in 0..n {
        mm.read(r.start() + (i * PS) as u64, &mut b).unwrap();
        assert_eq!(b, page(1, i), "page {i} was lost");
    }
    std::fs::remove_file(&filler).unwrap();
    mm.msync(&r).unwrap();
    let v1: Vec<u8> = (0..n).flat_map(|i| page(1, i)).collect();
    assert_eq!(std::fs::read(&p).unwrap(), v1);
    drop((r, mm, vm));
}

#[test]
fn shared_write_back_on_a_full_disk_fails_cleanly_and_succeeds_later() {
    let Some(fs) = Tmpfs::mount(512) else { return };
    let swapdir = tempfile::tempdir().unwrap();
    let p = fs.path().join("sparse");
    let n = 64usize; // 256 KiB of holes
    std::fs::File::create(&p)
        .unwrap()
        .set_len((n * PS) as u64)
        .unwrap();
    let vm = vm(swapdir.path());
    let mm = vm.new_space();
    let r = mm.map_file(&p, Share::Shared).unwrap();
    let filler = fill(fs.path(), 32 << 10);
    for i in 0..n {
        mm.write(r.start() + (i * PS) as u64, &page(2, i)).unwrap();
    }
    match mm.msync(&r) {
        Err(Error::Io(e)) => assert!(e.to_string().contains("sparse"), "{e}"),
        other => panic!("msync on a full disk: {other:?}"),
    }
    let mut b = vec![0u8; PS];
    for i in 0..n {
        mm.read(r.start() + (i * PS) as u64, &mut b).unwrap();
        assert_eq!(b, page(2, i), "page {i} was lost");
    }
    std::fs::remove_file(&filler).unwrap();
    mm.msync(&r).unwrap();
    let want: Vec<u8> = (0..n).flat_map(|i| page(2, i)).collect();
    assert_eq!(std::fs::read(&p).unwrap(), want);
    drop((r, mm, vm));
}

/// Review finding: under memory pressure, with every file write-back failing, an
/// access that needs a frame must give up with a clear error instead of waiting
/// forever; what was written stays, and reaches the file once there is room.
#[test]
fn pressure_on_a_full_disk_gives_up_cleanly() {
    let Some(fs) = Tmpfs::mount(512) else { return };
    let p = fs.path().join("big-sparse");
    let n = 1024usize; // 4 MiB of holes; the budget is 256 KiB
    std::fs::File::create(&p)
        .unwrap()
        .set_len((n * PS) as u64)
        .unwrap();
    let vm = Vm::new(Config::default().memory_budget(256 << 10)).unwrap();
    let mm = vm.new_space();
    let r = mm.map_file(&p, Share::Shared).unwrap();
    let filler = fill(fs.path(), 16 << 10);
    let (tx, rx) = std::sync::mpsc::channel();
    let (mm2, start) = (mm.clone(), r.start());
    std::thread::spawn(move || {
        for i in 0..n {
            if let Err(e) = mm2.write(start + (i * PS) as u64, &page(3, i)) {
                let _ = tx.send(Err((i, e)));
                return;
            }
        }
        let _ = tx.send(Ok(()));
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("a write hung on a full disk");
    let (failed_at, e) = got.expect_err("4 MiB cannot fit in 256 KiB with no room on disk");
    assert!(
        matches!(&e, Error::Io(io) if io.to_string().contains("keeps failing")),
        "page {failed_at}: {e:?}"
    );
    std::fs::remove_file(&filler).unwrap();
    let mut b = vec![0u8; PS];
    for i in 0..failed_at {
        mm.read(r.start() + (i * PS) as u64, &mut b).unwrap();
        assert_eq!(b, page(3, i), "page {i} was lost");
    }
    mm.msync(&r).ok();
    mm.msync(&r).unwrap();
    let disk = std::fs::read(&p).unwrap();
    for i in 0..failed_at {
        assert_eq!(
            &disk[i * PS..(i + 1) * PS],
            &page(3, i)[..],
            "page {i} on disk"
        );
    }
}
