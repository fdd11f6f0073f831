//! `usermm run`: placeholder until the run command lands.

/// Arguments of `usermm run`.
#[derive(clap::Args, Debug, Default)]
pub struct RunArgs {}

impl RunArgs {
    /// The defaults, as if `usermm run` was given no flags.
    pub fn default_args() -> RunArgs {
        RunArgs {}
    }
}

/// Runs the command; returns the exit code.
pub fn main(_a: RunArgs) -> i32 {
    eprintln!("usermm run: not built yet");
    2
}
