//! A malicious (or broken) NBD server, written here as a thread on a Unix socket,
//! against the client: wrong magics, oversized lengths, unknown and duplicate
//! handles, short reads, garbage after NBD_OPT_GO, replies nobody asked for,
//! silence, a reply trickled a byte per almost-timeout, an endless stream of
//! chunks without DONE. Every case must end in a clear error (the message names
//! the fault), within the timeout, with no panic and no unbounded allocation: a
//! counting global allocator checks that no scenario allocates more than 2 MiB in
//! total. Each test runs under the test kit's watchdog.
//!
//! A second, storing server (`Store`) checks what the client does after a request
//! whose outcome it cannot know: a write never answered (its slot must never be
//! written again, or the old write could land over a newer page), a trim whose
//! link was lost (not retried), and a reconnection to a server that dropped
//! transmission flags the device relies on (refused).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use usermm::device::nbd::proto::*;
use usermm::device::nbd::{NbdAddr, NbdDevice, NbdOptions};
use usermm::device::BlockDevice;
use usermm::Error;
use usermm_testkit::watchdog::watched;

/// How long a test may make no progress before the watchdog fails it.
const STALL: Duration = Duration::from_secs(60);

struct Counting;
static ALLOCATED: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only adds a relaxed counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(l.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCATED.fetch_add(n as u64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// What the server does wrong.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Evil {
    GreetingMagic,
    OldStyle,
    OptionReplyMagic,
    OversizedOptionReply,
    EndlessInfo,
    NoExportInfo,
    ReadOnly,
    GarbageAfterGo,
    ReplyMagic,
    UnknownHandle,
    DuplicateReply,
    ShortRead,
    OversizedChunk,
    OversizedErrorChunk,
    DoneWithoutData,
    StructuredNotNegotiated,
    Silent,
    Eio,
    /// The honest reply, one byte per 0.6 × the client's timeout.
    Trickle,
    /// Non-final error chunks for ever, sent in pieces that straddle chunks.
    EndlessChunks,
}

/// The client's timeout in these tests (`connect`).
const TIMEOUT: Duration = Duration::from_millis(800);

const SIZE: u64 = 16 << 20;

fn opt_reply(s: &mut UnixStream, opt: u32, kind: u32, data: &[u8]) {
    let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend(opt.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    let _ = s.write_all(&v);
}

fn simple(err: u32, handle: u64) -> Vec<u8> {
    let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend(err.to_be_bytes());
    v.extend(handle.to_be_bytes());
    v
}

fn chunk_hdr(flags: u16, kind: u16, handle: u64, len: u32) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend(handle.to_be_bytes());
    v.extend(len.to_be_bytes());
    v
}

fn serve(mut s: UnixStream, evil: Evil) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    match evil {
        Evil::GreetingMagic => g = b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
        Evil::OldStyle => {
            g.extend(CLISERV_MAGIC.to_be_bytes());
            g.extend(SIZE.to_be_bytes());
            g.extend([0u8; 128]);
        }
        _ => {
            g.extend(IHAVEOPT.to_be_bytes());
            g.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        }
    }
    s.write_all(&g)?;
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags)?;
    let structured_ok = evil != Evil::StructuredNotNegotiated;
    let mut structured = false;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; len.min(1 << 16) as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_STRUCTURED_REPLY if structured_ok => {
                structured = true;
                opt_reply(&mut s, opt, REP_ACK, &[]);
            }
            OPT_GO => {
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend(SIZE.to_be_bytes());
                let ro = if evil == Evil::ReadOnly {
                    TF_READ_ONLY
                } else {
                    0
                };
                info.extend((TF_HAS_FLAGS | TF_SEND_FLUSH | ro).to_be_bytes());
                match evil {
                    Evil::OptionReplyMagic => {
                        s.write_all(&[0xA5; 64])?;
                    }
                    Evil::OversizedOptionReply => {
                        let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                        v.extend(OPT_GO.to_be_bytes());
                        v.extend(REP_INFO.to_be_bytes());
                        v.extend(u32::MAX.to_be_bytes());
                        s.write_all(&v)?;
                        s.write_all(&[0u8; 4096])?;
                    }
                    Evil::EndlessInfo => {
                        for _ in 0..10_000 {
                            opt_reply(&mut s, opt, REP_INFO, &info);
                        }
                    }
                    Evil::NoExportInfo => opt_reply(&mut s, opt, REP_ACK, &[]),
                    _ => {
                        opt_reply(&mut s, opt, REP_INFO, &info);
                        let mut ack = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                        ack.extend(opt.to_be_bytes());
                        ack.extend(REP_ACK.to_be_bytes());
                        ack.extend(0u32.to_be_bytes());
                        if evil == Evil::GarbageAfterGo {
                            ack.extend([0x5Au8; 64]);
                        }
                        s.write_all(&ack)?;
                        break;
                    }
                }
            }
            _ => opt_reply(&mut s, opt, REP_ERR_UNSUP, &[]),
        }
    }
    // Transmission.
    loop {
        let mut r = [0u8; REQUEST_LEN];
        s.read_exact(&mut r)?;
        let cmd = u16::from_be_bytes([r[6], r[7]]);
        let handle = u64::from_be_bytes(r[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(r[24..28].try_into().unwrap());
        if cmd == CMD_WRITE {
            let mut p = vec![0u8; len as usize];
            s.read_exact(&mut p)?;
        }
        if cmd == CMD_DISC {
            return Ok(());
        }
        let data = vec![0x42u8; len as usize];
        let honest = |s: &mut UnixStream| -> std::io::Result<()> {
            if cmd == CMD_READ && structured {
                let mut v = chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + len);
                v.extend(offset.to_be_bytes());
                v.extend(&data);
                s.write_all(&v)
            } else {
                let mut v = simple(0, handle);
                if cmd == CMD_READ {
                    v.extend(&data);
                }
                s.write_all(&v)
            }
        };
        match evil {
            Evil::ReplyMagic => s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0])?,
            Evil::UnknownHandle => s.write_all(&simple(0, handle ^ 0x5555_0000_0000))?,
            Evil::DuplicateReply => {
                honest(&mut s)?;
                honest(&mut s)?;
            }
            Evil::ShortRead => {
                let mut v = simple(0, handle);
                v.extend(&data[..100]);
                if structured {
                    v = chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + len);
                    v.extend(offset.to_be_bytes());
                    v.extend(&data[..100]);
                }
                s.write_all(&v)?;
                return Ok(()); // and hang up
            }
            Evil::OversizedChunk => {
                s.write_all(&chunk_hdr(0, REPLY_TYPE_OFFSET_DATA, handle, 0x7fff_fff0))?;
                s.write_all(&[0u8; 8192])?;
            }
            Evil::OversizedErrorChunk => {
                let mut v = chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 1 << 30);
                v.extend(5u32.to_be_bytes());
                v.extend(0xffffu16.to_be_bytes());
                s.write_all(&v)?;
                s.write_all(&[b'x'; 8192])?;
            }
            Evil::DoneWithoutData => {
                let mut v = chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + 1024);
                v.extend(offset.to_be_bytes());
                v.extend(&data[..1024]);
                s.write_all(&v)?;
            }
            Evil::StructuredNotNegotiated => {
                s.write_all(&chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0))?;
            }
            Evil::Silent => {}
            Evil::Eio if structured => {
                let msg = b"injected";
                let mut v = chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + 8);
                v.extend(5u32.to_be_bytes());
                v.extend((msg.len() as u16).to_be_bytes());
                v.extend(msg);
                s.write_all(&v)?
            }
            Evil::Eio => s.write_all(&simple(5, handle))?,
            Evil::Trickle => {
                let mut v = Vec::new();
                if cmd == CMD_READ && structured {
                    v = chunk_hdr(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + len);
                    v.extend(offset.to_be_bytes());
                    v.extend(&data);
                }
                for b in v {
                    std::thread::sleep(TIMEOUT * 6 / 10);
                    s.write_all(&[b])?;
                }
            }
            Evil::EndlessChunks => {
                // 26-byte error chunks without DONE, each write the second half
                // of one and the first half of the next: the client's buffer never
                // ends on a chunk boundary.
                let mut c = chunk_hdr(0, REPLY_TYPE_ERROR, handle, 6);
                c.extend(5u32.to_be_bytes());
                c.extend(0u16.to_be_bytes());
                let half = c.len() / 2;
                s.write_all(&c[..half])?;
                let mut piece = c[half..].to_vec();
                piece.extend(&c[..half]);
                let t = Instant::now();
                while t.elapsed() < Duration::from_secs(20) {
                    s.write_all(&piece)?;
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Ok(());
            }
            _ => honest(&mut s)?,
        }
    }
}

