//! `weir-cni`: a CNI 1.1 plugin for routed veth pods (no bridge) with its own crash-safe IPAM.
//!
//! The binary is thin (`main.rs`); this library holds the commands and is also what the agent
//! and the sandbox use for the shared file and socket formats.
pub mod agent;
pub mod cmd;
pub mod config;
pub mod error;
pub mod ipam;
pub mod log;
pub mod net;
pub mod result;
