//! The Kubernetes DNS specification (schema 1.1.0), one test per rule, in process: each query
//! is a wire message through `Handler::respond`, each answer decoded from the wire.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::IpAddr;

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};

use crate::{
    server::{Handler, Reply},
    zone::{Config, Endpoint, Kind, Pod, PodMode, Port, Service, Zone},
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn port(name: &str, protocol: &str, port: u16) -> Port {
    Port {
        name: name.into(),
        protocol: protocol.into(),
        port,
    }
}

fn ep(ips: &[&str], hostname: Option<&str>, ready: bool) -> Endpoint {
    Endpoint {
        ips: ips.iter().map(|i| ip(i)).collect(),
        hostname: hostname.map(Into::into),
        ready,
        ports: vec![],
    }
}

/// The cluster every rule is checked against.
fn services() -> Vec<Service> {
    vec![
        Service {
            namespace: "default".into(),
            name: "kubernetes".into(),
            kind: Kind::ClusterIp(vec![ip("198.19.0.1"), ip("fd00:19::1")]),
            ports: vec![port("https", "TCP", 443), port("", "TCP", 8443)],
        },
        Service {
            namespace: "default".into(),
            name: "headless".into(),
            kind: Kind::Headless(vec![
                ep(&["198.18.1.11"], Some("my-pet"), true),
                ep(&["198.18.1.12"], None, true),
                ep(&["198.18.1.13"], Some("not-ready"), false),
                ep(&["fd00:18::e"], Some("six"), true),
            ]),
            ports: vec![port("http", "TCP", 8080), port("dns", "UDP", 5353)],
        },
        Service {
            namespace: "default".into(),
            name: "empty".into(),
            kind: Kind::Headless(vec![ep(&["198.18.1.20"], None, false)]),
            ports: vec![],
        },
        Service {
            namespace: "default".into(),
            name: "foo".into(),
            kind: Kind::ExternalName("www.example.com".into()),
            ports: vec![],
        },
        Service {
            namespace: "default".into(),
            name: "alias".into(),
            kind: Kind::ExternalName("kubernetes.default.svc.cluster.local".into()),
            ports: vec![],
        },
    ]
}

/// The pods of the zone (read in `pods verified` mode only).
fn pods() -> Vec<Pod> {
    vec![
        Pod {
            namespace: "default".into(),
            ips: vec![ip("198.18.1.11"), ip("fd00:18::b")],
        },
        Pod {
            namespace: "Other".into(),
            ips: vec![ip("198.18.1.12")],
        },
    ]
}

fn handler(cfg: Config) -> Handler {
    let h = Handler::new(vec![]);
    h.set_zone(Zone::build_with_pods(cfg, &services(), &pods()));
    h
}

fn query_bytes(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(4242)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask_with(h: &Handler, name: &str, t: RecordType, edns: Option<u16>, udp: bool) -> Message {
    match h.respond(&query_bytes(name, t, edns), udp) {
        Reply::Message(m) => Message::from_vec(&m).unwrap(),
        Reply::Forward(..) => panic!("{name} {t}: forwarded"),
        Reply::Chase(_) => panic!("{name} {t}: chased upstream"),
        Reply::Drop => panic!("{name} {t}: dropped"),
    }
}

fn ask(name: &str, t: RecordType) -> Message {
    ask_with(&handler(Config::default()), name, t, None, true)
}

/// The answer section as text: `name ttl type data`, sorted.
fn answers(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers()
        .iter()
        .map(|r| format!("{} {} {} {}", r.name(), r.ttl(), r.record_type(), r.data()))
        .collect();
    v.sort();
    v
}

fn assert_negative(m: &Message, rcode: ResponseCode) {
    assert_eq!(m.response_code(), rcode);
    assert!(m.answers().is_empty(), "{:?}", answers(m));
    let soa = m.name_servers();
    assert_eq!(soa.len(), 1, "one SOA in the authority section");
    assert_eq!(soa[0].record_type(), RecordType::SOA);
    assert_eq!(soa[0].name().to_string(), "cluster.local.");
}

#[test]
fn schema_version_is_a_txt_record() {
    let m = ask("dns-version.cluster.local.", RecordType::TXT);
    assert_eq!(answers(&m), ["dns-version.cluster.local. 5 TXT 1.1.0"]);
    assert!(m.authoritative());
}

#[test]
fn a_cluster_ip_service_has_an_a_record() {
    let m = ask("kubernetes.default.svc.cluster.local.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert_eq!(
        answers(&m),
        ["kubernetes.default.svc.cluster.local. 5 A 198.19.0.1"]
    );
}

#[test]
fn a_dual_stack_service_has_an_aaaa_record() {
    let m = ask("kubernetes.default.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(
        answers(&m),
        ["kubernetes.default.svc.cluster.local. 5 AAAA fd00:19::1"]
    );
}

#[test]
fn named_ports_have_srv_records_pointing_at_the_service() {
    let m = ask(
        "_https._tcp.kubernetes.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(
        answers(&m),
        ["_https._tcp.kubernetes.default.svc.cluster.local. 5 SRV 0 100 443 kubernetes.default.svc.cluster.local."]
    );
    // The additional section carries the target's addresses.
    let mut extra: Vec<String> = m
        .additionals()
        .iter()
        .map(|r| r.data().to_string())
        .collect();
    extra.sort();
    assert_eq!(extra, ["198.19.0.1", "fd00:19::1"]);
}

#[test]
fn unnamed_ports_have_no_srv_record() {
    // The service's other port (8443) is unnamed: it has no SRV name, and `_tcp` holds no SRV
    // of its own.
    let m = ask(
        "_._tcp.kubernetes.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_negative(&m, ResponseCode::NXDomain);
    let m = ask(
        "_tcp.kubernetes.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_negative(&m, ResponseCode::NoError);
}

#[test]
fn a_cluster_ip_has_a_ptr_record_in_both_families() {
    let m = ask("1.0.19.198.in-addr.arpa.", RecordType::PTR);
    assert_eq!(
        answers(&m),
        ["1.0.19.198.in-addr.arpa. 5 PTR kubernetes.default.svc.cluster.local."]
    );
    let v6: Name = Name::from(ip("fd00:19::1"));
    let m = ask(&v6.to_string(), RecordType::PTR);
    assert_eq!(m.answers().len(), 1);
    assert_eq!(
        m.answers()[0].data().to_string(),
        "kubernetes.default.svc.cluster.local."
    );
}

#[test]
fn a_headless_service_has_an_address_per_ready_endpoint() {
    let m = ask("headless.default.svc.cluster.local.", RecordType::A);
    assert_eq!(
        answers(&m),
        [
            "headless.default.svc.cluster.local. 5 A 198.18.1.11",
            "headless.default.svc.cluster.local. 5 A 198.18.1.12"
        ]
    );
    let m = ask("headless.default.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(
        answers(&m),
        ["headless.default.svc.cluster.local. 5 AAAA fd00:18::e"]
    );
}

#[test]
fn a_headless_endpoint_has_a_record_under_its_hostname() {
    let m = ask("my-pet.headless.default.svc.cluster.local.", RecordType::A);
    assert_eq!(
        answers(&m),
        ["my-pet.headless.default.svc.cluster.local. 5 A 198.18.1.11"]
    );
    // Without a hostname, the endpoint is named after its address.
    let m = ask(
        "198-18-1-12.headless.default.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(m.answers().len(), 1);
    // Not ready: no record.
    let m = ask(
        "not-ready.headless.default.svc.cluster.local.",
        RecordType::A,
    );
    assert_negative(&m, ResponseCode::NXDomain);
}

#[test]
fn a_headless_service_has_an_srv_record_per_ready_endpoint_and_named_port() {
    let m = ask(
        "_http._tcp.headless.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(
        answers(&m),
        [
            "_http._tcp.headless.default.svc.cluster.local. 5 SRV 0 100 8080 198-18-1-12.headless.default.svc.cluster.local.",
            "_http._tcp.headless.default.svc.cluster.local. 5 SRV 0 100 8080 my-pet.headless.default.svc.cluster.local.",
            "_http._tcp.headless.default.svc.cluster.local. 5 SRV 0 100 8080 six.headless.default.svc.cluster.local.",
        ]
    );
    let m = ask(
        "_dns._udp.headless.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(m.answers().len(), 3);
}

#[test]
fn a_headless_endpoint_has_a_ptr_record() {
    let m = ask("11.1.18.198.in-addr.arpa.", RecordType::PTR);
    assert_eq!(
        answers(&m),
        ["11.1.18.198.in-addr.arpa. 5 PTR my-pet.headless.default.svc.cluster.local."]
    );
}

#[test]
fn a_headless_service_without_ready_endpoints_is_nxdomain() {
    let m = ask("empty.default.svc.cluster.local.", RecordType::A);
    assert_negative(&m, ResponseCode::NXDomain);
}

#[test]
fn an_external_name_service_is_a_cname_followed_upstream() {
    let h = handler(Config::default());
    let m = ask("foo.default.svc.cluster.local.", RecordType::CNAME);
    assert_eq!(
        answers(&m),
        ["foo.default.svc.cluster.local. 5 CNAME www.example.com."]
    );
    // Asked for an address, the target's comes from upstream after the CNAME.
    for t in [RecordType::A, RecordType::AAAA] {
        let q = query_bytes("foo.default.svc.cluster.local.", t, None);
        assert!(matches!(h.respond(&q, true), Reply::Chase(_)), "{t}");
    }
}

#[test]
fn a_cname_into_the_zone_is_followed_in_the_answer() {
    let m = ask("alias.default.svc.cluster.local.", RecordType::A);
    assert_eq!(
        answers(&m),
        [
            "alias.default.svc.cluster.local. 5 CNAME kubernetes.default.svc.cluster.local.",
            "kubernetes.default.svc.cluster.local. 5 A 198.19.0.1"
        ]
    );
}

#[test]
fn pod_records_follow_the_pods_mode() {
    let m = ask("198-18-1-11.default.pod.cluster.local.", RecordType::A);
    assert_negative(&m, ResponseCode::NXDomain);
    let cfg = Config {
        pods: PodMode::Insecure,
        ..Config::default()
    };
    let h = handler(cfg);
    let m = ask_with(
        &h,
        "198-18-1-11.default.pod.cluster.local.",
        RecordType::A,
        None,
        true,
    );
    assert_eq!(
        answers(&m),
        ["198-18-1-11.default.pod.cluster.local. 5 A 198.18.1.11"]
    );
    let m = ask_with(
        &h,
        "fd00-18--b.default.pod.cluster.local.",
        RecordType::AAAA,
        None,
        true,
    );
    assert_eq!(
        answers(&m),
        ["fd00-18--b.default.pod.cluster.local. 5 AAAA fd00:18::b"]
    );
    let m = ask_with(
        &h,
        "not-an-ip.default.pod.cluster.local.",
        RecordType::A,
        None,
        true,
    );
    assert_negative(&m, ResponseCode::NXDomain);
}

#[test]
fn verified_pod_records_need_a_pod_of_that_namespace_with_that_address() {
    let cfg = Config {
        pods: PodMode::Verified,
        ..Config::default()
    };
    let h = handler(cfg);
    let q = |name: &str, t| ask_with(&h, name, t, None, true);
    assert_eq!(
        answers(&q("198-18-1-11.default.pod.cluster.local.", RecordType::A)),
        ["198-18-1-11.default.pod.cluster.local. 5 A 198.18.1.11"]
    );
    // Either spelling of an IPv6 address; namespaces compared without case.
    assert_eq!(
        answers(&q(
            "fd00-18-0-0-0-0-0-b.default.pod.cluster.local.",
            RecordType::AAAA
        )),
        ["fd00-18-0-0-0-0-0-b.default.pod.cluster.local. 5 AAAA fd00:18::b"]
    );
    assert_eq!(
        answers(&q("198-18-1-12.other.pod.cluster.local.", RecordType::A)),
        ["198-18-1-12.other.pod.cluster.local. 5 A 198.18.1.12"]
    );
    // A pod's address asked for with another type: the name exists.
    assert_negative(
        &q("198-18-1-11.default.pod.cluster.local.", RecordType::AAAA),
        ResponseCode::NoError,
    );
    // No pod of that namespace has it, or no pod at all: no such name (insecure mode answers
    // both).
    for name in [
        "198-18-1-12.default.pod.cluster.local.",
        "198-18-1-99.default.pod.cluster.local.",
    ] {
        assert_negative(&q(name, RecordType::A), ResponseCode::NXDomain);
    }
}

#[test]
fn names_are_compared_case_insensitively() {
    let m = ask("KuberNetes.DEFAULT.svc.Cluster.Local.", RecordType::A);
    assert_eq!(m.answers().len(), 1);
    assert_eq!(m.answers()[0].data().to_string(), "198.19.0.1");
}

#[test]
fn an_existing_name_without_the_type_asked_is_nodata_with_soa() {
    let m = ask("kubernetes.default.svc.cluster.local.", RecordType::MX);
    assert_negative(&m, ResponseCode::NoError);
    // Names that exist because names below them do: a namespace, `svc`.
    for n in ["default.svc.cluster.local.", "svc.cluster.local."] {
        let m = ask(n, RecordType::A);
        assert_negative(&m, ResponseCode::NoError);
    }
}

#[test]
fn a_missing_name_is_nxdomain_with_soa() {
    for n in [
        "nope.default.svc.cluster.local.",
        "kubernetes.nope.svc.cluster.local.",
        "web.default.cluster.local.",
    ] {
        let m = ask(n, RecordType::A);
        assert_negative(&m, ResponseCode::NXDomain);
        assert_eq!(m.name_servers()[0].ttl(), 5, "{n}");
    }
}

#[test]
fn the_ttl_is_configurable() {
    let h = handler(Config {
        ttl: 30,
        ..Config::default()
    });
    let m = ask_with(
        &h,
        "kubernetes.default.svc.cluster.local.",
        RecordType::A,
        None,
        true,
    );
    assert_eq!(m.answers()[0].ttl(), 30);
}

#[test]
fn the_cluster_domain_is_configurable() {
    let h = handler(Config {
        domain: Name::from_ascii("corp.internal.").unwrap(),
        ..Config::default()
    });
    let m = ask_with(
        &h,
        "kubernetes.default.svc.corp.internal.",
        RecordType::A,
        None,
        true,
    );
    assert_eq!(m.answers().len(), 1);
    assert!(matches!(
        h.respond(
            &query_bytes("kubernetes.default.svc.cluster.local.", RecordType::A, None),
            true
        ),
        Reply::Forward(..)
    ));
}

#[test]
fn servfail_until_the_first_sync() {
    let h = Handler::new(vec![]);
    assert!(!h.ready());
    let m = ask_with(
        &h,
        "kubernetes.default.svc.cluster.local.",
        RecordType::A,
        None,
        true,
    );
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    h.set_zone(Zone::build(Config::default(), &services()));
    let m = ask_with(
        &h,
        "kubernetes.default.svc.cluster.local.",
        RecordType::A,
        None,
        true,
    );
    assert_eq!(m.response_code(), ResponseCode::NoError);
}

#[test]
fn a_big_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let many = Service {
        namespace: "default".into(),
        name: "big".into(),
        kind: Kind::Headless(
            (1..=100)
                .map(|i| Endpoint {
                    ips: vec![format!("198.18.2.{i}").parse().unwrap()],
                    hostname: None,
                    ready: true,
                    ports: vec![],
                })
                .collect(),
        ),
        ports: vec![],
    };
    let h = Handler::new(vec![]);
    h.set_zone(Zone::build(Config::default(), &[many]));
    let name = "big.default.svc.cluster.local.";
    // 100 A records: about 1 700 bytes, over 512 and over the advertised 1 232.
    for edns in [None, Some(4096)] {
        let m = ask_with(&h, name, RecordType::A, edns, true);
        assert!(m.truncated(), "UDP, EDNS {edns:?}");
        assert!(m.answers().is_empty());
    }
    let m = ask_with(&h, name, RecordType::A, None, false);
    assert!(!m.truncated());
    assert_eq!(m.answers().len(), 100);
}

#[test]
fn edns_is_answered_with_edns() {
    let h = handler(Config::default());
    let m = ask_with(
        &h,
        "kubernetes.default.svc.cluster.local.",
        RecordType::A,
        Some(4096),
        true,
    );
    let e = m
        .extensions()
        .as_ref()
        .expect("an OPT record in the answer");
    assert_eq!(e.max_payload(), crate::server::MAX_UDP_PAYLOAD);
    let m = ask_with(
        &h,
        "kubernetes.default.svc.cluster.local.",
        RecordType::A,
        None,
        true,
    );
    assert!(m.extensions().is_none());
}

#[test]
fn names_outside_the_zone_are_forwarded() {
    let h = handler(Config::default());
    for n in [
        "example.org.",
        "cluster.local.example.org.",
        "1.2.0.192.in-addr.arpa.",
    ] {
        assert!(
            matches!(
                h.respond(&query_bytes(n, RecordType::A, None), true),
                Reply::Forward(..)
            ),
            "{n}"
        );
    }
}

#[test]
fn bad_queries_get_formerr_or_notimp() {
    let h = handler(Config::default());
    // A query's header, then garbage.
    let Reply::Message(m) = h.respond(&[0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff], true)
    else {
        panic!("no answer to a broken message")
    };
    let m = Message::from_vec(&m).unwrap();
    assert_eq!((m.id(), m.response_code()), (0x1234, ResponseCode::FormErr));
    let mut q = Message::from_vec(&query_bytes("example.org.", RecordType::A, None)).unwrap();
    q.set_op_code(OpCode::Status);
    let Reply::Message(m) = h.respond(&q.to_vec().unwrap(), true) else {
        panic!("no answer to a STATUS query")
    };
    assert_eq!(
        Message::from_vec(&m).unwrap().response_code(),
        ResponseCode::NotImp
    );
    // Less than a header, or a response: nothing (see `server::tests`).
    assert!(matches!(h.respond(&[1], true), Reply::Drop));
    assert!(matches!(h.respond(&[0x12, 0x34, 0xff], true), Reply::Drop));
}

#[test]
fn srv_data_points_at_names_of_the_zone() {
    // Every SRV target of the zone resolves to an address in the zone.
    let h = handler(Config::default());
    for n in [
        "_https._tcp.kubernetes.default.svc.cluster.local.",
        "_http._tcp.headless.default.svc.cluster.local.",
    ] {
        let m = ask_with(&h, n, RecordType::SRV, None, false);
        for r in m.answers() {
            let RData::SRV(srv) = r.data() else {
                panic!("not an SRV")
            };
            let target = srv.target().to_string();
            let a = ask_with(&h, &target, RecordType::A, None, false);
            let aaaa = ask_with(&h, &target, RecordType::AAAA, None, false);
            assert!(
                !a.answers().is_empty() || !aaaa.answers().is_empty(),
                "{target} has no address"
            );
        }
    }
}
