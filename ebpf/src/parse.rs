//! Packet parsing: Ethernet, IPv4 or IPv6, then TCP or UDP ports. Direct packet access with a
//! bounds check before every read; the result is a copy, so later helper calls that move the
//! packet cannot leave a stale pointer behind.
use aya_ebpf::programs::TcContext;

use crate::maps::{count_raw, Scratch, SCRATCH};
use weir_common::{Addr, Stat, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

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
    /// The IPv4 header checksum as it is in the packet (byte order kept); not set for IPv6.
    pub ip_csum: u16,
    /// The IPv4 TTL or the IPv6 hop limit.
    pub ttl: u8,
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
    /// An ICMP (IPv4) or ICMPv6 (IPv6) message: its IP header is in the caller's `Packet`,
    /// `proto` and `l4_off` (the ICMP header) set, no ports. It may be an error about a flow
    /// the programs translate (see `icmp`).
    Icmp,
    /// Not IPv4/IPv6, or not TCP/UDP: not ours to touch.
    Pass(Stat),
    Drop(Stat),
}

#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
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

/// A packet offset the parser found (kept in the scratch slot, where the verifier loses its
/// bounds), bounded again for a direct read: headers end well before 1024 bytes.
#[inline(always)]
pub fn hdr_ptr<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    if off >= 1024 {
        return None;
    }
    ptr_at::<T>(ctx, off)
}

/// The verdict as a plain integer (see `Parsed::decode`). Inlined: as a subprogram it costs a
/// call and a return on every packet (dear under return-thunk mitigations), and the verifier
/// takes the program's stack with it inside.
#[inline(always)]
pub fn parse_out_of_line(ctx: &TcContext, out: &mut Packet) -> u32 {
    match parse(ctx, out) {
        Parsed::Packet => 0,
        Parsed::Icmp => PARSED_ICMP,
        Parsed::Pass(s) => 0x100 | s as u32,
        Parsed::Drop(s) => 0x200 | s as u32,
    }
}

/// `parse_out_of_line`'s code for `Parsed::Icmp` (nothing counted yet).
pub const PARSED_ICMP: u32 = 0x400;

/// A byte at `off` bytes into a header `ptr_at` checked.
#[inline(always)]
pub fn byte<H>(hdr: *const H, off: usize) -> u8 {
    // SAFETY: the caller's `ptr_at` checked the header's bounds, which hold `off`.
    unsafe { *hdr.cast::<u8>().add(off) }
}

/// A 16-bit field at an even `off` bytes into a header `ptr_at` checked, as it lies in memory
/// (network byte order kept): one load. Read as aligned: packet data starts at an even
/// offset of its buffer (see `nat::read_head`); an unaligned read is loaded byte by byte.
#[inline(always)]
pub fn half<H>(hdr: *const H, off: usize) -> u16 {
    // SAFETY: the caller's `ptr_at` checked the header's bounds, which hold `off + 2`; the
    // address is even (above).
    unsafe { hdr.cast::<u8>().add(off).cast::<u16>().read() }
}

/// A 32-bit word at an even `off` bytes into a header, as it lies in memory: two loads.
#[inline(always)]
pub fn word<H>(hdr: *const H, off: usize) -> u32 {
    let (a, b) = (half(hdr, off) as u32, half(hdr, off + 2) as u32);
    if cfg!(target_endian = "little") {
        a | (b << 16)
    } else {
        (a << 16) | b
    }
}

