//! The NBD device: swap on a Network Block Device server, spoken by our own
//! client (fixed newstyle handshake, `NBD_OPT_GO`, structured or simple replies,
//! READ / WRITE / FLUSH / TRIM / WRITE_ZEROES, FUA on request, many requests in
//! flight, several connections when the server allows multi-conn, TCP with
//! `TCP_NODELAY` and Unix sockets).
//!
//! Owns: the connections to one export (`conn::Conn`), their sockets, and the
//! reconnector thread (`usermm-nbd-reconnect`).
//!
//! Keeps docs/design.md invariant 2 (seed 001, swap over NBD): every request slot,
//! receive buffer and parser scratch buffer is allocated in [`NbdDevice::connect`]
//! (at swapon). Reading or writing a page allocates nothing: a write sends the
//! page from the caller's buffer, a read receives it straight into the caller's
//! buffer, errors of the I/O path are plain OS error codes (only a protocol
//! violation, which drops the connection, builds a message). Requests are never
//! merged: one page is one NBD request; ordering is the server's business.
//!
//! ## Connections
//! With multi-conn (`NBD_FLAG_CAN_MULTI_CONN`) the device opens `conns=` connections
//! (default 2; without multi-conn always one, as the protocol asks). A request goes
//! to the lowest-numbered connection with fewer than 8 requests in flight, else to
//! the least loaded: at low depth one warm connection serves everything (measured
//! faster on loopback than spreading), under load requests spread over all.
//!
//! ## Faults
//! - Every request has a deadline (`timeout=`, default 10 s). It bounds the whole
//!   request: its send and its entire reply, not each read (a server trickling a
//!   reply a byte per almost-timeout, or streaming chunks without DONE, is cut off
//!   by it; see `conn`). A request without its whole reply by then fails with
//!   `ETIMEDOUT` and its connection is dropped (its other requests fail too) and
//!   re-established in the background. Connecting (socket and handshake) is
//!   bounded by the timeout as a whole too.
//! - A write or trim whose outcome is unknown (sent, then a timeout, a lost link
//!   or a protocol violation; [`outcome_unknown`] says so of its error, and
//!   `NbdStats::uncertain` counts them) may still be carried out by the server,
//!   later than a newer request on another or a later connection: closing our
//!   socket does not stop a request the server has read, and no NBD command
//!   orders requests across connections (a FLUSH covers completed writes only).
//!   So a trim is never sent again once sent, and the swap table never hands such
//!   a slot out again while the device is in service (`swap::table`, held-back
//!   slots): a bounded leak instead of a newer page overwritten by an old write.
//! - While no connection is up, writes fail at once with `ENOTCONN` (the engine
//!   keeps the page resident and dirty and retries later); a read waits for the
//!   reconnector until its deadline and fails with `ENOTCONN`/`ETIMEDOUT` then.
//!   A read whose connection breaks under it is retried on the next link. A read
//!   never returns data that did not come from the server for that request.
//!   (`NbdOptions::wait_for_reconnect = false`, used for mirror legs: reads fail
//!   at once too, so the mirror reads the other leg.)
//! - A server error reply fails just that request (`EIO`, `ENOSPC`, … as sent);
//!   `ESHUTDOWN` (server going down) drops the link like a lost connection.
//! - A connection that ends in the middle of a reply (short read) is retried like
//!   a lost link and reported as a short read if it persists past the deadline.
//! - A protocol violation (wrong magic, unknown handle, short read, oversized or
//!   malformed chunk, data nobody asked for) fails the request with `InvalidData`
//!   and a message saying what was wrong, and drops the connection.
//! - The reconnector retries with exponential backoff (10 ms doubling to 500 ms;
//!   immediately after a link that lived a second or more, so a restarted server
//!   is found at once and a flapping one is not hammered); a new link must offer
//!   the same export (at least the size first seen) and the transmission flags the
//!   device relies on since its first link (FLUSH, TRIM, WRITE_ZEROES, FUA with
//!   `fua=1`, multi-conn with several connections): one that lost any is refused
//!   (`last_connect_error` names the flags), as are extra connections at connect.
//!
//! ## Durability
//! Writes carry FUA only with `fua=1`. Swap content need not outlive the client,
//! and the checksum the engine keeps per slot turns a write the server lost (a
//! server crash before its cache reached disk) into `Error::Device`, never into
//! wrong data; FUA on every page would make each page-out a synchronous write on
//! the server. `flush()` sends `NBD_CMD_FLUSH` (with multi-conn one connection
//! covers all); `discard()` sends `NBD_CMD_TRIM`; an all-zero page is written
//! with `NBD_CMD_WRITE_ZEROES` when the server offers it.
//!
//! ## Locking
//! See the `conn` module: a send mutex per connection (held for one `sendmsg`), a leaf
//! mutex per slot for the parked waiter's handle, and the lock-free reader role.
//! No engine lock is held while calling into this device, and it takes none.

