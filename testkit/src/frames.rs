//! Frames for the packet tests: Ethernet, IPv4 or IPv6, TCP or UDP, built with etherparse, and
//! what a router does to them.
use std::net::Ipv4Addr;

use etherparse::PacketBuilder;

pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

#[derive(Clone, Copy, Debug)]
pub enum Tcp {
    Syn,
    Ack,
    Fin,
    Rst,
}

/// An Ethernet frame from the pod to the host with a TCP segment.
pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: Tcp) -> Vec<u8> {
    let b = ip_builder(src, dst);
    let t = b.tcp(sport, dport, 1000, 64240);
    let t = match flags {
        Tcp::Syn => t.syn(),
        Tcp::Ack => t.ack(1),
        Tcp::Fin => t.fin().ack(1),
        Tcp::Rst => t.rst(),
    };
    let payload: &[u8] = if matches!(flags, Tcp::Ack) {
        b"42\n"
    } else {
        b""
    };
    let mut v = Vec::new();
    t.write(&mut v, payload).expect("build TCP frame");
    v
}

/// A SYN from an IPv4 address with 4 bytes of IP options (four no-ops).
pub fn tcp_syn_with_ip_options(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let (Ok(s), Ok(d)) = (src.parse::<Ipv4Addr>(), dst.parse::<Ipv4Addr>()) else {
        panic!("bad IPv4 addresses {src} {dst}");
    };
    let mut ip =
        etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, s.octets(), d.octets())
            .expect("an IPv4 header");
    ip.options = etherparse::Ipv4Options::try_from(&[1u8, 1, 1, 1][..]).expect("IPv4 options");
    let mut v = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .tcp(sport, dport, 1000, 64240)
        .syn()
        .write(&mut v, b"")
        .expect("build TCP frame");
    v
}

pub fn udp(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    ip_builder(src, dst)
        .udp(sport, dport)
        .write(&mut v, payload)
        .expect("build UDP frame");
    v
}

fn ip_builder(src: &str, dst: &str) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(POD_MAC, HOST_MAC);
    match (
        src.parse::<std::net::IpAddr>(),
        dst.parse::<std::net::IpAddr>(),
    ) {
        (Ok(std::net::IpAddr::V4(s)), Ok(std::net::IpAddr::V4(d))) => {
            eth.ipv4(s.octets(), d.octets(), 64)
        }
        (Ok(std::net::IpAddr::V6(s)), Ok(std::net::IpAddr::V6(d))) => {
            eth.ipv6(s.octets(), d.octets(), 64)
        }
        _ => panic!("bad addresses {src} {dst}"),
    }
}

/// `frame` as a router forwards it: the TTL (hop limit) one less, the IPv4 header checksum
/// recomputed. What the programs send when they route a packet themselves.
pub fn routed(frame: Vec<u8>) -> Vec<u8> {
    let ttl = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame[22],
        _ => frame[21],
    };
    with_ttl(frame, ttl - 1)
}

/// `frame` with this TTL (hop limit), the IPv4 header checksum recomputed.
pub fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
            frame[22] = ttl;
            let ihl = ((frame[14] & 0x0f) as usize) * 4;
            frame[24] = 0;
            frame[25] = 0;
            let sum = ones_sum(&frame[14..14 + ihl]);
            frame[24..26].copy_from_slice(&(!sum).to_be_bytes());
        }
        0x86dd => frame[21] = ttl,
        other => panic!("with_ttl: ethertype {other:#x}"),
    }
    frame
}

/// The one's complement sum of `bytes` as 16-bit words (the Internet checksum before its
/// complement).
fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in bytes.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `bytes` folds to zero when the checksum field in them is right.
pub fn checksum_ok(bytes: &[u8]) -> bool {
    ones_sum(bytes) == 0xffff
}
