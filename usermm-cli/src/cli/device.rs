//! The device-limit reference of `usermm bench`: random 4 KiB reads and writes
//! with O_DIRECT on a file in the same directory (so the same file system) as the
//! swap files, at a given queue depth (that many threads, each with one request in
//! flight). Reads are made the way usermm's faults make theirs: through a
//! `FileDevice`, polled for their completion (`usermm::device::with_read_poll`,
//! `Config::read_poll`'s default), so that usermm's miss path is compared with the
//! fastest the device answers the same requests, not with a `pread` that sleeps.

use super::util::{self, Registered, Undo};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use usermm::config::DEFAULT_READ_POLL;
use usermm::device::file::FileDevice;
use usermm::device::{with_read_poll, BlockDevice};
use usermm::PAGE_SIZE;
use usermm_testkit::driver::LatHist;
use usermm_testkit::workload::Rng;

/// A page-aligned heap buffer.
#[derive(Debug)]
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, fill: u8) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, PAGE_SIZE).expect("layout");
        // SAFETY: non-zero size (callers pass at least a page).
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: `ptr` is valid for `len` bytes.
        unsafe { std::ptr::write_bytes(ptr, fill, len) };
        AlignedBuf { ptr, len }
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: valid and initialised for `len` bytes, owned by us.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, PAGE_SIZE).expect("layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// A read or a write probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Random 4 KiB reads.
    Read,
    /// Random 4 KiB writes.
    Write,
    /// Sequential reads of `SEQ_PAGES` pages, each thread from a random page of its
    /// own, wrapping around; counted in 4 KiB pages (so its "IOPS" are pages/s,
    /// comparable with a scan's accesses/s).
    SeqRead,
}

/// Pages per `Op::SeqRead` request: 128 KiB, the kernel's default readahead and
/// about usermm's largest readahead span.
pub const SEQ_PAGES: usize = 32;

impl Op {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::SeqRead => "seqread",
        }
    }
}

/// What a probe measured.
#[derive(Debug, Clone, Default)]
pub struct ProbeResult {
    /// Operations completed.
    pub ops: u64,
    /// Seconds.
    pub secs: f64,
    /// Latency of every operation.
    pub hist: LatHist,
}

impl ProbeResult {
    /// Operations per second.
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }
}

/// The probe file: written through once (so reads hit real blocks, not unwritten
/// extents that read as zeros without I/O), deleted on drop.
#[derive(Debug)]
pub struct ProbeFile {
    path: PathBuf,
    file: File,
    pages: u64,
    /// Whether O_DIRECT was refused (tmpfs…) and buffered I/O is used instead.
    pub buffered: bool,
    /// The same file as a swap device, for the reads (opened once it is written).
    dev: Option<FileDevice>,
    undo: Registered,
}

impl ProbeFile {
    /// Creates a probe file of `bytes` in `dir`.
    pub fn create(dir: &Path, bytes: u64) -> Result<ProbeFile, String> {
        let tmp = tempfile::Builder::new()
            .prefix("usermm-probe-")
            .suffix(".dat")
            .tempfile_in(dir)
            .map_err(|e| format!("cannot create a probe file in {}: {e}", dir.display()))?;
        let (_, path) = tmp
            .keep()
            .map_err(|e| format!("cannot keep the probe file: {e}"))?;
        let undo = util::register(Undo::RemoveFile(path.clone()));
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let (file, buffered) = match open(true) {
            Ok(f) => (f, false),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match open(false) {
                Ok(f) => (f, true),
                Err(e) => {
                    let _ = undo.run();
                    return Err(format!("cannot open {}: {e}", path.display()));
                }
            },
            Err(e) => {
                let _ = undo.run();
                return Err(format!("cannot open {}: {e}", path.display()));
            }
        };
        let pages = (bytes / PAGE_SIZE as u64).max(256);
        let mut pf = ProbeFile {
            path,
            file,
            pages,
            buffered,
            dev: None,
            undo,
        };
        // Write it through, 1 MiB at a time, with non-zero data.
        let chunk = 1usize << 20;
        let buf = AlignedBuf::new(chunk, 0xA5);
        let total = pages * PAGE_SIZE as u64;
        let mut off = 0u64;
        while off < total {
            let n = chunk.min((total - off) as usize);
            pf.file
                .write_all_at(&buf.as_slice()[..n], off)
                .map_err(|e| format!("cannot write the probe file {}: {e}", pf.path.display()))?;
            off += n as u64;
        }
        pf.file
            .sync_all()
            .map_err(|e| format!("cannot sync the probe file: {e}"))?;
        pf.dev = Some(
            FileDevice::open_with(&pf.path, None, "probe", !buffered)
                .map_err(|e| format!("cannot open the probe file as a device: {e}"))?,
        );
        Ok(pf)
    }

