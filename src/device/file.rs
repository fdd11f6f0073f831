//! The file device: a local file read and written in page-sized slots with
//! positioned I/O (`pread`/`pwrite`) and O_DIRECT, so swapped pages bypass the page
//! cache and do not count against the machine's memory behind our budget. A file
//! system that refuses O_DIRECT is an error unless the caller asked for buffered I/O
//! (`direct=0` in the spec): never a silent fallback.
//!
//! One device per file: `open` takes an exclusive `flock` on it (held until the
//! device is dropped), so a second swap device on the same file — another Vm,
//! another process — is refused instead of overwriting this one's pages.
//!
//! `read_scattered` (readahead of pages in scattered slots) keeps its reads in
//! flight at once through io_uring (`super::uring`) where it works, else reads
//! them one by one. A thread whose reads are polled (`super::uring::polled`: the
//! fault paths, `Config::read_poll`) reads through its ring too, and watches for
//! the completion instead of sleeping.
//!
//! No locks in the engine's sense: positioned I/O on one descriptor is safe from
//! many threads. No
//! allocation on the I/O paths, errors included (they run on page-I/O threads):
//! errors are built from an `ErrorKind` or an errno, never from a formatted message.

use super::BlockDevice;
use crate::addr::PAGE_SIZE;
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A swap file.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    name: String,
    path: PathBuf,
    pages: u64,
    direct: bool,
    /// Whether `read_scattered` uses io_uring (`super::uring::available`).
    uring: bool,
}

/// Whether `text`, a file spec, carries `direct=0` (a file device named by its spec
/// text reads the option from it; `SwapKind::File` keeps its two fields).
pub(crate) fn asks_sparse(text: &str) -> bool {
    text.starts_with("file:")
        && text.split_once('?').and_then(|(_, q)| {
            q.split('&')
                .filter_map(|kv| kv.strip_prefix("sparse="))
                .next_back()
        }) == Some("1")
}

/// Whether `text`, a file spec, carries `direct=0`.
pub(crate) fn asks_buffered(text: &str) -> bool {
    text.starts_with("file:")
        && text.split_once('?').and_then(|(_, q)| {
            q.split('&')
                .filter_map(|kv| kv.strip_prefix("direct="))
                .next_back()
        }) == Some("0")
}

impl FileDevice {
    /// Opens (or creates) `path` as a swap file of `size` bytes (rounded down to
    /// pages); `None` takes the existing file's size. Space is allocated up front
    /// with `fallocate` so a full disk shows here and not at page-out time.
    ///
    /// `name` is the device's name, its spec when opened from one: the file is used
    /// with O_DIRECT unless `name` is a file spec with `direct=0` (see [`open_with`]).
    ///
    /// Errors: `Error::Config` for a size under one page or a missing file without a
    /// size; `Error::Io` when the file cannot be created, opened or sized, or its
    /// file system refuses O_DIRECT.
    ///
    /// [`open_with`]: FileDevice::open_with
    pub fn open(path: &Path, size: Option<u64>, name: &str) -> Result<FileDevice> {
        Self::open_with(path, size, name, !asks_buffered(name))
    }

