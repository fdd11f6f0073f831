//! One NBD connection: its socket, a fixed table of request slots, and the
//! protocol by which the threads that wait for replies take turns reading them.
//!
//! Owns: the socket descriptor of the connection (opened by the device, closed
//! here by the reconnector), the slot table, the receive buffer and the scratch
//! buffer of the reply parser — all allocated when the device is built (docs/design.md
//! invariant 2): sending a request and receiving its reply allocate nothing.
//!
//! ## Requests and replies
//! A request takes a free slot (a lock-free queue of indices), gets the handle
//! `seq << 32 | index` where `seq` counts the slot's uses, and is published as
//! PENDING before it is sent, so its reply can be matched as soon as it arrives.
//! There is no reply thread: a thread waiting for its reply becomes *the reader*
//! when nobody else is (`reader` flag), reads reply messages off the socket and
//! delivers each into the slot it names — the payload of a read goes straight
//! into that request's page buffer — until its own reply is in; then it hands the
//! reader role to a parked waiter. Waiters spin briefly, then park with a bounded
//! timeout. A thread at depth 1 therefore never pays a cross-thread wake-up.
//!
//! ## Deadlines
//! A request's deadline bounds all of it. The socket is used with non-blocking
//! calls and `poll` bounded by the deadline: a send the server does not take in
//! time, and bytes of a reply that do not come in time, fail with `ETIMEDOUT`
//! (a message cut off leaves the stream out of sync, so the link is dropped).
//! The reader checks its own deadline before every reply message, so replies
//! that keep coming (chunks without DONE) do not hold it either. A request cut
//! off by its deadline fails with `Fail::Timeout`.
//!
//! ## Slot states (`Slot::state` = `seq << 8 | state`)
//! FREE → (owner) PENDING → (reader) CLAIMED while it writes the slot's buffer →
//! PENDING again (more chunks) or DONE → (owner) FREE. The owner may cancel a
//! PENDING slot (timeout, broken link) by CAS to FREE; a CLAIMED slot cannot be
//! cancelled, so no reader ever writes a buffer whose owner has returned.
//!
//! ## Link lifetime
//! Every request runs inside a [`Link`] guard (`users` count) taken while `up`.
//! Breaking a link (error, protocol violation, timeout) clears `up`, shuts the
//! socket down (which wakes a blocked reader) and wakes every parked waiter; each
//! sees `up == false`, cancels or collects its slot and drops its guard. The
//! reconnector closes the descriptor only when `users` is zero, so a descriptor
//! is never closed (and its number reused) under a thread that uses it.
//!
//! ## Locking
//! `send` (Mutex) serialises writes of whole requests to the socket; it is held
//! for one `sendmsg` of header and payload and nothing is taken under it.
//! `Slot::parked` (Mutex) guards the handle of a parked waiter; leaf lock. The
//! reader role is an atomic flag, not a lock: its holder never blocks on another
//! thread, only on the socket (bounded by the timeout).

use super::proto::{self, Claim, ProtoError, ReplyError, ReplyState, Source, Table};
use crate::sync::{AtomicBool, AtomicU32, AtomicU64, Mutex, Ordering};
use crossbeam_queue::ArrayQueue;
use std::cell::UnsafeCell;
use std::io;
use std::os::unix::io::RawFd;
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// Requests in flight per connection.
pub(super) const SLOTS: usize = 64;
/// Receive buffer per connection (several small replies per `read`).
const RECV_BUF: usize = 16 * 1024;
/// Reads at least this long bypass the receive buffer when it is empty.
const DIRECT_READ: usize = 1024;

const FREE: u64 = 0;
const PENDING: u64 = 1;
const CLAIMED: u64 = 2;
const DONE: u64 = 3;

fn pack(seq: u32, st: u64) -> u64 {
    (u64::from(seq) << 8) | st
}

