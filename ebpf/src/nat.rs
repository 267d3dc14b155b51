//! Address and port rewrites. Bytes are written with `bpf_skb_store_bytes`, never with direct
//! packet access: a TC program that writes packet data directly gets a prologue that un-clones
//! every skb it sees, and TCP transmits clones, so every packet on the device, service or not,
//! would pay a copy. The helper makes only the rewritten packets writable.
//!
//! Checksums are updated by difference, computed here: one `bpf_l3_csum_replace` for IPv4, and
//! for L4 one `bpf_l4_csum_replace` for the pseudo-header part (addresses) and one for the rest
//! (ports), which a CHECKSUM_PARTIAL packet (what veth hands over) must not see: only the
//! kernel knows which kind of checksum the packet carries.
use aya_ebpf::programs::TcContext;
use weir_common::{Addr, Stat, PROTO_UDP};

use crate::parse::Packet;

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

/// One side of a rewrite: the old and new address and port; `on == false` leaves it alone.
/// Plain values (no references or Options): LLVM turns those into pointer arithmetic the
/// verifier refuses.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Change {
    pub old_addr: Addr,
    pub new_addr: Addr,
    pub old_port: u16,
    pub new_port: u16,
    pub on: bool,
}

impl Change {
    #[inline(always)]
    pub fn new(old_addr: &Addr, new_addr: &Addr, old_port: u16, new_port: u16) -> Self {
        Change {
            old_addr: *old_addr,
            new_addr: *new_addr,
            old_port,
            new_port,
            on: true,
        }
    }

    /// No rewrite of an address that stays `addr` (which `new_addr` then holds).
    #[inline(always)]
    pub fn keep(addr: &Addr) -> Self {
        Change {
            old_addr: *addr,
            new_addr: *addr,
            old_port: 0,
            new_port: 0,
            on: false,
        }
    }

    #[inline(always)]
    pub fn none() -> Self {
        Change {
            old_addr: Addr([0; 16]),
            new_addr: Addr([0; 16]),
            old_port: 0,
            new_port: 0,
            on: false,
        }
    }
}

/// Running one's complement sums of (new - old).
struct Diffs {
    addr: u64,
    port: u64,
}

#[inline(always)]
fn fold32(mut s: u64) -> u32 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s as u32
}

#[inline(always)]
fn fold16(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

#[inline(always)]
fn word(a: &Addr, i: usize) -> u32 {
    u32::from_ne_bytes([a.0[i], a.0[i + 1], a.0[i + 2], a.0[i + 3]])
}

/// Rewrites the source and the destination of the packet as the two changes say.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, p: &Packet, src: &Change, dst: &Change) -> Result<(), Stat> {
    if rewrite_out_of_line(ctx, p, src, dst) == 0 {
        Ok(())
    } else {
        Err(Stat::DropRewriteFailed)
    }
}

/// Out of line: one copy of the code instead of one per call site. Returns 0 or -1.
#[inline(never)]
fn rewrite_out_of_line(ctx: &TcContext, p: &Packet, src: &Change, dst: &Change) -> i32 {
    match rewrite_inner(ctx, p, src, dst) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

#[inline(always)]
fn side(ctx: &TcContext, p: &Packet, c: &Change, is_dst: bool, d: &mut Diffs) -> Result<(), Stat> {
    if !c.on {
        return Ok(());
    }
    if p.v6 {
        let off = p.l3_off + if is_dst { 24 } else { 8 };
        ctx.store(off, &c.new_addr.0, 0)
            .map_err(|_| Stat::DropRewriteFailed)?;
        let mut i = 0;
        while i < 16 {
            d.addr += (!word(&c.old_addr, i)) as u64 + word(&c.new_addr, i) as u64;
            i += 4;
        }
    } else {
        let off = p.l3_off + if is_dst { 16 } else { 12 };
        let (o, n) = (word(&c.old_addr, 12), word(&c.new_addr, 12));
        ctx.store(off, &n, 0).map_err(|_| Stat::DropRewriteFailed)?;
        d.addr += (!o) as u64 + n as u64;
    }
    if c.old_port != c.new_port {
        let off = p.l4_off + if is_dst { 2 } else { 0 };
        ctx.store(off, &c.new_port, 0)
            .map_err(|_| Stat::DropRewriteFailed)?;
        d.port += (!c.old_port) as u64 + c.new_port as u64;
    }
    Ok(())
}

#[inline(always)]
fn rewrite_inner(ctx: &TcContext, p: &Packet, src: &Change, dst: &Change) -> Result<(), Stat> {
    let mut d = Diffs { addr: 0, port: 0 };
    side(ctx, p, src, false, &mut d)?;
    side(ctx, p, dst, true, &mut d)?;
    // The IPv4 header checksum covers the addresses: the same difference.
    if !p.v6 && d.addr != 0 {
        ctx.l3_csum_replace(p.l3_off + 10, 0, fold32(d.addr) as u64, 0)
            .map_err(|_| Stat::DropRewriteFailed)?;
    }
    let mangled = if p.proto == PROTO_UDP && !p.v6 {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    if d.addr != 0 {
        ctx.l4_csum_replace(
            p.csum_off,
            0,
            fold32(d.addr) as u64,
            BPF_F_PSEUDO_HDR | mangled,
        )
        .map_err(|_| Stat::DropRewriteFailed)?;
    }
    if d.port != 0 {
        let diff = fold16(fold32(d.port)) as u64;
        ctx.l4_csum_replace(p.csum_off, 0, diff, mangled)
            .map_err(|_| Stat::DropRewriteFailed)?;
    }
    Ok(())
}
