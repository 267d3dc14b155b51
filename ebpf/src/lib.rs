//! What weir's eBPF programs share: parsing, conntrack, the service lookup and backend
//! selection, NAT and checksums, routing, the flow cache, ICMP errors, rejects, and the maps.
//! The programs themselves, one file per attach point, are in `programs/` (the object the
//! agent loads, `main.rs`); benchmark-only programs are in `bench/`, an object of their own.
//!
//! Paths a packet takes through these modules:
//! - entering the node's stack (`tc_from_pod`, `tc_from_netdev`): `parse` → `flow::lookup` (a
//!   cached rewrite ends it in `tc_flow_write`) → `service` (conntrack, then `lb` for a new
//!   flow) → `nat` → `route`; a service without endpoints → `reject`; ICMP errors → `icmp`.
//! - leaving a device (`tc_to_pod`, `tc_to_netdev`): `parse` → `flow::lookup` → `reply`.
//! - a socket (`connect`, `sendmsg`, `recvmsg`, `getpeername`): `sock` → `lb`.
// Only for the BPF target: weir-proxy's build-dependency on this crate (which tells cargo of
// it) builds the library for the host too, where there is nothing to compile.
#![cfg(target_arch = "bpf")]
#![no_std]

pub mod ct;
pub mod flow;
pub mod icmp;
pub mod lb;
pub mod maps;
pub mod nat;
pub mod parse;
pub mod reject;
pub mod reply;
pub mod route;
pub mod service;
pub mod sock;
