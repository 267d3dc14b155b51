use super::endpoints::{categorize, Ep};
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
fn unparsable_document_is_a_problem_named_from_its_metadata() {
    let (objs, problems) = parse_yaml(
        "kind: Service\nmetadata: {name: x}\nspec: {ports: oops}\n\
         ---\nkind: EndpointSlice\nmetadata: {name: x-1, namespace: demo, labels: {kubernetes.io/service-name: x}}\n\
         addressType: IPv4\nendpoints: oops\n\
         ---\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: oops}\n\
         ---\nkind: Service\nmetadata: oops\n\
         ---\nkind: Service\nmetadata: {name: ok, namespace: demo}\nspec: {clusterIP: 198.19.0.9, ports: [{port: 80}]}\n",
    );
    assert_eq!(objs.services.len(), 1, "the readable one");
    let named: Vec<&str> = problems.iter().map(|p| p.object.as_str()).collect();
    assert_eq!(
        named,
        [
            "Service default/x",
            "EndpointSlice demo/x-1 of Service demo/x",
            "Node n1",
            "document 4 (Service)"
        ]
    );
    assert!(
        problems[0].message.starts_with("document 1: "),
        "{:?}",
        problems[0]
    );
    // Shown with their Service (not programmed), or alone.
    let mut reports = vec![];
    crate::model::add_unread(&mut reports, &problems);
    let states: Vec<(&str, &str)> = reports
        .iter()
        .map(|r| (r.service.as_str(), r.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("Node n1", "not read"),
            ("default/x", "not programmed"),
            ("demo/x", "not programmed"),
            ("document 4 (Service)", "not read")
        ]
    );
}

#[test]
fn a_node_being_deleted_is_not_eligible() {
    let yaml = |extra: &str| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: n1{extra}}}\n");
    let (objs, _) = parse_yaml(&yaml(""));
    assert!(node_eligible(&objs, "n1"));
    let (objs, _) = parse_yaml(&yaml(", deletionTimestamp: \"2026-11-25T00:00:00Z\""));
    assert!(!node_eligible(&objs, "n1"));
    let (objs, _) = parse_yaml(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}\n",
        );
    assert!(!node_eligible(&objs, "n1"));
}