pub mod proto;

mod conn;

use crate::addr::PAGE_SIZE;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::sync::EngineSpawn;
use crate::sync::{AtomicBool, AtomicU64, Mutex, Ordering};
use conn::{Conn, Fail};
use proto::Negotiated;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::io::{IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default NBD port.
pub const DEFAULT_PORT: u16 = 10809;
/// Default request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections opened by default when the server advertises multi-conn.
pub const DEFAULT_MULTI_CONNS: usize = 2;
/// Most connections per device.
pub const MAX_CONNS: usize = 16;
/// The longest request timeout `connect` takes (`NbdOptions::timeout`; the spec's
/// `timeout=` allows up to an hour): a day. Deadlines are `now + timeout`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Requests in flight on a connection before the next connection is used.
const SPILL: u32 = 8;
/// A link that lived this long resets the backoff when it breaks.
const STABLE_LINK: Duration = Duration::from_secs(1);

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    /// TCP: host name or address, and port.
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// Port (10809 by default).
        port: u16,
    },
    /// A Unix domain socket.
    Unix(PathBuf),
}

/// Options of an NBD device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdOptions {
    /// Export name ("" is the server's default export).
    pub export: String,
    /// Connections to open; `None` = 2 when the server allows multi-conn. Without
    /// multi-conn one connection is used whatever is asked (the protocol says a
    /// client should not spread requests over connections then).
    pub conns: Option<usize>,
    /// Deadline of every request, and of connecting.
    pub timeout: Duration,
    /// Send writes with FUA (durable before acknowledged), if the server supports it.
    pub fua: bool,
    /// Whether a read (flush, trim) waits, until its deadline, for a lost link to
    /// come back (default). Off for the legs of a mirror, which read the other leg
    /// at once instead.
    pub wait_for_reconnect: bool,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            export: String::new(),
            conns: None,
            timeout: DEFAULT_TIMEOUT,
            fua: false,
            wait_for_reconnect: true,
        }
    }
}

/// What was negotiated with the server (first connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NbdInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Structured replies in use.
    pub structured: bool,
    /// The server advertised `NBD_FLAG_CAN_MULTI_CONN`.
    pub multi_conn: bool,
    /// Connections opened.
    pub conns: usize,
    /// Block size constraints (minimum, preferred, maximum).
    pub block: (u32, u32, u32),
}

/// Counters of one NBD device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Links re-established after a failure.
    pub reconnects: u64,
    /// Requests that got no reply in time.
    pub timeouts: u64,
    /// Protocol violations seen.
    pub protocol_errors: u64,
    /// Error replies from the server.
    pub server_errors: u64,
    /// Writes refused at once because no connection was up.
    pub fast_failed_writes: u64,
    /// Writes and trims whose outcome is unknown: sent, then no reply by the
    /// deadline or the link lost under them. They fail with an error for which
    /// [`outcome_unknown`] is true, and the swap table never hands their slots
    /// out again while the device is swapped on.
    pub uncertain: u64,
}

#[derive(Debug)]
enum Target {
    Tcp(Vec<SocketAddr>),
    Unix(PathBuf),
}

#[derive(Debug, Default)]
struct Counters {
    reconnects: AtomicU64,
    timeouts: AtomicU64,
    protocol_errors: AtomicU64,
    server_errors: AtomicU64,
    fast_failed_writes: AtomicU64,
    uncertain: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    name: String,
    target: Target,
    opts: NbdOptions,
    info: NbdInfo,
    pages: u64,
    conns: Box<[Conn]>,
    shutdown: AtomicBool,
    cnt: Counters,
    /// Why the last reconnection attempt failed (reconnector only; for diagnostics).
    last_connect_error: Mutex<Option<String>>,
}

