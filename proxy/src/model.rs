//! Kubernetes objects to desired frontends.
//!
//! This covers what the data-path issue needs: ClusterIP services (single and dual stack),
//! TCP/UDP ports, named and numeric target ports through EndpointSlices, ready endpoints,
//! session affinity ClientIP and weir's Maglev annotation. The full kube-proxy rule set
//! (NodePort, LoadBalancer, traffic policies, terminating endpoints, topology) is the
//! control-plane issue's work and extends this module.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;
use weir_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::program::{Desired, Frontend, ServiceSpec};

/// Annotation selecting the backend-selection algorithm of a service: `random` or `maglev`.
pub const LB_ALGORITHM_ANNOTATION: &str = "weir.dev/lb-algorithm";
/// kube-proxy's default ClientIP affinity timeout.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

#[derive(Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<k8s_openapi::api::core::v1::Node>,
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

#[derive(Debug, Default)]
pub struct Model {
    pub desired: Desired,
    pub problems: Vec<Problem>,
    pub skipped: Vec<Skipped>,
}

#[derive(Deserialize)]
struct Kind {
    kind: Option<String>,
}

/// Parses a multi-document YAML stream of Services and EndpointSlices. Other kinds are ignored;
/// a document that does not parse is a problem, not a failure of the whole file.
pub fn parse_yaml(text: &str) -> (Objects, Vec<Problem>) {
    let mut objs = Objects::default();
    let mut problems = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem {
                    object: format!("document {}", i + 1),
                    message: format!("not YAML: {e}"),
                });
                // The stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        let kind = serde_yaml::from_value::<Kind>(value.clone())
            .ok()
            .and_then(|k| k.kind);
        let res = match kind.as_deref() {
            Some("Service") => {
                serde_yaml::from_value::<Service>(value).map(|s| objs.services.push(s))
            }
            Some("EndpointSlice") => {
                serde_yaml::from_value::<EndpointSlice>(value).map(|s| objs.slices.push(s))
            }
            Some("Node") => serde_yaml::from_value(value).map(|n| objs.nodes.push(n)),
            _ => Ok(()),
        };
        if let Err(e) = res {
            problems.push(Problem {
                object: format!("document {} ({})", i + 1, kind.unwrap_or_default()),
                message: e.to_string(),
            });
        }
    }
    (objs, problems)
}

fn proto(p: Option<&String>) -> Result<u8, String> {
    match p.map(String::as_str).unwrap_or("TCP") {
        "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        "SCTP" => Ok(PROTO_SCTP),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

/// Builds the desired frontends from the objects.
pub fn build(objs: &Objects) -> Model {
    let mut m = Model::default();
    // EndpointSlices by (namespace, service name).
    let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in &objs.slices {
        let ns = s
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            continue;
        };
        slices.entry((ns, svc.clone())).or_default().push(s);
    }
    for svc in &objs.services {
        let ns = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = svc.metadata.name.clone().unwrap_or_default();
        let id = format!("{ns}/{name}");
        let Some(spec) = &svc.spec else {
            m.problems.push(Problem {
                object: format!("Service {id}"),
                message: "no spec".into(),
            });
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            m.skipped.push(Skipped {
                service: id,
                reason: "ExternalName".into(),
            });
            continue;
        }
        let ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.clone(),
            (_, Some(ip)) => vec![ip.clone()],
            _ => vec![],
        };
        if ips.is_empty() || ips.iter().any(|i| i == "None") {
            m.skipped.push(Skipped {
                service: id,
                reason: "headless (no ClusterIP)".into(),
            });
            continue;
        }
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
        for ip in &ips {
            let vip: IpAddr = match ip.parse() {
                Ok(v) => v,
                Err(_) => {
                    m.problems.push(Problem {
                        object: format!("Service {id}"),
                        message: format!("clusterIP {ip:?} is not an IP address"),
                    });
                    continue;
                }
            };
            for port in spec.ports.iter().flatten() {
                let pname = port.name.clone().unwrap_or_default();
                let object = format!(
                    "Service {id} port {}",
                    if pname.is_empty() {
                        port.port.to_string()
                    } else {
                        pname.clone()
                    }
                );
                let proto = match proto(port.protocol.as_ref()) {
                    Ok(p) => p,
                    Err(e) => {
                        m.problems.push(Problem { object, message: e });
                        continue;
                    }
                };
                let Ok(vport) = u16::try_from(port.port) else {
                    m.problems.push(Problem {
                        object,
                        message: format!("port {} is out of range", port.port),
                    });
                    continue;
                };
                if vport == 0 {
                    m.problems.push(Problem {
                        object,
                        message: "port 0".into(),
                    });
                    continue;
                }
                let backends = endpoints_for(&my_slices, vip.is_ipv4(), &pname, proto);
                let fe = Frontend {
                    ip: vip,
                    port: vport,
                    proto,
                };
                m.desired.insert(
                    fe,
                    ServiceSpec {
                        name: format!(
                            "{id}:{}",
                            if pname.is_empty() {
                                vport.to_string()
                            } else {
                                pname
                            }
                        ),
                        backends,
                        maglev,
                        affinity_timeout_s: affinity,
                    },
                );
            }
        }
    }
    m
}

/// Ready endpoints of the slices of the service's family whose port matches by name and
/// protocol (an unnamed service port matches the slice's unnamed port).
fn endpoints_for(
    slices: &[&EndpointSlice],
    v4: bool,
    port_name: &str,
    proto_num: u8,
) -> Vec<SocketAddr> {
    let family = if v4 { "IPv4" } else { "IPv6" };
    let mut out = Vec::new();
    for s in slices.iter().filter(|s| s.address_type == family) {
        let Some(port) = s.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && proto(p.protocol.as_ref()).ok() == Some(proto_num)
        }) else {
            continue;
        };
        let Some(pnum) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for ep in s.endpoints.iter().flatten() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for a in &ep.addresses {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    if ip.is_ipv4() == v4 {
                        out.push(SocketAddr::new(ip, pnum));
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
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
        let m = build(&objs);
        let web4 = Frontend {
            ip: "198.19.0.10".parse().unwrap(),
            port: 80,
            proto: PROTO_TCP,
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
        };
        assert_eq!(
            m.desired[&web6].backends,
            vec!["[fd00:18::11]:8080".parse().unwrap()]
        );
        let dns4 = Frontend {
            ip: "198.19.0.10".parse().unwrap(),
            port: 53,
            proto: PROTO_UDP,
        };
        assert_eq!(
            m.desired[&dns4].backends,
            vec!["198.18.1.11:5353".parse().unwrap()]
        );
        let dns6 = Frontend {
            ip: "fd00:19::10".parse().unwrap(),
            port: 53,
            proto: PROTO_UDP,
        };
        assert!(
            m.desired[&dns6].backends.is_empty(),
            "no v6 slice port named dns: no endpoints"
        );
    }

    #[test]
    fn bad_and_headless_services_are_reported_not_fatal() {
        let (objs, _) = parse_yaml(YAML);
        let m = build(&objs);
        assert_eq!(
            m.skipped,
            vec![Skipped {
                service: "demo/headless".into(),
                reason: "headless (no ClusterIP)".into()
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
        let ok = Frontend {
            ip: "198.19.0.99".parse().unwrap(),
            port: 81,
            proto: PROTO_TCP,
        };
        assert!(
            m.desired.contains_key(&ok),
            "the good port of the broken service is still programmed"
        );
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
