//! This node as the model sees it: its name, zone and primary addresses, its podCIDRs, and
//! whether it may take traffic.
use std::{
    hash::{Hash, Hasher},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Node;

use super::Objects;

const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const AUTOSCALER_DELETE_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// What the model needs to know about the node it programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// The node's name: endpoints with this `nodeName` are local.
    pub name: Option<String>,
    /// Its `topology.kubernetes.io/zone` label, for zone hints.
    pub zone: Option<String>,
    /// The addresses NodePorts are served on: the node's primary IP of each family, as
    /// kube-proxy's default `--nodeport-addresses=primary`.
    pub nodeport_ips: Vec<IpAddr>,
    /// `namespace/name` of the cluster DNS Service, when this node serves DNS itself: its
    /// cluster IPs' frontends prefer the node's own server (`SVC_F_NODE_LOCAL`).
    pub node_local_service: Option<String>,
}

impl NodeContext {
    /// The context of the node called `name`, from its Node object when the objects have it.
    pub fn of(objs: &Objects, name: Option<&str>) -> Self {
        let Some(name) = name else {
            return NodeContext::default();
        };
        let mut ctx = NodeContext {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let Some(node) = objs
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
        else {
            return ctx;
        };
        ctx.zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .cloned();
        let addrs = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .cloned()
            .unwrap_or_default();
        // The primary address of each family: the first InternalIP, else the first ExternalIP.
        for v4 in [true, false] {
            let pick = |kind: &str| {
                addrs
                    .iter()
                    .filter(|a| a.type_ == kind)
                    .filter_map(|a| a.address.parse::<IpAddr>().ok())
                    .find(|ip| ip.is_ipv4() == v4)
            };
            if let Some(ip) = pick("InternalIP").or_else(|| pick("ExternalIP")) {
                ctx.nodeport_ips.push(ip);
            }
        }
        ctx
    }
}

/// The pod CIDRs of the node called `name` (`spec.podCIDRs`, else `spec.podCIDR`).
pub fn pod_cidrs(objs: &Objects, name: &str) -> Option<Vec<String>> {
    let node = objs
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))?;
    let spec = node.spec.as_ref()?;
    match (&spec.pod_cidrs, &spec.pod_cidr) {
        (Some(c), _) if !c.is_empty() => Some(c.clone()),
        (_, Some(c)) => Some(vec![c.clone()]),
        _ => Some(Vec::new()),
    }
}

/// Whether kube-proxy would call this node eligible for traffic: not being deleted.
pub fn node_eligible(objs: &Objects, node: &str) -> bool {
    let Some(n) = objs
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node))
    else {
        return true;
    };
    let tainted = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_DELETE_TAINT));
    n.metadata.deletion_timestamp.is_none() && !tainted
}

/// What the model reads of a Node (`NodeContext::of`, `pod_cidrs`, `node_eligible`: its name,
/// zone label, addresses, pod CIDRs, taints and deletion), as one value. A Node event that
/// leaves it equal changes nothing programmed: the kubelet's status updates (conditions,
/// heartbeats, capacity, images) are most Node events, and need no resync.
pub fn model_view(node: &Node) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.metadata.name.hash(&mut h);
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .hash(&mut h);
    node.metadata.deletion_timestamp.is_some().hash(&mut h);
    if let Some(spec) = &node.spec {
        spec.pod_cidr.hash(&mut h);
        spec.pod_cidrs.hash(&mut h);
        for t in spec.taints.iter().flatten() {
            (&t.key, &t.effect, &t.value).hash(&mut h);
        }
    }
    for a in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        (&a.type_, &a.address).hash(&mut h);
    }
    h.finish()
}
