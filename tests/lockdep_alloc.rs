//! The lock validator's allocation check (feature `lockdep`): a heap allocation on
//! a page-I/O thread is reported (docs/design.md invariant 2: the page-out path has
//! preallocated memory only). Its own binary, because it installs
//! `lockdep::CheckedAlloc` and plants an allocation the other tests must not see.
#![cfg(feature = "lockdep")]

mod common;

use std::time::{Duration, Instant};
use usermm::lockdep::{self, CheckedAlloc};
use usermm::PAGE_SIZE;

#[global_allocator]
static ALLOC: CheckedAlloc<std::alloc::System> = CheckedAlloc(std::alloc::System);

#[test]
fn allocation_on_a_page_io_thread_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    // A device whose write path allocates (what an NBD client that built a request
    // on the heap would do). The report is made on the page-I/O thread, which says
    // it expects it only around this allocation.
    let vm = common::vm_with_hook(dir.path(), || {
        lockdep::expect_reports_here(true);
        let v: Vec<u8> = Vec::with_capacity(100);
        std::hint::black_box(&v);
        drop(v);
        lockdep::expect_reports_here(false);
    });
    let mm = vm.new_space();
    let r = mm.map_anon(256 * PAGE_SIZE).unwrap();
    for p in 0..256u64 {
        mm.write(r.start() + p * PAGE_SIZE as u64, &p.to_le_bytes())
            .unwrap();
    }
    vm.reclaim(32);
    let end = Instant::now() + Duration::from_secs(20);
    let rep = loop {
        let s = lockdep::summary();
        if let Some(r) = s.list.iter().find(|r| r.kind == "alloc") {
            break r.clone();
        }
        assert!(Instant::now() < end, "no allocation report: {:#?}", s.list);
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(rep.text.contains("page-I/O thread"), "{}", rep.text);
    assert!(rep.text.contains("100 bytes"), "{}", rep.text);
    assert!(rep.expected);
    assert_eq!(lockdep::summary().unexpected, 0);
}
