//! Kubernetes objects to desired frontends.
//!
//! The rules are kube-proxy's (`pkg/proxy`: `CategorizeEndpoints`, `topologyModeFromHints`,
//! the proxiers' frontends): the same objects give the same frontends and the same backends
//! per frontend, for the node named in the [`NodeContext`].
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;
use weir_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::program::{Desired, Frontend, ServiceSpec};

/// Annotation selecting the backend-selection algorithm of a service: `random` or `maglev`.
pub const LB_ALGORITHM_ANNOTATION: &str = "weir.dev/lb-algorithm";
/// kube-proxy's default ClientIP affinity timeout.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// Cloning shares the objects (`Arc`s).
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<k8s_openapi::api::core::v1::Node>>,
    /// Pods, for cluster DNS's `pods verified` only (the data path does not read them). Read
    /// from the file source when it has them, watched from the API only in that mode.
    pub pods: Vec<Arc<k8s_openapi::api::core::v1::Pod>>,
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

/// One object that could not be used, and why. The others are still programmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub object: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// Why a service is not programmed, for status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub service: String,
    pub reason: String,
}

/// Whether one Service is programmed, and why not, for `weir status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceReport {
    /// `namespace/name`.
    pub service: String,
    /// `programmed`, `partly programmed` or `not programmed`.
    pub state: String,
    pub frontends: Vec<String>,
    /// Why it is not programmed, or what of it could not be.
    pub problems: Vec<String>,
}

/// The Service a problem's object belongs to: `Service ns/name[ port p]` or
/// `EndpointSlice s of Service ns/name`.
pub fn service_of(object: &str) -> Option<&str> {
    let rest = object.split("Service ").nth(1)?;
    Some(rest.split(' ').next().unwrap_or(rest))
}

impl Model {
    /// One report per Service seen: its frontends, and why any of it is not programmed.
    /// `failed` are frontends the map writer could not program, by service port name
    /// (`ns/name:port`), with the error.
    pub fn reports(&self, failed: &[(String, String)]) -> Vec<ServiceReport> {
        let mut by: BTreeMap<String, (Vec<String>, Vec<String>, bool)> = BTreeMap::new();
        let svc = |name: &str| service_of_port(name).to_string();
        for (fe, spec) in &self.desired {
            by.entry(svc(&spec.name))
                .or_default()
                .0
                .push(fe.to_string());
        }
        for s in &self.skipped {
            let e = by.entry(s.service.clone()).or_default();
            e.1.push(s.reason.clone());
            e.2 = true;
        }
        for p in &self.problems {
            if let Some(s) = service_of(&p.object) {
                by.entry(s.to_string()).or_default().1.push(p.to_string());
            }
        }
        for (name, e) in failed {
            by.entry(svc(name)).or_default().1.push(e.clone());
        }
        by.into_iter()
            .map(|(service, (frontends, problems, skipped))| ServiceReport {
                state: if skipped || frontends.is_empty() {
                    "not programmed"
                } else if problems.is_empty() {
                    "programmed"
                } else {
                    "partly programmed"
                }
                .into(),
                service,
                frontends,
                problems,
            })
            .collect()
    }
}

/// The Service (`namespace/name`) of a service port name (`namespace/name:port`).
pub fn service_of_port(name: &str) -> &str {
    name.rsplit_once(':').map_or(name, |(s, _)| s)
}

/// Which of the Services claiming one frontend (an external IP or a load balancer address
/// two Services share, with the same port) keeps it: the oldest (`creationTimestamp`), then
/// the first by `namespace/name`. The others keep their other frontends, and a problem says
/// what they lost; when the holder goes, the next one takes the frontend over.
pub type Rank = (Option<i128>, String);

pub fn rank_of(svc: &Service, id: &str) -> Rank {
    (
        svc.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_nanosecond()),
        id.to_string(),
    )
}

/// Every Service's frontends, claimed, by `namespace/name`.
pub type Claims = BTreeMap<String, (Rank, Desired)>;

/// The frontends each Service claims, and who holds each: turns one Service's rebuilt model
/// into map changes, so that a watch event costs what its Service costs, not what the cluster
/// does.
#[derive(Debug, Default)]
pub struct ByService {
    claims: Claims,
    holders: BTreeMap<Frontend, BTreeSet<Rank>>,
}

impl ByService {
    pub fn new(claims: Claims) -> Self {
        let mut by = ByService::default();
        for (service, (rank, d)) in claims {
            by.claim(&service, rank, d);
        }
        by
    }