/// How a request ended, when it did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fail {
    /// The server answered with this NBD error code.
    Server(u32),
    /// The link broke (EOF, reset, shut down by another thread) before the reply.
    Link,
    /// The server violated the protocol; the link was dropped.
    Proto(ProtoError),
    /// No reply within the timeout; the link was dropped.
    Timeout,
    /// No free slot within the timeout.
    Busy,
}

/// What the owner of a slot fills in before publishing it.
struct SlotData {
    cmd: u16,
    offset: u64,
    /// Destination of a read (exactly `len` bytes), null otherwise.
    buf: *mut u8,
    len: usize,
    reply: ReplyState,
}

struct Slot {
    state: AtomicU64,
    /// Result: 0, an NBD error, `proto::ERR_LINK` or `proto::ERR_PROTO`.
    err: AtomicU32,
    parked: Mutex<Option<Thread>>,
    data: UnsafeCell<SlotData>,
}

/// Reader-owned receive buffer.
struct RecvBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// One connection to the server (its current socket, if any, and its slots).
pub(super) struct Conn {
    fd: AtomicU32,
    up: AtomicBool,
    users: AtomicU32,
    epoch: AtomicU32,
    structured: AtomicBool,
    flags: AtomicU32,
    send: Mutex<()>,
    reader: AtomicBool,
    slots: Box<[Slot]>,
    free: ArrayQueue<u32>,
    pending: AtomicU32,
    /// Receive buffer and parser scratch, used only by the reader-role holder.
    rx: UnsafeCell<(RecvBuf, Box<[u8]>)>,
    /// Why the current/last link broke, when it was the server's fault.
    broke: Mutex<Option<ProtoError>>,
    /// The reconnector, woken when a link breaks.
    pub(super) reconnector: Mutex<Option<Thread>>,
}

// SAFETY: the `UnsafeCell`s are accessed under the protocols documented above:
// `Slot::data` by the slot's owner before publishing it PENDING and by the one
// reader that claimed it (CAS PENDING→CLAIMED) until it releases it; `rx` only by
// the holder of the `reader` flag (acquired by CAS, released with a store). Raw
// buffer pointers in `SlotData` point into buffers the owner keeps borrowed until
// its slot is no longer PENDING or CLAIMED.
unsafe impl Sync for Conn {}
// SAFETY: as above; nothing in `Conn` is tied to the thread that built it.
unsafe impl Send for Conn {}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("up", &self.up.load(Ordering::Relaxed))
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .field("users", &self.users.load(Ordering::Relaxed))
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish()
    }
}

const NO_FD: u32 = u32::MAX;
/// NBD's `ESHUTDOWN`.
const ESHUTDOWN: u32 = 108;

/// A guard for using the connection's current link.
pub(super) struct Link<'a> {
    conn: &'a Conn,
    fd: RawFd,
    structured: bool,
    flags: u16,
}

impl Drop for Link<'_> {
    fn drop(&mut self) {
        self.conn.users.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Link<'_> {
    /// Transmission flags of this link.
    pub fn flags(&self) -> u16 {
        self.flags
    }
    /// Whether structured replies are on for this link.
    pub fn structured(&self) -> bool {
        self.structured
    }
}

/// The socket as a byte source for the reply parser, through the receive buffer.
/// Every read is bounded by `deadline` (the reader's request's): a server that
/// trickles a reply one byte per almost-timeout cannot hold the reader past it.
struct FdSource<'a> {
    fd: RawFd,
    rb: &'a mut RecvBuf,
    deadline: Instant,
}

fn os_err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Waits until `fd` is ready for `events` or `deadline` passes (then
/// `ETIMEDOUT`). Readiness may be spurious; the caller retries its non-blocking
/// call.
fn wait_ready(fd: RawFd, events: libc::c_short, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(os_err(libc::ETIMEDOUT));
    }
    // Rounded up, so a wait never ends just short of the deadline and spins.
    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack; the caller's `Link` keeps `fd` open.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    Ok(())
}

