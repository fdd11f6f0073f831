//! A malicious (or broken) NBD server, written here as a thread on a Unix socket,
//! against the client: wrong magics, oversized lengths, unknown and duplicate
//! handles, short reads, garbage after NBD_OPT_GO, replies nobody asked for,
//! silence. Every case must end in a clear error (the message names the fault),
//! within the timeout, with no panic and no unbounded allocation: a counting
//! global allocator checks that no scenario allocates more than 2 MiB in total.
//! Each test runs under the test kit's watchdog.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
}

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
            timeout: Duration::from_millis(800),
            ..NbdOptions::default()
        },
        "evil",
    )
}

/// Runs `f` against a server doing `evil`; checks time and allocation bounds.
fn scenario(evil: Evil, f: impl FnOnce(&Path)) {
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