    /// [`open`](FileDevice::open) with the I/O mode given: `direct` opens with
    /// O_DIRECT and fails (`Error::Io`, kind `InvalidInput`, naming the path) where
    /// the file system refuses it (ramfs, tmpfs before Linux 6.6, some overlay and
    /// FUSE setups); `!direct` uses buffered I/O, whose page cache is outside the
    /// memory budget.
    pub fn open_with(
        path: &Path,
        size: Option<u64>,
        name: &str,
        direct: bool,
    ) -> Result<FileDevice> {
        let ctx = |what: &str, e: io::Error| {
            Error::Io(io::Error::new(
                e.kind(),
                format!("{what} swap file {}: {e}", path.display()),
            ))
        };
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(size.is_some());
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = match opts.open(path) {
            Ok(f) => f,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "swap file {}: the file system refused O_DIRECT ({e}); buffered I/O \
                         would keep swapped pages in the page cache, outside the memory \
                         budget. Put the file on a disk file system, or add direct=0 to \
                         the spec (file:PATH?size=SIZE&direct=0) to allow buffered I/O",
                        path.display()
                    ),
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && size.is_none() => {
                return Err(Error::Config(format!(
                    "swap file {} does not exist; give a size (file:PATH?size=1G) to create it",
                    path.display()
                )))
            }
            Err(e) => return Err(ctx("cannot open", e)),
        };
        // One user per file: two swap devices on one file (two Vms, two processes,
        // or a `usermm exec` program and a child that execs) would each hand out
        // its slots from the start and overwrite the other's pages. An exclusive
        // lock on the open file (released when the device is dropped, shared with
        // descriptors duplicated from it) makes the second one fail here instead.
        // SAFETY: plain syscall on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::Config(format!(
                    "swap file {} is in use by another swap device (usermm holds a lock on \
                     it while it swaps there); two users of one file would overwrite each \
                     other's pages: give each its own file",
                    path.display()
                )));
            }
            return Err(ctx("cannot lock", e));
        }
        let meta = file.metadata().map_err(|e| ctx("cannot stat", e))?;
        if !meta.is_file() {
            return Err(Error::Config(format!(
                "swap file {} is not a regular file",
                path.display()
            )));
        }
        let bytes = match size {
            Some(s) => {
                let s = s / PAGE_SIZE as u64 * PAGE_SIZE as u64;
                if meta.len() < s {
                    let len =
                        i64::try_from(s).map_err(|_| Error::Config("size too large".into()))?;
                    if asks_sparse(name) {
                        // `sparse=1`: blocks are allocated as pages are written; a
                        // full disk then shows as a failed page-out (the page stays
                        // resident), not here.
                        file.set_len(s).map_err(|e| ctx("cannot size", e))?;
                    } else {
                        // SAFETY: plain syscall on a descriptor we own; no memory is
                        // passed.
                        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
                        if rc != 0 {
                            return Err(ctx("cannot allocate", io::Error::from_raw_os_error(rc)));
                        }
                    }
                }
                s
            }
            None => meta.len() / PAGE_SIZE as u64 * PAGE_SIZE as u64,
        };
        let pages = bytes / PAGE_SIZE as u64;
        if pages == 0 {
            return Err(Error::Config(format!(
                "swap file {} is smaller than one page",
                path.display()
            )));
        }
        Ok(FileDevice {
            file,
            name: name.to_string(),
            path: path.to_path_buf(),
            pages,
            direct,
            uring: super::uring::available(),
        })
    }

    /// Whether the file is used with O_DIRECT (false only when buffered I/O was
    /// asked for).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn offset(&self, slot: u64) -> io::Result<i64> {
        if slot >= self.pages {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        Ok((slot * PAGE_SIZE as u64) as i64)
    }

    /// A read of whole pages at byte offset `off` through the thread's ring, when
    /// the caller polls its reads (`super::uring::polled`) and io_uring works
    /// (`self.uring`); `None` otherwise (the caller reads with `pread`).
    fn polled_read(&self, off: i64, buf: &mut [u8]) -> Option<io::Result<()>> {
        if !self.uring || !super::uring::polling() {
            return None;
        }
        super::uring::read_at(self.file.as_raw_fd(), off as u64, buf)
    }
}