impl FdSource<'_> {
    fn read_some(&mut self, dst: *mut u8, cap: usize) -> io::Result<usize> {
        loop {
            // SAFETY: `fd` is open (the caller holds a `Link`); `dst` is valid for
            // `cap` writable bytes (a slice or the receive buffer).
            let n = unsafe { libc::recv(self.fd, dst.cast(), cap, libc::MSG_DONTWAIT) };
            if n > 0 {
                return Ok(n as usize);
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => wait_ready(self.fd, libc::POLLIN, self.deadline)?,
                _ => return Err(e),
            }
        }
    }
}

impl Source for FdSource<'_> {
    fn read_full(&mut self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let rb = &mut *self.rb;
            if rb.start < rb.end {
                let n = (rb.end - rb.start).min(buf.len());
                buf[..n].copy_from_slice(&rb.buf[rb.start..rb.start + n]);
                rb.start += n;
                buf = &mut buf[n..];
                continue;
            }
            rb.start = 0;
            rb.end = 0;
            if buf.len() >= DIRECT_READ {
                let n = self.read_some(buf.as_mut_ptr(), buf.len())?;
                buf = &mut buf[n..];
            } else {
                let cap = self.rb.buf.len();
                let p = self.rb.buf.as_mut_ptr();
                let n = self.read_some(p, cap)?;
                self.rb.end = n;
            }
        }
        Ok(())
    }
}

/// The slot table as the reply parser sees it.
struct Slots<'a>(&'a Conn);

impl Table for Slots<'_> {
    fn claim(&self, cookie: u64) -> Option<Claim<'_>> {
        let idx = (cookie & 0xffff_ffff) as usize;
        let seq = (cookie >> 32) as u32;
        let slot = self.0.slots.get(idx)?;
        slot.state
            .compare_exchange(
                pack(seq, PENDING),
                pack(seq, CLAIMED),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()?;
        // SAFETY: the CAS made us the claimer: nobody else touches the slot's data
        // until we release it, and its owner keeps the buffer alive meanwhile.
        let d = unsafe { &mut *slot.data.get() };
        let buf: &mut [u8] = if d.cmd == proto::CMD_READ && !d.buf.is_null() {
            // SAFETY: `buf` points to the owner's exclusive buffer of `len` bytes,
            // borrowed by the owner for as long as the slot is PENDING or CLAIMED.
            unsafe { std::slice::from_raw_parts_mut(d.buf, d.len) }
        } else {
            &mut []
        };
        Some(Claim {
            cmd: d.cmd,
            offset: d.offset,
            buf,
            st: &mut d.reply,
        })
    }

    fn release(&self, cookie: u64, done: Option<Result<(), u32>>) {
        let idx = (cookie & 0xffff_ffff) as usize;
        let seq = (cookie >> 32) as u32;
        let slot = &self.0.slots[idx];
        match done {
            None => slot.state.store(pack(seq, PENDING), Ordering::Release),
            Some(r) => {
                let code = match r {
                    Ok(()) => 0,
                    Err(0) => 5,
                    Err(e) => e,
                };
                slot.err.store(code, Ordering::Relaxed);
                slot.state.store(pack(seq, DONE), Ordering::SeqCst);
                if let Some(t) = slot.parked.lock().as_ref() {
                    t.unpark();
                }
            }
        }
    }
}

/// How long a waiter spins, then yields, before it parks.
const SPINS: u32 = 64;
const YIELDS: u32 = 16;
/// Upper bound of one park (a safety net; wake-ups are explicit).
const PARK_MAX: Duration = Duration::from_millis(5);

