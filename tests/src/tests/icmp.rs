//! ICMP errors about translated flows, translated back: PMTU discovery through a NodePort, a
//! refused UDP port reported to the client, fixtures of each kind of error.

use etherparse::{
    icmpv4::DestUnreachableHeader, icmpv6::DestUnreachableCode, Icmpv4Type, Icmpv6Type,
    PacketBuilder,
};

use std::{thread, time::Duration};

use crate::{fixture::*, node::*, *};

/// A router on the nodes' network (behind the uplink).
const ROUTER4: &str = "198.18.0.254";
const ROUTER6: &str = "fd00:17::fe";

/// A harness with the fixtures' services and a TCP flow `cli:40000` → `vip:80` opened from a
/// pod (its SYN checked), for the ICMP fixtures.
fn clusterip_flow(cli: &str, vip: &str, be: &str) -> Harness {
    let mut h = Harness::new().unwrap();
    h.program(&services());
    expect(
        &mut h,
        &format!("{vip}: SYN"),
        (TC_FROM_POD, "lo"),
        tcp(cli, 40000, vip, 80, Tcp::Syn),
        (OK, tcp(cli, 40000, be, 8080, Tcp::Syn)),
        &["dnat_new"],
    );
    h
}

/// A harness with a NodePort `node:30080` served by `be` of this node and a flow from the
/// outside client `ext:40000` opened on the uplink (its SYN checked).
fn nodeport_flow(node: &str, ext: &str, be: &str) -> Harness {
    let mut h = Harness::new().unwrap();
    h.program(&nodeport(node, be));
    expect(
        &mut h,
        &format!("{node}: SYN"),
        (TC_FROM_NETDEV, UPLINK),
        tcp(ext, 40000, node, 30080, Tcp::Syn),
        (OK, tcp(ext, 40000, be, 8080, Tcp::Syn)),
        &["dnat_new"],
    );
    h
}

/// Runs the ICMP `error` through `prog` entering on `dev`: it passes (`OK`) as `translated`,
/// counted as `icmp_error_nat`.
fn expect_translated(
    h: &mut Harness,
    what: &str,
    (prog, dev): (&str, &str),
    error: Vec<u8>,
    translated: Vec<u8>,
) {
    expect(
        h,
        what,
        (prog, dev),
        error,
        (OK, translated),
        &["icmp_error_nat"],
    );
}

/// What an ICMP error in these fixtures says.
#[derive(Clone, Copy)]
enum Icmp {
    PortUnreachable,
    /// Fragmentation needed (ICMPv4), packet too big (ICMPv6): PMTU discovery.
    TooBig,
}

/// An ICMP error (ICMPv6 for an IPv6 `frame`) from `from` to `to`, quoting `frame`'s IP
/// packet with `l4` bytes of what follows its header (all of it when None).
fn icmp_error(from: &str, to: &str, kind: Icmp, frame: &[u8], l4: Option<usize>) -> Vec<u8> {
    let v6 = frame[12..14] == [0x86, 0xdd];
    let l4_off = if v6 {
        14 + 40
    } else {
        14 + ((frame[14] & 0x0f) as usize) * 4
    };
    let quote = &frame[14..l4.map_or(frame.len(), |n| l4_off + n)];
    let eth = PacketBuilder::ethernet2(POD_MAC, HOST_MAC);
    let mut v = Vec::new();
    if v6 {
        let a = |ip: &str| ip.parse::<std::net::Ipv6Addr>().unwrap().octets();
        eth.ipv6(a(from), a(to), 64)
            .icmpv6(match kind {
                Icmp::PortUnreachable => {
                    Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port)
                }
                Icmp::TooBig => Icmpv6Type::PacketTooBig { mtu: 1280 },
            })
            .write(&mut v, quote)
            .unwrap();
    } else {
        let a = |ip: &str| ip.parse::<std::net::Ipv4Addr>().unwrap().octets();
        eth.ipv4(a(from), a(to), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(match kind {
                Icmp::PortUnreachable => DestUnreachableHeader::Port,
                Icmp::TooBig => DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1280 },
            }))
            .write(&mut v, quote)
            .unwrap();
    }
    v
}

