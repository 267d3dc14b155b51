//! Rejects a packet to a service without endpoints the way kube-proxy does (iptables `REJECT`,
//! icmp-port-unreachable): the packet is turned into an ICMP/ICMPv6 port unreachable error
//! carrying the offending header, and sent back out of the device it came in on.
use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_REDIRECT},
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use weir_common::{Stat, PROTO_TCP};

use crate::{
    maps::{count, Scratch},
    nat::fold16,
    parse::{ETH_HLEN, IPV6_HLEN},
};

const TC_ACT_SHOT: i32 = 2;

const IPV4_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;

/// The checksum of a one's complement sum (RFC 1071): folded to 16 bits, complemented.
#[inline(always)]
fn checksum(sum: u32) -> u16 {
    !fold16(sum)
}

#[inline(always)]
fn add_be16(buf: &[u8], sum: &mut u32) {
    let mut i = 0;
    while i + 1 < buf.len() {
        *sum += u16::from_be_bytes([buf[i], buf[i + 1]]) as u32;
        i += 2;
    }
}

/// `bpf_skb_load_bytes` of exactly `dst.len()` bytes (aya's `load_bytes` clamps the length to
/// the packet, which the verifier cannot bound).
#[inline(always)]
fn load_exact(ctx: &TcContext, off: usize, dst: &mut [u8]) -> Result<(), Stat> {
    // SAFETY: dst is valid for dst.len() bytes of writes.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            off as u32,
            dst.as_mut_ptr().cast(),
            dst.len() as u32,
        )
    };
    if rc != 0 {
        return Err(Stat::DropRejectFailed);
    }
    Ok(())
}

#[inline(always)]
fn swap_macs(ctx: &TcContext) -> Result<(), Stat> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| Stat::DropRejectFailed)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0)
        .map_err(|_| Stat::DropRejectFailed)
}

/// Shrinks the packet to the quote, then opens `room` bytes for the new headers after the MAC.
#[inline(always)]
fn make_room(ctx: &TcContext, quote: usize, room: usize) -> Result<(), Stat> {
    // SAFETY: the context pointer is the program's own.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + quote) as u32, 0) };
    if rc != 0 {
        return Err(Stat::DropRejectFailed);
    }
    ctx.adjust_room(room as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| Stat::DropRejectFailed)
}

#[inline(always)]
fn send_back(ctx: &TcContext) -> Result<i32, Stat> {
    swap_macs(ctx)?;
    // SAFETY: reading the device index of our own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a helper on plain integers.
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    if rc != TC_ACT_REDIRECT as i64 {
        return Err(Stat::DropRejectFailed);
    }
    Ok(TC_ACT_REDIRECT as i32)
}

/// Cold path, kept out of line so its buffers do not share the hot path's stack frame; it
/// returns the verdict and counts its outcome itself.
#[inline(never)]
pub fn reject(ctx: &TcContext, s: &mut Scratch) -> i32 {
    let r = if s.pkt.v6 {
        reject6(ctx, s)
    } else {
        reject4(ctx, s)
    };
    match r {
        Ok(v) => {
            count(Stat::RejectNoBackend);
            v
        }
        Err(stat) => {
            count(stat);
            TC_ACT_SHOT
        }
    }
}

/// How much of the offending packet the error quotes: the IP header and 8 bytes of UDP, or the
/// whole 20-byte TCP header. Not less for TCP: a veth hands over CHECKSUM_PARTIAL packets, and
/// the kernel will not cut one short of its checksum field (transport offset + 18).
#[inline(always)]
fn reject4(ctx: &TcContext, s: &mut Scratch) -> Result<i32, Stat> {
    if s.pkt.l4_off != ETH_HLEN + IPV4_HLEN {
        // IP options: quoting them is not worth the code; the flow is dropped and counted.
        return Err(Stat::DropRejectFailed);
    }
    if s.pkt.proto == PROTO_TCP {
        build4::<{ IPV4_HLEN + 20 }>(ctx, s)
    } else {
        build4::<{ IPV4_HLEN + 8 }>(ctx, s)
    }
}

