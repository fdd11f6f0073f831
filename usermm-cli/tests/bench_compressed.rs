//! `usermm bench --compressed` on the smallest configuration that still swaps (an
//! 8 MiB budget, W = 4 × B, uniform, 50 % writes, compressible and incompressible
//! pages, 200 ms timed): the JSON has one record per cell and system with the new
//! fields; usermm-zpool ran, verified its pages and held compressed pages in its
//! pool for compressible content; the kernel systems either ran (root: rate or an
//! OOM kill counted as such, peak and pool memory) or say SKIP with a reason. No
//! timing is asserted: the machine is shared.

use std::process::Command;

fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn bench_compressed_records() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_usermm"))
        .args([
            "bench",
            "--compressed",
            "--budget",
            "8M",
            "--patterns",
            "uniform",
            "--w-over-b",
            "4",
            "--write-ratios",
            "0.5",
            "--content",
            "compressible,incompressible",
            "--duration",
            "200ms",
            "--warmup",
            "100ms",
            "--seed",
            "11",
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
    assert!(stdout.contains("cleanup ok"), "{ctx}");
    assert!(
        stdout.contains("usermm-zpool") && stdout.contains("kernel-zram"),
        "{ctx}"
    );

    let text = std::fs::read_to_string(&json).expect("the JSON file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let recs = v["records"].as_array().expect("records");
    assert_eq!(recs.len(), 6, "2 cells x 3 systems: {text}");
    let get = |system: &str, content: &str| -> &serde_json::Value {
        let r: Vec<&serde_json::Value> = recs
            .iter()
            .filter(|r| r["system"] == system && r["content"] == content)
            .collect();
        assert_eq!(r.len(), 1, "{system} {content}: {text}");
        r[0]
    };
    for content in ["compressible", "incompressible"] {
        let u = get("usermm-zpool", content);
        assert!(u.get("error").is_none(), "{u}");
        assert!(u["accesses_per_s"].as_f64().is_some_and(|r| r > 0.0), "{u}");
        assert!(u["major_faults"].as_u64().is_some_and(|n| n > 0), "{u}");
        assert!(u["verified_words"].as_u64().is_some_and(|n| n > 0), "{u}");
        // The child's whole RSS: at least the budget's frames it filled.
        assert!(
            u["peak_bytes"].as_u64().is_some_and(|b| b >= 4 << 20),
            "{u}"
        );
        assert!(u["pool_bytes"].as_u64().is_some(), "{u}");
        assert!(u["oom_kills"].is_null(), "{u}");
        if content == "compressible" {
            assert!(u["pool_bytes"].as_u64().is_some_and(|b| b > 0), "{u}");
        }
        for system in ["kernel-zram", "kernel-zswap"] {
            let k = get(system, content);
            match k["error"].as_str() {
                Some(e) if e.starts_with("SKIP") => {
                    assert!(e.len() > "SKIP: ".len(), "a reason: {k}");
                    assert!(k["oom_kills"].is_null(), "{k}");
                }
                Some(e) => {
                    // The only failure a kernel system may have here: an OOM kill,
                    // counted as such.
                    assert!(is_root(), "{k}");
                    assert!(e.contains("OOM-killed"), "{k}");
                    assert!(k["oom_kills"].as_u64().is_some_and(|n| n >= 1), "{k}");
                }
                None => {
                    assert!(is_root(), "{k}");
                    assert!(k["accesses_per_s"].as_f64().is_some_and(|r| r > 0.0), "{k}");
                    assert_eq!(k["oom_kills"].as_u64(), Some(0), "{k}");
                    assert!(k["peak_bytes"].as_u64().is_some_and(|b| b > 0), "{k}");
                    assert!(k["verified_words"].as_u64().is_some_and(|n| n > 0), "{k}");
                    if system == "kernel-zram" {
                        // W = 4 B: most pages live in zram.
                        assert!(k["pool_bytes"].as_u64().is_some_and(|b| b > 0), "{k}");
                    }
                }
            }
            if !is_root() {
                assert!(
                    k["error"].as_str().is_some_and(|e| e.starts_with("SKIP")),
                    "not root, so skipped: {k}"
                );
            }
        }
    }
    assert_eq!(v["meta"]["budget_bytes"], 8 << 20, "{text}");
}
