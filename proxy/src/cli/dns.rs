//! `weir dns`, and the DNS flags of `weir agent`.
use std::net::SocketAddr;

use anyhow::Result;
use weir_proxy::{
    dns::{self, parse_pod_mode, parse_stub, parse_upstream},
    k8s::Source,
};

use super::runtime;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// `file:PATH`: multi-document YAML of Services and EndpointSlices, reloaded when it
    /// changes.
    #[arg(long)]
    source: Source,
    #[command(flatten)]
    dns: DnsArgs,
    /// Serve the server's counters (Prometheus text) on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

/// `weir dns --help`'s closing text: examples, what is answered, and the limits.
pub fn after_help() -> String {
    format!(
        "Examples:\n  \
        weir dns --source file:services.yaml --listen 127.0.0.1:5353\n  \
        weir dns --source file:svc.yaml --listen 198.18.0.53:53 --domain corp.internal --ttl 30\n  \
        weir dns --source file:svc.yaml --listen [::1]:53 --pods insecure --upstream 198.18.0.1\n  \
        weir dns --source file:svc.yaml --listen 127.0.0.1:53 --stub-domain corp.example=10.0.0.53\n  \
        weir dns --source file:svc.yaml --listen 127.0.0.1:53 --metrics 127.0.0.1:9153\n\n\
        Names of the cluster domain are answered from the Services and EndpointSlices of the\n\
        file (the Kubernetes DNS specification, schema 1.1.0); others are relayed to the\n\
        upstream resolvers (default: the nameservers of /etc/resolv.conf).\n\n{}",
        weir_dns::server::limits_help()
    )
}

pub fn run(a: Args) -> Result<()> {
    super::init_tracing();
    let Source::File(path) = a.source else {
        anyhow::bail!("weir dns reads a file source (file:PATH); the agent embeds the server for the Kubernetes API");
    };
    Ok(runtime()?.block_on(dns::run_standalone(&path, a.dns.options(), a.metrics))?)
}

/// The agent's embedded DNS server: off unless `--dns-listen` is given.
#[derive(clap::Args, Debug)]
pub struct AgentDnsArgs {
    /// Serve cluster DNS on this address, UDP and TCP (repeatable; none: no DNS server). The
    /// server's limits are those of `weir dns --help`; its counters are in /metrics.
    #[arg(long)]
    dns_listen: Vec<SocketAddr>,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    dns_domain: String,
    /// TTL of the DNS answers, in seconds.
    #[arg(long, default_value_t = 5)]
    dns_ttl: u32,
    /// Pod records: disabled, insecure, or verified (only for addresses pods have; watches Pods).
    #[arg(long, default_value = "disabled", value_parser = parse_pod_mode)]
    dns_pods: weir_dns::PodMode,
    /// Resolver for names outside the cluster domain (repeatable; default: /etc/resolv.conf).
    #[arg(long, value_parser = parse_upstream)]
    dns_upstream: Vec<SocketAddr>,
    /// Stub domain: names under SUFFIX go to this resolver, SUFFIX=IP[:PORT] (repeatable).
    #[arg(long, value_parser = parse_stub)]
    dns_stub_domain: Vec<(String, SocketAddr)>,
    /// The cluster DNS Service (NAMESPACE/NAME) whose queries from this node's pods go to this
    /// server while it answers, and to the Service's endpoints when it does not ("off": never).
    #[arg(long, default_value = "kube-system/kube-dns")]
    dns_service: String,
}

impl AgentDnsArgs {
    pub fn options(self) -> Option<dns::Options> {
        if self.dns_listen.is_empty() {
            return None;
        }
        let service = (self.dns_service != "off").then_some(self.dns_service);
        Some(dns::Options {
            service,
            ..DnsArgs {
                listen: self.dns_listen,
                domain: self.dns_domain,
                ttl: self.dns_ttl,
                pods: self.dns_pods,
                upstream: self.dns_upstream,
                stub_domain: self.dns_stub_domain,
            }
            .options()
        })
    }
}

/// The DNS server's options (`weir dns`).
#[derive(clap::Args, Debug)]
pub struct DnsArgs {
    /// Address to answer DNS on, UDP and TCP (repeatable).
    #[arg(long = "listen", default_value = "127.0.0.1:53")]
    listen: Vec<SocketAddr>,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// TTL of the answers, in seconds.
    #[arg(long, default_value_t = 5)]
    ttl: u32,
    /// Pod records (`a-b-c-d.<ns>.pod.<domain>`): disabled, insecure, or verified (only the
    /// addresses of the Pods in the source file).
    #[arg(long, default_value = "disabled", value_parser = parse_pod_mode)]
    pods: weir_dns::PodMode,
    /// Resolver for names outside the cluster domain, IP or IP:PORT (repeatable; default: the
    /// nameservers of /etc/resolv.conf).
    #[arg(long, value_parser = parse_upstream)]
    upstream: Vec<SocketAddr>,
    /// Stub domain: names under SUFFIX go to this resolver, SUFFIX=IP[:PORT] (repeatable).
    #[arg(long, value_parser = parse_stub)]
    stub_domain: Vec<(String, SocketAddr)>,
}

impl DnsArgs {
    pub fn options(self) -> dns::Options {
        dns::Options {
            listen: self.listen,
            domain: self.domain,
            ttl: self.ttl,
            pods: self.pods,
            upstreams: if self.upstream.is_empty() {
                dns::resolv_conf_upstreams(std::path::Path::new("/etc/resolv.conf"))
            } else {
                self.upstream
            },
            stubs: self.stub_domain,
            service: None,
        }
    }
}
