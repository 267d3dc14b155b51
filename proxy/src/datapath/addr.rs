//! Conversions between std addresses and the map representation.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use weir_common::Addr;

pub fn to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4(v4.octets()),
        IpAddr::V6(v6) => Addr(v6.octets()),
    }
}

pub fn to_ip(a: &Addr) -> IpAddr {
    if a.is_v4() {
        IpAddr::V4(Ipv4Addr::from(a.v4_octets()))
    } else {
        IpAddr::V6(Ipv6Addr::from(a.0))
    }
}

/// Formats `ip:port`, bracketing IPv6.
pub fn host_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}
