//! ICMP errors about translated flows. A router on the way, or the endpoint itself, may answer
//! a packet of a flow the programs translated with an ICMP error: fragmentation needed (packet
//! too big), port unreachable, time exceeded. The error quotes the packet's header as it was
//! sent, translated. The socket the error is for finds it by that quoted header, so unless the
//! translation is undone the error reaches nobody: PMTU discovery stalls (large segments are
//! lost for good), and a UDP socket connected to a service never hears of a refused port.
//! Linux conntrack does this for kube-proxy (`nf_nat_icmp_reply_translation`). Here an error is
//! translated as a packet of its flow going its way would be:
//!
//! - the quoted header, by the conntrack entry of its tuple reversed (the error travels
//!   against the packet it quotes): addresses, ports, the IPv4 header checksum and, where the
//!   error quotes it, the L4 checksum;
//! - the error's destination, where it is the quoted packet's source;
//! - the error's source, where it is the quoted packet's destination: an endpoint's own error
//!   then comes from the service, as the flow's replies do. A router keeps its own address;
//! - the ICMP checksum (and the IPv4 header's) by difference.
//!
//! An error whose source is rewritten at an ingress is routed here, as a reply is (its new
//! source may be an address of the node: see `route`). At an egress, only the node's own
//! errors about packets of flows to endpoints are taken, as `reply::reply_out` takes replies.
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use weir_common::*;

use crate::{
    ct::{fwd_entry, set_fwd_key_reversed},
    lb::now_ns,
    maps::{count, SCRATCH},
    nat::{add_addr_diff, diff, diff16, fold32, full_by_diff, Diffs},
    parse::{byte, half, hdr_ptr, word, IPV6_HLEN},
    route::{fallback, lookup, redirect, set_addrs, ROUTE_LOCAL, ROUTE_NEIGH, ROUTE_NONE},
};

const TC_ACT_SHOT: i32 = 2;
/// `bpf_skb_store_bytes` keeps a CHECKSUM_COMPLETE packet's `skb->csum` right for the bytes
/// it changes.
const BPF_F_RECOMPUTE_CSUM: u64 = 1;
const ICMP_HLEN: usize = 8;

/// The ICMP (RFC 792) and ICMPv6 (RFC 4443) types that quote the packet they are about.
#[inline(always)]
fn is_error(v6: bool, ty: u8) -> bool {
    if v6 {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        matches!(ty, 1..=4)
    } else {
        // Destination unreachable, source quench, time exceeded, parameter problem.
        matches!(ty, 3 | 4 | 11 | 12)
    }
}