    fn claim(&mut self, service: &str, rank: Rank, d: Desired) {
        for fe in d.keys() {
            self.holders.entry(*fe).or_default().insert(rank.clone());
        }
        self.claims.insert(service.to_string(), (rank, d));
    }

    /// What the maps hold for `fe`: the spec of its oldest claimant.
    fn held(&self, fe: &Frontend) -> Option<&ServiceSpec> {
        let (_, holder) = self.holders.get(fe)?.first()?;
        self.claims.get(holder)?.1.get(fe)
    }

    /// Replaces `service`'s claims with `new` (None: the Service is gone or skipped); returns
    /// the frontends to write (new or different, a frontend passed on to the next claimant
    /// included), those to remove, and those `service` claims that an older Service holds.
    pub fn replace(
        &mut self,
        service: &str,
        new: Option<(Rank, Desired)>,
    ) -> (Desired, Vec<Frontend>, Vec<(Frontend, String)>) {
        let mut touched: BTreeSet<Frontend> = BTreeSet::new();
        for (_, d) in self.claims.get(service).into_iter().chain(new.iter()) {
            touched.extend(d.keys().copied());
        }
        let before: BTreeMap<Frontend, Option<ServiceSpec>> = touched
            .iter()
            .map(|fe| (*fe, self.held(fe).cloned()))
            .collect();
        if let Some((rank, d)) = self.claims.remove(service) {
            for fe in d.keys() {
                if let Some(h) = self.holders.get_mut(fe) {
                    h.remove(&rank);
                    if h.is_empty() {
                        self.holders.remove(fe);
                    }
                }
            }
        }
        if let Some((rank, d)) = new {
            self.claim(service, rank, d);
        }
        let (mut changed, mut removed, mut lost) = (Desired::new(), Vec::new(), Vec::new());
        for (fe, was) in before {
            match (was, self.held(&fe)) {
                (Some(_), None) => removed.push(fe),
                (was, Some(now)) if was.as_ref() != Some(now) => {
                    changed.insert(fe, now.clone());
                }
                _ => {}
            }
            if let Some((_, holder)) = self.holders.get(&fe).and_then(|h| h.first()) {
                let mine = self
                    .claims
                    .get(service)
                    .is_some_and(|(_, d)| d.contains_key(&fe));
                if mine && holder != service {
                    lost.push((fe, holder.clone()));
                }
            }
        }
        (changed, removed, lost)
    }
}

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

#[derive(Deserialize)]
struct Kind {
    kind: Option<String>,
}

/// Parses a multi-document YAML stream of Services, EndpointSlices and Nodes, and reports a
/// stream that is not YAML as a problem (see [`parse_stream`]).
pub fn parse_yaml(text: &str) -> (Objects, Vec<Problem>) {
    match parse_stream(text) {
        Ok(r) => r,
        Err(p) => (Objects::default(), vec![p]),
    }
}

/// Parses a multi-document YAML stream of Services, EndpointSlices, Nodes and Pods. Other kinds are
/// ignored; an object that does not deserialize is a problem, not a failure of the whole
/// stream. A stream that is not YAML is an error: what follows the error cannot be read, so
/// the stream says nothing reliable about the objects, and nothing of it must be applied (it
/// would remove every service after the error).
pub fn parse_stream(text: &str) -> Result<(Objects, Vec<Problem>), Problem> {
    let mut objs = Objects::default();
    let mut problems = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                return Err(Problem {
                    object: format!("document {}", i + 1),
                    message: format!("not YAML: {e}"),
                })
            }
        };
        let kind = serde_yaml::from_value::<Kind>(value.clone())
            .ok()
            .and_then(|k| k.kind);
        let res = match kind.as_deref() {
            Some("Service") => {
                serde_yaml::from_value::<Service>(value).map(|s| objs.services.push(Arc::new(s)))
            }
            Some("EndpointSlice") => serde_yaml::from_value::<EndpointSlice>(value)
                .map(|s| objs.slices.push(Arc::new(s))),
            Some("Node") => serde_yaml::from_value(value).map(|n| objs.nodes.push(Arc::new(n))),
            Some("Pod") => serde_yaml::from_value(value).map(|p| objs.pods.push(Arc::new(p))),
            _ => Ok(()),
        };
        if let Err(e) = res {
            problems.push(Problem {
                object: format!("document {} ({})", i + 1, kind.unwrap_or_default()),
                message: e.to_string(),
            });
        }
    }
    Ok((objs, problems))
}

