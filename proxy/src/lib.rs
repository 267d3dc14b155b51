//! weir's node agent and the `weir` command, as a library so tests and benches drive the same
//! code.
pub mod addr;
pub mod agent;
pub mod dns;
pub mod echo;
#[cfg(feature = "testkit")]
pub mod fake_api;
pub mod healthcheck;
pub mod kernel_facts;
pub mod kube_source;
pub mod loader;
pub mod loadtest;
pub mod maglev;
pub mod maps;
pub mod model;
pub mod observe;
pub mod program;
pub mod sandbox;
pub mod sim;
pub mod sockterm;
pub mod status;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod topo;