/// A router between the node and a ClusterIP's endpoint tells the client the path is too
/// narrow for a segment it sent: the error quotes the segment as the endpoint was to get it,
/// and reaches the client's socket only with the service's address and port in their place
/// (as Linux conntrack translates it for kube-proxy). The router keeps its own address; the
/// error is the kernel's to route. Also when the error quotes no more than the 8 bytes an
/// ICMPv4 error must (no TCP checksum then), IPv4 and IPv6.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_icmp_error_about_a_clusterip_flow_reaches_the_client_translated() {
    for (cli, vip, be, router) in [(CLI4, VIP4, BE4, ROUTER4), (CLI6, VIP6, BE6, ROUTER6)] {
        for quoted in [None, Some(8)] {
            let what = format!("{vip}, {quoted:?} bytes of TCP quoted");
            let mut h = clusterip_flow(cli, vip, be);
            let sent = tcp(cli, 40000, be, 8080, Tcp::Ack);
            expect_translated(
                &mut h,
                &format!("{what}: too big"),
                (TC_FROM_NETDEV, UPLINK),
                icmp_error(router, cli, Icmp::TooBig, &sent, quoted),
                icmp_error(
                    router,
                    cli,
                    Icmp::TooBig,
                    &tcp(cli, 40000, vip, 80, Tcp::Ack),
                    quoted,
                ),
            );
        }
    }
}

/// An endpoint that refuses a UDP datagram sent through a ClusterIP answers with port
/// unreachable: its error comes from the service, as the flow's replies do, quoting the
/// datagram as the client sent it, and is routed by the program (the new source may be an
/// address of the node). Errors about no translated flow, and ICMP messages that are no
/// errors, pass untouched.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_endpoints_port_unreachable_comes_from_the_service() {
    for (cli, vip, be) in [(CLI4, VIP4, BE4), (CLI6, VIP6, BE6)] {
        let mut h = Harness::new().unwrap();
        h.program(&services());
        expect(
            &mut h,
            &format!("{vip}: request"),
            (TC_FROM_POD, "lo"),
            udp(cli, 40000, vip, 53, b"7"),
            (OK, udp(cli, 40000, be, 5353, b"7")),
            &["dnat_new"],
        );
        let refused = icmp_error(
            be,
            cli,
            Icmp::PortUnreachable,
            &udp(cli, 40000, be, 5353, b"7"),
            None,
        );
        expect(
            &mut h,
            &format!("{vip}: port unreachable"),
            (TC_FROM_POD, "lo"),
            refused,
            (
                REDIRECT,
                routed(icmp_error(
                    vip,
                    cli,
                    Icmp::PortUnreachable,
                    &udp(cli, 40000, vip, 53, b"7"),
                    None,
                )),
            ),
            &["routed", "icmp_error_nat"],
        );
        let other_flow = icmp_error(
            be,
            cli,
            Icmp::PortUnreachable,
            &udp(cli, 40001, be, 5353, b"7"),
            None,
        );
        let mut echo = Vec::new();
        let eth = PacketBuilder::ethernet2(POD_MAC, HOST_MAC);
        if cli == CLI4 {
            eth.ipv4([198, 18, 1, 11], [198, 18, 1, 10], 64)
                .icmpv4_echo_request(1, 1)
                .write(&mut echo, b"ping")
                .unwrap();
        } else {
            let a = |ip: &str| ip.parse::<std::net::Ipv6Addr>().unwrap().octets();
            eth.ipv6(a(be), a(cli), 64)
                .icmpv6_echo_request(1, 1)
                .write(&mut echo, b"ping")
                .unwrap();
        }
        for (what, frame) in [
            ("another flow's error", other_flow),
            ("an echo request", echo),
        ] {
            expect(
                &mut h,
                &format!("{vip}: {what}"),
                (TC_FROM_POD, "lo"),
                frame.clone(),
                (OK, frame),
                &["pass_other_proto"],
            );
        }
    }
}

