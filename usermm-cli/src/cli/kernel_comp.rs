//! The kernel's compressed swap, the references of `usermm bench --compressed`:
//! zram (a compressed RAM block device used as swap) and zswap (a compressed cache
//! in front of a swap file). Both are machine-wide, so both are set up only for the
//! runs that measure them and put back as they were after: `/dev/zram0` is used
//! only if nobody uses it (disksize 0, not a swap) and is reset after; zswap's
//! `enabled` and `compressor` get their old values back; debugfs is unmounted if
//! it was mounted for us; a zram module loaded for us is unloaded. Every change is
//! registered with the undo registry (`util::register`) before it is made, so
//! errors, panics (Drop) and Ctrl-C undo it too.
//!
//! The pools are read where the kernel shows them: zram's `mm_stat`
//! (`mem_used_max`, reset before each run), zswap's `pool_total_size` in debugfs
//! (or `Zswap:` in /proc/meminfo), sampled while the child runs.

use super::kernel::{swapon_top, write_swap_header};
use super::sys::{self, read_param, write_param};
use super::util::{self, Registered, Undo};
use std::path::{Path, PathBuf};

fn need_root() -> Result<(), String> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root".into());
    }
    Ok(())
}

/// `/dev/zram0` as a swap area of its own.
#[derive(Debug)]
pub struct Zram {
    dev: PathBuf,
    sys: PathBuf,
    /// The compression algorithm set.
    pub algo: String,
    /// Disk size in bytes.
    pub size: u64,
    undo_algo: Registered,
    undo_reset: Registered,
    undo_swap: Option<Registered>,
    undo_module: Option<Registered>,
    torn_down: bool,
}

impl Zram {
    /// Sets up `/dev/zram0` with `size` bytes, lz4 (or lzo-rle) and a swap header;
    /// not yet a swap area (`swap_enable`). `Err` says why it cannot be used.
    pub fn setup(size: u64) -> Result<Zram, String> {
        need_root()?;
        let sys_dir = PathBuf::from("/sys/block/zram0");
        let mut undo_module = None;
        if !sys_dir.exists() {
            sys::modprobe(&["zram"]).map_err(|e| format!("no /dev/zram0 and {e}"))?;
            undo_module = Some(util::register(Undo::Unload("zram".into())));
            if !sys_dir.exists() {
                if let Some(u) = &undo_module {
                    let _ = u.run();
                }
                return Err("modprobe zram made no /dev/zram0".into());
            }
        }
        let unload = |e: String| {
            // Nothing of the device changed yet: only the module to unload.
            if let Some(u) = &undo_module {
                let _ = u.run();
            }
            e
        };
        let dev = PathBuf::from("/dev/zram0");
        let disksize = read_param(&sys_dir.join("disksize")).map_err(unload)?;
        if disksize != "0" || sys::swap_active(&dev) {
            return Err(unload(format!(
                "/dev/zram0 is in use (disksize {disksize}); not touched"
            )));
        }
        // "lzo lzo-rle [lz4] zstd": the one in brackets is current.
        let algos = read_param(&sys_dir.join("comp_algorithm")).map_err(unload)?;
        let names: Vec<&str> = algos
            .split_whitespace()
            .map(|a| a.trim_matches(|c| c == '[' || c == ']'))
            .collect();
        let algo = ["lz4", "lzo-rle", "lzo"]
            .into_iter()
            .find(|a| names.contains(a))
            .unwrap_or_else(|| names.first().copied().unwrap_or("lzo-rle"))
            .to_string();
        let old_algo = algos
            .split_whitespace()
            .find_map(|a| a.strip_prefix('[').and_then(|a| a.strip_suffix(']')))
            .unwrap_or("lzo-rle")
            .to_string();
        // Undone in reverse: swapoff, reset, then the old algorithm back (a reset
        // device takes it).
        let undo_algo = util::register(Undo::Restore(sys_dir.join("comp_algorithm"), old_algo));
        // From here on the device is ours: reset it whatever happens.
        let undo_reset = util::register(Undo::ResetZram(sys_dir.clone()));
        let mut z = Zram {
            dev,
            sys: sys_dir,
            algo,
            size,
            undo_algo,
            undo_reset,
            undo_swap: None,
            undo_module,
            torn_down: false,
        };
        write_param(&z.sys.join("comp_algorithm"), &z.algo)?;
        write_param(&z.sys.join("disksize"), &size.to_string())?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&z.dev)
            .map_err(|e| format!("cannot open {}: {e}", z.dev.display()))?;
        write_swap_header(&f, size / usermm::PAGE_SIZE as u64)?;
        drop(f);
        z.undo_swap = Some(util::register(Undo::Swapoff(z.dev.clone())));
        Ok(z)
    }

    /// Makes it the swap (highest priority) or not.
    pub fn swap_enable(&self, on: bool) -> Result<(), String> {
        if on == sys::swap_active(&self.dev) {
            return Ok(());
        }
        if on {
            swapon_top(&self.dev)
        } else {
            sys::swapoff(&self.dev)
        }
    }

    /// `mm_stat`'s `mem_used_max`: the most memory the device took, compressed
    /// pages and allocator overhead, since `reset_peak`.
    pub fn peak_used(&self) -> Option<u64> {
        read_param(&self.sys.join("mm_stat"))
            .ok()?
            .split_whitespace()
            .nth(4)?
            .parse()
            .ok()
    }

    /// Resets `mem_used_max` to the current use.
    pub fn reset_peak(&self) {
        let _ = write_param(&self.sys.join("mem_used_max"), "0");
    }

    /// A short description.
    pub fn describe(&self) -> String {
        format!(
            "{} {} MiB {} (priority 32767)",
            self.dev.display(),
            self.size >> 20,
            self.algo
        )
    }

    /// swapoff, reset, and unload the module if it was loaded for us.
    pub fn teardown(&mut self) -> Result<(), String> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        if let Some(u) = &self.undo_swap {
            // A device still in use is never reset.
            if let Err(e) = u.run() {
                self.undo_reset.forget();
                self.undo_algo.forget();
                return Err(e);
            }
        }
        let mut r = self.undo_reset.run();
        if r.is_ok() {
            r = self.undo_algo.run();
        }
        if let (Ok(()), Some(u)) = (&r, &self.undo_module) {
            r = u.run();
        }
        r
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("usermm bench: cleanup: {e}");
        }
    }
}