/// Runs the evil server on `path` until `stop`.
fn start(path: &Path, evil: Evil, stop: Arc<AtomicBool>) {
    let l = UnixListener::bind(path).unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    std::thread::spawn(move || serve(s, evil));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
}

fn connect(path: &Path) -> usermm::Result<NbdDevice> {
    NbdDevice::connect(
        &NbdAddr::Unix(path.to_path_buf()),
        &NbdOptions {
            export: "swap".into(),
            timeout: TIMEOUT,
            ..NbdOptions::default()
        },
        "evil",
    )
}

/// Taken by every test for its whole run: the allocation counter is global, so
/// a test running beside another (a Vm, a storing server) would count its bytes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` against a server doing `evil`; checks time and allocation bounds.
fn scenario(evil: Evil, f: impl FnOnce(&Path)) {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.sock");
    let stop = Arc::new(AtomicBool::new(false));
    start(&path, evil, stop.clone());
    let a0 = ALLOCATED.load(Ordering::Relaxed);
    let t0 = Instant::now();
    f(&path);
    let bytes = ALLOCATED.load(Ordering::Relaxed) - a0;
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    println!("  {evil:?}: {took:?}, {bytes} bytes allocated (test and server included)");
    assert!(took < Duration::from_secs(5), "{evil:?} took {took:?}");
    assert!(bytes < 2 << 20, "{evil:?} allocated {bytes} bytes");
}