/// A swap device on an NBD export.
#[derive(Debug)]
pub struct NbdDevice {
    sh: Arc<Shared>,
    reconnector: Option<JoinHandle<()>>,
}

fn cfg_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("NBD device {name}: {e}"))
}

/// A socket whose every read and write during the handshake ends by one deadline
/// (the socket timeout is set to what is left before each), so a server that
/// trickles its handshake a byte per almost-timeout cannot hold `connect` or the
/// reconnector past `timeout`.
struct Bounded<S> {
    s: S,
    deadline: Instant,
}

/// The socket timeouts of the two stream types.
trait SetTimeouts {
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
}
impl SetTimeouts for UnixStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}
impl SetTimeouts for TcpStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl<S: SetTimeouts> Bounded<S> {
    fn arm(&self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake did not finish within the timeout",
            ));
        }
        self.s.set_timeouts(left)
    }
}
impl<S: Read + SetTimeouts> Read for Bounded<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.s.read(buf)
    }
}
impl<S: Write + SetTimeouts> Write for Bounded<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

/// Opens one socket and negotiates, all within `opts.timeout`; returns the raw
/// socket and what was agreed.
fn connect_once(target: &Target, opts: &NbdOptions) -> io::Result<(RawFd, Negotiated)> {
    fn finish<S: Read + Write + IntoRawFd + SetTimeouts>(
        s: S,
        opts: &NbdOptions,
        deadline: Instant,
    ) -> io::Result<(RawFd, Negotiated)> {
        let mut b = Bounded { s, deadline };
        let n = proto::handshake(&mut b, &opts.export, true)?;
        let fd = b.s.into_raw_fd();
        // Anything the server sends before we ask is garbage after the handshake.
        let mut b = [0u8; 1];
        // SAFETY: `fd` is open and ours; the kernel writes at most one byte to `b`.
        let got = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if got >= 0 {
            // SAFETY: `fd` is ours and closed once here.
            unsafe { libc::close(fd) };
            return Err(if got > 0 {
                io::Error::new(io::ErrorKind::InvalidData, proto::ProtoError::Unsolicited)
            } else {
                io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the server closed the connection right after the handshake",
                )
            });
        }
        Ok((fd, n))
    }
    let t = opts.timeout;
    let deadline = Instant::now() + t;
    match target {
        Target::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot connect to {}: {e}", path.display()),
                )
            })?;
            finish(s, opts, deadline)
        }
        Target::Tcp(addrs) => {
            let mut last = None;
            for a in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match TcpStream::connect_timeout(a, left) {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        return finish(s, opts, deadline);
                    }
                    Err(e) => {
                        last = Some(io::Error::new(
                            e.kind(),
                            format!("cannot connect to {a}: {e}"),
                        ))
                    }
                }
            }
            Err(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::TimedOut, "no address answered in time")
            }))
        }
    }
}

