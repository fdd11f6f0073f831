//! Fuzzes the NBD client handshake: the input is everything the server sends.
//! It must end in Ok or a clear error, never panic, and never allocate more
//! than its bounded buffers (libFuzzer's -malloc_limit_mb catches a large one).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{self, Read, Write};
use usermm::device::nbd::proto;

struct Server<'a> {
    input: &'a [u8],
    sent: usize,
}

impl Read for Server<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.input.read(b)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.sent += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut s = Server {
        input: data,
        sent: 0,
    };
    if let Ok(n) = proto::handshake(&mut s, "swap", data.first().is_some_and(|b| b & 1 == 1)) {
        let _ = n.check(4096);
    }
    assert!(s.sent < 64 * 1024, "the client sends a bounded handshake");
});
