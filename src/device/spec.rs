//! Swap device specs: parsing (`file:PATH?size=4G&prio=0`, `nbd://host[:port]/export`,
//! `nbd+unix:///export?socket=PATH`, `mirror:(A,B)`) and opening the device a spec
//! names, in one place (`open`).
//!
//! The size takes the suffixes K, M, G, T (powers of 1024, with or without `iB`). A
//! file device uses O_DIRECT and refuses a file system that does not take it;
//! `direct=0` asks for buffered I/O instead (its page cache is outside the memory
//! budget). NBD
//! follows the NBD URI convention: `nbd://host[:port]/export` (port 10809 by default,
//! `[v6addr]` in brackets) and `nbd+unix:///export?socket=PATH`, with the options
//! `conns=N` (connections when the server allows multi-conn), `timeout=SECONDS` (per
//! request, fractions allowed) and `fua=1` (writes durable before acknowledged). A
//! mirror is `mirror:(A,B)` of two specs, with `?prio=` after the parenthesis. A
//! compressed pool is `zpool:?size=SIZE&algo=lz4|zstd` (size required, lz4 by
//! default); it takes its memory from a Vm's budget, so `Vm::swapon` builds it
//! (`swap::zpool`) and `open` refuses it, as does a mirror leg.

use super::file::{asks_buffered, FileDevice};
use super::mirror::MirrorDevice;
use super::nbd::{NbdAddr, NbdDevice, NbdOptions, DEFAULT_PORT, DEFAULT_TIMEOUT, MAX_CONNS};
use super::BlockDevice;
use crate::error::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How deeply mirrors may nest.
const MAX_SPEC_DEPTH: usize = 4;

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
    /// An export of an NBD server (`nbd://…` or `nbd+unix://…`).
    Nbd {
        /// Where the server listens.
        addr: NbdAddr,
        /// Export name, connections, timeout, FUA.
        options: NbdOptions,
    },
    /// Two devices holding the same pages (`mirror:(A,B)`).
    Mirror {
        /// The two legs.
        legs: Box<[SwapSpec; 2]>,
    },
    /// A compressed pool inside the memory budget (`zpool:?size=64M&algo=lz4`), in
    /// front of the devices of lower priority (see `swap::zpool`).
    Zpool {
        /// The most memory (bytes of budget frames) the pool may hold.
        size: u64,
        /// The compressor.
        algo: Compression,
    },
}