impl NbdDevice {
    /// Connects to the export, negotiates and opens the connections; every buffer
    /// the device will use is allocated here. `name` is the device's name (its spec).
    ///
    /// Errors: `Error::Io` when the server cannot be reached or the handshake fails
    /// (the message says which step and what the server sent); `Error::Config` when
    /// the export cannot hold swap (read-only, block size above a page, empty).
    pub fn connect(addr: &NbdAddr, opts: &NbdOptions, name: &str) -> Result<NbdDevice> {
        // (A deadline is `Instant::now() + timeout`: an unbounded one would overflow.)
        if opts.timeout.is_zero() || opts.timeout > MAX_TIMEOUT {
            return Err(cfg_err(
                name,
                format_args!("timeout must be positive and at most {MAX_TIMEOUT:?}"),
            ));
        }
        if opts.conns == Some(0) || opts.conns.is_some_and(|c| c > MAX_CONNS) {
            return Err(cfg_err(name, format_args!("conns must be 1..={MAX_CONNS}")));
        }
        let target = match addr {
            NbdAddr::Unix(p) => Target::Unix(p.clone()),
            NbdAddr::Tcp { host, port } => {
                let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| {
                        Error::Io(io::Error::new(
                            e.kind(),
                            format!("NBD device {name}: cannot resolve {host}: {e}"),
                        ))
                    })?
                    .collect();
                if addrs.is_empty() {
                    return Err(cfg_err(name, format_args!("{host} has no address")));
                }
                Target::Tcp(addrs)
            }
        };
        let ctx =
            |e: io::Error| Error::Io(io::Error::new(e.kind(), format!("NBD device {name}: {e}")));
        let (fd0, n) = connect_once(&target, opts).map_err(ctx)?;
        if let Err(why) = n.check(PAGE_SIZE as u32) {
            // SAFETY: the socket is ours and not shared yet.
            unsafe { libc::close(fd0) };
            return Err(cfg_err(name, why));
        }
        let multi = n.flags & proto::TF_CAN_MULTI_CONN != 0;
        let nconns = if multi {
            opts.conns.unwrap_or(DEFAULT_MULTI_CONNS)
        } else {
            1
        };
        let info = NbdInfo {
            size: n.size,
            flags: n.flags,
            structured: n.structured,
            multi_conn: multi,
            conns: nconns,
            block: (n.min_block, n.pref_block, n.max_block),
        };
        let conns: Box<[Conn]> = (0..nconns).map(|_| Conn::new()).collect();
        conns[0].install(fd0, n.structured, n.flags);
        for c in conns.iter().skip(1) {
            let (fd, m) = connect_once(&target, opts).map_err(ctx)?;
            let lost = flags_lost(relied_on(&info, opts), m.flags);
            if m.size < n.size || m.check(PAGE_SIZE as u32).is_err() || lost.is_some() {
                // SAFETY: the socket is ours and not shared yet.
                unsafe { libc::close(fd) };
                return Err(cfg_err(
                    name,
                    format_args!(
                        "a second connection negotiated a different export{}",
                        lost.map(|w| format!(": {w}")).unwrap_or_default()
                    ),
                ));
            }
            c.install(fd, m.structured, m.flags);
        }
        let sh = Arc::new(Shared {
            name: name.to_string(),
            target,
            opts: opts.clone(),
            pages: n.size / PAGE_SIZE as u64,
            info,
            conns,
            shutdown: AtomicBool::new(false),
            cnt: Counters::default(),
            last_connect_error: Mutex::new(None),
        });
        let s2 = sh.clone();
        let h = std::thread::Builder::new()
            .name("usermm-nbd-reconnect".into())
            .spawn_engine(move || {
                crate::sync::mark_engine_thread();
                reconnector(&s2)
            })
            .map_err(Error::Io)?;
        for c in sh.conns.iter() {
            *c.reconnector.lock() = Some(h.thread().clone());
        }
        Ok(NbdDevice {
            sh,
            reconnector: Some(h),
        })
    }

    /// What was negotiated.
    pub fn info(&self) -> NbdInfo {
        self.sh.info
    }

    /// Counters of faults seen so far.
    pub fn stats(&self) -> NbdStats {
        let c = &self.sh.cnt;
        NbdStats {
            reconnects: c.reconnects.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
            server_errors: c.server_errors.load(Ordering::Relaxed),
            fast_failed_writes: c.fast_failed_writes.load(Ordering::Relaxed),
            uncertain: c.uncertain.load(Ordering::Relaxed),
        }
    }

    /// Connections up right now.
    pub fn conns_up(&self) -> usize {
        self.sh.conns.iter().filter(|c| c.is_up()).count()
    }

    /// Why the last reconnection attempt failed, if it did.
    pub fn last_connect_error(&self) -> Option<String> {
        self.sh.last_connect_error.lock().clone()
    }
}

