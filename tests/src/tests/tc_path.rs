//! The per-packet path (TC programs, BPF_PROG_TEST_RUN fixtures and real namespaces): ClusterIP
//! translation both ways, conntrack entries, flows that close and reopen, packets that are no
//! service's, and service traffic with the socket hooks off.

use weir_common::{Stat, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING};
use weir_proxy::{datapath::addr::to_addr, model::Desired};

use weir_proxy::tools::sandbox::SERVICES;

use crate::{fixture::*, node::*, *};

fixtures! {
    lb4_clusterip_tcp_syn_dnat => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
    ]);
    lb4_clusterip_tcp_established_dnat => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Ack), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack)), &[(Stat::DnatEstablished, 1)]),
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Ack), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack)), &[(Stat::DnatEstablished, 1), (Stat::FlowCacheHit, 1)]),
    ]);
    lb4_clusterip_tcp_reply_revnat => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        step(tcp(BE4, 8080, CLI4, 40000, Tcp::Ack), REDIRECT, Out::Exact(routed(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack))), &[(Stat::RevNat, 1), (Stat::Routed, 1)]),
    ]);
    // A reply whose TTL runs out here is translated, and left to the kernel's forwarding.
    lb4_clusterip_reply_with_ttl_1_is_left_to_the_kernel => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        step(with_ttl(tcp(BE4, 8080, CLI4, 40000, Tcp::Ack), 1), OK, Out::Exact(with_ttl(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack), 1)),
             &[(Stat::RevNat, 1), (Stat::RouteFallback, 1)]),
    ]);
    lb6_clusterip_reply_with_hop_limit_1_is_left_to_the_kernel => (services(), vec![
        step(tcp(CLI6, 40000, VIP6, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI6, 40000, BE6, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        step(with_ttl(tcp(BE6, 8080, CLI6, 40000, Tcp::Ack), 1), OK, Out::Exact(with_ttl(tcp(VIP6, 80, CLI6, 40000, Tcp::Ack), 1)),
             &[(Stat::RevNat, 1), (Stat::RouteFallback, 1)]),
    ]);
    lb4_clusterip_tcp_reply_of_other_flow_untouched => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        step(tcp(BE4, 8080, CLI4, 40001, Tcp::Ack), OK, Out::Same, &[(Stat::PassNoService, 1)]),
    ]);
    lb4_clusterip_tcp_syn_with_ip_options_dnat => (services(), vec![
        step(tcp_syn_with_ip_options(CLI4, 40000, VIP4, 80), OK,
             Out::Exact(tcp_syn_with_ip_options(CLI4, 40000, BE4, 8080)), &[(Stat::DnatNew, 1)]),
    ]);
    lb4_clusterip_udp_request_dnat => (services(), vec![
        step(udp(CLI4, 40000, VIP4, 53, b"7"), OK, Out::Exact(udp(CLI4, 40000, BE4, 5353, b"7")), &[(Stat::DnatNew, 1)]),
    ]);
    lb4_clusterip_udp_both_ways => (services(), vec![
        step(udp(CLI4, 40000, VIP4, 53, b"7"), OK, Out::Exact(udp(CLI4, 40000, BE4, 5353, b"7")), &[(Stat::DnatNew, 1)]),
        step(udp(BE4, 5353, CLI4, 40000, b"be-1 7"), REDIRECT, Out::Exact(routed(udp(VIP4, 53, CLI4, 40000, b"be-1 7"))), &[(Stat::RevNat, 1), (Stat::Routed, 1)]),
        step(udp(CLI4, 40000, VIP4, 53, b"8"), OK, Out::Exact(udp(CLI4, 40000, BE4, 5353, b"8")), &[(Stat::DnatEstablished, 1)]),
    ]);
    lb4_clusterip_udp_zero_checksum_kept => (services(), vec![
        step(with_zero_udp_checksum(udp(CLI4, 40000, VIP4, 53, b"7")), OK,
             Out::Exact(with_zero_udp_checksum(udp(CLI4, 40000, BE4, 5353, b"7"))), &[(Stat::DnatNew, 1)]),
    ]);
    lb6_clusterip_tcp_syn_dnat => (services(), vec![
        step(tcp(CLI6, 40000, VIP6, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI6, 40000, BE6, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
    ]);
    lb6_clusterip_tcp_reply_revnat => (services(), vec![
        step(tcp(CLI6, 40000, VIP6, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI6, 40000, BE6, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        step(tcp(CLI6, 40000, VIP6, 80, Tcp::Ack), OK, Out::Exact(tcp(CLI6, 40000, BE6, 8080, Tcp::Ack)), &[(Stat::DnatEstablished, 1)]),
        step(tcp(BE6, 8080, CLI6, 40000, Tcp::Ack), REDIRECT, Out::Exact(routed(tcp(VIP6, 80, CLI6, 40000, Tcp::Ack))), &[(Stat::RevNat, 1), (Stat::Routed, 1)]),
    ]);
    lb6_clusterip_udp_both_ways => (services(), vec![
        step(udp(CLI6, 40000, VIP6, 53, b"7"), OK, Out::Exact(udp(CLI6, 40000, BE6, 5353, b"7")), &[(Stat::DnatNew, 1)]),
        step(udp(BE6, 5353, CLI6, 40000, b"be-1 7"), REDIRECT, Out::Exact(routed(udp(VIP6, 53, CLI6, 40000, b"be-1 7"))), &[(Stat::RevNat, 1), (Stat::Routed, 1)]),
    ]);
    // A rewrite whose UDP checksum comes out 0 sends 0xffff (RFC 8200 8.1): an IPv6 receiver
    // drops a datagram whose checksum field is 0, once in 65 536 rewrites if it is left so.
    // The payloads are the ones whose translated datagram sums to exactly that; the request's
    // third packet is the flow cache's.
    lb6_clusterip_udp_checksum_that_comes_out_zero_is_sent_as_ffff => {
        let req = zero_sum_payload(|p| udp(CLI6, 40000, BE6, 5353, p));
        let rep = zero_sum_payload(|p| udp(VIP6, 53, CLI6, 40000, p));
        (services(), vec![
            step(udp(CLI6, 40000, VIP6, 53, &req), OK, Out::Exact(udp(CLI6, 40000, BE6, 5353, &req)), &[(Stat::DnatNew, 1)]),
            step(udp(CLI6, 40000, VIP6, 53, &req), OK, Out::Exact(udp(CLI6, 40000, BE6, 5353, &req)), &[(Stat::DnatEstablished, 1)]),
            step(udp(CLI6, 40000, VIP6, 53, &req), OK, Out::Exact(udp(CLI6, 40000, BE6, 5353, &req)),
                 &[(Stat::DnatEstablished, 1), (Stat::FlowCacheHit, 1)]),
            step(udp(BE6, 5353, CLI6, 40000, &rep), REDIRECT, Out::Exact(routed(udp(VIP6, 53, CLI6, 40000, &rep))),
                 &[(Stat::RevNat, 1), (Stat::Routed, 1)]),
        ])
    };
    lb4_unknown_port_passes => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 81, Tcp::Syn), OK, Out::Same, &[(Stat::PassNoService, 1)]),
    ]);
    lb4_pod_to_pod_passes => (services(), vec![
        step(tcp(CLI4, 40000, "198.18.1.12", 8080, Tcp::Syn), OK, Out::Same, &[(Stat::PassNoService, 1)]),
    ]);
    lb4_protocol_mismatch_passes => (services(), vec![
        step(udp(CLI4, 40000, VIP4, 80, b"x"), OK, Out::Same, &[(Stat::PassNoService, 1)]),
    ]);
    lb4_syn_on_a_closed_flow_is_a_new_flow => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Fin), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Fin)), &[(Stat::DnatEstablished, 1)]),
        // The client reuses the port for a new connection: a fresh choice, not the old flow.
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
    ]);
    lb4_direct_connection_clears_a_stale_reply_entry => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        // Same ports, straight to the backend (socket LB, or a pod-IP client): not a service.
        step(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn), OK, Out::Same, &[(Stat::PassNoService, 1)]),
        // Its replies must reach the client untouched, not rewritten to the VIP.
        step(tcp(BE4, 8080, CLI4, 40000, Tcp::Ack), OK, Out::Same, &[(Stat::PassNoService, 1)]),
    ]);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn lb4_clusterip_tcp_syn_creates_both_conntrack_entries() {
    let before = weir_proxy::datapath::kernel_facts::clock_ns().unwrap();
    let h = run_case(
        "ct",
        services(),
        vec![step(
            tcp(CLI4, 40000, VIP4, 80, Tcp::Syn),
            OK,
            Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)),
            &[(Stat::DnatNew, 1)],
        )],
    );
    let ct = h.ct();
    assert_eq!(ct.len(), 2, "{ct:?}");
    let fwd = ct
        .iter()
        .find(|(_, v)| v.dir == CT_DIR_FORWARD)
        .expect("forward entry");
    let rev = ct
        .iter()
        .find(|(_, v)| v.dir == CT_DIR_REPLY)
        .expect("reply entry");
    assert_eq!(fwd.0.src, to_addr(CLI4.parse().unwrap()));
    assert_eq!(fwd.1.nat_addr, to_addr(BE4.parse().unwrap()));
    assert_eq!(u16::from_be(fwd.1.nat_port), 8080);
    assert_eq!(rev.0.src, to_addr(BE4.parse().unwrap()));
    assert_eq!(rev.1.nat_addr, to_addr(VIP4.parse().unwrap()));
    assert_eq!(u16::from_be(rev.1.nat_port), 80);
    // The program's clock (jiffies × the tick + the loader's offset) is the coarse monotonic
    // clock user space reads (`weir status`, the DNS lease), within a tick or two.
    let after = weir_proxy::datapath::kernel_facts::clock_ns().unwrap();
    let tick = weir_proxy::datapath::kernel_facts::tick_ns().unwrap();
    for (_, v) in &ct {
        let stamped = v.expires_ns - weir_common::CT_LIFETIME_TCP_NS;
        assert!(
            stamped + 2 * tick >= before && stamped <= after + 2 * tick,
            "the program stamped {stamped}; the coarse clock read {before} before, {after} after (tick {tick} ns)"
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn lb4_clusterip_tcp_fin_and_rst_mark_closing() {
    for (name, flags) in [("fin", Tcp::Fin), ("rst", Tcp::Rst)] {
        let h = run_case(
            name,
            services(),
            vec![
                step(
                    tcp(CLI4, 40000, VIP4, 80, Tcp::Syn),
                    OK,
                    Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)),
                    &[(Stat::DnatNew, 1)],
                ),
                step(
                    tcp(CLI4, 40000, VIP4, 80, flags),
                    OK,
                    Out::Exact(tcp(CLI4, 40000, BE4, 8080, flags)),
                    &[(Stat::DnatEstablished, 1)],
                ),
            ],
        );
        let ct = h.ct();
        let fwd = ct
            .iter()
            .find(|(_, v)| v.dir == CT_DIR_FORWARD)
            .expect("forward entry");
        assert_ne!(
            fwd.1.flags & CT_F_CLOSING,
            0,
            "{name}: forward entry not marked closing"
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_tc_path_works_with_socket_hooks_off() {
    let mut s = sim(false);
    let load = [
        "198.19.0.10:80",
        "--rate",
        "600",
        "--duration",
        "1s",
        "--new-conn",
    ];
    let r = s.loadtest(&load, false, false).unwrap();
    assert_spread("TCP, agent without socket hooks", &r);
    let st = s.status().unwrap();
    assert_eq!(st.counters["sock_connect"], 0);
    assert!(st.counters["dnat_new"] >= r.sent);
    // Requests and replies of every connection go straight into the pods (a SYN may meet an
    // unresolved neighbour entry and take the neighbour table).
    assert!(
        st.counters["routed_to_pod"] >= r.sent,
        "{} requests, {:?}",
        r.sent,
        st.counters
    );
    assert_eq!(st.pod_veths.len(), s.node.pods.len(), "{:?}", st.pod_veths);
    // On connections kept open, a flow's packets after its first on a CPU are translated from
    // the flow cache: segments of the pods' TCP sockets, cloned, with CHECKSUM_PARTIAL, both
    // ways, IPv4 and IPv6. Every request must still be answered.
    for target in ["198.19.0.10:80", "[fd00:19::10]:80"] {
        let before = s.status().unwrap().counters["flow_cache_hit"];
        let r = s
            .loadtest(
                &[
                    target,
                    "--rate",
                    "600",
                    "--duration",
                    "1s",
                    "--connections",
                    "3",
                ],
                false,
                false,
            )
            .unwrap();
        assert_eq!(
            r.ok, r.sent,
            "{target}, kept connections: errors {:?}",
            r.errors
        );
        let hits = s.status().unwrap().counters["flow_cache_hit"] - before;
        assert!(
            hits >= r.sent,
            "{target}: {hits} packets of {} requests and their replies from the flow cache",
            r.sent
        );
    }
    // With the node's stack forwarding them, none is (the records of the run before go).
    s.agent_args = vec!["--host-routing".into(), "kernel".into()];
    s.kill_agent();
    s.start_agent().unwrap();
    let before = s.status().unwrap();
    assert!(before.pod_veths.is_empty(), "{:?}", before.pod_veths);
    let r = s.loadtest(&load, false, false).unwrap();
    assert_spread("TCP, the node's stack forwarding into pods", &r);
    let after = s.status().unwrap();
    assert_eq!(
        after.counters["routed_to_pod"], before.counters["routed_to_pod"],
        "{:?}",
        after.counters
    );
    assert!(after.counters["dnat_new"] - before.counters["dnat_new"] >= r.sent);
}

/// A Service whose endpoint is the node itself (a hostNetwork pod, the API server on a
/// control-plane node), reached by the per-packet path: the replies leave the node itself
/// through the client's veth, which no ingress program sees; `tc_to_pod` gives them the
/// Service's address. TCP and UDP.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_pod_reaches_an_endpoint_on_the_node_itself_by_the_tc_path() {
    use weir_testkit::Proc;
    let s = sim(false);
    s.node
        .ns
        .ip(&["addr", "add", "198.18.0.60/32", "dev", "lo"])
        .unwrap();
    let mut cmd = s.node.ns.command(weir_bin().unwrap()).unwrap();
    // Bound to the endpoint's address, as a hostNetwork server of the node's address answers
    // UDP from it.
    cmd.args(["echo-server", "--name", "node", "--address", "198.18.0.60"])
        .args(["--port", "9090"])
        .stdout(std::process::Stdio::null());
    let _echo = Proc::spawn("echo node", cmd).unwrap();
    s.write_services(&format!(
        "{SERVICES}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: hostnet, namespace: demo}}\n\
         spec: {{clusterIP: 198.19.0.30, ports: [{{name: tcp, port: 80, targetPort: 9090}}, {{name: udp, port: 80, protocol: UDP, targetPort: 9090}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: hostnet-1, namespace: demo, labels: {{kubernetes.io/service-name: hostnet}}}}\n\
         addressType: IPv4\nports: [{{name: tcp, port: 9090}}, {{name: udp, port: 9090, protocol: UDP}}]\n\
         endpoints: [{{addresses: [198.18.0.60]}}]\n"
    ))
    .unwrap();
    s.wait_programmed("hostnet", |st| {
        st.services
            .iter()
            .any(|v| v.frontend == "198.19.0.30:80/UDP" && v.backends == ["198.18.0.60:9090"])
    })
    .unwrap();
    for proto in ["tcp", "udp"] {
        let r = s
            .loadtest(
                &[
                    "198.19.0.30:80",
                    "--proto",
                    proto,
                    "--rate",
                    "200",
                    "--duration",
                    "1s",
                    "--connections",
                    "4",
                    "--timeout",
                    "500ms",
                ],
                false,
                false,
            )
            .unwrap();
        assert_eq!(
            (
                r.ok,
                r.backends.keys().map(|k| k.as_str()).collect::<Vec<_>>()
            ),
            (r.sent, vec!["node"]),
            "{proto}: every request answered by the node, from the service address: {:?}",
            r.errors
        );
    }
}