/// PMTU discovery through a NodePort: the reply of a pod of the node leaves with the node's
/// address, and a router on the way to the outside client says it is too big. The error,
/// to the node's address and quoting the reply as it left, is turned into one to the pod,
/// quoting the reply as the pod sent it; the kernel forwards it there.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_too_big_error_about_a_nodeport_reply_reaches_the_pod() {
    for (node, ext, be, router) in [
        (NODE4, EXTERNAL4, BE4, ROUTER4),
        (NODE6, EXTERNAL6, BE6, ROUTER6),
    ] {
        let mut h = nodeport_flow(node, ext, be);
        let left = tcp(node, 30080, ext, 40000, Tcp::Ack);
        let sent = tcp(be, 8080, ext, 40000, Tcp::Ack);
        let want = icmp_error(router, be, Icmp::TooBig, &sent, None);
        let got = icmp_error(router, node, Icmp::TooBig, &left, None);
        expect_translated(
            &mut h,
            &format!("{node}: too big"),
            (TC_FROM_NETDEV, UPLINK),
            got,
            want,
        );
    }
}

/// The node's own error on its way into a pod (the node's forwarding found a translated
/// request too big for the route to the endpoint): `tc_to_pod` gives it the service's address
/// and port in the quote. The error's source, the node's, stays.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_nodes_own_error_about_a_request_reaches_the_client_translated() {
    for (cli, vip, be, node) in [(CLI4, VIP4, BE4, NODE4), (CLI6, VIP6, BE6, NODE6)] {
        let mut h = clusterip_flow(cli, vip, be);
        let sent = tcp(cli, 40000, be, 8080, Tcp::Ack);
        expect_translated(
            &mut h,
            &format!("{vip}: too big"),
            (TC_TO_POD, "lo"),
            icmp_error(node, cli, Icmp::TooBig, &sent, None),
            icmp_error(
                node,
                cli,
                Icmp::TooBig,
                &tcp(cli, 40000, vip, 80, Tcp::Ack),
                None,
            ),
        );
    }
}

/// With no program on pod veths, a pod's own error about a NodePort flow from outside (here:
/// its port is closed) meets weir's programs on the uplink's egress only, as the flow's
/// replies do: it leaves from the NodePort, quoting the client's packet as the client sent it.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_endpoints_error_about_an_external_flow_leaves_from_the_nodeport() {
    for (node, ext, be) in [(NODE4, EXTERNAL4, BE4), (NODE6, EXTERNAL6, BE6)] {
        let mut h = nodeport_flow(node, ext, be);
        let got = tcp(ext, 40000, be, 8080, Tcp::Syn);
        expect_translated(
            &mut h,
            &format!("{node}: port unreachable"),
            (TC_TO_NETDEV, UPLINK),
            icmp_error(be, ext, Icmp::PortUnreachable, &got, None),
            icmp_error(
                node,
                ext,
                Icmp::PortUnreachable,
                &tcp(ext, 40000, node, 30080, Tcp::Syn),
                None,
            ),
        );
    }
}

/// A source-NATed NodePort flow (outside client, endpoint on another node): a router between
/// the node and the endpoint says a request is too big, to the node's address and port the
/// request left from. The error goes on to the client, quoting the request as the client sent
/// it (to the NodePort), and the kernel forwards it there.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_too_big_error_about_a_source_nated_request_reaches_the_outside_client() {
    for (node, ext, remote, router) in [
        (NODE4, EXTERNAL4, REMOTE_POD4, ROUTER4),
        (NODE6, EXTERNAL6, REMOTE_POD6, ROUTER6),
    ] {
        let mut h = Harness::new().unwrap();
        h.program(&nodeport(node, remote));
        let (_, out, _) = step_on(
            &mut h,
            TC_FROM_NETDEV,
            &tcp(ext, 40000, node, 30080, Tcp::Syn),
            UPLINK,
        );
        let port = tcp_sport(&out);
        let left = tcp(node, port, remote, 8080, Tcp::Ack);
        let got = icmp_error(router, node, Icmp::TooBig, &left, None);
        let want = icmp_error(
            router,
            ext,
            Icmp::TooBig,
            &tcp(ext, 40000, node, 30080, Tcp::Ack),
            None,
        );
        expect_translated(
            &mut h,
            &format!("{node}: too big"),
            (TC_FROM_NETDEV, UPLINK),
            got,
            want,
        );
    }
}