impl Shared {
    /// Runs one request on some connection that is up. `Err(None)` when none is.
    #[allow(clippy::too_many_arguments)]
    fn try_request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        read_buf: Option<&mut [u8]>,
        payload: Option<&[u8]>,
        deadline: Instant,
    ) -> std::result::Result<(), Option<Fail>> {
        let n = self.conns.len();
        // Fill the lowest-numbered connection up to SPILL requests in flight, then
        // the next: at low depth one warm connection (and one reader) does all the
        // work; under load the requests spread. Else the least loaded one.
        let start = if n == 1 {
            0
        } else {
            (0..n)
                .find(|&i| self.conns[i].is_up() && self.conns[i].in_flight() < SPILL)
                .unwrap_or_else(|| {
                    (0..n)
                        .filter(|&i| self.conns[i].is_up())
                        .min_by_key(|&i| self.conns[i].in_flight())
                        .unwrap_or(0)
                })
        };
        for k in 0..n {
            let c = &self.conns[(start + k) % n];
            let Some(l) = c.enter() else { continue };
            let mut flags = flags;
            if cmd == proto::CMD_READ && l.structured() && l.flags() & proto::TF_SEND_DF != 0 {
                flags |= proto::CMD_FLAG_DF;
            }
            if flags & proto::CMD_FLAG_FUA != 0 && l.flags() & proto::TF_SEND_FUA == 0 {
                flags &= !proto::CMD_FLAG_FUA;
            }
            let r = c.request(&l, cmd, flags, offset, len, read_buf, payload, deadline);
            return r.map_err(|f| {
                match f {
                    Fail::Timeout => self.cnt.timeouts.fetch_add(1, Ordering::Relaxed),
                    Fail::Proto(_) => self.cnt.protocol_errors.fetch_add(1, Ordering::Relaxed),
                    Fail::Server(_) => self.cnt.server_errors.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                Some(f)
            });
        }
        Err(None)
    }

    fn check_slot(&self, slot: u64, buf_len: usize) -> io::Result<u64> {
        if buf_len != PAGE_SIZE || slot >= self.pages {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        Ok(slot * PAGE_SIZE as u64)
    }

    /// A request that waits, until its deadline, for a link when none is up, and
    /// with `retry_sent` is retried on a new link when the link drops under it
    /// (reads, flush). Not for writes: those fail fast. A trim is not retried once
    /// sent (`retry_sent` false): the first may still be carried out after the
    /// retry succeeded, and then after the slots were handed out again.
    fn patient(
        &self,
        cmd: u16,
        offset: u64,
        len: u32,
        mut read_buf: Option<&mut [u8]>,
        retry_sent: bool,
    ) -> io::Result<()> {
        let deadline = Instant::now() + self.opts.timeout;
        let mut round = 0u32;
        let mut last = None;
        loop {
            match self.try_request(cmd, 0, offset, len, read_buf.as_deref_mut(), None, deadline) {
                Ok(()) => return Ok(()),
                // The link went away (a server restart?): retry on the next one.
                // A reply cut short is retried too, and reported if it persists.
                r @ (Err(Some(Fail::Link))
                | Err(Some(Fail::Proto(proto::ProtoError::Truncated)))
                | Err(None)) => {
                    if let Err(Some(f)) = r {
                        last = Some(f);
                    }
                    if last.is_some() && !retry_sent {
                        return Err(fail_to_io(last.unwrap_or(Fail::Link)));
                    }
                    if Instant::now() >= deadline || !self.opts.wait_for_reconnect {
                        return Err(match last {
                            Some(f @ Fail::Proto(_)) => fail_to_io(f),
                            Some(Fail::Link) => io::Error::from_raw_os_error(libc::ECONNRESET),
                            _ => io::Error::from_raw_os_error(libc::ENOTCONN),
                        });
                    }
                    // Wait for the reconnector (a short poll: reconnection is rare).
                    round += 1;
                    let us = (50u64 << round.min(6)).min(5000);
                    std::thread::sleep(Duration::from_micros(us));
                }
                // The deadline passed on a retry: say what made us retry.
                Err(Some(Fail::Timeout)) if matches!(last, Some(Fail::Proto(_))) => {
                    return Err(fail_to_io(last.unwrap_or(Fail::Timeout)))
                }
                Err(Some(f)) => return Err(fail_to_io(f)),
            }
        }
    }
}

/// The error a failed request returns. Allocation-free except for protocol
/// violations, which carry a message.
fn fail_to_io(f: Fail) -> io::Error {
    match f {
        Fail::Server(e) => {
            let code = match e {
                1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => e as i32,
                _ => libc::EIO,
            };
            io::Error::from_raw_os_error(code)
        }
        Fail::Link => io::Error::from_raw_os_error(libc::ECONNRESET),
        Fail::Timeout => io::Error::from_raw_os_error(libc::ETIMEDOUT),
        Fail::Busy => io::Error::from_raw_os_error(libc::EBUSY),
        Fail::Proto(p) => io::Error::new(io::ErrorKind::InvalidData, p),
    }
}

/// Whether a failed write or discard may still be carried out by the server: it
/// was sent, and then the reply did not come by the deadline (`ETIMEDOUT`), the
/// link was lost (`ECONNRESET`), or the server broke the protocol (`InvalidData`).
/// Closing our socket does not stop a server that has read the request already,
/// and no NBD command orders it against a request on another (or a later)
/// connection: a FLUSH covers only writes the server has *completed*. So the
/// slot must not be written again (nor trimmed and reused) while the device is in
/// service; the swap table holds such slots back for good (`swap::table`,
/// `SwapDevice::hold_back`). Every other error of this device means the request
/// was not sent (`ENOTCONN`, `EBUSY`, `EINVAL`) or was answered (a server error).
pub fn outcome_unknown(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ETIMEDOUT | libc::ECONNRESET))
        || e.kind() == io::ErrorKind::InvalidData
}

