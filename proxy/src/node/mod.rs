//! Node plumbing beside the data path: the pod veths and weir-cni's socket (`pods`, `cni`),
//! connected UDP sockets aborted when their backend leaves (`sockterm`), and the namespace and
//! cgroup helpers the agent uses (`netns`).
pub mod cni;
pub mod netns;
pub mod pods;
pub mod sockterm;
