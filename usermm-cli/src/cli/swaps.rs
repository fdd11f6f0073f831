//! `usermm swaps`: opens the given swap specs the way `swapon` would and prints them
//! like /proc/swaps (name, size, used, priority, state), plus what each gave back
//! (discarded) and, for a zpool, the budget memory it holds, and whether
//! readahead reads it and page-out writes it through io_uring. A quick check that a
//! spec is usable before a long run.

use usermm::config::SwapKind;
use usermm::{Config, SwapSpec, Vm};

/// Arguments of `usermm swaps`.
#[derive(clap::Args, Debug)]
pub struct SwapsArgs {
    /// Swap device specs, e.g. `file:/var/tmp/a.swap?size=1G&prio=5` (repeatable).
    #[arg(long = "swap", required = true)]
    pub swap: Vec<String>,
}

/// Prints a table of devices (shared with `run`). A device whose spec asks for
/// buffered I/O (`direct=0`) says so after its state: its page cache is outside the
/// memory budget; so does one whose readahead reads go through io_uring, all in
/// flight at once (a local file where io_uring works), and one whose page-outs
/// do (and whether they name registered buffers).
pub fn print_table(vm: &Vm) {
    println!(
        "{:<48} {:>10} {:>10} {:>13} {:>11} {:>6}  state",
        "Filename", "Size(KiB)", "Used(KiB)", "Discarded(KiB)", "Memory(KiB)", "Prio"
    );
    for d in vm.swaps() {
        println!(
            "{:<48} {:>10} {:>10} {:>13} {:>11} {:>6}  {}{}{}{}{}",
            d.name,
            d.size >> 10,
            d.used >> 10,
            d.discarded >> 10,
            d.memory >> 10,
            d.prio,
            d.state,
            if d.held_back > 0 {
                format!(", {} KiB held back (uncertain writes)", d.held_back >> 10)
            } else {
                String::new()
            },
            if SwapSpec::parse(&d.name).is_ok_and(|s| s.buffered()) {
                ", buffered"
            } else {
                ""
            },
            if d.concurrent_reads {
                ", io_uring reads"
            } else {
                ""
            },
            match (d.uring_writes, d.registered_buffers) {
                (true, true) => ", io_uring writes (registered buffers)",
                (true, false) => ", io_uring writes",
                // A file written by the page-I/O threads' positioned writes.
                _ if SwapSpec::parse(&d.name)
                    .is_ok_and(|s| matches!(s.kind, SwapKind::File { .. })) =>
                {
                    ", pwritev writes"
                }
                _ => "",
            }
        );
    }
}

/// Runs the command; returns the exit code.
pub fn main(a: SwapsArgs) -> i32 {
    // A zpool takes its memory from the budget: make the budget hold it (the arena
    // is mapped, not touched, so this costs only its descriptors).
    let pool = a
        .swap
        .iter()
        .filter_map(|s| match SwapSpec::parse(s).ok()?.kind {
            SwapKind::Zpool { size, .. } => usize::try_from(size).ok(),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let vm = match Vm::new(
        Config::default()
            .memory_budget((1 << 20usize).max(pool.next_multiple_of(4096)))
            .background_reclaim(false),
    ) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("usermm swaps: {e}");
            return 1;
        }
    };
    for s in &a.swap {
        let res = SwapSpec::parse(s).and_then(|spec| vm.swapon(spec));
        if let Err(e) = res {
            eprintln!("usermm swaps: {s}: {e}");
            return 2;
        }
    }
    print_table(&vm);
    0
}