/// Transmission flags a later connection must offer because the device relies on
/// them since its first: the commands it sends (FLUSH, TRIM, WRITE_ZEROES, FUA
/// when `fua=1`) and multi-conn when it opened several connections.
fn relied_on(info: &NbdInfo, opts: &NbdOptions) -> u16 {
    let mut f = proto::TF_SEND_FLUSH | proto::TF_SEND_TRIM | proto::TF_SEND_WRITE_ZEROES;
    if opts.fua {
        f |= proto::TF_SEND_FUA;
    }
    if info.conns > 1 {
        f |= proto::TF_CAN_MULTI_CONN;
    }
    info.flags & f
}

/// Why a connection offering `flags` cannot serve a device that relies on
/// `need` (`relied_on`), if it cannot.
fn flags_lost(need: u16, flags: u16) -> Option<String> {
    let lost = need & !flags;
    if lost == 0 {
        return None;
    }
    let names = [
        (proto::TF_SEND_FLUSH, "FLUSH"),
        (proto::TF_SEND_FUA, "FUA"),
        (proto::TF_SEND_TRIM, "TRIM"),
        (proto::TF_SEND_WRITE_ZEROES, "WRITE_ZEROES"),
        (proto::TF_CAN_MULTI_CONN, "CAN_MULTI_CONN"),
    ];
    let which: Vec<&str> = names
        .iter()
        .filter(|(f, _)| lost & f != 0)
        .map(|(_, n)| *n)
        .collect();
    Some(format!(
        "the server no longer offers {} (transmission flags {flags:#06x}, were {need:#06x} \
         of those the device relies on); refused",
        which.join(", ")
    ))
}

