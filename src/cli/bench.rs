//! `usermm bench`: placeholder until the bench command lands.

/// Arguments of `usermm bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

/// Runs the command; returns the exit code.
pub fn main(_a: BenchArgs) -> i32 {
    eprintln!("usermm bench: not built yet");
    2
}