fn connect_error(evil: Evil, needle: &str) {
    scenario(evil, |p| {
        let e = connect(p).expect_err("connect must fail").to_string();
        println!("    -> {e}");
        assert!(
            e.contains(needle),
            "{evil:?}: {e:?} does not mention {needle:?}"
        );
    });
}

fn read_error(evil: Evil, needle: &str) {
    scenario(evil, |p| {
        let d = connect(p).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = d.read_page(1, &mut buf).expect_err("read must fail");
        let msg = e.to_string();
        println!("    -> {msg}");
        assert!(
            msg.contains(needle),
            "{evil:?}: {msg:?} does not mention {needle:?}"
        );
        // The device survives: more requests fail cleanly too, then it drops.
        let _ = d.write_page(2, &buf);
        let _ = d.read_page(3, &mut buf);
        assert!(
            d.stats().protocol_errors + d.stats().timeouts >= 1,
            "{:?}",
            d.stats()
        );
    });
}

#[test]
fn handshake_violations_are_clear_errors() {
    watched("handshake_violations_are_clear_errors", STALL, |_| {
        connect_error(Evil::GreetingMagic, "not an NBD server");
        connect_error(Evil::OldStyle, "oldstyle");
        connect_error(Evil::OptionReplyMagic, "wrong magic");
        connect_error(Evil::OversizedOptionReply, "oversized option reply");
        connect_error(Evil::EndlessInfo, "too many option replies");
        connect_error(Evil::NoExportInfo, "NBD_INFO_EXPORT");
        connect_error(Evil::ReadOnly, "read-only");
    });
}

#[test]
fn garbage_after_go() {
    watched("garbage_after_go", STALL, |_| {
        scenario(Evil::GarbageAfterGo, |p| match connect(p) {
            Err(e) => {
                let m = e.to_string();
                println!("    -> {m}");
                assert!(m.contains("garbage after the handshake"), "{m}");
            }
            Ok(d) => {
                // The garbage arrived after the check: the first reply read sees it.
                let e = d.read_page(0, &mut [0u8; 4096]).unwrap_err().to_string();
                assert!(e.contains("wrong magic"), "{e}");
            }
        });
    });
}

