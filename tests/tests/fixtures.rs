//! Packet fixtures: the production eBPF object, maps filled through the agent's programmer and
//! map writer, frames run through the TC programs with BPF_PROG_TEST_RUN. Each fixture checks
//! the verdict, the exact output bytes (checksums included: the expected frames are built from
//! scratch, the programs update checksums incrementally) and the exact counter deltas.
//!
//! Needs root: `cargo xtask test`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;

use etherparse::{
    icmpv4::DestUnreachableHeader, icmpv6::DestUnreachableCode, Icmpv4Type, Icmpv6Type,
    PacketBuilder,
};
use weir_common::{Stat, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING, PROTO_TCP, PROTO_UDP};
use weir_proxy::{
    datapath::addr::to_addr,
    model::{Desired, Frontend, ServiceSpec},
};
use weir_tests::*;

const TC_FROM_POD: &str = "tc_from_pod";
const TC_FROM_NETDEV: &str = "tc_from_netdev";
const TC_TO_POD: &str = "tc_to_pod";
const TC_TO_NETDEV: &str = "tc_to_netdev";

const CLI4: &str = "198.18.1.10";
const CLI6: &str = "fd00:18::a";
const VIP4: &str = "198.19.0.10";
const VIP6: &str = "fd00:19::10";
const EMPTY4: &str = "198.19.0.13";
const EMPTY6: &str = "fd00:19::13";
const BE4: &str = "198.18.1.11";
const BE6: &str = "fd00:18::b";

fn fe(ip: &str, port: u16, proto: u8) -> Frontend {
    Frontend {
        ip: ip.parse().unwrap(),
        port,
        proto,
        scope: weir_common::SCOPE_ALL,
    }
}

fn svc(backends: &[&str]) -> ServiceSpec {
    ServiceSpec {
        name: "demo/fixture".into(),
        backends: backends
            .iter()
            .map(|b| b.parse::<SocketAddr>().unwrap())
            .collect(),
        ..Default::default()
    }
}

/// The services every fixture starts with.
fn services() -> Desired {
    Desired::from([
        (fe(VIP4, 80, PROTO_TCP), svc(&["198.18.1.11:8080"])),
        (fe(VIP4, 53, PROTO_UDP), svc(&["198.18.1.11:5353"])),
        (fe(VIP6, 80, PROTO_TCP), svc(&["[fd00:18::b]:8080"])),
        (fe(VIP6, 53, PROTO_UDP), svc(&["[fd00:18::b]:5353"])),
        (fe(EMPTY4, 80, PROTO_TCP), svc(&[])),
        (fe(EMPTY4, 53, PROTO_UDP), svc(&[])),
        (fe(EMPTY6, 80, PROTO_TCP), svc(&[])),
    ])
}

enum Out {
    /// The frame leaves as it came.
    Same,
    Exact(Vec<u8>),
}

struct Step {
    prog: &'static str,
    input: Vec<u8>,
    verdict: u32,
    out: Out,
    stats: &'static [(Stat, u64)],
}

fn step(input: Vec<u8>, verdict: u32, out: Out, stats: &'static [(Stat, u64)]) -> Step {
    Step {
        prog: TC_FROM_POD,
        input,
        verdict,
        out,
        stats,
    }
}

fn hexdiff(got: &[u8], want: &[u8]) -> String {
    let mut s = format!("got {} bytes, want {}\n", got.len(), want.len());
    for i in 0..got.len().max(want.len()) {
        let (g, w) = (got.get(i), want.get(i));
        if g != w {
            s += &format!("  byte {i}: got {g:02x?} want {w:02x?}\n");
        }
    }
    s
}

/// Runs the steps on fresh maps programmed with `desired`; returns the harness for extra checks.
fn run_case(name: &str, desired: Desired, steps: Vec<Step>) -> Harness {
    let mut h = Harness::new().expect("load the production object");
    h.program(&desired);
    run_steps(&mut h, name, steps);
    h
}

/// Runs the steps on the harness as it is, checking each.
fn run_steps(h: &mut Harness, name: &str, steps: Vec<Step>) {
    for (i, s) in steps.into_iter().enumerate() {
        let before = h.stats();
        // The uplink program sees packets entering on the uplink.
        let ingress = if s.prog == TC_FROM_NETDEV {
            h.ifindex(UPLINK)
        } else {
            1
        };
        let (verdict, out) = h.run_on(s.prog, &s.input, ingress);
        let after = h.stats();
        assert_eq!(verdict, s.verdict, "{name} step {i}: verdict");
        let want = match &s.out {
            Out::Same => &s.input,
            Out::Exact(w) => w,
        };
        assert!(
            out == *want,
            "{name} step {i}: output frame\n{}",
            hexdiff(&out, want)
        );
        let mut expected = vec![0u64; before.len()];
        for (stat, n) in s.stats {
            // Without the flow cache, its packets take conntrack: the same frames and
            // verdicts, with no hit counted.
            if *stat != Stat::FlowCacheHit || h.flow_cache() {
                expected[*stat as usize] += n;
            }
        }
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let names = |v: &[u64]| -> Vec<(&str, u64)> {
            v.iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| (weir_common::STAT_NAMES[i], *n))
                .collect()
        };
        assert_eq!(names(&delta), names(&expected), "{name} step {i}: counters");
    }
}

macro_rules! fixtures {
    ($($name:ident => $body:expr;)*) => {
        $(
            #[test]
            #[ignore = "needs root: run with cargo xtask test"]
            fn $name() {
                let (desired, steps): (Desired, Vec<Step>) = $body;
                run_case(stringify!($name), desired, steps);
            }
        )*

        /// Every case above, by name, for `every_case_with_helper_calls_only`.
        fn all_cases() -> Vec<(&'static str, fn() -> (Desired, Vec<Step>))> {
            vec![$((stringify!($name), || $body)),*]
        }
    };
}

/// Every case of `fixtures!` again with the object loaded as for a kernel of which the loader
/// knows nothing (`kernel_facts`): L4 checksums then go through `bpf_l4_csum_replace`, the
/// clock through `bpf_ktime_get_coarse_ns`, and the frames must come out the same.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn every_case_with_helper_calls_only() {
    let cases = all_cases();
    assert!(cases.len() >= 19);
    for (name, case) in cases {
        let (desired, steps) = case();
        let mut h = Harness::without_kernel_facts().expect("load the production object");
        h.program(&desired);
        run_steps(&mut h, &format!("{name} (helpers)"), steps);
    }
}

fn icmp4_port_unreachable(orig: &[u8]) -> Vec<u8> {
    let ip = &orig[14..34];
    let quote_len = if ip[9] == PROTO_TCP { 40 } else { 28 };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(HOST_MAC, POD_MAC)
        .ipv4(
            ip[16..20].try_into().unwrap(),
            ip[12..16].try_into().unwrap(),
            64,
        )
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut v, &orig[14..14 + quote_len])
        .unwrap();
    v
}

fn icmp6_port_unreachable(orig: &[u8]) -> Vec<u8> {
    let ip = &orig[14..54];
    let quote_len = if ip[6] == PROTO_TCP { 60 } else { 48 };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(HOST_MAC, POD_MAC)
        .ipv6(
            ip[24..40].try_into().unwrap(),
            ip[8..24].try_into().unwrap(),
            64,
        )
        .icmpv6(Icmpv6Type::DestinationUnreachable(
            DestUnreachableCode::Port,
        ))
        .write(&mut v, &orig[14..14 + quote_len])
        .unwrap();
    v
}

