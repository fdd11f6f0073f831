//! Configuration of a [`Vm`](crate::Vm) and the swap device specs.
//!
//! Specs are URIs: `file:PATH?size=4G&prio=0`. The size takes the suffixes
//! K, M, G, T (powers of 1024, with or without `iB`). Other schemes of DESIGN.md
//! (`nbd://`, `nbd+unix://`, `zpool:`, `mirror:`) are recognised and rejected with a
//! clear `Error::Config` until their devices exist.

use crate::error::{Error, Result};
use crate::types::PAGE_SIZE;
use std::path::PathBuf;

/// The smallest budget accepted: 16 frames.
pub const MIN_BUDGET_FRAMES: usize = 16;

/// Settings of a [`Vm`](crate::Vm). Start from `Config::default()` and chain setters.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) memory_budget: usize,
    pub(crate) watermarks: Option<[usize; 3]>,
    pub(crate) io_threads: usize,
    pub(crate) io_requests: usize,
    pub(crate) background_reclaim: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            memory_budget: 256 << 20,
            watermarks: None,
            io_threads: 4,
            io_requests: 128,
            background_reclaim: true,
        }
    }
}

impl Config {
    /// The hard RAM budget for page frames, in bytes (rounded down to whole pages).
    /// At least 64 KiB (16 frames). Default 256 MiB.
    pub fn memory_budget(mut self, bytes: usize) -> Self {
        self.memory_budget = bytes;
        self
    }
    /// Watermarks `[min, low, high]` in frames (must satisfy `0 < min < low < high <
    /// frames`). Default: min = frames/128 (at least 2), low = 2·min, high = 3·min.
    pub fn watermarks(mut self, min: usize, low: usize, high: usize) -> Self {
        self.watermarks = Some([min, low, high]);
        self
    }
    /// Number of page-I/O threads (= write-back queue depth). Default 4.
    pub fn io_threads(mut self, n: usize) -> Self {
        self.io_threads = n;
        self
    }
    /// Number of preallocated page-out requests (each owns a 4 KiB buffer). Default 128.
    pub fn io_requests(mut self, n: usize) -> Self {
        self.io_requests = n;
        self
    }
    /// Whether a background reclaimer thread keeps free frames between the low and
    /// high watermarks (default true). Without it only direct reclaim runs.
    pub fn background_reclaim(mut self, on: bool) -> Self {
        self.background_reclaim = on;
        self
    }

    /// The budget in frames, checked.
    pub(crate) fn frames(&self) -> Result<usize> {
        let n = self.memory_budget / PAGE_SIZE;
        if n < MIN_BUDGET_FRAMES {
            return Err(Error::Config(format!(
                "memory budget of {} bytes is below the minimum of {} bytes ({} frames)",
                self.memory_budget,
                MIN_BUDGET_FRAMES * PAGE_SIZE,
                MIN_BUDGET_FRAMES
            )));
        }
        if n > crate::pagetable::MAX_FRAMES {
            return Err(Error::Config(format!(
                "memory budget above {} GiB",
                (crate::pagetable::MAX_FRAMES * PAGE_SIZE) >> 30
            )));
        }
        Ok(n)
    }

    /// The watermarks in frames, checked.
    pub(crate) fn resolved_watermarks(&self, frames: usize) -> Result<[usize; 3]> {
        let w = match self.watermarks {
            Some(w) => w,
            None => {
                let min = (frames / 128).clamp(2, 8192);
                [min, 2 * min, 3 * min]
            }
        };
        if !(0 < w[0] && w[0] < w[1] && w[1] < w[2] && w[2] < frames) {
            return Err(Error::Config(format!(
                "watermarks {w:?} must satisfy 0 < min < low < high < frames ({frames})"
            )));
        }
        Ok(w)
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.io_threads == 0 || self.io_threads > 256 {
            return Err(Error::Config("io_threads must be between 1 and 256".into()));
        }
        if self.io_requests < self.io_threads || self.io_requests > 65536 {
            return Err(Error::Config(
                "io_requests must be at least io_threads and at most 65536".into(),
            ));
        }
        Ok(())
    }
}

/// What kind of device a spec names.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SwapKind {
    /// A local file used with O_DIRECT. `size: None` means the file's current size.
    File {
        /// Path of the file (created if missing).
        path: PathBuf,
        /// Size in bytes; `None` uses the existing file's size.
        size: Option<u64>,
    },
}

