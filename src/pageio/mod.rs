//! Page-I/O threads and the preallocated page-out request pool (the kpiod of seed 000).
//!
//! Keeps docs/design.md invariants 1 and 2. Reclaim never writes a page itself: it copies
//! the page into a request buffer under the frame lock, queues the request and goes
//! on; a page-I/O thread writes it and runs the completion. Every request and every
//! buffer is allocated when the Vm starts (`io_requests` of them, one 4 KiB buffer
//! each, mapped once): taking a request pops a lock-free queue, submitting pushes one,
//! and neither allocates. When the pool is empty, reclaim skips dirty pages and looks
//! for clean ones; page-out progresses as long as the device answers.
//!
//! The I/O threads never allocate frames and never wait for reclaim, so they cannot
//! recurse into waiting on themselves.
//!
//! With `Config::uring_writes` (off by default) the pool's buffers are also registered
//! with io_uring once, here (`device::uring::Registered`), and each thread clones
//! that registration into its own ring as it starts, before its no-allocation
//! section: a swap file's page-outs then name the buffers by index
//! (`BlockDevice::write_runs`).
//!
//! ## Locking
//! `sleep` (Mutex<()>) only pairs with `wake` to park idle I/O threads; a kick
//! takes it after pushing, so an idle thread cannot miss work once kicked (kswapd
//! pushes up to `reclaim::KICK_BATCH` before it kicks, and kicks before it waits).
//! A kick wakes one thread; a thread that has taken its batch with more queued
//! kicks the next. Leaf lock.

use crate::addr::PAGE_SIZE;
use crate::device::AlignedPages;
use crate::sync::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};
use crossbeam_queue::ArrayQueue;
use std::io;
use std::time::Duration;

/// What a page-out request carries besides its buffer. Written by the submitter
/// before `submit` and read by the I/O thread after it pops the request: the queue
/// orders the two.
#[derive(Debug, Default)]
pub(crate) struct Request {
    /// Frame the page was copied from.
    pub pfn: AtomicU32,
    /// The frame's epoch at the copy.
    pub epoch: AtomicU32,
    /// Encoded swap entry being written (holds one slot reference), or 0 for a
    /// file page's write-back (then `file` says where).
    pub entry: AtomicU64,
    /// A file page's write-back: `FILE_REQ | filemap::slots::index`; 0 otherwise.
    pub file: AtomicU64,
}

/// `Request::file`'s mark of a file write-back.
pub(crate) const FILE_REQ: u64 = 1 << 63;

/// The request pool and the queue to the I/O threads.
#[derive(Debug)]
pub(crate) struct PageIo {
    /// The buffers registered with io_uring for the threads' rings to clone
    /// (`Config::uring_writes`; `None` where io_uring, the registration or its
    /// clone with `WRITEV_FIXED` is unavailable: nothing stays pinned for
    /// nothing). Declared before `bufs`, so its ring closes first; the kernel's
    /// pins (this ring's and the threads' clones') keep the pages while any lives.
    registered: Option<crate::device::uring::Registered>,
    /// Whether the threads set up io_uring writes at all (`Config::uring_writes`).
    uring_writes: bool,
    /// One page buffer per request, mapped at start; buffer `i` belongs to whoever
    /// holds request `i` (taken from `free`, handed over through `submit`).
    bufs: AlignedPages,
    /// Per-request metadata; owned like the buffers (the queues order the handover).
    pub reqs: Box<[Request]>,
    /// Requests not in use (lock-free queue, sized at start).
    free: ArrayQueue<u32>,
    /// Requests queued for the I/O threads (lock-free queue, sized at start).
    submit: ArrayQueue<u32>,
    /// Pairs with `wake` to park idle I/O threads (a leaf; guards nothing else).
    sleep: Mutex<()>,
    wake: Condvar,
    /// Requests taken from the pool and not yet released (relaxed atomic).
    inflight: AtomicUsize,
    /// Set once when the Vm is dropped.
    shutdown: AtomicBool,
}

