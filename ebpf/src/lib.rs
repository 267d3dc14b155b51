#![no_std]
//! The eBPF programs live in the `weir` binary target (src/main.rs); this library only lets the
//! user-space crate name this package as a build dependency.