impl Conn {
    /// A connection with no socket yet; every buffer it will use is allocated here.
    pub fn new() -> Conn {
        let free = ArrayQueue::new(SLOTS);
        for i in 0..SLOTS as u32 {
            let _ = free.push(i);
        }
        Conn {
            fd: AtomicU32::new(NO_FD),
            up: AtomicBool::new(false),
            users: AtomicU32::new(0),
            epoch: AtomicU32::new(0),
            structured: AtomicBool::new(false),
            flags: AtomicU32::new(0),
            send: Mutex::new(()),
            reader: AtomicBool::new(false),
            slots: (0..SLOTS)
                .map(|_| Slot {
                    state: AtomicU64::new(pack(0, FREE)),
                    err: AtomicU32::new(0),
                    parked: Mutex::new(None),
                    data: UnsafeCell::new(SlotData {
                        cmd: 0,
                        offset: 0,
                        buf: std::ptr::null_mut(),
                        len: 0,
                        reply: ReplyState::default(),
                    }),
                })
                .collect(),
            free,
            pending: AtomicU32::new(0),
            rx: UnsafeCell::new((
                RecvBuf {
                    buf: vec![0u8; RECV_BUF].into_boxed_slice(),
                    start: 0,
                    end: 0,
                },
                vec![0u8; proto::SCRATCH_LEN].into_boxed_slice(),
            )),
            broke: Mutex::new(None),
            reconnector: Mutex::new(None),
        }
    }

    /// Requests in flight on this connection.
    pub fn in_flight(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Whether the connection has a working link.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Enters the current link, if the connection is up.
    pub fn enter(&self) -> Option<Link<'_>> {
        self.users.fetch_add(1, Ordering::SeqCst);
        if !self.up.load(Ordering::SeqCst) {
            self.users.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Link {
            conn: self,
            fd: self.fd.load(Ordering::SeqCst) as RawFd,
            structured: self.structured.load(Ordering::SeqCst),
            flags: self.flags.load(Ordering::SeqCst) as u16,
        })
    }