fn is_zero(buf: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets.
        unsafe { buf.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

impl BlockDevice for NbdDevice {
    fn name(&self) -> &str {
        &self.sh.name
    }

    fn available(&self) -> bool {
        self.conns_up() > 0
    }

    fn pages(&self) -> u64 {
        self.sh.pages
    }

    fn read_page(&self, slot: u64, buf: &mut [u8]) -> io::Result<()> {
        let off = self.sh.check_slot(slot, buf.len())?;
        self.sh
            .patient(proto::CMD_READ, off, PAGE_SIZE as u32, Some(buf), true)
    }

    fn write_page(&self, slot: u64, buf: &[u8]) -> io::Result<()> {
        let sh = &*self.sh;
        let off = sh.check_slot(slot, buf.len())?;
        let deadline = Instant::now() + sh.opts.timeout;
        let flags = if sh.opts.fua { proto::CMD_FLAG_FUA } else { 0 };
        let zeroes = sh.info.flags & proto::TF_SEND_WRITE_ZEROES != 0 && is_zero(buf);
        let r = if zeroes {
            sh.try_request(
                proto::CMD_WRITE_ZEROES,
                flags,
                off,
                PAGE_SIZE as u32,
                None,
                None,
                deadline,
            )
        } else {
            sh.try_request(
                proto::CMD_WRITE,
                flags,
                off,
                PAGE_SIZE as u32,
                None,
                Some(buf),
                deadline,
            )
        };
        match r {
            Ok(()) => Ok(()),
            Err(None) => {
                sh.cnt.fast_failed_writes.fetch_add(1, Ordering::Relaxed);
                Err(io::Error::from_raw_os_error(libc::ENOTCONN))
            }
            Err(Some(f)) => {
                let e = fail_to_io(f);
                if outcome_unknown(&e) {
                    sh.cnt.uncertain.fetch_add(1, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }

    fn flush(&self) -> io::Result<()> {
        if self.sh.info.flags & proto::TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        // With several connections the server has multi-conn: a flush on one
        // covers writes acknowledged on all.
        self.sh.patient(proto::CMD_FLUSH, 0, 0, None, true)
    }

    fn discard(&self, first: u64, count: u64) -> io::Result<()> {
        let sh = &*self.sh;
        if first >= sh.pages {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        if sh.info.flags & proto::TF_SEND_TRIM == 0 {
            return Ok(());
        }
        let mut page = first;
        let end = first.saturating_add(count).min(sh.pages);
        const MAX_PAGES: u64 = (1 << 30) / PAGE_SIZE as u64;
        while page < end {
            let n = (end - page).min(MAX_PAGES);
            sh.patient(
                proto::CMD_TRIM,
                page * PAGE_SIZE as u64,
                (n * PAGE_SIZE as u64) as u32,
                None,
                false,
            )
            .inspect_err(|e| {
                if outcome_unknown(e) {
                    sh.cnt.uncertain.fetch_add(1, Ordering::Relaxed);
                }
            })?;
            page += n;
        }
        Ok(())
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        self.sh.shutdown.store(true, Ordering::SeqCst);
        if let Some(h) = self.reconnector.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        let deadline = Instant::now() + self.sh.opts.timeout;
        for c in self.sh.conns.iter() {
            if let Some(l) = c.enter() {
                c.send_only(&l, proto::CMD_DISC, deadline);
            }
        }
    }
}

/// Body of the reconnector thread: closes broken links once unused and opens new
/// ones with exponential backoff, until the device is dropped. A link that breaks
/// soon after it was made (a flapping or misbehaving server) does not reset the
/// backoff, so such a server is not hammered with reconnections.
fn reconnector(sh: &Shared) {
    let n = sh.conns.len();
    let mut backoff = vec![Duration::ZERO; n];
    let mut next_try = vec![Instant::now(); n];
    let mut up_since: Vec<Option<Instant>> = vec![Some(Instant::now()); n];
    while !sh.shutdown.load(Ordering::SeqCst) {
        let mut wait = Duration::from_secs(1);
        for (i, c) in sh.conns.iter().enumerate() {
            if c.is_up() {
                continue;
            }
            if let Some(t) = up_since[i].take() {
                // Just broke: try again at once after a long-lived link, else back off.
                if t.elapsed() >= STABLE_LINK {
                    backoff[i] = Duration::ZERO;
                    next_try[i] = Instant::now();
                } else {
                    backoff[i] = (backoff[i] * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                    next_try[i] = Instant::now() + backoff[i];
                }
            }
            if c.has_socket() && !c.close_when_unused(Instant::now() + sh.opts.timeout) {
                wait = wait.min(Duration::from_millis(10));
                continue;
            }
            let now = Instant::now();
            if now < next_try[i] {
                wait = wait.min(next_try[i] - now);
                continue;
            }
            match connect_once(&sh.target, &sh.opts) {
                Ok((fd, neg)) => {
                    let why = if neg.size < sh.info.size {
                        Some(format!(
                            "the server now offers an export of {} bytes (was {})",
                            neg.size, sh.info.size
                        ))
                    } else if let Err(e) = neg.check(PAGE_SIZE as u32) {
                        Some(e)
                    } else {
                        flags_lost(relied_on(&sh.info, &sh.opts), neg.flags)
                    };
                    let Some(why) = why else {
                        c.install(fd, neg.structured, neg.flags);
                        sh.cnt.reconnects.fetch_add(1, Ordering::Relaxed);
                        up_since[i] = Some(Instant::now());
                        continue;
                    };
                    // SAFETY: the socket is ours and was never shared.
                    unsafe { libc::close(fd) };
                    *sh.last_connect_error.lock() = Some(why);
                }
                Err(e) => *sh.last_connect_error.lock() = Some(e.to_string()),
            }
            backoff[i] = (backoff[i] * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
            next_try[i] = Instant::now() + backoff[i];
            wait = wait.min(backoff[i]);
        }
        std::thread::park_timeout(wait);
    }
}