/// A parsed swap device spec, e.g. `file:/var/tmp/app.swap?size=4G&prio=0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapSpec {
    /// The device.
    pub kind: SwapKind,
    /// Priority: higher is used first; equal priorities are striped. Default 0.
    pub prio: i32,
    /// The spec as written.
    pub text: String,
}

impl SwapSpec {
    /// A file device spec built in code.
    pub fn file(path: impl Into<PathBuf>, size: u64) -> SwapSpec {
        let path = path.into();
        SwapSpec {
            text: format!("file:{}?size={size}", path.display()),
            kind: SwapKind::File {
                path,
                size: Some(size),
            },
            prio: 0,
        }
    }

    /// Sets the priority.
    pub fn with_prio(mut self, prio: i32) -> SwapSpec {
        self.prio = prio;
        self
    }

    /// Parses a spec. Errors are `Error::Config` naming the offending part.
    pub fn parse(s: &str) -> Result<SwapSpec> {
        let bad = |why: String| Error::Config(format!("swap spec {s:?}: {why}"));
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("expected SCHEME:…, e.g. file:/var/tmp/app.swap?size=4G".into()))?;
        let (body, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let mut size = None;
        let mut prio = 0i32;
        for kv in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|kv| !kv.is_empty())
        {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("option {kv:?} is not KEY=VALUE")))?;
            match k {
                "size" => size = Some(parse_size(v).map_err(bad)?),
                "prio" => {
                    prio = v
                        .parse::<i32>()
                        .ok()
                        .filter(|p| (-1..=32767).contains(p))
                        .ok_or_else(|| bad(format!("prio {v:?} is not an integer in -1..=32767")))?
                }
                _ => return Err(bad(format!("unknown option {k:?} (known: size, prio)"))),
            }
        }
        let kind = match scheme {
            "file" => {
                if body.is_empty() {
                    return Err(bad("file: needs a path".into()));
                }
                if size == Some(0) {
                    return Err(bad("size must be at least one page".into()));
                }
                SwapKind::File {
                    path: PathBuf::from(body),
                    size,
                }
            }
            "nbd" | "nbd+unix" | "zpool" | "mirror" => {
                return Err(bad(format!("the {scheme} device is not implemented yet")))
            }
            _ => return Err(bad(format!("unknown scheme {scheme:?} (known: file)"))),
        };
        Ok(SwapSpec {
            kind,
            prio,
            text: s.to_string(),
        })
    }
}

impl std::str::FromStr for SwapSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<SwapSpec> {
        SwapSpec::parse(s)
    }
}

/// Parses a byte size: `4096`, `64K`, `256M`, `4G`, `1T`, `512MiB`, `2GB` (powers of 1024).
pub fn parse_size(v: &str) -> std::result::Result<u64, String> {
    let t = v.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {v:?} is not a number with an optional K/M/G/T suffix"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("size {v:?} has an unknown unit {unit:?}")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {v:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_spec() {
        let s = SwapSpec::parse("file:/var/tmp/a.swap?size=4G&prio=5").unwrap();
        assert_eq!(
            s.kind,
            SwapKind::File {
                path: "/var/tmp/a.swap".into(),
                size: Some(4 << 30)
            }
        );
        assert_eq!(s.prio, 5);
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "",
            "file:",
            "file:/x?size=",
            "file:/x?size=12Q",
            "file:/x?prio=abc",
            "file:/x?bogus=1",
            "file:/x?size=0",
            "file:/x?size=99999999999999999999",
            "zzz:/x",
            "nbd://h/x",
            "noscheme",
        ] {
            assert!(
                matches!(SwapSpec::parse(bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("x1").is_err());
        assert!(parse_size("20000000T").is_err());
    }

    #[test]
    fn budget_checks() {
        assert!(Config::default().memory_budget(0).frames().is_err());
        assert!(Config::default().memory_budget(4096 * 15).frames().is_err());
        assert_eq!(
            Config::default().memory_budget(4096 * 16).frames().unwrap(),
            16
        );
        let c = Config::default();
        assert!(c.resolved_watermarks(16).is_ok());
        assert!(c
            .clone()
            .watermarks(3, 2, 5)
            .resolved_watermarks(64)
            .is_err());
    }
}
