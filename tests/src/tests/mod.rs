//! weir's integration tests, one file per feature. The privileged ones (real programs, packets,
//! namespaces) are `#[ignore]`d in a plain `cargo test` and run by `cargo xtask test` (root);
//! `cargo xtask test -- tc_path` runs one feature's.
mod admin;
mod affinity_maglev;
mod cleanup;
mod cni;
mod controller;
mod dns;
mod file_source;
mod flow_cache;
mod hairpin;
mod icmp;
mod kernel_facts;
mod no_endpoints;
mod node_local_dns;
mod nodeport;
mod parsing;
mod pod_veths;
mod socket_lb;
mod status;
mod tc_path;
mod traffic_policy;
mod udp_flows;
mod upgrade_restart;