#[test]
fn transmission_violations_are_clear_errors() {
    watched("transmission_violations_are_clear_errors", STALL, |_| {
        read_error(Evil::ReplyMagic, "wrong magic");
        read_error(Evil::UnknownHandle, "unknown handle");
        read_error(Evil::OversizedChunk, "oversized reply chunk");
        read_error(Evil::OversizedErrorChunk, "oversized reply chunk");
        read_error(
            Evil::DoneWithoutData,
            "claimed success after 1024 of 4096 bytes",
        );
        read_error(Evil::StructuredNotNegotiated, "not negotiated");
        read_error(Evil::ShortRead, "short read");
    });
}

#[test]
fn duplicate_reply_is_a_reply_to_a_request_never_sent() {
    watched(
        "duplicate_reply_is_a_reply_to_a_request_never_sent",
        STALL,
        |_| {
            scenario(Evil::DuplicateReply, |p| {
                let d = connect(p).unwrap();
                let mut buf = vec![0u8; 4096];
                d.read_page(1, &mut buf).unwrap();
                assert!(buf.iter().all(|&b| b == 0x42));
                buf.fill(0);
                // The second (duplicate) reply is read before the answer to this request.
                let e = d.read_page(2, &mut buf).unwrap_err().to_string();
                println!("    -> {e}");
                assert!(e.contains("unknown handle"), "{e}");
                assert!(buf.iter().all(|&b| b == 0), "no data from a stray reply");
            });
        },
    );
}

#[test]
fn silent_server_times_out() {
    watched("silent_server_times_out", STALL, |_| {
        scenario(Evil::Silent, |p| {
            let d = connect(p).unwrap();
            let t = Instant::now();
            let e = d.read_page(0, &mut [0u8; 4096]).unwrap_err();
            println!("    -> {e} after {:?}", t.elapsed());
            assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT), "{e}");
            assert!(t.elapsed() >= Duration::from_millis(700));
            let e = d.write_page(0, &[0u8; 4096]).unwrap_err();
            println!("    -> write: {e}");
            assert!(d.stats().timeouts >= 1);
        });
    });
}

#[test]
fn server_errors_fail_one_request_only() {
    watched("server_errors_fail_one_request_only", STALL, |_| {
        scenario(Evil::Eio, |p| {
            let d = connect(p).unwrap();
            for i in 0..10 {
                let e = d.read_page(i, &mut [0u8; 4096]).unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
            }
            let s = d.stats();
            assert_eq!(s.server_errors, 10);
            assert_eq!(s.reconnects, 0, "an error reply keeps the connection");
            assert_eq!(d.conns_up(), 1);
        });
    });
}

#[test]
fn through_a_vm_the_error_is_a_device_error() {
    watched("through_a_vm_the_error_is_a_device_error", STALL, |_| {
        scenario(Evil::UnknownHandle, |p| {
            let vm = usermm::Vm::new(usermm::Config::default().memory_budget(1 << 20)).unwrap();
            vm.swapon_device(Arc::new(connect(p).unwrap()), 0).unwrap();
            let mm = vm.new_space();
            let r = mm.map_anon(4 << 20).unwrap();
            // Page-out fails (unknown handle) so the pages stay resident; the access
            // that needs a frame eventually gets the device error, never a panic.
            let mut saw = None;
            for i in 0..1024u64 {
                if let Err(e) = mm.write(r.start() + i * 4096, &[1u8; 64]) {
                    saw = Some(e);
                    break;
                }
            }
            let e = saw.expect("memory cannot be freed: an access must fail");
            println!("    -> {e}");
            assert!(matches!(e, Error::Device { .. }), "{e:?}");
            // What was written is still there.
            let mut b = [0u8; 64];
            mm.read(r.start(), &mut b).unwrap();
            assert_eq!(b, [1u8; 64]);
        });
    });
}