#[inline(always)]
fn build4<const Q: usize>(ctx: &TcContext, s: &mut Scratch) -> Result<i32, Stat> {
    let (hdr, rest) = s.icmp.split_at_mut(IPV4_HLEN + ICMP_HLEN);
    let quote = &mut rest[..Q];
    load_exact(ctx, ETH_HLEN, quote)?;
    make_room(ctx, Q, IPV4_HLEN + ICMP_HLEN)?;
    hdr.fill(0);
    let total = (IPV4_HLEN + ICMP_HLEN + Q) as u16;
    hdr[0] = 0x45;
    hdr[2..4].copy_from_slice(&total.to_be_bytes());
    hdr[6] = 0x40; // don't fragment
    hdr[8] = 64; // TTL
    hdr[9] = 1; // ICMP
    hdr[12..16].copy_from_slice(&quote[16..20]); // from the service address
    hdr[16..20].copy_from_slice(&quote[12..16]); // to the client
    let mut sum = 0;
    add_be16(&hdr[..IPV4_HLEN], &mut sum);
    hdr[10..12].copy_from_slice(&checksum(sum).to_be_bytes());

    hdr[20] = 3; // destination unreachable
    hdr[21] = 3; // port unreachable
    let mut sum = 0;
    add_be16(&hdr[IPV4_HLEN..], &mut sum);
    add_be16(quote, &mut sum);
    hdr[22..24].copy_from_slice(&checksum(sum).to_be_bytes());

    let hdr: &[u8; IPV4_HLEN + ICMP_HLEN] =
        (&*hdr).try_into().map_err(|_| Stat::DropRejectFailed)?;
    ctx.store(ETH_HLEN, hdr, 0)
        .map_err(|_| Stat::DropRejectFailed)?;
    send_back(ctx)
}

#[inline(always)]
fn reject6(ctx: &TcContext, s: &mut Scratch) -> Result<i32, Stat> {
    if s.pkt.l4_off != ETH_HLEN + IPV6_HLEN {
        return Err(Stat::DropRejectFailed);
    }
    if s.pkt.proto == PROTO_TCP {
        build6::<{ IPV6_HLEN + 20 }>(ctx, s)
    } else {
        build6::<{ IPV6_HLEN + 8 }>(ctx, s)
    }
}

#[inline(always)]
fn build6<const Q: usize>(ctx: &TcContext, s: &mut Scratch) -> Result<i32, Stat> {
    let (hdr, rest) = s.icmp.split_at_mut(IPV6_HLEN + ICMP_HLEN);
    let quote = &mut rest[..Q];
    load_exact(ctx, ETH_HLEN, quote)?;
    make_room(ctx, Q, IPV6_HLEN + ICMP_HLEN)?;
    hdr.fill(0);
    let payload = (ICMP_HLEN + Q) as u16;
    hdr[0] = 0x60;
    hdr[4..6].copy_from_slice(&payload.to_be_bytes());
    hdr[6] = 58; // ICMPv6
    hdr[7] = 64; // hop limit
    hdr[8..24].copy_from_slice(&quote[24..40]);
    hdr[24..40].copy_from_slice(&quote[8..24]);
    hdr[40] = 1; // destination unreachable
    hdr[41] = 4; // port unreachable
                 // Pseudo-header: addresses, upper-layer length, next header.
    let mut sum = payload as u32 + 58;
    add_be16(&hdr[8..40], &mut sum);
    add_be16(&hdr[IPV6_HLEN..], &mut sum);
    add_be16(quote, &mut sum);
    hdr[42..44].copy_from_slice(&checksum(sum).to_be_bytes());

    let hdr: &[u8; IPV6_HLEN + ICMP_HLEN] =
        (&*hdr).try_into().map_err(|_| Stat::DropRejectFailed)?;
    ctx.store(ETH_HLEN, hdr, 0)
        .map_err(|_| Stat::DropRejectFailed)?;
    send_back(ctx)
}
