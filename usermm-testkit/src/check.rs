//! Checks on a whole `Vm` that the tests and `usermm stress` share.

use std::time::{Duration, Instant};
use usermm::Vm;

/// Waits until every frame is free and every swap device is empty (page-outs still
/// in flight when the last space went away give their slots back when they finish);
/// `Err` with the counters if that does not happen within `limit`.
pub fn wait_no_leak(vm: &Vm, limit: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let s = vm.stats();
        let swap_free = s.swap_used.iter().all(|&(_, u)| u == 0);
        let swaps_free = vm.swaps().iter().all(|d| d.used == 0);
        if s.free_frames == s.total_frames && swap_free && swaps_free {
            return Ok(());
        }
        if t0.elapsed() > limit {
            return Err(format!(
                "leak after dropping every space: free_frames {} of {}, swap_used {:?}, \
                 swaps {:?}, stats {s:?}",
                s.free_frames,
                s.total_frames,
                s.swap_used,
                vm.swaps()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