/// A read against `evil` fails with `ETIMEDOUT` by about its deadline, however
/// the reply keeps coming: the deadline bounds the whole reply, not each read.
fn reply_bounded_by_deadline(evil: Evil) {
    scenario(evil, |p| {
        let d = connect(p).unwrap();
        let t = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        // On a thread of its own, so a read that never ends fails the test here
        // (and leaves that thread behind) instead of hanging it.
        std::thread::spawn(move || {
            let r = d.read_page(1, &mut [0u8; 4096]);
            let _ = tx.send((r.map_err(|e| e.raw_os_error()), d.stats()));
        });
        let Ok((r, stats)) = rx.recv_timeout(TIMEOUT * 4) else {
            panic!(
                "{evil:?}: the read still waits {:?} after it began; its deadline was {TIMEOUT:?}",
                t.elapsed()
            );
        };
        let took = t.elapsed();
        println!("    -> {r:?} after {took:?}");
        assert_eq!(r, Err(Some(libc::ETIMEDOUT)), "{evil:?}");
        assert!(
            took < TIMEOUT * 2,
            "{evil:?}: the read failed after {took:?}"
        );
        assert!(stats.timeouts >= 1, "{stats:?}");
    });
}

#[test]
fn a_trickled_reply_times_out_by_the_deadline() {
    watched("a_trickled_reply_times_out_by_the_deadline", STALL, |_| {
        reply_bounded_by_deadline(Evil::Trickle);
    });
}

#[test]
fn endless_chunks_without_done_time_out_by_the_deadline() {
    watched(
        "endless_chunks_without_done_time_out_by_the_deadline",
        STALL,
        |_| reply_bounded_by_deadline(Evil::EndlessChunks),
    );
}

/// A storing server (simple replies only) with a few misbehaviours, shared by
/// all its connections.
struct Store {
    data: Mutex<Vec<u8>>,
    /// Connections accepted so far.
    conns: AtomicUsize,
    /// Transmission flags offered on connection `i`.
    flags: fn(usize) -> u16,
    /// Writes received so far, and which one is never answered (1-based; 0: none).
    writes: AtomicUsize,
    hold_write: usize,
    /// The unanswered writes (offset, payload).
    held: Mutex<Vec<(u64, Vec<u8>)>>,
    /// Offsets written again after a write there was left unanswered.
    rewritten: Mutex<Vec<u64>>,
    /// Trims received, and whether the first one's connection is dropped unanswered.
    trims: AtomicUsize,
    drop_first_trim: bool,
    /// Whether the first connection is closed after its first reply.
    drop_first_link: bool,
}

impl Store {
    fn new(size: u64, flags: fn(usize) -> u16) -> Store {
        Store {
            data: Mutex::new(vec![0; size as usize]),
            conns: AtomicUsize::new(0),
            flags,
            writes: AtomicUsize::new(0),
            hold_write: 0,
            held: Mutex::new(Vec::new()),
            rewritten: Mutex::new(Vec::new()),
            trims: AtomicUsize::new(0),
            drop_first_trim: false,
            drop_first_link: false,
        }
    }

