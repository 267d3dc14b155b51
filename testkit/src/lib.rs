//! What weir's tests and benchmarks share, and no product crate links (a dev-dependency only):
//!
//! - [`harness`]: the production eBPF object loaded for real, its maps filled through the
//!   agent's own programmer, packets run through the programs with BPF_PROG_TEST_RUN;
//! - [`frames`]: the packets they run;
//! - [`fake_maps`]: an in-memory map writer that checks every intermediate state;
//! - [`fake_api`]: a scripted Kubernetes API server;
//! - [`probe`]: an HTTP GET in a namespace, Prometheus values, `/proc` status, DNS queries;
//! - [`topo`]: topology beyond the sandbox's simulated node (pods wired by hand, a shared
//!   segment between nodes), which is re-exported here with it.
use std::path::PathBuf;

use anyhow::{Context, Result};

pub mod fake_api;
pub mod fake_maps;
pub mod frames;
pub mod harness;
pub mod probe;
pub mod topo;

pub use fake_maps::FakeMaps;
pub use frames::*;
pub use harness::*;
pub use topo::{Lan, NodeExt};
pub use weir_proxy::tools::sim::{
    self,
    guards::{caller_handles_signals, sweep_own, tag, BpfMount, Cgroup, Proc, RunDir},
    topo::{Cni, Netns, Node, Pod},
    Sim,
};

/// The release weir binary xtask built (WEIR_BIN).
pub fn weir_bin() -> Result<PathBuf> {
    let p = std::env::var_os("WEIR_BIN")
        .context("WEIR_BIN is not set: run through `cargo xtask test` or `cargo xtask bench`")?;
    Ok(p.into())
}

/// A reconciler for the node called `node` that writes its podCIDRs to `pod_cidrs_file` and
/// nothing else: no report file, no DNS Service of its own. What tests and benches that drive
/// the agent's sync steps themselves use.
pub fn reconciler(node: &str, pod_cidrs_file: PathBuf) -> weir_proxy::k8s::Reconciler {
    weir_proxy::k8s::Reconciler::new(Some(node.into()), pod_cidrs_file, None, None)
}
