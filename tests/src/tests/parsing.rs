//! Malformed and foreign packets: dropped (bad headers) or passed untouched (ARP, ICMP echo,
//! later fragments), each counted.

use etherparse::PacketBuilder;
use weir_common::Stat;
use weir_proxy::model::Desired;

use crate::{fixture::*, *};

fixtures! {
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
