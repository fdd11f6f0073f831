//! Fuzzes the NBD reply parser: the input is what a server sends after the
//! handshake (the first byte picks simple or structured replies). Requests in
//! flight: reads and writes with handles 1..=4. The parser must never panic,
//! never write outside a claimed request's buffer, and must complete a read
//! successfully only with every byte of it delivered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::cell::{Cell, RefCell, UnsafeCell};
use usermm::device::nbd::proto::{self, Claim, ReplyState, Table};

const N: usize = 4;
const LEN: usize = 4096;

struct Fake {
    bufs: UnsafeCell<[[u8; LEN]; N]>,
    states: UnsafeCell<[ReplyState; N]>,
    done: RefCell<[Option<Result<(), u32>>; N]>,
    claimed: Cell<Option<usize>>,
}

impl Fake {
    fn index(cookie: u64) -> Option<usize> {
        (1..=N as u64)
            .contains(&cookie)
            .then(|| cookie as usize - 1)
    }
}

impl Table for Fake {
    fn claim(&self, cookie: u64) -> Option<Claim<'_>> {
        let i = Self::index(cookie)?;
        if self.done.borrow()[i].is_some() {
            return None;
        }
        assert!(self.claimed.get().is_none(), "two claims at once");
        self.claimed.set(Some(i));
        // SAFETY: one claim at a time (asserted above), released before the next.
        let (bufs, states) = unsafe { (&mut *self.bufs.get(), &mut *self.states.get()) };
        let read = i % 2 == 0;
        Some(Claim {
            cmd: if read {
                proto::CMD_READ
            } else {
                proto::CMD_WRITE
            },
            offset: 4096 * (i as u64 + 1),
            buf: if read { &mut bufs[i][..] } else { &mut [] },
            st: &mut states[i],
        })
    }

    fn release(&self, cookie: u64, done: Option<Result<(), u32>>) {
        let i = Self::index(cookie).expect("release of a handle never claimed");
        assert_eq!(self.claimed.take(), Some(i), "release without claim");
        if let Some(r) = done {
            self.done.borrow_mut()[i] = Some(r);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let structured = mode & 1 == 1;
    let t = Fake {
        bufs: UnsafeCell::new([[0xEE; LEN]; N]),
        states: UnsafeCell::new([ReplyState::default(); N]),
        done: RefCell::new([None; N]),
        claimed: Cell::new(None),
    };
    let mut scratch = vec![0u8; proto::SCRATCH_LEN];
    for _ in 0..64 {
        match proto::read_reply(&mut rest, structured, &t, &mut scratch) {
            Ok(_) => {}
            Err(_) => break,
        }
        assert!(t.claimed.get().is_none(), "a claim was left open");
    }
});
