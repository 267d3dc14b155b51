//! `weir-cni`: a CNI 1.1 plugin for routed veth pods (no bridge) with its own crash-safe IPAM.
//!
//! The binary is thin (`main.rs`); this library holds the commands. What it says to the agent
//! (the socket's requests, the podCIDRs file) is in `weir-cni-proto`, which the agent links
//! instead of this crate.
pub mod cmd;
pub mod config;
pub mod error;
pub mod ipam;
pub mod log;
pub mod net;
pub mod result;