const ZSWAP: &str = "/sys/module/zswap/parameters";
const DEBUGFS: &str = "/sys/kernel/debug";

/// zswap, enabled only while `enable(true)`.
#[derive(Debug)]
pub struct Zswap {
    /// The compressor in use.
    pub compressor: String,
    /// Where the pool size is read.
    pool_file: Option<PathBuf>,
    /// Why debugfs could not be used, if it could not.
    pool_note: String,
    undo_enabled: Registered,
    undo_compressor: Option<Registered>,
    undo_debugfs: Option<Registered>,
    torn_down: bool,
}

impl Zswap {
    /// Notes zswap's parameters (to restore them), sets the compressor to lz4 where
    /// the kernel has it (else keeps its own), mounts debugfs if needed.
    pub fn setup() -> Result<Zswap, String> {
        need_root()?;
        let params = Path::new(ZSWAP);
        if !params.join("enabled").exists() {
            return Err("this kernel has no zswap (no /sys/module/zswap)".into());
        }
        let old_enabled = read_param(&params.join("enabled"))?;
        let old_comp = read_param(&params.join("compressor"))?;
        let undo_enabled = util::register(Undo::Restore(params.join("enabled"), old_enabled));
        let mut z = Zswap {
            compressor: old_comp.clone(),
            pool_file: None,
            pool_note: String::new(),
            undo_enabled,
            undo_compressor: None,
            undo_debugfs: None,
            torn_down: false,
        };
        if old_comp != "lz4" {
            let u = util::register(Undo::Restore(params.join("compressor"), old_comp.clone()));
            // The kernel refuses a compressor its crypto API lacks (lz4 often is):
            // then it keeps its own. What it says after is what it uses.
            let _ = write_param(&params.join("compressor"), "lz4");
            z.compressor = read_param(&params.join("compressor"))?;
            if z.compressor == old_comp {
                u.forget();
            } else {
                z.undo_compressor = Some(u);
            }
        }
        let dbg = Path::new(DEBUGFS);
        if !dbg.join("zswap").exists() && !sys::mounted(dbg) && dbg.is_dir() {
            let u = util::register(Undo::Unmount(dbg.to_path_buf()));
            match sys::mount_debugfs(dbg) {
                Ok(()) => z.undo_debugfs = Some(u),
                Err(e) => {
                    u.forget();
                    z.pool_note = format!(" ({e})");
                }
            }
        }
        let f = dbg.join("zswap/pool_total_size");
        if f.exists() {
            z.pool_file = Some(f);
        }
        Ok(z)
    }

    /// Turns zswap on or off (pages already in its pool stay until freed).
    pub fn enable(&self, on: bool) -> Result<(), String> {
        write_param(
            &Path::new(ZSWAP).join("enabled"),
            if on { "Y" } else { "N" },
        )
    }

    /// The pool's size now: debugfs `pool_total_size`, else /proc/meminfo `Zswap:`.
    pub fn pool_bytes(&self) -> Option<u64> {
        if let Some(f) = &self.pool_file {
            if let Some(v) = read_param(f).ok().and_then(|s| s.parse().ok()) {
                return Some(v);
            }
        }
        std::fs::read_to_string("/proc/meminfo")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("Zswap:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }

    /// A short description.
    pub fn describe(&self) -> String {
        format!(
            "zswap {} (max_pool_percent {}), pool read from {}{}",
            self.compressor,
            read_param(&Path::new(ZSWAP).join("max_pool_percent")).unwrap_or_default(),
            self.pool_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "/proc/meminfo".into()),
            self.pool_note
        )
    }

    /// Puts the parameters back and unmounts debugfs if it was mounted for us.
    pub fn teardown(&mut self) -> Result<(), String> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut errs = Vec::new();
        for u in [Some(&self.undo_enabled), self.undo_compressor.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = u.run() {
                errs.push(e);
            }
        }
        if let Some(u) = &self.undo_debugfs {
            if let Err(e) = u.run() {
                errs.push(e);
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}

impl Drop for Zswap {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("usermm bench: cleanup: {e}");
        }
    }
}