    fn serve(&self, mut s: UnixStream) -> std::io::Result<()> {
        let conn = self.conns.fetch_add(1, Ordering::SeqCst);
        let size = self.data.lock().unwrap().len() as u64;
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend(IHAVEOPT.to_be_bytes());
        g.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&g)?;
        let mut cflags = [0u8; 4];
        s.read_exact(&mut cflags)?;
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h)?;
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut data = vec![0u8; len.min(1 << 16) as usize];
            s.read_exact(&mut data)?;
            if opt != OPT_GO {
                opt_reply(&mut s, opt, REP_ERR_UNSUP, &[]);
                continue;
            }
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend(size.to_be_bytes());
            info.extend((TF_HAS_FLAGS | (self.flags)(conn)).to_be_bytes());
            opt_reply(&mut s, opt, REP_INFO, &info);
            opt_reply(&mut s, opt, REP_ACK, &[]);
            break;
        }
        loop {
            let mut r = [0u8; REQUEST_LEN];
            s.read_exact(&mut r)?;
            let cmd = u16::from_be_bytes([r[6], r[7]]);
            let handle = u64::from_be_bytes(r[8..16].try_into().unwrap());
            let off = u64::from_be_bytes(r[16..24].try_into().unwrap());
            let len = u32::from_be_bytes(r[24..28].try_into().unwrap());
            let range = off as usize..off as usize + len as usize;
            let mut reply = simple(0, handle);
            match cmd {
                CMD_DISC => return Ok(()),
                CMD_WRITE => {
                    let mut p = vec![0u8; len as usize];
                    s.read_exact(&mut p)?;
                    let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == self.hold_write {
                        // Received, never answered (a request stuck in the server).
                        self.held.lock().unwrap().push((off, p));
                        continue;
                    }
                    let mut d = self.data.lock().unwrap();
                    d[range].copy_from_slice(&p);
                    if let Some((_, old)) = self.held.lock().unwrap().iter().find(|h| h.0 == off) {
                        // The old write is carried out now, after the newer one.
                        self.rewritten.lock().unwrap().push(off);
                        d[off as usize..off as usize + old.len()].copy_from_slice(old);
                    }
                }
                CMD_READ => reply.extend(&self.data.lock().unwrap()[range]),
                // The first trim: hang up without an answer.
                CMD_TRIM
                    if self.trims.fetch_add(1, Ordering::SeqCst) == 0 && self.drop_first_trim =>
                {
                    return Ok(());
                }
                CMD_WRITE_ZEROES => self.data.lock().unwrap()[range].fill(0),
                _ => {}
            }
            s.write_all(&reply)?;
            if conn == 0 && self.drop_first_link {
                return Ok(());
            }
        }
    }
}

/// Runs `st` on a fresh socket until `stop`; returns the socket's path.
fn start_store(dir: &Path, st: Arc<Store>, stop: Arc<AtomicBool>) -> std::path::PathBuf {
    let path = dir.join("store.sock");
    let l = UnixListener::bind(&path).unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let st = st.clone();
                    std::thread::spawn(move || st.serve(s));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    path
}

fn connect_store(path: &Path, timeout: Duration) -> NbdDevice {
    NbdDevice::connect(
        &NbdAddr::Unix(path.to_path_buf()),
        &NbdOptions {
            timeout,
            ..NbdOptions::default()
        },
        "store",
    )
    .unwrap()
}

/// A page-out the server never answers fails by its deadline; the slot it was
/// for may still be written by the server at any later time, so it must never be
/// handed out again: the server carries the old write out over any newer one to
/// the same offset (as a server that was slow, not dead, might), and every page
/// must still read back intact.
#[test]
fn a_slot_whose_write_went_unanswered_is_never_written_again() {
    watched(
        "a_slot_whose_write_went_unanswered_is_never_written_again",
        STALL,
        |_| {
            let _one = one_at_a_time();
            const PAGES: u64 = 512;
            let dir = tempfile::tempdir().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let st = Arc::new(Store {
                hold_write: 300,
                ..Store::new(PAGES * 4096, |_| TF_SEND_FLUSH)
            });
            let path = start_store(dir.path(), st.clone(), stop.clone());
            let dev = Arc::new(connect_store(&path, Duration::from_millis(300)));
            let vm = usermm::Vm::new(usermm::Config::default().memory_budget(1 << 20)).unwrap();
            vm.swapon_device(dev.clone(), 0).unwrap();
            let mm = vm.new_space();
            let r = mm.map_anon((PAGES * 4096) as usize).unwrap();
            let page = |round: u8, i: u64| {
                let mut b = [0u8; 64];
                b[..8].copy_from_slice(&i.to_le_bytes());
                b[8] = round;
                b
            };
            // Rounds of writes over every page until the held write has timed out,
            // then four more: freed slots are handed out again meanwhile.
            let mut rounds = 0u8;
            let mut after = 0;
            let t = Instant::now();
            while after < 4 {
                for i in 0..PAGES {
                    mm.write(r.start() + i * 4096, &page(rounds, i)).unwrap();
                }
                rounds = rounds.wrapping_add(1);
                if dev.stats().uncertain > 0 {
                    after += 1;
                } else {
                    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", dev.stats());
                }
            }
            let held = st.held.lock().unwrap().clone();
            assert_eq!(held.len(), 1, "the server held one write");
            println!(
                "    held write at slot {}; {} writes in all; device {:?}",
                held[0].0 / 4096,
                st.writes.load(Ordering::SeqCst),
                dev.stats()
            );
            assert!(dev.stats().uncertain >= 1, "{:?}", dev.stats());
            let info = &vm.swaps()[0];
            assert!(
                info.held_back >= 4096,
                "the held-back slot is not reported: {info:?}"
            );
            let again = st.rewritten.lock().unwrap().clone();
            assert!(
                again.is_empty(),
                "slot(s) {:?} written again after a write there went unanswered: \
                 the old write could land over the newer page",
                again.iter().map(|o| o / 4096).collect::<Vec<_>>()
            );
            for i in 0..PAGES {
                let mut b = [0u8; 64];
                mm.read(r.start() + i * 4096, &mut b)
                    .unwrap_or_else(|e| panic!("page {i}: {e}"));
                assert_eq!(b, page(rounds.wrapping_sub(1), i), "page {i}");
            }
            stop.store(true, Ordering::Relaxed);
        },
    );
}

