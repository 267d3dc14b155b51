//! Address and port rewrites with incremental checksum updates. `BPF_F_PSEUDO_HDR` keeps
//! CHECKSUM_PARTIAL packets (what veth hands us) correct; `BPF_F_MARK_MANGLED_0` leaves a UDP
//! checksum of zero (none) alone.
use aya_ebpf::programs::TcContext;
use weir_common::{Addr, Stat, PROTO_UDP};

use crate::parse::Packet;

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

#[inline(always)]
fn l4_flags(p: &Packet) -> u64 {
    if p.proto == PROTO_UDP && !p.v6 {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    }
}

#[inline(always)]
fn word(a: &Addr, i: usize) -> u32 {
    u32::from_ne_bytes([a.0[i], a.0[i + 1], a.0[i + 2], a.0[i + 3]])
}

/// Rewrites the source (`dst == false`) or destination address of the packet.
#[inline(always)]
pub fn set_addr(
    ctx: &TcContext,
    p: &Packet,
    dst: bool,
    old: &Addr,
    new: &Addr,
) -> Result<(), Stat> {
    if set_addr_out_of_line(ctx, p, dst, old, new) == 0 {
        Ok(())
    } else {
        Err(Stat::DropRewriteFailed)
    }
}

/// Out of line: one copy of the IPv6 word loop instead of one per call site. Returns 0 or -1.
#[inline(never)]
fn set_addr_out_of_line(ctx: &TcContext, p: &Packet, dst: bool, old: &Addr, new: &Addr) -> i32 {
    match set_addr_inner(ctx, p, dst, old, new) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

#[inline(always)]
fn set_addr_inner(
    ctx: &TcContext,
    p: &Packet,
    dst: bool,
    old: &Addr,
    new: &Addr,
) -> Result<(), Stat> {
    let flags = l4_flags(p) | BPF_F_PSEUDO_HDR | 4;
    if p.v6 {
        let off = p.l3_off + if dst { 24 } else { 8 };
        ctx.store(off, &new.0, 0)
            .map_err(|_| Stat::DropRewriteFailed)?;
        let mut i = 0;
        while i < 16 {
            let (o, n) = (word(old, i), word(new, i));
            if o != n {
                ctx.l4_csum_replace(p.csum_off, o as u64, n as u64, flags)
                    .map_err(|_| Stat::DropRewriteFailed)?;
            }
            i += 4;
        }
    } else {
        let off = p.l3_off + if dst { 16 } else { 12 };
        let (o, n) = (word(old, 12), word(new, 12));
        ctx.store(off, &n, 0).map_err(|_| Stat::DropRewriteFailed)?;
        ctx.l3_csum_replace(p.l3_off + 10, o as u64, n as u64, 4)
            .map_err(|_| Stat::DropRewriteFailed)?;
        ctx.l4_csum_replace(p.csum_off, o as u64, n as u64, flags)
            .map_err(|_| Stat::DropRewriteFailed)?;
    }
    Ok(())
}

/// Rewrites the source or destination port; ports are in network byte order.
#[inline(always)]
pub fn set_port(ctx: &TcContext, p: &Packet, dst: bool, old: u16, new: u16) -> Result<(), Stat> {
    if old == new {
        return Ok(());
    }
    let off = p.l4_off + if dst { 2 } else { 0 };
    ctx.store(off, &new, 0)
        .map_err(|_| Stat::DropRewriteFailed)?;
    ctx.l4_csum_replace(p.csum_off, old as u64, new as u64, l4_flags(p) | 2)
        .map_err(|_| Stat::DropRewriteFailed)
}
