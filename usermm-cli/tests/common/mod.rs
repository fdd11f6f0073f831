//! Helpers shared by the `usermm exec` tests: where the binary is, whether a test
//! can run here (SKIP on stderr, or a failure when `USERMM_REQUIRE_UFFD=1` asks for
//! everything), and running a program while sampling its anonymous memory.
#![allow(dead_code)] // each test file uses its own subset

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const USERMM: &str = env!("CARGO_BIN_EXE_usermm");

/// The system's python3, if any.
pub fn python() -> Option<&'static str> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// Whether a `usermm exec` test (`test`, for the message) can run: /dev/userfaultfd
/// opens, the preload library was built beside the binary, and `what` (a tool the
/// test needs) is there (`have`). Skips with a line on stderr, or, with
/// `USERMM_REQUIRE_UFFD=1`, fails.
pub fn can_run(test: &str, what: &str, have: bool) -> bool {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .is_ok();
    let lib = std::path::Path::new(USERMM)
        .parent()
        .map(|d| d.join("libusermm_preload.so").exists())
        .unwrap_or(false);
    if dev && lib && have {
        return true;
    }
    let why = format!("userfaultfd device {dev}, preload library {lib}, {what} {have}");
    if std::env::var("USERMM_REQUIRE_UFFD").as_deref() == Ok("1") {
        panic!("{test} cannot run: {why}");
    }
    eprintln!("SKIP: {test}: {why}");
    false
}

/// Runs `cmd`, sampling its RssAnon; returns (stdout, stderr, status, peak KiB).
pub fn run_sampled(mut cmd: Command, limit: Duration) -> (String, String, i32, u64) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    // Drain both pipes meanwhile, so a chatty program never blocks on them.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let te = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let t = Instant::now();
    let mut peak = 0u64;
    loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kb) = s
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(kb);
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if t.elapsed() > limit {
            // What each thread was doing, for the report (a hang must say where).
            let threads = threads_of(pid);
            let _ = child.kill();
            let _ = child.wait();
            panic!("the program did not finish within {limit:?}; its threads:\n{threads}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().unwrap().code().unwrap_or(-1);
    (to.join().unwrap(), te.join().unwrap(), status, peak)
}

/// One line per thread of process `pid`: name, state, user and system ticks,
/// wait channel, and the top of its kernel stack where readable (root).
pub fn threads_of(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(gone)".into();
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        // The fields after the name, which is in parentheses.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let field = |i: usize| rest.get(i).copied().unwrap_or("?");
        let stack: Vec<String> = read("stack")
            .lines()
            .take(4)
            .map(|l| l.split_whitespace().last().unwrap_or("").to_string())
            .collect();
        out += &format!(
            "  {} {} state {} utime {} stime {} wchan {} stack [{}]\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            field(0),
            field(11),
            field(12),
            read("wchan").trim(),
            stack.join(" < ")
        );
    }
    out
}
