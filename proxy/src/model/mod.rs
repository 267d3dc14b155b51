//! Kubernetes objects to desired frontends.
//!
//! The rules are kube-proxy's (`pkg/proxy`: `CategorizeEndpoints`, `topologyModeFromHints`,
//! the proxiers' frontends): the same objects give the same frontends and the same backends
//! per frontend, for the node named in the [`NodeContext`].
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::core::v1::Service;
use weir_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

mod claims;
mod desired;
mod endpoints;
mod node;
mod objects;
mod report;
mod slice;

pub use claims::{rank_of, ByService, Claims, Rank};
pub use desired::{proto_name, Desired, Frontend, ServiceSpec};
pub use node::{model_view as node_view, node_eligible, pod_cidrs, NodeContext};
pub use objects::{
    parse_stream, parse_yaml, Objects, HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL,
};
pub use report::{add_unread, service_of, service_of_port, Problem, ServiceReport, Skipped};
pub use slice::{Slice, SliceEndpoint};

use endpoints::{categorize, endpoints_for};
use objects::labelled;

/// Annotation selecting the backend-selection algorithm of a service: `random` or `maglev`.
pub const LB_ALGORITHM_ANNOTATION: &str = "weir.dev/lb-algorithm";
/// kube-proxy's default ClientIP affinity timeout.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

#[derive(Debug, Default)]
pub struct Model {
    /// What the maps get: each frontend with the spec of the Service that holds it.
    pub desired: Desired,
    /// Every Service's frontends, held or not (see [`Rank`]).
    pub claims: Claims,
    pub problems: Vec<Problem>,
    pub skipped: Vec<Skipped>,
    /// The `healthCheckNodePort` of each Service with `externalTrafficPolicy: Local` that has
    /// one, with its Service (`namespace/name`) and the number of this node's ready endpoints,
    /// as kube-proxy serves them to load balancers.
    pub health_checks: BTreeMap<u16, (String, usize)>,
}