/// An endpoint with no socket on a UDP Service's target port answers each datagram with ICMP
/// port unreachable. The client's socket, connected to the service address, hears of it
/// (ECONNREFUSED) by both paths: by the socket hooks it is connected to the endpoint itself;
/// by the TC path the error, which quotes the datagram as the endpoint got it, is translated
/// back to the service's address and port, as Linux conntrack does for kube-proxy.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_refused_udp_port_behind_a_clusterip_is_reported_to_the_client() {
    for (socket_lb, label) in PATHS {
        let s = sim(socket_lb);
        s.write_services(&udp_service_on("198.18.1.11", 9)).unwrap();
        s.wait_programmed("the closed port", |st| {
            st.services
                .iter()
                .any(|v| v.frontend == "198.19.0.21:53/UDP" && v.backends == ["198.18.1.11:9"])
        })
        .unwrap();
        // Every datagram gets its error: no rate limit in the endpoint's namespace.
        let be1 = s.node.pod("be-1").unwrap();
        be1.ns.sysctl("net.ipv4.icmp_ratelimit", "0").unwrap();
        let before = s.status().unwrap().counters["icmp_error_nat"];
        let args = [
            "198.19.0.21:53",
            "--proto",
            "udp",
            "--rate",
            "20",
            "--duration",
            "1s",
            "--connections",
            "1",
            "--timeout",
            "500ms",
        ];
        let r = s.loadtest(&args, socket_lb, false).unwrap();
        assert!(r.sent >= 15, "{label}: {} sent", r.sent);
        assert_eq!(
            (r.errors.get("refused").copied(), r.errors.len()),
            (Some(r.sent), 1),
            "{label}: every datagram refused, none timed out: {:?}",
            r.errors
        );
        let translated = s.status().unwrap().counters["icmp_error_nat"] - before;
        if socket_lb {
            assert_eq!(translated, 0, "{label}: no error to translate");
        } else {
            assert_eq!(translated, r.sent, "{label}: each error translated once");
        }
    }
}

