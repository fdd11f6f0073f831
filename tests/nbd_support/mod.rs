//! Helpers of the NBD integration tests: starting real servers (qemu-nbd, nbdkit,
//! nbd-server) on a Unix socket or a free loopback port, stopping them by pid,
//! page patterns and a verified workload through a `Vm`.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use usermm::{AddressSpace, Error, Region, VAddr, Vm, PAGE_SIZE};

/// Whether `bin` is on PATH.
pub fn have(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Prints why a test is skipped (a server binary is missing) and returns true.
pub fn skip_without(bin: &str) -> bool {
    if have(bin) {
        return false;
    }
    println!("SKIP: `{bin}` is not installed (.ci/run installs it: apt-get install nbdkit nbd-server libnbd-bin)");
    true
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where a server listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(u16),
}

impl Endpoint {
    /// The spec of export `export` on this endpoint, with `opts` (e.g. "timeout=2").
    pub fn spec(&self, export: &str, opts: &str) -> String {
        match self {
            Endpoint::Unix(p) => {
                let sep = if opts.is_empty() { "" } else { "&" };
                format!("nbd+unix:///{export}?socket={}{sep}{opts}", p.display())
            }
            Endpoint::Tcp(port) => {
                let q = if opts.is_empty() { "" } else { "?" };
                format!("nbd://127.0.0.1:{port}/{export}{q}{opts}")
            }
        }
    }

    fn ready(&self) -> bool {
        match self {
            Endpoint::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            Endpoint::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        }
    }
}

/// Servers' messages (injected errors, …) are dropped unless
/// `USERMM_NBD_SERVER_LOG` is set.
fn server_stderr() -> Stdio {
    if std::env::var_os("USERMM_NBD_SERVER_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

/// A running server; killed (SIGKILL, by pid) when dropped.
#[derive(Debug)]
pub struct Server {
    pub name: &'static str,
    pub endpoint: Endpoint,
    pub export: String,
    child: Option<Child>,
    /// For daemonizing servers (nbd-server): the pid from its pid file.
    daemon_pid: Option<i32>,
    pub started: Instant,
}

fn kill_pid(pid: i32) {
    // SAFETY: plain syscall; the pid is a server process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Children of `pid` (nbd-server forks one per client).
fn children_of(pid: i32) -> Vec<i32> {
    let mut v = vec![];
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                // pid (comm) state ppid …
                if let Some(rest) = stat.rsplit_once(')').map(|x| x.1) {
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    if f.get(1).and_then(|x| x.parse::<i32>().ok()) == Some(pid) {
                        v.push(p);
                    }
                }
            }
        }
    }
    v
}

impl Server {
    /// Kills the server with SIGKILL (by pid) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self.daemon_pid.take() {
            let kids = children_of(pid);
            kill_pid(pid);
            for k in kids {
                kill_pid(k);
            }
        }
    }

    /// The pid of the server process.
    pub fn pid(&self) -> Option<i32> {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .or(self.daemon_pid)
    }

    pub fn spec(&self, opts: &str) -> String {
        self.endpoint.spec(&self.export, opts)
    }

    fn wait_ready(mut self) -> Server {
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("{} exited at start: {st}", self.name);
                }
            }
            if self.endpoint.ready() {
                return self;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{} did not start listening on {:?}",
                self.name,
                self.endpoint
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The socket file stays: a restarted server may own it by now (the
        // temporary directory goes away with the test).
        self.kill();
    }
}

/// qemu-nbd exporting `file` (raw) as "swap".
pub fn qemu_nbd(file: &Path, ep: Endpoint) -> Server {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-f",
        "raw",
        "-t",
        "-e",
        "8",
        "-x",
        "swap",
        "--discard=unmap",
        "--cache=none",
    ]);
    match &ep {
        Endpoint::Unix(p) => {
            let _ = std::fs::remove_file(p);
            cmd.arg("-k").arg(p);
        }
        Endpoint::Tcp(port) => {
            cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
        }
    }
    cmd.arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(server_stderr());
    let child = cmd.spawn().expect("start qemu-nbd");
    Server {
        name: "qemu-nbd",
        endpoint: ep,
        export: "swap".into(),
        child: Some(child),
        daemon_pid: None,
        started: Instant::now(),
    }
    .wait_ready()
}

