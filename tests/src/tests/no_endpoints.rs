//! A Service without endpoints is rejected, never blackholed: ICMP port unreachable on the
//! per-packet path (checksums valid), ECONNREFUSED at connect.

use etherparse::{
    icmpv4::DestUnreachableHeader, icmpv6::DestUnreachableCode, Icmpv4Type, Icmpv6Type,
    PacketBuilder,
};
use weir_common::{Stat, PROTO_TCP};
use weir_proxy::model::Desired;

use crate::{fixture::*, node::*, *};

fixtures! {
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
fn a_service_without_endpoints_is_refused_not_blackholed() {
    let s = sim(true);
    for (socket_lb, path) in PATHS {
        let r = s
            .loadtest(
                &[
                    "198.19.0.13:80",
                    "--rate",
                    "200",
                    "--duration",
                    "500ms",
                    "--new-conn",
                    "--timeout",
                    "2s",
                ],
                socket_lb,
                false,
            )
            .unwrap();
        assert_eq!(r.ok, 0, "{path}");
        assert_eq!(
            r.errors.get("refused"),
            Some(&r.sent),
            "{path}: refused at once, not timed out: {:?}",
            r.errors
        );
    }
}
