//! Page-table memory, from the engine's own accounting (`Stats::page_table_bytes`):
//! the sparse figure (a page touched alone in its span), the dense figure (every
//! page of 64 MiB touched) and what a fork shares. The figures are printed
//! (`cargo test --release -p usermm --test pagetable -- --nocapture`).
//!
//! The kernel's x86-64 tables for comparison: a page alone in its 2 MiB costs one
//! 4 KiB PTE page; the first page in a 1 GiB span a PMD page more, the first in a
//! 512 GiB span a PUD page more (12 KiB), under a 4 KiB PGD per process (8 KiB with
//! page-table isolation). Dense: 4 KiB per 2 MiB, 0.195 %.

use usermm::{Config, Vm, PAGE_SIZE};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// One node of the table (a leaf, a mid or an upper): one page.
const NODE: u64 = 4 * KIB;

fn pt_bytes(vm: &Vm) -> u64 {
    vm.stats().page_table_bytes
}

#[test]
fn sparse_page_costs_one_leaf() {
    let vm = Vm::new(Config::default().memory_budget(16 << 20)).unwrap();
    let empty = pt_bytes(&vm);
    let mm = vm.new_space();
    let top = pt_bytes(&vm) - empty;
    // 2 GiB mapped: nothing is built until a page is touched.
    let r = mm.map_anon((2 * GIB) as usize).unwrap();
    assert_eq!(pt_bytes(&vm) - empty, top, "mapping built no table");
    // The first page of a fresh space in a 1 GiB-aligned span inside the region.
    let a = (r.start().0 + GIB - 1) & !(GIB - 1);
    let before = pt_bytes(&vm);
    mm.write(usermm::VAddr(a), &[1]).unwrap();
    let first = pt_bytes(&vm) - before;
    // A page alone in another 2 MiB of the same 1 GiB (16 MiB further on).
    let before = pt_bytes(&vm);
    mm.write(usermm::VAddr(a + 16 * MIB), &[2]).unwrap();
    let lone = pt_bytes(&vm) - before;
    // A page in another 2 MiB of the same 16 MiB.
    let before = pt_bytes(&vm);
    mm.write(usermm::VAddr(a + 18 * MIB), &[3]).unwrap();
    let lone16 = pt_bytes(&vm) - before;
    // A second page in an already touched 2 MiB costs nothing.
    let before = pt_bytes(&vm);
    mm.write(usermm::VAddr(a + 16 * MIB + PAGE_SIZE as u64), &[4])
        .unwrap();
    let neighbour = pt_bytes(&vm) - before;
    println!(
        "page tables, sparse: a space's top {top} B; its first page (fresh 512 GiB, 1 GiB \
         and 2 MiB spans) {first} B; a page alone in its 2 MiB (1 GiB span touched) {lone} B, \
         again 2 MiB further {lone16} B; a neighbour in a touched 2 MiB {neighbour} B"
    );
    // As the kernel's tables: one 4 KiB leaf for a lone page, one more 4 KiB node
    // for each fresh level above it, and a top no bigger than the kernel's PGD.
    assert!(top <= NODE, "top {top} B");
    assert_eq!(first, 3 * NODE);
    assert_eq!(lone, NODE);
    assert_eq!(lone16, NODE);
    assert_eq!(neighbour, 0);
    for (i, v) in [(0, 1u8), (16 * MIB, 2), (18 * MIB, 3)] {
        let mut b = [0u8];
        mm.read(usermm::VAddr(a + i), &mut b).unwrap();
        assert_eq!(b[0], v);
    }
}

#[test]
fn dense_tables_stay_under_half_a_percent() {
    const LEN: u64 = 64 * MIB;
    let vm = Vm::new(Config::default().memory_budget((LEN + 16 * MIB) as usize)).unwrap();
    let empty = pt_bytes(&vm);
    let mm = vm.new_space();
    let r = mm.map_anon(LEN as usize).unwrap();
    for p in 0..LEN / PAGE_SIZE as u64 {
        mm.write(r.start() + p * PAGE_SIZE as u64, &p.to_le_bytes())
            .unwrap();
    }
    // Every level counted: the top, the upper, the mid(s), the leaves.
    let bytes = pt_bytes(&vm) - empty;
    let share = bytes as f64 / LEN as f64;
    println!(
        "page tables, dense: {bytes} B for {} MiB touched = {:.3} % ({} leaves of 2 MiB)",
        LEN / MIB,
        share * 100.0,
        LEN / (2 * MIB)
    );
    assert!(share <= 0.005, "{:.3} %", share * 100.0);
    // At most one leaf per 2 MiB touched (one more if the region is not aligned),
    // plus the top and at most two mids and two uppers.
    let leaves = LEN / (2 * MIB) + 1;
    assert!(bytes <= leaves * NODE + 4 * NODE + NODE, "{bytes} B");
    let mut b = [0u8; 8];
    mm.read(r.start() + (LEN - PAGE_SIZE as u64), &mut b)
        .unwrap();
    assert_eq!(u64::from_le_bytes(b), LEN / PAGE_SIZE as u64 - 1);
}

#[test]
fn fork_shares_leaves_and_copies_one_on_write() {
    const LEN: u64 = 16 * MIB;
    let vm = Vm::new(Config::default().memory_budget((LEN + 16 * MIB) as usize)).unwrap();
    let mm = vm.new_space();
    let r = mm.map_anon(LEN as usize).unwrap();
    for p in 0..LEN / PAGE_SIZE as u64 {
        mm.write(r.start() + p * PAGE_SIZE as u64, &p.to_le_bytes())
            .unwrap();
    }
    let before = pt_bytes(&vm);
    let child = mm.fork().unwrap();
    let forked = pt_bytes(&vm) - before;
    // The child's own top and inner nodes, and the use counts of the shared leaves;
    // not a leaf of its own.
    let leaves = LEN / (2 * MIB) + 1;
    println!(
        "page tables, fork of {} MiB: {forked} B for the child (leaves shared)",
        LEN / MIB
    );
    assert!(forked < leaves * NODE, "{forked} B");
    let before = pt_bytes(&vm);
    child.write(r.start(), &[0xAB]).unwrap();
    let copied = pt_bytes(&vm) - before;
    println!("page tables, first write in a shared leaf: {copied} B (one leaf copied)");
    assert!(copied <= NODE, "{copied} B");
    let (mut a, mut b) = ([0u8; 8], [0u8; 8]);
    mm.read(r.start(), &mut a).unwrap();
    child.read(r.start(), &mut b).unwrap();
    assert_eq!((a[0], b[0]), (0, 0xAB));
}