fn proto(p: Option<&String>) -> Result<u8, String> {
    match p.map(String::as_str).unwrap_or("TCP") {
        "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        "SCTP" => Ok(PROTO_SCTP),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

/// Builds the desired frontends from the objects, for the node described by `node`.
///
/// Follows kube-proxy: ClusterIP, NodePort (on the node's primary IPs), LoadBalancer ingress
/// IPs and externalIPs; endpoint conditions with the fallback to serving terminating endpoints;
/// internal and external traffic policy; topology hints. An object with a problem is reported
/// and skipped; the rest is built.
pub fn build(objs: &Objects, node: &NodeContext) -> Model {
    let mut m = Model::default();
    // EndpointSlices by (namespace, service name).
    let mut slices: BTreeMap<(String, String), Vec<&Slice>> = BTreeMap::new();
    for s in &objs.slices {
        if s.label(SERVICE_PROXY_NAME_LABEL).is_some() || s.label(HEADLESS_LABEL).is_some() {
            continue;
        }
        let ns = s
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let Some(svc) = s.label(SERVICE_NAME_LABEL) else {
            continue;
        };
        slices.entry((ns, svc.to_string())).or_default().push(s);
    }
    // Oldest first: the first claimant of a frontend holds it.
    let mut services: Vec<(Rank, &Service)> = objs
        .services
        .iter()
        .map(|s| {
            let id = format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap_or("default"),
                s.metadata.name.as_deref().unwrap_or_default()
            );
            (rank_of(s, &id), s.as_ref())
        })
        .collect();
    services.sort_by(|a, b| a.0.cmp(&b.0));
    for (rank, svc) in services {
        let mut mine = Desired::new();
        build_service(svc, &slices, node, &mut m, &mut mine);
        m.claim(rank, mine);
    }
    m
}

impl Model {
    /// Takes `mine`, one Service's frontends, into `desired`, but those an older Service
    /// holds: a problem of the Service says which.
    fn claim(&mut self, rank: Rank, mine: Desired) {
        let id = &rank.1;
        for (fe, spec) in &mine {
            match self.desired.get(fe) {
                Some(held) if service_of_port(&held.name) != id.as_str() => {
                    self.problems.push(Problem {
                        object: format!("Service {id}"),
                        message: format!(
                            "{fe} is also a frontend of Service {}, which is older and keeps it",
                            service_of_port(&held.name)
                        ),
                    })
                }
                _ => {
                    self.desired.insert(*fe, spec.clone());
                }
            }
        }
        if !mine.is_empty() {
            self.claims.insert(id.clone(), (rank, mine));
        }
    }
}

fn build_service(
    svc: &Service,
    slices: &BTreeMap<(String, String), Vec<&Slice>>,
    node: &NodeContext,
    m: &mut Model,
    mine: &mut Desired,
) {
    let ns = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc.metadata.name.clone().unwrap_or_default();
    let id = format!("{ns}/{name}");
    let skip = |m: &mut Model, reason: &str| {
        m.skipped.push(Skipped {
            service: id.clone(),
            reason: reason.into(),
        })
    };
    let Some(spec) = &svc.spec else {
        m.problems.push(Problem {
            object: format!("Service {id}"),
            message: "no spec".into(),
        });
        return;
    };
    if labelled(&svc.metadata, SERVICE_PROXY_NAME_LABEL) {
        return skip(
            m,
            "labelled service.kubernetes.io/service-proxy-name (another proxy's)",
        );
    }
    if labelled(&svc.metadata, HEADLESS_LABEL) {
        return skip(m, "labelled service.kubernetes.io/headless");
    }
    if spec.type_.as_deref() == Some("ExternalName") {
        return skip(m, "ExternalName");
    }
    let ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => vec![],
    };
    if ips.iter().any(|i| i == "None") {
        return skip(m, "headless (clusterIP None)");
    }
    if ips.is_empty() {
        return skip(m, "no clusterIP");
    }
    let mut vips = Vec::new();
    for ip in &ips {
        match ip.parse::<IpAddr>() {
            Ok(v) => vips.push(v),
            Err(_) => m.problems.push(Problem {
                object: format!("Service {id}"),
                message: format!("clusterIP {ip:?} is not an IP address"),
            }),
        }
    }
    // The service's families are those of its cluster IPs (ipFamilies follows them).
    let families: Vec<bool> = vips.iter().map(|v| v.is_ipv4()).collect();
    let mut external_ips = Vec::new();
    let mut ext = |m: &mut Model, what: &str, ip: &str| match ip.parse::<IpAddr>() {
        Ok(v) if families.contains(&v.is_ipv4()) => external_ips.push(v),
        Ok(v) => m.problems.push(Problem {
            object: format!("Service {id}"),
            message: format!(
                "{what} {v} is IPv{}, not a family of the service",
                if v.is_ipv4() { 4 } else { 6 }
            ),
        }),
        Err(_) => m.problems.push(Problem {
            object: format!("Service {id}"),
            message: format!("{what} {ip:?} is not an IP address"),
        }),
    };
    for ip in spec.external_ips.iter().flatten() {
        ext(m, "externalIP", ip);
    }
    if spec.type_.as_deref() == Some("LoadBalancer") {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for ing in ingress.into_iter().flatten() {
            // ipMode Proxy: the load balancer proxies, and delivers to the node, not the IP.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = &ing.ip {
                ext(m, "load balancer ingress IP", ip);
            }
        }
    }
    let node_port_type = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let maglev = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION))
        .is_some_and(|v| v == "maglev");
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map(|t| t.max(1) as u32)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    });
    let my_slices = slices
        .get(&(ns.clone(), name.clone()))
        .cloned()
        .unwrap_or_default();
    if spec.ports.as_ref().is_none_or(|p| p.is_empty()) {
        return skip(m, "no ports");
    }
    let health_port = spec
        .health_check_node_port
        .filter(|_| external_local)
        .and_then(|p| u16::try_from(p).ok());
    let mut local_ready = std::collections::BTreeSet::new();
    for port in spec.ports.iter().flatten() {
        let pname = port.name.clone().unwrap_or_default();
        let label = if pname.is_empty() {
            port.port.to_string()
        } else {
            pname.clone()
        };
        let object = format!("Service {id} port {label}");
        let proto = match proto(port.protocol.as_ref()) {
            Ok(p) => p,
            Err(e) => {
                m.problems.push(Problem { object, message: e });
                continue;
            }
        };
        let Some(vport) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            m.problems.push(Problem {
                object,
                message: format!("port {} is out of range", port.port),
            });
            continue;
        };
        let node_port = match port.node_port {
            Some(n) if node_port_type => match u16::try_from(n).ok().filter(|p| *p != 0) {
                Some(p) => Some(p),
                None => {
                    m.problems.push(Problem {
                        object: object.clone(),
                        message: format!("nodePort {n} is out of range"),
                    });
                    None
                }
            },
            _ => None,
        };
        for &vip in &vips {
            let v4 = vip.is_ipv4();
            let eps = endpoints_for(&my_slices, v4, &pname, proto, node, m, &id);
            let externals: Vec<Frontend> = external_ips
                .iter()
                .filter(|ip| ip.is_ipv4() == v4)
                .map(|ip| Frontend::new(*ip, vport, proto))
                .chain(node_port.into_iter().flat_map(|np| {
                    node.nodeport_ips
                        .iter()
                        .filter(|ip| ip.is_ipv4() == v4)
                        .map(move |ip| Frontend::new(*ip, np, proto))
                }))
                .collect();
            let externally_accessible = !externals.is_empty();
            // kube-proxy's UsesClusterEndpoints: external traffic from this node's own pods and
            // the node itself always goes to cluster endpoints, whatever the external policy.
            let uses_cluster = !internal_local || externally_accessible;
            let uses_local = internal_local || (externally_accessible && external_local);
            let c = categorize(&eps, uses_cluster, uses_local, node);
            local_ready.extend(
                eps.iter()
                    .filter(|e| e.local && e.ready)
                    .map(|e| e.addr.ip()),
            );
            let spec_for = |backends: &[SocketAddr]| ServiceSpec {
                name: format!("{id}:{label}"),
                backends: backends.to_vec(),
                maglev,
                affinity_timeout_s: affinity,
                drop_when_empty: backends.is_empty() && c.any,
                node_local: false,
            };
            let internal = if internal_local { &c.local } else { &c.cluster };
            mine.insert(
                Frontend::new(vip, vport, proto),
                ServiceSpec {
                    node_local: node.node_local_service.as_deref() == Some(id.as_str()),
                    ..spec_for(internal)
                },
            );
            for fe in externals {
                mine.insert(fe, spec_for(&c.cluster));
                if external_local {
                    mine.insert(fe.external(), spec_for(&c.local));
                }
            }
        }
    }
    if let Some(p) = health_port {
        m.health_checks.insert(p, (id.clone(), local_ready.len()));
    }
}

#[cfg(test)]
mod tests;