/// The ICMP message the parser found (`parse::PARSED_ICMP`), at an ingress or an egress: an
/// error about a translated flow is translated, anything else passes as it is. Out of line:
/// the ICMP path has its own frame, and the per-packet path carries none of its code.
#[inline(never)]
pub fn error(ctx: &TcContext, ingress: bool) -> i32 {
    match translate(ctx, ingress) {
        Ok(Some(verdict)) => verdict,
        Ok(None) => {
            count(Stat::PassOtherProto);
            TC_ACT_OK as i32
        }
        Err(stat) => {
            count(stat);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn put<T>(ctx: &TcContext, off: usize, v: &T) -> Result<(), Stat> {
    ctx.store(off, v, BPF_F_RECOMPUTE_CSUM)
        .map_err(|_| Stat::DropRewriteFailed)
}

/// Ok(None): not an error about a translated flow (or one the parser's bounds do not reach).
#[inline(always)]
fn translate(ctx: &TcContext, ingress: bool) -> Result<Option<i32>, Stat> {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return Ok(None);
    };
    // SAFETY: the per-CPU scratch slot is ours for this run; the parser filled `pkt`.
    let s = unsafe { &mut *s };
    let v6 = s.pkt.v6;
    let icmp = s.pkt.l4_off;
    let Some(head) = hdr_ptr::<[u8; 4]>(ctx, icmp) else {
        return Ok(None);
    };
    if !is_error(v6, byte(head, 0)) {
        return Ok(None);
    }
    let icmp_csum = half(head, 2);

    // The quoted header: its tuple into `s.reply_key` (as it was sent).
    let q3 = icmp + ICMP_HLEN;
    let mut q_ip_csum = 0;
    let (q4, proto) = if v6 {
        let Some(h) = hdr_ptr::<[u8; IPV6_HLEN]>(ctx, q3) else {
            return Ok(None);
        };
        if byte(h, 0) >> 4 != 6 {
            return Ok(None);
        }
        s.reply_key.src = Addr::from_words([word(h, 8), word(h, 12), word(h, 16), word(h, 20)]);
        s.reply_key.dst = Addr::from_words([word(h, 24), word(h, 28), word(h, 32), word(h, 36)]);
        (q3 + IPV6_HLEN, byte(h, 6))
    } else {
        let Some(h) = hdr_ptr::<[u8; 20]>(ctx, q3) else {
            return Ok(None);
        };
        // Version 4 without options; a fragment after the first quotes no ports.
        if byte(h, 0) != 0x45 || u16::from_be(half(h, 6)) & 0x1fff != 0 {
            return Ok(None);
        }
        q_ip_csum = half(h, 10);
        s.reply_key.src = Addr::from_v4_word(word(h, 12));
        s.reply_key.dst = Addr::from_v4_word(word(h, 16));
        (q3 + 20, byte(h, 9))
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(None);
    }
    let Some(ports) = hdr_ptr::<[u8; 4]>(ctx, q4) else {
        return Ok(None);
    };
    s.reply_key.sport = half(ports, 0);
    s.reply_key.dport = half(ports, 2);
    s.reply_key.proto = proto;
    // The quoted L4 checksum, where the error quotes it (an ICMPv4 error need only quote 8
    // bytes, short of TCP's) and the datagram has one (UDP's may be 0).
    let q_csum_off = q4 + if proto == PROTO_TCP { 16 } else { 6 };
    let q_csum = match hdr_ptr::<u16>(ctx, q_csum_off).map(|p| half(p, 0)) {
        Some(c) if proto == PROTO_TCP || c != 0 => Some(c),
        _ => None,
    };

    // The flow's entry, as a packet of it going the error's way finds it.
    set_fwd_key_reversed(s);
    let Some(entry) = fwd_entry(s) else {
        return Ok(None);
    };
    // SAFETY: an LRU value pointer stays valid for this program run.
    let e = unsafe { &*entry };
    let peer = e.flags & (CT_F_HAIRPIN | CT_F_SNAT) != 0;
    if e.expires_ns <= now_ns() || (!ingress && (e.dir != CT_DIR_REPLY || peer)) {
        return Ok(None);
    }
    // What such a packet becomes: its source is the quoted destination (`chg_src`), its
    // destination the quoted source (`chg_dst`). `peer_addr` is an address only with `peer`.
    let q = &s.reply_key;
    if e.dir == CT_DIR_FORWARD {
        if peer {
            s.chg_src.set(&q.dst, &e.peer_addr, q.dport, e.peer_port);
        } else {
            s.chg_src.none();
        }
        s.chg_dst.set(&q.src, &e.nat_addr, q.sport, e.nat_port);
    } else {
        if peer {
            s.chg_dst.set(&q.src, &e.peer_addr, q.sport, e.peer_port);
        } else {
            s.chg_dst.none();
        }
        s.chg_src.set(&q.dst, &e.nat_addr, q.dport, e.nat_port);
    }
    let (src, dst) = (&s.chg_src, &s.chg_dst);
    let out_src = src.on && s.pkt.src == src.old_addr;
    let out_dst = dst.on && s.pkt.dst == dst.old_addr;

    // Routed here when its source changes at an ingress; a hop then, as a router's.
    let route = if ingress && out_src {
        let to = if out_dst {
            &s.chg_dst.new_addr
        } else {
            &s.pkt.dst
        };
        set_addrs(&mut s.fib, &s.chg_src.new_addr, to, v6);
        lookup(ctx, s)
    } else {
        ROUTE_NONE
    };
    let hop = route != ROUTE_NONE && route != ROUTE_LOCAL;
    let (src, dst, p) = (&s.chg_src, &s.chg_dst, &s.pkt);

    // Differences (new - old): the quoted addresses and ports, the error's addresses.
    let mut d = Diffs { addr: 0, port: 0 };
    diff(p, src, &mut d);
    diff(p, dst, &mut d);
    let mut d_outer = 0;
    if out_src {
        add_addr_diff(&mut d_outer, &p.src, &src.new_addr, v6);
    }
    if out_dst {
        add_addr_diff(&mut d_outer, &p.dst, &dst.new_addr, v6);
    }
    // The ICMP checksum covers the quoted bytes (and, for ICMPv6, the error's addresses).
    let mut d_icmp = d.addr + d.port;
    if v6 {
        d_icmp += d_outer;
    }
    let new_q_ip_csum = full_by_diff(q_ip_csum, fold32(d.addr), false);
    if !v6 {
        d_icmp += diff16(q_ip_csum, new_q_ip_csum);
    }
    let new_q_csum = q_csum.map(|c| full_by_diff(c, fold32(d.addr + d.port), proto == PROTO_UDP));
    if let (Some(old), Some(new)) = (q_csum, new_q_csum) {
        d_icmp += diff16(old, new);
    }
    let new_icmp_csum = full_by_diff(icmp_csum, fold32(d_icmp), false);

    // Read everything first: a store may move the packet's data.
    let (l3, ttl) = (p.l3_off, if hop { p.ttl - 1 } else { p.ttl });
    // References into the scratch slot, not copies: this frame follows the program's in the
    // call chain the verifier limits to 512 bytes.
    let q_src = if dst.on {
        &dst.new_addr
    } else {
        &s.reply_key.src
    };
    let q_dst = if src.on {
        &src.new_addr
    } else {
        &s.reply_key.dst
    };
    let q_sport = if dst.on {
        dst.new_port
    } else {
        s.reply_key.sport
    };
    let q_dport = if src.on {
        src.new_port
    } else {
        s.reply_key.dport
    };
    let o_src = if out_src { &src.new_addr } else { &p.src };
    let o_dst = if out_dst { &dst.new_addr } else { &p.dst };
    if v6 {
        if out_src || out_dst {
            put(ctx, l3 + 8, &o_src.0)?;
            put(ctx, l3 + 24, &o_dst.0)?;
        }
        if hop {
            put(ctx, l3 + 7, &ttl)?;
        }
        put(ctx, q3 + 8, &q_src.0)?;
        put(ctx, q3 + 24, &q_dst.0)?;
    } else {
        if out_src || out_dst || hop {
            let mut d = d_outer;
            if hop {
                d += diff16(
                    u16::from_ne_bytes([p.ttl, p.proto]),
                    u16::from_ne_bytes([ttl, p.proto]),
                );
            }
            let csum = full_by_diff(p.ip_csum, fold32(d), false).to_ne_bytes();
            let [s0, s1, s2, s3] = o_src.v4_octets();
            let [d0, d1, d2, d3] = o_dst.v4_octets();
            let hdr: [u8; 12] = [
                ttl, p.proto, csum[0], csum[1], s0, s1, s2, s3, d0, d1, d2, d3,
            ];
            put(ctx, l3 + 8, &hdr)?;
        }
        let c = new_q_ip_csum.to_ne_bytes();
        let [s0, s1, s2, s3] = q_src.v4_octets();
        let [d0, d1, d2, d3] = q_dst.v4_octets();
        let hdr: [u8; 10] = [c[0], c[1], s0, s1, s2, s3, d0, d1, d2, d3];
        put(ctx, q3 + 10, &hdr)?;
    }
    put(ctx, q4, &[q_sport, q_dport])?;
    if let Some(c) = new_q_csum {
        put(ctx, q_csum_off, &c)?;
    }
    put(ctx, icmp + 2, &new_icmp_csum)?;
    count(Stat::IcmpErrorNat);
    Ok(Some(if hop {
        // Through the neighbour table whatever the device, a pod's too.
        redirect(s, ROUTE_NEIGH)
    } else if ingress && out_src && route != ROUTE_LOCAL {
        fallback()
    } else {
        TC_ACT_OK as i32
    }))
}