fn proto(p: Option<&String>) -> Result<u8, String> {
    match p.map(String::as_str).unwrap_or("TCP") {
        "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        "SCTP" => Ok(PROTO_SCTP),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

/// Label that hands a Service (or its EndpointSlices) to another proxy: kube-proxy ignores
/// every object that carries it, and so does weir.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on the objects of headless services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

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

fn labelled(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(key))
}

/// One endpoint of one service port, as kube-proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ep {
    addr: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    zone_hints: Vec<String>,
    node_hints: Vec<String>,
}

/// Where the topology hints send this node's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
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
fn topology(eps: &[Ep], node: &NodeContext) -> Topology {
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

fn available(e: &Ep, t: Topology, node: &NodeContext) -> bool {
    match t {
        Topology::Any => true,
        Topology::Node => node.name.as_ref().is_some_and(|n| e.node_hints.contains(n)),
        Topology::Zone => node.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z)),
    }
}

/// The endpoints of one service port, split the way kube-proxy's `CategorizeEndpoints` does.
#[derive(Debug, Default, PartialEq, Eq)]
struct Categorized {
    /// For `Cluster` traffic policy: ready endpoints allowed by topology, or, when there is
    /// no ready endpoint anywhere, the serving terminating ones.
    cluster: Vec<SocketAddr>,
    /// For `Local` policy: this node's ready endpoints, else its serving terminating ones.
    local: Vec<SocketAddr>,
    /// Whether any endpoint anywhere could take traffic: decides drop against reject.
    any: bool,
}