/// nbdkit with `args` (plugin, its parameters, filters) on `ep`, export "" (any
/// name works with nbdkit; tests use "swap").
pub fn nbdkit(args: &[&str], ep: Endpoint) -> Server {
    // nbdkit writes its pid file once it listens: wait for that rather than
    // probing the socket (a probe makes nbdkit log a broken handshake).
    let pidfile = std::env::temp_dir().join(format!(
        "usermm-nbdkit-{}-{}.pid",
        std::process::id(),
        PIDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&pidfile);
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent", "-P"]).arg(&pidfile);
    match &ep {
        Endpoint::Unix(p) => {
            let _ = std::fs::remove_file(p);
            cmd.arg("-U").arg(p);
        }
        Endpoint::Tcp(port) => {
            cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
        }
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(server_stderr());
    let mut child = cmd.spawn().expect("start nbdkit");
    let t0 = Instant::now();
    while !pidfile.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("nbdkit exited at start: {st}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "nbdkit did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(&pidfile);
    Server {
        name: "nbdkit",
        endpoint: ep,
        export: "swap".into(),
        child: Some(child),
        daemon_pid: None,
        started: Instant::now(),
    }
}

static PIDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// nbd-server (simple replies only) exporting `file` as "swap" on a loopback TCP
/// port. It daemonizes; its pid comes from its pid file.
pub fn nbd_server(dir: &Path, file: &Path, port: u16) -> Server {
    let cfg = dir.join("nbd-server.conf");
    let pidfile = dir.join("nbd-server.pid");
    let _ = std::fs::remove_file(&pidfile);
    std::fs::write(
        &cfg,
        format!(
            "[generic]\n    allowlist = true\n    port = {port}\n[swap]\n    exportname = {}\n    flush = true\n    trim = true\n",
            file.display()
        ),
    )
    .unwrap();
    let st = Command::new("nbd-server")
        .arg("-C")
        .arg(&cfg)
        .arg("-p")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("start nbd-server");
    assert!(st.success(), "nbd-server failed to start: {st}");
    let t0 = Instant::now();
    let pid = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            break p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nbd-server wrote no pid file"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    Server {
        name: "nbd-server",
        endpoint: Endpoint::Tcp(port),
        export: "swap".into(),
        child: None,
        daemon_pid: Some(pid),
        started: Instant::now(),
    }
    .wait_ready()
}

/// A sparse file of `bytes`.
pub fn disk(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(bytes).unwrap();
    p
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The content of page `page` at version `ver`: every 8-byte word differs.
/// Version 0 is reserved for "never written" (all zeroes).
pub fn pattern(page: u64, ver: u64, out: &mut [u8]) {
    if ver == 0 {
        out.fill(0);
        return;
    }
    let base = mix(page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ver);
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(base ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)).to_le_bytes());
    }
}

/// Address of page `p` of region `r`.
pub fn at(r: &Region, p: u64) -> VAddr {
    r.start() + p * PAGE_SIZE as u64
}

/// Writes page `p` of `r` with version `ver`.
pub fn write_page(mm: &AddressSpace, r: &Region, p: u64, ver: u64) -> usermm::Result<()> {
    let mut b = vec![0u8; PAGE_SIZE];
    pattern(p, ver, &mut b);
    mm.write(at(r, p), &b)
}

/// Reads page `p` and compares it with version `ver`; Ok(false) on a mismatch.
pub fn check_page(mm: &AddressSpace, r: &Region, p: u64, ver: u64) -> usermm::Result<bool> {
    let mut got = vec![0u8; PAGE_SIZE];
    let mut want = vec![0u8; PAGE_SIZE];
    mm.read(at(r, p), &mut got)?;
    pattern(p, ver, &mut want);
    Ok(got == want)
}

/// Writes `pages` pages (version 1), then reads them all back in a shuffled order
/// and checks them; asserts page-out and page-in happened. Every error fails.
pub fn verified_workload(vm: &Vm, pages: u64) {
    let mm = vm.new_space();
    let r = mm.map_anon(pages as usize * PAGE_SIZE).unwrap();
    let t0 = Instant::now();
    for p in 0..pages {
        write_page(&mm, &r, p, 1).unwrap_or_else(|e| panic!("write page {p}: {e}"));
    }
    // Zero pages too (WRITE_ZEROES where the server has it).
    for p in (0..pages).step_by(7) {
        write_page(&mm, &r, p, 0).unwrap();
    }
    let tw = t0.elapsed();
    let t1 = Instant::now();
    let mut order: Vec<u64> = (0..pages).collect();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    for &p in &order {
        let ver = if p % 7 == 0 { 0 } else { 1 };
        assert!(
            check_page(&mm, &r, p, ver).unwrap_or_else(|e| panic!("read page {p}: {e}")),
            "page {p} has wrong content"
        );
    }
    let s = vm.stats();
    println!(
        "  {pages} pages: write {:?}, verify {:?}; pswpout {} pswpin {} write_errors {} read_errors {}",
        tw,
        t1.elapsed(),
        s.pswpout,
        s.pswpin,
        s.write_errors,
        s.read_errors
    );
    assert!(s.pswpout > pages / 2, "too little page-out: {s:?}");
    assert!(s.pswpin > pages / 2, "too little page-in: {s:?}");
    assert_eq!(s.read_errors, 0, "{s:?}");
}

/// Whether an error is the device error an outage may cause.
pub fn is_device_error(e: &Error) -> bool {
    matches!(e, Error::Device { .. })
}
