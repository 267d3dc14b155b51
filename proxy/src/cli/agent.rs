//! `weir agent`: flags → [`agent::Config`] → [`agent::run`].
use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use weir_proxy::{
    agent,
    datapath::{HostRouting, PodPrograms},
    k8s::Source,
    node::netns::cgroup2_root,
};

use super::{parse_bind, parse_duration, parse_path, runtime, Bind, OptPath};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where Services, EndpointSlices and the Node come from: `file:PATH` (multi-document
    /// YAML, applied once it has stopped changing for a poll interval (200 ms), whole or not
    /// at all), `kube` (in-cluster, else KUBECONFIG or ~/.kube/config) or `kube:KUBECONFIG`.
    #[arg(long)]
    source: Source,
    /// Apply a file source that holds no Service: without it, such a file (empty, comments
    /// only, cut short) is refused, loudly, and what is programmed stays (counted in
    /// `weir_source_refused`).
    #[arg(long)]
    allow_empty_source: bool,
    /// A bpffs mount (mounted if it is not one).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// cgroup v2 directory the socket-level hooks attach to (default: the cgroup v2 root).
    #[arg(long, conflicts_with = "no_socket_lb")]
    cgroup: Option<PathBuf>,
    /// Do not attach the socket-level hooks: every service packet takes the TC path.
    #[arg(long)]
    no_socket_lb: bool,
    /// What pod veths carry: `tc` (tc_from_pod and tc_to_pod: pod flows may take the
    /// per-packet path), `none` (no program: right only when every pod's processes are in
    /// --cgroup, such as kubepods.slice; replies of external flows are translated on the
    /// --netdev egress), or `auto`: none when the hooks sit on a cgroup v2 root, else tc.
    #[arg(long, value_enum, default_value = "auto")]
    pod_programs: PodProgramsArg,
    /// How translated service packets to a pod of this node reach it: `bpf` (handed
    /// straight into the pod by the program, skipping a second pass through the node's
    /// stack and so its netfilter FORWARD chain, as Cilium's host routing) or `kernel`
    /// (forwarded by the node's stack, where node rules such as an iptables NetworkPolicy
    /// implementation see them).
    #[arg(long, value_enum, default_value = "bpf")]
    host_routing: HostRoutingArg,
    /// Where container runtimes pin pod network namespaces: connected UDP sockets that the
    /// socket hooks sent to a backend which has left are aborted there (ECONNABORTED, so
    /// the application connects again), and in the agent's own namespace.
    #[arg(long, default_value = "/var/run/netns")]
    pod_netns_dir: PathBuf,
    /// Pod host-side veths: interfaces whose name starts with this (repeatable).
    #[arg(long, default_value = "weir")]
    pod_interface_prefix: Vec<String>,
    /// Node uplinks that get `tc_from_netdev` (repeatable).
    #[arg(long)]
    netdev: Vec<String>,
    /// Touch this file once the first sync is programmed.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Program once and exit (the data path stays programmed).
    #[arg(long)]
    once: bool,
    /// Unix socket weir-cni asks on to attach a new pod's program ("off": none).
    #[arg(long, default_value = weir_cni_proto::DEFAULT_AGENT_SOCKET, value_parser = parse_path)]
    cni_socket: OptPath,
    /// This node's name; its spec.podCIDRs are written to --pod-cidrs-file for weir-cni.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Where the node's podCIDRs go for weir-cni's IPAM.
    #[arg(long, default_value = weir_cni_proto::DEFAULT_POD_CIDRS_FILE)]
    pod_cidrs_file: PathBuf,
    /// Address of /healthz and /livez, as kube-proxy's ("off": not served). Each admin server
    /// takes at most 64 connections at once and 5 s for a request's headers; connections past
    /// the limit are closed at once (`weir_admin_connections_refused`).
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_bind)]
    healthz_bind_address: Bind,
    /// Address of the Prometheus /metrics, as kube-proxy's ("off": not served).
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_bind)]
    metrics_bind_address: Bind,
    /// How long a change may wait to be programmed before /healthz fails (kube-proxy:
    /// twice its sync period).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    health_timeout: Duration,
    /// Where each sync writes, per Service, whether it is programmed and why not ("off":
    /// nowhere); `weir status` reads it.
    #[arg(long, default_value = super::DEFAULT_STATE_FILE, value_parser = parse_path)]
    state_file: OptPath,
    #[command(flatten)]
    dns: super::dns::AgentDnsArgs,
}

/// `weir agent --pod-programs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PodProgramsArg {
    Auto,
    Tc,
    None,
}

/// `weir agent --host-routing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HostRoutingArg {
    Bpf,
    Kernel,
}

pub fn run(a: Args) -> Result<()> {
    super::init_tracing();
    // One heap arena for every thread: the sync thread's large, short-lived models would
    // otherwise sit in an arena of their own, freed but kept, beside the watch caches (the
    // agent's resident memory at 10 000 Services: the programming benchmark).
    // SAFETY: called before any other thread of the process exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let cgroup = if a.no_socket_lb {
        None
    } else {
        Some(match a.cgroup {
            Some(c) => c,
            None => cgroup2_root()?,
        })
    };
    if cgroup.is_none() && a.pod_programs == PodProgramsArg::None {
        anyhow::bail!("--pod-programs none needs the socket hooks: every pod's flows would go untranslated with --no-socket-lb");
    }
    let cfg = agent::Config {
        source: a.source,
        bpffs: a.bpffs,
        cgroup,
        pod_programs: match a.pod_programs {
            PodProgramsArg::Auto => None,
            PodProgramsArg::Tc => Some(PodPrograms::PerPacket),
            PodProgramsArg::None => Some(PodPrograms::None),
        },
        host_routing: match a.host_routing {
            HostRoutingArg::Bpf => HostRouting::Bpf,
            HostRoutingArg::Kernel => HostRouting::Kernel,
        },
        pod_netns_dir: Some(a.pod_netns_dir),
        pod_if_prefixes: a.pod_interface_prefix,
        netdevs: a.netdev,
        ready_file: a.ready_file,
        once: a.once,
        cni_socket: a.cni_socket.0,
        node_name: a.node_name,
        pod_cidrs_file: a.pod_cidrs_file,
        healthz_bind: a.healthz_bind_address.0,
        metrics_bind: a.metrics_bind_address.0,
        health_timeout: a.health_timeout,
        state_file: a.state_file.0,
        dns: a.dns.options(),
        allow_empty_source: a.allow_empty_source,
    };
    runtime()?.block_on(agent::run(cfg))
}