/// The conntrack key of a TCP flow `src:sport → dst:dport`.
fn tcp_ct_key(src: &str, sport: u16, dst: &str, dport: u16) -> weir_common::CtKey {
    let a = |ip: &str| weir_proxy::datapath::addr::to_addr(ip.parse().unwrap());
    weir_common::CtKey {
        src: a(src),
        dst: a(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

fn with_zero_udp_checksum(mut f: Vec<u8>) -> Vec<u8> {
    f[14 + 20 + 6] = 0;
    f[14 + 20 + 7] = 0;
    f
}

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
    lb4_unknown_port_passes => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 81, Tcp::Syn), OK, Out::Same, &[(Stat::PassNoService, 1)]),
    ]);
    lb4_pod_to_pod_passes => (services(), vec![
        step(tcp(CLI4, 40000, "198.18.1.12", 8080, Tcp::Syn), OK, Out::Same, &[(Stat::PassNoService, 1)]),
    ]);
    lb4_protocol_mismatch_passes => (services(), vec![
        step(udp(CLI4, 40000, VIP4, 80, b"x"), OK, Out::Same, &[(Stat::PassNoService, 1)]),
    ]);
    lb4_no_endpoints_tcp_icmp_reject => {
        let syn = tcp(CLI4, 40000, EMPTY4, 80, Tcp::Syn);
        let icmp = icmp4_port_unreachable(&syn);
        (services(), vec![step(syn, REDIRECT, Out::Exact(icmp), &[(Stat::RejectNoBackend, 1)])])
    };
    lb4_no_endpoints_udp_icmp_reject => {
        let req = udp(CLI4, 40000, EMPTY4, 53, b"7");
        let icmp = icmp4_port_unreachable(&req);
        (services(), vec![step(req, REDIRECT, Out::Exact(icmp), &[(Stat::RejectNoBackend, 1)])])
    };
    lb6_no_endpoints_tcp_icmp6_reject => {
        let syn = tcp(CLI6, 40000, EMPTY6, 80, Tcp::Syn);
        let icmp = icmp6_port_unreachable(&syn);
        (services(), vec![step(syn, REDIRECT, Out::Exact(icmp), &[(Stat::RejectNoBackend, 1)])])
    };
    lb4_hairpin_snat_to_vip_and_back => {
        let mut d = services();
        d.insert(fe(VIP4, 80, PROTO_TCP), svc(&["198.18.1.10:8080"]));
        (d, vec![
            // The pod reaches itself through its service: the source becomes the VIP, or the
            // pod's kernel would drop a packet from its own address arriving from outside.
            step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), REDIRECT, Out::Exact(routed(tcp(VIP4, 40000, CLI4, 8080, Tcp::Syn))),
                 &[(Stat::DnatNew, 1), (Stat::Hairpin, 1), (Stat::Routed, 1)]),
            step(tcp(CLI4, 8080, VIP4, 40000, Tcp::Ack), REDIRECT, Out::Exact(routed(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack))), &[(Stat::RevNat, 1), (Stat::Routed, 1)]),
            step(tcp(CLI4, 40000, VIP4, 80, Tcp::Ack), REDIRECT, Out::Exact(routed(tcp(VIP4, 40000, CLI4, 8080, Tcp::Ack))), &[(Stat::DnatEstablished, 1), (Stat::Routed, 1)]),
        ])
    };
    lb4_syn_on_a_closed_flow_is_a_new_flow => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Fin), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Fin)), &[(Stat::DnatEstablished, 1)]),
        // The client reuses the port for a new connection: a fresh choice, not the old flow.
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
    ]);
    // An established flow's packets after the first are translated from the flow cache: the
    // same frames, counted as hits too. FIN, RST and SYN always take conntrack, and a flow
    // reopened on the same ports is not translated from the old flow's slot.
    lb4_established_flows_are_translated_from_the_flow_cache => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Ack), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack)), &[(Stat::DnatEstablished, 1)]),
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Ack), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack)), &[(Stat::DnatEstablished, 1), (Stat::FlowCacheHit, 1)]),
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Fin), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Fin)), &[(Stat::DnatEstablished, 1)]),
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Ack), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack)), &[(Stat::DnatEstablished, 1)]),
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Ack), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack)), &[(Stat::DnatEstablished, 1), (Stat::FlowCacheHit, 1)]),
        step(udp(CLI4, 40000, VIP4, 53, b"7"), OK, Out::Exact(udp(CLI4, 40000, BE4, 5353, b"7")), &[(Stat::DnatNew, 1)]),
        step(udp(CLI4, 40000, VIP4, 53, b"8"), OK, Out::Exact(udp(CLI4, 40000, BE4, 5353, b"8")), &[(Stat::DnatEstablished, 1)]),
        step(udp(CLI4, 40000, VIP4, 53, b"9"), OK, Out::Exact(udp(CLI4, 40000, BE4, 5353, b"9")), &[(Stat::DnatEstablished, 1), (Stat::FlowCacheHit, 1)]),
        // A datagram without a checksum keeps none.
        step(with_zero_udp_checksum(udp(CLI4, 40001, VIP4, 53, b"7")), OK,
             Out::Exact(with_zero_udp_checksum(udp(CLI4, 40001, BE4, 5353, b"7"))), &[(Stat::DnatNew, 1)]),
        step(with_zero_udp_checksum(udp(CLI4, 40001, VIP4, 53, b"8")), OK,
             Out::Exact(with_zero_udp_checksum(udp(CLI4, 40001, BE4, 5353, b"8"))), &[(Stat::DnatEstablished, 1)]),
        step(with_zero_udp_checksum(udp(CLI4, 40001, VIP4, 53, b"9")), OK,
             Out::Exact(with_zero_udp_checksum(udp(CLI4, 40001, BE4, 5353, b"9"))), &[(Stat::DnatEstablished, 1), (Stat::FlowCacheHit, 1)]),
    ]);
    lb6_established_flows_are_translated_from_the_flow_cache => (services(), vec![
        step(tcp(CLI6, 40000, VIP6, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI6, 40000, BE6, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        step(tcp(CLI6, 40000, VIP6, 80, Tcp::Ack), OK, Out::Exact(tcp(CLI6, 40000, BE6, 8080, Tcp::Ack)), &[(Stat::DnatEstablished, 1)]),
        step(tcp(CLI6, 40000, VIP6, 80, Tcp::Ack), OK, Out::Exact(tcp(CLI6, 40000, BE6, 8080, Tcp::Ack)), &[(Stat::DnatEstablished, 1), (Stat::FlowCacheHit, 1)]),
        step(tcp(CLI6, 40000, VIP6, 80, Tcp::Rst), OK, Out::Exact(tcp(CLI6, 40000, BE6, 8080, Tcp::Rst)), &[(Stat::DnatEstablished, 1)]),
        step(udp(CLI6, 40000, VIP6, 53, b"7"), OK, Out::Exact(udp(CLI6, 40000, BE6, 5353, b"7")), &[(Stat::DnatNew, 1)]),
        step(udp(CLI6, 40000, VIP6, 53, b"8"), OK, Out::Exact(udp(CLI6, 40000, BE6, 5353, b"8")), &[(Stat::DnatEstablished, 1)]),
        step(udp(CLI6, 40000, VIP6, 53, b"9"), OK, Out::Exact(udp(CLI6, 40000, BE6, 5353, b"9")), &[(Stat::DnatEstablished, 1), (Stat::FlowCacheHit, 1)]),
    ]);
    lb4_direct_connection_clears_a_stale_reply_entry => (services(), vec![
        step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        // Same ports, straight to the backend (socket LB, or a pod-IP client): not a service.
        step(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn), OK, Out::Same, &[(Stat::PassNoService, 1)]),
        // Its replies must reach the client untouched, not rewritten to the VIP.
        step(tcp(BE4, 8080, CLI4, 40000, Tcp::Ack), OK, Out::Same, &[(Stat::PassNoService, 1)]),
    ]);
    lb4_tc_from_netdev_dnat => (services(), vec![Step {
        prog: TC_FROM_NETDEV,
        input: tcp("198.18.0.99", 40000, VIP4, 80, Tcp::Syn),
        verdict: OK,
        out: Out::Exact(tcp("198.18.0.99", 40000, BE4, 8080, Tcp::Syn)),
        stats: &[(Stat::DnatNew, 1)],
    }]);
    // externalTrafficPolicy Local: an uplink's traffic gets the external entry (this node's
    // endpoints), pods get the cluster-wide one (kube-proxy's short-circuit).
    lb4_external_policy_local_splits_uplink_and_pod_traffic => {
        let mut d = services();
        d.insert(fe(VIP4, 80, PROTO_TCP).external(), svc(&["198.18.1.12:8080"]));
        (d, vec![
            Step {
                prog: TC_FROM_NETDEV,
                input: tcp("198.18.0.99", 40000, VIP4, 80, Tcp::Syn),
                verdict: OK,
                out: Out::Exact(tcp("198.18.0.99", 40000, "198.18.1.12", 8080, Tcp::Syn)),
                stats: &[(Stat::DnatNew, 1)],
            },
            step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        ])
    };
    // With endpoints elsewhere but none on this node, kube-proxy drops (not rejects) the
    // traffic its Local policy covers; the rest still reaches the cluster's endpoints.
    lb4_external_policy_local_without_local_endpoint_drops => {
        let mut d = services();
        d.insert(fe(VIP4, 80, PROTO_TCP).external(), ServiceSpec { drop_when_empty: true, ..svc(&[]) });
        (d, vec![
            Step {
                prog: TC_FROM_NETDEV,
                input: tcp("198.18.0.99", 40000, VIP4, 80, Tcp::Syn),
                verdict: SHOT,
                out: Out::Same,
                stats: &[(Stat::DropNoLocalBackend, 1)],
            },
            step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        ])
    };
    lb4_internal_policy_local_without_local_endpoint_drops => {
        let mut d = services();
        d.insert(fe(EMPTY4, 80, PROTO_TCP), ServiceSpec { drop_when_empty: true, ..svc(&[]) });
        (d, vec![step(tcp(CLI4, 40000, EMPTY4, 80, Tcp::Syn), SHOT, Out::Same, &[(Stat::DropNoLocalBackend, 1)])])
    };
    // BPF_PROG_TEST_RUN itself refuses frames shorter than an Ethernet plus an IP header, so
    // those truncations are covered where the kernel lets a frame through: options or a
    // transport header running past the end.
    bad_ipv4_options_past_the_end_dropped => {
        let mut f = tcp(CLI4, 40000, VIP4, 80, Tcp::Syn)[..14 + 20 + 2].to_vec();
        f[14] = 0x46;
        (services(), vec![step(f, SHOT, Out::Same, &[(Stat::DropTruncated, 1)])])
    };
    bad_ipv4_ihl_too_small_dropped => {
        let mut f = tcp(CLI4, 40000, VIP4, 80, Tcp::Syn);
        f[14] = 0x43;
        (services(), vec![step(f, SHOT, Out::Same, &[(Stat::DropMalformed, 1)])])
    };
    bad_ipv4_version_dropped => {
        let mut f = tcp(CLI4, 40000, VIP4, 80, Tcp::Syn);
        f[14] = 0x65;
        (services(), vec![step(f, SHOT, Out::Same, &[(Stat::DropMalformed, 1)])])
    };
    bad_tcp_data_offset_too_small_dropped => {
        let mut f = tcp(CLI4, 40000, VIP4, 80, Tcp::Syn);
        f[14 + 20 + 12] = 0x30;
        (services(), vec![step(f, SHOT, Out::Same, &[(Stat::DropMalformed, 1)])])
    };
    bad_truncated_tcp_header_dropped => {
        let f = tcp(CLI4, 40000, VIP4, 80, Tcp::Syn)[..14 + 20 + 10].to_vec();
        (services(), vec![step(f, SHOT, Out::Same, &[(Stat::DropTruncated, 1)])])
    };
    bad_truncated_udp_header_dropped => {
        let f = udp(CLI4, 40000, VIP4, 53, b"")[..14 + 20 + 6].to_vec();
        (services(), vec![step(f, SHOT, Out::Same, &[(Stat::DropTruncated, 1)])])
    };
    bad_ipv6_missing_transport_header_dropped => {
        let f = tcp(CLI6, 40000, VIP6, 80, Tcp::Syn)[..14 + 40 + 3].to_vec();
        (services(), vec![step(f, SHOT, Out::Same, &[(Stat::DropTruncated, 1)])])
    };
    arp_passes => {
        let mut f = vec![0u8; 42];
        f[..6].copy_from_slice(&[0xff; 6]);
        f[12] = 0x08;
        f[13] = 0x06;
        (services(), vec![step(f, OK, Out::Same, &[(Stat::PassNonIp, 1)])])
    };
    icmp_echo_passes => {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
            .ipv4([198, 18, 1, 10], [198, 19, 0, 10], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut f, b"ping")
            .unwrap();
        (services(), vec![step(f, OK, Out::Same, &[(Stat::PassOtherProto, 1)])])
    };
    ipv4_later_fragment_passes => {
        let mut f = udp(CLI4, 40000, VIP4, 53, b"7");
        // Fragment offset 8 (in 8-byte units): no transport header here.
        f[14 + 6] = 0x00;
        f[14 + 7] = 0x08;
        (services(), vec![step(f, OK, Out::Same, &[(Stat::PassOtherProto, 1)])])
    };
}