/// Writes the packet's fields straight into `out` (the per-CPU scratch) as they are read:
/// built in locals and copied at the end, the addresses went through the stack byte by byte.
/// On `Pass` or `Drop`, `out` holds a partial parse the caller does not read.
#[inline(always)]
fn parse(ctx: &TcContext, out: &mut Packet) -> Parsed {
    let Some(eth) = ptr_at::<[u8; ETH_HLEN]>(ctx, 0) else {
        return Parsed::Drop(Stat::DropTruncated);
    };
    let eth_proto = u16::from_be(half(eth, 12));
    let l3_off = ETH_HLEN;
    let (proto, l4_off) = match eth_proto {
        ETH_P_IP => {
            let Some(hdr) = ptr_at::<[u8; 20]>(ctx, l3_off) else {
                return Parsed::Drop(Stat::DropTruncated);
            };
            let vihl = byte(hdr, 0);
            if vihl >> 4 != 4 {
                return Parsed::Drop(Stat::DropMalformed);
            }
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Parsed::Drop(Stat::DropMalformed);
            }
            // Fragments after the first carry no ports: leave them to the kernel.
            let frag = u16::from_be(half(hdr, 6)) & 0x1fff;
            if frag != 0 {
                return Parsed::Pass(Stat::PassOtherProto);
            }
            out.ip_csum = half(hdr, 10);
            out.ttl = byte(hdr, 8);
            out.src = Addr::from_v4_word(word(hdr, 12));
            out.dst = Addr::from_v4_word(word(hdr, 16));
            out.v6 = false;
            (byte(hdr, 9), l3_off + ihl)
        }
        ETH_P_IPV6 => {
            let Some(hdr) = ptr_at::<[u8; IPV6_HLEN]>(ctx, l3_off) else {
                return Parsed::Drop(Stat::DropTruncated);
            };
            if byte(hdr, 0) >> 4 != 6 {
                return Parsed::Drop(Stat::DropMalformed);
            }
            out.ttl = byte(hdr, 7);
            out.src = Addr::from_words([word(hdr, 8), word(hdr, 12), word(hdr, 16), word(hdr, 20)]);
            out.dst =
                Addr::from_words([word(hdr, 24), word(hdr, 28), word(hdr, 32), word(hdr, 36)]);
            out.v6 = true;
            (byte(hdr, 6), l3_off + IPV6_HLEN)
        }
        _ => return Parsed::Pass(Stat::PassNonIp),
    };
    let (csum_rel, min_len) = match proto {
        PROTO_TCP => (16, 20),
        PROTO_UDP => (6, 8),
        PROTO_SCTP => return Parsed::Pass(Stat::PassOtherProto),
        PROTO_ICMP | PROTO_ICMPV6 if (proto == PROTO_ICMPV6) == out.v6 => {
            out.proto = proto;
            out.l3_off = l3_off;
            out.l4_off = l4_off;
            return Parsed::Icmp;
        }
        _ => return Parsed::Pass(Stat::PassOtherProto),
    };
    let mut tcp_flags = 0;
    let l4 = if proto == PROTO_TCP {
        let Some(tcp) = ptr_at::<[u8; 20]>(ctx, l4_off) else {
            return Parsed::Drop(Stat::DropTruncated);
        };
        if ((byte(tcp, 12) >> 4) as usize) * 4 < min_len {
            return Parsed::Drop(Stat::DropMalformed);
        }
        tcp_flags = byte(tcp, 13);
        tcp
    } else {
        let Some(udp) = ptr_at::<[u8; 8]>(ctx, l4_off) else {
            return Parsed::Drop(Stat::DropTruncated);
        };
        udp.cast()
    };
    // Kept in network byte order, as the maps store them.
    out.sport = half(l4, 0);
    out.dport = half(l4, 2);
    out.proto = proto;
    out.tcp_flags = tcp_flags;
    out.l3_off = l3_off;
    out.l4_off = l4_off;
    out.csum_off = l4_off + csum_rel;
    Parsed::Packet
}

/// The per-CPU scratch slot with the packet parsed into it. Err: the parser's code, counted
/// (`0x200` set: a drop), `PARSED_ICMP` (not counted: the ICMP path counts), or 0 when there
/// is no slot.
#[inline(always)]
pub fn parsed(ctx: &TcContext) -> Result<&'static mut Scratch, u32> {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return Err(0);
    };
    // SAFETY: the per-CPU scratch slot is ours for this run; programs do not nest on a CPU.
    let s = unsafe { &mut *s };
    match parse_out_of_line(ctx, &mut s.pkt) {
        0 => Ok(s),
        PARSED_ICMP => Err(PARSED_ICMP),
        code => {
            count_raw(code & 0xff);
            Err(code)
        }
    }
}
