//! The usermm test kit: what the command, the tests, the benches and the examples
//! share, written once. Nothing here is part of the library's API.
//!
//! - [`workload`]: the one mixer ([`workload::mix`], [`workload::splitmix`]), the
//!   seeded PRNG (xoshiro256** over splitmix64) and the page samplers (uniform,
//!   hot/cold, Zipf).
//! - [`pattern`]: page contents that can be checked (keyed pages, stamped words,
//!   generation stamps) and their verifiers.
//! - [`watchdog`]: threads announce what they do; a stall fails with what each one
//!   waits on, a panic with its message.
//! - [`check`]: whole-`Vm` checks (no frame or slot leaked).
//! - [`driver`]: the benchmark workload (fill, warm-up, timed phase with a latency
//!   histogram) over any [`driver::Target`]: usermm, plain memory, or kernel swap.
//! - [`nbd`]: qemu-nbd, nbdkit and nbd-server started on a socket or port and
//!   stopped by pid; the skip-or-fail rule for a missing server.

#![warn(missing_docs)]

pub mod bounds;
pub mod check;
pub mod driver;
pub mod nbd;
pub mod pattern;
pub mod watchdog;
pub mod workload;

pub use workload::{mix, splitmix, Rng};
