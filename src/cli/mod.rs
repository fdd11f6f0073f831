//! Command-line interface: argument parsing and dispatch to the subcommands.
//! Each subcommand lives in its own module and returns a process exit code.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod run;
pub mod stress;
pub mod swaps;

/// usermm — a virtual memory manager in user space: swap per process, inside a hard
/// RAM budget.
#[derive(Parser, Debug)]
#[command(name = "usermm", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a verified random-access workload under a memory budget (the main job).
    Run(run::RunArgs),
    /// Measure usermm side by side with plain memory, the device and kernel swap.
    Bench(bench::BenchArgs),
    /// Bounded stress runs of the races the project grew from (seed 002: swapoff).
    Stress(stress::StressArgs),
    /// Open swap specs as swapon would and list them like /proc/swaps.
    Swaps(swaps::SwapsArgs),
}

/// Parses the arguments and runs the subcommand; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.cmd {
        None => run::main(run::RunArgs::default_args()),
        Some(Cmd::Run(a)) => run::main(a),
        Some(Cmd::Bench(a)) => bench::main(a),
        Some(Cmd::Stress(a)) => stress::main(a),
        Some(Cmd::Swaps(a)) => swaps::main(a),
    }
}