fn check_buf(len: usize) -> io::Result<()> {
    if len != PAGE_SIZE {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    Ok(())
}

impl BlockDevice for FileDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn pages(&self) -> u64 {
        self.pages
    }
    fn read_page(&self, slot: u64, buf: &mut [u8]) -> io::Result<()> {
        check_buf(buf.len())?;
        let off = self.offset(slot)?;
        if let Some(r) = self.polled_read(off, buf) {
            return r;
        }
        loop {
            // SAFETY: `buf` is a live exclusive buffer of PAGE_SIZE bytes; the kernel
            // writes at most that many bytes into it.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    PAGE_SIZE,
                    off,
                )
            };
            match n {
                n if n == PAGE_SIZE as isize => return Ok(()),
                -1 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                // A short read (the file shrank under us): no message, no allocation.
                _ => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }
    fn write_page(&self, slot: u64, buf: &[u8]) -> io::Result<()> {
        check_buf(buf.len())?;
        let off = self.offset(slot)?;
        loop {
            // SAFETY: `buf` is a live buffer of PAGE_SIZE bytes; the kernel only reads it.
            let n =
                unsafe { libc::pwrite(self.file.as_raw_fd(), buf.as_ptr().cast(), PAGE_SIZE, off) };
            match n {
                n if n == PAGE_SIZE as isize => return Ok(()),
                -1 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                // A short write (file size limit, full file system): no allocation.
                _ => return Err(io::ErrorKind::WriteZero.into()),
            }
        }
    }
    fn merges_writes(&self) -> bool {
        true
    }
    fn write_pages(&self, first: u64, bufs: &[&[u8]]) -> io::Result<()> {
        const MAX: usize = super::uring::MAX_WRITES;
        if bufs.is_empty() || bufs.len() > MAX || bufs.iter().any(|b| b.len() != PAGE_SIZE) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let off = self.offset(first)?;
        self.offset(first + bufs.len() as u64 - 1)?;
        // On the stack: page-out allocates nothing (invariant 2).
        let iov = super::uring::iovecs(bufs);
        let total = bufs.len() * PAGE_SIZE;
        loop {
            // SAFETY: every iovec points to a live page-sized buffer the kernel only
            // reads; the count is at most MAX.
            let n = unsafe {
                libc::pwritev(self.file.as_raw_fd(), iov.as_ptr(), bufs.len() as i32, off)
            };
            if n == total as isize {
                return Ok(());
            }
            if n == -1 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // A short write: finish page by page from the first page not fully done.
            let done = n.max(0) as usize / PAGE_SIZE;
            for (i, b) in bufs.iter().enumerate().skip(done) {
                self.write_page(first + i as u64, b)?;
            }
            return Ok(());
        }
    }
    fn write_runs(&self, runs: &[(u64, u32)], bufs: &[&[u8]], ok: &mut [bool]) {
        if self.uring && runs.len() <= super::uring::MAX_WRITES {
            // Byte offsets, checked like `write_pages` checks them.
            let mut reqs = [(0u64, 0u32); super::uring::MAX_WRITES];
            let valid = runs.iter().zip(reqs.iter_mut()).all(|(&(first, n), r)| {
                let end = first.checked_add(u64::from(n).saturating_sub(1));
                match (self.offset(first), end.map(|e| self.offset(e))) {
                    (Ok(off), Some(Ok(_))) if n > 0 => {
                        *r = (off as u64, n);
                        true
                    }
                    _ => false,
                }
            });
            if valid
                && bufs.iter().all(|b| b.len() == PAGE_SIZE)
                && super::uring::write_runs(self.file.as_raw_fd(), &reqs[..runs.len()], bufs, ok)
                    .is_some()
            {
                // A run the ring did not write whole (an error, a short write, an
                // operation the kernel refuses) gets one `pwritev` more, which
                // finishes a short write page by page, as on the path below.
                super::each_run(runs, bufs, ok, |first, b, o| {
                    if !*o {
                        *o = self.write_pages(first, b).is_ok();
                    }
                });
                return;
            }
        }
        super::write_runs_in_turn(self, runs, bufs, ok)
    }
    fn writes_through_uring(&self) -> bool {
        self.uring
    }
    fn read_scattered(&self, runs: &[(u64, u32)], buf: &mut [u8]) -> io::Result<()> {
        let n = runs.len();
        let pages: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
        if n == 0 || n > super::uring::MAX_READS || buf.len() as u64 != pages * PAGE_SIZE as u64 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut reqs = [(0u64, 0u32); super::uring::MAX_READS];
        for (r, &(first, count)) in reqs.iter_mut().zip(runs) {
            if count == 0 || first.saturating_add(u64::from(count)) > self.pages {
                return Err(io::ErrorKind::InvalidInput.into());
            }
            *r = (self.offset(first)? as u64, count * PAGE_SIZE as u32);
        }
        if self.uring && (n > 1 || super::uring::polling()) {
            if let Some(r) = super::uring::read_scattered(self.file.as_raw_fd(), &reqs[..n], buf) {
                return r;
            }
        }
        let mut at = 0;
        for &(first, count) in runs {
            let len = count as usize * PAGE_SIZE;
            self.read_pages(first, &mut buf[at..at + len])?;
            at += len;
        }
        Ok(())
    }
    fn reads_concurrently(&self) -> bool {
        self.uring
    }
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = buf.len() / PAGE_SIZE;
        if n == 0
            || !buf.len().is_multiple_of(PAGE_SIZE)
            || first.saturating_add(n as u64) > self.pages
        {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        if let Some(r) = self.polled_read(self.offset(first)?, buf) {
            return r;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let off = self.offset(first)? + done as i64;
            // SAFETY: `buf[done..]` is a live exclusive buffer; the kernel writes at most
            // its length.
            let r = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    buf[done..].as_mut_ptr().cast(),
                    buf.len() - done,
                    off,
                )
            };
            match r {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                -1 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                r => done += r as usize,
            }
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn shared_fd(&self) -> Option<std::os::fd::RawFd> {
        // Slot `s` is at `s * PAGE_SIZE` (`offset`); positioned reads need no shared
        // file position.
        Some(self.file.as_raw_fd())
    }
    fn discard(&self, first: u64, count: u64) -> io::Result<()> {
        let off = self.offset(first)?;
        let len = count
            .saturating_mul(PAGE_SIZE as u64)
            .min((self.pages - first) * PAGE_SIZE as u64);
        // SAFETY: plain syscall on a descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len as i64,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