fn categorize(eps: &[Ep], uses_cluster: bool, uses_local: bool, node: &NodeContext) -> Categorized {
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

/// Builds the desired frontends from the objects, for the node described by `node`.
///
/// Follows kube-proxy: ClusterIP, NodePort (on the node's primary IPs), LoadBalancer ingress
/// IPs and externalIPs; endpoint conditions with the fallback to serving terminating endpoints;
/// internal and external traffic policy; topology hints. An object with a problem is reported
/// and skipped; the rest is built.
pub fn build(objs: &Objects, node: &NodeContext) -> Model {
    let mut m = Model::default();
    // EndpointSlices by (namespace, service name).
    let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in &objs.slices {
        if labelled(&s.metadata, SERVICE_PROXY_NAME_LABEL) || labelled(&s.metadata, HEADLESS_LABEL)
        {
            continue;
        }
        let ns = s
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        slices.entry((ns, svc.clone())).or_default().push(s);
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
    slices: &BTreeMap<(String, String), Vec<&EndpointSlice>>,
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

/// The endpoints of the slices of the service's family whose port matches by name and
/// protocol (an unnamed service port matches the slice's unnamed port). Like kube-proxy, only
/// an endpoint's first address counts, and an endpoint in two slices counts once.
fn endpoints_for(
    slices: &[&EndpointSlice],
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
                local: node.name.is_some() && ep.node_name == node.name,
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

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo, annotations: {weir.dev/lb-algorithm: maglev}}
spec:
  clusterIP: 198.19.0.10
  clusterIPs: [198.19.0.10, "fd00:19::10"]
  ports: [{name: http, port: 80, targetPort: web}, {name: dns, port: 53, protocol: UDP}]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [198.18.1.11]
  conditions: {ready: true}
- addresses: [198.18.1.12]
  conditions: {ready: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- addresses: ["fd00:18::11"]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: demo}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: demo}
spec: {clusterIP: 198.19.0.99, ports: [{port: 80, protocol: ICMP}, {name: ok, port: 81}]}
"#;

    #[test]
    fn builds_frontends_per_ip_and_port() {
        let (objs, problems) = parse_yaml(YAML);
        assert!(problems.is_empty(), "{problems:?}");
        let m = build(&objs, &NodeContext::default());
        let web4 = Frontend {
            ip: "198.19.0.10".parse().unwrap(),
            port: 80,
            proto: PROTO_TCP,
            scope: weir_common::SCOPE_ALL,
        };
        let spec = &m.desired[&web4];
        assert_eq!(spec.name, "demo/web:http");
        assert_eq!(
            spec.backends,
            vec!["198.18.1.11:8080".parse().unwrap()],
            "not-ready endpoint excluded"
        );
        assert!(spec.maglev);
        assert_eq!(spec.affinity_timeout_s, Some(30));
        let web6 = Frontend {
            ip: "fd00:19::10".parse().unwrap(),
            port: 80,
            proto: PROTO_TCP,
            scope: weir_common::SCOPE_ALL,
        };
        assert_eq!(
            m.desired[&web6].backends,
            vec!["[fd00:18::11]:8080".parse().unwrap()]
        );
        let dns4 = Frontend {
            ip: "198.19.0.10".parse().unwrap(),
            port: 53,
            proto: PROTO_UDP,
            scope: weir_common::SCOPE_ALL,
        };
        assert_eq!(
            m.desired[&dns4].backends,
            vec!["198.18.1.11:5353".parse().unwrap()]
        );
        let dns6 = Frontend {
            ip: "fd00:19::10".parse().unwrap(),
            port: 53,
            proto: PROTO_UDP,
            scope: weir_common::SCOPE_ALL,
        };
        assert!(
            m.desired[&dns6].backends.is_empty(),
            "no v6 slice port named dns: no endpoints"
        );
    }

    #[test]
    fn bad_and_headless_services_are_reported_not_fatal() {
        let (objs, _) = parse_yaml(YAML);
        let m = build(&objs, &NodeContext::default());
        assert_eq!(
            m.skipped,
            vec![Skipped {
                service: "demo/headless".into(),
                reason: "headless (clusterIP None)".into()
            }]
        );
        assert_eq!(m.problems.len(), 1);
        assert!(
            m.problems[0]
                .to_string()
                .contains("demo/broken port 80: unknown protocol \"ICMP\""),
            "{}",
            m.problems[0]
        );
        let reports = m.reports(&[]);
        let state = |svc: &str| {
            let r = reports.iter().find(|r| r.service == svc).unwrap();
            (r.state.as_str(), r.frontends.len(), r.problems.clone())
        };
        assert_eq!(
            state("demo/headless"),
            (
                "not programmed",
                0,
                vec!["headless (clusterIP None)".to_string()]
            )
        );
        assert_eq!(
            state("demo/broken"),
            (
                "partly programmed",
                1,
                vec!["Service demo/broken port 80: unknown protocol \"ICMP\"".to_string()]
            )
        );
        assert_eq!(state("demo/web"), ("programmed", 4, vec![]));
        let failed = [("demo/web:http".to_string(), "map full".to_string())];
        assert_eq!(m.reports(&failed)[2].state, "partly programmed");
        let ok = Frontend {
            ip: "198.19.0.99".parse().unwrap(),
            port: 81,
            proto: PROTO_TCP,
            scope: weir_common::SCOPE_ALL,
        };
        assert!(
            m.desired.contains_key(&ok),
            "the good port of the broken service is still programmed"
        );
    }

    /// An endpoint for the table: "ip" with conditions R(eady), S(erving), T(erminating) as
    /// letters present, on `node`, with zone and node hints.
    fn ep(ip: &str, cond: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Ep {
        Ep {
            addr: SocketAddr::new(ip.parse().unwrap(), 80),
            ready: cond.contains('R'),
            serving: cond.contains('S'),
            terminating: cond.contains('T'),
            local: node == "node-a",
            zone_hints: zones.iter().map(|z| z.to_string()).collect(),
            node_hints: nodes.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn addrs(v: &[&str]) -> Vec<SocketAddr> {
        v.iter()
            .map(|ip| SocketAddr::new(ip.parse().unwrap(), 80))
            .collect()
    }

    /// kube-proxy's `TestCategorizeEndpoints` (pkg/proxy/topology_test.go), case by case where
    /// weir has the same inputs: this node is `node-a` in zone `zone-a`.
    #[test]
    fn categorize_follows_kube_proxy() {
        struct Case {
            name: &'static str,
            eps: Vec<Ep>,
            uses_cluster: bool,
            uses_local: bool,
            zone: Option<&'static str>,
            cluster: &'static [&'static str],
            local: &'static [&'static str],
            any: bool,
        }
        let z = |ip: &str, zone: &'static str| ep(ip, "RS", "node-x", &[zone], &[]);
        let cases = vec![
            Case {
                name: "hints used: only the endpoints hinted for this zone",
                eps: vec![
                    z("10.1.2.3", "zone-a"),
                    z("10.1.2.4", "zone-b"),
                    z("10.1.2.5", "zone-c"),
                    z("10.1.2.6", "zone-a"),
                ],
                uses_cluster: true,
                uses_local: false,
                zone: Some("zone-a"),
                cluster: &["10.1.2.3", "10.1.2.6"],
                local: &[],
                any: true,
            },
            Case {
                name: "hints ignored when the node has no zone label",
                eps: vec![z("10.1.2.3", "zone-a"), z("10.1.2.4", "zone-b")],
                uses_cluster: true,
                uses_local: false,
                zone: None,
                cluster: &["10.1.2.3", "10.1.2.4"],
                local: &[],
                any: true,
            },
            Case {
                name: "hints ignored when no endpoint is hinted for this zone",
                eps: vec![z("10.1.2.3", "zone-b"), z("10.1.2.4", "zone-c")],
                uses_cluster: true,
                uses_local: false,
                zone: Some("zone-a"),
                cluster: &["10.1.2.3", "10.1.2.4"],
                local: &[],
                any: true,
            },
            Case {
                name: "hints ignored when one ready endpoint has none",
                eps: vec![
                    z("10.1.2.3", "zone-a"),
                    ep("10.1.2.4", "RS", "node-x", &[], &[]),
                ],
                uses_cluster: true,
                uses_local: false,
                zone: Some("zone-a"),
                cluster: &["10.1.2.3", "10.1.2.4"],
                local: &[],
                any: true,
            },
            Case {
                name: "a not-ready endpoint without hints does not turn hints off",
                eps: vec![
                    z("10.1.2.3", "zone-a"),
                    z("10.1.2.4", "zone-b"),
                    ep("10.1.2.5", "", "node-x", &[], &[]),
                ],
                uses_cluster: true,
                uses_local: false,
                zone: Some("zone-a"),
                cluster: &["10.1.2.3"],
                local: &[],
                any: true,
            },
            Case {
                name: "an endpoint hinted for several zones counts for each",
                eps: vec![
                    ep("10.1.2.3", "RS", "node-x", &["zone-a", "zone-b"], &[]),
                    z("10.1.2.4", "zone-b"),
                    z("10.1.2.5", "zone-c"),
                ],
                uses_cluster: true,
                uses_local: false,
                zone: Some("zone-a"),
                cluster: &["10.1.2.3"],
                local: &[],
                any: true,
            },
            Case {
                name: "node hints (PreferSameNode) win over zone hints",
                eps: vec![
                    ep("10.1.2.3", "RS", "node-a", &["zone-a"], &["node-a"]),
                    ep("10.1.2.4", "RS", "node-b", &["zone-a"], &["node-b"]),
                ],
                uses_cluster: true,
                uses_local: false,
                zone: Some("zone-a"),
                cluster: &["10.1.2.3"],
                local: &[],
                any: true,
            },
            Case {
                name: "node hints for other nodes only fall back to zone hints",
                eps: vec![
                    ep("10.1.2.3", "RS", "node-b", &["zone-a"], &["node-b"]),
                    ep("10.1.2.4", "RS", "node-c", &["zone-b"], &["node-c"]),
                ],
                uses_cluster: true,
                uses_local: false,
                zone: Some("zone-a"),
                cluster: &["10.1.2.3"],
                local: &[],
                any: true,
            },
            Case {
                name: "internalTrafficPolicy Local: topology is not applied to local endpoints",
                eps: vec![
                    ep("10.0.0.0", "RS", "node-a", &["zone-b"], &[]),
                    ep("10.0.0.1", "RS", "node-x", &["zone-a"], &[]),
                ],
                uses_cluster: false,
                uses_local: true,
                zone: Some("zone-a"),
                cluster: &[],
                local: &["10.0.0.0"],
                any: true,
            },
            Case {
                name: "Local with no local endpoint: none, but endpoints exist (drop, not reject)",
                eps: vec![ep("10.0.0.1", "RS", "node-x", &[], &[])],
                uses_cluster: false,
                uses_local: true,
                zone: None,
                cluster: &[],
                local: &[],
                any: true,
            },
            Case {
                name: "Local with no endpoint at all",
                eps: vec![],
                uses_cluster: false,
                uses_local: true,
                zone: None,
                cluster: &[],
                local: &[],
                any: false,
            },
            Case {
                name: "Cluster: no ready endpoint, fall back to serving terminating ones",
                eps: vec![
                    ep("10.0.0.0", "ST", "node-a", &[], &[]),
                    ep("10.0.0.1", "ST", "node-x", &[], &[]),
                    ep("10.0.0.2", "T", "node-x", &[], &[]),
                ],
                uses_cluster: true,
                uses_local: false,
                zone: None,
                cluster: &["10.0.0.0", "10.0.0.1"],
                local: &[],
                any: true,
            },
            Case {
                name: "Cluster: ready endpoints win over serving terminating ones",
                eps: vec![
                    ep("10.0.0.0", "RS", "node-x", &[], &[]),
                    ep("10.0.0.1", "ST", "node-x", &[], &[]),
                ],
                uses_cluster: true,
                uses_local: false,
                zone: None,
                cluster: &["10.0.0.0"],
                local: &[],
                any: true,
            },
            Case {
                name: "Cluster: only terminating, none serving: nothing (reject)",
                eps: vec![ep("10.0.0.0", "T", "node-x", &[], &[])],
                uses_cluster: true,
                uses_local: false,
                zone: None,
                cluster: &[],
                local: &[],
                any: false,
            },
            Case {
                name: "Local: local terminating endpoints serve while remote ready ones exist",
                eps: vec![
                    ep("10.0.0.0", "ST", "node-a", &[], &[]),
                    ep("10.0.0.1", "RS", "node-x", &[], &[]),
                ],
                uses_cluster: true,
                uses_local: true,
                zone: None,
                cluster: &["10.0.0.1"],
                local: &["10.0.0.0"],
                any: true,
            },
            Case {
                name: "Local: local ready endpoints win over local terminating ones",
                eps: vec![
                    ep("10.0.0.0", "ST", "node-a", &[], &[]),
                    ep("10.0.0.1", "RS", "node-a", &[], &[]),
                ],
                uses_cluster: false,
                uses_local: true,
                zone: None,
                cluster: &[],
                local: &["10.0.0.1"],
                any: true,
            },
            Case {
                name: "Local: terminating but not serving does not count anywhere",
                eps: vec![ep("10.0.0.0", "T", "node-a", &[], &[])],
                uses_cluster: false,
                uses_local: true,
                zone: None,
                cluster: &[],
                local: &[],
                any: false,
            },
        ];
        for c in cases {
            let node = NodeContext {
                name: Some("node-a".into()),
                zone: c.zone.map(String::from),
                ..Default::default()
            };
            let got = categorize(&c.eps, c.uses_cluster, c.uses_local, &node);
            assert_eq!(got.cluster, addrs(c.cluster), "{}: cluster", c.name);
            assert_eq!(got.local, addrs(c.local), "{}: local", c.name);
            assert_eq!(got.any, c.any, "{}: any", c.name);
        }
    }

    const KINDS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
status:
  addresses:
  - {type: Hostname, address: node-a}
  - {type: InternalIP, address: 198.18.0.2}
  - {type: InternalIP, address: 198.18.0.3}
  - {type: InternalIP, address: "fd00:18::2"}
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.20
  externalIPs: [198.18.9.1, "fd00:18::9"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 198.18.9.2}, {ip: 198.18.9.3, ipMode: Proxy}, {hostname: lb.example}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: demo, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [198.18.1.1], nodeName: node-a}
- {addresses: [198.18.1.2, 198.18.1.99], nodeName: node-b}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-2, namespace: demo, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: http, port: 9090}]
endpoints:
- {addresses: [198.18.1.3], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: demo}
spec:
  type: NodePort
  clusterIP: 198.19.0.21
  clusterIPs: [198.19.0.21, "fd00:19::21"]
  internalTrafficPolicy: Local
  ports: [{port: 53, protocol: UDP, nodePort: 30053}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-1, namespace: demo, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
ports: [{port: 5353, protocol: UDP}]
endpoints:
- {addresses: [198.18.1.4], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: demo, labels: {service.kubernetes.io/service-proxy-name: someone-else}}
spec: {clusterIP: 198.19.0.22, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: demo}
spec: {type: ExternalName, externalName: example.org}
---
apiVersion: v1
kind: Service
metadata: {name: hl, namespace: demo, labels: {service.kubernetes.io/headless: ""}}
spec: {clusterIP: 198.19.0.23, ports: [{port: 80}]}
"#;

    fn fe4(ip: &str, port: u16, proto: u8) -> Frontend {
        Frontend::new(ip.parse().unwrap(), port, proto)
    }

    fn sa(v: &[&str]) -> Vec<SocketAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_local_policy_health_check_counts_this_nodes_ready_endpoints() {
        let (objs, _) = parse_yaml(KINDS);
        let m = build(&objs, &NodeContext::of(&objs, Some("node-a")));
        assert_eq!(
            m.health_checks,
            BTreeMap::from([(32000, ("demo/lb".to_string(), 1))])
        );
        // Another node has none of them: 0, which the server answers with 503.
        let m = build(&objs, &NodeContext::of(&objs, Some("node-z")));
        assert_eq!(m.health_checks[&32000].1, 0);
    }

    #[test]
    fn only_the_dns_services_cluster_ip_frontends_prefer_the_node() {
        let (objs, _) = parse_yaml(KINDS);
        let mut node = NodeContext::of(&objs, Some("node-a"));
        let m = build(&objs, &node);
        assert!(
            m.desired.values().all(|s| !s.node_local),
            "off unless asked"
        );
        node.node_local_service = Some("demo/lb".into());
        let m = build(&objs, &node);
        let local: Vec<String> = m
            .desired
            .iter()
            .filter(|(_, s)| s.node_local)
            .map(|(f, _)| f.to_string())
            .collect();
        // The cluster IP only: NodePorts, external and load balancer IPs keep their endpoints.
        assert!(!local.is_empty());
        assert!(
            local.iter().all(|f| f.starts_with("198.19.0.20:")),
            "{local:?}"
        );
    }

    #[test]
    fn every_frontend_kind_with_its_traffic_policy() {
        let (objs, problems) = parse_yaml(KINDS);
        assert!(problems.is_empty(), "{problems:?}");
        let node = NodeContext::of(&objs, Some("node-a"));
        assert_eq!(node.zone.as_deref(), Some("zone-a"));
        assert_eq!(
            node.nodeport_ips,
            vec![
                "198.18.0.2".parse::<IpAddr>().unwrap(),
                "fd00:18::2".parse().unwrap()
            ],
            "the first InternalIP of each family"
        );
        let m = build(&objs, &node);
        // Named target port: each slice has its own number; only the first address counts.
        let cluster = sa(&["198.18.1.1:8080", "198.18.1.2:8080", "198.18.1.3:9090"]);
        let local = sa(&["198.18.1.1:8080"]);
        assert_eq!(
            m.desired[&fe4("198.19.0.20", 80, PROTO_TCP)].backends,
            cluster,
            "ClusterIP"
        );
        // externalIP, load balancer IP and NodePort: everyone but external clients gets the
        // cluster's endpoints; external clients get this node's.
        for (ip, port) in [
            ("198.18.9.1", 80),
            ("198.18.9.2", 80),
            ("198.18.0.2", 30080),
        ] {
            let f = fe4(ip, port, PROTO_TCP);
            assert_eq!(m.desired[&f].backends, cluster, "{f}");
            assert_eq!(m.desired[&f.external()].backends, local, "{f} external");
        }
        assert!(
            !m.desired.contains_key(&fe4("198.18.9.3", 80, PROTO_TCP)),
            "ipMode Proxy: the load balancer delivers to the node, not to its IP"
        );
        assert!(
            !m.desired.contains_key(&fe4("198.18.0.3", 30080, PROTO_TCP)),
            "NodePorts on the primary address of each family only"
        );
        assert!(
            !m.desired
                .keys()
                .any(|f| f.ip == "fd00:18::9".parse::<IpAddr>().unwrap()),
            "an IPv6 externalIP of an IPv4-only service is not programmed"
        );
        assert!(
            m.problems
                .iter()
                .any(|p| p.to_string().contains("externalIP fd00:18::9 is IPv6")),
            "{:?}",
            m.problems
        );
        // internalTrafficPolicy Local, no local endpoint: ClusterIP drops; the NodePort
        // (external policy Cluster) still reaches the remote endpoint.
        let np = &m.desired[&fe4("198.19.0.21", 53, PROTO_UDP)];
        assert!(np.backends.is_empty() && np.drop_when_empty, "{np:?}");
        let np_port = &m.desired[&fe4("198.18.0.2", 30053, PROTO_UDP)];
        assert_eq!(np_port.backends, sa(&["198.18.1.4:5353"]));
        assert!(!m
            .desired
            .contains_key(&fe4("198.18.0.2", 30053, PROTO_UDP).external()));
        // Dual stack: the IPv6 side has no slice, so no endpoint anywhere: reject.
        let np6 = &m.desired[&fe4("fd00:19::21", 53, PROTO_UDP)];
        assert!(np6.backends.is_empty() && !np6.drop_when_empty, "{np6:?}");
        assert!(m.desired.contains_key(&fe4("fd00:18::2", 30053, PROTO_UDP)));
        // Skipped the way kube-proxy skips them.
        let mut skipped: Vec<(&str, &str)> = m
            .skipped
            .iter()
            .map(|s| (s.service.as_str(), s.reason.as_str()))
            .collect();
        skipped.sort();
        assert_eq!(
            skipped,
            vec![
                ("demo/ext", "ExternalName"),
                ("demo/hl", "labelled service.kubernetes.io/headless"),
                (
                    "demo/other",
                    "labelled service.kubernetes.io/service-proxy-name (another proxy's)"
                ),
            ]
        );
    }

    #[test]
    fn a_bad_endpoint_is_reported_and_the_rest_programmed() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 198.19.0.30, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: ["fd00:18::1"]}