/// A trim whose link is lost under it is not sent again on the next link: the
/// first may still be carried out, after the slots were handed out again. It
/// fails with an error that says its outcome is unknown.
#[test]
fn a_trim_whose_link_was_lost_is_not_retried() {
    watched("a_trim_whose_link_was_lost_is_not_retried", STALL, |_| {
        let _one = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::new(Store {
            drop_first_trim: true,
            ..Store::new(1 << 20, |_| TF_SEND_FLUSH | TF_SEND_TRIM)
        });
        let path = start_store(dir.path(), st.clone(), stop.clone());
        let d = connect_store(&path, TIMEOUT);
        let e = d.discard(0, 16).expect_err("the trim's link was lost");
        println!("    -> {e}; {:?}", d.stats());
        assert!(usermm::device::nbd::outcome_unknown(&e), "{e}");
        assert_eq!(
            st.trims.load(Ordering::SeqCst),
            1,
            "the trim was sent again"
        );
        assert_eq!(d.stats().uncertain, 1);
        stop.store(true, Ordering::Relaxed);
    });
}

/// A server that comes back without WRITE_ZEROES and TRIM, which the device
/// uses since its first connection, is refused, with a reason.
#[test]
fn a_reconnection_that_lost_flags_is_refused() {
    watched("a_reconnection_that_lost_flags_is_refused", STALL, |_| {
        let _one = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::new(Store {
            drop_first_link: true,
            ..Store::new(1 << 20, |conn| {
                let all = TF_SEND_FLUSH | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
                if conn == 0 {
                    all
                } else {
                    TF_SEND_FLUSH
                }
            })
        });
        let path = start_store(dir.path(), st.clone(), stop.clone());
        let d = connect_store(&path, TIMEOUT);
        d.read_page(0, &mut [0u8; 4096]).unwrap();
        // The server hung up after that reply; the next read finds the link gone,
        // and the reconnector tries the server again and again, in vain.
        let e = d
            .read_page(0, &mut [0u8; 4096])
            .expect_err("no link to read on");
        println!("    -> read: {e}");
        let t = Instant::now();
        while st.conns.load(Ordering::SeqCst) < 3 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        let why = d.last_connect_error();
        println!("    -> {why:?}; {:?}", d.stats());
        assert_eq!(
            d.stats().reconnects,
            0,
            "a link without WRITE_ZEROES, TRIM was taken"
        );
        assert_eq!(d.conns_up(), 0);
        let why = why.expect("the refusal is recorded");
        assert!(why.contains("TRIM, WRITE_ZEROES"), "{why}");
        stop.store(true, Ordering::Relaxed);
    });
}
