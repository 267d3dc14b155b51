//! The endpoints of one service port, as kube-proxy reads and sorts them: slices of the
//! family and port, conditions, topology hints, `CategorizeEndpoints`.
use std::net::{IpAddr, SocketAddr};

use super::Slice;

use super::{proto, Model, NodeContext, Problem};

/// One endpoint of one service port, as kube-proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Ep {
    pub(super) addr: SocketAddr,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    pub(super) local: bool,
    pub(super) zone_hints: Vec<String>,
    pub(super) node_hints: Vec<String>,
}

/// Where the topology hints send this node's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Topology {
    /// Hints are absent or ignored: every endpoint.
    Any,
    /// Endpoints hinted for this node.
    Node,
    /// Endpoints hinted for this node's zone.
    Zone,
}

/// kube-proxy's `topologyModeFromHints`: node hints when every ready endpoint has some and one
/// names this node; else zone hints when every ready endpoint has some and one names this
/// node's zone; else none (hints are ignored whenever following them could leave this node
/// without an endpoint).
pub(super) fn topology(eps: &[Ep], node: &NodeContext) -> Topology {
    let ready = || eps.iter().filter(|e| e.ready);
    let name = node.name.as_deref().unwrap_or_default();
    let zone = node.zone.as_deref().unwrap_or_default();
    if ready().all(|e| !e.node_hints.is_empty())
        && ready().any(|e| !name.is_empty() && e.node_hints.iter().any(|h| h == name))
    {
        return Topology::Node;
    }
    if ready().all(|e| !e.zone_hints.is_empty())
        && ready().any(|e| !zone.is_empty() && e.zone_hints.iter().any(|h| h == zone))
    {
        return Topology::Zone;
    }
    Topology::Any
}

pub(super) fn available(e: &Ep, t: Topology, node: &NodeContext) -> bool {
    match t {
        Topology::Any => true,
        Topology::Node => node.name.as_ref().is_some_and(|n| e.node_hints.contains(n)),
        Topology::Zone => node.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z)),
    }
}

/// The endpoints of one service port, split the way kube-proxy's `CategorizeEndpoints` does.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Categorized {
    /// For `Cluster` traffic policy: ready endpoints allowed by topology, or, when there is
    /// no ready endpoint anywhere, the serving terminating ones.
    pub(super) cluster: Vec<SocketAddr>,
    /// For `Local` policy: this node's ready endpoints, else its serving terminating ones.
    pub(super) local: Vec<SocketAddr>,
    /// Whether any endpoint anywhere could take traffic: decides drop against reject.
    pub(super) any: bool,
}

pub(super) fn categorize(
    eps: &[Ep],
    uses_cluster: bool,
    uses_local: bool,
    node: &NodeContext,
) -> Categorized {
    let mut c = Categorized::default();
    let pick = |f: &dyn Fn(&Ep) -> bool| -> Vec<SocketAddr> {
        eps.iter().filter(|e| f(e)).map(|e| e.addr).collect()
    };
    if uses_cluster {
        let t = topology(eps, node);
        c.cluster = pick(&|e| e.ready && available(e, t, node));
        if c.cluster.is_empty() {
            c.cluster = pick(&|e| e.serving && e.terminating && available(e, t, node));
        }
        c.any = !c.cluster.is_empty();
    }
    if uses_local {
        c.any |= eps.iter().any(|e| e.ready || (e.serving && e.terminating));
        c.local = pick(&|e| e.local && e.ready);
        if c.local.is_empty() {
            c.local = pick(&|e| e.local && e.serving && e.terminating);
        }
    }
    c
}

/// The endpoints of the slices of the service's family whose port matches by name and
/// protocol (an unnamed service port matches the slice's unnamed port). Like kube-proxy, only
/// an endpoint's first address counts, and an endpoint in two slices counts once.
pub(super) fn endpoints_for(
    slices: &[&Slice],
    v4: bool,
    port_name: &str,
    proto_num: u8,
    node: &NodeContext,
    m: &mut Model,
    service: &str,
) -> Vec<Ep> {
    let family = if v4 { "IPv4" } else { "IPv6" };
    let mut out: Vec<Ep> = Vec::new();
    for s in slices.iter().filter(|s| s.address_type == family) {
        let Some(port) = s.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && proto(p.protocol.as_ref()).ok() == Some(proto_num)
        }) else {
            continue;
        };
        let slice_name = s.metadata.name.as_deref().unwrap_or_default();
        let Some(pnum) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            m.problems.push(Problem {
                object: format!("EndpointSlice {slice_name} of Service {service}"),
                message: format!("port {port_name:?} has no valid number"),
            });
            continue;
        };
        for ep in s.endpoints.iter().flatten() {
            let Some(first) = ep.addresses.first() else {
                continue;
            };
            let ip = match first.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == v4 => ip,
                _ => {
                    m.problems.push(Problem {
                        object: format!("EndpointSlice {slice_name} of Service {service}"),
                        message: format!("endpoint address {first:?} is not an {family} address"),
                    });
                    continue;
                }
            };
            let addr = SocketAddr::new(ip, pnum);
            if out.iter().any(|e| e.addr == addr) {
                continue;
            }
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let hints = ep.hints.as_ref();
            out.push(Ep {
                addr,
                ready,
                serving: c.and_then(|c| c.serving).unwrap_or(ready),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                local: node.name.is_some() && ep.node_name.as_deref() == node.name.as_deref(),
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect())
                    .unwrap_or_default(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| n.name.clone()).collect())
                    .unwrap_or_default(),
            });
        }
    }
    out.sort_by_key(|e| e.addr);
    out
}