- {addresses: [not-an-ip]}
- {addresses: [198.18.1.5]}
"#;
        let (objs, _) = parse_yaml(yaml);
        let m = build(&objs, &NodeContext::default());
        assert_eq!(
            m.desired[&fe4("198.19.0.30", 80, PROTO_TCP)].backends,
            sa(&["198.18.1.5:8080"])
        );
        assert_eq!(m.problems.len(), 2, "{:?}", m.problems);
        assert!(
            m.problems[0].to_string().starts_with(
                "EndpointSlice web-1 of Service demo/web: endpoint address \"fd00:18::1\""
            ),
            "{}",
            m.problems[0]
        );
    }

    /// Two Services with one external IP and port: `demo/b` was created first and keeps
    /// it, whatever order the objects come in; `demo/a` keeps its ClusterIP and reports the
    /// loss.
    const SHARED: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: demo, creationTimestamp: "2026-01-02T00:00:00Z"}
spec: {clusterIP: 198.19.0.1, externalIPs: [198.18.9.9], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: demo, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {clusterIP: 198.19.0.2, externalIPs: [198.18.9.9], ports: [{port: 80}]}
"#;

    #[test]
    fn a_frontend_two_services_claim_is_the_older_ones() {
        let shared = fe4("198.18.9.9", 80, PROTO_TCP);
        let (objs, _) = parse_yaml(SHARED);
        let mut reversed = objs.clone();
        reversed.services.reverse();
        for objs in [objs, reversed] {
            let m = build(&objs, &NodeContext::default());
            assert_eq!(m.desired[&shared].name, "demo/b:80");
            assert!(m.desired.contains_key(&fe4("198.19.0.1", 80, PROTO_TCP)));
            assert_eq!(
                m.problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>(),
                ["Service demo/a: 198.18.9.9:80/TCP is also a frontend of Service demo/b, which is older and keeps it"]
            );
            let r = m.reports(&[]);
            assert_eq!(r[0].state, "partly programmed", "{r:?}");
            assert_eq!(r[1].state, "programmed", "{r:?}");
        }
    }

    /// Incrementally: the holder's removal hands the frontend to the next claimant (written,
    /// not removed); the last claimant's removal removes it; a newer claimant changes nothing.
    #[test]
    fn a_shared_frontend_passes_to_the_next_claimant() {
        let shared = fe4("198.18.9.9", 80, PROTO_TCP);
        let (objs, _) = parse_yaml(SHARED);
        let m = build(&objs, &NodeContext::default());
        let mut by = ByService::new(m.claims.clone());
        let (a, b) = (m.claims["demo/a"].clone(), m.claims["demo/b"].clone());
        // demo/a again, unchanged: nothing to write, its loss reported.
        let (changed, removed, lost) = by.replace("demo/a", Some(a.clone()));
        assert!(changed.is_empty() && removed.is_empty());
        assert_eq!(lost, [(shared, "demo/b".to_string())]);
        // demo/b goes: the frontend is demo/a's now.
        let (changed, removed, lost) = by.replace("demo/b", None);
        assert_eq!(changed[&shared].name, "demo/a:80");
        assert_eq!(removed, [fe4("198.19.0.2", 80, PROTO_TCP)]);
        assert!(lost.is_empty());
        // demo/b is back: older, it takes the frontend again.
        let (changed, removed, lost) = by.replace("demo/b", Some(b));
        assert_eq!(changed[&shared].name, "demo/b:80");
        assert!(removed.is_empty() && lost.is_empty());
        // Both gone: removed once the last claimant goes.
        let (_, removed, _) = by.replace("demo/b", None);
        assert!(!removed.contains(&shared));
        let (_, removed, _) = by.replace("demo/a", None);
        assert!(removed.contains(&shared), "{removed:?}");
    }

    #[test]
    fn unparsable_document_is_a_problem() {
        let (objs, problems) =
            parse_yaml("kind: Service\nmetadata: {name: x}\nspec: {ports: oops}\n");
        assert!(objs.services.is_empty());
        assert_eq!(problems.len(), 1);
        assert!(problems[0].object.contains("Service"), "{:?}", problems[0]);
    }
}
