//! weir's integration tests, by feature (`tests/`), over the kit in `weir-testkit`: the packet
//! fixtures' runner (`fixture`) and a simulated node's helpers (`node`) are shared by them.
#![cfg(test)]
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

pub use weir_testkit::*;

mod fixture;
mod node;
mod tests;
