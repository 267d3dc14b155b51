//! External traffic (NodePort, LoadBalancer, externalIPs) on an uplink: translated, source-NATed
//! to an endpoint on another node, replies translated on the uplink's egress, and an outside
//! client in a namespace of its own reaching NodePorts served here and on another node.

use weir_common::{Stat, PROTO_TCP};
use weir_proxy::model::{Desired, ServiceSpec};

use weir_proxy::tools::loadtest::Report;

use crate::{fixture::*, node::*, *};

fixtures! {
    lb4_tc_from_netdev_dnat => (services(), vec![Step {
        prog: TC_FROM_NETDEV,
        input: tcp("198.18.0.99", 40000, VIP4, 80, Tcp::Syn),
        verdict: OK,
        out: Out::Exact(tcp("198.18.0.99", 40000, BE4, 8080, Tcp::Syn)),
        stats: &[(Stat::DnatNew, 1)],
    }]);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn external_traffic_to_an_endpoint_on_another_node_is_source_nated() {
    for (node, ext, remote) in [
        (NODE4, EXTERNAL4, REMOTE_POD4),
        (NODE6, EXTERNAL6, REMOTE_POD6),
    ] {
        let mut h = Harness::new().unwrap();
        h.program(&nodeport(node, remote));
        // The client's SYN leaves by the uplink it came in on, from the node's address and a
        // port of the SNAT range, routed by the program itself (the kernel would drop a packet
        // arriving with a local source).
        let (v, out, moved) = step_on(
            &mut h,
            TC_FROM_NETDEV,
            &tcp(ext, 40000, node, 30080, Tcp::Syn),
            UPLINK,
        );
        let port = tcp_sport(&out);
        assert!(
            port >= weir_common::SNAT_PORT_MIN,
            "{node}: SNAT port {port}"
        );
        assert_eq!(v, REDIRECT, "{node}: SYN verdict");
        assert!(
            out == routed(tcp(node, port, remote, 8080, Tcp::Syn)),
            "{node}: SYN\n{}",
            hexdiff(&out, &routed(tcp(node, port, remote, 8080, Tcp::Syn)))
        );
        assert_eq!(
            moved,
            ["dnat_new", "snat_new", "routed"],
            "{node}: SYN counters"
        );
        // The endpoint's reply comes back to that address and port: it leaves from the
        // NodePort, to the client.
        expect(
            &mut h,
            &format!("{node}: reply"),
            (TC_FROM_NETDEV, UPLINK),
            tcp(remote, 8080, node, port, Tcp::Ack),
            (REDIRECT, routed(tcp(node, 30080, ext, 40000, Tcp::Ack))),
            &["rev_nat", "routed"],
        );
        // The rest of the client's flow keeps the port.
        expect(
            &mut h,
            &format!("{node}: established"),
            (TC_FROM_NETDEV, UPLINK),
            tcp(ext, 40000, node, 30080, Tcp::Ack),
            (REDIRECT, routed(tcp(node, port, remote, 8080, Tcp::Ack))),
            &["dnat_established", "routed"],
        );
        // Every other client flow gets a port of its own towards the same endpoint.
        let mut ports = std::collections::BTreeSet::from([port]);
        for sport in 40001..40033 {
            let (_, out, _) = step_on(
                &mut h,
                TC_FROM_NETDEV,
                &tcp(ext, sport, node, 30080, Tcp::Syn),
                UPLINK,
            );
            assert!(
                ports.insert(tcp_sport(&out)),
                "{node}: SNAT port {} handed out twice",
                tcp_sport(&out)
            );
        }
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn external_traffic_to_an_endpoint_on_this_node_keeps_the_client_address() {
    let mut h = Harness::new().unwrap();
    h.program(&nodeport(NODE4, BE4));
    // Forwarded by the kernel to the pod, with the client's address.
    expect(
        &mut h,
        "SYN",
        (TC_FROM_NETDEV, UPLINK),
        tcp(EXTERNAL4, 40000, NODE4, 30080, Tcp::Syn),
        (OK, tcp(EXTERNAL4, 40000, BE4, 8080, Tcp::Syn)),
        &["dnat_new"],
    );
    // The pod's reply now comes from the node's address: routed by the program, which the
    // kernel's input path would have dropped as a martian.
    expect(
        &mut h,
        "reply",
        (TC_FROM_POD, "lo"),
        tcp(BE4, 8080, EXTERNAL4, 40000, Tcp::Ack),
        (
            REDIRECT,
            routed(tcp(NODE4, 30080, EXTERNAL4, 40000, Tcp::Ack)),
        ),
        &["rev_nat", "routed"],
    );
}

/// With no program on pod veths (every pod's sockets balanced at `connect`), the reply of an
/// external flow served by a pod of the node meets weir's programs only on the uplink's
/// egress: `tc_to_netdev` gives it the NodePort's address, IPv4 and IPv6. What is no such
/// reply leaves untouched, a source-NATed flow's reply included (translated where it comes
/// in); a packet to a Service that drops its traffic (internal policy Local, no endpoint on
/// the node), which the socket hooks leave untranslated, is dropped there.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn replies_of_external_flows_are_translated_on_the_uplink_egress() {
    for (node, ext, be, remote, cli, empty) in [
        (NODE4, EXTERNAL4, BE4, REMOTE_POD4, CLI4, EMPTY4),
        (NODE6, EXTERNAL6, BE6, REMOTE_POD6, CLI6, EMPTY6),
    ] {
        let mut h = Harness::new().unwrap();
        let mut d = nodeport(node, be);
        d.insert(
            fe(empty, 80, PROTO_TCP),
            ServiceSpec {
                drop_when_empty: true,
                ..svc(&[])
            },
        );
        h.program(&d);
        expect(
            &mut h,
            &format!("{node}: SYN"),
            (TC_FROM_NETDEV, UPLINK),
            tcp(ext, 40000, node, 30080, Tcp::Syn),
            (OK, tcp(ext, 40000, be, 8080, Tcp::Syn)),
            &["dnat_new"],
        );
        expect(
            &mut h,
            &format!("{node}: reply"),
            (TC_TO_NETDEV, UPLINK),
            tcp(be, 8080, ext, 40000, Tcp::Ack),
            (OK, tcp(node, 30080, ext, 40000, Tcp::Ack)),
            &["rev_nat"],
        );
        for (what, frame) in [
            ("another flow", tcp(be, 8080, ext, 40001, Tcp::Ack)),
            ("a pod's own flow", tcp(cli, 40000, remote, 8080, Tcp::Syn)),
            ("an unknown port", udp(be, 5353, ext, 40000, b"x")),
        ] {
            expect(
                &mut h,
                &format!("{node}: {what}"),
                (TC_TO_NETDEV, UPLINK),
                frame.clone(),
                (OK, frame),
                &[],
            );
        }
        expect(
            &mut h,
            &format!("{node}: to a Service that drops"),
            (TC_TO_NETDEV, UPLINK),
            tcp(cli, 40000, empty, 80, Tcp::Syn),
            (SHOT, tcp(cli, 40000, empty, 80, Tcp::Syn)),
            &["drop_no_local_backend"],
        );
        // A source-NATed flow: its reply is translated at the uplink's ingress and leaves
        // with the NodePort's address, which no entry of the egress matches.
        h.program(&nodeport(node, remote));
        let (_, out, _) = step_on(
            &mut h,
            TC_FROM_NETDEV,
            &tcp(ext, 40002, node, 30080, Tcp::Syn),
            UPLINK,
        );
        let port = tcp_sport(&out);
        for frame in [
            out.clone(),
            tcp(node, 30080, ext, 40002, Tcp::Ack),
            tcp(remote, 8080, node, port, Tcp::Ack),
        ] {
            let (v, o, moved) = step_on(&mut h, TC_TO_NETDEV, &frame, UPLINK);
            assert_eq!((v, moved), (OK, vec![]), "{node}: source-NATed flow");
            assert!(
                o == frame,
                "{node}: source-NATed flow\n{}",
                hexdiff(&o, &frame)
            );
        }
    }
}

/// NodePort from outside the cluster, with real packets: a client on the nodes' network
/// reaches the simulated node's NodePort (IPv4 and IPv6, TCP and UDP), served by a pod of the
/// node and by a pod of a second node. The second pod's traffic is source-NATed, so its replies
/// come back through the node; with `externalTrafficPolicy: Local` only the node's own pod
/// serves, with nothing source-NATed. A NodePort whose endpoint is the node itself (a
/// hostNetwork pod) answers too: its replies leave by the uplink's egress, where
/// `tc_to_netdev` translates them.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_outside_client_reaches_a_nodeport_served_here_and_on_another_node() {
    nodeport_from_outside("tc");
}

/// The same with no program on the pod veths (`--pod-programs none`, the agent's choice when
/// its socket hooks sit on the cgroup v2 root): the replies of the node's own pod meet weir
/// only on the uplink's egress.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_outside_client_reaches_a_nodeport_with_no_pod_programs() {
    nodeport_from_outside("none");
}