    /// `op`s at queue depth `depth` for `dur` (random 4 KiB reads or writes, or
    /// sequential 128 KiB reads counted in pages).
    pub fn probe(
        &self,
        op: Op,
        depth: u32,
        dur: Duration,
        seed: u64,
    ) -> Result<ProbeResult, String> {
        let stop = AtomicBool::new(false);
        let start = Instant::now();
        let results: Vec<Result<(u64, LatHist), String>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..depth)
                .map(|t| {
                    let stop = &stop;
                    s.spawn(move || {
                        with_read_poll(DEFAULT_READ_POLL, || {
                            let dev = self.dev.as_ref().ok_or("the probe file has no device")?;
                            let mut rng = Rng::new(
                                seed ^ (u64::from(t) + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93),
                            );
                            let mut buf = AlignedBuf::new(PAGE_SIZE * SEQ_PAGES, 0x5A);
                            let mut hist = LatHist::default();
                            let mut n = 0u64;
                            let seq = self.pages / SEQ_PAGES as u64;
                            let mut next = rng.below(seq.max(1));
                            while !stop.load(Ordering::Relaxed) {
                                let t0 = Instant::now();
                                let (r, off, pages) = match op {
                                    Op::Read | Op::Write => {
                                        let off = rng.below(self.pages) * PAGE_SIZE as u64;
                                        let b = &mut buf.as_mut_slice()[..PAGE_SIZE];
                                        let r = if op == Op::Read {
                                            dev.read_page(off / PAGE_SIZE as u64, b)
                                        } else {
                                            self.file.write_all_at(b, off)
                                        };
                                        (r, off, 1)
                                    }
                                    Op::SeqRead => {
                                        let off = next * (SEQ_PAGES * PAGE_SIZE) as u64;
                                        next = (next + 1) % seq.max(1);
                                        let first = off / PAGE_SIZE as u64;
                                        let r = dev.read_pages(first, buf.as_mut_slice());
                                        (r, off, SEQ_PAGES as u64)
                                    }
                                };
                                if let Err(e) = r {
                                    stop.store(true, Ordering::Relaxed);
                                    return Err(format!("{} at {off}: {e}", op.name()));
                                }
                                hist.record(t0.elapsed().as_nanos() as u64);
                                n += pages;
                            }
                            Ok((n, hist))
                        })
                    })
                })
                .collect();
            let end = start + dur;
            while Instant::now() < end && !stop.load(Ordering::Relaxed) && !util::interrupted() {
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, Ordering::Relaxed);
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let secs = start.elapsed().as_secs_f64();
        let mut r = ProbeResult {
            secs,
            ..Default::default()
        };
        for x in results {
            let (n, h) = x?;
            r.ops += n;
            r.hist.merge(&h);
        }
        if util::interrupted() {
            return Err("interrupted".into());
        }
        Ok(r)
    }
}

impl Drop for ProbeFile {
    fn drop(&mut self) {
        if let Err(e) = self.undo.run() {
            eprintln!("usermm bench: cleanup: {e}");
        }
    }
}
