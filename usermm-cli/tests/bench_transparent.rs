//! `usermm bench` with its transparent column, on the smallest configuration (one
//! cell, a 1 MiB budget, no kernel or NBD column, two repeats): the table has the
//! column with a positive rate, the JSON has a `transparent` record with a positive
//! rate and no error, and the content check after the last repeat passed; the
//! records carry their repeats (count, per-repeat rates, min and max around the
//! median). No timing is asserted.

use std::process::Command;

/// Skips (or, with USERMM_REQUIRE_UFFD=1, fails) where /dev/userfaultfd is closed
/// to us: the column then says "unavailable", which is right but not what this
/// test is about.
fn can_run() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(_) => true,
        Err(e) if std::env::var("USERMM_REQUIRE_UFFD").as_deref() == Ok("1") => {
            panic!("USERMM_REQUIRE_UFFD=1 but /dev/userfaultfd cannot be opened: {e}")
        }
        Err(e) => {
            eprintln!("SKIP: usermm bench transparent test: cannot open /dev/userfaultfd: {e}");
            false
        }
    }
}

/// "16.0k" or "1.20M" or "5234" (the table's `fmt_num`) as a number.
fn parse_rate(s: &str) -> Option<f64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'k' => (&s[..s.len() - 1], 1e3),
        b'M' => (&s[..s.len() - 1], 1e6),
        b'G' => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    num.parse::<f64>().ok().map(|v| v * mul)
}

#[test]
fn bench_has_transparent_column() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_usermm"))
        .args([
            "bench",
            "--budget",
            "1M",
            "--patterns",
            "uniform",
            "--w-over-b",
            "2",
            "--threads",
            "1",
            "--write-ratios",
            "0.5",
            "--duration",
            "300ms",
            "--warmup",
            "200ms",
            "--seed",
            "7",
            "--repeats",
            "2",
            "--no-nbd",
            "--no-kernel",
            "--dir",
        ])
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run usermm bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!(
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(out.status.success(), "usermm bench failed: {ctx}");

    // The table: the header names the column and its ratio; the cell's row has a
    // rate in it (the second group after the cell's name).
    let header = stdout
        .lines()
        .find(|l| l.starts_with("pattern"))
        .unwrap_or_else(|| panic!("no table header: {ctx}"));
    assert!(
        header.contains("transp") && header.contains("tr/kern"),
        "{ctx}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("uniform"))
        .unwrap_or_else(|| panic!("no row for the cell: {ctx}"));
    let transp = row.split('|').nth(2).unwrap_or("");
    let rate = transp.split_whitespace().next().and_then(parse_rate);
    assert!(
        rate.is_some_and(|r| r > 0.0),
        "no transparent rate in {row:?}: {ctx}"
    );
    assert!(!stdout.contains("transparent: unavailable"), "{ctx}");
    assert!(
        stdout.contains("content check, transparent: 1 cells") && stdout.contains("all as written"),
        "{ctx}"
    );

    // The JSON record.
    let text = std::fs::read_to_string(&json).expect("the JSON file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let recs = v["records"].as_array().expect("records");
    let t: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| r["system"] == "transparent")
        .collect();
    assert_eq!(t.len(), 1, "{text}");
    let t = t[0];
    assert!(t.get("error").is_none(), "{t}");
    assert!(t["accesses_per_s"].as_f64().is_some_and(|r| r > 0.0), "{t}");
    assert!(t["accesses"].as_u64().is_some_and(|n| n > 0), "{t}");
    // W = 2 B: the timed phase went to swap, not only to resident pages.
    assert!(t["major_faults"].as_u64().is_some_and(|n| n > 0), "{t}");
    assert!(t["verified_words"].as_u64().is_some_and(|n| n > 0), "{t}");
    assert_eq!(v["meta"]["transparent"], "ok", "{text}");

    // The repeats (issue 10, item 5): every measured system's record says how many
    // timed phases it is the median of, lists their rates, and the median lies
    // between their min and max. Without the kernel column there is no ratio to it.
    assert_eq!(v["meta"]["repeats"], 2, "{text}");
    for system in ["usermm", "transparent", "plain", "device"] {
        let r = recs
            .iter()
            .find(|r| r["system"] == system)
            .unwrap_or_else(|| panic!("no {system} record: {text}"));
        assert!(r.get("error").is_none(), "{r}");
        assert_eq!(r["repeats"], 2, "{r}");
        let all: Vec<f64> = r["accesses_per_s_repeats"]
            .as_array()
            .unwrap_or_else(|| panic!("no accesses_per_s_repeats: {r}"))
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(all.len(), 2, "{r}");
        let (lo, hi) = (
            r["accesses_per_s_min"].as_f64().unwrap(),
            r["accesses_per_s_max"].as_f64().unwrap(),
        );
        let med = r["accesses_per_s"].as_f64().unwrap();
        assert!(lo <= med && med <= hi && lo > 0.0, "{r}");
        assert_eq!(lo, all.iter().cloned().fold(f64::INFINITY, f64::min), "{r}");
        assert!(r.get("ratio_vs_kernel").is_none(), "{r}");
    }
    assert!(t["warmup_seconds"].as_f64().is_some(), "{t}");
    assert!(t["fill_seconds"].as_f64().is_some(), "{t}");

    // The replacement bounds of the same trace (issue 10): a table row and a JSON
    // record. Uniform at W = 2 B: A0 keeps half the pages, so it misses half the
    // accesses; MIN, knowing the future, misses fewer; LRU and CLOCK about as A0.
    assert!(stdout.contains("what the same trace allows"), "{ctx}");
    let miss = |system: &str| {
        let r: Vec<&serde_json::Value> = recs.iter().filter(|r| r["system"] == system).collect();
        assert_eq!(r.len(), 1, "{system}: {text}");
        let m = r[0]["major_faults"].as_f64().unwrap_or(f64::NAN);
        100.0 * m / r[0]["accesses"].as_f64().unwrap_or(f64::NAN)
    };
    assert!((miss("a0") - 50.0).abs() < 1.0, "{text}");
    assert!(miss("min") < miss("a0") - 5.0, "{text}");
    assert!((miss("lru-sim") - 50.0).abs() < 2.0, "{text}");
    assert!((miss("clock-sim") - 50.0).abs() < 2.0, "{text}");
}