/// The compressor of a `zpool:` device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// LZ4 (`lz4_flex`): fast; the default.
    Lz4,
    /// Zstandard level 1 (`zstd`): a better ratio, slower.
    Zstd,
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

    /// Whether the spec asks for buffered I/O: `direct=0` on a file device, or on a
    /// leg of a mirror. Such a device's page cache is outside the memory budget.
    pub fn buffered(&self) -> bool {
        match &self.kind {
            SwapKind::File { .. } => asks_buffered(&self.text),
            SwapKind::Mirror { legs } => legs.iter().any(SwapSpec::buffered),
            _ => false,
        }
    }

    /// Parses a spec. Errors are `Error::Config` naming the offending part.
    pub fn parse(s: &str) -> Result<SwapSpec> {
        Self::parse_at(s, 0)
    }

    fn parse_at(s: &str, depth: usize) -> Result<SwapSpec> {
        let bad = |why: String| Error::Config(format!("swap spec {s:?}: {why}"));
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("expected SCHEME:…, e.g. file:/var/tmp/app.swap?size=4G".into()))?;
        if scheme == "mirror" {
            return Self::parse_mirror(s, rest, depth);
        }
        let (body, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let mut size = None;
        let mut prio = 0i32;
        let mut socket: Option<PathBuf> = None;
        let mut conns = None;
        let mut timeout = None;
        let mut fua = None;
        let mut direct = None;
        let mut algo = None;
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
                "prio" => prio = parse_prio(v).map_err(bad)?,
                "socket" => {
                    let p = percent_decode(v).map_err(bad)?;
                    if p.is_empty() {
                        return Err(bad("socket= needs a path".into()));
                    }
                    socket = Some(PathBuf::from(p));
                }
                "conns" => {
                    conns = Some(
                        v.parse::<usize>()
                            .ok()
                            .filter(|c| (1..=MAX_CONNS).contains(c))
                            .ok_or_else(|| {
                                bad(format!("conns {v:?} is not an integer in 1..={MAX_CONNS}"))
                            })?,
                    )
                }
                "timeout" => {
                    let t = v
                        .parse::<f64>()
                        .ok()
                        .filter(|t| t.is_finite() && *t >= 0.001 && *t <= 3600.0)
                        .ok_or_else(|| {
                            bad(format!("timeout {v:?} is not a number of seconds in 0.001..=3600"))
                        })?;
                    timeout = Some(Duration::from_secs_f64(t));
                }
                "sparse" => {
                    if v != "0" && v != "1" {
                        return Err(bad(format!("sparse {v:?} is not 0 or 1")));
                    }
                    if scheme != "file" {
                        return Err(bad("sparse= applies to file devices only".into()));
                    }
                }
                "direct" => {
                    direct = Some(match v {
                        "1" => true,
                        "0" => false,
                        _ => return Err(bad(format!("direct {v:?} is not 0 or 1"))),
                    })
                }
                "algo" => {
                    algo = Some(match v {
                        "lz4" => Compression::Lz4,
                        "zstd" => Compression::Zstd,
                        _ => return Err(bad(format!("algo {v:?} is not lz4 or zstd"))),
                    })
                }
                "fua" => {
                    fua = Some(match v {
                        "1" | "on" | "true" | "yes" => true,
                        "0" | "off" | "false" | "no" => false,
                        _ => return Err(bad(format!("fua {v:?} is not on/off"))),
                    })
                }
                _ => {
                    return Err(bad(format!(
                        "unknown option {k:?} (known: size, prio; for files: direct, sparse; for nbd: socket, conns, timeout, fua; for zpool: algo)"
                    )))
                }
            }
        }
        let nbd_only = socket.is_some() || conns.is_some() || timeout.is_some() || fua.is_some();
        if algo.is_some() && scheme != "zpool" {
            return Err(bad("algo= applies to zpool devices only".into()));
        }
        let kind = match scheme {
            "file" => {
                if body.is_empty() {
                    return Err(bad("file: needs a path".into()));
                }
                if size == Some(0) {
                    return Err(bad("size must be at least one page".into()));
                }
                if nbd_only {
                    return Err(bad("socket, conns, timeout and fua apply to nbd devices only".into()));
                }
                SwapKind::File {
                    path: PathBuf::from(body),
                    size,
                }
            }
            "nbd" | "nbd+unix" => {
                if size.is_some() {
                    return Err(bad("an nbd device has the export's size (no size=)".into()));
                }
                if direct.is_some() {
                    return Err(bad("direct= applies to file devices only".into()));
                }
                let path = body.strip_prefix("//").ok_or_else(|| {
                    bad(format!("expected {scheme}://HOST[:PORT]/EXPORT (the URI needs //)"))
                })?;
                let (authority, export) = match path.split_once('/') {
                    Some((a, e)) => (a, e),
                    None => (path, ""),
                };
                let export = percent_decode(export).map_err(bad)?;
                if export.len() > 4096 {
                    return Err(bad("export name longer than 4096 bytes".into()));
                }
                let addr = if scheme == "nbd" {
                    if socket.is_some() {
                        return Err(bad("socket= belongs to nbd+unix://".into()));
                    }
                    let (host, port) = parse_authority(authority).map_err(bad)?;
                    NbdAddr::Tcp { host, port }
                } else {
                    if !authority.is_empty() {
                        return Err(bad(format!(
                            "nbd+unix takes no host ({authority:?}): nbd+unix:///EXPORT?socket=PATH"
                        )));
                    }
                    NbdAddr::Unix(socket.ok_or_else(|| {
                        bad("nbd+unix needs ?socket=PATH".into())
                    })?)
                };
                SwapKind::Nbd {
                    addr,
                    options: NbdOptions {
                        export,
                        conns,
                        timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
                        fua: fua.unwrap_or(false),
                        wait_for_reconnect: true,
                    },
                }
            }
            "nbds" | "nbds+unix" | "nbd+vsock" | "nbds+vsock" => {
                return Err(bad(format!(
                    "{scheme}: is not supported (TLS and vsock are not implemented; use nbd:// or nbd+unix://)"
                )))
            }
            "zpool" => {
                if !body.is_empty() {
                    return Err(bad(format!(
                        "a zpool has no path ({body:?}): zpool:?size=SIZE&algo=lz4|zstd"
                    )));
                }
                if nbd_only || direct.is_some() {
                    return Err(bad(
                        "a zpool takes size, algo and prio only (socket, conns, timeout, fua and direct do not apply)"
                            .into(),
                    ));
                }
                let size = size.ok_or_else(|| bad("a zpool needs size=, e.g. zpool:?size=64M".into()))?;
                if size < crate::addr::PAGE_SIZE as u64 {
                    return Err(bad("a zpool's size must be at least one page (4096)".into()));
                }
                SwapKind::Zpool {
                    size,
                    algo: algo.unwrap_or(Compression::Lz4),
                }
            }
            _ => {
                return Err(bad(format!(
                    "unknown scheme {scheme:?} (known: file, nbd, nbd+unix, mirror, zpool)"
                )))
            }
        };
        Ok(SwapSpec {
            kind,
            prio,
            text: s.to_string(),
        })
    }

    /// `mirror:(A,B)[?prio=N]`; `rest` is what follows `mirror:`.
    fn parse_mirror(s: &str, rest: &str, depth: usize) -> Result<SwapSpec> {
        let bad = |why: String| Error::Config(format!("swap spec {s:?}: {why}"));
        if depth >= MAX_SPEC_DEPTH {
            return Err(bad(format!("mirrors nested deeper than {MAX_SPEC_DEPTH}")));
        }
        let inner = rest
            .strip_prefix('(')
            .ok_or_else(|| bad("expected mirror:(A,B)".into()))?;
        // Find the closing parenthesis and the top-level comma.
        let mut level = 0usize;
        let mut comma = None;
        let mut close = None;
        for (i, c) in inner.char_indices() {
            match c {
                '(' => level += 1,
                ')' if level == 0 => {
                    close = Some(i);
                    break;
                }
                ')' => level -= 1,
                ',' if level == 0 => {
                    if comma.is_some() {
                        return Err(bad("a mirror has exactly two legs: mirror:(A,B)".into()));
                    }
                    comma = Some(i);
                }
                _ => {}
            }
        }
        let close = close.ok_or_else(|| bad("missing ')' in mirror:(A,B)".into()))?;
        let comma =
            comma.ok_or_else(|| bad("a mirror has exactly two legs: mirror:(A,B)".into()))?;
        let a = inner[..comma].trim();
        let b = inner[comma + 1..close].trim();
        if a.is_empty() || b.is_empty() {
            return Err(bad("a mirror leg is empty".into()));
        }
        let after = &inner[close + 1..];
        let mut prio = 0;
        if !after.is_empty() {
            let q = after
                .strip_prefix('?')
                .ok_or_else(|| bad(format!("unexpected {after:?} after mirror:(A,B)")))?;
            for kv in q.split('&').filter(|kv| !kv.is_empty()) {
                match kv.split_once('=') {
                    Some(("prio", v)) => prio = parse_prio(v).map_err(bad)?,
                    _ => return Err(bad(format!("unknown mirror option {kv:?} (known: prio)"))),
                }
            }
        }
        let legs = Box::new([Self::parse_at(a, depth + 1)?, Self::parse_at(b, depth + 1)?]);
        if legs
            .iter()
            .any(|l| matches!(l.kind, SwapKind::Zpool { .. }))
        {
            return Err(bad(
                "a zpool cannot be a mirror leg (it lives in memory)".into()
            ));
        }
        Ok(SwapSpec {
            kind: SwapKind::Mirror { legs },
            prio,
            text: s.to_string(),
        })
    }
}

