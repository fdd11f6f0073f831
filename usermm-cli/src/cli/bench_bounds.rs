//! The bench's replacement-bounds table: per cell, the miss% each system measured
//! beside what the same access trace allows (`usermm_testkit::bounds`): Belady's
//! MIN (the offline optimum), A0 (the best online policy on these independent-
//! reference traces) and LRU and CLOCK simulated (plain recency). A policy that
//! misses less than CLOCK here misses less on the bench; one at A0 cannot do better.

use usermm_testkit::bounds::{bounds, Bounds};
use usermm_testkit::driver::{Measured, WorkSpec};

/// Accesses counted after the fill and the warm-up, per cell: enough for the
/// ratios to settle to 0.1 point on these traces, about a second per cell.
const TIMED: u64 = 600_000;

/// One cell's bounds for a cache of `frames` pages.
pub fn for_cell(spec: &WorkSpec, frames: u64) -> Bounds {
    bounds(spec, frames, TIMED)
}

/// miss% of a measured system, or "-".
fn measured(m: &Result<Measured, String>) -> String {
    match m {
        Ok(m) => format!(
            "{:.1}",
            100.0 * m.major_faults as f64 / m.accesses.max(1) as f64
        ),
        Err(_) => "-".into(),
    }
}

/// One row of the table: the cell's name, the measurements of usermm, transparent
/// and the kernel (the medians of their repeats), and the cell's bounds.
pub type Row = (String, [Result<Measured, String>; 3], Bounds);

/// One row per cell: label, then the measured systems' miss% (usermm, transparent,
/// kernel), then the simulated ones.
pub fn print(rows: &[Row]) {
    println!();
    println!("miss% per access: measured, and what the same trace allows (same budget, simulated)");
    println!(
        "{:<31} | {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6} {:>6}",
        "cell", "usermm", "transp", "kernel", "LRU", "CLOCK", "A0", "MIN"
    );
    println!("{}", "-".repeat(75));
    for (label, sys, b) in rows {
        println!(
            "{:<31} | {:>6} {:>6} {:>6} | {:>6.1} {:>6.1} {:>6.1} {:>6.1}",
            label,
            measured(&sys[0]),
            measured(&sys[1]),
            measured(&sys[2]),
            100.0 * b.lru,
            100.0 * b.clock,
            100.0 * b.a0,
            100.0 * b.min
        );
    }
    println!(
        "LRU, CLOCK: plain recency simulated on the trace; A0: the fixed set of the most likely pages \
         (the best online policy on\nindependent references); MIN: Belady's offline optimum. {TIMED} \
         accesses after the fill and one access per page, threads interleaved in turn."
    );
}
