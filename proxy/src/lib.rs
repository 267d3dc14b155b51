//! weir's node agent and the `weir` command's library, in the order a Service change passes
//! through it:
//!
//! - [`k8s`]: where Services, EndpointSlices and Nodes come from (the Kubernetes API's watches
//!   and stores, or a YAML file), and `reconcile`, which takes each change to the data path;
//! - [`model`]: kube-proxy's rules, from those objects to the desired frontends;
//! - [`datapath`]: the desired frontends diffed into the pinned eBPF maps, and the eBPF object
//!   loaded, attached and adopted across restarts.
//!
//! Beside them: [`admin`] (health, metrics, healthCheckNodePorts), [`node`] (pod veths and
//! weir-cni's socket, socket termination, namespaces), [`dns`] (the cluster DNS server the
//! agent embeds, fed from the same objects), and [`agent`], which runs them all. Apart:
//! [`tools`], the commands people run beside the agent (load tester, echo server, status,
//! sandbox).
pub mod admin;
pub mod agent;
pub mod datapath;
pub mod dns;
pub mod error;
pub mod k8s;
pub mod model;
pub mod node;
pub mod tools;