impl PageIo {
    /// A pool of `nreq` requests; `uring_writes`: the threads write through
    /// io_uring where it works, naming the pool's buffers registered once.
    pub fn new(nreq: usize, uring_writes: bool) -> io::Result<PageIo> {
        let free = ArrayQueue::new(nreq);
        for i in 0..nreq as u32 {
            let _ = free.push(i);
        }
        let bufs = AlignedPages::new(nreq)?;
        // Not under the model checker: no rings there.
        let uring_writes = uring_writes && !cfg!(usermm_shuttle);
        let registered = if uring_writes {
            // SAFETY: `bufs` is mapped for as long as `registered` lives: the field
            // order drops `registered` first (the threads' clones may outlive it;
            // the kernel's pins keep the pages for them, see `Registered::new`).
            unsafe { crate::device::uring::Registered::new(bufs.ptr(0), bufs.bytes()) }
                .ok()
                .filter(|r| r.clones())
        } else {
            None
        };
        Ok(PageIo {
            registered,
            uring_writes,
            bufs,
            reqs: (0..nreq).map(|_| Request::default()).collect(),
            free,
            submit: ArrayQueue::new(nreq),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            inflight: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
        })
    }

    pub fn metadata_bytes(&self) -> usize {
        self.bufs.bytes() + self.reqs.len() * (std::mem::size_of::<Request>() + 16)
    }

    /// Takes a free request, if any.
    pub fn take(&self) -> Option<u32> {
        let i = self.free.pop()?;
        self.inflight.fetch_add(1, Ordering::AcqRel);
        Some(i)
    }

    /// Returns a request to the pool.
    pub fn release(&self, i: u32) {
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        // Cannot fail: the queue holds every request and this one is not in it.
        let _ = self.free.push(i);
    }

    /// Number of requests in the pool.
    pub fn capacity(&self) -> usize {
        self.reqs.len()
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    pub fn buf(&self, i: u32) -> *mut u8 {
        self.bufs.ptr(i as usize)
    }

    /// The buffer of request `i` as a slice.
    ///
    /// # Safety
    /// The caller owns request `i` (took it, or popped it from the submit queue) and
    /// nobody writes the buffer while the slice lives.
    pub unsafe fn buf_slice(&self, i: u32) -> &[u8] {
        // SAFETY: inside the pool mapping; exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts(self.buf(i), PAGE_SIZE) }
    }

    /// Queues a filled request. Does not wake a thread: call `kick` after a batch.
    pub fn submit(&self, i: u32) {
        // Cannot fail: capacity is the pool size.
        let _ = self.submit.push(i);
    }

    /// Takes one more queued request, if any (a page-I/O thread gathering a run).
    pub fn try_pop(&self) -> Option<u32> {
        self.submit.pop()
    }

    /// Wakes one I/O thread if work is queued. A thread that has taken its
    /// requests and still sees work queued wakes the next (`run`'s handler), so a
    /// burst of page-outs wakes as many threads as it keeps busy, not all of them
    /// per batch.
    pub fn kick(&self) {
        if !self.submit.is_empty() {
            let _g = self.sleep.lock();
            self.wake.notify_one();
        }
    }

    /// Body of one page-I/O thread: pops requests and hands them to `handle` until
    /// shutdown, draining the queue before it exits.
    pub fn run(&self, handle: &dyn Fn(u32)) {
        // The lock validator's checks (nothing without the feature `lockdep`): this
        // thread never allocates from the heap (invariant 2), and its page-out work
        // runs in reclaim context (invariant 1: it must not allocate a frame).
        if self.uring_writes {
            // Before the no-allocation section: making the ring allocates.
            crate::device::uring::prepare_writes(self.registered.as_ref());
        }
        let _no_alloc = crate::lockdep::no_alloc("page-I/O thread");
        loop {
            if let Some(i) = self.submit.pop() {
                // `handle` gathers what it writes with this one (`try_pop`) and
                // then passes what is left to the next thread (`kick`): kicked
                // here, before the gathering, a second thread raced this one for
                // the queue and each wrote half a run.
                let _reclaim = crate::lockdep::reclaim();
                handle(i);
                continue;
            }
            let mut g = self.sleep.lock();
            if !self.submit.is_empty() {
                continue;
            }
            if self.shutdown.load(Ordering::Acquire) {
                return;
            }
            self.wake.wait_for(&mut g, Duration::from_millis(200));
        }
    }

    /// How the page-I/O threads write a swap file (each sets its ring up the
    /// same way as it starts: `uring::prepare_writes`; a thread whose own clone
    /// of the registration failed where the probe's worked writes without
    /// registered buffers, which this does not see).
    pub fn write_mode(&self) -> crate::device::uring::WriteMode {
        use crate::device::uring::WriteMode;
        match &self.registered {
            // Kept only where it can be cloned (`new`).
            Some(_) => WriteMode::Registered,
            _ if self.uring_writes && crate::device::uring::available() => WriteMode::Uring,
            _ => WriteMode::Positioned,
        }
    }

    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        let _g = self.sleep.lock();
        self.wake.notify_all();
    }
}