    /// Installs a freshly negotiated socket (reconnector or constructor only, with
    /// the connection down and unused).
    pub fn install(&self, fd: RawFd, structured: bool, flags: u16) {
        debug_assert!(!self.up.load(Ordering::SeqCst));
        debug_assert_eq!(self.fd.load(Ordering::SeqCst), NO_FD);
        // SAFETY: we are the only user (the connection is down and has no users);
        // nobody holds the reader role, so the receive buffer is ours.
        let rx = unsafe { &mut *self.rx.get() };
        rx.0.start = 0;
        rx.0.end = 0;
        *self.broke.lock() = None;
        self.fd.store(fd as u32, Ordering::SeqCst);
        self.structured.store(structured, Ordering::SeqCst);
        self.flags.store(u32::from(flags), Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
    }

    /// Waits until no thread uses the broken link, then closes its socket
    /// (reconnector and drop only). Returns false if users remain at `deadline`.
    pub fn close_when_unused(&self, deadline: Instant) -> bool {
        debug_assert!(!self.up.load(Ordering::SeqCst));
        let mut round = 0u32;
        while self.users.load(Ordering::SeqCst) != 0 {
            if Instant::now() >= deadline {
                return false;
            }
            self.wake_all();
            round += 1;
            if round < 32 {
                thread::yield_now();
            } else {
                thread::sleep(Duration::from_micros(200));
            }
        }
        let fd = self.fd.swap(NO_FD, Ordering::SeqCst);
        if fd != NO_FD {
            // SAFETY: nobody uses the descriptor (no users, connection down), and
            // it was ours to close; it is forgotten before it is closed.
            unsafe { libc::close(fd as RawFd) };
        }
        true
    }

    /// Whether a (down) connection still has a socket to close.
    pub fn has_socket(&self) -> bool {
        self.fd.load(Ordering::SeqCst) != NO_FD
    }

    /// The reason recorded when the last link was dropped for a protocol violation.
    pub fn broke_reason(&self) -> Option<ProtoError> {
        *self.broke.lock()
    }

    fn wake_all(&self) {
        for s in self.slots.iter() {
            if let Some(t) = s.parked.lock().as_ref() {
                t.unpark();
            }
        }
    }

    /// Breaks the link `l` (if it is still up): records `why`, shuts the socket
    /// down so a blocked reader returns, wakes every waiter and the reconnector.
    pub fn break_link(&self, l: &Link<'_>, why: Option<ProtoError>) {
        // The reason is recorded by whoever breaks the link, under the same lock
        // as the break, so waiters that see the link down read the right reason
        // (a late reply after a timeout is not relabelled a protocol violation).
        let mut b = self.broke.lock();
        if self
            .up
            .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        *b = why;
        drop(b);
        // SAFETY: `l` keeps the descriptor open; shutdown passes no memory.
        unsafe { libc::shutdown(l.fd, libc::SHUT_RDWR) };
        self.wake_all();
        if let Some(t) = self.reconnector.lock().as_ref() {
            t.unpark();
        }
    }

    /// Sends a request and waits for its reply. `buf` is the destination of a
    /// read (exactly `len` bytes) or the payload of a write (empty otherwise).
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &self,
        l: &Link<'_>,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        read_buf: Option<&mut [u8]>,
        payload: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<(), Fail> {
        let idx = self.take_slot(deadline)?;
        let slot = &self.slots[idx as usize];
        let seq = ((slot.state.load(Ordering::Relaxed) >> 8) as u32).wrapping_add(1);
        {
            // SAFETY: the slot is FREE and we took it off the free queue: it is
            // ours alone until we publish it below.
            let d = unsafe { &mut *slot.data.get() };
            d.cmd = cmd;
            d.offset = offset;
            match read_buf {
                Some(b) => {
                    d.buf = b.as_mut_ptr();
                    d.len = b.len();
                }
                None => {
                    d.buf = std::ptr::null_mut();
                    d.len = 0;
                }
            }
            d.reply.reset();
        }
        slot.err.store(0, Ordering::Relaxed);
        self.pending.fetch_add(1, Ordering::SeqCst);
        slot.state.store(pack(seq, PENDING), Ordering::SeqCst);
        let cookie = (u64::from(seq) << 32) | u64::from(idx);
        let hdr = proto::encode_request(cmd, flags, cookie, offset, len);
        let mut timed_out = false;
        if let Err(e) = self.send_all(l, &hdr, payload.unwrap_or(&[]), deadline) {
            // A send the server did not take in time is a timeout like a reply
            // that did not come (the link goes either way).
            timed_out = e.raw_os_error() == Some(libc::ETIMEDOUT);
            self.break_link(l, None);
        }
        let r = self.wait(l, idx, seq, deadline, timed_out);
        self.pending.fetch_sub(1, Ordering::SeqCst);
        slot.state.store(pack(seq, FREE), Ordering::Release);
        let _ = self.free.push(idx);
        r
    }

    fn take_slot(&self, deadline: Instant) -> Result<u32, Fail> {
        let mut round = 0u32;
        loop {
            if let Some(i) = self.free.pop() {
                return Ok(i);
            }
            if Instant::now() >= deadline {
                return Err(Fail::Busy);
            }
            round += 1;
            if round < 16 {
                thread::yield_now();
            } else {
                thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// Writes header and payload as one message (partial writes continue), by
    /// `deadline` (`ETIMEDOUT` then: a server that stops reading, or reads a byte
    /// at a time, holds neither this thread nor, through `send`, the others past
    /// it; once the caller breaks the link theirs fail at once).
    fn send_all(
        &self,
        l: &Link<'_>,
        hdr: &[u8],
        payload: &[u8],
        deadline: Instant,
    ) -> io::Result<()> {
        let _g = self.send.lock();
        let mut parts = [hdr, payload];
        let mut first = 0;
        while first < parts.len() {
            if parts[first].is_empty() {
                first += 1;
                continue;
            }
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2];
            let mut n_iov = 0;
            for p in &parts[first..] {
                iov[n_iov] = libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                };
                n_iov += 1;
            }
            // SAFETY: an all-zero msghdr is valid; we fill in the iovec array.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n_iov as _;
            // SAFETY: `l` keeps the descriptor open; the iovecs point into live
            // slices that the kernel only reads. MSG_NOSIGNAL: no SIGPIPE.
            let n = unsafe { libc::sendmsg(l.fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        wait_ready(l.fd, libc::POLLOUT, deadline)?;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            let mut n = n as usize;
            while n > 0 && first < parts.len() {
                let k = n.min(parts[first].len());
                parts[first] = &parts[first][k..];
                n -= k;
                if parts[first].is_empty() {
                    first += 1;
                }
            }
        }
        Ok(())
    }

    /// Sends a request that has no reply (`NBD_CMD_DISC`), by `deadline`.
    pub fn send_only(&self, l: &Link<'_>, cmd: u16, deadline: Instant) {
        let hdr = proto::encode_request(cmd, 0, 0, 0, 0);
        let _ = self.send_all(l, &hdr, &[], deadline);
    }

    /// Cancels a PENDING slot (true), or reports that a reader has it (false).
    fn cancel(&self, idx: u32, seq: u32) -> bool {
        self.slots[idx as usize]
            .state
            .compare_exchange(
                pack(seq, PENDING),
                pack(seq, FREE),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    fn link_fail(&self) -> Fail {
        match self.broke_reason() {
            Some(p) => Fail::Proto(p),
            None => Fail::Link,
        }
    }

    /// Waits for the reply of slot `idx` (reading replies as the reader when
    /// nobody else is) until `deadline`. `timed_out`: the deadline already cut
    /// this request off (its send); the link is then down and the request fails
    /// as a timeout, as it does when the deadline passes while a reply of ours
    /// (or another's, read by us as the reader) is still coming in.
    fn wait(
        &self,
        l: &Link<'_>,
        idx: u32,
        seq: u32,
        deadline: Instant,
        mut timed_out: bool,
    ) -> Result<(), Fail> {
        let slot = &self.slots[idx as usize];
        let mut round = 0u32;
        loop {
            if slot.state.load(Ordering::Acquire) == pack(seq, DONE) {
                return match slot.err.load(Ordering::Relaxed) {
                    0 => Ok(()),
                    proto::ERR_LINK | proto::ERR_PROTO if timed_out => Err(Fail::Timeout),
                    proto::ERR_LINK => Err(self.link_fail()),
                    proto::ERR_PROTO => Err(self.link_fail()),
                    // The server is shutting down: the protocol wants us to
                    // disconnect; the request is retried on the next link if it may.
                    ESHUTDOWN => {
                        self.break_link(l, None);
                        Err(Fail::Link)
                    }
                    e => Err(Fail::Server(e)),
                };
            }
            if !self.up.load(Ordering::SeqCst) {
                if self.cancel(idx, seq) {
                    return Err(if timed_out {
                        Fail::Timeout
                    } else {
                        self.link_fail()
                    });
                }
                thread::yield_now(); // a reader holds the slot; it finishes soon
                continue;
            }
            if round > SPINS && Instant::now() >= deadline {
                // No reply in time: drop the link first (so no reader delivers
                // into the slot or trips over its reply), then give the slot up.
                self.break_link(l, None);
                timed_out = true;
                if self.cancel(idx, seq) {
                    return Err(Fail::Timeout);
                }
                thread::yield_now();
                continue;
            }
            if self
                .reader
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                let r = self.read_until(l, idx, seq, deadline);
                self.reader.store(false, Ordering::SeqCst);
                match r {
                    Ok(()) => {}
                    Err(ReplyError::Proto(p)) => self.break_link(l, Some(p)),
                    Err(ReplyError::Io(e)) => {
                        // The deadline passed in the middle of a message (a
                        // trickling server): the stream is out of sync, the link
                        // goes, and this request failed by its deadline.
                        timed_out |= e.raw_os_error() == Some(libc::ETIMEDOUT);
                        self.break_link(l, None)
                    }
                }
                self.wake_next_reader();
                round = SPINS + 1; // check the deadline before reading again
                continue;
            }
            round += 1;
            if round <= SPINS {
                std::hint::spin_loop();
                continue;
            }
            if round <= SPINS + YIELDS {
                thread::yield_now();
                continue;
            }
            *slot.parked.lock() = Some(thread::current());
            if slot.state.load(Ordering::SeqCst) != pack(seq, DONE)
                && self.reader.load(Ordering::SeqCst)
                && self.up.load(Ordering::SeqCst)
            {
                let left = deadline.saturating_duration_since(Instant::now());
                thread::park_timeout(left.min(PARK_MAX));
            }
            *slot.parked.lock() = None;
        }
    }

    /// Wakes one parked waiter of a pending request to take the reader role.
    fn wake_next_reader(&self) {
        if self.pending.load(Ordering::SeqCst) == 0 {
            return;
        }
        for s in self.slots.iter() {
            if s.state.load(Ordering::SeqCst) & 0xff == PENDING {
                if let Some(t) = s.parked.lock().as_ref() {
                    t.unpark();
                    return;
                }
            }
        }
    }

    /// As the reader: reads replies until slot `idx` is done or `deadline` passes.
    fn read_until(
        &self,
        l: &Link<'_>,
        idx: u32,
        seq: u32,
        deadline: Instant,
    ) -> Result<(), ReplyError> {
        let slot = &self.slots[idx as usize];
        // SAFETY: we hold the reader role (CAS on `reader`), which is what guards `rx`.
        let rx = unsafe { &mut *self.rx.get() };
        let (rb, scratch) = (&mut rx.0, &mut rx.1);
        // Messages taken after the deadline (see below).
        let mut late = 0u32;
        loop {
            if slot.state.load(Ordering::Acquire) == pack(seq, DONE)
                || !self.up.load(Ordering::SeqCst)
            {
                return Ok(());
            }
            // Before every message, not only when the buffer is empty: a server
            // that streams chunks without DONE (or keeps the buffer from draining)
            // must not hold the reader past its deadline. Past it, what has already
            // arrived is still taken (a reader descheduled on a loaded machine
            // finds its reply waiting), but only messages there now, and at most
            // `LATE_MSGS` of them: no wait for more bytes, no stream without end.
            let now = Instant::now();
            if now >= deadline {
                if late >= LATE_MSGS || (rb.start == rb.end && !readable_now(l.fd)) {
                    return Ok(());
                }
                late += 1;
            } else if rb.start == rb.end {
                let ms = (deadline - now).as_millis().clamp(1, 100) as i32;
                let mut p = libc::pollfd {
                    fd: l.fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd on the stack; `l` keeps the fd open.
                let n = unsafe { libc::poll(&mut p, 1, ms) };
                if n == 0 {
                    continue;
                }
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return Err(e.into());
                }
            }
            // Within a message the deadline bounds each wait for bytes (a message
            // cut off by it leaves the stream out of sync: the caller drops the link).
            let mut src = FdSource {
                fd: l.fd,
                rb,
                deadline,
            };
            proto::read_reply(&mut src, l.structured, &Slots(self), scratch)?;
        }
    }
}

/// At most this many reply messages are read after a reader's deadline, and only
/// those already received (`read_until`).
const LATE_MSGS: u32 = 64;

/// Whether bytes can be read from `fd` now (a `poll` that does not wait).
fn readable_now(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack; the caller's `Link` keeps `fd` open.
    unsafe { libc::poll(&mut p, 1, 0) > 0 && p.revents & libc::POLLIN != 0 }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let fd = *self.fd.get_mut();
        if fd != NO_FD {
            // SAFETY: we own the connection exclusively (drop); the fd is ours.
            unsafe { libc::close(fd as RawFd) };
        }
    }
}
