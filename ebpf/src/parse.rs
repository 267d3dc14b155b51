//! Packet parsing: Ethernet, IPv4 or IPv6, then TCP or UDP ports. Direct packet access with a
//! bounds check before every read; the result is a copy, so later helper calls that move the
//! packet cannot leave a stale pointer behind.
use aya_ebpf::programs::TcContext;
use weir_common::{Addr, Stat, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPV6_HLEN: usize = 40;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub v6: bool,
    pub tcp_flags: u8,
    pub l3_off: usize,
    pub l4_off: usize,
    /// Offset of the L4 checksum field.
    pub csum_off: usize,
}

impl Packet {
    /// A TCP segment opening a connection: SYN without ACK.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

pub enum Parsed {
    /// A TCP or UDP packet, written to the caller's `Packet`.
    Packet,
    /// Not IPv4/IPv6, or not TCP/UDP: not ours to touch.
    Pass(Stat),
    Drop(Stat),
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    // Volatile: LLVM would otherwise merge the two adjacent u32 context loads into one u64 load,
    // which the verifier rejects.
    // SAFETY: reading two fields of our own context.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.skb.skb).data) as usize,
            core::ptr::read_volatile(&(*ctx.skb.skb).data_end) as usize,
        )
    };
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds; the read is unaligned-safe.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

/// Out of line so that its temporaries leave the stack before the lookups run; the verdict
/// comes back as a plain integer (see `Parsed::decode`).
#[inline(never)]
pub fn parse_out_of_line(ctx: &TcContext, out: &mut Packet) -> u32 {
    match parse(ctx, out) {
        Parsed::Packet => 0,
        Parsed::Pass(s) => 0x100 | s as u32,
        Parsed::Drop(s) => 0x200 | s as u32,
    }
}

#[inline(always)]
fn parse(ctx: &TcContext, out: &mut Packet) -> Parsed {
    let Some(eth_proto) = read::<[u8; 2]>(ctx, 12) else {
        return Parsed::Drop(Stat::DropTruncated);
    };
    let eth_proto = u16::from_be_bytes(eth_proto);
    let l3_off = ETH_HLEN;
    let (src, dst, proto, l4_off, v6) = match eth_proto {
        ETH_P_IP => {
            let Some(hdr) = read::<[u8; 20]>(ctx, l3_off) else {
                return Parsed::Drop(Stat::DropTruncated);
            };
            if hdr[0] >> 4 != 4 {
                return Parsed::Drop(Stat::DropMalformed);
            }
            let ihl = ((hdr[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Parsed::Drop(Stat::DropMalformed);
            }
            // Fragments after the first carry no ports: leave them to the kernel.
            let frag = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
            if frag != 0 {
                return Parsed::Pass(Stat::PassOtherProto);
            }
            let src = Addr::from_v4([hdr[12], hdr[13], hdr[14], hdr[15]]);
            let dst = Addr::from_v4([hdr[16], hdr[17], hdr[18], hdr[19]]);
            (src, dst, hdr[9], l3_off + ihl, false)
        }
        ETH_P_IPV6 => {
            let Some(vtc) = read::<u8>(ctx, l3_off) else {
                return Parsed::Drop(Stat::DropTruncated);
            };
            let Some(nexthdr) = read::<u8>(ctx, l3_off + 6) else {
                return Parsed::Drop(Stat::DropTruncated);
            };
            let (Some(src), Some(dst)) = (
                read::<Addr>(ctx, l3_off + 8),
                read::<Addr>(ctx, l3_off + 24),
            ) else {
                return Parsed::Drop(Stat::DropTruncated);
            };
            if vtc >> 4 != 6 {
                return Parsed::Drop(Stat::DropMalformed);
            }
            (src, dst, nexthdr, l3_off + IPV6_HLEN, true)
        }
        _ => return Parsed::Pass(Stat::PassNonIp),
    };
    let (csum_rel, min_len) = match proto {
        PROTO_TCP => (16, 20),
        PROTO_UDP => (6, 8),
        PROTO_SCTP => return Parsed::Pass(Stat::PassOtherProto),
        _ => return Parsed::Pass(Stat::PassOtherProto),
    };
    let Some(ports) = read::<[u8; 4]>(ctx, l4_off) else {
        return Parsed::Drop(Stat::DropTruncated);
    };
    let mut tcp_flags = 0;
    if proto == PROTO_TCP {
        let Some(off_flags) = read::<[u8; 2]>(ctx, l4_off + 12) else {
            return Parsed::Drop(Stat::DropTruncated);
        };
        if read::<[u8; 20]>(ctx, l4_off).is_none() {
            return Parsed::Drop(Stat::DropTruncated);
        }
        if ((off_flags[0] >> 4) as usize) * 4 < min_len {
            return Parsed::Drop(Stat::DropMalformed);
        }
        tcp_flags = off_flags[1];
    } else if read::<[u8; 8]>(ctx, l4_off).is_none() {
        return Parsed::Drop(Stat::DropTruncated);
    }
    *out = Packet {
        src,
        dst,
        // Kept in network byte order, as the maps store them.
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        v6,
        tcp_flags,
        l3_off,
        l4_off,
        csum_off: l4_off + csum_rel,
    };
    Parsed::Packet
}
