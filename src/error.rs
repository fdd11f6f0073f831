//! The public error type. Every fallible call of the library returns
//! [`Error`]; the doc comment of each variant is its message and says what the
//! caller can do about it.

use std::io;

/// Errors of usermm. `#[non_exhaustive]`: match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No frame could be found for the access and nothing can be reclaimed (no swap
    /// device, or every resident page is pinned). Pages already stored are intact.
    #[error("out of memory: no frame can be reclaimed within the budget")]
    OutOfMemory,
    /// Memory is full and every swap device is full too. Pages already stored are
    /// intact and readable; free memory (unmap) or add swap.
    #[error("out of swap: memory budget and every swap device are full")]
    OutOfSwap,
    /// The address (or a byte of the range) is not inside a mapped region.
    #[error("bad address {addr:#x}: not inside a mapped region")]
    BadAddress {
        /// The first offending address.
        addr: u64,
    },
    /// An argument is invalid (zero or overflowing length, misaligned region, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A swap device failed the I/O this access needed. Only this access failed;
    /// the page stays stored on the device and may be read again.
    #[error("swap device {dev} failed: {source}")]
    Device {
        /// The device's name (its spec).
        dev: String,
        /// What the device reported (or `InvalidData` for a checksum mismatch).
        #[source]
        source: io::Error,
    },
    /// An I/O error outside a swap device (creating a swap file, …).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The configuration or a spec is invalid; the message says which part.
    #[error("configuration error: {0}")]
    Config(String),
    /// The call would wait for a page guard (`PageRef`/`PageMut`) that this same
    /// thread holds, and so wait forever: drop the guard first. Nothing was changed.
    #[error("would deadlock: {0} while this thread holds a guard on the page(s) it needs")]
    WouldDeadlock(&'static str),
    /// Too many swap devices (the table holds 64).
    #[error("too many swap devices (at most {0})")]
    TooManyDevices(usize),
}

/// Shorthand for `Result<T, usermm::Error>`.
pub type Result<T> = std::result::Result<T, Error>;
