//! The kernel's swap areas, memory cgroups, parameter files, mounts and modules, at
//! the level of single system calls and files: what the undo registry
//! ([`super::util`]) and the kernel references ([`super::kernel`],
//! [`super::kernel_comp`]) both need. Depends on nothing else in the command.

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

/// Writes `v` to a kernel parameter or sysfs file.
pub fn write_param(p: &Path, v: &str) -> Result<(), String> {
    std::fs::write(p, v).map_err(|e| format!("cannot write {v:?} to {}: {e}", p.display()))
}

/// Reads a kernel parameter or sysfs file, trimmed.
pub fn read_param(p: &Path) -> Result<String, String> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read {}: {e}", p.display()))
}

/// Unmounts `p` (a file system this process mounted).
pub fn umount(p: &Path) -> Result<(), String> {
    let c = cpath(p)?;
    // SAFETY: plain syscall with a valid C string.
    if unsafe { libc::umount(c.as_ptr()) } != 0 {
        return Err(format!(
            "umount {}: {} — unmount it by hand: umount {}",
            p.display(),
            std::io::Error::last_os_error(),
            p.display()
        ));
    }
    Ok(())
}

/// Mounts debugfs on `p`.
pub fn mount_debugfs(p: &Path) -> Result<(), String> {
    let c = cpath(p)?;
    let fs = c"debugfs";
    // SAFETY: plain syscall with valid C strings and no data.
    if unsafe { libc::mount(fs.as_ptr(), c.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(format!(
            "mount -t debugfs debugfs {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Whether a file system is mounted on exactly `p` (`/proc/mounts`).
pub fn mounted(p: &Path) -> bool {
    let want = p.display().to_string();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
}

/// Runs `modprobe ARGS`.
pub fn modprobe(args: &[&str]) -> Result<(), String> {
    let st = std::process::Command::new("modprobe")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot run modprobe: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("modprobe {} failed ({st})", args.join(" ")))
    }
}
