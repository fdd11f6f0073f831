//! Command-line interface: argument parsing and dispatch to the subcommands.
//! Each subcommand lives in its own module and returns a process exit code.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod bench_bounds;
pub mod bench_child;
pub mod bench_comp;
pub mod device;
pub mod exec;
pub mod kernel;
pub mod kernel_comp;
pub mod nbdserver;
pub mod plot;
pub mod run;
pub mod stress;
pub mod stress_files;
pub mod swaps;
pub mod sys;
pub mod transparent;
pub mod util;
pub mod verify;

/// usermm — a virtual memory manager in user space: swap per process, inside a hard
/// RAM budget.
#[derive(Parser, Debug)]
#[command(
    name = "usermm",
    version,
    about,
    long_about = None,
    after_help = "Without a subcommand, `usermm` runs `usermm run` with its defaults."
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a verified random-access workload under a memory budget (the main job).
    Run(run::RunArgs),
    /// Measure usermm side by side with plain memory, the device and kernel swap.
    Bench(Box<bench::BenchArgs>),
    /// Bounded stress runs: `swapoff` (seed 002's races), `files` (seed 000: shared
    /// file mappings under a tiny budget) or `all` (differential workload, fork/exit,
    /// swapoff/swapon and an NBD server restarted, at once).
    Stress(stress::StressArgs),
    /// Recover the journal of a file mapped `Share::Atomic` (after a crash): a
    /// committed msync is written to the file, a torn one discarded.
    Fsck(FsckArgs),
    /// Open swap specs as swapon would and list them like /proc/swaps.
    Swaps(swaps::SwapsArgs),
    /// Run an unmodified program with its heap in a budget (LD_PRELOAD + userfaultfd).
    Exec(exec::ExecArgs),
    /// Internal: the kernel-swap child process of `usermm bench`.
    #[command(name = "bench-kernel-child", hide = true)]
    BenchKernelChild(kernel::ChildArgs),
    /// Internal: the usermm-zpool child process of `usermm bench --compressed`.
    #[command(name = "bench-zpool-child", hide = true)]
    BenchZpoolChild(bench_comp::ChildArgs),
    /// Internal: the transparent-column child process of `usermm bench`.
    #[command(name = "bench-transparent-child", hide = true)]
    BenchTransparentChild(transparent::ChildArgs),
}

/// Parses the arguments and runs the subcommand; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.cmd {
        None => run::main(run::RunArgs::default_args()),
        Some(Cmd::Run(a)) => run::main(a),
        Some(Cmd::Bench(a)) => match bench::main(*a) {
            bench::Outcome::Exit(code) => code,
            bench::Outcome::Compressed(plan) => bench_comp::main(*plan),
        },
        Some(Cmd::Stress(a)) if a.which == "files" => stress_files::main(a),
        Some(Cmd::Stress(a)) => stress::main(a),
        Some(Cmd::Swaps(a)) => swaps::main(a),
        Some(Cmd::Fsck(a)) => fsck(a),
        Some(Cmd::Exec(a)) => exec::main(a),
        Some(Cmd::BenchKernelChild(a)) => kernel::child_main(a),
        Some(Cmd::BenchTransparentChild(a)) => transparent::child_main(a),
        Some(Cmd::BenchZpoolChild(a)) => bench_comp::child_main(a),
    }
}

/// Arguments of `usermm fsck`.
#[derive(clap::Args, Debug)]
pub struct FsckArgs {
    /// The file (its journal is `PATH.usermm-journal`).
    pub path: std::path::PathBuf,
}

/// `usermm fsck PATH`: exit 0 when the file holds one committed version (after
/// replaying or discarding what its journal held), 1 on an error.
fn fsck(a: FsckArgs) -> i32 {
    match usermm::fsck(&a.path) {
        Ok(r) if !r.journal => {
            println!("{}: no journal: nothing to recover", a.path.display());
            0
        }
        Ok(r) => {
            println!(
                "{}: journal recovered: {} page(s) of a committed msync written to the file, \
                 {} byte(s) of an unfinished one discarded",
                a.path.display(),
                r.replayed_pages,
                r.discarded_bytes
            );
            0
        }
        Err(e) => {
            eprintln!("usermm fsck: {e}");
            1
        }
    }
}
