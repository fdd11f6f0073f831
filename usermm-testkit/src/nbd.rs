//! Real NBD servers for the tests, the examples and `usermm bench`: qemu-nbd, nbdkit
//! and nbd-server, started on a Unix socket or a free loopback port, stopped by pid
//! (SIGKILL) when their [`Server`] is dropped.
//!
//! The rule for a missing server ([`skip_without`]): a test that needs a server it
//! cannot find prints `SKIP: <test>: <server> not found (install: apt-get install
//! <pkg>)` on stderr and returns; with `USERMM_REQUIRE_SERVERS=1` in the environment
//! (CI sets it) it fails instead, with the same install command.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The Debian/Ubuntu package that provides `bin` (the servers and tools the NBD
/// tests use).
pub fn package_of(bin: &str) -> &str {
    match bin {
        "qemu-nbd" | "qemu-img" => "qemu-utils",
        "nbdkit" => "nbdkit",
        "nbd-server" => "nbd-server",
        "nbdinfo" => "libnbd-bin",
        other => other,
    }
}

/// Whether `bin` is on PATH.
pub fn have(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Whether `USERMM_REQUIRE_SERVERS=1` is set: a missing server fails the test.
pub fn servers_required() -> bool {
    std::env::var("USERMM_REQUIRE_SERVERS").is_ok_and(|v| v.trim() == "1")
}

/// The rule for test `test` that needs `bin`: false if `bin` is installed; if not,
/// prints `SKIP: …` on stderr and returns true (the test returns), or panics with
/// the install command when [`servers_required`].
pub fn skip_without(test: &str, bin: &str) -> bool {
    if have(bin) {
        return false;
    }
    let install = format!("apt-get install {}", package_of(bin));
    if servers_required() {
        panic!("{test}: {bin} not found and USERMM_REQUIRE_SERVERS=1: install it with `{install}`");
    }
    eprintln!("SKIP: {test}: {bin} not found (install: {install})");
    true
}

/// Runs the test `name` as `f` on a thread under the [`watchdog`](crate::watchdog)
/// with stall limit `stall`: a hang fails with what the thread was waiting on, a
/// panic with its message; on either, every server still running is killed (the
/// stuck thread would never drop its [`Server`]s).
pub fn run_test(name: &str, stall: Duration, f: impl FnOnce() + Send + 'static) {
    crate::watchdog::Watchdog::new(stall)
        .on_failure(kill_all)
        .thread(name, move |_| f())
        .run();
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free loopback port")
}

/// A sparse file of `bytes` at `dir/name`.
pub fn disk(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.set_len(bytes)
        .unwrap_or_else(|e| panic!("size {}: {e}", p.display()));
    p
}

/// Where a server listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP port on 127.0.0.1.
    Tcp(u16),
}

impl Endpoint {
    /// The swap spec of export `export` on this endpoint, with `opts` (e.g.
    /// "timeout=2").
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

/// Pids of the servers started and not yet stopped (see [`kill_all`]).
static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static SEQ: AtomicU64 = AtomicU64::new(0);

fn live() -> std::sync::MutexGuard<'static, Vec<i32>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn kill_pid(pid: i32) {
    // SAFETY: plain syscall; the pid is a server process this process started.
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

/// Kills (SIGKILL) every server this process started and has not stopped yet, with
/// their children: for a watchdog's failure, when the threads that own the
/// [`Server`]s are stuck and will never drop them.
pub fn kill_all() {
    let pids = std::mem::take(&mut *live());
    for pid in pids {
        let kids = children_of(pid);
        kill_pid(pid);
        kids.into_iter().for_each(kill_pid);
    }
}

/// A running server; killed (SIGKILL, by pid) when dropped.
#[derive(Debug)]
pub struct Server {
    /// The program: qemu-nbd, nbdkit or nbd-server.
    pub name: &'static str,
    /// Where it listens.
    pub endpoint: Endpoint,
    /// The export name.
    pub export: String,
    child: Option<Child>,
    /// For daemonizing servers (nbd-server): the pid from its pid file.
    daemon_pid: Option<i32>,
    /// When it was started.
    pub started: Instant,
}

impl Server {
    fn new(
        name: &'static str,
        endpoint: Endpoint,
        child: Option<Child>,
        daemon_pid: Option<i32>,
    ) -> Server {
        let s = Server {
            name,
            endpoint,
            export: "swap".into(),
            child,
            daemon_pid,
            started: Instant::now(),
        };
        if let Some(pid) = s.pid() {
            live().push(pid);
        }
        s
    }

