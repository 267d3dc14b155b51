//! The cluster DNS server, fed from the same objects as the data path: Kubernetes Services and
//! EndpointSlices become `weir_dns` Services, whose zone the embedded server answers from
//! (`feed`). `weir dns` runs it alone with a file source; `weir agent --dns-listen` embeds it
//! (`server`), and takes the node's pods' DNS Service traffic while it answers (`lease`).
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use crate::error::{Context, Error, Result};
use weir_dns::{Config as ZoneConfig, Handler, PodMode};

pub mod feed;
pub mod lease;
pub mod server;

pub use feed::{pods, services, update, ZoneFeed};
pub use lease::{probe, Lease};
pub use server::{run_standalone, serve, serve_on_own_thread};

/// How the server runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Addresses to answer on, UDP and TCP each.
    pub listen: Vec<SocketAddr>,
    /// The cluster domain.
    pub domain: String,
    pub ttl: u32,
    pub pods: PodMode,
    /// Resolvers for names outside the cluster zone.
    pub upstreams: Vec<SocketAddr>,
    /// Stub domains: names under the suffix go to its resolver.
    pub stubs: Vec<(String, SocketAddr)>,
    /// `namespace/name` of the cluster DNS Service whose traffic the node's own server takes
    /// while it answers (the agent only; None: no node-local DNS).
    pub service: Option<String>,
}

impl Options {
    /// The address of each family the node-local redirection sends to: the first listen
    /// address of that family that is not a wildcard.
    pub fn local_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let pick = |v4: bool| {
            self.listen
                .iter()
                .find(|a| a.is_ipv4() == v4 && !a.ip().is_unspecified())
                .copied()
        };
        (pick(true), pick(false))
    }
}

impl Options {
    fn zone_config(&self) -> Result<ZoneConfig> {
        let mut domain = hickory_name(&self.domain)
            .with_context(|| format!("cluster domain {:?}", self.domain))?;
        domain.set_fqdn(true);
        Ok(ZoneConfig {
            domain,
            ttl: self.ttl,
            pods: self.pods,
        })
    }
}

fn hickory_name(s: &str) -> Result<weir_dns::Name> {
    weir_dns::Name::from_ascii(s).map_err(|e| Error::invalid(format!("{s:?}: {e}")))
}

/// `disabled`, `insecure` or `verified`, as CoreDNS's `pods` option.
pub fn parse_pod_mode(s: &str) -> Result<PodMode, String> {
    match s {
        "disabled" => Ok(PodMode::Disabled),
        "insecure" => Ok(PodMode::Insecure),
        "verified" => Ok(PodMode::Verified),
        _ => Err(format!("{s:?}: expected disabled, insecure or verified")),
    }
}

/// `IP` or `IP:PORT` (port 53 by default), IPv6 in brackets with a port.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?}: expected IP or IP:PORT"))
}

/// `SUFFIX=IP[:PORT]`: names under SUFFIX go to that resolver.
pub fn parse_stub(s: &str) -> Result<(String, SocketAddr), String> {
    let (suffix, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected SUFFIX=IP[:PORT]"))?;
    weir_dns::Name::from_ascii(suffix).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((suffix.into(), parse_upstream(ip)?))
}

/// The handler these options describe: upstreams and stub domains.
pub fn handler(opts: &Options) -> Result<Handler> {
    let mut h = Handler::new(opts.upstreams.clone());
    let mut stubs: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    for (suffix, r) in &opts.stubs {
        stubs.entry(suffix.clone()).or_default().push(*r);
    }
    for (suffix, resolvers) in stubs {
        let mut n = hickory_name(&suffix).with_context(|| format!("stub domain {suffix:?}"))?;
        n.set_fqdn(true);
        h = h.with_stub(n, resolvers);
    }
    Ok(h)
}

/// The `nameserver` lines of a resolv.conf (the node's own resolvers).
pub fn resolv_conf_upstreams(path: &Path) -> Vec<SocketAddr> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}