fn nodeport_from_outside(pod_programs: &str) {
    use weir_testkit::{Lan, Netns, Node, NodeExt, Proc};
    let mut s = sim(true);
    // The nodes' network: this node at .1, node-b at .2, the client at .99.
    let mut lan = Lan::create(&s.tag).unwrap();
    // Checksums checked by every receiver: requests come in with full checksums and replies
    // of the node's pods leave it as CHECKSUM_PARTIAL, completed on the uplink; a rewrite
    // that gets either kind wrong loses them.
    lan.software_checksums();
    lan.join(&s.node.ns, "eth1", &["198.18.0.1/24", "fd00:17::1/64"])
        .unwrap();
    let mut node_b = Node::create(&format!("{}b", s.tag)).unwrap();
    lan.join(&node_b.ns, "eth1", &["198.18.0.2/24", "fd00:17::2/64"])
        .unwrap();
    let outside = Netns::create(&format!("weir-{}-out", s.tag)).unwrap();
    lan.join(&outside, "eth0", &["198.18.0.99/24", "fd00:17::99/64"])
        .unwrap();
    // node-b's pod at 198.18.1.50 / fd00:18::32, routed to through node-b.
    let remote = node_b.add_pod("rp", 50).unwrap();
    let mut echo = remote.ns.command(weir_bin().unwrap()).unwrap();
    echo.args(["echo-server", "--name", "remote", "--port", "8080"])
        .stdout(std::process::Stdio::null());
    let _echo = Proc::spawn("echo remote", echo).unwrap();
    s.node
        .ns
        .ip(&["route", "add", "198.18.1.50/32", "via", "198.18.0.2"])
        .unwrap();
    s.node
        .ns
        .ip(&["-6", "route", "add", "fd00:18::32/128", "via", "fd00:17::2"])
        .unwrap();
    // And node-b back to this node's client pod.
    node_b
        .ns
        .ip(&["route", "add", "198.18.1.10/32", "via", "198.18.0.1"])
        .unwrap();
    node_b
        .ns
        .ip(&["-6", "route", "add", "fd00:18::a/128", "via", "fd00:17::1"])
        .unwrap();

    let yaml = |policy: &str| {
        let slice = |family: &str, local: &str, remote: &str| {
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: np-{family}, namespace: demo, labels: {{kubernetes.io/service-name: np}}}}\n\
                 addressType: {family}\nports: [{{name: tcp, port: 8080, protocol: TCP}}, {{name: udp, port: 8080, protocol: UDP}}]\n\
                 endpoints:\n- {{addresses: [\"{local}\"], nodeName: sim-node}}\n- {{addresses: [\"{remote}\"], nodeName: node-b}}\n"
            )
        };
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: sim-node}}\n\
             spec: {{podCIDRs: [198.18.1.0/24, \"fd00:18::/120\"]}}\n\
             status: {{addresses: [{{type: InternalIP, address: 198.18.0.1}}, {{type: InternalIP, address: \"fd00:17::1\"}}]}}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: demo}}\n\
             spec: {{type: NodePort, externalTrafficPolicy: {policy}, ipFamilyPolicy: RequireDualStack,\n\
             clusterIP: 198.19.0.30, clusterIPs: [198.19.0.30, \"fd00:19::30\"], ipFamilies: [IPv4, IPv6],\n\
             ports: [{{name: tcp, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}},\n\
             {{name: udp, port: 53, targetPort: 8080, nodePort: 30053, protocol: UDP}}]}}\n{}{}",
            slice("IPv4", "198.18.1.11", "198.18.1.50"),
            slice("IPv6", "fd00:18::b", "fd00:18::32"),
        ) + "---\napiVersion: v1\nkind: Service\nmetadata: {name: hostnp, namespace: demo}\n\
             spec: {type: NodePort, clusterIP: 198.19.0.31, ports: [{name: tcp, port: 80, targetPort: 9090, nodePort: 30090},\n\
             {name: udp, port: 53, targetPort: 9090, nodePort: 30091, protocol: UDP}]}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: hostnp-1, namespace: demo, labels: {kubernetes.io/service-name: hostnp}}\n\
             addressType: IPv4\nports: [{name: tcp, port: 9090}, {name: udp, port: 9090, protocol: UDP}]\n\
             endpoints: [{addresses: [198.18.0.1], nodeName: sim-node}]\n"
    };
    // The hostNetwork endpoint: a server of the node's namespace on the node's address.
    let mut host = s.node.ns.command(weir_bin().unwrap()).unwrap();
    host.args(["echo-server", "--name", "host", "--address", "198.18.0.1"])
        .args(["--port", "9090"])
        .stdout(std::process::Stdio::null());
    let _host = Proc::spawn("echo host", host).unwrap();
    s.write_services(&yaml("Cluster")).unwrap();
    // The agent again, now with the uplink.
    s.netdevs = vec!["eth1".into()];
    s.agent_args = vec!["--pod-programs".into(), pod_programs.into()];
    s.kill_agent();
    s.start_agent().unwrap();
    let backends_of = |st: &weir_proxy::tools::status::Status, fe: &str| {
        st.services
            .iter()
            .find(|v| v.frontend == fe)
            .map(|v| v.backends.len())
    };
    s.wait_programmed("NodePort, policy Cluster", |st| {
        backends_of(st, "198.18.0.1:30080/TCP") == Some(2)
            && backends_of(st, "[fd00:17::1]:30053/UDP") == Some(2)
    })
    .unwrap();

    let load = |target: &str, proto: &str| -> Report {
        let mut cmd = outside.command(weir_bin().unwrap()).unwrap();
        cmd.args([
            "loadtest",
            target,
            "--proto",
            proto,
            "--rate",
            "200",
            "--duration",
            "500ms",
            "--timeout",
            "500ms",
            "--json",
            "--quiet",
        ]);
        if proto == "tcp" {
            cmd.arg("--new-conn");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "loadtest {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Report::from_json(&out.stdout).unwrap()
    };
    // What the pod veths carry: the setting's programs, and nothing left of the other's.
    let dev = s.node.pod("be-1").unwrap().host_if.clone();
    let on_veth = s
        .node
        .ns
        .run(move || {
            use aya::programs::TcAttachType::{Egress, Ingress};
            (filter_names(&dev, Ingress), filter_names(&dev, Egress))
        })
        .unwrap();
    let want: (Vec<String>, Vec<String>) = match pod_programs {
        "none" => (vec![], vec![]),
        _ => (vec!["tc_from_pod".into()], vec!["tc_to_pod".into()]),
    };
    assert_eq!(on_veth, want, "{pod_programs}: be-1's veth");
    for (target, proto) in [("198.18.0.1:30090", "tcp"), ("198.18.0.1:30091", "udp")] {
        let r = load(target, proto);
        assert_eq!(r.ok, r.sent, "{target}/{proto}: {:?}", r.errors);
        let served: Vec<&String> = r.backends.keys().collect();
        assert_eq!(served, ["host"], "{target}/{proto}: the node itself");
    }
    // The client pod (its sockets hooked) through the ClusterIP: balanced at `connect` over
    // be-1 and node-b's pod; with no pod programs, its packets to node-b pass only the
    // uplink's egress, untouched.
    for (target, proto) in [("198.19.0.30:80", "tcp"), ("[fd00:19::30]:53", "udp")] {
        let r = s
            .loadtest(
                &[
                    target,
                    "--proto",
                    proto,
                    "--rate",
                    "200",
                    "--duration",
                    "500ms",
                ],
                true,
                false,
            )
            .unwrap();
        assert_eq!(r.ok, r.sent, "{target}/{proto} from a pod: {:?}", r.errors);
        let served: Vec<&String> = r.backends.keys().collect();
        assert_eq!(served, ["be-1", "remote"], "{target}/{proto} from a pod");
    }
    let targets = [
        ("198.18.0.1:30080", "tcp"),
        ("198.18.0.1:30053", "udp"),
        ("[fd00:17::1]:30080", "tcp"),
        ("[fd00:17::1]:30053", "udp"),
    ];
    let before = s.status().unwrap().counters;
    for (target, proto) in targets {
        let r = load(target, proto);
        assert_eq!(r.ok, r.sent, "{target}/{proto}: {:?}", r.errors);
        let served: Vec<&String> = r.backends.keys().collect();
        assert_eq!(served, ["be-1", "remote"], "{target}/{proto}");
    }
    let after = s.status().unwrap().counters;
    assert!(
        after["snat_new"] > before["snat_new"] && after["routed"] > before["routed"],
        "remote endpoints source-NATed, replies routed: {after:?}"
    );
    assert_eq!(after["route_fallback"], before["route_fallback"]);

    // Local policy: only this node's pod, and nothing source-NATed.
    s.write_services(&yaml("Local")).unwrap();
    s.wait_programmed("NodePort, policy Local", |st| {
        st.services
            .iter()
            .any(|v| v.frontend == "198.18.0.1:30080/TCP (external)" && v.backends.len() == 1)
    })
    .unwrap();
    let before = s.status().unwrap().counters;
    for (target, proto) in targets {
        let r = load(target, proto);
        assert_eq!(r.ok, r.sent, "{target}/{proto} Local: {:?}", r.errors);
        let served: Vec<&String> = r.backends.keys().collect();
        // A UDP socket of this run that got the source port of one of the first run's (16
        // sockets each, random ports: it happens, about once in a hundred runs) is that flow,
        // still on its endpoint, as kube-proxy's conntrack keeps it: the policy took no
        // endpoint out of the Service. New flows are what must stay here (no SNAT, below).
        if proto == "tcp" {
            assert_eq!(served, ["be-1"], "{target}/{proto} Local");
        } else {
            assert_eq!(
                served.first().map(|s| s.as_str()),
                Some("be-1"),
                "{target}/{proto} Local"
            );
        }
    }
    let after = s.status().unwrap().counters;
    assert_eq!(
        after["snat_new"], before["snat_new"],
        "Local: no new flow source-NATed"
    );
}
