//! The kernel's swap areas and memory cgroups, at the level of single system calls
//! and files: what the undo registry ([`super::util`]) and the kernel-swap reference
//! ([`super::kernel`]) both need. Depends on nothing else in the command.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// `p` as a C string.
pub fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", p.display()))
}

/// Whether `/proc/swaps` lists `path` as an active swap area.
pub fn swap_active(path: &Path) -> bool {
    let Ok(s) = std::fs::read_to_string("/proc/swaps") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    // /proc/swaps escapes spaces etc. as octal; our names have none.
    s.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .any(|f| f.as_bytes() == want)
}

/// Turns off the swap file `path` (which this process enabled).
pub fn swapoff(path: &Path) -> Result<(), String> {
    if !swap_active(path) {
        return Ok(());
    }
    let c = cpath(path)?;
    // SAFETY: plain syscall with a valid C string.
    if unsafe { libc::swapoff(c.as_ptr()) } != 0 {
        return Err(format!(
            "swapoff {}: {} — turn it off by hand: swapoff {}",
            path.display(),
            std::io::Error::last_os_error(),
            path.display()
        ));
    }
    Ok(())
}

/// Removes a cgroup directory we created, moving any process left in it (only
/// ever our own child) to the parent first.
pub fn remove_cgroup(path: &Path) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
    if let Some(parent) = path.parent() {
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(parent.join("cgroup.procs"), pid);
        }
    }
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < end => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(format!(
                    "cannot remove cgroup {}: {e} — remove it by hand: rmdir {}",
                    path.display(),
                    path.display()
                ))
            }
        }
    }
}