/// PMTU discovery through a NodePort. An outside client is behind a router whose link towards
/// it carries 1280 bytes, though the client's own link (and so the MSS it announces) takes
/// 1500. A pod of the node sends it 256 KiB: every full segment, leaving with the node's
/// address, is too big for that link, and the router says so to the node's address, quoting
/// the segment as it left. Only with that error turned into one to the pod, quoting the
/// segment as the pod sent it, does the pod's socket learn the path's MTU and send smaller
/// segments; otherwise the transfer stalls for good. IPv4 and IPv6.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn pmtu_discovery_works_through_a_nodeport() {
    use std::{
        io::{Read, Write},
        net::{SocketAddr, TcpListener, TcpStream},
    };
    use weir_proxy::node::netns::enter;
    use weir_testkit::{Lan, Netns};
    const SIZE: usize = 256 * 1024;
    let mut s = sim(true);
    let mut lan = Lan::create(&s.tag).unwrap();
    lan.join(&s.node.ns, "eth1", &["198.18.0.1/24", "fd00:17::1/64"])
        .unwrap();
    let router = Netns::create(&format!("weir-{}-rt", s.tag)).unwrap();
    lan.join(&router, "eth0", &["198.18.0.254/24", "fd00:17::fe/64"])
        .unwrap();
    let client = Netns::create(&format!("weir-{}-cl", s.tag)).unwrap();
    router
        .ip(&[
            "link",
            "add",
            "eth1",
            "mtu",
            "1280",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &client.name,
        ])
        .unwrap();
    for (ns, dev, v4, v6, via4, via6, to4, to6) in [
        (
            &router,
            "eth1",
            "198.18.5.1/24",
            "fd00:1b::1/64",
            None,
            None,
            "",
            "",
        ),
        (
            &client,
            "eth0",
            "198.18.5.2/24",
            "fd00:1b::2/64",
            Some("198.18.5.1"),
            Some("fd00:1b::1"),
            "198.18.0.0/24",
            "fd00:17::/64",
        ),
    ] {
        ns.sysctl(&format!("net.ipv6.conf.{dev}.accept_dad"), "0")
            .unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
        ns.ip(&["addr", "add", v4, "dev", dev]).unwrap();
        ns.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"])
            .unwrap();
        if let (Some(via4), Some(via6)) = (via4, via6) {
            ns.ip(&["route", "add", to4, "via", via4]).unwrap();
            ns.ip(&["-6", "route", "add", to6, "via", via6]).unwrap();
        }
    }
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        // Every too-big packet gets its error.
        ("net.ipv4.icmp_ratelimit", "0"),
        ("net.ipv6.icmp.ratelimit", "0"),
    ] {
        router.sysctl(key, value).unwrap();
    }
    s.node
        .ns
        .ip(&["route", "add", "198.18.5.0/24", "via", "198.18.0.254"])
        .unwrap();
    s.node
        .ns
        .ip(&["-6", "route", "add", "fd00:1b::/64", "via", "fd00:17::fe"])
        .unwrap();
    let yaml = "apiVersion: v1\nkind: Node\nmetadata: {name: sim-node}\n\
         spec: {podCIDRs: [198.18.1.0/24, \"fd00:18::/120\"]}\n\
         status: {addresses: [{type: InternalIP, address: 198.18.0.1}, {type: InternalIP, address: \"fd00:17::1\"}]}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: demo}\n\
         spec: {type: NodePort, ipFamilyPolicy: RequireDualStack,\n\
         clusterIP: 198.19.0.32, clusterIPs: [198.19.0.32, \"fd00:19::32\"], ipFamilies: [IPv4, IPv6],\n\
         ports: [{name: tcp, port: 80, targetPort: 8081, nodePort: 30081, protocol: TCP}]}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: big-4, namespace: demo, labels: {kubernetes.io/service-name: big}}\n\
         addressType: IPv4\nports: [{name: tcp, port: 8081, protocol: TCP}]\n\
         endpoints: [{addresses: [198.18.1.11], nodeName: sim-node}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: big-6, namespace: demo, labels: {kubernetes.io/service-name: big}}\n\
         addressType: IPv6\nports: [{name: tcp, port: 8081, protocol: TCP}]\n\
         endpoints: [{addresses: [\"fd00:18::b\"], nodeName: sim-node}]\n";
    s.write_services(yaml).unwrap();
    s.netdevs = vec!["eth1".into()];
    s.kill_agent();
    s.start_agent().unwrap();
    s.wait_programmed("the NodePort", |st| {
        ["198.18.0.1:30081/TCP", "[fd00:17::1]:30081/TCP"]
            .iter()
            .all(|fe| st.services.iter().any(|v| v.frontend == *fe))
    })
    .unwrap();

    // be-1 sends SIZE bytes to each connection, two of them.
    let be1 = s.node.pod("be-1").unwrap().ns.path();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let server = thread::spawn(move || {
        enter(&be1).unwrap();
        let l = TcpListener::bind("[::]:8081").unwrap();
        ready_tx.send(()).unwrap();
        for _ in 0..2 {
            let (mut c, _) = l.accept().unwrap();
            // A client that stalls gives up; so does this side.
            c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = c.write_all(&vec![7u8; SIZE]);
        }
    });
    ready.recv().unwrap();
    let before = s.status().unwrap().counters["icmp_error_nat"];
    let cl = client.path();
    let got = thread::spawn(move || {
        enter(&cl).unwrap();
        ["198.18.0.1:30081", "[fd00:17::1]:30081"].map(|target| {
            let addr: SocketAddr = target.parse().unwrap();
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = Vec::new();
            let _ = c.read_to_end(&mut buf);
            (target, buf.len())
        })
    })
    .join()
    .unwrap();
    server.join().unwrap();
    assert_eq!(
        got,
        [("198.18.0.1:30081", SIZE), ("[fd00:17::1]:30081", SIZE)],
        "every byte arrives"
    );
    let translated = s.status().unwrap().counters["icmp_error_nat"] - before;
    assert!(translated >= 2, "{translated} errors translated");
}
