//! The usermm test kit: what the command, the tests, the benches and the examples
//! share, written once. Nothing here is part of the library's API.
//!
//! - [`workload`]: the seeded PRNG (xoshiro256** over splitmix64) and the page
//!   samplers (uniform, hot/cold, Zipf).

#![warn(missing_docs)]

pub mod workload;

pub use workload::{splitmix, Rng};