fn parse_prio(v: &str) -> std::result::Result<i32, String> {
    v.parse::<i32>()
        .ok()
        .filter(|p| (-1..=32767).contains(p))
        .ok_or_else(|| format!("prio {v:?} is not an integer in -1..=32767"))
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn parse_authority(a: &str) -> std::result::Result<(String, u16), String> {
    let (host, port) = if let Some(r) = a.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| format!("unclosed '[' in {a:?}"))?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("bad text after ']' in {a:?}"))?,
                ),
            ),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return Err(format!("IPv6 address {a:?} must be in brackets")),
            None => (a, None),
        }
    };
    if host.is_empty() {
        return Err("nbd:// needs a host".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("port {p:?} is not in 1..=65535"))?,
    };
    Ok((host.to_string(), port))
}

/// Decodes `%XX` escapes (URI paths and query values).
fn percent_decode(v: &str) -> std::result::Result<String, String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in {v:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{v:?} is not UTF-8 after %-decoding"))
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

/// Opens the device `spec` names. A leg of a mirror (`leg`) fails fast when its NBD
/// server is unreachable (the other leg answers) instead of waiting to reconnect.
pub(crate) fn open(spec: &SwapSpec, leg: bool) -> Result<Arc<dyn BlockDevice>> {
    Ok(match &spec.kind {
        SwapKind::File { path, size } => Arc::new(FileDevice::open_with(
            path,
            *size,
            &spec.text,
            !spec.buffered(),
        )?),
        SwapKind::Nbd { addr, options } => {
            let mut o = options.clone();
            if leg {
                o.wait_for_reconnect = false;
            }
            Arc::new(NbdDevice::connect(addr, &o, &spec.text)?)
        }
        SwapKind::Mirror { legs } => {
            let a = open(&legs[0], true)?;
            let b = open(&legs[1], true)?;
            Arc::new(MirrorDevice::new(a, b, &spec.text)?)
        }
        SwapKind::Zpool { .. } => {
            return Err(Error::Config(format!(
            "swap spec {:?}: a zpool takes its memory from a Vm's budget: open it with Vm::swapon",
            spec.text
        )))
        }
    })
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
            "nbd://",
            "noscheme",
        ] {
            assert!(
                matches!(SwapSpec::parse(bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_nbd_specs() {
        let s = SwapSpec::parse("nbd://10.0.0.7:10900/swap?prio=10&conns=4&timeout=2.5").unwrap();
        assert_eq!(s.prio, 10);
        assert_eq!(
            s.kind,
            SwapKind::Nbd {
                addr: NbdAddr::Tcp {
                    host: "10.0.0.7".into(),
                    port: 10900
                },
                options: NbdOptions {
                    export: "swap".into(),
                    conns: Some(4),
                    timeout: Duration::from_millis(2500),
                    fua: false,
                    wait_for_reconnect: true,
                }
            }
        );
        let s = SwapSpec::parse("nbd://server").unwrap();
        assert_eq!(
            s.kind,
            SwapKind::Nbd {
                addr: NbdAddr::Tcp {
                    host: "server".into(),
                    port: 10809
                },
                options: NbdOptions::default()
            }
        );
        let s = SwapSpec::parse("nbd://[::1]:99/a%20b?fua=1").unwrap();
        let SwapKind::Nbd { addr, options } = s.kind else {
            panic!()
        };
        assert_eq!(
            addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        assert_eq!(options.export, "a b");
        assert!(options.fua);
        let s = SwapSpec::parse("nbd+unix:///swap?socket=/run/nbd.sock&timeout=1").unwrap();
        let SwapKind::Nbd { addr, options } = s.kind else {
            panic!()
        };
        assert_eq!(addr, NbdAddr::Unix("/run/nbd.sock".into()));
        assert_eq!(options.export, "swap");
        assert_eq!(options.timeout, Duration::from_secs(1));
        let s = SwapSpec::parse("nbd+unix:///?socket=/s").unwrap();
        assert!(matches!(s.kind, SwapKind::Nbd { options, .. } if options.export.is_empty()));
    }

    #[test]
    fn rejects_bad_nbd_specs() {
        for bad in [
            "nbd:host/x",
            "nbd:///x",
            "nbd://h:0/x",
            "nbd://h:70000/x",
            "nbd://h:port/x",
            "nbd://::1/x",
            "nbd://[::1/x",
            "nbd://h/x?size=1G",
            "nbd://h/x?socket=/s",
            "nbd://h/x?conns=0",
            "nbd://h/x?conns=17",
            "nbd://h/x?timeout=0",
            "nbd://h/x?timeout=-1",
            "nbd://h/x?timeout=nan",
            "nbd://h/x?fua=maybe",
            "nbd://h/%zz",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///x?socket=",
            "nbds://h/x",
            "file:/x?size=1G&conns=2",
        ] {
            assert!(
                matches!(SwapSpec::parse(bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_mirror_specs() {
        let s = SwapSpec::parse(
            "mirror:(nbd+unix:///a?socket=/s1&timeout=1,file:/tmp/x?size=1M)?prio=3",
        )
        .unwrap();
        assert_eq!(s.prio, 3);
        let SwapKind::Mirror { legs } = &s.kind else {
            panic!("{s:?}")
        };
        assert!(matches!(legs[0].kind, SwapKind::Nbd { .. }));
        assert_eq!(
            legs[1].kind,
            SwapKind::File {
                path: "/tmp/x".into(),
                size: Some(1 << 20)
            }
        );
        let n =
            SwapSpec::parse("mirror:(mirror:(file:/a?size=1M,file:/b?size=1M),nbd://h/x)").unwrap();
        let SwapKind::Mirror { legs } = &n.kind else {
            panic!()
        };
        assert!(matches!(legs[0].kind, SwapKind::Mirror { .. }));
        for bad in [
            "mirror:",
            "mirror:()",
            "mirror:(file:/a?size=1M)",
            "mirror:(file:/a?size=1M,)",
            "mirror:(file:/a?size=1M,file:/b?size=1M,file:/c?size=1M)",
            "mirror:(file:/a?size=1M,file:/b?size=1M",
            "mirror:(file:/a?size=1M,file:/b?size=1M)x",
            "mirror:(file:/a?size=1M,file:/b?size=1M)?size=3",
            "mirror:(file:/a?size=1M,bogus:x)",
            "mirror:(mirror:(mirror:(mirror:(mirror:(file:/a?size=1M,file:/b?size=1M),file:/c),file:/d),file:/e),file:/f)",
        ] {
            assert!(
                matches!(SwapSpec::parse(bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_zpool_specs() {
        let s = SwapSpec::parse("zpool:?size=64M&algo=zstd&prio=10").unwrap();
        assert_eq!(
            s.kind,
            SwapKind::Zpool {
                size: 64 << 20,
                algo: Compression::Zstd
            }
        );
        assert_eq!(s.prio, 10);
        let s = SwapSpec::parse("zpool:?size=1G").unwrap();
        assert_eq!(
            s.kind,
            SwapKind::Zpool {
                size: 1 << 30,
                algo: Compression::Lz4
            }
        );
    }

    #[test]
    fn rejects_bad_zpool_specs() {
        for (bad, why) in [
            ("zpool:", "needs size"),
            ("zpool:?algo=lz4", "needs size"),
            ("zpool:?size=0", "at least one page"),
            ("zpool:?size=100", "at least one page"),
            ("zpool:?size=64M&algo=gzip", "is not lz4 or zstd"),
            ("zpool:?size=64M&algo=", "is not lz4 or zstd"),
            ("zpool:/tmp/x?size=64M", "has no path"),
            ("zpool:?size=64M&conns=2", "size, algo and prio only"),
            ("zpool:?size=64M&direct=0", "size, algo and prio only"),
            ("zpool:?size=64M&prio=x", "prio"),
            ("zpool:?size=64M&level=3", "unknown option"),
            ("zpool:?size=12Q", "unknown unit"),
            ("file:/x?size=1M&algo=lz4", "zpool devices only"),
            ("mirror:(zpool:?size=1M,file:/x?size=1M)", "mirror leg"),
        ] {
            match SwapSpec::parse(bad) {
                Err(Error::Config(m)) => assert!(m.contains(why), "{bad}: {m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let z = SwapSpec::parse("zpool:?size=1M").unwrap();
        assert!(matches!(open(&z, false), Err(Error::Config(_))));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("x1").is_err());
        assert!(parse_size("20000000T").is_err());
    }
}