    /// Kills the server with SIGKILL (by pid) and waits for it.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            live().retain(|&p| p != pid);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self.daemon_pid.take() {
            let kids = children_of(pid);
            kill_pid(pid);
            kids.into_iter().for_each(kill_pid);
        }
    }

    /// The pid of the server process (None once killed).
    pub fn pid(&self) -> Option<i32> {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .or(self.daemon_pid)
    }

    /// The swap spec of this server's export, with `opts`.
    pub fn spec(&self, opts: &str) -> String {
        self.endpoint.spec(&self.export, opts)
    }

    fn wait_ready(mut self) -> Result<Server, String> {
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!("{} exited at start: {st}", self.name));
                }
            }
            if self.endpoint.ready() {
                return Ok(self);
            }
            if t0.elapsed() > Duration::from_secs(15) {
                return Err(format!(
                    "{} did not start listening on {:?} within 15 s",
                    self.name, self.endpoint
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The socket file stays: a restarted server may own it by now (its directory
        // goes away with its owner).
        self.kill();
    }
}

/// The arguments the tests give qemu-nbd besides the basic ones: 8 shared
/// connections and discard passed to the image.
pub const QEMU_NBD_TEST_ARGS: &[&str] = &["-e", "8", "--discard=unmap"];

/// qemu-nbd exporting `file` (raw, persistent, no host cache) as "swap" on `ep`,
/// with `extra` arguments; waits until it accepts connections.
pub fn try_qemu_nbd(file: &Path, ep: Endpoint, extra: &[&str]) -> Result<Server, String> {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-t", "-x", "swap", "--cache=none"])
        .args(extra);
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
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start qemu-nbd: {e}"))?;
    Server::new("qemu-nbd", ep, Some(child), None).wait_ready()
}

/// qemu-nbd as the tests run it ([`QEMU_NBD_TEST_ARGS`]); panics if it cannot start.
pub fn qemu_nbd(file: &Path, ep: Endpoint) -> Server {
    try_qemu_nbd(file, ep, QEMU_NBD_TEST_ARGS).unwrap_or_else(|e| panic!("{e}"))
}

/// nbdkit with `args` (plugin, its parameters, filters) on `ep`, export "swap" (any
/// name works with nbdkit); waits for its pid file (a probe connection would make
/// nbdkit log a broken handshake).
pub fn try_nbdkit(args: &[&str], ep: Endpoint) -> Result<Server, String> {
    let pidfile = std::env::temp_dir().join(format!(
        "usermm-nbdkit-{}-{}.pid",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
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
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start nbdkit: {e}"))?;
    let mut s = Server::new("nbdkit", ep, Some(child), None);
    let t0 = Instant::now();
    while !pidfile.exists() {
        if let Some(Ok(Some(st))) = s.child.as_mut().map(|c| c.try_wait()) {
            return Err(format!("nbdkit exited at start: {st}"));
        }
        if t0.elapsed() > Duration::from_secs(15) {
            return Err("nbdkit did not start within 15 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(&pidfile);
    Ok(s)
}

/// [`try_nbdkit`]; panics if it cannot start.
pub fn nbdkit(args: &[&str], ep: Endpoint) -> Server {
    try_nbdkit(args, ep).unwrap_or_else(|e| panic!("{e}"))
}

/// nbd-server (simple replies only) exporting `file` as "swap" on loopback TCP
/// `port`, its configuration and pid file in `dir`. It daemonizes; its pid comes
/// from its pid file.
pub fn try_nbd_server(dir: &Path, file: &Path, port: u16) -> Result<Server, String> {
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
    .map_err(|e| format!("cannot write {}: {e}", cfg.display()))?;
    let st = Command::new("nbd-server")
        .arg("-C")
        .arg(&cfg)
        .arg("-p")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot start nbd-server: {e}"))?;
    if !st.success() {
        return Err(format!("nbd-server failed to start: {st}"));
    }
    let t0 = Instant::now();
    let pid = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            break p;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err("nbd-server wrote no pid file within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Server::new("nbd-server", Endpoint::Tcp(port), None, Some(pid)).wait_ready()
}

/// [`try_nbd_server`]; panics if it cannot start.
pub fn nbd_server(dir: &Path, file: &Path, port: u16) -> Server {
    try_nbd_server(dir, file, port).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_packages() {
        assert_eq!(
            Endpoint::Unix("/t/s".into()).spec("swap", ""),
            "nbd+unix:///swap?socket=/t/s"
        );
        assert_eq!(
            Endpoint::Unix("/t/s".into()).spec("swap", "timeout=2"),
            "nbd+unix:///swap?socket=/t/s&timeout=2"
        );
        assert_eq!(
            Endpoint::Tcp(7).spec("swap", "conns=2"),
            "nbd://127.0.0.1:7/swap?conns=2"
        );
        assert_eq!(package_of("qemu-nbd"), "qemu-utils");
        assert_eq!(package_of("nbdinfo"), "libnbd-bin");
    }

    #[test]
    fn a_missing_server_skips_or_fails_as_required() {
        let bin = "usermm-no-such-nbd-server";
        if servers_required() {
            let r = std::panic::catch_unwind(|| skip_without("t", bin));
            let msg = crate::watchdog::panic_message(&*r.unwrap_err());
            assert!(
                msg.contains("apt-get install usermm-no-such-nbd-server"),
                "{msg}"
            );
        } else {
            assert!(skip_without("t", bin));
        }
        assert!(!skip_without("t", "sh"));
    }
}