/// The destination address and port of an output IPv4 frame.
fn dst4(frame: &[u8]) -> SocketAddr {
    let ip: [u8; 4] = frame[30..34].try_into().unwrap();
    SocketAddr::from((ip, u16::from_be_bytes([frame[36], frame[37]])))
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

fn three_backends(maglev: bool, affinity: Option<u32>) -> ServiceSpec {
    ServiceSpec {
        maglev,
        affinity_timeout_s: affinity,
        ..svc(&["198.18.1.11:8080", "198.18.1.12:8080", "198.18.1.13:8080"])
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn lb4_random_spreads_new_flows_over_backends() {
    let mut h = Harness::new().unwrap();
    h.program(&Desired::from([(
        fe(VIP4, 80, PROTO_TCP),
        three_backends(false, None),
    )]));
    let mut seen = std::collections::BTreeMap::<SocketAddr, u32>::new();
    for sport in 40000..40300 {
        let (v, out) = h.run(TC_FROM_POD, &tcp(CLI4, sport, VIP4, 80, Tcp::Syn));
        assert_eq!(v, OK);
        *seen.entry(dst4(&out)).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.values().all(|n| (60..=140).contains(n)),
        "uneven: {seen:?}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn lb4_affinity_keeps_a_client_on_its_backend() {
    let mut h = Harness::new().unwrap();
    h.program(&Desired::from([(
        fe(VIP4, 80, PROTO_TCP),
        three_backends(false, Some(60)),
    )]));
    let before = h.stats();
    let mut seen = std::collections::BTreeSet::new();
    for sport in 40000..40020 {
        let (_, out) = h.run(TC_FROM_POD, &tcp(CLI4, sport, VIP4, 80, Tcp::Syn));
        seen.insert(dst4(&out));
    }
    assert_eq!(seen.len(), 1, "one client, one backend: {seen:?}");
    let hits = h.stats()[Stat::AffinityHit as usize] - before[Stat::AffinityHit as usize];
    assert_eq!(hits, 19);
    // Other clients are spread as usual.
    let mut others = std::collections::BTreeSet::new();
    for i in 20..80u8 {
        let (_, out) = h.run(
            TC_FROM_POD,
            &tcp(&format!("198.18.2.{i}"), 40000, VIP4, 80, Tcp::Syn),
        );
        others.insert(dst4(&out));
    }
    assert_eq!(others.len(), 3, "{others:?}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn lb4_maglev_stable_when_a_backend_is_removed() {
    let mut h = Harness::new().unwrap();
    let web = fe(VIP4, 80, PROTO_TCP);
    h.program(&Desired::from([(web, three_backends(true, None))]));
    let flows: Vec<u16> = (40000..40200).collect();
    let pick = |h: &mut Harness| -> Vec<SocketAddr> {
        flows
            .iter()
            .map(|sport| {
                let (v, out) = h.run(TC_FROM_POD, &tcp(CLI4, *sport, VIP4, 80, Tcp::Syn));
                assert_eq!(v, OK);
                dst4(&out)
            })
            .collect()
    };
    let first = pick(&mut h);
    h.clear_ct();
    // Same flows again: Maglev, not conntrack, decides.
    assert_eq!(pick(&mut h), first, "Maglev is deterministic");
    let used: std::collections::BTreeSet<_> = first.iter().collect();
    assert_eq!(used.len(), 3, "{used:?}");
    h.clear_ct();
    let removed: SocketAddr = "198.18.1.12:8080".parse().unwrap();
    let mut two = three_backends(true, None);
    two.backends.retain(|b| *b != removed);
    h.program(&Desired::from([(web, two)]));
    let second = pick(&mut h);
    let mut live = 0;
    let mut moved = Vec::new();
    for (i, (a, b)) in first.iter().zip(&second).enumerate() {
        assert_ne!(*b, removed, "flow {i} still on the removed backend");
        if *a != removed {
            live += 1;
            if a != b {
                moved.push((i, *a, *b));
            }
        }
    }
    eprintln!(
        "maglev: {} of {live} flows of live backends moved",
        moved.len()
    );
    // Maglev promises minimal, not zero, disruption: with M = 1021 and 3 backends about 1 % of
    // the table changes owner among live backends.
    assert!(
        moved.len() * 100 <= live * 2,
        "{} of {live} flows of live backends moved: {moved:?}",
        moved.len()
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn reject_output_checksums_are_valid() {
    let mut h = Harness::new().unwrap();
    h.program(&services());
    for frame in [
        tcp(CLI4, 40000, EMPTY4, 80, Tcp::Syn),
        udp(CLI4, 40000, EMPTY4, 53, b"x"),
    ] {
        let (v, out) = h.run(TC_FROM_POD, &frame);
        assert_eq!(v, REDIRECT);
        assert!(checksum_ok(&out[14..34]), "IPv4 header checksum");
        assert!(checksum_ok(&out[34..]), "ICMP checksum");
        assert_eq!(&out[34..36], &[3, 3], "destination unreachable, port");
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn lb4_affinity_expires_after_its_timeout() {
    let mut h = Harness::new().unwrap();
    h.program(&Desired::from([(
        fe(VIP4, 80, PROTO_TCP),
        three_backends(false, Some(1)),
    )]));
    let (_, out) = h.run(TC_FROM_POD, &tcp(CLI4, 40000, VIP4, 80, Tcp::Syn));
    let first = dst4(&out);
    let (_, out) = h.run(TC_FROM_POD, &tcp(CLI4, 40001, VIP4, 80, Tcp::Syn));
    assert_eq!(
        dst4(&out),
        first,
        "within the timeout the client keeps its backend"
    );
    // Past the timeout (1 s), new flows are balanced again: with three backends, 40 flows all
    // landing on the first one would be a (1/3)^39 chance.
    std::thread::sleep(std::time::Duration::from_millis(1300));
    let mut seen = std::collections::BTreeSet::new();
    for sport in 41000..41040 {
        h.clear_ct();
        // Each flow refreshes the entry, so let it lapse again between flows.
        let (_, out) = h.run(TC_FROM_POD, &tcp(CLI4, sport, VIP4, 80, Tcp::Syn));
        seen.insert(dst4(&out));
        if seen.len() > 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert!(seen.len() > 1, "affinity never expired: {seen:?}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn lb4_affinity_ends_when_the_backend_leaves_the_service() {
    // The same pod backs two services; it leaves the first one only. Clients of the first one
    // that were stuck to it must be balanced over what is left, not sent to a pod that is no
    // longer an endpoint of that service.
    let mut h = Harness::new().unwrap();
    let sticky = fe(VIP4, 80, PROTO_TCP);
    let other = fe("198.19.0.20", 80, PROTO_TCP);
    let shared: SocketAddr = "198.18.1.11:8080".parse().unwrap();
    let mut d = Desired::from([
        (
            sticky,
            ServiceSpec {
                affinity_timeout_s: Some(600),
                ..svc(&["198.18.1.11:8080"])
            },
        ),
        (other, svc(&["198.18.1.11:8080"])),
    ]);
    h.program(&d);
    let (_, out) = h.run(TC_FROM_POD, &tcp(CLI4, 40000, VIP4, 80, Tcp::Syn));
    assert_eq!(dst4(&out), shared);
    d.insert(
        sticky,
        ServiceSpec {
            affinity_timeout_s: Some(600),
            ..svc(&["198.18.1.12:8080"])
        },
    );
    h.program(&d);
    let (_, out) = h.run(TC_FROM_POD, &tcp(CLI4, 40001, VIP4, 80, Tcp::Syn));
    assert_eq!(
        dst4(&out),
        "198.18.1.12:8080".parse().unwrap(),
        "affinity outlived the endpoint"
    );
}

/// Runs one frame entering on `dev`: the verdict, the frame that leaves and the counters that
/// moved.
fn step_on(
    h: &mut Harness,
    prog: &str,
    frame: &[u8],
    dev: &str,
) -> (u32, Vec<u8>, Vec<&'static str>) {
    let before = h.stats();
    let ingress = if dev == "lo" { 1 } else { h.ifindex(dev) };
    let (verdict, out) = h.run_on(prog, frame, ingress);
    let moved = h
        .stats()
        .iter()
        .zip(&before)
        .enumerate()
        .flat_map(|(i, (a, b))| std::iter::repeat_n(weir_common::STAT_NAMES[i], (a - b) as usize))
        .collect();
    (verdict, out, moved)
}

/// Runs `frame` through `prog` entering on `dev`, and checks the verdict, the exact frame that
/// leaves and the counters that moved.
fn expect(
    h: &mut Harness,
    what: &str,
    (prog, dev): (&str, &str),
    frame: Vec<u8>,
    (verdict, want): (u32, Vec<u8>),
    moved: &[&str],
) {
    let (v, out, got) = step_on(h, prog, &frame, dev);
    assert_eq!(v, verdict, "{what}: verdict");
    assert!(out == want, "{what}: frame\n{}", hexdiff(&out, &want));
    assert_eq!(got, moved, "{what}: counters");
}

/// The TCP source port of an Ethernet frame.
fn tcp_sport(frame: &[u8]) -> u16 {
    let l4 = if frame[12..14] == [0x86, 0xdd] {
        14 + 40
    } else {
        14 + 20
    };
    u16::from_be_bytes([frame[l4], frame[l4 + 1]])
}

fn nodeport(node: &str, backend: &str) -> Desired {
    Desired::from([(
        fe(node, 30080, PROTO_TCP),
        ServiceSpec {
            name: "demo/np:http".into(),
            backends: vec![SocketAddr::new(backend.parse().unwrap(), 8080)],
            ..Default::default()
        },
    )])
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

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_local_traffic_policy_is_never_source_nated() {
    // The external entry of an `externalTrafficPolicy: Local` service; its endpoint behind
    // the uplink only to show that the scope alone decides.
    let mut h = Harness::new().unwrap();
    let mut d = nodeport(NODE4, REMOTE_POD4);
    let spec = d.values().next().unwrap().clone();
    d.insert(fe(NODE4, 30080, PROTO_TCP).external(), spec);
    h.program(&d);
    expect(
        &mut h,
        "SYN",
        (TC_FROM_NETDEV, UPLINK),
        tcp(EXTERNAL4, 40000, NODE4, 30080, Tcp::Syn),
        (OK, tcp(EXTERNAL4, 40000, REMOTE_POD4, 8080, Tcp::Syn)),
        &["dnat_new"],
    );
}

/// Creates and pins an LRU hash map as an older weir would have (BPF_MAP_CREATE, BPF_OBJ_PIN).
fn pin_lru_map(path: &std::path::Path, name: &str, key_size: u32, value_size: u32) {
    pin_map(
        path, name, 9, /* LRU_HASH */
        key_size, value_size, 1024,
    );
}

/// Creates and pins a map of `kind` (a `bpf_map_type`) with the sizes given.
fn pin_map(path: &std::path::Path, name: &str, kind: u32, key: u32, value: u32, entries: u32) {
    let mut create = [0u8; 72];
    for (i, v) in [kind, key, value, entries].iter().enumerate() {
        create[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    create[28..28 + name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: BPF_MAP_CREATE with an attribute buffer of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, create.as_ptr(), create.len()) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = [0u8; 16];
    pin[..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
    pin[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: BPF_OBJ_PIN with a path that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_ptr(), pin.len()) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our own descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

/// An upgrade that adds counters: the counters map the previous version pinned (fewer
/// entries) is made anew at this version's size with its counts carried over, so the new
/// counters count and every counter reads (`weir status` failed on the missing ones). A
/// pinned map of another shape is refused with an error that names it, not misread.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_upgrade_with_more_counters_keeps_the_counts() {
    use aya::maps::{MapData, PerCpuArray, PerCpuValues};
    use weir_common::{map_names, STAT_COUNT};
    let cpus = aya::util::nr_cpus().unwrap();
    let mut h = Harness::new_with(|maps| {
        pin_map(
            &maps.join(map_names::STATS),
            map_names::STATS,
            6, /* PERCPU_ARRAY */
            4,
            8,
            STAT_COUNT - 2,
        );
        let mut old: PerCpuArray<MapData, u64> =
            weir_proxy::datapath::open_typed(maps, map_names::STATS)?;
        let dnat_new = Stat::DnatNew as u32;
        old.set(dnat_new, PerCpuValues::try_from(vec![3u64; cpus])?, 0)?;
        Ok(())
    })
    .expect("load over the smaller counters map");
    let info = aya::maps::MapInfo::from_pin(h.maps_dir().join(map_names::STATS)).unwrap();
    assert_eq!(info.max_entries(), STAT_COUNT, "the counters map's size");
    let before = h.stats();
    assert_eq!(
        before[Stat::DnatNew as usize],
        3 * cpus as u64,
        "carried over"
    );
    h.program(&services());
    let (_, _, moved) = step_on(
        &mut h,
        TC_FROM_POD,
        &tcp(CLI4, 40000, VIP4, 80, Tcp::Syn),
        "lo",
    );
    assert_eq!(moved, ["dnat_new"]);
    assert_eq!(h.stats()[Stat::DnatNew as usize], 3 * cpus as u64 + 1);
    // The last counter of this version counts too: a node-local query.
    let mut d = services();
    d.get_mut(&fe(VIP4, 53, PROTO_UDP)).unwrap().node_local = true;
    h.program(&d);
    lease(&h, true);
    let (_, _, moved) = step_on(&mut h, TC_FROM_POD, &udp(CLI4, 40000, VIP4, 53, b"7"), "lo");
    assert_eq!(moved, ["dnat_new", "node_local"]);

    let err = Harness::new_with(|maps| {
        pin_map(
            &maps.join(map_names::BACKENDS),
            map_names::BACKENDS,
            1, /* HASH */
            4,
            4,
            16,
        );
        Ok(())
    })
    .err()
    .expect("a backends map of another shape is refused");
    let err = format!("{err:#}");
    assert!(
        err.contains(map_names::BACKENDS) && err.contains("would be misread"),
        "{err}"
    );
}

/// A removed UDP backend's flows are found by reading the conntrack map in batches: among
/// 60 000 IPv4 and 20 000 IPv6 flows (UDP and TCP, four backends), exactly the UDP flows of
/// the removed backends go, from both conntrack maps, in several batches (more entries than
/// one holds).
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn udp_flows_of_removed_backends_are_purged_from_a_full_conntrack_map() {
    use weir_common::{Ct4Key, CtKey, CtValue};
    use weir_proxy::datapath::{dump_batched, AyaMaps, MapWriter};
    let h = Harness::new().unwrap();
    let mut ct = h.ct_map();
    // Flows 0..N4 are IPv4 (in CT4, under their 16-byte tuple), the rest IPv6 (in CT6).
    const N4: u32 = 60_000;
    const N6: u32 = 20_000;
    let flow = |i: u32| {
        let (src, dst) = if i < N4 {
            (
                std::net::Ipv4Addr::from(0xc612_0000 + i).into(),
                VIP4.parse().unwrap(),
            )
        } else {
            let src =
                std::net::Ipv6Addr::from(0xfd00_0018_0000_0000_0000_0000_0000_0000 + i as u128);
            (src.into(), VIP6.parse().unwrap())
        };
        let key = CtKey {
            src: to_addr(src),
            dst: to_addr(dst),
            sport: 40000u16.to_be(),
            dport: 53u16.to_be(),
            proto: if i.is_multiple_of(3) {
                PROTO_TCP
            } else {
                PROTO_UDP
            },
            _pad: [0; 3],
        };
        let value = CtValue {
            backend_id: i % 4,
            expires_ns: u64::MAX,
            ..Default::default()
        };
        (key, value)
    };
    let n = N4 + N6;
    for i in 0..n {
        let (k, v) = flow(i);
        ct.insert(&k, &v, 0).unwrap();
    }
    // Each family in its own map, read in batches, every entry once.
    let raw = aya::maps::MapData::from_pin(h.maps_dir().join(weir_common::map_names::CT4)).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let batched = dump_batched::<Ct4Key, CtValue>(&raw, |k, _| {
        assert!(seen.insert(k.src), "read twice");
    })
    .unwrap();
    assert!(batched, "batched reads");
    assert_eq!(seen.len(), N4 as usize, "every IPv4 entry read once");
    let raw = aya::maps::MapData::from_pin(h.maps_dir().join(weir_common::map_names::CT6)).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let batched = dump_batched::<CtKey, CtValue>(&raw, |k, _| {
        assert!(seen.insert(k.src.0), "read twice");
    })
    .unwrap();
    assert!(batched, "batched reads");
    assert_eq!(seen.len(), N6 as usize, "every IPv6 entry read once");
    // What the agent's conntrack gauges report (`weir_map_entries{map="conntrack_ipv4"}`).
    assert_eq!(ct.counts().unwrap(), (N4 as usize, N6 as usize));
    let mut maps = AyaMaps::open(&h.maps_dir()).unwrap();
    let started = std::time::Instant::now();
    let purged = maps
        .purge_udp_flows(&std::collections::BTreeSet::from([1, 2]))
        .unwrap();
    eprintln!("purge among {n} flows: {:?}", started.elapsed());
    let doomed = |i: u32| !i.is_multiple_of(3) && (i % 4 == 1 || i % 4 == 2);
    assert_eq!(purged, (0..n).filter(|&i| doomed(i)).count());
    let (v4, v6) = ct.counts().unwrap();
    assert_eq!(v4 + v6, n as usize - purged, "counted after the purge");
    for i in 0..n {
        let (k, _) = flow(i);
        assert_eq!(ct.get(&k).unwrap().is_some(), !doomed(i), "flow {i}");
    }
}

/// Flows tracked by the conntrack layout of earlier versions (`CT_V1`) keep working after an
/// upgrade: the new agent moves them to today's maps, with the hairpin peer the old programs
/// took from the packet, and unpins the old map.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_upgrade_keeps_the_flows_of_the_previous_conntrack_layout() {
    use weir_common::{CtKey, CT_F_HAIRPIN};
    use weir_proxy::datapath::migrate::{CtValueV1, CT_V1};
    let a = |ip: &str| weir_proxy::datapath::addr::to_addr(ip.parse().unwrap());
    let key = tcp_ct_key;
    let value = |nat: &str, port: u16, dir: u8, flags: u8| CtValueV1 {
        nat_addr: a(nat),
        nat_port: port.to_be(),
        dir,
        flags,
        expires_ns: u64::MAX,
        ..Default::default()
    };
    let mut old_path = None;
    let mut h = Harness::new_with(|maps| {
        pin_lru_map(&maps.join(CT_V1), CT_V1, 40, 40);
        let mut old: aya::maps::HashMap<aya::maps::MapData, CtKey, CtValueV1> =
            weir_proxy::datapath::open_typed(maps, CT_V1)?;
        // A plain flow, both ways, and a hairpin one (the pod is its own backend).
        for (k, v) in [
            (
                key(CLI4, 40000, VIP4, 80),
                value(BE4, 8080, CT_DIR_FORWARD, 0),
            ),
            (
                key(BE4, 8080, CLI4, 40000),
                value(VIP4, 80, CT_DIR_REPLY, 0),
            ),
            (
                key(CLI4, 40001, VIP4, 80),
                value(CLI4, 8080, CT_DIR_FORWARD, CT_F_HAIRPIN),
            ),
            (
                key(CLI4, 8080, VIP4, 40001),
                value(VIP4, 80, CT_DIR_REPLY, CT_F_HAIRPIN),
            ),
        ] {
            old.insert(k, v, 0)?;
        }
        old_path = Some(maps.join(CT_V1));
        Ok(())
    })
    .unwrap();
    assert!(!old_path.unwrap().exists(), "CT_V1 still pinned");
    assert_eq!(h.ct().len(), 4, "every flow moved");
    // Each packet of both flows is translated as before the upgrade (no service is programmed:
    // conntrack alone decides).
    for (input, verdict, want) in [
        (
            tcp(CLI4, 40000, VIP4, 80, Tcp::Ack),
            OK,
            tcp(CLI4, 40000, BE4, 8080, Tcp::Ack),
        ),
        (
            tcp(BE4, 8080, CLI4, 40000, Tcp::Ack),
            REDIRECT,
            routed(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack)),
        ),
        (
            tcp(CLI4, 40001, VIP4, 80, Tcp::Ack),
            REDIRECT,
            routed(tcp(VIP4, 40001, CLI4, 8080, Tcp::Ack)),
        ),
        (
            tcp(CLI4, 8080, VIP4, 40001, Tcp::Ack),
            REDIRECT,
            routed(tcp(VIP4, 80, CLI4, 40001, Tcp::Ack)),
        ),
    ] {
        let (v, out) = h.run(TC_FROM_POD, &input);
        assert_eq!(v, verdict);
        assert!(out == want, "{}", hexdiff(&out, &want));
    }
}

/// The flows of `CT_V2` (both families under one 40-byte key) move to the per-family maps on
/// an upgrade: those there at the load, and those the old programs add until the new ones
/// replace them all (the second pass), where an entry the new programs wrote stays. The old
/// map is unpinned only then, and IPv4 flows are translated from `CT4_V1` as before.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_upgrade_moves_the_flows_of_the_shared_conntrack_map_to_one_per_family() {
    use weir_common::{CtKey, CtValue, CT_DIR_REPLY};
    use weir_proxy::datapath::migrate::{migrate_ct, CT_V2};
    let a = |ip: &str| weir_proxy::datapath::addr::to_addr(ip.parse().unwrap());
    let key = tcp_ct_key;
    let value = |nat: &str, port: u16, dir: u8| CtValue {
        nat_addr: a(nat),
        nat_port: port.to_be(),
        dir,
        expires_ns: u64::MAX,
        ..Default::default()
    };
    let mut h = Harness::new().unwrap();
    let maps = h.maps_dir();
    // The old map as an earlier agent left it, its programs still attached.
    pin_lru_map(&maps.join(CT_V2), CT_V2, 40, 56);
    let mut old: aya::maps::HashMap<aya::maps::MapData, CtKey, CtValue> =
        weir_proxy::datapath::open_typed(&maps, CT_V2).unwrap();
    for (k, v) in [
        (key(CLI4, 40000, VIP4, 80), value(BE4, 8080, CT_DIR_FORWARD)),
        (key(BE4, 8080, CLI4, 40000), value(VIP4, 80, CT_DIR_REPLY)),
        (key(CLI6, 40000, VIP6, 80), value(BE6, 8080, CT_DIR_FORWARD)),
    ] {
        old.insert(k, v, 0).unwrap();
    }
    // The load's pass: copied, the old map kept for the old programs.
    assert_eq!(migrate_ct(&maps, false).unwrap(), 3);
    assert!(
        maps.join(CT_V2).exists(),
        "CT_V2 unpinned while still in use"
    );
    // Meanwhile an old program opens a flow, and a new one refreshes an entry.
    old.insert(
        key(CLI4, 40001, VIP4, 80),
        value(BE4, 8080, CT_DIR_FORWARD),
        0,
    )
    .unwrap();
    let newer = CtValue {
        expires_ns: u64::MAX - 1,
        ..value(BE6, 8080, CT_DIR_FORWARD)
    };
    h.ct_map()
        .insert(&key(CLI6, 40000, VIP6, 80), &newer, 0)
        .unwrap();
    assert_eq!(h.dp.finish_ct_migration().unwrap(), 1, "only the new flow");
    assert!(!maps.join(CT_V2).exists(), "CT_V2 still pinned");
    let ct = h.ct_map();
    assert_eq!(h.ct().len(), 4);
    assert_eq!(
        ct.get(&key(CLI6, 40000, VIP6, 80)).unwrap(),
        Some(newer),
        "the new programs' entry stays"
    );
    for (k, map) in [
        (key(CLI4, 40001, VIP4, 80), weir_common::map_names::CT4),
        (key(CLI6, 40000, VIP6, 80), weir_common::map_names::CT6),
    ] {
        assert!(ct.get(&k).unwrap().is_some(), "{k:?} not in {map}");
    }
    // Conntrack alone decides (no service is programmed): both IPv4 flows as before.
    for (input, want) in [
        (
            tcp(CLI4, 40000, VIP4, 80, Tcp::Ack),
            tcp(CLI4, 40000, BE4, 8080, Tcp::Ack),
        ),
        (
            tcp(CLI4, 40001, VIP4, 80, Tcp::Ack),
            tcp(CLI4, 40001, BE4, 8080, Tcp::Ack),
        ),
    ] {
        let (v, out) = h.run(TC_FROM_POD, &input);
        assert_eq!(v, OK);
        assert!(out == want, "{}", hexdiff(&out, &want));
    }
    let (v, out) = h.run(TC_FROM_POD, &tcp(BE4, 8080, CLI4, 40000, Tcp::Ack));
    let want = routed(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack));
    assert_eq!(v, REDIRECT);
    assert!(out == want, "{}", hexdiff(&out, &want));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_harness_removes_its_mount_and_directory() {
    let h = Harness::new().unwrap();
    let dir = h.run_dir().to_path_buf();
    let ns = h.ns.name.clone();
    assert!(dir.join("bpffs").exists());
    drop(h);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !std::path::Path::new("/run/netns").join(&ns).exists(),
        "namespace {ns} left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(dir.to_str().unwrap()),
        "bpffs left mounted"
    );
}

/// The node-local DNS lease as the agent writes it (`dns::Lease`): the node's server at
/// `NODE4`/`NODE6` port 53, valid for a minute, or withdrawn.
fn lease(h: &Harness, valid: bool) {
    let opts = weir_proxy::dns::Options {
        listen: vec![
            SocketAddr::new(NODE4.parse().unwrap(), 53),
            SocketAddr::new(NODE6.parse().unwrap(), 53),
        ],
        domain: "cluster.local".into(),
        ttl: 5,
        pods: Default::default(),
        upstreams: vec![],
        stubs: vec![],
        service: Some("kube-system/kube-dns".into()),
    };
    let mut l = weir_proxy::dns::Lease::open(&h.maps_dir(), &opts).unwrap();
    l.renew(if valid {
        std::time::Duration::from_secs(60)
    } else {
        std::time::Duration::ZERO
    })
    .unwrap();
}

fn on(prog: &'static str, input: Vec<u8>, out: Out, stats: &'static [(Stat, u64)]) -> Step {
    Step {
        prog,
        ..step(input, OK, out, stats)
    }
}

/// The cluster DNS Service on the per-packet path (socket hooks off). While the node's server
/// holds its lease, a query goes to it; its reply leaves the node itself through the pod's
/// veth, where `tc_to_pod` gives it the service's address. A packet of the node that is no
/// reply of such a flow leaves as it is. Without the lease, the Service's endpoint.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn node_local_dns_on_the_tc_path_both_ways() {
    let mut d = services();
    for f in [fe(VIP4, 53, PROTO_UDP), fe(VIP6, 53, PROTO_UDP)] {
        d.get_mut(&f).unwrap().node_local = true;
    }
    let mut h = Harness::new().expect("load the production object");
    h.program(&d);
    lease(&h, true);
    run_steps(
        &mut h,
        "node-local",
        vec![
            step(
                udp(CLI4, 40000, VIP4, 53, b"7"),
                OK,
                Out::Exact(udp(CLI4, 40000, NODE4, 53, b"7")),
                &[(Stat::NodeLocal, 1), (Stat::DnatNew, 1)],
            ),
            on(
                TC_TO_POD,
                udp(NODE4, 53, CLI4, 40000, b"a 7"),
                Out::Exact(udp(VIP4, 53, CLI4, 40000, b"a 7")),
                &[(Stat::RevNat, 1)],
            ),
            on(TC_TO_POD, udp(NODE4, 53, CLI4, 40001, b"x"), Out::Same, &[]),
            on(
                TC_TO_POD,
                tcp(NODE4, 22, CLI4, 40000, Tcp::Ack),
                Out::Same,
                &[],
            ),
            step(
                udp(CLI6, 40000, VIP6, 53, b"7"),
                OK,
                Out::Exact(udp(CLI6, 40000, NODE6, 53, b"7")),
                &[(Stat::NodeLocal, 1), (Stat::DnatNew, 1)],
            ),
            on(
                TC_TO_POD,
                udp(NODE6, 53, CLI6, 40000, b"a 7"),
                Out::Exact(udp(VIP6, 53, CLI6, 40000, b"a 7")),
                &[(Stat::RevNat, 1)],
            ),
        ],
    );
    lease(&h, false);
    run_steps(
        &mut h,
        "lease withdrawn",
        vec![
            step(
                udp(CLI4, 40002, VIP4, 53, b"8"),
                OK,
                Out::Exact(udp(CLI4, 40002, BE4, 5353, b"8")),
                &[(Stat::DnatNew, 1)],
            ),
            // The flow that went to the node's server keeps its entries until they expire
            // (its replies on the way out were translated before: from the flow cache now).
            on(
                TC_TO_POD,
                udp(NODE4, 53, CLI4, 40000, b"a 8"),
                Out::Exact(udp(VIP4, 53, CLI4, 40000, b"a 8")),
                &[(Stat::RevNat, 1), (Stat::FlowCacheHit, 1)],
            ),
        ],
    );
}

/// `frame` with these Ethernet addresses (destination, source).
fn with_macs(mut frame: Vec<u8>, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame
}

/// Translated packets to a pod of the node (its host-side veth recorded by the agent) are
/// handed straight into the pod: Ethernet addresses from the neighbour table, the TTL one
/// less, `bpf_redirect_peer`'s verdict; requests and replies, new and established flows, IPv4
/// and IPv6. A device that is not a veth with its peer in another namespace is refused. A flow
/// to a backend that is no pod's is left to the kernel's forwarding, for good (its forward
/// entry says so); a pod whose neighbour entry is not resolved gets the neighbour table.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn translated_packets_to_a_pod_go_straight_into_it() {
    use weir_common::{CtKey, CT_F_KERNEL_ROUTE, CT_F_POD_ROUTE};
    const VETH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
    const BE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x0b];
    const CLI_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x0a];
    let mut desired = services();
    // A backend behind the uplink (another node's), and a pod the node has not talked to.
    desired.insert(fe("198.19.0.20", 80, PROTO_TCP), svc(&["198.18.2.5:8080"]));
    desired.insert(fe("198.19.0.21", 80, PROTO_TCP), svc(&["198.18.1.12:8080"]));
    let mut h = Harness::new().unwrap();
    h.program(&desired);
    h.ns.ip(&["link", "set", "pods0", "address", "02:00:00:00:00:aa"])
        .unwrap();
    let pod = h
        .pods_in_a_namespace(&[
            (BE4, "02:00:00:00:01:0b"),
            (CLI4, "02:00:00:00:01:0a"),
            (BE6, "02:00:00:00:01:0b"),
            (CLI6, "02:00:00:00:01:0a"),
        ])
        .unwrap();
    let (pods0, up) = (h.ifindex("pods0"), h.ifindex(UPLINK));
    let refused = h.dp.add_pod_dev(UPLINK, up).unwrap_err().to_string();
    assert!(
        refused.contains("not a veth whose peer is in another network namespace"),
        "{refused}"
    );
    h.dp.add_pod_dev("pods0", pods0).unwrap();
    assert_eq!(h.dp.pod_devs().unwrap(), vec![pods0]);
    let into = |f: Vec<u8>, mac| with_macs(routed(f), mac, VETH_MAC);
    run_steps(
        &mut h,
        "into a pod",
        vec![
            step(
                tcp(CLI4, 40000, VIP4, 80, Tcp::Syn),
                REDIRECT,
                Out::Exact(into(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn), BE_MAC)),
                &[
                    (Stat::DnatNew, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                ],
            ),
            step(
                tcp(CLI4, 40000, VIP4, 80, Tcp::Ack),
                REDIRECT,
                Out::Exact(into(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack), BE_MAC)),
                &[
                    (Stat::DnatEstablished, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                ],
            ),
            // The next one from the flow cache: Ethernet addresses, TTL, checksums the same.
            step(
                tcp(CLI4, 40000, VIP4, 80, Tcp::Ack),
                REDIRECT,
                Out::Exact(into(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack), BE_MAC)),
                &[
                    (Stat::DnatEstablished, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                    (Stat::FlowCacheHit, 1),
                ],
            ),
            step(
                tcp(BE4, 8080, CLI4, 40000, Tcp::Ack),
                REDIRECT,
                Out::Exact(into(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack), CLI_MAC)),
                &[(Stat::RevNat, 1), (Stat::Routed, 1), (Stat::RoutedToPod, 1)],
            ),
            step(
                tcp(BE4, 8080, CLI4, 40000, Tcp::Ack),
                REDIRECT,
                Out::Exact(into(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack), CLI_MAC)),
                &[
                    (Stat::RevNat, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                    (Stat::FlowCacheHit, 1),
                ],
            ),
            step(
                udp(CLI6, 40000, VIP6, 53, b"7"),
                REDIRECT,
                Out::Exact(into(udp(CLI6, 40000, BE6, 5353, b"7"), BE_MAC)),
                &[
                    (Stat::DnatNew, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                ],
            ),
            step(
                udp(BE6, 5353, CLI6, 40000, b"be-1 7"),
                REDIRECT,
                Out::Exact(into(udp(VIP6, 53, CLI6, 40000, b"be-1 7"), CLI_MAC)),
                &[(Stat::RevNat, 1), (Stat::Routed, 1), (Stat::RoutedToPod, 1)],
            ),
            step(
                udp(BE6, 5353, CLI6, 40000, b"be-1 8"),
                REDIRECT,
                Out::Exact(into(udp(VIP6, 53, CLI6, 40000, b"be-1 8"), CLI_MAC)),
                &[
                    (Stat::RevNat, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                    (Stat::FlowCacheHit, 1),
                ],
            ),
            step(
                udp(CLI6, 40000, VIP6, 53, b"8"),
                REDIRECT,
                Out::Exact(into(udp(CLI6, 40000, BE6, 5353, b"8"), BE_MAC)),
                &[
                    (Stat::DnatEstablished, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                ],
            ),
            step(
                udp(CLI6, 40000, VIP6, 53, b"9"),
                REDIRECT,
                Out::Exact(into(udp(CLI6, 40000, BE6, 5353, b"9"), BE_MAC)),
                &[
                    (Stat::DnatEstablished, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                    (Stat::FlowCacheHit, 1),
                ],
            ),
            // IP options: the Ethernet addresses in a store of their own.
            step(
                tcp_syn_with_ip_options(CLI4, 40003, VIP4, 80),
                REDIRECT,
                Out::Exact(into(
                    tcp_syn_with_ip_options(CLI4, 40003, BE4, 8080),
                    BE_MAC,
                )),
                &[
                    (Stat::DnatNew, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                ],
            ),
            // Behind the uplink: the kernel forwards it, TTL and all, the first packet and the next.
            step(
                tcp(CLI4, 40001, "198.19.0.20", 80, Tcp::Syn),
                OK,
                Out::Exact(tcp(CLI4, 40001, "198.18.2.5", 8080, Tcp::Syn)),
                &[(Stat::DnatNew, 1)],
            ),
            step(
                tcp(CLI4, 40001, "198.19.0.20", 80, Tcp::Ack),
                OK,
                Out::Exact(tcp(CLI4, 40001, "198.18.2.5", 8080, Tcp::Ack)),
                &[(Stat::DnatEstablished, 1)],
            ),
            step(
                tcp(CLI4, 40001, "198.19.0.20", 80, Tcp::Ack),
                OK,
                Out::Exact(tcp(CLI4, 40001, "198.18.2.5", 8080, Tcp::Ack)),
                &[(Stat::DnatEstablished, 1), (Stat::FlowCacheHit, 1)],
            ),
            // No neighbour entry yet: routed through the neighbour table, addresses untouched.
            step(
                tcp(CLI4, 40002, "198.19.0.21", 80, Tcp::Syn),
                REDIRECT,
                Out::Exact(routed(tcp(CLI4, 40002, "198.18.1.12", 8080, Tcp::Syn))),
                &[(Stat::DnatNew, 1), (Stat::Routed, 1)],
            ),
        ],
    );
    let flags = |h: &Harness, src: &str, sport: u16, dst: &str| {
        let key = CtKey {
            src: to_addr(src.parse().unwrap()),
            dst: to_addr(dst.parse().unwrap()),
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        h.ct_map().get(&key).unwrap().expect("entry").flags
    };
    let routes = CT_F_KERNEL_ROUTE | CT_F_POD_ROUTE;
    assert_eq!(
        flags(&h, CLI4, 40001, "198.19.0.20") & routes,
        CT_F_KERNEL_ROUTE
    );
    assert_eq!(flags(&h, CLI4, 40000, VIP4) & routes, CT_F_POD_ROUTE);
    assert_eq!(flags(&h, CLI4, 40002, "198.19.0.21") & routes, 0);
    // Forgetting gone devices keeps the others.
    h.dp.retain_pod_devs(&[pods0].into()).unwrap();
    assert_eq!(h.dp.pod_devs().unwrap(), vec![pods0]);
    // A device gone: forgotten by its own index only (another's shares its slot).
    h.dp.forget_pod_dev(pods0 + weir_common::MAX_POD_DEVS)
        .unwrap();
    assert_eq!(h.dp.pod_devs().unwrap(), vec![pods0]);
    // The route a flow remembers holds while its veth is a pod's; after, the kernel forwards
    // (and the flow cache's slot, which held the route too, ends).
    h.dp.forget_pod_dev(pods0).unwrap();
    assert!(h.dp.pod_devs().unwrap().is_empty());
    run_steps(
        &mut h,
        "veth forgotten",
        vec![step(
            tcp(CLI4, 40000, VIP4, 80, Tcp::Ack),
            OK,
            Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack)),
            &[(Stat::DnatEstablished, 1)],
        )],
    );
    assert_eq!(flags(&h, CLI4, 40000, VIP4) & routes, CT_F_KERNEL_ROUTE);
    drop(pod);
}

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

/// The flow cache holds no flow past a change the agent makes to conntrack: a UDP flow whose
/// backend is removed is purged (as kube-proxy clears UDP conntrack entries), and its next
/// datagram is a new flow to the remaining backend, not the cached rewrite to the removed one.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn flows_the_agent_purges_leave_the_flow_cache() {
    let mut h = Harness::new().unwrap();
    assert!(
        h.flow_cache(),
        "the loader knows this kernel: the cache is on"
    );
    h.program(&services());
    let to =
        |be: &str, port, payload: &'static [u8]| Out::Exact(udp(CLI4, 40000, be, port, payload));
    run_steps(
        &mut h,
        "cached",
        vec![
            step(
                udp(CLI4, 40000, VIP4, 53, b"7"),
                OK,
                to(BE4, 5353, b"7"),
                &[(Stat::DnatNew, 1)],
            ),
            step(
                udp(CLI4, 40000, VIP4, 53, b"8"),
                OK,
                to(BE4, 5353, b"8"),
                &[(Stat::DnatEstablished, 1)],
            ),
            step(
                udp(CLI4, 40000, VIP4, 53, b"9"),
                OK,
                to(BE4, 5353, b"9"),
                &[(Stat::DnatEstablished, 1), (Stat::FlowCacheHit, 1)],
            ),
        ],
    );
    let mut moved = services();
    moved.insert(fe(VIP4, 53, PROTO_UDP), svc(&["198.18.1.12:5353"]));
    h.program(&moved);
    run_steps(
        &mut h,
        "backend removed",
        vec![step(
            udp(CLI4, 40000, VIP4, 53, b"a"),
            OK,
            to("198.18.1.12", 5353, b"a"),
            &[(Stat::DnatNew, 1)],
        )],
    );
}
